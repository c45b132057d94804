//! aarch64 entry path: the arm64 Linux Image header.

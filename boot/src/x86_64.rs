//! x86_64 entry paths: PVH and Multiboot2.

/work/wt/owner/tests/guests/target/x86_64-unknown-none/debug/deps/hvabi-61fbe3092a5348f6.d: /work/wt/owner/iommu/abi/src/lib.rs

/work/wt/owner/tests/guests/target/x86_64-unknown-none/debug/deps/libhvabi-61fbe3092a5348f6.rmeta: /work/wt/owner/iommu/abi/src/lib.rs

/work/wt/owner/iommu/abi/src/lib.rs:

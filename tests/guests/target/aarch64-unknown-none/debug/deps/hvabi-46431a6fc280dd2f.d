/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/hvabi-46431a6fc280dd2f.d: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/libhvabi-46431a6fc280dd2f.rlib: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/libhvabi-46431a6fc280dd2f.rmeta: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/iommu/abi/src/lib.rs:

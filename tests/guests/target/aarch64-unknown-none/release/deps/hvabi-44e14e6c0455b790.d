/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/release/deps/hvabi-44e14e6c0455b790.d: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/release/deps/libhvabi-44e14e6c0455b790.rlib: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/release/deps/libhvabi-44e14e6c0455b790.rmeta: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/iommu/abi/src/lib.rs:

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/release/deps/hvabi-945ee3f31e6ac170.d: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/release/deps/libhvabi-945ee3f31e6ac170.rlib: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/release/deps/libhvabi-945ee3f31e6ac170.rmeta: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/iommu/abi/src/lib.rs:

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/hvabi-81fba44b7c0f5d59.d: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/libhvabi-81fba44b7c0f5d59.rlib: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/libhvabi-81fba44b7c0f5d59.rmeta: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/iommu/abi/src/lib.rs:

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/hvabi-23b42e2b7182dc4c.d: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/libhvabi-23b42e2b7182dc4c.rmeta: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/iommu/abi/src/lib.rs:

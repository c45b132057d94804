/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/hvabi-2f63c3db0d091428.d: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/libhvabi-2f63c3db0d091428.rmeta: /work/wt/vcpus/iommu/abi/src/lib.rs

/work/wt/vcpus/iommu/abi/src/lib.rs:

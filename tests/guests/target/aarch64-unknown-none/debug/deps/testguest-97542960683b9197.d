/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/testguest-97542960683b9197.d: src/main.rs src/arch_aarch64.rs src/smp.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/testguest-97542960683b9197: src/main.rs src/arch_aarch64.rs src/smp.rs

src/main.rs:
src/arch_aarch64.rs:
src/smp.rs:

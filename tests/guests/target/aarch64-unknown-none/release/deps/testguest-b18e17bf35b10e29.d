/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/release/deps/testguest-b18e17bf35b10e29.d: src/main.rs src/arch_aarch64.rs src/smp.rs

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/release/deps/testguest-b18e17bf35b10e29: src/main.rs src/arch_aarch64.rs src/smp.rs

src/main.rs:
src/arch_aarch64.rs:
src/smp.rs:

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/release/deps/testguest-19ab5d2637b9b717.d: src/main.rs src/arch_x86_64.rs src/smp.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/release/deps/testguest-19ab5d2637b9b717: src/main.rs src/arch_x86_64.rs src/smp.rs

src/main.rs:
src/arch_x86_64.rs:
src/smp.rs:

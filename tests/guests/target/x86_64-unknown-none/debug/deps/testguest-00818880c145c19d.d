/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/testguest-00818880c145c19d.d: src/main.rs src/arch_x86_64.rs src/smp.rs

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/testguest-00818880c145c19d: src/main.rs src/arch_x86_64.rs src/smp.rs

src/main.rs:
src/arch_x86_64.rs:
src/smp.rs:

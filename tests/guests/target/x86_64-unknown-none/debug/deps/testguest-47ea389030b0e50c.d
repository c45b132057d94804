/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/testguest-47ea389030b0e50c.d: src/main.rs src/arch_x86_64.rs src/smp.rs Cargo.toml

/work/wt/vcpus/tests/guests/target/x86_64-unknown-none/debug/deps/libtestguest-47ea389030b0e50c.rmeta: src/main.rs src/arch_x86_64.rs src/smp.rs Cargo.toml

src/main.rs:
src/arch_x86_64.rs:
src/smp.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=
# env-dep:CLIPPY_CONF_DIR

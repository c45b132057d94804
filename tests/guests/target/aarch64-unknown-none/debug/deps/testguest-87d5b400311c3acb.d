/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/testguest-87d5b400311c3acb.d: src/main.rs src/arch_aarch64.rs src/smp.rs Cargo.toml

/work/wt/vcpus/tests/guests/target/aarch64-unknown-none/debug/deps/libtestguest-87d5b400311c3acb.rmeta: src/main.rs src/arch_aarch64.rs src/smp.rs Cargo.toml

src/main.rs:
src/arch_aarch64.rs:
src/smp.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=
# env-dep:CLIPPY_CONF_DIR

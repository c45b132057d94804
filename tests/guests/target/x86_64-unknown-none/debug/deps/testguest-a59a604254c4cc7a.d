/work/wt/owner/tests/guests/target/x86_64-unknown-none/debug/deps/testguest-a59a604254c4cc7a.d: src/main.rs src/arch_x86_64.rs Cargo.toml

/work/wt/owner/tests/guests/target/x86_64-unknown-none/debug/deps/libtestguest-a59a604254c4cc7a.rmeta: src/main.rs src/arch_x86_64.rs Cargo.toml

src/main.rs:
src/arch_x86_64.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR

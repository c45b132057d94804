//! Selects the linker script for the target architecture (see `linker/`).
fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap();
    if os != "none" {
        return;
    }
    let dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../linker");
    let script = dir.join(format!("{arch}.ld"));
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    // Keep the boot crate's entry objects even though nothing in Rust references them.
    let entry = if arch == "x86_64" {
        "pvh_start32"
    } else {
        "_start"
    };
    println!("cargo:rustc-link-arg-bins=--undefined={entry}");
}

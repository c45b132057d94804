//! `cargo xtask build`: the hypervisor image for one architecture.

use crate::Arch;
use crate::util::{Result, cargo, root, run};
use std::path::PathBuf;
use std::process::Command;

/// The built image: the ELF (for `-kernel` on both architectures) and, on aarch64, the raw arm64
/// `Image` made from it (for U-Boot `booti`, UEFI-less servers, and QEMU's Image path).
pub struct Image {
    pub elf: PathBuf,
    pub raw: Option<PathBuf>,
}

pub fn build(arch: Arch, release: bool) -> Result<Image> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "kernel",
        "--bin",
        "hypervisor",
        "--target",
        arch.triple(),
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let elf = target_dir()
        .join(arch.triple())
        .join(profile)
        .join("hypervisor");
    let raw = match arch {
        Arch::X86_64 => None,
        Arch::Aarch64 => {
            let out = elf.with_file_name("Image");
            run(Command::new(objcopy()?)
                .args(["-O", "binary"])
                .arg(&elf)
                .arg(&out))?;
            Some(out)
        }
    };
    println!("xtask: built {}", elf.display());
    Ok(Image { elf, raw })
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `llvm-objcopy` from the toolchain's `llvm-tools` component (installed by `setup`).
fn objcopy() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .current_dir(root())
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustc --print sysroot: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let host = Command::new("rustc")
        .current_dir(root())
        .args(["--print", "host-tuple"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "x86_64-unknown-linux-gnu".into());
    let path = sysroot
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-objcopy");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} missing: run `cargo xtask setup` (llvm-tools component)",
            path.display()
        ))
    }
}

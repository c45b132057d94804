//! Entry paths of the hypervisor. Each one starts on the machine state its boot protocol defines,
//! builds the same [`BootInfo`], and calls the hypervisor's `hv_main`:
//!
//! - x86_64: [PVH](x86_64::pvh) (QEMU `-kernel`) and [Multiboot2](x86_64::multiboot2) (GRUB, iPXE);
//! - aarch64: the arm64 Linux [`Image`](aarch64) header (QEMU `-kernel`, U-Boot `booti`).
//!
//! The protocol parsers are safe functions over byte slices so they run in `cargo test` on the
//! host; only the assembly entry stubs and the step that turns a boot-loader pointer into a slice
//! are `unsafe`, and they live in the per-architecture `entry` modules.
#![no_std]

pub mod console;
pub mod guests;
mod info;
pub mod smp;
pub mod spcr;
pub use info::*;

pub mod aarch64;
pub mod x86_64;

#[cfg(target_os = "none")]
unsafe extern "Rust" {
    /// The hypervisor's architecture-neutral main, defined by the `kernel` crate.
    /// Called exactly once on the boot CPU with the MMU on and a valid stack.
    pub fn hv_main(info: &'static BootInfo) -> !;
}

//! aarch64 entry path: the arm64 Linux `Image` protocol (Linux `Documentation/arch/arm64/booting.rst`).
//!
//! One image serves every arm64 loader:
//!
//! - QEMU `-kernel hypervisor` (ELF): QEMU enters at the ELF entry point with `x0 = 0` and places
//!   the DTB at the base of RAM (0x4000_0000 on `virt`);
//! - QEMU `-kernel Image`, U-Boot `booti`, and any other loader of raw arm64 Images: the loader
//!   reads our 64-byte `Image` header (`image.rs`), places the image at a 2 MiB-aligned base plus
//!   [`TEXT_OFFSET`] and enters at its first byte with `x0` = the DTB's physical address.
//!
//! The parsers ([`dtb`]: DTB → [`BootInfo`](crate::BootInfo), console, PSCI; [`map`]: the EL2
//! identity map) are safe functions over byte slices and run in `cargo test` on the host. Only the
//! assembly entry and the step that turns the loader's pointer into a slice are `unsafe`; they live
//! in `image.rs`, compiled for `aarch64-unknown-none` only. See `docs/boot-aarch64.md`.

pub mod dtb;
pub mod efi_map;
pub mod map;
pub use crate::spcr;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
mod efi;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
mod image;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub use efi::efi_console;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub use image::{boot_info, device_tree, entry_el, entry_error, stack_guards};

/// booting.rst "Call the kernel image": the image is placed `text_offset` bytes above a 2 MiB
/// aligned base. 2 MiB keeps the first 2 MiB of RAM free for what QEMU puts there for an ELF
/// image (the DTB, 1 MiB; see [`QEMU_RAM_BASE`]) and keeps the image itself 2 MiB-aligned, so the
/// boot map can cover it with blocks.
pub const TEXT_OFFSET: u64 = 0x20_0000;

/// The physical address the image is linked at (`linker/aarch64.ld`): QEMU `virt`'s RAM base plus
/// [`TEXT_OFFSET`]. The hypervisor is linked statically (no relocation processing), so it must run
/// where it was linked; the entry checks this and stops if a loader put it elsewhere.
pub const LINK_ADDRESS: u64 = QEMU_RAM_BASE + TEXT_OFFSET;

/// Base of RAM on QEMU `virt` (hw/arm/virt.c `VIRT_MEM`). For an ELF `-kernel`, QEMU passes
/// `x0 = 0` and stores the DTB here, so the entry looks for the FDT magic at this address when
/// `x0` is 0 (only when the image itself runs in this GiB, i.e. RAM really starts here).
pub const QEMU_RAM_BASE: u64 = 0x4000_0000;

/// Largest DTB accepted: booting.rst "Setup the device tree" says the blob "must not exceed
/// 2 megabytes in size" and "must be placed on an 8-byte boundary".
pub const MAX_DTB_SIZE: usize = 2 << 20;

/// The boot page table maps the first 512 GiB (T0SZ = 25, one level-1 table of 1 GiB blocks);
/// a DTB must lie below this to be read before `init_direct_map`.
pub const BOOT_MAP_LIMIT: u64 = 1 << 39;

/// Why the entry could not give the hypervisor what it needs. The entry still calls `hv_main`
/// (with whatever it could learn), so that the kernel can print this on the console it found and
/// power off with a failure status instead of hanging silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// Entered at EL1 or EL3. booting.rst allows EL2 or non-secure EL1; a hypervisor needs EL2.
    /// The MMU stays off in this case (the EL2 setup cannot run), which is enough to report it.
    NotEl2 { el: u8 },
    /// HCR_EL2.E2H still reads 1 after being written 0: a CPU without FEAT_E2H0 (VHE only). The
    /// hypervisor is written for the non-VHE EL2 translation regime, so the MMU was left off.
    E2hForced,
    /// `x0` was 0 and no FDT was found at [`QEMU_RAM_BASE`]: there is no memory map.
    NoDeviceTree,
    /// The loader passed a DTB that failed validation.
    DeviceTree { pa: u64, error: dtb::DtbError },
}

impl core::fmt::Display for EntryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EntryError::NotEl2 { el } => write!(
                f,
                "entered at EL{el}; the hypervisor needs EL2 (QEMU: -M virt,virtualization=on; \
                 U-Boot/firmware: boot the image at EL2)"
            ),
            EntryError::E2hForced => {
                f.write_str("HCR_EL2.E2H is stuck at 1 (VHE-only CPU); non-VHE EL2 is required")
            }
            EntryError::NoDeviceTree => {
                f.write_str("no device tree: x0 was 0 and there is no FDT at the base of RAM")
            }
            EntryError::DeviceTree { pa, error } => write!(f, "device tree at {pa:#x}: {error}"),
        }
    }
}

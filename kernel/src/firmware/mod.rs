//! Firmware discovery: ACPI (through the `acpi` crate and our DMAR/IORT parsers), the device
//! tree, and QEMU's fw_cfg ACPI loader on arm.

pub mod acpi;
#[cfg(target_arch = "aarch64")]
pub mod devicetree;
#[cfg(target_arch = "aarch64")]
pub mod fw_cfg;

use crate::mem::phys;
use boot::BootInfo;

/// Size of the flattened device tree the boot path passed (0 when there is none or it is
/// unreadable), so the frame allocator can keep it.
pub fn dtb_len(info: &BootInfo) -> u64 {
    let Some(pa) = info.dtb else { return 0 };
    match phys::firmware_bytes(pa, 8) {
        Ok(h) if h[..4] == [0xd0, 0x0d, 0xfe, 0xed] => {
            u64::from(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))
        }
        _ => 0,
    }
}

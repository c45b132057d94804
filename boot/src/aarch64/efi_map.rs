//! The UEFI memory map the EFI stub brings out of boot services, as [`BootInfo`] regions.
//! Safe and host-tested; the stub itself (`efi.rs`) is target-only.

use crate::BootInfo;
use crate::x86_64::multiboot2::efi_kind;

/// Size of EFI_MEMORY_DESCRIPTOR version 1 (UEFI 2.10 §7.2); firmware may report more per entry.
const DESCRIPTOR_MIN: usize = 40;
const EFI_PAGE_SIZE: u64 = 4096;

/// EFI_MEMORY_DESCRIPTORs → regions, with the same type rules as the x86 Multiboot2 EFI map
/// (loader and boot-services memory usable after ExitBootServices, runtime memory reserved).
/// Returns how many descriptors were read; a descriptor size below version 1's makes the map
/// unusable (0). Ranges that would wrap are clamped at the top of the address space.
pub fn regions_from_map(map: &[u8], desc_size: usize, info: &mut BootInfo) -> usize {
    if desc_size < DESCRIPTOR_MIN {
        return 0;
    }
    let mut n = 0;
    for d in map.chunks_exact(desc_size) {
        let word = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap_or([0; 8]));
        let ty = (word(0) & 0xffff_ffff) as u32;
        let (start, pages, attr) = (word(8), word(24), word(32));
        info.push_region(crate::MemoryRegion {
            start,
            len: pages.saturating_mul(EFI_PAGE_SIZE).min(u64::MAX - start),
            kind: efi_kind(ty, attr),
        });
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{BootProtocol, MemoryKind};
    use std::vec::Vec;

    fn desc(size: usize, ty: u32, start: u64, pages: u64, attr: u64) -> Vec<u8> {
        let mut d = std::vec![0u8; size];
        d[0..4].copy_from_slice(&ty.to_le_bytes());
        d[8..16].copy_from_slice(&start.to_le_bytes());
        d[24..32].copy_from_slice(&pages.to_le_bytes());
        d[32..40].copy_from_slice(&attr.to_le_bytes());
        d
    }

    #[test]
    fn aavmf_like_map() {
        // AAVMF uses 48-byte descriptors; types as after ExitBootServices on QEMU virt.
        let map = [
            desc(48, 7, 0x4000_0000, 0x200, 0xf),       // conventional
            desc(48, 2, 0x4020_0000, 0x13a, 0xf),       // loader data: our image copy
            desc(48, 4, 0x4100_0000, 0x100, 0xf),       // boot services data
            desc(48, 6, 0x4f00_0000, 0x10, 1 << 63),    // runtime data
            desc(48, 9, 0x4c43_0000, 0x4, 0xf),         // ACPI reclaim
            desc(48, 11, 0x0400_0000, 0x4000, 1 << 63), // MMIO (flash)
        ]
        .concat();
        let mut info = BootInfo::new(BootProtocol::Uefi);
        assert_eq!(regions_from_map(&map, 48, &mut info), 6);
        let kinds: Vec<_> = info.memory_regions().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                MemoryKind::Usable,
                MemoryKind::Usable,
                MemoryKind::Usable,
                MemoryKind::Reserved,
                MemoryKind::AcpiReclaimable,
                MemoryKind::Reserved,
            ]
        );
        assert_eq!(info.memory_regions()[1].len, 0x13a * 4096);
    }

    #[test]
    fn short_descriptors_wrapping_ranges_and_trailing_bytes() {
        let mut info = BootInfo::new(BootProtocol::Uefi);
        assert_eq!(regions_from_map(&[0; 96], 24, &mut info), 0);
        assert_eq!(regions_from_map(&[0; 96], 0, &mut info), 0);
        let mut map = desc(40, 7, u64::MAX - 0xfff, u64::MAX, 0);
        map.extend_from_slice(&[1, 2, 3]);
        assert_eq!(regions_from_map(&map, 40, &mut info), 1);
        assert_eq!(info.memory_regions()[0].end(), u64::MAX);
    }
}

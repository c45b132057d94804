//! Locating and recognising the ACPI Root System Description Pointer.
//!
//! On BIOS machines the RSDP sits on a 16-byte boundary in the first KiB of the Extended BIOS Data
//! Area or in the read-only BIOS area 0xE0000-0xFFFFF (ACPI 6.5 §5.2.5.1). UEFI machines publish it
//! only through the EFI configuration table, which Multiboot2 forwards as a copy (tags 14/15) and
//! PVH as `rsdp_paddr`; the scan is the fallback when neither is given.

/// Size of the ACPI 1.0 RSDP, covered by the first checksum.
pub const RSDP_V1_LEN: usize = 20;
/// Size of the ACPI 2.0+ RSDP (adds `Length`, `XsdtAddress`, the extended checksum).
pub const RSDP_V2_LEN: usize = 36;

const SIGNATURE: &[u8; 8] = b"RSD PTR ";

/// Returns the RSDP revision if `bytes` starts with a valid RSDP: the signature and the ACPI 1.0
/// checksum over the first 20 bytes. For revision >= 2 the extended checksum over 36 bytes must
/// also hold when 36 bytes are available; a structure claiming revision 2 with a bad extended
/// checksum is treated as revision 0, so the ACPI code falls back to the RSDT.
pub fn rsdp_revision(bytes: &[u8]) -> Option<u8> {
    let v1 = bytes.get(..RSDP_V1_LEN)?;
    if &v1[..8] != SIGNATURE || checksum(v1) != 0 {
        return None;
    }
    let revision = v1[15];
    if revision >= 2 {
        match bytes.get(..RSDP_V2_LEN) {
            Some(v2) if checksum(v2) == 0 => return Some(revision),
            _ => return Some(0),
        }
    }
    Some(revision)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
}

/// Scans the legacy BIOS areas for an RSDP and returns its physical address.
///
/// `read(pa, buf)` must fill `buf` with the bytes at physical address `pa` (zeros for anything it
/// cannot read); the scan reads only the BIOS data area word at 0x40E, at most the first KiB of the
/// EBDA, and 0xE0000-0xFFFFF. Usable from the boot path (identity map) and from the hypervisor
/// (direct map).
pub fn find_rsdp_in_bios_area(read: impl Fn(u64, &mut [u8])) -> Option<u64> {
    // BIOS data area word 0x40E: EBDA segment. Only trust it if it points into the usual place
    // just below the 640 KiB line; garbage there must not make us read elsewhere.
    let mut seg = [0u8; 2];
    read(0x40e, &mut seg);
    let ebda = u64::from(u16::from_le_bytes(seg)) << 4;
    if (0x80000..0xa0000).contains(&ebda)
        && let Some(pa) = scan(&read, ebda, ebda + 1024)
    {
        return Some(pa);
    }
    scan(&read, 0xe0000, 0x100000)
}

fn scan(read: &impl Fn(u64, &mut [u8]), start: u64, end: u64) -> Option<u64> {
    const CHUNK: usize = 1024;
    let mut chunk = [0u8; CHUNK];
    let mut base = start & !15;
    while base < end {
        let n = ((end - base) as usize).min(CHUNK);
        read(base, &mut chunk[..n]);
        for off in (0..n).step_by(16) {
            if chunk[off..].starts_with(SIGNATURE) {
                let pa = base + off as u64;
                let mut candidate = [0u8; RSDP_V2_LEN];
                read(pa, &mut candidate);
                if rsdp_revision(&candidate).is_some() {
                    return Some(pa);
                }
            }
        }
        base += n as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    fn make(rev: u8, break_ext: bool) -> [u8; RSDP_V2_LEN] {
        let mut r = [0u8; RSDP_V2_LEN];
        r[..8].copy_from_slice(SIGNATURE);
        r[9..15].copy_from_slice(b"TESTOE");
        r[15] = rev;
        r[16..20].copy_from_slice(&0x7fe_0000u32.to_le_bytes());
        r[20..24].copy_from_slice(&36u32.to_le_bytes());
        r[24..32].copy_from_slice(&0x7fe_1000u64.to_le_bytes());
        r[8] = 0u8.wrapping_sub(checksum(&r[..20]));
        r[32] = 0u8.wrapping_sub(checksum(&r[..36]));
        if break_ext {
            r[32] = r[32].wrapping_add(1);
        }
        r
    }

    fn memory(placements: &[(u64, &[u8])]) -> impl Fn(u64, &mut [u8]) + use<> {
        let mut mem: Vec<u8> = std::vec![0; 0x100000];
        for (pa, bytes) in placements {
            mem[*pa as usize..*pa as usize + bytes.len()].copy_from_slice(bytes);
        }
        move |pa, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = mem.get(pa as usize + i).copied().unwrap_or(0);
            }
        }
    }

    #[test]
    fn revisions() {
        assert_eq!(rsdp_revision(&make(0, false)[..20]), Some(0));
        assert_eq!(rsdp_revision(&make(2, false)), Some(2));
        assert_eq!(rsdp_revision(&make(2, true)), Some(0));
        let mut bad = make(0, false);
        bad[3] = b'x';
        assert_eq!(rsdp_revision(&bad), None);
        assert_eq!(rsdp_revision(&make(0, false)[..19]), None);
    }

    #[test]
    fn finds_in_bios_area() {
        let r = make(0, false);
        assert_eq!(
            find_rsdp_in_bios_area(memory(&[(0xf5240, &r)])),
            Some(0xf5240)
        );
        // Unaligned copies do not count; neither do bad checksums.
        assert_eq!(find_rsdp_in_bios_area(memory(&[(0xf5248, &r)])), None);
        let mut bad = r;
        bad[8] ^= 1;
        assert_eq!(find_rsdp_in_bios_area(memory(&[(0xe0000, &bad)])), None);
        // The last slot of the area is still scanned.
        assert_eq!(
            find_rsdp_in_bios_area(memory(&[(0xfffd0, &r[..20])])),
            Some(0xfffd0)
        );
    }

    #[test]
    fn finds_in_ebda_first() {
        let r = make(2, false);
        let seg = (0x9fc00u32 >> 4) as u16;
        let mem = memory(&[(0x40e, &seg.to_le_bytes()), (0x9fc10, &r), (0xf0000, &r)]);
        assert_eq!(find_rsdp_in_bios_area(mem), Some(0x9fc10));
        // A bogus EBDA pointer is ignored rather than followed.
        let mem = memory(&[(0x40e, &[0xff, 0xff]), (0xf0000, &r)]);
        assert_eq!(find_rsdp_in_bios_area(mem), Some(0xf0000));
    }
}

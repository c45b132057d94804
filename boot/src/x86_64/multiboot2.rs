//! The Multiboot2 boot protocol (Multiboot2 specification 2.0; GRUB `multiboot2`, iPXE).
//!
//! The loader finds our header (see `entry`) in the first 32 KiB of the file, loads the ELF
//! segments, and enters `mb2_start32` in 32-bit protected mode with paging off, `eax` =
//! [`BOOTLOADER_MAGIC`] and `ebx` = physical address of the boot information structure (spec §3.3):
//!
//! ```text
//! u32 total_size, u32 reserved, then tags, each 8-byte aligned:
//!     u32 type, u32 size (header included, padding excluded), payload
//! type 0  end                        size 8
//! type 1  command line               NUL-terminated string
//! type 2  boot loader name           NUL-terminated string
//! type 3  module                     u32 mod_start, u32 mod_end, string
//! type 4  basic memory information   u32 mem_lower, u32 mem_upper (KiB, below 1 MiB / above 1 MiB)
//! type 6  memory map                 u32 entry_size, u32 entry_version, entries {u64 base, u64 length, u32 type, u32 reserved}
//! type 14 ACPI old RSDP              a copy of the ACPI 1.0 RSDP
//! type 15 ACPI new RSDP              a copy of the ACPI 2.0+ RSDP
//! type 17 EFI memory map             ignored: the type 6 map is derived from it by the loader
//! ```

use super::{
    BootNotes, CMDLINE_CAP, PhysMem, RSDP_V1_LEN, RSDP_V2_LEN, RsdpCopy, copy_cstr, e820_kind,
    le_u32, le_u64, push_region_checked, rsdp_revision,
};
use crate::{BootInfo, MemoryKind, Module};

/// Value of `eax` at the Multiboot2 entry (spec §3.3).
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
/// First word of the Multiboot2 header in the image (spec §3.1.1).
pub const HEADER_MAGIC: u32 = 0xe852_50d6;

/// Sanity bound on `total_size`: real structures are a few KiB (the EFI memory map is the largest
/// tag); anything bigger is corrupt, and clamping keeps the walk short.
const MAX_TOTAL_SIZE: usize = 1 << 20;

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_LOADER_NAME: u32 = 2;
const TAG_MODULE: u32 = 3;
const TAG_BASIC_MEMINFO: u32 = 4;
const TAG_MMAP: u32 = 6;
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;

/// Size of one memory-map entry as defined by entry_version 0.
const MMAP_ENTRY_MIN: usize = 24;

/// Fills `info` (memory map, command line, modules) and `notes` (loader name, RSDP copy) from the
/// boot information structure at `mbi_pa`. Malformed tags stop or skip the walk and are recorded.
pub fn parse(mbi_pa: u64, mem: &impl PhysMem, info: &mut BootInfo, notes: &mut BootNotes) {
    let Some(total) = le_u32(mem.read(mbi_pa, 8), 0) else {
        notes.record("Multiboot2 information unreadable", mbi_pa);
        return;
    };
    if !mbi_pa.is_multiple_of(8) {
        notes.record("Multiboot2 information not 8-byte aligned", mbi_pa);
    }
    notes.raw_version = total;
    let total = total as usize;
    if total < 8 {
        notes.record("Multiboot2 total_size too small", total as u64);
        return;
    }
    let wanted = if total > MAX_TOTAL_SIZE {
        notes.record("Multiboot2 total_size clamped", total as u64);
        MAX_TOTAL_SIZE
    } else {
        total
    };
    let mbi = mem.read(mbi_pa, wanted);
    if mbi.len() < wanted {
        notes.record(
            "Multiboot2 information extends past readable memory",
            wanted as u64,
        );
    }
    parse_tags(mbi, info, notes);
}

/// Walks the tags of a boot information structure already in memory (`mbi` starts at
/// `total_size`). Public for tests and for callers that already hold the bytes.
pub fn parse_tags(mbi: &[u8], info: &mut BootInfo, notes: &mut BootNotes) {
    let mut have_mmap = false;
    let mut meminfo = None;
    let mut off = 8usize;
    loop {
        let (Some(ty), Some(size)) = (le_u32(mbi, off), le_u32(mbi, off + 4)) else {
            notes.record("Multiboot2 tags end without an end tag", off as u64);
            break;
        };
        let size = size as usize;
        if size < 8 {
            notes.record("Multiboot2 tag size < 8; walk stopped", ty.into());
            break;
        }
        let Some(tag) = off.checked_add(size).and_then(|end| mbi.get(off..end)) else {
            notes.record(
                "Multiboot2 tag runs past total_size; walk stopped",
                ty.into(),
            );
            break;
        };
        let payload = &tag[8..];
        match ty {
            TAG_END => break,
            TAG_CMDLINE => {
                info.cmdline = copy_cstr::<CMDLINE_CAP>(payload, notes, "command line truncated");
            }
            TAG_LOADER_NAME => {
                notes.loader_name = copy_cstr(payload, notes, "boot loader name truncated")
            }
            TAG_MODULE => parse_module(payload, info, notes),
            TAG_BASIC_MEMINFO => match (le_u32(payload, 0), le_u32(payload, 4)) {
                (Some(lower), Some(upper)) => meminfo = Some((lower, upper)),
                _ => notes.record("Multiboot2 basic meminfo tag too short", size as u64),
            },
            TAG_MMAP => have_mmap |= parse_mmap(payload, info, notes),
            TAG_ACPI_OLD | TAG_ACPI_NEW => parse_rsdp(ty, payload, notes),
            _ => {}
        }
        // Tags are padded to 8 bytes (spec §3.6.1).
        match off.checked_add(size.next_multiple_of(8)) {
            Some(next) => off = next,
            None => break,
        }
    }
    if !have_mmap {
        // Only the legacy summary: RAM below 640 KiB and the contiguous block above 1 MiB.
        match meminfo {
            Some((lower, upper)) => {
                notes.record("no Multiboot2 memory map; using basic meminfo", 0);
                let (lower, upper) = (u64::from(lower) * 1024, u64::from(upper) * 1024);
                push_region_checked(info, notes, 0, lower.min(0xa0000), MemoryKind::Usable);
                push_region_checked(info, notes, 0x100000, upper, MemoryKind::Usable);
            }
            None => notes.record("no Multiboot2 memory information at all", 0),
        }
    }
}

/// Returns whether a usable map was found.
fn parse_mmap(payload: &[u8], info: &mut BootInfo, notes: &mut BootNotes) -> bool {
    let (Some(entry_size), Some(_version)) = (le_u32(payload, 0), le_u32(payload, 4)) else {
        notes.record("Multiboot2 memory map tag too short", payload.len() as u64);
        return false;
    };
    let entry_size = entry_size as usize;
    if entry_size < MMAP_ENTRY_MIN {
        // Includes 0, which would otherwise never advance.
        notes.record(
            "Multiboot2 memory map entry_size too small; tag ignored",
            entry_size as u64,
        );
        return false;
    }
    let entries = &payload[8..];
    if !entries.len().is_multiple_of(entry_size) {
        notes.record(
            "Multiboot2 memory map has a partial trailing entry",
            entries.len() as u64,
        );
    }
    // Larger entry sizes are allowed for future versions; the first 24 bytes keep their meaning.
    for entry in entries.chunks_exact(entry_size) {
        let (Some(base), Some(len), Some(ty)) =
            (le_u64(entry, 0), le_u64(entry, 8), le_u32(entry, 16))
        else {
            continue;
        };
        push_region_checked(info, notes, base, len, e820_kind(ty));
    }
    true
}

fn parse_module(payload: &[u8], info: &mut BootInfo, notes: &mut BootNotes) {
    let (Some(start), Some(end)) = (le_u32(payload, 0), le_u32(payload, 4)) else {
        notes.record("Multiboot2 module tag too short", payload.len() as u64);
        return;
    };
    if end <= start {
        notes.record(
            "Multiboot2 module with mod_end <= mod_start skipped",
            start.into(),
        );
        return;
    }
    let cmdline = copy_cstr(&payload[8..], notes, "module command line truncated");
    let module = Module {
        start: start.into(),
        len: u64::from(end - start),
        cmdline,
    };
    if !info.push_module(module) {
        notes.record("boot module table full; module dropped", start.into());
    }
}

fn parse_rsdp(ty: u32, payload: &[u8], notes: &mut BootNotes) {
    let len = if ty == TAG_ACPI_NEW {
        RSDP_V2_LEN
    } else {
        RSDP_V1_LEN
    };
    let Some(bytes) = payload.get(..len) else {
        notes.record("Multiboot2 ACPI RSDP tag too short", ty.into());
        return;
    };
    if rsdp_revision(bytes).is_none() {
        notes.record("Multiboot2 ACPI RSDP copy invalid", ty.into());
        return;
    }
    // The new (ACPI 2.0+) RSDP wins over the old one whatever the tag order.
    if ty == TAG_ACPI_OLD && notes.rsdp_copy.is_some_and(|c| c.len == RSDP_V2_LEN) {
        return;
    }
    let mut copy = RsdpCopy {
        bytes: [0; RSDP_V2_LEN],
        len,
    };
    copy.bytes[..len].copy_from_slice(bytes);
    notes.rsdp_copy = Some(copy);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::super::fake::FakeMem;
    use super::*;
    use crate::{BootProtocol, MemoryRegion};
    use std::vec::Vec;

    /// Builds an information structure from (type, payload) tags; an end tag is appended unless
    /// `end` is false.
    fn mbi(tags: &[(u32, Vec<u8>)], end: bool) -> Vec<u8> {
        let mut out = std::vec![0u8; 8];
        let mut tags = tags.to_vec();
        if end {
            tags.push((TAG_END, Vec::new()));
        }
        for (ty, payload) in tags {
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&payload);
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
        }
        let total = out.len() as u32;
        out[..4].copy_from_slice(&total.to_le_bytes());
        out
    }

    fn mmap(entry_size: u32, entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&entry_size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for &(b, l, t) in entries {
            let mut e = Vec::new();
            e.extend_from_slice(&b.to_le_bytes());
            e.extend_from_slice(&l.to_le_bytes());
            e.extend_from_slice(&t.to_le_bytes());
            e.resize(entry_size.max(20) as usize, 0);
            p.extend_from_slice(&e);
        }
        p
    }

    fn module(start: u32, end: u32, s: &str) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&start.to_le_bytes());
        p.extend_from_slice(&end.to_le_bytes());
        p.extend_from_slice(s.as_bytes());
        p.push(0);
        p
    }

    fn rsdp(rev: u8) -> Vec<u8> {
        let mut r = std::vec![0u8; if rev >= 2 { 36 } else { 20 }];
        r[..8].copy_from_slice(b"RSD PTR ");
        r[15] = rev;
        let sum = r[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        r[8] = 0u8.wrapping_sub(sum);
        if rev >= 2 {
            r[20..24].copy_from_slice(&36u32.to_le_bytes());
            let sum = r.iter().fold(0u8, |a, &b| a.wrapping_add(b));
            r[32] = 0u8.wrapping_sub(sum);
        }
        r
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn run_at(pa: u64, bytes: &[u8]) -> (BootInfo, BootNotes) {
        let mut mem = FakeMem::default();
        mem.put(pa, bytes);
        let mut info = BootInfo::new(BootProtocol::Multiboot2);
        let mut notes = BootNotes::new();
        parse(pa, &mem, &mut info, &mut notes);
        (info, notes)
    }

    fn run(bytes: &[u8]) -> (BootInfo, BootNotes) {
        run_at(0x10000, bytes)
    }

    #[test]
    fn grub_like_information() {
        let bytes = mbi(
            &[
                (TAG_CMDLINE, cstr("scenario=boot-report exit=qemu")),
                (TAG_LOADER_NAME, cstr("GRUB 2.06")),
                (
                    TAG_MODULE,
                    module(0x20_0000, 0x20_1000, "guest.bin root=/dev/vda"),
                ),
                (
                    TAG_BASIC_MEMINFO,
                    [639u32.to_le_bytes(), 261_120u32.to_le_bytes()].concat(),
                ),
                (5, std::vec![0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), // boot device: ignored
                (
                    TAG_MMAP,
                    mmap(
                        24,
                        &[
                            (0, 0x9fc00, 1),
                            (0x9fc00, 0x400, 2),
                            (0x100000, 0xfee_0000, 1),
                            (0xfee_0000, 0x20000, 3),
                        ],
                    ),
                ),
                (TAG_ACPI_OLD, rsdp(0)),
                (17, std::vec![0; 40]),
            ],
            true,
        );
        let (info, notes) = run(&bytes);
        assert!(notes.issues().is_empty(), "{:?}", notes.issues());
        assert_eq!(info.cmdline_value("scenario"), Some("boot-report"));
        assert_eq!(notes.loader_name.as_str(), "GRUB 2.06");
        assert_eq!(info.modules().len(), 1);
        assert_eq!(info.modules()[0].len, 0x1000);
        assert_eq!(
            info.modules()[0].cmdline.as_str(),
            "guest.bin root=/dev/vda"
        );
        assert_eq!(info.memory_regions().len(), 4);
        assert_eq!(info.memory_regions()[3].kind, MemoryKind::AcpiReclaimable);
        assert_eq!(notes.rsdp_copy.map(|c| c.len), Some(20));
        assert_eq!(info.rsdp, None, "the entry places the copy, not the parser");
    }

    #[test]
    fn new_rsdp_wins_in_either_order() {
        for tags in [
            [(TAG_ACPI_NEW, rsdp(2)), (TAG_ACPI_OLD, rsdp(0))],
            [(TAG_ACPI_OLD, rsdp(0)), (TAG_ACPI_NEW, rsdp(2))],
        ] {
            let (_, notes) = run(&mbi(&tags, true));
            assert_eq!(notes.rsdp_copy.map(|c| c.len), Some(36));
        }
        let mut bad = rsdp(0);
        bad[8] ^= 0xff;
        let (_, notes) = run(&mbi(
            &[(TAG_ACPI_OLD, bad), (TAG_ACPI_NEW, std::vec![0; 4])],
            true,
        ));
        assert!(notes.has("Multiboot2 ACPI RSDP copy invalid"));
        assert!(notes.has("Multiboot2 ACPI RSDP tag too short"));
        assert!(notes.rsdp_copy.is_none());
    }

    #[test]
    fn larger_entry_size_is_stepped_over() {
        let (info, notes) = run(&mbi(
            &[(TAG_MMAP, mmap(32, &[(0, 0x1000, 1), (0x2000, 0x1000, 2)]))],
            true,
        ));
        assert!(notes.issues().is_empty());
        assert_eq!(
            info.memory_regions(),
            &[
                MemoryRegion {
                    start: 0,
                    len: 0x1000,
                    kind: MemoryKind::Usable
                },
                MemoryRegion {
                    start: 0x2000,
                    len: 0x1000,
                    kind: MemoryKind::Reserved
                },
            ]
        );
    }

    #[test]
    fn entry_size_zero_or_small_is_ignored_and_falls_back_to_meminfo() {
        for es in [0u32, 16] {
            let mut tag = mmap(24, &[(0, 0x1000, 1)]);
            tag[..4].copy_from_slice(&es.to_le_bytes());
            let meminfo = [640u32.to_le_bytes(), 1024u32.to_le_bytes()].concat();
            let (info, notes) = run(&mbi(&[(TAG_MMAP, tag), (TAG_BASIC_MEMINFO, meminfo)], true));
            assert!(notes.has("Multiboot2 memory map entry_size too small; tag ignored"));
            assert!(notes.has("no Multiboot2 memory map; using basic meminfo"));
            assert_eq!(
                info.memory_regions(),
                &[
                    MemoryRegion {
                        start: 0,
                        len: 0xa0000,
                        kind: MemoryKind::Usable
                    },
                    MemoryRegion {
                        start: 0x100000,
                        len: 0x100000,
                        kind: MemoryKind::Usable
                    },
                ]
            );
        }
    }

    #[test]
    fn tag_size_below_8_stops_the_walk() {
        let mut bytes = mbi(
            &[(TAG_CMDLINE, cstr("a=1")), (TAG_LOADER_NAME, cstr("x"))],
            true,
        );
        // Second tag starts at 8 + 16 = 24; corrupt its size.
        bytes[28..32].copy_from_slice(&4u32.to_le_bytes());
        let (info, notes) = run(&bytes);
        assert_eq!(info.cmdline.as_str(), "a=1");
        assert!(notes.has("Multiboot2 tag size < 8; walk stopped"));
        assert_eq!(notes.loader_name.as_str(), "");
    }

    #[test]
    fn tag_past_end_and_missing_end_tag() {
        let mut bytes = mbi(
            &[(TAG_CMDLINE, cstr("a=1")), (TAG_LOADER_NAME, cstr("x"))],
            true,
        );
        bytes[28..32].copy_from_slice(&4000u32.to_le_bytes());
        let (_, notes) = run(&bytes);
        assert!(notes.has("Multiboot2 tag runs past total_size; walk stopped"));

        let (info, notes) = run(&mbi(&[(TAG_CMDLINE, cstr("a=1"))], false));
        assert_eq!(info.cmdline.as_str(), "a=1");
        assert!(notes.has("Multiboot2 tags end without an end tag"));
        assert!(notes.has("no Multiboot2 memory information at all"));
    }

    #[test]
    fn truncated_and_oversized_total_size() {
        // total_size says 4 KiB, but only the first 32 bytes are readable.
        let mut bytes = mbi(&[(TAG_CMDLINE, cstr("hello"))], true);
        bytes[..4].copy_from_slice(&4096u32.to_le_bytes());
        let (info, notes) = run(&bytes);
        assert!(notes.has("Multiboot2 information extends past readable memory"));
        assert_eq!(info.cmdline.as_str(), "hello");

        let mut bytes = mbi(&[], true);
        bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let (_, notes) = run(&bytes);
        assert!(notes.has("Multiboot2 total_size clamped"));

        let (_, notes) = run(&[4, 0, 0, 0, 0, 0, 0, 0]);
        assert!(notes.has("Multiboot2 total_size too small"));
        let (_, notes) = run(&[]);
        assert!(notes.has("Multiboot2 information unreadable"));
        let (_, notes) = run_at(0x10004, &mbi(&[], true));
        assert!(notes.has("Multiboot2 information not 8-byte aligned"));
    }

    #[test]
    fn bad_modules_and_partial_mmap() {
        let mut mm = mmap(24, &[(0, 0x1000, 1)]);
        mm.extend_from_slice(&[0; 10]);
        let (info, notes) = run(&mbi(
            &[
                (TAG_MODULE, module(0x2000, 0x1000, "")),
                (TAG_MODULE, std::vec![1, 2]),
                (TAG_MMAP, mm),
            ],
            true,
        ));
        assert!(notes.has("Multiboot2 module with mod_end <= mod_start skipped"));
        assert!(notes.has("Multiboot2 module tag too short"));
        assert!(notes.has("Multiboot2 memory map has a partial trailing entry"));
        assert!(info.modules().is_empty());
        assert_eq!(info.memory_regions().len(), 1);
    }

    #[test]
    fn every_truncation_of_a_valid_structure_is_harmless() {
        let full = mbi(
            &[
                (TAG_CMDLINE, cstr("a=1")),
                (TAG_MODULE, module(0x20_0000, 0x20_1000, "m")),
                (
                    TAG_MMAP,
                    mmap(24, &[(0, 0x9fc00, 1), (0x100000, 0x100000, 1)]),
                ),
                (TAG_ACPI_NEW, rsdp(2)),
            ],
            true,
        );
        for cut in 0..full.len() {
            let _ = run(&full[..cut]);
        }
        // And every single-byte corruption.
        for i in 0..full.len() {
            let mut b = full.clone();
            b[i] ^= 0xa5;
            let _ = run(&b);
        }
    }
}

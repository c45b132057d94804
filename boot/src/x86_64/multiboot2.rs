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
//! type 8  framebuffer info           u64 addr, u32 pitch, u32 width, u32 height, u8 bpp, u8 type, ...
//! type 11 EFI 32-bit system table    u32 pointer (a 32-bit firmware: not usable by a 64-bit kernel)
//! type 12 EFI 64-bit system table    u64 pointer
//! type 14 ACPI old RSDP              a copy of the ACPI 1.0 RSDP
//! type 15 ACPI new RSDP              a copy of the ACPI 2.0+ RSDP
//! type 17 EFI memory map             u32 descriptor_size, u32 descriptor_version, EFI_MEMORY_DESCRIPTORs
//! type 18 EFI boot services not terminated (only when the header asks for it: we do not)
//! ```
//!
//! Under UEFI, GRUB (without header tags 7 and 9, see docs/boot-x86_64.md) calls ExitBootServices
//! and enters us exactly as under BIOS, adding tags 12, 17 and usually 8 (the GOP framebuffer). The
//! type 6 map is GRUB's translation of the EFI map and is preferred; the EFI map is the fallback
//! for loaders that only pass tag 17. The firmware's own RSDP is found through the system table's
//! configuration table (UEFI 2.10 §4.6), so the hypervisor need not rely on GRUB's copy.

use super::{
    BootNotes, CMDLINE_CAP, PhysMem, RSDP_V1_LEN, RSDP_V2_LEN, RsdpCopy, copy_cstr, e820_kind,
    le_u32, le_u64, push_region_checked, rsdp_revision,
};
use crate::{BootInfo, Framebuffer, MemoryKind, Module};

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
const TAG_FRAMEBUFFER: u32 = 8;
const TAG_EFI32_SYSTEM_TABLE: u32 = 11;
const TAG_EFI64_SYSTEM_TABLE: u32 = 12;
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;
const TAG_EFI_MMAP: u32 = 17;
const TAG_EFI_BS_NOT_TERMINATED: u32 = 18;

/// Size of EFI_MEMORY_DESCRIPTOR version 1 (UEFI 2.10 §7.2, GetMemoryMap()): u32 Type, 4 bytes of
/// padding, u64 PhysicalStart, u64 VirtualStart, u64 NumberOfPages, u64 Attribute. Firmware may
/// report a larger descriptor_size; the extra bytes are skipped.
const EFI_DESCRIPTOR_MIN: usize = 40;
/// EFI pages are always 4 KiB (UEFI 2.10 §7.2, EFI_PAGE_SIZE).
const EFI_PAGE_SIZE: u64 = 4096;
/// EFI_MEMORY_SP: "specific purpose" memory that the OS should not allocate from by default.
const EFI_MEMORY_SP: u64 = 1 << 18;

/// "IBI SYST" (UEFI 2.10 §4.3, EFI_SYSTEM_TABLE_SIGNATURE).
pub const EFI_SYSTEM_TABLE_SIGNATURE: u64 = 0x5453_5953_2049_4249;
/// Offsets in EFI_SYSTEM_TABLE on a 64-bit firmware (UEFI 2.10 §4.3): after the 24-byte header,
/// nine pointer-sized fields and a padded u32 put NumberOfTableEntries at 104 and
/// ConfigurationTable at 112.
const EFI_ST_TABLE_COUNT: usize = 104;
const EFI_ST_TABLE_PTR: usize = 112;
const EFI_ST_LEN: usize = 120;
/// One EFI_CONFIGURATION_TABLE entry: EFI_GUID (16 bytes) + VOID* (8).
const EFI_CONFIG_ENTRY_LEN: usize = 24;
/// Sanity bound on NumberOfTableEntries: firmware has a dozen or two.
const EFI_MAX_CONFIG_ENTRIES: u64 = 1024;

/// EFI_ACPI_20_TABLE_GUID 8868e871-e4f1-11d3-bc22-0080c73c8881 and ACPI_TABLE_GUID
/// eb9d2d30-2d88-11d3-9a16-0090273fc14d (UEFI 2.10 §4.6.1), in their in-memory byte order (the
/// first three fields are little-endian).
pub const EFI_ACPI_20_GUID: [u8; 16] = [
    0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11, 0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81,
];
pub const EFI_ACPI_10_GUID: [u8; 16] = [
    0x30, 0x2d, 0x9d, 0xeb, 0x88, 0x2d, 0xd3, 0x11, 0x9a, 0x16, 0x00, 0x90, 0x27, 0x3f, 0xc1, 0x4d,
];

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
    if let Some(st) = info.efi_system_table
        && info.rsdp.is_none()
    {
        // The firmware's RSDP, where the OS is meant to find it on UEFI machines (ACPI 6.5
        // §5.2.5.2). `choose_rsdp` validates it again and falls back to the tag copy.
        info.rsdp = rsdp_from_efi_system_table(st, mem, notes);
    }
}

/// Finds the ACPI RSDP through a 64-bit EFI system table: its configuration table lists
/// (GUID, pointer) pairs, the ACPI 2.0 entry preferred over the 1.0 one (UEFI 2.10 §4.6.1).
/// Returns `None`, with a note, on a bad signature, an absurd entry count, or no ACPI entry.
/// The pointer returned is not yet checked to hold an RSDP (the caller does that).
pub fn rsdp_from_efi_system_table(
    st: u64,
    mem: &impl PhysMem,
    notes: &mut BootNotes,
) -> Option<u64> {
    let table = mem.read(st, EFI_ST_LEN);
    if table.len() < EFI_ST_LEN || le_u64(table, 0) != Some(EFI_SYSTEM_TABLE_SIGNATURE) {
        notes.record("EFI system table unreadable or bad signature", st);
        return None;
    }
    let count = le_u64(table, EFI_ST_TABLE_COUNT)?;
    let ptr = le_u64(table, EFI_ST_TABLE_PTR)?;
    if count > EFI_MAX_CONFIG_ENTRIES {
        notes.record("EFI configuration table entry count absurd; ignored", count);
        return None;
    }
    let len = count as usize * EFI_CONFIG_ENTRY_LEN;
    let entries = mem.read(ptr, len);
    if entries.len() < len {
        notes.record("EFI configuration table unreadable", ptr);
    }
    let mut acpi10 = None;
    for entry in entries.chunks_exact(EFI_CONFIG_ENTRY_LEN) {
        let (guid, vendor) = (&entry[..16], le_u64(entry, 16));
        if guid == EFI_ACPI_20_GUID {
            return vendor;
        }
        if guid == EFI_ACPI_10_GUID {
            acpi10 = vendor;
        }
    }
    if acpi10.is_none() {
        notes.record("EFI configuration table has no ACPI entry", count);
    }
    acpi10
}

/// Walks the tags of a boot information structure already in memory (`mbi` starts at
/// `total_size`). Public for tests and for callers that already hold the bytes.
pub fn parse_tags(mbi: &[u8], info: &mut BootInfo, notes: &mut BootNotes) {
    let mut have_mmap = false;
    let mut efi_mmap = None;
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
            TAG_FRAMEBUFFER => parse_framebuffer(payload, info, notes),
            TAG_EFI64_SYSTEM_TABLE => match le_u64(payload, 0) {
                Some(st) if st != 0 => info.efi_system_table = Some(st),
                _ => notes.record("Multiboot2 EFI64 system table tag invalid", size as u64),
            },
            TAG_EFI32_SYSTEM_TABLE => {
                notes.record("32-bit EFI firmware: system table not usable", size as u64)
            }
            TAG_EFI_MMAP => efi_mmap = Some(payload),
            TAG_EFI_BS_NOT_TERMINATED => notes.record(
                "EFI boot services still running (header does not ask for it)",
                0,
            ),
            _ => {}
        }
        // Tags are padded to 8 bytes (spec §3.6.1).
        match off.checked_add(size.next_multiple_of(8)) {
            Some(next) => off = next,
            None => break,
        }
    }
    if !have_mmap && let Some(payload) = efi_mmap {
        have_mmap = parse_efi_mmap(payload, info, notes);
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

/// Maps an EFI memory type (UEFI 2.10 §7.2, EFI_MEMORY_TYPE) to what it means once boot services
/// have been exited: loader and boot-services memory is free RAM again; runtime-services memory
/// stays reserved because the firmware's runtime services and tables (the system table, the
/// configuration table we just read) live there.
pub fn efi_kind(ty: u32, attribute: u64) -> MemoryKind {
    match ty {
        // EfiLoaderCode, EfiLoaderData, EfiBootServicesCode, EfiBootServicesData,
        // EfiConventionalMemory (unless marked specific-purpose).
        1..=4 => MemoryKind::Usable,
        7 if attribute & EFI_MEMORY_SP == 0 => MemoryKind::Usable,
        8 => MemoryKind::Defective,
        9 => MemoryKind::AcpiReclaimable,
        10 => MemoryKind::AcpiNvs,
        // Reserved, runtime code/data, MMIO, port space, PAL code, persistent, unaccepted, OEM.
        _ => MemoryKind::Reserved,
    }
}

/// Returns whether a usable map was found.
fn parse_efi_mmap(payload: &[u8], info: &mut BootInfo, notes: &mut BootNotes) -> bool {
    let (Some(desc_size), Some(version)) = (le_u32(payload, 0), le_u32(payload, 4)) else {
        notes.record(
            "Multiboot2 EFI memory map tag too short",
            payload.len() as u64,
        );
        return false;
    };
    let desc_size = desc_size as usize;
    if desc_size < EFI_DESCRIPTOR_MIN {
        notes.record(
            "EFI memory map descriptor_size too small; tag ignored",
            desc_size as u64,
        );
        return false;
    }
    if version != 1 {
        // Only version 1 has ever been defined; the layout of the first 40 bytes is kept anyway.
        notes.record("EFI memory map descriptor_version is not 1", version.into());
    }
    let descs = &payload[8..];
    if !descs.len().is_multiple_of(desc_size) {
        notes.record(
            "EFI memory map has a partial trailing descriptor",
            descs.len() as u64,
        );
    }
    for d in descs.chunks_exact(desc_size) {
        let (Some(ty), Some(start), Some(pages), Some(attr)) =
            (le_u32(d, 0), le_u64(d, 8), le_u64(d, 24), le_u64(d, 32))
        else {
            continue;
        };
        // An overflowing page count saturates and is clamped at 2^52 by push_region_checked.
        let len = pages.saturating_mul(EFI_PAGE_SIZE);
        push_region_checked(info, notes, start, len, efi_kind(ty, attr));
    }
    true
}

fn parse_framebuffer(payload: &[u8], info: &mut BootInfo, notes: &mut BootNotes) {
    let (Some(addr), Some(pitch), Some(width), Some(height), Some(&bpp), Some(&kind)) = (
        le_u64(payload, 0),
        le_u32(payload, 8),
        le_u32(payload, 12),
        le_u32(payload, 16),
        payload.get(20),
        payload.get(21),
    ) else {
        notes.record("Multiboot2 framebuffer tag too short", payload.len() as u64);
        return;
    };
    if addr == 0 || kind > 2 {
        notes.record("Multiboot2 framebuffer tag invalid; ignored", addr);
        return;
    }
    info.framebuffer = Some(Framebuffer {
        addr,
        pitch,
        width,
        height,
        bpp,
        kind,
    });
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

    /// An EFI_MEMORY_DESCRIPTOR as OVMF lays it out (UEFI 2.10 §7.2), padded to `size` bytes.
    fn efi_desc(size: usize, ty: u32, start: u64, pages: u64, attr: u64) -> Vec<u8> {
        let mut d = std::vec![0u8; size];
        d[0..4].copy_from_slice(&ty.to_le_bytes());
        d[8..16].copy_from_slice(&start.to_le_bytes());
        d[16..24].copy_from_slice(&0xdead_0000u64.to_le_bytes()); // VirtualStart: unused
        d[24..32].copy_from_slice(&pages.to_le_bytes());
        d[32..40].copy_from_slice(&attr.to_le_bytes());
        d
    }

    fn efi_mmap(size: u32, version: u32, descs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&version.to_le_bytes());
        for d in descs {
            p.extend_from_slice(d);
        }
        p
    }

    #[test]
    fn efi_memory_map_is_used_when_no_e820_style_map() {
        // OVMF reports 48-byte descriptors (8 bytes beyond version 1's 40).
        let d = |ty, start, pages, attr| efi_desc(48, ty, start, pages, attr);
        let tag = efi_mmap(
            48,
            1,
            &[
                d(7, 0, 0xa0, 0xf),                 // conventional
                d(3, 0x10_0000, 0x100, 0xf),        // boot services code: free after EBS
                d(2, 0x20_0000, 0x10, 0xf),         // loader data (GRUB): free
                d(6, 0x7f00_0000, 0x20, 1 << 63),   // runtime data: keep out
                d(9, 0x7fb0_0000, 0x10, 0xf),       // ACPI reclaim
                d(10, 0x7fc0_0000, 0x4, 0xf),       // ACPI NVS
                d(11, 0xffc0_0000, 0x400, 1 << 63), // MMIO (flash)
                d(7, 0x1_0000_0000, 0x100, 0xf | EFI_MEMORY_SP),
                d(8, 0x3000_0000, 1, 0), // unusable
            ],
        );
        let (info, notes) = run(&mbi(&[(TAG_EFI_MMAP, tag)], true));
        assert!(notes.issues().is_empty(), "{:?}", notes.issues());
        let r = info.memory_regions();
        let kinds: Vec<_> = r.iter().map(|r| (r.start, r.len, r.kind)).collect();
        assert_eq!(
            kinds,
            std::vec![
                (0, 0xa0000, MemoryKind::Usable),
                (0x10_0000, 0x10_0000, MemoryKind::Usable),
                (0x20_0000, 0x1_0000, MemoryKind::Usable),
                (0x7f00_0000, 0x2_0000, MemoryKind::Reserved),
                (0x7fb0_0000, 0x1_0000, MemoryKind::AcpiReclaimable),
                (0x7fc0_0000, 0x4000, MemoryKind::AcpiNvs),
                (0xffc0_0000, 0x40_0000, MemoryKind::Reserved),
                (0x1_0000_0000, 0x10_0000, MemoryKind::Reserved),
                (0x3000_0000, 0x1000, MemoryKind::Defective),
            ]
        );
    }

    #[test]
    fn e820_style_map_wins_over_efi_map_in_either_order() {
        let e820 = mmap(24, &[(0, 0x9fc00, 1)]);
        let efi = efi_mmap(40, 1, &[efi_desc(40, 7, 0x5000_0000, 1, 0)]);
        for tags in [
            [(TAG_EFI_MMAP, efi.clone()), (TAG_MMAP, e820.clone())],
            [(TAG_MMAP, e820.clone()), (TAG_EFI_MMAP, efi.clone())],
        ] {
            let (info, _) = run(&mbi(&tags, true));
            assert_eq!(info.memory_regions().len(), 1);
            assert_eq!(info.memory_regions()[0].len, 0x9fc00);
        }
    }

    #[test]
    fn bad_efi_memory_maps() {
        // Descriptor size below version 1's 40 bytes (0 would never advance): ignored.
        for size in [0u32, 24, 39] {
            let tag = efi_mmap(size, 1, &[std::vec![7; 80]]);
            let (info, notes) = run(&mbi(&[(TAG_EFI_MMAP, tag)], true));
            assert!(notes.has("EFI memory map descriptor_size too small; tag ignored"));
            assert!(notes.has("no Multiboot2 memory information at all"));
            assert!(info.memory_regions().is_empty());
        }
        // Unknown version, trailing garbage, a page count that overflows, a start past 2^52.
        let mut tag = efi_mmap(
            40,
            2,
            &[
                efi_desc(40, 7, 0x1000, u64::MAX, 0),
                efi_desc(40, 7, 1 << 60, 1, 0),
            ],
        );
        tag.extend_from_slice(&[1, 2, 3]);
        let (info, notes) = run(&mbi(&[(TAG_EFI_MMAP, tag)], true));
        assert!(notes.has("EFI memory map descriptor_version is not 1"));
        assert!(notes.has("EFI memory map has a partial trailing descriptor"));
        assert!(notes.has("memory range clamped at 2^52"));
        assert!(notes.has("memory range beyond 2^52 skipped"));
        assert_eq!(info.memory_regions().len(), 1);
        assert_eq!(info.memory_regions()[0].end(), super::super::MAX_PHYS_ADDR);
        let (_, notes) = run(&mbi(&[(TAG_EFI_MMAP, std::vec![1, 2])], true));
        assert!(notes.has("Multiboot2 EFI memory map tag too short"));
    }

    /// A 64-bit EFI_SYSTEM_TABLE at `st` whose configuration table at `ct` holds `entries`.
    fn efi_system(st: u64, ct: u64, entries: &[([u8; 16], u64)], count: u64) -> FakeMem {
        let mut table = std::vec![0u8; EFI_ST_LEN];
        table[..8].copy_from_slice(&EFI_SYSTEM_TABLE_SIGNATURE.to_le_bytes());
        table[8..12].copy_from_slice(&0x0002_0046u32.to_le_bytes()); // revision 2.70
        table[12..16].copy_from_slice(&120u32.to_le_bytes());
        table[104..112].copy_from_slice(&count.to_le_bytes());
        table[112..120].copy_from_slice(&ct.to_le_bytes());
        let mut config = Vec::new();
        for (guid, ptr) in entries {
            config.extend_from_slice(guid);
            config.extend_from_slice(&ptr.to_le_bytes());
        }
        let mut mem = FakeMem::default();
        mem.put(st, &table);
        mem.put(ct, &config);
        mem
    }

    /// Another configuration-table GUID (the SMBIOS 3 one), which must be skipped.
    const SMBIOS3_GUID: [u8; 16] = [
        0x44, 0x15, 0xfd, 0xf2, 0x94, 0x97, 0x2c, 0x4a, 0x99, 0x2e, 0xe5, 0xbb, 0xcf, 0x20, 0xe3,
        0x94,
    ];

    #[test]
    fn efi_system_table_leads_to_the_firmware_rsdp() {
        let (st, ct) = (0x7fe0_0000, 0x7fe0_1000);
        let entries = [
            (SMBIOS3_GUID, 0x7f00_0000),
            (EFI_ACPI_10_GUID, 0x7fb7_e000),
            (EFI_ACPI_20_GUID, 0x7fb7_e014),
        ];
        let mem = efi_system(st, ct, &entries, 3);
        let mut notes = BootNotes::new();
        assert_eq!(
            rsdp_from_efi_system_table(st, &mem, &mut notes),
            Some(0x7fb7_e014)
        );
        assert!(notes.issues().is_empty());

        // Only ACPI 1.0: used. Count says 2: the third entry is not looked at.
        let mem = efi_system(st, ct, &entries, 2);
        assert_eq!(
            rsdp_from_efi_system_table(st, &mem, &mut notes),
            Some(0x7fb7_e000)
        );

        // Through the whole parse: tag 12 carries the pointer, info.rsdp is set from it.
        let mut mem = efi_system(st, ct, &entries, 3);
        let bytes = mbi(&[(TAG_EFI64_SYSTEM_TABLE, st.to_le_bytes().to_vec())], true);
        mem.put(0x10000, &bytes);
        let mut info = BootInfo::new(BootProtocol::Multiboot2);
        let mut notes = BootNotes::new();
        parse(0x10000, &mem, &mut info, &mut notes);
        assert_eq!(info.efi_system_table, Some(st));
        assert_eq!(info.rsdp, Some(0x7fb7_e014));
    }

    #[test]
    fn bad_efi_system_tables() {
        let (st, ct) = (0x7fe0_0000, 0x7fe0_1000);
        let mut notes = BootNotes::new();
        let mem = efi_system(st, ct, &[(SMBIOS3_GUID, 1)], 1);
        assert_eq!(rsdp_from_efi_system_table(st, &mem, &mut notes), None);
        assert!(notes.has("EFI configuration table has no ACPI entry"));

        let mem = efi_system(st, ct, &[(EFI_ACPI_20_GUID, 1)], u64::MAX);
        assert_eq!(rsdp_from_efi_system_table(st, &mem, &mut notes), None);
        assert!(notes.has("EFI configuration table entry count absurd; ignored"));

        // Count larger than what is readable: the readable entries are still searched.
        let mem = efi_system(st, ct, &[(EFI_ACPI_20_GUID, 0x1234)], 9);
        assert_eq!(
            rsdp_from_efi_system_table(st, &mem, &mut notes),
            Some(0x1234)
        );
        assert!(notes.has("EFI configuration table unreadable"));

        let mut mem = efi_system(st, ct, &[(EFI_ACPI_20_GUID, 1)], 1);
        mem.blocks[0].1[0] ^= 1;
        assert_eq!(rsdp_from_efi_system_table(st, &mem, &mut notes), None);
        assert!(notes.has("EFI system table unreadable or bad signature"));
        assert_eq!(
            rsdp_from_efi_system_table(0x1000, &FakeMem::default(), &mut notes),
            None
        );

        let (info, notes) = run(&mbi(
            &[
                (TAG_EFI64_SYSTEM_TABLE, std::vec![0; 8]),
                (TAG_EFI32_SYSTEM_TABLE, std::vec![0, 0, 1, 0]),
                (TAG_EFI_BS_NOT_TERMINATED, Vec::new()),
            ],
            true,
        ));
        assert_eq!(info.efi_system_table, None);
        assert!(notes.has("Multiboot2 EFI64 system table tag invalid"));
        assert!(notes.has("32-bit EFI firmware: system table not usable"));
        assert!(notes.has("EFI boot services still running (header does not ask for it)"));
    }

    fn framebuffer(addr: u64, kind: u8) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&addr.to_le_bytes());
        p.extend_from_slice(&4096u32.to_le_bytes()); // pitch
        p.extend_from_slice(&1024u32.to_le_bytes());
        p.extend_from_slice(&768u32.to_le_bytes());
        p.extend_from_slice(&[32, kind, 0, 0]);
        p.extend_from_slice(&[16, 8, 8, 8, 0, 8, 24, 8]); // direct RGB colour info
        p
    }

    #[test]
    fn framebuffer_tag() {
        let (info, notes) = run(&mbi(
            &[(TAG_FRAMEBUFFER, framebuffer(0x8000_0000, 1))],
            true,
        ));
        assert!(!notes.has("Multiboot2 framebuffer tag too short"));
        assert_eq!(
            info.framebuffer,
            Some(Framebuffer {
                addr: 0x8000_0000,
                pitch: 4096,
                width: 1024,
                height: 768,
                bpp: 32,
                kind: 1
            })
        );
        for bad in [framebuffer(0, 1), framebuffer(0x8000_0000, 3)] {
            let (info, notes) = run(&mbi(&[(TAG_FRAMEBUFFER, bad)], true));
            assert!(notes.has("Multiboot2 framebuffer tag invalid; ignored"));
            assert_eq!(info.framebuffer, None);
        }
        let (_, notes) = run(&mbi(&[(TAG_FRAMEBUFFER, std::vec![0; 21])], true));
        assert!(notes.has("Multiboot2 framebuffer tag too short"));
    }

    #[test]
    fn every_truncation_of_a_uefi_structure_is_harmless() {
        let full = mbi(
            &[
                (TAG_CMDLINE, cstr("a=1")),
                (TAG_FRAMEBUFFER, framebuffer(0x8000_0000, 1)),
                (
                    TAG_EFI64_SYSTEM_TABLE,
                    0x7fe0_0000u64.to_le_bytes().to_vec(),
                ),
                (
                    TAG_EFI_MMAP,
                    efi_mmap(
                        48,
                        1,
                        &[efi_desc(48, 7, 0, 16, 0xf), efi_desc(48, 6, 0x10000, 1, 0)],
                    ),
                ),
                (TAG_ACPI_NEW, rsdp(2)),
            ],
            true,
        );
        for cut in 0..full.len() {
            let _ = run(&full[..cut]);
        }
        for i in 0..full.len() {
            let mut b = full.clone();
            b[i] ^= 0xa5;
            let _ = run(&b);
        }
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

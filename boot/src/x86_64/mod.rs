//! x86_64 entry paths: [PVH](pvh) (QEMU `-kernel`, Xen, Firecracker) and [Multiboot2](multiboot2)
//! (GRUB on real servers, iPXE).
//!
//! Both protocols hand over in 32-bit protected mode with paging off. The assembly in `entry`
//! (built only for `x86_64-unknown-none`) switches to long mode and calls one Rust function, which
//! runs the protocol's parser and then `hv_main`. The parsers are safe code: they see boot-loader
//! memory only through [`PhysMem`], so the host tests feed them synthetic structures and the
//! hypervisor feeds them the boot identity map.
//!
//! Bad boot-loader data is never fatal here: the parsers clamp or skip what they cannot use and
//! record it in [`BootNotes`], which the hypervisor prints.

pub mod madt;
pub mod madt_ioapic;
pub mod multiboot2;
pub mod pvh;
mod rsdp;

pub use rsdp::{RSDP_V1_LEN, RSDP_V2_LEN, find_rsdp_in_bios_area, rsdp_revision};

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod entry;
#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub use entry::{boot_notes, boot_stack};

use crate::{BootInfo, FixedStr, MemoryKind, MemoryRegion};

/// Read access to physical memory as the boot loader left it.
pub trait PhysMem {
    /// Returns the bytes at `[pa, pa + n)` for the largest `n <= max_len` that is accessible,
    /// possibly an empty slice (e.g. `pa` is 0 or outside what is mapped). Callers check the length.
    fn read(&self, pa: u64, max_len: usize) -> &[u8];
}

/// One thing the boot path noticed and worked around; `value` is the offending number, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issue {
    pub what: &'static str,
    pub value: u64,
}

/// Maximum number of [`Issue`]s kept; more are only counted.
pub const MAX_ISSUES: usize = 16;

/// An ACPI RSDP copied out of a Multiboot2 tag (the tag holds the structure itself, not its address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsdpCopy {
    pub bytes: [u8; RSDP_V2_LEN],
    /// 20 for an ACPI 1.0 RSDP, 36 for ACPI 2.0+.
    pub len: usize,
}

impl RsdpCopy {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len.min(RSDP_V2_LEN)]
    }
}

/// Where `BootInfo::rsdp` came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpSource {
    /// Not found anywhere.
    None,
    /// The boot loader's pointer (PVH `rsdp_paddr`).
    BootLoader,
    /// The firmware's own RSDP in the BIOS area, located by matching the Multiboot2 copy or by scan.
    BiosArea,
    /// Our own copy of the Multiboot2 tag's RSDP, kept inside the hypervisor image (UEFI machines,
    /// where the firmware's RSDP lives in memory we cannot find without EFI tables).
    ImageCopy,
}

/// Everything the x86 parsers learn or notice beyond [`BootInfo`](crate::BootInfo).
#[derive(Clone, Debug)]
pub struct BootNotes {
    /// Multiboot2 tag 2 ("GRUB 2.06", ...); empty under PVH.
    pub loader_name: FixedStr<64>,
    /// The RSDP from Multiboot2 tag 15 (preferred) or 14, already checksum-validated.
    pub rsdp_copy: Option<RsdpCopy>,
    pub rsdp_source: RsdpSource,
    /// The PVH `start_info` version or the Multiboot2 `total_size`, for the boot report.
    pub raw_version: u32,
    issues: [Issue; MAX_ISSUES],
    issue_count: usize,
    /// Issues not stored because the table was full.
    pub issues_dropped: usize,
    /// The console UART the ACPI SPCR table names, or why it names none usable; `None` when there
    /// is no RSDP to look in. Read through the boot identity map, before the hypervisor's console
    /// exists, so that its first line already goes to the port the firmware used.
    pub spcr: Option<Result<crate::console::ConsoleUart, &'static str>>,
}

impl BootNotes {
    pub const fn new() -> Self {
        const NONE: Issue = Issue { what: "", value: 0 };
        Self {
            loader_name: FixedStr::new(),
            rsdp_copy: None,
            rsdp_source: RsdpSource::None,
            raw_version: 0,
            issues: [NONE; MAX_ISSUES],
            issue_count: 0,
            issues_dropped: 0,
            spcr: None,
        }
    }

    /// Records a problem with the boot loader's data.
    pub fn record(&mut self, what: &'static str, value: u64) {
        match self.issues.get_mut(self.issue_count) {
            Some(slot) => {
                *slot = Issue { what, value };
                self.issue_count += 1;
            }
            None => self.issues_dropped += 1,
        }
    }

    pub fn issues(&self) -> &[Issue] {
        &self.issues[..self.issue_count]
    }

    /// True when an issue with this exact text was recorded (used by tests and the boot report).
    pub fn has(&self, what: &str) -> bool {
        self.issues().iter().any(|i| i.what == what)
    }
}

impl Default for BootNotes {
    fn default() -> Self {
        Self::new()
    }
}

/// Capacity of `BootInfo::cmdline`; longer command lines are truncated and noted.
const CMDLINE_CAP: usize = 512;

/// Architectural limit of physical addresses on x86_64 (MAXPHYADDR <= 52, Intel SDM vol 3 §4.1.4).
pub const MAX_PHYS_ADDR: u64 = 1 << 52;

/// Maps an E820-style memory type to [`MemoryKind`]. PVH (`XEN_HVM_MEMMAP_TYPE_*`) and Multiboot2
/// (memory map tag type 6) use the E820 numbering: 1 RAM, 2 reserved, 3 ACPI reclaimable,
/// 4 ACPI NVS, 5 unusable; PVH adds 6 disabled and 7 persistent memory, which we do not allocate
/// from, so they and any unknown type count as reserved.
pub fn e820_kind(ty: u32) -> MemoryKind {
    match ty {
        1 => MemoryKind::Usable,
        3 => MemoryKind::AcpiReclaimable,
        4 => MemoryKind::AcpiNvs,
        5 => MemoryKind::Defective,
        _ => MemoryKind::Reserved,
    }
}

/// Records a firmware memory range, clamped to the physical address space; ranges that wrap or
/// start beyond [`MAX_PHYS_ADDR`] are clamped or skipped and noted.
pub(crate) fn push_region_checked(
    info: &mut BootInfo,
    notes: &mut BootNotes,
    start: u64,
    len: u64,
    kind: MemoryKind,
) {
    if start >= MAX_PHYS_ADDR {
        notes.record("memory range beyond 2^52 skipped", start);
        return;
    }
    let end = match start.checked_add(len) {
        Some(end) if end <= MAX_PHYS_ADDR => end,
        _ => {
            notes.record("memory range clamped at 2^52", start);
            MAX_PHYS_ADDR
        }
    };
    info.push_region(MemoryRegion {
        start,
        len: end - start,
        kind,
    });
}

/// Little-endian field readers that return `None` past the end instead of panicking.
pub(crate) fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Copies a NUL-terminated string of at most `N` bytes; notes when no terminator was seen within
/// the capacity (the string was truncated, or the boot loader forgot the NUL).
pub(crate) fn copy_cstr<const N: usize>(
    bytes: &[u8],
    notes: &mut BootNotes,
    what: &'static str,
) -> FixedStr<N> {
    let window = &bytes[..bytes.len().min(N + 1)];
    if !window.contains(&0) && window.len() > N {
        notes.record(what, N as u64);
    }
    FixedStr::from_bytes(window)
}

/// Records the hypervisor image (`image_start..image_end`, set by the entry from the linker
/// symbols) and the boot modules as [`MemoryKind::InUse`]. These ranges overlap the firmware's
/// `Usable` RAM on purpose: `InUse` overrides `Usable` (see [`MemoryKind`]).
pub fn mark_in_use(info: &mut BootInfo) {
    let image = MemoryRegion {
        start: info.image_start,
        len: info.image_end.saturating_sub(info.image_start),
        kind: MemoryKind::InUse,
    };
    info.push_region(image);
    for i in 0..info.modules().len() {
        let m = info.modules()[i];
        info.push_region(MemoryRegion {
            start: m.start,
            len: m.len,
            kind: MemoryKind::InUse,
        });
    }
}

/// Chooses `BootInfo::rsdp`, in order of trust:
/// 1. the boot loader's pointer (`given`), if an RSDP with a valid checksum is really there;
/// 2. the firmware's own RSDP in the BIOS area that is byte-identical to the Multiboot2 copy, so
///    both boot protocols report the same address on BIOS machines;
/// 3. the Multiboot2 copy itself, stored by `place_copy` (which returns its physical address);
/// 4. any valid RSDP the BIOS-area scan finds (ACPI 6.5 §5.2.5.1).
pub fn choose_rsdp(
    given: Option<u64>,
    mem: &impl PhysMem,
    notes: &mut BootNotes,
    place_copy: impl FnOnce(&RsdpCopy) -> u64,
) -> Option<u64> {
    let read = |pa: u64, buf: &mut [u8]| {
        let src = mem.read(pa, buf.len());
        buf[..src.len()].copy_from_slice(src);
        buf[src.len()..].fill(0);
    };
    if let Some(pa) = given {
        if rsdp_revision(mem.read(pa, RSDP_V2_LEN)).is_some() {
            notes.rsdp_source = RsdpSource::BootLoader;
            return Some(pa);
        }
        notes.record("boot loader's RSDP pointer has no valid RSDP; scanning", pa);
    }
    let found = find_rsdp_in_bios_area(read);
    if let Some(copy) = notes.rsdp_copy {
        if let Some(pa) = found
            && mem.read(pa, copy.len) == copy.as_bytes()
        {
            notes.rsdp_source = RsdpSource::BiosArea;
            return Some(pa);
        }
        notes.rsdp_source = RsdpSource::ImageCopy;
        return Some(place_copy(&copy));
    }
    if found.is_some() {
        notes.rsdp_source = RsdpSource::BiosArea;
    }
    found
}

/// Test helper shared by the parser tests: physical memory made of a few byte blocks.
#[cfg(test)]
pub(crate) mod fake {
    extern crate std;
    use std::vec::Vec;

    #[derive(Default)]
    pub struct FakeMem {
        pub blocks: Vec<(u64, Vec<u8>)>,
    }

    impl FakeMem {
        pub fn put(&mut self, pa: u64, bytes: &[u8]) {
            self.blocks.push((pa, bytes.to_vec()));
        }
    }

    impl super::PhysMem for FakeMem {
        fn read(&self, pa: u64, max_len: usize) -> &[u8] {
            for (base, bytes) in &self.blocks {
                if pa >= *base && pa - *base < bytes.len() as u64 {
                    let off = (pa - base) as usize;
                    let end = bytes.len().min(off + max_len);
                    return &bytes[off..end];
                }
            }
            &[]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeMem;
    use super::*;

    fn rsdp_v0(oem: &[u8; 6], rsdt: u32) -> [u8; 20] {
        let mut r = [0u8; 20];
        r[..8].copy_from_slice(b"RSD PTR ");
        r[9..15].copy_from_slice(oem);
        r[16..20].copy_from_slice(&rsdt.to_le_bytes());
        let sum = r.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        r[8] = 0u8.wrapping_sub(sum);
        r
    }

    fn bios_with_rsdp_at(pa: u64, rsdp: &[u8]) -> FakeMem {
        let mut area = std::vec![0u8; 0x20000];
        let off = (pa - 0xe0000) as usize;
        area[off..off + rsdp.len()].copy_from_slice(rsdp);
        let mut mem = FakeMem::default();
        mem.put(0xe0000, &area);
        mem.put(0x400, &[0u8; 0x100]);
        mem
    }

    extern crate std;

    #[test]
    fn given_pointer_is_used_when_valid() {
        let r = rsdp_v0(b"BOCHS ", 0x7fe0000);
        let mem = bios_with_rsdp_at(0xf5240, &r);
        let mut notes = BootNotes::new();
        assert_eq!(
            choose_rsdp(Some(0xf5240), &mem, &mut notes, |_| 0),
            Some(0xf5240)
        );
        assert_eq!(notes.rsdp_source, RsdpSource::BootLoader);
    }

    #[test]
    fn bad_pointer_falls_back_to_scan() {
        let r = rsdp_v0(b"BOCHS ", 0x7fe0000);
        let mem = bios_with_rsdp_at(0xf0010, &r);
        let mut notes = BootNotes::new();
        assert_eq!(
            choose_rsdp(Some(0xe0100), &mem, &mut notes, |_| 0),
            Some(0xf0010)
        );
        assert_eq!(notes.issues().len(), 1);
        assert_eq!(notes.rsdp_source, RsdpSource::BiosArea);
    }

    #[test]
    fn multiboot_copy_prefers_identical_firmware_rsdp() {
        let r = rsdp_v0(b"BOCHS ", 0x7fe0000);
        let mem = bios_with_rsdp_at(0xf5240, &r);
        let mut notes = BootNotes::new();
        let mut bytes = [0u8; RSDP_V2_LEN];
        bytes[..20].copy_from_slice(&r);
        notes.rsdp_copy = Some(RsdpCopy { bytes, len: 20 });
        assert_eq!(
            choose_rsdp(None, &mem, &mut notes, |_| 0x1234),
            Some(0xf5240)
        );
        assert_eq!(notes.rsdp_source, RsdpSource::BiosArea);

        // A different RSDP in the BIOS area (UEFI machines may leave stale ones): use our copy.
        let other = rsdp_v0(b"OTHER ", 0x1000);
        let mem = bios_with_rsdp_at(0xf5240, &other);
        let mut notes2 = BootNotes::new();
        notes2.rsdp_copy = notes.rsdp_copy;
        assert_eq!(
            choose_rsdp(None, &mem, &mut notes2, |_| 0x1234),
            Some(0x1234)
        );
        assert_eq!(notes2.rsdp_source, RsdpSource::ImageCopy);
    }

    #[test]
    fn nothing_anywhere() {
        let mem = FakeMem::default();
        let mut notes = BootNotes::new();
        assert_eq!(choose_rsdp(None, &mem, &mut notes, |_| 1), None);
        assert_eq!(notes.rsdp_source, RsdpSource::None);
    }

    #[test]
    fn notes_overflow_is_counted() {
        let mut notes = BootNotes::new();
        for i in 0..(MAX_ISSUES as u64 + 2) {
            notes.record("x", i);
        }
        assert_eq!(notes.issues().len(), MAX_ISSUES);
        assert_eq!(notes.issues_dropped, 2);
    }

    #[test]
    fn cstr_truncation_is_noted() {
        let mut notes = BootNotes::new();
        let s: FixedStr<4> = copy_cstr(b"abcdefgh", &mut notes, "long");
        assert_eq!(s.as_str(), "abcd");
        assert!(notes.has("long"));
        let mut notes = BootNotes::new();
        let s: FixedStr<4> = copy_cstr(b"abcd\0", &mut notes, "long");
        assert_eq!(s.as_str(), "abcd");
        assert!(notes.issues().is_empty());
    }
}

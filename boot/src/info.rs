//! The one description of the machine that every entry path produces.
//!
//! `BootInfo` is plain data with fixed capacity: it is built before the heap exists, by code that
//! must not allocate, and is then handed to the hypervisor's `hv_main` by reference.

/// Which entry path started the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen PVH direct boot (QEMU `-kernel`, Firecracker, Xen): 32-bit protected mode, `ebx` = start_info.
    Pvh,
    /// Multiboot2 (GRUB, iPXE): 32-bit protected mode, `eax` = magic, `ebx` = information structure.
    Multiboot2,
    /// arm64 Linux `Image` protocol (QEMU `-kernel`, U-Boot `booti`, UEFI stub later): `x0` = DTB.
    Arm64Image,
    /// UEFI firmware starting the arm64 Image as an EFI application (its PE/COFF header):
    /// `x0` = ImageHandle, `x1` = SystemTable; memory map and ACPI come from the firmware.
    Uefi,
}

/// What a range of physical memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// RAM the hypervisor may allocate from (minus what the reservations below cover).
    Usable,
    /// Firmware-reserved, MMIO holes, or anything we do not understand.
    Reserved,
    /// ACPI tables that may be reclaimed after parsing.
    AcpiReclaimable,
    /// ACPI NVS: never touch.
    AcpiNvs,
    /// Known-bad RAM.
    Defective,
    /// The hypervisor's own image, boot modules, the DTB: RAM, but in use.
    InUse,
}

/// One physical range `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub len: u64,
    pub kind: MemoryKind,
}

impl MemoryRegion {
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A module loaded next to the hypervisor by the boot loader (a guest kernel, an initrd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub start: u64,
    pub len: u64,
    /// The module's command line (Multiboot2 module string, PVH module cmdline), possibly empty.
    pub cmdline: FixedStr<128>,
}

/// A fixed-capacity UTF-8 string copied out of boot-loader memory. Over-long input is truncated at a
/// character boundary; invalid UTF-8 is replaced by `?` so later code never sees broken strings.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FixedStr<const N: usize> {
    len: usize,
    buf: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    pub const fn new() -> Self {
        Self {
            len: 0,
            buf: [0; N],
        }
    }

    /// Copies `bytes` (stopping at the first NUL), replacing non-ASCII-printable bytes with `?`.
    /// Command lines are ASCII in practice; refusing anything else keeps parsing trivial and safe.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut s = Self::new();
        for &b in bytes.iter().take_while(|&&b| b != 0).take(N) {
            s.buf[s.len] = if (0x20..0x7f).contains(&b) || b == b'\t' {
                b
            } else {
                b'?'
            };
            s.len += 1;
        }
        s
    }

    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored (see `from_bytes`), so this cannot fail.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> Default for FixedStr<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> core::fmt::Debug for FixedStr<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> core::fmt::Display for FixedStr<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A linear framebuffer the boot loader set up (Multiboot2 tag 8), e.g. the UEFI GOP mode on a
/// server whose only console is a screen. Recorded so the hypervisor can report it; its memory is
/// MMIO and is never handed out as RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framebuffer {
    pub addr: u64,
    /// Bytes per scan line.
    pub pitch: u32,
    pub width: u32,
    pub height: u32,
    pub bpp: u8,
    /// Multiboot2 framebuffer_type: 0 indexed, 1 direct RGB, 2 EGA text.
    pub kind: u8,
}

/// Maximum number of memory regions kept; firmware maps on large servers reach ~100 entries.
pub const MAX_MEMORY_REGIONS: usize = 256;
/// Maximum number of boot modules kept.
pub const MAX_MODULES: usize = 8;

/// Everything the hypervisor learns from the boot path, in one architecture-neutral form.
#[derive(Clone, Debug)]
pub struct BootInfo {
    pub protocol: BootProtocol,
    regions: [MemoryRegion; MAX_MEMORY_REGIONS],
    region_count: usize,
    /// Regions the boot path could not store because the table was full (reported, never silent).
    pub regions_dropped: usize,
    /// Physical address of the ACPI RSDP, when firmware gave one.
    pub rsdp: Option<u64>,
    /// Physical address of the flattened device tree, when the boot protocol passed one.
    pub dtb: Option<u64>,
    /// Physical address of the UEFI system table when the machine booted through UEFI (Multiboot2
    /// tag 12, or x1 of the arm64 EFI stub). Boot services have been exited by then.
    pub efi_system_table: Option<u64>,
    /// The boot loader's framebuffer, if it set one up.
    pub framebuffer: Option<Framebuffer>,
    pub cmdline: FixedStr<512>,
    modules: [Module; MAX_MODULES],
    module_count: usize,
    /// Physical range of the hypervisor image itself (from the linker script).
    pub image_start: u64,
    pub image_end: u64,
}

impl BootInfo {
    pub const fn new(protocol: BootProtocol) -> Self {
        const EMPTY: MemoryRegion = MemoryRegion {
            start: 0,
            len: 0,
            kind: MemoryKind::Reserved,
        };
        const NO_MODULE: Module = Module {
            start: 0,
            len: 0,
            cmdline: FixedStr::new(),
        };
        Self {
            protocol,
            regions: [EMPTY; MAX_MEMORY_REGIONS],
            region_count: 0,
            regions_dropped: 0,
            rsdp: None,
            dtb: None,
            efi_system_table: None,
            framebuffer: None,
            cmdline: FixedStr::new(),
            modules: [NO_MODULE; MAX_MODULES],
            module_count: 0,
            image_start: 0,
            image_end: 0,
        }
    }

    /// Records a memory region; empty regions are ignored, overflow is counted in `regions_dropped`.
    pub fn push_region(&mut self, region: MemoryRegion) {
        if region.len == 0 {
            return;
        }
        match self.regions.get_mut(self.region_count) {
            Some(slot) => {
                *slot = region;
                self.region_count += 1;
            }
            None => self.regions_dropped += 1,
        }
    }

    /// Records a boot module; returns `false` when the module table is full.
    pub fn push_module(&mut self, module: Module) -> bool {
        match self.modules.get_mut(self.module_count) {
            Some(slot) => {
                *slot = module;
                self.module_count += 1;
                true
            }
            None => false,
        }
    }

    pub fn memory_regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.module_count]
    }

    /// Total bytes of `Usable` RAM as reported by firmware (before reservations).
    pub fn usable_bytes(&self) -> u64 {
        self.memory_regions()
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .map(|r| r.len)
            .sum()
    }

    /// Looks up `key=value` on the command line; a bare `key` yields `Some("")`.
    pub fn cmdline_value(&self, key: &str) -> Option<&str> {
        cmdline_value(self.cmdline.as_str(), key)
    }
}

/// Finds `key` or `key=value` among the whitespace-separated words of `cmdline`.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|word| match word.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if word == key => Some(""),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lookup() {
        assert_eq!(
            cmdline_value("a=1 scenario=boot-report x", "scenario"),
            Some("boot-report")
        );
        assert_eq!(cmdline_value("a=1 x", "x"), Some(""));
        assert_eq!(cmdline_value("ab=1", "a"), None);
    }

    #[test]
    fn fixed_str_sanitises_and_truncates() {
        let s = FixedStr::<4>::from_bytes(b"ab\xffcdef");
        assert_eq!(s.as_str(), "ab?c");
        assert_eq!(FixedStr::<8>::from_bytes(b"hi\0there").as_str(), "hi");
    }

    #[test]
    fn region_table_overflow_is_counted() {
        let mut info = BootInfo::new(BootProtocol::Pvh);
        for i in 0..(MAX_MEMORY_REGIONS as u64 + 3) {
            info.push_region(MemoryRegion {
                start: i << 12,
                len: 4096,
                kind: MemoryKind::Usable,
            });
        }
        assert_eq!(info.memory_regions().len(), MAX_MEMORY_REGIONS);
        assert_eq!(info.regions_dropped, 3);
    }
}

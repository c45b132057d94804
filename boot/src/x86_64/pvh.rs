//! The Xen PVH direct-boot protocol (QEMU `-kernel` with an ELF that carries
//! `XEN_ELFNOTE_PHYS32_ENTRY`; also Xen, Firecracker, Cloud Hypervisor).
//!
//! The loader enters `pvh_start32` in 32-bit protected mode, paging off, with `ebx` = physical
//! address of `struct hvm_start_info` (Xen public header `arch/x86/hvm/start_info.h`, also
//! documented in `docs/misc/pvh.pandoc`). All fields are little-endian:
//!
//! ```text
//! offset  size  field            (version 0)
//!      0     4  magic            0x336ec578
//!      4     4  version          0 or 1
//!      8     4  flags            SIF_*
//!     12     4  nr_modules
//!     16     8  modlist_paddr    -> nr_modules x hvm_modlist_entry {paddr, size, cmdline_paddr, reserved: u64}
//!     24     8  cmdline_paddr    -> NUL-terminated ASCII
//!     32     8  rsdp_paddr       0 if the loader does not know it
//!                                 (version 1 adds)
//!     40     8  memmap_paddr     -> memmap_entries x hvm_memmap_table_entry {addr, size: u64, type, reserved: u32}
//!     48     4  memmap_entries
//!     52     4  reserved
//! ```

use super::{
    BootNotes, CMDLINE_CAP, PhysMem, copy_cstr, e820_kind, le_u32, le_u64, push_region_checked,
};
use crate::{BootInfo, FixedStr, Module};

/// `hvm_start_info.magic` ("xEn3" with the high bit of the last byte set).
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` version 0 and version 1.
pub const START_INFO_V0_LEN: usize = 40;
pub const START_INFO_V1_LEN: usize = 56;
/// Size of `hvm_modlist_entry` and `hvm_memmap_table_entry`.
pub const MODLIST_ENTRY_LEN: usize = 32;
pub const MEMMAP_ENTRY_LEN: usize = 24;

/// Upper bounds on what we walk, so a corrupt count cannot make the boot path loop for long.
const MAX_MEMMAP_ENTRIES: usize = 4096;
const MAX_MODULE_ENTRIES: usize = 64;

/// Fills `info` (memory map, command line, modules, raw `rsdp_paddr`) from the `hvm_start_info` at
/// physical address `start_info_pa`. Anything malformed is skipped and recorded in `notes`.
pub fn parse(start_info_pa: u64, mem: &impl PhysMem, info: &mut BootInfo, notes: &mut BootNotes) {
    let si = mem.read(start_info_pa, START_INFO_V1_LEN);
    if si.len() < START_INFO_V0_LEN {
        notes.record("PVH start_info unreadable or truncated", start_info_pa);
        return;
    }
    let field32 = |off| le_u32(si, off).unwrap_or(0);
    let field64 = |off| le_u64(si, off).unwrap_or(0);
    let magic = field32(0);
    if magic != START_INFO_MAGIC {
        notes.record("PVH start_info has a bad magic", u64::from(magic));
        return;
    }
    let version = field32(4);
    notes.raw_version = version;

    let cmdline_pa = field64(24);
    if cmdline_pa != 0 {
        info.cmdline = copy_cstr::<CMDLINE_CAP>(
            mem.read(cmdline_pa, CMDLINE_CAP + 1),
            notes,
            "command line truncated",
        );
    }

    let rsdp = field64(32);
    info.rsdp = (rsdp != 0).then_some(rsdp);

    parse_modules(mem, field32(12) as usize, field64(16), info, notes);

    if version == 0 {
        // Version 0 has no memory map; a Xen PVH guest would ask the hypervisor for it, which
        // does not apply to us. The hypervisor reports the empty map.
        notes.record("PVH start_info version 0 has no memory map", 0);
        return;
    }
    if si.len() < START_INFO_V1_LEN {
        notes.record("PVH start_info v1 truncated before memmap", si.len() as u64);
        return;
    }
    parse_memmap(mem, field64(40), field32(48) as usize, info, notes);
}

fn parse_memmap(
    mem: &impl PhysMem,
    pa: u64,
    count: usize,
    info: &mut BootInfo,
    notes: &mut BootNotes,
) {
    if count == 0 || pa == 0 {
        notes.record("PVH memory map is empty", pa);
        return;
    }
    let count = if count > MAX_MEMMAP_ENTRIES {
        notes.record("PVH memmap_entries clamped", count as u64);
        MAX_MEMMAP_ENTRIES
    } else {
        count
    };
    let table = mem.read(pa, count * MEMMAP_ENTRY_LEN);
    if table.len() < count * MEMMAP_ENTRY_LEN {
        notes.record("PVH memory map extends past readable memory", pa);
    }
    for entry in table.chunks_exact(MEMMAP_ENTRY_LEN) {
        let (Some(addr), Some(size), Some(ty)) =
            (le_u64(entry, 0), le_u64(entry, 8), le_u32(entry, 16))
        else {
            continue;
        };
        push_region_checked(info, notes, addr, size, e820_kind(ty));
    }
}

fn parse_modules(
    mem: &impl PhysMem,
    count: usize,
    pa: u64,
    info: &mut BootInfo,
    notes: &mut BootNotes,
) {
    if count == 0 {
        return;
    }
    if pa == 0 {
        notes.record("PVH nr_modules > 0 but modlist_paddr is 0", count as u64);
        return;
    }
    let count = if count > MAX_MODULE_ENTRIES {
        notes.record("PVH nr_modules clamped", count as u64);
        MAX_MODULE_ENTRIES
    } else {
        count
    };
    let table = mem.read(pa, count * MODLIST_ENTRY_LEN);
    if table.len() < count * MODLIST_ENTRY_LEN {
        notes.record("PVH module list extends past readable memory", pa);
    }
    for entry in table.chunks_exact(MODLIST_ENTRY_LEN) {
        let start = le_u64(entry, 0).unwrap_or(0);
        let len = le_u64(entry, 8).unwrap_or(0);
        let cmdline_pa = le_u64(entry, 16).unwrap_or(0);
        if start.checked_add(len).is_none() || len == 0 {
            notes.record("PVH module with an empty or wrapping range skipped", start);
            continue;
        }
        let cmdline = if cmdline_pa == 0 {
            FixedStr::new()
        } else {
            copy_cstr(
                mem.read(cmdline_pa, 129),
                notes,
                "module command line truncated",
            )
        };
        if !info.push_module(Module {
            start,
            len,
            cmdline,
        }) {
            notes.record("boot module table full; module dropped", start);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::super::fake::FakeMem;
    use super::*;
    use crate::{BootProtocol, MemoryKind, MemoryRegion};
    use std::vec::Vec;

    struct Builder {
        version: u32,
        cmdline: Option<Vec<u8>>,
        memmap: Vec<(u64, u64, u32)>,
        modules: Vec<(u64, u64, Option<&'static [u8]>)>,
        rsdp: u64,
    }

    const SI: u64 = 0x21e0;

    impl Builder {
        fn new() -> Self {
            Self {
                version: 1,
                cmdline: None,
                memmap: Vec::new(),
                modules: Vec::new(),
                rsdp: 0,
            }
        }

        fn build(&self) -> FakeMem {
            let mut mem = FakeMem::default();
            let mut si = Vec::new();
            si.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
            si.extend_from_slice(&self.version.to_le_bytes());
            si.extend_from_slice(&0u32.to_le_bytes());
            si.extend_from_slice(&(self.modules.len() as u32).to_le_bytes());
            si.extend_from_slice(
                &(if self.modules.is_empty() {
                    0u64
                } else {
                    0x5000
                })
                .to_le_bytes(),
            );
            si.extend_from_slice(
                &(if self.cmdline.is_some() { 0x3000u64 } else { 0 }).to_le_bytes(),
            );
            si.extend_from_slice(&self.rsdp.to_le_bytes());
            if self.version >= 1 {
                si.extend_from_slice(&0x4000u64.to_le_bytes());
                si.extend_from_slice(&(self.memmap.len() as u32).to_le_bytes());
                si.extend_from_slice(&0u32.to_le_bytes());
            }
            mem.put(SI, &si);
            if let Some(c) = &self.cmdline {
                mem.put(0x3000, c);
            }
            let mut mm = Vec::new();
            for &(a, s, t) in &self.memmap {
                mm.extend_from_slice(&a.to_le_bytes());
                mm.extend_from_slice(&s.to_le_bytes());
                mm.extend_from_slice(&t.to_le_bytes());
                mm.extend_from_slice(&0u32.to_le_bytes());
            }
            mem.put(0x4000, &mm);
            let mut ml = Vec::new();
            for (i, &(p, s, c)) in self.modules.iter().enumerate() {
                let cpa = 0x6000 + 0x100 * i as u64;
                ml.extend_from_slice(&p.to_le_bytes());
                ml.extend_from_slice(&s.to_le_bytes());
                ml.extend_from_slice(&(if c.is_some() { cpa } else { 0 }).to_le_bytes());
                ml.extend_from_slice(&0u64.to_le_bytes());
                if let Some(c) = c {
                    mem.put(cpa, c);
                }
            }
            mem.put(0x5000, &ml);
            mem
        }
    }

    fn run(mem: &FakeMem) -> (BootInfo, BootNotes) {
        let mut info = BootInfo::new(BootProtocol::Pvh);
        let mut notes = BootNotes::new();
        parse(SI, mem, &mut info, &mut notes);
        (info, notes)
    }

    #[test]
    fn qemu_like_start_info() {
        let mut b = Builder::new();
        b.cmdline = Some(b"exit=qemu scenario=boot-report\0".to_vec());
        b.rsdp = 0xf5240;
        b.memmap = std::vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x400, 2),
            (0xf0000, 0x10000, 2),
            (0x100000, 0xfee_0000, 1),
            (0xb000_0000, 0x1000_0000, 2),
            (0x7fe_0000, 0x2_0000, 3),
            (0x7ff_0000, 0x1000, 4),
            (0x8000_0000, 0x1000, 5),
            (0x9000_0000, 0x1000, 7),
        ];
        b.modules = std::vec![
            (0x200_0000, 0x1234, Some(b"initrd\0".as_slice())),
            (0x300_0000, 1, None)
        ];
        let (info, notes) = run(&b.build());
        assert!(notes.issues().is_empty(), "{:?}", notes.issues());
        assert_eq!(notes.raw_version, 1);
        assert_eq!(info.cmdline.as_str(), "exit=qemu scenario=boot-report");
        assert_eq!(info.cmdline_value("exit"), Some("qemu"));
        assert_eq!(info.rsdp, Some(0xf5240));
        let kinds: Vec<MemoryKind> = info.memory_regions().iter().map(|r| r.kind).collect();
        use MemoryKind::*;
        assert_eq!(
            kinds,
            [
                Usable,
                Reserved,
                Reserved,
                Usable,
                Reserved,
                AcpiReclaimable,
                AcpiNvs,
                Defective,
                Reserved
            ]
        );
        assert_eq!(
            info.memory_regions()[3],
            MemoryRegion {
                start: 0x100000,
                len: 0xfee_0000,
                kind: Usable
            }
        );
        assert_eq!(info.modules().len(), 2);
        assert_eq!(info.modules()[0].cmdline.as_str(), "initrd");
        assert_eq!(info.modules()[1].cmdline.as_str(), "");
    }

    #[test]
    fn bad_magic_and_truncated_start_info() {
        let mut mem = FakeMem::default();
        mem.put(SI, &[0u8; 56]);
        let (info, notes) = run(&mem);
        assert!(notes.has("PVH start_info has a bad magic"));
        assert!(info.memory_regions().is_empty());

        let mut mem = FakeMem::default();
        mem.put(SI, &START_INFO_MAGIC.to_le_bytes());
        let (_, notes) = run(&mem);
        assert!(notes.has("PVH start_info unreadable or truncated"));

        let (_, notes) = run(&FakeMem::default());
        assert!(notes.has("PVH start_info unreadable or truncated"));
    }

    #[test]
    fn version0_has_no_memmap_but_keeps_cmdline() {
        let mut b = Builder::new();
        b.version = 0;
        b.cmdline = Some(b"a=b".to_vec()); // no NUL, but the readable block ends
        let (info, notes) = run(&b.build());
        assert_eq!(info.cmdline.as_str(), "a=b");
        assert!(notes.has("PVH start_info version 0 has no memory map"));
        assert!(info.memory_regions().is_empty());
    }

    #[test]
    fn memmap_truncated_and_wrapping_entries() {
        let mut b = Builder::new();
        b.memmap = std::vec![
            (0x1000, 0x1000, 1),
            (u64::MAX - 5, 100, 1),
            (1 << 53, 1, 1),
            (0x5000, 0, 1)
        ];
        let mut mem = b.build();
        // Claim more entries than are present.
        let si = &mut mem.blocks[0].1;
        si[48..52].copy_from_slice(&10u32.to_le_bytes());
        let (info, notes) = run(&mem);
        assert!(notes.has("PVH memory map extends past readable memory"));
        assert!(notes.has("memory range beyond 2^52 skipped"));
        assert_eq!(
            info.memory_regions(),
            &[MemoryRegion {
                start: 0x1000,
                len: 0x1000,
                kind: MemoryKind::Usable
            }]
        );
    }

    #[test]
    fn long_cmdline_is_truncated_and_noted() {
        let mut b = Builder::new();
        b.cmdline = Some([b'x'; 1000].to_vec());
        let (info, notes) = run(&b.build());
        assert_eq!(info.cmdline.as_str().len(), CMDLINE_CAP);
        assert!(notes.has("command line truncated"));
        assert!(notes.has("PVH memory map is empty"));
    }

    #[test]
    fn too_many_modules() {
        let mut b = Builder::new();
        b.modules = (0..12)
            .map(|i| (0x100_0000 * (i + 1), 0x1000, None))
            .collect();
        b.modules.push((u64::MAX, 2, None));
        let (info, notes) = run(&b.build());
        assert_eq!(info.modules().len(), crate::MAX_MODULES);
        assert!(notes.has("boot module table full; module dropped"));
        assert!(notes.has("PVH module with an empty or wrapping range skipped"));
    }
}

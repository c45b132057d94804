//! The hypervisor's own page tables: the low identity map (image, boot structures, legacy MMIO)
//! and the direct map of physical memory at [`DIRECT_MAP_BASE`] (Intel SDM vol 3 §4.5, 4-level
//! paging).
//!
//! Layout of the new PML4:
//! - entry 0 -> identity PDPT: [0, 4 GiB), executable (the image runs from here);
//! - entry 256 -> direct PDPT: [0, limit) at `DIRECT_MAP_BASE`, no-execute when EFER.NXE is on.
//!
//! Both share the same leaf memory types, and for 0-4 GiB even the same page directories, so one
//! physical page is never mapped with two different memory types (SDM §12.12.4 warns that such
//! aliases are undefined). The types come from the boot memory map, at the granularity of the
//! page size used:
//! - granules holding only RAM-like memory (usable, ACPI, NVS, in-use): write-back (PAT entry 0);
//! - granules holding no RAM at all (MMIO holes, reserved, defective): UC via PCD|PWT (entry 3);
//! - mixed granules: write-back, so the effective type comes from the firmware's MTRRs (SDM
//!   §12.5.2.2, Table 12-7: PAT WB + MTRR UC = UC). Mixed 1 GiB granules are split into 2 MiB
//!   pages and the mixed first 2 MiB (real-mode RAM, VGA hole, BIOS ROM) into 4 KiB pages, so this
//!   reliance is limited to 2 MiB granules straddling a RAM boundary. SDM §12.11.9 asks for
//!   uniform MTRR types under a large page; firmware MTRRs are normally 2 MiB-aligned there.
//!
//! The PAT MSR is set to its power-on default so entries 0 and 3 really mean WB and UC.
//! 1 GiB pages are used when CPUID.80000001h:EDX.Page1GB[26] says so; otherwise the direct map
//! uses 2 MiB pages from a static pool of [`POOL_PDS`] page directories, i.e. at most 64 GiB.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use ::x86_64::PhysAddr;
use ::x86_64::registers::control::{Cr3, Cr3Flags};
use ::x86_64::registers::model_specific::{Efer, EferFlags, Msr};
use ::x86_64::structures::paging::PhysFrame;
use boot::{BootInfo, MemoryKind};

/// Virtual address of physical address 0 in the direct map (PML4 entry 256, the first canonical
/// higher-half address).
pub const DIRECT_MAP_BASE: usize = 0xffff_8000_0000_0000;
/// One PML4 entry maps 512 GiB: the most the direct map covers.
pub const DIRECT_MAP_MAX: u64 = 512 << 30;
/// Page directories available for 2 MiB pages: 64 x 1 GiB = 64 GiB without 1 GiB pages.
pub const POOL_PDS: usize = 64;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const KIB4: u64 = 4 << 10;

// Page-table entry bits (SDM Tables 4-14..4-19).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;
/// PCD|PWT selects PAT entry 3, which [`PAT_DEFAULT`] makes UC.
const UC: u64 = PCD | PWT;

/// IA32_PAT (MSR 0x277) power-on value (SDM §12.12.4, Table 12-12): WB, WT, UC-, UC, repeated.
const IA32_PAT: u32 = 0x277;
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

#[repr(C, align(4096))]
struct Table([u64; 512]);

#[repr(C)]
struct Tables {
    pml4: Table,
    identity_pdpt: Table,
    direct_pdpt: Table,
    /// 4 KiB pages for the first 2 MiB.
    low_pt: Table,
    pds: [Table; POOL_PDS],
    /// 4 KiB page tables for 2 MiB pages split around a stack guard page.
    guard_pts: [Table; GUARD_PTS],
}

/// Page tables for splitting 2 MiB pages that hold stack guard pages: the boot stack and the
/// three IST stacks live in the image (at most a few 2 MiB pages), and each secondary CPU's four
/// stacks come from one frame allocation ([`unmap_page`]; at most two 2 MiB pages each).
const GUARD_PTS: usize = 4 + 2 * 16;

/// Address bits of a 2 MiB leaf (SDM Table 4-17) and of a table pointer or 4 KiB leaf.
const ADDR_2M: u64 = 0x000f_ffff_ffe0_0000;
const ADDR_4K: u64 = 0x000f_ffff_ffff_f000;

struct TableStore(UnsafeCell<Tables>);

// SAFETY: written by `init`, once, on the boot CPU before any other CPU runs (guarded by
// `LIMIT` being 0); afterwards only by `unmap_page` and read by `is_mapped`, both holding
// `SPLIT`, and by the MMU.
unsafe impl Sync for TableStore {}

const EMPTY: Table = Table([0; 512]);
static TABLES: TableStore = TableStore(UnsafeCell::new(Tables {
    pml4: EMPTY,
    identity_pdpt: EMPTY,
    direct_pdpt: EMPTY,
    low_pt: EMPTY,
    pds: [EMPTY; POOL_PDS],
    guard_pts: [EMPTY; GUARD_PTS],
}));

/// Split tables used so far (`guard_pts`, `pds`): set by `init`, advanced by [`unmap_page`]. Its
/// lock also serialises every access to `TABLES` after `init`.
static SPLIT: spin::Mutex<(usize, usize)> = spin::Mutex::new((0, 0));

/// End (exclusive) of the direct map; 0 until [`init`] ran.
static LIMIT: AtomicU64 = AtomicU64::new(0);

pub fn limit() -> u64 {
    LIMIT.load(Ordering::Acquire)
}

/// What a granule of physical memory holds, according to the boot memory map.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Ram,
    NoRam,
    Mixed,
}

/// RAM-like ranges of the memory map, sorted and merged (disjoint, non-adjacent).
struct RamRanges {
    ranges: [(u64, u64); boot::MAX_MEMORY_REGIONS],
    len: usize,
}

impl RamRanges {
    fn new(info: &BootInfo) -> Self {
        let mut r = Self {
            ranges: [(0, 0); boot::MAX_MEMORY_REGIONS],
            len: 0,
        };
        let ram_like = |k| {
            matches!(
                k,
                MemoryKind::Usable
                    | MemoryKind::AcpiReclaimable
                    | MemoryKind::AcpiNvs
                    | MemoryKind::InUse
            )
        };
        for region in info.memory_regions().iter().filter(|m| ram_like(m.kind)) {
            if let Some(slot) = r.ranges.get_mut(r.len) {
                *slot = (region.start, region.end());
                r.len += 1;
            }
        }
        let sorted = &mut r.ranges[..r.len];
        sorted.sort_unstable();
        let mut merged = 0;
        for i in 0..sorted.len() {
            let (s, e) = sorted[i];
            if merged > 0 && s <= sorted[merged - 1].1 {
                sorted[merged - 1].1 = sorted[merged - 1].1.max(e);
            } else {
                sorted[merged] = (s, e);
                merged += 1;
            }
        }
        r.len = merged;
        r
    }

    fn classify(&self, start: u64, end: u64) -> Class {
        let ranges = &self.ranges[..self.len];
        let first = ranges.partition_point(|&(_, e)| e <= start);
        match ranges.get(first) {
            Some(&(s, e)) if s < end => {
                if s <= start && e >= end {
                    Class::Ram
                } else {
                    Class::Mixed
                }
            }
            _ => Class::NoRam,
        }
    }
}

fn memory_type(class: Class) -> u64 {
    if class == Class::NoRam { UC } else { 0 }
}

/// Summary of what [`init`] built, for the log line.
pub struct Report {
    pub limit: u64,
    pub wanted: u64,
    pub huge_1g: bool,
    pub nx: bool,
    pub pds_used: usize,
    pub uc_granules: usize,
    pub pool_exhausted: bool,
    /// Stack guard pages left unmapped (of those asked for).
    pub guards_unmapped: usize,
}

/// End of the highest RAM-like region, at least 4 GiB so the MMIO below 4 GiB (LAPIC, IOAPIC,
/// VT-d, 32-bit PCI BARs) is always reachable; rounded up to whole GiB.
///
/// Reserved ranges above the top of RAM are deliberately not included: they are MMIO windows
/// (64-bit BARs) or holes such as the HyperTransport range QEMU reserves below 1 TiB on AMD
/// CPU models, which would push the limit past the cap while mapping nothing useful. Device
/// registers up there need a separate mapping.
fn wanted_limit(ram: &RamRanges) -> u64 {
    let top = ram.ranges[..ram.len].last().map_or(0, |&(_, end)| end);
    top.max(4 * GIB).next_multiple_of(GIB)
}

/// Highest address the memory map mentions (any kind), for the log line.
pub fn memory_map_end(info: &BootInfo) -> u64 {
    info.memory_regions()
        .iter()
        .map(|r| r.end())
        .max()
        .unwrap_or(0)
}

/// Builds the identity and direct maps and switches CR3 to them. Returns `None` if already done.
pub fn init(info: &BootInfo, huge_1g: bool, guards: &[u64]) -> Option<Report> {
    if limit() != 0 {
        return None;
    }
    let ram = RamRanges::new(info);
    let wanted = wanted_limit(&ram);
    let cap = if huge_1g {
        DIRECT_MAP_MAX
    } else {
        (POOL_PDS as u64) * GIB
    };
    let mut limit = wanted.min(cap);
    let nx = Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE);
    let xd = if nx { XD } else { 0 };

    // SAFETY: `limit() == 0` means this is the first and only call (the boot CPU, before any
    // other CPU is started), so nothing else references TABLES; the MMU does not use them until
    // the CR3 write below.
    let t = unsafe { &mut *TABLES.0.get() };
    let mut report = Report {
        limit,
        wanted,
        huge_1g,
        nx,
        pds_used: 0,
        uc_granules: 0,
        pool_exhausted: false,
        guards_unmapped: 0,
    };

    for gib in 0..limit / GIB {
        let base = gib * GIB;
        let class = ram.classify(base, base + GIB);
        let (identity, direct) = if huge_1g && class != Class::Mixed {
            let leaf = base | P | RW | PS | memory_type(class);
            report.uc_granules += usize::from(class == Class::NoRam);
            (leaf, leaf | xd)
        } else if let Some(pd) = t.pds.get_mut(report.pds_used) {
            report.pds_used += 1;
            fill_pd(pd, &mut t.low_pt, base, &ram, &mut report);
            let table = table_address(pd) | P | RW;
            (table, table | xd)
        } else {
            // Only reachable with 1 GiB pages (the 2 MiB cap matches the pool): map the mixed GiB
            // write-back and let the MTRRs decide.
            report.pool_exhausted = true;
            let leaf = base | P | RW | PS;
            (leaf, leaf | xd)
        };
        if gib < 4 {
            t.identity_pdpt.0[gib as usize] = identity;
        }
        match t.direct_pdpt.0.get_mut(gib as usize) {
            Some(slot) => *slot = direct,
            None => {
                limit = gib * GIB;
                break;
            }
        }
    }
    report.limit = limit;
    let mut guard_pts_used = 0;
    for &guard in guards {
        if unmap_guard(t, guard, &mut guard_pts_used) {
            report.guards_unmapped += 1;
        }
    }
    *SPLIT.lock() = (guard_pts_used, report.pds_used);
    t.pml4.0[0] = table_address(&t.identity_pdpt) | P | RW;
    t.pml4.0[(DIRECT_MAP_BASE >> 39) & 511] = table_address(&t.direct_pdpt) | P | RW | xd;

    let pml4 = PhysFrame::containing_address(PhysAddr::new_truncate(table_address(&t.pml4)));
    // SAFETY: (1) PAT: writing the architectural default only pins down the meaning of the
    // PCD/PWT combinations used here and by the boot map (entry 0 = WB stays WB). (2) CR3: the
    // new tables map the image (code, stack, statics) at the same addresses as the boot map,
    // because the identity half covers [0, 4 GiB) exactly as before, so execution continues;
    // they are 'static. (3) WBINVD: pages that become UC were only ever accessed through the
    // WB boot map if at all, so write back and drop any cached lines (SDM §12.12.4 for
    // changing a page's memory type).
    unsafe {
        Msr::new(IA32_PAT).write(PAT_DEFAULT);
        Cr3::write(pml4, Cr3Flags::empty());
        core::arch::asm!("wbinvd", options(nostack, preserves_flags));
    }
    LIMIT.store(limit, Ordering::Release);
    Some(report)
}

/// Fills the page directory for the GiB at `base` with 2 MiB pages (4 KiB for the first 2 MiB
/// when it is mixed).
fn fill_pd(pd: &mut Table, low_pt: &mut Table, base: u64, ram: &RamRanges, report: &mut Report) {
    for (i, entry) in pd.0.iter_mut().enumerate() {
        let pa = base + i as u64 * MIB2;
        let class = ram.classify(pa, pa + MIB2);
        if pa == 0 && class == Class::Mixed {
            for (j, pte) in low_pt.0.iter_mut().enumerate() {
                let pa4 = j as u64 * KIB4;
                *pte = pa4 | P | RW | memory_type(ram.classify(pa4, pa4 + KIB4));
            }
            *entry = table_address(low_pt) | P | RW;
            continue;
        }
        report.uc_granules += usize::from(class == Class::NoRam);
        *entry = pa | P | RW | PS | memory_type(class);
    }
}

/// The table at physical address `pa` among the ones this module owns (a page directory or a
/// 4 KiB page table).
fn table_at(t: &mut Tables, pa: u64) -> Option<&mut Table> {
    core::iter::once(&mut t.low_pt)
        .chain(t.pds.iter_mut())
        .chain(t.guard_pts.iter_mut())
        .find(|table| table_address(table) == pa)
}

/// Leaves the 4 KiB page at `va` (an identity-mapped image address below 4 GiB) unmapped, splitting
/// its 2 MiB page into 4 KiB pages first; the direct map shares these page directories, so the
/// page is unmapped there too (nothing but a stack overflow ever touches it). Returns whether it
/// worked: it cannot under a 1 GiB leaf or once the split tables run out.
fn unmap_guard(t: &mut Tables, va: u64, pts_used: &mut usize) -> bool {
    if va >= 4 * GIB || !va.is_multiple_of(KIB4) {
        return false;
    }
    let pdpte = t.identity_pdpt.0[(va / GIB) as usize];
    if pdpte & P == 0 || pdpte & PS != 0 {
        return false;
    }
    let pd_index = ((va / MIB2) % 512) as usize;
    let Some(pd) = table_at(t, pdpte & ADDR_4K) else {
        return false;
    };
    let pde = pd.0[pd_index];
    if pde & P == 0 {
        return false;
    }
    let pt_pa = if pde & PS != 0 {
        let Some(pt) = t.guard_pts.get_mut(*pts_used) else {
            return false;
        };
        *pts_used += 1;
        // Same frames, same memory type (PCD/PWT; the PAT bit is not used), 4 KiB at a time.
        let flags = pde & (P | RW | PWT | PCD);
        for (j, pte) in pt.0.iter_mut().enumerate() {
            *pte = ((pde & ADDR_2M) + j as u64 * KIB4) | flags;
        }
        let pt_pa = table_address(pt);
        if let Some(pd) = table_at(t, pdpte & ADDR_4K) {
            pd.0[pd_index] = pt_pa | P | RW;
        }
        pt_pa
    } else {
        pde & ADDR_4K
    };
    match table_at(t, pt_pa) {
        Some(pt) => {
            pt.0[((va / KIB4) % 512) as usize] = 0;
            true
        }
        None => false,
    }
}

/// After [`init`]: leaves the 4 KiB page at physical address `pa` (below 4 GiB) unmapped in both
/// the identity map and the direct map, splitting a 1 GiB or 2 MiB page that holds it into the
/// same translations one level down first. Used for the guard page under each secondary CPU's
/// stacks, before that CPU starts. Returns whether it worked (the split pools are bounded).
///
/// Splitting keeps every other translation identical (address, memory type, permissions), so a
/// CPU still holding the large-page TLB entry keeps accessing the same memory; only the guard
/// changes, and the CR3 reload flushes this CPU's entries (no global pages are used). Other CPUs
/// never touched a guard page that belongs to a CPU not yet started.
pub fn unmap_page(pa: u64) -> bool {
    if limit() == 0 || pa >= 4 * GIB || !pa.is_multiple_of(KIB4) {
        return false;
    }
    let mut split = SPLIT.lock();
    // SAFETY: `init` is over (limit != 0) and every later access to TABLES holds `SPLIT`, so
    // this is the only reference; the MMU reads the tables concurrently, which is why each
    // entry is written whole, after the table it points to is complete.
    let t = unsafe { &mut *TABLES.0.get() };
    let gib = (pa / GIB) as usize;
    let pdpte = t.identity_pdpt.0[gib];
    if pdpte & P == 0 {
        return false;
    }
    if pdpte & PS != 0 {
        let (_, pds_used) = *split;
        let Some(pd) = t.pds.get_mut(pds_used) else {
            return false;
        };
        let flags = pdpte & (P | RW | PWT | PCD);
        for (i, pde) in pd.0.iter_mut().enumerate() {
            *pde = ((pdpte & ADDR_4K & !(GIB - 1)) + i as u64 * MIB2) | flags | PS;
        }
        let pd_pa = table_address(pd);
        split.1 += 1;
        let xd = t.direct_pdpt.0[gib] & XD;
        t.identity_pdpt.0[gib] = pd_pa | P | RW;
        t.direct_pdpt.0[gib] = pd_pa | P | RW | xd;
    }
    let ok = unmap_guard(t, pa, &mut split.0);
    // SAFETY: reloading CR3 with its current value only flushes this CPU's non-global TLB
    // entries (SDM §4.10.4.1), so the entries changed above take effect here.
    unsafe {
        let (frame, flags) = Cr3::read();
        Cr3::write(frame, flags);
    }
    ok
}

/// Whether the live page tables map the virtual address `va` (a present translation at every
/// level): the check that a guard page really is unmapped, walked from CR3, not from any
/// bookkeeping.
pub fn is_mapped(va: u64) -> bool {
    let _lock = SPLIT.lock();
    let mut table = Cr3::read().0.start_address().as_u64();
    for level in (0..4).rev() {
        let index = ((va >> (12 + 9 * level)) & 511) as usize;
        if table >= 4 * GIB {
            return false;
        }
        // SAFETY: `table` comes from CR3 or a present non-leaf entry: one of this module's
        // tables, in the image below 4 GiB and identity-mapped; `SPLIT` is held, so nothing
        // writes the tables meanwhile. A volatile read creates no reference.
        let entry = unsafe { core::ptr::read_volatile((table as *const u64).add(index)) };
        if entry & P == 0 {
            return false;
        }
        if level == 0 || (level < 3 && entry & PS != 0) {
            return true;
        }
        table = entry & ADDR_4K;
    }
    true
}

/// The same PAT on a secondary CPU as [`init`] set on the boot CPU (IA32_PAT is per CPU).
pub fn init_secondary() {
    // SAFETY: as in `init`: the architectural default only pins down what PCD/PWT mean.
    unsafe { Msr::new(IA32_PAT).write(PAT_DEFAULT) };
}

/// The physical address of the hypervisor's PML4 (for secondary CPUs' CR3), 0 before [`init`].
pub fn root() -> u64 {
    if limit() == 0 {
        return 0;
    }
    // SAFETY: only the field's address is computed (`&raw`), in bounds of the static; no
    // reference to the tables is created.
    (unsafe { &raw const (*TABLES.0.get()).pml4 }) as u64
}

/// Physical address of a table: the image is identity-mapped, so its virtual address.
fn table_address(table: &Table) -> u64 {
    table as *const Table as u64
}

/// `pa` in the direct map, if the direct map covers it.
pub fn phys_to_virt(pa: u64) -> Option<usize> {
    (pa < limit()).then(|| DIRECT_MAP_BASE + pa as usize)
}

/// The physical address behind a direct-map address or an identity-mapped (image) address.
pub fn virt_to_phys(va: usize) -> Option<u64> {
    if va >= DIRECT_MAP_BASE {
        let pa = (va - DIRECT_MAP_BASE) as u64;
        (pa < limit()).then_some(pa)
    } else {
        let pa = va as u64;
        (pa < 4 * GIB).then_some(pa)
    }
}

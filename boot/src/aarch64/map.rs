//! The EL2 stage-1 identity map: descriptor encodings shared by the entry's boot table and the
//! kernel's `init_direct_map`, and a pure builder for the full map (host-tested).
//!
//! References are to the Arm Architecture Reference Manual for A-profile, DDI 0487 (section
//! titles are given too, since numbering moves between issues): chapter D8 "The AArch64 Virtual
//! Memory System Architecture" for the VMSAv8-64 descriptor formats and translation granules, and
//! the register descriptions of MAIR_EL2, TCR_EL2 and SCTLR_EL2 in chapter D24 (D17 in older
//! issues) "AArch64 System Register Descriptions".
//!
//! The map is an identity map (VA = PA) in the non-VHE EL2 translation regime, which has a single
//! VA range translated by TTBR0_EL2 (there is no TTBR1_EL2 unless HCR_EL2.E2H = 1). So there is no
//! separate "high half" for a direct map: the direct-map offset is 0, and everything the
//! hypervisor reaches (itself, RAM, MMIO) is reached at its physical address.

use crate::{BootInfo, MemoryKind};
use core::ops::Range;

/// 4 KiB translation granule.
pub const PAGE_SIZE: u64 = 1 << 12;
/// Entries in a translation table with the 4 KiB granule.
pub const ENTRIES: usize = 512;

// VMSAv8-64 descriptor fields (DDI 0487, D8 "Translation table descriptor formats").
/// Bit 0: the descriptor is valid.
pub const DESC_VALID: u64 = 1 << 0;
/// Bits \[1:0\] = 0b11 at levels 0-2: a table descriptor; at level 3: a page descriptor.
pub const DESC_TABLE: u64 = 0b11;
pub const DESC_PAGE: u64 = 0b11;
/// Bits \[1:0\] = 0b01 at levels 1-2: a block descriptor (1 GiB / 2 MiB with the 4 KiB granule).
pub const DESC_BLOCK: u64 = 0b01;
/// `AttrIndx[2:0]` (`bits[4:2]`) selects an attribute byte of MAIR_EL2.
pub const ATTR_INDEX_SHIFT: u64 = 2;
/// `AP[1]` (bit 6). In a translation regime with one Exception level (EL2 with E2H = 0) there is no
/// unprivileged access and `AP[1]` is RES1, so it is set. `AP[2]` (bit 7) = 0: read/write.
pub const AP1_RES1: u64 = 1 << 6;
/// `SH[1:0]` (`bits[9:8]`) = 0b11: Inner Shareable.
pub const SH_INNER: u64 = 0b11 << 8;
/// AF (bit 10): Access Flag set, so the first access does not fault (no hardware AF management).
pub const AF: u64 = 1 << 10;
/// XN (bit 54) for the EL2 regime: execute-never. Set on every Device mapping so that no
/// instruction fetch, speculative or not, is ever made to a device.
pub const XN: u64 = 1 << 54;
/// Output address `bits [47:12]` of a descriptor.
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;

/// MAIR_EL2 attribute index 0: Device-nGnRnE (0x00). Index 1: Normal memory, Inner and Outer
/// Write-Back Non-transient, Read- and Write-Allocate (0xff).
pub const MAIR_EL2: u64 = 0xff << 8;
pub const ATTR_DEVICE: u64 = 0;
pub const ATTR_NORMAL: u64 = 1;

/// Leaf attributes for RAM: Normal WB, Inner Shareable, RW, AF.
pub const NORMAL: u64 = (ATTR_NORMAL << ATTR_INDEX_SHIFT) | AP1_RES1 | SH_INNER | AF;
/// Leaf attributes for everything else: Device-nGnRnE, RW, AF, execute-never.
pub const DEVICE: u64 = (ATTR_DEVICE << ATTR_INDEX_SHIFT) | AP1_RES1 | SH_INNER | AF | XN;

/// TCR_EL2 (E2H = 0 layout) common fields: IRGN0 = ORGN0 = 0b01 (table walks Write-Back
/// Read/Write-Allocate cacheable, so they see tables written with the MMU on), SH0 = Inner
/// Shareable, TG0 = 4 KiB, and the RES1 bits 23 and 31. T0SZ and PS are added per use.
pub const TCR_EL2_BASE: u64 = (0b01 << 8) | (0b01 << 10) | (0b11 << 12) | (1 << 23) | (1 << 31);
/// TCR_EL2.PS, `bits[18:16]`: the physical address size, the same encoding as
/// ID_AA64MMFR0_EL1.PARange. The entry and `init_direct_map` copy PARange in, capped at 0b101
/// (48 bits): 52-bit output addresses need FEAT_LPA2 descriptors, which this map does not use.
pub const TCR_PS_SHIFT: u64 = 16;
pub const PARANGE_MAX: u64 = 0b101;
/// The boot map: T0SZ = 25, a 39-bit VA space whose walk starts at level 1 (512 × 1 GiB).
pub const BOOT_TCR_EL2: u64 = TCR_EL2_BASE | 25;
/// The full map: T0SZ = 16, a 48-bit VA space whose walk starts at level 0.
pub const TCR_EL2: u64 = TCR_EL2_BASE | 16;

/// SCTLR_EL2 (E2H = 0 layout): the RES1 bits (4, 5, 11, 16, 18, 22, 23, 28, 29) plus M (MMU on),
/// C (data caching), SA (SP alignment check) and I (instruction caching). EE = 0 (little-endian),
/// WXN = 0, A = 0 (unaligned Normal accesses allowed).
pub const SCTLR_EL2_RES1: u64 = 0x30c5_0830;
pub const SCTLR_EL2: u64 = SCTLR_EL2_RES1 | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 12);

/// CPTR_EL2 (E2H = 0 layout): TFP (bit 10) = 0 so FP/SIMD does not trap (the target uses NEON
/// for ordinary code); TZ (8) and TSM (12) = 1 keep SVE and SME trapped; bits 0-7, 9, 13 are RES1.
pub const CPTR_EL2: u64 = 0x33ff;

/// HCR_EL2 at entry: RW = 1 (EL1 is AArch64) and everything else 0, in particular E2H = 0 (the
/// non-VHE EL2 regime this map is written for) and TGE = 0.
pub const HCR_EL2: u64 = 1 << 31;

/// Size covered by one entry at `level` (0..=3) with the 4 KiB granule.
pub const fn level_size(level: usize) -> u64 {
    1 << (12 + 9 * (3 - level))
}

/// Memory the direct map always covers: QEMU `virt` puts its high PCIe ECAM at 0x40_1000_0000
/// and its high PCIe MMIO window up to 1 TiB.
pub const MIN_LIMIT: u64 = 1 << 40;

/// One translation table.
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct Table(pub [u64; ENTRIES]);

impl Table {
    pub const EMPTY: Table = Table([0; ENTRIES]);
}

/// Why the direct map could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// More distinct RAM ranges than the range buffer holds.
    TooManyRanges,
    /// The table pool ran out at `level` while covering address `at`.
    OutOfTables { level: usize, at: u64 },
    /// Part of the hypervisor image would not be mapped as Normal memory.
    ImageNotNormal,
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MapError::TooManyRanges => f.write_str("too many distinct RAM ranges"),
            MapError::OutOfTables { level, at } => {
                write!(
                    f,
                    "out of page-table pages for a level-{level} table at {at:#x}"
                )
            }
            MapError::ImageNotNormal => {
                f.write_str("the hypervisor image would not be Normal memory")
            }
        }
    }
}

/// Computes the ranges to map as Normal memory, sorted and disjoint, into `out`; returns how many.
///
/// Normal = (`Usable` shrunk to pages − `Reserved` grown to pages) ∪ `InUse` grown to pages.
/// Reservations are carved out because `/reserved-memory` nodes with `no-map` (secure-world
/// carve-outs, for example) must not be mapped cacheable: a speculative access could abort. They
/// stay mapped as Device, which permits no speculative access. `InUse` (the image, the DTB, boot
/// modules) wins over a reservation: a loader may `/memreserve/` the DTB or initrd it handed us.
pub fn normal_ranges(info: &BootInfo, out: &mut [Range<u64>]) -> Result<usize, MapError> {
    let mut n = 0;
    for r in info
        .memory_regions()
        .iter()
        .filter(|r| r.kind == MemoryKind::Usable)
    {
        let range = page_inward(r.start, r.end());
        if !range.is_empty() {
            *out.get_mut(n).ok_or(MapError::TooManyRanges)? = range;
            n += 1;
        }
    }
    n = sort_merge(&mut out[..n]);
    for r in info
        .memory_regions()
        .iter()
        .filter(|r| r.kind == MemoryKind::Reserved)
    {
        n = subtract(out, n, page_outward(r.start, r.end()))?;
    }
    for r in info
        .memory_regions()
        .iter()
        .filter(|r| r.kind == MemoryKind::InUse)
    {
        let range = page_outward(r.start, r.end());
        if !range.is_empty() {
            *out.get_mut(n).ok_or(MapError::TooManyRanges)? = range;
            n += 1;
        }
    }
    Ok(sort_merge(&mut out[..n]))
}

fn page_inward(start: u64, end: u64) -> Range<u64> {
    let start = start
        .checked_add(PAGE_SIZE - 1)
        .map_or(u64::MAX, |s| s & !(PAGE_SIZE - 1));
    start..(end & !(PAGE_SIZE - 1)).max(start)
}

fn page_outward(start: u64, end: u64) -> Range<u64> {
    let end = end
        .checked_add(PAGE_SIZE - 1)
        .map_or(!(PAGE_SIZE - 1), |e| e & !(PAGE_SIZE - 1));
    (start & !(PAGE_SIZE - 1))..end
}

/// Sorts by start and merges overlapping or touching ranges in place; returns the new length.
fn sort_merge(ranges: &mut [Range<u64>]) -> usize {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut n = 0;
    for i in 0..ranges.len() {
        let r = ranges[i].clone();
        if r.is_empty() {
            continue;
        }
        if n > 0 && r.start <= ranges[n - 1].end {
            ranges[n - 1].end = ranges[n - 1].end.max(r.end);
        } else {
            ranges[n] = r;
            n += 1;
        }
    }
    n
}

/// Removes `cut` from the sorted, disjoint `out[..n]`; returns the new length.
fn subtract(out: &mut [Range<u64>], mut n: usize, cut: Range<u64>) -> Result<usize, MapError> {
    if cut.is_empty() {
        return Ok(n);
    }
    let mut i = 0;
    while i < n {
        let r = out[i].clone();
        if r.end <= cut.start || r.start >= cut.end {
            i += 1;
            continue;
        }
        let (left, right) = (r.start..cut.start.max(r.start), cut.end.min(r.end)..r.end);
        match (left.is_empty(), right.is_empty()) {
            (true, true) => {
                out.copy_within_ranges(i + 1..n, i);
                n -= 1;
            }
            (false, true) => {
                out[i] = left;
                i += 1;
            }
            (true, false) => {
                out[i] = right;
                i += 1;
            }
            (false, false) => {
                if n == out.len() {
                    return Err(MapError::TooManyRanges);
                }
                out.copy_within_ranges(i + 1..n, i + 2);
                out[i] = left;
                out[i + 1] = right;
                n += 1;
                i += 2;
            }
        }
    }
    Ok(n)
}

/// `copy_within` for `Range`, which is not `Copy`.
trait CopyWithinRanges {
    fn copy_within_ranges(&mut self, src: Range<usize>, dest: usize);
}

impl CopyWithinRanges for [Range<u64>] {
    fn copy_within_ranges(&mut self, src: Range<usize>, dest: usize) {
        if dest < src.start {
            for (k, i) in src.enumerate() {
                self[dest + k] = self[i].clone();
            }
        } else {
            let len = src.len();
            for k in (0..len).rev() {
                self[dest + k] = self[src.start + k].clone();
            }
        }
    }
}

/// How much of the physical address space the direct map covers: at least [`MIN_LIMIT`], and all
/// RAM (rounded up to 1 GiB), but never beyond the CPU's physical address size (`pa_bits`, capped
/// at 48). Everything below the limit that is not Normal is mapped Device.
pub fn limit_for(normal: &[Range<u64>], pa_bits: u32) -> u64 {
    let pa_limit = 1u64 << pa_bits.clamp(32, 48);
    let gib = level_size(1);
    let ram_top = normal
        .last()
        .map_or(0, |r| r.end.div_ceil(gib).saturating_mul(gib));
    ram_top.max(MIN_LIMIT).min(pa_limit)
}

/// `ID_AA64MMFR0_EL1.PARange` → physical address bits (DDI 0487, ID_AA64MMFR0_EL1).
pub fn parange_bits(parange: u64) -> u32 {
    match parange & 0xf {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// What [`build`] produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    pub tables_used: usize,
    /// 2 MiB blocks that held both RAM and non-RAM but were mapped Device because the pool ran out
    /// of level-3 tables (correct, only slower).
    pub degraded_blocks: usize,
    pub normal_bytes: u64,
}

/// Builds a 4-level (T0SZ = 16) identity map of `[0, limit)` into `tables`, whose first table is
/// the level-0 root and whose physical address is `tables_pa` (table `i` is at `tables_pa +
/// i * 4096`). `normal` (sorted, disjoint, page-aligned) is mapped Normal, everything else Device.
/// The largest possible blocks are used: 1 GiB, then 2 MiB, then 4 KiB pages. `image` must come
/// out Normal in full.
pub fn build(
    normal: &[Range<u64>],
    limit: u64,
    image: Range<u64>,
    tables: &mut [Table],
    tables_pa: u64,
) -> Result<MapStats, MapError> {
    build_with_guards(normal, limit, image, &[], tables, tables_pa)
}

/// [`build`], leaving the 4 KiB pages at `guards` (page-aligned addresses, normally inside the
/// image: the guard page under each stack) unmapped, so that running off the end of a stack
/// faults instead of overwriting what lies below it.
pub fn build_with_guards(
    normal: &[Range<u64>],
    limit: u64,
    image: Range<u64>,
    guards: &[u64],
    tables: &mut [Table],
    tables_pa: u64,
) -> Result<MapStats, MapError> {
    let mut b = Builder {
        normal,
        limit,
        image,
        guards,
        pool: tables,
        pool_pa: tables_pa,
        used: 0,
        level3_budget: 0,
        level3_used: 0,
        image_reserve: 0,
        stats: MapStats::default(),
    };
    // Tables above level 3 are a must; count them first so that level-3 tables (a refinement,
    // which can fall back to Device blocks) only get what is left, wherever in the map they are.
    let gib = level_size(1);
    let level1 = limit.div_ceil(level_size(0)) as usize;
    let level2 = (0..limit.div_ceil(gib))
        .filter(|&i| b.classify(i * gib, (i + 1) * gib) == Class::Mixed)
        .count();
    let upper = 1 + level1 + level2;
    if upper > b.pool.len() {
        return Err(MapError::OutOfTables {
            level: if b.pool.is_empty() { 0 } else { 1 },
            at: 0,
        });
    }
    b.level3_budget = b.pool.len() - upper;
    // The image's own 2 MiB blocks must be Normal: keep level-3 tables for those that need one.
    let mib2 = level_size(2);
    let image_blocks = (b.image.start / mib2..b.image.end.div_ceil(mib2))
        .filter(|&i| b.classify(i * mib2, (i + 1) * mib2) == Class::Mixed)
        .count();
    if image_blocks > b.level3_budget {
        return Err(MapError::ImageNotNormal);
    }
    b.image_reserve = image_blocks;
    let root = b.alloc().ok_or(MapError::OutOfTables { level: 0, at: 0 })?;
    b.fill(root, 0, 0)?;
    b.stats.tables_used = b.used;
    Ok(b.stats)
}

struct Builder<'n, 't> {
    normal: &'n [Range<u64>],
    limit: u64,
    image: Range<u64>,
    guards: &'n [u64],
    pool: &'t mut [Table],
    pool_pa: u64,
    used: usize,
    level3_budget: usize,
    level3_used: usize,
    /// Level-3 tables held back for Mixed 2 MiB blocks of the image.
    image_reserve: usize,
    stats: MapStats,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Normal,
    Device,
    Mixed,
}

impl Builder<'_, '_> {
    fn classify(&self, start: u64, end: u64) -> Class {
        // A block holding a guard page must be split down to pages.
        if end - start > PAGE_SIZE && self.guards.iter().any(|&g| start <= g && g < end) {
            return Class::Mixed;
        }
        let i = self.normal.partition_point(|r| r.end <= start);
        match self.normal.get(i) {
            Some(r) if r.start <= start && r.end >= end => Class::Normal,
            Some(r) if r.start < end => Class::Mixed,
            _ => Class::Device,
        }
    }

    /// Takes a zeroed table (all entries invalid) from the pool; returns its index.
    fn alloc(&mut self) -> Option<usize> {
        let index = self.used;
        *self.pool.get_mut(index)? = Table::EMPTY;
        self.used += 1;
        Some(index)
    }

    /// A table for `level` covering `[start, end)`; level-3 tables only within their budget,
    /// part of which is kept for the image.
    fn alloc_for(&mut self, level: usize, start: u64, end: u64) -> Option<usize> {
        if level == 3 {
            let for_image = self.image.start < end && start < self.image.end;
            if for_image {
                self.image_reserve = self.image_reserve.saturating_sub(1);
            } else if self.level3_used + self.image_reserve >= self.level3_budget {
                return None;
            }
            self.level3_used += 1;
        }
        self.alloc()
    }

    /// Fills pool table `table`, which translates `[base, base + 512 * level_size(level))`.
    fn fill(&mut self, table: usize, level: usize, base: u64) -> Result<(), MapError> {
        let size = level_size(level);
        for i in 0..ENTRIES {
            let start = base + i as u64 * size;
            if start >= self.limit {
                break;
            }
            let end = start + size;
            let class = if level == 0 {
                Class::Mixed
            } else {
                self.classify(start, end)
            };
            let leaf = if level == 3 { DESC_PAGE } else { DESC_BLOCK };
            let desc = match (class, level) {
                // A guard page: invalid, so any access takes a translation fault.
                (_, 3) if self.guards.contains(&start) => 0,
                // Level 0 cannot hold blocks with the 4 KiB granule (without FEAT_LPA2).
                (Class::Normal, 1..=3) => {
                    self.stats.normal_bytes += size;
                    start | NORMAL | leaf
                }
                // Ranges are page-aligned, so a page is never really mixed.
                (Class::Device, 1..=3) | (Class::Mixed, 3) => start | DEVICE | leaf,
                _ => match self.alloc_for(level + 1, start, end) {
                    Some(child) => {
                        self.fill(child, level + 1, start)?;
                        (self.pool_pa + child as u64 * PAGE_SIZE) | DESC_TABLE
                    }
                    // Out of tables for a mixed 2 MiB block: Device is safe for RAM (only slow)
                    // unless the hypervisor runs from it.
                    None if level == 2 && !(self.image.start < end && start < self.image.end) => {
                        self.stats.degraded_blocks += 1;
                        start | DEVICE | DESC_BLOCK
                    }
                    None if level == 2 => return Err(MapError::ImageNotNormal),
                    None => {
                        return Err(MapError::OutOfTables {
                            level: level + 1,
                            at: start,
                        });
                    }
                },
            };
            self.pool[table].0[i] = desc;
        }
        Ok(())
    }
}

/// Walks a map built by [`build`] (or the boot map) the way the MMU would, for tests and for
/// diagnostics: returns the leaf descriptor and its level for `va`, or `None` when unmapped.
pub fn walk(tables: &[Table], tables_pa: u64, start_level: usize, va: u64) -> Option<(u64, usize)> {
    let mut table = tables.first()?;
    for level in start_level..=3 {
        let index = ((va >> (12 + 9 * (3 - level))) & 0x1ff) as usize;
        let desc = table.0[index];
        if desc & DESC_VALID == 0 {
            return None;
        }
        if level == 3 || desc & 0b11 == DESC_BLOCK {
            return Some((desc, level));
        }
        let next = (desc & OA_MASK).checked_sub(tables_pa)? / PAGE_SIZE;
        table = tables.get(usize::try_from(next).ok()?)?;
    }
    None
}

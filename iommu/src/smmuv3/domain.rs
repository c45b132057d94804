//! Domains: one IO address space on one SMMU. Stage 1 (a CD and VMSAv8-64 stage-1 tables, an
//! ASID), stage 2 (stage-2 tables, a VMID), or nested (stage 1 over a stage-2 parent).
//!
//! # Nested domains and the structure window
//!
//! Under nesting the SMMU reads the CD at STE.S1ContextPtr and walks the stage-1 tables at
//! CD.TTB0 with *intermediate* physical addresses, translated by stage 2 (IHI 0070 §3.3.3,
//! §5.2 S1ContextPtr, §3.4.2). This driver builds those structures itself, at physical
//! addresses from the caller's `TableMemory`, and makes them reachable the simple way: a
//! **structure window**, one naturally aligned block of [`UnitConfig::nested_window_pages`]
//! pages that the parent maps read-only at IPA == PA. It is created with the parent's first
//! nested domain and freed with the parent. Every nested domain over that parent takes its CD
//! page and all its stage-1 table pages from the window (a bitmap in the window's first page,
//! which is not mapped), so no later `map` on the nested domain ever needs the parent.
//!
//! Consequences, documented in `docs/smmuv3.md`: the window's IPA range must be free in the
//! parent (else `create_nested_domain` fails with an overlap); devices behind the parent, or
//! behind a nested domain whose stage 1 maps an IOVA to a window IPA, can read (never write)
//! the window; a nested domain's stage-1 tables can use at most the window's pages.
//!
//! [`UnitConfig::nested_window_pages`]: super::UnitConfig::nested_window_pages

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::ste::S2Fields;
use crate::pgtable::sync::PteAtomic;
use crate::pgtable::{
    ArmStage1, ArmStage2, Gather, MapError, MapOutput, PageTable, PhysAddr, Prot, TableMemory,
    Translation, UnmapError,
};

/// Which translation a domain provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1 only: IOVA → PA through a CD (STE.Config = 0b101).
    S1,
    /// Stage 2 only: IPA → PA (STE.Config = 0b110).
    S2,
    /// Stage 1 over a stage-2 parent: IOVA → IPA → PA (STE.Config = 0b111).
    Nested,
}

/// How to build a domain with [`create_domain`](super::SmmuUnit::create_domain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    pub stage: Stage,
    /// Input address bits (stage 1: IOVA, 25..=48, capped by IDR5.VAX; stage 2: IPA, 26..=48,
    /// capped by IDR5.OAS since a stage-2 input may not exceed the output size). A request
    /// above the cap gets the cap: addresses beyond it fault, as they would on the hardware.
    pub input_bits: u32,
}

impl DomainConfig {
    /// A stage-1 domain translating `input_bits`-bit IOVAs.
    pub const fn stage1(input_bits: u32) -> Self {
        DomainConfig {
            stage: Stage::S1,
            input_bits,
        }
    }

    /// A stage-2 domain translating `input_bits`-bit IPAs.
    pub const fn stage2(input_bits: u32) -> Self {
        DomainConfig {
            stage: Stage::S2,
            input_bits,
        }
    }
}

pub(crate) type S1Table = PageTable<ArmStage1<12>>;
pub(crate) type S2Table = PageTable<ArmStage2<12>>;

/// The structure window of a nested parent (see the module docs): `pages` pages at `base`,
/// page 0 holding the allocation bitmap (bit set = page in use; bit 0 is page 0 itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub base: u64,
    pub pages: u32,
}

impl Window {
    /// Largest window: its bitmap fills the first page.
    pub const MAX_PAGES: u32 = 4096 * 8;

    pub fn bytes(&self) -> usize {
        self.pages as usize * 4096
    }

    /// Packs into one word: the base is page aligned, log2(pages) fits in the low bits.
    pub fn pack(&self) -> u64 {
        self.base | self.pages.trailing_zeros() as u64
    }

    pub fn unpack(v: u64) -> Option<Window> {
        (v != 0).then(|| Window {
            base: v & !0xfff,
            pages: 1 << (v & 0xfff),
        })
    }

    /// Allocates a zeroed window of `pages` pages (a power of two, 2..=MAX_PAGES) and reserves
    /// its bitmap page.
    pub fn create<T: TableMemory>(mem: &T, pages: u32) -> Option<Window> {
        let base = mem.alloc_table(pages as usize * 4096)?;
        let w = Window { base, pages };
        w.bitmap(mem)[0].fetch_or(1, Ordering::Relaxed);
        Some(w)
    }

    fn bitmap<'m, T: TableMemory>(&self, mem: &'m T) -> &'m [T::Entry] {
        mem.table(self.base, (self.pages as usize).div_ceil(64))
    }

    /// A zeroed page of the window, or `None` when the window is full. Lock-free: a bit is
    /// claimed with a compare-and-swap, and a failed one means another CPU claimed a bit, so the
    /// retries are bounded by the window's size.
    pub fn alloc_page<T: TableMemory>(&self, mem: &T) -> Option<u64> {
        let words = self.bitmap(mem);
        let mut tries = self.pages as usize * 2;
        for (i, w) in words.iter().enumerate() {
            loop {
                // Relaxed: the bitmap guards nothing by itself; the page is published by the
                // engine's release CAS.
                let cur = w.load(Ordering::Relaxed);
                if cur == u64::MAX {
                    break;
                }
                let bit = (!cur).trailing_zeros();
                let page = i as u32 * 64 + bit;
                if page >= self.pages {
                    return None;
                }
                if w.compare_exchange(cur, cur | 1 << bit, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    let pa = self.base + page as u64 * 4096;
                    for e in mem.table(pa, 512) {
                        e.store(0, Ordering::Relaxed);
                    }
                    return Some(pa);
                }
                tries = tries.checked_sub(1)?;
            }
        }
        None
    }

    pub fn free_page<T: TableMemory>(&self, mem: &T, pa: u64) {
        let page = ((pa - self.base) / 4096) as u32;
        debug_assert!(page != 0 && page < self.pages);
        self.bitmap(mem)[page as usize / 64].fetch_and(!(1 << (page % 64)), Ordering::Relaxed);
    }

    /// Pages in use, the bitmap page included.
    #[cfg(test)]
    pub fn used_pages<T: TableMemory>(&self, mem: &T) -> u32 {
        self.bitmap(mem)
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }
}

/// A nested domain's view of memory: table pages come from (and go back to) the structure
/// window; everything else goes to the caller's `TableMemory`.
///
/// `retire_table` frees at once, without the grace period the `TableMemory` contract asks
/// for: the window has no deferred-free list. Under the engine's disjoint-range contract no CPU
/// walks an unlinked table, so this only matters to a caller that races overlapping unmaps on
/// one nested domain (see `docs/smmuv3.md`).
pub(crate) struct WindowMem<'a, T> {
    pub mem: &'a T,
    pub window: Window,
}

impl<T: TableMemory> TableMemory for WindowMem<'_, T> {
    type Entry = T::Entry;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        // Stage-1 tables with the 4 KiB granule are single pages (no concatenated roots).
        if bytes != 4096 {
            return None;
        }
        self.window.alloc_page(self.mem)
    }

    fn free_table(&self, pa: PhysAddr, _bytes: usize) {
        self.window.free_page(self.mem, pa);
    }

    fn retire_table(&self, pa: PhysAddr, _bytes: usize) {
        self.window.free_page(self.mem, pa);
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[Self::Entry] {
        self.mem.table(pa, entries)
    }

    fn clean(&self, pa: PhysAddr, bytes: usize) {
        self.mem.clean(pa, bytes);
    }
}

/// The parts of a domain that depend on its stage.
pub(crate) enum Kind {
    S1 {
        table: S1Table,
        /// The page holding the domain's one CD.
        cd: u64,
        asid: u16,
    },
    S2 {
        table: S2Table,
        s2: S2Fields,
        /// The structure window for nested domains ([`Window::pack`]), 0 until the first one.
        window: AtomicU64,
        /// A nested domain was ever created over this one: stage-2 invalidations must also
        /// reach combined stage-1+2 TLB entries.
        nested_parent: AtomicBool,
    },
    Nested {
        table: S1Table,
        cd: u64,
        asid: u16,
        /// The parent's stage-2 fields (VMID, tables), copied into the STE.
        parent: S2Fields,
        window: Window,
    },
}

/// One IO address space on one SMMU.
///
/// Created by [`SmmuUnit::create_domain`](super::SmmuUnit::create_domain) or
/// [`create_nested_domain`](super::SmmuUnit::create_nested_domain), destroyed by
/// [`destroy_domain`](super::SmmuUnit::destroy_domain). Dropping a `Domain` leaks its tables,
/// CD and ASID/VMID, which is safe (a stream still pointing at it keeps translating through
/// intact tables) but wasteful.
pub struct Domain {
    /// The owning SMMU, identified by its stream table's address.
    pub(crate) unit: u64,
    pub(crate) kind: Kind,
}

impl Domain {
    pub fn stage(&self) -> Stage {
        match self.kind {
            Kind::S1 { .. } => Stage::S1,
            Kind::S2 { .. } => Stage::S2,
            Kind::Nested { .. } => Stage::Nested,
        }
    }

    /// The ASID tagging the domain's stage-1 TLB entries (stage 1 and nested).
    pub fn asid(&self) -> Option<u16> {
        match self.kind {
            Kind::S1 { asid, .. } | Kind::Nested { asid, .. } => Some(asid),
            Kind::S2 { .. } => None,
        }
    }

    /// The VMID: the domain's own (stage 2), the parent's (nested), or 0 (stage 1).
    pub fn vmid(&self) -> u16 {
        match &self.kind {
            Kind::S1 { .. } => 0,
            Kind::S2 { s2, .. } => s2.vmid,
            Kind::Nested { parent, .. } => parent.vmid,
        }
    }

    /// Input address bits of the domain's own table.
    pub fn input_bits(&self) -> u32 {
        match &self.kind {
            Kind::S1 { table, .. } | Kind::Nested { table, .. } => table.geometry().ias,
            Kind::S2 { table, .. } => table.geometry().ias,
        }
    }

    /// Output address bits of the domain's own table (nested: the parent's IPA size).
    pub fn output_bits(&self) -> u32 {
        match &self.kind {
            Kind::S1 { table, .. } | Kind::Nested { table, .. } => table.geometry().oas,
            Kind::S2 { table, .. } => table.geometry().oas,
        }
    }

    /// Levels of the domain's own table.
    pub fn levels(&self) -> u32 {
        match &self.kind {
            Kind::S1 { table, .. } | Kind::Nested { table, .. } => table.geometry().levels,
            Kind::S2 { table, .. } => table.geometry().levels,
        }
    }

    /// Physical address of the domain's own table root (CD.TTB0 or STE.S2TTB).
    pub fn root(&self) -> PhysAddr {
        match &self.kind {
            Kind::S1 { table, .. } | Kind::Nested { table, .. } => table.root(),
            Kind::S2 { table, .. } => table.root(),
        }
    }

    /// Physical address of the domain's CD (stage 1 and nested).
    pub fn cd(&self) -> Option<u64> {
        match self.kind {
            Kind::S1 { cd, .. } | Kind::Nested { cd, .. } => Some(cd),
            Kind::S2 { .. } => None,
        }
    }

    pub(crate) fn check_unit(&self, unit: u64) -> Result<(), super::SmmuError> {
        if self.unit == unit {
            Ok(())
        } else {
            Err(super::SmmuError::ForeignDomain)
        }
    }

    /// Maps `[iova, iova + len)` to `out`: one physical range, or the runs of a
    /// [`RunSource`](crate::pgtable::RunSource).
    pub(crate) fn map<T: TableMemory, O: MapOutput>(
        &self,
        mem: &T,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        // Stage-1 leaves must stay ASID-tagged (nG = 1): the driver invalidates by ASID, which
        // does not reach global entries.
        let s1prot = prot - Prot::GLOBAL;
        match &self.kind {
            Kind::S1 { table, .. } => out.map_into(table, mem, iova, len, s1prot),
            Kind::Nested { table, window, .. } => {
                let wm = WindowMem {
                    mem,
                    window: *window,
                };
                out.map_into(table, &wm, iova, len, s1prot)
            }
            Kind::S2 { table, .. } => out.map_into(table, mem, iova, len, prot),
        }
    }

    pub(crate) fn unmap<T: TableMemory>(
        &self,
        mem: &T,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        match &self.kind {
            Kind::S1 { table, .. } => table.unmap(mem, iova, len, gather),
            Kind::Nested { table, window, .. } => {
                let wm = WindowMem {
                    mem,
                    window: *window,
                };
                table.unmap(&wm, iova, len, gather)
            }
            Kind::S2 { table, .. } => table.unmap(mem, iova, len, gather),
        }
    }

    /// Completes a gather filled by [`unmap`](Self::unmap): unlinked table pages go back to
    /// where they came from.
    pub(crate) fn complete<T: TableMemory>(&self, mem: &T, gather: &mut Gather) {
        match &self.kind {
            Kind::Nested { window, .. } => gather.complete(&WindowMem {
                mem,
                window: *window,
            }),
            _ => gather.complete(mem),
        }
    }

    pub(crate) fn translate<T: TableMemory>(&self, mem: &T, iova: u64) -> Option<Translation> {
        match &self.kind {
            Kind::S1 { table, .. } | Kind::Nested { table, .. } => table.translate(mem, iova),
            Kind::S2 { table, .. } => table.translate(mem, iova),
        }
    }
}

impl core::fmt::Debug for Domain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Domain")
            .field("stage", &self.stage())
            .field("asid", &self.asid())
            .field("vmid", &self.vmid())
            .field("input_bits", &self.input_bits())
            .field("root", &format_args!("{:#x}", self.root()))
            .finish()
    }
}

//! The page-table engine: one algorithm for every [`Format`].
//!
//! Every operation is a recursive walk over the part of the tree its IOVA range covers, visiting
//! each table once per call (a 256-page map touches the root-to-leaf path once, then runs along
//! one leaf table), so batched calls cost close to the entry writes themselves.

use super::format::{Concurrency, Config, Format, Geometry};
use super::gather::Gather;
use super::mem::TableMemory;
use super::sync::{
    AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
    PteAtomic,
};
use super::{ConfigError, IovaRange, MapError, PhysAddr, Prot, UnmapError};
use core::fmt;
use core::marker::PhantomData;

/// One IO page table of format `F`.
///
/// The table holds the physical address of its root and its configuration; the table pages
/// themselves live in the [`TableMemory`] passed to each call, which must be the same pool (or a
/// per-CPU view of the same pool) every time. Share it between CPUs by reference: every operation
/// takes `&self` (see the concurrency contract in the [module docs](super)).
///
/// Dropping a `PageTable` leaks its pages; call [`destroy`](Self::destroy).
pub struct PageTable<F: Format> {
    root: PhysAddr,
    geo: Geometry,
    cfg: Config,
    /// Bit `l`: leaves may be placed at level `l` (format ∩ hardware).
    leaf_levels: u32,
    /// Bit `l`: contiguous runs are used at level `l`.
    cont_levels: u32,
    /// Largest leaf span (superpage × contiguous run), for the unmap boundary check.
    max_leaf_span: u64,
    /// Index mask (entries − 1) per level; 8 slots so that `level & 7` needs no bounds check.
    masks: [usize; 8],
    /// Table pages linked into the tree, root included. Touched only when a table is installed or
    /// unlinked, never per leaf, so CPUs mapping disjoint ranges do not share a hot cache line.
    tables: AtomicUsize,
    _format: PhantomData<fn() -> F>,
}

/// The result of a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output address of the looked-up IOVA (not of the page).
    pub pa: PhysAddr,
    /// Level of the leaf (0 = granule).
    pub level: u32,
    /// Size of the leaf entry.
    pub page_size: u64,
    /// IOVA range of the leaf as an unmap sees it: the entry, or its whole contiguous run.
    pub leaf: IovaRange,
    /// The raw leaf descriptor.
    pub pte: u64,
}

/// What a table contains, by level (index = level, 0 = granule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Table pages at each level (the root counts once, at the top level, even if concatenated).
    pub tables: [usize; 5],
    /// Leaf entries at each level.
    pub leaves: [u64; 5],
    /// Of those, leaf entries carrying the contiguous hint.
    pub contiguous: [u64; 5],
    /// Bytes mapped.
    pub mapped: u64,
}

impl Census {
    /// Table pages in the tree, root included.
    pub fn table_pages(&self) -> usize {
        self.tables.iter().sum()
    }
}

/// How to point the hardware at a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootInfo {
    /// Physical address of the root (VT-d SLPTPTR / FLPTPTR, Arm TTB / S2TTB).
    pub pa: PhysAddr,
    pub levels: u32,
    pub root_entries: usize,
    pub root_bytes: usize,
    pub granule_shift: u32,
    pub ias: u32,
    pub oas: u32,
}

impl RootInfo {
    /// VT-d context-entry AW / PASID-entry AW field: 1 = 3 levels, 2 = 4 levels, 3 = 5 levels.
    pub fn vtd_aw(&self) -> u32 {
        self.levels.saturating_sub(2)
    }
    /// Arm initial lookup level (architectural numbering, 0..=3).
    pub fn arm_start_level(&self) -> u32 {
        4 - self.levels
    }
    /// Arm TnSZ (CD.T0SZ, STE.S2T0SZ, VTCR_EL2.T0SZ).
    pub fn arm_t0sz(&self) -> u32 {
        64 - self.ias
    }
    /// Arm stage-2 SL0 encoding for the initial lookup level (STE.S2SL0, VTCR_EL2.SL0), or `None`
    /// if the level needs FEAT_TTST / FEAT_LPA2 encodings.
    pub fn arm_sl0(&self) -> Option<u32> {
        let start = self.arm_start_level();
        match self.granule_shift {
            12 => 2u32.checked_sub(start),
            14 | 16 => 3u32.checked_sub(start).filter(|_| start >= 1),
            _ => None,
        }
    }
    /// Number of granule-sized tables concatenated at the root (1 when not concatenated).
    pub fn concatenated_tables(&self) -> usize {
        (self.root_bytes >> self.granule_shift).max(1)
    }
}

/// Leaf descriptors minus the output address, computed once per `map` call.
struct Templates {
    page: u64,
    block: u64,
}

#[derive(Clone, Copy)]
enum FailKind {
    Overlap,
    NoMemory,
    /// The run source failed at this IOVA (which, inside a private subtree, is not `Fail::at`).
    BadRun(u64),
}

/// A map stopped at `at`: everything in `[start, at)` was installed by this call.
#[derive(Clone, Copy)]
struct Fail {
    at: u64,
    kind: FailKind,
}

/// Accounting of one unmap walk.
struct UnmapState {
    /// The request, for the split check.
    start: u64,
    end: u64,
    /// Rolling back a failed map: clear leaves only, no split check, keep tables.
    rollback: bool,
    bytes: u64,
    leaves: u64,
    min_shift: u32,
    /// Hull of what was actually cleared or unlinked.
    lo: u64,
    hi: u64,
}

impl UnmapState {
    fn new(start: u64, end: u64, rollback: bool) -> Self {
        UnmapState {
            start,
            end,
            rollback,
            bytes: 0,
            leaves: 0,
            min_shift: u32::MAX,
            lo: u64::MAX,
            hi: 0,
        }
    }
    #[inline(always)]
    fn cover(&mut self, start: u64, end: u64) {
        self.lo = self.lo.min(start);
        self.hi = self.hi.max(end);
    }
    #[inline(always)]
    fn leaf(&mut self, shift: u32) {
        self.leaves += 1;
        self.bytes += 1 << shift;
        self.min_shift = self.min_shift.min(shift);
    }
    fn into_gather(self, g: &mut Gather) -> u64 {
        g.add_range(self.lo, self.hi);
        if self.leaves != 0 {
            g.add_leaves(self.leaves, self.min_shift);
        }
        self.bytes
    }
}

/// Where [`PageTable::map_runs`] takes its output addresses from: the physical runs behind
/// `[iova, iova + len)`, in order (a guest range whose host pages are scattered).
pub trait RunSource {
    /// The run that maps the call's range from byte `off` on: `Some((pa, bytes))` says
    /// `[iova + off, iova + off + bytes)` goes to `[pa, pa + bytes)` (`bytes` may reach past the
    /// range's end; the engine stops there). `None` stops the map with [`MapError::BadRun`].
    ///
    /// The engine asks at increasing offsets, each one where the previous run ended, except
    /// after losing a race to publish a new table, when it asks again from an earlier offset:
    /// the same offset must get the same answer.
    fn run_at(&mut self, off: u64) -> Option<(PhysAddr, u64)>;
}

/// What a map writes the range to: one physical range (`PhysAddr`, [`PageTable::map`]) or a
/// [`RunSource`] ([`PageTable::map_runs`]). Lets a driver's map take either without writing its
/// per-format dispatch twice; the one-range case compiles to a plain `map`.
pub trait MapOutput {
    fn map_into<F: Format, M: TableMemory>(
        self,
        table: &PageTable<F>,
        mem: &M,
        iova: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError>;
}

impl MapOutput for PhysAddr {
    #[inline(always)]
    fn map_into<F: Format, M: TableMemory>(
        self,
        table: &PageTable<F>,
        mem: &M,
        iova: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        table.map(mem, iova, self, len, prot)
    }
}

impl<S: RunSource + ?Sized> MapOutput for &mut S {
    #[inline(always)]
    fn map_into<F: Format, M: TableMemory>(
        self,
        table: &PageTable<F>,
        mem: &M,
        iova: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        table.map_runs(mem, iova, len, self, prot)
    }
}

/// One physical range as a run source: what [`PageTable::map`] walks with.
struct OneRun {
    pa: PhysAddr,
    len: u64,
}

impl RunSource for OneRun {
    #[inline(always)]
    fn run_at(&mut self, off: u64) -> Option<(PhysAddr, u64)> {
        Some((self.pa + off, self.len - off))
    }
}

/// A map walk's position in its output: the run under the walk's current IOVA.
///
/// Every level of the walk shares one `Runs`, so a run ending inside a leaf table is followed
/// by the next one in the same table, with no new walk from the root.
struct Runs<'s, S: ?Sized> {
    src: &'s mut S,
    /// The call's first IOVA (offsets for `src` count from here) and end.
    base: u64,
    end: u64,
    granule_mask: u64,
    /// Output addresses must stay below this (the output size).
    oa_limit: u64,
    /// Output address of the walk's current IOVA.
    pa: PhysAddr,
    /// Where the current run ends; the walk fetches the next run when it gets there.
    run_end: u64,
}

impl<S: RunSource + ?Sized> Runs<'_, S> {
    /// Makes `pa` valid for `iova`, fetching the next run if the current one ended there.
    #[inline(always)]
    fn at(&mut self, iova: u64) -> Result<(), Fail> {
        if iova == self.run_end {
            self.next(iova)
        } else {
            Ok(())
        }
    }

    /// Fetches and checks the run starting at `iova`.
    #[inline(always)]
    fn next(&mut self, iova: u64) -> Result<(), Fail> {
        let bad = Fail {
            at: iova,
            kind: FailKind::BadRun(iova),
        };
        let (pa, bytes) = self.src.run_at(iova - self.base).ok_or(bad)?;
        let bytes = bytes.min(self.end - iova);
        if bytes == 0
            || (pa | bytes) & self.granule_mask != 0
            || pa.checked_add(bytes).is_none_or(|e| e > self.oa_limit)
        {
            return Err(bad);
        }
        self.pa = pa;
        self.run_end = iova + bytes;
        Ok(())
    }
}

impl<F: Format> PageTable<F> {
    /// Creates an empty table: validates `cfg` against the format, allocates the root.
    pub fn new<M: TableMemory>(mem: &M, cfg: Config) -> Result<Self, ConfigError> {
        let geo = F::geometry(&cfg)?;
        let mut leaf_levels = 1u32;
        let mut cont_levels = 0u32;
        let mut max_leaf_span = 1u64 << F::GRANULE_SHIFT;
        for level in 0..geo.levels {
            let shift = Self::shift(level);
            let allowed = level == 0
                || (F::LEAF_LEVELS & (1 << level) != 0 && cfg.leaf_sizes & (1u64 << shift) != 0);
            if !allowed {
                continue;
            }
            leaf_levels |= 1 << level;
            let mut span = 1u64 << shift;
            let run = F::contiguous_entries(level);
            let entries = if level == geo.levels - 1 {
                geo.root_entries
            } else {
                1 << F::BITS_PER_LEVEL
            };
            if cfg.contiguous_hint && run > 1 && run <= entries {
                cont_levels |= 1 << level;
                span *= run as u64;
            }
            max_leaf_span = max_leaf_span.max(span);
        }
        let mut masks = [0usize; 8];
        for (level, m) in masks.iter_mut().enumerate().take(geo.levels as usize) {
            *m = if level as u32 == geo.levels - 1 {
                geo.root_entries - 1
            } else {
                (1 << F::BITS_PER_LEVEL) - 1
            };
        }
        let root = mem
            .alloc_table(geo.root_bytes)
            .ok_or(ConfigError::NoMemory)?;
        if !cfg.coherent {
            mem.clean(root, geo.root_bytes);
        }
        Ok(PageTable {
            root,
            geo,
            cfg,
            leaf_levels,
            cont_levels,
            max_leaf_span,
            masks,
            tables: AtomicUsize::new(1),
            _format: PhantomData,
        })
    }

    pub fn root(&self) -> PhysAddr {
        self.root
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Leaf sizes this table will use (bit `n` = 2^n bytes), contiguous runs not included.
    pub fn leaf_sizes(&self) -> u64 {
        (0..self.geo.levels)
            .filter(|l| self.leaf_levels & (1 << l) != 0)
            .fold(0, |acc, l| acc | 1u64 << Self::shift(l))
    }
    /// Everything a driver needs to point the hardware at this table.
    pub fn root_info(&self) -> RootInfo {
        RootInfo {
            pa: self.root,
            levels: self.geo.levels,
            root_entries: self.geo.root_entries,
            root_bytes: self.geo.root_bytes,
            granule_shift: F::GRANULE_SHIFT,
            ias: self.geo.ias,
            oas: self.geo.oas,
        }
    }
    /// Table pages currently linked into the tree, root included.
    pub fn table_pages(&self) -> usize {
        // Relaxed: a statistic.
        self.tables.load(Relaxed)
    }

    #[inline(always)]
    const fn shift(level: u32) -> u32 {
        F::GRANULE_SHIFT + level * F::BITS_PER_LEVEL
    }
    #[inline(always)]
    fn top(&self) -> u32 {
        self.geo.levels - 1
    }
    #[inline(always)]
    fn entries_at(&self, level: u32) -> usize {
        self.masks[(level & 7) as usize] + 1
    }
    #[inline(always)]
    fn table<'m, M: TableMemory>(&self, mem: &'m M, pa: PhysAddr, level: u32) -> &'m [M::Entry] {
        let n = self.entries_at(level);
        // Re-slicing to the exact length lets the compiler drop the bounds checks on indices that
        // were masked with `n - 1`.
        &mem.table(pa, n)[..n]
    }
    #[inline(always)]
    fn index(&self, iova: u64, level: u32) -> usize {
        (iova >> Self::shift(level)) as usize & self.masks[(level & 7) as usize]
    }
    #[inline(always)]
    fn input_limit(&self) -> u64 {
        1u64 << self.geo.ias
    }
    #[inline(always)]
    fn clean_entries<M: TableMemory>(&self, mem: &M, table: PhysAddr, first: usize, count: usize) {
        if !self.cfg.coherent && count != 0 {
            mem.clean(table + first as u64 * 8, count * 8);
        }
    }

    // ---------------------------------------------------------------------------------------
    // map
    // ---------------------------------------------------------------------------------------

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` with `prot`, using at each point the largest
    /// leaf that the alignment of `iova` and `pa`, the remaining length, the format and the
    /// hardware allow, and the Arm contiguous hint on runs of 16 (or 32/128) such leaves.
    ///
    /// Fails without changing any translation if any part of the range is mapped (see
    /// [`MapError`] for the rolled-back range a failure may report). A slot holding an empty table
    /// left by an earlier partial unmap is reused as a table: the span is then mapped with
    /// smaller leaves.
    pub fn map<M: TableMemory>(
        &self,
        mem: &M,
        iova: u64,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let granule_mask = (1u64 << F::GRANULE_SHIFT) - 1;
        if len == 0 || (iova | pa | len) & granule_mask != 0 {
            return Err(MapError::Misaligned);
        }
        let end = iova.checked_add(len).ok_or(MapError::OutOfRange)?;
        let pa_end = pa.checked_add(len).ok_or(MapError::OutOfRange)?;
        if end > self.input_limit() || pa_end > 1u64 << self.geo.oas {
            return Err(MapError::OutOfRange);
        }
        if len == granule_mask + 1 {
            return self.map_one(mem, iova, pa, prot);
        }
        // One run, checked above: the walk never asks for another.
        let mut one = OneRun { pa, len };
        let mut runs = self.runs(&mut one, iova, end);
        runs.pa = pa;
        runs.run_end = end;
        self.map_walk(mem, iova, end, &mut runs, prot)
    }

    /// Maps `[iova, iova + len)` with `prot` to the physical runs `src` gives (see
    /// [`RunSource`]), in one walk: as [`map`](Self::map) does for one run, each point gets the
    /// largest leaf the alignment of `iova` and of the run's address and the run's remaining
    /// length allow (a 2 MiB-aligned run of 2 MiB still gets a 2 MiB leaf), and a run that ends
    /// inside a leaf table is followed by the next one in the same table, with no new walk from
    /// the root. Runs of single granules cost one leaf entry each plus the call to `src`.
    ///
    /// Fails as `map` does, and with [`MapError::BadRun`] at the first run `src` refuses or that
    /// is unusable; a failure removes everything this call installed (its `rolled_back`).
    pub fn map_runs<M: TableMemory, S: RunSource + ?Sized>(
        &self,
        mem: &M,
        iova: u64,
        len: u64,
        src: &mut S,
        prot: Prot,
    ) -> Result<(), MapError> {
        let granule_mask = (1u64 << F::GRANULE_SHIFT) - 1;
        if len == 0 || (iova | len) & granule_mask != 0 {
            return Err(MapError::Misaligned);
        }
        let end = iova
            .checked_add(len)
            .filter(|&e| e <= self.input_limit())
            .ok_or(MapError::OutOfRange)?;
        let mut runs = self.runs(src, iova, end);
        if runs.next(iova).is_err() {
            return Err(MapError::BadRun {
                iova,
                rolled_back: IovaRange {
                    start: iova,
                    end: iova,
                },
            });
        }
        if len == granule_mask + 1 {
            return self.map_one(mem, iova, runs.pa, prot);
        }
        self.map_walk(mem, iova, end, &mut runs, prot)
    }

    /// A cursor over `src` for a map of `[iova, end)`, before its first run.
    #[inline(always)]
    fn runs<'s, S: ?Sized>(&self, src: &'s mut S, iova: u64, end: u64) -> Runs<'s, S> {
        Runs {
            src,
            base: iova,
            end,
            granule_mask: (1u64 << F::GRANULE_SHIFT) - 1,
            oa_limit: 1u64 << self.geo.oas,
            pa: 0,
            run_end: iova,
        }
    }

    /// The recursive walk of `map` and `map_runs`, and the rollback of a failed one.
    fn map_walk<M: TableMemory, S: RunSource + ?Sized>(
        &self,
        mem: &M,
        iova: u64,
        end: u64,
        runs: &mut Runs<'_, S>,
        prot: Prot,
    ) -> Result<(), MapError> {
        let t = Templates {
            page: F::leaf_template(prot, &self.cfg, false)?,
            block: if self.leaf_levels > 1 {
                F::leaf_template(prot, &self.cfg, true)?
            } else {
                0
            },
        };
        match self.map_level(mem, &t, self.root, self.top(), iova, end, runs, false) {
            Ok(_) => Ok(()),
            Err(fail) => {
                let rolled_back = IovaRange {
                    start: iova,
                    end: fail.at,
                };
                if fail.at > iova {
                    self.rollback(mem, iova, fail.at);
                }
                Err(match fail.kind {
                    FailKind::Overlap => MapError::Overlap {
                        iova: fail.at,
                        rolled_back,
                    },
                    FailKind::NoMemory => MapError::NoMemory { rolled_back },
                    FailKind::BadRun(at) => MapError::BadRun {
                        iova: at,
                        rolled_back,
                    },
                })
            }
        }
    }
    /// One granule: the hypercall-sized case, walked iteratively with no per-level call frame.
    #[inline]
    fn map_one<M: TableMemory>(
        &self,
        mem: &M,
        iova: u64,
        pa: PhysAddr,
        prot: Prot,
    ) -> Result<(), MapError> {
        let page = F::leaf_template(prot, &self.cfg, false)?;
        let none = IovaRange {
            start: iova,
            end: iova,
        };
        let mut table = self.root;
        let mut level = self.top();
        while level > 0 {
            let tbl = self.table(mem, table, level);
            let i = self.index(iova, level);
            table = self
                .child_for_map(mem, table, tbl, level, i, iova)
                .map_err(|f| match f.kind {
                    FailKind::Overlap => MapError::Overlap {
                        iova,
                        rolled_back: none,
                    },
                    // `child_for_map` takes no run.
                    FailKind::NoMemory | FailKind::BadRun(_) => {
                        MapError::NoMemory { rolled_back: none }
                    }
                })?;
            level -= 1;
        }
        let tbl = self.table(mem, table, 0);
        let i = self.index(iova, 0);
        match self.put_run(&tbl[i..i + 1], page, pa, F::GRANULE_SHIFT) {
            Ok(()) => {
                self.clean_entries(mem, table, i, 1);
                Ok(())
            }
            Err(_) => Err(MapError::Overlap {
                iova,
                rolled_back: none,
            }),
        }
    }

    /// Maps `[iova, end)` → the output `runs` stands at, within the table at `table` (level
    /// `level`); `runs` moves along (fetching runs as it reaches their ends).
    ///
    /// `private`: the table is not published yet (this call allocated it and nobody else can
    /// reach it), so its entries are written with plain stores and nothing can race. Returns the
    /// number of private tables created below `table` and not yet counted in `self.tables`.
    #[allow(clippy::too_many_arguments)]
    fn map_level<M: TableMemory, S: RunSource + ?Sized>(
        &self,
        mem: &M,
        t: &Templates,
        table: PhysAddr,
        level: u32,
        mut iova: u64,
        end: u64,
        runs: &mut Runs<'_, S>,
        private: bool,
    ) -> Result<usize, Fail> {
        let tbl = self.table(mem, table, level);
        let n = tbl.len();
        let shift = Self::shift(level);
        let size = 1u64 << shift;
        let leaf_ok = self.leaf_levels & (1 << level) != 0;
        let mut i = self.index(iova, level);
        let mut new_tables = 0;
        // Leaves `dirty..i` of a published table are written and not cleaned yet: cleaned in one
        // call per stretch (before a descent, and at the end), so many short runs side by side
        // cost one clean per cache line, not one per run.
        let mut dirty = i;
        let result = loop {
            if iova >= end {
                break Ok(());
            }
            if let Err(f) = runs.at(iova) {
                break Err(f);
            }
            let entry_end = (iova | (size - 1)) + 1;
            let run_end = runs.run_end.min(end);
            if leaf_ok && (iova | runs.pa) & (size - 1) == 0 && run_end >= entry_end {
                // Whole entries of one run, all of which can be leaves: the output advances by
                // `size` along with `iova`, so the alignment holds for every one of them.
                let count = (((run_end - iova) >> shift) as usize).min(n - i);
                let r = self.install_leaves(mem, t, tbl, level, i, count, iova, runs, private);
                i += count;
                if let Err(f) = r {
                    break Err(f);
                }
                iova += (count as u64) << shift;
            } else {
                // Level 0 always takes the branch above: runs are granule-aligned.
                debug_assert!(level > 0);
                if !private {
                    self.clean_entries(mem, table, dirty, i - dirty);
                }
                let chunk_end = end.min(entry_end);
                match self.map_below(mem, t, table, tbl, level, i, iova, chunk_end, runs, private) {
                    Ok(k) => new_tables += k,
                    Err(f) => break Err(f),
                }
                iova = chunk_end;
                i += 1;
                dirty = i;
            }
        };
        if !private {
            // On failure too: the rollback clears these entries, the walker must not keep them.
            self.clean_entries(mem, table, dirty, i - dirty);
        }
        result.map(|()| new_tables)
    }

    /// Maps `[iova, end)`, which lies inside the span of entry `i`, one level down.
    ///
    /// An empty entry gets a whole new subtree built privately (plain stores, no CAS per leaf:
    /// nobody else can see it) and published with one compare-and-swap. A present table is
    /// descended into; anything else is an overlap.
    #[allow(clippy::too_many_arguments)]
    fn map_below<M: TableMemory, S: RunSource + ?Sized>(
        &self,
        mem: &M,
        t: &Templates,
        table: PhysAddr,
        tbl: &[M::Entry],
        level: u32,
        i: usize,
        iova: u64,
        end: u64,
        runs: &mut Runs<'_, S>,
        private: bool,
    ) -> Result<usize, Fail> {
        if private {
            // Our own unpublished table: the slot is empty.
            let (child, n) = self.private_subtree(mem, t, level - 1, iova, end, runs)?;
            // Relaxed: the table holding this slot is published (if ever) by a Release CAS,
            // which orders this store too.
            tbl[i].store(F::table_entry(child, &self.cfg), Relaxed);
            return Ok(n);
        }
        let slot = &tbl[i];
        // Acquire: if this is a table pointer we read through it next, and its contents must be
        // visible. Pairs with the Release of the publishing CAS below, on whichever CPU won it.
        let cur = slot.load(Acquire);
        let child = if cur == 0 {
            // Where the output stood: a lost race maps the span again from here.
            let (pa, run_end) = (runs.pa, runs.run_end);
            let (child, n) = self.private_subtree(mem, t, level - 1, iova, end, runs)?;
            // Success Release: the whole private subtree (zeroes, leaves, lower tables) is
            // visible before the pointer that publishes it, to every CPU that reads the pointer
            // with Acquire (and, on Arm, to the coherent walker, which observes stores in order
            // with a store-release). Failure Acquire: we continue in the winner's table.
            match slot.compare_exchange(0, F::table_entry(child, &self.cfg), Release, Acquire) {
                Ok(_) => {
                    // Relaxed: a statistic.
                    self.tables.fetch_add(n, Relaxed);
                    self.clean_entries(mem, table, i, 1);
                    return Ok(0);
                }
                Err(won) => {
                    // Lost the race to a neighbour: nobody ever saw our subtree, so its pages
                    // may be reused at once. Redo the span in the winner's table, from the same
                    // output position (the run source answers an offset the same way twice).
                    self.free_private(mem, child, level - 1);
                    runs.pa = pa;
                    runs.run_end = run_end;
                    won
                }
            }
        } else {
            cur
        };
        if !F::is_table(child, level) {
            return Err(Fail {
                at: iova,
                kind: FailKind::Overlap,
            });
        }
        // Non-coherent walker: the CPU that installed the pointer may not have cleaned it yet;
        // clean it ourselves so our leaves are reachable when we return.
        self.clean_entries(mem, table, i, 1);
        self.map_level(
            mem,
            t,
            F::entry_addr(child),
            level - 1,
            iova,
            end,
            runs,
            false,
        )
    }

    /// Allocates a table at `level` and maps `[iova, end)` into it, privately. Returns the table
    /// and the number of tables in the new subtree. On failure nothing was published: the subtree
    /// is freed and the failure is reported at `iova`.
    fn private_subtree<M: TableMemory, S: RunSource + ?Sized>(
        &self,
        mem: &M,
        t: &Templates,
        level: u32,
        iova: u64,
        end: u64,
        runs: &mut Runs<'_, S>,
    ) -> Result<(PhysAddr, usize), Fail> {
        let bytes = self.geo.table_bytes;
        let table = mem.alloc_table(bytes).ok_or(Fail {
            at: iova,
            kind: FailKind::NoMemory,
        })?;
        match self.map_level(mem, t, table, level, iova, end, runs, true) {
            Ok(n) => {
                if !self.cfg.coherent {
                    // Children were cleaned before they were linked here; now this table, before
                    // its pointer is written anywhere.
                    mem.clean(table, bytes);
                }
                Ok((table, n + 1))
            }
            Err(f) => {
                self.free_private(mem, table, level);
                Err(Fail { at: iova, ..f })
            }
        }
    }
    /// Frees a subtree that was never published.
    fn free_private<M: TableMemory>(&self, mem: &M, table: PhysAddr, level: u32) {
        if level > 0 {
            for slot in self.table(mem, table, level) {
                // Relaxed: our own unpublished stores.
                let e = slot.load(Relaxed);
                if F::is_valid(e) && F::is_table(e, level) {
                    self.free_private(mem, F::entry_addr(e), level - 1);
                }
            }
        }
        mem.free_table(table, self.geo.table_bytes);
    }

    /// The next-level table under entry `i`, installing a fresh, empty one if the entry is empty
    /// (the single-granule path: one page does not justify building a subtree privately).
    #[inline(always)]
    fn child_for_map<M: TableMemory>(
        &self,
        mem: &M,
        table: PhysAddr,
        tbl: &[M::Entry],
        level: u32,
        i: usize,
        iova: u64,
    ) -> Result<PhysAddr, Fail> {
        let slot = &tbl[i];
        // Acquire: if this is a table pointer we read through it next, and the zeroes (and every
        // entry written before the pointer was published) must be visible. Pairs with the Release
        // of the install CAS below, on whichever CPU won it.
        let cur = slot.load(Acquire);
        if cur != 0 {
            if F::is_table(cur, level) {
                // Non-coherent walker: the CPU that installed the pointer may not have cleaned it
                // yet; clean it ourselves so our leaves are reachable when we return.
                self.clean_entries(mem, table, i, 1);
                return Ok(F::entry_addr(cur));
            }
            return Err(Fail {
                at: iova,
                kind: FailKind::Overlap,
            });
        }
        let bytes = self.geo.table_bytes;
        let new = mem.alloc_table(bytes).ok_or(Fail {
            at: iova,
            kind: FailKind::NoMemory,
        })?;
        if !self.cfg.coherent {
            // The walker must find zeroes, not stale lines, once it can reach the table.
            mem.clean(new, bytes);
        }
        let pte = F::table_entry(new, &self.cfg);
        // Success Release: the zeroed table is visible before the pointer that publishes it, to
        // every CPU that reads the pointer with Acquire (and, on Arm, to the coherent walker,
        // which observes stores in order with a store-release).
        // Failure Acquire: we continue in the winner's table and must see its zeroes.
        match slot.compare_exchange(0, pte, Release, Acquire) {
            Ok(_) => {
                // Relaxed: a statistic.
                self.tables.fetch_add(1, Relaxed);
                self.clean_entries(mem, table, i, 1);
                Ok(new)
            }
            Err(won) => {
                // Lost the race: nobody else ever saw `new`, so it may be reused at once.
                mem.free_table(new, bytes);
                if F::is_table(won, level) {
                    self.clean_entries(mem, table, i, 1);
                    Ok(F::entry_addr(won))
                } else {
                    Err(Fail {
                        at: iova,
                        kind: FailKind::Overlap,
                    })
                }
            }
        }
    }

    /// Installs `count` leaves at entries `first..` of `tbl` (level `level`), mapping `iova..` to
    /// the output `runs` stands at (one run covers them all), grouping them into contiguous runs
    /// where the hint is enabled and alignment allows. Moves `runs` past them. Cleans nothing:
    /// the caller cleans the entries of a published table.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn install_leaves<M: TableMemory, S: RunSource + ?Sized>(
        &self,
        mem: &M,
        t: &Templates,
        tbl: &[M::Entry],
        level: u32,
        first: usize,
        count: usize,
        iova: u64,
        runs: &mut Runs<'_, S>,
        private: bool,
    ) -> Result<(), Fail> {
        let shift = Self::shift(level);
        let tmpl = if level == 0 { t.page } else { t.block };
        let run = if self.cont_levels & (1 << level) != 0 {
            F::contiguous_entries(level)
        } else {
            0
        };
        let pa = runs.pa;
        let end = first + count;
        let mut i = first;
        while i < end {
            let off = ((i - first) as u64) << shift;
            let (e_iova, e_pa) = (iova + off, pa + off);
            // How many entries go in one sweep, and whether they form a contiguous run.
            let (n, hint) = if run == 0 {
                (end - i, 0)
            } else if i.is_multiple_of(run)
                && end - i >= run
                && e_pa & (((run as u64) << shift) - 1) == 0
                // Relaxed: only chooses the contiguous path; the CASes decide.
                && (private || tbl[i..i + run].iter().all(|s| s.load(Relaxed) == 0))
            {
                (run, F::CONT_BIT)
            } else {
                // Plain leaves up to the next run boundary.
                (((i / run + 1) * run).min(end) - i, 0)
            };
            if private {
                // Nobody else can see this table, and it was zeroed: no check, no CAS.
                for (k, slot) in tbl[i..i + n].iter().enumerate() {
                    // Relaxed: published (if ever) by the Release CAS of an ancestor table.
                    slot.store(
                        tmpl | hint | F::oa_bits(e_pa + ((k as u64) << shift)),
                        Relaxed,
                    );
                }
                i += n;
                continue;
            }
            match self.put_run(&tbl[i..i + n], tmpl | hint, e_pa, shift) {
                Ok(()) => i += n,
                Err((k, cur)) => {
                    i += k;
                    let at = e_iova + ((k as u64) << shift);
                    if hint == 0 && F::is_table(cur, level) {
                        // An empty table left by a partial unmap: map this entry's span inside it
                        // (within the current run, so `runs` fetches nothing there).
                        runs.pa = e_pa + ((k as u64) << shift);
                        let child = F::entry_addr(cur);
                        let span = at + (1 << shift);
                        self.map_level(mem, t, child, level - 1, at, span, runs, false)?;
                        i += 1;
                    } else {
                        return Err(Fail {
                            at,
                            kind: FailKind::Overlap,
                        });
                    }
                }
            }
        }
        runs.pa = pa + ((count as u64) << shift);
        Ok(())
    }
    /// Writes leaves `tmpl | oa(pa + k·size)` into `slots`, each only if the slot is empty.
    /// Returns the index and current value of the first occupied slot.
    #[inline(always)]
    fn put_run<E: PteAtomic>(
        &self,
        slots: &[E],
        tmpl: u64,
        pa: PhysAddr,
        shift: u32,
    ) -> Result<(), (usize, u64)> {
        match self.cfg.concurrency {
            Concurrency::Untrusted => {
                // The output address as an induction variable (one add per entry, not a shift
                // and an add of the index).
                let mut e_pa = pa;
                for (k, slot) in slots.iter().enumerate() {
                    let v = tmpl | F::oa_bits(e_pa);
                    e_pa += 1 << shift;
                    // Success Relaxed: a leaf carries no CPU-side payload (nothing a reader then
                    // dereferences), and the CAS's atomicity is what makes "fails on an occupied
                    // entry" hold against a racing caller. Failure Acquire: the occupant may be a
                    // table we descend into.
                    if let Err(cur) = slot.compare_exchange(0, v, Relaxed, Acquire) {
                        return Err((k, cur));
                    }
                }
            }
            Concurrency::Cooperative => {
                // Check the whole run first, without a branch per entry (loads issue three per
                // cycle, the stores below two), then store. Relaxed: nothing is dereferenced on
                // this path; an occupied run is re-read below with Acquire.
                let occupied = slots.iter().fold(0, |acc, s| acc | s.load(Relaxed));
                if occupied == 0 {
                    for (k, slot) in slots.iter().enumerate() {
                        // Relaxed: as for the CAS success above; the caller guarantees no racer.
                        slot.store(tmpl | F::oa_bits(pa + ((k as u64) << shift)), Relaxed);
                    }
                    return Ok(());
                }
                for (k, slot) in slots.iter().enumerate() {
                    // Acquire: as for the CAS failure above.
                    let cur = slot.load(Acquire);
                    if cur != 0 {
                        return Err((k, cur));
                    }
                    // Relaxed: as above.
                    slot.store(tmpl | F::oa_bits(pa + ((k as u64) << shift)), Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Removes the leaves a failed map installed in `[start, end)`.
    fn rollback<M: TableMemory>(&self, mem: &M, start: u64, end: u64) {
        let mut st = UnmapState::new(start, end, true);
        let mut g = Gather::new();
        let _ = self.unmap_level(mem, &mut st, self.root, self.top(), start, end, &mut g);
        debug_assert_eq!(g.table_pages(), 0);
        g.complete(mem);
    }

    // ---------------------------------------------------------------------------------------
    // unmap
    // ---------------------------------------------------------------------------------------

    /// Unmaps every leaf in `[iova, iova + len)` and returns the bytes unmapped (holes are skipped
    /// and not counted). The cleared range and every table page whose whole span the request
    /// covered are added to `gather`; see [`Gather`] for what the caller does next.
    ///
    /// A range that cuts through a superpage or contiguous run is rejected with
    /// [`UnmapError::SplitsLeaf`] before anything changes.
    pub fn unmap<M: TableMemory>(
        &self,
        mem: &M,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        let granule = 1u64 << F::GRANULE_SHIFT;
        if len == 0 || (iova | len) & (granule - 1) != 0 {
            return Err(UnmapError::Misaligned);
        }
        let end = iova
            .checked_add(len)
            .filter(|&e| e <= self.input_limit())
            .ok_or(UnmapError::OutOfRange)?;
        if len == granule {
            return self.unmap_one(mem, iova, gather);
        }
        // The leaf under the first address is the first leaf the walk meets, so a cut there is
        // found before anything changes. The leaf under the last address is met last: look it up
        // first, unless no leaf can straddle `end` or the range is a single granule.
        if len > granule
            && end & (self.max_leaf_span - 1) != 0
            && let Some(t) = self.translate(mem, end - 1)
            && t.leaf.end > end
        {
            return Err(UnmapError::SplitsLeaf {
                leaf: t.leaf,
                unmapped: 0,
            });
        }
        let mut st = UnmapState::new(iova, end, false);
        let r = self.unmap_level(mem, &mut st, self.root, self.top(), iova, end, gather);
        let bytes = st.into_gather(gather);
        match r {
            Ok(()) => Ok(bytes),
            Err(leaf) => Err(UnmapError::SplitsLeaf {
                leaf,
                unmapped: bytes,
            }),
        }
    }

    /// One granule, iteratively. A single granule never covers a whole table, so no table is
    /// unlinked; any leaf bigger than a granule is cut by the request and rejected.
    #[inline]
    fn unmap_one<M: TableMemory>(
        &self,
        mem: &M,
        iova: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        let mut table = self.root;
        let mut level = self.top();
        loop {
            let tbl = self.table(mem, table, level);
            let i = self.index(iova, level);
            // Acquire: a table pointer leads to entries we read next.
            let e = tbl[i].load(Acquire);
            if !F::is_valid(e) {
                return Ok(0);
            }
            if F::is_table(e, level) {
                table = F::entry_addr(e);
                level -= 1;
                continue;
            }
            let run = if F::CONT_BIT != 0 && e & F::CONT_BIT != 0 {
                F::contiguous_entries(level) as u64
            } else {
                1
            };
            if level > 0 || run > 1 {
                let span = (1u64 << Self::shift(level)) * run;
                let start = iova & !(span - 1);
                return Err(UnmapError::SplitsLeaf {
                    leaf: IovaRange {
                        start,
                        end: start + span,
                    },
                    unmapped: 0,
                });
            }
            if !self.take_leaf(&tbl[i], e, 0) {
                return Ok(0);
            }
            self.clean_entries(mem, table, i, 1);
            let granule = 1u64 << F::GRANULE_SHIFT;
            gather.add_range(iova, iova + granule);
            gather.add_leaves(1, F::GRANULE_SHIFT);
            return Ok(granule);
        }
    }

    /// Level 0 of an unmap in a table without contiguous runs: only leaves of one granule, no
    /// tables, nothing to split, so a tight loop.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn unmap_run0<M: TableMemory>(
        &self,
        mem: &M,
        st: &mut UnmapState,
        table: PhysAddr,
        tbl: &[M::Entry],
        first: usize,
        last: usize,
        iova: u64,
    ) {
        let (mut lo, mut hi, mut n) = (usize::MAX, 0, 0u64);
        for (i, slot) in tbl[first..last].iter().enumerate() {
            // Relaxed: a level-0 entry is never a table pointer, nothing is dereferenced.
            let e = slot.load(Relaxed);
            if F::is_valid(e) && self.take_leaf(slot, e, 0) {
                lo = lo.min(i);
                hi = i + 1;
                n += 1;
            }
        }
        if n != 0 {
            let shift = F::GRANULE_SHIFT;
            st.leaves += n;
            st.bytes += n << shift;
            st.min_shift = st.min_shift.min(shift);
            st.cover(iova + ((lo as u64) << shift), iova + ((hi as u64) << shift));
            self.clean_entries(mem, table, first + lo, hi - lo);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn unmap_level<M: TableMemory>(
        &self,
        mem: &M,
        st: &mut UnmapState,
        table: PhysAddr,
        level: u32,
        iova: u64,
        end: u64,
        g: &mut Gather,
    ) -> Result<(), IovaRange> {
        let tbl = self.table(mem, table, level);
        let shift = Self::shift(level);
        let first = self.index(iova, level);
        if level == 0 {
            let last = first + ((end - iova) >> shift) as usize;
            if self.cont_levels & 1 == 0 || st.rollback {
                // No contiguous runs at level 0, or a rollback (no split check): nothing to
                // decide per entry.
                self.unmap_run0(mem, st, table, tbl, first, last, iova);
                return Ok(());
            }
            // Contiguous runs are aligned to their span (Arm ARM D8.6.1), so a run can be cut
            // by the request only where it starts or ends off a run boundary: only the entries
            // of [iova, end) outside [start rounded up, end rounded down) need the per-entry
            // split check. Those edges go through the general loop, the first one first so a
            // cut there is still found before anything changes (the cut at the request's end
            // was looked up by `unmap` before the walk).
            let run = (F::contiguous_entries(0) as u64) << shift;
            let lo = st.start.next_multiple_of(run).clamp(iova, end);
            let hi = (st.end & !(run - 1)).clamp(lo, end);
            if lo < hi {
                if iova < lo {
                    self.unmap_entries(mem, st, table, tbl, 0, iova, lo, g)?;
                }
                let (a, b) = (
                    self.index(lo, 0),
                    self.index(lo, 0) + ((hi - lo) >> shift) as usize,
                );
                self.unmap_run0(mem, st, table, tbl, a, b, lo);
                if hi < end {
                    self.unmap_entries(mem, st, table, tbl, 0, hi, end, g)?;
                }
                return Ok(());
            }
        }
        self.unmap_entries(mem, st, table, tbl, level, iova, end, g)
    }

    /// The general loop of [`unmap_level`](Self::unmap_level) over the entries of `tbl` (at
    /// `level`, at `table`) covering `[iova, end)`, which lies within the table's span.
    #[allow(clippy::too_many_arguments)]
    fn unmap_entries<M: TableMemory>(
        &self,
        mem: &M,
        st: &mut UnmapState,
        table: PhysAddr,
        tbl: &[M::Entry],
        level: u32,
        mut iova: u64,
        end: u64,
        g: &mut Gather,
    ) -> Result<(), IovaRange> {
        let shift = Self::shift(level);
        let size = 1u64 << shift;
        let first = self.index(iova, level);
        let mut i = first;
        let mut changed = false;
        let mut result = Ok(());
        while iova < end {
            let entry_end = (iova | (size - 1)) + 1;
            let chunk_end = end.min(entry_end);
            // Acquire: if this is a table pointer we read the table next (pairs with the Release
            // of the CAS that installed it).
            let e = tbl[i].load(Acquire);
            if F::is_valid(e) {
                if F::is_table(e, level) {
                    let whole = iova & (size - 1) == 0 && chunk_end == entry_end;
                    if whole && !st.rollback {
                        // The request covers this table's whole span, so under the contract no
                        // other CPU can be using it: unlink it and free it after the flush.
                        if let Some(child) = self.take_table(&tbl[i], e, level) {
                            changed = true;
                            let freed = self.reap(mem, st, child, level - 1, g);
                            // Relaxed: a statistic.
                            self.tables.fetch_sub(freed, Relaxed);
                            st.cover(iova, entry_end);
                        }
                    } else if let Err(leaf) =
                        self.unmap_level(mem, st, F::entry_addr(e), level - 1, iova, chunk_end, g)
                    {
                        result = Err(leaf);
                        break;
                    }
                } else {
                    let run = if F::CONT_BIT != 0 && e & F::CONT_BIT != 0 {
                        F::contiguous_entries(level) as u64
                    } else {
                        1
                    };
                    if !st.rollback && (level > 0 || run > 1) {
                        let span = size * run;
                        let leaf_start = iova & !(span - 1);
                        if leaf_start < st.start || leaf_start + span > st.end {
                            result = Err(IovaRange {
                                start: leaf_start,
                                end: leaf_start + span,
                            });
                            break;
                        }
                    }
                    if self.take_leaf(&tbl[i], e, level) {
                        changed = true;
                        st.leaf(shift);
                        st.cover(iova, entry_end);
                    }
                }
            }
            iova = chunk_end;
            i += 1;
        }
        if changed {
            self.clean_entries(mem, table, first, i - first);
        }
        result
    }

    /// Clears the leaf `seen` from `slot`. Returns whether this call removed it (exactly one of
    /// several racing unmaps does, in [`Concurrency::Untrusted`] mode).
    #[inline(always)]
    fn take_leaf<E: PteAtomic>(&self, slot: &E, seen: u64, level: u32) -> bool {
        match self.cfg.concurrency {
            Concurrency::Cooperative => {
                // Relaxed: no payload; the caller guarantees no racer.
                slot.store(0, Relaxed);
                true
            }
            Concurrency::Untrusted => {
                let mut cur = seen;
                loop {
                    // Relaxed: no payload; atomicity alone makes the removal exactly-once.
                    match slot.compare_exchange(cur, 0, Relaxed, Relaxed) {
                        Ok(_) => return true,
                        // The hardware set A/D (AF, or DBM's write permission) since we looked:
                        // still the same leaf, try again. Bounded: it sets each bit once.
                        Err(now)
                            if F::is_valid(now)
                                && !F::is_table(now, level)
                                && F::entry_addr(now) == F::entry_addr(cur) =>
                        {
                            cur = now
                        }
                        // A racing caller removed or replaced it: not ours to remove.
                        Err(_) => return false,
                    }
                }
            }
        }
    }

    /// Unlinks the table entry `seen`; returns the table's address if this call unlinked it.
    #[inline(always)]
    fn take_table<E: PteAtomic>(&self, slot: &E, seen: u64, level: u32) -> Option<PhysAddr> {
        match self.cfg.concurrency {
            Concurrency::Cooperative => {
                // Relaxed: a reader that sees 0 reads nothing through it. Ordering against reuse
                // of the page is the grace period's job (`retire_table`), against the hardware
                // walker the invalidation's.
                slot.store(0, Relaxed);
                Some(F::entry_addr(seen))
            }
            Concurrency::Untrusted => {
                let mut cur = seen;
                loop {
                    // Relaxed: as above; we already hold Acquire visibility of the table's
                    // contents from the load that found `seen`.
                    match slot.compare_exchange(cur, 0, Relaxed, Relaxed) {
                        Ok(_) => return Some(F::entry_addr(cur)),
                        // VT-d sets A in non-leaf entries as it walks: same table, try again.
                        Err(now)
                            if F::is_table(now, level)
                                && F::entry_addr(now) == F::entry_addr(cur) =>
                        {
                            cur = now
                        }
                        Err(_) => return None,
                    }
                }
            }
        }
    }

    /// Accounts for every leaf under an unlinked table and chains its table pages into `g`.
    /// Returns the number of table pages chained.
    fn reap<M: TableMemory>(
        &self,
        mem: &M,
        st: &mut UnmapState,
        table: PhysAddr,
        level: u32,
        g: &mut Gather,
    ) -> usize {
        let tbl = self.table(mem, table, level);
        let shift = Self::shift(level);
        let mut freed = 1;
        if level == 0 {
            // Relaxed: level-0 entries are never table pointers, nothing is dereferenced.
            let n = tbl.iter().filter(|s| F::is_valid(s.load(Relaxed))).count() as u64;
            if n != 0 {
                st.leaves += n;
                st.bytes += n << shift;
                st.min_shift = st.min_shift.min(shift);
            }
            g.push_table(mem, table, self.geo.table_bytes);
            return freed;
        }
        for slot in tbl {
            // Acquire: a table pointer found here leads to entries we read next.
            let e = slot.load(Acquire);
            if !F::is_valid(e) {
                continue;
            }
            if F::is_table(e, level) {
                freed += self.reap(mem, st, F::entry_addr(e), level - 1, g);
            } else {
                st.leaf(shift);
            }
        }
        // The leaves stay in the unlinked page: after the invalidation nothing can reach them.
        g.push_table(mem, table, self.geo.table_bytes);
        freed
    }

    // ---------------------------------------------------------------------------------------
    // lookup, dirty bits, introspection
    // ---------------------------------------------------------------------------------------

    /// The output address `iova` translates to, if mapped.
    pub fn iova_to_phys<M: TableMemory>(&self, mem: &M, iova: u64) -> Option<PhysAddr> {
        self.translate(mem, iova).map(|t| t.pa)
    }

    /// The leaf translating `iova`, if mapped.
    pub fn translate<M: TableMemory>(&self, mem: &M, iova: u64) -> Option<Translation> {
        if iova >= self.input_limit() {
            return None;
        }
        let mut table = self.root;
        let mut level = self.top();
        loop {
            let tbl = self.table(mem, table, level);
            // Acquire: a table pointer leads to entries we read next.
            let e = tbl[self.index(iova, level)].load(Acquire);
            if !F::is_valid(e) {
                return None;
            }
            if F::is_table(e, level) {
                table = F::entry_addr(e);
                level -= 1;
                continue;
            }
            let size = 1u64 << Self::shift(level);
            let run = if F::CONT_BIT != 0 && e & F::CONT_BIT != 0 {
                F::contiguous_entries(level) as u64
            } else {
                1
            };
            let span = size * run;
            let start = iova & !(span - 1);
            return Some(Translation {
                pa: (F::entry_addr(e) & !(size - 1)) + (iova & (size - 1)),
                level,
                page_size: size,
                leaf: IovaRange {
                    start,
                    end: start + span,
                },
                pte: e,
            });
        }
    }

    /// Reports, through `report`, every leaf in `[iova, iova + len)` whose dirty state is set
    /// (a leaf partly inside the range is reported whole; a contiguous run is reported as one
    /// leaf if any of its entries is dirty, since the hardware may mark any one of them). With
    /// `clear`, makes them clean again and adds them to `gather`: the hardware marks a page dirty
    /// again only after the invalidation. Reports nothing for formats or tables without dirty
    /// tracking.
    pub fn read_and_clear_dirty<M: TableMemory>(
        &self,
        mem: &M,
        iova: u64,
        len: u64,
        clear: bool,
        gather: &mut Gather,
        mut report: impl FnMut(IovaRange),
    ) -> Result<(), UnmapError> {
        let granule = 1u64 << F::GRANULE_SHIFT;
        if len == 0 || (iova | len) & (granule - 1) != 0 {
            return Err(UnmapError::Misaligned);
        }
        let end = iova
            .checked_add(len)
            .filter(|&e| e <= self.input_limit())
            .ok_or(UnmapError::OutOfRange)?;
        if !F::HAS_DIRTY || !self.cfg.dirty_tracking {
            return Ok(());
        }
        self.dirty_level(
            mem,
            self.root,
            self.top(),
            iova,
            end,
            clear,
            gather,
            &mut report,
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn dirty_level<M: TableMemory>(
        &self,
        mem: &M,
        table: PhysAddr,
        level: u32,
        mut iova: u64,
        end: u64,
        clear: bool,
        g: &mut Gather,
        report: &mut dyn FnMut(IovaRange),
    ) {
        let tbl = self.table(mem, table, level);
        let n = tbl.len();
        let shift = Self::shift(level);
        let size = 1u64 << shift;
        let mut i = self.index(iova, level);
        let first = i;
        let mut changed = false;
        while iova < end && i < n {
            let entry_end = (iova | (size - 1)) + 1;
            // Acquire: a table pointer leads to entries we read next.
            let e = tbl[i].load(Acquire);
            if !F::is_valid(e) {
                iova = entry_end;
                i += 1;
                continue;
            }
            if F::is_table(e, level) {
                let chunk_end = end.min(entry_end);
                self.dirty_level(
                    mem,
                    F::entry_addr(e),
                    level - 1,
                    iova,
                    chunk_end,
                    clear,
                    g,
                    report,
                );
                iova = entry_end;
                i += 1;
                continue;
            }
            let run = if F::CONT_BIT != 0 && e & F::CONT_BIT != 0 {
                F::contiguous_entries(level)
            } else {
                1
            };
            let g0 = i - i % run;
            let g1 = (g0 + run).min(n);
            let span = size * run as u64;
            let start = iova & !(span - 1);
            let leaf = IovaRange {
                start,
                end: start + ((g1 - g0) as u64) * size,
            };
            // Relaxed: the dirty bit is state the hardware sets; no CPU data depends on it.
            let dirty = tbl[g0..g1].iter().any(|s| F::is_dirty(s.load(Relaxed)));
            if dirty {
                report(leaf);
                if clear {
                    for s in &tbl[g0..g1] {
                        // Relaxed RMW: atomic, so a concurrent hardware update to the same entry
                        // is not lost; the invalidation of `g`'s range is what makes the hardware
                        // see the clean state.
                        if F::CLEAN_AND != !0 {
                            s.fetch_and(F::CLEAN_AND, Relaxed);
                        }
                        if F::CLEAN_OR != 0 {
                            s.fetch_or(F::CLEAN_OR, Relaxed);
                        }
                    }
                    g.add_range(leaf.start, leaf.end);
                    g.add_leaves((g1 - g0) as u64, shift);
                    changed = true;
                }
            }
            iova = leaf.end;
            i = g1;
        }
        if changed {
            self.clean_entries(mem, table, first, i - first);
        }
    }

    /// Counts tables and leaves per level.
    pub fn census<M: TableMemory>(&self, mem: &M) -> Census {
        let mut c = Census::default();
        self.census_level(mem, self.root, self.top(), &mut c);
        c
    }

    fn census_level<M: TableMemory>(&self, mem: &M, table: PhysAddr, level: u32, c: &mut Census) {
        c.tables[level as usize] += 1;
        for slot in self.table(mem, table, level) {
            // Acquire: a table pointer leads to entries we read next.
            let e = slot.load(Acquire);
            if !F::is_valid(e) {
                continue;
            }
            if F::is_table(e, level) {
                self.census_level(mem, F::entry_addr(e), level - 1, c);
            } else {
                c.leaves[level as usize] += 1;
                if F::CONT_BIT != 0 && e & F::CONT_BIT != 0 {
                    c.contiguous[level as usize] += 1;
                }
                c.mapped += 1 << Self::shift(level);
            }
        }
    }

    /// Writes a human-readable dump: the geometry, then every table and every run of leaves with
    /// consecutive output addresses and identical attributes, one per line.
    pub fn dump<M: TableMemory>(&self, mem: &M, out: &mut dyn fmt::Write) -> fmt::Result {
        writeln!(
            out,
            "{}: {} levels, ias {} oas {}, root {:#x} ({} entries), {} table pages",
            F::NAME,
            self.geo.levels,
            self.geo.ias,
            self.geo.oas,
            self.root,
            self.geo.root_entries,
            self.table_pages()
        )?;
        self.dump_level(mem, out, self.root, self.top(), 0)
    }

    fn dump_level<M: TableMemory>(
        &self,
        mem: &M,
        out: &mut dyn fmt::Write,
        table: PhysAddr,
        level: u32,
        base: u64,
    ) -> fmt::Result {
        let tbl = self.table(mem, table, level);
        let size = 1u64 << Self::shift(level);
        let indent = (self.top() - level) as usize * 2 + 2;
        let leaf_pa = |e: u64| F::entry_addr(e) & !(size - 1);
        let mut i = 0;
        while i < tbl.len() {
            // Acquire: a table pointer leads to entries we read next.
            let e = tbl[i].load(Acquire);
            let start = base + i as u64 * size;
            if !F::is_valid(e) {
                i += 1;
                continue;
            }
            if F::is_table(e, level) {
                writeln!(
                    out,
                    "{:indent$}L{level}[{i}] {start:#x}..{:#x} table {:#x}",
                    "",
                    start + size,
                    F::entry_addr(e)
                )?;
                self.dump_level(mem, out, F::entry_addr(e), level - 1, start)?;
                i += 1;
                continue;
            }
            let attrs = e ^ F::oa_bits(leaf_pa(e));
            let mut j = i + 1;
            while j < tbl.len() {
                // Acquire: as above (only to keep every walk uniform; leaves carry no payload).
                let f = tbl[j].load(Acquire);
                let next = leaf_pa(e) + (j - i) as u64 * size;
                if F::is_valid(f)
                    && !F::is_table(f, level)
                    && leaf_pa(f) == next
                    && f ^ F::oa_bits(leaf_pa(f)) == attrs
                {
                    j += 1;
                } else {
                    break;
                }
            }
            write!(
                out,
                "{:indent$}L{level}[{i}..{j}] {start:#x}..{:#x} -> {:#x} ({} x {}) pte {e:#x}: ",
                "",
                base + j as u64 * size,
                leaf_pa(e),
                j - i,
                SizeName(size),
            )?;
            F::describe(e, level, out)?;
            out.write_char('\n')?;
            i = j;
        }
        Ok(())
    }

    /// Frees every table page, root included. The hardware must no longer use the table (the
    /// domain is detached and the caches invalidated); taking `self` by value proves no CPU still
    /// does.
    pub fn destroy<M: TableMemory>(self, mem: &M) {
        self.free_level(mem, self.root, self.top());
    }

    fn free_level<M: TableMemory>(&self, mem: &M, table: PhysAddr, level: u32) {
        for slot in self.table(mem, table, level) {
            // Acquire: a table pointer leads to entries we read next.
            let e = slot.load(Acquire);
            if F::is_valid(e) && F::is_table(e, level) {
                self.free_level(mem, F::entry_addr(e), level - 1);
            }
        }
        let bytes = if level == self.top() {
            self.geo.root_bytes
        } else {
            self.geo.table_bytes
        };
        mem.free_table(table, bytes);
    }
}

/// Formats a power-of-two size as 4K / 2M / 1G / ….
struct SizeName(u64);

impl fmt::Display for SizeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.trailing_zeros();
        let (v, unit) = match s {
            0..10 => (self.0, "B"),
            10..20 => (self.0 >> 10, "K"),
            20..30 => (self.0 >> 20, "M"),
            30..40 => (self.0 >> 30, "G"),
            _ => (self.0 >> 40, "T"),
        };
        write!(f, "{v}{unit}")
    }
}

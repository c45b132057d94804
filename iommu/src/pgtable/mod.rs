//! Lock-free IO page-table engine: one algorithm, generic over the table formats of Intel VT-d
//! (second stage; first stage = x86-64 paging) and Arm VMSAv8-64 (stage 1 and stage 2, as walked
//! by an SMMUv3).
//!
//! # Shape
//!
//! * [`Format`] describes a descriptor layout with associated constants and `#[inline]` functions;
//!   [`PageTable<F>`](PageTable) is monomorphised per format, so the per-entry code has no dynamic
//!   dispatch. Formats: [`VtdSecondStage<L>`](VtdSecondStage) (3/4/5 levels),
//!   [`X86FirstStage<L>`](X86FirstStage) (4/5 levels), [`ArmStage1<G>`](ArmStage1) and
//!   [`ArmStage2<G>`](ArmStage2) (4/16/64 KiB granules, stage-2 concatenated roots), and
//!   [`Narrow`], a shrunken geometry over any of them for model checking.
//! * Table pages come from a [`TableMemory`] passed to every call (the hypervisor passes its
//!   per-CPU frame cache); the engine never uses the heap.
//! * [`PageTable::map`] picks the largest leaf the format and the hardware allow at each point
//!   (1 GiB / 2 MiB / 4 KiB and their Arm analogues, plus the Arm contiguous hint);
//!   [`PageTable::map_runs`] does the same for an output scattered over many physical runs
//!   (a [`RunSource`]), in one walk: `map` is its one-run case;
//!   [`PageTable::unmap`] returns the bytes it unmapped and records the range and the unlinked
//!   table pages in a [`Gather`], so the caller invalidates once per batch.
//!
//! # Concurrency contract
//!
//! 1. **Disjoint ranges need no lock.** Any number of CPUs may call `map`, `unmap`,
//!    `read_and_clear_dirty` and `iova_to_phys` on one table at the same time, provided no two
//!    concurrent *mutating* calls cover overlapping IOVA ranges. Nothing in the engine blocks or
//!    spins; every loop is bounded by the size of the request.
//! 2. **Tables are installed by compare-and-swap.** A CPU that needs a next-level table takes
//!    zeroed pages from its `TableMemory`, builds the whole new subtree privately (plain stores:
//!    nothing unpublished can be raced on), and CASes the table entry from 0 to the pointer. If
//!    another CPU (mapping a neighbouring range under the same entry) won, the loser returns its
//!    pages with [`TableMemory::free_table`] and redoes its range in the winner's table.
//! 3. **Leaves are written by compare-and-swap from 0** (with [`Concurrency::Untrusted`], the
//!    default). A map that meets an occupied entry fails with [`MapError::Overlap`] and rolls back
//!    exactly the entries it installed, so an overlapping map from an untrusted caller is an error,
//!    never a silent overwrite, even when the two maps race. Unmap clears leaves with an atomic swap,
//!    so two racing unmaps of one leaf account for it exactly once. [`Concurrency::Cooperative`]
//!    replaces both with a load and a plain store, for callers that own their ranges (the
//!    hypervisor's own IOVA allocator). Overlap is still detected, only no longer under a race.
//! 4. **Table pages are reclaimed late.** `unmap` unlinks a table only when the request covers the
//!    table's whole span (so, under rule 1, nobody else can be using it), then chains it in the
//!    caller's [`Gather`]. The caller invalidates the IOTLB and paging-structure caches for the
//!    gathered range and then calls [`Gather::complete`], which hands the pages to
//!    [`TableMemory::retire_table`]. That method delays reuse for a grace period, so a CPU that is
//!    still walking the table (possible only for a caller that broke rule 1) never sees it reused.
//! 5. **Memory ordering.** A new subtree's contents (zeroes, leaves, lower tables) are visible
//!    before its pointer: the install CAS uses `Release`, and a walker's `Acquire` load of a table
//!    entry pairs with it. Leaf entries carry
//!    no CPU-side payload, so leaf writes need no ordering beyond their own atomicity. When the IOMMU
//!    does not snoop the caches (`Config::coherent == false`), the engine calls
//!    [`TableMemory::clean`] on every new table before anything points at it (children first),
//!    and on every run of published entries it changed before returning. A map is therefore visible to the walker when `map` returns. Making
//!    it visible before a *device* is told to use it (a DMA write barrier before the doorbell) is the
//!    driver's job, as with any other DMA descriptor.
//!
//! # Partial unmap of a large leaf: rejected
//!
//! A leaf (a superpage, or an Arm contiguous run, which the architecture treats as one TLB entry)
//! is unmapped whole or not at all. An `unmap` whose range cuts through a leaf fails with
//! [`UnmapError::SplitsLeaf`] and changes nothing. Splitting atomically would need a
//! break-before-make sequence with an invalidation in the middle for the contiguous hint
//! (Arm ARM D8.16), and it would let a guest force the hypervisor to allocate tables on *unmap*.
//! Rejection is what an untrusted-caller interface wants. The check is made before anything is
//! changed (the leaf under the first address is seen first; the leaf under the last address is
//! looked up first when the range can hold more than one leaf).
//!
//! See `docs/pgtable.md` for the design discussion and `docs/perf.md` for measurements.

mod engine;
pub mod format;
mod gather;
mod mem;
pub mod sync;

pub use engine::{Census, MapOutput, PageTable, RootInfo, RunSource, Translation};
pub use format::{
    ArmStage1, ArmStage2, Concurrency, Config, Format, Geometry, Narrow, VtdSecondStage,
    X86FirstStage,
};
pub use gather::Gather;
pub use mem::TableMemory;

/// A physical (output) address, or the physical address of a table page.
pub type PhysAddr = u64;

bitflags::bitflags! {
    /// Permissions and attributes of a mapping, translated per format.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Prot: u32 {
        /// Device reads allowed. Stage-1 formats (x86 first stage, Arm stage 1) cannot express a
        /// mapping without read permission and reject one.
        const READ = 1 << 0;
        /// Device writes allowed.
        const WRITE = 1 << 1;
        /// Instruction fetches allowed (formats and hardware with an execute control).
        const EXEC = 1 << 2;
        /// Privileged (supervisor) requests only: x86 U/S = 0, Arm stage-1 AP\[1\] = 0.
        const PRIV = 1 << 3;
        /// VT-d second stage: SNP = 1, snoop the access even if the device asked not to
        /// (requires `Config::snoop_control`, ECAP.SC). Ignored by formats without such a bit.
        const SNOOP = 1 << 4;
        /// Stage 1: the translation is global (x86 G = 1, Arm nG = 0).
        const GLOBAL = 1 << 5;
        /// Normal memory, not cacheable (default is write-back cacheable, coherent).
        const NONCACHED = 1 << 6;
        /// Device memory (MMIO of a peer): Arm Device-nGnRE, x86 UC, VT-d EMT UC. Wins over
        /// `NONCACHED`.
        const DEVICE = 1 << 7;
    }
}

/// A half-open IOVA range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

impl IovaRange {
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Why a map failed. In every case the table holds exactly the translations it held before the
/// call; `rolled_back` is the range whose entries were installed and then removed again (the
/// device could have cached them in between), which the caller must invalidate before reusing the
/// physical pages. It is empty when nothing was installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// `iova`, `pa` or `len` is not a multiple of the translation granule, or `len` is 0.
    Misaligned,
    /// The range exceeds the input address size, or the output range exceeds the output size.
    OutOfRange,
    /// The permission set cannot be expressed by this format (e.g. no READ on a stage-1 format,
    /// or neither READ nor WRITE).
    InvalidProt,
    /// The request needs a feature the hardware lacks (`SNOOP` without snoop control).
    Unsupported,
    /// Part of the range was already mapped; `iova` is the first occupied address found.
    Overlap { iova: u64, rolled_back: IovaRange },
    /// The `TableMemory` had no page for a needed table.
    NoMemory { rolled_back: IovaRange },
    /// [`PageTable::map_runs`]: the [`RunSource`] had no run for `iova`, or gave one that is
    /// not granule-aligned, is shorter than a granule or ends beyond the output size.
    BadRun { iova: u64, rolled_back: IovaRange },
}

impl MapError {
    /// The range this call installed and removed again (empty when nothing was installed).
    pub fn rolled_back(&self) -> IovaRange {
        match *self {
            MapError::Overlap { rolled_back, .. }
            | MapError::NoMemory { rolled_back }
            | MapError::BadRun { rolled_back, .. } => rolled_back,
            _ => IovaRange::default(),
        }
    }
}

/// Why an unmap (or a dirty-bit harvest) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmapError {
    /// `iova` or `len` is not a multiple of the translation granule, or `len` is 0.
    Misaligned,
    /// The range exceeds the input address size.
    OutOfRange,
    /// The range cuts through `leaf`, a superpage or contiguous run; policy is to reject (see the
    /// module docs). `unmapped` is what had been unmapped before the cut was found: always 0 when
    /// callers respect the disjoint-range contract, since the check precedes any change.
    SplitsLeaf { leaf: IovaRange, unmapped: u64 },
}

/// Why a table could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The input size is outside what the format (with this number of levels) can translate.
    InputSize,
    /// The output size is outside what the format can encode.
    OutputSize,
    /// The format's compile-time parameters are invalid (e.g. 6 levels).
    Format,
    /// The `TableMemory` had no page for the root.
    NoMemory,
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MapError::Misaligned => f.write_str("iova, pa or length not granule-aligned"),
            MapError::OutOfRange => f.write_str("range outside the input or output address size"),
            MapError::InvalidProt => f.write_str("permissions not expressible in this format"),
            MapError::Unsupported => f.write_str("attribute not supported by this IOMMU"),
            MapError::Overlap { iova, .. } => write!(f, "iova {iova:#x} is already mapped"),
            MapError::NoMemory { .. } => f.write_str("out of page-table memory"),
            MapError::BadRun { iova, .. } => write!(f, "no usable output run for iova {iova:#x}"),
        }
    }
}

impl core::fmt::Display for UnmapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            UnmapError::Misaligned => f.write_str("iova or length not granule-aligned"),
            UnmapError::OutOfRange => f.write_str("range outside the input address size"),
            UnmapError::SplitsLeaf { leaf, .. } => write!(
                f,
                "range cuts through the leaf [{:#x}, {:#x})",
                leaf.start, leaf.end
            ),
        }
    }
}

#[cfg(test)]
mod tests;

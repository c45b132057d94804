//! Where table pages come from, and how the engine reaches their contents.

use super::PhysAddr;
use super::sync::PteAtomic;

/// A source of page-table pages, and the window through which the engine reads and writes them.
///
/// The hypervisor implements this over per-CPU caches of frames and its direct map (that is where
/// the `unsafe` lives); host tests implement it over a pool of atomics, with fake physical
/// addresses. The engine never touches the general heap: every table page it uses comes from
/// [`alloc_table`](Self::alloc_table).
///
/// One implementation may serve many page tables at once, from many CPUs: every method takes
/// `&self`, and the type must be usable concurrently (per-CPU caches are the implementation's
/// business; the engine does not know which CPU it runs on).
///
/// # Lifetime of a table page
///
/// ```text
///  alloc_table ──► private (zeroed, only this CPU knows it)
///      │   └── lost the install race / map rolled back ──► free_table   (immediate reuse is fine)
///      ▼
///  published (CAS into the parent entry; other CPUs and the IOMMU may walk it)
///      ▼
///  unlinked by unmap (parent entry cleared) ──► chained in a `Gather`
///      ▼  caller: IOTLB + paging-structure-cache invalidation of the gathered range completes
///  Gather::complete ──► retire_table  (the implementation delays reuse by one grace period)
/// ```
pub trait TableMemory {
    /// The atomic type of one table entry, normally [`core::sync::atomic::AtomicU64`].
    type Entry: PteAtomic;

    /// A zero-filled, naturally aligned table area of `bytes` bytes (a power of two: one
    /// translation granule, or several for an Arm stage-2 concatenated root), or `None` when out
    /// of memory. Must never return physical address 0.
    ///
    /// The zeroes only need to be visible to *this* CPU; the engine publishes the table with a
    /// release compare-and-swap, which makes them visible to every CPU that finds the pointer.
    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr>;

    /// Return a table area that was never reachable by another CPU or by the IOMMU (the engine
    /// lost the race to install it, or destroyed the whole table with exclusive access). It may be
    /// reused immediately.
    fn free_table(&self, pa: PhysAddr, bytes: usize);

    /// Return a table area that *was* reachable, after it was unlinked and after the IOTLB and
    /// paging-structure-cache invalidation covering it completed (only [`Gather::complete`]
    /// calls this).
    ///
    /// The implementation must not reuse the area until every CPU that could have been inside an
    /// engine call when the table was unlinked has left that call (a grace period: quiescent
    /// states at VM entry, an epoch scheme, ...). Under the engine's disjoint-range contract no
    /// well-behaved caller can be walking an unlinked table, so this only matters against a caller
    /// that races on overlapping ranges (an untrusted guest); for such a caller the grace period is
    /// what turns "its own mapping is lost" into the worst case instead of "another domain's table
    /// is written".
    ///
    /// [`Gather::complete`]: super::Gather::complete
    fn retire_table(&self, pa: PhysAddr, bytes: usize);

    /// The `entries` entries of the table area at `pa` (an address this source handed out), as one
    /// slice even when the area spans several frames.
    fn table(&self, pa: PhysAddr, entries: usize) -> &[Self::Entry];

    /// Cache maintenance for an IOMMU whose table walker does not snoop the CPU caches (VT-d
    /// ECAP.C = 0, SMMUv3 IDR0.COHACC = 0): make `bytes` bytes at `pa` visible at the point of
    /// coherency, and wait for that to complete, before returning. Called only for page tables
    /// created with `Config::coherent == false`: on a fresh table before it is published, and on
    /// every updated run of entries after the update.
    #[inline(always)]
    fn clean(&self, pa: PhysAddr, bytes: usize) {
        let _ = (pa, bytes);
    }
}

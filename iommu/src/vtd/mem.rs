//! Memory the remapping hardware reads: root, context and PASID structures, the invalidation
//! queue, and the page tables.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::pgtable::TableMemory;

/// Memory for IOMMU-visible structures: the page-table engine's [`TableMemory`] (allocation,
/// reclamation, cache cleaning, and the window onto table pages as `AtomicU64` entries) plus
/// the 128-bit store that context and PASID entries need.
///
/// Every structure the VT-d driver allocates is one 4 KiB page from
/// [`alloc_table(4096)`](TableMemory::alloc_table): root table, context tables, PASID
/// directories and tables, the invalidation queue and the wait-status page.
pub trait VtdMemory: TableMemory<Entry = AtomicU64> {
    /// Stores a 128-bit entry at `pa` (16-byte aligned) as one single-copy-atomic write where
    /// the CPU can (x86 `CMPXCHG16B`). `lo` is bits 63:0.
    ///
    /// The driver relies on atomicity only to *change* a present entry in place
    /// ([`replace`](super::VtdUnit::replace)): a context entry (VT-d 4.1 §9.3) and the low half
    /// of a PASID-table entry (§9.6) keep the table pointer, address width and domain id in one
    /// aligned 128-bit unit, and the remapping hardware fetches such a unit with one read, so it
    /// sees the old entry or the new one. Where the CPU has no 128-bit store, an implementation
    /// must write `hi` before `lo`: every entry the driver makes present carries its P bit in
    /// `lo`, so a not-present entry becomes present only with its last write.
    fn store128(&self, pa: u64, lo: u64, hi: u64);

    /// Stores one 64-bit word of a remapping structure at `pa` (8-byte aligned).
    ///
    /// The default goes through [`table`](TableMemory::table) on the 4 KiB page holding `pa`
    /// (every VT-d structure is such a page). Override it to observe the driver's stores.
    fn store64(&self, pa: u64, value: u64) {
        let page = pa & !0xfff;
        let index = ((pa & 0xfff) / 8) as usize;
        // Release: anything the entry points at (a zeroed table, a filled PASID entry) was
        // written before and must be visible to whoever finds the pointer.
        self.table(page, 512)[index].store(value, Ordering::Release);
    }
}

/// Loads the 64-bit word at `pa` (8-byte aligned) of a structure the driver allocated.
pub(crate) fn load64<T: VtdMemory + ?Sized>(mem: &T, pa: u64) -> u64 {
    let page = pa & !0xfff;
    let index = ((pa & 0xfff) / 8) as usize;
    // Acquire: a pointer read here leads to a structure whose contents are read next.
    mem.table(page, 512)[index].load(Ordering::Acquire)
}

/// Loads `N` consecutive 64-bit words starting at `pa`.
pub(crate) fn load_words<T: VtdMemory + ?Sized, const N: usize>(mem: &T, pa: u64) -> [u64; N] {
    core::array::from_fn(|i| load64(mem, pa + 8 * i as u64))
}

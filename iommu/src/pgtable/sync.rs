//! Atomics facade for the page-table engine.
//!
//! Everything the engine does to shared memory goes through two seams:
//!
//! * [`PteAtomic`], the operations on one 64-bit table entry. Table memory is reached only through
//!   [`TableMemory`](super::TableMemory), whose associated `Entry` type implements this trait, so a
//!   model checker can substitute its own atomic type for the entries. In the hypervisor and in
//!   ordinary host tests the entry type is [`core::sync::atomic::AtomicU64`].
//! * The re-exports below ([`AtomicUsize`], [`Ordering`]), used for the engine's own bookkeeping
//!   (table-page counters), which carries no ordering obligations towards other memory.
//!
//! Why the loom atomics enter through a trait and not through a `cfg(loom)` re-export here: `loom`
//! is a *dev*-dependency of this crate (`[target.'cfg(loom)'.dev-dependencies]`), and Cargo does not
//! make dev-dependencies visible to the library when it is built for an integration test
//! (`tests/pgtable_loom.rs`). A `#[cfg(loom)] pub use loom::sync::atomic::*;` in this file therefore
//! cannot compile in that build. The loom tests instead wrap `loom::sync::atomic::AtomicU64` in a
//! newtype that implements [`PteAtomic`] and hand it to the engine through their `TableMemory`, which
//! puts every entry load, CAS and swap under the model checker, unchanged engine code included.

pub use core::sync::atomic::{AtomicUsize, Ordering};

/// The atomic operations the engine performs on a single page-table entry.
///
/// Implementations must be genuinely atomic with respect to other CPUs *and* to the IOMMU's table
/// walker (a naturally aligned 64-bit access; VT-d 4.1 §9.8 and Arm ARM D8.2 both require walkers to
/// read descriptors with single-copy-atomic 64-bit loads, so a torn entry is never observed).
pub trait PteAtomic: Sync {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
    fn swap(&self, value: u64, order: Ordering) -> u64;
    fn fetch_and(&self, value: u64, order: Ordering) -> u64;
    fn fetch_or(&self, value: u64, order: Ordering) -> u64;
}

impl PteAtomic for core::sync::atomic::AtomicU64 {
    #[inline(always)]
    fn load(&self, order: Ordering) -> u64 {
        self.load(order)
    }
    #[inline(always)]
    fn store(&self, value: u64, order: Ordering) {
        self.store(value, order)
    }
    #[inline(always)]
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        self.compare_exchange(current, new, success, failure)
    }
    #[inline(always)]
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        self.swap(value, order)
    }
    #[inline(always)]
    fn fetch_and(&self, value: u64, order: Ordering) -> u64 {
        self.fetch_and(value, order)
    }
    #[inline(always)]
    fn fetch_or(&self, value: u64, order: Ordering) -> u64 {
        self.fetch_or(value, order)
    }
}

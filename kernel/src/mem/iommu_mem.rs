//! Memory the IOMMUs walk: page-table pages, context/PASID tables, invalidation queues.
//!
//! Frames come from the frame allocator, never from the general heap, and are converted for good
//! into atomic-only memory ([`phys::Frames::into_atomic`]): the only view anyone gets of them is
//! `&[AtomicU64]`, and cache cleaning and the VT-d 128-bit store reach them by address, never
//! through a `&mut [u8]` alias. Freed tables go to this source's own free list, not back to the
//! frame allocator, so a stale `&[AtomicU64]` can never alias a later owner's `&mut`.
//!
//! # Memory the IOMMU writes: atomics, not volatile
//!
//! Some of this memory is written by the device behind the CPU's back: the VT-d invalidation
//! wait status dword, SMMUv3 event-queue records, Access/Dirty bits. Atomics are enough there
//! (a volatile type is not needed): no `&mut` to it exists, so the compiler may not assume it
//! unchanged; an atomic load may not be torn, and the device's writes are naturally aligned
//! single-copy-atomic stores; and although the language lets adjacent relaxed loads be merged,
//! it may not hoist a load out of a polling loop forever (atomic stores must become visible to
//! loads "within a reasonable amount of time", C++ [atomics.order]), and every poll loop here
//! also performs a volatile register read. What atomics do not give is ordering against the
//! device; that comes from `Mmio::dma_rmb` after the register that announces the write.
//!
//! Reclamation: [`TableMemory::retire_table`] must delay reuse until no CPU can still be inside
//! an engine call that saw the table. Several CPUs run IOMMU code (guests' vCPUs call
//! IOAS_MAP/UNMAP at once), but the engine only walks an unlinked table when two calls race on
//! overlapping ranges of one page table, and no caller can: the hypervisor's own domains change
//! under the IOMMU owner exclusively, and guests reach a table only through an IOAS whose area
//! claims fail an overlapping MAP/UNMAP before it reaches the engine (docs/abi.md §2). So once
//! the caller's invalidation has completed no walker remains and the frame goes straight back to
//! the free list. A caller that could race on overlapping ranges would need a deferred list
//! released at each CPU's next quiescent point (VM entry).

use super::frame::{FrameAllocator, PAGE_SIZE};
use super::phys::{self, Frames};
use crate::println;
use core::sync::atomic::{AtomicU64, Ordering};
use iommu::pgtable::{PhysAddr, TableMemory};
use spin::Mutex;

/// Frame-backed IOMMU memory.
pub struct IommuMemory {
    /// Table bytes currently handed out (for leak checks in scenarios).
    live: AtomicU64,
    /// Atomic-only frames freed by the IOMMU code, reused before new frames are converted.
    free: Mutex<FrameAllocator>,
    /// Tables handed out and given back, and pool-lock takes that found the lock held (with
    /// the failed attempts they spun through): evidence for the scaling rows (docs/perf.md).
    allocs: AtomicU64,
    frees: AtomicU64,
    contended: AtomicU64,
    spins: AtomicU64,
}

/// A snapshot of one [`IommuMemory`]'s traffic counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolTraffic {
    pub allocs: u64,
    pub frees: u64,
    pub contended: u64,
    pub spins: u64,
}

impl IommuMemory {
    pub const fn new() -> Self {
        Self {
            live: AtomicU64::new(0),
            free: Mutex::new(FrameAllocator::new()),
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            contended: AtomicU64::new(0),
            spins: AtomicU64::new(0),
        }
    }

    /// The traffic counters so far.
    pub fn traffic(&self) -> PoolTraffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolTraffic {
            allocs: get(&self.allocs),
            frees: get(&self.frees),
            contended: get(&self.contended),
            spins: get(&self.spins),
        }
    }

    /// The free list, counting a take that had to wait.
    fn pool(&self) -> spin::MutexGuard<'_, FrameAllocator> {
        let mut tried = 0u64;
        loop {
            if let Some(g) = self.free.try_lock() {
                if tried > 0 {
                    self.contended.fetch_add(1, Ordering::Relaxed);
                    self.spins.fetch_add(tried, Ordering::Relaxed);
                }
                return g;
            }
            tried += 1;
            core::hint::spin_loop();
        }
    }

    /// Table bytes currently allocated through this source.
    pub fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Atomic-only bytes waiting in this source's free list: memory that is free, but only for
    /// IOMMU (and nested-paging) tables, so leak checks count it with the frame allocator's.
    pub fn pooled_bytes(&self) -> u64 {
        self.free.lock().free_bytes()
    }

    fn zero(pa: PhysAddr, bytes: u64) -> Option<()> {
        for w in phys::atomic_u64s(pa, (bytes / 8) as usize).ok()? {
            w.store(0, Ordering::Relaxed);
        }
        Some(())
    }
}

impl Default for IommuMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl TableMemory for IommuMemory {
    type Entry = AtomicU64;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        let bytes = (bytes as u64).max(PAGE_SIZE);
        if !bytes.is_power_of_two() {
            return None;
        }
        self.allocs.fetch_add(1, Ordering::Relaxed);
        let reused = self.pool().alloc(bytes / PAGE_SIZE, bytes, u64::MAX);
        let pa = match reused {
            Some(pa) => {
                Self::zero(pa, bytes)?;
                pa
            }
            None => Frames::alloc(bytes / PAGE_SIZE, bytes, u64::MAX)?
                .into_atomic()
                .ok()?,
        };
        self.live.fetch_add(bytes, Ordering::Relaxed);
        Some(pa)
    }

    fn free_table(&self, pa: PhysAddr, bytes: usize) {
        let bytes = (bytes as u64).max(PAGE_SIZE);
        self.live.fetch_sub(bytes, Ordering::Relaxed);
        self.frees.fetch_add(1, Ordering::Relaxed);
        self.pool().free(pa, bytes / PAGE_SIZE);
    }

    fn retire_table(&self, pa: PhysAddr, bytes: usize) {
        // No grace period is needed: every engine call on a table comes either from the
        // hypervisor's own domains (control paths, under the IOMMU owner exclusively) or through
        // an IOAS, whose area claims admit concurrent MAP/UNMAP calls only on disjoint IOVA
        // ranges (docs/abi.md §2; overlapping calls fail before they reach the engine). Under the
        // engine's disjoint-range contract no CPU can be walking a table that was unlinked
        // (`TableMemory::retire_table`), so the area may be reused at once.
        self.free_table(pa, bytes);
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[AtomicU64] {
        phys::atomic_u64s(pa, entries).expect("IOMMU table outside atomic-only memory")
    }

    fn clean(&self, pa: PhysAddr, bytes: usize) {
        phys::clean_atomic(pa, bytes as u64).expect("IOMMU table outside atomic-only memory");
    }
}

#[cfg(target_arch = "x86_64")]
impl iommu::vtd::VtdMemory for IommuMemory {
    fn store128(&self, pa: u64, lo: u64, hi: u64) {
        phys::store128_atomic(pa, lo, hi).expect("VT-d entry outside atomic-only memory");
    }
}

/// The one instance (frames are global; per-CPU caches come with secondary CPUs).
pub static IOMMU_MEMORY: IommuMemory = IommuMemory::new();

/// `report: iommu queue locks: ...`: the queue-lock and table-pool counters at the end of a run
/// (every scenario; the `*-guest-bench-smp` ones check the line).
pub fn report() {
    let q = iommu::queue_lock::contention();
    let t = IOMMU_MEMORY.traffic();
    println!(
        "report: iommu queue locks: {} taken, {} contended ({} spins), {} completion polls; table pool: {} allocs, {} frees, {} contended ({} spins)",
        q.taken, q.contended, q.spins, q.wait_polls, t.allocs, t.frees, t.contended, t.spins
    );
}

//! Memory the IOMMUs walk: page-table pages, context/PASID tables, invalidation queues.
//!
//! Frames come from the frame allocator, never from the general heap, and are reached through
//! the direct map as arrays of `AtomicU64` (the only view the IOMMU code gets).
//!
//! Reclamation: [`TableMemory::retire_table`] must delay reuse until no CPU can still be inside
//! an engine call that saw the table. Today exactly one CPU runs IOMMU code (the boot CPU; vCPUs
//! arrive with the guest issue), so once the caller's invalidation has completed no walker
//! remains and the frame goes straight back. When secondary CPUs exist this becomes a per-CPU
//! deferred list released at each CPU's next quiescent point (VM entry).

use super::frame::{FRAMES, PAGE_SIZE};
use crate::arch;
use core::sync::atomic::{AtomicU64, Ordering};
use iommu::pgtable::{PhysAddr, TableMemory};

/// Frame-backed IOMMU memory.
pub struct IommuMemory {
    /// Table pages currently handed out (for leak checks in scenarios).
    live: AtomicU64,
}

impl IommuMemory {
    pub const fn new() -> Self {
        Self {
            live: AtomicU64::new(0),
        }
    }

    /// Table bytes currently allocated through this source.
    pub fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    fn va(pa: PhysAddr, bytes: usize) -> usize {
        // Only addresses this source handed out reach here; they are RAM in the direct map.
        super::phys::frame_bytes_mut(pa, bytes as u64)
            .expect("IOMMU table outside the direct map")
            .as_mut_ptr() as usize
    }
}

impl TableMemory for IommuMemory {
    type Entry = AtomicU64;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        let bytes = (bytes as u64).max(PAGE_SIZE);
        if !bytes.is_power_of_two() {
            return None;
        }
        let pa = FRAMES.lock().alloc(bytes / PAGE_SIZE, bytes, u64::MAX)?;
        super::phys::frame_bytes_mut(pa, bytes).ok()?.fill(0);
        self.live.fetch_add(bytes, Ordering::Relaxed);
        Some(pa)
    }

    fn free_table(&self, pa: PhysAddr, bytes: usize) {
        let bytes = (bytes as u64).max(PAGE_SIZE);
        self.live.fetch_sub(bytes, Ordering::Relaxed);
        FRAMES.lock().free(pa, bytes / PAGE_SIZE);
    }

    fn retire_table(&self, pa: PhysAddr, bytes: usize) {
        // One CPU runs IOMMU code (see the module docs): the grace period has already elapsed.
        self.free_table(pa, bytes);
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[AtomicU64] {
        super::phys::atomic_u64s(pa, entries).expect("IOMMU table outside the direct map")
    }

    fn clean(&self, pa: PhysAddr, bytes: usize) {
        arch::cache::clean(Self::va(pa, bytes), bytes);
    }
}

/// The one instance (frames are global; per-CPU caches come with secondary CPUs).
pub static IOMMU_MEMORY: IommuMemory = IommuMemory::new();

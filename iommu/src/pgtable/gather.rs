//! The invalidation gather: what a batch of unmaps owes the IOTLB, and the table pages that may be
//! reused only after the IOTLB has paid.

use super::sync::{Ordering, PteAtomic};
use super::{IovaRange, PhysAddr, TableMemory};

/// Accumulates the effect of one or more [`unmap`](super::PageTable::unmap) (and dirty-clearing)
/// calls, so the caller issues **one** invalidation per batch.
///
/// Protocol:
/// 1. call `unmap` any number of times with the same gather;
/// 2. invalidate the IOTLB (and, if [`frees_tables`](Self::frees_tables), the paging-structure
///    caches) for [`range`](Self::range), and wait for completion (VT-d invalidation wait
///    descriptor, SMMUv3 `CMD_SYNC`);
/// 3. call [`complete`](Self::complete), which hands the unlinked table pages to
///    [`TableMemory::retire_table`]. Pages are never handed back earlier.
///
/// The range is the union hull of everything added: one range, possibly covering gaps
/// ([`has_gaps`](Self::has_gaps)), which over-invalidates but never under-invalidates. Callers
/// that shadow the table (a caching-mode vIOMMU) and want exact ranges should flush per call.
///
/// Unlinked pages are chained through their own first entry, so a gather needs no storage of its
/// own however many tables one unmap frees. The links are not-present descriptors in every format
/// (bits 1:0 clear), so a stale walker treats them as empty.
#[derive(Debug)]
#[must_use = "a gather holds table pages that leak unless `complete` is called"]
pub struct Gather {
    start: u64,
    end: u64,
    gaps: bool,
    leaf_entries: u64,
    /// Shift of the smallest leaf cleared, plus one; 0 while none was. With this and the empty
    /// range kept as `start == end == 0`, a new gather is all zeroes, which the compiler
    /// builds with zero stores instead of copying a constant holding `u64::MAX` / `u32::MAX`
    /// markers.
    min_leaf_shift_p1: u32,
    head: PhysAddr,
    tables: usize,
    table_bytes: usize,
}

impl Default for Gather {
    fn default() -> Self {
        Self::new()
    }
}

/// Table-link decoding ignores bits a hardware access-flag update could set (all below bit 12).
const LINK_ADDR: u64 = 0x000f_ffff_ffff_f000;

impl Gather {
    pub const fn new() -> Self {
        Gather {
            start: 0,
            end: 0,
            gaps: false,
            leaf_entries: 0,
            min_leaf_shift_p1: 0,
            head: 0,
            tables: 0,
            table_bytes: 0,
        }
    }

    /// The IOVA range to invalidate, or `None` if nothing needs invalidating.
    pub fn range(&self) -> Option<IovaRange> {
        (self.start < self.end).then_some(IovaRange {
            start: self.start,
            end: self.end,
        })
    }

    /// Nothing to invalidate and nothing to free.
    pub fn is_empty(&self) -> bool {
        self.start >= self.end && self.tables == 0
    }

    /// The range covers gaps between separately added ranges.
    pub fn has_gaps(&self) -> bool {
        self.gaps
    }

    /// Leaf entries cleared (or made clean) so far.
    pub fn leaf_entries(&self) -> u64 {
        self.leaf_entries
    }

    /// Size of the smallest leaf cleared: the invalidation granule hint (VT-d address mask, SMMU
    /// TG/TTL), or `None` if only tables were unlinked.
    pub fn min_leaf_size(&self) -> Option<u64> {
        (self.min_leaf_shift_p1 != 0).then(|| 1u64 << (self.min_leaf_shift_p1 - 1))
    }

    /// Table pages unlinked and waiting for `complete`.
    pub fn table_pages(&self) -> usize {
        self.tables
    }

    /// Tables were unlinked: the invalidation must cover non-leaf (paging-structure) caches too,
    /// i.e. VT-d PSI with IH = 0, SMMUv3 `CMD_TLBI_*_VA(A)` with Leaf = 0.
    pub fn frees_tables(&self) -> bool {
        self.tables != 0
    }

    /// Call after the invalidation of [`range`](Self::range) has *completed*: retires every
    /// gathered table page through `mem` and resets the gather.
    pub fn complete<M: TableMemory>(&mut self, mem: &M) {
        let (mut pa, count, bytes) = (self.head, self.tables, self.table_bytes);
        self.tables = 0;
        for _ in 0..count {
            // Relaxed: this gather (and so this CPU, or one that received the gather through a
            // synchronising hand-off) wrote the link.
            let next = mem.table(pa, 1)[0].load(Ordering::Relaxed) & LINK_ADDR;
            mem.retire_table(pa, bytes);
            pa = next;
        }
        *self = Gather::new();
    }

    /// Call when the invalidation of [`range`](Self::range) failed: forgets the gathered table
    /// pages (the hardware may still walk them, so they are leaked, never reused) and resets
    /// the gather.
    pub fn leak(&mut self) {
        // The chain is dropped unread: its pages stay out of every allocator.
        self.tables = 0;
        *self = Gather::new();
    }

    pub(crate) fn add_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if self.start >= self.end {
            // The first range.
            self.start = start;
            self.end = end;
            return;
        }
        if end < self.start || start > self.end {
            self.gaps = true;
        }
        self.start = self.start.min(start);
        self.end = self.end.max(end);
    }

    pub(crate) fn add_leaves(&mut self, entries: u64, shift: u32) {
        self.leaf_entries += entries;
        // `shift` < 64, so `shift + 1` never wraps to the "none" value.
        if self.min_leaf_shift_p1 == 0 || shift < self.min_leaf_shift_p1 - 1 {
            self.min_leaf_shift_p1 = shift + 1;
        }
    }

    /// Chains an unlinked table page.
    pub(crate) fn push_table<M: TableMemory>(&mut self, mem: &M, pa: PhysAddr, bytes: usize) {
        debug_assert!(self.tables == 0 || self.table_bytes == bytes);
        // Relaxed: the link is read back only by `complete`, on this CPU. The page is already
        // unlinked; a stale walker sees a not-present entry.
        mem.table(pa, 1)[0].store(self.head, Ordering::Relaxed);
        self.head = pa;
        self.tables += 1;
        self.table_bytes = bytes;
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        debug_assert!(
            self.tables == 0,
            "Gather dropped with {} table pages not completed",
            self.tables
        );
    }
}

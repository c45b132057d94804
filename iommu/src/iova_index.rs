//! The IOVA index of the lock-free area table (`area_slots.rs`): which slots may hold an area
//! overlapping a range, so that IOAS_MAP's overlap check and IOAS_UNMAP's range lookup visit
//! the slots near the range instead of every slot in use (issue 11: the scan was O(live
//! areas) per call).
//!
//! # Shape
//!
//! Announcement bitmaps per IOVA bucket, at six granules like the levels of a 4 KiB-granule
//! page table (4 KiB, 2 MiB, 1 GiB, 512 GiB, 256 TiB, 128 PiB). An area of `len` bytes lives
//! at the *level* of the smallest granule `>= len`, so it touches at most two granules there
//! (an area larger than the top granule touches several of the top level). Each level has
//! [`BUCKETS`] buckets; granule `g` falls in bucket `bucket_of(g)` (Fibonacci hashing). A
//! bucket is a counter (how many announcements it holds) followed by one bit per slot; each
//! level also has a bitmap of the slots at that level. An area sets its slot's bit in its
//! level's bitmap and in the bucket of every granule it touches at its level (every bucket
//! when it touches `BUCKETS` granules or more).
//!
//! A lookup of `[start, last]` reads, at every level, the buckets of the granules the range
//! touches, skipping those whose counter is 0, or the level's bitmap when the range touches
//! more than [`WIDE`] granules there; it visits the union of their bits. Two overlapping
//! ranges share a byte; at the level of either area that byte's granule is touched by both,
//! so its bucket (and the level's bitmap) holds the area's bit: the union contains every slot
//! whose announced range overlaps the lookup's (plus slots of colliding granules or of the
//! same level elsewhere, which the caller's overlap test drops). A lookup that would read more
//! than [`MAX_QUERY`] arrays returns `None`: the caller scans every slot in use instead.
//!
//! Cost: a 4 KiB MAP writes one level-bitmap bit, one counter and one bucket bit (as many to
//! withdraw them), and its lookup reads six counters and the bit words of the non-empty
//! buckets its page falls in; a 2 MiB aligned area is one bucket of level 1. An UNMAP of a
//! large range reads the bitmap of the levels it spans widely: the areas of those size
//! classes, which for the areas it removes is their own number. Memory:
//! `LEVELS * (BUCKETS * (1 + cap / 64) + 8 * cap / 64)` words (30 KiB for 512 slots), fixed
//! at construction (IOAS_ALLOC): nothing here allocates afterwards.
//!
//! # Orderings (the rules of `area_slots.rs` they serve)
//!
//! * [`IovaIndex::insert`] runs before the caller's SC fence and [`IovaIndex::query`] after
//!   the caller's SC fence. For two overlapping MAPs A and B whose fences are ordered A then
//!   B, B's loads of the shared bucket's counter and bit word (or of the level's bitmap) read
//!   A's increments or later modifications (C++20 \[atomics.fences\]: a store sequenced
//!   before an SC fence is seen by a load sequenced after a later SC fence); the only later
//!   modification that removes A's bit or count is A's own removal. So B visits A's slot, as
//!   rule 1 needs. `Relaxed` RMWs suffice for the insert: the fields a reader needs are
//!   published by the slot's own state word (Release PENDING / Acquire load).
//! * [`IovaIndex::remove`] runs when the slot's owner frees it, after the invalidation round
//!   of an UNMAP: its RMWs are `Release` and the lookup's loads `Acquire`, so a lookup that
//!   misses a slot because its bit (or its bucket's count) is gone synchronises with the
//!   removal (directly, or through the release sequence of later RMWs on the word) and comes
//!   after that round (rule 4, forget after flush).
//! * Only the owner of a slot (between taking and freeing it) sets or clears its bits; the
//!   next owner takes the slot through the free bitmap (AcqRel), after the previous owner's
//!   removal, so the bits it finds are clear.
//!
//! Two MAPs on disjoint ranges write a common word when their granules collide in a bucket
//! (same level, same hash), and when their slots share a word of their level's bitmap: slots
//! are taken from a word picked by the vCPU (`area_slots.rs`), so two vCPUs share one only
//! when one's share of the slots is used up, as for the free-slot bitmap.
//!
//! `tests/iova_index_loom.rs` models the concurrent steps against loom's atomics.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::area_slots::LINE;
use crate::area_sync::AtomicU64;

/// log2 of each level's granule: the levels of a 4 KiB-granule page table.
const SHIFTS: [u32; LEVELS] = [12, 21, 30, 39, 48, 57];
pub const LEVELS: usize = 6;
/// Buckets per level.
pub const BUCKETS: usize = 64;
/// A lookup touching more granules than this at a level reads that level's slot bitmap
/// instead of its buckets.
pub const WIDE: u64 = 8;
/// Above this many bit arrays to read (non-empty buckets and level bitmaps) a lookup gives
/// up: the caller scans every slot in use.
pub const MAX_QUERY: usize = 16;

/// The level of an area of `len` bytes (`len >= 1`): the smallest granule holding it.
fn level_of(len: u64) -> usize {
    SHIFTS
        .iter()
        .position(|&s| len <= 1u64 << s)
        .unwrap_or(LEVELS - 1)
}

/// The granules `[start, last]` touches at `level`: the first and how many.
fn granules(level: usize, start: u64, last: u64) -> (u64, u64) {
    let (g0, g1) = (start >> SHIFTS[level], last >> SHIFTS[level]);
    // At most 2^52 granules, no overflow (`last < start`, which no caller passes, counts as
    // one granule).
    (g0, g1.saturating_sub(g0) + 1)
}

/// The bucket of granule `g`: Fibonacci hashing, so that consecutive granules spread over
/// the buckets and two ranges a power of two apart (two vCPUs' regions) do not walk the same
/// buckets in step (which would make their maps write the same words).
fn bucket_of(g: u64) -> usize {
    // The top 6 bits: < 64 = BUCKETS.
    (g.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize
}

/// The bit arrays a lookup reads: at most [`MAX_QUERY`].
pub struct Query {
    /// Word offsets of the arrays' first bit words, and the distance between their words
    /// (1 or `LINE`). 32 bits each (an index of `u32::MAX` words would be 32 GiB): the plan is
    /// built and copied on every MAP and UNMAP, so it is kept small.
    at: [(u32, u32); MAX_QUERY],
    n: usize,
}

impl Query {
    /// Reads nothing.
    pub const EMPTY: Query = Query {
        at: [(0, 0); MAX_QUERY],
        n: 0,
    };

    /// The union of the arrays' `w`-th bit words (`Acquire`: module docs, second point).
    pub fn word(&self, ix: &IovaIndex, w: usize) -> u64 {
        self.at[..self.n].iter().fold(0, |acc, &(at, stride)| {
            acc | ix.words[at as usize + w * stride as usize].load(Acquire)
        })
    }

    /// Whether no bucket the range touches has an announced slot.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn push(&mut self, at: usize, stride: usize) -> Option<()> {
        // Both fit: `IovaIndex::new` refuses an index of more than `u32::MAX` words.
        let at = (at as u32, stride as u32);
        if self.at[..self.n].contains(&at) {
            return Some(());
        }
        *self.at.get_mut(self.n)? = at;
        self.n += 1;
        Some(())
    }
}

/// The index: see the module docs.
pub struct IovaIndex {
    /// Bit words per bit array (`cap` bits).
    per_bucket: usize,
    /// `LEVELS * BUCKETS` buckets of `1 + per_bucket` words (the counter, then the bits), then
    /// `LEVELS` level bitmaps of `per_bucket` words, one per cache line (`LINE` apart): slots
    /// of different vCPUs are in different words (`area_slots.rs`), so their maps at one
    /// level do not write a common line.
    words: Box<[AtomicU64]>,
}

impl IovaIndex {
    /// An index for slots `0..cap`; `None` if the memory cannot be allocated.
    pub fn new(cap: usize) -> Option<Self> {
        let per_bucket = cap.div_ceil(64);
        let n = LEVELS
            .checked_mul(BUCKETS)?
            .checked_mul(per_bucket.checked_add(1)?)?
            .checked_add(LEVELS.checked_mul(per_bucket)?.checked_mul(LINE)?)?;
        // Word offsets are kept in 32 bits (`Query`).
        if u32::try_from(n).is_err() {
            return None;
        }
        let mut v = Vec::new();
        v.try_reserve_exact(n).ok()?;
        for _ in 0..n {
            v.push(AtomicU64::new(0));
        }
        Some(IovaIndex {
            per_bucket,
            words: v.into_boxed_slice(),
        })
    }

    /// Word offset of bucket `b` of `level` (its counter; the bits follow).
    fn bucket(&self, level: usize, b: usize) -> usize {
        (level * BUCKETS + b) * (1 + self.per_bucket)
    }

    /// Word offset of the slot bitmap of `level`.
    fn level_bits(&self, level: usize) -> usize {
        LEVELS * BUCKETS * (1 + self.per_bucket) + level * self.per_bucket * LINE
    }

    /// Calls `f` with the bucket of every granule `[start, last]` touches at `level` (every
    /// bucket, once, when that is `BUCKETS` granules or more).
    fn each_bucket(&self, level: usize, start: u64, last: u64, mut f: impl FnMut(usize)) {
        let (g0, n) = granules(level, start, last);
        if n >= BUCKETS as u64 {
            (0..BUCKETS).for_each(|b| f(self.bucket(level, b)));
        } else {
            (g0..g0 + n).for_each(|g| f(self.bucket(level, bucket_of(g))));
        }
    }

    /// Announces slot `slot` for `[start, last]` (`last >= start`). The caller owns the slot
    /// and issues an SC fence before its lookup (module docs, first point).
    pub fn insert(&self, slot: usize, start: u64, last: u64) {
        let level = level_of(last.saturating_sub(start).saturating_add(1));
        let (w, bit) = (slot / 64, 1u64 << (slot % 64));
        // Relaxed: ordered for lookups by the caller's SC fence (module docs).
        self.words[self.level_bits(level) + w * LINE].fetch_or(bit, Relaxed);
        self.each_bucket(level, start, last, |at| {
            self.words[at].fetch_add(1, Relaxed);
            self.words[at + 1 + w].fetch_or(bit, Relaxed);
        });
    }

    /// Withdraws what [`insert`](Self::insert) of the same arguments announced. Release: a
    /// lookup that no longer sees the slot comes after everything the owner did before
    /// (module docs, second point).
    pub fn remove(&self, slot: usize, start: u64, last: u64) {
        let level = level_of(last.saturating_sub(start).saturating_add(1));
        let (w, bit) = (slot / 64, 1u64 << (slot % 64));
        self.each_bucket(level, start, last, |at| {
            self.words[at + 1 + w].fetch_and(!bit, Release);
            self.words[at].fetch_sub(1, Release);
        });
        self.words[self.level_bits(level) + w * LINE].fetch_and(!bit, Release);
    }

    /// The bit arrays that hold every slot announced for a range overlapping `[start, last]`
    /// (`last >= start`): at each level, the non-empty buckets of the granules the range
    /// touches, or the level's slot bitmap if that is more than [`WIDE`] granules. `None` if
    /// that is more than [`MAX_QUERY`] arrays (the caller scans every slot instead).
    pub fn query(&self, start: u64, last: u64) -> Option<Query> {
        let mut q = Query::EMPTY;
        for level in 0..LEVELS {
            let (g0, n) = granules(level, start, last);
            if n > WIDE {
                q.push(self.level_bits(level), LINE)?;
                continue;
            }
            for g in g0..g0 + n {
                let at = self.bucket(level, bucket_of(g));
                // Acquire: module docs (a count of 0 left by a removal comes after it).
                if self.words[at].load(Acquire) != 0 {
                    q.push(at + 1, 1)?;
                }
            }
        }
        Some(q)
    }

    /// Bit words per bit array (`cap.div_ceil(64)`).
    pub fn words(&self) -> usize {
        self.per_bucket
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn slots(ix: &IovaIndex, start: u64, last: u64) -> Option<Vec<usize>> {
        let q = ix.query(start, last)?;
        let mut v = Vec::new();
        for w in 0..ix.words() {
            let mut bits = q.word(ix, w);
            while bits != 0 {
                v.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        Some(v)
    }

    #[test]
    fn levels_are_the_smallest_granule_holding_the_area() {
        assert_eq!(level_of(1), 0);
        assert_eq!(level_of(4096), 0);
        assert_eq!(level_of(4097), 1);
        assert_eq!(level_of(2 << 20), 1);
        assert_eq!(level_of(1 << 30), 2);
        assert_eq!(level_of(1 << 57), 5);
        assert_eq!(level_of(u64::MAX), 5);
        assert_eq!(granules(0, 0x1000, 0x1fff), (1, 1));
        assert_eq!(granules(1, 0x1ff000, 0x200fff), (0, 2));
        assert_eq!(granules(0, 0, u64::MAX), (0, 1 << 52));
        assert_eq!(granules(5, 0, u64::MAX), (0, 128));
    }

    /// Consecutive granules spread over the buckets, and two regions 1 GiB apart do not walk
    /// the same buckets in step.
    #[test]
    fn buckets_spread() {
        let mut hit = [false; BUCKETS];
        (0..64u64).for_each(|g| hit[bucket_of(g)] = true);
        assert!(hit.iter().filter(|&&h| h).count() >= 40, "{hit:?}");
        let apart = (0..64u64)
            .filter(|&g| bucket_of(g) != bucket_of(g + (1 << 18)))
            .count();
        assert!(apart >= 60, "{apart}");
    }

    /// Every pair of overlapping ranges, of every size class, finds each other; a disjoint
    /// one in another bucket is not visited; removal withdraws exactly what was announced.
    #[test]
    fn overlapping_ranges_always_meet() {
        let ix = IovaIndex::new(130).unwrap();
        let areas: [(u64, u64); 6] = [
            (0x1000, 0x1fff),                           // 4 KiB, level 0
            (0x1ff000, 0x200fff),                       // 8 KiB across a 2 MiB line, level 1
            (0x4000_0000, 0x4000_0000 + (2 << 20) - 1), // 2 MiB aligned, level 1
            (0x3fff_f000, 0x8000_0fff),                 // just over 1 GiB, level 3
            (1 << 62, u64::MAX),                        // huge, top level, every bucket
            (0x7f_0000_0000, 0x7f_0000_0fff),           // 4 KiB far away
        ];
        for (i, &(s, l)) in areas.iter().enumerate() {
            ix.insert(i * 25, s, l);
        }
        let probes: [(u64, u64); 7] = [
            (0x1000, 0x1000),
            (0x200000, 0x200000),
            (0x4010_0000, 0x4010_0fff),
            (0x8000_0000, 0x8000_0fff),
            (u64::MAX - 0xfff, u64::MAX),
            (0x7f_0000_0000, 0x7f_0000_0000),
            (0x2000, 0x1f_ffff),
        ];
        for &(ps, pl) in &probes {
            let got = slots(&ix, ps, pl).unwrap();
            for (i, &(s, l)) in areas.iter().enumerate() {
                if s <= pl && ps <= l {
                    assert!(got.contains(&(i * 25)), "{ps:#x}: missed area {i}");
                }
            }
        }
        // A page of bucket 5 at level 0 sees none of the level-0 areas of other buckets.
        let got = slots(&ix, 5 << 12, 5 << 12).unwrap();
        assert!(!got.contains(&0) && !got.contains(&125));
        for (i, &(s, l)) in areas.iter().enumerate() {
            ix.remove(i * 25, s, l);
        }
        assert!(ix.words.iter().all(|w| w.load(Relaxed) == 0));
        assert!(ix.query(0x1000, 0x1fff).unwrap().is_empty());
    }

    #[test]
    fn a_wide_lookup_reads_the_level_bitmap_or_gives_up() {
        let ix = IovaIndex::new(64).unwrap();
        assert!(ix.query(0, 0xfff).unwrap().is_empty());
        // Whole space and reversed bounds: no overflow.
        ix.insert(1, 0, u64::MAX);
        ix.remove(1, 0, u64::MAX);
        assert!(ix.query(5, 4).unwrap().is_empty());
        // Wide at every level: the six level bitmaps.
        assert_eq!(ix.query(0, u64::MAX).unwrap().n, LEVELS);
        // 256 granules of level 0: its bitmap; one granule of the others, all empty.
        assert_eq!(ix.query(0, (1 << 20) - 1).unwrap().n, 1);
        ix.insert(3, 0, 0xfff);
        ix.insert(4, 0x7f_0000_0000, 0x7f_0000_0fff);
        assert_eq!(slots(&ix, 0, (1 << 20) - 1), Some(alloc::vec![3, 4]));
        assert_eq!(slots(&ix, 0, (8 << 12) - 1), Some(alloc::vec![3]));
        // Eight granules of level 1 (its buckets), 4096 of level 0 (its bitmap).
        for p in 0..17u64 {
            let at = p << 21;
            ix.insert(10 + p as usize, at, at + 0x1fffff);
            ix.insert(30 + p as usize, at, at + 0xfff);
        }
        let got = slots(&ix, 0, (8 << 21) - 1).unwrap();
        assert!((10..18).chain(30..38).all(|i| got.contains(&i)), "{got:?}");
    }
}

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
//! [`BUCKETS`] buckets; granule `g` falls in bucket `g % BUCKETS`. A bucket is a counter (how
//! many slots are announced in it) followed by one bit per slot. An area sets its slot's bit
//! in the buckets of the granules it touches at its level (all of them when it touches
//! `BUCKETS` granules or more).
//!
//! A lookup of `[start, last]` reads, at every level, the buckets of the granules the range
//! touches, skipping those whose counter is 0, and visits the union of their bits. Two
//! overlapping ranges share a byte; at the level of either area that byte's granule is
//! touched by both, so its bucket holds the area's bit: the union contains every slot whose
//! announced range overlaps the lookup's (plus slots of colliding granules, which the
//! caller's overlap test drops). A lookup touching more than [`MAX_QUERY_BUCKETS`] buckets
//! (an UNMAP of a large range, or of everything) returns `None`: the caller scans every slot
//! in use instead, whose cost is then of the order of the areas the range holds anyway.
//!
//! Cost: a 4 KiB MAP writes one counter and one bit (two with its removal), and its lookup
//! reads six counters and the bit words of the non-empty buckets its page falls in; a 2 MiB
//! aligned area is one bucket of level 1. Memory: `LEVELS * BUCKETS * (1 + cap / 64)` words,
//! fixed at construction (IOAS_ALLOC): nothing here allocates afterwards.
//!
//! # Orderings (the rules of `area_slots.rs` they serve)
//!
//! * [`IovaIndex::insert`] runs before the caller's SC fence and [`IovaIndex::query`] after
//!   the caller's SC fence. For two overlapping MAPs A and B whose fences are ordered A then
//!   B, B's loads of the shared bucket's counter and bit word read A's increments or later
//!   modifications (C++20 \[atomics.fences\]: a store sequenced before an SC fence is seen by a
//!   load sequenced after a later SC fence); the only later modification that removes A's
//!   bit or count is A's own removal. So B visits A's slot, as rule 1 needs. `Relaxed` RMWs
//!   suffice for the insert: the fields a reader needs are published by the slot's own
//!   state word (Release PENDING / Acquire load).
//! * [`IovaIndex::remove`] runs when the slot's owner frees it, after the invalidation round
//!   of an UNMAP: its RMWs are `Release` and the lookup's loads `Acquire`, so a lookup that
//!   misses a slot because its bit (or its bucket's count) is gone synchronises with the
//!   removal (directly, or through the release sequence of later RMWs on the word) and comes
//!   after that round (rule 4, forget after flush).
//! * Only the owner of a slot (between taking and freeing it) sets or clears its bits; the
//!   next owner takes the slot through the free bitmap (AcqRel), after the previous owner's
//!   removal, so the bits it finds are clear.
//!
//! Two MAPs on disjoint ranges write a common word only when their granules collide in a
//! bucket (same level, granules equal modulo [`BUCKETS`]); for 4 KiB maps that is 256 KiB
//! apart.
//!
//! `tests/iova_index_loom.rs` models the concurrent steps against loom's atomics.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::area_sync::AtomicU64;

/// log2 of each level's granule: the levels of a 4 KiB-granule page table.
const SHIFTS: [u32; LEVELS] = [12, 21, 30, 39, 48, 57];
pub const LEVELS: usize = 6;
/// Buckets per level.
pub const BUCKETS: usize = 64;
/// Above this many non-empty buckets (or more than `BUCKETS + LEVELS` buckets to look at) a
/// lookup gives up: the caller scans every slot in use.
pub const MAX_QUERY_BUCKETS: usize = 16;

/// The level of an area of `len` bytes (`len >= 1`): the smallest granule holding it.
fn level_of(len: u64) -> usize {
    SHIFTS
        .iter()
        .position(|&s| len <= 1u64 << s)
        .unwrap_or(LEVELS - 1)
}

/// The buckets the granules of `[start, last]` at `level` fall in: `(first, count)`, to be
/// taken modulo [`BUCKETS`].
fn buckets(level: usize, start: u64, last: u64) -> (usize, usize) {
    let (g0, g1) = (start >> SHIFTS[level], last >> SHIFTS[level]);
    // `last >= start`, so `g1 >= g0`; at most 2^52 granules, no overflow.
    let n = g1 - g0 + 1;
    if n >= BUCKETS as u64 {
        (0, BUCKETS)
    } else {
        // n < BUCKETS.
        ((g0 % BUCKETS as u64) as usize, n as usize)
    }
}

/// The buckets a lookup reads: at most [`MAX_QUERY_BUCKETS`] non-empty ones.
pub struct Query {
    /// Word offsets of the buckets' bit words.
    at: [usize; MAX_QUERY_BUCKETS],
    n: usize,
}

impl Query {
    /// The union of the buckets' `w`-th bit words (`Acquire`: module docs, second point).
    pub fn word(&self, ix: &IovaIndex, w: usize) -> u64 {
        self.at[..self.n]
            .iter()
            .fold(0, |acc, &at| acc | ix.words[at + 1 + w].load(Acquire))
    }

    /// Whether no bucket the range touches has an announced slot.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// The index: see the module docs.
pub struct IovaIndex {
    /// Bit words per bucket (`cap` bits).
    per_bucket: usize,
    /// `LEVELS * BUCKETS` blocks of `1 + per_bucket` words: the counter, then the bits.
    words: Box<[AtomicU64]>,
}

impl IovaIndex {
    /// An index for slots `0..cap`; `None` if the memory cannot be allocated.
    pub fn new(cap: usize) -> Option<Self> {
        let per_bucket = cap.div_ceil(64);
        let n = LEVELS
            .checked_mul(BUCKETS)?
            .checked_mul(per_bucket.checked_add(1)?)?;
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

    /// Word offset of bucket `b` of `level`.
    fn block(&self, level: usize, b: usize) -> usize {
        (level * BUCKETS + b % BUCKETS) * (1 + self.per_bucket)
    }

    /// Announces slot `slot` for `[start, last]` (`last >= start`). The caller owns the slot
    /// and issues an SC fence before its lookup (module docs, first point).
    pub fn insert(&self, slot: usize, start: u64, last: u64) {
        let level = level_of(last - start + 1);
        let (first, n) = buckets(level, start, last);
        for b in first..first + n {
            let at = self.block(level, b);
            // Relaxed: ordered for lookups by the caller's SC fence (module docs).
            self.words[at].fetch_add(1, Relaxed);
            self.words[at + 1 + slot / 64].fetch_or(1 << (slot % 64), Relaxed);
        }
    }

    /// Withdraws what [`insert`](Self::insert) of the same arguments announced. Release: a
    /// lookup that no longer sees the slot comes after everything the owner did before
    /// (module docs, second point).
    pub fn remove(&self, slot: usize, start: u64, last: u64) {
        let level = level_of(last - start + 1);
        let (first, n) = buckets(level, start, last);
        for b in first..first + n {
            let at = self.block(level, b);
            self.words[at + 1 + slot / 64].fetch_and(!(1 << (slot % 64)), Release);
            self.words[at].fetch_sub(1, Release);
        }
    }

    /// The buckets that hold every slot announced for a range overlapping `[start, last]`
    /// (`last >= start`), or `None` if that is more than [`MAX_QUERY_BUCKETS`] non-empty
    /// buckets or more than `BUCKETS + LEVELS` to look at (the caller scans every slot).
    pub fn query(&self, start: u64, last: u64) -> Option<Query> {
        let mut q = Query {
            at: [0; MAX_QUERY_BUCKETS],
            n: 0,
        };
        let mut looked = 0;
        for level in 0..LEVELS {
            let (first, n) = buckets(level, start, last);
            looked += n;
            if looked > BUCKETS + LEVELS {
                return None;
            }
            for b in first..first + n {
                let at = self.block(level, b);
                // Acquire: module docs (a count of 0 left by a removal comes after it).
                if self.words[at].load(Acquire) == 0 {
                    continue;
                }
                if q.n == MAX_QUERY_BUCKETS {
                    return None;
                }
                q.at[q.n] = at;
                q.n += 1;
            }
        }
        Some(q)
    }

    /// Bit words per bucket (`cap.div_ceil(64)`).
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
        assert_eq!(buckets(0, 0x1000, 0x1fff), (1, 1));
        assert_eq!(buckets(0, 64 << 12, (65 << 12) - 1), (0, 1));
        assert_eq!(buckets(1, 0x1ff000, 0x200fff), (0, 2));
        assert_eq!(buckets(0, 0, u64::MAX), (0, BUCKETS));
        assert_eq!(buckets(5, 0, u64::MAX), (0, BUCKETS));
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
    fn a_wide_lookup_gives_up() {
        let ix = IovaIndex::new(64).unwrap();
        assert!(ix.query(0, u64::MAX).is_none());
        assert!(
            ix.query(0, (1 << 30) - 1).is_none(),
            "all of levels 0 and 1"
        );
        // Every bucket of level 0 and one of each other level: looked at, all empty.
        assert!(ix.query(0, (1 << 20) - 1).unwrap().is_empty());
        ix.insert(3, 0, 0xfff);
        assert_eq!(slots(&ix, 0, (1 << 20) - 1), Some(alloc::vec![3]));
        // Seventeen non-empty buckets: too many.
        for p in 0..17 {
            ix.insert(10 + p, p as u64 * 0x1000, p as u64 * 0x1000 + 0xfff);
        }
        assert!(ix.query(0, (1 << 20) - 1).is_none());
        assert!(ix.query(0, (16 << 12) - 1).is_some());
    }
}

//! loom model of the IOVA index of the lock-free IOAS area table (`iommu/src/iova_index.rs`):
//! a MAP's announcement in the index against an overlapping MAP's lookup (of another size
//! class, so at another level of the index), and an UNMAP's removal from the index against a
//! MAP's lookup and against a racing UNMAP's, as `area_slots.rs` runs them.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p iommu --release --test
//! iova_index_loom -- --nocapture`
//!
//! `area_slots.rs` and `iova_index.rs` are compiled into this test against loom's atomics
//! (the `area_sync` module below replaces the library's facade). Each model prints how many
//! executions loom explored and fails below its floor (`FLOOR_*`, about half the count
//! observed when the floor was set with the default bound of 3 preemptions), so a model that
//! stopped racing fails instead of passing vacuously.
#![cfg(loom)]

extern crate alloc;

#[path = "loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/area_slots.rs"]
mod area_slots;

#[allow(dead_code)]
#[path = "../src/iova_index.rs"]
mod iova_index;

mod area_sync {
    pub use loom::sync::atomic::{AtomicU32, AtomicU64, fence};
}

use area_slots::{AreaSlots, Refused, SlotArea, SlotState};
use loom::sync::Arc;
use loom::sync::atomic::AtomicBool;
use loom::thread;
use loom_support::Preemptions;
use std::sync::atomic::Ordering::Relaxed;

/// Observed 6335: a 4 KiB map and a 2 MiB map holding it.
const FLOOR_LEVELS_MEET: usize = 3100;
/// Observed 10058: two maps of pages in one bucket.
const FLOOR_COLLIDING_NEIGHBOURS: usize = 5000;
/// Observed 4215: a 2 MiB area unmapped while a 4 KiB map inside it looks it up.
const FLOOR_REMOVE_VS_MAP: usize = 2100;
/// Observed 3226: two unmaps of one 2 MiB area.
const FLOOR_REMOVE_VS_UNMAP: usize = 1600;

/// The bound: `LOOM_MAX_PREEMPTIONS` when set, else 3 (the models are exhaustive within the
/// bound; 3 preemptions find the interleavings of two callers' steps).
fn model(name: &str, min_executions: usize, f: impl Fn() + Sync + Send + 'static) {
    loom_support::model_with(name, min_executions, Preemptions::EnvOr(3), f);
}

/// `[iova, iova + len)`.
fn area(iova: u64, len: u64) -> SlotArea {
    SlotArea {
        iova,
        len,
        gpa: 0x10_0000,
        prot: 3,
    }
}

/// An UNMAP of `[start, start + len)` by `vcpu` through the index: retires the live areas
/// lying whole in it and returns their bytes.
fn retire_range(s: &AreaSlots, vcpu: u32, start: u64, len: u64) -> u64 {
    let last = start + (len - 1);
    let mut bytes = 0;
    s.scan_range(start, last, |x| {
        if x.area.iova >= start && x.area.last() <= last && s.retire(x, vcpu) {
            bytes += x.area.len;
        }
        true
    });
    bytes
}

/// Frees every slot `vcpu` retired in `[start, start + len)`, found through the index (after
/// its invalidation round).
fn free_mine(s: &AreaSlots, vcpu: u32, start: u64, len: u64) {
    s.scan_range(start, start + (len - 1), |x| {
        if x.state == SlotState::Dying(vcpu) {
            s.free(x.slot);
        }
        true
    });
}

/// Two racing maps by vCPUs 1 and 2; returns which won (each winner publishes).
fn race_maps(s: &Arc<AreaSlots>, a: SlotArea, b: SlotArea) -> [bool; 2] {
    let hs: Vec<_> = [(1u32, a), (2, b)]
        .into_iter()
        .map(|(v, x)| {
            let s = s.clone();
            thread::spawn(move || match s.reserve(v, x) {
                Ok(r) => {
                    s.publish(r);
                    true
                }
                Err(Refused::Overlap { .. }) => false,
                Err(Refused::Full) => panic!("a slot for each map"),
            })
        })
        .collect();
    let won: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    [won[0], won[1]]
}

/// Insert vs overlapping insert: a 4 KiB map (level 0 of the index) and a 2 MiB map holding
/// it (level 1) announce in different buckets; each one's lookup reads the other's level, so
/// exactly one wins.
#[test]
fn overlapping_maps_of_two_size_classes_one_wins() {
    model("index: maps at two levels", FLOOR_LEVELS_MEET, || {
        let s = Arc::new(AreaSlots::new(2).unwrap());
        let small = area(0x5000, 0x1000);
        let big = area(0, 2 << 20);
        let won = race_maps(&s, small, big);
        assert_eq!(won.iter().filter(|&&w| w).count(), 1, "{won:?}");
        let mut live = Vec::new();
        s.scan_range(0, (2 << 20) - 1, |x| {
            live.push((x.state, x.area));
            true
        });
        let winner = if won[0] { small } else { big };
        assert_eq!(live, [(SlotState::Live, winner)]);
    });
}

/// Two disjoint 4 KiB maps whose pages fall in one bucket of level 0 (pages 0 and 34, whose
/// hashes collide, checked below): they see each other's announcement and both win.
#[test]
fn disjoint_maps_sharing_a_bucket_both_win() {
    model(
        "index: colliding neighbours",
        FLOOR_COLLIDING_NEIGHBOURS,
        || {
            let s = Arc::new(AreaSlots::new(2).unwrap());
            let (a, b) = (area(0, 0x1000), area(34 << 12, 0x1000));
            let won = race_maps(&s, a, b);
            assert_eq!(won, [true, true]);
            // Each one's lookup finds the other (the bucket is shared).
            let mut seen = Vec::new();
            s.scan_range(a.iova, a.last(), |x| {
                seen.push(x.area);
                true
            });
            assert_eq!(seen.len(), 2, "{seen:?}");
        },
    );
}

/// Remove vs lookup: a 2 MiB area is unmapped (retired, invalidation round, freed: removed
/// from level 1) while a 4 KiB map inside it looks it up. The map fails while the area is
/// there; when it succeeds, the round happened before (forget after flush, through the
/// index's Release removal and Acquire lookup).
#[test]
fn a_map_that_misses_a_removed_area_comes_after_its_flush() {
    model("index: removal vs map", FLOOR_REMOVE_VS_MAP, || {
        let s = Arc::new(AreaSlots::new(2).unwrap());
        let r = s.reserve(0, area(0, 2 << 20)).unwrap();
        s.publish(r);
        let flushed = Arc::new(AtomicBool::new(false));
        let (s2, f2) = (s.clone(), flushed.clone());
        let unmapper = thread::spawn(move || {
            assert_eq!(retire_range(&s2, 2, 0, 2 << 20), 2 << 20);
            // Stands for the IOTLB invalidation round of the unmap.
            f2.store(true, Relaxed);
            free_mine(&s2, 2, 0, 2 << 20);
        });
        match s.reserve(1, area(0x7000, 0x1000)) {
            Ok(m) => {
                assert!(
                    flushed.load(Relaxed),
                    "range reused before its invalidation round"
                );
                s.publish(m);
            }
            Err(e) => assert_eq!(e, Refused::Overlap { iova: 0 }),
        }
        unmapper.join().unwrap();
    });
}

/// Remove vs lookup by a racing unmap: two unmaps of one 2 MiB area, each looking it up in
/// the index while the other may be removing it: the area is counted once and, once both are
/// done, nothing is left in the index (a map of the range wins).
#[test]
fn racing_unmaps_through_the_index_count_once() {
    model("index: removal vs unmap", FLOOR_REMOVE_VS_UNMAP, || {
        let s = Arc::new(AreaSlots::new(2).unwrap());
        let r = s.reserve(0, area(0, 2 << 20)).unwrap();
        s.publish(r);
        let hs: Vec<_> = (1..=2u32)
            .map(|v| {
                let s = s.clone();
                thread::spawn(move || {
                    let bytes = retire_range(&s, v, 0, 2 << 20);
                    free_mine(&s, v, 0, 2 << 20);
                    bytes
                })
            })
            .collect();
        let bytes: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(bytes, 2 << 20);
        let mut left = 0;
        s.scan_range(0, u64::MAX, |_| {
            left += 1;
            true
        });
        assert_eq!(left, 0);
        assert!(s.reserve(3, area(0x1000, 0x1000)).is_ok());
    });
}

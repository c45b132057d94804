//! loom model of the lock-free IOAS area table (`iommu/src/area_slots.rs`): the concurrent
//! steps of IOAS_MAP (announce, SC fence, scan, kill or yield, claim, publish) and of
//! IOAS_UNMAP (scan, retire, invalidation round, free), as `iommufd::ioas` runs them.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p iommu --release --test
//! ioas_loom -- --nocapture`
//!
//! `area_slots.rs` is compiled into this test against loom's atomics (the `area_sync` module
//! below replaces the library's facade). Each model prints how many executions loom explored
//! and fails below its floor (`FLOOR_*`, about half the count observed when the floor was
//! set with the default bound of 3 preemptions), so a model that stopped racing fails
//! instead of passing vacuously.
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

use area_slots::{AreaSlots, Near, Refused, SlotArea, SlotState};
use loom::sync::Arc;
use loom::sync::atomic::AtomicBool;
use loom::thread;
use loom_support::Preemptions;
use std::sync::atomic::Ordering::Relaxed;

/// Observed 12672 (4640 when the floor was set): two maps of overlapping ranges, each
/// announcing, scanning and deciding.
const FLOOR_OVERLAPPING_MAPS: usize = 2300;
/// Observed 27726 (27646 when the floor was set): two unmaps of one range of two areas,
/// retiring and freeing.
const FLOOR_RACING_UNMAPS: usize = 13800;
/// Observed 14446: two unmaps of one range of two areas taking their steps from one snapshot
/// each (`Lookup::near`), then two maps and a third that finds no free slot.
const FLOOR_RACING_SNAPSHOT_UNMAPS: usize = 7200;
/// Observed 855: a map of the page next to an area being unmapped (3217 before the IOVA
/// index, when the map's lookup visited the unmapper's slot; now they meet only in the
/// free-slot bitmap and the level's slot bitmap).
const FLOOR_NEIGHBOURS: usize = 420;
/// Observed 19563 (6438 when the floor was set): a map of the page of an area being
/// unmapped, with its invalidation round.
const FLOOR_FORGET_AFTER_FLUSH: usize = 3200;

/// The bound: `LOOM_MAX_PREEMPTIONS` when set, else 3 (the models are exhaustive within the
/// bound; 3 preemptions find the interleavings of two callers' steps).
fn model(name: &str, min_executions: usize, f: impl Fn() + Sync + Send + 'static) {
    loom_support::model_with(name, min_executions, Preemptions::EnvOr(3), f);
}

/// Pages `[first, first + pages)`.
fn area(first: u64, pages: u64) -> SlotArea {
    SlotArea {
        iova: first << 12,
        len: pages << 12,
        gpa: 0x10_0000 + first,
        prot: 3,
    }
}

/// An UNMAP of pages `[first, first + pages)` by `vcpu`: retires the live areas lying whole in
/// it and returns their bytes (the invalidation round and the free are the caller's).
fn retire_range(s: &AreaSlots, vcpu: u32, first: u64, pages: u64) -> u64 {
    let (start, last) = (first << 12, ((first + pages) << 12) - 1);
    let mut bytes = 0;
    s.scan(|x| {
        if x.area.iova >= start && x.area.last() <= last && s.retire(x, vcpu) {
            bytes += x.area.len;
        }
        true
    });
    bytes
}

/// An UNMAP of pages `[first, first + pages)` by `vcpu` as `ioas::unmap_near` runs it: one
/// scan of the range's lookup plan (`Lookup::near`), the retires taken from that snapshot,
/// then (after the invalidation round) the retired slots freed without scanning again.
/// Returns the bytes it retired.
fn unmap_from_snapshot(s: &AreaSlots, vcpu: u32, first: u64, pages: u64) -> u64 {
    let (start, last) = (first << 12, ((first + pages) << 12) - 1);
    let mut near = Near::new();
    assert!(
        s.lookup(start, last).near(start, last, &mut near),
        "at most NEAR areas"
    );
    let mut mine = Vec::new();
    for x in near.items() {
        if x.area.iova >= start && x.area.last() <= last && s.retire(x, vcpu) {
            mine.push((x.slot, x.area.len));
        }
    }
    // (the invalidation round would run here)
    for &(slot, _) in &mine {
        s.free(slot);
    }
    mine.iter().map(|&(_, len)| len).sum()
}

/// Frees every slot `vcpu` retired (after its invalidation round).
fn free_mine(s: &AreaSlots, vcpu: u32) {
    s.scan(|x| {
        if x.state == SlotState::Dying(vcpu) {
            s.free(x.slot);
        }
        true
    });
}

#[test]
fn of_two_overlapping_maps_exactly_one_wins() {
    model("ioas overlapping maps", FLOOR_OVERLAPPING_MAPS, || {
        let s = Arc::new(AreaSlots::new(2).unwrap());
        // Pages [0, 2) and [1, 3): they share page 1.
        let hs: Vec<_> = [(1u32, 0u64), (2, 1)]
            .into_iter()
            .map(|(v, first)| {
                let s = s.clone();
                thread::spawn(move || match s.reserve(v, area(first, 2)) {
                    Ok(r) => {
                        s.publish(r);
                        true
                    }
                    Err(Refused::Overlap { .. }) => false,
                    Err(Refused::Full) => panic!("two slots for two maps"),
                })
            })
            .collect();
        let won: Vec<bool> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(won.iter().filter(|&&w| w).count(), 1, "{won:?}");
        // The loser gave its slot back; the winner's area is complete.
        let mut live = Vec::new();
        s.scan(|x| {
            live.push((x.state, x.area));
            true
        });
        let first = if won[0] { 0 } else { 1 };
        assert_eq!(live, [(SlotState::Live, area(first, 2))]);
    });
}

#[test]
fn racing_unmaps_count_each_page_once() {
    model("ioas racing unmaps", FLOOR_RACING_UNMAPS, || {
        let s = Arc::new(AreaSlots::new(2).unwrap());
        for first in [0, 1] {
            let r = s.reserve(0, area(first, 1)).unwrap();
            s.publish(r);
        }
        let hs: Vec<_> = (1..=2u32)
            .map(|v| {
                let s = s.clone();
                thread::spawn(move || {
                    let bytes = retire_range(&s, v, 0, 2);
                    // (the invalidation round would run here)
                    free_mine(&s, v);
                    bytes
                })
            })
            .collect();
        let bytes: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(bytes, 2 << 12);
        let mut left = 0;
        s.scan(|_| {
            left += 1;
            true
        });
        assert_eq!(left, 0);
    });
}

/// The same race with the one-scan UNMAP (`ioas::unmap_near`): every page counted once, every
/// slot freed once (a slot freed twice would set its free bit twice and `reserve` below would
/// hand out more slots than there are).
#[test]
fn racing_snapshot_unmaps_count_each_page_once() {
    model(
        "ioas racing snapshot unmaps",
        FLOOR_RACING_SNAPSHOT_UNMAPS,
        || {
            let s = Arc::new(AreaSlots::new(2).unwrap());
            for first in [0, 1] {
                let r = s.reserve(0, area(first, 1)).unwrap();
                s.publish(r);
            }
            let hs: Vec<_> = (1..=2u32)
                .map(|v| {
                    let s = s.clone();
                    thread::spawn(move || unmap_from_snapshot(&s, v, 0, 2))
                })
                .collect();
            let bytes: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(bytes, 2 << 12);
            let mut left = 0;
            s.scan(|_| {
                left += 1;
                true
            });
            assert_eq!(left, 0);
            // Both slots are free exactly once: two maps get them, a third finds none.
            for first in [4, 5] {
                assert!(s.reserve(0, area(first, 1)).is_ok());
            }
            assert_eq!(s.reserve(0, area(6, 1)), Err(Refused::Full));
        },
    );
}

#[test]
fn a_map_never_waits_for_an_unmap_of_its_neighbour() {
    model("ioas map beside an unmap", FLOOR_NEIGHBOURS, || {
        let s = Arc::new(AreaSlots::new(2).unwrap());
        let r = s.reserve(0, area(0, 1)).unwrap();
        s.publish(r);
        let s2 = s.clone();
        let unmapper = thread::spawn(move || {
            assert_eq!(retire_range(&s2, 1, 0, 1), 1 << 12);
            free_mine(&s2, 1);
        });
        // The next page: disjoint, so it is claimed whatever the unmap is doing.
        let m = s.reserve(2, area(1, 1)).unwrap();
        s.publish(m);
        unmapper.join().unwrap();
        let mut live = Vec::new();
        s.scan(|x| {
            live.push((x.state, x.area));
            true
        });
        assert_eq!(live, [(SlotState::Live, area(1, 1))]);
    });
}

#[test]
fn an_unmapped_range_is_reused_only_after_its_invalidation_round() {
    model("ioas forget after flush", FLOOR_FORGET_AFTER_FLUSH, || {
        // 65 slots = two bitmap words: the mapper (vCPU 1) takes its slot from the second
        // word, so its only way to learn that the old area is gone is its lookup (the IOVA
        // index's bucket of the page).
        let s = Arc::new(AreaSlots::new(65).unwrap());
        let r = s.reserve(0, area(0, 1)).unwrap();
        s.publish(r);
        // Stands for the IOTLB invalidation round of the unmap.
        let flushed = Arc::new(AtomicBool::new(false));
        let (s2, f2) = (s.clone(), flushed.clone());
        let unmapper = thread::spawn(move || {
            assert_eq!(retire_range(&s2, 2, 0, 1), 1 << 12);
            f2.store(true, Relaxed);
            free_mine(&s2, 2);
        });
        // A map of the same page: refused while the old area is there (live or dying); when
        // it succeeds, the round that removed the old translation happened before.
        match s.reserve(1, area(0, 1)) {
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

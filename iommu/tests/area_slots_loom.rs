//! loom model of the lock-free area slots (`iommu/src/area_slots.rs`): claim, publish, retire,
//! revive and free, the per-area steps of a lock-free IOAS_MAP/UNMAP.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p iommu --release --test area_slots_loom -- --nocapture`
//!
//! `area_slots.rs` is compiled into this test against loom's atomics (the `area_sync` module
//! below replaces the library's facade). Each model prints how many executions loom explored
//! and fails below its floor (`FLOOR_*`, about half the count observed when the floor was
//! set), so a model that stopped racing fails instead of passing vacuously.
#![cfg(loom)]

extern crate alloc;

#[allow(dead_code)]
#[path = "../src/area_slots.rs"]
mod area_slots;

mod area_sync {
    pub use loom::sync::atomic::{AtomicU32, AtomicU64};
}

use area_slots::{AreaSlots, SlotArea, SlotState};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Observed 54: two claims of one word, each filling and publishing.
const FLOOR_TWO_CLAIMS: usize = 27;
/// Observed 171: a MAP publishing against a retirer that tries twice.
const FLOOR_PUBLISH_RETIRE: usize = 85;
/// Observed 171: two retirers of one LIVE slot, the winner freeing it.
const FLOOR_TWO_RETIRERS: usize = 85;
/// Observed 12: a slot freed by one thread and claimed by another (capacity one).
const FLOOR_FREE_CLAIM: usize = 6;

fn model(name: &str, min_executions: usize, f: impl Fn() + Sync + Send + 'static) {
    let iterations = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = iterations.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = None;
    b.max_branches = 100_000;
    b.check(move || {
        counter.fetch_add(1, Relaxed);
        f();
    });
    let n = iterations.load(Relaxed);
    println!("loom model {name}: {n} executions explored");
    assert!(
        n >= min_executions,
        "{name} explored {n} executions, below its floor of {min_executions}"
    );
}

fn area(tag: u64) -> SlotArea {
    SlotArea {
        iova: tag << 12,
        len: 0x1000 * tag,
        gpa: 0x10_0000 + tag,
        prot: tag as u32,
    }
}

#[test]
fn two_claims_take_different_slots() {
    model("area slots two claims", FLOOR_TWO_CLAIMS, || {
        // One bitmap word: both claimers race on it.
        let s = Arc::new(AreaSlots::new(2).unwrap());
        let hs: Vec<_> = (1..=2u32)
            .map(|v| {
                let s = s.clone();
                thread::spawn(move || {
                    let r = s.claim(v).unwrap();
                    s.fill(r, area(u64::from(v)));
                    s.publish(r);
                    r.index
                })
            })
            .collect();
        let got: Vec<usize> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_ne!(got[0], got[1]);
        assert_eq!(s.claim(0), None, "both slots taken");
        for (v, &i) in (1..=2u64).zip(&got) {
            assert_eq!(s.get(i), Some((SlotState::Live, Some(area(v)))));
        }
    });
}

#[test]
fn a_retirer_sees_the_published_fields_or_nothing() {
    model("area slots publish/retire", FLOOR_PUBLISH_RETIRE, || {
        let s = Arc::new(AreaSlots::new(1).unwrap());
        let s2 = s.clone();
        let mapper = thread::spawn(move || {
            let r = s2.claim(1).unwrap();
            s2.fill(r, area(3));
            s2.publish(r);
        });
        // The unmap on the other vCPU finds nothing until the area is published, then the
        // complete area (loom reports any read of a field not ordered after its write only
        // through the values, so the fields are compared).
        let s3 = s.clone();
        let unmapper = thread::spawn(move || {
            let mut tries = 0;
            loop {
                if let Some((_, a)) = s3.retire(0, 2) {
                    assert_eq!(a, area(3));
                    return true;
                }
                tries += 1;
                if tries == 2 {
                    return false;
                }
                thread::yield_now();
            }
        });
        mapper.join().unwrap();
        let won = unmapper.join().unwrap();
        assert_eq!(
            s.get(0).unwrap().0,
            if won {
                SlotState::Dying(2)
            } else {
                SlotState::Live
            }
        );
    });
}

#[test]
fn of_two_retirers_exactly_one_wins() {
    model("area slots two retirers", FLOOR_TWO_RETIRERS, || {
        let s = Arc::new(AreaSlots::new(1).unwrap());
        let r = s.claim(0).unwrap();
        s.fill(r, area(5));
        s.publish(r);
        let hs: Vec<_> = (1..=2u32)
            .map(|v| {
                let s = s.clone();
                thread::spawn(move || match s.retire(0, v) {
                    Some((mine, a)) => {
                        assert_eq!(a, area(5));
                        s.free(mine);
                        a.len
                    }
                    None => 0,
                })
            })
            .collect();
        // Racing unmaps count each area once.
        let bytes: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(bytes, area(5).len);
        assert_eq!(s.get(0), Some((SlotState::Free, None)));
    });
}

#[test]
fn a_freed_slot_is_claimed_clean() {
    model("area slots free/claim", FLOOR_FREE_CLAIM, || {
        let s = Arc::new(AreaSlots::new(1).unwrap());
        let r = s.claim(0).unwrap();
        s.fill(r, area(1));
        s.publish(r);
        let s2 = s.clone();
        let unmapper = thread::spawn(move || {
            let (mine, _) = s2.retire(0, 0).unwrap();
            s2.free(mine);
        });
        // A mapper on another vCPU spins until the slot is free, then fills it: its stores
        // must not race the unmapper's (loom reports a missing happens-before edge here only
        // through the atomics' values, so check what the last owner left visible).
        let mine = loop {
            if let Some(m) = s.claim(1) {
                break m;
            }
            thread::yield_now();
        };
        assert_eq!(s.get(0).unwrap().0, SlotState::Claimed(1));
        // A stale retire of the old generation cannot touch the new claim.
        assert_eq!(s.retire(0, 0), None);
        s.fill(mine, area(2));
        s.publish(mine);
        unmapper.join().unwrap();
        assert_eq!(s.get(0), Some((SlotState::Live, Some(area(2)))));
    });
}

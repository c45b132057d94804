//! loom model of the x86 device-vector table (`drivers/src/vectors.rs`): registration by
//! compare-and-swap, dispatch, unregistration that waits out dispatches in flight, and the
//! per-vector and unclaimed counters.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p drivers --release --test vectors_loom -- --nocapture`
//!
//! `vectors.rs` is compiled into this test against loom's atomics (the `vectors_sync` module
//! below replaces the library's facade). Each model prints how many executions loom explored
//! and fails below its floor (`FLOOR_*`, about half the count observed when the floor was
//! set), so a model that stopped racing fails instead of passing vacuously.
//!
//! Unbounded (no preemption bound) these models also pass, exhaustively, in under a second
//! (executions: two registrations 398, unregister vs dispatch 55, counters 952, publish 6).
#![cfg(loom)]

#[path = "../../iommu/tests/loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/vectors.rs"]
mod vectors;

mod vectors_sync {
    pub use loom::sync::atomic::{AtomicU32, AtomicU64, fence};
    pub fn spin() {
        loom::thread::yield_now();
    }
}

use core::num::NonZeroU32;
use loom::sync::Arc;
use loom::sync::atomic::AtomicU32;
use loom::thread;
use loom_support::model;
use std::sync::atomic::Ordering::Relaxed;
use vectors::VectorTable;

/// Observed 33: an unregister against a dispatch of the same vector.
const FLOOR_UNREGISTER_DISPATCH: usize = 16;
/// Observed 162: two registrations of one vector and a dispatch of it.
const FLOOR_TWO_REGISTRATIONS: usize = 81;
/// Observed 6: a registration publishing handler state against a dispatch.
const FLOOR_REGISTER_PUBLISH: usize = 3;
/// Observed 453: two dispatches of one vector and one of an unowned vector.
const FLOOR_COUNTERS: usize = 226;

const V: u8 = 0x41;

fn h(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

/// Once `unregister` returned, the handler does not run: every run the dispatcher makes is
/// visible to the unregistering thread when its call returns, and none comes after.
#[test]
fn no_handler_runs_after_its_unregistration_returned() {
    model(
        "vectors unregister vs dispatch",
        FLOOR_UNREGISTER_DISPATCH,
        || {
            let t = Arc::new(VectorTable::new());
            let runs = Arc::new(AtomicU32::new(0));
            t.register(V, h(7)).unwrap();
            let d = {
                let (t, runs) = (t.clone(), runs.clone());
                thread::spawn(move || {
                    t.dispatch(V, |tok| {
                        assert_eq!(tok, h(7));
                        runs.fetch_add(1, Relaxed);
                    })
                })
            };
            assert!(t.unregister(V, h(7)));
            let seen_at_return = runs.load(Relaxed);
            let ran = d.join().unwrap().is_some();
            let runs = runs.load(Relaxed);
            assert_eq!(runs, u32::from(ran));
            assert_eq!(
                runs, seen_at_return,
                "the handler ran after unregister returned"
            );
            assert_eq!(t.count(V), 1);
            assert_eq!(t.unclaimed(), u64::from(!ran));
            assert_eq!(t.owner(V), None);
        },
    );
}

/// Two registrations of one vector: exactly one wins and owns it; a dispatch racing them
/// sees no handler or the winner, never the loser.
#[test]
fn exactly_one_of_two_racing_registrations_wins() {
    model("vectors two registrations", FLOOR_TWO_REGISTRATIONS, || {
        let t = Arc::new(VectorTable::new());
        let regs: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|tok| {
                let t = t.clone();
                thread::spawn(move || t.register(V, h(tok)).is_ok())
            })
            .collect();
        let seen = t.dispatch(V, |tok| tok);
        let won: Vec<bool> = regs.into_iter().map(|r| r.join().unwrap()).collect();
        assert_eq!(won.iter().filter(|&&w| w).count(), 1);
        let winner = h(if won[0] { 1 } else { 2 });
        assert_eq!(t.owner(V), Some(winner));
        assert!(
            seen.is_none() || seen == Some(winner),
            "dispatch saw the loser"
        );
    });
}

/// What the registrant set up before registering is what the handler sees (the
/// registration's Release pairs with the dispatch's Acquire).
#[test]
fn a_dispatched_handler_sees_its_state() {
    model(
        "vectors register publishes state",
        FLOOR_REGISTER_PUBLISH,
        || {
            let t = Arc::new(VectorTable::new());
            let state = Arc::new(AtomicU32::new(0));
            let r = {
                let (t, state) = (t.clone(), state.clone());
                thread::spawn(move || {
                    state.store(42, Relaxed);
                    t.register(V, h(9)).unwrap();
                })
            };
            let seen = t.dispatch(V, |_| state.load(Relaxed));
            r.join().unwrap();
            assert!(seen.is_none() || seen == Some(42), "handler saw {seen:?}");
        },
    );
}

/// Concurrent dispatches lose no count: two on an owned vector, one on a free vector and one
/// outside the range.
#[test]
fn counters_lose_nothing() {
    model("vectors counters", FLOOR_COUNTERS, || {
        let t = Arc::new(VectorTable::new());
        t.register(V, h(3)).unwrap();
        let ds: Vec<_> = [V, V + 1]
            .into_iter()
            .map(|v| {
                let t = t.clone();
                thread::spawn(move || t.dispatch(v, |_| ()).is_some())
            })
            .collect();
        let mine = t.dispatch(V, |_| ()).is_some();
        let other = t.dispatch(0x10, |_| ()).is_some();
        let got: Vec<bool> = ds.into_iter().map(|d| d.join().unwrap()).collect();
        assert_eq!(got, [true, false]);
        assert!(mine && !other);
        assert_eq!(t.count(V), 2);
        assert_eq!(t.count(V + 1), 1);
        assert_eq!(t.unclaimed(), 2);
    });
}

//! loom model of the GICv3 handler table (`drivers/src/gicv3/handlers.rs`): registration
//! (serialised by its lock) against registration and against dispatch, and the counters.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p drivers --release --test gic_handlers_loom -- --nocapture`
//!
//! `handlers.rs` is compiled into this test against loom's atomics and mutex (the
//! `handlers_sync` module below replaces the library's facade). `spin::Once`, which holds each
//! slot's entry, is not modelled: it is written once, under the registration lock, before the
//! slot's INTID is published, and the models check that a dispatch never finds a published slot
//! without its entry. Each model prints how many executions loom explored and fails below its
//! floor (`FLOOR_*`, about half the count observed when the floor was set).
//!
//! Unbounded (no preemption bound) these models also pass, exhaustively, in under a second
//! (executions: two registrations 36, register vs dispatch 9).
#![cfg(loom)]

#[path = "../../iommu/tests/loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/gicv3/handlers.rs"]
mod handlers;

mod handlers_sync {
    pub use loom::sync::atomic::{AtomicU32, AtomicU64};

    pub struct RegisterLock(loom::sync::Mutex<()>);

    impl RegisterLock {
        pub fn new() -> Self {
            RegisterLock(loom::sync::Mutex::new(()))
        }

        pub fn lock(&self) -> impl Sized + '_ {
            self.0.lock().unwrap()
        }
    }
}

use handlers::{HandlerTable, RegisterError};
use loom::sync::Arc;
use loom::thread;
use loom_support::model;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Observed 46: two registrations of one INTID and a dispatch of it.
const FLOOR_TWO_REGISTRATIONS: usize = 23;
/// Observed 16: a registration against dispatches of it and of a registered INTID.
const FLOOR_REGISTER_DISPATCH: usize = 8;

/// loom runs a model's threads on one OS thread, so these plain atomics are a per-model log
/// of what the handlers did (each model has its own and resets it per execution).
static RACE_RAN_CONTEXT: AtomicUsize = AtomicUsize::new(0);
fn race_handler(_: u32, context: usize) {
    RACE_RAN_CONTEXT.store(context, Relaxed);
}

const LPI: u32 = 8192;

/// Two registrations of one INTID: exactly one wins, the other is refused as taken; a dispatch
/// racing them runs nothing (counted unhandled) or the winner's handler with the winner's
/// context, and the INTID is counted once either way.
#[test]
fn exactly_one_of_two_racing_registrations_wins() {
    model(
        "gic handlers two registrations",
        FLOOR_TWO_REGISTRATIONS,
        || {
            RACE_RAN_CONTEXT.store(0, Relaxed);
            let t: Arc<HandlerTable<2>> = Arc::new(HandlerTable::new());
            let regs: Vec<_> = [1usize, 2]
                .into_iter()
                .map(|ctx| {
                    let t = t.clone();
                    thread::spawn(move || t.register(LPI, race_handler, ctx))
                })
                .collect();
            let ran = t.dispatch(LPI);
            let got: Vec<_> = regs.into_iter().map(|r| r.join().unwrap()).collect();
            let winners: Vec<usize> = (0..2).filter(|&i| got[i].is_ok()).collect();
            assert_eq!(winners.len(), 1, "registrations: {got:?}");
            let loser = 1 - winners[0];
            assert_eq!(got[loser], Err(RegisterError::Taken(LPI)));
            let ctx = RACE_RAN_CONTEXT.load(Relaxed);
            if ran {
                assert_eq!(ctx, winners[0] + 1, "ran the loser's handler");
                assert_eq!((t.count(LPI), t.unhandled().0), (1, 0));
            } else {
                assert_eq!(ctx, 0);
                assert_eq!((t.count(LPI), t.unhandled()), (0, (1, LPI)));
            }
            // The table holds one handler: a second INTID still fits.
            assert!(t.register(LPI + 1, race_handler, 3).is_ok());
        },
    );
}

static PUB_RUNS: AtomicUsize = AtomicUsize::new(0);
fn pub_handler(_: u32, context: usize) {
    assert_eq!(context, 77, "entry seen incomplete");
    PUB_RUNS.fetch_add(1, Relaxed);
}
fn other_handler(_: u32, _: usize) {}

/// A registration against a dispatch of the INTID being registered and a dispatch of one
/// already registered (on another thread): the new handler runs complete or not at all, and
/// every dispatch is counted exactly once (per-INTID count or unhandled).
#[test]
fn registration_against_dispatch_loses_no_count() {
    model(
        "gic handlers register vs dispatch",
        FLOOR_REGISTER_DISPATCH,
        || {
            PUB_RUNS.store(0, Relaxed);
            let t: Arc<HandlerTable<2>> = Arc::new(HandlerTable::new());
            t.register(106, other_handler, 0).unwrap();
            let r = {
                let t = t.clone();
                thread::spawn(move || t.register(LPI, pub_handler, 77))
            };
            let d = {
                let t = t.clone();
                thread::spawn(move || t.dispatch(106))
            };
            let ran = t.dispatch(LPI);
            r.join().unwrap().unwrap();
            assert!(d.join().unwrap());
            assert_eq!(PUB_RUNS.load(Relaxed), usize::from(ran));
            assert_eq!(t.count(LPI), u64::from(ran));
            assert_eq!(t.count(106), 1);
            assert_eq!(t.unhandled().0, u64::from(!ran));
        },
    );
}

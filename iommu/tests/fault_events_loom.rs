//! loom model of VT-d fault-event bookkeeping (`iommu/src/vtd/fault_events.rs`) and of the
//! kernel's protocol around it (`kernel/src/irq/vtd.rs`): the interrupt handler marks the unit
//! pending and counts, the drain (serialised per unit by its owner) takes the mark, masks
//! FECTL.IM while throttled, reads the fault records and ends the throttle when its window has
//! passed. FECTL.IM and the fault record registers are modelled as atomics.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p iommu --release --test fault_events_loom -- --nocapture`
//!
//! `fault_events.rs` is compiled into this test against loom's atomics (the
//! `fault_events_sync` module below replaces the library's facade). Each model prints how many
//! executions loom explored and fails below its floor (`FLOOR_*`, about half the count
//! observed when the floor was set).
//!
//! Unbounded (no preemption bound) these models also pass, exhaustively, in under a second
//! (executions: pending mark 8, throttle vs release 29).
#![cfg(loom)]

#[path = "loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/vtd/fault_events.rs"]
mod fault_events;

mod fault_events_sync {
    pub use loom::sync::atomic::AtomicU64;
    use loom::sync::atomic::Ordering;

    /// loom 0.7 does not keep a read-modify-write atomic against a concurrent plain store
    /// (tokio-rs/loom#254, #389, fix pending in loom#391: the store can land between the RMW's
    /// read and its write, so a swap reads `false` and a later load still reads `false` after
    /// a `true` was stored), which makes it report executions no CPU can produce. On the
    /// fields that have both (`pending`, `throttled`, `reported`: swap and store; `in_window`:
    /// fetch_add and store) this facade turns the store into a swap, which loom models
    /// correctly. The one thing that adds: such a store continues another thread's release
    /// sequence; none of the protocol's conclusions rests on that (every store here that a
    /// reader synchronises through is a Release store already).
    macro_rules! rmw_only {
        ($name:ident, $t:ty) => {
            pub struct $name(loom::sync::atomic::$name);

            impl $name {
                pub fn new(v: $t) -> Self {
                    $name(loom::sync::atomic::$name::new(v))
                }

                pub fn load(&self, order: Ordering) -> $t {
                    self.0.load(order)
                }

                pub fn store(&self, v: $t, order: Ordering) {
                    self.0.swap(v, order);
                }

                #[allow(dead_code)] // AtomicU32 has no swap caller
                pub fn swap(&self, v: $t, order: Ordering) -> $t {
                    self.0.swap(v, order)
                }
            }
        };
    }

    rmw_only!(AtomicBool, bool);
    rmw_only!(AtomicU32, u32);

    impl AtomicU32 {
        pub fn fetch_add(&self, v: u32, order: Ordering) -> u32 {
            self.0.fetch_add(v, order)
        }
    }
}

use fault_events::FaultEvents;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU32};
// The model's own flags use plain loom atomics (stores only, or swaps nothing stores against).
use loom::thread;
use loom_support::model;
use std::sync::atomic::Ordering::Relaxed;

/// Observed 7: two fault events (record, then handler) against one drain.
const FLOOR_NO_LOST_ANNOUNCEMENT: usize = 3;
/// Observed 21: a handler throttling against a drain releasing the throttle.
const FLOOR_MASK_RELEASE: usize = 10;

/// A unit: its fault-event state, FECTL.IM, and fault records not yet read (the count of F bits
/// set in its FRCD registers).
struct Unit {
    events: FaultEvents,
    masked: AtomicBool,
    records: AtomicU32,
    read: AtomicU32,
}

impl Unit {
    fn new(burst: u32, window: u64) -> Self {
        Unit {
            events: FaultEvents::new(burst, window),
            masked: AtomicBool::new(false),
            records: AtomicU32::new(0),
            read: AtomicU32::new(0),
        }
    }

    /// The hardware records a fault, then (in the kernel) the handler runs. With
    /// `handler_masks`, the handler writes FECTL.IM on a throttle verdict, as the kernel did
    /// before this model.
    fn fault_and_interrupt(&self, now: u64, handler_masks: bool) {
        self.records.fetch_add(1, Relaxed);
        let verdict = self.events.on_interrupt(now);
        if handler_masks && verdict == fault_events::Verdict::Throttle {
            self.masked.store(true, Relaxed);
        }
    }

    /// `kernel::irq::vtd::drain`: take the mark; while throttled mask before clearing the
    /// records (unless `handler_masks`); read them; unmask when the throttle ends.
    fn drain(&self, now: u64, handler_masks: bool) {
        if !self.events.take_pending() {
            return;
        }
        if !handler_masks && self.events.is_throttled() {
            self.masked.store(true, Relaxed);
        }
        let n = self.records.swap(0, Relaxed);
        self.read.fetch_add(n, Relaxed);
        if self.events.try_release(now) {
            self.masked.store(false, Relaxed);
        }
    }

    /// What must hold when nothing runs: a masked unit is throttled (so every drain polls it),
    /// and records not read yet are announced to the next drain.
    fn check_quiescent(&self) {
        if self.masked.load(Relaxed) {
            assert!(
                self.events.is_throttled(),
                "FECTL.IM set but not throttled: nothing will interrupt or poll the unit"
            );
        }
        if self.records.load(Relaxed) != 0 {
            assert!(
                self.events.is_pending(),
                "unread fault records not announced: {} records, {} read",
                self.records.load(Relaxed),
                self.read.load(Relaxed)
            );
        }
    }
}

/// The handler's pending mark against the drain's swap: a fault announced while the drain runs
/// is read by it or left marked for the next one; every record is read exactly once.
#[test]
fn no_fault_announcement_is_lost() {
    model(
        "fault events pending mark vs drain",
        FLOOR_NO_LOST_ANNOUNCEMENT,
        || {
            let u = Arc::new(Unit::new(4, 100));
            let h = {
                let u = u.clone();
                thread::spawn(move || {
                    u.fault_and_interrupt(1, false);
                    u.fault_and_interrupt(2, false);
                })
            };
            u.drain(3, false);
            h.join().unwrap();
            u.check_quiescent();
            u.drain(4, false);
            assert_eq!(u.read.load(Relaxed), 2);
            assert_eq!(u.events.interrupts(), 2);
            assert!(!u.events.take_pending());
        },
    );
}

/// A handler whose event crosses the burst (throttle) against a drain on another CPU whose
/// clock is already past the window (release): with only the drain writing FECTL.IM, the unit
/// ends unmasked or masked-and-throttled, never masked and forgotten.
#[test]
fn a_throttle_racing_its_release_never_leaves_the_unit_masked_unpolled() {
    model(
        "fault events throttle vs release",
        FLOOR_MASK_RELEASE,
        || race_throttle_and_release(false),
    );
}

/// The same race with the handler writing FECTL.IM itself (the protocol before this model):
/// loom finds the interleaving that leaves the unit masked with `throttled` clear.
#[test]
#[should_panic(expected = "FECTL.IM set but not throttled")]
fn handler_side_masking_can_leave_the_unit_masked_unpolled() {
    model("fault events handler-side mask", 0, || {
        race_throttle_and_release(true)
    });
}

fn race_throttle_and_release(handler_masks: bool) {
    // One event per window of 10 ticks; the first, at t = 0, was delivered and drained.
    let u = Arc::new(Unit::new(1, 10));
    u.fault_and_interrupt(0, handler_masks);
    u.drain(0, handler_masks);
    let h = {
        let u = u.clone();
        // The second event of the window: throttles.
        thread::spawn(move || u.fault_and_interrupt(5, handler_masks))
    };
    // A drain on another CPU at t = 12, after the window.
    u.drain(12, handler_masks);
    h.join().unwrap();
    u.check_quiescent();
    // The next drain leaves nothing unread.
    u.drain(13, handler_masks);
    assert_eq!(u.read.load(Relaxed), 2);
    u.check_quiescent();
}

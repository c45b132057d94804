//! loom model of a guest MSI route's publication and removal, as
//! `kernel/src/guest/msi/x86_64.rs` does it (`route`, `unroute`, `on_interrupt`; the aarch64
//! module's `route`/`unroute`/`on_lpi` follow the same protocol with MAPTI/DISCARD in place
//! of the IRTE). The route's atomics live in the kernel's `Published` statics, so this file
//! mirrors them step for step rather than calling the kernel; keep the two in step. The
//! host-vector table and the posted set are the real ones: `drivers/src/vectors.rs` and
//! `drivers/src/posted.rs`, compiled here against loom's atomics.
//!
//! Protocol (kernel): `route` registers the host vector, resets the route's delivery count
//! (Relaxed), stores the target (Release), and only then makes the IRTE present. The
//! handler, run by `VECTORS.dispatch`, loads the target (Acquire), counts (Relaxed) and posts.
//! `unroute` clears the IRTE (device blocked), stores target 0 (Release) and unregisters the
//! host vector, which waits out dispatches in flight. "The IRTE is present" is modelled as a
//! flag stored with Release and checked with Acquire by the interrupt: an interrupt through
//! the IRTE is caused by its write, never earlier.
//!
//! What the models are sensitive to (checked by weakening each step and rerunning):
//! - Removing `unregister`'s wait for dispatches in flight fails the retire model (a handler
//!   that loaded the old target posts to the old vCPU after `retire` returned): the target's
//!   store of 0 alone does not stop a handler that already read it.
//! - Making both the target's store and the IRTE's store Relaxed fails the publish model
//!   (the device's interrupt finds no route). Either one alone suffices in the model, because
//!   the IRTE flag's Release/Acquire already orders the target; the kernel's Release on the
//!   target is what covers an interrupt on the host vector that did not come through the IRTE
//!   (the stray one here), for which loom has nothing observable to falsify: its only use of
//!   the route besides the target is the count's `fetch_add`, and loom's read-modify-writes
//!   always read the latest value, so the reset-before-count ordering cannot be shown wrong.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p drivers --release --test msi_route_loom -- --nocapture`
//!
//! Each model prints how many executions loom explored and fails below its floor
//! (`FLOOR_*`, about half the count observed when the floor was set).
#![cfg(loom)]

#[path = "../../iommu/tests/loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/vectors.rs"]
mod vectors;

#[allow(dead_code)]
#[path = "../src/posted.rs"]
mod posted;

mod vectors_sync {
    pub use loom::sync::atomic::{AtomicU32, AtomicU64, fence};
    pub fn spin() {
        loom::thread::yield_now();
    }
}

mod posted_sync {
    pub use loom::sync::atomic::AtomicU64;
}

use core::num::NonZeroU32;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use loom::thread;
use loom_support::model;
use posted::PostedVectors;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use vectors::VectorTable;

/// Observed 2118: a publication against the device's interrupt and a stray one.
const FLOOR_PUBLISH: usize = 1059;
/// Observed 638: a removal and reuse against two interrupts of the old route.
const FLOOR_RETIRE: usize = 319;

/// The host vector the route's handler is registered on, and its handler token.
const HOST_VECTOR: u8 = 0x50;
const VECTOR: u8 = 0x41;

fn token() -> NonZeroU32 {
    NonZeroU32::new(0x100).unwrap()
}

/// `target` encoding of the kernel's `Published`: bit 31 valid, 23:8 slot, 7:0 vector.
fn encode(slot: u32, vector: u8) -> u32 {
    1 << 31 | slot << 8 | u32::from(vector)
}

/// One route's published state and what it feeds: mirrors `Published` plus `STALE`, the
/// device's IRTE and the posted sets of two vCPU slots.
struct Route {
    table: VectorTable,
    target: AtomicU32,
    delivered: AtomicU64,
    stale: AtomicU64,
    irte_present: AtomicBool,
    posted: [PostedVectors; 2],
    /// Posts made to each slot (counted right after each post, for the assertions only).
    posts: [AtomicU32; 2],
}

impl Route {
    fn new() -> Self {
        Route {
            table: VectorTable::new(),
            target: AtomicU32::new(0),
            delivered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            irte_present: AtomicBool::new(false),
            posted: [PostedVectors::new(), PostedVectors::new()],
            posts: [AtomicU32::new(0), AtomicU32::new(0)],
        }
    }

    /// `x86_64::on_interrupt` as `VECTORS.dispatch` runs it: Some(slot posted to), or
    /// Some(None) for a stale interrupt, or None when no handler owns the host vector.
    fn interrupt(&self) -> Option<Option<usize>> {
        self.table.dispatch(HOST_VECTOR, |tok| {
            assert_eq!(tok, token());
            let t = self.target.load(Acquire);
            if t & 1 << 31 == 0 {
                self.stale.fetch_add(1, Relaxed);
                return None;
            }
            assert_eq!(t & 0xff, u32::from(VECTOR), "torn target {t:#x}");
            let slot = ((t >> 8) & 0xffff) as usize;
            self.delivered.fetch_add(1, Relaxed);
            self.posted[slot].post(t as u8);
            self.posts[slot].fetch_add(1, Relaxed);
            Some(slot)
        })
    }

    /// The device raising its MSI: only through a present IRTE.
    fn device_interrupt(&self) -> Option<Option<usize>> {
        if self.irte_present.load(Acquire) {
            self.interrupt()
        } else {
            None
        }
    }

    /// `x86_64::route` after the free route and host vector are found.
    fn publish(&self, slot: u32) {
        self.table.register(HOST_VECTOR, token()).unwrap();
        self.delivered.store(0, Relaxed);
        self.target.store(encode(slot, VECTOR), Release);
        self.irte_present.store(true, Release);
    }

    /// `x86_64::unroute` for this route.
    fn retire(&self) {
        self.irte_present.store(false, Release);
        self.target.store(0, Release);
        assert!(self.table.unregister(HOST_VECTOR, token()));
    }
}

/// A route being published to slot 0 while its device interrupts and a stray interrupt hits
/// the host vector. The device's interrupt always finds the whole route (target valid, and
/// its count reset before, so the count is never clobbered by the reset); the stray one finds
/// it or finds none (stale), never something in between. The slot held an older route's
/// count of 5 before.
#[test]
fn a_handler_never_sees_a_half_published_route() {
    model("msi route publish", FLOOR_PUBLISH, || {
        let r = Arc::new(Route::new());
        r.delivered.store(5, Relaxed);
        let handlers: Vec<_> = [true, false]
            .into_iter()
            .map(|through_irte| {
                let r = r.clone();
                thread::spawn(move || {
                    if through_irte {
                        r.device_interrupt()
                    } else {
                        r.interrupt()
                    }
                })
            })
            .collect();
        r.publish(0);
        let got: Vec<_> = handlers.into_iter().map(|h| h.join().unwrap()).collect();
        if let Some(d) = got[0] {
            assert_eq!(d, Some(0), "the device's interrupt found no route");
        }
        let delivered = got.iter().filter(|g| **g == Some(Some(0))).count() as u64;
        let stale = got.iter().filter(|g| **g == Some(None)).count() as u64;
        assert_eq!(r.delivered.load(Relaxed), delivered, "count clobbered");
        assert_eq!(r.stale.load(Relaxed), stale);
        let t = r.posted[0].take();
        assert_eq!(t[1] & 1 << (VECTOR % 64) != 0, delivered > 0);
    });
}

/// A route to slot 0 removed while its device's MSI is in flight, then the same route and
/// host vector reused for slot 1 (as `route` does after `unroute`), and the old MSI's
/// handler may run twice. Once `retire` returned, no handler posts to slot 0 again: what
/// slot 0 got was all posted before the return, and every post after it goes to slot 1.
#[test]
fn no_post_to_the_old_vcpu_after_retire_returned() {
    model("msi route retire", FLOOR_RETIRE, || {
        let r = Arc::new(Route::new());
        r.publish(0);
        let h = {
            let r = r.clone();
            thread::spawn(move || [r.interrupt(), r.interrupt()])
        };
        r.retire();
        let old_at_return = r.posts[0].load(Relaxed);
        // What the handlers posted before the return is visible here (unregister's Acquire).
        let taken_old = r.posted[0].take();
        r.publish(1);
        let got = h.join().unwrap();
        assert_eq!(
            r.posts[0].load(Relaxed),
            old_at_return,
            "a handler posted to the old vCPU after retire returned"
        );
        let to_old = got.iter().filter(|g| **g == Some(Some(0))).count() as u32;
        let to_new = got.iter().filter(|g| **g == Some(Some(1))).count() as u32;
        assert_eq!(old_at_return, to_old);
        assert_eq!(taken_old[1] & 1 << (VECTOR % 64) != 0, to_old > 0);
        assert_eq!(r.posted[0].take(), [0; 4]);
        assert_eq!(r.posts[1].load(Relaxed), to_new);
        assert_eq!(r.delivered.load(Relaxed), u64::from(to_new));
    });
}

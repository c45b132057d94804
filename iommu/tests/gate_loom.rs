//! loom model of the reader/writer gate (`iommu/src/gate.rs`), the lock that lets a guest's
//! vCPUs run IOAS_MAP/UNMAP side by side while control operations get the guest alone.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p iommu --release --test gate_loom -- --nocapture`
//!
//! `gate.rs` is compiled into this test against loom's atomics (the `gate_sync` module below
//! replaces the library's facade). The protected value holds a loom `UnsafeCell`, so loom
//! checks every reader access against every writer access for a happens-before edge: a
//! reader and a writer inside the gate together would be reported as a data race. No
//! preemption bound (the four models take about two seconds in all). Each model prints how
//! many executions loom explored and fails below its floor (`FLOOR_*`, about half the count
//! observed when the floor was set), so a model that stopped racing fails instead of passing
//! vacuously.
//!
//! The handshake uses read-modify-writes on the reader flags on both sides (the reader's swap,
//! the writer's compare-and-swap) rather than SeqCst loads: loom models SeqCst as AcqRel, so a
//! store-buffering (Dekker) handshake on plain SeqCst loads is reported as a race here, and the
//! RMW form is correct under the weaker model too (`gate.rs`, `try_read`).
#![cfg(loom)]

extern crate alloc;

#[path = "loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/gate.rs"]
mod gate;

mod gate_sync {
    pub use loom::sync::atomic::AtomicBool;
    pub fn spin() {
        loom::thread::yield_now();
    }
}

use gate::{Gate, ReadError, SpinLock};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use loom_support::Preemptions;

/// Observed 105: one reader (waiting while the writer is in) and the writer.
const FLOOR_READER_WRITER: usize = 50;
/// Observed 65,945: two readers on their own slots (giving up if a writer is in) and the
/// writer waiting for both.
const FLOOR_TWO_READERS: usize = 32_000;
/// Observed 60.
const FLOOR_TRY_READ: usize = 30;
/// Observed 9: two threads, one lock and unlock each.
const FLOOR_SPIN_LOCK: usize = 4;

/// A value only loom's race detector reads: two words the writer keeps equal.
struct Cell2(UnsafeCell<(u64, u64)>);
// SAFETY: accessed only through the gate (which is what the model checks).
unsafe impl Sync for Cell2 {}
// SAFETY: as above.
unsafe impl Send for Cell2 {}

/// No preemption bound (the four models take about two seconds in all).
fn model(name: &str, min_executions: usize, f: impl Fn() + Sync + Send + 'static) {
    loom_support::model_with(name, min_executions, Preemptions::Unbounded, f);
}

#[test]
fn a_reader_and_a_writer_never_overlap() {
    model("gate reader/writer", FLOOR_READER_WRITER, || {
        let g = Arc::new(Gate::new(Cell2(UnsafeCell::new((0, 0))), 1).unwrap());
        let g2 = g.clone();
        let reader = thread::spawn(move || {
            let r = g2.read(0).unwrap();
            // SAFETY: inside the gate as a reader (what the model checks).
            let (a, b) = r.0.with(|p| unsafe { *p });
            assert_eq!(a, b);
        });
        {
            let w = g.write();
            // SAFETY: inside the gate as the writer.
            w.0.with_mut(|p| unsafe {
                (*p).0 += 1;
                (*p).1 += 1;
            });
        }
        reader.join().unwrap();
    });
}

#[test]
fn two_readers_on_their_slots_and_a_writer() {
    model("gate two readers/writer", FLOOR_TWO_READERS, || {
        let g = Arc::new(Gate::new(Cell2(UnsafeCell::new((0, 0))), 2).unwrap());
        let readers: Vec<_> = (0..2)
            .map(|slot| {
                let g = g.clone();
                thread::spawn(move || {
                    if let Ok(r) = g.try_read(slot) {
                        // SAFETY: inside the gate as a reader.
                        let (a, b) = r.0.with(|p| unsafe { *p });
                        assert_eq!(a, b);
                    }
                })
            })
            .collect();
        {
            let w = g.write();
            // SAFETY: inside the gate as the writer.
            w.0.with_mut(|p| unsafe {
                (*p).0 += 1;
                (*p).1 += 1;
            });
        }
        for r in readers {
            r.join().unwrap();
        }
    });
}

#[test]
fn try_read_withdraws_from_a_writer() {
    model("gate try_read/writer", FLOOR_TRY_READ, || {
        let g = Arc::new(Gate::new(Cell2(UnsafeCell::new((0, 0))), 1).unwrap());
        let g2 = g.clone();
        let reader = thread::spawn(move || match g2.try_read(0) {
            // SAFETY: inside the gate (or lock), which is what the model checks.
            Ok(r) => r.0.with(|p| unsafe { *p }).0,
            Err(e) => {
                assert_eq!(e, ReadError::Writer);
                u64::MAX
            }
        });
        {
            let w = g.write();
            // SAFETY: inside the gate (or lock), which is what the model checks.
            w.0.with_mut(|p| unsafe { (*p).0 = 7 });
        }
        let seen = reader.join().unwrap();
        assert!(seen == 0 || seen == 7 || seen == u64::MAX);
        assert_eq!(g.try_read(0).err(), None);
    });
}

#[test]
fn spin_lock_excludes() {
    model("spin lock", FLOOR_SPIN_LOCK, || {
        let l = Arc::new(SpinLock::new(Cell2(UnsafeCell::new((0, 0)))));
        let l2 = l.clone();
        let t = thread::spawn(move || {
            let g = l2.lock();
            // SAFETY: inside the gate (or lock), which is what the model checks.
            g.0.with_mut(|p| unsafe { (*p).0 += 1 });
        });
        {
            let g = l.lock();
            // SAFETY: inside the gate (or lock), which is what the model checks.
            g.0.with_mut(|p| unsafe { (*p).0 += 1 });
        }
        t.join().unwrap();
        // SAFETY: inside the gate (or lock), which is what the model checks.
        assert_eq!(l.lock().0.with(|p| unsafe { *p }).0, 2);
    });
}

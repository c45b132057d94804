//! Fault-event interrupts (VT-d 4.1 §7.3, §11.4.9.1-4: FECTL, FEDATA, FEADDR, FEUADDR): what
//! the interrupt path records and the rate limiter that keeps a fault storm from becoming an
//! interrupt storm.
//!
//! The unit raises one fault event when FSTS.PPF (or PFO, IQE, ...) goes from clear to set,
//! and no new one while those stay set: software must drain the records (clear each FRCD F
//! bit, then PFO) before the next fault can interrupt again. The interrupt handler therefore
//! only marks the unit pending and counts; the normal-context drain reads the records when the
//! mark says so ([`FaultEvents::take_pending`]).
//!
//! A device can fault as fast as it issues requests. Like Linux's DMAR fault handler, which
//! rate-limits its reports, this caps the interrupts: more than `burst` events within one
//! window of `window` time units and the unit is throttled: the drain sets FECTL.IM before it
//! clears the records (so clearing them raises no new event), then drains on every timer tick
//! (unconditionally) until the window has passed, and unmasks. No fault is lost meanwhile:
//! records stay in the FRCD registers (the hardware sets FECTL.IP and raises the event once IM
//! is cleared, §7.3.1), and the tick-driven drain reads them.
//!
//! Only the drain writes FECTL.IM (drains of one unit are serialised by its owner): if the
//! handler masked, a handler that decided to throttle just before a drain on another CPU
//! released the throttle could write IM after the drain's unmask, leaving the unit masked with
//! `throttled` clear, so nothing would interrupt or poll it again
//! (`iommu/tests/fault_events_loom.rs` finds that interleaving). Between the handler's
//! decision and the drain's mask the unit raises nothing new: PPF stays set until the drain.
//!
//! Concurrency: the interrupt path ([`FaultEvents::on_interrupt`]) runs on the one CPU the
//! unit's FEADDR names; the drain runs with that CPU's interrupts closed or on another CPU.
//! Every field is an atomic; the pending mark is a swap (Acquire in the drain, Release in the
//! handler) so records the handler announced are read after it announced them. The window
//! fields are written by the handler and by [`FaultEvents::try_release`]; a race between them
//! at most lets one extra event through or starts one window early: the cap stays a bound
//! on interrupts, never on faults recorded.

use core::sync::atomic::Ordering;

use crate::fault_events_sync::{AtomicBool, AtomicU32, AtomicU64};

/// What an event did to the limiter (the drain acts on it; the handler need not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the burst: FECTL.IM stays clear, the next event may interrupt.
    Deliver,
    /// Too many events in this window: throttled, the drain masks and polls until it ends.
    Throttle,
}

/// Per-unit fault-event state, shared by the interrupt path and the drain.
pub struct FaultEvents {
    window: AtomicU64,
    burst: AtomicU32,
    pending: AtomicBool,
    interrupts: AtomicU64,
    window_start: AtomicU64,
    in_window: AtomicU32,
    throttled: AtomicBool,
    reported: AtomicBool,
    engaged: AtomicU64,
}

impl Default for FaultEvents {
    fn default() -> Self {
        Self::new(64, 1 << 30)
    }
}

/// The initial state, for the const constructor and loom's non-const one.
macro_rules! fault_events {
    ($burst:expr, $window:expr) => {
        FaultEvents {
            window: AtomicU64::new($window),
            burst: AtomicU32::new($burst),
            pending: AtomicBool::new(false),
            interrupts: AtomicU64::new(0),
            window_start: AtomicU64::new(0),
            in_window: AtomicU32::new(0),
            throttled: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            engaged: AtomicU64::new(0),
        }
    };
}

impl FaultEvents {
    /// At most `burst` interrupts per `window` time units (the caller's clock).
    #[cfg(not(loom))]
    pub const fn new(burst: u32, window: u64) -> Self {
        fault_events!(burst, window)
    }

    /// loom's atomics have no const constructor.
    #[cfg(loom)]
    pub fn new(burst: u32, window: u64) -> Self {
        fault_events!(burst, window)
    }

    /// Sets the limits (before the unit's interrupt is unmasked).
    pub fn configure(&self, burst: u32, window: u64) {
        // Relaxed: written before the unit's FECTL unmask, which orders them before any event.
        self.burst.store(burst.max(1), Ordering::Relaxed);
        self.window.store(window.max(1), Ordering::Relaxed);
    }

    /// The interrupt path: one fault event at time `now`. Marks the unit pending.
    pub fn on_interrupt(&self, now: u64) -> Verdict {
        // Relaxed: a statistic; the RMW never loses a count.
        self.interrupts.fetch_add(1, Ordering::Relaxed);
        // Relaxed, the window fields: the limiter's estimate of the rate. A race with
        // `try_release` at most lets one extra event through (module doc), and nothing else is
        // published through them.
        let window = self.window.load(Ordering::Relaxed);
        if now.wrapping_sub(self.window_start.load(Ordering::Relaxed)) >= window {
            self.window_start.store(now, Ordering::Relaxed);
            self.in_window.store(0, Ordering::Relaxed);
        }
        let n = self.in_window.fetch_add(1, Ordering::Relaxed) + 1;
        // Release: the drain that sees the mark also sees the counters above.
        self.pending.store(true, Ordering::Release);
        if n > self.burst.load(Ordering::Relaxed) {
            // AcqRel: a swap, so of a handler and a release racing on it one sees the other;
            // Release publishes the window fields above to the drain that sees `throttled`.
            if !self.throttled.swap(true, Ordering::AcqRel) {
                self.engaged.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Throttle
        } else {
            Verdict::Deliver
        }
    }

    /// The drain: whether the records must be read now (an event was announced since the last
    /// call, or the unit is throttled and drained on every tick). Clears the mark.
    pub fn take_pending(&self) -> bool {
        // A swap, not a load and a store: a mark set after it is left for the next drain, so
        // no announcement is lost (`tests/fault_events_loom.rs`). Acquire pairs with the
        // handler's Release.
        let announced = self.pending.swap(false, Ordering::Acquire);
        announced || self.throttled.load(Ordering::Acquire)
    }

    /// Whether a drain would read the records now ([`take_pending`](Self::take_pending)
    /// without clearing the mark): lets a caller skip taking the unit at all.
    pub fn is_pending(&self) -> bool {
        // Acquire, as `take_pending`; a stale false only delays the read to the next exit.
        self.pending.load(Ordering::Acquire) || self.throttled.load(Ordering::Acquire)
    }

    /// The drain, after reading the records: ends a throttle whose window has passed at `now`.
    /// True when the caller must clear FECTL.IM again. While throttled, the drain sets
    /// FECTL.IM before reading (see the module doc: only the drain writes it).
    pub fn try_release(&self, now: u64) -> bool {
        if !self.throttled.load(Ordering::Acquire) {
            return false;
        }
        let window = self.window.load(Ordering::Relaxed);
        if now.wrapping_sub(self.window_start.load(Ordering::Relaxed)) < window {
            return false;
        }
        self.window_start.store(now, Ordering::Relaxed);
        self.in_window.store(0, Ordering::Relaxed);
        self.reported.store(false, Ordering::Relaxed);
        // Release: the new window is visible to a handler that sees the throttle ended. A
        // handler's throttle swapped in since the load above is cleared too: the unit is then
        // unmasked and its next events count in the new window (at most `burst` more).
        self.throttled.store(false, Ordering::Release);
        true
    }

    /// True once per throttled window: the caller reports the throttle.
    pub fn take_report(&self) -> bool {
        // A swap: once per window even if two drains ask.
        self.throttled.load(Ordering::Acquire) && !self.reported.swap(true, Ordering::AcqRel)
    }

    pub fn is_throttled(&self) -> bool {
        self.throttled.load(Ordering::Acquire)
    }

    /// Fault-event interrupts taken (Relaxed, as the other statistics below).
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }

    /// Windows in which the limiter engaged.
    pub fn engaged(&self) -> u64 {
        self.engaged.load(Ordering::Relaxed)
    }

    pub fn burst(&self) -> u32 {
        self.burst.load(Ordering::Relaxed)
    }

    pub fn window(&self) -> u64 {
        self.window.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn each_event_marks_pending_once() {
        let e = FaultEvents::new(4, 100);
        assert!(!e.take_pending());
        assert_eq!(e.on_interrupt(10), Verdict::Deliver);
        assert!(e.take_pending());
        assert!(!e.take_pending());
        assert_eq!(e.interrupts(), 1);
    }

    #[test]
    fn more_than_burst_in_a_window_throttles_until_it_ends() {
        let e = FaultEvents::new(3, 100);
        for t in 0..3 {
            assert_eq!(e.on_interrupt(t), Verdict::Deliver);
        }
        assert!(!e.is_throttled());
        assert_eq!(e.on_interrupt(5), Verdict::Throttle);
        assert!(e.is_throttled());
        assert_eq!(e.engaged(), 1);
        // Reported once per window.
        assert!(e.take_report());
        assert!(!e.take_report());
        // While throttled every drain reads the records, mark or not.
        assert!(e.take_pending());
        assert!(e.take_pending());
        // The window started at t = 0: not over at 99, over at 100.
        assert!(!e.try_release(99));
        assert!(e.try_release(100));
        assert!(!e.is_throttled());
        assert!(!e.take_pending());
        // A new window: three more are delivered before the next throttle.
        for t in 101..104 {
            assert_eq!(e.on_interrupt(t), Verdict::Deliver);
        }
        assert_eq!(e.on_interrupt(104), Verdict::Throttle);
        assert_eq!(e.engaged(), 2);
        assert!(e.take_report());
    }

    #[test]
    fn slow_events_never_throttle() {
        let e = FaultEvents::new(2, 10);
        for k in 0..100u64 {
            assert_eq!(e.on_interrupt(k * 6), Verdict::Deliver, "event {k}");
            assert!(e.take_pending());
            assert!(!e.try_release(k * 6));
        }
        assert_eq!(e.engaged(), 0);
        assert_eq!(e.interrupts(), 100);
    }

    #[test]
    fn clock_wrap_is_a_new_window() {
        let e = FaultEvents::new(1, 10);
        assert_eq!(e.on_interrupt(u64::MAX - 2), Verdict::Deliver);
        assert_eq!(e.on_interrupt(u64::MAX), Verdict::Throttle);
        assert!(e.try_release(8));
        assert_eq!(e.on_interrupt(9), Verdict::Deliver);
    }
}

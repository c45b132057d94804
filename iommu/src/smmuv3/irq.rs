//! Rate limiting of the SMMU's event queue interrupt (SMMUv3 §7.2: with IRQ_CTRL.EVENTQ_IRQEN
//! the SMMU signals its wired or MSI interrupt when it writes records to the event queue).
//!
//! A device that faults continuously (a hostile guest's DMA engine) would otherwise interrupt
//! the hypervisor once per record. As Linux rate-limits its fault reports, the owner of the
//! queue counts the records each drain consumed per time window: more than `limit` in one
//! window and the interrupt is left disabled in IRQ_CTRL until the window ends; meanwhile the
//! queue is drained on the caller's periodic tick (the scheduler's time slice), so no record is
//! lost to the limiter and the CPU is not interrupted per record. The decision is reported once
//! per window, when it is taken.
//!
//! Pure bookkeeping over a caller-supplied clock, so it is tested on the host; the caller owns
//! the IRQ_CTRL writes.

/// What the caller should do after [`EventRateLimiter::after_drain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterDecision {
    /// Whether the event queue interrupt should be enabled now.
    pub irq_enabled: bool,
    /// The limit was crossed in this call: report it (once per window).
    pub engaged_now: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct EventRateLimiter {
    limit: u64,
    window: u64,
    window_start: u64,
    in_window: u64,
    limited: bool,
    engaged: u64,
}

impl EventRateLimiter {
    /// At most `limit` events per `window` clock units (at least 1 each).
    pub const fn new(limit: u64, window: u64) -> Self {
        EventRateLimiter {
            limit: if limit == 0 { 1 } else { limit },
            window: if window == 0 { 1 } else { window },
            window_start: 0,
            in_window: 0,
            limited: false,
            engaged: 0,
        }
    }

    /// Accounts `events` records drained at time `now` (a monotonic clock; a clock that went
    /// backwards starts a new window).
    pub fn after_drain(&mut self, now: u64, events: u64) -> LimiterDecision {
        if now < self.window_start || now - self.window_start >= self.window {
            self.window_start = now;
            self.in_window = 0;
            self.limited = false;
        }
        self.in_window = self.in_window.saturating_add(events);
        let engaged_now = !self.limited && self.in_window > self.limit;
        if engaged_now {
            self.limited = true;
            self.engaged += 1;
        }
        LimiterDecision {
            irq_enabled: !self.limited,
            engaged_now,
        }
    }

    /// Whether the interrupt is held off in the current window.
    pub fn limited(&self) -> bool {
        self.limited
    }

    /// Windows in which the limit was crossed.
    pub fn engaged(&self) -> u64 {
        self.engaged
    }

    /// Events counted in the current window.
    pub fn in_window(&self) -> u64 {
        self.in_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_limit_the_interrupt_stays_on() {
        let mut l = EventRateLimiter::new(100, 10);
        for t in 0..10 {
            let d = l.after_drain(t, 10);
            assert_eq!(
                d,
                LimiterDecision {
                    irq_enabled: true,
                    engaged_now: false
                }
            );
        }
        assert_eq!(l.in_window(), 100);
        assert_eq!(l.engaged(), 0);
    }

    #[test]
    fn crossing_the_limit_disables_once_and_the_next_window_re_enables() {
        let mut l = EventRateLimiter::new(100, 10);
        assert!(l.after_drain(0, 100).irq_enabled);
        let d = l.after_drain(1, 1);
        assert!(!d.irq_enabled && d.engaged_now, "101 > 100 events");
        // Further drains in the same window: still off, reported only once.
        for t in 2..10 {
            let d = l.after_drain(t, 50);
            assert!(!d.irq_enabled && !d.engaged_now);
        }
        assert!(l.limited());
        // The window ends: on again, counting from zero.
        let d = l.after_drain(10, 0);
        assert!(d.irq_enabled && !d.engaged_now);
        assert_eq!(l.in_window(), 0);
        // A burst in the new window engages it again, reported again.
        let d = l.after_drain(11, 500);
        assert!(!d.irq_enabled && d.engaged_now);
        assert_eq!(l.engaged(), 2);
    }

    #[test]
    fn a_clock_going_backwards_starts_a_new_window() {
        let mut l = EventRateLimiter::new(1, 1000);
        l.after_drain(1500, 2); // a new window starts at 1500
        assert!(l.limited());
        let d = l.after_drain(100, 0);
        assert!(d.irq_enabled && !l.limited());
    }

    #[test]
    fn zero_limit_and_window_are_clamped_not_divided_by() {
        let mut l = EventRateLimiter::new(0, 0);
        assert!(l.after_drain(0, 1).irq_enabled);
        assert!(!l.after_drain(0, 1).irq_enabled);
        assert!(l.after_drain(1, 0).irq_enabled);
        assert!(!l.after_drain(u64::MAX, u64::MAX).irq_enabled);
    }
}

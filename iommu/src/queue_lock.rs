//! The lock both drivers serialise their invalidation/command queue with (VT-d: the
//! invalidation queue or register pair, `vtd::invalidation`; SMMUv3: the command queue,
//! `smmuv3::cmdq`). A holder keeps it for a whole batch, including the wait for completion, so
//! the queue is idle whenever the lock is free. It is a spin lock on one `AtomicBool`: no
//! allocation, and taking it is bounded like every other wait, so a unit that stops answering
//! turns into a timeout error instead of a hang.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// How often the queue locks of every unit were taken, and how many of those takes found the
/// lock held (and how many failed attempts they spun through): the evidence for or against
/// contention on the units' queues when several CPUs unmap at once (docs/perf.md, "Session 4").
/// Relaxed counters, summed over every unit of both kinds.
static TAKEN: AtomicU64 = AtomicU64::new(0);
static CONTENDED: AtomicU64 = AtomicU64::new(0);
static SPINS: AtomicU64 = AtomicU64::new(0);
/// Completion polls after the doorbell (VT-d status dword, SMMUv3 CMDQ_CONS) that did not yet
/// see the batch complete.
static WAIT_POLLS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the queue-lock counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Contention {
    pub taken: u64,
    pub contended: u64,
    pub spins: u64,
    pub wait_polls: u64,
}

/// The counters so far (every unit, every CPU).
pub fn contention() -> Contention {
    Contention {
        taken: TAKEN.load(Ordering::Relaxed),
        contended: CONTENDED.load(Ordering::Relaxed),
        spins: SPINS.load(Ordering::Relaxed),
        wait_polls: WAIT_POLLS.load(Ordering::Relaxed),
    }
}

/// Counts one completion poll that found the batch still in flight.
pub(crate) fn count_wait_poll() {
    WAIT_POLLS.fetch_add(1, Ordering::Relaxed);
}

/// A bounded spin lock for one hardware queue.
pub(crate) struct QueueLock {
    held: AtomicBool,
    /// CPUs spinning for the lock right now (touched only when a take finds it held).
    waiters: AtomicU32,
}

/// Holds a [`QueueLock`]; dropping it releases the lock.
pub(crate) struct QueueGuard<'a>(&'a AtomicBool);

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        // Release: queue state written under the lock is seen by the next holder.
        self.0.store(false, Ordering::Release);
    }
}

impl QueueLock {
    pub(crate) const fn new() -> Self {
        QueueLock {
            held: AtomicBool::new(false),
            waiters: AtomicU32::new(0),
        }
    }

    fn try_take(&self) -> bool {
        // Acquire: pairs with the Release in `QueueGuard::drop`.
        self.held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Tries to take the lock up to `attempts` times, spinning between tries; `None` if it
    /// stayed held throughout. Every failed attempt counts as a spin, a take after at least
    /// one as contended ([`contention`]).
    pub(crate) fn lock(&self, attempts: u32) -> Option<QueueGuard<'_>> {
        if attempts == 0 {
            return None;
        }
        if self.try_take() {
            TAKEN.fetch_add(1, Ordering::Relaxed);
            return Some(QueueGuard(&self.held));
        }
        // The slow path: the counters cost nothing on an uncontended take.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let mut failed = 1u64;
        let mut taken = false;
        for _ in 1..attempts {
            spin_loop();
            if self.try_take() {
                taken = true;
                break;
            }
            failed += 1;
        }
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        SPINS.fetch_add(failed, Ordering::Relaxed);
        if !taken {
            return None;
        }
        TAKEN.fetch_add(1, Ordering::Relaxed);
        CONTENDED.fetch_add(1, Ordering::Relaxed);
        Some(QueueGuard(&self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_lock_times_out_and_frees_on_drop() {
        let lock = QueueLock::new();
        let guard = lock
            .lock(1)
            .expect("a free lock is taken at the first attempt");
        assert!(lock.lock(10).is_none());
        drop(guard);
        assert!(lock.lock(1).is_some());
        assert!(lock.lock(0).is_none(), "no attempts, no lock");
    }

    #[test]
    fn failed_attempts_count_as_spins() {
        let lock = QueueLock::new();
        let _guard = lock.lock(1).expect("free lock");
        let before = contention();
        assert!(lock.lock(10).is_none());
        // Other tests may add to the global counters in parallel: lower bounds only.
        assert!(
            contention().spins >= before.spins + 10,
            "ten failed attempts"
        );
    }

    #[test]
    fn a_take_that_waited_is_counted_as_contended() {
        let lock = QueueLock::new();
        let guard = lock.lock(1).expect("free lock");
        let before = contention();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| lock.lock(u32::MAX).map(drop).is_some());
            // Release only once the waiter has found the lock held.
            while lock.waiters.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            drop(guard);
            assert!(waiter.join().unwrap(), "taken once the holder let go");
        });
        let after = contention();
        assert!(after.taken > before.taken);
        assert!(
            after.contended > before.contended,
            "the waiter's take waited"
        );
        assert!(after.spins > before.spins);
    }
}

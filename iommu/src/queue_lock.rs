//! The lock both drivers serialise their invalidation/command queue with (VT-d: the
//! invalidation queue or register pair, `vtd::invalidation`; SMMUv3: the command queue,
//! `smmuv3::cmdq`). A holder keeps it for a whole batch, including the wait for completion, so
//! the queue is idle whenever the lock is free. It is a spin lock on one `AtomicBool`: no
//! allocation, and taking it is bounded like every other wait, so a unit that stops answering
//! turns into a timeout error instead of a hang.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, Ordering};

/// A bounded spin lock for one hardware queue.
pub(crate) struct QueueLock(AtomicBool);

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
        QueueLock(AtomicBool::new(false))
    }

    /// Tries to take the lock up to `attempts` times, spinning between tries; `None` if it
    /// stayed held throughout.
    pub(crate) fn lock(&self, attempts: u32) -> Option<QueueGuard<'_>> {
        for _ in 0..attempts {
            // Acquire: pairs with the Release in `QueueGuard::drop`.
            if self
                .0
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Some(QueueGuard(&self.0));
            }
            spin_loop();
        }
        None
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
}

//! The table of device interrupt vectors: which handler owns each vector in
//! [`FIRST`]..=[`LAST`] (x86: the IDT entries the hypervisor gives to MSIs and the IOMMUs' fault
//! events), and how many interrupts each vector took.
//!
//! Lock-free and heap-free, so the interrupt path can use it: a handler is a non-zero `u32`
//! token (its meaning is the kernel's), stored in one atomic per vector. Registering is a
//! compare-and-swap from 0, so of two registrations of the same vector exactly one succeeds;
//! the interrupt path only loads the slot (Acquire, pairing with the registration's Release:
//! whatever the handler's state was set up to before registering is visible to it).
//!
//! Unregistering waits out the dispatches in flight: [`VectorTable::dispatch`] runs the
//! handler inside the call, bracketed by a per-vector in-flight count, and
//! [`VectorTable::unregister`] clears the slot and then spins until that count is zero. The
//! two sides are the store-buffering pattern (each writes one word, then reads the other's), so
//! each has a SeqCst fence between its write and its read: in the fences' single total order,
//! either the dispatch's fence comes first (its in-flight increment is visible to the
//! unregister, which waits) or the unregister's does (the dispatch's load sees the cleared
//! slot and runs nothing). So once `unregister` returns, the handler never runs again for that
//! registration (`drivers/tests/vectors_loom.rs` checks this). `unregister` must not be called
//! from the vector's own handler (it would wait for itself).

use core::num::NonZeroU32;
use core::sync::atomic::Ordering;

use crate::vectors_sync::{AtomicU32, AtomicU64, fence, spin};

/// First and last vector of the device range. 0-31 are exceptions; 0x20-0x2F are left to the
/// legacy PIC range (masked, but a stray one must not look like a device's); 0xF0-0xFF hold the
/// timer, IPIs and the spurious vector.
pub const FIRST: u8 = 0x30;
pub const LAST: u8 = 0xef;
const N: usize = (LAST - FIRST) as usize + 1;

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorError {
    /// Outside [`FIRST`]..=[`LAST`].
    OutOfRange(u8),
    /// Already owned by another handler.
    Busy(u8),
    /// No free vector left.
    Exhausted,
}

/// Handlers and per-vector counters.
pub struct VectorTable {
    slots: [AtomicU32; N],
    /// Dispatches between their in-flight increment and decrement, per vector.
    active: [AtomicU32; N],
    counts: [AtomicU64; N],
    /// Interrupts on a vector outside the range or with no handler.
    unclaimed: AtomicU64,
}

impl Default for VectorTable {
    fn default() -> Self {
        Self::new()
    }
}

impl VectorTable {
    #[cfg(loom)]
    pub fn new() -> Self {
        // loom's atomics have no const constructor.
        VectorTable {
            slots: core::array::from_fn(|_| AtomicU32::new(0)),
            active: core::array::from_fn(|_| AtomicU32::new(0)),
            counts: core::array::from_fn(|_| AtomicU64::new(0)),
            unclaimed: AtomicU64::new(0),
        }
    }

    #[cfg(not(loom))]
    pub const fn new() -> Self {
        VectorTable {
            slots: [const { AtomicU32::new(0) }; N],
            active: [const { AtomicU32::new(0) }; N],
            counts: [const { AtomicU64::new(0) }; N],
            unclaimed: AtomicU64::new(0),
        }
    }

    fn slot(vector: u8) -> Option<usize> {
        (FIRST..=LAST)
            .contains(&vector)
            .then(|| usize::from(vector - FIRST))
    }

    /// Gives `vector` to `handler`.
    pub fn register(&self, vector: u8, handler: NonZeroU32) -> Result<(), VectorError> {
        let i = Self::slot(vector).ok_or(VectorError::OutOfRange(vector))?;
        // Release: the handler's state, set up before, is visible to the interrupt path's
        // Acquire load of the slot.
        self.slots[i]
            .compare_exchange(0, handler.get(), Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
            .map_err(|_| VectorError::Busy(vector))
    }

    /// Gives the lowest free vector at or above `from` to `handler`.
    pub fn register_any(&self, from: u8, handler: NonZeroU32) -> Result<u8, VectorError> {
        for v in from.max(FIRST)..=LAST {
            match self.register(v, handler) {
                Ok(()) => return Ok(v),
                Err(VectorError::Busy(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(VectorError::Exhausted)
    }

    /// Frees `vector` if `handler` owns it; false otherwise (nothing changes). When it returns
    /// true, no dispatch is running `handler` for `vector` and none will.
    pub fn unregister(&self, vector: u8, handler: NonZeroU32) -> bool {
        let Some(i) = Self::slot(vector) else {
            return false;
        };
        // Relaxed is enough for the swap itself: the fence below orders it before the wait.
        if self.slots[i]
            .compare_exchange(handler.get(), 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // SeqCst fence, paired with the one in `dispatch`: a dispatch that loaded the old token
        // had its fence before this one, so its in-flight increment is visible to the loads
        // below; one whose fence comes after this one loads the cleared slot.
        fence(Ordering::SeqCst);
        // Acquire: pairs with the dispatch's Release decrement, so the handler's effects
        // happen before this returns.
        while self.active[i].load(Ordering::Acquire) != 0 {
            spin();
        }
        true
    }

    /// The interrupt path: counts the interrupt on `vector` and runs `run` with its handler's
    /// token (returning `Some` of its result), or returns `None` (counted as unclaimed) when no
    /// handler owns the vector. A handler whose `unregister` has returned is never run.
    pub fn dispatch<R>(&self, vector: u8, run: impl FnOnce(NonZeroU32) -> R) -> Option<R> {
        let Some(i) = Self::slot(vector) else {
            // Relaxed: a statistic; the RMW itself never loses a count.
            self.unclaimed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // Relaxed: a statistic read after the fact; the RMW never loses a count.
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        // Relaxed increment, then the SeqCst fence that orders it before the slot load (see
        // `unregister`).
        self.active[i].fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // Acquire: pairs with the registration's Release, so the handler's state is visible.
        let r = NonZeroU32::new(self.slots[i].load(Ordering::Acquire)).map(run);
        // Release: everything the handler did happens before an unregister that sees the
        // count drop.
        self.active[i].fetch_sub(1, Ordering::Release);
        if r.is_none() {
            self.unclaimed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Interrupts taken on `vector` (0 outside the range). Relaxed: a statistic.
    pub fn count(&self, vector: u8) -> u64 {
        Self::slot(vector).map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    /// Interrupts no handler claimed. Relaxed: a statistic.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    /// The handler owning `vector` (Acquire, as `dispatch`).
    pub fn owner(&self, vector: u8) -> Option<NonZeroU32> {
        Self::slot(vector).and_then(|i| NonZeroU32::new(self.slots[i].load(Ordering::Acquire)))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn h(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn register_dispatch_unregister() {
        let t = VectorTable::new();
        assert_eq!(t.register(0x41, h(7)), Ok(()));
        assert_eq!(t.register(0x41, h(8)), Err(VectorError::Busy(0x41)));
        assert_eq!(t.register(0x20, h(8)), Err(VectorError::OutOfRange(0x20)));
        assert_eq!(t.register(0xf0, h(8)), Err(VectorError::OutOfRange(0xf0)));
        assert_eq!(t.dispatch(0x41, |t| t), Some(h(7)));
        assert_eq!(t.dispatch(0x41, |t| t), Some(h(7)));
        assert_eq!(t.count(0x41), 2);
        assert_eq!(t.unclaimed(), 0);
        // Only the owner can free it.
        assert!(!t.unregister(0x41, h(8)));
        assert!(t.unregister(0x41, h(7)));
        assert_eq!(t.dispatch(0x41, |t| t), None);
        assert_eq!(t.count(0x41), 3);
        assert_eq!(t.unclaimed(), 1);
        assert_eq!(t.dispatch(0xfe, |t| t), None);
        assert_eq!(t.unclaimed(), 2);
    }

    #[test]
    fn register_any_takes_the_lowest_free_and_runs_out() {
        let t = VectorTable::new();
        assert_eq!(t.register_any(0, h(1)), Ok(FIRST));
        assert_eq!(t.register(FIRST + 1, h(2)), Ok(()));
        assert_eq!(t.register_any(0, h(3)), Ok(FIRST + 2));
        assert_eq!(t.register_any(0x80, h(4)), Ok(0x80));
        let mut n = 4;
        while t.register_any(0, h(9)).is_ok() {
            n += 1;
        }
        assert_eq!(n, N);
        assert_eq!(t.register_any(0, h(9)), Err(VectorError::Exhausted));
        assert_eq!(t.owner(0x80), Some(h(4)));
    }
}

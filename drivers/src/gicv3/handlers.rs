//! The table the EL2 interrupt path dispatches through: an INTID (SPI or LPI) maps to one
//! registered handler and its counter.
//!
//! Handlers run in interrupt context, with PSTATE.I set, possibly on a CPU that holds any lock
//! of the interrupted code: a handler must take no lock and do no more than record what
//! happened (set a flag, count) for normal-context code to act on. The dispatch path takes no
//! lock: a slot's entry is written once (`spin::Once`) and then published by storing its INTID
//! with Release; the dispatch finds a slot by loading INTIDs with Acquire, so a dispatch on
//! another CPU sees either no handler or the complete one.
//!
//! Registration (normal context only, never from a handler) is serialised by a lock: checking
//! that the INTID has no handler yet and publishing the new one must be one step, or two
//! racing registrations of one INTID could each find it free and take two slots (the table
//! had that race until `drivers/tests/gic_handlers_loom.rs` showed it). The interrupt path never
//! takes the lock, so an interrupt arriving on the registering CPU cannot deadlock on it.
//! Slots are never freed: the hypervisor's handlers live as long as it does.

use core::sync::atomic::Ordering;

use crate::handlers_sync::{AtomicU32, AtomicU64, RegisterLock};

/// A handler: called with the INTID and the context word given at registration (e.g. the index
/// of the unit whose interrupt this is).
pub type HandlerFn = fn(intid: u32, context: usize);

/// The INTIDs the GIC returns when there is nothing to acknowledge (IHI 0069 §2.2.1): 1023
/// spurious, 1020-1022 reserved for special purposes. None of them is ever dispatched or
/// completed.
pub const SPURIOUS: u32 = 1023;

pub fn is_special(intid: u32) -> bool {
    (1020..=1023).contains(&intid)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Every slot is taken.
    Full,
    /// The INTID already has a handler.
    Taken(u32),
    /// 1020-1023 are never delivered as interrupts.
    Special(u32),
}

/// The INTID of a slot that holds no handler (not an INTID the GIC delivers).
const FREE: u32 = u32::MAX;

struct Slot {
    /// The INTID this slot handles, [`FREE`] until its entry is complete.
    intid: AtomicU32,
    entry: spin::Once<(HandlerFn, usize)>,
    count: AtomicU64,
}

impl Slot {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Slot {
            intid: AtomicU32::new(FREE),
            entry: spin::Once::new(),
            count: AtomicU64::new(0),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Slot {
            intid: AtomicU32::new(FREE),
            entry: spin::Once::new(),
            count: AtomicU64::new(0),
        }
    }
}

/// `N` handlers at most.
pub struct HandlerTable<const N: usize> {
    slots: [Slot; N],
    register: RegisterLock,
    unhandled: AtomicU64,
    last_unhandled: AtomicU32,
    spurious: AtomicU64,
}

impl<const N: usize> Default for HandlerTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> HandlerTable<N> {
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        HandlerTable {
            slots: [const { Slot::new() }; N],
            register: RegisterLock::new(),
            unhandled: AtomicU64::new(0),
            last_unhandled: AtomicU32::new(SPURIOUS),
            spurious: AtomicU64::new(0),
        }
    }

    /// loom's atomics and lock have no const constructor.
    #[cfg(loom)]
    pub fn new() -> Self {
        HandlerTable {
            slots: core::array::from_fn(|_| Slot::new()),
            register: RegisterLock::new(),
            unhandled: AtomicU64::new(0),
            last_unhandled: AtomicU32::new(SPURIOUS),
            spurious: AtomicU64::new(0),
        }
    }

    fn find(&self, intid: u32) -> Option<&Slot> {
        // Acquire: pairs with the Release that published the slot, so its entry is complete.
        self.slots
            .iter()
            .find(|s| s.intid.load(Ordering::Acquire) == intid)
    }

    /// Registers `handler` for `intid`, from normal context (never from a handler). Of two
    /// racing registrations of one INTID exactly one succeeds; the other gets
    /// [`RegisterError::Taken`].
    pub fn register(
        &self,
        intid: u32,
        handler: HandlerFn,
        context: usize,
    ) -> Result<(), RegisterError> {
        if is_special(intid) || intid == FREE {
            return Err(RegisterError::Special(intid));
        }
        let _serialised = self.register.lock();
        if self.find(intid).is_some() {
            return Err(RegisterError::Taken(intid));
        }
        // Under the lock, a slot whose INTID is FREE has no entry and nobody else is filling it
        // (Relaxed: the lock orders this with every earlier registration).
        let slot = self
            .slots
            .iter()
            .find(|s| s.intid.load(Ordering::Relaxed) == FREE)
            .ok_or(RegisterError::Full)?;
        slot.entry.call_once(|| (handler, context));
        // Release: a dispatch that loads this INTID (Acquire, `find`) sees the entry.
        slot.intid.store(intid, Ordering::Release);
        Ok(())
    }

    /// What the interrupt path does with an acknowledged INTID: counts it and runs its handler.
    /// Returns whether a handler ran (`false`: spurious/special, or nobody registered it, which
    /// is counted as unhandled). The caller completes the interrupt (EOI) either way, except
    /// for the special INTIDs, which are never completed.
    pub fn dispatch(&self, intid: u32) -> bool {
        if is_special(intid) {
            // Relaxed, as every counter here: a statistic; the RMW never loses a count.
            self.spurious.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.find(intid) {
            Some(slot) => {
                slot.count.fetch_add(1, Ordering::Relaxed);
                if let Some(&(handler, context)) = slot.entry.get() {
                    handler(intid, context);
                }
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                self.last_unhandled.store(intid, Ordering::Relaxed);
                false
            }
        }
    }

    /// Interrupts dispatched to `intid`'s handler so far (0 if it has none).
    pub fn count(&self, intid: u32) -> u64 {
        self.find(intid)
            .map_or(0, |s| s.count.load(Ordering::Relaxed))
    }

    /// Whether `intid` has a handler.
    pub fn is_registered(&self, intid: u32) -> bool {
        self.find(intid).is_some()
    }

    /// Acknowledged INTIDs nobody registered, and the last of them.
    pub fn unhandled(&self) -> (u64, u32) {
        (
            self.unhandled.load(Ordering::Relaxed),
            self.last_unhandled.load(Ordering::Relaxed),
        )
    }

    /// Acknowledges that returned a special INTID (1020-1023).
    pub fn spurious(&self) -> u64 {
        self.spurious.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static SEEN: AtomicUsize = AtomicUsize::new(0);
    static LAST: AtomicUsize = AtomicUsize::new(0);

    fn record(intid: u32, context: usize) {
        SEEN.fetch_add(1, Ordering::Relaxed);
        LAST.store((intid as usize) << 16 | context, Ordering::Relaxed);
    }

    fn other(_: u32, _: usize) {}

    #[test]
    fn dispatch_runs_the_registered_handler_and_counts_per_intid() {
        let t: HandlerTable<4> = HandlerTable::new();
        t.register(106, record, 7).unwrap();
        t.register(8192, other, 0).unwrap();
        let before = SEEN.load(Ordering::Relaxed);
        assert!(t.dispatch(106));
        assert!(t.dispatch(106));
        assert!(t.dispatch(8192));
        assert_eq!(SEEN.load(Ordering::Relaxed) - before, 2);
        assert_eq!(LAST.load(Ordering::Relaxed), 106 << 16 | 7);
        assert_eq!((t.count(106), t.count(8192), t.count(109)), (2, 1, 0));
    }

    #[test]
    fn unknown_and_spurious_intids_are_counted_not_dispatched() {
        let t: HandlerTable<2> = HandlerTable::new();
        t.register(106, other, 0).unwrap();
        assert!(!t.dispatch(109));
        assert!(!t.dispatch(SPURIOUS));
        assert!(!t.dispatch(1020));
        assert_eq!(t.unhandled(), (1, 109));
        assert_eq!(t.spurious(), 2);
        assert_eq!(t.count(106), 0);
    }

    #[test]
    fn registration_refuses_duplicates_special_ids_and_a_full_table() {
        let t: HandlerTable<2> = HandlerTable::new();
        assert_eq!(
            t.register(1023, other, 0),
            Err(RegisterError::Special(1023))
        );
        t.register(106, other, 0).unwrap();
        assert_eq!(t.register(106, record, 1), Err(RegisterError::Taken(106)));
        t.register(109, other, 0).unwrap();
        assert_eq!(t.register(110, other, 0), Err(RegisterError::Full));
        assert!(t.is_registered(109) && !t.is_registered(110));
    }

    #[test]
    fn concurrent_registration_gives_each_slot_to_one_intid() {
        let t: std::sync::Arc<HandlerTable<8>> = std::sync::Arc::new(HandlerTable::new());
        let threads: std::vec::Vec<_> = (0..8u32)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || t.register(8192 + i, other, i as usize))
            })
            .collect();
        for th in threads {
            th.join().unwrap().unwrap();
        }
        for i in 0..8u32 {
            assert!(t.dispatch(8192 + i));
            assert_eq!(t.count(8192 + i), 1);
        }
    }
}

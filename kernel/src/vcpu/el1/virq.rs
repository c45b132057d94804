//! Virtual interrupts waiting for a vCPU, reachable from interrupt context: a fixed table of
//! slots, one per live vCPU, each a [`PendingSet`] of virtual INTIDs. An LPI handler (an
//! assigned device's MSI, `guest::msi`) or the backend itself (the virtual timer) raises an
//! INTID in the slot; the CPU that runs the vCPU moves it into a list register before the next
//! entry (`vgic::refill`). A slot is claimed when the vCPU is created and released when it is
//! destroyed; handlers address it by index, so no reference to a vCPU ever crosses into
//! interrupt context.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use drivers::gicv3::vgic::PendingSet;

/// At most 8 guests of 8 vCPUs (docs/guests.md).
pub const SLOTS: usize = 64;

pub struct Slot {
    claimed: AtomicBool,
    /// Bumped at every release: a route that names (slot, generation) of a vCPU that is gone
    /// raises nothing in the slot's next owner.
    generation: AtomicU32,
    pub pending: PendingSet,
    /// Interrupt sources other than the timer routed to this vCPU (MSI routes): a vCPU with
    /// none and no armed timer that waits in WFI would wait forever, and is stopped instead.
    pub sources: AtomicU32,
    /// Virtual interrupts raised in this slot (the delivery count the reports show).
    pub raised: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            claimed: AtomicBool::new(false),
            generation: AtomicU32::new(0),
            pending: PendingSet::new(),
            sources: AtomicU32::new(0),
            raised: AtomicU64::new(0),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// A claimed slot: its index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId {
    pub index: usize,
    pub generation: u32,
}

/// Claims a free slot (empty, no sources). Acquire on the claim: sees the release's clearing.
pub fn claim() -> Option<SlotId> {
    TABLE.iter().enumerate().find_map(|(index, s)| {
        s.claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| {
                // A raise that raced the previous owner's release may have left a bit.
                s.pending.clear();
                s.raised.store(0, Ordering::Relaxed);
            })
            .map(|()| SlotId {
                index,
                generation: s.generation.load(Ordering::Relaxed),
            })
    })
}

/// Gives slot `i` back. Its sources must have been removed (routes torn down) first.
pub fn release(id: SlotId) {
    if let Some(s) = TABLE.get(id.index) {
        s.generation.fetch_add(1, Ordering::Relaxed);
        s.pending.clear();
        s.sources.store(0, Ordering::Relaxed);
        s.raised.store(0, Ordering::Relaxed);
        // Release: the next claimer sees the cleared state.
        s.claimed.store(false, Ordering::Release);
    }
}

pub fn slot(i: usize) -> Option<&'static Slot> {
    TABLE.get(i)
}

/// Raises `vintid` in slot `id` (interrupt context: no lock). `false` for a slot that is not
/// claimed, of another generation, or an INTID outside the pending set.
pub fn raise(id: SlotId, vintid: u32) -> bool {
    let Some(s) = TABLE.get(id.index) else {
        return false;
    };
    if !s.claimed.load(Ordering::Acquire)
        || s.generation.load(Ordering::Relaxed) != id.generation
        || !s.pending.raise(vintid)
    {
        return false;
    }
    s.raised.fetch_add(1, Ordering::Relaxed);
    true
}

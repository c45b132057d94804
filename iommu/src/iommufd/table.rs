//! The per-guest object table: 32-bit IDs, never 0, 31 bits used.
//!
//! An ID is `generation << 16 | (slot + 1)`: the low 16 bits name a slot (1..=65535), the next
//! 15 bits count how many objects the slot has held. A destroyed object's ID therefore stops
//! working (ENOENT) instead of silently naming the slot's next object, and slots are reused,
//! so no ID is ever leaked as a tombstone.
//!
//! Creation is two-phase: [`Table::reserve`] finds (or grows) a free slot, which may fail,
//! and [`Table::publish`] fills it, which cannot. An object whose creation fails later is
//! withdrawn with [`Table::unpublish`], which leaves the generation as it was: a failed call
//! changes nothing a guest can observe, not even the next ID it will get.

use alloc::vec::Vec;

use super::Error;
use super::object::Object;

const GEN_BITS: u32 = 15;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
/// Slots a table can ever have.
pub const MAX_SLOTS: u32 = 0xffff;

struct Slot {
    gen_: u16,
    obj: Option<Object>,
}

pub(crate) struct Table {
    slots: Vec<Slot>,
    live: u32,
    max: u32,
}

pub(crate) const fn make_id(slot: usize, gen_: u16) -> u32 {
    ((gen_ as u32 & GEN_MASK) << 16) | (slot as u32 + 1)
}

impl Table {
    pub fn new(max: u32) -> Self {
        Table {
            slots: Vec::new(),
            live: 0,
            max: max.clamp(1, MAX_SLOTS),
        }
    }

    fn slot_of(&self, id: u32) -> Option<usize> {
        if id == 0 || id >> 31 != 0 {
            return None;
        }
        let slot = (id & 0xffff).checked_sub(1)? as usize;
        let s = self.slots.get(slot)?;
        (s.obj.is_some() && make_id(slot, s.gen_) == id).then_some(slot)
    }

    pub fn get(&self, id: u32) -> Option<&Object> {
        let slot = self.slot_of(id)?;
        self.slots[slot].obj.as_ref()
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut Object> {
        let slot = self.slot_of(id)?;
        self.slots[slot].obj.as_mut()
    }

    /// A free slot for a new object: the lowest free one, or a new one (which may allocate;
    /// `alloc_ok` is the fault-injection gate). ENOSPC when the table is at its limit.
    pub fn reserve(&mut self, alloc_ok: impl FnOnce() -> bool) -> Result<usize, Error> {
        if let Some(i) = self.slots.iter().position(|s| s.obj.is_none()) {
            return Ok(i);
        }
        if self.slots.len() as u32 >= self.max {
            return Err(Error::new(
                hvabi::errno::ENOSPC,
                hvabi::reason::OBJECT_TABLE_FULL,
            ));
        }
        if self.slots.len() == self.slots.capacity() {
            if !alloc_ok() {
                return Err(Error::nomem());
            }
            // Grow geometrically, within the limit.
            let want = (self.slots.len().max(8)).min((self.max as usize) - self.slots.len());
            self.slots
                .try_reserve_exact(want.max(1))
                .map_err(|_| Error::nomem())?;
        }
        self.slots.push(Slot { gen_: 0, obj: None });
        Ok(self.slots.len() - 1)
    }

    /// Fills a reserved slot; returns the new ID.
    pub fn publish(&mut self, slot: usize, obj: Object) -> u32 {
        let s = &mut self.slots[slot];
        debug_assert!(s.obj.is_none());
        s.obj = Some(obj);
        self.live += 1;
        make_id(slot, s.gen_)
    }

    /// Withdraws an object published by a call that is now failing: the slot is free again and
    /// its generation unchanged.
    pub fn unpublish(&mut self, id: u32) -> Option<Object> {
        let slot = self.slot_of(id)?;
        self.live -= 1;
        self.slots[slot].obj.take()
    }

    /// Destroys an object: its ID stops working for good (until the generation wraps).
    pub fn remove(&mut self, id: u32) -> Option<Object> {
        let slot = self.slot_of(id)?;
        let s = &mut self.slots[slot];
        s.gen_ = (s.gen_ + 1) & GEN_MASK as u16;
        self.live -= 1;
        s.obj.take()
    }

    pub fn live(&self) -> u32 {
        self.live
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Every live object with its ID, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Object)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.obj.as_ref().map(|o| (make_id(i, s.gen_), o)))
    }

    /// Generations of every slot (for the test support's snapshots).
    #[cfg(any(test, feature = "testing"))]
    pub fn generations(&self) -> impl Iterator<Item = u16> + '_ {
        self.slots.iter().map(|s| s.gen_)
    }
}

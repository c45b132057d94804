//! A fixed array of area slots with lock-free claim, publish, retire and free: the building
//! block for an IOAS area table in which two disjoint IOAS_MAP/UNMAP calls write no common
//! word (issue 11). Not yet used by `iommufd::ioas` (whose area table is still behind a
//! `SpinLock`): overlap arbitration needs an IOVA index on top (see the report of the
//! `lockfree` branch), this file provides the per-area half.
//!
//! * Capacity is fixed at construction (IOAS_ALLOC's `area_cap`); claiming, publishing and
//!   freeing never allocate.
//! * Free slots are bits of a bitmap of 64-bit words. A caller starts its search at a word
//!   chosen from its vCPU index ([`AreaSlots::claim`]), so vCPUs claim bits in different
//!   words and two claims only share a word when one vCPU's word is exhausted.
//! * Each slot has a state word `gen << 34 | vcpu << 2 | tag` (tag FREE / CLAIMED / LIVE /
//!   DYING; `vcpu` = the claimer of CLAIMED/DYING). The generation is bumped on every claim,
//!   so a stale [`SlotRef`] (a slot freed and claimed again) never matches a compare-exchange
//!   (no ABA; the generation has 30 bits, so a stale reference would need 2^30 claims of one
//!   slot between its load and its compare-exchange).
//! * The fields (iova, len, gpa, prot) are atomics written only by the claimer while the slot
//!   is CLAIMED and read by others only after they observed LIVE or DYING with `Acquire`.
//!
//! Orderings (each justified where it is used):
//! 1. claim: the bitmap bit is taken with an `AcqRel` compare-exchange, which synchronises with
//!    the `Release` that set it when the previous owner freed the slot: the new owner's writes
//!    of the state and fields come after every access of the previous owner.
//! 2. publish: CLAIMED→LIVE is a `Release` store; whoever loads LIVE with `Acquire` sees the
//!    fields (the linearisation point of a MAP).
//! 3. retire: LIVE→DYING(vcpu) is an `AcqRel` compare-exchange on the state word: of two
//!    racing retirers exactly one wins (racing unmaps count each area once); the winner owns
//!    the slot like a claimer. [`AreaSlots::revive`] puts it back (an all-or-nothing unmap that
//!    failed later).
//! 4. free: the owner stores FREE (`Release`), then sets the bitmap bit (`Release`).
//!
//! The loom model `tests/area_slots_loom.rs` compiles this file against loom's atomics
//! through the `area_sync` facade.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::area_sync::{AtomicU32, AtomicU64};

const TAG_MASK: u64 = 3;
const FREE: u64 = 0;
const CLAIMED: u64 = 1;
const LIVE: u64 = 2;
const DYING: u64 = 3;
const VCPU_SHIFT: u32 = 2;
const GEN_SHIFT: u32 = 34;

fn word(gen_: u64, vcpu: u32, tag: u64) -> u64 {
    (gen_ << GEN_SHIFT) | (u64::from(vcpu) << VCPU_SHIFT) | tag
}

fn gen_of(w: u64) -> u64 {
    w >> GEN_SHIFT
}

/// Where a slot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Free,
    /// Being filled by a MAP of this vCPU.
    Claimed(u32),
    /// Published: what every other operation sees.
    Live,
    /// Being retired by an UNMAP of this vCPU.
    Dying(u32),
}

fn state_of(w: u64) -> SlotState {
    // The vCPU field is 32 bits wide by construction (`word`).
    let vcpu = ((w >> VCPU_SHIFT) & u64::from(u32::MAX)) as u32;
    match w & TAG_MASK {
        FREE => SlotState::Free,
        CLAIMED => SlotState::Claimed(vcpu),
        LIVE => SlotState::Live,
        _ => SlotState::Dying(vcpu),
    }
}

/// What a slot describes: `[iova, iova + len)` → guest-physical `[gpa, gpa + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotArea {
    pub iova: u64,
    pub len: u64,
    pub gpa: u64,
    pub prot: u32,
}

/// A slot owned by the caller (claimed, or retired by it), with the generation it was owned at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRef {
    pub index: usize,
    gen_: u64,
}

/// One slot, on a cache line of its own: two vCPUs filling two slots never share a line.
#[repr(align(64))]
struct Slot {
    state: AtomicU64,
    iova: AtomicU64,
    len: AtomicU64,
    gpa: AtomicU64,
    prot: AtomicU32,
}

/// The slot array and its free bitmap. See the module docs.
pub struct AreaSlots {
    slots: Box<[Slot]>,
    /// Bit `i % 64` of word `i / 64` set = slot `i` free.
    free: Box<[AtomicU64]>,
}

fn try_boxed<T>(n: usize, mut f: impl FnMut(usize) -> T) -> Option<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    for i in 0..n {
        v.push(f(i));
    }
    Some(v.into_boxed_slice())
}

impl AreaSlots {
    /// `cap` free slots; `None` if the memory cannot be allocated.
    pub fn new(cap: usize) -> Option<Self> {
        let slots = try_boxed(cap, |_| Slot {
            state: AtomicU64::new(word(0, 0, FREE)),
            iova: AtomicU64::new(0),
            len: AtomicU64::new(0),
            gpa: AtomicU64::new(0),
            prot: AtomicU32::new(0),
        })?;
        let free = try_boxed(cap.div_ceil(64), |w| {
            let bits = (cap - w * 64).min(64);
            AtomicU64::new(if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            })
        })?;
        Some(AreaSlots { slots, free })
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Claims a free slot for `vcpu`'s MAP, searching the bitmap from the word `vcpu` picks.
    /// `None` when every slot is taken (ENOSPC for the caller).
    pub fn claim(&self, vcpu: u32) -> Option<SlotRef> {
        let words = self.free.len();
        if words == 0 {
            return None;
        }
        let start = vcpu as usize % words;
        for k in 0..words {
            let w = (start + k) % words;
            let mut cur = self.free[w].load(Relaxed);
            // Each failed compare-exchange means another claimer took (or a freer returned) a
            // bit of this word; at most 64 bits can be taken before the word is empty, and a
            // free in between only makes progress possible, so the loop is bounded by the
            // other callers' progress (lock-free).
            while cur != 0 {
                let bit = cur.trailing_zeros();
                // AcqRel: synchronises with the Release in `free` of the previous owner
                // (ordering 1 of the module docs).
                match self.free[w].compare_exchange(cur, cur & !(1 << bit), AcqRel, Relaxed) {
                    Ok(_) => {
                        let index = w * 64 + bit as usize;
                        let slot = &self.slots[index];
                        // Only the owner of the bit writes the state of a FREE slot.
                        let g = gen_of(slot.state.load(Relaxed)).wrapping_add(1)
                            & (u64::MAX >> GEN_SHIFT);
                        slot.state.store(word(g, vcpu, CLAIMED), Relaxed);
                        return Some(SlotRef { index, gen_: g });
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// Writes the fields of a slot the caller claimed (they become visible with `publish`).
    pub fn fill(&self, s: SlotRef, a: SlotArea) {
        let slot = &self.slots[s.index];
        // Relaxed: published by the Release in `publish` (ordering 2).
        slot.iova.store(a.iova, Relaxed);
        slot.len.store(a.len, Relaxed);
        slot.gpa.store(a.gpa, Relaxed);
        slot.prot.store(a.prot, Relaxed);
    }

    /// CLAIMED → LIVE: the linearisation point of a MAP (ordering 2).
    pub fn publish(&self, s: SlotRef) {
        self.slots[s.index]
            .state
            .store(word(s.gen_, 0, LIVE), Release);
    }

    /// LIVE → DYING(vcpu) (ordering 3): `Some` (the area, and the slot now owned by the caller)
    /// if this call won; `None` if the slot is not LIVE (free, being mapped, or retired by
    /// someone else).
    pub fn retire(&self, index: usize, vcpu: u32) -> Option<(SlotRef, SlotArea)> {
        let slot = self.slots.get(index)?;
        // Acquire: pairs with `publish`'s Release, so the fields read below are the published ones.
        let cur = slot.state.load(Acquire);
        if cur & TAG_MASK != LIVE {
            return None;
        }
        let g = gen_of(cur);
        slot.state
            .compare_exchange(cur, word(g, vcpu, DYING), AcqRel, Relaxed)
            .ok()?;
        Some((SlotRef { index, gen_: g }, self.fields(slot)))
    }

    /// DYING → LIVE for a slot the caller retired (an all-or-nothing unmap that gave up).
    pub fn revive(&self, s: SlotRef) {
        self.slots[s.index]
            .state
            .store(word(s.gen_, 0, LIVE), Release);
    }

    /// Returns a slot the caller owns (claimed or retired) to the free set (ordering 4).
    pub fn free(&self, s: SlotRef) {
        self.slots[s.index]
            .state
            .store(word(s.gen_, 0, FREE), Release);
        // Release: the next claimer (AcqRel on this word) sees every access of ours.
        self.free[s.index / 64].fetch_or(1 << (s.index % 64), Release);
    }

    /// The state of slot `index` and, if LIVE or DYING, its area. The area is exact when no
    /// other caller can free and reclaim the slot meanwhile (its owner, or a control operation
    /// that runs with no MAP/UNMAP in flight); otherwise a racing reader must confirm with
    /// [`retire`](Self::retire), whose compare-exchange checks the generation.
    pub fn get(&self, index: usize) -> Option<(SlotState, Option<SlotArea>)> {
        let slot = self.slots.get(index)?;
        // Acquire: pairs with `publish`'s Release (fields of a LIVE slot are complete).
        let w = slot.state.load(Acquire);
        let st = state_of(w);
        let area = matches!(st, SlotState::Live | SlotState::Dying(_)).then(|| self.fields(slot));
        Some((st, area))
    }

    fn fields(&self, slot: &Slot) -> SlotArea {
        SlotArea {
            iova: slot.iova.load(Relaxed),
            len: slot.len.load(Relaxed),
            gpa: slot.gpa.load(Relaxed),
            prot: slot.prot.load(Relaxed),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn area(iova: u64) -> SlotArea {
        SlotArea {
            iova,
            len: 0x1000,
            gpa: 0x8000,
            prot: 3,
        }
    }

    #[test]
    fn claims_every_slot_once_then_refuses() {
        let s = AreaSlots::new(70).unwrap();
        let mut seen = [false; 70];
        for i in 0..70 {
            let r = s.claim(i % 3).unwrap();
            assert!(!seen[r.index]);
            seen[r.index] = true;
        }
        assert_eq!(s.claim(0), None);
        assert_eq!(AreaSlots::new(0).unwrap().claim(0), None);
    }

    #[test]
    fn vcpus_start_in_different_words() {
        let s = AreaSlots::new(128).unwrap();
        assert_eq!(s.claim(0).unwrap().index / 64, 0);
        assert_eq!(s.claim(1).unwrap().index / 64, 1);
    }

    #[test]
    fn life_of_a_slot() {
        let s = AreaSlots::new(4).unwrap();
        let r = s.claim(2).unwrap();
        assert_eq!(s.get(r.index), Some((SlotState::Claimed(2), None)));
        s.fill(r, area(0x1000));
        assert_eq!(s.retire(r.index, 1), None, "a claimed slot is not LIVE");
        s.publish(r);
        assert_eq!(s.get(r.index), Some((SlotState::Live, Some(area(0x1000)))));
        let (d, a) = s.retire(r.index, 1).unwrap();
        assert_eq!(a, area(0x1000));
        assert_eq!(s.retire(r.index, 0), None, "retired once");
        assert_eq!(s.get(r.index).unwrap().0, SlotState::Dying(1));
        s.revive(d);
        let (d, _) = s.retire(r.index, 0).unwrap();
        s.free(d);
        assert_eq!(s.get(r.index), Some((SlotState::Free, None)));
        assert_eq!(s.retire(9, 0), None);
        // Freed slots are claimed again, with a new generation.
        let again: Vec<_> = (0..4).map(|_| s.claim(0).unwrap()).collect();
        let re = again.iter().find(|x| x.index == r.index).unwrap();
        assert_ne!(re.gen_, r.gen_);
    }

    #[test]
    fn two_threads_claim_disjoint_slots() {
        let s = std::sync::Arc::new(AreaSlots::new(256).unwrap());
        let hs: Vec<_> = (0..2u32)
            .map(|v| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(r) = s.claim(v) {
                        s.fill(r, area(r.index as u64));
                        s.publish(r);
                        mine.push(r.index);
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<usize> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..256).collect::<Vec<_>>());
    }
}

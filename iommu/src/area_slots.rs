//! The area table of an IOAS without a lock: a fixed array of area slots in which IOAS_MAP
//! claims a range, publishes it and withdraws it, and IOAS_UNMAP retires, revives and frees
//! areas, all with compare-and-swap on the slots concerned (issue 11). Two calls on disjoint
//! IOVA ranges write no common word, except the free-bitmap word both may take a slot from
//! when one vCPU's word is exhausted (below).
//!
//! * Capacity is fixed at construction (IOAS_ALLOC's `max_areas_per_ioas`); nothing here
//!   allocates after [`AreaSlots::new`].
//! * Free slots are bits of a bitmap of 64-bit words. A caller starts its search at a word
//!   chosen from its vCPU index, so vCPUs take bits in different words and two claims only
//!   share a word when one vCPU's word is exhausted. The bitmap also lets a scan skip free
//!   slots: a scan costs the number of slots in use, not the capacity.
//! * Each slot has a state word `gen << 35 | vcpu << 3 | tag`. Tags: FREE, FILLING (fields
//!   being written), PENDING (range announced, contending), KILLED (lost to a PENDING of
//!   higher priority), CLAIMED (range won, page tables being written), LIVE, DYING (being
//!   unmapped by `vcpu`; the range stays taken until the invalidation round is over). The
//!   generation is bumped on every claim of the slot, so a stale word never matches a
//!   compare-exchange (no ABA; 29 bits: a stale word would need 2^29 claims of one slot
//!   between its load and its compare-exchange).
//! * The fields (iova, len, gpa, prot) are written only in FILLING. A reader validates them
//!   like a sequence lock: state (Acquire), fields, `fence(Acquire)`, state again; the same
//!   generation means the fields are the ones of that generation (the writer's
//!   `fence(Release)` between FILLING and the field stores makes a field read of a newer
//!   generation imply a newer state read). A slot whose generation changed under the reader
//!   was freed and claimed again by a newer call, which is left to arbitrate (rule 1).
//! * The IOVA index (`iova_index.rs`) says which slots may hold a range overlapping a given
//!   one: a MAP announces its slot there before its SC fence and withdraws it when the slot
//!   is freed, so a range lookup ([`AreaSlots::scan_range`]) visits the slots near the
//!   range, not every slot in use (a lookup too wide for the index scans every slot in use).
//! * `pins` is written only by control operations (ACCESS pin/unpin), which run with no
//!   MAP/UNMAP in flight (the guest's gate orders them).
//!
//! # Rules (each justified where it is implemented)
//!
//! 1. **Overlapping maps: exactly one claims.** [`AreaSlots::reserve`] announces its slot in
//!    the IOVA index and stores PENDING, then a `fence(SeqCst)`, then looks up the slots the
//!    index gives for its range. Of two maps whose ranges overlap, the SC fences order one
//!    before the other, and the later one's lookup finds the earlier one's slot (its index
//!    bits, and the free-bitmap bit of the fallback scan, were written before that fence) and
//!    sees its PENDING (or what followed it): at least one sees the other. A map that sees an
//!    overlapping CLAIMED, LIVE or DYING range loses. One that sees an overlapping PENDING
//!    of a slot with a higher index kills it (CAS PENDING→KILLED); of a lower index, loses
//!    itself. It then wins only if its own CAS PENDING→CLAIMED succeeds, which fails if it
//!    was killed. So the lower index of two maps that see each other survives, and of two
//!    maps where only one sees the other, the CAS on the unseen one's state word decides.
//!    Nobody waits for anybody: each call decides in one scan.
//! 2. **Publish.** CLAIMED→LIVE is a `Release` store after the page tables were written: the
//!    linearisation point of a MAP. A map the hardware refused goes CLAIMED→FREE.
//! 3. **Unmap.** LIVE→DYING(vcpu) is an `AcqRel` compare-exchange: of two racing unmaps of
//!    one area exactly one wins, so each page is counted once. The winner owns the slot;
//!    [`AreaSlots::revive`] puts it back (an all-or-nothing batch that lost an entry), and
//!    [`AreaSlots::free`] forgets it, which the caller does only after the invalidation round
//!    (a DYING range still makes maps lose, rule 1).
//! 4. **Free.** The owner stores FREE (`Release`), withdraws the slot from the IOVA index
//!    (`Release`), then sets the bitmap bit (`Release`); the next claimer's `AcqRel` on the
//!    bitmap word sees every access of the previous owner, and a lookup that misses the slot
//!    in the index (`Acquire`) comes after the owner's invalidation round.
//!
//! The loom models `tests/ioas_loom.rs` and `tests/iova_index_loom.rs` compile this file (and
//! `iova_index.rs`) against loom's atomics through the `area_sync` facade.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

use crate::area_sync::{AtomicU32, AtomicU64, fence};
use crate::iova_index::{IovaIndex, Query};

const TAG_MASK: u64 = 7;
const FREE: u64 = 0;
const FILLING: u64 = 1;
const PENDING: u64 = 2;
const KILLED: u64 = 3;
const CLAIMED: u64 = 4;
const LIVE: u64 = 5;
const DYING: u64 = 6;
const VCPU_SHIFT: u32 = 3;
const GEN_SHIFT: u32 = 35;
/// 64-bit words per cache line (64 bytes): words `LINE` apart never share a line.
pub(crate) const LINE: usize = 8;

fn word(gen_: u64, vcpu: u32, tag: u64) -> u64 {
    (gen_ << GEN_SHIFT) | (u64::from(vcpu) << VCPU_SHIFT) | tag
}

fn gen_of(w: u64) -> u64 {
    w >> GEN_SHIFT
}

fn vcpu_of(w: u64) -> u32 {
    // The vCPU field is 32 bits wide by construction (`word`).
    ((w >> VCPU_SHIFT) & u64::from(u32::MAX)) as u32
}

/// Where a slot in use is in its life, as a scan reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Range announced by a MAP of this vCPU, not yet decided.
    Pending(u32),
    /// Range won by a MAP of this vCPU, which is writing the page tables.
    Claimed(u32),
    /// Published: what every other operation sees.
    Live,
    /// Being unmapped by this vCPU.
    Dying(u32),
}

fn state_of(w: u64) -> Option<SlotState> {
    let v = vcpu_of(w);
    match w & TAG_MASK {
        PENDING => Some(SlotState::Pending(v)),
        CLAIMED => Some(SlotState::Claimed(v)),
        LIVE => Some(SlotState::Live),
        DYING => Some(SlotState::Dying(v)),
        _ => None,
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

impl SlotArea {
    /// The last byte (`len` is never 0).
    pub fn last(&self) -> u64 {
        self.iova + (self.len - 1)
    }

    /// Whether `[start, last]` overlaps the area.
    pub fn overlaps(&self, start: u64, last: u64) -> bool {
        self.iova <= last && start <= self.last()
    }
}

/// A slot in use, with the generation it was seen at. Compare-exchanges made with it fail if
/// the slot was freed and claimed again meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRef {
    pub index: usize,
    gen_: u64,
}

/// One slot seen by a scan: its state and fields at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub slot: SlotRef,
    pub state: SlotState,
    pub area: SlotArea,
    pub pins: u32,
    word: u64,
}

/// Why [`AreaSlots::reserve`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is in use.
    Full,
    /// The range overlaps one claimed, live or dying (`iova`: its start), or a racing map's
    /// of higher priority (`iova`: the start of the refused range).
    Overlap { iova: u64 },
}

/// At most this many slots in a [`Near`] snapshot: an UNMAP of one mapping (or a few) takes
/// its steps from one snapshot; a wider one scans once per step (`iommufd::ioas`).
pub const NEAR: usize = 8;

/// The slots in use whose range overlaps a given one, as one scan saw them (each at one
/// instant, like every scan): see [`Lookup::near`].
pub struct Near {
    items: [Seen; NEAR],
    n: usize,
}

impl Default for Near {
    fn default() -> Self {
        Self::new()
    }
}

impl Near {
    /// Empty; filled by [`Lookup::near`].
    pub const fn new() -> Self {
        Near {
            items: [NO_SLOT; NEAR],
            n: 0,
        }
    }

    pub fn items(&self) -> &[Seen] {
        &self.items[..self.n]
    }
}

/// A placeholder for the unused entries of a [`Near`] (never read). All its bytes are zero
/// (`Pending(0)` is the enum's first variant), so `Near::new` compiles to one zeroing of the
/// array where a placeholder with another bit pattern was copied in entry by entry (eight
/// `memcpy` calls per IOAS_UNMAP on aarch64).
const NO_SLOT: Seen = Seen {
    slot: SlotRef { index: 0, gen_: 0 },
    state: SlotState::Pending(0),
    area: SlotArea {
        iova: 0,
        len: 0,
        gpa: 0,
        prot: 0,
    },
    pins: 0,
    word: 0,
};

/// A range lookup planned once, scanned by [`Lookup::scan`] (see [`AreaSlots::lookup`]).
pub struct Lookup<'a> {
    slots: &'a AreaSlots,
    q: Option<Query>,
}

impl Lookup<'_> {
    /// One scan of the plan, keeping the slots whose range overlaps `[start, last]`, unless
    /// there are more than [`NEAR`]. What the scan guarantees holds for the snapshot: every
    /// overlapping slot announced before the caller's last SC fence, or that happens-before
    /// the call (a MAP that returned before it started), is in it. A compare-exchange made
    /// with an entry ([`AreaSlots::retire`]) fails if its slot changed since, so steps taken
    /// from the snapshot act on the slots as they were seen or not at all.
    ///
    /// Fills `near` (the caller's, so that the snapshot is not copied) and returns `true`, or
    /// `false` when the range holds more.
    pub fn near(&self, start: u64, last: u64, near: &mut Near) -> bool {
        near.n = 0;
        let mut over = false;
        self.scan(|x| {
            if !x.area.overlaps(start, last) {
                return true;
            }
            match near.items.get_mut(near.n) {
                Some(e) => {
                    *e = *x;
                    near.n += 1;
                    true
                }
                None => {
                    over = true;
                    false
                }
            }
        });
        !over
    }

    /// Calls `f` on every slot in use the plan names (see [`AreaSlots::scan_range`]) until it
    /// returns `false`.
    pub fn scan(&self, mut f: impl FnMut(&Seen) -> bool) {
        let s = self.slots;
        let Some(q) = &self.q else {
            return s.scan(f);
        };
        if q.is_empty() {
            return;
        }
        for w in 0..s.index.words() {
            let mut cand = q.word(&s.index, w);
            while cand != 0 {
                let bit = cand.trailing_zeros();
                cand &= cand - 1;
                if let Some(x) = s.seen(w * 64 + bit as usize)
                    && !f(&x)
                {
                    return;
                }
            }
        }
    }
}

/// One slot, on a cache line of its own: two vCPUs filling two slots never share a line.
#[repr(align(64))]
struct Slot {
    state: AtomicU64,
    iova: AtomicU64,
    len: AtomicU64,
    gpa: AtomicU64,
    prot: AtomicU32,
    pins: AtomicU32,
}

/// The slot array and its free bitmap. See the module docs.
pub struct AreaSlots {
    slots: Box<[Slot]>,
    /// Bit `i % 64` of word `i / 64` set = slot `i` free. Word `w` is `free[w * LINE]`: one
    /// per cache line, so two vCPUs taking and freeing slots in their own words never write
    /// a common line.
    free: Box<[AtomicU64]>,
    /// Which slots may hold a range overlapping a given one (module docs).
    index: IovaIndex,
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
            pins: AtomicU32::new(0),
        })?;
        let free = try_boxed(cap.div_ceil(64).checked_mul(LINE)?, |i| {
            let w = i / LINE;
            let bits = if i % LINE == 0 {
                (cap - w * 64).min(64)
            } else {
                0
            };
            AtomicU64::new(if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            })
        })?;
        let index = IovaIndex::new(cap)?;
        Some(AreaSlots { slots, free, index })
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Whether every slot is in use (a hint under concurrency: [`reserve`](Self::reserve)
    /// decides).
    pub fn is_full(&self) -> bool {
        self.free.iter().step_by(LINE).all(|w| w.load(Relaxed) == 0)
    }

    /// Takes a free slot for `vcpu`, searching the bitmap from the word `vcpu` picks, and
    /// marks it FILLING with a new generation.
    fn take(&self, vcpu: u32) -> Option<SlotRef> {
        let words = self.free.len() / LINE;
        if words == 0 {
            return None;
        }
        let start = vcpu as usize % words;
        for k in 0..words {
            let w = (start + k) % words;
            let mut cur = self.free[w * LINE].load(Relaxed);
            // Each failed compare-exchange means another claimer took (or a freer returned) a
            // bit of this word; at most 64 bits can be taken before the word is empty, so the
            // loop is bounded by the other callers' progress (lock-free).
            while cur != 0 {
                let bit = cur.trailing_zeros();
                // AcqRel: synchronises with the Release in `free` of the previous owner
                // (rule 4 of the module docs).
                match self.free[w * LINE].compare_exchange(cur, cur & !(1 << bit), AcqRel, Relaxed)
                {
                    Ok(_) => {
                        let index = w * 64 + bit as usize;
                        let slot = &self.slots[index];
                        // Only the owner of the bit writes the state of a FREE slot.
                        let g = gen_of(slot.state.load(Relaxed)).wrapping_add(1)
                            & (u64::MAX >> GEN_SHIFT);
                        slot.state.store(word(g, vcpu, FILLING), Relaxed);
                        // Release fence: a reader that sees any field store below sees this
                        // generation (or a later one) when it reads the state again after
                        // its Acquire fence (the sequence-lock check of `seen`).
                        fence(Release);
                        return Some(SlotRef { index, gen_: g });
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// Claims `a`'s range for a MAP of `vcpu` (rule 1): `Ok` when no overlapping range is
    /// claimed, live or dying, and no racing map of higher priority overlaps it. The slot is
    /// then CLAIMED: [`publish`](Self::publish) or [`withdraw`](Self::withdraw) it.
    pub fn reserve(&self, vcpu: u32, a: SlotArea) -> Result<SlotRef, Refused> {
        let me = self.take(vcpu).ok_or(Refused::Full)?;
        let slot = &self.slots[me.index];
        slot.iova.store(a.iova, Relaxed);
        slot.len.store(a.len, Relaxed);
        slot.gpa.store(a.gpa, Relaxed);
        slot.prot.store(a.prot, Relaxed);
        slot.pins.store(0, Relaxed);
        // Before the SC fence below (rule 1; `iova_index` module docs).
        self.index.insert(me.index, a.iova, a.last());
        let pending = word(me.gen_, vcpu, PENDING);
        // Release: a reader that loads PENDING with Acquire sees the fields.
        slot.state.store(pending, Release);
        // SeqCst fence between announcing and scanning (rule 1): of two overlapping maps'
        // fences, the later one's scan sees the earlier one's PENDING or a later state.
        fence(SeqCst);
        let mut lost = None;
        self.scan_range(a.iova, a.last(), |o| {
            if o.slot.index == me.index || !o.area.overlaps(a.iova, a.last()) {
                return true;
            }
            match o.state {
                SlotState::Pending(_) if o.slot.index > me.index => {
                    // We have priority: kill it, unless it decided first.
                    let killed = word(o.slot.gen_, vcpu_of(o.word), KILLED);
                    match self.slots[o.slot.index]
                        .state
                        .compare_exchange(o.word, killed, AcqRel, Acquire)
                    {
                        Ok(_) => true,
                        Err(now) if gen_of(now) != o.slot.gen_ => true,
                        Err(now) => match now & TAG_MASK {
                            CLAIMED | LIVE | DYING => {
                                lost = Some(o.area.iova);
                                false
                            }
                            // KILLED by someone else, or withdrawn.
                            _ => true,
                        },
                    }
                }
                SlotState::Pending(_) => {
                    lost = Some(a.iova);
                    false
                }
                _ => {
                    lost = Some(o.area.iova);
                    false
                }
            }
        });
        // The decision: PENDING→CLAIMED fails if a map of higher priority killed us.
        // AcqRel: pairs with the killer's, so a kill is seen here.
        let won = lost.is_none()
            && slot
                .state
                .compare_exchange(pending, word(me.gen_, vcpu, CLAIMED), AcqRel, Relaxed)
                .is_ok();
        if won {
            return Ok(me);
        }
        // Stop others from arbitrating against us before giving the slot back (a killer's
        // compare-exchange of our PENDING fails on the FREE below either way).
        let _ = slot
            .state
            .compare_exchange(pending, word(me.gen_, vcpu, KILLED), AcqRel, Relaxed);
        self.free(me);
        Err(Refused::Overlap {
            iova: lost.unwrap_or(a.iova),
        })
    }

    /// CLAIMED → LIVE: the linearisation point of a MAP (rule 2). Release: whoever loads LIVE
    /// with Acquire sees the fields.
    pub fn publish(&self, s: SlotRef) {
        self.slots[s.index]
            .state
            .store(word(s.gen_, 0, LIVE), Release);
    }

    /// Gives back a slot the caller reserved and never published.
    pub fn withdraw(&self, s: SlotRef) {
        self.free(s);
    }

    /// LIVE → DYING(vcpu) for a slot a scan saw LIVE (rule 3): `true` if this call won. The
    /// compare-exchange is on the word the scan saw, so a slot freed and reused since fails.
    pub fn retire(&self, seen: &Seen, vcpu: u32) -> bool {
        seen.state == SlotState::Live
            && self.slots[seen.slot.index]
                .state
                .compare_exchange(
                    seen.word,
                    word(seen.slot.gen_, vcpu, DYING),
                    AcqRel,
                    Relaxed,
                )
                .is_ok()
    }

    /// The slot a [`retire`](Self::retire) of this caller took, and its area, read without
    /// a snapshot: only the caller changes the state of a slot it retired (until it frees or
    /// revives it), and the fields were written before the LIVE state its retiring
    /// compare-exchange read (Acquire), so plain loads see them.
    pub fn retired(&self, index: usize) -> (SlotRef, SlotArea) {
        let slot = &self.slots[index];
        let s = SlotRef {
            index,
            gen_: gen_of(slot.state.load(Relaxed)),
        };
        let area = SlotArea {
            iova: slot.iova.load(Relaxed),
            len: slot.len.load(Relaxed),
            gpa: slot.gpa.load(Relaxed),
            prot: slot.prot.load(Relaxed),
        };
        (s, area)
    }

    /// DYING → LIVE for a slot the caller retired.
    pub fn revive(&self, s: SlotRef) {
        self.slots[s.index]
            .state
            .store(word(s.gen_, 0, LIVE), Release);
    }

    /// Returns a slot the caller owns (reserved, or retired by it) to the free set (rule 4).
    pub fn free(&self, s: SlotRef) {
        let slot = &self.slots[s.index];
        // The fields were written by the map that took the slot: by this caller (reserve), or
        // before the LIVE state this caller's retiring compare-exchange read (Acquire).
        let (iova, len) = (slot.iova.load(Relaxed), slot.len.load(Relaxed));
        slot.state.store(word(s.gen_, 0, FREE), Release);
        // Release (in `remove`): a lookup that misses the slot comes after everything the
        // owner did, such as the invalidation round of an unmap (rule 4).
        self.index.remove(s.index, iova, iova + (len - 1));
        // Release: the next claimer (AcqRel on this word) sees every access of ours.
        self.free[s.index / 64 * LINE].fetch_or(1 << (s.index % 64), Release);
    }

    /// Slot `index` as a validated snapshot, `None` if it is not in use (free, being filled,
    /// or killed) or was reused while being read.
    fn seen(&self, index: usize) -> Option<Seen> {
        let slot = &self.slots[index];
        // Acquire: pairs with the Release store of PENDING, so the fields are complete.
        let w1 = slot.state.load(Acquire);
        state_of(w1)?;
        let area = SlotArea {
            iova: slot.iova.load(Relaxed),
            len: slot.len.load(Relaxed),
            gpa: slot.gpa.load(Relaxed),
            prot: slot.prot.load(Relaxed),
        };
        let pins = slot.pins.load(Relaxed);
        // Acquire fence, then the state again (sequence-lock check, module docs): if any
        // field read above returned a newer generation's store, this load returns that
        // generation's state or later.
        fence(Acquire);
        let w2 = slot.state.load(Relaxed);
        if gen_of(w2) != gen_of(w1) {
            return None;
        }
        Some(Seen {
            slot: SlotRef {
                index,
                gen_: gen_of(w2),
            },
            state: state_of(w2)?,
            area,
            pins,
            word: w2,
        })
    }

    /// Calls `f` on every slot in use (bitmap order) until it returns `false`. Under
    /// concurrent calls each slot is seen at one instant; slots claimed during the scan may
    /// or may not be seen.
    pub fn scan(&self, mut f: impl FnMut(&Seen) -> bool) {
        let words = self.free.len() / LINE;
        for (w, bits) in self.free.iter().step_by(LINE).enumerate() {
            // A slot taken before the caller's SC fence is seen as taken here (rule 1); one
            // taken after is the taker's to arbitrate. Acquire: a bit set by `free` (Release)
            // brings everything its owner did before, such as the invalidation round of an
            // unmap, so a map that finds the range free comes after that round.
            let mut used = !bits.load(Acquire);
            if w + 1 == words && !self.slots.len().is_multiple_of(64) {
                used &= (1u64 << (self.slots.len() % 64)) - 1;
            }
            while used != 0 {
                let bit = used.trailing_zeros();
                used &= used - 1;
                if let Some(s) = self.seen(w * 64 + bit as usize)
                    && !f(&s)
                {
                    return;
                }
            }
        }
    }

    /// Calls `f` on every slot in use whose range may overlap `[start, last]` (`last >=
    /// start`), until it returns `false`: the slots the IOVA index gives, or every slot in
    /// use when the range is too wide for it. Every slot whose range overlaps and that was
    /// announced before the caller's last SC fence (or that happens-before the call) is seen,
    /// at one instant; others may or may not be, and `f` tests the overlap itself.
    pub fn scan_range(&self, start: u64, last: u64, f: impl FnMut(&Seen) -> bool) {
        self.lookup(start, last).scan(f)
    }

    /// The plan of [`scan_range`](Self::scan_range) for `[start, last]`: which bit arrays of
    /// the IOVA index to read (or every slot in use). It can be scanned several times: each
    /// scan reads the arrays afresh. A slot announced after the plan was made in a bucket
    /// that was then empty is missed: a plan serves steps of one call (an UNMAP's check,
    /// retire, page-table and free steps), for which such a slot belongs to a map that had
    /// not returned when the call started.
    pub fn lookup(&self, start: u64, last: u64) -> Lookup<'_> {
        Lookup {
            slots: self,
            // `None` (every slot) for a range too wide for the index; nothing for an empty one.
            q: if last < start {
                Some(Query::EMPTY)
            } else {
                self.index.query(start, last)
            },
        }
    }

    /// The slot `s` names, if it is still in the generation `s` was taken at.
    pub fn get(&self, s: SlotRef) -> Option<Seen> {
        self.seen(s.index).filter(|x| x.slot == s)
    }

    /// Adds `delta` to the pin count of every area overlapping `[start, last]`. Control
    /// operations only (no MAP/UNMAP in flight): the gate orders this with the fast path.
    pub fn add_pins(&self, start: u64, last: u64, delta: i32) {
        self.scan_range(start, last, |s| {
            if s.area.overlaps(start, last) {
                let p = &self.slots[s.slot.index].pins;
                p.store(p.load(Relaxed).saturating_add_signed(delta), Relaxed);
            }
            true
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn area(iova: u64, pages: u64) -> SlotArea {
        SlotArea {
            iova: iova << 12,
            len: pages << 12,
            gpa: 0x8000,
            prot: 3,
        }
    }

    fn all(s: &AreaSlots) -> Vec<Seen> {
        let mut v = Vec::new();
        s.scan(|x| {
            v.push(*x);
            true
        });
        v
    }

    #[test]
    fn fills_every_slot_once_then_refuses() {
        let s = AreaSlots::new(70).unwrap();
        let mut seen = [false; 70];
        for i in 0..70 {
            let r = s.reserve(i as u32 % 3, area(i, 1)).unwrap();
            assert!(!seen[r.index]);
            seen[r.index] = true;
            s.publish(r);
        }
        assert_eq!(s.reserve(0, area(100, 1)), Err(Refused::Full));
        assert_eq!(all(&s).len(), 70);
        assert_eq!(
            AreaSlots::new(0).unwrap().reserve(0, area(1, 1)),
            Err(Refused::Full)
        );
    }

    #[test]
    fn vcpus_start_in_different_words() {
        let s = AreaSlots::new(128).unwrap();
        assert_eq!(s.reserve(0, area(1, 1)).unwrap().index / 64, 0);
        assert_eq!(s.reserve(1, area(2, 1)).unwrap().index / 64, 1);
    }

    #[test]
    fn overlap_refused_in_every_state() {
        let s = AreaSlots::new(8).unwrap();
        let r = s.reserve(0, area(4, 4)).unwrap();
        // Claimed (not yet published), live, dying: all keep the range.
        assert_eq!(
            s.reserve(1, area(7, 2)),
            Err(Refused::Overlap { iova: 4 << 12 })
        );
        s.publish(r);
        assert!(s.reserve(1, area(2, 3)).is_err());
        let live = s.get(r).unwrap();
        assert!(s.retire(&live, 2));
        assert!(!s.retire(&live, 3), "retired once");
        assert_eq!(s.get(r).unwrap().state, SlotState::Dying(2));
        assert!(s.reserve(1, area(4, 1)).is_err());
        s.revive(r);
        let live = s.get(r).unwrap();
        assert!(s.retire(&live, 1));
        s.free(r);
        assert_eq!(s.get(r), None);
        // Forgotten: the range is free again; neighbours never conflicted.
        assert!(s.reserve(1, area(8, 1)).is_ok());
        let again = s.reserve(1, area(4, 4)).unwrap();
        assert_ne!(again.gen_, r.gen_);
        assert!(
            !s.retire(&live, 1),
            "a stale snapshot cannot retire the new area"
        );
        assert_eq!(all(&s).len(), 2);
    }

    #[test]
    fn pins_follow_control_operations() {
        let s = AreaSlots::new(4).unwrap();
        let r = s.reserve(0, area(4, 4)).unwrap();
        s.publish(r);
        s.add_pins(5 << 12, 5 << 12, 1);
        assert_eq!(s.get(r).unwrap().pins, 1);
        s.add_pins(0, 3 << 12, 1);
        assert_eq!(s.get(r).unwrap().pins, 1);
        s.add_pins(0, u64::MAX, -1);
        assert_eq!(s.get(r).unwrap().pins, 0);
    }

    /// The range lookup finds overlapping areas of every size class, and the scattered and
    /// colliding ones it must not miss, as the full scan does.
    #[test]
    fn range_lookup_agrees_with_the_full_scan() {
        let s = AreaSlots::new(200).unwrap();
        let areas = [
            (1u64, 1u64),
            (65, 1),  // same level-0 bucket as page 1
            (511, 2), // across a 2 MiB line
            (514, 510),
            (0x4_0000, 0x4_0000),
            (0x100_0000, 1),
        ];
        for (i, &(p, n)) in areas.iter().enumerate() {
            let r = s.reserve(i as u32, area(p, n)).unwrap();
            s.publish(r);
        }
        let probes = [
            (0u64, 1u64),
            (1, 1),
            (2, 63),
            (64, 2),
            (512, 1),
            (1023, 1),
            (0x4_0000 + 77, 1),
            (0, 0x200_0000),
            (0xff_ffff, 2),
        ];
        for &(p, n) in &probes {
            let (start, last) = (p << 12, ((p + n) << 12) - 1);
            let mut want: Vec<u64> = all(&s)
                .iter()
                .filter(|x| x.area.overlaps(start, last))
                .map(|x| x.area.iova)
                .collect();
            let mut got = Vec::new();
            s.scan_range(start, last, |x| {
                if x.area.overlaps(start, last) {
                    got.push(x.area.iova);
                }
                true
            });
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "pages {p:#x}+{n}");
            let r = s.reserve(9, area(p, n));
            assert_eq!(r.is_ok(), want.is_empty(), "map of pages {p:#x}+{n}");
            if let Ok(r) = r {
                s.withdraw(r);
            }
        }
    }

    /// Random maps and unmaps of every size class (and probes of every width): the range
    /// lookup always finds what the full scan finds, and a map succeeds exactly when the full
    /// scan shows no overlapping area.
    #[test]
    fn range_lookup_agrees_with_the_full_scan_at_random() {
        let s = AreaSlots::new(100).unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Lengths of every level, and across granule lines; IOVAs in a space 64 times the
        // length, so that ranges of every size collide now and then, plus a few far away.
        let span = |r: u64, r2: u64| {
            let len = match r % 6 {
                0 => 1u64 << 12,
                1 => (1 + r2 % 600) << 12,
                2 => 2 << 20,
                3 => (1 + r2 % 3) << 30,
                4 => 1 << 40,
                _ => (1 + r2 % 20) << 12,
            };
            let base = if r2.is_multiple_of(17) { 1 << 50 } else { 0 };
            let iova = base + (((r2 >> 8) % ((64 * len) >> 12)) << 12);
            (iova, len)
        };
        for round in 0..3000 {
            let (r, r2) = (rnd(), rnd());
            let (iova, len) = span(r, r2);
            let (start, last) = (iova, iova + len - 1);
            let mut want: Vec<usize> = all(&s)
                .iter()
                .filter(|x| x.area.overlaps(start, last))
                .map(|x| x.slot.index)
                .collect();
            let mut got = Vec::new();
            s.scan_range(start, last, |x| {
                if x.area.overlaps(start, last) {
                    got.push(x.slot.index);
                }
                true
            });
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "round {round}: {iova:#x}+{len:#x}");
            if r % 5 == 0 {
                // Unmap: every area overlapping the probe.
                for x in all(&s).iter().filter(|x| x.area.overlaps(start, last)) {
                    assert!(s.retire(x, 1));
                    s.free(x.slot);
                }
            } else {
                let a = SlotArea {
                    iova,
                    len,
                    gpa: 0,
                    prot: 3,
                };
                match s.reserve((r % 4) as u32, a) {
                    Ok(m) => {
                        assert!(want.is_empty(), "round {round}: overlap missed");
                        s.publish(m);
                    }
                    Err(Refused::Full) => assert_eq!(all(&s).len(), 100),
                    Err(Refused::Overlap { .. }) => assert!(!want.is_empty()),
                }
            }
        }
    }

    #[test]
    fn two_threads_map_disjoint_then_overlapping() {
        let s = std::sync::Arc::new(AreaSlots::new(256).unwrap());
        let hs: Vec<_> = (0..2u32)
            .map(|v| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut won = 0u64;
                    // Even pages are contested by both threads, odd pages are each thread's.
                    for i in 0..100u64 {
                        let page = if i % 2 == 0 {
                            i
                        } else {
                            1000 * (u64::from(v) + 1) + i
                        };
                        if let Ok(r) = s.reserve(v, area(page, 1)) {
                            s.publish(r);
                            won += 1;
                        }
                    }
                    won
                })
            })
            .collect();
        let won: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        // Every odd page of both threads, each contested page exactly once.
        assert_eq!(won, 150);
        let mut seen = all(&s);
        assert_eq!(seen.len() as u64, won);
        seen.sort_by_key(|x| x.area.iova);
        assert!(seen.windows(2).all(|w| w[0].area.last() < w[1].area.iova));
    }
}

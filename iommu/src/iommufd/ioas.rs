//! IOAS: an IOVA → guest-physical map, mirrored into every HWPT built on it.
//!
//! * Mappings ("areas") live in a fixed array of slots (`crate::area_slots`), found by IOVA
//!   through an index of the slots (`crate::iova_index`); both are sized at IOAS_ALLOC
//!   (`max_areas_per_ioas`): MAP never allocates from the heap.
//! * The reserved set is computed, never stored: outside the aperture of every HWPT on the
//!   IOAS, plus the reserved regions and apertures of every device attached to them (all
//!   members of an attached group). MAP never lands there; attach refuses a group whose
//!   reserved set would cover a mapping or an allowed range.
//! * Automatic IOVAs: first fit, inside the allowed list (if any), never at 0, aligned to the
//!   smaller of the length rounded up to a power of two and the natural alignment of the
//!   guest-physical address (capped at 1 GiB), so large leaves stay possible.
//! * UNMAP is all or nothing: every mapping in the range is checked (whole, not pinned) before
//!   the first is removed, and the exact byte count is returned.
//!
//! # Concurrency
//!
//! MAP and UNMAP (single and batched) run on several vCPUs at once with shared access to the
//! guest (`Rx`); everything else runs alone (`Cx`, see the `iommufd` module docs), so the
//! HWPT list, the allowed list, the reserved set and the pin counts do not change under a
//! MAP/UNMAP. The area table takes no lock: each area is one slot with a state word
//! (`area_slots.rs` has the protocol and the orderings, `tests/ioas_loom.rs` the models). A
//! MAP writes only its own slot, a bit of the free-slot bitmap word its vCPU starts at, and
//! its slot's bits in the IOVA index (`iova_index.rs`: buckets of IOVA granules, shared by
//! two disjoint maps only when their granules collide); an UNMAP writes only the slots of the
//! areas it removes (and withdraws them from the index). Both read only the slots the index
//! gives for their range (every slot in use for a range too wide for it): the cost of a call
//! is the areas near its range, not the areas of the IOAS.
//!
//! 1. MAP *claims* its range: it takes a free slot, fills it, announces it (in the IOVA index,
//!    then PENDING), and after a sequentially consistent fence looks up the slots the index
//!    gives for its range. An overlapping range claimed, live or dying makes it fail
//!    (EEXIST); of two announced overlapping maps the one in the lower slot kills the other
//!    (compare-and-swap on the other's state word), so exactly one of two racing overlapping
//!    maps claims. The claim is the compare-and-swap PENDING → CLAIMED of its own slot. An
//!    automatic IOVA is a first fit over the same lookups, claimed the same way (and searched
//!    again if a racing map took it). Then it writes every HWPT's page table (the engine's
//!    CAS; claimed ranges are disjoint, the engine's contract), and publishes the area
//!    (CLAIMED → LIVE, Release): the linearisation point of a successful MAP. If the hardware
//!    refused, the slot is freed again.
//! 2. UNMAP checks the live areas in its range (whole, not pinned), then *retires* each one
//!    lying whole in the range: compare-and-swap LIVE → DYING(vcpu), the linearisation point
//!    of that area's removal. Of two racing unmaps of one area exactly one retires it, so every
//!    page is counted once. Areas not live are ignored: a map in flight has not happened yet,
//!    an unmap in flight already has. It then clears every HWPT's page table for its areas,
//!    runs one invalidation round per IOMMU unit, and only then frees the slots: a dying area
//!    keeps its range taken (step 1), so an IOVA is never reused under a stale IOTLB entry.
//!    An unmap of at most `area_slots::NEAR` areas takes its check, retire, page-table and
//!    free steps from one scan of the slots the IOVA index gives (each retire a
//!    compare-and-swap on the state word the scan saw, so it acts on the slot as seen or not
//!    at all); a wider one scans for the check and for the retire, and remembers the slots it
//!    retired (a bitmap on the stack) for the rest.
//! 3. An atomic UNMAP_BATCH checks every entry before retiring any; an entry left with nothing
//!    after retiring (a racing unmap took its areas) puts back every area the batch retired
//!    and fails, so the batch removes all or nothing.
//!
//! Control operations see no claimed or dying area: they run only when no MAP/UNMAP is in
//! flight.

use alloc::vec::Vec;

use hvabi::{
    BATCH_ATOMIC, IoasAllowIovas, IoasCopy, IoasIovaRanges, IoasMapBatch, IoasUnmapBatch,
    IovaRange, MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE, MAX_BATCH, MapEntry, UnmapEntry, errno,
    kind, reason,
};

use super::hw::{HwDeviceInfo, HwDomain, HwInvalidation, Span};
use super::marshal::{owns_array, read_struct, reserved_nonzero, unknown_flags, write_struct};
use super::object::{Guest, Object};
use super::{
    Cx, Error, GuestMemory, HostRun, IommuHw, MAX_ALLOWED_IOVAS, MAX_HWPTS_PER_IOAS, PAGE, Rx,
    hw_err, inval, try_vec,
};
use crate::area_slots::{
    AreaSlots, Lookup, NEAR, Near, Refused, Seen, SlotArea, SlotRef, SlotState,
};
use crate::pgtable::{Prot, RunSource};

/// Internal protection bits of an area.
pub const PROT_READ: u8 = 1;
pub const PROT_WRITE: u8 = 2;

/// One mapping: `[iova, iova + len)` → guest-physical `[gpa, gpa + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    pub iova: u64,
    pub len: u64,
    pub gpa: u64,
    pub prot: u8,
    /// ACCESS pins covering (part of) the area.
    pub pins: u32,
    /// Whether a MAP or UNMAP in flight has claimed it (module docs).
    pub(crate) state: AreaState,
}

/// Where an area is in its life (module docs, "Concurrency").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AreaState {
    /// Mapped in every HWPT; what every other operation sees.
    Live,
    /// Claimed by a MAP of this vCPU that is writing the page tables.
    Mapping(u32),
    /// Claimed by an UNMAP of this vCPU that is clearing the page tables.
    Unmapping(u32),
}

impl Area {
    pub fn last(&self) -> u64 {
        self.iova + (self.len - 1)
    }
    pub fn span(&self) -> Span {
        Span::new(self.iova, self.last())
    }
    pub fn hw_prot(&self) -> Prot {
        hw_prot(self.prot)
    }
}

pub(crate) fn hw_prot(p: u8) -> Prot {
    let mut prot = Prot::empty();
    if p & PROT_READ != 0 {
        prot |= Prot::READ;
    }
    if p & PROT_WRITE != 0 {
        prot |= Prot::WRITE;
    }
    prot
}

pub struct Ioas {
    /// The areas, in lock-free slots (module docs); `area_cap` of them.
    pub(crate) areas: AreaSlots,
    pub(crate) area_cap: usize,
    /// Sorted, disjoint; empty = everything allowed.
    pub(crate) allowed: Vec<Span>,
    /// HWPTs built on this IOAS (each holds a reference).
    pub(crate) hwpts: Vec<u32>,
    /// ACCESS objects attached (each holds a reference).
    pub(crate) accesses: u32,
    /// The reserved set (one element, on the heap), recomputed at the end of every control
    /// operation (`Drop for Cx`), which is the only thing that changes it: MAP reads it
    /// instead of walking the guest's objects. `resv_ok` is the error computing it gave.
    resv: Vec<ResvBuf>,
    resv_ok: Result<(), Error>,
}

/// An area as a scan of the slots saw it.
fn area_of(x: &Seen) -> Area {
    Area {
        iova: x.area.iova,
        len: x.area.len,
        gpa: x.area.gpa,
        // Written from a `u8` by `reserve_area`.
        prot: x.area.prot as u8,
        pins: x.pins,
        state: match x.state {
            SlotState::Live => AreaState::Live,
            SlotState::Pending(v) | SlotState::Claimed(v) => AreaState::Mapping(v),
            SlotState::Dying(v) => AreaState::Unmapping(v),
        },
    }
}

impl Ioas {
    pub(crate) fn new(area_cap: usize, alloc_ok: &mut dyn FnMut() -> bool) -> Result<Self, Error> {
        if !alloc_ok() {
            return Err(Error::nomem());
        }
        Ok(Ioas {
            areas: AreaSlots::new(area_cap).ok_or(Error::nomem())?,
            area_cap,
            allowed: try_vec(MAX_ALLOWED_IOVAS, alloc_ok())?,
            hwpts: try_vec(MAX_HWPTS_PER_IOAS, alloc_ok())?,
            accesses: 0,
            resv: {
                let mut v = try_vec(1, alloc_ok())?;
                // Within the capacity just reserved: no allocation.
                v.push(ResvBuf::new());
                v
            },
            // No HWPT yet: nothing reserved.
            resv_ok: Ok(()),
        })
    }

    /// The cached reserved set (see `resv`).
    pub(crate) fn reserved(&self) -> Result<&ResvBuf, Error> {
        self.resv_ok?;
        self.resv.first().ok_or(Error::nomem())
    }

    /// Every area, sorted by IOVA (a copy, from the heap: for control operations' reports and
    /// the consistency checker). With MAP/UNMAP in flight each area is seen at one instant.
    pub fn areas(&self) -> Vec<Area> {
        let mut v = Vec::new();
        self.areas.scan(|x| {
            v.push(area_of(x));
            true
        });
        v.sort_unstable_by_key(|a| a.iova);
        v
    }

    /// Calls `f` on every area (in slot order, not by IOVA) until it fails.
    pub(crate) fn each_area(
        &self,
        mut f: impl FnMut(&Area) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut r = Ok(());
        self.areas.scan(|x| {
            r = f(&area_of(x));
            r.is_ok()
        });
        r
    }

    /// How many slots are in use.
    pub(crate) fn area_count(&self) -> usize {
        let mut n = 0;
        self.areas.scan(|_| {
            n += 1;
            true
        });
        n
    }

    pub fn allowed(&self) -> &[Span] {
        &self.allowed
    }

    pub fn hwpts(&self) -> &[u32] {
        &self.hwpts
    }

    pub fn accesses(&self) -> u32 {
        self.accesses
    }

    /// The lowest area overlapping `s` (a copy), whatever its state.
    pub(crate) fn first_overlap(&self, s: Span) -> Option<Area> {
        let mut best: Option<Area> = None;
        self.areas.scan_range(s.start, s.last, |x| {
            if x.area.overlaps(s.start, s.last) && best.is_none_or(|b| x.area.iova < b.iova) {
                best = Some(area_of(x));
            }
            true
        });
        best
    }

    /// The largest last byte of the areas overlapping `s`, whatever their state (first fit
    /// continues after it).
    fn overlap_end(&self, s: Span) -> Option<u64> {
        let mut end = None;
        self.areas.scan_range(s.start, s.last, |x| {
            if x.area.overlaps(s.start, s.last) {
                end = end.max(Some(x.area.last()));
            }
            true
        });
        end
    }

    /// The area containing `iova`, whatever its state.
    fn area_at(&self, iova: u64) -> Option<Area> {
        let mut hit = None;
        self.areas.scan_range(iova, iova, |x| {
            if x.area.overlaps(iova, iova) {
                hit = Some(area_of(x));
            }
            hit.is_none()
        });
        hit
    }

    /// Walks the contiguous mappings covering `s` piece by piece: `f(area, piece)`. ENOENT
    /// (NOT_COVERED, at the first uncovered address) if there is a hole. For control
    /// operations (a scan per piece).
    pub(crate) fn covered(
        &self,
        s: Span,
        mut f: impl FnMut(&Area, Span) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut cursor = s.start;
        // Each step consumes one area.
        for _ in 0..=self.area_cap {
            let Some(a) = self.area_at(cursor) else {
                break;
            };
            let last = a.last().min(s.last);
            f(&a, Span::new(cursor, last))?;
            if last == s.last {
                return Ok(());
            }
            cursor = last + 1;
        }
        Err(Error::new(errno::ENOENT, reason::NOT_COVERED).at(cursor))
    }

    /// Adds `delta` to the pin count of every area overlapping `s` (ACCESS pin/unpin: a
    /// control operation, `&mut self`).
    pub(crate) fn add_pins(&mut self, s: Span, delta: i32) {
        self.areas.add_pins(s.start, s.last, delta);
    }
}

/// Index of the first area whose last byte is at or after `iova` (in a sorted copy).
#[cfg(any(test, feature = "testing"))]
pub(crate) fn first_from(areas: &[Area], iova: u64) -> usize {
    areas.partition_point(|a| a.last() < iova)
}

/// The first area of a sorted copy overlapping `s`, whatever its state.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn first_overlap(areas: &[Area], s: Span) -> Option<&Area> {
    areas
        .get(first_from(areas, s.start))
        .filter(|a| a.iova <= s.last)
}
/// A sorted, merged set of reserved ranges on the stack.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct ResvBuf {
    r: [Span; ResvBuf::CAP],
    n: usize,
}

impl ResvBuf {
    /// The ABI's documented limit (docs/abi.md §7).
    pub const CAP: usize = hvabi::MAX_RESERVED_RANGES_PER_IOAS as usize;

    pub fn new() -> Self {
        ResvBuf {
            r: [Span::default(); Self::CAP],
            n: 0,
        }
    }

    pub fn spans(&self) -> &[Span] {
        &self.r[..self.n]
    }

    /// Adds `s`, merging with overlapping or adjacent ranges. Err when full.
    pub fn add(&mut self, s: Span) -> Result<(), Error> {
        let mut m = s;
        let mut i = 0;
        while i < self.n {
            let r = self.r[i];
            if r.start <= m.last.saturating_add(1) && m.start <= r.last.saturating_add(1) {
                m = Span::new(r.start.min(m.start), r.last.max(m.last));
                self.r.copy_within(i + 1..self.n, i);
                self.n -= 1;
            } else {
                i += 1;
            }
        }
        if self.n == Self::CAP {
            return Err(Error::new(errno::ENOSPC, reason::TOO_MANY));
        }
        let pos = self.r[..self.n].partition_point(|r| r.start < m.start);
        self.r.copy_within(pos..self.n, pos + 1);
        self.r[pos] = m;
        self.n += 1;
        Ok(())
    }

    /// Everything outside `aperture`.
    pub fn add_outside(&mut self, aperture: Span) -> Result<(), Error> {
        if aperture.start > 0 {
            self.add(Span::new(0, aperture.start - 1))?;
        }
        if aperture.last < u64::MAX {
            self.add(Span::new(aperture.last + 1, u64::MAX))?;
        }
        Ok(())
    }

    /// What a device imposes: its reserved regions and everything outside its aperture.
    pub fn add_device(&mut self, info: &HwDeviceInfo) -> Result<(), Error> {
        for r in info.reserved() {
            if r.span.start <= r.span.last {
                self.add(r.span)?;
            }
        }
        self.add_outside(info.aperture)
    }

    pub fn first_overlap(&self, s: Span) -> Option<Span> {
        let i = self.spans().partition_point(|r| r.last < s.start);
        self.spans().get(i).copied().filter(|r| r.start <= s.last)
    }
}

/// Rounds `x` up to `align` (a power of two), `None` on overflow.
fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// The alignment of an automatic IOVA for `len` bytes at `gpa`.
pub(crate) fn auto_align(gpa: u64, len: u64) -> u64 {
    let by_len = len.checked_next_power_of_two().unwrap_or(1 << 63);
    let by_gpa = if gpa == 0 {
        1 << 63
    } else {
        1u64 << gpa.trailing_zeros()
    };
    by_len.min(by_gpa).clamp(PAGE, 1 << 30)
}

/// First fit of `len` bytes aligned to `align` among the areas of `ioas` (every state counts
/// as taken), outside `resv`, inside the `allowed` list (or `[PAGE, 2^64 - PAGE)`), never at
/// 0. Under concurrent maps the answer may be taken by the time it is claimed: the caller
/// claims it (`AreaSlots::reserve`) and asks again if it lost.
pub(crate) fn alloc_iova(ioas: &Ioas, resv: &ResvBuf, len: u64, align: u64) -> Option<u64> {
    let everything = [Span::new(PAGE, u64::MAX - PAGE)];
    let spaces: &[Span] = if ioas.allowed.is_empty() {
        &everything
    } else {
        &ioas.allowed
    };
    // Each step moves past one reserved range or one area, and at most `area_cap` areas
    // exist at a time; twice that leaves room for areas replaced during the search.
    let steps = resv.spans().len() + 2 * ioas.area_cap + 2;
    for space in spaces {
        let Some(mut x) = align_up(space.start.max(PAGE), align) else {
            continue;
        };
        for _ in 0..steps {
            let Some(last) = x.checked_add(len - 1) else {
                break;
            };
            if last > space.last {
                break;
            }
            let s = Span::new(x, last);
            let next = if let Some(r) = resv.first_overlap(s) {
                r.last.checked_add(1)
            } else if let Some(end) = ioas.overlap_end(s) {
                end.checked_add(1)
            } else {
                return Some(x);
            };
            match next.and_then(|n| align_up(n, align)) {
                Some(n) => x = n,
                None => break,
            }
        }
    }
    None
}

pub(crate) fn check_prot(flags: u32) -> Result<u8, Error> {
    let mut p = 0;
    if flags & MAP_READABLE != 0 {
        p |= PROT_READ;
    }
    if flags & MAP_WRITEABLE != 0 {
        p |= PROT_WRITE;
    }
    if p == 0 {
        return Err(inval(reason::NO_PROT));
    }
    Ok(p)
}

const MAP_FLAGS: u32 = MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE;

/// Checks `len` and the alignment of `addrs` and `len`; returns the span at `base`.
fn check_range(base: u64, len: u64, addrs: &[u64]) -> Result<Span, Error> {
    if len == 0 {
        return Err(inval(reason::ZERO_LENGTH));
    }
    if !len.is_multiple_of(PAGE) || addrs.iter().any(|a| !a.is_multiple_of(PAGE)) {
        return Err(inval(reason::MISALIGNED));
    }
    for &a in addrs {
        if a.checked_add(len - 1).is_none() {
            return Err(Error::new(errno::EOVERFLOW, reason::OVERFLOW));
        }
    }
    Span::from_len(base, len).ok_or(Error::new(errno::EOVERFLOW, reason::OVERFLOW))
}

/// Maps `[gpa, gpa + len)` into domain `d` at `iova`. On failure nothing of it stays mapped.
///
/// Every host run is checked (translated, page-aligned, at least a page) before any of it is
/// mapped; the first one that is not fails the call with EFAULT at its GPA. A range in one host
/// run is one `hw.map`; a range over several is one `hw.map_runs`, whose single page-table walk
/// asks [`GuestRuns`] for each run as it gets there (memory whose host pages are scattered costs
/// about one leaf entry per page, not one walk from the root).
pub(crate) fn hw_map_range<H: IommuHw>(
    hw: &H,
    mem: &dyn GuestMemory,
    d: HwDomain,
    iova: u64,
    gpa: u64,
    len: u64,
    prot: Prot,
) -> Result<(), Error> {
    let fault = Error::new(errno::EFAULT, reason::GPA_NOT_OWNED);
    let (hpa, first) = usable(mem.translate(gpa)).ok_or(fault.at(gpa))?;
    if first >= len {
        return hw.map(d, iova, hpa, len, prot).map_err(hw_err);
    }
    let mut runs = GuestRuns {
        mem,
        gpa,
        cursor: 0,
        fault: None,
    };
    hw.map_runs(d, iova, len, &mut runs, prot)
        .map_err(|e| match runs.fault {
            // The walk stopped at a run the guest memory refused: that, not the walk's error.
            Some(at) => fault.at(at),
            None => hw_err(e),
        })
}

/// The host runs behind a guest-physical range, for a page-table walk: each checked as
/// [`hw_map_range`] requires, found with one [`GuestMemory::translate_next`] cursor.
struct GuestRuns<'a> {
    mem: &'a dyn GuestMemory,
    gpa: u64,
    cursor: usize,
    /// The GPA of the run that was refused, if one was.
    fault: Option<u64>,
}

impl RunSource for GuestRuns<'_> {
    fn run_at(&mut self, off: u64) -> Option<(u64, u64)> {
        let at = self.gpa.wrapping_add(off);
        let run = usable(self.mem.translate_next(at, &mut self.cursor));
        if run.is_none() {
            self.fault = Some(at);
        }
        run
    }
}

/// A host run `hw_map_range` may map: page-aligned, at least a page (its whole pages).
#[inline(always)]
fn usable(r: Option<HostRun>) -> Option<(u64, u64)> {
    r.filter(|r| r.hpa.is_multiple_of(PAGE) && r.len >= PAGE)
        .map(|r| (r.hpa, r.len & !(PAGE - 1)))
}

/// The domains of every HWPT on an IOAS.
pub(crate) fn ioas_domains(
    g: &Guest,
    ioas: &Ioas,
) -> Result<([HwDomain; MAX_HWPTS_PER_IOAS], usize), Error> {
    let mut out = [HwDomain(0); MAX_HWPTS_PER_IOAS];
    let n = ioas.hwpts.len().min(MAX_HWPTS_PER_IOAS);
    for (o, &h) in out.iter_mut().zip(&ioas.hwpts) {
        *o = g.hwpt(h)?.domain;
    }
    Ok((out, n))
}

/// The reserved set of IOAS `ioas_id`: outside every HWPT's aperture, plus what every device
/// attached to one of its HWPTs imposes, plus (`extra`) what would be attached next.
pub(crate) fn ioas_reserved(
    g: &Guest,
    ioas_id: u32,
    extra: &[HwDeviceInfo],
    buf: &mut ResvBuf,
) -> Result<(), Error> {
    let ioas = g.ioas(ioas_id)?;
    for &h in &ioas.hwpts {
        buf.add_outside(g.hwpt(h)?.aperture)?;
    }
    for (_, o) in g.objs.iter() {
        match o {
            Object::Group(gr) => {
                if let Some(h) = gr.rid
                    && ioas.hwpts.contains(&h)
                {
                    for &m in gr.members() {
                        buf.add_device(&g.device(m)?.info)?;
                    }
                }
            }
            Object::Device(d)
                if d.pasids
                    .iter()
                    .flatten()
                    .any(|p| ioas.hwpts.contains(&p.hwpt)) =>
            {
                buf.add_device(&d.info)?;
            }
            _ => {}
        }
    }
    for info in extra {
        buf.add_device(info)?;
    }
    Ok(())
}

/// Recomputes the cached reserved set of every IOAS of `g`.
fn refresh_reserved(g: &mut Guest) {
    // The k-th IOAS each time: the table is borrowed again to store each result.
    for k in 0..g.objs.max() as usize {
        let next = g
            .objs
            .iter()
            .filter(|(_, o)| matches!(o, Object::Ioas(_)))
            .map(|(id, _)| id)
            .nth(k);
        let Some(id) = next else {
            break;
        };
        let mut buf = ResvBuf::new();
        let r = ioas_reserved(g, id, &[], &mut buf);
        if let Ok(ioas) = g.ioas_mut(id) {
            ioas.resv_ok = r;
            if let Some(c) = ioas.resv.first_mut()
                && r.is_ok()
            {
                *c = buf;
            }
        }
    }
}

/// Every control operation ends here, with nothing in flight: the reserved sets it may have
/// changed (DEVICE_ATTACH/REPLACE/DETACH, HWPT_ALLOC, DESTROY, a group assigned or taken
/// back) are recomputed, so that MAP reads its IOAS's cached set.
impl<H: IommuHw> Drop for Cx<'_, H> {
    fn drop(&mut self) {
        refresh_reserved(self.g);
    }
}

/// The ACCESS that pins something in `s` of IOAS `ioas_id`.
fn pinner(g: &Guest, ioas_id: u32, s: Span) -> u32 {
    for (id, o) in g.objs.iter() {
        if let Object::Access(a) = o
            && a.ioas == Some(ioas_id)
            && a.pins.iter().flatten().any(|p| p.overlaps(&s))
        {
            return id;
        }
    }
    0
}

/// Slots an UNMAP records in a bitmap on its stack (`Rx::unmap_wide`): IOASes of at most this
/// many slots (the default `max_areas_per_ioas`) unmap a wide range in two scans instead of four.
const RETIRED_BITS: usize = 512;

/// An UNMAP's span with its lookup plan in the area slots, made once for the steps of one
/// call (`AreaSlots::lookup`).
struct Planned<'a> {
    s: Span,
    look: Lookup<'a>,
}

impl<'a> Planned<'a> {
    fn new(ioas: &'a Ioas, s: Span) -> Self {
        Planned {
            s,
            look: ioas.areas.lookup(s.start, s.last),
        }
    }
}

/// The span an UNMAP names (`iova == 0 && len == u64::MAX`: everything).
fn unmap_span(iova: u64, len: u64) -> Result<Span, Error> {
    if iova == 0 && len == u64::MAX {
        return Ok(Span::FULL);
    }
    if len == 0 {
        return Err(inval(reason::ZERO_LENGTH));
    }
    Span::from_len(iova, len).ok_or(Error::new(errno::EOVERFLOW, reason::OVERFLOW))
}

impl<H: IommuHw> Cx<'_, H> {
    pub(crate) fn ioas_alloc(&mut self) -> Result<u32, Error> {
        let fail = self.fail;
        let slot = self.g.objs.reserve(|| !fail.is_some_and(|f| f.hit()))?;
        let mut ok = || !fail.is_some_and(|f| f.hit());
        let ioas = Ioas::new(self.limits.max_areas_per_ioas as usize, &mut ok)?;
        Ok(self.g.objs.publish(slot, Object::Ioas(ioas)))
    }
}

impl<H: IommuHw> Rx<'_, H> {
    /// Step 1 of a MAP (module docs): checks the reserved set, picks the IOVA if automatic and
    /// claims the range in the area slots. Of two racing overlapping maps at most one claims.
    fn claim_map(
        &self,
        ioas: &Ioas,
        resv: &ResvBuf,
        fixed: Option<u64>,
        gpa: u64,
        len: u64,
        prot: u8,
    ) -> Result<(SlotRef, u64), Error> {
        let full = Error::new(errno::ENOSPC, reason::AREA_TABLE_FULL);
        if ioas.areas.is_full() {
            return Err(full);
        }
        let want = |iova| SlotArea {
            iova,
            len,
            gpa,
            prot: u32::from(prot),
        };
        if let Some(iova) = fixed {
            let s = Span::new(iova, iova + (len - 1));
            if let Some(r) = resv.first_overlap(s) {
                return Err(Error::new(errno::EADDRINUSE, reason::IOVA_RESERVED).at(r.start));
            }
            return match ioas.areas.reserve(self.vcpu, want(iova)) {
                Ok(slot) => Ok((slot, iova)),
                Err(Refused::Full) => Err(full),
                Err(Refused::Overlap { iova }) => {
                    Err(Error::new(errno::EEXIST, reason::IOVA_IN_USE).at(iova))
                }
            };
        }
        let align = auto_align(gpa, len);
        // A refusal means a racing map took (part of) the space found first; each one is a
        // map that claimed, so this is bounded by the capacity.
        for _ in 0..=ioas.area_cap {
            let iova = alloc_iova(ioas, resv, len, align)
                .ok_or(Error::new(errno::ENOSPC, reason::NO_IOVA_SPACE))?;
            match ioas.areas.reserve(self.vcpu, want(iova)) {
                Ok(slot) => return Ok((slot, iova)),
                Err(Refused::Full) => return Err(full),
                Err(Refused::Overlap { .. }) => {}
            }
        }
        Err(Error::new(errno::ENOSPC, reason::NO_IOVA_SPACE))
    }

    /// Steps 2 and 3 of a MAP: writes every HWPT's page table, then publishes the area (or
    /// withdraws it, and what was written, on failure).
    #[allow(clippy::too_many_arguments)]
    fn finish_map(
        &self,
        mem: &dyn GuestMemory,
        ioas: &Ioas,
        slot: SlotRef,
        iova: u64,
        len: u64,
        gpa: u64,
        prot: u8,
    ) -> Result<(), Error> {
        let mut r = ioas_domains(self.g, ioas);
        if let Ok((doms, n)) = &r {
            for (i, &d) in doms[..*n].iter().enumerate() {
                if let Err(e) = hw_map_range(self.hw, mem, d, iova, gpa, len, hw_prot(prot)) {
                    // One invalidation round for the whole rollback, before the range is
                    // given back (forget after flush).
                    let mut inv = HwInvalidation::new();
                    for &done in &doms[..i] {
                        let _ = self.hw.unmap(done, iova, len, &mut inv);
                    }
                    let _ = self.hw.flush(&mut inv);
                    r = Err(e);
                    break;
                }
            }
        }
        match r {
            Ok(_) => {
                ioas.areas.publish(slot);
                Ok(())
            }
            Err(e) => {
                ioas.areas.withdraw(slot);
                Err(e)
            }
        }
    }

    /// Maps a validated range into every HWPT of the IOAS and records it.
    pub(crate) fn install(
        &self,
        mem: &dyn GuestMemory,
        ioas_id: u32,
        iova: u64,
        gpa: u64,
        len: u64,
        prot: u8,
    ) -> Result<(), Error> {
        let ioas = self.g.ioas(ioas_id)?;
        let (slot, _) = self.claim_map(ioas, &ResvBuf::new(), Some(iova), gpa, len, prot)?;
        self.finish_map(mem, ioas, slot, iova, len, gpa, prot)
    }

    /// IOAS_MAP (and one batch entry).
    pub(crate) fn map(
        &self,
        mem: &dyn GuestMemory,
        ioas_id: u32,
        flags: u32,
        gpa: u64,
        len: u64,
        iova: u64,
    ) -> Result<u64, Error> {
        if flags & !MAP_FLAGS != 0 {
            return Err(unknown_flags());
        }
        let prot = check_prot(flags)?;
        let fixed = (flags & MAP_FIXED_IOVA != 0).then_some(iova);
        match fixed {
            Some(iova) => check_range(iova, len, &[gpa, iova])?,
            None => check_range(gpa, len, &[gpa])?,
        };
        let ioas = self.g.ioas(ioas_id)?;
        if !mem.owns(gpa, len, prot & PROT_WRITE != 0) {
            return Err(Error::new(errno::EPERM, reason::GPA_NOT_OWNED).at(gpa));
        }
        let (slot, iova) = self.claim_map(ioas, ioas.reserved()?, fixed, gpa, len, prot)?;
        self.finish_map(mem, ioas, slot, iova, len, gpa, prot)?;
        Ok(iova)
    }

    /// Checks an UNMAP of `s` against the live areas: each one in `s` must lie whole inside
    /// it and not be pinned. The error is the one of the lowest such area, as for a sorted
    /// walk. Changes nothing.
    fn check_unmap(&self, ioas_id: u32, r: &Planned) -> Result<(), Error> {
        let mut worst: Option<(u64, Error)> = None;
        r.look.scan(|x| {
            self.check_one(ioas_id, r.s, x, &mut worst);
            true
        });
        match worst {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// [`check_unmap`](Self::check_unmap) of one slot: records its error in `worst` if it is
    /// the lowest so far.
    fn check_one(&self, ioas_id: u32, s: Span, x: &Seen, worst: &mut Option<(u64, Error)>) {
        let a = x.area;
        if x.state != SlotState::Live || !a.overlaps(s.start, s.last) {
            return;
        }
        let e = if a.iova < s.start || a.last() > s.last {
            Error::new(errno::ENOENT, reason::SPLITS_MAPPING).at(a.iova)
        } else if x.pins != 0 {
            let who = pinner(self.g, ioas_id, Span::new(a.iova, a.last()));
            Error::new(errno::EBUSY, reason::PINNED)
                .obj(kind::ACCESS, who)
                .at(a.iova)
        } else {
            return;
        };
        if worst.is_none_or(|(w, _)| a.iova < w) {
            *worst = Some((a.iova, e));
        }
    }

    /// Whether [`retire_in`](Self::retire_in) takes the slot `x` for an UNMAP of `s`, and
    /// takes it (LIVE → DYING(vcpu)).
    fn retire_one(&self, ioas: &Ioas, s: Span, x: &Seen) -> bool {
        let a = x.area;
        // An area published since the check that does not fit is a later map's: left.
        a.iova >= s.start && a.last() <= s.last && x.pins == 0 && ioas.areas.retire(x, self.vcpu)
    }

    /// Step 1 of an UNMAP of `s` (module docs): checks the live areas in `s` (whole, not
    /// pinned), then retires them. Returns the bytes this call retired. Changes nothing on
    /// error.
    fn claim_unmap(&self, ioas: &Ioas, ioas_id: u32, r: &Planned) -> Result<u64, Error> {
        self.check_unmap(ioas_id, r)?;
        match self.retire_in(ioas, r) {
            0 if r.s != Span::FULL => Err(Error::new(errno::ENOENT, reason::NOT_MAPPED)),
            bytes => Ok(bytes),
        }
    }

    /// Retires every live area lying whole in `s` (LIVE → DYING(vcpu), one compare-exchange
    /// per area: the linearisation point of its removal). Returns the bytes this call
    /// retired; an area a racing unmap retired first is not counted, so racing unmaps count
    /// each page once.
    fn retire_in(&self, ioas: &Ioas, r: &Planned) -> u64 {
        let mut bytes = 0u64;
        r.look.scan(|x| {
            if self.retire_one(ioas, r.s, x) {
                bytes += x.area.len;
            }
            true
        });
        bytes
    }

    /// Calls `f` on every slot this call retired in `s`. Only this call changes their state
    /// (the vCPU has one call in flight), so the snapshot stays exact.
    fn each_claimed(&self, r: &Planned, mut f: impl FnMut(&Seen)) {
        let s = r.s;
        r.look.scan(|x| {
            if x.state == SlotState::Dying(self.vcpu) && x.area.overlaps(s.start, s.last) {
                f(x);
            }
            true
        });
    }

    /// Puts back every area this call retired (an atomic batch that failed).
    fn unclaim(&self, ioas: &Ioas) {
        let all = Planned::new(ioas, Span::FULL);
        self.each_claimed(&all, |x| ioas.areas.revive(x.slot));
    }

    /// Step 2 of an UNMAP of `s`: clears every HWPT's page table for the areas this call
    /// retired in `s`, recording the IOTLB invalidations in `inv` (the caller runs one round
    /// per unit for the whole call, then [`forget_claimed`](Self::forget_claimed)). `true` if
    /// the hardware malfunctioned.
    fn unmap_claimed(&self, ioas: &Ioas, r: &Planned, inv: &mut HwInvalidation) -> bool {
        let doms = ioas_domains(self.g, ioas);
        let mut failed = doms.is_err();
        let (doms, n) = doms.unwrap_or(([HwDomain(0); MAX_HWPTS_PER_IOAS], 0));
        self.each_claimed(r, |x| {
            for &d in &doms[..n] {
                match self.hw.unmap(d, x.area.iova, x.area.len, inv) {
                    Ok(b) if b == x.area.len => {}
                    _ => failed = true,
                }
            }
        });
        failed
    }

    /// Step 3 of an UNMAP of `s`, after the invalidation round: frees the slots this call
    /// retired in `s`. Only now may another map reuse their IOVAs, so a device never
    /// translates a new mapping through a stale IOTLB entry of the old one.
    fn forget_claimed(&self, ioas: &Ioas, r: &Planned) {
        self.each_claimed(r, |x| ioas.areas.free(x.slot));
    }

    /// IOAS_UNMAP: the areas claimed, unmapped from every HWPT, one invalidation round per
    /// IOMMU unit, then forgotten. EIO (the areas gone either way) if the hardware
    /// malfunctioned.
    pub(crate) fn unmap(&self, ioas_id: u32, iova: u64, len: u64) -> Result<u64, Error> {
        let ioas = self.g.ioas(ioas_id)?;
        let s = unmap_span(iova, len)?;
        // One lookup plan for every step of the call (`AreaSlots::lookup`).
        let r = Planned::new(ioas, s);
        let mut near = Near::new();
        if r.look.near(s.start, s.last, &mut near) {
            return self.unmap_near(ioas, ioas_id, s, &near);
        }
        if ioas.areas.capacity() <= RETIRED_BITS {
            return self.unmap_wide(ioas, ioas_id, &r);
        }
        let bytes = self.claim_unmap(ioas, ioas_id, &r)?;
        let mut inv = HwInvalidation::new();
        let failed = self.unmap_claimed(ioas, &r, &mut inv);
        let flushed = self.hw.flush(&mut inv).is_ok();
        self.forget_claimed(ioas, &r);
        if failed || !flushed {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(bytes)
    }

    /// [`unmap`](Self::unmap) of a range with at most `NEAR` areas in it: the same steps,
    /// taken from one scan of the slots instead of one scan per step. The check reads the
    /// snapshot; each retire is a compare-exchange on the state word the snapshot saw, so it
    /// fails if the slot changed since (a racing unmap took it: not counted, as in
    /// [`retire_in`](Self::retire_in)). An area that was not live in the snapshot belongs to
    /// a MAP that had not returned when this call started (a MAP that had returned published
    /// LIVE, Release, before the call's Acquire loads of the scan): it is not there for this
    /// call (docs/abi.md §2). Only this call changes the state of the slots it retired (its
    /// vCPU has one call in flight), so the page-table and free steps work on the retired
    /// entries without reading the slots again; the free still comes after the invalidation
    /// round (rule 4 of `area_slots.rs`).
    fn unmap_near(&self, ioas: &Ioas, ioas_id: u32, s: Span, near: &Near) -> Result<u64, Error> {
        let mut worst = None;
        for x in near.items() {
            self.check_one(ioas_id, s, x, &mut worst);
        }
        if let Some((_, e)) = worst {
            return Err(e);
        }
        let mut mine = [false; NEAR];
        let mut bytes = 0u64;
        for (x, m) in near.items().iter().zip(&mut mine) {
            if self.retire_one(ioas, s, x) {
                *m = true;
                bytes += x.area.len;
            }
        }
        if bytes == 0 && s != Span::FULL {
            return Err(Error::new(errno::ENOENT, reason::NOT_MAPPED));
        }
        let retired = || near.items().iter().zip(&mine).filter(|(_, m)| **m);
        let mut inv = HwInvalidation::new();
        let doms = ioas_domains(self.g, ioas);
        let mut failed = doms.is_err();
        let (doms, n) = doms.unwrap_or(([HwDomain(0); MAX_HWPTS_PER_IOAS], 0));
        for (x, _) in retired() {
            for &d in &doms[..n] {
                match self.hw.unmap(d, x.area.iova, x.area.len, &mut inv) {
                    Ok(b) if b == x.area.len => {}
                    _ => failed = true,
                }
            }
        }
        let flushed = self.hw.flush(&mut inv).is_ok();
        // After the round: forget after flush.
        for (x, _) in retired() {
            ioas.areas.free(x.slot);
        }
        if failed || !flushed {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(bytes)
    }

    /// [`unmap`](Self::unmap) of a range with more than `NEAR` areas in an IOAS of at most
    /// [`RETIRED_BITS`] slots: the check and the retire scan the range's slots as in the
    /// general case, and the retire records the slots it took in a bitmap, so the page-table
    /// and free steps read only those slots instead of scanning the range twice more. Only
    /// this call changes the state of the slots it retired, and their fields were written
    /// before the LIVE its compare-exchange read (`AreaSlots::retired`); the free still comes
    /// after the invalidation round (rule 4 of `area_slots.rs`).
    fn unmap_wide(&self, ioas: &Ioas, ioas_id: u32, r: &Planned) -> Result<u64, Error> {
        self.check_unmap(ioas_id, r)?;
        let mut mine = [0u64; RETIRED_BITS / 64];
        let mut bytes = 0u64;
        r.look.scan(|x| {
            if self.retire_one(ioas, r.s, x) {
                // `index < capacity <= RETIRED_BITS`.
                mine[x.slot.index / 64] |= 1 << (x.slot.index % 64);
                bytes += x.area.len;
            }
            true
        });
        if bytes == 0 && r.s != Span::FULL {
            return Err(Error::new(errno::ENOENT, reason::NOT_MAPPED));
        }
        let each = |f: &mut dyn FnMut(SlotRef, SlotArea)| {
            for (w, &bits) in mine.iter().enumerate() {
                let mut b = bits;
                while b != 0 {
                    let (slot, area) = ioas.areas.retired(w * 64 + b.trailing_zeros() as usize);
                    b &= b - 1;
                    f(slot, area);
                }
            }
        };
        let mut inv = HwInvalidation::new();
        let doms = ioas_domains(self.g, ioas);
        let mut failed = doms.is_err();
        let (doms, n) = doms.unwrap_or(([HwDomain(0); MAX_HWPTS_PER_IOAS], 0));
        // Areas whose IOVAs follow each other (a batch's entries, taken in slot order) are
        // cleared as one range per domain: one table walk instead of one per area. The range
        // holds only areas this call retired, so it clears no one else's leaves.
        let mut clear = |iova: u64, len: u64| {
            for &d in &doms[..n] {
                match self.hw.unmap(d, iova, len, &mut inv) {
                    Ok(b) if b == len => {}
                    _ => failed = true,
                }
            }
        };
        let mut run: Option<(u64, u64)> = None;
        each(&mut |_, a| match run {
            // Checked: an area may end at the top of the IOVA space.
            Some((start, len))
                if start.checked_add(len) == Some(a.iova) && len.checked_add(a.len).is_some() =>
            {
                run = Some((start, len + a.len))
            }
            _ => {
                if let Some((start, len)) = run {
                    clear(start, len);
                }
                run = Some((a.iova, a.len));
            }
        });
        if let Some((start, len)) = run {
            clear(start, len);
        }
        let flushed = self.hw.flush(&mut inv).is_ok();
        // After the round: forget after flush.
        each(&mut |slot, _| ioas.areas.free(slot));
        if failed || !flushed {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(bytes)
    }

    /// IOAS_MAP_BATCH. `a.out_done` is meaningful on error too.
    pub(crate) fn map_batch(
        &self,
        mem: &dyn GuestMemory,
        a: &mut IoasMapBatch,
    ) -> Result<(), Error> {
        a.out_done = 0;
        if a.flags & !BATCH_ATOMIC != 0 {
            return Err(unknown_flags());
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        if a.num_entries > MAX_BATCH {
            return Err(inval(reason::TOO_MANY));
        }
        self.g.ioas(a.ioas_id)?;
        let n = a.num_entries as usize;
        let bytes = (n * MapEntry::SIZE) as u64;
        if n != 0 && !owns_array(mem, a.entries_gpa, bytes) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let atomic = a.flags & BATCH_ATOMIC != 0;
        let mut done = [(0u64, 0u64); MAX_BATCH as usize];
        for i in 0..n {
            let at = a.entries_gpa + (i * MapEntry::SIZE) as u64;
            let r = read_struct::<MapEntry>(mem, at).and_then(|e| {
                if e.reserved != 0 {
                    return Err(reserved_nonzero());
                }
                let iova = self.map(mem, a.ioas_id, e.flags, e.gpa, e.length, e.iova)?;
                let out = MapEntry { iova, ..e };
                if let Err(err) = write_struct(mem, at, &out) {
                    let _ = self.unmap(a.ioas_id, iova, e.length);
                    return Err(err);
                }
                Ok(out)
            });
            match r {
                Ok(e) => {
                    done[i] = (e.iova, e.length);
                    a.out_done = i as u32 + 1;
                }
                Err(e) => {
                    if atomic {
                        for &(iova, len) in done[..i].iter().rev() {
                            let _ = self.unmap(a.ioas_id, iova, len);
                        }
                        a.out_done = 0;
                    }
                    return Err(e.index(i as u32));
                }
            }
        }
        Ok(())
    }

    /// IOAS_UNMAP_BATCH.
    pub(crate) fn unmap_batch(
        &self,
        mem: &dyn GuestMemory,
        a: &mut IoasUnmapBatch,
    ) -> Result<(), Error> {
        a.out_done = 0;
        if a.flags & !BATCH_ATOMIC != 0 {
            return Err(unknown_flags());
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        if a.num_entries > MAX_BATCH {
            return Err(inval(reason::TOO_MANY));
        }
        let ioas = self.g.ioas(a.ioas_id)?;
        let n = a.num_entries as usize;
        let bytes = (n * UnmapEntry::SIZE) as u64;
        if n != 0 && !owns_array(mem, a.entries_gpa, bytes) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let entry_at = |i: usize| a.entries_gpa + (i * UnmapEntry::SIZE) as u64;
        if a.flags & BATCH_ATOMIC != 0 {
            // Read and check every entry first, then retire them all: a check that fails
            // changes nothing. Retiring can only lose to a racing unmap (the entries are
            // disjoint, so no entry's unmap changes another's check); an entry left with
            // nothing puts every retired area back and fails, so the batch stays all or
            // nothing.
            let mut spans = [Span::default(); MAX_BATCH as usize];
            let mut claimed = [0u64; MAX_BATCH as usize];
            let mut read_err = None;
            let mut m = n;
            for (i, span) in spans[..n].iter_mut().enumerate() {
                match read_struct::<UnmapEntry>(mem, entry_at(i))
                    .and_then(|e| unmap_span(e.iova, e.length))
                {
                    Ok(s) => *span = s,
                    Err(e) => {
                        read_err = Some(e.index(i as u32));
                        m = i;
                        break;
                    }
                }
            }
            for i in 0..m {
                let s = spans[i];
                if spans[..i].iter().any(|o| o.overlaps(&s)) {
                    return Err(inval(reason::RANGES_OVERLAP).index(i as u32));
                }
                self.check_unmap(a.ioas_id, &Planned::new(ioas, s))
                    .map_err(|e| e.index(i as u32))?;
            }
            if let Some(e) = read_err {
                return Err(e);
            }
            for i in 0..n {
                claimed[i] = self.retire_in(ioas, &Planned::new(ioas, spans[i]));
                if claimed[i] == 0 && spans[i] != Span::FULL {
                    self.unclaim(ioas);
                    return Err(Error::new(errno::ENOENT, reason::NOT_MAPPED).index(i as u32));
                }
            }
            // Every entry's invalidations go into one batch: one round per IOMMU unit for the
            // whole call. A malfunction stops the batch at that entry, as a non-atomic one
            // would: the entries after it are put back untouched.
            let mut inv = HwInvalidation::new();
            let mut done = n;
            for (i, &s) in spans[..n].iter().enumerate() {
                if self.unmap_claimed(ioas, &Planned::new(ioas, s), &mut inv) {
                    done = i + 1;
                    break;
                }
            }
            let flushed = self.hw.flush(&mut inv).is_ok();
            for &s in &spans[..done] {
                self.forget_claimed(ioas, &Planned::new(ioas, s));
            }
            if done < n {
                self.unclaim(ioas);
            }
            for i in 0..done {
                let e = UnmapEntry {
                    iova: spans[i].start,
                    length: claimed[i],
                };
                write_struct(mem, entry_at(i), &e).map_err(|e| e.index(i as u32))?;
                a.out_done = i as u32 + 1;
            }
            if done < n || !flushed {
                let last = (done as u32).saturating_sub(1);
                return Err(Error::new(errno::EIO, reason::HW_FAULT).index(last));
            }
            return Ok(());
        }
        // Non-atomic: entry by entry, claimed and unmapped from the HWPTs, every entry's
        // invalidations in one batch; then one round per IOMMU unit for the whole call, run on
        // an entry's error too, and the areas forgotten. A failed round is EIO at the last
        // entry processed; `out_done` still counts the entries whose areas are gone.
        let mut inv = HwInvalidation::new();
        let mut spans = [(Span::default(), 0u64); MAX_BATCH as usize];
        let mut done = 0;
        let mut r = Ok(());
        for (i, slot) in spans[..n].iter_mut().enumerate() {
            let one = read_struct::<UnmapEntry>(mem, entry_at(i)).and_then(|e| {
                let s = unmap_span(e.iova, e.length)?;
                let r = Planned::new(ioas, s);
                let bytes = self.claim_unmap(ioas, a.ioas_id, &r)?;
                *slot = (s, bytes);
                done = i + 1;
                if self.unmap_claimed(ioas, &r, &mut inv) {
                    return Err(Error::new(errno::EIO, reason::HW_FAULT));
                }
                Ok(())
            });
            if let Err(e) = one {
                r = Err(e.index(i as u32));
                break;
            }
        }
        let flushed = self.hw.flush(&mut inv).is_ok();
        for &(s, _) in &spans[..done] {
            self.forget_claimed(ioas, &Planned::new(ioas, s));
        }
        for (i, &(s, bytes)) in spans[..done].iter().enumerate() {
            let e = UnmapEntry {
                iova: s.start,
                length: bytes,
            };
            write_struct(mem, entry_at(i), &e).map_err(|e| e.index(i as u32))?;
            a.out_done = i as u32 + 1;
        }
        if !flushed {
            let last = a.out_done.min(a.num_entries.saturating_sub(1));
            return Err(Error::new(errno::EIO, reason::HW_FAULT).index(last));
        }
        r
    }
}

impl<H: IommuHw> Cx<'_, H> {
    /// IOAS_COPY.
    pub(crate) fn copy(&mut self, mem: &dyn GuestMemory, a: &mut IoasCopy) -> Result<(), Error> {
        if a.flags & !MAP_FLAGS != 0 {
            return Err(unknown_flags());
        }
        let prot = check_prot(a.flags)?;
        let fixed = a.flags & MAP_FIXED_IOVA != 0;
        let src_span = if fixed {
            check_range(a.src_iova, a.length, &[a.src_iova, a.dst_iova])?
        } else {
            check_range(a.src_iova, a.length, &[a.src_iova])?
        };
        let src = self.g.ioas(a.src_ioas_id)?;
        let dst = self.g.ioas(a.dst_ioas_id)?;
        // The source must be covered; every piece of guest memory it names must (still) be
        // the guest's, with the requested access.
        let mut pieces = 0usize;
        let mut first_gpa = None;
        src.covered(src_span, |area, piece| {
            let gpa = area.gpa + (piece.start - area.iova);
            if !mem.owns(gpa, piece.len(), prot & PROT_WRITE != 0) {
                return Err(Error::new(errno::EPERM, reason::GPA_NOT_OWNED).at(gpa));
            }
            first_gpa.get_or_insert(gpa);
            pieces += 1;
            Ok(())
        })?;
        if dst.area_count() + pieces > dst.area_cap {
            return Err(Error::new(errno::ENOSPC, reason::AREA_TABLE_FULL));
        }
        let mut resv = ResvBuf::new();
        ioas_reserved(self.g, a.dst_ioas_id, &[], &mut resv)?;
        let dst_iova = if fixed {
            let s = Span::new(a.dst_iova, a.dst_iova + (a.length - 1));
            if let Some(r) = resv.first_overlap(s) {
                return Err(Error::new(errno::EADDRINUSE, reason::IOVA_RESERVED).at(r.start));
            }
            if let Some(x) = dst.first_overlap(s) {
                return Err(Error::new(errno::EEXIST, reason::IOVA_IN_USE).at(x.iova));
            }
            a.dst_iova
        } else {
            let align = auto_align(first_gpa.unwrap_or(0), a.length);
            alloc_iova(dst, &resv, a.length, align)
                .ok_or(Error::new(errno::ENOSPC, reason::NO_IOVA_SPACE))?
        };
        // Piece by piece; the source is looked up again each time (it may be the destination,
        // whose table grows, but never inside the source range).
        let mut off = 0u64;
        let mut result = Ok(());
        for _ in 0..pieces {
            if off >= a.length {
                break;
            }
            let piece = {
                let src = self.g.ioas(a.src_ioas_id)?;
                let cur = a.src_iova + off;
                match src.area_at(cur) {
                    Some(x) => {
                        let n = (x.last() - cur + 1).min(a.length - off);
                        Some((x.gpa + (cur - x.iova), n))
                    }
                    _ => None,
                }
            };
            let Some((gpa, n)) = piece else {
                result = Err(Error::new(errno::ENOENT, reason::NOT_COVERED));
                break;
            };
            if let Err(e) = self
                .rx()
                .install(mem, a.dst_ioas_id, dst_iova + off, gpa, n, prot)
            {
                result = Err(e);
                break;
            }
            off += n;
        }
        if let Err(e) = result {
            if off > 0 {
                let _ = self.rx().unmap(a.dst_ioas_id, dst_iova, off);
            }
            return Err(e);
        }
        a.dst_iova = dst_iova;
        Ok(())
    }

    /// IOAS_IOVA_RANGES: the holes of the reserved set. EMSGSIZE (with `num_iovas` set) when
    /// the array is too small.
    pub(crate) fn iova_ranges(
        &mut self,
        mem: &dyn GuestMemory,
        a: &mut IoasIovaRanges,
    ) -> Result<(), Error> {
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let mut resv = ResvBuf::new();
        ioas_reserved(self.g, a.ioas_id, &[], &mut resv)?;
        let cap = a.num_iovas as usize;
        if cap != 0 && !owns_array(mem, a.ranges_gpa, (cap * IovaRange::SIZE) as u64) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let mut count = 0usize;
        let mut emit = |s: Span| -> Result<(), Error> {
            if count < cap {
                let r = IovaRange {
                    start: s.start,
                    last: s.last,
                };
                write_struct(mem, a.ranges_gpa + (count * IovaRange::SIZE) as u64, &r)?;
            }
            count += 1;
            Ok(())
        };
        let mut x = Some(0u64);
        for r in resv.spans() {
            if let Some(start) = x
                && start < r.start
            {
                emit(Span::new(start, r.start - 1))?;
            }
            x = r.last.checked_add(1);
        }
        if let Some(start) = x {
            emit(Span::new(start, u64::MAX))?;
        }
        a.num_iovas = count as u32;
        a.out_iova_alignment = PAGE;
        if count > cap {
            return Err(Error::new(errno::EMSGSIZE, reason::TOO_MANY));
        }
        Ok(())
    }

    /// IOAS_ALLOW_IOVAS: replaces the allowed list, all or nothing.
    pub(crate) fn allow_iovas(
        &mut self,
        mem: &dyn GuestMemory,
        a: &IoasAllowIovas,
    ) -> Result<(), Error> {
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        self.g.ioas(a.ioas_id)?;
        let n = a.num_iovas as usize;
        if n > MAX_ALLOWED_IOVAS {
            return Err(inval(reason::TOO_MANY));
        }
        let mut list = [Span::default(); MAX_ALLOWED_IOVAS];
        for (i, slot) in list[..n].iter_mut().enumerate() {
            let r = read_struct::<IovaRange>(mem, a.ranges_gpa + (i * IovaRange::SIZE) as u64)
                .map_err(|e| e.index(i as u32))?;
            let end_aligned = r.last == u64::MAX || (r.last + 1) % PAGE == 0;
            if r.start > r.last {
                return Err(inval(reason::ZERO_LENGTH).index(i as u32));
            }
            if r.start % PAGE != 0 || !end_aligned {
                return Err(inval(reason::MISALIGNED).index(i as u32));
            }
            *slot = Span::new(r.start, r.last);
        }
        let list = &mut list[..n];
        list.sort_unstable();
        if list.windows(2).any(|w| w[0].overlaps(&w[1])) {
            return Err(inval(reason::RANGES_OVERLAP));
        }
        let mut resv = ResvBuf::new();
        ioas_reserved(self.g, a.ioas_id, &[], &mut resv)?;
        for s in list.iter() {
            if let Some(r) = resv.first_overlap(*s) {
                return Err(Error::new(errno::EADDRINUSE, reason::IOVA_RESERVED).at(r.start));
            }
        }
        let ioas = self.g.ioas_mut(a.ioas_id)?;
        ioas.allowed.clear();
        ioas.allowed.extend_from_slice(list);
        Ok(())
    }
}

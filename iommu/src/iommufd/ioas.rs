//! IOAS: an IOVA → guest-physical map, mirrored into every HWPT built on it.
//!
//! * Mappings ("areas") live in a table sorted by IOVA whose capacity is fixed at
//!   IOAS_ALLOC: MAP never allocates from the heap.
//! * The reserved set is computed, never stored: outside the aperture of every HWPT on the
//!   IOAS, plus the reserved regions and apertures of every device attached to them (all
//!   members of an attached group). MAP never lands there; attach refuses a group whose
//!   reserved set would cover a mapping or an allowed range.
//! * Automatic IOVAs: first fit, inside the allowed list (if any), never at 0, aligned to the
//!   smaller of the length rounded up to a power of two and the natural alignment of the
//!   guest-physical address (capped at 1 GiB), so large leaves stay possible.
//! * UNMAP is all or nothing: every mapping in the range is checked (whole, not pinned) before
//!   the first is removed, and the exact byte count is returned.

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
    Cx, Error, GuestMemory, IommuHw, MAX_ALLOWED_IOVAS, MAX_HWPTS_PER_IOAS, PAGE, hw_err, inval,
    try_vec,
};
use crate::pgtable::Prot;

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
    /// Sorted by IOVA, disjoint; never longer than `area_cap`.
    pub(crate) areas: Vec<Area>,
    pub(crate) area_cap: usize,
    /// Sorted, disjoint; empty = everything allowed.
    pub(crate) allowed: Vec<Span>,
    /// HWPTs built on this IOAS (each holds a reference).
    pub(crate) hwpts: Vec<u32>,
    /// ACCESS objects attached (each holds a reference).
    pub(crate) accesses: u32,
}

impl Ioas {
    pub(crate) fn new(area_cap: usize, alloc_ok: &mut dyn FnMut() -> bool) -> Result<Self, Error> {
        Ok(Ioas {
            areas: try_vec(area_cap, alloc_ok())?,
            area_cap,
            allowed: try_vec(MAX_ALLOWED_IOVAS, alloc_ok())?,
            hwpts: try_vec(MAX_HWPTS_PER_IOAS, alloc_ok())?,
            accesses: 0,
        })
    }

    pub fn areas(&self) -> &[Area] {
        &self.areas
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

    /// Index of the first area whose last byte is at or after `iova`.
    pub(crate) fn first_from(&self, iova: u64) -> usize {
        self.areas.partition_point(|a| a.last() < iova)
    }

    /// The first area overlapping `s`.
    pub(crate) fn first_overlap(&self, s: Span) -> Option<&Area> {
        self.areas
            .get(self.first_from(s.start))
            .filter(|a| a.iova <= s.last)
    }

    pub(crate) fn insert(&mut self, a: Area) -> Result<(), Error> {
        if self.areas.len() >= self.area_cap || self.areas.len() == self.areas.capacity() {
            return Err(Error::new(errno::ENOSPC, reason::AREA_TABLE_FULL));
        }
        let pos = self.areas.partition_point(|x| x.iova < a.iova);
        self.areas.insert(pos, a);
        Ok(())
    }

    /// Walks the contiguous mappings covering `s` piece by piece: `f(area index, piece)`.
    /// ENOENT (NOT_COVERED, at the first uncovered address) if there is a hole.
    pub(crate) fn covered(
        &self,
        s: Span,
        mut f: impl FnMut(usize, &Area, Span) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut cursor = s.start;
        // Each step consumes one area.
        for _ in 0..=self.areas.len() {
            let i = self.first_from(cursor);
            let a = match self.areas.get(i) {
                Some(a) if a.iova <= cursor => a,
                _ => {
                    return Err(Error::new(errno::ENOENT, reason::NOT_COVERED).at(cursor));
                }
            };
            let last = a.last().min(s.last);
            f(i, a, Span::new(cursor, last))?;
            if last == s.last {
                return Ok(());
            }
            cursor = last + 1;
        }
        Err(Error::new(errno::ENOENT, reason::NOT_COVERED).at(cursor))
    }
}

/// A sorted, merged set of reserved ranges on the stack.
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

/// First fit of `len` bytes aligned to `align` in `ioas`, outside `resv`, inside the allowed
/// list (or `[PAGE, 2^64 - PAGE)`), never at 0.
pub(crate) fn alloc_iova(ioas: &Ioas, resv: &ResvBuf, len: u64, align: u64) -> Option<u64> {
    let everything = [Span::new(PAGE, u64::MAX - PAGE)];
    let spaces: &[Span] = if ioas.allowed.is_empty() {
        &everything
    } else {
        &ioas.allowed
    };
    let steps = resv.spans().len() + ioas.areas.len() + 2;
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
            } else if let Some(a) = ioas.first_overlap(s) {
                a.last().checked_add(1)
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

/// Maps `[gpa, gpa + len)` into domain `d` at `iova`, one host-contiguous run at a time. On
/// failure nothing of it stays mapped.
pub(crate) fn hw_map_range<H: IommuHw>(
    hw: &mut H,
    mem: &dyn GuestMemory,
    d: HwDomain,
    iova: u64,
    gpa: u64,
    len: u64,
    prot: Prot,
) -> Result<(), Error> {
    let fault = Error::new(errno::EFAULT, reason::GPA_NOT_OWNED);
    let mut off = 0;
    // Each run is at least a page.
    for _ in 0..=len / PAGE {
        if off >= len {
            return Ok(());
        }
        let r = match mem.translate(gpa + off) {
            Some(r) if r.hpa % PAGE == 0 && r.len >= PAGE => Ok(r),
            _ => Err(fault.at(gpa + off)),
        };
        let r = r.and_then(|r| {
            let n = (r.len & !(PAGE - 1)).min(len - off);
            hw.map(d, iova + off, r.hpa, n, prot)
                .map(|()| n)
                .map_err(hw_err)
        });
        match r {
            Ok(n) => off += n,
            Err(e) => {
                if off > 0 {
                    let _ = hw.unmap_now(d, iova, off);
                }
                return Err(e);
            }
        }
    }
    Ok(())
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

/// What an unmap of `[iova, iova + len)` would remove: areas `i0..i1`, `bytes` in total.
pub(crate) struct UnmapPlan {
    i0: usize,
    i1: usize,
    bytes: u64,
}

impl<H: IommuHw> Cx<'_, H> {
    pub(crate) fn ioas_alloc(&mut self) -> Result<u32, Error> {
        let fail = self.fail;
        let slot = self.g.objs.reserve(|| !fail.is_some_and(|f| f.hit()))?;
        let mut ok = || !fail.is_some_and(|f| f.hit());
        let ioas = Ioas::new(self.limits.max_areas_per_ioas as usize, &mut ok)?;
        Ok(self.g.objs.publish(slot, Object::Ioas(ioas)))
    }

    /// Validates a map request and picks its IOVA; changes nothing.
    fn plan_map(
        &self,
        mem: &dyn GuestMemory,
        ioas_id: u32,
        fixed: Option<u64>,
        gpa: u64,
        len: u64,
        prot: u8,
    ) -> Result<u64, Error> {
        match fixed {
            Some(iova) => check_range(iova, len, &[gpa, iova])?,
            None => check_range(gpa, len, &[gpa])?,
        };
        let ioas = self.g.ioas(ioas_id)?;
        if !mem.owns(gpa, len, prot & PROT_WRITE != 0) {
            return Err(Error::new(errno::EPERM, reason::GPA_NOT_OWNED).at(gpa));
        }
        if ioas.areas.len() >= ioas.area_cap {
            return Err(Error::new(errno::ENOSPC, reason::AREA_TABLE_FULL));
        }
        let mut resv = ResvBuf::new();
        ioas_reserved(self.g, ioas_id, &[], &mut resv)?;
        match fixed {
            Some(iova) => {
                let s = Span::new(iova, iova + (len - 1));
                if let Some(r) = resv.first_overlap(s) {
                    return Err(Error::new(errno::EADDRINUSE, reason::IOVA_RESERVED).at(r.start));
                }
                if let Some(a) = ioas.first_overlap(s) {
                    return Err(Error::new(errno::EEXIST, reason::IOVA_IN_USE).at(a.iova));
                }
                Ok(iova)
            }
            None => alloc_iova(ioas, &resv, len, auto_align(gpa, len))
                .ok_or(Error::new(errno::ENOSPC, reason::NO_IOVA_SPACE)),
        }
    }

    /// Maps a validated range into every HWPT of the IOAS and records it.
    pub(crate) fn install(
        &mut self,
        mem: &dyn GuestMemory,
        ioas_id: u32,
        iova: u64,
        gpa: u64,
        len: u64,
        prot: u8,
    ) -> Result<(), Error> {
        let ioas = self.g.ioas(ioas_id)?;
        if ioas.areas.len() >= ioas.area_cap {
            return Err(Error::new(errno::ENOSPC, reason::AREA_TABLE_FULL));
        }
        let (doms, n) = ioas_domains(self.g, ioas)?;
        for (i, &d) in doms[..n].iter().enumerate() {
            if let Err(e) = hw_map_range(self.hw, mem, d, iova, gpa, len, hw_prot(prot)) {
                let mut inv = HwInvalidation::new();
                for &done in &doms[..i] {
                    let _ = self.hw.unmap(done, iova, len, &mut inv);
                }
                let _ = self.hw.flush(&mut inv);
                return Err(e);
            }
        }
        let area = Area {
            iova,
            len,
            gpa,
            prot,
            pins: 0,
        };
        let r = self.g.ioas_mut(ioas_id).and_then(|i| i.insert(area));
        if r.is_err() {
            let mut inv = HwInvalidation::new();
            for &d in &doms[..n] {
                let _ = self.hw.unmap(d, iova, len, &mut inv);
            }
            let _ = self.hw.flush(&mut inv);
        }
        r
    }

    /// IOAS_MAP (and one batch entry).
    pub(crate) fn map(
        &mut self,
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
        let iova = self.plan_map(mem, ioas_id, fixed, gpa, len, prot)?;
        self.install(mem, ioas_id, iova, gpa, len, prot)?;
        Ok(iova)
    }

    /// Checks an unmap; changes nothing.
    pub(crate) fn plan_unmap(&self, ioas_id: u32, iova: u64, len: u64) -> Result<UnmapPlan, Error> {
        let ioas = self.g.ioas(ioas_id)?;
        let s = if iova == 0 && len == u64::MAX {
            Span::FULL
        } else {
            if len == 0 {
                return Err(inval(reason::ZERO_LENGTH));
            }
            Span::from_len(iova, len).ok_or(Error::new(errno::EOVERFLOW, reason::OVERFLOW))?
        };
        let i0 = ioas.first_from(s.start);
        let mut i1 = i0;
        let mut bytes = 0u64;
        while let Some(a) = ioas.areas.get(i1) {
            if a.iova > s.last {
                break;
            }
            if a.iova < s.start || a.last() > s.last {
                return Err(Error::new(errno::ENOENT, reason::SPLITS_MAPPING).at(a.iova));
            }
            if a.pins != 0 {
                let who = pinner(self.g, ioas_id, a.span());
                return Err(Error::new(errno::EBUSY, reason::PINNED)
                    .obj(kind::ACCESS, who)
                    .at(a.iova));
            }
            bytes += a.len;
            i1 += 1;
        }
        if i1 == i0 && s != Span::FULL {
            return Err(Error::new(errno::ENOENT, reason::NOT_MAPPED));
        }
        Ok(UnmapPlan { i0, i1, bytes })
    }

    /// Carries out a plan: unmaps every area from every HWPT, then forgets them. The IOTLB
    /// invalidations are recorded in `inv`, for the caller's one flush
    /// ([`flush_unmapped`](Self::flush_unmapped)). Only a hardware malfunction can fail it
    /// (EIO, after the areas are gone from the IOAS).
    pub(crate) fn commit_unmap(
        &mut self,
        ioas_id: u32,
        p: UnmapPlan,
        inv: &mut HwInvalidation,
    ) -> Result<u64, Error> {
        let ioas = self.g.ioas(ioas_id)?;
        let (doms, n) = ioas_domains(self.g, ioas)?;
        let mut failed = false;
        for a in &ioas.areas[p.i0..p.i1] {
            for &d in &doms[..n] {
                match self.hw.unmap(d, a.iova, a.len, inv) {
                    Ok(b) if b == a.len => {}
                    _ => failed = true,
                }
            }
        }
        self.g.ioas_mut(ioas_id)?.areas.drain(p.i0..p.i1);
        if failed {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(p.bytes)
    }

    /// IOAS_UNMAP: every area and HWPT unmapped, then one invalidation round per IOMMU unit.
    pub(crate) fn unmap(&mut self, ioas_id: u32, iova: u64, len: u64) -> Result<u64, Error> {
        let mut inv = HwInvalidation::new();
        let r = self.unmap_recorded(ioas_id, iova, len, &mut inv);
        self.flush_unmapped(&mut inv, r)
    }

    /// One unmap (or batch entry) whose invalidations are recorded in `inv`.
    pub(crate) fn unmap_recorded(
        &mut self,
        ioas_id: u32,
        iova: u64,
        len: u64,
        inv: &mut HwInvalidation,
    ) -> Result<u64, Error> {
        let plan = self.plan_unmap(ioas_id, iova, len)?;
        self.commit_unmap(ioas_id, plan, inv)
    }

    /// Runs the invalidation rounds `inv` recorded (one per unit); a failed round turns `r`
    /// into EIO (the areas are gone from the IOAS either way).
    pub(crate) fn flush_unmapped<T>(
        &mut self,
        inv: &mut HwInvalidation,
        r: Result<T, Error>,
    ) -> Result<T, Error> {
        match self.hw.flush(inv) {
            Ok(()) => r,
            Err(_) => Err(Error::new(errno::EIO, reason::HW_FAULT)),
        }
    }

    /// IOAS_MAP_BATCH. `a.out_done` is meaningful on error too.
    pub(crate) fn map_batch(
        &mut self,
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
                        let mut inv = HwInvalidation::new();
                        for &(iova, len) in done[..i].iter().rev() {
                            let _ = self.unmap_recorded(a.ioas_id, iova, len, &mut inv);
                        }
                        let _ = self.flush_unmapped(&mut inv, Ok(()));
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
        &mut self,
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
        self.g.ioas(a.ioas_id)?;
        let n = a.num_entries as usize;
        let bytes = (n * UnmapEntry::SIZE) as u64;
        if n != 0 && !owns_array(mem, a.entries_gpa, bytes) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let entry_at = |i: usize| a.entries_gpa + (i * UnmapEntry::SIZE) as u64;
        if a.flags & BATCH_ATOMIC != 0 {
            // Validate everything first: each entry against the IOAS, and the entries against
            // each other (disjoint), so that no entry's unmap can change another's outcome.
            let mut spans = [Span::default(); MAX_BATCH as usize];
            for i in 0..n {
                let e =
                    read_struct::<UnmapEntry>(mem, entry_at(i)).map_err(|e| e.index(i as u32))?;
                self.plan_unmap(a.ioas_id, e.iova, e.length)
                    .map_err(|e| e.index(i as u32))?;
                let s = if e.iova == 0 && e.length == u64::MAX {
                    Span::FULL
                } else {
                    Span::from_len(e.iova, e.length).unwrap_or(Span::FULL)
                };
                if spans[..i].iter().any(|o| o.overlaps(&s)) {
                    return Err(inval(reason::RANGES_OVERLAP).index(i as u32));
                }
                spans[i] = s;
            }
        }
        // Every entry's invalidations go into one batch: one round per IOMMU unit for the
        // whole call, run before returning (on an entry's error too). A failed round is EIO
        // at the last entry processed; `out_done` still counts the entries whose areas are
        // gone.
        let mut inv = HwInvalidation::new();
        let mut r = Ok(());
        for i in 0..n {
            let one = read_struct::<UnmapEntry>(mem, entry_at(i)).and_then(|e| {
                let bytes = self.unmap_recorded(a.ioas_id, e.iova, e.length, &mut inv)?;
                write_struct(
                    mem,
                    entry_at(i),
                    &UnmapEntry {
                        iova: e.iova,
                        length: bytes,
                    },
                )
            });
            match one {
                Ok(()) => a.out_done = i as u32 + 1,
                Err(e) => {
                    r = Err(e.index(i as u32));
                    break;
                }
            }
        }
        let last = a.out_done.min(a.num_entries.saturating_sub(1));
        match self.hw.flush(&mut inv) {
            Ok(()) => r,
            Err(_) => Err(Error::new(errno::EIO, reason::HW_FAULT).index(last)),
        }
    }

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
        src.covered(src_span, |_, area, piece| {
            let gpa = area.gpa + (piece.start - area.iova);
            if !mem.owns(gpa, piece.len(), prot & PROT_WRITE != 0) {
                return Err(Error::new(errno::EPERM, reason::GPA_NOT_OWNED).at(gpa));
            }
            first_gpa.get_or_insert(gpa);
            pieces += 1;
            Ok(())
        })?;
        if dst.areas.len() + pieces > dst.area_cap {
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
                match src.areas.get(src.first_from(cur)) {
                    Some(x) if x.iova <= cur => {
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
            if let Err(e) = self.install(mem, a.dst_ioas_id, dst_iova + off, gpa, n, prot) {
                result = Err(e);
                break;
            }
            off += n;
        }
        if let Err(e) = result {
            if off > 0 {
                let _ = self.unmap(a.dst_ioas_id, dst_iova, off);
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

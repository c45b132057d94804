//! HWPT: a hardware page table (one backend domain) mirroring one IOAS.
//!
//! * Created by HWPT_ALLOC / HWPT_CLONE ("manual": lives until DESTROY) or by attaching a
//!   device to an IOAS ("automatic": destroyed when its last attachment goes, never picked
//!   for a manual attach by ID unless named).
//! * Filled with every mapping of its IOAS before it is published; every later MAP/UNMAP of
//!   the IOAS is applied to it.
//! * Its flags are fixed at creation: ENFORCE_CACHE_COHERENCY (every DMA snoops; only devices
//!   that can enforce it may attach), DIRTY_TRACKING, NEST_PARENT.
//! * HWPT_CLONE makes a new HWPT of the same IOAS with other flags (e.g. without cache
//!   coherency for a device that cannot enforce it); with an atomic group REPLACE this is how
//!   a guest changes the coherency of a group's translation without a window.

use hvabi::{
    DIRTY_BITMAP_NO_CLEAR, DIRTY_TRACKING_ENABLE, HWPT_DATA_NONE, HWPT_DIRTY_TRACKING,
    HWPT_ENFORCE_CACHE_COHERENCY, HWPT_NEST_PARENT, HwptAlloc, HwptClone, HwptGetDirtyBitmap,
    HwptSetDirtyTracking, MAX_DIRTY_BITMAP_BITS, errno, kind, reason,
};

use super::hw::{DomainConfig, HwDev, HwDomain, Span};
use super::ioas::hw_map_range;
use super::marshal::{owns_array, reserved_nonzero};
use super::object::Object;
use super::{Cx, Error, GuestMemory, IommuHw, MAX_HWPTS_PER_IOAS, PAGE, hw_err, inval};

pub struct Hwpt {
    pub(crate) ioas: u32,
    pub(crate) domain: HwDomain,
    /// `HWPT_*` flags.
    pub(crate) flags: u32,
    pub(crate) auto: bool,
    /// Attachments: one per attached device (requester ID) and one per attached PASID.
    pub(crate) users: u32,
    pub(crate) dirty_enabled: bool,
    pub(crate) aperture: Span,
}

impl Hwpt {
    pub fn ioas(&self) -> u32 {
        self.ioas
    }
    pub fn domain(&self) -> HwDomain {
        self.domain
    }
    pub fn flags(&self) -> u32 {
        self.flags
    }
    pub fn is_auto(&self) -> bool {
        self.auto
    }
    pub fn users(&self) -> u32 {
        self.users
    }
    pub fn cc(&self) -> bool {
        self.flags & HWPT_ENFORCE_CACHE_COHERENCY != 0
    }
    pub fn dirty(&self) -> bool {
        self.flags & HWPT_DIRTY_TRACKING != 0
    }
    pub fn aperture(&self) -> Span {
        self.aperture
    }
}

const HWPT_FLAGS: u32 = HWPT_NEST_PARENT | HWPT_DIRTY_TRACKING | HWPT_ENFORCE_CACHE_COHERENCY;

pub(crate) fn flags_of(cfg: &DomainConfig) -> u32 {
    let mut f = 0;
    if cfg.enforce_cc {
        f |= HWPT_ENFORCE_CACHE_COHERENCY;
    }
    if cfg.dirty_tracking {
        f |= HWPT_DIRTY_TRACKING;
    }
    if cfg.nest_parent {
        f |= HWPT_NEST_PARENT;
    }
    f
}

impl<H: IommuHw> Cx<'_, H> {
    /// Creates a HWPT on IOAS `ioas_id` for hardware device `dev`, filled with every mapping of
    /// the IOAS, and links it to the IOAS. All or nothing.
    pub(crate) fn create_hwpt(
        &mut self,
        mem: &dyn GuestMemory,
        ioas_id: u32,
        dev: HwDev,
        cfg: DomainConfig,
        auto: bool,
    ) -> Result<u32, Error> {
        let ioas = self.g.ioas(ioas_id)?;
        if ioas.hwpts.len() >= MAX_HWPTS_PER_IOAS || ioas.hwpts.len() == ioas.hwpts.capacity() {
            return Err(Error::new(errno::ENOSPC, reason::HWPT_TABLE_FULL).obj(kind::IOAS, ioas_id));
        }
        let fail = self.fail;
        let slot = self.g.objs.reserve(|| !fail.is_some_and(|f| f.hit()))?;
        let d = self.hw.excl()?.domain_alloc(dev, cfg).map_err(hw_err)?;
        let r = self.fill(mem, ioas_id, d);
        let aperture = match r {
            Ok(a) => a,
            Err(e) => {
                if let Ok(hw) = self.hw.excl() {
                    hw.domain_free(d);
                }
                return Err(e);
            }
        };
        let id = self.g.objs.publish(
            slot,
            Object::Hwpt(Hwpt {
                ioas: ioas_id,
                domain: d,
                flags: flags_of(&cfg),
                auto,
                users: 0,
                dirty_enabled: false,
                aperture,
            }),
        );
        match self.g.ioas_mut(ioas_id) {
            Ok(ioas) => ioas.hwpts.push(id),
            Err(e) => {
                self.g.objs.unpublish(id);
                if let Ok(hw) = self.hw.excl() {
                    hw.domain_free(d);
                }
                return Err(e);
            }
        }
        Ok(id)
    }

    /// Checks a fresh domain against the IOAS (aperture) and maps every area into it. On error
    /// the caller frees the domain (which drops whatever was mapped).
    fn fill(&mut self, mem: &dyn GuestMemory, ioas_id: u32, d: HwDomain) -> Result<Span, Error> {
        let info = self
            .hw
            .domain_info(d)
            .ok_or(Error::new(errno::EIO, reason::HW_FAULT))?;
        let ioas = self.g.ioas(ioas_id)?;
        // The lowest area outside the aperture.
        let mut outside: Option<u64> = None;
        ioas.each_area(|a| {
            if !info.aperture.contains(&a.span()) && outside.is_none_or(|o| a.iova < o) {
                outside = Some(a.iova);
            }
            Ok(())
        })?;
        if let Some(iova) = outside {
            return Err(Error::new(errno::EADDRINUSE, reason::MAPPING_OUTSIDE_APERTURE).at(iova));
        }
        // The HWPT reserves the IOVA below and above its aperture; report the start of the
        // reserved range an allowed range falls in (hvabi `RESERVED_IN_ALLOWED`), not the
        // allowed range's.
        let below = (info.aperture.start > 0).then(|| Span::new(0, info.aperture.start - 1));
        let above =
            (info.aperture.last < u64::MAX).then(|| Span::new(info.aperture.last + 1, u64::MAX));
        for r in [below, above].into_iter().flatten() {
            if ioas.allowed.iter().any(|s| s.overlaps(&r)) {
                return Err(Error::new(errno::EADDRINUSE, reason::RESERVED_IN_ALLOWED).at(r.start));
            }
        }
        ioas.each_area(|a| hw_map_range(&*self.hw, mem, d, a.iova, a.gpa, a.len, a.hw_prot()))?;
        Ok(info.aperture)
    }

    /// Withdraws a HWPT created by a call that is failing (its ID's generation is kept).
    pub(crate) fn discard_hwpt(&mut self, id: u32) {
        if let Some(Object::Hwpt(h)) = self.g.objs.unpublish(id) {
            self.unlink(h.ioas, id);
            if let Ok(hw) = self.hw.excl() {
                hw.domain_free(h.domain);
            }
        }
    }

    /// Destroys a HWPT nothing is attached to.
    pub(crate) fn destroy_hwpt(&mut self, id: u32) {
        if let Some(Object::Hwpt(h)) = self.g.objs.remove(id) {
            self.unlink(h.ioas, id);
            if let Ok(hw) = self.hw.excl() {
                hw.domain_free(h.domain);
            }
        }
    }

    fn unlink(&mut self, ioas_id: u32, id: u32) {
        if let Ok(ioas) = self.g.ioas_mut(ioas_id) {
            ioas.hwpts.retain(|&h| h != id);
        }
    }

    fn hwpt_config(&self, flags: u32, dev_id: u32) -> Result<(HwDev, DomainConfig), Error> {
        if flags & !HWPT_FLAGS != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        let dev = self.g.device(dev_id)?;
        let cfg = DomainConfig {
            enforce_cc: flags & HWPT_ENFORCE_CACHE_COHERENCY != 0,
            dirty_tracking: flags & HWPT_DIRTY_TRACKING != 0,
            nest_parent: flags & HWPT_NEST_PARENT != 0,
        };
        if cfg.enforce_cc && !dev.info.enforce_cc {
            return Err(
                Error::new(errno::EMEDIUMTYPE, reason::CC_UNSUPPORTED_BY_DEVICE)
                    .obj(kind::DEVICE, dev_id),
            );
        }
        if cfg.dirty_tracking && !dev.info.dirty_tracking {
            return Err(
                Error::new(errno::EOPNOTSUPP, reason::DIRTY_UNSUPPORTED_BY_DEVICE)
                    .obj(kind::DEVICE, dev_id),
            );
        }
        Ok((dev.hw, cfg))
    }

    /// HWPT_ALLOC.
    pub(crate) fn hwpt_alloc(
        &mut self,
        mem: &dyn GuestMemory,
        a: &mut HwptAlloc,
    ) -> Result<(), Error> {
        if a.flags & !HWPT_FLAGS != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        if a.data_type != HWPT_DATA_NONE {
            return Err(Error::new(errno::EOPNOTSUPP, reason::DATA_TYPE_UNSUPPORTED));
        }
        if a.data_len != 0 || a.data_gpa != 0 {
            return Err(inval(reason::DATA_TYPE_UNSUPPORTED));
        }
        self.g.device(a.dev_id)?;
        match self.g.kind_of(a.pt_id)? {
            kind::IOAS => {}
            kind::HWPT => {
                return Err(Error::new(errno::EOPNOTSUPP, reason::NESTING_UNSUPPORTED)
                    .obj(kind::HWPT, a.pt_id));
            }
            k => return Err(inval(reason::WRONG_KIND).obj(k, a.pt_id)),
        }
        let (dev, cfg) = self.hwpt_config(a.flags, a.dev_id)?;
        a.out_hwpt_id = self.create_hwpt(mem, a.pt_id, dev, cfg, false)?;
        Ok(())
    }

    /// HWPT_CLONE.
    pub(crate) fn hwpt_clone(
        &mut self,
        mem: &dyn GuestMemory,
        a: &mut HwptClone,
    ) -> Result<(), Error> {
        if a.flags & !HWPT_FLAGS != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let ioas = self.g.hwpt(a.src_hwpt_id)?.ioas;
        let (dev, cfg) = self.hwpt_config(a.flags, a.dev_id)?;
        a.out_hwpt_id = self.create_hwpt(mem, ioas, dev, cfg, false)?;
        Ok(())
    }

    /// HWPT_SET_DIRTY_TRACKING.
    pub(crate) fn set_dirty_tracking(&mut self, a: &HwptSetDirtyTracking) -> Result<(), Error> {
        if a.flags & !DIRTY_TRACKING_ENABLE != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let h = self.g.hwpt(a.hwpt_id)?;
        if !h.dirty() {
            return Err(Error::new(
                errno::EOPNOTSUPP,
                reason::DIRTY_NOT_SUPPORTED_BY_HWPT,
            ));
        }
        let enable = a.flags & DIRTY_TRACKING_ENABLE != 0;
        self.hw
            .excl()?
            .set_dirty_tracking(h.domain, enable)
            .map_err(hw_err)?;
        self.g.hwpt_mut(a.hwpt_id)?.dirty_enabled = enable;
        Ok(())
    }

    /// HWPT_GET_DIRTY_BITMAP.
    pub(crate) fn get_dirty_bitmap(
        &mut self,
        mem: &dyn GuestMemory,
        a: &HwptGetDirtyBitmap,
    ) -> Result<(), Error> {
        if a.flags & !DIRTY_BITMAP_NO_CLEAR != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let h = self.g.hwpt(a.hwpt_id)?;
        if !h.dirty() {
            return Err(Error::new(
                errno::EOPNOTSUPP,
                reason::DIRTY_NOT_SUPPORTED_BY_HWPT,
            ));
        }
        let ps = a.page_size;
        if ps < PAGE || !ps.is_power_of_two() {
            return Err(inval(reason::BAD_PAGE_SIZE));
        }
        if a.length == 0 {
            return Err(inval(reason::ZERO_LENGTH));
        }
        if !a.iova.is_multiple_of(ps) || !a.length.is_multiple_of(ps) {
            return Err(inval(reason::MISALIGNED));
        }
        let span = Span::from_len(a.iova, a.length)
            .ok_or(Error::new(errno::EOVERFLOW, reason::OVERFLOW))?;
        let bits = a.length / ps;
        if bits > MAX_DIRTY_BITMAP_BITS {
            return Err(inval(reason::BITMAP_TOO_LARGE));
        }
        self.g
            .ioas(h.ioas)?
            .covered(span, |_, _| Ok(()))
            .map_err(|e| Error {
                errno: errno::EINVAL,
                ..e
            })?;
        let bytes = bits.div_ceil(8);
        if !owns_array(mem, a.bitmap_gpa, bytes) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let d = h.domain;
        let clear = a.flags & DIRTY_BITMAP_NO_CLEAR == 0;
        const CHUNK: u64 = 512;
        for c in 0..bytes.div_ceil(CHUNK) {
            let mut buf = [0u8; CHUNK as usize];
            let first_bit = c * CHUNK * 8;
            let nbits = (bits - first_bit).min(CHUNK * 8);
            let start = a.iova + first_bit * ps;
            let last = start + (nbits * ps - 1);
            let mut report = |di: u64, dl: u64| {
                let Some(dlast) = di.checked_add(dl.saturating_sub(1)) else {
                    return;
                };
                if dl == 0 || dlast < start || di > last {
                    return;
                }
                let b0 = (di.max(start) - start) / ps;
                let b1 = (dlast.min(last) - start) / ps;
                for b in b0..=b1.min(nbits - 1) {
                    buf[(b / 8) as usize] |= 1 << (b % 8);
                }
            };
            self.hw
                .excl()?
                .read_dirty(d, start, nbits * ps, clear, &mut report)
                .map_err(hw_err)?;
            let n = nbits.div_ceil(8) as usize;
            mem.write(a.bitmap_gpa + c * CHUNK, &buf[..n])
                .map_err(|_| Error::new(errno::EFAULT, reason::ARRAY_FAULT))?;
        }
        Ok(())
    }
}

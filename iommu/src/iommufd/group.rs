//! GROUP: the unit of isolation. Its devices share one translation in hardware, so the
//! object model keeps the attachment **on the group**:
//!
//! * `rid` is the HWPT every member's requester ID translates through (all members, in
//!   hardware), or `None`: every member's DMA is blocked.
//! * `attached` records which members the guest attached (bookkeeping: each holds a reference
//!   on the HWPT, and DEVICE_LIST reports it).
//!
//! Rules (see `docs/abi.md`):
//!
//! * The first member's ATTACH moves the whole group: every member is prepared, then every
//!   member is committed (see `hw.rs`), and the reserved regions of **every** member are
//!   enforced in the IOAS at that moment.
//! * Another member's ATTACH to the same page table (the same HWPT, or an IOAS the group's HWPT
//!   mirrors) only joins the bookkeeping; to a different one it fails with EXDEV.
//! * DETACH of a member is bookkeeping, until the last attached member leaves: then every
//!   member is blocked.
//! * REPLACE by any attached member moves the whole group, all or nothing: if any member's
//!   prepare fails, every prepared member is aborted and nothing changed (no member, no
//!   PASID, no HWPT, no reserved range).
//! * PASIDs are per device and refused in a group of more than one device.

use hvabi::{errno, kind, reason};

use super::device::Device;
use super::hw::{HwDev, HwDeviceInfo, HwDomain};
use super::ioas::{ResvBuf, ioas_reserved};
use super::object::Object;
use super::{Cx, Error, GuestMemory, IommuHw, MAX_GROUP_MEMBERS, MAX_PASIDS_PER_DEVICE, hw_err};

pub struct Group {
    pub(crate) hw_group: u32,
    pub(crate) members: [u32; MAX_GROUP_MEMBERS],
    pub(crate) n: u8,
    /// The HWPT the group's requester IDs translate through.
    pub(crate) rid: Option<u32>,
    /// Bit `i`: `members[i]` is attached (by its own ATTACH).
    pub(crate) attached: u8,
}

impl Group {
    pub fn members(&self) -> &[u32] {
        &self.members[..(self.n as usize).min(MAX_GROUP_MEMBERS)]
    }

    pub fn hw_group(&self) -> u32 {
        self.hw_group
    }

    pub fn rid(&self) -> Option<u32> {
        self.rid
    }

    pub fn attached_mask(&self) -> u8 {
        self.attached
    }

    pub(crate) fn index_of(&self, dev_id: u32) -> Option<usize> {
        self.members().iter().position(|&m| m == dev_id)
    }

    pub(crate) fn attached_count(&self) -> u32 {
        self.attached.count_ones()
    }

    pub(crate) fn is_attached(&self, dev_id: u32) -> bool {
        self.index_of(dev_id)
            .is_some_and(|i| self.attached & (1 << i) != 0)
    }
}

/// What a page-table switch targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// An IOAS: use (or make) an automatic HWPT on it.
    Ioas(u32),
    Hwpt(u32),
}

/// Creates the GROUP object and one DEVICE per member; returns the device IDs (in `hw_members`
/// order). On failure nothing is left.
pub(crate) fn create_group<H: IommuHw>(
    cx: Cx<'_, H>,
    hw_group: u32,
    hw_members: &[HwDev],
    infos: &[HwDeviceInfo],
) -> Result<[u32; MAX_GROUP_MEMBERS], Error> {
    let n = hw_members.len().min(MAX_GROUP_MEMBERS);
    let fail = cx.fail;
    let g = &mut *cx.g;
    let slot = g.objs.reserve(|| !fail.is_some_and(|f| f.hit()))?;
    let gid = g.objs.publish(
        slot,
        Object::Group(Group {
            hw_group,
            members: [0; MAX_GROUP_MEMBERS],
            n: 0,
            rid: None,
            attached: 0,
        }),
    );
    let mut ids = [0u32; MAX_GROUP_MEMBERS];
    for i in 0..n {
        let slot = match g.objs.reserve(|| !fail.is_some_and(|f| f.hit())) {
            Ok(s) => s,
            Err(e) => {
                for &id in &ids[..i] {
                    g.objs.unpublish(id);
                }
                g.objs.unpublish(gid);
                return Err(e);
            }
        };
        ids[i] = g.objs.publish(
            slot,
            Object::Device(Device {
                hw: hw_members[i],
                info: infos[i],
                group: gid,
                pasids: [None; MAX_PASIDS_PER_DEVICE],
            }),
        );
    }
    if let Ok(gr) = g.group_mut(gid) {
        gr.members = ids;
        gr.n = n as u8;
    }
    Ok(ids)
}

/// Removes `hw_dev`'s group and its devices. EBUSY if anything is attached.
pub(crate) fn destroy_group<H: IommuHw>(
    cx: Cx<'_, H>,
    hw_dev: HwDev,
) -> Result<[Option<HwDev>; MAX_GROUP_MEMBERS], Error> {
    let g = &mut *cx.g;
    let dev_id =
        super::device::find_device(g, hw_dev).ok_or(Error::new(errno::ENOENT, reason::BAD_ID))?;
    let gid = g.device(dev_id)?.group;
    let gr = g.group(gid)?;
    if let Some(h) = gr.rid {
        return Err(Error::new(errno::EBUSY, reason::BUSY).obj(kind::HWPT, h));
    }
    let mut hw = [None; MAX_GROUP_MEMBERS];
    for (i, &m) in gr.members().iter().enumerate() {
        let d = g.device(m)?;
        if let Some(p) = d.pasids.iter().flatten().next() {
            return Err(Error::new(errno::EBUSY, reason::BUSY).obj(kind::HWPT, p.hwpt));
        }
        hw[i] = Some(d.hw);
    }
    let members = gr.members;
    let n = gr.n as usize;
    for &m in &members[..n.min(MAX_GROUP_MEMBERS)] {
        g.objs.remove(m);
    }
    g.objs.remove(gid);
    Ok(hw)
}

impl<H: IommuHw> Cx<'_, H> {
    /// An attach target: an IOAS or a HWPT (EINVAL for another kind, ENOENT for no object).
    pub(crate) fn resolve_target(&self, pt_id: u32) -> Result<Target, Error> {
        match self.g.kind_of(pt_id)? {
            kind::IOAS => Ok(Target::Ioas(pt_id)),
            kind::HWPT => Ok(Target::Hwpt(pt_id)),
            k => Err(Error::new(errno::EINVAL, reason::WRONG_KIND).obj(k, pt_id)),
        }
    }

    /// An automatic HWPT of `ioas_id` every one of `infos`/`hws` can use.
    fn find_auto(&self, ioas_id: u32, hws: &[HwDev], infos: &[HwDeviceInfo]) -> Option<u32> {
        let ioas = self.g.ioas(ioas_id).ok()?;
        ioas.hwpts.iter().copied().find(|&h| {
            let Ok(hwpt) = self.g.hwpt(h) else {
                return false;
            };
            hwpt.auto
                && infos
                    .iter()
                    .all(|i| (i.enforce_cc || !hwpt.cc()) && (i.dirty_tracking || !hwpt.dirty()))
                && hws
                    .iter()
                    .all(|&d| self.hw.compatible(d, hwpt.domain).is_ok())
        })
    }

    /// Checks that every member can use HWPT `new`: cache coherency, dirty tracking, the
    /// hardware's own compatibility rules, and the reserved regions of every member against
    /// the IOAS's mappings and allowed ranges. Changes nothing.
    fn check_switch(
        &self,
        members: &[u32],
        hws: &[HwDev],
        infos: &[HwDeviceInfo],
        new: u32,
    ) -> Result<(), Error> {
        let h = self.g.hwpt(new)?;
        for (i, info) in infos.iter().enumerate() {
            let dev = |e: Error| e.obj(kind::DEVICE, members[i]);
            if h.cc() && !info.enforce_cc {
                return Err(dev(Error::new(
                    errno::EMEDIUMTYPE,
                    reason::CC_UNSUPPORTED_BY_DEVICE,
                )));
            }
            if h.dirty() && !info.dirty_tracking {
                return Err(dev(Error::new(
                    errno::EINVAL,
                    reason::DIRTY_UNSUPPORTED_BY_DEVICE,
                )));
            }
            self.hw
                .compatible(hws[i], h.domain)
                .map_err(|e| dev(hw_err(e)))?;
        }
        let ioas = self.g.ioas(h.ioas)?;
        let mut mine = ResvBuf::new();
        for info in infos {
            mine.add_device(info)?;
        }
        for r in mine.spans() {
            if let Some(a) = ioas.first_overlap(*r) {
                return Err(
                    Error::new(errno::EADDRINUSE, reason::RESERVED_OVERLAPS_MAPPING).at(a.iova),
                );
            }
            if ioas.allowed.iter().any(|al| al.overlaps(r)) {
                return Err(Error::new(errno::EADDRINUSE, reason::RESERVED_IN_ALLOWED).at(r.start));
            }
        }
        // The IOAS's reserved set must stay representable with the group in it.
        let mut all = ResvBuf::new();
        ioas_reserved(self.g, h.ioas, infos, &mut all)
    }

    /// Prepares every member for domain `d`, then commits them all; on a prepare failure
    /// aborts every prepared member and changes nothing. `Ok(true)`: switched, but a commit
    /// reported a hardware malfunction.
    fn hw_switch(
        &mut self,
        members: &[u32],
        hws: &[HwDev],
        pasid: Option<u32>,
        d: HwDomain,
    ) -> Result<bool, Error> {
        let mut prepared: [Option<H::Prepared>; MAX_GROUP_MEMBERS] = core::array::from_fn(|_| None);
        for (i, &dev) in hws.iter().enumerate() {
            match self.hw.excl()?.prepare(dev, pasid, d) {
                Ok(p) => prepared[i] = Some(p),
                Err(e) => {
                    for p in prepared.iter_mut() {
                        if let Some(p) = p.take()
                            && let Ok(hw) = self.hw.excl()
                        {
                            hw.abort(p);
                        }
                    }
                    return Err(hw_err(e).obj(kind::DEVICE, members[i]));
                }
            }
        }
        let mut fault = false;
        for p in prepared.iter_mut() {
            if let Some(p) = p.take() {
                fault |= self.hw.excl()?.commit(p).is_err();
            }
        }
        Ok(fault)
    }

    /// Moves `members` (with `pasid`: exactly one device) from HWPT `old` (`None`: blocked) to
    /// the page table `target` names, all or nothing. With an IOAS target, reuses the current
    /// HWPT if it mirrors that IOAS, else a compatible automatic HWPT of it, else makes one
    /// (enforcing cache coherency iff every member can). Returns the HWPT now used and whether
    /// the hardware reported a malfunction while committing (the switch was made).
    ///
    /// Bookkeeping (group `rid`, PASID slots, `users`) is the caller's.
    pub(crate) fn switch_to(
        &mut self,
        mem: &dyn GuestMemory,
        members: &[u32],
        pasid: Option<u32>,
        target: Target,
        old: Option<u32>,
    ) -> Result<(u32, bool), Error> {
        let n = members.len().min(MAX_GROUP_MEMBERS);
        let members = &members[..n];
        let mut hws = [0 as HwDev; MAX_GROUP_MEMBERS];
        let mut infos = [HwDeviceInfo::default(); MAX_GROUP_MEMBERS];
        for (i, &m) in members.iter().enumerate() {
            let d = self.g.device(m)?;
            hws[i] = d.hw;
            infos[i] = d.info;
        }
        let (hws, infos) = (&hws[..n], &infos[..n]);
        let (new, created) = match target {
            Target::Hwpt(h) => (h, false),
            Target::Ioas(i) => {
                let current = old.filter(|&o| self.g.hwpt(o).is_ok_and(|h| h.ioas == i));
                if let Some(o) = current {
                    (o, false)
                } else if let Some(h) = self.find_auto(i, hws, infos) {
                    (h, false)
                } else {
                    let cfg = super::hw::DomainConfig {
                        enforce_cc: infos.iter().all(|i| i.enforce_cc),
                        dirty_tracking: false,
                        nest_parent: false,
                    };
                    let first = hws.first().copied().unwrap_or(0);
                    (self.create_hwpt(mem, i, first, cfg, true)?, true)
                }
            }
        };
        if Some(new) == old {
            return Ok((new, false));
        }
        let r = self.check_switch(members, hws, infos, new).and_then(|()| {
            let d = self.g.hwpt(new)?.domain;
            self.hw_switch(members, hws, pasid, d)
        });
        match r {
            Ok(fault) => Ok((new, fault)),
            Err(e) => {
                if created {
                    self.discard_hwpt(new);
                }
                Err(e)
            }
        }
    }
}

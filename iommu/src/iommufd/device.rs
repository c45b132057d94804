//! DEVICE: one assigned device. Its requester-ID attachment lives on its GROUP (see
//! `group.rs`); its PASID attachments live here.
//!
//! PASID is a per-device attribute: PASID `p` is valid for a device with `pasid_bits = b > 0`
//! iff `1 <= p < 2^b` (0 is the requester ID itself). PASID attach is refused (EPERM) in a
//! group of more than one device, whose members cannot be told apart by the IOMMU.

use hvabi::{
    ATTACH_PASID, DEVICE_DIRTY_TRACKING, DEVICE_ENFORCE_CACHE_COHERENCY, DEVICE_GROUP_ATTACHED,
    DEVICE_PASID, DeviceAttach, DeviceDetach, DeviceEntry, DeviceList, DeviceReservedRanges,
    ReservedRange, errno, kind, reason, resv,
};

use super::group::{Group, Target};
use super::hw::{HwDev, HwDeviceInfo};
use super::marshal::{owns_array, reserved_nonzero, write_struct};
use super::object::{Guest, Object};
use super::{Cx, Error, GuestMemory, IommuHw, MAX_GROUP_MEMBERS, MAX_PASIDS_PER_DEVICE, inval};

/// One attached PASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidAttach {
    pub pasid: u32,
    pub hwpt: u32,
}

pub struct Device {
    pub(crate) hw: HwDev,
    pub(crate) info: HwDeviceInfo,
    pub(crate) group: u32,
    pub(crate) pasids: [Option<PasidAttach>; MAX_PASIDS_PER_DEVICE],
}

impl Device {
    pub fn hw(&self) -> HwDev {
        self.hw
    }
    pub fn info(&self) -> &HwDeviceInfo {
        &self.info
    }
    pub fn group(&self) -> u32 {
        self.group
    }
    pub fn pasids(&self) -> impl Iterator<Item = PasidAttach> + '_ {
        self.pasids.iter().flatten().copied()
    }
    fn pasid_slot(&self, p: u32) -> Option<usize> {
        self.pasids
            .iter()
            .position(|x| x.is_some_and(|x| x.pasid == p))
    }
}

/// The DEVICE ID of hardware device `hw` in `g`.
pub(crate) fn find_device(g: &Guest, hw: HwDev) -> Option<u32> {
    g.objs.iter().find_map(|(id, o)| match o {
        Object::Device(d) if d.hw == hw => Some(id),
        _ => None,
    })
}

const ATTACH_FLAGS: u32 = ATTACH_PASID;

/// A PASID value `dev` can have: `1 <= p < 2^pasid_bits`.
fn check_pasid_value(dev: &Device, p: u32) -> Result<(), Error> {
    let bits = dev.info.pasid_bits.min(20);
    if bits == 0 {
        return Err(Error::new(errno::EOPNOTSUPP, reason::PASID_UNSUPPORTED));
    }
    if p == 0 {
        return Err(inval(reason::PASID_ZERO));
    }
    if p >= 1 << bits {
        return Err(Error::new(errno::ERANGE, reason::PASID_OUT_OF_RANGE).at(p as u64));
    }
    Ok(())
}

impl<H: IommuHw> Cx<'_, H> {
    /// Validates a PASID for `dev` in `group`.
    fn check_pasid(&self, dev: &Device, group: &Group, p: u32) -> Result<(), Error> {
        check_pasid_value(dev, p)?;
        if group.n > 1 {
            return Err(Error::new(errno::EPERM, reason::PASID_MULTI_DEVICE_GROUP)
                .obj(kind::GROUP, dev.group));
        }
        Ok(())
    }

    /// Drops an automatic HWPT nothing uses any more.
    pub(crate) fn release_if_auto(&mut self, h: u32) {
        if self.g.hwpt(h).is_ok_and(|x| x.auto && x.users == 0) {
            self.destroy_hwpt(h);
        }
    }

    fn hwpt_users(&mut self, h: u32, delta: i64) {
        if let Ok(x) = self.g.hwpt_mut(h) {
            x.users = (x.users as i64 + delta).max(0) as u32;
        }
    }

    /// DEVICE_ATTACH (`replace = false`) and DEVICE_REPLACE.
    pub(crate) fn device_attach(
        &mut self,
        mem: &dyn GuestMemory,
        a: &mut DeviceAttach,
        replace: bool,
    ) -> Result<(), Error> {
        if a.flags & !ATTACH_FLAGS != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let pasid = (a.flags & ATTACH_PASID != 0).then_some(a.pasid);
        if pasid.is_none() && a.pasid != 0 {
            return Err(reserved_nonzero());
        }
        if self.g.access(a.dev_id).is_ok() {
            if pasid.is_some() {
                return Err(inval(reason::ACCESS_TARGET));
            }
            match self.g.kind_of(a.pt_id)? {
                kind::IOAS => {}
                k => return Err(inval(reason::ACCESS_TARGET).obj(k, a.pt_id)),
            }
            return if replace {
                self.access_replace(a.dev_id, a.pt_id)
            } else {
                self.access_attach(a.dev_id, a.pt_id)
            };
        }
        let dev = self.g.device(a.dev_id)?;
        let target = self.resolve_target(a.pt_id)?;
        let group_id = dev.group;
        let group = self.g.group(group_id)?;
        let (new, fault) = match pasid {
            Some(p) => {
                self.check_pasid(dev, group, p)?;
                let slot = dev.pasid_slot(p);
                let old = slot.and_then(|i| dev.pasids[i]).map(|x| x.hwpt);
                let slot = if replace {
                    slot.ok_or(inval(reason::NOT_ATTACHED))?
                } else {
                    if old.is_some() {
                        return Err(Error::new(errno::EBUSY, reason::ALREADY_ATTACHED));
                    }
                    dev.pasids
                        .iter()
                        .position(Option::is_none)
                        .ok_or(Error::new(errno::ENOSPC, reason::PASID_TABLE_FULL))?
                };
                let (new, fault) = self.switch_to(mem, &[a.dev_id], Some(p), target, old)?;
                if Some(new) != old {
                    self.g.device_mut(a.dev_id)?.pasids[slot] = Some(PasidAttach {
                        pasid: p,
                        hwpt: new,
                    });
                    self.hwpt_users(new, 1);
                    if let Some(o) = old {
                        self.hwpt_users(o, -1);
                        self.release_if_auto(o);
                    }
                }
                (new, fault)
            }
            None => {
                let idx = group
                    .index_of(a.dev_id)
                    .ok_or(Error::new(errno::EIO, reason::HW_FAULT))?;
                let bit = 1u8 << idx;
                let me = group.attached & bit != 0;
                let members = group.members;
                let n = (group.n as usize).min(MAX_GROUP_MEMBERS);
                let current = group.rid;
                if !replace {
                    if me {
                        return Err(Error::new(errno::EBUSY, reason::ALREADY_ATTACHED));
                    }
                    if let Some(h) = current {
                        let same = match target {
                            Target::Hwpt(t) => t == h,
                            Target::Ioas(i) => self.g.hwpt(h)?.ioas == i,
                        };
                        if !same {
                            return Err(Error::new(errno::EXDEV, reason::GROUP_ATTACHED_ELSEWHERE)
                                .obj(kind::HWPT, h));
                        }
                        // The group already translates through `h`: bookkeeping only.
                        self.g.group_mut(group_id)?.attached |= bit;
                        self.hwpt_users(h, 1);
                        a.pt_id = h;
                        return Ok(());
                    }
                    let (new, fault) = self.switch_to(mem, &members[..n], None, target, None)?;
                    let gr = self.g.group_mut(group_id)?;
                    gr.rid = Some(new);
                    gr.attached = bit;
                    self.hwpt_users(new, 1);
                    (new, fault)
                } else {
                    if !me {
                        return Err(inval(reason::NOT_ATTACHED));
                    }
                    let (new, fault) = self.switch_to(mem, &members[..n], None, target, current)?;
                    if Some(new) != current {
                        let gr = self.g.group_mut(group_id)?;
                        let k = gr.attached_count() as i64;
                        gr.rid = Some(new);
                        self.hwpt_users(new, k);
                        if let Some(o) = current {
                            self.hwpt_users(o, -k);
                            self.release_if_auto(o);
                        }
                    }
                    (new, fault)
                }
            }
        };
        a.pt_id = new;
        if fault {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(())
    }

    /// DEVICE_DETACH. Detaching what is not attached is a no-op.
    pub(crate) fn device_detach(&mut self, a: &DeviceDetach) -> Result<(), Error> {
        if a.flags & !ATTACH_FLAGS != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        let pasid = (a.flags & ATTACH_PASID != 0).then_some(a.pasid);
        if pasid.is_none() && a.pasid != 0 {
            return Err(reserved_nonzero());
        }
        if self.g.access(a.dev_id).is_ok() {
            if pasid.is_some() {
                return Err(inval(reason::ACCESS_TARGET));
            }
            return self.access_detach(a.dev_id);
        }
        let dev = self.g.device(a.dev_id)?;
        let hw = dev.hw;
        let group_id = dev.group;
        let group = self.g.group(group_id)?;
        let mut fault = false;
        match pasid {
            Some(p) => {
                check_pasid_value(dev, p)?;
                let Some(slot) = dev.pasid_slot(p) else {
                    return Ok(());
                };
                let Some(old) = dev.pasids[slot] else {
                    return Ok(());
                };
                fault |= self.hw.excl()?.detach(hw, Some(p)).is_err();
                self.g.device_mut(a.dev_id)?.pasids[slot] = None;
                self.hwpt_users(old.hwpt, -1);
                self.release_if_auto(old.hwpt);
            }
            None => {
                let Some(idx) = group.index_of(a.dev_id) else {
                    return Ok(());
                };
                let bit = 1u8 << idx;
                let Some(h) = group.rid.filter(|_| group.attached & bit != 0) else {
                    return Ok(());
                };
                let members = group.members;
                let n = (group.n as usize).min(MAX_GROUP_MEMBERS);
                let gr = self.g.group_mut(group_id)?;
                gr.attached &= !bit;
                let last = gr.attached == 0;
                if last {
                    gr.rid = None;
                    for &m in &members[..n] {
                        if let Ok(d) = self.g.device(m) {
                            fault |= self.hw.excl()?.detach(d.hw, None).is_err();
                        }
                    }
                }
                self.hwpt_users(h, -1);
                self.release_if_auto(h);
            }
        }
        if fault {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(())
    }

    /// DEVICE_LIST.
    pub(crate) fn device_list(
        &mut self,
        mem: &dyn GuestMemory,
        a: &mut DeviceList,
    ) -> Result<(), Error> {
        if a.flags != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let cap = a.num_devices as usize;
        if cap != 0 && !owns_array(mem, a.devices_gpa, (cap * DeviceEntry::SIZE) as u64) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let mut count = 0usize;
        for (id, o) in self.g.objs.iter() {
            let Object::Device(d) = o else { continue };
            if count < cap {
                let group = self.g.group(d.group)?;
                let mut flags = 0;
                if d.info.enforce_cc {
                    flags |= DEVICE_ENFORCE_CACHE_COHERENCY;
                }
                if d.info.dirty_tracking {
                    flags |= DEVICE_DIRTY_TRACKING;
                }
                if d.info.pasid_bits != 0 {
                    flags |= DEVICE_PASID;
                }
                if group.rid.is_some() {
                    flags |= DEVICE_GROUP_ATTACHED;
                }
                let e = DeviceEntry {
                    dev_id: id,
                    group_id: d.group,
                    flags,
                    pasid_bits: d.info.pasid_bits as u32,
                    hw_id: d.info.hw_id,
                    attached_hwpt: if group.is_attached(id) {
                        group.rid.unwrap_or(0)
                    } else {
                        0
                    },
                    group_members: group.n as u32,
                };
                write_struct(mem, a.devices_gpa + (count * DeviceEntry::SIZE) as u64, &e)?;
            }
            count += 1;
        }
        a.num_devices = count as u32;
        if count > cap {
            return Err(Error::new(errno::EMSGSIZE, reason::TOO_MANY));
        }
        Ok(())
    }

    /// DEVICE_RESERVED_RANGES: every member's reserved regions and the IOVA outside its
    /// aperture, unmerged, each tagged with its member.
    pub(crate) fn device_reserved_ranges(
        &mut self,
        mem: &dyn GuestMemory,
        a: &mut DeviceReservedRanges,
    ) -> Result<(), Error> {
        if a.flags != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        let dev = self.g.device(a.dev_id)?;
        let group = self.g.group(dev.group)?;
        let cap = a.num_ranges as usize;
        if cap != 0 && !owns_array(mem, a.ranges_gpa, (cap * ReservedRange::SIZE) as u64) {
            return Err(Error::new(errno::EFAULT, reason::ARRAY_FAULT));
        }
        let mut count = 0usize;
        for &m in group.members() {
            let info = self.g.device(m)?.info;
            let mut emit = |start: u64, last: u64, k: u32| -> Result<(), Error> {
                if count < cap {
                    let r = ReservedRange {
                        start,
                        last,
                        kind: k,
                        dev_id: m,
                    };
                    write_struct(mem, a.ranges_gpa + (count * ReservedRange::SIZE) as u64, &r)?;
                }
                count += 1;
                Ok(())
            };
            for r in info.reserved() {
                emit(r.span.start, r.span.last, r.kind)?;
            }
            if info.aperture.start > 0 {
                emit(0, info.aperture.start - 1, resv::APERTURE)?;
            }
            if info.aperture.last < u64::MAX {
                emit(info.aperture.last + 1, u64::MAX, resv::APERTURE)?;
            }
        }
        a.num_ranges = count as u32;
        if count > cap {
            return Err(Error::new(errno::EMSGSIZE, reason::TOO_MANY));
        }
        Ok(())
    }
}

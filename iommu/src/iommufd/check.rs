//! Consistency checker and state snapshots, for tests, the fail-nth sweep and the fuzzer.
//!
//! [`check`] verifies every invariant the object model promises, across the objects, the
//! page tables and the hardware:
//!
//! * objects: IDs resolve to the right kinds; every reference counter (`Ioas::hwpts`,
//!   `Ioas::accesses`, `Hwpt::users`, area pins) equals a recount; automatic HWPTs are in use;
//! * IOAS: mappings sorted, disjoint, page aligned, within capacity; outside the reserved set
//!   (apertures of its HWPTs, reserved regions and apertures of every attached device); the
//!   allowed list sorted, disjoint and outside the reserved set;
//! * HWPT ↔ page table: the domain maps exactly the IOAS's mappings (byte count, and leaf by
//!   leaf: output address = the guest's host address, permissions, snoop bit = coherency);
//! * groups and hardware: every member of an attached group translates through the group's
//!   HWPT, every member of a detached group and every unassigned device is blocked, every
//!   attached PASID translates through its HWPT — as the hardware's own entries say (context
//!   and PASID entries, STEs, for every DMA alias: [`IommuHw::device_domain`] reads them
//!   back), not as the backend's record of attachments says; a coherent HWPT has only
//!   coherent devices; PASIDs only in single-device groups and within the device's width;
//! * leaks: the backend's live domains are exactly the HWPTs, no prepared switch is pending.
//!
//! [`snapshot`] serialises the logical state (objects with their generations, mappings,
//! attachments, hardware translation state) so that a test can assert that a failed call
//! changed nothing.

use alloc::vec::Vec;

use super::ioas::{AreaState, PROT_READ, PROT_WRITE, ResvBuf, first_overlap, ioas_reserved};
use super::object::{Guest, Object};
use super::{GuestId, GuestMemory, IommuHw, Iommufd, PAGE};

/// A broken invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    pub what: &'static str,
    pub guest: GuestId,
    pub id: u32,
    pub value: u64,
}

fn v(what: &'static str, guest: GuestId, id: u32, value: u64) -> Violation {
    Violation {
        what,
        guest,
        id,
        value,
    }
}

/// Checks every invariant. `mems` gives the memory of the guests whose mappings should be
/// checked down to host addresses (others are checked without it).
pub fn check<H: IommuHw>(
    fd: &Iommufd<H>,
    mems: &[(GuestId, &dyn GuestMemory)],
) -> Result<(), Violation> {
    // Every guest's gate, then the hardware's: the order control operations take them in.
    let guests: Vec<_> = fd
        .guests
        .iter()
        .map(|g| g.as_ref().map(|g| g.gate.write()))
        .collect();
    let hw = fd.hw.write();
    let hw = &*hw;
    let mut hwpts_total = 0u32;
    let mut domains = Vec::new();
    for (gid, g) in guests.iter().enumerate() {
        let Some(g) = g.as_deref() else { continue };
        let gid = gid as GuestId;
        let mem = mems.iter().find(|(id, _)| *id == gid).map(|(_, m)| *m);
        let mut owned = 0u32;
        for (id, o) in g.objs.iter() {
            match o {
                Object::Ioas(_) => check_ioas(g, gid, id)?,
                Object::Hwpt(_) => {
                    hwpts_total += 1;
                    let d = check_hwpt(hw, g, gid, id, mem)?;
                    if domains.contains(&d) {
                        return Err(v("two HWPTs share a domain", gid, id, d.0 as u64));
                    }
                    domains.push(d);
                }
                Object::Group(_) => check_group(hw, g, gid, id)?,
                Object::Device(d) => {
                    owned += 1;
                    check_device(hw, g, gid, id)?;
                    if fd.devs.get(d.hw as usize).and_then(|s| s.owner) != Some(gid) {
                        return Err(v("device object of a device not owned", gid, id, 0));
                    }
                }
                Object::Access(a) => {
                    if let Some(i) = a.ioas
                        && g.ioas(i).is_err()
                    {
                        return Err(v("access attached to a missing IOAS", gid, id, i as u64));
                    }
                    if a.ioas.is_none() && a.pins().next().is_some() {
                        return Err(v("pins without an IOAS", gid, id, 0));
                    }
                }
            }
        }
        let expected = fd.devs.iter().filter(|d| d.owner == Some(gid)).count() as u32;
        if owned != expected {
            return Err(v("owned devices without objects", gid, 0, expected as u64));
        }
    }
    for (i, d) in fd.devs.iter().enumerate() {
        if d.owner.is_none() && hw.device_domain(i as u32, None).is_some() {
            return Err(v("unassigned device not blocked", 0, 0, i as u64));
        }
    }
    if let Some(n) = hw.live_domains()
        && n != hwpts_total
    {
        return Err(v("backend domains != HWPT objects", 0, 0, n as u64));
    }
    if let Some(n) = hw.outstanding_prepared()
        && n != 0
    {
        return Err(v("prepared switch left pending", 0, 0, n as u64));
    }
    Ok(())
}

fn check_ioas(g: &Guest, gid: GuestId, id: u32) -> Result<(), Violation> {
    let ioas = g.ioas(id).map_err(|_| v("ioas lookup", gid, id, 0))?;
    let areas = ioas.areas();
    if areas.len() > ioas.area_cap {
        return Err(v("areas over capacity", gid, id, areas.len() as u64));
    }
    let mut prev: Option<u64> = None;
    for a in areas.iter() {
        if a.state != AreaState::Live {
            // Every MAP/UNMAP has finished: a claim left behind is a leak of IOVA space.
            return Err(v("area left claimed", gid, id, a.iova));
        }
        if a.len == 0 || a.iova % PAGE != 0 || a.len % PAGE != 0 || a.gpa % PAGE != 0 {
            return Err(v("area misaligned or empty", gid, id, a.iova));
        }
        if a.iova.checked_add(a.len - 1).is_none() || a.gpa.checked_add(a.len - 1).is_none() {
            return Err(v("area overflows", gid, id, a.iova));
        }
        if a.prot & !(PROT_READ | PROT_WRITE) != 0 || a.prot == 0 {
            return Err(v("area protection", gid, id, a.iova));
        }
        if prev.is_some_and(|p| a.iova <= p) {
            return Err(v("areas unsorted or overlapping", gid, id, a.iova));
        }
        prev = Some(a.last());
    }
    for w in ioas.allowed.windows(2) {
        if w[0].last >= w[1].start {
            return Err(v(
                "allowed list unsorted or overlapping",
                gid,
                id,
                w[1].start,
            ));
        }
    }
    for (i, &h) in ioas.hwpts.iter().enumerate() {
        match g.hwpt(h) {
            Ok(x) if x.ioas == id => {}
            _ => return Err(v("IOAS lists a HWPT not on it", gid, id, h as u64)),
        }
        if ioas.hwpts[..i].contains(&h) {
            return Err(v("HWPT listed twice", gid, id, h as u64));
        }
    }
    let mut accesses = 0;
    for (_, o) in g.objs.iter() {
        match o {
            Object::Hwpt(h) if h.ioas == id => {}
            Object::Access(a) if a.ioas == Some(id) => accesses += 1,
            _ => continue,
        }
    }
    for (hid, o) in g.objs.iter() {
        if let Object::Hwpt(h) = o
            && h.ioas == id
            && !ioas.hwpts.contains(&hid)
        {
            return Err(v("HWPT not listed by its IOAS", gid, id, hid as u64));
        }
    }
    if accesses != ioas.accesses {
        return Err(v("IOAS access count", gid, id, ioas.accesses as u64));
    }
    for a in areas.iter() {
        let mut pins = 0;
        for (_, o) in g.objs.iter() {
            if let Object::Access(x) = o
                && x.ioas == Some(id)
            {
                pins += x.pins().filter(|p| p.overlaps(&a.span())).count() as u32;
            }
        }
        if pins != a.pins {
            return Err(v("area pin count", gid, id, a.iova));
        }
    }
    let mut resv = ResvBuf::new();
    ioas_reserved(g, id, &[], &mut resv).map_err(|_| v("reserved set overflow", gid, id, 0))?;
    if ioas.reserved() != Ok(&resv) {
        return Err(v("cached reserved set stale", gid, id, 0));
    }
    for r in resv.spans() {
        if let Some(a) = first_overlap(&areas, *r) {
            return Err(v("mapping inside the reserved set", gid, id, a.iova));
        }
        if let Some(al) = ioas.allowed.iter().find(|al| al.overlaps(r)) {
            return Err(v(
                "allowed range inside the reserved set",
                gid,
                id,
                al.start,
            ));
        }
    }
    Ok(())
}

fn check_hwpt<H: IommuHw>(
    hw: &H,
    g: &Guest,
    gid: GuestId,
    id: u32,
    mem: Option<&dyn GuestMemory>,
) -> Result<super::HwDomain, Violation> {
    let h = g.hwpt(id).map_err(|_| v("hwpt lookup", gid, id, 0))?;
    let ioas = g
        .ioas(h.ioas)
        .map_err(|_| v("HWPT on a missing IOAS", gid, id, h.ioas as u64))?;
    let mut users = 0;
    for (_, o) in g.objs.iter() {
        match o {
            Object::Group(gr) if gr.rid == Some(id) => users += gr.attached_count(),
            Object::Device(d) => users += d.pasids().filter(|p| p.hwpt == id).count() as u32,
            _ => {}
        }
    }
    if users != h.users {
        return Err(v("HWPT user count", gid, id, h.users as u64));
    }
    if h.auto && h.users == 0 {
        return Err(v("unused automatic HWPT", gid, id, 0));
    }
    let info =
        hw.domain_info(h.domain)
            .ok_or(v("HWPT without a domain", gid, id, h.domain.0 as u64))?;
    if info.aperture != h.aperture {
        return Err(v("HWPT aperture", gid, id, info.aperture.last));
    }
    let areas = ioas.areas();
    let total: u64 = areas.iter().map(|a| a.len).sum();
    let mapped = hw.mapped_bytes(h.domain);
    if mapped != total {
        return Err(v("domain maps other bytes than the IOAS", gid, id, mapped));
    }
    for a in areas.iter() {
        let mut cursor = a.iova;
        for _ in 0..=a.len / PAGE {
            if cursor > a.last() {
                break;
            }
            let t = hw.translate(h.domain, cursor).ok_or(v(
                "IOAS mapping missing in domain",
                gid,
                id,
                cursor,
            ))?;
            if t.leaf.start != cursor || t.leaf.last > a.last() {
                return Err(v("domain leaf crosses a mapping", gid, id, cursor));
            }
            if t.read != (a.prot & PROT_READ != 0) || t.write != (a.prot & PROT_WRITE != 0) {
                return Err(v("domain leaf permissions", gid, id, cursor));
            }
            if t.snoop.is_some_and(|s| s != h.cc()) {
                return Err(v("domain leaf snoop != HWPT coherency", gid, id, cursor));
            }
            if let Some(mem) = mem {
                let gpa = a.gpa + (cursor - a.iova);
                let run = mem.translate(gpa).ok_or(v(
                    "mapped guest memory has no host address",
                    gid,
                    id,
                    gpa,
                ))?;
                if run.hpa != t.pa || run.len < t.leaf.len() {
                    return Err(v("domain leaf output address", gid, id, cursor));
                }
            }
            match t.leaf.last.checked_add(1) {
                Some(n) => cursor = n,
                None => break,
            }
        }
    }
    Ok(h.domain)
}

fn check_group<H: IommuHw>(hw: &H, g: &Guest, gid: GuestId, id: u32) -> Result<(), Violation> {
    let gr = g.group(id).map_err(|_| v("group lookup", gid, id, 0))?;
    let n = gr.members().len();
    if n == 0 {
        return Err(v("empty group", gid, id, 0));
    }
    if n < 8 && gr.attached >> n != 0 {
        return Err(v("attached bit of no member", gid, id, gr.attached as u64));
    }
    if gr.rid.is_some() != (gr.attached != 0) {
        return Err(v("group attachment vs attached members", gid, id, 0));
    }
    let target = match gr.rid {
        Some(h) => {
            let x = g
                .hwpt(h)
                .map_err(|_| v("group on a missing HWPT", gid, id, h as u64))?;
            Some(x)
        }
        None => None,
    };
    for &m in gr.members() {
        let d = g
            .device(m)
            .map_err(|_| v("group member is not a device", gid, id, m as u64))?;
        if d.group != id {
            return Err(v("member of another group", gid, id, m as u64));
        }
        if hw.device_domain(d.hw, None) != target.map(|x| x.domain) {
            return Err(v("member not on the group's domain", gid, id, m as u64));
        }
        if let Some(x) = target {
            if x.cc() && !d.info.enforce_cc {
                return Err(v(
                    "non-coherent device in a coherent HWPT",
                    gid,
                    id,
                    m as u64,
                ));
            }
            if x.dirty() && !d.info.dirty_tracking {
                return Err(v(
                    "device without dirty tracking in a dirty HWPT",
                    gid,
                    id,
                    m as u64,
                ));
            }
        }
    }
    Ok(())
}

fn check_device<H: IommuHw>(hw: &H, g: &Guest, gid: GuestId, id: u32) -> Result<(), Violation> {
    let d = g.device(id).map_err(|_| v("device lookup", gid, id, 0))?;
    let gr = g
        .group(d.group)
        .map_err(|_| v("device in a missing group", gid, id, d.group as u64))?;
    if gr.index_of(id).is_none() {
        return Err(v("device not listed by its group", gid, id, d.group as u64));
    }
    let bits = d.info.pasid_bits.min(20);
    let list: Vec<_> = d.pasids().collect();
    for (i, p) in list.iter().enumerate() {
        if list[..i].iter().any(|q| q.pasid == p.pasid) {
            return Err(v("PASID attached twice", gid, id, p.pasid as u64));
        }
        if p.pasid == 0 || bits == 0 || p.pasid >= 1 << bits {
            return Err(v(
                "PASID outside the device's width",
                gid,
                id,
                p.pasid as u64,
            ));
        }
        if gr.members().len() != 1 {
            return Err(v("PASID in a multi-device group", gid, id, p.pasid as u64));
        }
        let x = g
            .hwpt(p.hwpt)
            .map_err(|_| v("PASID on a missing HWPT", gid, id, p.hwpt as u64))?;
        if hw.device_domain(d.hw, Some(p.pasid)) != Some(x.domain) {
            return Err(v("PASID not on its HWPT's domain", gid, id, p.pasid as u64));
        }
        if x.cc() && !d.info.enforce_cc {
            return Err(v(
                "non-coherent device PASID in a coherent HWPT",
                gid,
                id,
                0,
            ));
        }
    }
    Ok(())
}

/// The logical state, serialised: equal snapshots mean nothing observable changed.
pub fn snapshot<H: IommuHw>(fd: &Iommufd<H>) -> Vec<u64> {
    let mut s = Vec::new();
    let guests: Vec<_> = fd
        .guests
        .iter()
        .map(|g| g.as_ref().map(|g| g.gate.write()))
        .collect();
    let hw = fd.hw.write();
    let hw = &*hw;
    for (gid, g) in guests.iter().enumerate() {
        let Some(g) = g.as_deref() else { continue };
        s.push(0xa000_0000 | gid as u64);
        for (i, gen_) in g.objs.generations().enumerate() {
            if gen_ != 0 {
                s.extend([0xb000_0000 | i as u64, gen_ as u64]);
            }
        }
        for (id, o) in g.objs.iter() {
            s.extend([0xc000_0000, id as u64, o.kind() as u64]);
            match o {
                Object::Ioas(x) => {
                    for a in x.areas().iter() {
                        s.extend([a.iova, a.len, a.gpa, a.prot as u64, a.pins as u64]);
                    }
                    s.push(0xd1);
                    for a in &x.allowed {
                        s.extend([a.start, a.last]);
                    }
                    s.push(0xd2);
                    s.extend(x.hwpts.iter().map(|&h| h as u64));
                    s.push(x.accesses as u64);
                }
                Object::Hwpt(h) => {
                    s.extend([
                        h.ioas as u64,
                        h.flags as u64,
                        h.auto as u64,
                        h.users as u64,
                        h.dirty_enabled as u64,
                        h.aperture.start,
                        h.aperture.last,
                        h.domain.0 as u64,
                        hw.mapped_bytes(h.domain),
                    ]);
                }
                Object::Group(gr) => {
                    s.extend([gr.rid.unwrap_or(0) as u64, gr.attached as u64]);
                    s.extend(gr.members().iter().map(|&m| m as u64));
                }
                Object::Device(d) => {
                    s.push(d.hw as u64);
                    s.push(
                        hw.device_domain(d.hw, None)
                            .map_or(u64::MAX, |x| x.0 as u64),
                    );
                    for p in d.pasids() {
                        s.extend([p.pasid as u64, p.hwpt as u64]);
                        let dom = hw.device_domain(d.hw, Some(p.pasid));
                        s.push(dom.map_or(u64::MAX, |x| x.0 as u64));
                    }
                }
                Object::Access(a) => {
                    s.push(a.ioas.unwrap_or(0) as u64);
                    for p in a.pins() {
                        s.extend([p.start, p.last]);
                    }
                }
            }
        }
    }
    for (i, d) in fd.devs.iter().enumerate() {
        s.push(d.owner.map_or(u64::MAX, |o| o as u64));
        s.push(
            hw.device_domain(i as u32, None)
                .map_or(u64::MAX, |x| x.0 as u64),
        );
    }
    s.push(hw.live_domains().map_or(u64::MAX, |n| n as u64));
    s
}

//! Devices with DMA aliases on the software model: every requester ID of a device translates
//! through the device's domain after attach and replace, none after detach, and a switch that
//! fails on one alias leaves every alias where it was. DMA is emulated per requester ID from
//! the model's own per-ID entries, not from the backend's per-device record.

use std::sync::Arc;

use hvabi::errno;

use super::super::backend::MAX_IDS_PER_DEVICE;
use super::super::check::{check, snapshot};
use super::super::client::Client;
use super::super::hw::{HwDomain, IommuHw};
use super::super::sim::{DmaFault, SimDevice, SimHw, VecGuestMemory};
use super::super::{FailNth, Iommufd, Limits};
use super::{PG, SCRATCH};

/// 00:01.0 with the alias 00:1e.0 (a bridge's requester ID); 00:02.0 alone.
const OWN: u32 = 0x0008;
const ALIAS: u32 = 0x00f0;
const OTHER: u32 = 0x0010;

fn fd() -> (Iommufd<SimHw>, u32, VecGuestMemory, [u32; 2]) {
    let devices = [
        SimDevice::new(OWN as u64, 1).alias(ALIAS),
        SimDevice::new(OTHER as u64, 2),
    ];
    let fail = Arc::new(FailNth::new());
    let mut fd = Iommufd::new(SimHw::new(&devices, 256, Some(fail)), Limits::default()).unwrap();
    let g = fd.create_guest().unwrap();
    let ids = [
        fd.assign_device(g, 0).unwrap(),
        fd.assign_device(g, 1).unwrap(),
    ];
    (fd, g, VecGuestMemory::standard(), ids)
}

fn dma(fd: &mut Iommufd<SimHw>, id: u32, iova: u64) -> Result<u64, DmaFault> {
    fd.hw_mut().dma_as(id, None, iova, false)
}

#[test]
fn every_alias_follows_attach_replace_detach() {
    let (mut fd, g, mem, [dev, other]) = fd();
    assert_eq!(fd.hw().device(0).unwrap().ids.as_slice(), &[OWN, ALIAS]);
    let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, 8 * PG, PG).unwrap();
    c.attach(dev, ioas).unwrap();
    c.attach(other, ioas2).unwrap();
    let hpa = |gpa: u64| mem.hpa(gpa).unwrap();
    for id in [OWN, ALIAS] {
        assert_eq!(dma(&mut fd, id, 0x10_0000), Ok(hpa(0)), "id {id:#x}");
    }
    // Two IDs committed for the device, one for the other.
    assert_eq!(fd.hw().commits(), 3);
    check(&fd, &[(g, &mem)]).unwrap();

    Client::new(&mut fd, g, &mem, SCRATCH)
        .replace(dev, ioas2)
        .unwrap();
    for id in [OWN, ALIAS] {
        assert_eq!(dma(&mut fd, id, 0x10_0000), Ok(hpa(8 * PG)), "id {id:#x}");
    }
    assert_eq!(
        fd.hw().entry(OWN, None),
        fd.hw().entry(ALIAS, None),
        "aliases split"
    );

    Client::new(&mut fd, g, &mem, SCRATCH).detach(dev).unwrap();
    for id in [OWN, ALIAS] {
        assert_eq!(dma(&mut fd, id, 0x10_0000), Err(DmaFault::Blocked));
    }
    assert_eq!(dma(&mut fd, OTHER, 0x10_0000), Ok(hpa(8 * PG)));
    check(&fd, &[(g, &mem)]).unwrap();
    fd.destroy_guest(g).unwrap();
    assert_eq!(fd.hw().frames_in_use(), 0);
}

/// A replace whose prepare fails on the alias (the second ID) aborts the first ID: the error
/// reaches the guest and both IDs still translate through the old domain.
#[test]
fn failure_on_one_alias_moves_none() {
    let (mut fd, g, mem, [dev, _]) = fd();
    let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, 8 * PG, PG).unwrap();
    c.attach(dev, ioas).unwrap();
    let before = snapshot(&fd);
    let old = fd.hw().entry(OWN, None);
    let aborts = fd.hw().aborts();
    fd.hw_mut().fail_next_prepare_id(ALIAS);
    assert_eq!(
        Client::new(&mut fd, g, &mem, SCRATCH).replace(dev, ioas2),
        Err(errno::ENOMEM)
    );
    // The first ID was prepared and is aborted; the alias failed and needs no abort.
    assert_eq!(fd.hw().aborts(), aborts + 1);
    assert_eq!(fd.hw().outstanding_prepared(), Some(0));
    assert_eq!(snapshot(&fd), before);
    for id in [OWN, ALIAS] {
        assert_eq!(fd.hw().entry(id, None), old);
        assert_eq!(dma(&mut fd, id, 0x10_0000), Ok(mem.hpa(0).unwrap()));
    }
    // A first attach failing on the alias leaves both blocked.
    Client::new(&mut fd, g, &mem, SCRATCH).detach(dev).unwrap();
    fd.hw_mut().fail_next_prepare_id(ALIAS);
    assert_eq!(
        Client::new(&mut fd, g, &mem, SCRATCH).attach(dev, ioas2),
        Err(errno::ENOMEM)
    );
    for id in [OWN, ALIAS] {
        assert_eq!(dma(&mut fd, id, 0x10_0000), Err(DmaFault::Blocked));
    }
    check(&fd, &[(g, &mem)]).unwrap();
    fd.destroy_guest(g).unwrap();
}

/// A commit that faults on the first ID still switches the alias (the hardware made the
/// switch for the first one; a device must never be split across domains).
#[test]
fn commit_fault_still_moves_every_alias() {
    let (mut fd, g, mem, [dev, _]) = fd();
    let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    fd.hw_mut().fault_next_commit(0);
    assert_eq!(
        Client::new(&mut fd, g, &mem, SCRATCH).attach(dev, ioas),
        Err(errno::EIO)
    );
    let d = fd.hw().entry(OWN, None);
    assert!(d.is_some());
    assert_eq!(fd.hw().entry(ALIAS, None), d);
    fd.destroy_guest(g).unwrap();
}

#[test]
fn alias_list_is_bounded_and_deduplicated() {
    let mut d = SimDevice::new(1, 1).alias(1).alias(2);
    assert_eq!(d.ids.as_slice(), &[1, 2]);
    for i in 3..100 {
        d = d.alias(i);
    }
    assert_eq!(d.ids.as_slice().len(), MAX_IDS_PER_DEVICE);
    assert_eq!(d.ids.primary(), 1);
}

/// The checker reads every alias's entry: one alias blocked, or pointing elsewhere, behind the
/// object model's back is a violation even though the device's own ID is right.
#[test]
fn checker_sees_a_split_alias() {
    let (mut fd, g, mem, [dev, other]) = fd();
    let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.attach(dev, ioas).unwrap();
    c.attach(other, ioas2).unwrap();
    check(&fd, &[(g, &mem)]).unwrap();
    let own = fd.hw().entry(OWN, None);
    let elsewhere = fd.hw().entry(OTHER, None);
    assert_ne!(own, elsewhere);
    for corrupt in [None, elsewhere] {
        fd.hw_mut().corrupt_entry(ALIAS, None, corrupt);
        assert_eq!(fd.hw().device_domain(0, None), Some(HwDomain::UNKNOWN));
        let v = check(&fd, &[(g, &mem)]).unwrap_err();
        assert_eq!(v.what, "member not on the group's domain");
    }
    fd.hw_mut().corrupt_entry(ALIAS, None, own);
    check(&fd, &[(g, &mem)]).unwrap();
    fd.destroy_guest(g).unwrap();
}

/// Every allocation of an attach and of a replace of the two-ID device (the domain, its table
/// pages, the per-ID prepare of each requester ID), failed in turn: ENOMEM, and neither ID's
/// entry nor anything else changed.
#[test]
fn alias_fail_nth() {
    let mut injected = 0;
    for step in 0..2 {
        for n in 1.. {
            let devices = [SimDevice::new(OWN as u64, 1).alias(ALIAS)];
            let fail = Arc::new(FailNth::new());
            let hw = SimHw::new(&devices, 256, Some(fail.clone()));
            let mut fd = Iommufd::new(hw, Limits::default()).unwrap();
            fd.set_fault_injector(Some(fail.clone()));
            let g = fd.create_guest().unwrap();
            let dev = fd.assign_device(g, 0).unwrap();
            let mem = VecGuestMemory::standard();
            let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
            let ioas = c.ioas_alloc().unwrap();
            let ioas2 = c.ioas_alloc().unwrap();
            c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
            c.map_fixed(ioas2, 0x10_0000, 8 * PG, PG).unwrap();
            if step == 1 {
                c.attach(dev, ioas).unwrap();
            }
            let before = snapshot(&fd);
            let entries = [OWN, ALIAS].map(|id| fd.hw().entry(id, None));
            fail.arm(n);
            let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
            let r = match step {
                0 => c.attach(dev, ioas),
                _ => c.replace(dev, ioas2),
            };
            fail.disarm();
            check(&fd, &[(g, &mem)]).unwrap();
            if !fail.fired() {
                r.unwrap();
                let now = fd.hw().entry(OWN, None);
                assert!(now.is_some());
                assert_eq!(fd.hw().entry(ALIAS, None), now);
                fd.destroy_guest(g).unwrap();
                assert_eq!(fd.hw().frames_in_use(), 0);
                break;
            }
            assert_eq!(r, Err(errno::ENOMEM), "step {step} n {n}");
            assert_eq!(snapshot(&fd), before, "step {step} n {n}");
            assert_eq!([OWN, ALIAS].map(|id| fd.hw().entry(id, None)), entries);
            assert_eq!(fd.hw().outstanding_prepared(), Some(0));
            fd.destroy_guest(g).unwrap();
            assert_eq!(
                fd.hw().frames_in_use(),
                0,
                "step {step} n {n}: pages leaked"
            );
            injected += 1;
        }
    }
    // At least: the domain and its root table, and each requester ID's prepare, per step.
    assert!(injected >= 8, "{injected}");
}

//! Groups (§3.10 of the reference: none of this is tested upstream), atomic group replace,
//! reserved regions of the whole group, and the PASID matrix (§3.8).

use hvabi::{DEVICE_GROUP_ATTACHED, HWPT_ENFORCE_CACHE_COHERENCY, errno, kind, reason, resv};

use super::{Env, L_RESV, PG, RMRR, dev};

fn entry(env: &mut Env, id: u32) -> hvabi::DeviceEntry {
    env.c()
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.dev_id == id)
        .unwrap()
}

#[test]
fn same_hwpt() {
    let mut env = Env::new();
    let (d, e) = (env.id(dev::D), env.id(dev::E));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    let h = c.attach(d, ioas).unwrap();
    // The first member's attach moved the whole group: E translates already.
    assert_eq!(env.dma(dev::E, 0x10_0000), Some(env.hpa(0)));
    assert_ne!(entry(&mut env, e).flags & DEVICE_GROUP_ATTACHED, 0);
    assert_eq!(entry(&mut env, e).attached_hwpt, 0);
    // E attaching to the same IOAS (or to the HWPT by ID) joins without touching hardware.
    let commits = env.fd.hw().commits();
    assert_eq!(env.c().attach(e, ioas), Ok(h));
    assert_eq!(env.fd.hw().commits(), commits);
    assert_eq!(entry(&mut env, e).attached_hwpt, h);
    env.c().detach(e).unwrap();
    assert_eq!(env.c().attach(e, h), Ok(h));
    assert_eq!(env.fd.hw().commits(), commits);
    env.check();
    // Attaching a member twice: EBUSY.
    assert_eq!(env.c().attach(e, h), Err(errno::EBUSY));
    env.teardown();
}

#[test]
fn other_ioas_fails() {
    let mut env = Env::new();
    let (d, e) = (env.id(dev::D), env.id(dev::E));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    let h = c.attach(d, ioas).unwrap();
    assert_eq!(c.attach(e, ioas2), Err(errno::EXDEV));
    let le = c.last_error();
    assert_eq!(
        (le.out_reason, le.out_object_kind, le.out_object_id),
        (reason::GROUP_ATTACHED_ELSEWHERE, kind::HWPT, h)
    );
    // Another page table of the same IOAS is still another page table.
    let manual = c.hwpt_alloc(e, ioas, 0).unwrap();
    assert_eq!(c.attach(e, manual), Err(errno::EXDEV));
    env.check();
    env.teardown();
}

#[test]
fn detach_one_member() {
    let mut env = Env::new();
    let (d, e) = (env.id(dev::D), env.id(dev::E));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    let h = c.attach(d, ioas).unwrap();
    c.attach(e, ioas).unwrap();
    c.detach(d).unwrap();
    // Bookkeeping only: both still translate.
    assert_eq!(env.dma(dev::D, 0x10_0000), Some(env.hpa(0)));
    assert_eq!(env.dma(dev::E, 0x10_0000), Some(env.hpa(0)));
    assert_eq!(entry(&mut env, d).attached_hwpt, 0);
    assert_ne!(entry(&mut env, d).flags & DEVICE_GROUP_ATTACHED, 0);
    env.check();
    // The last attached member leaves: the whole group is blocked, the HWPT goes.
    env.c().detach(e).unwrap();
    assert_eq!(env.dma(dev::D, 0x10_0000), None);
    assert_eq!(env.dma(dev::E, 0x10_0000), None);
    assert_eq!(env.c().destroy(h).unwrap_err().0, errno::ENOENT);
    // Detaching again is a no-op.
    env.c().detach(e).unwrap();
    env.teardown();
}

#[test]
fn replace_moves_group() {
    let mut env = Env::new();
    let (d, e) = (env.id(dev::D), env.id(dev::E));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, PG, PG).unwrap();
    let h1 = c.attach(d, ioas).unwrap();
    c.attach(e, ioas).unwrap();
    let h2 = c.replace(e, ioas2).unwrap();
    for x in [dev::D, dev::E] {
        assert_eq!(env.dma(x, 0x10_0000), Some(env.hpa(PG)));
    }
    assert_eq!(entry(&mut env, d).attached_hwpt, h2);
    assert_eq!(entry(&mut env, e).attached_hwpt, h2);
    let mut c = env.c();
    assert_eq!(c.destroy(h1).unwrap_err().0, errno::ENOENT);
    let (err, dd) = c.destroy(h2).unwrap_err();
    assert_eq!((err, dd.out_blocker_count), (errno::EBUSY, 2));
    // Only attached members may replace; a detached member may not.
    c.detach(d).unwrap();
    assert_eq!(c.replace(d, ioas), Err(errno::EINVAL));
    // E moves the group back, D's bookkeeping is unaffected.
    c.replace(e, ioas).unwrap();
    assert_eq!(env.dma(dev::D, 0x10_0000), Some(env.hpa(0)));
    assert_eq!(entry(&mut env, d).attached_hwpt, 0);
    env.teardown();
}

#[test]
fn replace_rollback() {
    let mut env = Env::new();
    let (d, e) = (env.id(dev::D), env.id(dev::E));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, PG, PG).unwrap();
    let h1 = c.attach(d, ioas).unwrap();
    c.attach(e, ioas).unwrap();
    let manual = c.hwpt_alloc(d, ioas2, 0).unwrap();
    let snap = env.snapshot();
    // The second member's prepare fails: the first, already prepared, is aborted; nothing
    // changed, including the automatic HWPT that was made for the new IOAS.
    for target in [ioas2, manual] {
        env.fd.hw_mut().fail_next_prepare(dev::E);
        let aborts = env.fd.hw().aborts();
        assert_eq!(env.c().replace(d, target), Err(errno::ENOMEM));
        assert_eq!(env.fd.hw().aborts(), aborts + 1);
        assert_eq!(env.c().last_error().out_object_id, e);
        assert_eq!(env.snapshot(), snap);
        env.check();
        for x in [dev::D, dev::E] {
            assert_eq!(env.dma(x, 0x10_0000), Some(env.hpa(0)));
        }
    }
    // The first member's prepare fails: nothing was prepared.
    env.fd.hw_mut().fail_next_prepare(dev::D);
    assert_eq!(env.c().replace(e, ioas2), Err(errno::ENOMEM));
    assert_eq!(env.snapshot(), snap);
    // Validation failures come before any prepare: a reserved-region conflict.
    let mut c = env.c();
    c.map_fixed(ioas2, 0xfee0_0000, 0, PG).unwrap();
    let snap = env.snapshot();
    let prepares = env.fd.hw().commits() + env.fd.hw().aborts();
    assert_eq!(env.c().replace(d, ioas2), Err(errno::EADDRINUSE));
    assert_eq!(env.fd.hw().commits() + env.fd.hw().aborts(), prepares);
    assert_eq!(env.snapshot(), snap);
    env.c().unmap(ioas2, 0xfee0_0000, PG).unwrap();
    // And with every failure behind us, the same replace works for the whole group.
    let h2 = env.c().replace(d, ioas2).unwrap();
    assert_ne!(h2, h1);
    for x in [dev::D, dev::E] {
        assert_eq!(env.dma(x, 0x10_0000), Some(env.hpa(PG)));
    }
    // A hardware fault during commit: the switch is made for every member, bookkeeping
    // follows, the guest is told EIO.
    env.fd.hw_mut().fault_next_commit(dev::D);
    assert_eq!(env.c().replace(e, manual), Err(errno::EIO));
    env.check();
    assert_eq!(entry(&mut env, d).attached_hwpt, manual);
    env.teardown();
}

#[test]
fn mixed_coherency_group() {
    // F can enforce coherency, G cannot: their automatic HWPT does not, and nothing moves
    // them to a coherent one.
    let mut env = Env::new();
    let (f, g) = (env.id(dev::F), env.id(dev::G));
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let cc = c.attach(a, ioas).unwrap();
    let h = c.attach(f, ioas).unwrap();
    assert_ne!(h, cc);
    assert_eq!(c.attach(g, cc), Err(errno::EXDEV));
    assert_eq!(c.attach(g, ioas), Ok(h));
    assert_eq!(c.replace(f, cc), Err(errno::EMEDIUMTYPE));
    let cc2 = c.hwpt_alloc(f, ioas, HWPT_ENFORCE_CACHE_COHERENCY).unwrap();
    assert_eq!(c.replace(g, cc2), Err(errno::EMEDIUMTYPE));
    env.check();
    env.teardown();
}

#[test]
fn pasid_multi_device_group() {
    let mut env = Env::new();
    let (k, l) = (env.id(dev::K), env.id(dev::L));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let h = c.hwpt_alloc(k, ioas, 0).unwrap();
    for x in [k, l] {
        assert_eq!(c.attach_pasid(x, 1, h), Err(errno::EPERM));
        let le = c.last_error();
        assert_eq!(
            (le.out_reason, le.out_object_kind),
            (reason::PASID_MULTI_DEVICE_GROUP, kind::GROUP)
        );
        assert_eq!(c.replace_pasid(x, 1, h), Err(errno::EPERM));
        c.detach_pasid(x, 1).unwrap();
    }
    // The requester IDs attach normally.
    c.attach(k, h).unwrap();
    c.attach(l, h).unwrap();
    env.check();
    env.teardown();
}

#[test]
fn pasid_attach() {
    let mut env = Env::new();
    let (a, cd) = (env.id(dev::A), env.id(dev::C));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, PG, PG).unwrap();
    let h1 = c.hwpt_alloc(cd, ioas, 0).unwrap();
    let h2 = c.hwpt_alloc(cd, ioas2, 0).unwrap();
    // Detach of an unattached PASID is a no-op.
    c.detach_pasid(cd, 5).unwrap();
    // A device without PASIDs; PASID 0; beyond the width (8 bits).
    assert_eq!(c.attach_pasid(a, 1, h1), Err(errno::EOPNOTSUPP));
    assert_eq!(c.last_error().out_reason, reason::PASID_UNSUPPORTED);
    assert_eq!(c.attach_pasid(cd, 0, h1), Err(errno::EINVAL));
    assert_eq!(c.attach_pasid(cd, 256, h1), Err(errno::ERANGE));
    assert_eq!(c.attach_pasid(cd, 255, h1), Ok(h1));
    c.detach_pasid(cd, 255).unwrap();
    // The requester ID and PASIDs are independent; any paging HWPT, and an IOAS, are valid
    // PASID targets (Linux refuses an IOAS).
    c.attach(cd, h1).unwrap();
    assert_eq!(c.attach_pasid(cd, 1, h2), Ok(h2));
    let auto = c.attach_pasid(cd, 2, ioas2).unwrap();
    assert!(auto != h1 && auto != h2);
    let hw = env.fd.hw_mut();
    assert_eq!(
        hw.dma(dev::C, Some(1), 0x10_0000, false),
        Ok(env.mem.hpa(PG).unwrap())
    );
    let hw = env.fd.hw_mut();
    assert_eq!(
        hw.dma(dev::C, None, 0x10_0000, false),
        Ok(env.mem.hpa(0).unwrap())
    );
    env.check();
    let mut c = env.c();
    // Attach over an attached PASID: EBUSY. Replace of an unattached one: EINVAL.
    assert_eq!(c.attach_pasid(cd, 1, h1), Err(errno::EBUSY));
    assert_eq!(c.replace_pasid(cd, 3, h1), Err(errno::EINVAL));
    // Replace across HWPTs, and with an IOAS (its current HWPT mirrors it: no change).
    assert_eq!(c.replace_pasid(cd, 1, h1), Ok(h1));
    assert_eq!(c.replace_pasid(cd, 1, ioas), Ok(h1));
    assert_eq!(c.replace_pasid(cd, 2, h2), Ok(h2));
    // The automatic HWPT of PASID 2 went with it.
    assert_eq!(c.destroy(auto).unwrap_err().0, errno::ENOENT);
    // An injected failure on replace keeps the old HWPT.
    let snap = env.snapshot();
    env.fd.hw_mut().fail_next_prepare(dev::C);
    assert_eq!(env.c().replace_pasid(cd, 1, h2), Err(errno::ENOMEM));
    assert_eq!(env.snapshot(), snap);
    let hw = env.fd.hw_mut();
    assert_eq!(
        hw.dma(dev::C, Some(1), 0x10_0000, false),
        Ok(env.mem.hpa(0).unwrap())
    );
    let mut c = env.c();
    // A HWPT with PASIDs on it is busy; the blocker is the device.
    let (e, dd) = c.destroy(h2).unwrap_err();
    assert_eq!(
        (e, dd.out_blocker_kind, dd.out_blocker_id),
        (errno::EBUSY, kind::DEVICE, cd)
    );
    // The per-device PASID table is finite.
    for p in 10..16 {
        c.attach_pasid(cd, p, h1).unwrap();
    }
    assert_eq!(c.attach_pasid(cd, 16, h1), Err(errno::ENOSPC));
    for p in [1, 2, 10, 11, 12, 13, 14, 15] {
        c.detach_pasid(cd, p).unwrap();
    }
    c.detach(cd).unwrap();
    assert_eq!(env.fd.hw().attachments().count(), 0);
    env.teardown();
}

#[test]
fn reserved_conflict() {
    let mut env = Env::new();
    let i = env.id(dev::I);
    let mut c = env.c();
    // What I would reserve, asked before attaching.
    let r = c.reserved_ranges(i).unwrap();
    let spans: std::vec::Vec<_> = r
        .iter()
        .map(|x| (x.start, x.last, x.kind, x.dev_id))
        .collect();
    assert_eq!(
        spans,
        std::vec![
            (0xfee0_0000, 0xfeef_ffff, resv::MSI, i),
            (RMRR.0, RMRR.1, resv::DIRECT, i),
            (1 << 39, u64::MAX, resv::APERTURE, i),
        ]
    );
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, RMRR.0 + 16 * PG, 0, PG).unwrap();
    assert_eq!(c.attach(i, ioas), Err(errno::EADDRINUSE));
    let le = c.last_error();
    assert_eq!(
        (le.out_reason, le.out_value),
        (reason::RESERVED_OVERLAPS_MAPPING, RMRR.0 + 16 * PG)
    );
    // Beyond the aperture, too.
    c.unmap(ioas, 0, u64::MAX).unwrap();
    c.map_fixed(ioas, 1 << 40, 0, PG).unwrap();
    assert_eq!(c.attach(i, ioas), Err(errno::EADDRINUSE));
    // A manual HWPT whose aperture excludes a mapping cannot be made.
    assert_eq!(c.hwpt_alloc(i, ioas, 0), Err(errno::EADDRINUSE));
    assert_eq!(c.last_error().out_reason, reason::MAPPING_OUTSIDE_APERTURE);
    c.unmap(ioas, 0, u64::MAX).unwrap();
    c.attach(i, ioas).unwrap();
    assert_eq!(c.map_fixed(ioas, RMRR.0, 0, PG), Err(errno::EADDRINUSE));
    // Too small an array: EMSGSIZE and the count.
    let a = hvabi::DeviceReservedRanges {
        dev_id: i,
        num_ranges: 1,
        ranges_gpa: c.array(),
        ..Default::default()
    };
    let (e, out) = c.call(hvabi::op::DEVICE_RESERVED_RANGES, &a).unwrap_err();
    assert_eq!((e, out.num_ranges), (errno::EMSGSIZE, 3));
    env.teardown();
}

#[test]
fn msi_window_whole_group() {
    let mut env = Env::new();
    let (k, l) = (env.id(dev::K), env.id(dev::L));
    let mut c = env.c();
    // Asked of K, the answer includes L's region: attaching K attaches the group.
    let r = c.reserved_ranges(k).unwrap();
    assert!(
        r.iter()
            .any(|x| (x.start, x.last, x.dev_id) == (L_RESV.0, L_RESV.1, l))
    );
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, L_RESV.0, 0, PG).unwrap();
    assert_eq!(c.attach(k, ioas), Err(errno::EADDRINUSE));
    c.unmap(ioas, L_RESV.0, PG).unwrap();
    c.attach(k, ioas).unwrap();
    // L never attached, but its region is enforced for the group's whole life.
    assert_eq!(c.map_fixed(ioas, L_RESV.0, 0, PG), Err(errno::EADDRINUSE));
    let ranges = c.iova_ranges(ioas).unwrap();
    assert!(ranges.iter().any(|&(_, last)| last == L_RESV.0 - 1));
    c.detach(k).unwrap();
    c.map_fixed(ioas, L_RESV.0, 0, PG).unwrap();
    env.check();
    env.teardown();
}

#[test]
fn unassign_and_reassign() {
    let mut env = Env::new();
    let d = env.id(dev::D);
    let ioas = env.c().ioas_alloc().unwrap();
    env.c().attach(d, ioas).unwrap();
    assert_eq!(
        env.fd.unassign_device(env.g, dev::E).unwrap_err().errno,
        errno::EBUSY
    );
    env.c().detach(d).unwrap();
    env.fd.unassign_device(env.g, dev::E).unwrap();
    assert_eq!(env.fd.device_owner(dev::D), None);
    assert_eq!(env.c().attach(d, ioas), Err(errno::ENOENT));
    // The second guest takes the group.
    let id = env.fd.assign_device(env.g2, dev::D).unwrap();
    let ioas2 = env.c2().ioas_alloc().unwrap();
    env.c2().attach(id, ioas2).unwrap();
    env.check();
    env.c2().detach(id).unwrap();
    env.fd.unassign_device(env.g2, dev::D).unwrap();
    env.ids[dev::D as usize] = env.fd.assign_device(env.g, dev::D).unwrap();
    env.ids[dev::E as usize] = env.fd.device_id(env.g, dev::E).unwrap();
    env.check();
    env.teardown();
}

//! ACCESS: emulated DMA through an IOAS, pins, IOAS switch without a "no IOAS" window.

use hvabi::{MAP_READABLE, errno, kind, reason};

use super::super::GuestMemory;
use super::super::client::RW;
use super::{Env, PG, dev};

#[test]
fn access_rw() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    // Two contiguous IOVA areas over unrelated guest memory, then a read-only one.
    let base = 0x100_0000u64;
    c.map_fixed(ioas, base, 0x20_0000, 2 * PG).unwrap();
    c.map_fixed(ioas, base + 2 * PG, 0x50_0000, 2 * PG).unwrap();
    c.map(
        ioas,
        1 << 30,
        PG,
        MAP_READABLE | hvabi::MAP_FIXED_IOVA,
        base + 4 * PG,
    )
    .unwrap();
    let (g, mem) = (env.g, &env.mem);
    let acc = env.fd.create_access(g).unwrap();
    env.fd.access_attach(g, acc, ioas).unwrap();
    // A write spanning both areas.
    let data: std::vec::Vec<u8> = (0..3 * PG as usize).map(|i| (i * 7) as u8).collect();
    env.fd.access_write(g, mem, acc, base + PG, &data).unwrap();
    let mut back = std::vec![0u8; data.len()];
    env.fd
        .access_read(g, mem, acc, base + PG, &mut back)
        .unwrap();
    assert_eq!(back, data);
    let mut raw = std::vec![0u8; PG as usize];
    mem.read(0x50_0000, &mut raw).unwrap();
    assert_eq!(raw[..], data[PG as usize..2 * PG as usize]);
    // Read-only area: reads work, writes fail and write nothing (also the writable part).
    let mut one = [0u8; 16];
    env.fd
        .access_read(g, mem, acc, base + 4 * PG, &mut one)
        .unwrap();
    let r = env
        .fd
        .access_write(g, mem, acc, base + 4 * PG - 8, &[0xaa; 16]);
    assert_eq!(r.unwrap_err().errno, errno::EPERM);
    let mut probe = [0u8; 8];
    mem.read(0x50_0000 + 2 * PG - 8, &mut probe).unwrap();
    assert_ne!(probe, [0xaa; 8]);
    // Holes and unattached accesses.
    let r = env.fd.access_read(g, mem, acc, base + 5 * PG, &mut one);
    assert_eq!(r.unwrap_err().errno, errno::ENOENT);
    let r = env.fd.access_read(g, mem, acc, base - 1, &mut one);
    assert_eq!(r.unwrap_err().errno, errno::ENOENT);
    let other = env.fd.create_access(g).unwrap();
    let r = env.fd.access_read(g, mem, other, base, &mut one);
    assert_eq!(r.unwrap_err().errno, errno::ENOENT);
    env.fd.destroy_access(g, other).unwrap();
    env.fd.destroy_access(g, acc).unwrap();
    env.teardown();
}

#[test]
fn access_rw_unaligned() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x100_0000, 0x30_0000, 4 * PG).unwrap();
    let (g, mem) = (env.g, &env.mem);
    let acc = env.fd.create_access(g).unwrap();
    env.fd.access_attach(g, acc, ioas).unwrap();
    for (off, len) in [
        (1u64, 1usize),
        (PG - 3, 7),
        (123, 2 * PG as usize + 5),
        (4 * PG - 1, 1),
    ] {
        let data: std::vec::Vec<u8> = (0..len).map(|i| (i as u8) ^ 0x5a).collect();
        env.fd
            .access_write(g, mem, acc, 0x100_0000 + off, &data)
            .unwrap();
        let mut back = std::vec![0u8; len];
        mem.read(0x30_0000 + off, &mut back).unwrap();
        assert_eq!(back, data);
    }
    let r = env
        .fd
        .access_write(g, mem, acc, 0x100_0000 + 4 * PG - 1, &[1, 2]);
    assert_eq!(r.unwrap_err().errno, errno::ENOENT);
    env.fd.destroy_access(g, acc).unwrap();
    env.teardown();
}

#[test]
fn access_pin() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x100_0000, 0, 16 * PG).unwrap();
    let g = env.g;
    let acc = env.fd.create_access(g).unwrap();
    env.fd.access_attach(g, acc, ioas).unwrap();
    for pages in 1..=7u64 {
        env.fd
            .access_pin(g, acc, 0x100_0000 + PG, pages * PG)
            .unwrap();
        // Twice.
        env.fd
            .access_pin(g, acc, 0x100_0000 + PG, pages * PG)
            .unwrap();
        // A domain comes and goes while pinned.
        env.c().attach(a, ioas).unwrap();
        env.check();
        env.c().detach(a).unwrap();
        env.fd
            .access_unpin(g, acc, 0x100_0000 + PG, pages * PG)
            .unwrap();
        env.fd
            .access_unpin(g, acc, 0x100_0000 + PG, pages * PG)
            .unwrap();
        env.check();
    }
    // Unaligned, unmapped, unknown unpin.
    let e = env.fd.access_pin(g, acc, 0x100_0001, PG).unwrap_err();
    assert_eq!(e.errno, errno::EINVAL);
    let e = env
        .fd
        .access_pin(g, acc, 0x100_0000 + 15 * PG, 2 * PG)
        .unwrap_err();
    assert_eq!(e.errno, errno::ENOENT);
    let e = env.fd.access_unpin(g, acc, 0x100_0000, PG).unwrap_err();
    assert_eq!(e.errno, errno::EINVAL);
    // The pin table is finite.
    for _ in 0..super::super::MAX_PINS_PER_ACCESS {
        env.fd.access_pin(g, acc, 0x100_0000, PG).unwrap();
    }
    let e = env.fd.access_pin(g, acc, 0x100_0000, PG).unwrap_err();
    assert_eq!(e.errno, errno::ENOSPC);
    // Destroying a pinning access is refused; unpinned, it goes.
    assert_eq!(
        env.fd.destroy_access(g, acc).unwrap_err().errno,
        errno::EBUSY
    );
    for _ in 0..super::super::MAX_PINS_PER_ACCESS {
        env.fd.access_unpin(g, acc, 0x100_0000, PG).unwrap();
    }
    env.fd.destroy_access(g, acc).unwrap();
    env.teardown();
}

#[test]
fn access_pin_unmap() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x100_0000, 0, 4 * PG).unwrap();
    c.map_fixed(ioas, 0x100_0000 + 4 * PG, 0, 4 * PG).unwrap();
    let g = env.g;
    let acc = env.fd.create_access(g).unwrap();
    env.fd.access_attach(g, acc, ioas).unwrap();
    env.fd
        .access_pin(g, acc, 0x100_0000 + 3 * PG, 2 * PG)
        .unwrap();
    // Both areas are pinned (the pin straddles them); unmap of either is refused, naming
    // the access.
    for iova in [0x100_0000, 0x100_0000 + 4 * PG] {
        assert_eq!(env.c().unmap(ioas, iova, 4 * PG), Err(errno::EBUSY));
        let le = env.c().last_error();
        assert_eq!(
            (le.out_reason, le.out_object_kind, le.out_object_id),
            (reason::PINNED, kind::ACCESS, acc)
        );
    }
    env.fd
        .access_unpin(g, acc, 0x100_0000 + 3 * PG, 2 * PG)
        .unwrap();
    assert_eq!(env.c().unmap(ioas, 0x100_0000, 8 * PG), Ok(8 * PG));
    // An IOAS with an access attached cannot be destroyed.
    let (e, d) = env.c().destroy(ioas).unwrap_err();
    assert_eq!(
        (e, d.out_blocker_kind, d.out_blocker_id),
        (errno::EBUSY, kind::ACCESS, acc)
    );
    env.fd.destroy_access(g, acc).unwrap();
    env.c().destroy(ioas).unwrap();
    env.teardown();
}

#[test]
fn user_copy() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let no_domain = c.ioas_alloc().unwrap();
    let with_domain = c.ioas_alloc().unwrap();
    c.attach(a, with_domain).unwrap();
    let src = c.map_auto(no_domain, 0x60_0000, 8 * PG).unwrap();
    let g = env.g;
    let acc = env.fd.create_access(g).unwrap();
    env.fd.access_attach(g, acc, no_domain).unwrap();
    for round in 0..3u64 {
        env.fd.access_pin(g, acc, src, 8 * PG).unwrap();
        let dst = env
            .c()
            .copy(with_domain, no_domain, src, 8 * PG, RW, 0)
            .unwrap();
        assert_eq!(
            env.dma(dev::A, dst + 7 * PG),
            Some(env.hpa(0x60_0000 + 7 * PG))
        );
        env.fd.access_unpin(g, acc, src, 8 * PG).unwrap();
        // The access moves to the domain IOAS and back: every step sees one IOAS.
        env.fd.access_replace(g, acc, with_domain).unwrap();
        let mut b = [0u8; 4];
        env.fd.access_read(g, &env.mem, acc, dst, &mut b).unwrap();
        env.fd.access_replace(g, acc, no_domain).unwrap();
        env.fd.access_read(g, &env.mem, acc, src, &mut b).unwrap();
        assert_eq!(
            env.c().unmap(with_domain, dst, 8 * PG),
            Ok(8 * PG),
            "round {round}"
        );
        env.check();
    }
    env.fd.destroy_access(g, acc).unwrap();
    env.teardown();
}

#[test]
fn access_replace_never_without_ioas() {
    let mut env = Env::new();
    let mut c = env.c();
    let one = c.ioas_alloc().unwrap();
    let two = c.ioas_alloc().unwrap();
    c.map_fixed(one, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(two, 0x10_0000, PG, PG).unwrap();
    let g = env.g;
    let acc = env.fd.create_access(g).unwrap();
    // The guest drives it through DEVICE_ATTACH/REPLACE/DETACH like a device.
    assert_eq!(env.c().attach(acc, one), Ok(one));
    assert_eq!(env.c().attach(acc, two), Err(errno::EBUSY));
    let a = env.id(dev::A);
    let h = env.c().hwpt_alloc(a, one, 0).unwrap();
    assert_eq!(env.c().replace(acc, h), Err(errno::EINVAL));
    assert_eq!(env.c().last_error().out_reason, reason::ACCESS_TARGET);
    assert_eq!(env.c().attach_pasid(acc, 1, two), Err(errno::EINVAL));
    // A failing replace (pinned; bad target) leaves the old IOAS in place.
    env.fd.access_pin(g, acc, 0x10_0000, PG).unwrap();
    assert_eq!(env.c().replace(acc, two), Err(errno::EBUSY));
    assert_eq!(env.fd.access_ioas(g, acc), Some(one));
    env.fd.access_unpin(g, acc, 0x10_0000, PG).unwrap();
    assert_eq!(env.c().replace(acc, 0x7777), Err(errno::ENOENT));
    assert_eq!(env.fd.access_ioas(g, acc), Some(one));
    // A successful one: the new IOAS at once.
    assert_eq!(env.c().replace(acc, two), Ok(two));
    assert_eq!(env.fd.access_ioas(g, acc), Some(two));
    let mut b = [0u8; 1];
    env.fd
        .access_write(g, &env.mem, acc, 0x10_0000, &[0x77])
        .unwrap();
    env.mem.read(PG, &mut b).unwrap();
    assert_eq!(b, [0x77]);
    env.check();
    env.c().detach(acc).unwrap();
    assert_eq!(env.fd.access_ioas(g, acc), None);
    assert_eq!(env.c().destroy(acc).unwrap_err().0, errno::EPERM);
    env.fd.destroy_access(g, acc).unwrap();
    env.teardown();
}

//! IOAS: MAP/UNMAP/COPY/IOVA_RANGES/ALLOW_IOVAS, batches, destroy.

use hvabi::{BATCH_ATOMIC, MAP_FIXED_IOVA, MAP_READABLE, MapEntry, UnmapEntry, errno, reason};

use super::super::client::RW;
use super::{Env, MB, PG, RMRR, dev};

#[test]
fn ioas_auto_destroy() {
    let mut env = Env::new();
    let mut c = env.c();
    for _ in 0..4 {
        let ioas = c.ioas_alloc().unwrap();
        c.map_auto(ioas, 0, MB).unwrap();
    }
    env.teardown();
}

#[test]
fn ioas_destroy() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    assert_eq!(c.destroy(ioas).unwrap_err().0, errno::EBUSY);
    c.detach(a).unwrap();
    c.destroy(ioas).unwrap();
    env.teardown();
}

#[test]
fn ioas_area_destroy() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x100000, 0, 16 * PG).unwrap();
    c.destroy(ioas).unwrap();
    env.teardown();
}

#[test]
fn ioas_area_auto_destroy() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    for i in 0..200u64 {
        c.map_fixed(ioas, 0x100000 + i * 2 * PG, i * PG, PG)
            .unwrap();
    }
    env.check();
    env.teardown();
}

#[test]
fn area() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let base = 0x40_0000u64;
    // Unmap of nothing.
    assert_eq!(c.unmap(ioas, base, PG), Err(errno::ENOENT));
    assert_eq!(c.last_error().out_reason, reason::NOT_MAPPED);
    // Map and unmap pages.
    for i in 0..8 {
        c.map_fixed(ioas, base + i * PG, i * PG, PG).unwrap();
    }
    for i in 0..8 {
        assert_eq!(c.unmap(ioas, base + i * PG, PG), Ok(PG));
    }
    // A split unmap fails and changes nothing.
    c.map_fixed(ioas, base, 0, 4 * PG).unwrap();
    assert_eq!(c.unmap(ioas, base + PG, PG), Err(errno::ENOENT));
    assert_eq!(c.last_error().out_reason, reason::SPLITS_MAPPING);
    assert_eq!(c.unmap(ioas, base, 2 * PG), Err(errno::ENOENT));
    // Five overlap shapes: inside, covering, head, tail, exact.
    for (iova, len) in [
        (base + PG, PG),
        (base - PG, 6 * PG),
        (base - PG, 2 * PG),
        (base + 3 * PG, 2 * PG),
        (base, 4 * PG),
    ] {
        assert_eq!(c.map_fixed(ioas, iova, 64 * PG, len), Err(errno::EEXIST));
        assert_eq!(c.last_error().out_value, base);
    }
    assert_eq!(env.dma(dev::A, base + PG), Some(env.hpa(PG)));
    let mut c = env.c();
    // Unmap all, and unmap all of an empty IOAS.
    assert_eq!(c.unmap(ioas, 0, u64::MAX), Ok(4 * PG));
    assert_eq!(c.unmap(ioas, 0, u64::MAX), Ok(0));
    // Zero length, overflow.
    assert_eq!(c.unmap(ioas, base, 0), Err(errno::EINVAL));
    assert_eq!(
        c.unmap(ioas, u64::MAX - PG + 1, 2 * PG),
        Err(errno::EOVERFLOW)
    );
    assert_eq!(
        c.map_fixed(ioas, u64::MAX - PG + 1, 0, 2 * PG),
        Err(errno::EOVERFLOW)
    );
    assert_eq!(c.map_fixed(ioas, base, 0, 0), Err(errno::EINVAL));
    assert_eq!(c.map_fixed(ioas, base + 1, 0, PG), Err(errno::EINVAL));
    assert_eq!(c.map_fixed(ioas, base, 1, PG), Err(errno::EINVAL));
    assert_eq!(c.map_fixed(ioas, base, 0, PG + 1), Err(errno::EINVAL));
    assert_eq!(c.map(ioas, 0, PG, MAP_FIXED_IOVA, base), Err(errno::EINVAL));
    assert_eq!(c.last_error().out_reason, reason::NO_PROT);
    assert_eq!(env.dma(dev::A, base + PG), None);
    env.teardown();
}

#[test]
fn unmap_fully_contained_areas() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let base = 0x100_0000u64;
    for i in 0..4 {
        c.map_fixed(ioas, base + i * 16 * PG, i * 16 * PG, 8 * PG)
            .unwrap();
    }
    // Partial cover at either end.
    assert_eq!(c.unmap(ioas, base + PG, 60 * PG), Err(errno::ENOENT));
    assert_eq!(c.unmap(ioas, base, 50 * PG), Err(errno::ENOENT));
    // Everything inside one range, with holes between the areas.
    assert_eq!(c.unmap(ioas, base - PG, 70 * PG), Ok(32 * PG));
    env.teardown();
}

#[test]
fn unmap_atomic() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let base = 0x100_0000u64;
    c.map_fixed(ioas, base, 0, 4 * PG).unwrap();
    c.map_fixed(ioas, base + 8 * PG, 8 * PG, 4 * PG).unwrap();
    // The second area is cut: Linux would have unmapped the first one already. We change
    // nothing.
    let snap = env.snapshot();
    let mut c = env.c();
    assert_eq!(c.unmap(ioas, base, 10 * PG), Err(errno::ENOENT));
    assert_eq!(env.snapshot(), snap);
    assert_eq!(env.dma(dev::A, base), Some(env.hpa(0)));
    // A pin in the range: EBUSY, nothing unmapped.
    let acc = env.fd.create_access(env.g).unwrap();
    env.fd.access_attach(env.g, acc, ioas).unwrap();
    env.fd.access_pin(env.g, acc, base + 8 * PG, PG).unwrap();
    let snap = env.snapshot();
    let mut c = env.c();
    assert_eq!(c.unmap(ioas, 0, u64::MAX), Err(errno::EBUSY));
    let le = c.last_error();
    assert_eq!((le.out_reason, le.out_object_id), (reason::PINNED, acc));
    assert_eq!(env.snapshot(), snap);
    env.fd.access_unpin(env.g, acc, base + 8 * PG, PG).unwrap();
    assert_eq!(env.c().unmap(ioas, 0, u64::MAX), Ok(8 * PG));
    env.fd.destroy_access(env.g, acc).unwrap();
    env.teardown();
}

#[test]
fn area_auto_iova() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    // Alignment follows the length (gpa 0 is aligned to anything).
    for pages in 1..=16u64 {
        let iova = c.map_auto(ioas, 0, pages * PG).unwrap();
        assert_ne!(iova, 0);
        assert_eq!(iova % (pages * PG).next_power_of_two(), 0, "{pages} pages");
    }
    // ...and the guest-physical alignment: a 2 MiB map of a 2 MiB-aligned GPA lands 2 MiB
    // aligned, a map of an odd page is only page aligned.
    let iova = c.map_auto(ioas, 2 * MB, 2 * MB).unwrap();
    assert_eq!(iova % (2 * MB), 0);
    let iova = c.map_auto(ioas, 3 * PG, 64 * PG).unwrap();
    assert_eq!(iova % PG, 0);
    c.unmap(ioas, 0, u64::MAX).unwrap();
    // Around a reserved range (device I's direct-mapped region) inside an allowed list.
    let i = env.id(dev::I);
    let mut c = env.c();
    c.attach(i, ioas).unwrap();
    let allowed = [
        (RMRR.0 - 16 * PG, RMRR.0 - 1),
        (RMRR.1 + 1, RMRR.1 + 64 * PG),
    ];
    c.allow_iovas(ioas, &allowed).unwrap();
    assert_eq!(c.map_auto(ioas, 0, 16 * PG), Ok(allowed[0].0));
    assert_eq!(c.map_auto(ioas, 0, 16 * PG), Ok(allowed[1].0));
    assert_eq!(c.map_auto(ioas, 0, 32 * PG), Ok(allowed[1].0 + 32 * PG));
    assert_eq!(c.map_auto(ioas, 0, 32 * PG), Err(errno::ENOSPC));
    assert_eq!(c.last_error().out_reason, reason::NO_IOVA_SPACE);
    // An allowed list crossing the reserved range is refused.
    assert_eq!(
        c.allow_iovas(ioas, &[(RMRR.0 - 16 * PG, RMRR.0 + PG - 1)]),
        Err(errno::EADDRINUSE)
    );
    // Fixed maps may go anywhere outside the reserved set, even outside the allowed list.
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    assert_eq!(c.map_fixed(ioas, RMRR.0, 0, PG), Err(errno::EADDRINUSE));
    assert_eq!(c.last_error().out_reason, reason::IOVA_RESERVED);
    assert_eq!(c.map_fixed(ioas, 1 << 39, 0, PG), Err(errno::EADDRINUSE));
    env.teardown();
}

#[test]
fn reserved_overflow() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    // The last page of the address space: an automatic map that would run past 2^64 fails
    // cleanly.
    c.allow_iovas(ioas, &[(u64::MAX - PG + 1, u64::MAX)])
        .unwrap();
    assert_eq!(c.map_auto(ioas, 0, 2 * PG), Err(errno::ENOSPC));
    assert_eq!(c.map_auto(ioas, 0, PG), Ok(u64::MAX - PG + 1));
    assert_eq!(c.unmap(ioas, u64::MAX - PG + 1, PG), Ok(PG));
    // Below a device's aperture end: the reserved range [2^39, 2^64) leaves no room.
    let i = env.id(dev::I);
    let mut c = env.c();
    let ioas2 = c.ioas_alloc().unwrap();
    c.attach(i, ioas2).unwrap();
    c.allow_iovas(ioas2, &[((1 << 39) - 16 * PG, (1 << 39) - 1)])
        .unwrap();
    assert_eq!(c.map_auto(ioas2, 0, 32 * PG), Err(errno::ENOSPC));
    assert_eq!(c.map_auto(ioas2, 0, 16 * PG), Ok((1 << 39) - 16 * PG));
    env.teardown();
}

#[test]
fn area_allowed() {
    let mut env = Env::new();
    let i = env.id(dev::I);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    // A device whose reserved region falls inside an allowed range cannot attach.
    c.allow_iovas(ioas, &[(RMRR.0, RMRR.0 + MB - 1)]).unwrap();
    assert_eq!(c.attach(i, ioas), Err(errno::EADDRINUSE));
    assert_eq!(c.last_error().out_reason, reason::RESERVED_IN_ALLOWED);
    // Allowed ranges are checked: ordering, alignment, overlap.
    assert_eq!(c.allow_iovas(ioas, &[(PG, 0)]), Err(errno::EINVAL));
    assert_eq!(c.allow_iovas(ioas, &[(1, PG - 1)]), Err(errno::EINVAL));
    assert_eq!(
        c.allow_iovas(ioas, &[(0, 2 * PG - 1), (PG, 3 * PG - 1)]),
        Err(errno::EINVAL)
    );
    assert_eq!(c.last_error().out_reason, reason::RANGES_OVERLAP);
    // A failed ALLOW_IOVAS keeps the old list.
    assert_eq!(c.attach(i, ioas), Err(errno::EADDRINUSE));
    c.allow_iovas(ioas, &[]).unwrap();
    c.attach(i, ioas).unwrap();
    // Allowing over a reserved range.
    assert_eq!(
        c.allow_iovas(ioas, &[(RMRR.0, RMRR.0 + MB - 1)]),
        Err(errno::EADDRINUSE)
    );
    assert_eq!(
        c.allow_iovas(ioas, &[(0, u64::MAX)]),
        Err(errno::EADDRINUSE)
    );
    c.allow_iovas(ioas, &[(0x100_0000, 0x1ff_ffff), (0x1000, 0x1fff)])
        .unwrap();
    assert_eq!(c.map_auto(ioas, 0, PG), Ok(0x1000));
    let too_many: std::vec::Vec<_> = (0..17u64)
        .map(|k| (k * 2 * PG, k * 2 * PG + PG - 1))
        .collect();
    assert_eq!(c.allow_iovas(ioas, &too_many), Err(errno::EINVAL));
    env.teardown();
}

#[test]
fn copy_area() {
    let mut env = Env::new();
    let (a, c_dev) = (env.id(dev::A), env.id(dev::C));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    c.attach(c_dev, ioas2).unwrap();
    let src = c.map_auto(ioas, 4 * MB, 16 * PG).unwrap();
    // Within one IOAS.
    let dst = c.copy(ioas, ioas, src, 16 * PG, RW, 0).unwrap();
    assert_ne!(dst, src);
    // To another IOAS, at a fixed IOVA.
    c.copy(
        ioas2,
        ioas,
        src + 4 * PG,
        8 * PG,
        RW | MAP_FIXED_IOVA,
        0x700_0000,
    )
    .unwrap();
    assert_eq!(env.dma(dev::A, dst + PG), Some(env.hpa(4 * MB + PG)));
    assert_eq!(env.dma(dev::C, 0x700_0000), Some(env.hpa(4 * MB + 4 * PG)));
    let mut c = env.c();
    // Copying onto an existing mapping, from an uncovered source, with bad flags.
    assert_eq!(
        c.copy(ioas2, ioas, src, PG, RW | MAP_FIXED_IOVA, 0x700_0000),
        Err(errno::EEXIST)
    );
    assert_eq!(
        c.copy(ioas2, ioas, 0x7fff_0000_0000, PG, RW, 0),
        Err(errno::ENOENT)
    );
    assert_eq!(c.copy(ioas2, ioas, src, PG, 0, 0), Err(errno::EINVAL));
    assert_eq!(
        c.copy(ioas2, ioas, src, PG, RW | 1 << 9, 0),
        Err(errno::EOPNOTSUPP)
    );
    // A read-only copy of read-only guest memory.
    let ro = c.map(ioas, 1 << 30, 4 * PG, MAP_READABLE, 0).unwrap();
    assert_eq!(c.copy(ioas2, ioas, ro, 4 * PG, RW, 0), Err(errno::EPERM));
    c.copy(ioas2, ioas, ro, 4 * PG, MAP_READABLE, 0).unwrap();
    env.teardown();
}

#[test]
fn copy_sweep() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let src_ioas = c.ioas_alloc().unwrap();
    let dst_ioas = c.ioas_alloc().unwrap();
    c.attach(a, dst_ioas).unwrap();
    // A source made of three contiguous areas with different guest memory.
    let base = 0x200_0000u64;
    c.map_fixed(src_ioas, base, 0, 4 * PG).unwrap();
    c.map_fixed(src_ioas, base + 4 * PG, 64 * PG, 4 * PG)
        .unwrap();
    c.map_fixed(src_ioas, base + 8 * PG, 32 * MB, 4 * PG)
        .unwrap();
    for start in 0..12u64 {
        for pages in 1..=12 - start {
            let mut c = env.c();
            let dst = c
                .copy(dst_ioas, src_ioas, base + start * PG, pages * PG, RW, 0)
                .unwrap();
            for p in 0..pages {
                let s = start + p;
                let gpa = [0, 64 * PG, 32 * MB][(s / 4) as usize] + (s % 4) * PG;
                assert_eq!(env.dma(dev::A, dst + p * PG), Some(env.hpa(gpa)));
            }
            env.check();
            assert_eq!(env.c().unmap(dst_ioas, 0, u64::MAX), Ok(pages * PG));
        }
    }
    let mut c = env.c();
    assert_eq!(
        c.copy(dst_ioas, src_ioas, base - PG, 2 * PG, RW, 0),
        Err(errno::ENOENT)
    );
    assert_eq!(
        c.copy(dst_ioas, src_ioas, base + 11 * PG, 2 * PG, RW, 0),
        Err(errno::ENOENT)
    );
    env.teardown();
}

#[test]
fn iova_ranges() {
    let mut env = Env::new();
    let (a, i) = (env.id(dev::A), env.id(dev::I));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    // No device: everything.
    assert_eq!(c.iova_ranges(ioas), Ok(std::vec![(0, u64::MAX)]));
    // One device: its aperture minus the MSI window.
    c.attach(a, ioas).unwrap();
    let one = std::vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)];
    assert_eq!(c.iova_ranges(ioas), Ok(one.clone()));
    // The array too small: EMSGSIZE, the count, and as much as fits.
    let (e, n, r) = c.iova_ranges_cap(ioas, 1);
    assert_eq!((e, n, r), (errno::EMSGSIZE, 2, std::vec![one[0]]));
    let (e, n, _) = c.iova_ranges_cap(ioas, 0);
    assert_eq!((e, n), (errno::EMSGSIZE, 2));
    // A second device with a smaller aperture and a direct-mapped region narrows it...
    let hwpt = c.hwpt_alloc(i, ioas, 0).unwrap();
    c.attach(i, hwpt).unwrap();
    assert_eq!(
        c.iova_ranges(ioas),
        Ok(std::vec![
            (0, RMRR.0 - 1),
            (RMRR.1 + 1, 0xfedf_ffff),
            (0xfef0_0000, (1 << 39) - 1)
        ])
    );
    // ...and detaching widens it back (the manual HWPT's own aperture still counts).
    c.detach(i).unwrap();
    assert_eq!(
        c.iova_ranges(ioas),
        Ok(std::vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)])
    );
    c.destroy(hwpt).unwrap();
    assert_eq!(c.iova_ranges(ioas), Ok(one));
    c.detach(a).unwrap();
    assert_eq!(c.iova_ranges(ioas), Ok(std::vec![(0, u64::MAX)]));
    env.teardown();
}

#[test]
fn ioas_iova_alloc() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    for len in [1, PG - 1, PG + 1, 2 * PG - 1] {
        assert_eq!(c.map_auto(ioas, 0, len), Err(errno::EINVAL));
        assert_eq!(c.last_error().out_reason, reason::MISALIGNED);
    }
    for len in [PG, 2 * PG] {
        c.map_auto(ioas, 0, len).unwrap();
    }
    env.teardown();
}

#[test]
fn area_table_full() {
    let mut env = Env::with_limits(super::super::Limits {
        max_areas_per_ioas: 4,
        ..Default::default()
    });
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    for k in 0..4 {
        c.map_auto(ioas, k * PG, PG).unwrap();
    }
    assert_eq!(c.map_auto(ioas, 0, PG), Err(errno::ENOSPC));
    assert_eq!(c.last_error().out_reason, reason::AREA_TABLE_FULL);
    let other = c.ioas_alloc().unwrap();
    let iova = c.map_auto(other, 0, PG).unwrap();
    assert_eq!(c.copy(ioas, other, iova, PG, RW, 0), Err(errno::ENOSPC));
    env.teardown();
}

fn entry(gpa: u64, len: u64, iova: u64, flags: u32) -> MapEntry {
    MapEntry {
        flags,
        reserved: 0,
        gpa,
        length: len,
        iova,
    }
}

#[test]
fn map_batch() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let fixed = RW | MAP_FIXED_IOVA;
    let list = [
        entry(0, PG, 0x10_0000, fixed),
        entry(PG, 2 * PG, 0, RW),
        entry(0, PG, 0x10_0000, fixed), // collides with entry 0
        entry(0, PG, 0x20_0000, fixed),
    ];
    // Without BATCH_ATOMIC: stops at the failing entry, the earlier ones stay.
    let (e, done, out) = c.map_batch(ioas, 0, &list);
    assert_eq!((e, done), (errno::EEXIST, 2));
    assert_eq!(c.last_error().out_index, 2);
    assert_ne!(out[1].iova, 0);
    assert_eq!(c.unmap(ioas, 0, u64::MAX), Ok(3 * PG));
    // With BATCH_ATOMIC: all or nothing.
    let snap = env.snapshot();
    let mut c = env.c();
    let (e, done, _) = c.map_batch(ioas, BATCH_ATOMIC, &list);
    assert_eq!((e, done), (errno::EEXIST, 0));
    assert_eq!(env.snapshot(), snap);
    let mut c = env.c();
    let ok = [list[0], list[1], list[3]];
    let (e, done, out) = c.map_batch(ioas, BATCH_ATOMIC, &ok);
    assert_eq!((e, done), (0, 3));
    assert_eq!(env.dma(dev::A, out[1].iova + PG), Some(env.hpa(2 * PG)));
    let mut c = env.c();
    // Limits and flags.
    let many = std::vec![entry(0, PG, 0, RW); 65];
    assert_eq!(c.map_batch(ioas, 0, &many).0, errno::EINVAL);
    assert_eq!(c.map_batch(ioas, 2, &ok).0, errno::EOPNOTSUPP);
    let (e, done, _) = c.map_batch(ioas, 0, &[]);
    assert_eq!((e, done), (0, 0));
    env.teardown();
}

#[test]
fn unmap_batch() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    for k in 0..4u64 {
        c.map_fixed(ioas, 0x10_0000 + k * 0x1_0000, 0, 2 * PG)
            .unwrap();
    }
    let u = |iova: u64, length: u64| UnmapEntry { iova, length };
    let list = [
        u(0x10_0000, 2 * PG),
        u(0x11_0000, 0x1_0000),
        u(0x12_0000, PG), // splits
        u(0x13_0000, 2 * PG),
    ];
    let snap = env.snapshot();
    let mut c = env.c();
    let (e, done, _) = c.unmap_batch(ioas, BATCH_ATOMIC, &list);
    assert_eq!((e, done), (errno::ENOENT, 0));
    assert_eq!(c.last_error().out_index, 2);
    assert_eq!(env.snapshot(), snap);
    let mut c = env.c();
    // Overlapping entries are refused in atomic mode.
    let (e, _, _) = c.unmap_batch(ioas, BATCH_ATOMIC, &[list[0], u(0x10_0000, 0x1_0000)]);
    assert_eq!(e, errno::EINVAL);
    let (e, done, out) = c.unmap_batch(ioas, 0, &list);
    assert_eq!((e, done), (errno::ENOENT, 2));
    assert_eq!((out[0].length, out[1].length), (2 * PG, 2 * PG));
    let (e, done, _) = c.unmap_batch(ioas, BATCH_ATOMIC, &[u(0x12_0000, 2 * PG), list[3]]);
    assert_eq!((e, done), (0, 2));
    assert_eq!(c.unmap(ioas, 0, u64::MAX), Ok(0));
    env.teardown();
}

/// An UNMAP of more areas than one snapshot holds (`area_slots::NEAR`): runs of IOVA-adjacent
/// areas (cleared as one range) and gaps between them, every page translated before and none
/// after, the exact byte count; a split area anywhere in the range fails it first and leaves
/// every area mapped.
#[test]
fn unmap_of_many_areas_with_runs_and_gaps() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let base = 0x80_0000u64;
    // Pages 0..12 one area each, 13..16 one area, 20..30 one area each: 23 areas.
    let mut pages = std::vec::Vec::new();
    for i in (0..12).chain(20..30) {
        c.map_fixed(ioas, base + i * PG, 2 * i * PG, PG).unwrap();
        pages.push(i);
    }
    c.map_fixed(ioas, base + 13 * PG, 100 * PG, 4 * PG).unwrap();
    pages.extend(13..17);
    // An area across the end of the range: the unmap fails and changes nothing.
    c.map_fixed(ioas, base + 31 * PG, 200 * PG, 2 * PG).unwrap();
    assert_eq!(c.unmap(ioas, base, 32 * PG), Err(errno::ENOENT));
    assert_eq!(c.last_error().out_reason, reason::SPLITS_MAPPING);
    for &i in &pages {
        assert!(env.dma(dev::A, base + i * PG).is_some(), "page {i}");
    }
    let mut c = env.c();
    assert_eq!(c.unmap(ioas, base, 31 * PG), Ok(26 * PG));
    for i in 0..31 {
        assert_eq!(env.dma(dev::A, base + i * PG), None, "page {i}");
    }
    assert!(env.dma(dev::A, base + 31 * PG).is_some());
    env.check();
    env.teardown();
}

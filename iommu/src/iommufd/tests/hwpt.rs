//! HWPT: allocation, attach to HWPTs, replace, coherency, clone, domain contents, dirty
//! tracking.

use hvabi::{
    DIRTY_BITMAP_NO_CLEAR, HWPT_DIRTY_TRACKING, HWPT_ENFORCE_CACHE_COHERENCY, HWPT_NEST_PARENT,
    HwptAlloc, errno, kind, op, reason,
};

use super::super::IommuHw;
use super::super::client::RW;
use super::{Env, MB, PG, dev};

#[test]
fn alloc_hwpt_nested() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let parent = c.hwpt_alloc(a, ioas, HWPT_NEST_PARENT).unwrap();
    // Nested on a nest parent: the hardware cannot.
    assert_eq!(c.hwpt_alloc(a, parent, 0), Err(errno::EOPNOTSUPP));
    assert_eq!(c.last_error().out_reason, reason::NESTING_UNSUPPORTED);
    // Wrong kinds and missing objects.
    assert_eq!(c.hwpt_alloc(a, a, 0), Err(errno::EINVAL));
    assert_eq!(c.hwpt_alloc(a, 0, 0), Err(errno::ENOENT));
    assert_eq!(c.hwpt_alloc(a, 0x7fff_0000, 0), Err(errno::ENOENT));
    assert_eq!(c.hwpt_alloc(ioas, ioas, 0), Err(errno::ENOENT));
    assert_eq!(c.last_error().out_reason, reason::WRONG_KIND);
    // Driver data.
    let with = |c: &mut super::super::client::Client<'_, _>, t, l, p| {
        c.call(
            op::HWPT_ALLOC,
            &HwptAlloc {
                dev_id: a,
                pt_id: ioas,
                data_type: t,
                data_len: l,
                data_gpa: p,
                ..Default::default()
            },
        )
        .map_err(|e| e.0)
    };
    assert_eq!(with(&mut c, 1, 16, 0x1000).unwrap_err(), errno::EOPNOTSUPP);
    assert_eq!(with(&mut c, 0, 16, 0).unwrap_err(), errno::EINVAL);
    assert_eq!(with(&mut c, 0, 0, 0x1000).unwrap_err(), errno::EINVAL);
    // The parent is busy while a device uses it.
    c.attach(a, parent).unwrap();
    assert_eq!(c.destroy(parent).unwrap_err().0, errno::EBUSY);
    c.detach(a).unwrap();
    c.destroy(parent).unwrap();
    env.teardown();
}

#[test]
fn hwpt_attach() {
    let mut env = Env::new();
    let (a, cd) = (env.id(dev::A), env.id(dev::C));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let hwpt = c.attach(a, ioas).unwrap();
    // Another device directly onto the automatic HWPT by ID.
    assert_eq!(c.attach(cd, hwpt), Ok(hwpt));
    assert_eq!(c.attach(cd, 0x7654), Err(errno::ENOENT));
    c.map_auto(ioas, 0, PG).unwrap();
    env.check();
    assert_eq!(env.dma(dev::C, 0), None);
    let mut c = env.c();
    c.detach(a).unwrap();
    c.detach(cd).unwrap();
    // The automatic HWPT went with its last user.
    assert_eq!(c.destroy(hwpt).unwrap_err().0, errno::ENOENT);
    env.teardown();
}

#[test]
fn basic() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    // Across the two host runs of guest RAM.
    let gpa = 128 * MB - 4 * PG;
    let iova = c.map_auto(ioas, gpa, 8 * PG).unwrap();
    for p in 0..8 {
        assert_eq!(env.dma(dev::A, iova + p * PG), Some(env.hpa(gpa + p * PG)));
    }
    assert_eq!(env.dma(dev::A, iova + 8 * PG), None);
    let mut c = env.c();
    // Partly or wholly not the guest's.
    assert_eq!(c.map_auto(ioas, 256 * MB - PG, 2 * PG), Err(errno::EPERM));
    assert_eq!(c.map_auto(ioas, 512 * MB, PG), Err(errno::EPERM));
    assert_eq!(c.map_auto(ioas, u64::MAX - PG + 1, PG), Err(errno::EPERM));
    // Large leaves where guest and host alignment allow them.
    let big = c.map_auto(ioas, 2 * MB, 4 * MB).unwrap();
    let cd = c.fd.device_id(c.guest, dev::C).unwrap();
    let hwpt = c.attach(cd, ioas).unwrap();
    let d = env.fd.hwpt_domain(env.g, hwpt).unwrap();
    let t = env.fd.hw().translate(d, big + MB).unwrap();
    assert_eq!(t.leaf.len(), 2 * MB);
    assert_eq!(t.pa, env.hpa(3 * MB));
    env.teardown();
}

#[test]
fn all_aligns() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    for start in 0..12u64 {
        for pages in 1..=12u64 {
            let iova = 0x4000_0000 + start * PG;
            let gpa = 2 * MB + start * PG;
            env.c().map_fixed(ioas, iova, gpa, pages * PG).unwrap();
            for p in [0, pages - 1] {
                assert_eq!(env.dma(dev::A, iova + p * PG), Some(env.hpa(gpa + p * PG)));
            }
            env.check();
            assert_eq!(env.c().unmap(ioas, iova, pages * PG), Ok(pages * PG));
        }
    }
    // Superpage-sized too: 2 MiB multiples at 2 MiB alignment and off it.
    for (iova, gpa, len) in [
        (0x4000_0000, 0, 6 * MB),
        (0x4000_0000 + PG, 2 * MB + PG, 4 * MB),
        (0x4020_0000, 2 * MB, 2 * MB + PG),
    ] {
        env.c().map_fixed(ioas, iova, gpa, len).unwrap();
        env.check();
        assert_eq!(env.c().unmap(ioas, iova, len), Ok(len));
    }
    assert_eq!(
        env.fd.hw().frames_in_use(),
        env.fd.hw().domain_table_pages()
    );
    env.teardown();
}

#[test]
fn all_aligns_copy() {
    let mut env = Env::new();
    let (a, h) = (env.id(dev::A), env.id(dev::H));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let first = c.attach(a, ioas).unwrap();
    for start in 0..6u64 {
        for pages in 1..=6u64 {
            let iova = 0x800_0000 + start * PG;
            let gpa = 4 * MB + start * PG;
            env.c().map_fixed(ioas, iova, gpa, pages * PG).unwrap();
            // A second domain (another IOMMU unit: a second automatic HWPT) is filled from
            // the IOAS, then goes away again.
            let second = env.c().attach(h, ioas).unwrap();
            assert_ne!(second, first);
            env.check();
            assert_eq!(
                env.dma(dev::H, iova + (pages - 1) * PG),
                Some(env.hpa(gpa + (pages - 1) * PG))
            );
            env.c().detach(h).unwrap();
            env.check();
            assert_eq!(env.c().unmap(ioas, iova, pages * PG), Ok(pages * PG));
        }
    }
    env.teardown();
}

#[test]
fn replace() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, PG, PG).unwrap();
    let auto1 = c.attach(a, ioas).unwrap();
    // To a new IOAS: the old automatic HWPT is freed.
    let auto2 = c.replace(a, ioas2).unwrap();
    assert_ne!(auto1, auto2);
    assert_eq!(c.destroy(auto1).unwrap_err().0, errno::ENOENT);
    assert_eq!(env.dma(dev::A, 0x10_0000), Some(env.hpa(PG)));
    let mut c = env.c();
    // Between HWPTs, including to the same one (a no-op).
    let manual = c.hwpt_alloc(a, ioas, 0).unwrap();
    assert_eq!(c.replace(a, manual), Ok(manual));
    assert_eq!(c.replace(a, manual), Ok(manual));
    // Replacing with the IOAS the current HWPT mirrors keeps it.
    assert_eq!(c.replace(a, ioas), Ok(manual));
    assert_eq!(env.dma(dev::A, 0x10_0000), Some(env.hpa(0)));
    let mut c = env.c();
    // Back to the second IOAS (a new automatic HWPT), then the manual one is idle.
    let auto3 = c.replace(a, ioas2).unwrap();
    assert_ne!(auto3, manual);
    c.destroy(manual).unwrap();
    // Replace of something not attached, and to a wrong kind.
    let cd = c.fd.device_id(c.guest, dev::C).unwrap();
    assert_eq!(c.replace(cd, ioas), Err(errno::EINVAL));
    assert_eq!(c.last_error().out_reason, reason::NOT_ATTACHED);
    assert_eq!(c.replace(a, cd), Err(errno::EINVAL));
    assert_eq!(c.replace(a, 0x7000), Err(errno::ENOENT));
    // Attach over an attachment: EBUSY (use REPLACE).
    assert_eq!(c.attach(a, ioas2), Err(errno::EBUSY));
    env.teardown();
}

#[test]
fn alloc_hwpt() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    assert_eq!(c.hwpt_alloc(a, ioas, 1 << 5), Err(errno::EOPNOTSUPP));
    assert_eq!(c.last_error().out_reason, reason::ARG_UNKNOWN_FLAGS);
    let plain = c.hwpt_alloc(a, ioas, 0).unwrap();
    let parent = c.hwpt_alloc(a, ioas, HWPT_NEST_PARENT).unwrap();
    let cc = c.hwpt_alloc(a, ioas, HWPT_ENFORCE_CACHE_COHERENCY).unwrap();
    // Rotation by replace.
    assert_eq!(c.attach(a, plain), Ok(plain));
    for h in [parent, cc, plain, cc] {
        assert_eq!(c.replace(a, h), Ok(h));
        assert_eq!(c.destroy(h).unwrap_err().0, errno::EBUSY);
    }
    c.detach(a).unwrap();
    for h in [plain, parent, cc] {
        c.destroy(h).unwrap();
    }
    // Full: MAX_HWPTS_PER_IOAS on one IOAS.
    for _ in 0..super::super::MAX_HWPTS_PER_IOAS {
        c.hwpt_alloc(a, ioas, 0).unwrap();
    }
    assert_eq!(c.hwpt_alloc(a, ioas, 0), Err(errno::ENOSPC));
    assert_eq!(c.attach(a, ioas), Err(errno::ENOSPC));
    assert_eq!(c.last_error().out_reason, reason::HWPT_TABLE_FULL);
    env.teardown();
}

#[test]
fn cc_mismatch() {
    let mut env = Env::new();
    let (a, b) = (env.id(dev::A), env.id(dev::B));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, 4 * PG).unwrap();
    // A can enforce coherency: its automatic HWPT does.
    let cc = c.attach(a, ioas).unwrap();
    // B cannot: attaching it to the IOAS makes a second automatic HWPT, not coherent.
    let non_cc = c.attach(b, ioas).unwrap();
    assert_ne!(cc, non_cc);
    let d_cc = env.fd.hwpt_domain(env.g, cc).unwrap();
    let d_non = env.fd.hwpt_domain(env.g, non_cc).unwrap();
    let hw = env.fd.hw();
    assert_eq!(hw.translate(d_cc, 0x10_0000).unwrap().snoop, Some(true));
    assert_eq!(hw.translate(d_non, 0x10_0000).unwrap().snoop, Some(false));
    env.check();
    let mut c = env.c();
    // B on the coherent HWPT: a distinct error naming B.
    c.detach(b).unwrap();
    assert_eq!(c.attach(b, cc), Err(errno::EMEDIUMTYPE));
    let le = c.last_error();
    assert_eq!(
        (le.out_reason, le.out_object_kind, le.out_object_id),
        (reason::CC_UNSUPPORTED_BY_DEVICE, kind::DEVICE, b)
    );
    assert_eq!(
        c.hwpt_alloc(b, ioas, HWPT_ENFORCE_CACHE_COHERENCY),
        Err(errno::EMEDIUMTYPE)
    );
    // A non-coherent HWPT suits everyone: clone A's, move A to it, B joins.
    let clone = c.hwpt_clone(cc, a, 0).unwrap();
    assert_eq!(c.replace(a, clone), Ok(clone));
    assert_eq!(c.attach(b, clone), Ok(clone));
    assert_eq!(c.attach(b, ioas), Err(errno::EBUSY));
    // The coherent automatic HWPT went with its last user.
    assert_eq!(c.destroy(cc).unwrap_err().0, errno::ENOENT);
    env.check();
    assert_eq!(env.dma(dev::B, 0x10_0000 + PG), Some(env.hpa(PG)));
    // A group with a non-coherent member never lands in a coherent HWPT (F coherent, G not).
    let f = env.id(dev::F);
    let mut c = env.c();
    let ioas2 = c.ioas_alloc().unwrap();
    let h = c.attach(f, ioas2).unwrap();
    let fresh_cc = c
        .hwpt_alloc(a, ioas2, HWPT_ENFORCE_CACHE_COHERENCY)
        .unwrap();
    assert_eq!(c.replace(f, fresh_cc), Err(errno::EMEDIUMTYPE));
    assert_eq!(
        c.last_error().out_object_id,
        c.fd.device_id(c.guest, dev::G).unwrap()
    );
    c.map_fixed(ioas2, 0x10_0000, 0, PG).unwrap();
    assert_eq!(
        env.fd.hwpt_domain(env.g, h),
        env.fd.hw().device_domain(dev::G, None)
    );
    assert_eq!(env.dma(dev::G, 0x10_0000), Some(env.hpa(0)));
    env.check();
    env.teardown();
}

#[test]
fn other_unit_gets_its_own_hwpt() {
    let mut env = Env::new();
    let (a, h) = (env.id(dev::A), env.id(dev::H));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ha = c.attach(a, ioas).unwrap();
    let hh = c.attach(h, ioas).unwrap();
    assert_ne!(ha, hh);
    c.detach(h).unwrap();
    assert_eq!(c.attach(h, ha), Err(errno::EINVAL));
    assert_eq!(c.last_error().out_reason, reason::HW_INCOMPATIBLE);
    env.teardown();
}

#[test]
fn enforce_dirty() {
    let mut env = Env::new();
    let (a, cd) = (env.id(dev::A), env.id(dev::C));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    assert_eq!(
        c.hwpt_alloc(a, ioas, HWPT_DIRTY_TRACKING),
        Err(errno::EOPNOTSUPP)
    );
    let dirty = c.hwpt_alloc(cd, ioas, HWPT_DIRTY_TRACKING).unwrap();
    assert_eq!(c.attach(a, dirty), Err(errno::EINVAL));
    assert_eq!(
        c.last_error().out_reason,
        reason::DIRTY_UNSUPPORTED_BY_DEVICE
    );
    c.attach(cd, dirty).unwrap();
    env.teardown();
}

#[test]
fn set_dirty_tracking() {
    let mut env = Env::new();
    let cd = env.id(dev::C);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let dirty = c.hwpt_alloc(cd, ioas, HWPT_DIRTY_TRACKING).unwrap();
    let plain = c.hwpt_alloc(cd, ioas, 0).unwrap();
    c.set_dirty_tracking(dirty, true).unwrap();
    c.set_dirty_tracking(dirty, false).unwrap();
    assert_eq!(c.set_dirty_tracking(plain, true), Err(errno::EOPNOTSUPP));
    assert_eq!(c.set_dirty_tracking(ioas, true), Err(errno::ENOENT));
    env.teardown();
}

#[test]
fn device_dirty_capability() {
    let mut env = Env::new();
    let devs = env.c().devices().unwrap();
    for d in devs {
        let expect = d.hw_id == 0x0018;
        assert_eq!(d.flags & hvabi::DEVICE_DIRTY_TRACKING != 0, expect);
    }
    let devs = env.c2().devices().unwrap();
    assert_ne!(devs[0].flags & hvabi::DEVICE_DIRTY_TRACKING, 0);
    env.teardown();
}

/// Attaches C to a dirty-tracking HWPT over `pages` pages at IOVA 0x1000_0000.
fn dirty_setup(env: &mut Env, pages: u64) -> (u32, u64) {
    let cd = env.id(dev::C);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let hwpt = c.hwpt_alloc(cd, ioas, HWPT_DIRTY_TRACKING).unwrap();
    c.attach(cd, hwpt).unwrap();
    let iova = 0x1000_0000;
    c.map_fixed(ioas, iova, 0, pages * PG).unwrap();
    c.set_dirty_tracking(hwpt, true).unwrap();
    (hwpt, iova)
}

fn bit(b: &[u8], i: u64) -> bool {
    b[(i / 8) as usize] & (1 << (i % 8)) != 0
}

#[test]
fn get_dirty_bitmap() {
    // Bitmap sizes from part of a byte to more than one 512-byte chunk.
    for pages in [4u64, 8, 60, 4096, 5000] {
        for bitmap_gpa in [0x0e00_0000, 0x0e00_0000 + PG, 0x0e00_0000 + 0xff1] {
            let mut env = Env::new();
            let (hwpt, iova) = dirty_setup(&mut env, pages);
            let dirty = |p: u64| p.is_multiple_of(3) || p % 7 == 1;
            for p in (0..pages).filter(|&p| dirty(p)) {
                env.fd
                    .hw_mut()
                    .dma(dev::C, None, iova + p * PG, true)
                    .unwrap();
            }
            // Reads do not dirty.
            env.fd
                .hw_mut()
                .dma(dev::C, None, iova + 2 * PG, false)
                .unwrap();
            let mut c = env.c();
            let bm = c
                .dirty_bitmap(hwpt, iova, pages * PG, PG, 0, bitmap_gpa)
                .unwrap();
            for p in 0..pages {
                assert_eq!(bit(&bm, p), dirty(p), "page {p} of {pages}");
            }
            // Cleared by the read.
            let bm = c
                .dirty_bitmap(hwpt, iova, pages * PG, PG, 0, bitmap_gpa)
                .unwrap();
            assert!(bm.iter().all(|&b| b == 0));
            env.teardown();
        }
    }
    // Larger granules: a bit per 8 KiB.
    let mut env = Env::new();
    let (hwpt, iova) = dirty_setup(&mut env, 16);
    env.fd
        .hw_mut()
        .dma(dev::C, None, iova + 5 * PG, true)
        .unwrap();
    let mut c = env.c();
    let bm = c
        .dirty_bitmap(hwpt, iova, 16 * PG, 2 * PG, 0, 0x0e00_0000)
        .unwrap();
    assert_eq!(bm, std::vec![1 << 2]);
    // Errors.
    let at = 0x0e00_0000;
    assert_eq!(
        c.dirty_bitmap(hwpt, iova, 16 * PG, 0, 0, at),
        Err(errno::EINVAL)
    );
    assert_eq!(
        c.dirty_bitmap(hwpt, iova, 16 * PG, 3000, 0, at),
        Err(errno::EINVAL)
    );
    assert_eq!(c.dirty_bitmap(hwpt, iova, 0, PG, 0, at), Err(errno::EINVAL));
    assert_eq!(
        c.dirty_bitmap(hwpt, iova + PG, 2 * PG, 2 * PG, 0, at),
        Err(errno::EINVAL)
    );
    assert_eq!(
        c.dirty_bitmap(hwpt, iova, 17 * PG, PG, 0, at),
        Err(errno::EINVAL)
    );
    assert_eq!(c.last_error().out_reason, reason::NOT_COVERED);
    assert_eq!(
        c.dirty_bitmap(hwpt, iova, 16 * PG, PG, 2, at),
        Err(errno::EOPNOTSUPP)
    );
    assert_eq!(
        c.dirty_bitmap(hwpt, iova, 16 * PG, PG, 0, 1 << 30),
        Err(errno::EFAULT)
    );
    assert_eq!(
        c.dirty_bitmap(hwpt, u64::MAX - PG + 1, 2 * PG, PG, 0, at),
        Err(errno::EOVERFLOW)
    );
    let ioas = c.ioas_alloc().unwrap();
    let cd = c.fd.device_id(c.guest, dev::C).unwrap();
    let plain = c.hwpt_alloc(cd, ioas, 0).unwrap();
    assert_eq!(
        c.dirty_bitmap(plain, 0, PG, PG, 0, at),
        Err(errno::EOPNOTSUPP)
    );
    env.teardown();
}

#[test]
fn get_dirty_bitmap_no_clear() {
    let mut env = Env::new();
    let (hwpt, iova) = dirty_setup(&mut env, 64);
    for p in [0u64, 9, 63] {
        env.fd
            .hw_mut()
            .dma(dev::C, None, iova + p * PG, true)
            .unwrap();
    }
    let mut c = env.c();
    for _ in 0..2 {
        let bm = c
            .dirty_bitmap(hwpt, iova, 64 * PG, PG, DIRTY_BITMAP_NO_CLEAR, 0x0e00_0000)
            .unwrap();
        assert!(bit(&bm, 0) && bit(&bm, 9) && bit(&bm, 63) && !bit(&bm, 1));
    }
    c.dirty_bitmap(hwpt, iova, 64 * PG, PG, 0, 0x0e00_0000)
        .unwrap();
    let bm = c
        .dirty_bitmap(hwpt, iova, 64 * PG, PG, 0, 0x0e00_0000)
        .unwrap();
    assert!(bm.iter().all(|&b| b == 0));
    // Enabling again starts clean.
    env.fd.hw_mut().dma(dev::C, None, iova, true).unwrap();
    let mut c = env.c();
    c.set_dirty_tracking(hwpt, true).unwrap();
    let bm = c
        .dirty_bitmap(hwpt, iova, 64 * PG, PG, 0, 0x0e00_0000)
        .unwrap();
    assert!(bm.iter().all(|&b| b == 0));
    let _ = RW;
    env.teardown();
}

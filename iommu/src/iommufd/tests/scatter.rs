//! IOAS_MAP of guest ranges whose host pages are scattered (one `map_runs` walk): every page
//! translates, through the software IOMMU's own table walk (emulated DMA), to what the guest
//! memory's own translation says; a bad host run or a failed table allocation anywhere in the
//! range leaves nothing mapped; the consistency checker agrees after each step. The same guest
//! memory maps through the real VT-d and SMMUv3 backends in `tests/vtd.rs` and
//! `smmu_backend.rs`, checked there by their hand-written hardware walks.

use alloc::vec;

use hvabi::{errno, reason};

use super::super::GuestMemory;
use super::super::hw::IommuHw;
use super::super::sim::{Region, VecGuestMemory};
use super::{Env, MB, PG, dev};

const M2: u64 = 2 * MB;
/// 256 single host pages, none adjacent, in descending host order.
pub(crate) const SCATTERED: u64 = 16 * MB;
/// Pages, a run up to a 2 MiB boundary, a 2 MiB-aligned 2 MiB run, 64 KiB, a page.
pub(crate) const MIXED: u64 = 18 * MB;
pub(crate) const MIXED_LEN: u64 = 2 * M2 + 64 * 1024 + PG;

/// The standard guest's RAM `[0, 256 MiB)` with `[16 MiB, 22 MiB)` scattered over host memory;
/// `spoil`: the scattered page with this index gets a host address that is not page-aligned.
pub(crate) fn scattered_memory(spoil: Option<u64>) -> VecGuestMemory {
    let ram = |gpa: u64, len: u64| Region {
        gpa,
        len,
        hpa: 0x1_0000_0000 + gpa,
        writable: true,
    };
    let run = |gpa: u64, len: u64, hpa: u64| Region {
        gpa,
        len,
        hpa,
        writable: true,
    };
    let mut r = vec![ram(0, SCATTERED)];
    for k in 0..256 {
        let hpa = 0x6_0000_0000 + (255 - k) * 2 * PG + if spoil == Some(k) { 0x800 } else { 0 };
        r.push(run(SCATTERED + k * PG, PG, hpa));
    }
    r.push(run(SCATTERED + MB, MB, 0x6_8000_0000));
    let mut gpa = MIXED;
    for (len, hpa) in [
        (PG, 0x7_0000_3000),
        (PG, 0x7_0010_0000),
        (PG, 0x7_0000_0000),
        (M2 - 3 * PG, 0x7_2000_3000),
        (M2, 0x7_4000_0000),
        (64 * 1024, 0x7_6000_0000),
        (PG, 0x7_7000_5000),
    ] {
        r.push(run(gpa, len, hpa));
        gpa += len;
    }
    r.push(ram(gpa, 256 * MB - gpa));
    VecGuestMemory::new(&r)
}

fn env(spoil: Option<u64>) -> Env {
    let mut env = Env::new();
    env.mem = scattered_memory(spoil);
    env
}

/// Every page of `[iova, iova + len)` reaches the guest memory's own translation of `gpa..`.
fn assert_mapped(env: &mut Env, iova: u64, gpa: u64, len: u64) {
    for k in 0..len / PG {
        let want = env.mem.translate(gpa + k * PG).unwrap().hpa;
        assert_eq!(env.dma(dev::A, iova + k * PG), Some(want), "page {k}");
    }
}

fn assert_unmapped(env: &mut Env, iova: u64, len: u64) {
    for k in 0..len / PG {
        assert_eq!(env.dma(dev::A, iova + k * PG), None, "page {k}");
    }
}

#[test]
fn scattered_host_pages_map_in_one_call() {
    let mut env = env(None);
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let iova = 0x4000_0000;
    c.map_fixed(ioas, iova, SCATTERED, MB).unwrap();
    // Mixed, at a 2 MiB-aligned IOVA so that the 2 MiB run can be one leaf.
    let iova2 = 0x8000_0000 - 2 * MB;
    c.map_fixed(ioas, iova2, MIXED, MIXED_LEN).unwrap();
    // Across the two: the last scattered pages and the contiguous MiB after them.
    let iova3 = 0xc000_0000;
    c.map_fixed(ioas, iova3, SCATTERED + MB - 8 * PG, MB + 8 * PG)
        .unwrap();
    assert_mapped(&mut env, iova, SCATTERED, MB);
    assert_mapped(&mut env, iova2, MIXED, MIXED_LEN);
    assert_mapped(&mut env, iova3, SCATTERED + MB - 8 * PG, MB + 8 * PG);
    env.check();
    // The 2 MiB run is one 2 MiB leaf; its neighbours are pages.
    let d = env.fd.hw().device_domain(dev::A, None).unwrap();
    let leaf = |env: &mut Env, at: u64| {
        let t = env.fd.hw().translate(d, at).unwrap();
        t.leaf.last - t.leaf.start + 1
    };
    assert_eq!(leaf(&mut env, iova2 + M2), M2);
    assert_eq!(leaf(&mut env, iova2 + M2 - PG), PG);
    assert_eq!(leaf(&mut env, iova2 + 2 * M2), PG);
    let mut c = env.c();
    assert_eq!(c.unmap(ioas, iova, MB), Ok(MB));
    assert_eq!(c.unmap(ioas, iova2, MIXED_LEN), Ok(MIXED_LEN));
    assert_eq!(c.unmap(ioas, iova3, MB + 8 * PG), Ok(MB + 8 * PG));
    assert_unmapped(&mut env, iova, MB);
    assert_unmapped(&mut env, iova2, MIXED_LEN);
    env.teardown();
}

#[test]
fn a_bad_host_run_fails_at_its_gpa_and_maps_nothing() {
    let mut env = env(Some(200));
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let iova = 0x4000_0000;
    // A page in the same leaf table, mapped before: the failed map's entries are installed
    // into a published table and rolled back.
    c.map_fixed(ioas, iova + MB, 0, PG).unwrap();
    let before = env.snapshot();
    let mut c = env.c();
    assert_eq!(c.map_fixed(ioas, iova, SCATTERED, MB), Err(errno::EFAULT));
    let e = c.last_error();
    assert_eq!(
        (e.out_reason, e.out_value),
        (reason::GPA_NOT_OWNED, SCATTERED + 200 * PG)
    );
    assert_unmapped(&mut env, iova, MB);
    assert_eq!(env.dma(dev::A, iova + MB), Some(env.hpa(0)));
    assert_eq!(env.snapshot(), before);
    env.check();
    // The pages before the bad one map.
    let mut c = env.c();
    c.map_fixed(ioas, iova, SCATTERED, 200 * PG).unwrap();
    assert_mapped(&mut env, iova, SCATTERED, 200 * PG);
    env.teardown();
}

#[test]
fn a_failed_allocation_anywhere_in_the_range_maps_nothing() {
    let mut env = env(None);
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    // The first MiB of the range's leaf tables exists already (published), the rest is built
    // by the map: a failure is met after entries were installed.
    let iova = 0x8000_0000 - 2 * MB;
    c.map_fixed(ioas, iova - PG, 0, PG).unwrap();
    let before = env.snapshot();
    let mut n = 1;
    loop {
        env.fail.arm(n);
        let r = env.c().map_fixed(ioas, iova, MIXED, MIXED_LEN);
        let fired = env.fail.fired();
        env.fail.disarm();
        if !fired {
            r.unwrap();
            break;
        }
        assert_eq!(r, Err(errno::ENOMEM), "failure {n}");
        assert_unmapped(&mut env, iova, MIXED_LEN);
        assert_eq!(env.snapshot(), before, "failure {n}");
        env.check();
        n += 1;
    }
    assert!(n > 2, "the map allocated tables ({n})");
    assert_mapped(&mut env, iova, MIXED, MIXED_LEN);
    env.teardown();
}

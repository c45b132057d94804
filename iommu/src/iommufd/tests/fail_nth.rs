//! The fail-nth sweep (reference §3.9, and §5 idea 15): for every step of every scenario,
//! rerun the scenario up to that step, then run the step with the n-th allocation failing
//! (object-model allocations and the software IOMMU's: domains, table pages, prepared
//! switches), for n = 1, 2, ... until the step succeeds. After every failure the step must
//! have returned ENOMEM, the state snapshot must equal the one taken before the step (objects,
//! generations, mappings, attachments, hardware translation state), the consistency checker
//! must pass, and tearing everything down must give every table page and domain back.

use std::boxed::Box;
use std::vec::Vec;

use hvabi::{
    DIRTY_BITMAP_NO_CLEAR, HWPT_DIRTY_TRACKING, HWPT_ENFORCE_CACHE_COHERENCY, HWPT_NEST_PARENT,
    MAP_FIXED_IOVA, MapEntry, UnmapEntry, errno,
};

use super::super::client::RW;
use super::{Env, MB, PG, dev};

/// A step: may read and push values (IDs, IOVAs) in the register file.
type Step = Box<dyn Fn(&mut Env, &mut Vec<u64>) -> Result<(), u32>>;

fn step(f: impl Fn(&mut Env, &mut Vec<u64>) -> Result<(), u32> + 'static) -> Step {
    Box::new(f)
}

fn e(x: super::super::Error) -> u32 {
    x.errno
}

/// Sweeps every step; returns the number of injected failures checked.
fn sweep(name: &str, steps: &[Step]) -> u64 {
    let mut total = 0;
    for k in 0..steps.len() {
        let mut n = 1;
        loop {
            assert!(n < 2000, "{name}: step {k} never succeeds");
            let mut env = Env::new();
            let mut regs = Vec::new();
            for (i, s) in steps[..k].iter().enumerate() {
                s(&mut env, &mut regs).unwrap_or_else(|e| panic!("{name}: setup step {i}: {e}"));
            }
            env.check();
            let before = env.snapshot();
            let regs_before = regs.clone();
            env.fail.arm(n);
            let r = steps[k](&mut env, &mut regs);
            env.fail.disarm();
            if !env.fail.fired() {
                r.unwrap_or_else(|e| panic!("{name}: step {k} failed without injection: {e}"));
                env.check();
                env.teardown();
                break;
            }
            assert_eq!(r, Err(errno::ENOMEM), "{name}: step {k}, n = {n}");
            assert!(
                env.snapshot() == before,
                "{name}: step {k}, n = {n}: state changed by a failed call"
            );
            assert_eq!(regs, regs_before);
            env.check();
            env.teardown();
            total += 1;
            n += 1;
        }
    }
    std::eprintln!(
        "fail-nth {name}: {} steps, {total} injected failures",
        steps.len()
    );
    total
}

fn ioas(env: &mut Env, r: &mut Vec<u64>) -> Result<(), u32> {
    let id = env.c().ioas_alloc()?;
    r.push(id as u64);
    Ok(())
}

#[test]
fn basic() {
    let steps = [
        step(ioas),
        step(|env, r| env.c().iova_ranges(r[0] as u32).map(|_| ())),
        step(|env, r| {
            env.c()
                .allow_iovas(r[0] as u32, &[(0x10_0000, 0x1fff_ffff)])
        }),
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x20_0000, 0, 8 * PG)
                .map(|_| ())
        }),
        step(|env, r| {
            let iova = env.c().map_auto(r[0] as u32, 4 * MB, 4 * MB)?;
            r.push(iova);
            Ok(())
        }),
        step(ioas),
        step(|env, r| {
            let iova = env
                .c()
                .copy(r[2] as u32, r[0] as u32, r[1], 4 * MB, RW, 0)?;
            r.push(iova);
            Ok(())
        }),
        step(|env, r| env.c().unmap(r[0] as u32, r[1], 4 * MB).map(|_| ())),
        step(|env, r| match env.c().unmap(r[0] as u32, r[1], 4 * MB) {
            Err(errno::ENOENT) => Ok(()),
            other => other.map(|_| ()),
        }),
        step(|env, r| {
            let list = [
                MapEntry {
                    flags: RW,
                    reserved: 0,
                    gpa: 0,
                    length: 16 * PG,
                    iova: 0,
                },
                MapEntry {
                    flags: RW | MAP_FIXED_IOVA,
                    reserved: 0,
                    gpa: 0,
                    length: PG,
                    iova: 0x100_0000,
                },
            ];
            match env.c().map_batch(r[0] as u32, hvabi::BATCH_ATOMIC, &list) {
                (0, _, _) => Ok(()),
                (e, _, _) => Err(e),
            }
        }),
        step(|env, r| {
            let u = [UnmapEntry {
                iova: 0x100_0000,
                length: PG,
            }];
            match env.c().unmap_batch(r[0] as u32, hvabi::BATCH_ATOMIC, &u) {
                (0, _, _) => Ok(()),
                (e, _, _) => Err(e),
            }
        }),
        step(|env, r| env.c().destroy(r[2] as u32).map_err(|e| e.0)),
    ];
    assert!(sweep("basic", &steps) > 0);
}

#[test]
fn map_domain() {
    let steps = [
        step(ioas),
        step(|env, r| {
            let a = env.id(dev::A);
            env.c().attach(a, r[0] as u32).map(|_| ())
        }),
        // 2 MiB leaves and 4 KiB ones.
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x4000_0000, 0, 4 * MB + 3 * PG)
                .map(|_| ())
        }),
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x7000_0000, 8 * MB, 64 * PG)
                .map(|_| ())
        }),
        step(|env, r| env.c().unmap(r[0] as u32, 0x7000_0000, 64 * PG).map(|_| ())),
        step(|env, _| {
            let a = env.id(dev::A);
            env.c().detach(a)
        }),
        // Re-attach: a new domain filled with the IOAS's mappings.
        step(|env, r| {
            let a = env.id(dev::A);
            env.c().attach(a, r[0] as u32).map(|_| ())
        }),
    ];
    assert!(sweep("map_domain", &steps) > 0);
}

#[test]
fn map_two_domains() {
    let steps = [
        step(ioas),
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x4000_0000, 0, 2 * MB)
                .map(|_| ())
        }),
        step(|env, r| {
            let a = env.id(dev::A);
            env.c().attach(a, r[0] as u32).map(|_| ())
        }),
        // Another unit: a second domain, filled.
        step(|env, r| {
            let h = env.id(dev::H);
            env.c().attach(h, r[0] as u32).map(|_| ())
        }),
        // Into both domains: a failure in the second unwinds the first.
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x5000_0000, 4 * MB, 8 * MB)
                .map(|_| ())
        }),
        step(|env, r| env.c().map_auto(r[0] as u32, 12 * MB, 33 * PG).map(|_| ())),
        step(|env, r| env.c().unmap(r[0] as u32, 0, u64::MAX).map(|_| ())),
        step(|env, _| {
            let h = env.id(dev::H);
            env.c().detach(h)
        }),
        step(|env, r| {
            let h = env.id(dev::H);
            env.c().attach(h, r[0] as u32).map(|_| ())
        }),
    ];
    assert!(sweep("map_two_domains", &steps) > 0);
}

#[test]
fn access_rw() {
    let steps = [
        step(ioas),
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x10_0000, 0, 4 * PG)
                .map(|_| ())
        }),
        step(|env, r| {
            let id = env.fd.create_access(env.g).map_err(e)?;
            r.push(id as u64);
            Ok(())
        }),
        step(|env, r| {
            env.fd
                .access_attach(env.g, r[1] as u32, r[0] as u32)
                .map_err(e)
        }),
        step(|env, r| {
            env.fd
                .access_write(env.g, &env.mem, r[1] as u32, 0x10_0000 + 5, &[1; 6000])
                .map_err(e)
        }),
        step(|env, r| {
            let mut b = [0u8; 6000];
            env.fd
                .access_read(env.g, &env.mem, r[1] as u32, 0x10_0000 + 5, &mut b)
                .map_err(e)
        }),
        step(ioas),
        step(|env, r| env.c().replace(r[1] as u32, r[2] as u32).map(|_| ())),
        step(|env, r| env.fd.destroy_access(env.g, r[1] as u32).map_err(e)),
    ];
    sweep("access_rw", &steps);
}

#[test]
fn access_pin() {
    let steps = [
        step(ioas),
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x20_0000, 2 * MB, 2 * MB)
                .map(|_| ())
        }),
        step(|env, r| {
            let id = env.fd.create_access(env.g).map_err(e)?;
            r.push(id as u64);
            env.fd.access_attach(env.g, id, r[0] as u32).map_err(e)
        }),
        step(|env, r| {
            env.fd
                .access_pin(env.g, r[1] as u32, 0x20_0000, 2 * MB)
                .map_err(e)
        }),
        // With a domain present.
        step(|env, r| {
            let a = env.id(dev::A);
            env.c().attach(a, r[0] as u32).map(|_| ())
        }),
        step(|env, r| {
            env.fd
                .access_unpin(env.g, r[1] as u32, 0x20_0000, 2 * MB)
                .map_err(e)
        }),
        step(|env, r| env.c().unmap(r[0] as u32, 0x20_0000, 2 * MB).map(|_| ())),
    ];
    sweep("access_pin", &steps);
}

#[test]
fn device() {
    let steps = [
        step(ioas),
        step(ioas),
        step(|env, r| {
            env.c()
                .map_fixed(r[0] as u32, 0x10_0000, 0, 16 * PG)
                .map(|_| ())
        }),
        step(|env, r| {
            env.c()
                .map_fixed(r[1] as u32, 0x10_0000, MB, 16 * PG)
                .map(|_| ())
        }),
        // PASID-capable device C: HWPT alloc, attach, replace IOAS → IOAS2 → HWPT.
        step(|env, r| {
            let cd = env.id(dev::C);
            let h = env.c().hwpt_alloc(cd, r[0] as u32, HWPT_DIRTY_TRACKING)?;
            r.push(h as u64);
            Ok(())
        }),
        step(|env, r| {
            let cd = env.id(dev::C);
            env.c().attach(cd, r[0] as u32).map(|_| ())
        }),
        step(|env, r| {
            let cd = env.id(dev::C);
            env.c().replace(cd, r[1] as u32).map(|_| ())
        }),
        step(|env, r| {
            let cd = env.id(dev::C);
            env.c().replace(cd, r[2] as u32).map(|_| ())
        }),
        step(|env, r| {
            let a = env.id(dev::A);
            let h = env.c().hwpt_alloc(a, r[1] as u32, HWPT_NEST_PARENT)?;
            r.push(h as u64);
            Ok(())
        }),
        step(|env, r| {
            let a = env.id(dev::A);
            let h = env
                .c()
                .hwpt_clone(r[3] as u32, a, HWPT_ENFORCE_CACHE_COHERENCY)?;
            r.push(h as u64);
            Ok(())
        }),
        // PASIDs: attach to an IOAS (automatic HWPT), replace, detach.
        step(|env, r| {
            let cd = env.id(dev::C);
            env.c().attach_pasid(cd, 7, r[1] as u32).map(|_| ())
        }),
        step(|env, r| {
            let cd = env.id(dev::C);
            env.c().replace_pasid(cd, 7, r[0] as u32).map(|_| ())
        }),
        step(|env, r| {
            let cd = env.id(dev::C);
            env.c().replace_pasid(cd, 7, r[3] as u32).map(|_| ())
        }),
        step(|env, _| {
            let cd = env.id(dev::C);
            env.c().detach_pasid(cd, 7)
        }),
        // Dirty tracking.
        step(|env, r| env.c().set_dirty_tracking(r[2] as u32, true)),
        step(|env, r| {
            env.fd
                .hw_mut()
                .dma(dev::C, None, 0x10_0000, true)
                .map_err(|_| errno::EIO)?;
            let bm = env.c().dirty_bitmap(
                r[2] as u32,
                0x10_0000,
                16 * PG,
                PG,
                DIRTY_BITMAP_NO_CLEAR,
                0x0e00_0000,
            )?;
            assert_eq!(bm[0], 1);
            Ok(())
        }),
        // A two-device group: attach (both members prepared), replace, detach.
        step(|env, r| {
            let d = env.id(dev::D);
            env.c().attach(d, r[0] as u32).map(|_| ())
        }),
        step(|env, r| {
            let ee = env.id(dev::E);
            env.c().attach(ee, r[0] as u32).map(|_| ())
        }),
        step(|env, r| {
            let ee = env.id(dev::E);
            env.c().replace(ee, r[1] as u32).map(|_| ())
        }),
        step(|env, r| {
            let d = env.id(dev::D);
            env.c().replace(d, r[4] as u32).map(|_| ())
        }),
        step(|env, _| {
            let d = env.id(dev::D);
            env.c().detach(d)
        }),
        step(|env, _| {
            let ee = env.id(dev::E);
            env.c().detach(ee)
        }),
        step(|env, r| {
            let c = env.id(dev::C);
            env.c().reserved_ranges(c).map(|_| ())?;
            env.c().devices().map(|_| ())?;
            env.c().detach(c)?;
            env.c().destroy(r[2] as u32).map_err(|e| e.0)
        }),
    ];
    assert!(sweep("device", &steps) > 0);
}

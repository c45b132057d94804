//! Random hypercall sequences from two guests into `dispatch`, against the software IOMMU,
//! with allocation failures injected at random points.
//!
//! Oracles, after every call:
//! * nothing panics or hangs (libFuzzer's own checks);
//! * the return value is 0 or a negated errno of the ABI;
//! * the consistency checker passes (objects, reference counts, page tables against the
//!   guests' memory, hardware attachments, no pending prepared switch, no leaked domain);
//! * a failed call changed nothing (state snapshot), except the documented partial progress
//!   of a batch without BATCH_ATOMIC and hardware faults (EIO, which the model never raises);
//! * at the end, destroying both guests returns every table page and domain.
//!
//! Argument structs are built word by word from the input: each 32-bit word is zero, a live
//! object ID, a small flag value, a page-granular address or length, the array window, or raw
//! bytes; the `size` field is usually exact and sometimes short or long with a tail.
#![no_main]

use std::sync::Arc;

use iommu::iommufd::abi::{self, BATCH_ATOMIC, errno, op};
use iommu::iommufd::check::{check, snapshot};
use iommu::iommufd::client::{self, Client};
use iommu::iommufd::sim::{SimHw, VecGuestMemory, demo_platform};
use iommu::iommufd::{FailNth, GuestMemory, Iommufd, Limits};
use libfuzzer_sys::fuzz_target;

const SCRATCH: u64 = 0x0ff0_0000;
const ARRAY: u64 = SCRATCH + 0x1000;

struct Input<'a> {
    b: &'a [u8],
    i: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let v = self.b.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        v
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
}

const KNOWN: [u32; 19] = [
    errno::EPERM,
    errno::ENOENT,
    errno::EIO,
    errno::E2BIG,
    errno::ENOMEM,
    errno::EFAULT,
    errno::EBUSY,
    errno::EEXIST,
    errno::EXDEV,
    errno::EINVAL,
    errno::ENOTTY,
    errno::ENOSPC,
    errno::ERANGE,
    errno::EOVERFLOW,
    errno::EMSGSIZE,
    errno::EOPNOTSUPP,
    errno::EADDRINUSE,
    errno::EMEDIUMTYPE,
    0,
];

/// One 32-bit word of an argument struct or array.
fn word(inp: &mut Input, ids: &[u32]) -> u32 {
    match inp.u8() % 16 {
        0..=3 => 0,
        4..=6 => {
            let k = inp.u8() as usize;
            ids.get(k % ids.len().max(1)).copied().unwrap_or(1)
        }
        7 => (inp.u8() & 7) as u32,
        8..=10 => (inp.u8() as u32) << 12,
        11 => ((inp.u8() as u32) << 21) | ((inp.u8() as u32 & 3) << 12),
        12 => ARRAY as u32,
        13 => u32::MAX - (inp.u8() as u32),
        14 => 1 + (inp.u8() as u32 & 63),
        _ => inp.u32(),
    }
}

fn fill(inp: &mut Input, ids: &[u32], buf: &mut [u8]) {
    for w in buf.chunks_mut(4) {
        let v = word(inp, ids).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// One well-formed hypercall through the guest-side client: its result, and whether partial
/// progress on failure is allowed (a batch without BATCH_ATOMIC).
fn structured(
    inp: &mut Input,
    fd: &mut Iommufd<SimHw>,
    gid: u32,
    mem: &VecGuestMemory,
    ids: &[u32],
    action: u8,
) -> (Result<(), u32>, bool) {
    let pick = |inp: &mut Input| {
        ids.get(inp.u8() as usize % ids.len().max(1))
            .copied()
            .unwrap_or(0)
    };
    let page = |inp: &mut Input| (inp.u8() as u64 % 64) << 12;
    let len = |inp: &mut Input| ((inp.u8() as u64 % 16) + 1) << 12;
    let flags = |inp: &mut Input| match inp.u8() % 4 {
        0 => client::RW,
        1 => abi::MAP_READABLE,
        2 => abi::MAP_WRITEABLE,
        _ => client::RW | abi::MAP_FIXED_IOVA,
    };
    let mut c = Client::new(fd, gid, mem, SCRATCH);
    let (a, b) = (pick(inp), pick(inp));
    let unit = |r: Result<u32, u32>| r.map(|_| ());
    let r = match action % 16 {
        0 => unit(c.ioas_alloc()),
        1 => {
            let gpa = page(inp) + (inp.u8() as u64 % 4) * (2 << 20);
            let (l, f, iova) = (len(inp), flags(inp), page(inp));
            c.map(a, gpa, l, f, iova).map(|_| ())
        }
        2 => {
            let (iova, l) = (page(inp), len(inp) * (1 + inp.u8() as u64 % 8));
            c.unmap(a, iova, l).map(|_| ())
        }
        3 => unit(c.attach(a, b)),
        4 => unit(c.replace(a, b)),
        5 => c.detach(a),
        6 => {
            let p = inp.u8() as u32 % 20;
            unit(c.attach_pasid(a, p, b))
        }
        7 => {
            let p = inp.u8() as u32 % 20;
            unit(c.replace_pasid(a, p, b))
        }
        8 => {
            let p = inp.u8() as u32 % 20;
            c.detach_pasid(a, p)
        }
        9 => {
            let f = inp.u8() as u32 % 8;
            unit(c.hwpt_alloc(a, b, f))
        }
        10 => {
            let f = inp.u8() as u32 % 8;
            unit(c.hwpt_clone(a, b, f))
        }
        11 => c.destroy(a).map_err(|e| e.0),
        12 => {
            let (src, l, f, dst) = (page(inp), len(inp), flags(inp), page(inp));
            c.copy(a, b, src, l, f, dst).map(|_| ())
        }
        13 => {
            let s = page(inp) << 8;
            let l = len(inp) * 64;
            c.allow_iovas(a, &[(s, s + l - 1)])
        }
        14 => {
            let atomic = (inp.u8() & 1) as u32;
            let n = inp.u8() as usize % 6;
            let entries: Vec<_> = (0..n)
                .map(|_| abi::MapEntry {
                    flags: flags(inp),
                    reserved: 0,
                    gpa: page(inp),
                    length: len(inp),
                    iova: page(inp),
                })
                .collect();
            let (e, _, _) = c.map_batch(a, atomic, &entries);
            return (if e == 0 { Ok(()) } else { Err(e) }, atomic == 0);
        }
        _ => {
            let atomic = (inp.u8() & 1) as u32;
            let n = inp.u8() as usize % 6;
            let entries: Vec<_> = (0..n)
                .map(|_| abi::UnmapEntry {
                    iova: page(inp),
                    length: len(inp),
                })
                .collect();
            let (e, _, _) = c.unmap_batch(a, atomic, &entries);
            return (if e == 0 { Ok(()) } else { Err(e) }, atomic == 0);
        }
    };
    (r, false)
}

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let fail = Arc::new(FailNth::new());
    let hw = SimHw::new(&demo_platform(), 512, Some(fail.clone()));
    let limits = Limits {
        max_objects: 64,
        max_areas_per_ioas: 32,
        max_guests: 4,
    };
    let mut fd = Iommufd::new(hw, limits).unwrap();
    fd.set_fault_injector(Some(fail.clone()));
    let g = [fd.create_guest().unwrap(), fd.create_guest().unwrap()];
    for d in 0..12 {
        fd.assign_device(g[(d == 9) as usize], d).unwrap();
    }
    let mems = [VecGuestMemory::standard(), VecGuestMemory::standard()];
    let mut inp = Input { b: data, i: 0 };
    for _ in 0..48 {
        if inp.done() {
            break;
        }
        let which = (inp.u8() & 1) as usize;
        let (gid, mem) = (g[which], &mems[which]);
        let ids = fd.object_ids(gid);
        let action = inp.u8();
        let before = snapshot(&fd);
        let mut partial_ok = false;
        // Arm an allocation failure for this step now and then.
        if action & 0x80 != 0 {
            fail.arm(1 + (inp.u8() % 12) as u64);
        }
        let result: Result<(), u32> = match action & 0x7f {
            0..=69 => {
                // A guest hypercall.
                let op = op::ALL[(action as usize) % op::ALL.len()];
                let size = op::arg_size(op).unwrap();
                let mut buf = [0u8; 160];
                fill(&mut inp, &ids, &mut buf[..size]);
                let sz = match inp.u8() % 16 {
                    0 => size.saturating_sub(1 + (inp.u8() as usize % size)),
                    1 => size + (inp.u8() as usize % 64),
                    _ => size,
                };
                if sz > size && inp.u8() & 1 != 0 {
                    let at = size + (inp.u8() as usize % (sz - size));
                    buf[at] = inp.u8() | 1;
                }
                buf[..4].copy_from_slice(&(sz as u32).to_le_bytes());
                let _ = mem.write(SCRATCH, &buf[..sz.max(4)]);
                // Arrays: a few entries of words.
                if inp.u8() & 1 != 0 {
                    let mut arr = [0u8; 512];
                    fill(&mut inp, &ids, &mut arr);
                    let _ = mem.write(ARRAY, &arr);
                }
                if op == op::IOAS_MAP_BATCH || op == op::IOAS_UNMAP_BATCH {
                    let flags = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    partial_ok = flags & BATCH_ATOMIC == 0;
                }
                let r = iommu::iommufd::dispatch(&fd, gid, 0, mem, op, SCRATCH);
                assert!(r <= 0);
                assert!(KNOWN.contains(&((-r) as u32)), "op {op:#x} returned {r}");
                if r == 0 { Ok(()) } else { Err((-r) as u32) }
            }
            70..=99 => {
                // A well-formed call with plausible values (reaches deep states quickly).
                let (r, p) = structured(&mut inp, &mut fd, gid, mem, &ids, action);
                partial_ok = p;
                r
            }
            100..=104 => {
                // A raw op number on raw bytes.
                let op = inp.u32() % 0x40;
                let mut buf = [0u8; 96];
                for b in buf.iter_mut() {
                    *b = inp.u8();
                }
                let _ = mem.write(SCRATCH, &buf);
                partial_ok = op == op::IOAS_MAP_BATCH || op == op::IOAS_UNMAP_BATCH;
                let r = iommu::iommufd::dispatch(&fd, gid, 0, mem, op, SCRATCH);
                assert!(KNOWN.contains(&((-r) as u32)));
                if r == 0 { Ok(()) } else { Err((-r) as u32) }
            }
            105..=119 => {
                // The hypervisor's side: emulated devices.
                let k = inp.u8() as usize;
                let id = ids.get(k % ids.len().max(1)).copied().unwrap_or(0);
                let other = ids
                    .get(inp.u8() as usize % ids.len().max(1))
                    .copied()
                    .unwrap_or(0);
                let iova = (inp.u8() as u64) << 12 | (inp.u8() as u64 & 0xf);
                let len = ((inp.u8() as u64 % 8) + 1) << 12;
                match action % 8 {
                    0 => fd.create_access(gid).map(|_| ()),
                    1 => fd.destroy_access(gid, id),
                    2 => fd.access_attach(gid, id, other),
                    3 => fd.access_replace(gid, id, other),
                    4 => fd.access_detach(gid, id),
                    5 => fd.access_pin(gid, id, iova & !0xfff, len),
                    6 => fd.access_unpin(gid, id, iova & !0xfff, len),
                    _ => {
                        let mut b = [0u8; 300];
                        if inp.u8() & 1 != 0 {
                            fd.access_read(gid, mem, id, iova, &mut b)
                        } else {
                            fd.access_write(gid, mem, id, iova, &b)
                        }
                    }
                }
                .map_err(|e| e.errno)
            }
            _ => {
                // Device DMA: changes only dirty state.
                let dev = inp.u8() as u32 % 12;
                let pasid = match inp.u8() % 4 {
                    0 => Some(inp.u8() as u32 % 16),
                    _ => None,
                };
                let _ = fd
                    .hw_mut()
                    .dma(dev, pasid, (inp.u8() as u64) << 12, inp.u8() & 1 != 0);
                Ok(())
            }
        };
        fail.disarm();
        if let Err(v) = check(&fd, &[(g[0], &mems[0]), (g[1], &mems[1])]) {
            panic!("broken invariant after action {action:#x} ({result:?}): {v:?}");
        }
        if let Err(e) = result
            && !partial_ok
            && e != errno::EIO
        {
            assert!(
                snapshot(&fd) == before,
                "failed action {action:#x} (errno {e}) changed the state"
            );
        }
    }
    fd.destroy_guest(g[0]).unwrap();
    fd.destroy_guest(g[1]).unwrap();
    let hw = fd.hw();
    assert_eq!(hw.frames_in_use(), 0, "table pages leaked");
    assert_eq!(hw.attachments().count(), 0);
    assert_eq!(hw.bad_frees(), 0);
}

//! `dispatch` from several threads at once: each thread is one vCPU of one guest (its own
//! scratch page and `vcpu` index), the software IOMMU underneath. After the threads join, the
//! consistency checker must pass and the counts must add up: of racing overlapping maps the
//! winners are pairwise disjoint and every loser overlapped a winner (EEXIST), of racing
//! identical maps exactly one wins, and racing unmaps of one range return every mapped byte
//! exactly once between them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use std::thread;
use std::vec::Vec;

use hvabi::{
    AbiStruct, BATCH_ATOMIC, Destroy, DeviceAttach, DeviceDetach, IoasAlloc, IoasMap, IoasMapBatch,
    IoasUnmap, IoasUnmapBatch, MAP_FIXED_IOVA, MapEntry, UnmapEntry, errno, op,
};

use super::super::client::RW;
use super::super::sim::{SimHw, VecGuestMemory};
use super::super::{GuestId, GuestMemory, Iommufd, dispatch};
use super::{Env, SCRATCH, dev};

const PG: u64 = 0x1000;
/// Single-page areas each vCPU adds to a round's range before the racing unmaps, so that an
/// unmap spends long enough clearing page tables for the others to run into it.
const FILLER: u64 = 24;

/// A spinning barrier: releases its threads within a few instructions of each other (a
/// sleeping one would stagger them by wake-up latencies longer than the races under test).
struct SpinBarrier {
    n: u32,
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl SpinBarrier {
    fn new(n: u32) -> Self {
        SpinBarrier {
            n,
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    fn wait(&self) {
        let gen_ = self.generation.load(SeqCst);
        if self.arrived.fetch_add(1, SeqCst) + 1 == self.n {
            self.arrived.store(0, SeqCst);
            self.generation.fetch_add(1, SeqCst);
            return;
        }
        let mut spins = 0u32;
        let start = std::time::Instant::now();
        while self.generation.load(SeqCst) == gen_ {
            // A vCPU that failed an assertion never arrives: fail instead of hanging.
            assert!(
                start.elapsed().as_secs() < 20,
                "barrier: another vCPU stopped (failed)"
            );
            spins += 1;
            if spins.is_multiple_of(64) {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// One vCPU's view: a scratch page of its own in its own copy of the guest's memory (every
/// copy translates guest-physical addresses alike).
struct Vcpu<'a> {
    fd: &'a Iommufd<SimHw>,
    g: GuestId,
    vcpu: u32,
    mem: VecGuestMemory,
    scratch: u64,
}

impl Vcpu<'_> {
    fn call<T: AbiStruct>(&self, op: u32, a: &T) -> Result<T, u32> {
        let mut buf = [0u8; 64];
        let b = &mut buf[..T::SIZE];
        a.encode(b);
        b[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
        self.mem.write(self.scratch, b).unwrap();
        let r = dispatch(self.fd, self.g, self.vcpu, &self.mem, op, self.scratch);
        self.mem.read(self.scratch, b).unwrap();
        if r == 0 {
            Ok(T::decode(b))
        } else {
            Err((-r) as u32)
        }
    }

    fn map(&self, ioas: u32, iova: u64, gpa: u64, len: u64) -> Result<u64, u32> {
        let a = IoasMap {
            flags: RW | MAP_FIXED_IOVA,
            ioas_id: ioas,
            gpa,
            length: len,
            iova,
            ..Default::default()
        };
        self.call(op::IOAS_MAP, &a).map(|a| a.iova)
    }

    fn unmap(&self, ioas: u32, iova: u64, len: u64) -> Result<u64, u32> {
        let a = IoasUnmap {
            ioas_id: ioas,
            iova,
            length: len,
            ..Default::default()
        };
        self.call(op::IOAS_UNMAP, &a).map(|a| a.length)
    }

    fn array<T: AbiStruct>(&self, items: &[T]) -> u64 {
        let at = self.scratch + 0x800;
        for (i, it) in items.iter().enumerate() {
            let mut buf = [0u8; 64];
            it.encode(&mut buf[..T::SIZE]);
            self.mem
                .write(at + (i * T::SIZE) as u64, &buf[..T::SIZE])
                .unwrap();
        }
        at
    }

    fn read_unmap_entry(&self, i: usize) -> UnmapEntry {
        let mut buf = [0u8; 64];
        let at = self.scratch + 0x800 + (i * UnmapEntry::SIZE) as u64;
        self.mem.read(at, &mut buf[..UnmapEntry::SIZE]).unwrap();
        UnmapEntry::decode(&buf[..UnmapEntry::SIZE])
    }
}

/// vCPUs mapping and unmapping in one IOAS (with a HWPT), while another vCPU allocates,
/// attaches, maps into, detaches and destroys other IOASes, and a second guest maps and
/// unmaps in its own IOAS.
#[test]
fn vcpus_map_and_unmap_in_parallel() {
    const VCPUS: u32 = 3;
    const ROUNDS: u64 = 200;
    let mut env = Env::new();
    let (ioas, a_id, b_id) = {
        let a = env.id(dev::A);
        let b = env.id(dev::B);
        let mut c = env.c();
        let ioas = c.ioas_alloc().unwrap();
        c.attach(a, ioas).unwrap();
        (ioas, a, b)
    };
    let other_ioas = env.c2().ioas_alloc().unwrap();
    let g2 = env.g2;
    let g = env.g;
    let fd = &env.fd;
    let barrier = SpinBarrier::new(VCPUS);
    let stop = AtomicBool::new(false);
    // Per round, per vCPU: (won overlapping map?, its range), won identical map?, unmap bytes.
    let results: Vec<Vec<(bool, bool, u64, u64)>> = thread::scope(|s| {
        let control = s.spawn(|| {
            let v = Vcpu {
                fd,
                g,
                vcpu: VCPUS,
                mem: VecGuestMemory::standard(),
                scratch: SCRATCH + VCPUS as u64 * PG,
            };
            let mut n = 0u32;
            while !stop.load(Relaxed) || n < 3 {
                let other = v.call(op::IOAS_ALLOC, &IoasAlloc::default()).unwrap();
                let other = other.out_ioas_id;
                let at = DeviceAttach {
                    dev_id: b_id,
                    pt_id: other,
                    ..Default::default()
                };
                v.call(op::DEVICE_ATTACH, &at).unwrap();
                assert_eq!(v.map(other, 0x4000_0000, 0, 4 * PG), Ok(0x4000_0000));
                let dt = DeviceDetach {
                    dev_id: b_id,
                    ..Default::default()
                };
                v.call(op::DEVICE_DETACH, &dt).unwrap();
                let d = Destroy {
                    id: other,
                    ..Default::default()
                };
                v.call(op::DESTROY, &d).unwrap();
                n += 1;
            }
        });
        // Another guest mapping and unmapping at the same time (its own gates).
        let other_guest = s.spawn(|| {
            let v = Vcpu {
                fd,
                g: g2,
                vcpu: 0,
                mem: VecGuestMemory::standard(),
                scratch: SCRATCH,
            };
            let mut n = 0u64;
            while !stop.load(Relaxed) || n < 3 {
                let iova = 0x10_0000 + (n % 64) * 0x1_0000;
                assert_eq!(v.map(other_ioas, iova, 0x20_0000, 4 * PG), Ok(iova));
                assert_eq!(v.unmap(other_ioas, iova, 4 * PG), Ok(4 * PG));
                n += 1;
            }
        });
        let workers: Vec<_> = (0..VCPUS)
            .map(|vcpu| {
                let barrier = &barrier;
                s.spawn(move || {
                    let v = Vcpu {
                        fd,
                        g,
                        vcpu,
                        mem: VecGuestMemory::standard(),
                        scratch: SCRATCH + vcpu as u64 * PG,
                    };
                    let own = 0x1_0000_0000 * (vcpu as u64 + 1);
                    let gpa = 0x10_0000 * (vcpu as u64 + 1);
                    let mut out = Vec::new();
                    for r in 0..ROUNDS {
                        // Disjoint ranges: single, then batched (atomic unmap batch).
                        assert_eq!(v.map(ioas, own, gpa, 2 * PG), Ok(own));
                        let e: Vec<MapEntry> = (0..4)
                            .map(|i| MapEntry {
                                flags: RW | MAP_FIXED_IOVA,
                                gpa: gpa + i * PG,
                                length: PG,
                                iova: own + 0x10_0000 + i * 0x1_0000,
                                ..Default::default()
                            })
                            .collect();
                        let mb = IoasMapBatch {
                            ioas_id: ioas,
                            num_entries: 4,
                            entries_gpa: v.array(&e),
                            ..Default::default()
                        };
                        assert_eq!(v.call(op::IOAS_MAP_BATCH, &mb).unwrap().out_done, 4);
                        assert_eq!(v.unmap(ioas, own, 2 * PG), Ok(2 * PG));
                        let ue: Vec<UnmapEntry> = (0..4)
                            .map(|i| UnmapEntry {
                                iova: own + 0x10_0000 + i * 0x1_0000,
                                length: PG,
                            })
                            .collect();
                        let ub = IoasUnmapBatch {
                            flags: BATCH_ATOMIC,
                            ioas_id: ioas,
                            num_entries: 4,
                            entries_gpa: v.array(&ue),
                            ..Default::default()
                        };
                        assert_eq!(v.call(op::IOAS_UNMAP_BATCH, &ub).unwrap().out_done, 4);
                        assert!((0..4).all(|i| v.read_unmap_entry(i).length == PG));

                        // Overlapping ranges: vCPU v maps two pages at base + v pages, so
                        // neighbours overlap by one page; then everyone maps the same range.
                        let base = 0x8000_0000 + r * 0x10_0000;
                        let mine = base + vcpu as u64 * PG;
                        for i in 0..FILLER {
                            let at = base + 0x1_0000 + vcpu as u64 * 0x2_0000 + i * PG;
                            assert_eq!(v.map(ioas, at, gpa, PG), Ok(at));
                        }
                        barrier.wait();
                        let won = match v.map(ioas, mine, gpa, 2 * PG) {
                            Ok(_) => true,
                            Err(e) => {
                                assert_eq!(e, errno::EEXIST);
                                false
                            }
                        };
                        let same = base + 0x8_0000;
                        let won_same = match v.map(ioas, same, gpa, 4 * PG) {
                            Ok(_) => true,
                            Err(e) => {
                                assert_eq!(e, errno::EEXIST);
                                false
                            }
                        };
                        barrier.wait();
                        // Everyone unmaps everything of the round; the bytes must add up.
                        let got = match v.unmap(ioas, base, 0x10_0000) {
                            Ok(b) => b,
                            Err(e) => {
                                assert_eq!(e, errno::ENOENT);
                                0
                            }
                        };
                        barrier.wait();
                        out.push((won, won_same, mine, got));
                    }
                    out
                })
            })
            .collect();
        let r: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Relaxed);
        control.join().unwrap();
        other_guest.join().unwrap();
        r.into_iter().map(|w| w.unwrap()).collect()
    });
    for r in 0..ROUNDS as usize {
        let round: Vec<_> = results.iter().map(|v| v[r]).collect();
        let winners: Vec<u64> = round.iter().filter(|x| x.0).map(|x| x.2).collect();
        for (i, a) in winners.iter().enumerate() {
            for b in &winners[i + 1..] {
                assert!(
                    a.abs_diff(*b) >= 2 * PG,
                    "round {r}: overlapping maps both won"
                );
            }
        }
        // A loser need not overlap a winner: maps decide without waiting (area_slots.rs rule
        // 1), so vCPU 2 may lose to vCPU 1's announced map while vCPU 1 loses to vCPU 0's, and
        // the ABI allows it (docs/abi.md §2: EEXIST also when the racing map later fails).
        // What always holds: the racer no other can make lose wins, so someone wins, and a
        // loser overlapped a racing map (its neighbour).
        assert!(!winners.is_empty(), "round {r}: every racing map lost");
        for x in round.iter().filter(|x| !x.0) {
            assert!(
                round
                    .iter()
                    .any(|o| o.2 != x.2 && o.2.abs_diff(x.2) < 2 * PG),
                "round {r}: a map lost with no racing map overlapping it"
            );
        }
        assert_eq!(
            round.iter().filter(|x| x.1).count(),
            1,
            "round {r}: identical racing maps: exactly one wins"
        );
        let mapped = winners.len() as u64 * 2 * PG + 4 * PG + VCPUS as u64 * FILLER * PG;
        let unmapped: u64 = round.iter().map(|x| x.3).sum();
        assert_eq!(
            unmapped, mapped,
            "round {r}: racing unmaps count every page once"
        );
    }
    env.check();
    let mut c = env.c();
    // Nothing is left in the IOAS (a full unmap returns 0 bytes) nor in its domain.
    assert_eq!(c.unmap(ioas, 0, u64::MAX), Ok(0));
    let _ = a_id;
    env.check();
    env.teardown();
}

/// A vCPU index the gates were not built for is refused, and so is a second call claiming to
/// be a vCPU that is already inside a call.
#[test]
fn vcpu_index_is_checked() {
    let mut env = Env::new();
    let ioas = env.c().ioas_alloc().unwrap();
    let max = env.fd.limits().max_vcpus;
    let v = Vcpu {
        fd: &env.fd,
        g: env.g,
        vcpu: max,
        mem: VecGuestMemory::standard(),
        scratch: SCRATCH,
    };
    assert_eq!(v.map(ioas, 0x10_0000, 0, PG), Err(errno::EINVAL));
    let v = Vcpu { vcpu: max - 1, ..v };
    assert_eq!(v.map(ioas, 0x10_0000, 0, PG), Ok(0x10_0000));
    assert_eq!(v.unmap(ioas, 0x10_0000, PG), Ok(PG));
    env.check();
    env.teardown();
}

//! The multi-vCPU variants (docs/guests.md "Several vCPUs"). vCPUs share the guest's RAM, so
//! they talk through the statics below (identity-mapped, write-back, coherent across CPUs);
//! every wait is a spin on an atomic.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use hvabi::{
    IoasAlloc, IoasMap, IoasUnmap, MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE, PAGE_SIZE, errno,
    op,
};

use crate::{arch, call, exit};

/// vCPUs the guest has stacks for (`arch_*.rs`: stacks 1..MAX_VCPUS); the hypervisor's limit
/// too.
pub const MAX_VCPUS: usize = 8;
/// Each further vCPU's stack: 32 KiB.
pub const STACK_SHIFT: usize = 15;

/// Map+unmap rounds each vCPU makes in `smp-map`.
const ROUNDS: u64 = 400;
/// IOVA window of vCPU i: `WINDOW * (i + 1)`, 256 MiB apart, so no two vCPUs' ranges meet.
const WINDOW: u64 = 0x1000_0000;
/// Pages of its window a vCPU cycles through.
const PAGES: u64 = 64;

/// The IOAS vCPU 0 allocated, and whether it is there yet.
static IOAS: AtomicU32 = AtomicU32::new(0);
static IOAS_READY: AtomicBool = AtomicBool::new(false);
/// Per vCPU: map+unmap pairs done and checks failed, published when it has finished.
static DONE: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static FAILED: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
static FINISHED: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
/// Per vCPU: rounds done so far, updated every round (the others watch it move).
static PROGRESS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
/// vCPUs at the start line: every loop begins once all have arrived.
static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// `smp-wild`: vCPU 0 is in its loop.
static SPINNING: AtomicBool = AtomicBool::new(false);

/// Entry of every vCPU but 0.
pub fn secondary(variant: &str, vcpu: u32, vcpus: u32, free: u64) -> ! {
    if vcpu >= vcpus {
        println!("testguest: vcpu {vcpu} of {vcpus}: index out of range");
        exit(4)
    }
    match variant {
        "smp-map" => {
            map_unmap(vcpu, vcpus, free);
            park()
        }
        "smp-wild" => {
            // Only once vCPU 0 is surely running: the stop must take a running vCPU with it.
            while !SPINNING.load(Ordering::Acquire) {
                core::hint::spin_loop();
            }
            // Outside RAM and outside the aarch64 ECAM window (0x4000_0000, 256 MiB), which is emulated.
            let gpa = 0x7000_0000 + u64::from(vcpu) * PAGE_SIZE;
            println!("testguest: vcpu {vcpu}: reading gpa {gpa:#x}");
            let v = arch::wild_read(gpa);
            println!("testguest: vcpu {vcpu}: read {v:#x}: the hypervisor let a wild read through");
            exit(1)
        }
        _ => park(),
    }
}

/// Nothing left for this vCPU: it spins until the guest ends (vCPU 0's EXIT ends every vCPU).
fn park() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// `smp-wild`, vCPU 0: spins until the hypervisor stops the guest because of vCPU 1.
pub fn wait_for_stop(vcpus: u32) -> ! {
    if vcpus < 2 {
        println!("testguest: smp-wild needs 2 vCPUs, has {vcpus}");
        exit(4)
    }
    println!("testguest: vcpu 0 spinning until vcpu 1 gets the guest stopped");
    SPINNING.store(true, Ordering::Release);
    park()
}

/// `smp-map` on vCPU `vcpu`: ROUNDS pairs of IOAS_MAP + IOAS_UNMAP of one page of its own IOVA
/// window in the shared IOAS, each checked: the map succeeds, a second map of the same IOVA
/// fails with EEXIST (so the page really is mapped, in the IOAS every vCPU uses), the unmap
/// succeeds. vCPU 0 allocates the IOAS first and, at the end, waits for every vCPU's published
/// count and checks the sum; its return is the guest's exit status (0: all good).
pub fn map_unmap(vcpu: u32, vcpus: u32, free: u64) -> u32 {
    let me = vcpu as usize;
    if vcpu == 0 {
        if vcpus as usize > MAX_VCPUS {
            println!("testguest: smp-map: {vcpus} vCPUs, at most {MAX_VCPUS}");
            return 1;
        }
        let (r, ioas) = call(
            op::IOAS_ALLOC,
            IoasAlloc {
                size: IoasAlloc::SIZE as u32,
                ..IoasAlloc::default()
            },
        );
        if r != 0 {
            println!("testguest: smp-map: IOAS_ALLOC failed: {r}");
            return 1;
        }
        IOAS.store(ioas.out_ioas_id, Ordering::Relaxed);
        // Release: the id is visible to whoever sees the flag.
        IOAS_READY.store(true, Ordering::Release);
    } else {
        while !IOAS_READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    let ioas_id = IOAS.load(Ordering::Relaxed);
    let base = WINDOW * (u64::from(vcpu) + 1);
    // Each vCPU maps its own page of RAM (any page of the guest's would do).
    let gpa = free + u64::from(vcpu) * PAGE_SIZE;
    let map = |iova: u64| IoasMap {
        size: IoasMap::SIZE as u32,
        flags: MAP_READABLE | MAP_WRITEABLE | MAP_FIXED_IOVA,
        ioas_id,
        reserved: 0,
        gpa,
        length: PAGE_SIZE,
        iova,
    };
    let unmap = |iova: u64| IoasUnmap {
        size: IoasUnmap::SIZE as u32,
        flags: 0,
        ioas_id,
        reserved: 0,
        iova,
        length: PAGE_SIZE,
    };
    let (mut done, mut failed) = (0u64, 0u32);
    // aarch64: MPIDR_EL1 names this vCPU (Aff0 = index; U = 0 with several vCPUs).
    #[cfg(target_arch = "aarch64")]
    {
        let want = if vcpus > 1 {
            0x8000_0000 | u64::from(vcpu)
        } else {
            0xc000_0000
        };
        let got = arch::mpidr() & 0xc0ff_ffff;
        if got != want {
            println!("testguest: vcpu {vcpu}: MPIDR_EL1 {got:#x}, want {want:#x}: FAILED");
            failed += 1;
        }
    }
    // Start together, then watch how far the others get while this loop runs: on two CPUs at
    // once they advance during it (on one CPU too, by time slices).
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    while ARRIVED.load(Ordering::Acquire) < vcpus {
        core::hint::spin_loop();
    }
    let others = || -> u64 {
        (0..vcpus as usize)
            .filter(|&k| k != me)
            .map(|k| PROGRESS[k].load(Ordering::Relaxed))
            .sum()
    };
    let others_before = others();
    for round in 0..ROUNDS {
        PROGRESS[me].store(round, Ordering::Relaxed);
        let iova = base + (round % PAGES) * PAGE_SIZE;
        let (m, _) = call(op::IOAS_MAP, map(iova));
        let (again, _) = call(op::IOAS_MAP, map(iova));
        let (u, _) = call(op::IOAS_UNMAP, unmap(iova));
        if m == 0 && again == -i64::from(errno::EEXIST) && u == 0 {
            done += 1;
        } else {
            if failed < 3 {
                println!(
                    "testguest: vcpu {vcpu}: round {round} iova {iova:#x}: map {m}, map again {again}, unmap {u}: FAILED"
                );
            }
            failed += 1;
        }
    }
    let overlap = others() - others_before;
    println!(
        "testguest: vcpu {vcpu}: {done} map+unmap pairs in iova {base:#x}+{:#x}, {failed} failed",
        PAGES * PAGE_SIZE
    );
    if vcpus > 1 {
        println!("testguest: vcpu {vcpu}: the other vCPUs did {overlap} rounds during its loop");
    }
    DONE[me].store(done, Ordering::Relaxed);
    FAILED[me].store(failed, Ordering::Relaxed);
    // Release: the counts are visible to whoever sees the flag.
    FINISHED[me].store(true, Ordering::Release);
    if vcpu != 0 {
        return 0;
    }
    let n = vcpus as usize;
    for finished in &FINISHED[1..n] {
        while !finished.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    let total: u64 = DONE[..n].iter().map(|d| d.load(Ordering::Relaxed)).sum();
    let failed: u32 = FAILED[..n].iter().map(|f| f.load(Ordering::Relaxed)).sum();
    let want = ROUNDS * u64::from(vcpus);
    let verdict = if total == want && failed == 0 {
        "ok"
    } else {
        "FAILED"
    };
    println!(
        "testguest: smp-map: {vcpus} vCPUs, {total} map+unmap pairs (want {want}), {failed} failed: {verdict}"
    );
    u32::from(verdict != "ok")
}

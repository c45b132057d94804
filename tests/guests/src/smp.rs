//! The multi-vCPU variants (docs/guests.md "Several vCPUs"). vCPUs share the guest's RAM, so
//! they talk through the statics below (identity-mapped, write-back, coherent across CPUs);
//! every wait is a spin on an atomic.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use hvabi::{IoasAlloc, IoasMap, IoasUnmap, PAGE_SIZE, errno, op};

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
        "bench" if vcpu == 1 => bench_worker(vcpu),
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
    let map = |iova: u64| crate::fixed_map(ioas_id, gpa, PAGE_SIZE, iova);
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

/// `bench` with several vCPUs: the 1 vs 2 vCPU scaling rows (docs/perf.md). IOVA window of
/// vCPU i: `SCALE_IOVA + i * SCALE_WINDOW`, disjoint from each other and from the one-vCPU rows'
/// IOVAs (and above the aarch64 MSI doorbell window at 256 MiB).
const SCALE_IOVA: u64 = 0x5000_0000;
const SCALE_WINDOW: u64 = 0x1000_0000;

/// The bench's IOAS (its edu attached), published by vCPU 0 with `SCALE_IOAS_READY`.
static SCALE_IOAS: AtomicU32 = AtomicU32::new(0);
static SCALE_IOAS_READY: AtomicBool = AtomicBool::new(false);
/// vCPU 1 has encoded its arguments and spins on `SCALE_GO`.
static SCALE_WORKER_READY: AtomicBool = AtomicBool::new(false);
/// The barrier: vCPU 0 stores `generation << 2 | row` to start vCPU 1 on one run of `row`;
/// vCPU 1 stores the generation in `SCALE_DONE` when it has finished it.
static SCALE_GO: AtomicU32 = AtomicU32::new(0);
static SCALE_DONE: AtomicU32 = AtomicU32::new(0);
/// Calls of vCPU 1 that did not return 0.
static SCALE_ERRORS: AtomicU32 = AtomicU32::new(0);

/// The scaling rows: N pairs of IOAS_MAP + IOAS_UNMAP of one 4 KiB page, or of 256
/// contiguous 4 KiB pages (1 MiB) in one call; and N pairs of null hypercalls, the same exits
/// as the 4 KiB row without the IOMMU work, which tells how far the world switch alone scales
/// (informational: no target, no Linux counterpart).
#[derive(Clone, Copy)]
enum ScaleRow {
    Pair4k,
    Pair1mContig,
    NullPair,
}

impl ScaleRow {
    const ALL: [ScaleRow; 3] = [ScaleRow::Pair4k, ScaleRow::Pair1mContig, ScaleRow::NullPair];

    fn name(self) -> &'static str {
        match self {
            ScaleRow::Pair4k => "map-unmap-4k",
            ScaleRow::Pair1mContig => "map-unmap-256x4k-contiguous",
            ScaleRow::NullPair => "null-exit-pair",
        }
    }

    /// Pairs each vCPU makes per run: a few tens of milliseconds of host time without icount,
    /// for both rows. The window must be long against the host's scheduling slices (a few ms
    /// when other jobs share its cores): a run of 1-2 ms measures vCPU 0 alone inside one slice
    /// of a whole core, but the two-vCPU run waits for the second vCPU's host thread to be
    /// scheduled, and the ratio says more about the host than about the hypervisor (20 pairs of
    /// 1 MiB gave 0.44x where 400 give 1.3-1.8x on the same loaded host, docs/perf.md "Session 4").
    fn calls(self) -> u64 {
        match self {
            ScaleRow::Pair4k => 400,
            ScaleRow::Pair1mContig => 400,
            ScaleRow::NullPair => 400,
        }
    }
}

/// The null hypercall of the `null-hypercall` row of `bench`: no ABI op has this number.
const NULL_OP: u32 = 0x7777;

/// One vCPU's pre-encoded arguments: 64 slots of one page each in its own IOVA window, and one
/// 1 MiB range after them; its own guest pages (`BENCH_GPA_CONTIG`, host-contiguous, 1 MiB per
/// vCPU).
struct Pairs {
    map_4k: [[u8; IoasMap::SIZE]; 64],
    unmap_4k: [[u8; IoasUnmap::SIZE]; 64],
    map_1m: [u8; IoasMap::SIZE],
    unmap_1m: [u8; IoasUnmap::SIZE],
}

impl Pairs {
    fn new(ioas_id: u32, vcpu: u32) -> Pairs {
        use hvabi::AbiStruct;
        let base = SCALE_IOVA + u64::from(vcpu) * SCALE_WINDOW;
        let gpa = crate::BENCH_GPA_CONTIG + u64::from(vcpu) * (1 << 20);
        let map = |gpa, length, iova| {
            let mut b = [0u8; IoasMap::SIZE];
            crate::fixed_map(ioas_id, gpa, length, iova).encode(&mut b);
            b
        };
        let unmap = |iova, length| {
            let mut b = [0u8; IoasUnmap::SIZE];
            IoasUnmap {
                size: IoasUnmap::SIZE as u32,
                flags: 0,
                ioas_id,
                reserved: 0,
                iova,
                length,
            }
            .encode(&mut b);
            b
        };
        let iova_1m = base + (1 << 20);
        let mut p = Pairs {
            map_4k: [[0; IoasMap::SIZE]; 64],
            unmap_4k: [[0; IoasUnmap::SIZE]; 64],
            map_1m: map(gpa, 1 << 20, iova_1m),
            unmap_1m: unmap(iova_1m, 1 << 20),
        };
        for i in 0..64u64 {
            p.map_4k[i as usize] = map(gpa, PAGE_SIZE, base + i * PAGE_SIZE);
            p.unmap_4k[i as usize] = unmap(base + i * PAGE_SIZE, PAGE_SIZE);
        }
        p
    }

    /// `row.calls()` pairs; returns the calls that did not return 0.
    fn run(&self, row: ScaleRow) -> u32 {
        let mut errors = 0;
        for i in 0..row.calls() as usize {
            let (m, u) = match row {
                ScaleRow::Pair4k => (&self.map_4k[i % 64], &self.unmap_4k[i % 64]),
                ScaleRow::Pair1mContig => (&self.map_1m, &self.unmap_1m),
                ScaleRow::NullPair => {
                    // Not an op: one exit and ENOSYS each, no IOMMU, nothing to count.
                    let _ = arch::hypercall(NULL_OP, 0, 0, 0);
                    let _ = arch::hypercall(NULL_OP, 0, 0, 0);
                    continue;
                }
            };
            errors += u32::from(arch::hypercall(op::IOAS_MAP, m.as_ptr() as u64, 0, 0) != 0);
            errors += u32::from(arch::hypercall(op::IOAS_UNMAP, u.as_ptr() as u64, 0, 0) != 0);
        }
        errors
    }
}

/// `bench` on vCPU 1: waits for the bench's IOAS, then runs each row vCPU 0 starts through
/// the barrier, on its own IOVA window, until the guest ends. It never prints: vCPU 0 prints
/// everything, so no line of vCPU 1's lands in the middle of one of vCPU 0's.
fn bench_worker(vcpu: u32) -> ! {
    while !SCALE_IOAS_READY.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let pairs = Pairs::new(SCALE_IOAS.load(Ordering::Relaxed), vcpu);
    SCALE_WORKER_READY.store(true, Ordering::Release);
    let mut seen = 0;
    loop {
        let go = SCALE_GO.load(Ordering::Acquire);
        if go >> 2 == seen {
            core::hint::spin_loop();
            continue;
        }
        seen = go >> 2;
        let row = ScaleRow::ALL[(go & 3) as usize];
        let errors = pairs.run(row);
        SCALE_ERRORS.fetch_add(errors, Ordering::Relaxed);
        // Release: the error count is visible to vCPU 0 once it sees the generation.
        SCALE_DONE.store(seen, Ordering::Release);
    }
}

/// `bench` with 2 or more vCPUs, on vCPU 0 (vCPUs past 1 stay parked): per row and round,
/// (a) vCPU 0 alone runs N pairs on its window of `ioas`, timed by its clock; (b) vCPU 0
/// releases vCPU 1 through the barrier and both run N pairs on their own windows at once,
/// timed from the release until both are done. The rounds alternate (a) and (b), so slow
/// phases of the host fall on both; the rows are the medians over the rounds of the ticks per
/// pair (for (b): of the whole run, so 2N pairs took that times N). Throughput ratio =
/// (2N / time(b)) / (N / time(a)). Meaningless under -icount, where QEMU runs the vCPUs one
/// after another. Returns the calls that failed on either vCPU.
pub fn bench_scaling(ioas: u32, vcpus: u32, rounds: usize) -> u32 {
    if vcpus < 2 {
        return 0;
    }
    SCALE_IOAS.store(ioas, Ordering::Relaxed);
    // Release: the id is visible to whoever sees the flag.
    SCALE_IOAS_READY.store(true, Ordering::Release);
    let mine = Pairs::new(ioas, 0);
    while !SCALE_WORKER_READY.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let mut errors = 0;
    let mut generation = 0u32;
    let mut both = |row: ScaleRow, errors: &mut u32| -> u64 {
        generation += 1;
        let t = arch::timestamp();
        SCALE_GO.store(generation << 2 | row as u32, Ordering::Release);
        *errors += mine.run(row);
        while SCALE_DONE.load(Ordering::Acquire) != generation {
            core::hint::spin_loop();
        }
        arch::timestamp() - t
    };
    let rounds = rounds.min(crate::BENCH_MAX_ROUNDS);
    // Ticks of (a) and (b) by row and round.
    let mut samples = [[[0u64; 2]; crate::BENCH_MAX_ROUNDS]; ScaleRow::ALL.len()];
    for (k, &row) in ScaleRow::ALL.iter().enumerate() {
        // One untimed run of both: each window's page-table levels exist before timing.
        both(row, &mut errors);
        for round in samples[k].iter_mut().take(rounds) {
            let t = arch::timestamp();
            errors += mine.run(row);
            round[0] = arch::timestamp() - t;
            round[1] = both(row, &mut errors);
        }
    }
    let unit = arch::TIMESTAMP_NAME;
    for (k, &row) in ScaleRow::ALL.iter().enumerate() {
        let n = row.calls();
        for (r, s) in samples[k][..rounds].iter().enumerate() {
            // Short enough for one console line: ticks of N pairs alone, of 2 x N at once.
            println!(
                "bench: scaling {} round {r}: 1 vCPU {}, 2 vCPUs {} {unit} ticks: {}",
                row.name(),
                s[0],
                s[1],
                Ratio(2 * s[0], s[1])
            );
        }
        let mut medians = [0u64; 2];
        for (side, suffix) in ["1vcpu", "2vcpu"].iter().enumerate() {
            let mut column = [0u64; crate::BENCH_MAX_ROUNDS];
            for (c, s) in column.iter_mut().zip(&samples[k][..rounds]) {
                *c = s[side] / n;
            }
            let c = &mut column[..rounds];
            c.sort_unstable();
            medians[side] = c[rounds / 2];
            println!(
                "bench: {}-{suffix} {n} calls x {rounds} rounds, median {} min {} max {} {unit} ticks each",
                row.name(),
                c[rounds / 2],
                c[0],
                c[rounds - 1],
            );
        }
        println!(
            "bench: {} 1 vs 2 vCPUs: throughput {} (medians of {rounds} alternating rounds)",
            row.name(),
            Ratio(2 * medians[0], medians[1])
        );
    }
    errors + SCALE_ERRORS.load(Ordering::Acquire)
}

/// `a / b` with two decimals and an `x`, without floating point.
struct Ratio(u64, u64);

impl core::fmt::Display for Ratio {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let hundredths = (self.0 * 100).checked_div(self.1).unwrap_or(0);
        write!(f, "{}.{:02}x", hundredths / 100, hundredths % 100)
    }
}

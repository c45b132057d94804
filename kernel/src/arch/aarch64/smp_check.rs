//! `scenario=smp`: proves from the hardware, on each online secondary, that the CPU bring-up in
//! `smp` did what it claims. Every fact is read by work `launch`ed on that CPU from the CPU or
//! the GIC itself, never from `smp`'s own bookkeeping:
//!
//! - MPIDR_EL1 (what QEMU assigned; the scenario names the expected values) and that the index
//!   `cpu_index` derives from TPIDR_EL2 is the one the work was launched for;
//! - CurrentEL = EL2, and SP inside the CPU's own run stack;
//! - its redistributor's GICR_WAKER (ProcessorSleep and ChildrenAsleep clear: awake) and
//!   GICR_ISENABLER0 bit 26 (the EL2 timer PPI enabled), read over MMIO;
//! - its EL2 timer, armed with `arm_timer`, raises INTID 26 at its own CPU interface
//!   (acknowledged by `take_interrupt`), counted by `ticks` on that CPU only;
//! - all secondaries run at once (each waits until every other has started) and their atomic
//!   increments of one counter all land;
//! - `launch` refuses a busy CPU, the boot CPU, an index past the online CPUs and one past
//!   `MAX_CPUS`;
//! - the firmware's CPU_ON refusals are decoded: ALREADY_ON for an online CPU,
//!   INVALID_PARAMETERS for an MPIDR no CPU has (QEMU target/arm/arm-powerctl.c);
//! - the guard page under each secondary stack is unmapped in the EL2 tables (an `AT S1E2R`
//!   walk faults) while the stack page above it is mapped Normal.
//!
//! With `smp-overflow` on the command line, CPU 1 instead recurses into its stack's guard page:
//! the fault must be reported as that CPU's stack overflow (the scenario expects status 1).

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::smp::{self, MAX_CPUS, SmpError};

/// What the probe work found on CPU `i` (written by that CPU, read after `is_idle`).
struct Probe {
    mpidr: AtomicU64,
    index: AtomicU64,
    el: AtomicU64,
    sp_own: AtomicBool,
    waker: AtomicU64,
    isenabler0: AtomicU64,
    gic_read: AtomicBool,
    intid: AtomicU64,
    ticks: AtomicU64,
}

static PROBES: [Probe; MAX_CPUS] = [const {
    Probe {
        mpidr: AtomicU64::new(0),
        index: AtomicU64::new(u64::MAX),
        el: AtomicU64::new(0),
        sp_own: AtomicBool::new(false),
        waker: AtomicU64::new(0),
        isenabler0: AtomicU64::new(0),
        gic_read: AtomicBool::new(false),
        intid: AtomicU64::new(0),
        ticks: AtomicU64::new(0),
    }
}; MAX_CPUS];

fn probe(cpu: usize) {
    let p = &PROBES[cpu];
    let (mpidr, el, sp): (u64, u64, u64);
    // SAFETY: reads of identification/PSTATE registers and of SP; no side effects.
    unsafe {
        asm!(
            "mrs {m}, mpidr_el1",
            "mrs {e}, currentel",
            "mov {s}, sp",
            m = out(reg) mpidr,
            e = out(reg) el,
            s = out(reg) sp,
            options(nomem, nostack, preserves_flags),
        )
    };
    p.mpidr.store(mpidr, Ordering::Relaxed);
    p.el.store((el >> 2) & 3, Ordering::Relaxed);
    p.index.store(smp::cpu_index() as u64, Ordering::Relaxed);
    p.sp_own
        .store(smp::own_run_stack().contains(&sp), Ordering::Relaxed);
    if let Some((waker, en)) = super::preempt::redistributor_state() {
        p.waker.store(waker.into(), Ordering::Relaxed);
        p.isenabler0.store(en.into(), Ordering::Relaxed);
        p.gic_read.store(true, Ordering::Relaxed);
    }
    // 100 µs slice; the interrupt pends at this CPU's interface (PSTATE.I stays masked) and is
    // acknowledged by polling ICC_IAR1_EL1.
    super::preempt::arm_timer(100_000);
    let mut intid = None;
    smp::wait_until(500, || {
        intid = super::preempt::take_interrupt();
        intid.is_some()
    });
    super::preempt::arm_timer(0);
    p.intid
        .store(intid.map_or(u64::MAX, u64::from), Ordering::Relaxed);
    p.ticks.store(super::preempt::ticks(), Ordering::Relaxed);
}

static ARRIVED: AtomicU64 = AtomicU64::new(0);
static COUNTER: AtomicU64 = AtomicU64::new(0);
static MET: AtomicU64 = AtomicU64::new(0);
const INCREMENTS: u64 = 100_000;

/// Waits (bounded) until every secondary has started this work, then counts.
fn together(cpu: usize) {
    let all = ARRIVED.fetch_or(1 << cpu, Ordering::AcqRel) | (1 << cpu);
    let want = ((1u64 << smp::online()) - 1) & !1;
    let met = all == want || smp::wait_until(2000, || ARRIVED.load(Ordering::Acquire) == want);
    if met {
        MET.fetch_or(1 << cpu, Ordering::Relaxed);
    }
    for _ in 0..INCREMENTS {
        COUNTER.fetch_add(1, Ordering::Relaxed);
    }
}

static HOLD: AtomicBool = AtomicBool::new(false);

fn hold(_: usize) {
    smp::wait_until(5000, || !HOLD.load(Ordering::Acquire));
}

fn overflow(_: usize) {
    crate::arch::overflow_stack(0);
}

/// Runs the checks; returns the exit status.
pub fn run(info: &boot::BootInfo) -> u32 {
    let n = smp::online();
    let failures = core::cell::Cell::new(0u32);
    let fail = |what: core::fmt::Arguments<'_>| {
        log::error!("smp: FAILED: {what}");
        failures.set(failures.get() + 1);
    };
    if n < 2 {
        fail(format_args!(
            "only {n} CPU online; the scenario needs secondaries"
        ));
        return crate::EXIT_FAILURE;
    }
    if info.cmdline_value("smp-overflow").is_some() {
        crate::println!("smp: cpu 1 recurses into its stack guard page");
        if smp::launch(1, overflow, 0).is_ok() {
            smp::wait_idle(1, 10_000);
        }
        fail(format_args!("cpu 1 returned from the overflow"));
        return crate::EXIT_FAILURE;
    }

    for (cpu, p) in PROBES.iter().enumerate().take(n).skip(1) {
        if let Err(e) = smp::launch(cpu, probe, cpu) {
            fail(format_args!("launch on cpu {cpu}: {e:?}"));
            continue;
        }
        if !smp::wait_idle(cpu, 2000) {
            fail(format_args!("cpu {cpu} did not finish its work"));
            continue;
        }
        let mpidr = p.mpidr.load(Ordering::Relaxed);
        let index = p.index.load(Ordering::Relaxed);
        let el = p.el.load(Ordering::Relaxed);
        let sp_own = p.sp_own.load(Ordering::Relaxed);
        let waker = p.waker.load(Ordering::Relaxed);
        let en = p.isenabler0.load(Ordering::Relaxed);
        let intid = p.intid.load(Ordering::Relaxed);
        let ticks = p.ticks.load(Ordering::Relaxed);
        // GICR_WAKER: ProcessorSleep (bit 1) and ChildrenAsleep (bit 2) clear = awake.
        let awake = p.gic_read.load(Ordering::Relaxed) && waker & 0b110 == 0;
        let ppi = en & (1 << super::preempt::HYP_TIMER_INTID) != 0;
        let ok = index == cpu as u64
            && el == 2
            && sp_own
            && awake
            && ppi
            && intid == u64::from(super::preempt::HYP_TIMER_INTID)
            && ticks == 1
            && smp::mpidr_of(cpu) == Some(mpidr & boot::aarch64::dtb::MPIDR_AFFINITY_MASK);
        crate::println!(
            "smp: cpu {cpu} ran launched work: MPIDR_EL1 {mpidr:#x}, index {index} (TPIDR_EL2), CurrentEL {el}, stack {}, GICR_WAKER {waker:#x} ({}), timer PPI {} {}, timer interrupt {}, ticks {ticks}: {}",
            if sp_own { "own" } else { "FOREIGN" },
            if awake { "awake" } else { "ASLEEP" },
            super::preempt::HYP_TIMER_INTID,
            if ppi { "enabled" } else { "DISABLED" },
            if intid == u64::MAX {
                "NONE".into()
            } else {
                alloc::format!("{intid}")
            },
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            fail(format_args!("cpu {cpu}'s probe"));
        }
    }

    // Every secondary at once.
    for cpu in 1..n {
        if let Err(e) = smp::launch(cpu, together, cpu) {
            fail(format_args!("launch on cpu {cpu}: {e:?}"));
        }
    }
    let all_idle = (1..n).all(|cpu| smp::wait_idle(cpu, 10_000));
    let met = MET.load(Ordering::Relaxed);
    let want = ((1u64 << n) - 1) & !1;
    let count = COUNTER.load(Ordering::Relaxed);
    crate::println!(
        "smp: {} secondaries ran at once: {}, counter {count} of {}",
        n - 1,
        if met == want {
            "all met"
        } else {
            "NOT all met"
        },
        (n as u64 - 1) * INCREMENTS
    );
    if !all_idle || met != want || count != (n as u64 - 1) * INCREMENTS {
        fail(format_args!("concurrent run"));
    }

    // launch's refusals.
    HOLD.store(true, Ordering::Release);
    let first = smp::launch(1, hold, 0);
    let busy = smp::launch(1, hold, 0);
    let idle_while_held = smp::is_idle(1);
    let boot = smp::launch(0, hold, 0);
    let past = smp::launch(n, hold, 0);
    let beyond = smp::launch(MAX_CPUS, hold, 0);
    HOLD.store(false, Ordering::Release);
    let done = smp::wait_idle(1, 5000);
    crate::println!(
        "smp: launch refusals: busy cpu {busy:?}, boot cpu {boot:?}, cpu {n} {past:?}, cpu {MAX_CPUS} {beyond:?}; idle while held {idle_while_held}, idle after {done}"
    );
    if first.is_err()
        || busy != Err(SmpError::Busy)
        || boot != Err(SmpError::Busy)
        || past != Err(SmpError::NotOnline)
        || beyond != Err(SmpError::NoSuchCpu)
        || idle_while_held
        || !done
    {
        fail(format_args!("launch refusals"));
    }

    // The firmware's refusals, decoded: CPU_ON of a CPU that is on, and of an MPIDR no CPU has
    // (Aff2 = 0xff). Neither starts anything (the entry would park anyway).
    let cpu1 = smp::mpidr_of(1).unwrap_or(0);
    let again = smp::cpu_on_status(cpu1);
    let nobody = smp::cpu_on_status(0xff_0000);
    crate::println!(
        "smp: CPU_ON of MPIDR {cpu1:#x} (online): {:?}; of MPIDR 0xff0000 (absent): {:?}",
        again.map_or("no CPU_ON", |r| r.1),
        nobody.map_or("no CPU_ON", |r| r.1)
    );
    if again.map(|r| r.0) != Some(-4) || nobody.map(|r| r.0) != Some(-2) {
        fail(format_args!("PSCI refusals"));
    }

    // Guard pages, by the MMU's own walk of the live EL2 tables.
    let guards = smp::stack_guards();
    let unmapped = guards
        .iter()
        .filter(|&&g| super::mmu::attributes(g).is_none())
        .count();
    let above_normal = guards
        .iter()
        .filter(|&&g| super::mmu::attributes(g + 4096) == Some(super::mmu::ATTR_NORMAL_WB))
        .count();
    crate::println!(
        "smp: stack guard pages: {unmapped} of {} unmapped in the EL2 tables, {above_normal} stack pages above them Normal",
        guards.len()
    );
    if unmapped != guards.len() || above_normal != guards.len() {
        fail(format_args!("stack guard pages"));
    }

    if failures.get() == 0 {
        crate::println!("smp: all checks passed on {} secondaries", n - 1);
        crate::EXIT_SUCCESS
    } else {
        crate::EXIT_FAILURE
    }
}

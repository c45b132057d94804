//! The aarch64 shim: the hypercall instruction (HVC with the SMCCC register convention) and the
//! instructions only the containment variants need.

use core::arch::{asm, global_asm};

/// `hvc #0` with x0 = function ID (base + op), x1-x3 = arguments; the result comes back in x0
/// (docs/abi.md §2.2). SMCCC lets the callee change x0-x17; the hypervisor changes only x0, but
/// the shim declares the SMCCC clobbers so it stays correct under any conforming hypervisor.
pub fn hypercall(op: u32, a0: u64, a1: u64, a2: u64) -> i64 {
    let ret: u64;
    // SAFETY: HVC traps to the hypervisor, which writes only the result registers and resumes
    // after the instruction; every register SMCCC allows it to change is declared clobbered.
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") hvabi::smccc::function_id(op) => ret,
            inout("x1") a0 => _,
            inout("x2") a1 => _,
            inout("x3") a2 => _,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    ret as i64
}

/// A raw SMCCC call (`hvc #0` with the function ID as given), returning x0-x3: for the UID and
/// revision queries of the service.
pub fn smccc(fid: u64) -> [u64; 4] {
    let (r0, r1, r2, r3): (u64, u64, u64, u64);
    // SAFETY: as in `hypercall`.
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") fid => r0,
            inout("x1") 0u64 => r1,
            inout("x2") 0u64 => r2,
            inout("x3") 0u64 => r3,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    [r0, r1, r2, r3]
}

// The entry point (docs/guests.md "Several vCPUs"): every vCPU starts here with the start-info
// GPA in x0 and its index in x1. vCPU 0 keeps the stack the hypervisor gave it (SP at the top of
// RAM); vCPU i > 0 has none (SP = 0) and takes stack i of `testguest_stacks` (its top) before
// anything is pushed. An index the guest has no stack for waits for an interrupt that never
// comes, which the hypervisor stops.
global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .global guest_entry
guest_entry:
    cbz x1, 1f
    cmp x1, #{max}
    b.hi 2f
    adrp x9, testguest_stacks
    add x9, x9, :lo12:testguest_stacks
    add x9, x9, x1, lsl #{shift}
    mov sp, x9
1:
    b guest_main
2:
    wfi
    b 2b
    .popsection

    .pushsection .bss.testguest_stacks, "aw", %nobits
    .balign 16
testguest_stacks:
    .skip {bytes}
    .popsection
"#,
    max = const crate::smp::MAX_VCPUS - 1,
    shift = const crate::smp::STACK_SHIFT,
    bytes = const (crate::smp::MAX_VCPUS - 1) << crate::smp::STACK_SHIFT,
);

// The load that the `wild` variant aims at unmapped guest-physical memory, as its own symbol so
// the scenario can expect the PC the hypervisor reports (xtask resolves `{sym:...}`).
global_asm!(
    r#"
    .pushsection .text.testguest_wild_load, "ax"
    .global testguest_wild_load
testguest_wild_load:
    ldr x0, [x0]
    ret
    .global testguest_wild_store
testguest_wild_store:
    str x1, [x0]
    ret
    .popsection
"#
);

// Instructions a guest may not execute (or that never finish), each at its own symbol so the
// scenario can expect the exact PC of the stop report. None returns when the hypervisor is
// correct.
global_asm!(
    r#"
    .pushsection .text.testguest_forbidden, "ax"
    .global testguest_msr_insn
testguest_msr_insn:
    mrs x0, actlr_el1
    ret
    .global testguest_smc_insn
testguest_smc_insn:
    smc #0
    ret
    .global testguest_hlt_insn
testguest_hlt_insn:
    wfi
    ret
    .popsection
"#
);

// An A32 `b .` (0xEAFFFFFE): the code the `aarch32` variant runs at EL0 in AArch32 state.
global_asm!(
    r#"
    .pushsection .text.testguest_a32, "ax"
    .balign 4
    .global testguest_a32_spin
testguest_a32_spin:
    .word 0xeafffffe
    .popsection
"#
);

unsafe extern "C" {
    static testguest_a32_spin: u32;
    fn testguest_wild_load(addr: u64) -> u64;
    fn testguest_wild_store(addr: u64, value: u64);
    fn testguest_msr_insn();
    fn testguest_smc_insn();
    fn testguest_hlt_insn();
}

/// Runs one of the forbidden instructions: `msr` (MRS of ACTLR_EL1, trapped by HCR_EL2.TACR),
/// `smc` (SMC #0: firmware is not the guest's to call), `hlt` (WFI with interrupts masked:
/// nothing can wake it). `io` and `vmrun` have no aarch64 counterpart.
pub fn forbidden(what: &str) -> bool {
    // SAFETY: each stub only executes its instruction; the hypervisor traps all of them and
    // stops the guest, so nothing the instruction would do on hardware happens.
    unsafe {
        match what {
            "msr" => testguest_msr_insn(),
            "smc" => testguest_smc_insn(),
            "hlt" => testguest_hlt_insn(),
            _ => return false,
        }
    }
    true
}

/// Reads the 8 bytes at `addr` (identity-mapped by the boot page tables up to 4 GiB).
pub fn wild_read(addr: u64) -> u64 {
    // SAFETY: the point of the `wild` variant: the load reaches the hypervisor as a stage-2
    // data abort when `addr` is not guest RAM, and the guest never runs again.
    unsafe { testguest_wild_load(addr) }
}

/// Writes `value` to the 8 bytes at `addr` (identity-mapped like [`wild_read`]).
pub fn wild_write(addr: u64, value: u64) {
    // SAFETY: as in `wild_read`: when `addr` is not guest RAM the store reaches the hypervisor
    // as a stage-2 data abort and the guest never runs again.
    unsafe { testguest_wild_store(addr, value) }
}

/// The aarch64 counterpart of a triple fault: an exception whose delivery itself fails. VBAR_EL1
/// is pointed at guest-physical memory that is not RAM (the boot map covers it, stage 2 does
/// not), then `udf` raises an exception: fetching its vector is a stage-2 instruction abort.
pub fn triple_fault() -> ! {
    // SAFETY: deliberately ends this guest; nothing after the `udf` runs.
    unsafe {
        asm!(
            "msr vbar_el1, {v}",
            "isb",
            "udf #0",
            v = in(reg) 0x3000_0000u64,
            options(noreturn, nostack),
        );
    }
}

/// Reads guest-physical memory the hypervisor's loader wrote (start-info page, command line).
pub fn read_bytes(gpa: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the boot page tables identity-map guest RAM, and the start-info page and the
        // command line lie in it (docs/guests.md); byte reads need no alignment.
        *b = unsafe { core::ptr::read_volatile((gpa + i as u64) as *const u8) };
    }
}

/// The guest's ECAM window (docs/guests.md "Memory map": GPA 0x4000_0000, buses 0-255), mapped
/// Device by the boot page tables; the hypervisor emulates every access.
const ECAM: u64 = 0x4000_0000;

/// The ECAM address of a configuration-mechanism-#1 address (the shared code's format: bus in
/// bits 23:16, device 15:11, function 10:8, register 7:2).
fn ecam(address: u32) -> u64 {
    let bus = u64::from(address >> 16 & 0xff);
    let devfn = u64::from(address >> 8 & 0xff);
    ECAM + (bus << 20 | devfn << 12 | u64::from(address & 0xfc))
}

/// A 32-bit configuration read through the ECAM window.
pub fn pci_config_read(address: u32) -> u32 {
    // SAFETY: an aligned 32-bit load from the ECAM window, which the hypervisor emulates (stage
    // 2 maps nothing there); no guest memory is touched.
    unsafe { core::ptr::read_volatile(ecam(address) as *const u32) }
}

/// A 32-bit configuration write through the ECAM window.
pub fn pci_config_write(address: u32, value: u32) {
    // SAFETY: as in `pci_config_read`.
    unsafe { core::ptr::write_volatile(ecam(address) as *mut u32, value) }
}

/// A 16-bit write at `address` (dword-aligned) + `byte` (0 or 2).
pub fn pci_config_write16(address: u32, byte: u16, value: u16) {
    // SAFETY: as in `pci_config_read`; `byte` keeps the access 2-byte aligned.
    unsafe { core::ptr::write_volatile((ecam(address) + u64::from(byte)) as *mut u16, value) }
}

/// What [`timestamp`] counts, for the bench output.
pub const TIMESTAMP_NAME: &str = "cntvct";

/// MPIDR_EL1 as this vCPU reads it (the hypervisor's VMPIDR_EL2 for it).
pub fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The virtual counter CNTVCT_EL0 (CNTVOFF_EL2 = 0: the host's physical count), for timing.
pub fn timestamp() -> u64 {
    let t: u64;
    // SAFETY: reading CNTVCT_EL0 has no side effects; `isb` keeps it from being read early.
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) t, options(nomem, nostack, preserves_flags))
    };
    t
}

/// Drops to EL0 in AArch32 state (SPSR_EL1.M = 0b10000, User) at an A32 `b .`: a guest spinning
/// where the hypervisor's exits arrive through the lower-EL AArch32 vectors. It never returns:
/// only preemption and the CPU budget end it.
pub fn spin_in_aarch32_el0() -> ! {
    // SAFETY: ends this guest's AArch64 execution for good: ELR_EL1/SPSR_EL1 describe the
    // AArch32 loop, which touches no memory; the loop is in the identity map, executable at EL0.
    unsafe {
        asm!(
            "msr elr_el1, {pc}",
            "msr spsr_el1, {spsr}",
            "isb",
            "eret",
            pc = in(reg) core::ptr::addr_of!(testguest_a32_spin) as u64,
            spsr = in(reg) 0x10u64,
            options(noreturn, nostack),
        );
    }
}

/// `println!` of the crate root, which is defined after this module is declared.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut l = crate::Line { buf: [0; 200], len: 0 };
        let _ = core::fmt::Write::write_fmt(&mut l, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut l, "\n");
        crate::print(core::str::from_utf8(&l.buf[..l.len]).unwrap_or("?\n"));
    }};
}

// Interrupts (docs/guests.md "Interrupts (aarch64)"): the guest's GIC is the virtual CPU
// interface, reached through the ICC_* system registers (the hypervisor's HCR_EL2.IMO/FMO make
// them ICV_*); there is no distributor. The vector table handles only "current EL with SP_ELx,
// IRQ" (offset 0x280); every other vector ends the guest with its syndrome.
global_asm!(
    r#"
    .pushsection .text.testguest_vectors, "ax"
    .balign 2048
    .global testguest_vectors
testguest_vectors:
    .set i, 0
    .rept 16
    .balign 0x80
    .if i == 5
    b testguest_irq_entry
    .else
    mov x2, #i
    b testguest_unexpected
    .endif
    .set i, i + 1
    .endr

testguest_unexpected:
    mrs x0, esr_el1
    mrs x1, elr_el1
    b guest_unexpected_exception

testguest_irq_entry:
    sub sp, sp, #544
    stp x0, x1, [sp, #0]
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x30, [sp, #144]
    add x0, sp, #160
    stp q0, q1, [x0, #0]
    stp q2, q3, [x0, #32]
    stp q4, q5, [x0, #64]
    stp q6, q7, [x0, #96]
    stp q16, q17, [x0, #128]
    stp q18, q19, [x0, #160]
    stp q20, q21, [x0, #192]
    stp q22, q23, [x0, #224]
    stp q24, q25, [x0, #256]
    stp q26, q27, [x0, #288]
    stp q28, q29, [x0, #320]
    stp q30, q31, [x0, #352]
    bl guest_irq
    add x0, sp, #160
    ldp q0, q1, [x0, #0]
    ldp q2, q3, [x0, #32]
    ldp q4, q5, [x0, #64]
    ldp q6, q7, [x0, #96]
    ldp q16, q17, [x0, #128]
    ldp q18, q19, [x0, #160]
    ldp q20, q21, [x0, #192]
    ldp q22, q23, [x0, #224]
    ldp q24, q25, [x0, #256]
    ldp q26, q27, [x0, #288]
    ldp q28, q29, [x0, #320]
    ldp q30, q31, [x0, #352]
    ldp x0, x1, [sp, #0]
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x30, [sp, #144]
    add sp, sp, #544
    eret
    .popsection
"#
);

/// Interrupts taken per INTID (0-127), counted by [`guest_irq`] from what ICC_IAR1_EL1 returned.
pub static IRQ_COUNTS: [core::sync::atomic::AtomicU32; 128] =
    [const { core::sync::atomic::AtomicU32::new(0) }; 128];
/// INTIDs outside 0-127 that were acknowledged (none should be).
pub static IRQ_OTHER: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// INTID of the EL1 virtual timer (PPI 11).
pub const VTIMER_INTID: u32 = 27;

/// The IRQ vector's body: acknowledges (ICC_IAR1_EL1) until nothing is pending, counts each
/// INTID, stops the one-shot virtual timer when it is the timer (its line is a level), and
/// completes it (ICC_EOIR1_EL1; EOImode 0: drop and deactivate).
#[unsafe(no_mangle)]
extern "C" fn guest_irq() {
    use core::sync::atomic::Ordering::Relaxed;
    loop {
        let iar: u64;
        // SAFETY: acknowledging at the (virtual) CPU interface; completed below.
        unsafe { asm!("mrs {}, icc_iar1_el1", out(reg) iar, options(nostack)) };
        let intid = (iar & 0xff_ffff) as u32;
        if (1020..=1023).contains(&intid) {
            return;
        }
        if intid == VTIMER_INTID {
            // SAFETY: CNTV_CTL_EL0 = 0 stops this guest's own virtual timer.
            unsafe { asm!("msr cntv_ctl_el0, xzr", "isb", options(nostack)) };
        }
        match IRQ_COUNTS.get(intid as usize) {
            Some(c) => c.fetch_add(1, Relaxed),
            None => IRQ_OTHER.fetch_add(1, Relaxed),
        };
        // SAFETY: completes the INTID acknowledged above.
        unsafe { asm!("msr icc_eoir1_el1, {}", "isb", in(reg) iar, options(nostack)) };
    }
}

#[unsafe(no_mangle)]
extern "C" fn guest_unexpected_exception(esr: u64, elr: u64, vector: u64) -> ! {
    say!("testguest: unexpected exception vector {vector}, esr {esr:#x}, elr {elr:#x}");
    crate::exit(97)
}

unsafe extern "C" {
    static testguest_vectors: u8;
}

/// Installs the vectors and enables interrupts at the virtual CPU interface: PMR 0xff (every
/// priority), Group 1 enabled, PSTATE.I cleared.
pub fn irq_init() {
    // SAFETY: the vector table is this image's; the ICC_* writes configure only this guest's
    // virtual CPU interface.
    unsafe {
        asm!(
            "msr vbar_el1, {v}",
            "isb",
            "mov {t}, #0xff",
            "msr icc_pmr_el1, {t}",
            "mov {t}, #1",
            "msr icc_igrpen1_el1, {t}",
            "isb",
            "msr daifclr, #2",
            "isb",
            v = in(reg) core::ptr::addr_of!(testguest_vectors) as u64,
            t = out(reg) _,
            options(nostack),
        );
    }
}

/// WFI: the hypervisor traps it and resumes the guest when an interrupt is due.
pub fn wait_for_interrupt() {
    // SAFETY: WFI only waits.
    unsafe { asm!("wfi", options(nomem, nostack, preserves_flags)) };
}

/// The counter frequency (CNTFRQ_EL0).
pub fn counter_frequency() -> u64 {
    let f: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) f, options(nomem, nostack, preserves_flags)) };
    f
}

/// Arms the one-shot virtual timer at virtual count `cval` (ENABLE, not masked).
pub fn arm_vtimer(cval: u64) {
    // SAFETY: the virtual timer is this guest's own.
    unsafe {
        asm!(
            "msr cntv_cval_el0, {c}",
            "mov {t}, #1",
            "msr cntv_ctl_el0, {t}",
            "isb",
            c = in(reg) cval,
            t = out(reg) _,
            options(nostack),
        )
    };
}

/// The timer check (`timer` variant): `rounds` one-shot timers of `ms` milliseconds, each
/// waited for in WFI (not polling), each interrupt counted by the IRQ vector; the wait must
/// last at least the programmed time, exactly one timer interrupt per round must arrive, and
/// no other INTID. Returns the number of failed checks.
pub fn timer_checks(rounds: u32, ms: u64) -> u32 {
    use core::sync::atomic::Ordering::Relaxed;
    irq_init();
    let delay = counter_frequency() / 1000 * ms;
    let mut failed = 0;
    let mut wfis = 0u64;
    for round in 0..rounds {
        let before = IRQ_COUNTS[VTIMER_INTID as usize].load(Relaxed);
        let t0 = timestamp();
        arm_vtimer(t0 + delay);
        let mut n = 0u64;
        while IRQ_COUNTS[VTIMER_INTID as usize].load(Relaxed) == before && n < 100_000 {
            wait_for_interrupt();
            n += 1;
        }
        wfis += n;
        let elapsed = timestamp() - t0;
        let got = IRQ_COUNTS[VTIMER_INTID as usize].load(Relaxed) - before;
        if got != 1 || elapsed < delay {
            say!(
                "testguest: timer round {round}: {got} interrupts after {elapsed} ticks (want 1 after >= {delay}): FAILED"
            );
            failed += 1;
        }
    }
    // Nothing more may arrive: the handler stopped the one-shot timer each time.
    let t0 = timestamp();
    while timestamp() - t0 < delay {
        core::hint::spin_loop();
    }
    let total = IRQ_COUNTS[VTIMER_INTID as usize].load(Relaxed);
    let others: u32 = IRQ_COUNTS
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != VTIMER_INTID as usize)
        .map(|(_, c)| c.load(Relaxed))
        .sum::<u32>()
        + IRQ_OTHER.load(Relaxed);
    let ok = total == rounds && others == 0 && failed == 0;
    say!(
        "testguest: timer: {total} interrupts (INTID 27) for {rounds} timers of {ms} ms, waited in WFI ({wfis} WFIs), {others} other: {}",
        if ok { "ok" } else { "FAILED" }
    );
    u32::from(!ok) + failed
}

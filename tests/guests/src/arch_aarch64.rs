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

//! EL2 exception vectors: every exception the hypervisor takes from EL2 itself is fatal, except
//! an IRQ (taken only inside `irq::interrupt_window`), which saves the caller-saved state,
//! dispatches through `irq::el2_irq` and returns. A fatal handler dumps the syndrome and all
//! general-purpose registers and exits with status 1.
//! Exceptions from a lower EL are guest exits while a guest runs (`vcpu::el1::asm`, found through
//! the `smp::PerCpu` TPIDR_EL2 points at) and fatal otherwise.
//!
//! Vector table layout (DDI 0487, D1 "The AArch64 Exception Model", "Exception vectors"): 16
//! entries of 0x80 bytes, in four groups (current EL with SP_EL0, current EL with SP_ELx, lower EL
//! using AArch64, lower EL using AArch32) of Synchronous, IRQ, FIQ, SError; VBAR_EL2 `bits [10:0]`
//! are RES0, so the table is 2 KiB aligned. Syndrome decoding follows the ESR_EL2 register
//! description (EC, IL, ISS, ISS2) and, for aborts, its DFSC/IFSC encodings.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

/// Saved state, laid out by the assembly below.
#[repr(C)]
pub struct ExceptionFrame {
    /// x0-x30 at the time of the exception.
    x: [u64; 31],
    /// SP_EL2 before the exception pushed this frame (the exception stack).
    sp: u64,
    elr: u64,
    spsr: u64,
    esr: u64,
    far: u64,
    /// Index 0-15 of the vector taken.
    vector: u64,
    /// SP_EL0: the interrupted code's stack when it ran with SPSel = 0 (vectors 0-3), which is
    /// how the hypervisor normally runs (the boot stack; see `boot::aarch64`).
    sp_el0: u64,
}

const FRAME_SIZE: usize = core::mem::size_of::<ExceptionFrame>();
const _: () = assert!(
    FRAME_SIZE == 304 && FRAME_SIZE.is_multiple_of(16),
    "SP must stay 16-byte aligned"
);

global_asm!(
    ".pushsection .text.vectors, \"ax\"",
    ".macro HV_VENTRY index",
    ".balign 0x80",
    // Make room for the frame and free two registers; the rest is saved out of line (an entry
    // holds only 32 instructions).
    "    sub     sp, sp, #{frame}",
    "    stp     x0, x1, [sp, #0]",
    "    mov     x0, #\\index",
    "    b       hv_el2_exception_common",
    ".endm",
    // Lower-EL entries: while a guest runs, this CPU's `PerCpu` holds its vCPU context and the exception
    // is a guest exit (`vcpu::el1::asm`, which saves the guest and returns to the host). With no
    // guest running nothing executes below EL2, so such an exception is fatal like any other.
    // TPIDR_EL2 points at this CPU's `smp::PerCpu` (never 0 once the vectors are installed),
    // whose first word is the running vCPU context or 0.
    ".macro HV_GUEST_VENTRY index",
    ".balign 0x80",
    "    stp     x0, x1, [sp, #-16]!",
    "    mrs     x0, tpidr_el2",
    "    ldr     x0, [x0]",
    "    cbz     x0, 1f",
    "    mov     x1, #\\index",
    "    b       hv_el1_guest_exit",
    "1:  ldp     x0, x1, [sp], #16",
    "    sub     sp, sp, #{frame}",
    "    stp     x0, x1, [sp, #0]",
    "    mov     x0, #\\index",
    "    b       hv_el2_exception_common",
    ".endm",
    // IRQ at EL2: the interrupted code continues afterwards, so everything the AAPCS64 lets a
    // call clobber is saved (x0-x18, x29, x30, q0-q31 with FPSR/FPCR: the handler is Rust and
    // may use SIMD), plus ELR/SPSR; callee-saved registers are preserved by the call itself.
    ".macro HV_IRQ_VENTRY",
    ".balign 0x80",
    "    sub     sp, sp, #{irq_frame}",
    "    stp     x0, x1, [sp, #0]",
    "    b       hv_el2_irq_common",
    ".endm",
    ".balign 2048",
    ".global hv_el2_vectors",
    "hv_el2_vectors:",
    "    HV_VENTRY 0",
    "    HV_IRQ_VENTRY",
    "    HV_VENTRY 2",
    "    HV_VENTRY 3",
    "    HV_VENTRY 4",
    "    HV_IRQ_VENTRY",
    "    HV_VENTRY 6",
    "    HV_VENTRY 7",
    "    HV_GUEST_VENTRY 8",
    "    HV_GUEST_VENTRY 9",
    "    HV_GUEST_VENTRY 10",
    "    HV_GUEST_VENTRY 11",
    "    HV_VENTRY 12",
    "    HV_VENTRY 13",
    "    HV_VENTRY 14",
    "    HV_VENTRY 15",
    "hv_el2_exception_common:",
    "    stp     x2, x3, [sp, #16]",
    "    stp     x4, x5, [sp, #32]",
    "    stp     x6, x7, [sp, #48]",
    "    stp     x8, x9, [sp, #64]",
    "    stp     x10, x11, [sp, #80]",
    "    stp     x12, x13, [sp, #96]",
    "    stp     x14, x15, [sp, #112]",
    "    stp     x16, x17, [sp, #128]",
    "    stp     x18, x19, [sp, #144]",
    "    stp     x20, x21, [sp, #160]",
    "    stp     x22, x23, [sp, #176]",
    "    stp     x24, x25, [sp, #192]",
    "    stp     x26, x27, [sp, #208]",
    "    stp     x28, x29, [sp, #224]",
    "    add     x1, sp, #{frame}",
    "    stp     x30, x1, [sp, #240]",
    "    mrs     x1, elr_el2",
    "    mrs     x2, spsr_el2",
    "    stp     x1, x2, [sp, #256]",
    "    mrs     x1, esr_el2",
    "    mrs     x2, far_el2",
    "    stp     x1, x2, [sp, #272]",
    "    mrs     x1, sp_el0",
    "    stp     x0, x1, [sp, #288]",
    "    mov     x0, sp",
    "    bl      {handler}",
    "1:  wfe",
    "    b       1b",
    "hv_el2_irq_common:",
    "    stp     x2, x3, [sp, #16]",
    "    stp     x4, x5, [sp, #32]",
    "    stp     x6, x7, [sp, #48]",
    "    stp     x8, x9, [sp, #64]",
    "    stp     x10, x11, [sp, #80]",
    "    stp     x12, x13, [sp, #96]",
    "    stp     x14, x15, [sp, #112]",
    "    stp     x16, x17, [sp, #128]",
    "    stp     x18, x29, [sp, #144]",
    "    mrs     x0, elr_el2",
    "    stp     x30, x0, [sp, #160]",
    "    mrs     x0, spsr_el2",
    "    mrs     x1, fpsr",
    "    stp     x0, x1, [sp, #176]",
    "    mrs     x0, fpcr",
    "    str     x0, [sp, #192]",
    "    stp     q0, q1, [sp, #208]",
    "    stp     q2, q3, [sp, #240]",
    "    stp     q4, q5, [sp, #272]",
    "    stp     q6, q7, [sp, #304]",
    "    stp     q8, q9, [sp, #336]",
    "    stp     q10, q11, [sp, #368]",
    "    stp     q12, q13, [sp, #400]",
    "    stp     q14, q15, [sp, #432]",
    "    stp     q16, q17, [sp, #464]",
    "    stp     q18, q19, [sp, #496]",
    "    stp     q20, q21, [sp, #528]",
    "    stp     q22, q23, [sp, #560]",
    "    stp     q24, q25, [sp, #592]",
    "    stp     q26, q27, [sp, #624]",
    "    stp     q28, q29, [sp, #656]",
    "    stp     q30, q31, [sp, #688]",
    "    bl      {irq_handler}",
    "    ldp     q0, q1, [sp, #208]",
    "    ldp     q2, q3, [sp, #240]",
    "    ldp     q4, q5, [sp, #272]",
    "    ldp     q6, q7, [sp, #304]",
    "    ldp     q8, q9, [sp, #336]",
    "    ldp     q10, q11, [sp, #368]",
    "    ldp     q12, q13, [sp, #400]",
    "    ldp     q14, q15, [sp, #432]",
    "    ldp     q16, q17, [sp, #464]",
    "    ldp     q18, q19, [sp, #496]",
    "    ldp     q20, q21, [sp, #528]",
    "    ldp     q22, q23, [sp, #560]",
    "    ldp     q24, q25, [sp, #592]",
    "    ldp     q26, q27, [sp, #624]",
    "    ldp     q28, q29, [sp, #656]",
    "    ldp     q30, q31, [sp, #688]",
    "    ldr     x0, [sp, #192]",
    "    msr     fpcr, x0",
    "    ldp     x0, x1, [sp, #176]",
    "    msr     spsr_el2, x0",
    "    msr     fpsr, x1",
    "    ldp     x30, x0, [sp, #160]",
    "    msr     elr_el2, x0",
    "    ldp     x18, x29, [sp, #144]",
    "    ldp     x16, x17, [sp, #128]",
    "    ldp     x14, x15, [sp, #112]",
    "    ldp     x12, x13, [sp, #96]",
    "    ldp     x10, x11, [sp, #80]",
    "    ldp     x8, x9, [sp, #64]",
    "    ldp     x6, x7, [sp, #48]",
    "    ldp     x4, x5, [sp, #32]",
    "    ldp     x2, x3, [sp, #16]",
    "    ldp     x0, x1, [sp, #0]",
    "    add     sp, sp, #{irq_frame}",
    "    eret",
    ".popsection",
    frame = const FRAME_SIZE,
    handler = sym el2_exception,
    irq_frame = const IRQ_FRAME_SIZE,
    irq_handler = sym super::irq::el2_irq,
);

/// The IRQ entry's save area: x0-x18, x29, x30, ELR, SPSR, FPSR, FPCR (0..200), pad, q0-q31
/// (208..720).
const IRQ_FRAME_SIZE: usize = 720;

unsafe extern "C" {
    static hv_el2_vectors: u8;
}

/// Points VBAR_EL2 at the vectors.
pub fn install() {
    let vectors = core::ptr::addr_of!(hv_el2_vectors) as u64;
    // SAFETY: `hv_el2_vectors` is the 2 KiB-aligned table above, in the image's Normal, executable
    // mapping; the ISB makes the new base take effect before any later exception. Writing
    // VBAR_EL2 affects only where exceptions to EL2 go.
    unsafe { asm!("msr vbar_el2, {0}", "isb", in(reg) vectors, options(nostack, preserves_flags)) };
}

static IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// Called by the vectors with the saved frame. Prints everything and exits with status 1.
extern "C" fn el2_exception(frame: &ExceptionFrame) -> ! {
    let print = |args: core::fmt::Arguments<'_>| crate::console::print_unlocked(args);
    if IN_HANDLER.swap(true, Ordering::Relaxed) {
        // An exception while dumping one (a broken console, a bad stack): do not recurse.
        print(format_args!(
            "\nhypervisor: nested exception, ESR_EL2 {:#x}\n",
            frame.esr
        ));
        super::exit(crate::EXIT_FAILURE);
    }
    let ec = ((frame.esr >> 26) & 0x3f) as u8;
    let iss = frame.esr & 0x1ff_ffff;
    let il = (frame.esr >> 25) & 1;
    let iss2 = (frame.esr >> 32) & 0xff_ffff;
    print(format_args!(
        "\nhypervisor: unexpected exception at EL2, vector {:#05x} ({})\n",
        frame.vector * 0x80,
        vector_name(frame.vector)
    ));
    print(format_args!(
        "  ESR_EL2  {:#018x}  EC {ec:#04x} {}, IL {il}, ISS {iss:#09x}, ISS2 {iss2:#x}\n",
        frame.esr,
        ec_name(ec)
    ));
    if let Some(detail) = abort_detail(ec, iss) {
        print(format_args!(
            "           {detail}, {}\n",
            if iss & (1 << 6) != 0 { "write" } else { "read" }
        ));
    }
    let far_note = if far_valid(ec, iss) {
        ""
    } else {
        " (UNKNOWN for this class)"
    };
    print(format_args!("  FAR_EL2  {:#018x}{far_note}\n", frame.far));
    print(format_args!("  ELR_EL2  {:#018x}\n", frame.elr));
    print(format_args!(
        "  SPSR_EL2 {:#018x}  M {:#x} ({}), DAIF {:#x}\n",
        frame.spsr,
        frame.spsr & 0xf,
        spsr_mode(frame.spsr),
        (frame.spsr >> 6) & 0xf
    ));
    for (row, regs) in frame.x.chunks(3).enumerate() {
        print(format_args!("  "));
        for (col, value) in regs.iter().enumerate() {
            let n = row * 3 + col;
            let sep = if col == 0 { "" } else { "  " };
            print(format_args!("{sep}x{n:<2} {value:#018x}"));
        }
        print(format_args!("\n"));
    }
    // Vectors 0-3 ("current EL with SP_EL0") interrupted code running on SP_EL0.
    let interrupted_sp = if frame.vector < 4 {
        frame.sp_el0
    } else {
        frame.sp
    };
    print(format_args!("  SP       {interrupted_sp:#018x}\n"));
    // A data abort in a guard page (or with SP inside one) is a stack overflow: say which.
    let guard = boot::aarch64::stack_guards().into_iter().find(|&(_, g)| {
        let page = g..g + 4096;
        (far_valid(ec, iss) && page.contains(&frame.far)) || page.contains(&interrupted_sp)
    });
    if let Some((stack, g)) = guard {
        print(format_args!(
            "hypervisor: stack overflow: the {stack} stack ran into its guard page at {g:#x}\n"
        ));
    } else if let Some((slot, stack)) = super::smp::guard_owner(frame.far)
        .filter(|_| far_valid(ec, iss))
        .or_else(|| super::smp::guard_owner(interrupted_sp))
    {
        print(format_args!(
            "hypervisor: stack overflow: the {stack} stack of CPU slot {slot} ran into its guard page\n"
        ));
    }
    print(format_args!(
        "hypervisor: exit status {}\n",
        crate::EXIT_FAILURE
    ));
    super::exit(crate::EXIT_FAILURE)
}

fn vector_name(index: u64) -> &'static str {
    const NAMES: [&str; 16] = [
        "current EL with SP_EL0, synchronous",
        "current EL with SP_EL0, IRQ",
        "current EL with SP_EL0, FIQ",
        "current EL with SP_EL0, SError",
        "current EL with SP_ELx, synchronous",
        "current EL with SP_ELx, IRQ",
        "current EL with SP_ELx, FIQ",
        "current EL with SP_ELx, SError",
        "lower EL (AArch64), synchronous",
        "lower EL (AArch64), IRQ",
        "lower EL (AArch64), FIQ",
        "lower EL (AArch64), SError",
        "lower EL (AArch32), synchronous",
        "lower EL (AArch32), IRQ",
        "lower EL (AArch32), FIQ",
        "lower EL (AArch32), SError",
    ];
    NAMES.get(index as usize).copied().unwrap_or("?")
}

/// ESR_ELx.EC (DDI 0487, ESR_EL2 "EC, `bits [31:26]`").
fn ec_name(ec: u8) -> &'static str {
    match ec {
        0x00 => "Unknown reason",
        0x01 => "Trapped WF* instruction",
        0x03 => "Trapped MCR/MRC (coproc 0b1111)",
        0x04 => "Trapped MCRR/MRRC (coproc 0b1111)",
        0x05 => "Trapped MCR/MRC (coproc 0b1110)",
        0x06 => "Trapped LDC/STC",
        0x07 => "Access to SME, SVE, Advanced SIMD or floating-point trapped",
        0x0a => "Trapped LD64B/ST64B* instruction",
        0x0c => "Trapped MRRC (coproc 0b1110)",
        0x0d => "Branch Target Exception",
        0x0e => "Illegal Execution state",
        0x11 => "SVC in AArch32 state",
        0x12 => "HVC in AArch32 state",
        0x13 => "SMC in AArch32 state",
        0x15 => "SVC in AArch64 state",
        0x16 => "HVC in AArch64 state",
        0x17 => "SMC in AArch64 state",
        0x18 => "Trapped MSR, MRS or System instruction",
        0x19 => "Access to SVE functionality trapped",
        0x1a => "Trapped ERET, ERETAA or ERETAB",
        0x1c => "Pointer authentication failure",
        0x1d => "Access to SME functionality trapped",
        0x20 => "Instruction Abort from a lower Exception level",
        0x21 => "Instruction Abort taken without a change in Exception level",
        0x22 => "PC alignment fault",
        0x24 => "Data Abort from a lower Exception level",
        0x25 => "Data Abort taken without a change in Exception level",
        0x26 => "SP alignment fault",
        0x27 => "Memory Operation Exception",
        0x28 => "Trapped floating-point exception (AArch32)",
        0x2c => "Trapped floating-point exception (AArch64)",
        0x2f => "SError exception",
        0x30 => "Breakpoint from a lower Exception level",
        0x31 => "Breakpoint without a change in Exception level",
        0x32 => "Software Step from a lower Exception level",
        0x33 => "Software Step without a change in Exception level",
        0x34 => "Watchpoint from a lower Exception level",
        0x35 => "Watchpoint without a change in Exception level",
        0x38 => "BKPT instruction (AArch32)",
        0x3c => "BRK instruction (AArch64)",
        _ => "unallocated or not decoded",
    }
}

/// For Instruction/Data Aborts: the fault status code (`ISS[5:0]`, IFSC/DFSC) in words.
fn abort_detail(ec: u8, iss: u64) -> Option<&'static str> {
    if !matches!(ec, 0x20 | 0x21 | 0x24 | 0x25) {
        return None;
    }
    Some(match iss & 0x3f {
        0b00_0000..=0b00_0011 => "address size fault",
        0b00_0100 => "translation fault, level 0",
        0b00_0101 => "translation fault, level 1",
        0b00_0110 => "translation fault, level 2",
        0b00_0111 => "translation fault, level 3",
        0b00_1000..=0b00_1011 => "access flag fault",
        0b00_1100..=0b00_1111 => "permission fault",
        0b01_0000 => "synchronous external abort",
        0b01_0001 => "synchronous tag check fault",
        0b01_0100..=0b01_0111 => "synchronous external abort on a table walk",
        0b10_0001 => "alignment fault",
        0b11_0000 => "TLB conflict abort",
        0b11_0001 => "unsupported atomic hardware update fault",
        _ => "other fault status",
    })
}

/// FAR_EL2 is valid for aborts (unless ISS.FnV is set), PC alignment faults and watchpoints.
fn far_valid(ec: u8, iss: u64) -> bool {
    match ec {
        0x20 | 0x21 | 0x24 | 0x25 => iss & (1 << 10) == 0,
        0x22 | 0x34 | 0x35 => true,
        _ => false,
    }
}

fn spsr_mode(spsr: u64) -> &'static str {
    if spsr & (1 << 4) != 0 {
        return "AArch32";
    }
    match spsr & 0xf {
        0b0000 => "EL0t",
        0b0100 => "EL1t",
        0b0101 => "EL1h",
        0b1000 => "EL2t",
        0b1001 => "EL2h",
        _ => "?",
    }
}

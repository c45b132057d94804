//! The `unsafe` edge of the EL1 backend: the EL2 control registers that configure a guest's
//! translation regime (HCR_EL2, VTCR_EL2, VTTBR_EL2), the guest's EL1 system registers, TLB
//! maintenance, and the world switch (`ERET` into the guest, the lower-EL vectors back). Nothing
//! else in `vcpu/el1` uses `unsafe`.
//!
//! World switch. [`enter`] saves the host's callee-saved state (x19-x30, d8-d15, FPCR/FPSR) on
//! its own stack and records that stack pointer and PSTATE.SP (the hypervisor may run on SP_EL0
//! or SP_EL2) in the [`Context`], records the context in this CPU's `arch::smp::PerCpu` (the
//! first word of what TPIDR_EL2 points at), loads the guest's SP_EL0,
//! ELR_EL2/SPSR_EL2, V0-V31, FPCR/FPSR and x0-x30, and `ERET`s. A lower-EL exception enters
//! `hv_el1_guest_exit` from `arch::aarch64::exception`'s vectors (guest x0/x1 pushed on SP_EL2,
//! x0 = context, x1 = vector index), which stores the guest's registers and the syndrome
//! (ESR/FAR/HPFAR_EL2) in the context, clears that word, switches back to the host's stack and
//! returns from [`enter`]. PSTATE.{D,A,I,F} are all set by the exception, as they were when the
//! host called [`enter`].
//!
//! The guest's EL1 system registers are switched in Rust ([`El1Regs`]): loaded before the call
//! when the CPU holds another vCPU's, saved by the backend ([`save_el1`]) only when this vCPU
//! leaves the CPU. The hypervisor at non-VHE EL2 never uses EL1 state (ARM DDI 0487, D1.3: EL2's
//! own regime is TTBR0_EL2/TCR_EL2/SCTLR_EL2), so nothing can observe or change the guest's
//! values in between, except the virtual timer the backend itself programs.

use core::arch::{asm, global_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};

use iommu::pgtable::{ArmStage2, PageTable, RootInfo};

/// A VM's stage-2 table, as the engine built it.
pub type Stage2 = PageTable<ArmStage2<12>>;

/// HCR_EL2 bits (DDI 0487, D23 "HCR_EL2").
mod hcr {
    pub const VM: u64 = 1 << 0;
    pub const SWIO: u64 = 1 << 1;
    pub const FMO: u64 = 1 << 3;
    pub const IMO: u64 = 1 << 4;
    pub const AMO: u64 = 1 << 5;
    pub const TWI: u64 = 1 << 13;
    pub const TWE: u64 = 1 << 14;
    pub const TSC: u64 = 1 << 19;
    pub const TIDCP: u64 = 1 << 20;
    pub const TACR: u64 = 1 << 21;
    pub const TSW: u64 = 1 << 22;
    pub const RW: u64 = 1 << 31;
}

/// The traps every guest runs with (see the module comment of `vcpu::el1`); VM and RW are
/// what make the world switch sound, so they are fixed here rather than passed in.
const GUEST_HCR: u64 = hcr::VM
    | hcr::SWIO
    | hcr::FMO
    | hcr::IMO
    | hcr::AMO
    | hcr::TWI
    | hcr::TWE
    | hcr::TSC
    | hcr::TIDCP
    | hcr::TACR
    | hcr::TSW
    | hcr::RW;

/// A guest's general-purpose and SIMD&FP registers plus the exit syndrome. Offsets are used by
/// the assembly below (checked at compile time).
#[repr(C)]
pub struct Context {
    pub x: [u64; 31],
    pub sp_el0: u64,
    /// ELR_EL2: where the guest resumes.
    pub pc: u64,
    /// SPSR_EL2: the guest's PSTATE.
    pub pstate: u64,
    pub esr: u64,
    pub far: u64,
    pub hpfar: u64,
    /// Index 8-11 of the vector the exit came through (lower EL AArch64: sync, IRQ, FIQ, SError).
    pub vector: u64,
    host_sp: u64,
    host_spsel: u64,
    pub fpcr: u64,
    pub fpsr: u64,
    pub v: [u128; 32],
}

const _: () = {
    assert!(offset_of!(Context, sp_el0) == 248);
    assert!(offset_of!(Context, pc) == 256);
    assert!(offset_of!(Context, esr) == 272);
    assert!(offset_of!(Context, hpfar) == 288);
    assert!(offset_of!(Context, vector) == 296);
    assert!(offset_of!(Context, host_sp) == 304);
    assert!(offset_of!(Context, fpcr) == 320);
    assert!(offset_of!(Context, fpsr) == 328);
    assert!(offset_of!(Context, v) == 336);
};

impl Context {
    pub fn new(pc: u64, pstate: u64, x0: u64) -> Context {
        let mut x = [0; 31];
        x[0] = x0;
        Context {
            x,
            sp_el0: 0,
            pc,
            pstate,
            esr: 0,
            far: 0,
            hpfar: 0,
            vector: 0,
            host_sp: 0,
            host_spsel: 0,
            fpcr: 0,
            fpsr: 0,
            v: [0; 32],
        }
    }
}

global_asm!(
    r#"
    .pushsection .text.el1_switch, "ax"
    .global hv_el1_enter
    .balign 16
hv_el1_enter:
    sub     sp, sp, #176
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    mrs     x9, fpcr
    mrs     x10, fpsr
    stp     x9, x10, [sp, #160]
    mov     x9, sp
    mrs     x10, spsel
    stp     x9, x10, [x0, #304]
    // From here on SP_EL2 is selected (it is where the exit arrives), so SP_EL0 is free to
    // hold the guest's value even when the host itself runs on SP_EL0.
    msr     spsel, #1
    mrs     x9, tpidr_el2
    str     x0, [x9]
    ldr     x9, [x0, #248]
    msr     sp_el0, x9
    ldp     x9, x10, [x0, #256]
    msr     elr_el2, x9
    msr     spsr_el2, x10
    ldr     x9, [x0, #320]
    msr     fpcr, x9
    ldr     x9, [x0, #328]
    msr     fpsr, x9
    add     x9, x0, #336
    ldp     q0, q1, [x9, #0]
    ldp     q2, q3, [x9, #32]
    ldp     q4, q5, [x9, #64]
    ldp     q6, q7, [x9, #96]
    ldp     q8, q9, [x9, #128]
    ldp     q10, q11, [x9, #160]
    ldp     q12, q13, [x9, #192]
    ldp     q14, q15, [x9, #224]
    ldp     q16, q17, [x9, #256]
    ldp     q18, q19, [x9, #288]
    ldp     q20, q21, [x9, #320]
    ldp     q22, q23, [x9, #352]
    ldp     q24, q25, [x9, #384]
    ldp     q26, q27, [x9, #416]
    ldp     q28, q29, [x9, #448]
    ldp     q30, q31, [x9, #480]
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret
    dsb     nsh
    isb

    .global hv_el1_guest_exit
    .balign 16
hv_el1_guest_exit:
    str     x1, [x0, #296]
    stp     x2, x3, [x0, #16]
    stp     x4, x5, [x0, #32]
    stp     x6, x7, [x0, #48]
    stp     x8, x9, [x0, #64]
    stp     x10, x11, [x0, #80]
    stp     x12, x13, [x0, #96]
    stp     x14, x15, [x0, #112]
    stp     x16, x17, [x0, #128]
    stp     x18, x19, [x0, #144]
    stp     x20, x21, [x0, #160]
    stp     x22, x23, [x0, #176]
    stp     x24, x25, [x0, #192]
    stp     x26, x27, [x0, #208]
    stp     x28, x29, [x0, #224]
    str     x30, [x0, #240]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x0, #0]
    mrs     x2, sp_el0
    str     x2, [x0, #248]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x2, x3, [x0, #256]
    mrs     x2, esr_el2
    mrs     x3, far_el2
    stp     x2, x3, [x0, #272]
    mrs     x2, hpfar_el2
    str     x2, [x0, #288]
    mrs     x2, fpcr
    str     x2, [x0, #320]
    mrs     x2, fpsr
    str     x2, [x0, #328]
    add     x2, x0, #336
    stp     q0, q1, [x2, #0]
    stp     q2, q3, [x2, #32]
    stp     q4, q5, [x2, #64]
    stp     q6, q7, [x2, #96]
    stp     q8, q9, [x2, #128]
    stp     q10, q11, [x2, #160]
    stp     q12, q13, [x2, #192]
    stp     q14, q15, [x2, #224]
    stp     q16, q17, [x2, #256]
    stp     q18, q19, [x2, #288]
    stp     q20, q21, [x2, #320]
    stp     q22, q23, [x2, #352]
    stp     q24, q25, [x2, #384]
    stp     q26, q27, [x2, #416]
    stp     q28, q29, [x2, #448]
    stp     q30, q31, [x2, #480]
    mrs     x2, tpidr_el2
    str     xzr, [x2]
    ldp     x2, x3, [x0, #304]
    cbz     x3, 2f
    mov     sp, x2
    b       3f
2:  msr     sp_el0, x2
    msr     spsel, #0
3:  ldp     x9, x10, [sp, #160]
    msr     fpcr, x9
    msr     fpsr, x10
    ldp     d14, d15, [sp, #144]
    ldp     d12, d13, [sp, #128]
    ldp     d10, d11, [sp, #112]
    ldp     d8, d9, [sp, #96]
    ldp     x29, x30, [sp, #80]
    ldp     x27, x28, [sp, #64]
    ldp     x25, x26, [sp, #48]
    ldp     x23, x24, [sp, #32]
    ldp     x21, x22, [sp, #16]
    ldp     x19, x20, [sp, #0]
    add     sp, sp, #176
    ret
    .popsection
"#
);

unsafe extern "C" {
    fn hv_el1_enter(ctx: *mut Context);
}

/// The guest's EL1 (and EL0 thread-ID) system registers, switched around each run.
#[derive(Clone, Copy, Debug, Default)]
pub struct El1Regs {
    pub sctlr: u64,
    pub actlr: u64,
    pub cpacr: u64,
    pub ttbr0: u64,
    pub ttbr1: u64,
    pub tcr: u64,
    pub mair: u64,
    pub amair: u64,
    pub vbar: u64,
    pub contextidr: u64,
    pub tpidr_el1: u64,
    pub tpidr_el0: u64,
    pub tpidrro_el0: u64,
    pub sp_el1: u64,
    pub elr_el1: u64,
    pub spsr_el1: u64,
    pub esr_el1: u64,
    pub far_el1: u64,
    pub afsr0: u64,
    pub afsr1: u64,
    pub par: u64,
    pub cntkctl: u64,
    pub csselr: u64,
    pub mdscr: u64,
    pub cntv_ctl: u64,
    pub cntv_cval: u64,
    /// VMPIDR_EL2: the MPIDR_EL1 this vCPU reads (EL1 reads of MPIDR_EL1 return it, D19.2).
    pub vmpidr: u64,
}

macro_rules! sysregs {
    ($m:ident, $($field:ident = $reg:literal),* $(,)?) => {
        /// Loads every register of `r` into the CPU's EL1 state.
        fn load_el1(r: &El1Regs) {
            $(
                // SAFETY: EL1 system registers (and VMPIDR_EL2, which only sets what EL1 reads as
                // MPIDR_EL1) do not affect execution at non-VHE EL2 (see the module comment); the
                // values take effect only in the guest after ERET.
                unsafe {
                    asm!(concat!("msr ", $reg, ", {}"), in(reg) r.$field, options(nostack, preserves_flags));
                }
            )*
        }

        /// Stores the CPU's EL1 state into `r`. Not part of [`run`]: the backend calls it
        /// when the vCPU's saved image is needed (another vCPU may run on the CPU next, a WFI
        /// wait reads the timer), not after each exit (see `El1Vcpu::el1_saved`).
        pub fn save_el1(r: &mut El1Regs) {
            $(
                // SAFETY: reading EL1 system registers at EL2 has no side effects.
                unsafe {
                    asm!(concat!("mrs {}, ", $reg), out(reg) r.$field, options(nostack, preserves_flags));
                }
            )*
        }
    };
}

sysregs!(
    el1,
    sctlr = "sctlr_el1",
    actlr = "actlr_el1",
    cpacr = "cpacr_el1",
    ttbr0 = "ttbr0_el1",
    ttbr1 = "ttbr1_el1",
    tcr = "tcr_el1",
    mair = "mair_el1",
    amair = "amair_el1",
    vbar = "vbar_el1",
    contextidr = "contextidr_el1",
    tpidr_el1 = "tpidr_el1",
    tpidr_el0 = "tpidr_el0",
    tpidrro_el0 = "tpidrro_el0",
    sp_el1 = "sp_el1",
    elr_el1 = "elr_el1",
    spsr_el1 = "spsr_el1",
    esr_el1 = "esr_el1",
    far_el1 = "far_el1",
    afsr0 = "afsr0_el1",
    afsr1 = "afsr1_el1",
    par = "par_el1",
    cntkctl = "cntkctl_el1",
    csselr = "csselr_el1",
    mdscr = "mdscr_el1",
    cntv_ctl = "cntv_ctl_el0",
    cntv_cval = "cntv_cval_el0",
    vmpidr = "vmpidr_el2",
);

/// Proof that the CPU runs at non-VHE EL2 and the guest-wide EL2 controls are programmed: the
/// only way to reach [`run`]. It records the stage-2 shape VTCR_EL2 describes.
pub struct El2Ready {
    /// (T0SZ, levels, granule shift) of the tables VTCR_EL2 was programmed for.
    shape: (u32, u32, u32),
    /// The VTCR_EL2 value every CPU that runs a guest must hold.
    vtcr: u64,
}

/// The VTCR_EL2 each CPU (by `arch::smp::cpu_index`) was last given by [`program_el2`], 0 for
/// none. VTCR/VPIDR/VMPIDR/CNTHCTL/CNTVOFF_EL2 are per-CPU registers, so a CPU programs its
/// own before it first runs a guest ([`run`]). Each entry is written and read only by its own
/// CPU: Relaxed.
static PROGRAMMED: [AtomicU64; crate::arch::smp::MAX_CPUS] =
    [const { AtomicU64::new(0) }; crate::arch::smp::MAX_CPUS];

fn shape(ri: &RootInfo) -> (u32, u32, u32) {
    (ri.arm_t0sz(), ri.levels, ri.granule_shift)
}

/// VTCR_EL2 (DDI 0487, D23 "VTCR_EL2") for a table of geometry `ri`: T0SZ and SL0 from the
/// engine, TG0 = 4 KiB, inner-shareable write-back walks, PS = `parange`, 8-bit VMIDs, and
/// bit 31 (RES1).
fn vtcr_for(ri: &RootInfo, parange: u64) -> Result<u64, &'static str> {
    if ri.granule_shift != 12 {
        return Err("stage 2 needs the 4 KiB granule");
    }
    let sl0 = ri
        .arm_sl0()
        .ok_or("stage-2 start level has no SL0 encoding")?;
    Ok(u64::from(ri.arm_t0sz())
        | u64::from(sl0) << 6
        | 1 << 8
        | 1 << 10
        | 3 << 12
        | parange << 16
        | 1 << 31)
}

/// Programs what every guest shares: VTCR_EL2 for tables shaped like `probe` (T0SZ, SL0 from the
/// engine's geometry, PS = `parange`), VPIDR/VMPIDR_EL2 (the MIDR/MPIDR a guest reads: the
/// host's MIDR, a uniprocessor MPIDR), CNTHCTL_EL2 (EL1 may read the physical counter but not
/// program the physical timer) and CNTVOFF_EL2 = 0. Returns the proof and the VTCR_EL2 value.
pub fn prepare_el2(probe: &Stage2, parange: u64) -> Result<(El2Ready, u64), &'static str> {
    if current_el() != 2 || boot::aarch64::entry_error().is_some() {
        return Err("not running at non-VHE EL2");
    }
    let ri = probe.root_info();
    let vtcr = vtcr_for(&ri, parange & 7)?;
    program_el2(vtcr);
    Ok((
        El2Ready {
            shape: shape(&ri),
            vtcr,
        },
        vtcr,
    ))
}

/// Writes the guest-wide EL2 controls of [`prepare_el2`] on the calling CPU.
fn program_el2(vtcr: u64) {
    // SAFETY: these registers only configure the EL1&0 regime of guests, none of which is
    // running on this CPU (its world switch is not in progress: we are in host code); EL2's own
    // translation and execution are unaffected.
    unsafe {
        asm!(
            "msr vtcr_el2, {vtcr}",
            "mrs {t}, midr_el1",
            "msr vpidr_el2, {t}",
            // MPIDR: bit 31 RES1, U (bit 30) = uniprocessor, affinity 0.
            "mov {t}, #0xc0000000",
            "msr vmpidr_el2, {t}",
            // CNTHCTL_EL2 (non-VHE layout): EL1PCTEN (bit 0) = 1, EL1PCEN (bit 1) = 0.
            "mov {t}, #1",
            "msr cnthctl_el2, {t}",
            "msr cntvoff_el2, xzr",
            "msr vttbr_el2, xzr",
            "isb",
            vtcr = in(reg) vtcr,
            t = out(reg) _,
            options(nostack, preserves_flags),
        );
    }
    PROGRAMMED[crate::arch::smp::cpu_index()].store(vtcr, Ordering::Relaxed);
}

/// CurrentEL\[3:2\].
pub fn current_el() -> u64 {
    let el: u64;
    // SAFETY: CurrentEL is a read-only PSTATE view.
    unsafe { asm!("mrs {}, currentel", out(reg) el, options(nomem, nostack, preserves_flags)) };
    (el >> 2) & 3
}

/// ID_AA64MMFR0_EL1.PARange (bits 3:0) and ID_AA64MMFR1_EL1.VMIDBits (bits 7:4).
pub fn id_registers() -> (u64, u64) {
    let (mmfr0, mmfr1): (u64, u64);
    // SAFETY: ID registers are read-only.
    unsafe {
        asm!("mrs {}, id_aa64mmfr0_el1", "mrs {}, id_aa64mmfr1_el1", out(reg) mmfr0, out(reg) mmfr1, options(nomem, nostack, preserves_flags));
    }
    (mmfr0 & 0xf, (mmfr1 >> 4) & 0xf)
}

/// Invalidates every stage-1 and stage-2 TLB entry of `vmid` (Inner Shareable), after the
/// table writes the walker must see. Used when a VMID is handed out, after a stage-2 change, and
/// when its tables are freed, so a reused VMID never hits the previous guest's translations.
pub fn flush_vmid(_: &El2Ready, table: &Stage2, vmid: u16) {
    let vttbr = table.root() | u64::from(vmid) << 48;
    // SAFETY: TLBI VMALLS12E1IS acts on the VMID currently in VTTBR_EL2, which is set for the
    // duration of the sequence and cleared afterwards (no guest runs in between: one CPU).
    // `dsb ishst` orders the table updates before the invalidation, `dsb ish` completes it.
    unsafe {
        asm!(
            "dsb ishst",
            "msr vttbr_el2, {v}",
            "isb",
            "tlbi vmalls12e1is",
            "dsb ish",
            "msr vttbr_el2, xzr",
            "isb",
            v = in(reg) vttbr,
            options(nostack, preserves_flags),
        );
    }
}

/// Invalidates this CPU's stage-1 (EL1&0) TLB entries of `vmid` only (TLBI VMALLE1, non-
/// shareable, with the VMID in VTTBR_EL2: DDI 0487 D8.13): another vCPU of the same VM, with
/// its own first-stage state, is about to run here.
pub fn flush_vmid_stage1_local(_: &El2Ready, table: &Stage2, vmid: u16) {
    let vttbr = table.root() | u64::from(vmid) << 48;
    // SAFETY: VTTBR_EL2 is this CPU's own and no guest runs on this CPU during the sequence;
    // the invalidation only drops cached translations, which are refetched from the tables.
    unsafe {
        asm!(
            "msr vttbr_el2, {v}",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "msr vttbr_el2, xzr",
            "isb",
            v = in(reg) vttbr,
            options(nostack, preserves_flags),
        );
    }
}

/// Runs the guest: loads its stage 2 (`table`, `vmid`), the traps and (with `vgic.full`) its EL1
/// registers, enters it, and saves its general-purpose, SIMD&FP and GIC state when it exits (its
/// EL1 registers stay in the CPU until [`save_el1`]); the exit syndrome is in `ctx`. Returns `false`
/// without entering when `table` is not of the shape VTCR_EL2 describes.
pub fn run(
    ready: &El2Ready,
    table: &Stage2,
    vmid: u16,
    el1: &mut El1Regs,
    vgic: VgicRun<'_>,
    ctx: &mut Context,
) -> bool {
    if shape(&table.root_info()) != ready.shape {
        return false;
    }
    // A CPU other than the one `prepare_el2` ran on programs its own EL2 guest controls once.
    let mut vgic = vgic;
    if PROGRAMMED[crate::arch::smp::cpu_index()].load(Ordering::Relaxed) != ready.vtcr {
        program_el2(ready.vtcr);
        // It wrote VMPIDR_EL2: the vCPU's own must be loaded again.
        vgic.full = true;
    }
    let vttbr = table.root() | u64::from(vmid) << 48;
    // The guest returns to EL1 or EL0, never to EL2: an AArch64 SPSR naming EL2 or EL3 (M[4] = 0,
    // M[3:2] >= 2) becomes EL1h.
    if ctx.pstate & 0x10 == 0 && (ctx.pstate >> 2) & 3 >= 2 {
        ctx.pstate = (ctx.pstate & !0xf) | 0x5;
    }
    let hcr = GUEST_HCR;
    // The CPU still holds this vCPU's EL1 registers as `save_el1` left them when it was the
    // last to run here (the hypervisor at non-VHE EL2 writes none of them; the virtual timer,
    // which it does write, is reloaded by the backend then): only another vCPU's need replacing.
    if vgic.full {
        load_el1(el1);
    }
    load_vgic(vgic.regs, vgic.nr, vgic.full, vgic.hw);
    // SAFETY: `vttbr` names a stage-2 table the page-table engine built, of the shape VTCR_EL2
    // describes, so the walker reads it as the engine wrote it; HCR_EL2 has VM = 1 and RW = 1
    // with the traps above, and SPSR_EL2 names EL1 or EL0, so the guest runs below EL2 with
    // every access translated by that table. The world
    // switch preserves every callee-saved register, returns on the caller's stack with the same
    // stack selection, and writes only `ctx` (exclusively borrowed) and the stack below SP_EL2.
    unsafe {
        asm!(
            "msr hcr_el2, {hcr}",
            "msr vttbr_el2, {vttbr}",
            "isb",
            hcr = in(reg) hcr,
            vttbr = in(reg) vttbr,
            options(nostack, preserves_flags),
        );
        hv_el1_enter(ctx);
        // Back at EL2: no stage 2 while the host runs (it does not use the EL1&0 regime).
        asm!(
            "msr vttbr_el2, xzr",
            "isb",
            options(nostack, preserves_flags)
        );
    }
    // The EL1 registers stay in the CPU: the hypervisor at non-VHE EL2 writes none of them
    // but the virtual timer, so the backend saves them ([`save_el1`]) only when it needs the
    // image, instead of 27 system-register reads on every exit.
    save_vgic(vgic.regs, vgic.nr, vgic.hw);
    // The guest's timer stays loaded: if it is why the guest exited, its PPI must still be
    // pending when the backend acknowledges it. The backend unloads it (`set_vtimer(0, ..)`)
    // when the vCPU leaves the CPU.
    true
}

/// A vCPU's GICv3 virtual CPU interface (IHI 0069 §12.4): the list registers, the virtual
/// machine control register (the guest's PMR, BPR, group enables: what it wrote to its ICC_*
/// registers, which reach ICV_* with HCR_EL2.IMO/FMO set), the active-priority registers, and
/// the ICH_HCR_EL2 to run with (En, UIE).
///
/// `live` and `dirty` keep the common exit cheap (every ICH_* access is a system-register
/// access, slow on hardware): an invalid list register never becomes valid by itself (only a
/// write does, §12.4.6: the guest's acknowledge and deactivate only move a valid entry towards
/// invalid), so only the registers loaded valid (`live`) need reading back, and only those the
/// backend changed since (`dirty`) need writing while the hardware still holds the rest.
#[derive(Clone, Copy, Debug, Default)]
pub struct VgicRegs {
    pub lrs: [u64; 16],
    pub vmcr: u64,
    pub ap0r0: u64,
    pub ap1r0: u64,
    pub hcr: u64,
    /// List registers (bit n: ICH_LR<n>_EL2) whose image in `lrs` is not invalid.
    pub live: u16,
    /// List registers whose image in `lrs` differs from what the hardware was last given.
    pub dirty: u16,
}

impl VgicRegs {
    /// Records that the backend rewrote the images of `lrs[..nr]` (a refill): each may differ
    /// from the hardware now, and `live` follows the new states.
    pub fn rewritten(&mut self, nr: usize) {
        let mut live = 0u16;
        for (n, &l) in self.lrs.iter().enumerate().take(nr.min(16)) {
            if l & LR_STATE_MASK != 0 {
                live |= 1 << n;
            }
        }
        self.live = live;
        self.dirty = all_lrs(nr);
    }
}

/// What [`run`] switches of the virtual CPU interface: the vCPU's state, this CPU's, the
/// number of list registers and whether the CPU holds another vCPU's state (`full`: then the
/// EL1 registers and the whole interface are loaded).
pub struct VgicRun<'a> {
    pub regs: &'a mut VgicRegs,
    pub hw: &'a mut VgicHw,
    pub nr: usize,
    pub full: bool,
}

/// ICH_LR<n>_EL2.State (bits 63:62, IHI 0069 §12.4.6).
const LR_STATE_MASK: u64 = 0b11 << 62;
/// ICH_HCR_EL2.UIE (bit 1, IHI 0069 §12.4.3).
const HCR_UIE: u64 = 1 << 1;

fn all_lrs(nr: usize) -> u16 {
    ((1u32 << nr.min(16)) - 1) as u16
}

/// What this CPU's virtual CPU interface holds between runs, so that an entry of the vCPU
/// that ran last writes only what changed.
#[derive(Clone, Copy, Debug, Default)]
pub struct VgicHw {
    /// ICH_HCR_EL2 as last written.
    pub hcr: u64,
}

/// ICH_VTR_EL2 (the number of list registers, priority bits). Needs ICC_SRE_EL2.SRE, which
/// `arch::preempt` sets on every CPU that runs guests.
pub fn ich_vtr() -> u64 {
    let v: u64;
    // SAFETY: ICH_VTR_EL2 is read-only.
    unsafe { asm!("mrs {}, ich_vtr_el2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

macro_rules! lr_access {
    ($($n:literal),*) => {
        fn write_lr(n: usize, v: u64) {
            match n {
                $(
                    // SAFETY: list register `n` exists (n < ICH_VTR_EL2.ListRegs + 1, checked by
                    // the caller); it only affects the virtual CPU interface of the guest.
                    $n => unsafe {
                        asm!(concat!("msr ich_lr", $n, "_el2, {}"), in(reg) v, options(nomem, nostack, preserves_flags))
                    },
                )*
                _ => {}
            }
        }

        fn read_lr(n: usize) -> u64 {
            let v: u64;
            match n {
                $(
                    // SAFETY: as in `write_lr`; reading has no side effects.
                    $n => unsafe {
                        asm!(concat!("mrs {}, ich_lr", $n, "_el2"), out(reg) v, options(nomem, nostack, preserves_flags))
                    },
                )*
                _ => v = 0,
            }
            v
        }
    };
}

lr_access!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

/// Loads the vCPU's virtual CPU interface (`nr` list registers) before it runs. `full`: the
/// interface holds another vCPU's state (or none yet): every list register, ICH_VMCR_EL2 and
/// the active priorities are written. Otherwise the hardware still holds this vCPU's state as
/// [`save_vgic`] left it, and only the list registers the backend changed since are written.
/// No ISB here: `run` synchronizes its own EL2 writes before the ERET, which is itself a
/// context synchronization event.
pub fn load_vgic(r: &mut VgicRegs, nr: usize, full: bool, hw: &mut VgicHw) {
    let mut write = if full {
        all_lrs(nr)
    } else {
        r.dirty & all_lrs(nr)
    };
    r.dirty = 0;
    while write != 0 {
        let n = write.trailing_zeros() as usize;
        write &= write - 1;
        write_lr(n, r.lrs[n]);
    }
    if full {
        // SAFETY: the ICH_* registers configure the virtual CPU interface, which only a guest
        // at EL1 with HCR_EL2.IMO/FMO sees; the hypervisor's own ICC_* accesses at EL2 are
        // unaffected.
        unsafe {
            asm!(
                "msr ich_vmcr_el2, {vmcr}",
                "msr ich_ap0r0_el2, {ap0}",
                "msr ich_ap1r0_el2, {ap1}",
                vmcr = in(reg) r.vmcr,
                ap0 = in(reg) r.ap0r0,
                ap1 = in(reg) r.ap1r0,
                options(nomem, nostack, preserves_flags),
            );
        }
    }
    if full || r.hcr != hw.hcr {
        // SAFETY: as above.
        unsafe {
            asm!("msr ich_hcr_el2, {}", in(reg) r.hcr, options(nomem, nostack, preserves_flags));
        }
        hw.hcr = r.hcr;
    }
}

/// Saves the vCPU's virtual CPU interface after it exits: the list registers it was given
/// valid (the others are still invalid), ICH_VMCR_EL2 (the guest writes it through ICV_PMR,
/// ICV_BPR, ICV_IGRPEN), and the active priorities only if a list register was valid (a bit
/// is set only by acknowledging one, §6.2; with none the guest cannot have changed them).
/// ICH_HCR_EL2.UIE is cleared so no maintenance interrupt reaches the host while it runs; En
/// stays set (it only enables virtual interrupts towards EL1, which nothing runs at now).
pub fn save_vgic(r: &mut VgicRegs, nr: usize, hw: &mut VgicHw) {
    let loaded = r.live & all_lrs(nr);
    let mut read = loaded;
    let mut live = 0u16;
    while read != 0 {
        let n = read.trailing_zeros() as usize;
        read &= read - 1;
        let l = read_lr(n);
        r.lrs[n] = l;
        if l & LR_STATE_MASK != 0 {
            live |= 1 << n;
        }
    }
    r.live = live;
    // SAFETY: as in `load_vgic`; reading has no side effects.
    unsafe {
        asm!("mrs {}, ich_vmcr_el2", out(reg) r.vmcr, options(nomem, nostack, preserves_flags));
    }
    if loaded != 0 || r.ap0r0 | r.ap1r0 != 0 {
        // SAFETY: as above.
        unsafe {
            asm!(
                "mrs {ap0}, ich_ap0r0_el2",
                "mrs {ap1}, ich_ap1r0_el2",
                ap0 = out(reg) r.ap0r0,
                ap1 = out(reg) r.ap1r0,
                options(nomem, nostack, preserves_flags),
            );
        }
    }
    if hw.hcr & HCR_UIE != 0 {
        let hcr = hw.hcr & !HCR_UIE;
        // SAFETY: clearing UIE only stops the underflow maintenance interrupt (§12.4.3).
        unsafe {
            asm!(
                "msr ich_hcr_el2, {}",
                "isb",
                in(reg) hcr,
                options(nomem, nostack, preserves_flags)
            );
        }
        hw.hcr = hcr;
    }
}

/// Programs the EL1 virtual timer in the hardware (CNTV_CVAL_EL0, then CNTV_CTL_EL0): the
/// guest's own values while it runs or waits in WFI, `ctl = 0` when it is not loaded, so a
/// descheduled guest's timer never asserts PPI 27 under another vCPU.
pub fn set_vtimer(ctl: u64, cval: u64) {
    // SAFETY: the virtual timer is the guest's; the hypervisor does not use it at EL2.
    unsafe {
        asm!(
            "msr cntv_cval_el0, {cval}",
            "msr cntv_ctl_el0, {ctl}",
            "isb",
            cval = in(reg) cval,
            ctl = in(reg) ctl,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// The virtual count (CNTVCT_EL0; CNTVOFF_EL2 = 0, so the physical count).
pub fn virtual_count() -> u64 {
    let t: u64;
    // SAFETY: reading the counter has no side effects; the ISB orders it after prior code.
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) t, options(nomem, nostack, preserves_flags))
    };
    t
}

/// Waits for an interrupt at EL2 with PSTATE.I set: WFI completes when one is pending at this
/// CPU interface, masked or not (DDI 0487, "Wait for Interrupt"); the caller acknowledges it.
pub fn wait_for_interrupt() {
    // SAFETY: WFI only suspends execution; no state changes.
    unsafe { asm!("dsb sy", "wfi", options(nomem, nostack, preserves_flags)) };
}

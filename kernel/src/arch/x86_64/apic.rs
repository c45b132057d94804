//! The local APIC (Intel SDM vol 3 chapter 11, AMD APM vol 2 §16): just enough to preempt
//! guests. The one-shot LVT timer fires [`TIMER_VECTOR`]; while a guest runs, that interrupt
//! becomes an SVM INTR intercept, and the hypervisor takes it (and sends EOI) right after the
//! exit, see `vcpu/svm/asm.rs`.
//!
//! Two register interfaces, chosen once from CPUID 1 ECX bit 21: x2APIC (MSRs 0x800-0x8ff, SDM
//! §11.12) when the CPU has it (QEMU), else xAPIC (the 4 KiB MMIO page at the base in
//! IA32_APIC_BASE, SDM §11.4.1), which Bochs's `ryzen` model needs. The xAPIC page is claimed
//! through the direct map's MMIO ledger like any device's registers.
//!
//! Everything else that could interrupt is masked: the legacy 8259 PICs (whose firmware-default
//! vectors 8-15 would look like exceptions) and LVT LINT0 (ExtINT), so an INTR exit always means
//! the time slice ended.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use iommu::hw::Mmio;
use spin::Once;

use crate::mem::phys::MmioRegion;

/// The timer's interrupt vector and the APIC's spurious vector.
pub const TIMER_VECTOR: u8 = 0xec;
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bits 12 up to MAXPHYADDR: the xAPIC page (SDM §11.4.4, Figure 11-5).
const APIC_BASE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// One page of xAPIC registers (SDM §11.4.1).
const XAPIC_SIZE: u64 = 0x1000;

/// The registers used, by their xAPIC MMIO offset (SDM Table 11-1); the x2APIC MSR of each is
/// 0x800 + offset / 16 (SDM Table 11-6, §11.12.1.2).
mod reg {
    pub const TPR: u32 = 0x80;
    pub const EOI: u32 = 0xb0;
    pub const SVR: u32 = 0xf0;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const TIMER_INIT: u32 = 0x380;
    pub const TIMER_DIV: u32 = 0x3e0;
}
const fn x2apic_msr(offset: u32) -> u32 {
    0x800 + offset / 16
}
const LVT_MASKED: u32 = 1 << 16;

/// The interface chosen by [`init_timer`].
#[derive(Clone, Copy)]
enum Interface {
    X2apic,
    Xapic(MmioRegion),
}

static INTERFACE: Once<Interface> = Once::new();

/// Direct-map address of the xAPIC EOI register, or 0 in x2APIC mode: the timer ISR reads it to
/// pick its EOI write. Set (Release) before the timer is first armed and never changed after,
/// and the ISR's Acquire load pairs with it; interrupts are closed until then anyway.
static XAPIC_EOI: AtomicUsize = AtomicUsize::new(0);

/// Timer interrupts taken (diagnostics).
static TICKS: AtomicU64 = AtomicU64::new(0);

// The ISR's EOI: a 32-bit store of 0 to the xAPIC EOI register when `XAPIC_EOI` holds its
// address (a plain x86 load is an acquire load, TSO), else WRMSR to the x2APIC EOI MSR.
global_asm!(
    r#"
    .pushsection .text.x86_64_apic, "ax"
    .balign 16
    .global x86_64_apic_timer_isr
x86_64_apic_timer_isr:
    push rax
    push rcx
    push rdx
    mov rax, qword ptr [rip + {xapic_eoi}]
    test rax, rax
    jz 2f
    mov dword ptr [rax], 0
    jmp 3f
2:
    mov ecx, {eoi}
    xor eax, eax
    xor edx, edx
    wrmsr
3:
    lock inc qword ptr [rip + {ticks}]
    pop rdx
    pop rcx
    pop rax
    iretq
    .balign 16
    .global x86_64_apic_spurious_isr
x86_64_apic_spurious_isr:
    iretq
    .popsection
"#,
    eoi = const x2apic_msr(reg::EOI),
    xapic_eoi = sym XAPIC_EOI,
    ticks = sym TICKS,
);

unsafe extern "C" {
    fn x86_64_apic_timer_isr();
    fn x86_64_apic_spurious_isr();
}

/// IDT gates this module needs: `(vector, handler address)`.
pub fn interrupt_gates() -> [(u8, u64); 2] {
    [
        (TIMER_VECTOR, x86_64_apic_timer_isr as *const () as u64),
        (
            SPURIOUS_VECTOR,
            x86_64_apic_spurious_isr as *const () as u64,
        ),
    ]
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called for IA32_APIC_BASE, which exists on every x86_64 CPU; no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes an x2APIC register (or IA32_APIC_BASE). Private: callers below pass fixed registers.
fn wrmsr(msr: u32, v: u64) {
    // SAFETY: `msr` is IA32_APIC_BASE or an x2APIC register of this CPU's own local APIC, written
    // after x2APIC mode is on; none of them affects memory. The values only route the timer to
    // a vector with an IDT gate, or mask interrupt sources.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags));
    }
}

impl Interface {
    /// Writes the register at xAPIC offset `offset` through this interface.
    fn write(&self, offset: u32, v: u32) {
        match self {
            Interface::X2apic => wrmsr(x2apic_msr(offset), v.into()),
            Interface::Xapic(regs) => regs.write32(offset as usize, v),
        }
    }
}

/// Picks the register interface: x2APIC when CPUID has it (switching the APIC into it), else
/// the enabled xAPIC's MMIO page.
fn bring_up() -> Result<Interface, &'static str> {
    let base = rdmsr(IA32_APIC_BASE);
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 21) != 0 {
        // xAPIC -> x2APIC must go through enabled xAPIC mode (SDM §11.12.5): EN first, then EXTD.
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN);
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
        log::info!("apic: local APIC timer in x2APIC mode (MSR interface)");
        return Ok(Interface::X2apic);
    }
    if base & APIC_BASE_EXTD != 0 {
        // x2APIC on without CPUID saying so: nothing this module knows how to drive.
        return Err("local APIC in x2APIC mode but CPUID 1 ECX.x2APIC = 0");
    }
    // Enabling is idempotent; the base stays where firmware put it (0xFEE00000 by default).
    wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN);
    let pa = base & APIC_BASE_ADDR;
    let regs = MmioRegion::new(pa, XAPIC_SIZE)
        .map_err(|_| "xAPIC page outside the direct map or overlapping RAM")?;
    let eoi = crate::arch::phys_to_virt(pa + u64::from(reg::EOI))
        .ok_or("xAPIC EOI register outside the direct map")?;
    XAPIC_EOI.store(eoi, Ordering::Release);
    log::info!("apic: local APIC timer in xAPIC mode (MMIO at {pa:#x}; no x2APIC in CPUID)");
    Ok(Interface::Xapic(regs))
}

/// Brings up the boot CPU's local APIC (see [`bring_up`]), masks the legacy interrupt sources
/// and programs the timer (one-shot, divide by 1, [`TIMER_VECTOR`], not yet armed). Interrupts
/// stay disabled (RFLAGS.IF = 0) in the hypervisor; they are only open around VMRUN.
/// Idempotent.
pub fn init_timer() -> Result<(), &'static str> {
    if INTERFACE.is_completed() {
        return Ok(());
    }
    // SAFETY: OCW1 writes (mask all IRQ lines) to the two 8259 PICs at their fixed ports 0x21 and
    // 0xA1; a PIC that is absent ignores them. Masking only removes interrupt sources.
    unsafe {
        asm!("out 0x21, al", "out 0xa1, al", in("al") 0xffu8, options(nomem, nostack, preserves_flags));
    }
    let apic = *INTERFACE.try_call_once(bring_up)?;
    apic.write(reg::TPR, 0);
    apic.write(reg::LVT_LINT0, LVT_MASKED);
    apic.write(reg::SVR, 1 << 8 | u32::from(SPURIOUS_VECTOR));
    apic.write(reg::TIMER_DIV, 0b1011); // divide by 1
    apic.write(reg::LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
    Ok(())
}

/// Starts a one-shot countdown of `ticks` APIC timer ticks (divide by 1: the APIC bus clock;
/// 1 GHz under QEMU). Rewriting restarts the countdown; 0 stops it. Does nothing before
/// [`init_timer`] succeeded.
pub fn arm_timer(ticks: u32) {
    if let Some(apic) = INTERFACE.get() {
        apic.write(reg::TIMER_INIT, ticks);
    }
}

/// Timer interrupts taken since boot.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

//! The local APIC in x2APIC mode (Intel SDM vol 3 §11.12, AMD APM vol 2 §16.11): just enough to
//! preempt guests. The one-shot LVT timer fires [`TIMER_VECTOR`]; while a guest runs, that
//! interrupt becomes an SVM INTR intercept, and the hypervisor takes it (and sends EOI) right
//! after the exit, see `vcpu/svm/asm.rs`.
//!
//! Everything else that could interrupt is masked: the legacy 8259 PICs (whose firmware-default
//! vectors 8-15 would look like exceptions) and LVT LINT0 (ExtINT), so an INTR exit always means
//! the time slice ended.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// The timer's interrupt vector and the APIC's spurious vector.
pub const TIMER_VECTOR: u8 = 0xec;
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;
// x2APIC MSRs (SDM Table 11-6).
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_LVT_LINT0: u32 = 0x835;
const X2APIC_TIMER_INIT: u32 = 0x838;
const X2APIC_TIMER_DIV: u32 = 0x83e;
const LVT_MASKED: u64 = 1 << 16;

/// Timer interrupts taken (diagnostics).
static TICKS: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .pushsection .text.x86_64_apic, "ax"
    .balign 16
    .global x86_64_apic_timer_isr
x86_64_apic_timer_isr:
    push rax
    push rcx
    push rdx
    mov ecx, {eoi}
    xor eax, eax
    xor edx, edx
    wrmsr
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
    eoi = const X2APIC_EOI,
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

/// Switches the boot CPU's local APIC to x2APIC mode, masks the legacy interrupt sources and
/// programs the timer (one-shot, divide by 1, [`TIMER_VECTOR`], not yet armed). Interrupts stay
/// disabled (RFLAGS.IF = 0) in the hypervisor; they are only open around VMRUN.
pub fn init_timer() -> Result<(), &'static str> {
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 21) == 0 {
        return Err("no x2APIC (CPUID 1 ECX bit 21)");
    }
    // SAFETY: OCW1 writes (mask all IRQ lines) to the two 8259 PICs at their fixed ports 0x21 and
    // 0xA1; a PIC that is absent ignores them. Masking only removes interrupt sources.
    unsafe {
        asm!("out 0x21, al", "out 0xa1, al", in("al") 0xffu8, options(nomem, nostack, preserves_flags));
    }
    let base = rdmsr(IA32_APIC_BASE);
    // xAPIC -> x2APIC must go through enabled xAPIC mode (SDM §11.12.5): EN first, then EXTD.
    wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN);
    wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
    wrmsr(X2APIC_TPR, 0);
    wrmsr(X2APIC_LVT_LINT0, LVT_MASKED);
    wrmsr(X2APIC_SVR, 1 << 8 | u64::from(SPURIOUS_VECTOR));
    wrmsr(X2APIC_TIMER_DIV, 0b1011); // divide by 1
    wrmsr(X2APIC_LVT_TIMER, u64::from(TIMER_VECTOR)); // one-shot, unmasked
    Ok(())
}

/// Starts a one-shot countdown of `ticks` APIC timer ticks (divide by 1: the APIC bus clock;
/// 1 GHz under QEMU). Rewriting restarts the countdown; 0 stops it.
pub fn arm_timer(ticks: u32) {
    wrmsr(X2APIC_TIMER_INIT, u64::from(ticks));
}

/// Timer interrupts taken since boot.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

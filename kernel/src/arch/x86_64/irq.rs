//! Device interrupts on x86_64: IDT stubs for the vectors in [`drivers::vectors::FIRST`]..=
//! [`drivers::vectors::LAST`] (except the APIC timer's), the IOAPICs masked at boot, the TSC as
//! the interrupt path's clock, and the interrupt window normal code opens to take what is
//! pending.
//!
//! The hypervisor runs with RFLAGS.IF = 0. Interrupts are taken at two places only:
//! - while a guest runs: SVM intercepts INTR, so a device interrupt ends the guest's slice with
//!   a #VMEXIT; `svm_vmrun` (vcpu/svm/asm.rs) then executes `stgi` with IF = 1, the pending
//!   interrupt is delivered through this IDT, and `cli` closes again;
//! - in [`window`], which normal code calls where it wants pending interrupts handled (the
//!   fault drain, the interrupt scenarios).
//!
//! Each stub pushes its vector and jumps to a common path that saves the caller-saved
//! registers (the Rust handler preserves the others), calls [`x86_64_device_irq`] on a
//! 16-byte-aligned stack, restores them and returns with `iretq`. The handler dispatches through
//! `crate::irq` and then sends EOI to the local APIC (the spurious vector alone needs none).

use core::arch::{asm, global_asm};

use drivers::vectors::{FIRST, LAST};

// Every stub is 16 bytes (`push imm32` is 5 bytes, `jmp rel32` 5, the rest padding), so
// stub k, for vector FIRST + k, starts at `x86_64_devirq_stubs + 16 * k`.
global_asm!(
    r#"
    .pushsection .text.x86_64_device_irq, "ax"
    .balign 16
    .global x86_64_devirq_stubs
x86_64_devirq_stubs:
    .set devirq_vec, {first}
    .rept {count}
    .balign 16
    push $devirq_vec
    jmp x86_64_devirq_common
    .set devirq_vec, devirq_vec + 1
    .endr

    .balign 16
x86_64_devirq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov 72(%rsp), %rdi
    // CPU frame (40) + vector (8) + 9 registers (72) from a 16-byte aligned RSP: 8 more.
    sub $8, %rsp
    cld
    call x86_64_device_irq
    add $8, %rsp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq
    .popsection
"#,
    first = const FIRST,
    count = const (LAST - FIRST) as usize + 1,
    options(att_syntax)
);

unsafe extern "C" {
    /// The first stub; only its address is used.
    fn x86_64_devirq_stubs();
}

/// Size of one stub.
const STUB_SIZE: u64 = 16;

/// IDT gates for the device range: `(vector, stub address)`. The APIC timer's vector is left
/// out (its own stub counts ticks).
pub fn gates() -> impl Iterator<Item = (u8, u64)> {
    let base = x86_64_devirq_stubs as *const () as u64;
    (FIRST..=LAST)
        .map(move |v| (v, base + STUB_SIZE * u64::from(v - FIRST)))
        .filter(|&(v, _)| v != super::apic::TIMER_VECTOR)
}

/// Called by the stubs with interrupts disabled.
#[unsafe(no_mangle)]
extern "C" fn x86_64_device_irq(vector: u64) {
    crate::irq::dispatch(vector as u8);
    super::apic::eoi();
}

/// The time-stamp counter: the interrupt path's clock (rate limiting). Monotonic per CPU.
pub fn now() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads a counter into EDX:EAX; it touches no memory. CR4.TSD is clear
    // (never set by the hypervisor), so it does not fault at CPL 0.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Opens a short interrupt window: every interrupt pending at this CPU's local APIC is taken
/// (through the IDT, one after another) before interrupts close again. STI delays recognition
/// by one instruction (SDM vol 2 "STI"), hence the two NOPs.
pub fn window() {
    // SAFETY: only RFLAGS.IF changes, and it is cleared again before returning; every vector
    // that can be pending has an IDT gate (exceptions, the device range, timer, spurious).
    unsafe {
        asm!("sti", "nop", "nop", "cli", options(nomem, nostack));
    }
}

/// Sleeps until the next interrupt reaches this CPU (a device's, or the preemption timer's,
/// which is always armed while guests run), takes it through the IDT and closes interrupts
/// again: a halted vCPU's wait. STI's one-instruction shadow makes `sti; hlt` atomic, so an
/// interrupt that becomes pending between the caller's last check and the HLT still wakes it.
pub fn wait_for_interrupt() {
    // SAFETY: as for `window`: only RFLAGS.IF changes and is cleared again; HLT at CPL 0
    // returns at the next interrupt, which every vector's gate handles.
    unsafe {
        asm!("sti", "hlt", "cli", options(nomem, nostack));
    }
}

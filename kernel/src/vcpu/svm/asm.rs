//! The `unsafe` edge of the SVM backend: the model-specific registers that switch SVM on, and the
//! world switch around `VMRUN` (AMD APM vol 2 §15.5, §15.17). Nothing else in `vcpu/svm` uses
//! `unsafe`.
//!
//! `VMRUN` saves and restores only part of the host state (§15.5.1: segment registers except
//! FS/GS/TR/LDTR, GDTR/IDTR, CR0/3/4, EFER, RFLAGS, RIP, RSP, RAX); the hidden state of FS, GS,
//! TR, LDTR, KernelGsBase and the SYSCALL/SYSENTER MSRs is moved with `VMSAVE`/`VMLOAD`
//! (§15.5.2) through a host save block, and the other general-purpose registers are saved here in
//! software. GIF is clear from `CLGI` until the `STGI` after the exit, so no interrupt or NMI can
//! land between the two halves of the switch (§15.17).

use core::arch::{asm, global_asm};

/// IA32_EFER and its SVME bit (APM vol 2 §3.1.7, §15.4).
const MSR_EFER: u32 = 0xc000_0080;
const EFER_SVME: u64 = 1 << 12;
/// VM_CR: SVMDIS (bit 4) set means firmware disabled SVM (§15.30.1).
const MSR_VM_CR: u32 = 0xc001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
/// VM_HSAVE_PA: where `VMRUN` stores the host state (§15.30.4).
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers pass only the architectural SVM MSRs above, which exist on every CPU
    // that reports SVM (checked before `enable` is called); reading them has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Proof that this CPU has EFER.SVME set and a host save area installed: the only way to reach
/// [`vmrun`].
pub struct SvmEnabled {
    /// Host state `VMSAVE`d before and `VMLOAD`ed after each run (a VMCB-format page).
    host_block: super::vmcb::Vmcb,
    _host_save: super::vmcb::HostSaveArea,
}

/// Turns SVM on for the calling CPU. Fails (changing nothing) if firmware locked SVM off.
/// The caller checked CPUID 8000_0001h ECX.SVM.
pub fn enable(
    host_save: super::vmcb::HostSaveArea,
    host_block: super::vmcb::Vmcb,
) -> Result<SvmEnabled, &'static str> {
    if rdmsr(MSR_VM_CR) & VM_CR_SVMDIS != 0 {
        return Err("SVM disabled by firmware (VM_CR.SVMDIS)");
    }
    let efer = rdmsr(MSR_EFER) | EFER_SVME;
    let hsave = host_save.pa();
    // SAFETY: setting EFER.SVME only enables the SVM instructions (APM §15.4); the other EFER
    // bits are written back unchanged. VM_HSAVE_PA gets a 4 KiB-aligned frame that
    // `HostSaveArea` owns for the rest of the hypervisor's life (it is kept in `SvmEnabled`,
    // which is never dropped while a guest can run), so the processor's host-state writes at
    // VMRUN land in memory nothing else uses.
    unsafe {
        asm!("wrmsr", in("ecx") MSR_EFER, in("eax") efer as u32, in("edx") (efer >> 32) as u32, options(nostack, preserves_flags));
        asm!("wrmsr", in("ecx") MSR_VM_HSAVE_PA, in("eax") hsave as u32, in("edx") (hsave >> 32) as u32, options(nostack, preserves_flags));
    }
    Ok(SvmEnabled {
        host_block,
        _host_save: host_save,
    })
}

/// The guest general-purpose registers `VMRUN` does not switch (RAX and RSP live in the VMCB).
/// Field order is the offsets `svm_vmrun` uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestGprs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

// svm_vmrun(guest_vmcb_pa: rdi, gprs: rsi, host_block_pa: rdx)
//
// Host IF is set (`sti`) while GIF is still clear, so VMRUN saves RFLAGS.IF = 1 as the host's
// interrupt flag: with V_INTR_MASKING = 1 that host IF is what lets a physical interrupt reach
// the INTR intercept while the guest runs (§15.21.1). After the exit GIF is clear again; the
// host state is completed with VMLOAD, then `cli` before `stgi` returns to the hypervisor's
// normal interrupts-off state without taking any interrupt. An interrupt that arrived after
// an exit for another reason (a VMMCALL, say) stays pending in the local APIC and makes the
// next VMRUN exit with INTR at once, so a preemption tick is never lost; only after an INTR
// exit does the runner take it ([`take_interrupt`]).
global_asm!(
    r#"
    .pushsection .text.svm_vmrun, "ax"
    .global svm_vmrun
    .balign 16
svm_vmrun:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdx
    push rsi
    push rdi
    clgi
    sti
    mov rax, rdx
    vmsave rax
    mov rax, rdi
    vmload rax
    mov rbx, [rsi + 0]
    mov rcx, [rsi + 8]
    mov rdx, [rsi + 16]
    mov rdi, [rsi + 32]
    mov rbp, [rsi + 40]
    mov r8, [rsi + 48]
    mov r9, [rsi + 56]
    mov r10, [rsi + 64]
    mov r11, [rsi + 72]
    mov r12, [rsi + 80]
    mov r13, [rsi + 88]
    mov r14, [rsi + 96]
    mov r15, [rsi + 104]
    mov rsi, [rsi + 24]
    vmrun rax
    vmsave rax
    mov rax, [rsp + 8]
    mov [rax + 0], rbx
    mov [rax + 8], rcx
    mov [rax + 16], rdx
    mov [rax + 24], rsi
    mov [rax + 32], rdi
    mov [rax + 40], rbp
    mov [rax + 48], r8
    mov [rax + 56], r9
    mov [rax + 64], r10
    mov [rax + 72], r11
    mov [rax + 80], r12
    mov [rax + 88], r13
    mov [rax + 96], r14
    mov [rax + 104], r15
    mov rax, [rsp + 16]
    vmload rax
    cli
    stgi
    add rsp, 24
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    .popsection
"#
);

unsafe extern "C" {
    fn svm_vmrun(guest_vmcb: u64, gprs: *mut GuestGprs, host_block: u64);
}

/// Takes the pending physical interrupt that caused an INTR exit through the hypervisor's IDT
/// (its handler only sends EOI): without that it would stay pending and end every later VMRUN
/// at once.
pub fn take_interrupt(_cpu: &SvmEnabled) {
    // SAFETY: GIF is set (`svm_vmrun` ends with `stgi`); IF is open for the one instruction after
    // `sti`'s shadow, during which the hypervisor's IDT handles the interrupt (the timer and
    // spurious handlers send EOI and return); `cli` restores the interrupts-off state. No
    // memory or register of this code is touched.
    unsafe {
        asm!("sti", "nop", "cli", options(nomem, nostack));
    }
}

/// Runs the guest described by `vmcb` until the next `#VMEXIT`. The exit code and the guest
/// state are in `vmcb` afterwards, the other registers in `gprs`.
pub fn vmrun(cpu: &SvmEnabled, vmcb: &mut super::vmcb::Vmcb, gprs: &mut GuestGprs) {
    // SAFETY: `cpu` proves EFER.SVME and VM_HSAVE_PA are set on this CPU. `vmcb` is an owned,
    // 4 KiB-aligned VMCB whose only writers are the safe setters in `vmcb.rs`: its IOPM/MSRPM
    // point at the backend's all-intercepting bitmaps, its nested CR3 at a table that maps only
    // the guest's own frames and the BARs of the devices assigned to it, its ASID is non-zero and the VMRUN intercept is set, so the guest
    // can reach no host memory and the processor rejects (VMEXIT_INVALID) rather than runs a
    // malformed state. The host block is another owned VMCB page. `svm_vmrun` preserves every
    // callee-saved register, restores RSP, returns with IF clear and GIF set, and writes only
    // `gprs` and the two VMCB pages; `&mut` on both guarantees no Rust alias observes the
    // processor's writes.
    unsafe {
        svm_vmrun(vmcb.pa(), gprs, cpu.host_block.pa());
    }
}

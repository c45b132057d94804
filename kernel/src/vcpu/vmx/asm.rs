//! The `unsafe` edge of the VMX backend (Intel SDM vol 3C chapters 24-31): the model-specific and
//! control registers that let VMXON succeed, VMXON itself, the VMCS instructions (VMCLEAR,
//! VMPTRLD, VMREAD, VMWRITE), INVEPT/INVVPID, and the world switch around VMLAUNCH/VMRESUME.
//! Nothing else in `vcpu/vmx` uses `unsafe`.
//!
//! VM entry and exit switch the control registers, RSP, RIP, RFLAGS, the segment registers and
//! the MSRs the VM-exit controls name (EFER, PAT), all from VMCS fields (SDM §28.5); the other
//! general-purpose registers are saved and restored here in software. A VM exit sets RFLAGS to
//! 0x2 (interrupts off) and the GDTR/IDTR limits to 0xFFFF (§28.5.2): [`vm_run`] puts the host's
//! real limits back before it returns.

use core::arch::{asm, global_asm};

use super::vmcs::field;

pub const MSR_FEATURE_CONTROL: u32 = 0x3a;
pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_ESP: u32 = 0x175;
pub const MSR_SYSENTER_EIP: u32 = 0x176;
pub const MSR_PAT: u32 = 0x277;
pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_FS_BASE: u32 = 0xc000_0100;
pub const MSR_GS_BASE: u32 = 0xc000_0101;

/// The MSRs this module reads: IA32_FEATURE_CONTROL, the SYSENTER/PAT/EFER/FS/GS MSRs of the
/// host state, and the VMX capability MSRs 0x480-0x491 (SDM Appendix A).
fn readable(msr: u32) -> bool {
    matches!(
        msr,
        MSR_FEATURE_CONTROL
            | MSR_SYSENTER_CS
            | MSR_SYSENTER_ESP
            | MSR_SYSENTER_EIP
            | MSR_PAT
            | MSR_EFER
            | MSR_FS_BASE
            | MSR_GS_BASE
            | 0x480..=0x491
    )
}

/// Reads one of the MSRs above; `None` for any other.
pub fn rdmsr(msr: u32) -> Option<u64> {
    if !readable(msr) {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: `msr` is architectural on every CPU with VMX (CPUID 1 ECX.VMX, checked by the
    // caller before any capability MSR is read; the others exist on every x86_64 CPU); reading
    // has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    Some(u64::from(hi) << 32 | u64::from(lo))
}

/// Proof that the calling CPU is in VMX root operation with a VMXON region that stays owned for
/// the hypervisor's life: the only way to reach the VMCS instructions below.
pub struct VmxOn {
    _region: crate::guest::memory::Frames,
    gdtr: DescriptorTable,
    idtr: DescriptorTable,
}

/// A GDTR/IDTR image as SGDT/SIDT store it.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct DescriptorTable {
    limit: u16,
    base: u64,
}

impl VmxOn {
    pub fn gdt_base(&self) -> u64 {
        self.gdtr.base
    }
    pub fn idt_base(&self) -> u64 {
        self.idtr.base
    }
}

/// Enters VMX root operation (SDM §24.7): locks IA32_FEATURE_CONTROL with VMX outside SMX enabled
/// if firmware left it unlocked, applies the CR0/CR4 fixed bits (IA32_VMX_CR0/CR4_FIXED0/1,
/// Appendix A.7-A.8, CR4.VMXE among them), then VMXON with `region` (its first word holds the
/// VMCS revision identifier already). Fails changing nothing if firmware locked VMX off or the
/// current CR0 cannot satisfy the fixed bits; if VMXON itself fails, CR0/CR4 are put back (a
/// FEATURE_CONTROL lock this function set stays: the MSR cannot be unlocked before reset).
pub fn vmxon(region: crate::guest::memory::Frames) -> Result<VmxOn, &'static str> {
    const LOCK: u64 = 1 << 0;
    const VMX_OUTSIDE_SMX: u64 = 1 << 2;
    let fc = rdmsr(MSR_FEATURE_CONTROL).unwrap_or(0);
    if fc & LOCK != 0 && fc & VMX_OUTSIDE_SMX == 0 {
        return Err("VMX disabled by firmware (IA32_FEATURE_CONTROL locked without VMX)");
    }
    let fixed = |lo, hi| Some((rdmsr(lo)?, rdmsr(hi)?));
    let (Some((cr0_0, cr0_1)), Some((cr4_0, cr4_1))) = (fixed(0x486, 0x487), fixed(0x488, 0x489))
    else {
        return Err("VMX fixed-bit MSRs unreadable");
    };
    let (cr0, cr4): (u64, u64);
    // SAFETY: reading CR0/CR4 has no side effects.
    unsafe {
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
    }
    let (new_cr0, new_cr4) = ((cr0 | cr0_0) & cr0_1, (cr4 | cr4_0) & cr4_1);
    // The fixed-1 bits must be allowed by the fixed-0 mask of the same CPU, and the hypervisor's
    // own PE/PG must survive (they always do on a consistent CPU).
    if new_cr0 & cr0_0 != cr0_0 || new_cr4 & cr4_0 != cr4_0 || new_cr0 & 0x8000_0001 != 0x8000_0001
    {
        return Err("CR0/CR4 cannot satisfy the VMX fixed bits");
    }
    let pa = region.pa();
    let mut gdtr = DescriptorTable::default();
    let mut idtr = DescriptorTable::default();
    let failed: u8;
    // SAFETY: IA32_FEATURE_CONTROL is written only while unlocked (a locked one would #GP), with
    // the lock and VMX-outside-SMX bits added to what firmware set. The new CR0/CR4 differ from
    // the current ones only in bits the CPU demands for VMX operation (NE, VMXE on every CPU
    // seen): the hypervisor's paging, protection and caching bits are unchanged. VMXON takes the
    // physical address of a 4 KiB-aligned, zeroed frame with the revision identifier written,
    // owned by the returned `VmxOn` for the rest of the hypervisor's life, so the processor's use
    // of that region touches nothing else. SGDT/SIDT only store to the two local images.
    unsafe {
        if fc & LOCK == 0 {
            let v = fc | LOCK | VMX_OUTSIDE_SMX;
            asm!("wrmsr", in("ecx") MSR_FEATURE_CONTROL, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags));
        }
        asm!("mov cr0, {}", in(reg) new_cr0, options(nostack, preserves_flags));
        asm!("mov cr4, {}", in(reg) new_cr4, options(nostack, preserves_flags));
        asm!("sgdt [{}]", in(reg) &raw mut gdtr, options(nostack, preserves_flags));
        asm!("sidt [{}]", in(reg) &raw mut idtr, options(nostack, preserves_flags));
        asm!("vmxon [{}]", "setbe {}", in(reg) &pa, out(reg_byte) failed, options(nostack));
    }
    if failed != 0 {
        // SAFETY: puts back the CR0/CR4 this function found (the hypervisor ran with them until
        // a moment ago); the processor is not in VMX operation, so clearing VMXE is allowed.
        unsafe {
            asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags));
            asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
        }
        return Err("VMXON failed");
    }
    Ok(VmxOn {
        _region: region,
        gdtr,
        idtr,
    })
}

/// Host control registers and selectors for the VMCS host-state area (SDM §26.2.3).
pub struct HostRegs {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    pub tr: u16,
}

/// The current control registers and segment selectors.
pub fn host_regs() -> HostRegs {
    let (cr0, cr3, cr4): (u64, u64, u64);
    let (cs, ss, ds, es, fs, gs, tr): (u16, u16, u16, u16, u16, u16, u16);
    // SAFETY: moves from control and segment registers and STR have no side effects.
    unsafe {
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, ss", out(reg) ss, options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, ds", out(reg) ds, options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, es", out(reg) es, options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, fs", out(reg) fs, options(nomem, nostack, preserves_flags));
        asm!("mov {:x}, gs", out(reg) gs, options(nomem, nostack, preserves_flags));
        asm!("str {:x}", out(reg) tr, options(nomem, nostack, preserves_flags));
    }
    HostRegs {
        cr0,
        cr3,
        cr4,
        cs,
        ss,
        ds,
        es,
        fs,
        gs,
        tr,
    }
}

/// VMCLEAR: makes the VMCS at `pa` inactive and clear, its data written back (SDM §24.11.3). The
/// caller owns the VMCS frame (a [`super::vmcs::Vmcs`]).
pub fn vmclear(_cpu: &VmxOn, vmcs: &super::vmcs::Vmcs) -> bool {
    let pa = vmcs.pa();
    let failed: u8;
    // SAFETY: VMX root operation is proven by `_cpu`; `pa` is the 4 KiB-aligned frame `vmcs` owns
    // with the revision identifier written, so the processor's write-back lands only there.
    unsafe {
        asm!("vmclear [{}]", "setbe {}", in(reg) &pa, out(reg_byte) failed, options(nostack));
    }
    failed == 0
}

/// VMPTRLD: makes `vmcs` the current VMCS, the one VMREAD/VMWRITE/VMLAUNCH act on.
pub fn vmptrld(_cpu: &VmxOn, vmcs: &super::vmcs::Vmcs) -> bool {
    let pa = vmcs.pa();
    let failed: u8;
    // SAFETY: as for `vmclear`: an owned VMCS frame with the right revision identifier.
    unsafe {
        asm!("vmptrld [{}]", "setbe {}", in(reg) &pa, out(reg_byte) failed, options(nostack));
    }
    failed == 0
}

/// VMWRITE of a field of the current VMCS. Writes go to the processor's VMCS copy, never to
/// memory the Rust code sees; a bad field or read-only field just fails (VMfailValid).
pub fn vmwrite(_cpu: &VmxOn, field: u32, value: u64) -> bool {
    let failed: u8;
    // SAFETY: VMWRITE changes only the current VMCS (VMX root operation proven by `_cpu`); the
    // values that reach guest or host state are checked by VM entry itself, which fails instead
    // of running a malformed state (SDM §27.2-27.3).
    unsafe {
        asm!("vmwrite {}, {}", "setbe {}", in(reg) u64::from(field), in(reg) value, out(reg_byte) failed, options(nostack));
    }
    failed == 0
}

/// VMREAD of a field of the current VMCS (0 if the field does not exist).
pub fn vmread(_cpu: &VmxOn, field: u32) -> u64 {
    let value: u64;
    let failed: u8;
    // SAFETY: VMREAD has no side effect besides RFLAGS (VMX root operation proven by `_cpu`).
    unsafe {
        asm!("vmread {}, {}", "setbe {}", out(reg) value, in(reg) u64::from(field), out(reg_byte) failed, options(nostack));
    }
    if failed != 0 { 0 } else { value }
}

/// INVEPT / INVVPID type 2 (all contexts): forgets every EPT-derived and VPID-tagged
/// translation (SDM §31.3). Used when a VMCS first runs, so an EPT table or a VPID reused after
/// a guest was destroyed never sees the old guest's translations.
pub fn flush_all_contexts(_cpu: &VmxOn) {
    let desc = [0u64; 2];
    // SAFETY: both instructions only invalidate TLB and paging-structure cache entries; the
    // 16-byte descriptor is ignored for the all-context type except for its reserved bits (0).
    // The capability check (EPT_VPID_CAP INVEPT/INVVPID all-context) was done at probe.
    unsafe {
        asm!("invept {}, [{}]", in(reg) 2u64, in(reg) &desc, options(nostack));
        asm!("invvpid {}, [{}]", in(reg) 2u64, in(reg) &desc, options(nostack));
    }
}

/// The guest general-purpose registers VM entry and exit do not switch (RSP and RIP live in the
/// VMCS). Field order is the offsets `vmx_run` uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestGprs {
    pub rax: u64,
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

// vmx_run(gprs: rdi, launched: rsi) -> rax: 0 after a VM exit, 1 if VMLAUNCH/VMRESUME failed.
//
// HOST_RSP is written here (it is this frame's RSP); HOST_RIP is `vmx_exit`, set once per VMCS.
// At the exit the stack holds the saved callee-saved registers and the `gprs` pointer.
global_asm!(
    r#"
    .pushsection .text.vmx_run, "ax"
    .global vmx_run
    .global vmx_exit
    .balign 16
vmx_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, {host_rsp}
    vmwrite rax, rsp
    jbe 3f
    cmp rsi, 0
    mov rax, [rdi + 0]
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 56]
    mov r9, [rdi + 64]
    mov r10, [rdi + 72]
    mov r11, [rdi + 80]
    mov r12, [rdi + 88]
    mov r13, [rdi + 96]
    mov r14, [rdi + 104]
    mov r15, [rdi + 112]
    mov rdi, [rdi + 40]
    jne 1f
    vmlaunch
    jmp 3f
1:
    vmresume
3:
    pop rdi
    mov eax, 1
    jmp 4f
    .balign 16
vmx_exit:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0], rax
    mov [rdi + 8], rbx
    mov [rdi + 16], rcx
    mov [rdi + 24], rdx
    mov [rdi + 32], rsi
    mov [rdi + 48], rbp
    mov [rdi + 56], r8
    mov [rdi + 64], r9
    mov [rdi + 72], r10
    mov [rdi + 80], r11
    mov [rdi + 88], r12
    mov [rdi + 96], r13
    mov [rdi + 104], r14
    mov [rdi + 112], r15
    pop rax
    mov [rdi + 40], rax
    pop rdi
    xor eax, eax
4:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    .popsection
"#,
    host_rsp = const field::HOST_RSP,
);

unsafe extern "C" {
    fn vmx_run(gprs: *mut GuestGprs, launched: u64) -> u64;
    fn vmx_exit();
}

/// The host RIP of every VMCS: where a VM exit lands.
pub fn exit_entry() -> u64 {
    vmx_exit as *const () as u64
}

/// Enters the guest of the current VMCS (VMLAUNCH the first time, VMRESUME after) and returns
/// at its next VM exit: `true`, or `false` if the entry failed before the guest ran
/// (VMfailValid: the VM-instruction error field says why).
///
/// Interrupts: the hypervisor runs with RFLAGS.IF = 0. The pin-based external-interrupt
/// exiting control makes an interrupt that arrives while the guest runs a VM exit without
/// acknowledging it (SDM §25.2), so it is still pending in the local APIC afterwards;
/// [`take_pending_interrupt`] lets the hypervisor's IDT handler take it (and send EOI).
pub fn vm_run(
    cpu: &VmxOn,
    _vmcs: &super::vmcs::Vmcs,
    gprs: &mut GuestGprs,
    launched: bool,
) -> bool {
    // SAFETY: `cpu` proves VMX root operation; `_vmcs` is the current VMCS (the caller did
    // VMPTRLD on it) with host state taken from this CPU at creation (CR0/3/4, selectors, bases,
    // EFER/PAT loaded at exit, HOST_RIP = `vmx_exit`, HOST_RSP written by `vmx_run` itself), so a
    // VM exit resumes in `vmx_exit` on this very stack frame with the hypervisor's paging and
    // segments. Its EPT pointer names a table that maps only the guest's own frames, all I/O and
    // MSR accesses exit, so the guest reaches no host state. `vmx_run` preserves the callee-saved
    // registers, restores RSP and writes only `gprs`, which `&mut` keeps free of Rust aliases.
    // LGDT/LIDT reload the limits the exit clobbered with the host's own descriptor images.
    let rc = unsafe {
        let rc = vmx_run(gprs, u64::from(launched));
        asm!("lgdt [{}]", in(reg) &raw const cpu.gdtr, options(nostack, readonly, preserves_flags));
        asm!("lidt [{}]", in(reg) &raw const cpu.idtr, options(nostack, readonly, preserves_flags));
        rc
    };
    rc == 0
}

/// Opens interrupts for one instruction so an interrupt left pending by an external-interrupt
/// VM exit is delivered through the hypervisor's IDT (the APIC timer handler sends EOI).
pub fn take_pending_interrupt() {
    // SAFETY: the only unmasked interrupt sources are the APIC timer and spurious vectors, whose
    // IDT gates are installed at boot (arch::apic); `sti` takes effect after `nop` (the STI
    // shadow, SDM §6.8.3), and `cli` closes the window again.
    unsafe {
        asm!("sti", "nop", "cli", options(nomem, nostack));
    }
}

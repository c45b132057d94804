//! The x86_64 shim: the hypercall instruction, the two things only `triple` needs, and the
//! interrupt hooks of `interrupts.rs` (an IDT, the x2APIC, HLT). The aarch64 build replaces
//! this file with an HVC shim (docs/abi.md §2).

use core::arch::{asm, global_asm};

/// Whether the hypercall instruction is Intel's VMCALL (the vendor CPUID reports is
/// "GenuineIntel": the hypervisor runs this guest with VMX) rather than AMD's VMMCALL (SVM).
/// Each is #UD under the other extension (docs/abi.md §2.1). CPUID is emulated by the
/// hypervisor from the host's, so the vendor is the real CPU's.
fn intel() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering::Relaxed};
    static VENDOR: AtomicU8 = AtomicU8::new(0);
    match VENDOR.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let l = core::arch::x86_64::__cpuid(0);
            let intel = (l.ebx, l.edx, l.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
            VENDOR.store(if intel { 1 } else { 2 }, Relaxed);
            intel
        }
    }
}

/// VMMCALL (AMD) or VMCALL (Intel) with RAX = op, RBX/RCX/RDX = arguments; the result comes back
/// in RAX (docs/abi.md §2.1). Every other register is preserved by the hypervisor.
pub fn hypercall(op: u32, a0: u64, a1: u64, a2: u64) -> i64 {
    let ret: u64;
    // SAFETY: VMMCALL/VMCALL traps to the hypervisor, which changes only RAX (the result) and
    // RIP; RBX is callee-saved in the SysV ABI, so it is saved around the call by hand.
    unsafe {
        if intel() {
            asm!(
                "xchg rbx, {a0}",
                "vmcall",
                "xchg rbx, {a0}",
                a0 = inout(reg) a0 => _,
                inout("rax") u64::from(op) => ret,
                in("rcx") a1,
                in("rdx") a2,
                options(nostack),
            );
        } else {
            asm!(
                "xchg rbx, {a0}",
                "vmmcall",
                "xchg rbx, {a0}",
                a0 = inout(reg) a0 => _,
                inout("rax") u64::from(op) => ret,
                in("rcx") a1,
                in("rdx") a2,
                options(nostack),
            );
        }
    }
    ret as i64
}

// The entry point (docs/guests.md "Several vCPUs"): every vCPU starts here with the start-info
// GPA in RDI and its index in RSI. vCPU 0 keeps the stack the hypervisor gave it (RSP at the top
// of RAM, as after a call); vCPU i > 0 has none (RSP = 0) and takes stack i of
// `testguest_stacks` (its top, minus 8 as after a call) before anything is pushed. An index the
// guest has no stack for halts, which the hypervisor stops.
global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .global guest_entry
guest_entry:
    test rsi, rsi
    jz 1f
    cmp rsi, {max}
    ja 2f
    lea rax, [rip + testguest_stacks]
    mov rcx, rsi
    shl rcx, {shift}
    lea rsp, [rax + rcx - 8]
1:
    jmp guest_main
2:
    hlt
    jmp 2b
    .popsection

    .pushsection .bss.testguest_stacks, "aw", @nobits
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
// the scenario can expect the RIP the hypervisor reports (xtask resolves `{sym:...}`).
global_asm!(
    r#"
    .pushsection .text.testguest_wild_load, "ax"
    .global testguest_wild_load
testguest_wild_load:
    mov rax, [rdi]
    ret
    .global testguest_wild_store
testguest_wild_store:
    mov [rdi], rsi
    ret
    .popsection
"#
);

// Instructions a guest may not execute, each at its own symbol so the scenario can expect the
// exact RIP of the stop report. None of them returns when the hypervisor is correct.
global_asm!(
    r#"
    .pushsection .text.testguest_forbidden, "ax"
    .global testguest_rdmsr
testguest_rdmsr:
    mov ecx, 0x1b
    .global testguest_rdmsr_insn
testguest_rdmsr_insn:
    rdmsr
    ret
    .global testguest_out
testguest_out:
    mov al, 0x41
    .global testguest_out_insn
testguest_out_insn:
    out 0x80, al
    ret
    .global testguest_vmrun
testguest_vmrun:
    xor eax, eax
    .global testguest_vmrun_insn
testguest_vmrun_insn:
    vmrun rax
    ret
    .global testguest_hlt
testguest_hlt:
    cli
    .global testguest_hlt_insn
testguest_hlt_insn:
    hlt
    ret
    .popsection
"#
);

unsafe extern "C" {
    fn testguest_wild_load(addr: u64) -> u64;
    fn testguest_wild_store(addr: u64, value: u64);
    fn testguest_rdmsr();
    fn testguest_out();
    fn testguest_vmrun();
    fn testguest_hlt();
}

/// Runs one of the forbidden instructions: `msr` (RDMSR of IA32_APIC_BASE), `io` (OUT to port
/// 0x80), `vmrun` (VMRUN on guest-physical 0), `hlt` (CLI; HLT: nothing can wake it).
pub fn forbidden(what: &str) -> bool {
    // SAFETY: each stub only executes its instruction; the hypervisor intercepts all of them
    // and stops the guest, so nothing the instruction would do on hardware happens.
    unsafe {
        match what {
            "msr" => testguest_rdmsr(),
            "io" => testguest_out(),
            "vmrun" => testguest_vmrun(),
            "hlt" => testguest_hlt(),
            _ => return false,
        }
    }
    true
}

/// Reads the 8 bytes at `addr` (identity-mapped by the boot page tables up to 4 GiB).
pub fn wild_read(addr: u64) -> u64 {
    // SAFETY: the point of the `wild` variant: the load reaches the hypervisor as a nested page
    // fault when `addr` is not guest RAM, and the guest never runs again.
    unsafe { testguest_wild_load(addr) }
}

/// Writes `value` to the 8 bytes at `addr` (identity-mapped like [`wild_read`]).
pub fn wild_write(addr: u64, value: u64) {
    // SAFETY: as in `wild_read`: when `addr` is not guest RAM the store reaches the hypervisor
    // as a second-stage fault and the guest never runs again.
    unsafe { testguest_wild_store(addr, value) }
}

/// Loads an empty IDT and raises #UD: #UD cannot be delivered (#GP), nor can the #GP (#DF),
/// nor the #DF: a triple fault.
pub fn triple_fault() -> ! {
    let idtr = [0u16; 5];
    // SAFETY: deliberately ends this guest; nothing after the `ud2` runs.
    unsafe {
        asm!("lidt [{}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn, nostack));
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

/// PCI configuration mechanism #1: address to 0xCF8, data at 0xCFC (+ byte offset). The
/// hypervisor emulates these ports and shows the guest its own functions only.
pub fn pci_config_read(address: u32) -> u32 {
    let v: u32;
    // SAFETY: port I/O to the configuration ports, which the hypervisor intercepts; no memory
    // is touched.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address, options(nomem, nostack, preserves_flags));
        asm!("in eax, dx", in("dx") 0xcfcu16, out("eax") v, options(nomem, nostack, preserves_flags));
    }
    v
}

pub fn pci_config_write(address: u32, value: u32) {
    // SAFETY: as in `pci_config_read`.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address, options(nomem, nostack, preserves_flags));
        asm!("out dx, eax", in("dx") 0xcfcu16, in("eax") value, options(nomem, nostack, preserves_flags));
    }
}

/// A 16-bit write at `address` (dword-aligned) + `byte` (0 or 2).
pub fn pci_config_write16(address: u32, byte: u16, value: u16) {
    // SAFETY: as in `pci_config_read`.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address, options(nomem, nostack, preserves_flags));
        asm!("out dx, ax", in("dx") 0xcfcu16 + byte, in("ax") value, options(nomem, nostack, preserves_flags));
    }
}

/// What [`timestamp`] counts, for the bench output.
pub const TIMESTAMP_NAME: &str = "tsc";

/// The time-stamp counter (not intercepted: the guest reads the host's TSC, offset 0).
pub fn timestamp() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

// Interrupts (`interrupts.rs`): one 16-byte stub per vector 32-255 pushes its vector and jumps
// to a common path that saves the caller-saved registers, calls `testguest_irq(vector)` on a
// 16-byte-aligned stack and returns with IRETQ. Exceptions (0-31) have no gate: one would end
// the guest as a triple fault, which the hypervisor reports.
global_asm!(
    r#"
    .pushsection .text.testguest_irq_stubs, "ax"
    .balign 16
    .global testguest_irq_stubs
testguest_irq_stubs:
    .set irq_vec, 32
    .rept 224
    .balign 16
    push irq_vec
    jmp testguest_irq_common
    .set irq_vec, irq_vec + 1
    .endr
    .balign 16
testguest_irq_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, [rsp + 72]
    sub rsp, 8
    cld
    call testguest_irq
    add rsp, 8
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 8
    iretq
    .popsection
"#
);

unsafe extern "C" {
    fn testguest_irq_stubs();
}

/// The IDT: 256 16-byte gates (SDM vol 3 §6.14.1).
static mut IDT: [[u64; 2]; 256] = [[0; 2]; 256];

#[unsafe(no_mangle)]
extern "C" fn testguest_irq(vector: u64) {
    crate::interrupts::on_interrupt(vector as u32);
    irq_eoi();
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an x2APIC register the hypervisor's virtual APIC emulates (the only MSRs
    // this guest reads); no memory is touched.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as in `rdmsr`, a write.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack))
    };
}

/// The timer's vector.
pub const TIMER_VECTOR: u32 = 0xec;

/// Interrupts off, the IDT loaded, the x2APIC (CPUID 1 ECX.21) software-enabled with
/// spurious vector 0xFF and TPR 0. Its APIC ID is returned.
pub fn irq_setup() -> Result<u32, &'static str> {
    // SAFETY: CLI only clears RFLAGS.IF.
    unsafe { asm!("cli", options(nomem, nostack)) };
    if core::arch::x86_64::__cpuid(1).ecx & 1 << 21 == 0 {
        return Err("no x2APIC in CPUID (this hypervisor backend delivers no interrupts)");
    }
    let base = testguest_irq_stubs as *const () as u64;
    // SAFETY: interrupts are off and only vCPU 0 runs this variant: nothing else uses IDT.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (k, gate) in idt.iter_mut().skip(32).enumerate() {
        let stub = base + 16 * k as u64;
        // Offset 15:0, selector 0x08, type 0xE (64-bit interrupt gate) present DPL 0,
        // offset 31:16; then offset 63:32.
        gate[0] = (stub & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | (stub >> 16 & 0xffff) << 48;
        gate[1] = stub >> 32;
    }
    let mut idtr = [0u8; 10];
    idtr[..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..].copy_from_slice(&(idt.as_ptr() as u64).to_le_bytes());
    // SAFETY: the IDT is a static that lives as long as the guest; every gate points at a stub.
    unsafe { asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack)) };
    wrmsr(0x808, 0); // TPR
    wrmsr(0x80f, 0x1ff); // SVR: APIC software enable, spurious vector 0xFF
    Ok(rdmsr(0x802) as u32)
}

/// Enables interrupts and waits for one (STI's shadow makes the pair atomic: an interrupt
/// pending before the HLT still wakes it), then disables them again.
pub fn irq_wait() {
    // SAFETY: only RFLAGS.IF changes; every vector the guest can get has a gate.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

pub fn irq_eoi() {
    wrmsr(0x80b, 0);
}

/// The MSI message that targets this vCPU's APIC with `vector` (SDM vol 3 §11.11: fixed,
/// edge, physical destination).
pub fn msi_message(apic_id: u32, vector: u32) -> (u64, u32) {
    (0xfee0_0000 | u64::from(apic_id & 0xff) << 12, vector & 0xff)
}

/// What a device writes for a remappable-format MSI naming IRTE `handle` (VT-d 4.1
/// §5.1.2.2: address bit 4 = 1, handle 14:0 in bits 19:5, handle 15 in bit 2; data = 0):
/// the forged message of the `irq-forge` variant.
pub fn forged_msi(handle: u16) -> (u64, u32) {
    let h = u64::from(handle);
    (0xfee0_0000 | (h & 0x7fff) << 5 | 1 << 4 | (h >> 15) << 2, 0)
}

/// One-shot timer in `ticks` of the TSC (the virtual APIC timer counts the TSC, divided by
/// 16 here so that about 2^36 ticks fit the 32-bit count).
pub fn timer_arm(ticks: u64) {
    wrmsr(0x83e, 0b0011); // divide by 16
    wrmsr(0x832, u64::from(TIMER_VECTOR)); // one-shot, unmasked
    wrmsr(0x838, (ticks / 16).clamp(1, u64::from(u32::MAX)));
}

/// A fixed interrupt to itself (the x2APIC SELF IPI register, SDM vol 3 §11.12.11).
pub fn self_ipi(vector: u32) {
    wrmsr(0x83f, u64::from(vector & 0xff));
}

pub fn timer_stop() {
    wrmsr(0x838, 0);
}

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
//! Every CPU runs its own local APIC the same way: [`init_timer`] chooses the interface on the
//! boot CPU, [`init_secondary`] repeats the setup on each secondary CPU (`smp`), and
//! [`arm_timer`] / [`ticks`] act on the calling CPU (the tick count lives in its `PerCpu`).
//!
//! Everything else that could interrupt is masked: the legacy 8259 PICs (whose firmware-default
//! vectors 8-15 would look like exceptions) and LVT LINT0 (ExtINT), so an INTR exit always means
//! the time slice ended.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicUsize, Ordering};

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
    pub const ID: u32 = 0x20;
    pub const TPR: u32 = 0x80;
    pub const EOI: u32 = 0xb0;
    pub const SVR: u32 = 0xf0;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const TIMER_INIT: u32 = 0x380;
    pub const TIMER_DIV: u32 = 0x3e0;
    /// Interrupt command register: one 64-bit MSR 0x830 in x2APIC mode, two 32-bit registers
    /// (low at 0x300, destination at 0x310) in xAPIC mode (SDM §11.6.1, §11.12.9).
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
}
/// ICR delivery status (xAPIC only; x2APIC has none, SDM §11.12.9): set while a send is pending.
const ICR_SEND_PENDING: u32 = 1 << 12;
/// ICR: delivery mode INIT (0b101 << 8) / Start-up (0b110 << 8), level assert (bit 14),
/// physical destination, no shorthand (SDM §11.6.1, Figure 11-12).
const ICR_INIT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
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

// The ISR's EOI: a 32-bit store of 0 to the xAPIC EOI register when `XAPIC_EOI` holds its
// address (a plain x86 load is an acquire load, TSO), else WRMSR to the x2APIC EOI MSR. Then it
// counts the tick in this CPU's `PerCpu` (GS base, set on every CPU before its timer is armed).
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
    inc qword ptr gs:[{ticks}]
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
    ticks = const super::smp::TICKS_OFFSET,
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
    // SAFETY: only called for IA32_APIC_BASE, which exists on every x86_64 CPU, and the x2APIC
    // ID register once x2APIC mode is on; reading either has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes an x2APIC register (or IA32_APIC_BASE). Private: callers below pass fixed registers.
fn wrmsr(msr: u32, v: u64) {
    // SAFETY: `msr` is IA32_APIC_BASE or an x2APIC register of this CPU's own local APIC, written
    // after x2APIC mode is on; none of them affects memory. The values only route the timer to
    // a vector with an IDT gate, or mask interrupt sources, or (ICR) send INIT / start-up IPIs,
    // which only `smp` sends, to CPUs it is starting and that run nothing yet.
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

    /// Sends an inter-processor interrupt: `low` is the ICR's low word (vector, delivery mode,
    /// level), `dest` the physical APIC ID. xAPIC: waits (bounded) until the previous send left.
    fn send_ipi(&self, dest: u32, low: u32) -> Result<(), &'static str> {
        match self {
            Interface::X2apic => {
                wrmsr(
                    x2apic_msr(reg::ICR_LOW),
                    u64::from(dest) << 32 | u64::from(low),
                );
                Ok(())
            }
            Interface::Xapic(regs) => {
                if dest > 0xff {
                    return Err("APIC ID above 255 needs x2APIC");
                }
                let idle = || {
                    (0..1_000_000).any(|_| {
                        core::hint::spin_loop();
                        regs.read32(reg::ICR_LOW as usize) & ICR_SEND_PENDING == 0
                    })
                };
                if !idle() {
                    return Err("xAPIC ICR stays busy");
                }
                regs.write32(reg::ICR_HIGH as usize, dest << 24);
                regs.write32(reg::ICR_LOW as usize, low);
                if idle() {
                    Ok(())
                } else {
                    Err("xAPIC ICR stays busy")
                }
            }
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
    program(apic);
    Ok(())
}

/// The local APIC registers every CPU programs alike: interrupts accepted at every priority,
/// LINT0 masked, software-enabled with the spurious vector, the timer one-shot, divide by 1,
/// on [`TIMER_VECTOR`], not armed.
fn program(apic: Interface) {
    apic.write(reg::TPR, 0);
    apic.write(reg::LVT_LINT0, LVT_MASKED);
    apic.write(reg::SVR, 1 << 8 | u32::from(SPURIOUS_VECTOR));
    apic.write(reg::TIMER_DIV, 0b1011); // divide by 1
    apic.write(reg::LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
}

/// Brings up a secondary CPU's own local APIC in the mode the boot CPU chose ([`init_timer`]):
/// IA32_APIC_BASE is per CPU and comes out of INIT in xAPIC mode (SDM §11.4.3, §11.12.5), so
/// x2APIC is switched on again here; then the same registers as on the boot CPU.
pub fn init_secondary() -> Result<(), &'static str> {
    let apic = *INTERFACE
        .get()
        .ok_or("boot CPU has no local APIC interface")?;
    let base = rdmsr(IA32_APIC_BASE);
    match apic {
        Interface::X2apic => {
            wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN);
            wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
        }
        Interface::Xapic(regs) => {
            if base & APIC_BASE_ADDR != regs.phys {
                return Err("this CPU's xAPIC page differs from the boot CPU's");
            }
            wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN);
        }
    }
    program(apic);
    Ok(())
}

/// This CPU's local APIC ID: x2APIC ID register (MSR 0x802, 32 bits) or the xAPIC ID register
/// (bits 31:24, SDM §11.4.6); `None` before [`init_timer`] / [`init_secondary`].
pub fn id() -> Option<u32> {
    match INTERFACE.get()? {
        Interface::X2apic => Some(rdmsr(x2apic_msr(reg::ID)) as u32),
        Interface::Xapic(regs) => Some(regs.read32(reg::ID as usize) >> 24),
    }
}

/// Whether the local APICs run in x2APIC mode (for the report).
pub fn is_x2apic() -> bool {
    matches!(INTERFACE.get(), Some(Interface::X2apic))
}

/// INIT IPI to the CPU with physical APIC ID `dest` (SDM §9.4.4.1: resets it into
/// wait-for-SIPI).
pub fn send_init(dest: u32) -> Result<(), &'static str> {
    INTERFACE
        .get()
        .ok_or("no local APIC")?
        .send_ipi(dest, ICR_INIT)
}

/// Start-up IPI to `dest`: it starts in real mode at CS:IP = (page << 8):0, i.e. at physical
/// address `page << 12` (SDM §9.4.4.1, §11.6.1).
pub fn send_startup(dest: u32, page: u8) -> Result<(), &'static str> {
    INTERFACE
        .get()
        .ok_or("no local APIC")?
        .send_ipi(dest, ICR_STARTUP | u32::from(page))
}

/// Starts a one-shot countdown of `ticks` APIC timer ticks (divide by 1: the APIC bus clock;
/// 1 GHz under QEMU). Rewriting restarts the countdown; 0 stops it. Does nothing before
/// [`init_timer`] succeeded.
pub fn arm_timer(ticks: u32) {
    if let Some(apic) = INTERFACE.get() {
        apic.write(reg::TIMER_INIT, ticks);
    }
}

/// End of interrupt for the interrupt being handled on this CPU (SDM §11.8.5): a write of 0 to
/// the EOI register. Device interrupt handlers call it last (`irq`).
pub fn eoi() {
    if let Some(apic) = INTERFACE.get() {
        apic.write(reg::EOI, 0);
    }
}

/// Timer interrupts taken by the calling CPU since it started.
#[inline]
pub fn ticks() -> u64 {
    super::smp::this_cpu_ticks()
}

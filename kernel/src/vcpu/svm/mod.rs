//! The AMD SVM backend of the vCPU interface (AMD64 APM vol 2 chapter 15), with nested paging.
//!
//! - Bring-up ([`Svm::probe`]): CPUID 8000_0001h ECX.SVM, 8000_000Ah (EBX = number of ASIDs,
//!   EDX.NP), VM_CR.SVMDIS, then EFER.SVME and VM_HSAVE_PA ([`asm::enable`]).
//! - One ASID per VM, from 1 to N-1 (ASID 0 is the host's; VMRUN refuses it, §15.16). A vCPU's
//!   first VMRUN flushes the whole TLB (TLB_CONTROL = 1), so an ASID reused after a guest was
//!   destroyed never sees the old guest's translations; QEMU implements only control values 0/1.
//!   ASIDs are machine-wide (`IdBitmap`): a VM's vCPUs use its ASID on every CPU they run on,
//!   and a CPU that switches from one of them to another flushes again (their guest-linear
//!   translations differ under the same tag).
//! - Nested page tables built by the page-table engine's x86-64 format ([`X86FirstStage`]):
//!   nested walks are user-mode accesses (§15.25.5), which the format's leaves grant (U/S = 1).
//! - Intercepts: VMRUN (required by VMRUN itself), VMMCALL (the hypercall), every port (IOPM all
//!   ones) and every MSR (MSRPM all ones), HLT, SHUTDOWN (triple fault), CPUID (emulated here),
//!   INTR (preemption), and the instructions a guest must not execute on host state: VMLOAD,
//!   VMSAVE (they take a *host*-physical address without virtual VMLOAD/VMSAVE), STGI, CLGI,
//!   SKINIT, INVLPGA, INVD, XSETBV (XCR0 is not switched), MONITOR/MWAIT, ICEBP, task switches.
//!   Exceptions: #DB and #AC (a guest can make their delivery loop forever without ever
//!   reaching an interruptible point, CVE-2015-8104 / CVE-2015-5307) and #MC.
//! - Next RIP after an emulated instruction: with NRIPS (CPUID 8000_000Ah EDX bit 3; Bochs's
//!   `ryzen` model) the CPU's own nRIP (VMCB 0xC8, APM vol 2 §15.7.1); QEMU TCG has no NRIPS
//!   (nRIP stays 0), so there the backend advances RIP itself: VMMCALL is 3 bytes, CPUID 2,
//!   and an IOIO intercept's EXITINFO2 holds the next RIP (§15.10.2).

pub mod asm;
pub mod vmcb;

use core::arch::x86_64::{__cpuid, __cpuid_count};

use iommu::pgtable::{Config, PageTable, Prot, X86FirstStage};

use super::{Backend, EntryState, Event, Exit, HypercallRegs, VcpuError};
use crate::guest::memory::GuestMemory;
use crate::mem::iommu_mem::IommuMemory;
use asm::{GuestGprs, SvmEnabled};
use drivers::vlapic::{ApicError, VirtualLapic};
use spin::Once;
use vmcb::{ExitState, HostSaveArea, PermissionMaps, Segment, Vmcb, intercept};

/// Exit codes (APM vol 2 Appendix C).
mod exit {
    pub const EXCP_BASE: u64 = 0x40;
    pub const INTR: u64 = 0x60;
    pub const VINTR: u64 = 0x64;
    pub const NMI: u64 = 0x61;
    pub const CPUID: u64 = 0x72;
    pub const INVD: u64 = 0x76;
    pub const HLT: u64 = 0x78;
    pub const INVLPGA: u64 = 0x7a;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const TASK_SWITCH: u64 = 0x7d;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const ICEBP: u64 = 0x88;
    pub const MONITOR: u64 = 0x8a;
    pub const MWAIT: u64 = 0x8b;
    pub const XSETBV: u64 = 0x8d;
    pub const NPF: u64 = 0x400;
}

/// Frames of the nested page tables: a source of their own (frame-backed like the IOMMU
/// tables), so the guest runner can check that every nested table page came back.
pub static NPT_MEMORY: IommuMemory = IommuMemory::new();

/// Over every vCPU, for the end-of-run report: virtual interrupts injected through EVENTINJ,
/// taken by the guest itself through V_IRQ, VINTR exits (a V_IRQ the guest became able to
/// take, in [`Delivery::EventInjection`]), and events re-injected after an exit cut their
/// delivery short.
static INJECTED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static TAKEN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static VINTR_EXITS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static REINJECTED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// What the end-of-run report prints about SVM guest interrupts.
pub struct InterruptCounts {
    pub injected: u64,
    pub taken: u64,
    pub vintr_exits: u64,
    pub reinjected: u64,
}

pub fn interrupt_counts() -> InterruptCounts {
    use core::sync::atomic::Ordering::Relaxed;
    InterruptCounts {
        injected: INJECTED.load(Relaxed),
        taken: TAKEN.load(Relaxed),
        vintr_exits: VINTR_EXITS.load(Relaxed),
        reinjected: REINJECTED.load(Relaxed),
    }
}

/// How a virtual interrupt reaches a guest that can take it at the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The usual way (APM vol 2 §15.20, as KVM and Xen do): EVENTINJ when the guest can take
    /// the interrupt at the entry, else V_IRQ with the VINTR intercept, so that the guest exits
    /// at its next interrupt window and the vector is injected then (§15.21.4).
    EventInjection,
    /// V_IRQ without the VINTR intercept (§15.21.4): the guest takes the interrupt itself,
    /// at the entry or whenever its RFLAGS.IF and interrupt shadow allow, and the exit after
    /// that finds V_IRQ cleared. Used under QEMU's TCG: its SVM model delivers an external
    /// interrupt injected by EVENTINJ during VMRUN but leaves the vector behind as the CPU's
    /// pending exception, and delivers it a second time (even with RFLAGS.IF = 0) when its
    /// execution loop is next left for an exit request instead of a #VMEXIT (an icount slice
    /// ending, a kick from another CPU): a guest counted one raise-IRQ twice
    /// (docs/interrupts.md, "EVENTINJ under QEMU"). Its V_IRQ path does not leave that behind.
    /// Not used elsewhere: Bochs 2.7 re-evaluates V_IRQ's masking only when RFLAGS.IF changes,
    /// so it never delivers a V_IRQ to a guest that has IF = 1 at VMRUN.
    VirtualIrq,
}

impl Delivery {
    /// [`Delivery::VirtualIrq`] under QEMU's TCG, which names itself in the hypervisor CPUID
    /// leaf 4000_0000h ("TCGTCGTCGTCG"); [`Delivery::EventInjection`] on anything else.
    pub fn for_this_cpu() -> Delivery {
        let l = __cpuid(0x4000_0000);
        let mut name = [0u8; 12];
        for (chunk, word) in name.chunks_exact_mut(4).zip([l.ebx, l.ecx, l.edx]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        if &name == b"TCGTCGTCGTCG" {
            Delivery::VirtualIrq
        } else {
            Delivery::EventInjection
        }
    }
}

/// EXITINTINFO / EVENTINJ fields (APM vol 2 §15.20, Figure 15-3): vector 7:0, type 10:8,
/// valid bit 31.
mod event {
    pub const VALID: u64 = 1 << 31;
    pub const TYPE_MASK: u64 = 0b111 << 8;
    /// Type 0: external (maskable) interrupt.
    pub const TYPE_INTR: u64 = 0;
    /// Type 3: exception. QEMU reports a virtual interrupt whose delivery an exit cut short
    /// with this type (its vector is then >= 32, which no exception has).
    pub const TYPE_EXCEPTION: u64 = 3 << 8;
}

/// Whether the event in EXITINTINFO is an external interrupt (type 0, or QEMU's type 3 with
/// a vector no exception has), and which vector.
fn external_interrupt(info: u64) -> Option<u8> {
    let vector = (info & 0xff) as u8;
    match info & event::TYPE_MASK {
        event::TYPE_INTR => Some(vector),
        event::TYPE_EXCEPTION if vector >= 32 => Some(vector),
        _ => None,
    }
}

/// Exceptions intercepted: #DB (1), #AC (17), #MC (18).
const EXCEPTION_INTERCEPTS: u32 = 1 << 1 | 1 << 17 | 1 << 18;

/// IOIO intercept EXITINFO1 (APM vol 2 §15.10.2, Figure 15-2): bit 0 TYPE (1 = IN), bit 2 STR,
/// bit 3 REP, bits 6:4 SZ32/SZ16/SZ8 (one-hot operand size), bits 9:7 A64/A32/A16 (address size:
/// only string forms use it, but Bochs sets A64 for every 64-bit-mode IN/OUT, e.g. 0x03F80210
/// where QEMU writes 0x03F80010), bits 12:10 SEG, bits 31:16 port.
mod ioio {
    pub const IN: u64 = 1 << 0;
    pub const STR: u64 = 1 << 2;
    pub const REP: u64 = 1 << 3;
    pub const SIZE_SHIFT: u32 = 4;
    pub const SIZE_MASK: u64 = 0b111;
    pub const PORT_SHIFT: u32 = 16;
}

/// Whether the CPU saves the next RIP in the VMCB on intercepts (NRIPS, CPUID 8000_000Ah EDX
/// bit 3): the same CPUID bit the boot report prints as `nrips=`.
pub fn has_nrips() -> bool {
    __cpuid(0x8000_0000).eax >= 0x8000_000a && __cpuid(0x8000_000a).edx & (1 << 3) != 0
}

/// Each CPU's SVM state by CPU index (`arch::smp::cpu_index`): EFER.SVME is per CPU, and every
/// CPU that executes VMRUN needs its own VM_HSAVE_PA page (APM vol 2 §15.30.4) and host
/// VMSAVE block.
static PER_CPU: [Once<SvmEnabled>; crate::arch::smp::MAX_CPUS] =
    [const { Once::new() }; crate::arch::smp::MAX_CPUS];

/// Switches SVM on for the calling CPU (once; later calls on the same CPU return the same
/// proof): CPUID checks, then EFER.SVME and this CPU's own host save area ([`asm::enable`]).
/// Every CPU that runs guests calls it; `arch::smp` calls it on each secondary CPU at bring-up.
/// After the first call it is one GS-relative load and an atomic check (no CPUID, which exits
/// when the hypervisor itself runs virtualized), so vCPU code may call it before every run.
pub fn enable_this_cpu() -> Result<&'static SvmEnabled, &'static str> {
    let slot = PER_CPU
        .get(crate::arch::smp::cpu_index())
        .ok_or("CPU index out of range")?;
    if let Some(cpu) = slot.get() {
        return Ok(cpu);
    }
    let max_ext = __cpuid(0x8000_0000).eax;
    if max_ext < 0x8000_0001 || __cpuid(0x8000_0001).ecx & (1 << 2) == 0 {
        return Err("CPU has no SVM (CPUID 8000_0001h ECX.SVM = 0)");
    }
    slot.try_call_once(|| {
        let no_mem = "out of memory for SVM structures";
        let hsave = HostSaveArea::new().ok_or(no_mem)?;
        let host_block = Vmcb::new().ok_or(no_mem)?;
        asm::enable(hsave, host_block)
    })
}

/// Most ASIDs tracked (the bitmap size); CPUs with more simply use the first 256.
const MAX_ASIDS: u32 = 256;

/// The machine's ASIDs (one VM's on every CPU its vCPUs run on).
static ASIDS: super::IdBitmap = super::IdBitmap::new();

/// Guest control state at entry (docs/guests.md): CR0 = PG|WP|NE|ET|MP|PE, CR4 = PAE|OSFXSR|
/// OSXMMEXCPT, EFER = SVME|NXE|LMA|LME (SVME is required in the guest's EFER, APM §15.5.1).
const GUEST_CR0: u64 = 1 << 31 | 1 << 16 | 1 << 5 | 1 << 4 | 1 << 1 | 1;
const GUEST_CR4: u64 = 1 << 5 | 1 << 9 | 1 << 10;
const GUEST_EFER: u64 = 1 << 12 | 1 << 11 | 1 << 10 | 1 << 8;
/// The PAT power-on value (WB, WT, UC-, UC, ...), as the guest's G_PAT.
const GUEST_PAT: u64 = 0x0007_0406_0007_0406;

/// The backend of one CPU: SVM switched on for it (one per CPU that runs vCPUs).
pub struct Svm {
    cpu: &'static SvmEnabled,
    maps: PermissionMaps,
    asid_count: u32,
    phys_bits: u32,
    /// The CPU fills nRIP ([`has_nrips`]).
    nrips: bool,
    /// By ASID, the VMCB (physical address) of the vCPU that ran last with it on this CPU.
    last_vcpu: [u64; MAX_ASIDS as usize],
    /// How guests take their virtual interrupts on this CPU.
    delivery: Delivery,
}

/// A VM: its nested page table and ASID.
pub struct SvmVm {
    npt: PageTable<X86FirstStage<4>>,
    asid: u32,
}

/// A vCPU: its VMCB and the registers VMRUN does not switch.
pub struct SvmVcpu {
    vmcb: Vmcb,
    gprs: GuestGprs,
    first_run: bool,
    /// TLB_CONTROL is 1 (flush this ASID) in the VMCB: set for the first run, cleared before
    /// the second; the ASID word is not written on the runs after that.
    flush_set: bool,
    /// The exit fields of the last `#VMEXIT`, read once per exit.
    exit: ExitState,
    /// EVENTINJ may hold a non-zero event this backend wrote: it must be rewritten after the
    /// next exit (re-injected or cleared). While it is known to be 0, the store is skipped.
    injecting: bool,
    /// Its index in the guest (the virtual APIC ID).
    index: u32,
    /// Its virtual local APIC and posted-interrupt slot, once bound (`bind_interrupts`).
    apic: Option<(VirtualLapic, usize)>,
    /// It executed HLT with its virtual APIC enabled and IF = 1: it runs again when an
    /// interrupt is deliverable.
    halted: bool,
    /// The vector this backend left in V_IRQ for the guest to take (`None`: V_IRQ is clear).
    /// After an exit a clear V_IRQ bit says the guest took it.
    virq: Option<u8>,
}

impl Svm {
    /// Brings SVM up on the calling CPU, or says why this machine has no SVM backend.
    pub fn probe() -> Result<Svm, &'static str> {
        let max_ext = __cpuid(0x8000_0000).eax;
        if max_ext < 0x8000_0001 || __cpuid(0x8000_0001).ecx & (1 << 2) == 0 {
            return Err("CPU has no SVM (CPUID 8000_0001h ECX.SVM = 0)");
        }
        if max_ext < 0x8000_000a {
            return Err("CPUID has no SVM leaf 8000_000Ah");
        }
        let svm = __cpuid(0x8000_000a);
        if svm.edx & 1 == 0 {
            return Err("SVM without nested paging (CPUID 8000_000Ah EDX.NP = 0)");
        }
        if svm.ebx < 2 {
            return Err("SVM reports fewer than 2 ASIDs");
        }
        let phys_bits = if __cpuid(0x8000_0000).eax >= 0x8000_0008 {
            __cpuid(0x8000_0008).eax & 0xff
        } else {
            36
        };
        let no_mem = "out of memory for SVM structures";
        let maps = PermissionMaps::new().ok_or(no_mem)?;
        let cpu = enable_this_cpu()?;
        Ok(Svm {
            cpu,
            maps,
            asid_count: svm.ebx.min(MAX_ASIDS),
            phys_bits,
            nrips: has_nrips(),
            last_vcpu: [0; MAX_ASIDS as usize],
            delivery: Delivery::for_this_cpu(),
        })
    }

    /// Number of ASIDs the CPU provides (ASID 0 included).
    pub fn asids(&self) -> u32 {
        self.asid_count
    }

    /// Moves the guest past the instruction that exited: to nRIP with NRIPS, else `len` bytes
    /// on (the instruction's length without prefixes, known from the exit code; a guest that
    /// prefixes it on a CPU without NRIPS lands inside its own instruction, its problem alone).
    fn next_rip(&self, vcpu: &SvmVcpu, len: u64) -> u64 {
        if self.nrips {
            vcpu.exit.next_rip
        } else {
            vcpu.exit.rip.wrapping_add(len)
        }
    }

    fn alloc_asid(&mut self) -> Option<u32> {
        ASIDS.alloc(self.asid_count)
    }

    fn free_asid(&mut self, asid: u32) {
        ASIDS.free(asid);
    }

    /// CPUID as the guest sees it: the host's, with the hypervisor-present bit set and the
    /// features the guest cannot use hidden (SVM and VMX, x2APIC: its MSRs all exit).
    fn emulate_cpuid(&self, vcpu: &mut SvmVcpu) {
        let x2apic = vcpu.apic.is_some();
        let leaf = vcpu.exit.rax as u32;
        let sub = vcpu.gprs.rcx as u32;
        let mut r = if (0x4000_0000..0x5000_0000).contains(&leaf) {
            core::arch::x86_64::CpuidResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }
        } else {
            __cpuid_count(leaf, sub)
        };
        match leaf {
            // With a virtual local APIC, x2APIC (ECX.21) is shown; TSC-deadline (ECX.24) never
            // is: the virtual APIC has no such mode. EBX 31:24 is the initial APIC ID.
            1 if x2apic => {
                r.ecx = (r.ecx | 1 << 31 | 1 << 21) & !(1 << 5 | 1 << 24);
                r.ebx = (r.ebx & 0x00ff_ffff) | (vcpu.index & 0xff) << 24;
            }
            1 => r.ecx = (r.ecx | 1 << 31) & !(1 << 5 | 1 << 21),
            0x8000_0001 => r.ecx &= !(1 << 2),
            0x8000_000a => {
                r = core::arch::x86_64::CpuidResult {
                    eax: 0,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                }
            }
            _ => {}
        }
        vcpu.gprs.rbx = r.ebx.into();
        vcpu.gprs.rcx = r.ecx.into();
        vcpu.gprs.rdx = r.edx.into();
        // CPUID is 0F A2.
        let next = self.next_rip(vcpu, 2);
        vcpu.vmcb.set_rax_rip(r.eax.into(), next);
    }

    /// Before an entry: merges what host handlers posted into the virtual APIC, fires its
    /// timer if due, and delivers the highest deliverable vector as `delivery` says: through
    /// EVENTINJ if the guest can take it now (RFLAGS.IF = 1, no interrupt shadow) and no
    /// interrupted event is being re-delivered, else offered in V_IRQ (with V_IGN_TPR: the
    /// virtual APIC's own priority check already allowed it); with the VINTR intercept in
    /// [`Delivery::EventInjection`], without it in [`Delivery::VirtualIrq`].
    ///
    /// Every exit pays this, so the common case (nothing posted, no virtual timer armed,
    /// nothing requested, V_IRQ already as wanted) is a few loads and branches: one summary
    /// flag instead of four atomic swaps (`msi::take_posted_if_any`), no RDTSC unless the
    /// timer is armed, and no VMCB store when V_IRQ already holds what it should (a V_IRQ not
    /// taken is still set after the exit: the processor clears it only when the guest takes
    /// it, and with the VINTR intercept the guest exits before it does).
    fn prepare_interrupts(vcpu: &mut SvmVcpu, delivery: Delivery) {
        let Some((apic, slot)) = vcpu.apic.as_mut() else {
            return;
        };
        Self::refresh(apic, *slot);
        let mut want = apic.pending();
        if let Some(v) = want
            && delivery == Delivery::EventInjection
            && !vcpu.injecting
            && vcpu.vmcb.interruptible()
        {
            apic.accept(v);
            vcpu.vmcb
                .set_event_injection(u64::from(v) | event::TYPE_INTR | event::VALID);
            vcpu.injecting = true;
            INJECTED.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            want = None;
        }
        if want != vcpu.virq {
            vcpu.vmcb
                .set_virtual_irq(want, delivery == Delivery::EventInjection);
            vcpu.virq = want;
        }
    }

    /// Merges what host handlers posted to `slot` into the virtual APIC and fires its timer if
    /// due: one summary-flag load when nothing was posted (`msi::take_posted_if_any`), and no
    /// TSC read unless the timer is armed (`tick` does nothing without a deadline).
    fn refresh(apic: &mut VirtualLapic, slot: usize) {
        if let Some(posted) = crate::guest::msi::take_posted_if_any(slot) {
            apic.request_bits(posted);
        }
        if apic.deadline().is_some() {
            apic.tick(crate::arch::irq::now());
        }
    }

    /// After an exit: if the guest took the vector offered in V_IRQ (the processor cleared
    /// the bit), it is in service now: IRR to ISR in the virtual APIC. Then EXITINTINFO: an
    /// event whose delivery the exit interrupted is delivered again at the next entry through
    /// EVENTINJ (§15.7.2), except the offered virtual interrupt while V_IRQ is still set (QEMU
    /// clears V_IRQ only once the delivery completed): V_IRQ delivers that one again itself.
    ///
    /// Only in [`Delivery::VirtualIrq`]: with the VINTR intercept the guest exits before it
    /// can take the offer, so there a clear V_IRQ never means "taken".
    fn sync_virtual_irq(vcpu: &mut SvmVcpu, delivery: Delivery) {
        let mut taken = None;
        if let Some(v) = vcpu.virq
            && delivery == Delivery::VirtualIrq
            && vcpu.exit.int_ctl & vmcb::V_IRQ == 0
        {
            if let Some((apic, _)) = vcpu.apic.as_mut() {
                apic.accept(v);
            }
            TAKEN.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            vcpu.virq = None;
            taken = Some(v);
        }
        let info = vcpu.exit.int_info;
        let mut reinject = 0;
        if info & event::VALID != 0 {
            match external_interrupt(info) {
                // Still offered in V_IRQ: it comes again by itself.
                Some(v) if taken.is_none() && vcpu.virq == Some(v) => {}
                // An external interrupt is re-delivered as type 0 whatever type QEMU reported.
                Some(v) => reinject = u64::from(v) | event::TYPE_INTR | event::VALID,
                None => reinject = info,
            }
        }
        if reinject != 0 {
            REINJECTED.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        }
        if reinject != 0 || vcpu.injecting {
            vcpu.vmcb.set_event_injection(reinject);
            vcpu.injecting = reinject != 0;
        }
    }

    /// A halted vCPU waits here until its virtual APIC has a deliverable vector (`true`) or
    /// the time slice that began at `ticks` ends (`false`). It sleeps in HLT with interrupts
    /// open: an MSI routed to this CPU, or the preemption timer, wakes it. While its virtual
    /// timer is armed it polls the TSC instead, so it wakes at the deadline and not at the
    /// slice's end.
    fn wait_while_halted(vcpu: &mut SvmVcpu, ticks: u64) -> bool {
        let Some((apic, slot)) = vcpu.apic.as_mut() else {
            vcpu.halted = false;
            return true;
        };
        loop {
            Self::refresh(apic, *slot);
            if apic.pending().is_some() {
                vcpu.halted = false;
                return true;
            }
            if crate::arch::apic::ticks() != ticks {
                return false;
            }
            if apic.deadline().is_some() {
                crate::arch::irq::window();
                core::hint::spin_loop();
            } else {
                crate::arch::irq::wait_for_interrupt();
            }
        }
    }

    /// RDMSR/WRMSR of an x2APIC register (0x800-0x8FF, Intel SDM vol 3 §11.12.1.2) by a vCPU
    /// with a virtual APIC: emulated (`Ok(true)`, RIP advanced over the 2-byte instruction).
    /// `Ok(false)`: not an APIC register, the exit is surfaced (the MSR is forbidden).
    fn apic_msr(&self, vcpu: &mut SvmVcpu) -> Result<bool, ApicError> {
        let m = vcpu.gprs.rcx as u32;
        let next = self.next_rip(vcpu, 2);
        let Some((apic, _)) = vcpu.apic.as_mut() else {
            return Ok(false);
        };
        if !(0x800..=0x8ff).contains(&m) {
            return Ok(false);
        }
        let now = crate::arch::irq::now();
        if vcpu.exit.info1 & 1 == 0 {
            let v = apic.read_msr(m, now)?;
            vcpu.gprs.rdx = v >> 32;
            vcpu.vmcb.set_rax_rip(v & 0xffff_ffff, next);
        } else {
            let v = (vcpu.gprs.rdx & 0xffff_ffff) << 32 | (vcpu.exit.rax & 0xffff_ffff);
            apic.write_msr(m, v, now)?;
            vcpu.vmcb.set_rax_rip(vcpu.exit.rax, next);
        }
        Ok(true)
    }

    fn decode(vcpu: &SvmVcpu) -> Event {
        let v = &vcpu.exit;
        let (code, info1, info2) = (v.code, v.info1, v.info2);
        let forbidden = |what| Event::Forbidden { what, detail: 0 };
        match code {
            exit::INTR | exit::NMI => Event::Preempted,
            exit::VMMCALL => Event::Hypercall(HypercallRegs {
                op: v.rax,
                args: [vcpu.gprs.rbx, vcpu.gprs.rcx, vcpu.gprs.rdx],
            }),
            // String and REP forms would need the hypervisor to read or write guest memory
            // through the guest's own page tables: not emulated.
            exit::IOIO if info1 & (ioio::STR | ioio::REP) != 0 => Event::Forbidden {
                what: "string port I/O (ins/outs)",
                detail: (info1 >> ioio::PORT_SHIFT) & 0xffff,
            },
            exit::IOIO => {
                // The address-size bits (A64 from Bochs) say nothing about IN/OUT without a
                // string operand: only the one-hot operand size counts.
                let size: u8 = match (info1 >> ioio::SIZE_SHIFT) & ioio::SIZE_MASK {
                    0b001 => 1,
                    0b010 => 2,
                    0b100 => 4,
                    // No or several sizes: not an exit the APM describes.
                    _ => return Event::Invalid(code),
                };
                let mask = (1u64 << (8 * u32::from(size))) - 1;
                Event::PortIo {
                    port: (info1 >> ioio::PORT_SHIFT) as u16,
                    size,
                    write: info1 & ioio::IN == 0,
                    value: (v.rax & mask) as u32,
                }
            }
            // EXITINFO1 = the #PF-style error code (§15.25.6): bit 1 write, bit 4 fetch.
            exit::NPF => Event::MmioFault {
                gpa: info2,
                write: info1 & 2 != 0,
                fetch: info1 & 16 != 0,
            },
            exit::HLT => Event::Halt,
            exit::SHUTDOWN => Event::TripleFault,
            exit::MSR => Event::Forbidden {
                what: if info1 & 1 == 0 { "rdmsr" } else { "wrmsr" },
                detail: vcpu.gprs.rcx & 0xffff_ffff,
            },
            exit::VMRUN => forbidden("vmrun"),
            exit::VMLOAD => forbidden("vmload"),
            exit::VMSAVE => forbidden("vmsave"),
            exit::STGI => forbidden("stgi"),
            exit::CLGI => forbidden("clgi"),
            exit::SKINIT => forbidden("skinit"),
            exit::INVLPGA => forbidden("invlpga"),
            exit::INVD => forbidden("invd"),
            exit::XSETBV => forbidden("xsetbv"),
            exit::MONITOR => forbidden("monitor"),
            exit::MWAIT => forbidden("mwait"),
            exit::ICEBP => forbidden("icebp"),
            exit::TASK_SWITCH => forbidden("task switch"),
            c if (exit::EXCP_BASE..exit::EXCP_BASE + 32).contains(&c) => {
                Event::UnexpectedException {
                    vector: (c - exit::EXCP_BASE) as u8,
                    error_code: info1,
                }
            }
            other => Event::Invalid(other),
        }
    }
}

impl Backend for Svm {
    type Vm = SvmVm;
    type Vcpu = SvmVcpu;

    const SMP: bool = true;

    fn for_this_cpu() -> Result<Svm, &'static str> {
        // EFER.SVME and the host save area are per CPU (`enable_this_cpu`, done at bring-up);
        // the permission maps are this backend's own copy, freed when it is dropped.
        Svm::probe()
    }

    fn name(&self) -> &'static str {
        "svm"
    }

    fn create_vm(&mut self, memory: &GuestMemory) -> Result<SvmVm, VcpuError> {
        // 47 input bits: the format models the lower canonical half, and guest RAM is far
        // below 128 TiB (nested page tables themselves would take 48 bits, APM §15.25.5).
        let mut cfg = Config::new(47, self.phys_bits);
        cfg.execute_control = true;
        let npt = PageTable::<X86FirstStage<4>>::new(&NPT_MEMORY, cfg)
            .map_err(|_| VcpuError::NoMemory)?;
        for r in memory.regions() {
            if npt
                .map(
                    &NPT_MEMORY,
                    r.gpa,
                    r.pa(),
                    r.len(),
                    Prot::READ | Prot::WRITE | Prot::EXEC,
                )
                .is_err()
            {
                npt.destroy(&NPT_MEMORY);
                return Err(VcpuError::Map);
            }
        }
        let Some(asid) = self.alloc_asid() else {
            npt.destroy(&NPT_MEMORY);
            return Err(VcpuError::NoAsid);
        };
        Ok(SvmVm { npt, asid })
    }

    fn map_device_memory(
        &mut self,
        vm: &SvmVm,
        gpa: u64,
        hpa: u64,
        len: u64,
    ) -> Result<(), VcpuError> {
        // UC in the nested table (PCD|PWT, PAT entry 3): the combined type with the guest's
        // own is then UC whatever the guest maps (APM vol 2 §15.25, nested-paging memory types),
        // as MMIO requires.
        vm.npt
            .map(
                &NPT_MEMORY,
                gpa,
                hpa,
                len,
                Prot::READ | Prot::WRITE | Prot::DEVICE,
            )
            .map_err(|_| VcpuError::Map)
    }

    fn create_vcpu(&mut self, vm: &SvmVm, s: &EntryState) -> Result<SvmVcpu, VcpuError> {
        let mut v = Vmcb::new().ok_or(VcpuError::NoMemory)?;
        v.set_intercepts(
            EXCEPTION_INTERCEPTS,
            intercept::INTR
                | intercept::CPUID
                | intercept::INVD
                | intercept::HLT
                | intercept::INVLPGA
                | intercept::IOIO_PROT
                | intercept::MSR_PROT
                | intercept::TASK_SWITCH
                | intercept::SHUTDOWN,
            intercept::VMRUN
                | intercept::VMMCALL
                | intercept::VMLOAD
                | intercept::VMSAVE
                | intercept::STGI
                | intercept::CLGI
                | intercept::SKINIT
                | intercept::ICEBP
                | intercept::MONITOR
                | intercept::MWAIT
                | intercept::XSETBV,
        );
        v.set_permission_maps(&self.maps);
        v.set_asid(vm.asid, true);
        v.set_virtual_interrupt_masking();
        v.set_nested_paging(&vm.npt);
        // Flat 64-bit segments matching the GDT the loader wrote (selector 0x08 code, 0x10 data):
        // attributes in VMCB format (§15.5.1): code P|S|type 0xB|L|G, data P|S|type 3|D/B|G.
        v.set_segments(
            Segment {
                selector: 0x08,
                attrib: 0xa9b,
                limit: 0xffff_ffff,
                base: 0,
            },
            Segment {
                selector: 0x10,
                attrib: 0xc93,
                limit: 0xffff_ffff,
                base: 0,
            },
        );
        // A busy 64-bit TSS and an empty LDT: never used by a guest that stays at CPL 0
        // without IST, but VMRUN loads them and they must be well-formed.
        v.set_tr(Segment {
            selector: 0,
            attrib: 0x08b,
            limit: 0x67,
            base: 0,
        });
        v.set_ldtr(Segment {
            selector: 0,
            attrib: 0x082,
            limit: 0,
            base: 0,
        });
        v.set_gdtr(s.gdt.0, s.gdt.1);
        v.set_idtr(0, 0);
        v.set_control_registers(GUEST_CR0, s.page_table, GUEST_CR4, GUEST_EFER);
        v.set_debug_registers(0xffff_0ff0, 0x400);
        v.set_guest_pat(GUEST_PAT);
        // IF = 1: with V_INTR_MASKING the guest's IF gates only virtual interrupts, which no
        // guest is ever given, so physical interrupts still reach the hypervisor as INTR exits
        // under the host's IF (APM vol 2 §15.21.1). IF = 0 would be just as correct, but Bochs
        // 2.7 (`ryzen`) then masks the physical interrupt for as long as the guest runs, and a
        // spinning guest is never preempted there (observed: no INTR exit ever comes).
        v.set_rflags(0x202);
        v.set_rip(s.entry);
        v.set_rsp(s.stack);
        v.set_rax(0);
        Ok(SvmVcpu {
            vmcb: v,
            gprs: GuestGprs {
                rdi: s.arg,
                rsi: s.vcpu.into(),
                ..GuestGprs::default()
            },
            first_run: true,
            flush_set: false,
            exit: ExitState::default(),
            // A fresh VMCB is zero: EVENTINJ is 0.
            injecting: false,
            index: s.vcpu,
            apic: None,
            halted: false,
            // `set_virtual_interrupt_masking` left V_IRQ clear.
            virq: None,
        })
    }

    fn run(&mut self, vm: &SvmVm, vcpu: &mut SvmVcpu) -> Exit {
        let ticks = crate::arch::apic::ticks();
        loop {
            if vcpu.halted && !Self::wait_while_halted(vcpu, ticks) {
                // The time slice ended while it waited: the scheduler decides what runs next.
                return Exit {
                    pc: vcpu.exit.rip,
                    event: Event::Preempted,
                };
            }
            Self::prepare_interrupts(vcpu, self.delivery);
            let pa = vcpu.vmcb.pa();
            let switched = self
                .last_vcpu
                .get_mut(vm.asid as usize)
                .is_some_and(|last| core::mem::replace(last, pa) != pa);
            let flush = vcpu.first_run || switched;
            if flush || vcpu.flush_set {
                vcpu.vmcb.set_asid(vm.asid, flush);
                vcpu.flush_set = flush;
                vcpu.first_run = false;
            }
            asm::vmrun(self.cpu, &mut vcpu.vmcb, &mut vcpu.gprs);
            vcpu.exit = vcpu.vmcb.exit_state();
            if vcpu.exit.code == exit::INTR {
                asm::take_interrupt(self.cpu);
            }
            Self::sync_virtual_irq(vcpu, self.delivery);
            if vcpu.exit.code == exit::CPUID {
                self.emulate_cpuid(vcpu);
                continue;
            }
            if vcpu.apic.is_some() {
                match vcpu.exit.code {
                    // Delivery::EventInjection: the guest can take the offered V_IRQ now; it
                    // is injected at the entry.
                    exit::VINTR => {
                        VINTR_EXITS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    exit::MSR => match self.apic_msr(vcpu) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            return Exit {
                                pc: vcpu.exit.rip,
                                event: Event::Forbidden {
                                    what: match e {
                                        ApicError::Unknown(_) => "x2apic register access",
                                        ApicError::ReadOnly(_) => {
                                            "write to a read-only x2apic register"
                                        }
                                        ApicError::Ipi(_) => "ipi to another cpu",
                                    },
                                    detail: vcpu.gprs.rcx & 0xffff_ffff,
                                },
                            };
                        }
                    },
                    // HLT with the virtual APIC enabled and IF = 1: wait for its next
                    // interrupt. With IF = 0, or the APIC off, nothing can wake it: surfaced.
                    exit::HLT
                        if vcpu.vmcb.interrupts_enabled()
                            && vcpu.apic.as_ref().is_some_and(|(a, _)| a.enabled()) =>
                    {
                        let next = self.next_rip(vcpu, 1);
                        vcpu.vmcb.set_rax_rip(vcpu.exit.rax, next);
                        vcpu.vmcb.clear_interrupt_shadow();
                        vcpu.halted = true;
                        continue;
                    }
                    _ => {}
                }
            }
            return Exit {
                pc: vcpu.exit.rip,
                event: Self::decode(vcpu),
            };
        }
    }

    fn bind_interrupts(&mut self, vcpu: &mut SvmVcpu, slot: usize) -> bool {
        vcpu.apic = Some((VirtualLapic::new(vcpu.index), slot));
        if vcpu.virq.take().is_some() {
            vcpu.vmcb.set_virtual_irq(None, false);
        }
        true
    }

    fn complete_hypercall(&mut self, vcpu: &mut SvmVcpu, result: u64) {
        // VMMCALL is 0F 01 D9.
        let next = self.next_rip(vcpu, 3);
        vcpu.vmcb.set_rax_rip(result, next);
    }

    fn complete_mmio(&mut self, _vcpu: &mut SvmVcpu, _value: Option<u64>) {
        // SVM on QEMU has no decode assists: `run` never reports `Event::MmioAccess`, so there
        // is nothing to complete (an NPF is always `MmioFault`).
    }

    fn complete_port_io(&mut self, vcpu: &mut SvmVcpu, size: u8, value: Option<u32>) {
        // IN to AL/AX keeps the rest of RAX; IN to EAX zero-extends into RAX (64-bit mode).
        let rax = vcpu.exit.rax;
        let rax = match (value, size) {
            (None, _) => rax,
            (Some(v), 1) => (rax & !0xff) | u64::from(v & 0xff),
            (Some(v), 2) => (rax & !0xffff) | u64::from(v & 0xffff),
            (Some(v), _) => u64::from(v),
        };
        // Without NRIPS, EXITINFO2 of an IOIO intercept is the next RIP (APM vol 2 §15.10.2).
        let next = if self.nrips {
            vcpu.exit.next_rip
        } else {
            vcpu.exit.info2
        };
        vcpu.vmcb.set_rax_rip(rax, next);
    }

    fn destroy_vm(&mut self, vm: SvmVm) {
        self.free_asid(vm.asid);
        vm.npt.destroy(&NPT_MEMORY);
    }

    fn destroy_vcpu(&mut self, vcpu: SvmVcpu) {
        drop(vcpu);
    }
}

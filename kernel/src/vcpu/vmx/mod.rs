//! The Intel VMX backend of the vCPU interface (Intel SDM vol 3C chapters 24-31), with EPT and
//! VPID.
//!
//! - Bring-up ([`Vmx::probe`]): CPUID 1 ECX.VMX, IA32_VMX_BASIC (VMCS revision, TRUE controls,
//!   no 32-bit address limit), IA32_VMX_EPT_VPID_CAP (4-level walks, write-back, INVEPT and
//!   INVVPID all-context), the control settings checked against the allowed-0/allowed-1 halves
//!   of the (TRUE) capability MSRs (Appendix A.3-A.5), then IA32_FEATURE_CONTROL, the CR0/CR4
//!   fixed bits and VMXON ([`asm::vmxon`]).
//! - One VPID per VM (1..=255; 0 is the host's, §28.1). A VMCS's first entry invalidates every
//!   EPT- and VPID-tagged translation (INVEPT/INVVPID all-context), so a VPID or EPT root reused
//!   after a guest was destroyed never sees the old guest's translations; so does running a
//!   vCPU right after another vCPU of the same VM (same VPID, different guest-linear state).
//! - EPT tables built by the page-table engine's VT-d second-stage format ([`VtdSecondStage`]):
//!   EPT entries have the same layout (SDM §29.3.2, Tables 29-1..29-6: R/W/X in bits 0-2, the
//!   leaf memory type in bits 5:3, ignore-PAT bit 6, PS bit 7, A/D bits 8/9, address in 51:12,
//!   table entries with bits 7:3 zero). The engine writes EMT 6 (write-back) into RAM leaves and
//!   0 (uncacheable) into device leaves, both valid EPT memory types; it never sets a bit EPT
//!   reserves (SNP is only written with snoop control, which the backend leaves off).
//! - Controls: external-interrupt and NMI exiting (preemption by the local APIC timer, as on
//!   SVM), HLT, MWAIT, MONITOR and RDPMC exiting, unconditional I/O exiting (every port exits),
//!   no MSR bitmap (then every RDMSR/WRMSR exits, §25.1.3), EPT, VPID; exit to a 64-bit host
//!   with EFER and PAT switched; entry into IA-32e mode with EFER and PAT loaded. CPUID, VMCALL,
//!   INVD, XSETBV, GETSEC and every VMX instruction exit unconditionally (§25.1.2). Exceptions
//!   #DB, #AC and #MC exit (CVE-2015-8104 / CVE-2015-5307, as on SVM). The guest/host masks
//!   own the CR0/CR4 bits VMX fixes (PE, NE, PG, VMXE): the guest sees its entry values in the
//!   read shadows, and a write that would change an owned bit exits and stops it.
//! - RIP is advanced by the VM-exit instruction-length field (§27.2.5) for CPUID, VMCALL and
//!   port I/O.

pub mod asm;
pub mod vmcs;

use core::arch::x86_64::{__cpuid, __cpuid_count};

use iommu::pgtable::{Config, PageTable, Prot, VtdSecondStage};

use super::svm::NPT_MEMORY;
use super::{Backend, EntryState, Event, Exit, HypercallRegs, VcpuError};
use crate::guest::memory::GuestMemory;
use asm::{GuestGprs, VmxOn, rdmsr, vmread, vmwrite};
use vmcs::{Vmcs, field};

/// Basic exit reasons (SDM Appendix C).
mod reason {
    pub const EXCEPTION_NMI: u64 = 0;
    pub const EXTERNAL_INTERRUPT: u64 = 1;
    pub const TRIPLE_FAULT: u64 = 2;
    pub const TASK_SWITCH: u64 = 9;
    pub const CPUID: u64 = 10;
    pub const GETSEC: u64 = 11;
    pub const HLT: u64 = 12;
    pub const INVD: u64 = 13;
    pub const RDPMC: u64 = 15;
    pub const VMCALL: u64 = 18;
    pub const VMCLEAR: u64 = 19;
    pub const VMLAUNCH: u64 = 20;
    pub const VMPTRLD: u64 = 21;
    pub const VMPTRST: u64 = 22;
    pub const VMREAD: u64 = 23;
    pub const VMRESUME: u64 = 24;
    pub const VMWRITE: u64 = 25;
    pub const VMXOFF: u64 = 26;
    pub const VMXON: u64 = 27;
    pub const CR_ACCESS: u64 = 28;
    pub const IO: u64 = 30;
    pub const RDMSR: u64 = 31;
    pub const WRMSR: u64 = 32;
    pub const MWAIT: u64 = 36;
    pub const MONITOR: u64 = 39;
    pub const EPT_VIOLATION: u64 = 48;
    pub const INVEPT: u64 = 50;
    pub const PREEMPTION_TIMER: u64 = 52;
    pub const INVVPID: u64 = 53;
    pub const XSETBV: u64 = 55;
    pub const VMFUNC: u64 = 59;
    /// Bit 31 of the exit-reason field: VM entry failed (invalid guest state, MSR loading).
    pub const ENTRY_FAILURE: u64 = 1 << 31;
}

/// Control bits (SDM §25.6).
mod ctl {
    pub const PIN_EXTERNAL_INTERRUPT: u32 = 1 << 0;
    pub const PIN_NMI: u32 = 1 << 3;
    pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
    pub const PROC_HLT: u32 = 1 << 7;
    pub const PROC_MWAIT: u32 = 1 << 10;
    pub const PROC_RDPMC: u32 = 1 << 11;
    pub const PROC_UNCONDITIONAL_IO: u32 = 1 << 24;
    pub const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const PROC_MONITOR: u32 = 1 << 29;
    pub const PROC_SECONDARY: u32 = 1 << 31;
    pub const PROC2_EPT: u32 = 1 << 1;
    pub const PROC2_VPID: u32 = 1 << 5;
    pub const EXIT_HOST_64: u32 = 1 << 9;
    pub const EXIT_ACK_INTERRUPT: u32 = 1 << 15;
    pub const EXIT_SAVE_PAT: u32 = 1 << 18;
    pub const EXIT_LOAD_PAT: u32 = 1 << 19;
    pub const EXIT_SAVE_EFER: u32 = 1 << 20;
    pub const EXIT_LOAD_EFER: u32 = 1 << 21;
    pub const EXIT_SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
    pub const ENTRY_IA32E: u32 = 1 << 9;
    pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
    pub const ENTRY_LOAD_EFER: u32 = 1 << 15;
}

/// Capability MSRs (SDM Appendix A).
mod msr {
    pub const BASIC: u32 = 0x480;
    pub const PINBASED: u32 = 0x481;
    pub const PROCBASED: u32 = 0x482;
    pub const EXIT: u32 = 0x483;
    pub const ENTRY: u32 = 0x484;
    pub const MISC: u32 = 0x485;
    pub const CR0_FIXED0: u32 = 0x486;
    pub const CR4_FIXED0: u32 = 0x488;
    pub const PROCBASED2: u32 = 0x48b;
    pub const EPT_VPID_CAP: u32 = 0x48c;
    pub const TRUE_PINBASED: u32 = 0x48d;
    pub const TRUE_PROCBASED: u32 = 0x48e;
    pub const TRUE_EXIT: u32 = 0x48f;
    pub const TRUE_ENTRY: u32 = 0x490;
}

/// IA32_VMX_EPT_VPID_CAP bits (Appendix A.10).
mod cap {
    pub const WALK_4: u64 = 1 << 6;
    pub const WB: u64 = 1 << 14;
    pub const PDE_2M: u64 = 1 << 16;
    pub const PDPTE_1G: u64 = 1 << 17;
    pub const INVEPT: u64 = 1 << 20;
    pub const INVEPT_ALL: u64 = 1 << 26;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_ALL: u64 = 1 << 42;
}

/// Exceptions that exit: #DB (1), #AC (17), #MC (18).
const EXCEPTION_BITMAP: u64 = 1 << 1 | 1 << 17 | 1 << 18;

/// Most VPIDs handed out (the bitmap size).
const MAX_VPIDS: u32 = 256;

/// Guest control state at entry (docs/guests.md), as the guest sees it: CR0 = PG|WP|NE|ET|MP|PE,
/// CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER = NXE|LMA|LME. The CR4 the processor runs with adds the
/// VMX-fixed VMXE, hidden behind the read shadow.
const GUEST_CR0: u64 = 1 << 31 | 1 << 16 | 1 << 5 | 1 << 4 | 1 << 1 | 1;
const GUEST_CR4: u64 = 1 << 5 | 1 << 9 | 1 << 10;
const GUEST_EFER: u64 = 1 << 11 | 1 << 10 | 1 << 8;
/// The PAT power-on value (WB, WT, UC-, UC, ...).
const GUEST_PAT: u64 = 0x0007_0406_0007_0406;

/// Access rights in VMCS format (§24.4.1): type, S, DPL, P, AVL, L, D/B, G, unusable (bit 16).
const AR_CODE64: u64 = 0xa09b;
const AR_DATA: u64 = 0xc093;
const AR_TSS64_BUSY: u64 = 0x008b;
const AR_UNUSABLE: u64 = 1 << 16;

/// What the CPU offers, read from CPUID and the capability MSRs without switching anything on.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub revision: u32,
    pub true_controls: bool,
    pub ept_vpid: u64,
    pub unrestricted: bool,
    /// The VMX-preemption timer counts down every 2^rate TSC ticks (IA32_VMX_MISC 4:0), when
    /// the CPU has it and can save its value at exit.
    pub preemption_timer_rate: Option<u32>,
    pin: u32,
    proc: u32,
    proc2: u32,
    exit: u32,
    entry: u32,
    cr0_fixed0: u64,
    cr4_fixed0: u64,
}

/// `want | allowed-0`, or an error naming what the CPU cannot set (SDM Appendix A.3).
fn adjust(msr: u32, want: u32, what: &'static str) -> Result<u32, &'static str> {
    let v = rdmsr(msr).ok_or(what)?;
    let (allowed0, allowed1) = (v as u32, (v >> 32) as u32);
    if want & !allowed1 != 0 {
        return Err(what);
    }
    Ok(want | allowed0)
}

/// Reads and checks the VMX capabilities; the reason when this CPU cannot run the backend.
pub fn capabilities() -> Result<Caps, &'static str> {
    if __cpuid(1).ecx & (1 << 5) == 0 {
        return Err("CPU has no VMX (CPUID 1 ECX.VMX = 0)");
    }
    let basic = rdmsr(msr::BASIC).ok_or("IA32_VMX_BASIC unreadable")?;
    if basic & (1 << 48) != 0 {
        return Err("VMX limits VMCS addresses to 32 bits (IA32_VMX_BASIC bit 48)");
    }
    let true_controls = basic & (1 << 55) != 0;
    let pick = |plain, true_msr| if true_controls { true_msr } else { plain };
    let proc = adjust(
        pick(msr::PROCBASED, msr::TRUE_PROCBASED),
        ctl::PROC_HLT
            | ctl::PROC_MWAIT
            | ctl::PROC_RDPMC
            | ctl::PROC_UNCONDITIONAL_IO
            | ctl::PROC_MONITOR
            | ctl::PROC_SECONDARY,
        "VMX lacks a required processor-based control (HLT/MWAIT/MONITOR/RDPMC/I/O exiting, secondary controls)",
    )?;
    if proc & ctl::PROC_USE_MSR_BITMAPS != 0 {
        return Err("VMX forces MSR bitmaps on");
    }
    let proc2_allowed = rdmsr(msr::PROCBASED2).unwrap_or(0) >> 32;
    let proc2 = adjust(
        msr::PROCBASED2,
        ctl::PROC2_EPT | ctl::PROC2_VPID,
        "VMX without EPT and VPID (IA32_VMX_PROCBASED_CTLS2)",
    )?;
    // The VMX-preemption timer as a second end of the time slice, beside the APIC timer: it
    // counts only while the guest runs and needs no interrupt delivery (Bochs 2.7 does not
    // turn a pending APIC interrupt into an external-interrupt exit while the guest's RFLAGS.IF
    // is 0, which hardware does, SDM §26.2). Used when both the pin control and saving its
    // value at exit are allowed, so a slice keeps counting across hypercall exits.
    let pin_msr = pick(msr::PINBASED, msr::TRUE_PINBASED);
    let exit_msr = pick(msr::EXIT, msr::TRUE_EXIT);
    let allowed1 = |m| rdmsr(m).unwrap_or(0) >> 32;
    let timer = allowed1(pin_msr) & u64::from(ctl::PIN_PREEMPTION_TIMER) != 0
        && allowed1(exit_msr) & u64::from(ctl::EXIT_SAVE_PREEMPTION_TIMER) != 0;
    let pin = adjust(
        pin_msr,
        ctl::PIN_EXTERNAL_INTERRUPT
            | ctl::PIN_NMI
            | if timer { ctl::PIN_PREEMPTION_TIMER } else { 0 },
        "VMX lacks external-interrupt or NMI exiting",
    )?;
    let exit = adjust(
        exit_msr,
        ctl::EXIT_HOST_64
            | ctl::EXIT_SAVE_PAT
            | ctl::EXIT_LOAD_PAT
            | ctl::EXIT_SAVE_EFER
            | ctl::EXIT_LOAD_EFER
            | if timer {
                ctl::EXIT_SAVE_PREEMPTION_TIMER
            } else {
                0
            },
        "VMX cannot exit to a 64-bit host with EFER and PAT switched",
    )?;
    if exit & ctl::EXIT_ACK_INTERRUPT != 0 {
        return Err("VMX forces acknowledge-interrupt-on-exit");
    }
    let entry = adjust(
        pick(msr::ENTRY, msr::TRUE_ENTRY),
        ctl::ENTRY_IA32E | ctl::ENTRY_LOAD_PAT | ctl::ENTRY_LOAD_EFER,
        "VMX cannot enter a 64-bit guest with EFER and PAT loaded",
    )?;
    let ept_vpid = rdmsr(msr::EPT_VPID_CAP).unwrap_or(0);
    let need =
        cap::WALK_4 | cap::WB | cap::INVEPT | cap::INVEPT_ALL | cap::INVVPID | cap::INVVPID_ALL;
    if ept_vpid & need != need {
        return Err(
            "EPT without 4-level walks, write-back tables or all-context INVEPT/INVVPID (IA32_VMX_EPT_VPID_CAP)",
        );
    }
    Ok(Caps {
        revision: (basic & 0x7fff_ffff) as u32,
        true_controls,
        ept_vpid,
        unrestricted: proc2_allowed & (1 << 7) != 0,
        preemption_timer_rate: timer.then(|| (rdmsr(msr::MISC).unwrap_or(0) & 0x1f) as u32),
        pin,
        proc,
        proc2,
        exit,
        entry,
        cr0_fixed0: rdmsr(msr::CR0_FIXED0).unwrap_or(0),
        cr4_fixed0: rdmsr(msr::CR4_FIXED0).unwrap_or(0),
    })
}

/// The backend: VMX root operation on the boot CPU.
pub struct Vmx {
    cpu: VmxOn,
    caps: Caps,
    vpids_used: [u64; (MAX_VPIDS / 64) as usize],
    phys_bits: u32,
    /// The VMCS (by address) that ran last: another vCPU running means a new time slice.
    last_run: u64,
    /// By VPID, the VMCS (by address) of the vCPU that ran last with it on this CPU.
    last_vcpu: [u64; MAX_VPIDS as usize],
}

/// A VM: its EPT table and VPID.
pub struct VmxVm {
    ept: PageTable<VtdSecondStage<4>>,
    vpid: u16,
}

/// A vCPU: its VMCS and the registers VM entry does not load.
pub struct VmxVcpu {
    vmcs: Vmcs,
    gprs: GuestGprs,
    launched: bool,
    /// The RIP after the instruction of the last exit (RIP + exit instruction length).
    next_rip: u64,
    /// A RIP to write before the next entry (a finished hypercall or port access).
    resume_at: Option<u64>,
    /// The last exit ended its time slice: the next entry starts a new one.
    slice_over: bool,
}

impl Vmx {
    /// Brings VMX up on the calling CPU, or says why this machine has no VMX backend.
    pub fn probe() -> Result<Vmx, &'static str> {
        let caps = capabilities()?;
        let phys_bits = if __cpuid(0x8000_0000).eax >= 0x8000_0008 {
            __cpuid(0x8000_0008).eax & 0xff
        } else {
            36
        };
        let region = Vmcs::new(caps.revision).ok_or("out of memory for the VMXON region")?;
        let cpu = asm::vmxon(region.into_frames())?;
        Ok(Vmx {
            cpu,
            caps,
            vpids_used: [1, 0, 0, 0], // VPID 0: the host
            phys_bits,
            last_run: 0,
            last_vcpu: [0; MAX_VPIDS as usize],
        })
    }

    /// Number of VPIDs the backend hands out (VPID 0, the host's, included).
    pub fn asids(&self) -> u32 {
        MAX_VPIDS
    }

    fn alloc_vpid(&mut self) -> Option<u16> {
        let v =
            (1..MAX_VPIDS).find(|&a| self.vpids_used[(a / 64) as usize] & (1 << (a % 64)) == 0)?;
        self.vpids_used[(v / 64) as usize] |= 1 << (v % 64);
        Some(v as u16)
    }

    fn free_vpid(&mut self, vpid: u16) {
        let v = u32::from(vpid);
        if v != 0 && v < MAX_VPIDS {
            self.vpids_used[(v / 64) as usize] &= !(1 << (v % 64));
        }
    }

    /// Writes every VMCS field of a fresh vCPU (the VMCS is current). False if the processor
    /// refused a field.
    fn write_initial_state(&self, vm: &VmxVm, s: &EntryState) -> bool {
        let cpu = &self.cpu;
        let c = &self.caps;
        let host = asm::host_regs();
        let Some(tss) = crate::arch::tss_base() else {
            return false;
        };
        let m = |msr| rdmsr(msr).unwrap_or(0);
        let eptp = vm.ept.root() | 6 | 3 << 3; // write-back, 4-level walk (§25.6.11)
        let mut ok = true;
        let mut w = |f: u32, v: u64| ok &= vmwrite(cpu, f, v);
        // Controls.
        w(field::PIN_CONTROLS, c.pin.into());
        w(field::PROC_CONTROLS, c.proc.into());
        w(field::PROC2_CONTROLS, c.proc2.into());
        w(field::EXIT_CONTROLS, c.exit.into());
        w(field::ENTRY_CONTROLS, c.entry.into());
        w(field::EXCEPTION_BITMAP, EXCEPTION_BITMAP);
        w(field::EPT_POINTER, eptp);
        w(field::VPID, vm.vpid.into());
        w(field::CR0_MASK, c.cr0_fixed0);
        w(field::CR0_SHADOW, GUEST_CR0);
        w(field::CR4_MASK, c.cr4_fixed0);
        w(field::CR4_SHADOW, GUEST_CR4);
        // Host state (§26.2.3): this CPU as it is now.
        w(field::HOST_CR0, host.cr0);
        w(field::HOST_CR3, host.cr3);
        w(field::HOST_CR4, host.cr4);
        // RPL and TI of host selectors must be 0 (§26.2.3); the hypervisor's are.
        w(field::HOST_ES_SEL, u64::from(host.es & !7));
        w(field::HOST_CS_SEL, u64::from(host.cs & !7));
        w(field::HOST_SS_SEL, u64::from(host.ss & !7));
        w(field::HOST_DS_SEL, u64::from(host.ds & !7));
        w(field::HOST_FS_SEL, u64::from(host.fs & !7));
        w(field::HOST_GS_SEL, u64::from(host.gs & !7));
        w(field::HOST_TR_SEL, u64::from(host.tr & !7));
        w(field::HOST_FS_BASE, m(asm::MSR_FS_BASE));
        w(field::HOST_GS_BASE, m(asm::MSR_GS_BASE));
        w(field::HOST_TR_BASE, tss);
        w(field::HOST_GDTR_BASE, cpu.gdt_base());
        w(field::HOST_IDTR_BASE, cpu.idt_base());
        w(field::HOST_SYSENTER_CS, m(asm::MSR_SYSENTER_CS));
        w(field::HOST_SYSENTER_ESP, m(asm::MSR_SYSENTER_ESP));
        w(field::HOST_SYSENTER_EIP, m(asm::MSR_SYSENTER_EIP));
        w(field::HOST_EFER, m(asm::MSR_EFER));
        w(field::HOST_PAT, m(asm::MSR_PAT));
        w(field::HOST_RIP, asm::exit_entry());
        // Guest state (§26.3.1): flat 64-bit segments matching the GDT the loader wrote
        // (selector 0x08 code, 0x10 data), a busy 64-bit TSS and an unusable LDTR.
        for i in 0..8 {
            let (sel, ar, limit) = match i {
                1 => (0x08, AR_CODE64, 0xffff_ffff),
                6 => (0, AR_UNUSABLE, 0),
                7 => (0, AR_TSS64_BUSY, 0x67),
                _ => (0x10, AR_DATA, 0xffff_ffff),
            };
            w(field::segment(i, field::GUEST_ES_SEL), sel);
            w(field::segment(i, field::GUEST_ES_LIMIT), limit);
            w(field::segment(i, field::GUEST_ES_AR), ar);
            w(field::segment(i, field::GUEST_ES_BASE), 0);
        }
        debug_assert_eq!(field::segment(7, field::GUEST_ES_SEL), field::GUEST_TR_SEL);
        w(field::GUEST_GDTR_BASE, s.gdt.0);
        w(field::GUEST_GDTR_LIMIT, s.gdt.1.into());
        w(field::GUEST_IDTR_BASE, 0);
        w(field::GUEST_IDTR_LIMIT, 0);
        w(field::GUEST_CR0, GUEST_CR0 | c.cr0_fixed0);
        w(field::GUEST_CR3, s.page_table);
        w(field::GUEST_CR4, GUEST_CR4 | c.cr4_fixed0);
        w(field::GUEST_EFER, GUEST_EFER);
        w(field::GUEST_PAT, GUEST_PAT);
        w(field::GUEST_DEBUGCTL, 0);
        w(field::GUEST_DR7, 0x400);
        w(field::GUEST_RFLAGS, 0x2);
        w(field::GUEST_RIP, s.entry);
        w(field::GUEST_RSP, s.stack);
        w(field::GUEST_SYSENTER_CS, 0);
        w(field::GUEST_SYSENTER_ESP, 0);
        w(field::GUEST_SYSENTER_EIP, 0);
        w(field::GUEST_INTERRUPTIBILITY, 0);
        w(field::GUEST_ACTIVITY, 0);
        w(field::GUEST_PENDING_DEBUG, 0);
        // No shadow VMCS: the link pointer must be all ones (§26.3.1.5).
        w(field::VMCS_LINK_POINTER, u64::MAX);
        ok
    }

    /// CPUID as the guest sees it: the host's, with the hypervisor-present bit set and the
    /// features the guest cannot use hidden (VMX and SVM, x2APIC: its MSRs all exit), as on SVM.
    fn emulate_cpuid(vcpu: &mut VmxVcpu) {
        let leaf = vcpu.gprs.rax as u32;
        let sub = vcpu.gprs.rcx as u32;
        let zero = core::arch::x86_64::CpuidResult {
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        };
        let mut r = if (0x4000_0000..0x5000_0000).contains(&leaf) {
            zero
        } else {
            __cpuid_count(leaf, sub)
        };
        match leaf {
            1 => r.ecx = (r.ecx | 1 << 31) & !(1 << 5 | 1 << 21),
            0x8000_0001 => r.ecx &= !(1 << 2),
            0x8000_000a => r = zero,
            _ => {}
        }
        vcpu.gprs.rax = r.eax.into();
        vcpu.gprs.rbx = r.ebx.into();
        vcpu.gprs.rcx = r.ecx.into();
        vcpu.gprs.rdx = r.edx.into();
    }

    fn decode(&self, vcpu: &VmxVcpu, code: u64) -> Event {
        let cpu = &self.cpu;
        let qual = vmread(cpu, field::EXIT_QUALIFICATION);
        let forbidden = |what| Event::Forbidden { what, detail: 0 };
        match code {
            reason::EXTERNAL_INTERRUPT | reason::PREEMPTION_TIMER => Event::Preempted,
            reason::EXCEPTION_NMI => {
                // Interruption information (§24.9.2): vector 7:0, type 10:8 (2 = NMI).
                let info = vmread(cpu, field::EXIT_INTERRUPTION_INFO);
                if (info >> 8) & 7 == 2 {
                    Event::Preempted
                } else {
                    Event::UnexpectedException {
                        vector: info as u8,
                        error_code: if info & (1 << 11) != 0 {
                            vmread(cpu, field::EXIT_INTERRUPTION_ERROR)
                        } else {
                            0
                        },
                    }
                }
            }
            reason::VMCALL => Event::Hypercall(HypercallRegs {
                op: vcpu.gprs.rax,
                args: [vcpu.gprs.rbx, vcpu.gprs.rcx, vcpu.gprs.rdx],
            }),
            // Qualification (Table 28-5): size-1 in 2:0, bit 3 = IN, bit 4 = string, port in
            // 31:16. String forms would need guest-virtual memory access: not emulated.
            reason::IO if qual & (1 << 4) != 0 => Event::Forbidden {
                what: "string port I/O (ins/outs)",
                detail: (qual >> 16) & 0xffff,
            },
            reason::IO => {
                let size: u8 = match qual & 7 {
                    0 => 1,
                    1 => 2,
                    _ => 4,
                };
                let mask = if size == 4 {
                    u64::from(u32::MAX)
                } else {
                    (1u64 << (8 * size)) - 1
                };
                Event::PortIo {
                    port: (qual >> 16) as u16,
                    size,
                    write: qual & (1 << 3) == 0,
                    value: (vcpu.gprs.rax & mask) as u32,
                }
            }
            // Qualification (Table 28-7): bit 0 read, 1 write, 2 fetch; the GPA is its own field.
            reason::EPT_VIOLATION => Event::MmioFault {
                gpa: vmread(cpu, field::GUEST_PHYSICAL_ADDRESS),
                write: qual & 2 != 0,
                fetch: qual & 4 != 0,
            },
            reason::HLT => Event::Halt,
            reason::TRIPLE_FAULT => Event::TripleFault,
            reason::RDMSR => Event::Forbidden {
                what: "rdmsr",
                detail: vcpu.gprs.rcx & 0xffff_ffff,
            },
            reason::WRMSR => Event::Forbidden {
                what: "wrmsr",
                detail: vcpu.gprs.rcx & 0xffff_ffff,
            },
            // Qualification (Table 28-3): CR number 3:0, access type 5:4 (0 = MOV to CR).
            reason::CR_ACCESS => Event::Forbidden {
                what: "control register write changing a VMX-owned bit",
                detail: qual & 0xf,
            },
            reason::VMCLEAR => forbidden("vmclear"),
            reason::VMLAUNCH => forbidden("vmlaunch"),
            reason::VMPTRLD => forbidden("vmptrld"),
            reason::VMPTRST => forbidden("vmptrst"),
            reason::VMREAD => forbidden("vmread"),
            reason::VMRESUME => forbidden("vmresume"),
            reason::VMWRITE => forbidden("vmwrite"),
            reason::VMXOFF => forbidden("vmxoff"),
            reason::VMXON => forbidden("vmxon"),
            reason::INVEPT => forbidden("invept"),
            reason::INVVPID => forbidden("invvpid"),
            reason::VMFUNC => forbidden("vmfunc"),
            reason::GETSEC => forbidden("getsec"),
            reason::INVD => forbidden("invd"),
            reason::RDPMC => forbidden("rdpmc"),
            reason::XSETBV => forbidden("xsetbv"),
            reason::MONITOR => forbidden("monitor"),
            reason::MWAIT => forbidden("mwait"),
            reason::TASK_SWITCH => forbidden("task switch"),
            other => Event::Invalid(other),
        }
    }
}

impl Backend for Vmx {
    type Vm = VmxVm;
    type Vcpu = VmxVcpu;

    // VMXON is done on the boot CPU only (docs/smp.md): guests stay there.
    const SMP: bool = false;

    fn for_this_cpu() -> Result<Vmx, &'static str> {
        Err("the VMX backend runs guests on the boot CPU only")
    }

    fn name(&self) -> &'static str {
        "vmx"
    }

    fn create_vm(&mut self, memory: &GuestMemory) -> Result<VmxVm, VcpuError> {
        // 48 input bits: a 4-level EPT walk (§29.3.2). Large leaves only where EPT_VPID_CAP
        // allows them; the granule is always allowed.
        let mut cfg = Config::new(48, self.phys_bits);
        cfg.execute_control = true;
        cfg.memory_types = true;
        cfg.leaf_sizes = 1 << 12;
        if self.caps.ept_vpid & cap::PDE_2M != 0 {
            cfg.leaf_sizes |= 1 << 21;
        }
        if self.caps.ept_vpid & cap::PDPTE_1G != 0 {
            cfg.leaf_sizes |= 1 << 30;
        }
        let ept = PageTable::<VtdSecondStage<4>>::new(&NPT_MEMORY, cfg)
            .map_err(|_| VcpuError::NoMemory)?;
        for r in memory.regions() {
            let prot = Prot::READ | Prot::WRITE | Prot::EXEC;
            if ept.map(&NPT_MEMORY, r.gpa, r.pa(), r.len(), prot).is_err() {
                ept.destroy(&NPT_MEMORY);
                return Err(VcpuError::Map);
            }
        }
        let Some(vpid) = self.alloc_vpid() else {
            ept.destroy(&NPT_MEMORY);
            return Err(VcpuError::NoAsid);
        };
        Ok(VmxVm { ept, vpid })
    }

    fn map_device_memory(
        &mut self,
        vm: &VmxVm,
        gpa: u64,
        hpa: u64,
        len: u64,
    ) -> Result<(), VcpuError> {
        // EPT memory type 0 (UC) in the leaf without ignore-PAT: UC wins over any guest PAT
        // type (SDM §12.11.7.2 / Table 12-7 style combination), as MMIO requires.
        vm.ept
            .map(
                &NPT_MEMORY,
                gpa,
                hpa,
                len,
                Prot::READ | Prot::WRITE | Prot::DEVICE,
            )
            .map_err(|_| VcpuError::Map)
    }

    fn create_vcpu(&mut self, vm: &VmxVm, s: &EntryState) -> Result<VmxVcpu, VcpuError> {
        let vmcs = Vmcs::new(self.caps.revision).ok_or(VcpuError::NoMemory)?;
        if !asm::vmclear(&self.cpu, &vmcs) || !asm::vmptrld(&self.cpu, &vmcs) {
            return Err(VcpuError::Control);
        }
        if !self.write_initial_state(vm, s) {
            let _ = asm::vmclear(&self.cpu, &vmcs);
            return Err(VcpuError::Control);
        }
        Ok(VmxVcpu {
            vmcs,
            gprs: GuestGprs {
                rdi: s.arg,
                rsi: s.vcpu.into(),
                ..GuestGprs::default()
            },
            launched: false,
            next_rip: s.entry,
            resume_at: None,
            slice_over: true,
        })
    }

    fn run(&mut self, vm: &VmxVm, vcpu: &mut VmxVcpu) -> Exit {
        loop {
            let new_slice = vcpu.slice_over || self.last_run != vcpu.vmcs.pa();
            vcpu.slice_over = false;
            self.last_run = vcpu.vmcs.pa();
            let cpu = &self.cpu;
            if !asm::vmptrld(cpu, &vcpu.vmcs) {
                return Exit {
                    pc: vcpu.next_rip,
                    event: Event::Invalid(u64::MAX),
                };
            }
            if let Some(rip) = vcpu.resume_at.take() {
                vmwrite(cpu, field::GUEST_RIP, rip);
            }
            // Another vCPU of this VM (same VPID, its own guest-linear translations) ran here
            // since this one did, or this VMCS was never entered: invalidate.
            let switched = self
                .last_vcpu
                .get_mut(usize::from(vm.vpid))
                .is_some_and(|last| core::mem::replace(last, vcpu.vmcs.pa()) != vcpu.vmcs.pa());
            if !vcpu.launched || switched {
                asm::flush_all_contexts(cpu);
            }
            // A new slice: the preemption timer starts from the full slice (the runner's
            // SLICE_TICKS, read as TSC ticks); within a slice it continues from the value the
            // last exit saved.
            if let Some(rate) = self.caps.preemption_timer_rate
                && new_slice
            {
                let ticks = u64::from(crate::guest::SLICE_TICKS >> rate.min(31)).max(1);
                vmwrite(cpu, field::GUEST_PREEMPTION_TIMER, ticks);
            }
            let entered = asm::vm_run(cpu, &vcpu.vmcs, &mut vcpu.gprs, vcpu.launched);
            let rip = vmread(cpu, field::GUEST_RIP);
            if !entered {
                // VMfailValid: the entry checks of §27.2 refused the controls or host state;
                // the error number is in the VM-instruction error field (§31.4).
                let err = vmread(cpu, field::VM_INSTRUCTION_ERROR);
                return Exit {
                    pc: rip,
                    event: Event::Invalid(1 << 32 | err),
                };
            }
            vcpu.launched = true;
            let code = vmread(cpu, field::EXIT_REASON);
            vcpu.next_rip = rip.wrapping_add(vmread(cpu, field::EXIT_INSTRUCTION_LEN));
            if code & reason::ENTRY_FAILURE != 0 {
                return Exit {
                    pc: rip,
                    event: Event::Invalid(code),
                };
            }
            let code = code & 0xffff;
            match code {
                reason::CPUID => {
                    Self::emulate_cpuid(vcpu);
                    vmwrite(cpu, field::GUEST_RIP, vcpu.next_rip);
                    continue;
                }
                // Either end of the slice: let the hypervisor's IDT take the APIC timer
                // interrupt if it is pending (it counts the ticks and sends EOI).
                reason::EXTERNAL_INTERRUPT | reason::PREEMPTION_TIMER => {
                    vcpu.slice_over = true;
                    asm::take_pending_interrupt();
                }
                _ => {}
            }
            return Exit {
                pc: rip,
                event: self.decode(vcpu, code),
            };
        }
    }

    fn complete_hypercall(&mut self, vcpu: &mut VmxVcpu, result: u64) {
        vcpu.gprs.rax = result;
        vcpu.resume_at = Some(vcpu.next_rip);
    }

    fn complete_mmio(&mut self, _vcpu: &mut Self::Vcpu, _value: Option<u64>) {
        // `run` reports an EPT violation as `Event::MmioFault` (no instruction decoding yet),
        // never `Event::MmioAccess`, so there is nothing to complete.
    }

    fn complete_port_io(&mut self, vcpu: &mut VmxVcpu, size: u8, value: Option<u32>) {
        if let Some(v) = value {
            // IN to AL/AX keeps the rest of RAX; IN to EAX zero-extends into RAX (64-bit mode).
            let rax = vcpu.gprs.rax;
            vcpu.gprs.rax = match size {
                1 => (rax & !0xff) | u64::from(v & 0xff),
                2 => (rax & !0xffff) | u64::from(v & 0xffff),
                _ => u64::from(v),
            };
        }
        vcpu.resume_at = Some(vcpu.next_rip);
    }

    fn destroy_vm(&mut self, vm: VmxVm) {
        self.free_vpid(vm.vpid);
        vm.ept.destroy(&NPT_MEMORY);
    }

    fn destroy_vcpu(&mut self, vcpu: VmxVcpu) {
        // VMCLEAR writes the processor's cached copy back and makes the VMCS inactive, so no
        // later write-back can land in the frame once it is somebody else's (§24.11.1).
        let _ = asm::vmclear(&self.cpu, &vcpu.vmcs);
        drop(vcpu);
    }
}

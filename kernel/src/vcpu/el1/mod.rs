//! The aarch64 backend of the vCPU interface: guests run at EL1 under the hypervisor's stage-2
//! translation (ARM DDI 0487, D8 "The AArch64 Virtual Memory System Architecture", stage 2 of
//! the EL1&0 regime), entered with `ERET` from non-VHE EL2.
//!
//! - Bring-up ([`El1::probe`]): CurrentEL = 2 with HCR_EL2.E2H = 0 (checked by the boot path),
//!   ID_AA64MMFR0_EL1.PARange for the stage-2 output size, ID_AA64MMFR1_EL1.VMIDBits (8-bit
//!   VMIDs are used either way: VTCR_EL2.VS = 0).
//! - One VMID per VM, 1..=255 (0 is never given to a guest). VMALLS12E1IS for the VMID when a VM
//!   is created (a reused VMID never sees the previous guest's translations) and when it is
//!   destroyed (no walk-cache entry may point at freed table pages). VMIDs are machine-wide
//!   (`IdBitmap`); a CPU that switches between two vCPUs of one VM drops that VMID's stage-1
//!   entries locally (`TLBI VMALLE1`), and each vCPU reads its own MPIDR_EL1 (VMPIDR_EL2).
//! - Stage 2 built by the page-table engine's Arm format ([`ArmStage2`], 4 KiB granule); the
//!   VTCR_EL2 the backend programs is derived from the engine's [`RootInfo`] (T0SZ, SL0, TG0 = 4
//!   KiB, PS from PARange) and every VM's table is checked against it. RAM is Normal write-back,
//!   read/write/execute; every other IPA faults to EL2.
//! - HCR_EL2: VM (stage 2), RW (EL1 is AArch64), SWIO, FMO/IMO/AMO (physical interrupts and
//!   SErrors go to EL2: the timer preempts the guest), TSC (SMC traps instead of reaching the
//!   firmware), TWI/TWE (WFI/WFE trap: WFI is a halt, WFE a yield), TIDCP (implementation-defined
//!   system registers), TACR (ACTLR_EL1), TSW (set/way cache maintenance: it would operate on
//!   physical caches the host shares). CNTHCTL_EL2 lets a guest read the physical counter but
//!   not program the physical timer.
//! - Exits ([`El1::decode`]): HVC (EC 0x16) is the hypercall (SMCCC, docs/abi.md §2.2; queries of
//!   the vendor-specific hypervisor service are answered here), data aborts from a lower EL
//!   (EC 0x24: IPA from HPFAR_EL2 plus FAR_EL2's page offset, direction from WnR; with ISV the
//!   access size and register are decoded too), instruction aborts (EC 0x20), SMC (EC 0x17),
//!   WFx (EC 0x01), trapped system-register accesses (EC 0x18), IRQ (preemption); anything else
//!   is reported with its ESR.

pub mod asm;

use iommu::pgtable::{ArmStage2, Config, PageTable, Prot};

use super::{Backend, EntryState, Event, Exit, HypercallRegs, VcpuError};
use crate::guest::memory::GuestMemory;
use crate::mem::iommu_mem::IommuMemory;
use asm::{Context, El1Regs, El2Ready, VgicHw, VgicRegs};
use drivers::gicv3::vgic::{self, LrState, PendingSet};

/// Priority of the virtual interrupts the hypervisor injects (the timer and MSIs): the middle
/// of the range, whatever the number of priority bits (ICH_VTR_EL2.PRIbits keeps the upper
/// ones), so a guest's PMR of 0xff lets them in and one of 0x80 masks them.
const VIRQ_PRIORITY: u8 = 0xa0;
/// The guest's virtual timer: virtual INTID 27, linked to physical PPI 27 (the HW bit).
const VTIMER: u32 = crate::arch::irq::VTIMER_INTID;

/// How this backend puts a virtual INTID into a list register: the timer with the HW bit
/// (pINTID 27: the guest's deactivation deactivates the physical PPI, which stays active
/// meanwhile so the still-asserted timer is not taken again), everything else as a pure
/// virtual interrupt.
struct Lrs;

impl vgic::Encoding for Lrs {
    fn encode(&self, vintid: u32) -> Option<u64> {
        vgic::encode(vintid, VIRQ_PRIORITY, (vintid == VTIMER).then_some(VTIMER))
    }
}

/// Where stage-2 tables come from: their own frame source, so the runner can check that every
/// table page of a destroyed VM went back (none may be left when all guests are gone).
pub static STAGE2_MEMORY: IommuMemory = IommuMemory::new();

/// ESR_EL2.EC values (DDI 0487, D23 "ESR_EL2").
mod ec {
    pub const WFX: u64 = 0x01;
    pub const HVC64: u64 = 0x16;
    pub const SMC64: u64 = 0x17;
    pub const SYSREG: u64 = 0x18;
    pub const IABT_LOWER: u64 = 0x20;
    pub const DABT_LOWER: u64 = 0x24;
}

/// Vector indices of `arch::aarch64::exception` for exceptions from a lower EL in AArch64. The
/// group is chosen by the execution state of the EL just below EL2 (DDI 0487, D1.3.1 "Exception
/// vectors"), which HCR_EL2.RW makes AArch64: a guest's AArch32 EL0 also exits through these
/// (scenario arm-guests-aarch32), and the AArch32 group (12-15) is never used.
mod vector {
    pub const SYNC: u64 = 8;
    pub const IRQ: u64 = 9;
    pub const FIQ: u64 = 10;
}

/// Guest PSTATE at entry: EL1h, D/A/I/F masked (docs/guests.md "Entry state (aarch64)").
const GUEST_PSTATE: u64 = 0x3c5;

/// Guest EL1 state at entry (docs/guests.md): the MMU on with the loader's identity map.
/// SCTLR_EL1: M, C, I and the RES1 bits of ARMv8.0 (29, 28, 23, 22, 20, 11).
const GUEST_SCTLR: u64 = 1 | 1 << 2 | 1 << 12 | 0x30d0_0800;
/// TCR_EL1: T0SZ = 32 (4 GiB), IRGN0/ORGN0 = write-back, SH0 = inner, TG0 = 4 KiB, EPD1 (no
/// TTBR1 walks), IPS = 32 bits.
const GUEST_TCR: u64 = 32 | 1 << 8 | 1 << 10 | 3 << 12 | 1 << 23;
/// CPACR_EL1.FPEN = 0b11: FP/SIMD does not trap at EL1/EL0 (the compiler uses it freely).
const GUEST_CPACR: u64 = 3 << 20;

/// The machine's VMIDs (8-bit VMIDs: 1-255; one VM's on every CPU its vCPUs run on).
static VMIDS: super::IdBitmap = super::IdBitmap::new();

/// Stage-2 input size: 40 bits (1 TiB of IPA space) or the physical size if smaller.
const IPA_BITS: u32 = 40;

/// The backend: the EL2 controls every guest shares.
pub struct El1 {
    el2: El2Ready,
    /// The stage-2 shape VTCR_EL2 describes; every VM's table must have it.
    shape: (u32, u32, u32),
    oas: u32,
    /// By VMID, the vCPU (its context's address) that ran last with it on this CPU.
    last_vcpu: [usize; 256],
    /// This CPU's list registers (ICH_VTR_EL2), 0 until the first run sets the virtual
    /// interface up here.
    nr_lrs: usize,
    /// Whether this CPU's physical PPI 27 was left active for a vCPU's in-flight timer.
    vtimer_active: bool,
    /// The vCPU (its context's address) whose virtual CPU interface this CPU holds, 0 for none.
    vgic_owner: usize,
    /// This CPU's index (a vCPU records where its interface was last loaded).
    cpu: usize,
    /// What this CPU's virtual CPU interface was last given.
    vgic_hw: VgicHw,
    /// The virtual timer registers hold something else than the owner's saved CNTV_CTL/CVAL
    /// (`set_vtimer` unloaded or armed it): the next entry writes them again.
    vtimer_stale: bool,
}

/// A VM: its stage-2 table and VMID.
pub struct El1Vm {
    stage2: PageTable<ArmStage2<12>>,
    vmid: u16,
}

/// A data access the guest made to an IPA it has no mapping for, as ESR_EL2.ISS describes it
/// when ISV = 1 (DDI 0487, "ISS encoding for an exception from a Data Abort"): enough to emulate
/// the access without decoding the instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    pub ipa: u64,
    pub write: bool,
    /// Bytes: 1, 2, 4 or 8 (SAS).
    pub size: u8,
    /// Register number (SRT); 31 is XZR.
    pub reg: u8,
    /// Sign-extend a load (SSE) to 64 (SF = 1) or 32 bits.
    pub sign_extend: bool,
    pub sixty_four: bool,
    /// Length of the faulting instruction (ESR_EL2.IL: 4, or 2 for a 16-bit T32 one).
    pub insn_bytes: u8,
}

/// A vCPU: its registers and EL1 state.
pub struct El1Vcpu {
    ctx: alloc::boxed::Box<Context>,
    el1: El1Regs,
    /// The last stage-2 data abort with a valid syndrome (for MMIO emulation).
    pub last_mmio: Option<MmioAccess>,
    /// The virtual CPU interface, saved and restored around each run.
    vgic: VgicRegs,
    /// Virtual INTIDs waiting for a list register (the timer, what MSI routes posted).
    pending: PendingSet,
    /// The `guest::msi` slot whose posted interrupts (assigned devices' MSIs, posted by LPI
    /// handlers on any CPU) this vCPU takes before each entry.
    msi_slot: Option<usize>,
    /// The virtual timer was injected and the guest has not deactivated it yet: physical PPI
    /// 27 must be active whenever this vCPU runs.
    vtimer_inflight: bool,
    /// The CPU whose virtual CPU interface was last loaded with this vCPU's state (`usize::MAX`
    /// before the first run): if it ran elsewhere since, that CPU's copy is stale.
    vgic_cpu: usize,
    /// `el1` holds what the guest left in the EL1 registers at its last exit. After an exit
    /// the registers stay in the CPU unsaved ([`asm::run`] does not read them back): a
    /// hypercall or emulated access resumes the same vCPU with nothing in between, so the
    /// image is saved ([`El1::save_el1`]) only when it is needed: before the vCPU leaves the
    /// CPU at any other exit (the scheduler may run another vCPU here, whose entry loads its
    /// own image over them) and before a WFI wait reads or rewrites the timer.
    el1_saved: bool,
}

impl El1 {
    /// Brings the backend up on the calling CPU, or says why this machine has none.
    pub fn probe() -> Result<El1, &'static str> {
        if asm::current_el() != 2 {
            return Err("not running at EL2");
        }
        if boot::aarch64::entry_error().is_some() {
            return Err("EL2 entry reported a problem (VHE-only CPU or bad boot state)");
        }
        let (parange, _vmid_bits) = asm::id_registers();
        let pa_bits =
            iommu::pgtable::format::arm_pa_bits(parange.min(5) as u8).ok_or("unknown PARange")?;
        let ias = IPA_BITS.min(pa_bits);
        // Build one throw-away table to learn the geometry the engine chooses for this
        // configuration; VTCR_EL2 is programmed from it.
        let probe = Self::new_table(ias, pa_bits).map_err(|_| "cannot allocate a stage-2 table")?;
        let ri = probe.root_info();
        let prepared = asm::prepare_el2(&probe, parange.min(5));
        probe.destroy(&STAGE2_MEMORY);
        let (el2, vtcr) = prepared?;
        log::info!(
            "el1: VTCR_EL2 {vtcr:#x} (T0SZ {}, start level {}, 4 KiB granule, PARange {parange})",
            ri.arm_t0sz(),
            ri.arm_start_level()
        );
        Ok(El1 {
            el2,
            shape: (ri.arm_t0sz(), ri.levels, ri.granule_shift),
            oas: pa_bits,
            last_vcpu: [0; 256],
            nr_lrs: 0,
            vtimer_active: false,
            vgic_owner: 0,
            cpu: crate::arch::smp::cpu_index(),
            vgic_hw: VgicHw::default(),
            vtimer_stale: false,
        })
    }

    /// What [`El1::probe`] would use, without programming anything: (IPA bits, VMIDs).
    pub fn check() -> Result<(u32, u32), &'static str> {
        if asm::current_el() != 2 || boot::aarch64::entry_error().is_some() {
            return Err("not running at non-VHE EL2");
        }
        let (parange, _) = asm::id_registers();
        let pa_bits =
            iommu::pgtable::format::arm_pa_bits(parange.min(5) as u8).ok_or("unknown PARange")?;
        Ok((IPA_BITS.min(pa_bits), 255))
    }

    /// Address-space identifiers a guest can have: VMIDs 1..=255 (8-bit VMIDs, VTCR_EL2.VS = 0).
    pub fn asids(&self) -> u32 {
        255
    }

    fn new_table(
        ias: u32,
        oas: u32,
    ) -> Result<PageTable<ArmStage2<12>>, iommu::pgtable::ConfigError> {
        // The stage-2 walker is coherent: VTCR_EL2 declares write-back inner-shareable walks.
        let mut cfg = Config::new(ias, oas);
        cfg.execute_control = true;
        PageTable::<ArmStage2<12>>::new(&STAGE2_MEMORY, cfg)
    }

    fn alloc_vmid(&mut self) -> Option<u16> {
        VMIDS.alloc(256).map(|v| v as u16)
    }

    fn free_vmid(&mut self, v: u16) {
        VMIDS.free(v.into());
    }

    /// Answers the SMCCC calls that are not ABI calls (docs/abi.md §2.2): the service queries
    /// and everything that is not this service. Returns `Some(x0..x3)` if handled here, `None`
    /// for an ABI or platform call.
    fn smccc_builtin(x0: u64, imm: u16) -> Option<[u64; 4]> {
        match hvabi::smccc::classify(x0, imm) {
            hvabi::smccc::Call::Op(_) => None,
            other => Some(Self::smccc_answer(other)),
        }
    }

    /// The answer to a query or a call of another service. Out of line and cold: its constant
    /// answers were materialised on the stack at every `run` (16 instructions per hypercall)
    /// when inlined into the exit path.
    #[cold]
    #[inline(never)]
    fn smccc_answer(call: hvabi::smccc::Call) -> [u64; 4] {
        use hvabi::smccc::{self, Call};
        match call {
            // Never passed: `smccc_builtin` leaves ABI ops to the dispatcher.
            Call::Op(_) => [smccc::NOT_SUPPORTED as u64, 0, 0, 0],
            Call::CallUid => smccc::UID.map(u64::from),
            Call::Revision => [smccc::REVISION.0.into(), smccc::REVISION.1.into(), 0, 0],
            // The ABI ops, the two platform calls and the three queries.
            Call::CallCount => [(hvabi::op::ALL.len() + 5) as u64, 0, 0, 0],
            Call::NotSupported => [smccc::NOT_SUPPORTED as u64, 0, 0, 0],
        }
    }

    fn decode(&mut self, vcpu: &mut El1Vcpu) -> Option<Event> {
        let c = &vcpu.ctx;
        match c.vector {
            vector::IRQ | vector::FIQ => {
                // Acknowledge at the GIC: the EL2 timer ends the slice; the guest's timer is
                // injected; a maintenance interrupt only asks for the refill the next entry
                // does anyway; a device interrupt went to its handler (which may have raised
                // a virtual interrupt for a vCPU); spurious just resumes.
                use crate::arch::irq::GuestIrq;
                return match crate::arch::irq::take_guest_interrupt() {
                    GuestIrq::SliceEnd => Some(Event::Preempted),
                    GuestIrq::VirtualTimer => {
                        self.inject_vtimer(vcpu);
                        None
                    }
                    GuestIrq::Maintenance | GuestIrq::Other => None,
                };
            }
            vector::SYNC => {}
            _ => {
                return Some(Event::UnexpectedException {
                    vector: c.vector as u8,
                    error_code: c.esr,
                });
            }
        }
        let esr = c.esr;
        let iss = esr & 0x1ff_ffff;
        let ipa = (c.hpfar >> 4) << 12 | (c.far & 0xfff);
        Some(match esr >> 26 & 0x3f {
            ec::HVC64 => {
                let regs = [c.x[0], c.x[1], c.x[2], c.x[3]];
                if let Some(out) = Self::smccc_builtin(regs[0], (iss & 0xffff) as u16) {
                    vcpu.ctx.x[..4].copy_from_slice(&out);
                    return None;
                }
                Event::Hypercall(HypercallRegs {
                    op: regs[0] & 0xffff,
                    args: [regs[1], regs[2], regs[3]],
                })
            }
            ec::DABT_LOWER => {
                let write = iss & (1 << 6) != 0;
                // ISV (bit 24) with S1PTW (bit 7) clear: a load/store of one register to this
                // IPA, described by SAS/SSE/SRT/SF; a fault on the guest's own table walk
                // (S1PTW) or an access without a syndrome is not emulable.
                let access = (iss & (1 << 24) != 0 && iss & (1 << 7) == 0).then_some(MmioAccess {
                    ipa,
                    write,
                    size: 1 << ((iss >> 22) & 3),
                    reg: ((iss >> 16) & 0x1f) as u8,
                    sign_extend: iss & (1 << 21) != 0,
                    sixty_four: iss & (1 << 15) != 0,
                    insn_bytes: if esr & (1 << 25) != 0 { 4 } else { 2 },
                });
                vcpu.last_mmio = access;
                match access {
                    Some(a) => {
                        let data = if a.reg == 31 {
                            0
                        } else {
                            vcpu.ctx.x[usize::from(a.reg)]
                        };
                        let mask = if a.size == 8 {
                            u64::MAX
                        } else {
                            (1u64 << (8 * a.size)) - 1
                        };
                        Event::MmioAccess {
                            gpa: ipa,
                            write,
                            size: a.size,
                            value: data & mask,
                        }
                    }
                    None => Event::MmioFault {
                        gpa: ipa,
                        write,
                        fetch: false,
                    },
                }
            }
            ec::IABT_LOWER => Event::MmioFault {
                gpa: ipa,
                write: false,
                fetch: true,
            },
            ec::SMC64 => Event::Forbidden {
                what: "smc",
                detail: iss & 0xffff,
            },
            ec::WFX => {
                // ISS.TI (bits 1:0): 0 = WFI, 1 = WFE (2/3: WFIT/WFET). A trapped WFx's
                // preferred return is the instruction itself: step over it.
                vcpu.ctx.pc = vcpu.ctx.pc.wrapping_add(4);
                if iss & 1 == 0 {
                    return self.wait_for_interrupt(vcpu);
                } else {
                    // WFE is a hint that the guest waits for another CPU: end its slice.
                    Event::Preempted
                }
            }
            ec::SYSREG => Event::Forbidden {
                what: if iss & 1 != 0 { "mrs" } else { "msr" },
                detail: iss,
            },
            _ => Event::Invalid(esr),
        })
    }
}

impl El1 {
    /// Sets the virtual CPU interface up on this CPU the first time a vCPU runs here: the
    /// number of list registers, the guest PPIs at this CPU's redistributor.
    fn vgic_this_cpu(&mut self) -> bool {
        if self.nr_lrs == 0 {
            if let Err(e) = crate::arch::irq::enable_guest_ppis() {
                log::error!("el1: {e}");
                return false;
            }
            self.nr_lrs = vgic::list_registers(asm::ich_vtr()).min(16);
        }
        true
    }

    /// Before an entry: the physical timer PPI's active state as this vCPU needs it, and the
    /// list registers refilled from its pending set (UIE while some do not fit, so the
    /// guest's completions bring it back through the maintenance interrupt).
    fn prepare_entry(&mut self, vcpu: &mut El1Vcpu) {
        if self.vtimer_active != vcpu.vtimer_inflight {
            crate::arch::irq::set_ppi_active(VTIMER, vcpu.vtimer_inflight);
            self.vtimer_active = vcpu.vtimer_inflight;
        }
        Self::collect_posted(vcpu);
        let nr = self.nr_lrs;
        let mut hcr = vgic::hcr::EN;
        // Nothing pending (the common exit): the list registers are as the guest left them.
        if !vcpu.pending.is_empty() {
            vgic::refill(&mut vcpu.vgic.lrs[..nr], &vcpu.pending, &Lrs);
            vcpu.vgic.rewritten(nr);
            if !vcpu.pending.is_empty() {
                hcr |= vgic::hcr::UIE;
            }
        }
        vcpu.vgic.hcr = hcr;
    }

    /// Moves what MSI routes posted to this vCPU into its pending set (each posted bit is
    /// taken exactly once: `msi::take_posted` swaps the words; its summary flag skips them when
    /// nothing was posted).
    fn collect_posted(vcpu: &mut El1Vcpu) {
        let Some(slot) = vcpu.msi_slot else {
            return;
        };
        let Some(posted) = crate::guest::msi::take_posted_if_any(slot) else {
            return;
        };
        for (w, bits) in posted.into_iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let bit = b.trailing_zeros();
                b &= b - 1;
                // Routes only post virtual INTIDs the pending set holds (msi/aarch64.rs).
                vcpu.pending.raise(w as u32 * 64 + bit);
            }
        }
    }

    /// Saves the guest's EL1 registers from the CPU into `vcpu.el1`, once per exit (a second
    /// save would read what the backend wrote since, e.g. the timer a WFI wait unloaded).
    fn save_el1(vcpu: &mut El1Vcpu) {
        if !core::mem::replace(&mut vcpu.el1_saved, true) {
            asm::save_el1(&mut vcpu.el1);
        }
    }

    /// After an exit: a timer the guest has deactivated (no list register holds it any more)
    /// is no longer in flight, and the GIC deactivated physical PPI 27 with it (HW bit).
    fn after_exit(&mut self, vcpu: &mut El1Vcpu) {
        if !vcpu.vtimer_inflight {
            return;
        }
        let in_lr = vcpu.vgic.lrs[..self.nr_lrs]
            .iter()
            .any(|&l| vgic::state(l) != LrState::Invalid && vgic::vintid(l) == VTIMER);
        let queued = vcpu.pending.contains(VTIMER);
        if !in_lr && !queued {
            vcpu.vtimer_inflight = false;
            self.vtimer_active = false;
        }
    }

    /// The guest's timer fired (PPI 27 acknowledged and completed): keep the physical PPI
    /// active until the guest deactivates the virtual one, and make virtual INTID 27 pending.
    fn inject_vtimer(&mut self, vcpu: &mut El1Vcpu) {
        crate::arch::irq::set_ppi_active(VTIMER, true);
        self.vtimer_active = true;
        vcpu.vtimer_inflight = true;
        vcpu.pending.raise(VTIMER);
    }

    /// A trapped WFI (HCR_EL2.TWI): resume at once if a virtual interrupt is pending; stop the
    /// guest (`Event::Halt`) if nothing could ever wake it (its timer is off or masked and no
    /// MSI is routed to it); otherwise wait here, with the guest's timer loaded so its PPI
    /// wakes the CPU, until the timer fires (injected), a virtual interrupt is raised for this
    /// vCPU (an LPI taken here), or the slice ends (`Event::Preempted`; the guest resumes after
    /// its WFI next time, which the architecture allows: WFI may complete spuriously).
    fn wait_for_interrupt(&mut self, vcpu: &mut El1Vcpu) -> Option<Event> {
        use crate::arch::irq::GuestIrq;
        // The timer is read below and rewritten while it waits: the guest's image first.
        Self::save_el1(vcpu);
        Self::collect_posted(vcpu);
        let lr_pending = vcpu.vgic.lrs[..self.nr_lrs]
            .iter()
            .any(|&l| matches!(vgic::state(l), LrState::Pending | LrState::PendingActive));
        if lr_pending || !vcpu.pending.is_empty() {
            return None;
        }
        let (ctl, cval) = (vcpu.el1.cntv_ctl, vcpu.el1.cntv_cval);
        // CNTV_CTL_EL0: ENABLE (bit 0), IMASK (bit 1). A timer already in flight fires again
        // only after the guest deactivates it, which it cannot do while it waits.
        let armed = ctl & 1 != 0 && ctl & 2 == 0 && !vcpu.vtimer_inflight;
        let routed = vcpu
            .msi_slot
            .is_some_and(|s| crate::guest::msi::routes_to(s) != 0);
        if !armed && !routed {
            return Some(Event::Halt);
        }
        if armed {
            asm::set_vtimer(1, cval);
            self.vtimer_stale = true;
        }

        let result = loop {
            Self::collect_posted(vcpu);
            if !vcpu.pending.is_empty() || (armed && asm::virtual_count() >= cval) {
                break None;
            }
            asm::wait_for_interrupt();
            match crate::arch::irq::take_guest_interrupt() {
                GuestIrq::SliceEnd => break Some(Event::Preempted),
                GuestIrq::VirtualTimer => {
                    self.inject_vtimer(vcpu);
                    break None;
                }
                GuestIrq::Maintenance | GuestIrq::Other => {}
            }
        };
        asm::set_vtimer(0, cval);
        result
    }
}

impl Backend for El1 {
    type Vm = El1Vm;
    type Vcpu = El1Vcpu;

    const SMP: bool = true;

    fn for_this_cpu() -> Result<El1, &'static str> {
        // The EL2 guest controls are per CPU: `probe` programs them on the calling CPU.
        El1::probe()
    }

    fn name(&self) -> &'static str {
        "el1"
    }

    fn create_vm(&mut self, memory: &GuestMemory) -> Result<El1Vm, VcpuError> {
        let ias = 64 - self.shape.0;
        let stage2 = Self::new_table(ias, self.oas).map_err(|_| VcpuError::NoMemory)?;
        let ri = stage2.root_info();
        if (ri.arm_t0sz(), ri.levels, ri.granule_shift) != self.shape {
            // Cannot happen with one configuration, but VTCR_EL2 is shared: never run a table
            // of another shape under it.
            stage2.destroy(&STAGE2_MEMORY);
            return Err(VcpuError::Map);
        }
        for r in memory.regions() {
            if stage2
                .map(
                    &STAGE2_MEMORY,
                    r.gpa,
                    r.pa(),
                    r.len(),
                    Prot::READ | Prot::WRITE | Prot::EXEC,
                )
                .is_err()
            {
                stage2.destroy(&STAGE2_MEMORY);
                return Err(VcpuError::Map);
            }
        }
        let Some(vmid) = self.alloc_vmid() else {
            stage2.destroy(&STAGE2_MEMORY);
            return Err(VcpuError::NoAsid);
        };
        let vm = El1Vm { stage2, vmid };
        asm::flush_vmid(&self.el2, &vm.stage2, vm.vmid);
        Ok(vm)
    }

    fn map_device_memory(
        &mut self,
        vm: &El1Vm,
        gpa: u64,
        hpa: u64,
        len: u64,
    ) -> Result<(), VcpuError> {
        // Device-nGnRE in stage 2 (MemAttr 0b0001), never executable: the combination with
        // the guest's stage-1 attributes can only be as strong or stronger (DDI 0487, D8.5.5).
        vm.stage2
            .map(
                &STAGE2_MEMORY,
                gpa,
                hpa,
                len,
                Prot::READ | Prot::WRITE | Prot::DEVICE,
            )
            .map_err(|_| VcpuError::Map)?;
        // New mappings only (the range was unmapped): no stale translation can exist, but the
        // walk caches may hold the invalid entries; flush this VMID like any stage-2 change.
        asm::flush_vmid(&self.el2, &vm.stage2, vm.vmid);
        Ok(())
    }

    fn complete_mmio(&mut self, vcpu: &mut El1Vcpu, value: Option<u64>) {
        let Some(a) = vcpu.last_mmio.take() else {
            return;
        };
        if let (Some(v), false, true) = (value, a.write, a.reg < 31) {
            // Zero- or sign-extend the loaded bytes into Wt (SF = 0, upper half cleared) or Xt
            // (ESR_EL2 ISS: SSE, SF).
            let bits = 8 * u32::from(a.size);
            let mut x = if bits == 64 {
                v
            } else {
                v & ((1u64 << bits) - 1)
            };
            if a.sign_extend && bits < 64 {
                let shift = 64 - bits;
                x = (((x << shift) as i64) >> shift) as u64;
            }
            if !a.sixty_four {
                x &= u64::from(u32::MAX);
            }
            vcpu.ctx.x[usize::from(a.reg)] = x;
        }
        // A data abort's preferred return is the faulting instruction: step over it.
        vcpu.ctx.pc = vcpu.ctx.pc.wrapping_add(a.insn_bytes.into());
    }

    fn complete_port_io(&mut self, _vcpu: &mut El1Vcpu, _size: u8, _value: Option<u32>) {
        // aarch64 has no port I/O: `run` never returns `Event::PortIo`, so there is nothing to
        // complete.
    }

    fn create_vcpu(&mut self, _vm: &El1Vm, s: &EntryState) -> Result<El1Vcpu, VcpuError> {
        let mut ctx = alloc::boxed::Box::new(Context::new(s.entry, GUEST_PSTATE, s.arg));
        ctx.x[1] = s.vcpu.into();
        // MPIDR_EL1: bit 31 RES1; U (bit 30) = uniprocessor only when the VM has one vCPU;
        // Aff0 = the vCPU index (DDI 0487 D19.2 "MPIDR_EL1").
        let vmpidr = if s.vcpu_count <= 1 {
            0xc000_0000
        } else {
            0x8000_0000 | u64::from(s.vcpu & 0xff)
        };
        Ok(El1Vcpu {
            ctx,
            el1: El1Regs {
                sctlr: GUEST_SCTLR,
                cpacr: GUEST_CPACR,
                ttbr0: s.page_table,
                tcr: GUEST_TCR,
                mair: iommu::pgtable::format::ARM_S1_MAIR,
                sp_el1: s.stack,
                vmpidr,
                ..El1Regs::default()
            },
            last_mmio: None,
            vgic: VgicRegs::default(),
            pending: PendingSet::new(),
            msi_slot: None,
            vtimer_inflight: false,
            vgic_cpu: usize::MAX,
            el1_saved: true,
        })
    }

    fn run(&mut self, vm: &El1Vm, vcpu: &mut El1Vcpu) -> Exit {
        // Another vCPU of this VM ran here since this one did (same VMID, its own EL1 stage 1).
        let me = core::ptr::from_ref::<Context>(&vcpu.ctx).addr();
        if self
            .last_vcpu
            .get_mut(usize::from(vm.vmid))
            .is_some_and(|last| core::mem::replace(last, me) != me)
        {
            asm::flush_vmid_stage1_local(&self.el2, &vm.stage2, vm.vmid);
        }
        if !self.vgic_this_cpu() {
            return Exit {
                pc: vcpu.ctx.pc,
                event: Event::Invalid(0),
            };
        }
        // This CPU's virtual CPU interface still holds this vCPU's state (it was the last one
        // loaded here and has not run elsewhere since): only what changed is written.
        let mut vgic_full = self.vgic_owner != me || vcpu.vgic_cpu != self.cpu;
        // Another vCPU's state may be in the CPU only if this one's was saved when it left.
        debug_assert!(vcpu.el1_saved || !vgic_full);
        self.vgic_owner = me;
        vcpu.vgic_cpu = self.cpu;
        loop {
            if core::mem::replace(&mut self.vtimer_stale, false) && !vgic_full {
                // A WFI wait or an unload changed the timer; a full entry (`asm::run` loads
                // every EL1 register) restores it anyway.
                asm::set_vtimer(vcpu.el1.cntv_ctl, vcpu.el1.cntv_cval);
            }
            self.prepare_entry(vcpu);
            let ran = asm::run(
                &self.el2,
                &vm.stage2,
                vm.vmid,
                &mut vcpu.el1,
                asm::VgicRun {
                    regs: &mut vcpu.vgic,
                    hw: &mut self.vgic_hw,
                    nr: self.nr_lrs,
                    full: core::mem::replace(&mut vgic_full, false),
                },
                &mut vcpu.ctx,
            );
            if !ran {
                // A table of another shape than VTCR_EL2 describes: never entered (nor was
                // the virtual CPU interface loaded).
                self.vgic_owner = 0;
                return Exit {
                    pc: vcpu.ctx.pc,
                    event: Event::Invalid(0),
                };
            }
            vcpu.el1_saved = false;
            // ELR_EL2 at the exit: the faulting or trapped instruction (after the HVC).
            let pc = vcpu.ctx.pc;
            self.after_exit(vcpu);
            if let Some(event) = self.decode(vcpu) {
                // The vCPU leaves the CPU (the scheduler may run another one here): its timer,
                // saved in `el1`, must not assert PPI 27 meanwhile.
                // A hypercall or an emulated access is handled and the vCPU resumes (or leaves
                // through `destroy_vcpu`, which unloads it) with no other vCPU in between
                // (guest::run_slice): its timer can stay loaded; PPI 27 that fires meanwhile
                // stays pending under the hypervisor's PMR and is taken at the next entry.
                // Its EL1 registers likewise (`El1Vcpu::el1_saved`): saved only when it leaves.
                if !matches!(event, Event::Hypercall(_) | Event::MmioAccess { .. }) {
                    Self::save_el1(vcpu);
                    asm::set_vtimer(0, vcpu.el1.cntv_cval);
                    self.vtimer_stale = true;
                }
                return Exit { pc, event };
            }
        }
    }

    fn complete_hypercall(&mut self, vcpu: &mut El1Vcpu, result: u64) {
        // HVC's preferred return address is the next instruction: ELR_EL2 is already past it.
        vcpu.ctx.x[0] = result;
    }

    fn destroy_vm(&mut self, vm: El1Vm) {
        asm::flush_vmid(&self.el2, &vm.stage2, vm.vmid);
        self.free_vmid(vm.vmid);
        vm.stage2.destroy(&STAGE2_MEMORY);
    }

    fn destroy_vcpu(&mut self, vcpu: El1Vcpu) {
        // Its timer's physical PPI must not stay active for the next vCPU here.
        if vcpu.vtimer_inflight && self.vtimer_active {
            crate::arch::irq::set_ppi_active(VTIMER, false);
            self.vtimer_active = false;
        }
        // A later vCPU may be allocated at the same address: it must not count as the owner.
        // Its timer may still be loaded (it left after a hypercall): it must not assert PPI
        // 27 under the next vCPU.
        if self.vgic_owner == core::ptr::from_ref::<Context>(&vcpu.ctx).addr() {
            self.vgic_owner = 0;
            asm::set_vtimer(0, vcpu.el1.cntv_cval);
        }
        drop(vcpu);
    }

    fn bind_interrupts(&mut self, vcpu: &mut El1Vcpu, slot: usize) -> bool {
        vcpu.msi_slot = Some(slot);
        true
    }
}

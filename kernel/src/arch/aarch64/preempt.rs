//! Preemption of guests: the EL2 physical timer (CNTHP, Arm ARM D12 "The Generic Timer"; its
//! interrupt is PPI 10 = INTID 26, Arm BSA/SBSA "PPI assignments") delivered through the GICv3
//! (`drivers::gicv3` for the distributor and redistributor, the `ICC_*` system registers here).
//!
//! The timer's interrupt is never taken at EL2 itself: the hypervisor keeps PSTATE.I set, and
//! while a guest runs HCR_EL2.IMO routes physical IRQs to EL2, so the timer ends the guest's slice
//! with a lower-EL IRQ exception; the vCPU backend then calls [`take_interrupt`], which
//! acknowledges it at the CPU interface (and hands any device interrupt to `irq`'s handler
//! table). The device interrupts' windows at EL2 (`irq::interrupt_window`) mask the timer's
//! priority with ICC_PMR_EL1. `ICC_CTLR_EL1.EOImode` stays 0, so the EOI write both drops the
//! priority and deactivates (IHI 0069 §4.1.1). CNTHP is level-triggered: the handler stops the
//! timer before the EOI so the line is low when the interrupt is deactivated.
//!
//! Every CPU has its own timer, PPI and redistributor: the boot CPU brings up the distributor
//! once ([`init_timer`]), each secondary wakes its own redistributor and CPU interface when it
//! comes up ([`init_this_cpu`], from `smp`), and [`arm_timer`], [`take_interrupt`] and [`ticks`]
//! act on the calling CPU only.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use boot::BootInfo;
use drivers::gicv3;

use super::smp::MAX_CPUS;
use crate::mem::phys::MmioRegion;

/// INTID of the EL2 physical timer (the fourth `interrupts` entry of the DT `arm,armv8-timer`
/// node on QEMU virt: PPI 10).
pub const HYP_TIMER_INTID: u32 = 26;
/// GICD frame size (IHI 0069 §12.9: 64 KiB).
const GICD_SIZE: u64 = 0x1_0000;

/// The GIC as the boot CPU found it: the distributor is up and this is the redistributor
/// region, shared by every CPU (each finds its own frame in it by affinity).
static GICR: spin::Once<(MmioRegion, usize)> = spin::Once::new();
/// The distributor, its GICD_TYPER and the boot CPU's affinity (where SPIs are routed).
static GICD: spin::Once<(MmioRegion, u32, u32)> = spin::Once::new();
static FREQ: AtomicU64 = AtomicU64::new(0);

/// Per CPU (indexed by `smp::cpu_index`): whether its redistributor and CPU interface are up,
/// its redistributor's offset in the region, and the timer interrupts it took. Each entry is
/// written only by its own CPU, so Relaxed suffices; the boot CPU reads another CPU's entry only
/// after that CPU's completion was published (`smp::is_idle`, Release/Acquire).
static READY: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static RD_OFFSET: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn read_cntfrq() -> u64 {
    let f: u64;
    // SAFETY: CNTFRQ_EL0 is a read-only identification register.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) f, options(nomem, nostack, preserves_flags)) };
    f
}

fn mpidr_affinity() -> u32 {
    let m: u64;
    // SAFETY: MPIDR_EL1 is read-only and readable at EL2.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) m, options(nomem, nostack, preserves_flags)) };
    // Aff3 (bits 39:32) above Aff2.Aff1.Aff0 (bits 23:0): GICR_TYPER.Affinity_Value's layout.
    ((m >> 8) & 0xff00_0000) as u32 | (m & 0x00ff_ffff) as u32
}

/// Finds the GICv3 in the device tree (else the ACPI MADT) and brings up the distributor (once,
/// on the first CPU that calls this: the boot CPU), then this CPU's redistributor and CPU
/// interface with the timer's PPI enabled ([`init_this_cpu`]). The timer stays off until
/// [`arm_timer`]. Idempotent per CPU.
pub fn init_timer(info: &BootInfo) -> Result<(), &'static str> {
    if GICR.get().is_none() {
        let (gicd, gicr, gicr_len) = match crate::firmware::devicetree::fdt(info) {
            Some(fdt) => gic_from_device_tree(&fdt)?,
            None => gic_from_madt(info)?,
        };
        let gicd = MmioRegion::new(gicd, GICD_SIZE)
            .map_err(|_| "GIC distributor outside the direct map")?;
        let region = MmioRegion::new(gicr, gicr_len as u64)
            .map_err(|_| "GIC redistributors outside the direct map")?;
        let typer = gicv3::init_distributor(&gicd).map_err(gic_error)?;
        FREQ.store(read_cntfrq().max(1), Relaxed);
        GICR.call_once(|| (region, gicr_len));
        GICD.call_once(|| (gicd, typer, mpidr_affinity()));
        log::info!(
            "gicv3: distributor {:#x} (GICD_TYPER {typer:#x}), redistributors {:#x}+{gicr_len:#x}, EL2 timer INTID {HYP_TIMER_INTID}, CNTFRQ {} Hz",
            gicd.phys,
            region.phys,
            FREQ.load(Relaxed)
        );
    }
    init_this_cpu()
}

/// Wakes the calling CPU's redistributor (found by its MPIDR affinity), enables the timer's PPI
/// there, and enables the CPU interface for Group 1. Needs [`init_timer`] to have run on the
/// boot CPU first (the distributor); each secondary calls this when it comes up. Idempotent.
pub fn init_this_cpu() -> Result<(), &'static str> {
    let cpu = super::smp::cpu_index();
    if READY[cpu].load(Relaxed) {
        return Ok(());
    }
    let &(gicr, gicr_len) = GICR.get().ok_or("GIC distributor not initialised")?;
    let rd = gicv3::find_redistributor(&gicr, gicr_len, mpidr_affinity()).map_err(gic_error)?;
    gicv3::enable_ppi(&gicr, rd, HYP_TIMER_INTID, 0x80).map_err(gic_error)?;
    // SAFETY: ICC_SRE_EL2.SRE|Enable select the system-register CPU interface for EL2 and allow
    // EL1 to do the same (IHI 0069 §12.7.10); PMR 0xff lets every priority through, BPR1 0
    // means no preemption grouping, IGRPEN1 enables Group 1 at the CPU interface. The timer is
    // stopped first so no interrupt is pending when the interface comes up. PSTATE.I stays set:
    // nothing is taken at EL2. All of these registers are this CPU's own.
    unsafe {
        asm!(
            "msr cnthp_ctl_el2, xzr",
            "mrs {t}, icc_sre_el2",
            "orr {t}, {t}, #0x1",
            "orr {t}, {t}, #0x8",
            "msr icc_sre_el2, {t}",
            "isb",
            "mov {t}, #0xff",
            "msr icc_pmr_el1, {t}",
            "msr icc_bpr1_el1, xzr",
            "mov {t}, #1",
            "msr icc_igrpen1_el1, {t}",
            "isb",
            t = out(reg) _,
            options(nostack, preserves_flags),
        );
    }
    RD_OFFSET[cpu].store(rd, Relaxed);
    READY[cpu].store(true, Relaxed);
    log::debug!("gicv3: cpu {cpu} redistributor at +{rd:#x}");
    Ok(())
}

/// The distributor (after [`init_timer`]), its GICD_TYPER, and the affinity of the boot CPU,
/// which brought it up and takes the hypervisor's SPIs.
pub fn distributor() -> Option<(MmioRegion, u32, u32)> {
    GICD.get().copied()
}

/// The redistributor region and the calling CPU's RD_base offset in it, once this CPU's
/// redistributor is up.
pub fn this_redistributor() -> Option<(MmioRegion, usize)> {
    let cpu = super::smp::cpu_index();
    if !READY[cpu].load(Relaxed) {
        return None;
    }
    GICR.get().map(|&(r, _)| (r, RD_OFFSET[cpu].load(Relaxed)))
}

/// The calling CPU's redistributor as the GIC reports it: (GICR_WAKER, GICR_ISENABLER0), read
/// from the hardware, or `None` before [`init_this_cpu`].
pub fn redistributor_state() -> Option<(u32, u32)> {
    use iommu::hw::Mmio;
    let cpu = super::smp::cpu_index();
    if !READY[cpu].load(Relaxed) {
        return None;
    }
    let &(gicr, _) = GICR.get()?;
    let rd = RD_OFFSET[cpu].load(Relaxed);
    Some((
        gicr.read32(rd + gicv3::gicr::WAKER),
        gicr.read32(rd + gicv3::gicr::ISENABLER0),
    ))
}

/// GICD base, first redistributor region base and its length from the `arm,gic-v3` node.
fn gic_from_device_tree(fdt: &fdt::Fdt<'_>) -> Result<(u64, u64, usize), &'static str> {
    let gic = fdt
        .find_compatible(&["arm,gic-v3"])
        .ok_or("no arm,gic-v3 node in the device tree")?;
    let mut regs = gic.reg().ok_or("GICv3 node without reg")?;
    let gicd = regs.next().ok_or("GICv3 reg has no distributor")?;
    let gicr = regs.next().ok_or("GICv3 reg has no redistributor region")?;
    let gicr_len = gicr.size.ok_or("redistributor region without a size")?;
    Ok((
        gicd.starting_address as u64,
        gicr.starting_address as u64,
        gicr_len,
    ))
}

/// The same from the ACPI MADT (ACPI-only machines, UEFI boot): the GICD entry, the first GICR
/// discovery range or, without one, this CPU's GICC redistributor base (one RD_base + SGI_base
/// pair, 128 KiB; IHI 0069 §12.10). The GTDT, when present, must name INTID 26 for the EL2
/// timer, the one the vCPU backend expects.
fn gic_from_madt(info: &BootInfo) -> Result<(u64, u64, usize), &'static str> {
    use iommu::firmware::{gtdt::Gtdt, madt::Madt};
    let rsdp = info.rsdp.ok_or("no device tree and no ACPI RSDP")?;
    let acpi = crate::firmware::acpi::discover(rsdp).map_err(|_| "ACPI tables unreadable")?;
    let madt = acpi.madt.ok_or("no device tree and no MADT")?;
    let madt = Madt::parse(madt.bytes).map_err(|_| "MADT malformed (see the boot report)")?;
    if let Some(g) = acpi.gtdt.and_then(|t| Gtdt::parse(t.bytes).ok())
        && g.el2_phys_gsiv != HYP_TIMER_INTID
    {
        return Err("GTDT names an EL2 timer interrupt other than INTID 26");
    }
    let (gicd, version) = madt.gicd.ok_or("MADT has no GIC distributor")?;
    // GIC version 0: "probe the hardware"; `init_distributor` checks GICD_PIDR2 anyway.
    if !matches!(version, 0 | 3 | 4) {
        return Err("MADT GIC distributor is not a GICv3/GICv4");
    }
    if let Some(&(base, len)) = madt.gicr_ranges.first() {
        return Ok((gicd, base, len as usize));
    }
    let me = mpidr_affinity();
    let cpu = madt
        .cpus
        .iter()
        .find(|c| {
            let aff = ((c.mpidr >> 8) & 0xff00_0000) as u32 | (c.mpidr & 0x00ff_ffff) as u32;
            aff == me && c.gicr_base != 0
        })
        .ok_or("MADT has no GICR range and no GICC redistributor for the boot CPU")?;
    Ok((gicd, cpu.gicr_base, 0x2_0000))
}

fn gic_error(e: gicv3::GicError) -> &'static str {
    log::error!("gicv3: {e}");
    match e {
        gicv3::GicError::NotGicV3 { .. } => "interrupt controller is not a GICv3",
        gicv3::GicError::NoRedistributor { .. } => "no GICv3 redistributor for this CPU",
        gicv3::GicError::Timeout(_) => "GICv3 did not respond",
        gicv3::GicError::NotPpi(_) => "timer interrupt is not a PPI",
        gicv3::GicError::NotSpi(_) => "interrupt is not an SPI of this GIC",
    }
}

/// Starts a one-shot slice of `nanos` nanoseconds (converted at CNTFRQ) on the calling CPU's
/// timer; 0 stops it.
pub fn arm_timer(nanos: u32) {
    if !READY[super::smp::cpu_index()].load(Relaxed) {
        return;
    }
    let ticks = (u64::from(nanos) * FREQ.load(Relaxed) / 1_000_000_000).clamp(1, u32::MAX.into());
    let ctl: u64 = if nanos == 0 { 0 } else { 1 }; // ENABLE, IMASK = 0
    // SAFETY: CNTHP_TVAL/CTL_EL2 program only the EL2 physical timer, which nothing but this
    // module uses; its interrupt is taken only as a guest exit (see the module comment).
    unsafe {
        asm!(
            "msr cnthp_tval_el2, {tval}",
            "msr cnthp_ctl_el2, {ctl}",
            "isb",
            tval = in(reg) ticks,
            ctl = in(reg) ctl,
            options(nostack, preserves_flags),
        );
    }
}

/// Acknowledges the highest-priority pending interrupt at the CPU interface (a guest exit for
/// an IRQ, or a poll). Returns `Some(HYP_TIMER_INTID)` for the timer, which it stops and counts
/// as a tick; any other INTID is a host device interrupt (an SMMU's, an LPI), dispatched to its
/// registered handler (`irq::HANDLERS`) and completed, and returns `None` like a spurious
/// acknowledge: it is no reason to end a guest's slice.
pub fn take_interrupt() -> Option<u32> {
    let iar = super::irq::acknowledge();
    let intid = (iar & 0xff_ffff) as u32;
    if intid == HYP_TIMER_INTID {
        timer_interrupt_taken();
        super::irq::complete(iar);
        return Some(intid);
    }
    // Special INTIDs (1023: nothing pending) are counted, never completed.
    super::irq::dispatch_and_complete(iar);
    None
}

/// The timer's interrupt was acknowledged on this CPU: count a tick and stop the timer, so the
/// level-triggered line is low before the EOI deactivates it.
pub(super) fn timer_interrupt_taken() {
    TICKS[super::smp::cpu_index()].fetch_add(1, Relaxed);
    arm_timer(0);
}

/// Timer interrupts taken so far on the calling CPU (each CPU runs its own slices).
pub fn ticks() -> u64 {
    TICKS[super::smp::cpu_index()].load(Relaxed)
}

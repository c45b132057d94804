//! Host interrupts at EL2: the registered-handler table ([`HANDLERS`], `drivers::gicv3::handlers`)
//! for SPIs and LPIs, the acknowledge/dispatch/complete loop at the GICv3 CPU interface, and the
//! windows in which normal-context code lets those interrupts in.
//!
//! The hypervisor keeps PSTATE.I set (see `preempt`): an interrupt reaches it either as a guest
//! exit (HCR_EL2.IMO routes it to EL2 while a guest runs; the vCPU backend calls
//! `preempt::take_interrupt`, which dispatches here for anything but the timer) or, with no
//! guest running, in an [`interrupt_window`]: HCR_EL2.IMO set (a physical IRQ targets EL1
//! otherwise and is never taken at EL2), ICC_PMR_EL1 raised to [`WINDOW_PMR`] so only the
//! device interrupts (priority [`DEVICE_PRIORITY`]) are signalled and the EL2 timer (0x80)
//! stays pending for the scheduler, PSTATE.I cleared for a few instructions. The interrupt is
//! then taken through the EL2 vectors' "current EL, IRQ" entries (`exception.rs`), which call
//! [`el2_irq`].
//!
//! EOImode: `ICC_CTLR_EL1.EOImode` stays 0, so the single ICC_EOIR1_EL1 write both drops the
//! running priority and deactivates the INTID (IHI 0069, "Priority drop and interrupt deactivation"): handlers only record, so
//! there is nothing to gain from a split drop/deactivate. INTIDs 1020-1023 (1023 = spurious)
//! are never completed (§2.2.1).

use core::arch::asm;

use drivers::gicv3::handlers::{HandlerTable, is_special};

/// Priority of the hypervisor's device interrupts (SPIs and LPIs): above the EL2 timer (0x80)
/// so a window can let them in without the timer.
pub const DEVICE_PRIORITY: u8 = 0x40;
/// ICC_PMR_EL1 inside a window: priorities numerically below 0x80 are signalled.
pub const WINDOW_PMR: u64 = 0x80;
/// Acknowledges per entry at most, so a device that keeps its line asserted cannot hold the CPU.
const MAX_PER_ENTRY: u32 = 64;

/// Every SPI/LPI handler of the hypervisor.
pub static HANDLERS: HandlerTable<16> = HandlerTable::new();

/// Reads ICC_IAR1_EL1: acknowledges the highest-priority pending Group 1 interrupt (it becomes
/// active) and returns the register (INTID in bits 23:0).
pub(super) fn acknowledge() -> u64 {
    let iar: u64;
    // SAFETY: reading ICC_IAR1_EL1 only changes the GIC state of the returned INTID (pending ->
    // active); every caller completes it with `complete` unless it is a special INTID.
    unsafe { asm!("mrs {}, icc_iar1_el1", out(reg) iar, options(nostack, preserves_flags)) };
    iar
}

/// Writes ICC_EOIR1_EL1 with what `acknowledge` returned (EOImode = 0: priority drop and
/// deactivation).
pub(super) fn complete(iar: u64) {
    // SAFETY: completes the interrupt this CPU acknowledged; no memory is touched.
    unsafe { asm!("msr icc_eoir1_el1, {}", "isb", in(reg) iar, options(nostack, preserves_flags)) };
}

/// Dispatches an acknowledged INTID that is not the timer's and completes it.
pub(super) fn dispatch_and_complete(iar: u64) {
    let intid = (iar & 0xff_ffff) as u32;
    if is_special(intid) {
        HANDLERS.dispatch(intid); // counted as spurious, never completed
        return;
    }
    HANDLERS.dispatch(intid);
    complete(iar);
}

/// The EL2 "current EL, IRQ" vectors land here (with the interrupted code's registers saved):
/// acknowledges and dispatches until the CPU interface has nothing more to give.
pub(super) extern "C" fn el2_irq() {
    for _ in 0..MAX_PER_ENTRY {
        let iar = acknowledge();
        let intid = (iar & 0xff_ffff) as u32;
        if is_special(intid) {
            HANDLERS.dispatch(intid);
            return;
        }
        if intid == super::preempt::HYP_TIMER_INTID {
            // Masked by the window's PMR; if it arrives anyway (a window opened with the timer
            // already active at a lower priority), account for it as the guest-exit path does.
            super::preempt::timer_interrupt_taken();
            complete(iar);
            continue;
        }
        dispatch_and_complete(iar);
    }
}

/// Lets the hypervisor's device interrupts that are pending at this CPU interface be taken now
/// (see the module comment). Handlers run inside, on this CPU. Safe to call with any lock held,
/// since handlers take none. `false`: this CPU's GIC CPU interface is not up, so there was no
/// window (the caller need not ask `preempt::this_redistributor` again).
pub fn interrupt_window() -> bool {
    // Without this CPU's GIC CPU interface up (ICC_SRE_EL2.SRE), the ICC_* accesses below would
    // be UNDEFINED; there is nothing to take then anyway.
    if super::preempt::this_redistributor().is_none() {
        return false;
    }
    // SAFETY: HCR_EL2.IMO (bit 4) makes physical IRQs target EL2 (DDI 0487, asynchronous exception routing) and is
    // restored below; PMR limits what is signalled to the device priority; clearing PSTATE.I
    // lets a pending IRQ be taken at the vectors' "current EL, IRQ" entries, whose handler
    // preserves every register of this code (exception.rs) and returns with ERET; the ISBs make
    // each change take effect before the next (QEMU re-evaluates interrupts at DAIF writes).
    unsafe {
        asm!(
            "mrs {hcr}, hcr_el2",
            "orr {t}, {hcr}, #0x10",
            "msr hcr_el2, {t}",
            "mrs {pmr}, icc_pmr_el1",
            "mov {t}, {win}",
            "msr icc_pmr_el1, {t}",
            "isb",
            "msr daifclr, #2",
            "isb",
            "nop",
            "nop",
            "nop",
            "nop",
            "msr daifset, #2",
            "isb",
            "msr icc_pmr_el1, {pmr}",
            "msr hcr_el2, {hcr}",
            "isb",
            hcr = out(reg) _,
            pmr = out(reg) _,
            t = out(reg) _,
            win = const WINDOW_PMR,
            options(nostack, preserves_flags),
        );
    }
    true
}

/// The generic counter (CNTPCT_EL0) and its frequency, for rate windows.
pub fn counter() -> (u64, u64) {
    let (now, freq): (u64, u64);
    // SAFETY: reads of the read-only generic timer counter and frequency registers.
    unsafe {
        asm!(
            "isb",
            "mrs {n}, cntpct_el0",
            "mrs {f}, cntfrq_el0",
            n = out(reg) now,
            f = out(reg) freq,
            options(nomem, nostack, preserves_flags),
        )
    };
    (now, freq.max(1))
}

/// The GIC maintenance interrupt (PPI 9, INTID 25): the virtual CPU interface asks for a
/// list-register refill (ICH_HCR_EL2.UIE, IHI 0069 §6.5 "Maintenance interrupts").
pub const MAINTENANCE_INTID: u32 = 25;
/// The EL1 virtual timer (CNTV, PPI 11, INTID 27): a guest's timer, injected into it.
pub const VTIMER_INTID: u32 = 27;
/// Priority of the guests' PPIs at the physical GIC: that of the EL2 timer, so the hypervisor's
/// own interrupt windows (PMR 0x80) leave them pending for the vCPU backend.
const GUEST_PPI_PRIORITY: u8 = 0x80;

/// What a physical interrupt taken on a guest exit was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestIrq {
    /// The EL2 timer: the slice is over (counted, timer stopped, completed).
    SliceEnd,
    /// The running guest's virtual timer fired (completed; the caller injects it).
    VirtualTimer,
    /// The maintenance interrupt (completed; the caller refills the list registers).
    Maintenance,
    /// A host device interrupt (dispatched to its handler and completed), or nothing.
    Other,
}

/// Acknowledges and completes one pending interrupt on a guest exit (or while a vCPU waits in
/// WFI) and says what it was; host device interrupts go to their handlers as in
/// `preempt::take_interrupt`.
pub fn take_guest_interrupt() -> GuestIrq {
    let iar = acknowledge();
    let intid = (iar & 0xff_ffff) as u32;
    match intid {
        super::preempt::HYP_TIMER_INTID => {
            super::preempt::timer_interrupt_taken();
            complete(iar);
            GuestIrq::SliceEnd
        }
        VTIMER_INTID => {
            complete(iar);
            GuestIrq::VirtualTimer
        }
        MAINTENANCE_INTID => {
            complete(iar);
            GuestIrq::Maintenance
        }
        _ => {
            dispatch_and_complete(iar);
            GuestIrq::Other
        }
    }
}

/// Enables the guests' PPIs (virtual timer, maintenance) at the calling CPU's redistributor:
/// Group 1, level, [`GUEST_PPI_PRIORITY`]. Called by the vCPU backend on each CPU that runs
/// guests, before the first entry.
pub fn enable_guest_ppis() -> Result<(), &'static str> {
    let (gicr, rd) = super::preempt::this_redistributor().ok_or("redistributor not up")?;
    for intid in [MAINTENANCE_INTID, VTIMER_INTID] {
        drivers::gicv3::enable_ppi(&gicr, rd, intid, GUEST_PPI_PRIORITY)
            .map_err(|_| "cannot enable a guest PPI")?;
    }
    Ok(())
}

/// Sets (`true`) or clears the active state of PPI `intid` at the calling CPU's
/// redistributor (GICR_ISACTIVER0 / GICR_ICACTIVER0). An active PPI is not signalled again
/// until it is deactivated: the virtual timer's physical PPI stays active while its virtual
/// INTID, linked to it by a list register's HW bit, is in the guest's hands.
pub fn set_ppi_active(intid: u32, active: bool) {
    use iommu::hw::Mmio;
    let Some((gicr, rd)) = super::preempt::this_redistributor() else {
        return;
    };
    if !(16..32).contains(&intid) {
        return;
    }
    let reg = if active {
        drivers::gicv3::gicr::ISACTIVER0
    } else {
        drivers::gicv3::gicr::ICACTIVER0
    };
    gicr.write32(rd + reg, 1 << intid);
}

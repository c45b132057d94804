//! SMMUv3 fault interrupts (SMMUv3 §7.2; registers IRQ_CTRL, IRQ_CTRLACK, GERROR, GERRORN):
//! the event queue and GERROR wired interrupts of each unit the IOMMU owner brought up, instead
//! of polling.
//!
//! - Bring-up ([`find_interrupts`], [`install`]): the `eventq` and `gerror` interrupts come from
//!   the device tree's smmuv3 node (`interrupts` / `interrupt-names`) or the IORT SMMUv3 node's
//!   Event/GERR GSIVs (IDR0.MSI = 0 on QEMU: the wired SPIs are the only way). Each is an
//!   edge-triggered Group 1 SPI at `irq::DEVICE_PRIORITY`, routed to the boot CPU, with a
//!   handler in `irq::HANDLERS`; the unit is created with IRQ_CTRL.EVENTQ_IRQEN|GERROR_IRQEN
//!   (`UnitConfig::irqs`).
//! - Interrupt context ([`on_eventq`], [`on_gerror`]): only sets the unit's pending flag (the
//!   table counts the interrupt).
//! - Normal context ([`drain`], called by every consumer of a unit's events: the guests' fault
//!   reporting and the driver suite): opens an interrupt window on this CPU, then reads the
//!   event queue and GERROR only if a flag is set. When the SPI's target CPU has not taken it
//!   (it runs a guest on another CPU, or is idle with interrupts masked), the SPI's pending
//!   state at the distributor is the signal: it is cleared there and counts as taken.
//! - Rate limiting (`iommu::smmuv3::irq::EventRateLimiter`): more than `smmu-irq-limit=` events
//!   (default [`DEFAULT_LIMIT`]) in a [`WINDOW_MS`] ms window and EVENTQ_IRQEN is cleared; the
//!   queue is then drained on every call (the scheduler calls after each guest exit, at least
//!   once per time slice) until the window ends, and the interrupt is re-enabled followed by
//!   one more drain (records written while it was off raised no interrupt).
//! - `smmu-faults=poll`: no interrupt is used; every drain reads the queue (also the fallback
//!   for a unit without usable wired interrupts).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use boot::BootInfo;
use drivers::gicv3::spi::{self, Trigger};
use iommu::hw::Mmio;
use iommu::smmuv3::irq::EventRateLimiter;
use iommu::smmuv3::regs::{Gerror, IrqCtrl, offset};
use iommu::smmuv3::{Event, EventPoll, SmmuUnit};
use spin::Mutex;

use crate::arch::irq::{DEVICE_PRIORITY, HANDLERS, counter, interrupt_window};
use crate::discovery::Platform;
use crate::mem::phys::MmioRegion;
use crate::println;

/// Units with interrupt state; more are polled.
const MAX_UNITS: usize = 4;
/// Events per window before the event interrupt is held off.
pub const DEFAULT_LIMIT: u64 = 256;
/// The rate window.
pub const WINDOW_MS: u64 = 10;
const NO_INTID: u32 = u32::MAX;

/// The wired interrupts of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitInterrupts {
    pub eventq: u32,
    pub gerror: u32,
    pub trigger: Trigger,
    pub source: &'static str,
}

struct UnitIrqState {
    eventq: AtomicU32,
    gerror: AtomicU32,
    /// Set by the handlers (Release), taken by `drain` (Acquire): the records and GERROR bits
    /// the SMMU wrote before raising the interrupt are visible to the drain that sees the flag.
    event_pending: AtomicBool,
    gerror_pending: AtomicBool,
    /// Interrupts noticed through the distributor's pending state instead of the handler.
    remote: AtomicU64,
    remote_gerror: AtomicU64,
    drains: AtomicU64,
    /// EVENTQ_IRQEN as last written.
    eventq_enabled: AtomicBool,
    limiter: Mutex<EventRateLimiter>,
    /// `limiter.limited()` as the last drain left it, for [`may_have_events`], which must not
    /// take the limiter's lock (a shared write per guest exit).
    limited: AtomicBool,
}

impl UnitIrqState {
    const fn new() -> Self {
        UnitIrqState {
            eventq: AtomicU32::new(NO_INTID),
            gerror: AtomicU32::new(NO_INTID),
            event_pending: AtomicBool::new(false),
            gerror_pending: AtomicBool::new(false),
            remote: AtomicU64::new(0),
            remote_gerror: AtomicU64::new(0),
            drains: AtomicU64::new(0),
            eventq_enabled: AtomicBool::new(false),
            limiter: Mutex::new(EventRateLimiter::new(DEFAULT_LIMIT, 1)),
            limited: AtomicBool::new(false),
        }
    }
}

static UNITS: [UnitIrqState; MAX_UNITS] = [const { UnitIrqState::new() }; MAX_UNITS];
static POLL_ONLY: AtomicBool = AtomicBool::new(false);
static LIMIT: AtomicU64 = AtomicU64::new(DEFAULT_LIMIT);

/// What `smmu-faults=` and `smmu-irq-limit=` ask for; an error for a bad value (the owner
/// refuses the bring-up, as for its other options).
pub fn parse_options(info: &BootInfo) -> Result<(), alloc::string::String> {
    match info.cmdline_value("smmu-faults") {
        None | Some("irq") => POLL_ONLY.store(false, Ordering::Relaxed),
        Some("poll") => POLL_ONLY.store(true, Ordering::Relaxed),
        Some(other) => {
            return Err(alloc::format!("smmu-faults={other}: expected irq or poll"));
        }
    }
    if let Some(v) = info.cmdline_value("smmu-irq-limit") {
        let n: u64 = v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| alloc::format!("smmu-irq-limit={v}: expected a positive number"))?;
        LIMIT.store(n, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether interrupts are to be used at all (`smmu-faults=poll` says no).
pub fn wanted() -> bool {
    !POLL_ONLY.load(Ordering::Relaxed)
}

/// The `eventq` and `gerror` interrupts of the SMMU at `base`: DT first, else IORT. `None` when
/// neither describes both as GIC SPIs (the unit is polled then).
pub fn find_interrupts(info: &BootInfo, platform: &Platform, base: u64) -> Option<UnitInterrupts> {
    if let Some(fdt) = crate::firmware::devicetree::fdt(info) {
        for node in iommu::firmware::devicetree::smmuv3_nodes(&fdt).flatten() {
            if node.base != base {
                continue;
            }
            let ev = node.interrupt_by_name("eventq");
            let ge = node.interrupt_by_name("gerror");
            if let (Some(ev), Some(ge)) = (ev, ge)
                && let (Some(e), Some(g)) = (ev.gic_intid(), ge.gic_intid())
                && e >= 32
                && g >= 32
            {
                // Third cell: IRQ_TYPE_EDGE_RISING = 1, EDGE_FALLING = 2, level = 4/8.
                let trigger = match ev.cell(2).unwrap_or(0) & 0xf {
                    1 | 2 => Trigger::Edge,
                    _ => Trigger::Level,
                };
                return Some(UnitInterrupts {
                    eventq: e,
                    gerror: g,
                    trigger,
                    source: "dt",
                });
            }
        }
    }
    use iommu::firmware::iort::{Iort, NodeKind};
    let iort = platform.acpi.as_ref()?.iort.as_ref()?;
    let iort = Iort::parse(iort.bytes).ok()?;
    iort.nodes().find_map(|n| match n.kind() {
        // The IORT's SMMUv3 GSIVs are edge-triggered SPIs (as Linux registers them from the IORT); 0 = not wired.
        NodeKind::SmmuV3(s)
            if n.smmu_base() == Some(base) && s.event_gsiv >= 32 && s.gerr_gsiv >= 32 =>
        {
            Some(UnitInterrupts {
                eventq: s.event_gsiv,
                gerror: s.gerr_gsiv,
                trigger: Trigger::Edge,
                source: "iort",
            })
        }
        _ => None,
    })
}

fn on_eventq(_intid: u32, unit: usize) {
    if let Some(u) = UNITS.get(unit) {
        u.event_pending.store(true, Ordering::Release);
    }
}

fn on_gerror(_intid: u32, unit: usize) {
    if let Some(u) = UNITS.get(unit) {
        u.gerror_pending.store(true, Ordering::Release);
    }
}

/// Configures the GIC for unit `index`'s interrupts and registers their handlers; `Err` (and
/// nothing enabled) if that is not possible, in which case the unit must be brought up without
/// IRQ_CTRL interrupts and is polled.
pub fn install(index: usize, irqs: &UnitInterrupts) -> Result<(), &'static str> {
    let state = UNITS.get(index).ok_or("more SMMUs than interrupt slots")?;
    let (gicd, typer, boot_affinity) =
        crate::arch::preempt::distributor().ok_or("GIC distributor not up")?;
    for (intid, handler) in [
        (irqs.eventq, on_eventq as fn(u32, usize)),
        (irqs.gerror, on_gerror),
    ] {
        if !HANDLERS.is_registered(intid) {
            HANDLERS
                .register(intid, handler, index)
                .map_err(|_| "interrupt handler table full or INTID taken")?;
        }
        spi::configure(
            &gicd,
            typer,
            intid,
            irqs.trigger,
            DEVICE_PRIORITY,
            boot_affinity,
        )
        .map_err(|_| "INTID is not an SPI of this GIC")?;
    }
    state.eventq.store(irqs.eventq, Ordering::Relaxed);
    state.gerror.store(irqs.gerror, Ordering::Relaxed);
    state.eventq_enabled.store(true, Ordering::Relaxed);
    let (_, freq) = counter();
    *state.limiter.lock() =
        EventRateLimiter::new(LIMIT.load(Ordering::Relaxed), freq * WINDOW_MS / 1000);
    Ok(())
}

/// Whether unit `index` runs on interrupts.
pub fn uses_interrupts(index: usize) -> bool {
    UNITS
        .get(index)
        .is_some_and(|u| u.eventq.load(Ordering::Relaxed) != NO_INTID)
}

/// Takes a flag: set by the handler, or the SPI still pending at the distributor because its
/// target CPU has not taken it (cleared there, counted as remote).
fn take(flag: &AtomicBool, intid: u32, remote: &AtomicU64) -> bool {
    if flag.swap(false, Ordering::Acquire) {
        return true;
    }
    let Some((gicd, typer, _)) = crate::arch::preempt::distributor() else {
        return false;
    };
    if spi::is_pending(&gicd, typer, intid).unwrap_or(false) {
        let _ = spi::clear_pending(&gicd, typer, intid);
        remote.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    false
}

/// Whether any of the first `units` units may have events or global errors to drain, read
/// without the IOMMU owner and without writing any shared word: a polled unit always may; one
/// on interrupts only when its event queue or GERROR interrupt was taken (the handler's flag),
/// is still pending at the distributor, or its rate limiter holds the event interrupt off (the
/// queue is then drained on every exit). Opens an interrupt window first, so an SPI pending for
/// this CPU is taken. The guests' fault drain after every exit asks this before taking the
/// owner exclusively (as x86_64 asks `irq::vtd::may_have_faults`), so exits of vCPUs on
/// several CPUs do not serialise on the owner when there is nothing to do.
///
/// The SPIs target the boot CPU (`install`): there the window takes a pending one, so the flags
/// say everything. Any other CPU also reads the SPIs' pending state at the distributor: the
/// boot CPU may be running a guest or idle with interrupts masked, and then only the pending
/// state shows the interrupt (`drain` clears it there and counts it as remote).
pub fn may_have_events(units: usize) -> bool {
    if units > MAX_UNITS {
        return true;
    }
    // The window takes nothing on a CPU whose GIC CPU interface is not up: then the pending
    // state is read as on any other CPU.
    let boot_cpu = interrupt_window() && crate::arch::smp::cpu_index() == 0;
    UNITS.iter().take(units).any(|s| {
        let (eventq, gerror) = (
            s.eventq.load(Ordering::Relaxed),
            s.gerror.load(Ordering::Relaxed),
        );
        if eventq == NO_INTID {
            return true;
        }
        // Acquire, as in `take`: the records behind a flag are visible to the drain.
        if s.event_pending.load(Ordering::Acquire)
            || s.gerror_pending.load(Ordering::Acquire)
            || s.limited.load(Ordering::Relaxed)
        {
            return true;
        }
        if boot_cpu {
            return false;
        }
        let Some((gicd, typer, _)) = crate::arch::preempt::distributor() else {
            return false;
        };
        [eventq, gerror]
            .into_iter()
            .any(|intid| spi::is_pending(&gicd, typer, intid).unwrap_or(false))
    })
}

/// Writes IRQ_CTRL and waits (bounded) for IRQ_CTRLACK to match (SMMUv3 §6.3).
fn set_irq_ctrl(mmio: &MmioRegion, bits: IrqCtrl) -> bool {
    mmio.write32(offset::IRQ_CTRL, bits.bits());
    (0..1_000_000).any(|_| mmio.read32(offset::IRQ_CTRLACK) == bits.bits())
}

/// Drains unit `index`'s event queue into `sink` if its interrupt said there is something to
/// drain (always, for a polled or rate-limited unit); `None` when nothing was read. GERROR is
/// handled with the drain (`poll_events` acknowledges it in GERRORN) and its bits reported.
pub fn drain(
    index: usize,
    unit: &mut SmmuUnit<'static, MmioRegion>,
    sink: &mut dyn FnMut(&Event),
) -> Option<EventPoll> {
    let Some(state) = UNITS.get(index).filter(|_| uses_interrupts(index)) else {
        return Some(unit.poll_events(sink));
    };
    interrupt_window();
    let ev = take(
        &state.event_pending,
        state.eventq.load(Ordering::Relaxed),
        &state.remote,
    );
    let ge = take(
        &state.gerror_pending,
        state.gerror.load(Ordering::Relaxed),
        &state.remote_gerror,
    );
    let mut limiter = state.limiter.lock();
    if !(ev || ge || limiter.limited()) {
        return None;
    }
    state.drains.fetch_add(1, Ordering::Relaxed);
    let mut poll = unit.poll_events(sink);
    let errors = Gerror::from_bits_retain(poll.global_errors);
    if !errors.is_empty() {
        let mut names = alloc::string::String::new();
        for (name, _) in errors.iter_names() {
            if !names.is_empty() {
                names.push('|');
            }
            names.push_str(name);
        }
        println!(
            "smmu{index}: GERROR {:#x} ({names}) acknowledged in GERRORN",
            errors.bits()
        );
    }
    let (now, _) = counter();
    let decision = limiter.after_drain(now, u64::from(poll.recorded));
    if decision.engaged_now {
        println!(
            "smmu{index}: event interrupt rate-limited: {} events in this {WINDOW_MS} ms window (limit {}), eventq INTID {} taken {} times; draining on the scheduler tick until the window ends",
            limiter.in_window(),
            LIMIT.load(Ordering::Relaxed),
            state.eventq.load(Ordering::Relaxed),
            HANDLERS.count(state.eventq.load(Ordering::Relaxed))
                + state.remote.load(Ordering::Relaxed),
        );
    }
    if decision.irq_enabled != state.eventq_enabled.load(Ordering::Relaxed) {
        let bits = if decision.irq_enabled {
            IrqCtrl::GERROR_IRQEN | IrqCtrl::EVENTQ_IRQEN
        } else {
            IrqCtrl::GERROR_IRQEN
        };
        if !set_irq_ctrl(unit.mmio(), bits) {
            println!("smmu{index}: IRQ_CTRLACK did not follow IRQ_CTRL {bits:?}");
        }
        state
            .eventq_enabled
            .store(decision.irq_enabled, Ordering::Relaxed);
        if decision.irq_enabled {
            // Records written while EVENTQ_IRQEN was clear raised no interrupt.
            let again = unit.poll_events(sink);
            poll.recorded += again.recorded;
            poll.overflowed |= again.overflowed;
            poll.global_errors |= again.global_errors;
            limiter.after_drain(now, u64::from(again.recorded));
        }
    }
    state.limited.store(limiter.limited(), Ordering::Relaxed);
    Some(poll)
}

/// Interrupt-path statistics of one unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Event queue interrupts taken by the handler (EL2 vector or guest exit).
    pub eventq_taken: u64,
    /// Event queue interrupts noticed pending at the distributor instead (target CPU busy).
    pub eventq_remote: u64,
    pub gerror_taken: u64,
    /// Drains an interrupt (or the limiter) caused.
    pub drains: u64,
    /// Windows in which the rate limiter held the event interrupt off.
    pub limited_windows: u64,
}

pub fn stats(index: usize) -> Stats {
    let Some(u) = UNITS.get(index) else {
        return Stats::default();
    };
    Stats {
        eventq_taken: HANDLERS.count(u.eventq.load(Ordering::Relaxed)),
        eventq_remote: u.remote.load(Ordering::Relaxed),
        gerror_taken: HANDLERS.count(u.gerror.load(Ordering::Relaxed))
            + u.remote_gerror.load(Ordering::Relaxed),
        drains: u.drains.load(Ordering::Relaxed),
        limited_windows: u.limiter.lock().engaged(),
    }
}

/// Finds and installs unit `index`'s interrupts unless `smmu-faults=poll`; prints the report
/// line and returns whether the unit is to enable them in IRQ_CTRL.
pub fn irq_bring_up(
    info: &BootInfo,
    platform: &Platform,
    index: usize,
    name: &str,
    base: u64,
) -> bool {
    if !wanted() {
        println!(
            "report: iommu {name} fault-interrupts=off (smmu-faults=poll): event queue polled"
        );
        return false;
    }
    let Some(irqs) = find_interrupts(info, platform, base) else {
        println!(
            "report: iommu {name} fault-interrupts=none (no wired eventq/gerror SPI described): event queue polled"
        );
        return false;
    };
    match install(index, &irqs) {
        Ok(()) => {
            println!(
                "report: iommu {name} fault-interrupts=on eventq={} gerror={} trigger={} source={} limit={}/{WINDOW_MS}ms",
                irqs.eventq,
                irqs.gerror,
                match irqs.trigger {
                    Trigger::Edge => "edge",
                    Trigger::Level => "level",
                },
                irqs.source,
                LIMIT.load(Ordering::Relaxed)
            );
            true
        }
        Err(e) => {
            println!("report: iommu {name} fault-interrupts=none ({e}): event queue polled");
            false
        }
    }
}

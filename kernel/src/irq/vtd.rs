//! The VT-d units' interrupts: fault events delivered as interrupts (VT-d 4.1 §7.3) instead of
//! polled, and interrupt remapping (chapter 5) on every unit that has it.
//!
//! Fault events: each unit gets a vector; FEDATA = the vector, FEADDR/FEUADDR = the boot CPU's
//! APIC ID (FEADDR bits 19:12 the low 8 bits, FEUADDR bits 31:8 the rest, which needs
//! ECAP.EIM; §11.4.9.3-4). Fault events are not subject to remapping (§5.1.4: the unit's own
//! interrupts go straight to the APIC). The handler ([`on_fault_event`]) marks the unit
//! pending and counts; [`drain`] reads the fault records only when marked. The rate limiter
//! of `iommu::vtd::fault_events` keeps FECTL.IM set after a burst; the drain then reads on
//! every call (every timer tick while guests run) until the window ends.
//!
//! `vtd-faults=poll` keeps FECTL.IM set and drains on every call (the behaviour before fault
//! interrupts, and the fallback for a unit whose fault event cannot reach the boot CPU);
//! `vtd-fault-burst=K` and `vtd-fault-window=T` (TSC ticks) set the limiter.

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use boot::BootInfo;
use iommu::hw::Mmio;
use iommu::vtd::fault_events::FaultEvents;
use iommu::vtd::intremap::{self, DestinationFormat, IrTable, Irte, SourceValidation};
use iommu::vtd::regs::{FaultRecord, offset};
use iommu::vtd::{FaultPoll, VtdUnit};
use spin::{Mutex, Once};

use super::{Handler, VECTORS};
use crate::arch::irq::{now, window};
use crate::mem::iommu_mem::IOMMU_MEMORY;
use crate::mem::phys::MmioRegion;
use crate::println;

/// Units with interrupt state; a machine with more polls the rest.
pub const MAX_UNITS: usize = 8;

/// FECTL (§11.4.9.1): IM, bit 31, masks the fault event.
const FECTL_IM: u32 = 1 << 31;
/// Default limiter: at most 64 fault interrupts per 2^30 TSC ticks (0.3-1 s on today's CPUs).
const DEFAULT_BURST: u32 = 64;
const DEFAULT_WINDOW: u64 = 1 << 30;

struct UnitIrq {
    events: FaultEvents,
    /// The unit's registers, for the handler's FECTL write (a copy of the owner's window).
    regs: Once<MmioRegion>,
    /// 0 = polled.
    vector: AtomicU8,
    drains: AtomicU64,
    polls: AtomicU64,
}

static UNITS: [UnitIrq; MAX_UNITS] = [const {
    UnitIrq {
        events: FaultEvents::new(DEFAULT_BURST, DEFAULT_WINDOW),
        regs: Once::new(),
        vector: AtomicU8::new(0),
        drains: AtomicU64::new(0),
        polls: AtomicU64::new(0),
    }
}; MAX_UNITS];

/// The interrupt remapping table of each unit that has remapping on.
static TABLES: Mutex<[Option<IrTable>; MAX_UNITS]> = Mutex::new([const { None }; MAX_UNITS]);
static POLL_ONLY: AtomicBool = AtomicBool::new(false);

/// The interrupt path for unit `u`'s fault event.
pub fn on_fault_event(u: usize) {
    let Some(unit) = UNITS.get(u) else {
        return;
    };
    // Marks and counts only: FECTL.IM is the drain's to write (see `fault_events`), so a
    // throttle decided here cannot land after a drain's unmask and leave the unit masked.
    let _ = unit.events.on_interrupt(now());
}

fn parse<T: core::str::FromStr>(info: &BootInfo, key: &str, default: T) -> T {
    match info.cmdline_value(key) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            log::warn!("irq: ignoring {key}={v:?} (not a number)");
            default
        }),
    }
}

/// Interrupt remapping, then fault events, on every unit the IOMMU owner holds.
pub fn init(info: &BootInfo) {
    let poll = match info.cmdline_value("vtd-faults") {
        None | Some("irq") => false,
        Some("poll") => true,
        Some(other) => {
            log::warn!("irq: ignoring vtd-faults={other:?} (irq or poll)");
            false
        }
    };
    POLL_ONLY.store(poll, Ordering::Relaxed);
    let burst = parse(info, "vtd-fault-burst", DEFAULT_BURST);
    let window = parse(info, "vtd-fault-window", DEFAULT_WINDOW);
    let mut owner = crate::iommu_owner::lock();
    let Some(o) = owner.as_mut() else {
        return;
    };
    let names: alloc::vec::Vec<String> = o.units.iter().map(|u| u.name.clone()).collect();
    let apic = crate::arch::apic::id();
    for (i, unit) in o.fd.hw_mut().units_mut().iter_mut().enumerate() {
        let name = names.get(i).map_or("vtd?", |s| s.as_str());
        if i >= MAX_UNITS {
            println!("{name}: fault events polled (more than {MAX_UNITS} units)");
            continue;
        }
        remapping_on(name, i, unit);
        // Polled until (unless) the event is set up below: no interrupt from a previous
        // owner's FEDATA/FEADDR.
        unit.mmio().write32(offset::FECTL, FECTL_IM);
        match (poll, apic) {
            (true, _) => println!("{name}: fault events polled (vtd-faults=poll)"),
            (false, None) => println!("{name}: fault events polled (no local APIC)"),
            (false, Some(dest)) => match fault_events_on(i, unit, dest, burst, window) {
                Ok(v) => println!(
                    "{name}: fault events on vector {v:#x} to APIC ID {dest}, at most {burst} per {window} TSC ticks"
                ),
                Err(e) => println!("{name}: fault events polled ({e})"),
            },
        }
    }
}

fn fault_events_on(
    i: usize,
    unit: &mut VtdUnit<MmioRegion>,
    dest: u32,
    burst: u32,
    window: u64,
) -> Result<u8, String> {
    // FEUADDR holds destination bits 31:8 only with EIM (§11.4.9.4).
    if dest > 0xff && !unit.regs().ecap.eim() {
        return Err(format!("APIC ID {dest} needs ECAP.EIM"));
    }
    let state = &UNITS[i];
    let vector = VECTORS
        .register_any(0x40, Handler::VtdFault(i as u16).token())
        .map_err(|e| format!("no vector: {e:?}"))?;
    let regs = *state.regs.call_once(|| *unit.mmio());
    state.events.configure(burst, window);
    state.vector.store(vector, Ordering::Release);
    // Records left by firmware or bring-up would hold PPF set: no event could ever be raised.
    unit.poll_faults(&mut |r| log::info!("vtd: fault left from before: {r}"));
    regs.write32(offset::FECTL, FECTL_IM);
    regs.write32(offset::FEDATA, u32::from(vector));
    regs.write32(offset::FEADDR, 0xfee0_0000 | (dest & 0xff) << 12);
    regs.write32(offset::FEUADDR, dest & !0xff);
    regs.write32(offset::FECTL, 0);
    Ok(vector)
}

fn remapping_on(name: &str, i: usize, unit: &mut VtdUnit<MmioRegion>) {
    let ecap = unit.regs().ecap;
    if !ecap.ir() {
        println!("{name}: no interrupt remapping (ECAP.IR = 0): device MSIs are not contained");
        return;
    }
    let x2apic = crate::arch::apic::is_x2apic();
    let format = if x2apic && ecap.eim() {
        DestinationFormat::X2apic
    } else {
        DestinationFormat::Xapic
    };
    if x2apic
        && format == DestinationFormat::Xapic
        && crate::arch::apic::id().is_some_and(|id| id > 0xff)
    {
        println!("{name}: interrupt remapping off: x2APIC ID above 255 and no ECAP.EIM");
        return;
    }
    let r = IrTable::new(&IOMMU_MEMORY, format)
        .and_then(|t| intremap::enable(unit, &IOMMU_MEMORY, &t, 1_000_000).map(|()| t));
    match r {
        Ok(t) => {
            println!(
                "{name}: interrupt remapping on ({}, {} entries), compatibility format blocked",
                if format == DestinationFormat::X2apic {
                    "EIM"
                } else {
                    "xAPIC destinations"
                },
                IrTable::ENTRIES
            );
            TABLES.lock()[i] = Some(t);
        }
        Err(e) => println!("{name}: interrupt remapping refused: {e}"),
    }
}

/// Whether any of the first `units` units may have fault records to drain: a polled unit
/// always may; one with a fault interrupt only when the interrupt announced records or its
/// limiter holds it masked. Opens an interrupt window first, so a pending event is taken. The
/// guests' fault drain after every exit checks this before taking the IOMMU owner exclusively,
/// so exits of vCPUs on several CPUs do not serialise on the owner when there is nothing to do.
#[inline(always)]
pub fn may_have_faults(units: usize) -> bool {
    window();
    units > UNITS.len()
        || UNITS
            .iter()
            .take(units)
            .any(|s| s.vector.load(Ordering::Acquire) == 0 || s.events.is_pending())
}

/// Reads unit `i`'s fault records into `sink` if its fault event announced some (or the unit
/// is polled or throttled); first opens an interrupt window so a pending event is taken.
pub fn drain(
    i: usize,
    unit: &mut VtdUnit<MmioRegion>,
    sink: &mut dyn FnMut(&FaultRecord),
) -> FaultPoll {
    let Some(state) = UNITS
        .get(i)
        .filter(|s| s.vector.load(Ordering::Acquire) != 0)
    else {
        if let Some(s) = UNITS.get(i) {
            s.polls.fetch_add(1, Ordering::Relaxed);
        }
        return unit.poll_faults(sink);
    };
    window();
    if !state.events.take_pending() {
        return FaultPoll::default();
    }
    state.drains.fetch_add(1, Ordering::Relaxed);
    // Throttled: mask before clearing the records, whose clearing would let the unit raise
    // the next event at once.
    if state.events.is_throttled()
        && let Some(regs) = state.regs.get()
    {
        regs.write32(offset::FECTL, FECTL_IM);
    }
    let poll = unit.poll_faults(sink);
    if state.events.take_report() {
        println!(
            "vtd: unit {i}: more than {} fault interrupts in {} TSC ticks: FECTL.IM kept set, draining on every tick until the window ends",
            state.events.burst(),
            state.events.window()
        );
    }
    if state.events.try_release(now())
        && let Some(regs) = state.regs.get()
    {
        regs.write32(offset::FECTL, 0);
    }
    poll
}

/// An IRTE for an MSI of the device whose DMA carries `ids` (its own requester ID first),
/// delivered to the boot CPU on `vector`; returns its index. The source check is
/// [`SourceValidation::for_device`]'s.
pub fn install_msi(
    i: usize,
    unit: &VtdUnit<MmioRegion>,
    ids: &[u16],
    vector: u8,
) -> Result<u16, String> {
    let source = SourceValidation::for_device(ids).ok_or("no requester ID")?;
    install(i, unit, source, vector)
}

/// An IRTE with an explicit source check (the scenarios also make entries for other IDs).
pub fn install(
    i: usize,
    unit: &VtdUnit<MmioRegion>,
    source: SourceValidation,
    vector: u8,
) -> Result<u16, String> {
    let mut tables = TABLES.lock();
    let table = tables
        .get_mut(i)
        .and_then(Option::as_mut)
        .ok_or("interrupt remapping is off on this unit")?;
    let irte = Irte {
        vector,
        destination: crate::arch::apic::id().ok_or("no local APIC")?,
        source,
        fault_processing_disabled: false,
    };
    let index = table
        .install(&IOMMU_MEMORY, &irte)
        .map_err(|e| format!("IRTE: {e:?}"))?;
    // The unit may have cached a not-present entry at this index (§6.5.2.7).
    unit.invalidate_interrupt_entries(&IOMMU_MEMORY, Some((index, 0)))
        .map_err(|e| format!("interrupt entry cache invalidation: {e}"))?;
    Ok(index)
}

/// Removes IRTE `index` of unit `i` (not present, then the entry cache invalidated).
pub fn remove(i: usize, unit: &VtdUnit<MmioRegion>, index: u16) -> Result<(), String> {
    let mut tables = TABLES.lock();
    let table = tables
        .get_mut(i)
        .and_then(Option::as_mut)
        .ok_or("interrupt remapping is off on this unit")?;
    if !table.remove(&IOMMU_MEMORY, index) {
        return Err(format!("IRTE {index} is not in use"));
    }
    unit.invalidate_interrupt_entries(&IOMMU_MEMORY, Some((index, 0)))
        .map_err(|e| format!("interrupt entry cache invalidation: {e}"))
}

/// Whether unit `i` has interrupt remapping on.
pub fn remapping(i: usize) -> bool {
    TABLES.lock().get(i).is_some_and(Option::is_some)
}

/// Fault-event interrupts taken by unit `i`, and windows in which its limiter engaged.
pub fn fault_interrupts(i: usize) -> (u64, u64) {
    UNITS
        .get(i)
        .map_or((0, 0), |s| (s.events.interrupts(), s.events.engaged()))
}

pub fn report() {
    for (i, s) in UNITS.iter().enumerate() {
        let v = s.vector.load(Ordering::Acquire);
        if v == 0 {
            continue;
        }
        println!(
            "report: vtd unit {i} fault events: {} interrupt(s) on vector {v:#x} ({} counted by the vector), {} drain(s), rate limiter engaged {} time(s)",
            s.events.interrupts(),
            VECTORS.count(v),
            s.drains.load(Ordering::Relaxed),
            s.events.engaged()
        );
    }
}

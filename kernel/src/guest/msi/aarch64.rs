//! aarch64: a guest's MSI becomes an ITS translation the hypervisor owns, whose LPI handler
//! posts the guest's virtual INTID to its vCPU 0 (docs/guests.md "Interrupts (aarch64)",
//! docs/interrupts.md "Guests").
//!
//! - **What the guest programs** (the guest-visible contract): the address is any address in
//!   the `RESV_MSI` window DEVICE_RESERVED_RANGES reports for the device (`its::MSI_IOVA_BASE`,
//!   1 MiB), the data is the virtual INTID it wants, 32-127 (a "virtual SPI": the guest has no
//!   distributor, it only acknowledges at its virtual CPU interface). Anything else is
//!   refused and the device's MSI stays disabled.
//! - **What the device is programmed with**: the doorbell (GITS_TRANSLATER) at its IOVA in the
//!   reserved window, which every SMMU domain maps (`SmmuBackend::set_msi_doorbell`), and an
//!   EventID of the hypervisor's choosing (the route's index). The ITS maps (DeviceID from
//!   `msi-map`/IORT, EventID) to an LPI in the collection of the CPU that made the route (the
//!   CPU running the vCPU that enabled MSI), so the LPI is taken where the guest runs.
//! - **Delivery**: the LPI's handler (no lock) reads the route's published target (Acquire,
//!   paired with the Release that published it before MAPTI), counts it and posts the vINTID
//!   to vCPU 0's slot; the EL1 backend moves it into a list register before the next entry.
//! - Removal: DISCARD (the device's writes of that EventID are then dropped by the ITS), then
//!   the target is cleared; the LPI keeps its handler (the table has no unregister) and is
//!   mapped again if the same device is routed again.

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use drivers::gicv3::vgic::{FIRST_MSI_VINTID, MAX_VINTID};
use spin::Mutex;

use super::{Device, GuestMsi, HostMsi};
use crate::its::{MSI_IOVA_BASE, MSI_IOVA_SIZE};
use crate::println;

/// Routes at once (the LPIs share the host's 16-entry handler table with the SMMU's SPIs).
const MAX_ROUTES: usize = 8;

/// What a route's LPI handler reads: 0 = no route; else bit 31, the vCPU slot in bits 23:8,
/// the virtual INTID in 7:0.
struct Published {
    target: AtomicU32,
    delivered: AtomicU64,
    /// The CPUs the LPI was taken on (bit per CPU index), measured in the handler.
    taken_on: AtomicU64,
}

/// The control side of a route, kept after removal so the same device reuses its LPI.
#[derive(Clone, Copy)]
struct Route {
    device: Device,
    device_id: u32,
    event: u32,
    lpi: u32,
    live: bool,
}

static PUBLISHED: [Published; MAX_ROUTES] = [const {
    Published {
        target: AtomicU32::new(0),
        delivered: AtomicU64::new(0),
        taken_on: AtomicU64::new(0),
    }
}; MAX_ROUTES];
static CONTROL: Mutex<[Option<Route>; MAX_ROUTES]> = Mutex::new([None; MAX_ROUTES]);
/// LPIs whose route was already gone (an MSI in flight while it was removed).
static STALE: AtomicU64 = AtomicU64::new(0);

/// The LPI handler of route `r` (interrupt context).
fn on_lpi(_intid: u32, r: usize) {
    let Some(p) = PUBLISHED.get(r) else {
        return;
    };
    let t = p.target.load(Ordering::Acquire);
    if t & 1 << 31 == 0 {
        STALE.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Counted before it is posted: the vCPU that takes the bit (Acquire) sees the count.
    p.delivered.fetch_add(1, Ordering::Relaxed);
    p.taken_on
        .fetch_or(1 << (crate::arch::smp::cpu_index() % 64), Ordering::Relaxed);
    let slot = ((t >> 8) & 0xffff) as usize;
    super::post(slot, t as u8);
}

/// How many live routes post to vCPU slot `slot` (a vCPU waiting in WFI with none and no
/// armed timer could never be woken).
pub fn routes_to(slot: usize) -> u32 {
    PUBLISHED
        .iter()
        .filter(|p| {
            let t = p.target.load(Ordering::Acquire);
            t & 1 << 31 != 0 && ((t >> 8) & 0xffff) as usize == slot
        })
        .count() as u32
}

pub fn route(dev: Device, msi: GuestMsi) -> Result<HostMsi, String> {
    unroute(dev);
    if !(MSI_IOVA_BASE..MSI_IOVA_BASE + MSI_IOVA_SIZE).contains(&msi.address) {
        return Err(format!(
            "guest MSI address {:#x} is not in the RESV_MSI window {MSI_IOVA_BASE:#x}+{MSI_IOVA_SIZE:#x}",
            msi.address
        ));
    }
    let vintid = msi.data;
    if !(FIRST_MSI_VINTID..MAX_VINTID).contains(&vintid) {
        return Err(format!(
            "guest MSI data {vintid:#x} is not a virtual INTID {FIRST_MSI_VINTID}-{}",
            MAX_VINTID - 1
        ));
    }
    let slot = super::slot(dev.guest, 0)
        .filter(|&s| super::is_bound(s))
        .ok_or("the guest's vCPU 0 takes no interrupts")?;
    let rid =
        u32::from(dev.bdf.bus) << 8 | u32::from(dev.bdf.device) << 3 | u32::from(dev.bdf.function);
    let (device_id, source) = crate::its::device_id(dev.segment, rid)?;
    let mut guard = crate::its::lock();
    let its = guard.as_mut().ok_or("no GICv3 ITS")?;
    let doorbell = MSI_IOVA_BASE + (its.translater() & 0xfff);
    let icid = its.collection_for_this_cpu()?;
    let mut control = CONTROL.lock();
    let r = control
        .iter()
        .position(|c| c.is_some_and(|c| c.device == dev))
        .or_else(|| control.iter().position(Option::is_none))
        .ok_or("no free MSI route")?;
    let event = r as u32;
    // Published before the ITS maps the event: the first LPI finds its target.
    PUBLISHED[r].delivered.store(0, Ordering::Relaxed);
    PUBLISHED[r].taken_on.store(0, Ordering::Relaxed);
    PUBLISHED[r]
        .target
        .store(1 << 31 | (slot as u32) << 8 | vintid, Ordering::Release);
    let mapped = match control[r] {
        Some(old) => its
            .remap_event(device_id, event, old.lpi, icid)
            .map(|()| old.lpi),
        None => its.map_event_to(device_id, event, icid, on_lpi, r),
    };
    let lpi = match mapped {
        Ok(l) => l,
        Err(e) => {
            PUBLISHED[r].target.store(0, Ordering::Release);
            return Err(e);
        }
    };
    control[r] = Some(Route {
        device: dev,
        device_id,
        event,
        lpi,
        live: true,
    });
    println!(
        "msi: guest {} {:04x}:{} MSI routed: vCPU 0 vINTID {vintid} <- LPI {lpi} (DeviceID {device_id:#x} from {source}, EventID {event}, collection {icid} = CPU {}), doorbell IOVA {doorbell:#x}",
        dev.guest,
        dev.segment,
        dev.bdf,
        crate::arch::smp::cpu_index()
    );
    Ok(HostMsi {
        address: doorbell,
        data: event,
    })
}

pub fn unroute(dev: Device) {
    let mut guard = crate::its::lock();
    let mut control = CONTROL.lock();
    for (r, slot) in control.iter_mut().enumerate() {
        let Some(route) = slot.as_mut().filter(|x| x.device == dev && x.live) else {
            continue;
        };
        // DISCARD first: from then on the device's write of this EventID is dropped by the
        // ITS; only then is the target cleared.
        if let Some(its) = guard.as_mut()
            && let Err(e) = its.discard(route.device_id, route.event)
        {
            println!("msi: DISCARD of EventID {}: {e}", route.event);
        }
        PUBLISHED[r].target.store(0, Ordering::Release);
        route.live = false;
        // The device's last route: its ITT goes too (a later route maps it again).
        let device_id = route.device_id;
        if let Some(its) = guard.as_mut()
            && let Err(e) = its.unmap_device(device_id)
        {
            println!("msi: unmapping DeviceID {device_id:#x}: {e}");
        }
        println!(
            "msi: guest {} {:04x}:{} MSI route removed (LPI {}, EventID {} discarded): {} interrupt(s) delivered, taken on CPU mask {:#x}, {} for removed routes so far",
            dev.guest,
            dev.segment,
            dev.bdf,
            route.lpi,
            route.event,
            PUBLISHED[r].delivered.load(Ordering::Relaxed),
            PUBLISHED[r].taken_on.load(Ordering::Relaxed),
            STALE.load(Ordering::Relaxed)
        );
    }
}

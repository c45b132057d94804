//! x86_64: a guest's MSI becomes a remappable-format MSI naming an IRTE the hypervisor owns
//! (VT-d 4.1 §5.1.2.2, §9.10), delivered on a host vector whose handler posts the guest's
//! virtual vector to the vCPU its virtual APIC ID names.
//!
//! - The IRTE's source check is the device's own (`SourceValidation::for_device`,
//!   docs/interrupts.md "Source-ID checks"), so no other requester can use the handle.
//! - Its destination is the physical CPU that made the route (the CPU of the vCPU that
//!   enabled MSI). When the target vCPU runs there, the interrupt's INTR exit has already
//!   taken it out of the guest; a vCPU on another CPU takes what was posted at its next exit
//!   (at most one time slice later; a halted one polls its posted bits while it waits).
//! - Only SVM vCPUs bind their slots (`msi::bind`); a route to a vCPU no backend delivers to
//!   (VMX, which does not inject interrupts) is refused.
//!
//! The handler ([`on_interrupt`]) takes no lock: it reads the route's published target
//! (Acquire, paired with the Release that published it before the IRTE became present),
//! counts the delivery and posts the vector.

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use drivers::x86_msi::GuestMsiTarget;
use iommu::vtd::intremap;
use spin::Mutex;

use super::{Device, GuestMsi, HostMsi};
use crate::irq::{Handler, VECTORS};
use crate::println;

/// Routes at once (every guest's assigned functions together).
const MAX_ROUTES: usize = 32;

/// What the handler of a route's host vector reads: 0 = no route; else bit 31 set,
/// bits 23:8 the vCPU slot, 7:0 the virtual vector.
struct Published {
    target: AtomicU32,
    delivered: AtomicU64,
}

/// The control side of a route (made and removed under [`CONTROL`]).
#[derive(Clone, Copy)]
struct Route {
    device: Device,
    vcpu: u8,
    vector: u8,
    host_vector: u8,
    unit: usize,
    irte: u16,
}

static PUBLISHED: [Published; MAX_ROUTES] = [const {
    Published {
        target: AtomicU32::new(0),
        delivered: AtomicU64::new(0),
    }
}; MAX_ROUTES];
static CONTROL: Mutex<[Option<Route>; MAX_ROUTES]> = Mutex::new([None; MAX_ROUTES]);

/// Interrupts whose route was already gone (an MSI in flight while it was removed).
static STALE: AtomicU64 = AtomicU64::new(0);

/// The interrupt path for route `r`'s host vector (interrupts closed; EOI follows).
pub fn on_interrupt(r: u16) {
    let Some(p) = PUBLISHED.get(usize::from(r)) else {
        return;
    };
    let t = p.target.load(Ordering::Acquire);
    if t & 1 << 31 == 0 {
        STALE.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Counted before it is posted: the vCPU that takes the bit (Acquire) sees the count.
    p.delivered.fetch_add(1, Ordering::Relaxed);
    super::post(((t >> 8) & 0xffff) as usize, t as u8);
}

pub fn route(dev: Device, msi: GuestMsi) -> Result<HostMsi, String> {
    unroute(dev);
    let target = GuestMsiTarget::decode(msi.address, msi.data)
        .map_err(|e| format!("guest MSI {:#x}/{:#x} refused: {e}", msi.address, msi.data))?;
    let slot = super::slot(dev.guest, usize::from(target.apic_id))
        .filter(|&s| super::is_bound(s))
        .ok_or_else(|| {
            format!(
                "guest MSI names APIC ID {}: no vCPU of this guest with that ID takes interrupts (SVM vCPUs only; VMX guests get no interrupts)",
                target.apic_id
            )
        })?;
    let mut owner = crate::iommu_owner::lock();
    let o = owner.as_mut().ok_or("no IOMMU owner")?;
    let d = o
        .device_index(dev.segment, dev.bdf)
        .and_then(|i| o.devices.get(i))
        .ok_or("the device is not one the IOMMU owner holds")?;
    let (unit_index, ids): (usize, alloc::vec::Vec<u16>) =
        (d.unit, d.ids.iter().map(|&id| id as u16).collect());
    if !crate::irq::vtd::remapping(unit_index) {
        return Err(
            "interrupt remapping is off on the device's VT-d unit: its MSI would not be contained"
                .into(),
        );
    }
    let mut control = CONTROL.lock();
    let r = control
        .iter()
        .position(Option::is_none)
        .ok_or("no free MSI route")?;
    let token = Handler::GuestMsi(r as u16).token();
    let host_vector = VECTORS
        .register_any(0x50, token)
        .map_err(|e| format!("no host vector: {e:?}"))?;
    // Published before the IRTE exists: the first interrupt finds its target.
    PUBLISHED[r].delivered.store(0, Ordering::Relaxed);
    PUBLISHED[r].target.store(
        1 << 31 | (slot as u32) << 8 | u32::from(target.vector),
        Ordering::Release,
    );
    let unit = &o.fd.hw_mut().units_mut()[unit_index];
    let irte = match crate::irq::vtd::install_msi(unit_index, unit, &ids, host_vector) {
        Ok(i) => i,
        Err(e) => {
            PUBLISHED[r].target.store(0, Ordering::Release);
            VECTORS.unregister(host_vector, token);
            return Err(e);
        }
    };
    control[r] = Some(Route {
        device: dev,
        vcpu: target.apic_id,
        vector: target.vector,
        host_vector,
        unit: unit_index,
        irte,
    });
    println!(
        "msi: guest {} {:04x}:{} MSI routed: vCPU {} vector {:#x} <- host vector {:#x}, IRTE {irte} to APIC ID {} (remappable handle, source check of the device)",
        dev.guest,
        dev.segment,
        dev.bdf,
        target.apic_id,
        target.vector,
        host_vector,
        crate::arch::apic::id().unwrap_or(0)
    );
    let (address, data) = intremap::remappable_msi(irte);
    Ok(HostMsi { address, data })
}

pub fn unroute(dev: Device) {
    // Lock order as in `route`: the IOMMU owner, then the routes.
    let mut owner = crate::iommu_owner::lock();
    let mut control = CONTROL.lock();
    for (r, slot) in control.iter_mut().enumerate() {
        let Some(route) = slot.filter(|x| x.device == dev) else {
            continue;
        };
        // The IRTE goes first (cleared, then the entry cache invalidated, VT-d 4.1 §6.5.2.7):
        // from then on the device's MSI is blocked with a fault; only then the target.
        let removed = owner.as_mut().map(|o| {
            let unit = &o.fd.hw_mut().units_mut()[route.unit];
            crate::irq::vtd::remove(route.unit, unit, route.irte)
        });
        if let Some(Err(e)) = removed {
            println!("msi: removing IRTE {}: {e}", route.irte);
        }
        PUBLISHED[r].target.store(0, Ordering::Release);
        VECTORS.unregister(route.host_vector, Handler::GuestMsi(r as u16).token());
        println!(
            "msi: guest {} {:04x}:{} MSI route removed (vCPU {} vector {:#x}, IRTE {} cleared): {} interrupt(s) delivered",
            dev.guest,
            dev.segment,
            dev.bdf,
            route.vcpu,
            route.vector,
            route.irte,
            PUBLISHED[r].delivered.load(Ordering::Relaxed)
        );
        *slot = None;
    }
}

/// End-of-run line: interrupts that arrived for a route already removed.
pub fn report() {
    println!(
        "report: guest msi: {} interrupt(s) for removed routes",
        STALE.load(Ordering::Relaxed)
    );
}

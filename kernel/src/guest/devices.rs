//! Device assignment (docs/guests.md "Devices"): which PCI functions a `dev=` item may name, and
//! what the guest gets for one: its memory BARs mapped into its second stage at their bus
//! addresses, an ABI `dev_id`, and Bus Master Enable (its DMA is still blocked by the IOMMU until
//! the guest attaches it through the ABI).
//!
//! Refused: functions that do not exist, bridges, functions behind no IOMMU unit, functions that
//! firmware needs for DMA to reserved memory (RMRR: they keep an identity domain owned by the
//! hypervisor, VT-d 4.1 §8.4), a function named twice, part of an IOMMU group (the whole group
//! goes to one guest or none of it goes anywhere), and BARs the guest could not use safely
//! (smaller than a page, so it would share the page with another device's registers; above
//! 4 GiB, outside the guest's boot page tables). The hypervisor's own devices (console UART,
//! IOMMU registers) are not PCI functions and cannot be named.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use boot::guests::{GuestConfig, PciAddress};
use drivers::pci::{BarKind, Bdf};

use crate::discovery::{Platform, Unit};

/// One device given to one guest.
#[derive(Clone, Copy, Debug)]
pub struct Assigned {
    /// Index of the guest's configuration item.
    pub guest: usize,
    pub addr: PciAddress,
    pub vendor: u16,
    pub device: u16,
    /// (bus address = GPA, size) of each memory BAR; (0, 0) for the others.
    pub bars: [(u64, u64); 6],
}

fn bdf(a: PciAddress) -> Bdf {
    Bdf {
        bus: a.bus,
        device: a.device,
        function: a.function,
    }
}

/// Checks every `dev=` of every configuration; `Err((item index, message))` for the first bad one.
pub fn resolve(
    platform: &Platform,
    configs: &[GuestConfig<'_>],
) -> Result<Vec<Assigned>, (usize, String)> {
    let mut out: Vec<Assigned> = Vec::new();
    for (gi, c) in configs.iter().enumerate() {
        for &a in c.devices() {
            let name = format!(
                "{:04x}:{:02x}:{:02x}.{}",
                a.segment, a.bus, a.device, a.function
            );
            let refuse = |why: &str| (gi, format!("dev={name}: {why}"));
            let seg = platform
                .segments
                .iter()
                .find(|s| s.segment == a.segment)
                .ok_or_else(|| refuse("no such PCI segment"))?;
            let f = seg
                .devices
                .get(bdf(a))
                .ok_or_else(|| refuse("no such PCI function"))?;
            if f.header_type != 0 {
                return Err(refuse("not an endpoint (bridges cannot be assigned)"));
            }
            let t = platform
                .devices
                .iter()
                .find(|d| d.segment == a.segment && d.bdf == bdf(a))
                .and_then(|d| d.translation.as_ref())
                .ok_or_else(|| refuse("not behind an IOMMU: its DMA could not be contained"))?;
            platform
                .units
                .iter()
                .find_map(|u| match u {
                    Unit::Vtd { name, base, .. } | Unit::Smmu { name, base, .. }
                        if *name == t.unit =>
                    {
                        Some(*base)
                    }
                    _ => None,
                })
                .ok_or_else(|| refuse("not behind an IOMMU unit the hypervisor drives"))?;
            // RMRRs are VT-d's (aarch64 has no such table).
            #[cfg(target_arch = "x86_64")]
            let sid = t.id as u16;
            #[cfg(target_arch = "x86_64")]
            if platform.rmrr.as_ref().is_some_and(|p| {
                p.devices()
                    .iter()
                    .any(|r| r.segment == a.segment && r.sid == sid)
            }) {
                return Err(refuse(
                    "firmware needs it for DMA to reserved memory (RMRR); the hypervisor keeps it",
                ));
            }
            if let Some(other) = out.iter().find(|o| o.addr == a) {
                return Err(refuse(&format!(
                    "already assigned to guest {}",
                    configs[other.guest].name
                )));
            }
            let mut bars = [(0, 0); 6];
            for (i, bar) in f.bars.iter().enumerate() {
                let Some(bar) = bar.filter(|b| b.is_live() && b.kind != BarKind::Io) else {
                    continue;
                };
                if bar.size < 4096 {
                    return Err(refuse(&format!(
                        "BAR{i} is smaller than a page and would share it with other registers"
                    )));
                }
                if bar.base.checked_add(bar.size).is_none_or(|e| e > 1 << 32) {
                    return Err(refuse(&format!(
                        "BAR{i} lies above 4 GiB, outside the guest's boot page tables"
                    )));
                }
                bars[i] = (bar.base, bar.size);
            }
            out.push(Assigned {
                guest: gi,
                addr: a,
                vendor: f.vendor_id,
                device: f.device_id,
                bars,
            });
        }
    }
    check_groups(platform, configs, &out)?;
    Ok(out)
}

/// Every IOMMU group is given whole to one guest or not at all (docs/abi.md §6.2): the members
/// of a group cannot be isolated from each other by the IOMMU (a shared DMA alias, no ACS), so
/// a group split between guests, or between a guest and the hypervisor, would let one reach the
/// other's memory. The refusal names the guest and the members it lacks.
fn check_groups(
    platform: &Platform,
    configs: &[GuestConfig<'_>],
    out: &[Assigned],
) -> Result<(), (usize, String)> {
    for seg in &platform.segments {
        let fns = seg.devices.functions();
        let owner_of = |i: usize| {
            let f = fns.get(i)?;
            out.iter()
                .find(|a| a.addr.segment == seg.segment && bdf(a.addr) == f.bdf)
                .map(|a| a.guest)
        };
        if let Err(incomplete) = seg.topology.check_assignment(&seg.devices, owner_of) {
            let missing: Vec<String> = seg
                .topology
                .missing_members(&seg.devices, &incomplete, owner_of)
                .filter_map(|i| fns.get(i))
                .map(|f| format!("{:04x}:{}", seg.segment, f.bdf))
                .collect();
            return Err((
                incomplete.owner,
                format!(
                    "guest {} gets part of an IOMMU group whose members cannot be isolated from each other; it must also get {} (the whole group, or none of it)",
                    configs[incomplete.owner].name,
                    missing.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Sets Bus Master Enable (and on the bridges above): the device's DMA now reaches the IOMMU,
/// which blocks it until the guest attaches the device.
pub fn enable_dma(platform: &Platform, a: &Assigned) -> bool {
    platform
        .segments
        .iter()
        .find(|s| s.segment == a.addr.segment)
        .is_some_and(|s| drivers::pci::enable_bus_master(&s.ecam, &s.devices, bdf(a.addr)))
}

//! PCI bring-up: ECAM windows from the MCFG (or the device tree), enumeration across bridges,
//! and BAR assignment where firmware left it undone.

use crate::mem::phys::MmioRegion;
use alloc::boxed::Box;
use alloc::vec::Vec;
use drivers::pci::{self, Bdf, ConfigSpace, Ecam, EnumConfig, PciDevices, Window};

/// Where an ECAM window came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcamSource {
    Mcfg,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))] // x86 has no device tree
    DeviceTree,
}

/// One PCI segment: its ECAM and what was found behind it.
pub struct Segment {
    pub segment: u16,
    pub ecam_base: u64,
    pub bus_start: u8,
    pub bus_end: u8,
    pub source: EcamSource,
    pub ecam: Ecam<MmioRegion>,
    pub devices: Box<PciDevices>,
    /// DMA aliases and IOMMU groups of `devices` (same indices).
    pub topology: Box<pci::Topology>,
    pub assign: Result<pci::AssignReport, pci::AssignError>,
}

/// Describes the ECAM windows to bring up.
#[derive(Clone, Copy, Debug)]
pub struct EcamWindow {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
    pub source: EcamSource,
}

/// Enumerates every segment and assigns resources from `windows` (bus addresses the host bridge
/// forwards). A segment whose ECAM is not reachable is reported and skipped.
pub fn bring_up(ecams: &[EcamWindow], windows: &[Window]) -> Vec<Segment> {
    let mut out = Vec::new();
    for w in ecams {
        let buses = u64::from(w.bus_end.saturating_sub(w.bus_start)) + 1;
        let mmio = match MmioRegion::new(w.base, buses << 20) {
            Ok(m) => m,
            Err(e) => {
                log::error!("pci: segment {} ECAM at {:#x}: {e}", w.segment, w.base);
                continue;
            }
        };
        let ecam = Ecam::new(mmio, w.segment, w.bus_start, w.bus_end);
        // ~120 KiB: copy the empty table straight from .rodata into the heap, never the stack.
        const EMPTY: PciDevices = PciDevices::new();
        let mut devices: Box<PciDevices> = Box::write(Box::new_uninit(), EMPTY);
        let config = EnumConfig {
            segment: w.segment,
            root_bus: w.bus_start,
            max_bus: w.bus_end,
            ..EnumConfig::new()
        };
        pci::enumerate(&ecam, &config, &mut devices);
        for e in devices.errors() {
            log::warn!("pci: {} {:?}", e.bdf, e.kind);
        }
        if devices.dropped_functions() > 0 {
            log::warn!(
                "pci: {} functions beyond the table capacity were ignored",
                devices.dropped_functions()
            );
        }
        // Isolation first: ACS controls must be on before any device is trusted to be alone in
        // its IOMMU group, and the groups are computed from what the ports kept.
        let isolating = pci::enable_acs(&ecam, &mut devices);
        log::debug!(
            "pci: segment {}: {isolating} functions isolate with ACS",
            w.segment
        );
        const NO_TOPOLOGY: pci::Topology = pci::Topology::new();
        let mut topology: Box<pci::Topology> = Box::write(Box::new_uninit(), NO_TOPOLOGY);
        pci::Topology::analyze(&devices, &mut topology);
        // No host-bridge description (ACPI-only machines describe it in AML `_CRS`, which we do
        // not interpret): trust the firmware, which assigned every BAR before handing over, and
        // allow only the spans it used.
        let derived;
        let windows = if windows.is_empty() {
            derived = firmware_spans(&devices);
            log::info!(
                "pci: segment {}: no host-bridge windows known; keeping firmware assignments within {:x?}",
                w.segment,
                derived
            );
            &derived[..]
        } else {
            windows
        };
        let assign = pci::assign_resources(&ecam, &mut devices, windows);
        if let Err(e) = &assign {
            log::warn!(
                "pci: segment {}: resource assignment incomplete: {e:?}",
                w.segment
            );
        }
        out.push(Segment {
            segment: w.segment,
            ecam_base: w.base,
            bus_start: w.bus_start,
            bus_end: w.bus_end,
            source: w.source,
            ecam,
            devices,
            topology,
            assign,
        });
    }
    out
}

/// One window per resource kind spanning the BARs firmware assigned (I/O, memory below 4 GiB,
/// 64-bit memory above it); kinds firmware did not use get none.
fn firmware_spans(devices: &PciDevices) -> Vec<Window> {
    use drivers::pci::{BarKind, WindowKind};
    let mut spans: [Option<(u64, u64)>; 3] = [None; 3];
    for f in devices.functions() {
        for bar in f
            .bars
            .iter()
            .flatten()
            .filter(|b| b.base != 0 && b.size != 0)
        {
            let slot = match bar.kind {
                BarKind::Io => 0,
                BarKind::Mem64 if bar.base >= 1 << 32 => 2,
                _ => 1,
            };
            let end = bar.base.saturating_add(bar.size);
            let span = spans[slot].get_or_insert((bar.base, end));
            *span = (span.0.min(bar.base), span.1.max(end));
        }
    }
    let kinds = [WindowKind::Io, WindowKind::Mem32, WindowKind::Mem64];
    spans
        .iter()
        .zip(kinds)
        .filter_map(|(s, kind)| {
            s.map(|(base, end)| Window {
                base,
                size: end - base,
                kind,
            })
        })
        .collect()
}

/// The enumerated hierarchy as the DMAR parser's view of bridges.
pub struct Topology<'a>(pub &'a [Segment]);

impl iommu::firmware::dmar::PciTopology for Topology<'_> {
    fn bridge_buses(&self, segment: u16, bus: u8, device: u8, function: u8) -> Option<(u8, u8)> {
        self.0
            .iter()
            .find(|s| s.segment == segment)
            .and_then(|s| s.devices.bridge_buses(segment, bus, device, function))
    }
}

impl Segment {
    /// Config-space access for drivers that use a device found here (edu in scenarios).
    #[allow(dead_code)]
    pub fn config(&self) -> &impl ConfigSpace {
        &self.ecam
    }

    #[allow(dead_code)]
    pub fn get(&self, bdf: Bdf) -> Option<&pci::PciFunction> {
        self.devices.get(bdf)
    }
}

/// `1M`, `4K`, `16G` … for the report.
pub struct Size(pub u64);

impl core::fmt::Display for Size {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let units = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in units {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

//! The flattened device tree the boot path passed (aarch64): PCI host bridge, SMMUv3 nodes and
//! QEMU's fw_cfg, decoded by `iommu::firmware::devicetree`.

use crate::mem::phys;
use alloc::vec::Vec;
use boot::BootInfo;
use drivers::pci::{Window, WindowKind};
use iommu::firmware::devicetree::{self as dt, PciSpace};

/// The DTB as a parsed tree, if the boot path passed a valid one.
pub fn fdt(info: &BootInfo) -> Option<fdt::Fdt<'static>> {
    let pa = info.dtb?;
    let len = super::dtb_len(info);
    if len < 40 {
        return None;
    }
    let bytes = phys::firmware_bytes(pa, len).ok()?;
    fdt::Fdt::new(bytes).ok()
}

/// The host bridge's memory windows as BAR windows (bus addresses), when the DT has a
/// `pci-host-ecam-generic` node. QEMU `virt` maps PCI memory 1:1 (bus = CPU address).
pub fn pci_windows(info: &BootInfo) -> Option<Vec<Window>> {
    let fdt = fdt(info)?;
    let bridge = dt::pci_host_bridge(&fdt, 0).ok()?;
    let mut out = Vec::new();
    for w in bridge.windows() {
        let kind = match w.space {
            PciSpace::Mem32 => WindowKind::Mem32,
            PciSpace::Mem64 => WindowKind::Mem64,
            PciSpace::Io => WindowKind::Io,
            PciSpace::Config => continue,
        };
        if kind != WindowKind::Io && w.pci_address != w.cpu_address {
            // BARs hold bus addresses; we only use windows where they equal CPU addresses, so
            // the direct map reaches the BARs without translation.
            continue;
        }
        // Memory above the direct map could never be reached by the hypervisor's drivers.
        if kind == WindowKind::Mem64
            && w.cpu_address.saturating_add(w.size) > crate::arch::direct_map_limit()
        {
            continue;
        }
        out.push(Window {
            base: w.pci_address,
            size: w.size,
            kind,
        });
    }
    Some(out)
}

/// The ECAM window from the DT, for machines without an MCFG.
pub fn ecam(info: &BootInfo) -> Option<crate::pci::EcamWindow> {
    let fdt = fdt(info)?;
    let b = dt::pci_host_bridge(&fdt, 0).ok()?;
    Some(crate::pci::EcamWindow {
        base: b.ecam.base,
        segment: b.domain.unwrap_or(0) as u16,
        bus_start: b.bus_start.min(255) as u8,
        bus_end: b.bus_end.min(255) as u8,
        source: crate::pci::EcamSource::DeviceTree,
    })
}

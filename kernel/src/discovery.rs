//! Platform discovery: firmware tables, PCI, and the IOMMU units that translate each device.
//! Everything here runs once on the boot CPU and ends in the boot report (`report:` lines) that
//! the QEMU scenarios check against the machine QEMU was told to build.

use crate::firmware::acpi::{self as acpi_fw, Acpi};
use crate::mem::phys::MmioRegion;
use crate::pci::{self, EcamSource, EcamWindow, Segment, Size, Topology};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use boot::BootInfo;
use drivers::pci::{BarKind, Window, WindowKind};
use iommu::firmware::dmar::Dmar;
use iommu::vtd::regs::VtdIdRegs;

/// An IOMMU unit found in firmware, with its identification registers.
pub enum Unit {
    Vtd { name: String, base: u64, segment: u16, include_pci_all: bool, regs: VtdIdRegs },
    #[allow(dead_code)]
    Smmu { name: String, base: u64, source: &'static str, regs: iommu::smmuv3::regs::SmmuIdRegs },
}

/// Which unit translates a PCI function, and with what ID.
pub struct Translation {
    pub unit: String,
    /// `rid=` (VT-d source ID) or `sid=` (SMMU StreamID).
    pub id_kind: &'static str,
    pub id: u32,
}

pub struct Platform {
    pub acpi: Option<Acpi>,
    pub segments: Vec<Segment>,
    pub units: Vec<Unit>,
}

/// Runs discovery and prints the boot report. Errors in firmware are reported, never fatal:
/// a machine without an IOMMU still boots and says so.
pub fn discover_and_report(info: &BootInfo) -> Platform {
    report_memory(info);
    let acpi = locate_rsdp(info).and_then(|rsdp| match acpi_fw::discover(rsdp) {
        Ok(a) => Some(a),
        Err(e) => {
            log::error!("acpi: {e}");
            None
        }
    });
    if let Some(a) = &acpi {
        let names: Vec<&str> = a.signatures.iter().map(|s| core::str::from_utf8(s).unwrap_or("????")).collect();
        println!("report: acpi rsdp={:#x} rev={} tables={}", a.rsdp, a.revision, names.join(","));
    } else {
        println!("report: acpi none");
    }

    let ecams: Vec<EcamWindow> = acpi
        .as_ref()
        .map(|a| {
            a.mcfg
                .iter()
                .map(|m| EcamWindow {
                    base: m.base,
                    segment: m.segment,
                    bus_start: m.bus_start,
                    bus_end: m.bus_end,
                    source: EcamSource::Mcfg,
                })
                .collect()
        })
        .unwrap_or_default();
    let windows = pci_windows(info, &ecams);
    for e in &ecams {
        println!(
            "report: ecam segment={} base={:#x} buses={:02x}-{:02x} source={:?}",
            e.segment, e.base, e.bus_start, e.bus_end, e.source
        );
    }
    let segments = pci::bring_up(&ecams, &windows);

    let mut units = Vec::new();
    let dmar = acpi.as_ref().and_then(|a| a.dmar).and_then(|t| match Dmar::parse(t.bytes) {
        Ok(d) => Some(d),
        Err(e) => {
            log::error!("dmar at {:#x}: {e}", t.phys);
            None
        }
    });
    if let Some(d) = &dmar {
        report_dmar(d, &mut units);
    }

    for s in &segments {
        for f in s.devices.functions() {
            let t = dmar.as_ref().and_then(|d| {
                let bdf = f.bdf;
                d.unit_for_device(s.segment, bdf.bus, bdf.device, bdf.function, &Topology(&segments)).map(|m| {
                    Translation { unit: format!("vtd{}", m.index), id_kind: "rid", id: u32::from(bdf.rid()) }
                })
            });
            report_function(s.segment, f, t.as_ref());
        }
    }
    if units.is_empty() {
        println!("report: iommu none");
    }
    Platform { acpi, segments, units }
}

fn report_memory(info: &BootInfo) {
    let f = crate::mem::frame::FRAMES.lock();
    let (heap_used, heap_size) = crate::mem::heap::stats();
    println!(
        "report: memory usable={} MiB free={} MiB heap={} KiB/{} KiB regions={}",
        info.usable_bytes() >> 20,
        f.free_bytes() >> 20,
        heap_used >> 10,
        heap_size >> 10,
        info.memory_regions().len()
    );
}

/// The RSDP: from the boot protocol, else the BIOS-area scan on x86, else fw_cfg on QEMU arm.
fn locate_rsdp(info: &BootInfo) -> Option<u64> {
    if let Some(r) = info.rsdp {
        return Some(r);
    }
    #[cfg(target_arch = "x86_64")]
    return acpi_fw::find_rsdp_in_bios_area();
    #[cfg(target_arch = "aarch64")]
    return crate::firmware::fw_cfg::load_acpi(info);
}

/// The bus-address windows BARs may be placed in.
///
/// x86: firmware describes them in the host bridge's `_CRS`, which needs an AML interpreter; we
/// use the architectural 32-bit hole instead: from the top of RAM below 4 GiB to the I/O APIC at
/// 0xFEC00000, minus the ECAM windows, and the I/O ports above 0xC000 that PC firmware uses.
fn pci_windows(info: &BootInfo, ecams: &[EcamWindow]) -> Vec<Window> {
    #[cfg(target_arch = "aarch64")]
    if let Some(w) = crate::firmware::devicetree::pci_windows(info) {
        return w;
    }
    let low_top = info
        .memory_regions()
        .iter()
        .filter(|r| r.kind != boot::MemoryKind::Reserved && r.start < 1 << 32)
        .map(|r| r.end().min(1 << 32))
        .max()
        .unwrap_or(0);
    let start = (low_top + 0xfff_ffff) & !0xfff_ffff; // 256 MiB aligned
    let mut cuts: Vec<(u64, u64)> = ecams
        .iter()
        .map(|e| (e.base, e.base + ((u64::from(e.bus_end - e.bus_start) + 1) << 20)))
        .collect();
    cuts.sort();
    let mut windows = Vec::new();
    let mut cursor = start;
    let end = 0xfec0_0000;
    for (a, b) in cuts {
        if a > cursor && cursor < end {
            windows.push(Window { base: cursor, size: a.min(end) - cursor, kind: WindowKind::Mem32 });
        }
        cursor = cursor.max(b);
    }
    if cursor < end {
        windows.push(Window { base: cursor, size: end - cursor, kind: WindowKind::Mem32 });
    }
    windows.push(Window { base: 0xc000, size: 0x4000, kind: WindowKind::Io });
    windows
}

fn report_dmar(d: &Dmar<'_>, units: &mut Vec<Unit>) {
    println!(
        "report: dmar haw={} flags={:?} drhd={} rmrr={} atsr={} satc={}",
        d.host_address_width(),
        d.flags(),
        d.drhds().count(),
        d.rmrrs().count(),
        d.atsrs().count(),
        d.satcs().count()
    );
    for (i, drhd) in d.drhds().enumerate() {
        let name = format!("vtd{i}");
        let base = drhd.register_base();
        let len = drhd.register_set_len().max(0x1000);
        let regs = match MmioRegion::new(base, len) {
            Ok(m) => VtdIdRegs::read(&m),
            Err(e) => {
                log::error!("{name}: {e}");
                continue;
            }
        };
        println!(
            "report: iommu {name} base={base:#x} segment={} version={} scope={}",
            drhd.segment(),
            regs.version,
            if drhd.include_pci_all() { "include-pci-all" } else { "explicit" }
        );
        println!("report: iommu {name} cap={:#018x} {}", regs.cap.0, regs.cap);
        println!("report: iommu {name} ecap={:#018x} {}", regs.ecap.0, regs.ecap);
        units.push(Unit::Vtd {
            name,
            base,
            segment: drhd.segment(),
            include_pci_all: drhd.include_pci_all(),
            regs,
        });
    }
    for r in d.rmrrs() {
        println!("report: rmrr {:#x}-{:#x} segment={}", r.base(), r.limit(), r.segment());
    }
}

fn report_function(segment: u16, f: &drivers::pci::PciFunction, t: Option<&Translation>) {
    let mut line = format!(
        "report: pci {}{} {:04x}:{:04x} class={:02x}{:02x}{:02x}",
        if segment != 0 { format!("{segment:04x}:") } else { String::new() },
        f.bdf,
        f.vendor_id,
        f.device_id,
        f.class,
        f.subclass,
        f.prog_if
    );
    if let Some((sec, sub)) = f.bridge_buses() {
        line += &format!(" bridge buses={sec:02x}-{sub:02x}");
    }
    for b in f.bars() {
        let kind = match b.kind {
            BarKind::Io => "io",
            BarKind::Mem32 => "mem32",
            BarKind::Mem64 => "mem64",
        };
        let pf = if b.prefetchable { " pref" } else { "" };
        line += &format!(" bar{}={:#x}/{} {kind}{pf}", b.index, b.base, Size(b.size));
    }
    match t {
        Some(t) => line += &format!(" iommu={} {}={:#06x}", t.unit, t.id_kind, t.id),
        None => line += " iommu=none",
    }
    println!("{line}");
}

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
use iommu::firmware::dmar::{DeviceScope, Dmar, ScopeType};
use iommu::vtd::regs::VtdIdRegs;

/// An IOMMU unit found in firmware, with its identification registers. The drivers (VT-d,
/// SMMUv3) take their units from here.
#[allow(dead_code)] // fields are the drivers' input; only the report reads them so far
pub enum Unit {
    Vtd {
        name: String,
        base: u64,
        /// Bytes of register space the DRHD declares (at least one page).
        regs_len: u64,
        segment: u16,
        include_pci_all: bool,
        regs: VtdIdRegs,
    },
    Smmu {
        name: String,
        base: u64,
        source: &'static str,
        regs: iommu::smmuv3::regs::SmmuIdRegs,
    },
}

/// Which unit translates a PCI function, and with what ID.
pub struct Translation {
    pub unit: String,
    /// `rid=` (VT-d source ID) or `sid=` (SMMU StreamID).
    pub id_kind: &'static str,
    pub id: u32,
}

/// What discovery found; scenarios and the IOMMU drivers start from it.
#[allow(dead_code)] // consumed by the driver scenarios that build on discovery
pub struct Platform {
    pub acpi: Option<Acpi>,
    pub segments: Vec<Segment>,
    pub units: Vec<Unit>,
    /// Every PCI function with the unit that translates it (same order as the report).
    pub devices: Vec<Device>,
    /// Devices firmware requires to keep DMA to reserved memory (DMAR RMRRs): identity-mapped
    /// by the VT-d units and never assignable to a guest (VT-d 4.1 §8.4).
    #[cfg(target_arch = "x86_64")]
    pub rmrr: Option<alloc::boxed::Box<iommu::vtd::rmrr::RmrrPlan>>,
}

/// A PCI function and its translation.
#[allow(dead_code)] // aliases_complete and group await the guest-assignment check (no guest configuration yet)
pub struct Device {
    pub segment: u16,
    pub bdf: drivers::pci::Bdf,
    pub translation: Option<Translation>,
    /// The IDs the translating unit sees for this function's DMA, one per DMA alias, its own
    /// first: VT-d source-ids, or SMMU StreamIDs mapped through the IORT/DT. Every one must be
    /// programmed when the device is attached. Empty without a translating unit.
    pub ids: Vec<u32>,
    /// Every alias is in `ids` (none truncated, none mapped elsewhere). A device without this
    /// cannot be isolated and must not be given to a guest.
    pub aliases_complete: bool,
    /// Its IOMMU group (numbered across segments, as in the report).
    pub group: usize,
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
        let names: Vec<&str> = a
            .signatures
            .iter()
            .map(|s| core::str::from_utf8(s).unwrap_or("????"))
            .collect();
        println!(
            "report: acpi rsdp={:#x} rev={} tables={}",
            a.rsdp,
            a.revision,
            names.join(",")
        );
        #[cfg(target_arch = "aarch64")]
        report_arm_acpi(a);
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
    #[cfg(target_arch = "aarch64")]
    let ecams = if ecams.is_empty() {
        crate::firmware::devicetree::ecam(info)
            .into_iter()
            .collect()
    } else {
        ecams
    };
    let windows = pci_windows(info, &ecams);
    let segments = pci::bring_up(&ecams, &windows);
    for s in &segments {
        let resources = match &s.assign {
            Ok(r) => format!(
                "bars-kept={} bars-assigned={} bridges-programmed={}",
                r.kept, r.assigned, r.bridges_programmed
            ),
            Err(e) => format!("incomplete ({e:?})"),
        };
        println!(
            "report: ecam segment={} base={:#x} buses={:02x}-{:02x} source={:?} functions={} {resources}",
            s.segment,
            s.ecam_base,
            s.bus_start,
            s.bus_end,
            s.source,
            s.devices.functions().len()
        );
    }

    let mut units = Vec::new();
    let mut devices = Vec::new();
    let dmar = acpi
        .as_ref()
        .and_then(|a| a.dmar)
        .and_then(|t| match Dmar::parse(t.bytes) {
            Ok(d) => Some(d),
            Err(e) => {
                log::error!("dmar at {:#x}: {e}", t.phys);
                None
            }
        });
    if let Some(d) = &dmar {
        report_dmar(d, &mut units);
    }
    #[cfg(target_arch = "x86_64")]
    let rmrr = dmar.as_ref().map(|d| {
        let plan =
            alloc::boxed::Box::new(iommu::vtd::rmrr::RmrrPlan::build(d, &Topology(&segments)));
        report_rmrr(&plan);
        plan
    });
    #[cfg(target_arch = "aarch64")]
    let arm = arm::Smmus::discover(info, acpi.as_ref(), &mut units);

    let mut group_base = 0;
    for s in &segments {
        for (index, f) in s.devices.functions().iter().enumerate() {
            let bdf = f.bdf;
            let t = dmar.as_ref().and_then(|d| {
                d.unit_for_device(
                    s.segment,
                    bdf.bus,
                    bdf.device,
                    bdf.function,
                    &Topology(&segments),
                )
                .map(|m| Translation {
                    unit: format!("vtd{}", m.index),
                    id_kind: "rid",
                    id: u32::from(bdf.rid()),
                })
            });
            #[cfg(target_arch = "aarch64")]
            let t = t.or_else(|| arm.translate(s.segment, bdf.rid(), &units, true));
            let aliases = s.topology.aliases(index);
            // The IDs the unit sees for each alias: the requester ID itself for VT-d (its
            // source-id), the IORT/DT-mapped StreamID for an SMMU. An alias that the firmware
            // maps to another unit (or not at all) cannot be programmed with the device.
            let ids: Vec<u32> = match &t {
                None => Vec::new(),
                Some(t) => aliases
                    .map(|a| a.as_slice())
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|&rid| {
                        #[cfg(target_arch = "aarch64")]
                        let mapped = arm
                            .translate(s.segment, rid, &units, false)
                            .filter(|m| m.unit == t.unit)
                            .map(|m| m.id);
                        #[cfg(not(target_arch = "aarch64"))]
                        let mapped = Some(u32::from(rid));
                        if mapped.is_none() {
                            log::warn!(
                                "pci {bdf}: DMA alias {} is not translated by {}",
                                drivers::pci::Bdf::from_rid(rid),
                                t.unit
                            );
                        }
                        mapped
                    })
                    .collect(),
            };
            let complete = aliases.is_some_and(|a| !a.truncated())
                && ids.len() == aliases.map_or(0, |a| a.as_slice().len());
            if t.is_some() && !complete {
                log::warn!("pci {bdf}: not every DMA alias can be translated: not assignable");
            }
            let group = group_base + s.topology.group_of(index).unwrap_or(0);
            #[cfg(target_arch = "x86_64")]
            let host_owned = rmrr
                .as_ref()
                .is_some_and(|p| p.device(s.segment, bdf.rid()).is_some());
            #[cfg(not(target_arch = "x86_64"))]
            let host_owned = false;
            report_function(s.segment, f, t.as_ref(), &ids, group, host_owned);
            devices.push(Device {
                segment: s.segment,
                bdf,
                translation: t,
                ids,
                aliases_complete: complete,
                group,
            });
        }
        report_groups(s, group_base);
        group_base += s.topology.group_count();
    }
    #[cfg(target_arch = "aarch64")]
    if !arm.report_agreement() {
        println!(
            "report: boot refused: the IORT and the device tree map requester IDs to different SMMU StreamIDs"
        );
        crate::finish(crate::EXIT_FAILURE);
    }
    if units.is_empty() {
        println!("report: iommu none");
    }
    Platform {
        acpi,
        segments,
        units,
        devices,
        #[cfg(target_arch = "x86_64")]
        rmrr,
    }
}

#[cfg(target_arch = "x86_64")]
fn report_rmrr(plan: &iommu::vtd::rmrr::RmrrPlan) {
    println!(
        "report: rmrr devices={} issues={} complete={}",
        plan.devices().len(),
        plan.issues().len() + plan.issues_dropped(),
        if plan.is_complete() { "yes" } else { "no" }
    );
    for d in plan.devices() {
        let ranges: Vec<String> = d
            .ranges()
            .iter()
            .map(|r| format!("{:#x}-{:#x}", r.start, r.end - 1))
            .collect();
        println!(
            "report: rmrr {:04x}:{} vtd{} identity={} assignable=no",
            d.segment,
            drivers::pci::Bdf::from_rid(d.sid),
            d.drhd_index,
            ranges.join(",")
        );
    }
    for i in plan.issues() {
        log::warn!("rmrr: {i}");
    }
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
    {
        if let Some(w) = crate::firmware::devicetree::pci_windows(info) {
            return w;
        }
        // Without a device tree (UEFI, ACPI only) the windows are in AML: let PCI bring-up keep
        // what firmware assigned (see `pci::bring_up`) rather than guess an x86-style hole.
        if info.dtb.is_none() {
            return Vec::new();
        }
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
        .map(|e| {
            (
                e.base,
                e.base + ((u64::from(e.bus_end - e.bus_start) + 1) << 20),
            )
        })
        .collect();
    cuts.sort();
    let mut windows = Vec::new();
    let mut cursor = start;
    let end = 0xfec0_0000;
    for (a, b) in cuts {
        if a > cursor && cursor < end {
            windows.push(Window {
                base: cursor,
                size: a.min(end) - cursor,
                kind: WindowKind::Mem32,
            });
        }
        cursor = cursor.max(b);
    }
    if cursor < end {
        windows.push(Window {
            base: cursor,
            size: end - cursor,
            kind: WindowKind::Mem32,
        });
    }
    windows.push(Window {
        base: 0xc000,
        size: 0x4000,
        kind: WindowKind::Io,
    });
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
        // Reading the identification registers has no side effects, even where no unit is.
        let (regs, absent) = match MmioRegion::new(base, len) {
            Ok(m) => (VtdIdRegs::read(&m), VtdIdRegs::probe(&m).err()),
            Err(e) => {
                log::error!("{name}: {e}");
                continue;
            }
        };
        println!(
            "report: iommu {name} base={base:#x} segment={} version={} scope={}",
            drhd.segment(),
            regs.version,
            if drhd.include_pci_all() {
                "include-pci-all"
            } else {
                "explicit"
            }
        );
        println!("report: iommu {name} cap={:#018x} {}", regs.cap.0, regs.cap);
        println!(
            "report: iommu {name} ecap={:#018x} {}",
            regs.ecap.0, regs.ecap
        );
        if let Some(why) = absent {
            // Tables name units a machine lacks; VtdUnit::new refuses them the same way.
            println!("report: iommu {name} absent ({why}): will not be programmed");
        }
        for scope in drhd.scopes() {
            println!("report: iommu {name} scope {}", scope_text(&scope));
        }
        units.push(Unit::Vtd {
            name,
            base,
            regs_len: len,
            segment: drhd.segment(),
            include_pci_all: drhd.include_pci_all(),
            regs,
        });
    }
    for r in d.rmrrs() {
        println!(
            "report: rmrr {:#x}-{:#x} segment={}",
            r.base(),
            r.limit(),
            r.segment()
        );
        for scope in r.scopes() {
            println!(
                "report: rmrr {:#x}-{:#x} scope {}",
                r.base(),
                r.limit(),
                scope_text(&scope)
            );
        }
    }
    for (i, a) in d.atsrs().enumerate() {
        println!(
            "report: atsr{i} segment={} all-ports={}",
            a.segment(),
            if a.all_ports() { "yes" } else { "no" }
        );
        for scope in a.scopes() {
            println!("report: atsr{i} scope {}", scope_text(&scope));
        }
    }
    for (i, a) in d.satcs().enumerate() {
        println!(
            "report: satc{i} segment={} atc-required={}",
            a.segment(),
            if a.atc_required() { "yes" } else { "no" }
        );
        for scope in a.scopes() {
            println!("report: satc{i} scope {}", scope_text(&scope));
        }
    }
}

/// `ioapic 00:1e.1 enum=8`, `bridge 80:02.0`, `endpoint 00:1c.7/00.0` (start bus, then each
/// hop of the path, VT-d 4.1 §8.3.1); the enumeration id only where it means something.
fn scope_text(scope: &DeviceScope<'_>) -> String {
    let kind = match scope.scope_type() {
        ScopeType::Endpoint => "endpoint",
        ScopeType::Bridge => "bridge",
        ScopeType::IoApic => "ioapic",
        ScopeType::Hpet => "hpet",
        ScopeType::AcpiNamespaceDevice => "acpi",
        ScopeType::Reserved(_) => "reserved",
    };
    let mut text = format!("{kind} {:02x}:", scope.start_bus());
    for (i, hop) in scope.path().enumerate() {
        if i > 0 {
            text.push('/');
        }
        text.push_str(&format!("{hop}"));
    }
    match scope.scope_type() {
        ScopeType::IoApic | ScopeType::Hpet | ScopeType::AcpiNamespaceDevice => {
            text.push_str(&format!(" enum={}", scope.enumeration_id()));
        }
        ScopeType::Reserved(raw) => text.push_str(&format!(" type={raw}")),
        _ => {}
    }
    text
}

fn segment_prefix(segment: u16) -> String {
    if segment != 0 {
        format!("{segment:04x}:")
    } else {
        String::new()
    }
}

/// One line per IOMMU group of the segment, with why its members are together.
fn report_groups(s: &Segment, group_base: usize) {
    let fns = s.devices.functions();
    for g in 0..s.topology.group_count() {
        let members: Vec<String> = s
            .topology
            .members(g)
            .filter_map(|i| fns.get(i))
            .map(|f| format!("{}{}", segment_prefix(s.segment), f.bdf))
            .collect();
        println!(
            "report: group {} members={} reason={}",
            group_base + g,
            members.join(","),
            s.topology.reasons(g)
        );
    }
}

fn report_function(
    segment: u16,
    f: &drivers::pci::PciFunction,
    t: Option<&Translation>,
    ids: &[u32],
    group: usize,
    host_owned: bool,
) {
    let mut line = format!(
        "report: pci {}{} {:04x}:{:04x} class={:02x}{:02x}{:02x}",
        segment_prefix(segment),
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
    if let Some(acs) = f.caps.acs {
        line += &format!(" acs=cap:{:#x},ctl:{:#x}", acs.capability, acs.control);
    }
    match t {
        Some(t) => line += &format!(" iommu={} {}={:#06x}", t.unit, t.id_kind, t.id),
        None => line += " iommu=none",
    }
    if let (Some(t), true) = (t, ids.len() > 1) {
        let list: Vec<String> = ids.iter().map(|id| format!("{id:#06x}")).collect();
        line += &format!(" aliases={}:{}", t.id_kind, list.join(","));
    }
    line += &format!(" group={group}");
    if host_owned {
        line += " assignable=no(rmrr)";
    }
    println!("{line}");
}

/// SMMUv3 discovery on aarch64: the IORT (from fw_cfg or UEFI) and the device tree describe the
/// same hardware independently; both are read, merged by register base, and cross-checked for
/// every PCI function's StreamID.
#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{Translation, Unit};
    use crate::firmware::acpi::Acpi;
    use crate::mem::phys::MmioRegion;
    use crate::println;
    use alloc::format;
    use alloc::vec::Vec;
    use boot::BootInfo;
    use core::cell::Cell;
    use drivers::pci::IdAgreement;
    use iommu::firmware::devicetree as dt;
    use iommu::firmware::iort::{Iort, NodeKind};
    use iommu::smmuv3::regs::SmmuIdRegs;

    pub struct Smmus {
        iort: Option<Iort<'static>>,
        fdt: Option<fdt::Fdt<'static>>,
        agree: Cell<usize>,
        disagree: Cell<usize>,
    }

    impl Smmus {
        pub fn discover(info: &BootInfo, acpi: Option<&Acpi>, units: &mut Vec<Unit>) -> Smmus {
            let iort = acpi
                .and_then(|a| a.iort)
                .and_then(|t| match Iort::parse(t.bytes) {
                    Ok(i) => Some(i),
                    Err(e) => {
                        log::error!("iort at {:#x}: {e}", t.phys);
                        None
                    }
                });
            let fdt = crate::firmware::devicetree::fdt(info);
            let mut bases: Vec<(u64, bool, bool)> = Vec::new(); // (base, in IORT, in DT)
            if let Some(i) = &iort {
                println!("report: iort rev={} nodes={}", i.revision(), i.node_count());
                for n in i.nodes() {
                    if let (NodeKind::SmmuV3(_), Some(b)) = (n.kind(), n.smmu_base()) {
                        bases.push((b, true, false));
                    }
                }
            }
            if let Some(f) = &fdt {
                for node in dt::smmuv3_nodes(f).flatten() {
                    match bases.iter_mut().find(|(b, _, _)| *b == node.base) {
                        Some(e) => e.2 = true,
                        None => bases.push((node.base, false, true)),
                    }
                }
            }
            for (i, (base, in_iort, in_dt)) in bases.iter().enumerate() {
                let name = format!("smmu{i}");
                let source = match (in_iort, in_dt) {
                    (true, true) => "iort+dt",
                    (true, false) => "iort",
                    _ => "dt",
                };
                // Page 0 holds the ID registers; the architecture defines a 128 KiB frame.
                let regs = match MmioRegion::new(*base, 0x2_0000) {
                    Ok(m) => SmmuIdRegs::read(&m),
                    Err(e) => {
                        log::error!("{name}: {e}");
                        continue;
                    }
                };
                println!(
                    "report: iommu {name} base={base:#x} source={source} version={}",
                    regs.aidr
                );
                println!("report: iommu {name} idr {regs}");
                units.push(Unit::Smmu {
                    name,
                    base: *base,
                    source,
                    regs,
                });
            }
            Smmus {
                iort,
                fdt,
                agree: Cell::new(0),
                disagree: Cell::new(0),
            }
        }

        /// The StreamID of `rid` per IORT and per DT; both must agree when both exist
        /// ([`IdAgreement`]). A conflict is logged, counted (it fails the boot once every ID
        /// was looked at, see [`report_agreement`](Self::report_agreement)) and translates to
        /// nothing. `device` counts an agreement towards the per-device total of the report
        /// (DMA aliases of a device are checked without counting).
        pub fn translate(
            &self,
            segment: u16,
            rid: u16,
            units: &[Unit],
            device: bool,
        ) -> Option<Translation> {
            let by_iort = self
                .iort
                .as_ref()
                .and_then(|i| i.resolve_rid(segment, u32::from(rid)).ok())
                .map(|r| (r.base_address, r.stream_id));
            let by_dt = self
                .fdt
                .as_ref()
                .and_then(|f| dt::resolve_pci_rid(f, u32::from(segment), u32::from(rid)).ok())
                .map(|r| (r.iommu_base, r.stream_id));
            let agreement = IdAgreement::reconcile(by_iort, by_dt);
            if device && agreement.is_agreement() {
                self.agree.set(self.agree.get() + 1);
            }
            let (base, sid) = match agreement.target() {
                Ok(t) => t?,
                Err((iort, dt)) => {
                    self.disagree.set(self.disagree.get() + 1);
                    log::error!(
                        "firmware disagree on RID {rid:#06x}: IORT says SMMU {:#x} SID {:#x}, DT says SMMU {:#x} SID {:#x}",
                        iort.0,
                        iort.1,
                        dt.0,
                        dt.1
                    );
                    return None;
                }
            };
            let unit = units.iter().find_map(|u| match u {
                Unit::Smmu { name, base: b, .. } if *b == base => Some(name.clone()),
                _ => None,
            })?;
            Some(Translation {
                unit,
                id_kind: "sid",
                id: sid,
            })
        }

        /// Prints the cross-check result; `false` if any requester ID was mapped differently
        /// by the two descriptions (the caller refuses the boot, as the README documents).
        pub fn report_agreement(&self) -> bool {
            if self.iort.is_none() || self.fdt.is_none() {
                return true;
            }
            if self.disagree.get() == 0 {
                println!(
                    "report: firmware iort and devicetree agree on {} devices",
                    self.agree.get()
                );
                true
            } else {
                println!(
                    "report: firmware iort and devicetree disagree on {} requester IDs",
                    self.disagree.get()
                );
                false
            }
        }
    }
}

/// The ACPI-only description of an Arm machine: GIC (MADT), timer interrupts (GTDT) and debug
/// ports (DBG2). A malformed table is reported and otherwise ignored.
#[cfg(target_arch = "aarch64")]
fn report_arm_acpi(a: &acpi_fw::Acpi) {
    use iommu::firmware::{dbg2, gtdt::Gtdt, madt::Madt};
    if let Some(t) = a.madt {
        match Madt::parse(t.bytes) {
            Ok(m) => {
                let gicd = m
                    .gicd
                    .map_or("none".into(), |(b, v)| alloc::format!("{b:#x} v{v}"));
                let gicr: Vec<alloc::string::String> = m
                    .gicr_ranges
                    .iter()
                    .map(|(b, l)| alloc::format!("{b:#x}+{l:#x}"))
                    .collect();
                let its: Vec<alloc::string::String> =
                    m.its.iter().map(|b| alloc::format!("{b:#x}")).collect();
                println!(
                    "report: madt gicd={gicd} gicr={} its={} cpus={} enabled={}",
                    if gicr.is_empty() {
                        "gicc".into()
                    } else {
                        gicr.join(",")
                    },
                    if its.is_empty() {
                        "none".into()
                    } else {
                        its.join(",")
                    },
                    m.cpus.len(),
                    m.enabled_cpus()
                );
            }
            Err(e) => println!("report: madt malformed: {e}"),
        }
    }
    if let Some(t) = a.gtdt {
        match Gtdt::parse(t.bytes) {
            Ok(g) => println!(
                "report: gtdt el2-timer={} el1-timer={} el1-virt-timer={}{}",
                g.el2_phys_gsiv,
                g.el1_phys_gsiv,
                g.el1_virt_gsiv,
                if Gtdt::is_ppi(g.el2_phys_gsiv) {
                    ""
                } else {
                    " (EL2 timer is not a PPI)"
                }
            ),
            Err(e) => println!("report: gtdt malformed: {e}"),
        }
    }
    if let Some(t) = a.dbg2 {
        match dbg2::parse(t.bytes) {
            Ok(ports) if ports.is_empty() => println!("report: dbg2 no ports"),
            Ok(ports) => {
                for (i, p) in ports.iter().enumerate() {
                    let base = p.base.map_or("none".into(), |(space, b)| {
                        alloc::format!("{b:#x} ({})", if space == 0 { "memory" } else { "io" })
                    });
                    println!(
                        "report: dbg2 port{i} {} subtype={:#x} base={base}",
                        p.type_name(),
                        p.subtype
                    );
                }
            }
            Err(e) => println!("report: dbg2 malformed: {e}"),
        }
    }
}

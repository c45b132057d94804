//! The one owner of the machine's IOMMUs (issue 9, docs/abi.md §2).
//!
//! At boot, right after discovery, [`bring_up`] brings up every IOMMU unit discovery found,
//! once: on x86_64 each VT-d unit with its register window sized from its DRHD and its CAP/ECAP
//! registers, in the mode `vtd-mode=` names (legacy by default), with its RMRR identity domains
//! applied before translation is enabled (VT-d 4.1 §8.4: from then on every other device's DMA
//! is blocked until it is attached); on aarch64 each SMMUv3 unit from the IORT or device tree.
//! Over them it builds the one [`Iommufd`] with every assignable device (a function behind a
//! unit, all its DMA aliases known, not a bridge, not an RMRR device) and each device's DMA
//! alias IDs and IOMMU group from discovery, and keeps it for the life of the system.
//!
//! Everything that touches an IOMMU afterwards goes through the owner: guests' hypercalls
//! (`guest/iommu.rs`) hold it shared ([`read`]) while `dispatch` orders the calls of every
//! vCPU itself (docs/abi.md §2); guest creation and teardown, fault draining, the ABI scenario
//! and the driver suites (which borrow a unit from the owner instead of creating one) hold it
//! exclusively ([`lock`]).
//!
//! The owner sits behind a big-reader lock ([`iommu::gate::Gate`], loom-checked in
//! `iommu/tests/gate_loom.rs`) with one reader slot per physical CPU: a hypercall entering it
//! writes only its own CPU's cache-padded flag, so vCPUs calling on different CPUs never write
//! a common word to get in (a `spin::RwLock`'s counter was one cache line every CPU's calls
//! bounced). The price is on the writer's side, which is rare (bring-up, guest creation and
//! teardown, a fault drain that has records to read): it raises its flag and waits for every
//! CPU's reader to leave.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use boot::BootInfo;
use iommu::gate::{Gate, ReadError, ReadGuard, WriteGuard};
use iommu::iommufd::backend::{BackendDevice, Ids};
use iommu::iommufd::{Iommufd, Limits};
use spin::{Mutex, Once};

use crate::discovery::{Platform, Unit};
use crate::mem::iommu_mem::{IOMMU_MEMORY, IommuMemory};
use crate::mem::phys::MmioRegion;
use crate::println;

#[cfg(target_arch = "x86_64")]
pub type Backend = iommu::iommufd::vtd_backend::VtdBackend<'static, MmioRegion, IommuMemory>;
#[cfg(target_arch = "aarch64")]
pub type Backend = iommu::iommufd::smmu_backend::SmmuBackend<'static, MmioRegion, IommuMemory>;

/// The ID type the units see a device's DMA carry: a VT-d source ID or an SMMU StreamID.
#[cfg(target_arch = "x86_64")]
type HwId = u16;
#[cfg(target_arch = "aarch64")]
type HwId = u32;

/// SMMUv3 register space: two 64 KiB pages, Page 0 and Page 1 (SMMUv3 §6.1); IORT and DT give
/// only the base.
#[cfg(target_arch = "aarch64")]
const SMMU_REGS: u64 = 0x2_0000;

/// An assignable device, in the object model's hardware-device order.
pub struct OwnedDevice {
    pub segment: u16,
    pub bdf: drivers::pci::Bdf,
    /// Index of its unit in [`IommuOwner::units`].
    pub unit: usize,
    /// The IDs its DMA carries as the unit sees them, its own first, then its DMA aliases.
    pub ids: Vec<u32>,
    pub group: u32,
}

/// A unit the owner brought up.
pub struct OwnedUnit {
    pub name: String,
    /// What applying the firmware's RMRRs did, for the reports.
    #[cfg(target_arch = "x86_64")]
    pub rmrr: Option<String>,
}

/// The IOMMUs and the object model over them.
pub struct IommuOwner {
    pub fd: Iommufd<Backend>,
    pub units: Vec<OwnedUnit>,
    pub devices: Vec<OwnedDevice>,
    /// The translation mode every VT-d unit runs in (`vtd-mode=`).
    #[cfg(target_arch = "x86_64")]
    pub mode: iommu::vtd::TranslationMode,
    /// The domain shape asked for on the command line (`vtd-stage=`, `vtd-aw=`): what the
    /// VT-d driver suite builds its domains with. Read here so that every IOMMU option is
    /// checked once, at bring-up.
    #[cfg(target_arch = "x86_64")]
    pub stage: iommu::vtd::Stage,
    #[cfg(target_arch = "x86_64")]
    pub address_width: u32,
}

/// Reader slot `c` belongs to CPU `c` (`arch::smp::cpu_index`): only code running on that CPU
/// enters it, and a CPU runs one hypercall at a time.
static OWNER: Once<Gate<Option<IommuOwner>>> = Once::new();
/// Why bring-up was refused, if it was: users that need an IOMMU refuse to run without one
/// rather than run uncontained.
static REFUSED: Mutex<Option<String>> = Mutex::new(None);

/// Why the owner refused to bring the units up (a bad `vtd-*=` option, a unit that would not
/// come up), or `None` if it did not (there may still be no unit at all).
pub fn refusal() -> Option<String> {
    REFUSED.lock().clone()
}

fn gate() -> &'static Gate<Option<IommuOwner>> {
    // Built on first use (bring-up, before any guest or CPU other than the boot CPU runs); the
    // slots are 16 cache-padded flags from the heap, which exists by then.
    OWNER.call_once(|| {
        Gate::new(None, crate::arch::smp::MAX_CPUS).expect("heap for the IOMMU owner's gate")
    })
}

/// The owner, locked; `None` inside when the machine has no IOMMU (or bring-up failed: the boot
/// report says why). Waits for every CPU's reader to leave; must not be called by a CPU that
/// holds [`read`].
pub fn lock() -> WriteGuard<'static, Option<IommuOwner>> {
    gate().write()
}

/// The owner, shared: what guests' hypercalls hold while `dispatch` runs (it takes `&Iommufd`
/// and orders the calls of every vCPU itself, docs/abi.md §2), so several CPUs dispatch at
/// once. Taking it writes only this CPU's reader flag; it spins while a writer (bring-up, guest
/// creation and teardown, a fault drain) is in. `Err(SlotBusy)` if this CPU already holds it
/// (the owner is never entered twice on one CPU: a nested entry is refused, not a deadlock).
pub fn read() -> Result<ReadGuard<'static, Option<IommuOwner>>, ReadError> {
    gate().read(crate::arch::smp::cpu_index())
}

impl IommuOwner {
    /// The index of the unit named `name` (discovery's name, e.g. `vtd0`).
    pub fn unit_index(&self, name: &str) -> Option<usize> {
        self.units.iter().position(|u| u.name == name)
    }

    /// The hardware-device index of the PCI function at `segment`/`bdf`, if it is assignable.
    pub fn device_index(&self, segment: u16, bdf: drivers::pci::Bdf) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.segment == segment && d.bdf == bdf)
    }

    /// Number of distinct IOMMU groups among the assignable devices.
    fn groups(&self) -> usize {
        let mut g: Vec<u32> = self.devices.iter().map(|d| d.group).collect();
        g.sort_unstable();
        g.dedup();
        g.len()
    }
}

/// Brings up every unit and builds the object model, once, and prints the owner line of the
/// boot report. A failure is reported and leaves the machine without an owner (no unit is
/// half-owned: the units brought up so far stay blocking DMA, which is the safe state).
pub fn bring_up(info: &BootInfo, platform: &Platform) {
    let mut owner = lock();
    if owner.is_some() {
        return;
    }
    match build(info, platform) {
        Ok(None) => println!("report: iommu owner: none (no IOMMU unit)"),
        Ok(Some(o)) => {
            let names: Vec<&str> = o.units.iter().map(|u| u.name.as_str()).collect();
            #[cfg(target_arch = "x86_64")]
            let mode = match o.mode {
                iommu::vtd::TranslationMode::Legacy => " legacy",
                iommu::vtd::TranslationMode::Scalable => " scalable",
            };
            #[cfg(target_arch = "aarch64")]
            let mode = "";
            println!(
                "report: iommu owner: {}{mode} translation=on devices={} groups={}",
                names.join(","),
                o.devices.len(),
                o.groups()
            );
            *owner = Some(o);
        }
        Err(e) => {
            println!("report: iommu owner: none (bring-up refused: {e})");
            *REFUSED.lock() = Some(e);
        }
    }
}

/// Every assignable device: behind a unit the owner holds, all its DMA aliases known, not a
/// bridge of any kind (PCI class 06h: host, ISA, PCI-to-PCI; they are the platform's), and on x86_64 not a device firmware keeps for DMA to
/// reserved memory (RMRR).
fn assignable(platform: &Platform, units: &[OwnedUnit]) -> Vec<OwnedDevice> {
    let mut out = Vec::new();
    for d in &platform.devices {
        let Some(t) = d.translation.as_ref() else {
            continue;
        };
        let Some(unit) = units.iter().position(|u| u.name == t.unit) else {
            continue;
        };
        if !d.aliases_complete || d.ids.first() != Some(&t.id) {
            continue;
        }
        let bridge = platform
            .segments
            .iter()
            .find(|s| s.segment == d.segment)
            .and_then(|s| s.devices.functions().iter().find(|f| f.bdf == d.bdf))
            .is_none_or(|f| f.is_bridge() || f.class == 0x06);
        if bridge {
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if platform.rmrr.as_ref().is_some_and(|p| {
            p.devices()
                .iter()
                .any(|r| r.segment == d.segment && u32::from(r.sid) == t.id)
        }) {
            continue;
        }
        out.push(OwnedDevice {
            segment: d.segment,
            bdf: d.bdf,
            unit,
            ids: d.ids.clone(),
            group: d.group as u32,
        });
    }
    out
}

/// The backend's ID list for `d`: its own ID, then every alias.
fn ids_of(d: &OwnedDevice) -> Result<Ids<HwId>, String> {
    let conv = |id: u32| HwId::try_from(id).map_err(|_| format!("ID {id:#x} out of range"));
    let mut list = Ids::one(conv(d.ids[0])?);
    for &id in &d.ids[1..] {
        list.push(conv(id)?)
            .map_err(|_| format!("{}: more DMA aliases than the backend holds", d.bdf))?;
    }
    Ok(list)
}

#[cfg(target_arch = "x86_64")]
fn build(info: &BootInfo, platform: &Platform) -> Result<Option<IommuOwner>, String> {
    use iommu::iommufd::vtd_backend::{self, VtdBackend};
    use iommu::vtd::{Stage, TranslationMode, UnitConfig, VtdUnit};

    let mode = match info.cmdline_value("vtd-mode") {
        None | Some("legacy") => TranslationMode::Legacy,
        Some("scalable") => TranslationMode::Scalable,
        Some(other) => return Err(format!("vtd-mode={other}: expected legacy or scalable")),
    };
    let stage = match info.cmdline_value("vtd-stage") {
        None | Some("second") => Stage::Second,
        Some("first") => Stage::First,
        Some(other) => return Err(format!("vtd-stage={other}: expected second or first")),
    };
    let address_width: u32 = match info.cmdline_value("vtd-aw") {
        None => 48,
        Some(v) => v
            .parse()
            .map_err(|_| format!("vtd-aw={v}: expected 39 or 48"))?,
    };
    let mut units = Vec::new();
    let mut owned = Vec::new();
    for u in &platform.units {
        let Unit::Vtd {
            name,
            base,
            regs_len,
            regs,
            ..
        } = u
        else {
            continue;
        };
        // The register window: what the DRHD declares, and at least what CAP.FRO/NFR and
        // ECAP.IRO place in it (VT-d 4.1 §11.4.2-3: the fault recording and IOTLB registers
        // sit at implementation-chosen offsets, possibly past the first page).
        let fault_end = regs.cap.fault_record_offset(regs.cap.nfr()) as u64;
        let iotlb_end = regs.ecap.iotlb_offset() as u64 + 8;
        let len = (*regs_len)
            .max(fault_end)
            .max(iotlb_end)
            .next_multiple_of(0x1000);
        let mmio = MmioRegion::new(*base, len).map_err(|e| format!("{name}: {e}"))?;
        let mut unit = match VtdUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::new(mode)) {
            Ok(u) => u,
            // A DRHD with no unit behind it (its registers read all-ones or zero): nothing was
            // written to it; the others are still brought up, and devices in its scope are not
            // assignable (no unit holds them).
            Err(e @ iommu::vtd::VtdError::UnitAbsent { .. }) => {
                println!("report: iommu owner: skipped {name}: {e}");
                continue;
            }
            Err(e) => return Err(format!("{name}: {e}")),
        };
        let rmrr = match &platform.rmrr {
            Some(plan) => Some(
                unit.apply_rmrr(&IOMMU_MEMORY, &plan.for_unit(*base))
                    .map(|r| format!("{r:?}"))
                    .map_err(|e| format!("{name}: RMRR: {e}"))?,
            ),
            None => None,
        };
        unit.enable_translation()
            .map_err(|e| format!("{name}: {e}"))?;
        units.push(unit);
        owned.push(OwnedUnit {
            name: name.clone(),
            rmrr,
        });
    }
    if units.is_empty() {
        return Ok(None);
    }
    let devices = assignable(platform, &owned);
    let mut hw = Vec::new();
    for d in &devices {
        let info = vtd_backend::device_info(&units[d.unit], d.ids[0] as u16, d.group, 0);
        hw.push(BackendDevice {
            info,
            unit: d.unit,
            ids: ids_of(d)?,
        });
    }
    let fd = Iommufd::new(VtdBackend::new(units, &IOMMU_MEMORY, hw), Limits::default())
        .map_err(|e| format!("object model: {e:?}"))?;
    Ok(Some(IommuOwner {
        fd,
        units: owned,
        devices,
        mode,
        stage,
        address_width,
    }))
}

#[cfg(target_arch = "aarch64")]
fn build(info: &BootInfo, platform: &Platform) -> Result<Option<IommuOwner>, String> {
    use iommu::iommufd::smmu_backend::{self, SmmuBackend};
    use iommu::smmuv3::{SmmuUnit, UnitConfig};

    crate::smmu_irq::parse_options(info)?;
    let mut units = Vec::new();
    let mut owned = Vec::new();
    for u in &platform.units {
        let Unit::Smmu { name, base, .. } = u else {
            continue;
        };
        let mmio = MmioRegion::new(*base, SMMU_REGS).map_err(|e| format!("{name}: {e}"))?;
        // Fault interrupts (smmu_irq.rs): the wired event queue and GERROR SPIs, else polling.
        let irqs = crate::smmu_irq::irq_bring_up(info, platform, units.len(), name, *base);
        let unit = SmmuUnit::new(
            mmio,
            &IOMMU_MEMORY,
            UnitConfig {
                irqs,
                ..UnitConfig::default()
            },
        )
        .map_err(|e| format!("{name}: {e}"))?;
        units.push(unit);
        owned.push(OwnedUnit { name: name.clone() });
    }
    if units.is_empty() {
        return Ok(None);
    }
    let devices = assignable(platform, &owned);
    let mut hw = Vec::new();
    for d in &devices {
        let mut info = smmu_backend::device_info(&units[d.unit], d.ids[0], d.group, 0);
        // The ITS doorbell window (its.rs): a device's MSIs are writes to GITS_TRANSLATER
        // through its SMMU translation, at this IOVA; no guest mapping may take it.
        let window = iommu::iommufd::Span::new(
            crate::its::MSI_IOVA_BASE,
            crate::its::MSI_IOVA_BASE + crate::its::MSI_IOVA_SIZE - 1,
        );
        if !iommu::iommufd::vtd_backend::with_reserved(&mut info, window, hvabi::resv::MSI) {
            return Err(format!("{}: reserved-range table full", d.bdf));
        }
        hw.push(BackendDevice {
            info,
            unit: d.unit,
            ids: ids_of(d)?,
        });
    }
    let fd = Iommufd::new(
        SmmuBackend::new(units, &IOMMU_MEMORY, hw),
        Limits::default(),
    )
    .map_err(|e| format!("object model: {e:?}"))?;
    Ok(Some(IommuOwner {
        fd,
        units: owned,
        devices,
    }))
}

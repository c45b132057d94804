//! The guests' side of the IOMMU object model: one [`Iommufd`] over the machine's VT-d units,
//! with one object-model guest per running guest, so a guest's VMMCALLs reach `dispatch` with its
//! own [`GuestMemory`](super::memory::GuestMemory) and can name only its own objects.
//!
//! This is the interim owner of the units while guests run (issue 9 part 1 makes the kernel own
//! them once, from boot): each unit is brought up in legacy mode (or scalable mode with
//! `vtd-mode=scalable` on the command line) with its RMRR identity domains
//! applied before translation is enabled. Enabling translation blocks every device's DMA; a
//! device named by a guest's `dev=` is given to that guest and stays blocked until the guest
//! attaches it through the ABI.

use alloc::string::String;
use alloc::vec::Vec;

use iommu::iommufd::sim::SimHw;
use iommu::iommufd::vtd_backend::{self, VtdBackend, VtdDevice};
use iommu::iommufd::{GuestId, Iommufd, Limits, dispatch};
use iommu::vtd::{TranslationMode, UnitConfig, VtdUnit};

use super::memory::GuestMemory;
use crate::discovery::{Platform, Unit};
use crate::mem::iommu_mem::{IOMMU_MEMORY, IommuMemory};
use crate::mem::phys::MmioRegion;

/// Bytes of VT-d register space mapped per unit: the architectural register file plus the fault
/// recording and IOTLB registers, which QEMU and current hardware place in the first page.
const VTD_REGS: u64 = 0x1000;

type Backend = VtdBackend<'static, MmioRegion, IommuMemory>;

/// The object model the guests call into.
pub struct GuestIommu {
    fd: Fd,
    units: usize,
    /// (unit index, source ID) of each hardware device, by hardware device index.
    devices: Vec<(usize, u16)>,
}

/// The object model over the VT-d units, or over the software IOMMU model when the machine has
/// no IOMMU and the command line asks for it (`guest-iommu=model`): the ABI v1 calls then run
/// against the same object model with page tables in heap memory, and no device can be
/// assigned (there is nothing to contain its DMA).
enum Fd {
    Vtd(Iommufd<Backend>),
    Model(Iommufd<SimHw>),
}

/// Table pages of the software model's pool: enough for the domains of a few IOASes (no device
/// is ever attached, so none is allocated today).
const MODEL_TABLE_PAGES: usize = 64;

/// A DMA fault the units recorded, attributed to an assigned device when it is one.
pub struct DmaFault {
    /// Hardware device index (`bring_up`'s `devices`), or `None` for a device no guest owns.
    pub device: Option<usize>,
    pub sid: u16,
    pub page: u64,
    pub reason: u8,
    pub reason_name: &'static str,
    pub write: bool,
}

impl GuestIommu {
    /// Brings up every VT-d unit discovery found, with `devices` (unit register base, source
    /// ID) known to the object model as hardware devices `0..devices.len()`, in that order;
    /// `Ok(None)` when there is no unit.
    pub fn bring_up(
        platform: &Platform,
        mode: TranslationMode,
        devices: &[(u64, u16)],
    ) -> Result<Option<GuestIommu>, String> {
        let mut units = Vec::new();
        let mut bases = Vec::new();
        for u in &platform.units {
            let Unit::Vtd { name, base, .. } = u else {
                continue;
            };
            bases.push(*base);
            let mmio =
                MmioRegion::new(*base, VTD_REGS).map_err(|e| alloc::format!("{name}: {e}"))?;
            let mut unit = VtdUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::new(mode))
                .map_err(|e| alloc::format!("{name}: {e}"))?;
            if let Some(plan) = &platform.rmrr {
                unit.apply_rmrr(&IOMMU_MEMORY, &plan.for_unit(*base))
                    .map_err(|e| alloc::format!("{name}: RMRR: {e}"))?;
            }
            unit.enable_translation()
                .map_err(|e| alloc::format!("{name}: {e}"))?;
            units.push(unit);
        }
        if units.is_empty() {
            return Ok(None);
        }
        let count = units.len();
        let mut hw_devices = Vec::new();
        let mut device_ids = Vec::new();
        for (i, &(base, sid)) in devices.iter().enumerate() {
            let unit = bases
                .iter()
                .position(|&b| b == base)
                .ok_or("an assigned device's VT-d unit was not brought up")?;
            // One group per device: every assignable device is an endpoint with its own
            // requester ID (bridges and RMRR devices are refused before this point).
            let info = vtd_backend::device_info(&units[unit], sid, i as u32 + 1, 0);
            hw_devices.push(VtdDevice { info, unit, sid });
            device_ids.push((unit, sid));
        }
        let backend = VtdBackend::new(units, &IOMMU_MEMORY, hw_devices);
        let fd = Iommufd::new(backend, Limits::default())
            .map_err(|e| alloc::format!("object model: {e:?}"))?;
        Ok(Some(GuestIommu {
            fd: Fd::Vtd(fd),
            units: count,
            devices: device_ids,
        }))
    }

    /// The object model over the software IOMMU model, for machines without an IOMMU (Bochs).
    pub fn software_model() -> Result<GuestIommu, String> {
        let fd = Iommufd::new(SimHw::new(&[], MODEL_TABLE_PAGES, None), Limits::default())
            .map_err(|e| alloc::format!("object model: {e:?}"))?;
        Ok(GuestIommu {
            fd: Fd::Model(fd),
            units: 0,
            devices: Vec::new(),
        })
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn create_guest(&mut self) -> Result<GuestId, String> {
        match &mut self.fd {
            Fd::Vtd(fd) => fd.create_guest(),
            Fd::Model(fd) => fd.create_guest(),
        }
        .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// Gives hardware device `hw` (an index into `bring_up`'s `devices`) to `guest`; returns the
    /// `dev_id` the guest names it by. Its DMA stays blocked until the guest attaches it.
    pub fn assign_device(&mut self, guest: GuestId, hw: usize) -> Result<u32, String> {
        match &mut self.fd {
            Fd::Vtd(fd) => fd.assign_device(guest, hw as iommu::iommufd::HwDev),
            Fd::Model(fd) => fd.assign_device(guest, hw as iommu::iommufd::HwDev),
        }
        .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// Drains every unit's fault recording registers (VT-d 4.1 §7.2.1) and hands each DMA
    /// fault to `sink`, attributed by (unit, source ID) to the device that raised it.
    pub fn poll_faults(&mut self, sink: &mut dyn FnMut(&DmaFault)) {
        let devices = &self.devices;
        let Fd::Vtd(fd) = &mut self.fd else {
            return; // the software model makes no DMA
        };
        for (u, unit) in fd.hw_mut().units_mut().iter_mut().enumerate() {
            unit.poll_faults(&mut |r| {
                sink(&DmaFault {
                    device: devices.iter().position(|&d| d == (u, r.source_id)),
                    sid: r.source_id,
                    page: r.fault_info,
                    reason: r.reason,
                    reason_name: iommu::vtd::regs::fault_reason_name(r.reason),
                    write: matches!(r.request, iommu::vtd::regs::RequestType::Write),
                })
            });
        }
    }

    /// One ABI v1 call of `guest` (docs/abi.md §2): 0 or `-errno`.
    pub fn call(&mut self, guest: GuestId, mem: &GuestMemory, op: u32, args_gpa: u64) -> i64 {
        match &mut self.fd {
            Fd::Vtd(fd) => dispatch(fd, guest, mem, op, args_gpa),
            Fd::Model(fd) => dispatch(fd, guest, mem, op, args_gpa),
        }
    }

    /// Destroys every object of `guest` (its mappings leave the hardware) before its memory is
    /// freed.
    pub fn destroy_guest(&mut self, guest: GuestId) -> Result<(), String> {
        match &mut self.fd {
            Fd::Vtd(fd) => fd.destroy_guest(guest),
            Fd::Model(fd) => fd.destroy_guest(guest),
        }
        .map_err(|e| alloc::format!("object model: {e:?}"))
    }
}

//! The guests' side of the IOMMU object model on aarch64: one [`Iommufd`] over the machine's
//! SMMUv3 units (`iommu::iommufd::smmu_backend`), with one object-model guest per running guest,
//! so a guest's HVCs reach `dispatch` with its own [`GuestMemory`] and can name only its own
//! objects. The same interface as the VT-d version (`iommu.rs`), so the runner is shared.
//!
//! Each unit is brought up with its stream table in place and every stream aborting (SMMUv3
//! §6.3.9 STRTAB_BASE, STE.Config = abort) until a device is attached. Assigned devices are the
//! object model's hardware devices, one group each (an endpoint with its own StreamID); their
//! DMA faults are read from the units' event queues (SMMUv3 §7.3) after every exit and
//! attributed by (unit, StreamID).

use alloc::string::String;
use alloc::vec::Vec;

use iommu::iommufd::smmu_backend::{self, SmmuBackend, SmmuDevice};
use iommu::iommufd::{GuestId, Iommufd, Limits, dispatch};
use iommu::smmuv3::{SmmuUnit, UnitConfig};

use super::memory::GuestMemory;
use crate::discovery::{Platform, Unit};
use crate::mem::iommu_mem::{IOMMU_MEMORY, IommuMemory};
use crate::mem::phys::MmioRegion;

/// SMMUv3 register space: pages 0 and 1 (SMMUv3 §6.1), 128 KiB.
const SMMU_REGS: u64 = 0x2_0000;

type Backend = SmmuBackend<'static, MmioRegion, IommuMemory>;

/// The object model the guests call into.
pub struct GuestIommu {
    fd: Iommufd<Backend>,
    units: usize,
    /// (unit index, StreamID) of each hardware device, by hardware device index.
    devices: Vec<(usize, u32)>,
}

/// A DMA fault an SMMU recorded (an event record), attributed to an assigned device when it is
/// one. `reason` is the event type (SMMUv3 §7.3, e.g. 0x10 F_TRANSLATION).
pub struct DmaFault {
    pub device: Option<usize>,
    pub sid: u16,
    pub page: u64,
    pub reason: u8,
    pub reason_name: &'static str,
    pub write: bool,
}

impl GuestIommu {
    /// Brings up every SMMUv3 unit discovery found, with `devices` (unit register base,
    /// StreamID) known to the object model as hardware devices `0..devices.len()`, in that order;
    /// `Ok(None)` when there is no unit.
    pub fn bring_up(
        platform: &Platform,
        devices: &[(u64, u16)],
    ) -> Result<Option<GuestIommu>, String> {
        let mut units = Vec::new();
        let mut bases = Vec::new();
        for u in &platform.units {
            let Unit::Smmu { name, base, .. } = u else {
                continue;
            };
            let mmio =
                MmioRegion::new(*base, SMMU_REGS).map_err(|e| alloc::format!("{name}: {e}"))?;
            let unit = SmmuUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::default())
                .map_err(|e| alloc::format!("{name}: {e}"))?;
            units.push(unit);
            bases.push(*base);
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
                .ok_or("an assigned device's SMMU was not brought up")?;
            let sid = u32::from(sid);
            let info = smmu_backend::device_info(&units[unit], sid, i as u32 + 1, 0);
            hw_devices.push(SmmuDevice { info, unit, sid });
            device_ids.push((unit, sid));
        }
        let backend = SmmuBackend::new(units, &IOMMU_MEMORY, hw_devices);
        let fd = Iommufd::new(backend, Limits::default())
            .map_err(|e| alloc::format!("object model: {e:?}"))?;
        Ok(Some(GuestIommu {
            fd,
            units: count,
            devices: device_ids,
        }))
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn create_guest(&mut self) -> Result<GuestId, String> {
        self.fd
            .create_guest()
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// Gives hardware device `hw` (an index into `bring_up`'s `devices`) to `guest`; returns the
    /// `dev_id` the guest names it by. Its DMA stays blocked until the guest attaches it.
    pub fn assign_device(&mut self, guest: GuestId, hw: usize) -> Result<u32, String> {
        self.fd
            .assign_device(guest, hw as iommu::iommufd::HwDev)
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// Drains every unit's event queue and hands each fault record to `sink`, attributed by
    /// (unit, StreamID) to the device that raised it. QEMU's SMMU records one event per faulting
    /// transaction (a 256-byte edu DMA is dozens), so consecutive identical records (same
    /// StreamID, page, type and direction) are reported once and the rest counted in the log.
    pub fn poll_faults(&mut self, sink: &mut dyn FnMut(&DmaFault)) {
        let devices = &self.devices;
        for (u, unit) in self.fd.hw_mut().units_mut().iter_mut().enumerate() {
            let mut last = None;
            let mut repeats = 0u64;
            let _ = unit.poll_events(&mut |e| {
                let key = (e.stream_id, e.input_addr & !0xfff, e.kind.code(), e.read);
                if last == Some(key) {
                    repeats += 1;
                    return;
                }
                last = Some(key);
                sink(&DmaFault {
                    device: devices.iter().position(|&d| d == (u, e.stream_id)),
                    sid: e.stream_id as u16,
                    page: e.input_addr & !0xfff,
                    reason: e.kind.code(),
                    reason_name: e.kind.name(),
                    write: !e.read,
                })
            });
            if repeats > 0 {
                log::info!("smmu{u}: {repeats} repeated event records coalesced");
            }
        }
    }

    /// One ABI v1 call of `guest` (docs/abi.md §2): 0 or `-errno`.
    pub fn call(&mut self, guest: GuestId, mem: &GuestMemory, op: u32, args_gpa: u64) -> i64 {
        dispatch(&mut self.fd, guest, mem, op, args_gpa)
    }

    /// Destroys every object of `guest` before its memory is freed.
    pub fn destroy_guest(&mut self, guest: GuestId) -> Result<(), String> {
        self.fd
            .destroy_guest(guest)
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }
}

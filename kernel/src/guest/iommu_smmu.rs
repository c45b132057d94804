//! The guests' side of the IOMMU object model on aarch64: one [`Iommufd`] over the machine's
//! SMMUv3 units (`iommu::iommufd::smmu_backend`), with one object-model guest per running guest,
//! so a guest's HVCs reach `dispatch` with its own [`GuestMemory`] and can name only its own
//! objects. The same interface as the VT-d version (`iommu.rs`), so the runner is shared.
//!
//! Each unit is brought up with its stream table in place and every stream aborting (SMMUv3
//! §6.3.9 STRTAB_BASE, STE.Config = abort) until a device is attached. Device assignment is not
//! implemented on aarch64 yet (`dev=` is refused before bring-up), so no hardware device is known
//! to the object model, and there is no guest DMA whose faults could be attributed:
//! [`GuestIommu::poll_faults`] reports nothing until assignment lands.

use alloc::string::String;
use alloc::vec::Vec;

use iommu::iommufd::smmu_backend::SmmuBackend;
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
}

/// A DMA fault attributed to an assigned device (the VT-d version's shape; see the module
/// comment for why none is produced yet).
pub struct DmaFault {
    pub device: Option<usize>,
    pub sid: u16,
    pub page: u64,
    pub reason: u8,
    pub reason_name: &'static str,
    pub write: bool,
}

impl GuestIommu {
    /// Brings up every SMMUv3 unit discovery found; `Ok(None)` when there is none. `devices`
    /// must be empty (no assignment on aarch64 yet).
    pub fn bring_up(
        platform: &Platform,
        devices: &[(u64, u16)],
    ) -> Result<Option<GuestIommu>, String> {
        if !devices.is_empty() {
            return Err("device assignment is not implemented on aarch64".into());
        }
        let mut units = Vec::new();
        for u in &platform.units {
            let Unit::Smmu { name, base, .. } = u else {
                continue;
            };
            let mmio =
                MmioRegion::new(*base, SMMU_REGS).map_err(|e| alloc::format!("{name}: {e}"))?;
            let unit = SmmuUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::default())
                .map_err(|e| alloc::format!("{name}: {e}"))?;
            units.push(unit);
        }
        if units.is_empty() {
            return Ok(None);
        }
        let count = units.len();
        let backend = SmmuBackend::new(units, &IOMMU_MEMORY, Vec::new());
        let fd = Iommufd::new(backend, Limits::default())
            .map_err(|e| alloc::format!("object model: {e:?}"))?;
        Ok(Some(GuestIommu { fd, units: count }))
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn create_guest(&mut self) -> Result<GuestId, String> {
        self.fd
            .create_guest()
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// Never called on aarch64 (no device is assigned); kept for the shared runner.
    pub fn assign_device(&mut self, guest: GuestId, hw: usize) -> Result<u32, String> {
        self.fd
            .assign_device(guest, hw as iommu::iommufd::HwDev)
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// No assigned device, so no guest DMA fault to attribute (module comment).
    pub fn poll_faults(&mut self, _sink: &mut dyn FnMut(&DmaFault)) {}

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

//! The guests' side of the IOMMU object model: one [`Iommufd`] over the machine's VT-d units,
//! with one object-model guest per running guest, so a guest's VMMCALLs reach `dispatch` with its
//! own [`GuestMemory`](super::memory::GuestMemory) and can name only its own objects.
//!
//! This is the interim owner of the units while guests run (issue 9 part 1 makes the kernel own
//! them once, from boot): each unit is brought up in legacy mode with its RMRR identity domains
//! applied before translation is enabled, and no device is assigned to any guest yet (`dev=` is
//! refused), so enabling translation blocks every device's DMA.

use alloc::string::String;
use alloc::vec::Vec;

use iommu::iommufd::{GuestId, Iommufd, Limits, dispatch};

use super::memory::GuestMemory;
use crate::discovery::{Platform, Unit};
use crate::mem::iommu_mem::{IOMMU_MEMORY, IommuMemory};
use crate::mem::phys::MmioRegion;

/// Bytes of VT-d register space mapped per unit: the architectural register file plus the fault
/// recording and IOTLB registers, which QEMU and current hardware place in the first page.
#[cfg(target_arch = "x86_64")]
const VTD_REGS: u64 = 0x1000;
/// SMMUv3 register space: pages 0 and 1 (SMMUv3 §6.1), 128 KiB.
#[cfg(target_arch = "aarch64")]
const SMMU_REGS: u64 = 0x2_0000;

#[cfg(target_arch = "x86_64")]
type Backend = iommu::iommufd::vtd_backend::VtdBackend<'static, MmioRegion, IommuMemory>;
#[cfg(target_arch = "aarch64")]
type Backend = iommu::iommufd::smmu_backend::SmmuBackend<'static, MmioRegion, IommuMemory>;

/// The object model the guests call into.
pub struct GuestIommu {
    fd: Iommufd<Backend>,
    units: usize,
}

impl GuestIommu {
    /// Brings up every VT-d unit discovery found; `Ok(None)` when there is none.
    #[cfg(target_arch = "x86_64")]
    pub fn bring_up(platform: &Platform) -> Result<Option<GuestIommu>, String> {
        use iommu::iommufd::vtd_backend::VtdBackend;
        use iommu::vtd::{UnitConfig, VtdUnit};
        let mut units = Vec::new();
        for u in &platform.units {
            let Unit::Vtd { name, base, .. } = u else {
                continue;
            };
            let mmio =
                MmioRegion::new(*base, VTD_REGS).map_err(|e| alloc::format!("{name}: {e}"))?;
            let mut unit = VtdUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::default())
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
        let backend = VtdBackend::new(units, &IOMMU_MEMORY, Vec::new());
        Self::over(backend, count)
    }

    /// Brings up every SMMUv3 discovery found (stream table in place, every stream aborting
    /// until a device is attached); `Ok(None)` when there is none.
    #[cfg(target_arch = "aarch64")]
    pub fn bring_up(platform: &Platform) -> Result<Option<GuestIommu>, String> {
        use iommu::iommufd::smmu_backend::SmmuBackend;
        use iommu::smmuv3::{SmmuUnit, UnitConfig};
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
        Self::over(backend, count)
    }

    fn over(backend: Backend, units: usize) -> Result<Option<GuestIommu>, String> {
        let fd = Iommufd::new(backend, Limits::default())
            .map_err(|e| alloc::format!("object model: {e:?}"))?;
        Ok(Some(GuestIommu { fd, units }))
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn create_guest(&mut self) -> Result<GuestId, String> {
        self.fd
            .create_guest()
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }

    /// One ABI v1 call of `guest` (docs/abi.md §2): 0 or `-errno`.
    pub fn call(&mut self, guest: GuestId, mem: &GuestMemory, op: u32, args_gpa: u64) -> i64 {
        dispatch(&mut self.fd, guest, mem, op, args_gpa)
    }

    /// Destroys every object of `guest` (its mappings leave the hardware) before its memory is
    /// freed.
    pub fn destroy_guest(&mut self, guest: GuestId) -> Result<(), String> {
        self.fd
            .destroy_guest(guest)
            .map_err(|e| alloc::format!("object model: {e:?}"))
    }
}

//! `scenario=abi`: the hypercall ABI v1 driven through `dispatch` exactly as a guest would
//! (guests that issue real hypercalls come later), on the real IOMMU backend, with edu DMA
//! through the IOAS the "guest" created: GET_INFO, DEVICE_LIST, RESERVED_RANGES, IOAS_ALLOC,
//! ALLOW_IOVAS, DEVICE_ATTACH, IOAS_MAP, DMA, DEVICE_REPLACE to a second IOAS, DMA again,
//! UNMAP, DETACH, DESTROY — and at the end no object is left.

use super::{Checks, DMA_POLLS, EduDevice, find_edu};
use crate::discovery::{Platform, Unit};
use crate::mem::frame::{FRAMES, PAGE_SIZE};
use crate::mem::iommu_mem::IOMMU_MEMORY;
use crate::mem::phys::{self, MmioRegion};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use boot::BootInfo;
use iommu::iommufd::selftest::{DmaEngine, FLOW_MEMORY, SliceMemory, dma_flow};
use iommu::iommufd::{IommuHw, Iommufd, Limits};

/// edu as the flow's DMA engine.
struct EduDma<'a>(&'a EduDevice);

impl<H: IommuHw> DmaEngine<H> for EduDma<'_> {
    fn memory_to_device(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
        self.0
            .edu
            .dma_to_device(iova, len)
            .map_err(|_| "edu refused the transfer")?;
        self.0.edu.wait_dma(DMA_POLLS).map_err(|_| "edu timed out")
    }

    fn device_to_memory(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
        self.0
            .edu
            .dma_from_device(iova, len)
            .map_err(|_| "edu refused the transfer")?;
        self.0.edu.wait_dma(DMA_POLLS).map_err(|_| "edu timed out")
    }
}

pub fn run(info: &BootInfo, platform: &Platform) -> u32 {
    let mut checks = Checks::default();
    let r = flow(info, platform);
    checks.record("abi-dma-flow", r);
    checks.status()
}

fn unit_base(platform: &Platform, dev: &EduDevice) -> Result<(u64, u32), String> {
    let t = platform
        .devices
        .iter()
        .find(|d| d.segment == dev.segment && d.bdf == dev.bdf)
        .and_then(|d| d.translation.as_ref())
        .ok_or("edu is not behind any IOMMU")?;
    let base = platform
        .units
        .iter()
        .find_map(|u| match u {
            Unit::Vtd { name, base, .. } | Unit::Smmu { name, base, .. } if *name == t.unit => {
                Some(*base)
            }
            _ => None,
        })
        .ok_or("unit vanished")?;
    Ok((base, t.id))
}

/// The IDs the edu's DMA carries as its unit sees them (own first, then its DMA aliases, e.g.
/// a PCIe-to-PCI bridge's) and its IOMMU group, from discovery.
fn edu_ids_and_group(platform: &Platform, dev: &EduDevice) -> (alloc::vec::Vec<u32>, u32) {
    platform
        .devices
        .iter()
        .find(|d| d.segment == dev.segment && d.bdf == dev.bdf)
        .map(|d| (d.ids.clone(), d.group as u32))
        .unwrap_or_default()
}

/// The backend's ID list: `own`, then every further alias in `ids`.
fn backend_ids<I: Copy + Default + PartialEq>(
    own: I,
    ids: &[u32],
    conv: impl Fn(u32) -> I,
) -> Result<iommu::iommufd::backend::Ids<I>, String> {
    let mut list = iommu::iommufd::backend::Ids::one(own);
    for &id in ids.iter().skip(1) {
        list.push(conv(id))
            .map_err(|_| String::from("edu has more DMA aliases than the backend holds"))?;
    }
    Ok(list)
}

/// Runs the flow on an `Iommufd` over `backend`, with one guest owning a frame-backed buffer.
fn run_flow<H: IommuHw>(backend: H, dev: &EduDevice, hw_id: u64) -> Result<(), String> {
    let mut fd =
        Iommufd::new(backend, Limits::default()).map_err(|e| format!("Iommufd::new: {e:?}"))?;
    let g = fd
        .create_guest()
        .map_err(|e| format!("create_guest: {e:?}"))?;
    fd.assign_device(g, 0)
        .map_err(|e| format!("assign_device: {e:?}"))?;
    let pa = FRAMES
        .lock()
        .alloc(FLOW_MEMORY.div_ceil(PAGE_SIZE), PAGE_SIZE, u64::MAX)
        .ok_or("out of frames")?;
    let bytes = phys::frame_bytes_mut(pa, FLOW_MEMORY).map_err(|e| format!("{e}"))?;
    // Guest-physical == host-physical for this in-hypervisor "guest": it owns exactly this buffer.
    let gm = SliceMemory::new(pa, pa, bytes);
    dma_flow(&mut fd, g, &gm, hw_id, &mut EduDma(dev), &mut |l| {
        println!("{l}")
    })
    .map_err(|e| format!("step {:?} failed with errno {}", e.step, e.errno))?;
    fd.destroy_guest(g)
        .map_err(|e| format!("destroy_guest: {e:?}"))?;
    FRAMES.lock().free(pa, FLOW_MEMORY.div_ceil(PAGE_SIZE));
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn flow(_info: &BootInfo, platform: &Platform) -> Result<(), String> {
    use iommu::iommufd::backend::BackendDevice;
    use iommu::iommufd::vtd_backend::{self, VtdBackend};
    use iommu::vtd::{TranslationMode, UnitConfig, VtdUnit};
    let mode = match _info.cmdline_value("vtd-mode") {
        Some("scalable") => TranslationMode::Scalable,
        _ => TranslationMode::Legacy,
    };
    let dev = find_edu(platform, drivers::edu::DEFAULT_DMA_MASK)?;
    let (base, _) = unit_base(platform, &dev)?;
    let sid = dev.bdf.rid();
    let mmio = MmioRegion::new(base, 0x1000).map_err(|e| format!("{e}"))?;
    let mut unit = VtdUnit::new(
        mmio,
        &IOMMU_MEMORY,
        UnitConfig {
            mode,
            ..UnitConfig::default()
        },
    )
    .map_err(|e| format!("{e}"))?;
    if let Some(plan) = &platform.rmrr {
        unit.apply_rmrr(&IOMMU_MEMORY, &plan.for_unit(base))
            .map_err(|e| format!("{e}"))?;
    }
    unit.enable_translation().map_err(|e| format!("{e}"))?;
    let (aliases, group) = edu_ids_and_group(platform, &dev);
    let info = vtd_backend::device_info(&unit, sid, group, 0);
    let ids = backend_ids(sid, &aliases, |id| id as u16)?;
    let backend = VtdBackend::new(
        vec![unit],
        &IOMMU_MEMORY,
        vec![BackendDevice { info, unit: 0, ids }],
    );
    println!(
        "abi: VT-d backend, edu {} sid={sid:#06x} ids={:04x?}",
        dev.bdf,
        ids.as_slice()
    );
    run_flow(backend, &dev, u64::from(sid))
}

#[cfg(target_arch = "aarch64")]
fn flow(_info: &BootInfo, platform: &Platform) -> Result<(), String> {
    use iommu::iommufd::backend::BackendDevice;
    use iommu::iommufd::smmu_backend::{self, SmmuBackend};
    use iommu::smmuv3::{SmmuUnit, UnitConfig};
    let dev = find_edu(platform, drivers::edu::DEFAULT_DMA_MASK)?;
    let (base, sid) = unit_base(platform, &dev)?;
    let mmio = MmioRegion::new(base, 0x2_0000).map_err(|e| format!("{e}"))?;
    let unit =
        SmmuUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::default()).map_err(|e| format!("{e}"))?;
    let (aliases, group) = edu_ids_and_group(platform, &dev);
    let info = smmu_backend::device_info(&unit, sid, group, 0);
    let ids = backend_ids(sid, &aliases, |id| id)?;
    let backend = SmmuBackend::new(
        vec![unit],
        &IOMMU_MEMORY,
        vec![BackendDevice { info, unit: 0, ids }],
    );
    println!(
        "abi: SMMUv3 backend, edu {} sid={sid:#06x} ids={:x?}",
        dev.bdf,
        ids.as_slice()
    );
    run_flow(backend, &dev, u64::from(sid))
}

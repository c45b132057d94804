//! `scenario=abi`: the hypercall ABI v1 driven through `dispatch` exactly as a guest would
//! (guests that issue real hypercalls come later), on the real IOMMU backend, with edu DMA
//! through the IOAS the "guest" created: GET_INFO, DEVICE_LIST, RESERVED_RANGES, IOAS_ALLOC,
//! ALLOW_IOVAS, DEVICE_ATTACH, IOAS_MAP, DMA, DEVICE_REPLACE to a second IOAS, DMA again,
//! UNMAP, DETACH, DESTROY — and at the end no object is left.

use super::{Checks, DMA_POLLS, EduDevice, buffer, find_edu};
use crate::discovery::{Platform, Unit};
use crate::mem::dma::DmaGuestMemory;
use crate::mem::frame::PAGE_SIZE;
use crate::mem::iommu_mem::IOMMU_MEMORY;
use crate::mem::phys::MmioRegion;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use boot::BootInfo;
use iommu::iommufd::selftest::{DmaEngine, FLOW_MEMORY, dma_flow};
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
    if info.cmdline_value("abi-flow") == Some("group") {
        if let Err(why) = group_flow(info, platform, &mut checks) {
            checks.record("abi-group setup", Err(why));
        }
        return checks.status();
    }
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
    // Guest-physical == host-physical for this in-hypervisor "guest": it owns exactly this buffer,
    // which edu writes by DMA, so it is reached only through volatile accessors.
    let buf = buffer(FLOW_MEMORY, PAGE_SIZE)?;
    let gm = DmaGuestMemory::new(&buf);
    dma_flow(&mut fd, g, &gm, hw_id, &mut EduDma(dev), &mut |l| {
        println!("{l}")
    })
    .map_err(|e| format!("step {:?} failed with errno {}", e.step, e.errno))?;
    fd.destroy_guest(g)
        .map_err(|e| format!("destroy_guest: {e:?}"))?;
    buf.free();
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn backend_for(
    info: &BootInfo,
    platform: &Platform,
    edus: &[EduDevice],
) -> Result<impl IommuHw, String> {
    use iommu::iommufd::backend::BackendDevice;
    use iommu::iommufd::vtd_backend::{self, VtdBackend};
    use iommu::vtd::{TranslationMode, UnitConfig, VtdUnit};
    let mode = match info.cmdline_value("vtd-mode") {
        Some("scalable") => TranslationMode::Scalable,
        _ => TranslationMode::Legacy,
    };
    let first = edus.first().ok_or("no edu")?;
    let (base, _) = unit_base(platform, first)?;
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
    let mut devices = vec![];
    for dev in edus {
        if unit_base(platform, dev)?.0 != base {
            return Err(format!("edu {} is behind another unit", dev.bdf));
        }
        let sid = dev.bdf.rid();
        let (aliases, group) = edu_ids_and_group(platform, dev);
        let info = vtd_backend::device_info(&unit, sid, group, 0);
        let ids = backend_ids(sid, &aliases, |id| id as u16)?;
        println!(
            "abi: VT-d backend, edu {} sid={sid:#06x} ids={:04x?} group={group}",
            dev.bdf,
            ids.as_slice()
        );
        devices.push(BackendDevice { info, unit: 0, ids });
    }
    Ok(VtdBackend::new(vec![unit], &IOMMU_MEMORY, devices))
}

#[cfg(target_arch = "aarch64")]
fn backend_for(
    _info: &BootInfo,
    platform: &Platform,
    edus: &[EduDevice],
) -> Result<impl IommuHw, String> {
    use iommu::iommufd::backend::BackendDevice;
    use iommu::iommufd::smmu_backend::{self, SmmuBackend};
    use iommu::smmuv3::{SmmuUnit, UnitConfig};
    let first = edus.first().ok_or("no edu")?;
    let (base, _) = unit_base(platform, first)?;
    let mmio = MmioRegion::new(base, 0x2_0000).map_err(|e| format!("{e}"))?;
    let unit =
        SmmuUnit::new(mmio, &IOMMU_MEMORY, UnitConfig::default()).map_err(|e| format!("{e}"))?;
    let mut devices = vec![];
    for dev in edus {
        let (unit_base, sid) = unit_base(platform, dev)?;
        if unit_base != base {
            return Err(format!("edu {} is behind another unit", dev.bdf));
        }
        let (aliases, group) = edu_ids_and_group(platform, dev);
        let info = smmu_backend::device_info(&unit, sid, group, 0);
        let ids = backend_ids(sid, &aliases, |id| id)?;
        println!(
            "abi: SMMUv3 backend, edu {} sid={sid:#06x} ids={:x?} group={group}",
            dev.bdf,
            ids.as_slice()
        );
        devices.push(BackendDevice { info, unit: 0, ids });
    }
    Ok(SmmuBackend::new(vec![unit], &IOMMU_MEMORY, devices))
}

/// The first edu's own ID as the unit sees it: the flow finds the device by it.
fn own_id(platform: &Platform, dev: &EduDevice) -> Result<u64, String> {
    Ok(u64::from(unit_base(platform, dev)?.1))
}

fn flow(info: &BootInfo, platform: &Platform) -> Result<(), String> {
    let dev = find_edu(platform, drivers::edu::DEFAULT_DMA_MASK)?;
    let hw_id = own_id(platform, &dev)?;
    let backend = backend_for(info, platform, core::slice::from_ref(&dev))?;
    run_flow(backend, &dev, hw_id)
}

/// Every edu with a live BAR0, bus mastering on (like [`find_edu`], for all of them).
fn find_edus(platform: &Platform) -> Result<alloc::vec::Vec<EduDevice>, String> {
    use drivers::edu::Edu;
    let mut out = vec![];
    for s in &platform.segments {
        for f in s
            .devices
            .find(drivers::edu::VENDOR_ID, drivers::edu::DEVICE_ID)
        {
            let Some(bar) = f.bars.first().copied().flatten().filter(|b| b.is_live()) else {
                continue;
            };
            let mmio = MmioRegion::new(bar.base, drivers::edu::BAR0_SIZE)
                .map_err(|e| format!("edu BAR0: {e}"))?;
            if !drivers::pci::enable_bus_master(&s.ecam, &s.devices, f.bdf) {
                return Err(format!("edu {}: cannot enable bus mastering", f.bdf));
            }
            let edu = Edu::probe(mmio)
                .map_err(|e| format!("edu {}: {e:?}", f.bdf))?
                .with_dma_mask(drivers::edu::DEFAULT_DMA_MASK);
            out.push(EduDevice {
                segment: s.segment,
                bdf: f.bdf,
                edu,
            });
        }
    }
    Ok(out)
}

/// `abi-flow=group`: two edu that the topology put in one IOMMU group (behind one PCIe-to-PCI
/// bridge), given to one guest, driven through the ABI as docs/abi.md §6.2 describes, with
/// edu DMA from each device as the proof:
/// - giving the two to two guests is refused by the group check, naming the missing member;
/// - attaching the first moves the whole group: the second's DMA is translated too;
/// - attaching the second to another IOAS is `EXDEV`; to the same one, it joins;
/// - a REPLACE moves both devices' DMA to the other IOAS at once;
/// - detaching both blocks them.
fn group_flow(info: &BootInfo, platform: &Platform, checks: &mut Checks) -> Result<(), String> {
    use iommu::iommufd::GuestMemory;
    use iommu::iommufd::abi::errno;
    use iommu::iommufd::client::Client;

    let edus = find_edus(platform)?;
    let [a_dev, b_dev] = &edus[..] else {
        return Err(format!("expected two edu, found {}", edus.len()));
    };
    // The group check on the real topology: one edu to guest 1, the other to guest 2.
    let seg = platform
        .segments
        .iter()
        .find(|s| s.segment == a_dev.segment)
        .ok_or("segment vanished")?;
    let index = |bdf| seg.devices.functions().iter().position(|f| f.bdf == bdf);
    let (ia, ib) = (index(a_dev.bdf), index(b_dev.bdf));
    let split = |i: usize| {
        if Some(i) == ia {
            Some(1u32)
        } else if Some(i) == ib {
            Some(2u32)
        } else {
            None
        }
    };
    checks.record(
        "group-split-refused",
        match seg.topology.check_assignment(&seg.devices, split) {
            Ok(()) => Err("two guests sharing a group were accepted".into()),
            Err(incomplete) => {
                let missing: alloc::vec::Vec<String> = seg
                    .topology
                    .missing_members(&seg.devices, &incomplete, split)
                    .filter_map(|i| seg.devices.functions().get(i))
                    .map(|f| format!("{}", f.bdf))
                    .collect();
                println!(
                    "abi: assignment refused: group {} given to guest {} lacks {}",
                    incomplete.group,
                    incomplete.owner,
                    missing.join(",")
                );
                if missing == [format!("{}", b_dev.bdf)] {
                    Ok(())
                } else {
                    Err(format!("missing members {missing:?}"))
                }
            }
        },
    );

    let backend = backend_for(info, platform, &edus)?;
    let mut fd =
        Iommufd::new(backend, Limits::default()).map_err(|e| format!("Iommufd::new: {e:?}"))?;
    let g = fd
        .create_guest()
        .map_err(|e| format!("create_guest: {e:?}"))?;
    let a = fd
        .assign_device(g, 0)
        .map_err(|e| format!("assign_device: {e:?}"))?;
    let b = fd
        .assign_device(g, 1)
        .map_err(|e| format!("assign_device: {e:?}"))?;
    let buf = buffer(FLOW_MEMORY, PAGE_SIZE)?;
    let pa = buf.pa;
    let gm = DmaGuestMemory::new(&buf);
    // Scratch for the calls' arguments at the start; the two IOAS' pages after it.
    const IOVA: u64 = 0x0010_0000;
    let (page1, page2) = (pa + 0x10000, pa + 0x11000);
    let mut c = Client::new(&mut fd, g, &gm, pa);
    let e = |what: &'static str| move |errno: u32| format!("{what}: errno {errno}");
    let ioas1 = c.ioas_alloc().map_err(e("IOAS_ALLOC"))?;
    let ioas2 = c.ioas_alloc().map_err(e("IOAS_ALLOC"))?;
    c.map_fixed(ioas1, IOVA, page1, PAGE_SIZE)
        .map_err(e("IOAS_MAP"))?;
    c.map_fixed(ioas2, IOVA, page2, PAGE_SIZE)
        .map_err(e("IOAS_MAP"))?;
    // edu `dev` copies 64 bytes from IOVA to IOVA + `off`; they must appear in `page`.
    let copy = |dev: &EduDevice, page: u64, off: u64, seed: u8| -> Result<(), String> {
        let mut src = [0u8; 64];
        super::pattern(seed, &mut src);
        gm.write(page, &src).map_err(|_| "write")?;
        gm.write(page + off, &[0; 64]).map_err(|_| "write")?;
        super::dma_to_device(dev, IOVA, 64)?;
        super::dma_from_device(dev, IOVA + off, 64)?;
        let mut got = [0u8; 64];
        gm.read(page + off, &mut got).map_err(|_| "read")?;
        if got != src {
            return Err(format!(
                "edu {}: the copy did not land in the page at {page:#x}",
                dev.bdf
            ));
        }
        Ok(())
    };

    c.attach(a, ioas1).map_err(e("DEVICE_ATTACH"))?;
    checks.record(
        "group-first-attach-moves-the-group",
        copy(a_dev, page1, 0x100, 0x31).and_then(|()| copy(b_dev, page1, 0x200, 0x32)),
    );
    checks.record(
        "group-member-elsewhere-exdev",
        match c.attach(b, ioas2) {
            Err(x) if x == errno::EXDEV => Ok(()),
            other => Err(format!(
                "attach to another IOAS gave {other:?}, expected EXDEV"
            )),
        },
    );
    checks.record(
        "group-member-joins",
        c.attach(b, ioas1).map(|_| ()).map_err(e("join")),
    );
    checks.record(
        "group-replace-moves-both",
        c.replace(a, ioas2)
            .map_err(e("DEVICE_REPLACE"))
            .and_then(|_| copy(a_dev, page2, 0x300, 0x41))
            .and_then(|()| copy(b_dev, page2, 0x400, 0x42)),
    );
    c.detach(a).map_err(e("DETACH"))?;
    c.detach(b).map_err(e("DETACH"))?;
    checks.record(
        "group-detached-blocks",
        (|| {
            gm.write(page2 + 0x500, &[0; 64]).map_err(|_| "write")?;
            for dev in [a_dev, b_dev] {
                super::dma_from_device(dev, IOVA + 0x500, 64)?;
            }
            let mut got = [0u8; 64];
            gm.read(page2 + 0x500, &mut got).map_err(|_| "read")?;
            if got.iter().any(|&x| x != 0) {
                return Err(String::from("DMA of a detached group reached memory"));
            }
            Ok(())
        })(),
    );
    fd.destroy_guest(g)
        .map_err(|e| format!("destroy_guest: {e:?}"))?;
    buf.free();
    Ok(())
}

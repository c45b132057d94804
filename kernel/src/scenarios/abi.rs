//! `scenario=abi`: the hypercall ABI v1 driven through `dispatch` exactly as a guest would
//! (guests that issue real hypercalls come later), on the real IOMMU backend, with edu DMA
//! through the IOAS the "guest" created: GET_INFO, DEVICE_LIST, RESERVED_RANGES, IOAS_ALLOC,
//! ALLOW_IOVAS, DEVICE_ATTACH, IOAS_MAP, DMA, DEVICE_REPLACE to a second IOAS, DMA again,
//! UNMAP, DETACH, DESTROY — and at the end no object is left.

use super::{Checks, DMA_POLLS, EduDevice, buffer, find_edu, in_throwaway_guest};
use crate::discovery::{Platform, Unit};
use crate::mem::dma::DmaGuestMemory;
use crate::mem::frame::PAGE_SIZE;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use boot::BootInfo;
use iommu::iommufd::IommuHw;
use iommu::iommufd::selftest::{DmaEngine, FLOW_MEMORY, dma_flow};

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
        if let Err(why) = group_flow(platform, &mut checks) {
            checks.record("abi-group setup", Err(why));
        }
        return checks.status();
    }
    let r = flow(platform);
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

/// The owner's hardware-device index of each edu (the owner brought up their unit and holds
/// them with their DMA aliases and IOMMU groups from discovery), each reported as the backend
/// sees it.
fn owned_indices(
    owner: &crate::iommu_owner::IommuOwner,
    edus: &[EduDevice],
) -> Result<alloc::vec::Vec<usize>, String> {
    #[cfg(target_arch = "x86_64")]
    let kind = "VT-d";
    #[cfg(target_arch = "aarch64")]
    let kind = "SMMUv3";
    let mut out = vec![];
    for dev in edus {
        let i = owner.device_index(dev.segment, dev.bdf).ok_or_else(|| {
            format!(
                "edu {} is not an assignable device of the IOMMU owner",
                dev.bdf
            )
        })?;
        let d = &owner.devices[i];
        // VT-d source IDs print as 16-bit words, SMMU StreamIDs as they are.
        #[cfg(target_arch = "x86_64")]
        let ids = format!(
            "{:04x?}",
            d.ids
                .iter()
                .map(|&id| id as u16)
                .collect::<alloc::vec::Vec<_>>()
        );
        #[cfg(target_arch = "aarch64")]
        let ids = format!("{:x?}", d.ids);
        println!(
            "abi: {kind} backend, edu {} sid={:#06x} ids={ids} group={} unit={}",
            dev.bdf, d.ids[0], d.group, owner.units[d.unit].name
        );
        out.push(i);
    }
    Ok(out)
}

/// Runs the flow on the owner's `Iommufd`, with one guest owning a frame-backed buffer and
/// owned device `hw`.
fn run_flow(dev: &EduDevice, hw_id: u64) -> Result<(), String> {
    let mut owner = crate::iommu_owner::lock();
    let o = owner.as_mut().ok_or("no IOMMU owner")?;
    let hw = owned_indices(o, core::slice::from_ref(dev))?[0];
    in_throwaway_guest(&mut o.fd, hw, |fd, g, buf| {
        // Guest-physical == host-physical for this in-hypervisor "guest": it owns exactly this
        // buffer, which edu writes by DMA, so it is reached only through volatile accessors.
        let gm = DmaGuestMemory::new(buf);
        dma_flow(fd, g, &gm, hw_id, &mut EduDma(dev), &mut |l| {
            println!("{l}")
        })
        .map_err(|e| format!("step {:?} failed with errno {}", e.step, e.errno))
    })
}

/// The first edu's own ID as the unit sees it: the flow finds the device by it.
fn own_id(platform: &Platform, dev: &EduDevice) -> Result<u64, String> {
    Ok(u64::from(unit_base(platform, dev)?.1))
}

fn flow(platform: &Platform) -> Result<(), String> {
    let dev = find_edu(platform, drivers::edu::DEFAULT_DMA_MASK)?;
    let hw_id = own_id(platform, &dev)?;
    run_flow(&dev, hw_id)
}

/// Every edu with a live BAR0, bus mastering on (like [`find_edu`], for all of them).
fn find_edus(platform: &Platform) -> Result<alloc::vec::Vec<EduDevice>, String> {
    super::edus(platform, drivers::edu::DEFAULT_DMA_MASK).collect()
}

/// `abi-flow=group`: two edu that the topology put in one IOMMU group (behind one PCIe-to-PCI
/// bridge), given to one guest, driven through the ABI as docs/abi.md §6.2 describes, with
/// edu DMA from each device as the proof:
/// - giving the two to two guests is refused by the group check, naming the missing member;
/// - attaching the first moves the whole group: the second's DMA is translated too;
/// - attaching the second to another IOAS is `EXDEV`; to the same one, it joins;
/// - a REPLACE moves both devices' DMA to the other IOAS at once;
/// - detaching both blocks them.
fn group_flow(platform: &Platform, checks: &mut Checks) -> Result<(), String> {
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

    let mut owner = crate::iommu_owner::lock();
    let o = owner.as_mut().ok_or("no IOMMU owner")?;
    let hw = owned_indices(o, &edus)?;
    let fd = &mut o.fd;
    let g = fd
        .create_guest()
        .map_err(|e| format!("create_guest: {e:?}"))?;
    let a = fd
        .assign_device(g, hw[0] as iommu::iommufd::HwDev)
        .map_err(|e| format!("assign_device: {e:?}"))?;
    let b = fd
        .assign_device(g, hw[1] as iommu::iommufd::HwDev)
        .map_err(|e| format!("assign_device: {e:?}"))?;
    let buf = buffer(FLOW_MEMORY, PAGE_SIZE)?;
    let pa = buf.pa;
    let gm = DmaGuestMemory::new(&buf);
    // Scratch for the calls' arguments at the start; the two IOAS' pages after it.
    const IOVA: u64 = 0x0010_0000;
    let (page1, page2) = (pa + 0x10000, pa + 0x11000);
    let mut c = Client::new(fd, g, &gm, pa);
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

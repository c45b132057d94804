//! `scenario=smmu`: the SMMUv3 driver proven by real DMA from QEMU's edu device through QEMU's
//! SMMUv3 model on `virt`. Run with `-device edu,dma_mask=...` and `edu-dma-bits=` wide enough
//! to reach RAM (edu masks bus addresses to 28 bits by default; RAM starts at 1 GiB), so that a
//! bypassed stream can be observed hitting physical memory directly.
//!
//! Every check is against the model's observable behaviour: bytes that arrive (or not) in memory,
//! and the event records it writes.

use super::{
    Buffer, Checks, DMA_POLLS, EduDevice, buffer, dma_from_device, dma_to_device, find_edu,
};
use crate::discovery::{Platform, Unit};
use crate::mem::frame::PAGE_SIZE;
use crate::mem::iommu_mem::IOMMU_MEMORY;
use crate::mem::phys::MmioRegion;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use boot::BootInfo;
use iommu::pgtable::Prot;
use iommu::smmuv3::{DomainConfig, Event, SmmuError, SmmuUnit, UnitConfig};

const M2: u64 = 2 << 20;
const K64: u64 = 64 << 10;

const IOVA_RW: u64 = 0x0010_0000;
const IOVA_RO: u64 = 0x0020_0000;
const IOVA_SUPER: u64 = 0x0040_0000;
const IOVA_CONT: u64 = 0x0080_0000;
const IOVA_UNMAPPED: u64 = 0x0def_0000;

fn e(err: SmmuError) -> String {
    format!("{err}")
}

pub fn run(info: &BootInfo, platform: &Platform) -> u32 {
    let mut checks = Checks::default();
    if let Err(why) = suite(info, platform, &mut checks) {
        checks.record("smmu setup", Err(why));
    }
    checks.status()
}

/// A round trip through `iova`: fill `buf[..len]`, DMA it into edu, DMA it back to `iova + back`,
/// and compare in memory.
fn round_trip(
    dev: &EduDevice,
    buf: &mut Buffer,
    iova: u64,
    back: u64,
    len: usize,
    seed: u8,
) -> Result<(), String> {
    buf.fill_pattern(0..len, seed);
    buf.fill(back as usize..back as usize + len, 0);
    dma_to_device(dev, iova, len)?;
    dma_from_device(dev, iova + back, len)?;
    if !buf.same(back as usize, 0, len) {
        return Err(format!("bytes written back through {iova:#x} differ"));
    }
    Ok(())
}

fn suite(info: &BootInfo, platform: &Platform, checks: &mut Checks) -> Result<(), String> {
    let bits: u32 = info
        .cmdline_value("edu-dma-bits")
        .and_then(|v| v.parse().ok())
        .unwrap_or(28);
    let dev = find_edu(platform, (1u64 << bits.min(63)) - 1)?;
    let sid = u32::from(dev.bdf.rid());
    let (unit_name, sid_fw) = platform
        .devices
        .iter()
        .find(|d| d.segment == dev.segment && d.bdf == dev.bdf)
        .and_then(|d| d.translation.as_ref())
        .map(|t| (t.unit.clone(), t.id))
        .ok_or("edu is not behind any SMMU")?;
    if sid_fw != sid {
        println!(
            "smmu: firmware StreamID {sid_fw:#x} differs from the RID {sid:#x}; using firmware's"
        );
    }
    let sid = sid_fw;
    let base = platform
        .units
        .iter()
        .find_map(|u| match u {
            Unit::Smmu { name, base, .. } if *name == unit_name => Some(*base),
            _ => None,
        })
        .ok_or("unit vanished")?;
    println!(
        "smmu: edu {} sid={sid:#x} behind {unit_name} at {base:#x}",
        dev.bdf
    );

    let mem = &IOMMU_MEMORY;
    let mmio = MmioRegion::new(base, 0x2_0000).map_err(|e| format!("{e}"))?;
    let mut unit = SmmuUnit::new(mmio, mem, UnitConfig::default()).map_err(e)?;
    let s2_cfg = DomainConfig::stage2(48);
    let s1_cfg = DomainConfig::stage1(48);

    // 1a. Stage 2.
    let mut a = buffer(PAGE_SIZE, PAGE_SIZE)?;
    let s2 = unit.create_domain(mem, s2_cfg).map_err(e)?;
    unit.map(mem, &s2, IOVA_RW, a.pa, PAGE_SIZE, Prot::READ | Prot::WRITE)
        .map_err(e)?;
    unit.attach(mem, sid, &s2).map_err(e)?;
    checks.record(
        "dma-stage2",
        round_trip(&dev, &mut a, IOVA_RW, 0x800, 256, 0x21).and_then(|()| no_new_event(&mut unit)),
    );

    // 2. Faults: unmapped IOVA → translation fault; read-only → permission fault on write.
    checks.record(
        "unmapped-iova-faults",
        expect_event(&mut unit, &dev, sid, IOVA_UNMAPPED, true, "Translation"),
    );
    let b = buffer(PAGE_SIZE, PAGE_SIZE)?;
    b.fill_pattern(0..b.len(), 0x11);
    let before = b.read_u8(0);
    unit.map(mem, &s2, IOVA_RO, b.pa, PAGE_SIZE, Prot::READ)
        .map_err(e)?;
    checks.record(
        "read-only-write-faults",
        expect_event(&mut unit, &dev, sid, IOVA_RO, true, "Permission").and_then(|()| {
            if b.read_u8(0) == before {
                Ok(())
            } else {
                Err("the write landed in read-only memory".into())
            }
        }),
    );

    // 4. A 2 MiB block and a 64 KiB contiguous-hint run.
    checks.record(
        "block-2m",
        (|| {
            let mut big = buffer(M2, M2)?;
            unit.map(mem, &s2, IOVA_SUPER, big.pa, M2, Prot::READ | Prot::WRITE)
                .map_err(e)?;
            if unit.iova_to_phys(mem, &s2, IOVA_SUPER + 0x1_2340) != Some(big.pa + 0x1_2340) {
                return Err("iova_to_phys does not see the block".into());
            }
            round_trip(&dev, &mut big, IOVA_SUPER, M2 - 0x1000, 128, 0x44)?;
            no_new_event(&mut unit)?;
            let n = unit.unmap(mem, &s2, IOVA_SUPER, M2).map_err(e)?;
            if n != M2 {
                Err(format!("unmap returned {n:#x}"))
            } else {
                Ok(())
            }
        })(),
    );
    checks.record(
        "contiguous-64k",
        (|| {
            let mut run = buffer(K64, K64)?;
            unit.map(mem, &s2, IOVA_CONT, run.pa, K64, Prot::READ | Prot::WRITE)
                .map_err(e)?;
            round_trip(&dev, &mut run, IOVA_CONT, K64 - 0x100, 64, 0x55)?;
            no_new_event(&mut unit)?;
            let n = unit.unmap(mem, &s2, IOVA_CONT, K64).map_err(e)?;
            if n != K64 {
                Err(format!("unmap returned {n:#x}"))
            } else {
                Ok(())
            }
        })(),
    );

    // 2c. Unmap then DMA faults: the TLB invalidation reached the model's TLB.
    checks.record(
        "unmap-invalidates",
        (|| {
            dma_to_device(&dev, IOVA_RW, 64)?; // prime the TLB
            no_new_event(&mut unit)?;
            let n = unit.unmap(mem, &s2, IOVA_RW, PAGE_SIZE).map_err(e)?;
            if n != PAGE_SIZE {
                return Err(format!("unmap returned {n:#x}"));
            }
            expect_event(&mut unit, &dev, sid, IOVA_RW, false, "Translation")
        })(),
    );

    // 1b / 3. Stage 1, switching the live stream from S2 to S1 while DMA is idle.
    let mut c = buffer(PAGE_SIZE, PAGE_SIZE)?;
    let s1 = unit.create_domain(mem, s1_cfg).map_err(e)?;
    unit.map(mem, &s1, IOVA_RW, c.pa, PAGE_SIZE, Prot::READ | Prot::WRITE)
        .map_err(e)?;
    checks.record(
        "switch-s2-to-s1",
        unit.attach(mem, sid, &s1)
            .map_err(e)
            .and_then(|()| round_trip(&dev, &mut c, IOVA_RW, 0x400, 128, 0x66))
            .and_then(|()| no_new_event(&mut unit)),
    );

    // 1c. Nested: stage 1 (IOVA → IPA) over stage 2 (IPA → PA).
    checks.record(
        "dma-nested",
        (|| {
            const IPA: u64 = 0x0300_0000;
            let mut n = buffer(PAGE_SIZE, PAGE_SIZE)?;
            let parent = unit.create_domain(mem, s2_cfg).map_err(e)?;
            unit.map(mem, &parent, IPA, n.pa, PAGE_SIZE, Prot::READ | Prot::WRITE)
                .map_err(e)?;
            let nested = unit.create_nested_domain(mem, &parent, 48).map_err(e)?;
            unit.map(
                mem,
                &nested,
                IOVA_RW,
                IPA,
                PAGE_SIZE,
                Prot::READ | Prot::WRITE,
            )
            .map_err(e)?;
            unit.attach(mem, sid, &nested).map_err(e)?;
            round_trip(&dev, &mut n, IOVA_RW, 0x200, 64, 0x77)?;
            no_new_event(&mut unit)?;
            // A hole in stage 2 under a valid stage-1 mapping is a stage-2 fault.
            unit.map(
                mem,
                &nested,
                IOVA_RO,
                IPA + 0x10_0000,
                PAGE_SIZE,
                Prot::READ | Prot::WRITE,
            )
            .map_err(e)?;
            expect_event(&mut unit, &dev, sid, IOVA_RO, true, "Translation")?;
            unit.attach(mem, sid, &s1).map_err(e)
        })(),
    );

    // 3b. Bypass then abort: with bypass, a DMA to a physical address lands there; after
    //     switching to abort, the same DMA changes nothing (and raises no translation fault).
    checks.record(
        "switch-bypass-to-abort",
        (|| {
            let mut p = buffer(PAGE_SIZE, PAGE_SIZE)?;
            if p.pa + PAGE_SIZE > dev.edu.dma_mask() {
                return Err(format!(
                    "edu's DMA mask {:#x} cannot reach RAM at {:#x}; set dma_mask and edu-dma-bits",
                    dev.edu.dma_mask(),
                    p.pa
                ));
            }
            unit.set_bypass(mem, sid).map_err(e)?;
            let pa = p.pa;
            round_trip(&dev, &mut p, pa, 0x100, 32, 0x12)?;
            unit.set_abort(mem, sid).map_err(e)?;
            p.fill(0x300..0x320, 0);
            dma_from_device(&dev, p.pa + 0x300, 32)?;
            if !p.all(0x300..0x320, 0) {
                return Err("DMA reached memory with the stream set to abort".into());
            }
            unit.poll_events(&mut |_| {});
            unit.attach(mem, sid, &s1).map_err(e)
        })(),
    );

    // 5. 1000 faulting DMAs, draining every 100: every one counted, or lost through an event
    //    queue overflow. 4-byte DMAs: QEMU's edu moves larger transfers in 4-byte accesses, and
    //    the SMMU model reports each faulting access.
    checks.record(
        "fault-storm",
        (|| {
            let base = unit.event_count(sid);
            let lost = unit.events_lost();
            for i in 0..1000u64 {
                dev.edu
                    .dma_from_device(IOVA_UNMAPPED + (i % 16) * PAGE_SIZE, 4)
                    .map_err(|e| format!("{e:?}"))?;
                dev.edu.wait_dma(DMA_POLLS).map_err(|e| format!("{e:?}"))?;
                if i % 100 == 99 {
                    unit.poll_events(&mut |_| {});
                }
            }
            unit.poll_events(&mut |_| {});
            let got = unit.event_count(sid) - base;
            let lost = unit.events_lost() - lost;
            println!("smmu: fault storm: {got} of 1000 events recorded, {lost} overflow(s)");
            if got == 1000 || (got < 1000 && lost > 0) {
                Ok(())
            } else {
                Err(format!("{got} events, {lost} overflows"))
            }
        })(),
    );
    let c = unit.counters();
    println!(
        "smmu: counters: {c:?} table-memory={} KiB",
        mem.live_bytes() >> 10
    );
    Ok(())
}

fn no_new_event(unit: &mut SmmuUnit<MmioRegion>) -> Result<(), String> {
    let mut seen = None;
    unit.poll_events(&mut |ev| seen = Some(format!("{ev}")));
    match seen {
        None => Ok(()),
        Some(ev) => Err(format!("unexpected event: {ev}")),
    }
}

/// Makes edu write (`write`) or read `iova`; expects an event of `kind` for our StreamID at the
/// page of `iova` with the right direction.
fn expect_event(
    unit: &mut SmmuUnit<MmioRegion>,
    dev: &EduDevice,
    sid: u32,
    iova: u64,
    write: bool,
    kind: &str,
) -> Result<(), String> {
    if write {
        dma_from_device(dev, iova, 64)?;
    } else {
        dma_to_device(dev, iova, 64)?;
    }
    let mut events: Vec<Event> = Vec::new();
    unit.poll_events(&mut |ev| events.push(*ev));
    let ev = events
        .first()
        .ok_or_else(|| format!("no event for a DMA to {iova:#x}"))?;
    println!("smmu: event: {ev}");
    if !format!("{:?}", ev.kind).contains(kind) {
        return Err(format!("event {:?}, expected {kind}", ev.kind));
    }
    if ev.stream_id != sid {
        return Err(format!(
            "event StreamID {:#x}, expected {sid:#x}",
            ev.stream_id
        ));
    }
    if ev.input_addr & !0xfff != iova & !0xfff {
        return Err(format!(
            "event address {:#x}, expected the page {:#x}",
            ev.input_addr,
            iova & !0xfff
        ));
    }
    if ev.read == write {
        return Err(format!(
            "event says read={} but the DMA {}",
            ev.read,
            if write { "wrote" } else { "read" }
        ));
    }
    Ok(())
}

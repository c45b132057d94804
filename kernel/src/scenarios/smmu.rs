//! `scenario=smmu`: the SMMUv3 driver proven by real DMA from QEMU's edu device through QEMU's
//! SMMUv3 model on `virt`. Run with `-device edu,dma_mask=...` and `edu-dma-bits=` wide enough
//! to reach RAM (edu masks bus addresses to 28 bits by default; RAM starts at 1 GiB), so that a
//! bypassed stream can be observed hitting physical memory directly.
//!
//! Every check is against the model's observable behaviour: bytes that arrive (or not) in memory,
//! and the event records it writes, matched by `EventType`. Where DMA cannot tell two encodings
//! apart (a 2 MiB block or a contiguous run from plain 4 KiB pages), the check reads the
//! descriptors back from the stage-2 table the SMMU walks, found from the stream table base read
//! back from its registers (see `hw_ste`, `hw_s2_leaf`).

use super::{
    Buffer, Checks, EduDevice, buffer, dma_from_device, dma_to_device, find_edu, record_observed,
    snapshot, whole_buffer_eq,
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
use core::sync::atomic::Ordering;
use iommu::hw::Mmio;
use iommu::pgtable::{Gather, Prot, TableMemory};
use iommu::smmuv3::regs::offset;
use iommu::smmuv3::{DomainConfig, Event, EventType, FaultClass, SmmuError, SmmuUnit};

const M2: u64 = 2 << 20;
const K64: u64 = 64 << 10;

const IOVA_RW: u64 = 0x0010_0000;
const IOVA_RO: u64 = 0x0020_0000;
const IOVA_SUPER: u64 = 0x0040_0000;
const IOVA_CONT: u64 = 0x0080_0000;
const IOVA_UNMAPPED: u64 = 0x0def_0000;
/// Two pages far apart, unmapped in one invalidation round.
const IOVA_BATCH_A: u64 = 0x0030_0000;
const IOVA_BATCH_B: u64 = 0x0c00_0000;

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
    // Every StreamID the edu's DMA may carry: its own, then its DMA aliases (behind a
    // PCIe-to-PCI bridge the SMMU sees the bridge's (secondary, 00.0) ID), IORT/DT-mapped.
    let sids: Vec<u32> = platform
        .devices
        .iter()
        .find(|d| d.segment == dev.segment && d.bdf == dev.bdf)
        .map(|d| d.ids.clone())
        .filter(|ids| ids.first() == Some(&sid))
        .unwrap_or_else(|| alloc::vec![sid]);
    println!("smmu: edu StreamIDs {sids:x?}");
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
    // The unit comes from the kernel's IOMMU owner, which brought it up at boot.
    let mut owner = crate::iommu_owner::lock();
    let o = owner
        .as_mut()
        .ok_or("no IOMMU owner (the boot report says why)")?;
    let index = o
        .unit_index(&unit_name)
        .ok_or_else(|| format!("the IOMMU owner does not hold {unit_name}"))?;
    let unit = &mut o.fd.hw_mut().units_mut()[index];
    let s2_cfg = DomainConfig::stage2(48);
    let s1_cfg = DomainConfig::stage1(48);

    // 1a. Stage 2.
    let mut a = buffer(PAGE_SIZE, PAGE_SIZE)?;
    let s2 = unit.create_domain(mem, s2_cfg).map_err(e)?;
    unit.map(mem, &s2, IOVA_RW, a.pa, PAGE_SIZE, Prot::READ | Prot::WRITE)
        .map_err(e)?;
    unit.attach_streams(mem, &sids, &s2).map_err(e)?;
    checks.record(
        "dma-stage2",
        round_trip(&dev, &mut a, IOVA_RW, 0x800, 256, 0x21).and_then(|()| no_new_event(unit)),
    );

    // 2. Faults: unmapped IOVA → translation fault; read-only → permission fault on write.
    checks.record(
        "unmapped-iova-faults",
        expect_event(
            index,
            unit,
            &dev,
            sid,
            IOVA_UNMAPPED,
            true,
            EventType::Translation,
        )
        .and_then(|ev| stage2_at(&ev, IOVA_UNMAPPED)),
    );
    let b = buffer(PAGE_SIZE, PAGE_SIZE)?;
    b.fill_pattern(0..b.len(), 0x11);
    let untouched = snapshot(&b);
    unit.map(mem, &s2, IOVA_RO, b.pa, PAGE_SIZE, Prot::READ)
        .map_err(e)?;
    checks.record(
        "read-only-write-faults",
        expect_event(index, unit, &dev, sid, IOVA_RO, true, EventType::Permission).and_then(|ev| {
            stage2_at(&ev, IOVA_RO)?;
            whole_buffer_eq(&b, &untouched)
                .map_err(|d| format!("the write reached read-only memory: {d}"))
        }),
    );

    // 4. A 2 MiB block and a 64 KiB contiguous-hint run. A DMA round trip alone would pass
    //    with 4 KiB pages too, so the leaves are read back from the stage-2 table the STE in
    //    the programmed stream table points to.
    record_observed(
        checks,
        "block-2m",
        (|| {
            let mut big = buffer(M2, M2)?;
            unit.map(mem, &s2, IOVA_SUPER, big.pa, M2, Prot::READ | Prot::WRITE)
                .map_err(e)?;
            let leaf = hw_s2_leaf(unit, sid, IOVA_SUPER + 0x1_2340)?;
            let last = hw_s2_leaf(unit, sid, IOVA_SUPER + M2 - 1)?;
            let observed = format!(
                "leaf={} level={} desc={:#x}",
                leaf.size_name(),
                leaf.level,
                leaf.desc
            );
            // A level-2 block: bits 1:0 = 0b01.
            if leaf.level != 2 || leaf.desc & 3 != 1 {
                return Err(format!("the SMMU walks to {observed}, not a 2 MiB block"));
            }
            if leaf.base != big.pa {
                return Err(format!(
                    "{observed} maps {:#x}, the buffer is at {:#x}",
                    leaf.base, big.pa
                ));
            }
            // S2AP, bits 7:6: 0b11 = read/write.
            if (leaf.desc >> 6) & 3 != 3 {
                return Err(format!("{observed} is not read/write (S2AP)"));
            }
            if (last.level, last.desc) != (leaf.level, leaf.desc) {
                return Err(format!(
                    "the end of the range walks to level {} desc {:#x}, not the same block",
                    last.level, last.desc
                ));
            }
            round_trip(&dev, &mut big, IOVA_SUPER, M2 - 0x1000, 128, 0x44)?;
            no_new_event(unit)?;
            let n = unit.unmap(mem, &s2, IOVA_SUPER, M2).map_err(e)?;
            if n != M2 {
                return Err(format!("unmap returned {n:#x}"));
            }
            Ok(format!(
                "{observed}, read from the stage-2 table S2TTB points to"
            ))
        })(),
    );
    record_observed(
        checks,
        "contiguous-64k",
        (|| {
            let mut run = buffer(K64, K64)?;
            unit.map(mem, &s2, IOVA_CONT, run.pa, K64, Prot::READ | Prot::WRITE)
                .map_err(e)?;
            // 4 KiB granule: a contiguous run is 16 level-3 entries, 16-entry aligned in the
            // table and in the output (Arm ARM D8.6.1), each with the Contiguous bit.
            if !IOVA_CONT.is_multiple_of(K64) || !run.pa.is_multiple_of(K64) {
                return Err("the run is not 64 KiB aligned".into());
            }
            for k in 0..K64 / PAGE_SIZE {
                let leaf = hw_s2_leaf(unit, sid, IOVA_CONT + k * PAGE_SIZE)?;
                if leaf.level != 3 || !leaf.contiguous() || leaf.base != run.pa + k * PAGE_SIZE {
                    return Err(format!(
                        "page {k} of the run walks to leaf={} level={} desc={:#x}: not a 4 KiB page with Contiguous=1 at {:#x}",
                        leaf.size_name(),
                        leaf.level,
                        leaf.desc,
                        run.pa + k * PAGE_SIZE
                    ));
                }
            }
            // The bit belongs to the run: the lone read-only page beside it has none.
            let lone = hw_s2_leaf(unit, sid, IOVA_RO)?;
            if lone.level != 3 || lone.contiguous() {
                return Err(format!(
                    "the lone page at {IOVA_RO:#x} walks to level {} desc {:#x}",
                    lone.level, lone.desc
                ));
            }
            round_trip(&dev, &mut run, IOVA_CONT, K64 - 0x100, 64, 0x55)?;
            no_new_event(unit)?;
            let n = unit.unmap(mem, &s2, IOVA_CONT, K64).map_err(e)?;
            if n != K64 {
                return Err(format!("unmap returned {n:#x}"));
            }
            Ok("leaf=4K level=3 Contiguous=1 on all 16 entries of the run, 0 on a lone page, read from the stage-2 table S2TTB points to".into())
        })(),
    );

    // 2c. Unmap then DMA faults: the TLB invalidation reached the model's TLB.
    checks.record(
        "unmap-invalidates",
        (|| {
            dma_to_device(&dev, IOVA_RW, 64)?; // prime the TLB
            no_new_event(unit)?;
            let n = unit.unmap(mem, &s2, IOVA_RW, PAGE_SIZE).map_err(e)?;
            if n != PAGE_SIZE {
                return Err(format!("unmap returned {n:#x}"));
            }
            expect_event(
                index,
                unit,
                &dev,
                sid,
                IOVA_RW,
                false,
                EventType::Translation,
            )
            .and_then(|ev| stage2_at(&ev, IOVA_RW))
        })(),
    );

    // 2d. Two ranges unmapped into two gathers, then one round for both (`flush_batch`):
    //     both were cached in QEMU's TLB, and after the round's single CMD_SYNC both fault, so
    //     the batched commands reached the model. The SYNC count is the driver's own (the host
    //     tests count commands on the queue).
    record_observed(
        checks,
        "batched-unmap-invalidates",
        (|| {
            let x = buffer(PAGE_SIZE, PAGE_SIZE)?;
            let y = buffer(PAGE_SIZE, PAGE_SIZE)?;
            for (iova, pa) in [(IOVA_BATCH_A, x.pa), (IOVA_BATCH_B, y.pa)] {
                unit.map(mem, &s2, iova, pa, PAGE_SIZE, Prot::READ | Prot::WRITE)
                    .map_err(e)?;
                dma_to_device(&dev, iova, 64)?; // prime the TLB
            }
            no_new_event(unit)?;
            let before = unit.counters();
            let (mut ga, mut gb) = (Gather::new(), Gather::new());
            let ra = unit.unmap_deferred(mem, &s2, IOVA_BATCH_A, PAGE_SIZE, &mut ga);
            let rb = unit.unmap_deferred(mem, &s2, IOVA_BATCH_B, PAGE_SIZE, &mut gb);
            unit.flush_batch(mem, &mut [(&s2, &mut ga), (&s2, &mut gb)])
                .map_err(e)?;
            if (ra.map_err(e)?, rb.map_err(e)?) != (PAGE_SIZE, PAGE_SIZE) {
                return Err("unmap did not return one page each".into());
            }
            let syncs = unit.counters().syncs - before.syncs;
            for iova in [IOVA_BATCH_A, IOVA_BATCH_B] {
                expect_event(index, unit, &dev, sid, iova, false, EventType::Translation)
                    .and_then(|ev| stage2_at(&ev, iova))?;
            }
            Ok(format!("2 ranges in one round: {syncs} CMD_SYNC"))
        })(),
    );

    // 1b / 3. Stage 1, switching the live stream from S2 to S1 while DMA is idle.
    let mut c = buffer(PAGE_SIZE, PAGE_SIZE)?;
    let s1 = unit.create_domain(mem, s1_cfg).map_err(e)?;
    unit.map(mem, &s1, IOVA_RW, c.pa, PAGE_SIZE, Prot::READ | Prot::WRITE)
        .map_err(e)?;
    checks.record(
        "switch-s2-to-s1",
        unit.attach_streams(mem, &sids, &s1)
            .map_err(e)
            .and_then(|()| round_trip(&dev, &mut c, IOVA_RW, 0x400, 128, 0x66))
            .and_then(|()| no_new_event(unit)),
    );

    // 1c. Nested: stage 1 (IOVA → IPA) over stage 2 (IPA → PA).
    record_observed(
        checks,
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
            unit.attach_streams(mem, &sids, &nested).map_err(e)?;
            round_trip(&dev, &mut n, IOVA_RW, 0x200, 64, 0x77)?;
            no_new_event(unit)?;
            // A hole in stage 2 under a valid stage-1 mapping is a stage-2 fault on the input
            // transaction (§7.3.12: S2 = 1, CLASS = IN) that reports the IPA stage 1 produced.
            const HOLE: u64 = IPA + 0x10_0000;
            unit.map(
                mem,
                &nested,
                IOVA_RO,
                HOLE,
                PAGE_SIZE,
                Prot::READ | Prot::WRITE,
            )
            .map_err(e)?;
            let ev = expect_event(
                index,
                unit,
                &dev,
                sid,
                IOVA_RO,
                true,
                EventType::Translation,
            )?;
            if !ev.stage2 {
                return Err(format!("{ev}: a stage-1 fault, expected stage 2"));
            }
            if ev.class != FaultClass::Input {
                return Err(format!(
                    "{ev}: CLASS {:?}, expected the input (IN)",
                    ev.class
                ));
            }
            if ev.ipa != HOLE {
                return Err(format!("{ev}: IPA {:#x}, expected {HOLE:#x}", ev.ipa));
            }
            unit.attach_streams(mem, &sids, &s1).map_err(e)?;
            Ok(format!(
                "F_TRANSLATION S2=1 CLASS=IN ipa={:#x} for iova={:#x}",
                ev.ipa, ev.input_addr
            ))
        })(),
    );

    // 3b. Bypass then abort: with bypass, a DMA to a physical address lands there; after
    //    switching to abort, the same DMA changes no byte of the buffer and records no event:
    //    STE.Config = 0b000 aborts without an event (IHI 0070 §5.2, STE.Config), and QEMU
    //    records none (hw/arm/smmuv3.c, smmuv3_translate: "no event is recorded on abort").
    //    The STE the SMMU walks is read back before each DMA, so the abort is the STE's.
    record_observed(
        checks,
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
            unit.set_bypass_streams(mem, &sids).map_err(e)?;
            let config = ste_config(&hw_ste(unit, sid)?)?;
            if config != 0b100 {
                return Err(format!("bypass wrote STE.Config {config:#05b}"));
            }
            let pa = p.pa;
            round_trip(&dev, &mut p, pa, 0x100, 32, 0x12)?;
            no_new_event(unit)?;
            unit.set_abort_streams(mem, &sids).map_err(e)?;
            let config = ste_config(&hw_ste(unit, sid)?)?;
            if config != 0b000 {
                return Err(format!("abort wrote STE.Config {config:#05b}"));
            }
            let untouched = snapshot(&p);
            let before = unit.event_count(sid);
            dma_from_device(&dev, p.pa + 0x300, 32)?;
            whole_buffer_eq(&p, &untouched)
                .map_err(|d| format!("DMA reached memory with the stream set to abort: {d}"))?;
            let mut events = 0u32;
            let poll = unit.poll_events(&mut |ev| {
                events += 1;
                println!("smmu: event after abort: {ev}");
            });
            if events != 0 || poll.overflowed || unit.event_count(sid) != before {
                return Err(format!(
                    "{events} event(s) for a DMA to an abort STE, which records none"
                ));
            }
            unit.attach_streams(mem, &sids, &s1).map_err(e)?;
            Ok("STE.Config 0b100 then 0b000 read back; the aborted DMA changed no byte and recorded 0 events".into())
        })(),
    );

    // 5. 1000 faulting DMAs, draining every 100. 4-byte DMAs: QEMU's edu moves larger
    //    transfers in 4-byte accesses and the SMMU model reports each faulting access, so each
    //    DMA is one event, and at most 100 are pending in the 128-entry queue: no overflow may
    //    occur. Exactly 1000 F_TRANSLATION events, for our StreamID, in order, and none lost.
    record_observed(
        checks,
        "fault-storm",
        (|| {
            let base = unit.event_count(sid);
            let lost = unit.events_lost();
            // SMMU_EVENTQ_BASE.LOG2SIZE, bits 4:0 (§6.3.26), as programmed.
            let entries = 1u32 << (unit.mmio().read32(offset::EVENTQ_BASE) & 0x1f);
            if entries <= 100 {
                return Err(format!(
                    "a {entries}-entry event queue cannot hold 100 events between drains"
                ));
            }
            let mut seen = 0u64;
            let mut strays = 0u32;
            let mut global_errors = 0u32;
            let irq_before = crate::smmu_irq::stats(index);
            let mut drain = |unit: &mut SmmuUnit<'static, MmioRegion>| -> u64 {
                let start = seen;
                let mut on_event = |ev: &Event| {
                    let page = IOVA_UNMAPPED + (seen % 16) * PAGE_SIZE;
                    if ev.kind != EventType::Translation
                        || !sids.contains(&ev.stream_id)
                        || ev.input_addr & !0xfff != page
                        || ev.read
                    {
                        strays += 1;
                    }
                    seen += 1;
                };
                // Interrupt-driven: reads the queue only when the event interrupt was taken
                // (or while the rate limiter holds it off).
                if let Some(poll) = crate::smmu_irq::drain(index, unit, &mut on_event) {
                    global_errors |= poll.global_errors;
                }
                seen - start
            };
            // Events read by each drain, split by whether the event interrupt was taken since
            // the previous drain (announced) or not (the limiter held it off in IRQ_CTRL: the
            // announcement was suppressed and the drain read them anyway).
            let taken = || {
                let s = crate::smmu_irq::stats(index);
                s.eventq_taken + s.eventq_remote
            };
            let (mut announced, mut suppressed) = (0u64, 0u64);
            let mut mark = taken();
            let mut account = |read: u64| {
                let now = taken();
                if now != mark {
                    announced += read;
                } else {
                    suppressed += read;
                }
                mark = now;
            };
            for i in 0..1000u64 {
                dma_from_device(&dev, IOVA_UNMAPPED + (i % 16) * PAGE_SIZE, 4)?;
                if i % 100 == 99 {
                    account(drain(unit));
                }
            }
            account(drain(unit));
            // Whatever the interrupt path left behind is found by reading the queue directly:
            // nothing may be left.
            let mut leftover = 0u32;
            unit.poll_events(&mut |_| leftover += 1);
            let irq_after = crate::smmu_irq::stats(index);
            let (irqs, remote, drains, limited) = (
                irq_after.eventq_taken - irq_before.eventq_taken,
                irq_after.eventq_remote - irq_before.eventq_remote,
                irq_after.drains - irq_before.drains,
                irq_after.limited_windows - irq_before.limited_windows,
            );
            let path = if crate::smmu_irq::uses_interrupts(index) {
                if irqs == 0 || leftover != 0 {
                    return Err(format!(
                        "event interrupt taken {irqs} times, {leftover} records left in the queue after the interrupt-driven drains"
                    ));
                }
                println!(
                    "smmu: fault storm: {announced} event(s) drained after an event interrupt, {suppressed} with the interrupt held off by the limiter (limiter engaged in {limited} window(s))"
                );
                if announced + suppressed != 1000 || (limited > 0) != (suppressed > 0) {
                    return Err(format!(
                        "{announced} announced + {suppressed} suppressed events for 1000 faults, limiter engaged in {limited} window(s)"
                    ));
                }
                format!(
                    "; interrupt-driven: eventq interrupt taken {irqs} times by its EL2 handler ({remote} seen pending at the distributor), {drains} drains, rate limiter engaged in {limited} window(s), 0 records left behind"
                )
            } else {
                format!("; polled (no fault interrupt), {leftover} records left behind")
            };
            let got = unit.event_count(sid) - base;
            let lost = unit.events_lost() - lost;
            println!("smmu: fault storm: {got} of 1000 events recorded, {lost} overflow(s)");
            if got != 1000 || seen != 1000 || lost != 0 || strays != 0 || global_errors != 0 {
                return Err(format!(
                    "{got} events counted ({seen} drained, {strays} not the expected F_TRANSLATION), {lost} overflow(s), GERROR {global_errors:#x}; expected exactly 1000 and none lost"
                ));
            }
            Ok(format!(
                "exactly 1000 F_TRANSLATION events for 1000 DMAs, in order, 0 lost ({entries}-entry queue drained every 100){path}"
            ))
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

/// On a stage-2-only stream the IPA is the IOVA: a fault must come from stage 2 (S2 = 1) and
/// report the IOVA's page as its IPA (§7.3.12).
fn stage2_at(ev: &Event, iova: u64) -> Result<(), String> {
    if !ev.stage2 || ev.ipa != iova & !0xfff {
        return Err(format!(
            "{ev}: expected a stage-2 fault at IPA {:#x}",
            iova & !0xfff
        ));
    }
    Ok(())
}

/// Makes edu write (`write`) or read `iova`; expects an event of type `kind` for our StreamID
/// at the page of `iova` with the right direction, and returns it for further checks.
fn expect_event(
    index: usize,
    unit: &mut SmmuUnit<'static, MmioRegion>,
    dev: &EduDevice,
    sid: u32,
    iova: u64,
    write: bool,
    kind: EventType,
) -> Result<Event, String> {
    if write {
        dma_from_device(dev, iova, 64)?;
    } else {
        dma_to_device(dev, iova, 64)?;
    }
    let mut events: Vec<Event> = Vec::new();
    // Through the fault interrupt: the queue is read only if the event interrupt was taken
    // (or the unit is polled, `smmu-faults=poll`).
    crate::smmu_irq::drain(index, unit, &mut |ev| events.push(*ev));
    let ev = events
        .first()
        .ok_or_else(|| format!("no event for a DMA to {iova:#x}"))?;
    println!("smmu: event: {ev}");
    if ev.stream_id != sid && unit.owner_of(ev.stream_id) == sid {
        println!(
            "smmu: event on StreamID {:#x}, a DMA alias of the edu (StreamID {sid:#x})",
            ev.stream_id
        );
    }
    if ev.kind != kind {
        return Err(format!("event {ev}, expected {}", kind.name()));
    }
    if unit.owner_of(ev.stream_id) != sid {
        return Err(format!(
            "event StreamID {:#x}, expected {sid:#x} or one of its DMA aliases",
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
    Ok(*ev)
}

// ---------------------------------------------------------------------------------------------
// Reading back what the SMMU walks
// ---------------------------------------------------------------------------------------------

/// One 64-bit word of table memory at `pa` (8-byte aligned), as the SMMU would fetch it.
fn table_word(pa: u64) -> u64 {
    let page = IOMMU_MEMORY.table(pa & !0xfff, 512);
    page[((pa & 0xfff) / 8) as usize].load(Ordering::Acquire)
}

/// The STE the SMMU uses for `sid`, found from the stream table it was programmed with
/// (SMMU_STRTAB_BASE and _CFG read back from the registers, 32 bits at a time as QEMU
/// requires), with the layouts of IHI 0070 §6.3.23-6.3.24, §5.1 and §5.2 written out here
/// rather than through the driver's decoders.
fn hw_ste(unit: &SmmuUnit<MmioRegion>, sid: u32) -> Result<[u64; 8], String> {
    const ADDR_51_6: u64 = 0x000f_ffff_ffff_ffc0;
    let mmio = unit.mmio();
    let base = u64::from(mmio.read32(offset::STRTAB_BASE))
        | u64::from(mmio.read32(offset::STRTAB_BASE + 4)) << 32;
    let cfg = mmio.read32(offset::STRTAB_BASE_CFG);
    // LOG2SIZE 5:0, SPLIT 10:6, FMT 17:16 (0 linear, 1 two-level).
    let (log2size, split, fmt) = (cfg & 0x3f, (cfg >> 6) & 0x1f, (cfg >> 16) & 3);
    if u64::from(sid) >> log2size != 0 {
        return Err(format!("StreamID {sid:#x} beyond LOG2SIZE {log2size}"));
    }
    let ste = match fmt {
        0 => (base & ADDR_51_6) + u64::from(sid) * 64,
        1 => {
            // Level-1 descriptor: Span 4:0 (2^(Span-1) STEs), L2Ptr 51:6.
            let d = table_word((base & ADDR_51_6) + u64::from(sid >> split) * 8);
            let span = d & 0x1f;
            let idx = u64::from(sid & ((1 << split) - 1));
            if span == 0 || idx >= 1 << (span - 1) {
                return Err(format!(
                    "no level-2 STE for StreamID {sid:#x} (Span {span})"
                ));
            }
            (d & ADDR_51_6) + idx * 64
        }
        f => return Err(format!("STRTAB_BASE_CFG.FMT {f}")),
    };
    Ok(core::array::from_fn(|i| table_word(ste + 8 * i as u64)))
}

/// STE.Config (word 0, bits 3:1) of a valid STE (V, bit 0).
fn ste_config(ste: &[u64; 8]) -> Result<u64, String> {
    if ste[0] & 1 == 0 {
        return Err("the STE is not valid".into());
    }
    Ok((ste[0] >> 1) & 7)
}

/// A stage-2 leaf descriptor the SMMU reaches for one IPA.
struct S2Leaf {
    /// Lookup level: 3 = 4 KiB page, 2 = 2 MiB block, 1 = 1 GiB block.
    level: u32,
    desc: u64,
    /// Output address of the leaf's first byte.
    base: u64,
}

impl S2Leaf {
    /// Contiguous hint, descriptor bit 52 (Arm ARM D8.3.2).
    fn contiguous(&self) -> bool {
        self.desc & (1 << 52) != 0
    }

    fn size_name(&self) -> &'static str {
        match self.level {
            3 => "4K",
            2 => "2M",
            1 => "1G",
            _ => "?",
        }
    }
}

/// Walks the stage-2 table of `sid`'s STE (Config 0b110 or 0b111) to the leaf for `ipa`:
/// word 2 holds S2T0SZ 37:32, S2SL0 39:38 and S2TG 47:46, word 3 S2TTB 51:4 (§5.2); the
/// descriptors are VMSAv8-64 with a 4 KiB granule (Arm ARM D8.3): bit 0 valid, bit 1 table
/// (levels 0-2) or page (level 3), 0b01 a block at levels 1-2, OA 47:12.
fn hw_s2_leaf(unit: &SmmuUnit<MmioRegion>, sid: u32, ipa: u64) -> Result<S2Leaf, String> {
    const OA_47_12: u64 = 0x0000_ffff_ffff_f000;
    let ste = hw_ste(unit, sid)?;
    let config = ste_config(&ste)?;
    if config & 0b110 != 0b110 {
        return Err(format!("STE.Config {config:#05b} has no stage 2"));
    }
    let (t0sz, sl0, tg) = (
        (ste[2] >> 32) & 0x3f,
        (ste[2] >> 38) & 3,
        (ste[2] >> 46) & 3,
    );
    if tg != 0 || sl0 == 3 {
        return Err(format!("S2TG {tg} / S2SL0 {sl0}: not a 4 KiB-granule walk"));
    }
    if ipa >> (64 - t0sz) != 0 {
        return Err(format!("IPA {ipa:#x} beyond S2T0SZ {t0sz}"));
    }
    // 4 KiB granule: SL0 0, 1, 2 start at level 2, 1, 0. The start level may concatenate
    // tables, so its index is not masked to 9 bits.
    let start = 2 - sl0 as u32;
    let mut table = ste[3] & 0x000f_ffff_ffff_fff0;
    for level in start..=3 {
        let shift = 12 + 9 * (3 - level);
        let index = if level == start {
            ipa >> shift
        } else {
            (ipa >> shift) & 511
        };
        let d = table_word(table + index * 8);
        if d & 1 == 0 {
            return Err(format!("no valid descriptor for {ipa:#x} at level {level}"));
        }
        let leaf = match (level, d & 2 != 0) {
            (3, true) => true,
            (3, false) => return Err(format!("reserved level-3 descriptor {d:#x}")),
            (1 | 2, false) => true,
            (0, false) => return Err(format!("block descriptor {d:#x} at level 0")),
            _ => false,
        };
        if leaf {
            return Ok(S2Leaf {
                level,
                desc: d,
                base: d & OA_47_12 & !((1 << shift) - 1),
            });
        }
        table = d & OA_47_12;
    }
    Err("stage-2 walk found no leaf".into())
}

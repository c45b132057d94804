//! `scenario=its-msi`: device MSIs through the SMMU to the GICv3 ITS, and forged ones.
//!
//! edu's MSI capability is programmed with the doorbell's IOVA (GITS_TRANSLATER's page mapped at
//! `its::MSI_IOVA_BASE` in edu's stage-2 domain) and EventID 0, which MAPTI maps to an LPI. Every
//! count below is the number of times the LPI was taken by the EL2 interrupt path (the handler
//! table's counter, and the handler's own), against what the device was asked to do:
//!
//! - `msi-window-reserved`: DEVICE_RESERVED_RANGES (ABI v1, through the owner's object model as
//!   a guest would call it) reports the doorbell window for edu as `RESV_MSI`, and an
//!   IOAS_MAP at a fixed IOVA inside it is refused with EADDRINUSE;
//! - `lpi-int-command`: the ITS INT command for (DeviceID, 0) delivers exactly one LPI;
//! - `msi-raise-irq`: three writes to edu's raise-IRQ register (0x60), three LPIs;
//! - `msi-dma-done`: a DMA with the completion interrupt, one LPI;
//! - `forged-unmapped-eventid`: edu DMA-writes EventID 7 (never mapped) to the doorbell: the
//!   ITS drops it: no LPI at all, no SMMU event; a probe mapping shows the write does reach the
//!   ITS, and DISCARD removes it again;
//! - `forged-without-doorbell`: edu attached to a domain that does not map the doorbell raises
//!   its MSI: the SMMU blocks the write (F_TRANSLATION at the doorbell's IOVA page, write, edu's
//!   StreamID, attributed to edu) and no LPI arrives;
//! - `drain-on-another-cpu` (`-smp 2`): CPU 1 makes edu fault and drains while the boot CPU, which
//!   the event SPI is routed to, waits with interrupts masked: the SPI's pending state at the
//!   distributor is the signal, the boot CPU's handler never runs;
//! - `gerror-interrupt`: a full event queue makes QEMU's SMMU raise GERROR.EVENTQ_ABT_ERR and
//!   the GERROR interrupt, which the drain reports and acknowledges (GERRORN = GERROR after).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use boot::BootInfo;
use drivers::pci::ConfigSpace;
use iommu::pgtable::Prot;
use iommu::smmuv3::{DomainConfig, Event, EventType};

use super::{Checks, buffer, dma_from_device, dma_to_device, find_edu, record_observed};
use crate::arch::irq::{HANDLERS, interrupt_window};
use crate::discovery::Platform;
use crate::its::{self, MSI_IOVA_BASE};
use crate::mem::frame::PAGE_SIZE;
use crate::mem::iommu_mem::IOMMU_MEMORY;
use crate::println;

const IOVA_BUF: u64 = 0x0010_0000;
const FORGED_EVENT: u32 = 7;

static SEEN: AtomicU64 = AtomicU64::new(0);

fn on_probe(_intid: u32, _context: usize) {}

/// The LPI's handler: counts (its own count, beside the table's).
fn on_lpi(_intid: u32, _context: usize) {
    SEEN.fetch_add(1, Ordering::Relaxed);
}

pub fn run(info: &BootInfo, platform: &Platform) -> u32 {
    let mut checks = Checks::default();
    match suite(info, platform, &mut checks) {
        Ok(job) => record_observed(&mut checks, "drain-on-another-cpu", remote_drain(job)),
        Err(why) => checks.record("its-msi setup", Err(why)),
    }
    checks.status()
}

/// What CPU 1 needs to make edu fault and drain the unit: the device, its unit's index and its
/// StreamIDs.
struct RemoteJob {
    dev: super::EduDevice,
    unit: usize,
    sids: Vec<u32>,
}

static JOB: spin::Mutex<Option<RemoteJob>> = spin::Mutex::new(None);
/// CPU 1's result: (the drain read the queue, records drained, all of edu's StreamIDs, the CPU
/// that ran it).
type RemoteResult = Result<(bool, u32, bool, usize), String>;
static RESULT: spin::Mutex<Option<RemoteResult>> = spin::Mutex::new(None);

/// Runs on CPU 1: one faulting edu DMA (edu's domain maps nothing at 0x200000), then the
/// interrupt-driven drain of the unit from this CPU.
fn remote_fault(_: usize) {
    let r = (|| {
        let job = JOB.lock().take().ok_or("no job posted")?;
        dma_from_device(&job.dev, 0x20_0000, 4)?;
        let mut owner = crate::iommu_owner::lock();
        let o = owner.as_mut().ok_or("no IOMMU owner")?;
        let unit = &mut o.fd.hw_mut().units_mut()[job.unit];
        let (mut n, mut ours) = (0u32, true);
        let read = crate::smmu_irq::drain(job.unit, unit, &mut |ev| {
            n += 1;
            ours &= job.sids.contains(&ev.stream_id);
        })
        .is_some();
        Ok((read, n, ours, crate::arch::smp::cpu_index()))
    })();
    *RESULT.lock() = Some(r);
}

/// The event SPI is routed to the boot CPU, which waits here with interrupts masked while CPU 1
/// makes edu fault and drains: CPU 1 finds the interrupt pending at the distributor, takes it
/// from there (clearing it) and reads the queue; the boot CPU's handler never runs for it.
fn remote_drain(job: Option<RemoteJob>) -> Result<String, String> {
    use crate::arch::smp;
    let job = job.ok_or("the suite left no job")?;
    if smp::online() < 2 {
        return Err("needs a second CPU (-smp 2)".into());
    }
    let unit = job.unit;
    let before = crate::smmu_irq::stats(unit);
    *JOB.lock() = Some(job);
    smp::launch(1, remote_fault, 0).map_err(|e| format!("launch on CPU 1: {e:?}"))?;
    if !smp::wait_until(20_000, || smp::is_idle(1)) {
        return Err("CPU 1 did not finish".into());
    }
    let after = crate::smmu_irq::stats(unit);
    let (read, n, ours, cpu) = RESULT.lock().take().ok_or("CPU 1 left no result")??;
    let remote = after.eventq_remote - before.eventq_remote;
    let local = after.eventq_taken - before.eventq_taken;
    if !read || n != 1 || !ours || cpu != 1 || remote != 1 || local != 0 {
        return Err(format!(
            "on CPU {cpu}: queue read {read}, {n} record(s) (edu's: {ours}); event interrupt seen pending at the distributor {remote} time(s), taken by a handler {local} time(s); expected 1 record, 1 and 0"
        ));
    }
    Ok(
        "CPU 1 drained edu's 1 fault record after finding the event SPI (routed to the busy boot CPU) pending at the distributor; the boot CPU's handler never ran for it".into(),
    )
}

/// Opens interrupt windows until `lpi` has been taken `want` times in total (or a bound).
fn wait_lpis(lpi: u32, want: u64) -> u64 {
    for _ in 0..200_000 {
        interrupt_window();
        if HANDLERS.count(lpi) >= want {
            break;
        }
    }
    // A few more windows: anything beyond `want` would show up now.
    for _ in 0..1000 {
        interrupt_window();
    }
    HANDLERS.count(lpi)
}

fn expect_count(lpi: u32, before: u64, delta: u64, what: &str) -> Result<String, String> {
    let got = wait_lpis(lpi, before + delta) - before;
    let (unhandled, last) = HANDLERS.unhandled();
    if got != delta || SEEN.load(Ordering::Relaxed) != HANDLERS.count(lpi) || unhandled != 0 {
        return Err(format!(
            "{what}: LPI {lpi} taken {got} times (handler saw {}), expected {delta}; {unhandled} unhandled INTIDs (last {last})",
            SEEN.load(Ordering::Relaxed)
        ));
    }
    Ok(format!("{what}: LPI {lpi} taken exactly {delta} time(s)"))
}

fn suite(
    info: &BootInfo,
    platform: &Platform,
    checks: &mut Checks,
) -> Result<Option<RemoteJob>, String> {
    // The forged DMA aims at the doorbell window at 256 MiB: edu needs a DMA mask that wide
    // (`-device edu,dma_mask=...` and `edu-dma-bits=`).
    let bits: u32 = info
        .cmdline_value("edu-dma-bits")
        .and_then(|v| v.parse().ok())
        .unwrap_or(28);
    let dev = find_edu(platform, (1u64 << bits.min(63)) - 1)?;
    let rid = u32::from(dev.bdf.rid());
    let sid = platform
        .devices
        .iter()
        .find(|d| d.segment == dev.segment && d.bdf == dev.bdf)
        .and_then(|d| d.translation.as_ref())
        .map(|t| t.id)
        .ok_or("edu is not behind an SMMU")?;
    // DeviceID from the host bridge's msi-map (RID -> DeviceID) and/or the IORT (root complex
    // -> ITS group); both must agree when both exist.
    let iort = platform
        .acpi
        .as_ref()
        .and_then(|a| a.iort.as_ref())
        .map(|t| t.bytes);
    let (device_id, id_source) = its::device_id_in(info, iort, dev.segment, rid)?;
    let segment = platform
        .segments
        .iter()
        .find(|s| s.segment == dev.segment)
        .ok_or("edu's segment vanished")?;
    let msi = segment
        .devices
        .get(dev.bdf)
        .and_then(|f| f.caps.msi)
        .ok_or("edu has no MSI capability")?;

    record_observed(checks, "msi-window-reserved", window_reserved(&dev, sid));

    let mut its_guard = its::lock();
    let its = its_guard.as_mut().ok_or("no ITS (see the boot report)")?;
    let translater = its.translater();
    let doorbell_iova = MSI_IOVA_BASE + (translater & (PAGE_SIZE - 1));
    println!(
        "its-msi: edu {} RID {rid:#x} -> DeviceID {device_id:#x} ({id_source}), StreamID {sid:#x}; GITS_TRANSLATER {translater:#x} at IOVA {doorbell_iova:#x}",
        dev.bdf
    );
    let lpi = its.map_event(device_id, 0, on_lpi, 0)?;

    let mem = &IOMMU_MEMORY;
    let mut owner = crate::iommu_owner::lock();
    let o = owner.as_mut().ok_or("no IOMMU owner")?;
    let d = o
        .devices
        .iter()
        .find(|d| d.segment == dev.segment && d.bdf == dev.bdf)
        .ok_or("the IOMMU owner does not hold edu")?;
    let (index, sids) = (d.unit, d.ids.clone());
    let unit = &mut o.fd.hw_mut().units_mut()[index];
    let e = |err: iommu::smmuv3::SmmuError| format!("{err}");

    // edu's domain: one RAM page and the doorbell page (Device memory, write only is enough
    // but stage 2 needs read for... nothing: the ITS is written only).
    let buf = buffer(PAGE_SIZE, PAGE_SIZE)?;
    let with_doorbell = unit
        .create_domain(mem, DomainConfig::stage2(48))
        .map_err(e)?;
    unit.map(
        mem,
        &with_doorbell,
        IOVA_BUF,
        buf.pa,
        PAGE_SIZE,
        Prot::READ | Prot::WRITE,
    )
    .map_err(e)?;
    unit.map(
        mem,
        &with_doorbell,
        MSI_IOVA_BASE,
        translater & !(PAGE_SIZE - 1),
        PAGE_SIZE,
        Prot::WRITE | Prot::DEVICE,
    )
    .map_err(e)?;
    unit.attach_streams(mem, &sids, &with_doorbell).map_err(e)?;

    // 1. LPIs without a device: the ITS's INT command.
    let before = HANDLERS.count(lpi);
    its.trigger(device_id, 0)?;
    record_observed(
        checks,
        "lpi-int-command",
        expect_count(lpi, before, 1, "INT (DeviceID, EventID 0)"),
    );

    // 2. edu's MSI: address = the doorbell IOVA, data = EventID 0 (PCI 3.0 §6.8.1: Message
    //    Control +2, Address +4 (+8 high), Data +8 or +0xC), then MSI Enable.
    let cfg = &segment.ecam;
    let cap = u16::from(msi.offset);
    cfg.write32(dev.bdf, cap + 4, doorbell_iova as u32);
    let data_off = if msi.addr64 {
        cfg.write32(dev.bdf, cap + 8, (doorbell_iova >> 32) as u32);
        cap + 0xc
    } else {
        cap + 8
    };
    cfg.write16(dev.bdf, data_off, 0);
    let control = cfg.read16(dev.bdf, cap + 2);
    cfg.write16(dev.bdf, cap + 2, (control & !(0b111 << 4)) | 1);
    // An LPI's pending state is one bit (the LPI pending table, IHI 0069 ch. 5): MSIs written before the CPU takes
    // the LPI merge. Each raise is therefore waited for before the next.
    let before = HANDLERS.count(lpi);
    for i in 1..=3 {
        dev.edu.raise_irq(1);
        dev.edu.ack_irq(1);
        wait_lpis(lpi, before + i);
    }
    record_observed(
        checks,
        "msi-raise-irq",
        expect_count(lpi, before, 3, "3 writes to edu's raise-IRQ register"),
    );

    let before = HANDLERS.count(lpi);
    dev.edu
        .start_dma(drivers::edu::DmaDirection::ToDevice, IOVA_BUF, 0, 64, true)
        .map_err(|e| format!("edu: {e:?}"))?;
    dev.edu
        .wait_dma(super::DMA_POLLS)
        .map_err(|e| format!("edu: {e:?}"))?;
    dev.edu.ack_irq(drivers::edu::regs::IRQ_DMA);
    record_observed(
        checks,
        "msi-dma-done",
        expect_count(lpi, before, 1, "a DMA with its completion interrupt"),
    );

    // 3. Forged: edu's DMA engine writes EventID 7 to the doorbell itself; (edu's DeviceID, 7)
    //    is never mapped, so the ITS must drop it. To show the write does reach the ITS (and
    //    that no LPI is the ITS's decision, not a lost write), a probe LPI is then mapped for
    //    the DeviceID QEMU 10's ITS gives such a write: 0 (observed: edu's plain DMA reaches the
    //    ITS without its requester ID, unlike its MSIs, which carry its RID). Finally
    //    DISCARD removes the probe mapping and the same write is dropped again.
    record_observed(checks, "forged-unmapped-eventid", {
        (|| {
            for (i, b) in FORGED_EVENT.to_le_bytes().iter().enumerate() {
                buf.write_u8(i, *b);
            }
            dma_to_device(&dev, IOVA_BUF, 4)?;
            let forge = |probe: Option<u32>| -> Result<(u64, u64), String> {
                let (l0, p0) = (HANDLERS.count(lpi), probe.map_or(0, |p| HANDLERS.count(p)));
                dma_from_device(&dev, doorbell_iova, 4)?;
                let p = probe.map_or(0, |p| wait_lpis(p, p0 + 1) - p0);
                let l = wait_lpis(lpi, l0 + 1) - l0;
                Ok((l, p))
            };
            let (dropped, _) = forge(None)?;
            let probe = its.map_event(0, FORGED_EVENT, on_probe, 0)?;
            let (edu_lpi, probed) = forge(Some(probe))?;
            its.discard(0, FORGED_EVENT)?;
            let (edu_lpi2, after_discard) = forge(Some(probe))?;
            let (unhandled, last) = HANDLERS.unhandled();
            let mut events: Vec<Event> = Vec::new();
            unit.poll_events(&mut |ev| events.push(*ev));
            if dropped != 0
                || edu_lpi != 0
                || edu_lpi2 != 0
                || probed != 1
                || after_discard != 0
                || unhandled != 0
                || !events.is_empty()
            {
                return Err(format!(
                    "DMA write of EventID {FORGED_EVENT}: {dropped} LPI(s) (expected 0); with the probe mapped: probe {probed} (expected 1), edu's LPI {edu_lpi}; after DISCARD: probe {after_discard}, edu's LPI {edu_lpi2} (expected 0); {unhandled} unhandled INTIDs (last {last}); {} SMMU event(s)",
                    events.len()
                ));
            }
            Ok(format!(
                "edu's DMA write of unmapped EventID {FORGED_EVENT} to the doorbell: no LPI (dropped by the ITS); it does reach the ITS (as DeviceID 0: a probe LPI {probe} mapped there fired once), and after DISCARD it is dropped again; no other INTID, no SMMU event"
            ))
        })()
    });

    // 4. Forged: a domain without the doorbell. The MSI write is translated like any DMA and
    //    faults in the SMMU.
    record_observed(checks, "forged-without-doorbell", {
        (|| {
            let without = unit
                .create_domain(mem, DomainConfig::stage2(48))
                .map_err(e)?;
            unit.map(
                mem,
                &without,
                IOVA_BUF,
                buf.pa,
                PAGE_SIZE,
                Prot::READ | Prot::WRITE,
            )
            .map_err(e)?;
            unit.attach_streams(mem, &sids, &without).map_err(e)?;
            let before = HANDLERS.count(lpi);
            dev.edu.raise_irq(1);
            dev.edu.ack_irq(1);
            let got = wait_lpis(lpi, before + 1) - before;
            let mut events: Vec<Event> = Vec::new();
            crate::smmu_irq::drain(index, unit, &mut |ev| events.push(*ev));
            let ev = events
                .iter()
                .find(|ev| ev.input_addr & !(PAGE_SIZE - 1) == MSI_IOVA_BASE)
                .ok_or_else(|| {
                    format!(
                        "no SMMU event at the doorbell IOVA ({} events)",
                        events.len()
                    )
                })?;
            let owner = unit.owner_of(ev.stream_id);
            println!(
                "dma fault: edu {} (sid {:#06x}) {} at iova page {:#x}: {}",
                dev.bdf,
                ev.stream_id,
                if ev.read { "read" } else { "write" },
                ev.input_addr & !(PAGE_SIZE - 1),
                ev.kind.name()
            );
            if got != 0 || ev.kind != EventType::Translation || ev.read || owner != sid {
                return Err(format!(
                    "{got} LPI(s); event {ev} attributed to StreamID {owner:#x} (edu is {sid:#x})"
                ));
            }
            Ok(format!(
                "the MSI write faulted in the SMMU (F_TRANSLATION, write, iova page {MSI_IOVA_BASE:#x}, StreamID {:#x} = edu), no LPI",
                ev.stream_id
            ))
        })()
    });

    // 5. GERROR through its interrupt: faulting DMAs without a drain fill the event queue; QEMU
    //    reports the record it cannot write as GERROR.EVENTQ_ABT_ERR and raises the GERROR
    //    interrupt (INTID 109). The drain reports and acknowledges it; GERRORN then equals GERROR
    //    in the registers.
    record_observed(checks, "gerror-interrupt", {
        (|| {
            use iommu::hw::Mmio;
            use iommu::smmuv3::regs::{Gerror, offset};
            let entries = 1u64 << (unit.mmio().read32(offset::EVENTQ_BASE) & 0x1f);
            let before = crate::smmu_irq::stats(index);
            let lost_before = unit.events_lost();
            for i in 0..entries + 16 {
                dma_from_device(&dev, 0x20_0000 + (i % 16) * PAGE_SIZE, 4)?;
            }
            let mut drained = 0u64;
            let poll = crate::smmu_irq::drain(index, unit, &mut |_| drained += 1)
                .ok_or("no interrupt flagged after a full event queue")?;
            let after = crate::smmu_irq::stats(index);
            let (gerror, gerrorn) = (
                unit.mmio().read32(offset::GERROR),
                unit.mmio().read32(offset::GERRORN),
            );
            let aborted =
                Gerror::from_bits_retain(poll.global_errors).contains(Gerror::EVENTQ_ABT_ERR);
            let taken = after.gerror_taken - before.gerror_taken;
            if !aborted || taken == 0 || gerror != gerrorn || unit.events_lost() == lost_before {
                return Err(format!(
                    "{} faulting DMAs into a {entries}-entry queue: GERROR bits {:#x} drained (EVENTQ_ABT_ERR expected), GERROR interrupt taken {taken} times, GERROR {gerror:#x} GERRORN {gerrorn:#x} after, {} loss(es) counted",
                    entries + 16,
                    poll.global_errors,
                    unit.events_lost() - lost_before
                ));
            }
            Ok(format!(
                "{} faulting DMAs into a {entries}-entry queue: {drained} records drained, GERROR.EVENTQ_ABT_ERR raised the GERROR interrupt (taken {taken} time(s)), acknowledged: GERRORN = GERROR = {gerror:#x}",
                entries + 16
            ))
        })()
    });
    drop(its_guard);
    Ok(Some(RemoteJob {
        dev,
        unit: index,
        sids,
    }))
}

/// The ABI's view of the doorbell window for edu (see the module comment), from a throwaway
/// in-hypervisor guest that owns edu for the duration.
fn window_reserved(dev: &super::EduDevice, sid: u32) -> Result<String, String> {
    use hvabi::{MAP_FIXED_IOVA, MAP_READABLE, errno, resv};
    use iommu::iommufd::client::Client;
    use iommu::iommufd::selftest::FlowMemory;

    let mut owner = crate::iommu_owner::lock();
    let o = owner.as_mut().ok_or("no IOMMU owner")?;
    let hw = o
        .device_index(dev.segment, dev.bdf)
        .ok_or("the IOMMU owner does not hold edu")?;
    super::in_throwaway_guest(&mut o.fd, hw, |fd, g, buf| {
        let gm = crate::mem::dma::DmaGuestMemory::new(buf);
        let base = gm.gpa();
        let mut c = Client::new(fd, g, gm.as_guest_memory(), base);
        let dev_id = c
            .devices()
            .map_err(|e| format!("DEVICE_LIST: errno {e}"))?
            .iter()
            .find(|d| d.hw_id == u64::from(sid))
            .ok_or("edu not in DEVICE_LIST")?
            .dev_id;
        let ranges = c
            .reserved_ranges(dev_id)
            .map_err(|e| format!("DEVICE_RESERVED_RANGES: errno {e}"))?;
        let last = MSI_IOVA_BASE + its::MSI_IOVA_SIZE - 1;
        if !ranges
            .iter()
            .any(|r| r.kind == resv::MSI && r.start == MSI_IOVA_BASE && r.last == last)
        {
            return Err(format!(
                "DEVICE_RESERVED_RANGES has no RESV_MSI {MSI_IOVA_BASE:#x}..={last:#x}: {ranges:x?}"
            ));
        }
        let ioas = c
            .ioas_alloc()
            .map_err(|e| format!("IOAS_ALLOC: errno {e}"))?;
        c.attach(dev_id, ioas)
            .map_err(|e| format!("DEVICE_ATTACH: errno {e}"))?;
        match c.map(
            ioas,
            base + 0x10000,
            PAGE_SIZE,
            MAP_READABLE | MAP_FIXED_IOVA,
            MSI_IOVA_BASE,
        ) {
            Err(e) if e == errno::EADDRINUSE => Ok(format!(
                "DEVICE_RESERVED_RANGES reports RESV_MSI {MSI_IOVA_BASE:#x}..={last:#x} for edu; IOAS_MAP at {MSI_IOVA_BASE:#x} refused with EADDRINUSE"
            )),
            other => Err(format!(
                "IOAS_MAP inside the MSI window returned {other:?}, expected EADDRINUSE"
            )),
        }
    })
}

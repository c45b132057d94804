//! The `msi` variant on aarch64 (docs/guests.md "Interrupts (aarch64)"): the guest attaches its
//! edu, asks DEVICE_RESERVED_RANGES where the MSI window is, programs edu's MSI capability with
//! that address and a virtual INTID as the data, and waits in WFI (never polling) for edu's
//! raise-IRQ MSIs and its DMA-done MSI; every interrupt is counted by the IRQ vector from what
//! the virtual CPU interface acknowledged.

use crate::arch::{self, IRQ_COUNTS, IRQ_OTHER};
use crate::{call, check, checked_ioas_with_page, edu, mmio_read, mmio_write, u64_at};
use core::sync::atomic::Ordering::Relaxed;
use hvabi::start_info as si;
use hvabi::*;

/// The virtual INTID the guest asks for (a "virtual SPI", 32-127).
const VINTID: u32 = 40;
/// edu registers: interrupt status (read), raise (write: OR into status, MSI), acknowledge.
const EDU_IRQ_RAISE: u64 = 0x60;
const EDU_IRQ_ACK: u64 = 0x64;
const EDU_CMD_IRQ: u64 = 4;

fn write32(addr: u64, v: u32) {
    // SAFETY: edu's BAR, mapped by the hypervisor at this guest-physical address; edu takes
    // 32-bit accesses below 0x80.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Waits in WFI until INTID `VINTID` has been taken `want` times in all (bounded).
fn wait_for(want: u32) -> u64 {
    let mut wfis = 0;
    while IRQ_COUNTS[VINTID as usize].load(Relaxed) < want && wfis < 100_000 {
        arch::wait_for_interrupt();
        wfis += 1;
    }
    wfis
}

/// Spins for 1/`fraction` of a second, time for any interrupt still on its way to arrive;
/// returns how many times INTID `VINTID` has been taken in all, and how many other interrupts.
fn settle(fraction: u64) -> (u32, u32) {
    let t0 = arch::timestamp();
    while arch::timestamp() - t0 < arch::counter_frequency() / fraction {
        core::hint::spin_loop();
    }
    let total = IRQ_COUNTS[VINTID as usize].load(Relaxed);
    let others: u32 = IRQ_COUNTS
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != VINTID as usize)
        .map(|(_, c)| c.load(Relaxed))
        .sum::<u32>()
        + IRQ_OTHER.load(Relaxed);
    (total, others)
}

pub fn msi_checks(start_info: u64, free: u64, raises: u32, forge: bool) -> u32 {
    let mut failed = 0;
    let mut e = [0u8; si::DEVICE_ENTRY];
    arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
    let (bus, devfn) = (e[2], e[3]);
    let dev_id = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let bar = u64_at(&e, 16);
    if u16::from_le_bytes([e[4], e[5]]) != edu::VENDOR || bar == 0 {
        println!("testguest: check msi-edu-present: FAILED");
        return 1;
    }
    // Where the device's MSIs go: the RESV_MSI range the hypervisor reports.
    let mut ranges = [0u8; 8 * ReservedRange::SIZE];
    let (r, out) = call(
        op::DEVICE_RESERVED_RANGES,
        DeviceReservedRanges {
            size: DeviceReservedRanges::SIZE as u32,
            dev_id,
            num_ranges: 8,
            ranges_gpa: ranges.as_mut_ptr() as u64,
            ..DeviceReservedRanges::default()
        },
    );
    failed += check("msi-reserved-ranges", r, 0);
    let window = (0..(out.num_ranges as usize).min(8))
        .map(|i| ReservedRange::decode(&ranges[i * ReservedRange::SIZE..][..ReservedRange::SIZE]))
        .find(|x| x.kind == resv::MSI)
        .map(|x| x.start);
    let Some(doorbell) = window else {
        println!("testguest: check msi-window-reported: FAILED");
        return failed + 1;
    };
    println!("testguest: msi window at {doorbell:#x} (RESV_MSI), vINTID {VINTID}");
    const IOVA: u64 = 0x10_0000;
    let names = ["msi-ioas-alloc", "msi-attach", "msi-map"];
    failed += checked_ioas_with_page(dev_id, free, IOVA, names).0;
    arch::irq_init();
    // edu's MSI capability (PCI 3.0 §6.8.1): message control at +2 (bit 7: 64-bit address,
    // bit 0: enable), address at +4 (+8 high), data at +12 (64-bit) or +8.
    let cfg = |off: u8| crate::cfg_address(bus, devfn >> 3, devfn & 7, off);
    let mut cap = (arch::pci_config_read(cfg(0x34)) & 0xfc) as u8;
    while cap != 0 && arch::pci_config_read(cfg(cap)) & 0xff != 0x05 {
        cap = ((arch::pci_config_read(cfg(cap)) >> 8) & 0xfc) as u8;
    }
    if cap == 0 {
        println!("testguest: check msi-capability: FAILED");
        return failed + 1;
    }
    let control = (arch::pci_config_read(cfg(cap)) >> 16) as u16;
    let wide = control & 0x80 != 0;
    arch::pci_config_write(cfg(cap + 4), doorbell as u32);
    if wide {
        arch::pci_config_write(cfg(cap + 8), (doorbell >> 32) as u32);
    }
    let data_off = if wide { cap + 12 } else { cap + 8 };
    arch::pci_config_write(cfg(data_off), VINTID);
    arch::pci_config_write16(cfg(cap), 2, control | 1);
    let back = (arch::pci_config_read(cfg(cap)) >> 16) as u16;
    failed += check("msi-enabled", i64::from(back & 1), 1);
    // N raise-IRQ writes, each waited for before the next (an LPI's pending state is one bit:
    // MSIs written before the first is taken would merge).
    let mut wfis = 0;
    for i in 0..raises {
        write32(bar + EDU_IRQ_RAISE, 1);
        wfis += wait_for(i + 1);
        write32(bar + EDU_IRQ_ACK, 1);
    }
    let after_raises = IRQ_COUNTS[VINTID as usize].load(Relaxed);
    // A DMA with its completion interrupt: waited for in WFI, not by polling the command.
    mmio_write(bar + edu::DMA_SRC, edu::BUFFER);
    mmio_write(bar + edu::DMA_DST, IOVA);
    mmio_write(bar + edu::DMA_COUNT, 64);
    mmio_write(
        bar + edu::DMA_CMD,
        edu::CMD_START | edu::CMD_TO_RAM | EDU_CMD_IRQ,
    );
    wfis += wait_for(raises + 1);
    let done = mmio_read(bar + edu::DMA_CMD) & edu::CMD_START == 0;
    failed += check("msi-dma-done-before-interrupt", i64::from(done), 1);
    write32(bar + EDU_IRQ_ACK, 0x100);
    // Nothing more may arrive.
    let (total, others) = settle(100);
    let ok = after_raises == raises && total == raises + 1 && others == 0;
    println!(
        "testguest: msi: {raises} raise-IRQ + 1 DMA-done asked, {total} taken as vINTID {VINTID} in WFI ({wfis} WFIs), {others} other: {}",
        if ok { "ok" } else { "FAILED" }
    );
    failed += u32::from(!ok);
    if forge {
        failed += forged(bar, free, doorbell, IOVA, total);
    }
    failed
}

/// The `forge` word: the guest makes its edu's DMA engine write to the MSI window itself, as
/// a device under a hostile guest could: EventID 7 (no route of its own) and EventID 0 (its own
/// route's) to the doorbell at its usual offset (GITS_TRANSLATER is at +0x40 of the ITS page),
/// then one write past the doorbell page, which the SMMU must block. No interrupt may follow.
fn forged(bar: u64, free: u64, window: u64, iova: u64, before: u32) -> u32 {
    let mut failed = 0;
    let page = free as *mut u32;
    for event in [7u32, 0] {
        // SAFETY: `free` is this guest's own page, mapped for edu at `iova`.
        unsafe { page.write_volatile(event) };
        let ok = crate::edu_dma(bar, iova, edu::BUFFER, 4, false);
        failed += check("forge-load-eventid", i64::from(ok), 1);
        println!(
            "testguest: edu DMA-writes EventID {event} to {:#x}",
            window + 0x40
        );
        let ok = crate::edu_dma(bar, edu::BUFFER, window + 0x40, 4, true);
        failed += check("forge-doorbell-dma-completes", i64::from(ok), 1);
    }
    println!(
        "testguest: edu DMA-writes past the doorbell page, {:#x}",
        window + 0x1000
    );
    let ok = crate::edu_dma(bar, edu::BUFFER, window + 0x1000, 4, true);
    failed += check("forge-past-doorbell-completes", i64::from(ok), 1);
    let (total, others) = settle(50);
    let ok = total == before && others == 0;
    println!(
        "testguest: msi forged: {} more vINTID {VINTID}, {others} other after the forged writes: {}",
        total - before,
        if ok { "ok" } else { "FAILED" }
    );
    failed + u32::from(!ok)
}

//! The `irq` variant: interrupts delivered to the guest (docs/guests.md "Interrupts"). The
//! flow is architecture-neutral; the arch shim provides the hooks: `irq_setup` (vectors and
//! the interrupt controller, interrupts off), `irq_wait` (enable, wait for one, disable),
//! `irq_eoi`, `msi_message`, `forged_msi`, `timer_arm` / `timer_stop` and `TIMER_VECTOR`; its
//! handler calls [`on_interrupt`] with the vector it read.
//!
//! `irq[,raises=N][,forge][,linger=K]`:
//! 1. programs its edu's MSI capability through the mediated configuration space and checks
//!    that it reads back its own values;
//! 2. raises edu's interrupt N times (register 0x60), waiting for each by HLT/WFI, and counts
//!    exactly N interrupts on its vector;
//! 3. starts an edu DMA with its completion interrupt and waits for it by HLT/WFI: exactly one;
//! 4. a one-shot timer interrupt, exactly one;
//! 5. with `forge`: makes edu's DMA engine write forged remappable-format MSIs (IRTE handles 2,
//!    3 and 200, which it does not own) into the MSI window: no interrupt may reach it;
//! 6. with `linger=K`: waits K timer periods, counting any interrupt it did not ask for.
//!
//! With `abandon`, it then starts a DMA with its completion interrupt and reads memory that is
//! not its own, so the hypervisor stops it with its MSI route live.
//!
//! With `bad-msi`, step 1 first programs a message the hypervisor must refuse (remappable
//! format): no interrupt follows a raise; then the normal flow.
//!
//! Every wait is bounded by the timer: a timeout is a failed check, never a hang.

use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use hvabi::start_info as si;

use crate::{arch, cfg_address, check, checked_ioas_with_page, u64_at};

static COUNT: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
/// The first vectors taken, in order (the priority check reads it).
static ORDER: [AtomicU32; 64] = [const { AtomicU32::new(0) }; 64];
static TAKEN: AtomicU32 = AtomicU32::new(0);

/// Called by the arch handler with the vector it took (before EOI).
pub fn on_interrupt(vector: u32) {
    if let Some(c) = COUNT.get(vector as usize) {
        c.fetch_add(1, Relaxed);
    }
    if let Some(o) = ORDER.get(TAKEN.fetch_add(1, Relaxed) as usize) {
        o.store(vector, Relaxed);
    }
}

fn count(v: u32) -> u32 {
    COUNT.get(v as usize).map_or(0, |c| c.load(Relaxed))
}

fn total() -> u32 {
    COUNT.iter().map(|c| c.load(Relaxed)).sum()
}

const MSI_VECTOR: u32 = 0x41;
/// Timeout of one wait, in timer ticks (the TSC on x86): edu's DMA takes 100 ms of virtual time.
const TIMEOUT: u64 = 8_000_000_000;

/// Waits (interrupts off between checks, so no wake-up is lost) until `done()` or the timer
/// fires after `ticks`; true if `done()`.
fn wait_for(done: impl Fn() -> bool, ticks: u64) -> bool {
    let t0 = count(arch::TIMER_VECTOR);
    arch::timer_arm(ticks);
    loop {
        if done() {
            arch::timer_stop();
            return true;
        }
        if count(arch::TIMER_VECTOR) != t0 {
            return false;
        }
        arch::irq_wait();
    }
}

fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: `addr` is in its edu's BAR0, mapped by the hypervisor at that GPA; edu takes
    // 32-bit accesses below 0x80.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

mod edu {
    pub const IRQ_STATUS: u64 = 0x24;
    pub const IRQ_RAISE: u64 = 0x60;
    pub const IRQ_ACK: u64 = 0x64;
    pub const CMD_IRQ: u64 = 4;
    pub const IRQ_DMA: u32 = 0x100;
}

/// Starts an edu DMA (no wait).
fn dma_start(bar: u64, src: u64, dst: u64, len: u64, to_ram: bool, irq: bool) {
    crate::mmio_write(bar + crate::edu::DMA_SRC, src);
    crate::mmio_write(bar + crate::edu::DMA_DST, dst);
    crate::mmio_write(bar + crate::edu::DMA_COUNT, len);
    let cmd = crate::edu::CMD_START
        | if to_ram { crate::edu::CMD_TO_RAM } else { 0 }
        | if irq { edu::CMD_IRQ } else { 0 };
    crate::mmio_write(bar + crate::edu::DMA_CMD, cmd);
}

fn dma_idle(bar: u64) -> bool {
    crate::mmio_read(bar + crate::edu::DMA_CMD) & crate::edu::CMD_START == 0
}

pub fn irq_checks(start_info: u64, free: u64, words: &mut dyn Iterator<Item = &str>) -> u32 {
    let (mut raises, mut forge, mut linger, mut bad, mut abandon) =
        (5u32, false, 0u32, false, false);
    for w in words {
        if let Some(n) = w.strip_prefix("raises=").and_then(|n| n.parse().ok()) {
            raises = n;
        }
        if let Some(n) = w.strip_prefix("linger=").and_then(|n| n.parse().ok()) {
            linger = n;
        }
        forge |= w == "forge";
        bad |= w == "bad-msi";
        abandon |= w == "abandon";
    }
    let mut n = [0u8; 4];
    arch::read_bytes(start_info + si::OFF_DEVICE_COUNT as u64, &mut n);
    let mut e = [0u8; si::DEVICE_ENTRY];
    arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
    let (bus, dev, func) = (e[2], e[3] >> 3, e[3] & 7);
    let dev_id = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let bar = u64_at(&e, 16);
    let apic_id = match arch::irq_setup() {
        Ok(id) => id,
        Err(why) => {
            println!("testguest: check irq-setup: FAILED ({why})");
            return 1;
        }
    };
    let mut failed = 0;
    if u32::from_le_bytes(n) == 0 {
        // No device: the interrupt controller alone (the Bochs SVM scenario).
        failed += local_checks();
        println!("testguest: irq checks: {failed} failed");
        return failed;
    }
    // 1. The MSI capability (PCI 3.0 §6.8.1), programmed through configuration space.
    let me = |off| cfg_address(bus, dev, func, off);
    let mut cap = (arch::pci_config_read(me(0x34)) & 0xfc) as u8;
    while cap != 0 && arch::pci_config_read(me(cap)) & 0xff != 0x05 {
        cap = ((arch::pci_config_read(me(cap)) >> 8) & 0xfc) as u8;
    }
    if cap == 0 {
        println!("testguest: check msi-capability: FAILED (none)");
        return 1;
    }
    let control = arch::pci_config_read(me(cap)) >> 16;
    let addr64 = control & 1 << 7 != 0;
    let data_off = if addr64 { cap + 12 } else { cap + 8 };
    let (address, data) = arch::msi_message(apic_id, MSI_VECTOR);
    if bad {
        // A message the hypervisor must refuse (a remappable-format address naming IRTE 0,
        // as if the guest owned an interrupt remapping table): the device's MSI stays off
        // and a raised interrupt reaches no one.
        let (forged, _) = arch::forged_msi(0);
        arch::pci_config_write(me(cap + 4), forged as u32);
        if addr64 {
            arch::pci_config_write(me(cap + 8), 0);
        }
        arch::pci_config_write(me(data_off), data);
        arch::pci_config_write16(me(cap), 2, (control as u16 & !(0b111 << 4)) | 1);
        let before = count(MSI_VECTOR);
        mmio_write32(bar + edu::IRQ_RAISE, 1);
        let got = wait_for(|| count(MSI_VECTOR) != before, 50_000_000);
        mmio_write32(bar + edu::IRQ_ACK, 1);
        failed += check("refused-msi-no-interrupt", got.into(), 0);
        arch::pci_config_write16(me(cap), 2, control as u16 & !(0b111 << 4 | 1));
    }
    arch::pci_config_write(me(cap + 4), address as u32);
    if addr64 {
        arch::pci_config_write(me(cap + 8), (address >> 32) as u32);
    }
    arch::pci_config_write(me(data_off), data);
    arch::pci_config_write16(me(cap), 2, (control as u16 & !(0b111 << 4)) | 1);
    failed += check(
        "msi-address-reads-back",
        arch::pci_config_read(me(cap + 4)).into(),
        (address as u32).into(),
    );
    failed += check(
        "msi-data-reads-back",
        (arch::pci_config_read(me(data_off)) & 0xffff).into(),
        data.into(),
    );
    failed += check(
        "msi-enabled-reads-back",
        ((arch::pci_config_read(me(cap)) >> 16) & 1).into(),
        1,
    );
    // Bus master and memory space for DMA; a page of its RAM at IOVA 1 MiB.
    arch::pci_config_write16(me(0x04), 0, 0b110);
    const IOVA: u64 = 0x10_0000;
    let names = ["ioas-alloc", "attach", "map"];
    failed += checked_ioas_with_page(dev_id, free, IOVA, names).0;

    // 2. Raise-IRQ, one at a time: an edge MSI pending twice before it is taken is one.
    let mut timeouts = 0;
    for _ in 0..raises {
        let before = count(MSI_VECTOR);
        mmio_write32(bar + edu::IRQ_RAISE, 1);
        if !wait_for(|| count(MSI_VECTOR) != before, TIMEOUT) {
            timeouts += 1;
        }
        mmio_write32(bar + edu::IRQ_ACK, 1);
    }
    let got = count(MSI_VECTOR);
    println!(
        "testguest: irq: {got} raise-IRQ interrupt(s) on vector {MSI_VECTOR:#x} for {raises} raised"
    );
    failed += check("raise-irq-no-timeout", timeouts, 0);
    failed += check("raise-irq-count", got.into(), raises.into());

    // 3. A DMA with its completion interrupt, waited for by HLT/WFI.
    let before = count(MSI_VECTOR);
    dma_start(bar, IOVA, 0x40000, 64, false, true);
    let ok = wait_for(|| count(MSI_VECTOR) != before, TIMEOUT);
    let status = mmio_read32(bar + edu::IRQ_STATUS);
    mmio_write32(bar + edu::IRQ_ACK, status);
    let dma = count(MSI_VECTOR) - before;
    println!("testguest: irq: {dma} DMA-done interrupt(s), edu interrupt status {status:#x}");
    failed += check("dma-done-no-timeout", ok.into(), 1);
    failed += check("dma-done-count", dma.into(), 1);
    failed += check("dma-done-idle", dma_idle(bar).into(), 1);
    failed += check(
        "dma-done-status",
        (status & edu::IRQ_DMA).into(),
        edu::IRQ_DMA.into(),
    );

    // 4. The timer and self-IPIs.
    failed += local_checks();

    // 5. Forged MSIs: edu's DMA engine copies a remappable-format message into the MSI window.
    if forge {
        let base = non_timer();
        // Handles 0 and 1 are the two guests' own routes in the forged-MSI scenario; these are
        // entries no one owns. (A DMA-forged message naming another guest's entry is blocked on
        // hardware by its source check, but QEMU's edu DMA carries no requester ID and QEMU then
        // skips the check: docs/interrupts.md.)
        for handle in [2u16, 3, 200] {
            let (addr, data) = arch::forged_msi(handle);
            // SAFETY: `free` is its own page (start-info), mapped at IOVA for edu.
            unsafe { core::ptr::write_volatile(free as *mut u32, data) };
            dma_start(bar, IOVA, 0x40000, 4, false, false);
            let _ = wait_for(|| dma_idle(bar), TIMEOUT);
            println!(
                "testguest: forging a remappable MSI (IRTE handle {handle}) by DMA to {addr:#x}"
            );
            dma_start(bar, 0x40000, addr, 4, true, false);
            let _ = wait_for(|| dma_idle(bar), TIMEOUT);
        }
        // Whatever it could have caused has arrived by now.
        let _ = wait_for(|| false, 50_000_000);
        let extra = non_timer() - base;
        println!("testguest: irq: {extra} interrupt(s) after the forged MSIs");
        failed += check("forged-msi-no-interrupt", extra.into(), 0);
    }
    // 6. Linger, counting what it did not ask for.
    if linger > 0 {
        let base = non_timer();
        for _ in 0..linger {
            let _ = wait_for(|| false, 100_000_000);
        }
        let extra = non_timer() - base;
        println!("testguest: irq: {extra} unexpected interrupt(s) while lingering");
        failed += check("no-unexpected-interrupt", extra.into(), 0);
    }
    println!("testguest: irq checks: {failed} failed");
    if abandon {
        // Stopped with its MSI route live and a DMA whose completion interrupt comes after
        // the hypervisor has torn it down: that interrupt must reach no one.
        println!("testguest: starting a DMA with its completion interrupt and abandoning it");
        dma_start(bar, 0x40000, IOVA, 256, true, true);
        let mem = u64_at(
            &{
                let mut p = [0u8; 16];
                arch::read_bytes(start_info, &mut p);
                p
            },
            si::OFF_MEM_BYTES,
        );
        let v = arch::wild_read(mem + 0x10_0000);
        println!("testguest: read {v:#x}: the hypervisor let a wild read through");
        return failed + 1;
    }
    failed
}

/// The interrupt controller alone: a one-shot timer interrupt waited for by HLT/WFI, and two
/// self-IPIs sent with interrupts off, taken highest priority first once they are enabled.
fn local_checks() -> u32 {
    let mut failed = 0;
    let t0 = count(arch::TIMER_VECTOR);
    arch::timer_arm(1_000_000);
    let mut waits = 0u32;
    while count(arch::TIMER_VECTOR) == t0 && waits < 1_000_000 {
        arch::irq_wait();
        waits += 1;
    }
    println!(
        "testguest: irq: {} timer interrupt(s)",
        count(arch::TIMER_VECTOR) - t0
    );
    failed += check("timer-once", (count(arch::TIMER_VECTOR) - t0).into(), 1);
    let (low, high) = (0x51, 0x61);
    let first = TAKEN.load(Relaxed) as usize;
    arch::self_ipi(low);
    arch::self_ipi(high);
    let ok = wait_for(|| count(low) == 1 && count(high) == 1, TIMEOUT);
    failed += check("self-ipi-both", ok.into(), 1);
    let order = [
        ORDER.get(first).map_or(0, |o| o.load(Relaxed)),
        ORDER.get(first + 1).map_or(0, |o| o.load(Relaxed)),
    ];
    println!(
        "testguest: irq: self-IPIs {low:#x} and {high:#x} taken in the order {:#x}, {:#x}",
        order[0], order[1]
    );
    failed += check("self-ipi-priority-order", order[0].into(), high.into());
    failed
}

/// Interrupts other than the timer's taken so far.
fn non_timer() -> u32 {
    total() - count(arch::TIMER_VECTOR)
}

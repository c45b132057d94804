//! The boot console: a PL011 (or SBSA generic UART) found through the device tree.
//!
//! Choice of UART: `console=pl011:ADDR` / `console=sbsa:ADDR` ([`boot::console`]), else
//! `/chosen/stdout-path`, else the first enabled `arm,pl011`/`arm,sbsa-uart`
//! node, else QEMU `virt`'s PL011 at 0x0900_0000 (hw/arm/virt.c `VIRT_UART`); under UEFI (ACPI
//! only) the SPCR table's UART and nothing else. A base that lies in
//! RAM or outside the boot map is refused (the console then stays silent rather than scribble
//! over memory because of a bad DTB).

use super::mmio::DeviceMmio;
use boot::aarch64::dtb::{Uart, UartKind};
use boot::console::{ConsoleArch, ConsoleChoice, ConsoleUart};
use boot::{BootInfo, MemoryKind};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use drivers::pl011::{Pl011, Variant};
use spin::Once;

/// What `init` decided about `console=`, for [`log_choice`] once the logger exists.
static CHOICE: Once<ConsoleChoice> = Once::new();

/// QEMU `virt`'s first PL011, used when the device tree names none.
const QEMU_VIRT_UART: Uart = Uart {
    base: 0x0900_0000,
    size: 0x1000,
    kind: UartKind::Pl011,
};

/// 0 until [`init`] accepted a UART; afterwards its (identity-mapped) base address.
static BASE: AtomicUsize = AtomicUsize::new(0);
static SBSA: AtomicU8 = AtomicU8::new(0);
/// Set when the UART stopped taking characters; further output is dropped without waiting.
static STALLED: AtomicBool = AtomicBool::new(false);

pub fn init(info: &BootInfo) {
    let dt_uart = boot::aarch64::device_tree().and_then(|dt| dt.console_uart());
    // Under UEFI the machine is described by ACPI alone: only SPCR's UART, never a guess.
    let candidates = if info.protocol == boot::BootProtocol::Uefi {
        [boot::aarch64::efi_console(), None]
    } else {
        [dt_uart, Some(QEMU_VIRT_UART)]
    };
    let firmware = candidates
        .into_iter()
        .flatten()
        .find(|u| plausible(u, info))
        .map(console_uart);
    // `console=` overrides what firmware described; the SPCR/DT choice above is the default.
    let choice = boot::console::choose_console(
        ConsoleArch::Aarch64,
        info.cmdline_value("console"),
        None,
        firmware,
        |u| uart_of(u).is_some_and(|u| plausible(&u, info)),
    );
    CHOICE.call_once(|| choice);
    let Some(uart) = choice.uart.and_then(|u| uart_of(&u)) else {
        return;
    };
    SBSA.store(
        u8::from(uart.kind == UartKind::SbsaGeneric),
        Ordering::Relaxed,
    );
    BASE.store(uart.base as usize, Ordering::Release);
    if let Some(uart) = current() {
        uart.init();
    }
}

fn console_uart(u: Uart) -> ConsoleUart {
    match u.kind {
        UartKind::Pl011 => ConsoleUart::Pl011 { base: u.base },
        UartKind::SbsaGeneric => ConsoleUart::SbsaGeneric { base: u.base },
    }
}

fn uart_of(u: &ConsoleUart) -> Option<Uart> {
    let (base, kind) = match *u {
        ConsoleUart::Pl011 { base } => (base, UartKind::Pl011),
        ConsoleUart::SbsaGeneric { base } => (base, UartKind::SbsaGeneric),
        _ => return None,
    };
    Some(Uart {
        base,
        size: 0x1000,
        kind,
    })
}

/// Reports a refused `console=` and the UART in use, on that UART (needs the logger).
pub fn log_choice(info: &BootInfo) {
    let Some(choice) = CHOICE.get() else {
        return;
    };
    if let Some(e) = choice.cmdline_error {
        log::warn!(
            "console: ignoring console={:?}: {e}",
            info.cmdline_value("console").unwrap_or("")
        );
    }
    if choice.source == boot::console::ConsoleSource::CommandLine
        && let Some(u) = choice.uart
    {
        log::info!("console: {u} (from console=)");
    }
}

/// A UART register block must be 4 KiB (the PrimeCell footprint), aligned, mapped by the boot
/// map, and not inside RAM the boot map describes.
fn plausible(uart: &Uart, info: &BootInfo) -> bool {
    let end = uart.base.saturating_add(0x1000);
    let in_ram = info
        .memory_regions()
        .iter()
        .filter(|r| matches!(r.kind, MemoryKind::Usable | MemoryKind::InUse))
        .any(|r| r.start < end && uart.base < r.end());
    uart.base != 0
        && uart.base.is_multiple_of(0x1000)
        && end <= boot::aarch64::BOOT_MAP_LIMIT
        && !in_ram
}

/// Physical (= virtual) base of the console UART, once [`init`] accepted one.
pub fn base() -> Option<u64> {
    Some(BASE.load(Ordering::Acquire) as u64).filter(|&b| b != 0)
}

fn current() -> Option<Pl011<DeviceMmio>> {
    let base = BASE.load(Ordering::Acquire);
    if base == 0 {
        return None;
    }
    let variant = if SBSA.load(Ordering::Relaxed) != 0 {
        Variant::SbsaGeneric
    } else {
        Variant::Pl011
    };
    // SAFETY: `init` only stores a base that passed `plausible`: a 4 KiB-aligned register block
    // outside RAM and below BOOT_MAP_LIMIT, which the boot map maps as Device, and which the
    // direct map (limit >= 1 TiB) keeps Device because it is not RAM.
    Some(Pl011::new(unsafe { DeviceMmio::new(base) }, variant))
}

/// Polled output; usable from exception context (no locks, bounded waits).
pub fn write(bytes: &[u8]) {
    if STALLED.load(Ordering::Relaxed) {
        return;
    }
    if let Some(uart) = current()
        && uart.write_bytes(bytes) < bytes.len()
    {
        STALLED.store(true, Ordering::Relaxed);
    }
}

/// Waits until queued output has left the UART (before powering off).
pub fn flush() {
    if !STALLED.load(Ordering::Relaxed)
        && let Some(uart) = current()
    {
        uart.flush();
    }
}

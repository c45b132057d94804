//! The console UART's register access: a 16550 at an I/O port base (COM1, COM2, ...) or in memory
//! space (server BMC UARTs, SoC UARTs), chosen once at boot by
//! [`boot::console::choose_console`] from `console=`, the ACPI SPCR table and the COM1 default.
//!
//! [`ConsolePorts`] implements [`PortIo`] over register *indices* 0-7 (the driver is built with
//! base 0), so the same [`drivers::uart16550`] logic drives both kinds.

use super::pio::UartPorts;
use boot::console::ConsoleUart;
use boot::{BootInfo, MemoryKind};
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use drivers::uart16550::PortIo;

const NONE: u8 = 0;
const IO: u8 = 1;
const MMIO8: u8 = 2;
const MMIO32: u8 = 3;

/// Only the boot identity map ([0, 4 GiB), kept by the hypervisor's own page tables with
/// non-RAM granules uncached, `paging.rs`) covers a memory-mapped UART from the first line on.
const MMIO_LIMIT: u64 = 4 << 30;

/// Register access for the selected UART; silent (reads all-ones) until [`select`](Self::select).
pub struct ConsolePorts {
    kind: AtomicU8,
    base: AtomicU64,
}

impl ConsolePorts {
    pub const fn new() -> Self {
        Self {
            kind: AtomicU8::new(NONE),
            base: AtomicU64::new(0),
        }
    }

    /// Points the accessor at `uart` if [`usable`] accepts it; returns whether it did.
    pub fn select(&self, uart: &ConsoleUart, info: &BootInfo) -> bool {
        if !usable(uart, info) {
            return false;
        }
        let (kind, base) = match *uart {
            ConsoleUart::Io16550 { port } => (IO, u64::from(port)),
            ConsoleUart::Mmio16550 { base, stride: 4 } => (MMIO32, base),
            ConsoleUart::Mmio16550 { base, .. } => (MMIO8, base),
            _ => return false,
        };
        // Base before kind (Release/Acquire pair in `target`): a reader that sees the kind sees
        // its base.
        self.base.store(base, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Release);
        true
    }

    fn target(&self) -> (u8, u64) {
        let kind = self.kind.load(Ordering::Acquire);
        (kind, self.base.load(Ordering::Relaxed))
    }
}

/// Whether the console code may touch `uart`: an I/O-port 16550 always (a missing one only
/// fails the scratch probe); a memory-mapped one only below [`MMIO_LIMIT`] and outside every RAM
/// region of the memory map (so a bad SPCR or `console=` never scribbles over memory).
pub fn usable(uart: &ConsoleUart, info: &BootInfo) -> bool {
    match *uart {
        ConsoleUart::Io16550 { port } => port != 0 && port <= 0xfff8,
        ConsoleUart::Mmio16550 { base, stride } => {
            if !matches!(stride, 1 | 4) || !base.is_multiple_of(u64::from(stride)) {
                return false;
            }
            let Some((base, len)) = uart.mmio_window() else {
                return false;
            };
            let end = base.saturating_add(len);
            let in_ram = info
                .memory_regions()
                .iter()
                .filter(|r| matches!(r.kind, MemoryKind::Usable | MemoryKind::InUse))
                .any(|r| r.start < end && base < r.end());
            let in_image = info.image_start < end && base < info.image_end;
            base != 0 && end <= MMIO_LIMIT && !in_ram && !in_image
        }
        _ => false,
    }
}

impl PortIo for ConsolePorts {
    fn read8(&self, reg: u16) -> u8 {
        if reg >= 8 {
            return 0xff;
        }
        match self.target() {
            (IO, port) => UartPorts::new(port as u16).read8(port as u16 + reg),
            (MMIO8, base) => {
                // SAFETY: `select` accepted `base` only if [base, base + 8) lies below 4 GiB
                // (identity-mapped by the boot and the hypervisor page tables) and outside RAM
                // and the image, so this is a device register, not memory Rust owns. A 16550
                // does no DMA, so no register access can touch memory.
                unsafe { core::ptr::read_volatile((base + u64::from(reg)) as *const u8) }
            }
            (MMIO32, base) => {
                // SAFETY: as above for [base, base + 32); `usable` checked 4-byte alignment.
                let v =
                    unsafe { core::ptr::read_volatile((base + 4 * u64::from(reg)) as *const u32) };
                v as u8
            }
            _ => 0xff,
        }
    }

    fn write8(&self, reg: u16, value: u8) {
        if reg >= 8 {
            return;
        }
        match self.target() {
            (IO, port) => UartPorts::new(port as u16).write8(port as u16 + reg, value),
            // SAFETY: as in `read8`.
            (MMIO8, base) => unsafe {
                core::ptr::write_volatile((base + u64::from(reg)) as *mut u8, value)
            },
            // SAFETY: as in `read8`.
            (MMIO32, base) => unsafe {
                core::ptr::write_volatile((base + 4 * u64::from(reg)) as *mut u32, value.into())
            },
            _ => {}
        }
    }
}

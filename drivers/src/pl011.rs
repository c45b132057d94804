//! Arm PrimeCell UART (PL011) and the SBSA generic UART: polled transmit for the boot console.
//!
//! Register map and bits: "PrimeCell UART (PL011) Technical Reference Manual", Arm DDI 0183,
//! §3.2 "Summary of registers" and §3.3 "Register descriptions"; the SBSA generic UART subset is
//! in the Arm Base System Architecture / SBSA, "Generic UART" (DR, RSR/ECR, FR, IMSC, RIS, MIS,
//! ICR only; no CR, LCR_H or baud divisors).
//!
//! Line settings (baud, 8N1) belong to firmware, which knows the UART's reference clock; this
//! driver never reprograms them. It only makes sure the transmitter is enabled, masks interrupts
//! (the console polls), and waits for FIFO space with a bounded spin so that an absent or wedged
//! UART cannot hang the hypervisor.

use mmio::Mmio;

/// Data register: a write queues one character.
pub const DR: usize = 0x000;
/// Flag register.
pub const FR: usize = 0x018;
/// Line control (PL011 only).
pub const LCR_H: usize = 0x02c;
/// Control register (PL011 only).
pub const CR: usize = 0x030;
/// Interrupt mask set/clear.
pub const IMSC: usize = 0x038;
/// Interrupt clear.
pub const ICR: usize = 0x044;

/// FR.BUSY: the UART is transmitting (until the shift register is empty).
pub const FR_BUSY: u32 = 1 << 3;
/// FR.TXFF: the transmit FIFO (or holding register) is full.
pub const FR_TXFF: u32 = 1 << 5;
/// FR.TXFE: the transmit FIFO is empty.
pub const FR_TXFE: u32 = 1 << 7;

/// CR.UARTEN: UART enable.
pub const CR_UARTEN: u32 = 1 << 0;
/// CR.TXE: transmit enable.
pub const CR_TXE: u32 = 1 << 8;

/// All interrupt sources in ICR (bits 0-10).
pub const ICR_ALL: u32 = 0x7ff;

/// FR polls before a character is given up: far above what a working UART needs (one character at
/// 9600 baud is ~1 ms, i.e. thousands of polls), small enough that a dead UART costs milliseconds.
pub const TX_SPIN_LIMIT: u32 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// A full PL011.
    Pl011,
    /// The SBSA generic UART: CR and LCR_H do not exist and must not be written.
    SbsaGeneric,
}

/// A PL011-compatible UART reached through `M`.
pub struct Pl011<M: Mmio> {
    regs: M,
    variant: Variant,
}

impl<M: Mmio> Pl011<M> {
    pub const fn new(regs: M, variant: Variant) -> Self {
        Self { regs, variant }
    }

    /// Prepares the UART for polled output without touching firmware's line settings: enables
    /// the UART and its transmitter if firmware left them off (PL011 only), and masks and clears
    /// all interrupts.
    pub fn init(&self) {
        if self.variant == Variant::Pl011 {
            let cr = self.regs.read32(CR);
            if cr & (CR_UARTEN | CR_TXE) != CR_UARTEN | CR_TXE {
                self.regs.write32(CR, cr | CR_UARTEN | CR_TXE);
            }
        }
        self.regs.write32(IMSC, 0);
        self.regs.write32(ICR, ICR_ALL);
    }

    /// Queues one byte, waiting (bounded) for FIFO space. Returns `false` when the UART never
    /// had room, in which case the byte was dropped.
    pub fn write_byte(&self, byte: u8) -> bool {
        for _ in 0..TX_SPIN_LIMIT {
            if self.regs.read32(FR) & FR_TXFF == 0 {
                self.regs.write32(DR, u32::from(byte));
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Queues `bytes`; stops at the first byte the UART would not take. Returns how many it took.
    pub fn write_bytes(&self, bytes: &[u8]) -> usize {
        bytes.iter().take_while(|&&b| self.write_byte(b)).count()
    }

    /// Waits (bounded) until everything queued has left the UART, e.g. before powering off.
    /// Returns `false` on timeout.
    pub fn flush(&self) -> bool {
        for _ in 0..TX_SPIN_LIMIT {
            let fr = self.regs.read32(FR);
            if fr & FR_BUSY == 0 && fr & FR_TXFE != 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::vec::Vec;

    /// A fake PL011: records DR writes; FR reports "full" for `busy_polls` reads after each write.
    #[derive(Default)]
    struct FakeUart {
        cr: Cell<u32>,
        imsc: Cell<u32>,
        icr: Cell<u32>,
        sent: RefCell<Vec<u8>>,
        busy_polls: u32,
        busy_left: Cell<u32>,
        dead: bool,
        writes: RefCell<Vec<usize>>,
    }

    impl Mmio for FakeUart {
        fn read32(&self, offset: usize) -> u32 {
            match offset {
                FR if self.dead => FR_TXFF | FR_BUSY,
                FR if self.busy_left.get() > 0 => {
                    self.busy_left.set(self.busy_left.get() - 1);
                    FR_TXFF | FR_BUSY
                }
                FR => FR_TXFE,
                CR => self.cr.get(),
                _ => 0,
            }
        }
        fn write32(&self, offset: usize, value: u32) {
            self.writes.borrow_mut().push(offset);
            match offset {
                DR => {
                    self.sent.borrow_mut().push(value as u8);
                    self.busy_left.set(self.busy_polls);
                }
                CR => self.cr.set(value),
                IMSC => self.imsc.set(value),
                ICR => self.icr.set(value),
                _ => panic!("unexpected write to {offset:#x}"),
            }
        }
        fn read64(&self, _: usize) -> u64 {
            panic!("PL011 registers are 32-bit")
        }
        fn write64(&self, _: usize, _: u64) {
            panic!("PL011 registers are 32-bit")
        }
    }

    #[test]
    fn init_enables_tx_and_masks_interrupts() {
        let uart = Pl011::new(
            FakeUart {
                cr: Cell::new(1 << 9),
                imsc: Cell::new(0x7f),
                ..Default::default()
            },
            Variant::Pl011,
        );
        uart.init();
        assert_eq!(
            uart.regs.cr.get(),
            (1 << 9) | CR_UARTEN | CR_TXE,
            "other CR bits are preserved"
        );
        assert_eq!(uart.regs.imsc.get(), 0);
        assert_eq!(uart.regs.icr.get(), ICR_ALL);
    }

    #[test]
    fn init_leaves_an_enabled_uart_alone() {
        let uart = Pl011::new(
            FakeUart {
                cr: Cell::new(CR_UARTEN | CR_TXE),
                ..Default::default()
            },
            Variant::Pl011,
        );
        uart.init();
        assert!(!uart.regs.writes.borrow().contains(&CR));
    }

    #[test]
    fn sbsa_uart_never_writes_cr() {
        let uart = Pl011::new(FakeUart::default(), Variant::SbsaGeneric);
        uart.init();
        assert!(!uart.regs.writes.borrow().contains(&CR));
    }

    #[test]
    fn waits_for_fifo_space() {
        let uart = Pl011::new(
            FakeUart {
                busy_polls: 5,
                ..Default::default()
            },
            Variant::Pl011,
        );
        assert_eq!(uart.write_bytes(b"hi\r\n"), 4);
        assert_eq!(uart.regs.sent.borrow().as_slice(), b"hi\r\n");
        assert!(uart.flush());
    }

    #[test]
    fn dead_uart_drops_instead_of_hanging() {
        let uart = Pl011::new(
            FakeUart {
                dead: true,
                ..Default::default()
            },
            Variant::Pl011,
        );
        assert!(!uart.write_byte(b'x'));
        assert_eq!(uart.write_bytes(b"abc"), 0);
        assert!(!uart.flush());
        assert!(uart.regs.sent.borrow().is_empty());
    }
}

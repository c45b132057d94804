//! The 8250/16550 UART in polled mode, as used for the boot console (COM1 at I/O port 0x3f8).
//!
//! Register map (offsets from the base port; National Semiconductor PC16550D data sheet, §8):
//!
//! ```text
//! +0  RBR (read) / THR (write)       DLAB=0    | DLL  divisor latch low  DLAB=1
//! +1  IER interrupt enable           DLAB=0    | DLM  divisor latch high DLAB=1
//! +2  IIR (read) / FCR (write)
//! +3  LCR line control               bit 7 = DLAB, bits 0-1 = word length, bit 2 = stop bits, bit 3 = parity
//! +4  MCR modem control              bit 0 DTR, bit 1 RTS, bit 3 OUT2, bit 4 loopback
//! +5  LSR line status                bit 0 data ready, bit 5 THRE (THR empty)
//! +7  SCR scratch
//! ```
//!
//! The register logic talks to the hardware only through [`PortIo`], so it runs in host tests; the
//! kernel implements the trait with `in`/`out` instructions.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Byte-wide port I/O (x86 `inb`/`outb`), or a fake of it in tests.
pub trait PortIo {
    fn read8(&self, port: u16) -> u8;
    fn write8(&self, port: u16, value: u8);
}

/// The standard PC base ports.
pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;

/// The UART's input clock divided by 16: the divisor for baud rate `b` is `BASE_BAUD / b`.
pub const BASE_BAUD: u32 = 115_200;

const THR: u16 = 0;
const DLL: u16 = 0;
const IER: u16 = 1;
const DLM: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const SCR: u16 = 7;

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
/// FIFO enable, clear RX and TX FIFOs, RX trigger level 14 bytes.
const FCR_ENABLE_CLEAR: u8 = 0xc7;
/// DTR | RTS; OUT2 (IRQ gate) stays off because the console is polled.
const MCR_DTR_RTS: u8 = 0x03;
const LSR_THRE: u8 = 0x20;

/// How long `write_byte` waits for THRE before dropping the byte. A missing or wedged UART must
/// not hang the hypervisor; at 115200 baud one byte takes ~87 µs and each poll is an I/O access
/// (~1 µs on real hardware), so this is several milliseconds: ample for a working UART.
const THRE_POLLS: u32 = 100_000;

/// Why [`Uart16550::init`] gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartError {
    /// The scratch register did not hold a written value: no UART at this base.
    Absent,
    /// The baud rate is 0 or above [`BASE_BAUD`].
    BadBaud,
}

/// A polled 16550 at a port base.
///
/// All methods take `&self` so one instance can live in a `static` and be used from exception
/// handlers without a lock (the console serialises normal output itself; an exception report
/// that interleaves with a half-written line is acceptable, a deadlock is not).
pub struct Uart16550<P: PortIo> {
    io: P,
    base: u16,
    present: AtomicBool,
    dropped: AtomicU32,
}

impl<P: PortIo> Uart16550<P> {
    /// Wraps the UART at `base` without touching it; call [`init`](Self::init) first.
    pub const fn new(io: P, base: u16) -> Self {
        Self {
            io,
            base,
            present: AtomicBool::new(false),
            dropped: AtomicU32::new(0),
        }
    }

    /// Programs `baud` 8N1, FIFOs on, interrupts off. Checks for presence with the scratch
    /// register first, so that output to an absent UART costs nothing instead of timing out on
    /// every byte.
    pub fn init(&self, baud: u32) -> Result<(), UartError> {
        if baud == 0 || baud > BASE_BAUD {
            return Err(UartError::BadBaud);
        }
        for probe in [0x5a, 0xa5] {
            self.out(SCR, probe);
            if self.inp(SCR) != probe {
                self.present.store(false, Ordering::Relaxed);
                return Err(UartError::Absent);
            }
        }
        let divisor = (BASE_BAUD / baud) as u16;
        self.out(IER, 0);
        self.out(LCR, LCR_DLAB);
        self.out(DLL, divisor as u8);
        self.out(DLM, (divisor >> 8) as u8);
        self.out(LCR, LCR_8N1);
        self.out(FCR, FCR_ENABLE_CLEAR);
        self.out(MCR, MCR_DTR_RTS);
        self.present.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The register accessor, for a caller that retargets it before [`init`](Self::init).
    pub fn io(&self) -> &P {
        &self.io
    }

    pub fn is_present(&self) -> bool {
        self.present.load(Ordering::Relaxed)
    }

    /// Bytes dropped because THRE never came (a stuck UART).
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends one byte, waiting (bounded) for the transmit holding register to empty.
    pub fn write_byte(&self, byte: u8) {
        if !self.is_present() {
            return;
        }
        for _ in 0..THRE_POLLS {
            if self.inp(LSR) & LSR_THRE != 0 {
                self.out(THR, byte);
                return;
            }
            core::hint::spin_loop();
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    fn out(&self, reg: u16, value: u8) {
        self.io.write8(self.base.wrapping_add(reg), value);
    }

    fn inp(&self, reg: u16) -> u8 {
        self.io.read8(self.base.wrapping_add(reg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::{Cell, RefCell};
    use std::vec::Vec;

    /// A register file for one UART: records writes, models SCR and a THRE that is empty after
    /// `busy_polls` LSR reads.
    #[derive(Default)]
    struct FakeUart {
        writes: RefCell<Vec<(u16, u8)>>,
        scr: Cell<u8>,
        lsr_reads: Cell<u32>,
        busy_polls: u32,
        absent: bool,
        stuck: bool,
    }

    impl PortIo for &FakeUart {
        fn read8(&self, port: u16) -> u8 {
            match port - COM1 {
                _ if self.absent => 0xff,
                SCR => self.scr.get(),
                LSR => {
                    self.lsr_reads.set(self.lsr_reads.get() + 1);
                    if self.stuck || self.lsr_reads.get() <= self.busy_polls {
                        0
                    } else {
                        LSR_THRE
                    }
                }
                _ => 0,
            }
        }

        fn write8(&self, port: u16, value: u8) {
            if port - COM1 == SCR {
                self.scr.set(value);
            }
            self.writes.borrow_mut().push((port - COM1, value));
        }
    }

    #[test]
    fn init_programs_115200_8n1() {
        let fake = FakeUart::default();
        let uart = Uart16550::new(&fake, COM1);
        assert_eq!(uart.init(115_200), Ok(()));
        let w: Vec<_> = fake
            .writes
            .borrow()
            .iter()
            .copied()
            .filter(|&(r, _)| r != SCR)
            .collect();
        assert_eq!(
            w,
            [
                (IER, 0),
                (LCR, 0x80),
                (DLL, 1),
                (DLM, 0),
                (LCR, 0x03),
                (FCR, 0xc7),
                (MCR, 0x03)
            ]
        );
    }

    #[test]
    fn divisor_for_9600() {
        let fake = FakeUart::default();
        Uart16550::new(&fake, COM1).init(9600).unwrap();
        assert!(fake.writes.borrow().contains(&(DLL, 12)));
        assert_eq!(Uart16550::new(&fake, COM1).init(0), Err(UartError::BadBaud));
        assert_eq!(
            Uart16550::new(&fake, COM1).init(230_400),
            Err(UartError::BadBaud)
        );
    }

    #[test]
    fn write_waits_for_thre() {
        let fake = FakeUart {
            busy_polls: 3,
            ..Default::default()
        };
        let uart = Uart16550::new(&fake, COM1);
        uart.init(115_200).unwrap();
        fake.writes.borrow_mut().clear();
        uart.write_bytes(b"hi");
        assert_eq!(*fake.writes.borrow(), [(THR, b'h'), (THR, b'i')]);
        assert_eq!(fake.lsr_reads.get(), 5);
    }

    #[test]
    fn absent_uart_is_detected_and_silent() {
        let fake = FakeUart {
            absent: true,
            ..Default::default()
        };
        let uart = Uart16550::new(&fake, COM1);
        assert_eq!(uart.init(115_200), Err(UartError::Absent));
        let before = fake.writes.borrow().len();
        uart.write_bytes(b"lost");
        assert_eq!(fake.writes.borrow().len(), before);
    }

    #[test]
    fn stuck_uart_drops_instead_of_hanging() {
        let fake = FakeUart {
            stuck: true,
            ..Default::default()
        };
        let uart = Uart16550::new(&fake, COM1);
        uart.init(115_200).unwrap();
        uart.write_bytes(b"ab");
        assert_eq!(uart.dropped(), 2);
    }
}

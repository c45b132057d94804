//! QEMU's educational PCI device "edu" (`hw/misc/edu.c`, `docs/specs/edu.rst`): PCI 1234:11e8
//! with a 1 MiB 32-bit memory BAR0 and a DMA engine — the DMA source for end-to-end IOMMU tests.
//!
//! BAR0 registers (offsets below 0x80 accept 4-byte accesses only; from 0x80, 4 or 8):
//!
//! | offset | register |
//! | --- | --- |
//! | 0x00 | identification, 0xRRrr00ed: major `RR`, minor `rr` (0x010000ed = 1.0) |
//! | 0x04 | liveness check: reads back the bitwise NOT of the last value written |
//! | 0x08 | factorial: write n, read n! when status bit 0 clears |
//! | 0x20 | status: bit 0 computing (RO), bit 7 raise interrupt when the factorial is done |
//! | 0x24 | interrupt status; 0x60 raise (OR into status), 0x64 acknowledge (clear bits) |
//! | 0x80 | DMA source address (64-bit) |
//! | 0x88 | DMA destination address (64-bit) |
//! | 0x90 | DMA count |
//! | 0x98 | DMA command: bit 0 start/busy, bit 1 direction (0 RAM→device, 1 device→RAM), bit 2 raise interrupt 0x100 when done |
//!
//! The device side of a transfer is its 4 KiB buffer at device address 0x40000. Bus addresses
//! are ANDed with the device's DMA mask (28 bits unless `-device edu,dma_mask=…`): a larger
//! address would silently hit the wrong place, so it is refused here. A 4-byte write to
//! 0x80/0x88 clears the upper half, so addresses are written with 8-byte stores. Commands
//! written while a transfer runs are ignored; a transfer completes from a timer (about 100 ms of
//! virtual time), so completion is polled with a bound.
//!
//! IOMMU-blocked DMA is dropped silently by the device (no error bit): check the IOMMU's fault
//! record, not this driver.

use mmio::Mmio;

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x11e8;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 1 << 20;

/// Register offsets in BAR0.
pub mod regs {
    pub const ID: usize = 0x00;
    pub const LIVENESS: usize = 0x04;
    pub const FACTORIAL: usize = 0x08;
    pub const STATUS: usize = 0x20;
    pub const IRQ_STATUS: usize = 0x24;
    pub const IRQ_RAISE: usize = 0x60;
    pub const IRQ_ACK: usize = 0x64;
    pub const DMA_SRC: usize = 0x80;
    pub const DMA_DST: usize = 0x88;
    pub const DMA_COUNT: usize = 0x90;
    pub const DMA_CMD: usize = 0x98;

    pub const STATUS_COMPUTING: u32 = 1 << 0;
    pub const DMA_CMD_START: u32 = 1 << 0;
    pub const DMA_CMD_TO_RAM: u32 = 1 << 1;
    pub const DMA_CMD_IRQ: u32 = 1 << 2;
    /// Interrupt status bit raised by a completed DMA with `DMA_CMD_IRQ`.
    pub const IRQ_DMA: u32 = 0x100;
    /// Interrupt status bit raised by a completed factorial with status bit 7.
    pub const IRQ_FACTORIAL: u32 = 0x1;
}

/// Device address of the internal DMA buffer.
pub const BUFFER_ADDR: u64 = 0x40000;
/// Size of the internal DMA buffer.
pub const BUFFER_SIZE: usize = 4096;
/// The device's default DMA address mask (28 bits).
pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EduError {
    /// The identification register does not end in 0xed.
    BadId(u32),
    /// The liveness register did not return the complement of what was written.
    NotAlive { wrote: u32, read: u32 },
    /// A DMA is still running; the device would ignore the new command.
    Busy,
    /// Length 0, or the range leaves the 4 KiB device buffer.
    BadLength { buffer_offset: usize, len: usize },
    /// The bus address range exceeds the device's DMA mask.
    BeyondDmaMask {
        bus_addr: u64,
        len: usize,
        mask: u64,
    },
    /// Still busy after the allowed number of polls.
    Timeout,
}

/// Transfer direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaDirection {
    /// RAM (a bus address, i.e. an IOVA when the IOMMU translates) → device buffer.
    ToDevice,
    /// Device buffer → RAM.
    FromDevice,
}

/// An edu device behind its BAR0 mapping.
pub struct Edu<M: Mmio> {
    mmio: M,
    dma_mask: u64,
}

impl<M: Mmio> Edu<M> {
    pub const BUFFER_ADDR: u64 = BUFFER_ADDR;
    pub const BUFFER_SIZE: usize = BUFFER_SIZE;

    /// Checks the identification and liveness registers. The PCI function must already decode
    /// memory (BAR0 assigned, COMMAND.MEM); DMA also needs COMMAND.BUS_MASTER.
    pub fn probe(mmio: M) -> Result<Self, EduError> {
        let id = mmio.read32(regs::ID);
        if id & 0xff != 0xed {
            return Err(EduError::BadId(id));
        }
        for wrote in [0x5a5a_0f0f_u32, 0x0000_0000] {
            mmio.write32(regs::LIVENESS, wrote);
            let read = mmio.read32(regs::LIVENESS);
            if read != !wrote {
                return Err(EduError::NotAlive { wrote, read });
            }
        }
        Ok(Self {
            mmio,
            dma_mask: DEFAULT_DMA_MASK,
        })
    }

    /// For a device started with a non-default `dma_mask` property.
    pub const fn with_dma_mask(mut self, mask: u64) -> Self {
        self.dma_mask = mask;
        self
    }

    pub const fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    pub const fn mmio(&self) -> &M {
        &self.mmio
    }

    /// (major, minor) from the identification register.
    pub fn version(&self) -> (u8, u8) {
        let id = self.mmio.read32(regs::ID);
        ((id >> 24) as u8, (id >> 16) as u8)
    }

    /// Copies `len` bytes from bus address `bus_addr` into the start of the device buffer.
    pub fn dma_to_device(&self, bus_addr: u64, len: usize) -> Result<(), EduError> {
        self.start_dma(DmaDirection::ToDevice, bus_addr, 0, len, false)
    }

    /// Copies `len` bytes from the start of the device buffer to bus address `bus_addr`.
    pub fn dma_from_device(&self, bus_addr: u64, len: usize) -> Result<(), EduError> {
        self.start_dma(DmaDirection::FromDevice, bus_addr, 0, len, false)
    }

    /// Starts a transfer between bus address `bus_addr` and the device buffer at
    /// `buffer_offset`, optionally raising interrupt [`regs::IRQ_DMA`] when done. Returns once
    /// the command is written; use [`wait_dma`](Self::wait_dma).
    pub fn start_dma(
        &self,
        direction: DmaDirection,
        bus_addr: u64,
        buffer_offset: usize,
        len: usize,
        irq: bool,
    ) -> Result<(), EduError> {
        if len == 0
            || buffer_offset
                .checked_add(len)
                .is_none_or(|end| end > BUFFER_SIZE)
        {
            return Err(EduError::BadLength { buffer_offset, len });
        }
        let beyond = EduError::BeyondDmaMask {
            bus_addr,
            len,
            mask: self.dma_mask,
        };
        let last = bus_addr.checked_add(len as u64 - 1).ok_or(beyond)?;
        if bus_addr & !self.dma_mask != 0 || last & !self.dma_mask != 0 {
            return Err(beyond);
        }
        if self.dma_busy() {
            return Err(EduError::Busy);
        }
        let device = BUFFER_ADDR + buffer_offset as u64;
        let (src, dst, dir) = match direction {
            DmaDirection::ToDevice => (bus_addr, device, 0),
            DmaDirection::FromDevice => (device, bus_addr, regs::DMA_CMD_TO_RAM),
        };
        self.mmio.write64(regs::DMA_SRC, src);
        self.mmio.write64(regs::DMA_DST, dst);
        self.mmio.write64(regs::DMA_COUNT, len as u64);
        let irq = if irq { regs::DMA_CMD_IRQ } else { 0 };
        self.mmio
            .write32(regs::DMA_CMD, regs::DMA_CMD_START | dir | irq);
        Ok(())
    }

    /// Whether a transfer is running (command bit 0).
    pub fn dma_busy(&self) -> bool {
        self.mmio.read32(regs::DMA_CMD) & regs::DMA_CMD_START != 0
    }

    /// Polls the command register at most `max_polls` times for the transfer to finish. The
    /// caller picks the bound (a transfer takes about 100 ms of QEMU virtual time).
    pub fn wait_dma(&self, max_polls: u32) -> Result<(), EduError> {
        for _ in 0..max_polls {
            if !self.dma_busy() {
                // The command register saying "done" is the only signal that the device's
                // writes to memory (a device-to-RAM transfer) have landed: the caller's reads
                // of that memory are ordered after this register read.
                self.mmio.dma_rmb();
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(EduError::Timeout)
    }

    /// Computes `n!` on the device (32-bit, wrapping), polling at most `max_polls` times.
    pub fn factorial(&self, n: u32, max_polls: u32) -> Result<u32, EduError> {
        self.mmio.write32(regs::FACTORIAL, n);
        for _ in 0..max_polls {
            if self.mmio.read32(regs::STATUS) & regs::STATUS_COMPUTING == 0 {
                return Ok(self.mmio.read32(regs::FACTORIAL));
            }
            core::hint::spin_loop();
        }
        Err(EduError::Timeout)
    }

    pub fn irq_status(&self) -> u32 {
        self.mmio.read32(regs::IRQ_STATUS)
    }

    /// ORs `bits` into the interrupt status and asserts the interrupt.
    pub fn raise_irq(&self, bits: u32) {
        self.mmio.write32(regs::IRQ_RAISE, bits);
    }

    /// Clears `bits` of the interrupt status (deasserting the interrupt when none remain).
    pub fn ack_irq(&self, bits: u32) {
        self.mmio.write32(regs::IRQ_ACK, bits);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::vec;
    use std::vec::Vec;

    use super::*;

    /// edu register file with a DMA engine that completes after `delay` polls of the command
    /// register, copying between `ram` (bus address = index) and the buffer.
    struct FakeEdu {
        id: u32,
        liveness: Cell<u32>,
        invert: bool,
        src: Cell<u64>,
        dst: Cell<u64>,
        cnt: Cell<u64>,
        cmd: Cell<u32>,
        countdown: Cell<u32>,
        delay: u32,
        mask: u64,
        fact: Cell<u32>,
        irq: Cell<u32>,
        ram: RefCell<Vec<u8>>,
        buf: RefCell<Vec<u8>>,
        commands: Cell<u32>,
        narrow_64bit_regs: Cell<u32>,
    }

    impl FakeEdu {
        fn new(delay: u32) -> Self {
            Self {
                id: 0x0100_00ed,
                liveness: Cell::new(0),
                invert: true,
                src: Cell::new(0),
                dst: Cell::new(0),
                cnt: Cell::new(0),
                cmd: Cell::new(0),
                countdown: Cell::new(0),
                delay,
                mask: DEFAULT_DMA_MASK,
                fact: Cell::new(0),
                irq: Cell::new(0),
                ram: RefCell::new(vec![0; 0x10000]),
                buf: RefCell::new(vec![0; BUFFER_SIZE]),
                commands: Cell::new(0),
                narrow_64bit_regs: Cell::new(0),
            }
        }

        fn finish(&self) {
            let (src, dst, cnt) = (
                self.src.get() & self.mask,
                self.dst.get() & self.mask,
                self.cnt.get() as usize,
            );
            let b = |a: u64| (a - BUFFER_ADDR) as usize;
            let ram_len = self.ram.borrow().len();
            let ram_addr = if self.cmd.get() & regs::DMA_CMD_TO_RAM == 0 {
                src
            } else {
                dst
            };
            if ram_addr as usize + cnt > ram_len {
                // Outside the fake's RAM: dropped, like DMA to nowhere.
                self.cmd.set(self.cmd.get() & !regs::DMA_CMD_START);
                return;
            }
            if self.cmd.get() & regs::DMA_CMD_TO_RAM == 0 {
                let data = self.ram.borrow()[src as usize..src as usize + cnt].to_vec();
                self.buf.borrow_mut()[b(dst)..b(dst) + cnt].copy_from_slice(&data);
            } else {
                let data = self.buf.borrow()[b(src)..b(src) + cnt].to_vec();
                self.ram.borrow_mut()[dst as usize..dst as usize + cnt].copy_from_slice(&data);
            }
            if self.cmd.get() & regs::DMA_CMD_IRQ != 0 {
                self.irq.set(self.irq.get() | regs::IRQ_DMA);
            }
            self.cmd.set(self.cmd.get() & !regs::DMA_CMD_START);
        }
    }

    impl Mmio for &FakeEdu {
        fn read32(&self, offset: usize) -> u32 {
            match offset {
                regs::ID => self.id,
                regs::LIVENESS => {
                    if self.invert {
                        !self.liveness.get()
                    } else {
                        self.liveness.get()
                    }
                }
                regs::FACTORIAL => self.fact.get(),
                regs::STATUS => 0,
                regs::IRQ_STATUS => self.irq.get(),
                regs::DMA_CMD => {
                    if self.cmd.get() & regs::DMA_CMD_START != 0 {
                        if self.countdown.get() == 0 {
                            self.finish();
                        } else {
                            self.countdown.set(self.countdown.get() - 1);
                        }
                    }
                    self.cmd.get()
                }
                _ => 0,
            }
        }
        fn write32(&self, offset: usize, value: u32) {
            match offset {
                regs::LIVENESS => self.liveness.set(value),
                regs::FACTORIAL => self.fact.set((1..=value).product()),
                regs::IRQ_RAISE => self.irq.set(self.irq.get() | value),
                regs::IRQ_ACK => self.irq.set(self.irq.get() & !value),
                regs::DMA_CMD if self.cmd.get() & regs::DMA_CMD_START == 0 => {
                    self.commands.set(self.commands.get() + 1);
                    self.cmd.set(value);
                    if value & regs::DMA_CMD_START != 0 {
                        self.countdown.set(self.delay);
                    }
                }
                regs::DMA_SRC | regs::DMA_DST => {
                    self.narrow_64bit_regs.set(self.narrow_64bit_regs.get() + 1)
                }
                _ => {}
            }
        }
        fn read64(&self, offset: usize) -> u64 {
            u64::from(self.read32(offset))
        }
        fn write64(&self, offset: usize, value: u64) {
            match offset {
                regs::DMA_SRC => self.src.set(value),
                regs::DMA_DST => self.dst.set(value),
                regs::DMA_COUNT => self.cnt.set(value),
                _ => self.write32(offset, value as u32),
            }
        }
    }

    #[test]
    fn probe_checks_id_and_liveness() {
        let dev = FakeEdu::new(0);
        let edu = Edu::probe(&dev).unwrap();
        assert_eq!(edu.version(), (1, 0));
        assert_eq!(Edu::<&FakeEdu>::BUFFER_ADDR, 0x40000);
        let mut bad = FakeEdu::new(0);
        bad.id = 0x1234_5678;
        assert_eq!(Edu::probe(&bad).err(), Some(EduError::BadId(0x1234_5678)));
        let mut dead = FakeEdu::new(0);
        dead.invert = false;
        assert_eq!(
            Edu::probe(&dead).err(),
            Some(EduError::NotAlive {
                wrote: 0x5a5a_0f0f,
                read: 0x5a5a_0f0f
            })
        );
    }

    #[test]
    fn dma_round_trip() {
        let dev = FakeEdu::new(3);
        let edu = Edu::probe(&dev).unwrap();
        let data: Vec<u8> = (0..256).map(|i| i as u8 ^ 0x5a).collect();
        dev.ram.borrow_mut()[0x1000..0x1100].copy_from_slice(&data);
        edu.dma_to_device(0x1000, 256).unwrap();
        assert!(edu.dma_busy());
        assert_eq!(edu.dma_from_device(0x2000, 256), Err(EduError::Busy));
        edu.wait_dma(10).unwrap();
        assert_eq!(&dev.buf.borrow()[..256], &data[..]);
        edu.dma_from_device(0x1800, 256).unwrap();
        edu.wait_dma(10).unwrap();
        assert_eq!(&dev.ram.borrow()[0x1800..0x1900], &data[..]);
        // Offsets inside the buffer, with the completion interrupt.
        edu.start_dma(DmaDirection::FromDevice, 0x3000, 0x10, 16, true)
            .unwrap();
        edu.wait_dma(10).unwrap();
        assert_eq!(&dev.ram.borrow()[0x3000..0x3010], &data[0x10..0x20]);
        assert_eq!(edu.irq_status(), regs::IRQ_DMA);
        edu.ack_irq(regs::IRQ_DMA);
        assert_eq!(edu.irq_status(), 0);
        assert_eq!(dev.commands.get(), 3);
        assert_eq!(
            dev.narrow_64bit_regs.get(),
            0,
            "64-bit address registers written with 8-byte stores"
        );
    }

    #[test]
    fn wait_dma_is_bounded() {
        let dev = FakeEdu::new(u32::MAX);
        let edu = Edu::probe(&dev).unwrap();
        edu.dma_to_device(0, 4).unwrap();
        assert_eq!(edu.wait_dma(1000), Err(EduError::Timeout));
        assert_eq!(edu.wait_dma(0), Err(EduError::Timeout));
        let idle = FakeEdu::new(0);
        assert_eq!(
            Edu::probe(&idle).unwrap().wait_dma(0),
            Err(EduError::Timeout),
            "0 polls never succeed"
        );
        assert_eq!(Edu::probe(&idle).unwrap().wait_dma(1), Ok(()));
    }

    #[test]
    fn dma_arguments_are_checked() {
        let dev = FakeEdu::new(0);
        let edu = Edu::probe(&dev).unwrap();
        assert_eq!(
            edu.dma_to_device(0, 0),
            Err(EduError::BadLength {
                buffer_offset: 0,
                len: 0
            })
        );
        assert_eq!(
            edu.dma_to_device(0, 4097),
            Err(EduError::BadLength {
                buffer_offset: 0,
                len: 4097
            })
        );
        assert_eq!(
            edu.start_dma(DmaDirection::ToDevice, 0, 4000, 100, false),
            Err(EduError::BadLength {
                buffer_offset: 4000,
                len: 100
            })
        );
        assert_eq!(
            edu.start_dma(DmaDirection::ToDevice, 0, usize::MAX, 2, false),
            Err(EduError::BadLength {
                buffer_offset: usize::MAX,
                len: 2
            })
        );
        let mask = DEFAULT_DMA_MASK;
        assert_eq!(
            edu.dma_to_device(1 << 28, 4),
            Err(EduError::BeyondDmaMask {
                bus_addr: 1 << 28,
                len: 4,
                mask
            })
        );
        assert_eq!(
            edu.dma_from_device(mask - 1, 4),
            Err(EduError::BeyondDmaMask {
                bus_addr: mask - 1,
                len: 4,
                mask
            })
        );
        assert!(edu.dma_from_device(mask - 3, 4).is_ok());
        assert_eq!(dev.commands.get(), 1);
        let wide = Edu::probe(&dev).unwrap().with_dma_mask(u64::MAX);
        wide.wait_dma(5).unwrap();
        assert_eq!(
            wide.dma_to_device(u64::MAX - 1, 4),
            Err(EduError::BeyondDmaMask {
                bus_addr: u64::MAX - 1,
                len: 4,
                mask: u64::MAX
            })
        );
    }

    #[test]
    fn factorial_and_irqs() {
        let dev = FakeEdu::new(0);
        let edu = Edu::probe(&dev).unwrap();
        assert_eq!(edu.factorial(5, 10), Ok(120));
        edu.raise_irq(0x8);
        assert_eq!(edu.irq_status(), 0x8);
        edu.ack_irq(0x8);
        assert_eq!(edu.irq_status(), 0);
    }
}

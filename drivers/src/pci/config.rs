//! Configuration-space addressing and access: [`Bdf`], the [`ConfigSpace`] trait, and the
//! PCIe Enhanced Configuration Access Mechanism ([`Ecam`]).

use core::fmt;

use iommu::hw::Mmio;

/// Size of one function's configuration space with ECAM (PCIe Base 5.0 §7.2.2: 4 KiB per
/// function, of which the first 256 bytes are PCI-compatible).
pub const CONFIG_SPACE_SIZE: u16 = 4096;

/// A PCI function address on one segment: bus (8 bits), device (5 bits), function (3 bits).
///
/// The fields are public for convenience; a `device` above 31 or a `function` above 7 is not a
/// valid address, and [`Ecam`] answers such accesses like an absent function (all-ones reads,
/// ignored writes) instead of aliasing another function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    /// `None` if `device > 31` or `function > 7`.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        if device > 31 || function > 7 {
            return None;
        }
        Some(Self {
            bus,
            device,
            function,
        })
    }

    /// Splits a 16-bit requester ID (bus in bits 15:8, device 7:3, function 2:0).
    pub const fn from_rid(rid: u16) -> Self {
        Self {
            bus: (rid >> 8) as u8,
            device: ((rid >> 3) & 0x1f) as u8,
            function: (rid & 0x7) as u8,
        }
    }

    /// Whether `device` and `function` are in range.
    pub const fn is_valid(&self) -> bool {
        self.device <= 31 && self.function <= 7
    }

    /// The 16-bit requester ID, `bus << 8 | device << 3 | function` (PCIe Base 5.0 §2.2.6.2),
    /// which is also the VT-d source-id and, on QEMU `virt`, the SMMU StreamID.
    pub const fn rid(&self) -> u16 {
        ((self.bus as u16) << 8)
            | (((self.device & 0x1f) as u16) << 3)
            | (self.function & 0x7) as u16
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// Register offsets in the common part of the configuration header (PCI Local Bus 3.0 §6.1,
/// PCIe Base 5.0 §7.5.1.1) and in the type-1 (PCI-to-PCI bridge) header (PCIe Base 5.0
/// §7.5.1.3).
pub mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const REVISION_CLASS: u16 = 0x08;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    /// Type 0 only.
    pub const CAPABILITIES_PTR: u16 = 0x34;
    /// Type 1: primary, secondary, subordinate bus numbers and secondary latency timer.
    pub const BUS_NUMBERS: u16 = 0x18;
    /// Type 1: I/O base (8 bits), I/O limit (8 bits), secondary status (16 bits, RW1C).
    pub const IO_BASE_LIMIT: u16 = 0x1c;
    /// Type 1: memory base and limit (16 bits each).
    pub const MEM_BASE_LIMIT: u16 = 0x20;
    /// Type 1: prefetchable memory base and limit (16 bits each).
    pub const PREF_BASE_LIMIT: u16 = 0x24;
    pub const PREF_BASE_UPPER: u16 = 0x28;
    pub const PREF_LIMIT_UPPER: u16 = 0x2c;
    /// Type 1: I/O base upper 16 bits and I/O limit upper 16 bits.
    pub const IO_UPPER: u16 = 0x30;

    /// COMMAND bits (PCI Local Bus 3.0 §6.2.2).
    pub const CMD_IO: u16 = 1 << 0;
    pub const CMD_MEM: u16 = 1 << 1;
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// STATUS bit 4: a capabilities list is present (PCI Local Bus 3.0 §6.2.3).
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// HEADER_TYPE bit 7: the device has more than one function (PCI Local Bus 3.0 §6.2.1).
    pub const HEADER_MULTIFUNCTION: u8 = 0x80;
}

/// Access to the configuration space of the functions on one PCI segment.
///
/// Offsets are byte offsets into a function's 4 KiB configuration space and must be naturally
/// aligned for the width. A misaligned or out-of-range offset, an invalid [`Bdf`], or an absent
/// function reads as all ones and ignores writes — the same answer a master abort gives — so
/// callers never have to special-case it and nothing here can panic.
pub trait ConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
    fn write32(&self, bdf: Bdf, offset: u16, value: u32);

    fn read16(&self, bdf: Bdf, offset: u16) -> u16 {
        if offset & 1 != 0 || offset >= CONFIG_SPACE_SIZE {
            return 0xffff;
        }
        (self.read32(bdf, offset & !3) >> ((offset & 2) * 8)) as u16
    }

    fn read8(&self, bdf: Bdf, offset: u16) -> u8 {
        if offset >= CONFIG_SPACE_SIZE {
            return 0xff;
        }
        (self.read32(bdf, offset & !3) >> ((offset & 3) * 8)) as u8
    }

    /// The default is a read-modify-write of the containing dword. Bytes of that dword that hold
    /// write-1-to-clear status bits (STATUS at 0x06, and a bridge's secondary status at 0x1e) are
    /// written back as zero, so writing COMMAND does not clear pending error bits.
    fn write16(&self, bdf: Bdf, offset: u16, value: u16) {
        if offset & 1 != 0 || offset >= CONFIG_SPACE_SIZE {
            return;
        }
        let shift = (offset & 2) * 8;
        rmw(
            self,
            bdf,
            offset & !3,
            0xffff << shift,
            u32::from(value) << shift,
        );
    }

    /// Read-modify-write like [`write16`](Self::write16).
    fn write8(&self, bdf: Bdf, offset: u16, value: u8) {
        if offset >= CONFIG_SPACE_SIZE {
            return;
        }
        let shift = (offset & 3) * 8;
        rmw(
            self,
            bdf,
            offset & !3,
            0xff << shift,
            u32::from(value) << shift,
        );
    }
}

/// Merges `bits` (under `mask`) into the dword at `dword`, zeroing RW1C status halves that are
/// not being written.
fn rmw<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf, dword: u16, mask: u32, bits: u32) {
    let mut keep = !mask;
    if dword == reg::COMMAND {
        // STATUS (upper half) is RW1C or read-only in every header type (PCI Local Bus 3.0 §6.2.3).
        keep &= 0x0000_ffff;
    } else if dword == reg::IO_BASE_LIMIT && cfg.read8(bdf, reg::HEADER_TYPE) & 0x7f == 1 {
        // Type-1 secondary status is RW1C (PCIe Base 5.0 §7.5.1.3).
        keep &= 0x0000_ffff;
    }
    let old = cfg.read32(bdf, dword);
    cfg.write32(bdf, dword, (old & keep) | (bits & mask));
}

impl<T: ConfigSpace + ?Sized> ConfigSpace for &T {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        (**self).read32(bdf, offset)
    }
    fn write32(&self, bdf: Bdf, offset: u16, value: u32) {
        (**self).write32(bdf, offset, value)
    }
    fn read16(&self, bdf: Bdf, offset: u16) -> u16 {
        (**self).read16(bdf, offset)
    }
    fn read8(&self, bdf: Bdf, offset: u16) -> u8 {
        (**self).read8(bdf, offset)
    }
    fn write16(&self, bdf: Bdf, offset: u16, value: u16) {
        (**self).write16(bdf, offset, value)
    }
    fn write8(&self, bdf: Bdf, offset: u16, value: u8) {
        (**self).write8(bdf, offset, value)
    }
}

/// The PCIe Enhanced Configuration Access Mechanism (PCIe Base 5.0 §7.2.2) for one segment:
/// function `bus:dev.fn`'s register `reg` is at byte
/// `(bus - bus_start) << 20 | dev << 15 | fn << 12 | reg` of the region (ACPI MCFG or the DT
/// `pci-host-ecam-generic` `reg`), which the `Mmio` must cover for every bus in the range.
///
/// Only 32-bit accesses are issued (some ECAM implementations support nothing narrower); 8- and
/// 16-bit writes use the RW1C-safe read-modify-write of [`ConfigSpace`].
pub struct Ecam<M: Mmio> {
    mmio: M,
    segment: u16,
    bus_start: u8,
    bus_end: u8,
}

impl<M: Mmio> Ecam<M> {
    /// `bus_start..=bus_end` is the decoded bus range (MCFG start/end bus, DT `bus-range`). An
    /// empty range (`bus_end < bus_start`) makes every access miss.
    pub const fn new(mmio: M, segment: u16, bus_start: u8, bus_end: u8) -> Self {
        Self {
            mmio,
            segment,
            bus_start,
            bus_end,
        }
    }

    pub const fn segment(&self) -> u16 {
        self.segment
    }

    pub const fn bus_start(&self) -> u8 {
        self.bus_start
    }

    pub const fn bus_end(&self) -> u8 {
        self.bus_end
    }

    pub const fn mmio(&self) -> &M {
        &self.mmio
    }

    /// Byte offset of `bdf`'s dword at `offset` in the ECAM region, or `None` if the bus is
    /// outside the range, the address is invalid, or `offset` is misaligned or beyond 4 KiB.
    pub const fn offset(&self, bdf: Bdf, offset: u16) -> Option<usize> {
        if bdf.bus < self.bus_start
            || bdf.bus > self.bus_end
            || !bdf.is_valid()
            || offset & 3 != 0
            || offset >= CONFIG_SPACE_SIZE
        {
            return None;
        }
        Some(
            ((bdf.bus - self.bus_start) as usize) << 20
                | (bdf.device as usize) << 15
                | (bdf.function as usize) << 12
                | offset as usize,
        )
    }
}

impl<M: Mmio> ConfigSpace for Ecam<M> {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.offset(bdf, offset) {
            Some(off) => self.mmio.read32(off),
            None => u32::MAX,
        }
    }

    fn write32(&self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(off) = self.offset(bdf, offset) {
            self.mmio.write32(off, value);
        }
    }
}

//! A fake PCI segment for host tests: functions are byte arrays with per-byte writable masks
//! (so BAR sizing, read-only IDs and bridge registers behave like hardware), attached to bus
//! segments (HashMaps of device/function), and configuration requests are routed through
//! bridges by their *programmed* secondary/subordinate bus numbers, like type-1 forwarding
//! (PCIe Base 5.0 §7.5.1.3). It is exposed as an ECAM `Mmio` region.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::vec;
use std::vec::Vec;

use iommu::hw::Mmio;

use super::config::{Bdf, ConfigSpace};

#[derive(Clone)]
pub struct FakeFn {
    pub regs: Vec<u8>,
    pub wmask: Vec<u8>,
    next_cap: u16,
    last_cap: Option<u16>,
    next_ext: u16,
    last_ext: Option<u16>,
}

impl FakeFn {
    fn new(vendor: u16, device: u16, class: u8, subclass: u8, header: u8) -> Self {
        let mut f = Self {
            regs: vec![0; 4096],
            wmask: vec![0; 4096],
            next_cap: 0x40,
            last_cap: None,
            next_ext: 0x100,
            last_ext: None,
        };
        f.set16(0, vendor);
        f.set16(2, device);
        f.regs[0x08] = 0x10; // revision
        f.regs[0x0a] = subclass;
        f.regs[0x0b] = class;
        f.regs[0x0e] = header;
        // COMMAND: I/O, memory, bus master writable.
        f.wmask[0x04] = 0x07;
        f
    }

    pub fn endpoint(vendor: u16, device: u16, class: u8, subclass: u8) -> Self {
        Self::new(vendor, device, class, subclass, 0)
    }

    /// A PCI-to-PCI bridge with writable bus numbers, a 32-bit I/O window, a memory window and
    /// a 64-bit prefetchable window.
    pub fn bridge(vendor: u16, device: u16) -> Self {
        let mut f = Self::new(vendor, device, 0x06, 0x04, 1);
        for r in 0x18..0x1b {
            f.wmask[r] = 0xff;
        }
        f.regs[0x1c] = 0x01;
        f.regs[0x1d] = 0x01;
        f.wmask[0x1c] = 0xf0;
        f.wmask[0x1d] = 0xf0;
        for r in [0x20, 0x22, 0x24, 0x26] {
            f.wmask[r] = 0xf0;
            f.wmask[r + 1] = 0xff;
        }
        f.regs[0x24] = 0x01;
        f.regs[0x26] = 0x01;
        for r in 0x28..0x34 {
            f.wmask[r] = 0xff;
        }
        f
    }

    pub fn set16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set32(&mut self, off: usize, v: u32) {
        self.regs[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.regs[off..off + 4].try_into().unwrap())
    }

    fn set_wmask32(&mut self, off: usize, m: u32) {
        self.wmask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }

    pub fn multifunction(mut self) -> Self {
        self.regs[0x0e] |= 0x80;
        self
    }

    pub fn mem32_bar(mut self, index: usize, size: u32, prefetchable: bool) -> Self {
        let off = 0x10 + 4 * index;
        self.set32(off, if prefetchable { 0x8 } else { 0 });
        self.set_wmask32(off, !(size - 1) & !0xf);
        self
    }

    pub fn mem64_bar(mut self, index: usize, size: u64, prefetchable: bool) -> Self {
        let off = 0x10 + 4 * index;
        self.set32(off, 0x4 | if prefetchable { 0x8 } else { 0 });
        let mask = !(size - 1) & !0xf;
        self.set_wmask32(off, mask as u32);
        self.set_wmask32(off + 4, (mask >> 32) as u32);
        self
    }

    pub fn io_bar(mut self, index: usize, size: u32) -> Self {
        let off = 0x10 + 4 * index;
        self.set32(off, 0x1);
        self.set_wmask32(off, !(size - 1) & 0xffff & !0x3);
        self
    }

    /// Sets a BAR's current address (as firmware would have).
    pub fn at(mut self, index: usize, addr: u64) -> Self {
        let off = 0x10 + 4 * index;
        let flags = self.get32(off) & 0xf;
        let flags = if flags & 1 == 1 { 1 } else { flags };
        self.set32(off, addr as u32 | flags);
        if flags & 0x6 == 0x4 {
            self.set32(off + 4, (addr >> 32) as u32);
        }
        self
    }

    /// Firmware-programmed bus numbers.
    pub fn buses(mut self, primary: u8, secondary: u8, subordinate: u8) -> Self {
        self.regs[0x18] = primary;
        self.regs[0x19] = secondary;
        self.regs[0x1a] = subordinate;
        self
    }

    /// Firmware-programmed memory window.
    pub fn mem_window(mut self, base: u32, last: u32) -> Self {
        self.set16(0x20, ((base >> 16) & 0xfff0) as u16);
        self.set16(0x22, ((last >> 16) & 0xfff0) as u16);
        self
    }

    pub fn cap(mut self, id: u8, body: &[u8]) -> Self {
        let off = self.next_cap;
        self.regs[0x06] |= 0x10;
        match self.last_cap {
            None => self.regs[0x34] = off as u8,
            Some(prev) => self.regs[usize::from(prev) + 1] = off as u8,
        }
        self.regs[usize::from(off)] = id;
        self.regs[usize::from(off) + 2..usize::from(off) + 2 + body.len()].copy_from_slice(body);
        self.last_cap = Some(off);
        self.next_cap = (off + 2 + body.len() as u16 + 3) & !3;
        self
    }

    pub fn pcie(self, port_type: u8) -> Self {
        self.cap(0x10, &[0x2 | (port_type << 4), 0, 0, 0, 0, 0])
    }

    /// An ACS extended capability (PCIe Base 5.0 §7.7.8) whose Control register keeps writes
    /// to the bits the Capability register offers, like QEMU's and real ports.
    pub fn acs(self, capability: u16, control: u16) -> Self {
        self.acs_with_wmask(capability, control, capability)
    }

    /// An ACS capability whose Control register keeps only the bits of `writable`.
    pub fn acs_with_wmask(self, capability: u16, control: u16, writable: u16) -> Self {
        let c = capability.to_le_bytes();
        let k = control.to_le_bytes();
        let mut f = self.ext_cap(0x000d, &[c[0], c[1], k[0], k[1]]);
        let off = usize::from(f.last_ext.unwrap());
        f.wmask[off + 6..off + 8].copy_from_slice(&writable.to_le_bytes());
        f
    }

    pub fn ext_cap(mut self, id: u16, body: &[u8]) -> Self {
        let off = self.next_ext;
        match self.last_ext {
            None => {}
            Some(prev) => {
                let p = usize::from(prev);
                let h = self.get32(p) | u32::from(off) << 20;
                self.set32(p, h);
            }
        }
        self.set32(usize::from(off), u32::from(id) | 1 << 16);
        self.regs[usize::from(off) + 4..usize::from(off) + 4 + body.len()].copy_from_slice(body);
        self.last_ext = Some(off);
        self.next_ext = (off + 4 + body.len() as u16 + 3) & !3;
        self
    }
}

pub struct FakePci {
    pub fns: RefCell<Vec<FakeFn>>,
    /// Bus segments: (device, function) → function id. Segment 0 is the root bus.
    pub segments: Vec<HashMap<(u8, u8), usize>>,
    /// Bridge function id → its downstream segment.
    pub downstream: HashMap<usize, usize>,
    pub accesses: Cell<u64>,
}

impl FakePci {
    pub fn new() -> Self {
        Self {
            fns: RefCell::new(Vec::new()),
            segments: vec![HashMap::new()],
            downstream: HashMap::new(),
            accesses: Cell::new(0),
        }
    }

    /// Adds a function on segment `seg`; returns its id.
    pub fn add(&mut self, seg: usize, device: u8, function: u8, f: FakeFn) -> usize {
        let mut fns = self.fns.borrow_mut();
        fns.push(f);
        let id = fns.len() - 1;
        self.segments[seg].insert((device, function), id);
        id
    }

    /// Adds a bridge; returns (its id, its downstream segment).
    pub fn add_bridge(
        &mut self,
        seg: usize,
        device: u8,
        function: u8,
        f: FakeFn,
    ) -> (usize, usize) {
        let id = self.add(seg, device, function, f);
        self.segments.push(HashMap::new());
        let ds = self.segments.len() - 1;
        self.downstream.insert(id, ds);
        (id, ds)
    }

    /// Routes a configuration request like the hierarchy would: type 0 on the segment whose bus
    /// number matches, type 1 forwarded by bridges whose secondary..=subordinate covers it.
    pub fn resolve(&self, bus: u8, device: u8, function: u8) -> Option<usize> {
        self.resolve_in(0, 0, bus, device, function, 0)
    }

    fn resolve_in(
        &self,
        seg: usize,
        seg_bus: u8,
        bus: u8,
        dev: u8,
        func: u8,
        depth: u32,
    ) -> Option<usize> {
        if depth > 32 {
            return None;
        }
        if bus == seg_bus {
            return self.segments[seg].get(&(dev, func)).copied();
        }
        let fns = self.fns.borrow();
        let mut ids: Vec<usize> = self.segments[seg].values().copied().collect();
        ids.sort();
        for id in ids {
            let Some(&ds) = self.downstream.get(&id) else {
                continue;
            };
            let (sec, sub) = (fns[id].regs[0x19], fns[id].regs[0x1a]);
            if sec != 0 && sec <= bus && bus <= sub {
                drop(fns);
                return self.resolve_in(ds, sec, bus, dev, func, depth + 1);
            }
        }
        None
    }

    pub fn with<R>(&self, bus: u8, device: u8, function: u8, f: impl FnOnce(&FakeFn) -> R) -> R {
        let id = self
            .resolve(bus, device, function)
            .expect("no such function");
        f(&self.fns.borrow()[id])
    }

    pub fn by_id<R>(&self, id: usize, f: impl FnOnce(&FakeFn) -> R) -> R {
        f(&self.fns.borrow()[id])
    }

    fn decode(offset: usize) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 31) as u8,
            ((offset >> 12) & 7) as u8,
            offset & 0xfff,
        )
    }
}

impl Mmio for FakePci {
    fn read32(&self, offset: usize) -> u32 {
        self.accesses.set(self.accesses.get() + 1);
        assert_eq!(offset & 3, 0, "misaligned ECAM access");
        let (b, d, f, r) = Self::decode(offset);
        match self.resolve(b, d, f) {
            Some(id) => self.fns.borrow()[id].get32(r),
            None => u32::MAX,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        self.accesses.set(self.accesses.get() + 1);
        assert_eq!(offset & 3, 0, "misaligned ECAM access");
        let (b, d, f, r) = Self::decode(offset);
        if let Some(id) = self.resolve(b, d, f) {
            let fun = &mut self.fns.borrow_mut()[id];
            for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                let m = fun.wmask[r + i];
                fun.regs[r + i] = (fun.regs[r + i] & !m) | (byte & m);
            }
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32
    }

    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// A configuration space that answers every address with the same registers (a broken host
/// bridge that ignores the bus/device/function bits).
pub struct SameEverywhere {
    pub f: RefCell<FakeFn>,
    pub accesses: Cell<u64>,
}

impl ConfigSpace for SameEverywhere {
    fn read32(&self, _: Bdf, offset: u16) -> u32 {
        self.accesses.set(self.accesses.get() + 1);
        if offset & 3 != 0 || offset >= 4096 {
            return u32::MAX;
        }
        self.f.borrow().get32(usize::from(offset))
    }

    fn write32(&self, _: Bdf, offset: u16, value: u32) {
        self.accesses.set(self.accesses.get() + 1);
        if offset & 3 != 0 || offset >= 4096 {
            return;
        }
        let fun = &mut *self.f.borrow_mut();
        let r = usize::from(offset);
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            let m = fun.wmask[r + i];
            fun.regs[r + i] = (fun.regs[r + i] & !m) | (byte & m);
        }
    }
}

/// Reads all ones everywhere (no device at all, or a dead bus).
pub struct AllOnes;

impl Mmio for AllOnes {
    fn read32(&self, _: usize) -> u32 {
        u32::MAX
    }
    fn write32(&self, _: usize, _: u32) {}
    fn read64(&self, _: usize) -> u64 {
        u64::MAX
    }
    fn write64(&self, _: usize, _: u64) {}
}

impl Mmio for &FakePci {
    fn read32(&self, offset: usize) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        (**self).write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        (**self).read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        (**self).write64(offset, value)
    }
}

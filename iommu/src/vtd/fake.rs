//! Test fakes: [`FakeMem`], a [`VtdMemory`] over a pool of atomics with fake physical
//! addresses that logs stores and cache cleans; and [`FakeVtd`], a VT-d register model with
//! GCMD/GSTS, register-based invalidation, the invalidation queue and fault recording.
//!
//! The register model follows the spec's behaviour (and QEMU's where the spec leaves room):
//! GCMD changes show in GSTS after a configurable number of GSTS reads, SRTP clears RTPS until
//! the pointer is latched, the queue is processed on IQT writes, a descriptor it does not accept
//! stops the queue with FSTS.IQE at that descriptor until IQE is cleared, faults are recorded
//! circularly and PFO is set when the next record is still full.

use core::cell::{Cell, RefCell};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::boxed::Box;
use std::vec::Vec;

use super::mem::VtdMemory;
use super::regs::{
    Capability, ExtCapability, FaultStatus, GlobalCommand, GlobalStatus, InvQueueAddress, offset,
};
use crate::hw::Mmio;
use crate::pgtable::{PhysAddr, TableMemory};

/// Fake physical address of frame 0.
pub const POOL_BASE: u64 = 0x10_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Free,
    Live,
    Retired,
}

/// One store the driver made through [`VtdMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Store {
    pub pa: u64,
    pub lo: u64,
    /// `Some` for a 128-bit store.
    pub hi: Option<u64>,
}

type Hook = Box<dyn FnMut(&FakeMem, &Store)>;

/// Memory of 4 KiB frames at fake physical addresses from [`POOL_BASE`].
pub struct FakeMem {
    storage: Box<[AtomicU64]>,
    frames: RefCell<Vec<Frame>>,
    pub cleans: RefCell<Vec<(u64, usize)>>,
    pub stores: RefCell<Vec<Store>>,
    hook: RefCell<Option<Hook>>,
    pub allocs: Cell<usize>,
    pub frees: Cell<usize>,
    pub retires: Cell<usize>,
    /// Allocations fail while set.
    pub fail_allocs: Cell<bool>,
    /// `Some(n)`: the next `n` allocations succeed, every later one fails (injection point
    /// for unwinding tests).
    pub fail_after: Cell<Option<usize>>,
}

impl FakeMem {
    pub fn new(frames: usize) -> Self {
        FakeMem {
            storage: (0..frames * 512).map(|_| AtomicU64::new(0)).collect(),
            frames: RefCell::new(std::vec![Frame::Free; frames]),
            cleans: RefCell::new(Vec::new()),
            stores: RefCell::new(Vec::new()),
            hook: RefCell::new(None),
            allocs: Cell::new(0),
            frees: Cell::new(0),
            retires: Cell::new(0),
            fail_allocs: Cell::new(false),
            fail_after: Cell::new(None),
        }
    }

    fn word(&self, pa: u64) -> Option<&AtomicU64> {
        if pa < POOL_BASE || !pa.is_multiple_of(8) {
            return None;
        }
        self.storage.get(((pa - POOL_BASE) / 8) as usize)
    }

    fn frame(pa: u64) -> usize {
        ((pa - POOL_BASE) >> 12) as usize
    }

    /// A raw read, as the hardware does it (any frame state); 0 outside the pool.
    pub fn read(&self, pa: u64) -> u64 {
        self.word(pa).map_or(0, |w| w.load(Relaxed))
    }

    /// A hardware 32-bit write (status write of a wait descriptor). False outside the pool.
    pub fn hw_write32(&self, pa: u64, value: u32) -> bool {
        match self.word(pa & !7) {
            Some(w) => {
                let shift = (pa & 4) * 8;
                let old = w.load(Relaxed);
                w.store(
                    (old & !(0xffff_ffffu64 << shift)) | (value as u64) << shift,
                    Relaxed,
                );
                true
            }
            None => false,
        }
    }

    /// Runs `f` after every store the driver makes through [`VtdMemory`].
    pub fn set_hook(&self, f: impl FnMut(&FakeMem, &Store) + 'static) {
        *self.hook.borrow_mut() = Some(Box::new(f));
    }

    pub fn clear_hook(&self) {
        *self.hook.borrow_mut() = None;
    }

    /// Every word of the pool.
    pub fn snapshot(&self) -> Vec<u64> {
        self.storage.iter().map(|w| w.load(Relaxed)).collect()
    }

    pub fn live_frames(&self) -> usize {
        self.frames
            .borrow()
            .iter()
            .filter(|f| **f == Frame::Live)
            .count()
    }

    pub fn is_retired(&self, pa: u64) -> bool {
        self.frames.borrow()[Self::frame(pa)] == Frame::Retired
    }

    fn record(&self, s: Store) {
        self.stores.borrow_mut().push(s);
        let hook = self.hook.borrow_mut().take();
        if let Some(mut h) = hook {
            h(self, &s);
            let mut slot = self.hook.borrow_mut();
            if slot.is_none() {
                *slot = Some(h);
            }
        }
    }
}

impl TableMemory for FakeMem {
    type Entry = AtomicU64;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        assert_eq!(bytes, 4096, "VT-d structures and tables are single pages");
        if self.fail_allocs.get() {
            return None;
        }
        match self.fail_after.get() {
            Some(0) => return None,
            Some(n) => self.fail_after.set(Some(n - 1)),
            None => {}
        }
        let mut frames = self.frames.borrow_mut();
        let i = frames.iter().position(|f| *f == Frame::Free)?;
        frames[i] = Frame::Live;
        for w in &self.storage[i * 512..(i + 1) * 512] {
            w.store(0, Relaxed);
        }
        self.allocs.set(self.allocs.get() + 1);
        Some(POOL_BASE + (i as u64) * 4096)
    }

    fn free_table(&self, pa: PhysAddr, bytes: usize) {
        assert_eq!(bytes, 4096);
        let mut frames = self.frames.borrow_mut();
        let f = &mut frames[Self::frame(pa)];
        assert_eq!(*f, Frame::Live, "free of a frame not live: {pa:#x}");
        *f = Frame::Free;
        self.frees.set(self.frees.get() + 1);
    }

    fn retire_table(&self, pa: PhysAddr, bytes: usize) {
        assert_eq!(bytes, 4096);
        let mut frames = self.frames.borrow_mut();
        let f = &mut frames[Self::frame(pa)];
        assert_eq!(*f, Frame::Live, "retire of a frame not live: {pa:#x}");
        *f = Frame::Retired;
        self.retires.set(self.retires.get() + 1);
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[AtomicU64] {
        assert_eq!(pa & 0xfff, 0, "table() takes a page address");
        assert!(entries <= 512);
        let i = Self::frame(pa);
        assert_eq!(
            self.frames.borrow()[i],
            Frame::Live,
            "access to a frame not live: {pa:#x}"
        );
        &self.storage[i * 512..i * 512 + entries]
    }

    fn clean(&self, pa: PhysAddr, bytes: usize) {
        self.cleans.borrow_mut().push((pa, bytes));
    }
}

impl VtdMemory for FakeMem {
    fn store128(&self, pa: u64, lo: u64, hi: u64) {
        assert_eq!(pa % 16, 0, "misaligned 128-bit store at {pa:#x}");
        let page = self.table(pa & !0xfff, 512);
        let i = ((pa & 0xfff) / 8) as usize;
        page[i + 1].store(hi, Relaxed);
        page[i].store(lo, Relaxed);
        self.record(Store {
            pa,
            lo,
            hi: Some(hi),
        });
    }

    fn store64(&self, pa: u64, value: u64) {
        let page = self.table(pa & !0xfff, 512);
        page[((pa & 0xfff) / 8) as usize].store(value, Relaxed);
        self.record(Store {
            pa,
            lo: value,
            hi: None,
        });
    }
}

/// One descriptor the fake queue processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processed {
    pub lo: u64,
    pub hi: u64,
    pub upper: [u64; 2],
}

impl Processed {
    pub fn kind(&self) -> u8 {
        ((self.lo & 0xf) | ((self.lo >> 9) & 7) << 4) as u8
    }
}

/// The register file's state; tests read and poke it directly.
pub struct HwState {
    pub ver: u32,
    pub cap: u64,
    pub ecap: u64,
    pub gsts: u32,
    /// A GCMD change waiting to show in GSTS: (target GSTS, reads left).
    pending: Option<(u32, u32)>,
    /// GSTS reads before a GCMD change shows; `u32::MAX` = never.
    pub gcmd_latency: u32,
    pub gcmd_log: Vec<u32>,
    pub rtaddr: u64,
    pub latched_rtaddr: Option<u64>,
    pub srtp_count: u32,
    pub wbf_count: u32,
    pub te_without_root: u32,
    pub fsts: u32,
    pub ccmd: u64,
    pub ccmd_log: Vec<u64>,
    pub iva: u64,
    pub iotlb: u64,
    /// (IOTLB register value, IVA at the time).
    pub iotlb_log: Vec<(u64, u64)>,
    /// Register-based invalidations while QI was on (QEMU ignores them; so does the fake).
    pub reg_inv_while_qi: u32,
    /// Register invalidations complete with CAIG/IAIG = 0.
    pub reject_register: bool,
    pub iqa: u64,
    pub iqh: u32,
    pub iqt: u32,
    pub ics: u32,
    pub iqercd: u64,
    pub processed: Vec<Processed>,
    /// Descriptor types the queue rejects with IQE (on top of malformed ones).
    pub reject_kinds: Vec<u8>,
    /// The queue consumes nothing (stuck hardware).
    pub stall: bool,
    /// The next wait descriptor is dropped with ITE for this SID.
    pub ite_next_wait: Option<u16>,
    pub frcd: Vec<(u64, u64)>,
    next_fault: usize,
}

/// IQEI value the fake reports for every rejected descriptor (the driver reports it raw).
pub const FAKE_IQEI: u8 = 3;

/// A VT-d register file over a [`FakeMem`].
pub struct FakeVtd<'m> {
    pub mem: &'m FakeMem,
    pub s: RefCell<HwState>,
}

const F: u64 = 1 << 63;

impl<'m> FakeVtd<'m> {
    pub fn new(mem: &'m FakeMem, cap: u64, ecap: u64) -> Self {
        let nfr = Capability(cap).nfr() as usize;
        FakeVtd {
            mem,
            s: RefCell::new(HwState {
                ver: 0x10,
                cap,
                ecap,
                gsts: 0,
                pending: None,
                gcmd_latency: 3,
                gcmd_log: Vec::new(),
                rtaddr: 0,
                latched_rtaddr: None,
                srtp_count: 0,
                wbf_count: 0,
                te_without_root: 0,
                fsts: 0,
                ccmd: 0,
                ccmd_log: Vec::new(),
                iva: 0,
                iotlb: 0,
                iotlb_log: Vec::new(),
                reg_inv_while_qi: 0,
                reject_register: false,
                iqa: 0,
                iqh: 0,
                iqt: 0,
                ics: 0,
                iqercd: 0,
                processed: Vec::new(),
                reject_kinds: Vec::new(),
                stall: false,
                ite_next_wait: None,
                frcd: std::vec![(0, 0); nfr],
                next_fault: 0,
            }),
        }
    }

    /// Records a fault as the hardware does: into the next register, or PFO if it is full.
    /// `hi` without F; returns whether it was recorded.
    pub fn inject_fault(&self, lo: u64, hi: u64) -> bool {
        let mut s = self.s.borrow_mut();
        let slot = s.next_fault;
        if s.frcd[slot].1 & F != 0 {
            s.fsts |= FaultStatus::PFO.bits();
            return false;
        }
        s.frcd[slot] = (lo, hi | F);
        s.next_fault = (slot + 1) % s.frcd.len();
        true
    }

    /// Lets a stalled queue run again.
    pub fn unstall(&self) {
        self.s.borrow_mut().stall = false;
        self.process();
    }

    /// Descriptors processed so far (waits included), drained.
    pub fn take_processed(&self) -> Vec<Processed> {
        core::mem::take(&mut self.s.borrow_mut().processed)
    }

    fn ecap(&self) -> ExtCapability {
        ExtCapability(self.s.borrow().ecap)
    }

    fn cap(&self) -> Capability {
        Capability(self.s.borrow().cap)
    }

    fn read_gsts(&self) -> u32 {
        let mut s = self.s.borrow_mut();
        if let Some((target, left)) = s.pending {
            if left == 0 {
                s.gsts = target;
                s.pending = None;
            } else if left != u32::MAX {
                s.pending = Some((target, left - 1));
            }
        }
        s.gsts
    }

    fn write_gcmd(&self, v: u32) {
        let mut s = self.s.borrow_mut();
        s.gcmd_log.push(v);
        let w = GlobalCommand::from_bits_retain(v);
        // A pending change completes before the next command is accepted.
        if let Some((target, _)) = s.pending.take() {
            s.gsts = target;
        }
        let persistent_status = GlobalStatus::TES
            | GlobalStatus::QIES
            | GlobalStatus::IRES
            | GlobalStatus::CFIS
            | GlobalStatus::AFLS;
        let mut target = (s.gsts & !persistent_status.bits())
            | (w & GlobalCommand::PERSISTENT).status_flag().bits();
        if w.contains(GlobalCommand::SRTP) {
            s.latched_rtaddr = Some(s.rtaddr);
            s.srtp_count += 1;
            s.gsts &= !GlobalStatus::RTPS.bits();
            target |= GlobalStatus::RTPS.bits();
        }
        if w.contains(GlobalCommand::WBF) {
            s.wbf_count += 1;
            s.gsts |= GlobalStatus::WBFS.bits();
            target &= !GlobalStatus::WBFS.bits();
        }
        if w.contains(GlobalCommand::TE) && s.latched_rtaddr.is_none() {
            s.te_without_root += 1;
        }
        let qi_was_on = s.gsts & GlobalStatus::QIES.bits() != 0;
        if w.contains(GlobalCommand::QIE) && !qi_was_on {
            s.iqh = 0;
        }
        if s.gcmd_latency == 0 {
            s.gsts = target;
        } else {
            s.pending = Some((target, s.gcmd_latency - 1));
        }
        // QIE enabled: the queue starts (fetches between head and tail).
        let now_on = target & GlobalStatus::QIES.bits() != 0;
        drop(s);
        if now_on && !qi_was_on {
            // Completes the enable at once for queue purposes.
            self.s.borrow_mut().gsts |= GlobalStatus::QIES.bits();
            self.process();
        }
    }

    fn read_fsts(&self) -> u32 {
        let s = self.s.borrow();
        let n = s.frcd.len();
        let pending = (0..n)
            .map(|k| (s.next_fault + k) % n)
            .find(|&i| s.frcd[i].1 & F != 0);
        let mut v = s.fsts;
        if let Some(i) = pending {
            v |= FaultStatus::PPF.bits() | (i as u32) << 8;
        }
        v
    }

    fn queue_geometry(&self) -> (u64, bool, u32) {
        let iqa = InvQueueAddress::decode(self.s.borrow().iqa);
        (iqa.base, iqa.wide_descriptors, iqa.entries() as u32)
    }

    /// Processes descriptors from IQH to IQT until done, stalled or stopped by an error.
    fn process(&self) {
        let errors = (FaultStatus::IQE | FaultStatus::ITE | FaultStatus::ICE).bits();
        loop {
            let (base, wide, entries) = self.queue_geometry();
            let (head, tail, stop) = {
                let s = self.s.borrow();
                let on = s.gsts & GlobalStatus::QIES.bits() != 0;
                (s.iqh, s.iqt, !on || s.stall || s.fsts & errors != 0)
            };
            if stop || head == tail {
                return;
            }
            let size = if wide { 32 } else { 16 };
            let pa = base + head as u64 * size;
            let d = Processed {
                lo: self.mem.read(pa),
                hi: self.mem.read(pa + 8),
                upper: if wide {
                    [self.mem.read(pa + 16), self.mem.read(pa + 24)]
                } else {
                    [0, 0]
                },
            };
            match self.execute(&d, wide) {
                Ok(()) => {
                    let mut s = self.s.borrow_mut();
                    s.processed.push(d);
                    s.iqh = (head + 1) % entries;
                }
                Err(Stop::Iqe) => {
                    let mut s = self.s.borrow_mut();
                    s.fsts |= FaultStatus::IQE.bits();
                    s.iqercd = (s.iqercd & !0xf) | FAKE_IQEI as u64;
                    return;
                }
                Err(Stop::Ite(sid)) => {
                    let mut s = self.s.borrow_mut();
                    s.fsts |= FaultStatus::ITE.bits();
                    s.iqercd = (s.iqercd & !(0xffff << 32)) | (sid as u64) << 32;
                    // The wait is dropped, not completed.
                    s.iqh = (head + 1) % entries;
                    return;
                }
            }
        }
    }

    fn execute(&self, d: &Processed, wide: bool) -> Result<(), Stop> {
        let kind = d.kind();
        if self.s.borrow().reject_kinds.contains(&kind) {
            return Err(Stop::Iqe);
        }
        if d.upper != [0, 0] {
            return Err(Stop::Iqe);
        }
        let g = (d.lo >> 4) & 3;
        match kind {
            1 => ok_if(g != 0 && d.hi == 0),
            2 => {
                let reserved_lo = 0xffff_ffff_0000_f100;
                let am = (d.hi & 0x3f) as u8;
                ok_if(g != 0 && d.lo & reserved_lo == 0 && (g != 3 || am <= self.cap().mamv()))
            }
            // Device-TLB invalidations are reserved descriptor types without ECAP.DT.
            3 => ok_if(self.ecap().dt()),
            4 => Ok(()),
            5 => {
                let (iflag, sw) = (d.lo & 1 << 4 != 0, d.lo & 1 << 5 != 0);
                if iflag == sw {
                    // Neither is invalid; both trips QEMU: reject either way.
                    return Err(Stop::Iqe);
                }
                if let Some(sid) = self.s.borrow_mut().ite_next_wait.take() {
                    return Err(Stop::Ite(sid));
                }
                if sw && !self.mem.hw_write32(d.hi & !3, (d.lo >> 32) as u32) {
                    return Err(Stop::Iqe);
                }
                if iflag {
                    self.s.borrow_mut().ics |= 1;
                }
                Ok(())
            }
            // PASID-based descriptors exist only in the 256-bit form.
            6 => ok_if(wide && (g == 2 || g == 3)),
            7 => ok_if(self.ecap().smts() && g != 2),
            8 => ok_if(wide && self.ecap().dt()),
            _ => Err(Stop::Iqe),
        }
    }

    fn in_iotlb_block(&self, off: usize) -> Option<bool> {
        let e = self.ecap();
        if off == e.iva_offset() {
            Some(false)
        } else if off == e.iotlb_offset() {
            Some(true)
        } else {
            None
        }
    }

    fn fault_register(&self, off: usize) -> Option<(usize, usize)> {
        let cap = self.cap();
        let start = cap.fro();
        let end = start + 16 * cap.nfr() as usize;
        (off >= start && off < end).then(|| ((off - start) / 16, (off - start) % 16))
    }
}

enum Stop {
    Iqe,
    Ite(u16),
}

fn ok_if(ok: bool) -> Result<(), Stop> {
    if ok { Ok(()) } else { Err(Stop::Iqe) }
}

impl Mmio for &FakeVtd<'_> {
    fn read32(&self, off: usize) -> u32 {
        match off {
            offset::VER => self.s.borrow().ver,
            offset::GSTS => self.read_gsts(),
            offset::FSTS => self.read_fsts(),
            offset::ICS => self.s.borrow().ics,
            offset::FECTL => 1 << 31,
            _ => match self.fault_register(off & !7) {
                Some((i, within)) => {
                    let (lo, hi) = self.s.borrow().frcd[i];
                    let word = if within < 8 { lo } else { hi };
                    (word >> ((off % 8) * 8)) as u32
                }
                None => 0,
            },
        }
    }

    fn write32(&self, off: usize, value: u32) {
        match off {
            offset::GCMD => self.write_gcmd(value),
            offset::FSTS => {
                let resume = {
                    let mut s = self.s.borrow_mut();
                    let clear = value & FaultStatus::W1C.bits();
                    let queue = (FaultStatus::IQE | FaultStatus::ITE | FaultStatus::ICE).bits();
                    let resume = s.fsts & clear & queue != 0;
                    s.fsts &= !clear;
                    resume
                };
                if resume {
                    self.process();
                }
            }
            offset::ICS => self.s.borrow_mut().ics &= !value,
            _ => {
                if let Some((i, 12)) = self.fault_register(off)
                    && value & (1 << 31) != 0
                {
                    self.s.borrow_mut().frcd[i].1 &= !F;
                }
            }
        }
    }

    fn read64(&self, off: usize) -> u64 {
        let s = self.s.borrow();
        let wide = InvQueueAddress::decode(s.iqa).wide_descriptors;
        match off {
            offset::CAP => s.cap,
            offset::ECAP => s.ecap,
            offset::RTADDR => s.rtaddr,
            offset::CCMD => s.ccmd,
            offset::IQH => super::regs::iq_pointer(s.iqh as usize, wide),
            offset::IQT => super::regs::iq_pointer(s.iqt as usize, wide),
            offset::IQA => s.iqa,
            offset::IQERCD => s.iqercd,
            _ => {
                drop(s);
                if let Some(is_iotlb) = self.in_iotlb_block(off) {
                    let s = self.s.borrow();
                    return if is_iotlb { s.iotlb } else { s.iva };
                }
                match self.fault_register(off) {
                    Some((i, 0)) => self.s.borrow().frcd[i].0,
                    Some((i, 8)) => self.s.borrow().frcd[i].1,
                    _ => 0,
                }
            }
        }
    }

    fn write64(&self, off: usize, value: u64) {
        match off {
            offset::RTADDR => self.s.borrow_mut().rtaddr = value,
            offset::CCMD => {
                let mut s = self.s.borrow_mut();
                if value & 1 << 63 == 0 {
                    return;
                }
                if s.gsts & GlobalStatus::QIES.bits() != 0 {
                    // Ignored, as QEMU does: ICC stays set.
                    s.reg_inv_while_qi += 1;
                    s.ccmd = value;
                    return;
                }
                s.ccmd_log.push(value);
                let caig = if s.reject_register {
                    0
                } else {
                    (value >> 61) & 3
                };
                s.ccmd = (value & !(1 << 63) & !(3 << 59)) | caig << 59;
            }
            offset::IQT => {
                {
                    let mut s = self.s.borrow_mut();
                    let wide = InvQueueAddress::decode(s.iqa).wide_descriptors;
                    s.iqt = super::regs::iq_index(value, wide) as u32;
                }
                self.process();
            }
            offset::IQA => self.s.borrow_mut().iqa = value,
            _ => {
                if let Some(is_iotlb) = self.in_iotlb_block(off) {
                    let mut s = self.s.borrow_mut();
                    if !is_iotlb {
                        s.iva = value;
                        return;
                    }
                    if value & 1 << 63 == 0 {
                        return;
                    }
                    if s.gsts & GlobalStatus::QIES.bits() != 0 {
                        s.reg_inv_while_qi += 1;
                        s.iotlb = value;
                        return;
                    }
                    let iva = s.iva;
                    s.iotlb_log.push((value, iva));
                    let iaig = if s.reject_register {
                        0
                    } else {
                        (value >> 60) & 3
                    };
                    s.iotlb = (value & !(1 << 63) & !(3 << 57)) | iaig << 57;
                    return;
                }
                if let Some((i, 8)) = self.fault_register(off)
                    && value & F != 0
                {
                    self.s.borrow_mut().frcd[i].1 &= !F;
                }
            }
        }
    }
}

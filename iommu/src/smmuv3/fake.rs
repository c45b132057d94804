//! Test fakes: [`FakeMem`], a `TableMemory` over a pool of recording atomics with fake
//! physical addresses; and [`FakeSmmu`], an SMMUv3 register model.
//!
//! Every 64-bit store the driver (or the page-table engine) makes into the pool can be recorded,
//! in one sequence with the commands the fake SMMU consumes ([`start_log`] / [`take_log`]), so
//! tests can replay STE updates store by store and see where the syncs fell.
//!
//! The register model follows the specification (and QEMU where the specification leaves
//! room): 32-bit registers panic on 64-bit access; CR0 shows in CR0ACK after a configurable
//! number of CR0ACK reads; GBPA updates complete at once; commands are consumed on CMDQ_PROD
//! writes; CMD_SYNC completes when consumed; an illegal command stops the queue with
//! CMDQ_CONS.ERR = CERROR_ILL and GERROR.CMDQ_ERR until GERRORN acknowledges it; tests inject
//! event records (and overflow) into the event queue.

use core::cell::RefCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};
use std::boxed::Box;
use std::sync::Mutex;
use std::vec::Vec;

use super::cmdq::{Command, op};
use super::regs::{Gerror, QUEUE_OVERFLOW, offset};
use crate::hw::Mmio;
use crate::pgtable::sync::PteAtomic;
use crate::pgtable::{PhysAddr, TableMemory};

/// Fake physical address of frame 0.
pub const POOL_BASE: u64 = 0x4000_0000;

// ---------------------------------------------------------------------------------------------
// The store/command log
// ---------------------------------------------------------------------------------------------

/// One recorded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// A 64-bit store (or atomic read-modify-write) into the pool: address and new value.
    Store { pa: u64, value: u64 },
    /// A command the fake SMMU consumed.
    Command(Command),
}

struct Log {
    base: usize,
    words: usize,
    items: Vec<Item>,
}

std::thread_local! {
    static LOG: RefCell<Option<Log>> = const { RefCell::new(None) };
}

fn log_item(item: Item) {
    LOG.with(|l| {
        if let Some(log) = l.borrow_mut().as_mut() {
            log.items.push(item);
        }
    });
}

/// Starts recording, on this thread, stores into `mem` and commands consumed by any fake SMMU.
pub fn start_log(mem: &FakeMem) {
    LOG.with(|l| {
        *l.borrow_mut() = Some(Log {
            base: mem.storage.as_ptr() as usize,
            words: mem.storage.len(),
            items: Vec::new(),
        })
    });
}

/// Stops recording and returns what was recorded.
pub fn take_log() -> Vec<Item> {
    LOG.with(|l| {
        l.borrow_mut()
            .take()
            .map(|log| log.items)
            .unwrap_or_default()
    })
}

/// One table entry of the pool: an `AtomicU64` whose every write is recorded when a log is on.
pub struct Word(AtomicU64);

impl Word {
    fn record(&self, value: u64) {
        let addr = self as *const Word as usize;
        LOG.with(|l| {
            if let Some(log) = l.borrow_mut().as_mut()
                && addr >= log.base
                && addr < log.base + log.words * 8
            {
                let pa = POOL_BASE + (addr - log.base) as u64;
                log.items.push(Item::Store { pa, value });
            }
        });
    }
}

impl PteAtomic for Word {
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order);
        self.record(value);
    }
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        let r = self.0.compare_exchange(current, new, success, failure);
        if r.is_ok() {
            self.record(new);
        }
        r
    }
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        let old = self.0.swap(value, order);
        self.record(value);
        old
    }
    fn fetch_and(&self, value: u64, order: Ordering) -> u64 {
        let old = self.0.fetch_and(value, order);
        self.record(old & value);
        old
    }
    fn fetch_or(&self, value: u64, order: Ordering) -> u64 {
        let old = self.0.fetch_or(value, order);
        self.record(old | value);
        old
    }
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Free,
    Live,
    Retired,
}

/// Memory of 4 KiB frames at fake physical addresses from [`POOL_BASE`]. Multi-frame
/// allocations are naturally aligned runs.
pub struct FakeMem {
    storage: Box<[Word]>,
    frames: Mutex<Vec<Frame>>,
    pub cleans: Mutex<Vec<(u64, usize)>>,
    pub allocs: AtomicU64,
    pub frees: AtomicU64,
    pub retires: AtomicU64,
    /// Allocations fail while set.
    pub fail_allocs: AtomicBool,
}

impl FakeMem {
    pub fn new(frames: usize) -> Self {
        FakeMem {
            storage: (0..frames * 512).map(|_| Word(AtomicU64::new(0))).collect(),
            frames: Mutex::new(std::vec![Frame::Free; frames]),
            cleans: Mutex::new(Vec::new()),
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            retires: AtomicU64::new(0),
            fail_allocs: AtomicBool::new(false),
        }
    }

    fn word(&self, pa: u64) -> Option<&AtomicU64> {
        if pa < POOL_BASE || !pa.is_multiple_of(8) {
            return None;
        }
        self.storage
            .get(((pa - POOL_BASE) / 8) as usize)
            .map(|w| &w.0)
    }

    fn frame(pa: u64) -> usize {
        ((pa - POOL_BASE) >> 12) as usize
    }

    /// A raw read, as the hardware does it (any frame state); `None` outside the pool.
    pub fn try_read(&self, pa: u64) -> Option<u64> {
        self.word(pa).map(|w| w.load(Relaxed))
    }

    /// A raw read; 0 outside the pool.
    pub fn read(&self, pa: u64) -> u64 {
        self.try_read(pa).unwrap_or(0)
    }

    /// A raw hardware write (not recorded). False outside the pool.
    pub fn hw_write(&self, pa: u64, value: u64) -> bool {
        match self.word(pa) {
            Some(w) => {
                w.store(value, Relaxed);
                true
            }
            None => false,
        }
    }

    pub fn live_frames(&self) -> usize {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| **f == Frame::Live)
            .count()
    }

    pub fn is_live(&self, pa: u64) -> bool {
        self.frames.lock().unwrap()[Self::frame(pa)] == Frame::Live
    }

    pub fn take_cleans(&self) -> Vec<(u64, usize)> {
        core::mem::take(&mut *self.cleans.lock().unwrap())
    }

    /// Whether `[pa, pa + bytes)` lies inside one recorded clean.
    pub fn cleaned(cleans: &[(u64, usize)], pa: u64, bytes: usize) -> bool {
        cleans
            .iter()
            .any(|&(c, n)| c <= pa && pa + bytes as u64 <= c + n as u64)
    }

    fn release(&self, pa: PhysAddr, bytes: usize, to: Frame) {
        let mut frames = self.frames.lock().unwrap();
        let first = Self::frame(pa);
        for f in &mut frames[first..first + bytes.div_ceil(4096)] {
            assert_eq!(*f, Frame::Live, "release of a frame not live: {pa:#x}");
            *f = to;
        }
    }
}

impl TableMemory for FakeMem {
    type Entry = Word;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        assert!(
            bytes >= 4096 && bytes.is_power_of_two(),
            "bad table size {bytes}"
        );
        if self.fail_allocs.load(Relaxed) {
            return None;
        }
        let n = bytes / 4096;
        let mut frames = self.frames.lock().unwrap();
        let first = (0..frames.len()).step_by(n).find(|&i| {
            i + n <= frames.len() && frames[i..i + n].iter().all(|f| *f == Frame::Free)
        })?;
        for f in &mut frames[first..first + n] {
            *f = Frame::Live;
        }
        for w in &self.storage[first * 512..(first + n) * 512] {
            w.0.store(0, Relaxed);
        }
        self.allocs.fetch_add(1, Relaxed);
        Some(POOL_BASE + first as u64 * 4096)
    }

    fn free_table(&self, pa: PhysAddr, bytes: usize) {
        self.release(pa, bytes, Frame::Free);
        self.frees.fetch_add(1, Relaxed);
    }

    fn retire_table(&self, pa: PhysAddr, bytes: usize) {
        self.release(pa, bytes, Frame::Retired);
        self.retires.fetch_add(1, Relaxed);
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[Word] {
        assert_eq!(pa % 8, 0, "misaligned table access at {pa:#x}");
        let first = ((pa - POOL_BASE) / 8) as usize;
        {
            let frames = self.frames.lock().unwrap();
            let last = Self::frame(pa + (entries.max(1) as u64 * 8) - 1);
            for (i, f) in frames[Self::frame(pa)..=last].iter().enumerate() {
                assert_eq!(
                    *f,
                    Frame::Live,
                    "access to a frame not live: {:#x}",
                    pa + i as u64 * 4096
                );
            }
        }
        &self.storage[first..first + entries]
    }

    fn clean(&self, pa: PhysAddr, bytes: usize) {
        self.cleans.lock().unwrap().push((pa, bytes));
    }
}

// ---------------------------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------------------------

/// QEMU 10 `-M virt,iommu=smmuv3` ID registers.
pub const QEMU_IDR0: u32 = 0x0d44_101b;
pub const QEMU_IDR1: u32 = 0x0273_0010;
pub const QEMU_IDR3: u32 = 0x1414;
pub const QEMU_IDR5: u32 = 0x74;

/// The register file's state; tests read and poke it directly.
pub struct Hw {
    /// IDR0-IDR5.
    pub idr: [u32; 6],
    pub cr0: u32,
    pub cr0ack: u32,
    /// CR0ACK reads before a CR0 write shows; `u32::MAX` = never.
    pub cr0_latency: u32,
    cr0_pending: Option<(u32, u32)>,
    pub cr1: u32,
    pub cr2: u32,
    pub gbpa: u32,
    pub irq_ctrl: u32,
    pub gerror: u32,
    pub gerrorn: u32,
    pub strtab_base: u64,
    pub strtab_base_cfg: u32,
    pub cmdq_base: u64,
    pub cmdq_prod: u32,
    pub cmdq_cons: u32,
    pub eventq_base: u64,
    pub eventq_prod: u32,
    pub eventq_cons: u32,
    /// Every register write, in order (offset, value).
    pub writes: Vec<(usize, u32)>,
    /// Commands consumed, in order.
    pub commands: Vec<Command>,
    /// Opcodes rejected with CERROR_ILL (on top of what the model finds illegal).
    pub illegal: Vec<u8>,
    /// The queue consumes nothing (stuck hardware).
    pub stall: bool,
    /// CMDQ_PROD writes seen.
    pub prod_writes: u32,
}

/// An SMMUv3 register file over a [`FakeMem`].
pub struct FakeSmmu<'m> {
    pub mem: &'m FakeMem,
    pub s: Mutex<Hw>,
}

const CMDQEN: u32 = 1 << 3;
const EVENTQEN: u32 = 1 << 2;
const SMMUEN: u32 = 1;

impl<'m> FakeSmmu<'m> {
    pub fn new(mem: &'m FakeMem, idr: [u32; 6]) -> Self {
        FakeSmmu {
            mem,
            s: Mutex::new(Hw {
                idr,
                cr0: 0,
                cr0ack: 0,
                cr0_latency: 2,
                cr0_pending: None,
                cr1: 0,
                cr2: 0,
                // QEMU's reset value: SHCFG = use incoming, ABORT = 0.
                gbpa: 0x1000,
                irq_ctrl: 0,
                gerror: 0,
                gerrorn: 0,
                strtab_base: 0,
                strtab_base_cfg: 0,
                cmdq_base: 0,
                cmdq_prod: 0,
                cmdq_cons: 0,
                eventq_base: 0,
                eventq_prod: 0,
                eventq_cons: 0,
                writes: Vec::new(),
                commands: Vec::new(),
                illegal: Vec::new(),
                stall: false,
                prod_writes: 0,
            }),
        }
    }

    /// QEMU 10's SMMU.
    pub fn qemu(mem: &'m FakeMem) -> Self {
        Self::new(mem, [QEMU_IDR0, QEMU_IDR1, 0, QEMU_IDR3, 0, QEMU_IDR5])
    }

    pub fn hw(&self) -> std::sync::MutexGuard<'_, Hw> {
        self.s.lock().unwrap()
    }

    /// Commands consumed so far, drained.
    pub fn take_commands(&self) -> Vec<Command> {
        core::mem::take(&mut self.hw().commands)
    }

    /// Lets a stalled queue run again.
    pub fn unstall(&self) {
        self.hw().stall = false;
        self.consume();
    }

    /// Toggles GERROR bits (raises global errors).
    pub fn raise_gerror(&self, bits: u32) {
        self.hw().gerror ^= bits;
    }

    /// Writes an event record as the SMMU does: at EVENTQ_PROD, then advances PROD. A full
    /// queue drops it and flags the overflow (toggling PROD.OVFLG, unless an overflow is
    /// already unacknowledged). Returns whether it was written.
    pub fn inject_event(&self, record: [u64; 4]) -> bool {
        let mut s = self.hw();
        if s.cr0 & EVENTQEN == 0 {
            return false;
        }
        let log2 = (s.eventq_base & 0x1f) as u32;
        let base = s.eventq_base & 0x000f_ffff_ffff_ffe0;
        let mask = (2u32 << log2) - 1;
        let (prod, cons) = (s.eventq_prod & mask, s.eventq_cons & mask);
        if prod.wrapping_sub(cons) & mask == 1 << log2 {
            if s.eventq_prod & QUEUE_OVERFLOW == s.eventq_cons & QUEUE_OVERFLOW {
                s.eventq_prod ^= QUEUE_OVERFLOW;
            }
            return false;
        }
        let slot = base + ((prod & ((1 << log2) - 1)) as u64) * 32;
        for (i, &w) in record.iter().enumerate() {
            assert!(self.mem.hw_write(slot + 8 * i as u64, w));
        }
        s.eventq_prod = (s.eventq_prod & QUEUE_OVERFLOW) | ((prod + 1) & mask);
        true
    }

    fn is_32bit(off: usize) -> bool {
        let wide = [
            offset::GERROR_IRQ_CFG0,
            offset::STRTAB_BASE,
            offset::CMDQ_BASE,
            offset::EVENTQ_BASE,
            offset::EVENTQ_IRQ_CFG0,
            offset::PRIQ_BASE,
            offset::PRIQ_IRQ_CFG0,
            offset::GATOS_SID,
            offset::GATOS_ADDR,
            offset::GATOS_PAR,
        ];
        !wide.contains(&off)
    }

    /// Processes commands from CMDQ_CONS to CMDQ_PROD until done, stalled or stopped by an
    /// error.
    fn consume(&self) {
        loop {
            let mut s = self.hw();
            let log2 = (s.cmdq_base & 0x1f) as u32;
            let base = s.cmdq_base & 0x000f_ffff_ffff_ffe0;
            let mask = (2u32 << log2) - 1;
            let err_active = Gerror::active(s.gerror, s.gerrorn).contains(Gerror::CMDQ_ERR);
            let cons = s.cmdq_cons & mask;
            if s.cr0 & CMDQEN == 0 || s.stall || err_active || cons == s.cmdq_prod & mask {
                return;
            }
            let slot = base + ((cons & ((1 << log2) - 1)) as u64) * 16;
            let cmd = Command([self.mem.read(slot), self.mem.read(slot + 8)]);
            if !self.legal(&s, &cmd) {
                // CERROR_ILL: CONS stays on the command, ERR says why.
                s.cmdq_cons = (s.cmdq_cons & mask) | 1 << 24;
                s.gerror ^= Gerror::CMDQ_ERR.bits();
                return;
            }
            s.commands.push(cmd);
            log_item(Item::Command(cmd));
            // Like QEMU, keep the ERR field as it was: it means something only with CMDQ_ERR.
            s.cmdq_cons = (s.cmdq_cons & !mask) | ((cons + 1) & mask);
        }
    }

    fn legal(&self, s: &Hw, cmd: &Command) -> bool {
        let (idr0, idr3) = (s.idr[0], s.idr[3]);
        let (s1p, s2p, hyp) = (idr0 & 2 != 0, idr0 & 1 != 0, idr0 & 1 << 9 != 0);
        let ril = idr3 & 1 << 10 != 0;
        let opcode = cmd.opcode();
        if s.illegal.contains(&opcode) {
            return false;
        }
        let range_ok = ril || cmd.range().tg == 0;
        let ranged_ok = cmd.range().tg != 0 || (cmd.range() == Default::default());
        match opcode {
            op::SYNC => cmd.0[0] >> 12 & 3 != 3,
            op::PREFETCH_CONFIG | op::CFGI_STE | op::CFGI_STE_RANGE => true,
            op::CFGI_CD | op::CFGI_CD_ALL => s1p,
            op::TLBI_NH_ALL | op::TLBI_NH_ASID => s1p,
            op::TLBI_NH_VA | op::TLBI_NH_VAA => s1p && range_ok && ranged_ok,
            op::TLBI_EL2_ALL | op::TLBI_EL2_ASID => hyp,
            op::TLBI_EL2_VA | op::TLBI_EL2_VAA => hyp && range_ok && ranged_ok,
            op::TLBI_S12_VMALL => s2p,
            op::TLBI_S2_IPA => s2p && range_ok && ranged_ok,
            op::TLBI_NSNH_ALL => true,
            _ => false,
        }
    }

    fn read_cr0ack(&self) -> u32 {
        let mut s = self.hw();
        if let Some((v, left)) = s.cr0_pending {
            if left == 0 {
                s.cr0ack = v;
                s.cr0_pending = None;
            } else if left != u32::MAX {
                s.cr0_pending = Some((v, left - 1));
            }
        }
        s.cr0ack
    }
}

impl Mmio for &FakeSmmu<'_> {
    fn read32(&self, off: usize) -> u32 {
        if off == offset::CR0ACK {
            return self.read_cr0ack();
        }
        let s = self.hw();
        match off {
            0x00..=0x14 => s.idr[off / 4],
            offset::IIDR => 0,
            offset::AIDR => 1,
            offset::CR0 => s.cr0,
            offset::CR1 => s.cr1,
            offset::CR2 => s.cr2,
            offset::STATUSR => 0,
            offset::GBPA => s.gbpa,
            offset::IRQ_CTRL | offset::IRQ_CTRLACK => s.irq_ctrl,
            offset::GERROR => s.gerror,
            offset::GERRORN => s.gerrorn,
            o if o == offset::STRTAB_BASE => s.strtab_base as u32,
            o if o == offset::STRTAB_BASE + 4 => (s.strtab_base >> 32) as u32,
            offset::STRTAB_BASE_CFG => s.strtab_base_cfg,
            o if o == offset::CMDQ_BASE => s.cmdq_base as u32,
            o if o == offset::CMDQ_BASE + 4 => (s.cmdq_base >> 32) as u32,
            offset::CMDQ_PROD => s.cmdq_prod,
            offset::CMDQ_CONS => s.cmdq_cons,
            o if o == offset::EVENTQ_BASE => s.eventq_base as u32,
            o if o == offset::EVENTQ_BASE + 4 => (s.eventq_base >> 32) as u32,
            offset::EVENTQ_PROD => s.eventq_prod,
            offset::EVENTQ_CONS => s.eventq_cons,
            _ => panic!("unexpected 32-bit read at {off:#x}"),
        }
    }

    fn write32(&self, off: usize, value: u32) {
        let mut s = self.hw();
        s.writes.push((off, value));
        let lo = |r: &mut u64, v: u32| *r = (*r & !0xffff_ffff) | v as u64;
        let hi = |r: &mut u64, v: u32| *r = (*r & 0xffff_ffff) | (v as u64) << 32;
        match off {
            offset::CR0 => {
                // Queue enables: reading starts at the programmed indexes.
                s.cr0 = value;
                if s.cr0_latency == 0 {
                    s.cr0ack = value;
                } else {
                    s.cr0_pending = Some((value, s.cr0_latency - 1));
                }
                drop(s);
                self.consume();
            }
            offset::CR1 | offset::CR2 => {
                assert_eq!(
                    s.cr0 & (SMMUEN | CMDQEN | EVENTQEN),
                    0,
                    "CR1/CR2 written while enabled"
                );
                if off == offset::CR1 {
                    s.cr1 = value;
                } else {
                    s.cr2 = value;
                }
            }
            offset::GBPA => {
                if value & 1 << 31 != 0 {
                    s.gbpa = value & !(1 << 31);
                }
            }
            offset::IRQ_CTRL => s.irq_ctrl = value,
            offset::GERRORN => {
                s.gerrorn = value;
                drop(s);
                // Acknowledging CMDQ_ERR lets the queue resume (QEMU does the same).
                self.consume();
            }
            o if o == offset::STRTAB_BASE || o == offset::STRTAB_BASE + 4 => {
                assert_eq!(s.cr0 & SMMUEN, 0, "STRTAB_BASE written while enabled");
                if o == offset::STRTAB_BASE {
                    lo(&mut s.strtab_base, value)
                } else {
                    hi(&mut s.strtab_base, value)
                }
            }
            offset::STRTAB_BASE_CFG => {
                assert_eq!(s.cr0 & SMMUEN, 0, "STRTAB_BASE_CFG written while enabled");
                s.strtab_base_cfg = value;
            }
            o if o == offset::CMDQ_BASE || o == offset::CMDQ_BASE + 4 => {
                assert_eq!(s.cr0 & CMDQEN, 0, "CMDQ_BASE written while enabled");
                if o == offset::CMDQ_BASE {
                    lo(&mut s.cmdq_base, value)
                } else {
                    hi(&mut s.cmdq_base, value)
                }
            }
            offset::CMDQ_PROD => {
                s.cmdq_prod = value;
                s.prod_writes += 1;
                drop(s);
                self.consume();
            }
            offset::CMDQ_CONS => {
                assert_eq!(s.cr0 & CMDQEN, 0, "CMDQ_CONS written while enabled");
                s.cmdq_cons = value;
            }
            o if o == offset::EVENTQ_BASE || o == offset::EVENTQ_BASE + 4 => {
                assert_eq!(s.cr0 & EVENTQEN, 0, "EVENTQ_BASE written while enabled");
                if o == offset::EVENTQ_BASE {
                    lo(&mut s.eventq_base, value)
                } else {
                    hi(&mut s.eventq_base, value)
                }
            }
            offset::EVENTQ_PROD => s.eventq_prod = value,
            offset::EVENTQ_CONS => s.eventq_cons = value,
            _ => panic!("unexpected 32-bit write {value:#x} at {off:#x}"),
        }
    }

    fn read64(&self, off: usize) -> u64 {
        if FakeSmmu::is_32bit(off) {
            panic!("64-bit read of a 32-bit register at {off:#x}");
        }
        panic!("64-bit read at {off:#x}: the driver must use 32-bit halves");
    }

    fn write64(&self, off: usize, value: u64) {
        if FakeSmmu::is_32bit(off) {
            panic!("64-bit write {value:#x} to a 32-bit register at {off:#x}");
        }
        panic!("64-bit write {value:#x} at {off:#x}: the driver must use 32-bit halves");
    }
}

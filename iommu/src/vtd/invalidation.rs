//! Cache invalidation: the queued-invalidation descriptors (VT-d 4.1 §6.5.2), the queue itself
//! (IQA/IQH/IQT, §11.4.21-23), its error recovery (§6.5.2.10), and the register-based fallback
//! (CCMD and IOTLB registers, §6.5.1).
//!
//! Every wait is a poll loop bounded by the unit's poll budget; every error the hardware can
//! report becomes a [`VtdError`].

use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::error::{QueueError, VtdError};
use super::mem::VtdMemory;
use super::regs::{
    ContextCommand, FaultStatus, InvQueueError, IotlbCommand, iq_index, iq_pointer, iva_value,
    offset,
};
use crate::hw::Mmio;
use crate::queue_lock::{QueueGuard, QueueLock};

/// Descriptor type codes: bits 3:0 of the first word, with bits 11:9 holding type bits 6:4
/// (all zero for the types defined so far).
pub mod kind {
    /// Context-cache invalidate (§6.5.2.1).
    pub const CONTEXT_CACHE: u8 = 0x1;
    /// IOTLB invalidate (§6.5.2.3).
    pub const IOTLB: u8 = 0x2;
    /// Device-TLB invalidate (§6.5.2.5).
    pub const DEVICE_TLB: u8 = 0x3;
    /// Interrupt-entry-cache invalidate (§6.5.2.7).
    pub const INTERRUPT_ENTRY_CACHE: u8 = 0x4;
    /// Invalidation wait (§6.5.2.8).
    pub const WAIT: u8 = 0x5;
    /// PASID-based IOTLB invalidate (§6.5.2.4).
    pub const PASID_IOTLB: u8 = 0x6;
    /// PASID-cache invalidate (§6.5.2.2).
    pub const PASID_CACHE: u8 = 0x7;
    /// PASID-based device-TLB invalidate (§6.5.2.6).
    pub const PASID_DEVICE_TLB: u8 = 0x8;
}

const ADDR: u64 = !0xfff;

/// Read/write draining requested with IOTLB invalidations (DR bit 7, DW bit 6 of the IOTLB
/// descriptor; use when CAP.DRD/DWD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drain {
    pub reads: bool,
    pub writes: bool,
}

impl Drain {
    const fn bits(self) -> u64 {
        (self.reads as u64) << 7 | (self.writes as u64) << 6
    }
}

/// PASID-cache invalidation granularity, bits 5:4 (§6.5.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidCacheScope {
    /// 00b: every PASID entry cached with the domain id.
    Domain = 0,
    /// 01b: the entry of one PASID within the domain.
    Pasid = 1,
    /// 11b: everything.
    Global = 3,
}

/// One invalidation descriptor. The 128-bit layout (`lo` = bits 63:0, `hi` = bits 127:64);
/// in a queue of 256-bit descriptors (IQA.DW = 1) the upper 128 bits are zero for every type
/// the driver issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub lo: u64,
    pub hi: u64,
}

impl Descriptor {
    /// The descriptor type: bits 3:0, plus bits 11:9 as type bits 6:4.
    pub const fn kind(self) -> u8 {
        ((self.lo & 0xf) | ((self.lo >> 9) & 7) << 4) as u8
    }

    /// Context-cache invalidate, global (G = 01b). Layout: type 3:0, G 5:4, DID 31:16,
    /// SID 47:32, FM 49:48.
    pub const fn context_global() -> Self {
        Descriptor {
            lo: kind::CONTEXT_CACHE as u64 | 1 << 4,
            hi: 0,
        }
    }

    /// Context-cache invalidate, domain-selective (G = 10b).
    pub const fn context_domain(did: u16) -> Self {
        Descriptor {
            lo: kind::CONTEXT_CACHE as u64 | 2 << 4 | (did as u64) << 16,
            hi: 0,
        }
    }

    /// Context-cache invalidate, device-selective (G = 11b): the entry of `sid` cached with
    /// `did`; `function_mask` (FM) masks low function-number bits.
    pub const fn context_device(did: u16, sid: u16, function_mask: u8) -> Self {
        Descriptor {
            lo: kind::CONTEXT_CACHE as u64
                | 3 << 4
                | (did as u64) << 16
                | (sid as u64) << 32
                | ((function_mask & 3) as u64) << 48,
            hi: 0,
        }
    }

    /// IOTLB invalidate, global (G = 01b). Layout: type 3:0, G 5:4, DW 6, DR 7, DID 31:16;
    /// high word: AM 5:0, IH 6, ADDR 63:12.
    pub const fn iotlb_global(drain: Drain) -> Self {
        Descriptor {
            lo: kind::IOTLB as u64 | 1 << 4 | drain.bits(),
            hi: 0,
        }
    }

    /// IOTLB invalidate, domain-selective (G = 10b): every translation and paging-structure
    /// cache entry tagged with `did`.
    pub const fn iotlb_domain(did: u16, drain: Drain) -> Self {
        Descriptor {
            lo: kind::IOTLB as u64 | 2 << 4 | drain.bits() | (did as u64) << 16,
            hi: 0,
        }
    }

    /// IOTLB invalidate, page-selective within domain (G = 11b, CAP.PSI): the 2^`am` pages at
    /// `addr` (aligned to that size, `am` ≤ CAP.MAMV). `leaf_only` sets IH: only leaf entries
    /// changed, so paging-structure caches may be kept.
    pub const fn iotlb_page(did: u16, addr: u64, am: u8, leaf_only: bool, drain: Drain) -> Self {
        Descriptor {
            lo: kind::IOTLB as u64 | 3 << 4 | drain.bits() | (did as u64) << 16,
            hi: (addr & ADDR) | (leaf_only as u64) << 6 | (am & 0x3f) as u64,
        }
    }

    /// Device-TLB invalidate (ATS): type 3:0, PFSID[3:0] 15:12, MIP 20:16, SID 47:32,
    /// PFSID[15:4] 63:52; high word: S 0, ADDR 63:12 (with S, the low address bits encode the
    /// size as in PCIe ATS).
    pub const fn device_tlb(sid: u16, pfsid: u16, mip: u8, addr: u64, size: bool) -> Self {
        Descriptor {
            lo: kind::DEVICE_TLB as u64
                | ((pfsid & 0xf) as u64) << 12
                | ((mip & 0x1f) as u64) << 16
                | (sid as u64) << 32
                | ((pfsid >> 4) as u64) << 52,
            hi: (addr & ADDR) | size as u64,
        }
    }

    /// Interrupt-entry-cache invalidate, global (G = 0, bit 4).
    pub const fn iec_global() -> Self {
        Descriptor {
            lo: kind::INTERRUPT_ENTRY_CACHE as u64,
            hi: 0,
        }
    }

    /// Interrupt-entry-cache invalidate, index-selective (G = 1): 2^`index_mask` entries from
    /// `index`. Layout: G 4, IM 31:27, IIDX 47:32.
    pub const fn iec_index(index: u16, index_mask: u8) -> Self {
        Descriptor {
            lo: kind::INTERRUPT_ENTRY_CACHE as u64
                | 1 << 4
                | ((index_mask & 0x1f) as u64) << 27
                | (index as u64) << 32,
            hi: 0,
        }
    }

    /// Invalidation wait with status write (SW = 1, bit 5): when every earlier descriptor has
    /// completed, the hardware writes `data` to the dword at `status_addr`. `fence` (FN, bit 6)
    /// holds later descriptors until this one completes. Layout: IF 4, SW 5, FN 6, PD 7,
    /// status data 63:32; high word: status address 63:2.
    pub const fn wait(status_addr: u64, data: u32, fence: bool) -> Self {
        Descriptor {
            lo: kind::WAIT as u64 | 1 << 5 | (fence as u64) << 6 | (data as u64) << 32,
            hi: status_addr & !3,
        }
    }

    /// Invalidation wait with interrupt (IF = 1, bit 4): sets ICS.IWC on completion.
    pub const fn wait_interrupt(fence: bool) -> Self {
        Descriptor {
            lo: kind::WAIT as u64 | 1 << 4 | (fence as u64) << 6,
            hi: 0,
        }
    }

    /// PASID-based IOTLB invalidate, every (non-global) entry of `pasid` in `did` (G = 10b).
    /// Layout: type 3:0, G 5:4, DID 31:16, PASID 51:32; high word: AM 5:0, IH 6, ADDR 63:12.
    pub const fn pasid_iotlb_all(did: u16, pasid: u32) -> Self {
        Descriptor {
            lo: kind::PASID_IOTLB as u64
                | 2 << 4
                | (did as u64) << 16
                | ((pasid & 0xf_ffff) as u64) << 32,
            hi: 0,
        }
    }

    /// PASID-based IOTLB invalidate, page-selective within PASID (G = 11b).
    pub const fn pasid_iotlb_page(
        did: u16,
        pasid: u32,
        addr: u64,
        am: u8,
        leaf_only: bool,
    ) -> Self {
        Descriptor {
            lo: kind::PASID_IOTLB as u64
                | 3 << 4
                | (did as u64) << 16
                | ((pasid & 0xf_ffff) as u64) << 32,
            hi: (addr & ADDR) | (leaf_only as u64) << 6 | (am & 0x3f) as u64,
        }
    }

    /// PASID-cache invalidate. Layout: type 3:0, G 5:4, DID 31:16, PASID 51:32.
    pub const fn pasid_cache(scope: PasidCacheScope, did: u16, pasid: u32) -> Self {
        Descriptor {
            lo: kind::PASID_CACHE as u64
                | (scope as u64) << 4
                | (did as u64) << 16
                | ((pasid & 0xf_ffff) as u64) << 32,
            hi: 0,
        }
    }

    /// PASID-based device-TLB invalidate: type 3:0, MIP 8:4, PFSID[3:0] 15:12, SID 31:16,
    /// PASID 51:32, PFSID[15:4] 63:52; high word: G 0 (all PASIDs of the device), S 11,
    /// ADDR 63:12.
    pub const fn pasid_device_tlb(
        sid: u16,
        pfsid: u16,
        mip: u8,
        pasid: u32,
        addr: u64,
        size: bool,
        global: bool,
    ) -> Self {
        Descriptor {
            lo: kind::PASID_DEVICE_TLB as u64
                | ((mip & 0x1f) as u64) << 4
                | ((pfsid & 0xf) as u64) << 12
                | (sid as u64) << 16
                | ((pasid & 0xf_ffff) as u64) << 32
                | ((pfsid >> 4) as u64) << 52,
            hi: (addr & ADDR) | (size as u64) << 11 | global as u64,
        }
    }
}

/// The invalidations the driver asks for, independent of how they are carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    ContextGlobal,
    ContextDevice {
        did: u16,
        sid: u16,
    },
    IotlbGlobal,
    IotlbDomain {
        did: u16,
    },
    IotlbPages {
        did: u16,
        addr: u64,
        am: u8,
        leaf_only: bool,
    },
    PasidCacheGlobal,
    PasidCachePasid {
        did: u16,
        pasid: u32,
    },
    PasidIotlbAll {
        did: u16,
        pasid: u32,
    },
    PasidIotlbPages {
        did: u16,
        pasid: u32,
        addr: u64,
        am: u8,
        leaf_only: bool,
    },
    /// Device-TLB invalidation (0x3) of requests without PASID from `sid`: the 2^`am` pages at
    /// `addr`, everything when `am` ≥ 52. The device is its own physical function (PFSID =
    /// SID) and MIP is 0.
    DeviceTlb {
        sid: u16,
        addr: u64,
        am: u8,
    },
    /// Interrupt-entry-cache invalidation (0x4, §6.5.2.7): every entry (`None`), or the
    /// 2^`mask` entries from `index` (`Some((index, mask))`). Queue only: there is no
    /// register-based form, and a unit with IR has QI.
    InterruptEntryCache {
        index: Option<(u16, u8)>,
    },
    /// PASID-based device-TLB invalidation (0x8) of `pasid` from `sid`, same range rules.
    PasidDeviceTlb {
        sid: u16,
        pasid: u32,
        addr: u64,
        am: u8,
    },
    /// A wait descriptor with FN = 1 (status write to a scratch dword): the descriptors after
    /// it are processed only once every descriptor before it has completed (§6.5.2.8). Put
    /// between IOTLB and device-TLB invalidations, so that a device cannot refill its TLB from
    /// a stale IOTLB entry. Nothing on the register path (which is synchronous).
    Fence,
}

/// The ATS invalidation address for the naturally aligned block of 2^`am` pages at `addr`
/// (PCIe ATS "Invalidate Request": with S = 1 the range size is 2^(13 + n) bytes, n being the
/// number of 1s in the address from bit 12 up to the lowest 0). Returns (ADDR, S). `am` ≥ 52
/// means the whole 64-bit space: bits 62:12 set, bit 63 clear.
pub(crate) fn ats_range(addr: u64, am: u8) -> (u64, bool) {
    match am {
        0 => (addr & ADDR, false),
        1..=51 => {
            let base = addr & ADDR & !((1u64 << (12 + am as u32)) - 1);
            (base | (((1u64 << (am - 1)) - 1) << 12), true)
        }
        _ => (0x7fff_ffff_ffff_f000, true),
    }
}

/// Event counters, updated from `&self` paths (map/unmap run concurrently).
#[derive(Default)]
pub(crate) struct Stats {
    pub qi_descriptors: AtomicU64,
    pub qi_waits: AtomicU64,
    pub register_invalidations: AtomicU64,
    pub iotlb_psi: AtomicU64,
    pub iotlb_dsi: AtomicU64,
    pub iotlb_global: AtomicU64,
    pub context_invalidations: AtomicU64,
    pub pasid_cache_invalidations: AtomicU64,
    pub pasid_iotlb_invalidations: AtomicU64,
    pub write_buffer_flushes: AtomicU64,
    pub queue_errors: AtomicU64,
    pub device_tlb_invalidations: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    // Relaxed: statistics.
    c.fetch_add(1, Ordering::Relaxed);
}

/// Offsets in the status page: the wait status dword, and a scratch dword that replacement
/// descriptors write after a queue error.
const STATUS_OFFSET: u64 = 0;
const SCRATCH_OFFSET: u64 = 8;

/// The invalidation queue: one 4 KiB page of descriptors, plus a page whose first dword the
/// wait descriptors write.
pub(crate) struct Queue {
    pub base: u64,
    pub status_page: u64,
    /// 256-bit descriptors (IQA.DW = 1): needed in scalable mode, where PASID-based
    /// descriptors exist only in the 256-bit form.
    pub wide: bool,
    pub entries: u32,
    /// Next free slot (software's copy of IQT).
    tail: AtomicU32,
    /// Status data of the last wait descriptor submitted.
    seq: AtomicU32,
}

impl Queue {
    pub fn new(base: u64, status_page: u64, wide: bool) -> Self {
        Queue {
            base,
            status_page,
            wide,
            entries: if wide { 4096 / 32 } else { 4096 / 16 },
            tail: AtomicU32::new(0),
            seq: AtomicU32::new(0),
        }
    }

    fn slot_pa(&self, index: u32) -> u64 {
        self.base + index as u64 * if self.wide { 32 } else { 16 }
    }

    fn desc_bytes(&self) -> usize {
        if self.wide { 32 } else { 16 }
    }
}

/// How invalidations reach the hardware.
pub(crate) enum Path {
    /// Queued invalidation (ECAP.QI).
    Queued(Queue),
    /// Register-based: CCMD and the IOTLB register block at ECAP.IRO.
    Register { iva: usize, iotlb: usize },
}

/// Invalidation engine of one unit. A small lock serialises submitters: the queue tail, the
/// wait sequence and the two-register IVA/IOTLB sequence are shared state, and `unmap` runs on
/// many CPUs at once. The lock is held for one batch including its wait, so the queue is idle
/// whenever it is free; taking it is bounded by the poll budget like every other wait.
pub(crate) struct Invalidator {
    pub path: Path,
    pub drain: Drain,
    /// ECAP.C: descriptors need no cache cleaning.
    pub coherent: bool,
    pub budget: u32,
    lock: QueueLock,
}

impl Invalidator {
    pub fn new(path: Path, drain: Drain, coherent: bool, budget: u32) -> Self {
        Invalidator {
            path,
            drain,
            coherent,
            budget,
            lock: QueueLock::new(),
        }
    }

    /// Takes the lock. The holder may legitimately keep it for a whole batch (a space wait, the
    /// completion wait and an error recovery, each up to `budget` polls), so a waiter spins up
    /// to four budgets before giving up.
    pub fn lock(&self) -> Result<QueueGuard<'_>, VtdError> {
        self.lock
            .lock(self.budget.max(1).saturating_mul(4))
            .ok_or(VtdError::Timeout {
                what: "invalidation lock",
            })
    }

    /// Carries out `ops` and waits for their completion. With queued invalidation that is one
    /// descriptor per op followed by one wait descriptor; register-based, one register command
    /// per op, each polled to completion. An empty `ops` does nothing.
    pub fn run<M: Mmio, T: VtdMemory>(
        &self,
        mmio: &M,
        mem: &T,
        ops: &[Op],
        stats: &Stats,
    ) -> Result<(), VtdError> {
        if ops.is_empty() {
            return Ok(());
        }
        for op in ops {
            count(op, stats);
        }
        let _guard = self.lock()?;
        match &self.path {
            Path::Queued(q) => self.submit(q, mmio, mem, ops, stats),
            Path::Register { iva, iotlb } => {
                for op in ops {
                    bump(&stats.register_invalidations);
                    self.register_op(mmio, *iva, *iotlb, *op)?;
                }
                Ok(())
            }
        }
    }

    fn descriptor(&self, q: &Queue, op: Op) -> Descriptor {
        match op {
            Op::ContextGlobal => Descriptor::context_global(),
            Op::ContextDevice { did, sid } => Descriptor::context_device(did, sid, 0),
            Op::IotlbGlobal => Descriptor::iotlb_global(self.drain),
            Op::IotlbDomain { did } => Descriptor::iotlb_domain(did, self.drain),
            Op::IotlbPages {
                did,
                addr,
                am,
                leaf_only,
            } => Descriptor::iotlb_page(did, addr, am, leaf_only, self.drain),
            Op::PasidCacheGlobal => Descriptor::pasid_cache(PasidCacheScope::Global, 0, 0),
            Op::PasidCachePasid { did, pasid } => {
                Descriptor::pasid_cache(PasidCacheScope::Pasid, did, pasid)
            }
            Op::PasidIotlbAll { did, pasid } => Descriptor::pasid_iotlb_all(did, pasid),
            Op::PasidIotlbPages {
                did,
                pasid,
                addr,
                am,
                leaf_only,
            } => Descriptor::pasid_iotlb_page(did, pasid, addr, am, leaf_only),
            Op::DeviceTlb { sid, addr, am } => {
                let (addr, size) = ats_range(addr, am);
                Descriptor::device_tlb(sid, sid, 0, addr, size)
            }
            Op::PasidDeviceTlb {
                sid,
                pasid,
                addr,
                am,
            } => {
                let (addr, size) = ats_range(addr, am);
                Descriptor::pasid_device_tlb(sid, sid, 0, pasid, addr, size, false)
            }
            Op::InterruptEntryCache { index: None } => Descriptor::iec_global(),
            Op::InterruptEntryCache {
                index: Some((index, mask)),
            } => Descriptor::iec_index(index, mask),
            Op::Fence => Descriptor::wait(q.status_page + SCRATCH_OFFSET, 0, true),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Queued invalidation
    // -----------------------------------------------------------------------------------------

    fn write_desc<T: VtdMemory>(&self, q: &Queue, mem: &T, index: u32, d: Descriptor) {
        Self::put_desc(q, mem.table(q.base, 512), index, d);
    }

    /// [`write_desc`](Self::write_desc) into the queue page `queue` (from `mem.table(q.base,
    /// 512)`, looked up once per batch).
    fn put_desc(q: &Queue, queue: &[AtomicU64], index: u32, d: Descriptor) {
        let slot = (q.slot_pa(index) - q.base) as usize / 8;
        let page = &queue[slot..];
        // The hardware reads a slot only after the IQT write that hands it over, which is
        // ordered after these stores (fence in `submit`): no atomicity or ordering is needed
        // between the words of one descriptor.
        page[0].store(d.lo, Ordering::Relaxed);
        page[1].store(d.hi, Ordering::Relaxed);
        if q.wide {
            page[2].store(0, Ordering::Relaxed);
            page[3].store(0, Ordering::Relaxed);
        }
    }

    fn clean_slots<T: VtdMemory>(&self, q: &Queue, mem: &T, first: u32, count: u32) {
        if self.coherent || count == 0 {
            return;
        }
        // The run may wrap around the end of the queue page.
        let until_end = (q.entries - first).min(count);
        mem.clean(q.slot_pa(first), until_end as usize * q.desc_bytes());
        if count > until_end {
            mem.clean(q.base, (count - until_end) as usize * q.desc_bytes());
        }
    }

    fn hw_head<M: Mmio>(&self, q: &Queue, mmio: &M) -> u32 {
        // A hostile value is reduced to a slot index by masking, never trusted as a count.
        (iq_index(mmio.read64(offset::IQH), q.wide) as u32) % q.entries
    }

    /// Waits until `needed` slots are free after `tail`; returns how many are.
    fn wait_space<M: Mmio>(
        &self,
        q: &Queue,
        mmio: &M,
        tail: u32,
        needed: u32,
    ) -> Result<u32, VtdError> {
        for _ in 0..self.budget.max(1) {
            let head = self.hw_head(q, mmio);
            // One slot stays empty: head == tail means empty, never full.
            let free = (head + q.entries - tail - 1) % q.entries;
            if free >= needed {
                return Ok(free);
            }
            spin_loop();
        }
        Err(VtdError::Timeout {
            what: "invalidation queue space",
        })
    }

    fn submit<M: Mmio, T: VtdMemory>(
        &self,
        q: &Queue,
        mmio: &M,
        mem: &T,
        ops: &[Op],
        stats: &Stats,
    ) -> Result<(), VtdError> {
        // Relaxed: the lock orders these with the previous holder.
        let first = q.tail.load(Ordering::Relaxed) % q.entries;
        let mut tail = first;
        let mut written = 0;
        // The queue page, looked up once for the batch.
        let queue = mem.table(q.base, 512);
        // Free slots known from the last IQH read. They only grow while we hold the lock (the
        // hardware consumes, nobody else produces), so one read covers the whole batch when it
        // fits, which it does on the idle queue every batch starts with (the previous holder
        // waited for its batch to complete).
        let mut room = 0;
        for op in ops {
            // Room for this descriptor and the closing wait.
            if room < 2 {
                room = self.wait_space(q, mmio, tail, 2)?;
            }
            Self::put_desc(q, queue, tail, self.descriptor(q, *op));
            tail = (tail + 1) % q.entries;
            written += 1;
            room -= 1;
        }
        // Relaxed: a statistic.
        stats
            .qi_descriptors
            .fetch_add(written as u64, Ordering::Relaxed);
        // A fresh, non-zero status value per batch: a late write from an earlier, timed-out
        // wait can never be mistaken for this one's.
        let mut seq = q.seq.load(Ordering::Relaxed).wrapping_add(1);
        if seq == 0 {
            seq = 1;
        }
        q.seq.store(seq, Ordering::Relaxed);
        if room < 1 {
            self.wait_space(q, mmio, tail, 1)?;
        }
        let status_pa = q.status_page + STATUS_OFFSET;
        Self::put_desc(q, queue, tail, Descriptor::wait(status_pa, seq, false));
        tail = (tail + 1) % q.entries;
        written += 1;
        self.clean_slots(q, mem, first, written);
        // The descriptors must be in memory before the hardware is told to fetch them.
        fence(Ordering::SeqCst);
        q.tail.store(tail, Ordering::Relaxed);
        mmio.write64(offset::IQT, iq_pointer(tail as usize, q.wide));
        bump(&stats.qi_waits);

        // The status word, looked up once for the poll. The hardware writes the dword at
        // offset 0, the low half of the first word.
        let status = &mem.table(q.status_page, 512)[(STATUS_OFFSET / 8) as usize];
        for _ in 0..self.budget.max(1) {
            // Acquire: as `load64`; the `dma_rmb` below orders what the caller reads next.
            if status.load(Ordering::Acquire) as u32 == seq {
                // The status write is the device's last write for this batch; whatever the
                // caller reads next that the hardware wrote (or stopped writing) is read after it.
                mmio.dma_rmb();
                return Ok(());
            }
            let fsts = FaultStatus::from_bits_retain(mmio.read32(offset::FSTS));
            if fsts.intersects(QUEUE_ERRORS) {
                return Err(self.recover(q, mmio, mem, stats));
            }
            crate::queue_lock::count_wait_poll();
            spin_loop();
        }
        Err(VtdError::Timeout {
            what: "invalidation wait",
        })
    }

    /// Handles IQE/ITE/ICE (§6.5.2.10) and drains the queue: reports the first error after the
    /// hardware has consumed everything queued, so the next batch starts on an idle queue.
    fn recover<M: Mmio, T: VtdMemory>(
        &self,
        q: &Queue,
        mmio: &M,
        mem: &T,
        stats: &Stats,
    ) -> VtdError {
        let tail = q.tail.load(Ordering::Relaxed);
        let mut first: Option<QueueError> = None;
        for _ in 0..self.budget.max(1) {
            let fsts = FaultStatus::from_bits_retain(mmio.read32(offset::FSTS));
            if fsts.intersects(QUEUE_ERRORS) {
                let e = self.clear_error(q, mmio, mem, fsts);
                bump(&stats.queue_errors);
                first.get_or_insert(e);
                continue;
            }
            if self.hw_head(q, mmio) == tail {
                break;
            }
            spin_loop();
        }
        match first {
            Some(error) if self.hw_head(q, mmio) == tail => {
                VtdError::InvalidationQueueError { error }
            }
            _ => VtdError::Timeout {
                what: "invalidation queue recovery",
            },
        }
    }

    fn clear_error<M: Mmio, T: VtdMemory>(
        &self,
        q: &Queue,
        mmio: &M,
        mem: &T,
        fsts: FaultStatus,
    ) -> QueueError {
        let record = InvQueueError(mmio.read64(offset::IQERCD));
        if fsts.contains(FaultStatus::IQE) {
            // The hardware stopped at IQH, on the descriptor it rejected, and fetches it again
            // once IQE is cleared. Replace it with a wait that writes a scratch dword: valid on
            // every implementation, and it leaves the real status word alone.
            let head = self.hw_head(q, mmio);
            let scratch = q.status_page + SCRATCH_OFFSET;
            self.write_desc(q, mem, head, Descriptor::wait(scratch, 0, false));
            self.clean_slots(q, mem, head, 1);
            fence(Ordering::SeqCst);
            mmio.write32(offset::FSTS, FaultStatus::IQE.bits());
            QueueError::Iqe {
                iqei: record.iqei(),
                index: head as u16,
            }
        } else if fsts.contains(FaultStatus::ITE) {
            // The hardware dropped the pending waits and resumes at IQH when ITE is cleared.
            mmio.write32(offset::FSTS, FaultStatus::ITE.bits());
            QueueError::Ite {
                sid: record.itesid(),
            }
        } else {
            mmio.write32(offset::FSTS, FaultStatus::ICE.bits());
            QueueError::Ice {
                sid: record.icesid(),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Register-based invalidation
    // -----------------------------------------------------------------------------------------

    fn register_op<M: Mmio>(
        &self,
        mmio: &M,
        iva: usize,
        iotlb: usize,
        op: Op,
    ) -> Result<(), VtdError> {
        match op {
            Op::ContextGlobal | Op::ContextDevice { .. } => {
                let cmd = match op {
                    Op::ContextDevice { did, sid } => ContextCommand::device(did, sid, 0),
                    _ => ContextCommand::global(),
                };
                mmio.write64(offset::CCMD, cmd.0);
                let done = self.poll64(mmio, offset::CCMD, |v| !ContextCommand(v).icc(), "CCMD")?;
                if ContextCommand(done).caig() == 0 {
                    return Err(VtdError::InvalidationRejected {
                        what: "context-cache",
                    });
                }
                Ok(())
            }
            Op::IotlbGlobal | Op::IotlbDomain { .. } | Op::IotlbPages { .. } => {
                let cmd = match op {
                    Op::IotlbDomain { did } => IotlbCommand::domain(did),
                    Op::IotlbPages {
                        did,
                        addr,
                        am,
                        leaf_only,
                    } => {
                        // IVA first: the IOTLB register write starts the invalidation.
                        mmio.write64(iva, iva_value(addr, am, leaf_only));
                        IotlbCommand::page(did)
                    }
                    _ => IotlbCommand::global(),
                }
                .with_drain(self.drain.reads, self.drain.writes);
                mmio.write64(iotlb, cmd.0);
                let done =
                    self.poll64(mmio, iotlb, |v| !IotlbCommand(v).ivt(), "IOTLB register")?;
                if IotlbCommand(done).iaig() == 0 {
                    return Err(VtdError::InvalidationRejected { what: "IOTLB" });
                }
                Ok(())
            }
            // Register invalidations complete before the next one starts.
            Op::Fence => Ok(()),
            // PASID caches exist only in scalable mode, which the driver runs with queued
            // invalidation only; device-TLB invalidations exist only as queue descriptors
            // (attach refuses a device TLB without ECAP.QI).
            Op::PasidCacheGlobal
            | Op::PasidCachePasid { .. }
            | Op::PasidIotlbAll { .. }
            | Op::PasidIotlbPages { .. } => Err(VtdError::ModeUnsupported),
            Op::DeviceTlb { .. } | Op::PasidDeviceTlb { .. } => Err(VtdError::DeviceTlbUnsupported),
            Op::InterruptEntryCache { .. } => Err(VtdError::ModeUnsupported),
        }
    }

    fn poll64<M: Mmio>(
        &self,
        mmio: &M,
        off: usize,
        done: impl Fn(u64) -> bool,
        what: &'static str,
    ) -> Result<u64, VtdError> {
        for _ in 0..self.budget.max(1) {
            let v = mmio.read64(off);
            if done(v) {
                return Ok(v);
            }
            spin_loop();
        }
        Err(VtdError::Timeout { what })
    }
}

const QUEUE_ERRORS: FaultStatus = FaultStatus::IQE
    .union(FaultStatus::ITE)
    .union(FaultStatus::ICE);

fn count(op: &Op, s: &Stats) {
    match op {
        Op::ContextGlobal | Op::ContextDevice { .. } => bump(&s.context_invalidations),
        Op::IotlbGlobal => bump(&s.iotlb_global),
        Op::IotlbDomain { .. } => bump(&s.iotlb_dsi),
        Op::IotlbPages { .. } => bump(&s.iotlb_psi),
        Op::PasidCacheGlobal | Op::PasidCachePasid { .. } => bump(&s.pasid_cache_invalidations),
        Op::PasidIotlbAll { .. } | Op::PasidIotlbPages { .. } => bump(&s.pasid_iotlb_invalidations),
        Op::DeviceTlb { .. } | Op::PasidDeviceTlb { .. } => bump(&s.device_tlb_invalidations),
        Op::Fence | Op::InterruptEntryCache { .. } => {}
    }
}

/// The page-selective parameters covering `[start, end)`: the naturally aligned block of
/// 2^`am` pages that contains both ends (the range rounded out; over-invalidation is safe).
/// Returns `(address, am)`.
pub(crate) fn psi_block(start: u64, end: u64) -> (u64, u8) {
    let first = start >> 12;
    let last = (end.max(start + 1) - 1) >> 12;
    let differ = first ^ last;
    let am = if differ == 0 {
        0
    } else {
        64 - differ.leading_zeros()
    };
    let base = if am >= 64 { 0 } else { (first >> am) << am };
    (base << 12, am as u8)
}

#[cfg(test)]
mod read_barrier_tests {
    use super::*;
    use crate::pgtable::TableMemory;
    use core::cell::{Cell, RefCell};
    use std::vec::Vec;

    const QUEUE: u64 = 0x1000;
    const STATUS: u64 = 0x2000;

    /// The queue page and the status page, as atomics.
    struct Pages(Vec<AtomicU64>);

    impl TableMemory for Pages {
        type Entry = AtomicU64;
        fn alloc_table(&self, _: usize) -> Option<u64> {
            unreachable!()
        }
        fn free_table(&self, _: u64, _: usize) {
            unreachable!()
        }
        fn retire_table(&self, _: u64, _: usize) {
            unreachable!()
        }
        fn table(&self, pa: u64, entries: usize) -> &[AtomicU64] {
            &self.0[((pa - QUEUE) / 8) as usize..][..entries]
        }
    }

    impl VtdMemory for Pages {
        fn store128(&self, _: u64, _: u64, _: u64) {
            unreachable!()
        }
    }

    /// Completes a batch at the IQT write the way the hardware does: it executes the wait
    /// descriptor just before the new tail (VT-d 4.1 §6.5.2.8, hand-decoded: type 5 in bits 3:0,
    /// SW bit 5, status data in 63:32, status address in the high qword 63:2) by writing the
    /// status data, and moves IQH to the tail. Logs the register writes and read barriers.
    struct Hw<'a> {
        pages: &'a Pages,
        head: Cell<u64>,
        log: RefCell<Vec<&'static str>>,
    }

    impl Mmio for Hw<'_> {
        fn read32(&self, offset: usize) -> u32 {
            assert_eq!(offset, offset::FSTS);
            0
        }
        fn write32(&self, _: usize, _: u32) {
            unreachable!()
        }
        fn read64(&self, offset: usize) -> u64 {
            assert_eq!(offset, offset::IQH);
            self.head.get()
        }
        fn write64(&self, offset: usize, value: u64) {
            assert_eq!(offset, offset::IQT);
            self.log.borrow_mut().push("IQT");
            // 128-bit descriptors: the tail index is IQT bits 18:4.
            let tail = (value >> 4) & 0x7fff;
            let wait = (tail + 255) % 256;
            let lo = self.pages.0[(wait * 2) as usize].load(Ordering::Relaxed);
            let hi = self.pages.0[(wait * 2 + 1) as usize].load(Ordering::Relaxed);
            assert_eq!(lo & 0xf, 5, "the batch ends with a wait descriptor");
            assert_ne!(lo & 1 << 5, 0, "status write requested");
            let status = self.pages.table(hi & !3, 1);
            status[0].store(lo >> 32, Ordering::Relaxed);
            self.head.set(value);
        }
        fn dma_rmb(&self) {
            self.log.borrow_mut().push("rmb");
        }
    }

    /// Once the wait's status write is seen, the driver issues the read-side DMA barrier before
    /// returning, so whatever its caller reads next is ordered after the device's completion.
    #[test]
    fn completion_is_followed_by_a_dma_read_barrier() {
        let pages = Pages((0..1024).map(|_| AtomicU64::new(0)).collect());
        let hw = Hw {
            pages: &pages,
            head: Cell::new(0),
            log: RefCell::new(Vec::new()),
        };
        let inv = Invalidator::new(
            Path::Queued(Queue::new(QUEUE, STATUS, false)),
            Drain::default(),
            true,
            100,
        );
        let stats = Stats::default();
        inv.run(&hw, &pages, &[Op::IotlbGlobal], &stats).unwrap();
        assert_eq!(*hw.log.borrow(), ["IQT", "rmb"]);
        inv.run(&hw, &pages, &[Op::ContextGlobal], &stats).unwrap();
        assert_eq!(*hw.log.borrow(), ["IQT", "rmb", "IQT", "rmb"]);
    }
}

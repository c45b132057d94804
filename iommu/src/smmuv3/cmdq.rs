//! Commands (IHI 0070 §4) and the command queue (§3.5, §4.1, registers §6.3.26-6.3.28), with
//! the command error recovery of §7.1.
//!
//! # Concurrency
//!
//! Several CPUs may submit at once (`map`/`unmap` run on many CPUs). Submitters are serialised
//! by a **spin lock** (`crate::queue_lock`, shared with the VT-d invalidation queue: one
//! `AtomicBool`, no allocation, acquisition bounded like every other wait):
//! the holder writes its commands, publishes them with one CMDQ_PROD write (more when the batch
//! is larger than the free space), and keeps the lock until its closing CMD_SYNC has been
//! consumed. So the queue is idle whenever the lock is free, a submitter's completion test is
//! simply "CONS has caught up with my PROD", and an error always belongs to a batch whose owner
//! is waiting for it. Lock-free slot reservation would let submitters overlap their waits; with
//! batches of a few commands and one SYNC each, the serialisation costs one SYNC round trip per
//! batch, which is the floor anyway.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::error::SmmuError;
use super::regs::{Gerror, cmdq_cons_err, cmdq_error_name, offset};
use crate::hw::Mmio;
use crate::pgtable::TableMemory;
use crate::pgtable::sync::PteAtomic;
use crate::queue_lock::{QueueGuard, QueueLock};

/// Bytes in one command.
pub const CMD_BYTES: usize = 16;

/// Command opcodes, bits 7:0 of the first word (§4.1.1).
pub mod op {
    pub const PREFETCH_CONFIG: u8 = 0x01;
    pub const PREFETCH_ADDR: u8 = 0x02;
    pub const CFGI_STE: u8 = 0x03;
    /// Also CMD_CFGI_ALL (Range = 31).
    pub const CFGI_STE_RANGE: u8 = 0x04;
    pub const CFGI_CD: u8 = 0x05;
    pub const CFGI_CD_ALL: u8 = 0x06;
    pub const CFGI_VMS_PIDM: u8 = 0x07;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_EL3_ALL: u8 = 0x18;
    pub const TLBI_EL3_VA: u8 = 0x1a;
    pub const TLBI_EL2_ALL: u8 = 0x20;
    pub const TLBI_EL2_ASID: u8 = 0x21;
    pub const TLBI_EL2_VA: u8 = 0x22;
    pub const TLBI_EL2_VAA: u8 = 0x23;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2a;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const ATC_INV: u8 = 0x40;
    pub const PRI_RESP: u8 = 0x41;
    pub const RESUME: u8 = 0x44;
    pub const STALL_TERM: u8 = 0x45;
    pub const SYNC: u8 = 0x46;
}

/// The name of an opcode, as the specification spells it.
pub const fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        op::PREFETCH_CONFIG => "CMD_PREFETCH_CONFIG",
        op::PREFETCH_ADDR => "CMD_PREFETCH_ADDR",
        op::CFGI_STE => "CMD_CFGI_STE",
        op::CFGI_STE_RANGE => "CMD_CFGI_STE_RANGE",
        op::CFGI_CD => "CMD_CFGI_CD",
        op::CFGI_CD_ALL => "CMD_CFGI_CD_ALL",
        op::CFGI_VMS_PIDM => "CMD_CFGI_VMS_PIDM",
        op::TLBI_NH_ALL => "CMD_TLBI_NH_ALL",
        op::TLBI_NH_ASID => "CMD_TLBI_NH_ASID",
        op::TLBI_NH_VA => "CMD_TLBI_NH_VA",
        op::TLBI_NH_VAA => "CMD_TLBI_NH_VAA",
        op::TLBI_EL3_ALL => "CMD_TLBI_EL3_ALL",
        op::TLBI_EL3_VA => "CMD_TLBI_EL3_VA",
        op::TLBI_EL2_ALL => "CMD_TLBI_EL2_ALL",
        op::TLBI_EL2_ASID => "CMD_TLBI_EL2_ASID",
        op::TLBI_EL2_VA => "CMD_TLBI_EL2_VA",
        op::TLBI_EL2_VAA => "CMD_TLBI_EL2_VAA",
        op::TLBI_S12_VMALL => "CMD_TLBI_S12_VMALL",
        op::TLBI_S2_IPA => "CMD_TLBI_S2_IPA",
        op::TLBI_NSNH_ALL => "CMD_TLBI_NSNH_ALL",
        op::ATC_INV => "CMD_ATC_INV",
        op::PRI_RESP => "CMD_PRI_RESP",
        op::RESUME => "CMD_RESUME",
        op::STALL_TERM => "CMD_STALL_TERM",
        op::SYNC => "CMD_SYNC",
        _ => "unknown",
    }
}

/// CMD_SYNC completion signal, CS bits 13:12 (§4.7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncSignal {
    /// SIG_NONE: completion is observed as CMDQ_CONS moving past the command.
    None = 0,
    /// SIG_IRQ: an MSI write (MSIAddr/MSIData) or the wired cmd-sync interrupt.
    Irq = 1,
    /// SIG_SEV: a WFE wake-up event to the PEs.
    Sev = 2,
}

/// The range-invalidation fields of the TLBI-by-address commands (§4.4.1, present when
/// IDR3.RIL): the command covers (NUM + 1) × 2^SCALE granules of size TG from its address.
/// TTL is a level hint (0 = no hint). With TG = 0 the command covers one address and NUM,
/// SCALE and TTL must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbiRange {
    /// 0 = not a range; 1 = 4 KiB, 2 = 16 KiB, 3 = 64 KiB.
    pub tg: u8,
    /// 0..=31.
    pub scale: u8,
    /// 0..=31.
    pub num: u8,
    /// 0 = unknown level; 1..=3 = architectural level of the leaves.
    pub ttl: u8,
}

impl TlbiRange {
    /// Not a range: the command names one page.
    pub const NONE: TlbiRange = TlbiRange {
        tg: 0,
        scale: 0,
        num: 0,
        ttl: 0,
    };

    /// One range command covering `[start, end)` with granule 2^`granule_shift` (12, 14 or
    /// 16): the start is rounded down to the granule, and the length up to a multiple of
    /// 2^SCALE granules with NUM + 1 ≤ 32, the smallest SCALE that fits. So the command covers at
    /// most 1/16 more than asked (over-invalidation is harmless) and one command always
    /// suffices: 32 × 2^31 granules span more than any input address size. Returns the address
    /// for the command and the fields. TTL is left 0: the gather reports only the smallest leaf
    /// it cleared, and a TTL naming a wrong level could leave entries at another level
    /// uninvalidated.
    pub const fn covering(start: u64, end: u64, granule_shift: u32) -> (u64, TlbiRange) {
        let base = start >> granule_shift << granule_shift;
        let end = if end > base { end } else { base + 1 };
        let granules = (end - base).div_ceil(1 << granule_shift);
        let mut scale = 0;
        while scale < 31 && granules.div_ceil(1 << scale) > 32 {
            scale += 1;
        }
        let num = granules.div_ceil(1 << scale) - 1;
        let tg = match granule_shift {
            14 => 2,
            16 => 3,
            _ => 1,
        };
        (
            base,
            TlbiRange {
                tg,
                scale: scale as u8,
                num: if num > 31 { 31 } else { num as u8 },
                ttl: 0,
            },
        )
    }

    /// Bytes the range covers (0 when not a range).
    pub const fn bytes(self) -> u64 {
        if self.tg == 0 {
            return 0;
        }
        // TG 1, 2, 3: granules of 2^12, 2^14, 2^16 bytes.
        (self.num as u64 + 1) << (self.scale as u32 + 10 + 2 * self.tg as u32)
    }

    const fn word0(self) -> u64 {
        ((self.num as u64) & 0x1f) << 12 | ((self.scale as u64) & 0x1f) << 20
    }

    const fn word1(self) -> u64 {
        ((self.ttl as u64) & 3) << 8 | ((self.tg as u64) & 3) << 10
    }
}

/// One 16-byte command: `0[0]` holds bits 63:0, `0[1]` bits 127:64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Command(pub [u64; 2]);

impl core::fmt::Debug for Command {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{}({:#018x}, {:#018x})",
            opcode_name(self.opcode()),
            self.0[0],
            self.0[1]
        )
    }
}

const fn sid_field(sid: u32) -> u64 {
    (sid as u64) << 32
}
const fn vmid_field(vmid: u16) -> u64 {
    (vmid as u64) << 32
}
const fn asid_field(asid: u16) -> u64 {
    (asid as u64) << 48
}
/// VA[63:12] in bits 127:76 of the TLBI-by-VA commands.
const VA_MASK: u64 = !0xfff;
/// IPA[51:12] in bits 115:76 of CMD_TLBI_S2_IPA.
const IPA_MASK: u64 = 0x000f_ffff_ffff_f000;

impl Command {
    pub const fn opcode(&self) -> u8 {
        self.0[0] as u8
    }

    /// CMD_PREFETCH_CONFIG (§4.2.1): StreamID 63:32, SSV 11 = 0.
    pub const fn prefetch_config(sid: u32) -> Self {
        Command([op::PREFETCH_CONFIG as u64 | sid_field(sid), 0])
    }

    /// CMD_CFGI_STE (§4.3.1): StreamID 63:32; Leaf (bit 64) = 1 invalidates only the STE,
    /// 0 also a cached level-1 stream table descriptor.
    pub const fn cfgi_ste(sid: u32, leaf: bool) -> Self {
        Command([op::CFGI_STE as u64 | sid_field(sid), leaf as u64])
    }

    /// CMD_CFGI_STE_RANGE (§4.3.2): the 2^(Range+1) STEs of the aligned block holding `sid`;
    /// Range in bits 68:64.
    pub const fn cfgi_ste_range(sid: u32, range: u8) -> Self {
        Command([
            op::CFGI_STE_RANGE as u64 | sid_field(sid),
            (range & 0x1f) as u64,
        ])
    }

    /// CMD_CFGI_ALL (§4.3.3): CFGI_STE_RANGE with Range = 31, every STE and CD.
    pub const fn cfgi_all() -> Self {
        Self::cfgi_ste_range(0, 31)
    }

    /// CMD_CFGI_CD (§4.3.4): the CD of (`sid`, `ssid`); SubstreamID 31:12, Leaf bit 64.
    pub const fn cfgi_cd(sid: u32, ssid: u32, leaf: bool) -> Self {
        Command([
            op::CFGI_CD as u64 | ((ssid & 0xf_ffff) as u64) << 12 | sid_field(sid),
            leaf as u64,
        ])
    }

    /// CMD_CFGI_CD_ALL (§4.3.5): every CD cached for `sid`.
    pub const fn cfgi_cd_all(sid: u32) -> Self {
        Command([op::CFGI_CD_ALL as u64 | sid_field(sid), 0])
    }

    /// CMD_TLBI_NH_ALL (§4.4.2): every non-hyp stage-1 (and combined) entry of `vmid`;
    /// VMID 47:32.
    pub const fn tlbi_nh_all(vmid: u16) -> Self {
        Command([op::TLBI_NH_ALL as u64 | vmid_field(vmid), 0])
    }

    /// CMD_TLBI_NH_ASID (§4.4.3): every entry of (`vmid`, `asid`); ASID 63:48.
    pub const fn tlbi_nh_asid(vmid: u16, asid: u16) -> Self {
        Command([
            op::TLBI_NH_ASID as u64 | vmid_field(vmid) | asid_field(asid),
            0,
        ])
    }

    /// CMD_TLBI_NH_VA (§4.4.4): entries of (`vmid`, `asid`) for `addr` (or the range); Leaf
    /// (bit 64) = 1 spares walk caches. NUM 16:12, SCALE 24:20; TTL 73:72, TG 75:74,
    /// Address 127:76.
    pub const fn tlbi_nh_va(vmid: u16, asid: u16, addr: u64, leaf: bool, r: TlbiRange) -> Self {
        Command([
            op::TLBI_NH_VA as u64 | r.word0() | vmid_field(vmid) | asid_field(asid),
            leaf as u64 | r.word1() | (addr & VA_MASK),
        ])
    }

    /// CMD_TLBI_NH_VAA (§4.4.5): as NH_VA, for every ASID of `vmid`.
    pub const fn tlbi_nh_vaa(vmid: u16, addr: u64, leaf: bool, r: TlbiRange) -> Self {
        Command([
            op::TLBI_NH_VAA as u64 | r.word0() | vmid_field(vmid),
            leaf as u64 | r.word1() | (addr & VA_MASK),
        ])
    }

    /// CMD_TLBI_EL2_ALL (§4.4.8): every EL2 entry (needs IDR0.HYP).
    pub const fn tlbi_el2_all() -> Self {
        Command([op::TLBI_EL2_ALL as u64, 0])
    }

    /// CMD_TLBI_EL2_ASID (§4.4.9).
    pub const fn tlbi_el2_asid(asid: u16) -> Self {
        Command([op::TLBI_EL2_ASID as u64 | asid_field(asid), 0])
    }

    /// CMD_TLBI_EL2_VA (§4.4.10).
    pub const fn tlbi_el2_va(asid: u16, addr: u64, leaf: bool, r: TlbiRange) -> Self {
        Command([
            op::TLBI_EL2_VA as u64 | r.word0() | asid_field(asid),
            leaf as u64 | r.word1() | (addr & VA_MASK),
        ])
    }

    /// CMD_TLBI_S12_VMALL (§4.4.12): every stage-2, stage-1 and combined entry of `vmid`.
    pub const fn tlbi_s12_vmall(vmid: u16) -> Self {
        Command([op::TLBI_S12_VMALL as u64 | vmid_field(vmid), 0])
    }

    /// CMD_TLBI_S2_IPA (§4.4.13): stage-2 entries of `vmid` for `ipa` (or the range); IPA 115:76.
    /// Combined stage-1+2 entries are not required to be invalidated by it.
    pub const fn tlbi_s2_ipa(vmid: u16, ipa: u64, leaf: bool, r: TlbiRange) -> Self {
        Command([
            op::TLBI_S2_IPA as u64 | r.word0() | vmid_field(vmid),
            leaf as u64 | r.word1() | (ipa & IPA_MASK),
        ])
    }

    /// CMD_TLBI_NSNH_ALL (§4.4.14): every non-secure non-hyp entry, all VMIDs.
    pub const fn tlbi_nsnh_all() -> Self {
        Command([op::TLBI_NSNH_ALL as u64, 0])
    }

    /// CMD_SYNC (§4.7.3) with completion signal `cs`: CS 13:12; MSH, MSIAttr, MSIData and
    /// MSIAddr zero (no MSI).
    pub const fn sync_with(cs: SyncSignal) -> Self {
        Command([op::SYNC as u64 | (cs as u64) << 12, 0])
    }

    /// CMD_SYNC with CS = SIG_NONE: the driver polls CMDQ_CONS.
    pub const fn sync() -> Self {
        Self::sync_with(SyncSignal::None)
    }

    // Field decoders, for tests and dumps.

    pub const fn sid(&self) -> u32 {
        (self.0[0] >> 32) as u32
    }
    pub const fn vmid(&self) -> u16 {
        (self.0[0] >> 32) as u16
    }
    pub const fn asid(&self) -> u16 {
        (self.0[0] >> 48) as u16
    }
    pub const fn leaf(&self) -> bool {
        self.0[1] & 1 != 0
    }
    pub const fn addr(&self) -> u64 {
        self.0[1] & VA_MASK
    }
    pub const fn range(&self) -> TlbiRange {
        TlbiRange {
            num: ((self.0[0] >> 12) & 0x1f) as u8,
            scale: ((self.0[0] >> 20) & 0x1f) as u8,
            ttl: ((self.0[1] >> 8) & 3) as u8,
            tg: ((self.0[1] >> 10) & 3) as u8,
        }
    }
}

/// Command counters, updated from `&self` paths.
#[derive(Default)]
pub(crate) struct Stats {
    pub commands: AtomicU64,
    pub syncs: AtomicU64,
    pub tlbi_range: AtomicU64,
    pub tlbi_va: AtomicU64,
    pub tlbi_asid: AtomicU64,
    pub tlbi_vmid: AtomicU64,
    pub tlbi_all: AtomicU64,
    pub cfgi: AtomicU64,
    pub cmdq_errors: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    // Relaxed: statistics.
    c.fetch_add(1, Ordering::Relaxed);
}

/// The [`Stats`] of one batch, added to the unit's counters once at its end: one atomic
/// add per kind of command the batch had, instead of two per command.
#[derive(Default)]
struct Tally {
    commands: u64,
    syncs: u64,
    tlbi_range: u64,
    tlbi_va: u64,
    tlbi_asid: u64,
    tlbi_vmid: u64,
    tlbi_all: u64,
    cfgi: u64,
}

impl Tally {
    fn count(&mut self, cmd: &Command) {
        self.commands += 1;
        match cmd.opcode() {
            op::SYNC => self.syncs += 1,
            op::TLBI_NH_VA
            | op::TLBI_NH_VAA
            | op::TLBI_EL2_VA
            | op::TLBI_EL2_VAA
            | op::TLBI_S2_IPA => {
                if cmd.range().tg != 0 {
                    self.tlbi_range += 1
                } else {
                    self.tlbi_va += 1
                }
            }
            op::TLBI_NH_ASID | op::TLBI_EL2_ASID => self.tlbi_asid += 1,
            op::TLBI_S12_VMALL | op::TLBI_NH_ALL => self.tlbi_vmid += 1,
            op::TLBI_NSNH_ALL | op::TLBI_EL2_ALL | op::TLBI_EL3_ALL => self.tlbi_all += 1,
            op::CFGI_STE | op::CFGI_STE_RANGE | op::CFGI_CD | op::CFGI_CD_ALL => self.cfgi += 1,
            _ => {}
        }
    }

    fn add_to(&self, s: &Stats) {
        for (n, c) in [
            (self.commands, &s.commands),
            (self.syncs, &s.syncs),
            (self.tlbi_range, &s.tlbi_range),
            (self.tlbi_va, &s.tlbi_va),
            (self.tlbi_asid, &s.tlbi_asid),
            (self.tlbi_vmid, &s.tlbi_vmid),
            (self.tlbi_all, &s.tlbi_all),
            (self.cfgi, &s.cfgi),
        ] {
            if n != 0 {
                // Relaxed: statistics.
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// The command queue: 2^`log2` slots of 16 bytes at `base`.
pub(crate) struct CommandQueue {
    pub base: u64,
    pub log2: u8,
    /// The SMMU snoops: slots need no cleaning.
    coherent: bool,
    budget: u32,
    lock: QueueLock,
    /// Software's PROD (index and wrap bit) as last written to CMDQ_PROD; changed only under
    /// the lock.
    prod: AtomicU32,
}

/// One batch under way.
struct Batch {
    /// Next slot to write (index + wrap).
    prod: u32,
    /// What CMDQ_PROD holds.
    published: u32,
    first_error: Option<SmmuError>,
}

impl CommandQueue {
    pub fn new(base: u64, log2: u8, coherent: bool, budget: u32) -> Self {
        CommandQueue {
            base,
            log2,
            coherent,
            budget: budget.max(1),
            lock: QueueLock::new(),
            prod: AtomicU32::new(0),
        }
    }

    pub fn entries(&self) -> u32 {
        1 << self.log2
    }

    /// Bytes of queue memory (at least one page is allocated).
    pub fn bytes(&self) -> usize {
        (CMD_BYTES << self.log2).max(4096)
    }

    /// PROD/CONS counter mask: index bits plus the wrap bit.
    fn counter_mask(&self) -> u32 {
        (2 << self.log2) - 1
    }

    /// Takes the lock. The holder may keep it for a whole batch (space waits, the SYNC wait and
    /// error recoveries, each up to `budget` polls), so a waiter spins up to four budgets.
    pub fn lock(&self) -> Result<QueueGuard<'_>, SmmuError> {
        self.lock
            .lock(self.budget.saturating_mul(4))
            .ok_or(SmmuError::Timeout {
                what: "command queue lock",
            })
    }

    fn write_slot<T: TableMemory + ?Sized>(&self, mem: &T, counter: u32, cmd: Command) {
        self.put_slot(
            mem.table(self.base, self.entries() as usize * 2),
            counter,
            cmd,
        );
    }

    /// [`write_slot`](Self::write_slot) into the queue's words `q` (from `mem.table(base,
    /// 2 * entries)`, looked up once per batch).
    fn put_slot<E: PteAtomic>(&self, q: &[E], counter: u32, cmd: Command) {
        let index = (counter & (self.entries() - 1)) as usize;
        // The SMMU reads a slot only after the CMDQ_PROD write that hands it over, which is
        // ordered after these stores (fence in `publish`): the words need no ordering of their own.
        q[2 * index].store(cmd.0[0], Ordering::Relaxed);
        q[2 * index + 1].store(cmd.0[1], Ordering::Relaxed);
    }

    /// Cleans the slots `[from, to)` (counters; the run may wrap).
    fn clean_slots<T: TableMemory + ?Sized>(&self, mem: &T, from: u32, to: u32) {
        if self.coherent {
            return;
        }
        let n = to.wrapping_sub(from) & self.counter_mask();
        let first = from & (self.entries() - 1);
        let until_end = (self.entries() - first).min(n);
        if until_end != 0 {
            mem.clean(
                self.base + first as u64 * CMD_BYTES as u64,
                until_end as usize * CMD_BYTES,
            );
        }
        if n > until_end {
            mem.clean(self.base, (n - until_end) as usize * CMD_BYTES);
        }
    }

    fn publish<M: Mmio, T: TableMemory + ?Sized>(&self, mmio: &M, mem: &T, b: &mut Batch) {
        if b.published == b.prod {
            return;
        }
        self.clean_slots(mem, b.published, b.prod);
        // The commands must be in memory before the SMMU is told to fetch them. (The kernel's
        // `Mmio` writes order earlier normal-memory stores before the device write as well.)
        fence(Ordering::SeqCst);
        mmio.write32(offset::CMDQ_PROD, b.prod);
        b.published = b.prod;
        self.prod.store(b.prod, Ordering::Relaxed);
    }

    fn cons<M: Mmio>(&self, mmio: &M) -> (u32, u32) {
        let raw = mmio.read32(offset::CMDQ_CONS);
        (raw & self.counter_mask(), raw)
    }

    /// Submits `cmds` followed by a CMD_SYNC (unless the last command is one) and waits until
    /// the SMMU has consumed the SYNC, that is, until every command has completed (§4.7.3).
    ///
    /// A command error (CMDQ_CONS.ERR with GERROR.CMDQ_ERR) is handled as §7.1 allows: the
    /// offending command is overwritten with a CMD_SYNC, GERRORN.CMDQ_ERR is acknowledged, and
    /// the queue resumes; the batch still drains, and the first such error is returned as
    /// [`SmmuError::CommandError`].
    pub fn submit<M: Mmio, T: TableMemory + ?Sized>(
        &self,
        mmio: &M,
        mem: &T,
        cmds: &[Command],
        stats: &Stats,
    ) -> Result<(), SmmuError> {
        let _guard = self.lock()?;
        // Relaxed: the lock orders this with the previous holder.
        let start = self.prod.load(Ordering::Relaxed) & self.counter_mask();
        let mut b = Batch {
            prod: start,
            published: start,
            first_error: None,
        };
        let closing = match cmds.last() {
            Some(c) if c.opcode() == op::SYNC => None,
            _ => Some(Command::sync()),
        };
        let q = mem.table(self.base, self.entries() as usize * 2);
        // Free slots known from the last CMDQ_CONS read. They only grow while we hold the lock
        // (the SMMU consumes, nobody else produces), so one read covers the whole batch when
        // it fits, which it does on the idle queue every batch starts with (the previous
        // holder waited for its closing CMD_SYNC).
        let mut room = 0;
        let mut tally = Tally::default();
        let mut written = Ok(());
        for cmd in cmds.iter().chain(closing.iter()) {
            if room == 0 {
                match self.wait_space(mmio, mem, &mut b, stats) {
                    Ok(free) => room = free,
                    Err(e) => {
                        written = Err(e);
                        break;
                    }
                }
            }
            self.put_slot(q, b.prod, *cmd);
            b.prod = (b.prod + 1) & self.counter_mask();
            room -= 1;
            tally.count(cmd);
        }
        tally.add_to(stats);
        written?;
        self.publish(mmio, mem, &mut b);
        self.wait_drained(mmio, mem, &mut b, stats)?;
        match b.first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for at least one free slot, publishing what is written so far so that the SMMU
    /// can make room; returns how many slots are free.
    fn wait_space<M: Mmio, T: TableMemory + ?Sized>(
        &self,
        mmio: &M,
        mem: &T,
        b: &mut Batch,
        stats: &Stats,
    ) -> Result<u32, SmmuError> {
        for _ in 0..self.budget {
            let (cons, _) = self.cons(mmio);
            // PROD − CONS in counter arithmetic; a hostile CONS beyond PROD reads as "full"
            // (more than `entries` in use), and the wait ends in a timeout, not in an overwrite.
            let used = b.prod.wrapping_sub(cons) & self.counter_mask();
            if used < self.entries() {
                return Ok(self.entries() - used);
            }
            self.publish(mmio, mem, b);
            self.check_error(mmio, mem, b, stats);
            spin_loop();
        }
        Err(SmmuError::Timeout {
            what: "command queue space",
        })
    }

    /// Waits until CMDQ_CONS has caught up with everything published (the closing SYNC was
    /// consumed, so every command before it has completed).
    fn wait_drained<M: Mmio, T: TableMemory + ?Sized>(
        &self,
        mmio: &M,
        mem: &T,
        b: &mut Batch,
        stats: &Stats,
    ) -> Result<(), SmmuError> {
        for _ in 0..self.budget {
            let (cons, _) = self.cons(mmio);
            if cons == b.published {
                return Ok(());
            }
            self.check_error(mmio, mem, b, stats);
            crate::queue_lock::count_wait_poll();
            spin_loop();
        }
        Err(SmmuError::Timeout { what: "CMD_SYNC" })
    }

    /// If GERROR.CMDQ_ERR is active, recovers (see [`recover`](Self::recover)) and records the
    /// error in the batch.
    fn check_error<M: Mmio, T: TableMemory + ?Sized>(
        &self,
        mmio: &M,
        mem: &T,
        b: &mut Batch,
        stats: &Stats,
    ) {
        if let Some(e) = self.recover(mmio, mem, b.published, stats) {
            b.first_error.get_or_insert(e);
        }
    }

    /// The §7.1 recovery, if GERROR.CMDQ_ERR is active: the command at CMDQ_CONS (where the SMMU
    /// stopped) is replaced by a CMD_SYNC, GERRORN.CMDQ_ERR is made equal to GERROR.CMDQ_ERR,
    /// and CMDQ_PROD is written again with `prod` (unchanged) so that an implementation that
    /// looks at the queue only on PROD writes resumes too. Call with the lock held.
    pub fn recover<M: Mmio, T: TableMemory + ?Sized>(
        &self,
        mmio: &M,
        mem: &T,
        prod: u32,
        stats: &Stats,
    ) -> Option<SmmuError> {
        let gerror = mmio.read32(offset::GERROR);
        let gerrorn = mmio.read32(offset::GERRORN);
        if !Gerror::active(gerror, gerrorn).contains(Gerror::CMDQ_ERR) {
            return None;
        }
        let (cons, raw) = self.cons(mmio);
        let kind = cmdq_error_name(cmdq_cons_err(raw));
        let index = cons & (self.entries() - 1);
        self.write_slot(mem, cons, Command::sync());
        self.clean_slots(mem, cons, (cons + 1) & self.counter_mask());
        fence(Ordering::SeqCst);
        let ack = (gerrorn & !Gerror::CMDQ_ERR.bits()) | (gerror & Gerror::CMDQ_ERR.bits());
        mmio.write32(offset::GERRORN, ack);
        mmio.write32(offset::CMDQ_PROD, prod);
        bump(&stats.cmdq_errors);
        Some(SmmuError::CommandError { kind, index })
    }

    /// Software's PROD (for recovery outside a batch).
    pub fn prod(&self) -> u32 {
        self.prod.load(Ordering::Relaxed)
    }
}

//! Event records (IHI 0070 §7.3) and the event queue (§3.5, §7.2; EVENTQ_PROD/CONS in page 1,
//! §6.3.30-6.3.31), with overflow handling and per-StreamID counters.
//!
//! The SMMU writes 32-byte records at EVENTQ_PROD and advances it; software consumes from
//! EVENTQ_CONS. When the queue is full the SMMU drops events and toggles EVENTQ_PROD.OVFLG;
//! software acknowledges by copying it into EVENTQ_CONS.OVACKFLG (§7.2.2). A draining pass does
//! bounded work: at most one queue's worth of records.

use core::fmt;
use core::sync::atomic::{Ordering, fence};

use super::regs::{QUEUE_OVERFLOW, offset};
use crate::hw::Mmio;
use crate::pgtable::TableMemory;
use crate::pgtable::sync::PteAtomic;

/// Bytes in one event record.
pub const EVENT_BYTES: usize = 32;

/// Event type codes, bits 7:0 of the record (§7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// F_UUT (0x01): unsupported upstream transaction.
    UnsupportedUpstream,
    /// C_BAD_STREAMID (0x02): StreamID beyond the stream table, or an invalid level-1
    /// descriptor.
    BadStreamId,
    /// F_STE_FETCH (0x03): abort fetching an STE.
    SteFetch,
    /// C_BAD_STE (0x04): invalid or inconsistent STE.
    BadSte,
    /// F_BAD_ATS_TREQ (0x05).
    BadAtsTreq,
    /// F_STREAM_DISABLED (0x06): non-substream traffic while S1DSS says so, or EATS mismatch.
    StreamDisabled,
    /// F_TRANSL_FORBIDDEN (0x07): translated transaction to a stream that forbids it.
    TranslationForbidden,
    /// C_BAD_SUBSTREAMID (0x08).
    BadSubstreamId,
    /// F_CD_FETCH (0x09): abort fetching a CD.
    CdFetch,
    /// C_BAD_CD (0x0a): invalid or inconsistent CD.
    BadCd,
    /// F_WALK_EABT (0x0b): external abort on a table walk.
    WalkExternalAbort,
    /// F_TRANSLATION (0x10): translation fault.
    Translation,
    /// F_ADDR_SIZE (0x11): address size fault.
    AddressSize,
    /// F_ACCESS (0x12): access flag fault.
    Access,
    /// F_PERMISSION (0x13): permission fault.
    Permission,
    /// F_TLB_CONFLICT (0x20).
    TlbConflict,
    /// F_CFG_CONFLICT (0x21).
    ConfigConflict,
    /// E_PAGE_REQUEST (0x24).
    PageRequest,
    /// F_VMS_FETCH (0x25).
    VmsFetch,
    /// A code this driver does not know.
    Other(u8),
}

impl EventType {
    pub const fn decode(code: u8) -> Self {
        match code {
            0x01 => EventType::UnsupportedUpstream,
            0x02 => EventType::BadStreamId,
            0x03 => EventType::SteFetch,
            0x04 => EventType::BadSte,
            0x05 => EventType::BadAtsTreq,
            0x06 => EventType::StreamDisabled,
            0x07 => EventType::TranslationForbidden,
            0x08 => EventType::BadSubstreamId,
            0x09 => EventType::CdFetch,
            0x0a => EventType::BadCd,
            0x0b => EventType::WalkExternalAbort,
            0x10 => EventType::Translation,
            0x11 => EventType::AddressSize,
            0x12 => EventType::Access,
            0x13 => EventType::Permission,
            0x20 => EventType::TlbConflict,
            0x21 => EventType::ConfigConflict,
            0x24 => EventType::PageRequest,
            0x25 => EventType::VmsFetch,
            c => EventType::Other(c),
        }
    }

    pub const fn code(self) -> u8 {
        match self {
            EventType::UnsupportedUpstream => 0x01,
            EventType::BadStreamId => 0x02,
            EventType::SteFetch => 0x03,
            EventType::BadSte => 0x04,
            EventType::BadAtsTreq => 0x05,
            EventType::StreamDisabled => 0x06,
            EventType::TranslationForbidden => 0x07,
            EventType::BadSubstreamId => 0x08,
            EventType::CdFetch => 0x09,
            EventType::BadCd => 0x0a,
            EventType::WalkExternalAbort => 0x0b,
            EventType::Translation => 0x10,
            EventType::AddressSize => 0x11,
            EventType::Access => 0x12,
            EventType::Permission => 0x13,
            EventType::TlbConflict => 0x20,
            EventType::ConfigConflict => 0x21,
            EventType::PageRequest => 0x24,
            EventType::VmsFetch => 0x25,
            EventType::Other(c) => c,
        }
    }

    /// The specification's name, `F_TRANSLATION` etc.
    pub const fn name(self) -> &'static str {
        match self {
            EventType::UnsupportedUpstream => "F_UUT",
            EventType::BadStreamId => "C_BAD_STREAMID",
            EventType::SteFetch => "F_STE_FETCH",
            EventType::BadSte => "C_BAD_STE",
            EventType::BadAtsTreq => "F_BAD_ATS_TREQ",
            EventType::StreamDisabled => "F_STREAM_DISABLED",
            EventType::TranslationForbidden => "F_TRANSL_FORBIDDEN",
            EventType::BadSubstreamId => "C_BAD_SUBSTREAMID",
            EventType::CdFetch => "F_CD_FETCH",
            EventType::BadCd => "C_BAD_CD",
            EventType::WalkExternalAbort => "F_WALK_EABT",
            EventType::Translation => "F_TRANSLATION",
            EventType::AddressSize => "F_ADDR_SIZE",
            EventType::Access => "F_ACCESS",
            EventType::Permission => "F_PERMISSION",
            EventType::TlbConflict => "F_TLB_CONFLICT",
            EventType::ConfigConflict => "F_CFG_CONFLICT",
            EventType::PageRequest => "E_PAGE_REQUEST",
            EventType::VmsFetch => "F_VMS_FETCH",
            EventType::Other(_) => "EVENT",
        }
    }

    /// The record carries InputAddr, RnW, PnU and InD (the transaction's own attributes).
    pub const fn has_input(self) -> bool {
        matches!(
            self,
            EventType::UnsupportedUpstream
                | EventType::TranslationForbidden
                | EventType::BadAtsTreq
                | EventType::WalkExternalAbort
                | EventType::Translation
                | EventType::AddressSize
                | EventType::Access
                | EventType::Permission
                | EventType::TlbConflict
        )
    }

    /// A translation fault class event (F_TRANSLATION .. F_PERMISSION, F_WALK_EABT): the record
    /// carries S2, CLASS and (with S2) the IPA.
    pub const fn is_walk_fault(self) -> bool {
        matches!(
            self,
            EventType::WalkExternalAbort
                | EventType::Translation
                | EventType::AddressSize
                | EventType::Access
                | EventType::Permission
        )
    }

    /// The record's address field 2 is a FetchAddr (the structure or descriptor whose fetch
    /// aborted) rather than an IPA.
    pub const fn has_fetch_addr(self) -> bool {
        matches!(
            self,
            EventType::SteFetch
                | EventType::CdFetch
                | EventType::WalkExternalAbort
                | EventType::VmsFetch
        )
    }
}

/// CLASS of a translation-related fault (§7.3.12): which access faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultClass {
    /// 0b00: the CD fetch (under nesting, its stage-2 translation).
    Cd,
    /// 0b01: a stage-1 table walk access (its stage-2 translation).
    TableWalk,
    /// 0b10: the input transaction itself.
    Input,
    /// 0b11.
    Reserved,
}

/// One decoded event record.
///
/// Layout (§7.3): word 0: type 7:0, SSV 11, SubstreamID 31:12, StreamID 63:32; word 1: STAG
/// 15:0, Stall 31, PnU 33, InD 34, RnW 35, S2 39, CLASS 41:40; word 2: InputAddr; word 3:
/// IPA\[51:12\] (translation faults with S2 = 1) or FetchAddr\[51:3\] (fetch aborts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventType,
    pub stream_id: u32,
    /// The SubstreamID, when SSV = 1.
    pub substream_id: Option<u32>,
    /// The address the transaction presented (events with [`EventType::has_input`]).
    pub input_addr: u64,
    /// The IPA of a stage-2 fault, or the FetchAddr of a fetch abort; 0 otherwise.
    pub ipa: u64,
    /// RnW: the transaction was a read.
    pub read: bool,
    /// S2: the fault came from stage 2.
    pub stage2: bool,
    /// PnU: the transaction was privileged.
    pub privileged: bool,
    /// InD: the transaction was an instruction fetch.
    pub instruction: bool,
    pub class: FaultClass,
    /// Stall: the transaction is stalled awaiting CMD_RESUME (never with this driver's CDs).
    pub stall: bool,
    /// The record as read.
    pub raw: [u64; 4],
}

impl Event {
    /// Decodes a record. Any 32 bytes decode: unknown codes become [`EventType::Other`].
    pub const fn decode(raw: [u64; 4]) -> Event {
        let kind = EventType::decode(raw[0] as u8);
        let ssv = raw[0] & (1 << 11) != 0;
        let addr2 = if kind.has_fetch_addr() {
            raw[3] & 0x000f_ffff_ffff_fff8
        } else if kind.is_walk_fault() {
            raw[3] & 0x000f_ffff_ffff_f000
        } else {
            0
        };
        Event {
            kind,
            stream_id: (raw[0] >> 32) as u32,
            substream_id: if ssv {
                Some(((raw[0] >> 12) & 0xf_ffff) as u32)
            } else {
                None
            },
            input_addr: raw[2],
            ipa: addr2,
            read: raw[1] & (1 << 35) != 0,
            stage2: raw[1] & (1 << 39) != 0,
            privileged: raw[1] & (1 << 33) != 0,
            instruction: raw[1] & (1 << 34) != 0,
            class: match (raw[1] >> 40) & 3 {
                0 => FaultClass::Cd,
                1 => FaultClass::TableWalk,
                2 => FaultClass::Input,
                _ => FaultClass::Reserved,
            },
            stall: raw[1] & (1 << 31) != 0,
            raw,
        }
    }
}

impl fmt::Display for Event {
    /// `F_TRANSLATION sid=0x28 addr=0xdef0000 read S1`, `F_PERMISSION sid=0x8 addr=0x200000
    /// write S2 ipa=0x200000`, `C_BAD_STE sid=0x10`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            EventType::Other(c) => write!(f, "EVENT({c:#04x})")?,
            k => f.write_str(k.name())?,
        }
        write!(f, " sid={:#x}", self.stream_id)?;
        if let Some(ssid) = self.substream_id {
            write!(f, " ssid={ssid:#x}")?;
        }
        if self.kind.has_input() {
            write!(
                f,
                " addr={:#x} {}",
                self.input_addr,
                if self.read { "read" } else { "write" }
            )?;
            if self.instruction {
                f.write_str(" insn")?;
            }
            if self.privileged {
                f.write_str(" priv")?;
            }
        }
        if self.kind.is_walk_fault() {
            f.write_str(if self.stage2 { " S2" } else { " S1" })?;
            // CLASS says which access stage 2 faulted on; it means nothing for stage 1.
            if self.stage2 {
                match self.class {
                    FaultClass::Cd => f.write_str(" class=CD")?,
                    FaultClass::TableWalk => f.write_str(" class=TT")?,
                    FaultClass::Input | FaultClass::Reserved => {}
                }
            }
        }
        if self.kind.has_fetch_addr() {
            write!(f, " fetch={:#x}", self.ipa)?;
        } else if self.stage2 && self.kind.is_walk_fault() {
            write!(f, " ipa={:#x}", self.ipa)?;
        }
        if let EventType::Other(_) = self.kind {
            write!(
                f,
                " raw=[{:#x} {:#x} {:#x} {:#x}]",
                self.raw[0], self.raw[1], self.raw[2], self.raw[3]
            )?;
        }
        Ok(())
    }
}

/// What one [`poll_events`](super::SmmuUnit::poll_events) call found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventPoll {
    /// Records drained (and passed to the sink).
    pub recorded: u32,
    /// Events were dropped since the last drain: EVENTQ_PROD.OVFLG differed from our
    /// OVACKFLG, or GERROR.EVENTQ_ABT_ERR was active (QEMU 10 reports a full queue that way).
    /// Counted in [`events_lost`](super::SmmuUnit::events_lost), one per occurrence (the SMMU
    /// does not say how many).
    pub overflowed: bool,
    /// Global errors that were active (GERROR ≠ GERRORN) and have been acknowledged, raw
    /// [`Gerror`](super::regs::Gerror) bits.
    pub global_errors: u32,
}

/// StreamIDs whose events are counted individually; events of further StreamIDs share
/// `Counters::events_untracked`.
pub const EVENT_SID_SLOTS: usize = 64;

/// Event counters, fixed size.
#[derive(Clone, Debug)]
pub(crate) struct EventStats {
    sids: [(u32, u64); EVENT_SID_SLOTS],
    used: usize,
    pub untracked: u64,
    pub total: u64,
    pub lost: u64,
    pub global_errors: u64,
}

impl EventStats {
    pub const fn new() -> Self {
        EventStats {
            sids: [(0, 0); EVENT_SID_SLOTS],
            used: 0,
            untracked: 0,
            total: 0,
            lost: 0,
            global_errors: 0,
        }
    }

    pub fn count(&self, sid: u32) -> u64 {
        self.sids[..self.used]
            .iter()
            .find(|s| s.0 == sid)
            .map_or(0, |s| s.1)
    }

    fn bump(&mut self, sid: u32) {
        self.total = self.total.saturating_add(1);
        if let Some(s) = self.sids[..self.used].iter_mut().find(|s| s.0 == sid) {
            s.1 = s.1.saturating_add(1);
        } else if self.used < EVENT_SID_SLOTS {
            self.sids[self.used] = (sid, 1);
            self.used += 1;
        } else {
            self.untracked = self.untracked.saturating_add(1);
        }
    }
}

/// The event queue: 2^`log2` records of 32 bytes at `base`.
pub(crate) struct EventQueue {
    pub base: u64,
    pub log2: u8,
    /// Software's CONS (index + wrap), as last written.
    cons: u32,
    /// The OVACKFLG last written.
    ovack: u32,
}

impl EventQueue {
    pub const fn new(base: u64, log2: u8) -> Self {
        EventQueue {
            base,
            log2,
            cons: 0,
            ovack: 0,
        }
    }

    pub const fn entries(&self) -> u32 {
        1 << self.log2
    }

    /// Bytes of queue memory (at least one page is allocated).
    pub fn bytes(&self) -> usize {
        (EVENT_BYTES << self.log2).max(4096)
    }

    fn counter_mask(&self) -> u32 {
        (2 << self.log2) - 1
    }

    /// Drains up to one queue's worth of records, oldest first, then acknowledges them (and an
    /// overflow) with one EVENTQ_CONS write. Returns (records, overflowed).
    ///
    /// With a non-coherent SMMU the records are read through the CPU's cacheable view; see
    /// `docs/smmuv3.md` (the `TableMemory` interface offers cleaning, not invalidation).
    pub fn drain<M: Mmio, T: TableMemory + ?Sized>(
        &mut self,
        mmio: &M,
        mem: &T,
        stats: &mut EventStats,
        sink: &mut dyn FnMut(&Event),
    ) -> (u32, bool) {
        let prod_raw = mmio.read32(offset::EVENTQ_PROD);
        let prod = prod_raw & self.counter_mask();
        let ovflg = prod_raw & QUEUE_OVERFLOW;
        // The records the SMMU wrote before advancing PROD are read after it: an MMIO read is
        // not an atomic the CPU's acquire fences pair with, so the ordering against the
        // device's DMA writes is the read-side DMA barrier (`dmb oshld` on aarch64).
        mmio.dma_rmb();
        let q = mem.table(self.base, self.entries() as usize * 4);
        let mut cons = self.cons;
        let mut n = 0;
        // A hostile PROD can claim at most one queue's worth.
        while cons != prod && n < self.entries() {
            let i = (cons & (self.entries() - 1)) as usize * 4;
            let raw = [
                q[i].load(Ordering::Relaxed),
                q[i + 1].load(Ordering::Relaxed),
                q[i + 2].load(Ordering::Relaxed),
                q[i + 3].load(Ordering::Relaxed),
            ];
            let ev = Event::decode(raw);
            stats.bump(ev.stream_id);
            sink(&ev);
            cons = (cons + 1) & self.counter_mask();
            n += 1;
        }
        let overflowed = ovflg != self.ovack;
        if overflowed {
            stats.lost = stats.lost.saturating_add(1);
        }
        if n != 0 || overflowed {
            // Our reads of the records complete before the slots are handed back.
            fence(Ordering::SeqCst);
            mmio.write32(offset::EVENTQ_CONS, cons | ovflg);
            self.cons = cons;
            self.ovack = ovflg;
        }
        (n, overflowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use core::sync::atomic::AtomicU64;
    use std::vec::Vec;

    /// What the drain did, in order: register reads, the read barrier, queue-memory reads.
    #[derive(Debug, PartialEq, Eq, Clone, Copy)]
    enum Step {
        ReadProd,
        Rmb,
        ReadQueue,
        WriteCons(u32),
    }

    struct Log(RefCell<Vec<Step>>);

    /// EVENTQ_PROD says two records (index 2, no wrap) are ready.
    struct Regs<'a>(&'a Log);

    impl Mmio for Regs<'_> {
        fn read32(&self, offset: usize) -> u32 {
            assert_eq!(offset, offset::EVENTQ_PROD);
            self.0.0.borrow_mut().push(Step::ReadProd);
            2
        }
        fn write32(&self, offset: usize, value: u32) {
            assert_eq!(offset, offset::EVENTQ_CONS);
            self.0.0.borrow_mut().push(Step::WriteCons(value));
        }
        fn read64(&self, _: usize) -> u64 {
            unreachable!()
        }
        fn write64(&self, _: usize, _: u64) {
            unreachable!()
        }
        fn dma_rmb(&self) {
            self.0.0.borrow_mut().push(Step::Rmb);
        }
    }

    struct Queue<'a> {
        log: &'a Log,
        words: std::vec::Vec<AtomicU64>,
    }

    impl TableMemory for Queue<'_> {
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
            assert_eq!(pa, 0x1000);
            self.log.0.borrow_mut().push(Step::ReadQueue);
            &self.words[..entries]
        }
    }

    /// The records are read only after the read-side DMA barrier that follows the EVENTQ_PROD
    /// read (without it an Arm CPU may return record words loaded before PROD moved).
    #[test]
    fn records_are_read_after_the_prod_read_and_a_dma_read_barrier() {
        let log = Log(RefCell::new(Vec::new()));
        let words: Vec<AtomicU64> = (0..32u64).map(|_| AtomicU64::new(0)).collect();
        // Two F_TRANSLATION records from StreamIDs 7 and 9 (type in bits 7:0, SID in 63:32).
        words[0].store(0x10 | 7 << 32, Ordering::Relaxed);
        words[4].store(0x10 | 9 << 32, Ordering::Relaxed);
        let mem = Queue { log: &log, words };
        let mut q = EventQueue::new(0x1000, 3);
        let mut stats = EventStats::new();
        let mut seen = Vec::new();
        let (n, overflowed) = q.drain(&Regs(&log), &mem, &mut stats, &mut |e| {
            seen.push((e.kind, e.stream_id))
        });
        assert_eq!((n, overflowed), (2, false));
        assert_eq!(
            seen,
            [(EventType::Translation, 7), (EventType::Translation, 9)]
        );
        assert_eq!(
            *log.0.borrow(),
            [
                Step::ReadProd,
                Step::Rmb,
                Step::ReadQueue,
                Step::WriteCons(2)
            ]
        );
    }
}

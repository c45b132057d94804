//! Primary fault logging (VT-d 4.1 §7.2 and §7.3): draining the fault recording registers,
//! overflow handling, per-device counters.
//!
//! The hardware writes a fault into the next fault recording register (FRCD, §11.4.14) in a
//! circular order and sets F; a fault that finds that register still holding one is dropped and
//! FSTS.PFO is set (§7.2.1). Software reads the records from FSTS.FRI onwards, clears each F
//! (RW1C), then clears PFO. A device can raise faults much faster than they are drained, so one
//! drain does bounded work: at most CAP.NFR records, one pass over the register file.

use super::regs::{Capability, FaultRecord, FaultStatus, offset};
use crate::hw::Mmio;

/// What one [`poll_faults`](super::VtdUnit::poll_faults) call found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPoll {
    /// Fault records drained (and passed to the sink).
    pub recorded: u32,
    /// FSTS.PFO was set: faults were dropped since the last drain. Counted in
    /// [`faults_lost`](super::VtdUnit::faults_lost) (one per PFO event: the hardware does not
    /// say how many).
    pub overflowed: bool,
}

/// Devices whose faults are counted individually; more than that (a hypervisor has a handful of
/// assigned devices) share [`FaultStats::untracked`].
pub const FAULT_SID_SLOTS: usize = 64;

/// Fault counters, fixed size.
#[derive(Clone, Debug)]
pub(crate) struct FaultStats {
    sids: [(u16, u64); FAULT_SID_SLOTS],
    used: usize,
    /// Faults of source ids that found no free slot.
    pub untracked: u64,
    pub total: u64,
    pub lost: u64,
}

impl FaultStats {
    pub const fn new() -> Self {
        FaultStats {
            sids: [(0, 0); FAULT_SID_SLOTS],
            used: 0,
            untracked: 0,
            total: 0,
            lost: 0,
        }
    }

    pub fn count(&self, sid: u16) -> u64 {
        self.sids[..self.used]
            .iter()
            .find(|s| s.0 == sid)
            .map_or(0, |s| s.1)
    }

    fn bump(&mut self, sid: u16) {
        self.total = self.total.saturating_add(1);
        if let Some(s) = self.sids[..self.used].iter_mut().find(|s| s.0 == sid) {
            s.1 = s.1.saturating_add(1);
        } else if self.used < FAULT_SID_SLOTS {
            self.sids[self.used] = (sid, 1);
            self.used += 1;
        } else {
            self.untracked = self.untracked.saturating_add(1);
        }
    }
}

/// Drains the fault recording registers of the unit behind `mmio`.
pub(crate) fn drain<M: Mmio>(
    mmio: &M,
    cap: Capability,
    stats: &mut FaultStats,
    sink: &mut dyn FnMut(&FaultRecord),
) -> FaultPoll {
    let fsts = FaultStatus::from_bits_retain(mmio.read32(offset::FSTS));
    let mut poll = FaultPoll::default();
    if fsts.contains(FaultStatus::PPF) {
        let nfr = cap.nfr();
        // FRI names the first pending record; a hostile value is reduced modulo NFR.
        let start = fsts.fri() as u16 % nfr;
        // One pass over every register, from FRI: records are written circularly, so this
        // visits them oldest first, and a record F-set behind a cleared one is not missed.
        for k in 0..nfr {
            let index = (start + k) % nfr;
            let at = cap.fault_record_offset(index);
            let hi = mmio.read64(at + 8);
            if hi & FaultRecord::CLEAR_HI == 0 {
                continue;
            }
            // The record is stable while F is set; read it whole before releasing it.
            let lo = mmio.read64(at);
            let record = FaultRecord::decode(lo, hi);
            mmio.write64(at + 8, FaultRecord::CLEAR_HI);
            stats.bump(record.source_id);
            poll.recorded += 1;
            sink(&record);
        }
    }
    // Clear PFO only after freeing records: from now on new faults find room again.
    if fsts.contains(FaultStatus::PFO) {
        mmio.write32(offset::FSTS, FaultStatus::PFO.bits());
        stats.lost = stats.lost.saturating_add(1);
        poll.overflowed = true;
    }
    poll
}

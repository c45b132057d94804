//! One DMA-remapping unit (a DRHD): bring-up, domains, attach/replace/detach, map/unmap with
//! IOTLB invalidation, fault draining.
//!
//! Concurrency: operations that change which domain a device uses (`attach`, `replace`,
//! `detach`, domain creation and destruction, translation enable, fault draining) take
//! `&mut self`; `map`, `unmap` and `iova_to_phys` take `&self` and may run on many CPUs at once
//! under the page-table engine's disjoint-range contract. The invalidation machinery they share
//! is serialised by a bounded lock inside [`Invalidator`].

use core::sync::atomic::Ordering;

use alloc::collections::BTreeMap;

use crate::hw::Mmio;
use crate::pgtable::{Config, ConfigError, Gather, MapOutput, PhysAddr, Prot};

use super::domain::{Domain, DomainConfig, Stage, Table};
use super::error::VtdError;
use super::fault::{self, FaultPoll, FaultStats};
use super::invalidation::{Drain, Invalidator, Op, Path, Queue, Stats, bump, psi_block};
use super::mem::{VtdMemory, load_words, load64};
use super::regs::{
    FaultRecord, FaultStatus, GlobalCommand, GlobalStatus, InvQueueAddress, RootTableAddress,
    TranslationTableMode, VtdIdRegs, offset,
};
use super::rmrr::RmrrState;
use super::tables::{
    ADDR, ContextEntry, P, PASID_DIR_ENTRIES, PASID_TABLE_ENTRIES, PASIDS_PER_DIRECTORY,
    PDTS_ONE_PAGE, PasidEntry, PasidEntryFlags, Pgtt, RootEntry, SM_CONTEXT_ENTRIES,
    ScalableContextEntry, pasid_dir_entry,
};

/// Root-table format the unit runs (RTADDR.TTM, §11.4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationMode {
    /// Legacy root and context entries (§9.1, §9.3); second-stage domains only, no PASIDs.
    Legacy,
    /// Scalable-mode root, context, PASID directory and PASID entries (§9.2, §9.4-9.6);
    /// needs ECAP.SMTS and ECAP.QI (QEMU `x-scalable-mode=on`).
    Scalable,
}

/// How to bring a unit up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    pub mode: TranslationMode,
    /// Iterations of every poll loop (register status, wait descriptor, queue space, the
    /// invalidation lock) before it gives up with [`VtdError::Timeout`]. Each iteration is one
    /// register or memory read plus a spin-loop hint.
    pub poll_budget: u32,
    /// Physical address bits of the platform (ACPI DMAR "host address width" + 1): the output
    /// size of every page table.
    pub host_address_bits: u32,
    /// Inclusive range of PCI bus numbers this unit remaps (from its DRHD scope); a source id
    /// outside it is [`VtdError::BadSid`].
    pub buses: (u8, u8),
}

impl UnitConfig {
    /// `mode`, a budget of one million iterations, 48-bit physical addresses (QEMU's default
    /// `aw-bits`), every bus.
    pub const fn new(mode: TranslationMode) -> Self {
        UnitConfig {
            mode,
            poll_budget: 1_000_000,
            host_address_bits: 48,
            buses: (0, 255),
        }
    }
}

impl Default for UnitConfig {
    fn default() -> Self {
        Self::new(TranslationMode::Legacy)
    }
}

/// A snapshot of the unit's event counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Invalidation descriptors queued, wait descriptors not included.
    pub qi_descriptors: u64,
    /// Wait descriptors queued (one per batch).
    pub qi_waits: u64,
    /// Register-based invalidations (CCMD, IOTLB register).
    pub register_invalidations: u64,
    /// IOTLB invalidations: page-selective, domain-selective, global.
    pub iotlb_psi: u64,
    pub iotlb_dsi: u64,
    pub iotlb_global: u64,
    pub context_invalidations: u64,
    pub pasid_cache_invalidations: u64,
    /// PASID-based IOTLB invalidations (first-stage domains).
    pub pasid_iotlb_invalidations: u64,
    /// GCMD.WBF flushes (CAP.RWBF).
    pub write_buffer_flushes: u64,
    /// Invalidation-queue errors handled (IQE, ITE, ICE).
    pub queue_errors: u64,
    /// Device-TLB invalidations (0x3 and PASID-based 0x8) for devices attached with ATS.
    pub device_tlb_invalidations: u64,
    /// Fault records drained.
    pub faults: u64,
    /// Primary fault overflows (FSTS.PFO) seen.
    pub faults_lost: u64,
    /// Faults of source ids beyond the per-device counters' capacity.
    pub faults_untracked: u64,
}

/// Domain-id allocator over the ids CAP.ND allows; id 0 is never handed out (it is reserved
/// when CAP.CM = 1, and unused otherwise so that the rule never matters).
struct DomainIds {
    bits: [u64; 1024],
    limit: u32,
}

impl DomainIds {
    fn new(limit: u32) -> Self {
        let mut bits = [0u64; 1024];
        bits[0] = 1;
        DomainIds {
            bits,
            limit: limit.min(1 << 16),
        }
    }

    fn alloc(&mut self) -> Option<u16> {
        let words = (self.limit as usize).div_ceil(64);
        for (w, word) in self.bits[..words].iter_mut().enumerate() {
            if *word == u64::MAX {
                continue;
            }
            let bit = (!*word).trailing_zeros();
            let id = w as u32 * 64 + bit;
            if id >= self.limit {
                return None;
            }
            *word |= 1 << bit;
            return Some(id as u16);
        }
        None
    }

    fn free(&mut self, id: u16) {
        if id != 0 {
            self.bits[id as usize / 64] &= !(1 << (id % 64));
        }
    }
}

/// PASIDs through which first-stage domains are attached, with reference counts: PASID-based
/// IOTLB invalidations are tagged with (DID, PASID), so flushing a first-stage domain means one
/// descriptor per PASID it may be attached with. The set is unit-wide (over-invalidation across
/// domains is harmless); past its capacity the driver falls back to a global IOTLB flush.
struct PasidSet {
    slots: [(u32, u32); PasidSet::CAPACITY],
    overflow: u32,
}

impl PasidSet {
    const CAPACITY: usize = 16;

    const fn new() -> Self {
        PasidSet {
            slots: [(0, 0); Self::CAPACITY],
            overflow: 0,
        }
    }

    fn add(&mut self, pasid: u32) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.1 != 0 && s.0 == pasid) {
            s.1 += 1;
        } else if let Some(s) = self.slots.iter_mut().find(|s| s.1 == 0) {
            *s = (pasid, 1);
        } else {
            self.overflow += 1;
        }
    }

    fn remove(&mut self, pasid: u32) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.1 != 0 && s.0 == pasid) {
            s.1 -= 1;
        } else {
            self.overflow = self.overflow.saturating_sub(1);
        }
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().filter(|s| s.1 != 0).map(|s| s.0)
    }
}

/// A short list of invalidation ops built on the stack.
struct Ops {
    buf: [Op; Ops::CAPACITY],
    len: usize,
}

impl Ops {
    /// The longest list: one IOTLB op per tracked PASID (or one global), a fence, one
    /// device-TLB op per tracked device TLB; or a replace/detach's four. Never overflows.
    const CAPACITY: usize = PasidSet::CAPACITY + AtsTable::CAPACITY + 4;

    const fn new() -> Self {
        Ops {
            buf: [Op::IotlbGlobal; Self::CAPACITY],
            len: 0,
        }
    }

    fn push(&mut self, op: Op) {
        // Callers push at most CAPACITY ops; a full list degrades to a global flush, which
        // covers anything that did not fit.
        if self.len < Self::CAPACITY {
            self.buf[self.len] = op;
            self.len += 1;
        } else {
            self.buf[Self::CAPACITY - 1] = Op::IotlbGlobal;
        }
    }

    fn as_slice(&self) -> &[Op] {
        &self.buf[..self.len]
    }
}

/// The invalidations of one round on one unit, collected from any number of unmaps of any of
/// the unit's domains ([`VtdUnit::plan_invalidation`]) and carried out by
/// [`VtdUnit::flush_round`] as one batch closed by **one** invalidation wait descriptor
/// (VT-d 4.1 §6.5.2.8): every IOTLB / PASID-based IOTLB descriptor first, then, if any
/// device has a device TLB on a touched domain, one fenced wait and the device-TLB
/// descriptors (a device must not refill its TLB from a stale IOTLB entry, §6.5.2.5).
///
/// Fixed capacity, kept on the caller's stack. Identical descriptors are issued once. When a
/// list is full the round degrades to invalidating everything: one global IOTLB invalidation
/// and, after the fence, a whole-range device-TLB invalidation of every device TLB of the
/// unit; still one round. At most 32 + 1 + 32 descriptors plus the wait: always fewer than
/// the 128 slots of the smallest queue the driver sets up, so a round never waits for the
/// hardware to make room.
#[derive(Clone, Debug)]
pub struct InvalidationRound {
    iotlb: [Op; InvalidationRound::IOTLB_CAPACITY],
    n_iotlb: usize,
    device: [Op; InvalidationRound::DEVICE_TLB_CAPACITY],
    n_device: usize,
    /// Something was unmapped: the round runs (the write buffer is flushed even when the
    /// domain caches nothing, a pass-through domain).
    planned: bool,
    /// A list overflowed.
    everything: bool,
}

impl Default for InvalidationRound {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidationRound {
    /// IOTLB and PASID-based IOTLB descriptors per round.
    pub const IOTLB_CAPACITY: usize = 32;
    /// Device-TLB descriptors per round.
    pub const DEVICE_TLB_CAPACITY: usize = 32;
    /// Every descriptor a round can issue, the fence included (the wait comes on top).
    const OPS: usize = Self::IOTLB_CAPACITY + 1 + Self::DEVICE_TLB_CAPACITY;

    pub const fn new() -> Self {
        InvalidationRound {
            iotlb: [Op::IotlbGlobal; Self::IOTLB_CAPACITY],
            n_iotlb: 0,
            device: [Op::Fence; Self::DEVICE_TLB_CAPACITY],
            n_device: 0,
            planned: false,
            everything: false,
        }
    }

    /// Nothing planned: the round would not touch the hardware.
    pub fn is_empty(&self) -> bool {
        !self.planned
    }

    /// The round degraded to a global invalidation (a list overflowed).
    pub fn is_global(&self) -> bool {
        self.everything
    }

    fn push_iotlb(&mut self, op: Op) {
        if self.iotlb[..self.n_iotlb].contains(&op) {
            return;
        }
        if self.n_iotlb == Self::IOTLB_CAPACITY {
            self.everything = true;
        } else {
            self.iotlb[self.n_iotlb] = op;
            self.n_iotlb += 1;
        }
    }

    fn push_device(&mut self, op: Op) {
        if self.device[..self.n_device].contains(&op) {
            return;
        }
        if self.n_device == Self::DEVICE_TLB_CAPACITY {
            self.everything = true;
        } else {
            self.device[self.n_device] = op;
            self.n_device += 1;
        }
    }
}

/// How to attach a device ([`VtdUnit::attach_with`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// The device has PCIe ATS enabled (a device TLB). The entry allows translation requests
    /// (legacy TT = 01b; scalable mode DTE in the context entry, per device), which needs
    /// ECAP.DT and queued invalidation; every IOTLB invalidation that covers the attachment is
    /// followed by a fence and a device-TLB invalidation for the SID (0x3, or PASID-based 0x8
    /// for a PASID other than 0). The device is taken to be its own physical function (PFSID
    /// = SID) and MIP = 0.
    pub ats: bool,
}

/// One attachment of a device with a device TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AtsSlot {
    sid: u16,
    pasid: u32,
    did: u16,
}

/// The attachments whose device has a device TLB: which SIDs to send device-TLB
/// invalidations to when a domain's mappings or a device's entry change.
struct AtsTable {
    slots: [Option<AtsSlot>; AtsTable::CAPACITY],
    /// Slots in use: with none (no device TLB on this unit, the usual case), an unmap's plan
    /// skips the scan.
    used: usize,
}

impl AtsTable {
    const CAPACITY: usize = 16;

    const fn new() -> Self {
        AtsTable {
            slots: [None; Self::CAPACITY],
            used: 0,
        }
    }

    fn position(&self, sid: u16, pasid: u32) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| matches!(s, Some(a) if a.sid == sid && a.pasid == pasid))
    }

    fn get(&self, sid: u16, pasid: u32) -> Option<AtsSlot> {
        self.position(sid, pasid).and_then(|i| self.slots[i])
    }

    fn has_room(&self) -> bool {
        self.slots.iter().any(Option::is_none)
    }

    /// Callers check [`has_room`](Self::has_room) first.
    fn insert(&mut self, slot: AtsSlot) {
        if let Some(free) = self.slots.iter_mut().find(|s| s.is_none()) {
            *free = Some(slot);
            self.used += 1;
        }
    }

    fn set_did(&mut self, sid: u16, pasid: u32, did: u16) {
        if let Some(i) = self.position(sid, pasid) {
            self.slots[i] = Some(AtsSlot { sid, pasid, did });
        }
    }

    fn remove(&mut self, sid: u16, pasid: u32) {
        if let Some(i) = self.position(sid, pasid) {
            self.slots[i] = None;
            self.used -= 1;
        }
    }

    fn for_domain(&self, did: u16) -> impl Iterator<Item = AtsSlot> + '_ {
        let scan = if self.used == 0 { 0 } else { Self::CAPACITY };
        self.slots[..scan]
            .iter()
            .flatten()
            .copied()
            .filter(move |a| a.did == did)
    }
}

/// The device-TLB invalidation of `slot` for the 2^`am` pages at `addr`.
fn device_tlb_op(slot: AtsSlot, addr: u64, am: u8) -> Op {
    if slot.pasid == 0 {
        Op::DeviceTlb {
            sid: slot.sid,
            addr,
            am,
        }
    } else {
        Op::PasidDeviceTlb {
            sid: slot.sid,
            pasid: slot.pasid,
            addr,
            am,
        }
    }
}

/// `am` that makes a device-TLB invalidation cover everything.
const DEVICE_TLB_ALL: u8 = 52;

/// Where the PASID-table entry of a (SID, PASID) lives in scalable mode.
#[derive(Clone, Copy)]
struct PasidLoc {
    /// The PASID-directory entry pointing at the PASID table.
    dir_entry: u64,
    /// The 64-byte PASID-table entry.
    entry: u64,
}

/// One DMA-remapping unit.
pub struct VtdUnit<M: Mmio> {
    mmio: M,
    ids: VtdIdRegs,
    mode: TranslationMode,
    budget: u32,
    host_bits: u32,
    buses: (u8, u8),
    root: u64,
    inv: Invalidator,
    /// ECAP.C: root, context and PASID structures need no cache cleaning.
    coherent_structures: bool,
    /// Page-table walks snoop: ECAP.C in legacy mode, ECAP.SMPWCS (with PWSNP set in every
    /// PASID entry) in scalable mode.
    coherent_tables: bool,
    dids: DomainIds,
    fs_pasids: PasidSet,
    ats: AtsTable,
    /// The RMRR identity domain and the devices it holds ([`apply_rmrr`](Self::apply_rmrr)).
    pub(super) rmrr: RmrrState,
    faults: FaultStats,
    stats: Stats,
    /// DMA alias source-id -> the source-id of the device it was attached for
    /// ([`attach_aliases`](Self::attach_aliases)), so faults on the alias count for the device.
    alias_owner: BTreeMap<u16, u16>,
}

/// Most source-ids one [`VtdUnit::attach_aliases`] call takes (a device's alias set is far
/// smaller: its own ID and two per PCIe-to-PCI bridge above it).
pub const MAX_ALIAS_SIDS: usize = 64;

impl<M: Mmio> VtdUnit<M> {
    /// Brings the unit up with translation disabled (VT-d 4.1 §6 and §11.4):
    ///
    /// 1. reads VER/CAP/ECAP, refuses an address where no unit answers
    ///    ([`VtdError::UnitAbsent`], before any write), and checks the mode (scalable needs
    ///    ECAP.SMTS and ECAP.QI);
    /// 2. turns off translation and queued invalidation if a previous owner left them on, and
    ///    clears stale invalidation-queue errors;
    /// 3. allocates the root table, programs RTADDR (TTM 00b or 01b) and latches it with
    ///    GCMD.SRTP, polling GSTS.RTPS;
    /// 4. with ECAP.QI, sets up the invalidation queue (IQT = 0, IQA, GCMD.QIE; 256-bit
    ///    descriptors in scalable mode, where the PASID-based descriptors require them);
    ///    otherwise uses the CCMD and IOTLB registers;
    /// 5. invalidates the context cache, the PASID cache (scalable) and the IOTLB globally.
    pub fn new<T: VtdMemory>(mmio: M, mem: &T, cfg: UnitConfig) -> Result<Self, VtdError> {
        // A DRHD may name a unit the machine does not have; refuse it before the first write
        // instead of timing out on its status registers.
        let ids = VtdIdRegs::probe(&mmio).map_err(|why| VtdError::UnitAbsent { why })?;
        let (cap, ecap) = (ids.cap, ids.ecap);
        let scalable = cfg.mode == TranslationMode::Scalable;
        if scalable && !(ecap.smts() && ecap.qi()) {
            return Err(VtdError::ModeUnsupported);
        }
        let budget = cfg.poll_budget.max(1);
        let coherent_structures = ecap.c();
        let coherent_tables = if scalable { ecap.smpwcs() } else { ecap.c() };
        let drain = Drain {
            reads: cap.drd(),
            writes: cap.dwd(),
        };
        let register_path = Path::Register {
            iva: ecap.iva_offset(),
            iotlb: ecap.iotlb_offset(),
        };
        let mut unit = VtdUnit {
            mmio,
            ids,
            mode: cfg.mode,
            budget,
            host_bits: cfg.host_address_bits,
            buses: cfg.buses,
            root: 0,
            inv: Invalidator::new(register_path, drain, coherent_structures, budget),
            coherent_structures,
            coherent_tables,
            dids: DomainIds::new(cap.num_domains().unwrap_or(0)),
            fs_pasids: PasidSet::new(),
            ats: AtsTable::new(),
            rmrr: RmrrState::new(),
            faults: FaultStats::new(),
            stats: Stats::default(),
            alias_owner: BTreeMap::new(),
        };

        // A previous owner may have left translation or the queue on; the queue registers
        // must not be reprogrammed while QIE is set (§6.5.2).
        let gsts = unit.gsts();
        if gsts.contains(GlobalStatus::TES) {
            unit.set_persistent(GlobalCommand::TE, false, "GSTS.TES clear")?;
        }
        if gsts.contains(GlobalStatus::QIES) {
            unit.set_persistent(GlobalCommand::QIE, false, "GSTS.QIES clear")?;
        }
        // A stale IQE would stop the new queue at its first descriptor.
        let queue_errors = FaultStatus::IQE | FaultStatus::ICE | FaultStatus::ITE;
        unit.mmio.write32(offset::FSTS, queue_errors.bits());

        let root = mem.alloc_table(4096).ok_or(VtdError::NoMemory)?;
        unit.root = root;
        unit.clean(mem, root, 4096);
        let rta = RootTableAddress {
            address: root,
            mode: if scalable {
                TranslationTableMode::Scalable
            } else {
                TranslationTableMode::Legacy
            },
        };
        unit.mmio.write64(offset::RTADDR, rta.encode());
        // GSTS.RTPS is cleared by the SRTP write and set when the pointer is latched.
        unit.one_shot(GlobalCommand::SRTP, GlobalStatus::RTPS, true, "GSTS.RTPS")?;

        if ecap.qi() {
            let base = mem.alloc_table(4096).ok_or(VtdError::NoMemory)?;
            let status = mem.alloc_table(4096).ok_or(VtdError::NoMemory)?;
            unit.clean(mem, base, 4096);
            let queue = Queue::new(base, status, scalable);
            unit.mmio.write64(offset::IQT, 0);
            let iqa = InvQueueAddress {
                base,
                wide_descriptors: queue.wide,
                qs: 0,
            };
            unit.mmio.write64(offset::IQA, iqa.encode());
            unit.inv = Invalidator::new(Path::Queued(queue), drain, coherent_structures, budget);
            unit.set_persistent(GlobalCommand::QIE, true, "GSTS.QIES")?;
        }

        let mut ops = Ops::new();
        ops.push(Op::ContextGlobal);
        if scalable {
            ops.push(Op::PasidCacheGlobal);
        }
        ops.push(Op::IotlbGlobal);
        unit.invalidate(mem, &ops)?;
        Ok(unit)
    }

    /// Sets GCMD.TE and waits for GSTS.TES, keeping the other persistent bits.
    pub fn enable_translation(&mut self) -> Result<(), VtdError> {
        self.set_persistent(GlobalCommand::TE, true, "GSTS.TES")
    }

    /// Clears GCMD.TE and waits for GSTS.TES to clear.
    pub fn disable_translation(&mut self) -> Result<(), VtdError> {
        self.set_persistent(GlobalCommand::TE, false, "GSTS.TES clear")
    }

    /// VER, CAP and ECAP as read at bring-up.
    pub fn regs(&self) -> &VtdIdRegs {
        &self.ids
    }

    pub fn mode(&self) -> TranslationMode {
        self.mode
    }

    /// Physical address of the root table.
    pub fn root_table(&self) -> u64 {
        self.root
    }

    /// The register window.
    pub fn mmio(&self) -> &M {
        &self.mmio
    }

    // -----------------------------------------------------------------------------------------
    // Domains
    // -----------------------------------------------------------------------------------------

    /// Creates a domain: checks the configuration against the unit, takes a domain id and
    /// allocates the page-table root.
    pub fn create_domain<T: VtdMemory>(
        &mut self,
        mem: &T,
        cfg: DomainConfig,
    ) -> Result<Domain, VtdError> {
        let (cap, ecap) = (self.ids.cap, self.ids.ecap);
        let scalable = self.mode == TranslationMode::Scalable;
        let aw = cfg.address_width;
        let unsupported_aw = VtdError::AddressWidthUnsupported { requested: aw };
        let (levels, ias, leaf_sizes) = match cfg.stage {
            Stage::Second => {
                if scalable && !ecap.slts() {
                    return Err(VtdError::SecondStageUnsupported);
                }
                let levels = match aw {
                    39 => 3,
                    48 => 4,
                    57 => 5,
                    _ => return Err(unsupported_aw),
                };
                if !cap.sagaw().supports(levels as u8) {
                    return Err(unsupported_aw);
                }
                if cfg.dirty_tracking && !(scalable && ecap.slads()) {
                    return Err(VtdError::DirtyTrackingUnsupported);
                }
                let sllps = cap.sllps();
                let mut sizes = 1u64 << 12;
                if sllps.contains(super::regs::LargePages::SIZE_2M) {
                    sizes |= 1 << 21;
                }
                if sllps.contains(super::regs::LargePages::SIZE_1G) {
                    sizes |= 1 << 30;
                }
                // Input addresses beyond MGAW fault however deep the table is.
                (levels, aw.min(cap.mgaw() as u32), sizes)
            }
            Stage::First => {
                if !(scalable && ecap.flts()) {
                    return Err(VtdError::FirstStageUnsupported);
                }
                let levels = match aw {
                    48 => 4,
                    57 if cap.fl5lp() => 5,
                    _ => return Err(unsupported_aw),
                };
                let mut sizes = 1u64 << 12 | 1 << 21;
                if cap.fl1gp() {
                    sizes |= 1 << 30;
                }
                // The lower canonical half.
                (levels, aw - 1, sizes)
            }
            Stage::PassThrough => return self.create_pass_through(cfg),
        };
        let pt_cfg = Config {
            leaf_sizes,
            coherent: self.coherent_tables,
            contiguous_hint: false,
            dirty_tracking: cfg.dirty_tracking,
            snoop_control: ecap.sc(),
            ..Config::new(ias, self.host_bits)
        };
        let did = self.dids.alloc().ok_or(VtdError::DomainIdsExhausted)?;
        let table = match Table::new(mem, cfg.stage, levels, pt_cfg) {
            Ok(t) => t,
            Err(e) => {
                self.dids.free(did);
                return Err(match e {
                    ConfigError::NoMemory => VtdError::NoMemory,
                    ConfigError::InputSize => unsupported_aw,
                    other => VtdError::PageTable(other),
                });
            }
        };
        Ok(Domain {
            did,
            table: Some(table),
            pt_geometry: (0, 0),
            cfg,
            unit: self.root,
            // Legacy mode enforces snooping per leaf; scalable mode per PASID entry (PGSNP).
            // Without ECAP.SC the domain can never be attached here, and SNP would be reserved.
            snoop_leaves: cfg.enforce_cache_coherency
                && cfg.stage == Stage::Second
                && !scalable
                && ecap.sc(),
        })
    }

    /// A pass-through domain: a domain id, no table. AW is the largest SAGAW depth (VT-d 4.1
    /// §9.3: pass-through entries must still hold a supported AW).
    fn create_pass_through(&mut self, cfg: DomainConfig) -> Result<Domain, VtdError> {
        let (cap, ecap) = (self.ids.cap, self.ids.ecap);
        if !ecap.pt() {
            return Err(VtdError::PassThroughUnsupported);
        }
        if cfg.enforce_cache_coherency {
            return Err(VtdError::SnoopControlUnsupported);
        }
        if cfg.dirty_tracking {
            return Err(VtdError::DirtyTrackingUnsupported);
        }
        let levels = cap
            .sagaw()
            .max_levels()
            .ok_or(VtdError::AddressWidthUnsupported { requested: 0 })?;
        let bits = (super::regs::Sagaw::address_width(levels) as u32).min(cap.mgaw() as u32);
        let did = self.dids.alloc().ok_or(VtdError::DomainIdsExhausted)?;
        Ok(Domain {
            did,
            table: None,
            pt_geometry: (levels as u32, bits),
            cfg,
            unit: self.root,
            snoop_leaves: false,
        })
    }

    /// Destroys a domain that nothing is attached to: invalidates whatever the IOTLB may still
    /// hold under its id, frees the page table and the id. On failure the domain is handed
    /// back (a large `Err`, but a rare and cold path, and boxing would need `alloc`).
    #[allow(clippy::result_large_err)]
    pub fn try_destroy_domain<T: VtdMemory>(
        &mut self,
        mem: &T,
        d: Domain,
    ) -> Result<(), (VtdError, Domain)> {
        if let Err(e) = d.check_unit(self.root) {
            return Err((e, d));
        }
        let attachments = self.references(mem, d.did);
        if attachments != 0 {
            return Err((VtdError::DomainBusy { attachments }, d));
        }
        let mut ops = Ops::new();
        ops.push(Op::IotlbDomain { did: d.did });
        if let Err(e) = self.invalidate(mem, &ops) {
            return Err((e, d));
        }
        let did = d.did;
        if let Some(table) = d.table {
            table.destroy(mem);
        }
        self.dids.free(did);
        Ok(())
    }

    /// [`try_destroy_domain`](Self::try_destroy_domain), for callers that cannot use the
    /// domain back: on failure (for instance [`VtdError::DomainBusy`], still attached) the
    /// domain is dropped, which leaks its page table and id. That is the safe outcome: a device
    /// still attached keeps translating through intact tables. Detach first.
    pub fn destroy_domain<T: VtdMemory>(&mut self, mem: &T, d: Domain) -> Result<(), VtdError> {
        self.try_destroy_domain(mem, d).map_err(|(e, _leaked)| e)
    }

    /// Maps `[iova, iova + len)` to `[pa, pa + len)`. A coherency-enforcing domain in legacy
    /// mode gets SNP in every leaf. With CAP.CM (caching mode: not-present entries may be
    /// cached) the new range is invalidated too; with CAP.RWBF the write buffer is flushed.
    /// When a failed map had installed and removed entries, their range is invalidated before
    /// the error is returned.
    pub fn map<T: VtdMemory>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<(), VtdError> {
        self.map_to(mem, d, iova, pa, len, prot)
    }

    /// [`map`](Self::map) to one physical range or to the runs of a
    /// [`RunSource`](crate::pgtable::RunSource) (one page-table walk for all of them).
    pub fn map_to<T: VtdMemory, O: MapOutput>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), VtdError> {
        d.check_unit(self.root)?;
        let table = d.table()?;
        let prot = if d.snoop_leaves {
            prot | Prot::SNOOP
        } else {
            prot
        };
        match table.map(mem, iova, out, len, prot) {
            Ok(()) => {
                self.flush_write_buffer()?;
                if self.ids.cap.cm() {
                    // New tables may have been linked: no invalidation hint.
                    self.flush_range(mem, d, iova, iova + len, false)?;
                }
                Ok(())
            }
            Err(e) => {
                let rolled_back = e.rolled_back();
                if !rolled_back.is_empty() {
                    self.flush_write_buffer()?;
                    self.flush_range(mem, d, rolled_back.start, rolled_back.end, false)?;
                }
                Err(VtdError::Map(e))
            }
        }
    }

    /// Unmaps exactly `[iova, iova + len)` and returns the bytes unmapped, then runs one
    /// invalidation round for it ([`unmap_deferred`](Self::unmap_deferred) followed by
    /// [`flush_batch`](Self::flush_batch) of that one gather): one page-selective
    /// invalidation whose address mask covers the range rounded out to a naturally aligned
    /// power of two, when that mask is within CAP.MAMV and CAP.PSI is set, else one
    /// domain-selective one (first-stage domains: one PASID-based invalidation per attached
    /// PASID), then one wait; then hands unlinked table pages back to `mem`.
    ///
    /// If the invalidation fails, the unlinked table pages are leaked rather than reused: the
    /// hardware may still walk them.
    pub fn unmap<T: VtdMemory>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        len: u64,
    ) -> Result<u64, VtdError> {
        let mut gather = Gather::new();
        let result = self.unmap_deferred(mem, d, iova, len, &mut gather);
        self.flush_batch(mem, &mut [(d, &mut gather)])?;
        result
    }

    /// Unmaps exactly `[iova, iova + len)` into `gather` and returns the bytes unmapped;
    /// invalidates nothing. Whatever was cleared (on error too) is in `gather`, which the
    /// caller must flush ([`flush_batch`](Self::flush_batch), or
    /// [`plan_invalidation`](Self::plan_invalidation) + [`flush_round`](Self::flush_round) and
    /// then `gather.complete(mem)` or, if the round failed, `gather.leak()`).
    pub fn unmap_deferred<T: VtdMemory>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, VtdError> {
        d.check_unit(self.root)?;
        d.table()?
            .unmap(mem, iova, len, gather)
            .map_err(VtdError::Unmap)
    }

    /// Adds to `round` what `gather` (filled by [`unmap_deferred`](Self::unmap_deferred) of
    /// `d`, a domain of this unit) owes: for the gathered range, page-selective when the mask
    /// rule allows it (see [`unmap`](Self::unmap)), IH set when no table page was unlinked;
    /// domain-wide when only tables were unlinked.
    pub fn plan_invalidation(&self, d: &Domain, gather: &Gather, round: &mut InvalidationRound) {
        if gather.is_empty() {
            return;
        }
        round.planned = true;
        match gather.range() {
            Some(r) => self.plan_range(d, r.start, r.end, !gather.frees_tables(), round),
            None => self.plan_range(d, 0, u64::MAX, false, round),
        }
    }

    /// Runs `round`: with CAP.RWBF the write buffer is flushed first (so the hardware sees the
    /// cleared entries), then every planned descriptor and one wait (queued invalidation).
    /// Register-based invalidation (no ECAP.QI) has no batch: each planned invalidation is
    /// one IOTLB-register command polled to completion, in order, as before batching. An
    /// empty round does nothing.
    pub fn flush_round<T: VtdMemory>(
        &self,
        mem: &T,
        round: &InvalidationRound,
    ) -> Result<(), VtdError> {
        if round.is_empty() {
            return Ok(());
        }
        self.flush_write_buffer()?;
        self.run_round(mem, round)
    }

    /// One round for every `(domain, gather)` of `batch` (all of this unit), then every
    /// gather completed (table pages retired) if it succeeded, or leaked if it failed.
    pub fn flush_batch<T: VtdMemory>(
        &self,
        mem: &T,
        batch: &mut [(&Domain, &mut Gather)],
    ) -> Result<(), VtdError> {
        let mut round = InvalidationRound::new();
        let mut result = Ok(());
        for (d, g) in batch.iter() {
            if let Err(e) = d.check_unit(self.root) {
                result = Err(e);
            }
            self.plan_invalidation(d, g, &mut round);
        }
        if result.is_ok() {
            result = self.flush_round(mem, &round);
        }
        for (_, g) in batch.iter_mut() {
            if result.is_ok() {
                g.complete(mem);
            } else {
                g.leak();
            }
        }
        result
    }

    /// The physical address `iova` translates to in `d`, if mapped (a pass-through domain:
    /// `iova` itself, below its input width).
    pub fn iova_to_phys<T: VtdMemory>(&self, mem: &T, d: &Domain, iova: u64) -> Option<u64> {
        d.check_unit(self.root).ok()?;
        match &d.table {
            Some(t) => t.translate(mem, iova).map(|t| t.pa),
            None => (d.input_bits() >= 64 || iova >> d.input_bits() == 0).then_some(iova),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Attach, replace, detach
    // -----------------------------------------------------------------------------------------

    /// Points `sid` (legacy: its context entry; scalable: the PASID entry of `pasid`, `None`
    /// meaning RID_PASID 0) at domain `d`. Fails with [`VtdError::AlreadyAttached`] if it has a
    /// domain (use [`replace`](Self::replace)); with [`VtdError::SnoopControlUnsupported`] if
    /// `d` enforces coherency and the unit lacks ECAP.SC; with [`VtdError::RmrrDevice`] if the
    /// device is held by the RMRR identity domain. Every check precedes every write.
    pub fn attach<T: VtdMemory>(
        &mut self,
        mem: &T,
        sid: u16,
        pasid: Option<u32>,
        d: &Domain,
    ) -> Result<(), VtdError> {
        self.attach_with(mem, sid, pasid, d, AttachOptions::default())
    }

    /// [`attach`](Self::attach) with options: `opts.ats` marks a device with a device TLB
    /// (see [`AttachOptions`]). Legacy mode writes TT = 01b (a pass-through domain cannot be
    /// combined with it: TT = 10b blocks translation requests). Scalable mode sets DTE in the
    /// device's context entry; as DTE is per device, attaching another PASID of the same SID
    /// with the other setting fails with [`VtdError::DeviceTlbMismatch`], and a context entry
    /// left from earlier attachments (none present now) is switched with one 64-bit store and
    /// a context-cache and PASID-cache invalidation.
    pub fn attach_with<T: VtdMemory>(
        &mut self,
        mem: &T,
        sid: u16,
        pasid: Option<u32>,
        d: &Domain,
        opts: AttachOptions,
    ) -> Result<(), VtdError> {
        self.check_sid(sid)?;
        self.check_not_rmrr(sid)?;
        let pasid = self.check_pasid(pasid)?;
        self.check_domain(d)?;
        if opts.ats {
            self.check_device_tlb(d)?;
            if !self.ats.has_room() {
                return Err(VtdError::DeviceTlbSlotsExhausted);
            }
        }
        match self.mode {
            TranslationMode::Legacy => {
                if let Some(slot) = self.context_slot(mem, sid, false)?
                    && self.read_context(mem, slot).present()
                {
                    return Err(VtdError::AlreadyAttached);
                }
                let slot = self
                    .context_slot(mem, sid, true)?
                    .ok_or(VtdError::NoMemory)?;
                let mut ce = self.context_entry_for(d);
                if opts.ats {
                    ce = ce.with_device_tlb();
                }
                mem.store128(slot, ce.lo, ce.hi);
                self.clean(mem, slot, 16);
            }
            TranslationMode::Scalable => {
                if let Some(loc) = self.pasid_slot(mem, sid, pasid, false, false)?
                    && self.read_pasid_entry(mem, loc.entry).present()
                {
                    return Err(VtdError::AlreadyAttached);
                }
                if let Some(ctx) = self.dte_change(mem, sid, opts.ats)? {
                    // No PASID of the device is present: switch DTE (in the first 64 bits, with
                    // P and the directory pointer) and drop cached copies before any entry
                    // below it becomes present.
                    let q0 = load64(mem, ctx) ^ ScalableContextEntry::DTE;
                    mem.store64(ctx, q0);
                    self.clean(mem, ctx, 8);
                    self.flush_write_buffer()?;
                    let mut ops = Ops::new();
                    ops.push(Op::ContextGlobal);
                    ops.push(Op::PasidCacheGlobal);
                    self.invalidate(mem, &ops)?;
                }
                let loc = self
                    .pasid_slot(mem, sid, pasid, true, opts.ats)?
                    .ok_or(VtdError::NoMemory)?;
                let pe = self.pasid_entry_for(d);
                // The entry is not present until its low half is written, last.
                mem.store128(loc.entry + 48, pe.q[6], pe.q[7]);
                mem.store128(loc.entry + 32, pe.q[4], pe.q[5]);
                mem.store128(loc.entry + 16, pe.q[2], pe.q[3]);
                mem.store128(loc.entry, pe.q[0], pe.q[1]);
                self.clean(mem, loc.entry, 64);
                if d.stage() == Stage::First {
                    self.fs_pasids.add(pasid);
                }
            }
        }
        if opts.ats {
            self.ats.insert(AtsSlot {
                sid,
                pasid,
                did: d.did,
            });
        }
        self.flush_write_buffer()?;
        if self.ids.cap.cm() {
            // Caching mode: not-present entries may be cached, tagged with domain id 0
            // (§6.1); making one present needs an invalidation.
            let mut ops = Ops::new();
            ops.push(Op::ContextDevice { did: 0, sid });
            if self.mode == TranslationMode::Scalable {
                ops.push(Op::PasidCacheGlobal);
            }
            ops.push(Op::IotlbDomain { did: 0 });
            self.invalidate(mem, &ops)?;
        }
        Ok(())
    }

    /// Moves `sid` (and `pasid`) from its current domain to `d`, make-before-break: at every
    /// instant the hardware finds either the old entry or the new one, never none and never a
    /// mix.
    ///
    /// * Legacy: the context entry is rewritten with one 128-bit store
    ///   ([`VtdMemory::store128`]); this covers second stage ⇄ pass-through (TT 00b/01b ⇄
    ///   10b) too.
    /// * Scalable, second stage or pass-through to second stage or pass-through: the fields
    ///   that change (PGTT, AW, SSPTPTR, DID, PGSNP) are all in the PASID entry's low 128 bits,
    ///   the rest is zero in both; one 128-bit store.
    /// * Scalable, first stage on either side: the first-stage pointer is in bits 191:140 of
    ///   the entry, so no single store covers it. The driver copies the whole 4 KiB PASID table
    ///   (64 entries, the other 63 unchanged), writes the new entry into the copy, and switches
    ///   the PASID-directory entry to the copy with one 64-bit store; the old table is retired
    ///   after the invalidation.
    ///
    /// Then: context-cache (legacy) or PASID-cache (scalable) invalidation of the old domain id
    /// for this device, IOTLB invalidation of the old domain id, and for a device attached with
    /// ATS a fence and a device-TLB invalidation of everything. The device-TLB setting is kept
    /// (legacy: a device-TLB attachment cannot move to pass-through,
    /// [`VtdError::DeviceTlbUnsupported`]). On any error before the store (snoop rule, bad SID
    /// or PASID, not attached, RMRR device, no memory for the copy) nothing changes. Replacing
    /// with the current domain is a no-op.
    pub fn replace<T: VtdMemory>(
        &mut self,
        mem: &T,
        sid: u16,
        pasid: Option<u32>,
        d: &Domain,
    ) -> Result<(), VtdError> {
        self.check_sid(sid)?;
        self.check_not_rmrr(sid)?;
        let pasid = self.check_pasid(pasid)?;
        self.check_domain(d)?;
        let ats = self.ats.get(sid, pasid);
        if ats.is_some() {
            self.check_device_tlb(d)?;
        }
        let mut ops = Ops::new();
        let mut retire = None;
        match self.mode {
            TranslationMode::Legacy => {
                let slot = self
                    .context_slot(mem, sid, false)?
                    .ok_or(VtdError::NotAttached)?;
                let old = self.read_context(mem, slot);
                if !old.present() {
                    return Err(VtdError::NotAttached);
                }
                let mut new = self.context_entry_for(d);
                if ats.is_some() {
                    new = new.with_device_tlb();
                }
                if old == new {
                    return Ok(());
                }
                mem.store128(slot, new.lo, new.hi);
                self.clean(mem, slot, 16);
                ops.push(Op::ContextDevice {
                    did: old.did(),
                    sid,
                });
                ops.push(Op::IotlbDomain { did: old.did() });
            }
            TranslationMode::Scalable => {
                let loc = self
                    .pasid_slot(mem, sid, pasid, false, false)?
                    .ok_or(VtdError::NotAttached)?;
                let old = self.read_pasid_entry(mem, loc.entry);
                if !old.present() {
                    return Err(VtdError::NotAttached);
                }
                let new = self.pasid_entry_for(d);
                if old == new {
                    return Ok(());
                }
                if old.upper_is_zero() && new.upper_is_zero() {
                    mem.store128(loc.entry, new.q[0], new.q[1]);
                    self.clean(mem, loc.entry, 16);
                } else {
                    retire = Some(self.swap_pasid_table(mem, loc, &new)?);
                }
                let old_fs = old.pgtt() == Some(Pgtt::FirstStage);
                if old_fs {
                    self.fs_pasids.remove(pasid);
                }
                if d.stage() == Stage::First {
                    self.fs_pasids.add(pasid);
                }
                ops.push(Op::PasidCachePasid {
                    did: old.did(),
                    pasid,
                });
                ops.push(if old_fs {
                    Op::PasidIotlbAll {
                        did: old.did(),
                        pasid,
                    }
                } else {
                    Op::IotlbDomain { did: old.did() }
                });
            }
        }
        if let Some(slot) = ats {
            ops.push(Op::Fence);
            ops.push(device_tlb_op(slot, 0, DEVICE_TLB_ALL));
            self.ats.set_did(sid, pasid, d.did);
        }
        self.flush_write_buffer()?;
        self.invalidate(mem, &ops)?;
        if let Some(old_table) = retire {
            // Only now can no walk still be inside the old PASID table.
            mem.retire_table(old_table, 4096);
        }
        Ok(())
    }

    /// Removes `sid`'s (and `pasid`'s) domain: the entry is made not present (DMA from the
    /// device then faults), then the context or PASID cache and the IOTLB are invalidated for
    /// the old domain id, and for a device attached with ATS its device TLB (after a fence).
    /// An RMRR device is refused ([`VtdError::RmrrDevice`]).
    pub fn detach<T: VtdMemory>(
        &mut self,
        mem: &T,
        sid: u16,
        pasid: Option<u32>,
    ) -> Result<(), VtdError> {
        self.check_sid(sid)?;
        self.check_not_rmrr(sid)?;
        self.detach_unchecked(mem, sid, pasid)
    }

    /// [`detach`](Self::detach) without the RMRR guard (RMRR unwinding).
    pub(super) fn detach_unchecked<T: VtdMemory>(
        &mut self,
        mem: &T,
        sid: u16,
        pasid: Option<u32>,
    ) -> Result<(), VtdError> {
        self.check_sid(sid)?;
        let pasid = self.check_pasid(pasid)?;
        let mut ops = Ops::new();
        let mut clear_rest = None;
        match self.mode {
            TranslationMode::Legacy => {
                let slot = self
                    .context_slot(mem, sid, false)?
                    .ok_or(VtdError::NotAttached)?;
                let old = self.read_context(mem, slot);
                if !old.present() {
                    return Err(VtdError::NotAttached);
                }
                // P is in the low word: clearing it first makes the entry not present at once.
                mem.store64(slot, 0);
                mem.store64(slot + 8, 0);
                self.clean(mem, slot, 16);
                ops.push(Op::ContextDevice {
                    did: old.did(),
                    sid,
                });
                ops.push(Op::IotlbDomain { did: old.did() });
            }
            TranslationMode::Scalable => {
                let loc = self
                    .pasid_slot(mem, sid, pasid, false, false)?
                    .ok_or(VtdError::NotAttached)?;
                let old = self.read_pasid_entry(mem, loc.entry);
                if !old.present() {
                    return Err(VtdError::NotAttached);
                }
                mem.store64(loc.entry, 0);
                self.clean(mem, loc.entry, 8);
                clear_rest = Some(loc.entry);
                let old_fs = old.pgtt() == Some(Pgtt::FirstStage);
                if old_fs {
                    self.fs_pasids.remove(pasid);
                }
                ops.push(Op::PasidCachePasid {
                    did: old.did(),
                    pasid,
                });
                ops.push(if old_fs {
                    Op::PasidIotlbAll {
                        did: old.did(),
                        pasid,
                    }
                } else {
                    Op::IotlbDomain { did: old.did() }
                });
            }
        }
        if let Some(slot) = self.ats.get(sid, pasid) {
            ops.push(Op::Fence);
            ops.push(device_tlb_op(slot, 0, DEVICE_TLB_ALL));
            self.ats.remove(sid, pasid);
        }
        self.flush_write_buffer()?;
        self.invalidate(mem, &ops)?;
        if let Some(entry) = clear_rest {
            // Hygiene once no cached copy can exist: the whole entry reads as zero.
            for i in 1..8 {
                mem.store64(entry + 8 * i, 0);
            }
            self.clean(mem, entry, 64);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Every requester ID of one device: DMA aliases
    // -----------------------------------------------------------------------------------------

    /// The domain id `sid` (and PASID `pasid`) points at now, if any.
    fn attached_did<T: VtdMemory>(
        &self,
        mem: &T,
        sid: u16,
        pasid: u32,
    ) -> Result<Option<u16>, VtdError> {
        Ok(match self.mode {
            TranslationMode::Legacy => self
                .context_slot(mem, sid, false)?
                .map(|slot| self.read_context(mem, slot))
                .filter(|ce| ce.present())
                .map(|ce| ce.did()),
            TranslationMode::Scalable => self
                .pasid_slot(mem, sid, pasid, false, false)?
                .map(|loc| self.read_pasid_entry(mem, loc.entry))
                .filter(|pe| pe.present())
                .map(|pe| pe.did()),
        })
    }

    /// The domain id `sid` (and `pasid`, `None` meaning RID_PASID 0) translates through now, or
    /// `None` if it is not attached. Lets a caller tell a DMA alias a group peer already put on
    /// the right domain from one that points elsewhere.
    pub fn domain_id_of<T: VtdMemory>(
        &self,
        mem: &T,
        sid: u16,
        pasid: Option<u32>,
    ) -> Result<Option<u16>, VtdError> {
        self.check_sid(sid)?;
        let p = self.check_pasid(pasid)?;
        self.attached_did(mem, sid, p)
    }

    /// Checks every ID of an alias set before anything is written: in range, not held by the
    /// RMRR identity domain, at most [`MAX_ALIAS_SIDS`].
    fn check_alias_set(&self, sids: &[u16]) -> Result<(), VtdError> {
        if let Some(&sid) = sids.get(MAX_ALIAS_SIDS) {
            return Err(VtdError::BadSid { sid });
        }
        for &sid in sids {
            self.check_sid(sid)?;
            self.check_not_rmrr(sid)?;
        }
        Ok(())
    }

    /// Attaches every source-id one device's DMA may carry to `d`: `sids[0]` is the device's own
    /// requester ID, the rest its DMA aliases (a conventional device behind a PCIe-to-PCI bridge
    /// reaches the unit as `(secondary bus, 00.0)` or as the bridge, PCIe-to-PCI/PCI-X Bridge
    /// Spec §2.3), each getting a context entry (legacy) or PASID entry (scalable) like
    /// [`attach`](Self::attach) writes.
    ///
    /// An alias already pointing at `d` is left as it is: devices of one IOMMU group share
    /// aliases, and attaching the second to the group's domain finds them there. The device's
    /// own ID must not be attached, and no alias may point at another domain
    /// ([`VtdError::AlreadyAttached`]). All checks precede all writes; if an attach fails
    /// part-way (no memory, a timeout), the IDs this call attached are detached again. Faults on
    /// an alias count for the device afterwards ([`fault_count`](Self::fault_count),
    /// [`owner_of`](Self::owner_of)). An empty list attaches nothing.
    pub fn attach_aliases<T: VtdMemory>(
        &mut self,
        mem: &T,
        sids: &[u16],
        pasid: Option<u32>,
        d: &Domain,
    ) -> Result<(), VtdError> {
        let Some(&own) = sids.first() else {
            return Ok(());
        };
        self.check_alias_set(sids)?;
        let p = self.check_pasid(pasid)?;
        self.check_domain(d)?;
        if self.attached_did(mem, own, p)?.is_some() {
            return Err(VtdError::AlreadyAttached);
        }
        for &sid in &sids[1..] {
            if self
                .attached_did(mem, sid, p)?
                .is_some_and(|did| did != d.did)
            {
                return Err(VtdError::AlreadyAttached);
            }
        }
        let mut attached = 0u64;
        for (i, &sid) in sids.iter().enumerate() {
            if sids[..i].contains(&sid) || self.attached_did(mem, sid, p)?.is_some() {
                continue;
            }
            if let Err(err) = self.attach(mem, sid, pasid, d) {
                for (j, &undo) in sids[..i].iter().enumerate() {
                    if attached & (1 << j) != 0 {
                        // Best effort: the entry was written by this call; a failure here
                        // would be the same hardware failure already being reported.
                        let _ = self.detach_unchecked(mem, undo, pasid);
                    }
                }
                return Err(err);
            }
            attached |= 1 << i;
        }
        for &alias in &sids[1..] {
            if alias != own {
                self.alias_owner.insert(alias, own);
            }
        }
        Ok(())
    }

    /// Moves every ID of `sids` (own ID first, then aliases, as given to
    /// [`attach_aliases`](Self::attach_aliases)) to `d`, each make-before-break as
    /// [`replace`](Self::replace) does. All must be attached (else [`VtdError::NotAttached`]
    /// before anything changes). The IDs move one after the other: until the last has moved,
    /// DMA carrying a later alias still uses the old domain. An error part-way leaves the IDs
    /// before it on `d` and the rest on their old domain.
    pub fn replace_aliases<T: VtdMemory>(
        &mut self,
        mem: &T,
        sids: &[u16],
        pasid: Option<u32>,
        d: &Domain,
    ) -> Result<(), VtdError> {
        self.check_alias_set(sids)?;
        let p = self.check_pasid(pasid)?;
        self.check_domain(d)?;
        for &sid in sids {
            if self.attached_did(mem, sid, p)?.is_none() {
                return Err(VtdError::NotAttached);
            }
        }
        for (i, &sid) in sids.iter().enumerate() {
            if !sids[..i].contains(&sid) {
                self.replace(mem, sid, pasid, d)?;
            }
        }
        Ok(())
    }

    /// Detaches every attached ID of `sids` (own ID first; [`VtdError::NotAttached`] if that one
    /// is not attached, before anything changes). Pass only the aliases no other attached
    /// device shares: an alias is one context entry for all of its users. Faults on the
    /// aliases keep being attributed to the device (DMA it still issues faults now).
    pub fn detach_aliases<T: VtdMemory>(
        &mut self,
        mem: &T,
        sids: &[u16],
        pasid: Option<u32>,
    ) -> Result<(), VtdError> {
        let Some(&own) = sids.first() else {
            return Ok(());
        };
        self.check_alias_set(sids)?;
        let p = self.check_pasid(pasid)?;
        if self.attached_did(mem, own, p)?.is_none() {
            return Err(VtdError::NotAttached);
        }
        for (i, &sid) in sids.iter().enumerate() {
            if !sids[..i].contains(&sid) && self.attached_did(mem, sid, p)?.is_some() {
                self.detach_unchecked(mem, sid, pasid)?;
            }
        }
        Ok(())
    }

    /// The device a fault on `sid` concerns: the device whose alias set was last given to
    /// [`attach_aliases`](Self::attach_aliases) with it (devices sharing an alias are one
    /// IOMMU group, so any of them names the group), else `sid` itself.
    pub fn owner_of(&self, sid: u16) -> u16 {
        self.alias_owner.get(&sid).copied().unwrap_or(sid)
    }

    /// Whether `sid` has a device TLB (was attached with [`AttachOptions::ats`]) through
    /// `pasid` (`None`: RID_PASID).
    pub fn device_tlb_enabled(&self, sid: u16, pasid: Option<u32>) -> bool {
        self.ats.get(sid, pasid.unwrap_or(0)).is_some()
    }

    // -----------------------------------------------------------------------------------------
    // Faults and counters
    // -----------------------------------------------------------------------------------------

    /// Drains every fault recording register (from FSTS.FRI, wrapping over CAP.NFR), decodes
    /// each record, clears it (F is RW1C), counts it per source id and passes it to `sink`;
    /// then clears FSTS.PFO if set, counting it as lost faults. At most NFR records per call.
    pub fn poll_faults(&mut self, sink: &mut dyn FnMut(&FaultRecord)) -> FaultPoll {
        fault::drain(&self.mmio, self.ids.cap, &mut self.faults, sink)
    }

    /// Faults recorded for `sid` and for the DMA aliases attached for it with
    /// [`attach_aliases`](Self::attach_aliases) (0 for a source id beyond the counters'
    /// capacity, see [`Counters::faults_untracked`]).
    pub fn fault_count(&self, sid: u16) -> u64 {
        // Faults on a DMA alias attached for this device are the device's.
        let on_aliases: u64 = self
            .alias_owner
            .iter()
            .filter(|&(_, &owner)| owner == sid)
            .map(|(&alias, _)| self.faults.count(alias))
            .sum();
        self.faults.count(sid) + on_aliases
    }

    /// Primary fault overflow events (FSTS.PFO) seen.
    pub fn faults_lost(&self) -> u64 {
        self.faults.lost
    }

    pub fn counters(&self) -> Counters {
        let s = &self.stats;
        let get = |c: &core::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            qi_descriptors: get(&s.qi_descriptors),
            qi_waits: get(&s.qi_waits),
            register_invalidations: get(&s.register_invalidations),
            iotlb_psi: get(&s.iotlb_psi),
            iotlb_dsi: get(&s.iotlb_dsi),
            iotlb_global: get(&s.iotlb_global),
            context_invalidations: get(&s.context_invalidations),
            pasid_cache_invalidations: get(&s.pasid_cache_invalidations),
            pasid_iotlb_invalidations: get(&s.pasid_iotlb_invalidations),
            write_buffer_flushes: get(&s.write_buffer_flushes),
            queue_errors: get(&s.queue_errors),
            device_tlb_invalidations: get(&s.device_tlb_invalidations),
            faults: self.faults.total,
            faults_lost: self.faults.lost,
            faults_untracked: self.faults.untracked,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Internals: registers
    // -----------------------------------------------------------------------------------------

    fn gsts(&self) -> GlobalStatus {
        GlobalStatus::from_bits_retain(self.mmio.read32(offset::GSTS))
    }

    /// Polls GSTS until `flag` is `on`.
    fn poll_gsts(&self, flag: GlobalStatus, on: bool, what: &'static str) -> Result<(), VtdError> {
        for _ in 0..self.budget {
            if self.gsts().contains(flag) == on {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(VtdError::Timeout { what })
    }

    /// Turns a persistent GCMD bit on or off. GCMD is write-only and every write is a whole
    /// command, so the write carries the persistent bits now in effect (§11.4.4).
    fn set_persistent(
        &self,
        bit: GlobalCommand,
        on: bool,
        what: &'static str,
    ) -> Result<(), VtdError> {
        let current = GlobalCommand::from_status(self.gsts());
        let cmd = if on { current | bit } else { current - bit };
        self.mmio.write32(offset::GCMD, cmd.bits());
        self.poll_gsts(bit.status_flag(), on, what)
    }

    /// Issues a one-shot GCMD bit and polls `flag` until it equals `done`.
    fn one_shot(
        &self,
        bit: GlobalCommand,
        flag: GlobalStatus,
        done: bool,
        what: &'static str,
    ) -> Result<(), VtdError> {
        let cmd = GlobalCommand::from_status(self.gsts()) | bit;
        self.mmio.write32(offset::GCMD, cmd.bits());
        self.poll_gsts(flag, done, what)
    }

    /// CAP.RWBF: flush the write buffer (GCMD.WBF, poll GSTS.WBFS clear) so the hardware sees
    /// table updates. Serialised with the invalidation path (map/unmap call it concurrently).
    fn flush_write_buffer(&self) -> Result<(), VtdError> {
        if !self.ids.cap.rwbf() {
            return Ok(());
        }
        let _guard = self.inv.lock()?;
        bump(&self.stats.write_buffer_flushes);
        self.one_shot(GlobalCommand::WBF, GlobalStatus::WBFS, false, "GSTS.WBFS")
    }

    /// Invalidates the interrupt entry cache (VT-d 4.1 §6.5.2.7) through the invalidation
    /// queue: every entry (`None`), or the 2^`mask` entries from `index`. Interrupt remapping
    /// (`vtd::intremap`) calls it after changing IRTEs.
    pub fn invalidate_interrupt_entries<T: VtdMemory>(
        &self,
        mem: &T,
        index: Option<(u16, u8)>,
    ) -> Result<(), VtdError> {
        let mut ops = Ops::new();
        ops.push(Op::InterruptEntryCache { index });
        self.invalidate(mem, &ops)
    }

    fn invalidate<T: VtdMemory>(&self, mem: &T, ops: &Ops) -> Result<(), VtdError> {
        self.inv.run(&self.mmio, mem, ops.as_slice(), &self.stats)
    }

    /// Invalidates the IOTLB for `[start, end)` of `d` (see [`unmap`](Self::unmap)), in a
    /// round of its own.
    fn flush_range<T: VtdMemory>(
        &self,
        mem: &T,
        d: &Domain,
        start: u64,
        end: u64,
        leaf_only: bool,
    ) -> Result<(), VtdError> {
        let mut round = InvalidationRound::new();
        self.plan_range(d, start, end, leaf_only, &mut round);
        self.run_round(mem, &round)
    }

    /// Adds the invalidations of `[start, end)` of `d` to `round`.
    fn plan_range(
        &self,
        d: &Domain,
        start: u64,
        end: u64,
        leaf_only: bool,
        round: &mut InvalidationRound,
    ) {
        let cap = self.ids.cap;
        let (addr, am) = psi_block(start, end);
        let psi = am <= cap.mamv();
        match d.stage() {
            Stage::Second => round.push_iotlb(if psi && cap.psi() {
                Op::IotlbPages {
                    did: d.did,
                    addr,
                    am,
                    leaf_only,
                }
            } else {
                Op::IotlbDomain { did: d.did }
            }),
            // Nothing is cached from a table that does not exist.
            Stage::PassThrough => {}
            Stage::First => {
                if self.fs_pasids.overflow != 0 {
                    round.push_iotlb(Op::IotlbGlobal);
                } else {
                    for pasid in self.fs_pasids.iter() {
                        round.push_iotlb(if psi {
                            Op::PasidIotlbPages {
                                did: d.did,
                                pasid,
                                addr,
                                am,
                                leaf_only,
                            }
                        } else {
                            Op::PasidIotlbAll { did: d.did, pasid }
                        });
                    }
                }
            }
        }
        for slot in self.ats.for_domain(d.did) {
            round.push_device(device_tlb_op(slot, addr, am));
        }
    }

    /// Issues `round` as one batch: IOTLB descriptors, a fence and the device-TLB
    /// descriptors if any, one wait (see [`InvalidationRound`]).
    fn run_round<T: VtdMemory>(&self, mem: &T, round: &InvalidationRound) -> Result<(), VtdError> {
        if !round.everything && round.n_device == 0 {
            // The common case: the IOTLB descriptors as they are (the queue adds the wait).
            return self.invalidate_ops(mem, &round.iotlb[..round.n_iotlb]);
        }
        let mut ops = [Op::Fence; InvalidationRound::OPS];
        let mut n = 0;
        let mut push = |op: Op| {
            if n < ops.len() {
                ops[n] = op;
                n += 1;
            }
        };
        if round.everything {
            push(Op::IotlbGlobal);
            let mut devices = self.ats.slots.iter().flatten().peekable();
            if devices.peek().is_some() {
                push(Op::Fence);
                for &slot in devices {
                    push(device_tlb_op(slot, 0, DEVICE_TLB_ALL));
                }
            }
        } else {
            for &op in &round.iotlb[..round.n_iotlb] {
                push(op);
            }
            if round.n_device != 0 {
                push(Op::Fence);
                for &op in &round.device[..round.n_device] {
                    push(op);
                }
            }
        }
        self.invalidate_ops(mem, &ops[..n])
    }

    fn invalidate_ops<T: VtdMemory>(&self, mem: &T, ops: &[Op]) -> Result<(), VtdError> {
        self.inv.run(&self.mmio, mem, ops, &self.stats)
    }

    // -----------------------------------------------------------------------------------------
    // Internals: structures
    // -----------------------------------------------------------------------------------------

    fn clean<T: VtdMemory>(&self, mem: &T, pa: u64, bytes: usize) {
        if !self.coherent_structures {
            mem.clean(pa, bytes);
        }
    }

    /// A zeroed, cleaned structure page.
    fn new_page<T: VtdMemory>(&self, mem: &T) -> Result<u64, VtdError> {
        let pa = mem.alloc_table(4096).ok_or(VtdError::NoMemory)?;
        self.clean(mem, pa, 4096);
        Ok(pa)
    }

    pub(super) fn check_sid(&self, sid: u16) -> Result<(), VtdError> {
        let bus = (sid >> 8) as u8;
        if bus < self.buses.0 || bus > self.buses.1 {
            return Err(VtdError::BadSid { sid });
        }
        Ok(())
    }

    /// The PASID an operation addresses: 0 (RID_PASID) for `None`.
    fn check_pasid(&self, pasid: Option<u32>) -> Result<u32, VtdError> {
        match pasid {
            None | Some(0) => Ok(0),
            Some(p) => {
                let ecap = self.ids.ecap;
                if self.mode == TranslationMode::Legacy || !ecap.pasid() {
                    return Err(VtdError::PasidUnsupported);
                }
                let limit = (1u32 << ecap.pasid_bits().min(20)).min(PASIDS_PER_DIRECTORY);
                if p >= limit {
                    return Err(VtdError::PasidOutOfRange { pasid: p, limit });
                }
                Ok(p)
            }
        }
    }

    fn check_not_rmrr(&self, sid: u16) -> Result<(), VtdError> {
        if self.rmrr.holds(sid) {
            return Err(VtdError::RmrrDevice { sid });
        }
        Ok(())
    }

    /// A device TLB needs ECAP.DT and the queue (device-TLB invalidations are queue
    /// descriptors only); a legacy pass-through entry (TT = 10b) blocks translation requests.
    fn check_device_tlb(&self, d: &Domain) -> Result<(), VtdError> {
        let ecap = self.ids.ecap;
        let legacy_pt = self.mode == TranslationMode::Legacy && d.is_pass_through();
        if !(ecap.dt() && ecap.qi()) || legacy_pt {
            return Err(VtdError::DeviceTlbUnsupported);
        }
        Ok(())
    }

    /// Scalable mode: the context entry of `sid` if it exists with DTE ≠ `want` and may be
    /// switched (no PASID entry of the device is present); [`VtdError::DeviceTlbMismatch`] if
    /// one is.
    fn dte_change<T: VtdMemory>(
        &self,
        mem: &T,
        sid: u16,
        want: bool,
    ) -> Result<Option<u64>, VtdError> {
        let Some(ctx) = self.sm_context_slot(mem, sid, false)? else {
            return Ok(None);
        };
        let ce = ScalableContextEntry {
            q: load_words::<T, 4>(mem, ctx),
        };
        if !ce.present() || ce.device_tlb() == want {
            return Ok(None);
        }
        if self.pasid_entries_in_dir(mem, &ce, None) != 0 {
            return Err(VtdError::DeviceTlbMismatch { sid });
        }
        Ok(Some(ctx))
    }

    fn check_domain(&self, d: &Domain) -> Result<(), VtdError> {
        d.check_unit(self.root)?;
        if d.stage() == Stage::First && self.mode == TranslationMode::Legacy {
            return Err(VtdError::FirstStageUnsupported);
        }
        if d.enforce_cache_coherency() && !self.ids.ecap.sc() {
            return Err(VtdError::SnoopControlUnsupported);
        }
        Ok(())
    }

    fn read_root<T: VtdMemory>(&self, mem: &T, bus: u8) -> (u64, RootEntry) {
        let pa = self.root + bus as u64 * 16;
        let [lo, hi] = load_words::<T, 2>(mem, pa);
        (pa, RootEntry { lo, hi })
    }

    fn read_context<T: VtdMemory>(&self, mem: &T, slot: u64) -> ContextEntry {
        let [lo, hi] = load_words::<T, 2>(mem, slot);
        ContextEntry { lo, hi }
    }

    fn read_pasid_entry<T: VtdMemory>(&self, mem: &T, slot: u64) -> PasidEntry {
        PasidEntry {
            q: load_words::<T, 8>(mem, slot),
        }
    }

    /// Legacy: the context entry of `sid`, creating its context table if `create`.
    fn context_slot<T: VtdMemory>(
        &self,
        mem: &T,
        sid: u16,
        create: bool,
    ) -> Result<Option<u64>, VtdError> {
        let (bus, devfn) = ((sid >> 8) as u8, sid & 0xff);
        let (re_pa, re) = self.read_root(mem, bus);
        let table = if re.present() {
            re.context_table()
        } else if create {
            let t = self.new_page(mem)?;
            let new = RootEntry::legacy(t);
            mem.store128(re_pa, new.lo, new.hi);
            self.clean(mem, re_pa, 16);
            t
        } else {
            return Ok(None);
        };
        Ok(Some(table + devfn as u64 * 16))
    }

    /// Scalable mode: the 32-byte context entry of `sid`, creating its (lower or upper)
    /// context table if `create`.
    fn sm_context_slot<T: VtdMemory>(
        &self,
        mem: &T,
        sid: u16,
        create: bool,
    ) -> Result<Option<u64>, VtdError> {
        let (bus, devfn) = ((sid >> 8) as u8, sid & 0xff);
        let upper = devfn >= SM_CONTEXT_ENTRIES as u16;
        let (re_pa, re) = self.read_root(mem, bus);
        let table = if upper { re.upper() } else { re.lower() };
        let table = match table {
            Some(t) => t,
            None if create => {
                let t = self.new_page(mem)?;
                // Both halves in one store: the other half keeps its value.
                let new = if upper {
                    RootEntry {
                        lo: re.lo,
                        hi: (t & ADDR) | P,
                    }
                } else {
                    RootEntry {
                        lo: (t & ADDR) | P,
                        hi: re.hi,
                    }
                };
                mem.store128(re_pa, new.lo, new.hi);
                self.clean(mem, re_pa, 16);
                t
            }
            None => return Ok(None),
        };
        Ok(Some(table + (devfn as u64 & 0x7f) * 32))
    }

    /// Scalable mode: where the PASID entry of (`sid`, `pasid`) lives, creating the context
    /// entry (with DTE = `dte`), PASID directory and PASID table on the way if `create`.
    fn pasid_slot<T: VtdMemory>(
        &self,
        mem: &T,
        sid: u16,
        pasid: u32,
        create: bool,
        dte: bool,
    ) -> Result<Option<PasidLoc>, VtdError> {
        let Some(ctx) = self.sm_context_slot(mem, sid, create)? else {
            return Ok(None);
        };
        let ce = ScalableContextEntry {
            q: load_words::<T, 4>(mem, ctx),
        };
        let dir = if ce.present() {
            // Written by this driver with a one-page directory; a smaller PDTS (not ours)
            // would not cover the PASID.
            if (pasid as usize >> 6) >= ce.pasid_dir_entries().min(PASID_DIR_ENTRIES) {
                return Err(VtdError::PasidOutOfRange {
                    pasid,
                    limit: (ce.pasid_dir_entries().min(PASID_DIR_ENTRIES) * 64) as u32,
                });
            }
            ce.pasid_dir()
        } else if create {
            let dir = self.new_page(mem)?;
            let new = ScalableContextEntry::new(dir, PDTS_ONE_PAGE, self.ids.ecap.pasid())
                .with_device_tlb(dte);
            mem.store128(ctx + 16, new.q[2], new.q[3]);
            mem.store128(ctx, new.q[0], new.q[1]);
            self.clean(mem, ctx, 32);
            dir
        } else {
            return Ok(None);
        };
        let dir_entry = dir + (pasid as u64 >> 6) * 8;
        let de = load64(mem, dir_entry);
        let table = if de & P != 0 {
            de & ADDR
        } else if create {
            let t = self.new_page(mem)?;
            mem.store64(dir_entry, pasid_dir_entry(t));
            self.clean(mem, dir_entry, 8);
            t
        } else {
            return Ok(None);
        };
        let index = pasid as u64 % PASID_TABLE_ENTRIES as u64;
        Ok(Some(PasidLoc {
            dir_entry,
            entry: table + index * 64,
        }))
    }

    /// The legacy context entry that attaches `d` (without device TLB).
    fn context_entry_for(&self, d: &Domain) -> ContextEntry {
        if d.is_pass_through() {
            ContextEntry::pass_through(d.levels(), d.did)
        } else {
            ContextEntry::second_stage(d.root(), d.levels(), d.did)
        }
    }

    /// The PASID entry that attaches `d`.
    fn pasid_entry_for(&self, d: &Domain) -> PasidEntry {
        let flags = PasidEntryFlags {
            page_snoop: d.enforce_cache_coherency(),
            walk_snoop: self.ids.ecap.smpwcs(),
            ss_access_dirty: d.config().dirty_tracking && d.stage() == Stage::Second,
        };
        match d.stage() {
            Stage::Second => PasidEntry::second_stage(d.root(), d.levels(), d.did, flags),
            Stage::First => {
                let aw_levels = self.ids.cap.sagaw().max_levels().unwrap_or(4) as u32;
                PasidEntry::first_stage(d.root(), d.levels(), aw_levels, d.did, flags)
            }
            Stage::PassThrough => PasidEntry::pass_through(d.levels(), d.did),
        }
    }

    /// Replaces the PASID entry at `loc` by `new` through a copy of its PASID table and one
    /// 64-bit store to the directory entry. Returns the old table, to retire once the caches
    /// are invalidated. Nothing changes if the copy cannot be allocated.
    fn swap_pasid_table<T: VtdMemory>(
        &self,
        mem: &T,
        loc: PasidLoc,
        new: &PasidEntry,
    ) -> Result<u64, VtdError> {
        let old_table = loc.entry & ADDR;
        let copy = mem.alloc_table(4096).ok_or(VtdError::NoMemory)?;
        // Nobody can reach the copy yet: plain word copies, then the new entry.
        for i in 0..512u64 {
            mem.store64(copy + 8 * i, load64(mem, old_table + 8 * i));
        }
        let entry = copy + (loc.entry & 0xfff);
        for (i, &w) in new.q.iter().enumerate() {
            mem.store64(entry + 8 * i as u64, w);
        }
        self.clean(mem, copy, 4096);
        // The switch: one single-copy-atomic store of the directory entry.
        mem.store64(loc.dir_entry, pasid_dir_entry(copy));
        self.clean(mem, loc.dir_entry, 8);
        Ok(old_table)
    }

    /// How many context entries (legacy) or PASID entries (scalable) use domain id `did`: a
    /// walk over every structure the driver built (bounded by the memory it allocated).
    fn references<T: VtdMemory>(&self, mem: &T, did: u16) -> u32 {
        let mut n = 0;
        for bus in 0..=255u8 {
            let (_, re) = self.read_root(mem, bus);
            match self.mode {
                TranslationMode::Legacy => {
                    if !re.present() {
                        continue;
                    }
                    for devfn in 0..256u64 {
                        let ce = self.read_context(mem, re.context_table() + devfn * 16);
                        if ce.present() && ce.did() == did {
                            n += 1;
                        }
                    }
                }
                TranslationMode::Scalable => {
                    for table in [re.lower(), re.upper()].into_iter().flatten() {
                        for i in 0..SM_CONTEXT_ENTRIES as u64 {
                            let ce = ScalableContextEntry {
                                q: load_words::<T, 4>(mem, table + i * 32),
                            };
                            if ce.present() {
                                n += self.pasid_entries_in_dir(mem, &ce, Some(did));
                            }
                        }
                    }
                }
            }
        }
        n
    }

    /// Present PASID entries under the context entry `ce` with domain id `did` (any, for
    /// `None`).
    fn pasid_entries_in_dir<T: VtdMemory>(
        &self,
        mem: &T,
        ce: &ScalableContextEntry,
        did: Option<u16>,
    ) -> u32 {
        let mut n = 0;
        let entries = ce.pasid_dir_entries().min(PASID_DIR_ENTRIES) as u64;
        for j in 0..entries {
            let de = load64(mem, ce.pasid_dir() + j * 8);
            if de & P == 0 {
                continue;
            }
            for k in 0..PASID_TABLE_ENTRIES as u64 {
                let pe = (de & ADDR) + k * 64;
                let q0 = load64(mem, pe);
                if q0 & P != 0 && did.is_none_or(|did| load64(mem, pe + 8) as u16 == did) {
                    n += 1;
                }
            }
        }
        n
    }
}

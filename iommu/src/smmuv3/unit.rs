//! One SMMUv3: bring-up, domains, attach/bypass/abort with ordered STE updates, map/unmap with
//! TLB invalidation, event draining.
//!
//! Concurrency: operations that change which translation a stream uses (`attach`,
//! `set_bypass`, `set_abort`), domain creation and destruction, and event draining take
//! `&mut self`; `map`, `unmap` and `iova_to_phys` take `&self` and may run on many CPUs at once
//! under the page-table engine's disjoint-range contract. The command queue they share is
//! serialised by a bounded spin lock (see [`cmdq`](super::cmdq)).

use core::sync::atomic::{AtomicU64, Ordering, fence};

use alloc::collections::BTreeMap;

use crate::hw::Mmio;
use crate::pgtable::format::ARM_S1_MAIR;
use crate::pgtable::sync::PteAtomic;
use crate::pgtable::{
    Config, ConfigError, Gather, MapError, MapOutput, PhysAddr, Prot, TableMemory,
};

use super::cd::{CD_BYTES, Cd, CdFields};
use super::cmdq::{Command, CommandQueue, Stats, TlbiRange};
use super::domain::{Domain, DomainConfig, Kind, S1Table, S2Table, Stage, Window, WindowMem};
use super::error::SmmuError;
use super::eventq::{Event, EventPoll, EventQueue, EventStats};
use super::regs::{
    AccessAttrs, Cr0, Cr2, Gbpa, Gerror, IrqCtrl, SmmuIdRegs, StLevel, TableFormat, TtEndian,
    cr1_value, offset, queue_base_value, strtab_base_value, write64_split,
};
use super::ste::{STE_BYTES, Ste, Step, plan_update};
use super::stream_table::{StreamTable, load_ste, store64};

/// Stage-2 domains that may be parents of nested domains at the same time.
pub const MAX_NESTED_PARENTS: usize = 16;

/// Per-page TLB invalidations `unmap` issues at most without range invalidation (IDR3.RIL = 0)
/// before it invalidates the whole ASID or VMID instead.
pub const MAX_PAGE_TLBIS: u64 = 32;

/// How to bring an SMMU up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    /// Iterations of every poll loop (CR0ACK, GBPA.UPDATE, IRQ_CTRLACK, command queue space,
    /// CMD_SYNC completion, the command queue lock) before it gives up with
    /// [`SmmuError::Timeout`]. Each iteration is one or a few register reads plus a spin-loop
    /// hint.
    pub poll_budget: u32,
    /// Whether the SMMU's accesses to tables, queues and CDs are coherent with the CPU caches.
    /// `None`: IDR0.COHACC. Firmware (IORT COHACC override, DT `dma-coherent`) may know better.
    /// When false, the driver and the page-table engine clean everything they write
    /// (`TableMemory::clean`) and program non-cacheable attributes (CR1, STE, CD).
    pub coherent: Option<bool>,
    /// StreamID bits to cover: the StreamIDs firmware says exist (IORT ID mappings, DT
    /// `iommu-map`). `None` (or more than IDR1.SIDSIZE): IDR1.SIDSIZE. Sizes the stream table.
    pub stream_id_bits: Option<u32>,
    /// log2 of the command queue entries (capped by IDR1.CMDQS). 8: 256 commands, 4 KiB.
    pub cmdq_log2: u8,
    /// log2 of the event queue entries (capped by IDR1.EVENTQS). 7: 128 records, 4 KiB.
    pub eventq_log2: u8,
    /// Pages in the structure window of a nested parent (a power of two, 2..=32768); see
    /// [`domain`](super::domain). 256: 1 MiB, 255 table pages and CDs.
    pub nested_window_pages: u32,
    /// Enable the wired GERROR and event queue interrupts (IRQ_CTRL). Off: poll.
    pub irqs: bool,
}

impl UnitConfig {
    pub const fn new() -> Self {
        UnitConfig {
            poll_budget: 1_000_000,
            coherent: None,
            stream_id_bits: None,
            cmdq_log2: 8,
            eventq_log2: 7,
            nested_window_pages: 256,
            irqs: false,
        }
    }
}

impl Default for UnitConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// A snapshot of the SMMU's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Commands written to the queue (CMD_SYNCs included).
    pub commands: u64,
    pub syncs: u64,
    /// TLB invalidations by address range (TG ≠ 0, IDR3.RIL).
    pub tlbi_range: u64,
    /// TLB invalidations of one address.
    pub tlbi_va: u64,
    /// TLB invalidations of a whole ASID.
    pub tlbi_asid: u64,
    /// TLB invalidations of a whole VMID (S12_VMALL, NH_ALL).
    pub tlbi_vmid: u64,
    /// TLB invalidations of everything (NSNH_ALL, EL2_ALL).
    pub tlbi_all: u64,
    /// Configuration cache invalidations (CFGI_*).
    pub cfgi: u64,
    /// Command errors recovered (CERROR_*).
    pub cmdq_errors: u64,
    /// STE changes, and how many of them broke through abort.
    pub ste_updates: u64,
    pub ste_breaks: u64,
    /// Event records drained.
    pub events: u64,
    /// Event losses seen (overflows and aborted event writes).
    pub events_lost: u64,
    /// Events of StreamIDs beyond the per-StreamID counters' capacity.
    pub events_untracked: u64,
    /// Global errors (GERROR bits other than CMDQ_ERR) acknowledged.
    pub global_errors: u64,
}

/// ASID or VMID allocator; id 0 is never handed out.
struct IdAlloc {
    bits: [u64; 1024],
    limit: u32,
}

impl IdAlloc {
    fn new(bits: u32) -> Self {
        let mut map = [0u64; 1024];
        map[0] = 1;
        IdAlloc {
            bits: map,
            limit: 1 << bits.min(16),
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

/// A short list of commands built on the stack.
struct Cmds {
    buf: [Command; Cmds::CAPACITY],
    len: usize,
}

impl Cmds {
    const CAPACITY: usize = MAX_PAGE_TLBIS as usize + 4;

    const fn new() -> Self {
        Cmds {
            buf: [Command::sync(); Self::CAPACITY],
            len: 0,
        }
    }

    fn push(&mut self, c: Command) {
        // Callers push at most CAPACITY commands (checked by the tests).
        debug_assert!(self.len < Self::CAPACITY);
        if self.len < Self::CAPACITY {
            self.buf[self.len] = c;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[Command] {
        &self.buf[..self.len]
    }
}

/// The TLB invalidations of one round on one SMMU, collected from any number of unmaps of any
/// of its domains ([`SmmuUnit::plan_invalidation`]) and issued by [`SmmuUnit::flush_round`] as
/// one batch closed by **one** CMD_SYNC (SMMUv3 §4.4, §4.7): every `CMD_TLBI_NH_VA` /
/// `CMD_TLBI_S2_IPA` (range commands with IDR3.RIL), then, if a touched stage-2 domain is a
/// nested parent, a CMD_SYNC and `CMD_TLBI_NH_ALL` of each such VMID (`CMD_TLBI_S2_IPA` need
/// not reach combined stage-1+2 entries, §4.4.13), then the closing CMD_SYNC.
///
/// Fixed capacity, on the caller's stack; identical commands are issued once. A domain whose
/// commands do not fit any more gets its domain-wide command instead (`CMD_TLBI_NH_ASID`,
/// `CMD_TLBI_S12_VMALL`); when not even that fits, or the nested-parent list is full, the
/// round degrades to one `CMD_TLBI_NSNH_ALL` (every non-secure non-hyp entry). Still one
/// round.
#[derive(Clone, Debug)]
pub struct InvalidationRound {
    cmds: [Command; InvalidationRound::CAPACITY],
    n: usize,
    nested: [u16; InvalidationRound::NESTED_CAPACITY],
    n_nested: usize,
    planned: bool,
    everything: bool,
}

impl Default for InvalidationRound {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidationRound {
    /// TLBI commands per round.
    pub const CAPACITY: usize = 64;
    /// Nested-parent VMIDs per round.
    pub const NESTED_CAPACITY: usize = 8;

    pub const fn new() -> Self {
        InvalidationRound {
            cmds: [Command::sync(); Self::CAPACITY],
            n: 0,
            nested: [0; Self::NESTED_CAPACITY],
            n_nested: 0,
            planned: false,
            everything: false,
        }
    }

    /// Nothing planned: the round would not touch the hardware.
    pub fn is_empty(&self) -> bool {
        !self.planned
    }

    /// The round degraded to `CMD_TLBI_NSNH_ALL`.
    pub fn is_global(&self) -> bool {
        self.everything
    }

    /// Appends `cmds` (skipping commands already planned) if they all fit.
    fn append(&mut self, cmds: &[Command]) -> bool {
        let planned = &self.cmds[..self.n];
        let new = cmds
            .iter()
            .filter(|c| !planned.iter().any(|p| p.0 == c.0))
            .count();
        if self.n + new > Self::CAPACITY {
            return false;
        }
        for c in cmds {
            if !self.cmds[..self.n].iter().any(|p| p.0 == c.0) {
                self.cmds[self.n] = *c;
                self.n += 1;
            }
        }
        true
    }

    fn add_nested(&mut self, vmid: u16) {
        if self.nested[..self.n_nested].contains(&vmid) {
            return;
        }
        if self.n_nested == Self::NESTED_CAPACITY {
            self.everything = true;
        } else {
            self.nested[self.n_nested] = vmid;
            self.n_nested += 1;
        }
    }
}

/// The smallest PA-size encoding (IDR5.OAS, STE.S2PS, CD.IPS) covering `bits` bits.
const fn pa_size_encoding(bits: u32) -> u8 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        45..=48 => 5,
        _ => 6,
    }
}

/// One SMMUv3.
///
/// `'m` is the lifetime of the memory source passed to [`new`](Self::new), which the unit
/// keeps to read the event queue in [`poll_events`](Self::poll_events); every other call takes
/// that same source again. `E` is its entry type (`AtomicU64` outside tests).
pub struct SmmuUnit<'m, M: Mmio, E: PteAtomic + 'static = core::sync::atomic::AtomicU64> {
    mmio: M,
    mem: &'m (dyn TableMemory<Entry = E> + Sync),
    ids: SmmuIdRegs,
    coherent: bool,
    /// Cacheability of the SMMU's structure and table-walk accesses (CR1, STE, CD).
    attrs: AccessAttrs,
    strtab: StreamTable,
    cmdq: CommandQueue,
    evtq: EventQueue,
    asids: IdAlloc,
    vmids: IdAlloc,
    /// (VMID, nested domains) of stage-2 domains with nested children.
    parents: [(u16, u32); MAX_NESTED_PARENTS],
    window_pages: u32,
    events: EventStats,
    stats: Stats,
    ste_updates: u64,
    ste_breaks: u64,
    /// DMA alias StreamID -> the StreamID of the device it was attached for
    /// ([`attach_streams`](Self::attach_streams)), so its events count for the device.
    alias_owner: BTreeMap<u32, u32>,
}

/// Most StreamIDs one [`SmmuUnit::attach_streams`] call takes.
pub const MAX_ALIAS_STREAMS: usize = 64;

impl<'m, M: Mmio, E: PteAtomic + 'static> SmmuUnit<'m, M, E> {
    /// Brings the SMMU up (IHI 0070 §6.3, and the initialisation sequence of §3.x):
    ///
    /// 1. reads the ID registers (32-bit accesses only) and checks that the SMMU walks AArch64
    ///    little-endian tables with a 4 KiB granule and has programmable bases;
    /// 2. sets GBPA.ABORT (UPDATE protocol) *before* anything else, so that traffic is never
    ///    bypassed while the SMMU is disabled: not in step 3, not later;
    /// 3. if firmware left the SMMU on, writes CR0 = 0 and waits for CR0ACK; masks IRQ_CTRL;
    ///    acknowledges stale global errors;
    /// 4. allocates the stream table (linear when it fits in one page, else 2-level when
    ///    IDR0.ST_LEVEL allows; every reachable STE starts as abort), the command queue and
    ///    the event queue;
    /// 5. programs CR1 (write-back inner-shareable, or non-cacheable when not coherent), CR2
    ///    (RECINVSID: record C_BAD_STREAMID; PTM: ignore broadcast TLB maintenance, the ASIDs
    ///    are the SMMU's own), STRTAB_BASE/_CFG, the queue bases and indexes; 64-bit registers
    ///    as two 32-bit halves, low first;
    /// 6. enables the command and event queues, then issues CMD_CFGI_ALL, CMD_TLBI_NSNH_ALL,
    ///    CMD_TLBI_EL2_ALL (only with IDR0.HYP: it is illegal otherwise) and CMD_SYNC;
    /// 7. optionally enables the wired interrupts, and finally sets SMMUEN.
    pub fn new<T: TableMemory<Entry = E> + Sync>(
        mmio: M,
        mem: &'m T,
        cfg: UnitConfig,
    ) -> Result<Self, SmmuError> {
        let ids = SmmuIdRegs::read(&mmio);
        let (i0, i1, i5) = (ids.idr0, ids.idr1, ids.idr5);
        if !matches!(i0.ttf(), TableFormat::AArch64 | TableFormat::Both) {
            return Err(SmmuError::Unsupported {
                what: "AArch64 translation tables (IDR0.TTF)",
            });
        }
        if !i5.gran4k() {
            return Err(SmmuError::Unsupported {
                what: "the 4 KiB granule (IDR5.GRAN4K)",
            });
        }
        if matches!(i0.ttendian(), TtEndian::Big | TtEndian::Reserved) {
            return Err(SmmuError::Unsupported {
                what: "little-endian structures (IDR0.TTENDIAN)",
            });
        }
        if i1.tables_preset() || i1.queues_preset() {
            return Err(SmmuError::Unsupported {
                what: "programmable table and queue bases (IDR1.*_PRESET)",
            });
        }
        if !i0.s1p() && !i0.s2p() {
            return Err(SmmuError::StageUnsupported);
        }
        let budget = cfg.poll_budget.max(1);
        let coherent = cfg.coherent.unwrap_or(i0.cohacc());
        let attrs = if coherent {
            AccessAttrs::COHERENT
        } else {
            AccessAttrs::NON_CACHEABLE
        };
        let sid_bits = (i1.sidsize() as u32)
            .min(cfg.stream_id_bits.unwrap_or(32))
            .min(32);

        // 2. Abort, not bypass, whenever the SMMU is disabled.
        poll32(
            &mmio,
            offset::GBPA,
            |v| !Gbpa(v).update(),
            budget,
            "GBPA.UPDATE",
        )?;
        let gbpa = Gbpa(mmio.read32(offset::GBPA));
        if !gbpa.abort() {
            mmio.write32(offset::GBPA, gbpa.update_abort(true));
            poll32(
                &mmio,
                offset::GBPA,
                |v| !Gbpa(v).update(),
                budget,
                "GBPA.UPDATE",
            )?;
        }

        // 3. Quiesce what a previous owner left running.
        if mmio.read32(offset::CR0) != 0 {
            set_cr0(&mmio, Cr0::empty(), budget)?;
        }
        if mmio.read32(offset::IRQ_CTRL) != 0 {
            mmio.write32(offset::IRQ_CTRL, 0);
            poll32(
                &mmio,
                offset::IRQ_CTRLACK,
                |v| v == 0,
                budget,
                "IRQ_CTRLACK",
            )?;
        }
        let gerror = mmio.read32(offset::GERROR);
        mmio.write32(offset::GERRORN, Gerror::ack_value(gerror));

        // 4. Structures.
        let strtab = StreamTable::new(mem, sid_bits, i0.st_level() == StLevel::TwoLevel, coherent)?;
        let cmdq_log2 = cfg.cmdq_log2.min(i1.cmdqs()).min(19);
        let eventq_log2 = cfg.eventq_log2.min(i1.eventqs()).min(19);
        let mut cmdq = CommandQueue::new(0, cmdq_log2, coherent, budget);
        let mut evtq = EventQueue::new(0, eventq_log2);
        let Some(cq) = mem.alloc_table(cmdq.bytes()) else {
            mem.free_table(strtab.base, strtab.bytes);
            return Err(SmmuError::NoMemory);
        };
        let Some(eq) = mem.alloc_table(evtq.bytes()) else {
            mem.free_table(strtab.base, strtab.bytes);
            mem.free_table(cq, cmdq.bytes());
            return Err(SmmuError::NoMemory);
        };
        cmdq.base = cq;
        evtq.base = eq;
        if !coherent {
            // Zeroes at the point of coherency: the SMMU must not read stale lines as commands.
            mem.clean(cq, cmdq.bytes());
            mem.clean(eq, evtq.bytes());
        }
        let unit = SmmuUnit {
            mmio,
            mem,
            ids,
            coherent,
            attrs,
            strtab,
            cmdq,
            evtq,
            asids: IdAlloc::new(if i0.asid16() { 16 } else { 8 }),
            vmids: IdAlloc::new(if i0.vmid16() { 16 } else { 8 }),
            parents: [(0, 0); MAX_NESTED_PARENTS],
            window_pages: cfg
                .nested_window_pages
                .clamp(2, Window::MAX_PAGES)
                .next_power_of_two(),
            events: EventStats::new(),
            stats: Stats::default(),
            ste_updates: 0,
            ste_breaks: 0,
            alias_owner: BTreeMap::new(),
        };

        // 5. Attributes and bases (CR0 is 0: CR1, CR2 and the bases are writable).
        let mmio = &unit.mmio;
        mmio.write32(offset::CR1, cr1_value(attrs, attrs));
        mmio.write32(offset::CR2, (Cr2::RECINVSID | Cr2::PTM).bits());
        write64_split(
            mmio,
            offset::STRTAB_BASE,
            strtab_base_value(unit.strtab.base, coherent),
        );
        mmio.write32(offset::STRTAB_BASE_CFG, unit.strtab.base_cfg().encode());
        write64_split(
            mmio,
            offset::CMDQ_BASE,
            queue_base_value(unit.cmdq.base, unit.cmdq.log2, coherent),
        );
        mmio.write32(offset::CMDQ_PROD, 0);
        mmio.write32(offset::CMDQ_CONS, 0);
        write64_split(
            mmio,
            offset::EVENTQ_BASE,
            queue_base_value(unit.evtq.base, unit.evtq.log2, false),
        );
        mmio.write32(offset::EVENTQ_PROD, 0);
        mmio.write32(offset::EVENTQ_CONS, 0);

        // 6. Queues on, caches clean.
        let queues = Cr0::CMDQEN | Cr0::EVENTQEN;
        set_cr0(mmio, queues, budget)?;
        let mut cmds = Cmds::new();
        cmds.push(Command::cfgi_all());
        cmds.push(Command::tlbi_nsnh_all());
        if i0.hyp() {
            cmds.push(Command::tlbi_el2_all());
        }
        unit.submit(&cmds)?;

        // 7. Interrupts, then translation.
        if cfg.irqs {
            let irqs = (IrqCtrl::GERROR_IRQEN | IrqCtrl::EVENTQ_IRQEN).bits();
            unit.mmio.write32(offset::IRQ_CTRL, irqs);
            poll32(
                &unit.mmio,
                offset::IRQ_CTRLACK,
                |v| v == irqs,
                budget,
                "IRQ_CTRLACK",
            )?;
        }
        set_cr0(&unit.mmio, queues | Cr0::SMMUEN, budget)?;
        Ok(unit)
    }

    /// The ID registers as read at bring-up.
    pub fn regs(&self) -> &SmmuIdRegs {
        &self.ids
    }

    /// The register window.
    pub fn mmio(&self) -> &M {
        &self.mmio
    }

    /// StreamID bits the stream table covers.
    pub fn stream_id_bits(&self) -> u32 {
        self.strtab.sid_bits
    }

    /// Whether the SMMU is driven as coherent.
    pub fn coherent(&self) -> bool {
        self.coherent
    }

    /// Physical address of the stream table (linear, or level 1).
    pub fn stream_table(&self) -> u64 {
        self.strtab.base
    }

    /// The stream table format in use.
    pub fn stream_table_layout(&self) -> super::stream_table::Layout {
        self.strtab.layout
    }

    /// The STE currently in memory for `sid`; `None` when `sid` is out of range or its
    /// level-2 table does not exist yet (the SMMU treats it as C_BAD_STREAMID).
    pub fn ste<T: TableMemory<Entry = E>>(&self, mem: &T, sid: u32) -> Option<Ste> {
        self.check_sid(sid).ok()?;
        self.strtab.ste_pa(mem, sid).map(|pa| load_ste(mem, pa))
    }

    // -----------------------------------------------------------------------------------------
    // Domains
    // -----------------------------------------------------------------------------------------

    /// Creates a stage-1 or stage-2 domain: checks the stage against IDR0.S1P/S2P, caps the
    /// input size (see [`DomainConfig::input_bits`]), takes an ASID or VMID, allocates the
    /// page-table root and, for stage 1, writes the domain's CD (see [`Cd::new`]).
    /// [`Stage::Nested`] needs [`create_nested_domain`](Self::create_nested_domain).
    pub fn create_domain<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        cfg: DomainConfig,
    ) -> Result<Domain, SmmuError> {
        let i0 = self.ids.idr0;
        let requested = cfg.input_bits;
        let oas = self.oas_bits();
        match cfg.stage {
            Stage::Nested => Err(SmmuError::NestedNeedsParent),
            Stage::S1 => {
                if !i0.s1p() {
                    return Err(SmmuError::StageUnsupported);
                }
                let ias = requested.min(self.max_s1_input_bits());
                let asid = self.asids.alloc().ok_or(SmmuError::AsidExhausted)?;
                let table = match S1Table::new(mem, self.pt_config(ias, oas)) {
                    Ok(t) => t,
                    Err(e) => {
                        self.asids.free(asid);
                        return Err(config_error(e, requested));
                    }
                };
                let Some(cd) = mem.alloc_table(4096) else {
                    table.destroy(mem);
                    self.asids.free(asid);
                    return Err(SmmuError::NoMemory);
                };
                self.write_cd(
                    mem,
                    cd,
                    &CdFields {
                        ttb0: table.root(),
                        t0sz: (64 - ias) as u8,
                        ips: pa_size_encoding(oas),
                        asid,
                        mair: ARM_S1_MAIR,
                    },
                );
                Ok(Domain {
                    unit: self.strtab.base,
                    kind: Kind::S1 { table, cd, asid },
                })
            }
            Stage::S2 => {
                if !i0.s2p() {
                    return Err(SmmuError::StageUnsupported);
                }
                // A stage-2 input (IPA) size above the output size is not allowed (S2T0SZ
                // must leave at most IDR5.OAS bits; QEMU rejects the STE otherwise).
                let ias = requested.min(oas);
                let vmid = self.vmids.alloc().ok_or(SmmuError::VmidExhausted)?;
                let table = match S2Table::new(mem, self.pt_config(ias, oas)) {
                    Ok(t) => t,
                    Err(e) => {
                        self.vmids.free(vmid);
                        return Err(config_error(e, requested));
                    }
                };
                let ri = table.root_info();
                // SL0 = 3 (start at level 3) needs FEAT_TTST; QEMU rejects it.
                let Some(sl0) = ri.arm_sl0() else {
                    table.destroy(mem);
                    self.vmids.free(vmid);
                    return Err(SmmuError::InputBitsUnsupported { requested });
                };
                let s2 = super::ste::S2Fields {
                    vmid,
                    ttb: ri.pa,
                    t0sz: ri.arm_t0sz() as u8,
                    sl0: sl0 as u8,
                    ps: pa_size_encoding(oas),
                };
                Ok(Domain {
                    unit: self.strtab.base,
                    kind: Kind::S2 {
                        table,
                        s2,
                        window: AtomicU64::new(0),
                        nested_parent: core::sync::atomic::AtomicBool::new(false),
                    },
                })
            }
        }
    }

    /// Creates a nested domain: stage 1 (IOVA → IPA, `s1_input_bits` bits) over the stage-2
    /// domain `parent` (IPA → PA), sharing the parent's VMID. Needs IDR0.S1P and S2P.
    ///
    /// The domain's CD and stage-1 tables live in the parent's structure window, which the
    /// first nested domain creates and maps read-only into the parent at IPA == PA (see
    /// [`domain`](super::domain)); that map fails with an overlap if the parent already uses
    /// those IPAs. Map the parent for the IPAs the stage-1 tables output.
    pub fn create_nested_domain<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        parent: &Domain,
        s1_input_bits: u32,
    ) -> Result<Domain, SmmuError> {
        parent.check_unit(self.strtab.base)?;
        let i0 = self.ids.idr0;
        if !(i0.s1p() && i0.s2p()) {
            return Err(SmmuError::StageUnsupported);
        }
        let Kind::S2 {
            table: ptable,
            s2: ps2,
            window: pwin,
            nested_parent,
        } = &parent.kind
        else {
            return Err(SmmuError::ParentNotStage2);
        };
        let ipa_bits = ptable.geometry().ias;
        if ipa_bits < 32 {
            return Err(SmmuError::InputBitsUnsupported {
                requested: ipa_bits,
            });
        }
        let slot = self
            .parents
            .iter()
            .position(|p| p.1 != 0 && p.0 == ps2.vmid)
            .or_else(|| self.parents.iter().position(|p| p.1 == 0))
            .ok_or(SmmuError::TooManyNestedParents)?;
        let ias = s1_input_bits.min(self.max_s1_input_bits());

        // The structure window, mapped into the parent once.
        let window = match Window::unpack(pwin.load(Ordering::Acquire)) {
            Some(w) => w,
            None => {
                let w = Window::create(mem, self.window_pages).ok_or(SmmuError::NoMemory)?;
                if !self.coherent {
                    mem.clean(w.base, w.bytes());
                }
                let first = w.base + 4096;
                let len = w.bytes() as u64 - 4096;
                if let Err(e) = ptable.map(mem, first, first, len, Prot::READ) {
                    self.flush_rolled_back(mem, parent, &e)?;
                    // Entries pointing into it may have been installed and rolled back (and
                    // were invalidated just now): reuse only after a grace period.
                    mem.retire_table(w.base, w.bytes());
                    return Err(SmmuError::Map(e));
                }
                pwin.store(w.pack(), Ordering::Release);
                w
            }
        };

        let asid = self.asids.alloc().ok_or(SmmuError::AsidExhausted)?;
        let wm = WindowMem { mem, window };
        let table = match S1Table::new(&wm, self.pt_config(ias, ipa_bits)) {
            Ok(t) => t,
            Err(e) => {
                self.asids.free(asid);
                return Err(config_error(e, s1_input_bits));
            }
        };
        let Some(cd) = window.alloc_page(mem) else {
            table.destroy(&wm);
            self.asids.free(asid);
            return Err(SmmuError::NoMemory);
        };
        self.write_cd(
            mem,
            cd,
            &CdFields {
                ttb0: table.root(),
                t0sz: (64 - ias) as u8,
                ips: pa_size_encoding(ipa_bits),
                asid,
                mair: ARM_S1_MAIR,
            },
        );
        nested_parent.store(true, Ordering::Relaxed);
        self.parents[slot] = (ps2.vmid, self.parents[slot].1 + 1);
        Ok(Domain {
            unit: self.strtab.base,
            kind: Kind::Nested {
                table,
                cd,
                asid,
                parent: *ps2,
                window,
            },
        })
    }

    /// Destroys a domain that no StreamID uses (and, stage 2, that no nested domain sits
    /// on): invalidates what the TLBs may hold under its ASID or VMID (which may be reused
    /// next), then frees its tables, CD, structure window and ASID/VMID. On failure the domain
    /// is handed back (a large `Err`, but a rare and cold path, and boxing would need
    /// `alloc`).
    #[allow(clippy::result_large_err)]
    pub fn try_destroy_domain<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        d: Domain,
    ) -> Result<(), (SmmuError, Domain)> {
        if let Err(e) = d.check_unit(self.strtab.base) {
            return Err((e, d));
        }
        if self.references(mem, &d) != 0 {
            return Err((SmmuError::DomainBusy, d));
        }
        let mut cmds = Cmds::new();
        match &d.kind {
            Kind::S1 { asid, .. } => cmds.push(Command::tlbi_nh_asid(0, *asid)),
            Kind::Nested { asid, parent, .. } => {
                cmds.push(Command::tlbi_nh_asid(parent.vmid, *asid))
            }
            Kind::S2 { s2, .. } => cmds.push(Command::tlbi_s12_vmall(s2.vmid)),
        }
        if let Err(e) = self.submit(&cmds) {
            return Err((e, d));
        }
        match d.kind {
            Kind::S1 { table, cd, asid } => {
                table.destroy(mem);
                mem.free_table(cd, 4096);
                self.asids.free(asid);
            }
            Kind::Nested {
                table,
                cd,
                asid,
                parent,
                window,
            } => {
                table.destroy(&WindowMem { mem, window });
                window.free_page(mem, cd);
                self.asids.free(asid);
                if let Some(p) = self
                    .parents
                    .iter_mut()
                    .find(|p| p.1 != 0 && p.0 == parent.vmid)
                {
                    p.1 -= 1;
                }
            }
            Kind::S2 {
                table, s2, window, ..
            } => {
                table.destroy(mem);
                if let Some(w) = Window::unpack(window.load(Ordering::Acquire)) {
                    mem.free_table(w.base, w.bytes());
                }
                self.vmids.free(s2.vmid);
            }
        }
        Ok(())
    }

    /// [`try_destroy_domain`](Self::try_destroy_domain) for callers that cannot use the domain
    /// back: on failure (for instance [`SmmuError::DomainBusy`]) the domain is dropped, which
    /// leaks its tables and ids. That is the safe outcome: a stream still attached keeps
    /// translating through intact tables. Detach first.
    pub fn destroy_domain<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        d: Domain,
    ) -> Result<(), SmmuError> {
        self.try_destroy_domain(mem, d).map_err(|(e, _leaked)| e)
    }

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` in `d` (nested: IOVA → IPA in the stage-1
    /// table; map the parent for IPA → PA). No invalidation is needed: the SMMU caches no
    /// invalid entries. When a failed map had installed and removed entries, their range is
    /// invalidated before the error is returned.
    pub fn map<T: TableMemory<Entry = E>>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<(), SmmuError> {
        self.map_to(mem, d, iova, pa, len, prot)
    }

    /// [`map`](Self::map) to one physical range or to the runs of a
    /// [`RunSource`](crate::pgtable::RunSource) (one page-table walk for all of them).
    pub fn map_to<T: TableMemory<Entry = E>, O: MapOutput>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), SmmuError> {
        d.check_unit(self.strtab.base)?;
        match d.map(mem, iova, out, len, prot) {
            Ok(()) => {
                // The new entries are in memory before the caller tells a device to use them.
                fence(Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.flush_rolled_back(mem, d, &e)?;
                Err(SmmuError::Map(e))
            }
        }
    }

    /// Unmaps exactly `[iova, iova + len)` and returns the bytes unmapped, then invalidates the
    /// TLBs for the gathered range in one round closed by one CMD_SYNC
    /// ([`unmap_deferred`](Self::unmap_deferred), then [`flush_batch`](Self::flush_batch) of
    /// that one gather):
    ///
    /// * with IDR3.RIL, one range command (`CMD_TLBI_NH_VA` for stage 1 and nested, with the
    ///   domain's ASID and VMID; `CMD_TLBI_S2_IPA` for stage 2) covering the range;
    /// * without, one command per leaf-sized step if that is at most [`MAX_PAGE_TLBIS`], else
    ///   `CMD_TLBI_NH_ASID` / `CMD_TLBI_S12_VMALL`;
    /// * Leaf = 1 unless table pages were unlinked (then walk caches are invalidated too);
    /// * for a stage-2 domain that is a nested parent, `CMD_TLBI_S2_IPA` does not have to
    ///   reach combined stage-1+2 entries (§4.4.13), so a CMD_SYNC and `CMD_TLBI_NH_ALL` of the
    ///   VMID follow.
    ///
    /// Unlinked table pages are retired only after the SYNC completed; if the invalidation
    /// fails they are leaked, never reused.
    pub fn unmap<T: TableMemory<Entry = E>>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        len: u64,
    ) -> Result<u64, SmmuError> {
        let mut gather = Gather::new();
        let result = self.unmap_deferred(mem, d, iova, len, &mut gather);
        self.flush_batch(mem, &mut [(d, &mut gather)])?;
        result
    }

    /// Unmaps exactly `[iova, iova + len)` into `gather` and returns the bytes unmapped;
    /// invalidates nothing. Whatever was cleared (on error too) is in `gather`, which the
    /// caller must flush ([`flush_batch`](Self::flush_batch), or
    /// [`plan_invalidation`](Self::plan_invalidation) + [`flush_round`](Self::flush_round) and
    /// then [`complete`](Self::complete), or `gather.leak()` if the round failed).
    pub fn unmap_deferred<T: TableMemory<Entry = E>>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, SmmuError> {
        d.check_unit(self.strtab.base)?;
        d.unmap(mem, iova, len, gather).map_err(SmmuError::Unmap)
    }

    /// Adds to `round` the TLB invalidations `gather` (filled by
    /// [`unmap_deferred`](Self::unmap_deferred) of `d`, a domain of this SMMU) owes (see
    /// [`unmap`](Self::unmap)); domain-wide when only tables were unlinked.
    pub fn plan_invalidation(&self, d: &Domain, gather: &Gather, round: &mut InvalidationRound) {
        if gather.is_empty() {
            return;
        }
        round.planned = true;
        match gather.range() {
            Some(r) => self.plan_range(
                d,
                r.start,
                r.end,
                !gather.frees_tables(),
                gather.min_leaf_size(),
                round,
            ),
            None => self.plan_domain(d, round),
        }
    }

    /// Issues `round` (see [`InvalidationRound`]) and waits for its closing CMD_SYNC. An empty
    /// round does nothing.
    pub fn flush_round<T: TableMemory<Entry = E>>(
        &self,
        _mem: &T,
        round: &InvalidationRound,
    ) -> Result<(), SmmuError> {
        if round.is_empty() {
            return Ok(());
        }
        self.run_round(round)
    }

    /// Retires the table pages of `gather` (filled from `d`) after the round covering it
    /// completed.
    pub fn complete<T: TableMemory<Entry = E>>(&self, mem: &T, d: &Domain, gather: &mut Gather) {
        d.complete(mem, gather);
    }

    /// One round for every `(domain, gather)` of `batch` (all of this SMMU), then every
    /// gather completed (table pages retired) if it succeeded, or leaked if it failed.
    pub fn flush_batch<T: TableMemory<Entry = E>>(
        &self,
        mem: &T,
        batch: &mut [(&Domain, &mut Gather)],
    ) -> Result<(), SmmuError> {
        let mut round = InvalidationRound::new();
        let mut result = Ok(());
        for (d, g) in batch.iter() {
            if let Err(e) = d.check_unit(self.strtab.base) {
                result = Err(e);
            }
            self.plan_invalidation(d, g, &mut round);
        }
        if result.is_ok() {
            result = self.flush_round(mem, &round);
        }
        for (d, g) in batch.iter_mut() {
            if result.is_ok() {
                d.complete(mem, g);
            } else {
                g.leak();
            }
        }
        result
    }

    /// What `iova` translates to in `d`'s own table: the PA (stage 1, stage 2) or the IPA
    /// (nested; translate it through the parent for the PA).
    pub fn iova_to_phys<T: TableMemory<Entry = E>>(
        &self,
        mem: &T,
        d: &Domain,
        iova: u64,
    ) -> Option<u64> {
        d.check_unit(self.strtab.base).ok()?;
        d.translate(mem, iova).map(|t| t.pa)
    }

    // -----------------------------------------------------------------------------------------
    // Streams
    // -----------------------------------------------------------------------------------------

    /// Points `sid`'s STE at `d` (stage 1: Config 0b101 and the domain's CD; stage 2: 0b110 with
    /// the VMID and the VTCR-like fields; nested: 0b111 with both), whatever it pointed at
    /// before, with the ordered update of [`plan_update`]: hitless where one word decides, else
    /// through abort. Each step is followed by CMD_CFGI_STE (+ CMD_CFGI_CD_ALL when stage 1
    /// is involved) and CMD_SYNC. Fault recording is on (STE.S2R, CD.R). No TLB invalidation is
    /// needed: TLB entries are tagged with the ASID/VMID of the domain they came from, which
    /// this stream no longer uses. Allocates `sid`'s level-2 stream table on first use.
    pub fn attach<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sid: u32,
        d: &Domain,
    ) -> Result<(), SmmuError> {
        self.check_sid(sid)?;
        d.check_unit(self.strtab.base)?;
        let ste = match &d.kind {
            Kind::S1 { cd, .. } => Ste::s1(*cd, self.attrs),
            Kind::S2 { s2, .. } => Ste::s2(s2, self.attrs),
            Kind::Nested { cd, parent, .. } => Ste::nested(*cd, parent, self.attrs),
        };
        self.update_ste(mem, sid, ste)
    }

    /// Makes `sid` bypass translation (STE.Config = bypass, incoming attributes kept).
    pub fn set_bypass<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sid: u32,
    ) -> Result<(), SmmuError> {
        self.check_sid(sid)?;
        self.update_ste(mem, sid, Ste::bypass())
    }

    /// Makes `sid` abort all traffic (STE.Config = abort, V = 1): detach.
    pub fn set_abort<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sid: u32,
    ) -> Result<(), SmmuError> {
        self.check_sid(sid)?;
        self.update_ste(mem, sid, Ste::abort())
    }

    /// Points the STE of every StreamID one device's DMA may carry at `d`: `sids[0]` is the
    /// device's own (the IORT/DT mapping of its requester ID), the rest its DMA aliases mapped
    /// the same way (a conventional device behind a PCIe-to-PCI bridge reaches the SMMU with the
    /// bridge's `(secondary bus, 00.0)` ID). Each STE is written as [`attach`](Self::attach)
    /// writes it. Every StreamID is checked before any STE changes; if an update fails part-way,
    /// the STEs this call changed get their previous contents back. Events on an alias count
    /// for the device afterwards ([`event_count`](Self::event_count),
    /// [`owner_of`](Self::owner_of)). An empty list changes nothing.
    pub fn attach_streams<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sids: &[u32],
        d: &Domain,
    ) -> Result<(), SmmuError> {
        let Some(&own) = sids.first() else {
            return Ok(());
        };
        if sids.len() > MAX_ALIAS_STREAMS {
            return Err(SmmuError::StreamIdOutOfRange);
        }
        for &sid in sids {
            self.check_sid(sid)?;
        }
        d.check_unit(self.strtab.base)?;
        let mut before: [Option<Ste>; MAX_ALIAS_STREAMS] = [None; MAX_ALIAS_STREAMS];
        for (i, &sid) in sids.iter().enumerate() {
            if sids[..i].contains(&sid) {
                continue;
            }
            before[i] = self.ste(mem, sid);
            if let Err(err) = self.attach(mem, sid, d) {
                for (j, &undo) in sids[..i].iter().enumerate() {
                    if let Some(old) = before[j] {
                        // Best effort: the same failure is being reported.
                        let _ = self.update_ste(mem, undo, old);
                    }
                }
                return Err(err);
            }
        }
        for &alias in &sids[1..] {
            if alias != own {
                self.alias_owner.insert(alias, own);
            }
        }
        Ok(())
    }

    /// Makes every StreamID of `sids` abort (detach a device with its aliases). Pass only
    /// aliases no other attached device shares: an alias is one STE for all its users. Events
    /// on the aliases stay attributed to the device.
    pub fn set_abort_streams<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sids: &[u32],
    ) -> Result<(), SmmuError> {
        // Events on the aliases keep being attributed to the device: its DMA now aborts.
        self.each_stream(sids, |unit, sid| unit.set_abort(mem, sid))
    }

    /// Makes every StreamID of `sids` bypass translation (all checked first).
    pub fn set_bypass_streams<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sids: &[u32],
    ) -> Result<(), SmmuError> {
        self.each_stream(sids, |unit, sid| unit.set_bypass(mem, sid))
    }

    /// Runs `f` once per distinct StreamID of `sids`, after checking all of them (so a bad ID
    /// changes nothing).
    fn each_stream(
        &mut self,
        sids: &[u32],
        mut f: impl FnMut(&mut Self, u32) -> Result<(), SmmuError>,
    ) -> Result<(), SmmuError> {
        if sids.len() > MAX_ALIAS_STREAMS {
            return Err(SmmuError::StreamIdOutOfRange);
        }
        for &sid in sids {
            self.check_sid(sid)?;
        }
        for (i, &sid) in sids.iter().enumerate() {
            if !sids[..i].contains(&sid) {
                f(self, sid)?;
            }
        }
        Ok(())
    }

    /// The device an event on `sid` concerns: the device whose StreamIDs were last given to
    /// [`attach_streams`](Self::attach_streams) with it (devices sharing an alias are one IOMMU
    /// group), else `sid` itself.
    pub fn owner_of(&self, sid: u32) -> u32 {
        self.alias_owner.get(&sid).copied().unwrap_or(sid)
    }

    // -----------------------------------------------------------------------------------------
    // Events and counters
    // -----------------------------------------------------------------------------------------

    /// Drains the event queue (at most one queue's worth of records), decodes each record,
    /// counts it per StreamID and passes it to `sink`; acknowledges an overflow (EVENTQ_PROD.OVFLG
    /// copied to EVENTQ_CONS.OVACKFLG), counting it in [`events_lost`](Self::events_lost).
    /// Then checks GERROR against GERRORN: a stuck command queue error is recovered as in
    /// `submit`, every other active global error is acknowledged, counted and reported in
    /// [`EventPoll::global_errors`]. GERROR.EVENTQ_ABT_ERR (an event write aborted: QEMU's way
    /// of reporting a full queue) also counts as a loss and sets [`EventPoll::overflowed`].
    pub fn poll_events(&mut self, sink: &mut dyn FnMut(&Event)) -> EventPoll {
        let (recorded, overflowed) = self
            .evtq
            .drain(&self.mmio, self.mem, &mut self.events, sink);
        let gerror = self.mmio.read32(offset::GERROR);
        let gerrorn = self.mmio.read32(offset::GERRORN);
        let active = Gerror::active(gerror, gerrorn);
        if active.contains(Gerror::CMDQ_ERR)
            && let Ok(_guard) = self.cmdq.lock()
        {
            self.cmdq
                .recover(&self.mmio, self.mem, self.cmdq.prod(), &self.stats);
        }
        let others = active.difference(Gerror::CMDQ_ERR);
        if !others.is_empty() {
            self.mmio.write32(offset::GERRORN, gerrorn ^ others.bits());
            self.events.global_errors += others.bits().count_ones() as u64;
        }
        // An aborted event queue write lost an event too. QEMU 10 reports a full queue this way
        // (GERROR.EVENTQ_ABT_ERR), never through EVENTQ_PROD.OVFLG.
        let aborted = others.contains(Gerror::EVENTQ_ABT_ERR);
        if aborted {
            self.events.lost = self.events.lost.saturating_add(1);
        }
        EventPoll {
            recorded,
            overflowed: overflowed || aborted,
            global_errors: active.bits(),
        }
    }

    /// Events recorded for `sid` and for the DMA-alias StreamIDs attached for it with
    /// [`attach_streams`](Self::attach_streams) (0 for a StreamID beyond the counters'
    /// capacity, see [`Counters::events_untracked`]).
    pub fn event_count(&self, sid: u32) -> u64 {
        let on_aliases: u64 = self
            .alias_owner
            .iter()
            .filter(|&(_, &owner)| owner == sid)
            .map(|(&alias, _)| self.events.count(alias))
            .sum();
        self.events.count(sid) + on_aliases
    }

    /// Event losses seen: queue overflows (EVENTQ_PROD.OVFLG) and aborted event writes
    /// (GERROR.EVENTQ_ABT_ERR), one per occurrence (the SMMU does not say how many events).
    pub fn events_lost(&self) -> u64 {
        self.events.lost
    }

    pub fn counters(&self) -> Counters {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            commands: get(&s.commands),
            syncs: get(&s.syncs),
            tlbi_range: get(&s.tlbi_range),
            tlbi_va: get(&s.tlbi_va),
            tlbi_asid: get(&s.tlbi_asid),
            tlbi_vmid: get(&s.tlbi_vmid),
            tlbi_all: get(&s.tlbi_all),
            cfgi: get(&s.cfgi),
            cmdq_errors: get(&s.cmdq_errors),
            ste_updates: self.ste_updates,
            ste_breaks: self.ste_breaks,
            events: self.events.total,
            events_lost: self.events.lost,
            events_untracked: self.events.untracked,
            global_errors: self.events.global_errors,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------------------------

    fn submit(&self, cmds: &Cmds) -> Result<(), SmmuError> {
        self.cmdq
            .submit(&self.mmio, self.mem, cmds.as_slice(), &self.stats)
    }

    fn check_sid(&self, sid: u32) -> Result<(), SmmuError> {
        if (sid as u64) >> self.strtab.sid_bits != 0 {
            return Err(SmmuError::StreamIdOutOfRange);
        }
        Ok(())
    }

    /// Output size of every table: IDR5.OAS, at most 48 bits with the 4 KiB granule.
    fn oas_bits(&self) -> u32 {
        (self.ids.idr5.oas_bits() as u32).min(48)
    }

    /// Largest stage-1 input size: 48 bits with the 4 KiB granule (IDR5.VAX is ≥ 48).
    fn max_s1_input_bits(&self) -> u32 {
        48
    }

    fn pt_config(&self, ias: u32, oas: u32) -> Config {
        Config {
            coherent: self.coherent,
            ..Config::new(ias, oas)
        }
    }

    fn write_cd<T: TableMemory<Entry = E>>(&self, mem: &T, page: u64, f: &CdFields) {
        let cd = Cd::new(f, self.attrs);
        // Not reachable yet (no STE points at it): order does not matter.
        for (i, &w) in cd.0.iter().enumerate() {
            store64(mem, page + 8 * i as u64, w);
        }
        if !self.coherent {
            mem.clean(page, CD_BYTES);
        }
    }

    /// Changes `sid`'s STE to `new` following [`plan_update`].
    fn update_ste<T: TableMemory<Entry = E>>(
        &mut self,
        mem: &T,
        sid: u32,
        new: Ste,
    ) -> Result<(), SmmuError> {
        let fresh = self.strtab.ste_pa(mem, sid).is_none();
        let pa = self.strtab.ensure(mem, sid)?;
        let cur = load_ste(mem, pa);
        let plan = plan_update(&cur, &new);
        let mut cmds = Cmds::new();
        cmds.push(Command::cfgi_ste(sid, false));
        if cur.config().s1() || new.config().s1() {
            cmds.push(Command::cfgi_cd_all(sid));
        }
        if plan.steps().is_empty() && fresh {
            // A new level-2 table: drop a cached invalid level-1 descriptor.
            self.submit(&cmds)?;
        }
        for step in plan.steps() {
            match *step {
                Step::Write { word, value } => store64(mem, pa + 8 * word as u64, value),
                Step::Sync => {
                    self.strtab.clean(mem, pa, STE_BYTES);
                    self.submit(&cmds)?;
                }
            }
        }
        if !plan.steps().is_empty() {
            self.ste_updates += 1;
            if plan.breaks {
                self.ste_breaks += 1;
            }
        }
        Ok(())
    }

    /// StreamIDs whose STE uses `d`, plus (stage 2) the nested domains on it.
    fn references<T: TableMemory<Entry = E>>(&self, mem: &T, d: &Domain) -> u32 {
        let mut n = 0;
        let (cd, s2root) = match &d.kind {
            Kind::S1 { cd, .. } | Kind::Nested { cd, .. } => (Some(*cd), None),
            Kind::S2 { table, .. } => (None, Some(table.root())),
        };
        self.strtab.for_each(mem, |_, ste| {
            let c = ste.config();
            let uses_cd = c.s1() && Some(ste.s1_context_ptr()) == cd;
            let uses_s2 = c.s2() && Some(ste.s2_ttb()) == s2root;
            if ste.valid() && (uses_cd || uses_s2) {
                n += 1;
            }
        });
        if let Kind::S2 { s2, .. } = &d.kind {
            n += self
                .parents
                .iter()
                .filter(|p| p.0 == s2.vmid)
                .map(|p| p.1)
                .sum::<u32>();
        }
        n
    }

    /// Invalidates the range a failed map installed and removed again, if any.
    fn flush_rolled_back<T: TableMemory<Entry = E>>(
        &self,
        _mem: &T,
        d: &Domain,
        e: &MapError,
    ) -> Result<(), SmmuError> {
        let rolled_back = e.rolled_back();
        if rolled_back.is_empty() {
            return Ok(());
        }
        self.flush_range(d, rolled_back.start, rolled_back.end, false, None)
    }

    /// Invalidates `[start, end)` of `d` (see [`unmap`](Self::unmap)), in a round of its own.
    fn flush_range(
        &self,
        d: &Domain,
        start: u64,
        end: u64,
        leaf_only: bool,
        min_leaf: Option<u64>,
    ) -> Result<(), SmmuError> {
        let mut round = InvalidationRound::new();
        self.plan_range(d, start, end, leaf_only, min_leaf, &mut round);
        self.run_round(&round)
    }

    /// The command invalidating everything cached for `d`.
    fn domain_command(d: &Domain) -> Command {
        match &d.kind {
            Kind::S1 { asid, .. } => Command::tlbi_nh_asid(0, *asid),
            Kind::Nested { asid, parent, .. } => Command::tlbi_nh_asid(parent.vmid, *asid),
            Kind::S2 { s2, .. } => Command::tlbi_s12_vmall(s2.vmid),
        }
    }

    /// Adds the domain-wide invalidation of `d` to `round`.
    fn plan_domain(&self, d: &Domain, round: &mut InvalidationRound) {
        if !round.append(&[Self::domain_command(d)]) {
            round.everything = true;
        }
    }

    /// Adds the invalidation of `[start, end)` of `d` to `round`.
    fn plan_range(
        &self,
        d: &Domain,
        start: u64,
        end: u64,
        leaf_only: bool,
        min_leaf: Option<u64>,
        round: &mut InvalidationRound,
    ) {
        let ril = self.ids.idr3.ril();
        // Without a leaf (only tables unlinked), step by the granule: every table's span is
        // then touched.
        let stride = min_leaf.unwrap_or(4096).max(4096);
        let first = start & !(stride - 1);
        let steps = (end.max(first + 1) - first).div_ceil(stride);
        // One command (a range, or domain-wide) in most cases; the page-by-page list, which
        // needs a buffer of MAX_PAGE_TLBIS commands zeroed first, only without IDR3.RIL.
        let mut one = None;
        let mut pages: Option<Cmds> = None;
        let mut whole = false;
        let mut nested_vmid = None;
        match &d.kind {
            Kind::S1 { asid, .. } | Kind::Nested { asid, .. } => {
                let vmid = d.vmid();
                if ril {
                    let (addr, r) = TlbiRange::covering(start, end, 12);
                    one = Some(Command::tlbi_nh_va(vmid, *asid, addr, leaf_only, r));
                } else if steps <= MAX_PAGE_TLBIS {
                    let cmds = pages.insert(Cmds::new());
                    for i in 0..steps {
                        let addr = first + i * stride;
                        cmds.push(Command::tlbi_nh_va(
                            vmid,
                            *asid,
                            addr,
                            leaf_only,
                            TlbiRange::NONE,
                        ));
                    }
                } else {
                    one = Some(Command::tlbi_nh_asid(vmid, *asid));
                }
            }
            Kind::S2 {
                s2, nested_parent, ..
            } => {
                let vmid = s2.vmid;
                if ril {
                    let (addr, r) = TlbiRange::covering(start, end, 12);
                    one = Some(Command::tlbi_s2_ipa(vmid, addr, leaf_only, r));
                } else if steps <= MAX_PAGE_TLBIS {
                    let cmds = pages.insert(Cmds::new());
                    for i in 0..steps {
                        let addr = first + i * stride;
                        cmds.push(Command::tlbi_s2_ipa(vmid, addr, leaf_only, TlbiRange::NONE));
                    }
                } else {
                    one = Some(Command::tlbi_s12_vmall(vmid));
                    whole = true;
                }
                if nested_parent.load(Ordering::Relaxed) {
                    nested_vmid = Some(vmid);
                }
            }
        }
        let planned = match (&one, &pages) {
            (Some(c), _) => core::slice::from_ref(c),
            (None, Some(cmds)) => cmds.as_slice(),
            (None, None) => &[],
        };
        if !round.append(planned) {
            // No room for the range: the domain-wide command (for stage 2, S12_VMALL also
            // drops combined entries, so no nested step).
            if !round.append(&[Self::domain_command(d)]) {
                round.everything = true;
            }
            whole = matches!(d.kind, Kind::S2 { .. });
        }
        if let Some(vmid) = nested_vmid
            && !whole
        {
            round.add_nested(vmid);
        }
    }

    /// Issues `round` and waits for its closing CMD_SYNC (see [`InvalidationRound`]).
    fn run_round(&self, round: &InvalidationRound) -> Result<(), SmmuError> {
        if !round.everything && round.n_nested == 0 {
            // The common case: the planned commands as they are (`submit` adds the CMD_SYNC).
            if round.n == 0 {
                return Ok(());
            }
            return self
                .cmdq
                .submit(&self.mmio, self.mem, &round.cmds[..round.n], &self.stats);
        }
        let mut cmds =
            [Command::sync(); InvalidationRound::CAPACITY + 1 + InvalidationRound::NESTED_CAPACITY];
        let mut n = 0;
        let mut push = |c: Command| {
            if n < cmds.len() {
                cmds[n] = c;
                n += 1;
            }
        };
        if round.everything {
            push(Command::tlbi_nsnh_all());
        } else {
            for &c in &round.cmds[..round.n] {
                push(c);
            }
            if round.n_nested != 0 {
                // Combined entries cached from these VMIDs' nested streams: after the stage-2
                // invalidations have completed, drop the VMIDs' stage-1 entries.
                push(Command::sync());
                for &vmid in &round.nested[..round.n_nested] {
                    push(Command::tlbi_nh_all(vmid));
                }
            }
        }
        if n == 0 {
            return Ok(());
        }
        self.cmdq
            .submit(&self.mmio, self.mem, &cmds[..n], &self.stats)
    }
}

fn config_error(e: ConfigError, requested: u32) -> SmmuError {
    match e {
        ConfigError::NoMemory => SmmuError::NoMemory,
        ConfigError::InputSize => SmmuError::InputBitsUnsupported { requested },
        other => SmmuError::PageTable(other),
    }
}

/// Polls the 32-bit register at `off` until `done`.
fn poll32<M: Mmio + ?Sized>(
    mmio: &M,
    off: usize,
    done: impl Fn(u32) -> bool,
    budget: u32,
    what: &'static str,
) -> Result<u32, SmmuError> {
    for _ in 0..budget {
        let v = mmio.read32(off);
        if done(v) {
            return Ok(v);
        }
        core::hint::spin_loop();
    }
    Err(SmmuError::Timeout { what })
}

/// Writes CR0 and waits until CR0ACK shows the same value (§6.3.9-6.3.10).
fn set_cr0<M: Mmio + ?Sized>(mmio: &M, v: Cr0, budget: u32) -> Result<(), SmmuError> {
    mmio.write32(offset::CR0, v.bits());
    poll32(mmio, offset::CR0ACK, |a| a == v.bits(), budget, "CR0ACK").map(|_| ())
}

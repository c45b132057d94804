//! Domains: one IO address space (a page table) with a domain id on one remapping unit.

use crate::pgtable::{
    Config, ConfigError, Gather, MapError, MapOutput, PageTable, PhysAddr, Prot, Translation,
    UnmapError, VtdSecondStage, X86FirstStage,
};

use super::error::VtdError;
use super::mem::VtdMemory;

/// Which translation stage a domain's page table is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// VT-d second-stage format (§9.8): legacy mode, or scalable mode with PGTT = 010b.
    Second,
    /// x86-64 paging as VT-d first stage (§9.7): scalable mode with PGTT = 001b (ECAP.FLTS).
    First,
    /// No page table: untranslated requests pass through, IOVA == PA (ECAP.PT). Legacy
    /// context entry TT = 10b, scalable-mode PASID entry PGTT = 100b. AW still holds a SAGAW
    /// value (the largest), and addresses above it (or above MGAW) are blocked.
    PassThrough,
}

/// How to build a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    pub stage: Stage,
    /// Input address width: 39 (3-level second stage), 48 (4-level) or 57 (5-level). A
    /// first-stage domain translates the lower canonical half (47 or 56 bits).
    pub address_width: u32,
    /// Every DMA through the domain snoops the CPU caches, whatever the device asks (iommufd's
    /// enforce_cache_coherency). Fixed at creation: legacy mode sets SNP in every leaf, scalable
    /// mode sets PGSNP in the PASID entry. Attaching it to a unit without ECAP.SC fails with
    /// [`VtdError::SnoopControlUnsupported`].
    pub enforce_cache_coherency: bool,
    /// Leaves start clean and the hardware sets their dirty flags (first stage; second stage
    /// only in scalable mode with ECAP.SLADS).
    pub dirty_tracking: bool,
}

impl DomainConfig {
    /// A second-stage domain of `address_width` bits, no coherency enforcement, no dirty
    /// tracking.
    pub const fn second_stage(address_width: u32) -> Self {
        DomainConfig {
            stage: Stage::Second,
            address_width,
            enforce_cache_coherency: false,
            dirty_tracking: false,
        }
    }

    /// A pass-through (identity) domain: no page table, `map`/`unmap` refused with
    /// [`VtdError::PassThroughDomain`]. `address_width` is ignored: the entry's AW is the
    /// largest the unit's SAGAW supports. Creating it on a unit without ECAP.PT fails with
    /// [`VtdError::PassThroughUnsupported`]; it can neither enforce cache coherency (no leaves
    /// to set SNP in) nor track dirty pages.
    pub const fn pass_through() -> Self {
        DomainConfig {
            stage: Stage::PassThrough,
            address_width: 0,
            enforce_cache_coherency: false,
            dirty_tracking: false,
        }
    }

    /// A first-stage domain of `address_width` bits (48 or 57).
    pub const fn first_stage(address_width: u32) -> Self {
        DomainConfig {
            stage: Stage::First,
            address_width,
            enforce_cache_coherency: false,
            dirty_tracking: false,
        }
    }

    /// The same, enforcing cache coherency.
    pub const fn coherent(mut self) -> Self {
        self.enforce_cache_coherency = true;
        self
    }
}

/// The page table of a domain, one variant per format and depth.
pub(crate) enum Table {
    Ss3(PageTable<VtdSecondStage<3>>),
    Ss4(PageTable<VtdSecondStage<4>>),
    Ss5(PageTable<VtdSecondStage<5>>),
    Fs4(PageTable<X86FirstStage<4>>),
    Fs5(PageTable<X86FirstStage<5>>),
}

/// Runs `$body` with `$t` bound to the page table inside `$table`, whatever its format.
macro_rules! with_table {
    ($table:expr, $t:ident => $body:expr) => {
        match $table {
            Table::Ss3($t) => $body,
            Table::Ss4($t) => $body,
            Table::Ss5($t) => $body,
            Table::Fs4($t) => $body,
            Table::Fs5($t) => $body,
        }
    };
}

impl Table {
    pub fn new<T: VtdMemory>(
        mem: &T,
        stage: Stage,
        levels: u32,
        cfg: Config,
    ) -> Result<Self, ConfigError> {
        Ok(match (stage, levels) {
            (Stage::Second, 3) => Table::Ss3(PageTable::new(mem, cfg)?),
            (Stage::Second, 4) => Table::Ss4(PageTable::new(mem, cfg)?),
            (Stage::Second, 5) => Table::Ss5(PageTable::new(mem, cfg)?),
            (Stage::First, 4) => Table::Fs4(PageTable::new(mem, cfg)?),
            (Stage::First, 5) => Table::Fs5(PageTable::new(mem, cfg)?),
            _ => return Err(ConfigError::Format),
        })
    }

    pub fn root(&self) -> PhysAddr {
        with_table!(self, t => t.root())
    }

    pub fn levels(&self) -> u32 {
        with_table!(self, t => t.geometry().levels)
    }

    pub fn ias(&self) -> u32 {
        with_table!(self, t => t.geometry().ias)
    }

    /// Maps `[iova, iova + len)` to `out`: one physical range, or the runs of a
    /// [`RunSource`](crate::pgtable::RunSource).
    pub fn map<T: VtdMemory, O: MapOutput>(
        &self,
        mem: &T,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        with_table!(self, t => out.map_into(t, mem, iova, len, prot))
    }

    pub fn unmap<T: VtdMemory>(
        &self,
        mem: &T,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        with_table!(self, t => t.unmap(mem, iova, len, gather))
    }

    pub fn translate<T: VtdMemory>(&self, mem: &T, iova: u64) -> Option<Translation> {
        with_table!(self, t => t.translate(mem, iova))
    }

    pub fn destroy<T: VtdMemory>(self, mem: &T) {
        with_table!(self, t => t.destroy(mem))
    }
}

/// One IO address space on one remapping unit: a page table and a domain id.
///
/// Created by [`VtdUnit::create_domain`](super::VtdUnit::create_domain), which also picks the
/// table depth and the leaf attributes (SNP) for the unit; destroyed by
/// [`VtdUnit::destroy_domain`](super::VtdUnit::destroy_domain). Dropping a `Domain` leaks its
/// page table and domain id, which is safe (a device still pointing at it keeps translating
/// through intact tables) but wasteful.
pub struct Domain {
    pub(crate) did: u16,
    /// `None` for a pass-through domain.
    pub(crate) table: Option<Table>,
    /// Pass-through: the depth AW encodes (the largest SAGAW value) and the input bits that
    /// pass (AGAW capped by MGAW). Unused for a domain with a table.
    pub(crate) pt_geometry: (u32, u32),
    pub(crate) cfg: DomainConfig,
    /// The owning unit, identified by its root table's address.
    pub(crate) unit: u64,
    /// Legacy mode with snoop control: every leaf gets SNP.
    pub(crate) snoop_leaves: bool,
}

impl Domain {
    /// The domain id tagging this domain's cache entries.
    pub fn did(&self) -> u16 {
        self.did
    }

    pub fn enforce_cache_coherency(&self) -> bool {
        self.cfg.enforce_cache_coherency
    }

    pub fn stage(&self) -> Stage {
        self.cfg.stage
    }

    pub fn config(&self) -> DomainConfig {
        self.cfg
    }

    /// Page-table depth (3, 4 or 5); for a pass-through domain, the depth its AW field
    /// encodes.
    pub fn levels(&self) -> u32 {
        self.table
            .as_ref()
            .map_or(self.pt_geometry.0, Table::levels)
    }

    /// Input address bits the table translates (pass-through: the bits that pass).
    pub fn input_bits(&self) -> u32 {
        self.table.as_ref().map_or(self.pt_geometry.1, Table::ias)
    }

    /// Physical address of the page-table root (SLPTPTR / FLPTR); 0 for pass-through.
    pub fn root(&self) -> PhysAddr {
        self.table.as_ref().map_or(0, Table::root)
    }

    /// Whether this is a pass-through (identity, no page table) domain.
    pub fn is_pass_through(&self) -> bool {
        self.table.is_none()
    }

    /// The page table, or [`VtdError::PassThroughDomain`].
    pub(crate) fn table(&self) -> Result<&Table, VtdError> {
        self.table.as_ref().ok_or(VtdError::PassThroughDomain)
    }

    /// Whether every leaf is written with SNP (legacy mode, coherency enforced, ECAP.SC).
    pub fn snoops_leaves(&self) -> bool {
        self.snoop_leaves
    }

    pub(crate) fn check_unit(&self, unit: u64) -> Result<(), VtdError> {
        if self.unit == unit {
            Ok(())
        } else {
            Err(VtdError::ForeignDomain)
        }
    }
}

impl core::fmt::Debug for Domain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Domain")
            .field("did", &self.did)
            .field("stage", &self.cfg.stage)
            .field("levels", &self.levels())
            .field("root", &format_args!("{:#x}", self.root()))
            .field("coherent", &self.cfg.enforce_cache_coherency)
            .finish()
    }
}

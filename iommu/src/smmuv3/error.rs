//! The SMMUv3 driver's error type.

use core::fmt;

use crate::pgtable::{ConfigError, MapError, UnmapError};

/// Errors of the SMMUv3 driver. Every failure that a guest, a caller or hostile hardware can
/// provoke ends up here; none of them panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmmuError {
    /// A poll loop used up its budget ([`UnitConfig::poll_budget`](super::UnitConfig)).
    Timeout { what: &'static str },
    /// The command queue stopped on the command in slot `index` (CMDQ_CONS.ERR with
    /// GERROR.CMDQ_ERR, IHI 0070 §4.7 / §7.1). `kind` is `CERROR_ILL` (illegal command),
    /// `CERROR_ABT` (abort on command fetch) or `CERROR_ATC_INV_SYNC` (ATC invalidation
    /// timeout). The driver replaced the command with a CMD_SYNC (skipping it, the recovery
    /// §7.1 describes), acknowledged GERRORN and let the queue drain; what that command asked
    /// for did not happen.
    CommandError { kind: &'static str, index: u32 },
    /// The StreamID is not below 2^(StreamID bits the stream table covers): IDR1.SIDSIZE,
    /// capped by [`UnitConfig::stream_id_bits`](super::UnitConfig).
    StreamIdOutOfRange,
    /// The SMMU does not implement the translation stage the domain needs (IDR0.S1P / S2P;
    /// nested needs both).
    StageUnsupported,
    /// The domain's input size cannot be translated with 4 KiB granule tables here (stage 1:
    /// 25..=48 bits and IDR5.VAX; stage 2: 26..=48 bits and IDR5.OAS; nested: a parent IPA size
    /// of at least 32 bits).
    InputBitsUnsupported { requested: u32 },
    /// The memory source had no page for a structure (stream table, queue, context
    /// descriptor, page-table root, nested-structure window).
    NoMemory,
    /// The domain is still referenced: attached to a StreamID, or (stage 2) the parent of a
    /// nested domain.
    DomainBusy,
    /// Every ASID (IDR0.ASID16: 16 or 8 bits; 0 is never used) is taken.
    AsidExhausted,
    /// Every VMID (IDR0.VMID16: 16 or 8 bits; 0 tags stage-1-only streams) is taken.
    VmidExhausted,
    /// The domain belongs to another SMMU.
    ForeignDomain,
    /// Nested domains are made with [`create_nested_domain`](super::SmmuUnit::create_nested_domain),
    /// which names the parent.
    NestedNeedsParent,
    /// The parent of a nested domain must be a stage-2 domain.
    ParentNotStage2,
    /// Too many stage-2 domains are parents of nested domains at once (the driver tracks
    /// [`MAX_NESTED_PARENTS`](super::unit::MAX_NESTED_PARENTS)).
    TooManyNestedParents,
    /// The SMMU lacks something the driver requires (AArch64 tables, the 4 KiB granule,
    /// little-endian walks, programmable queue and table bases).
    Unsupported { what: &'static str },
    /// The page-table engine rejected the configuration.
    PageTable(ConfigError),
    /// The page-table engine rejected a map.
    Map(MapError),
    /// The page-table engine rejected an unmap.
    Unmap(UnmapError),
}

impl From<MapError> for SmmuError {
    fn from(e: MapError) -> Self {
        SmmuError::Map(e)
    }
}

impl From<UnmapError> for SmmuError {
    fn from(e: UnmapError) -> Self {
        SmmuError::Unmap(e)
    }
}

impl fmt::Display for SmmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmmuError::Timeout { what } => write!(f, "timed out waiting for {what}"),
            SmmuError::CommandError { kind, index } => {
                write!(f, "command queue error {kind} at slot {index}")
            }
            SmmuError::StreamIdOutOfRange => f.write_str("StreamID beyond the stream table"),
            SmmuError::StageUnsupported => {
                f.write_str("translation stage not implemented by this SMMU")
            }
            SmmuError::InputBitsUnsupported { requested } => {
                write!(f, "input address size of {requested} bits not supported")
            }
            SmmuError::NoMemory => f.write_str("out of memory for SMMU structures"),
            SmmuError::DomainBusy => f.write_str("domain still attached or nested upon"),
            SmmuError::AsidExhausted => f.write_str("no free ASID"),
            SmmuError::VmidExhausted => f.write_str("no free VMID"),
            SmmuError::ForeignDomain => f.write_str("domain belongs to another SMMU"),
            SmmuError::NestedNeedsParent => {
                f.write_str("nested domains need a parent: use create_nested_domain")
            }
            SmmuError::ParentNotStage2 => f.write_str("a nested domain's parent must be stage 2"),
            SmmuError::TooManyNestedParents => f.write_str("too many nested parent domains"),
            SmmuError::Unsupported { what } => write!(f, "SMMU unsupported: {what}"),
            SmmuError::PageTable(e) => write!(f, "page table: {e:?}"),
            SmmuError::Map(e) => write!(f, "map: {e}"),
            SmmuError::Unmap(e) => write!(f, "unmap: {e}"),
        }
    }
}

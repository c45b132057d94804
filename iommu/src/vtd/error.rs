//! The VT-d driver's error type.

use core::fmt;

use crate::pgtable::{ConfigError, MapError, UnmapError};

/// What went wrong in the invalidation queue (VT-d 4.1 §6.5.2.10, FSTS and IQERCD §11.4.9,
/// §11.4.29).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// FSTS.IQE: the hardware rejected the descriptor at queue index `index`. `iqei` is
    /// IQERCD.IQEI, reported raw (0 means the hardware gave no detail). The driver overwrote
    /// the bad descriptor with a harmless wait descriptor and resumed the queue; the invalidation
    /// that descriptor asked for did not happen.
    Iqe { iqei: u8, index: u16 },
    /// FSTS.ITE: a device-TLB invalidation to `sid` (IQERCD.ITESID) timed out; the hardware
    /// discarded the pending wait descriptors. The queue was resumed.
    Ite { sid: u16 },
    /// FSTS.ICE: a device-TLB invalidation completion from `sid` (IQERCD.ICESID) was invalid.
    Ice { sid: u16 },
}

/// Errors of the VT-d driver. Every failure a guest or hostile hardware can provoke ends up
/// here; none of them panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtdError {
    /// The requested [`TranslationMode`](super::TranslationMode) is not available: scalable
    /// mode needs ECAP.SMTS and ECAP.QI.
    ModeUnsupported,
    /// The domain's address width needs a table depth the unit lacks (CAP.SAGAW for second
    /// stage, 4-level or CAP.FL5LP for first stage), or is not 39, 48 or 57.
    AddressWidthUnsupported { requested: u32 },
    /// First-stage domains need scalable mode with ECAP.FLTS.
    FirstStageUnsupported,
    /// Second-stage domains in scalable mode need ECAP.SLTS (QEMU `x-flts=on` lacks it).
    SecondStageUnsupported,
    /// Dirty tracking needs first stage, or second stage in scalable mode with ECAP.SLADS.
    DirtyTrackingUnsupported,
    /// The domain enforces cache coherency and the unit has no snoop control (ECAP.SC = 0).
    SnoopControlUnsupported,
    /// Every domain id the unit supports (CAP.ND, id 0 excluded) is in use.
    DomainIdsExhausted,
    /// The memory source had no page for a remapping structure or page table.
    NoMemory,
    /// A poll loop used up its budget ([`UnitConfig::poll_budget`](super::UnitConfig)).
    Timeout { what: &'static str },
    /// The invalidation queue reported an error.
    InvalidationQueueError { error: QueueError },
    /// A register-based invalidation came back with CAIG/IAIG = 0: the hardware did not do it.
    InvalidationRejected { what: &'static str },
    /// The source id's bus is outside the unit's bus range ([`UnitConfig::buses`](super::UnitConfig)).
    BadSid { sid: u16 },
    /// A PASID other than 0 needs scalable mode and ECAP.PASID.
    PasidUnsupported,
    /// The PASID is beyond ECAP.PSS or beyond the driver's one-page PASID directory
    /// (32768 PASIDs).
    PasidOutOfRange { pasid: u32, limit: u32 },
    /// The source id (and PASID) already has a domain; use `replace`.
    AlreadyAttached,
    /// The source id (and PASID) has no domain.
    NotAttached,
    /// The domain is still attached `attachments` times.
    DomainBusy { attachments: u32 },
    /// The domain belongs to another remapping unit.
    ForeignDomain,
    /// Pass-through domains need ECAP.PT (legacy TT = 10b, scalable PGTT = 100b).
    PassThroughUnsupported,
    /// `map`/`unmap` on a pass-through domain, which has no page table.
    PassThroughDomain,
    /// A device TLB (ATS) was asked for where it cannot work: the unit lacks ECAP.DT or
    /// queued invalidation (device-TLB invalidations exist only as queue descriptors), or the
    /// entry would be a legacy pass-through one (TT = 10b blocks translation requests).
    DeviceTlbUnsupported,
    /// Scalable mode: the device TLB is enabled per device (context-entry DTE), and another
    /// PASID of `sid` is attached with the other setting.
    DeviceTlbMismatch { sid: u16 },
    /// Every device-TLB tracking slot of the unit is in use.
    DeviceTlbSlotsExhausted,
    /// `sid` is held by the unit's RMRR identity domain (VT-d 4.1 §8.4): firmware needs its DMA
    /// to the reserved ranges to keep working, so it cannot be attached elsewhere or detached.
    RmrrDevice { sid: u16 },
    /// [`apply_rmrr`](super::VtdUnit::apply_rmrr) already ran on this unit.
    RmrrAlreadyApplied,
    /// Nothing that behaves like a remapping unit answers at the DRHD's register base: VER, CAP
    /// and ECAP read as all-ones (nothing decodes the address) or as zero, or VER has its
    /// reserved bits set. Real tables name units a machine does not have (a socket not
    /// populated, a table copied from another board); programming one would only time out.
    UnitAbsent { why: &'static str },
    /// The page-table engine rejected the configuration.
    PageTable(ConfigError),
    /// The page-table engine rejected a map.
    Map(MapError),
    /// The page-table engine rejected an unmap.
    Unmap(UnmapError),
}

impl From<MapError> for VtdError {
    fn from(e: MapError) -> Self {
        VtdError::Map(e)
    }
}

impl From<UnmapError> for VtdError {
    fn from(e: UnmapError) -> Self {
        VtdError::Unmap(e)
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QueueError::Iqe { iqei, index } => write!(
                f,
                "invalidation queue error (IQE) at descriptor {index}, IQEI={iqei}"
            ),
            QueueError::Ite { sid } => write!(
                f,
                "device-TLB invalidation time-out (ITE) for SID {:02x}:{:02x}.{}",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
            QueueError::Ice { sid } => write!(
                f,
                "invalid device-TLB invalidation completion (ICE) from SID {:02x}:{:02x}.{}",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
        }
    }
}

impl fmt::Display for VtdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VtdError::ModeUnsupported => f.write_str("translation mode not supported by the unit"),
            VtdError::AddressWidthUnsupported { requested } => {
                write!(f, "address width {requested} not supported by the unit")
            }
            VtdError::FirstStageUnsupported => {
                f.write_str("first-stage translation needs scalable mode with ECAP.FLTS")
            }
            VtdError::SecondStageUnsupported => {
                f.write_str("second-stage translation not supported in scalable mode (ECAP.SLTS)")
            }
            VtdError::DirtyTrackingUnsupported => f.write_str("dirty tracking not supported"),
            VtdError::SnoopControlUnsupported => {
                f.write_str("domain enforces cache coherency but the unit lacks snoop control")
            }
            VtdError::DomainIdsExhausted => f.write_str("no free domain id"),
            VtdError::NoMemory => f.write_str("out of memory for remapping structures"),
            VtdError::Timeout { what } => write!(f, "timed out waiting for {what}"),
            VtdError::InvalidationQueueError { error } => write!(f, "{error}"),
            VtdError::InvalidationRejected { what } => {
                write!(f, "{what} invalidation not performed by the hardware")
            }
            VtdError::BadSid { sid } => write!(
                f,
                "source id {:02x}:{:02x}.{} is outside this unit",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
            VtdError::PasidUnsupported => f.write_str("PASIDs not supported"),
            VtdError::PasidOutOfRange { pasid, limit } => {
                write!(f, "PASID {pasid:#x} out of range (limit {limit:#x})")
            }
            VtdError::AlreadyAttached => f.write_str("already attached"),
            VtdError::NotAttached => f.write_str("not attached"),
            VtdError::DomainBusy { attachments } => {
                write!(f, "domain still has {attachments} attachments")
            }
            VtdError::ForeignDomain => f.write_str("domain belongs to another remapping unit"),
            VtdError::PassThroughUnsupported => {
                f.write_str("pass-through not supported by the unit (ECAP.PT)")
            }
            VtdError::PassThroughDomain => f.write_str("a pass-through domain has no page table"),
            VtdError::DeviceTlbUnsupported => {
                f.write_str("device TLB (ATS) not available for this attachment")
            }
            VtdError::DeviceTlbMismatch { sid } => write!(
                f,
                "another PASID of {:02x}:{:02x}.{} is attached with the other device-TLB setting",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
            VtdError::DeviceTlbSlotsExhausted => f.write_str("no free device-TLB tracking slot"),
            VtdError::RmrrDevice { sid } => write!(
                f,
                "{:02x}:{:02x}.{} has firmware RMRRs and stays in the identity domain",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            ),
            VtdError::RmrrAlreadyApplied => f.write_str("RMRRs already applied to this unit"),
            VtdError::UnitAbsent { why } => {
                write!(
                    f,
                    "no remapping unit at this address ({why}); not programmed"
                )
            }
            VtdError::PageTable(e) => write!(f, "page table: {e:?}"),
            VtdError::Map(e) => write!(f, "map: {e}"),
            VtdError::Unmap(e) => write!(f, "unmap: {e}"),
        }
    }
}

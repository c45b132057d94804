//! The ACPI DMA Remapping Reporting table, DMAR (Intel VT-d 4.1 chapter 8, "BIOS
//! Considerations"): which VT-d remapping units exist, which PCI devices each one translates,
//! and the memory ranges and properties firmware reports for those devices.
//!
//! [`Dmar::parse`] checks the whole table up front (header, every remapping structure, every
//! device scope), so the views and iterators it hands out afterwards never fail. Nothing is
//! copied or allocated: every view borrows the table bytes.

use core::fmt;

use bitflags::bitflags;

use super::acpi::{Reader, SdtHeader, TableError, validate_table};

mod dump;
mod scope;
mod structures;
#[cfg(test)]
mod tests;

pub use scope::{
    DeviceScope, DeviceScopes, MatchVia, NoBridges, PathEntry, PathIter, PciTopology, ResolveError,
    ResolvedScope, SCOPE_HEADER_LEN, ScopeType,
};
pub use structures::{
    Andd, Atsr, AtsrFlags, Drhd, DrhdFlags, RemappingStructure, Rhsa, Rmrr, STRUCTURE_HEADER_LEN,
    Satc, SatcFlags, Sidp, fixed_len, structure_type, type_names,
};

use structures::decode_structure;

/// The table signature.
pub const SIGNATURE: &[u8; 4] = b"DMAR";

/// ACPI header, host address width, flags and 10 reserved bytes (VT-d 4.1 §8.1); remapping
/// structures start here.
pub const DMAR_HEADER_LEN: usize = 48;

bitflags! {
    /// DMAR table flags (VT-d 4.1 §8.1). Reserved bits are kept, not dropped.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DmarFlags: u8 {
        /// The platform supports interrupt remapping.
        const INTR_REMAP = 1 << 0;
        /// Firmware asks the OS not to enable x2APIC mode (with interrupt remapping).
        const X2APIC_OPT_OUT = 1 << 1;
        /// Firmware asks the OS to turn on DMA remapping to protect against DMA from external
        /// devices (what Windows calls Kernel DMA Protection).
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }
}

/// Everything that can be wrong with a DMAR table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    /// The ACPI header: too short, wrong signature, bad length or checksum. Also a table too
    /// short for the DMAR fields after the ACPI header (`Truncated { needed: 48, .. }`).
    Table(TableError),
    /// The host address width field would mean more than 64 address bits.
    HostAddressWidth { field: u8 },
    /// Fewer than 4 bytes left at `offset` for a structure's type and length.
    StructureHeaderTruncated { offset: usize, remaining: usize },
    /// A structure with length 0, which would never advance the walk.
    StructureZeroLength { offset: usize, ty: u16 },
    /// A structure whose length runs past the end of the table.
    StructurePastEnd {
        offset: usize,
        ty: u16,
        length: u16,
        remaining: usize,
    },
    /// A structure shorter than the fixed part of its type.
    StructureTooShort {
        offset: usize,
        ty: u16,
        length: u16,
        min: u16,
    },
    /// One byte left in a structure where a device scope should start.
    ScopeTruncated { offset: usize, remaining: usize },
    /// A device scope with length 0.
    ScopeZeroLength { offset: usize },
    /// A device scope shorter than its 6-byte fixed part.
    ScopeTooShort { offset: usize, length: u8 },
    /// A device scope whose length is not 6 plus whole 2-byte path entries.
    ScopeOddLength { offset: usize, length: u8 },
    /// A device scope running past the end of its remapping structure.
    ScopePastStructure {
        offset: usize,
        length: u8,
        remaining: usize,
    },
    /// A device scope of a defined type with no path entries (so naming no device).
    ScopeEmptyPath { offset: usize, ty: u8 },
    /// An ANDD whose ACPI object name has no NUL terminator inside the structure (§8.7 defines
    /// the field as a null-terminated string; see `decode_structure` for why this is an error).
    AnddNameUnterminated { offset: usize },
}

impl DmarError {
    /// Table offset the error refers to, if it is about a structure or a scope.
    pub const fn offset(&self) -> Option<usize> {
        match *self {
            Self::Table(TableError::Structure { offset, .. }) => Some(offset),
            Self::Table(_) | Self::HostAddressWidth { .. } => None,
            Self::StructureHeaderTruncated { offset, .. }
            | Self::StructureZeroLength { offset, .. }
            | Self::StructurePastEnd { offset, .. }
            | Self::StructureTooShort { offset, .. }
            | Self::ScopeTruncated { offset, .. }
            | Self::ScopeZeroLength { offset }
            | Self::ScopeTooShort { offset, .. }
            | Self::ScopeOddLength { offset, .. }
            | Self::ScopePastStructure { offset, .. }
            | Self::ScopeEmptyPath { offset, .. }
            | Self::AnddNameUnterminated { offset } => Some(offset),
        }
    }

    const fn what(&self) -> &'static str {
        match self {
            Self::Table(_) => "bad ACPI table header",
            Self::HostAddressWidth { .. } => "host address width above 64 bits",
            Self::StructureHeaderTruncated { .. } => "remapping structure header truncated",
            Self::StructureZeroLength { .. } => "remapping structure length 0",
            Self::StructurePastEnd { .. } => "remapping structure runs past the table",
            Self::StructureTooShort { .. } => "remapping structure shorter than its fixed part",
            Self::ScopeTruncated { .. } => "device scope truncated",
            Self::ScopeZeroLength { .. } => "device scope length 0, below its 6-byte header",
            Self::ScopeTooShort { .. } => "device scope shorter than 6 bytes",
            Self::ScopeOddLength { .. } => "device scope length not 6 + 2n",
            Self::ScopePastStructure { .. } => "device scope runs past its structure",
            Self::ScopeEmptyPath { .. } => "device scope has no path entries",
            Self::AnddNameUnterminated { .. } => "ANDD object name not NUL-terminated",
        }
    }
}

impl From<TableError> for DmarError {
    fn from(e: TableError) -> Self {
        Self::Table(e)
    }
}

/// For callers that handle all ACPI tables' errors alike.
impl From<DmarError> for TableError {
    fn from(e: DmarError) -> Self {
        match e {
            DmarError::Table(t) => t,
            other => TableError::Structure {
                offset: other.offset().unwrap_or(0),
                what: other.what(),
            },
        }
    }
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Table(e) => write!(f, "DMAR: {e}"),
            Self::HostAddressWidth { field } => {
                write!(f, "DMAR: host address width field {field} (> 63)")
            }
            Self::StructureHeaderTruncated { offset, remaining } => write!(
                f,
                "DMAR at {offset:#x}: structure header needs 4 bytes, {remaining} left"
            ),
            Self::StructureZeroLength { offset, ty } => {
                write!(f, "DMAR at {offset:#x}: structure type {ty} has length 0")
            }
            Self::StructurePastEnd {
                offset,
                ty,
                length,
                remaining,
            } => write!(
                f,
                "DMAR at {offset:#x}: structure type {ty} length {length} but {remaining} bytes left"
            ),
            Self::StructureTooShort {
                offset,
                ty,
                length,
                min,
            } => write!(
                f,
                "DMAR at {offset:#x}: structure type {ty} length {length} below its fixed {min}"
            ),
            Self::ScopeTruncated { offset, remaining } => write!(
                f,
                "DMAR at {offset:#x}: device scope header needs 2 bytes, {remaining} left"
            ),
            // Why it is wrong, not only what: a scope is at least its 6-byte header (type,
            // length, flags, reserved, enumeration ID, start bus; VT-d 4.1 §8.3.1), and a
            // length of 0 could not even advance the walk to the next scope.
            Self::ScopeZeroLength { offset } => write!(
                f,
                "DMAR at {offset:#x}: device scope length 0, but a scope is at least its 6-byte \
                 header (VT-d 4.1 §8.3.1)"
            ),
            Self::ScopeTooShort { offset, length } => {
                write!(
                    f,
                    "DMAR at {offset:#x}: device scope length {length} below 6"
                )
            }
            Self::ScopeOddLength { offset, length } => write!(
                f,
                "DMAR at {offset:#x}: device scope length {length} is not 6 + 2 * path entries"
            ),
            Self::ScopePastStructure {
                offset,
                length,
                remaining,
            } => write!(
                f,
                "DMAR at {offset:#x}: device scope length {length} but {remaining} bytes left in \
                 its structure"
            ),
            Self::ScopeEmptyPath { offset, ty } => {
                write!(f, "DMAR at {offset:#x}: device scope type {ty} has no path")
            }
            Self::AnddNameUnterminated { offset } => write!(
                f,
                "DMAR at {offset:#x}: ANDD object name has no NUL terminator within the structure"
            ),
        }
    }
}

/// A parsed, fully validated DMAR table.
#[derive(Clone, Copy, Debug)]
pub struct Dmar<'a> {
    header: SdtHeader,
    /// The table trimmed to the header's length.
    table: &'a [u8],
    haw_field: u8,
    flags: DmarFlags,
}

impl<'a> Dmar<'a> {
    /// Validates the header (signature, length, checksum), the DMAR fields, and every
    /// remapping structure and device scope (VT-d 4.1 §8.1–§8.9). Bytes past the header's length
    /// are ignored. Structures of reserved types are accepted and kept opaque.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DmarError> {
        let (header, table) = validate_table(bytes, SIGNATURE)?;
        if table.len() < DMAR_HEADER_LEN {
            return Err(TableError::Truncated {
                needed: DMAR_HEADER_LEN,
                available: table.len(),
            }
            .into());
        }
        let r = Reader::new(table);
        let haw_field = r.u8(36)?;
        if haw_field > 63 {
            return Err(DmarError::HostAddressWidth { field: haw_field });
        }
        let flags = DmarFlags::from_bits_retain(r.u8(37)?);
        // Each step advances by a structure length of at least 4, so this terminates.
        let mut offset = DMAR_HEADER_LEN;
        while offset < table.len() {
            let (_, next) = decode_structure(table, offset)?;
            offset = next;
        }
        Ok(Self {
            header,
            table,
            haw_field,
            flags,
        })
    }

    pub const fn header(&self) -> &SdtHeader {
        &self.header
    }

    /// The table bytes (trimmed to the header's length).
    pub const fn bytes(&self) -> &'a [u8] {
        self.table
    }

    /// Maximum DMA physical address width in bits: the field plus one (§8.1).
    pub const fn host_address_width(&self) -> u8 {
        // `parse` rejected fields above 63.
        self.haw_field + 1
    }

    /// The raw host address width field (bits minus one).
    pub const fn host_address_width_field(&self) -> u8 {
        self.haw_field
    }

    pub const fn flags(&self) -> DmarFlags {
        self.flags
    }

    /// The 10 reserved bytes after the flags.
    pub fn reserved(&self) -> &'a [u8] {
        self.table.get(38..DMAR_HEADER_LEN).unwrap_or(&[])
    }

    /// All remapping structures in table order.
    pub fn structures(&self) -> Structures<'a> {
        Structures {
            table: self.table,
            offset: DMAR_HEADER_LEN,
        }
    }

    /// The DRHDs in table order; the position in this iterator is the unit index used by
    /// [`UnitMatch::index`].
    pub fn drhds(&self) -> impl Iterator<Item = Drhd<'a>> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Drhd(d) => Some(d),
            _ => None,
        })
    }

    pub fn rmrrs(&self) -> impl Iterator<Item = Rmrr<'a>> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Rmrr(r) => Some(r),
            _ => None,
        })
    }

    pub fn atsrs(&self) -> impl Iterator<Item = Atsr<'a>> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Atsr(a) => Some(a),
            _ => None,
        })
    }

    pub fn rhsas(&self) -> impl Iterator<Item = Rhsa> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Rhsa(r) => Some(r),
            _ => None,
        })
    }

    pub fn andds(&self) -> impl Iterator<Item = Andd<'a>> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Andd(a) => Some(a),
            _ => None,
        })
    }

    pub fn satcs(&self) -> impl Iterator<Item = Satc<'a>> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Satc(s) => Some(s),
            _ => None,
        })
    }

    pub fn sidps(&self) -> impl Iterator<Item = Sidp<'a>> + use<'a> {
        self.structures().filter_map(|s| match s {
            RemappingStructure::Sidp(s) => Some(s),
            _ => None,
        })
    }

    /// The ANDD declaring ACPI device `number`, which is what an ACPI-namespace-device scope's
    /// enumeration ID refers to (§8.7).
    pub fn acpi_namespace_device(&self, number: u8) -> Option<Andd<'a>> {
        self.andds().find(|a| a.device_number() == number)
    }

    /// The proximity domain of the unit at `register_base`, from its RHSA (§8.6).
    pub fn proximity_domain(&self, register_base: u64) -> Option<u32> {
        self.rhsas()
            .find(|r| r.register_base() == register_base)
            .map(|r| r.proximity_domain())
    }

    /// The INCLUDE_PCI_ALL unit of `segment` and its DRHD index. §8.3 allows at most one per
    /// segment, listed after the segment's other DRHDs; the first is taken if firmware has more.
    pub fn include_pci_all_unit(&self, segment: u16) -> Option<UnitMatch<'a>> {
        self.drhds()
            .enumerate()
            .find(|(_, d)| d.segment() == segment && d.include_pci_all())
            .map(|(index, drhd)| UnitMatch::new(index, drhd, MatchVia::IncludePciAll))
    }

    /// Which remapping unit translates DMA from PCI function `segment:bus:device.function`
    /// (VT-d 4.1 §8.3): a DRHD whose endpoint or sub-hierarchy scope names the device itself
    /// wins; otherwise the DRHD with the narrowest sub-hierarchy scope whose bus range holds
    /// the device; otherwise the segment's INCLUDE_PCI_ALL unit. Ties go to table order.
    /// Scopes that do not resolve against `topology` (absent devices) are skipped.
    pub fn unit_for_device(
        &self,
        segment: u16,
        bus: u8,
        device: u8,
        function: u8,
        topology: &dyn PciTopology,
    ) -> Option<UnitMatch<'a>> {
        let mut best: Option<(u8, UnitMatch<'a>)> = None;
        for (index, drhd) in self.drhds().enumerate() {
            if drhd.segment() != segment {
                continue;
            }
            for scope in drhd.scopes() {
                match scope_match(&scope, segment, bus, device, function, topology) {
                    Some(via @ (MatchVia::Endpoint | MatchVia::Bridge)) => {
                        return Some(UnitMatch::new(index, drhd, via));
                    }
                    Some(
                        via @ MatchVia::BehindBridge {
                            secondary,
                            subordinate,
                        },
                    ) => {
                        // `covers` only matches ranges with subordinate >= secondary.
                        let width = subordinate.saturating_sub(secondary);
                        if best.as_ref().is_none_or(|(w, _)| width < *w) {
                            best = Some((width, UnitMatch::new(index, drhd.clone(), via)));
                        }
                    }
                    Some(MatchVia::IncludePciAll) | None => {}
                }
            }
        }
        match best {
            Some((_, m)) => Some(m),
            None => self.include_pci_all_unit(segment),
        }
    }

    /// The RMRRs (§8.4) whose scopes name `segment:bus:device.function` or a bridge above it:
    /// the regions that must stay identity-mapped in that device's domain.
    pub fn rmrrs_for_device<'s>(
        &'s self,
        segment: u16,
        bus: u8,
        device: u8,
        function: u8,
        topology: &'s dyn PciTopology,
    ) -> impl Iterator<Item = Rmrr<'a>> + 's {
        self.rmrrs().filter(move |r| {
            r.segment() == segment
                && r.scopes()
                    .any(|s| scope_match(&s, segment, bus, device, function, topology).is_some())
        })
    }

    /// The unit whose scope lists the I/O APIC, HPET or ACPI namespace device with this
    /// enumeration ID, with that scope (the source-id for interrupt remapping comes from it).
    /// Some firmware repeats an ID (e.g. 8 HPET scopes all numbered 0); the first wins.
    pub fn unit_for_enumeration_id(
        &self,
        kind: ScopeType,
        enumeration_id: u8,
    ) -> Option<(usize, Drhd<'a>, DeviceScope<'a>)> {
        self.drhds().enumerate().find_map(|(index, drhd)| {
            let scope = drhd
                .scopes()
                .find(|s| s.scope_type() == kind && s.enumeration_id() == enumeration_id)?;
            Some((index, drhd, scope))
        })
    }
}

/// How an endpoint or sub-hierarchy scope relates to a PCI function, if at all.
fn scope_match(
    scope: &DeviceScope<'_>,
    segment: u16,
    bus: u8,
    device: u8,
    function: u8,
    topology: &dyn PciTopology,
) -> Option<MatchVia> {
    if !matches!(scope.scope_type(), ScopeType::Endpoint | ScopeType::Bridge) {
        return None;
    }
    scope
        .resolve(segment, topology)
        .ok()?
        .covers(bus, device, function)
}

/// The remapping unit found for a device.
#[derive(Clone, Debug)]
pub struct UnitMatch<'a> {
    /// Index of the DRHD among the table's DRHDs, in table order.
    pub index: usize,
    pub register_base: u64,
    pub drhd: Drhd<'a>,
    pub via: MatchVia,
}

impl<'a> UnitMatch<'a> {
    fn new(index: usize, drhd: Drhd<'a>, via: MatchVia) -> Self {
        Self {
            index,
            register_base: drhd.register_base(),
            drhd,
            via,
        }
    }
}

/// Iterator over a validated table's remapping structures; cannot fail.
#[derive(Clone, Debug)]
pub struct Structures<'a> {
    table: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Structures<'a> {
    type Item = RemappingStructure<'a>;

    fn next(&mut self) -> Option<RemappingStructure<'a>> {
        if self.offset >= self.table.len() {
            return None;
        }
        match decode_structure(self.table, self.offset) {
            Ok((s, next)) => {
                self.offset = next;
                Some(s)
            }
            // Unreachable after `Dmar::parse`; end the walk rather than loop or panic.
            Err(_) => {
                self.offset = self.table.len();
                None
            }
        }
    }
}

impl core::iter::FusedIterator for Structures<'_> {}

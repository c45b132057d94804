//! Typed views of the remapping structures that follow the DMAR header (VT-d 4.1 §8.2–§8.9).
//! Each view is built by [`decode_structure`], which is also what validates the table at parse
//! time, so a view can only exist for bytes that passed every check.

use bitflags::bitflags;

use super::DmarError;
use super::scope::DeviceScopes;
use crate::firmware::acpi::{Reader, TableError};

/// Remapping structure type codes (VT-d 4.1 §8.2).
pub mod structure_type {
    pub const DRHD: u16 = 0;
    pub const RMRR: u16 = 1;
    pub const ATSR: u16 = 2;
    pub const RHSA: u16 = 3;
    pub const ANDD: u16 = 4;
    pub const SATC: u16 = 5;
    pub const SIDP: u16 = 6;
}

/// Bytes every structure starts with: type (u16) and length (u16).
pub const STRUCTURE_HEADER_LEN: usize = 4;

/// Length of the fixed part (before device scopes or the name) of each known structure type;
/// reserved types only need their type/length header.
pub const fn fixed_len(ty: u16) -> u16 {
    match ty {
        structure_type::DRHD => 16,
        structure_type::RMRR => 24,
        structure_type::ATSR => 8,
        structure_type::RHSA => 20,
        structure_type::ANDD => 8,
        structure_type::SATC => 8,
        structure_type::SIDP => 8,
        _ => STRUCTURE_HEADER_LEN as u16,
    }
}

/// Short and long names of a structure type, as a disassembler would print them.
pub const fn type_names(ty: u16) -> (&'static str, &'static str) {
    match ty {
        structure_type::DRHD => ("DRHD", "Hardware Unit Definition"),
        structure_type::RMRR => ("RMRR", "Reserved Memory Region"),
        structure_type::ATSR => ("ATSR", "Root Port ATS Capability"),
        structure_type::RHSA => ("RHSA", "Remapping Hardware Static Affinity"),
        structure_type::ANDD => ("ANDD", "ACPI Namespace Device Declaration"),
        structure_type::SATC => ("SATC", "SoC Integrated Address Translation Cache"),
        structure_type::SIDP => ("SIDP", "SoC Integrated Device Property"),
        _ => ("????", "Unknown (reserved type)"),
    }
}

bitflags! {
    /// DRHD flags (VT-d 4.1 §8.3). Reserved bits are kept, not dropped.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DrhdFlags: u8 {
        /// The unit covers every PCI device of its segment not claimed by another DRHD.
        const INCLUDE_PCI_ALL = 1 << 0;
    }
}

bitflags! {
    /// ATSR flags (VT-d 4.1 §8.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct AtsrFlags: u8 {
        /// Every root port of the segment supports ATS; the scope list is then empty.
        const ALL_PORTS = 1 << 0;
    }
}

bitflags! {
    /// SATC flags (VT-d 4.1 §8.8).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SatcFlags: u8 {
        /// The listed devices' ATCs must be enabled for correct operation (not just allowed).
        const ATC_REQUIRED = 1 << 0;
    }
}

/// DMA Remapping Hardware Unit Definition (type 0, VT-d 4.1 §8.3).
#[derive(Clone, Debug)]
pub struct Drhd<'a> {
    offset: usize,
    length: u16,
    flags: DrhdFlags,
    size: u8,
    segment: u16,
    register_base: u64,
    scopes: DeviceScopes<'a>,
}

impl<'a> Drhd<'a> {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn flags(&self) -> DrhdFlags {
        self.flags
    }
    pub const fn include_pci_all(&self) -> bool {
        self.flags.contains(DrhdFlags::INCLUDE_PCI_ALL)
    }
    /// The raw "Size" byte (byte 5; reserved, hence 0, before VT-d 4.0).
    pub const fn size_field(&self) -> u8 {
        self.size
    }
    /// Number of 4 KiB pages in the register set: 2^N for N = Size bits 3:0 (VT-d 4.1 §8.3).
    /// A pre-4.0 table's 0 means one page, which is what those units have.
    pub const fn register_set_pages(&self) -> u32 {
        1 << (self.size & 0x0f)
    }
    /// Register set length in bytes (at most 2^15 pages, so no overflow).
    pub const fn register_set_len(&self) -> u64 {
        (self.register_set_pages() as u64) * 4096
    }
    pub const fn segment(&self) -> u16 {
        self.segment
    }
    pub const fn register_base(&self) -> u64 {
        self.register_base
    }
    pub fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes.clone()
    }
}

/// Reserved Memory Region Reporting (type 1, VT-d 4.1 §8.4): memory the listed devices may
/// DMA to at any time (USB legacy emulation, IGD stolen memory), which must stay identity-mapped.
#[derive(Clone, Debug)]
pub struct Rmrr<'a> {
    offset: usize,
    length: u16,
    segment: u16,
    base: u64,
    limit: u64,
    scopes: DeviceScopes<'a>,
}

impl<'a> Rmrr<'a> {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn segment(&self) -> u16 {
        self.segment
    }
    pub const fn base(&self) -> u64 {
        self.base
    }
    /// Last byte of the region (inclusive).
    pub const fn limit(&self) -> u64 {
        self.limit
    }
    /// `limit - base + 1`, or `None` if the limit is below the base or the region is all of
    /// the 64-bit space.
    pub const fn size(&self) -> Option<u64> {
        match self.limit.checked_sub(self.base) {
            Some(d) => d.checked_add(1),
            None => None,
        }
    }
    /// §8.4 requires a 4 KiB-aligned base and a size that is a non-zero multiple of 4 KiB.
    /// Real firmware violates this (e.g. base 0 limit 0), so the parser keeps such regions and
    /// leaves the policy to the caller.
    pub const fn is_well_formed(&self) -> bool {
        match self.size() {
            Some(size) => self.base.is_multiple_of(4096) && size.is_multiple_of(4096),
            None => false,
        }
    }
    pub fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes.clone()
    }
}

/// Root Port ATS Capability Reporting (type 2, VT-d 4.1 §8.5).
#[derive(Clone, Debug)]
pub struct Atsr<'a> {
    offset: usize,
    length: u16,
    flags: AtsrFlags,
    segment: u16,
    scopes: DeviceScopes<'a>,
}

impl<'a> Atsr<'a> {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn flags(&self) -> AtsrFlags {
        self.flags
    }
    pub const fn all_ports(&self) -> bool {
        self.flags.contains(AtsrFlags::ALL_PORTS)
    }
    pub const fn segment(&self) -> u16 {
        self.segment
    }
    pub fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes.clone()
    }
}

/// Remapping Hardware Static Affinity (type 3, VT-d 4.1 §8.6): NUMA node of a DRHD, matched to
/// it by register base address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rhsa {
    offset: usize,
    length: u16,
    register_base: u64,
    proximity_domain: u32,
}

impl Rhsa {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn register_base(&self) -> u64 {
        self.register_base
    }
    pub const fn proximity_domain(&self) -> u32 {
        self.proximity_domain
    }
}

/// ACPI Name-space Device Declaration (type 4, VT-d 4.1 §8.7): ties a device number, used as
/// the enumeration ID of ACPI-namespace-device scopes, to an ACPI object path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Andd<'a> {
    offset: usize,
    length: u16,
    device_number: u8,
    name_field: &'a [u8],
}

impl<'a> Andd<'a> {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn device_number(&self) -> u8 {
        self.device_number
    }
    /// The whole object-name field, including the NUL terminator and any padding.
    pub const fn name_field(&self) -> &'a [u8] {
        self.name_field
    }
    /// The object name up to (not including) the first NUL (parsing guarantees there is one).
    pub fn object_name_bytes(&self) -> &'a [u8] {
        let end = self
            .name_field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name_field.len());
        self.name_field.get(..end).unwrap_or(&[])
    }
    /// The object name as text, if it is valid UTF-8 (ACPI names are ASCII).
    pub fn object_name(&self) -> Option<&'a str> {
        core::str::from_utf8(self.object_name_bytes()).ok()
    }
}

/// SoC Integrated Address Translation Cache (type 5, VT-d 4.1 §8.8).
#[derive(Clone, Debug)]
pub struct Satc<'a> {
    offset: usize,
    length: u16,
    flags: SatcFlags,
    segment: u16,
    scopes: DeviceScopes<'a>,
}

impl<'a> Satc<'a> {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn flags(&self) -> SatcFlags {
        self.flags
    }
    pub const fn atc_required(&self) -> bool {
        self.flags.contains(SatcFlags::ATC_REQUIRED)
    }
    pub const fn segment(&self) -> u16 {
        self.segment
    }
    pub fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes.clone()
    }
}

/// SoC Integrated Device Property (type 6, VT-d 4.1 §8.9); the properties are in each device
/// scope's flags byte ([`super::DeviceScope::flags`]).
#[derive(Clone, Debug)]
pub struct Sidp<'a> {
    offset: usize,
    length: u16,
    segment: u16,
    scopes: DeviceScopes<'a>,
}

impl<'a> Sidp<'a> {
    pub const fn offset(&self) -> usize {
        self.offset
    }
    pub const fn length(&self) -> u16 {
        self.length
    }
    pub const fn segment(&self) -> u16 {
        self.segment
    }
    pub fn scopes(&self) -> DeviceScopes<'a> {
        self.scopes.clone()
    }
}

/// One remapping structure of a DMAR table.
#[derive(Clone, Debug)]
pub enum RemappingStructure<'a> {
    Drhd(Drhd<'a>),
    Rmrr(Rmrr<'a>),
    Atsr(Atsr<'a>),
    Rhsa(Rhsa),
    Andd(Andd<'a>),
    Satc(Satc<'a>),
    Sidp(Sidp<'a>),
    /// A type this parser does not know (reserved at VT-d 4.1); kept so newer tables still parse.
    /// `bytes` is the whole structure, type and length included.
    Unknown {
        offset: usize,
        ty: u16,
        bytes: &'a [u8],
    },
}

impl<'a> RemappingStructure<'a> {
    pub fn type_code(&self) -> u16 {
        match self {
            Self::Drhd(_) => structure_type::DRHD,
            Self::Rmrr(_) => structure_type::RMRR,
            Self::Atsr(_) => structure_type::ATSR,
            Self::Rhsa(_) => structure_type::RHSA,
            Self::Andd(_) => structure_type::ANDD,
            Self::Satc(_) => structure_type::SATC,
            Self::Sidp(_) => structure_type::SIDP,
            Self::Unknown { ty, .. } => *ty,
        }
    }

    /// Byte offset of the structure from the start of the DMAR table.
    pub fn offset(&self) -> usize {
        match self {
            Self::Drhd(s) => s.offset,
            Self::Rmrr(s) => s.offset,
            Self::Atsr(s) => s.offset,
            Self::Rhsa(s) => s.offset,
            Self::Andd(s) => s.offset,
            Self::Satc(s) => s.offset,
            Self::Sidp(s) => s.offset,
            Self::Unknown { offset, .. } => *offset,
        }
    }

    pub fn length(&self) -> u16 {
        match self {
            Self::Drhd(s) => s.length,
            Self::Rmrr(s) => s.length,
            Self::Atsr(s) => s.length,
            Self::Rhsa(s) => s.length,
            Self::Andd(s) => s.length,
            Self::Satc(s) => s.length,
            Self::Sidp(s) => s.length,
            // `bytes` is exactly `length` long, which came from a u16.
            Self::Unknown { bytes, .. } => u16::try_from(bytes.len()).unwrap_or(u16::MAX),
        }
    }

    /// The device scopes, for the structure types that have them.
    pub fn scopes(&self) -> Option<DeviceScopes<'a>> {
        match self {
            Self::Drhd(s) => Some(s.scopes()),
            Self::Rmrr(s) => Some(s.scopes()),
            Self::Atsr(s) => Some(s.scopes()),
            Self::Satc(s) => Some(s.scopes()),
            Self::Sidp(s) => Some(s.scopes()),
            Self::Rhsa(_) | Self::Andd(_) | Self::Unknown { .. } => None,
        }
    }
}

/// Decodes and fully validates (device scopes included) the structure at `offset` of `table`;
/// returns it and the offset just past it.
pub(super) fn decode_structure(
    table: &[u8],
    offset: usize,
) -> Result<(RemappingStructure<'_>, usize), DmarError> {
    let rest = table.get(offset..).unwrap_or(&[]);
    let header = Reader::new(rest);
    let (Ok(ty), Ok(length)) = (header.u16(0), header.u16(2)) else {
        return Err(DmarError::StructureHeaderTruncated {
            offset,
            remaining: rest.len(),
        });
    };
    if length == 0 {
        return Err(DmarError::StructureZeroLength { offset, ty });
    }
    let Some(bytes) = rest.get(..usize::from(length)) else {
        return Err(DmarError::StructurePastEnd {
            offset,
            ty,
            length,
            remaining: rest.len(),
        });
    };
    let min = fixed_len(ty);
    if length < min {
        return Err(DmarError::StructureTooShort {
            offset,
            ty,
            length,
            min,
        });
    }
    // Cannot fail once `length >= min`; mapped to the same error so no panic path exists.
    let short = |_: TableError| DmarError::StructureTooShort {
        offset,
        ty,
        length,
        min,
    };
    let r = Reader::new(bytes);
    let scopes = || scopes_after(bytes, usize::from(min), offset);
    let s = match ty {
        structure_type::DRHD => RemappingStructure::Drhd(Drhd {
            offset,
            length,
            flags: DrhdFlags::from_bits_retain(r.u8(4).map_err(short)?),
            size: r.u8(5).map_err(short)?,
            segment: r.u16(6).map_err(short)?,
            register_base: r.u64(8).map_err(short)?,
            scopes: scopes()?,
        }),
        structure_type::RMRR => RemappingStructure::Rmrr(Rmrr {
            offset,
            length,
            segment: r.u16(6).map_err(short)?,
            base: r.u64(8).map_err(short)?,
            limit: r.u64(16).map_err(short)?,
            scopes: scopes()?,
        }),
        structure_type::ATSR => RemappingStructure::Atsr(Atsr {
            offset,
            length,
            flags: AtsrFlags::from_bits_retain(r.u8(4).map_err(short)?),
            segment: r.u16(6).map_err(short)?,
            scopes: scopes()?,
        }),
        structure_type::RHSA => RemappingStructure::Rhsa(Rhsa {
            offset,
            length,
            register_base: r.u64(8).map_err(short)?,
            proximity_domain: r.u32(16).map_err(short)?,
        }),
        structure_type::ANDD => {
            // VT-d 4.1 §8.7 (Table 8-12) defines "ACPI Object Name" as a "Null-terminated ASCII
            // string", exactly as DEN 0049 defines a named component's "Device object name"
            // ("Null terminated ASCII string"), and the IORT parser rejects a name without its
            // NUL. The two parsers treat the same defect alike: a name that runs to the end of
            // the structure means the length field is wrong (the name may be cut short), so the
            // OS could match the wrong ACPI device; the table is rejected rather than guessed.
            let name_field = bytes.get(8..).unwrap_or(&[]);
            if !name_field.contains(&0) {
                return Err(DmarError::AnddNameUnterminated { offset });
            }
            RemappingStructure::Andd(Andd {
                offset,
                length,
                device_number: r.u8(7).map_err(short)?,
                name_field,
            })
        }
        structure_type::SATC => RemappingStructure::Satc(Satc {
            offset,
            length,
            flags: SatcFlags::from_bits_retain(r.u8(4).map_err(short)?),
            segment: r.u16(6).map_err(short)?,
            scopes: scopes()?,
        }),
        structure_type::SIDP => RemappingStructure::Sidp(Sidp {
            offset,
            length,
            segment: r.u16(6).map_err(short)?,
            scopes: scopes()?,
        }),
        _ => RemappingStructure::Unknown { offset, ty, bytes },
    };
    Ok((s, offset.saturating_add(usize::from(length))))
}

/// The device scopes that fill a structure from its fixed part to its end, validated.
fn scopes_after(bytes: &[u8], start: usize, offset: usize) -> Result<DeviceScopes<'_>, DmarError> {
    let scopes = DeviceScopes::new(
        bytes.get(start..).unwrap_or(&[]),
        offset.saturating_add(start),
    );
    scopes.validate()?;
    Ok(scopes)
}

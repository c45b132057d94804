//! The ACPI system description table header shared by every table (ACPI 6.5 §5.2.6), plus the
//! little-endian field readers the table parsers are built on.
//!
//! Every read is bounds-checked and returns an error instead of panicking: a firmware table is
//! untrusted input.

use core::fmt;

/// Length of the standard header that starts every system description table.
pub const SDT_HEADER_LEN: usize = 36;

/// Errors shared by all ACPI table parsers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Fewer bytes than the header (or a fixed part) needs.
    Truncated { needed: usize, available: usize },
    /// The header's length field disagrees with the bytes given.
    LengthMismatch { header: u32, available: usize },
    /// Bytes do not sum to zero mod 256.
    BadChecksum { sum: u8 },
    /// The table is not the one the parser expects.
    WrongSignature { found: [u8; 4], expected: [u8; 4] },
    /// A structure inside the table is malformed.
    Structure { offset: usize, what: &'static str },
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TableError::Truncated { needed, available } => {
                write!(f, "table truncated: need {needed} bytes, have {available}")
            }
            TableError::LengthMismatch { header, available } => {
                write!(f, "header length {header} but {available} bytes available")
            }
            TableError::BadChecksum { sum } => {
                write!(f, "bad checksum: bytes sum to {sum:#04x}, not 0")
            }
            TableError::WrongSignature { found, expected } => {
                write!(f, "signature {:?} is not {:?}", Sig(found), Sig(expected))
            }
            TableError::Structure { offset, what } => write!(f, "at offset {offset:#x}: {what}"),
        }
    }
}

/// Prints a 4-byte signature as text, escaping non-printable bytes.
pub struct Sig(pub [u8; 4]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for &b in &self.0 {
            if (0x20..0x7f).contains(&b) {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

/// The decoded standard header (ACPI 6.5 Table 5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SdtHeader {
    pub signature: [u8; 4],
    pub length: u32,
    pub revision: u8,
    pub checksum: u8,
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: [u8; 4],
    pub creator_revision: u32,
}

impl SdtHeader {
    /// Parses the header without checking length or checksum (see [`validate_table`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, TableError> {
        let r = Reader::new(bytes);
        Ok(SdtHeader {
            signature: r.array(0)?,
            length: r.u32(4)?,
            revision: r.u8(8)?,
            checksum: r.u8(9)?,
            oem_id: r.array(10)?,
            oem_table_id: r.array(16)?,
            oem_revision: r.u32(24)?,
            creator_id: r.array(28)?,
            creator_revision: r.u32(32)?,
        })
    }
}

/// Checks a whole table: header present, expected signature, `length` at most the
/// bytes given (trailing bytes beyond `length` are ignored, as firmware pads), and checksum.
/// Returns the header and the table trimmed to `length`.
pub fn validate_table<'a>(
    bytes: &'a [u8],
    expected: &[u8; 4],
) -> Result<(SdtHeader, &'a [u8]), TableError> {
    if bytes.len() < SDT_HEADER_LEN {
        return Err(TableError::Truncated {
            needed: SDT_HEADER_LEN,
            available: bytes.len(),
        });
    }
    let header = SdtHeader::parse(bytes)?;
    if &header.signature != expected {
        return Err(TableError::WrongSignature {
            found: header.signature,
            expected: *expected,
        });
    }
    let len = header.length as usize;
    if len < SDT_HEADER_LEN || len > bytes.len() {
        return Err(TableError::LengthMismatch {
            header: header.length,
            available: bytes.len(),
        });
    }
    let table = &bytes[..len];
    let sum = checksum(table);
    if sum != 0 {
        return Err(TableError::BadChecksum { sum });
    }
    Ok((header, table))
}

/// Sum of all bytes mod 256 (0 for a valid table).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
}

/// Bounds-checked little-endian reads at byte offsets. Fields in ACPI tables are frequently
/// unaligned (DMAR structures land at odd offsets after 2-hop scopes), so reads copy bytes.
#[derive(Clone, Copy)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub const fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub const fn len(&self) -> usize {
        self.bytes.len()
    }

    pub const fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn bytes(&self, offset: usize, len: usize) -> Result<&'a [u8], TableError> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= self.bytes.len() => Ok(&self.bytes[offset..end]),
            _ => Err(TableError::Truncated {
                needed: offset.saturating_add(len),
                available: self.bytes.len(),
            }),
        }
    }

    pub fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N], TableError> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(offset, N)?);
        Ok(out)
    }

    pub fn u8(&self, offset: usize) -> Result<u8, TableError> {
        Ok(self.array::<1>(offset)?[0])
    }

    pub fn u16(&self, offset: usize) -> Result<u16, TableError> {
        Ok(u16::from_le_bytes(self.array(offset)?))
    }

    pub fn u32(&self, offset: usize) -> Result<u32, TableError> {
        Ok(u32::from_le_bytes(self.array(offset)?))
    }

    pub fn u64(&self, offset: usize) -> Result<u64, TableError> {
        Ok(u64::from_le_bytes(self.array(offset)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(sig: &[u8; 4], body: &[u8]) -> std::vec::Vec<u8> {
        let mut t = std::vec![0u8; SDT_HEADER_LEN];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[8] = 1;
        let sum = checksum(&t);
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    #[test]
    fn valid_table_passes_and_is_trimmed() {
        let mut t = table(b"DMAR", &[1, 2, 3]);
        t.extend_from_slice(&[0xff; 5]); // padding after the table
        let (h, body) = validate_table(&t, b"DMAR").unwrap();
        assert_eq!(h.length, 39);
        assert_eq!(body.len(), 39);
    }

    #[test]
    fn every_header_defect_is_a_typed_error() {
        let t = table(b"IORT", &[0; 8]);
        assert!(matches!(
            validate_table(&t[..20], b"IORT"),
            Err(TableError::Truncated { .. })
        ));
        assert!(matches!(
            validate_table(&t, b"DMAR"),
            Err(TableError::WrongSignature { .. })
        ));
        assert!(matches!(
            validate_table(&t[..40], b"IORT"),
            Err(TableError::LengthMismatch { .. })
        ));
        let mut bad = t.clone();
        bad[40] ^= 1;
        assert_eq!(
            validate_table(&bad, b"IORT"),
            Err(TableError::BadChecksum { sum: 1 })
        );
        let mut short = t.clone();
        short[4..8].copy_from_slice(&10u32.to_le_bytes());
        assert!(matches!(
            validate_table(&short, b"IORT"),
            Err(TableError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn reader_never_reads_out_of_bounds() {
        let r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(1).unwrap(), 0x0302);
        assert_eq!(
            r.u32(0),
            Err(TableError::Truncated {
                needed: 4,
                available: 3
            })
        );
        // An end that overflows is reported as needing usize::MAX bytes, not wrapped round.
        let overflow = TableError::Truncated {
            needed: usize::MAX,
            available: 3,
        };
        assert_eq!(r.u8(usize::MAX), Err(overflow));
        assert_eq!(r.bytes(usize::MAX, 2), Err(overflow));
    }
}

//! Firmware tables that describe IOMMUs: ACPI DMAR (VT-d), ACPI IORT (Arm SMMU), and the device
//! tree's `iommus` / `iommu-map` bindings. All parsers are zero-copy over `&[u8]`, bounds-checked
//! everywhere, and return typed errors.

pub mod acpi;
pub mod dbg2;
pub mod devicetree;
pub mod dmar;
pub mod gtdt;
pub mod iort;
pub mod madt;

/// Decodes any supported table (chosen by its signature) into a human-readable dump, the way
/// `cargo xtask decode-table` shows it. Malformed input is an error, never a panic.
pub fn dump_table(bytes: &[u8], out: &mut dyn core::fmt::Write) -> Result<(), DumpError> {
    // Fewer than 4 bytes cannot say which table they were meant to be: report that, not the
    // error of whichever parser a guess would pick.
    let Ok(sig) = acpi::Reader::new(bytes).array::<4>(0) else {
        return Err(DumpError::NoSignature { len: bytes.len() });
    };
    match &sig {
        b"DMAR" => dmar::Dmar::parse(bytes).map_err(DumpError::Dmar)?.dump(out),
        b"IORT" => iort::Iort::parse(bytes).map_err(DumpError::Iort)?.dump(out),
        _ => return Err(DumpError::UnknownSignature(sig)),
    }
    .map_err(|_| DumpError::Format)
}

/// Why a table could not be dumped.
#[derive(Debug)]
pub enum DumpError {
    /// Too short to hold even the 4-byte signature.
    NoSignature {
        len: usize,
    },
    UnknownSignature([u8; 4]),
    Dmar(dmar::DmarError),
    Iort(iort::IortError),
    Format,
}

impl core::fmt::Display for DumpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DumpError::NoSignature { len } => write!(
                f,
                "not an ACPI table: {len} bytes, fewer than the 4-byte signature (the ACPI \
                 header alone is {} bytes)",
                acpi::SDT_HEADER_LEN
            ),
            DumpError::UnknownSignature(s) => {
                write!(
                    f,
                    "not a DMAR or IORT table (signature {:?})",
                    acpi::Sig(*s)
                )
            }
            // Both parsers' messages name their table already ("DMAR: ...", "IORT node at ...").
            DumpError::Dmar(e) => write!(f, "malformed table: {e}"),
            DumpError::Iort(e) => write!(f, "malformed table: {e}"),
            DumpError::Format => f.write_str("output error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_rejects_unknown_and_truncated_tables_with_errors() {
        let mut s = std::string::String::new();
        assert!(matches!(
            dump_table(b"FACP\0\0\0\0", &mut s),
            Err(DumpError::UnknownSignature(_))
        ));
        assert!(matches!(
            dump_table(b"DM", &mut s),
            Err(DumpError::NoSignature { len: 2 })
        ));
        assert!(matches!(
            dump_table(b"DMAR\x30\0\0\0", &mut s),
            Err(DumpError::Dmar(_))
        ));
        assert!(matches!(
            dump_table(b"IORT\x30\0\0\0", &mut s),
            Err(DumpError::Iort(_))
        ));
        assert!(s.is_empty());
    }

    fn message(bytes: &[u8]) -> std::string::String {
        let mut s = std::string::String::new();
        std::format!("{}", dump_table(bytes, &mut s).unwrap_err())
    }

    /// A file too short for a signature is not blamed on the DMAR parser (it used to read
    /// "DMAR: table truncated" for a 0- or 1-byte IORT file).
    #[test]
    fn too_short_for_a_signature_names_no_table() {
        for bytes in [&b""[..], b"I", b"IOR"] {
            let text = message(bytes);
            assert_eq!(
                text,
                std::format!(
                    "not an ACPI table: {} bytes, fewer than the 4-byte signature (the ACPI \
                     header alone is 36 bytes)",
                    bytes.len()
                )
            );
        }
    }

    /// Each table's name appears once at the front of its messages ("IORT: IORT: ..." before).
    #[test]
    fn table_errors_name_their_table_once() {
        assert_eq!(
            message(b"IORT\x30\0\0\0"),
            "malformed table: IORT: table truncated: need 36 bytes, have 8"
        );
        assert_eq!(
            message(b"DMAR\x30\0\0\0"),
            "malformed table: DMAR: table truncated: need 36 bytes, have 8"
        );
        // A structural IORT error: a 48-byte header claiming one node at offset 48 and no
        // room for it.
        let mut t = std::vec![0u8; 48];
        t[..4].copy_from_slice(b"IORT");
        t[4..8].copy_from_slice(&48u32.to_le_bytes());
        t[36..40].copy_from_slice(&1u32.to_le_bytes());
        t[40..44].copy_from_slice(&48u32.to_le_bytes());
        t[9] = 0u8.wrapping_sub(acpi::checksum(&t));
        let text = message(&t);
        assert!(text.starts_with("malformed table: IORT: "), "{text}");
        assert_eq!(text.matches("IORT").count(), 1, "{text}");
    }
}

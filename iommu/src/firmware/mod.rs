//! Firmware tables that describe IOMMUs: ACPI DMAR (VT-d), ACPI IORT (Arm SMMU), and the device
//! tree's `iommus` / `iommu-map` bindings. All parsers are zero-copy over `&[u8]`, bounds-checked
//! everywhere, and return typed errors.

pub mod acpi;
pub mod devicetree;
pub mod dmar;
pub mod iort;

/// Decodes any supported table (chosen by its signature) into a human-readable dump, the way
/// `cargo xtask decode-table` shows it. Malformed input is an error, never a panic.
pub fn dump_table(bytes: &[u8], out: &mut dyn core::fmt::Write) -> Result<(), DumpError> {
    let sig = acpi::Reader::new(bytes)
        .array::<4>(0)
        .map_err(|e| DumpError::Dmar(e.into()))?;
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
    UnknownSignature([u8; 4]),
    Dmar(dmar::DmarError),
    Iort(iort::IortError),
    Format,
}

impl core::fmt::Display for DumpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DumpError::UnknownSignature(s) => {
                write!(
                    f,
                    "not a DMAR or IORT table (signature {:?})",
                    acpi::Sig(*s)
                )
            }
            DumpError::Dmar(e) => write!(f, "malformed table: {e}"),
            DumpError::Iort(e) => write!(f, "malformed table: IORT: {e}"),
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
        assert!(matches!(dump_table(b"DM", &mut s), Err(DumpError::Dmar(_))));
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
}

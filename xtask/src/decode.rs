//! `cargo xtask decode-table`: the hypervisor's own DMAR/IORT parsers, on files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub fn decode_tables(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in files {
        match decode_file(path) {
            Ok(text) => {
                if files.len() > 1 {
                    println!("==> {} <==", path.display());
                }
                print!("{text}");
            }
            Err(message) => {
                eprintln!("{message}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The dump of one table file, or the line that reports why there is none (prefixed with the
/// file name).
fn decode_file(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut text = String::new();
    iommu::firmware::dump_table(&bytes, &mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `bytes` to a fresh file under the target directory's temp area and decodes it.
    fn decode_bytes(name: &str, bytes: &[u8]) -> (PathBuf, Result<String, String>) {
        let dir = std::env::temp_dir().join(format!("xtask-decode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let result = decode_file(&path);
        std::fs::remove_file(&path).unwrap();
        (path, result)
    }

    /// Seals an ACPI table: length at 4, checksum at 9 (ACPI 6.5 §5.2.6).
    fn seal(t: &mut [u8]) {
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[9] = 0;
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
    }

    /// An IORT (DEN 0049) with one named component, `\_SB_.LOOP`, whose single ID mapping has
    /// `output_reference` as its output reference.
    fn iort_with_named_component(output_reference: u32) -> Vec<u8> {
        let mut t = vec![0u8; 48];
        t[..4].copy_from_slice(b"IORT");
        t[36..40].copy_from_slice(&1u32.to_le_bytes()); // node count
        t[40..44].copy_from_slice(&48u32.to_le_bytes()); // node array offset
        // Node header: type 1 (named component), length 64, revision 4, identifier 0,
        // 1 mapping at +44.
        let mut node = vec![1u8, 64, 0, 4, 0, 0, 0, 0];
        node.extend(1u32.to_le_bytes());
        node.extend(44u32.to_le_bytes());
        node.extend([0; 12]); // flags, memory access properties
        node.push(0); // memory address size limit
        node.extend(b"\\_SB_.LOOP\0");
        node.resize(44, 0);
        // ID mapping: input base 0, count 0, output base 0, output reference, flags 0.
        for word in [0, 0, 0, output_reference, 0] {
            node.extend(u32::to_le_bytes(word));
        }
        assert_eq!(node.len(), 64);
        t.extend(node);
        seal(&mut t);
        t
    }

    #[test]
    fn files_too_short_for_a_signature_are_not_called_dmar() {
        for bytes in [&b""[..], b"I"] {
            let (path, result) = decode_bytes("short-iort.bin", bytes);
            let message = result.unwrap_err();
            assert_eq!(
                message,
                format!(
                    "{}: not an ACPI table: {} bytes, fewer than the 4-byte signature (the ACPI \
                     header alone is 36 bytes)",
                    path.display(),
                    bytes.len()
                )
            );
            assert!(!message.contains("DMAR"), "{message}");
        }
    }

    #[test]
    fn iort_errors_say_iort_once() {
        let (path, result) = decode_bytes("truncated-iort.bin", b"IORT\x30\0\0\0");
        assert_eq!(
            result.unwrap_err(),
            format!(
                "{}: malformed table: IORT: table truncated: need 36 bytes, have 8",
                path.display()
            )
        );
    }

    #[test]
    fn iort_mapping_loops_are_reported() {
        // The node maps to itself (its own offset, 48).
        let (path, result) = decode_bytes("loop-iort.bin", &iort_with_named_component(48));
        assert_eq!(
            result.unwrap_err(),
            format!(
                "{}: malformed table: IORT node at 0x30: ID mapping 0 references the node \
                 itself (a loop)",
                path.display()
            )
        );
    }

    #[test]
    fn dmar_zero_length_scope_says_why() {
        // DMAR header (48 bytes), then a 24-byte DRHD whose only scope has length 0.
        let mut t = vec![0u8; 48];
        t[..4].copy_from_slice(b"DMAR");
        t[36] = 38; // host address width field
        let mut drhd = vec![0u8, 0, 24, 0, 1, 0, 0, 0];
        drhd.extend(0xfed9_0000u64.to_le_bytes());
        drhd.extend([1, 0, 0, 0, 0, 0, 0, 0]); // scope type 1, length 0
        t.extend(drhd);
        seal(&mut t);
        let (path, result) = decode_bytes("zero-scope-dmar.bin", &t);
        assert_eq!(
            result.unwrap_err(),
            format!(
                "{}: malformed table: DMAR at 0x40: device scope length 0, but a scope is at \
                 least its 6-byte header (VT-d 4.1 §8.3.1)",
                path.display()
            )
        );
    }

    #[test]
    fn a_sound_iort_still_decodes() {
        // The named component's mapping retargeted from itself to an ITS group.
        let mut t = iort_with_named_component(0);
        // Append an ITS group node (type 0, length 24, one ITS with identifier 0) at 112,
        // make it the mapping's target and count it.
        let its = [
            0u8, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
        ];
        t.extend(its);
        t[36..40].copy_from_slice(&2u32.to_le_bytes());
        // Output reference of the mapping: node at 48, mapping at +44, reference at +12.
        t[48 + 44 + 12..48 + 44 + 16].copy_from_slice(&112u32.to_le_bytes());
        seal(&mut t);
        let (_, result) = decode_bytes("sound-iort.bin", &t);
        let text = result.unwrap();
        assert!(text.contains("\\_SB_.LOOP"), "{text}");
    }
}

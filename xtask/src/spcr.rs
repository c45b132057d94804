//! Builds a Serial Port Console Redirection table (SPCR) for QEMU's `-acpitable file=...`, so a
//! scenario can give a machine the console description real servers have (QEMU builds no SPCR on
//! q35). Scenario arguments name one as `{spcr:KIND:ADDRESS}`, e.g. `{spcr:io:0x2f8}`.
//!
//! Layout (Microsoft "Serial Port Console Redirection Table", revision 2; offsets in bytes):
//!
//! ```text
//! +0  "SPCR"  +4 u32 length (80)  +8 revision 2  +9 checksum (whole table sums to 0)
//! +10 OEM id[6]  +16 OEM table id[8]  +24 OEM revision  +28 creator id  +32 creator revision
//! +36 interface type (DBG2 Table 3: 0 = 16550, 3 = PL011, 0x0e = SBSA generic)  +37 reserved[3]
//! +40 base address, ACPI Generic Address Structure: space (0 memory, 1 I/O), bit width,
//!     bit offset, access size (1 byte .. 4 qword), u64 address
//! +52 interrupt type  +53 IRQ  +54 u32 GSIV  +58 baud (7 = 115200)  +59 parity  +60 stop bits
//! +61 flow control  +62 terminal type  +63 reserved  +64 u16 PCI device id (0xffff: not PCI)
//! +66 u16 PCI vendor id (0xffff)  +68 bus  +69 device  +70 function  +71 u32 PCI flags
//! +75 PCI segment  +76 u32 reserved
//! ```

use crate::util::Result;

pub const SPCR_LEN: usize = 80;

/// The SPCR for `uart`, written `KIND:ADDRESS` with KIND one of `io` (16550 at an I/O port),
/// `mmio` (16550, byte registers), `mmio32` (16550, 32-bit registers), `pl011`, `sbsa`.
pub fn build(uart: &str) -> Result<Vec<u8>> {
    let (kind, addr) = uart
        .split_once(':')
        .ok_or_else(|| format!("SPCR UART {uart:?}: expected KIND:ADDRESS"))?;
    let addr = match addr.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => addr.parse(),
    }
    .map_err(|e| format!("SPCR UART {uart:?}: {e}"))?;
    // (interface type, GAS space, register bit width, access size)
    let (interface, space, width, access) = match kind {
        "io" => (0x00, 1, 8, 1),
        "mmio" => (0x00, 0, 8, 1),
        "mmio32" => (0x12, 0, 32, 3),
        "pl011" => (0x03, 0, 32, 3),
        "sbsa" => (0x0e, 0, 32, 3),
        _ => return Err(format!("SPCR UART {uart:?}: unknown kind {kind:?}")),
    };
    let mut t = vec![0u8; SPCR_LEN];
    t[0..4].copy_from_slice(b"SPCR");
    t[4..8].copy_from_slice(&(SPCR_LEN as u32).to_le_bytes());
    t[8] = 2;
    t[10..16].copy_from_slice(b"HVTEST");
    t[16..24].copy_from_slice(b"SPCRTEST");
    t[24..28].copy_from_slice(&1u32.to_le_bytes());
    t[28..32].copy_from_slice(b"XTSK");
    t[32..36].copy_from_slice(&1u32.to_le_bytes());
    t[36] = interface;
    t[40] = space;
    t[41] = width;
    t[42] = 0;
    t[43] = access;
    t[44..52].copy_from_slice(&addr.to_le_bytes());
    t[58] = 7; // 115200 baud
    t[64..66].copy_from_slice(&0xffffu16.to_le_bytes());
    t[66..68].copy_from_slice(&0xffffu16.to_le_bytes());
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    Ok(t)
}

/// Replaces every `{spcr:KIND:ADDRESS}` in `arg` with the path of a file holding that SPCR
/// (written under `dir`).
pub fn expand(arg: &str, dir: &std::path::Path) -> Result<String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("{spcr:") {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unterminated {{spcr:...}} in {arg:?}"))?
            + start;
        let uart = &rest[start + "{spcr:".len()..end];
        let table = build(uart)?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join(format!("spcr-{}.bin", uart.replace(':', "-")));
        std::fs::write(&file, &table).map_err(|e| format!("{}: {e}", file.display()))?;
        out.push_str(&rest[..start]);
        out.push_str(&file.to_string_lossy());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn com2_matches_the_spec_example() {
        let t = build("io:0x2f8").unwrap();
        assert_eq!(t.len(), SPCR_LEN);
        assert_eq!(&t[0..4], b"SPCR");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 80);
        assert_eq!(t.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(t[36], 0, "full 16550 interface");
        // The SPCR document spells COM2's GAS as 01 08 00 00 F8 02 00 00 00 00 00 00 in memory,
        // with access size 0 (legacy); 1 (byte) is the explicit equivalent.
        assert_eq!(&t[40..52], &[1, 8, 0, 1, 0xf8, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t[58], 7, "115200 baud");
    }

    #[test]
    fn memory_mapped_kinds_and_errors() {
        let t = build("mmio32:0xfe030000").unwrap();
        assert_eq!((t[36], t[40], t[41], t[43]), (0x12, 0, 32, 3));
        assert_eq!(&t[44..52], &0xfe03_0000u64.to_le_bytes());
        assert_eq!(build("pl011:0x9000000").unwrap()[36], 3);
        assert!(build("usb:0x1").is_err());
        assert!(build("io").is_err());
        assert!(build("io:0xzz").is_err());
    }

    #[test]
    fn expands_placeholders_to_files() {
        let dir = std::env::temp_dir().join(format!("xtask-spcr-test-{}", std::process::id()));
        let arg = expand("file={spcr:io:0x2f8}", &dir).unwrap();
        let path = arg.strip_prefix("file=").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), build("io:0x2f8").unwrap());
        assert_eq!(expand("plain", &dir).unwrap(), "plain");
        assert!(expand("{spcr:io:0x2f8", &dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

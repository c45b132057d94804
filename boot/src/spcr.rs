//! The console UART of the firmware: the Serial Port Console Redirection table (SPCR, Microsoft
//! "Serial Port Console Redirection Table" rev. 2+, listed in ACPI 6.5 §5.2.6), found through the
//! RSDP and XSDT (ACPI 6.5 §5.2.5-5.2.8). Used on aarch64 under UEFI (ACPI-only machines) and on
//! x86_64 (servers put the serial console on COM2 or on MMIO UARTs). Safe code over [`PhysMem`];
//! host-tested.
//!
//! ```text
//! RSDP  +0 "RSD PTR "  +15 revision  +16 u32 RsdtAddress  +24 u64 XsdtAddress (revision >= 2)
//! SDT   +0 signature   +4 u32 length  ... 36-byte header, then entries (u64 XSDT / u32 RSDT)
//! SPCR  +36 u8 interface type  +40 Generic Address Structure (ACPI 6.5 §5.2.3.2): u8 space id
//!       (0 = system memory, 1 = system I/O), u8 register bit width, u8 bit offset, u8 access
//!       size (1 byte .. 4 qword), u64 address; the address is 0 when redirection is disabled
//! ```

use crate::aarch64::dtb::{Uart, UartKind};
use crate::console::ConsoleUart;
use crate::x86_64::{PhysMem, RSDP_V2_LEN, rsdp_revision};

/// Bounds on what firmware may claim: an XSDT lists tens of tables, an SPCR is 80-90 bytes.
const MAX_SDT_ENTRIES: usize = 256;
const SDT_HEADER_LEN: usize = 36;
const SPCR_MIN_LEN: usize = 52;

/// Interface types (SPCR rev. 1: 0 = full 16550, 1 = 16450; rev. 2+: the serial port subtypes
/// of Microsoft "Debug Port Table 2", Table 3, where 0 and 1 keep those meanings).
const IF_16550: u8 = 0x00;
const IF_16450: u8 = 0x01;
const IF_PL011: u8 = 0x03;
const IF_SBSA_32BIT: u8 = 0x0d;
const IF_SBSA_GENERIC: u8 = 0x0e;
/// "16550-compatible with parameters defined in Generic Address Structure": register width from
/// the GAS (32-bit registers 4 bytes apart on most SoC UARTs).
const IF_16550_GAS: u8 = 0x12;

/// GAS address space ids (ACPI 6.5 Table 5.1).
const SPACE_MEMORY: u8 = 0;
const SPACE_IO: u8 = 1;

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Reads a whole system description table at `pa` (header length, bounded by `max`).
fn table(mem: &impl PhysMem, pa: u64, max: usize) -> Option<&[u8]> {
    let len = u32_at(mem.read(pa, SDT_HEADER_LEN), 4)? as usize;
    if !(SDT_HEADER_LEN..=max).contains(&len) {
        return None;
    }
    let bytes = mem.read(pa, len);
    (bytes.len() == len && bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0).then_some(bytes)
}

/// The UART SPCR names, or why there is none usable.
pub fn spcr_uart(rsdp: u64, mem: &impl PhysMem) -> Result<ConsoleUart, &'static str> {
    let r = mem.read(rsdp, RSDP_V2_LEN);
    let revision = rsdp_revision(r).ok_or("no valid RSDP")?;
    let (root, wide) = match (revision >= 2).then(|| u64_at(r, 24)).flatten() {
        Some(x) if x != 0 => (x, true),
        _ => (u64::from(u32_at(r, 16).ok_or("no valid RSDP")?), false),
    };
    let entry_len = if wide { 8 } else { 4 };
    let root = table(mem, root, SDT_HEADER_LEN + MAX_SDT_ENTRIES * entry_len)
        .ok_or("XSDT/RSDT unreadable or bad checksum")?;
    let spcr = root[SDT_HEADER_LEN..]
        .chunks_exact(entry_len)
        .filter_map(|e| {
            if wide {
                u64_at(e, 0)
            } else {
                u32_at(e, 0).map(u64::from)
            }
        })
        .find(|&pa| mem.read(pa, 4) == b"SPCR")
        .ok_or("no SPCR table")?;
    let spcr = table(mem, spcr, 4096).ok_or("SPCR unreadable or bad checksum")?;
    if spcr.len() < SPCR_MIN_LEN {
        return Err("SPCR too short");
    }
    let (space, bit_width, access_size) = (spcr[40], spcr[41], spcr[43]);
    let base = u64_at(spcr, 44).ok_or("SPCR too short")?;
    if base == 0 {
        return Err("SPCR console redirection disabled (base address 0)");
    }
    let memory = |base: u64| match space {
        SPACE_MEMORY => Ok(base),
        _ => Err("SPCR UART is not in system memory space"),
    };
    match spcr[36] {
        IF_PL011 => Ok(ConsoleUart::Pl011 {
            base: memory(base)?,
        }),
        IF_SBSA_GENERIC | IF_SBSA_32BIT => Ok(ConsoleUart::SbsaGeneric {
            base: memory(base)?,
        }),
        IF_16550 | IF_16450 | IF_16550_GAS => match space {
            SPACE_IO => match u16::try_from(base) {
                Ok(port) if port <= 0xfff8 => Ok(ConsoleUart::Io16550 { port }),
                _ => Err("SPCR I/O port base out of range"),
            },
            SPACE_MEMORY => {
                // 32-bit registers when the GAS says so (bit width 32 or dword access); the
                // classic layout is one byte per register.
                let stride = if bit_width == 32 || access_size == 3 {
                    4
                } else {
                    1
                };
                if !base.is_multiple_of(u64::from(stride)) {
                    return Err("SPCR UART base not aligned to its register width");
                }
                Ok(ConsoleUart::Mmio16550 { base, stride })
            }
            _ => Err("SPCR UART is in neither memory nor I/O space"),
        },
        _ => Err("SPCR interface type is not a 16550, PL011 or SBSA UART"),
    }
}

/// The PL011/SBSA UART SPCR names (aarch64), or why there is none usable.
pub fn console_from_spcr(rsdp: u64, mem: &impl PhysMem) -> Result<Uart, &'static str> {
    let (base, kind) = match spcr_uart(rsdp, mem)? {
        ConsoleUart::Pl011 { base } => (base, UartKind::Pl011),
        ConsoleUart::SbsaGeneric { base } => (base, UartKind::SbsaGeneric),
        _ => return Err("SPCR interface type is not a PL011 or SBSA UART"),
    };
    Ok(Uart {
        base,
        size: 0x1000,
        kind,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    struct Mem(Vec<(u64, Vec<u8>)>);

    impl PhysMem for Mem {
        fn read(&self, pa: u64, max_len: usize) -> &[u8] {
            for (base, bytes) in &self.0 {
                if pa >= *base && pa - base < bytes.len() as u64 {
                    let off = (pa - base) as usize;
                    return &bytes[off..bytes.len().min(off + max_len)];
                }
            }
            &[]
        }
    }

    fn sdt(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = std::vec![0u8; SDT_HEADER_LEN];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    /// SPCR revision 2 as QEMU virt builds it: PL011 (3) at 0x0900_0000, GAS in memory space.
    fn spcr(interface: u8, space: u8, base: u64) -> Vec<u8> {
        spcr_gas(interface, space, 32, 3, base)
    }

    /// The GAS bytes as the SPCR page's COM2 example spells them: space 1, width 8, offset 0,
    /// access 0 (undefined / legacy), address 0x2f8.
    fn spcr_gas(interface: u8, space: u8, width: u8, access: u8, base: u64) -> Vec<u8> {
        let mut body = std::vec![0u8; 80 - SDT_HEADER_LEN];
        body[0] = interface;
        body[4] = space; // +40
        body[5] = width; // +41 register bit width
        body[7] = access; // +43 access size
        body[8..16].copy_from_slice(&base.to_le_bytes()); // +44
        sdt(b"SPCR", &body)
    }

    fn rsdp_v2(xsdt: u64) -> Vec<u8> {
        let mut r = std::vec![0u8; 36];
        r[..8].copy_from_slice(b"RSD PTR ");
        r[15] = 2;
        r[20..24].copy_from_slice(&36u32.to_le_bytes());
        r[24..32].copy_from_slice(&xsdt.to_le_bytes());
        let sum = r[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        r[8] = 0u8.wrapping_sub(sum);
        let sum = r.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        r[32] = 0u8.wrapping_sub(sum);
        r
    }

    fn machine(spcr_table: Vec<u8>) -> Mem {
        let xsdt = sdt(
            b"XSDT",
            &[0x5000_1000u64.to_le_bytes(), 0x5000_2000u64.to_le_bytes()].concat(),
        );
        Mem(std::vec![
            (0x5000_0000, rsdp_v2(0x5000_0100)),
            (0x5000_0100, xsdt),
            (0x5000_1000, sdt(b"APIC", &[0; 8])),
            (0x5000_2000, spcr_table),
        ])
    }

    #[test]
    fn finds_the_pl011_and_sbsa_uart() {
        let uart = console_from_spcr(0x5000_0000, &machine(spcr(3, 0, 0x0900_0000))).unwrap();
        assert_eq!((uart.base, uart.kind), (0x0900_0000, UartKind::Pl011));
        let uart = console_from_spcr(0x5000_0000, &machine(spcr(0x0e, 0, 0x1c09_0000))).unwrap();
        assert_eq!((uart.base, uart.kind), (0x1c09_0000, UartKind::SbsaGeneric));
    }

    #[test]
    fn refuses_what_it_cannot_drive_or_trust() {
        let run = |t| console_from_spcr(0x5000_0000, &machine(t));
        assert_eq!(
            run(spcr(0, 0, 0x3f8)).unwrap_err(),
            "SPCR interface type is not a PL011 or SBSA UART"
        );
        assert_eq!(
            run(spcr(3, 1, 0x3f8)).unwrap_err(),
            "SPCR UART is not in system memory space"
        );
        let mut bad = spcr(3, 0, 0x0900_0000);
        bad[50] ^= 1;
        assert_eq!(run(bad).unwrap_err(), "SPCR unreadable or bad checksum");
        assert_eq!(run(sdt(b"SPCR", &[3])).unwrap_err(), "SPCR too short");
        assert_eq!(run(sdt(b"XXXX", &[0; 44])).unwrap_err(), "no SPCR table");
        assert_eq!(
            console_from_spcr(0x1234, &machine(spcr(3, 0, 1))).unwrap_err(),
            "no valid RSDP"
        );
    }

    #[test]
    fn finds_16550s_in_io_and_memory_space() {
        let run = |t| spcr_uart(0x5000_0000, &machine(t));
        // COM2 exactly as the SPCR document's example encodes it: 01 08 00 00 F8 02 00 ...
        let com2 = spcr_gas(0, 1, 8, 0, 0x2f8);
        assert_eq!(&com2[40..52], &[1, 8, 0, 0, 0xf8, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(run(com2), Ok(ConsoleUart::Io16550 { port: 0x2f8 }));
        assert_eq!(
            run(spcr_gas(1, 1, 8, 1, 0x3f8)),
            Ok(ConsoleUart::Io16550 { port: 0x3f8 })
        );
        // A byte-register MMIO 16550 and a 32-bit-register one (type 0x12, GAS dword).
        assert_eq!(
            run(spcr_gas(0, 0, 8, 1, 0xfedc_9000)),
            Ok(ConsoleUart::Mmio16550 {
                base: 0xfedc_9000,
                stride: 1
            })
        );
        assert_eq!(
            run(spcr_gas(0x12, 0, 32, 3, 0xfe03_0000)),
            Ok(ConsoleUart::Mmio16550 {
                base: 0xfe03_0000,
                stride: 4
            })
        );
    }

    #[test]
    fn refuses_16550s_it_cannot_address() {
        let run = |t| spcr_uart(0x5000_0000, &machine(t));
        assert_eq!(
            run(spcr_gas(0, 1, 8, 0, 0x1_0000)),
            Err("SPCR I/O port base out of range")
        );
        assert_eq!(
            run(spcr_gas(0x12, 0, 32, 3, 0xfe03_0002)),
            Err("SPCR UART base not aligned to its register width")
        );
        assert_eq!(
            run(spcr_gas(0, 2, 8, 1, 0xcf8)),
            Err("SPCR UART is in neither memory nor I/O space")
        );
        assert_eq!(
            run(spcr_gas(0, 1, 8, 0, 0)),
            Err("SPCR console redirection disabled (base address 0)")
        );
        assert_eq!(
            run(spcr_gas(0x10, 0, 32, 3, 0xfe20_1000)),
            Err("SPCR interface type is not a 16550, PL011 or SBSA UART")
        );
    }
}

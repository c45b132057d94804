//! The Microsoft Debug Port Table 2 (DBG2, listed in ACPI 6.5 §5.2.6): the debug ports firmware
//! sets aside, typically a second UART. Listed in the boot report so an operator sees which port
//! must stay unused (the hypervisor does not drive it).
//!
//! ```text
//! DBG2   +36 u32 offset of the first device information structure  +40 u32 number of them
//! device +0 revision  +1 u16 length  +3 u8 number of GAS registers  +4 u16 namespace length
//!        +6 u16 namespace offset  +8 u16 OEM data length  +10 u16 OEM data offset
//!        +12 u16 port type (0x8000 serial, 0x8001 1394, 0x8002 USB, 0x8003 net)
//!        +14 u16 port subtype (serial: DBG2 Table 3, as SPCR's interface type)
//!        +16 reserved  +18 u16 offset of the GAS array  +20 u16 offset of the sizes array
//!        (offsets relative to the device structure); GAS: u8 space, width, offset, access, u64
//! ```

use super::acpi::{Reader, TableError, validate_table};
use alloc::vec::Vec;

/// More ports than any machine has; bounds what a hostile table can make us collect.
const MAX_PORTS: usize = 64;
const DEVICE_MIN_LEN: usize = 22;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugPort {
    pub port_type: u16,
    pub subtype: u16,
    /// The first register block: (GAS space id, address); `None` without one.
    pub base: Option<(u8, u64)>,
}

impl DebugPort {
    pub fn type_name(&self) -> &'static str {
        match self.port_type {
            0x8000 => "serial",
            0x8001 => "1394",
            0x8002 => "usb",
            0x8003 => "net",
            _ => "unknown",
        }
    }
}

pub fn parse(bytes: &[u8]) -> Result<Vec<DebugPort>, TableError> {
    let (_, table) = validate_table(bytes, b"DBG2")?;
    let r = Reader::new(table);
    let mut off = r.u32(36)? as usize;
    let count = r.u32(40)? as usize;
    if count > MAX_PORTS {
        return Err(TableError::Structure {
            offset: 40,
            what: "DBG2 lists more than 64 debug devices",
        });
    }
    let mut ports = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(r.u16(off + 1)?);
        if len < DEVICE_MIN_LEN || off.saturating_add(len) > table.len() {
            return Err(TableError::Structure {
                offset: off,
                what: "DBG2 device structure length runs past the table or is too short",
            });
        }
        let dev = Reader::new(&table[off..off + len]);
        let gas_count = dev.u8(3)?;
        let gas_off = usize::from(dev.u16(18)?);
        let base = if gas_count == 0 {
            None
        } else {
            Some((dev.u8(gas_off)?, dev.u64(gas_off + 4)?))
        };
        ports.push(DebugPort {
            port_type: dev.u16(12)?,
            subtype: dev.u16(14)?,
            base,
        });
        off += len;
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::madt::tests_support::table;
    use std::vec;

    /// One serial port as QEMU virt's DBG2 describes its PL011: subtype 3, one GAS at +22,
    /// a size array after it and the namespace string "." after that.
    fn pl011_device() -> Vec<u8> {
        let mut d = vec![0u8; 22 + 12 + 4 + 2];
        let len = d.len() as u16;
        d[1..3].copy_from_slice(&len.to_le_bytes());
        d[3] = 1;
        d[4..6].copy_from_slice(&2u16.to_le_bytes());
        d[6..8].copy_from_slice(&38u16.to_le_bytes());
        d[12..14].copy_from_slice(&0x8000u16.to_le_bytes());
        d[14..16].copy_from_slice(&3u16.to_le_bytes());
        d[18..20].copy_from_slice(&22u16.to_le_bytes());
        d[20..22].copy_from_slice(&34u16.to_le_bytes());
        d[22] = 0; // memory space
        d[23] = 32;
        d[25] = 3;
        d[26..34].copy_from_slice(&0x0900_0000u64.to_le_bytes());
        d[34..38].copy_from_slice(&0x1000u32.to_le_bytes());
        d[38] = b'.';
        d
    }

    fn dbg2(devices: &[Vec<u8>], count: u32) -> Vec<u8> {
        let mut body = vec![0u8; 8];
        body[0..4].copy_from_slice(&44u32.to_le_bytes());
        body[4..8].copy_from_slice(&count.to_le_bytes());
        for d in devices {
            body.extend(d);
        }
        table(b"DBG2", &body)
    }

    #[test]
    fn lists_the_serial_port() {
        let ports = parse(&dbg2(&[pl011_device()], 1)).unwrap();
        assert_eq!(
            ports,
            [DebugPort {
                port_type: 0x8000,
                subtype: 3,
                base: Some((0, 0x0900_0000))
            }]
        );
        assert_eq!(ports[0].type_name(), "serial");
    }

    #[test]
    fn refuses_counts_and_lengths_past_the_table() {
        assert!(matches!(
            parse(&dbg2(&[pl011_device()], 2)),
            Err(TableError::Truncated { .. } | TableError::Structure { .. })
        ));
        assert!(matches!(
            parse(&dbg2(&[], 1000)),
            Err(TableError::Structure { offset: 40, .. })
        ));
        let mut d = pl011_device();
        d[18..20].copy_from_slice(&200u16.to_le_bytes()); // GAS offset outside the device
        assert!(parse(&dbg2(&[d], 1)).is_err());
    }
}

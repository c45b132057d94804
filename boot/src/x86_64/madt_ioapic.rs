//! The I/O APICs the ACPI MADT lists (ACPI 6.5 §5.2.12.3, "I/O APIC Structure": type 1,
//! length 12, +2 u8 I/O APIC ID, +4 u32 register base address, +8 u32 global system interrupt
//! base). The hypervisor masks every redirection entry of each at boot: it takes no legacy
//! interrupt, and a pin left unmasked by firmware would inject one.

const MADT_ENTRIES: usize = 36 + 8;
const TYPE_IO_APIC: u8 = 1;

/// One I/O APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

/// The MADT's I/O APICs, in table order, at most `N`; `dropped` counts the rest. Refuses a
/// table whose signature, length, checksum or structure lengths are wrong.
pub fn io_apics<const N: usize>(
    table: &[u8],
) -> Result<([Option<IoApic>; N], usize), &'static str> {
    if table.len() < MADT_ENTRIES || &table[..4] != b"APIC" {
        return Err("not an MADT (signature or length)");
    }
    let len = u32::from_le_bytes([table[4], table[5], table[6], table[7]]) as usize;
    if len < MADT_ENTRIES || len > table.len() {
        return Err("MADT length field out of range");
    }
    let table = &table[..len];
    if table.iter().fold(0u8, |a, &b| a.wrapping_add(b)) != 0 {
        return Err("MADT checksum mismatch");
    }
    let mut out = [None; N];
    let (mut n, mut dropped) = (0, 0);
    let mut off = MADT_ENTRIES;
    while off < table.len() {
        let (Some(&ty), Some(&entry_len)) = (table.get(off), table.get(off + 1)) else {
            return Err("MADT structure header runs past the table");
        };
        let entry_len = usize::from(entry_len);
        if entry_len < 2 || off + entry_len > table.len() {
            return Err("MADT structure length below 2 or past the table");
        }
        let e = &table[off..off + entry_len];
        if ty == TYPE_IO_APIC {
            if entry_len < 12 {
                return Err("I/O APIC structure shorter than 12 bytes");
            }
            let apic = IoApic {
                id: e[2],
                address: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                gsi_base: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            };
            if n < N {
                out[n] = Some(apic);
                n += 1;
            } else {
                dropped += 1;
            }
        }
        off += entry_len;
    }
    Ok((out, dropped))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::vec::Vec;

    fn madt(entries: &[&[u8]]) -> Vec<u8> {
        let mut t = Vec::from(*b"APIC");
        t.extend_from_slice(&[0; 32]);
        t.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        for e in entries {
            t.extend_from_slice(e);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    #[test]
    fn two_io_apics_between_other_structures() {
        let t = madt(&[
            &[0, 8, 0, 0, 1, 0, 0, 0],
            &[1, 12, 0, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0],
            &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0],
            &[1, 12, 9, 0, 0x00, 0x10, 0xc0, 0xfe, 24, 0, 0, 0],
        ]);
        let (a, dropped) = io_apics::<4>(&t).unwrap();
        assert_eq!(
            a[0],
            Some(IoApic {
                id: 0,
                address: 0xfec0_0000,
                gsi_base: 0
            })
        );
        assert_eq!(
            a[1],
            Some(IoApic {
                id: 9,
                address: 0xfec0_1000,
                gsi_base: 24
            })
        );
        assert_eq!((a[2], dropped), (None, 0));
        let (_, dropped) = io_apics::<1>(&t).unwrap();
        assert_eq!(dropped, 1);
    }

    #[test]
    fn malformed_tables_are_refused() {
        let mut t = madt(&[&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]]);
        assert!(io_apics::<2>(&t[..40]).is_err());
        let short = madt(&[&[1, 8, 0, 0, 0, 0, 0xc0, 0xfe]]);
        assert!(io_apics::<2>(&short).is_err());
        t[50] ^= 1;
        assert_eq!(io_apics::<2>(&t), Err("MADT checksum mismatch"));
    }
}

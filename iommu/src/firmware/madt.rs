//! The ACPI Multiple APIC Description Table (MADT, signature "APIC"; ACPI 6.5 §5.2.12) as an
//! Arm server describes its GICv3: the distributor (GICD), redistributor discovery ranges (GICR),
//! ITSes and one GIC CPU interface (GICC) entry per CPU.
//!
//! ```text
//! MADT  +36 u32 local interrupt controller address  +40 u32 flags  +44 entries: u8 type, u8 length
//! GICC  type 0x0b, length 80 (ACPI 6.0-6.4) or 82 (6.5): +4 u32 CPU interface number
//!       +8 u32 ACPI processor UID  +12 u32 flags (bit 0 enabled, bit 3 online capable)
//!       +60 u64 GICR base (when the redistributors are not in a GICR range)  +68 u64 MPIDR
//! GICD  type 0x0c, length 24: +8 u64 physical base  +20 u8 GIC version (0 = probe, 3 = GICv3)
//! GICR  type 0x0e, length 16: +4 u64 discovery range base  +12 u32 range length
//! ITS   type 0x0f, length 20: +4 u32 ITS id  +8 u64 physical base
//! ```
//!
//! Other entry types (x86 local APICs, IOAPICs, MSI frames, ...) are skipped by their length.

use super::acpi::{Reader, SDT_HEADER_LEN, TableError, validate_table};
use alloc::vec::Vec;

const MADT_ENTRIES: usize = SDT_HEADER_LEN + 8;
const TYPE_GICC: u8 = 0x0b;
const TYPE_GICD: u8 = 0x0c;
const TYPE_GICR: u8 = 0x0e;
const TYPE_ITS: u8 = 0x0f;
/// GICC flags bit 0: the CPU is usable now.
const GICC_ENABLED: u32 = 1 << 0;
/// More CPUs than any server has; bounds the vector a hostile table can make us allocate.
const MAX_CPUS: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gicc {
    pub uid: u32,
    pub mpidr: u64,
    pub gicr_base: u64,
    pub enabled: bool,
}

/// What the MADT says about the GIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Madt {
    /// GICD base and version (0: firmware says "probe the ID registers").
    pub gicd: Option<(u64, u8)>,
    /// Redistributor discovery ranges: (base, length).
    pub gicr_ranges: Vec<(u64, u32)>,
    pub its: Vec<u64>,
    pub cpus: Vec<Gicc>,
}

impl Madt {
    pub fn parse(bytes: &[u8]) -> Result<Madt, TableError> {
        let (_, table) = validate_table(bytes, b"APIC")?;
        let r = Reader::new(table);
        let mut madt = Madt::default();
        let mut off = MADT_ENTRIES;
        while off < table.len() {
            let (ty, len) = (r.u8(off)?, usize::from(r.u8(off + 1)?));
            if len < 2 || off + len > table.len() {
                return Err(TableError::Structure {
                    offset: off,
                    what: "MADT entry length runs past the table or is below 2",
                });
            }
            let short = |min: usize, what| {
                if len < min {
                    Err(TableError::Structure { offset: off, what })
                } else {
                    Ok(())
                }
            };
            match ty {
                TYPE_GICC => {
                    short(76, "GICC entry shorter than 76 bytes")?;
                    if madt.cpus.len() >= MAX_CPUS {
                        return Err(TableError::Structure {
                            offset: off,
                            what: "more than 4096 GICC entries",
                        });
                    }
                    madt.cpus.push(Gicc {
                        uid: r.u32(off + 8)?,
                        enabled: r.u32(off + 12)? & GICC_ENABLED != 0,
                        gicr_base: r.u64(off + 60)?,
                        mpidr: r.u64(off + 68)?,
                    });
                }
                TYPE_GICD => {
                    short(24, "GICD entry shorter than 24 bytes")?;
                    if madt.gicd.is_some() {
                        // ACPI 6.5 §5.2.12.15: exactly one distributor.
                        return Err(TableError::Structure {
                            offset: off,
                            what: "second GICD entry",
                        });
                    }
                    madt.gicd = Some((r.u64(off + 8)?, r.u8(off + 20)?));
                }
                TYPE_GICR => {
                    short(16, "GICR entry shorter than 16 bytes")?;
                    if madt.gicr_ranges.len() < MAX_CPUS {
                        madt.gicr_ranges.push((r.u64(off + 4)?, r.u32(off + 12)?));
                    }
                }
                TYPE_ITS => {
                    short(16, "ITS entry shorter than 16 bytes")?;
                    if madt.its.len() < MAX_CPUS {
                        madt.its.push(r.u64(off + 8)?);
                    }
                }
                _ => {}
            }
            off += len;
        }
        Ok(madt)
    }

    /// CPUs firmware marked enabled.
    pub fn enabled_cpus(&self) -> usize {
        self.cpus.iter().filter(|c| c.enabled).count()
    }
}

/// Hand-built tables for the MADT, GTDT and DBG2 tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::SDT_HEADER_LEN;
    use alloc::vec::Vec;

    /// A table with signature `sig`, a valid length and checksum, and `body` after the header.
    pub fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = alloc::vec![0u8; SDT_HEADER_LEN];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = super::super::acpi::checksum(&t);
        t[9] = 0u8.wrapping_sub(sum);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::table;
    use super::*;
    use std::vec;

    fn gicc(uid: u32, enabled: bool, mpidr: u64) -> Vec<u8> {
        let mut e = vec![0u8; 80];
        e[0] = TYPE_GICC;
        e[1] = 80;
        e[8..12].copy_from_slice(&uid.to_le_bytes());
        e[12..16].copy_from_slice(&u32::from(enabled).to_le_bytes());
        e[68..76].copy_from_slice(&mpidr.to_le_bytes());
        e
    }

    /// QEMU virt's GICv3 layout (hw/arm/virt.c memmap): GICD 0x0800_0000, ITS 0x0808_0000,
    /// redistributors 0x080a_0000 (0xf6_0000 bytes).
    fn qemu_virt(cpus: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0u8; 8];
        let mut gicd = vec![0u8; 24];
        gicd[0] = TYPE_GICD;
        gicd[1] = 24;
        gicd[8..16].copy_from_slice(&0x0800_0000u64.to_le_bytes());
        gicd[20] = 3;
        body.extend(gicd);
        for c in cpus {
            body.extend(c);
        }
        let mut gicr = vec![0u8; 16];
        gicr[0] = TYPE_GICR;
        gicr[1] = 16;
        gicr[4..12].copy_from_slice(&0x080a_0000u64.to_le_bytes());
        gicr[12..16].copy_from_slice(&0xf6_0000u32.to_le_bytes());
        body.extend(gicr);
        let mut its = vec![0u8; 20];
        its[0] = TYPE_ITS;
        its[1] = 20;
        its[8..16].copy_from_slice(&0x0808_0000u64.to_le_bytes());
        body.extend(its);
        // An x86 local APIC entry (type 0, length 8) is skipped.
        body.extend([0, 8, 0, 0, 1, 0, 0, 0]);
        table(b"APIC", &body)
    }

    #[test]
    fn reads_the_gic_of_qemu_virt() {
        let m = Madt::parse(&qemu_virt(&[
            gicc(0, true, 0),
            gicc(1, true, 1),
            gicc(2, false, 2),
        ]))
        .unwrap();
        assert_eq!(m.gicd, Some((0x0800_0000, 3)));
        assert_eq!(m.gicr_ranges, [(0x080a_0000, 0xf6_0000)]);
        assert_eq!(m.its, [0x0808_0000]);
        assert_eq!(m.cpus.len(), 3);
        assert_eq!(m.enabled_cpus(), 2);
        assert_eq!(m.cpus[1].mpidr, 1);
    }

    #[test]
    fn refuses_malformed_entries() {
        let mut t = qemu_virt(&[gicc(0, true, 0)]);
        t[MADT_ENTRIES + 1] = 1; // GICD length 1
        let sum = super::super::acpi::checksum(&t);
        t[9] = t[9].wrapping_sub(sum);
        assert!(matches!(
            Madt::parse(&t),
            Err(TableError::Structure { offset: 44, .. })
        ));
        let mut short = gicc(0, true, 0);
        short[1] = 40;
        short.truncate(40);
        assert!(matches!(
            Madt::parse(&qemu_virt(&[short])),
            Err(TableError::Structure {
                what: "GICC entry shorter than 76 bytes",
                ..
            })
        ));
        let mut bad = qemu_virt(&[]);
        bad[20] ^= 1;
        assert!(matches!(
            Madt::parse(&bad),
            Err(TableError::BadChecksum { .. })
        ));
    }
}

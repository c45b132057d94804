//! The ACPI Generic Timer Description Table (GTDT; ACPI 6.5 §5.2.25): the interrupts (GSIVs) of
//! the Arm generic timers. The hypervisor preempts guests with the non-secure EL2 physical timer.
//!
//! ```text
//! +36 u64 CntControlBase  +44 reserved  +48 u32 secure EL1 timer GSIV  +52 flags
//! +56 u32 non-secure EL1 timer GSIV  +60 flags  +64 u32 virtual EL1 timer GSIV  +68 flags
//! +72 u32 EL2 (non-secure) timer GSIV  +76 flags  +80 u64 CntReadBase  +88 platform timer count
//! +92 platform timer offset  (revision 3+: +96 u32 virtual EL2 timer GSIV, +100 flags)
//! ```

use super::acpi::{Reader, TableError, validate_table};

/// GTDT length through the EL2 timer flags (+76..+80), the part the hypervisor reads.
const GTDT_MIN_LEN: usize = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gtdt {
    pub el1_phys_gsiv: u32,
    pub el1_virt_gsiv: u32,
    /// Non-secure EL2 physical timer interrupt (a PPI, 16-31, on GICv3).
    pub el2_phys_gsiv: u32,
    /// Non-secure EL2 virtual timer (VHE), revision 3+ and non-zero only.
    pub el2_virt_gsiv: Option<u32>,
}

impl Gtdt {
    pub fn parse(bytes: &[u8]) -> Result<Gtdt, TableError> {
        let (header, table) = validate_table(bytes, b"GTDT")?;
        if table.len() < GTDT_MIN_LEN {
            return Err(TableError::Truncated {
                needed: GTDT_MIN_LEN,
                available: table.len(),
            });
        }
        let r = Reader::new(table);
        let el2_virt = if header.revision >= 3 && table.len() >= 104 {
            Some(r.u32(96)?).filter(|&g| g != 0)
        } else {
            None
        };
        Ok(Gtdt {
            el1_phys_gsiv: r.u32(56)?,
            el1_virt_gsiv: r.u32(64)?,
            el2_phys_gsiv: r.u32(72)?,
            el2_virt_gsiv: el2_virt,
        })
    }

    /// Whether `gsiv` is a PPI (GICv3 §2.2.1: INTIDs 16-31), as a per-CPU timer must be.
    pub fn is_ppi(gsiv: u32) -> bool {
        (16..32).contains(&gsiv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::madt::tests_support::table;
    use std::vec;

    /// QEMU virt's timers (hw/arm/virt.h ARCH_TIMER_*_IRQ + 16): EL1 phys 30, virt 27, EL2 26.
    fn qemu_virt(revision: u8, len: usize) -> std::vec::Vec<u8> {
        let mut body = vec![0u8; len - 36];
        for (off, gsiv) in [(56, 30u32), (64, 27), (72, 26), (96, 28)] {
            if off + 4 <= len {
                body[off - 36..off - 32].copy_from_slice(&gsiv.to_le_bytes());
            }
        }
        let mut t = table(b"GTDT", &body);
        t[8] = revision;
        let sum = crate::firmware::acpi::checksum(&t);
        t[9] = t[9].wrapping_sub(sum);
        t
    }

    #[test]
    fn reads_the_timer_interrupts() {
        let g = Gtdt::parse(&qemu_virt(2, 96)).unwrap();
        assert_eq!(
            (
                g.el1_phys_gsiv,
                g.el1_virt_gsiv,
                g.el2_phys_gsiv,
                g.el2_virt_gsiv
            ),
            (30, 27, 26, None)
        );
        assert!(Gtdt::is_ppi(g.el2_phys_gsiv));
        assert_eq!(
            Gtdt::parse(&qemu_virt(3, 104)).unwrap().el2_virt_gsiv,
            Some(28)
        );
    }

    #[test]
    fn refuses_a_table_without_the_el2_timer() {
        assert_eq!(
            Gtdt::parse(&qemu_virt(2, 72)),
            Err(TableError::Truncated {
                needed: 80,
                available: 72
            })
        );
        assert!(!Gtdt::is_ppi(0) && !Gtdt::is_ppi(32));
    }
}

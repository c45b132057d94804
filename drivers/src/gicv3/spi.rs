//! Shared peripheral interrupts (SPIs, INTIDs 32-1019) at the distributor (IHI 0069 §12.9):
//! group, trigger, priority, routing and enable, one INTID at a time, with every read-modify-write
//! leaving the other INTIDs sharing the register untouched.
//!
//! The hypervisor's SPIs (the SMMUv3's wired event queue and GERROR interrupts) are Group 1
//! Non-secure, edge-triggered, routed to one CPU by affinity (GICD_IROUTER.Interrupt_Routing_Mode
//! = 0; "1 of N" routing is optional in the architecture and not relied on).

use iommu::hw::Mmio;

use super::GicError;

/// Distributor registers for SPIs (IHI 0069 §12.9). The banked-per-INTID arrays are indexed by
/// INTID: one bit (IGROUPR, ISENABLER, ...), two bits (ICFGR) or one byte (IPRIORITYR) each.
pub mod reg {
    pub const IGROUPR: usize = 0x0080;
    pub const ISENABLER: usize = 0x0100;
    pub const ICENABLER: usize = 0x0180;
    pub const ISPENDR: usize = 0x0200;
    pub const ICPENDR: usize = 0x0280;
    pub const ISACTIVER: usize = 0x0300;
    pub const IPRIORITYR: usize = 0x0400;
    pub const ICFGR: usize = 0x0c00;
    pub const IGRPMODR: usize = 0x0d00;
    /// GICD_IROUTER<n>: 64 bits per SPI, at 0x6000 + 8n (n = INTID; 0-31 are reserved).
    pub const IROUTER: usize = 0x6000;
    /// GICD_TYPER.ITLinesNumber, bits 4:0: the largest SPI INTID is 32 (N + 1) - 1.
    pub const TYPER_ITLINES_MASK: u32 = 0x1f;
}

/// How an SPI is signalled on its wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Level,
    Edge,
}

/// The largest SPI INTID this distributor implements (from GICD_TYPER), at most 1019.
pub fn max_spi(typer: u32) -> u32 {
    (32 * ((typer & reg::TYPER_ITLINES_MASK) + 1) - 1).min(1019)
}

fn check(typer: u32, intid: u32) -> Result<(), GicError> {
    if intid < 32 || intid > max_spi(typer) {
        return Err(GicError::NotSpi(intid));
    }
    Ok(())
}

fn bit(intid: u32) -> (usize, u32) {
    (4 * (intid as usize / 32), 1 << (intid % 32))
}

/// Affinity in GICD_IROUTER's layout (IHI 0069 §12.9): Aff3 at bits 39:32, Aff2.Aff1.Aff0
/// at bits 23:0, from the packed Aff3.Aff2.Aff1.Aff0 form GICR_TYPER uses.
pub fn irouter_value(affinity: u32) -> u64 {
    u64::from(affinity >> 24) << 32 | u64::from(affinity & 0x00ff_ffff)
}

/// Configures SPI `intid` (disabled while it is reprogrammed, stale pending state cleared) as
/// Group 1 Non-secure with the given trigger and priority, routed to the CPU with `affinity`,
/// then enables it. `typer` is GICD_TYPER (bounds the INTID).
pub fn configure(
    gicd: &impl Mmio,
    typer: u32,
    intid: u32,
    trigger: Trigger,
    priority: u8,
    affinity: u32,
) -> Result<(), GicError> {
    check(typer, intid)?;
    let (word, mask) = bit(intid);
    // Changing the configuration of an enabled interrupt is UNPREDICTABLE (§12.9 ICFGR), so
    // disable it first; ICENABLER is write-1-to-clear, other bits are unaffected.
    gicd.write32(reg::ICENABLER + word, mask);
    let group = gicd.read32(reg::IGROUPR + word);
    gicd.write32(reg::IGROUPR + word, group | mask);
    // IGRPMODR = 0 with IGROUPR = 1: Non-secure Group 1 (§12.9; RAZ/WI with DS = 1).
    let modr = gicd.read32(reg::IGRPMODR + word);
    gicd.write32(reg::IGRPMODR + word, modr & !mask);
    // GICD_ICFGR<n>: two bits per INTID, bit 1 of the pair = edge-triggered (§12.9).
    let cfg_word = reg::ICFGR + 4 * (intid as usize / 16);
    let shift = 2 * (intid % 16);
    let cfg = gicd.read32(cfg_word) & !(0b11 << shift);
    let edge = match trigger {
        Trigger::Edge => 0b10 << shift,
        Trigger::Level => 0,
    };
    gicd.write32(cfg_word, cfg | edge);
    let prio_word = reg::IPRIORITYR + (intid as usize & !3);
    let pshift = 8 * (intid % 4);
    let prio = gicd.read32(prio_word) & !(0xff << pshift);
    gicd.write32(prio_word, prio | u32::from(priority) << pshift);
    gicd.write64(reg::IROUTER + 8 * intid as usize, irouter_value(affinity));
    gicd.write32(reg::ICPENDR + word, mask);
    gicd.write32(reg::ISENABLER + word, mask);
    Ok(())
}

/// Disables SPI `intid` at the distributor.
pub fn disable(gicd: &impl Mmio, typer: u32, intid: u32) -> Result<(), GicError> {
    check(typer, intid)?;
    let (word, mask) = bit(intid);
    gicd.write32(reg::ICENABLER + word, mask);
    Ok(())
}

/// Whether SPI `intid` is pending at the distributor (GICD_ISPENDR reads the pending state).
pub fn is_pending(gicd: &impl Mmio, typer: u32, intid: u32) -> Result<bool, GicError> {
    check(typer, intid)?;
    let (word, mask) = bit(intid);
    Ok(gicd.read32(reg::ISPENDR + word) & mask != 0)
}

/// Clears the pending state of SPI `intid` (GICD_ICPENDR, write-1-to-clear): used when the
/// state was consumed by software other than the target CPU's acknowledge.
pub fn clear_pending(gicd: &impl Mmio, typer: u32, intid: u32) -> Result<(), GicError> {
    check(typer, intid)?;
    let (word, mask) = bit(intid);
    gicd.write32(reg::ICPENDR + word, mask);
    Ok(())
}

/// Whether SPI `intid` is enabled (GICD_ISENABLER reads the enable state).
pub fn is_enabled(gicd: &impl Mmio, typer: u32, intid: u32) -> Result<bool, GicError> {
    check(typer, intid)?;
    let (word, mask) = bit(intid);
    Ok(gicd.read32(reg::ISENABLER + word) & mask != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Distributor register file: ISENABLER/ICENABLER and ISPENDR/ICPENDR are the set/clear
    /// views of one enable and one pending state, as in IHI 0069 §12.9.
    #[derive(Default)]
    struct FakeGicd {
        regs: RefCell<BTreeMap<usize, u32>>,
    }

    impl FakeGicd {
        fn get(&self, off: usize) -> u32 {
            *self.regs.borrow().get(&off).unwrap_or(&0)
        }
    }

    impl Mmio for FakeGicd {
        fn read32(&self, off: usize) -> u32 {
            match off {
                0x180..=0x1fc => self.get(off - 0x80),
                0x280..=0x2fc => self.get(off - 0x80),
                _ => self.get(off),
            }
        }
        fn write32(&self, off: usize, v: u32) {
            let mut r = self.regs.borrow_mut();
            match off {
                0x100..=0x17c | 0x200..=0x27c => *r.entry(off).or_default() |= v,
                0x180..=0x1fc | 0x280..=0x2fc => *r.entry(off - 0x80).or_default() &= !v,
                _ => {
                    r.insert(off, v);
                }
            }
        }
        fn read64(&self, off: usize) -> u64 {
            u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32
        }
        fn write64(&self, off: usize, v: u64) {
            self.write32(off, v as u32);
            self.write32(off + 4, (v >> 32) as u32);
        }
    }

    /// QEMU virt: 288 interrupt lines, ITLinesNumber = 8.
    const TYPER: u32 = 8;

    #[test]
    fn smmu_eventq_spi_as_qemu_virt_wires_it() {
        let d = FakeGicd::default();
        // Neighbours already configured: INTID 107 level, priority 0x10, in group 1, enabled.
        d.write32(reg::ICFGR + 4 * 6, 0b01 << 22);
        d.write32(reg::IPRIORITYR + 104, 0x10 << 24);
        d.write32(reg::IGROUPR + 12, 1 << 11);
        d.write32(reg::ISENABLER + 12, 1 << 11);
        d.write32(reg::ISPENDR + 12, 1 << 10); // stale pending state of 106
        configure(&d, TYPER, 106, Trigger::Edge, 0x40, 0x0100_0203).unwrap();
        // INTID 106: word 3 (96-127), bit 10.
        assert_eq!(d.read32(reg::IGROUPR + 12), 1 << 10 | 1 << 11);
        assert_eq!(d.read32(reg::ISENABLER + 12), 1 << 10 | 1 << 11);
        assert_eq!(d.read32(reg::ISPENDR + 12), 0);
        // ICFGR6 covers 96-111; 106 is pair 10 (bits 21:20), edge = 0b10; 107's pair kept.
        assert_eq!(d.read32(reg::ICFGR + 24), 0b10 << 20 | 0b01 << 22);
        // IPRIORITYR byte 106 = word at 104, byte 2.
        assert_eq!(d.read32(reg::IPRIORITYR + 104), 0x10 << 24 | 0x40 << 16);
        // IROUTER106 at 0x6000 + 848: Aff3 = 1 at bits 39:32, Aff2.Aff1.Aff0 = 0.2.3.
        assert_eq!(d.read64(reg::IROUTER + 848), 0x1_0000_0203);
        assert!(is_enabled(&d, TYPER, 106).unwrap());
    }

    #[test]
    fn pending_is_read_and_cleared_per_intid() {
        let d = FakeGicd::default();
        d.write32(reg::ISPENDR + 12, 1 << 10 | 1 << 13);
        assert!(is_pending(&d, TYPER, 106).unwrap());
        clear_pending(&d, TYPER, 106).unwrap();
        assert!(!is_pending(&d, TYPER, 106).unwrap());
        assert!(is_pending(&d, TYPER, 109).unwrap());
        disable(&d, TYPER, 109).unwrap();
    }

    #[test]
    fn refuses_sgis_ppis_and_intids_beyond_itlines() {
        let d = FakeGicd::default();
        assert_eq!(max_spi(TYPER), 287);
        assert_eq!(max_spi(0x1f), 1019);
        for bad in [0, 26, 31, 288, 1020, 8192] {
            assert_eq!(
                configure(&d, TYPER, bad, Trigger::Edge, 0, 0),
                Err(GicError::NotSpi(bad))
            );
        }
        assert!(d.regs.borrow().is_empty(), "a refused INTID writes nothing");
    }
}

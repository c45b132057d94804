//! Arm GICv3 distributor and redistributor (Arm IHI 0069, "GIC architecture specification"),
//! the memory-mapped half of the interrupt controller: the private peripheral interrupt of the
//! EL2 timer on every CPU, shared peripheral interrupts ([`spi`]: the SMMUv3's wired
//! interrupts), the registered-handler table the EL2 interrupt path dispatches through
//! ([`handlers`]), and the ITS with LPIs ([`its`]). The CPU interface is system
//! registers (`ICC_*_EL1`), which the kernel programs itself; this module is register logic over
//! [`Mmio`] only, so it is tested on the host against the register layout.
//!
//! Affinity routing is always on (GICD_CTLR.ARE), as GICv3 requires for system-register CPU
//! interfaces; the hypervisor runs in the Non-secure state of a GIC whose security is either
//! disabled (QEMU `virt` without `secure=on`: GICD_CTLR.DS = 1) or owned by EL3 firmware. Either
//! way the interrupts it uses are Group 1 (Non-secure Group 1 when security is on).

use iommu::hw::Mmio;

pub mod handlers;
pub mod its;
pub mod spi;
pub mod vgic;

/// Distributor registers (IHI 0069 §12.9).
pub mod gicd {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0004;
    pub const PIDR2: usize = 0xffe8;
    /// GICD_CTLR with DS = 1 (or as seen from Non-secure): EnableGrp1 (bit 1 in the DS = 1
    /// layout, EnableGrp1A in the Non-secure view), ARE (bit 4 / ARE_NS), RWP (bit 31).
    pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
    pub const CTLR_ARE: u32 = 1 << 4;
    pub const CTLR_RWP: u32 = 1 << 31;
}

/// Redistributor registers (IHI 0069 §12.10, §12.11): each redistributor is an RD_base frame
/// (64 KiB) followed by an SGI_base frame (64 KiB); GICv4 adds two more frames (VLPI).
pub mod gicr {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0008;
    pub const WAKER: usize = 0x0014;
    pub const PIDR2: usize = 0xffe8;
    /// GICR_TYPER.Last (bit 4): the last redistributor of the region. VLPIS (bit 1): GICv4
    /// frames follow. Affinity_Value (bits 63:32) = Aff3.Aff2.Aff1.Aff0.
    pub const TYPER_LAST: u64 = 1 << 4;
    pub const TYPER_VLPIS: u64 = 1 << 1;
    pub const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
    pub const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
    /// Offsets in the SGI_base frame (the second 64 KiB).
    pub const SGI_FRAME: usize = 0x1_0000;
    pub const IGROUPR0: usize = SGI_FRAME + 0x0080;
    pub const ISENABLER0: usize = SGI_FRAME + 0x0100;
    pub const ICENABLER0: usize = SGI_FRAME + 0x0180;
    pub const ICPENDR0: usize = SGI_FRAME + 0x0280;
    /// GICR_ISACTIVER0 / GICR_ICACTIVER0: set / clear the active state of SGIs and PPIs.
    pub const ISACTIVER0: usize = SGI_FRAME + 0x0300;
    pub const ICACTIVER0: usize = SGI_FRAME + 0x0380;
    pub const IPRIORITYR: usize = SGI_FRAME + 0x0400;
    pub const ICFGR1: usize = SGI_FRAME + 0x0c04;
    /// Size of one redistributor: two frames (GICv3) or four (GICv4 with VLPIS).
    pub const STRIDE_V3: usize = 0x2_0000;
    pub const STRIDE_V4: usize = 0x4_0000;
}

/// Why the GIC could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicError {
    /// GICD_PIDR2.ArchRev is not 3 or 4.
    NotGicV3 { arch_rev: u32 },
    /// No redistributor in the region has this CPU's affinity.
    NoRedistributor { affinity: u32 },
    /// A register did not settle (RWP or ChildrenAsleep) within the poll budget.
    Timeout(&'static str),
    /// The interrupt is not a PPI (INTIDs 16-31).
    NotPpi(u32),
    /// The interrupt is not an SPI this distributor implements (32 to GICD_TYPER's limit).
    NotSpi(u32),
}

impl core::fmt::Display for GicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GicError::NotGicV3 { arch_rev } => {
                write!(f, "GICD_PIDR2.ArchRev = {arch_rev}, not a GICv3/v4")
            }
            GicError::NoRedistributor { affinity } => {
                write!(f, "no redistributor for affinity {affinity:#x}")
            }
            GicError::Timeout(what) => write!(f, "{what} did not settle"),
            GicError::NotPpi(id) => write!(f, "INTID {id} is not a PPI"),
            GicError::NotSpi(id) => write!(f, "INTID {id} is not an SPI of this distributor"),
        }
    }
}

const POLL_LIMIT: u32 = 1_000_000;

fn poll(mut done: impl FnMut() -> bool, what: &'static str) -> Result<(), GicError> {
    for _ in 0..POLL_LIMIT {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(GicError::Timeout(what))
}

/// Enables the distributor with affinity routing and Group 1, leaving every SPI as it is
/// (disabled at reset). Returns GICD_TYPER for the report.
pub fn init_distributor(gicd: &impl Mmio) -> Result<u32, GicError> {
    let arch_rev = (gicd.read32(gicd::PIDR2) >> 4) & 0xf;
    if !matches!(arch_rev, 3 | 4) {
        return Err(GicError::NotGicV3 { arch_rev });
    }
    let wait_rwp = || {
        poll(
            || gicd.read32(gicd::CTLR) & gicd::CTLR_RWP == 0,
            "GICD_CTLR.RWP",
        )
    };
    // ARE must be set while the groups are disabled (IHI 0069 §12.9.4: changing ARE with a
    // group enabled is UNPREDICTABLE), then the group is enabled in a second write.
    let ctlr = gicd.read32(gicd::CTLR) & !gicd::CTLR_RWP;
    gicd.write32(gicd::CTLR, ctlr & !gicd::CTLR_ENABLE_GRP1);
    wait_rwp()?;
    gicd.write32(
        gicd::CTLR,
        (ctlr & !gicd::CTLR_ENABLE_GRP1) | gicd::CTLR_ARE,
    );
    wait_rwp()?;
    gicd.write32(gicd::CTLR, ctlr | gicd::CTLR_ARE | gicd::CTLR_ENABLE_GRP1);
    wait_rwp()?;
    Ok(gicd.read32(gicd::TYPER))
}

/// Finds the redistributor whose GICR_TYPER affinity is `affinity` (Aff3.Aff2.Aff1.Aff0, as
/// MPIDR_EL1 gives it) in a region of `region_len` bytes; returns its offset in the region.
pub fn find_redistributor(
    gicr: &impl Mmio,
    region_len: usize,
    affinity: u32,
) -> Result<usize, GicError> {
    let mut off = 0;
    while off + gicr::STRIDE_V3 <= region_len {
        let typer = gicr.read64(off + gicr::TYPER);
        if (typer >> 32) as u32 == affinity {
            return Ok(off);
        }
        if typer & gicr::TYPER_LAST != 0 {
            break;
        }
        off += if typer & gicr::TYPER_VLPIS != 0 {
            gicr::STRIDE_V4
        } else {
            gicr::STRIDE_V3
        };
    }
    Err(GicError::NoRedistributor { affinity })
}

/// Wakes the redistributor at `rd` (IHI 0069 §11.1: clear ProcessorSleep, wait until
/// ChildrenAsleep reads 0) and enables PPI `intid` as a Group 1, level-sensitive interrupt of
/// priority `priority`, with any stale pending state cleared.
pub fn enable_ppi(gicr: &impl Mmio, rd: usize, intid: u32, priority: u8) -> Result<(), GicError> {
    if !(16..32).contains(&intid) {
        return Err(GicError::NotPpi(intid));
    }
    let waker = gicr.read32(rd + gicr::WAKER);
    gicr.write32(rd + gicr::WAKER, waker & !gicr::WAKER_PROCESSOR_SLEEP);
    poll(
        || gicr.read32(rd + gicr::WAKER) & gicr::WAKER_CHILDREN_ASLEEP == 0,
        "GICR_WAKER.ChildrenAsleep",
    )?;
    let bit = 1u32 << intid;
    gicr.write32(rd + gicr::ICENABLER0, bit);
    let group = gicr.read32(rd + gicr::IGROUPR0);
    gicr.write32(rd + gicr::IGROUPR0, group | bit);
    // GICR_ICFGR1: two bits per PPI (16-31); 0b00 = level-sensitive, as the timers are.
    let shift = 2 * (intid - 16);
    let cfg = gicr.read32(rd + gicr::ICFGR1);
    gicr.write32(rd + gicr::ICFGR1, cfg & !(3 << shift));
    // GICR_IPRIORITYR<n>: one byte per INTID, accessed as words.
    let word = rd + gicr::IPRIORITYR + (intid as usize & !3);
    let pshift = 8 * (intid % 4);
    let prio = gicr.read32(word);
    gicr.write32(
        word,
        (prio & !(0xff << pshift)) | (u32::from(priority) << pshift),
    );
    gicr.write32(rd + gicr::ICPENDR0, bit);
    gicr.write32(rd + gicr::ISENABLER0, bit);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::vec::Vec;

    /// Register file with the GIC's side effects that matter here: RWP and ChildrenAsleep
    /// settle immediately; ISENABLER/ICENABLER/ICPENDR are write-1-to-set/clear into the
    /// enable and pending state a real GIC keeps.
    #[derive(Default)]
    struct FakeGic {
        regs: RefCell<BTreeMap<usize, u32>>,
        enabled: RefCell<BTreeMap<usize, u32>>,
        writes: RefCell<Vec<(usize, u32)>>,
    }

    impl Mmio for FakeGic {
        fn read32(&self, off: usize) -> u32 {
            if off & 0x1ffff == gicr::ISENABLER0 {
                return *self.enabled.borrow().get(&(off & !0x1ffff)).unwrap_or(&0);
            }
            *self.regs.borrow().get(&off).unwrap_or(&0)
        }
        fn write32(&self, off: usize, v: u32) {
            self.writes.borrow_mut().push((off, v));
            let rd = off & !0x1ffff;
            match off & 0x1ffff {
                gicr::ISENABLER0 => *self.enabled.borrow_mut().entry(rd).or_default() |= v,
                gicr::ICENABLER0 => *self.enabled.borrow_mut().entry(rd).or_default() &= !v,
                gicr::WAKER => {
                    // ChildrenAsleep follows ProcessorSleep at once.
                    let asleep = if v & gicr::WAKER_PROCESSOR_SLEEP != 0 {
                        gicr::WAKER_CHILDREN_ASLEEP
                    } else {
                        0
                    };
                    self.regs
                        .borrow_mut()
                        .insert(off, (v & !gicr::WAKER_CHILDREN_ASLEEP) | asleep);
                }
                _ => {
                    self.regs.borrow_mut().insert(off, v);
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

    #[test]
    fn distributor_sets_are_before_enabling_group1() {
        let d = FakeGic::default();
        d.regs.borrow_mut().insert(gicd::PIDR2, 3 << 4);
        d.regs.borrow_mut().insert(gicd::CTLR, 1 << 6); // DS, as QEMU virt has it
        d.regs.borrow_mut().insert(gicd::TYPER, 0x37);
        assert_eq!(init_distributor(&d), Ok(0x37));
        assert_eq!(d.read32(gicd::CTLR), (1 << 6) | (1 << 4) | (1 << 1));
        let ctlr_writes: Vec<u32> = d
            .writes
            .borrow()
            .iter()
            .filter(|(o, _)| *o == gicd::CTLR)
            .map(|(_, v)| *v)
            .collect();
        // ARE appears in a write where EnableGrp1 is still clear.
        let first_are = ctlr_writes.iter().position(|v| v & (1 << 4) != 0).unwrap();
        assert_eq!(ctlr_writes[first_are] & (1 << 1), 0);
    }

    #[test]
    fn refuses_a_gicv2() {
        let d = FakeGic::default();
        d.regs.borrow_mut().insert(gicd::PIDR2, 2 << 4);
        assert_eq!(
            init_distributor(&d),
            Err(GicError::NotGicV3 { arch_rev: 2 })
        );
        assert!(d.writes.borrow().is_empty());
    }

    #[test]
    fn finds_the_redistributor_by_affinity_and_stops_at_last() {
        let r = FakeGic::default();
        // Two GICv3 redistributors: affinity 0 then 1 (Last).
        r.write64(gicr::TYPER, 0);
        r.write64(gicr::STRIDE_V3 + gicr::TYPER, 1 << 32 | gicr::TYPER_LAST);
        assert_eq!(find_redistributor(&r, 0x4_0000, 0), Ok(0));
        assert_eq!(find_redistributor(&r, 0x4_0000, 1), Ok(gicr::STRIDE_V3));
        assert_eq!(
            find_redistributor(&r, 0x4_0000, 2),
            Err(GicError::NoRedistributor { affinity: 2 })
        );
        // A region too small for the second frame pair never reads past its end.
        assert_eq!(
            find_redistributor(&r, 0x2_0000, 1),
            Err(GicError::NoRedistributor { affinity: 1 })
        );
    }

    #[test]
    fn enable_ppi_programs_group_priority_and_enable() {
        let r = FakeGic::default();
        r.write32(gicr::WAKER, gicr::WAKER_PROCESSOR_SLEEP);
        r.write32(gicr::ICFGR1, 0xffff_ffff);
        enable_ppi(&r, 0, 26, 0x80).unwrap();
        assert_eq!(r.read32(gicr::WAKER) & gicr::WAKER_PROCESSOR_SLEEP, 0);
        assert_eq!(r.read32(gicr::IGROUPR0), 1 << 26);
        assert_eq!(r.read32(gicr::ISENABLER0), 1 << 26);
        // INTID 26 is byte 2 of IPRIORITYR word 6 (offset 24).
        assert_eq!(r.read32(gicr::IPRIORITYR + 24), 0x80 << 16);
        // PPI 10 (INTID 26) config bits [21:20] cleared: level-sensitive; others untouched.
        assert_eq!(r.read32(gicr::ICFGR1), !(3 << 20));
        assert_eq!(enable_ppi(&r, 0, 40, 0), Err(GicError::NotPpi(40)));
    }
}

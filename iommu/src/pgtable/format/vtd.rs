//! Intel VT-d second-stage (second-level) paging entries, VT-d 4.1 §9.8 (same layout in 3.x).
//!
//! One layout for every level: SL-PML5E / SL-PML4E / SL-PDPE / SL-PDE / SL-PTE. Permissions are
//! the AND of R/W/X over the walk (§3.7), so table entries grant everything and leaves restrict.
//! An entry is not present when R = W = 0 (§9.8, "R/W ... if both are 0, the entry is not
//! present").

use super::{Config, Format, Geometry, fixed_geometry, write_flags};
use crate::pgtable::{ConfigError, MapError, PhysAddr, Prot};
use core::fmt;

/// Bit positions of VT-d second-stage entries.
pub mod bits {
    /// Read permission.
    pub const R: u64 = 1 << 0;
    /// Write permission.
    pub const W: u64 = 1 << 1;
    /// Execute permission (honoured only when the hardware supports execute requests).
    pub const X: u64 = 1 << 2;
    /// Extended memory type, leaves only (0 UC, 1 WC, 4 WT, 5 WP, 6 WB).
    pub const EMT_SHIFT: u32 = 3;
    pub const EMT_MASK: u64 = 7 << EMT_SHIFT;
    pub const EMT_UC: u64 = 0;
    pub const EMT_WC: u64 = 1;
    pub const EMT_WB: u64 = 6;
    /// Ignore PAT (combine EMT with the first-stage PAT type or not), leaves only.
    pub const IPAT: u64 = 1 << 6;
    /// Page size: in an SL-PDPE (1 GiB) or SL-PDE (2 MiB), the entry is a leaf.
    pub const PS: u64 = 1 << 7;
    /// Accessed, set by hardware when second-stage A/D tracking is enabled.
    pub const A: u64 = 1 << 8;
    /// Dirty, leaves, set by hardware when second-stage A/D tracking is enabled.
    pub const D: u64 = 1 << 9;
    /// Snoop behaviour, leaves: the access is snooped regardless of the request (ECAP.SC).
    pub const SNP: u64 = 1 << 11;
    /// Address field, bits \[51:12\] (bits at and above the host address width are reserved 0).
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}
use bits::*;

/// VT-d second-stage table with `LEVELS` levels: 3 (39-bit, AGAW 39), 4 (48-bit) or 5 (57-bit),
/// as selected by the context/PASID entry's AW / AGAW field and CAP.SAGAW.
pub struct VtdSecondStage<const LEVELS: u32>;

impl<const LEVELS: u32> Format for VtdSecondStage<LEVELS> {
    const NAME: &'static str = "VT-d second stage";
    const GRANULE_SHIFT: u32 = 12;
    const BITS_PER_LEVEL: u32 = 9;
    /// 4 KiB, 2 MiB (SL-PDE with PS) and 1 GiB (SL-PDPE with PS); PS is reserved above.
    const LEAF_LEVELS: u32 = 0b111;
    const HAS_DIRTY: bool = true;
    const CLEAN_AND: u64 = !D;

    fn geometry(cfg: &Config) -> Result<Geometry, ConfigError> {
        if !(3..=5).contains(&LEVELS) {
            return Err(ConfigError::Format);
        }
        // Output addresses up to 52 bits (HAW ≤ 52, §9.8 address field [HAW-1:12]).
        fixed_geometry(cfg, LEVELS, 12, 9, 12 + 9 * LEVELS, 52)
    }

    #[inline]
    fn leaf_template(prot: Prot, cfg: &Config, block: bool) -> Result<u64, MapError> {
        if !prot.intersects(Prot::READ | Prot::WRITE) {
            return Err(MapError::InvalidProt);
        }
        let mut v = 0;
        if prot.contains(Prot::READ) {
            v |= R;
        }
        if prot.contains(Prot::WRITE) {
            v |= W;
        }
        if prot.contains(Prot::EXEC) && cfg.execute_control {
            v |= X;
        }
        if prot.contains(Prot::SNOOP) {
            // SNP is reserved(0) without snoop control (ECAP.SC = 0).
            if !cfg.snoop_control {
                return Err(MapError::Unsupported);
            }
            v |= SNP;
        }
        if cfg.memory_types {
            let emt = if prot.contains(Prot::DEVICE) {
                EMT_UC
            } else if prot.contains(Prot::NONCACHED) {
                EMT_WC
            } else {
                EMT_WB
            };
            v |= emt << EMT_SHIFT;
        }
        if block {
            v |= PS;
        }
        // A and D stay 0: with A/D tracking the hardware sets them (D = 0 means "clean"); without
        // it they are ignored.
        Ok(v)
    }

    #[inline(always)]
    fn table_entry(table: PhysAddr, cfg: &Config) -> u64 {
        // Non-leaf entries must not restrict: R and W (and X where honoured) set.
        let x = if cfg.execute_control { X } else { 0 };
        table | R | W | x
    }
    #[inline(always)]
    fn oa_bits(pa: PhysAddr) -> u64 {
        pa & ADDR
    }
    #[inline(always)]
    fn entry_addr(pte: u64) -> PhysAddr {
        pte & ADDR
    }
    #[inline(always)]
    fn is_valid(pte: u64) -> bool {
        pte & (R | W) != 0
    }
    #[inline(always)]
    fn is_table(pte: u64, level: u32) -> bool {
        // PS is meaningful only in SL-PDPE (level 2) and SL-PDE (level 1).
        Self::is_valid(pte) && level > 0 && (level > 2 || pte & PS == 0)
    }
    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        pte & D != 0
    }

    fn describe(pte: u64, level: u32, out: &mut dyn fmt::Write) -> fmt::Result {
        write_flags(
            pte,
            &[
                (R, "R"),
                (W, "W"),
                (X, "X"),
                (IPAT, "IPAT"),
                (PS, "PS"),
                (A, "A"),
                (D, "D"),
                (SNP, "SNP"),
            ],
            out,
        )?;
        if !Self::is_table(pte, level) && pte & EMT_MASK != 0 {
            write!(out, " EMT={}", (pte & EMT_MASK) >> EMT_SHIFT)?;
        }
        Ok(())
    }
}

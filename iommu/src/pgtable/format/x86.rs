//! x86-64 4-level and 5-level paging entries (Intel SDM vol. 3A §4.5), as used by VT-d first-stage
//! translation (VT-d 4.1 §3.6 and §9.7, scalable mode; QEMU `x-flts`) and by SVM/EPT-less nested
//! paging. Only the lower canonical half of the input space is used for IOVAs.

use super::{Config, Format, Geometry, fixed_geometry, write_flags};
use crate::pgtable::{ConfigError, MapError, PhysAddr, Prot};
use core::fmt;

/// Bit positions of x86-64 paging entries.
pub mod bits {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Read/write: writes allowed when set.
    pub const RW: u64 = 1 << 1;
    /// User/supervisor: user-mode accesses allowed when set. VT-d treats requests without PASID,
    /// and with PASID but without the privileged-mode flag, as user requests.
    pub const US: u64 = 1 << 2;
    /// Page-level write-through (PAT index bit 0).
    pub const PWT: u64 = 1 << 3;
    /// Page-level cache disable (PAT index bit 1).
    pub const PCD: u64 = 1 << 4;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty (leaves).
    pub const D: u64 = 1 << 6;
    /// Page size: the PDPTE (1 GiB) or PDE (2 MiB) is a leaf. In a 4 KiB PTE this bit is PAT.
    pub const PS: u64 = 1 << 7;
    /// PAT index bit 2 in a 4 KiB PTE.
    pub const PAT_4K: u64 = 1 << 7;
    /// Global (leaves).
    pub const G: u64 = 1 << 8;
    /// PAT index bit 2 in a 2 MiB / 1 GiB leaf.
    pub const PAT_LARGE: u64 = 1 << 12;
    /// Execute disable.
    pub const XD: u64 = 1 << 63;
    /// Address field, bits \[51:12\] (up to MAXPHYADDR).
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}
use bits::*;

/// x86-64 paging with `LEVELS` = 4 (48-bit) or 5 (57-bit) levels.
///
/// Memory types use the default PAT layout (index 0 WB, 2 UC-, 3 UC), which is what the VT-d
/// PASID entry's PAT field holds when the driver programs the architectural reset value.
pub struct X86FirstStage<const LEVELS: u32>;

impl<const LEVELS: u32> Format for X86FirstStage<LEVELS> {
    const NAME: &'static str = "x86-64 paging (VT-d first stage)";
    const GRANULE_SHIFT: u32 = 12;
    const BITS_PER_LEVEL: u32 = 9;
    /// 4 KiB, 2 MiB (PDE.PS) and 1 GiB (PDPTE.PS; VT-d CAP.FS1GP).
    const LEAF_LEVELS: u32 = 0b111;
    const HAS_DIRTY: bool = true;
    const CLEAN_AND: u64 = !D;

    fn geometry(cfg: &Config) -> Result<Geometry, ConfigError> {
        if !(4..=5).contains(&LEVELS) {
            return Err(ConfigError::Format);
        }
        // Lower canonical half: bit 47 (57 with 5 levels) must be 0.
        fixed_geometry(cfg, LEVELS, 12, 9, 12 + 9 * LEVELS - 1, 52)
    }

    #[inline]
    fn leaf_template(prot: Prot, cfg: &Config, block: bool) -> Result<u64, MapError> {
        // A present x86 entry is always readable: read permission cannot be withheld.
        if !prot.contains(Prot::READ) {
            return Err(MapError::InvalidProt);
        }
        // A is preset so the walker never needs a locked update to set it; D is preset on
        // writable leaves unless dirty tracking wants them to start clean.
        let mut v = P | A;
        if prot.contains(Prot::WRITE) {
            v |= RW;
            if !cfg.dirty_tracking {
                v |= D;
            }
        }
        if !prot.contains(Prot::PRIV) {
            v |= US;
        }
        if prot.contains(Prot::GLOBAL) {
            v |= G;
        }
        if !prot.contains(Prot::EXEC) && cfg.execute_control {
            v |= XD;
        }
        if prot.contains(Prot::DEVICE) {
            v |= PCD | PWT; // PAT index 3: UC
        } else if prot.contains(Prot::NONCACHED) {
            v |= PCD; // PAT index 2: UC-
        }
        if block {
            v |= PS;
        }
        Ok(v)
    }

    #[inline(always)]
    fn table_entry(table: PhysAddr, _cfg: &Config) -> u64 {
        // Non-leaf entries grant everything; A preset for the same reason as in leaves.
        table | P | RW | US | A
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
        pte & P != 0
    }
    #[inline(always)]
    fn is_table(pte: u64, level: u32) -> bool {
        // PS exists in the PDPTE (level 2) and PDE (level 1); it is reserved in PML4E/PML5E.
        Self::is_valid(pte) && level > 0 && (level > 2 || pte & PS == 0)
    }
    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        pte & D != 0
    }

    fn describe(pte: u64, level: u32, out: &mut dyn fmt::Write) -> fmt::Result {
        let ps_or_pat = if level == 0 { "PAT" } else { "PS" };
        write_flags(
            pte,
            &[
                (P, "P"),
                (RW, "RW"),
                (US, "US"),
                (PWT, "PWT"),
                (PCD, "PCD"),
                (A, "A"),
                (D, "D"),
                (PS, ps_or_pat),
                (G, "G"),
                (XD, "XD"),
            ],
            out,
        )?;
        if level > 0 && !Self::is_table(pte, level) && pte & PAT_LARGE != 0 {
            out.write_str(" PAT")?;
        }
        Ok(())
    }
}

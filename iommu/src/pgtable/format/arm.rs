//! Arm VMSAv8-64 translation table descriptors (Arm ARM DDI 0487, D8.3), stage 1 and stage 2, as
//! walked by an Arm CPU or an SMMUv3 (SMMUv3 §3.4: the SMMU uses the VMSAv8-64 formats).
//!
//! Granules: 4 KiB (levels 0–3, blocks at levels 1 and 2), 16 KiB and 64 KiB (blocks at level 2
//! only; the 16 KiB level-1 and 64 KiB level-1 blocks need FEAT_LPA2 / FEAT_LPA and are not used).
//! Output addresses up to 48 bits, or 52 bits with the 64 KiB granule (FEAT_LPA: OA\[51:48\] in
//! descriptor bits \[15:12\]).
//!
//! Stage 2 may concatenate up to 16 tables at the initial lookup level instead of adding a level
//! (Arm ARM D8.2.x, "Concatenated translation tables for the initial stage 2 lookup"); this engine
//! always chooses the fewest levels. [`RootInfo`](crate::pgtable::RootInfo) gives the matching
//! SL0 / T0SZ values.

use super::{Config, Format, Geometry, write_flags};
use crate::pgtable::{ConfigError, MapError, PhysAddr, Prot};
use core::fmt;

/// Bit positions of VMSAv8-64 descriptors.
pub mod bits {
    /// Descriptor is valid.
    pub const VALID: u64 = 1 << 0;
    /// At levels above the last: 1 = table, 0 = block. At the last level: must be 1 (page).
    pub const TABLE: u64 = 1 << 1;
    pub const PAGE: u64 = 1 << 1;
    /// Stage 1: AttrIndx\[2:0\], index into MAIR.
    pub const ATTRIDX_SHIFT: u32 = 2;
    pub const ATTRIDX_MASK: u64 = 7 << ATTRIDX_SHIFT;
    /// Stage 2: MemAttr\[3:0\].
    pub const MEMATTR_SHIFT: u32 = 2;
    pub const MEMATTR_MASK: u64 = 0xf << MEMATTR_SHIFT;
    /// Stage 1: AP\[1\], unprivileged (EL0) access allowed.
    pub const AP_UNPRIV: u64 = 1 << 6;
    /// Stage 1: AP\[2\], read-only.
    pub const AP_RDONLY: u64 = 1 << 7;
    /// Stage 2: S2AP\[0\], read allowed.
    pub const S2AP_R: u64 = 1 << 6;
    /// Stage 2: S2AP\[1\], write allowed.
    pub const S2AP_W: u64 = 1 << 7;
    /// Shareability SH\[1:0\].
    pub const SH_SHIFT: u32 = 8;
    pub const SH_MASK: u64 = 3 << SH_SHIFT;
    pub const SH_OUTER: u64 = 2 << SH_SHIFT;
    pub const SH_INNER: u64 = 3 << SH_SHIFT;
    /// Access flag.
    pub const AF: u64 = 1 << 10;
    /// Stage 1: not global (ASID-tagged).
    pub const NG: u64 = 1 << 11;
    /// Dirty bit modifier (FEAT_HAFDBS): hardware may make a write-protected entry writable and
    /// thereby mark it dirty.
    pub const DBM: u64 = 1 << 51;
    /// Contiguous hint.
    pub const CONT: u64 = 1 << 52;
    /// Stage 1: privileged execute never.
    pub const PXN: u64 = 1 << 53;
    /// Stage 1: unprivileged execute never.
    pub const UXN: u64 = 1 << 54;
    /// Stage 2: XN\[1\], execute never at EL1 and EL0.
    pub const S2XN: u64 = 1 << 54;
    /// Output address bits \[47:12\] (granule 4 KiB / 16 KiB).
    pub const ADDR_48: u64 = 0x0000_ffff_ffff_f000;
    /// 64 KiB granule: OA\[47:16\] in place, OA\[51:48\] in bits \[15:12\].
    pub const ADDR_64K_LO: u64 = 0x0000_ffff_ffff_0000;
    pub const ADDR_64K_HI: u64 = 0xf000;

    /// MAIR indices the stage-1 format uses; program [`ARM_S1_MAIR`](super::ARM_S1_MAIR).
    pub const MAIR_IDX_DEVICE: u64 = 0;
    pub const MAIR_IDX_WB: u64 = 1;
    pub const MAIR_IDX_NC: u64 = 2;

    /// Stage-2 MemAttr values (without FEAT_S2FWB): Device-nGnRE; Normal outer/inner
    /// non-cacheable; Normal outer/inner write-back.
    pub const S2_DEVICE_NGNRE: u64 = 0b0001;
    pub const S2_NORMAL_NC: u64 = 0b0101;
    pub const S2_NORMAL_WB: u64 = 0b1111;
}
use bits::*;

/// The MAIR value matching the stage-1 AttrIndx values this engine writes: index 0
/// Device-nGnRE (0x04), index 1 Normal inner/outer write-back read/write-allocate (0xff),
/// index 2 Normal non-cacheable (0x44). Program it into SMMU CD.MAIR (or MAIR_EL1/EL2).
pub const ARM_S1_MAIR: u64 = 0x04 | (0xff << 8) | (0x44 << 16);

/// Decodes the 3-bit physical-address-size encoding shared by ID_AA64MMFR0_EL1.PARange and
/// SMMU_IDR5.OAS (and STE.S2PS / CD.IPS) into a number of bits.
pub const fn arm_pa_bits(encoding: u8) -> Option<u32> {
    match encoding {
        0 => Some(32),
        1 => Some(36),
        2 => Some(40),
        3 => Some(42),
        4 => Some(44),
        5 => Some(48),
        6 => Some(52),
        _ => None,
    }
}

/// Arm VMSAv8-64 stage 1 (SMMU CD-based translation, or the CPU's EL1/EL2 regime), granule
/// 2^`GRANULE_SHIFT` bytes (12, 14 or 16).
pub struct ArmStage1<const GRANULE_SHIFT: u32 = 12>;
/// Arm VMSAv8-64 stage 2 (SMMU STE S2 translation, or the CPU's VTTBR regime), granule
/// 2^`GRANULE_SHIFT` bytes (12, 14 or 16), with concatenated initial-level tables.
pub struct ArmStage2<const GRANULE_SHIFT: u32 = 12>;

fn arm_geometry(cfg: &Config, g: u32, stage2: bool) -> Result<Geometry, ConfigError> {
    if !matches!(g, 12 | 14 | 16) {
        return Err(ConfigError::Format);
    }
    let b = g - 3;
    let max = if g == 16 { 52 } else { 48 };
    // TnSZ ≤ 39 (without FEAT_TTST): at least 25 input bits.
    if cfg.ias < 25 || cfg.ias > max {
        return Err(ConfigError::InputSize);
    }
    if cfg.oas < 32 || cfg.oas > max {
        return Err(ConfigError::OutputSize);
    }
    // Fewest levels whose initial lookup resolves the remaining bits: one table (stage 1), or up
    // to 16 concatenated tables (stage 2: 4 more bits).
    let max_root_bits = if stage2 { b + 4 } else { b };
    let mut levels = 1;
    while cfg.ias > g + (levels - 1) * b + max_root_bits {
        levels += 1;
    }
    if levels > 4 {
        return Err(ConfigError::InputSize);
    }
    let root_bits = cfg.ias - (g + (levels - 1) * b);
    let table_bytes = 1usize << g;
    Ok(Geometry {
        levels,
        root_entries: 1 << root_bits,
        root_bytes: core::cmp::max(8usize << root_bits, table_bytes),
        table_bytes,
        ias: cfg.ias,
        oas: cfg.oas,
    })
}

/// Entries in a contiguous run (Arm ARM D8.6.1, "The Contiguous bit"), our level numbering.
#[inline(always)]
const fn arm_contiguous(g: u32, level: u32) -> usize {
    match (g, level) {
        (12, 0..=2) => 16, // 64 KiB, 32 MiB, 16 GiB
        (14, 0) => 128,    // 2 MiB
        (14, 1) => 32,     // 1 GiB
        (16, 0) => 32,     // 2 MiB
        (16, 1) => 32,     // 16 GiB
        _ => 0,
    }
}

#[inline(always)]
const fn arm_oa_bits(g: u32, pa: PhysAddr) -> u64 {
    if g == 16 {
        (pa & ADDR_64K_LO) | ((pa >> 36) & ADDR_64K_HI)
    } else {
        pa & ADDR_48
    }
}

#[inline(always)]
const fn arm_entry_addr(g: u32, pte: u64) -> PhysAddr {
    if g == 16 {
        (pte & ADDR_64K_LO) | ((pte & ADDR_64K_HI) << 36)
    } else {
        pte & ADDR_48
    }
}

/// Leaf bits shared by both stages: valid, page-or-block, AF, shareability.
#[inline(always)]
fn common_leaf(prot: Prot, block: bool) -> u64 {
    let cached = !prot.intersects(Prot::DEVICE | Prot::NONCACHED);
    // Inner shareable for coherent write-back memory; outer shareable otherwise (for Device
    // memory SH is ignored and treated as outer shareable, D8.6.2).
    let sh = if cached { SH_INNER } else { SH_OUTER };
    // AF preset: an access-flag fault would otherwise stop the first DMA (or cost a hardware
    // update when HTTU manages AF).
    VALID | if block { 0 } else { PAGE } | AF | sh
}

#[inline(always)]
fn arm_leaf_level_is_table(pte: u64, level: u32) -> bool {
    level > 0 && pte & (VALID | TABLE) == (VALID | TABLE)
}

impl<const G: u32> Format for ArmStage1<G> {
    const NAME: &'static str = "Arm VMSAv8-64 stage 1";
    const GRANULE_SHIFT: u32 = G;
    const BITS_PER_LEVEL: u32 = G - 3;
    const LEAF_LEVELS: u32 = if G == 12 { 0b111 } else { 0b011 };
    const HAS_DIRTY: bool = true;
    const CONT_BIT: u64 = CONT;
    // Clean = write-protected again; hardware clears AP[2] on the next write (DBM).
    const CLEAN_OR: u64 = AP_RDONLY;

    fn geometry(cfg: &Config) -> Result<Geometry, ConfigError> {
        arm_geometry(cfg, G, false)
    }
    #[inline(always)]
    fn contiguous_entries(level: u32) -> usize {
        arm_contiguous(G, level)
    }

    #[inline]
    fn leaf_template(prot: Prot, cfg: &Config, block: bool) -> Result<u64, MapError> {
        // Stage 1 has no "no read" encoding: AP[2:1] only choose read-only vs read/write and
        // privileged vs unprivileged (D8.4.1).
        if !prot.contains(Prot::READ) {
            return Err(MapError::InvalidProt);
        }
        let idx = if prot.contains(Prot::DEVICE) {
            MAIR_IDX_DEVICE
        } else if prot.contains(Prot::NONCACHED) {
            MAIR_IDX_NC
        } else {
            MAIR_IDX_WB
        };
        let mut v = common_leaf(prot, block) | (idx << ATTRIDX_SHIFT);
        if !prot.contains(Prot::WRITE) {
            v |= AP_RDONLY;
        } else if cfg.dirty_tracking {
            // Writable-clean: read-only until the first write, which hardware turns into
            // writable-dirty by clearing AP[2] (D8.4.6, dirty state).
            v |= DBM | AP_RDONLY;
        }
        if !prot.contains(Prot::PRIV) {
            v |= AP_UNPRIV;
        }
        if !prot.contains(Prot::GLOBAL) {
            v |= NG;
        }
        if !prot.contains(Prot::EXEC) {
            v |= PXN | UXN;
        }
        Ok(v)
    }
    #[inline(always)]
    fn table_entry(table: PhysAddr, _cfg: &Config) -> u64 {
        // NSTable/APTable/UXNTable/PXNTable all 0: the table does not restrict its leaves.
        arm_oa_bits(G, table) | VALID | TABLE
    }
    #[inline(always)]
    fn oa_bits(pa: PhysAddr) -> u64 {
        arm_oa_bits(G, pa)
    }
    #[inline(always)]
    fn entry_addr(pte: u64) -> PhysAddr {
        arm_entry_addr(G, pte)
    }
    #[inline(always)]
    fn is_valid(pte: u64) -> bool {
        pte & VALID != 0
    }
    #[inline(always)]
    fn is_table(pte: u64, level: u32) -> bool {
        arm_leaf_level_is_table(pte, level)
    }
    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        pte & (DBM | AP_RDONLY) == DBM
    }

    fn describe(pte: u64, level: u32, out: &mut dyn fmt::Write) -> fmt::Result {
        if Self::is_table(pte, level) {
            return out.write_str("table");
        }
        write!(
            out,
            "AttrIndx={} SH={} ",
            (pte & ATTRIDX_MASK) >> ATTRIDX_SHIFT,
            (pte & SH_MASK) >> SH_SHIFT
        )?;
        out.write_str(if pte & AP_RDONLY != 0 { "RO" } else { "RW" })?;
        out.write_char(' ')?;
        write_flags(
            pte,
            &[
                (AP_UNPRIV, "EL0"),
                (AF, "AF"),
                (NG, "nG"),
                (DBM, "DBM"),
                (CONT, "CONT"),
                (PXN, "PXN"),
                (UXN, "UXN"),
            ],
            out,
        )
    }
}

impl<const G: u32> Format for ArmStage2<G> {
    const NAME: &'static str = "Arm VMSAv8-64 stage 2";
    const GRANULE_SHIFT: u32 = G;
    const BITS_PER_LEVEL: u32 = G - 3;
    const LEAF_LEVELS: u32 = if G == 12 { 0b111 } else { 0b011 };
    const HAS_DIRTY: bool = true;
    const CONT_BIT: u64 = CONT;
    // Clean = write permission withdrawn; hardware sets S2AP[1] on the next write (DBM).
    const CLEAN_AND: u64 = !S2AP_W;

    fn geometry(cfg: &Config) -> Result<Geometry, ConfigError> {
        arm_geometry(cfg, G, true)
    }
    #[inline(always)]
    fn contiguous_entries(level: u32) -> usize {
        arm_contiguous(G, level)
    }

    #[inline]
    fn leaf_template(prot: Prot, cfg: &Config, block: bool) -> Result<u64, MapError> {
        if !prot.intersects(Prot::READ | Prot::WRITE) {
            return Err(MapError::InvalidProt);
        }
        let attr = if prot.contains(Prot::DEVICE) {
            S2_DEVICE_NGNRE
        } else if prot.contains(Prot::NONCACHED) {
            S2_NORMAL_NC
        } else {
            S2_NORMAL_WB
        };
        let mut v = common_leaf(prot, block) | (attr << MEMATTR_SHIFT);
        if prot.contains(Prot::READ) {
            v |= S2AP_R;
        }
        if prot.contains(Prot::WRITE) {
            // Dirty tracking: writable-clean = S2AP[1] clear with DBM set (D8.4.6).
            v |= if cfg.dirty_tracking { DBM } else { S2AP_W };
        }
        if !prot.contains(Prot::EXEC) {
            v |= S2XN;
        }
        Ok(v)
    }
    #[inline(always)]
    fn table_entry(table: PhysAddr, _cfg: &Config) -> u64 {
        arm_oa_bits(G, table) | VALID | TABLE
    }
    #[inline(always)]
    fn oa_bits(pa: PhysAddr) -> u64 {
        arm_oa_bits(G, pa)
    }
    #[inline(always)]
    fn entry_addr(pte: u64) -> PhysAddr {
        arm_entry_addr(G, pte)
    }
    #[inline(always)]
    fn is_valid(pte: u64) -> bool {
        pte & VALID != 0
    }
    #[inline(always)]
    fn is_table(pte: u64, level: u32) -> bool {
        arm_leaf_level_is_table(pte, level)
    }
    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        pte & (DBM | S2AP_W) == (DBM | S2AP_W)
    }

    fn describe(pte: u64, level: u32, out: &mut dyn fmt::Write) -> fmt::Result {
        if Self::is_table(pte, level) {
            return out.write_str("table");
        }
        write!(
            out,
            "MemAttr={:#06b} SH={} ",
            (pte & MEMATTR_MASK) >> MEMATTR_SHIFT,
            (pte & SH_MASK) >> SH_SHIFT
        )?;
        write_flags(
            pte,
            &[
                (S2AP_R, "R"),
                (S2AP_W, "W"),
                (AF, "AF"),
                (DBM, "DBM"),
                (CONT, "CONT"),
                (S2XN, "XN"),
            ],
            out,
        )
    }
}

//! Context descriptors (IHI 0070 §5.4): the stage-1 translation regime of a stream (TCR-,
//! TTBR- and MAIR-like fields plus the ASID).
//!
//! The driver gives each stage-1 (and nested) domain a CD table of one CD (STE.S1Fmt = linear,
//! S1CDMax = 0), written once when the domain is created and never changed while reachable, so
//! CDs need no live-update protocol.

use super::regs::AccessAttrs;
use super::ste::attr_fields;

/// Bytes in one CD.
pub const CD_BYTES: usize = 64;
/// 64-bit words in one CD.
pub const CD_WORDS: usize = 8;

/// Field positions (word 0 holds CD bits 63:0, and so on).
pub mod bits {
    // ---- word 0 ----
    /// T0SZ, bits 5:0.
    pub const T0SZ_SHIFT: u32 = 0;
    /// TG0, bits 7:6 (0 = 4 KiB, 1 = 64 KiB, 2 = 16 KiB).
    pub const TG0_SHIFT: u32 = 6;
    /// IR0, bits 9:8 / OR0, bits 11:10 / SH0, bits 13:12: TTB0 walk attributes.
    pub const IR0_SHIFT: u32 = 8;
    pub const OR0_SHIFT: u32 = 10;
    pub const SH0_SHIFT: u32 = 12;
    /// EPD0, bit 14: no walks through TTB0.
    pub const EPD0: u64 = 1 << 14;
    /// ENDI, bit 15: big-endian walks.
    pub const ENDI: u64 = 1 << 15;
    /// T1SZ, bits 21:16; TG1, bits 23:22.
    pub const T1SZ_SHIFT: u32 = 16;
    pub const TG1_SHIFT: u32 = 22;
    /// EPD1, bit 30: no walks through TTB1 (the upper VA range faults).
    pub const EPD1: u64 = 1 << 30;
    /// V, bit 31: the CD is valid.
    pub const V: u64 = 1 << 31;
    /// IPS, bits 34:32: output (IPA or PA) size encoding.
    pub const IPS_SHIFT: u32 = 32;
    /// AFFD, bit 35: access-flag faults disabled.
    pub const AFFD: u64 = 1 << 35;
    /// WXN, bit 36 / UWXN, bit 37.
    pub const WXN: u64 = 1 << 36;
    pub const UWXN: u64 = 1 << 37;
    /// TBI, bits 39:38: top byte ignore.
    pub const TBI_SHIFT: u32 = 38;
    /// PAN, bit 40.
    pub const PAN: u64 = 1 << 40;
    /// AA64, bit 41: the tables are VMSAv8-64.
    pub const AA64: u64 = 1 << 41;
    /// HD, bit 42 / HA, bit 43: hardware dirty / access flag updates.
    pub const HD: u64 = 1 << 42;
    pub const HA: u64 = 1 << 43;
    /// S, bit 44: stall on faults.
    pub const S: u64 = 1 << 44;
    /// R, bit 45: record faults as events (QEMU, like the architecture, reports stage-1
    /// translation faults only with R = 1).
    pub const R: u64 = 1 << 45;
    /// A, bit 46: abort (not RAZ/WI) terminated transactions; must be 1 when
    /// IDR0.TERM_MODEL = 1.
    pub const A: u64 = 1 << 46;
    /// ASET, bit 47: the ASID is not shared with PE broadcast TLB maintenance.
    pub const ASET: u64 = 1 << 47;
    /// ASID, bits 63:48.
    pub const ASID_SHIFT: u32 = 48;

    // ---- word 1 ----
    /// TTB0, bits 51:4.
    pub const TTB: u64 = 0x000f_ffff_ffff_fff0;
    // ---- word 2: TTB1; word 3: MAIR; word 4: AMAIR ----
}
use bits::*;

/// One context descriptor, eight 64-bit words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cd(pub [u64; CD_WORDS]);

/// What a CD needs from its domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CdFields {
    /// Root of the stage-1 table (a PA, or an IPA under nesting).
    pub ttb0: u64,
    /// 64 − input bits (16..=39).
    pub t0sz: u8,
    /// Output size encoding (IDR5.OAS style; under nesting the parent's IPA size).
    pub ips: u8,
    pub asid: u16,
    /// MAIR value matching the AttrIndx values the page tables use.
    pub mair: u64,
}

impl Cd {
    /// A valid AArch64 CD translating the lower VA range through TTB0 with a 4 KiB granule;
    /// TTB1 walks disabled (EPD1), faults recorded (R) and aborted (A), ASET = 1 (the ASIDs
    /// are the SMMU's own, not the CPUs'), little-endian, no HTTU, no stall, TBI off.
    pub const fn new(f: &CdFields, walk: AccessAttrs) -> Cd {
        let (ir, or, sh) = attr_fields(walk);
        let mut w = [0; CD_WORDS];
        w[0] = ((f.t0sz as u64) & 0x3f) << T0SZ_SHIFT
            // TG0 = 0: 4 KiB.
            | ir << IR0_SHIFT
            | or << OR0_SHIFT
            | sh << SH0_SHIFT
            | EPD1
            | V
            | ((f.ips as u64) & 7) << IPS_SHIFT
            // Leaves always carry AF = 1; with AFFD a stray AF = 0 is not a fault either.
            | AFFD
            | AA64
            | R
            | A
            | ASET
            | (f.asid as u64) << ASID_SHIFT;
        w[1] = f.ttb0 & TTB;
        w[3] = f.mair;
        Cd(w)
    }

    pub const fn valid(&self) -> bool {
        self.0[0] & V != 0
    }

    pub const fn asid(&self) -> u16 {
        (self.0[0] >> ASID_SHIFT) as u16
    }

    pub const fn t0sz(&self) -> u8 {
        (self.0[0] & 0x3f) as u8
    }

    pub const fn ttb0(&self) -> u64 {
        self.0[1] & TTB
    }
}

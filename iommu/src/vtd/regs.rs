//! Intel VT-d remapping-unit registers: the register map, access widths, and typed decoders and
//! encoders for every field the driver reads or writes.
//!
//! Everything here is pure bit manipulation over values moved through [`Mmio`], so it is tested
//! on the host against known register values. Written from the Intel Virtualization Technology
//! for Directed I/O Architecture Specification, rev 4.1, chapter 11 (register descriptions); the
//! subsection of each register is cited on its type (rev 3.x numbers the same registers §10.4.x).
//!
//! Offsets are byte offsets from the remapping unit's register base (the DRHD `Register Base
//! Address`). Two register blocks have no fixed offset: the IOTLB registers sit at
//! `ECAP.IRO * 16` ([`ExtCapability::iva_offset`], [`ExtCapability::iotlb_offset`]) and the fault
//! recording registers at `CAP.FRO * 16` ([`Capability::fault_record_offset`]).

use core::fmt;

use crate::hw::Mmio;
use crate::regmap::{Items, reg};
pub use crate::regmap::{RegInfo, Width};

/// Fixed register offsets (VT-d 4.1 §11.4, "Register Address Map").
pub mod offset {
    /// Version (32-bit, §11.4.1).
    pub const VER: usize = 0x00;
    /// Capability (64-bit, §11.4.2).
    pub const CAP: usize = 0x08;
    /// Extended capability (64-bit, §11.4.3).
    pub const ECAP: usize = 0x10;
    /// Global command (32-bit, §11.4.4).
    pub const GCMD: usize = 0x18;
    /// Global status (32-bit, §11.4.5).
    pub const GSTS: usize = 0x1c;
    /// Root table address (64-bit, §11.4.6).
    pub const RTADDR: usize = 0x20;
    /// Context command (64-bit, §11.4.7).
    pub const CCMD: usize = 0x28;
    /// Fault status (32-bit, §11.4.9).
    pub const FSTS: usize = 0x34;
    /// Fault event control (32-bit, §11.4.10).
    pub const FECTL: usize = 0x38;
    /// Fault event data (32-bit, §11.4.11).
    pub const FEDATA: usize = 0x3c;
    /// Fault event address (32-bit, §11.4.12).
    pub const FEADDR: usize = 0x40;
    /// Fault event upper address (32-bit, §11.4.13).
    pub const FEUADDR: usize = 0x44;
    /// Advanced fault log (64-bit, §11.4.15).
    pub const AFLOG: usize = 0x58;
    /// Protected memory enable (32-bit, §11.4.16).
    pub const PMEN: usize = 0x64;
    /// Protected low-memory base (32-bit, §11.4.17).
    pub const PLMBASE: usize = 0x68;
    /// Protected low-memory limit (32-bit, §11.4.18).
    pub const PLMLIMIT: usize = 0x6c;
    /// Protected high-memory base (64-bit, §11.4.19).
    pub const PHMBASE: usize = 0x70;
    /// Protected high-memory limit (64-bit, §11.4.20).
    pub const PHMLIMIT: usize = 0x78;
    /// Invalidation queue head (64-bit, §11.4.21).
    pub const IQH: usize = 0x80;
    /// Invalidation queue tail (64-bit, §11.4.22).
    pub const IQT: usize = 0x88;
    /// Invalidation queue address (64-bit, §11.4.23).
    pub const IQA: usize = 0x90;
    /// Invalidation completion status (32-bit, §11.4.24).
    pub const ICS: usize = 0x9c;
    /// Invalidation event control (32-bit, §11.4.25).
    pub const IECTL: usize = 0xa0;
    /// Invalidation event data (32-bit, §11.4.26).
    pub const IEDATA: usize = 0xa4;
    /// Invalidation event address (32-bit, §11.4.27).
    pub const IEADDR: usize = 0xa8;
    /// Invalidation event upper address (32-bit, §11.4.28).
    pub const IEUADDR: usize = 0xac;
    /// Invalidation queue error record (64-bit, §11.4.29).
    pub const IQERCD: usize = 0xb0;
    /// Interrupt remapping table address (64-bit, §11.4.30).
    pub const IRTA: usize = 0xb8;
    /// Page request queue head (64-bit, §11.4.31).
    pub const PQH: usize = 0xc0;
    /// Page request queue tail (64-bit, §11.4.32).
    pub const PQT: usize = 0xc8;
    /// Page request queue address (64-bit, §11.4.33).
    pub const PQA: usize = 0xd0;
    /// Page request status (32-bit, §11.4.34).
    pub const PRS: usize = 0xdc;
    /// Page request event control (32-bit, §11.4.35).
    pub const PECTL: usize = 0xe0;
    /// Page request event data (32-bit).
    pub const PEDATA: usize = 0xe4;
    /// Page request event address (32-bit).
    pub const PEADDR: usize = 0xe8;
    /// Page request event upper address (32-bit).
    pub const PEUADDR: usize = 0xec;
    /// MTRR capability (64-bit, §11.4 MTRR registers).
    pub const MTRRCAP: usize = 0x100;
    /// MTRR default type (64-bit).
    pub const MTRRDEF: usize = 0x108;
    /// Fixed-range MTRR for 0x00000-0x7FFFF (64-bit).
    pub const MTRR_FIX64K_00000: usize = 0x120;
    /// Fixed-range MTRR for 0x80000-0x9FFFF (64-bit).
    pub const MTRR_FIX16K_80000: usize = 0x128;
    /// Fixed-range MTRR for 0xA0000-0xBFFFF (64-bit).
    pub const MTRR_FIX16K_A0000: usize = 0x130;
    /// Fixed-range MTRR for 0xC0000-0xC7FFF (64-bit).
    pub const MTRR_FIX4K_C0000: usize = 0x138;
    /// Fixed-range MTRR for 0xC8000-0xCFFFF (64-bit).
    pub const MTRR_FIX4K_C8000: usize = 0x140;
    /// Fixed-range MTRR for 0xD0000-0xD7FFF (64-bit).
    pub const MTRR_FIX4K_D0000: usize = 0x148;
    /// Fixed-range MTRR for 0xD8000-0xDFFFF (64-bit).
    pub const MTRR_FIX4K_D8000: usize = 0x150;
    /// Fixed-range MTRR for 0xE0000-0xE7FFF (64-bit).
    pub const MTRR_FIX4K_E0000: usize = 0x158;
    /// Fixed-range MTRR for 0xE8000-0xEFFFF (64-bit).
    pub const MTRR_FIX4K_E8000: usize = 0x160;
    /// Fixed-range MTRR for 0xF0000-0xF7FFF (64-bit).
    pub const MTRR_FIX4K_F0000: usize = 0x168;
    /// Fixed-range MTRR for 0xF8000-0xFFFFF (64-bit).
    pub const MTRR_FIX4K_F8000: usize = 0x170;
    /// Number of variable-range MTRR base/mask pairs.
    pub const MTRR_VARIABLE_COUNT: usize = 10;
    /// Variable-range MTRR base `n` (64-bit; `n < MTRR_VARIABLE_COUNT`).
    pub const fn mtrr_physbase(n: usize) -> usize {
        0x180 + 0x10 * n
    }
    /// Variable-range MTRR mask `n` (64-bit; `n < MTRR_VARIABLE_COUNT`).
    pub const fn mtrr_physmask(n: usize) -> usize {
        0x188 + 0x10 * n
    }
    /// Enhanced command (64-bit; present when `CAP.ECMDS`).
    pub const ECMD: usize = 0x400;
    /// Enhanced command extended operand (64-bit).
    pub const ECEO: usize = 0x408;
    /// Enhanced command response (64-bit).
    pub const ECRSP: usize = 0x410;
    /// Enhanced command capability 0 (64-bit).
    pub const ECCAP0: usize = 0x430;
    /// Virtual command (64-bit; virtual remapping units only, `ECAP.VCS`).
    pub const VCMD: usize = 0xe00;
    /// Virtual command response (64-bit).
    pub const VCRSP: usize = 0xe10;
    /// Virtual command capability (64-bit).
    pub const VCCAP: usize = 0xe30;

    /// Offset of the IOTLB invalidate register within the IOTLB block (§11.4.8.1).
    pub const IOTLB_IN_BLOCK: usize = 0x8;
    /// Offset of the invalidate address register within the IOTLB block (§11.4.8.2).
    pub const IVA_IN_BLOCK: usize = 0x0;
    /// Size in bytes of one fault recording register (§11.4.14).
    pub const FRCD_STRIDE: usize = 16;
}

/// The registers at fixed offsets, in offset order (VT-d 4.1 §11.4). The IOTLB and fault
/// recording blocks are located through ECAP/CAP and are not listed.
pub const REGISTERS: &[RegInfo] = {
    use Width::{W32, W64};
    use offset::*;
    &[
        reg("VER", VER, W32),
        reg("CAP", CAP, W64),
        reg("ECAP", ECAP, W64),
        reg("GCMD", GCMD, W32),
        reg("GSTS", GSTS, W32),
        reg("RTADDR", RTADDR, W64),
        reg("CCMD", CCMD, W64),
        reg("FSTS", FSTS, W32),
        reg("FECTL", FECTL, W32),
        reg("FEDATA", FEDATA, W32),
        reg("FEADDR", FEADDR, W32),
        reg("FEUADDR", FEUADDR, W32),
        reg("AFLOG", AFLOG, W64),
        reg("PMEN", PMEN, W32),
        reg("PLMBASE", PLMBASE, W32),
        reg("PLMLIMIT", PLMLIMIT, W32),
        reg("PHMBASE", PHMBASE, W64),
        reg("PHMLIMIT", PHMLIMIT, W64),
        reg("IQH", IQH, W64),
        reg("IQT", IQT, W64),
        reg("IQA", IQA, W64),
        reg("ICS", ICS, W32),
        reg("IECTL", IECTL, W32),
        reg("IEDATA", IEDATA, W32),
        reg("IEADDR", IEADDR, W32),
        reg("IEUADDR", IEUADDR, W32),
        reg("IQERCD", IQERCD, W64),
        reg("IRTA", IRTA, W64),
        reg("PQH", PQH, W64),
        reg("PQT", PQT, W64),
        reg("PQA", PQA, W64),
        reg("PRS", PRS, W32),
        reg("PECTL", PECTL, W32),
        reg("PEDATA", PEDATA, W32),
        reg("PEADDR", PEADDR, W32),
        reg("PEUADDR", PEUADDR, W32),
        reg("MTRRCAP", MTRRCAP, W64),
        reg("MTRRDEF", MTRRDEF, W64),
        reg("MTRR_FIX64K_00000", MTRR_FIX64K_00000, W64),
        reg("MTRR_FIX16K_80000", MTRR_FIX16K_80000, W64),
        reg("MTRR_FIX16K_A0000", MTRR_FIX16K_A0000, W64),
        reg("MTRR_FIX4K_C0000", MTRR_FIX4K_C0000, W64),
        reg("MTRR_FIX4K_C8000", MTRR_FIX4K_C8000, W64),
        reg("MTRR_FIX4K_D0000", MTRR_FIX4K_D0000, W64),
        reg("MTRR_FIX4K_D8000", MTRR_FIX4K_D8000, W64),
        reg("MTRR_FIX4K_E0000", MTRR_FIX4K_E0000, W64),
        reg("MTRR_FIX4K_E8000", MTRR_FIX4K_E8000, W64),
        reg("MTRR_FIX4K_F0000", MTRR_FIX4K_F0000, W64),
        reg("MTRR_FIX4K_F8000", MTRR_FIX4K_F8000, W64),
        reg("MTRR_PHYSBASE0", mtrr_physbase(0), W64),
        reg("MTRR_PHYSMASK0", mtrr_physmask(0), W64),
        reg("MTRR_PHYSBASE1", mtrr_physbase(1), W64),
        reg("MTRR_PHYSMASK1", mtrr_physmask(1), W64),
        reg("MTRR_PHYSBASE2", mtrr_physbase(2), W64),
        reg("MTRR_PHYSMASK2", mtrr_physmask(2), W64),
        reg("MTRR_PHYSBASE3", mtrr_physbase(3), W64),
        reg("MTRR_PHYSMASK3", mtrr_physmask(3), W64),
        reg("MTRR_PHYSBASE4", mtrr_physbase(4), W64),
        reg("MTRR_PHYSMASK4", mtrr_physmask(4), W64),
        reg("MTRR_PHYSBASE5", mtrr_physbase(5), W64),
        reg("MTRR_PHYSMASK5", mtrr_physmask(5), W64),
        reg("MTRR_PHYSBASE6", mtrr_physbase(6), W64),
        reg("MTRR_PHYSMASK6", mtrr_physmask(6), W64),
        reg("MTRR_PHYSBASE7", mtrr_physbase(7), W64),
        reg("MTRR_PHYSMASK7", mtrr_physmask(7), W64),
        reg("MTRR_PHYSBASE8", mtrr_physbase(8), W64),
        reg("MTRR_PHYSMASK8", mtrr_physmask(8), W64),
        reg("MTRR_PHYSBASE9", mtrr_physbase(9), W64),
        reg("MTRR_PHYSMASK9", mtrr_physmask(9), W64),
        reg("ECMD", ECMD, W64),
        reg("ECEO", ECEO, W64),
        reg("ECRSP", ECRSP, W64),
        reg("ECCAP0", ECCAP0, W64),
        reg("VCMD", VCMD, W64),
        reg("VCRSP", VCRSP, W64),
        reg("VCCAP", VCCAP, W64),
    ]
};

const fn bit(v: u64, n: u32) -> bool {
    (v >> n) & 1 != 0
}

const fn bits(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

// ---------------------------------------------------------------------------------------------
// VER, CAP, ECAP
// ---------------------------------------------------------------------------------------------

/// Version register, VER_REG (§11.4.1): bits 7:4 major, 3:0 minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl Version {
    pub const fn from_raw(raw: u32) -> Self {
        Version {
            major: ((raw >> 4) & 0xf) as u8,
            minor: (raw & 0xf) as u8,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Supported adjusted guest address widths, CAP.SAGAW (§11.4.2 bits 12:8), as a set of
/// second-stage page-table depths. Bit 1 = 39-bit (3-level), bit 2 = 48-bit (4-level),
/// bit 3 = 57-bit (5-level); bits 0 and 4 are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sagaw(u8);

impl Sagaw {
    pub const fn from_bits(raw: u8) -> Self {
        Sagaw(raw & 0x1f)
    }

    /// The raw 5-bit field.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether a table of `levels` levels (3, 4 or 5) is supported.
    pub const fn supports(self, levels: u8) -> bool {
        matches!(levels, 3..=5) && self.0 & (1 << (levels - 2)) != 0
    }

    /// The supported depths in increasing order, drawn from 3, 4 and 5.
    pub fn supported_levels(self) -> impl Iterator<Item = u8> + Clone {
        (3u8..=5).filter(move |&l| self.supports(l))
    }

    /// The deepest supported table, if any.
    pub const fn max_levels(self) -> Option<u8> {
        if self.supports(5) {
            Some(5)
        } else if self.supports(4) {
            Some(4)
        } else if self.supports(3) {
            Some(3)
        } else {
            None
        }
    }

    /// Input address width covered by a table of `levels` levels: 39, 48 or 57 bits.
    pub const fn address_width(levels: u8) -> u8 {
        12 + 9 * levels
    }

    /// The context-entry AW encoding for a table of `levels` levels (1 = 3-level,
    /// 2 = 4-level, 3 = 5-level; §9.3 context entry AW field).
    pub const fn aw_encoding(levels: u8) -> u8 {
        levels - 2
    }

    /// Reserved bits (0 and 4) that are set.
    pub const fn reserved_bits(self) -> u8 {
        self.0 & 0b1_0001
    }
}

impl fmt::Display for Sagaw {
    /// `3,4-level`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for l in self.supported_levels() {
            if any {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
            any = true;
        }
        if any {
            f.write_str("-level")?;
        } else {
            f.write_str("none")?;
        }
        if self.reserved_bits() != 0 {
            write!(f, "(+rsvd {:#x})", self.reserved_bits())?;
        }
        Ok(())
    }
}

bitflags::bitflags! {
    /// Second-stage large page sizes, CAP.SLLPS (§11.4.2 bits 37:34), bit 0 of the field at
    /// CAP bit 34. Bits 2 and 3 of the field are reserved and kept as unnamed bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct LargePages: u8 {
        /// 2 MiB pages (21-bit offset).
        const SIZE_2M = 1 << 0;
        /// 1 GiB pages (30-bit offset).
        const SIZE_1G = 1 << 1;
    }
}

impl fmt::Display for LargePages {
    /// `2M,1G`, `2M`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.contains(Self::SIZE_2M), self.contains(Self::SIZE_1G)) {
            (true, true) => f.write_str("2M,1G"),
            (true, false) => f.write_str("2M"),
            (false, true) => f.write_str("1G"),
            (false, false) => f.write_str("none"),
        }
    }
}

/// Capability register, CAP_REG (§11.4.2). Each method decodes one field; values are
/// converted to their meaning (counts, bytes, bits) as its doc says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability(pub u64);

impl Capability {
    /// ND, bits 2:0: raw number-of-domains encoding (7 is reserved).
    pub const fn nd(self) -> u8 {
        bits(self.0, 0, 3) as u8
    }

    /// Domain-id width implied by ND: 4 + 2·ND bits; `None` for the reserved ND=7.
    pub const fn domain_id_bits(self) -> Option<u8> {
        match self.nd() {
            7 => None,
            nd => Some(4 + 2 * nd),
        }
    }

    /// Number of domain ids (2^(4+2·ND)); `None` for the reserved ND=7. Domain id 0 is
    /// reserved when CM=1 (§11.4.2 ND).
    pub const fn num_domains(self) -> Option<u32> {
        match self.domain_id_bits() {
            Some(b) => Some(1 << b),
            None => None,
        }
    }

    /// AFL, bit 3: advanced fault logging supported.
    pub const fn afl(self) -> bool {
        bit(self.0, 3)
    }

    /// RWBF, bit 4: software must flush the write buffer (GCMD.WBF) after table updates.
    pub const fn rwbf(self) -> bool {
        bit(self.0, 4)
    }

    /// PLMR, bit 5: protected low-memory region supported.
    pub const fn plmr(self) -> bool {
        bit(self.0, 5)
    }

    /// PHMR, bit 6: protected high-memory region supported.
    pub const fn phmr(self) -> bool {
        bit(self.0, 6)
    }

    /// CM, bit 7: caching mode; not-present and erroneous entries may be cached, so
    /// invalidation is needed after making entries present too.
    pub const fn cm(self) -> bool {
        bit(self.0, 7)
    }

    /// SAGAW, bits 12:8: supported second-stage table depths.
    pub const fn sagaw(self) -> Sagaw {
        Sagaw::from_bits(bits(self.0, 8, 5) as u8)
    }

    /// The supported second-stage depths (3/4/5 levels), from SAGAW.
    pub fn supported_levels(self) -> impl Iterator<Item = u8> + Clone {
        self.sagaw().supported_levels()
    }

    /// MGAW, bits 21:16: maximum guest address width in bits (field + 1).
    pub const fn mgaw(self) -> u8 {
        bits(self.0, 16, 6) as u8 + 1
    }

    /// ZLR, bit 22: zero-length DMA reads to write-only pages are allowed.
    pub const fn zlr(self) -> bool {
        bit(self.0, 22)
    }

    /// FRO, bits 33:24: byte offset of the first fault recording register (field × 16).
    pub const fn fro(self) -> usize {
        bits(self.0, 24, 10) as usize * 16
    }

    /// Byte offset of fault recording register `index` (< [`nfr`](Self::nfr)); the high
    /// 64 bits (with F) are at `+ 8`.
    pub const fn fault_record_offset(self, index: u16) -> usize {
        self.fro() + offset::FRCD_STRIDE * index as usize
    }

    /// SLLPS, bits 37:34: second-stage large page sizes.
    pub const fn sllps(self) -> LargePages {
        LargePages::from_bits_retain(bits(self.0, 34, 4) as u8)
    }

    /// PSI, bit 39: page-selective IOTLB invalidation supported.
    pub const fn psi(self) -> bool {
        bit(self.0, 39)
    }

    /// NFR, bits 47:40: number of fault recording registers (field + 1, so 1..=256).
    pub const fn nfr(self) -> u16 {
        bits(self.0, 40, 8) as u16 + 1
    }

    /// MAMV, bits 53:48: largest address mask (log2 of pages) for page-selective
    /// invalidation; meaningful when PSI.
    pub const fn mamv(self) -> u8 {
        bits(self.0, 48, 6) as u8
    }

    /// DWD, bit 54: write draining on IOTLB invalidation supported.
    pub const fn dwd(self) -> bool {
        bit(self.0, 54)
    }

    /// DRD, bit 55: read draining on IOTLB invalidation supported.
    pub const fn drd(self) -> bool {
        bit(self.0, 55)
    }

    /// FL1GP, bit 56: 1 GiB pages in first-stage tables.
    pub const fn fl1gp(self) -> bool {
        bit(self.0, 56)
    }

    /// PI, bit 59: posted interrupts supported.
    pub const fn pi(self) -> bool {
        bit(self.0, 59)
    }

    /// FL5LP, bit 60: 5-level first-stage paging supported.
    pub const fn fl5lp(self) -> bool {
        bit(self.0, 60)
    }

    /// ECMDS, bit 61: enhanced command interface (ECMD registers) supported.
    pub const fn ecmds(self) -> bool {
        bit(self.0, 61)
    }

    /// ESIRTPS, bit 62: SIRTP also invalidates the interrupt entry cache.
    pub const fn esirtps(self) -> bool {
        bit(self.0, 62)
    }

    /// ESRTPS, bit 63: SRTP also invalidates context/PASID caches and IOTLB.
    pub const fn esrtps(self) -> bool {
        bit(self.0, 63)
    }
}

impl fmt::Display for Capability {
    /// One line, every field: `SAGAW=3,4-level MGAW=48 ND=65536 NFR=1 FRO=0x220 ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = *self;
        let mut it = Items::new(f);
        it.val("SAGAW", format_args!("{}", c.sagaw()))?;
        it.val("MGAW", format_args!("{}", c.mgaw()))?;
        match c.num_domains() {
            Some(n) => it.val("ND", format_args!("{n}"))?,
            None => it.val("ND", format_args!("reserved"))?,
        }
        it.val("NFR", format_args!("{}", c.nfr()))?;
        it.val("FRO", format_args!("{:#x}", c.fro()))?;
        it.val("SLLPS", format_args!("{}", c.sllps()))?;
        it.flag("PSI", c.psi())?;
        it.val("MAMV", format_args!("{}", c.mamv()))?;
        it.flag("CM", c.cm())?;
        it.flag("RWBF", c.rwbf())?;
        it.flag("AFL", c.afl())?;
        it.flag("PLMR", c.plmr())?;
        it.flag("PHMR", c.phmr())?;
        it.flag("ZLR", c.zlr())?;
        it.flag("DWD", c.dwd())?;
        it.flag("DRD", c.drd())?;
        it.flag("FL1GP", c.fl1gp())?;
        it.flag("FL5LP", c.fl5lp())?;
        it.flag("PI", c.pi())?;
        it.flag("ECMDS", c.ecmds())?;
        it.flag("ESIRTPS", c.esirtps())?;
        it.flag("ESRTPS", c.esrtps())
    }
}

/// Extended capability register, ECAP_REG (§11.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtCapability(pub u64);

impl ExtCapability {
    /// C, bit 0: page-walk coherency. When clear, software must flush CPU caches (clflush)
    /// after writing remapping structures.
    pub const fn c(self) -> bool {
        bit(self.0, 0)
    }

    /// QI, bit 1: queued invalidation supported.
    pub const fn qi(self) -> bool {
        bit(self.0, 1)
    }

    /// DT, bit 2: device-TLB (ATS) supported.
    pub const fn dt(self) -> bool {
        bit(self.0, 2)
    }

    /// IR, bit 3: interrupt remapping supported.
    pub const fn ir(self) -> bool {
        bit(self.0, 3)
    }

    /// EIM, bit 4: extended interrupt mode (x2APIC, 32-bit destination ids); valid with IR.
    pub const fn eim(self) -> bool {
        bit(self.0, 4)
    }

    /// PT, bit 6: pass-through translation type supported.
    pub const fn pt(self) -> bool {
        bit(self.0, 6)
    }

    /// SC, bit 7: snoop control (SNP bit in leaf entries) supported.
    pub const fn sc(self) -> bool {
        bit(self.0, 7)
    }

    /// IRO, bits 17:8: byte offset of the IOTLB register block (field × 16).
    pub const fn iro(self) -> usize {
        bits(self.0, 8, 10) as usize * 16
    }

    /// Byte offset of the invalidate address register, IVA_REG (§11.4.8.2).
    pub const fn iva_offset(self) -> usize {
        self.iro() + offset::IVA_IN_BLOCK
    }

    /// Byte offset of the IOTLB invalidate register, IOTLB_REG (§11.4.8.1).
    pub const fn iotlb_offset(self) -> usize {
        self.iro() + offset::IOTLB_IN_BLOCK
    }

    /// MHMV, bits 23:20: maximum handle mask for interrupt entry cache invalidation.
    pub const fn mhmv(self) -> u8 {
        bits(self.0, 20, 4) as u8
    }

    /// NEST, bit 26: nested (first-over-second stage) translation supported.
    pub const fn nest(self) -> bool {
        bit(self.0, 26)
    }

    /// PRS, bit 29: page requests supported.
    pub const fn prs(self) -> bool {
        bit(self.0, 29)
    }

    /// ERS, bit 30: execute-requested supported.
    pub const fn ers(self) -> bool {
        bit(self.0, 30)
    }

    /// SRS, bit 31: supervisor-requests supported.
    pub const fn srs(self) -> bool {
        bit(self.0, 31)
    }

    /// NWFS, bit 33: no-write flag in translation requests supported.
    pub const fn nwfs(self) -> bool {
        bit(self.0, 33)
    }

    /// EAFS, bit 34: extended-accessed flag in first-stage entries supported.
    pub const fn eafs(self) -> bool {
        bit(self.0, 34)
    }

    /// PSS, bits 39:35: raw PASID size field (see [`pasid_bits`](Self::pasid_bits)).
    pub const fn pss(self) -> u8 {
        bits(self.0, 35, 5) as u8
    }

    /// PASID width in bits (PSS + 1); meaningful only when [`pasid`](Self::pasid).
    pub const fn pasid_bits(self) -> u8 {
        self.pss() + 1
    }

    /// PASID, bit 40: process address space ids supported.
    pub const fn pasid(self) -> bool {
        bit(self.0, 40)
    }

    /// DIT, bit 41: device-TLB invalidation throttling supported.
    pub const fn dit(self) -> bool {
        bit(self.0, 41)
    }

    /// PDS, bit 42: page-request drain in invalidation wait descriptors supported.
    pub const fn pds(self) -> bool {
        bit(self.0, 42)
    }

    /// SMTS, bit 43: scalable-mode translation supported.
    pub const fn smts(self) -> bool {
        bit(self.0, 43)
    }

    /// VCS, bit 44: virtual command registers supported.
    pub const fn vcs(self) -> bool {
        bit(self.0, 44)
    }

    /// SLADS, bit 45: second-stage accessed/dirty bits supported.
    pub const fn slads(self) -> bool {
        bit(self.0, 45)
    }

    /// SLTS, bit 46: second-stage translation (PGTT=010b) in scalable mode supported.
    pub const fn slts(self) -> bool {
        bit(self.0, 46)
    }

    /// FLTS, bit 47: first-stage translation (PGTT=001b) in scalable mode supported.
    pub const fn flts(self) -> bool {
        bit(self.0, 47)
    }

    /// SMPWCS, bit 48: page walks through PASID-table entries are snooped.
    pub const fn smpwcs(self) -> bool {
        bit(self.0, 48)
    }

    /// RPS, bit 49: RID_PASID field in scalable-mode context entries supported.
    pub const fn rps(self) -> bool {
        bit(self.0, 49)
    }

    /// TDXIO, bit 50: TDX Connect (TDX I/O) supported.
    pub const fn tdxio(self) -> bool {
        bit(self.0, 50)
    }

    /// PMS, bit 51: performance monitoring supported.
    pub const fn pms(self) -> bool {
        bit(self.0, 51)
    }

    /// ADMS, bit 52: abort-DMA mode (RTADDR.TTM=11b) supported.
    pub const fn adms(self) -> bool {
        bit(self.0, 52)
    }

    /// RPRIVS, bit 53: RID_PRIV in scalable-mode context entries supported.
    pub const fn rprivs(self) -> bool {
        bit(self.0, 53)
    }
}

impl fmt::Display for ExtCapability {
    /// One line, every field: `QI IR PT SC=no C=no ... IRO=0xf0 MHMV=15 ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = *self;
        let mut it = Items::new(f);
        it.flag("QI", e.qi())?;
        it.flag("IR", e.ir())?;
        it.flag("EIM", e.eim())?;
        it.flag("PT", e.pt())?;
        it.flag("SC", e.sc())?;
        it.flag("C", e.c())?;
        it.flag("DT", e.dt())?;
        it.val("IRO", format_args!("{:#x}", e.iro()))?;
        it.val("MHMV", format_args!("{}", e.mhmv()))?;
        it.flag("SMTS", e.smts())?;
        it.flag("FLTS", e.flts())?;
        it.flag("SLTS", e.slts())?;
        it.flag("NEST", e.nest())?;
        it.flag("PASID", e.pasid())?;
        it.val("PSS", format_args!("{}", e.pss()))?;
        it.flag("PRS", e.prs())?;
        it.flag("ERS", e.ers())?;
        it.flag("SRS", e.srs())?;
        it.flag("NWFS", e.nwfs())?;
        it.flag("EAFS", e.eafs())?;
        it.flag("DIT", e.dit())?;
        it.flag("PDS", e.pds())?;
        it.flag("VCS", e.vcs())?;
        it.flag("SLADS", e.slads())?;
        it.flag("SMPWCS", e.smpwcs())?;
        it.flag("RPS", e.rps())?;
        it.flag("TDXIO", e.tdxio())?;
        it.flag("PMS", e.pms())?;
        it.flag("ADMS", e.adms())?;
        it.flag("RPRIVS", e.rprivs())
    }
}

/// The identification registers of one remapping unit, read once at probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdIdRegs {
    pub version: Version,
    pub cap: Capability,
    pub ecap: ExtCapability,
}

impl VtdIdRegs {
    /// Reads VER (32-bit), CAP and ECAP (64-bit).
    pub fn read<M: Mmio + ?Sized>(mmio: &M) -> Self {
        VtdIdRegs {
            version: Version::from_raw(mmio.read32(offset::VER)),
            cap: Capability(mmio.read64(offset::CAP)),
            ecap: ExtCapability(mmio.read64(offset::ECAP)),
        }
    }

    /// Reads the identification registers and refuses an address where no unit answers (see
    /// [`unit_absent`]). Only reads: nothing is written to a unit that may not exist.
    pub fn probe<M: Mmio + ?Sized>(mmio: &M) -> Result<Self, &'static str> {
        let ver = mmio.read32(offset::VER);
        let (cap, ecap) = (mmio.read64(offset::CAP), mmio.read64(offset::ECAP));
        match unit_absent(ver, cap, ecap) {
            Some(why) => Err(why),
            None => Ok(VtdIdRegs {
                version: Version::from_raw(ver),
                cap: Capability(cap),
                ecap: ExtCapability(ecap),
            }),
        }
    }
}

/// Why raw VER/CAP/ECAP values cannot come from a remapping unit, or `None` if they can.
///
/// VER_REG (§11.4.1) has bits 31:8 reserved as zero and a major version of at least 1; CAP_REG
/// (§11.4.2) of any real unit has non-zero fields (ND, SAGAW or FL support, MGAW, NFR), and
/// neither CAP nor ECAP (§11.4.3) can be all-ones since both have reserved bits. An address
/// nothing decodes reads all-ones on PCI-style fabrics (and in QEMU's ECAM window) or zero
/// (QEMU's unassigned memory); both are caught here.
pub fn unit_absent(ver: u32, cap: u64, ecap: u64) -> Option<&'static str> {
    if ver == u32::MAX && cap == u64::MAX && ecap == u64::MAX {
        Some("VER/CAP/ECAP read all-ones")
    } else if ver == 0 && cap == 0 && ecap == 0 {
        Some("VER/CAP/ECAP read zero")
    } else if ver & !0xff != 0 {
        Some("VER reserved bits 31:8 set")
    } else if Version::from_raw(ver).major == 0 {
        Some("VER major version 0")
    } else if cap == 0 || cap == u64::MAX {
        Some("CAP reads zero or all-ones")
    } else if ecap == u64::MAX {
        Some("ECAP reads all-ones")
    } else {
        None
    }
}

impl fmt::Display for VtdIdRegs {
    /// Three lines: `VER 1.0`, `CAP <raw> <fields>`, `ECAP <raw> <fields>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "VER {}", self.version)?;
        writeln!(f, "CAP {:#018x} {}", self.cap.0, self.cap)?;
        write!(f, "ECAP {:#018x} {}", self.ecap.0, self.ecap)
    }
}

// ---------------------------------------------------------------------------------------------
// GCMD / GSTS, RTADDR
// ---------------------------------------------------------------------------------------------

bitflags::bitflags! {
    /// Global command register, GCMD_REG (§11.4.4).
    ///
    /// **Writes must preserve the current state.** GCMD is write-only and every write is a
    /// complete command: a persistent bit written as 0 turns that function off. Build each
    /// write from [`GlobalCommand::from_status`] (the persistent bits currently in effect,
    /// that is `GSTS & 0x96FF_FFFF` from §11.4.4), add or remove one bit, write, then poll GSTS
    /// for [`GlobalCommand::status_flag`]. The one-shot bits (SRTP, SFL, WBF, SIRTP) are never
    /// carried over. Change one bit per write.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GlobalCommand: u32 {
        /// Translation enable (persistent).
        const TE = 1 << 31;
        /// Set root table pointer from RTADDR (one-shot).
        const SRTP = 1 << 30;
        /// Set fault log pointer from AFLOG (one-shot).
        const SFL = 1 << 29;
        /// Enable advanced fault logging (persistent).
        const EAFL = 1 << 28;
        /// Write buffer flush (one-shot; needed when CAP.RWBF).
        const WBF = 1 << 27;
        /// Queued invalidation enable (persistent).
        const QIE = 1 << 26;
        /// Interrupt remapping enable (persistent).
        const IRE = 1 << 25;
        /// Set interrupt remapping table pointer from IRTA (one-shot).
        const SIRTP = 1 << 24;
        /// Compatibility-format interrupts pass through (persistent).
        const CFI = 1 << 23;
    }
}

impl GlobalCommand {
    /// Bits that trigger an action and read back as 0 in the next write.
    pub const ONE_SHOT: Self = Self::SRTP
        .union(Self::SFL)
        .union(Self::WBF)
        .union(Self::SIRTP);
    /// Bits that hold state and must be rewritten as currently set.
    pub const PERSISTENT: Self = Self::TE
        .union(Self::EAFL)
        .union(Self::QIE)
        .union(Self::IRE)
        .union(Self::CFI);

    /// The persistent command bits currently in effect according to GSTS; the base for
    /// every GCMD write.
    pub const fn from_status(status: GlobalStatus) -> Self {
        Self::from_bits_retain(status.bits() & Self::PERSISTENT.bits())
    }

    /// The GSTS bit that reflects this command bit (same bit position; §11.4.5). Poll until
    /// it equals the written value (set for enables and one-shots, clear for disables).
    pub const fn status_flag(self) -> GlobalStatus {
        GlobalStatus::from_bits_retain(self.bits())
    }
}

bitflags::bitflags! {
    /// Global status register, GSTS_REG (§11.4.5). Bit n reports GCMD bit n.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GlobalStatus: u32 {
        /// Translation enabled.
        const TES = 1 << 31;
        /// Root table pointer latched.
        const RTPS = 1 << 30;
        /// Fault log pointer latched.
        const FLS = 1 << 29;
        /// Advanced fault logging enabled.
        const AFLS = 1 << 28;
        /// Write buffer flush in progress.
        const WBFS = 1 << 27;
        /// Queued invalidation enabled.
        const QIES = 1 << 26;
        /// Interrupt remapping enabled.
        const IRES = 1 << 25;
        /// Interrupt remapping table pointer latched.
        const IRTPS = 1 << 24;
        /// Compatibility-format interrupts pass through.
        const CFIS = 1 << 23;
    }
}

/// Root table address register TTM field (§11.4.6 bits 11:10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationTableMode {
    /// 00b: legacy root/context tables.
    Legacy = 0,
    /// 01b: scalable-mode root/context tables (needs ECAP.SMTS).
    Scalable = 1,
    /// 10b: reserved.
    Reserved = 2,
    /// 11b: abort-DMA mode, every DMA is blocked (needs ECAP.ADMS).
    AbortDma = 3,
}

/// Root table address register, RTADDR_REG (§11.4.6): root table base (4 KiB aligned,
/// bits 63:12) and TTM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootTableAddress {
    pub address: u64,
    pub mode: TranslationTableMode,
}

impl RootTableAddress {
    pub const fn decode(raw: u64) -> Self {
        let mode = match bits(raw, 10, 2) {
            0 => TranslationTableMode::Legacy,
            1 => TranslationTableMode::Scalable,
            2 => TranslationTableMode::Reserved,
            _ => TranslationTableMode::AbortDma,
        };
        RootTableAddress {
            address: raw & !0xfff,
            mode,
        }
    }

    /// The register value; the address's low 12 bits are dropped.
    pub const fn encode(self) -> u64 {
        (self.address & !0xfff) | (self.mode as u64) << 10
    }
}

// ---------------------------------------------------------------------------------------------
// Register-based invalidation: CCMD, IOTLB, IVA
// ---------------------------------------------------------------------------------------------

/// Context command register, CCMD_REG (§11.4.7): ICC 63, CIRG 62:61, CAIG 60:59, FM 33:32,
/// SID 31:16, DID 15:0. Write a command, then poll until [`icc`](Self::icc) clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextCommand(pub u64);

impl ContextCommand {
    const ICC: u64 = 1 << 63;

    /// Global context-cache invalidation (CIRG=01b).
    pub const fn global() -> Self {
        ContextCommand(Self::ICC | 1 << 61)
    }

    /// Domain-selective invalidation (CIRG=10b).
    pub const fn domain(did: u16) -> Self {
        ContextCommand(Self::ICC | 2 << 61 | did as u64)
    }

    /// Device-selective invalidation (CIRG=11b); `function_mask` (FM, 2 bits) masks the
    /// low function-number bits of `sid`.
    pub const fn device(did: u16, sid: u16, function_mask: u8) -> Self {
        ContextCommand(
            Self::ICC
                | 3 << 61
                | ((function_mask & 3) as u64) << 32
                | (sid as u64) << 16
                | did as u64,
        )
    }

    /// ICC: invalidation still in progress.
    pub const fn icc(self) -> bool {
        bit(self.0, 63)
    }

    /// CIRG: requested granularity (1 global, 2 domain, 3 device).
    pub const fn cirg(self) -> u8 {
        bits(self.0, 61, 2) as u8
    }

    /// CAIG: granularity hardware actually performed (0 means the request was not done).
    pub const fn caig(self) -> u8 {
        bits(self.0, 59, 2) as u8
    }
}

/// IOTLB invalidate register, IOTLB_REG (§11.4.8.1), at [`ExtCapability::iotlb_offset`]:
/// IVT 63, IIRG 61:60, IAIG 58:57, DR 49, DW 48, DID 47:32. Write, then poll until
/// [`ivt`](Self::ivt) clears. Page-selective invalidation takes its address from IVA_REG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbCommand(pub u64);

impl IotlbCommand {
    const IVT: u64 = 1 << 63;

    /// Global invalidation (IIRG=01b).
    pub const fn global() -> Self {
        IotlbCommand(Self::IVT | 1 << 60)
    }

    /// Domain-selective invalidation (IIRG=10b).
    pub const fn domain(did: u16) -> Self {
        IotlbCommand(Self::IVT | 2 << 60 | (did as u64) << 32)
    }

    /// Page-selective invalidation within a domain (IIRG=11b; needs CAP.PSI).
    pub const fn page(did: u16) -> Self {
        IotlbCommand(Self::IVT | 3 << 60 | (did as u64) << 32)
    }

    /// Adds read/write draining (DR/DW; use when CAP.DRD/DWD).
    pub const fn with_drain(self, read: bool, write: bool) -> Self {
        IotlbCommand(self.0 | (read as u64) << 49 | (write as u64) << 48)
    }

    /// IVT: invalidation still in progress.
    pub const fn ivt(self) -> bool {
        bit(self.0, 63)
    }

    /// IIRG: requested granularity (1 global, 2 domain, 3 page).
    pub const fn iirg(self) -> u8 {
        bits(self.0, 60, 2) as u8
    }

    /// IAIG: granularity hardware actually performed (0 means the request was not done).
    pub const fn iaig(self) -> u8 {
        bits(self.0, 57, 2) as u8
    }
}

/// Invalidate address register value, IVA_REG (§11.4.8.2): ADDR 63:12, IH bit 6 (only leaf
/// entries changed), AM 5:0 (invalidate 2^AM pages, `addr` aligned to that; AM ≤ CAP.MAMV).
pub const fn iva_value(addr: u64, address_mask: u8, invalidation_hint: bool) -> u64 {
    (addr & !0xfff) | (invalidation_hint as u64) << 6 | (address_mask & 0x3f) as u64
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

bitflags::bitflags! {
    /// Fault status register, FSTS_REG (§11.4.9). All named bits except PPF are RW1C; FRI
    /// (bits 15:8) is a field, see [`FaultStatus::fri`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct FaultStatus: u32 {
        /// Primary fault overflow: a fault was dropped because all records were full.
        const PFO = 1 << 0;
        /// Primary pending fault: some fault record has F set (read-only).
        const PPF = 1 << 1;
        /// Advanced fault overflow.
        const AFO = 1 << 2;
        /// Advanced pending fault.
        const APF = 1 << 3;
        /// Invalidation queue error (see IQERCD).
        const IQE = 1 << 4;
        /// Invalidation completion error (device-TLB).
        const ICE = 1 << 5;
        /// Invalidation time-out error (device-TLB).
        const ITE = 1 << 6;
    }
}

impl FaultStatus {
    /// The bits cleared by writing 1.
    pub const W1C: Self = Self::PFO
        .union(Self::AFO)
        .union(Self::APF)
        .union(Self::IQE)
        .union(Self::ICE)
        .union(Self::ITE);

    /// FRI, bits 15:8: index of the first pending fault record; valid when PPF.
    pub const fn fri(self) -> u8 {
        (self.bits() >> 8) as u8
    }
}

bitflags::bitflags! {
    /// Event control registers FECTL (§11.4.10), IECTL (§11.4.25) and PECTL (§11.4.35).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EventControl: u32 {
        /// Interrupt mask: no message is sent while set (reset value 1).
        const IM = 1 << 31;
        /// Interrupt pending (read-only).
        const IP = 1 << 30;
    }
}

/// Type of a faulted request, FRCD T2:T1 (§11.4.14 bits 92 and 126). Legacy mode reports
/// only T1 (T2 = 0); scalable mode uses T2 = 1 for page requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// 00b: write request.
    Write = 0b00,
    /// 01b: read request (or AtomicOp).
    Read = 0b01,
    /// 10b: page request.
    PageRequest = 0b10,
    /// 11b: reserved.
    Reserved = 0b11,
}

impl RequestType {
    /// `(T2 << 1) | T1`.
    pub const fn raw(self) -> u8 {
        self as u8
    }

    const fn from_raw(raw: u8) -> Self {
        match raw & 3 {
            0 => RequestType::Write,
            1 => RequestType::Read,
            2 => RequestType::PageRequest,
            _ => RequestType::Reserved,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            RequestType::Write => "write",
            RequestType::Read => "read",
            RequestType::PageRequest => "page-request",
            RequestType::Reserved => "reserved-type",
        }
    }
}

/// PCIe address type of a faulted request, FRCD AT (§11.4.14 bits 125:124).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    Untranslated = 0,
    TranslationRequest = 1,
    Translated = 2,
    Reserved = 3,
}

impl AddressType {
    const fn from_raw(raw: u8) -> Self {
        match raw & 3 {
            0 => AddressType::Untranslated,
            1 => AddressType::TranslationRequest,
            2 => AddressType::Translated,
            _ => AddressType::Reserved,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            AddressType::Untranslated => "untranslated",
            AddressType::TranslationRequest => "translation-request",
            AddressType::Translated => "translated",
            AddressType::Reserved => "reserved-AT",
        }
    }
}

/// One fault recording register, FRCD_REG (§11.4.14): 128 bits read as `lo` (bits 63:0, at
/// [`Capability::fault_record_offset`]) and `hi` (bits 127:64, at `+ 8`). Clear a record by
/// writing [`FaultRecord::CLEAR_HI`] to `hi` (F is RW1C).
///
/// Layout of `hi`: F 63, T1 62, AT 61:60, PV 59:40, FR 39:32, PP 31, EXE 30, PRIV 29,
/// T2 28, SID 15:0. Layout of `lo`: FI 63:12.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// F: the record holds a fault.
    pub fault: bool,
    /// FI: bits 63:12 of `lo` in place. For DMA faults this is the faulting page address;
    /// for interrupt-remapping faults bits 63:48 hold the interrupt index.
    pub fault_info: u64,
    /// SID: requester id (bus 15:8, device 7:3, function 2:0).
    pub source_id: u16,
    /// FR: fault reason code (see [`fault_reason_name`]).
    pub reason: u8,
    /// T2:T1.
    pub request: RequestType,
    /// AT.
    pub address_type: AddressType,
    /// PP: the request carried a PASID.
    pub pasid_present: bool,
    /// PV: the PASID value, meaningful only when `pasid_present`.
    pub pasid_value: u32,
    /// PRIV: the request asked for supervisor privilege (with PASID).
    pub privileged: bool,
    /// EXE: the request asked for execute permission (with PASID).
    pub execute: bool,
}

impl FaultRecord {
    /// Written to the high 64 bits to clear F (RW1C).
    pub const CLEAR_HI: u64 = 1 << 63;

    pub const fn decode(lo: u64, hi: u64) -> Self {
        FaultRecord {
            fault: bit(hi, 63),
            fault_info: lo & !0xfff,
            source_id: bits(hi, 0, 16) as u16,
            reason: bits(hi, 32, 8) as u8,
            request: RequestType::from_raw(((bit(hi, 28) as u8) << 1) | bit(hi, 62) as u8),
            address_type: AddressType::from_raw(bits(hi, 60, 2) as u8),
            pasid_present: bit(hi, 31),
            pasid_value: bits(hi, 40, 20) as u32,
            privileged: bit(hi, 29),
            execute: bit(hi, 30),
        }
    }

    /// The PASID, when the request had one.
    pub const fn pasid(&self) -> Option<u32> {
        if self.pasid_present {
            Some(self.pasid_value)
        } else {
            None
        }
    }

    /// Faulting page address (DMA faults).
    pub const fn page_address(&self) -> u64 {
        self.fault_info
    }

    /// Interrupt index (interrupt-remapping faults): FI bits 63:48.
    pub const fn interrupt_index(&self) -> u16 {
        (self.fault_info >> 48) as u16
    }

    pub const fn reason_class(&self) -> FaultClass {
        fault_reason_class(self.reason)
    }

    pub const fn reason_name(&self) -> &'static str {
        fault_reason_name(self.reason)
    }
}

impl fmt::Display for FaultRecord {
    /// `FR=0x05 (write to a page without write permission) SID=00:03.0 write addr=0xdef0000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.fault {
            f.write_str("(no fault) ")?;
        }
        let sid = self.source_id;
        write!(
            f,
            "FR={:#04x} ({}) SID={:02x}:{:02x}.{}",
            self.reason,
            self.reason_name(),
            sid >> 8,
            (sid >> 3) & 0x1f,
            sid & 7
        )?;
        if self.reason_class() == FaultClass::InterruptRemapping {
            return write!(f, " index={:#x}", self.interrupt_index());
        }
        write!(f, " {} addr={:#x}", self.request.name(), self.fault_info)?;
        if self.address_type != AddressType::Untranslated {
            write!(f, " AT={}", self.address_type.name())?;
        }
        if let Some(p) = self.pasid() {
            write!(f, " PASID={p:#x}")?;
            if self.privileged {
                f.write_str(" PRIV")?;
            }
            if self.execute {
                f.write_str(" EXE")?;
            }
        }
        Ok(())
    }
}

/// Which table a fault reason code belongs to (VT-d 4.1 Appendix A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// 01h-0Dh: DMA remapping faults in legacy mode.
    LegacyDma,
    /// 20h-26h: interrupt remapping faults.
    InterruptRemapping,
    /// 30h and up: DMA remapping faults in scalable mode.
    ScalableDma,
    /// A code not in our tables.
    Unknown,
}

/// The class of fault reason `fr`.
pub const fn fault_reason_class(fr: u8) -> FaultClass {
    if matches!(fault_reason_name(fr).as_bytes(), b"unknown") {
        FaultClass::Unknown
    } else if fr < 0x20 {
        FaultClass::LegacyDma
    } else if fr < 0x30 {
        FaultClass::InterruptRemapping
    } else {
        FaultClass::ScalableDma
    }
}

/// A short description of fault reason `fr` (VT-d 4.1 Appendix A, non-recoverable fault
/// reason encodings), or `"unknown"` for codes not in the tables. Scalable-mode entries start
/// with `SM:`; "first/second stage" is the rev 4 name for "first/second level".
pub const fn fault_reason_name(fr: u8) -> &'static str {
    match fr {
        // Legacy mode.
        0x01 => "root entry not present",
        0x02 => "context entry not present",
        0x03 => "invalid context entry programming",
        0x04 => "address beyond the domain's address width",
        0x05 => "write to a page without write permission",
        0x06 => "read from a page without read permission",
        0x07 => "error accessing a second-level paging entry",
        0x08 => "error accessing the root table",
        0x09 => "error accessing a context entry",
        0x0a => "reserved field set in root entry",
        0x0b => "reserved field set in context entry",
        0x0c => "reserved field set in second-level paging entry",
        0x0d => "request blocked by the context entry's translation type",
        // Interrupt remapping.
        0x20 => "reserved field set in interrupt request",
        0x21 => "interrupt index beyond the remapping table size",
        0x22 => "interrupt remapping entry not present",
        0x23 => "error accessing the interrupt remapping table",
        0x24 => "reserved field set in interrupt remapping entry",
        0x25 => "compatibility-format interrupt blocked",
        0x26 => "interrupt blocked by source-id validation",
        // Scalable mode: root table and TTM.
        0x30 => "SM: invalid root table address",
        0x31 => "SM: legacy TTM for a request with PASID",
        0x32 => "SM: legacy TTM for a page request",
        0x38 => "SM: error accessing root entry",
        0x39 => "SM: root entry not present",
        0x3a => "SM: reserved field set in root entry",
        // Context entry.
        0x40 => "SM: error accessing context entry",
        0x41 => "SM: context entry not present",
        0x42 => "SM: reserved field set in context entry",
        0x43 => "SM: invalid context entry programming",
        0x44 => "SM: translation request with context DTE clear",
        0x45 => "SM: request with PASID but context PASIDE clear",
        0x46 => "SM: PASID beyond the PASID directory size",
        0x47 => "SM: page request with context PRE clear",
        0x48 => "SM: RID_PASID error in context entry",
        // PASID directory and table.
        0x50 => "SM: error accessing PASID directory entry",
        0x51 => "SM: PASID directory entry not present",
        0x52 => "SM: reserved field set in PASID directory entry",
        0x58 => "SM: error accessing PASID table entry",
        0x59 => "SM: PASID table entry not present",
        0x5a => "SM: reserved field set in PASID table entry",
        0x5b => "SM: invalid PASID table entry programming",
        0x5c => "SM: execute request with PASID entry ERE clear",
        0x5d => "SM: supervisor request with PASID entry SRE clear",
        // First stage.
        0x70 => "SM: error accessing first-stage paging entry",
        0x71 => "SM: first-stage paging entry not present",
        0x72 => "SM: reserved field set in first-stage paging entry",
        0x73 => "SM: error accessing first-stage table pointer (nested)",
        0x74 => "SM: first-stage entry address beyond MGAW (nested)",
        0x75 => "SM: no read permission on first-stage table pointer (nested)",
        0x76 => "SM: no read permission on first-stage paging entry (nested)",
        0x77 => "SM: no write permission on first-stage paging entry (nested)",
        // Second stage.
        0x78 => "SM: error accessing second-stage paging entry",
        0x79 => "SM: second-stage paging entry grants neither read nor write",
        0x7a => "SM: reserved field set in second-stage paging entry",
        0x7b => "SM: invalid second-stage table pointer",
        0x7c => "SM: second-stage A/D update needed under no-snoop",
        // Access checks.
        0x80 => "SM: non-canonical first-stage input address",
        0x81 => "SM: user request to a supervisor page",
        0x82 => "SM: execute request to a no-execute page",
        0x83 => "SM: input address beyond the hardware address width",
        0x84 => "SM: second-stage entry address beyond the maximum",
        0x85 => "SM: write request without write permission",
        0x86 => "SM: read request without read permission",
        0x87 => "SM: request to the interrupt address range",
        0x90 => "SM: first-stage A/D update needed under no-snoop",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Queued invalidation and interrupt remapping table address
// ---------------------------------------------------------------------------------------------

/// Invalidation queue address register, IQA_REG (§11.4.23): IQA 63:12 (4 KiB aligned base),
/// DW bit 11 (256-bit descriptors, needs ECAP.SMTS), QS 2:0 (queue is 4 KiB << QS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvQueueAddress {
    pub base: u64,
    pub wide_descriptors: bool,
    pub qs: u8,
}

impl InvQueueAddress {
    pub const fn decode(raw: u64) -> Self {
        InvQueueAddress {
            base: raw & !0xfff,
            wide_descriptors: bit(raw, 11),
            qs: bits(raw, 0, 3) as u8,
        }
    }

    pub const fn encode(self) -> u64 {
        (self.base & !0xfff) | (self.wide_descriptors as u64) << 11 | (self.qs & 7) as u64
    }

    /// Queue size in bytes.
    pub const fn bytes(self) -> usize {
        4096 << self.qs
    }

    /// Number of descriptors (16 or 32 bytes each).
    pub const fn entries(self) -> usize {
        self.bytes() / self.descriptor_bytes()
    }

    pub const fn descriptor_bytes(self) -> usize {
        if self.wide_descriptors { 32 } else { 16 }
    }
}

/// IQH/IQT (§11.4.21-22) hold a byte offset into the queue in bits 18:4. Converts a
/// descriptor index to the register value.
pub const fn iq_pointer(index: usize, wide_descriptors: bool) -> u64 {
    let shift = if wide_descriptors { 5 } else { 4 };
    ((index << shift) as u64) & 0x7fff0
}

/// The descriptor index held in an IQH/IQT value.
pub const fn iq_index(raw: u64, wide_descriptors: bool) -> usize {
    let shift = if wide_descriptors { 5 } else { 4 };
    ((raw & 0x7fff0) >> shift) as usize
}

/// ICS_REG (§11.4.24) bit 0, IWC: an invalidation-wait descriptor with IF completed (RW1C).
pub const ICS_IWC: u32 = 1;

/// Invalidation queue error record, IQERCD_REG (§11.4.29): ICESID 63:48, ITESID 47:32,
/// IQEI 3:0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvQueueError(pub u64);

impl InvQueueError {
    /// IQEI: what was wrong with the descriptor at IQH (when FSTS.IQE).
    pub const fn iqei(self) -> u8 {
        bits(self.0, 0, 4) as u8
    }

    /// ITESID: source id of the device-TLB invalidation that timed out (FSTS.ITE).
    pub const fn itesid(self) -> u16 {
        bits(self.0, 32, 16) as u16
    }

    /// ICESID: source id of the bad device-TLB invalidation completion (FSTS.ICE).
    pub const fn icesid(self) -> u16 {
        bits(self.0, 48, 16) as u16
    }
}

/// Interrupt remapping table address register, IRTA_REG (§11.4.30): IRTA 63:12, EIME bit 11
/// (x2APIC mode, needs ECAP.EIM), S 3:0 (table has 2^(S+1) entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrtAddress {
    pub base: u64,
    pub x2apic: bool,
    pub size: u8,
}

impl IrtAddress {
    pub const fn decode(raw: u64) -> Self {
        IrtAddress {
            base: raw & !0xfff,
            x2apic: bit(raw, 11),
            size: bits(raw, 0, 4) as u8,
        }
    }

    pub const fn encode(self) -> u64 {
        (self.base & !0xfff) | (self.x2apic as u64) << 11 | (self.size & 0xf) as u64
    }

    /// Number of interrupt remapping entries.
    pub const fn entries(self) -> usize {
        2 << self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;
    use std::format;
    use std::string::ToString;
    use std::vec::Vec;

    /// QEMU 10 q35 intel-iommu, every configuration.
    const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
    /// TCG default (intremap=auto -> on).
    const QEMU_ECAP_TCG: u64 = 0xf0_0f4a;
    /// KVM without split irqchip (no IR).
    const QEMU_ECAP_KVM: u64 = 0xf42;
    /// KVM, split irqchip, intremap=on (adds EIM).
    const QEMU_ECAP_SPLIT: u64 = 0xf0_0f5a;
    /// x-scalable-mode=on.
    const QEMU_ECAP_SCALABLE: u64 = 0x4800_80f0_0f4a;

    /// A field for the single-bit tests: name, low bit, width, and a reader that returns the
    /// raw field value through the public API (undoing +1, ×16 and the like).
    type Field<T> = (&'static str, u32, u32, fn(T) -> u64);

    /// Every bit of a `nbits`-wide register, set alone, must change exactly the field that
    /// owns it (by 1 << (bit - lo)) and no other field; bits no field owns change nothing.
    fn check_single_bits<T: Copy>(what: &str, nbits: u32, make: fn(u64) -> T, fields: &[Field<T>]) {
        for (i, a) in fields.iter().enumerate() {
            for b in &fields[i + 1..] {
                let overlap = a.1 < b.1 + b.2 && b.1 < a.1 + a.2;
                assert!(
                    !overlap,
                    "{what}: test table fields {} and {} overlap",
                    a.0, b.0
                );
            }
        }
        for f in fields {
            assert_eq!((f.3)(make(0)), 0, "{what}.{} of 0", f.0);
            let all = if nbits == 64 {
                u64::MAX
            } else {
                (1 << nbits) - 1
            };
            assert_eq!(
                (f.3)(make(all)),
                (1 << f.2) - 1,
                "{what}.{} of all-ones",
                f.0
            );
        }
        for bitno in 0..nbits {
            let v = make(1 << bitno);
            let owner = fields.iter().find(|f| bitno >= f.1 && bitno < f.1 + f.2);
            for f in fields {
                let want = match owner {
                    Some(o) if o.0 == f.0 => 1u64 << (bitno - f.1),
                    _ => 0,
                };
                assert_eq!((f.3)(v), want, "{what} bit {bitno}: field {}", f.0);
            }
        }
    }

    #[test]
    fn qemu_version() {
        let v = Version::from_raw(0x10);
        assert_eq!(v, Version { major: 1, minor: 0 });
        assert_eq!(v.to_string(), "1.0");
        assert_eq!(Version::from_raw(0x41).to_string(), "4.1");
    }

    #[test]
    fn qemu_cap_decodes_to_spec_meaning() {
        let c = Capability(QEMU_CAP);
        assert_eq!(c.nd(), 6);
        assert_eq!(c.domain_id_bits(), Some(16));
        assert_eq!(c.num_domains(), Some(65536));
        assert_eq!(c.sagaw().bits(), 0b00110);
        assert!(c.sagaw().supports(3) && c.sagaw().supports(4));
        assert!(!c.sagaw().supports(5) && !c.sagaw().supports(2) && !c.sagaw().supports(6));
        assert_eq!(c.supported_levels().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(c.sagaw().max_levels(), Some(4));
        assert_eq!(c.mgaw(), 48);
        assert_eq!(c.fro(), 0x220);
        assert_eq!(c.fault_record_offset(0), 0x220);
        assert_eq!(c.fault_record_offset(1), 0x230);
        assert_eq!(c.nfr(), 1);
        assert_eq!(c.sllps(), LargePages::SIZE_2M | LargePages::SIZE_1G);
        assert!(c.psi());
        assert_eq!(c.mamv(), 18);
        assert!(c.dwd() && c.drd());
        // Everything else is clear.
        assert!(!c.cm() && !c.rwbf() && !c.plmr() && !c.phmr() && !c.afl() && !c.zlr());
        assert!(!c.fl1gp() && !c.pi() && !c.fl5lp() && !c.ecmds() && !c.esirtps() && !c.esrtps());
    }

    #[test]
    fn cap_display_prints_every_field() {
        assert_eq!(
            Capability(QEMU_CAP).to_string(),
            "SAGAW=3,4-level MGAW=48 ND=65536 NFR=1 FRO=0x220 SLLPS=2M,1G PSI MAMV=18 CM=no \
             RWBF=no AFL=no PLMR=no PHMR=no ZLR=no DWD DRD FL1GP=no FL5LP=no PI=no ECMDS=no \
             ESIRTPS=no ESRTPS=no"
        );
        assert_eq!(
            Capability(7)
                .to_string()
                .split(' ')
                .take(3)
                .collect::<Vec<_>>(),
            ["SAGAW=none", "MGAW=1", "ND=reserved"]
        );
    }

    #[test]
    fn qemu_ecap_tcg_default() {
        let e = ExtCapability(QEMU_ECAP_TCG);
        assert!(e.qi() && e.ir() && e.pt());
        assert_eq!(e.iro(), 0xf0, "IRO field 0xf, x16 = 0xf0 bytes");
        assert_eq!(e.iva_offset(), 0xf0);
        assert_eq!(e.iotlb_offset(), 0xf8);
        assert_eq!(e.mhmv(), 15);
        assert!(!e.c(), "QEMU is not page-walk coherent");
        assert!(!e.dt() && !e.eim() && !e.sc() && !e.smts() && !e.pasid() && !e.nest());
        assert_eq!(e.pss(), 0);
        assert_eq!(
            e.to_string(),
            "QI IR EIM=no PT SC=no C=no DT=no IRO=0xf0 MHMV=15 SMTS=no FLTS=no SLTS=no NEST=no \
             PASID=no PSS=0 PRS=no ERS=no SRS=no NWFS=no EAFS=no DIT=no PDS=no VCS=no SLADS=no \
             SMPWCS=no RPS=no TDXIO=no PMS=no ADMS=no RPRIVS=no"
        );
    }

    #[test]
    fn qemu_ecap_other_configurations() {
        let kvm = ExtCapability(QEMU_ECAP_KVM);
        assert!(kvm.qi() && kvm.pt() && !kvm.ir());
        assert_eq!((kvm.iro(), kvm.mhmv()), (0xf0, 0));

        let split = ExtCapability(QEMU_ECAP_SPLIT);
        assert!(split.ir() && split.eim());
        assert_eq!(split.0 & !QEMU_ECAP_TCG, 1 << 4, "only EIM added");

        let sm = ExtCapability(QEMU_ECAP_SCALABLE);
        assert!(sm.smts() && sm.srs() && sm.slts());
        assert!(sm.qi() && sm.ir() && sm.pt());
        assert!(!sm.flts() && !sm.pasid() && !sm.nest() && !sm.ers() && !sm.prs());
        assert_eq!(sm.iotlb_offset(), 0xf8);
        let s = sm.to_string();
        for item in ["SMTS", "SLTS", "SRS", "FLTS=no", "PASID=no"] {
            assert!(s.split(' ').any(|w| w == item), "{item} in {s}");
        }
    }

    #[test]
    fn cap_every_bit_maps_to_one_field() {
        let fields: &[Field<Capability>] = &[
            ("ND", 0, 3, |c| c.nd() as u64),
            ("AFL", 3, 1, |c| c.afl() as u64),
            ("RWBF", 4, 1, |c| c.rwbf() as u64),
            ("PLMR", 5, 1, |c| c.plmr() as u64),
            ("PHMR", 6, 1, |c| c.phmr() as u64),
            ("CM", 7, 1, |c| c.cm() as u64),
            ("SAGAW", 8, 5, |c| c.sagaw().bits() as u64),
            ("MGAW", 16, 6, |c| c.mgaw() as u64 - 1),
            ("ZLR", 22, 1, |c| c.zlr() as u64),
            ("FRO", 24, 10, |c| c.fro() as u64 / 16),
            ("SLLPS", 34, 4, |c| c.sllps().bits() as u64),
            ("PSI", 39, 1, |c| c.psi() as u64),
            ("NFR", 40, 8, |c| c.nfr() as u64 - 1),
            ("MAMV", 48, 6, |c| c.mamv() as u64),
            ("DWD", 54, 1, |c| c.dwd() as u64),
            ("DRD", 55, 1, |c| c.drd() as u64),
            ("FL1GP", 56, 1, |c| c.fl1gp() as u64),
            ("PI", 59, 1, |c| c.pi() as u64),
            ("FL5LP", 60, 1, |c| c.fl5lp() as u64),
            ("ECMDS", 61, 1, |c| c.ecmds() as u64),
            ("ESIRTPS", 62, 1, |c| c.esirtps() as u64),
            ("ESRTPS", 63, 1, |c| c.esrtps() as u64),
        ];
        check_single_bits("CAP", 64, Capability, fields);
    }

    #[test]
    fn ecap_every_bit_maps_to_one_field() {
        let fields: &[Field<ExtCapability>] = &[
            ("C", 0, 1, |e| e.c() as u64),
            ("QI", 1, 1, |e| e.qi() as u64),
            ("DT", 2, 1, |e| e.dt() as u64),
            ("IR", 3, 1, |e| e.ir() as u64),
            ("EIM", 4, 1, |e| e.eim() as u64),
            ("PT", 6, 1, |e| e.pt() as u64),
            ("SC", 7, 1, |e| e.sc() as u64),
            ("IRO", 8, 10, |e| e.iro() as u64 / 16),
            ("MHMV", 20, 4, |e| e.mhmv() as u64),
            ("NEST", 26, 1, |e| e.nest() as u64),
            ("PRS", 29, 1, |e| e.prs() as u64),
            ("ERS", 30, 1, |e| e.ers() as u64),
            ("SRS", 31, 1, |e| e.srs() as u64),
            ("NWFS", 33, 1, |e| e.nwfs() as u64),
            ("EAFS", 34, 1, |e| e.eafs() as u64),
            ("PSS", 35, 5, |e| e.pasid_bits() as u64 - 1),
            ("PASID", 40, 1, |e| e.pasid() as u64),
            ("DIT", 41, 1, |e| e.dit() as u64),
            ("PDS", 42, 1, |e| e.pds() as u64),
            ("SMTS", 43, 1, |e| e.smts() as u64),
            ("VCS", 44, 1, |e| e.vcs() as u64),
            ("SLADS", 45, 1, |e| e.slads() as u64),
            ("SLTS", 46, 1, |e| e.slts() as u64),
            ("FLTS", 47, 1, |e| e.flts() as u64),
            ("SMPWCS", 48, 1, |e| e.smpwcs() as u64),
            ("RPS", 49, 1, |e| e.rps() as u64),
            ("TDXIO", 50, 1, |e| e.tdxio() as u64),
            ("PMS", 51, 1, |e| e.pms() as u64),
            ("ADMS", 52, 1, |e| e.adms() as u64),
            ("RPRIVS", 53, 1, |e| e.rprivs() as u64),
        ];
        check_single_bits("ECAP", 64, ExtCapability, fields);
    }

    #[test]
    fn sagaw_levels_and_widths() {
        let five = Sagaw::from_bits(0b01000);
        assert_eq!(five.supported_levels().collect::<Vec<_>>(), [5]);
        assert_eq!(five.to_string(), "5-level");
        assert_eq!(Sagaw::from_bits(0b01110).to_string(), "3,4,5-level");
        assert_eq!(Sagaw::from_bits(0b00001).to_string(), "none(+rsvd 0x1)");
        assert_eq!(Sagaw::from_bits(0).max_levels(), None);
        assert_eq!([3, 4, 5].map(Sagaw::address_width), [39, 48, 57]);
        assert_eq!([3, 4, 5].map(Sagaw::aw_encoding), [1, 2, 3]);
        assert_eq!(LargePages::SIZE_1G.to_string(), "1G");
        assert_eq!(LargePages::empty().to_string(), "none");
    }

    #[test]
    fn gcmd_preserves_only_persistent_state() {
        // §11.4.4: status_to_preserve = GSTS & 0x96FFFFFF.
        let all = GlobalStatus::from_bits_retain(u32::MAX);
        assert_eq!(GlobalCommand::from_status(all).bits(), 0x9680_0000);
        assert_eq!(
            GlobalCommand::from_status(all).bits(),
            all.bits() & 0x96FF_FFFF & GlobalCommand::all().bits()
        );
        assert_eq!(
            GlobalCommand::ONE_SHOT | GlobalCommand::PERSISTENT,
            GlobalCommand::all()
        );
        assert!(
            GlobalCommand::ONE_SHOT
                .intersection(GlobalCommand::PERSISTENT)
                .is_empty()
        );

        // QI and IR on, root pointer latched: enabling TE keeps QIE/IRE and drops SRTP.
        let gsts = GlobalStatus::QIES | GlobalStatus::IRES | GlobalStatus::RTPS;
        let cmd = GlobalCommand::from_status(gsts) | GlobalCommand::TE;
        assert_eq!(
            cmd,
            GlobalCommand::TE | GlobalCommand::QIE | GlobalCommand::IRE
        );
        assert_eq!(GlobalCommand::TE.status_flag(), GlobalStatus::TES);
        assert_eq!(GlobalCommand::SRTP.status_flag(), GlobalStatus::RTPS);
        assert_eq!(GlobalCommand::CFI.status_flag(), GlobalStatus::CFIS);
        // Disabling TE keeps the rest.
        let on = GlobalStatus::TES | GlobalStatus::QIES;
        assert_eq!(
            GlobalCommand::from_status(on) - GlobalCommand::TE,
            GlobalCommand::QIE
        );
        // Bit positions (§11.4.4/§11.4.5).
        assert_eq!(GlobalCommand::TE.bits(), 0x8000_0000);
        assert_eq!(GlobalCommand::SRTP.bits(), 0x4000_0000);
        assert_eq!(GlobalCommand::QIE.bits(), 0x0400_0000);
        assert_eq!(GlobalCommand::IRE.bits(), 0x0200_0000);
        assert_eq!(GlobalCommand::SIRTP.bits(), 0x0100_0000);
        assert_eq!(GlobalCommand::CFI.bits(), 0x0080_0000);
        assert_eq!(GlobalStatus::all().bits(), GlobalCommand::all().bits());
    }

    #[test]
    fn root_table_address_round_trips() {
        let legacy = RootTableAddress {
            address: 0x12_3456_7000,
            mode: TranslationTableMode::Legacy,
        };
        assert_eq!(legacy.encode(), 0x12_3456_7000);
        let sm = RootTableAddress {
            address: 0x8000,
            mode: TranslationTableMode::Scalable,
        };
        assert_eq!(sm.encode(), 0x8400);
        assert_eq!(RootTableAddress::decode(0x8400), sm);
        assert_eq!(
            RootTableAddress::decode(0x8800).mode,
            TranslationTableMode::Reserved
        );
        assert_eq!(
            RootTableAddress::decode(0x8c00).mode,
            TranslationTableMode::AbortDma
        );
        assert_eq!(RootTableAddress::decode(0x8fff).address, 0x8000);
    }

    #[test]
    fn invalidation_commands_match_spike_values() {
        // The spike's working sequence: CCMD = ICC | CIRG=global, IOTLB = IVT | IIRG=global.
        assert_eq!(ContextCommand::global().0, 1 << 63 | 1 << 61);
        assert_eq!(IotlbCommand::global().0, 1 << 63 | 1 << 60);
        let d = ContextCommand::device(0x1234, 0x0018, 3);
        assert_eq!(d.0, 1 << 63 | 3 << 61 | 3 << 32 | 0x18 << 16 | 0x1234);
        assert!(d.icc() && d.cirg() == 3 && d.caig() == 0);
        assert_eq!(ContextCommand(1 << 59).caig(), 1);
        assert_eq!(ContextCommand::domain(7).0, 1 << 63 | 2 << 61 | 7);
        let p = IotlbCommand::page(5).with_drain(true, true);
        assert_eq!(p.0, 1 << 63 | 3 << 60 | 1 << 49 | 1 << 48 | 5 << 32);
        assert!(p.ivt() && p.iirg() == 3 && p.iaig() == 0);
        assert_eq!(IotlbCommand(2 << 57).iaig(), 2);
        assert_eq!(IotlbCommand::domain(1).0, 1 << 63 | 2 << 60 | 1 << 32);
        assert_eq!(iva_value(0xabc_d123, 9, true), 0xabc_d000 | 1 << 6 | 9);
    }

    #[test]
    fn fault_status_fields() {
        let s = FaultStatus::from_bits_retain(0x2);
        assert_eq!(s, FaultStatus::PPF);
        assert_eq!(s.fri(), 0);
        let s = FaultStatus::from_bits_retain(0x0000_ff11);
        assert!(s.contains(FaultStatus::PFO | FaultStatus::IQE));
        assert_eq!(s.fri(), 0xff);
        for (i, f) in [
            FaultStatus::PFO,
            FaultStatus::PPF,
            FaultStatus::AFO,
            FaultStatus::APF,
            FaultStatus::IQE,
            FaultStatus::ICE,
            FaultStatus::ITE,
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(f.bits(), 1 << i);
            assert_eq!(f.fri(), 0);
        }
        assert!(!FaultStatus::W1C.contains(FaultStatus::PPF));
        assert_eq!(EventControl::IM.bits(), 0x8000_0000);
    }

    #[test]
    fn qemu_fault_record_decodes() {
        // The spike's edu DMA write to unmapped IOVA 0x0def0000.
        let r = FaultRecord::decode(0xdef_0000, 0x80ff_ff05_0000_0018);
        assert!(r.fault);
        assert_eq!(r.page_address(), 0xdef_0000);
        assert_eq!(r.source_id, 0x0018);
        assert_eq!(r.reason, 5);
        assert_eq!(r.request, RequestType::Write);
        assert_eq!(r.address_type, AddressType::Untranslated);
        assert!(!r.pasid_present);
        assert_eq!(r.pasid(), None, "PV is junk without PP");
        assert_eq!(r.reason_class(), FaultClass::LegacyDma);
        assert_eq!(r.reason_name(), "write to a page without write permission");
        assert_eq!(
            r.to_string(),
            "FR=0x05 (write to a page without write permission) SID=00:03.0 write addr=0xdef0000"
        );
    }

    #[test]
    fn fault_record_every_bit_maps_to_one_field() {
        let hi: &[Field<FaultRecord>] = &[
            ("SID", 0, 16, |r| r.source_id as u64),
            ("T2", 28, 1, |r| (r.request.raw() >> 1) as u64),
            ("PRIV", 29, 1, |r| r.privileged as u64),
            ("EXE", 30, 1, |r| r.execute as u64),
            ("PP", 31, 1, |r| r.pasid_present as u64),
            ("FR", 32, 8, |r| r.reason as u64),
            ("PV", 40, 20, |r| r.pasid_value as u64),
            ("AT", 60, 2, |r| r.address_type as u64),
            ("T1", 62, 1, |r| (r.request.raw() & 1) as u64),
            ("F", 63, 1, |r| r.fault as u64),
        ];
        check_single_bits("FRCD.hi", 64, |v| FaultRecord::decode(0, v), hi);
        let lo: &[Field<FaultRecord>] = &[("FI", 12, 52, |r| r.fault_info >> 12)];
        check_single_bits("FRCD.lo", 64, |v| FaultRecord::decode(v, 0), lo);
    }

    #[test]
    fn fault_record_scalable_and_interrupt_forms() {
        // Page request (T2=1, T1=0) with PASID 0x42, PRIV and EXE, translated, FR 0x59.
        let hi = 1 << 63
            | 2 << 60
            | 0x42 << 40
            | 0x59 << 32
            | 1 << 31
            | 1 << 30
            | 1 << 29
            | 1 << 28
            | 0x0108;
        let r = FaultRecord::decode(0x7fff_f000, hi);
        assert_eq!(r.request, RequestType::PageRequest);
        assert_eq!(r.pasid(), Some(0x42));
        assert_eq!(r.reason_class(), FaultClass::ScalableDma);
        assert_eq!(
            r.to_string(),
            "FR=0x59 (SM: PASID table entry not present) SID=01:01.0 page-request addr=0x7ffff000 \
             AT=translated PASID=0x42 PRIV EXE"
        );
        // Read: T1 only.
        assert_eq!(FaultRecord::decode(0, 1 << 62).request, RequestType::Read);
        assert_eq!(
            FaultRecord::decode(0, 1 << 62 | 1 << 28).request,
            RequestType::Reserved
        );
        // Interrupt-remapping fault: FI 63:48 is the interrupt index.
        let ir = FaultRecord::decode(0x0123 << 48, 1 << 63 | 0x22 << 32 | 0xf8);
        assert_eq!(ir.interrupt_index(), 0x123);
        assert_eq!(ir.reason_class(), FaultClass::InterruptRemapping);
        assert_eq!(
            ir.to_string(),
            "FR=0x22 (interrupt remapping entry not present) SID=00:1f.0 index=0x123"
        );
        assert!(
            FaultRecord::decode(0, 0)
                .to_string()
                .starts_with("(no fault) FR=0x00 (unknown)")
        );
    }

    #[test]
    fn fault_reason_tables() {
        let mut seen: Vec<&str> = Vec::new();
        for fr in 0..=255u8 {
            let name = fault_reason_name(fr);
            let class = fault_reason_class(fr);
            if name == "unknown" {
                assert_eq!(class, FaultClass::Unknown, "{fr:#x}");
                continue;
            }
            assert!(!seen.contains(&name), "duplicate name {name}");
            seen.push(name);
            match fr {
                0x01..=0x0d => assert_eq!(class, FaultClass::LegacyDma),
                0x20..=0x26 => assert_eq!(class, FaultClass::InterruptRemapping),
                0x30..=0x90 => {
                    assert_eq!(class, FaultClass::ScalableDma);
                    assert!(name.starts_with("SM: "), "{fr:#x}");
                }
                _ => panic!("unexpected named code {fr:#x}"),
            }
        }
        // Every legacy and interrupt-remapping code has a name; the gaps stay unknown.
        assert!((0x01..=0x0d).all(|fr| fault_reason_name(fr) != "unknown"));
        assert!((0x20..=0x26).all(|fr| fault_reason_name(fr) != "unknown"));
        for fr in [
            0x00, 0x0e, 0x1f, 0x27, 0x33, 0x49, 0x53, 0x5e, 0x7d, 0x88, 0x91, 0xff,
        ] {
            assert_eq!(fault_reason_name(fr), "unknown", "{fr:#x}");
        }
        assert_eq!(
            fault_reason_name(0x31),
            "SM: legacy TTM for a request with PASID"
        );
        assert_eq!(
            fault_reason_name(0x85),
            "SM: write request without write permission"
        );
    }

    #[test]
    fn queue_and_irt_registers() {
        let iqa = InvQueueAddress {
            base: 0x10_0000,
            wide_descriptors: false,
            qs: 0,
        };
        assert_eq!(iqa.encode(), 0x10_0000);
        assert_eq!((iqa.bytes(), iqa.entries()), (4096, 256));
        let wide = InvQueueAddress {
            base: 0x20_0000,
            wide_descriptors: true,
            qs: 2,
        };
        assert_eq!(wide.encode(), 0x20_0000 | 1 << 11 | 2);
        assert_eq!(InvQueueAddress::decode(wide.encode()), wide);
        assert_eq!((wide.bytes(), wide.entries()), (16384, 512));
        assert_eq!(iq_pointer(3, false), 0x30);
        assert_eq!(iq_pointer(3, true), 0x60);
        assert_eq!(iq_index(0x30, false), 3);
        assert_eq!(iq_index(0x60, true), 3);
        assert_eq!(iq_index(0xffff_ffff_fff8_000f, false), 0, "only bits 18:4");

        let irta = IrtAddress {
            base: 0x30_0000,
            x2apic: true,
            size: 7,
        };
        assert_eq!(irta.encode(), 0x30_0000 | 1 << 11 | 7);
        assert_eq!(IrtAddress::decode(irta.encode()), irta);
        assert_eq!(irta.entries(), 256);
        assert_eq!(
            IrtAddress {
                base: 0,
                x2apic: false,
                size: 15
            }
            .entries(),
            65536
        );

        let e = InvQueueError(0xaaaa_bbbb_0000_0003);
        assert_eq!((e.iqei(), e.itesid(), e.icesid()), (3, 0xbbbb, 0xaaaa));
    }

    #[test]
    fn register_map_is_sorted_aligned_and_disjoint() {
        for r in REGISTERS {
            assert_eq!(r.offset % r.width.bytes(), 0, "{} misaligned", r.name);
        }
        for w in REGISTERS.windows(2) {
            assert!(
                w[0].offset + w[0].width.bytes() <= w[1].offset,
                "{} overlaps {}",
                w[0].name,
                w[1].name
            );
        }
        let find = |n: &str| REGISTERS.iter().find(|r| r.name == n).unwrap();
        assert_eq!(
            (find("GCMD").offset, find("GCMD").width),
            (0x18, Width::W32)
        );
        assert_eq!((find("IQA").offset, find("IRTA").offset), (0x90, 0xb8));
        assert_eq!((find("ICS").offset, find("FSTS").offset), (0x9c, 0x34));
        // QEMU's IOTLB block (0xf0..0x100) and fault records (0x220..) hit no fixed register.
        let cap = Capability(QEMU_CAP);
        let ecap = ExtCapability(QEMU_ECAP_TCG);
        let blocks = [
            (ecap.iro(), 16),
            (cap.fro(), offset::FRCD_STRIDE * cap.nfr() as usize),
        ];
        for (start, len) in blocks {
            for r in REGISTERS {
                let disjoint = r.offset + r.width.bytes() <= start || start + len <= r.offset;
                assert!(disjoint, "{} inside block {start:#x}+{len:#x}", r.name);
            }
        }
        assert_eq!(offset::mtrr_physbase(0), 0x180);
        assert_eq!(offset::mtrr_physmask(9), 0x218);
        assert_eq!(
            REGISTERS
                .iter()
                .filter(|r| r.name.starts_with("MTRR_PHYS"))
                .count(),
            20
        );
    }

    /// A VT-d register file holding VER/CAP/ECAP; counts accesses.
    struct FakeVtd {
        reads: Cell<u32>,
    }

    impl Mmio for FakeVtd {
        fn read32(&self, offset: usize) -> u32 {
            self.reads.set(self.reads.get() + 1);
            assert_eq!(offset, offset::VER, "32-bit read only of VER");
            0x10
        }
        fn write32(&self, _: usize, _: u32) {
            panic!("probe must not write");
        }
        fn read64(&self, offset: usize) -> u64 {
            self.reads.set(self.reads.get() + 1);
            match offset {
                offset::CAP => QEMU_CAP,
                offset::ECAP => QEMU_ECAP_TCG,
                _ => panic!("unexpected 64-bit read at {offset:#x}"),
            }
        }
        fn write64(&self, _: usize, _: u64) {
            panic!("probe must not write");
        }
    }

    #[test]
    fn id_regs_read_and_report() {
        let fake = FakeVtd {
            reads: Cell::new(0),
        };
        let ids = VtdIdRegs::read(&fake);
        assert_eq!(fake.reads.get(), 3);
        let dynamic: &dyn Mmio = &fake;
        assert_eq!(VtdIdRegs::read(dynamic), ids);
        assert_eq!(ids.version, Version { major: 1, minor: 0 });
        let report = format!("{ids}");
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "VER 1.0");
        assert!(lines[1].starts_with("CAP 0x00d2008c222f0606 SAGAW=3,4-level MGAW=48 ND=65536"));
        assert!(lines[2].starts_with("ECAP 0x0000000000f00f4a QI IR EIM=no PT"));
    }

    /// An address with no unit behind it: every read returns `fill` (all-ones where nothing
    /// decodes on a PCI-style fabric, zero for QEMU's unassigned memory). Writes are a bug.
    struct Floating {
        ver: u32,
        cap: u64,
        ecap: u64,
    }

    impl Mmio for Floating {
        fn read32(&self, _: usize) -> u32 {
            self.ver
        }
        fn write32(&self, offset: usize, _: u32) {
            panic!("probe wrote {offset:#x}");
        }
        fn read64(&self, offset: usize) -> u64 {
            if offset == offset::CAP {
                self.cap
            } else {
                self.ecap
            }
        }
        fn write64(&self, offset: usize, _: u64) {
            panic!("probe wrote {offset:#x}");
        }
    }

    #[test]
    fn probe_refuses_addresses_where_no_unit_answers() {
        let probe = |ver, cap, ecap| VtdIdRegs::probe(&Floating { ver, cap, ecap });
        assert_eq!(
            probe(u32::MAX, u64::MAX, u64::MAX),
            Err("VER/CAP/ECAP read all-ones")
        );
        assert_eq!(probe(0, 0, 0), Err("VER/CAP/ECAP read zero"));
        // VER_REG bits 31:8 are reserved (§11.4.1); major version 0 does not exist.
        assert_eq!(
            probe(0x110, QEMU_CAP, QEMU_ECAP_TCG),
            Err("VER reserved bits 31:8 set")
        );
        assert_eq!(
            probe(0x01, QEMU_CAP, QEMU_ECAP_TCG),
            Err("VER major version 0")
        );
        assert_eq!(
            probe(0x10, 0, QEMU_ECAP_TCG),
            Err("CAP reads zero or all-ones")
        );
        assert_eq!(probe(0x10, QEMU_CAP, u64::MAX), Err("ECAP reads all-ones"));
        // QEMU's unit (VER 1.0) and a VT-d 4.x one (VER 7.0 = 0x70) are accepted; ECAP may be 0
        // on a minimal unit.
        let ok = probe(0x10, QEMU_CAP, QEMU_ECAP_TCG).unwrap();
        assert_eq!(ok.version, Version { major: 1, minor: 0 });
        assert_eq!(ok.cap, Capability(QEMU_CAP));
        assert!(probe(0x70, QEMU_CAP, 0).is_ok());
    }
}

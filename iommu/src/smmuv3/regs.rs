//! Arm SMMUv3 registers: the register map, access rules, and typed decoders and encoders.
//!
//! Written from the Arm System Memory Management Unit Architecture Specification, SMMU
//! architecture version 3 (Arm IHI 0070), §6.2 (register access) and §6.3 (register
//! descriptions); each type cites the subsection of its register.
//!
//! # Access rules (§6.2)
//!
//! - **32-bit registers must be accessed with 32-bit loads and stores.** QEMU, for one, returns
//!   0 for a 64-bit read of the IDR0/IDR1 pair. [`SmmuIdRegs::read`] uses 32-bit reads only.
//! - 64-bit registers (the `*_BASE` and `*_IRQ_CFG0` registers and the GATOS registers) may be
//!   accessed with one 64-bit access, or as two 32-bit halves ([`read64_split`],
//!   [`write64_split`]); a split access is not single-copy atomic.
//! - The SMMU occupies at least two 64 KiB pages. Page 1 ([`offset::PAGE1`]) holds the
//!   producer/consumer index registers that software or the SMMU update at run time:
//!   EVENTQ_PROD/CONS at 0x100a8/0x100ac and PRIQ_PROD/CONS at 0x100c8/0x100cc. Their page 0
//!   offsets are reserved; always use the page 1 offsets from [`offset`].

use core::fmt;

use crate::hw::Mmio;
use crate::regmap::{Items, reg};
pub use crate::regmap::{RegInfo, Width};

/// Register offsets from the SMMU base (IHI 0070 §6.1 memory map, §6.3).
pub mod offset {
    /// Start of register page 1.
    pub const PAGE1: usize = 0x1_0000;

    /// ID register 0 (32-bit, §6.3.1).
    pub const IDR0: usize = 0x00;
    /// ID register 1 (32-bit, §6.3.2).
    pub const IDR1: usize = 0x04;
    /// ID register 2 (32-bit, §6.3.3).
    pub const IDR2: usize = 0x08;
    /// ID register 3 (32-bit, §6.3.4).
    pub const IDR3: usize = 0x0c;
    /// ID register 4, implementation defined (32-bit, §6.3.5).
    pub const IDR4: usize = 0x10;
    /// ID register 5 (32-bit, §6.3.6).
    pub const IDR5: usize = 0x14;
    /// Implementation id (32-bit, §6.3.7).
    pub const IIDR: usize = 0x18;
    /// Architecture id (32-bit, §6.3.8).
    pub const AIDR: usize = 0x1c;
    /// Control 0 (32-bit, §6.3.9).
    pub const CR0: usize = 0x20;
    /// Control 0 acknowledge (32-bit, §6.3.10).
    pub const CR0ACK: usize = 0x24;
    /// Control 1: table/queue memory attributes (32-bit, §6.3.11).
    pub const CR1: usize = 0x28;
    /// Control 2 (32-bit, §6.3.12).
    pub const CR2: usize = 0x2c;
    /// Status (32-bit, §6.3.13).
    pub const STATUSR: usize = 0x40;
    /// Global bypass attributes (32-bit, §6.3.14).
    pub const GBPA: usize = 0x44;
    /// Auxiliary global bypass attributes, implementation defined (32-bit, §6.3.15).
    pub const AGBPA: usize = 0x48;
    /// Interrupt enables (32-bit).
    pub const IRQ_CTRL: usize = 0x50;
    /// Interrupt enables acknowledge (32-bit).
    pub const IRQ_CTRLACK: usize = 0x54;
    /// Global errors (32-bit, §6.3.19).
    pub const GERROR: usize = 0x60;
    /// Global errors acknowledge (32-bit).
    pub const GERRORN: usize = 0x64;
    /// GERROR MSI address (64-bit).
    pub const GERROR_IRQ_CFG0: usize = 0x68;
    /// GERROR MSI data (32-bit).
    pub const GERROR_IRQ_CFG1: usize = 0x70;
    /// GERROR MSI attributes (32-bit).
    pub const GERROR_IRQ_CFG2: usize = 0x74;
    /// Stream table base (64-bit).
    pub const STRTAB_BASE: usize = 0x80;
    /// Stream table configuration (32-bit).
    pub const STRTAB_BASE_CFG: usize = 0x88;
    /// Command queue base (64-bit).
    pub const CMDQ_BASE: usize = 0x90;
    /// Command queue producer index (32-bit).
    pub const CMDQ_PROD: usize = 0x98;
    /// Command queue consumer index and error (32-bit).
    pub const CMDQ_CONS: usize = 0x9c;
    /// Event queue base (64-bit).
    pub const EVENTQ_BASE: usize = 0xa0;
    /// Event queue producer index (32-bit), **page 1**.
    pub const EVENTQ_PROD: usize = PAGE1 + 0xa8;
    /// Event queue consumer index (32-bit), **page 1**.
    pub const EVENTQ_CONS: usize = PAGE1 + 0xac;
    /// Event queue MSI address (64-bit).
    pub const EVENTQ_IRQ_CFG0: usize = 0xb0;
    /// Event queue MSI data (32-bit).
    pub const EVENTQ_IRQ_CFG1: usize = 0xb8;
    /// Event queue MSI attributes (32-bit).
    pub const EVENTQ_IRQ_CFG2: usize = 0xbc;
    /// PRI queue base (64-bit).
    pub const PRIQ_BASE: usize = 0xc0;
    /// PRI queue producer index (32-bit), **page 1**.
    pub const PRIQ_PROD: usize = PAGE1 + 0xc8;
    /// PRI queue consumer index (32-bit), **page 1**.
    pub const PRIQ_CONS: usize = PAGE1 + 0xcc;
    /// PRI queue MSI address (64-bit).
    pub const PRIQ_IRQ_CFG0: usize = 0xd0;
    /// PRI queue MSI data (32-bit).
    pub const PRIQ_IRQ_CFG1: usize = 0xd8;
    /// PRI queue MSI attributes (32-bit).
    pub const PRIQ_IRQ_CFG2: usize = 0xdc;
    /// Global ATOS control (32-bit).
    pub const GATOS_CTRL: usize = 0x100;
    /// Global ATOS stream id (64-bit).
    pub const GATOS_SID: usize = 0x108;
    /// Global ATOS address (64-bit).
    pub const GATOS_ADDR: usize = 0x110;
    /// Global ATOS result (64-bit).
    pub const GATOS_PAR: usize = 0x118;
    /// MPAM id (32-bit; present when IDR3.MPAM).
    pub const MPAMIDR: usize = 0x130;
    /// MPAM for SMMU-originated accesses (32-bit).
    pub const GMPAM: usize = 0x138;
    /// MPAM for global bypass (32-bit).
    pub const GBPMPAM: usize = 0x13c;
    /// VATOS selection (32-bit).
    pub const VATOS_SEL: usize = 0x180;
    /// ID register 6: ECMDQ layout (32-bit; present when IDR1.ECMDQ).
    pub const IDR6: usize = 0x190;
}

/// The Non-secure registers in offset order (IHI 0070 §6.3), page 0 then page 1.
pub const REGISTERS: &[RegInfo] = {
    use Width::{W32, W64};
    use offset::*;
    &[
        reg("IDR0", IDR0, W32),
        reg("IDR1", IDR1, W32),
        reg("IDR2", IDR2, W32),
        reg("IDR3", IDR3, W32),
        reg("IDR4", IDR4, W32),
        reg("IDR5", IDR5, W32),
        reg("IIDR", IIDR, W32),
        reg("AIDR", AIDR, W32),
        reg("CR0", CR0, W32),
        reg("CR0ACK", CR0ACK, W32),
        reg("CR1", CR1, W32),
        reg("CR2", CR2, W32),
        reg("STATUSR", STATUSR, W32),
        reg("GBPA", GBPA, W32),
        reg("AGBPA", AGBPA, W32),
        reg("IRQ_CTRL", IRQ_CTRL, W32),
        reg("IRQ_CTRLACK", IRQ_CTRLACK, W32),
        reg("GERROR", GERROR, W32),
        reg("GERRORN", GERRORN, W32),
        reg("GERROR_IRQ_CFG0", GERROR_IRQ_CFG0, W64),
        reg("GERROR_IRQ_CFG1", GERROR_IRQ_CFG1, W32),
        reg("GERROR_IRQ_CFG2", GERROR_IRQ_CFG2, W32),
        reg("STRTAB_BASE", STRTAB_BASE, W64),
        reg("STRTAB_BASE_CFG", STRTAB_BASE_CFG, W32),
        reg("CMDQ_BASE", CMDQ_BASE, W64),
        reg("CMDQ_PROD", CMDQ_PROD, W32),
        reg("CMDQ_CONS", CMDQ_CONS, W32),
        reg("EVENTQ_BASE", EVENTQ_BASE, W64),
        reg("EVENTQ_IRQ_CFG0", EVENTQ_IRQ_CFG0, W64),
        reg("EVENTQ_IRQ_CFG1", EVENTQ_IRQ_CFG1, W32),
        reg("EVENTQ_IRQ_CFG2", EVENTQ_IRQ_CFG2, W32),
        reg("PRIQ_BASE", PRIQ_BASE, W64),
        reg("PRIQ_IRQ_CFG0", PRIQ_IRQ_CFG0, W64),
        reg("PRIQ_IRQ_CFG1", PRIQ_IRQ_CFG1, W32),
        reg("PRIQ_IRQ_CFG2", PRIQ_IRQ_CFG2, W32),
        reg("GATOS_CTRL", GATOS_CTRL, W32),
        reg("GATOS_SID", GATOS_SID, W64),
        reg("GATOS_ADDR", GATOS_ADDR, W64),
        reg("GATOS_PAR", GATOS_PAR, W64),
        reg("MPAMIDR", MPAMIDR, W32),
        reg("GMPAM", GMPAM, W32),
        reg("GBPMPAM", GBPMPAM, W32),
        reg("VATOS_SEL", VATOS_SEL, W32),
        reg("IDR6", IDR6, W32),
        reg("EVENTQ_PROD", EVENTQ_PROD, W32),
        reg("EVENTQ_CONS", EVENTQ_CONS, W32),
        reg("PRIQ_PROD", PRIQ_PROD, W32),
        reg("PRIQ_CONS", PRIQ_CONS, W32),
    ]
};

/// Reads a 64-bit register as two 32-bit halves, low word first (§6.2). Not single-copy
/// atomic: use only for registers that do not change under the reader.
pub fn read64_split<M: Mmio + ?Sized>(mmio: &M, offset: usize) -> u64 {
    let lo = mmio.read32(offset) as u64;
    let hi = mmio.read32(offset + 4) as u64;
    hi << 32 | lo
}

/// Writes a 64-bit register as two 32-bit halves, low word first (§6.2).
pub fn write64_split<M: Mmio + ?Sized>(mmio: &M, offset: usize, value: u64) {
    mmio.write32(offset, value as u32);
    mmio.write32(offset + 4, (value >> 32) as u32);
}

const fn bit(v: u32, n: u32) -> bool {
    (v >> n) & 1 != 0
}

const fn bits(v: u32, lo: u32, width: u32) -> u32 {
    (v >> lo) & ((1u32 << width) - 1)
}

// ---------------------------------------------------------------------------------------------
// ID registers
// ---------------------------------------------------------------------------------------------

/// Translation table formats, IDR0.TTF (§6.3.1 bits 3:2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableFormat {
    /// 00b.
    Reserved = 0,
    /// 01b: VMSAv8-32 LPAE only.
    AArch32 = 1,
    /// 10b: VMSAv8-64 only.
    AArch64 = 2,
    /// 11b: both.
    Both = 3,
}

impl TableFormat {
    pub const fn name(self) -> &'static str {
        match self {
            TableFormat::Reserved => "reserved",
            TableFormat::AArch32 => "AArch32",
            TableFormat::AArch64 => "AArch64",
            TableFormat::Both => "AArch32+AArch64",
        }
    }
}

/// Hardware translation table updates, IDR0.HTTU (§6.3.1 bits 7:6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Httu {
    /// 00b: no hardware flag updates.
    None = 0,
    /// 01b: access flag.
    Access = 1,
    /// 10b: access flag and dirty state.
    AccessDirty = 2,
    /// 11b: access flag and dirty state, plus access flag for table descriptors.
    AccessDirtyTable = 3,
}

impl Httu {
    pub const fn name(self) -> &'static str {
        match self {
            Httu::None => "none",
            Httu::Access => "A",
            Httu::AccessDirty => "A+D",
            Httu::AccessDirtyTable => "A+D+tableA",
        }
    }
}

/// Translation table walk endianness, IDR0.TTENDIAN (§6.3.1 bits 22:21).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtEndian {
    /// 00b: either endianness.
    Mixed = 0,
    /// 01b.
    Reserved = 1,
    /// 10b: little-endian only.
    Little = 2,
    /// 11b: big-endian only.
    Big = 3,
}

impl TtEndian {
    pub const fn name(self) -> &'static str {
        match self {
            TtEndian::Mixed => "mixed",
            TtEndian::Reserved => "reserved",
            TtEndian::Little => "LE",
            TtEndian::Big => "BE",
        }
    }
}

/// Stall model, IDR0.STALL_MODEL (§6.3.1 bits 25:24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallModel {
    /// 00b: stall and terminate both supported.
    StallAndTerminate = 0,
    /// 01b: no stall; faults terminate (STE.S2S and CD.S must be 0).
    TerminateOnly = 1,
    /// 10b: stall forced (STE.S2S and CD.S must be 1).
    StallForced = 2,
    /// 11b.
    Reserved = 3,
}

impl StallModel {
    pub const fn name(self) -> &'static str {
        match self {
            StallModel::StallAndTerminate => "stall+terminate",
            StallModel::TerminateOnly => "terminate",
            StallModel::StallForced => "stall-forced",
            StallModel::Reserved => "reserved",
        }
    }
}

/// Stream table formats, IDR0.ST_LEVEL (§6.3.1 bits 28:27).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StLevel {
    /// 00b: linear only.
    Linear = 0,
    /// 01b: 2-level as well as linear.
    TwoLevel = 1,
    /// 10b.
    Reserved2 = 2,
    /// 11b.
    Reserved3 = 3,
}

impl StLevel {
    pub const fn name(self) -> &'static str {
        match self {
            StLevel::Linear => "linear",
            StLevel::TwoLevel => "2-level",
            StLevel::Reserved2 | StLevel::Reserved3 => "reserved",
        }
    }
}

/// SMMU_IDR0 (§6.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idr0(pub u32);

impl Idr0 {
    /// S2P, bit 0: stage 2 translation.
    pub const fn s2p(self) -> bool {
        bit(self.0, 0)
    }

    /// S1P, bit 1: stage 1 translation.
    pub const fn s1p(self) -> bool {
        bit(self.0, 1)
    }

    /// TTF, bits 3:2: translation table formats.
    pub const fn ttf(self) -> TableFormat {
        match bits(self.0, 2, 2) {
            0 => TableFormat::Reserved,
            1 => TableFormat::AArch32,
            2 => TableFormat::AArch64,
            _ => TableFormat::Both,
        }
    }

    /// COHACC, bit 4: coherent access to tables, queues and translations. When clear,
    /// structures must be non-cacheable or cleaned to the point of coherency.
    pub const fn cohacc(self) -> bool {
        bit(self.0, 4)
    }

    /// BTM, bit 5: broadcast TLB maintenance from PEs.
    pub const fn btm(self) -> bool {
        bit(self.0, 5)
    }

    /// HTTU, bits 7:6: hardware access/dirty updates.
    pub const fn httu(self) -> Httu {
        match bits(self.0, 6, 2) {
            0 => Httu::None,
            1 => Httu::Access,
            2 => Httu::AccessDirty,
            _ => Httu::AccessDirtyTable,
        }
    }

    /// DORMHINT, bit 8: STATUSR.DORMANT hint supported.
    pub const fn dormhint(self) -> bool {
        bit(self.0, 8)
    }

    /// Hyp, bit 9: EL2 stage 1 contexts (STE.STRW EL2).
    pub const fn hyp(self) -> bool {
        bit(self.0, 9)
    }

    /// ATS, bit 10: PCIe ATS.
    pub const fn ats(self) -> bool {
        bit(self.0, 10)
    }

    /// NS1ATS, bit 11: split-stage (stage 1 only) ATS **not** supported.
    pub const fn ns1ats(self) -> bool {
        bit(self.0, 11)
    }

    /// ASID16, bit 12: 16-bit ASIDs.
    pub const fn asid16(self) -> bool {
        bit(self.0, 12)
    }

    /// MSI, bit 13: message-signalled interrupts (else wired only).
    pub const fn msi(self) -> bool {
        bit(self.0, 13)
    }

    /// SEV, bit 14: WFE wake-up events to PEs.
    pub const fn sev(self) -> bool {
        bit(self.0, 14)
    }

    /// ATOS, bit 15: address translation operations.
    pub const fn atos(self) -> bool {
        bit(self.0, 15)
    }

    /// PRI, bit 16: PCIe page request interface.
    pub const fn pri(self) -> bool {
        bit(self.0, 16)
    }

    /// VMW, bit 17: VMID wildcard matching for TLB invalidation (CR0.VMW).
    pub const fn vmw(self) -> bool {
        bit(self.0, 17)
    }

    /// VMID16, bit 18: 16-bit VMIDs.
    pub const fn vmid16(self) -> bool {
        bit(self.0, 18)
    }

    /// CD2L, bit 19: 2-level context descriptor tables.
    pub const fn cd2l(self) -> bool {
        bit(self.0, 19)
    }

    /// VATOS, bit 20: virtual ATOS page.
    pub const fn vatos(self) -> bool {
        bit(self.0, 20)
    }

    /// TTENDIAN, bits 22:21: table walk endianness.
    pub const fn ttendian(self) -> TtEndian {
        match bits(self.0, 21, 2) {
            0 => TtEndian::Mixed,
            1 => TtEndian::Reserved,
            2 => TtEndian::Little,
            _ => TtEndian::Big,
        }
    }

    /// ATSRECERR, bit 23: extra events recorded for ATS/PRI configuration errors.
    pub const fn atsrecerr(self) -> bool {
        bit(self.0, 23)
    }

    /// STALL_MODEL, bits 25:24.
    pub const fn stall_model(self) -> StallModel {
        match bits(self.0, 24, 2) {
            0 => StallModel::StallAndTerminate,
            1 => StallModel::TerminateOnly,
            2 => StallModel::StallForced,
            _ => StallModel::Reserved,
        }
    }

    /// TERM_MODEL, bit 26: terminated transactions always abort (CD.A must be 1); when
    /// clear, CD.A selects abort or RAZ/WI.
    pub const fn term_model(self) -> bool {
        bit(self.0, 26)
    }

    /// ST_LEVEL, bits 28:27: stream table formats.
    pub const fn st_level(self) -> StLevel {
        match bits(self.0, 27, 2) {
            0 => StLevel::Linear,
            1 => StLevel::TwoLevel,
            2 => StLevel::Reserved2,
            _ => StLevel::Reserved3,
        }
    }

    /// RME_IMPL, bit 30: Realm Management Extension features.
    pub const fn rme_impl(self) -> bool {
        bit(self.0, 30)
    }
}

/// SMMU_IDR1 (§6.3.2). Queue and id sizes are log2 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idr1(pub u32);

impl Idr1 {
    /// SIDSIZE, bits 5:0: StreamID width in bits (0..=32).
    pub const fn sidsize(self) -> u8 {
        bits(self.0, 0, 6) as u8
    }

    /// SSIDSIZE, bits 10:6: SubstreamID (PASID) width in bits; 0 = no substreams.
    pub const fn ssidsize(self) -> u8 {
        bits(self.0, 6, 5) as u8
    }

    /// PRIQS, bits 15:11: log2 of the maximum PRI queue entries.
    pub const fn priqs(self) -> u8 {
        bits(self.0, 11, 5) as u8
    }

    /// EVENTQS, bits 20:16: log2 of the maximum event queue entries (≤ 19).
    pub const fn eventqs(self) -> u8 {
        bits(self.0, 16, 5) as u8
    }

    /// CMDQS, bits 25:21: log2 of the maximum command queue entries (≤ 19).
    pub const fn cmdqs(self) -> u8 {
        bits(self.0, 21, 5) as u8
    }

    /// ATTR_PERMS_OVR, bit 26: incoming permission attributes can be overridden.
    pub const fn attr_perms_ovr(self) -> bool {
        bit(self.0, 26)
    }

    /// ATTR_TYPES_OVR, bit 27: incoming memory type/shareability can be overridden.
    pub const fn attr_types_ovr(self) -> bool {
        bit(self.0, 27)
    }

    /// REL, bit 28: preset base registers hold offsets from the SMMU base.
    pub const fn rel(self) -> bool {
        bit(self.0, 28)
    }

    /// QUEUES_PRESET, bit 29: queue base registers are fixed.
    pub const fn queues_preset(self) -> bool {
        bit(self.0, 29)
    }

    /// TABLES_PRESET, bit 30: stream table base registers are fixed.
    pub const fn tables_preset(self) -> bool {
        bit(self.0, 30)
    }

    /// ECMDQ, bit 31: enhanced command queue interfaces (see IDR6).
    pub const fn ecmdq(self) -> bool {
        bit(self.0, 31)
    }
}

/// SMMU_IDR2 (§6.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idr2(pub u32);

impl Idr2 {
    /// BA_VATOS, bits 9:0: VATOS page offset in 64 KiB units from SMMU base + 0x20000.
    pub const fn ba_vatos(self) -> u16 {
        bits(self.0, 0, 10) as u16
    }

    /// Byte offset of the VATOS page from the SMMU base (valid when IDR0.VATOS).
    pub const fn vatos_page_offset(self) -> usize {
        0x2_0000 + self.ba_vatos() as usize * 0x1_0000
    }
}

/// SMMU_IDR3 (§6.3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idr3(pub u32);

impl Idr3 {
    /// HAD, bit 2: hierarchical attribute disables (CD.HAD0/1).
    pub const fn had(self) -> bool {
        bit(self.0, 2)
    }

    /// PBHA, bit 3: page-based hardware attributes.
    pub const fn pbha(self) -> bool {
        bit(self.0, 3)
    }

    /// XNX, bit 4: EL0/EL1 execute-never distinction at stage 2.
    pub const fn xnx(self) -> bool {
        bit(self.0, 4)
    }

    /// PPS, bit 5: PRI auto-responses use the request's PASID regardless of STE.PPAR.
    pub const fn pps(self) -> bool {
        bit(self.0, 5)
    }

    /// MPAM, bit 7: memory partitioning and monitoring.
    pub const fn mpam(self) -> bool {
        bit(self.0, 7)
    }

    /// FWB, bit 8: stage 2 control of memory types (STE.S2FWB).
    pub const fn fwb(self) -> bool {
        bit(self.0, 8)
    }

    /// STT, bit 9: small translation tables.
    pub const fn stt(self) -> bool {
        bit(self.0, 9)
    }

    /// RIL, bit 10: range-based invalidation and level hints in TLBI commands.
    pub const fn ril(self) -> bool {
        bit(self.0, 10)
    }

    /// BBML, bits 12:11: break-before-make level (0, 1 or 2).
    pub const fn bbml(self) -> u8 {
        bits(self.0, 11, 2) as u8
    }

    /// E0PD, bit 13: CD.E0PD0/1 supported.
    pub const fn e0pd(self) -> bool {
        bit(self.0, 13)
    }

    /// PTWNNC, bit 14: with STE.S2PTW=0, Device-memory stage 1 walks are treated as Normal-NC.
    pub const fn ptwnnc(self) -> bool {
        bit(self.0, 14)
    }

    /// DPT, bit 15: device permission table.
    pub const fn dpt(self) -> bool {
        bit(self.0, 15)
    }

    /// PASIDTT, bit 16: PASID on ATS translated transactions.
    pub const fn pasidtt(self) -> bool {
        bit(self.0, 16)
    }

    /// EPAN, bit 17: enhanced PAN.
    pub const fn epan(self) -> bool {
        bit(self.0, 17)
    }

    /// S1PI, bit 18: stage 1 permission indirections.
    pub const fn s1pi(self) -> bool {
        bit(self.0, 18)
    }

    /// S2PI, bit 19: stage 2 permission indirections.
    pub const fn s2pi(self) -> bool {
        bit(self.0, 19)
    }

    /// S2PO, bit 20: stage 2 permission overlays.
    pub const fn s2po(self) -> bool {
        bit(self.0, 20)
    }

    /// THE, bit 21: translation hardening extension.
    pub const fn the(self) -> bool {
        bit(self.0, 21)
    }

    /// MTEPERM, bit 22: stage 2 NoTagAccess encodings.
    pub const fn mteperm(self) -> bool {
        bit(self.0, 22)
    }

    /// AIE, bit 23: stage 1 attribute index extension.
    pub const fn aie(self) -> bool {
        bit(self.0, 23)
    }
}

/// SMMU_IDR4 (§6.3.5): implementation defined; kept raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idr4(pub u32);

/// SMMU_IDR5 (§6.3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idr5(pub u32);

impl Idr5 {
    /// OAS, bits 2:0: raw output address size encoding.
    pub const fn oas_raw(self) -> u8 {
        bits(self.0, 0, 3) as u8
    }

    /// Output (physical) address size in bits: 32, 36, 40, 42, 44, 48, 52 or 56.
    pub const fn oas_bits(self) -> u8 {
        match self.oas_raw() {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            6 => 52,
            _ => 56,
        }
    }

    /// GRAN4K, bit 4: 4 KiB translation granule.
    pub const fn gran4k(self) -> bool {
        bit(self.0, 4)
    }

    /// GRAN16K, bit 5: 16 KiB translation granule.
    pub const fn gran16k(self) -> bool {
        bit(self.0, 5)
    }

    /// GRAN64K, bit 6: 64 KiB translation granule.
    pub const fn gran64k(self) -> bool {
        bit(self.0, 6)
    }

    /// DS, bit 7: 52-bit addresses with 4 KiB/16 KiB granules (LPA2).
    pub const fn ds(self) -> bool {
        bit(self.0, 7)
    }

    /// D128, bit 8: 128-bit translation table descriptors.
    pub const fn d128(self) -> bool {
        bit(self.0, 8)
    }

    /// VAX, bits 11:10: raw virtual address extension encoding.
    pub const fn vax_raw(self) -> u8 {
        bits(self.0, 10, 2) as u8
    }

    /// Largest stage 1 input address in bits (48, 52 or 56); `None` for the reserved 11b.
    pub const fn va_bits(self) -> Option<u8> {
        match self.vax_raw() {
            0 => Some(48),
            1 => Some(52),
            2 => Some(56),
            _ => None,
        }
    }

    /// STALL_MAX, bits 31:16: maximum outstanding stalled transactions.
    pub const fn stall_max(self) -> u16 {
        bits(self.0, 16, 16) as u16
    }
}

/// SMMU_IIDR (§6.3.7): implementer and product identification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iidr(pub u32);

impl Iidr {
    /// Implementer, bits 11:0 (JEP106: bits 11:8 continuation code, 6:0 identity code).
    pub const fn implementer(self) -> u16 {
        bits(self.0, 0, 12) as u16
    }

    /// Revision, bits 15:12.
    pub const fn revision(self) -> u8 {
        bits(self.0, 12, 4) as u8
    }

    /// Variant, bits 19:16.
    pub const fn variant(self) -> u8 {
        bits(self.0, 16, 4) as u8
    }

    /// ProductID, bits 31:20.
    pub const fn product_id(self) -> u16 {
        bits(self.0, 20, 12) as u16
    }
}

/// SMMU_AIDR (§6.3.8): architecture revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aidr(pub u32);

impl Aidr {
    /// ArchMajorRev, bits 7:4 (0 = SMMUv3).
    pub const fn major(self) -> u8 {
        bits(self.0, 4, 4) as u8
    }

    /// ArchMinorRev, bits 3:0 (the x in SMMUv3.x).
    pub const fn minor(self) -> u8 {
        bits(self.0, 0, 4) as u8
    }
}

impl fmt::Display for Aidr {
    /// `SMMUv3.1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.major() {
            0 => write!(f, "SMMUv3.{}", self.minor()),
            major => write!(f, "SMMU arch {major}.{}", self.minor()),
        }
    }
}

/// All identification registers, read once at probe with 32-bit accesses only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuIdRegs {
    pub idr0: Idr0,
    pub idr1: Idr1,
    pub idr2: Idr2,
    pub idr3: Idr3,
    pub idr4: Idr4,
    pub idr5: Idr5,
    pub iidr: Iidr,
    pub aidr: Aidr,
}

impl SmmuIdRegs {
    /// Reads IDR0-IDR5, IIDR and AIDR, each with one 32-bit read (§6.2).
    pub fn read<M: Mmio + ?Sized>(mmio: &M) -> Self {
        SmmuIdRegs {
            idr0: Idr0(mmio.read32(offset::IDR0)),
            idr1: Idr1(mmio.read32(offset::IDR1)),
            idr2: Idr2(mmio.read32(offset::IDR2)),
            idr3: Idr3(mmio.read32(offset::IDR3)),
            idr4: Idr4(mmio.read32(offset::IDR4)),
            idr5: Idr5(mmio.read32(offset::IDR5)),
            iidr: Iidr(mmio.read32(offset::IIDR)),
            aidr: Aidr(mmio.read32(offset::AIDR)),
        }
    }
}

impl fmt::Display for SmmuIdRegs {
    /// One line for the boot report, every IDR field:
    /// `stages=S1,S2 SIDSIZE=16 SSIDSIZE=0 CMDQS=2^19 ... v3.1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (i0, i1, i3, i5) = (self.idr0, self.idr1, self.idr3, self.idr5);
        let mut it = Items::new(f);
        let stages = match (i0.s1p(), i0.s2p()) {
            (true, true) => "S1,S2",
            (true, false) => "S1",
            (false, true) => "S2",
            (false, false) => "none",
        };
        it.val("stages", format_args!("{stages}"))?;
        it.val("SIDSIZE", format_args!("{}", i1.sidsize()))?;
        it.val("SSIDSIZE", format_args!("{}", i1.ssidsize()))?;
        it.val("CMDQS", format_args!("2^{}", i1.cmdqs()))?;
        it.val("EVENTQS", format_args!("2^{}", i1.eventqs()))?;
        it.val("PRIQS", format_args!("2^{}", i1.priqs()))?;
        it.val("OAS", format_args!("{}", i5.oas_bits()))?;
        match i5.va_bits() {
            Some(v) => it.val("VAX", format_args!("{v}"))?,
            None => it.val("VAX", format_args!("reserved"))?,
        }
        let grans = [
            (i5.gran4k(), "4K"),
            (i5.gran16k(), "16K"),
            (i5.gran64k(), "64K"),
        ];
        it.word(format_args!("gran="))?;
        let mut any = false;
        for (on, name) in grans {
            if on {
                if any {
                    it.append(",")?;
                }
                it.append(name)?;
                any = true;
            }
        }
        if !any {
            it.append("none")?;
        }
        it.flag("COHACC", i0.cohacc())?;
        it.flag("MSI", i0.msi())?;
        it.flag("ATS", i0.ats())?;
        it.flag("PRI", i0.pri())?;
        it.val("ST_LEVEL", format_args!("{}", i0.st_level().name()))?;
        it.val("TTF", format_args!("{}", i0.ttf().name()))?;
        it.flag("ASID16", i0.asid16())?;
        it.flag("VMID16", i0.vmid16())?;
        it.flag("RIL", i3.ril())?;
        it.flag("BTM", i0.btm())?;
        it.val("HTTU", format_args!("{}", i0.httu().name()))?;
        it.flag("HYP", i0.hyp())?;
        it.flag("NS1ATS", i0.ns1ats())?;
        it.flag("SEV", i0.sev())?;
        it.flag("ATOS", i0.atos())?;
        it.flag("VATOS", i0.vatos())?;
        it.flag("VMW", i0.vmw())?;
        it.flag("CD2L", i0.cd2l())?;
        it.flag("DORMHINT", i0.dormhint())?;
        it.flag("ATSRECERR", i0.atsrecerr())?;
        it.val("TTENDIAN", format_args!("{}", i0.ttendian().name()))?;
        it.val("STALL_MODEL", format_args!("{}", i0.stall_model().name()))?;
        it.val(
            "TERM_MODEL",
            format_args!("{}", if i0.term_model() { "abort" } else { "CD.A" }),
        )?;
        it.flag("RME_IMPL", i0.rme_impl())?;
        it.flag("HAD", i3.had())?;
        it.flag("PBHA", i3.pbha())?;
        it.flag("XNX", i3.xnx())?;
        it.flag("PPS", i3.pps())?;
        it.flag("MPAM", i3.mpam())?;
        it.flag("FWB", i3.fwb())?;
        it.flag("STT", i3.stt())?;
        it.val("BBML", format_args!("{}", i3.bbml()))?;
        it.flag("E0PD", i3.e0pd())?;
        it.flag("PTWNNC", i3.ptwnnc())?;
        it.flag("DPT", i3.dpt())?;
        it.flag("PASIDTT", i3.pasidtt())?;
        it.flag("EPAN", i3.epan())?;
        it.flag("S1PI", i3.s1pi())?;
        it.flag("S2PI", i3.s2pi())?;
        it.flag("S2PO", i3.s2po())?;
        it.flag("THE", i3.the())?;
        it.flag("MTEPERM", i3.mteperm())?;
        it.flag("AIE", i3.aie())?;
        it.flag("DS", i5.ds())?;
        it.flag("D128", i5.d128())?;
        it.val("STALL_MAX", format_args!("{}", i5.stall_max()))?;
        it.flag("ATTR_TYPES_OVR", i1.attr_types_ovr())?;
        it.flag("ATTR_PERMS_OVR", i1.attr_perms_ovr())?;
        it.flag("REL", i1.rel())?;
        it.flag("QUEUES_PRESET", i1.queues_preset())?;
        it.flag("TABLES_PRESET", i1.tables_preset())?;
        it.flag("ECMDQ", i1.ecmdq())?;
        if i0.vatos() {
            it.val("BA_VATOS", format_args!("{:#x}", self.idr2.ba_vatos()))?;
        }
        it.val("IDR4", format_args!("{:#x}", self.idr4.0))?;
        it.val("IIDR", format_args!("{:#010x}", self.iidr.0))?;
        match self.aidr.major() {
            0 => it.word(format_args!("v3.{}", self.aidr.minor())),
            _ => it.word(format_args!("{}", self.aidr)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Control and status
// ---------------------------------------------------------------------------------------------

bitflags::bitflags! {
    /// SMMU_CR0 and SMMU_CR0ACK (§6.3.9, §6.3.10). After writing CR0, poll CR0ACK until the
    /// changed field matches. VMW (bits 8:6) is a field: see [`Cr0::vmw`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Cr0: u32 {
        /// Non-secure SMMU enable; when clear, streams bypass per GBPA.
        const SMMUEN = 1 << 0;
        /// PRI queue writes enabled (IDR0.PRI).
        const PRIQEN = 1 << 1;
        /// Event queue writes enabled.
        const EVENTQEN = 1 << 2;
        /// Command queue processing enabled.
        const CMDQEN = 1 << 3;
        /// ATS translated traffic checked against STE.EATS (IDR0.ATS).
        const ATSCHK = 1 << 4;
        /// VMID wildcard field, bits 8:6 (IDR0.VMW).
        const VMW = 0b111 << 6;
        /// Device permission table walks enabled (IDR3.DPT).
        const DPT_WALK_EN = 1 << 10;
    }
}

impl Cr0 {
    /// VMW: invalidations ignore the low VMW bits of the VMID (0-4).
    pub const fn vmw(self) -> u8 {
        ((self.bits() >> 6) & 7) as u8
    }

    /// With VMW replaced by `vmw` (3 bits).
    pub const fn with_vmw(self, vmw: u8) -> Self {
        Self::from_bits_retain((self.bits() & !Self::VMW.bits()) | ((vmw as u32 & 7) << 6))
    }
}

/// Memory cacheability for CR1 fields (§6.3.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheability {
    NonCacheable = 0,
    WriteBack = 1,
    WriteThrough = 2,
}

/// Memory shareability for CR1 fields (§6.3.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shareability {
    NonShareable = 0,
    OuterShareable = 2,
    InnerShareable = 3,
}

/// Attributes the SMMU uses for one class of its own accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessAttrs {
    pub inner: Cacheability,
    pub outer: Cacheability,
    pub share: Shareability,
}

impl AccessAttrs {
    /// Inner/outer write-back, inner shareable: the choice when IDR0.COHACC.
    pub const COHERENT: Self = AccessAttrs {
        inner: Cacheability::WriteBack,
        outer: Cacheability::WriteBack,
        share: Shareability::InnerShareable,
    };
    /// Non-cacheable, for a non-coherent SMMU.
    pub const NON_CACHEABLE: Self = AccessAttrs {
        inner: Cacheability::NonCacheable,
        outer: Cacheability::NonCacheable,
        share: Shareability::OuterShareable,
    };
}

/// SMMU_CR1 value (§6.3.11): QUEUE_IC 1:0, QUEUE_OC 3:2, QUEUE_SH 5:4, TABLE_IC 7:6,
/// TABLE_OC 9:8, TABLE_SH 11:10. `tables` covers stream table and CD fetches, `queues` the
/// command/event/PRI queues. Write only while CR0.SMMUEN and the queue enables are 0.
pub const fn cr1_value(tables: AccessAttrs, queues: AccessAttrs) -> u32 {
    (queues.inner as u32)
        | (queues.outer as u32) << 2
        | (queues.share as u32) << 4
        | (tables.inner as u32) << 6
        | (tables.outer as u32) << 8
        | (tables.share as u32) << 10
}

bitflags::bitflags! {
    /// SMMU_CR2 (§6.3.12).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Cr2: u32 {
        /// EL2-E2H translation regime for EL2 stage 1 contexts.
        const E2H = 1 << 0;
        /// Record C_BAD_STREAMID events for out-of-range StreamIDs.
        const RECINVSID = 1 << 1;
        /// Private TLB maintenance: ignore broadcast TLB invalidations.
        const PTM = 1 << 2;
    }
}

/// SMMU_STATUSR (§6.3.13) bit 0: DORMANT, the SMMU and its caches are idle.
pub const STATUSR_DORMANT: u32 = 1;

/// Shareability override in GBPA.SHCFG (§6.3.14 bits 13:12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareCfg {
    NonShareable = 0,
    UseIncoming = 1,
    OuterShareable = 2,
    InnerShareable = 3,
}

/// SMMU_GBPA (§6.3.14): global bypass attributes, which apply while CR0.SMMUEN = 0.
/// Update procedure: wait for UPDATE = 0, write the new value with UPDATE set in one 32-bit
/// write, poll until UPDATE clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gbpa(pub u32);

impl Gbpa {
    /// UPDATE, bit 31.
    pub const UPDATE: u32 = 1 << 31;
    /// ABORT, bit 20.
    pub const ABORT: u32 = 1 << 20;

    /// UPDATE, bit 31: an update is in progress.
    pub const fn update(self) -> bool {
        bit(self.0, 31)
    }

    /// ABORT, bit 20: incoming transactions abort instead of bypassing.
    pub const fn abort(self) -> bool {
        bit(self.0, 20)
    }

    /// INSTCFG, bits 19:18: 0 incoming, 2 data, 3 instruction.
    pub const fn instcfg(self) -> u8 {
        bits(self.0, 18, 2) as u8
    }

    /// PRIVCFG, bits 17:16: 0 incoming, 2 unprivileged, 3 privileged.
    pub const fn privcfg(self) -> u8 {
        bits(self.0, 16, 2) as u8
    }

    /// SHCFG, bits 13:12.
    pub const fn shcfg(self) -> ShareCfg {
        match bits(self.0, 12, 2) {
            0 => ShareCfg::NonShareable,
            1 => ShareCfg::UseIncoming,
            2 => ShareCfg::OuterShareable,
            _ => ShareCfg::InnerShareable,
        }
    }

    /// ALLOCCFG, bits 11:8: 0xxx incoming, 1RWT override.
    pub const fn alloccfg(self) -> u8 {
        bits(self.0, 8, 4) as u8
    }

    /// MTCFG, bit 4: override the memory type with MemAttr.
    pub const fn mtcfg(self) -> bool {
        bit(self.0, 4)
    }

    /// MemAttr, bits 3:0.
    pub const fn memattr(self) -> u8 {
        bits(self.0, 0, 4) as u8
    }

    /// The value to write to change only ABORT: keeps the other attributes and sets UPDATE.
    pub const fn update_abort(self, abort: bool) -> u32 {
        (self.0 & !Self::ABORT) | Self::UPDATE | if abort { Self::ABORT } else { 0 }
    }
}

bitflags::bitflags! {
    /// SMMU_IRQ_CTRL and SMMU_IRQ_CTRLACK: interrupt enables.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct IrqCtrl: u32 {
        const GERROR_IRQEN = 1 << 0;
        const PRIQ_IRQEN = 1 << 1;
        const EVENTQ_IRQEN = 1 << 2;
    }
}

bitflags::bitflags! {
    /// SMMU_GERROR and SMMU_GERRORN (§6.3.19): an error is active while its GERROR and
    /// GERRORN bits differ ([`Gerror::active`]); acknowledge by writing GERRORN with the
    /// active bits toggled ([`Gerror::ack_value`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Gerror: u32 {
        /// A command could not be processed; CMDQ_CONS.ERR holds the reason.
        const CMDQ_ERR = 1 << 0;
        /// An event queue access aborted; events may be lost.
        const EVENTQ_ABT_ERR = 1 << 2;
        /// A PRI queue access aborted; page requests may be lost.
        const PRIQ_ABT_ERR = 1 << 3;
        /// A CMD_SYNC MSI aborted.
        const MSI_CMDQ_ABT_ERR = 1 << 4;
        /// An event queue MSI aborted.
        const MSI_EVENTQ_ABT_ERR = 1 << 5;
        /// A PRI queue MSI aborted.
        const MSI_PRIQ_ABT_ERR = 1 << 6;
        /// A GERROR MSI aborted.
        const MSI_GERROR_ABT_ERR = 1 << 7;
        /// The SMMU entered service failure mode.
        const SFM_ERR = 1 << 8;
        /// An error on an ECMDQ command queue control page.
        const CMDQP_ERR = 1 << 9;
        /// A device permission table lookup fault.
        const DPT_ERR = 1 << 10;
    }
}

impl Gerror {
    /// The errors currently active: bits where GERROR and GERRORN differ.
    pub const fn active(gerror: u32, gerrorn: u32) -> Self {
        Self::from_bits_retain(gerror ^ gerrorn)
    }

    /// The GERRORN value that acknowledges every active error (GERRORN := GERROR).
    pub const fn ack_value(gerror: u32) -> u32 {
        gerror
    }
}

// ---------------------------------------------------------------------------------------------
// Stream table and queues
// ---------------------------------------------------------------------------------------------

/// Read-allocate hint bit in STRTAB_BASE and the queue base registers (bit 62).
pub const BASE_RA: u64 = 1 << 62;

/// SMMU_STRTAB_BASE value: ADDR 51:6 (64-byte aligned; a linear table must be aligned to its
/// size) and RA.
pub const fn strtab_base_value(addr: u64, read_allocate: bool) -> u64 {
    (addr & 0x000f_ffff_ffff_ffc0) | if read_allocate { BASE_RA } else { 0 }
}

/// Stream table format, STRTAB_BASE_CFG.FMT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrtabFormat {
    Linear = 0,
    TwoLevel = 1,
}

/// SMMU_STRTAB_BASE_CFG: LOG2SIZE 5:0 (StreamID bits covered), SPLIT 10:6 (StreamID bits
/// resolved by the second level; 6, 8 or 10 for 2-level), FMT 17:16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StrtabBaseCfg {
    pub log2size: u8,
    pub split: u8,
    pub format: StrtabFormat,
}

impl StrtabBaseCfg {
    pub const fn encode(self) -> u32 {
        (self.log2size as u32 & 0x3f) | (self.split as u32 & 0x1f) << 6 | (self.format as u32) << 16
    }

    pub const fn decode(raw: u32) -> Self {
        StrtabBaseCfg {
            log2size: bits(raw, 0, 6) as u8,
            split: bits(raw, 6, 5) as u8,
            format: if bits(raw, 16, 2) == 1 {
                StrtabFormat::TwoLevel
            } else {
                StrtabFormat::Linear
            },
        }
    }
}

/// SMMU_CMDQ_BASE / EVENTQ_BASE / PRIQ_BASE value: ADDR 51:5, LOG2SIZE 4:0 (entries =
/// 2^LOG2SIZE, at most IDR1.CMDQS/EVENTQS/PRIQS), RA bit 62. The queue must be aligned to
/// its size (at least 32 bytes).
pub const fn queue_base_value(addr: u64, log2size: u8, read_allocate: bool) -> u64 {
    (addr & 0x000f_ffff_ffff_ffe0)
        | (log2size & 0x1f) as u64
        | if read_allocate { BASE_RA } else { 0 }
}

/// A queue index register value (PROD/CONS): the index in bits `log2size-1:0` and the wrap
/// flag in bit `log2size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueIndex {
    pub index: u32,
    pub wrap: bool,
}

impl QueueIndex {
    pub const fn decode(raw: u32, log2size: u8) -> Self {
        QueueIndex {
            index: raw & ((1 << log2size) - 1),
            wrap: bit(raw, log2size as u32),
        }
    }

    pub const fn encode(self, log2size: u8) -> u32 {
        (self.index & ((1 << log2size) - 1)) | (self.wrap as u32) << log2size
    }
}

/// EVENTQ_PROD.OVFLG / PRIQ_PROD.OVFLG (bit 31): the queue overflowed; acknowledge by
/// copying it into CONS.OVACKFLG (bit 31).
pub const QUEUE_OVERFLOW: u32 = 1 << 31;

/// CMDQ_CONS.ERR (bits 30:24): why command processing stopped (valid with GERROR.CMDQ_ERR).
pub const fn cmdq_cons_err(raw: u32) -> u8 {
    bits(raw, 24, 7) as u8
}

/// Names of CMDQ_CONS.ERR codes (§4.1 command errors): 0 none, 1 illegal command, 2 abort
/// on command fetch, 3 ATC invalidation sync failure.
pub const fn cmdq_error_name(err: u8) -> &'static str {
    match err {
        0 => "none",
        1 => "CERROR_ILL",
        2 => "CERROR_ABT",
        3 => "CERROR_ATC_INV_SYNC",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;
    use std::string::ToString;
    use std::vec::Vec;

    /// QEMU 10 `-M virt,iommu=smmuv3` (virt-10.0, stage=nested).
    const QEMU_IDR0: u32 = 0x0d44_101b;
    const QEMU_IDR1: u32 = 0x0273_0010;
    const QEMU_IDR3: u32 = 0x1414;
    const QEMU_IDR5: u32 = 0x74;
    const QEMU_AIDR: u32 = 1;

    type Field<T> = (&'static str, u32, u32, fn(T) -> u32);

    /// Every bit set alone must change exactly the field that owns it (by 1 << (bit - lo))
    /// and nothing else; bits no field owns change nothing.
    fn check_single_bits<T: Copy>(what: &str, make: fn(u32) -> T, fields: &[Field<T>]) {
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
            let max = if f.2 == 32 { u32::MAX } else { (1 << f.2) - 1 };
            assert_eq!((f.3)(make(u32::MAX)), max, "{what}.{} of all-ones", f.0);
        }
        for bitno in 0..32 {
            let v = make(1 << bitno);
            let owner = fields.iter().find(|f| bitno >= f.1 && bitno < f.1 + f.2);
            for f in fields {
                let want = match owner {
                    Some(o) if o.0 == f.0 => 1u32 << (bitno - f.1),
                    _ => 0,
                };
                assert_eq!((f.3)(v), want, "{what} bit {bitno}: field {}", f.0);
            }
        }
    }

    /// A register file that holds QEMU's IDRs and panics on any 64-bit access to the ID
    /// block (and on any write), so 32-bit-only access is enforced.
    struct FakeSmmu {
        idr: [u32; 8],
        reads: Cell<u32>,
        high_halves: Cell<u32>,
    }

    impl FakeSmmu {
        fn qemu() -> Self {
            FakeSmmu {
                idr: [
                    QEMU_IDR0, QEMU_IDR1, 0, QEMU_IDR3, 0, QEMU_IDR5, 0, QEMU_AIDR,
                ],
                reads: Cell::new(0),
                high_halves: Cell::new(0),
            }
        }
    }

    impl Mmio for FakeSmmu {
        fn read32(&self, offset: usize) -> u32 {
            self.reads.set(self.reads.get() + 1);
            match offset {
                0x00..=0x1c if offset.is_multiple_of(4) => self.idr[offset / 4],
                offset::GERROR_IRQ_CFG0 => 0x8765_4321,
                o if o == offset::GERROR_IRQ_CFG0 + 4 => {
                    self.high_halves.set(self.high_halves.get() + 1);
                    0x0000_00ab
                }
                _ => panic!("unexpected 32-bit read at {offset:#x}"),
            }
        }
        fn write32(&self, offset: usize, value: u32) {
            panic!("unexpected write {value:#x} at {offset:#x}");
        }
        fn read64(&self, offset: usize) -> u64 {
            if offset < 0x20 {
                panic!("64-bit read of the 32-bit ID register block at {offset:#x}");
            }
            panic!("unexpected 64-bit read at {offset:#x}");
        }
        fn write64(&self, offset: usize, value: u64) {
            panic!("unexpected 64-bit write {value:#x} at {offset:#x}");
        }
    }

    #[test]
    fn read_uses_32bit_accesses_only() {
        let fake = FakeSmmu::qemu();
        let ids = SmmuIdRegs::read(&fake);
        assert_eq!(fake.reads.get(), 8);
        assert_eq!(ids.idr0, Idr0(QEMU_IDR0));
        assert_eq!(ids.idr1, Idr1(QEMU_IDR1));
        assert_eq!(ids.idr3, Idr3(QEMU_IDR3));
        assert_eq!(ids.idr5, Idr5(QEMU_IDR5));
        assert_eq!(ids.aidr, Aidr(QEMU_AIDR));
        // Also through a trait object.
        let dynamic: &dyn Mmio = &fake;
        assert_eq!(SmmuIdRegs::read(dynamic), ids);
    }

    #[test]
    #[should_panic(expected = "64-bit read of the 32-bit ID register block")]
    fn fake_rejects_64bit_idr_reads() {
        FakeSmmu::qemu().read64(offset::IDR0);
    }

    #[test]
    fn read64_split_reads_low_then_high() {
        let fake = FakeSmmu::qemu();
        assert_eq!(read64_split(&fake, offset::GERROR_IRQ_CFG0), 0xab_8765_4321);
        assert_eq!((fake.reads.get(), fake.high_halves.get()), (2, 1));
    }

    /// Records writes, to check `write64_split`.
    struct Recorder(core::cell::RefCell<Vec<(usize, u32)>>);

    impl Mmio for Recorder {
        fn read32(&self, _: usize) -> u32 {
            unreachable!()
        }
        fn write32(&self, offset: usize, value: u32) {
            self.0.borrow_mut().push((offset, value));
        }
        fn read64(&self, _: usize) -> u64 {
            unreachable!()
        }
        fn write64(&self, _: usize, _: u64) {
            panic!("split write must not use 64-bit stores");
        }
    }

    #[test]
    fn write64_split_writes_low_then_high() {
        let r = Recorder(Default::default());
        write64_split(&r, offset::CMDQ_BASE, 0x1234_5678_9abc_def0);
        assert_eq!(*r.0.borrow(), [(0x90, 0x9abc_def0), (0x94, 0x1234_5678)]);
    }

    #[test]
    fn qemu_idr0_decodes_to_spec_meaning() {
        let i = Idr0(QEMU_IDR0);
        assert!(i.s1p() && i.s2p());
        assert_eq!(i.ttf(), TableFormat::AArch64);
        assert!(i.cohacc() && i.asid16() && i.vmid16() && i.term_model());
        assert_eq!(i.ttendian(), TtEndian::Little);
        assert_eq!(i.st_level(), StLevel::TwoLevel);
        assert_eq!(i.stall_model(), StallModel::TerminateOnly);
        assert_eq!(i.httu(), Httu::None);
        assert!(!i.hyp() && !i.ats() && !i.pri() && !i.msi() && !i.btm());
        assert!(!i.ns1ats() && !i.sev() && !i.atos() && !i.vmw() && !i.cd2l() && !i.vatos());
        assert!(!i.dormhint() && !i.atsrecerr() && !i.rme_impl());
        // Older machine types: S1 only (virt-9.1), S2 only (stage=2).
        assert!(Idr0(0x0d44_101a).s1p() && !Idr0(0x0d44_101a).s2p());
        assert!(!Idr0(0x0d44_1019).s1p() && Idr0(0x0d44_1019).s2p());
    }

    #[test]
    fn qemu_idr1_idr3_idr5_aidr() {
        let i1 = Idr1(QEMU_IDR1);
        assert_eq!((i1.sidsize(), i1.ssidsize()), (16, 0));
        assert_eq!((i1.cmdqs(), i1.eventqs(), i1.priqs()), (19, 19, 0));
        assert!(!i1.ecmdq() && !i1.rel() && !i1.queues_preset() && !i1.tables_preset());
        assert!(!i1.attr_perms_ovr() && !i1.attr_types_ovr());

        let i3 = Idr3(QEMU_IDR3);
        assert!(i3.had() && i3.xnx() && i3.ril());
        assert_eq!(i3.bbml(), 2);
        assert!(!i3.pbha() && !i3.pps() && !i3.mpam() && !i3.fwb() && !i3.stt());
        assert!(!i3.e0pd() && !i3.ptwnnc() && !i3.dpt());

        let i5 = Idr5(QEMU_IDR5);
        assert_eq!((i5.oas_raw(), i5.oas_bits()), (4, 44));
        assert!(i5.gran4k() && i5.gran16k() && i5.gran64k());
        assert!(!i5.ds() && !i5.d128());
        assert_eq!(i5.va_bits(), Some(48));
        assert_eq!(i5.stall_max(), 0);

        let a = Aidr(QEMU_AIDR);
        assert_eq!((a.major(), a.minor()), (0, 1));
        assert_eq!(a.to_string(), "SMMUv3.1");
        assert_eq!(Aidr(0).to_string(), "SMMUv3.0");
        assert_eq!(Aidr(0x04).to_string(), "SMMUv3.4");
        assert_eq!(Aidr(0x12).to_string(), "SMMU arch 1.2");
    }

    #[test]
    fn idr0_every_bit_maps_to_one_field() {
        let fields: &[Field<Idr0>] = &[
            ("S2P", 0, 1, |i| i.s2p() as u32),
            ("S1P", 1, 1, |i| i.s1p() as u32),
            ("TTF", 2, 2, |i| i.ttf() as u32),
            ("COHACC", 4, 1, |i| i.cohacc() as u32),
            ("BTM", 5, 1, |i| i.btm() as u32),
            ("HTTU", 6, 2, |i| i.httu() as u32),
            ("DORMHINT", 8, 1, |i| i.dormhint() as u32),
            ("HYP", 9, 1, |i| i.hyp() as u32),
            ("ATS", 10, 1, |i| i.ats() as u32),
            ("NS1ATS", 11, 1, |i| i.ns1ats() as u32),
            ("ASID16", 12, 1, |i| i.asid16() as u32),
            ("MSI", 13, 1, |i| i.msi() as u32),
            ("SEV", 14, 1, |i| i.sev() as u32),
            ("ATOS", 15, 1, |i| i.atos() as u32),
            ("PRI", 16, 1, |i| i.pri() as u32),
            ("VMW", 17, 1, |i| i.vmw() as u32),
            ("VMID16", 18, 1, |i| i.vmid16() as u32),
            ("CD2L", 19, 1, |i| i.cd2l() as u32),
            ("VATOS", 20, 1, |i| i.vatos() as u32),
            ("TTENDIAN", 21, 2, |i| i.ttendian() as u32),
            ("ATSRECERR", 23, 1, |i| i.atsrecerr() as u32),
            ("STALL_MODEL", 24, 2, |i| i.stall_model() as u32),
            ("TERM_MODEL", 26, 1, |i| i.term_model() as u32),
            ("ST_LEVEL", 27, 2, |i| i.st_level() as u32),
            ("RME_IMPL", 30, 1, |i| i.rme_impl() as u32),
        ];
        check_single_bits("IDR0", Idr0, fields);
    }

    #[test]
    fn idr1_every_bit_maps_to_one_field() {
        let fields: &[Field<Idr1>] = &[
            ("SIDSIZE", 0, 6, |i| i.sidsize() as u32),
            ("SSIDSIZE", 6, 5, |i| i.ssidsize() as u32),
            ("PRIQS", 11, 5, |i| i.priqs() as u32),
            ("EVENTQS", 16, 5, |i| i.eventqs() as u32),
            ("CMDQS", 21, 5, |i| i.cmdqs() as u32),
            ("ATTR_PERMS_OVR", 26, 1, |i| i.attr_perms_ovr() as u32),
            ("ATTR_TYPES_OVR", 27, 1, |i| i.attr_types_ovr() as u32),
            ("REL", 28, 1, |i| i.rel() as u32),
            ("QUEUES_PRESET", 29, 1, |i| i.queues_preset() as u32),
            ("TABLES_PRESET", 30, 1, |i| i.tables_preset() as u32),
            ("ECMDQ", 31, 1, |i| i.ecmdq() as u32),
        ];
        check_single_bits("IDR1", Idr1, fields);
    }

    #[test]
    fn idr2_idr3_every_bit_maps_to_one_field() {
        let idr2: &[Field<Idr2>] = &[("BA_VATOS", 0, 10, |i| i.ba_vatos() as u32)];
        check_single_bits("IDR2", Idr2, idr2);
        assert_eq!(Idr2(3).vatos_page_offset(), 0x5_0000);

        let idr3: &[Field<Idr3>] = &[
            ("HAD", 2, 1, |i| i.had() as u32),
            ("PBHA", 3, 1, |i| i.pbha() as u32),
            ("XNX", 4, 1, |i| i.xnx() as u32),
            ("PPS", 5, 1, |i| i.pps() as u32),
            ("MPAM", 7, 1, |i| i.mpam() as u32),
            ("FWB", 8, 1, |i| i.fwb() as u32),
            ("STT", 9, 1, |i| i.stt() as u32),
            ("RIL", 10, 1, |i| i.ril() as u32),
            ("BBML", 11, 2, |i| i.bbml() as u32),
            ("E0PD", 13, 1, |i| i.e0pd() as u32),
            ("PTWNNC", 14, 1, |i| i.ptwnnc() as u32),
            ("DPT", 15, 1, |i| i.dpt() as u32),
            ("PASIDTT", 16, 1, |i| i.pasidtt() as u32),
            ("EPAN", 17, 1, |i| i.epan() as u32),
            ("S1PI", 18, 1, |i| i.s1pi() as u32),
            ("S2PI", 19, 1, |i| i.s2pi() as u32),
            ("S2PO", 20, 1, |i| i.s2po() as u32),
            ("THE", 21, 1, |i| i.the() as u32),
            ("MTEPERM", 22, 1, |i| i.mteperm() as u32),
            ("AIE", 23, 1, |i| i.aie() as u32),
        ];
        check_single_bits("IDR3", Idr3, idr3);
    }

    #[test]
    fn idr5_iidr_aidr_every_bit_maps_to_one_field() {
        let idr5: &[Field<Idr5>] = &[
            ("OAS", 0, 3, |i| i.oas_raw() as u32),
            ("GRAN4K", 4, 1, |i| i.gran4k() as u32),
            ("GRAN16K", 5, 1, |i| i.gran16k() as u32),
            ("GRAN64K", 6, 1, |i| i.gran64k() as u32),
            ("DS", 7, 1, |i| i.ds() as u32),
            ("D128", 8, 1, |i| i.d128() as u32),
            ("VAX", 10, 2, |i| i.vax_raw() as u32),
            ("STALL_MAX", 16, 16, |i| i.stall_max() as u32),
        ];
        check_single_bits("IDR5", Idr5, idr5);
        let oas: Vec<u8> = (0..8).map(|r| Idr5(r).oas_bits()).collect();
        assert_eq!(oas, [32, 36, 40, 42, 44, 48, 52, 56]);
        assert_eq!(
            [0, 1, 2, 3].map(|v| Idr5(v << 10).va_bits()),
            [Some(48), Some(52), Some(56), None]
        );

        let iidr: &[Field<Iidr>] = &[
            ("Implementer", 0, 12, |i| i.implementer() as u32),
            ("Revision", 12, 4, |i| i.revision() as u32),
            ("Variant", 16, 4, |i| i.variant() as u32),
            ("ProductID", 20, 12, |i| i.product_id() as u32),
        ];
        check_single_bits("IIDR", Iidr, iidr);

        let aidr: &[Field<Aidr>] = &[
            ("ArchMinorRev", 0, 4, |a| a.minor() as u32),
            ("ArchMajorRev", 4, 4, |a| a.major() as u32),
        ];
        check_single_bits("AIDR", Aidr, aidr);
    }

    #[test]
    fn boot_report_for_qemu() {
        let s = SmmuIdRegs::read(&FakeSmmu::qemu()).to_string();
        assert_eq!(
            s,
            "stages=S1,S2 SIDSIZE=16 SSIDSIZE=0 CMDQS=2^19 EVENTQS=2^19 PRIQS=2^0 OAS=44 VAX=48 \
             gran=4K,16K,64K COHACC MSI=no ATS=no PRI=no ST_LEVEL=2-level TTF=AArch64 ASID16 \
             VMID16 RIL BTM=no HTTU=none HYP=no NS1ATS=no SEV=no ATOS=no VATOS=no VMW=no CD2L=no \
             DORMHINT=no ATSRECERR=no TTENDIAN=LE STALL_MODEL=terminate TERM_MODEL=abort \
             RME_IMPL=no HAD PBHA=no XNX PPS=no MPAM=no FWB=no STT=no BBML=2 E0PD=no PTWNNC=no \
             DPT=no PASIDTT=no EPAN=no S1PI=no S2PI=no S2PO=no THE=no MTEPERM=no AIE=no DS=no \
             D128=no STALL_MAX=0 ATTR_TYPES_OVR=no ATTR_PERMS_OVR=no REL=no QUEUES_PRESET=no \
             TABLES_PRESET=no ECMDQ=no IDR4=0x0 IIDR=0x00000000 v3.1"
        );
        let mut s1 = SmmuIdRegs::read(&FakeSmmu::qemu());
        s1.idr0 = Idr0(0x0d44_101a);
        s1.idr5 = Idr5(0x05);
        assert!(s1.to_string().starts_with("stages=S1 SIDSIZE=16"));
        assert!(s1.to_string().contains(" OAS=48 VAX=48 gran=none "));
        s1.idr0 = Idr0(QEMU_IDR0 | 1 << 20);
        s1.idr2 = Idr2(2);
        assert!(s1.to_string().contains(" VATOS "));
        assert!(s1.to_string().contains(" BA_VATOS=0x2 "));
    }

    #[test]
    fn cr0_and_cr1_and_cr2() {
        assert_eq!(Cr0::SMMUEN.bits(), 1);
        assert_eq!(Cr0::CMDQEN.bits(), 8);
        assert_eq!(Cr0::ATSCHK.bits(), 0x10);
        assert_eq!(Cr0::DPT_WALK_EN.bits(), 0x400);
        let c = (Cr0::SMMUEN | Cr0::EVENTQEN).with_vmw(5);
        assert_eq!(c.bits(), 0b101_000_101);
        assert_eq!(c.vmw(), 5);
        assert_eq!(c.with_vmw(0), Cr0::SMMUEN | Cr0::EVENTQEN);
        assert_eq!(Cr0::from_bits_retain(1 << 6).vmw(), 1);
        assert_eq!(Cr0::from_bits_retain(1 << 8).vmw(), 4);

        assert_eq!(
            cr1_value(AccessAttrs::COHERENT, AccessAttrs::COHERENT),
            0xd75
        );
        let t = AccessAttrs {
            inner: Cacheability::WriteThrough,
            ..AccessAttrs::NON_CACHEABLE
        };
        assert_eq!(
            cr1_value(t, AccessAttrs::NON_CACHEABLE),
            2 << 6 | 2 << 10 | 2 << 4
        );
        assert_eq!((Cr2::E2H | Cr2::RECINVSID | Cr2::PTM).bits(), 7);
    }

    #[test]
    fn gbpa_and_gerror() {
        // QEMU's reset GBPA: SHCFG=use incoming, ABORT=0 (bypass while disabled).
        let g = Gbpa(0x1000);
        assert!(!g.abort() && !g.update());
        assert_eq!(g.shcfg(), ShareCfg::UseIncoming);
        assert_eq!(
            (
                g.instcfg(),
                g.privcfg(),
                g.alloccfg(),
                g.mtcfg(),
                g.memattr()
            ),
            (0, 0, 0, false, 0)
        );
        assert_eq!(g.update_abort(true), 0x8010_1000);
        assert_eq!(Gbpa(0x8010_1000).update_abort(false), 0x8000_1000);
        let all = Gbpa(u32::MAX);
        assert_eq!(
            (
                all.instcfg(),
                all.privcfg(),
                all.alloccfg(),
                all.memattr(),
                all.shcfg()
            ),
            (3, 3, 15, 15, ShareCfg::InnerShareable)
        );
        assert!(all.update() && all.abort() && all.mtcfg());
        assert!(
            !Gbpa(!(1 << 31)).update() && !Gbpa(!(1 << 20)).abort() && !Gbpa(!(1 << 4)).mtcfg()
        );

        assert_eq!(Gerror::CMDQ_ERR.bits(), 1);
        assert_eq!(Gerror::EVENTQ_ABT_ERR.bits(), 4);
        assert_eq!(Gerror::SFM_ERR.bits(), 0x100);
        assert_eq!(Gerror::CMDQP_ERR.bits(), 0x200);
        assert_eq!(Gerror::all().bits(), 0x7fd, "bit 1 reserved");
        assert_eq!(Gerror::active(0b101, 0b001), Gerror::EVENTQ_ABT_ERR);
        assert!(Gerror::active(0x105, 0x105).is_empty());
        assert_eq!(Gerror::ack_value(0x105), 0x105);
        assert_eq!((IrqCtrl::all()).bits(), 7);
    }

    #[test]
    fn stream_table_and_queue_encodings() {
        let cfg = StrtabBaseCfg {
            log2size: 16,
            split: 8,
            format: StrtabFormat::TwoLevel,
        };
        assert_eq!(cfg.encode(), 16 | 8 << 6 | 1 << 16);
        assert_eq!(StrtabBaseCfg::decode(cfg.encode()), cfg);
        let lin = StrtabBaseCfg {
            log2size: 5,
            split: 0,
            format: StrtabFormat::Linear,
        };
        assert_eq!(StrtabBaseCfg::decode(lin.encode()), lin);
        assert_eq!(strtab_base_value(0x4000_1000, true), 0x4000_1000 | 1 << 62);
        assert_eq!(
            strtab_base_value(0xfff0_0000_0000_003f, false),
            0x0000_0000_0000_0000
        );
        assert_eq!(queue_base_value(0x4008_0000, 8, false), 0x4008_0008);
        assert_eq!(
            queue_base_value(0x4008_001f, 19, true),
            0x4008_0013 | 1 << 62
        );

        let q = QueueIndex {
            index: 5,
            wrap: true,
        };
        assert_eq!(q.encode(8), 0x105);
        assert_eq!(QueueIndex::decode(0x8000_0105, 8), q);
        assert_eq!(
            QueueIndex::decode(0x100, 8),
            QueueIndex {
                index: 0,
                wrap: true
            }
        );
        assert_eq!(
            QueueIndex::decode(0xff, 8),
            QueueIndex {
                index: 255,
                wrap: false
            }
        );

        assert_eq!(cmdq_cons_err(0x0100_0007), 1);
        assert_eq!(cmdq_cons_err(0x7f00_0000), 0x7f);
        assert_eq!(cmdq_cons_err(0x8000_0000), 0);
        assert_eq!(cmdq_error_name(1), "CERROR_ILL");
        assert_eq!(cmdq_error_name(9), "unknown");
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
        assert_eq!(find("EVENTQ_PROD").offset, 0x100a8);
        assert_eq!(find("EVENTQ_CONS").offset, 0x100ac);
        assert_eq!(find("PRIQ_PROD").offset, 0x100c8);
        assert_eq!(find("CMDQ_PROD").offset, 0x98);
        assert_eq!(find("STRTAB_BASE").width, Width::W64);
        assert_eq!(find("STRTAB_BASE_CFG").width, Width::W32);
        // The ID block is all 32-bit.
        assert!(
            REGISTERS
                .iter()
                .filter(|r| r.offset < 0x20)
                .all(|r| r.width == Width::W32)
        );
        // Only the base, IRQ_CFG0 and GATOS address/result registers are 64-bit.
        let wide: Vec<&str> = REGISTERS
            .iter()
            .filter(|r| r.width == Width::W64)
            .map(|r| r.name)
            .collect();
        assert_eq!(
            wide,
            [
                "GERROR_IRQ_CFG0",
                "STRTAB_BASE",
                "CMDQ_BASE",
                "EVENTQ_BASE",
                "EVENTQ_IRQ_CFG0",
                "PRIQ_BASE",
                "PRIQ_IRQ_CFG0",
                "GATOS_SID",
                "GATOS_ADDR",
                "GATOS_PAR",
            ]
        );
        // Only the event and PRI queue indexes live in page 1.
        for r in REGISTERS {
            let page1 = matches!(
                r.name,
                "EVENTQ_PROD" | "EVENTQ_CONS" | "PRIQ_PROD" | "PRIQ_CONS"
            );
            assert_eq!(r.offset >= offset::PAGE1, page1, "{}", r.name);
        }
    }
}

//! The remapping structures in memory: root, context, PASID directory and PASID table entries
//! (Intel VT-d 4.1 chapter 9). Pure encoders and decoders, tested bit by bit.
//!
//! Addresses are 4 KiB aligned physical addresses; their low 12 bits are dropped. Bits above the
//! host address width are reserved in every pointer field: the callers pass addresses of memory
//! the platform has, which is below it.

/// Present, bit 0 of every entry's first 64-bit word.
pub const P: u64 = 1 << 0;
/// Fault processing disable, bit 1 of context, PASID-directory and PASID-table entries. The
/// driver never sets it: every fault of an attached device is recorded.
pub const FPD: u64 = 1 << 1;
/// The pointer field, bits 63:12.
pub const ADDR: u64 = !0xfff;

/// Entries in one 4 KiB legacy context table (one per devfn).
pub const CONTEXT_ENTRIES: usize = 256;
/// Scalable-mode context entries in one 4 KiB table (32 bytes each): the lower table holds
/// devfn 0-127, the upper devfn 128-255 (§9.2).
pub const SM_CONTEXT_ENTRIES: usize = 128;
/// PASID-directory entries in the driver's one-page directory (8 bytes each).
pub const PASID_DIR_ENTRIES: usize = 512;
/// PASID-table entries in one 4 KiB PASID table (64 bytes each): PASID bits 5:0 index it.
pub const PASID_TABLE_ENTRIES: usize = 64;
/// The PDTS value for a one-page directory: 2^(PDTS + 7) = 512 entries (§9.4).
pub const PDTS_ONE_PAGE: u8 = 2;
/// PASIDs a one-page directory covers: 512 directory entries × 64 PASIDs.
pub const PASIDS_PER_DIRECTORY: u32 = (PASID_DIR_ENTRIES * PASID_TABLE_ENTRIES) as u32;

// ---------------------------------------------------------------------------------------------
// Root entries
// ---------------------------------------------------------------------------------------------

/// A root entry, indexed by bus number in the 4 KiB root table (16 bytes each).
///
/// * Legacy (§9.1): bit 0 P, bits 63:12 context-table pointer; the upper 64 bits are reserved.
/// * Scalable mode (§9.2): bit 0 LP and bits 63:12 LCTP, the lower context table (devfn
///   0-127); bit 64 UP and bits 127:76 UCTP, the upper context table (devfn 128-255).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RootEntry {
    pub lo: u64,
    pub hi: u64,
}

impl RootEntry {
    /// A legacy root entry pointing at `context_table`.
    pub const fn legacy(context_table: u64) -> Self {
        RootEntry {
            lo: (context_table & ADDR) | P,
            hi: 0,
        }
    }

    /// A scalable-mode root entry with the given lower and upper context tables.
    pub const fn scalable(lower: Option<u64>, upper: Option<u64>) -> Self {
        let lo = match lower {
            Some(t) => (t & ADDR) | P,
            None => 0,
        };
        let hi = match upper {
            Some(t) => (t & ADDR) | P,
            None => 0,
        };
        RootEntry { lo, hi }
    }

    /// Legacy P, or scalable-mode LP.
    pub const fn present(self) -> bool {
        self.lo & P != 0
    }

    /// Legacy context-table pointer, or scalable-mode LCTP (meaningful when present).
    pub const fn context_table(self) -> u64 {
        self.lo & ADDR
    }

    /// Scalable mode: the lower context table (devfn 0-127), if present.
    pub const fn lower(self) -> Option<u64> {
        if self.lo & P != 0 {
            Some(self.lo & ADDR)
        } else {
            None
        }
    }

    /// Scalable mode: the upper context table (devfn 128-255), if present.
    pub const fn upper(self) -> Option<u64> {
        if self.hi & P != 0 {
            Some(self.hi & ADDR)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Legacy context entries
// ---------------------------------------------------------------------------------------------

/// Translation type of a legacy context entry, bits 3:2 (§9.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationType {
    /// 00b: untranslated requests go through the second-stage table; translation requests
    /// (ATS) and translated requests are blocked. The driver's default (no device TLB).
    Untranslated = 0,
    /// 01b: all requests through the second-stage table, device TLB allowed (ECAP.DT).
    AllWithDeviceTlb = 1,
    /// 10b: untranslated requests pass through (ECAP.PT).
    PassThrough = 2,
    /// 11b: reserved.
    Reserved = 3,
}

/// A legacy context entry, indexed by devfn in a context table (§9.3):
///
/// * `lo`: bit 0 P, bit 1 FPD, bits 3:2 TT, bits 63:12 SLPTPTR (second-stage table root);
/// * `hi` (bits 127:64): bits 2:0 AW (1 = 3-level/39-bit, 2 = 4-level/48-bit,
///   3 = 5-level/57-bit), bits 6:3 available to software, bits 23:8 DID (entry bits 87:72).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextEntry {
    pub lo: u64,
    pub hi: u64,
}

impl ContextEntry {
    const TT_SHIFT: u32 = 2;
    const DID_SHIFT: u32 = 8;

    /// A present entry translating untranslated requests through the `levels`-level
    /// second-stage table at `slptptr`, tagged with domain id `did`. FPD = 0, TT = 00b.
    pub const fn second_stage(slptptr: u64, levels: u32, did: u16) -> Self {
        ContextEntry {
            lo: (slptptr & ADDR) | (TranslationType::Untranslated as u64) << Self::TT_SHIFT | P,
            hi: aw_field(levels) | (did as u64) << Self::DID_SHIFT,
        }
    }

    /// A present pass-through entry (TT = 10b, needs ECAP.PT); AW must still be a SAGAW value.
    pub const fn pass_through(levels: u32, did: u16) -> Self {
        ContextEntry {
            lo: (TranslationType::PassThrough as u64) << Self::TT_SHIFT | P,
            hi: aw_field(levels) | (did as u64) << Self::DID_SHIFT,
        }
    }

    /// The same entry with TT = 01b: translation requests (ATS) and translated requests are
    /// allowed, so the device may keep a device TLB (needs ECAP.DT). Only a TT = 00b entry
    /// changes; pass-through (10b) has no TT with a device TLB, and is returned unchanged.
    pub const fn with_device_tlb(self) -> Self {
        let tt = (self.lo >> Self::TT_SHIFT) & 3;
        if tt != TranslationType::Untranslated as u64 {
            return self;
        }
        ContextEntry {
            lo: self.lo | (TranslationType::AllWithDeviceTlb as u64) << Self::TT_SHIFT,
            hi: self.hi,
        }
    }

    pub const fn present(self) -> bool {
        self.lo & P != 0
    }

    pub const fn fault_processing_disabled(self) -> bool {
        self.lo & FPD != 0
    }

    pub const fn translation_type(self) -> TranslationType {
        match (self.lo >> Self::TT_SHIFT) & 3 {
            0 => TranslationType::Untranslated,
            1 => TranslationType::AllWithDeviceTlb,
            2 => TranslationType::PassThrough,
            _ => TranslationType::Reserved,
        }
    }

    pub const fn slptptr(self) -> u64 {
        self.lo & ADDR
    }

    /// The raw AW field.
    pub const fn aw(self) -> u8 {
        (self.hi & 7) as u8
    }

    /// Table depth from AW (AW + 2).
    pub const fn levels(self) -> u32 {
        self.aw() as u32 + 2
    }

    pub const fn did(self) -> u16 {
        (self.hi >> Self::DID_SHIFT) as u16
    }
}

/// The AW encoding of a `levels`-level second-stage table (§9.3, §9.6): levels − 2.
const fn aw_field(levels: u32) -> u64 {
    (levels.saturating_sub(2) & 7) as u64
}

// ---------------------------------------------------------------------------------------------
// Scalable-mode context entries
// ---------------------------------------------------------------------------------------------

/// A scalable-mode context entry, 256 bits, indexed by devfn & 0x7f in the lower or upper
/// context table (§9.4):
///
/// * `q[0]`: bit 0 P, bit 1 FPD, bit 2 DTE (device TLB), bit 3 PASIDE (requests with PASID
///   allowed), bit 4 PRE (page requests), bits 11:9 PDTS (directory of 2^(PDTS+7) entries),
///   bits 63:12 PASIDDIRPTR;
/// * `q[1]`: bits 19:0 RID_PASID (the PASID used for requests without one), bit 20 RID_PRIV;
/// * `q[2]`, `q[3]`: reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScalableContextEntry {
    pub q: [u64; 4],
}

impl ScalableContextEntry {
    pub const DTE: u64 = 1 << 2;
    pub const PASIDE: u64 = 1 << 3;
    pub const PRE: u64 = 1 << 4;
    const PDTS_SHIFT: u32 = 9;

    /// A present entry using the PASID directory at `pasid_dir` with 2^(`pdts`+7) entries,
    /// RID_PASID = 0, no device TLB, no page requests. `paside` allows requests with PASID
    /// (set it only when ECAP.PASID).
    pub const fn new(pasid_dir: u64, pdts: u8, paside: bool) -> Self {
        let mut q0 = (pasid_dir & ADDR) | ((pdts & 7) as u64) << Self::PDTS_SHIFT | P;
        if paside {
            q0 |= Self::PASIDE;
        }
        ScalableContextEntry { q: [q0, 0, 0, 0] }
    }

    /// The same entry with DTE set or clear: DTE allows translation requests (ATS) from the
    /// device, i.e. a device TLB (needs ECAP.DT).
    pub const fn with_device_tlb(self, on: bool) -> Self {
        let mut q = self.q;
        if on {
            q[0] |= Self::DTE;
        } else {
            q[0] &= !Self::DTE;
        }
        ScalableContextEntry { q }
    }

    pub const fn device_tlb(self) -> bool {
        self.q[0] & Self::DTE != 0
    }

    pub const fn present(self) -> bool {
        self.q[0] & P != 0
    }

    pub const fn pasid_dir(self) -> u64 {
        self.q[0] & ADDR
    }

    pub const fn pdts(self) -> u8 {
        ((self.q[0] >> Self::PDTS_SHIFT) & 7) as u8
    }

    /// Directory entries: 2^(PDTS + 7).
    pub const fn pasid_dir_entries(self) -> usize {
        1 << (self.pdts() + 7)
    }

    pub const fn paside(self) -> bool {
        self.q[0] & Self::PASIDE != 0
    }

    pub const fn rid_pasid(self) -> u32 {
        (self.q[1] & 0xf_ffff) as u32
    }
}

// ---------------------------------------------------------------------------------------------
// PASID directory and table
// ---------------------------------------------------------------------------------------------

/// A PASID-directory entry (§9.5), indexed by PASID bits 19:6: bit 0 P, bit 1 FPD,
/// bits 63:12 the PASID table.
pub const fn pasid_dir_entry(pasid_table: u64) -> u64 {
    (pasid_table & ADDR) | P
}

/// PASID-granular translation type, PASID-entry bits 8:6 (§9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pgtt {
    /// 001b: first stage only (ECAP.FLTS).
    FirstStage = 1,
    /// 010b: second stage only (ECAP.SLTS).
    SecondStage = 2,
    /// 011b: nested (ECAP.NEST).
    Nested = 3,
    /// 100b: pass-through (ECAP.PT).
    PassThrough = 4,
}

impl Pgtt {
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Pgtt::FirstStage),
            2 => Some(Pgtt::SecondStage),
            3 => Some(Pgtt::Nested),
            4 => Some(Pgtt::PassThrough),
            _ => None,
        }
    }
}

/// Options of a PASID-table entry that are independent of the stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PasidEntryFlags {
    /// PGSNP (bit 88): snoop every access through this entry regardless of the request's
    /// no-snoop attribute; reserved without ECAP.SC. How a coherency-enforcing domain is
    /// enforced in scalable mode.
    pub page_snoop: bool,
    /// PWSNP (bit 87): snoop the page-table walks (with ECAP.SMPWCS).
    pub walk_snoop: bool,
    /// SSADE (bit 9): second-stage accessed/dirty flags (ECAP.SLADS), second stage only.
    pub ss_access_dirty: bool,
}

/// A PASID-table entry, 512 bits, indexed by PASID bits 5:0 (§9.6). The fields the driver
/// programs:
///
/// * `q[0]`: bit 0 P, bit 1 FPD, bits 4:2 AW (second-stage depth, as in the context entry),
///   bit 5 SSEE, bits 8:6 PGTT, bit 9 SSADE, bits 63:12 SSPTPTR (second-stage root);
/// * `q[1]`: bits 15:0 DID, bit 23 PWSNP, bit 24 PGSNP, bits 63:32 PAT (first-stage memory
///   types, used with ECAP.MTS);
/// * `q[2]`: bit 0 SRE (supervisor requests), bits 3:2 FLPM (0 = 4-level, 1 = 5-level),
///   bit 4 WPE, bit 7 EAFE, bits 63:12 FLPTR (first-stage root);
/// * `q[3..8]`: reserved or unused (nested / PASID-granular features).
///
/// The layout matters for atomic replacement: PGTT, AW, SSPTPTR, DID and PGSNP all sit in the
/// low 128 bits, so one 128-bit store moves a second-stage entry to another second-stage
/// domain; FLPTR lives in bits 191:140, outside that unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PasidEntry {
    pub q: [u64; 8],
}

impl PasidEntry {
    const AW_SHIFT: u32 = 2;
    const PGTT_SHIFT: u32 = 6;
    pub const SSADE: u64 = 1 << 9;
    pub const PWSNP: u64 = 1 << 23;
    pub const PGSNP: u64 = 1 << 24;
    pub const SRE: u64 = 1 << 0;
    const FLPM_SHIFT: u32 = 2;

    const fn q1(did: u16, flags: PasidEntryFlags) -> u64 {
        let mut q1 = did as u64;
        if flags.walk_snoop {
            q1 |= Self::PWSNP;
        }
        if flags.page_snoop {
            q1 |= Self::PGSNP;
        }
        q1
    }

    /// A present second-stage-only entry (PGTT = 010b) for the `levels`-level table at
    /// `ssptptr`.
    pub const fn second_stage(ssptptr: u64, levels: u32, did: u16, flags: PasidEntryFlags) -> Self {
        let mut q0 = (ssptptr & ADDR)
            | (Pgtt::SecondStage as u64) << Self::PGTT_SHIFT
            | aw_field(levels) << Self::AW_SHIFT
            | P;
        if flags.ss_access_dirty {
            q0 |= Self::SSADE;
        }
        PasidEntry {
            q: [q0, Self::q1(did, flags), 0, 0, 0, 0, 0, 0],
        }
    }

    /// A present first-stage-only entry (PGTT = 001b) for the `levels`-level (4 or 5) x86
    /// table at `flptr`. `aw_levels` fills AW with a SAGAW depth: hardware may check AW
    /// whatever the PGTT, so it must hold a supported value. Supervisor requests stay disabled
    /// (SRE = 0): requests without PASID are user requests, and the driver maps user pages.
    pub const fn first_stage(
        flptr: u64,
        levels: u32,
        aw_levels: u32,
        did: u16,
        flags: PasidEntryFlags,
    ) -> Self {
        let q0 = (Pgtt::FirstStage as u64) << Self::PGTT_SHIFT
            | aw_field(aw_levels) << Self::AW_SHIFT
            | P;
        let flpm = if levels == 5 { 1 } else { 0 };
        let q2 = (flptr & ADDR) | flpm << Self::FLPM_SHIFT;
        let flags = PasidEntryFlags {
            ss_access_dirty: false,
            ..flags
        };
        PasidEntry {
            q: [q0, Self::q1(did, flags), q2, 0, 0, 0, 0, 0],
        }
    }

    /// A present pass-through entry (PGTT = 100b, ECAP.PT).
    pub const fn pass_through(aw_levels: u32, did: u16) -> Self {
        let q0 = (Pgtt::PassThrough as u64) << Self::PGTT_SHIFT
            | aw_field(aw_levels) << Self::AW_SHIFT
            | P;
        PasidEntry {
            q: [q0, did as u64, 0, 0, 0, 0, 0, 0],
        }
    }

    pub const fn present(&self) -> bool {
        self.q[0] & P != 0
    }

    pub const fn pgtt(&self) -> Option<Pgtt> {
        Pgtt::from_raw(((self.q[0] >> Self::PGTT_SHIFT) & 7) as u8)
    }

    pub const fn aw(&self) -> u8 {
        ((self.q[0] >> Self::AW_SHIFT) & 7) as u8
    }

    pub const fn ssptptr(&self) -> u64 {
        self.q[0] & ADDR
    }

    pub const fn did(&self) -> u16 {
        self.q[1] as u16
    }

    pub const fn page_snoop(&self) -> bool {
        self.q[1] & Self::PGSNP != 0
    }

    pub const fn walk_snoop(&self) -> bool {
        self.q[1] & Self::PWSNP != 0
    }

    pub const fn flptr(&self) -> u64 {
        self.q[2] & ADDR
    }

    /// First-stage depth from FLPM: 4 + FLPM.
    pub const fn fl_levels(&self) -> u32 {
        4 + ((self.q[2] >> Self::FLPM_SHIFT) & 3) as u32
    }

    /// Whether the upper 384 bits are all zero, so that the entry is fully described by its
    /// low 128 bits (true of second-stage and pass-through entries).
    pub const fn upper_is_zero(&self) -> bool {
        self.q[2] == 0
            && self.q[3] == 0
            && self.q[4] == 0
            && self.q[5] == 0
            && self.q[6] == 0
            && self.q[7] == 0
    }
}

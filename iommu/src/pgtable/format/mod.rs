//! Descriptor formats. One trait, four families, each a zero-sized type whose constants and
//! `#[inline]` functions are monomorphised into the engine.
//!
//! Level numbering used throughout the engine: level 0 holds the smallest leaves (4 KiB with a
//! 4 KiB granule), level `levels - 1` is the root. (VT-d counts the same way from 1; Arm counts
//! the other way: Arm level 3 is our level 0.)

mod arm;
mod vtd;
mod x86;

pub use arm::{ARM_S1_MAIR, ArmStage1, ArmStage2, arm_pa_bits, bits as arm_bits};
pub use vtd::{VtdSecondStage, bits as vtd_bits};
pub use x86::{X86FirstStage, bits as x86_bits};

use super::{ConfigError, MapError, PhysAddr, Prot};
use core::fmt;
use core::marker::PhantomData;

/// How leaf entries are written, which decides what the engine guarantees to callers that break
/// the disjoint-range contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    /// Leaves are installed by compare-and-swap from 0 and removed by atomic swap. Two racing maps
    /// of one entry: exactly one succeeds, the other fails with `Overlap` and rolls back. Two racing
    /// unmaps: the leaf is reported by exactly one. For tables a guest controls.
    Untrusted,
    /// Leaves are checked with a load and written with a plain store. Overlap with an existing
    /// mapping is still an error, but two *racing* overlapping calls may both succeed. For tables
    /// whose IOVA ranges the hypervisor itself allocates. About 4 ns per entry faster on this
    /// machine's x86 (a locked RMW drains the store buffer); see `docs/perf.md`.
    Cooperative,
}

/// What the hardware behind one page table supports, and how the table is to be used.
///
/// Map the IOMMU's capability registers onto these fields:
///
/// | field | VT-d | SMMUv3 / Arm CPU |
/// |---|---|---|
/// | `ias` | CAP.MGAW (capped by the levels: 39/48/57) | S1: 64 − CD.T0SZ; S2: 64 − STE.S2T0SZ (≤ IDR5.OAS / VAX) |
/// | `oas` | DMAR "host address width" + 1 | IDR5.OAS / ID_AA64MMFR0.PARange, see [`arm_pa_bits`] |
/// | `leaf_sizes` | CAP.SLLPS (SS), CAP.FS1GP (FS) | IDR5.GRAN4K/16K/64K plus the block sizes of that granule |
/// | `coherent` | ECAP.C | IDR0.COHACC |
/// | `dirty_tracking` | ECAP.SSADS / SLADS, enabled in the PASID or context entry | IDR0.HTTU = 2, CD.HD / STE.S2HD |
/// | `snoop_control` | ECAP.SC | — |
/// | `memory_types` | ECAP.MTS (EMT in second-stage leaves) | — (always) |
/// | `execute_control` | ECAP.SLEE-style X bit / first-stage XD | — (always) |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Input (IOVA / IPA) address bits.
    pub ias: u32,
    /// Output (physical) address bits.
    pub oas: u32,
    /// Bitmap of leaf sizes the hardware supports: bit `n` set allows leaves of 2^n bytes. The
    /// engine intersects it with what the format allows; the granule itself is always allowed.
    pub leaf_sizes: u64,
    /// The table walker snoops CPU caches; when `false` the engine calls [`TableMemory::clean`].
    ///
    /// [`TableMemory::clean`]: super::TableMemory::clean
    pub coherent: bool,
    /// Use the Arm contiguous hint where a run of entries allows it.
    pub contiguous_hint: bool,
    /// Hardware tracks dirty state: leaves are created clean (VT-d/x86 D = 0; Arm DBM = 1 with
    /// write permission withheld until the first write).
    pub dirty_tracking: bool,
    /// VT-d ECAP.SC: the SNP bit may be set.
    pub snoop_control: bool,
    /// VT-d ECAP.MTS: write EMT memory types into second-stage leaves.
    pub memory_types: bool,
    /// The hardware honours an execute permission in this format (VT-d X bit, x86 XD).
    pub execute_control: bool,
    /// How leaves are written; see [`Concurrency`].
    pub concurrency: Concurrency,
}

impl Config {
    /// A coherent IOMMU translating `ias` input bits to `oas` output bits, every leaf size the
    /// format allows, contiguous hints on, no dirty tracking, no optional VT-d features,
    /// [`Concurrency::Untrusted`].
    pub const fn new(ias: u32, oas: u32) -> Self {
        Config {
            ias,
            oas,
            leaf_sizes: u64::MAX,
            coherent: true,
            contiguous_hint: true,
            dirty_tracking: false,
            snoop_control: false,
            memory_types: false,
            execute_control: false,
            concurrency: Concurrency::Untrusted,
        }
    }

    /// Restrict leaves to the granule (no superpages), e.g. to map 1 GiB as 4 KiB pages.
    pub const fn granule_only(mut self) -> Self {
        self.leaf_sizes = 0;
        self
    }
}

/// The shape of one table, derived from a [`Format`] and a [`Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Number of levels walked (1..=5).
    pub levels: u32,
    /// Entries in the root: fewer than a full table when the input size does not need them, more
    /// for an Arm stage-2 concatenated root.
    pub root_entries: usize,
    /// Bytes allocated for the root (a power of two, at least one table).
    pub root_bytes: usize,
    /// Bytes of every non-root table.
    pub table_bytes: usize,
    pub ias: u32,
    pub oas: u32,
}

/// A page-table descriptor format.
///
/// Everything here is a constant or an `#[inline]` function so that the engine, monomorphised
/// per format, compiles to straight-line code per entry.
pub trait Format: 'static {
    const NAME: &'static str;
    /// log2 of the translation granule (the smallest leaf, and the size of a table).
    const GRANULE_SHIFT: u32;
    /// Index bits resolved by one non-root level.
    const BITS_PER_LEVEL: u32;
    /// Bit `l` set: level `l` may hold a leaf (before hardware limits).
    const LEAF_LEVELS: u32;
    /// Leaves have a hardware-maintained dirty state.
    const HAS_DIRTY: bool;
    /// The contiguous-hint bit, or 0 if the format has none.
    const CONT_BIT: u64 = 0;
    /// AND mask, then OR mask, that make a dirty leaf clean.
    const CLEAN_AND: u64 = !0;
    const CLEAN_OR: u64 = 0;

    /// Validates `cfg` against the format and derives the table shape.
    fn geometry(cfg: &Config) -> Result<Geometry, ConfigError>;

    /// Entries in one contiguous-hint run at `level`, or 0.
    #[inline(always)]
    fn contiguous_entries(level: u32) -> usize {
        let _ = level;
        0
    }

    /// Every bit of a leaf except its output address. `block` selects a leaf above level 0.
    fn leaf_template(prot: Prot, cfg: &Config, block: bool) -> Result<u64, MapError>;
    /// A table entry pointing at the table at `table`.
    fn table_entry(table: PhysAddr, cfg: &Config) -> u64;
    /// The output-address field for `pa` (granule aligned, below 2^oas).
    fn oa_bits(pa: PhysAddr) -> u64;
    /// The address held in a table entry or leaf (for a block leaf, mask with the leaf size).
    fn entry_addr(pte: u64) -> PhysAddr;
    /// The walker treats this entry as present.
    fn is_valid(pte: u64) -> bool;
    /// A present entry that points to a next-level table (never true at level 0).
    fn is_table(pte: u64, level: u32) -> bool;
    /// A present leaf whose dirty state is set.
    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        let _ = pte;
        false
    }
    /// Decodes the attribute bits of a present entry for a debug dump.
    fn describe(pte: u64, level: u32, out: &mut dyn fmt::Write) -> fmt::Result;
}

/// Standard geometry for formats with a fixed number of levels and a full root table.
pub(crate) fn fixed_geometry(
    cfg: &Config,
    levels: u32,
    granule_shift: u32,
    bits: u32,
    max_ias: u32,
    max_oas: u32,
) -> Result<Geometry, ConfigError> {
    if cfg.ias <= granule_shift || cfg.ias > max_ias {
        return Err(ConfigError::InputSize);
    }
    if cfg.oas <= granule_shift || cfg.oas > max_oas {
        return Err(ConfigError::OutputSize);
    }
    let table_bytes = 8usize << bits;
    Ok(Geometry {
        levels,
        root_entries: 1 << bits,
        root_bytes: table_bytes,
        table_bytes,
        ias: cfg.ias,
        oas: cfg.oas,
    })
}

/// A shrunken geometry over the descriptor encoding of `F`: `BITS` index bits per level and
/// `LEVELS` levels, same granule. `Narrow<VtdSecondStage<4>, 2, 3>` has 4-entry tables and a
/// 256 KiB input space, with genuine VT-d entries; leaves are 4 KiB, 16 KiB and 64 KiB. Meant for
/// model checking (loom), where every entry is a modelled atomic and full 512-entry tables would
/// make the state space explode. No contiguous hint.
pub struct Narrow<F, const BITS: u32, const LEVELS: u32>(PhantomData<F>);

impl<F: Format, const BITS: u32, const LEVELS: u32> Format for Narrow<F, BITS, LEVELS> {
    const NAME: &'static str = F::NAME;
    const GRANULE_SHIFT: u32 = F::GRANULE_SHIFT;
    const BITS_PER_LEVEL: u32 = BITS;
    const LEAF_LEVELS: u32 = F::LEAF_LEVELS & ((1 << LEVELS) - 1);
    const HAS_DIRTY: bool = F::HAS_DIRTY;
    const CLEAN_AND: u64 = F::CLEAN_AND;
    const CLEAN_OR: u64 = F::CLEAN_OR;

    fn geometry(cfg: &Config) -> Result<Geometry, ConfigError> {
        if BITS == 0 || BITS > F::BITS_PER_LEVEL || LEVELS == 0 || LEVELS > 5 {
            return Err(ConfigError::Format);
        }
        let max = F::GRANULE_SHIFT + BITS * LEVELS;
        fixed_geometry(cfg, LEVELS, F::GRANULE_SHIFT, BITS, max, 52)
    }
    #[inline(always)]
    fn leaf_template(prot: Prot, cfg: &Config, block: bool) -> Result<u64, MapError> {
        F::leaf_template(prot, cfg, block)
    }
    #[inline(always)]
    fn table_entry(table: PhysAddr, cfg: &Config) -> u64 {
        F::table_entry(table, cfg)
    }
    #[inline(always)]
    fn oa_bits(pa: PhysAddr) -> u64 {
        F::oa_bits(pa)
    }
    #[inline(always)]
    fn entry_addr(pte: u64) -> PhysAddr {
        F::entry_addr(pte)
    }
    #[inline(always)]
    fn is_valid(pte: u64) -> bool {
        F::is_valid(pte)
    }
    #[inline(always)]
    fn is_table(pte: u64, level: u32) -> bool {
        // The inner format decides "table or leaf" from level-dependent bits (PS, bit 1); the
        // levels here map onto the inner format's lowest levels, which keeps that meaning.
        F::is_table(pte, level)
    }
    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        F::is_dirty(pte)
    }
    fn describe(pte: u64, level: u32, out: &mut dyn fmt::Write) -> fmt::Result {
        F::describe(pte, level, out)
    }
}

/// Writes the names of the set flags in `flags` separated by spaces.
pub(crate) fn write_flags(
    pte: u64,
    flags: &[(u64, &str)],
    out: &mut dyn fmt::Write,
) -> fmt::Result {
    let mut first = true;
    for &(mask, name) in flags {
        if pte & mask != 0 {
            if !first {
                out.write_char(' ')?;
            }
            out.write_str(name)?;
            first = false;
        }
    }
    Ok(())
}

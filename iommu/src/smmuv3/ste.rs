//! Stream table entries (IHI 0070 §5.2), level-1 stream table descriptors (§5.1), and the
//! architected update order for a live STE (§3.21.3).
//!
//! An STE is 64 bytes, eight little-endian 64-bit words; the SMMU reads each word with
//! single-copy atomicity but the entry as a whole is *not* read atomically (§3.21.3), so a
//! change to a live STE must keep every mix of old and new words that the SMMU could read
//! valid and consistent. [`plan_update`] computes such an order; see its documentation and
//! `docs/smmuv3.md` for the sequence per transition.

use super::regs::AccessAttrs;

/// Bytes in one STE.
pub const STE_BYTES: usize = 64;
/// 64-bit words in one STE.
pub const STE_WORDS: usize = 8;

/// Field positions, word by word (word `n` holds STE bits `64n+63 : 64n`).
pub mod bits {
    // ---- word 0 ----
    /// V, bit 0: the entry is valid.
    pub const V: u64 = 1 << 0;
    /// Config, bits 3:1.
    pub const CONFIG_SHIFT: u32 = 1;
    pub const CONFIG_MASK: u64 = 7 << CONFIG_SHIFT;
    /// S1Fmt, bits 5:4: CD table format (0 = linear).
    pub const S1FMT_SHIFT: u32 = 4;
    /// S1ContextPtr, bits 51:6.
    pub const S1_CONTEXT_PTR: u64 = 0x000f_ffff_ffff_ffc0;
    /// S1CDMax, bits 63:59: log2 of the number of CDs (0 = one CD, no substreams).
    pub const S1CDMAX_SHIFT: u32 = 59;

    // ---- word 1 ----
    /// S1DSS, bits 1:0 (only with S1CDMax > 0).
    pub const S1DSS_SHIFT: u32 = 0;
    /// S1CIR, bits 3:2: CD fetch inner cacheability.
    pub const S1CIR_SHIFT: u32 = 2;
    /// S1COR, bits 5:4: CD fetch outer cacheability.
    pub const S1COR_SHIFT: u32 = 4;
    /// S1CSH, bits 7:6: CD fetch shareability.
    pub const S1CSH_SHIFT: u32 = 6;
    /// The stage-1-only fields of word 1 (S1DSS, S1CIR, S1COR, S1CSH, S1STALLD).
    pub const W1_S1_FIELDS: u64 = 0xff | S1STALLD;
    /// S1STALLD, bit 27: stall disable.
    pub const S1STALLD: u64 = 1 << 27;
    /// EATS, bits 29:28: ATS (0 = ATS translation requests abort).
    pub const EATS_SHIFT: u32 = 28;
    /// STRW, bits 31:30: StreamWorld (0 = NS-EL1).
    pub const STRW_SHIFT: u32 = 30;
    /// SHCFG, bits 45:44: shareability override (1 = use the incoming shareability).
    pub const SHCFG_SHIFT: u32 = 44;
    pub const SHCFG_INCOMING: u64 = 1;

    // ---- word 2 ----
    /// S2VMID, bits 15:0.
    pub const S2VMID_MASK: u64 = 0xffff;
    /// S2T0SZ, bits 37:32 (STE bits 165:160).
    pub const S2T0SZ_SHIFT: u32 = 32;
    /// S2SL0, bits 39:38.
    pub const S2SL0_SHIFT: u32 = 38;
    /// S2IR0, bits 41:40.
    pub const S2IR0_SHIFT: u32 = 40;
    /// S2OR0, bits 43:42.
    pub const S2OR0_SHIFT: u32 = 42;
    /// S2SH0, bits 45:44.
    pub const S2SH0_SHIFT: u32 = 44;
    /// S2TG, bits 47:46 (0 = 4 KiB, 1 = 64 KiB, 2 = 16 KiB).
    pub const S2TG_SHIFT: u32 = 46;
    /// S2PS, bits 50:48 (PA size encoding, as IDR5.OAS).
    pub const S2PS_SHIFT: u32 = 48;
    /// S2AA64, bit 51: stage-2 tables are VMSAv8-64.
    pub const S2AA64: u64 = 1 << 51;
    /// S2ENDI, bit 52: big-endian walks.
    pub const S2ENDI: u64 = 1 << 52;
    /// S2AFFD, bit 53: access-flag faults disabled.
    pub const S2AFFD: u64 = 1 << 53;
    /// S2PTW, bit 54: stage-1 walks that hit stage-2 Device memory fault.
    pub const S2PTW: u64 = 1 << 54;
    /// S2HD, bit 55 / S2HA, bit 56: hardware dirty / access flag updates.
    pub const S2HD: u64 = 1 << 55;
    pub const S2HA: u64 = 1 << 56;
    /// S2S, bit 57: stall on stage-2 faults.
    pub const S2S: u64 = 1 << 57;
    /// S2R, bit 58: record stage-2 faults as events.
    pub const S2R: u64 = 1 << 58;

    // ---- word 3 ----
    /// S2TTB, bits 51:4.
    pub const S2TTB: u64 = 0x000f_ffff_ffff_fff0;

    // ---- level-1 stream table descriptor (§5.1) ----
    /// Span, bits 4:0: the level-2 table holds 2^(Span-1) STEs; 0 = invalid.
    pub const L1_SPAN_MASK: u64 = 0x1f;
    /// L2Ptr, bits 51:6.
    pub const L1_L2PTR: u64 = 0x000f_ffff_ffff_ffc0;
}
use bits::*;

/// STE.Config (§5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamConfig {
    /// 0b000: every transaction aborts, no event recorded.
    Abort,
    /// 0b100: both stages bypass.
    Bypass,
    /// 0b101: stage 1 translates, stage 2 bypasses.
    S1,
    /// 0b110: stage 1 bypasses, stage 2 translates.
    S2,
    /// 0b111: both stages translate (nested).
    Nested,
    /// 0b001-0b011: reserved (treated as C_BAD_STE by the SMMU).
    Reserved(u8),
}

impl StreamConfig {
    pub const fn encode(self) -> u64 {
        let raw = match self {
            StreamConfig::Abort => 0b000,
            StreamConfig::Bypass => 0b100,
            StreamConfig::S1 => 0b101,
            StreamConfig::S2 => 0b110,
            StreamConfig::Nested => 0b111,
            StreamConfig::Reserved(r) => r as u64 & 7,
        };
        raw << CONFIG_SHIFT
    }

    pub const fn decode(word0: u64) -> Self {
        match (word0 & CONFIG_MASK) >> CONFIG_SHIFT {
            0b000 => StreamConfig::Abort,
            0b100 => StreamConfig::Bypass,
            0b101 => StreamConfig::S1,
            0b110 => StreamConfig::S2,
            0b111 => StreamConfig::Nested,
            r => StreamConfig::Reserved(r as u8),
        }
    }

    /// Stage 1 translates.
    pub const fn s1(self) -> bool {
        matches!(self, StreamConfig::S1 | StreamConfig::Nested)
    }

    /// Stage 2 translates.
    pub const fn s2(self) -> bool {
        matches!(self, StreamConfig::S2 | StreamConfig::Nested)
    }
}

/// What an STE needs to point stage 2 at a table (the VTCR-like fields of word 2, and S2TTB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct S2Fields {
    pub vmid: u16,
    /// Physical address of the (possibly concatenated) root table.
    pub ttb: u64,
    /// 64 − input bits.
    pub t0sz: u8,
    /// Initial lookup level encoding (4 KiB granule: 0 = level 2, 1 = level 1, 2 = level 0).
    pub sl0: u8,
    /// Output size encoding (IDR5.OAS style).
    pub ps: u8,
}

/// The cacheability/shareability encodings shared by CD fetches (STE.S1CIR/S1COR/S1CSH),
/// stage-2 walks (S2IR0/S2OR0/S2SH0) and stage-1 walks (CD.IR0/OR0/SH0): 0 = non-cacheable,
/// 1 = write-back read/write-allocate, 2 = write-through; shareability 0/2/3 = non/outer/inner.
pub(crate) const fn attr_fields(a: AccessAttrs) -> (u64, u64, u64) {
    (a.inner as u64, a.outer as u64, a.share as u64)
}

/// One stream table entry, eight 64-bit words.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ste(pub [u64; STE_WORDS]);

impl core::fmt::Debug for Ste {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Ste({:?}", self.config())?;
        for w in self.0 {
            write!(f, " {w:#018x}")?;
        }
        f.write_str(")")
    }
}

impl Ste {
    /// V = 0: the SMMU reports C_BAD_STE for any transaction.
    pub const INVALID: Ste = Ste([0; STE_WORDS]);

    /// V = 1, Config = abort: transactions are terminated without an event (§5.2). What every
    /// StreamID starts as, and what detach returns to.
    pub const fn abort() -> Ste {
        let mut w = [0; STE_WORDS];
        w[0] = V | StreamConfig::Abort.encode();
        Ste(w)
    }

    /// V = 1, Config = bypass. SHCFG = 01 keeps the incoming shareability (with 00 the
    /// transaction would be made non-shareable); the other attribute overrides stay 0 (use
    /// incoming), so word 1 has the same non-stage-1 bits as a translating STE.
    pub const fn bypass() -> Ste {
        let mut w = [0; STE_WORDS];
        w[0] = V | StreamConfig::Bypass.encode();
        w[1] = SHCFG_INCOMING << SHCFG_SHIFT;
        Ste(w)
    }

    /// Stage 1 only: one linear CD table of one CD at `cd` (S1Fmt = 0, S1CDMax = 0),
    /// StreamWorld NS-EL1, fetched with `attrs`. S2VMID = 0: on an SMMU with stage 2 the VMID
    /// also tags stage-1-only translations (§5.2 S2VMID), and the driver reserves VMID 0 for
    /// them, so `CMD_TLBI_NH_*` for these domains carry VMID 0.
    pub const fn s1(cd: u64, attrs: AccessAttrs) -> Ste {
        let mut w = [0; STE_WORDS];
        w[0] = V | StreamConfig::S1.encode() | (cd & S1_CONTEXT_PTR);
        w[1] = s1_word1(attrs);
        Ste(w)
    }

    /// Stage 2 only, with fault recording (S2R = 1: QEMU, like the architecture, reports a
    /// stage-2 translation fault only when it is set). Word 2 is the same as in a nested STE
    /// over the same domain (S2PTW included, meaningless without stage 1), so switching a
    /// stream between the two is hitless.
    pub const fn s2(s2: &S2Fields, walk: AccessAttrs) -> Ste {
        let mut w = [0; STE_WORDS];
        w[0] = V | StreamConfig::S2.encode();
        w[1] = SHCFG_INCOMING << SHCFG_SHIFT;
        w[2] = s2_word2(s2, walk);
        w[3] = s2.ttb & S2TTB;
        Ste(w)
    }

    /// Nested: the CD at `cd` (an IPA) and its stage-1 tables, translated by stage 2.
    pub const fn nested(cd: u64, s2: &S2Fields, attrs: AccessAttrs) -> Ste {
        let mut w = [0; STE_WORDS];
        w[0] = V | StreamConfig::Nested.encode() | (cd & S1_CONTEXT_PTR);
        w[1] = s1_word1(attrs);
        w[2] = s2_word2(s2, attrs);
        w[3] = s2.ttb & S2TTB;
        Ste(w)
    }

    pub const fn valid(&self) -> bool {
        self.0[0] & V != 0
    }

    pub const fn config(&self) -> StreamConfig {
        StreamConfig::decode(self.0[0])
    }

    pub const fn s1_context_ptr(&self) -> u64 {
        self.0[0] & S1_CONTEXT_PTR
    }

    pub const fn s2_vmid(&self) -> u16 {
        (self.0[2] & S2VMID_MASK) as u16
    }

    pub const fn s2_ttb(&self) -> u64 {
        self.0[3] & S2TTB
    }

    /// The bits the SMMU interprets under this entry's own V and Config: a conservative
    /// superset (treating a bit as used that is not only costs a hitless update).
    ///
    /// * V = 0: V only. Abort: V and Config.
    /// * Bypass: word 0 V/Config; word 1 except the stage-1 fields (the attribute overrides,
    ///   EATS, STRW, ... apply to bypassed traffic).
    /// * Stage 1: word 0 and word 1 whole; S2VMID of word 2 (it tags the stage-1 TLB entries
    ///   when stage 2 is implemented).
    /// * Stage 2: word 0 V/Config; word 1 except the stage-1 fields; words 2 and 3 whole.
    /// * Nested or a reserved Config: words 0-3 whole.
    ///
    /// Words 4-7 (Secure, MPAM, ...) are zero in every entry this driver writes and treated
    /// as unused.
    pub const fn used(&self) -> [u64; STE_WORDS] {
        let mut u = [0; STE_WORDS];
        if !self.valid() {
            u[0] = V;
            return u;
        }
        let cfg = V | CONFIG_MASK;
        match self.config() {
            StreamConfig::Abort => u[0] = cfg,
            StreamConfig::Bypass => {
                u[0] = cfg;
                u[1] = !W1_S1_FIELDS;
            }
            StreamConfig::S1 => {
                u[0] = !0;
                u[1] = !0;
                u[2] = S2VMID_MASK;
            }
            StreamConfig::S2 => {
                u[0] = cfg;
                u[1] = !W1_S1_FIELDS;
                u[2] = !0;
                u[3] = !0;
            }
            StreamConfig::Nested | StreamConfig::Reserved(_) => {
                u[0] = !0;
                u[1] = !0;
                u[2] = !0;
                u[3] = !0;
            }
        }
        u
    }

    /// The entry as the SMMU sees it: only its used bits.
    pub const fn meaning(&self) -> [u64; STE_WORDS] {
        let u = self.used();
        let mut m = [0; STE_WORDS];
        let mut i = 0;
        while i < STE_WORDS {
            m[i] = self.0[i] & u[i];
            i += 1;
        }
        m
    }
}

const fn s1_word1(attrs: AccessAttrs) -> u64 {
    let (ir, or, sh) = attr_fields(attrs);
    ir << S1CIR_SHIFT | or << S1COR_SHIFT | sh << S1CSH_SHIFT | SHCFG_INCOMING << SHCFG_SHIFT
}

const fn s2_word2(s2: &S2Fields, walk: AccessAttrs) -> u64 {
    let (ir, or, sh) = attr_fields(walk);
    (s2.vmid as u64)
        | ((s2.t0sz as u64) & 0x3f) << S2T0SZ_SHIFT
        | ((s2.sl0 as u64) & 3) << S2SL0_SHIFT
        | ir << S2IR0_SHIFT
        | or << S2OR0_SHIFT
        | sh << S2SH0_SHIFT
        // S2TG = 0: 4 KiB granule.
        | ((s2.ps as u64) & 7) << S2PS_SHIFT
        | S2AA64
        // Leaves always carry AF = 1; with AFFD a stray AF = 0 is not a fault either.
        | S2AFFD
        // A stage-1 walk (nested) that stage 2 maps as Device memory faults instead of
        // reading device registers.
        | S2PTW
        | S2R
}

/// A level-1 stream table descriptor pointing at a level-2 table of 2^`split` STEs (§5.1:
/// Span = split + 1).
pub const fn l1_descriptor(l2: u64, split: u8) -> u64 {
    (l2 & L1_L2PTR) | (split as u64 + 1)
}

/// One step of a live STE update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Store `value` into word `word` (one 64-bit single-copy-atomic store).
    Write { word: usize, value: u64 },
    /// Clean the entry (non-coherent SMMU), issue CMD_CFGI_STE (+ CFGI_CD_ALL when stage 1 is
    /// involved) and CMD_SYNC, and wait: afterwards the SMMU holds no copy of the entry older
    /// than the stores before this step, and any fetch in flight has finished.
    Sync,
}

/// At most: the break (1 + sync), prepare (8 + sync), flip (1 + sync), clean-up (8 + sync).
pub const MAX_STEPS: usize = 24;

/// A planned update: the steps in order, and whether it breaks through abort.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    steps: [Step; MAX_STEPS],
    len: usize,
    /// The update passes through Config = abort (transactions in that window terminate,
    /// silently).
    pub breaks: bool,
}

impl Plan {
    pub fn steps(&self) -> &[Step] {
        &self.steps[..self.len]
    }

    fn push(&mut self, s: Step) {
        // MAX_STEPS covers the longest sequence `plan_update` can produce.
        self.steps[self.len] = s;
        self.len += 1;
    }

    /// Appends the stores that take `cur` to `target`, word by word, then a sync if anything
    /// was stored; `cur` becomes `target`.
    fn write_words(&mut self, cur: &mut Ste, target: &Ste) {
        let mut any = false;
        for i in 0..STE_WORDS {
            if cur.0[i] != target.0[i] {
                self.push(Step::Write {
                    word: i,
                    value: target.0[i],
                });
                cur.0[i] = target.0[i];
                any = true;
            }
        }
        if any {
            self.push(Step::Sync);
        }
    }
}

/// Plans the change of a live STE from `cur` to `new` so that every intermediate entry the SMMU
/// could assemble from old and new words is valid and consistent (§3.21.3):
///
/// 1. **Prepare**: store, in every word, the new values of the bits `cur` does not use. The
///    SMMU still sees `cur` exactly. Sync, so that no fetch begun earlier is still in flight
///    when step 2 makes those bits meaningful.
/// 2. **Flip (hitless)**: if the words in which bits *used by `new`* still differ are at most
///    one, store that word: one single-copy-atomic store switches from `cur` to `new`. Sync.
/// 3. **Clean up**: store the remaining words (bits only `cur` used, unused by `new` now).
///    Sync.
///
/// If two or more words would have to change at the flip, the update **breaks** first: word 0
/// becomes V = 1, Config = abort, with its other fields already new (one store; abort uses
/// nothing but V and Config, so this is hitless too), sync, and the plan continues from the
/// abort entry, for which everything but V/Config is unused: prepare writes words 1-7, and
/// word 0 is the single flip. The
/// stream aborts silently for the length of one command round trip; it never sees a torn entry,
/// nor V = 0 (which would log C_BAD_STE events).
pub fn plan_update(cur: &Ste, new: &Ste) -> Plan {
    let mut plan = Plan {
        steps: [Step::Sync; MAX_STEPS],
        len: 0,
        breaks: false,
    };
    let mut now = *cur;
    if now == *new {
        return plan;
    }
    if critical_words(&prepared(&now, new), new) > 1 {
        // Abort uses V and Config only, so the rest of word 0 can take its new value in the
        // same store.
        let mut abort_w0 = now;
        abort_w0.0[0] = (new.0[0] & !(V | CONFIG_MASK)) | V | StreamConfig::Abort.encode();
        plan.write_words(&mut now, &abort_w0);
        plan.breaks = true;
    }
    // Prepare.
    let prep = prepared(&now, new);
    plan.write_words(&mut now, &prep);
    // Flip: at most one word now differs in bits `new` uses.
    let used_new = new.used();
    let mut flip = now;
    for ((f, &n), &u) in flip.0.iter_mut().zip(&new.0).zip(&used_new) {
        if (*f ^ n) & u != 0 {
            *f = n;
        }
    }
    plan.write_words(&mut now, &flip);
    // Clean up.
    plan.write_words(&mut now, new);
    plan
}

/// `cur` with every bit it does not use replaced by `new`'s.
fn prepared(cur: &Ste, new: &Ste) -> Ste {
    let u = cur.used();
    Ste(core::array::from_fn(|i| {
        (cur.0[i] & u[i]) | (new.0[i] & !u[i])
    }))
}

/// Words of `now` that differ from `new` in bits `new` uses.
fn critical_words(now: &Ste, new: &Ste) -> usize {
    let u = new.used();
    (0..STE_WORDS)
        .filter(|&i| (now.0[i] ^ new.0[i]) & u[i] != 0)
        .count()
}

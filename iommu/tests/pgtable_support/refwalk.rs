//! Reference walkers, written from the specifications' descriptions of the translation process,
//! deliberately without any code or constant from the engine:
//!
//! * VT-d 4.1 §3.7.2 (second-stage translation) and §9.8 (second-level paging entries);
//! * Intel SDM vol. 3A §4.5 (4-level and 5-level paging), tables 4-15 to 4-20;
//! * Arm ARM DDI 0487 D8.2 (translation process, initial lookup level, concatenation) and D8.3
//!   (VMSAv8-64 descriptor formats), D8.6.1 (contiguous bit).
//!
//! Each walker reads raw 64-bit descriptors through `HostPool::read_phys`, exactly as hardware
//! would, and returns what the hardware would conclude.

use super::HostPool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    NotPresent {
        level: u32,
    },
    Reserved {
        level: u32,
        pte: u64,
    },
    /// Arm: a block descriptor where the architecture has none.
    BadBlock {
        level: u32,
    },
}

// ------------------------------------------------------------------------------------------
// VT-d second stage
// ------------------------------------------------------------------------------------------

/// What a VT-d second-stage walk concludes (§3.7.2: permissions are the AND across levels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdSs {
    pub pa: u64,
    pub page_size: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub snp: bool,
    pub emt: u8,
    pub ipat: bool,
    pub dirty: bool,
    pub leaf: u64,
}

/// Walks a VT-d second-stage table of `levels` levels (3, 4, 5) whose root is at `root`, with a
/// host address width of `haw` bits.
pub fn vtd_ss(
    pool: &HostPool,
    root: u64,
    levels: u32,
    haw: u32,
    iova: u64,
) -> Result<VtdSs, Fault> {
    let addr_mask = ((1u64 << haw) - 1) & !0xfff;
    let (mut r, mut w, mut x) = (true, true, true);
    let mut table = root;
    // VT-d numbers levels 1 (SL-PTE) .. 5 (SL-PML5E); bits [12 + 9(l-1) + 8 : 12 + 9(l-1)].
    for l in (1..=levels).rev() {
        let shift = 12 + 9 * (l - 1);
        let idx = (iova >> shift) & 0x1ff;
        let e = pool.read_phys(table + idx * 8);
        // §9.8: not present when R and W are both 0.
        if e & 0b11 == 0 {
            return Err(Fault::NotPresent { level: l });
        }
        // Address bits at or above HAW are reserved (must be 0).
        if e & 0x000f_ffff_ffff_f000 & !addr_mask != 0 {
            return Err(Fault::Reserved { level: l, pte: e });
        }
        r &= e & 1 != 0;
        w &= e & 2 != 0;
        x &= e & 4 != 0;
        // PS (bit 7) makes an SL-PDE a 2 MiB leaf and an SL-PDPE a 1 GiB leaf; SL-PTEs are leaves.
        let leaf = l == 1 || ((l == 2 || l == 3) && e & (1 << 7) != 0);
        if leaf {
            let size = 1u64 << shift;
            // Superpage address bits below the page size are reserved.
            if e & addr_mask & (size - 1) != 0 {
                return Err(Fault::Reserved { level: l, pte: e });
            }
            return Ok(VtdSs {
                pa: (e & addr_mask) | (iova & (size - 1)),
                page_size: size,
                read: r,
                write: w,
                exec: x,
                snp: e & (1 << 11) != 0,
                emt: ((e >> 3) & 7) as u8,
                ipat: e & (1 << 6) != 0,
                dirty: e & (1 << 9) != 0,
                leaf: e,
            });
        }
        table = e & addr_mask;
    }
    unreachable!()
}

// ------------------------------------------------------------------------------------------
// x86-64 paging
// ------------------------------------------------------------------------------------------

/// What an x86-64 walk concludes (SDM §4.6: R/W and U/S are ANDed, XD ORed across levels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X86 {
    pub pa: u64,
    pub page_size: u64,
    pub writable: bool,
    pub user: bool,
    pub exec_disable: bool,
    pub global: bool,
    pub dirty: bool,
    pub accessed: bool,
    /// PAT index = PAT:PCD:PWT of the leaf (SDM §11.12.3).
    pub pat_index: u8,
    pub leaf: u64,
}

pub fn x86(
    pool: &HostPool,
    root: u64,
    levels: u32,
    maxphyaddr: u32,
    va: u64,
) -> Result<X86, Fault> {
    let addr_mask = ((1u64 << maxphyaddr) - 1) & !0xfff;
    let (mut rw, mut us, mut xd) = (true, true, false);
    let mut table = root;
    for l in (1..=levels).rev() {
        let shift = 12 + 9 * (l - 1);
        let e = pool.read_phys(table + ((va >> shift) & 0x1ff) * 8);
        if e & 1 == 0 {
            return Err(Fault::NotPresent { level: l });
        }
        // Bits [51:MAXPHYADDR] reserved.
        if e & 0x000f_ffff_ffff_f000 & !addr_mask != 0 {
            return Err(Fault::Reserved { level: l, pte: e });
        }
        rw &= e & 2 != 0;
        us &= e & 4 != 0;
        xd |= e & (1 << 63) != 0;
        // PS in PDPTE (l = 3) and PDE (l = 2); reserved in PML4E/PML5E.
        if l >= 4 && e & (1 << 7) != 0 {
            return Err(Fault::Reserved { level: l, pte: e });
        }
        let leaf = l == 1 || ((l == 2 || l == 3) && e & (1 << 7) != 0);
        if leaf {
            let size = 1u64 << shift;
            let (pat, base) = if l == 1 {
                (e >> 7 & 1, e & addr_mask)
            } else {
                // Bit 12 is PAT; bits [shift-1:13] reserved.
                if e & addr_mask & (size - 1) & !(1 << 12) != 0 {
                    return Err(Fault::Reserved { level: l, pte: e });
                }
                (e >> 12 & 1, e & addr_mask & !(size - 1))
            };
            return Ok(X86 {
                pa: base | (va & (size - 1)),
                page_size: size,
                writable: rw,
                user: us,
                exec_disable: xd,
                global: e & (1 << 8) != 0,
                dirty: e & (1 << 6) != 0,
                accessed: e & (1 << 5) != 0,
                pat_index: ((pat << 2) | (e >> 3 & 3)) as u8,
                leaf: e,
            });
        }
        table = e & addr_mask;
    }
    unreachable!()
}

// ------------------------------------------------------------------------------------------
// Arm VMSAv8-64
// ------------------------------------------------------------------------------------------

/// Translation-regime parameters, as the hardware registers state them.
#[derive(Clone, Copy, Debug)]
pub struct ArmRegime {
    /// log2 granule: 12, 14, 16 (TG0).
    pub granule: u32,
    /// T0SZ: input size = 64 - t0sz.
    pub t0sz: u32,
    /// Initial lookup level (0..=3): from T0SZ for stage 1, from SL0 for stage 2.
    pub start_level: u32,
    pub stage2: bool,
    /// Output size in bits (IPS / PS); 52 with the 64 KiB granule puts OA[51:48] in [15:12].
    pub oas: u32,
}

impl ArmRegime {
    /// Stage 1: the initial level follows from T0SZ alone (D8.2.x: the lookup starts at the
    /// level whose index field holds the top input bit).
    pub fn stage1(granule: u32, ias: u32, oas: u32) -> Self {
        let b = granule - 3;
        let mut start = 3;
        while granule + (4 - start) * b < ias {
            start -= 1;
        }
        ArmRegime {
            granule,
            t0sz: 64 - ias,
            start_level: start,
            stage2: false,
            oas,
        }
    }
    /// Stage 2: the initial level is programmed (SL0); the root may be concatenated.
    pub fn stage2(granule: u32, ias: u32, oas: u32, sl0: u32) -> Self {
        let start_level = if granule == 12 { 2 - sl0 } else { 3 - sl0 };
        ArmRegime {
            granule,
            t0sz: 64 - ias,
            start_level,
            stage2: true,
            oas,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arm {
    pub pa: u64,
    /// Architectural level of the leaf (1, 2 or 3).
    pub level: u32,
    pub page_size: u64,
    /// Leaf descriptor bits: stage 1 AttrIndx / stage 2 MemAttr.
    pub attr: u8,
    /// AP[2:1] (stage 1) or S2AP[1:0] (stage 2).
    pub ap: u8,
    pub sh: u8,
    pub af: bool,
    pub ng: bool,
    pub contiguous: bool,
    pub dbm: bool,
    /// Bits 54:53: UXN:PXN (stage 1) or XN[1:0] (stage 2).
    pub xn: u8,
    pub leaf: u64,
}

fn arm_oa(r: &ArmRegime, e: u64) -> u64 {
    // D8.3: OA[47:granule] in place; with the 64 KiB granule and 52-bit OA, OA[51:48] in [15:12].
    let lo = e & 0x0000_ffff_ffff_ffff & !((1u64 << r.granule) - 1);
    if r.granule == 16 && r.oas == 52 {
        lo | ((e >> 12) & 0xf) << 48
    } else {
        lo
    }
}

pub fn arm(pool: &HostPool, root: u64, r: &ArmRegime, ia: u64) -> Result<Arm, Fault> {
    let ias = 64 - r.t0sz;
    assert!(ia < 1u64 << ias);
    let b = r.granule - 3;
    let mut table = root;
    for level in r.start_level..=3 {
        let shift = r.granule + (3 - level) * b;
        // The initial lookup indexes with every remaining input bit [ias-1:shift] (more than b
        // bits: concatenated tables, stage 2 only); later lookups with b bits.
        let bits = if level == r.start_level {
            ias - shift
        } else {
            b
        };
        assert!(bits <= b + if r.stage2 { 4 } else { 0 });
        let idx = (ia >> shift) & ((1u64 << bits) - 1);
        let e = pool.read_phys(table + idx * 8);
        if e & 1 == 0 {
            return Err(Fault::NotPresent { level });
        }
        // At the last level bits[1:0] = 01 is reserved (invalid).
        if level == 3 && e & 2 == 0 {
            return Err(Fault::BadBlock { level });
        }
        let is_table = e & 2 != 0 && level < 3;
        if is_table {
            table = arm_oa(r, e);
            continue;
        }
        // Block descriptors (bits[1:0] = 01): level 1 and 2 with 4 KiB, level 2 with 16/64 KiB.
        if level < 3 && e & 2 == 0 {
            let ok = match r.granule {
                12 => level == 1 || level == 2,
                _ => level == 2,
            };
            if !ok {
                return Err(Fault::BadBlock { level });
            }
        }
        let size = 1u64 << shift;
        let base = arm_oa(r, e) & !(size - 1);
        if base >= 1u64 << r.oas {
            return Err(Fault::Reserved { level, pte: e });
        }
        return Ok(Arm {
            pa: base | (ia & (size - 1)),
            level,
            page_size: size,
            attr: if r.stage2 {
                (e >> 2 & 0xf) as u8
            } else {
                (e >> 2 & 7) as u8
            },
            ap: (e >> 6 & 3) as u8,
            sh: (e >> 8 & 3) as u8,
            af: e & (1 << 10) != 0,
            ng: !r.stage2 && e & (1 << 11) != 0,
            contiguous: e & (1 << 52) != 0,
            dbm: e & (1 << 51) != 0,
            xn: (e >> 53 & 3) as u8,
            leaf: e,
        });
    }
    unreachable!()
}

/// Entries per contiguous run (D8.6.1) for `granule` at architectural `level`.
pub fn arm_contiguous_entries(granule: u32, level: u32) -> u64 {
    match (granule, level) {
        (12, 1..=3) => 16,
        (14, 3) => 128,
        (14, 2) => 32,
        (16, 3) => 32,
        (16, 2) => 32,
        _ => 0,
    }
}

/// Checks the D8.6.1 conditions on the contiguous run containing `ia`: every entry of the
/// aligned run is valid, has the hint, the same attributes, and output addresses that are
/// consecutive and aligned to the run size.
pub fn arm_check_contiguous(
    pool: &HostPool,
    root: u64,
    r: &ArmRegime,
    ia: u64,
) -> Result<(), String> {
    let first = arm(pool, root, r, ia).map_err(|f| format!("{f:?}"))?;
    if !first.contiguous {
        return Ok(());
    }
    let n = arm_contiguous_entries(r.granule, first.level);
    let span = first.page_size * n;
    let base = ia & !(span - 1);
    let attrs_of = |e: u64| e & !(0x0000_ffff_ffff_ffff & !((1u64 << r.granule) - 1));
    let w0 = arm(pool, root, r, base).map_err(|f| format!("{f:?}"))?;
    if w0.pa & (span - 1) != 0 {
        return Err(format!(
            "run at {base:#x} output {:#x} not aligned to {span:#x}",
            w0.pa
        ));
    }
    for k in 0..n {
        let w = arm(pool, root, r, base + k * first.page_size).map_err(|f| format!("{f:?}"))?;
        if !w.contiguous
            || attrs_of(w.leaf) != attrs_of(w0.leaf)
            || w.pa != w0.pa + k * first.page_size
        {
            return Err(format!("run at {base:#x}: entry {k} inconsistent: {w:?}"));
        }
    }
    Ok(())
}

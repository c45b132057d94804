//! Host tests of the VT-d driver against the fake register model and fake memory in `fake.rs`.
//!
//! Expected encodings are written out by hand from the bit layouts of VT-d 4.1 chapter 9 and
//! §6.5.2, not computed with the encoders under test. Translations are checked with a reference
//! walker written from the spec (root → context → PASID → page table), independent of the
//! driver's own decoders.

use std::cell::RefCell;
use std::rc::Rc;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

use super::fake::{FAKE_IQEI, FakeMem, FakeVtd, Processed, Store};
use super::invalidation::{Descriptor, Drain, PasidCacheScope, psi_block};
use super::regs::{FaultStatus, GlobalStatus, InvQueueAddress, RequestType};
use super::rmrr::{MAX_RMRR_DEVICES, MAX_RMRR_ISSUES};
use super::tables::{ContextEntry, PasidEntry, PasidEntryFlags, RootEntry, ScalableContextEntry};
use super::*;
use crate::pgtable::{MapError, Prot, TableMemory};

// ---------------------------------------------------------------------------------------------
// Register values
// ---------------------------------------------------------------------------------------------

/// QEMU 10 q35 intel-iommu: SAGAW 3+4 levels, MGAW 48, ND 64K, NFR 1, FRO 0x220, PSI,
/// MAMV 18, SLLPS 2M+1G, DRD/DWD.
const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
/// Legacy TCG: QI, IR, PT, IRO 0xf0; C = 0, SC = 0.
const QEMU_ECAP: u64 = 0xf0_0f4a;
/// x-scalable-mode=on: adds SRS, SMTS, SLTS.
const QEMU_ECAP_SM: u64 = 0x4800_80f0_0f4a;

const ECAP_C: u64 = 1 << 0;
const ECAP_QI: u64 = 1 << 1;
const ECAP_SC: u64 = 1 << 7;
const ECAP_PSS_SHIFT: u32 = 35;
const ECAP_PASID: u64 = 1 << 40;
const ECAP_SLTS: u64 = 1 << 46;
const ECAP_FLTS: u64 = 1 << 47;
const CAP_RWBF: u64 = 1 << 4;
const CAP_CM: u64 = 1 << 7;
const CAP_PSI: u64 = 1 << 39;

/// x-flts=on (+ x-pasid-mode, snoop-control): FLTS instead of SLTS, PASID with 20-bit PASIDs,
/// SC.
const ECAP_FLTS_UNIT: u64 =
    (QEMU_ECAP_SM & !ECAP_SLTS) | ECAP_FLTS | ECAP_PASID | 19 << ECAP_PSS_SHIFT | ECAP_SC;
/// A synthetic scalable unit with both stages.
const ECAP_BOTH: u64 = ECAP_FLTS_UNIT | ECAP_SLTS;

fn cap_nfr(nfr: u64) -> u64 {
    (QEMU_CAP & !(0xff << 40)) | (nfr - 1) << 40
}

const RW: Prot = Prot::READ.union(Prot::WRITE);
const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const G1: u64 = 0x4000_0000;

const SID: u16 = 0x0018; // 00:03.0, QEMU's edu

fn legacy() -> UnitConfig {
    UnitConfig {
        poll_budget: 1000,
        ..UnitConfig::new(TranslationMode::Legacy)
    }
}

fn scalable() -> UnitConfig {
    UnitConfig {
        poll_budget: 1000,
        ..UnitConfig::new(TranslationMode::Scalable)
    }
}

fn up<'a>(hw: &'a FakeVtd<'a>, mem: &FakeMem, cfg: UnitConfig) -> VtdUnit<&'a FakeVtd<'a>> {
    let unit = VtdUnit::new(hw, mem, cfg).unwrap();
    hw.take_processed();
    unit
}

fn rtaddr(hw: &FakeVtd<'_>) -> u64 {
    hw.s.borrow().latched_rtaddr.expect("root pointer latched")
}

// ---------------------------------------------------------------------------------------------
// Reference walker (VT-d 4.1 §3.4-3.6, §9.1-9.8), independent of the driver's decoders
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hit {
    pa: u64,
    leaf: u64,
    did: u16,
    /// Scalable mode: PGSNP of the PASID entry.
    pgsnp: bool,
}

type Walk = Result<Hit, &'static str>;

fn walk(mem: &FakeMem, rtaddr: u64, sid: u16, pasid: Option<u32>, iova: u64) -> Walk {
    let root = rtaddr & !0xfff;
    let (bus, devfn) = ((sid >> 8) as u64, (sid & 0xff) as u64);
    let re_lo = mem.read(root + bus * 16);
    let re_hi = mem.read(root + bus * 16 + 8);
    match (rtaddr >> 10) & 3 {
        0 => {
            if pasid.is_some() {
                return Err("legacy mode with PASID");
            }
            if re_lo & 1 == 0 {
                return Err("root entry not present");
            }
            let ce = (re_lo & !0xfff) + devfn * 16;
            let (lo, hi) = (mem.read(ce), mem.read(ce + 8));
            if lo & 1 == 0 {
                return Err("context entry not present");
            }
            let did = ((hi >> 8) & 0xffff) as u16;
            let levels = (hi & 7) as u32 + 2;
            match (lo >> 2) & 3 {
                // 00b: untranslated requests only; 01b: device TLB too. Both walk SLPTPTR.
                0 | 1 => ss_walk(mem, lo & !0xfff, levels, iova, did, false),
                // 10b: pass-through; AW still bounds the input (above 2^AGAW is blocked).
                2 => pass_through(levels, iova, did, false),
                _ => Err("reserved translation type"),
            }
        }
        1 => {
            let half = if devfn < 128 { re_lo } else { re_hi };
            if half & 1 == 0 {
                return Err("root entry not present");
            }
            let ce = (half & !0xfff) + (devfn & 0x7f) * 32;
            let (q0, q1) = (mem.read(ce), mem.read(ce + 8));
            if q0 & 1 == 0 {
                return Err("context entry not present");
            }
            if pasid.is_some() && q0 & (1 << 3) == 0 {
                return Err("PASIDE clear");
            }
            let p = pasid.unwrap_or((q1 & 0xf_ffff) as u32) as u64;
            let pdts = (q0 >> 9) & 7;
            if p >> 6 >= 1 << (pdts + 7) {
                return Err("PASID beyond the directory");
            }
            let de = mem.read((q0 & !0xfff) + (p >> 6) * 8);
            if de & 1 == 0 {
                return Err("PASID directory entry not present");
            }
            let pe = (de & !0xfff) + (p & 63) * 64;
            let (e0, e1, e2) = (mem.read(pe), mem.read(pe + 8), mem.read(pe + 16));
            if e0 & 1 == 0 {
                return Err("PASID entry not present");
            }
            let did = (e1 & 0xffff) as u16;
            let pgsnp = e1 & (1 << 24) != 0;
            match (e0 >> 6) & 7 {
                0b010 => ss_walk(
                    mem,
                    e0 & !0xfff,
                    ((e0 >> 2) & 7) as u32 + 2,
                    iova,
                    did,
                    pgsnp,
                ),
                0b001 => fs_walk(
                    mem,
                    e2 & !0xfff,
                    4 + ((e2 >> 2) & 3) as u32,
                    iova,
                    did,
                    pgsnp,
                ),
                0b100 => pass_through(((e0 >> 2) & 7) as u32 + 2, iova, did, pgsnp),
                _ => Err("unexpected PGTT"),
            }
        }
        _ => Err("bad TTM"),
    }
}

const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Pass-through: the output is the input, below the AGAW the entry's AW gives.
fn pass_through(levels: u32, iova: u64, did: u16, pgsnp: bool) -> Walk {
    if !(3..=5).contains(&levels) {
        return Err("bad AW");
    }
    if iova >> (12 + 9 * levels) != 0 {
        return Err("address beyond AW");
    }
    Ok(Hit {
        pa: iova,
        leaf: 0,
        did,
        pgsnp,
    })
}

fn ss_walk(mem: &FakeMem, mut table: u64, levels: u32, iova: u64, did: u16, pgsnp: bool) -> Walk {
    if !(3..=5).contains(&levels) {
        return Err("bad AW");
    }
    if iova >> (12 + 9 * levels) != 0 {
        return Err("address beyond AW");
    }
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = mem.read(table + ((iova >> shift) & 511) * 8);
        // §9.8: not present when R = W = 0.
        if e & 3 == 0 {
            return Err("second-stage entry not present");
        }
        let leaf = level == 1 || ((level == 2 || level == 3) && e & (1 << 7) != 0);
        if leaf {
            let size = 1u64 << shift;
            return Ok(Hit {
                pa: (e & PTE_ADDR & !(size - 1)) | (iova & (size - 1)),
                leaf: e,
                did,
                pgsnp,
            });
        }
        if e & 3 != 3 {
            return Err("non-leaf second-stage entry without R/W");
        }
        table = e & PTE_ADDR;
    }
    unreachable!()
}

fn fs_walk(mem: &FakeMem, mut table: u64, levels: u32, iova: u64, did: u16, pgsnp: bool) -> Walk {
    if iova >> (12 + 9 * levels - 1) != 0 {
        return Err("non-canonical / upper-half address");
    }
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = mem.read(table + ((iova >> shift) & 511) * 8);
        if e & 1 == 0 {
            return Err("first-stage entry not present");
        }
        let leaf = level == 1 || ((level == 2 || level == 3) && e & (1 << 7) != 0);
        if leaf {
            let size = 1u64 << shift;
            return Ok(Hit {
                pa: (e & PTE_ADDR & !(size - 1)) | (iova & (size - 1)),
                leaf: e,
                did,
                pgsnp,
            });
        }
        table = e & PTE_ADDR;
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------------
// Encodings, written out from the spec's bit layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn root_entry_encodings() {
    // §9.1: P bit 0, CTP bits 63:12, upper 64 bits reserved.
    let r = RootEntry::legacy(0x1234_5000);
    assert_eq!((r.lo, r.hi), (0x1234_5001, 0));
    assert!(r.present());
    assert_eq!(r.context_table(), 0x1234_5000);
    // §9.2: LP bit 0 + LCTP 63:12; UP bit 64 + UCTP 127:76.
    let s = RootEntry::scalable(Some(0xa000), Some(0xb000));
    assert_eq!((s.lo, s.hi), (0xa001, 0xb001));
    let u = RootEntry::scalable(None, Some(0xc000));
    assert_eq!((u.lo, u.hi), (0, 0xc001));
    assert_eq!((u.lower(), u.upper()), (None, Some(0xc000)));
    assert!(!RootEntry::default().present());
}

#[test]
fn context_entry_encodings() {
    // §9.3: lo = SLPTPTR | TT(3:2)=00 | FPD(1)=0 | P; hi = DID(87:72 -> 23:8) | AW(66:64).
    let c = ContextEntry::second_stage(0x7654_3000, 4, 0x1234);
    assert_eq!(c.lo, 0x7654_3001);
    assert_eq!(c.hi, 0x0012_3402);
    assert_eq!(ContextEntry::second_stage(0x1000, 3, 1).hi, 0x0000_0101);
    assert_eq!(
        ContextEntry::second_stage(0x1000, 5, 0xffff).hi,
        0x00ff_ff03
    );
    assert_eq!(
        (c.did(), c.levels(), c.slptptr(), c.present()),
        (0x1234, 4, 0x7654_3000, true)
    );
    assert!(!c.fault_processing_disabled());
    // Pass-through: TT = 10b.
    let pt = ContextEntry::pass_through(4, 7);
    assert_eq!((pt.lo, pt.hi), (0b1001, 0x0702));
    assert_eq!(pt.translation_type(), tables::TranslationType::PassThrough);
}

#[test]
fn scalable_context_and_pasid_directory_encodings() {
    // §9.4: q0 = PASIDDIRPTR | PDTS(11:9) | PASIDE(3) | P; q1 = RID_PASID(19:0) = 0.
    let c = ScalableContextEntry::new(0x5000, 2, true);
    assert_eq!(c.q, [0x5000 | 0x400 | 0x8 | 1, 0, 0, 0]);
    assert_eq!(c.pasid_dir_entries(), 512);
    assert_eq!(ScalableContextEntry::new(0x5000, 0, false).q[0], 0x5001);
    assert_eq!((c.rid_pasid(), c.paside(), c.pdts()), (0, true, 2));
    // §9.5: P bit 0, FPD bit 1 = 0, table pointer 63:12.
    assert_eq!(tables::pasid_dir_entry(0x6000), 0x6001);
}

#[test]
fn pasid_entry_encodings() {
    // §9.6 second stage: q0 = SSPTPTR | SSADE(9) | PGTT(8:6)=010 | AW(4:2) | P;
    // q1 = PGSNP(88 -> 24) | PWSNP(87 -> 23) | DID(15:0).
    let flags = PasidEntryFlags {
        page_snoop: true,
        walk_snoop: false,
        ss_access_dirty: false,
    };
    let ss = PasidEntry::second_stage(0x8000, 4, 0x42, flags);
    assert_eq!(ss.q, [0x8089, 0x0100_0042, 0, 0, 0, 0, 0, 0]);
    let ss3 = PasidEntry::second_stage(
        0x8000,
        3,
        1,
        PasidEntryFlags {
            page_snoop: false,
            walk_snoop: true,
            ss_access_dirty: true,
        },
    );
    assert_eq!(ss3.q[..2], [0x8000 | 0x200 | 0x80 | 0x4 | 1, 0x0080_0001]);
    // First stage: q0 = PGTT 001 | AW | P; q2 = FLPTR | FLPM(3:2); SSADE never set.
    let fs = PasidEntry::first_stage(0x9000, 4, 4, 7, PasidEntryFlags::default());
    assert_eq!(fs.q, [0x49, 7, 0x9000, 0, 0, 0, 0, 0]);
    let fs5 = PasidEntry::first_stage(0x9000, 5, 4, 7, flags);
    assert_eq!(fs5.q[..3], [0x49, 0x0100_0007, 0x9004]);
    assert_eq!((fs5.fl_levels(), fs5.flptr(), fs5.did()), (5, 0x9000, 7));
    // Pass-through: PGTT 100.
    assert_eq!(PasidEntry::pass_through(4, 3).q[..2], [0x109, 3]);
    assert!(ss.upper_is_zero() && !fs.upper_is_zero());
    assert_eq!(ss.pgtt(), Some(tables::Pgtt::SecondStage));
    assert_eq!(fs.pgtt(), Some(tables::Pgtt::FirstStage));
}

#[test]
fn queued_invalidation_descriptor_encodings() {
    let d = |x: Descriptor| (x.lo, x.hi);
    let both = Drain {
        reads: true,
        writes: true,
    };
    let none = Drain::default();
    // 0x1 context cache: G 5:4, DID 31:16, SID 47:32, FM 49:48.
    assert_eq!(d(Descriptor::context_global()), (0x11, 0));
    assert_eq!(d(Descriptor::context_domain(5)), (0x0005_0021, 0));
    assert_eq!(
        d(Descriptor::context_device(7, 0x0018, 1)),
        (0x0001_0018_0007_0031, 0)
    );
    // 0x2 IOTLB: G 5:4, DW 6, DR 7, DID 31:16; hi AM 5:0, IH 6, ADDR 63:12.
    assert_eq!(d(Descriptor::iotlb_global(both)), (0xd2, 0));
    assert_eq!(d(Descriptor::iotlb_domain(9, none)), (0x0009_0022, 0));
    let psi = Descriptor::iotlb_page(
        3,
        0x20_0000,
        9,
        true,
        Drain {
            reads: false,
            writes: true,
        },
    );
    assert_eq!(d(psi), (0x0003_0072, 0x0020_0049));
    // 0x3 device TLB: PFSID[3:0] 15:12, MIP 20:16, SID 47:32, PFSID[15:4] 63:52; hi S 0.
    assert_eq!(
        d(Descriptor::device_tlb(0x0100, 0x0123, 5, 0x7000, true)),
        (0x0120_0100_0005_3003, 0x7001)
    );
    // 0x4 interrupt entry cache: G 4, IM 31:27, IIDX 47:32.
    assert_eq!(d(Descriptor::iec_global()), (0x4, 0));
    assert_eq!(
        d(Descriptor::iec_index(0x20, 3)),
        (0x0000_0020_1800_0014, 0)
    );
    // 0x5 wait: IF 4, SW 5, FN 6, status data 63:32; hi status address 63:2.
    assert_eq!(
        d(Descriptor::wait(0x1_2340, 0xdead_beef, false)),
        (0xdead_beef_0000_0025, 0x1_2340)
    );
    assert_eq!(
        d(Descriptor::wait(0x1_2344, 1, true)),
        (0x1_0000_0065, 0x1_2344)
    );
    assert_eq!(d(Descriptor::wait_interrupt(true)), (0x55, 0));
    // 0x6 PASID-based IOTLB: G 5:4 (10 all-in-PASID, 11 page), DID 31:16, PASID 51:32.
    assert_eq!(
        d(Descriptor::pasid_iotlb_all(4, 0x123)),
        (0x0000_0123_0004_0026, 0)
    );
    assert_eq!(
        d(Descriptor::pasid_iotlb_page(4, 1, 0x4000_0000, 18, false)),
        (0x0000_0001_0004_0036, 0x4000_0012)
    );
    // 0x7 PASID cache: G 5:4 (00 domain, 01 PASID, 11 global), DID 31:16, PASID 51:32.
    assert_eq!(
        d(Descriptor::pasid_cache(PasidCacheScope::Pasid, 2, 5)),
        (0x0000_0005_0002_0017, 0)
    );
    assert_eq!(
        d(Descriptor::pasid_cache(PasidCacheScope::Global, 0, 0)),
        (0x37, 0)
    );
    assert_eq!(
        d(Descriptor::pasid_cache(PasidCacheScope::Domain, 3, 0)),
        (0x0003_0007, 0)
    );
    // 0x8 PASID-based device TLB: MIP 8:4, PFSID[3:0] 15:12, SID 31:16, PASID 51:32,
    // PFSID[15:4] 63:52; hi G 0, S 11, ADDR 63:12.
    assert_eq!(
        d(Descriptor::pasid_device_tlb(
            0x0208, 0x0123, 2, 9, 0x8000, true, true
        )),
        (0x0120_0009_0208_3028, 0x8801)
    );
    for (x, k) in [
        (Descriptor::context_global(), 1),
        (Descriptor::iotlb_global(none), 2),
        (Descriptor::device_tlb(0, 0, 0, 0, false), 3),
        (Descriptor::iec_global(), 4),
        (Descriptor::wait(0, 0, false), 5),
        (Descriptor::pasid_iotlb_all(0, 0), 6),
        (Descriptor::pasid_cache(PasidCacheScope::Global, 0, 0), 7),
        (Descriptor::pasid_device_tlb(0, 0, 0, 0, 0, false, false), 8),
    ] {
        assert_eq!(x.kind(), k);
    }
}

#[test]
fn psi_blocks_round_out_to_aligned_powers_of_two() {
    assert_eq!(psi_block(0x20_0000, 0x40_0000), (0x20_0000, 9));
    assert_eq!(psi_block(0x5000, 0x6000), (0x5000, 0));
    assert_eq!(
        psi_block(0x5000, 0x7000),
        (0x4000, 2),
        "pages 5..6 need the block 4..7"
    );
    assert_eq!(psi_block(G1, 2 * G1), (G1, 18));
    assert_eq!(psi_block(G1 - K4, G1 + K4), (0, 19), "straddles 1 GiB");
    assert_eq!(psi_block(0, u64::MAX), (0, 52));
}

// ---------------------------------------------------------------------------------------------
// Bring-up
// ---------------------------------------------------------------------------------------------

fn kinds(p: &[Processed]) -> Vec<u8> {
    p.iter().map(|d| d.kind()).collect()
}

#[test]
fn legacy_bring_up_with_queued_invalidation() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = VtdUnit::new(&hw, &mem, legacy()).unwrap();
    {
        let s = hw.s.borrow();
        assert_eq!(s.rtaddr, unit.root_table(), "TTM = 00");
        assert_eq!(s.latched_rtaddr, Some(unit.root_table()));
        let gsts = GlobalStatus::from_bits_retain(s.gsts);
        assert!(gsts.contains(GlobalStatus::RTPS | GlobalStatus::QIES));
        assert!(!gsts.contains(GlobalStatus::TES), "translation stays off");
        let iqa = InvQueueAddress::decode(s.iqa);
        assert!(!iqa.wide_descriptors && iqa.qs == 0, "256 × 128-bit");
        assert_eq!(s.gcmd_log, [1 << 30, 1 << 26], "SRTP, then QIE");
        assert_eq!(s.reg_inv_while_qi, 0);
    }
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 2, 5]);
    assert_eq!(
        (p[0].lo, p[1].lo),
        (0x11, 0xd2),
        "global context, global IOTLB + drain"
    );
    assert_eq!(p[2].lo & 0xff, 0x25, "wait with status write");
    let c = unit.counters();
    assert_eq!(
        (
            c.qi_descriptors,
            c.qi_waits,
            c.context_invalidations,
            c.iotlb_global
        ),
        (2, 1, 1, 1)
    );
    // ECAP.C = 0: the root table was cleaned before the hardware saw it.
    assert!(mem.cleans.borrow().contains(&(unit.root_table(), 4096)));

    unit.enable_translation().unwrap();
    assert_eq!(
        *hw.s.borrow().gcmd_log.last().unwrap(),
        0x8400_0000,
        "TE keeps QIE"
    );
    assert!(GlobalStatus::from_bits_retain(hw.s.borrow().gsts).contains(GlobalStatus::TES));
    unit.disable_translation().unwrap();
    assert_eq!(*hw.s.borrow().gcmd_log.last().unwrap(), 0x0400_0000);
    let gsts = GlobalStatus::from_bits_retain(hw.s.borrow().gsts);
    assert!(!gsts.contains(GlobalStatus::TES) && gsts.contains(GlobalStatus::QIES));
    assert_eq!(hw.s.borrow().te_without_root, 0);
}

#[test]
fn register_based_bring_up_without_qi() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP & !ECAP_QI);
    let unit = VtdUnit::new(&hw, &mem, legacy()).unwrap();
    let s = hw.s.borrow();
    assert_eq!(s.ccmd_log, [1 << 63 | 1 << 61]);
    assert_eq!(s.iotlb_log, [(1 << 63 | 1 << 60 | 1 << 49 | 1 << 48, 0)]);
    assert_eq!(s.iqa, 0);
    assert_eq!(s.gcmd_log, [1 << 30], "no QIE");
    assert_eq!(unit.counters().register_invalidations, 2);
    assert_eq!(unit.counters().qi_waits, 0);
}

#[test]
fn scalable_bring_up() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM);
    let unit = VtdUnit::new(&hw, &mem, scalable()).unwrap();
    assert_eq!(
        hw.s.borrow().rtaddr,
        unit.root_table() | 1 << 10,
        "TTM = 01"
    );
    let iqa = InvQueueAddress::decode(hw.s.borrow().iqa);
    assert!(iqa.wide_descriptors, "PASID-based descriptors need DW = 1");
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 7, 2, 5]);
    assert_eq!(p[1].lo, 0x37, "global PASID-cache invalidation");
    assert_eq!(unit.mode(), TranslationMode::Scalable);
}

#[test]
fn unsupported_modes_and_stages() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    assert_eq!(
        VtdUnit::new(&hw, &mem, scalable()).err(),
        Some(VtdError::ModeUnsupported)
    );
    let mut unit = up(&hw, &mem, legacy());
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::first_stage(48))
            .err(),
        Some(VtdError::FirstStageUnsupported)
    );
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::second_stage(57))
            .err(),
        Some(VtdError::AddressWidthUnsupported { requested: 57 })
    );
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::second_stage(40))
            .err(),
        Some(VtdError::AddressWidthUnsupported { requested: 40 })
    );
    let dirty = DomainConfig {
        dirty_tracking: true,
        ..DomainConfig::second_stage(48)
    };
    assert_eq!(
        unit.create_domain(&mem, dirty).err(),
        Some(VtdError::DirtyTrackingUnsupported)
    );
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    assert_eq!(
        unit.attach(&mem, SID, Some(1), &d),
        Err(VtdError::PasidUnsupported)
    );
    unit.destroy_domain(&mem, d).unwrap();

    let mem2 = FakeMem::new(32);
    let hw2 = FakeVtd::new(&mem2, QEMU_CAP, ECAP_FLTS_UNIT);
    let mut sm = up(&hw2, &mem2, scalable());
    assert_eq!(
        sm.create_domain(&mem2, DomainConfig::second_stage(48))
            .err(),
        Some(VtdError::SecondStageUnsupported),
        "x-flts has no SLTS"
    );
    assert_eq!(
        sm.create_domain(&mem2, DomainConfig::first_stage(57)).err(),
        Some(VtdError::AddressWidthUnsupported { requested: 57 }),
        "no FL5LP"
    );
}

// ---------------------------------------------------------------------------------------------
// Attach, detach, translations
// ---------------------------------------------------------------------------------------------

#[test]
fn legacy_attach_translate_detach() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    assert_eq!((d.did(), d.levels(), d.input_bits()), (1, 4, 48));
    unit.map(&mem, &d, 0x0abc_d000, 0x5000_0000, K4, RW)
        .unwrap();
    assert_eq!(unit.iova_to_phys(&mem, &d, 0x0abc_d123), Some(0x5000_0123));
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 0x0abc_d123),
        Err("root entry not present")
    );

    unit.attach(&mem, SID, None, &d).unwrap();
    let hit = walk(&mem, rtaddr(&hw), SID, None, 0x0abc_d123).unwrap();
    assert_eq!((hit.pa, hit.did), (0x5000_0123, 1));
    assert_eq!(hit.leaf & (1 << 11), 0, "no SNP for a non-coherent domain");
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID + 1, None, 0x0abc_d123),
        Err("context entry not present"),
        "other functions stay blocked"
    );
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 0x0abc_e000),
        Err("second-stage entry not present")
    );
    assert_eq!(
        unit.attach(&mem, SID, None, &d),
        Err(VtdError::AlreadyAttached)
    );
    assert!(
        hw.take_processed().is_empty(),
        "not-present -> present needs no flush (CM = 0)"
    );

    // A 3-level domain on another device.
    let d3 = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    unit.map(&mem, &d3, G1, 2 * G1, G1, Prot::READ).unwrap();
    unit.attach(&mem, 0x0300, None, &d3).unwrap();
    let hit = walk(&mem, rtaddr(&hw), 0x0300, None, G1 + 0x1234).unwrap();
    assert_eq!((hit.pa, hit.did), (2 * G1 + 0x1234, 2));
    assert_eq!(hit.leaf & 3, 1, "read-only 1 GiB leaf");

    unit.detach(&mem, SID, None).unwrap();
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 0x0abc_d123),
        Err("context entry not present")
    );
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 2, 5]);
    assert_eq!(
        p[0].lo, 0x0018_0001_0031,
        "device-selective, old DID 1, SID 00:03.0"
    );
    assert_eq!(p[1].lo, 0x0001_00e2, "domain-selective IOTLB, DID 1, drain");
    assert_eq!(unit.detach(&mem, SID, None), Err(VtdError::NotAttached));
    assert_eq!(unit.detach(&mem, 0x4400, None), Err(VtdError::NotAttached));
    assert_eq!(
        unit.replace(&mem, SID, None, &d),
        Err(VtdError::NotAttached)
    );
}

#[test]
fn scalable_second_stage_attach() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM);
    let mut unit = up(&hw, &mem, scalable());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, 0x10_0000, 0x7000_0000, 4 * K4, RW)
        .unwrap();
    // One device in the lower half of bus 1, one in the upper half.
    for sid in [0x0108, 0x0185] {
        unit.attach(&mem, sid, None, &d).unwrap();
        let hit = walk(&mem, rtaddr(&hw), sid, None, 0x10_2abc).unwrap();
        assert_eq!((hit.pa, hit.did, hit.pgsnp), (0x7000_2abc, d.did(), false));
    }
    assert_eq!(
        unit.attach(&mem, 0x0108, Some(0), &d),
        Err(VtdError::AlreadyAttached),
        "PASID 0 is RID_PASID"
    );
    assert_eq!(
        unit.attach(&mem, 0x0108, Some(3), &d),
        Err(VtdError::PasidUnsupported),
        "QEMU's scalable mode has no ECAP.PASID"
    );
    unit.detach(&mem, 0x0185, None).unwrap();
    assert_eq!(
        walk(&mem, rtaddr(&hw), 0x0185, None, 0x10_2abc),
        Err("PASID entry not present")
    );
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [7, 2, 5]);
    assert_eq!(p[0].lo, 0x0001_0017, "PASID-selective, DID 1, PASID 0");
    assert!(walk(&mem, rtaddr(&hw), 0x0108, None, 0x10_2abc).is_ok());
}

#[test]
fn scalable_first_stage_with_pasids() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, ECAP_FLTS_UNIT);
    let mut unit = up(&hw, &mem, scalable());
    let d = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    assert_eq!((d.levels(), d.input_bits()), (4, 47));
    unit.map(&mem, &d, 0x4000_0000, 0x8000_0000, M2, RW)
        .unwrap();
    unit.attach(&mem, SID, None, &d).unwrap();
    unit.attach(&mem, SID, Some(5), &d).unwrap();
    for pasid in [None, Some(0), Some(5)] {
        let hit = walk(&mem, rtaddr(&hw), SID, pasid, 0x4001_2345).unwrap();
        assert_eq!(hit.pa, 0x8001_2345);
        assert_eq!(hit.leaf & 0x81, 0x81, "present 2 MiB first-stage leaf");
    }
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, Some(6), 0x4001_2345),
        Err("PASID entry not present")
    );
    assert_eq!(
        unit.attach(&mem, SID, Some(32768), &d),
        Err(VtdError::PasidOutOfRange {
            pasid: 32768,
            limit: 32768
        })
    );
    // Unmap: one PASID-based page invalidation per attached PASID, one wait.
    hw.take_processed();
    assert_eq!(unit.unmap(&mem, &d, 0x4000_0000, M2), Ok(M2));
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [6, 6, 5]);
    let mut pasids: Vec<u64> = p[..2].iter().map(|x| (x.lo >> 32) & 0xf_ffff).collect();
    pasids.sort();
    assert_eq!(pasids, [0, 5]);
    for x in &p[..2] {
        assert_eq!(
            x.lo & 0xffff_ffff,
            0x0001_0036,
            "page-selective in PASID, DID 1"
        );
        assert_eq!(x.hi, 0x4000_0000 | 0x40 | 9, "AM 9, leaf only");
    }
    assert_eq!(unit.counters().pasid_iotlb_invalidations, 2);
    // Detaching PASID 5 uses the PASID-based IOTLB descriptor for the old first-stage DID.
    unit.detach(&mem, SID, Some(5)).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [7, 6, 5]);
    assert_eq!(p[1].lo, 0x0000_0005_0001_0026);
    // Narrow PASID space: PSS = 4 → 32 PASIDs.
    let mem2 = FakeMem::new(32);
    let hw2 = FakeVtd::new(
        &mem2,
        QEMU_CAP,
        (ECAP_FLTS_UNIT & !(0x1f << ECAP_PSS_SHIFT)) | 4 << ECAP_PSS_SHIFT,
    );
    let mut u2 = up(&hw2, &mem2, scalable());
    let d2 = u2
        .create_domain(&mem2, DomainConfig::first_stage(48))
        .unwrap();
    assert_eq!(
        u2.attach(&mem2, SID, Some(32), &d2),
        Err(VtdError::PasidOutOfRange {
            pasid: 32,
            limit: 32
        })
    );
    u2.attach(&mem2, SID, Some(31), &d2).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Replace
// ---------------------------------------------------------------------------------------------

/// Records the walk result of (`sid`, `pasid`, `iova`) after every store the driver makes.
fn watch(
    mem: &FakeMem,
    rt: u64,
    sid: u16,
    pasid: Option<u32>,
    iova: u64,
) -> Rc<RefCell<Vec<Walk>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    mem.set_hook(move |m: &FakeMem, _: &Store| {
        s.borrow_mut().push(walk(m, rt, sid, pasid, iova));
    });
    mem.stores.borrow_mut().clear();
    seen
}

#[test]
fn legacy_replace_is_one_128_bit_store() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let a = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let b = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    unit.map(&mem, &a, 0x1000, 0xa000_0000, K4, RW).unwrap();
    unit.map(&mem, &b, 0x1000, 0xb000_0000, K4, RW).unwrap();
    unit.attach(&mem, SID, None, &a).unwrap();
    hw.take_processed();

    let seen = watch(&mem, rtaddr(&hw), SID, None, 0x1234);
    unit.replace(&mem, SID, None, &b).unwrap();
    mem.clear_hook();
    let stores = mem.stores.borrow().clone();
    assert_eq!(stores.len(), 1, "{stores:x?}");
    assert!(stores[0].hi.is_some(), "a 128-bit store");
    let after = seen.borrow()[0].unwrap();
    assert_eq!((after.pa, after.did), (0xb000_0234, b.did()));
    // Invalidations: the old DID's context-cache entry for the device, then its IOTLB.
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 2, 5]);
    assert_eq!(p[0].lo, 0x0018_0001_0031);
    assert_eq!(p[1].lo, 0x0001_00e2);
    // Replacing with the current domain is a no-op.
    unit.replace(&mem, SID, None, &b).unwrap();
    assert!(hw.take_processed().is_empty());
    // The old domain is free again.
    unit.destroy_domain(&mem, a).unwrap();
    assert_eq!(
        unit.try_destroy_domain(&mem, b).err().map(|e| e.0),
        Some(VtdError::DomainBusy { attachments: 1 })
    );
}

#[test]
fn scalable_second_stage_replace_is_one_128_bit_store() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM | ECAP_SC);
    let mut unit = up(&hw, &mem, scalable());
    let a = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let b = unit
        .create_domain(&mem, DomainConfig::second_stage(39).coherent())
        .unwrap();
    unit.map(&mem, &a, 0x1000, 0xa000_0000, K4, RW).unwrap();
    unit.map(&mem, &b, 0x1000, 0xb000_0000, K4, RW).unwrap();
    unit.attach(&mem, SID, None, &a).unwrap();
    hw.take_processed();

    let seen = watch(&mem, rtaddr(&hw), SID, None, 0x1234);
    unit.replace(&mem, SID, None, &b).unwrap();
    mem.clear_hook();
    assert_eq!(mem.stores.borrow().len(), 1);
    assert!(mem.stores.borrow()[0].hi.is_some());
    let after = seen.borrow()[0].unwrap();
    assert_eq!(
        (after.pa, after.did, after.pgsnp),
        (0xb000_0234, b.did(), true)
    );
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [7, 2, 5]);
    assert_eq!(
        p[0].lo, 0x0001_0017,
        "PASID cache, PASID-selective, old DID 1"
    );
    assert_eq!(p[1].lo & 0xffff_00ff, 0x0001_00e2, "IOTLB DSI of old DID 1");
}

/// Replaces involving first stage: the walk of the replaced PASID gives the old or the new
/// translation after every store, and a sibling PASID in the same table keeps its translation.
#[test]
fn scalable_first_stage_replace_swaps_the_pasid_table() {
    let mem = FakeMem::new(96);
    let hw = FakeVtd::new(&mem, QEMU_CAP, ECAP_BOTH);
    let mut unit = up(&hw, &mem, scalable());
    let fs_a = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    let fs_b = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    let ss_c = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let sibling = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    for (d, pa) in [
        (&fs_a, 0xa000_0000),
        (&fs_b, 0xb000_0000),
        (&ss_c, 0xc000_0000),
        (&sibling, 0xd000_0000),
    ] {
        unit.map(&mem, d, 0x1000, pa, K4, RW).unwrap();
    }
    let pasid = Some(70);
    unit.attach(&mem, SID, pasid, &fs_a).unwrap();
    unit.attach(&mem, SID, Some(71), &sibling).unwrap();
    hw.take_processed();
    let rt = rtaddr(&hw);
    let sib = || walk(&mem, rt, SID, Some(71), 0x1234).unwrap().pa;

    let mut current = 0xa000_0234;
    for (next, target) in [
        (&fs_b, 0xb000_0234u64),
        (&ss_c, 0xc000_0234),
        (&fs_a, 0xa000_0234),
    ] {
        let dir_entry = {
            let q0 = mem.read(hw_ctx(&mem, rt, SID));
            // PASID 70: directory entry 70 >> 6 = 1.
            (q0 & !0xfff) + 8
        };
        let old_table = mem.read(dir_entry) & !0xfff;
        let seen = watch(&mem, rt, SID, pasid, 0x1234);
        unit.replace(&mem, SID, pasid, next).unwrap();
        mem.clear_hook();
        let seen = seen.borrow().clone();
        assert!(
            seen.iter()
                .all(|w| matches!(w, Ok(h) if h.pa == current || h.pa == target)),
            "{seen:x?}"
        );
        let switch = seen.iter().position(|w| w.unwrap().pa == target).unwrap();
        assert!(seen[switch..].iter().all(|w| w.unwrap().pa == target));
        // The switching store is the one 64-bit store of the PASID-directory entry.
        let stores = mem.stores.borrow().clone();
        assert_eq!(stores[switch].pa, dir_entry);
        assert_eq!(stores[switch].hi, None);
        assert_eq!(
            stores.iter().filter(|s| s.pa == dir_entry).count(),
            1,
            "one switching store"
        );
        assert!(
            mem.is_retired(old_table),
            "old PASID table retired after the flush"
        );
        assert_eq!(sib(), 0xd000_0234, "sibling PASID untouched");
        let p = hw.take_processed();
        assert_eq!(p[0].kind(), 7);
        assert_eq!(p[0].lo >> 32, 70, "PASID-selective for PASID 70");
        current = target;
    }
    assert_eq!(walk(&mem, rt, SID, pasid, 0x1234).unwrap().did, fs_a.did());
}

/// The scalable context entry of `sid`, read with the walker's view.
fn hw_ctx(mem: &FakeMem, rt: u64, sid: u16) -> u64 {
    let root = rt & !0xfff;
    let (bus, devfn) = ((sid >> 8) as u64, (sid & 0xff) as u64);
    let half = mem.read(root + bus * 16 + if devfn < 128 { 0 } else { 8 });
    (half & !0xfff) + (devfn & 0x7f) * 32
}

#[test]
fn failing_replace_changes_nothing() {
    // Snoop rule on a unit without SC, bad SID, not attached: all before any write.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let cfg = UnitConfig {
        buses: (0, 0x1f),
        ..legacy()
    };
    let mut unit = up(&hw, &mem, cfg);
    let a = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let coherent = unit
        .create_domain(&mem, DomainConfig::second_stage(48).coherent())
        .unwrap();
    unit.map(&mem, &a, 0, 0x9000_0000, K4, RW).unwrap();
    unit.map(&mem, &coherent, 0, 0x9100_0000, K4, RW).unwrap();
    unit.attach(&mem, SID, None, &a).unwrap();
    hw.take_processed();
    let before = mem.snapshot();
    mem.stores.borrow_mut().clear();
    let cases = [
        (SID, &coherent, VtdError::SnoopControlUnsupported),
        (0x2018, &a, VtdError::BadSid { sid: 0x2018 }),
        (0x0019, &a, VtdError::NotAttached),
    ];
    for (sid, d, err) in cases {
        assert_eq!(unit.replace(&mem, sid, None, d), Err(err));
        assert_eq!(
            unit.attach(&mem, 0x2018, None, d),
            Err(VtdError::BadSid { sid: 0x2018 })
        );
    }
    assert_eq!(mem.snapshot(), before);
    assert!(mem.stores.borrow().is_empty());
    assert!(hw.take_processed().is_empty());
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 0x10).unwrap().pa,
        0x9000_0010
    );

    // Scalable: no memory for the PASID-table copy.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, ECAP_FLTS_UNIT);
    let mut unit = up(&hw, &mem, scalable());
    let a = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    let b = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    unit.attach(&mem, SID, None, &a).unwrap();
    let before = mem.snapshot();
    mem.fail_allocs.set(true);
    assert_eq!(unit.replace(&mem, SID, None, &b), Err(VtdError::NoMemory));
    assert_eq!(mem.snapshot(), before);
    mem.fail_allocs.set(false);
    unit.replace(&mem, SID, None, &b).unwrap();
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 0).err(),
        Some("first-stage entry not present")
    );
    let pe = pasid_entry_pa(&mem, rtaddr(&hw), SID, 0);
    assert_eq!((mem.read(pe + 8) & 0xffff) as u16, b.did());
}

fn pasid_entry_pa(mem: &FakeMem, rt: u64, sid: u16, pasid: u64) -> u64 {
    let ce = hw_ctx(mem, rt, sid);
    let dir = mem.read(ce) & !0xfff;
    (mem.read(dir + (pasid >> 6) * 8) & !0xfff) + (pasid & 63) * 64
}

// ---------------------------------------------------------------------------------------------
// Unmap and IOTLB invalidation policy
// ---------------------------------------------------------------------------------------------

#[test]
fn unmap_of_an_aligned_2m_range_is_one_psi() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    // One 2 MiB leaf.
    unit.map(&mem, &d, M2, 0x4000_0000, M2, RW).unwrap();
    let before = unit.counters();
    assert_eq!(unit.unmap(&mem, &d, M2, M2), Ok(M2));
    let p = hw.take_processed();
    assert_eq!(
        kinds(&p),
        [2, 5],
        "exactly one IOTLB descriptor and one wait"
    );
    assert_eq!(p[0].lo, 0x0001_00f2, "page-selective, DID 1, DR+DW");
    assert_eq!(p[0].hi, M2 | 0x40 | 9, "AM = 9, IH: only a leaf changed");
    let after = unit.counters();
    assert_eq!(after.iotlb_psi - before.iotlb_psi, 1);
    assert_eq!(after.qi_descriptors - before.qi_descriptors, 1);
    assert_eq!(after.qi_waits - before.qi_waits, 1);
    assert_eq!(after.iotlb_dsi, before.iotlb_dsi);
}

#[test]
fn unmap_invalidation_policy() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let small = |iova, len| unit.map(&mem, &d, iova, 0x1_0000_0000 + iova, len, RW);
    // 4 KiB pages filling one leaf table: unmapping the whole table frees it (IH = 0).
    for i in 0..512 {
        small(M2 * 3 + i * K4, K4).unwrap();
    }
    hw.take_processed();
    assert_eq!(unit.unmap(&mem, &d, M2 * 3, M2), Ok(M2));
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [2, 5]);
    assert_eq!(p[0].hi, (M2 * 3) | 9, "AM 9, IH clear: a table was freed");

    // Unaligned: two pages straddling 1 GiB round out to AM 19 > MAMV 18: domain-selective.
    small(G1 - K4, 2 * K4).unwrap();
    hw.take_processed();
    assert_eq!(unit.unmap(&mem, &d, G1 - K4, 2 * K4), Ok(2 * K4));
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [2, 5]);
    assert_eq!(p[0].lo, 0x0001_00e2, "domain-selective");

    // Huge: 2 GiB of 1 GiB leaves from 1 GiB: AM 20 > 18: domain-selective.
    unit.map(&mem, &d, G1, 0x2_0000_0000, 2 * G1, RW).unwrap();
    hw.take_processed();
    assert_eq!(unit.unmap(&mem, &d, G1, 2 * G1), Ok(2 * G1));
    assert_eq!(hw.take_processed()[0].lo, 0x0001_00e2);
    // 1 GiB aligned: AM 18 = MAMV: page-selective.
    unit.map(&mem, &d, G1, 0x2_0000_0000, G1, RW).unwrap();
    hw.take_processed();
    unit.unmap(&mem, &d, G1, G1).unwrap();
    let p = hw.take_processed();
    assert_eq!((p[0].lo, p[0].hi), (0x0001_00f2, G1 | 0x40 | 18));
    // Unmapping nothing invalidates nothing.
    assert_eq!(unit.unmap(&mem, &d, 5 * G1, M2), Ok(0));
    assert!(hw.take_processed().is_empty());
    let c = unit.counters();
    assert_eq!((c.iotlb_psi, c.iotlb_dsi), (2, 2));

    // Without CAP.PSI everything is domain-selective.
    let mem2 = FakeMem::new(32);
    let hw2 = FakeVtd::new(&mem2, QEMU_CAP & !CAP_PSI, QEMU_ECAP);
    let mut u2 = up(&hw2, &mem2, legacy());
    let d2 = u2
        .create_domain(&mem2, DomainConfig::second_stage(48))
        .unwrap();
    u2.map(&mem2, &d2, M2, 0, M2, RW).unwrap();
    u2.unmap(&mem2, &d2, M2, M2).unwrap();
    assert_eq!(hw2.take_processed()[0].lo, 0x0001_00e2);
}

#[test]
fn unmap_that_splits_a_leaf_changes_nothing() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, M2, 0x4000_0000, M2, RW).unwrap();
    hw.take_processed();
    assert!(matches!(
        unit.unmap(&mem, &d, M2, K4),
        Err(VtdError::Unmap(
            crate::pgtable::UnmapError::SplitsLeaf { .. }
        ))
    ));
    assert!(hw.take_processed().is_empty());
    assert_eq!(unit.iova_to_phys(&mem, &d, M2), Some(0x4000_0000));
}

#[test]
fn register_based_unmap_uses_iva_and_iotlb_registers() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP & !ECAP_QI);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, M2, 0x4000_0000, M2, RW).unwrap();
    unit.unmap(&mem, &d, M2, M2).unwrap();
    let last = *hw.s.borrow().iotlb_log.last().unwrap();
    // IVT | IIRG = page | DR | DW | DID 1; IVA = address | IH | AM 9.
    assert_eq!(
        last,
        (
            1 << 63 | 3 << 60 | 1 << 49 | 1 << 48 | 1 << 32,
            M2 | 0x40 | 9
        )
    );
    unit.attach(&mem, SID, None, &d).unwrap();
    unit.detach(&mem, SID, None).unwrap();
    assert_eq!(
        *hw.s.borrow().ccmd_log.last().unwrap(),
        1 << 63 | 3 << 61 | (SID as u64) << 16 | 1,
        "device-selective, old DID 1"
    );
    // CAIG = 0: the hardware did not do it.
    hw.s.borrow_mut().reject_register = true;
    unit.map(&mem, &d, M2, 0x4000_0000, M2, RW).unwrap();
    assert_eq!(
        unit.unmap(&mem, &d, M2, M2),
        Err(VtdError::InvalidationRejected { what: "IOTLB" })
    );
}

#[test]
fn caching_mode_invalidates_after_map_and_attach() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP | CAP_CM, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, 0x3000, 0x9000, K4, RW).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [2, 5]);
    assert_eq!(
        (p[0].lo, p[0].hi),
        (0x0001_00f2, 0x3000),
        "PSI of the new page, IH 0"
    );
    unit.attach(&mem, SID, None, &d).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 2, 5]);
    assert_eq!(p[0].lo, 0x0018_0000_0031, "device-selective with DID 0");
    assert_eq!(p[1].lo, 0xe2, "IOTLB DSI of DID 0");
}

// ---------------------------------------------------------------------------------------------
// Queue errors and time-outs
// ---------------------------------------------------------------------------------------------

#[test]
fn invalidation_queue_error_is_reported_and_recovered() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    hw.s.borrow_mut().reject_kinds = vec![2];
    let err = unit.unmap(&mem, &d, M2, M2).unwrap_err();
    let VtdError::InvalidationQueueError {
        error: QueueError::Iqe { iqei, index },
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!(iqei, FAKE_IQEI);
    assert_eq!(
        hw.s.borrow().fsts & FaultStatus::IQE.bits(),
        0,
        "IQE cleared"
    );
    // The rejected descriptor was replaced by a wait and the queue drained past it.
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [5, 5]);
    assert_eq!(p[0].hi & 0xfff, 8, "replacement writes the scratch dword");
    assert_eq!(hw.s.borrow().iqh, (index as u32 + 2) % 256);
    assert_eq!(unit.counters().queue_errors, 1);
    // Usable again.
    hw.s.borrow_mut().reject_kinds.clear();
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    assert_eq!(unit.unmap(&mem, &d, M2, M2), Ok(M2));
    assert_eq!(kinds(&hw.take_processed()), [2, 5]);
    assert!(err.to_string().contains("IQE"));
}

#[test]
fn invalidation_time_out_error_is_reported() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    hw.s.borrow_mut().ite_next_wait = Some(0x0142);
    assert_eq!(
        unit.unmap(&mem, &d, M2, M2),
        Err(VtdError::InvalidationQueueError {
            error: QueueError::Ite { sid: 0x0142 }
        })
    );
    assert_eq!(hw.s.borrow().fsts & FaultStatus::ITE.bits(), 0);
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    assert_eq!(unit.unmap(&mem, &d, M2, M2), Ok(M2));
}

#[test]
fn stuck_hardware_times_out() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    hw.s.borrow_mut().stall = true;
    assert_eq!(
        unit.unmap(&mem, &d, M2, M2),
        Err(VtdError::Timeout {
            what: "invalidation wait"
        })
    );
    // The hardware comes back: the queue drains and the unit works again.
    hw.unstall();
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    assert_eq!(unit.unmap(&mem, &d, M2, M2), Ok(M2));

    // A GCMD bit that never shows in GSTS.
    hw.s.borrow_mut().gcmd_latency = u32::MAX;
    assert_eq!(
        unit.enable_translation(),
        Err(VtdError::Timeout { what: "GSTS.TES" })
    );
    // Bring-up against a unit whose root pointer never latches.
    let mem2 = FakeMem::new(32);
    let hw2 = FakeVtd::new(&mem2, QEMU_CAP, QEMU_ECAP);
    hw2.s.borrow_mut().gcmd_latency = u32::MAX;
    assert_eq!(
        VtdUnit::new(&hw2, &mem2, legacy()).err(),
        Some(VtdError::Timeout { what: "GSTS.RTPS" })
    );
}

#[test]
fn queue_wraps_around() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    for _ in 0..300 {
        unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
        unit.unmap(&mem, &d, M2, M2).unwrap();
    }
    assert_eq!(hw.take_processed().len(), 600);
    let c = unit.counters();
    assert_eq!(c.qi_waits, 301);
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

fn fault_hi(sid: u16, reason: u8, read: bool) -> u64 {
    (reason as u64) << 32 | (read as u64) << 62 | sid as u64
}

#[test]
fn fault_drain_with_eight_records() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, cap_nfr(8), QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    assert!(hw.inject_fault(0x0def_0000, fault_hi(SID, 5, false)));
    assert!(hw.inject_fault(0x1000, fault_hi(0x0020, 6, true)));
    assert!(hw.inject_fault(0x2000, fault_hi(SID, 2, false)));
    hw.s.borrow_mut().fsts |= FaultStatus::PFO.bits();
    let mut got = Vec::new();
    let poll = unit.poll_faults(&mut |r| got.push(*r));
    assert_eq!(
        poll,
        FaultPoll {
            recorded: 3,
            overflowed: true
        }
    );
    let summary: Vec<_> = got
        .iter()
        .map(|r| (r.source_id, r.page_address(), r.reason, r.request))
        .collect();
    assert_eq!(
        summary,
        [
            (SID, 0x0def_0000, 5, RequestType::Write),
            (0x0020, 0x1000, 6, RequestType::Read),
            (SID, 0x2000, 2, RequestType::Write),
        ]
    );
    assert_eq!((unit.fault_count(SID), unit.fault_count(0x20)), (2, 1));
    assert_eq!(unit.fault_count(0x21), 0);
    assert_eq!(unit.faults_lost(), 1);
    assert_eq!(hw.s.borrow().fsts, 0, "PFO cleared");
    assert!(
        hw.s.borrow().frcd.iter().all(|r| r.1 >> 63 == 0),
        "F cleared"
    );
    assert_eq!(unit.poll_faults(&mut |_| panic!()), FaultPoll::default());

    // Wrap-around: records 3..8 and 0, drained oldest first from FRI.
    for i in 0..6u64 {
        assert!(hw.inject_fault(i << 12, fault_hi(0x0100 + i as u16, 4, false)));
    }
    let mut order = Vec::new();
    unit.poll_faults(&mut |r| order.push(r.source_id));
    assert_eq!(order, [0x100, 0x101, 0x102, 0x103, 0x104, 0x105]);
    let c = unit.counters();
    assert_eq!((c.faults, c.faults_lost), (9, 1));
}

#[test]
fn fault_drain_with_one_record_and_overflow() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    // QEMU's record of an edu write to an unmapped IOVA.
    assert!(hw.inject_fault(0x0def_0000, 0x00ff_ff05_0000_0018));
    assert!(
        !hw.inject_fault(0x1000, fault_hi(SID, 5, false)),
        "register full: PFO"
    );
    let mut got = Vec::new();
    let poll = unit.poll_faults(&mut |r| got.push(*r));
    assert_eq!((poll.recorded, poll.overflowed), (1, true));
    assert_eq!(got[0].source_id, SID);
    assert_eq!(got[0].reason, 5);
    assert_eq!(got[0].page_address(), 0x0def_0000);
    assert!(
        hw.inject_fault(0x3000, fault_hi(SID, 6, true)),
        "room again"
    );
    let poll = unit.poll_faults(&mut |_| {});
    assert_eq!((poll.recorded, poll.overflowed), (1, false));
    assert_eq!((unit.fault_count(SID), unit.faults_lost()), (2, 1));
}

#[test]
fn fault_storm_is_drained_in_bounded_steps() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, cap_nfr(8), QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let mut total = 0;
    for round in 0..10u64 {
        for i in 0..20u64 {
            hw.inject_fault((round * 20 + i) << 12, fault_hi((i % 70) as u16, 5, false));
        }
        let poll = unit.poll_faults(&mut |_| {});
        assert!(poll.recorded <= 8);
        assert!(poll.overflowed);
        total += poll.recorded as u64;
    }
    assert_eq!(total, 80);
    assert_eq!(unit.faults_lost(), 10);
    // More distinct SIDs than counter slots: the rest is counted as untracked.
    let mut untracked_sids = 0;
    for sid in 0..70u16 {
        hw.inject_fault(0, fault_hi(0x1000 + sid, 5, false));
        unit.poll_faults(&mut |_| {});
        untracked_sids += (unit.fault_count(0x1000 + sid) == 0) as u64;
    }
    assert!(untracked_sids > 0);
    assert_eq!(unit.counters().faults_untracked, untracked_sids);
}

// ---------------------------------------------------------------------------------------------
// Snoop control, write-buffer flushing, cache cleaning
// ---------------------------------------------------------------------------------------------

#[test]
fn coherent_domain_needs_snoop_control() {
    for (ecap, cfg) in [(QEMU_ECAP, legacy()), (QEMU_ECAP_SM, scalable())] {
        let mem = FakeMem::new(32);
        let hw = FakeVtd::new(&mem, QEMU_CAP, ecap);
        let mut unit = up(&hw, &mem, cfg);
        let d = unit
            .create_domain(&mem, DomainConfig::second_stage(48).coherent())
            .unwrap();
        assert!(d.enforce_cache_coherency() && !d.snoops_leaves());
        unit.map(&mem, &d, 0, 0x1000, K4, RW).unwrap();
        let before = mem.snapshot();
        assert_eq!(
            unit.attach(&mem, SID, None, &d),
            Err(VtdError::SnoopControlUnsupported)
        );
        assert_eq!(mem.snapshot(), before);
    }
}

#[test]
fn snoop_control_sets_snp_in_legacy_leaves_and_pgsnp_in_scalable_entries() {
    // Legacy: SNP (bit 11) in every leaf of a coherent domain, none in a plain one.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP | ECAP_SC);
    let mut unit = up(&hw, &mem, legacy());
    let coherent = unit
        .create_domain(&mem, DomainConfig::second_stage(48).coherent())
        .unwrap();
    let plain = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    for d in [&coherent, &plain] {
        unit.map(&mem, d, 0, 0x1000_0000, M2 + K4, RW).unwrap();
    }
    unit.attach(&mem, SID, None, &coherent).unwrap();
    unit.attach(&mem, 0x0020, None, &plain).unwrap();
    for iova in [0, M2] {
        let leaf = walk(&mem, rtaddr(&hw), SID, None, iova).unwrap().leaf;
        assert_ne!(leaf & (1 << 11), 0, "SNP at {iova:#x}");
        let leaf = walk(&mem, rtaddr(&hw), 0x0020, None, iova).unwrap().leaf;
        assert_eq!(leaf & (1 << 11), 0);
    }

    // Scalable: PGSNP in the PASID entry, leaves without SNP.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM | ECAP_SC);
    let mut unit = up(&hw, &mem, scalable());
    let coherent = unit
        .create_domain(&mem, DomainConfig::second_stage(48).coherent())
        .unwrap();
    unit.map(&mem, &coherent, 0, 0x1000_0000, K4, RW).unwrap();
    unit.attach(&mem, SID, None, &coherent).unwrap();
    let hit = walk(&mem, rtaddr(&hw), SID, None, 0).unwrap();
    assert!(hit.pgsnp);
    assert_eq!(hit.leaf & (1 << 11), 0);
}

#[test]
fn write_buffer_flush_with_rwbf() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP | CAP_RWBF, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    assert_eq!(hw.s.borrow().wbf_count, 0);
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, 0, 0, K4, RW).unwrap();
    assert_eq!(hw.s.borrow().wbf_count, 1, "after map");
    unit.attach(&mem, SID, None, &d).unwrap();
    assert_eq!(hw.s.borrow().wbf_count, 2, "after the context entry");
    unit.unmap(&mem, &d, 0, K4).unwrap();
    assert_eq!(hw.s.borrow().wbf_count, 3, "before the IOTLB flush");
    assert_eq!(unit.counters().write_buffer_flushes, 3);
    // Every WBF write kept QIE (and did not re-issue SRTP).
    let log = hw.s.borrow().gcmd_log.clone();
    assert!(
        log.iter()
            .filter(|v| *v & (1 << 27) != 0)
            .all(|v| *v == 1 << 27 | 1 << 26)
    );
    // Without RWBF: none.
    let mem2 = FakeMem::new(32);
    let hw2 = FakeVtd::new(&mem2, QEMU_CAP, QEMU_ECAP);
    let mut u2 = up(&hw2, &mem2, legacy());
    let d2 = u2
        .create_domain(&mem2, DomainConfig::second_stage(48))
        .unwrap();
    u2.map(&mem2, &d2, 0, 0, K4, RW).unwrap();
    u2.attach(&mem2, SID, None, &d2).unwrap();
    assert_eq!(hw2.s.borrow().wbf_count, 0);
}

#[test]
fn non_coherent_walks_get_structures_cleaned() {
    // ECAP.C = 0 (QEMU): new pages, root and context entries, PASID structures and page
    // tables are cleaned.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    mem.cleans.borrow_mut().clear();
    unit.map(&mem, &d, 0, 0, K4, RW).unwrap();
    assert!(
        !mem.cleans.borrow().is_empty(),
        "page-table engine cleans (coherent = false)"
    );
    mem.cleans.borrow_mut().clear();
    unit.attach(&mem, SID, None, &d).unwrap();
    let root = unit.root_table();
    let cleans = mem.cleans.borrow().clone();
    let ctx_table = mem.read(root) & !0xfff;
    assert!(cleans.contains(&(ctx_table, 4096)), "new context table");
    assert!(cleans.contains(&(root, 16)), "root entry of bus 0");
    assert!(
        cleans.contains(&(ctx_table + 0x18 * 16, 16)),
        "context entry"
    );

    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM);
    let mut unit = up(&hw, &mem, scalable());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    mem.cleans.borrow_mut().clear();
    unit.attach(&mem, SID, None, &d).unwrap();
    let pe = pasid_entry_pa(&mem, rtaddr(&hw), SID, 0);
    assert!(mem.cleans.borrow().contains(&(pe, 64)), "PASID entry");

    // ECAP.C = 1: nothing to clean, neither structures nor page tables.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP | ECAP_C);
    let mut unit = up(&hw, &mem, legacy());
    mem.cleans.borrow_mut().clear();
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, 0, 0, K4, RW).unwrap();
    unit.attach(&mem, SID, None, &d).unwrap();
    unit.unmap(&mem, &d, 0, K4).unwrap();
    assert!(mem.cleans.borrow().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Domain ids and lifetime
// ---------------------------------------------------------------------------------------------

#[test]
fn domain_ids_come_from_cap_nd_and_are_reused() {
    let mem = FakeMem::new(64);
    // ND = 0: 16 ids, of which 0 is never used.
    let hw = FakeVtd::new(&mem, QEMU_CAP & !7, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let mut ds: Vec<Domain> = (0..15)
        .map(|_| {
            unit.create_domain(&mem, DomainConfig::second_stage(39))
                .unwrap()
        })
        .collect();
    assert_eq!(
        ds.iter().map(|d| d.did()).collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>()
    );
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::second_stage(39))
            .err(),
        Some(VtdError::DomainIdsExhausted)
    );
    let d7 = ds.remove(6);
    unit.destroy_domain(&mem, d7).unwrap();
    let again = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    assert_eq!(again.did(), 7);
    ds.push(again);
    for d in ds {
        unit.destroy_domain(&mem, d).unwrap();
    }
}

#[test]
fn destroy_refuses_attached_domains_and_frees_pages() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, ECAP_FLTS_UNIT);
    let mut unit = up(&hw, &mem, scalable());
    let live = mem.live_frames();
    let d = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    unit.map(&mem, &d, 0, 0, 3 * M2, RW).unwrap();
    unit.attach(&mem, SID, None, &d).unwrap();
    unit.attach(&mem, 0x0120, Some(7), &d).unwrap();
    let (e, d) = unit.try_destroy_domain(&mem, d).unwrap_err();
    assert_eq!(e, VtdError::DomainBusy { attachments: 2 });
    unit.detach(&mem, SID, None).unwrap();
    unit.detach(&mem, 0x0120, Some(7)).unwrap();
    let structures = mem.live_frames();
    unit.destroy_domain(&mem, d).unwrap();
    assert!(mem.live_frames() < structures);
    // What stays: for each of the two devices (buses 0 and 1) a lower context table, a PASID
    // directory and a PASID table.
    assert_eq!(mem.live_frames() - live, 6);
}

#[test]
fn foreign_domains_are_rejected() {
    let mem = FakeMem::new(64);
    let hw_a = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let hw_b = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut a = up(&hw_a, &mem, legacy());
    let mut b = up(&hw_b, &mem, legacy());
    let d = a
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    assert_eq!(b.map(&mem, &d, 0, 0, K4, RW), Err(VtdError::ForeignDomain));
    assert_eq!(b.attach(&mem, SID, None, &d), Err(VtdError::ForeignDomain));
    assert_eq!(b.iova_to_phys(&mem, &d, 0), None);
    let (e, d) = b.try_destroy_domain(&mem, d).unwrap_err();
    assert_eq!(e, VtdError::ForeignDomain);
    a.destroy_domain(&mem, d).unwrap();
}

#[test]
fn map_errors_are_typed() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    assert_eq!(
        unit.map(&mem, &d, 1 << 39, 0, K4, RW),
        Err(VtdError::Map(MapError::OutOfRange))
    );
    assert_eq!(
        unit.map(&mem, &d, 0x123, 0, K4, RW),
        Err(VtdError::Map(MapError::Misaligned))
    );
    unit.map(&mem, &d, 0x2000, 0, K4, RW).unwrap();
    hw.take_processed();
    // Overlap after installing one page: that page is rolled back and invalidated.
    assert!(matches!(
        unit.map(&mem, &d, 0x1000, 0, 2 * K4, RW),
        Err(VtdError::Map(MapError::Overlap { iova: 0x2000, .. }))
    ));
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [2, 5]);
    assert_eq!(p[0].hi, 0x1000, "PSI of the rolled-back page");
    assert_eq!(unit.iova_to_phys(&mem, &d, 0x1000), None);
    // Out of memory for a new table.
    mem.fail_allocs.set(true);
    assert!(matches!(
        unit.map(&mem, &d, 1 << 30, 0, K4, RW),
        Err(VtdError::Map(MapError::NoMemory { .. }))
    ));
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::second_stage(39))
            .err(),
        Some(VtdError::NoMemory)
    );
    mem.fail_allocs.set(false);
    // The failed create did not leak its domain id.
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::second_stage(39))
            .unwrap()
            .did(),
        2
    );
}

#[test]
fn errors_display() {
    assert_eq!(
        VtdError::Timeout { what: "GSTS.TES" }.to_string(),
        "timed out waiting for GSTS.TES"
    );
    assert_eq!(
        VtdError::BadSid { sid: 0x0118 }.to_string(),
        "source id 01:03.0 is outside this unit"
    );
    assert!(
        VtdError::InvalidationQueueError {
            error: QueueError::Ite { sid: 0x18 }
        }
        .to_string()
        .contains("00:03.0")
    );
    assert!(
        VtdError::SnoopControlUnsupported
            .to_string()
            .contains("snoop")
    );
}

#[test]
fn table_memory_of_the_fake_checks_lifetimes() {
    let mem = FakeMem::new(2);
    let a = mem.alloc_table(4096).unwrap();
    let b = mem.alloc_table(4096).unwrap();
    assert_eq!(mem.alloc_table(4096), None);
    mem.free_table(a, 4096);
    mem.retire_table(b, 4096);
    assert!(mem.is_retired(b));
    assert_eq!(mem.live_frames(), 0);
}

#[test]
fn bring_up_takes_over_a_unit_left_running() {
    // Firmware (or a previous kernel) left translation and the queue on, with a stale IQE.
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    {
        let mut s = hw.s.borrow_mut();
        s.gsts = (GlobalStatus::TES | GlobalStatus::QIES | GlobalStatus::RTPS).bits();
        s.latched_rtaddr = Some(0xdead_0000);
        s.fsts = FaultStatus::IQE.bits();
    }
    let unit = VtdUnit::new(&hw, &mem, legacy()).unwrap();
    let s = hw.s.borrow();
    // TE off (keeping QIE), QIE off, SRTP, QIE on again with the new queue.
    assert_eq!(s.gcmd_log, [1 << 26, 0, 1 << 30, 1 << 26]);
    assert_eq!(s.latched_rtaddr, Some(unit.root_table()));
    assert_eq!(s.fsts & FaultStatus::IQE.bits(), 0);
    assert_eq!(
        s.processed.len(),
        3,
        "global context + IOTLB + wait went through"
    );
}

#[test]
fn a_queue_that_never_drains_runs_out_of_space() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    hw.s.borrow_mut().stall = true;
    let mut waits = 0;
    let err = loop {
        unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
        match unit.unmap(&mem, &d, M2, M2) {
            Err(VtdError::Timeout {
                what: "invalidation wait",
            }) => waits += 1,
            other => break other,
        }
        assert!(waits < 200, "the queue has 256 slots");
    };
    assert_eq!(
        err,
        Err(VtdError::Timeout {
            what: "invalidation queue space"
        })
    );
    assert_eq!(waits, 127, "255 usable slots, two per batch");
    hw.unstall();
    unit.map(&mem, &d, M2, 0, M2, RW).unwrap();
    assert_eq!(unit.unmap(&mem, &d, M2, M2), Ok(M2));
}

#[test]
fn source_ids_outside_the_unit_are_refused() {
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM);
    let cfg = UnitConfig {
        buses: (2, 3),
        ..scalable()
    };
    let mut unit = up(&hw, &mem, cfg);
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    for sid in [0x0018, 0x0100, 0x0400, 0xffff] {
        assert_eq!(
            unit.attach(&mem, sid, None, &d),
            Err(VtdError::BadSid { sid })
        );
        assert_eq!(unit.detach(&mem, sid, None), Err(VtdError::BadSid { sid }));
    }
    unit.attach(&mem, 0x0200, None, &d).unwrap();
    unit.attach(&mem, 0x03ff, None, &d).unwrap();
    assert_eq!(
        walk(&mem, rtaddr(&hw), 0x03ff, None, 0),
        Err("second-stage entry not present")
    );
}

#[test]
fn five_level_tables_walk() {
    const SAGAW_5: u64 = 1 << 11;
    const FL5LP: u64 = 1 << 60;
    let high = 1u64 << 50;
    // Legacy, 5-level second stage: AW = 011, with MGAW 57.
    let cap = (QEMU_CAP & !(0x3f << 16)) | 56 << 16 | SAGAW_5;
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, cap, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(57))
        .unwrap();
    assert_eq!((d.levels(), d.input_bits()), (5, 57));
    unit.map(&mem, &d, high, 0x3000_0000, K4, RW).unwrap();
    assert_eq!(
        unit.map(&mem, &d, 1 << 57, 0, K4, RW),
        Err(VtdError::Map(MapError::OutOfRange))
    );
    unit.attach(&mem, SID, None, &d).unwrap();
    let hit = walk(&mem, rtaddr(&hw), SID, None, high + 0x10).unwrap();
    assert_eq!(hit.pa, 0x3000_0010);
    let ctx = mem.read(unit.root_table()) & !0xfff;
    assert_eq!(mem.read(ctx + 0x18 * 16 + 8) & 7, 3, "AW = 011");
    // MGAW caps a deep table: with MGAW 48 a 5-level domain translates 48 bits.
    let mem2 = FakeMem::new(32);
    let hw2 = FakeVtd::new(&mem2, QEMU_CAP | SAGAW_5, QEMU_ECAP);
    let mut u2 = up(&hw2, &mem2, legacy());
    let d2 = u2
        .create_domain(&mem2, DomainConfig::second_stage(57))
        .unwrap();
    assert_eq!((d2.levels(), d2.input_bits()), (5, 48));

    // Scalable, 5-level first stage: FLPM = 01.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP | FL5LP, ECAP_FLTS_UNIT);
    let mut unit = up(&hw, &mem, scalable());
    let d = unit
        .create_domain(&mem, DomainConfig::first_stage(57))
        .unwrap();
    assert_eq!((d.levels(), d.input_bits()), (5, 56));
    unit.map(&mem, &d, high, 0x3000_0000, K4, RW).unwrap();
    unit.attach(&mem, SID, None, &d).unwrap();
    let hit = walk(&mem, rtaddr(&hw), SID, None, high + 0x10).unwrap();
    assert_eq!(hit.pa, 0x3000_0010);
    let pe = pasid_entry_pa(&mem, rtaddr(&hw), SID, 0);
    assert_eq!((mem.read(pe + 16) >> 2) & 3, 1, "FLPM = 01");
}

// ---------------------------------------------------------------------------------------------
// Pass-through domains
// ---------------------------------------------------------------------------------------------

const ECAP_DT: u64 = 1 << 2;
const ECAP_PT: u64 = 1 << 6;

fn pas(seen: &RefCell<Vec<Walk>>) -> Vec<Result<u64, &'static str>> {
    seen.borrow().iter().map(|w| w.map(|h| h.pa)).collect()
}

#[test]
fn legacy_pass_through_is_identity() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let pt = unit
        .create_domain(&mem, DomainConfig::pass_through())
        .unwrap();
    assert!(pt.is_pass_through());
    assert_eq!(
        (pt.stage(), pt.levels(), pt.input_bits(), pt.root()),
        (Stage::PassThrough, 4, 48, 0),
        "AW: the largest SAGAW depth (QEMU: 3 and 4 levels)"
    );
    assert_eq!(
        unit.map(&mem, &pt, 0, 0, K4, RW),
        Err(VtdError::PassThroughDomain)
    );
    assert_eq!(
        unit.unmap(&mem, &pt, 0, K4),
        Err(VtdError::PassThroughDomain)
    );
    assert_eq!(unit.iova_to_phys(&mem, &pt, 0x1234_5678), Some(0x1234_5678));
    assert_eq!(unit.iova_to_phys(&mem, &pt, 1 << 48), None);

    unit.attach(&mem, SID, None, &pt).unwrap();
    let ctx = (mem.read(unit.root_table()) & !0xfff) + 0x18 * 16;
    assert_eq!(mem.read(ctx), 0b1001, "P, TT = 10b, no SLPTPTR");
    assert_eq!(
        mem.read(ctx + 8),
        (pt.did() as u64) << 8 | 0b010,
        "DID, AW = 010b"
    );
    for iova in [0, 0x1000, 0xdead_b123, (1 << 48) - 1] {
        let hit = walk(&mem, rtaddr(&hw), SID, None, iova).unwrap();
        assert_eq!((hit.pa, hit.did), (iova, pt.did()));
    }
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 1 << 48),
        Err("address beyond AW")
    );
    assert!(hw.take_processed().is_empty());

    // To a second-stage domain and back: one 128-bit store each way; the walk after it is the
    // new translation, there is nothing in between.
    let ss = unit
        .create_domain(&mem, DomainConfig::second_stage(39))
        .unwrap();
    unit.map(&mem, &ss, 0x5000, 0x9000_0000, K4, RW).unwrap();
    let seen = watch(&mem, rtaddr(&hw), SID, None, 0x5010);
    unit.replace(&mem, SID, None, &ss).unwrap();
    assert_eq!(pas(&seen), [Ok(0x9000_0010)]);
    assert!(mem.stores.borrow()[0].hi.is_some(), "a 128-bit store");
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 2, 5]);
    assert_eq!(p[0].lo >> 16 & 0xffff, pt.did() as u64, "old DID");
    let seen = watch(&mem, rtaddr(&hw), SID, None, 0x5010);
    unit.replace(&mem, SID, None, &pt).unwrap();
    mem.clear_hook();
    assert_eq!(pas(&seen), [Ok(0x5010)], "identity again, in one store");
    assert_eq!(mem.stores.borrow().len(), 1);
    assert_eq!(
        unit.try_destroy_domain(&mem, pt).unwrap_err().0,
        VtdError::DomainBusy { attachments: 1 }
    );
    unit.detach(&mem, SID, None).unwrap();
    assert_eq!(
        walk(&mem, rtaddr(&hw), SID, None, 0),
        Err("context entry not present")
    );

    // Unsupported combinations, all refused at creation.
    let hw2 = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP & !ECAP_PT);
    let mut u2 = up(&hw2, &mem, legacy());
    assert_eq!(
        u2.create_domain(&mem, DomainConfig::pass_through()).err(),
        Some(VtdError::PassThroughUnsupported)
    );
    let coherent = DomainConfig {
        enforce_cache_coherency: true,
        ..DomainConfig::pass_through()
    };
    assert_eq!(
        unit.create_domain(&mem, coherent).err(),
        Some(VtdError::SnoopControlUnsupported)
    );
    let dirty = DomainConfig {
        dirty_tracking: true,
        ..DomainConfig::pass_through()
    };
    assert_eq!(
        unit.create_domain(&mem, dirty).err(),
        Some(VtdError::DirtyTrackingUnsupported)
    );
}

#[test]
fn scalable_pass_through_entries_and_replacement() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, ECAP_BOTH);
    let mut unit = up(&hw, &mem, scalable());
    let rt = rtaddr(&hw);
    let pt = unit
        .create_domain(&mem, DomainConfig::pass_through())
        .unwrap();
    unit.attach(&mem, SID, None, &pt).unwrap();
    unit.attach(&mem, SID, Some(3), &pt).unwrap();
    let pe = pasid_entry_pa(&mem, rt, SID, 0);
    assert_eq!(mem.read(pe), 0x109, "PGTT = 100b, AW = 010b, P");
    assert_eq!(mem.read(pe + 8), pt.did() as u64);
    assert_eq!((2..8).map(|i| mem.read(pe + 8 * i)).max(), Some(0));
    for pasid in [None, Some(3)] {
        let hit = walk(&mem, rt, SID, pasid, 0xabc_d123).unwrap();
        assert_eq!((hit.pa, hit.did), (0xabc_d123, pt.did()));
    }

    // Second stage <-> pass-through: one 128-bit store.
    let ss = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &ss, 0x5000, 0x9000_0000, K4, RW).unwrap();
    hw.take_processed();
    let seen = watch(&mem, rt, SID, None, 0x5010);
    unit.replace(&mem, SID, None, &ss).unwrap();
    assert_eq!(pas(&seen), [Ok(0x9000_0010)]);
    assert_eq!(mem.stores.borrow()[0].pa, pe);
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [7, 2, 5]);
    assert_eq!(
        p[0].lo,
        0x0017 | (pt.did() as u64) << 16,
        "PASID-selective, old DID"
    );
    let seen = watch(&mem, rt, SID, None, 0x5010);
    unit.replace(&mem, SID, None, &pt).unwrap();
    assert_eq!(pas(&seen), [Ok(0x5010)]);
    assert_eq!(mem.stores.borrow().len(), 1);

    // First stage <-> pass-through: through a copy of the PASID table; every walk along the
    // way is the old translation or the new one.
    let fs = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    unit.map(&mem, &fs, 0x5000, 0xa000_0000, K4, RW).unwrap();
    let seen = watch(&mem, rt, SID, Some(3), 0x5010);
    unit.replace(&mem, SID, Some(3), &fs).unwrap();
    let walks = pas(&seen);
    assert_eq!(walks.last(), Some(&Ok(0xa000_0010)));
    assert!(
        walks
            .iter()
            .all(|w| *w == Ok(0x5010) || *w == Ok(0xa000_0010))
    );
    assert_eq!(mem.retires.get(), 1, "the old PASID table is retired");
    let seen = watch(&mem, rt, SID, Some(3), 0x5010);
    unit.replace(&mem, SID, Some(3), &pt).unwrap();
    mem.clear_hook();
    let walks = pas(&seen);
    assert_eq!(walks.last(), Some(&Ok(0x5010)));
    assert!(
        walks
            .iter()
            .all(|w| *w == Ok(0x5010) || *w == Ok(0xa000_0010))
    );
    // PASID 0 kept its pass-through entry throughout.
    assert_eq!(
        walk(&mem, rt, SID, None, 0x777_7000).unwrap().pa,
        0x777_7000
    );
}

// ---------------------------------------------------------------------------------------------
// Device TLBs (ATS)
// ---------------------------------------------------------------------------------------------

#[test]
fn ats_invalidation_ranges() {
    use super::invalidation::ats_range;
    // S = 0: one page. S = 1: the lowest 0 address bit from 12 up gives the size.
    assert_eq!(ats_range(0x5000, 0), (0x5000, false));
    assert_eq!(ats_range(0x4000, 1), (0x4000, true), "8 KiB: bit 12 = 0");
    assert_eq!(
        ats_range(0x4000, 2),
        (0x5000, true),
        "16 KiB: bit 12 = 1, bit 13 = 0"
    );
    assert_eq!(
        ats_range(M2, 9),
        (M2 | 0xff000, true),
        "2 MiB: bits 19:12 set"
    );
    assert_eq!(
        ats_range(0, 52),
        (0x7fff_ffff_ffff_f000, true),
        "everything"
    );
}

#[test]
fn legacy_device_tlb_invalidations_follow_the_iotlb() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP | ECAP_DT);
    let mut unit = up(&hw, &mem, legacy());
    let rt = rtaddr(&hw);
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, M2, 0x4000_0000, M2, RW).unwrap();
    let ats = AttachOptions { ats: true };
    unit.attach_with(&mem, SID, None, &d, ats).unwrap();
    unit.attach(&mem, 0x0020, None, &d).unwrap();
    assert!(unit.device_tlb_enabled(SID, None));
    assert!(!unit.device_tlb_enabled(0x0020, None));
    let ctx = mem.read(unit.root_table()) & !0xfff;
    assert_eq!(mem.read(ctx + 0x18 * 16) & 0xc, 0b0100, "TT = 01b");
    assert_eq!(mem.read(ctx + 0x20 * 16) & 0xc, 0, "TT = 00b");
    assert_eq!(walk(&mem, rt, SID, None, M2 + 8).unwrap().pa, 0x4000_0008);
    hw.take_processed();

    // Unmap: IOTLB PSI, fence, device TLB of 00:03.0 for the same 2 MiB, wait.
    unit.unmap(&mem, &d, M2, M2).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [2, 5, 3, 5]);
    assert_eq!(p[1].lo, 0x65, "wait: SW + FN, status data 0");
    assert_ne!(p[1].hi, p[3].hi, "the fence writes a scratch dword");
    // Type 3, PFSID[3:0] = 8 at 15:12, MIP 0, SID 0x18 at 47:32, PFSID[15:4] = 1 at 63:52.
    assert_eq!(p[2].lo, 0x0010_0018_0000_8003);
    assert_eq!(p[2].hi, 0x2f_f001, "ADDR 2 MiB with bits 19:12 set, S");
    assert_eq!(unit.counters().device_tlb_invalidations, 1);

    // Replace keeps TT = 01b and invalidates the whole device TLB after the old DID's IOTLB.
    let d2 = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.replace(&mem, SID, None, &d2).unwrap();
    assert_eq!(mem.read(ctx + 0x18 * 16) & 0xc, 0b0100);
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [1, 2, 5, 3, 5]);
    assert_eq!(p[3].hi, 0x7fff_ffff_ffff_f001);
    // Unmaps of the old domain no longer reach the device; of the new one they do.
    unit.map(&mem, &d, M2, 0x4000_0000, M2, RW).unwrap();
    unit.unmap(&mem, &d, M2, M2).unwrap();
    assert_eq!(kinds(&hw.take_processed()), [2, 5]);
    unit.map(&mem, &d2, 0, 0, K4, RW).unwrap();
    unit.unmap(&mem, &d2, 0, K4).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [2, 5, 3, 5]);
    assert_eq!(p[2].hi, 0, "one page: S = 0");

    // A device TLB cannot go to a legacy pass-through entry: refused, nothing changes.
    let pt = unit
        .create_domain(&mem, DomainConfig::pass_through())
        .unwrap();
    let before = mem.snapshot();
    assert_eq!(
        unit.replace(&mem, SID, None, &pt),
        Err(VtdError::DeviceTlbUnsupported)
    );
    assert_eq!(
        unit.attach_with(&mem, 0x0028, None, &pt, ats),
        Err(VtdError::DeviceTlbUnsupported)
    );
    assert_eq!(mem.snapshot(), before);
    assert!(hw.take_processed().is_empty());

    // Detach: context, IOTLB, fence, device TLB; then the slot is free again.
    unit.detach(&mem, SID, None).unwrap();
    assert_eq!(kinds(&hw.take_processed()), [1, 2, 5, 3, 5]);
    assert!(!unit.device_tlb_enabled(SID, None));
    unit.unmap(&mem, &d2, 0, K4).unwrap();
    assert!(hw.take_processed().is_empty(), "nothing mapped");

    // Sixteen device TLBs at most.
    for f in 0..16u16 {
        unit.attach_with(&mem, 0x0100 + f, None, &d2, ats).unwrap();
    }
    assert_eq!(
        unit.attach_with(&mem, 0x0110, None, &d2, ats),
        Err(VtdError::DeviceTlbSlotsExhausted)
    );
    unit.map(&mem, &d2, 0, 0, K4, RW).unwrap();
    unit.unmap(&mem, &d2, 0, K4).unwrap();
    let p = hw.take_processed();
    assert_eq!(p.len(), 1 + 1 + 16 + 1, "PSI, fence, 16 device TLBs, wait");
    let mut sids: Vec<u64> = p[2..18].iter().map(|x| x.lo >> 32 & 0xffff).collect();
    sids.sort();
    assert_eq!(sids, (0x100..0x110).collect::<Vec<u64>>());

    // Without ECAP.DT, or without the queue, there is no device TLB.
    for ecap in [QEMU_ECAP, (QEMU_ECAP | ECAP_DT) & !ECAP_QI] {
        let mem = FakeMem::new(32);
        let hw = FakeVtd::new(&mem, QEMU_CAP, ecap);
        let mut u = up(&hw, &mem, legacy());
        let d = u
            .create_domain(&mem, DomainConfig::second_stage(48))
            .unwrap();
        assert_eq!(
            u.attach_with(&mem, SID, None, &d, ats),
            Err(VtdError::DeviceTlbUnsupported)
        );
    }
}

#[test]
fn scalable_device_tlb_is_per_device() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, ECAP_BOTH | ECAP_DT);
    let mut unit = up(&hw, &mem, scalable());
    let rt = rtaddr(&hw);
    let ats = AttachOptions { ats: true };
    let fs = unit
        .create_domain(&mem, DomainConfig::first_stage(48))
        .unwrap();
    unit.map(&mem, &fs, M2, 0x4000_0000, M2, RW).unwrap();
    unit.attach_with(&mem, SID, None, &fs, ats).unwrap();
    assert_eq!(mem.read(hw_ctx(&mem, rt, SID)) & 0b100, 0b100, "DTE");
    // DTE is per device: PASID 5 cannot opt out while PASID 0 has it.
    assert_eq!(
        unit.attach(&mem, SID, Some(5), &fs),
        Err(VtdError::DeviceTlbMismatch { sid: SID })
    );
    unit.attach_with(&mem, SID, Some(5), &fs, ats).unwrap();
    hw.take_processed();

    // Unmap: a PASID-based IOTLB invalidation per PASID, fence, then 0x3 for requests without
    // PASID (RID_PASID) and 0x8 for PASID 5.
    unit.unmap(&mem, &fs, M2, M2).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [6, 6, 5, 3, 8, 5]);
    assert_eq!(p[3].hi, 0x2f_f001);
    // Type 8, MIP 0, PFSID[3:0] 15:12, SID 31:16, PASID 51:32, PFSID[15:4] 63:52; hi S at 11.
    assert_eq!(p[4].lo, 0x0010_0005_0018_8008);
    assert_eq!(p[4].hi, 0x2f_f800);
    assert_eq!(unit.counters().device_tlb_invalidations, 2);

    // A context entry left from an earlier attachment (nothing present below it) switches its
    // DTE with one store and a context- and PASID-cache invalidation.
    let ss = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.attach(&mem, 0x0020, None, &ss).unwrap();
    unit.detach(&mem, 0x0020, None).unwrap();
    let ctx = hw_ctx(&mem, rt, 0x0020);
    assert_eq!(mem.read(ctx) & 0b100, 0);
    hw.take_processed();
    mem.stores.borrow_mut().clear();
    unit.attach_with(&mem, 0x0020, None, &ss, ats).unwrap();
    assert_eq!(mem.read(ctx) & 0b100, 0b100);
    assert_eq!(mem.stores.borrow()[0].pa, ctx, "DTE first");
    assert_eq!(kinds(&hw.take_processed()), [1, 7, 5]);
    unit.map(&mem, &fs, 0, 0x5000_0000, K4, RW).unwrap();
    hw.take_processed();
    unit.replace(&mem, 0x0020, None, &fs).unwrap();
    let p = hw.take_processed();
    assert_eq!(kinds(&p), [7, 2, 5, 3, 5]);
    assert_eq!(walk(&mem, rt, 0x0020, None, 8).unwrap().pa, 0x5000_0008);
}

// ---------------------------------------------------------------------------------------------
// RMRR: DMAR tables written byte by byte (VT-d 4.1 §8.1, §8.3, §8.4)
// ---------------------------------------------------------------------------------------------

use crate::firmware::dmar::{Dmar, NoBridges, PciTopology, ResolveError};
use std::collections::BTreeMap;

/// Device scope: type, length, flags, reserved, enumeration id, start bus, path.
fn dscope(ty: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let mut s = vec![ty, (6 + 2 * path.len()) as u8, 0, 0, 0, bus];
    for &(d, f) in path {
        s.extend([d, f]);
    }
    s
}

fn ep0(path: &[(u8, u8)]) -> Vec<u8> {
    dscope(1, 0, path)
}

fn dstructure(ty: u16, fixed: &[u8], scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut body = fixed.to_vec();
    for s in scopes {
        body.extend(s);
    }
    let mut out = ty.to_le_bytes().to_vec();
    out.extend(u16::try_from(4 + body.len()).unwrap().to_le_bytes());
    out.extend(body);
    out
}

/// DRHD: flags, size, segment 0, register base.
fn ddrhd(flags: u8, base: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, 0, 0, 0];
    f.extend(base.to_le_bytes());
    dstructure(0, &f, scopes)
}

/// RMRR: 2 reserved, segment 0, base, limit (inclusive).
fn drmrr(base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![0, 0, 0, 0];
    f.extend(base.to_le_bytes());
    f.extend(limit.to_le_bytes());
    dstructure(1, &f, scopes)
}

/// ACPI header, HAW field, flags, 10 reserved bytes, structures; length and checksum set.
fn dmar_table(haw_field: u8, structures: &[Vec<u8>]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(b"DMAR");
    t.extend([0; 4]);
    t.extend([1, 0]);
    t.extend(b"OEMID TABLEID ");
    t.extend([0; 4]);
    t.extend(b"CRTR");
    t.extend([0; 4]);
    t.extend([haw_field, 0]);
    t.extend([0; 10]);
    for s in structures {
        t.extend(s);
    }
    let len = u32::try_from(t.len()).unwrap();
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

/// (segment, bus, device, function) of a bridge, and its (secondary, subordinate) buses.
type Bridge = ((u16, u8, u8, u8), (u8, u8));

struct Bridges(Vec<Bridge>);

impl PciTopology for Bridges {
    fn bridge_buses(&self, segment: u16, bus: u8, device: u8, function: u8) -> Option<(u8, u8)> {
        self.0
            .iter()
            .find(|(k, _)| *k == (segment, bus, device, function))
            .map(|&(_, v)| v)
    }
}

const IGD_UNIT: u64 = 0xfed9_0000;
const ALL_UNIT: u64 = 0xfed9_1000;

/// Unit IGD_UNIT for 00:02.0, INCLUDE_PCI_ALL unit ALL_UNIT for the rest; RMRRs:
/// two for 00:14.0 (overlapping, merged) and one apart; one shared by 00:1a.0 and 00:1d.0; one
/// for 03:00.0 behind root port 00:1c.0; graphics stolen memory for 00:02.0; an unaligned one
/// for 00:1d.0; and firmware bugs: base 0 limit 0, limit below base, an I/O APIC scope, a
/// range past the 39-bit host address width.
fn synthetic_dmar() -> Vec<u8> {
    dmar_table(
        38,
        &[
            ddrhd(0, IGD_UNIT, &[ep0(&[(2, 0)])]),
            ddrhd(1, ALL_UNIT, &[]),
            drmrr(0x7000_0000, 0x7000_3fff, &[ep0(&[(0x14, 0)])]),
            drmrr(0x7000_2000, 0x7000_5fff, &[ep0(&[(0x14, 0)])]),
            drmrr(0x7800_0000, 0x7800_0fff, &[ep0(&[(0x14, 0)])]),
            drmrr(
                0x7200_0000,
                0x7200_1fff,
                &[ep0(&[(0x1a, 0)]), ep0(&[(0x1d, 0)])],
            ),
            drmrr(0x7300_0000, 0x7300_0fff, &[ep0(&[(0x1c, 0), (0, 0)])]),
            drmrr(0x8000_0000, 0x83ff_ffff, &[ep0(&[(2, 0)])]),
            drmrr(0x7100_0800, 0x7100_17ff, &[ep0(&[(0x1d, 0)])]),
            drmrr(0, 0, &[ep0(&[(0x1d, 1)])]),
            drmrr(0x7400_1000, 0x7400_0fff, &[ep0(&[(0x1d, 2)])]),
            drmrr(0x7500_0000, 0x7500_0fff, &[dscope(3, 0, &[(0x1e, 1)])]),
            drmrr(1 << 39, (1 << 39) + 0xfff, &[ep0(&[(0x1d, 7)])]),
        ],
    )
}

fn root_port() -> Bridges {
    Bridges(vec![((0, 0, 0x1c, 0), (3, 3))])
}

const fn r(start: u64, end: u64) -> IdentityRange {
    IdentityRange { start, end }
}

fn sid(bus: u16, dev: u16, func: u16) -> u16 {
    bus << 8 | dev << 3 | func
}

fn plan_summary(plan: &RmrrPlan) -> Vec<(u64, u16, Vec<IdentityRange>)> {
    plan.devices()
        .iter()
        .map(|d| (d.unit, d.sid, d.ranges().to_vec()))
        .collect()
}

#[test]
fn rmrr_plan_of_a_synthetic_table() {
    let bytes = synthetic_dmar();
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &root_port());
    assert_eq!(
        plan_summary(&plan),
        [
            (IGD_UNIT, sid(0, 2, 0), vec![r(0x8000_0000, 0x8400_0000)]),
            (
                ALL_UNIT,
                sid(0, 0x14, 0),
                vec![r(0x7000_0000, 0x7000_6000), r(0x7800_0000, 0x7800_1000)]
            ),
            (ALL_UNIT, sid(0, 0x1a, 0), vec![r(0x7200_0000, 0x7200_2000)]),
            (
                ALL_UNIT,
                sid(0, 0x1d, 0),
                vec![r(0x7100_0000, 0x7100_2000), r(0x7200_0000, 0x7200_2000)]
            ),
            (ALL_UNIT, sid(3, 0, 0), vec![r(0x7300_0000, 0x7300_1000)]),
        ]
    );
    assert!(plan.devices().iter().all(|d| d.segment == 0));
    assert_eq!(plan.device(0, sid(3, 0, 0)).unwrap().drhd_index, 1);
    // Usable ranges: all but base 0, limit < base and the one past the HAW (the I/O APIC
    // scope's range is fine, its scope is not).
    assert_eq!(plan.rmrr_counts(), (11, 8));
    let kinds: Vec<_> = plan.issues().iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        [
            RmrrIssueKind::Unaligned {
                used: r(0x7100_0000, 0x7100_2000)
            },
            RmrrIssueKind::ZeroRange,
            RmrrIssueKind::LimitBelowBase,
            RmrrIssueKind::NotAPciDevice(crate::firmware::dmar::ScopeType::IoApic),
            RmrrIssueKind::BeyondAddressWidth { haw: 39 },
        ]
    );
    assert_eq!(plan.issues()[1].base, 0);
    assert_eq!(plan.issues()[3].device, None);
    assert!(plan.issues()[3].scope_offset.is_some());
    assert!(plan.is_complete());
    assert_eq!(plan.issues_dropped(), 0);
    assert!(
        plan.issues()[1]
            .to_string()
            .contains("base 0 limit 0 (firmware bug), skipped")
    );

    // Per unit, and the union the identity domain maps.
    let units: Vec<(u64, usize)> = plan
        .units()
        .map(|u| (u.register_base(), u.devices().len()))
        .collect();
    assert_eq!(units, [(IGD_UNIT, 1), (ALL_UNIT, 4)]);
    let all = plan.for_unit(ALL_UNIT);
    assert_eq!(
        all.identity_ranges().collect::<Vec<_>>(),
        [
            r(0x7000_0000, 0x7000_6000),
            r(0x7100_0000, 0x7100_2000),
            r(0x7200_0000, 0x7200_2000),
            r(0x7300_0000, 0x7300_1000),
            r(0x7800_0000, 0x7800_1000),
        ]
    );
    assert!(plan.for_unit(0xdead_0000).devices().is_empty());

    // Without the bridge, the device behind it does not resolve: skipped and reported.
    let plan = RmrrPlan::build(&dmar, &NoBridges);
    assert_eq!(plan.devices().len(), 4);
    assert!(plan.device(0, sid(3, 0, 0)).is_none());
    assert!(plan.issues().iter().any(|i| matches!(
        i.kind,
        RmrrIssueKind::Unresolved(ResolveError::NotABridge { hop: 0, .. })
    )));
}

#[test]
fn rmrr_plan_merges_and_overflows() {
    // Nine separate one-page RMRRs for one device: the ninth range does not fit.
    let mut structures = vec![ddrhd(1, ALL_UNIT, &[])];
    for i in 0..9u64 {
        let base = 0x1000_0000 + i * 0x10_0000;
        structures.push(drmrr(base, base + 0xfff, &[ep0(&[(0x14, 0)])]));
    }
    // Adjacent ones merge into one: no overflow from them.
    for i in 0..20u64 {
        let base = 0x2000_0000 + i * 0x1000;
        structures.push(drmrr(base, base + 0xfff, &[ep0(&[(0x1a, 0)])]));
    }
    let bytes = dmar_table(38, &structures);
    let plan = RmrrPlan::build(&Dmar::parse(&bytes).unwrap(), &NoBridges);
    let usb = plan.device(0, sid(0, 0x14, 0)).unwrap();
    assert_eq!(usb.ranges().len(), 8);
    let other = plan.device(0, sid(0, 0x1a, 0)).unwrap();
    assert_eq!(other.ranges(), [r(0x2000_0000, 0x2001_4000)]);
    assert_eq!(plan.issues().len(), 1);
    assert_eq!(plan.issues()[0].kind, RmrrIssueKind::RangeOverflow);
    assert_eq!(plan.issues()[0].device, Some((0, sid(0, 0x14, 0))));
    assert!(!plan.is_complete());

    // 70 devices: 64 fit, six are lost.
    let scopes: Vec<Vec<u8>> = (0..70u8).map(|i| ep0(&[(i / 8, i % 8)])).collect();
    let bytes = dmar_table(
        38,
        &[
            ddrhd(1, ALL_UNIT, &[]),
            drmrr(0x3000_0000, 0x3000_0fff, &scopes),
        ],
    );
    let plan = RmrrPlan::build(&Dmar::parse(&bytes).unwrap(), &NoBridges);
    assert_eq!(plan.devices().len(), MAX_RMRR_DEVICES);
    let lost: Vec<_> = plan
        .issues()
        .iter()
        .filter(|i| i.kind == RmrrIssueKind::DeviceOverflow)
        .collect();
    assert_eq!(lost.len(), 6);
    assert!(!plan.for_unit(ALL_UNIT).is_complete());
}

// ---------------------------------------------------------------------------------------------
// RMRR: applying a plan
// ---------------------------------------------------------------------------------------------

/// Every page the remapping structures reachable from the root table consist of, by address:
/// root, context tables, PASID directories and tables, and the page tables of present entries.
fn structures(mem: &FakeMem, rt: u64) -> BTreeMap<u64, Vec<u64>> {
    let mut out = BTreeMap::new();
    let page = |pa: u64| (0..512).map(|i| mem.read(pa + 8 * i)).collect::<Vec<u64>>();
    fn tables(mem: &FakeMem, out: &mut BTreeMap<u64, Vec<u64>>, pa: u64, level: u32, fs: bool) {
        let words: Vec<u64> = (0..512).map(|i| mem.read(pa + 8 * i)).collect();
        for &e in &words {
            let present = if fs { e & 1 != 0 } else { e & 3 != 0 };
            if present && level > 1 && e & (1 << 7) == 0 {
                tables(mem, out, e & PTE_ADDR, level - 1, fs);
            }
        }
        out.insert(pa, words);
    }
    let root = rt & !0xfff;
    out.insert(root, page(root));
    let scalable = (rt >> 10) & 3 == 1;
    for bus in 0..256 {
        let (lo, hi) = (mem.read(root + bus * 16), mem.read(root + bus * 16 + 8));
        if !scalable {
            if lo & 1 == 0 {
                continue;
            }
            let ct = lo & !0xfff;
            out.insert(ct, page(ct));
            for devfn in 0..256 {
                let (c0, c1) = (mem.read(ct + devfn * 16), mem.read(ct + devfn * 16 + 8));
                if c0 & 1 != 0 && (c0 >> 2) & 3 != 2 {
                    tables(mem, &mut out, c0 & !0xfff, (c1 & 7) as u32 + 2, false);
                }
            }
            continue;
        }
        for half in [lo, hi] {
            if half & 1 == 0 {
                continue;
            }
            let ct = half & !0xfff;
            out.insert(ct, page(ct));
            for i in 0..128 {
                let q0 = mem.read(ct + i * 32);
                if q0 & 1 == 0 {
                    continue;
                }
                let dir = q0 & !0xfff;
                out.insert(dir, page(dir));
                for j in 0..512 {
                    let de = mem.read(dir + j * 8);
                    if de & 1 == 0 {
                        continue;
                    }
                    let pt = de & !0xfff;
                    out.insert(pt, page(pt));
                    for k in 0..64 {
                        let (e0, e2) = (mem.read(pt + k * 64), mem.read(pt + k * 64 + 16));
                        if e0 & 1 == 0 {
                            continue;
                        }
                        match (e0 >> 6) & 7 {
                            0b010 => tables(
                                mem,
                                &mut out,
                                e0 & !0xfff,
                                ((e0 >> 2) & 7) as u32 + 2,
                                false,
                            ),
                            0b001 => {
                                tables(mem, &mut out, e2 & !0xfff, 4 + ((e2 >> 2) & 3) as u32, true)
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    out
}

/// The leaves of a second-stage table: (iova, size, output address).
fn ss_leaves(mem: &FakeMem, table: u64, level: u32, base: u64, out: &mut Vec<(u64, u64, u64)>) {
    for i in 0..512u64 {
        let e = mem.read(table + i * 8);
        if e & 3 == 0 {
            continue;
        }
        let size = 1u64 << (12 + 9 * (level - 1));
        let iova = base + i * size;
        if level == 1 || e & (1 << 7) != 0 {
            out.push((iova, size, e & PTE_ADDR & !(size - 1)));
        } else {
            ss_leaves(mem, e & PTE_ADDR, level - 1, iova, out);
        }
    }
}

/// The identity domain maps exactly `ranges`, each page to itself, and every SID in `sids`
/// walks to it through the hardware structures; nothing outside `ranges` translates.
fn check_identity(
    mem: &FakeMem,
    rt: u64,
    unit_domain: &Domain,
    sids: &[u16],
    ranges: &[IdentityRange],
) {
    let mut leaves = Vec::new();
    ss_leaves(
        mem,
        unit_domain.root(),
        unit_domain.levels(),
        0,
        &mut leaves,
    );
    assert!(
        leaves.iter().all(|&(iova, _, pa)| iova == pa),
        "identity leaves only"
    );
    let mut covered: Vec<IdentityRange> = Vec::new();
    for &(iova, size, _) in &leaves {
        match covered.last_mut() {
            Some(last) if last.end == iova => last.end += size,
            _ => covered.push(r(iova, iova + size)),
        }
    }
    assert_eq!(covered, ranges, "the leaves cover exactly the RMRR ranges");
    for &sid in sids {
        for range in ranges {
            for page in (range.start..range.end).step_by(4096) {
                let hit = walk(mem, rt, sid, None, page + 0x18);
                assert_eq!(
                    hit.map(|h| h.pa),
                    Ok(page + 0x18),
                    "sid {sid:#x} page {page:#x}"
                );
            }
            for probe in [range.start.wrapping_sub(K4), range.end] {
                if !ranges.iter().any(|x| x.contains(probe)) {
                    assert_eq!(
                        walk(mem, rt, sid, None, probe).map(|h| h.pa),
                        Err("second-stage entry not present"),
                        "{probe:#x} must fault"
                    );
                }
            }
        }
    }
}

#[test]
fn rmrr_apply_legacy_synthetic() {
    let bytes = synthetic_dmar();
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &root_port());
    let mem = FakeMem::new(256);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let rt = rtaddr(&hw);
    let unit_plan = plan.for_unit(ALL_UNIT);
    let report = unit.apply_rmrr(&mem, &unit_plan).unwrap();
    let sids = [
        sid(0, 0x14, 0),
        sid(0, 0x1a, 0),
        sid(0, 0x1d, 0),
        sid(3, 0, 0),
    ];
    assert_eq!(
        report,
        RmrrReport {
            domain_id: Some(1),
            address_width: 39,
            devices: 4,
            ranges: 5,
            bytes: 0x6000 + 0x2000 + 0x2000 + 0x1000 + 0x1000,
            complete: true,
        }
    );
    assert_eq!(unit.rmrr_devices(), sids);
    let domain = unit.rmrr_domain().unwrap();
    assert_eq!((domain.levels(), domain.stage()), (3, Stage::Second));
    let ranges: Vec<_> = unit_plan.identity_ranges().collect();
    check_identity(&mem, rt, domain, &sids, &ranges);
    for s in [sid(0, 0x1d, 1), sid(0, 2, 0), sid(3, 0, 1), sid(0, 0x14, 1)] {
        assert_eq!(
            walk(&mem, rt, s, None, 0x7000_0000).map(|h| h.pa),
            Err("context entry not present")
        );
        assert!(unit.is_assignable(s));
    }
    for &s in &sids {
        assert!(!unit.is_assignable(s));
        let d = unit
            .create_domain(&mem, DomainConfig::second_stage(48))
            .unwrap();
        assert_eq!(
            unit.attach(&mem, s, None, &d),
            Err(VtdError::RmrrDevice { sid: s })
        );
        assert_eq!(
            unit.replace(&mem, s, None, &d),
            Err(VtdError::RmrrDevice { sid: s })
        );
        assert_eq!(
            unit.detach(&mem, s, None),
            Err(VtdError::RmrrDevice { sid: s })
        );
        unit.destroy_domain(&mem, d).unwrap();
    }
    assert_eq!(
        unit.apply_rmrr(&mem, &unit_plan),
        Err(VtdError::RmrrAlreadyApplied)
    );
    // The domain is held by its devices.
    let d = unit.rmrr.domain.take().unwrap();
    assert!(matches!(
        unit.try_destroy_domain(&mem, d),
        Err((VtdError::DomainBusy { attachments: 4 }, _))
    ));

    // The graphics unit: 64 MiB of stolen memory, in 2 MiB leaves.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut igd = up(&hw, &mem, legacy());
    let report = igd.apply_rmrr(&mem, &plan.for_unit(IGD_UNIT)).unwrap();
    assert_eq!(
        (report.devices, report.ranges, report.bytes),
        (1, 1, 64 << 20)
    );
    let domain = igd.rmrr_domain().unwrap();
    check_identity(
        &mem,
        rtaddr(&hw),
        domain,
        &[sid(0, 2, 0)],
        &[r(0x8000_0000, 0x8400_0000)],
    );
    let mut leaves = Vec::new();
    ss_leaves(&mem, domain.root(), domain.levels(), 0, &mut leaves);
    assert_eq!(leaves.len(), 32, "2 MiB leaves");

    // A unit without RMRR devices: no domain, everything assignable.
    let mem = FakeMem::new(32);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut none = up(&hw, &mem, legacy());
    let report = none.apply_rmrr(&mem, &plan.for_unit(0xdead_0000)).unwrap();
    assert_eq!(report.domain_id, None);
    assert!(none.rmrr_domain().is_none() && none.is_assignable(0));
}

#[test]
fn rmrr_apply_scalable_synthetic() {
    let bytes = synthetic_dmar();
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &root_port());
    let mem = FakeMem::new(256);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM);
    let mut unit = up(&hw, &mem, scalable());
    let unit_plan = plan.for_unit(ALL_UNIT);
    let live = mem.live_frames();
    let report = unit.apply_rmrr(&mem, &unit_plan).unwrap();
    assert_eq!((report.devices, report.ranges), (4, 5));
    let sids = unit.rmrr_devices().to_vec();
    let ranges: Vec<_> = unit_plan.identity_ranges().collect();
    check_identity(
        &mem,
        rtaddr(&hw),
        unit.rmrr_domain().unwrap(),
        &sids,
        &ranges,
    );
    // Spare reserved pages went back: bus 0 upper half and bus 3 lower half context tables,
    // a PASID directory and table per device, and the identity domain's tables.
    let mut leaves = Vec::new();
    let d = unit.rmrr_domain().unwrap();
    ss_leaves(&mem, d.root(), d.levels(), 0, &mut leaves);
    let tables = structures(&mem, rtaddr(&hw)).len() - 1;
    assert_eq!(mem.live_frames() - live, tables);
    assert_eq!(tables, 2 + 2 * 4 + (1 + 1 + 5));
}

#[test]
fn rmrr_apply_unwinds() {
    let bytes = synthetic_dmar();
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &root_port());
    let unit_plan = plan.for_unit(ALL_UNIT);
    for (ecap, cfg) in [(QEMU_ECAP, legacy()), (QEMU_ECAP_SM, scalable())] {
        let mem = FakeMem::new(1024);
        let hw = FakeVtd::new(&mem, QEMU_CAP, ecap);
        let mut unit = up(&hw, &mem, cfg);
        let rt = rtaddr(&hw);
        // Something attached before, so that the structures are not empty.
        let other = unit
            .create_domain(&mem, DomainConfig::second_stage(48))
            .unwrap();
        unit.map(&mem, &other, 0, 0x9000_0000, K4, RW).unwrap();
        unit.attach(&mem, sid(0, 0x14, 1), None, &other).unwrap();

        // Allocation failure at every point: the structures stay exactly as they were.
        let before = structures(&mem, rt);
        let live = mem.live_frames();
        let mut n = 0;
        let needed = loop {
            mem.fail_after.set(Some(n));
            let allocs = mem.allocs.get();
            let result = unit.apply_rmrr(&mem, &unit_plan);
            mem.fail_after.set(None);
            match result {
                Ok(_) => break mem.allocs.get() - allocs,
                Err(e) => assert!(
                    matches!(
                        e,
                        VtdError::NoMemory | VtdError::Map(MapError::NoMemory { .. })
                    ),
                    "after {n} allocations: {e:?}"
                ),
            }
            assert_eq!(structures(&mem, rt), before, "after {n} allocations");
            assert_eq!(mem.live_frames(), live, "after {n} allocations");
            assert!(unit.rmrr_domain().is_none() && unit.is_assignable(sid(0, 0x14, 0)));
            n += 1;
        };
        assert_eq!(n, needed, "every allocation point was a failure point once");
        assert!(n > 5);
        assert_eq!(unit.rmrr_domain().unwrap().did(), 2, "no domain id leaked");
        assert_eq!(
            walk(&mem, rt, sid(0, 0x14, 1), None, 0).unwrap().pa,
            0x9000_0000
        );
    }

    // A failure in the attach phase: the devices attached so far are detached again.
    let mem = FakeMem::new(256);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let rt = rtaddr(&hw);
    let other = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let last = sid(3, 0, 0);
    unit.attach(&mem, last, None, &other).unwrap();
    assert_eq!(
        unit.apply_rmrr(&mem, &unit_plan),
        Err(VtdError::AlreadyAttached)
    );
    for s in [sid(0, 0x14, 0), sid(0, 0x1a, 0), sid(0, 0x1d, 0)] {
        assert_eq!(
            walk(&mem, rt, s, None, 0x7000_0000),
            Err("context entry not present")
        );
        assert!(unit.is_assignable(s));
    }
    assert!(unit.rmrr_devices().is_empty() && unit.rmrr_domain().is_none());
    unit.detach(&mem, last, None).unwrap();
    let report = unit.apply_rmrr(&mem, &unit_plan).unwrap();
    assert_eq!(
        report.domain_id,
        Some(2),
        "the failed attempt's domain id was freed"
    );

    // A SID outside the unit's buses: refused before any change.
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let cfg = UnitConfig {
        buses: (0, 0),
        ..legacy()
    };
    let mut unit = up(&hw, &mem, cfg);
    let before = mem.snapshot();
    assert_eq!(
        unit.apply_rmrr(&mem, &unit_plan),
        Err(VtdError::BadSid { sid: sid(3, 0, 0) })
    );
    assert_eq!(mem.snapshot(), before);
}

#[test]
fn rmrr_incomplete_plan_makes_nothing_assignable() {
    // A sub-hierarchy scope: the bridge is covered, the devices below it cannot be listed.
    let bytes = dmar_table(
        38,
        &[
            ddrhd(1, ALL_UNIT, &[]),
            drmrr(0x7000_0000, 0x7000_0fff, &[dscope(2, 0, &[(0x1c, 0)])]),
        ],
    );
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &root_port());
    assert_eq!(plan.issues()[0].kind, RmrrIssueKind::SubHierarchy);
    assert!(!plan.is_complete());
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let report = unit.apply_rmrr(&mem, &plan.for_unit(ALL_UNIT)).unwrap();
    assert!(!report.complete);
    assert_eq!(unit.rmrr_devices(), [sid(0, 0x1c, 0)]);
    assert!(!unit.is_assignable(sid(3, 0, 0)) && !unit.is_assignable(sid(9, 0, 0)));
}

// ---------------------------------------------------------------------------------------------
// RMRR: real firmware tables (shared/acpi-tables, see its README.md)
// ---------------------------------------------------------------------------------------------

/// A real DMAR from `IOMMU_ACPI_TABLES`, else `shared/acpi-tables` beside the repository.
fn real_dmar(name: &str) -> Vec<u8> {
    let dir = match std::env::var_os("IOMMU_ACPI_TABLES") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/acpi-tables"
        )),
    };
    let path = dir.join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read real DMAR {}: {e}. The RMRR tests need the shared ACPI table collection \
             (shared/acpi-tables beside the repository); set IOMMU_ACPI_TABLES to its directory",
            path.display()
        )
    })
}

#[test]
fn rmrr_hp_compaq_6730b_zero_range_is_skipped() {
    // README: "BUGGY: RMRR with base 0 and limit 0 ... for 8 USB controllers". The other RMRR
    // (0xbbc00000-0xbfffffff) is graphics stolen memory for 00:02.0 and 00:02.1, both in the
    // scope of the DRHD at 0xfeb01000.
    let bytes = real_dmar("hp-compaq-6730b-dmar.bin");
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &NoBridges);
    assert_eq!(plan.rmrr_counts(), (2, 1));
    let stolen = vec![r(0xbbc0_0000, 0xc000_0000)];
    assert_eq!(
        plan_summary(&plan),
        [
            (0xfeb0_1000, sid(0, 2, 0), stolen.clone()),
            (0xfeb0_1000, sid(0, 2, 1), stolen.clone()),
        ]
    );
    assert_eq!(plan.issues().len(), 1);
    let issue = plan.issues()[0];
    assert_eq!(
        (issue.kind, issue.base, issue.limit),
        (RmrrIssueKind::ZeroRange, 0, 0)
    );
    assert!(plan.is_complete());
    assert!(
        plan.for_unit(0xfeb0_2000).devices().is_empty(),
        "USB: nothing to map"
    );

    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let report = unit.apply_rmrr(&mem, &plan.for_unit(0xfeb0_1000)).unwrap();
    assert_eq!(
        (
            report.devices,
            report.ranges,
            report.bytes,
            report.address_width
        ),
        (2, 1, 0x440_0000, 39)
    );
    let igd = [sid(0, 2, 0), sid(0, 2, 1)];
    check_identity(
        &mem,
        rtaddr(&hw),
        unit.rmrr_domain().unwrap(),
        &igd,
        &stolen,
    );
    assert!(igd.iter().all(|&s| !unit.is_assignable(s)));
    for usb in [sid(0, 0x1d, 0), sid(0, 0x1a, 7)] {
        assert!(unit.is_assignable(usb));
        assert_eq!(
            walk(&mem, rtaddr(&hw), usb, None, 0).map(|h| h.pa),
            Err("context entry not present")
        );
    }
}

/// The DL380e Gen8's RMRR devices, with the root ports and bridges of its 2-hop paths on buses
/// 1, 2, 3 and 5.
fn dl380e_topology() -> Bridges {
    Bridges(vec![
        ((0, 0, 0x01, 0), (1, 1)),
        ((0, 0, 0x01, 1), (2, 2)),
        ((0, 0, 0x1c, 4), (3, 3)),
        ((0, 0, 0x1c, 7), (5, 5)),
    ])
}

#[test]
fn rmrr_hp_proliant_dl380e_plan() {
    // Nine RMRRs (README), read from the table: 00:1d.0 + 00:1a.0 share 0x7dffd000-0x7dffffff;
    // 1c.7/00.{0,2,4} share 0x7dff6000-0x7dffcfff; seven RMRRs (0x7df83000-0x7df84fff,
    // 0x7df7f000-0x7df82fff, 0x7df6f000-0x7df7efff, 0x79f6f000-0x7df6efff,
    // 0x75f6f000-0x79f6efff, 0xf4000-0xf4fff, 0xe8000-0xe8fff) each list the same ten devices
    // 01.1/00.0, 1c.7/00.0, 1c.7/00.2, 01.0/00.0, 1f.2, 1f.5, 1c.4/00.{0,1,2,3}. The first
    // five of those seven are contiguous: one range 0x75f6f000-0x7df84fff.
    let bytes = real_dmar("hp-proliant-dl380e-gen8-dmar.bin");
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &dl380e_topology());
    assert_eq!(plan.rmrr_counts(), (9, 9));
    assert!(plan.issues().is_empty() && plan.is_complete());
    let usb = r(0x7dff_d000, 0x7e00_0000);
    let ilo = r(0x7dff_6000, 0x7dff_d000);
    let shared = [
        r(0xe8000, 0xe9000),
        r(0xf4000, 0xf5000),
        r(0x75f6_f000, 0x7df8_5000),
    ];
    let with_ilo = [shared[0], shared[1], shared[2], ilo];
    let unit = 0xbeff_e000; // INCLUDE_PCI_ALL: the other DRHD covers bus 0x20 only
    let expected: Vec<(u64, u16, Vec<IdentityRange>)> = [
        (sid(0, 0x1a, 0), vec![usb]),
        (sid(0, 0x1d, 0), vec![usb]),
        (sid(0, 0x1f, 2), shared.to_vec()),
        (sid(0, 0x1f, 5), shared.to_vec()),
        (sid(1, 0, 0), shared.to_vec()),
        (sid(2, 0, 0), shared.to_vec()),
        (sid(3, 0, 0), shared.to_vec()),
        (sid(3, 0, 1), shared.to_vec()),
        (sid(3, 0, 2), shared.to_vec()),
        (sid(3, 0, 3), shared.to_vec()),
        (sid(5, 0, 0), with_ilo.to_vec()),
        (sid(5, 0, 2), with_ilo.to_vec()),
        (sid(5, 0, 4), vec![ilo]),
    ]
    .into_iter()
    .map(|(s, ranges)| (unit, s, ranges))
    .collect();
    assert_eq!(plan_summary(&plan), expected);
    assert_eq!(plan.devices().len(), 13);
    let ranges: usize = plan.devices().iter().map(|d| d.ranges().len()).sum();
    assert_eq!(ranges, 35);
    assert!(plan.for_unit(0xfbef_e000).devices().is_empty());
    assert_eq!(
        plan.for_unit(unit).identity_ranges().collect::<Vec<_>>(),
        [shared[0], shared[1], shared[2], r(0x7dff_6000, 0x7e00_0000)]
    );

    // Without the bridges, the 59 two-hop scopes do not resolve (the README's 59 multi-hop
    // paths are all in RMRRs): 32 issues kept, 27 counted; the four bus-0 devices remain.
    let plan = RmrrPlan::build(&dmar, &NoBridges);
    assert_eq!(plan.devices().len(), 4);
    assert_eq!(plan.issues().len(), MAX_RMRR_ISSUES);
    assert_eq!(plan.issues().len() + plan.issues_dropped(), 59);
    assert!(plan.is_complete(), "absent devices need nothing");
}

#[test]
fn rmrr_hp_proliant_dl380e_apply() {
    let bytes = real_dmar("hp-proliant-dl380e-gen8-dmar.bin");
    let dmar = Dmar::parse(&bytes).unwrap();
    let plan = RmrrPlan::build(&dmar, &dl380e_topology());
    let unit_plan = plan.for_unit(0xbeff_e000);
    let ranges: Vec<_> = unit_plan.identity_ranges().collect();
    let sids: Vec<u16> = unit_plan.devices().iter().map(|d| d.sid).collect();
    for (ecap, cfg) in [(QEMU_ECAP, legacy()), (QEMU_ECAP_SM, scalable())] {
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, QEMU_CAP, ecap);
        let mut unit = up(&hw, &mem, cfg);
        let report = unit.apply_rmrr(&mem, &unit_plan).unwrap();
        assert_eq!(
            (report.devices, report.ranges, report.address_width),
            (13, 4, 39)
        );
        assert_eq!(report.bytes, 0x2000 + (0x7df8_5000 - 0x75f6_f000) + 0xa000);
        assert_eq!(unit.rmrr_devices(), sids);
        check_identity(
            &mem,
            rtaddr(&hw),
            unit.rmrr_domain().unwrap(),
            &sids,
            &ranges,
        );
        for &s in &sids {
            assert!(!unit.is_assignable(s));
        }
        // Buses 0 and 5 hold RMRR devices, so their root entries are present and only the
        // function's context entry is missing; nothing on bus 0x20 has an RMRR.
        for (s, fault) in [
            (sid(5, 0, 1), "context entry not present"),
            (sid(0x20, 4, 0), "root entry not present"),
            (sid(0, 0x1d, 1), "context entry not present"),
        ] {
            assert!(unit.is_assignable(s));
            assert_eq!(
                walk(&mem, rtaddr(&hw), s, None, 0x7dff_d000).map(|h| h.pa),
                Err(fault)
            );
        }
    }
}

#[test]
fn new_errors_display() {
    assert!(
        VtdError::RmrrDevice { sid: 0x00e8 }
            .to_string()
            .contains("00:1d.0")
    );
    assert!(
        VtdError::PassThroughUnsupported
            .to_string()
            .contains("ECAP.PT")
    );
    assert!(
        VtdError::DeviceTlbMismatch { sid: 0x18 }
            .to_string()
            .contains("00:03.0")
    );
}

// ---------------------------------------------------------------------------------------------
// DMA aliases: every requester ID of a device behind a PCIe-to-PCI bridge
// ---------------------------------------------------------------------------------------------

/// edu 01:01.0 behind a PCIe-to-PCI bridge 00:1e.0 with secondary bus 1: own ID, (01, 00.0),
/// and the bridge's ID. A second conventional device 01:02.0 shares the last two.
const EDU_BEHIND_BRIDGE: [u16; 3] = [0x0108, 0x0100, 0x00f0];
const PEER_BEHIND_BRIDGE: [u16; 3] = [0x0110, 0x0100, 0x00f0];

fn alias_walks(mem: &FakeMem, rt: u64, sids: &[u16], pasid: Option<u32>, iova: u64) -> Vec<Walk> {
    sids.iter()
        .map(|&sid| walk(mem, rt, sid, pasid, iova))
        .collect()
}

#[test]
fn aliases_attach_replace_detach_legacy() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP);
    let mut unit = up(&hw, &mem, legacy());
    let d1 = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    let d2 = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d1, 0x10_0000, 0x5000_0000, K4, RW).unwrap();
    unit.map(&mem, &d2, 0x10_0000, 0x6000_0000, K4, RW).unwrap();
    let rt = rtaddr(&hw);

    unit.attach_aliases(&mem, &EDU_BEHIND_BRIDGE, None, &d1)
        .unwrap();
    let hit = Ok(Hit {
        pa: 0x5000_0123,
        leaf: 0,
        did: d1.did(),
        pgsnp: false,
    });
    let strip = |w: Walk| w.map(|h| Hit { leaf: 0, ..h });
    for w in alias_walks(&mem, rt, &EDU_BEHIND_BRIDGE, None, 0x10_0123) {
        assert_eq!(strip(w), hit, "every alias translates through the domain");
    }
    assert_eq!(
        walk(&mem, rt, 0x0110, None, 0x10_0123),
        Err("context entry not present")
    );
    // A fault on the bridge alias counts for the device it was attached for.
    assert!(hw.inject_fault(0x0def_0000, fault_hi(0x0100, 2, false)));
    let mut got = Vec::new();
    unit.poll_faults(&mut |r| got.push(r.source_id));
    assert_eq!(got, [0x0100]);
    assert_eq!(unit.owner_of(0x0100), 0x0108);
    assert_eq!(unit.owner_of(0x0110), 0x0110);
    assert_eq!(unit.fault_count(0x0108), 1);

    // The peer behind the same bridge: its shared aliases already point at d1, fine; at d2
    // the shared ones conflict and nothing is written.
    assert_eq!(
        unit.attach_aliases(&mem, &PEER_BEHIND_BRIDGE, None, &d2),
        Err(VtdError::AlreadyAttached)
    );
    assert_eq!(
        walk(&mem, rt, 0x0110, None, 0x10_0123),
        Err("context entry not present")
    );
    assert_eq!(
        unit.attach_aliases(&mem, &EDU_BEHIND_BRIDGE, None, &d1),
        Err(VtdError::AlreadyAttached),
        "the device's own ID is attached"
    );
    unit.attach_aliases(&mem, &PEER_BEHIND_BRIDGE, None, &d1)
        .unwrap();
    assert_eq!(strip(walk(&mem, rt, 0x0110, None, 0x10_0123)), hit);

    // Replace moves every ID of the device (shared ones included) to d2.
    unit.replace_aliases(&mem, &EDU_BEHIND_BRIDGE, None, &d2)
        .unwrap();
    for w in alias_walks(&mem, rt, &EDU_BEHIND_BRIDGE, None, 0x10_0123) {
        assert_eq!(strip(w).map(|h| (h.pa, h.did)), Ok((0x6000_0123, d2.did())));
    }
    assert_eq!(
        unit.replace_aliases(&mem, &[0x0108, 0x0118], None, &d1),
        Err(VtdError::NotAttached),
        "an unattached ID refuses the whole set"
    );
    assert_eq!(
        walk(&mem, rt, 0x0108, None, 0x10_0123).map(|h| h.did),
        Ok(d2.did())
    );

    // Detach the peer's own ID only (its aliases are shared), then the device with its aliases.
    unit.detach_aliases(&mem, &PEER_BEHIND_BRIDGE[..1], None)
        .unwrap();
    unit.detach_aliases(&mem, &EDU_BEHIND_BRIDGE, None).unwrap();
    for w in alias_walks(&mem, rt, &[0x0108, 0x0110, 0x0100, 0x00f0], None, 0x10_0123) {
        assert_eq!(w, Err("context entry not present"));
    }
    assert_eq!(
        unit.owner_of(0x00f0),
        0x0110,
        "attribution outlives the attachment"
    );
    assert_eq!(
        unit.detach_aliases(&mem, &EDU_BEHIND_BRIDGE, None),
        Err(VtdError::NotAttached)
    );
    let too_many = [0x0108u16; super::unit::MAX_ALIAS_SIDS + 1];
    assert!(matches!(
        unit.attach_aliases(&mem, &too_many, None, &d1),
        Err(VtdError::BadSid { .. })
    ));
    assert_eq!(unit.attach_aliases(&mem, &[], None, &d1), Ok(()));
}

#[test]
fn aliases_attach_scalable() {
    let mem = FakeMem::new(64);
    let hw = FakeVtd::new(&mem, QEMU_CAP, QEMU_ECAP_SM);
    let mut unit = up(&hw, &mem, scalable());
    let d = unit
        .create_domain(&mem, DomainConfig::second_stage(48))
        .unwrap();
    unit.map(&mem, &d, 0x10_0000, 0x5000_0000, K4, RW).unwrap();
    unit.attach_aliases(&mem, &EDU_BEHIND_BRIDGE, None, &d)
        .unwrap();
    let rt = rtaddr(&hw);
    for w in alias_walks(&mem, rt, &EDU_BEHIND_BRIDGE, None, 0x10_0123) {
        assert_eq!(w.map(|h| (h.pa, h.did)), Ok((0x5000_0123, d.did())));
    }
    unit.detach_aliases(&mem, &EDU_BEHIND_BRIDGE, None).unwrap();
    for w in alias_walks(&mem, rt, &EDU_BEHIND_BRIDGE, None, 0x10_0123) {
        assert_eq!(w.map(|h| h.pa), Err("PASID entry not present"));
    }
}

// ---------------------------------------------------------------------------------------------
// A DRHD naming a unit the machine does not have
// ---------------------------------------------------------------------------------------------

/// Register space with nothing behind it: reads return `fill`, writes are recorded.
struct NoUnit {
    fill: u64,
    writes: RefCell<Vec<usize>>,
}

impl crate::hw::Mmio for &NoUnit {
    fn read32(&self, _: usize) -> u32 {
        self.fill as u32
    }
    fn write32(&self, offset: usize, _: u32) {
        self.writes.borrow_mut().push(offset);
    }
    fn read64(&self, _: usize) -> u64 {
        self.fill
    }
    fn write64(&self, offset: usize, _: u64) {
        self.writes.borrow_mut().push(offset);
    }
}

#[test]
fn bring_up_refuses_an_absent_unit_without_writing_to_it() {
    for (fill, why) in [
        (u64::MAX, "VER/CAP/ECAP read all-ones"),
        (0, "VER/CAP/ECAP read zero"),
    ] {
        let mem = FakeMem::new(16);
        let mmio = NoUnit {
            fill,
            writes: RefCell::new(Vec::new()),
        };
        let err = VtdUnit::new(&mmio, &mem, UnitConfig::default()).err();
        assert_eq!(err, Some(VtdError::UnitAbsent { why }));
        assert!(
            mmio.writes.borrow().is_empty(),
            "wrote {:?}",
            mmio.writes.borrow()
        );
        assert_eq!(mem.live_frames(), 0, "no root table allocated");
        assert!(
            VtdError::UnitAbsent { why }
                .to_string()
                .contains("no remapping unit at this address")
        );
    }
}

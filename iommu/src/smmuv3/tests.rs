//! Host tests of the SMMUv3 driver against the register model and recording memory in
//! `fake.rs`.
//!
//! Expected encodings are written out by hand from the layouts of IHI 0070 §5.2 (STE), §5.4
//! (CD), §4 (commands) and §7.3 (events), not computed with the encoders under test.
//! Translations are checked with a reference walker written from the specification (stream
//! table → STE → CD → stage-1 tables, stage-2 tables, nesting), independent of the driver's
//! decoders.

use std::collections::BTreeSet;
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::cd::{Cd, CdFields};
use super::cmdq::{Command, SyncSignal, TlbiRange, op};
use super::eventq::{Event, EventType, FaultClass};
use super::fake::{FakeMem, FakeSmmu, Item, POOL_BASE, QEMU_IDR0, QEMU_IDR1, QEMU_IDR3, Word};
use super::fake::{start_log, take_log};
use super::regs::{AccessAttrs, Gerror, offset};
use super::ste::{S2Fields, STE_WORDS, Ste, Step, StreamConfig, plan_update};
use super::*;
use crate::hw::Mmio;
use crate::pgtable::{Gather, MapError, Prot};

type Unit<'a> = SmmuUnit<'a, &'a FakeSmmu<'a>, Word>;

const RW: Prot = Prot::READ.union(Prot::WRITE);
const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const SID: u32 = 0x28;

const IDR0_COHACC: u32 = 1 << 4;
const IDR0_HYP: u32 = 1 << 9;
const IDR0_ASID16: u32 = 1 << 12;
const IDR0_VMID16: u32 = 1 << 18;
const IDR3_RIL: u32 = 1 << 10;

fn cfg() -> UnitConfig {
    UnitConfig {
        poll_budget: 1000,
        ..UnitConfig::new()
    }
}

fn new_mem() -> FakeMem {
    FakeMem::new(2048)
}

fn up<'a>(hw: &'a FakeSmmu<'a>, mem: &'a FakeMem, cfg: UnitConfig) -> Unit<'a> {
    let unit = SmmuUnit::new(hw, mem, cfg).unwrap();
    hw.take_commands();
    unit
}

/// Fresh physical pages outside the pool (as DMA buffers) at a fixed address.
const BUF: u64 = 0x8000_0000;

/// The active global errors of the fake.
fn gerr(hw: &FakeSmmu<'_>) -> Gerror {
    let s = hw.hw();
    Gerror::active(s.gerror, s.gerrorn)
}

fn opcodes(cmds: &[Command]) -> Vec<u8> {
    cmds.iter().map(|c| c.opcode()).collect()
}

// ---------------------------------------------------------------------------------------------
// Reference walker (IHI 0070 §3.3, §5.2, §5.4; Arm ARM VMSAv8-64 tables)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Abort,
    Bypass,
    /// The transaction reaches `pa`.
    To(u64),
}

type Walk = Result<Outcome, &'static str>;

#[derive(Clone, Copy, Debug)]
struct S2Walk {
    t0sz: u64,
    sl0: u64,
    ps_bits: u64,
    ttb: u64,
}

fn pa_bits(enc: u64) -> u64 {
    [32, 36, 40, 42, 44, 48, 52, 56][enc as usize & 7]
}

fn walk(mem: &FakeMem, hw: &FakeSmmu<'_>, sid: u32, iova: u64, write: bool) -> Walk {
    let (base, cfgr, cr0) = {
        let s = hw.hw();
        (s.strtab_base, s.strtab_base_cfg, s.cr0)
    };
    if cr0 & 1 == 0 {
        return Err("SMMU disabled");
    }
    let base = base & 0x000f_ffff_ffff_ffc0;
    let (log2size, split, fmt) = (cfgr & 0x3f, (cfgr >> 6) & 0x1f, (cfgr >> 16) & 3);
    if (sid as u64) >> log2size != 0 {
        return Err("C_BAD_STREAMID");
    }
    let ste = if fmt == 1 {
        let d = mem.read(base + (sid >> split) as u64 * 8);
        let span = d & 0x1f;
        if span == 0 {
            return Err("C_BAD_STREAMID");
        }
        let idx = (sid & ((1 << split) - 1)) as u64;
        if idx >= 1 << (span - 1) {
            return Err("C_BAD_STE");
        }
        (d & 0x000f_ffff_ffff_ffc0) + idx * 64
    } else {
        base + sid as u64 * 64
    };
    let w: [u64; 8] = core::array::from_fn(|i| mem.read(ste + 8 * i as u64));
    if w[0] & 1 == 0 {
        return Err("C_BAD_STE");
    }
    let config = (w[0] >> 1) & 7;
    match config {
        0 => return Ok(Outcome::Abort),
        4 => return Ok(Outcome::Bypass),
        5..=7 => {}
        _ => return Err("C_BAD_STE"),
    }
    let (s1, s2) = (config & 1 != 0, config & 2 != 0);
    let s2w = if s2 {
        let w2 = w[2];
        let aa64 = w2 & 1 << 51 != 0;
        let endi = w2 & 1 << 52 != 0;
        let stall = w2 & 1 << 57 != 0;
        let record = w2 & 1 << 58 != 0;
        let tg = (w2 >> 46) & 3;
        let sl0 = (w2 >> 38) & 3;
        let t0sz = (w2 >> 32) & 0x3f;
        if !aa64 || endi || stall || !record || tg != 0 || sl0 == 3 || !(20..=39).contains(&t0sz) {
            return Err("C_BAD_STE");
        }
        Some(S2Walk {
            t0sz,
            sl0,
            ps_bits: pa_bits((w2 >> 48) & 7).min(44),
            ttb: w[3] & 0x000f_ffff_ffff_fff0,
        })
    } else {
        None
    };
    let out = if s1 {
        if (w[0] >> 4) & 3 != 0 || w[0] >> 59 != 0 {
            return Err("C_BAD_STE");
        }
        let ctx = w[0] & 0x000f_ffff_ffff_ffc0;
        let cd_pa = match &s2w {
            Some(c) => s2_walk(mem, c, ctx, false)?,
            None => ctx,
        };
        let cd: [u64; 8] = core::array::from_fn(|i| mem.read(cd_pa + 8 * i as u64));
        let c0 = cd[0];
        let valid = c0 & 1 << 31 != 0;
        let aa64 = c0 & 1 << 41 != 0;
        let abort = c0 & 1 << 46 != 0;
        let record = c0 & 1 << 45 != 0;
        let epd1 = c0 & 1 << 30 != 0;
        let epd0 = c0 & 1 << 14 != 0;
        let endi = c0 & 1 << 15 != 0;
        let httu = c0 & 3 << 42 != 0;
        let stall = c0 & 1 << 44 != 0;
        let tg0 = (c0 >> 6) & 3;
        let t0sz = c0 & 0x3f;
        if !valid || !aa64 || !abort || !record || !epd1 || epd0 || endi || httu || stall {
            return Err("C_BAD_CD");
        }
        if tg0 != 0 || !(16..=39).contains(&t0sz) {
            return Err("C_BAD_CD");
        }
        let ips = pa_bits((c0 >> 32) & 7).min(44);
        let ttb = cd[1] & 0x000f_ffff_ffff_fff0;
        s1_walk(mem, ttb, t0sz, ips, iova, write, s2w.as_ref())?
    } else {
        iova
    };
    match &s2w {
        Some(c) => s2_walk(mem, c, out, write).map(Outcome::To),
        None => Ok(Outcome::To(out)),
    }
}

/// A 4 KiB-granule walk: (start level, index bits of the start level).
fn start_of(ias: u64) -> (u64, u64) {
    let levels = (ias - 12).div_ceil(9);
    (4 - levels, ias - 12 - 9 * (levels - 1))
}

fn s1_walk(
    mem: &FakeMem,
    ttb: u64,
    t0sz: u64,
    ips: u64,
    va: u64,
    write: bool,
    s2: Option<&S2Walk>,
) -> Result<u64, &'static str> {
    let ias = 64 - t0sz;
    if va >> ias != 0 {
        return Err("F_TRANSLATION S1");
    }
    let (start, root_bits) = start_of(ias);
    let mut table = ttb;
    for level in start..=3 {
        let shift = 12 + 9 * (3 - level);
        let bits = if level == start { root_bits } else { 9 };
        let idx = (va >> shift) & ((1 << bits) - 1);
        let mut dpa = table + idx * 8;
        if let Some(c) = s2 {
            dpa = s2_walk(mem, c, dpa, false).map_err(|_| "F_TRANSLATION S2 (TT)")?;
        }
        let d = mem.try_read(dpa).ok_or("F_WALK_EABT")?;
        if d & 1 == 0 {
            return Err("F_TRANSLATION S1");
        }
        if level < 3 && d & 2 != 0 {
            table = d & 0x0000_ffff_ffff_f000;
            continue;
        }
        if level == 3 && d & 2 == 0 {
            return Err("F_TRANSLATION S1");
        }
        if d & 1 << 10 == 0 {
            return Err("F_ACCESS S1");
        }
        if write && d & 1 << 7 != 0 {
            return Err("F_PERMISSION S1");
        }
        let size = 1u64 << shift;
        let out = (d & 0x0000_ffff_ffff_f000 & !(size - 1)) | (va & (size - 1));
        if out >> ips != 0 {
            return Err("F_ADDR_SIZE S1");
        }
        return Ok(out);
    }
    unreachable!()
}

fn s2_walk(mem: &FakeMem, c: &S2Walk, ipa: u64, write: bool) -> Result<u64, &'static str> {
    let ias = 64 - c.t0sz;
    if ipa >> ias != 0 {
        return Err("F_TRANSLATION S2");
    }
    let start = 2 - c.sl0;
    // The initial lookup resolves every bit above the lower levels: up to 16 concatenated
    // tables (4 extra bits).
    let root_bits = ias - (12 + 9 * (3 - start));
    if root_bits > 13 || root_bits == 0 {
        return Err("C_BAD_STE");
    }
    let mut table = c.ttb;
    for level in start..=3 {
        let shift = 12 + 9 * (3 - level);
        let bits = if level == start { root_bits } else { 9 };
        let idx = (ipa >> shift) & ((1 << bits) - 1);
        let d = mem.try_read(table + idx * 8).ok_or("F_WALK_EABT")?;
        if d & 1 == 0 {
            return Err("F_TRANSLATION S2");
        }
        if level < 3 && d & 2 != 0 {
            table = d & 0x0000_ffff_ffff_f000;
            continue;
        }
        if level == 3 && d & 2 == 0 {
            return Err("F_TRANSLATION S2");
        }
        if d & 1 << 10 == 0 {
            return Err("F_ACCESS S2");
        }
        let (r, w) = (d & 1 << 6 != 0, d & 1 << 7 != 0);
        if (write && !w) || (!write && !r) {
            return Err("F_PERMISSION S2");
        }
        let size = 1u64 << shift;
        let out = (d & 0x0000_ffff_ffff_f000 & !(size - 1)) | (ipa & (size - 1));
        if out >> c.ps_bits != 0 {
            return Err("F_ADDR_SIZE S2");
        }
        return Ok(out);
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------------
// Encodings
// ---------------------------------------------------------------------------------------------

#[test]
fn ste_encodings_match_the_spec_layout() {
    assert_eq!(Ste::abort().0, [0x1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(Ste::INVALID.0, [0; 8]);
    // V | Config 0b100; SHCFG (bits 109:108) = 01.
    assert_eq!(
        Ste::bypass().0,
        [0x9, 0x0000_1000_0000_0000, 0, 0, 0, 0, 0, 0]
    );
    // V | Config 0b101 | S1ContextPtr; S1CIR = S1COR = 01, S1CSH = 11, SHCFG = 01.
    let s1 = Ste::s1(0x4000_1000, AccessAttrs::COHERENT);
    assert_eq!(s1.0, [0x4000_100b, 0x0000_1000_0000_00d4, 0, 0, 0, 0, 0, 0]);
    let s2f = S2Fields {
        vmid: 5,
        ttb: 0x4000_8000,
        t0sz: 20,
        sl0: 2,
        ps: 4,
    };
    // word 2: VMID 5, T0SZ 20, SL0 2, IR0 = OR0 = 01, SH0 = 11, TG 0, PS 4, AA64, AFFD,
    // S2PTW, S2R.
    let s2 = Ste::s2(&s2f, AccessAttrs::COHERENT);
    assert_eq!(
        s2.0,
        [
            0xd,
            0x0000_1000_0000_0000,
            0x046c_3594_0000_0005,
            0x4000_8000,
            0,
            0,
            0,
            0
        ]
    );
    // Nested: both halves.
    let n = Ste::nested(0x4000_1000, &s2f, AccessAttrs::COHERENT);
    assert_eq!(
        n.0,
        [
            0x4000_100f,
            0x0000_1000_0000_00d4,
            0x046c_3594_0000_0005,
            0x4000_8000,
            0,
            0,
            0,
            0
        ]
    );
    // Non-coherent: non-cacheable, outer shareable fetches and walks.
    let nc = Ste::nested(0x4000_1000, &s2f, AccessAttrs::NON_CACHEABLE);
    assert_eq!(nc.0[1], 0x0000_1000_0000_0080);
    assert_eq!(nc.0[2] >> 40 & 0x3f, 0b10_00_00);

    assert_eq!(
        [s1.config(), s2.config(), n.config(), Ste::bypass().config()],
        [
            StreamConfig::S1,
            StreamConfig::S2,
            StreamConfig::Nested,
            StreamConfig::Bypass
        ]
    );
    assert_eq!(StreamConfig::decode(0b0110), StreamConfig::Reserved(3));
    assert_eq!(n.s2_vmid(), 5);
    assert_eq!(n.s2_ttb(), 0x4000_8000);
    assert_eq!(n.s1_context_ptr(), 0x4000_1000);
    // Level-1 descriptor: L2Ptr | Span = split + 1.
    assert_eq!(ste::l1_descriptor(0x4001_0000, 6), 0x4001_0007);
}

#[test]
fn cd_encoding_matches_the_spec_layout() {
    let f = CdFields {
        ttb0: 0x4000_2000,
        t0sz: 16,
        ips: 4,
        asid: 7,
        mair: 0x0044_ff04,
    };
    let cd = Cd::new(&f, AccessAttrs::COHERENT);
    // T0SZ 16, IR0 = OR0 = 01, SH0 = 11, EPD1, V, IPS 4, AFFD, AA64, R, A, ASET, ASID 7.
    assert_eq!(
        cd.0,
        [
            0x0007_e20c_c000_3510,
            0x4000_2000,
            0,
            0x0044_ff04,
            0,
            0,
            0,
            0
        ]
    );
    assert!(cd.valid());
    assert_eq!((cd.asid(), cd.t0sz(), cd.ttb0()), (7, 16, 0x4000_2000));
    let nc = Cd::new(&f, AccessAttrs::NON_CACHEABLE);
    assert_eq!(nc.0[0] & 0x3f00, 0x2000, "IR0 = OR0 = 0, SH0 = 10");
}

#[test]
fn command_encodings_match_the_spec_layout() {
    let cases: &[(Command, [u64; 2])] = &[
        (Command::prefetch_config(0x28), [0x0000_0028_0000_0001, 0]),
        (Command::cfgi_ste(0x28, false), [0x0000_0028_0000_0003, 0]),
        (Command::cfgi_ste(0x28, true), [0x0000_0028_0000_0003, 1]),
        (Command::cfgi_ste_range(0x40, 5), [0x0000_0040_0000_0004, 5]),
        (Command::cfgi_all(), [0x4, 31]),
        (Command::cfgi_cd(0x28, 3, true), [0x0000_0028_0000_3005, 1]),
        (Command::cfgi_cd_all(0x28), [0x0000_0028_0000_0006, 0]),
        (Command::tlbi_nh_all(9), [0x0000_0009_0000_0010, 0]),
        (Command::tlbi_nh_asid(3, 7), [0x0007_0003_0000_0011, 0]),
        (
            Command::tlbi_nh_va(
                3,
                7,
                0x1234_5000,
                true,
                TlbiRange {
                    tg: 1,
                    scale: 2,
                    num: 5,
                    ttl: 3,
                },
            ),
            [0x0007_0003_0020_5012, 0x1234_5701],
        ),
        (
            Command::tlbi_nh_va(0, 1, 0xffff_8000_0000_1000, false, TlbiRange::NONE),
            [0x0001_0000_0000_0012, 0xffff_8000_0000_1000],
        ),
        (
            Command::tlbi_nh_vaa(2, 0x5000, true, TlbiRange::NONE),
            [0x0000_0002_0000_0013, 0x5001],
        ),
        (Command::tlbi_el2_all(), [0x20, 0]),
        (Command::tlbi_el2_asid(4), [0x0004_0000_0000_0021, 0]),
        (
            Command::tlbi_el2_va(4, 0x7000, true, TlbiRange::NONE),
            [0x0004_0000_0000_0022, 0x7001],
        ),
        (Command::tlbi_s12_vmall(9), [0x0000_0009_0000_0028, 0]),
        (
            Command::tlbi_s2_ipa(
                9,
                0xfff0_0123_4567_8000,
                false,
                TlbiRange {
                    tg: 1,
                    scale: 0,
                    num: 31,
                    ttl: 0,
                },
            ),
            [0x0000_0009_0001_f02a, 0x0000_0123_4567_8400],
        ),
        (Command::tlbi_nsnh_all(), [0x30, 0]),
        (Command::sync(), [0x46, 0]),
        (Command::sync_with(SyncSignal::Irq), [0x1046, 0]),
        (Command::sync_with(SyncSignal::Sev), [0x2046, 0]),
    ];
    for (cmd, words) in cases {
        assert_eq!(cmd.0, *words, "{cmd:?}");
    }
    let c = Command::tlbi_nh_va(
        3,
        7,
        0x1234_5000,
        true,
        TlbiRange {
            tg: 1,
            scale: 2,
            num: 5,
            ttl: 3,
        },
    );
    assert_eq!(
        (c.vmid(), c.asid(), c.addr(), c.leaf()),
        (3, 7, 0x1234_5000, true)
    );
    assert_eq!(c.range().bytes(), 6 * 4 * 4096);
    assert_eq!(
        format!("{:?}", Command::sync()),
        "CMD_SYNC(0x0000000000000046, 0x0000000000000000)"
    );
}

#[test]
fn range_invalidation_covers_with_one_command() {
    // One page.
    let (a, r) = TlbiRange::covering(0x10_0000, 0x10_1000, 12);
    assert_eq!((a, r.tg, r.scale, r.num, r.ttl), (0x10_0000, 1, 0, 0, 0));
    // 2 MiB: 512 pages = 32 × 2^4.
    let (a, r) = TlbiRange::covering(0x20_0000, 0x40_0000, 12);
    assert_eq!((a, r.scale, r.num), (0x20_0000, 4, 31));
    assert_eq!(r.bytes(), M2);
    // 33 pages from an unaligned start: 17 × 2^1 = 34 pages.
    let (a, r) = TlbiRange::covering(0x1800, 0x1800 + 33 * K4, 12);
    assert_eq!((a, r.scale, r.num), (0x1000, 1, 16));
    // Exhaustive: always covers, never more than 1/16 (plus a page) too much.
    for pages in 1..3000u64 {
        let (a, r) = TlbiRange::covering(0x4000_0000, 0x4000_0000 + pages * K4, 12);
        assert_eq!(a, 0x4000_0000);
        let got = r.bytes() / K4;
        assert!(
            got >= pages && got <= pages + pages / 16 + 1,
            "{pages}: {got}"
        );
        assert!(r.num <= 31 && r.scale <= 31);
    }
    // The whole 48-bit space fits one command.
    let (_, r) = TlbiRange::covering(0, 1 << 48, 12);
    assert!(r.bytes() >= 1 << 48);
    assert_eq!(TlbiRange::covering(0, 0x1_0000, 16).1.tg, 3);
}

#[test]
fn event_records_decode_and_print() {
    // F_TRANSLATION, read, stage 1.
    let raw = [0x0000_0028_0000_0010, 1 << 35, 0x0def_0000, 0];
    let e = Event::decode(raw);
    assert_eq!(e.kind, EventType::Translation);
    assert_eq!((e.stream_id, e.substream_id), (0x28, None));
    assert_eq!((e.input_addr, e.read, e.stage2), (0xdef_0000, true, false));
    assert_eq!(
        e.to_string(),
        "F_TRANSLATION sid=0x28 addr=0xdef0000 read S1"
    );
    assert!(format!("{:?}", e.kind).contains("Translation"));

    // F_PERMISSION, write, stage 2, CLASS = IN, IPA in bits 51:12 of word 3; SSV with SSID 5.
    let raw = [
        0x0000_0008_0000_5813,
        1 << 39 | 2 << 40 | 1 << 33,
        0x20_0000,
        0xfff0_0000_0300_0abc,
    ];
    let e = Event::decode(raw);
    assert_eq!(e.kind, EventType::Permission);
    assert_eq!(e.substream_id, Some(5));
    assert_eq!(
        (e.ipa, e.stage2, e.read, e.privileged),
        (0x300_0000, true, false, true)
    );
    assert_eq!(e.class, FaultClass::Input);
    assert_eq!(
        e.to_string(),
        "F_PERMISSION sid=0x8 ssid=0x5 addr=0x200000 write priv S2 ipa=0x3000000"
    );
    assert!(format!("{:?}", e.kind).contains("Permission"));

    // A stage-2 fault on the CD fetch of a nested stream.
    let e = Event::decode([
        0x0000_0001_0000_0010,
        1 << 39 | 1 << 35,
        0x1000,
        0x4000_1000,
    ]);
    assert_eq!(e.class, FaultClass::Cd);
    assert_eq!(
        e.to_string(),
        "F_TRANSLATION sid=0x1 addr=0x1000 read S2 class=CD ipa=0x40001000"
    );

    // Configuration errors carry no address.
    let e = Event::decode([0x0000_0010_0000_0004, 0, 0, 0]);
    assert_eq!(e.to_string(), "C_BAD_STE sid=0x10");
    let e = Event::decode([0x0000_0010_0000_000a, 0, 0, 0]);
    assert_eq!(e.to_string(), "C_BAD_CD sid=0x10");
    let e = Event::decode([0x0000_0010_0000_0003, 0, 0, 0x4000_1238]);
    assert_eq!(e.to_string(), "F_STE_FETCH sid=0x10 fetch=0x40001238");
    let e = Event::decode([0x0000_0001_0000_007f, 2, 3, 4]);
    assert_eq!(e.kind, EventType::Other(0x7f));
    assert_eq!(
        e.to_string(),
        "EVENT(0x7f) sid=0x1 raw=[0x10000007f 0x2 0x3 0x4]"
    );

    // Every code round-trips; every name is distinct; garbage decodes without panicking.
    let mut names = BTreeSet::new();
    for code in 0..=255u8 {
        let k = EventType::decode(code);
        assert_eq!(k.code(), code);
        if !matches!(k, EventType::Other(_)) {
            assert!(names.insert(k.name()));
        }
    }
    assert_eq!(names.len(), 19);
    for seed in 0..1000u64 {
        let x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let _ = Event::decode([x, x.rotate_left(7), x ^ 0x55, !x]).to_string();
    }
}

// ---------------------------------------------------------------------------------------------
// STE update plans
// ---------------------------------------------------------------------------------------------

fn sample_stes() -> Vec<(&'static str, Ste)> {
    let a = S2Fields {
        vmid: 1,
        ttb: 0x4001_0000,
        t0sz: 20,
        sl0: 2,
        ps: 4,
    };
    let b = S2Fields {
        vmid: 2,
        ttb: 0x4002_0000,
        ..a
    };
    let c = AccessAttrs::COHERENT;
    vec![
        ("abort", Ste::abort()),
        ("bypass", Ste::bypass()),
        ("S1 A", Ste::s1(0x4003_0000, c)),
        ("S1 B", Ste::s1(0x4004_0000, c)),
        ("S2 A", Ste::s2(&a, c)),
        ("S2 B", Ste::s2(&b, c)),
        ("nested A/A", Ste::nested(0x4005_0000, &a, c)),
        ("nested B/A", Ste::nested(0x4006_0000, &a, c)),
        ("nested B/B", Ste::nested(0x4006_0000, &b, c)),
    ]
}

/// Checks that any entry the SMMU can assemble during the update is `old`, `new` or abort as
/// the SMMU interprets it: within each window between two syncs, a fetch may combine, word by
/// word, any value the word held in that window.
fn check_plan_windows(old: &Ste, new: &Ste, steps: &[Step]) -> Result<(), String> {
    let allowed = [old.meaning(), new.meaning(), Ste::abort().meaning()];
    let mut cur = *old;
    let mut window: [BTreeSet<u64>; STE_WORDS] =
        core::array::from_fn(|i| BTreeSet::from([cur.0[i]]));
    let check = |window: &[BTreeSet<u64>; STE_WORDS]| -> Result<(), String> {
        let choices: Vec<Vec<u64>> = window.iter().map(|s| s.iter().copied().collect()).collect();
        let total: usize = choices.iter().map(|c| c.len()).product();
        for mut k in 0..total {
            let mut e = Ste([0; STE_WORDS]);
            for (i, c) in choices.iter().enumerate() {
                e.0[i] = c[k % c.len()];
                k /= c.len();
            }
            if !e.valid() || !allowed.contains(&e.meaning()) {
                return Err(format!("torn entry {e:?}"));
            }
        }
        Ok(())
    };
    for s in steps {
        match *s {
            Step::Write { word, value } => {
                cur.0[word] = value;
                window[word].insert(value);
            }
            Step::Sync => {
                check(&window)?;
                window = core::array::from_fn(|i| BTreeSet::from([cur.0[i]]));
            }
        }
    }
    check(&window)?;
    if cur != *new {
        return Err(format!("ends at {cur:?}"));
    }
    if !matches!(steps.last(), None | Some(Step::Sync)) {
        return Err("does not end with a sync".into());
    }
    Ok(())
}

#[test]
fn every_planned_transition_is_consistent_at_every_instant() {
    let stes = sample_stes();
    let mut breaks = Vec::new();
    for (na, a) in &stes {
        for (nb, b) in &stes {
            let plan = plan_update(a, b);
            check_plan_windows(a, b, plan.steps()).unwrap_or_else(|e| panic!("{na} → {nb}: {e}"));
            if plan.breaks {
                breaks.push(format!("{na} → {nb}"));
            }
            if a == b {
                assert!(plan.steps().is_empty());
            }
        }
    }
    // Exactly the transitions where two used words must change at once go through abort:
    // VMID (word 2) with either S2TTB (word 3) or the Config (word 0).
    let expected = [
        "S1 A → S2 A",
        "S1 A → S2 B",
        "S1 A → nested A/A",
        "S1 A → nested B/A",
        "S1 A → nested B/B",
        "S1 B → S2 A",
        "S1 B → S2 B",
        "S1 B → nested A/A",
        "S1 B → nested B/A",
        "S1 B → nested B/B",
        "S2 A → S1 A",
        "S2 A → S1 B",
        "S2 A → S2 B",
        "S2 A → nested B/B",
        "S2 B → S1 A",
        "S2 B → S1 B",
        "S2 B → S2 A",
        "S2 B → nested A/A",
        "S2 B → nested B/A",
        "nested A/A → S1 A",
        "nested A/A → S1 B",
        "nested A/A → S2 B",
        "nested A/A → nested B/B",
        "nested B/A → S1 A",
        "nested B/A → S1 B",
        "nested B/A → S2 B",
        "nested B/A → nested B/B",
        "nested B/B → S1 A",
        "nested B/B → S1 B",
        "nested B/B → S2 A",
        "nested B/B → nested A/A",
        "nested B/B → nested B/A",
    ];
    assert_eq!(breaks, expected);
}

#[test]
fn hitless_transitions_are_one_store_plus_prepare_and_cleanup() {
    let s = sample_stes();
    let get = |n: &str| s.iter().find(|(m, _)| *m == n).unwrap().1;
    let writes = |a: &str, b: &str| -> Vec<usize> {
        plan_update(&get(a), &get(b))
            .steps()
            .iter()
            .filter_map(|s| match s {
                Step::Write { word, .. } => Some(*word),
                Step::Sync => None,
            })
            .collect()
    };
    // bypass → abort: word 0, then the now unused SHCFG in word 1.
    assert_eq!(writes("bypass", "abort"), [0, 1]);
    // abort → S2: words 1-3 while unused, then word 0.
    assert_eq!(writes("abort", "S2 A"), [1, 2, 3, 0]);
    // S1 → S1: only S1ContextPtr.
    assert_eq!(writes("S1 A", "S1 B"), [0]);
    // S2 → nested over the same parent: S1ContextPtr (word 0) and the stage-1 fields of word 1
    // while unused, then word 0 again for the Config.
    assert_eq!(writes("S2 A", "nested A/A"), [0, 1, 0]);
    // And back: word 0, then the stage-1 fields, unused now.
    assert_eq!(writes("nested A/A", "S2 A"), [0, 1]);
    // S2 → S1: through abort; word 0 twice.
    assert_eq!(writes("S2 A", "S1 A"), [0, 1, 2, 3, 0]);
}

// ---------------------------------------------------------------------------------------------
// Bring-up
// ---------------------------------------------------------------------------------------------

#[test]
fn bring_up_programs_registers_in_order_with_32bit_accesses() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let unit = SmmuUnit::new(&hw, &mem, cfg()).unwrap();
    let s = hw.hw();
    let w = &s.writes;
    let pos = |off: usize| w.iter().position(|x| x.0 == off).unwrap();
    // GBPA.ABORT (with UPDATE) is the very first write; SMMUEN the very last.
    assert_eq!(w[0], (offset::GBPA, 0x8010_1000));
    assert_eq!(s.gbpa, 0x0010_1000);
    assert_eq!(*w.last().unwrap(), (offset::CR0, 0xd));
    let cr0: Vec<u32> = w
        .iter()
        .filter(|x| x.0 == offset::CR0)
        .map(|x| x.1)
        .collect();
    assert_eq!(cr0, [0xc, 0xd], "queues, then SMMUEN; no disable needed");
    assert_eq!(s.cr1, 0xd75, "WB/WB/IS tables and queues");
    assert_eq!(s.cr2, 0x6, "RECINVSID | PTM");
    // 64-bit bases as two 32-bit halves, low first.
    let sb = pos(offset::STRTAB_BASE);
    assert_eq!(w[sb + 1].0, offset::STRTAB_BASE + 4);
    assert_eq!(s.strtab_base, unit.stream_table() | 1 << 62);
    // QEMU: SIDSIZE 16, 2-level, SPLIT 6.
    assert_eq!(s.strtab_base_cfg, 16 | 6 << 6 | 1 << 16);
    assert_eq!(unit.stream_table_layout(), Layout::TwoLevel { split: 6 });
    assert_eq!(s.cmdq_base & 0x1f, 8);
    assert_eq!(s.eventq_base & 0x1f, 7);
    let cb = pos(offset::CMDQ_BASE);
    assert_eq!(w[cb + 1].0, offset::CMDQ_BASE + 4);
    assert!(pos(offset::CMDQ_BASE) < pos(offset::CR0));
    assert!(pos(offset::EVENTQ_BASE) < pos(offset::CR0));
    // The base registers are programmed before the queues are enabled, the invalidation is
    // issued before SMMUEN.
    assert_eq!(
        opcodes(&s.commands),
        [op::CFGI_STE_RANGE, op::TLBI_NSNH_ALL, op::SYNC]
    );
    assert_eq!(s.commands[0], Command::cfgi_all());
    assert_eq!(s.cmdq_cons & 0x1ff, 3);
    assert_eq!(s.irq_ctrl, 0);
    drop(s);
    let c = unit.counters();
    assert_eq!((c.commands, c.syncs, c.cfgi, c.tlbi_all), (3, 1, 1, 1));
    assert_eq!(unit.stream_id_bits(), 16);
    assert!(unit.coherent());
    assert_eq!(unit.regs().idr0.0, QEMU_IDR0);
}

#[test]
fn bring_up_disables_a_running_smmu_first_and_issues_el2_invalidation_with_hyp() {
    let mem = new_mem();
    let hw = FakeSmmu::new(
        &mem,
        [QEMU_IDR0 | IDR0_HYP, QEMU_IDR1, 0, QEMU_IDR3, 0, 0x74],
    );
    {
        let mut s = hw.hw();
        s.cr0 = 0xd;
        s.cr0ack = 0xd;
        s.irq_ctrl = 5;
        s.gerror = Gerror::SFM_ERR.bits();
    }
    let unit = SmmuUnit::new(
        &hw,
        &mem,
        UnitConfig {
            irqs: true,
            ..cfg()
        },
    )
    .unwrap();
    let s = hw.hw();
    let writes: Vec<(usize, u32)> = s.writes.iter().copied().take(4).collect();
    assert_eq!(
        writes,
        [
            (offset::GBPA, 0x8010_1000),
            (offset::CR0, 0),
            (offset::IRQ_CTRL, 0),
            (offset::GERRORN, Gerror::SFM_ERR.bits())
        ]
    );
    assert_eq!(
        opcodes(&s.commands),
        [
            op::CFGI_STE_RANGE,
            op::TLBI_NSNH_ALL,
            op::TLBI_EL2_ALL,
            op::SYNC
        ]
    );
    assert_eq!(s.irq_ctrl, 5, "GERROR and EVENTQ interrupts");
    assert_eq!(s.cr0, 0xd);
    assert_eq!(unit.stream_id_bits(), 16);
}

#[test]
fn bring_up_rejects_unusable_smmus_and_times_out_on_a_dead_one() {
    let mem = new_mem();
    let bad = |idr0: u32, idr1: u32, idr5: u32| {
        let hw = FakeSmmu::new(&mem, [idr0, idr1, 0, QEMU_IDR3, 0, idr5]);
        SmmuUnit::new(&hw, &mem, cfg()).err().unwrap()
    };
    let aa32 = QEMU_IDR0 & !(3 << 2) | 1 << 2;
    assert!(matches!(
        bad(aa32, QEMU_IDR1, 0x74),
        SmmuError::Unsupported { .. }
    ));
    assert!(matches!(
        bad(QEMU_IDR0, QEMU_IDR1, 0x64),
        SmmuError::Unsupported { .. }
    ));
    let big_endian = QEMU_IDR0 | 3 << 21;
    assert!(matches!(
        bad(big_endian, QEMU_IDR1, 0x74),
        SmmuError::Unsupported { .. }
    ));
    assert!(matches!(
        bad(QEMU_IDR0, QEMU_IDR1 | 1 << 30, 0x74),
        SmmuError::Unsupported { .. }
    ));
    assert_eq!(
        bad(QEMU_IDR0 & !3, QEMU_IDR1, 0x74),
        SmmuError::StageUnsupported
    );

    let hw = FakeSmmu::qemu(&mem);
    hw.hw().cr0_latency = u32::MAX;
    assert_eq!(
        SmmuUnit::new(&hw, &mem, cfg()).err().unwrap(),
        SmmuError::Timeout { what: "CR0ACK" }
    );
    let hw = FakeSmmu::qemu(&mem);
    hw.hw().stall = true;
    assert_eq!(
        SmmuUnit::new(&hw, &mem, cfg()).err().unwrap(),
        SmmuError::Timeout { what: "CMD_SYNC" }
    );
    let m = FakeMem::new(1);
    let hw = FakeSmmu::qemu(&m);
    assert_eq!(
        SmmuUnit::new(&hw, &m, cfg()).err().unwrap(),
        SmmuError::NoMemory
    );
    assert_eq!(
        m.live_frames(),
        0,
        "a failed bring-up gives back what it took"
    );
}

#[test]
#[should_panic(expected = "64-bit read of a 32-bit register")]
fn the_fake_rejects_64bit_access_to_32bit_registers() {
    let mem = FakeMem::new(1);
    let hw = FakeSmmu::qemu(&mem);
    (&hw).read64(offset::IDR0);
}

#[test]
fn small_stream_tables_are_linear_and_all_abort() {
    for (idr1, bits, want) in [
        (QEMU_IDR1 & !0x3f | 5, None, 5),
        (QEMU_IDR1, Some(6), 6),
        (QEMU_IDR1, Some(8), 8),
    ] {
        let mem = new_mem();
        // The third case: no 2-level support (ST_LEVEL = 0) forces a linear table of 4 pages.
        let idr0 = if want == 8 {
            QEMU_IDR0 & !(3 << 27)
        } else {
            QEMU_IDR0
        };
        let hw = FakeSmmu::new(&mem, [idr0, idr1, 0, QEMU_IDR3, 0, 0x74]);
        let unit = up(
            &hw,
            &mem,
            UnitConfig {
                stream_id_bits: bits,
                ..cfg()
            },
        );
        assert_eq!(unit.stream_table_layout(), Layout::Linear);
        assert_eq!(hw.hw().strtab_base_cfg, want);
        for sid in 0..1u32 << want {
            assert_eq!(walk(&mem, &hw, sid, 0x1000, false), Ok(Outcome::Abort));
            assert_eq!(unit.ste(&mem, sid), Some(Ste::abort()));
        }
        assert_eq!(
            walk(&mem, &hw, 1 << want, 0x1000, false),
            Err("C_BAD_STREAMID")
        );
    }
}

#[test]
fn two_level_tables_are_allocated_on_first_use() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    // 2^16 StreamIDs, SPLIT 6: a level-1 table of 1024 descriptors (8 KiB), all invalid.
    let l1 = unit.stream_table();
    assert!((0..1024).all(|i| mem.read(l1 + i * 8) == 0));
    assert_eq!(walk(&mem, &hw, SID, 0, false), Err("C_BAD_STREAMID"));
    assert_eq!(unit.ste(&mem, SID), None);

    let allocs = mem.allocs.load(core::sync::atomic::Ordering::Relaxed);
    unit.set_bypass(&mem, SID).unwrap();
    let d = mem.read(l1);
    assert_eq!(d & 0x1f, 7, "Span = SPLIT + 1");
    let l2 = d & !0x3f;
    assert!(mem.is_live(l2));
    assert_eq!(walk(&mem, &hw, SID, 0x1234, false), Ok(Outcome::Bypass));
    // Every other StreamID of the group is abort, not invalid.
    for sid in (0..64).filter(|&s| s != SID) {
        assert_eq!(
            walk(&mem, &hw, sid, 0, false),
            Ok(Outcome::Abort),
            "{sid:#x}"
        );
    }
    assert_eq!(walk(&mem, &hw, 64, 0, false), Err("C_BAD_STREAMID"));
    // The same group again: no allocation. Another group: one page.
    unit.set_abort(&mem, SID + 1).unwrap();
    assert_eq!(
        mem.allocs.load(core::sync::atomic::Ordering::Relaxed),
        allocs + 1
    );
    unit.set_abort(&mem, 0xffff).unwrap();
    assert_eq!(
        mem.allocs.load(core::sync::atomic::Ordering::Relaxed),
        allocs + 2
    );
    assert_eq!(mem.read(l1 + 1023 * 8) & 0x1f, 7);
    assert_eq!(walk(&mem, &hw, 0xffff, 0, false), Ok(Outcome::Abort));
    // A fresh group that stays abort still drops a cached invalid level-1 descriptor.
    hw.take_commands();
    unit.set_abort(&mem, 0x100).unwrap();
    assert_eq!(
        hw.take_commands(),
        [Command::cfgi_ste(0x100, false), Command::sync()]
    );
    // Out of memory for a level-2 table: nothing changes.
    mem.fail_allocs
        .store(true, core::sync::atomic::Ordering::Relaxed);
    assert_eq!(unit.set_bypass(&mem, 0x200), Err(SmmuError::NoMemory));
    assert_eq!(walk(&mem, &hw, 0x200, 0, false), Err("C_BAD_STREAMID"));
}

#[test]
fn stream_ids_beyond_the_table_are_rejected() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(
        &hw,
        &mem,
        UnitConfig {
            stream_id_bits: Some(8),
            ..cfg()
        },
    );
    assert_eq!(unit.stream_id_bits(), 8);
    let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    for sid in [0x100, 0xffff, u32::MAX] {
        assert_eq!(
            unit.attach(&mem, sid, &d),
            Err(SmmuError::StreamIdOutOfRange)
        );
        assert_eq!(
            unit.set_bypass(&mem, sid),
            Err(SmmuError::StreamIdOutOfRange)
        );
        assert_eq!(
            unit.set_abort(&mem, sid),
            Err(SmmuError::StreamIdOutOfRange)
        );
        assert_eq!(unit.ste(&mem, sid), None);
    }
    assert!(hw.take_commands().is_empty());
    unit.attach(&mem, 0xff, &d).unwrap();
    // More bits than the SMMU has are capped.
    let mem2 = FakeMem::new(64);
    let hw2 = FakeSmmu::qemu(&mem2);
    let unit2 = up(
        &hw2,
        &mem2,
        UnitConfig {
            stream_id_bits: Some(40),
            ..cfg()
        },
    );
    assert_eq!(unit2.stream_id_bits(), 16);
}

// ---------------------------------------------------------------------------------------------
// Attach, translation
// ---------------------------------------------------------------------------------------------

#[test]
fn stage1_attach_translates_and_faults_per_the_reference_walker() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    assert_eq!(
        (d.stage(), d.input_bits(), d.output_bits()),
        (Stage::S1, 48, 44)
    );
    assert_eq!((d.asid(), d.vmid()), (Some(1), 0));
    unit.map(&mem, &d, 0x10_0000, BUF, K4, RW).unwrap();
    unit.map(&mem, &d, 0x20_0000, BUF + M2, M2, Prot::READ)
        .unwrap();
    unit.attach(&mem, SID, &d).unwrap();
    assert_eq!(
        hw.take_commands(),
        [
            Command::cfgi_ste(SID, false),
            Command::cfgi_cd_all(SID),
            Command::sync(),
            Command::cfgi_ste(SID, false),
            Command::cfgi_cd_all(SID),
            Command::sync(),
        ],
        "prepare, then flip: abort → S1 is hitless"
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x10_0123, true),
        Ok(Outcome::To(BUF + 0x123))
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x23_4567, false),
        Ok(Outcome::To(BUF + M2 + 0x3_4567))
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x23_4567, true),
        Err("F_PERMISSION S1")
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x40_0000, false),
        Err("F_TRANSLATION S1")
    );
    assert_eq!(
        walk(&mem, &hw, SID, 1 << 48, false),
        Err("F_TRANSLATION S1")
    );
    assert_eq!(unit.iova_to_phys(&mem, &d, 0x10_0123), Some(BUF + 0x123));
    // The CD is the domain's, with fault recording on.
    let cd = Cd(core::array::from_fn(|i| {
        mem.read(d.cd().unwrap() + 8 * i as u64)
    }));
    assert_eq!((cd.asid(), cd.t0sz(), cd.ttb0()), (1, 16, d.root()));
    assert!(cd.0[0] & 1 << 45 != 0);
    // Re-attaching the same domain changes nothing and issues nothing.
    unit.attach(&mem, SID, &d).unwrap();
    assert!(hw.take_commands().is_empty());
}

#[test]
fn stage2_attach_caps_the_input_size_and_translates() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let d = unit.create_domain(&mem, DomainConfig::stage2(48)).unwrap();
    // QEMU's OAS is 44: a 48-bit IPA space would be an illegal S2T0SZ.
    assert_eq!((d.stage(), d.input_bits(), d.levels()), (Stage::S2, 44, 4));
    assert_eq!((d.asid(), d.vmid(), d.cd()), (None, 1, None));
    unit.map(&mem, &d, 0x10_0000, BUF, K4, RW).unwrap();
    unit.map(&mem, &d, 0x20_0000, BUF + K4, K4, Prot::READ)
        .unwrap();
    unit.attach(&mem, SID, &d).unwrap();
    assert_eq!(
        hw.take_commands(),
        [
            Command::cfgi_ste(SID, false),
            Command::sync(),
            Command::cfgi_ste(SID, false),
            Command::sync()
        ]
    );
    let ste = unit.ste(&mem, SID).unwrap();
    assert_eq!(ste.config(), StreamConfig::S2);
    assert_eq!((ste.0[2] >> 32) & 0x3f, 20, "S2T0SZ");
    assert_eq!((ste.0[2] >> 38) & 3, 2, "S2SL0: start at level 0");
    assert_eq!((ste.0[2] >> 48) & 7, 4, "S2PS: 44 bits");
    assert_eq!(
        walk(&mem, &hw, SID, 0x10_0040, true),
        Ok(Outcome::To(BUF + 0x40))
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x20_0000, true),
        Err("F_PERMISSION S2")
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x30_0000, false),
        Err("F_TRANSLATION S2")
    );
    // Stage-2 tables with a concatenated root: 40 bits start at level 1 with 2 tables.
    let d40 = unit.create_domain(&mem, DomainConfig::stage2(40)).unwrap();
    unit.map(&mem, &d40, 0xff_ffff_f000, BUF, K4, RW).unwrap();
    unit.attach(&mem, SID + 1, &d40).unwrap();
    assert_eq!(
        walk(&mem, &hw, SID + 1, 0xff_ffff_f008, false),
        Ok(Outcome::To(BUF + 8))
    );
}

#[test]
fn nested_domains_translate_through_both_stages_and_their_window() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    const IPA: u64 = 0x0300_0000;
    let parent = unit.create_domain(&mem, DomainConfig::stage2(48)).unwrap();
    unit.map(&mem, &parent, IPA, BUF, K4, RW).unwrap();
    let n = unit.create_nested_domain(&mem, &parent, 48).unwrap();
    assert_eq!(
        (n.stage(), n.vmid(), n.asid()),
        (Stage::Nested, parent.vmid(), Some(1))
    );
    assert_eq!(n.output_bits(), 44);
    unit.map(&mem, &n, 0x10_0000, IPA, K4, RW).unwrap();
    unit.map(&mem, &n, 0x20_0000, IPA + 0x10_0000, K4, RW)
        .unwrap();
    unit.attach(&mem, SID, &n).unwrap();
    let ste = unit.ste(&mem, SID).unwrap();
    assert_eq!(ste.config(), StreamConfig::Nested);
    assert_eq!(ste.s2_vmid(), parent.vmid());
    // The walker fetches the CD and every stage-1 descriptor through stage 2.
    assert_eq!(
        walk(&mem, &hw, SID, 0x10_0010, true),
        Ok(Outcome::To(BUF + 0x10))
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x20_0000, true),
        Err("F_TRANSLATION S2")
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x30_0000, true),
        Err("F_TRANSLATION S1")
    );
    assert_eq!(
        unit.iova_to_phys(&mem, &n, 0x10_0010),
        Some(IPA + 0x10),
        "the IPA"
    );
    // The window is in the parent, read-only at IPA == PA: the CD page translates to itself.
    let cd = n.cd().unwrap();
    unit.attach(&mem, SID + 1, &parent).unwrap();
    assert_eq!(walk(&mem, &hw, SID + 1, cd, false), Ok(Outcome::To(cd)));
    assert_eq!(walk(&mem, &hw, SID + 1, cd, true), Err("F_PERMISSION S2"));
    assert_eq!(walk(&mem, &hw, SID + 1, IPA, true), Ok(Outcome::To(BUF)));
    // A second nested domain shares the window; both keep working.
    let n2 = unit.create_nested_domain(&mem, &parent, 39).unwrap();
    assert_eq!(n2.asid(), Some(2));
    unit.map(&mem, &n2, 0x7000, IPA, K4, Prot::READ).unwrap();
    unit.attach(&mem, SID + 2, &n2).unwrap();
    assert_eq!(
        walk(&mem, &hw, SID + 2, 0x7008, false),
        Ok(Outcome::To(BUF + 8))
    );
    assert_eq!(
        walk(&mem, &hw, SID + 2, 0x7008, true),
        Err("F_PERMISSION S1")
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x10_0010, true),
        Ok(Outcome::To(BUF + 0x10))
    );
    match &parent.kind {
        domain::Kind::S2 { window, .. } => {
            let w =
                domain::Window::unpack(window.load(core::sync::atomic::Ordering::Relaxed)).unwrap();
            assert_eq!(w.pages, 256);
            assert!(cd >= w.base && cd < w.base + w.bytes() as u64);
            assert!(w.used_pages(&mem) >= 5, "bitmap, two CDs, two roots");
        }
        _ => unreachable!(),
    }
}

#[test]
fn nested_window_collisions_and_exhaustion_are_errors() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(
        &hw,
        &mem,
        UnitConfig {
            nested_window_pages: 4,
            ..cfg()
        },
    );
    let parent = unit.create_domain(&mem, DomainConfig::stage2(40)).unwrap();
    // Windows come from the pool; occupy its whole IPA range in the parent.
    unit.map(&mem, &parent, POOL_BASE, POOL_BASE, 2048 * K4, Prot::READ)
        .unwrap();
    let live = mem.live_frames();
    match unit.create_nested_domain(&mem, &parent, 48) {
        Err(SmmuError::Map(MapError::Overlap { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(mem.live_frames(), live, "the window was given back");
    assert_eq!(
        unit.unmap(&mem, &parent, POOL_BASE, 2048 * K4),
        Ok(2048 * K4)
    );
    // A 4-page window: bitmap, CD, S1 root, and one more table: a map needing 3 tables fails.
    let n = unit.create_nested_domain(&mem, &parent, 48).unwrap();
    match unit.map(&mem, &n, 0x10_0000, 0, K4, RW) {
        Err(SmmuError::Map(MapError::NoMemory { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(unit.iova_to_phys(&mem, &n, 0x10_0000), None);
}

#[test]
fn bypass_and_abort_streams() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    unit.set_bypass(&mem, SID).unwrap();
    assert_eq!(walk(&mem, &hw, SID, 0x1234_5678, true), Ok(Outcome::Bypass));
    assert_eq!(unit.ste(&mem, SID), Some(Ste::bypass()));
    unit.set_abort(&mem, SID).unwrap();
    assert_eq!(walk(&mem, &hw, SID, 0x1234_5678, true), Ok(Outcome::Abort));
    assert_eq!(unit.ste(&mem, SID), Some(Ste::abort()));
}

/// Replays the recorded stores into `sid`'s STE against the recorded commands: every entry the
/// SMMU could assemble between two CFGI_STE+SYNC pairs is old, new or abort; the update ends
/// at `new`. Returns the number of changes of meaning (1 = hitless, 2 = through abort).
fn replay(items: &[Item], ste_pa: u64, sid: u32, old: &Ste, new: &Ste) -> usize {
    let mut steps = Vec::new();
    let mut cfgi_seen = false;
    let mut cur = *old;
    let mut flips = 0;
    for it in items {
        match *it {
            Item::Store { pa, value } if pa >= ste_pa && pa < ste_pa + 64 => {
                let word = ((pa - ste_pa) / 8) as usize;
                let before = cur.meaning();
                cur.0[word] = value;
                if cur.meaning() != before {
                    flips += 1;
                }
                steps.push(Step::Write { word, value });
            }
            Item::Command(c) if c.opcode() == op::CFGI_STE && c.sid() == sid && !c.leaf() => {
                cfgi_seen = true;
            }
            Item::Command(c) if c.opcode() == op::SYNC && cfgi_seen => {
                steps.push(Step::Sync);
                cfgi_seen = false;
            }
            _ => {}
        }
    }
    check_plan_windows(old, new, &steps).unwrap();
    flips
}

#[test]
fn live_ste_transitions_never_expose_a_torn_entry() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let s1a = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    let s1b = unit.create_domain(&mem, DomainConfig::stage1(39)).unwrap();
    let s2a = unit.create_domain(&mem, DomainConfig::stage2(40)).unwrap();
    let s2b = unit.create_domain(&mem, DomainConfig::stage2(44)).unwrap();
    let na = unit.create_nested_domain(&mem, &s2a, 48).unwrap();
    unit.set_abort(&mem, SID).unwrap();
    let ste_pa = (mem.read(unit.stream_table()) & !0x3f) + SID as u64 * 64;

    enum T<'d> {
        D(&'d Domain),
        Bypass,
        Abort,
    }
    let seq: Vec<(&str, T, usize)> = vec![
        ("abort → S2", T::D(&s2a), 1),
        ("S2 → S1", T::D(&s1a), 2),
        ("S1 → S1'", T::D(&s1b), 1),
        ("S1 → S2", T::D(&s2b), 2),
        ("S2 → S2'", T::D(&s2a), 2),
        ("S2 → nested over it", T::D(&na), 1),
        ("nested → its parent", T::D(&s2a), 1),
        ("S2 → bypass", T::Bypass, 1),
        ("bypass → S1", T::D(&s1a), 1),
        ("S1 → bypass", T::Bypass, 1),
        ("bypass → abort", T::Abort, 1),
        ("abort → nested", T::D(&na), 1),
        ("nested → abort", T::Abort, 1),
    ];
    for (name, target, want_flips) in seq {
        let old = unit.ste(&mem, SID).unwrap();
        let before = unit.counters();
        start_log(&mem);
        match target {
            T::D(d) => unit.attach(&mem, SID, d).unwrap(),
            T::Bypass => unit.set_bypass(&mem, SID).unwrap(),
            T::Abort => unit.set_abort(&mem, SID).unwrap(),
        }
        let log = take_log();
        let new = unit.ste(&mem, SID).unwrap();
        assert_ne!(old, new, "{name}");
        let flips = replay(&log, ste_pa, SID, &old, &new);
        assert_eq!(flips, want_flips, "{name}");
        let after = unit.counters();
        assert_eq!(after.ste_updates, before.ste_updates + 1);
        assert_eq!(
            after.ste_breaks - before.ste_breaks,
            (want_flips == 2) as u64,
            "{name}"
        );
    }
    // The walker agrees with the final state.
    assert_eq!(walk(&mem, &hw, SID, 0, false), Ok(Outcome::Abort));
}

// ---------------------------------------------------------------------------------------------
// Unmap and invalidation
// ---------------------------------------------------------------------------------------------

#[test]
fn unmap_issues_one_range_invalidation_and_one_sync() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let s1 = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    let asid = s1.asid().unwrap();
    // PA offset by a page: no contiguous-hint runs, so any page can be unmapped alone.
    unit.map(&mem, &s1, 0x10_0000, BUF + K4, 16 * K4, RW)
        .unwrap();
    unit.attach(&mem, SID, &s1).unwrap();
    hw.take_commands();
    assert_eq!(unit.unmap(&mem, &s1, 0x10_0000, 4 * K4), Ok(4 * K4));
    let r4 = TlbiRange {
        tg: 1,
        scale: 0,
        num: 3,
        ttl: 0,
    };
    assert_eq!(
        hw.take_commands(),
        [
            Command::tlbi_nh_va(0, asid, 0x10_0000, true, r4),
            Command::sync()
        ]
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x10_0000, false),
        Err("F_TRANSLATION S1")
    );
    assert_eq!(
        walk(&mem, &hw, SID, 0x10_4000, false),
        Ok(Outcome::To(BUF + K4 + 0x4000))
    );
    // Unmapping the whole 2 MiB unlinks the last-level table: Leaf = 0 (walk caches too).
    let before = mem.live_frames();
    assert_eq!(unit.unmap(&mem, &s1, 0, M2), Ok(12 * K4));
    let cmds = hw.take_commands();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0].opcode(), op::TLBI_NH_VA);
    assert!(!cmds[0].leaf());
    let (start, bytes) = (cmds[0].addr(), cmds[0].range().bytes());
    assert!(
        start <= 0x10_4000 && start + bytes >= 0x11_0000,
        "covers the gathered range"
    );
    assert_eq!(
        mem.live_frames(),
        before - 1,
        "the table page was retired after the sync"
    );
    // Nothing mapped: nothing to invalidate.
    assert_eq!(unit.unmap(&mem, &s1, 0x4000_0000, K4), Ok(0));
    assert!(hw.take_commands().is_empty());

    // Stage 2: CMD_TLBI_S2_IPA with the VMID.
    let s2 = unit.create_domain(&mem, DomainConfig::stage2(44)).unwrap();
    unit.map(&mem, &s2, 0x4000_0000, BUF, M2, RW).unwrap();
    hw.take_commands();
    assert_eq!(unit.unmap(&mem, &s2, 0x4000_0000, M2), Ok(M2));
    let cmds = hw.take_commands();
    assert_eq!(opcodes(&cmds), [op::TLBI_S2_IPA, op::SYNC]);
    assert_eq!((cmds[0].vmid(), cmds[0].addr()), (s2.vmid(), 0x4000_0000));
    assert_eq!(cmds[0].range().bytes(), M2);
    assert!(cmds[0].leaf(), "a 2 MiB block: no table unlinked");
    let c = unit.counters();
    assert_eq!(c.tlbi_range, 3);
}

#[test]
fn unmap_without_range_invalidation_steps_by_leaf_or_flushes_the_asid() {
    let mem = new_mem();
    let hw = FakeSmmu::new(
        &mem,
        [QEMU_IDR0, QEMU_IDR1, 0, QEMU_IDR3 & !IDR3_RIL, 0, 0x74],
    );
    let mut unit = up(&hw, &mem, cfg());
    let s1 = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    let asid = s1.asid().unwrap();
    unit.map(&mem, &s1, 0x10_0000, BUF + K4, 64 * K4, RW)
        .unwrap();
    unit.unmap(&mem, &s1, 0x10_0000, 3 * K4).unwrap();
    let want: Vec<Command> = (0..3)
        .map(|i| Command::tlbi_nh_va(0, asid, 0x10_0000 + i * K4, true, TlbiRange::NONE))
        .chain([Command::sync()])
        .collect();
    assert_eq!(hw.take_commands(), want);
    unit.unmap(&mem, &s1, 0x10_3000, 61 * K4).unwrap();
    assert_eq!(
        hw.take_commands(),
        [Command::tlbi_nh_asid(0, asid), Command::sync()]
    );
    // 2 MiB blocks step by 2 MiB.
    unit.map(&mem, &s1, 0x4000_0000, 0x4000_0000, 4 * M2, RW)
        .unwrap();
    unit.unmap(&mem, &s1, 0x4000_0000, 4 * M2).unwrap();
    let cmds = hw.take_commands();
    assert_eq!(cmds.len(), 5);
    assert_eq!(cmds[3].addr(), 0x4000_0000 + 3 * M2);
    // Stage 2 falls back to S12_VMALL.
    let s2 = unit.create_domain(&mem, DomainConfig::stage2(44)).unwrap();
    unit.map(&mem, &s2, 0, BUF, 40 * K4, RW).unwrap();
    unit.unmap(&mem, &s2, 0, 40 * K4).unwrap();
    assert_eq!(
        hw.take_commands(),
        [Command::tlbi_s12_vmall(s2.vmid()), Command::sync()]
    );
}

#[test]
fn nested_invalidation_uses_the_parent_vmid_and_parents_drop_combined_entries() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let parent = unit.create_domain(&mem, DomainConfig::stage2(44)).unwrap();
    let vmid = parent.vmid();
    unit.map(&mem, &parent, 0x300_0000, BUF, K4, RW).unwrap();
    // Before any nested domain: stage-2 range invalidation only.
    unit.map(&mem, &parent, 0x500_0000, BUF, K4, RW).unwrap();
    hw.take_commands();
    unit.unmap(&mem, &parent, 0x500_0000, K4).unwrap();
    assert_eq!(opcodes(&hw.take_commands()), [op::TLBI_S2_IPA, op::SYNC]);
    let n = unit.create_nested_domain(&mem, &parent, 48).unwrap();
    unit.map(&mem, &n, 0x1000, 0x300_0000, K4, RW).unwrap();
    hw.take_commands();
    unit.unmap(&mem, &n, 0x1000, K4).unwrap();
    let cmds = hw.take_commands();
    assert_eq!(opcodes(&cmds), [op::TLBI_NH_VA, op::SYNC]);
    assert_eq!((cmds[0].vmid(), cmds[0].asid()), (vmid, n.asid().unwrap()));
    unit.unmap(&mem, &parent, 0x300_0000, K4).unwrap();
    let cmds = hw.take_commands();
    assert_eq!(
        opcodes(&cmds),
        [op::TLBI_S2_IPA, op::SYNC, op::TLBI_NH_ALL, op::SYNC]
    );
    assert_eq!(cmds[2], Command::tlbi_nh_all(vmid));
}

/// Two ranges of a nested parent and one of its nested child in one round: every TLBI, then
/// the nested-parent step (CMD_SYNC, `CMD_TLBI_NH_ALL` of the parent's VMID) once, then the
/// closing CMD_SYNC. Before the flush nothing is issued.
#[test]
fn one_round_over_a_nested_parent_and_its_child() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let parent = unit.create_domain(&mem, DomainConfig::stage2(44)).unwrap();
    let vmid = parent.vmid();
    let n = unit.create_nested_domain(&mem, &parent, 48).unwrap();
    for iova in [0x300_0000, 0x500_0000] {
        unit.map(&mem, &parent, iova, BUF, K4, RW).unwrap();
    }
    unit.map(&mem, &n, 0x1000, 0x300_0000, K4, RW).unwrap();
    hw.take_commands();
    let mut g = [Gather::new(), Gather::new(), Gather::new()];
    let [g0, g1, g2] = &mut g;
    unit.unmap_deferred(&mem, &parent, 0x300_0000, K4, g0)
        .unwrap();
    unit.unmap_deferred(&mem, &parent, 0x500_0000, K4, g1)
        .unwrap();
    unit.unmap_deferred(&mem, &n, 0x1000, K4, g2).unwrap();
    assert!(
        hw.take_commands().is_empty(),
        "deferred: nothing issued yet"
    );
    unit.flush_batch(&mem, &mut [(&parent, g0), (&parent, g1), (&n, g2)])
        .unwrap();
    let cmds = hw.take_commands();
    assert_eq!(
        opcodes(&cmds),
        [
            op::TLBI_S2_IPA,
            op::TLBI_S2_IPA,
            op::TLBI_NH_VA,
            op::SYNC,
            op::TLBI_NH_ALL,
            op::SYNC
        ]
    );
    // VMID in bits 47:32 of every TLBI; IPA/VA in bits 115:76 (the second word's 51:12).
    assert!(
        cmds.iter()
            .filter(|c| c.opcode() != op::SYNC)
            .all(|c| (c.0[0] >> 32) as u16 == vmid)
    );
    assert_eq!(cmds[0].0[1] & 0x000f_ffff_ffff_f000, 0x300_0000);
    assert_eq!(cmds[1].0[1] & 0x000f_ffff_ffff_f000, 0x500_0000);
    assert_eq!(cmds[2].0[1] & !0xfff, 0x1000);
}

#[test]
fn map_rollback_is_invalidated_and_reported() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    unit.map(&mem, &d, 0x10_3000, BUF, K4, RW).unwrap();
    hw.take_commands();
    match unit.map(&mem, &d, 0x10_0000, BUF, 8 * K4, RW) {
        Err(SmmuError::Map(MapError::Overlap {
            iova: 0x10_3000,
            rolled_back,
        })) => assert_eq!((rolled_back.start, rolled_back.end), (0x10_0000, 0x10_3000)),
        other => panic!("{other:?}"),
    }
    let cmds = hw.take_commands();
    assert_eq!(opcodes(&cmds), [op::TLBI_NH_VA, op::SYNC]);
    assert_eq!(cmds[0].addr(), 0x10_0000);
    assert_eq!(
        unit.map(&mem, &d, 0x10_0800, BUF, K4, RW),
        Err(SmmuError::Map(MapError::Misaligned))
    );
    assert!(hw.take_commands().is_empty());
    assert_eq!(
        unit.unmap(&mem, &d, 0x10_0800, K4),
        Err(SmmuError::Unmap(crate::pgtable::UnmapError::Misaligned))
    );
}

// ---------------------------------------------------------------------------------------------
// Command queue
// ---------------------------------------------------------------------------------------------

#[test]
fn a_small_command_queue_wraps_and_takes_batches_larger_than_itself() {
    let mem = new_mem();
    let hw = FakeSmmu::new(
        &mem,
        [QEMU_IDR0, QEMU_IDR1, 0, QEMU_IDR3 & !IDR3_RIL, 0, 0x74],
    );
    let mut unit = up(
        &hw,
        &mem,
        UnitConfig {
            cmdq_log2: 2,
            ..cfg()
        },
    );
    assert_eq!(hw.hw().cmdq_base & 0x1f, 2);
    let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    let asid = d.asid().unwrap();
    let mut expect = Vec::new();
    for round in 0..10u64 {
        let iova = 0x100_0000 + round * 0x10_0000;
        unit.map(&mem, &d, iova, BUF, 17 * K4, RW).unwrap();
        hw.hw().prod_writes = 0;
        unit.unmap(&mem, &d, iova, 17 * K4).unwrap();
        // 17 commands + SYNC through 4 slots: PROD published at least 5 times.
        assert!(hw.hw().prod_writes >= 5);
        expect.extend(
            (0..17).map(|i| Command::tlbi_nh_va(0, asid, iova + i * K4, true, TlbiRange::NONE)),
        );
        expect.push(Command::sync());
    }
    assert_eq!(hw.take_commands(), expect);
    let s = hw.hw();
    assert_eq!(s.cmdq_cons & 7, s.cmdq_prod & 7, "drained");
}

#[test]
fn an_illegal_command_is_skipped_and_reported() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    unit.map(&mem, &d, 0x10_0000, BUF, K4, RW).unwrap();
    hw.hw().illegal.push(op::TLBI_NH_VA);
    let slot = hw.hw().cmdq_prod & 0xff;
    let r = unit.unmap(&mem, &d, 0x10_0000, K4);
    assert_eq!(
        r,
        Err(SmmuError::CommandError {
            kind: "CERROR_ILL",
            index: slot
        })
    );
    // The bad command was replaced by a CMD_SYNC, the error acknowledged, the queue drained.
    let base = hw.hw().cmdq_base & 0x000f_ffff_ffff_ffe0;
    assert_eq!(mem.read(base + slot as u64 * 16), 0x46);
    {
        let s = hw.hw();
        assert_eq!(s.gerror, s.gerrorn);
        assert_eq!(s.cmdq_cons & 0x1ff, s.cmdq_prod & 0x1ff);
        assert_eq!(
            s.cmdq_cons >> 24 & 0x7f,
            1,
            "ERR says CERROR_ILL (stale until next error)"
        );
    }
    assert_eq!(opcodes(&hw.take_commands()), [op::SYNC, op::SYNC]);
    assert_eq!(unit.counters().cmdq_errors, 1);
    // The page is unmapped all the same; the table pages were kept (invalidation failed).
    assert_eq!(unit.iova_to_phys(&mem, &d, 0x10_0000), None);
    hw.hw().illegal.clear();
    unit.map(&mem, &d, 0x10_0000, BUF, K4, RW).unwrap();
    assert_eq!(unit.unmap(&mem, &d, 0x10_0000, K4), Ok(K4));
    assert_eq!(opcodes(&hw.take_commands()), [op::TLBI_NH_VA, op::SYNC]);
    assert_eq!(
        SmmuError::CommandError {
            kind: "CERROR_ILL",
            index: 3
        }
        .to_string(),
        "command queue error CERROR_ILL at slot 3"
    );
}

#[test]
fn a_stuck_queue_times_out_and_recovers_later() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    hw.hw().stall = true;
    assert_eq!(
        unit.set_bypass(&mem, SID),
        Err(SmmuError::Timeout { what: "CMD_SYNC" })
    );
    hw.unstall();
    unit.set_bypass(&mem, SID).unwrap();
    assert_eq!(walk(&mem, &hw, SID, 0, false), Ok(Outcome::Bypass));
    // A queue stuck on an error nobody waits for is recovered by poll_events.
    hw.hw().illegal.push(op::CFGI_STE);
    hw.hw().stall = true;
    assert_eq!(
        unit.set_abort(&mem, SID),
        Err(SmmuError::Timeout { what: "CMD_SYNC" })
    );
    hw.hw().stall = false;
    // Let the fake run into the illegal command.
    let p = hw.hw().cmdq_prod;
    (&hw).write32(offset::CMDQ_PROD, p);
    assert!(gerr(&hw).contains(Gerror::CMDQ_ERR));
    let poll = unit.poll_events(&mut |_| {});
    assert_eq!(poll.global_errors, Gerror::CMDQ_ERR.bits());
    hw.hw().illegal.clear();
    assert!(gerr(&hw).is_empty());
    unit.set_abort(&mem, SID).unwrap();
}

#[test]
fn concurrent_unmaps_share_the_queue() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(
        &hw,
        &mem,
        UnitConfig {
            cmdq_log2: 3,
            poll_budget: 1_000_000,
            ..cfg()
        },
    );
    let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    let unit = &unit;
    let d = &d;
    let mem = &mem;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..50u64 {
                    let iova = (t << 30) + i * 0x10_0000;
                    unit.map(mem, d, iova, BUF, 4 * K4, RW).unwrap();
                    assert_eq!(unit.unmap(mem, d, iova, 4 * K4), Ok(4 * K4));
                }
            });
        }
    });
    let cmds = hw.take_commands();
    assert_eq!(cmds.len(), 400);
    // Each unmap's range command is immediately followed by its own SYNC.
    for pair in cmds.chunks(2) {
        assert_eq!(opcodes(pair), [op::TLBI_NH_VA, op::SYNC]);
    }
    assert_eq!(unit.counters().syncs, 201);
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

fn translation_fault(sid: u32, addr: u64, read: bool) -> [u64; 4] {
    [
        0x10 | (sid as u64) << 32,
        (read as u64) << 35 | 2 << 40,
        addr,
        0,
    ]
}

#[test]
fn events_are_drained_decoded_and_counted_per_stream() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    for i in 0..3 {
        assert!(hw.inject_event(translation_fault(SID, 0xdef_0000 + i * K4, true)));
    }
    assert!(hw.inject_event([0x0000_0030_0000_0004, 0, 0, 0]));
    let mut seen = Vec::new();
    let poll = unit.poll_events(&mut |e| seen.push(*e));
    assert_eq!(
        poll,
        EventPoll {
            recorded: 4,
            overflowed: false,
            global_errors: 0
        }
    );
    assert_eq!(
        seen[0].to_string(),
        "F_TRANSLATION sid=0x28 addr=0xdef0000 read S1"
    );
    assert_eq!(seen[3].kind, EventType::BadSte);
    assert_eq!((unit.event_count(SID), unit.event_count(0x30)), (3, 1));
    assert_eq!(unit.event_count(0x31), 0);
    assert_eq!(hw.hw().eventq_cons & 0xff, 4);
    // Nothing new: nothing reported, no register write.
    let writes = hw.hw().writes.len();
    assert_eq!(unit.poll_events(&mut |_| panic!()).recorded, 0);
    assert_eq!(hw.hw().writes.len(), writes);
    let c = unit.counters();
    assert_eq!((c.events, c.events_lost), (4, 0));
}

#[test]
fn event_queue_overflow_is_acknowledged_and_counted() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(
        &hw,
        &mem,
        UnitConfig {
            eventq_log2: 2,
            ..cfg()
        },
    );
    let written = (0..7)
        .filter(|&i| hw.inject_event(translation_fault(SID, i * K4, false)))
        .count();
    assert_eq!(written, 4);
    assert_ne!(hw.hw().eventq_prod & 1 << 31, 0, "OVFLG");
    let mut addrs = Vec::new();
    let poll = unit.poll_events(&mut |e| addrs.push(e.input_addr));
    assert_eq!((poll.recorded, poll.overflowed), (4, true));
    assert_eq!(addrs, [0, K4, 2 * K4, 3 * K4]);
    assert_eq!(unit.events_lost(), 1);
    assert_eq!(
        hw.hw().eventq_cons,
        1 << 31 | 4,
        "OVACKFLG = OVFLG, CONS wrapped"
    );
    // Wraps around the queue again without a new overflow.
    for round in 0..3 {
        for i in 0..3 {
            assert!(hw.inject_event(translation_fault(0x40 + round, i * K4, true)));
        }
        let poll = unit.poll_events(&mut |_| {});
        assert_eq!((poll.recorded, poll.overflowed), (3, false));
    }
    assert_eq!(unit.events_lost(), 1);
    assert_eq!(unit.event_count(0x42), 3);
    // A second overflow is a second loss.
    for i in 0..5 {
        hw.inject_event(translation_fault(SID, i * K4, false));
    }
    assert!(unit.poll_events(&mut |_| {}).overflowed);
    assert_eq!(unit.events_lost(), 2);
    assert_eq!(unit.event_count(SID), 8);
}

#[test]
fn hostile_event_queue_state_is_bounded() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(
        &hw,
        &mem,
        UnitConfig {
            eventq_log2: 3,
            ..cfg()
        },
    );
    // PROD claims a full lap ahead plus change: at most one queue's worth is read.
    hw.hw().eventq_prod = 0x7fff_ffff;
    let poll = unit.poll_events(&mut |_| {});
    assert_eq!(poll.recorded, 8);
    // Garbage records: decoded as whatever they are, counted under their StreamIDs; more
    // StreamIDs than counters go to `untracked`.
    let unit2_mem = FakeMem::new(64);
    let hw2 = FakeSmmu::qemu(&unit2_mem);
    let mut unit2 = up(&hw2, &unit2_mem, cfg());
    for sid in 0..100u32 {
        assert!(hw2.inject_event([0xff | (sid as u64) << 32, !0, !0, !0]));
    }
    assert_eq!(unit2.poll_events(&mut |_| {}).recorded, 100);
    assert_eq!(unit2.counters().events_untracked, 36);
    assert_eq!(unit2.event_count(63), 1);
    assert_eq!(unit2.event_count(64), 0);
}

#[test]
fn global_errors_are_reported_and_acknowledged() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    hw.raise_gerror((Gerror::MSI_GERROR_ABT_ERR | Gerror::SFM_ERR).bits());
    let poll = unit.poll_events(&mut |_| {});
    assert_eq!((poll.global_errors, poll.overflowed), (0x180, false));
    assert!(gerr(&hw).is_empty());
    assert_eq!(unit.counters().global_errors, 2);
    assert_eq!(unit.poll_events(&mut |_| {}).global_errors, 0);
    // An aborted event write (QEMU's report of a full queue) is a loss, like an overflow.
    hw.raise_gerror(Gerror::EVENTQ_ABT_ERR.bits());
    let poll = unit.poll_events(&mut |_| {});
    assert_eq!((poll.global_errors, poll.overflowed), (4, true));
    assert_eq!(unit.events_lost(), 1);
    // Toggled again (the second occurrence): active again.
    hw.raise_gerror(Gerror::EVENTQ_ABT_ERR.bits());
    assert_eq!(unit.poll_events(&mut |_| {}).global_errors, 4);
    let c = unit.counters();
    assert_eq!((c.global_errors, c.events_lost), (4, 2));
}

// ---------------------------------------------------------------------------------------------
// Coherency
// ---------------------------------------------------------------------------------------------

#[test]
fn a_non_coherent_smmu_gets_non_cacheable_attributes_and_cleaned_structures() {
    for (idr0, over) in [(QEMU_IDR0 & !IDR0_COHACC, None), (QEMU_IDR0, Some(false))] {
        let mem = new_mem();
        let hw = FakeSmmu::new(&mem, [idr0, QEMU_IDR1, 0, QEMU_IDR3, 0, 0x74]);
        let mut unit = up(
            &hw,
            &mem,
            UnitConfig {
                coherent: over,
                ..cfg()
            },
        );
        assert!(!unit.coherent());
        let cleans = mem.take_cleans();
        {
            let s = hw.hw();
            assert_eq!(s.cr1, 0x820, "NC/NC/OSH for tables and queues");
            assert_eq!(s.strtab_base >> 62, 0, "no read-allocate hint");
            let cq = s.cmdq_base & !0x1f & 0x000f_ffff_ffff_ffff;
            let eq = s.eventq_base & !0x1f & 0x000f_ffff_ffff_ffff;
            assert!(FakeMem::cleaned(&cleans, unit.stream_table(), 8192));
            assert!(FakeMem::cleaned(&cleans, cq, 4096));
            assert!(FakeMem::cleaned(&cleans, eq, 4096));
            // The bring-up commands were cleaned before PROD was written.
            assert!(FakeMem::cleaned(&cleans, cq, 3 * 16));
        }
        let d = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
        let cleans = mem.take_cleans();
        assert!(FakeMem::cleaned(&cleans, d.cd().unwrap(), 64), "CD");
        assert!(
            FakeMem::cleaned(&cleans, d.root(), 4096),
            "engine: table root"
        );
        let cd = Cd(core::array::from_fn(|i| {
            mem.read(d.cd().unwrap() + 8 * i as u64)
        }));
        assert_eq!(cd.0[0] & 0x3f00, 0x2000, "walks NC, outer shareable");

        unit.map(&mem, &d, 0x10_0000, BUF, K4, RW).unwrap();
        let cleans = mem.take_cleans();
        assert!(!cleans.is_empty(), "engine cleans new tables and entries");
        unit.attach(&mem, SID, &d).unwrap();
        let cleans = mem.take_cleans();
        let l1 = unit.stream_table();
        let l2 = mem.read(l1) & !0x3f;
        assert!(
            FakeMem::cleaned(&cleans, l2, 4096),
            "level-2 table before publishing"
        );
        assert!(FakeMem::cleaned(&cleans, l1, 8), "level-1 descriptor");
        let ste = l2 + SID as u64 * 64;
        assert_eq!(
            cleans.iter().filter(|c| **c == (ste, 64)).count(),
            2,
            "the STE before each sync"
        );
        let ste = unit.ste(&mem, SID).unwrap();
        assert_eq!(ste.0[1] & 0xff, 0x80, "CD fetch NC, outer shareable");
        assert_eq!(walk(&mem, &hw, SID, 0x10_0000, false), Ok(Outcome::To(BUF)));
    }
    // The reverse override: a non-COHACC SMMU that firmware says is coherent.
    let mem = new_mem();
    let hw = FakeSmmu::new(
        &mem,
        [QEMU_IDR0 & !IDR0_COHACC, QEMU_IDR1, 0, QEMU_IDR3, 0, 0x74],
    );
    let unit = up(
        &hw,
        &mem,
        UnitConfig {
            coherent: Some(true),
            ..cfg()
        },
    );
    assert!(unit.coherent());
    assert!(mem.take_cleans().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Domains
// ---------------------------------------------------------------------------------------------

#[test]
fn domains_are_destroyed_only_when_unused_and_give_everything_back() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let baseline = mem.live_frames();
    let s1 = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    unit.map(&mem, &s1, 0x10_0000, BUF, 4 * K4, RW).unwrap();
    unit.attach(&mem, SID, &s1).unwrap();
    let with_l2 = baseline + 1;
    let s1 = match unit.try_destroy_domain(&mem, s1) {
        Err((SmmuError::DomainBusy, d)) => d,
        other => panic!("{:?}", other.err()),
    };
    unit.set_abort(&mem, SID).unwrap();
    hw.take_commands();
    let asid = s1.asid().unwrap();
    unit.destroy_domain(&mem, s1).unwrap();
    assert_eq!(
        hw.take_commands(),
        [Command::tlbi_nh_asid(0, asid), Command::sync()]
    );
    assert_eq!(mem.live_frames(), with_l2, "tables and CD freed");
    // The ASID is reused.
    let again = unit.create_domain(&mem, DomainConfig::stage1(48)).unwrap();
    assert_eq!(again.asid(), Some(asid));

    // A parent with a nested child is busy even when nothing is attached.
    let parent = unit.create_domain(&mem, DomainConfig::stage2(44)).unwrap();
    let n = unit.create_nested_domain(&mem, &parent, 48).unwrap();
    unit.map(&mem, &n, 0x1000, 0x2000, K4, RW).unwrap();
    let parent = match unit.try_destroy_domain(&mem, parent) {
        Err((SmmuError::DomainBusy, d)) => d,
        other => panic!("{:?}", other.err()),
    };
    unit.attach(&mem, SID, &n).unwrap();
    let n = match unit.try_destroy_domain(&mem, n) {
        Err((SmmuError::DomainBusy, d)) => d,
        other => panic!("{:?}", other.err()),
    };
    unit.set_bypass(&mem, SID).unwrap();
    hw.take_commands();
    let (vmid, nasid) = (parent.vmid(), n.asid().unwrap());
    unit.destroy_domain(&mem, n).unwrap();
    assert_eq!(
        hw.take_commands(),
        [Command::tlbi_nh_asid(vmid, nasid), Command::sync()]
    );
    unit.destroy_domain(&mem, parent).unwrap();
    assert_eq!(
        hw.take_commands(),
        [Command::tlbi_s12_vmall(vmid), Command::sync()]
    );
    unit.destroy_domain(&mem, again).unwrap();
    assert_eq!(mem.live_frames(), with_l2, "window and tables freed");
    assert_eq!(
        SmmuError::DomainBusy.to_string(),
        "domain still attached or nested upon"
    );
}

#[test]
fn asids_and_vmids_run_out() {
    let mem = FakeMem::new(4096);
    let idr0 = QEMU_IDR0 & !(IDR0_ASID16 | IDR0_VMID16);
    let hw = FakeSmmu::new(&mem, [idr0, QEMU_IDR1, 0, QEMU_IDR3, 0, 0x74]);
    let mut unit = up(&hw, &mem, cfg());
    let mut s1 = Vec::new();
    for i in 1..=255u16 {
        let d = unit.create_domain(&mem, DomainConfig::stage1(39)).unwrap();
        assert_eq!(d.asid(), Some(i));
        s1.push(d);
    }
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::stage1(39)).err(),
        Some(SmmuError::AsidExhausted)
    );
    let parent = unit.create_domain(&mem, DomainConfig::stage2(40)).unwrap();
    assert_eq!(
        unit.create_nested_domain(&mem, &parent, 48).err(),
        Some(SmmuError::AsidExhausted)
    );
    unit.destroy_domain(&mem, s1.pop().unwrap()).unwrap();
    assert!(unit.create_nested_domain(&mem, &parent, 48).is_ok());
    let mut s2 = Vec::new();
    for _ in 2..=255u16 {
        s2.push(unit.create_domain(&mem, DomainConfig::stage2(32)).unwrap());
    }
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::stage2(32)).err(),
        Some(SmmuError::VmidExhausted)
    );
    // Failed creations leak nothing.
    let live = mem.live_frames();
    mem.fail_allocs
        .store(true, core::sync::atomic::Ordering::Relaxed);
    unit.destroy_domain(&mem, s2.pop().unwrap()).unwrap();
    let live_after_destroy = mem.live_frames();
    assert!(live_after_destroy < live);
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::stage2(32)).err(),
        Some(SmmuError::NoMemory)
    );
    assert_eq!(mem.live_frames(), live_after_destroy);
    mem.fail_allocs
        .store(false, core::sync::atomic::Ordering::Relaxed);
    assert!(unit.create_domain(&mem, DomainConfig::stage2(32)).is_ok());
}

#[test]
fn stage_support_and_input_sizes_are_checked() {
    let mem = new_mem();
    // S1 only (virt-9.1).
    let hw = FakeSmmu::new(&mem, [0x0d44_101a, QEMU_IDR1, 0, QEMU_IDR3, 0, 0x74]);
    let mut unit = up(&hw, &mem, cfg());
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::stage2(40)).err(),
        Some(SmmuError::StageUnsupported)
    );
    let s1 = unit.create_domain(&mem, DomainConfig::stage1(60)).unwrap();
    assert_eq!(s1.input_bits(), 48, "capped");
    assert_eq!(
        unit.create_nested_domain(&mem, &s1, 48).err(),
        Some(SmmuError::StageUnsupported)
    );
    assert_eq!(
        unit.create_domain(&mem, DomainConfig::stage1(20)).err(),
        Some(SmmuError::InputBitsUnsupported { requested: 20 })
    );
    assert_eq!(
        unit.create_domain(
            &mem,
            DomainConfig {
                stage: Stage::Nested,
                input_bits: 48
            }
        )
        .err(),
        Some(SmmuError::NestedNeedsParent)
    );
    // S2 only (sharing the memory, as two SMMUs of one machine do).
    let mem2 = &mem;
    let hw2 = FakeSmmu::new(mem2, [0x0d44_1019, QEMU_IDR1, 0, QEMU_IDR3, 0, 0x74]);
    let mut unit2 = up(&hw2, mem2, cfg());
    assert_eq!(
        unit2.create_domain(mem2, DomainConfig::stage1(48)).err(),
        Some(SmmuError::StageUnsupported)
    );
    // 25 bits would need a single level-3 lookup (SL0 = 3): not allowed.
    assert_eq!(
        unit2.create_domain(mem2, DomainConfig::stage2(25)).err(),
        Some(SmmuError::InputBitsUnsupported { requested: 25 })
    );
    let d = unit2.create_domain(mem2, DomainConfig::stage2(30)).unwrap();
    unit2.map(mem2, &d, 0x3fff_f000, BUF, K4, RW).unwrap();
    unit2.attach(mem2, 3, &d).unwrap();
    assert_eq!(
        walk(mem2, &hw2, 3, 0x3fff_f010, false),
        Ok(Outcome::To(BUF + 0x10))
    );
    // Foreign domains and a non-stage-2 parent.
    assert_eq!(unit2.attach(mem2, 3, &s1), Err(SmmuError::ForeignDomain));
    assert_eq!(
        unit2.map(mem2, &s1, 0, 0, K4, RW),
        Err(SmmuError::ForeignDomain)
    );
    assert_eq!(unit2.iova_to_phys(mem2, &s1, 0), None);
    let mem3 = new_mem();
    let hw3 = FakeSmmu::qemu(&mem3);
    let mut unit3 = up(&hw3, &mem3, cfg());
    let s1b = unit3
        .create_domain(&mem3, DomainConfig::stage1(48))
        .unwrap();
    assert_eq!(
        unit3.create_nested_domain(&mem3, &s1b, 48).err(),
        Some(SmmuError::ParentNotStage2)
    );
    let small = unit3
        .create_domain(&mem3, DomainConfig::stage2(30))
        .unwrap();
    assert_eq!(
        unit3.create_nested_domain(&mem3, &small, 48).err(),
        Some(SmmuError::InputBitsUnsupported { requested: 30 })
    );
}

#[test]
fn window_pages_are_claimed_and_released() {
    let mem = FakeMem::new(64);
    let w = domain::Window::create(&mem, 8).unwrap();
    assert_eq!(domain::Window::unpack(w.pack()), Some(w));
    assert_eq!(domain::Window::unpack(0), None);
    let pages: Vec<u64> = (0..7).map(|_| w.alloc_page(&mem).unwrap()).collect();
    assert_eq!(pages[0], w.base + K4);
    assert_eq!(w.alloc_page(&mem), None);
    assert_eq!(w.used_pages(&mem), 8);
    w.free_page(&mem, pages[3]);
    // A freed page comes back zeroed.
    mem.hw_write(pages[3], 0xdead);
    assert_eq!(w.alloc_page(&mem), Some(pages[3]));
    assert_eq!(mem.read(pages[3]), 0);
}

#[test]
fn error_messages() {
    let all = [
        SmmuError::Timeout { what: "CMD_SYNC" },
        SmmuError::StreamIdOutOfRange,
        SmmuError::StageUnsupported,
        SmmuError::InputBitsUnsupported { requested: 9 },
        SmmuError::NoMemory,
        SmmuError::AsidExhausted,
        SmmuError::VmidExhausted,
        SmmuError::ForeignDomain,
        SmmuError::NestedNeedsParent,
        SmmuError::ParentNotStage2,
        SmmuError::TooManyNestedParents,
        SmmuError::Unsupported { what: "x" },
        SmmuError::PageTable(crate::pgtable::ConfigError::Format),
        SmmuError::Map(MapError::Misaligned),
        SmmuError::Unmap(crate::pgtable::UnmapError::OutOfRange),
    ];
    let texts: BTreeSet<String> = all.iter().map(|e| e.to_string()).collect();
    assert_eq!(texts.len(), all.len());
    assert_eq!(all[0].to_string(), "timed out waiting for CMD_SYNC");
}

/// edu 01:01.0 behind a PCIe-to-PCI bridge 00:1e.0 (secondary bus 1), StreamID = RID as on
/// QEMU virt: own 0x0108, the bridge alias (01, 00.0) 0x0100 and the bridge's 0x00f0.
const EDU_BEHIND_BRIDGE: [u32; 3] = [0x0108, 0x0100, 0x00f0];

#[test]
fn every_alias_stream_translates_and_its_events_count_for_the_device() {
    let mem = new_mem();
    let hw = FakeSmmu::qemu(&mem);
    let mut unit = up(&hw, &mem, cfg());
    let d = unit.create_domain(&mem, DomainConfig::stage2(48)).unwrap();
    unit.map(&mem, &d, 0x10_0000, BUF, K4, RW).unwrap();
    unit.attach_streams(&mem, &EDU_BEHIND_BRIDGE, &d).unwrap();
    for sid in EDU_BEHIND_BRIDGE {
        assert_eq!(
            walk(&mem, &hw, sid, 0x10_0123, true),
            Ok(Outcome::To(BUF + 0x123)),
            "StreamID {sid:#x}"
        );
    }
    assert_eq!(walk(&mem, &hw, 0x0110, 0x10_0123, true), Ok(Outcome::Abort));
    assert!(hw.inject_event(translation_fault(0x0100, 0xdef_0000, true)));
    let mut seen = Vec::new();
    unit.poll_events(&mut |e| seen.push(e.stream_id));
    assert_eq!(seen, [0x0100]);
    assert_eq!(unit.owner_of(0x0100), 0x0108);
    assert_eq!(unit.event_count(0x0108), 1);
    assert_eq!(unit.event_count(0x0100), 1, "the alias's own counter too");

    // One StreamID beyond the table refuses the set before any STE changes.
    let bad = [0x0110, 1 << 20];
    assert_eq!(
        unit.attach_streams(&mem, &bad, &d),
        Err(SmmuError::StreamIdOutOfRange)
    );
    assert_eq!(walk(&mem, &hw, 0x0110, 0x10_0123, true), Ok(Outcome::Abort));

    unit.set_abort_streams(&mem, &EDU_BEHIND_BRIDGE).unwrap();
    for sid in EDU_BEHIND_BRIDGE {
        assert_eq!(walk(&mem, &hw, sid, 0x10_0123, true), Ok(Outcome::Abort));
    }
    assert_eq!(unit.owner_of(0x0100), 0x0108, "still the edu's alias");
    assert_eq!(unit.attach_streams(&mem, &[], &d), Ok(()));
}

//! The command encoders/decoders and register definitions that the fake SMMU (`fake.rs`)
//! imports from the driver (`cmdq`, `regs`), checked against values written by hand from the
//! SMMUv3 architecture (Arm IHI 0070): §4 for the command formats and opcodes, §6 for the
//! register map and the GERROR / queue pointer bits. The fake decodes the driver's commands
//! with these same functions (`Command::opcode`, `Command::range`), so a field both put in the
//! wrong place would pass every driver test; here each one meets a number read off the spec.
//! Every `use super::` item of `fake.rs` is covered: `Command` and its decoders, `op::*`,
//! `Gerror`, `QUEUE_OVERFLOW` and `offset::*`; the encoders whose output the driver tests
//! then read back through those decoders are pinned too.

use super::cmdq::{Command, SyncSignal, TlbiRange, op};
use super::regs::{Gerror, QUEUE_OVERFLOW, offset};

/// §4.1, the command opcode table (bits 7:0 of every command).
#[test]
fn opcodes() {
    let expected = [
        (op::PREFETCH_CONFIG, 0x01),
        (op::CFGI_STE, 0x03),
        (op::CFGI_STE_RANGE, 0x04),
        (op::CFGI_CD, 0x05),
        (op::CFGI_CD_ALL, 0x06),
        (op::TLBI_NH_ALL, 0x10),
        (op::TLBI_NH_ASID, 0x11),
        (op::TLBI_NH_VA, 0x12),
        (op::TLBI_NH_VAA, 0x13),
        (op::TLBI_EL2_ALL, 0x20),
        (op::TLBI_EL2_ASID, 0x21),
        (op::TLBI_EL2_VA, 0x22),
        (op::TLBI_EL2_VAA, 0x23),
        (op::TLBI_S12_VMALL, 0x28),
        (op::TLBI_S2_IPA, 0x2a),
        (op::TLBI_NSNH_ALL, 0x30),
        (op::SYNC, 0x46),
    ];
    for (driver, spec) in expected {
        assert_eq!(driver, spec, "opcode {spec:#04x}");
    }
}

/// Configuration invalidation and prefetch (§4.2.1, §4.3.1-§4.3.5): StreamID 63:32,
/// SubstreamID 31:12 (CFGI_CD), Leaf bit 64, Range 68:64 (CFGI_STE_RANGE).
#[test]
fn configuration_commands() {
    assert_eq!(
        Command::prefetch_config(9),
        Command([0x0000_0009_0000_0001, 0])
    );
    assert_eq!(
        Command::cfgi_ste(0x1234_5678, true),
        Command([0x1234_5678_0000_0003, 1])
    );
    assert_eq!(
        Command::cfgi_ste(0x10, false),
        Command([0x0000_0010_0000_0003, 0])
    );
    assert_eq!(
        Command::cfgi_ste_range(0x40, 4),
        Command([0x0000_0040_0000_0004, 4])
    );
    // CMD_CFGI_ALL is CFGI_STE_RANGE with Range 31 (§4.3.3).
    assert_eq!(Command::cfgi_all(), Command([0x04, 0x1f]));
    assert_eq!(
        Command::cfgi_cd(0x10, 0xa_bcde, false),
        Command([0x0000_0010_abcd_e005, 0])
    );
    assert_eq!(Command::cfgi_cd_all(7), Command([0x0000_0007_0000_0006, 0]));
}

/// TLB invalidation (§4.4): VMID 47:32, ASID 63:48, NUM 16:12, SCALE 24:20, Leaf 64,
/// TTL 73:72, TG 75:74, VA[63:12] in 127:76, IPA[51:12] in 115:76 (127:116 RES0).
#[test]
fn tlb_invalidation_commands() {
    assert_eq!(
        Command::tlbi_nh_all(0x55),
        Command([0x0000_0055_0000_0010, 0])
    );
    assert_eq!(
        Command::tlbi_nh_asid(0x55, 0x66),
        Command([0x0066_0055_0000_0011, 0])
    );
    let range = TlbiRange {
        tg: 1,
        scale: 3,
        num: 5,
        ttl: 2,
    };
    assert_eq!(
        Command::tlbi_nh_va(0xabcd, 0x1234, 0xffff_8000_1234_5678, true, range),
        Command([0x1234_abcd_0030_5012, 0xffff_8000_1234_5601])
    );
    assert_eq!(
        Command::tlbi_nh_vaa(1, 0x4000, false, TlbiRange::NONE),
        Command([0x0000_0001_0000_0013, 0x4000])
    );
    assert_eq!(Command::tlbi_el2_all(), Command([0x20, 0]));
    assert_eq!(
        Command::tlbi_el2_asid(0x77),
        Command([0x0077_0000_0000_0021, 0])
    );
    let range64k = TlbiRange {
        tg: 3,
        scale: 0,
        num: 31,
        ttl: 0,
    };
    assert_eq!(
        Command::tlbi_el2_va(2, 0x1000, true, range64k),
        Command([0x0002_0000_0001_f022, 0x1c01])
    );
    assert_eq!(
        Command::tlbi_s12_vmall(9),
        Command([0x0000_0009_0000_0028, 0])
    );
    // IPA bits above 51 are not part of the field.
    let range16k = TlbiRange {
        tg: 2,
        scale: 1,
        num: 2,
        ttl: 3,
    };
    assert_eq!(
        Command::tlbi_s2_ipa(3, 0xfff0_0123_4567_8000, true, range16k),
        Command([0x0000_0003_0010_202a, 0x0000_0123_4567_8b01])
    );
    assert_eq!(Command::tlbi_nsnh_all(), Command([0x30, 0]));
    // A range covers (NUM + 1) * 2^SCALE granules of TG (§4.4.1): 6 * 8 * 4 KiB.
    assert_eq!(range.bytes(), 0x3_0000);
    assert_eq!(range64k.bytes(), 32 * 0x1_0000);
}

/// CMD_SYNC (§4.7.3): CS 13:12 = SIG_NONE 0, SIG_IRQ 1, SIG_SEV 2.
#[test]
fn sync_command() {
    assert_eq!(Command::sync(), Command([0x46, 0]));
    assert_eq!(Command::sync_with(SyncSignal::Irq), Command([0x1046, 0]));
    assert_eq!(Command::sync_with(SyncSignal::Sev), Command([0x2046, 0]));
}

/// The decoders the fake and the driver tests read commands with, on hand-assembled words.
#[test]
fn command_decoders() {
    let va = Command([0x1234_abcd_0030_5012, 0xffff_8000_1234_5601]);
    assert_eq!(va.opcode(), 0x12);
    assert_eq!(va.vmid(), 0xabcd);
    assert_eq!(va.asid(), 0x1234);
    assert!(va.leaf());
    assert_eq!(va.addr(), 0xffff_8000_1234_5000);
    assert_eq!(
        va.range(),
        TlbiRange {
            tg: 1,
            scale: 3,
            num: 5,
            ttl: 2
        }
    );
    let ste = Command([0x1234_5678_0000_0003, 0]);
    assert_eq!(
        (ste.opcode(), ste.sid(), ste.leaf()),
        (0x03, 0x1234_5678, false)
    );
    // Not a range: every range field 0, whatever else the words hold.
    let plain = Command([0xffff_ffff_fe0e_0f12, 0xffff_ffff_ffff_f0ff]);
    assert_eq!(plain.range(), TlbiRange::NONE);
}

/// §6.2 register map (page 0 at offset 0, page 1 at 0x1_0000): the offsets the fake decodes.
#[test]
fn register_offsets() {
    let expected = [
        (offset::IIDR, 0x18),
        (offset::AIDR, 0x1c),
        (offset::CR0, 0x20),
        (offset::CR0ACK, 0x24),
        (offset::CR1, 0x28),
        (offset::CR2, 0x2c),
        (offset::STATUSR, 0x40),
        (offset::GBPA, 0x44),
        (offset::IRQ_CTRL, 0x50),
        (offset::IRQ_CTRLACK, 0x54),
        (offset::GERROR, 0x60),
        (offset::GERRORN, 0x64),
        (offset::GERROR_IRQ_CFG0, 0x68),
        (offset::STRTAB_BASE, 0x80),
        (offset::STRTAB_BASE_CFG, 0x88),
        (offset::CMDQ_BASE, 0x90),
        (offset::CMDQ_PROD, 0x98),
        (offset::CMDQ_CONS, 0x9c),
        (offset::EVENTQ_BASE, 0xa0),
        (offset::EVENTQ_PROD, 0x1_00a8),
        (offset::EVENTQ_CONS, 0x1_00ac),
        (offset::EVENTQ_IRQ_CFG0, 0xb0),
        (offset::PRIQ_BASE, 0xc0),
        (offset::PRIQ_IRQ_CFG0, 0xd0),
        (offset::GATOS_SID, 0x108),
        (offset::GATOS_ADDR, 0x110),
        (offset::GATOS_PAR, 0x118),
    ];
    for (driver, spec) in expected {
        assert_eq!(driver, spec, "register at {spec:#x}");
    }
}

/// SMMU_GERROR (§6.3.19): CMDQ_ERR bit 0, EVENTQ_ABT_ERR bit 2, ... SFM_ERR bit 8; an error is
/// active while its GERROR and GERRORN bits differ. Queue PROD registers: OVFLG bit 31.
#[test]
fn gerror_and_queue_overflow_bits() {
    assert_eq!(Gerror::CMDQ_ERR.bits(), 0x1);
    assert_eq!(Gerror::EVENTQ_ABT_ERR.bits(), 0x4);
    assert_eq!(Gerror::SFM_ERR.bits(), 0x100);
    // CMDQ_ERR toggled and acknowledged (both 1), EVENTQ_ABT_ERR toggled and not.
    assert_eq!(Gerror::active(0b101, 0b001), Gerror::EVENTQ_ABT_ERR);
    assert_eq!(Gerror::active(0b001, 0b000), Gerror::CMDQ_ERR);
    assert_eq!(Gerror::active(0b001, 0b001), Gerror::empty());
    assert_eq!(QUEUE_OVERFLOW, 0x8000_0000);
}

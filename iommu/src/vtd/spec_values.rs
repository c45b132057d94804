//! The register encoders and decoders that the fake unit (`fake.rs`) imports from the driver
//! (`regs`), checked against values written by hand from the VT-d 4.1 register descriptions
//! (§11.4). The fake interprets the driver's register writes through these same functions, so
//! a wrong bit position shared by both would pass every driver test; here each one meets a
//! number read off the spec instead. Every `use super::regs` item of `fake.rs` is covered:
//! `offset::*`, `Capability::{nfr, fro, mamv}`, `ExtCapability::{dt, smts, iva_offset,
//! iotlb_offset}`, the `GlobalCommand`/`GlobalStatus`/`FaultStatus` bits, `InvQueueAddress`,
//! `iq_pointer` and `iq_index`.

use super::regs::{
    Capability, ExtCapability, FaultStatus, GlobalCommand, GlobalStatus, InvQueueAddress, iq_index,
    iq_pointer, offset,
};

/// §11.4 "Register Address Map": the fixed offsets the fake decodes.
#[test]
fn register_offsets_match_the_address_map() {
    let expected = [
        (offset::VER, 0x00),
        (offset::CAP, 0x08),
        (offset::ECAP, 0x10),
        (offset::GCMD, 0x18),
        (offset::GSTS, 0x1c),
        (offset::RTADDR, 0x20),
        (offset::CCMD, 0x28),
        (offset::FSTS, 0x34),
        (offset::FECTL, 0x38),
        (offset::IQH, 0x80),
        (offset::IQT, 0x88),
        (offset::IQA, 0x90),
        (offset::ICS, 0x9c),
        (offset::IQERCD, 0xb0),
    ];
    for (driver, spec) in expected {
        assert_eq!(driver, spec, "register at {spec:#x}");
    }
}

/// §11.4.4 GCMD_REG: TE 31, SRTP 30, SFL 29, EAFL 28, WBF 27, QIE 26, IRE 25, SIRTP 24, CFI 23.
/// §11.4.5 GSTS_REG reports each in the same bit: TES 31, RTPS 30, FLS 29, AFLS 28, WBFS 27,
/// QIES 26, IRES 25, IRTPS 24, CFIS 23.
#[test]
fn global_command_and_status_bits() {
    assert_eq!(GlobalCommand::TE.bits(), 0x8000_0000);
    assert_eq!(GlobalCommand::SRTP.bits(), 0x4000_0000);
    assert_eq!(GlobalCommand::WBF.bits(), 0x0800_0000);
    assert_eq!(GlobalCommand::QIE.bits(), 0x0400_0000);
    assert_eq!(GlobalStatus::TES.bits(), 0x8000_0000);
    assert_eq!(GlobalStatus::RTPS.bits(), 0x4000_0000);
    assert_eq!(GlobalStatus::AFLS.bits(), 0x1000_0000);
    assert_eq!(GlobalStatus::WBFS.bits(), 0x0800_0000);
    assert_eq!(GlobalStatus::QIES.bits(), 0x0400_0000);
    assert_eq!(GlobalStatus::IRES.bits(), 0x0200_0000);
    assert_eq!(GlobalStatus::CFIS.bits(), 0x0080_0000);
    // The persistent enables (§11.4.4: software writes them back with every GCMD write) are
    // TE, EAFL, QIE, IRE and CFI; SRTP, SFL, WBF and SIRTP are one-shot commands.
    assert_eq!(GlobalCommand::PERSISTENT.bits(), 0x9680_0000);
    // Each command's status flag is the GSTS bit in the same position.
    assert_eq!(GlobalCommand::PERSISTENT.status_flag().bits(), 0x9680_0000);
    assert_eq!(GlobalCommand::QIE.status_flag(), GlobalStatus::QIES);
    assert_eq!(GlobalCommand::SRTP.status_flag(), GlobalStatus::RTPS);
}

/// §11.4.9 FSTS_REG: PFO 0 (RW1C), PPF 1 (RO: derived from the fault records' F bits), AFO 2,
/// APF 3, IQE 4, ICE 5, ITE 6 (all RW1C), FRI 15:8.
#[test]
fn fault_status_bits() {
    assert_eq!(FaultStatus::PFO.bits(), 0x01);
    assert_eq!(FaultStatus::PPF.bits(), 0x02);
    assert_eq!(FaultStatus::IQE.bits(), 0x10);
    assert_eq!(FaultStatus::ICE.bits(), 0x20);
    assert_eq!(FaultStatus::ITE.bits(), 0x40);
    // Writable-1-to-clear: everything but PPF and FRI.
    assert_eq!(FaultStatus::W1C.bits(), 0x7d);
    assert_eq!(FaultStatus::from_bits_retain(0x0000_2a02).fri(), 0x2a);
}

/// §11.4.2 CAP_REG: FRO 33:24 (offset of the first fault recording register in 16-byte
/// units), NFR 47:40 (number of fault recording registers minus one), MAMV 53:48.
#[test]
fn capability_fields_the_fake_reads() {
    // FRO field 0x22 (byte offset 0x220), NFR field 7 (8 registers), MAMV 0x12.
    let cap = Capability(0x0012_0700_2200_0000);
    assert_eq!(cap.fro(), 0x220);
    assert_eq!(cap.nfr(), 8);
    assert_eq!(cap.mamv(), 0x12);
    // Fault recording register n is 128 bits (§11.4.14): at FRO + 16 n.
    assert_eq!(cap.fault_record_offset(3), 0x250);
    // All-ones fields: 256 registers at 0x3ff0, MAMV 63.
    let max = Capability(0x003f_ff03_ff00_0000);
    assert_eq!((max.fro(), max.nfr(), max.mamv()), (0x3ff0, 256, 63));
    // Nothing of the neighbouring fields leaks in.
    let none = Capability(!0x003f_ff03_ff00_0000);
    assert_eq!((none.fro(), none.nfr(), none.mamv()), (0, 1, 0));
}

/// §11.4.3 ECAP_REG: DT bit 2, IRO 17:8 (IOTLB register block offset in 16-byte units),
/// SMTS bit 43. §11.4.8: IVA_REG at the block start, IOTLB_REG 8 bytes in.
#[test]
fn extended_capability_fields_the_fake_reads() {
    // IRO field 0x0f (block at 0xf0), DT, SMTS.
    let ecap = ExtCapability(0x0000_0800_0000_0f04);
    assert!(ecap.dt());
    assert!(ecap.smts());
    assert_eq!(ecap.iva_offset(), 0xf0);
    assert_eq!(ecap.iotlb_offset(), 0xf8);
    let other = ExtCapability(!0x0000_0800_0003_ff04);
    assert!(!other.dt());
    assert!(!other.smts());
    assert_eq!(other.iva_offset(), 0);
    // IRO all ones: 0x3ff0.
    assert_eq!(ExtCapability(0x3_ff00).iva_offset(), 0x3ff0);
}

/// §11.4.23 IQA_REG: IQA 63:12 (4 KiB-aligned base), DW bit 11 (256-bit descriptors), QS 2:0
/// (queue of 2^QS 4 KiB pages).
#[test]
fn invalidation_queue_address() {
    let wide = InvQueueAddress::decode(0x0000_0001_2345_6803);
    assert_eq!(wide.base, 0x1_2345_6000);
    assert!(wide.wide_descriptors);
    assert_eq!(wide.qs, 3);
    // 8 pages of 32-byte descriptors.
    assert_eq!((wide.bytes(), wide.entries()), (0x8000, 1024));
    let narrow = InvQueueAddress::decode(0x0000_0001_2345_6002);
    assert!(!narrow.wide_descriptors);
    // 4 pages of 16-byte descriptors.
    assert_eq!((narrow.bytes(), narrow.entries()), (0x4000, 1024));
    // Bits 10:3 are reserved and must not reach any field.
    let reserved = InvQueueAddress::decode(0x7f8);
    assert_eq!(
        (reserved.base, reserved.wide_descriptors, reserved.qs),
        (0, false, 0)
    );
    assert_eq!(narrow.encode(), 0x0000_0001_2345_6002);
}

/// §11.4.21 IQH_REG and §11.4.22 IQT_REG: the head/tail is a byte offset into the queue in
/// bits 18:4 for 128-bit descriptors; with DW = 1 (256-bit descriptors) bits 18:5, bit 4
/// reserved. So descriptor n is at 16 n or 32 n.
#[test]
fn queue_head_and_tail_pointers() {
    assert_eq!(iq_pointer(5, false), 0x50);
    assert_eq!(iq_pointer(5, true), 0xa0);
    assert_eq!(iq_pointer(0x7fff, false), 0x7fff0);
    assert_eq!(iq_pointer(0x3fff, true), 0x7ffe0);
    assert_eq!(iq_index(0x50, false), 5);
    assert_eq!(iq_index(0xa0, true), 5);
    // Bits 3:0 and 63:19 are reserved: ignored when read back.
    assert_eq!(iq_index(0xffff_ffff_fff8_005f, false), 5);
    assert_eq!(iq_index(0x7ffe0, true), 0x3fff);
}

//! Tables built from the specification layouts: QEMU `virt`, and synthetic topologies that use
//! every node type.

use super::builder::{
    Table, Target, its_group, map, named_component, pmcg, rmr, root_complex, single, smmu_v2,
    smmu_v3,
};
use super::{dump_string, qemu_virt_iort};
use crate::firmware::iort::{
    Iort, IortError, MsiResolution, NodeKind, NodeType, Resolution, SmmuKind, SmmuV2Model,
    Translation,
};

#[test]
fn qemu_virt_header_and_nodes() {
    let bytes = qemu_virt_iort();
    assert_eq!(bytes.len(), 48 + 24 + 88 + 56);
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(iort.revision(), 3);
    assert_eq!(&iort.header().oem_id, b"BOCHS ");
    assert_eq!(iort.node_count(), 3);
    assert_eq!(iort.trailing_bytes(), 0);
    let nodes: std::vec::Vec<_> = iort.nodes().collect();
    let summary: std::vec::Vec<_> = nodes
        .iter()
        .map(|n| {
            (
                n.offset(),
                n.node_type(),
                n.revision(),
                n.identifier(),
                n.length(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0x30, NodeType::ItsGroup, 1, Some(0), 24),
            (0x48, NodeType::SmmuV3, 4, Some(1), 88),
            (0xa0, NodeType::RootComplex, 3, Some(2), 56),
        ]
    );
    let NodeKind::ItsGroup(its) = nodes[0].kind() else {
        panic!()
    };
    assert_eq!(its.its_ids().collect::<std::vec::Vec<_>>(), [0]);
    let NodeKind::SmmuV3(s) = nodes[1].kind() else {
        panic!()
    };
    assert_eq!(s.base_address, 0x905_0000);
    assert!(s.cohacc_override());
    assert_eq!(s.httu_override(), 0);
    assert!(!s.proximity_domain_valid());
    assert_eq!(
        (s.event_gsiv, s.pri_gsiv, s.gerr_gsiv, s.sync_gsiv),
        (106, 107, 108, 109)
    );
    assert_eq!(s.proximity_domain, Some(0));
    assert_eq!(s.device_id_mapping_index, Some(0));
    // Every interrupt is a wired SPI, so the DeviceID index (0) does not name an MSI mapping.
    assert_eq!(s.msi_mapping_index(), None);
    let NodeKind::RootComplex(rc) = nodes[2].kind() else {
        panic!()
    };
    assert_eq!(rc.pci_segment, 0);
    assert!(rc.memory.fully_coherent());
    assert_eq!(rc.memory.access_flags, 3);
    assert_eq!(rc.memory_address_limit, Some(64));
    assert_eq!(rc.pasid_capabilities, Some(0));
    assert_eq!(rc.flags, None);
    let m = nodes[2].id_mappings().next().unwrap();
    assert_eq!(
        (
            m.input_base,
            m.input_last(),
            m.id_count(),
            m.output_reference
        ),
        (0, 0xffff, 0x10000, 0x48)
    );
}

#[test]
fn qemu_virt_resolves_rid_8_to_stream_8() {
    let bytes = qemu_virt_iort();
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(
        iort.resolve_rid(0, 0x0008),
        Ok(Resolution {
            smmu_offset: 0x48,
            kind: SmmuKind::V3,
            base_address: 0x905_0000,
            stream_id: 8
        })
    );
    // 00:01.0 and the last RID of the range.
    assert_eq!(iort.resolve_rid(0, 0x0008).unwrap().stream_id, 0x8);
    assert_eq!(iort.resolve_rid(0, 0xffff).unwrap().stream_id, 0xffff);
    assert_eq!(
        iort.resolve_rid(0, 0x1_0000),
        Err(IortError::NoMapping {
            node: 0xa0,
            id: 0x1_0000
        })
    );
    assert_eq!(
        iort.resolve_rid(1, 0),
        Err(IortError::NoRootComplex { segment: 1 })
    );
    let msi = iort.resolve_msi(0, 0x0008).unwrap();
    assert_eq!(msi.its_group_offset, 0x30);
    assert_eq!(msi.device_id, 8);
    assert_eq!(msi.smmu.unwrap().stream_id, 8);
    // From the SMMU itself, a StreamID goes on to the ITS.
    assert_eq!(
        iort.translate(0x48, 0x42),
        Ok(Translation {
            node_offset: 0x30,
            node_type: NodeType::ItsGroup,
            id: 0x42,
            hops: 1
        })
    );
    assert_eq!(
        iort.translate(0x49, 0),
        Err(IortError::NotANode { offset: 0x49 })
    );
}

#[test]
fn qemu_virt_dump_lists_every_field() {
    let bytes = qemu_virt_iort();
    let iort = Iort::parse(&bytes).unwrap();
    let text = dump_string(&iort);
    for line in [
        "       signature \"IORT\"",
        "       length 216 (0xd8)",
        "       revision 3",
        "       OEM ID \"BOCHS \"",
        "[024h] node count 3",
        "[028h] node array offset 0x30",
        "[030h] ITS group (type 0)",
        "       identifier 0x0",
        "       ITS identifier [0] 0",
        "[048h] SMMUv3 (type 4)",
        "       base address 0x9050000",
        "       flags 0x1 (COHACC override yes, HTTU override 0, proximity domain valid no, DeviceID valid no)",
        "       event GSIV 106",
        "       sync GSIV 109",
        "       DeviceID mapping index 0",
        "[08ch] ID mapping [0]: input 0x0..=0xffff (65536 IDs) -> output 0x0..=0xffff at 0x30 (ITS group), flags 0x0",
        "[0a0h] root complex (type 2)",
        "       identifier 0x2",
        "       cache coherent attribute 1 (fully coherent)",
        "       memory access flags 0x3 (CPM yes, DACS yes)",
        "       PCI segment 0",
        "       memory address size limit 64",
        "[0c4h] ID mapping [0]: input 0x0..=0xffff (65536 IDs) -> output 0x0..=0xffff at 0x48 (SMMUv3), flags 0x0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }
    assert_eq!(
        text,
        dump_string(&Iort::parse(&bytes).unwrap()),
        "dump is deterministic"
    );
}

/// Node indices of [`multi_smmu`].
const ITS: usize = 0;
const SMMU_A: usize = 1;
const SMMU_B: usize = 2;
const RC: usize = 3;
const NC: usize = 4;
const SMMU2: usize = 5;
const PMCG: usize = 6;
const RMR: usize = 7;
const NC_V2: usize = 8;
const UNKNOWN: usize = 9;
const RC_CHAIN: usize = 10;
const RC_BYPASS: usize = 11;

/// Two SMMUv3s splitting one root complex, an SMMUv2 with context interrupts, a named
/// component, a PMCG, an RMR, an unknown node passed through on the way to an SMMU, and a
/// root complex that bypasses the SMMUs.
fn multi_smmu() -> Table {
    let mut pm = pmcg(0x1_0002_0000, 0, Target::Node(SMMU_A), 0x1_0003_0000);
    pm.maps = std::vec![single(0x9_0000, ITS)];
    let mut unknown = super::builder::NodeSpec::new(0x7f, 0, std::vec![0xaa, 0xbb, 0xcc, 0xdd]);
    unknown.maps = std::vec![map(0x0, 0xff, 0x500, SMMU_B)];
    Table {
        revision: 7,
        nodes: std::vec![
            its_group(&[3, 7]).id(100),
            // MSI-only SMMUv3: no GSIVs, DeviceID valid, own DeviceID in mapping 1.
            smmu_v3(5, 0x4000_0000, 0x18, [0; 4], 2, 1)
                .maps(&[map(0, 0xffff, 0x1_0000, ITS), single(0x7_0000, ITS)])
                .id(101),
            smmu_v3(5, 0x5000_0000, 0x1, [200, 201, 202, 203], 0, 0)
                .maps(&[map(0, 0xffff, 0x2_0000, ITS)])
                .id(102),
            // Segment 1: buses 0..=0x7f behind SMMU A (StreamID = RID + 0x100), buses
            // 0x80..=0xff behind SMMU B (StreamID = RID - 0x8000).
            root_complex(4, 1, 0b111, 48, 0x14)
                .maps(&[
                    map(0, 0x7fff, 0x100, SMMU_A),
                    map(0x8000, 0x7fff, 0, SMMU_B)
                ])
                .id(103),
            named_component(0b1011, 44, "\\_SB_.DMA0", 20)
                .maps(&[map(0x10, 0x3, 0x40, SMMU_B)])
                .id(104),
            smmu_v2(
                0x6000_0000,
                0x10_0000,
                3,
                0b11,
                [60, 61],
                &[70, 71, 72],
                &[80]
            )
            .maps(&[map(0, 0x7fff, 0x3_0000, ITS)])
            .id(105),
            pm.id(106),
            rmr(
                0b1_0101,
                &[(0x8000_0000, 0x1_0000), (0x9000_0000, 0x20_0000)],
                &[map(0x42, 0, 0x42, SMMU_A)]
            )
            .id(107),
            named_component(0, 0, "\\_SB_.GPU0", 12)
                .maps(&[single(0x77, SMMU2)])
                .id(108),
            unknown.id(109),
            root_complex(1, 2, 0, 40, 0)
                .maps(&[map(0, 0xffff, 0, UNKNOWN)])
                .id(110),
            root_complex(0, 3, 0, 0, 0)
                .maps(&[map(0, 0xffff, 0x4_0000, ITS)])
                .id(111),
        ],
    }
}

#[test]
fn multi_smmu_nodes_decode() {
    let table = multi_smmu();
    let offs = table.offsets();
    let bytes = table.build();
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(iort.revision(), 7);
    assert_eq!(iort.nodes().count(), 12);
    let node = |i: usize| iort.node_at(offs[i]).unwrap();
    for i in 0..12 {
        assert_eq!(node(i).identifier(), Some(100 + i as u32));
    }

    let NodeKind::ItsGroup(its) = node(ITS).kind() else {
        panic!()
    };
    assert_eq!(its.its_count(), 2);
    assert_eq!(its.its_ids().collect::<std::vec::Vec<_>>(), [3, 7]);

    let NodeKind::SmmuV3(a) = node(SMMU_A).kind() else {
        panic!()
    };
    assert!(a.device_id_valid() && a.proximity_domain_valid());
    assert_eq!(a.valid_proximity_domain(), Some(2));
    assert_eq!(a.msi_mapping_index(), Some(1));
    assert_eq!(node(SMMU_A).own_id_mapping_index(), Some(1));

    let NodeKind::RootComplex(rc) = node(RC).kind() else {
        panic!()
    };
    assert_eq!(rc.pci_segment, 1);
    assert!(rc.ats_supported() && rc.pri_supported() && rc.pasid_forwarding());
    assert_eq!(rc.memory_address_limit, Some(48));
    assert_eq!(rc.max_pasid_width(), Some(0x14));
    assert_eq!(rc.flags, Some(0));
    let NodeKind::RootComplex(rc0) = node(RC_BYPASS).kind() else {
        panic!()
    };
    assert_eq!(
        (rc0.memory_address_limit, rc0.pasid_capabilities, rc0.flags),
        (None, None, None)
    );

    let NodeKind::NamedComponent(nc) = node(NC).kind() else {
        panic!()
    };
    assert_eq!(nc.name_str(), Some("\\_SB_.DMA0"));
    assert!(nc.stall_supported());
    assert_eq!(nc.substream_width(), 0b101);
    assert_eq!(nc.memory_address_limit, 44);

    let NodeKind::SmmuV1V2(s2) = node(SMMU2).kind() else {
        panic!()
    };
    assert_eq!(s2.model(), SmmuV2Model::Mmu500);
    assert_eq!((s2.base_address, s2.span), (0x6000_0000, 0x10_0000));
    assert!(s2.dvm_supported() && s2.coherent_walk());
    assert_eq!(
        (s2.global_interrupt.gsiv, s2.global_config_interrupt.gsiv),
        (60, 61)
    );
    assert!(!s2.global_interrupt.edge_triggered());
    let ctx: std::vec::Vec<_> = s2
        .context_interrupts()
        .map(|i| (i.gsiv, i.edge_triggered()))
        .collect();
    assert_eq!(ctx, [(70, true), (71, true), (72, true)]);
    assert_eq!(
        s2.pmu_interrupts()
            .map(|i| i.gsiv)
            .collect::<std::vec::Vec<_>>(),
        [80]
    );

    let NodeKind::Pmcg(p) = node(PMCG).kind() else {
        panic!()
    };
    assert_eq!(p.page0_base, 0x1_0002_0000);
    assert_eq!(p.page1_base, Some(0x1_0003_0000));
    assert_eq!(p.node_reference, offs[SMMU_A]);
    assert_eq!(p.overflow_gsiv, 0);

    let NodeKind::Rmr(r) = node(RMR).kind() else {
        panic!()
    };
    assert!(r.remapping_permitted());
    assert!(!r.access_privileged());
    assert_eq!(r.access_attributes(), 0b101);
    let ranges: std::vec::Vec<_> = r.memory_ranges().map(|m| (m.base, m.length)).collect();
    assert_eq!(ranges, [(0x8000_0000, 0x1_0000), (0x9000_0000, 0x20_0000)]);

    let NodeKind::Unknown { node_type, data } = node(UNKNOWN).kind() else {
        panic!()
    };
    assert_eq!(node_type, 0x7f);
    assert_eq!(&data[..4], &[0xaa, 0xbb, 0xcc, 0xdd]);
}

#[test]
fn multi_smmu_resolution() {
    let table = multi_smmu();
    let offs = table.offsets();
    let bytes = table.build();
    let iort = Iort::parse(&bytes).unwrap();
    let smmu_a = |sid| Resolution {
        smmu_offset: offs[SMMU_A],
        kind: SmmuKind::V3,
        base_address: 0x4000_0000,
        stream_id: sid,
    };
    let smmu_b = |sid| Resolution {
        smmu_offset: offs[SMMU_B],
        kind: SmmuKind::V3,
        base_address: 0x5000_0000,
        stream_id: sid,
    };
    // Bus 0 and bus 0x7f go to SMMU A, bus 0x80 and 0xff to SMMU B.
    assert_eq!(iort.resolve_rid(1, 0x0008), Ok(smmu_a(0x108)));
    assert_eq!(iort.resolve_rid(1, 0x7fff), Ok(smmu_a(0x80ff)));
    assert_eq!(iort.resolve_rid(1, 0x8000), Ok(smmu_b(0)));
    assert_eq!(iort.resolve_rid(1, 0xffff), Ok(smmu_b(0x7fff)));
    // MSIs continue through each SMMU's range mapping to the ITS group.
    assert_eq!(
        iort.resolve_msi(1, 0x0008),
        Ok(MsiResolution {
            its_group_offset: offs[ITS],
            device_id: 0x1_0108,
            smmu: Some(smmu_a(0x108))
        })
    );
    assert_eq!(iort.resolve_msi(1, 0x8001).unwrap().device_id, 0x2_0001);
    // The SMMUv3's own MSIs use its DeviceID mapping (index 1, single).
    assert_eq!(
        iort.node_msi(offs[SMMU_A]),
        Ok(MsiResolution {
            its_group_offset: offs[ITS],
            device_id: 0x7_0000,
            smmu: None
        })
    );
    // So do the PMCG's.
    assert_eq!(iort.node_msi(offs[PMCG]).unwrap().device_id, 0x9_0000);
    // Segment 2 passes through an unknown node before SMMU B: two hops.
    assert_eq!(iort.resolve_rid(2, 0x12), Ok(smmu_b(0x512)));
    assert_eq!(iort.translate(offs[RC_CHAIN], 0x12).unwrap().hops, 2);
    assert_eq!(
        iort.resolve_rid(2, 0x100),
        Err(IortError::NoMapping {
            node: offs[UNKNOWN],
            id: 0x100
        })
    );
    // Segment 3 goes straight to the ITS: no SMMU translates it, but MSIs work.
    assert_eq!(
        iort.resolve_rid(3, 5),
        Err(IortError::NotBehindSmmu {
            node: offs[ITS],
            node_type: NodeType::ItsGroup
        })
    );
    assert_eq!(
        iort.resolve_msi(3, 5),
        Ok(MsiResolution {
            its_group_offset: offs[ITS],
            device_id: 0x4_0005,
            smmu: None
        })
    );
    // Named components: a range mapping taken at its input base, and a single mapping.
    assert_eq!(
        iort.resolve_named_component("\\_SB_.DMA0"),
        Ok(smmu_b(0x40))
    );
    assert_eq!(
        iort.resolve_named_component("\\_SB_.GPU0"),
        Ok(Resolution {
            smmu_offset: offs[SMMU2],
            kind: SmmuKind::V1V2,
            base_address: 0x6000_0000,
            stream_id: 0x77
        })
    );
    assert_eq!(
        iort.resolve_named_component_msi("\\_SB_.GPU0")
            .unwrap()
            .device_id,
        0x3_0077
    );
    assert_eq!(
        iort.resolve_named_component("\\_SB_.NONE"),
        Err(IortError::NoNamedComponent)
    );
    assert_eq!(
        iort.named_component("\\_SB_.GPU0").map(|n| n.offset()),
        Some(offs[NC_V2])
    );
    // The other StreamIDs of DMA0: its range 0x10..=0x13 lands on 0x40..=0x43.
    assert_eq!(iort.translate(offs[NC], 0x13).unwrap().id, 0x43);
    // RMR StreamID 0x42 of SMMU A.
    assert_eq!(
        iort.translate(offs[RMR], 0x42).unwrap().node_offset,
        offs[SMMU_A]
    );
}

#[test]
fn multi_smmu_dump() {
    let table = multi_smmu();
    let offs = table.offsets();
    let bytes = table.build();
    let iort = Iort::parse(&bytes).unwrap();
    let text = dump_string(&iort);
    let expect: [std::string::String; 15] = [
        std::format!("[{:03x}h] PMCG (type 5)", offs[PMCG]),
        std::format!("       node reference {:#x} (SMMUv3)", offs[SMMU_A]),
        "       page 1 base address 0x100030000".into(),
        "       memory range [1] base 0x90000000 length 0x200000".into(),
        "       flags 0x15 (remapping permitted yes, privileged no, access attributes 5)".into(),
        "       context interrupt [2] GSIV 72 flags 0x1 (edge)".into(),
        "       PMU interrupt [0] GSIV 80 flags 0x1 (edge)".into(),
        "       global interrupt NSgCfgIrpt GSIV 61 flags 0x0 (level)".into(),
        "       model 3 (Arm CoreLink MMU-500)".into(),
        "       object name \"\\\\_SB_.DMA0\"".into(),
        "       PASID capabilities 0x14 (max PASID width 20)".into(),
        "       ATS attribute 0x7 (ATS yes, PRI yes, PASID forwarding yes)".into(),
        std::format!("[{:03x}h] unknown (type 127)", offs[UNKNOWN]),
        "       ITS identifier [1] 7".into(),
        "       proximity domain 2".into(),
    ];
    for line in &expect {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }
    let single_line = text
        .lines()
        .find(|l| l.contains("ID mapping [1]: single"))
        .unwrap();
    assert!(single_line.contains("output ID 0x70000"), "{single_line}");
}

#[test]
fn empty_table_is_valid() {
    let mut t = super::builder::iort_header(0, 0, 0);
    super::builder::finish(&mut t);
    let iort = Iort::parse(&t).unwrap();
    assert_eq!(iort.nodes().count(), 0);
    assert_eq!(
        iort.resolve_rid(0, 0),
        Err(IortError::NoRootComplex { segment: 0 })
    );
    let text = dump_string(&iort);
    assert!(text.contains("node count 0"));
}

#[test]
fn trailing_padding_after_nodes_is_reported() {
    let mut t = qemu_virt_iort();
    t.extend_from_slice(&[0; 8]);
    super::builder::finish(&mut t);
    let iort = Iort::parse(&t).unwrap();
    assert_eq!(iort.trailing_bytes(), 8);
    assert!(dump_string(&iort).contains("8 bytes after the last node"));
}

#[test]
fn bytes_past_header_length_are_ignored() {
    let mut t = qemu_virt_iort();
    t.extend_from_slice(&[0xff; 32]);
    let iort = Iort::parse(&t).unwrap();
    assert_eq!(iort.bytes().len(), 216);
    assert_eq!(iort.trailing_bytes(), 0);
}

#[test]
fn overlapping_ranges_prefer_the_one_not_ending_at_the_id() {
    // Firmware that writes the ID count instead of count - 1 makes 0..=0x100 overlap 0x100..;
    // RID 0x100 belongs to the second range.
    let t = Table {
        revision: 0,
        nodes: std::vec![
            its_group(&[0]),
            smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0).maps(&[map(0, 0xffff, 0, 0)]),
            smmu_v3(0, 0x2000, 0, [1, 2, 3, 4], 0, 0).maps(&[map(0, 0xffff, 0, 0)]),
            root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0x100, 0, 1), map(0x100, 0xff, 0, 2)]),
        ],
    };
    let offs = t.offsets();
    let bytes = t.build();
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(iort.resolve_rid(0, 0xff).unwrap().smmu_offset, offs[1]);
    assert_eq!(iort.resolve_rid(0, 0x100).unwrap().smmu_offset, offs[2]);
    assert_eq!(iort.resolve_rid(0, 0x100).unwrap().stream_id, 0);
}

#[test]
fn split_root_complexes_on_one_segment() {
    // Two root complex nodes for segment 0 covering different buses.
    let t = Table {
        revision: 0,
        nodes: std::vec![
            smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0),
            root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0xff, 0, 0)]),
            root_complex(0, 0, 0, 0, 0).maps(&[map(0x100, 0xff, 0x1000, 0)]),
        ],
    };
    let bytes = t.build();
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(iort.resolve_rid(0, 0x10).unwrap().stream_id, 0x10);
    assert_eq!(iort.resolve_rid(0, 0x110).unwrap().stream_id, 0x1010);
    assert!(matches!(
        iort.resolve_rid(0, 0x210),
        Err(IortError::NoMapping { .. })
    ));
}

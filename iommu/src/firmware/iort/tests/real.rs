//! The real firmware IORTs of `shared/acpi-tables` (see its README.md for their sources). Each
//! expectation below is a fact the README states about the file, or (marked) a value read from
//! the raw bytes at the offsets DEN 0049 gives.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::string::String;
use std::vec::Vec;

use super::dump_string;
use crate::firmware::iort::{
    Iort, IortError, MsiResolution, NodeKind, NodeType, Resolution, SmmuKind, SmmuV2Model,
    SmmuV3Model,
};

/// `IOMMU_ACPI_TABLES` if set, else `shared/acpi-tables` next to the repository.
pub fn tables_dir() -> PathBuf {
    match std::env::var_os("IOMMU_ACPI_TABLES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/acpi-tables"
        )),
    }
}

pub fn load(name: &str) -> Vec<u8> {
    let path = tables_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read real IORT {}: {e}. The tests need the shared ACPI table collection \
             (shared/acpi-tables beside the repository); set IOMMU_ACPI_TABLES to its directory",
            path.display()
        )
    })
}

/// Every `*-iort.bin` in the collection.
pub fn all_iort_files() -> Vec<String> {
    let dir = tables_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot list {}: {e}. The tests need the shared ACPI table collection; set \
             IOMMU_ACPI_TABLES to its directory",
            dir.display()
        )
    });
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with("-iort.bin"))
        .collect();
    names.sort();
    names
}

/// Facts the README states per file.
struct Expect {
    file: &'static str,
    len: usize,
    /// ITS, named component, root complex, SMMUv1/v2, SMMUv3 node counts.
    counts: [usize; 5],
    mappings: usize,
    single: usize,
    smmu_v2_models: &'static [SmmuV2Model],
    context_irqs: usize,
    smmu_v3: bool,
    rc_segments: &'static [u32],
    /// (node type, revision) pairs present.
    revisions: &'static [(NodeType, u8)],
    oem: (&'static str, &'static str),
}

use NodeType::{
    ItsGroup as ITS, NamedComponent as NC, RootComplex as RC, SmmuV1V2 as V2, SmmuV3 as V3,
};
use SmmuV2Model::{GenericV2, Mmu500};

const QCOM_REVS: &[(NodeType, u8)] = &[(ITS, 0), (NC, 0), (RC, 0), (V2, 0), (V3, 0)];

const EXPECT: &[Expect] = &[
    Expect {
        file: "ampere-altra-ava-iort.bin",
        len: 1176,
        counts: [6, 0, 6, 0, 6],
        mappings: 18,
        single: 6,
        smmu_v2_models: &[],
        context_irqs: 0,
        smmu_v3: true,
        rc_segments: &[12, 13, 0, 2, 4, 5],
        revisions: &[(ITS, 0), (RC, 1), (V3, 2)],
        oem: ("Ampere", "Altra"),
    },
    Expect {
        file: "solidrun-honeycomb-lx2-iort.bin",
        len: 4213,
        counts: [1, 9, 2, 1, 0],
        mappings: 22,
        single: 8,
        smmu_v2_models: &[Mmu500],
        context_irqs: 64,
        smmu_v3: false,
        rc_segments: &[2, 4],
        revisions: &[(ITS, 0), (NC, 0), (RC, 0), (V2, 0)],
        oem: ("NXP", "LX2160"),
    },
    Expect {
        file: "lenovo-thinkpad-x13s-iort.bin",
        len: 6300,
        counts: [1, 12, 7, 2, 1],
        mappings: 188,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 138,
        smmu_v3: true,
        rc_segments: &[0, 1, 2, 3, 4, 5, 6],
        revisions: QCOM_REVS,
        oem: ("LENOVO", "TP-N3H"),
    },
    Expect {
        file: "dell-xps-13-9345-iort.bin",
        len: 5366,
        counts: [1, 18, 8, 2, 1],
        mappings: 136,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 121,
        smmu_v3: true,
        rc_segments: &[0, 1, 2, 3, 4, 5, 6, 7],
        revisions: QCOM_REVS,
        oem: ("QCOM", "QCOMEDK2"),
    },
    Expect {
        file: "lenovo-yoga-slim-7x-14q8y11-iort.bin",
        len: 6074,
        counts: [1, 18, 8, 2, 1],
        mappings: 165,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 137,
        smmu_v3: true,
        rc_segments: &[0, 1, 2, 3, 4, 5, 6, 7],
        revisions: QCOM_REVS,
        oem: ("LENOVO", "CB-01"),
    },
    Expect {
        file: "microsoft-surface-pro-9-5g-iort.bin",
        len: 6381,
        counts: [1, 13, 7, 2, 1],
        mappings: 189,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 138,
        smmu_v3: true,
        rc_segments: &[0, 1, 2, 3, 4, 5, 6],
        revisions: QCOM_REVS,
        oem: ("QCOM", "QCOMEDK2"),
    },
    Expect {
        file: "lenovo-yoga-c630-iort.bin",
        len: 4379,
        counts: [0, 19, 1, 2, 0],
        mappings: 117,
        single: 0,
        smmu_v2_models: &[Mmu500, GenericV2],
        context_irqs: 72,
        smmu_v3: false,
        rc_segments: &[0],
        revisions: &[(NC, 0), (RC, 0), (V2, 0)],
        oem: ("LENOVO", "CB-01"),
    },
    Expect {
        file: "acer-aspire-1-iort.bin",
        len: 3616,
        counts: [0, 16, 0, 2, 0],
        mappings: 84,
        single: 0,
        smmu_v2_models: &[Mmu500, GenericV2],
        context_irqs: 88,
        smmu_v3: false,
        rc_segments: &[],
        revisions: &[(NC, 0), (V2, 0)],
        oem: ("QCOM", "QCOMEDK2"),
    },
    Expect {
        file: "samsung-galaxybook2-go-iort.bin",
        len: 4954,
        counts: [0, 14, 2, 2, 0],
        mappings: 151,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 90,
        smmu_v3: false,
        rc_segments: &[0, 1],
        revisions: &[(NC, 0), (RC, 0), (V2, 0)],
        oem: ("QCOM", "QCOMEDK2"),
    },
    Expect {
        file: "samsung-galaxy-book-go-5g-iort.bin",
        len: 6467,
        counts: [0, 23, 1, 2, 0],
        mappings: 182,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 136,
        smmu_v3: false,
        rc_segments: &[0],
        revisions: &[(NC, 0), (RC, 0), (V2, 0)],
        oem: ("QCOM", "QCOMEDK2"),
    },
    Expect {
        file: "asus-vivobook-s15-iort.bin",
        len: 5285,
        counts: [1, 17, 8, 2, 1],
        mappings: 135,
        single: 0,
        smmu_v2_models: &[Mmu500],
        context_irqs: 121,
        smmu_v3: true,
        rc_segments: &[0, 1, 2, 3, 4, 5, 6, 7],
        revisions: QCOM_REVS,
        oem: ("_ASUS_", "Notebook"),
    },
];

fn trimmed(b: &[u8]) -> &str {
    std::str::from_utf8(b)
        .unwrap()
        .trim_end_matches([' ', '\0'])
}

#[test]
fn every_real_iort_is_covered_by_an_expectation() {
    let files = all_iort_files();
    assert!(
        !files.is_empty(),
        "no *-iort.bin in {}",
        tables_dir().display()
    );
    let expected: BTreeSet<&str> = EXPECT.iter().map(|e| e.file).collect();
    for f in &files {
        assert!(
            expected.contains(f.as_str()),
            "{f} has no expectation in real.rs"
        );
    }
    assert_eq!(files.len(), EXPECT.len());
}

#[test]
fn real_tables_match_readme_facts() {
    for e in EXPECT {
        let bytes = load(e.file);
        let iort = Iort::parse(&bytes).unwrap_or_else(|err| panic!("{}: {err}", e.file));
        let f = e.file;
        assert_eq!(bytes.len(), e.len, "{f}");
        assert_eq!(
            iort.revision(),
            0,
            "{f}: all collected IORTs are revision 0"
        );
        assert_eq!(iort.bytes().len(), e.len, "{f}");
        assert_eq!(
            (
                trimmed(&iort.header().oem_id),
                trimmed(&iort.header().oem_table_id)
            ),
            e.oem,
            "{f}"
        );
        let nodes: Vec<_> = iort.nodes().collect();
        assert_eq!(nodes.len(), iort.node_count() as usize, "{f}");
        let count = |t: NodeType| nodes.iter().filter(|n| n.node_type() == t).count();
        assert_eq!(
            [count(ITS), count(NC), count(RC), count(V2), count(V3)],
            e.counts,
            "{f}"
        );
        assert_eq!(
            nodes.len(),
            e.counts.iter().sum::<usize>(),
            "{f}: no other node types"
        );
        let maps: Vec<_> = nodes.iter().flat_map(|n| n.id_mappings()).collect();
        assert_eq!(maps.len(), e.mappings, "{f}");
        assert_eq!(
            maps.iter().filter(|m| m.is_single()).count(),
            e.single,
            "{f}"
        );
        let mut models = Vec::new();
        let mut ctx = 0;
        for n in &nodes {
            if let NodeKind::SmmuV1V2(s) = n.kind() {
                if !models.contains(&s.model()) {
                    models.push(s.model());
                }
                ctx += s.context_interrupts().count();
            }
            if let NodeKind::SmmuV3(s) = n.kind() {
                assert_eq!(s.model(), SmmuV3Model::Generic, "{f}: SMMUv3 model 0");
            }
            if let NodeKind::ItsGroup(g) = n.kind() {
                assert_eq!(g.its_count(), 1, "{f}: one ITS per group");
            }
        }
        assert_eq!(models, e.smmu_v2_models, "{f}");
        assert_eq!(ctx, e.context_irqs, "{f}");
        assert_eq!(count(V3) > 0, e.smmu_v3, "{f}");
        let segs: Vec<u32> = nodes
            .iter()
            .filter_map(|n| match n.kind() {
                NodeKind::RootComplex(rc) => Some(rc.pci_segment),
                _ => None,
            })
            .collect();
        assert_eq!(segs, e.rc_segments, "{f}");
        let revs: BTreeSet<(u8, u8)> = nodes
            .iter()
            .map(|n| (n.node_type().raw(), n.revision()))
            .collect();
        let want: BTreeSet<(u8, u8)> = e
            .revisions
            .iter()
            .filter(|(t, _)| count(*t) > 0)
            .map(|(t, r)| (t.raw(), *r))
            .collect();
        assert_eq!(revs, want, "{f}: node revisions");
        // Revision 0 tables have no identifiers.
        assert!(nodes.iter().all(|n| n.identifier().is_none()), "{f}");
    }
}

#[test]
fn real_tables_every_mapping_translates_one_hop() {
    // For each range mapping of each node, the first and last input IDs arrive at the mapping's
    // target node with the mapping's first and last output IDs when that target is an SMMU or
    // ITS group (a property of the README's "every table valid" statement and the ID mapping semantics).
    for f in all_iort_files() {
        let bytes = load(&f);
        let iort = Iort::parse(&bytes).unwrap();
        for n in iort.nodes() {
            for m in n.id_mappings().filter(|m| !m.is_single()) {
                let target = iort.node_at(m.output_reference).unwrap();
                if !(target.node_type().is_smmu() || target.node_type() == ITS) {
                    continue;
                }
                let t = iort.translate(n.offset(), m.input_base).unwrap();
                // An earlier overlapping mapping may win; it must then agree on the node type.
                if t.node_offset == m.output_reference {
                    assert_eq!(t.id, m.output_base, "{f}: node {:#x}", n.offset());
                }
                assert_eq!(t.hops, 1);
            }
        }
    }
}

#[test]
fn altra_smmuv3_facts() {
    let bytes = load("ampere-altra-ava-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    // ITS identifiers 0, 1, 3, 4, 6, 7, one per group.
    let its: Vec<u32> = iort
        .nodes()
        .filter_map(|n| match n.kind() {
            NodeKind::ItsGroup(g) => Some(g.its_ids().collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(its, [0, 1, 3, 4, 6, 7]);
    let mut bases = Vec::new();
    for n in iort.nodes() {
        match n.kind() {
            NodeKind::SmmuV3(s) => {
                assert_eq!(n.revision(), 2);
                assert!(s.base_address > 1 << 45, "{:#x}", s.base_address);
                assert_eq!(
                    (s.event_gsiv, s.pri_gsiv, s.gerr_gsiv, s.sync_gsiv),
                    (0, 0, 0, 0)
                );
                assert_eq!(s.flags, 0x8);
                assert!(s.proximity_domain_valid());
                assert_eq!(s.device_id_mapping_index, Some(1));
                assert_eq!(s.msi_mapping_index(), Some(1));
                assert!(
                    n.id_mapping(1).unwrap().is_single(),
                    "index 1 is the single mapping"
                );
                assert!(!n.id_mapping(0).unwrap().is_single());
                bases.push(s.base_address);
            }
            NodeKind::RootComplex(rc) => {
                assert_eq!(n.revision(), 1);
                assert_eq!(rc.memory_address_limit, Some(64));
                assert_eq!(rc.pasid_capabilities, None);
            }
            _ => {}
        }
    }
    // Base addresses read from the raw table (SMMUv3 node + 16, u64).
    assert_eq!(
        bases,
        [
            0x33ff_e000_0000,
            0x37ff_e000_0000,
            0x3fff_e000_0000,
            0x23ff_e000_0000,
            0x2bff_e000_0000,
            0x2fff_e000_0000
        ]
    );
    // Segment 12's root complex (0xc0) maps RIDs identity to the SMMUv3 at 0x210, which maps
    // StreamIDs identity to the ITS group at 0x30; segment 13 uses 0x27c and DeviceIDs from
    // 0x10000 at ITS group 0x48 (raw mapping fields).
    assert_eq!(
        iort.resolve_rid(12, 0x100),
        Ok(Resolution {
            smmu_offset: 0x210,
            kind: SmmuKind::V3,
            base_address: 0x33ff_e000_0000,
            stream_id: 0x100
        })
    );
    assert_eq!(iort.resolve_msi(12, 0x100).unwrap().device_id, 0x100);
    let msi = iort.resolve_msi(13, 0x100).unwrap();
    assert_eq!((msi.its_group_offset, msi.device_id), (0x48, 0x10100));
    // The SMMU's own MSIs: the single mapping at index 1, DeviceID 0x10000.
    assert_eq!(
        iort.node_msi(0x27c),
        Ok(MsiResolution {
            its_group_offset: 0x48,
            device_id: 0x10000,
            smmu: None
        })
    );
    assert_eq!(
        iort.resolve_rid(1, 0),
        Err(IortError::NoRootComplex { segment: 1 })
    );
}

#[test]
fn honeycomb_facts() {
    let bytes = load("solidrun-honeycomb-lx2-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    let nodes: Vec<_> = iort.nodes().collect();
    // Named components of length 89 put nodes at odd offsets.
    let ncs: Vec<_> = nodes.iter().filter(|n| n.node_type() == NC).collect();
    assert!(ncs.iter().all(|n| n.length() == 89));
    assert!(ncs.iter().any(|n| n.offset() % 2 == 1), "odd node offsets");
    assert!(
        ncs.iter().any(|n| n.id_mappings().any(|m| m.is_single())),
        "single mappings on NCs"
    );
    // Root complexes of 676 bytes (zero padding after the mappings).
    let rcs: Vec<_> = nodes.iter().filter(|n| n.node_type() == RC).collect();
    assert!(rcs.iter().all(|n| n.length() == 676));
    let smmu = nodes.iter().find(|n| n.node_type() == V2).unwrap();
    let NodeKind::SmmuV1V2(s) = smmu.kind() else {
        unreachable!()
    };
    assert_eq!(s.model(), Mmu500);
    assert_eq!(s.context_interrupts().count(), 64);
    assert_eq!(s.pmu_interrupts().count(), 10);
    assert_eq!(smmu.mapping_count(), 7);
    let its = nodes.iter().find(|n| n.node_type() == ITS).unwrap();
    assert!(
        smmu.id_mappings()
            .all(|m| m.output_reference == its.offset()),
        "7 mappings to the ITS"
    );
    // "number of IDs" 0 for single IDs: RC segment 2 maps RID 0x100 alone (raw: input 0x100,
    // count field 0, output 0x1801, to the MMU-500 at 0x48).
    assert_eq!(
        iort.resolve_rid(2, 0x100),
        Ok(Resolution {
            smmu_offset: 0x48,
            kind: SmmuKind::V1V2,
            base_address: 0x500_0000,
            stream_id: 0x1801
        })
    );
    assert!(matches!(
        iort.resolve_rid(2, 0x101),
        Err(IortError::NoMapping { .. })
    ));
    // The MMU-500 maps StreamID 0x1801 to DeviceID 0x1801 at the ITS.
    assert_eq!(iort.resolve_msi(2, 0x100).unwrap().device_id, 0x1801);
    // USB0's single mapping gives StreamID 1 at the MMU-500.
    assert_eq!(
        iort.resolve_named_component("\\_SB_.USB0")
            .unwrap()
            .stream_id,
        1
    );
    assert_eq!(
        iort.resolve_named_component("\\_SB_.USB0").unwrap().kind,
        SmmuKind::V1V2
    );
}

#[test]
fn snapdragon_facts() {
    // X13s: two MMU-500s with 128 and 10 context interrupts; seven root complexes all behind
    // one SMMUv3 that is placed after them, then the ITS.
    let bytes = load("lenovo-thinkpad-x13s-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    let ctx: Vec<usize> = iort
        .nodes()
        .filter_map(|n| match n.kind() {
            NodeKind::SmmuV1V2(s) => Some(s.context_interrupts().count()),
            _ => None,
        })
        .collect();
    assert_eq!(ctx, [128, 10]);
    let v3 = iort.nodes().find(|n| n.node_type() == V3).unwrap();
    for seg in 0..7u16 {
        let rc = iort.root_complex(u32::from(seg)).unwrap();
        assert!(rc.offset() < v3.offset(), "SMMUv3 after the root complexes");
        let r = iort.resolve_rid(seg, 0).unwrap();
        assert_eq!((r.smmu_offset, r.kind), (v3.offset(), SmmuKind::V3));
        assert!(iort.resolve_msi(seg, 0).is_ok());
    }

    // C630: the root complex takes input IDs 0x87030000..=0x8703001f, not PCI RIDs, to the
    // MMU-500 (raw: two 16-ID ranges to StreamIDs 0x1c00 and 0x1c10 at node 0x30).
    let bytes = load("lenovo-yoga-c630-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(
        iort.resolve_rid(0, 0x8703_0011),
        Ok(Resolution {
            smmu_offset: 0x30,
            kind: SmmuKind::V1V2,
            base_address: 0x1500_0000,
            stream_id: 0x1c11
        })
    );
    assert!(matches!(
        iort.resolve_rid(0, 0x8),
        Err(IortError::NoMapping { .. })
    ));
    assert!(matches!(
        iort.resolve_rid(0, 0x8703_0020),
        Err(IortError::NoMapping { .. })
    ));
    // No ITS in the table: MSIs resolve nowhere.
    assert!(matches!(
        iort.resolve_msi(0, 0x8703_0000),
        Err(IortError::NoMapping { .. })
    ));

    // Galaxy Book Go 5G: the root complex covers 0x87030000..=0x870301ff in four mappings.
    let bytes = load("samsung-galaxy-book-go-5g-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    let rc = iort.root_complex(0).unwrap();
    assert_eq!(rc.mapping_count(), 4);
    let lo = rc.id_mappings().map(|m| m.input_base).min().unwrap();
    let hi = rc.id_mappings().map(|m| m.input_last()).max().unwrap();
    assert_eq!((lo, hi), (0x8703_0000, 0x8703_01ff));
    assert!(iort.resolve_rid(0, 0x8703_01ff).is_ok());

    // Galaxy Book2 Go: 11 root complex mappings in all over two segments.
    let bytes = load("samsung-galaxybook2-go-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    let n: u32 = iort
        .nodes()
        .filter(|n| n.node_type() == RC)
        .map(|n| n.mapping_count())
        .sum();
    assert_eq!(n, 11);

    // Acer Aspire 1: no root complex at all.
    let bytes = load("acer-aspire-1-iort.bin");
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(
        iort.resolve_rid(0, 0),
        Err(IortError::NoRootComplex { segment: 0 })
    );
}

#[test]
fn real_tables_dump() {
    for f in all_iort_files() {
        let bytes = load(&f);
        let iort = Iort::parse(&bytes).unwrap();
        let text = dump_string(&iort);
        assert_eq!(text, dump_string(&iort), "{f}: deterministic");
        let node_lines = text.lines().filter(|l| l.contains(" (type ")).count();
        assert_eq!(
            node_lines,
            iort.node_count() as usize,
            "{f}: one title line per node"
        );
        let map_lines = text
            .lines()
            .filter(|l| l.contains("] ID mapping ["))
            .count();
        let maps: usize = iort.nodes().map(|n| n.mapping_count() as usize).sum();
        assert_eq!(map_lines, maps, "{f}: one line per mapping");
        assert!(
            text.contains(&std::format!("length {} ({:#x})", bytes.len(), bytes.len())),
            "{f}"
        );
    }
    let bytes = load("solidrun-honeycomb-lx2-iort.bin");
    let text = dump_string(&Iort::parse(&bytes).unwrap());
    for line in [
        "[048h] SMMUv1/v2 (type 3)",
        "       model 3 (Arm CoreLink MMU-500)",
        "       context interrupt count 64",
        "       PMU interrupt count 10",
        "       OEM ID \"NXP   \"",
        "       object name \"\\\\_SB_.USB0\"",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}");
    }
}

#[test]
#[ignore = "prints a dump for manual inspection"]
fn print_dump() {
    let name = std::env::var("IORT_DUMP").unwrap_or_else(|_| "ampere-altra-ava-iort.bin".into());
    let bytes = load(&name);
    std::println!("{}", dump_string(&Iort::parse(&bytes).unwrap()));
}

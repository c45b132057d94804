//! Malformed tables: each defect must come back as its typed error, never a panic or a hang.

use super::builder::{
    Map, NodeSpec, Table, Target, finish, iort_header, its_group, le32, map, named_component, pmcg,
    rmr, root_complex, smmu_v2, smmu_v3,
};
use super::qemu_virt_iort;
use crate::firmware::acpi::TableError;
use crate::firmware::iort::{Iort, IortError};

/// Overwrites `bytes` at `at` and re-seals length and checksum, so the defect reaches the node
/// checks instead of stopping at the checksum.
fn patched(mut t: std::vec::Vec<u8>, at: usize, bytes: &[u8]) -> std::vec::Vec<u8> {
    t[at..at + bytes.len()].copy_from_slice(bytes);
    finish(&mut t);
    t
}

#[test]
fn truncated_tables() {
    let t = qemu_virt_iort();
    // Cut without fixing the header: the length field no longer matches.
    for cut in [0, 1, 35] {
        assert!(matches!(
            Iort::parse(&t[..cut]),
            Err(IortError::Table(TableError::Truncated { .. }))
        ));
    }
    for cut in [36, 47, 100, 215] {
        assert!(matches!(
            Iort::parse(&t[..cut]),
            Err(IortError::Table(TableError::LengthMismatch { .. }))
        ));
    }
    // Cut with a consistent header: the IORT header or the nodes are what is missing.
    let mut short = t[..40].to_vec();
    finish(&mut short);
    assert_eq!(
        Iort::parse(&short).unwrap_err(),
        IortError::Table(TableError::Truncated {
            needed: 48,
            available: 40
        })
    );
    let mut short = t[..100].to_vec();
    finish(&mut short);
    // 100 bytes: the ITS group fits (0x30..0x48), the SMMUv3 (0x48, 88 bytes) does not. Three
    // 16-byte headers could fit in 52 bytes, so the count check passes and the node check fails.
    assert_eq!(
        Iort::parse(&short).unwrap_err(),
        IortError::NodeTruncated {
            offset: 0x48,
            length: 88,
            available: 28
        }
    );
}

#[test]
fn bad_checksum_and_signature() {
    let mut t = qemu_virt_iort();
    t[0x60] ^= 0x10;
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::Table(TableError::BadChecksum { sum: 0x10 })
    );
    let mut t = qemu_virt_iort();
    t[..4].copy_from_slice(b"DMAR");
    finish(&mut t);
    assert!(matches!(
        Iort::parse(&t),
        Err(IortError::Table(TableError::WrongSignature { .. }))
    ));
}

#[test]
fn node_length_zero_and_too_short() {
    // ITS group length 0 at 0x30: the length field is at +1.
    let t = patched(qemu_virt_iort(), 0x31, &0u16.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::NodeTooShort {
            offset: 0x30,
            node_type: 0,
            revision: 1,
            length: 0,
            needed: 16
        }
    );
    // A revision 4 SMMUv3 needs 68 bytes of fixed fields.
    let t = Table {
        revision: 0,
        nodes: std::vec![smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0)],
    };
    let mut b = t.build();
    b[48 + 3] = 4; // revision 4 but only the 60-byte revision 0 layout
    finish(&mut b);
    assert_eq!(
        Iort::parse(&b).unwrap_err(),
        IortError::NodeTooShort {
            offset: 48,
            node_type: 4,
            revision: 4,
            length: 60,
            needed: 68
        }
    );
    // A revision 4 root complex has a flags word at +36 (40 bytes of fixed fields), so QEMU's
    // revision 3 layout with its ID array at +36 now overlaps the fixed fields.
    let t = patched(qemu_virt_iort(), 0xa3, &[4]);
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::IdArrayOutOfBounds {
            node: 0xa0,
            mapping_offset: 36,
            count: 1
        }
    );
    // And a revision 4 root complex of 36 bytes without mappings is too short.
    let t = Table {
        revision: 0,
        nodes: std::vec![root_complex(3, 0, 0, 0, 0)],
    };
    let mut b = t.build();
    b[48 + 3] = 4;
    finish(&mut b);
    assert_eq!(
        Iort::parse(&b).unwrap_err(),
        IortError::NodeTooShort {
            offset: 48,
            node_type: 2,
            revision: 4,
            length: 36,
            needed: 40
        }
    );
}

#[test]
fn node_past_end_of_table() {
    // Root complex at 0xa0 claims 0x100 bytes; the table ends at 0xd8.
    let t = patched(qemu_virt_iort(), 0xa1, &0x100u16.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::NodeTruncated {
            offset: 0xa0,
            length: 0x100,
            available: 0x38
        }
    );
}

#[test]
fn id_array_outside_node() {
    // SMMUv3 ID array offset 72: 72 + 20 > 88.
    let t = patched(qemu_virt_iort(), 0x48 + 12, &72u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::IdArrayOutOfBounds {
            node: 0x48,
            mapping_offset: 72,
            count: 1
        }
    );
    // Two mappings declared, room for one.
    let t = patched(qemu_virt_iort(), 0x48 + 8, &2u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::IdArrayOutOfBounds {
            node: 0x48,
            mapping_offset: 68,
            count: 2
        }
    );
    // An ID array inside the node header.
    let t = patched(qemu_virt_iort(), 0x48 + 12, &8u32.to_le_bytes());
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::IdArrayOutOfBounds { node: 0x48, .. }
    ));
    // A huge mapping count must not overflow the bounds arithmetic.
    let t = patched(qemu_virt_iort(), 0x48 + 8, &u32::MAX.to_le_bytes());
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::IdArrayOutOfBounds { node: 0x48, .. }
    ));
}

#[test]
fn output_reference_outside_table_or_not_a_node() {
    // Root complex mapping (at 0xc4) output reference is at +12.
    let t = patched(qemu_virt_iort(), 0xc4 + 12, &0x1000u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::OutputReferenceOutsideTable {
            node: 0xa0,
            index: 0,
            reference: 0x1000
        }
    );
    let t = patched(qemu_virt_iort(), 0xc4 + 12, &u32::MAX.to_le_bytes());
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::OutputReferenceOutsideTable { .. }
    ));
    // Inside the table, but in the middle of the SMMUv3 node.
    let t = patched(qemu_virt_iort(), 0xc4 + 12, &0x50u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::OutputReferenceNotANode {
            node: 0xa0,
            index: 0,
            reference: 0x50
        }
    );
    // Pointing into the IORT header.
    let t = patched(qemu_virt_iort(), 0xc4 + 12, &0u32.to_le_bytes());
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::OutputReferenceNotANode { reference: 0, .. }
    ));
}

#[test]
fn node_count_larger_than_fits() {
    // 216 - 48 = 168 bytes hold at most 10 node headers.
    let t = patched(qemu_virt_iort(), 36, &11u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::TooManyNodes { count: 11, max: 10 }
    );
    let t = patched(qemu_virt_iort(), 36, &u32::MAX.to_le_bytes());
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::TooManyNodes { .. }
    ));
    // Fits by header count, but the 4th node would start at the end of the table.
    let t = patched(qemu_virt_iort(), 36, &4u32.to_le_bytes());
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::NodeTruncated { offset: 0xd8, .. }
    ));
    // Node array offset inside the header, or past the table.
    let t = patched(qemu_virt_iort(), 40, &16u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::BadNodeArray {
            offset: 16,
            count: 3
        }
    );
    let t = patched(qemu_virt_iort(), 40, &0x1000u32.to_le_bytes());
    assert_eq!(
        Iort::parse(&t).unwrap_err(),
        IortError::BadNodeArray {
            offset: 0x1000,
            count: 3
        }
    );
}

/// Loops of output references are parse errors (`iort::loops`), found wherever they are, not
/// only when a resolver happens to walk them.
#[test]
fn mapping_loops_are_parse_errors() {
    // Root complex -> unknown node A -> unknown node B -> A: a loop that never reaches an SMMU.
    let mut a = NodeSpec::new(0x80, 0, std::vec![]);
    a.maps = std::vec![map(0, 0xffff, 0, 2)];
    let mut b = NodeSpec::new(0x81, 0, std::vec![]);
    b.maps = std::vec![map(0, 0xffff, 0, 1)];
    let t = Table {
        revision: 0,
        nodes: std::vec![
            root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0xffff, 0, 1)]),
            a,
            b
        ],
    };
    let offs = t.offsets();
    assert_eq!(
        Iort::parse(&t.build()).unwrap_err(),
        IortError::MappingLoop {
            node: offs[2],
            index: 0,
            reference: offs[1]
        }
    );

    // A named component that maps to itself.
    let mut nc = named_component(0, 0, "\\_SB_.LOOP", 12);
    nc.maps = std::vec![map(0, 0, 0, 0)];
    let t = Table {
        revision: 0,
        nodes: std::vec![nc],
    };
    let e = Iort::parse(&t.build()).unwrap_err();
    assert_eq!(
        e,
        IortError::MappingLoop {
            node: 48,
            index: 0,
            reference: 48
        }
    );
    assert_eq!(
        std::format!("{e}"),
        "IORT node at 0x30: ID mapping 0 references the node itself (a loop)"
    );

    // Two SMMUs sending StreamIDs to each other. DMA from the root complex would still resolve
    // (the walk stops at the first SMMU), but MSIs would go round: the table is refused.
    let t = Table {
        revision: 0,
        nodes: std::vec![
            smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0).maps(&[map(0, 0xffff, 0, 1)]),
            smmu_v3(0, 0x2000, 0, [1, 2, 3, 4], 0, 0).maps(&[map(0, 0xffff, 0, 0)]),
            root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0xffff, 0, 0)]),
        ],
    };
    let offs = t.offsets();
    let e = Iort::parse(&t.build()).unwrap_err();
    assert_eq!(
        e,
        IortError::MappingLoop {
            node: offs[1],
            index: 0,
            reference: offs[0]
        }
    );
    assert_eq!(
        std::format!("{e}"),
        std::format!(
            "IORT node at {:#x}: ID mapping 0 references the node at {:#x}, whose mappings lead \
             back (a loop)",
            offs[1],
            offs[0]
        )
    );

    // The loop is found in a later mapping and away from the first node too: an ITS-bound
    // root complex first, then a named component whose second mapping points at itself.
    let mut nc = named_component(0, 0, "\\_SB_.LATE", 12);
    nc.maps = std::vec![map(0, 0xff, 0, 0), map(0x100, 0xff, 0, 2)];
    let t = Table {
        revision: 0,
        nodes: std::vec![
            its_group(&[0]),
            root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0xffff, 0, 0)]),
            nc,
        ],
    };
    let offs = t.offsets();
    assert_eq!(
        Iort::parse(&t.build()).unwrap_err(),
        IortError::MappingLoop {
            node: offs[2],
            index: 1,
            reference: offs[2]
        }
    );

    // A diamond (two paths to the same SMMU) is not a loop.
    let t = Table {
        revision: 0,
        nodes: std::vec![
            its_group(&[0]),
            smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0).maps(&[map(0, 0xffff, 0, 0)]),
            root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0xff, 0, 1), map(0x100, 0xff, 0x100, 1)]),
        ],
    };
    let bytes = t.build();
    let iort = Iort::parse(&bytes).unwrap();
    assert_eq!(iort.resolve_rid(0, 0x101).unwrap().base_address, 0x1000);
}

#[test]
fn long_chains_stop_at_the_hop_limit() {
    // Root complex -> 20 distinct pass-through nodes -> SMMU: no cycle, but too long.
    let n = 20;
    let mut nodes = std::vec![root_complex(0, 0, 0, 0, 0).maps(&[map(0, 0xffff, 0, 1)])];
    for i in 0..n {
        let mut p = NodeSpec::new(0x90, 0, std::vec![]);
        p.maps = std::vec![map(0, 0xffff, 1, 2 + i)];
        nodes.push(p);
    }
    nodes.push(smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0));
    let t = Table { revision: 0, nodes };
    let bytes = t.build();
    let iort = Iort::parse(&bytes).unwrap();
    assert!(matches!(
        iort.resolve_rid(0, 0),
        Err(IortError::TooManyHops { .. })
    ));
}

#[test]
fn array_defects_in_node_bodies() {
    // SMMUv2 context interrupt count larger than the node.
    let mut s = smmu_v2(0x1000, 0x1000, 1, 0, [1, 2], &[3, 4], &[]);
    s.body[28..32].copy_from_slice(&100u32.to_le_bytes()); // context count @44
    let bytes = Table {
        revision: 0,
        nodes: std::vec![s],
    }
    .build();
    assert_eq!(
        Iort::parse(&bytes).unwrap_err(),
        IortError::ArrayOutOfBounds {
            node: 48,
            what: "context interrupt array"
        }
    );
    // SMMUv2 global interrupt array inside the fixed fields.
    let mut s = smmu_v2(0x1000, 0x1000, 1, 0, [1, 2], &[3], &[]);
    s.body[24..28].copy_from_slice(&16u32.to_le_bytes()); // global reference @40
    let bytes = Table {
        revision: 0,
        nodes: std::vec![s],
    }
    .build();
    assert_eq!(
        Iort::parse(&bytes).unwrap_err(),
        IortError::ArrayOutOfBounds {
            node: 48,
            what: "global interrupt array"
        }
    );
    // ITS group with more identifiers than bytes.
    let mut g = its_group(&[1]);
    g.body[0..4].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    let bytes = Table {
        revision: 0,
        nodes: std::vec![g],
    }
    .build();
    assert_eq!(
        Iort::parse(&bytes).unwrap_err(),
        IortError::ArrayOutOfBounds {
            node: 48,
            what: "ITS identifier array"
        }
    );
    // RMR memory ranges past the node.
    let mut r = rmr(1, &[(0x1000, 0x1000)], &[]);
    r.body[4..8].copy_from_slice(&3u32.to_le_bytes());
    let bytes = Table {
        revision: 0,
        nodes: std::vec![r],
    }
    .build();
    assert_eq!(
        Iort::parse(&bytes).unwrap_err(),
        IortError::ArrayOutOfBounds {
            node: 48,
            what: "memory range descriptor array"
        }
    );
    // Named component name without NUL before the ID array.
    let mut nc = named_component(0, 0, "\\_SB_.ABCDEFGH", 15);
    assert_eq!(nc.body[13 + 14], 0);
    nc.body[13 + 14] = b'X';
    nc.maps = std::vec![map(0, 0, 0, 0)];
    let bytes = Table {
        revision: 0,
        nodes: std::vec![nc],
    }
    .build();
    assert_eq!(
        Iort::parse(&bytes).unwrap_err(),
        IortError::UnterminatedName { node: 48 }
    );
}

#[test]
fn reference_and_range_defects() {
    // PMCG whose node reference is not a node.
    let p = pmcg(0x1000, 5, Target::Raw(0x31), 0x2000);
    let bytes = Table {
        revision: 0,
        nodes: std::vec![its_group(&[0]), p],
    }
    .build();
    assert_eq!(
        Iort::parse(&bytes).unwrap_err(),
        IortError::BadNodeReference {
            node: 72,
            reference: 0x31
        }
    );
    // Input range past 2^32.
    let bad = Map {
        input: 0xffff_ff00,
        num: 0x100,
        output: 0,
        target: Target::Node(0),
        flags: 0,
    };
    let t = Table {
        revision: 0,
        nodes: std::vec![
            smmu_v3(0, 0x1000, 0, [1, 2, 3, 4], 0, 0),
            root_complex(0, 0, 0, 0, 0).maps(&[bad])
        ],
    };
    assert_eq!(
        Iort::parse(&t.build()).unwrap_err(),
        IortError::IdRangeOverflow {
            node: 108,
            index: 0
        }
    );
    // MSI-only SMMUv3 whose DeviceID mapping index names no mapping.
    let t = Table {
        revision: 0,
        nodes: std::vec![
            its_group(&[0]),
            smmu_v3(2, 0x1000, 0, [0; 4], 0, 1).maps(&[map(0, 0xffff, 0, 0)])
        ],
    };
    assert_eq!(
        Iort::parse(&t.build()).unwrap_err(),
        IortError::DeviceIdIndexOutOfRange {
            node: 72,
            index: 1,
            count: 1
        }
    );
}

#[test]
fn nodes_overrunning_a_huge_declared_length() {
    // A header that claims far more nodes than the minimal table has, built by hand.
    let mut t = iort_header(0, 1, 48);
    t.push(2); // root complex
    t.extend_from_slice(&0xffffu16.to_le_bytes());
    t.push(0);
    le32(&mut t, 0);
    le32(&mut t, 0);
    le32(&mut t, 0);
    finish(&mut t);
    assert!(matches!(
        Iort::parse(&t).unwrap_err(),
        IortError::NodeTruncated {
            offset: 48,
            length: 0xffff,
            ..
        }
    ));
}

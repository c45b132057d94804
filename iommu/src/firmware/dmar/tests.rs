//! Tables written byte by byte from the VT-d 4.1 chapter 8 layouts (not through the parser's own
//! types), decoded and checked against the values that were written.

use std::string::String;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::firmware::acpi::checksum;

// ---- builder: VT-d 4.1 §8.1–§8.9 layouts ----

/// Device scope (§8.3.1): type, length, flags, reserved, enumeration ID, start bus, path.
fn scope_with_flags(ty: u8, flags: u8, enum_id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let mut s = vec![ty, (6 + 2 * path.len()) as u8, flags, 0, enum_id, bus];
    for &(d, f) in path {
        s.extend([d, f]);
    }
    s
}

fn scope(ty: u8, enum_id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    scope_with_flags(ty, 0, enum_id, bus, path)
}

fn ep(bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    scope(1, 0, bus, path)
}

fn br(bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    scope(2, 0, bus, path)
}

/// Type (u16), length (u16), then `fixed` (the rest of the fixed part), then scopes.
fn structure(ty: u16, fixed: &[u8], scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut body = fixed.to_vec();
    for s in scopes {
        body.extend(s);
    }
    let mut out = ty.to_le_bytes().to_vec();
    out.extend(u16::try_from(4 + body.len()).unwrap().to_le_bytes());
    out.extend(body);
    out
}

/// DRHD (§8.3): flags, size, segment, register base at 8.
fn drhd(flags: u8, size: u8, segment: u16, base: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, size];
    f.extend(segment.to_le_bytes());
    f.extend(base.to_le_bytes());
    structure(0, &f, scopes)
}

/// RMRR (§8.4): 2 reserved, segment, base at 8, limit at 16.
fn rmrr(segment: u16, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![0, 0];
    f.extend(segment.to_le_bytes());
    f.extend(base.to_le_bytes());
    f.extend(limit.to_le_bytes());
    structure(1, &f, scopes)
}

/// ATSR (§8.5) and SATC (§8.8) share a layout: flags, reserved, segment.
fn flags_segment(ty: u16, flags: u8, segment: u16, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, 0];
    f.extend(segment.to_le_bytes());
    structure(ty, &f, scopes)
}

/// RHSA (§8.6): 4 reserved, register base at 8, proximity domain at 16.
fn rhsa(base: u64, pxm: u32) -> Vec<u8> {
    let mut f = vec![0; 4];
    f.extend(base.to_le_bytes());
    f.extend(pxm.to_le_bytes());
    structure(3, &f, &[])
}

/// ANDD (§8.7): 3 reserved, device number at 7, object name from 8.
fn andd(number: u8, name: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 0, 0, number];
    f.extend(name);
    structure(4, &f, &[])
}

/// SIDP (§8.9): 2 reserved, segment.
fn sidp(segment: u16, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![0, 0];
    f.extend(segment.to_le_bytes());
    structure(6, &f, scopes)
}

/// ACPI header + HAW + flags + 10 reserved bytes, then the structures; length and checksum set.
fn table(haw_field: u8, flags: u8, structures: &[Vec<u8>]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(b"DMAR");
    t.extend([0; 4]); // length, set by `seal`
    t.extend([1, 0]); // revision, checksum
    t.extend(b"OEMID ");
    t.extend(b"TABLEID ");
    t.extend(7u32.to_le_bytes());
    t.extend(b"CRTR");
    t.extend(0x2021_0930u32.to_le_bytes());
    assert_eq!(t.len(), 36);
    t.extend([haw_field, flags]);
    t.extend([0; 10]);
    for s in structures {
        t.extend(s);
    }
    seal(&mut t);
    t
}

/// Sets the header length to the buffer size and fixes the checksum.
fn seal(t: &mut [u8]) {
    let len = u32::try_from(t.len()).unwrap();
    t[4..8].copy_from_slice(&len.to_le_bytes());
    fix_checksum(t);
}

fn fix_checksum(t: &mut [u8]) {
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(checksum(t));
}

/// (segment, bus, device, function) of a bridge, and its (secondary, subordinate) buses.
type BridgeEntry = ((u16, u8, u8, u8), (u8, u8));

struct FakeTopology(Vec<BridgeEntry>);

impl PciTopology for FakeTopology {
    fn bridge_buses(&self, segment: u16, bus: u8, device: u8, function: u8) -> Option<(u8, u8)> {
        self.0
            .iter()
            .find(|(k, _)| *k == (segment, bus, device, function))
            .map(|&(_, v)| v)
    }
}

/// Two levels of bridges under 00:01.0 (a switch: 01:00.0 upstream), and a root port 00:1c.0.
fn topology() -> FakeTopology {
    FakeTopology(vec![
        ((0, 0x00, 0x01, 0), (0x01, 0x03)),
        ((0, 0x01, 0x00, 0), (0x02, 0x03)),
        ((0, 0x00, 0x1c, 0), (0x10, 0x12)),
    ])
}

fn collect_dump(d: &Dmar<'_>, topo: Option<&dyn PciTopology>) -> String {
    let mut s = String::new();
    d.dump_with_topology(&mut s, topo).unwrap();
    s
}

// ---- QEMU q35 ----

/// What QEMU's q35 machine emits with `-device intel-iommu,intremap=on,device-iotlb=on`
/// (aw-bits 48), written out by hand: one DRHD at 0xfed90000, not INCLUDE_PCI_ALL, scoping the
/// root-complex IOAPIC (pseudo bus 0xff, 00.0) and the bus-0 devices one by one, plus an ATSR
/// with ALL_PORTS.
#[rustfmt::skip]
fn qemu_q35() -> Vec<u8> {
    let mut t = vec![
        b'D', b'M', b'A', b'R', 0, 0, 0, 0, 1, 0, b'B', b'O', b'C', b'H', b'S', b' ',
        b'B', b'X', b'P', b'C', b' ', b' ', b' ', b' ', 1, 0, 0, 0, b'B', b'X', b'P', b'C',
        1, 0, 0, 0,
        47,   // host address width - 1
        0x01, // INTR_REMAP
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        // DRHD: type 0, length 16 + 7 scopes * 8 = 72
        0, 0, 72, 0, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00,
        3, 8, 0, 0, 0, 0xff, 0x00, 0x0, // IOAPIC id 0, bus 0xff, 00.0
        1, 8, 0, 0, 0, 0x00, 0x00, 0x0, // 00:00.0 host bridge
        1, 8, 0, 0, 0, 0x00, 0x01, 0x0, // 00:01.0 VGA
        1, 8, 0, 0, 0, 0x00, 0x02, 0x0, // 00:02.0 NIC
        1, 8, 0, 0, 0, 0x00, 0x1f, 0x0, // 00:1f.0 LPC
        1, 8, 0, 0, 0, 0x00, 0x1f, 0x2, // 00:1f.2 SATA
        1, 8, 0, 0, 0, 0x00, 0x1f, 0x3, // 00:1f.3 SMBus
        // ATSR: type 2, length 8, ALL_PORTS, segment 0, no scopes
        2, 0, 8, 0, 0x01, 0, 0, 0,
    ];
    let len = t.len() as u8;
    t[4] = len;
    t[9] = 0u8.wrapping_sub(checksum(&t));
    t
}

#[test]
fn qemu_q35_table() {
    let bytes = qemu_q35();
    let d = Dmar::parse(&bytes).unwrap();
    assert_eq!(d.header().length, 48 + 72 + 8);
    assert_eq!(&d.header().oem_id, b"BOCHS ");
    assert_eq!(d.host_address_width(), 48);
    assert_eq!(d.flags(), DmarFlags::INTR_REMAP);
    assert_eq!(d.structures().count(), 2);

    let units: Vec<_> = d.drhds().collect();
    assert_eq!(units.len(), 1);
    let u = &units[0];
    assert_eq!(
        (u.segment(), u.register_base(), u.include_pci_all()),
        (0, 0xfed9_0000, false)
    );
    assert_eq!(u.register_set_pages(), 1);
    let scopes: Vec<_> = u.scopes().collect();
    assert_eq!(scopes.len(), 7);
    assert_eq!(scopes[0].scope_type(), ScopeType::IoApic);
    assert_eq!(
        (scopes[0].enumeration_id(), scopes[0].start_bus()),
        (0, 0xff)
    );
    let eps: Vec<(u8, u8, u8)> = scopes[1..]
        .iter()
        .map(|s| {
            assert_eq!(s.scope_type(), ScopeType::Endpoint);
            let r = s.resolve(0, &NoBridges).unwrap();
            (r.bus, r.device, r.function)
        })
        .collect();
    assert_eq!(
        eps,
        [
            (0, 0, 0),
            (0, 1, 0),
            (0, 2, 0),
            (0, 0x1f, 0),
            (0, 0x1f, 2),
            (0, 0x1f, 3)
        ]
    );

    let atsr = d.atsrs().next().unwrap();
    assert!(atsr.all_ports());
    assert_eq!(atsr.scopes().count(), 0);

    // Explicitly listed devices belong to the unit; anything else (a hot-plugged NIC on bus 0)
    // has no unit, since QEMU no longer sets INCLUDE_PCI_ALL.
    let m = d.unit_for_device(0, 0, 2, 0, &NoBridges).unwrap();
    assert_eq!(
        (m.index, m.register_base, m.via),
        (0, 0xfed9_0000, MatchVia::Endpoint)
    );
    assert!(d.unit_for_device(0, 0, 3, 0, &NoBridges).is_none());
    // The IOAPIC's interrupt requests carry source-id ff:00.0.
    let (idx, _, s) = d.unit_for_enumeration_id(ScopeType::IoApic, 0).unwrap();
    assert_eq!(idx, 0);
    assert_eq!(s.resolve(0, &NoBridges).unwrap().source_id(), 0xff00);
}

// ---- a table with every structure type ----

fn full_table() -> Vec<u8> {
    table(
        45,
        0x07,
        &[
            // DRHD 0: root port 00:1c.0, bridge 00:01.0, endpoint 00:02.0, IOAPIC 2 at f0:1f.0
            drhd(
                0,
                0,
                0,
                0xfed9_0000,
                &[
                    br(0, &[(0x1c, 0)]),
                    br(0, &[(0x01, 0)]),
                    ep(0, &[(0x02, 0)]),
                    scope(3, 2, 0xf0, &[(0x1f, 0)]),
                ],
            ),
            // DRHD 1 (VT-d 4.x size 4): endpoint 02:00.0 reached through two bridges, the
            // switch's upstream port 01:00.0 as a bridge, and 10:00.0 (behind DRHD 0's 00:1c.0).
            drhd(
                0,
                4,
                0,
                0xfed9_1000,
                &[
                    ep(0, &[(0x01, 0), (0x00, 0), (0x00, 0)]),
                    br(0, &[(0x01, 0), (0x00, 0)]),
                    ep(0, &[(0x1c, 0), (0x00, 0)]),
                ],
            ),
            // DRHD 2: segment 0 catch-all, with an HPET and an ACPI namespace device
            drhd(
                1,
                0,
                0,
                0xfed9_2000,
                &[scope(4, 0, 0, &[(0x1f, 7)]), scope(5, 1, 0, &[(0x15, 0)])],
            ),
            // DRHD 3: segment 1 catch-all, no scopes
            drhd(1, 0, 1, 0xfed9_3000, &[]),
            rmrr(0, 0x7b80_0000, 0x7fff_ffff, &[ep(0, &[(0x02, 0)])]),
            rmrr(0, 0xbf00_0000, 0xbf00_ffff, &[br(0, &[(0x1c, 0)])]),
            flags_segment(2, 0, 0, &[br(0, &[(0x1c, 0)]), br(0, &[(0x01, 0)])]),
            flags_segment(2, 1, 1, &[]),
            rhsa(0xfed9_0000, 0),
            rhsa(0xfed9_1000, 1),
            andd(1, b"\\_SB.PCI0.I2C0\0\0\0"),
            flags_segment(5, 1, 0, &[ep(0, &[(0x02, 0)])]),
            sidp(0, &[scope_with_flags(1, 0x1f, 0, 0, &[(0x0b, 0)])]),
            // a type from the future
            structure(7, &[0xaa, 0xbb, 0xcc, 0xdd], &[]),
        ],
    )
}

#[test]
fn every_structure_type_decodes() {
    let bytes = full_table();
    let d = Dmar::parse(&bytes).unwrap();
    assert_eq!(d.host_address_width(), 46);
    assert_eq!(d.flags(), DmarFlags::all());
    let types: Vec<u16> = d.structures().map(|s| s.type_code()).collect();
    assert_eq!(types, [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]);
    // The first structure sits right after the 48-byte DMAR header.
    assert_eq!(d.structures().next().unwrap().offset(), 48);

    let drhds: Vec<_> = d.drhds().collect();
    let fields: Vec<_> = drhds
        .iter()
        .map(|u| {
            (
                u.segment(),
                u.register_base(),
                u.include_pci_all(),
                u.register_set_pages(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            (0, 0xfed9_0000, false, 1),
            (0, 0xfed9_1000, false, 16),
            (0, 0xfed9_2000, true, 1),
            (1, 0xfed9_3000, true, 1)
        ]
    );
    assert_eq!(drhds[1].register_set_len(), 0x10000);
    // DRHD 0 is 16 + 4 * 8 bytes long, so DRHD 1 starts at 48 + 48.
    assert_eq!((drhds[0].length(), drhds[1].offset()), (48, 96));
    let scope_counts: Vec<usize> = drhds.iter().map(|u| u.scopes().count()).collect();
    assert_eq!(scope_counts, [4, 3, 2, 0]);
    let three_hop = drhds[1].scopes().next().unwrap();
    assert_eq!(three_hop.length(), 12);
    assert_eq!(three_hop.offset(), 96 + 16);
    let hops: Vec<_> = three_hop.path().map(|p| (p.device, p.function)).collect();
    assert_eq!(hops, [(1, 0), (0, 0), (0, 0)]);

    let rmrrs: Vec<_> = d.rmrrs().collect();
    assert_eq!(
        (rmrrs[0].base(), rmrrs[0].limit()),
        (0x7b80_0000, 0x7fff_ffff)
    );
    assert_eq!(rmrrs[0].size(), Some(0x0480_0000));
    assert!(rmrrs[0].is_well_formed());

    let atsrs: Vec<_> = d.atsrs().collect();
    assert_eq!(
        (
            atsrs[0].all_ports(),
            atsrs[0].segment(),
            atsrs[0].scopes().count()
        ),
        (false, 0, 2)
    );
    assert_eq!(
        (
            atsrs[1].all_ports(),
            atsrs[1].segment(),
            atsrs[1].scopes().count()
        ),
        (true, 1, 0)
    );

    assert_eq!(d.proximity_domain(0xfed9_1000), Some(1));
    assert_eq!(d.proximity_domain(0xfed9_2000), None);

    let a = d.acpi_namespace_device(1).unwrap();
    assert_eq!(a.object_name(), Some("\\_SB.PCI0.I2C0"));
    assert_eq!(a.name_field().len(), 17);
    let (idx, _, s) = d
        .unit_for_enumeration_id(ScopeType::AcpiNamespaceDevice, 1)
        .unwrap();
    assert_eq!((idx, s.resolve(0, &NoBridges).unwrap().device), (2, 0x15));

    let satc = d.satcs().next().unwrap();
    assert!(satc.atc_required());
    let sidp = d.sidps().next().unwrap();
    assert_eq!(sidp.scopes().next().unwrap().flags(), 0x1f);

    match d.structures().last().unwrap() {
        RemappingStructure::Unknown { ty, bytes, .. } => {
            assert_eq!(ty, 7);
            assert_eq!(bytes, [7, 0, 8, 0, 0xaa, 0xbb, 0xcc, 0xdd]);
        }
        other => panic!("expected an unknown structure, got {other:?}"),
    }
}

#[test]
fn scopes_resolve_through_two_levels_of_bridges() {
    let bytes = full_table();
    let d = Dmar::parse(&bytes).unwrap();
    let topo = topology();
    let drhds: Vec<_> = d.drhds().collect();
    let s: Vec<_> = drhds[1].scopes().collect();

    let r = s[0].resolve(0, &topo).unwrap();
    assert_eq!((r.segment, r.bus, r.device, r.function), (0, 2, 0, 0));
    assert_eq!(
        (r.kind, r.subordinate, r.source_id()),
        (ScopeType::Endpoint, None, 0x0200)
    );

    let r = s[1].resolve(0, &topo).unwrap();
    assert_eq!((r.bus, r.device, r.function), (1, 0, 0));
    assert_eq!(r.subordinate, Some((2, 3)));

    let root_port = drhds[0].scopes().next().unwrap().resolve(0, &topo).unwrap();
    assert_eq!(root_port.subordinate, Some((0x10, 0x12)));

    // Without the bridges the multi-hop scope cannot be walked.
    assert_eq!(
        s[0].resolve(0, &NoBridges),
        Err(ResolveError::NotABridge {
            hop: 0,
            bus: 0,
            device: 1,
            function: 0
        })
    );
    // A bridge scope whose bridge is absent still names the device, but covers no buses.
    let absent = drhds[0]
        .scopes()
        .nth(1)
        .unwrap()
        .resolve(0, &NoBridges)
        .unwrap();
    assert_eq!(
        (absent.bus, absent.device, absent.subordinate),
        (0, 1, None)
    );
}

#[test]
fn unit_for_device_follows_section_8_3() {
    let bytes = full_table();
    let d = Dmar::parse(&bytes).unwrap();
    let topo = topology();
    let unit = |seg, bus, dev, f| {
        d.unit_for_device(seg, bus, dev, f, &topo)
            .map(|m| (m.index, m.register_base, m.via))
    };
    // Explicit endpoint, one hop and three hops.
    assert_eq!(unit(0, 0, 2, 0), Some((0, 0xfed9_0000, MatchVia::Endpoint)));
    assert_eq!(unit(0, 2, 0, 0), Some((1, 0xfed9_1000, MatchVia::Endpoint)));
    // The bridge itself.
    assert_eq!(
        unit(0, 0, 0x1c, 0),
        Some((0, 0xfed9_0000, MatchVia::Bridge))
    );
    assert_eq!(unit(0, 1, 0, 0), Some((1, 0xfed9_1000, MatchVia::Bridge)));
    // Behind a root port.
    let behind_1c = MatchVia::BehindBridge {
        secondary: 0x10,
        subordinate: 0x12,
    };
    assert_eq!(unit(0, 0x11, 3, 1), Some((0, 0xfed9_0000, behind_1c)));
    // An explicit endpoint in another unit beats the bridge range that also covers it.
    assert_eq!(
        unit(0, 0x10, 0, 0),
        Some((1, 0xfed9_1000, MatchVia::Endpoint))
    );
    // Nested bridge scopes: the narrower range (01:00.0, buses 2-3) wins over 00:01.0 (1-3).
    let narrow = MatchVia::BehindBridge {
        secondary: 2,
        subordinate: 3,
    };
    assert_eq!(unit(0, 3, 0, 0), Some((1, 0xfed9_1000, narrow)));
    let wide = MatchVia::BehindBridge {
        secondary: 1,
        subordinate: 3,
    };
    assert_eq!(unit(0, 1, 5, 0), Some((0, 0xfed9_0000, wide)));
    // Anything else on segment 0 falls to the INCLUDE_PCI_ALL unit, which is DRHD 2.
    assert_eq!(
        unit(0, 0, 0x1f, 3),
        Some((2, 0xfed9_2000, MatchVia::IncludePciAll))
    );
    assert_eq!(
        unit(0, 0x20, 0, 0),
        Some((2, 0xfed9_2000, MatchVia::IncludePciAll))
    );
    // Segment 1 has its own catch-all; segment 2 has no unit.
    assert_eq!(
        unit(1, 0, 2, 0),
        Some((3, 0xfed9_3000, MatchVia::IncludePciAll))
    );
    assert_eq!(unit(2, 0, 2, 0), None);
    // With no bridges known, a device behind 00:1c.0 is only caught by INCLUDE_PCI_ALL.
    let m = d.unit_for_device(0, 0x11, 0, 0, &NoBridges).unwrap();
    assert_eq!((m.index, m.via), (2, MatchVia::IncludePciAll));
}

#[test]
fn rmrrs_for_device_matches_endpoints_and_bridges() {
    let bytes = full_table();
    let d = Dmar::parse(&bytes).unwrap();
    let topo = topology();
    let bases = |seg, bus, dev, f| -> Vec<u64> {
        d.rmrrs_for_device(seg, bus, dev, f, &topo)
            .map(|r| r.base())
            .collect()
    };
    assert_eq!(bases(0, 0, 2, 0), [0x7b80_0000]);
    assert_eq!(bases(0, 0x12, 0, 0), [0xbf00_0000]);
    assert_eq!(bases(0, 0, 0x1c, 0), [0xbf00_0000]);
    assert!(bases(0, 0, 3, 0).is_empty());
    assert!(bases(1, 0, 2, 0).is_empty());
}

#[test]
fn resolution_rejects_bad_paths_and_bridges() {
    let bytes = table(
        38,
        0,
        &[drhd(
            1,
            0,
            0,
            0x1000,
            &[
                ep(0, &[(0x20, 0)]),
                ep(0, &[(0x01, 8)]),
                ep(0, &[(0x05, 0), (0, 0)]),
                scope(0x80, 0, 0, &[]),
            ],
        )],
    );
    let d = Dmar::parse(&bytes).unwrap();
    // 00:05.0 claims to be a bridge with secondary bus 0: unconfigured, must not be followed.
    let broken = FakeTopology(vec![((0, 0, 5, 0), (0, 0))]);
    let s: Vec<_> = d.drhds().next().unwrap().scopes().collect();
    assert_eq!(
        s[0].resolve(0, &broken),
        Err(ResolveError::InvalidDevFn {
            hop: 0,
            device: 0x20,
            function: 0
        })
    );
    assert_eq!(
        s[1].resolve(0, &broken),
        Err(ResolveError::InvalidDevFn {
            hop: 0,
            device: 1,
            function: 8
        })
    );
    assert_eq!(
        s[2].resolve(0, &broken),
        Err(ResolveError::BadBridgeBuses {
            hop: 0,
            bus: 0,
            secondary: 0,
            subordinate: 0
        })
    );
    assert_eq!(s[3].scope_type(), ScopeType::Reserved(0x80));
    assert_eq!(s[3].resolve(0, &broken), Err(ResolveError::EmptyPath));
}

// ---- malformed tables: each defect has its own error ----

/// A valid table with one DRHD (at 48) holding two endpoint scopes (at 64 and 72).
fn small() -> Vec<u8> {
    table(
        38,
        1,
        &[drhd(
            1,
            0,
            0,
            0xfed9_0000,
            &[ep(0, &[(2, 0)]), ep(0, &[(3, 0)])],
        )],
    )
}

fn parse_err(t: &[u8]) -> DmarError {
    Dmar::parse(t).unwrap_err()
}

#[test]
fn header_defects() {
    let t = small();
    assert!(Dmar::parse(&t).is_ok());
    assert_eq!(
        parse_err(&t[..20]),
        DmarError::Table(TableError::Truncated {
            needed: 36,
            available: 20
        })
    );
    assert_eq!(
        parse_err(&t[..t.len() - 1]),
        DmarError::Table(TableError::LengthMismatch {
            header: 80,
            available: 79
        })
    );
    let mut bad = t.clone();
    bad[60] ^= 0x10;
    assert_eq!(
        parse_err(&bad),
        DmarError::Table(TableError::BadChecksum { sum: 0x10 })
    );
    let mut sig = t.clone();
    sig[0] = b'X';
    fix_checksum(&mut sig);
    assert!(matches!(
        parse_err(&sig),
        DmarError::Table(TableError::WrongSignature { .. })
    ));
    // Room for the ACPI header but not for HAW/flags/reserved.
    let mut short = t[..40].to_vec();
    seal(&mut short);
    assert_eq!(
        parse_err(&short),
        DmarError::Table(TableError::Truncated {
            needed: 48,
            available: 40
        })
    );
    let mut haw = t.clone();
    haw[36] = 64;
    fix_checksum(&mut haw);
    assert_eq!(parse_err(&haw), DmarError::HostAddressWidth { field: 64 });
    // Firmware padding after `length` is ignored.
    let mut padded = t.clone();
    padded.extend([0xff; 7]);
    assert_eq!(Dmar::parse(&padded).unwrap().bytes().len(), 80);
}

#[test]
fn structure_defects() {
    let t = small();
    let with = |at: usize, bytes: &[u8]| {
        let mut m = t.clone();
        m[at..at + bytes.len()].copy_from_slice(bytes);
        fix_checksum(&mut m);
        m
    };
    assert_eq!(
        parse_err(&with(50, &[0, 0])),
        DmarError::StructureZeroLength { offset: 48, ty: 0 }
    );
    assert_eq!(
        parse_err(&with(50, &[33, 0])),
        DmarError::StructurePastEnd {
            offset: 48,
            ty: 0,
            length: 33,
            remaining: 32
        }
    );
    // A DRHD of 12 bytes cannot hold its register base.
    assert_eq!(
        parse_err(&with(50, &[12, 0])),
        DmarError::StructureTooShort {
            offset: 48,
            ty: 0,
            length: 12,
            min: 16
        }
    );
    // The same bytes as an RHSA (fixed part 20) or RMRR (24) are too short as well.
    assert_eq!(
        parse_err(&with(48, &[3, 0, 16, 0])),
        DmarError::StructureTooShort {
            offset: 48,
            ty: 3,
            length: 16,
            min: 20
        }
    );
    assert_eq!(
        parse_err(&with(48, &[1, 0, 20, 0])),
        DmarError::StructureTooShort {
            offset: 48,
            ty: 1,
            length: 20,
            min: 24
        }
    );
    // Length 2 on a reserved type: shorter than any structure header.
    assert_eq!(
        parse_err(&with(48, &[9, 0, 2, 0])),
        DmarError::StructureTooShort {
            offset: 48,
            ty: 9,
            length: 2,
            min: 4
        }
    );
    // Three stray bytes after the last structure.
    let mut tail = t.clone();
    tail.extend([1, 0, 0]);
    seal(&mut tail);
    assert_eq!(
        parse_err(&tail),
        DmarError::StructureHeaderTruncated {
            offset: 80,
            remaining: 3
        }
    );
}

#[test]
fn scope_defects() {
    let t = small();
    // The second scope starts at 72; its length byte is at 73.
    let with = |at: usize, bytes: &[u8]| {
        let mut m = t.clone();
        m[at..at + bytes.len()].copy_from_slice(bytes);
        fix_checksum(&mut m);
        m
    };
    assert_eq!(
        parse_err(&with(73, &[0])),
        DmarError::ScopeZeroLength { offset: 72 }
    );
    assert_eq!(
        parse_err(&with(73, &[5])),
        DmarError::ScopeTooShort {
            offset: 72,
            length: 5
        }
    );
    assert_eq!(
        parse_err(&with(73, &[7])),
        DmarError::ScopeOddLength {
            offset: 72,
            length: 7
        }
    );
    assert_eq!(
        parse_err(&with(73, &[10])),
        DmarError::ScopePastStructure {
            offset: 72,
            length: 10,
            remaining: 8
        }
    );
    // The first scope claims two path entries but has one: its length swallows the start of
    // the second, whose remains then read as a zero-length scope.
    assert_eq!(
        parse_err(&with(65, &[10])),
        DmarError::ScopeZeroLength { offset: 74 }
    );
    // An endpoint scope with no path entries names no device.
    let empty = table(38, 1, &[drhd(1, 0, 0, 0x1000, &[scope(1, 0, 0, &[])])]);
    assert_eq!(
        parse_err(&empty),
        DmarError::ScopeEmptyPath { offset: 64, ty: 1 }
    );
    // One stray byte at the end of a DRHD's scope list.
    let mut stray = drhd(1, 0, 0, 0x1000, &[ep(0, &[(2, 0)])]);
    stray.push(1);
    stray[2] += 1;
    assert_eq!(
        parse_err(&table(38, 1, &[stray])),
        DmarError::ScopeTruncated {
            offset: 72,
            remaining: 1
        }
    );
    // A reserved scope type may have no path: kept, not an error.
    let reserved = table(38, 1, &[drhd(1, 0, 0, 0x1000, &[scope(9, 0, 0, &[])])]);
    assert!(Dmar::parse(&reserved).is_ok());
}

/// VT-d 4.1 §8.7: the ACPI object name is a null-terminated string. A name that runs to the end
/// of its structure is rejected, as the IORT parser rejects a named component's name without
/// its NUL (`iort::tests::malformed`), so both tables treat the defect alike.
#[test]
fn andd_name_without_nul_is_rejected() {
    let ok = table(38, 1, &[andd(1, b"\\_SB.I2C0\0")]);
    let d = Dmar::parse(&ok).unwrap();
    assert_eq!(d.andds().next().unwrap().object_name(), Some("\\_SB.I2C0"));
    // Name and padding after the NUL are fine; the NUL may be the last byte.
    let padded = table(38, 1, &[andd(1, b"\\_SB.I2C0\0\0\0")]);
    assert!(Dmar::parse(&padded).is_ok());
    // The same name with its NUL replaced: the ANDD sits right after the 48-byte header.
    let unterminated = table(
        38,
        1,
        &[drhd(1, 0, 0, 0x1000, &[]), andd(1, b"\\_SB.I2C0X")],
    );
    assert_eq!(
        parse_err(&unterminated),
        DmarError::AnddNameUnterminated { offset: 48 + 16 }
    );
    // An ANDD of only its fixed 8 bytes has no name at all, so no terminator either.
    let empty = table(38, 1, &[andd(1, b"")]);
    assert_eq!(
        parse_err(&empty),
        DmarError::AnddNameUnterminated { offset: 48 }
    );
    assert_eq!(
        std::format!("{}", DmarError::AnddNameUnterminated { offset: 48 }),
        "DMAR at 0x30: ANDD object name has no NUL terminator within the structure"
    );
}

/// The message says why length 0 is wrong, not only that it is 0.
#[test]
fn zero_length_scope_message_says_why() {
    let e = DmarError::ScopeZeroLength { offset: 72 };
    assert_eq!(
        std::format!("{e}"),
        "DMAR at 0x48: device scope length 0, but a scope is at least its 6-byte header \
         (VT-d 4.1 §8.3.1)"
    );
}

#[test]
fn errors_map_to_table_error() {
    let e = DmarError::ScopeZeroLength { offset: 72 };
    assert_eq!(
        TableError::from(e),
        TableError::Structure {
            offset: 72,
            what: "device scope length 0, below its 6-byte header"
        }
    );
    let inner = TableError::BadChecksum { sum: 3 };
    assert_eq!(TableError::from(DmarError::from(inner)), inner);
}

// ---- dump ----

#[test]
fn dump_prints_every_field() {
    let bytes = full_table();
    let d = Dmar::parse(&bytes).unwrap();
    let text = collect_dump(&d, None);
    let expect = [
        "[0000] Signature                    : \"DMAR\" (DMA Remapping table)",
        "[000a] OEM ID                       : \"OEMID \"",
        "[0020] Creator Revision             : 0x20210930",
        "[0024] Host Address Width           : 46 bits (field 0x2d)",
        "[0025] Flags                        : 0x07 [INTR_REMAP | X2APIC_OPT_OUT | DMA_CTRL_PLATFORM_OPT_IN]",
        "[0030] DRHD: Hardware Unit Definition (type 0, length 48)",
        "[0038]   Register Base Address      : 0x00000000fed90000",
        "[0040]   Device Scope: PCI Sub-hierarchy (type 2, length 8)",
        "[0046]     Path                     : 00:1c.0",
        "[0065]   Size                       : 0x04 (16 pages, 0x10000 bytes)",
        "[0076]     Path                     : 00:01.0 -> ??:00.0 -> ??:00.0",
        "[005d]     Start Bus                : 0xf0",
        "  Device Scope: MSI Capable HPET (type 4, length 8)",
        "  Flags                      : 0x01 [INCLUDE_PCI_ALL]",
        "RMRR: Reserved Memory Region (type 1, length 32)",
        "  End Address (limit)        : 0x000000007fffffff",
        "ATSR: Root Port ATS Capability (type 2, length 8)",
        "  Flags                      : 0x01 [ALL_PORTS]",
        "RHSA: Remapping Hardware Static Affinity (type 3, length 20)",
        "  Proximity Domain           : 0x00000001",
        "  ACPI Object Name           : \"\\\\_SB.PCI0.I2C0\"",
        "  Flags                      : 0x01 [ATC_REQUIRED]",
        "SIDP: SoC Integrated Device Property (type 6, length 16)",
        "    Flags                    : 0x1f",
        "????: Unknown (reserved type) (type 7, length 8)",
        "  Raw Data                   : [07, 00, 08, 00, aa, bb, cc, dd]",
    ];
    for line in expect {
        assert!(text.contains(line), "missing {line:?} in dump:\n{text}");
    }
    // Deterministic, and the Display impl is the same text.
    assert_eq!(text, collect_dump(&d, None));
    assert_eq!(text, std::format!("{d}"));
    // With the topology the bridge buses are filled in.
    let topo = topology();
    let resolved = collect_dump(&d, Some(&topo));
    assert!(resolved.contains("Path                     : 00:01.0 -> 01:00.0 -> 02:00.0"));
}

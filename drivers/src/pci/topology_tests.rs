//! Host tests of DMA aliases and IOMMU groups over synthetic hierarchies. Every expectation is
//! written by hand from the topology (requester IDs as `bus << 8 | dev << 3 | fn`), never
//! computed by the code under test.

use std::boxed::Box;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

use super::fake::{FakeFn, FakePci};
use super::*;

/// ACS Capability bits of QEMU's root and downstream ports: SV, TB, RR, CR, UF, DT.
const QEMU_PORT_ACS: u16 = 0x5f;
/// SV | RR | CR | UF (PCIe Base 5.0 §7.7.8.3 bit positions 0, 2, 3, 4).
const ISOLATION_BITS: u16 = 0x1d;

fn conventional(device: u16) -> FakeFn {
    FakeFn::endpoint(0x1234, device, 0x00, 0xff).mem32_bar(0, 0x1000, false)
}

fn pcie_endpoint(device: u16) -> FakeFn {
    conventional(device).pcie(PcieCap::TYPE_ENDPOINT)
}

fn root_port() -> FakeFn {
    FakeFn::bridge(0x1b36, 0x000c).pcie(PcieCap::TYPE_ROOT_PORT)
}

fn upstream_port() -> FakeFn {
    FakeFn::bridge(0x10b5, 0x8796).pcie(PcieCap::TYPE_UPSTREAM_PORT)
}

fn downstream_port() -> FakeFn {
    FakeFn::bridge(0x10b5, 0x8796).pcie(PcieCap::TYPE_DOWNSTREAM_PORT)
}

fn pcie_to_pci_bridge() -> FakeFn {
    FakeFn::bridge(0x1b36, 0x000e).pcie(PcieCap::TYPE_PCIE_TO_PCI_BRIDGE)
}

/// A conventional PCI-to-PCI bridge (QEMU's `pci-bridge` IDs, no PCIe capability).
fn pci_bridge() -> FakeFn {
    FakeFn::bridge(0x1b36, 0x0001)
}

struct Analysed {
    devices: Box<PciDevices>,
    topology: Box<Topology>,
}

fn analyse(p: &FakePci, with_acs_enabled: bool) -> Analysed {
    let ecam = Ecam::new(p, 0, 0, 0xff);
    let mut devices = Box::new(PciDevices::new());
    enumerate(&ecam, &EnumConfig::new(), &mut devices);
    assert_eq!(
        devices.error_count(),
        0,
        "{:?}",
        devices.errors().collect::<Vec<_>>()
    );
    if with_acs_enabled {
        enable_acs(&ecam, &mut devices);
    }
    let mut topology = Box::new(Topology::new());
    Topology::analyze(&devices, &mut topology);
    Analysed { devices, topology }
}

impl Analysed {
    fn index(&self, b: &str) -> usize {
        self.devices
            .functions()
            .iter()
            .position(|f| format!("{}", f.bdf) == b)
            .unwrap_or_else(|| panic!("{b} not enumerated"))
    }

    fn aliases(&self, b: &str) -> Vec<u16> {
        self.topology
            .aliases(self.index(b))
            .unwrap()
            .as_slice()
            .to_vec()
    }

    /// Every group as (sorted member addresses, reasons), sorted by first member.
    fn groups(&self) -> Vec<(Vec<String>, String)> {
        let mut out: Vec<(Vec<String>, String)> = (0..self.topology.group_count())
            .map(|g| {
                let mut m: Vec<String> = self
                    .topology
                    .members(g)
                    .map(|i| format!("{}", self.devices.functions()[i].bdf))
                    .collect();
                m.sort();
                (m, format!("{}", self.topology.reasons(g)))
            })
            .collect();
        out.sort();
        out
    }
}

fn expect(groups: &[(&[&str], &str)]) -> Vec<(Vec<String>, String)> {
    let mut v: Vec<(Vec<String>, String)> = groups
        .iter()
        .map(|(m, r)| {
            let mut m: Vec<String> = m.iter().map(|s| String::from(*s)).collect();
            m.sort();
            (m, String::from(*r))
        })
        .collect();
    v.sort();
    v
}

/// Host bridge; root port 00:1c.0 → switch (USP 01:00.0, DSPs 02:00.0 and 02:01.0); below
/// DSP 02:00.0 a PCIe-to-PCI bridge 03:00.0 with conventional devices 04:01.0 and 04:02.0;
/// below DSP 02:01.0 a PCIe endpoint 05:00.0. Bus numbers as firmware left them.
fn switch_with_bridge(second_dsp_acs: bool) -> FakePci {
    let mut p = FakePci::new();
    p.add(0, 0, 0, FakeFn::endpoint(0x8086, 0x29c0, 0x06, 0x00));
    let (_, rp) = p.add_bridge(0, 0x1c, 0, root_port().acs(QEMU_PORT_ACS, 0).buses(0, 1, 5));
    let (_, internal) = p.add_bridge(rp, 0, 0, upstream_port().buses(1, 2, 5));
    let (_, link0) = p.add_bridge(
        internal,
        0,
        0,
        downstream_port().acs(QEMU_PORT_ACS, 0).buses(2, 3, 4),
    );
    let mut dsp1 = downstream_port().buses(2, 5, 5);
    if second_dsp_acs {
        dsp1 = dsp1.acs(QEMU_PORT_ACS, 0);
    }
    let (_, link1) = p.add_bridge(internal, 1, 0, dsp1);
    let (_, pci) = p.add_bridge(link0, 0, 0, pcie_to_pci_bridge().buses(3, 4, 4));
    p.add(pci, 1, 0, conventional(1));
    p.add(pci, 2, 0, conventional(2));
    p.add(link1, 0, 0, pcie_endpoint(3));
    p
}

#[test]
fn acs_is_parsed_and_enabled_as_the_hardware_keeps_it() {
    let p = switch_with_bridge(true);
    let a = analyse(&p, false);
    let rp = a.devices.get(Bdf::new(0, 0x1c, 0).unwrap()).unwrap();
    let acs = rp.caps.acs.expect("root port ACS");
    assert_eq!((acs.capability, acs.control), (QEMU_PORT_ACS, 0));
    assert!(!acs.isolates());

    let a = analyse(&p, true);
    // The register itself, read from the fake's bytes: offset 0x100 (first extended
    // capability) + 6.
    let ctrl = p.with(0, 0x1c, 0, |f| {
        u16::from_le_bytes([f.regs[0x106], f.regs[0x107]])
    });
    assert_eq!(
        ctrl, ISOLATION_BITS,
        "SV|RR|CR|UF enabled, TB and DT left off"
    );
    let rp = a.devices.get(Bdf::new(0, 0x1c, 0).unwrap()).unwrap();
    assert_eq!(rp.caps.acs.unwrap().control, ISOLATION_BITS);
    assert!(rp.caps.acs.unwrap().isolates());
}

#[test]
fn bridge_under_switch_with_acs() {
    let a = analyse(&switch_with_bridge(true), true);
    // Behind the PCIe-to-PCI bridge whose secondary bus is 4: own ID, (04, 00.0), the bridge's
    // 03:00.0. The switch ports add nothing.
    assert_eq!(a.aliases("04:01.0"), vec![0x0408, 0x0400, 0x0300]);
    assert_eq!(a.aliases("04:02.0"), vec![0x0410, 0x0400, 0x0300]);
    assert_eq!(a.aliases("03:00.0"), vec![0x0300]);
    assert_eq!(a.aliases("05:00.0"), vec![0x0500]);
    assert_eq!(a.aliases("02:01.0"), vec![0x0208]);
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:00.0"], "isolated"),
            (&["00:1c.0"], "isolated"),
            (&["01:00.0"], "isolated"),
            (&["02:00.0"], "isolated"),
            (&["02:01.0"], "isolated"),
            (
                &["03:00.0", "04:01.0", "04:02.0"],
                "shared-alias+conventional-bus"
            ),
            (&["05:00.0"], "isolated"),
        ])
    );
    let t = &a.topology;
    let users: Vec<usize> = t.functions_using(0x0400).collect();
    assert_eq!(users, vec![a.index("04:01.0"), a.index("04:02.0")]);
    let users: Vec<usize> = t.functions_using(0x0300).collect();
    assert_eq!(
        users,
        vec![a.index("03:00.0"), a.index("04:01.0"), a.index("04:02.0")]
    );
    assert_eq!(t.functions_using(0x0600).count(), 0);
}

#[test]
fn one_downstream_port_without_acs_spoils_the_switch() {
    let a = analyse(&switch_with_bridge(false), true);
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:00.0"], "isolated"),
            (&["00:1c.0"], "isolated"),
            (
                &[
                    "01:00.0", "02:00.0", "02:01.0", "03:00.0", "04:01.0", "04:02.0", "05:00.0"
                ],
                "shared-alias+switch-no-acs+conventional-bus"
            ),
        ])
    );
}

#[test]
fn acs_present_but_not_enabled_isolates_nothing() {
    // Without enable_acs every control is 0 as after reset: the root port does not isolate.
    let a = analyse(&switch_with_bridge(true), false);
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:00.0"], "isolated"),
            (
                &[
                    "00:1c.0", "01:00.0", "02:00.0", "02:01.0", "03:00.0", "04:01.0", "04:02.0",
                    "05:00.0"
                ],
                "shared-alias+root-port-no-acs+switch-no-acs+conventional-bus"
            ),
        ])
    );
}

/// PCIe-to-PCI bridge 00:1e.0 (secondary 1) → conventional devices 01:00.0 (at the alias
/// devfn) and 01:05.0, and a conventional PCI bridge 01:02.0 (secondary 2) → 02:03.0.
#[test]
fn nested_bridges() {
    let mut p = FakePci::new();
    let (_, pci1) = p.add_bridge(0, 0x1e, 0, pcie_to_pci_bridge().buses(0, 1, 2));
    p.add(pci1, 0, 0, conventional(1));
    p.add(pci1, 5, 0, conventional(2));
    let (_, pci2) = p.add_bridge(pci1, 2, 0, pci_bridge().buses(1, 2, 2));
    p.add(pci2, 3, 0, conventional(3));
    p.add(0, 4, 0, pcie_endpoint(4));
    let a = analyse(&p, true);
    assert_eq!(a.aliases("00:1e.0"), vec![0x00f0]);
    assert_eq!(a.aliases("01:00.0"), vec![0x0100, 0x00f0]);
    assert_eq!(a.aliases("01:05.0"), vec![0x0128, 0x0100, 0x00f0]);
    assert_eq!(a.aliases("01:02.0"), vec![0x0110, 0x0100, 0x00f0]);
    assert_eq!(a.aliases("02:03.0"), vec![0x0218, 0x0110, 0x0100, 0x00f0]);
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:04.0"], "isolated"),
            (
                &["00:1e.0", "01:00.0", "01:02.0", "01:05.0", "02:03.0"],
                "shared-alias+conventional-bus"
            ),
        ])
    );
}

const RR_CR: u16 = 0x0c;

fn multifunction_slots() -> FakePci {
    let mut p = FakePci::new();
    // Conventional: never isolated.
    p.add(0, 5, 0, conventional(0x50).multifunction());
    p.add(0, 5, 1, conventional(0x51));
    // PCIe with ACS RR and CR: isolated once enabled (SV and UF are not offered, so hard-wired).
    p.add(0, 6, 0, pcie_endpoint(0x60).acs(RR_CR, 0).multifunction());
    p.add(0, 6, 1, pcie_endpoint(0x61).acs(RR_CR, 0));
    // PCIe without ACS.
    p.add(0, 7, 0, pcie_endpoint(0x70).multifunction());
    p.add(0, 7, 1, pcie_endpoint(0x71));
    // Mixed: function 0 isolated, functions 1 and 2 not.
    p.add(0, 8, 0, pcie_endpoint(0x80).acs(RR_CR, 0).multifunction());
    p.add(0, 8, 1, pcie_endpoint(0x81));
    p.add(0, 8, 2, pcie_endpoint(0x82));
    // ACS offered but the Control register ignores writes: not isolated.
    p.add(
        0,
        9,
        0,
        pcie_endpoint(0x90)
            .acs_with_wmask(RR_CR, 0, 0)
            .multifunction(),
    );
    p.add(0, 9, 1, pcie_endpoint(0x91).acs_with_wmask(RR_CR, 0, 0));
    // A single-function PCIe endpoint without ACS is its own group.
    p.add(0, 10, 0, pcie_endpoint(0xa0));
    p
}

#[test]
fn multifunction_endpoints_with_and_without_acs() {
    let a = analyse(&multifunction_slots(), true);
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:05.0", "00:05.1"], "multifunction-no-acs"),
            (&["00:06.0"], "isolated"),
            (&["00:06.1"], "isolated"),
            (&["00:07.0", "00:07.1"], "multifunction-no-acs"),
            (&["00:08.0"], "isolated"),
            (&["00:08.1", "00:08.2"], "multifunction-no-acs"),
            (&["00:09.0", "00:09.1"], "multifunction-no-acs"),
            (&["00:0a.0"], "isolated"),
        ])
    );
    // Without enable_acs (controls 0 as after reset), 00:06 is one group too.
    let a = analyse(&multifunction_slots(), false);
    let both = vec![String::from("00:06.0"), String::from("00:06.1")];
    assert!(
        a.groups()
            .contains(&(both, String::from("multifunction-no-acs")))
    );
}

/// Root ports with and without ACS, single and in one multi-function slot, each with an edu.
#[test]
fn root_ports_with_and_without_acs() {
    let mut p = FakePci::new();
    let (_, b1) = p.add_bridge(0, 0x1c, 0, root_port().acs(QEMU_PORT_ACS, 0).buses(0, 1, 1));
    p.add(b1, 0, 0, conventional(1));
    let (_, b2) = p.add_bridge(0, 0x1d, 0, root_port().buses(0, 2, 2));
    p.add(b2, 0, 0, conventional(2));
    let (_, b3) = p.add_bridge(0, 0x1e, 0, root_port().multifunction().buses(0, 3, 3));
    p.add(b3, 0, 0, conventional(3));
    let (_, b4) = p.add_bridge(0, 0x1e, 1, root_port().buses(0, 4, 4));
    p.add(b4, 0, 0, conventional(4));
    let (_, b5) = p.add_bridge(
        0,
        0x1f,
        0,
        root_port()
            .acs(QEMU_PORT_ACS, 0)
            .multifunction()
            .buses(0, 5, 5),
    );
    p.add(b5, 0, 0, conventional(5));
    let (_, b6) = p.add_bridge(0, 0x1f, 1, root_port().acs(QEMU_PORT_ACS, 0).buses(0, 6, 6));
    p.add(b6, 0, 0, conventional(6));
    let a = analyse(&p, true);
    for bus in 1..=6u16 {
        // Root ports forward IDs unchanged.
        assert_eq!(a.aliases(&format!("{bus:02x}:00.0")), vec![bus << 8]);
    }
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:1c.0"], "isolated"),
            (&["01:00.0"], "isolated"),
            (&["00:1d.0", "02:00.0"], "root-port-no-acs"),
            (
                &["00:1e.0", "00:1e.1", "03:00.0", "04:00.0"],
                "multifunction-no-acs+root-port-no-acs"
            ),
            (&["00:1f.0"], "isolated"),
            (&["00:1f.1"], "isolated"),
            (&["05:00.0"], "isolated"),
            (&["06:00.0"], "isolated"),
        ])
    );
}

#[test]
fn quirk_aliases() {
    let mut p = FakePci::new();
    // Marvell 88SE9123 at 00:02.0 also uses 00:02.1 (0x0011).
    p.add(0, 2, 0, FakeFn::endpoint(0x1b4b, 0x9123, 0x01, 0x06));
    // Marvell 88SE9230 as function 0 of an ACS-isolated multi-function device whose
    // function 1 is real: the shared ID joins them despite ACS.
    p.add(
        0,
        3,
        0,
        FakeFn::endpoint(0x1b4b, 0x9230, 0x01, 0x06)
            .pcie(PcieCap::TYPE_ENDPOINT)
            .acs(0x0c, 0)
            .multifunction(),
    );
    p.add(0, 3, 1, pcie_endpoint(0x31).acs(0x0c, 0));
    // ASMedia ASM1083 (no PCIe capability) acts as a PCIe-to-PCI bridge.
    let (_, below) = p.add_bridge(0, 0x1e, 0, FakeFn::bridge(0x1b21, 0x1080).buses(0, 1, 1));
    p.add(below, 3, 0, conventional(1));
    let a = analyse(&p, true);
    assert_eq!(a.aliases("00:02.0"), vec![0x0010, 0x0011]);
    assert_eq!(a.aliases("00:03.0"), vec![0x0018, 0x0019]);
    assert_eq!(a.aliases("01:03.0"), vec![0x0118, 0x0100, 0x00f0]);
    assert_eq!(
        a.groups(),
        expect(&[
            (&["00:02.0"], "isolated"),
            (&["00:03.0", "00:03.1"], "shared-alias"),
            (&["00:1e.0", "01:03.0"], "shared-alias+conventional-bus"),
        ])
    );
    for q in ALIAS_QUIRKS {
        assert!(!q.source.is_empty());
    }
}

#[test]
fn deep_nesting_truncates_and_says_so() {
    // Four nested PCIe-to-PCI bridges: 1 + 2 * 4 = 9 IDs > MAX_ALIASES.
    let mut p = FakePci::new();
    let mut seg = 0;
    for level in 0..4u8 {
        let (_, s) = p.add_bridge(seg, 1, 0, pcie_to_pci_bridge().buses(level, level + 1, 4));
        seg = s;
    }
    p.add(seg, 2, 0, conventional(9));
    let a = analyse(&p, true);
    let t = &a.topology;
    let al = t.aliases(a.index("04:02.0")).unwrap();
    assert!(al.truncated());
    assert_eq!(al.as_slice().len(), MAX_ALIASES);
    assert_eq!(
        al.as_slice(),
        &[
            0x0410, 0x0400, 0x0308, 0x0300, 0x0208, 0x0200, 0x0108, 0x0100
        ]
    );
    assert!(!t.aliases(a.index("03:01.0")).unwrap().truncated());
    // Still one group: the conventional buses join everything below the top bridge.
    assert_eq!(t.group_count(), 1);
}

#[test]
fn empty_and_reanalysed() {
    let p = FakePci::new();
    let a = analyse(&p, true);
    assert!(a.topology.is_empty());
    assert_eq!(a.topology.group_count(), 0);
    assert_eq!(a.topology.aliases(0), None);
    assert_eq!(a.topology.group_of(0), None);
    // Reusing one Topology for another hierarchy leaves nothing of the first.
    let big = analyse(&switch_with_bridge(false), true);
    let mut t = big.topology.clone();
    Topology::analyze(&a.devices, &mut t);
    assert_eq!(t.group_count(), 0);
    assert!(t.reasons(0).is_empty());
}

/// Two edu behind one PCIe-to-PCI bridge (one group with the bridge), a multi-function pair
/// without ACS (one group), and an isolated endpoint.
fn assignment_topology() -> Analysed {
    let mut p = FakePci::new();
    let (_, pci) = p.add_bridge(0, 0x1e, 0, pcie_to_pci_bridge().buses(0, 1, 1));
    p.add(pci, 1, 0, conventional(1));
    p.add(pci, 2, 0, conventional(2));
    p.add(0, 6, 0, conventional(3).multifunction());
    p.add(0, 6, 1, conventional(4));
    p.add(0, 7, 0, pcie_endpoint(5));
    analyse(&p, true)
}

#[test]
fn whole_groups_or_nothing() {
    let a = assignment_topology();
    let owner = |table: &'static [(&'static str, char)]| {
        let fns: Vec<String> = a
            .devices
            .functions()
            .iter()
            .map(|f| format!("{}", f.bdf))
            .collect();
        move |i: usize| {
            table
                .iter()
                .find(|(b, _)| fns.get(i).is_some_and(|f| f == b))
                .map(|&(_, o)| o)
        }
    };
    let t = &a.topology;
    let d = &a.devices;
    // Nothing assigned; whole groups (the bridge may stay with the hypervisor).
    assert_eq!(t.check_assignment(d, owner(&[])), Ok(()));
    assert_eq!(
        t.check_assignment(
            d,
            owner(&[
                ("01:01.0", 'A'),
                ("01:02.0", 'A'),
                ("00:06.0", 'B'),
                ("00:06.1", 'B'),
                ("00:07.0", 'B')
            ])
        ),
        Ok(())
    );
    // The two edu behind the bridge given to two guests: refused, naming the other one.
    let split = owner(&[("01:01.0", 'A'), ("01:02.0", 'B')]);
    let err = t.check_assignment(d, &split).unwrap_err();
    assert_eq!((err.owner, err.missing), ('A', 1));
    assert_eq!(t.group_of(a.index("01:01.0")), Some(err.group));
    let missing: Vec<usize> = t.missing_members(d, &err, &split).collect();
    assert_eq!(missing, vec![a.index("01:02.0")]);
    // One function of the multi-function pair left to the hypervisor: refused.
    let half = owner(&[("00:06.1", 'B')]);
    let err = t.check_assignment(d, &half).unwrap_err();
    assert_eq!((err.owner, err.missing), ('B', 1));
    let missing: Vec<usize> = t.missing_members(d, &err, &half).collect();
    assert_eq!(missing, vec![a.index("00:06.0")]);
}

//! DMA aliases and IOMMU groups computed once from the enumerated hierarchy.
//!
//! **Aliases.** The requester ID an IOMMU sees is not always the function's own. A PCI Express
//! to PCI/PCI-X bridge takes ownership of transactions from its conventional secondary bus and
//! issues them with its secondary bus number and device/function 0 (PCI Express to PCI/PCI-X
//! Bridge Spec 1.0 §2.3); some bridges use their own ID instead, and PCI-X transactions may keep
//! the originator's. A conventional PCI-to-PCI bridge forwards with its own ID. So a function's
//! alias set is its own ID plus, walking up through every bridge between it and the root bus,
//! the IDs that bridge may substitute: `(secondary, 00.0)` and the bridge's own ID for a
//! PCIe-to-PCI bridge (both, as Xen programs them), the bridge's own ID for a conventional or a
//! PCI-to-PCIe bridge. PCIe root and switch ports forward requester IDs unchanged (PCIe Base 5.0
//! §2.2.6.2), so a PCIe device under a switch keeps its own ID. This is the walk of Linux's
//! `pci_for_each_dma_alias`, with Xen's extra bridge ID. A few devices also issue DMA with
//! another function number of their own slot; [`ALIAS_QUIRKS`] lists the known ones.
//!
//! **Groups.** The smallest sets of functions the IOMMU can isolate from each other:
//! - functions that share any alias ID (the IOMMU cannot tell them apart);
//! - functions of one multi-function device unless ACS isolates them from each other: a
//!   conventional function never is, a PCIe function is when its ACS isolation controls are on;
//! - a bus on which peer-to-peer traffic can bypass the IOMMU joins the bridge above it and
//!   everything below it into one group: a conventional bus (behind any PCI or PCIe-to-PCI
//!   bridge: no ACS exists there), the link below a root port whose ACS does not isolate, and
//!   the internal bus of a switch when any of its downstream ports lacks ACS isolation (one
//!   permissive port lets traffic from below it reach every other port's hierarchy).
//!
//! These are the rules of Linux's `pci_device_group`/`pci_acs_path_enabled`, with the switch
//! rule from the 2025 rework of that code (which fixed peers of a permissive downstream port
//! getting separate groups). The root bus itself is assumed to deliver everything to the IOMMU,
//! as Linux assumes (the PCIe specification leaves root-complex internals undefined).
//! Isolation requires ACS Source Validation, P2P Request Redirect, P2P Completion Redirect and
//! Upstream Forwarding *enabled* — [`enable_acs`] turns on what each function offers, and the
//! analysis uses the control values read back from the hardware.

use core::fmt;

use super::caps::{AcsCap, PcieCap};
use super::config::{Bdf, ConfigSpace};
use super::enumerate::{MAX_FUNCTIONS, PciDevices, PciFunction};

/// Capacity of one function's alias set: its own ID plus two IDs for each of three nested
/// PCIe-to-PCI bridges. A deeper hierarchy sets [`DmaAliases::truncated`].
pub const MAX_ALIASES: usize = 8;

/// The requester IDs DMA from one function may carry, its own first, then in walk order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaAliases {
    ids: [u16; MAX_ALIASES],
    len: u8,
    truncated: bool,
}

impl DmaAliases {
    const EMPTY: Self = Self {
        ids: [0; MAX_ALIASES],
        len: 0,
        truncated: false,
    };

    fn push(&mut self, rid: u16) {
        if self.contains(rid) {
            return;
        }
        match self.ids.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = rid;
                self.len += 1;
            }
            None => self.truncated = true,
        }
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.ids[..usize::from(self.len)]
    }

    pub fn contains(&self, rid: u16) -> bool {
        self.as_slice().contains(&rid)
    }

    /// More aliases existed than [`MAX_ALIASES`]: programming only these would leave some DMA
    /// of the function untranslated, so such a function must not be given to a guest.
    pub const fn truncated(&self) -> bool {
        self.truncated
    }
}

/// What a quirk adds to a device's aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuirkKind {
    /// The device also issues DMA as function `n` of its own slot (a "phantom" function that
    /// usually does not answer configuration reads).
    Function(u8),
    /// A conventional-looking bridge (no PCIe capability) that really is a PCIe-to-PCI bridge and
    /// substitutes `(secondary, 00.0)` like one.
    PcieToPciBridge,
}

/// A device known to use requester IDs its topology does not predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AliasQuirk {
    pub vendor: u16,
    pub device: u16,
    pub kind: QuirkKind,
    /// Where the behaviour was observed.
    pub source: &'static str,
}

const MARVELL_EXT: u16 = 0x1b4b;
const BZ_42679: &str =
    "Linux quirk_dma_func1_alias, kernel.org bugzilla 42679 (VT-d faults on function 1)";
const FUNC1: QuirkKind = QuirkKind::Function(1);
const BRIDGE: QuirkKind = QuirkKind::PcieToPciBridge;

const fn quirk(vendor: u16, device: u16, kind: QuirkKind, source: &'static str) -> AliasQuirk {
    AliasQuirk {
        vendor,
        device,
        kind,
        source,
    }
}

/// Devices whose DMA carries IDs the topology does not predict. The entries are hardware facts
/// collected by Linux (`drivers/pci/quirks.c`) from VT-d fault reports; `source` names them.
pub const ALIAS_QUIRKS: &[AliasQuirk] = &[
    // Marvell SATA/SSD controllers issue DMA as function 1 whatever function they are.
    quirk(MARVELL_EXT, 0x9120, FUNC1, BZ_42679),
    quirk(MARVELL_EXT, 0x9123, FUNC1, BZ_42679),
    quirk(
        MARVELL_EXT,
        0x9125,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 42679#c136",
    ),
    quirk(MARVELL_EXT, 0x9128, FUNC1, BZ_42679),
    quirk(
        MARVELL_EXT,
        0x9130,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 42679#c14",
    ),
    quirk(MARVELL_EXT, 0x9172, FUNC1, BZ_42679),
    quirk(
        MARVELL_EXT,
        0x91a0,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 42679#c46",
    ),
    quirk(
        MARVELL_EXT,
        0x9215,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 42679#c135",
    ),
    quirk(
        MARVELL_EXT,
        0x9220,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 42679#c127",
    ),
    quirk(
        MARVELL_EXT,
        0x9230,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 42679#c49",
    ),
    quirk(
        MARVELL_EXT,
        0x9235,
        FUNC1,
        "Linux quirk_dma_func1_alias, bugzilla 217218",
    ),
    // HighPoint RocketRAID 642L/644L (TTI).
    quirk(
        0x1103,
        0x0642,
        FUNC1,
        "Linux quirk_dma_func1_alias (HighPoint RocketRAID 642L)",
    ),
    quirk(
        0x1103,
        0x0645,
        FUNC1,
        "Linux quirk_dma_func1_alias (HighPoint RocketRAID 644L)",
    ),
    // Ricoh card readers issue DMA as function 0.
    quirk(
        0x1180,
        0xe832,
        QuirkKind::Function(0),
        "Linux quirk_dma_func0_alias (Ricoh R5CE822)",
    ),
    quirk(
        0x1180,
        0xe476,
        QuirkKind::Function(0),
        "Linux quirk_dma_func0_alias (Ricoh R5CE476)",
    ),
    // PCIe-to-PCI bridges without a PCIe capability.
    quirk(
        0x1b21,
        0x1080,
        BRIDGE,
        "Linux quirk_use_pcie_bridge_dma_alias (ASMedia ASM1083/1085)",
    ),
    quirk(
        0x10e3,
        0x8113,
        BRIDGE,
        "Linux quirk_use_pcie_bridge_dma_alias (Tundra 8113)",
    ),
    quirk(
        0x1283,
        0x8892,
        BRIDGE,
        "Linux quirk_use_pcie_bridge_dma_alias (ITE 8892)",
    ),
    quirk(
        0x1283,
        0x8893,
        BRIDGE,
        "Linux quirk_use_pcie_bridge_dma_alias (ITE 8893)",
    ),
];

fn quirks(f: &PciFunction) -> impl Iterator<Item = &'static AliasQuirk> {
    let (v, d) = (f.vendor_id, f.device_id);
    ALIAS_QUIRKS
        .iter()
        .filter(move |q| q.vendor == v && q.device == d)
}

/// How a bridge treats the requester IDs of transactions it forwards upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BridgeKind {
    /// PCIe root port: IDs unchanged, isolation per its ACS.
    RootPort,
    /// Switch upstream port: IDs unchanged; its secondary is the switch's internal bus.
    UpstreamPort,
    /// Switch downstream port: IDs unchanged; a point-to-point link below.
    DownstreamPort,
    /// PCIe to PCI/PCI-X: `(secondary, 00.0)` and its own ID.
    PcieToPci,
    /// Conventional PCI-to-PCI, PCI-to-PCIe, or a PCIe type that should not be a bridge: its
    /// own ID.
    Other,
}

fn bridge_kind(f: &PciFunction) -> BridgeKind {
    match f.caps.pcie.map(|c| c.port_type) {
        Some(PcieCap::TYPE_ROOT_PORT) => BridgeKind::RootPort,
        Some(PcieCap::TYPE_UPSTREAM_PORT) => BridgeKind::UpstreamPort,
        Some(PcieCap::TYPE_DOWNSTREAM_PORT) => BridgeKind::DownstreamPort,
        Some(PcieCap::TYPE_PCIE_TO_PCI_BRIDGE) => BridgeKind::PcieToPci,
        None if quirks(f).any(|q| q.kind == QuirkKind::PcieToPciBridge) => BridgeKind::PcieToPci,
        _ => BridgeKind::Other,
    }
}

fn acs_isolates(f: &PciFunction) -> bool {
    f.caps.acs.is_some_and(|a| a.isolates())
}

/// Whether ACS keeps this function of a multi-function device from reaching its sibling
/// functions directly. Conventional functions have no ACS; PCIe-to-PCI and PCI-to-PCIe bridges
/// must not implement it (PCIe Base 5.0 §6.12.1), so they never are.
fn function_isolated(f: &PciFunction) -> bool {
    let Some(pcie) = f.caps.pcie else {
        return false;
    };
    !matches!(
        pcie.port_type,
        PcieCap::TYPE_PCIE_TO_PCI_BRIDGE | PcieCap::TYPE_PCI_TO_PCIE_BRIDGE
    ) && acs_isolates(f)
}

/// Turns on, in every function with an ACS capability, the isolation controls it implements
/// (Source Validation, P2P Request/Completion Redirect, Upstream Forwarding), as Linux does at
/// boot; then records the Control register as read back, so what [`Topology::analyze`] sees is
/// what the hardware kept. Returns how many functions isolate afterwards.
pub fn enable_acs<C: ConfigSpace + ?Sized>(cfg: &C, devices: &mut PciDevices) -> usize {
    let mut isolating = 0;
    for f in devices.functions_mut() {
        let bdf = f.bdf;
        let Some(acs) = f.caps.acs.as_mut() else {
            continue;
        };
        let wanted = acs.control | (acs.capability & AcsCap::ISOLATION);
        if wanted != acs.control {
            cfg.write16(bdf, acs.offset + 6, wanted);
        }
        acs.control = cfg.read16(bdf, acs.offset + 6);
        if acs.isolates() {
            isolating += 1;
        }
    }
    isolating
}

/// Why the members of a group are together (any combination).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupReasons(u8);

impl GroupReasons {
    /// Two members share a requester ID (an alias).
    pub const SHARED_ALIAS: Self = Self(1 << 0);
    /// Functions of one multi-function device without ACS isolation between them.
    pub const MULTIFUNCTION_NO_ACS: Self = Self(1 << 1);
    /// Below a root port whose ACS does not isolate (including the port).
    pub const ROOT_PORT_NO_ACS: Self = Self(1 << 2);
    /// Below a switch with a downstream port whose ACS does not isolate (including the ports).
    pub const SWITCH_NO_ACS: Self = Self(1 << 3);
    /// On or below a conventional PCI/PCI-X bus (including the bridge to it).
    pub const CONVENTIONAL_BUS: Self = Self(1 << 4);

    const NAMES: [(Self, &'static str); 5] = [
        (Self::SHARED_ALIAS, "shared-alias"),
        (Self::MULTIFUNCTION_NO_ACS, "multifunction-no-acs"),
        (Self::ROOT_PORT_NO_ACS, "root-port-no-acs"),
        (Self::SWITCH_NO_ACS, "switch-no-acs"),
        (Self::CONVENTIONAL_BUS, "conventional-bus"),
    ];

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// `shared-alias+conventional-bus`, or `isolated` for a group of one.
impl fmt::Display for GroupReasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("isolated");
        }
        let mut first = true;
        for (bit, name) in Self::NAMES {
            if self.contains(bit) {
                if !first {
                    f.write_str("+")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// Aliases and IOMMU groups of every function of one [`PciDevices`], indexed like
/// [`PciDevices::functions`]. About 8 KiB.
#[derive(Clone, Debug)]
pub struct Topology {
    len: usize,
    aliases: [DmaAliases; MAX_FUNCTIONS],
    /// Group number of each function; groups are numbered in order of their first member.
    group: [u16; MAX_FUNCTIONS],
    /// Why each group (by number) is together.
    reasons: [GroupReasons; MAX_FUNCTIONS],
    group_count: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    pub const fn new() -> Self {
        Self {
            len: 0,
            aliases: [DmaAliases::EMPTY; MAX_FUNCTIONS],
            group: [0; MAX_FUNCTIONS],
            reasons: [GroupReasons(0); MAX_FUNCTIONS],
            group_count: 0,
        }
    }

    /// Computes aliases and groups of `devices` (replacing any previous result). Reads only
    /// what enumeration recorded; run [`enable_acs`] first so the ACS controls are current.
    pub fn analyze(devices: &PciDevices, out: &mut Self) {
        let fns = devices.functions();
        let n = fns.len().min(MAX_FUNCTIONS);
        let fns = &fns[..n];
        out.len = n;
        out.group_count = 0;
        // The bridge whose secondary bus is each bus number (only scanned bridges: nothing is
        // known below the others).
        let mut above: [Option<u16>; 256] = [None; 256];
        for (i, f) in fns.iter().enumerate() {
            if let Some((sec, _)) = f.bridge_buses()
                && sec != devices.root_bus()
                && above[usize::from(sec)].is_none()
            {
                above[usize::from(sec)] = Some(i as u16);
            }
        }

        for (i, f) in fns.iter().enumerate() {
            out.aliases[i] = aliases_of(fns, &above, f);
        }

        let mut uf = UnionFind::new(n);
        let mut why = [GroupReasons(0); MAX_FUNCTIONS];
        let mut join = |uf: &mut UnionFind, a: usize, b: usize, r: GroupReasons| {
            uf.union(a, b);
            why[a] = why[a].union(r);
            why[b] = why[b].union(r);
        };

        // Shared aliases.
        for i in 0..n {
            for &rid in out.aliases[i].as_slice() {
                for j in i + 1..n {
                    if out.aliases[j].contains(rid) {
                        join(&mut uf, i, j, GroupReasons::SHARED_ALIAS);
                    }
                }
            }
        }

        // Multi-function devices: siblings that ACS does not isolate.
        let mut via_multifunction = [false; MAX_FUNCTIONS];
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&fns[i], &fns[j]);
                if a.bdf.bus == b.bdf.bus
                    && a.bdf.device == b.bdf.device
                    && !function_isolated(a)
                    && !function_isolated(b)
                {
                    join(&mut uf, i, j, GroupReasons::MULTIFUNCTION_NO_ACS);
                    via_multifunction[i] = true;
                    via_multifunction[j] = true;
                }
            }
        }

        // Buses on which peer-to-peer can bypass the IOMMU: the bridge and its whole subtree.
        for (p, bridge) in fns.iter().enumerate() {
            let Some((sec, sub)) = bridge.bridge_buses() else {
                continue;
            };
            let reason = match bridge_kind(bridge) {
                BridgeKind::RootPort if acs_isolates(bridge) => None,
                BridgeKind::RootPort => Some(GroupReasons::ROOT_PORT_NO_ACS),
                // The link below carries one device; the port's ACS is judged with its peers on
                // the switch's internal bus (the upstream port's secondary bus).
                BridgeKind::DownstreamPort => None,
                BridgeKind::UpstreamPort => fns
                    .iter()
                    .filter(|f| f.bdf.bus == sec)
                    .any(|f| {
                        bridge_kind(f) != BridgeKind::DownstreamPort
                            || !f.is_bridge()
                            || !acs_isolates(f)
                    })
                    .then_some(GroupReasons::SWITCH_NO_ACS),
                BridgeKind::PcieToPci | BridgeKind::Other => Some(GroupReasons::CONVENTIONAL_BUS),
            };
            // A bridge function that shares its device with non-isolated siblings may also loop
            // their traffic downstream (the 2025 Linux rework makes the same assumption).
            let reason =
                reason.or(via_multifunction[p].then_some(GroupReasons::MULTIFUNCTION_NO_ACS));
            let Some(reason) = reason else { continue };
            for (j, f) in fns.iter().enumerate() {
                if j != p && f.bdf.bus >= sec && f.bdf.bus <= sub {
                    join(&mut uf, p, j, reason);
                }
            }
        }

        // Number the groups by first member and gather their reasons.
        let mut number: [Option<u16>; MAX_FUNCTIONS] = [None; MAX_FUNCTIONS];
        for r in out.reasons.iter_mut() {
            *r = GroupReasons(0);
        }
        for (i, &reason) in why.iter().enumerate().take(n) {
            let root = uf.find(i);
            let g = match number[root] {
                Some(g) => g,
                None => {
                    let g = out.group_count as u16;
                    number[root] = Some(g);
                    out.group_count += 1;
                    g
                }
            };
            out.group[i] = g;
            out.reasons[usize::from(g)] = out.reasons[usize::from(g)].union(reason);
        }
    }

    /// Number of functions analysed.
    pub const fn len(&self) -> usize {
        self.len
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The aliases of the function at `index` (in [`PciDevices::functions`] order).
    pub fn aliases(&self, index: usize) -> Option<&DmaAliases> {
        self.aliases[..self.len].get(index)
    }

    /// The group number of the function at `index`.
    pub fn group_of(&self, index: usize) -> Option<usize> {
        self.group[..self.len].get(index).map(|&g| usize::from(g))
    }

    pub const fn group_count(&self) -> usize {
        self.group_count
    }

    /// Indices of the members of `group`, in enumeration order.
    pub fn members(&self, group: usize) -> impl Iterator<Item = usize> + '_ {
        self.group[..self.len]
            .iter()
            .enumerate()
            .filter(move |&(_, &g)| usize::from(g) == group)
            .map(|(i, _)| i)
    }

    /// Why the members of `group` are together (empty for a group of one).
    pub fn reasons(&self, group: usize) -> GroupReasons {
        if group < self.group_count {
            self.reasons[group]
        } else {
            GroupReasons(0)
        }
    }

    /// Functions whose DMA may carry `rid`: whom a fault on that ID concerns. The function
    /// whose own ID it is comes first.
    pub fn functions_using(&self, rid: u16) -> impl Iterator<Item = usize> + '_ {
        let own = (0..self.len).filter(move |&i| self.aliases[i].as_slice().first() == Some(&rid));
        let aliased = (0..self.len).filter(move |&i| {
            self.aliases[i].as_slice().first() != Some(&rid) && self.aliases[i].contains(rid)
        });
        own.chain(aliased)
    }
}

/// A group given only in part to one owner: some member is unassigned or given to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncompleteGroup<O> {
    pub group: usize,
    /// The owner of the group's first assigned member (enumeration order).
    pub owner: O,
    /// How many members (bridges excepted) are not given to `owner`; see
    /// [`Topology::missing_members`] for which.
    pub missing: usize,
}

impl Topology {
    /// Checks that every IOMMU group is given whole to one owner or not at all: the devices of
    /// a group cannot be isolated from each other, so splitting one between guests (or between
    /// a guest and the hypervisor) would let one reach the other's memory. `owner_of(index)`
    /// says who gets the function at `index` (in [`PciDevices::functions`] order), `None` for
    /// the hypervisor. Bridges are exempt, as VFIO treats driverless bridges: they stay with
    /// the hypervisor, which does no DMA through them. Returns the first incomplete group.
    pub fn check_assignment<O: Copy + PartialEq>(
        &self,
        devices: &PciDevices,
        owner_of: impl Fn(usize) -> Option<O>,
    ) -> Result<(), IncompleteGroup<O>> {
        let fns = devices.functions();
        for group in 0..self.group_count {
            let counted = || {
                self.members(group)
                    .filter(|&i| fns.get(i).is_some_and(|f| !f.is_bridge()))
            };
            let Some(owner) = counted().find_map(&owner_of) else {
                continue;
            };
            let missing = counted().filter(|&i| owner_of(i) != Some(owner)).count();
            if missing > 0 {
                return Err(IncompleteGroup {
                    group,
                    owner,
                    missing,
                });
            }
        }
        Ok(())
    }

    /// The members of `incomplete.group` (bridges excepted) not given to `incomplete.owner`:
    /// the functions a configuration must add to make the assignment valid.
    pub fn missing_members<'a, O: Copy + PartialEq + 'a>(
        &'a self,
        devices: &'a PciDevices,
        incomplete: &IncompleteGroup<O>,
        owner_of: impl Fn(usize) -> Option<O> + 'a,
    ) -> impl Iterator<Item = usize> + 'a {
        let owner = incomplete.owner;
        let fns = devices.functions();
        self.members(incomplete.group).filter(move |&i| {
            fns.get(i).is_some_and(|f| !f.is_bridge()) && owner_of(i) != Some(owner)
        })
    }
}

fn aliases_of(fns: &[PciFunction], above: &[Option<u16>; 256], f: &PciFunction) -> DmaAliases {
    let mut a = DmaAliases::EMPTY;
    a.push(f.bdf.rid());
    for q in quirks(f) {
        if let QuirkKind::Function(n) = q.kind
            && let Some(phantom) = Bdf::new(f.bdf.bus, f.bdf.device, n)
        {
            a.push(phantom.rid());
        }
    }
    let mut bus = f.bdf.bus;
    // Each step moves to a strictly lower bus number (enumeration only follows a bridge to a
    // secondary bus above its own), so this ends within 256 steps even on a bad table.
    while let Some(p) = above[usize::from(bus)] {
        let Some(bridge) = fns.get(usize::from(p)) else {
            break;
        };
        match bridge_kind(bridge) {
            BridgeKind::RootPort | BridgeKind::UpstreamPort | BridgeKind::DownstreamPort => {}
            BridgeKind::PcieToPci => {
                if let Some((sec, _)) = bridge.bridge_buses() {
                    a.push(u16::from(sec) << 8);
                }
                a.push(bridge.bdf.rid());
            }
            BridgeKind::Other => a.push(bridge.bdf.rid()),
        }
        if bridge.bdf.bus >= bus {
            break;
        }
        bus = bridge.bdf.bus;
    }
    a
}

/// Union-find over function indices with path halving.
struct UnionFind {
    parent: [u16; MAX_FUNCTIONS],
}

impl UnionFind {
    fn new(n: usize) -> Self {
        let mut parent = [0; MAX_FUNCTIONS];
        for (i, p) in parent.iter_mut().enumerate().take(n) {
            *p = i as u16;
        }
        Self { parent }
    }

    fn find(&mut self, mut i: usize) -> usize {
        while usize::from(self.parent[i]) != i {
            let grand = self.parent[usize::from(self.parent[i])];
            self.parent[i] = grand;
            i = usize::from(grand);
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        // The lower index becomes the root, so numbering by first member is stable.
        if ra < rb {
            self.parent[rb] = ra as u16;
        } else if rb < ra {
            self.parent[ra] = rb as u16;
        }
    }
}

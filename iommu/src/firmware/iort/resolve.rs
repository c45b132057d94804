//! Following ID mappings (DEN 0049 "ID mappings"): requester ID → StreamID → DeviceID.

use super::{Iort, IortError, MAX_HOPS, Node, NodeKind, NodeType};

/// Which kind of SMMU a translation ended at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmmuKind {
    V1V2,
    V3,
}

/// Where a device's DMA is translated: the SMMU node and the StreamID it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Offset of the SMMU node in the table.
    pub smmu_offset: u32,
    pub kind: SmmuKind,
    pub base_address: u64,
    pub stream_id: u32,
}

/// Where a device's MSIs go: the ITS group node and the DeviceID the ITS sees, plus the SMMU
/// the writes passed through, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiResolution {
    pub its_group_offset: u32,
    pub device_id: u32,
    pub smmu: Option<Resolution>,
}

/// Result of [`Iort::translate`]: the node reached and the ID it receives there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub node_offset: u32,
    pub node_type: NodeType,
    pub id: u32,
    /// Mappings followed (1 for a direct mapping).
    pub hops: u8,
}

/// The next node and ID for `id` leaving `node`, through its range (non-single) mappings.
///
/// Single mappings carry the node's own ID and take no input, so they never translate a
/// passing ID. Some firmware writes the ID count where the specification wants count minus one,
/// making adjacent ranges overlap by their last ID; a range that covers `id` other than as its
/// last ID therefore wins over one that covers it only as its last ID.
fn step(node: &Node<'_>, id: u32) -> Result<(u32, u32), IortError> {
    let mut at_edge = None;
    for m in node.id_mappings().filter(|m| !m.is_single()) {
        let Some(out) = m.map(id) else { continue };
        if id != m.input_last() {
            return Ok((m.output_reference, out));
        }
        at_edge.get_or_insert((m.output_reference, out));
    }
    at_edge.ok_or(IortError::NoMapping {
        node: node.offset(),
        id,
    })
}

impl<'a> Iort<'a> {
    fn node(&self, offset: u32) -> Result<Node<'a>, IortError> {
        self.node_at(offset).ok_or(IortError::NotANode { offset })
    }

    /// Follows mappings from `start` (already holding `id`, after `hops` hops) until a node for
    /// which `stop` holds. Bounded by [`MAX_HOPS`]; a revisited node is reported as a cycle.
    fn walk(
        &self,
        start: Node<'a>,
        id: u32,
        hops: u8,
        stop: fn(NodeType) -> bool,
    ) -> Result<Translation, IortError> {
        let mut visited = [0u32; MAX_HOPS + 1];
        let mut seen = 0usize;
        let mut node = start;
        let mut id = id;
        let mut hops = hops;
        loop {
            if usize::from(hops) >= MAX_HOPS {
                return Err(IortError::TooManyHops {
                    node: node.offset(),
                });
            }
            if let Some(slot) = visited.get_mut(seen) {
                *slot = node.offset();
                seen += 1;
            }
            let (target, out) = step(&node, id)?;
            hops += 1;
            let next = self.node(target)?;
            if stop(next.node_type()) {
                return Ok(Translation {
                    node_offset: target,
                    node_type: next.node_type(),
                    id: out,
                    hops,
                });
            }
            if visited[..seen].contains(&target) {
                return Err(IortError::MappingCycle { node: target });
            }
            node = next;
            id = out;
        }
    }

    /// Translates `id` leaving the node at `node_offset` through the mappings of each node it
    /// reaches, until it arrives at an SMMU (v1/v2 or v3) or an ITS group: the next agent that
    /// interprets the ID (as a StreamID or a DeviceID).
    pub fn translate(&self, node_offset: u32, id: u32) -> Result<Translation, IortError> {
        let start = self.node(node_offset)?;
        self.walk(start, id, 0, is_agent)
    }

    fn resolution(&self, t: Translation) -> Result<Resolution, IortError> {
        let node = self.node(t.node_offset)?;
        let (kind, base_address) = match node.kind() {
            NodeKind::SmmuV1V2(s) => (SmmuKind::V1V2, s.base_address),
            NodeKind::SmmuV3(s) => (SmmuKind::V3, s.base_address),
            _ => {
                return Err(IortError::NotBehindSmmu {
                    node: t.node_offset,
                    node_type: t.node_type,
                });
            }
        };
        Ok(Resolution {
            smmu_offset: t.node_offset,
            kind,
            base_address,
            stream_id: t.id,
        })
    }

    /// The SMMU and StreamID for PCI requester ID `rid` (bus << 8 | device << 3 | function) on
    /// PCI segment `segment`. Fails with [`IortError::NotBehindSmmu`] if the root complex sends
    /// the ID straight to an ITS group.
    pub fn resolve_rid(&self, segment: u16, rid: u32) -> Result<Resolution, IortError> {
        let t = self.translate_rid(segment, rid)?;
        self.resolution(t)
    }

    fn translate_rid(&self, segment: u16, rid: u32) -> Result<Translation, IortError> {
        let segment = u32::from(segment);
        // Several root complexes may share a segment (e.g. split bus ranges); use the first
        // whose mappings cover the ID.
        let mut last_err = IortError::NoRootComplex { segment };
        for rc in self
            .nodes()
            .filter(|n| matches!(n.kind(), NodeKind::RootComplex(rc) if rc.pci_segment == segment))
        {
            match self.walk(rc, rid, 0, is_agent) {
                Err(e @ IortError::NoMapping { node, .. }) if node == rc.offset() => last_err = e,
                other => return other,
            }
        }
        Err(last_err)
    }

    /// The first hop of a named component: its single mapping (its only ID) if it has one,
    /// otherwise its first range mapping, taken at its input base.
    fn named_component_first_hop(&self, name: &str) -> Result<Translation, IortError> {
        let nc = self
            .named_component(name)
            .ok_or(IortError::NoNamedComponent)?;
        if let Some(single) = nc.id_mappings().find(|m| m.is_single()) {
            let next = self.node(single.output_reference)?;
            if is_agent(next.node_type()) {
                return Ok(Translation {
                    node_offset: single.output_reference,
                    node_type: next.node_type(),
                    id: single.output_base,
                    hops: 1,
                });
            }
            return self.walk(next, single.output_base, 1, is_agent);
        }
        let first = nc.id_mappings().next().ok_or(IortError::NoMapping {
            node: nc.offset(),
            id: 0,
        })?;
        self.walk(nc, first.input_base, 0, is_agent)
    }

    /// The SMMU and (first) StreamID of the named component whose object name is `name`. A
    /// component with several ranges has more StreamIDs; use [`Iort::translate`] on each
    /// mapping's input range for those.
    pub fn resolve_named_component(&self, name: &str) -> Result<Resolution, IortError> {
        let t = self.named_component_first_hop(name)?;
        self.resolution(t)
    }

    /// Continues from an agent reached by a walk to the ITS group: an SMMU's range mappings
    /// translate StreamIDs into DeviceIDs.
    fn onward_to_its(&self, t: Translation) -> Result<MsiResolution, IortError> {
        if t.node_type == NodeType::ItsGroup {
            return Ok(MsiResolution {
                its_group_offset: t.node_offset,
                device_id: t.id,
                smmu: None,
            });
        }
        let smmu = self.resolution(t)?;
        let node = self.node(t.node_offset)?;
        let its = self.walk(node, t.id, t.hops, |ty| ty == NodeType::ItsGroup)?;
        Ok(MsiResolution {
            its_group_offset: its.node_offset,
            device_id: its.id,
            smmu: Some(smmu),
        })
    }

    /// Where MSIs from PCI requester ID `rid` on `segment` land: ITS group and DeviceID.
    pub fn resolve_msi(&self, segment: u16, rid: u32) -> Result<MsiResolution, IortError> {
        let t = self.translate_rid(segment, rid)?;
        self.onward_to_its(t)
    }

    /// Where MSIs of the named component `name` land.
    pub fn resolve_named_component_msi(&self, name: &str) -> Result<MsiResolution, IortError> {
        let t = self.named_component_first_hop(name)?;
        self.onward_to_its(t)
    }

    /// Where the node's own MSIs land (an SMMUv3's event/GERR/sync MSIs, a PMCG's overflow
    /// MSI): through its own-ID mapping ([`Node::own_id_mapping_index`]) to an ITS group.
    pub fn node_msi(&self, node_offset: u32) -> Result<MsiResolution, IortError> {
        let node = self.node(node_offset)?;
        let m = node
            .own_id_mapping_index()
            .and_then(|i| node.id_mapping(i))
            .ok_or(IortError::NoMapping {
                node: node_offset,
                id: 0,
            })?;
        let next = self.node(m.output_reference)?;
        if next.node_type() == NodeType::ItsGroup {
            return Ok(MsiResolution {
                its_group_offset: m.output_reference,
                device_id: m.output_base,
                smmu: None,
            });
        }
        let its = self.walk(next, m.output_base, 1, |ty| ty == NodeType::ItsGroup)?;
        Ok(MsiResolution {
            its_group_offset: its.node_offset,
            device_id: its.id,
            smmu: None,
        })
    }
}

fn is_agent(ty: NodeType) -> bool {
    ty.is_smmu() || ty == NodeType::ItsGroup
}

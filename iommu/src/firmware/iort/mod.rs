//! ACPI IO Remapping Table (IORT), Arm DEN 0049 (table revisions 0..=7, issues D to E.g).
//!
//! The IORT describes how the IDs that devices put on the interconnect (PCI requester IDs,
//! named-component IDs) are rewritten on their way to the SMMUs (StreamIDs) and the GIC ITSs
//! (DeviceIDs). It is a flat array of nodes (DEN 0049 "IORT nodes"); every node but an ITS group
//! carries an array of ID mappings ("ID mappings") whose "output reference" names the next node by its offset.
//!
//! [`Iort::parse`] validates the whole table eagerly: header and checksum, the node array, every
//! node's length against its type and revision, every array a node references, and every output
//! reference, and that the output references form no loop. Afterwards nothing that reads the
//! table can fail for a structural reason; only the questions asked of it can (an ID no mapping
//! covers, a chain longer than [`MAX_HOPS`]).
//!
//! Translation ([`Iort::translate`], [`Iort::resolve_rid`], ...) follows mappings node by node.
//! Every walk is bounded by [`MAX_HOPS`] and still detects revisits, so it would end even on a
//! loop `parse` had missed.

mod dump;
mod loops;
mod node;
mod resolve;
#[cfg(test)]
pub(crate) mod tests;

use core::fmt;

pub use node::{
    ID_MAPPING_LEN, IdMapping, IdMappings, Interrupt, Interrupts, ItsGroup, MemoryAccess,
    MemoryRange, MemoryRanges, NODE_HEADER_LEN, NamedComponent, Node, NodeKind, NodeType, Pmcg,
    Rmr, RootComplex, SmmuV1V2, SmmuV2Model, SmmuV3, SmmuV3Model, U32s,
};
pub use resolve::{MsiResolution, Resolution, SmmuKind, Translation};

use super::acpi::{Reader, SdtHeader, TableError, validate_table};

/// Length of the IORT header: the ACPI header, node count, node array offset, reserved word
/// (DEN 0049, "IORT table structure").
pub const IORT_HEADER_LEN: usize = 48;

/// Most nodes a translation may pass through. Real topologies need two hops (root complex or
/// named component → SMMU → ITS group); the bound only exists to stop walks firmware sends
/// round in circles.
pub const MAX_HOPS: usize = 16;

/// Everything that can be wrong with an IORT, or with a question asked of it. Offsets are from
/// the start of the table, as output references are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IortError {
    /// The ACPI header: truncated, wrong signature, length or checksum.
    Table(TableError),
    /// The node array offset points into the IORT header or past the table.
    BadNodeArray { offset: u32, count: u32 },
    /// More nodes declared than the bytes after the node array offset can hold.
    TooManyNodes { count: u32, max: u32 },
    /// A node (or its header) extends past the end of the table.
    NodeTruncated {
        offset: u32,
        length: u32,
        available: u32,
    },
    /// A node's length is less than its type and revision require (length 0 included).
    NodeTooShort {
        offset: u32,
        node_type: u8,
        revision: u8,
        length: u16,
        needed: u32,
    },
    /// The ID array overlaps the node's fixed fields or ends past the node.
    IdArrayOutOfBounds {
        node: u32,
        mapping_offset: u32,
        count: u32,
    },
    /// Another array of the node (ITS identifiers, interrupts, memory ranges) leaves it.
    ArrayOutOfBounds { node: u32, what: &'static str },
    /// A named component's object name has no NUL terminator before the ID array.
    UnterminatedName { node: u32 },
    /// A mapping's input or output range goes past 2^32 - 1.
    IdRangeOverflow { node: u32, index: u32 },
    /// A mapping's output reference points outside the table.
    OutputReferenceOutsideTable {
        node: u32,
        index: u32,
        reference: u32,
    },
    /// A mapping's output reference is inside the table but not at the start of a node.
    OutputReferenceNotANode {
        node: u32,
        index: u32,
        reference: u32,
    },
    /// A PMCG's node reference is not the start of a node.
    BadNodeReference { node: u32, reference: u32 },
    /// An SMMUv3's DeviceID mapping index, which the node says is in use, names no mapping.
    DeviceIdIndexOutOfRange { node: u32, index: u32, count: u32 },
    /// No root complex node describes this PCI segment.
    NoRootComplex { segment: u32 },
    /// No named component has this object name.
    NoNamedComponent,
    /// The offset given is not the start of a node.
    NotANode { offset: u32 },
    /// No (non-single) mapping of this node covers the ID.
    NoMapping { node: u32, id: u32 },
    /// The walk reached a node that is not an SMMU where an SMMU was needed (typically an ITS
    /// group: the device's DMA is not translated).
    NotBehindSmmu { node: u32, node_type: NodeType },
    /// The walk came back to a node it had already passed.
    MappingCycle { node: u32 },
    /// Found by `parse`: mapping `index` of `node` references `reference`, from which output
    /// references lead back to `node` (`reference == node` for a node mapping to itself).
    MappingLoop {
        node: u32,
        index: u32,
        reference: u32,
    },
    /// No memory for the loop check's per-node state (one byte and one offset per node).
    NoMemoryForLoopCheck { nodes: u32 },
    /// The walk went through more than [`MAX_HOPS`] nodes.
    TooManyHops { node: u32 },
}

impl From<TableError> for IortError {
    fn from(e: TableError) -> Self {
        IortError::Table(e)
    }
}

impl fmt::Display for IortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IortError::Table(e) => write!(f, "IORT: {e}"),
            IortError::BadNodeArray { offset, count } => {
                write!(
                    f,
                    "IORT: node array of {count} nodes at bad offset {offset:#x}"
                )
            }
            IortError::TooManyNodes { count, max } => {
                write!(f, "IORT: {count} nodes declared but at most {max} fit")
            }
            IortError::NodeTruncated {
                offset,
                length,
                available,
            } => write!(
                f,
                "IORT node at {offset:#x}: {length} bytes needed, only {available} left in the table"
            ),
            IortError::NodeTooShort {
                offset,
                node_type,
                revision,
                length,
                needed,
            } => write!(
                f,
                "IORT node at {offset:#x} (type {node_type}, revision {revision}): length {length} < {needed}"
            ),
            IortError::IdArrayOutOfBounds {
                node,
                mapping_offset,
                count,
            } => write!(
                f,
                "IORT node at {node:#x}: ID array of {count} mappings at +{mapping_offset:#x} is outside the node data"
            ),
            IortError::ArrayOutOfBounds { node, what } => {
                write!(f, "IORT node at {node:#x}: {what} is outside the node")
            }
            IortError::UnterminatedName { node } => {
                write!(
                    f,
                    "IORT named component at {node:#x}: object name is not NUL-terminated"
                )
            }
            IortError::IdRangeOverflow { node, index } => {
                write!(
                    f,
                    "IORT node at {node:#x}: ID mapping {index} overflows 32 bits"
                )
            }
            IortError::OutputReferenceOutsideTable {
                node,
                index,
                reference,
            } => write!(
                f,
                "IORT node at {node:#x}: ID mapping {index} references {reference:#x}, outside the table"
            ),
            IortError::OutputReferenceNotANode {
                node,
                index,
                reference,
            } => write!(
                f,
                "IORT node at {node:#x}: ID mapping {index} references {reference:#x}, which is not a node"
            ),
            IortError::BadNodeReference { node, reference } => {
                write!(
                    f,
                    "IORT PMCG at {node:#x}: node reference {reference:#x} is not a node"
                )
            }
            IortError::DeviceIdIndexOutOfRange { node, index, count } => write!(
                f,
                "IORT SMMUv3 at {node:#x}: DeviceID mapping index {index} but {count} mappings"
            ),
            IortError::NoRootComplex { segment } => {
                write!(f, "IORT: no root complex for PCI segment {segment}")
            }
            IortError::NoNamedComponent => write!(f, "IORT: no named component of that name"),
            IortError::NotANode { offset } => write!(f, "IORT: no node at offset {offset:#x}"),
            IortError::NoMapping { node, id } => {
                write!(f, "IORT node at {node:#x}: no ID mapping covers ID {id:#x}")
            }
            IortError::NotBehindSmmu { node, node_type } => write!(
                f,
                "IORT: translation reached the {} at {node:#x} without passing an SMMU",
                node_type.name()
            ),
            IortError::MappingCycle { node } => {
                write!(f, "IORT: ID mappings loop back to the node at {node:#x}")
            }
            IortError::MappingLoop {
                node,
                index,
                reference,
            } if node == reference => write!(
                f,
                "IORT node at {node:#x}: ID mapping {index} references the node itself (a loop)"
            ),
            IortError::MappingLoop {
                node,
                index,
                reference,
            } => write!(
                f,
                "IORT node at {node:#x}: ID mapping {index} references the node at \
                 {reference:#x}, whose mappings lead back (a loop)"
            ),
            IortError::NoMemoryForLoopCheck { nodes } => write!(
                f,
                "IORT: no memory to check the ID mappings of {nodes} nodes for loops"
            ),
            IortError::TooManyHops { node } => {
                write!(
                    f,
                    "IORT: translation still at {node:#x} after {MAX_HOPS} hops"
                )
            }
        }
    }
}

/// A validated IORT.
#[derive(Clone, Copy, Debug)]
pub struct Iort<'a> {
    header: SdtHeader,
    table: &'a [u8],
    node_count: u32,
    node_array_offset: u32,
}

impl<'a> Iort<'a> {
    /// Validates `bytes` as an IORT (trailing bytes past the header length are ignored) and
    /// every node in it; see the module documentation for what is checked.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, IortError> {
        let (header, table) = validate_table(bytes, b"IORT")?;
        let r = Reader::new(table);
        if table.len() < IORT_HEADER_LEN {
            return Err(TableError::Truncated {
                needed: IORT_HEADER_LEN,
                available: table.len(),
            }
            .into());
        }
        let node_count = r.u32(36)?;
        let node_array_offset = r.u32(40)?;
        let iort = Iort {
            header,
            table,
            node_count,
            node_array_offset,
        };
        if node_count == 0 {
            return Ok(iort);
        }
        let start = node_array_offset as usize;
        if start < IORT_HEADER_LEN || start > table.len() {
            return Err(IortError::BadNodeArray {
                offset: node_array_offset,
                count: node_count,
            });
        }
        // Every node has at least a header, which bounds the count before any node is read.
        let max = ((table.len() - start) / NODE_HEADER_LEN) as u32;
        if node_count > max {
            return Err(IortError::TooManyNodes {
                count: node_count,
                max,
            });
        }
        // Pass 1: each node on its own. Nodes are packed back to back ("IORT nodes"), so the walk
        // advances by each validated length and cannot revisit or skip bytes.
        let mut offset = start;
        for _ in 0..node_count {
            let node = Node::decode(table, offset, header.revision)?;
            offset += node.length();
        }
        // Pass 2: references between nodes, now that all node starts are known to be sound.
        for node in iort.nodes() {
            for (index, m) in node.id_mappings().enumerate() {
                let index = index as u32;
                let overflows = m.input_base.checked_add(m.id_count_minus_one).is_none()
                    || m.output_base.checked_add(m.id_count_minus_one).is_none();
                // A single mapping's input range is unused; only its output base is.
                if !m.is_single() && overflows {
                    return Err(IortError::IdRangeOverflow {
                        node: node.offset(),
                        index,
                    });
                }
                iort.check_reference(node.offset(), index, m.output_reference)?;
            }
            if let NodeKind::Pmcg(p) = node.kind()
                && iort.node_at(p.node_reference).is_none()
            {
                return Err(IortError::BadNodeReference {
                    node: node.offset(),
                    reference: p.node_reference,
                });
            }
            node.check_device_id_index()?;
        }
        // Pass 3: the references, now known to name nodes, must not loop.
        iort.check_no_mapping_loops()?;
        Ok(iort)
    }

    fn check_reference(&self, node: u32, index: u32, reference: u32) -> Result<(), IortError> {
        if reference as usize >= self.table.len() {
            return Err(IortError::OutputReferenceOutsideTable {
                node,
                index,
                reference,
            });
        }
        if self.node_at(reference).is_none() {
            return Err(IortError::OutputReferenceNotANode {
                node,
                index,
                reference,
            });
        }
        Ok(())
    }

    pub const fn header(&self) -> &SdtHeader {
        &self.header
    }

    /// The IORT revision from the ACPI header (0: issue D and earlier, 3: E.b, ... 7: E.f+).
    pub const fn revision(&self) -> u8 {
        self.header.revision
    }

    /// The table bytes, trimmed to the header length.
    pub const fn bytes(&self) -> &'a [u8] {
        self.table
    }

    pub const fn node_count(&self) -> u32 {
        self.node_count
    }

    pub const fn node_array_offset(&self) -> u32 {
        self.node_array_offset
    }

    /// All nodes, in table order.
    pub fn nodes(&self) -> Nodes<'a> {
        Nodes {
            table: self.table,
            next: self.node_array_offset as usize,
            remaining: self.node_count,
            table_revision: self.header.revision,
        }
    }

    /// The node starting at `offset`, if one does.
    pub fn node_at(&self, offset: u32) -> Option<Node<'a>> {
        // Nodes are in ascending offset order, so the search can stop once it has passed.
        self.nodes()
            .take_while(|n| n.offset() <= offset)
            .find(|n| n.offset() == offset)
    }

    /// Bytes after the last node and before the end of the table (firmware padding).
    pub fn trailing_bytes(&self) -> usize {
        let end = self
            .nodes()
            .last()
            .map_or(IORT_HEADER_LEN, |n| n.offset() as usize + n.length());
        self.table.len().saturating_sub(end)
    }

    /// The root complex node of PCI segment `segment`.
    pub fn root_complex(&self, segment: u32) -> Option<Node<'a>> {
        self.nodes()
            .find(|n| matches!(n.kind(), NodeKind::RootComplex(rc) if rc.pci_segment == segment))
    }

    /// The named component whose ACPI object name is `name` (e.g. `\_SB_.USB0`).
    pub fn named_component(&self, name: &str) -> Option<Node<'a>> {
        self.nodes().find(
            |n| matches!(n.kind(), NodeKind::NamedComponent(nc) if nc.name == name.as_bytes()),
        )
    }
}

/// Iterator over the nodes of an [`Iort`].
#[derive(Clone)]
pub struct Nodes<'a> {
    table: &'a [u8],
    next: usize,
    remaining: u32,
    table_revision: u8,
}

impl<'a> Iterator for Nodes<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        if self.remaining == 0 {
            return None;
        }
        // Parsing validated every node, so this cannot fail; if it somehow did, ending the
        // iteration is the safe answer.
        match Node::decode(self.table, self.next, self.table_revision) {
            Ok(node) => {
                self.remaining -= 1;
                self.next += node.length();
                Some(node)
            }
            Err(_) => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining as usize))
    }
}

//! Parse-time check that the IORT's ID mappings form no loop.
//!
//! DEN 0049 ("ID mappings") routes IDs one way: from the nodes that issue them (root complexes,
//! named components, PMCGs, RMRs) through SMMUs to ITS groups, which have no mappings. A loop of
//! output references (a node mapping to itself, two SMMUs sending IDs to each other) has no
//! meaning in that model, so [`super::Iort::parse`] rejects it wherever it is, whether or not
//! the ID ranges of today's mappings let an ID travel all the way round: the resolvers are
//! bounded anyway, but a loop found only when a device happens to walk it is a table the boot
//! should have refused.

use alloc::vec::Vec;

use super::{Iort, IortError, Node};

/// Depth-first colours of the loop search.
const UNSEEN: u8 = 0;
/// On the current path: reaching it again closes a loop.
const ON_PATH: u8 = 1;
/// Everything reachable from it has been searched and is loop-free.
const DONE: u8 = 2;

impl Iort<'_> {
    /// Searches the graph whose edges are the ID mappings' output references for a loop.
    /// Every node and every mapping is visited once (a depth-first search with an explicit
    /// stack, so firmware cannot make it recurse deeply or run long). Needs the output
    /// references already checked to name nodes.
    pub(super) fn check_no_mapping_loops(&self) -> Result<(), IortError> {
        let count = self.node_count;
        let n = count as usize;
        let mut offsets: Vec<u32> = Vec::new();
        let mut colour: Vec<u8> = Vec::new();
        let mut stack: Vec<(usize, Node<'_>, u32)> = Vec::new();
        // Reserved up front so the search never allocates (or fails to) half-way; a node is
        // pushed at most once, so the stack never outgrows `n`.
        if offsets.try_reserve_exact(n).is_err()
            || colour.try_reserve_exact(n).is_err()
            || stack.try_reserve_exact(n).is_err()
        {
            return Err(IortError::NoMemoryForLoopCheck { nodes: count });
        }
        // Nodes are in ascending offset order, so `offsets` is sorted for the binary search.
        offsets.extend(self.nodes().map(|node| node.offset()));
        colour.resize(offsets.len(), UNSEEN);
        for (root_index, root) in self.nodes().enumerate() {
            if colour.get(root_index) != Some(&UNSEEN) {
                continue;
            }
            set(&mut colour, root_index, ON_PATH);
            stack.push((root_index, root, 0));
            while let Some(top) = stack.last_mut() {
                let (index, node, next) = *top;
                let Some(mapping) = node.id_mapping(next) else {
                    set(&mut colour, index, DONE);
                    stack.pop();
                    continue;
                };
                top.2 += 1;
                let reference = mapping.output_reference;
                // `parse` checked every reference names a node; one that somehow did not
                // could not be part of a loop either.
                let Ok(target) = offsets.binary_search(&reference) else {
                    continue;
                };
                match colour.get(target).copied() {
                    Some(ON_PATH) => {
                        return Err(IortError::MappingLoop {
                            node: node.offset(),
                            index: next,
                            reference,
                        });
                    }
                    Some(UNSEEN) => {
                        let next_node =
                            Node::decode(self.table, reference as usize, self.revision())?;
                        set(&mut colour, target, ON_PATH);
                        stack.push((target, next_node, 0));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn set(colour: &mut [u8], index: usize, value: u8) {
    if let Some(c) = colour.get_mut(index) {
        *c = value;
    }
}

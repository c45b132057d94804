//! Property tests: real tables mutated and truncated (with the checksum re-sealed, so the
//! mutations reach the node parser) never make the parser, the dump or the resolvers panic or
//! loop.

use proptest::prelude::*;
use std::vec::Vec;

use super::builder::finish;
use super::real::{all_iort_files, load};
use super::{dump_string, qemu_virt_iort};
use crate::firmware::iort::{Iort, NodeKind};

/// Exercises every read-only entry point of a parsed table.
fn exercise(iort: &Iort<'_>) {
    let _ = dump_string(iort);
    for seg in 0..8u16 {
        for rid in [
            0u32,
            1,
            8,
            0xff,
            0x100,
            0x8000,
            0xffff,
            0x8703_0000,
            u32::MAX,
        ] {
            let _ = iort.resolve_rid(seg, rid);
            let _ = iort.resolve_msi(seg, rid);
        }
    }
    for n in iort.nodes() {
        let _ = iort.translate(n.offset(), 0);
        let _ = iort.node_msi(n.offset());
        for m in n.id_mappings() {
            let _ = iort.translate(n.offset(), m.input_base);
            let _ = iort.translate(n.offset(), m.input_last());
        }
        if let NodeKind::NamedComponent(nc) = n.kind()
            && let Some(name) = nc.name_str()
        {
            let _ = iort.resolve_named_component(name);
            let _ = iort.resolve_named_component_msi(name);
        }
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = all_iort_files().iter().map(|f| load(f)).collect();
    c.push(qemu_virt_iort());
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_real_tables_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in prop::option::of(any::<prop::sample::Index>()),
        reseal in any::<bool>(),
    ) {
        let corpus = corpus();
        let mut t = pick.get(&corpus).clone();
        for (at, byte) in edits {
            let i = at.index(t.len());
            t[i] = byte;
        }
        if let Some(cut) = cut {
            t.truncate(cut.index(t.len() + 1).max(10));
        }
        if reseal && t.len() >= 10 {
            finish(&mut t);
        }
        if let Ok(iort) = Iort::parse(&t) {
            exercise(&iort);
        }
    }

    #[test]
    fn mutated_node_fields_never_panic(
        pick in any::<prop::sample::Index>(),
        node in any::<prop::sample::Index>(),
        field in 0usize..80,
        value in prop_oneof![Just(0u32), Just(1), Just(0xffff), Just(u32::MAX), any::<u32>()],
    ) {
        // Aim at the first 80 bytes of a node: lengths, offsets, counts and references.
        let corpus = corpus();
        let mut t = pick.get(&corpus).clone();
        let starts: Vec<usize> = Iort::parse(&t).unwrap().nodes().map(|n| n.offset() as usize).collect();
        let at = node.get(&starts) + field;
        if at + 4 <= t.len() {
            t[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        finish(&mut t);
        if let Ok(iort) = Iort::parse(&t) {
            exercise(&iort);
        }
    }

    #[test]
    fn random_bodies_behind_a_valid_header_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..600),
        count in 0u32..40,
    ) {
        let mut t = super::builder::iort_header(3, count, 48);
        t.extend_from_slice(&body);
        finish(&mut t);
        if let Ok(iort) = Iort::parse(&t) {
            exercise(&iort);
        }
    }
}

#[test]
fn every_real_table_survives_exercise() {
    for t in corpus() {
        let iort = Iort::parse(&t).unwrap();
        exercise(&iort);
    }
}

//! Arbitrary bytes into the IORT parser. A table that parses must then survive everything a
//! consumer does with it: iterating nodes and mappings, dumping, and resolving IDs (which
//! follows output references and must stay bounded on cyclic mappings).
#![no_main]

use core::fmt::{self, Write};

use iommu::firmware::iort::{Iort, NodeKind};
use libfuzzer_sys::fuzz_target;

/// Counts the dump's bytes instead of keeping them; only panics and hangs matter here.
struct Sink(usize);

impl Write for Sink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.wrapping_add(s.len());
        Ok(())
    }
}

fn exercise(bytes: &[u8]) {
    let Ok(iort) = Iort::parse(bytes) else { return };
    let mut sink = Sink(0);
    iort.dump(&mut sink)
        .expect("dumping a parsed table cannot fail");
    // Requester IDs around the interesting edges (0, bus boundaries, 16-bit limit, the
    // Qualcomm 0x8703xxxx style IDs, the top) on the first few segments.
    for segment in 0..4u16 {
        for rid in (0..0x20u32)
            .chain([0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x1_0000, 0x8703_0000])
            .chain([u32::MAX - 1, u32::MAX])
        {
            let _ = iort.resolve_rid(segment, rid);
            let _ = iort.resolve_msi(segment, rid);
        }
    }
    for node in iort.nodes() {
        let _ = iort.node_msi(node.offset());
        for m in node.id_mappings() {
            let _ = iort.translate(node.offset(), m.input_base);
            let _ = iort.translate(node.offset(), m.input_last());
        }
        if let NodeKind::NamedComponent(nc) = node.kind()
            && let Some(name) = nc.name_str()
        {
            let _ = iort.resolve_named_component(name);
            let _ = iort.resolve_named_component_msi(name);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    // A random mutation almost always breaks the checksum, which stops the input at the ACPI
    // header; a copy with length and checksum repaired lets the node checks see it too.
    if data.len() >= 10 && data.len() <= 1 << 16 {
        let mut fixed = data.to_vec();
        fixed[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
        fixed[9] = 0;
        let sum = fixed.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        fixed[9] = 0u8.wrapping_sub(sum);
        exercise(&fixed);
    }
});

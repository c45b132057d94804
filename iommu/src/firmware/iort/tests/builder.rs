//! Builds IORTs byte by byte from the layouts of DEN 0049, independently of the parser: the
//! offsets below are written out from the specification tables, not taken from the parser's
//! constants, so a parser that misplaces a field fails the tests.

use std::vec::Vec;

pub fn le16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn le32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn le64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Sets the ACPI length field to the buffer size and fixes the checksum.
pub fn finish(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
}

/// The 36-byte ACPI header (ACPI 6.5 Table 5.4) followed by the IORT header fields of DEN 0049
/// (node count, node array offset, reserved). Length and checksum are filled by [`finish`].
pub fn iort_header(revision: u8, node_count: u32, node_offset: u32) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(b"IORT");
    le32(&mut t, 0); // length
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(b"TESTOE"); // OEM ID
    t.extend_from_slice(b"SYNTHIRT"); // OEM table ID
    le32(&mut t, 1); // OEM revision
    t.extend_from_slice(b"RUST"); // creator ID
    le32(&mut t, 0x2024_0101); // creator revision
    le32(&mut t, node_count);
    le32(&mut t, node_offset);
    le32(&mut t, 0); // reserved
    assert_eq!(t.len(), 48);
    t
}

/// Where an ID mapping (or a PMCG node reference) points.
#[derive(Clone, Copy)]
pub enum Target {
    /// The node with this index in [`Table::nodes`].
    Node(usize),
    /// A raw table offset (for malformed tables).
    Raw(u32),
}

#[derive(Clone, Copy)]
pub struct Map {
    pub input: u32,
    /// The "Number of IDs" field: count minus one.
    pub num: u32,
    pub output: u32,
    pub target: Target,
    pub flags: u32,
}

pub fn map(input: u32, num: u32, output: u32, target: usize) -> Map {
    Map {
        input,
        num,
        output,
        target: Target::Node(target),
        flags: 0,
    }
}

pub fn single(output: u32, target: usize) -> Map {
    Map {
        input: 0,
        num: 0,
        output,
        target: Target::Node(target),
        flags: 1,
    }
}

/// One node: header fields, the node-specific bytes that follow the 16-byte header, the
/// mappings (placed right after `body`), and bytes after the mappings.
#[derive(Clone)]
pub struct NodeSpec {
    pub ty: u8,
    pub rev: u8,
    pub id: u32,
    pub body: Vec<u8>,
    pub maps: Vec<Map>,
    pub tail: Vec<u8>,
    /// (position in `body`, target): u32 node offsets patched in once the layout is known.
    pub refs: Vec<(usize, Target)>,
}

impl NodeSpec {
    pub fn new(ty: u8, rev: u8, body: Vec<u8>) -> Self {
        NodeSpec {
            ty,
            rev,
            id: 0,
            body,
            maps: Vec::new(),
            tail: Vec::new(),
            refs: Vec::new(),
        }
    }
    pub fn maps(mut self, maps: &[Map]) -> Self {
        self.maps = maps.to_vec();
        self
    }
    pub fn id(mut self, id: u32) -> Self {
        self.id = id;
        self
    }
    pub fn len(&self) -> usize {
        16 + self.body.len() + 20 * self.maps.len() + self.tail.len()
    }
}

pub struct Table {
    pub revision: u8,
    pub nodes: Vec<NodeSpec>,
}

impl Table {
    pub fn offsets(&self) -> Vec<u32> {
        let mut off = 48u32;
        self.nodes
            .iter()
            .map(|n| {
                let o = off;
                off += n.len() as u32;
                o
            })
            .collect()
    }

    pub fn build(&self) -> Vec<u8> {
        let offs = self.offsets();
        let resolve = |t: Target| match t {
            Target::Node(i) => offs[i],
            Target::Raw(r) => r,
        };
        let mut t = iort_header(self.revision, self.nodes.len() as u32, 48);
        for n in &self.nodes {
            t.push(n.ty);
            le16(&mut t, n.len() as u16);
            t.push(n.rev);
            le32(&mut t, n.id);
            le32(&mut t, n.maps.len() as u32);
            le32(
                &mut t,
                if n.maps.is_empty() {
                    0
                } else {
                    16 + n.body.len() as u32
                },
            );
            let mut body = n.body.clone();
            for &(pos, target) in &n.refs {
                body[pos..pos + 4].copy_from_slice(&resolve(target).to_le_bytes());
            }
            t.extend_from_slice(&body);
            for m in &n.maps {
                le32(&mut t, m.input);
                le32(&mut t, m.num);
                le32(&mut t, m.output);
                le32(&mut t, resolve(m.target));
                le32(&mut t, m.flags);
            }
            t.extend_from_slice(&n.tail);
        }
        finish(&mut t);
        t
    }
}

// Node bodies (the bytes after the 16-byte node header), field by field per the DEN 0049 node layouts.

/// ITS group node: number of ITSs, then the identifiers.
pub fn its_group(ids: &[u32]) -> NodeSpec {
    let mut b = Vec::new();
    le32(&mut b, ids.len() as u32);
    for &id in ids {
        le32(&mut b, id);
    }
    NodeSpec::new(0, 1, b)
}

/// Memory access properties: CCA u32, allocation hints u8, reserved u16, MAF u8.
fn memory_access(b: &mut Vec<u8>, cca: u32, hints: u8, maf: u8) {
    le32(b, cca);
    b.push(hints);
    le16(b, 0);
    b.push(maf);
}

/// Named component node: flags @16, memory access @20, address size limit @28, name @29.
/// The name is NUL-terminated and zero-padded to `name_field` bytes.
pub fn named_component(flags: u32, limit: u8, name: &str, name_field: usize) -> NodeSpec {
    let mut b = Vec::new();
    le32(&mut b, flags);
    memory_access(&mut b, 1, 0, 0);
    b.push(limit);
    b.extend_from_slice(name.as_bytes());
    b.resize(13 + name_field.max(name.len() + 1), 0);
    NodeSpec::new(1, 4, b)
}

/// Root complex node: memory access @16, ATS attribute @24, segment @28; revision 1 adds
/// the memory address size limit @32 (+3 reserved, of which rev 2 makes @33..35 the PASID
/// capabilities); revision 4 adds flags @36.
pub fn root_complex(rev: u8, segment: u32, ats: u32, limit: u8, pasid_caps: u16) -> NodeSpec {
    let mut b = Vec::new();
    memory_access(&mut b, 1, 0, 3);
    le32(&mut b, ats);
    le32(&mut b, segment);
    if rev >= 1 {
        b.push(limit);
        le16(&mut b, if rev >= 2 { pasid_caps } else { 0 });
        b.push(0);
    }
    if rev >= 4 {
        le32(&mut b, 0);
    }
    NodeSpec::new(2, rev, b)
}

/// SMMUv3 node: base @16, flags @24, reserved @28, VATOS @32, model @40, event/PRI/GERR/
/// sync GSIVs @44..60; revision 1+ adds proximity domain @60 and DeviceID mapping index @64.
pub fn smmu_v3(rev: u8, base: u64, flags: u32, gsivs: [u32; 4], pxm: u32, index: u32) -> NodeSpec {
    let mut b = Vec::new();
    le64(&mut b, base);
    le32(&mut b, flags);
    le32(&mut b, 0);
    le64(&mut b, 0);
    le32(&mut b, 0); // model: generic
    for g in gsivs {
        le32(&mut b, g);
    }
    if rev >= 1 {
        le32(&mut b, pxm);
        le32(&mut b, index);
    }
    NodeSpec::new(4, rev, b)
}

/// SMMUv1/v2 node: base @16, span @24, model @32, flags @36, global interrupt array
/// reference @40, context interrupt count/reference @44/@48, PMU count/reference @52/@56; then
/// (here) the global array @60 (NSgIrpt, NSgCfgIrpt), context array, PMU array, each entry a
/// GSIV and flags.
pub fn smmu_v2(
    base: u64,
    span: u64,
    model: u32,
    flags: u32,
    global: [u32; 2],
    context: &[u32],
    pmu: &[u32],
) -> NodeSpec {
    let ctx_off = 60 + 16;
    let pmu_off = ctx_off + 8 * context.len() as u32;
    let mut b = Vec::new();
    le64(&mut b, base);
    le64(&mut b, span);
    le32(&mut b, model);
    le32(&mut b, flags);
    le32(&mut b, 60);
    le32(&mut b, context.len() as u32);
    le32(&mut b, ctx_off);
    le32(&mut b, pmu.len() as u32);
    le32(&mut b, if pmu.is_empty() { 0 } else { pmu_off });
    for g in global {
        le32(&mut b, g);
        le32(&mut b, 0); // level
    }
    for &g in context.iter().chain(pmu) {
        le32(&mut b, g);
        le32(&mut b, 1); // edge
    }
    NodeSpec::new(3, 0, b)
}

/// PMCG node: page 0 base @16, overflow GSIV @24, node reference @28, page 1 base @32.
pub fn pmcg(page0: u64, gsiv: u32, node: Target, page1: u64) -> NodeSpec {
    let mut b = Vec::new();
    le64(&mut b, page0);
    le32(&mut b, gsiv);
    le32(&mut b, 0);
    le64(&mut b, page1);
    let mut n = NodeSpec::new(5, 1, b);
    n.refs.push((12, node));
    n
}

/// RMR node: flags @16, descriptor count @20, descriptor array reference @24; the
/// descriptors (base u64, length u64, reserved u32) are placed after the mappings.
pub fn rmr(flags: u32, ranges: &[(u64, u64)], maps: &[Map]) -> NodeSpec {
    let desc_off = 28 + 20 * maps.len() as u32;
    let mut b = Vec::new();
    le32(&mut b, flags);
    le32(&mut b, ranges.len() as u32);
    le32(&mut b, desc_off);
    let mut tail = Vec::new();
    for &(base, len) in ranges {
        le64(&mut tail, base);
        le64(&mut tail, len);
        le32(&mut tail, 0);
    }
    let mut n = NodeSpec::new(6, 3, b).maps(maps);
    n.tail = tail;
    n
}

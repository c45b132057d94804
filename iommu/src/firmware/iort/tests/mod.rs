//! IORT parser tests: real firmware tables, a spec-built QEMU `virt` table, synthetic tables
//! for every node type, malformed tables, and property tests.

mod builder;
mod malformed;
mod props;
mod real;
mod synthetic;

use std::string::String;
use std::vec::Vec;

use builder::{le16, le32, le64};

/// The IORT QEMU's `virt` machine builds with `iommu=smmuv3` (a revision 3 table, E.b), written
/// out field by field from DEN 0049: one ITS group, an SMMUv3 at 0x9050000 with SPIs 74..77
/// (GSIVs 106..109), and a root complex for segment 0 whose RIDs 0..=0xffff go to the SMMUv3,
/// which passes them on to the ITS unchanged.
pub fn qemu_virt_iort() -> Vec<u8> {
    let mut t = Vec::new();
    // ACPI header (ACPI 6.5 Table 5.4).
    t.extend_from_slice(b"IORT");
    le32(&mut t, 0); // length, patched below
    t.push(3); // revision 3: DEN 0049 E.b
    t.push(0); // checksum, patched below
    t.extend_from_slice(b"BOCHS "); // OEM ID
    t.extend_from_slice(b"BXPC    "); // OEM table ID
    le32(&mut t, 1); // OEM revision
    t.extend_from_slice(b"BXPC"); // creator ID
    le32(&mut t, 1); // creator revision
    // IORT header: node count, node array offset, reserved.
    le32(&mut t, 3); // number of nodes
    le32(&mut t, 48); // offset of the node array
    le32(&mut t, 0); // reserved
    // 0x30: ITS group node, revision 1.
    t.push(0); // type
    le16(&mut t, 24); // length: 20 + 4 per ITS
    t.push(1); // revision
    le32(&mut t, 0); // identifier
    le32(&mut t, 0); // number of ID mappings
    le32(&mut t, 0); // reference to ID array
    le32(&mut t, 1); // number of ITSs
    le32(&mut t, 0); // GIC ITS identifier 0
    // 0x48: SMMUv3 node, revision 4.
    t.push(4);
    le16(&mut t, 68 + 20);
    t.push(4);
    le32(&mut t, 1); // identifier
    le32(&mut t, 1); // one ID mapping
    le32(&mut t, 68); // ID array right after the fixed fields
    le64(&mut t, 0x905_0000); // base address
    le32(&mut t, 1); // flags: COHACC override
    le32(&mut t, 0); // reserved
    le64(&mut t, 0); // VATOS address
    le32(&mut t, 0); // model: generic SMMUv3
    le32(&mut t, 106); // event GSIV (SPI 74)
    le32(&mut t, 107); // PRI GSIV
    le32(&mut t, 108); // GERR GSIV
    le32(&mut t, 109); // sync GSIV
    le32(&mut t, 0); // proximity domain
    le32(&mut t, 0); // DeviceID mapping index
    // StreamIDs 0..=0xffff -> ITS group DeviceIDs 0..=0xffff.
    le32(&mut t, 0); // input base
    le32(&mut t, 0xffff); // number of IDs (minus one)
    le32(&mut t, 0); // output base
    le32(&mut t, 0x30); // output reference: the ITS group
    le32(&mut t, 0); // flags
    // 0xa0: root complex node, revision 3.
    t.push(2);
    le16(&mut t, 36 + 20);
    t.push(3);
    le32(&mut t, 2); // identifier
    le32(&mut t, 1); // one ID mapping
    le32(&mut t, 36); // ID array offset
    le32(&mut t, 1); // CCA: fully coherent
    t.push(0); // allocation hints
    le16(&mut t, 0); // reserved
    t.push(3); // memory access flags: CPM | DACS
    le32(&mut t, 0); // ATS attribute
    le32(&mut t, 0); // PCI segment 0
    t.push(64); // memory address size limit
    le16(&mut t, 0); // PASID capabilities
    t.push(0); // reserved
    // RIDs 0..=0xffff -> SMMUv3 StreamIDs 0..=0xffff.
    le32(&mut t, 0);
    le32(&mut t, 0xffff);
    le32(&mut t, 0);
    le32(&mut t, 0x48);
    le32(&mut t, 0);
    builder::finish(&mut t);
    t
}

pub fn dump_string(iort: &super::Iort<'_>) -> String {
    let mut s = String::new();
    iort.dump(&mut s).expect("dump into a String cannot fail");
    s
}

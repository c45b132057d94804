//! A human-readable listing of an IORT, for the `decode-table` tool: every header field, every
//! node field and every ID mapping, with table offsets in brackets. The output depends only on
//! the table bytes, so it can be diffed between machines and firmware versions.

use core::fmt::{self, Write};

use super::{Iort, Node, NodeKind};
use crate::firmware::acpi::Sig;

/// Prints bytes as a quoted string, escaping what is not printable ASCII.
struct Text<'a>(&'a [u8]);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
                f.write_char(b as char)?;
            } else if b == b'\\' {
                f.write_str("\\\\")?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_char('"')
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl Iort<'_> {
    /// Writes the listing to `out`.
    pub fn dump(&self, out: &mut dyn Write) -> fmt::Result {
        let h = self.header();
        writeln!(out, "[000h] IORT: I/O Remapping Table (Arm DEN 0049)")?;
        writeln!(out, "       signature {:?}", Sig(h.signature))?;
        writeln!(out, "       length {} ({:#x})", h.length, h.length)?;
        writeln!(out, "       revision {}", h.revision)?;
        writeln!(out, "       checksum {:#04x}", h.checksum)?;
        writeln!(out, "       OEM ID {}", Text(&h.oem_id))?;
        writeln!(out, "       OEM table ID {}", Text(&h.oem_table_id))?;
        writeln!(out, "       OEM revision {:#010x}", h.oem_revision)?;
        writeln!(out, "       creator ID {}", Text(&h.creator_id))?;
        writeln!(out, "       creator revision {:#010x}", h.creator_revision)?;
        writeln!(out, "[024h] node count {}", self.node_count())?;
        writeln!(
            out,
            "[028h] node array offset {:#x}",
            self.node_array_offset()
        )?;
        for node in self.nodes() {
            writeln!(out)?;
            self.dump_node(&node, out)?;
        }
        let trailing = self.trailing_bytes();
        if trailing != 0 {
            writeln!(out)?;
            writeln!(out, "{trailing} bytes after the last node")?;
        }
        Ok(())
    }

    fn dump_node(&self, node: &Node<'_>, out: &mut dyn Write) -> fmt::Result {
        let ty = node.node_type();
        writeln!(
            out,
            "[{:03x}h] {} (type {})",
            node.offset(),
            ty.name(),
            ty.raw()
        )?;
        writeln!(out, "       length {}", node.length())?;
        writeln!(out, "       revision {}", node.revision())?;
        match node.identifier() {
            Some(id) => writeln!(out, "       identifier {id:#x}")?,
            None => writeln!(out, "       reserved {:#x}", node.raw_identifier())?,
        }
        writeln!(out, "       mapping count {}", node.mapping_count())?;
        writeln!(out, "       mapping offset {:#x}", node.mapping_offset())?;
        match node.kind() {
            NodeKind::ItsGroup(g) => {
                writeln!(out, "       ITS count {}", g.its_count())?;
                for (i, id) in g.its_ids().enumerate() {
                    writeln!(out, "       ITS identifier [{i}] {id}")?;
                }
            }
            NodeKind::NamedComponent(nc) => {
                writeln!(
                    out,
                    "       flags {:#x} (stall {}, substream width {})",
                    nc.flags,
                    yes(nc.stall_supported()),
                    nc.substream_width()
                )?;
                memory(out, &nc.memory)?;
                writeln!(
                    out,
                    "       device memory address size limit {}",
                    nc.memory_address_limit
                )?;
                writeln!(out, "       object name {}", Text(nc.name))?;
            }
            NodeKind::RootComplex(rc) => {
                memory(out, &rc.memory)?;
                writeln!(
                    out,
                    "       ATS attribute {:#x} (ATS {}, PRI {}, PASID forwarding {})",
                    rc.ats_attribute,
                    yes(rc.ats_supported()),
                    yes(rc.pri_supported()),
                    yes(rc.pasid_forwarding())
                )?;
                writeln!(out, "       PCI segment {}", rc.pci_segment)?;
                if let Some(limit) = rc.memory_address_limit {
                    writeln!(out, "       memory address size limit {limit}")?;
                }
                if let Some(caps) = rc.pasid_capabilities {
                    writeln!(
                        out,
                        "       PASID capabilities {caps:#x} (max PASID width {})",
                        caps & 0x1f
                    )?;
                }
                if let Some(flags) = rc.flags {
                    writeln!(out, "       flags {flags:#x}")?;
                }
            }
            NodeKind::SmmuV1V2(s) => {
                writeln!(out, "       base address {:#x}", s.base_address)?;
                writeln!(out, "       span {:#x}", s.span)?;
                writeln!(out, "       model {} ({})", s.model_raw, s.model().name())?;
                writeln!(
                    out,
                    "       flags {:#x} (DVM {}, coherent walk {})",
                    s.flags,
                    yes(s.dvm_supported()),
                    yes(s.coherent_walk())
                )?;
                irq(
                    out,
                    format_args!("global interrupt NSgIrpt"),
                    s.global_interrupt,
                )?;
                irq(
                    out,
                    format_args!("global interrupt NSgCfgIrpt"),
                    s.global_config_interrupt,
                )?;
                writeln!(
                    out,
                    "       context interrupt count {}",
                    s.context_interrupts().count()
                )?;
                for (i, c) in s.context_interrupts().enumerate() {
                    irq(out, format_args!("context interrupt [{i}]"), c)?;
                }
                writeln!(
                    out,
                    "       PMU interrupt count {}",
                    s.pmu_interrupts().count()
                )?;
                for (i, c) in s.pmu_interrupts().enumerate() {
                    irq(out, format_args!("PMU interrupt [{i}]"), c)?;
                }
            }
            NodeKind::SmmuV3(s) => {
                writeln!(out, "       base address {:#x}", s.base_address)?;
                writeln!(
                    out,
                    "       flags {:#x} (COHACC override {}, HTTU override {}, proximity domain valid {}, DeviceID valid {})",
                    s.flags,
                    yes(s.cohacc_override()),
                    s.httu_override(),
                    yes(s.proximity_domain_valid()),
                    yes(s.device_id_valid())
                )?;
                writeln!(out, "       VATOS address {:#x}", s.vatos_address)?;
                writeln!(out, "       model {} ({})", s.model_raw, s.model().name())?;
                writeln!(out, "       event GSIV {}", s.event_gsiv)?;
                writeln!(out, "       PRI GSIV {}", s.pri_gsiv)?;
                writeln!(out, "       GERR GSIV {}", s.gerr_gsiv)?;
                writeln!(out, "       sync GSIV {}", s.sync_gsiv)?;
                if let Some(pxm) = s.proximity_domain {
                    writeln!(out, "       proximity domain {pxm}")?;
                }
                if let Some(index) = s.device_id_mapping_index {
                    writeln!(out, "       DeviceID mapping index {index}")?;
                }
            }
            NodeKind::Pmcg(p) => {
                writeln!(out, "       page 0 base address {:#x}", p.page0_base)?;
                writeln!(out, "       overflow GSIV {}", p.overflow_gsiv)?;
                let target = self
                    .node_at(p.node_reference)
                    .map_or("?", |n| n.node_type().name());
                writeln!(
                    out,
                    "       node reference {:#x} ({target})",
                    p.node_reference
                )?;
                if let Some(base) = p.page1_base {
                    writeln!(out, "       page 1 base address {base:#x}")?;
                }
            }
            NodeKind::Rmr(r) => {
                writeln!(
                    out,
                    "       flags {:#x} (remapping permitted {}, privileged {}, access attributes {})",
                    r.flags,
                    yes(r.remapping_permitted()),
                    yes(r.access_privileged()),
                    r.access_attributes()
                )?;
                writeln!(out, "       memory range count {}", r.range_count())?;
                for (i, m) in r.memory_ranges().enumerate() {
                    writeln!(
                        out,
                        "       memory range [{i}] base {:#x} length {:#x}",
                        m.base, m.length
                    )?;
                }
            }
            NodeKind::Unknown { data, .. } => {
                write!(out, "       data ({} bytes):", data.len())?;
                for (i, b) in data.iter().enumerate() {
                    if i % 16 == 0 {
                        write!(out, "\n        ")?;
                    }
                    write!(out, " {b:02x}")?;
                }
                writeln!(out)?;
            }
        }
        for (i, m) in node.id_mappings().enumerate() {
            let target = self
                .node_at(m.output_reference)
                .map_or("?", |n| n.node_type().name());
            let at =
                node.offset() as usize + node.mapping_offset() as usize + i * super::ID_MAPPING_LEN;
            if m.is_single() {
                writeln!(
                    out,
                    "[{at:03x}h] ID mapping [{i}]: single, output ID {:#x} -> {:#x} ({target}), input base {:#x}, number of IDs field {:#x}, flags {:#x}",
                    m.output_base, m.output_reference, m.input_base, m.id_count_minus_one, m.flags
                )?;
            } else {
                writeln!(
                    out,
                    "[{at:03x}h] ID mapping [{i}]: input {:#x}..={:#x} ({} IDs) -> output {:#x}..={:#x} at {:#x} ({target}), flags {:#x}",
                    m.input_base,
                    m.input_last(),
                    m.id_count(),
                    m.output_base,
                    m.output_last(),
                    m.output_reference,
                    m.flags
                )?;
            }
        }
        Ok(())
    }
}

fn memory(out: &mut dyn Write, m: &super::MemoryAccess) -> fmt::Result {
    writeln!(
        out,
        "       cache coherent attribute {} ({})",
        m.cca,
        if m.fully_coherent() {
            "fully coherent"
        } else {
            "not coherent"
        }
    )?;
    writeln!(out, "       allocation hints {:#x}", m.allocation_hints)?;
    writeln!(
        out,
        "       memory access flags {:#x} (CPM {}, DACS {})",
        m.access_flags,
        yes(m.coherent_path_to_memory()),
        yes(m.access_flags & 2 != 0)
    )
}

fn irq(out: &mut dyn Write, what: fmt::Arguments<'_>, i: super::Interrupt) -> fmt::Result {
    writeln!(
        out,
        "       {what} GSIV {} flags {:#x} ({})",
        i.gsiv,
        i.flags,
        if i.edge_triggered() { "edge" } else { "level" }
    )
}

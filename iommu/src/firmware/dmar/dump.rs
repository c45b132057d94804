//! Human-readable disassembly of a DMAR table, in the spirit of `iasl -d`: one field per line,
//! prefixed with its table offset, so a reader can check any value against a hex dump.
//! Output depends only on the table bytes (and the topology, if one is given).

use core::fmt::{self, Write};

use super::{DeviceScope, Dmar, DmarFlags, PciTopology, RemappingStructure, type_names};
use bitflags::Flags;

/// Width of the field-name column, indentation included.
const NAME_WIDTH: usize = 28;

fn field(
    out: &mut dyn Write,
    offset: usize,
    indent: usize,
    name: &str,
    value: fmt::Arguments<'_>,
) -> fmt::Result {
    let pad = indent * 2;
    let width = NAME_WIDTH.saturating_sub(pad);
    writeln!(out, "[{offset:04x}] {:pad$}{name:<width$} : {value}", "")
}

/// Quoted text with non-printable bytes escaped: OEM fields are often NUL- or binary-padded.
struct Text<'a>(&'a [u8]);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for &b in self.0 {
            match b {
                b'"' | b'\\' => write!(f, "\\{}", b as char)?,
                0x20..0x7f => f.write_char(b as char)?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        f.write_char('"')
    }
}

/// `0x05 [INTR_REMAP | DMA_CTRL_PLATFORM_OPT_IN]`; bits without a name are shown as hex.
struct FlagNames<F>(F);

impl<F: Flags<Bits = u8> + Copy> fmt::Display for FlagNames<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.0.bits();
        write!(f, "{bits:#04x} [")?;
        let mut first = true;
        for (name, _) in self.0.iter_names() {
            if !first {
                f.write_str(" | ")?;
            }
            f.write_str(name)?;
            first = false;
        }
        let unknown = bits & !F::all().bits();
        if unknown != 0 {
            if !first {
                f.write_str(" | ")?;
            }
            write!(f, "{unknown:#04x}")?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        f.write_char(']')
    }
}

impl Dmar<'_> {
    /// Writes the disassembly (see the module docs). Multi-hop paths show `??` for the buses
    /// behind the first hop, which only the live topology knows.
    pub fn dump(&self, out: &mut dyn Write) -> fmt::Result {
        self.dump_with_topology(out, None)
    }

    /// Like [`Dmar::dump`], but resolves the buses of multi-hop paths through `topology`.
    pub fn dump_with_topology(
        &self,
        out: &mut dyn Write,
        topology: Option<&dyn PciTopology>,
    ) -> fmt::Result {
        let h = self.header();
        field(
            out,
            0x00,
            0,
            "Signature",
            format_args!("{} (DMA Remapping table)", Text(&h.signature)),
        )?;
        field(
            out,
            0x04,
            0,
            "Table Length",
            format_args!("{:#010x} ({})", h.length, h.length),
        )?;
        field(
            out,
            0x08,
            0,
            "Revision",
            format_args!("{:#04x}", h.revision),
        )?;
        field(
            out,
            0x09,
            0,
            "Checksum",
            format_args!("{:#04x}", h.checksum),
        )?;
        field(out, 0x0a, 0, "OEM ID", format_args!("{}", Text(&h.oem_id)))?;
        field(
            out,
            0x10,
            0,
            "OEM Table ID",
            format_args!("{}", Text(&h.oem_table_id)),
        )?;
        field(
            out,
            0x18,
            0,
            "OEM Revision",
            format_args!("{:#010x}", h.oem_revision),
        )?;
        field(
            out,
            0x1c,
            0,
            "Creator ID",
            format_args!("{}", Text(&h.creator_id)),
        )?;
        field(
            out,
            0x20,
            0,
            "Creator Revision",
            format_args!("{:#010x}", h.creator_revision),
        )?;
        field(
            out,
            0x24,
            0,
            "Host Address Width",
            format_args!(
                "{} bits (field {:#04x})",
                self.host_address_width(),
                self.host_address_width_field()
            ),
        )?;
        field(
            out,
            0x25,
            0,
            "Flags",
            format_args!("{}", FlagNames::<DmarFlags>(self.flags())),
        )?;
        if self.reserved().iter().any(|&b| b != 0) {
            field(
                out,
                0x26,
                0,
                "Reserved",
                format_args!("{:02x?}", self.reserved()),
            )?;
        }
        for s in self.structures() {
            self.dump_structure(out, &s, topology)?;
        }
        Ok(())
    }

    fn dump_structure(
        &self,
        out: &mut dyn Write,
        s: &RemappingStructure<'_>,
        topology: Option<&dyn PciTopology>,
    ) -> fmt::Result {
        let o = s.offset();
        let ty = s.type_code();
        let (short, long) = type_names(ty);
        out.write_char('\n')?;
        writeln!(
            out,
            "[{o:04x}] {short}: {long} (type {ty}, length {})",
            s.length()
        )?;
        let mut segment = 0;
        match s {
            RemappingStructure::Drhd(d) => {
                segment = d.segment();
                field(
                    out,
                    o + 4,
                    1,
                    "Flags",
                    format_args!("{}", FlagNames(d.flags())),
                )?;
                field(
                    out,
                    o + 5,
                    1,
                    "Size",
                    format_args!(
                        "{:#04x} ({} page{}, {:#x} bytes)",
                        d.size_field(),
                        d.register_set_pages(),
                        if d.register_set_pages() == 1 { "" } else { "s" },
                        d.register_set_len()
                    ),
                )?;
                field(
                    out,
                    o + 6,
                    1,
                    "PCI Segment Number",
                    format_args!("{:#06x}", d.segment()),
                )?;
                field(
                    out,
                    o + 8,
                    1,
                    "Register Base Address",
                    format_args!("{:#018x}", d.register_base()),
                )?;
                if d.register_base() == 0 {
                    field(
                        out,
                        o + 8,
                        1,
                        "Note",
                        format_args!("register base 0 is a firmware bug"),
                    )?;
                }
            }
            RemappingStructure::Rmrr(r) => {
                segment = r.segment();
                field(
                    out,
                    o + 6,
                    1,
                    "PCI Segment Number",
                    format_args!("{:#06x}", r.segment()),
                )?;
                field(
                    out,
                    o + 8,
                    1,
                    "Base Address",
                    format_args!("{:#018x}", r.base()),
                )?;
                field(
                    out,
                    o + 16,
                    1,
                    "End Address (limit)",
                    format_args!("{:#018x}", r.limit()),
                )?;
                if !r.is_well_formed() {
                    field(
                        out,
                        o + 8,
                        1,
                        "Note",
                        format_args!("range is not whole 4 KiB pages with limit above base"),
                    )?;
                }
            }
            RemappingStructure::Atsr(a) => {
                segment = a.segment();
                field(
                    out,
                    o + 4,
                    1,
                    "Flags",
                    format_args!("{}", FlagNames(a.flags())),
                )?;
                field(
                    out,
                    o + 6,
                    1,
                    "PCI Segment Number",
                    format_args!("{:#06x}", a.segment()),
                )?;
            }
            RemappingStructure::Rhsa(r) => {
                field(
                    out,
                    o + 8,
                    1,
                    "Register Base Address",
                    format_args!("{:#018x}", r.register_base()),
                )?;
                field(
                    out,
                    o + 16,
                    1,
                    "Proximity Domain",
                    format_args!("{:#010x}", r.proximity_domain()),
                )?;
            }
            RemappingStructure::Andd(a) => {
                field(
                    out,
                    o + 7,
                    1,
                    "ACPI Device Number",
                    format_args!("{:#04x}", a.device_number()),
                )?;
                field(
                    out,
                    o + 8,
                    1,
                    "ACPI Object Name",
                    format_args!("{}", Text(a.object_name_bytes())),
                )?;
            }
            RemappingStructure::Satc(sa) => {
                segment = sa.segment();
                field(
                    out,
                    o + 4,
                    1,
                    "Flags",
                    format_args!("{}", FlagNames(sa.flags())),
                )?;
                field(
                    out,
                    o + 6,
                    1,
                    "PCI Segment Number",
                    format_args!("{:#06x}", sa.segment()),
                )?;
            }
            RemappingStructure::Sidp(si) => {
                segment = si.segment();
                field(
                    out,
                    o + 6,
                    1,
                    "PCI Segment Number",
                    format_args!("{:#06x}", si.segment()),
                )?;
            }
            RemappingStructure::Unknown { bytes, .. } => {
                for (i, chunk) in bytes.chunks(16).enumerate() {
                    let at = o.saturating_add(i.saturating_mul(16));
                    field(out, at, 1, "Raw Data", format_args!("{chunk:02x?}"))?;
                }
            }
        }
        if let Some(scopes) = s.scopes() {
            for scope in scopes {
                dump_scope(out, &scope, segment, topology)?;
            }
        }
        Ok(())
    }
}

fn dump_scope(
    out: &mut dyn Write,
    s: &DeviceScope<'_>,
    segment: u16,
    topology: Option<&dyn PciTopology>,
) -> fmt::Result {
    let o = s.offset();
    let ty = s.scope_type();
    writeln!(
        out,
        "[{o:04x}]   Device Scope: {} (type {}, length {})",
        ty.name(),
        s.raw_type(),
        s.length()
    )?;
    field(out, o + 2, 2, "Flags", format_args!("{:#04x}", s.flags()))?;
    if s.reserved() != 0 {
        field(
            out,
            o + 3,
            2,
            "Reserved",
            format_args!("{:#04x}", s.reserved()),
        )?;
    }
    field(
        out,
        o + 4,
        2,
        "Enumeration ID",
        format_args!("{:#04x}", s.enumeration_id()),
    )?;
    field(
        out,
        o + 5,
        2,
        "Start Bus",
        format_args!("{:#04x}", s.start_bus()),
    )?;
    field(
        out,
        o + 6,
        2,
        "Path",
        format_args!(
            "{}",
            Path {
                scope: s,
                segment,
                topology
            }
        ),
    )
}

/// `bb:dd.f -> bb:dd.f`, following bridges' secondary buses when a topology is known.
struct Path<'s, 'a> {
    scope: &'s DeviceScope<'a>,
    segment: u16,
    topology: Option<&'s dyn PciTopology>,
}

impl fmt::Display for Path<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bus = Some(self.scope.start_bus());
        for (i, hop) in self.scope.path().enumerate() {
            if i > 0 {
                f.write_str(" -> ")?;
            }
            match bus {
                Some(b) => write!(f, "{b:02x}:{hop}")?,
                None => write!(f, "??:{hop}")?,
            }
            bus = match (bus, self.topology) {
                (Some(b), Some(t)) => t
                    .bridge_buses(self.segment, b, hop.device, hop.function)
                    .map(|(secondary, _)| secondary),
                _ => None,
            };
        }
        if self.scope.path_len() == 0 {
            f.write_str("(empty)")?;
        }
        Ok(())
    }
}

impl fmt::Display for Dmar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.dump(f)
    }
}

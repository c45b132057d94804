//! The flattened device tree (DTB) the arm64 loader hands over: validation, then the memory map,
//! command line and boot modules for [`BootInfo`], the boot console, and the PSCI conduit.
//!
//! Format: Devicetree Specification v0.4, chapter 5 "Flattened Devicetree (DTB) Format".
//!
//! Queries go through the `fdt` crate (0.1.5), which trusts its input: it indexes slices with
//! offsets read from the blob, `expect`s well-formed strings, and recurses on aliases. A bad DTB
//! must never panic the hypervisor, so [`DeviceTree::new`] first walks the whole blob with the
//! bounds-checked [`validate`], which rejects everything `fdt` 0.1.5 would trip over, and only then
//! hands it to `fdt`. Path and alias lookups are done here (never `Fdt::find_node`, whose alias
//! fallback can recurse without end on a crafted `/aliases`), and `reg`/`ranges` are decoded here
//! with the enclosing buses' cell sizes so that addresses are translated to CPU physical addresses.

use crate::{BootInfo, FixedStr, MemoryKind, MemoryRegion, Module};
use fdt::Fdt;
use fdt::node::FdtNode;

/// DTB header magic (spec §5.2), stored big-endian.
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Size of the version-17 header (spec §5.2).
pub const HEADER_LEN: usize = 40;

const FDT_BEGIN_NODE: u32 = 0x1;
const FDT_END_NODE: u32 = 0x2;
const FDT_PROP: u32 = 0x3;
const FDT_NOP: u32 = 0x4;
const FDT_END: u32 = 0x9;

/// Deepest node nesting accepted (the root is depth 1). `fdt` 0.1.5 keeps parents in a 64-entry
/// array; real trees are under 10 deep.
pub const MAX_DEPTH: usize = 32;
/// Memory-reservation entries read before giving up on an unterminated block.
const MAX_RESERVATIONS: usize = 1024;
/// `#address-cells`/`#size-cells` above this are not addresses we can use (PCI uses 3).
const MAX_CELLS: usize = 4;
/// `reg`/`ranges` entries decoded per property.
const MAX_ENTRIES: usize = 256;

/// Why a DTB was rejected. Every malformed input maps to one of these; none panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtbError {
    /// The buffer is shorter than the header or than the header's `totalsize`.
    Truncated { need: usize, have: usize },
    /// Not `0xd00dfeed`.
    BadMagic(u32),
    /// `totalsize` above [`MAX_DTB_SIZE`](super::MAX_DTB_SIZE).
    TooLarge(usize),
    /// booting.rst: the DTB "must be placed on an 8-byte boundary".
    Misaligned(u64),
    /// Only version 17 layouts (with `size_dt_struct`) are understood.
    Version { version: u32, last_compatible: u32 },
    /// A header field points outside the blob or is misaligned.
    Header(&'static str),
    /// The structure block at `offset` (from its start) is malformed.
    Structure { offset: usize, what: &'static str },
    /// The blob is not inside the memory the boot page table maps.
    Unreachable { end: u64 },
    /// The blob overlaps the hypervisor image (whose `.bss` the entry has zeroed).
    OverlapsImage,
}

impl core::fmt::Display for DtbError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DtbError::Truncated { need, have } => write!(f, "truncated: {have} bytes of {need}"),
            DtbError::BadMagic(m) => write!(f, "bad magic {m:#010x} (want {FDT_MAGIC:#010x})"),
            DtbError::TooLarge(n) => write!(f, "totalsize {n} exceeds the 2 MiB booting.rst limit"),
            DtbError::Misaligned(pa) => write!(f, "address {pa:#x} is not 8-byte aligned"),
            DtbError::Version {
                version,
                last_compatible,
            } => {
                write!(
                    f,
                    "version {version} (last compatible {last_compatible}); need 17"
                )
            }
            DtbError::Header(what) => write!(f, "bad header: {what}"),
            DtbError::Structure { offset, what } => {
                write!(f, "bad structure block at +{offset:#x}: {what}")
            }
            DtbError::Unreachable { end } => write!(f, "ends at {end:#x}, beyond the boot map"),
            DtbError::OverlapsImage => f.write_str("overlaps the hypervisor image"),
        }
    }
}

fn be32(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(bytes: &[u8], offset: usize) -> Option<u64> {
    Some((u64::from(be32(bytes, offset)?) << 32) | u64::from(be32(bytes, offset + 4)?))
}

const fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Reads `totalsize` from the first 8 bytes of a header, checking the magic and the 2 MiB limit.
/// The entry uses this to learn how many bytes to map as a slice before validating the rest.
pub fn header_total_size(first8: [u8; 8]) -> Result<usize, DtbError> {
    let magic = u32::from_be_bytes([first8[0], first8[1], first8[2], first8[3]]);
    if magic != FDT_MAGIC {
        return Err(DtbError::BadMagic(magic));
    }
    let size = u32::from_be_bytes([first8[4], first8[5], first8[6], first8[7]]) as usize;
    if size < HEADER_LEN {
        return Err(DtbError::Header("totalsize is smaller than the header"));
    }
    if size > super::MAX_DTB_SIZE {
        return Err(DtbError::TooLarge(size));
    }
    Ok(size)
}

/// Checks a whole DTB (header, memory-reservation block, structure and strings blocks) without
/// trusting any offset in it, and returns its `totalsize`. Accepted blobs are exactly those that
/// `fdt` 0.1.5 can walk without panicking: version 17, properties before subnodes, NUL-terminated
/// UTF-8 names, nesting at most [`MAX_DEPTH`], `#address-cells`/`#size-cells` at least 4 bytes,
/// and no `FDT_NOP` tokens (0.1.5 mis-skips NOPs between properties; dtc and QEMU emit none).
pub fn validate(bytes: &[u8]) -> Result<usize, DtbError> {
    let header = bytes.get(..HEADER_LEN).ok_or(DtbError::Truncated {
        need: HEADER_LEN,
        have: bytes.len(),
    })?;
    let word = |i: usize| be32(header, i * 4).unwrap_or(0);
    let total = header_total_size([
        header[0], header[1], header[2], header[3], header[4], header[5], header[6], header[7],
    ])?;
    if bytes.len() < total {
        return Err(DtbError::Truncated {
            need: total,
            have: bytes.len(),
        });
    }
    let blob = &bytes[..total];
    let (off_struct, off_strings, off_rsvmap) =
        (word(2) as usize, word(3) as usize, word(4) as usize);
    let (version, last_compatible) = (word(5), word(6));
    let (size_strings, size_struct) = (word(8) as usize, word(9) as usize);
    if version < 17 || last_compatible > 17 {
        return Err(DtbError::Version {
            version,
            last_compatible,
        });
    }
    let block = |off: usize, size: usize, what| {
        let end = off.checked_add(size).ok_or(DtbError::Header(what))?;
        if off < HEADER_LEN || end > total {
            return Err(DtbError::Header(what));
        }
        Ok(&blob[off..end])
    };
    let structs = block(off_struct, size_struct, "structure block outside the blob")?;
    let strings = block(off_strings, size_strings, "strings block outside the blob")?;
    if !off_struct.is_multiple_of(4) || !size_struct.is_multiple_of(4) {
        return Err(DtbError::Header("structure block is not 4-byte aligned"));
    }
    validate_reservations(blob, off_rsvmap)?;
    validate_structure(structs, strings)?;
    Ok(total)
}

fn validate_reservations(blob: &[u8], off: usize) -> Result<(), DtbError> {
    if off < HEADER_LEN || !off.is_multiple_of(8) {
        return Err(DtbError::Header("memory reservation block misplaced"));
    }
    for i in 0..MAX_RESERVATIONS {
        let at = off + i * 16;
        let (addr, size) = match (be64(blob, at), be64(blob, at + 8)) {
            (Some(a), Some(s)) => (a, s),
            _ => {
                return Err(DtbError::Header(
                    "memory reservation block runs past the blob",
                ));
            }
        };
        if addr == 0 && size == 0 {
            return Ok(());
        }
    }
    Err(DtbError::Header(
        "memory reservation block is not terminated",
    ))
}

fn validate_structure(st: &[u8], strings: &[u8]) -> Result<(), DtbError> {
    let err = |offset, what| DtbError::Structure { offset, what };
    let mut pos = 0usize;
    let mut depth = 0usize;
    let mut root_closed = false;
    // children_seen[d]: the node at depth d has had a subnode, so no more properties may follow.
    let mut children_seen = [false; MAX_DEPTH + 1];
    loop {
        let token = be32(st, pos).ok_or(err(pos, "ends without FDT_END"))?;
        match token {
            FDT_BEGIN_NODE => {
                if root_closed {
                    return Err(err(pos, "a second root node"));
                }
                let name_at = pos + 4;
                let rest = st.get(name_at..).unwrap_or_default();
                let len = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(err(pos, "unterminated node name"))?;
                let name = core::str::from_utf8(&rest[..len])
                    .map_err(|_| err(pos, "node name is not UTF-8"))?;
                if depth == 0 && !name.is_empty() {
                    return Err(err(pos, "the root node has a name"));
                }
                if depth > 0 && name.is_empty() {
                    return Err(err(pos, "empty node name"));
                }
                children_seen[depth] = true;
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(err(pos, "nodes nested too deeply"));
                }
                children_seen[depth] = false;
                pos = align4(name_at + len + 1);
            }
            FDT_END_NODE => {
                if depth == 0 {
                    return Err(err(pos, "FDT_END_NODE without a node"));
                }
                depth -= 1;
                root_closed = depth == 0;
                pos += 4;
            }
            FDT_PROP => {
                if depth == 0 {
                    return Err(err(pos, "property outside any node"));
                }
                if children_seen[depth] {
                    return Err(err(pos, "property after a subnode"));
                }
                let len = be32(st, pos + 4).ok_or(err(pos, "truncated property"))? as usize;
                let name_off = be32(st, pos + 8).ok_or(err(pos, "truncated property"))? as usize;
                let value_end = (pos + 12).checked_add(len).filter(|&e| e <= st.len());
                let value_end = value_end.ok_or(err(pos, "property value runs past the block"))?;
                let name = strings.get(name_off..).unwrap_or_default();
                let name_len = name
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(err(pos, "bad property name offset"))?;
                let name = core::str::from_utf8(&name[..name_len])
                    .map_err(|_| err(pos, "property name is not UTF-8"))?;
                if name.is_empty() {
                    return Err(err(pos, "empty property name"));
                }
                if (name == "#address-cells" || name == "#size-cells") && len < 4 {
                    return Err(err(pos, "#address-cells/#size-cells shorter than one cell"));
                }
                pos = align4(value_end);
            }
            FDT_NOP => return Err(err(pos, "FDT_NOP tokens are not supported")),
            FDT_END => {
                if depth != 0 || !root_closed {
                    return Err(err(pos, "FDT_END before the root node is closed"));
                }
                return Ok(());
            }
            _ => return Err(err(pos, "unknown token")),
        }
    }
}

/// A UART the boot console can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    /// CPU physical address of the register block (after bus `ranges` translation).
    pub base: u64,
    pub size: u64,
    pub kind: UartKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartKind {
    /// Arm PrimeCell PL011 (`arm,pl011`).
    Pl011,
    /// The SBSA generic UART (`arm,sbsa-uart`): a PL011 subset without CR/LCR/baud registers.
    SbsaGeneric,
}

/// How PSCI calls reach firmware (`/psci` `method`, PSCI DEN 0022 §5 and the `arm,psci` binding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    Smc,
    Hvc,
}

/// The PSCI firmware interface as the device tree describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Psci {
    pub conduit: Conduit,
    /// `arm,psci-0.2` or later: the standard function IDs (SYSTEM_OFF among them) exist. Plain
    /// `arm,psci` (0.1) only has the IDs listed as properties, and no SYSTEM_OFF.
    pub standard_ids: bool,
}

/// PSCI 0.2+ CPU_ON, SMC64 calling convention (DEN 0022 §5.1.4; SMCCC DEN 0028 function IDs).
pub const PSCI_CPU_ON_64: u32 = 0xc400_0003;

/// The affinity fields of MPIDR_EL1: Aff3 `[39:32]`, Aff2 `[23:16]`, Aff1 `[15:8]`, Aff0 `[7:0]`.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// How PSCI CPU_ON is called, from the `/psci` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PsciCpuOn {
    pub conduit: Conduit,
    pub function_id: u32,
}

/// Why [`DeviceTree::psci_cpu_on`] found no usable CPU_ON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciCpuOnError {
    NoPsciNode,
    /// `method` is neither `"smc"` nor `"hvc"`.
    UnknownMethod,
    /// PSCI 0.1 without a `cpu_on` property: no function ID to call.
    NoCpuOnId,
    /// `cpu_on` is not one cell.
    BadCpuOnProperty,
}

impl core::fmt::Display for PsciCpuOnError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PsciCpuOnError::NoPsciNode => "no PSCI node in the device tree",
            PsciCpuOnError::UnknownMethod => "PSCI method is neither smc nor hvc",
            PsciCpuOnError::NoCpuOnId => "PSCI 0.1 node without a cpu_on function ID",
            PsciCpuOnError::BadCpuOnProperty => "PSCI cpu_on property is not one cell",
        })
    }
}

/// What [`DeviceTree::cpus`] found besides the list itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuList {
    /// Entries written to the output.
    pub count: usize,
    /// Enabled CPUs that did not fit in the output.
    pub dropped: usize,
    /// CPU nodes whose `status` says they are not available.
    pub disabled: usize,
    /// CPUs with an `enable-method` other than `"psci"` (spin-table), not listed.
    pub not_psci: usize,
}

/// The CPUs an ACPI MADT lists, as `(MPIDR, enabled)` per GICC entry in table order, reduced to
/// what SMP bring-up starts: enabled entries only (ACPI 6.5 §5.2.12.14: a GICC without the
/// Enabled flag is not usable, even if Online Capable), MPIDR cut to its affinity fields (the
/// GICC MPIDR field holds only those; other bits are ignored rather than trusted), each MPIDR
/// once. Fills `out` up to its length; further enabled entries are counted in
/// [`CpuList::dropped`] (not checked for repeats), disabled and repeated ones in `disabled`.
pub fn acpi_cpus(gicc: impl IntoIterator<Item = (u64, bool)>, out: &mut [u64]) -> CpuList {
    let mut list = CpuList::default();
    for (mpidr, enabled) in gicc {
        let mpidr = mpidr & MPIDR_AFFINITY_MASK;
        if !enabled || out[..list.count].contains(&mpidr) {
            list.disabled += 1;
            continue;
        }
        match out.get_mut(list.count) {
            Some(slot) => {
                *slot = mpidr;
                list.count += 1;
            }
            None => list.dropped += 1,
        }
    }
    list
}

/// Why the `/cpus` node could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuListError {
    NoCpusNode,
    /// `/cpus` `#address-cells` is missing or not 1 or 2.
    BadAddressCells(u32),
    /// A CPU's `reg` does not match `#address-cells` or has bits outside the MPIDR affinity.
    BadReg,
    /// Two CPUs with the same MPIDR.
    Duplicate {
        mpidr: u64,
    },
    NoCpus,
}

impl core::fmt::Display for CpuListError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CpuListError::NoCpusNode => f.write_str("no /cpus node"),
            CpuListError::BadAddressCells(n) => {
                write!(f, "/cpus #address-cells is {n}, not 1 or 2")
            }
            CpuListError::BadReg => f.write_str("a cpu node's reg is not an MPIDR affinity"),
            CpuListError::Duplicate { mpidr } => write!(f, "cpu {mpidr:#x} is listed twice"),
            CpuListError::NoCpus => f.write_str("no enabled cpu node"),
        }
    }
}

/// What [`DeviceTree::fill_boot_info`] could not use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FillReport {
    /// `reg` entries that were malformed, had unsupported cell sizes, or could not be translated.
    pub skipped_entries: usize,
}

/// A validated device tree. Only [`DeviceTree::new`] makes one, so every `fdt` call made through
/// it runs on input that cannot make `fdt` 0.1.5 panic.
#[derive(Clone, Copy)]
pub struct DeviceTree<'a> {
    fdt: Fdt<'a>,
    bytes: &'a [u8],
}

impl core::fmt::Debug for DeviceTree<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceTree")
            .field("size", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// Ancestors of a node, root first; filled by the lookups below.
type Ancestors<'b, 'a> = [FdtNode<'b, 'a>; MAX_DEPTH];

impl<'a> DeviceTree<'a> {
    /// Validates `bytes` (which may extend past the blob) and wraps the first `totalsize` bytes.
    pub fn new(bytes: &'a [u8]) -> Result<Self, DtbError> {
        let total = validate(bytes)?;
        let bytes = &bytes[..total];
        let fdt = Fdt::new(bytes).map_err(|_| DtbError::Header("rejected by the fdt crate"))?;
        Ok(Self { fdt, bytes })
    }

    /// The underlying `fdt` handle, for queries this type does not wrap. Prefer
    /// [`DeviceTree::find_node`] over `Fdt::find_node`: the latter's alias fallback can recurse
    /// forever on a crafted `/aliases` node.
    pub fn fdt(&self) -> &Fdt<'a> {
        &self.fdt
    }

    /// The blob itself (`totalsize` bytes).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn total_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn root(&self) -> Option<FdtNode<'_, 'a>> {
        self.fdt.all_nodes().next()
    }

    /// Finds a node by absolute path (`/chosen`, `/soc/serial@1c28000`). A component without a
    /// unit address matches the first child with that base name, as in the spec's §2.2.3.
    pub fn find_node(&self, path: &str) -> Option<FdtNode<'_, 'a>> {
        let mut ancestors = [self.root()?; MAX_DEPTH];
        self.find_path(path, &mut ancestors).map(|(node, _)| node)
    }

    fn find_path<'s>(
        &'s self,
        path: &str,
        ancestors: &mut Ancestors<'s, 'a>,
    ) -> Option<(FdtNode<'s, 'a>, usize)> {
        if !path.starts_with('/') {
            return None;
        }
        let mut node = self.root()?;
        let mut depth = 0;
        for component in path.split('/').filter(|c| !c.is_empty()) {
            if depth + 1 >= MAX_DEPTH {
                return None;
            }
            ancestors[depth] = node;
            depth += 1;
            node = node
                .children()
                .find(|child| name_matches(child.name, component))?;
        }
        Some((node, depth))
    }

    /// Depth-first search: the first `Some` that `f` returns for an enabled node, given the node
    /// and its ancestors (root first).
    fn find_map<'s, T>(
        &'s self,
        node: FdtNode<'s, 'a>,
        ancestors: &mut Ancestors<'s, 'a>,
        depth: usize,
        f: &dyn Fn(FdtNode<'s, 'a>, &[FdtNode<'s, 'a>]) -> Option<T>,
    ) -> Option<T> {
        if depth + 1 >= MAX_DEPTH {
            return None;
        }
        for child in node.children() {
            ancestors[depth] = node;
            if is_enabled(child)
                && let Some(found) = f(child, &ancestors[..=depth])
            {
                return Some(found);
            }
            if let Some(found) = self.find_map(child, ancestors, depth + 1, f) {
                return Some(found);
            }
        }
        None
    }

    /// Resolves an alias name (spec §3.3) to a path; absolute paths are returned unchanged. An
    /// alias must name an absolute path, so resolution cannot loop.
    fn resolve_alias<'s>(&'s self, name: &'s str) -> Option<&'s str> {
        if name.starts_with('/') {
            return Some(name);
        }
        let value = self.find_node("/aliases")?.property(name)?.value;
        as_str(value).filter(|p| p.starts_with('/'))
    }

    /// `/chosen/bootargs`, up to its NUL.
    pub fn bootargs(&self) -> Option<&'a [u8]> {
        let value = self.find_node("/chosen")?.property("bootargs")?.value;
        Some(value.split(|&b| b == 0).next().unwrap_or_default())
    }

    /// The UART named by `/chosen/stdout-path` (an absolute path or an alias, optionally followed
    /// by `:options`, spec §3.6), when it is a PL011 or SBSA UART.
    pub fn stdout_uart(&self) -> Option<Uart> {
        let chosen = self.find_node("/chosen")?;
        let prop = chosen
            .property("stdout-path")
            .or_else(|| chosen.property("linux,stdout-path"))?;
        let path = as_str(prop.value)?.split(':').next()?;
        let path = self.resolve_alias(path)?;
        let mut ancestors = [self.root()?; MAX_DEPTH];
        let (node, depth) = self.find_path(path, &mut ancestors)?;
        uart_at(node, &ancestors[..depth])
    }

    /// The boot console: the `stdout-path` UART, else the first enabled PL011 or SBSA UART
    /// (depth-first) with a CPU physical address.
    pub fn console_uart(&self) -> Option<Uart> {
        self.stdout_uart().or_else(|| {
            let root = self.root()?;
            let mut ancestors = [root; MAX_DEPTH];
            self.find_map(root, &mut ancestors, 0, &uart_at)
        })
    }

    /// The `/psci` node (found by compatible), when its `method` is one we know.
    pub fn psci(&self) -> Option<Psci> {
        const IDS: [&str; 3] = ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];
        let root = self.root()?;
        let mut ancestors = [root; MAX_DEPTH];
        let node = self.find_map(root, &mut ancestors, 0, &|n, _| {
            has_compatible(n, &IDS).then_some(n)
        })?;
        let conduit = match node.property("method").and_then(|p| as_str(p.value)) {
            Some("smc") => Conduit::Smc,
            Some("hvc") => Conduit::Hvc,
            _ => return None,
        };
        Some(Psci {
            conduit,
            standard_ids: has_compatible(node, &IDS[..2]),
        })
    }

    /// How to start a secondary CPU (PSCI CPU_ON): the `/psci` node's `method` and function ID.
    /// PSCI 0.1 (`arm,psci` alone) has no standard IDs, so its `cpu_on` property is required;
    /// 0.2 and later define CPU_ON_64 = 0xC400_0003 (DEN 0022 §5.1.4 "CPU_ON"), which a
    /// `cpu_on` property, when present, overrides (the binding keeps it for compatibility).
    pub fn psci_cpu_on(&self) -> Result<PsciCpuOn, PsciCpuOnError> {
        const IDS: [&str; 3] = ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];
        let root = self.root().ok_or(PsciCpuOnError::NoPsciNode)?;
        let mut ancestors = [root; MAX_DEPTH];
        let node = self
            .find_map(root, &mut ancestors, 0, &|n, _| {
                has_compatible(n, &IDS).then_some(n)
            })
            .ok_or(PsciCpuOnError::NoPsciNode)?;
        let conduit = match node.property("method").and_then(|p| as_str(p.value)) {
            Some("smc") => Conduit::Smc,
            Some("hvc") => Conduit::Hvc,
            _ => return Err(PsciCpuOnError::UnknownMethod),
        };
        let function_id = match node.property("cpu_on") {
            Some(p) => be32(p.value, 0)
                .filter(|_| p.value.len() == 4)
                .ok_or(PsciCpuOnError::BadCpuOnProperty)?,
            None if has_compatible(node, &IDS[..2]) => PSCI_CPU_ON_64,
            None => return Err(PsciCpuOnError::NoCpuOnId),
        };
        Ok(PsciCpuOn {
            conduit,
            function_id,
        })
    }

    /// The CPUs under `/cpus` (nodes with `device_type = "cpu"` whose `status` is okay), in tree
    /// order, as MPIDR affinity values (Aff3 in `bits [39:32]`, Aff2.Aff1.Aff0 in `bits [23:0]`,
    /// the layout of MPIDR_EL1 and of PSCI's `target_cpu`). The `reg` encoding is the Arm CPU
    /// binding's (`arm/cpus.yaml`): with `#address-cells = <1>` one cell holding `MPIDR[23:0]`,
    /// with `<2>` two cells holding `MPIDR[39:32]` and `MPIDR[23:0]`; any other bit set is an
    /// error. CPUs whose `enable-method` is not `"psci"` (spin-table) are skipped and counted.
    /// Fills `out` up to its length and counts the rest in [`CpuList::dropped`].
    pub fn cpus(&self, out: &mut [u64]) -> Result<CpuList, CpuListError> {
        let cpus = self.find_node("/cpus").ok_or(CpuListError::NoCpusNode)?;
        let cells = match cpus.property("#address-cells").map(|p| p.value) {
            Some(v) if v.len() == 4 => be32(v, 0).unwrap_or(0),
            _ => return Err(CpuListError::BadAddressCells(0)),
        };
        if !matches!(cells, 1 | 2) {
            return Err(CpuListError::BadAddressCells(cells));
        }
        let mut list = CpuList::default();
        for node in cpus.children() {
            let is_cpu = node
                .property("device_type")
                .is_some_and(|p| as_str(p.value) == Some("cpu"));
            if !is_cpu {
                continue;
            }
            if !is_enabled(node) {
                list.disabled += 1;
                continue;
            }
            let reg = node.property("reg").map(|p| p.value).unwrap_or_default();
            if reg.len() != 4 * cells as usize {
                return Err(CpuListError::BadReg);
            }
            let mpidr = if cells == 1 {
                u64::from(be32(reg, 0).unwrap_or(u32::MAX))
            } else {
                let high = be32(reg, 0).unwrap_or(u32::MAX);
                let low = be32(reg, 4).unwrap_or(u32::MAX);
                if high > 0xff {
                    return Err(CpuListError::BadReg);
                }
                u64::from(high) << 32 | u64::from(low)
            };
            if mpidr & !MPIDR_AFFINITY_MASK != 0 {
                return Err(CpuListError::BadReg);
            }
            // QEMU omits `enable-method` with one CPU; a CPU without one is still listed (the
            // boot CPU needs none, and CPU_ON reports any other). Another method is skipped.
            let method = node.property("enable-method").and_then(|p| as_str(p.value));
            if method.is_some_and(|m| m != "psci") {
                list.not_psci += 1;
                continue;
            }
            if out[..list.count].contains(&mpidr) {
                return Err(CpuListError::Duplicate { mpidr });
            }
            match out.get_mut(list.count) {
                Some(slot) => {
                    *slot = mpidr;
                    list.count += 1;
                }
                None => list.dropped += 1,
            }
        }
        if list.count == 0 {
            return Err(CpuListError::NoCpus);
        }
        Ok(list)
    }

    /// Fills `info` from the tree: `/memory` → `Usable`; `/memreserve/` entries and
    /// `/reserved-memory` children → `Reserved`; the image, the DTB and the initrd → `InUse`;
    /// `/chosen/bootargs` → the command line; `linux,initrd-start/end` → a module. Entries that
    /// cannot be decoded are skipped and counted, never guessed.
    pub fn fill_boot_info(
        &self,
        dtb_pa: u64,
        image: (u64, u64),
        info: &mut BootInfo,
    ) -> FillReport {
        let mut report = FillReport::default();
        info.dtb = Some(dtb_pa);
        info.image_start = image.0;
        info.image_end = image.1;
        let Some(root) = self.root() else {
            return report;
        };
        let mut ancestors = [root; MAX_DEPTH];

        // Memory nodes are children of the root with device_type = "memory" (spec §3.4).
        for node in root.children() {
            let is_memory =
                node.property("device_type").and_then(|p| as_str(p.value)) == Some("memory");
            if is_memory && is_enabled(node) {
                push_reg(node, &ancestors[..1], MemoryKind::Usable, info, &mut report);
            }
        }
        for r in self.fdt.memory_reservations().take(MAX_RESERVATIONS) {
            let start = r.address() as usize as u64;
            push(info, start, r.size() as u64, MemoryKind::Reserved);
        }
        if let Some((node, depth)) = self.find_path("/reserved-memory", &mut ancestors) {
            ancestors[depth] = node;
            for child in node.children().filter(|&c| is_enabled(c)) {
                push_reg(
                    child,
                    &ancestors[..depth + 1],
                    MemoryKind::Reserved,
                    info,
                    &mut report,
                );
            }
        }
        push(
            info,
            image.0,
            image.1.saturating_sub(image.0),
            MemoryKind::InUse,
        );
        push(info, dtb_pa, self.bytes.len() as u64, MemoryKind::InUse);

        if let Some(chosen) = self.find_node("/chosen") {
            if let Some(args) = self.bootargs() {
                info.cmdline = FixedStr::from_bytes(args);
            }
            let cell = |name| {
                chosen
                    .property(name)
                    .and_then(|p| read_cells(p.value, p.value.len() / 4))
            };
            if let (Some(start), Some(end)) = (cell("linux,initrd-start"), cell("linux,initrd-end"))
                && end > start
            {
                let module = Module {
                    start,
                    len: end - start,
                    cmdline: FixedStr::new(),
                };
                if info.push_module(module) {
                    push(info, start, end - start, MemoryKind::InUse);
                }
            }
        }
        report
    }
}

fn push(info: &mut BootInfo, start: u64, len: u64, kind: MemoryKind) {
    // A region running past the top of the address space is clipped, not wrapped.
    let len = len.min(u64::MAX - start);
    info.push_region(MemoryRegion { start, len, kind });
}

/// Pushes every `reg` entry of `node` (whose ancestors, root first, are `ancestors`).
fn push_reg(
    node: FdtNode<'_, '_>,
    ancestors: &[FdtNode<'_, '_>],
    kind: MemoryKind,
    info: &mut BootInfo,
    report: &mut FillReport,
) {
    let Some(parent) = ancestors.last() else {
        return;
    };
    let Some(reg) = node.property("reg") else {
        return;
    };
    let (ac, sc) = cell_sizes(*parent);
    let entry = (ac + sc) * 4;
    if ac == 0 || ac > MAX_CELLS || sc > MAX_CELLS || reg.value.len() % entry != 0 {
        report.skipped_entries += 1;
        return;
    }
    for e in reg.value.chunks_exact(entry).take(MAX_ENTRIES) {
        let addr = read_cells(&e[..ac * 4], ac).and_then(|a| translate(a, ancestors));
        match (addr, read_cells(&e[ac * 4..], sc)) {
            (Some(start), Some(len)) => push(info, start, len, kind),
            _ => report.skipped_entries += 1,
        }
    }
}

/// The first `reg` entry of a UART node, translated to a CPU physical address.
fn uart_at(node: FdtNode<'_, '_>, ancestors: &[FdtNode<'_, '_>]) -> Option<Uart> {
    let kind = uart_kind(node)?;
    let parent = ancestors.last()?;
    let (ac, sc) = cell_sizes(*parent);
    if ac == 0 || ac > MAX_CELLS || sc > MAX_CELLS {
        return None;
    }
    let reg = node.property("reg")?.value;
    let entry = reg.get(..(ac + sc) * 4)?;
    let base = translate(read_cells(&entry[..ac * 4], ac)?, ancestors)?;
    let size = read_cells(&entry[ac * 4..], sc)?;
    Some(Uart { base, size, kind })
}

fn uart_kind(node: FdtNode<'_, '_>) -> Option<UartKind> {
    if has_compatible(node, &["arm,pl011"]) {
        Some(UartKind::Pl011)
    } else if has_compatible(node, &["arm,sbsa-uart"]) {
        Some(UartKind::SbsaGeneric)
    } else {
        None
    }
}

/// Translates `addr`, a `reg` address in the child space of `ancestors.last()`, up through each
/// bus's `ranges` (spec §2.3.8) to a CPU physical address. An empty `ranges` is an identity map; a
/// missing one means the bus is not memory-mapped, so there is no CPU address.
fn translate(mut addr: u64, ancestors: &[FdtNode<'_, '_>]) -> Option<u64> {
    for level in (1..ancestors.len()).rev() {
        let bus = ancestors[level];
        let (child_ac, child_sc) = cell_sizes(bus);
        let (parent_ac, _) = cell_sizes(ancestors[level - 1]);
        let ranges = bus.property("ranges")?.value;
        if ranges.is_empty() {
            continue;
        }
        if child_ac == 0 || child_ac > MAX_CELLS || parent_ac > MAX_CELLS || child_sc > MAX_CELLS {
            return None;
        }
        let (c, p) = (child_ac * 4, parent_ac * 4);
        let entry = c + p + child_sc * 4;
        addr = ranges.chunks_exact(entry).take(MAX_ENTRIES).find_map(|e| {
            let child = read_cells(&e[..c], child_ac)?;
            let parent = read_cells(&e[c..c + p], parent_ac)?;
            let size = read_cells(&e[c + p..], child_sc)?;
            let offset = addr.checked_sub(child).filter(|&o| o < size)?;
            parent.checked_add(offset)
        })?;
    }
    Some(addr)
}

/// `#address-cells`/`#size-cells` a node imposes on its children (spec §2.3.5; defaults 2 and 1).
fn cell_sizes(node: FdtNode<'_, '_>) -> (usize, usize) {
    // Validation guarantees both properties, when present, hold at least one cell, which is all
    // `cell_sizes` needs. Absurd values are returned as-is and rejected by the callers.
    let sizes = node.cell_sizes();
    (sizes.address_cells, sizes.size_cells)
}

/// A big-endian number of `cells` 32-bit cells. Numbers wider than 64 bits are accepted only when
/// the extra high cells are zero.
fn read_cells(bytes: &[u8], cells: usize) -> Option<u64> {
    if bytes.len() != cells.checked_mul(4)? {
        return None;
    }
    match cells {
        0 => Some(0),
        1 => be32(bytes, 0).map(u64::from),
        _ => {
            let (high, low) = bytes.split_at(bytes.len() - 8);
            high.iter().all(|&b| b == 0).then(|| be64(low, 0)).flatten()
        }
    }
}

fn name_matches(name: &str, component: &str) -> bool {
    if component.contains('@') {
        name == component
    } else {
        name.split('@').next() == Some(component)
    }
}

/// `status` absent, `"okay"` or `"ok"` (spec §2.3.4).
fn is_enabled(node: FdtNode<'_, '_>) -> bool {
    match node.property("status") {
        None => true,
        Some(p) => matches!(as_str(p.value), Some("okay" | "ok")),
    }
}

fn has_compatible(node: FdtNode<'_, '_>, ids: &[&str]) -> bool {
    node.property("compatible").is_some_and(|p| {
        p.value
            .split(|&b| b == 0)
            .any(|s| ids.iter().any(|id| id.as_bytes() == s))
    })
}

/// A string property's value up to its first NUL.
fn as_str(value: &[u8]) -> Option<&str> {
    core::str::from_utf8(value.split(|&b| b == 0).next()?).ok()
}

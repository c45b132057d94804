//! Device tree descriptions of IOMMU topology, the counterpart of the IORT on platforms booted
//! with a flattened device tree (and on QEMU `virt`, which provides both).
//!
//! Bindings decoded here (devicetree bindings, `iommu/iommu.txt`, `pci/pci-iommu.txt`,
//! `pci/pci-msi.txt`, `pci/host-generic-pci.yaml`, `iommu/arm,smmu-v3.yaml`):
//!
//! - `iommu-map` of a PCI host bridge: `(rid-base, iommu-phandle, iommu-base, length)` tuples;
//!   requester ID `r` in `[rid-base, rid-base + length)` (after `iommu-map-mask` is applied) is
//!   StreamID `r - rid-base + iommu-base` on that IOMMU. Note `length` is a count, unlike the
//!   IORT's "number of IDs minus one". `msi-map` has the same layout with an MSI controller.
//! - `iommus` of a platform device: phandle-plus-specifier list, the specifier length being
//!   the target's `#iommu-cells` (1 for SMMUv3: the StreamID).
//! - The SMMUv3 (`arm,smmu-v3`) and generic ECAM host bridge (`pci-host-ecam-generic`) nodes,
//!   and small helpers for QEMU `fw_cfg`, the PL011 UART and the PSCI conduit.
//!
//! The property decoders work on raw property bytes, so they are testable without a blob.
//! The tree walk is this module's own (bounded depth, cell sizes carried down from each
//! parent, no `expect`s on malformed cell properties); the `fdt` crate is used for the blob
//! header, nodes and properties. Note that `fdt` 0.1.5 itself still panics on a structurally
//! corrupt blob (truncated structure block, bad property tags), so a blob from an untrusted
//! source should be checked before it reaches [`fdt::Fdt`].

use core::fmt;
use core::ops::ControlFlow;

use fdt::Fdt;
use fdt::node::FdtNode;

/// Deepest node nesting the walk follows; real trees are 4-6 levels deep.
const MAX_DEPTH: usize = 32;

/// Errors of the device tree decoders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtError {
    /// A property's length does not fit its binding (e.g. `iommu-map` not a multiple of 16).
    BadLength { property: &'static str, len: usize },
    /// A required property is missing.
    MissingProperty { property: &'static str },
    /// Cell counts this decoder cannot handle (e.g. `#address-cells` of 3 for a `reg`).
    UnsupportedCells { property: &'static str, cells: u32 },
    /// No PCI host bridge (for this domain).
    NoHostBridge,
    /// The host bridge has no `iommu-map` (its devices are not behind an IOMMU).
    NoIommuMap,
    /// No `iommu-map` entry covers the requester ID.
    NotMapped { rid: u32 },
    /// No node carries this phandle.
    NoNodeForPhandle { phandle: u32 },
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DtError::BadLength { property, len } => {
                write!(f, "devicetree: property {property} has bad length {len}")
            }
            DtError::MissingProperty { property } => {
                write!(f, "devicetree: missing property {property}")
            }
            DtError::UnsupportedCells { property, cells } => {
                write!(f, "devicetree: {property}: unsupported cell count {cells}")
            }
            DtError::NoHostBridge => write!(f, "devicetree: no PCI host bridge"),
            DtError::NoIommuMap => write!(f, "devicetree: host bridge has no iommu-map"),
            DtError::NotMapped { rid } => {
                write!(
                    f,
                    "devicetree: no iommu-map entry for requester ID {rid:#x}"
                )
            }
            DtError::NoNodeForPhandle { phandle } => {
                write!(f, "devicetree: no node with phandle {phandle:#x}")
            }
        }
    }
}

/// Big-endian cell `index` of `bytes`.
fn cell(bytes: &[u8], index: usize) -> Option<u32> {
    let at = index.checked_mul(4)?;
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A number of 1 or 2 cells (the only address and size widths a CPU address needs).
fn cells_value(bytes: &[u8], first: usize, count: u32) -> Option<u64> {
    match count {
        0 => Some(0),
        1 => cell(bytes, first).map(u64::from),
        2 => Some(
            u64::from(cell(bytes, first)?) << 32 | u64::from(cell(bytes, first.checked_add(1)?)?),
        ),
        _ => None,
    }
}

/// One `iommu-map` (or `msi-map`) tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMapEntry {
    pub rid_base: u32,
    /// Phandle of the IOMMU (or MSI controller).
    pub phandle: u32,
    /// First specifier (StreamID, or MSI DeviceID) of the range.
    pub out_base: u32,
    /// Number of IDs in the range.
    pub length: u32,
}

impl IdMapEntry {
    /// The output ID for an (already masked) requester ID, if this entry covers it. Uses a
    /// subtraction so `rid_base + length` never has to be computed (it may not fit in 32 bits).
    pub fn map(&self, rid: u32) -> Option<u32> {
        let offset = rid.checked_sub(self.rid_base)?;
        if offset < self.length {
            self.out_base.checked_add(offset)
        } else {
            None
        }
    }
}

/// Iterator over the tuples of an [`IdMap`].
#[derive(Clone, Debug)]
pub struct IdMapEntries<'a> {
    bytes: &'a [u8],
}

impl Iterator for IdMapEntries<'_> {
    type Item = IdMapEntry;

    fn next(&mut self) -> Option<IdMapEntry> {
        let e = IdMapEntry {
            rid_base: cell(self.bytes, 0)?,
            phandle: cell(self.bytes, 1)?,
            out_base: cell(self.bytes, 2)?,
            length: cell(self.bytes, 3)?,
        };
        self.bytes = self.bytes.get(16..)?;
        Some(e)
    }
}

/// A decoded `iommu-map` (with its `iommu-map-mask`) or `msi-map` (with `msi-map-mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap<'a> {
    cells: &'a [u8],
    mask: u32,
}

/// The `iommu-map` of a PCI host bridge.
pub type PciIommuMap<'a> = IdMap<'a>;

impl<'a> IdMap<'a> {
    /// Decodes raw property bytes: 4-cell tuples, so the length must be a multiple of 16. The
    /// mask starts as all ones (the binding's default when there is no mask property).
    pub fn from_cells(bytes: &'a [u8]) -> Result<Self, DtError> {
        if !bytes.len().is_multiple_of(16) {
            return Err(DtError::BadLength {
                property: "iommu-map",
                len: bytes.len(),
            });
        }
        Ok(IdMap {
            cells: bytes,
            mask: u32::MAX,
        })
    }

    /// Applies a mask (`iommu-map-mask`), e.g. 0xfff8 to give all functions of a device one
    /// StreamID.
    pub fn with_mask(self, mask: u32) -> Self {
        IdMap { mask, ..self }
    }

    /// Decodes a mask property's raw bytes (one cell).
    pub fn mask_from_cells(bytes: &[u8]) -> Result<u32, DtError> {
        match bytes.len() {
            4 => cell(bytes, 0).ok_or(DtError::BadLength {
                property: "iommu-map-mask",
                len: 4,
            }),
            len => Err(DtError::BadLength {
                property: "iommu-map-mask",
                len,
            }),
        }
    }

    pub const fn mask(&self) -> u32 {
        self.mask
    }

    pub fn entries(&self) -> IdMapEntries<'a> {
        IdMapEntries { bytes: self.cells }
    }

    /// `(iommu phandle, StreamID)` for requester ID `rid`: the first tuple covering the masked
    /// RID (the binding does not define overlaps; the first tuple wins, as in property order).
    pub fn resolve(&self, rid: u32) -> Option<(u32, u32)> {
        let rid = rid & self.mask;
        self.entries().find_map(|e| Some((e.phandle, e.map(rid)?)))
    }
}

/// One entry of an `iommus` property: the IOMMU's phandle and its specifier cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuSpecifier<'a> {
    pub phandle: u32,
    cells: &'a [u8],
}

impl IommuSpecifier<'_> {
    /// Number of specifier cells (the IOMMU's `#iommu-cells`).
    pub const fn cell_count(&self) -> usize {
        self.cells.len() / 4
    }

    pub fn cell(&self, index: usize) -> Option<u32> {
        cell(self.cells, index)
    }

    /// The StreamID: the first specifier cell for SMMUv3 and SMMUv2 (whose optional second
    /// cell is an SMR mask).
    pub fn stream_id(&self) -> Option<u32> {
        self.cell(0)
    }
}

/// Iterator over an `iommus` property. `cells_of` gives `#iommu-cells` of the node with a
/// phandle; a phandle it does not know ends the iteration with an error, since the rest of the
/// property cannot be split without knowing the specifier length.
pub struct Iommus<'a, F> {
    bytes: &'a [u8],
    cells_of: F,
    failed: bool,
}

/// Decodes raw `iommus` bytes; see [`Iommus`].
pub fn parse_iommus<F: FnMut(u32) -> Option<u32>>(bytes: &[u8], cells_of: F) -> Iommus<'_, F> {
    Iommus {
        bytes,
        cells_of,
        failed: false,
    }
}

impl<'a, F: FnMut(u32) -> Option<u32>> Iterator for Iommus<'a, F> {
    type Item = Result<IommuSpecifier<'a>, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.bytes.is_empty() {
            return None;
        }
        let result = (|| {
            let len = self.bytes.len();
            let phandle = cell(self.bytes, 0).ok_or(DtError::BadLength {
                property: "iommus",
                len,
            })?;
            let n = (self.cells_of)(phandle).ok_or(DtError::NoNodeForPhandle { phandle })?;
            // #iommu-cells is small in every binding; a huge value is corrupt.
            if n > 8 {
                return Err(DtError::UnsupportedCells {
                    property: "#iommu-cells",
                    cells: n,
                });
            }
            let end = 4 + 4 * n as usize;
            let cells = self.bytes.get(4..end).ok_or(DtError::BadLength {
                property: "iommus",
                len,
            })?;
            self.bytes = self.bytes.get(end..).unwrap_or(&[]);
            Ok(IommuSpecifier { phandle, cells })
        })();
        if result.is_err() {
            self.failed = true;
        }
        Some(result)
    }
}

/// A CPU-physical MMIO region from a `reg` property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRegion {
    pub base: u64,
    pub size: u64,
}

/// The `n`th `(address, size)` pair of a `reg` property, with the parent's cell sizes.
pub fn reg_entry(
    reg: &[u8],
    address_cells: u32,
    size_cells: u32,
    n: usize,
) -> Result<MmioRegion, DtError> {
    if !(1..=2).contains(&address_cells) {
        return Err(DtError::UnsupportedCells {
            property: "#address-cells",
            cells: address_cells,
        });
    }
    if size_cells > 2 {
        return Err(DtError::UnsupportedCells {
            property: "#size-cells",
            cells: size_cells,
        });
    }
    let stride = (address_cells + size_cells) as usize;
    let first = n.checked_mul(stride).ok_or(DtError::BadLength {
        property: "reg",
        len: reg.len(),
    })?;
    let bad = DtError::BadLength {
        property: "reg",
        len: reg.len(),
    };
    let base = cells_value(reg, first, address_cells).ok_or(bad)?;
    let size_at = first.checked_add(address_cells as usize).ok_or(bad)?;
    let size = cells_value(reg, size_at, size_cells).ok_or(bad)?;
    Ok(MmioRegion { base, size })
}

/// Address spaces of a PCI `ranges` entry (phys.hi bits 25:24, PCI bus binding §2.2.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciSpace {
    Config,
    Io,
    Mem32,
    Mem64,
}

/// One window of a PCI host bridge's `ranges`: PCI addresses `pci_address..+size` appear at
/// CPU address `cpu_address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    pub space: PciSpace,
    pub prefetchable: bool,
    pub pci_address: u64,
    pub cpu_address: u64,
    pub size: u64,
}

/// Iterator over a PCI host bridge's `ranges`: 3 PCI address cells, the parent's address
/// cells, then the bridge's size cells per entry.
#[derive(Clone, Debug)]
pub struct PciRanges<'a> {
    bytes: &'a [u8],
    parent_address_cells: u32,
    size_cells: u32,
}

impl<'a> PciRanges<'a> {
    /// Decodes raw `ranges` bytes; the length must be a whole number of entries.
    pub fn from_cells(
        bytes: &'a [u8],
        parent_address_cells: u32,
        size_cells: u32,
    ) -> Result<Self, DtError> {
        if !(1..=2).contains(&parent_address_cells) {
            return Err(DtError::UnsupportedCells {
                property: "#address-cells",
                cells: parent_address_cells,
            });
        }
        if !(1..=2).contains(&size_cells) {
            return Err(DtError::UnsupportedCells {
                property: "#size-cells",
                cells: size_cells,
            });
        }
        let entry = 4 * (3 + parent_address_cells + size_cells) as usize;
        if !bytes.len().is_multiple_of(entry) {
            return Err(DtError::BadLength {
                property: "ranges",
                len: bytes.len(),
            });
        }
        Ok(PciRanges {
            bytes,
            parent_address_cells,
            size_cells,
        })
    }
}

impl Iterator for PciRanges<'_> {
    type Item = PciWindow;

    fn next(&mut self) -> Option<PciWindow> {
        let b = self.bytes;
        let hi = cell(b, 0)?;
        let pci_address = cells_value(b, 1, 2)?;
        let cpu_address = cells_value(b, 3, self.parent_address_cells)?;
        let size = cells_value(b, 3 + self.parent_address_cells as usize, self.size_cells)?;
        let entry = 4 * (3 + self.parent_address_cells + self.size_cells) as usize;
        self.bytes = b.get(entry..)?;
        let space = match (hi >> 24) & 3 {
            0 => PciSpace::Config,
            1 => PciSpace::Io,
            2 => PciSpace::Mem32,
            _ => PciSpace::Mem64,
        };
        Some(PciWindow {
            space,
            prefetchable: hi & (1 << 30) != 0,
            pci_address,
            cpu_address,
            size,
        })
    }
}

/// Iterator over the strings of a stringlist property (`compatible`, `interrupt-names`).
#[derive(Clone, Debug)]
pub struct StrList<'a> {
    bytes: &'a [u8],
}

impl<'a> Iterator for StrList<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.bytes.is_empty() {
            return None;
        }
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.bytes.len());
        let s = self.bytes.get(..end)?;
        self.bytes = self.bytes.get(end + 1..).unwrap_or(&[]);
        // A non-UTF-8 entry reads as empty rather than ending the list.
        Some(core::str::from_utf8(s).unwrap_or(""))
    }
}

/// One interrupt specifier (raw cells; their meaning is the interrupt controller's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptSpec<'a> {
    cells: &'a [u8],
}

impl InterruptSpec<'_> {
    pub fn cell(&self, i: usize) -> Option<u32> {
        cell(self.cells, i)
    }

    pub const fn cell_count(&self) -> usize {
        self.cells.len() / 4
    }

    /// The GIC interrupt ID of a 3-cell GIC specifier (type 0 SPI: number + 32; type 1 PPI:
    /// number + 16), per the `arm,gic` bindings.
    pub fn gic_intid(&self) -> Option<u32> {
        if self.cell_count() != 3 {
            return None;
        }
        match self.cell(0)? {
            0 => self.cell(1)?.checked_add(32),
            1 => self.cell(1)?.checked_add(16),
            _ => None,
        }
    }
}

/// An `arm,smmu-v3` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuV3Node<'a> {
    pub name: &'a str,
    pub phandle: Option<u32>,
    pub base: u64,
    pub size: u64,
    pub dma_coherent: bool,
    pub iommu_cells: Option<u32>,
    /// `#interrupt-cells` of the interrupt parent, if it could be found.
    pub interrupt_cells: Option<u32>,
    interrupts: &'a [u8],
    interrupt_names: &'a [u8],
}

impl<'a> SmmuV3Node<'a> {
    /// `interrupt-names` (binding: "eventq", "priq", "cmdq-sync", "gerror", or "combined").
    pub fn interrupt_names(&self) -> StrList<'a> {
        StrList {
            bytes: self.interrupt_names,
        }
    }

    /// The `index`th interrupt specifier.
    pub fn interrupt(&self, index: usize) -> Option<InterruptSpec<'a>> {
        let n = self.interrupt_cells? as usize;
        if n == 0 {
            return None;
        }
        let start = index.checked_mul(n)?.checked_mul(4)?;
        let cells = self.interrupts.get(start..start.checked_add(4 * n)?)?;
        Some(InterruptSpec { cells })
    }

    /// The interrupt named `name` in `interrupt-names`.
    pub fn interrupt_by_name(&self, name: &str) -> Option<InterruptSpec<'a>> {
        let index = self.interrupt_names().position(|n| n == name)?;
        self.interrupt(index)
    }
}

/// A generic ECAM PCI host bridge (`pci-host-ecam-generic`).
#[derive(Clone, Debug)]
pub struct PciHostBridge<'a> {
    pub name: &'a str,
    /// The ECAM window (`reg`), which starts at the first bus of `bus-range`.
    pub ecam: MmioRegion,
    pub bus_start: u32,
    pub bus_end: u32,
    /// `linux,pci-domain`, which matches the IORT/MCFG PCI segment.
    pub domain: Option<u32>,
    pub dma_coherent: bool,
    pub iommu_map: Option<PciIommuMap<'a>>,
    pub msi_map: Option<IdMap<'a>>,
    pub msi_parent: Option<u32>,
    ranges: PciRanges<'a>,
}

impl<'a> PciHostBridge<'a> {
    /// The MMIO and I/O windows (`ranges`).
    pub fn windows(&self) -> PciRanges<'a> {
        self.ranges.clone()
    }

    /// CPU address of the configuration space of `bus:dev.func` (ECAM: 1 MiB per bus, 32 KiB
    /// per device, 4 KiB per function).
    pub fn ecam_address(&self, bus: u32, dev: u32, func: u32) -> Option<u64> {
        if bus < self.bus_start || bus > self.bus_end || dev > 31 || func > 7 {
            return None;
        }
        let offset =
            u64::from(bus - self.bus_start) << 20 | u64::from(dev) << 15 | u64::from(func) << 12;
        if offset >= self.ecam.size {
            return None;
        }
        self.ecam.base.checked_add(offset)
    }
}

/// The SMMU (IOMMU) a PCI requester ID's DMA goes through, per the device tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtResolution {
    pub iommu_phandle: u32,
    /// Base of the IOMMU's first `reg` region.
    pub iommu_base: u64,
    pub stream_id: u32,
}

/// PSCI conduit (`method` of the `arm,psci*` node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciMethod {
    Smc,
    Hvc,
}

/// What the walk knows about a node from its ancestors.
#[derive(Clone, Copy, Debug)]
struct Ctx {
    /// `#address-cells` / `#size-cells` of the parent: the layout of this node's `reg`.
    address_cells: u32,
    size_cells: u32,
    /// Inherited `interrupt-parent` phandle.
    interrupt_parent: Option<u32>,
}

fn prop<'a>(node: FdtNode<'_, 'a>, name: &str) -> Option<&'a [u8]> {
    node.properties().find(|p| p.name == name).map(|p| p.value)
}

/// A one-cell property; `None` if absent or not exactly one cell.
fn prop_u32(node: FdtNode<'_, '_>, name: &str) -> Option<u32> {
    let v = prop(node, name)?;
    if v.len() == 4 { cell(v, 0) } else { None }
}

fn phandle_of(node: FdtNode<'_, '_>) -> Option<u32> {
    prop_u32(node, "phandle").or_else(|| prop_u32(node, "linux,phandle"))
}

fn is_compatible(node: FdtNode<'_, '_>, compat: &str) -> bool {
    prop(node, "compatible").is_some_and(|b| StrList { bytes: b }.any(|c| c == compat))
}

/// Visits every node depth-first (at most [`MAX_DEPTH`] deep) with its context, until `f`
/// breaks.
fn walk<'b, 'a, T>(
    fdt: &'b Fdt<'a>,
    f: &mut dyn FnMut(FdtNode<'b, 'a>, Ctx) -> ControlFlow<T>,
) -> Option<T> {
    let root = fdt.find_node("/")?;
    // The root's own `reg` (rarely present) uses the spec defaults.
    let ctx = Ctx {
        address_cells: 2,
        size_cells: 1,
        interrupt_parent: None,
    };
    match walk_node(root, ctx, 0, f) {
        ControlFlow::Break(t) => Some(t),
        ControlFlow::Continue(()) => None,
    }
}

fn walk_node<'b, 'a, T>(
    node: FdtNode<'b, 'a>,
    ctx: Ctx,
    depth: usize,
    f: &mut dyn FnMut(FdtNode<'b, 'a>, Ctx) -> ControlFlow<T>,
) -> ControlFlow<T> {
    f(node, ctx)?;
    if depth >= MAX_DEPTH {
        return ControlFlow::Continue(());
    }
    // Children's `reg` layout comes from this node; absent properties mean 2 and 1 (DT spec
    // §2.3.5). `interrupt-parent` is inherited until a node names its own.
    let child_ctx = Ctx {
        address_cells: prop_u32(node, "#address-cells").unwrap_or(2),
        size_cells: prop_u32(node, "#size-cells").unwrap_or(1),
        interrupt_parent: prop_u32(node, "interrupt-parent").or(ctx.interrupt_parent),
    };
    for child in node.children() {
        walk_node(child, child_ctx, depth + 1, f)?;
    }
    ControlFlow::Continue(())
}

/// The node with `phandle` and its context.
fn find_phandle<'b, 'a>(fdt: &'b Fdt<'a>, phandle: u32) -> Option<(FdtNode<'b, 'a>, Ctx)> {
    walk(fdt, &mut |n, ctx| {
        if phandle_of(n) == Some(phandle) {
            ControlFlow::Break((n, ctx))
        } else {
            ControlFlow::Continue(())
        }
    })
}

/// The `index`th node compatible with `compat`, and its context.
fn nth_compatible<'b, 'a>(
    fdt: &'b Fdt<'a>,
    compat: &str,
    index: usize,
) -> Option<(FdtNode<'b, 'a>, Ctx)> {
    let mut seen = 0;
    walk(fdt, &mut |n, ctx| {
        if is_compatible(n, compat) {
            if seen == index {
                return ControlFlow::Break((n, ctx));
            }
            seen += 1;
        }
        ControlFlow::Continue(())
    })
}

fn first_reg(node: FdtNode<'_, '_>, ctx: Ctx) -> Result<MmioRegion, DtError> {
    let reg = prop(node, "reg").ok_or(DtError::MissingProperty { property: "reg" })?;
    reg_entry(reg, ctx.address_cells, ctx.size_cells, 0)
}

fn decode_smmuv3<'a>(
    fdt: &Fdt<'a>,
    node: FdtNode<'_, 'a>,
    ctx: Ctx,
) -> Result<SmmuV3Node<'a>, DtError> {
    let reg = first_reg(node, ctx)?;
    let parent = prop_u32(node, "interrupt-parent").or(ctx.interrupt_parent);
    let interrupt_cells = parent
        .and_then(|p| find_phandle(fdt, p))
        .and_then(|(n, _)| prop_u32(n, "#interrupt-cells"));
    Ok(SmmuV3Node {
        name: node.name,
        phandle: phandle_of(node),
        base: reg.base,
        size: reg.size,
        dma_coherent: prop(node, "dma-coherent").is_some(),
        iommu_cells: prop_u32(node, "#iommu-cells"),
        interrupt_cells,
        interrupts: prop(node, "interrupts").unwrap_or(&[]),
        interrupt_names: prop(node, "interrupt-names").unwrap_or(&[]),
    })
}

/// Iterator over the `arm,smmu-v3` nodes of a tree. Each step re-walks the tree (no
/// allocation); trees have at most a few hundred nodes and a handful of SMMUs.
pub struct SmmuV3Nodes<'b, 'a> {
    fdt: &'b Fdt<'a>,
    next: usize,
}

impl<'a> Iterator for SmmuV3Nodes<'_, 'a> {
    type Item = Result<SmmuV3Node<'a>, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (node, ctx) = nth_compatible(self.fdt, "arm,smmu-v3", self.next)?;
        self.next += 1;
        Some(decode_smmuv3(self.fdt, node, ctx))
    }
}

/// All SMMUv3 nodes.
pub fn smmuv3_nodes<'b, 'a>(fdt: &'b Fdt<'a>) -> SmmuV3Nodes<'b, 'a> {
    SmmuV3Nodes { fdt, next: 0 }
}

fn decode_host_bridge<'a>(node: FdtNode<'_, 'a>, ctx: Ctx) -> Result<PciHostBridge<'a>, DtError> {
    let ecam = first_reg(node, ctx)?;
    let (bus_start, bus_end) = match prop(node, "bus-range") {
        None => (0, 255),
        Some(b) if b.len() == 8 => (cell(b, 0).unwrap_or(0), cell(b, 1).unwrap_or(255)),
        Some(b) => {
            return Err(DtError::BadLength {
                property: "bus-range",
                len: b.len(),
            });
        }
    };
    let iommu_map = match prop(node, "iommu-map") {
        None => None,
        Some(b) => {
            let map = IdMap::from_cells(b)?;
            Some(match prop(node, "iommu-map-mask") {
                Some(m) => map.with_mask(IdMap::mask_from_cells(m)?),
                None => map,
            })
        }
    };
    let msi_map = match prop(node, "msi-map") {
        None => None,
        Some(b) => {
            let map = IdMap::from_cells(b).map_err(|_| DtError::BadLength {
                property: "msi-map",
                len: b.len(),
            })?;
            Some(match prop(node, "msi-map-mask") {
                Some(m) => map.with_mask(IdMap::mask_from_cells(m)?),
                None => map,
            })
        }
    };
    let size_cells = prop_u32(node, "#size-cells").unwrap_or(2);
    let ranges = PciRanges::from_cells(
        prop(node, "ranges").unwrap_or(&[]),
        ctx.address_cells,
        size_cells,
    )?;
    Ok(PciHostBridge {
        name: node.name,
        ecam,
        bus_start,
        bus_end,
        domain: prop_u32(node, "linux,pci-domain"),
        dma_coherent: prop(node, "dma-coherent").is_some(),
        iommu_map,
        msi_map,
        msi_parent: prop(node, "msi-parent").and_then(|b| cell(b, 0)),
        ranges,
    })
}

/// The generic ECAM host bridge of PCI domain `domain`: the one whose `linux,pci-domain`
/// matches, or, for domain 0 in a tree that numbers no domains, the first one.
pub fn pci_host_bridge<'a>(fdt: &Fdt<'a>, domain: u32) -> Result<PciHostBridge<'a>, DtError> {
    let mut index = 0;
    let mut first = None;
    while let Some((node, ctx)) = nth_compatible(fdt, "pci-host-ecam-generic", index) {
        let bridge = decode_host_bridge(node, ctx)?;
        if bridge.domain == Some(domain) {
            return Ok(bridge);
        }
        if first.is_none() && bridge.domain.is_none() {
            first = Some(bridge);
        }
        index += 1;
    }
    first.filter(|_| domain == 0).ok_or(DtError::NoHostBridge)
}

/// The IOMMU and StreamID of PCI requester ID `rid` in `domain`, through the host bridge's
/// `iommu-map` and the IOMMU node's `reg`.
pub fn resolve_pci_rid(fdt: &Fdt<'_>, domain: u32, rid: u32) -> Result<DtResolution, DtError> {
    let bridge = pci_host_bridge(fdt, domain)?;
    let map = bridge.iommu_map.ok_or(DtError::NoIommuMap)?;
    let (phandle, stream_id) = map.resolve(rid).ok_or(DtError::NotMapped { rid })?;
    let (node, ctx) = find_phandle(fdt, phandle).ok_or(DtError::NoNodeForPhandle { phandle })?;
    let reg = first_reg(node, ctx)?;
    Ok(DtResolution {
        iommu_phandle: phandle,
        iommu_base: reg.base,
        stream_id,
    })
}

/// The `iommus` of a device node, specifier lengths taken from each IOMMU's `#iommu-cells`.
/// `None` if the node has no `iommus`.
pub fn device_iommus<'b, 'a>(
    fdt: &'b Fdt<'a>,
    node: FdtNode<'b, 'a>,
) -> Option<Iommus<'a, impl FnMut(u32) -> Option<u32> + 'b>> {
    let bytes = prop(node, "iommus")?;
    Some(parse_iommus(bytes, move |phandle| {
        find_phandle(fdt, phandle).and_then(|(n, _)| prop_u32(n, "#iommu-cells"))
    }))
}

/// The first node compatible with `compat` (a convenience over the bounded walk).
pub fn find_compatible<'b, 'a>(fdt: &'b Fdt<'a>, compat: &str) -> Option<FdtNode<'b, 'a>> {
    nth_compatible(fdt, compat, 0).map(|(n, _)| n)
}

/// The first `reg` region of the first node compatible with `compat`.
fn compatible_region(fdt: &Fdt<'_>, compat: &str) -> Option<Result<MmioRegion, DtError>> {
    nth_compatible(fdt, compat, 0).map(|(n, ctx)| first_reg(n, ctx))
}

/// QEMU's `fw_cfg` MMIO interface (`qemu,fw-cfg-mmio`).
pub fn fw_cfg(fdt: &Fdt<'_>) -> Option<Result<MmioRegion, DtError>> {
    compatible_region(fdt, "qemu,fw-cfg-mmio")
}

/// The first PL011 UART (`arm,pl011`).
pub fn pl011(fdt: &Fdt<'_>) -> Option<Result<MmioRegion, DtError>> {
    compatible_region(fdt, "arm,pl011")
}

/// The PSCI conduit, from the `/psci` node's `method` (`arm,psci`, `-0.2`, `-1.0`).
pub fn psci_method(fdt: &Fdt<'_>) -> Option<PsciMethod> {
    let node = ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]
        .iter()
        .find_map(|c| nth_compatible(fdt, c, 0))?
        .0;
    match prop(node, "method")? {
        b"smc\0" | b"smc" => Some(PsciMethod::Smc),
        b"hvc\0" | b"hvc" => Some(PsciMethod::Hvc),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Big-endian cells as property bytes.
    fn be(cells: &[u32]) -> Vec<u8> {
        cells.iter().flat_map(|c| c.to_be_bytes()).collect()
    }

    /// `qemu-system-aarch64 -M virt-10.0,virtualization=on,iommu=smmuv3,gic-version=3,
    /// dumpdtb=... -cpu max -m 128M -device edu` (QEMU 10), re-packed with
    /// `dtc -I dtb -O dtb` to drop QEMU's 1 MiB of zero padding (`dtc -O dts` of the two is
    /// identical).
    const QEMU_VIRT_DTB: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/qemu-virt-smmuv3.dtb"
    ));

    fn qemu() -> Fdt<'static> {
        Fdt::new(QEMU_VIRT_DTB).unwrap()
    }

    #[test]
    fn iommu_map_cells_and_resolve() {
        // RIDs 0x000..0x0ff -> SMMU 0x10 StreamIDs 0x1000..; RIDs 0x100..0x17f -> SMMU 0x11
        // StreamIDs 0..; RID 0x200 alone -> 0x42.
        let raw = be(&[
            0x0, 0x10, 0x1000, 0x100, 0x100, 0x11, 0, 0x80, 0x200, 0x10, 0x42, 1,
        ]);
        let map = PciIommuMap::from_cells(&raw).unwrap();
        assert_eq!(map.mask(), u32::MAX);
        let entries: Vec<_> = map.entries().collect();
        assert_eq!(
            entries,
            [
                IdMapEntry {
                    rid_base: 0,
                    phandle: 0x10,
                    out_base: 0x1000,
                    length: 0x100
                },
                IdMapEntry {
                    rid_base: 0x100,
                    phandle: 0x11,
                    out_base: 0,
                    length: 0x80
                },
                IdMapEntry {
                    rid_base: 0x200,
                    phandle: 0x10,
                    out_base: 0x42,
                    length: 1
                },
            ]
        );
        assert_eq!(map.resolve(0x0008), Some((0x10, 0x1008)));
        assert_eq!(map.resolve(0x00ff), Some((0x10, 0x10ff)));
        // `length` is a count: rid-base + length is outside.
        assert_eq!(map.resolve(0x0100), Some((0x11, 0)));
        assert_eq!(map.resolve(0x017f), Some((0x11, 0x7f)));
        assert_eq!(map.resolve(0x0180), None);
        assert_eq!(map.resolve(0x0200), Some((0x10, 0x42)));
        assert_eq!(map.resolve(0x0201), None);
        assert_eq!(map.resolve(u32::MAX), None);
    }

    #[test]
    fn iommu_map_mask() {
        // iommu-map-mask = <0xfff8>: all functions of a device share the StreamID of function 0,
        // and bits above 16 are dropped.
        let raw = be(&[0, 0x20, 0x800, 0x10000]);
        let mask = IdMap::mask_from_cells(&be(&[0xfff8])).unwrap();
        let map = PciIommuMap::from_cells(&raw).unwrap().with_mask(mask);
        assert_eq!(map.resolve(0x0008), Some((0x20, 0x808)));
        assert_eq!(map.resolve(0x000f), Some((0x20, 0x808)));
        assert_eq!(map.resolve(0x0107), Some((0x20, 0x900)));
        assert_eq!(map.resolve(0x1_0009), Some((0x20, 0x808)));
        assert_eq!(
            IdMap::mask_from_cells(&[0, 0, 0xff]),
            Err(DtError::BadLength {
                property: "iommu-map-mask",
                len: 3
            })
        );
    }

    #[test]
    fn iommu_map_rejects_partial_tuples_and_overflow() {
        assert_eq!(
            PciIommuMap::from_cells(&be(&[0, 1, 2])),
            Err(DtError::BadLength {
                property: "iommu-map",
                len: 12
            })
        );
        assert_eq!(PciIommuMap::from_cells(&[]).unwrap().resolve(0), None);
        // An output range that would pass 2^32 stops mapping instead of wrapping.
        let raw = be(&[0, 1, 0xffff_fff0, 0x100]);
        let map = PciIommuMap::from_cells(&raw).unwrap();
        assert_eq!(map.resolve(0xf), Some((1, 0xffff_ffff)));
        assert_eq!(map.resolve(0x10), None);
        // A range whose end passes 2^32 still matches without overflowing.
        let raw = be(&[0xffff_ff00, 1, 0, u32::MAX]);
        assert_eq!(
            PciIommuMap::from_cells(&raw).unwrap().resolve(u32::MAX),
            Some((1, 0xff))
        );
    }

    #[test]
    fn iommus_specifiers() {
        // <&smmu3 0x10>, <&smmu2 0x400 0x7f80>, <&smmu3 0x11>.
        let raw = be(&[0x8004, 0x10, 0x8005, 0x400, 0x7f80, 0x8004, 0x11]);
        let cells = |p| match p {
            0x8004 => Some(1),
            0x8005 => Some(2),
            _ => None,
        };
        let specs: Vec<_> = parse_iommus(&raw, cells).map(Result::unwrap).collect();
        assert_eq!(specs.len(), 3);
        assert_eq!(
            (
                specs[0].phandle,
                specs[0].stream_id(),
                specs[0].cell_count()
            ),
            (0x8004, Some(0x10), 1)
        );
        assert_eq!(
            (specs[1].phandle, specs[1].stream_id(), specs[1].cell(1)),
            (0x8005, Some(0x400), Some(0x7f80))
        );
        assert_eq!(specs[2].stream_id(), Some(0x11));
        // Unknown phandle: an error, then the iteration stops.
        let mut it = parse_iommus(&raw[..], |_| None);
        assert_eq!(
            it.next(),
            Some(Err(DtError::NoNodeForPhandle { phandle: 0x8004 }))
        );
        assert_eq!(it.next(), None);
        // Truncated specifier.
        let short = be(&[0x8005, 0x400]);
        let r: Vec<_> = parse_iommus(&short, cells).collect();
        assert_eq!(
            r,
            [Err(DtError::BadLength {
                property: "iommus",
                len: 8
            })]
        );
        // Absurd #iommu-cells.
        let r: Vec<_> = parse_iommus(&raw, |_| Some(u32::MAX)).collect();
        assert_eq!(
            r,
            [Err(DtError::UnsupportedCells {
                property: "#iommu-cells",
                cells: u32::MAX
            })]
        );
    }

    #[test]
    fn pci_ranges_decode() {
        // QEMU virt: I/O 64 KiB at 0x3eff0000, 32-bit MMIO 0x10000000..+0x2eff0000, 64-bit
        // MMIO 512 GiB at 512 GiB (phys.hi space codes 01, 10, 11).
        let raw = be(&[
            0x0100_0000,
            0,
            0,
            0,
            0x3eff_0000,
            0,
            0x1_0000, //
            0x0200_0000,
            0,
            0x1000_0000,
            0,
            0x1000_0000,
            0,
            0x2eff_0000, //
            0x4300_0000,
            0x80,
            0,
            0x80,
            0,
            0x80,
            0,
        ]);
        let w: Vec<_> = PciRanges::from_cells(&raw, 2, 2).unwrap().collect();
        assert_eq!(
            w,
            [
                PciWindow {
                    space: PciSpace::Io,
                    prefetchable: false,
                    pci_address: 0,
                    cpu_address: 0x3eff_0000,
                    size: 0x1_0000
                },
                PciWindow {
                    space: PciSpace::Mem32,
                    prefetchable: false,
                    pci_address: 0x1000_0000,
                    cpu_address: 0x1000_0000,
                    size: 0x2eff_0000
                },
                PciWindow {
                    space: PciSpace::Mem64,
                    prefetchable: true,
                    pci_address: 0x80_0000_0000,
                    cpu_address: 0x80_0000_0000,
                    size: 0x80_0000_0000
                },
            ]
        );
        // 20 bytes are not a whole number of 28-byte entries (3 + 2 + 2 cells).
        assert_eq!(
            PciRanges::from_cells(&raw[..20], 2, 2).err(),
            Some(DtError::BadLength {
                property: "ranges",
                len: 20
            })
        );
        assert_eq!(
            PciRanges::from_cells(&raw, 3, 2).err(),
            Some(DtError::UnsupportedCells {
                property: "#address-cells",
                cells: 3
            })
        );
    }

    #[test]
    fn reg_entries() {
        let raw = be(&[0x40, 0x1000_0000, 0, 0x1000_0000]);
        assert_eq!(
            reg_entry(&raw, 2, 2, 0),
            Ok(MmioRegion {
                base: 0x40_1000_0000,
                size: 0x1000_0000
            })
        );
        assert_eq!(
            reg_entry(&raw, 1, 1, 1),
            Ok(MmioRegion {
                base: 0,
                size: 0x1000_0000
            })
        );
        // Past the one 16-byte entry; an index whose cell offset overflows; an index whose
        // offset fits but lands far past the end: all the same length error, never a panic.
        let short = Err(DtError::BadLength {
            property: "reg",
            len: 16,
        });
        assert_eq!(reg_entry(&raw, 2, 2, 1), short);
        assert_eq!(
            reg_entry(&raw, 3, 1, 0),
            Err(DtError::UnsupportedCells {
                property: "#address-cells",
                cells: 3
            })
        );
        assert_eq!(reg_entry(&raw, 2, 2, usize::MAX), short);
        assert_eq!(reg_entry(&raw, 1, 0, usize::MAX), short);
        assert_eq!(reg_entry(&raw, 2, 2, usize::MAX / 4), short);
    }

    proptest::proptest! {
        /// The raw-property decoders take any bytes and any cell counts without panicking.
        #[test]
        fn property_decoders_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            rid in proptest::prelude::any::<u32>(),
            mask in proptest::prelude::any::<u32>(),
            ac in 0u32..5,
            sc in 0u32..5,
            n in proptest::prelude::any::<usize>(),
            cells in proptest::prelude::any::<u32>(),
        ) {
            if let Ok(map) = IdMap::from_cells(&bytes) {
                let _ = map.with_mask(mask).resolve(rid);
                proptest::prop_assert_eq!(map.entries().count(), bytes.len() / 16);
            }
            let _ = IdMap::mask_from_cells(&bytes);
            let _ = parse_iommus(&bytes, |p| Some(p % 4)).take(100).count();
            let _ = parse_iommus(&bytes, |_| Some(cells)).take(100).count();
            let _ = reg_entry(&bytes, ac, sc, n);
            let _ = reg_entry(&bytes, ac, sc, n % 8);
            if let Ok(r) = PciRanges::from_cells(&bytes, ac, sc) {
                let _ = r.count();
            }
            let _ = StrList { bytes: &bytes }.count();
            let spec = SmmuV3Node {
                name: "",
                phandle: None,
                base: 0,
                size: 0,
                dma_coherent: false,
                iommu_cells: None,
                interrupt_cells: Some(cells),
                interrupts: &bytes,
                interrupt_names: &bytes,
            };
            let _ = spec.interrupt(n).map(|i| i.gic_intid());
            let _ = spec.interrupt(n % 8).map(|i| i.gic_intid());
            let _ = spec.interrupt_by_name("eventq");
        }
    }

    #[test]
    fn qemu_virt_smmuv3_node() {
        let fdt = qemu();
        let smmus: Vec<_> = smmuv3_nodes(&fdt).map(Result::unwrap).collect();
        assert_eq!(smmus.len(), 1);
        let s = smmus[0];
        assert_eq!(s.name, "smmuv3@9050000");
        assert_eq!((s.base, s.size), (0x905_0000, 0x2_0000));
        assert!(s.dma_coherent);
        assert_eq!(s.iommu_cells, Some(1));
        assert_eq!(s.phandle, Some(0x8004));
        assert_eq!(
            s.interrupt_cells,
            Some(3),
            "GICv3 #interrupt-cells via the root's interrupt-parent"
        );
        let names: Vec<_> = s.interrupt_names().collect();
        assert_eq!(names, ["eventq", "priq", "cmdq-sync", "gerror"]);
        // SPIs 0x4a..0x4d, edge-triggered: the same GSIVs 106..109 as QEMU's IORT.
        assert_eq!(
            s.interrupt_by_name("eventq").unwrap().gic_intid(),
            Some(106)
        );
        assert_eq!(
            s.interrupt_by_name("gerror").unwrap().gic_intid(),
            Some(109)
        );
        assert_eq!(s.interrupt_by_name("gerror").unwrap().cell(2), Some(1));
        assert_eq!(s.interrupt(4), None);
        assert_eq!(s.interrupt_by_name("combined"), None);
    }

    #[test]
    fn qemu_virt_pci_host_bridge() {
        let fdt = qemu();
        let pci = pci_host_bridge(&fdt, 0).unwrap();
        assert_eq!(pci.name, "pcie@10000000");
        assert_eq!(
            pci.ecam,
            MmioRegion {
                base: 0x40_1000_0000,
                size: 0x1000_0000
            }
        );
        assert_eq!((pci.bus_start, pci.bus_end), (0, 0xff));
        assert_eq!(pci.domain, Some(0));
        assert!(pci.dma_coherent);
        let map = pci.iommu_map.unwrap();
        assert_eq!(
            map.entries().collect::<Vec<_>>(),
            [IdMapEntry {
                rid_base: 0,
                phandle: 0x8004,
                out_base: 0,
                length: 0x1_0000
            }]
        );
        assert_eq!(map.mask(), u32::MAX);
        let msi = pci.msi_map.unwrap();
        assert_eq!(msi.resolve(0x8), Some((0x8003, 0x8)), "msi-map to the ITS");
        let spaces: Vec<_> = pci
            .windows()
            .map(|w| (w.space, w.cpu_address, w.size))
            .collect();
        assert_eq!(
            spaces,
            [
                (PciSpace::Io, 0x3eff_0000, 0x1_0000),
                (PciSpace::Mem32, 0x1000_0000, 0x2eff_0000),
                (PciSpace::Mem64, 0x80_0000_0000, 0x80_0000_0000),
            ]
        );
        assert_eq!(pci.ecam_address(0, 1, 0), Some(0x40_1000_8000));
        assert_eq!(pci.ecam_address(0xff, 31, 7), Some(0x40_1fff_f000));
        assert_eq!(pci.ecam_address(0x100, 0, 0), None);
        assert_eq!(pci_host_bridge(&fdt, 1).unwrap_err(), DtError::NoHostBridge);
    }

    #[test]
    fn qemu_virt_rid_to_stream_id() {
        let fdt = qemu();
        assert_eq!(
            resolve_pci_rid(&fdt, 0, 0x0008),
            Ok(DtResolution {
                iommu_phandle: 0x8004,
                iommu_base: 0x905_0000,
                stream_id: 0x8
            })
        );
        assert_eq!(resolve_pci_rid(&fdt, 0, 0xffff).unwrap().stream_id, 0xffff);
        assert_eq!(
            resolve_pci_rid(&fdt, 0, 0x1_0000),
            Err(DtError::NotMapped { rid: 0x1_0000 })
        );
        assert_eq!(resolve_pci_rid(&fdt, 3, 0), Err(DtError::NoHostBridge));
    }

    #[test]
    fn qemu_virt_dt_and_iort_agree() {
        // The hypervisor cross-checks the two firmware descriptions; on QEMU virt they match.
        let fdt = qemu();
        let iort_bytes = crate::firmware::iort::tests::qemu_virt_iort();
        let iort = crate::firmware::iort::Iort::parse(&iort_bytes).unwrap();
        for rid in [0u32, 0x8, 0x100, 0xffff] {
            let dt = resolve_pci_rid(&fdt, 0, rid).unwrap();
            let acpi = iort.resolve_rid(0, rid).unwrap();
            assert_eq!(
                (dt.iommu_base, dt.stream_id),
                (acpi.base_address, acpi.stream_id)
            );
        }
    }

    #[test]
    fn qemu_virt_small_nodes() {
        let fdt = qemu();
        assert_eq!(
            fw_cfg(&fdt),
            Some(Ok(MmioRegion {
                base: 0x902_0000,
                size: 0x18
            }))
        );
        assert_eq!(
            pl011(&fdt),
            Some(Ok(MmioRegion {
                base: 0x900_0000,
                size: 0x1000
            }))
        );
        assert_eq!(psci_method(&fdt), Some(PsciMethod::Smc));
        assert!(find_compatible(&fdt, "arm,gic-v3").is_some());
        assert!(find_compatible(&fdt, "no,such-device").is_none());
        // Platform devices on QEMU virt have no `iommus`.
        let uart = find_compatible(&fdt, "arm,pl011").unwrap();
        assert!(device_iommus(&fdt, uart).is_none());
        // The ITS (a grandchild of the root) is found by phandle with its parent's cells.
        let (its, ctx) = find_phandle(&fdt, 0x8003).unwrap();
        assert!(its.name.starts_with("its@"));
        assert_eq!(first_reg(its, ctx).unwrap().base, 0x808_0000);
    }
}

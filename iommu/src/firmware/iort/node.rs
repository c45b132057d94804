//! IORT nodes (DEN 0049, "IORT nodes"): the common node header, the ID mapping format, and the decoded
//! node-specific fields of every node type the specification defines.
//!
//! A [`Node`] is decoded from the table bytes in one go by [`Node::decode`], which checks every
//! length and offset the node declares. [`super::Iort::parse`] runs it over every node before it
//! hands out an [`super::Iort`], so the accessors here never fail afterwards.

use super::IortError;
use crate::firmware::acpi::{Reader, TableError};

/// Size of the header every node starts with (DEN 0049 "IORT node header"): type, length, revision,
/// identifier, number of ID mappings, reference to the ID array.
pub const NODE_HEADER_LEN: usize = 16;

/// Size of one ID mapping entry (DEN 0049 "ID mapping format").
pub const ID_MAPPING_LEN: usize = 20;

/// Size of one SMMUv1/v2 interrupt entry (GSIV + flags, DEN 0049 "SMMUv1/v2 node", interrupt arrays).
const INTERRUPT_LEN: usize = 8;

/// Size of one RMR memory range descriptor (DEN 0049 "RMR node", memory range descriptor).
const MEMORY_RANGE_LEN: usize = 20;

/// The node types of DEN 0049 (the node header's "Type" field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeType {
    /// 0: a group of GIC ITS blocks (MSI targets).
    ItsGroup,
    /// 1: a platform device named by an ACPI namespace path.
    NamedComponent,
    /// 2: a PCI root complex (one PCI segment).
    RootComplex,
    /// 3: an SMMUv1 or SMMUv2.
    SmmuV1V2,
    /// 4: an SMMUv3.
    SmmuV3,
    /// 5: a performance monitoring counter group (SMMUv3 PMCG).
    Pmcg,
    /// 6: reserved memory ranges that must stay mapped (RMR).
    Rmr,
    /// A type this parser does not know; the node is kept as raw bytes.
    Unknown(u8),
}

impl NodeType {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            0 => NodeType::ItsGroup,
            1 => NodeType::NamedComponent,
            2 => NodeType::RootComplex,
            3 => NodeType::SmmuV1V2,
            4 => NodeType::SmmuV3,
            5 => NodeType::Pmcg,
            6 => NodeType::Rmr,
            other => NodeType::Unknown(other),
        }
    }

    pub const fn raw(self) -> u8 {
        match self {
            NodeType::ItsGroup => 0,
            NodeType::NamedComponent => 1,
            NodeType::RootComplex => 2,
            NodeType::SmmuV1V2 => 3,
            NodeType::SmmuV3 => 4,
            NodeType::Pmcg => 5,
            NodeType::Rmr => 6,
            NodeType::Unknown(raw) => raw,
        }
    }

    /// Human-readable name, as printed by [`super::Iort::dump`].
    pub const fn name(self) -> &'static str {
        match self {
            NodeType::ItsGroup => "ITS group",
            NodeType::NamedComponent => "named component",
            NodeType::RootComplex => "root complex",
            NodeType::SmmuV1V2 => "SMMUv1/v2",
            NodeType::SmmuV3 => "SMMUv3",
            NodeType::Pmcg => "PMCG",
            NodeType::Rmr => "RMR",
            NodeType::Unknown(_) => "unknown",
        }
    }

    /// Whether a translation walk ends here: an SMMU translates the ID into a StreamID.
    pub const fn is_smmu(self) -> bool {
        matches!(self, NodeType::SmmuV1V2 | NodeType::SmmuV3)
    }

    /// Bytes from the node start up to the end of the fixed node-specific fields a node of this
    /// type and `revision` must have. Later revisions only ever append fields, so a node whose
    /// revision is newer than the ones listed here needs at least the newest listed size.
    pub const fn fixed_len(self, revision: u8) -> usize {
        match self {
            // ITS group node: number of ITSs, then the identifier array (checked separately).
            NodeType::ItsGroup => 20,
            // Named component node: flags, memory access properties, address size limit, then a
            // NUL-terminated object name of at least one byte.
            NodeType::NamedComponent => 30,
            // Root complex node: rev 0 ends after the PCI segment; rev 1 (Issue D) adds the memory address
            // size limit plus 3 reserved bytes; rev 2 turns two of those into PASID capabilities;
            // rev 4 appends a 32-bit flags word.
            NodeType::RootComplex => match revision {
                0 => 32,
                1..=3 => 36,
                _ => 40,
            },
            // SMMUv1/v2 node: 60 bytes of fixed fields; the interrupt arrays are referenced by offset.
            NodeType::SmmuV1V2 => 60,
            // SMMUv3 node: rev 0 ends after the sync GSIV; rev 1 (Issue C) adds the proximity
            // domain and the DeviceID mapping index.
            NodeType::SmmuV3 => {
                if revision == 0 {
                    60
                } else {
                    68
                }
            }
            // PMCG node: rev 1 (Issue D) adds the page 1 base address.
            NodeType::Pmcg => {
                if revision == 0 {
                    32
                } else {
                    40
                }
            }
            // RMR node: flags, descriptor count, descriptor array reference.
            NodeType::Rmr => 28,
            NodeType::Unknown(_) => NODE_HEADER_LEN,
        }
    }
}

/// One ID mapping (DEN 0049 "ID mapping format"): IDs `input_base ..= input_base + id_count_minus_one`
/// leaving the owning node arrive at the node at `output_reference` as
/// `output_base ..= output_base + id_count_minus_one`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMapping {
    pub input_base: u32,
    /// The "Number of IDs" field, which the specification defines as the number of IDs in the
    /// range minus one (so 0 is a one-ID range).
    pub id_count_minus_one: u32,
    pub output_base: u32,
    /// Offset of the target node from the start of the table.
    pub output_reference: u32,
    pub flags: u32,
}

impl IdMapping {
    /// Flags bit 0: the mapping carries the owning node's own ID (e.g. an SMMU's or PMCG's MSI
    /// DeviceID, or a named component's only StreamID); its input range is meaningless.
    pub const SINGLE_MAPPING: u32 = 1 << 0;

    fn read(r: &Reader<'_>, at: usize) -> Result<Self, TableError> {
        Ok(IdMapping {
            input_base: r.u32(at)?,
            id_count_minus_one: r.u32(at + 4)?,
            output_base: r.u32(at + 8)?,
            output_reference: r.u32(at + 12)?,
            flags: r.u32(at + 16)?,
        })
    }

    pub const fn is_single(&self) -> bool {
        self.flags & Self::SINGLE_MAPPING != 0
    }

    /// Number of IDs the range covers (1 ..= 2^32).
    pub const fn id_count(&self) -> u64 {
        self.id_count_minus_one as u64 + 1
    }

    /// Last input ID of the range (saturating; parsed tables never overflow).
    pub const fn input_last(&self) -> u32 {
        self.input_base.saturating_add(self.id_count_minus_one)
    }

    /// Last output ID of the range (saturating; parsed tables never overflow).
    pub const fn output_last(&self) -> u32 {
        self.output_base.saturating_add(self.id_count_minus_one)
    }

    /// Whether `id` lies in the input range. Written as a subtraction so it cannot overflow
    /// whatever the fields hold.
    pub const fn contains(&self, id: u32) -> bool {
        id >= self.input_base && id - self.input_base <= self.id_count_minus_one
    }

    /// The output ID for input `id`, if the range contains it.
    pub const fn map(&self, id: u32) -> Option<u32> {
        if self.contains(id) {
            self.output_base.checked_add(id - self.input_base)
        } else {
            None
        }
    }
}

/// Iterator over a node's ID mappings.
#[derive(Clone)]
pub struct IdMappings<'a> {
    reader: Reader<'a>,
    next: usize,
    end: usize,
}

impl Iterator for IdMappings<'_> {
    type Item = IdMapping;

    fn next(&mut self) -> Option<IdMapping> {
        if self.next >= self.end {
            return None;
        }
        let at = self.next;
        self.next = self.next.saturating_add(ID_MAPPING_LEN);
        IdMapping::read(&self.reader, at).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end.saturating_sub(self.next) / ID_MAPPING_LEN;
        (n, Some(n))
    }
}

/// Memory access properties of named components and root complexes (DEN 0049
/// "Memory access properties"): cache coherency, allocation hints, memory access flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryAccess {
    /// Cache coherent attribute (CCA): 1 if the device is fully coherent with the CPUs.
    pub cca: u32,
    /// Allocation hints (AH): bit 0 transient, 1 write-allocate, 2 read-allocate, 3 override.
    pub allocation_hints: u8,
    /// Memory access flags (MAF): bit 0 CPM (coherent path to memory), bit 1 DACS (device
    /// attributes are cacheable and inner shareable), bit 2 CANWBS (E.e+).
    pub access_flags: u8,
}

impl MemoryAccess {
    fn read(r: &Reader<'_>, at: usize) -> Result<Self, TableError> {
        Ok(MemoryAccess {
            cca: r.u32(at)?,
            allocation_hints: r.u8(at + 4)?,
            access_flags: r.u8(at + 7)?,
        })
    }

    pub const fn fully_coherent(&self) -> bool {
        self.cca == 1
    }

    pub const fn coherent_path_to_memory(&self) -> bool {
        self.access_flags & 1 != 0
    }
}

/// An interrupt of an SMMUv1/v2 node: GSIV and flags (bit 0: edge-triggered, else level).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupt {
    pub gsiv: u32,
    pub flags: u32,
}

impl Interrupt {
    fn read(r: &Reader<'_>, at: usize) -> Result<Self, TableError> {
        Ok(Interrupt {
            gsiv: r.u32(at)?,
            flags: r.u32(at + 4)?,
        })
    }

    pub const fn edge_triggered(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Iterator over an array of SMMUv1/v2 interrupts.
#[derive(Clone)]
pub struct Interrupts<'a> {
    bytes: &'a [u8],
}

impl Interrupts<'_> {
    pub const fn count(&self) -> usize {
        self.bytes.len() / INTERRUPT_LEN
    }
}

impl Iterator for Interrupts<'_> {
    type Item = Interrupt;

    fn next(&mut self) -> Option<Interrupt> {
        let r = Reader::new(self.bytes);
        let irq = Interrupt::read(&r, 0).ok()?;
        self.bytes = self.bytes.get(INTERRUPT_LEN..)?;
        Some(irq)
    }
}

/// Iterator over little-endian `u32`s (ITS identifiers).
#[derive(Clone)]
pub struct U32s<'a> {
    bytes: &'a [u8],
}

impl Iterator for U32s<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let v = Reader::new(self.bytes).u32(0).ok()?;
        self.bytes = self.bytes.get(4..)?;
        Some(v)
    }
}

/// ITS group node (DEN 0049 "ITS group node").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItsGroup<'a> {
    ids: &'a [u8],
}

impl<'a> ItsGroup<'a> {
    pub const fn its_count(&self) -> usize {
        self.ids.len() / 4
    }

    /// The GIC ITS identifiers (as in the MADT GIC ITS structures) of the group.
    pub fn its_ids(&self) -> U32s<'a> {
        U32s { bytes: self.ids }
    }
}

/// Named component node (DEN 0049 "Named component node").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedComponent<'a> {
    /// Node flags: bit 0 stall supported, bits [5:1] substream (PASID) width.
    pub flags: u32,
    pub memory: MemoryAccess,
    /// Device memory address size limit in bits (0: no information).
    pub memory_address_limit: u8,
    /// The ACPI namespace path (e.g. `\_SB.USB0`), without its NUL terminator.
    pub name: &'a [u8],
}

impl<'a> NamedComponent<'a> {
    pub const fn stall_supported(&self) -> bool {
        self.flags & 1 != 0
    }

    pub const fn substream_width(&self) -> u32 {
        (self.flags >> 1) & 0x1f
    }

    /// The object name as text, if it is valid UTF-8 (namespace paths are ASCII).
    pub fn name_str(&self) -> Option<&'a str> {
        core::str::from_utf8(self.name).ok()
    }
}

/// Root complex node (DEN 0049 "Root complex node"). Fields introduced by later node revisions are `None`
/// for older nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootComplex {
    pub memory: MemoryAccess,
    /// ATS attribute: bit 0 ATS supported, bit 1 PRI supported, bit 2 PASID forwarding.
    pub ats_attribute: u32,
    pub pci_segment: u32,
    /// Memory address size limit in bits (node revision 1+).
    pub memory_address_limit: Option<u8>,
    /// PASID capabilities: bits [4:0] maximum PASID width (node revision 2+).
    pub pasid_capabilities: Option<u16>,
    /// Root complex flags (node revision 4+).
    pub flags: Option<u32>,
}

impl RootComplex {
    pub const fn ats_supported(&self) -> bool {
        self.ats_attribute & 1 != 0
    }

    pub const fn pri_supported(&self) -> bool {
        self.ats_attribute & 2 != 0
    }

    pub const fn pasid_forwarding(&self) -> bool {
        self.ats_attribute & 4 != 0
    }

    pub fn max_pasid_width(&self) -> Option<u8> {
        self.pasid_capabilities.map(|c| (c & 0x1f) as u8)
    }
}

/// SMMUv1/v2 implementation models (DEN 0049 "SMMUv1 or SMMUv2 node", "Model" field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmmuV2Model {
    GenericV1,
    GenericV2,
    Mmu400,
    Mmu500,
    Mmu401,
    CaviumThunderX,
    Unknown(u32),
}

impl SmmuV2Model {
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            0 => SmmuV2Model::GenericV1,
            1 => SmmuV2Model::GenericV2,
            2 => SmmuV2Model::Mmu400,
            3 => SmmuV2Model::Mmu500,
            4 => SmmuV2Model::Mmu401,
            5 => SmmuV2Model::CaviumThunderX,
            other => SmmuV2Model::Unknown(other),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            SmmuV2Model::GenericV1 => "generic SMMUv1",
            SmmuV2Model::GenericV2 => "generic SMMUv2",
            SmmuV2Model::Mmu400 => "Arm CoreLink MMU-400",
            SmmuV2Model::Mmu500 => "Arm CoreLink MMU-500",
            SmmuV2Model::Mmu401 => "Arm CoreLink MMU-401",
            SmmuV2Model::CaviumThunderX => "Cavium ThunderX SMMUv2",
            SmmuV2Model::Unknown(_) => "unknown model",
        }
    }
}

/// SMMUv1/v2 node (DEN 0049 "SMMUv1 or SMMUv2 node").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuV1V2<'a> {
    pub base_address: u64,
    pub span: u64,
    /// Raw model field; see [`SmmuV1V2::model`].
    pub model_raw: u32,
    /// Bit 0 DVM supported, bit 1 coherent page table walk.
    pub flags: u32,
    /// SMMU_NSgIrpt: the non-secure global fault interrupt.
    pub global_interrupt: Interrupt,
    /// SMMU_NSgCfgIrpt: the non-secure global configuration fault interrupt.
    pub global_config_interrupt: Interrupt,
    context: &'a [u8],
    pmu: &'a [u8],
}

impl<'a> SmmuV1V2<'a> {
    pub const fn model(&self) -> SmmuV2Model {
        SmmuV2Model::from_raw(self.model_raw)
    }

    pub const fn dvm_supported(&self) -> bool {
        self.flags & 1 != 0
    }

    pub const fn coherent_walk(&self) -> bool {
        self.flags & 2 != 0
    }

    /// One interrupt per translation context bank.
    pub fn context_interrupts(&self) -> Interrupts<'a> {
        Interrupts {
            bytes: self.context,
        }
    }

    pub fn pmu_interrupts(&self) -> Interrupts<'a> {
        Interrupts { bytes: self.pmu }
    }
}

/// SMMUv3 implementation models (DEN 0049 "SMMUv3 node", "Model" field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmmuV3Model {
    Generic,
    HiSiliconHi161x,
    CaviumCn99xx,
    Unknown(u32),
}

impl SmmuV3Model {
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            0 => SmmuV3Model::Generic,
            1 => SmmuV3Model::HiSiliconHi161x,
            2 => SmmuV3Model::CaviumCn99xx,
            other => SmmuV3Model::Unknown(other),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            SmmuV3Model::Generic => "generic SMMUv3",
            SmmuV3Model::HiSiliconHi161x => "HiSilicon Hi161x",
            SmmuV3Model::CaviumCn99xx => "Cavium CN99xx",
            SmmuV3Model::Unknown(_) => "unknown model",
        }
    }
}

/// SMMUv3 node (DEN 0049 "SMMUv3 node").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuV3 {
    pub base_address: u64,
    /// See the `FLAG_*` constants.
    pub flags: u32,
    /// Base of the VATOS register page, 0 if there is none.
    pub vatos_address: u64,
    pub model_raw: u32,
    /// GSIVs of the event queue, PRI queue, global error and CMD_SYNC interrupts; 0 means the
    /// interrupt is not wired (it is signalled as an MSI, or absent).
    pub event_gsiv: u32,
    pub pri_gsiv: u32,
    pub gerr_gsiv: u32,
    pub sync_gsiv: u32,
    /// NUMA proximity domain (node revision 1+; meaningful if [`Self::FLAG_PROXIMITY_DOMAIN_VALID`]).
    pub proximity_domain: Option<u32>,
    /// Index of the ID mapping that gives the SMMU's own MSI DeviceID (node revision 1+).
    pub device_id_mapping_index: Option<u32>,
}

impl SmmuV3 {
    /// Flags bit 0: the cache coherency of the SMMU overrides SMMU_IDR0.COHACC.
    pub const FLAG_COHACC_OVERRIDE: u32 = 1 << 0;
    /// Flags bits [2:1]: HTTU override (0 none, 1 access flag, 2 access and dirty flags).
    pub const FLAG_HTTU_OVERRIDE_MASK: u32 = 3 << 1;
    /// Flags bit 3: the proximity domain field is valid.
    pub const FLAG_PROXIMITY_DOMAIN_VALID: u32 = 1 << 3;
    /// Flags bit 4: the DeviceID mapping index field is valid (E.e).
    pub const FLAG_DEVICE_ID_VALID: u32 = 1 << 4;

    pub const fn model(&self) -> SmmuV3Model {
        SmmuV3Model::from_raw(self.model_raw)
    }

    pub const fn cohacc_override(&self) -> bool {
        self.flags & Self::FLAG_COHACC_OVERRIDE != 0
    }

    pub const fn httu_override(&self) -> u32 {
        (self.flags & Self::FLAG_HTTU_OVERRIDE_MASK) >> 1
    }

    pub const fn proximity_domain_valid(&self) -> bool {
        self.flags & Self::FLAG_PROXIMITY_DOMAIN_VALID != 0
    }

    pub const fn device_id_valid(&self) -> bool {
        self.flags & Self::FLAG_DEVICE_ID_VALID != 0
    }

    /// The proximity domain, when the node has one and flags it valid.
    pub fn valid_proximity_domain(&self) -> Option<u32> {
        self.proximity_domain
            .filter(|_| self.proximity_domain_valid())
    }

    const fn any_interrupt_unwired(&self) -> bool {
        self.event_gsiv == 0 || self.pri_gsiv == 0 || self.gerr_gsiv == 0 || self.sync_gsiv == 0
    }

    const fn all_interrupts_unwired(&self) -> bool {
        self.event_gsiv == 0 && self.pri_gsiv == 0 && self.gerr_gsiv == 0 && self.sync_gsiv == 0
    }

    /// Index of the mapping that carries the SMMU's own MSI DeviceID, if it has one. E.e made
    /// this explicit with [`Self::FLAG_DEVICE_ID_VALID`]; before that the field only meant
    /// something when some interrupt is not wired as a GSIV (an SMMU with four wired
    /// interrupts sends no MSIs of its own, and firmware then leaves the index at 0).
    pub fn msi_mapping_index(&self) -> Option<u32> {
        let index = self.device_id_mapping_index?;
        (self.device_id_valid() || self.any_interrupt_unwired()).then_some(index)
    }

    /// Whether the table must provide a valid DeviceID mapping index: flagged valid, or no
    /// interrupt wired at all (the SMMU can only signal through MSIs).
    fn index_required(&self) -> bool {
        self.device_id_mapping_index.is_some()
            && (self.device_id_valid() || self.all_interrupts_unwired())
    }
}

/// PMCG node (DEN 0049 "PMCG node").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pmcg {
    pub page0_base: u64,
    /// Overflow interrupt GSIV; 0 means the PMCG signals overflow with an MSI.
    pub overflow_gsiv: u32,
    /// Offset of the node (SMMUv3, root complex, named component) whose traffic it counts.
    pub node_reference: u32,
    /// Page 1 base address (node revision 1+).
    pub page1_base: Option<u64>,
}

/// One RMR memory range descriptor (DEN 0049 "RMR node", memory range descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    pub base: u64,
    pub length: u64,
}

/// Iterator over RMR memory range descriptors.
#[derive(Clone)]
pub struct MemoryRanges<'a> {
    bytes: &'a [u8],
}

impl Iterator for MemoryRanges<'_> {
    type Item = MemoryRange;

    fn next(&mut self) -> Option<MemoryRange> {
        let r = Reader::new(self.bytes);
        let range = MemoryRange {
            base: r.u64(0).ok()?,
            length: r.u64(8).ok()?,
        };
        self.bytes = self.bytes.get(MEMORY_RANGE_LEN..)?;
        Some(range)
    }
}

/// RMR node (DEN 0049 "RMR node"): memory the firmware left devices using (e.g. a framebuffer or
/// an MSI doorbell), which must stay identity-mapped for the StreamIDs in the ID mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rmr<'a> {
    /// Bit 0 remapping permitted, bit 1 access privileged, bits [9:2] access attributes.
    pub flags: u32,
    ranges: &'a [u8],
}

impl<'a> Rmr<'a> {
    pub const fn remapping_permitted(&self) -> bool {
        self.flags & 1 != 0
    }

    pub const fn access_privileged(&self) -> bool {
        self.flags & 2 != 0
    }

    /// Memory attributes the range must be mapped with (0..=3 Device nGnRnE/nGnRE/nGRE/GRE,
    /// 4 Normal non-cacheable, 5 Normal write-back inner shareable).
    pub const fn access_attributes(&self) -> u8 {
        ((self.flags >> 2) & 0xff) as u8
    }

    pub const fn range_count(&self) -> usize {
        self.ranges.len() / MEMORY_RANGE_LEN
    }

    pub fn memory_ranges(&self) -> MemoryRanges<'a> {
        MemoryRanges { bytes: self.ranges }
    }
}

/// The decoded node-specific part of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind<'a> {
    ItsGroup(ItsGroup<'a>),
    NamedComponent(NamedComponent<'a>),
    RootComplex(RootComplex),
    SmmuV1V2(SmmuV1V2<'a>),
    SmmuV3(SmmuV3),
    Pmcg(Pmcg),
    Rmr(Rmr<'a>),
    /// A node of a type this parser does not know: the bytes after the node header.
    Unknown {
        node_type: u8,
        data: &'a [u8],
    },
}

/// One IORT node, decoded and bounds-checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node<'a> {
    offset: u32,
    bytes: &'a [u8],
    revision: u8,
    identifier: u32,
    mapping_count: u32,
    mapping_offset: u32,
    table_revision: u8,
    kind: NodeKind<'a>,
}

/// Bounds-checked `offset .. offset + count * elem` inside a node; `None` if it overflows or
/// leaves the node.
fn sub_array(bytes: &[u8], offset: u32, count: u32, elem: usize) -> Option<&[u8]> {
    let len = (count as usize).checked_mul(elem)?;
    let start = offset as usize;
    bytes.get(start..start.checked_add(len)?)
}

impl<'a> Node<'a> {
    /// Decodes the node at `offset` of `table` and checks everything it declares: the header and
    /// fixed fields fit in the node length, the node fits in the table, the ID array and every
    /// other array lie inside the node and after the fixed fields. (Output references point
    /// elsewhere in the table and are checked by [`super::Iort::parse`].)
    pub fn decode(table: &'a [u8], offset: usize, table_revision: u8) -> Result<Self, IortError> {
        let off32 = offset as u32;
        let header = Reader::new(table)
            .bytes(offset, NODE_HEADER_LEN)
            .map_err(|_| IortError::NodeTruncated {
                offset: off32,
                length: NODE_HEADER_LEN as u32,
                available: table.len().saturating_sub(offset) as u32,
            })?;
        let h = Reader::new(header);
        let node_type = NodeType::from_raw(h.u8(0)?);
        let length = h.u16(1)?;
        let revision = h.u8(3)?;
        let too_short = |needed: usize| IortError::NodeTooShort {
            offset: off32,
            node_type: node_type.raw(),
            revision,
            length,
            needed: needed as u32,
        };
        if usize::from(length) < NODE_HEADER_LEN {
            return Err(too_short(NODE_HEADER_LEN));
        }
        let bytes = Reader::new(table)
            .bytes(offset, usize::from(length))
            .map_err(|_| IortError::NodeTruncated {
                offset: off32,
                length: u32::from(length),
                available: table.len().saturating_sub(offset) as u32,
            })?;
        let fixed = node_type.fixed_len(revision);
        if bytes.len() < fixed {
            return Err(too_short(fixed));
        }
        let mapping_count = h.u32(8)?;
        let mapping_offset = h.u32(12)?;
        // The ID array must not overlap the header or fixed fields and must end inside the
        // node. An empty array's offset is meaningless (firmware leaves it 0).
        if mapping_count != 0
            && ((mapping_offset as usize) < fixed
                || sub_array(bytes, mapping_offset, mapping_count, ID_MAPPING_LEN).is_none())
        {
            return Err(IortError::IdArrayOutOfBounds {
                node: off32,
                mapping_offset,
                count: mapping_count,
            });
        }
        // The end of the node-specific data that precedes the ID array: the named component's
        // name must end before the mappings start.
        let data_end = if mapping_count != 0 {
            mapping_offset as usize
        } else {
            bytes.len()
        };
        let kind = decode_kind(node_type, revision, bytes, off32, fixed, data_end)?;
        Ok(Node {
            offset: off32,
            bytes,
            revision,
            identifier: h.u32(4)?,
            mapping_count,
            mapping_offset,
            table_revision,
            kind,
        })
    }

    /// Offset of the node from the start of the table (what output references name).
    pub const fn offset(&self) -> u32 {
        self.offset
    }

    pub const fn node_type(&self) -> NodeType {
        match self.kind {
            NodeKind::ItsGroup(_) => NodeType::ItsGroup,
            NodeKind::NamedComponent(_) => NodeType::NamedComponent,
            NodeKind::RootComplex(_) => NodeType::RootComplex,
            NodeKind::SmmuV1V2(_) => NodeType::SmmuV1V2,
            NodeKind::SmmuV3(_) => NodeType::SmmuV3,
            NodeKind::Pmcg(_) => NodeType::Pmcg,
            NodeKind::Rmr(_) => NodeType::Rmr,
            NodeKind::Unknown { node_type, .. } => NodeType::Unknown(node_type),
        }
    }

    pub const fn length(&self) -> usize {
        self.bytes.len()
    }

    pub const fn revision(&self) -> u8 {
        self.revision
    }

    /// The node identifier, unique among the nodes of a table of revision 3 (E.b) or later;
    /// older tables call the field reserved (see [`Self::raw_identifier`]).
    pub const fn identifier(&self) -> Option<u32> {
        if self.table_revision >= 3 {
            Some(self.identifier)
        } else {
            None
        }
    }

    pub const fn raw_identifier(&self) -> u32 {
        self.identifier
    }

    pub const fn mapping_count(&self) -> u32 {
        self.mapping_count
    }

    /// Offset of the ID array from the node start (0 when there are no mappings).
    pub const fn mapping_offset(&self) -> u32 {
        self.mapping_offset
    }

    pub fn id_mappings(&self) -> IdMappings<'a> {
        let start = self.mapping_offset as usize;
        let len = (self.mapping_count as usize).saturating_mul(ID_MAPPING_LEN);
        let end = if self.mapping_count == 0 {
            start
        } else {
            start.saturating_add(len)
        };
        IdMappings {
            reader: Reader::new(self.bytes),
            next: start,
            end,
        }
    }

    pub fn id_mapping(&self, index: u32) -> Option<IdMapping> {
        if index >= self.mapping_count {
            return None;
        }
        let at = (self.mapping_offset as usize)
            .checked_add((index as usize).checked_mul(ID_MAPPING_LEN)?)?;
        IdMapping::read(&Reader::new(self.bytes), at).ok()
    }

    pub const fn kind(&self) -> NodeKind<'a> {
        self.kind
    }

    /// All bytes of the node, header included.
    pub const fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Base address, for SMMU nodes.
    pub const fn smmu_base(&self) -> Option<u64> {
        match self.kind {
            NodeKind::SmmuV1V2(s) => Some(s.base_address),
            NodeKind::SmmuV3(s) => Some(s.base_address),
            _ => None,
        }
    }

    /// Index of the mapping that gives the node's own MSI DeviceID: the SMMUv3 DeviceID mapping
    /// index when it applies, otherwise the first single mapping.
    pub fn own_id_mapping_index(&self) -> Option<u32> {
        if let NodeKind::SmmuV3(s) = self.kind
            && let Some(i) = s.msi_mapping_index()
        {
            return Some(i);
        }
        self.id_mappings()
            .position(|m| m.is_single())
            .map(|i| i as u32)
    }

    /// Checks the SMMUv3 DeviceID mapping index names an existing mapping when the table says
    /// it must be used.
    pub(super) fn check_device_id_index(&self) -> Result<(), IortError> {
        if let NodeKind::SmmuV3(s) = self.kind
            && s.index_required()
            && let Some(index) = s.device_id_mapping_index
            && index >= self.mapping_count
        {
            return Err(IortError::DeviceIdIndexOutOfRange {
                node: self.offset,
                index,
                count: self.mapping_count,
            });
        }
        Ok(())
    }
}

fn decode_kind<'a>(
    node_type: NodeType,
    revision: u8,
    bytes: &'a [u8],
    node: u32,
    fixed: usize,
    data_end: usize,
) -> Result<NodeKind<'a>, IortError> {
    let r = Reader::new(bytes);
    let array_err = |what: &'static str| IortError::ArrayOutOfBounds { node, what };
    Ok(match node_type {
        NodeType::ItsGroup => {
            let count = r.u32(16)?;
            let ids = sub_array(bytes, 20, count, 4).ok_or(array_err("ITS identifier array"))?;
            NodeKind::ItsGroup(ItsGroup { ids })
        }
        NodeType::NamedComponent => {
            // The name runs from offset 29 to its NUL; padding may follow up to the ID array.
            // DEN 0049 defines "Device object name" as a "Null terminated ASCII string"; a name
            // with no NUL before the ID array means the node's fields disagree (the name may be
            // cut short), so the table is rejected. The DMAR parser rejects an ANDD object name
            // without its NUL (VT-d 4.1 §8.7, "Null-terminated ASCII string") the same way.
            let region = bytes.get(29..data_end).unwrap_or(&[]);
            let nul = region
                .iter()
                .position(|&b| b == 0)
                .ok_or(IortError::UnterminatedName { node })?;
            NodeKind::NamedComponent(NamedComponent {
                flags: r.u32(16)?,
                memory: MemoryAccess::read(&r, 20)?,
                memory_address_limit: r.u8(28)?,
                name: region.get(..nul).unwrap_or(&[]),
            })
        }
        NodeType::RootComplex => NodeKind::RootComplex(RootComplex {
            memory: MemoryAccess::read(&r, 16)?,
            ats_attribute: r.u32(24)?,
            pci_segment: r.u32(28)?,
            memory_address_limit: if revision >= 1 { Some(r.u8(32)?) } else { None },
            pasid_capabilities: if revision >= 2 {
                Some(r.u16(33)?)
            } else {
                None
            },
            flags: if revision >= 4 {
                Some(r.u32(36)?)
            } else {
                None
            },
        }),
        NodeType::SmmuV1V2 => {
            let global_offset = r.u32(40)?;
            let context_count = r.u32(44)?;
            let context_offset = r.u32(48)?;
            let pmu_count = r.u32(52)?;
            let pmu_offset = r.u32(56)?;
            // Arrays sit after the fixed fields; an empty one may have offset 0.
            let array = |offset: u32, count: u32, what| {
                if count == 0 {
                    return Ok(&[][..]);
                }
                if (offset as usize) < fixed {
                    return Err(array_err(what));
                }
                sub_array(bytes, offset, count, INTERRUPT_LEN).ok_or(array_err(what))
            };
            let global = array(global_offset, 2, "global interrupt array")?;
            let g = Reader::new(global);
            NodeKind::SmmuV1V2(SmmuV1V2 {
                base_address: r.u64(16)?,
                span: r.u64(24)?,
                model_raw: r.u32(32)?,
                flags: r.u32(36)?,
                global_interrupt: Interrupt::read(&g, 0)?,
                global_config_interrupt: Interrupt::read(&g, INTERRUPT_LEN)?,
                context: array(context_offset, context_count, "context interrupt array")?,
                pmu: array(pmu_offset, pmu_count, "PMU interrupt array")?,
            })
        }
        NodeType::SmmuV3 => NodeKind::SmmuV3(SmmuV3 {
            base_address: r.u64(16)?,
            flags: r.u32(24)?,
            vatos_address: r.u64(32)?,
            model_raw: r.u32(40)?,
            event_gsiv: r.u32(44)?,
            pri_gsiv: r.u32(48)?,
            gerr_gsiv: r.u32(52)?,
            sync_gsiv: r.u32(56)?,
            proximity_domain: if revision >= 1 {
                Some(r.u32(60)?)
            } else {
                None
            },
            device_id_mapping_index: if revision >= 1 {
                Some(r.u32(64)?)
            } else {
                None
            },
        }),
        NodeType::Pmcg => NodeKind::Pmcg(Pmcg {
            page0_base: r.u64(16)?,
            overflow_gsiv: r.u32(24)?,
            node_reference: r.u32(28)?,
            page1_base: if revision >= 1 {
                Some(r.u64(32)?)
            } else {
                None
            },
        }),
        NodeType::Rmr => {
            let count = r.u32(20)?;
            let offset = r.u32(24)?;
            let ranges = if count == 0 {
                &[][..]
            } else if (offset as usize) < fixed {
                return Err(array_err("memory range descriptor array"));
            } else {
                sub_array(bytes, offset, count, MEMORY_RANGE_LEN)
                    .ok_or(array_err("memory range descriptor array"))?
            };
            NodeKind::Rmr(Rmr {
                flags: r.u32(16)?,
                ranges,
            })
        }
        NodeType::Unknown(raw) => NodeKind::Unknown {
            node_type: raw,
            data: bytes.get(NODE_HEADER_LEN..).unwrap_or(&[]),
        },
    })
}

//! Capability lists: the PCI list in the first 256 bytes (PCI Local Bus 3.0 §6.7) and the PCIe
//! extended list from offset 0x100 (PCIe Base 5.0 §7.6). Both are walked with a visited bitmap
//! and an iteration bound, so a hostile list (a loop, a pointer into the header, garbage) ends
//! with a [`CapError`] instead of spinning.

use super::config::{Bdf, ConfigSpace, reg};

/// Capability IDs (PCI Code and ID Assignment Specification).
pub mod id {
    pub const MSI: u8 = 0x05;
    pub const PCIE: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
    /// Extended capability IDs.
    pub const EXT_ATS: u16 = 0x000f;
    pub const EXT_PRI: u16 = 0x0013;
    pub const EXT_PASID: u16 = 0x001b;
    /// Access Control Services (PCIe Base 5.0 §7.7.8).
    pub const EXT_ACS: u16 = 0x000d;
}

/// The PCI Express capability (PCIe Base 5.0 §7.5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieCap {
    pub offset: u8,
    /// Capability version, bits 3:0 of the PCIe Capabilities register.
    pub version: u8,
    /// Device/port type, bits 7:4 (0 endpoint, 4 root port, 5 upstream switch port, 6 downstream
    /// switch port, 7 PCIe-to-PCI bridge, 8 PCI-to-PCIe bridge, 9 RC integrated endpoint, …).
    pub port_type: u8,
}

impl PcieCap {
    pub const TYPE_ENDPOINT: u8 = 0x0;
    pub const TYPE_LEGACY_ENDPOINT: u8 = 0x1;
    pub const TYPE_ROOT_PORT: u8 = 0x4;
    pub const TYPE_UPSTREAM_PORT: u8 = 0x5;
    pub const TYPE_DOWNSTREAM_PORT: u8 = 0x6;
    /// PCI Express to PCI/PCI-X bridge: its secondary side is a conventional bus.
    pub const TYPE_PCIE_TO_PCI_BRIDGE: u8 = 0x7;
    /// PCI/PCI-X to PCI Express bridge ("reverse bridge"): its primary side is conventional.
    pub const TYPE_PCI_TO_PCIE_BRIDGE: u8 = 0x8;
    pub const TYPE_RC_INTEGRATED_ENDPOINT: u8 = 0x9;
    pub const TYPE_RC_EVENT_COLLECTOR: u8 = 0xa;

    /// A root port or switch downstream port: its link carries exactly one device, number 0
    /// (unless ARI forwarding is enabled; PCIe Base 5.0 §7.3.1).
    pub const fn is_downstream_port(&self) -> bool {
        self.port_type == Self::TYPE_ROOT_PORT || self.port_type == Self::TYPE_DOWNSTREAM_PORT
    }
}

/// MSI (PCI Local Bus 3.0 §6.8.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCap {
    pub offset: u8,
    /// 64-bit message address capable (Message Control bit 7).
    pub addr64: bool,
    /// Per-vector masking capable (Message Control bit 8).
    pub per_vector_mask: bool,
    /// log2 of the number of vectors requested (Multiple Message Capable, bits 3:1).
    pub multiple_message_log2: u8,
}

/// MSI-X (PCI Local Bus 3.0 §6.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: u8,
    /// Number of table entries (Table Size field + 1).
    pub table_size: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// Address Translation Services (PCIe Base 5.0 §10.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsCap {
    pub offset: u16,
    /// Invalidate Queue Depth (0 means 32).
    pub invalidate_queue_depth: u8,
    pub page_aligned_request: bool,
}

/// Page Request Interface (PCIe Base 5.0 §10.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriCap {
    pub offset: u16,
}

/// PASID (PCIe Base 5.0 §7.8.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidCap {
    pub offset: u16,
    /// Max PASID Width (bits 12:8 of the PASID Capability register): PASIDs are this many bits.
    pub max_width: u8,
    pub execute_permission: bool,
    pub privileged_mode: bool,
}

/// Access Control Services (PCIe Base 5.0 §7.7.8): the ACS Capability register (offset +4)
/// says which controls exist, the ACS Control register (offset +6) which are enabled; both use
/// the bit positions of [`AcsCap::SV`] and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcsCap {
    pub offset: u16,
    pub capability: u16,
    pub control: u16,
}

impl AcsCap {
    /// Source Validation: the port checks the bus number of upstream requests against its
    /// secondary..subordinate range (§6.12.1.1).
    pub const SV: u16 = 1 << 0;
    /// Translation Blocking.
    pub const TB: u16 = 1 << 1;
    /// P2P Request Redirect: peer-to-peer requests go upstream (to the IOMMU) instead.
    pub const RR: u16 = 1 << 2;
    /// P2P Completion Redirect.
    pub const CR: u16 = 1 << 3;
    /// Upstream Forwarding: requests arriving at a downstream port that target its own
    /// upstream side are forwarded upstream rather than decoded locally.
    pub const UF: u16 = 1 << 4;
    /// P2P Egress Control.
    pub const EC: u16 = 1 << 5;
    /// Direct Translated P2P.
    pub const DT: u16 = 1 << 6;
    /// The controls whose enabling makes a port or function keep DMA away from its peers so it
    /// reaches the IOMMU: the set Linux requires (`REQ_ACS_FLAGS`) before it trusts a port to
    /// split IOMMU groups.
    pub const ISOLATION: u16 = Self::SV | Self::RR | Self::CR | Self::UF;

    /// Whether the isolation controls are on. A control absent from the Capability register is
    /// treated as hard-wired on: per §7.7.8.2 a component implements a control unless it cannot
    /// do what the control governs (no peer-to-peer between its functions or ports, say), which
    /// is the reading Linux's `pci_acs_flags_enabled` takes. Egress Control is not required.
    pub const fn isolates(&self) -> bool {
        let needed = Self::ISOLATION & self.capability;
        self.control & needed == needed
    }
}

/// The capabilities the IOMMU code cares about. Each field holds the first instance found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pcie: Option<PcieCap>,
    pub msi: Option<MsiCap>,
    pub msix: Option<MsixCap>,
    pub ats: Option<AtsCap>,
    pub pri: Option<PriCap>,
    pub pasid: Option<PasidCap>,
    pub acs: Option<AcsCap>,
}

impl Capabilities {
    pub const NONE: Self = Self {
        pcie: None,
        msi: None,
        msix: None,
        ats: None,
        pri: None,
        pasid: None,
        acs: None,
    };
}

/// A malformed capability list. The capabilities found before the fault are still reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// The PCI list revisits the capability at `offset`.
    Loop { offset: u8 },
    /// A PCI capability pointer into the predefined header (below 0x40).
    BadPointer { offset: u8 },
    /// The extended list revisits the capability at `offset`.
    ExtLoop { offset: u16 },
    /// An extended capability pointer below 0x100 or beyond 4 KiB.
    ExtBadPointer { offset: u16 },
}

/// Walks both lists of `bdf`. `cap_ptr_reg` is where the first pointer lives (0x34 for type 0
/// and type 1 headers).
pub(crate) fn walk<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    cap_ptr_reg: u16,
) -> (Capabilities, Option<CapError>) {
    let mut caps = Capabilities::NONE;
    if cfg.read16(bdf, reg::STATUS) & reg::STATUS_CAP_LIST == 0 {
        return (caps, None);
    }
    if let Err(e) = walk_pci(cfg, bdf, cap_ptr_reg, &mut caps) {
        return (caps, Some(e));
    }
    // Extended capabilities exist only in PCIe configuration space (PCIe Base 5.0 §7.6).
    if caps.pcie.is_some()
        && let Err(e) = walk_extended(cfg, bdf, &mut caps)
    {
        return (caps, Some(e));
    }
    (caps, None)
}

fn walk_pci<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    cap_ptr_reg: u16,
    caps: &mut Capabilities,
) -> Result<(), CapError> {
    // Bits 1:0 of every pointer are reserved and must be masked (PCI Local Bus 3.0 §6.7).
    let mut ptr = cfg.read8(bdf, cap_ptr_reg) & 0xfc;
    // One bit per dword of the 256-byte space; at most 48 capabilities fit above the header.
    let mut visited = [0u64; 1];
    while ptr != 0 {
        if ptr < 0x40 {
            return Err(CapError::BadPointer { offset: ptr });
        }
        let bit = 1u64 << ((ptr >> 2) & 63);
        if visited[0] & bit != 0 {
            return Err(CapError::Loop { offset: ptr });
        }
        visited[0] |= bit;
        let off = u16::from(ptr);
        let header = cfg.read32(bdf, off);
        let cap_id = header as u8;
        let control = (header >> 16) as u16;
        match cap_id {
            id::PCIE if caps.pcie.is_none() => {
                caps.pcie = Some(PcieCap {
                    offset: ptr,
                    version: (control & 0xf) as u8,
                    port_type: ((control >> 4) & 0xf) as u8,
                });
            }
            id::MSI if caps.msi.is_none() => {
                caps.msi = Some(MsiCap {
                    offset: ptr,
                    addr64: control & (1 << 7) != 0,
                    per_vector_mask: control & (1 << 8) != 0,
                    multiple_message_log2: ((control >> 1) & 0x7) as u8,
                });
            }
            id::MSIX if caps.msix.is_none() => {
                let table = cfg.read32(bdf, off + 4);
                let pba = cfg.read32(bdf, off + 8);
                caps.msix = Some(MsixCap {
                    offset: ptr,
                    table_size: (control & 0x7ff) + 1,
                    table_bar: (table & 0x7) as u8,
                    table_offset: table & !0x7,
                    pba_bar: (pba & 0x7) as u8,
                    pba_offset: pba & !0x7,
                });
            }
            _ => {}
        }
        ptr = (header >> 8) as u8 & 0xfc;
    }
    Ok(())
}

fn walk_extended<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    caps: &mut Capabilities,
) -> Result<(), CapError> {
    let mut off: u16 = 0x100;
    // One bit per dword of the extended space 0x100..0x1000.
    let mut visited = [0u64; 16];
    loop {
        let header = cfg.read32(bdf, off);
        // An all-zero header at 0x100 means no extended capabilities; all-ones means the access
        // failed (PCIe Base 5.0 §7.6.3).
        if header == 0 || header == u32::MAX {
            return Ok(());
        }
        let idx = usize::from((off - 0x100) >> 2);
        let (word, bit) = (idx / 64, 1u64 << (idx % 64));
        if visited[word] & bit != 0 {
            return Err(CapError::ExtLoop { offset: off });
        }
        visited[word] |= bit;
        let cap_id = header as u16;
        match cap_id {
            id::EXT_ATS if caps.ats.is_none() => {
                let cap = cfg.read16(bdf, off + 4);
                caps.ats = Some(AtsCap {
                    offset: off,
                    invalidate_queue_depth: (cap & 0x1f) as u8,
                    page_aligned_request: cap & (1 << 5) != 0,
                });
            }
            id::EXT_PRI if caps.pri.is_none() => caps.pri = Some(PriCap { offset: off }),
            id::EXT_PASID if caps.pasid.is_none() => {
                let cap = cfg.read16(bdf, off + 4);
                caps.pasid = Some(PasidCap {
                    offset: off,
                    max_width: ((cap >> 8) & 0x1f) as u8,
                    execute_permission: cap & (1 << 1) != 0,
                    privileged_mode: cap & (1 << 2) != 0,
                });
            }
            id::EXT_ACS if caps.acs.is_none() => {
                let regs = cfg.read32(bdf, off + 4);
                caps.acs = Some(AcsCap {
                    offset: off,
                    capability: regs as u16,
                    control: (regs >> 16) as u16,
                });
            }
            _ => {}
        }
        // Next Capability Offset, bits 31:20; bits 1:0 are reserved.
        let next = ((header >> 20) as u16) & !3;
        if next == 0 {
            return Ok(());
        }
        if next < 0x100 {
            return Err(CapError::ExtBadPointer { offset: next });
        }
        off = next;
    }
}

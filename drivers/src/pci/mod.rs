//! PCI: configuration space access (ECAM), enumeration with bus numbering, BAR sizing and
//! resource assignment, and the topology query the IOMMU code needs.
//!
//! Typical use at boot (`Regs` stands for the kernel's `Mmio` over the mapped ECAM region, and
//! the windows come from ACPI `_CRS` or the DT `ranges` of the host bridge):
//! ```no_run
//! use drivers::pci::*;
//! # struct Regs;
//! # impl iommu::hw::Mmio for Regs {
//! #     fn read32(&self, _: usize) -> u32 { !0 }
//! #     fn write32(&self, _: usize, _: u32) {}
//! #     fn read64(&self, _: usize) -> u64 { !0 }
//! #     fn write64(&self, _: usize, _: u64) {}
//! # }
//! // ~120 KiB: keep it in a `static` (`PciDevices::new` is `const`) or on the heap.
//! let mut devices = Box::new(PciDevices::new());
//! let ecam = Ecam::new(Regs, 0, 0x00, 0xff);
//! enumerate(&ecam, &EnumConfig { segment: 0, root_bus: 0x00, max_bus: 0xff, ..EnumConfig::new() }, &mut devices);
//! let windows = [
//!     Window { base: 0x1000_0000, size: 0x2eff_0000, kind: WindowKind::Mem32 },
//!     Window { base: 0x80_0000_0000, size: 0x80_0000_0000, kind: WindowKind::Mem64 },
//!     Window { base: 0x0, size: 0x1_0000, kind: WindowKind::Io },
//! ];
//! if let Err(e) = assign_resources(&ecam, &mut devices, &windows) {
//!     // Some resource did not fit; everything else is programmed.
//!     let _ = e;
//! }
//! if let Some(edu) = devices.find(0x1234, 0x11e8).next().map(|f| f.bdf) {
//!     enable_bus_master(&ecam, &devices, edu);
//! }
//! ```
//!
//! Everything read from configuration space is treated as untrusted: a broken or hostile
//! device can make enumeration log errors and skip parts of the hierarchy, never panic or
//! loop.

mod assign;
mod bar;
mod caps;
mod config;
mod enumerate;
mod idmap;
mod msi_shadow;
mod topology;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod topology_tests;

pub use assign::{
    AssignError, AssignReport, MAX_WINDOWS, Resource, Window, WindowKind, assign_resources,
    enable_bus_master,
};
pub use bar::{Bar, BarError, BarKind, BarState};
pub use caps::{
    AcsCap, AtsCap, CapError, Capabilities, MsiCap, MsixCap, PasidCap, PcieCap, PriCap,
    id as cap_id,
};
pub use config::{Bdf, CONFIG_SPACE_SIZE, ConfigSpace, Ecam, reg};
pub use enumerate::{
    BridgeInfo, BusPolicy, EnumConfig, MAX_ERRORS, MAX_FUNCTIONS, PciDevices, PciError,
    PciErrorKind, PciFunction, enumerate,
};
pub use idmap::{IdAgreement, IommuTarget};
pub use msi_shadow::{MsiChange, MsiMessage, MsiShadow};
pub use topology::{
    ALIAS_QUIRKS, AliasQuirk, DmaAliases, GroupReasons, IncompleteGroup, MAX_ALIASES, QuirkKind,
    Topology, enable_acs,
};

/// Class code 06h / subclass 04h: PCI-to-PCI bridge (PCI Code and ID Assignment Spec).
pub const CLASS_BRIDGE: u8 = 0x06;
pub const SUBCLASS_PCI_BRIDGE: u8 = 0x04;

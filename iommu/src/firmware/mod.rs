//! Firmware tables that describe IOMMUs: ACPI DMAR (VT-d), ACPI IORT (Arm SMMU), and the device
//! tree's `iommus` / `iommu-map` bindings. All parsers are zero-copy over `&[u8]`, bounds-checked
//! everywhere, and return typed errors.

pub mod acpi;
pub mod devicetree;
pub mod dmar;
pub mod iort;

//! The narrow interfaces through which the IOMMU code touches hardware.
//!
//! [`Mmio`] lives in the bottom crate `mmio` (shared with `drivers`) and is re-exported here so
//! `iommu::hw::Mmio` keeps naming it. The hypervisor implements it over real MMIO; host tests
//! implement it over plain memory and fake register files.
//!
//! This crate forbids `unsafe`. The code that does need it is confined to small named modules
//! elsewhere: in `kernel`, `mem::phys` (the direct map, MMIO windows, frame and DMA memory) and
//! `arch` (assembly, barriers, cache maintenance, exception entry); in `boot`, the entry stubs and
//! the early page tables built before Rust references to memory exist.

pub use mmio::Mmio;

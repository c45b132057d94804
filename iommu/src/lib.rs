//! The IOMMU subsystem, in safe `no_std` Rust.
//!
//! Hardware is reached only through the small traits in [`hw`] (MMIO registers, physical memory),
//! so every line of logic here runs in `cargo test` on the host against fakes, and in the
//! hypervisor against the real thing.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod firmware;
pub mod hw;
pub mod iommufd;
pub mod pgtable;
mod queue_lock;
mod regmap;
pub mod smmuv3;
pub mod vtd;

//! Drivers for the devices the hypervisor itself uses. Register access goes through
//! [`mmio::Mmio`] (and a port-I/O trait on x86) so the logic is testable on the host.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;
pub mod edu;
pub mod fw_cfg;
pub mod gicv3;
pub mod pci;
pub mod pl011;
pub mod posted;
pub mod uart16550;
pub mod vectors;
pub mod vlapic;
pub mod x86_msi;

//! Drivers for the devices the hypervisor itself uses. Register access goes through
//! [`mmio::Mmio`] (and a port-I/O trait on x86) so the logic is testable on the host.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;
pub mod edu;
pub mod fw_cfg;
pub mod gicv3;
/// The atomics and registration lock `gicv3::handlers` is written against;
/// `tests/gic_handlers_loom.rs` compiles `handlers.rs` against loom's instead.
mod handlers_sync {
    pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64};

    /// Serialises registrations (normal context only).
    pub(crate) struct RegisterLock(spin::Mutex<()>);

    impl RegisterLock {
        pub(crate) const fn new() -> Self {
            RegisterLock(spin::Mutex::new(()))
        }

        pub(crate) fn lock(&self) -> impl Sized + '_ {
            self.0.lock()
        }
    }
}
pub mod pci;
pub mod pl011;
pub mod posted;
/// The atomic `posted` is written against; `tests/posted_loom.rs` compiles `posted.rs` against
/// loom's instead.
mod posted_sync {
    pub(crate) use core::sync::atomic::AtomicU64;
}
pub mod uart16550;
pub mod vectors;
/// The atomics `vectors` is written against; `tests/vectors_loom.rs` compiles `vectors.rs`
/// against loom's instead.
mod vectors_sync {
    pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64, fence};
    #[inline(always)]
    pub(crate) fn spin() {
        core::hint::spin_loop();
    }
}
pub mod vlapic;
pub mod x86_msi;

//! The IOMMU subsystem, in safe `no_std` Rust.
//!
//! Hardware is reached only through the small traits in [`hw`] (MMIO registers, physical memory),
//! so every line of logic here runs in `cargo test` on the host against fakes, and in the
//! hypervisor against the real thing.
#![no_std]
// `unsafe` is denied everywhere but in `gate` (two synchronisation cells, each block with its
// SAFETY argument), which allows it for itself.
#![deny(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod area_slots;
/// The atomics `area_slots` and `iova_index` are written against; `tests/ioas_loom.rs` and
/// `tests/iova_index_loom.rs` compile them against loom's instead.
mod area_sync {
    pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64, fence};
}
pub mod firmware;
pub mod gate;
pub mod iova_index;
/// The atomics `gate` is written against; `tests/gate_loom.rs` compiles `gate.rs` against
/// loom's instead.
mod gate_sync {
    pub(crate) use core::sync::atomic::AtomicBool;
    #[inline(always)]
    pub(crate) fn spin() {
        core::hint::spin_loop();
    }
}
/// The atomics `vtd::fault_events` is written against; `tests/fault_events_loom.rs` compiles
/// `fault_events.rs` against loom's instead.
mod fault_events_sync {
    pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
}
pub mod hw;
pub mod iommufd;
pub mod pgtable;
pub mod queue_lock;
mod regmap;
pub mod smmuv3;
pub mod vtd;

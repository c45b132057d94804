//! Assigned devices' MSIs delivered to their guest (docs/interrupts.md, "Guests").
//!
//! The guest programs its function's MSI capability with guest values; `pci.rs` keeps them in
//! a shadow ([`drivers::pci::MsiShadow`]) and, when the guest's effective MSI changes, asks
//! this module for a **route**: a host interrupt the device may raise, which the hypervisor
//! owns (on x86_64 a remappable-format handle of an IRTE in its interrupt remapping table)
//! and whose handler marks the guest's virtual vector pending on the guest's vCPU. `pci.rs`
//! then programs the device with the [`HostMsi`] returned, never with the guest's values.
//!
//! Arch-neutral here: the request and answer types, the per-vCPU posted bitmaps the host
//! handlers set and the vCPU backends take, and which vCPU slots a backend can deliver to.
//! The arch module (`x86_64.rs`, `aarch64.rs`) decodes the
//! guest's message and owns the host side.
//!
//! A vCPU slot is `guest index * MAX_VCPUS + vCPU index`: fixed for the run, so a handler
//! needs no lock to find the vCPU a route feeds.

use core::sync::atomic::{AtomicBool, Ordering};

use alloc::string::String;
use drivers::pci::Bdf;
use drivers::posted::PostedVectors;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;

#[cfg(target_arch = "aarch64")]
pub use aarch64::routes_to;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{on_interrupt, report};

/// vCPUs per guest (`vcpus=` allows 1-8).
pub const MAX_VCPUS: usize = 8;
/// Every vCPU slot of every guest.
pub const SLOTS: usize = super::MAX_GUESTS * MAX_VCPUS;

/// The message the guest programmed (its own address and data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMsi {
    pub address: u64,
    pub data: u32,
}

/// What the device is programmed with instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMsi {
    pub address: u64,
    pub data: u32,
}

/// The assigned function a route is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    /// The owning guest's index (its position in the configuration).
    pub guest: usize,
    pub segment: u16,
    pub bdf: Bdf,
}

/// Routes `dev`'s MSI, as the guest programmed it, to the guest; replaces the function's
/// previous route if any. On error nothing is routed (the previous route is gone too) and
/// the caller leaves the device's MSI disabled.
pub fn route(dev: Device, msi: GuestMsi) -> Result<HostMsi, String> {
    arch::route(dev, msi)
}

/// Removes `dev`'s route, if any: the device can no longer raise the host interrupt.
pub fn unroute(dev: Device) {
    arch::unroute(dev)
}

/// Posted virtual interrupts, one 256-bit set per vCPU slot (`drivers::posted`: Release on
/// post, Acquire on take, each bit taken exactly once): set by host interrupt handlers (any
/// CPU), taken by the vCPU's backend before it enters the guest.
static POSTED: [PostedVectors; SLOTS] = [const { PostedVectors::new() }; SLOTS];

/// Slots whose backend takes posted interrupts (set when the vCPU is bound, cleared when it
/// leaves). A route to a slot that is not bound is refused: its backend would never deliver.
static BOUND: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];

pub fn slot(guest: usize, vcpu: usize) -> Option<usize> {
    (guest < super::MAX_GUESTS && vcpu < MAX_VCPUS).then_some(guest * MAX_VCPUS + vcpu)
}

/// Marks `vector` pending on `slot` (what the route's handler recorded before is visible to
/// the vCPU that takes the bit).
pub fn post(slot: usize, vector: u8) {
    if let (Some(p), Some(any)) = (POSTED.get(slot), ANY_POSTED.get(slot)) {
        p.post(vector);
        // After the bit's fetch_or (program order, Release): see [`ANY_POSTED`]. An RMW, not a
        // store, so that a later post's swap continues this post's release sequence.
        any.swap(true, Ordering::Release);
    }
}

/// Takes every vector posted to `slot` since the last call.
pub fn take_posted(slot: usize) -> [u64; 4] {
    POSTED.get(slot).map_or([0; 4], PostedVectors::take)
}

/// Per slot, "something may have been posted since the summary was last cleared": the one
/// load a vCPU entry pays when nothing was posted ([`take_posted_if_any`]), instead of the
/// four atomic swaps of [`take_posted`].
///
/// Why no vector is ever left behind: [`post`] sets its bit (`fetch_or`, Release) and *then*
/// swaps the summary to true (Release). The taker swaps the summary to false with Acquire
/// *before* it swaps the words. If the taker's swap reads a true written by a post (or by a
/// later post's swap: every write to the summary is an RMW, so they all continue the first
/// one's release sequence), that post's `fetch_or` happens-before the word swaps, which see
/// its bit (or an earlier take already did). If the taker's swap is ordered before a post's
/// summary swap, that summary stays true after the take, so the next entry takes the bit. A
/// summary left true with no bit behind it only costs one empty take.
static ANY_POSTED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];

/// [`take_posted`] behind the summary flag: `None`, after one load, when nothing was posted
/// to `slot` since the last take through this function (the SVM and EL1 entry paths).
pub fn take_posted_if_any(slot: usize) -> Option<[u64; 4]> {
    let (p, any) = (POSTED.get(slot)?, ANY_POSTED.get(slot)?);
    // Relaxed is enough for the check: a true seen here is re-read by the Acquire swap, and a
    // post whose summary store this load misses is taken at the next entry (it raced with
    // this one: it could as well have come just after it).
    if !any.load(Ordering::Relaxed) || !any.swap(false, Ordering::Acquire) {
        return None;
    }
    Some(p.take())
}

/// A backend that delivers posted interrupts binds its vCPU's slot (or unbinds it when the
/// vCPU leaves, dropping what was posted).
pub fn bind(slot: usize, bound: bool) {
    if let Some(b) = BOUND.get(slot) {
        if !bound {
            take_posted(slot);
        }
        b.store(bound, Ordering::Release);
    }
}

pub fn is_bound(slot: usize) -> bool {
    BOUND.get(slot).is_some_and(|b| b.load(Ordering::Acquire))
}

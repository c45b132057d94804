//! The hardware trait the object model drives: enumerate devices, create page tables
//! (domains), map and unmap them, and move devices (and PASIDs) between them.
//!
//! Implemented once, by the generic skeleton in `backend.rs`, over three drivers: the VT-d
//! driver (`vtd_backend.rs`), the SMMUv3 driver (`smmu_backend.rs`) and the software model in
//! `sim.rs` that host tests and the fuzzer run against (test support).
//!
//! # The attach protocol: prepare / commit / abort
//!
//! A group's devices share one translation in hardware, so moving a group is moving every
//! member. To make that all-or-nothing, every switch of a device (or one PASID of it) from
//! its current domain (or from blocked) to a new domain is split in three calls:
//!
//! 1. [`IommuHw::prepare`]`(dev, pasid, domain)` checks everything that could make the switch
//!    fail (the device can use the domain: same IOMMU unit, cache-coherency enforcement,
//!    dirty tracking, PASID width) and allocates everything the switch needs (context
//!    tables, PASID-table pages, ...). It changes **nothing** the hardware can see. It returns
//!    a token.
//! 2. When every member is prepared, the object model calls [`IommuHw::commit`] on each token:
//!    the switch itself, make-before-break (at every instant the device translates through
//!    the old domain or the new one, never through none and never through a mix), followed by
//!    the invalidations the switch needs. A commit cannot fail for a reason the object model
//!    could have checked; `Err` means the hardware malfunctioned (a time-out), the switch has
//!    nevertheless been made, and the object model reports `EIO`.
//! 3. If any prepare fails, the object model calls [`IommuHw::abort`] on every token already
//!    prepared, which releases what prepare allocated. Nothing changed; the error goes back to
//!    the guest.
//!
//! A token must be committed or aborted before the next call that changes attachments.
//! Tokens of different devices of one group are independent.
//!
//! # Unmap and invalidation: record, then flush once
//!
//! [`IommuHw::unmap`] clears the page-table entries and *records* what the IOTLBs owe in an
//! [`HwInvalidation`] the caller keeps on its stack (one per hypercall, so two vCPUs' unmaps
//! build separate batches); [`IommuHw::flush`] then runs **one invalidation round per IOMMU
//! unit** for everything recorded: VT-d, every IOTLB (and device-TLB) descriptor followed by
//! one invalidation wait descriptor (VT-d 4.1 §6.5.2.8); SMMUv3, every TLBI command followed
//! by one CMD_SYNC (SMMUv3 §4.4, §4.7). Table pages an unmap unlinked are retired only after
//! the round of their unit completed, and leaked (never reused) if it failed. Until the flush
//! returns, a device may still hit stale IOTLB entries of the unmapped ranges: the object
//! model flushes before the hypercall returns and before any freed memory can be reused.

use crate::pgtable::{Gather, Prot, RunSource};

/// A device, as the index of [`IommuHw::device_info`] (0 .. [`IommuHw::device_count`]).
pub type HwDev = u32;

/// A hardware page table (a domain), as a handle the backend hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HwDomain(pub u32);

impl HwDomain {
    /// Never a live domain: what [`IommuHw::device_domain`] reports for a device the
    /// hardware translates through something else (a stale or foreign table, bypass, or
    /// aliases that disagree).
    pub const UNKNOWN: HwDomain = HwDomain(u32::MAX);
}

/// Reserved regions a device may report.
pub const MAX_RESERVED_PER_DEVICE: usize = 8;

/// An inclusive IOVA range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct Span {
    pub start: u64,
    pub last: u64,
}

impl Span {
    pub const FULL: Span = Span {
        start: 0,
        last: u64::MAX,
    };

    pub const fn new(start: u64, last: u64) -> Self {
        Span { start, last }
    }

    /// `[start, start + len)`, or `None` for an empty or overflowing range.
    pub fn from_len(start: u64, len: u64) -> Option<Self> {
        let last = start.checked_add(len.checked_sub(1)?)?;
        Some(Span { start, last })
    }

    pub const fn overlaps(&self, o: &Span) -> bool {
        self.start <= o.last && o.start <= self.last
    }

    pub const fn contains(&self, o: &Span) -> bool {
        self.start <= o.start && o.last <= self.last
    }

    /// Length in bytes, saturating at `u64::MAX` for the full range.
    pub const fn len(&self) -> u64 {
        (self.last - self.start).saturating_add(1)
    }

    pub const fn is_empty(&self) -> bool {
        false
    }
}

/// A reserved IOVA region of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HwReserved {
    pub span: Span,
    /// `hvabi::resv` kind.
    pub kind: u32,
}

/// What the object model needs to know about one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HwDeviceInfo {
    /// The platform's identity (PCI: segment << 16 | bus << 8 | devfn).
    pub hw_id: u64,
    /// The isolation group: devices with equal `group` share one translation.
    pub group: u32,
    /// log2 of the number of PASIDs the device supports (0: none).
    pub pasid_bits: u8,
    /// The IOMMU in front of the device can force DMA to snoop (VT-d ECAP.SC).
    pub enforce_cc: bool,
    /// The IOMMU in front of the device can track dirty pages.
    pub dirty_tracking: bool,
    /// The IOVA the device can emit and the IOMMU translate.
    pub aperture: Span,
    /// Reserved regions (MSI window, RMRR, ...); the first `nr_reserved` are valid.
    pub reserved: [HwReserved; MAX_RESERVED_PER_DEVICE],
    pub nr_reserved: u8,
}

impl HwDeviceInfo {
    pub fn reserved(&self) -> &[HwReserved] {
        let n = (self.nr_reserved as usize).min(MAX_RESERVED_PER_DEVICE);
        &self.reserved[..n]
    }
}

/// How to build a domain. Fixed for the domain's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DomainConfig {
    /// Every DMA snoops the CPU caches, whatever the device asks.
    pub enforce_cc: bool,
    /// Leaves track dirty state.
    pub dirty_tracking: bool,
    /// May later serve as the parent of nested (stage-1) tables.
    pub nest_parent: bool,
}

/// What a domain translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    pub aperture: Span,
    /// Leaf sizes (bit `n`: 2^n bytes).
    pub page_sizes: u64,
}

/// A lookup in a domain, for consistency checks and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwTranslation {
    /// Output address of the looked-up IOVA.
    pub pa: u64,
    /// The leaf's IOVA range.
    pub leaf: Span,
    pub read: bool,
    pub write: bool,
    /// The leaf forces snooping (VT-d SNP); `None` when the hardware enforces coherency
    /// elsewhere (a PASID-entry bit) and the leaf cannot tell.
    pub snoop: Option<bool>,
}

/// Why a hardware operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwError {
    /// Out of memory for a domain, a page-table page or a remapping structure.
    NoMemory,
    /// The domain enforces cache coherency and the device's IOMMU cannot.
    NotCoherent,
    /// The domain tracks dirty pages and the device's IOMMU cannot.
    NoDirtyTracking,
    /// The device cannot use this domain (another IOMMU unit, format, aperture).
    Incompatible,
    /// A feature the hardware lacks (PASID, dirty tracking, nesting).
    Unsupported,
    /// PASID beyond what the device or IOMMU supports.
    PasidOutOfRange,
    /// A bad argument the object model should have caught (a misaligned range, an unknown
    /// handle). Reported as `EINVAL`.
    Invalid,
    /// The hardware malfunctioned (a time-out); reported as `EIO`.
    Fault,
}

/// Ranges one [`HwInvalidation`] records separately. One hypercall touches at most
/// [`MAX_HWPTS_PER_IOAS`](super::MAX_HWPTS_PER_IOAS) domains (8), so a batch always has a
/// record of each touched domain to merge into and never needs an early round; the extra
/// records keep disjoint ranges of one domain apart (precise page-selective invalidations).
pub const MAX_PENDING_RANGES: usize = 16;

/// One domain's unmapped range waiting for its unit's invalidation round, with the table pages
/// unlinked from that domain.
#[derive(Debug)]
pub struct PendingRange {
    /// The backend's unit index of the domain.
    pub unit: usize,
    pub domain: HwDomain,
    /// The range (hull) unmapped, the smallest leaf, whether tables were unlinked, and the
    /// unlinked table pages.
    pub gather: Gather,
}

/// The invalidations one call owes, recorded by [`IommuHw::unmap`] and carried out by
/// [`IommuHw::flush`]: a fixed-capacity value (no heap allocation on the unmap path), kept on
/// the caller's stack.
///
/// Recording `[start, end)` of a domain: into the domain's record whose range it touches
/// (overlaps or is adjacent to), else into a free record, else — all
/// [`MAX_PENDING_RANGES`] taken — into the domain's record whose hull grows least (an
/// over-invalidation, never an under-invalidation: the drivers then pick a wider
/// page-selective or a domain-wide invalidation). Only when no record of the domain exists and
/// every record is taken does [`IommuHw::unmap`] flush early (one extra round per unit), which
/// the object model cannot cause (see [`MAX_PENDING_RANGES`]).
///
/// Dropping a value that still holds records leaks their table pages (safe: never reused
/// without an invalidation) and is a debug assertion failure: callers always flush.
#[derive(Debug)]
#[must_use = "recorded invalidations must be flushed"]
pub struct HwInvalidation {
    /// The records are `pending[..used]`, in the order they were made (every `Some`; the
    /// rest `None`): the sweeps of every unmap and flush stop at `used` instead of visiting
    /// every record.
    pending: [Option<PendingRange>; MAX_PENDING_RANGES],
    used: usize,
    /// Rounds run before `flush` because the batch was full.
    early_flushes: u32,
}

impl Default for HwInvalidation {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HwInvalidation {
    fn drop(&mut self) {
        let unflushed = !self.is_empty();
        for p in self.pending[..self.used].iter_mut().flatten() {
            p.gather.leak();
        }
        debug_assert!(!unflushed, "HwInvalidation dropped without flush");
    }
}

impl HwInvalidation {
    pub fn new() -> Self {
        HwInvalidation {
            pending: core::array::from_fn(|_| None),
            used: 0,
            early_flushes: 0,
        }
    }

    /// Nothing recorded.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Rounds that ran early because the batch was full (0 through the object model).
    pub fn early_flushes(&self) -> u32 {
        self.early_flushes
    }

    /// The record `[start, end)` of `domain` on `unit` goes into (see the type's docs), or
    /// `None` when the batch must be flushed first.
    pub fn record_index(
        &self,
        unit: usize,
        domain: HwDomain,
        start: u64,
        end: u64,
    ) -> Option<usize> {
        let mine = |p: &PendingRange| p.unit == unit && p.domain == domain;
        // The first free record: the one after the last in use.
        let free = (self.used < MAX_PENDING_RANGES).then_some(self.used);
        let mut best: Option<(usize, u64)> = None;
        for (i, slot) in self.pending[..self.used].iter().enumerate() {
            let Some(p) = slot else {
                continue;
            };
            if !mine(p) {
                continue;
            }
            let Some(r) = p.gather.range() else {
                // Only tables unlinked so far: any range fits (the round covers the domain).
                return Some(i);
            };
            if start <= r.end && r.start <= end {
                return Some(i);
            }
            let growth = r.start.saturating_sub(start) + end.saturating_sub(r.end);
            if best.is_none_or(|(_, g)| growth < g) {
                best = Some((i, growth));
            }
        }
        free.or(best.map(|(i, _)| i))
    }

    /// The gather of record `i` (from [`record_index`](Self::record_index)), created for
    /// `unit`/`domain` if the slot is free.
    pub fn gather_at(&mut self, i: usize, unit: usize, domain: HwDomain) -> &mut Gather {
        // `i` is a record in use or the first free one (`record_index`); anything else would
        // leave a hole, so it is taken as the first free one.
        let i = i.min(self.used);
        if i == self.used {
            self.used += 1;
        }
        &mut self.pending[i]
            .get_or_insert_with(|| PendingRange {
                unit,
                domain,
                gather: Gather::new(),
            })
            .gather
    }

    /// Counts a round run early (backends call it when [`record_index`](Self::record_index)
    /// says the batch is full).
    pub fn note_early_flush(&mut self) {
        self.early_flushes += 1;
    }

    /// The unit of some record, if any.
    pub fn next_unit(&self) -> Option<usize> {
        self.pending[..self.used]
            .iter()
            .flatten()
            .map(|p| p.unit)
            .next()
    }

    /// The records of `unit`.
    pub fn of_unit(&self, unit: usize) -> impl Iterator<Item = &PendingRange> {
        self.pending[..self.used]
            .iter()
            .flatten()
            .filter(move |p| p.unit == unit)
    }

    /// Takes the records of `unit` out, one at a time, into `f`.
    pub fn drain_unit(&mut self, unit: usize, mut f: impl FnMut(PendingRange)) {
        // The other units' records move down, in order, so they stay `pending[..used]`.
        let mut kept = 0;
        for i in 0..self.used {
            match self.pending[i].take() {
                Some(p) if p.unit == unit => f(p),
                Some(p) => {
                    self.pending[kept] = Some(p);
                    kept += 1;
                }
                None => {}
            }
        }
        self.used = kept;
    }
}

/// The IOMMU hardware, as the object model sees it. See the module docs for the attach
/// protocol.
pub trait IommuHw {
    /// A prepared switch of one device (or PASID), to commit or abort.
    type Prepared;

    /// Devices behind this IOMMU (or these IOMMUs).
    fn device_count(&self) -> u32;
    fn device_info(&self, dev: HwDev) -> Option<HwDeviceInfo>;
    /// Nested page tables (stage 1 over a nest-parent stage 2) can be built.
    fn nesting_supported(&self) -> bool {
        false
    }

    /// Creates an empty domain usable by `dev` (and by every device [`compatible`] with it).
    ///
    /// [`compatible`]: Self::compatible
    fn domain_alloc(&mut self, dev: HwDev, cfg: DomainConfig) -> Result<HwDomain, HwError>;
    /// Frees a domain no device uses (tables included).
    fn domain_free(&mut self, d: HwDomain);
    fn domain_info(&self, d: HwDomain) -> Option<DomainInfo>;
    /// Whether `dev` could use `d`, without preparing anything: the checks of
    /// [`prepare`](Self::prepare) that do not allocate.
    fn compatible(&self, dev: HwDev, d: HwDomain) -> Result<(), HwError>;

    /// Maps `[iova, iova + len)` to `[pa, pa + len)`, all or nothing; invalidates what the
    /// hardware needs (caching mode, write buffers).
    ///
    /// Takes `&self`: the object model calls it from several CPUs at once, on disjoint ranges
    /// (the page-table engine's contract), while no control operation changes the domain set.
    fn map(&self, d: HwDomain, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), HwError>;
    /// [`map`](Self::map) of `[iova, iova + len)` to the physical runs `runs` gives (memory
    /// whose host pages are scattered), in one page-table walk: all or nothing, as `map`. A run
    /// `runs` refuses (or that is misaligned, shorter than a page, out of range) fails the call
    /// with [`HwError::Invalid`] after removing what it mapped; the caller's source knows why.
    fn map_runs(
        &self,
        d: HwDomain,
        iova: u64,
        len: u64,
        runs: &mut dyn RunSource,
        prot: Prot,
    ) -> Result<(), HwError>;
    /// Unmaps `[iova, iova + len)` (whole mappings only) and returns the bytes unmapped. The
    /// IOTLB invalidation is only recorded in `inv`: call [`flush`](Self::flush) with it before
    /// relying on the range being gone (module docs). `&self`, concurrently on disjoint
    /// ranges, as [`map`](Self::map); each caller records into its own `inv`. Bytes cleared before an error are
    /// recorded too. `Err(Fault)` only from an early round (a full `inv`).
    fn unmap(
        &self,
        d: HwDomain,
        iova: u64,
        len: u64,
        inv: &mut HwInvalidation,
    ) -> Result<u64, HwError>;
    /// Runs one invalidation round per unit for everything `inv` recorded, then retires the
    /// unlinked table pages of each unit whose round completed (leaking those of a unit whose
    /// round failed). `inv` is empty afterwards, on error too. `Err(Fault)`: some unit's round
    /// failed (time-out, queue error); the others still ran.
    fn flush(&self, inv: &mut HwInvalidation) -> Result<(), HwError>;
    /// [`unmap`](Self::unmap) and [`flush`](Self::flush) of its own round: for rollbacks and
    /// one-off calls. A flush failure wins over the unmap's result.
    fn unmap_now(&self, d: HwDomain, iova: u64, len: u64) -> Result<u64, HwError> {
        let mut inv = HwInvalidation::new();
        let r = self.unmap(d, iova, len, &mut inv);
        self.flush(&mut inv)?;
        r
    }

    /// Step 1 of a switch of `dev` (`pasid`: `None` for the requester ID itself) to `d`.
    fn prepare(
        &mut self,
        dev: HwDev,
        pasid: Option<u32>,
        d: HwDomain,
    ) -> Result<Self::Prepared, HwError>;
    /// Step 2: make the switch.
    fn commit(&mut self, p: Self::Prepared) -> Result<(), HwError>;
    /// Step 2 on failure: forget a prepared switch.
    fn abort(&mut self, p: Self::Prepared);
    /// Blocks DMA of `dev` (`pasid`): the entry becomes not present. Nothing to check, nothing
    /// to allocate; `Err` only for a hardware malfunction (the entry is cleared anyway).
    fn detach(&mut self, dev: HwDev, pasid: Option<u32>) -> Result<(), HwError>;

    /// Turns dirty tracking of a domain created with `dirty_tracking` on (clearing every dirty
    /// bit first) or off (keeping every dirty bit: `read_dirty` still reports, and clears,
    /// what was recorded while it was on; nothing new is recorded).
    fn set_dirty_tracking(&mut self, d: HwDomain, enable: bool) -> Result<(), HwError> {
        let _ = (d, enable);
        Err(HwError::Unsupported)
    }
    /// Reports (`report(iova, len)`) every dirty leaf in `[iova, iova + len)` and, with
    /// `clear`, cleans it (invalidating the IOTLB so the hardware marks it again).
    fn read_dirty(
        &mut self,
        d: HwDomain,
        iova: u64,
        len: u64,
        clear: bool,
        report: &mut dyn FnMut(u64, u64),
    ) -> Result<(), HwError> {
        let _ = (d, iova, len, clear, report);
        Err(HwError::Unsupported)
    }

    // Introspection, for the consistency checker and tests.

    /// The leaf translating `iova` in `d`.
    fn translate(&self, d: HwDomain, iova: u64) -> Option<HwTranslation>;
    /// Bytes mapped in `d`.
    fn mapped_bytes(&self, d: HwDomain) -> u64;
    /// The domain `dev` (`pasid`) translates through now, `None` when blocked. Backends read
    /// it back from the hardware's structures (`backend.rs`), so the consistency checker
    /// compares the object model with what the IOMMU walks.
    fn device_domain(&self, dev: HwDev, pasid: Option<u32>) -> Option<HwDomain>;
    /// Domains alive, if the backend counts them.
    fn live_domains(&self) -> Option<u32> {
        None
    }
    /// Prepared switches neither committed nor aborted, if the backend counts them.
    fn outstanding_prepared(&self) -> Option<u32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(inv: &mut HwInvalidation, unit: usize, d: u32, start: u64, end: u64) -> usize {
        let i = inv.record_index(unit, HwDomain(d), start, end).unwrap();
        inv.gather_at(i, unit, HwDomain(d)).add_range(start, end);
        i
    }

    /// The records stay `pending[..used]` through recording and draining: a touching range
    /// joins its domain's record, a disjoint one or another domain's takes the next free one,
    /// draining a unit keeps the others' records in order, and a full batch merges into the
    /// domain's record that grows least.
    #[test]
    fn records_are_merged_drained_and_reused_in_order() {
        let mut inv = HwInvalidation::new();
        assert!(inv.is_empty() && inv.next_unit().is_none());
        assert_eq!(record(&mut inv, 0, 1, 0x1000, 0x2000), 0);
        assert_eq!(record(&mut inv, 1, 2, 0x1000, 0x2000), 1);
        assert_eq!(
            record(&mut inv, 0, 1, 0x2000, 0x3000),
            0,
            "adjacent: merged"
        );
        assert_eq!(
            record(&mut inv, 0, 1, 0x9000, 0xa000),
            2,
            "disjoint: its own"
        );
        assert_eq!(inv.len(), 3);
        let mut drained = alloc::vec::Vec::new();
        inv.drain_unit(0, |mut p| {
            drained.push(p.gather.range().unwrap());
            p.gather.leak();
        });
        assert_eq!(drained.len(), 2);
        assert_eq!((drained[0].start, drained[0].end), (0x1000, 0x3000));
        assert_eq!(inv.len(), 1);
        assert_eq!(inv.next_unit(), Some(1));
        assert_eq!(inv.of_unit(1).count(), 1);
        // The next record goes right after the one left.
        assert_eq!(record(&mut inv, 0, 1, 0x5000, 0x6000), 1);
        // Fill the batch with disjoint ranges of domain 1 on unit 0, then one more: merged
        // into the record whose hull grows least (the last one).
        for k in 2..MAX_PENDING_RANGES as u64 {
            let at = 0x10_0000 * k;
            assert_eq!(record(&mut inv, 0, 1, at, at + 0x1000), k as usize);
        }
        let last = 0x10_0000 * (MAX_PENDING_RANGES as u64 - 1);
        assert_eq!(
            inv.record_index(0, HwDomain(1), last + 0x8000, last + 0x9000),
            Some(MAX_PENDING_RANGES - 1)
        );
        // A domain with no record in a full batch: flush first.
        assert_eq!(inv.record_index(0, HwDomain(7), 0, 0x1000), None);
        for u in [0, 1] {
            inv.drain_unit(u, |mut p| p.gather.leak());
        }
        assert!(inv.is_empty());
    }
}

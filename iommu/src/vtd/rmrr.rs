//! Reserved memory region reporting (VT-d 4.1 §8.4): firmware lists memory ranges (USB legacy
//! emulation buffers, graphics stolen memory, management-controller buffers) that the devices
//! named in each RMRR keep using for DMA after the OS takes over. Once translation is on, those
//! devices fault on that DMA unless their domain maps the ranges one to one.
//!
//! Two steps:
//!
//! 1. [`RmrrPlan::build`], pure: resolves every RMRR device scope against the live PCI topology,
//!    finds the remapping unit of each device ([`Dmar::unit_for_device`]), and collects per
//!    device the page-aligned, merged identity ranges it needs. Firmware mistakes are skipped or
//!    repaired and reported ([`RmrrIssue`]), never a panic. Fixed capacity, no allocation;
//!    overflow is reported and makes the plan incomplete.
//! 2. [`VtdUnit::apply_rmrr`], per unit: one identity domain (second stage, IOVA == PA, read and
//!    write) mapping the union of the unit's RMRR ranges, attached to every RMRR device of the
//!    unit. Those devices then stay there: [`VtdUnit::is_assignable`] is false for them, and
//!    `attach`/`replace`/`detach` refuse them with [`VtdError::RmrrDevice`].

use core::cell::Cell;
use core::fmt;
use core::sync::atomic::AtomicU64;

use crate::firmware::dmar::{Dmar, PciTopology, ResolveError, Rmrr, ScopeType};
use crate::hw::Mmio;
use crate::pgtable::{PhysAddr, Prot, TableMemory};

use super::domain::{Domain, DomainConfig};
use super::error::VtdError;
use super::mem::VtdMemory;
use super::regs::Sagaw;
use super::unit::{TranslationMode, VtdUnit};

/// Devices (segment, SID) with RMRRs a plan holds, over all units.
pub const MAX_RMRR_DEVICES: usize = 64;
/// Merged identity ranges one device can need.
pub const MAX_RANGES_PER_DEVICE: usize = 8;
/// Issues a plan keeps; further ones are only counted ([`RmrrPlan::issues_dropped`]).
pub const MAX_RMRR_ISSUES: usize = 32;

const PAGE: u64 = 4096;

/// A page-aligned, non-empty physical range `[start, end)` that must translate to itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityRange {
    pub start: u64,
    /// Exclusive; a multiple of 4 KiB above `start`.
    pub end: u64,
}

impl IdentityRange {
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Overlapping or adjacent: the two merge into one range.
    const fn touches(&self, other: &IdentityRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl fmt::Display for IdentityRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// One device with RMRRs, and the identity ranges it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmrrDevice {
    /// Register base of the remapping unit (DRHD) that translates the device.
    pub unit: u64,
    /// That DRHD's index among the table's DRHDs.
    pub drhd_index: usize,
    pub segment: u16,
    /// Source id (bus << 8 | device << 3 | function) on the live topology.
    pub sid: u16,
    ranges: [IdentityRange; MAX_RANGES_PER_DEVICE],
    count: u8,
}

impl RmrrDevice {
    const EMPTY: RmrrDevice = RmrrDevice {
        unit: 0,
        drhd_index: 0,
        segment: 0,
        sid: 0,
        ranges: [IdentityRange { start: 0, end: 0 }; MAX_RANGES_PER_DEVICE],
        count: 0,
    };

    /// The merged ranges, sorted, pairwise neither overlapping nor adjacent.
    pub fn ranges(&self) -> &[IdentityRange] {
        &self.ranges[..self.count as usize]
    }

    /// Adds `r`, merging it with every range it overlaps or adjoins. False (and nothing
    /// changes) if the result would need more than [`MAX_RANGES_PER_DEVICE`] ranges.
    fn add(&mut self, r: IdentityRange) -> bool {
        let mut merged = r;
        let mut kept = [IdentityRange::default(); MAX_RANGES_PER_DEVICE];
        let mut n = 0;
        for &e in self.ranges() {
            if e.touches(&merged) {
                merged.start = merged.start.min(e.start);
                merged.end = merged.end.max(e.end);
            } else {
                kept[n] = e;
                n += 1;
            }
        }
        if n == MAX_RANGES_PER_DEVICE {
            return false;
        }
        let at = kept[..n].iter().position(|e| e.start > merged.start);
        let at = at.unwrap_or(n);
        kept.copy_within(at..n, at + 1);
        kept[at] = merged;
        self.ranges = kept;
        self.count = (n + 1) as u8;
        true
    }

    fn key(&self) -> (u64, u16, u16) {
        (self.unit, self.segment, self.sid)
    }
}

/// What was wrong with an RMRR or one of its device scopes, and what the plan did about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmrrIssueKind {
    /// Base 0 and limit 0, a one-byte "range" at address 0 (e.g. HP Compaq 6730b for its USB
    /// controllers): no real reservation. The RMRR is skipped.
    ZeroRange,
    /// Limit below base. The RMRR is skipped.
    LimitBelowBase,
    /// Base not 4 KiB aligned or size not a multiple of 4 KiB (§8.4 requires both). The range
    /// was rounded out to `used` (base down, limit + 1 up) and kept.
    Unaligned { used: IdentityRange },
    /// The range, rounded, ends above the DMAR host address width (`haw` bits) or 2^64: no DMA
    /// can reach it. The RMRR is skipped.
    BeyondAddressWidth { haw: u8 },
    /// A device scope did not resolve against the topology (no such device or bridge on the
    /// live system, or a garbage path). The scope is skipped: the device it names does not
    /// exist now.
    Unresolved(ResolveError),
    /// A scope of a type other than PCI endpoint or sub-hierarchy (I/O APIC, HPET, ...),
    /// meaningless in an RMRR. Skipped.
    NotAPciDevice(ScopeType),
    /// A PCI sub-hierarchy (bridge) scope: the bridge itself is planned, the devices below it
    /// are not (the planner sees bridges, not every function behind them). Makes the plan
    /// incomplete.
    SubHierarchy,
    /// No remapping unit translates the device (no DRHD scope and no INCLUDE_PCI_ALL unit for
    /// its segment): its DMA is not remapped. Skipped.
    NoUnit,
    /// The plan already holds [`MAX_RMRR_DEVICES`] devices: this one is lost. Makes the plan
    /// incomplete.
    DeviceOverflow,
    /// The device already has [`MAX_RANGES_PER_DEVICE`] separate ranges: this range is lost
    /// for it. Makes the plan incomplete.
    RangeOverflow,
}

/// One finding of the planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmrrIssue {
    /// Table offset of the RMRR structure.
    pub rmrr_offset: usize,
    /// The RMRR's base and (inclusive) limit as firmware wrote them.
    pub base: u64,
    pub limit: u64,
    /// Table offset of the device scope, for scope-level issues.
    pub scope_offset: Option<usize>,
    /// (segment, SID) of the device, when known.
    pub device: Option<(u16, u16)>,
    pub kind: RmrrIssueKind,
}

impl RmrrIssue {
    const NONE: RmrrIssue = RmrrIssue {
        rmrr_offset: 0,
        base: 0,
        limit: 0,
        scope_offset: None,
        device: None,
        kind: RmrrIssueKind::ZeroRange,
    };

    /// Whether the issue lost information the plan would need to protect every device
    /// (overflow, sub-hierarchy scope).
    pub const fn makes_incomplete(&self) -> bool {
        matches!(
            self.kind,
            RmrrIssueKind::SubHierarchy
                | RmrrIssueKind::DeviceOverflow
                | RmrrIssueKind::RangeOverflow
        )
    }
}

impl fmt::Display for RmrrIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RMRR at {:#x} ({:#x}-{:#x})",
            self.rmrr_offset, self.base, self.limit
        )?;
        if let Some((segment, sid)) = self.device {
            write!(
                f,
                " device {segment:04x}:{:02x}:{:02x}.{}",
                sid >> 8,
                (sid >> 3) & 0x1f,
                sid & 7
            )?;
        } else if let Some(offset) = self.scope_offset {
            write!(f, " scope at {offset:#x}")?;
        }
        f.write_str(": ")?;
        match self.kind {
            RmrrIssueKind::ZeroRange => f.write_str("base 0 limit 0 (firmware bug), skipped"),
            RmrrIssueKind::LimitBelowBase => f.write_str("limit below base, skipped"),
            RmrrIssueKind::Unaligned { used } => {
                write!(f, "not 4 KiB aligned, rounded out to {used}")
            }
            RmrrIssueKind::BeyondAddressWidth { haw } => {
                write!(f, "beyond the {haw}-bit host address width, skipped")
            }
            RmrrIssueKind::Unresolved(e) => write!(f, "scope does not resolve ({e}), skipped"),
            RmrrIssueKind::NotAPciDevice(t) => write!(f, "{} scope, skipped", t.name()),
            RmrrIssueKind::SubHierarchy => {
                f.write_str("sub-hierarchy scope: only the bridge itself is covered")
            }
            RmrrIssueKind::NoUnit => f.write_str("no remapping unit translates it, skipped"),
            RmrrIssueKind::DeviceOverflow => f.write_str("too many RMRR devices, device lost"),
            RmrrIssueKind::RangeOverflow => {
                f.write_str("too many ranges for the device, range lost")
            }
        }
    }
}

/// Which devices of which unit need which identity ranges: the result of [`RmrrPlan::build`].
///
/// About 12 KiB (keep it in a static or on a large stack); fixed capacity
/// ([`MAX_RMRR_DEVICES`], [`MAX_RANGES_PER_DEVICE`], [`MAX_RMRR_ISSUES`]). Devices are sorted by
/// (unit register base, segment, SID), so each unit's devices are one slice
/// ([`for_unit`](Self::for_unit)).
#[derive(Clone, Debug)]
pub struct RmrrPlan {
    devices: [RmrrDevice; MAX_RMRR_DEVICES],
    device_count: usize,
    issues: [RmrrIssue; MAX_RMRR_ISSUES],
    issue_count: usize,
    issues_dropped: usize,
    incomplete: bool,
    rmrrs: usize,
    rmrrs_used: usize,
}

impl RmrrPlan {
    /// Plans the identity mappings for every RMRR of `dmar`, resolving scopes through
    /// `topology` (the live PCI hierarchy, as read from ECAM):
    ///
    /// * base 0 with limit 0, limit below base, or a range past the host address width: the
    ///   RMRR is skipped and reported;
    /// * otherwise the range becomes `[base & !0xfff, align_up(limit + 1))`; when that changed
    ///   it, the rounding is reported;
    /// * each endpoint scope that resolves becomes a device (segment, SID) of the unit
    ///   [`Dmar::unit_for_device`] picks; one device's ranges are merged where they overlap or
    ///   touch; scopes that do not resolve, or have no unit, are skipped and reported.
    pub fn build(dmar: &Dmar<'_>, topology: &dyn PciTopology) -> Self {
        let mut plan = RmrrPlan {
            devices: [RmrrDevice::EMPTY; MAX_RMRR_DEVICES],
            device_count: 0,
            issues: [RmrrIssue::NONE; MAX_RMRR_ISSUES],
            issue_count: 0,
            issues_dropped: 0,
            incomplete: false,
            rmrrs: 0,
            rmrrs_used: 0,
        };
        let haw = dmar.host_address_width();
        for rmrr in dmar.rmrrs() {
            plan.rmrrs += 1;
            if let Some(range) = plan.range_of(&rmrr, haw) {
                plan.rmrrs_used += 1;
                plan.add_scopes(dmar, &rmrr, range, topology);
            }
        }
        plan
    }

    /// The identity range an RMRR asks for, or `None` (reported) if it is unusable.
    fn range_of(&mut self, rmrr: &Rmrr<'_>, haw: u8) -> Option<IdentityRange> {
        let (base, limit) = (rmrr.base(), rmrr.limit());
        let issue = |kind| RmrrIssue {
            rmrr_offset: rmrr.offset(),
            base,
            limit,
            scope_offset: None,
            device: None,
            kind,
        };
        if base == 0 && limit == 0 {
            self.report(issue(RmrrIssueKind::ZeroRange));
            return None;
        }
        if limit < base {
            self.report(issue(RmrrIssueKind::LimitBelowBase));
            return None;
        }
        let start = base & !(PAGE - 1);
        let end = limit
            .checked_add(1)
            .and_then(|e| e.checked_next_multiple_of(PAGE));
        let end = match end {
            Some(e) if haw >= 64 || e <= 1u64 << haw => e,
            _ => {
                self.report(issue(RmrrIssueKind::BeyondAddressWidth { haw }));
                return None;
            }
        };
        let used = IdentityRange { start, end };
        if !rmrr.is_well_formed() {
            self.report(issue(RmrrIssueKind::Unaligned { used }));
        }
        Some(used)
    }

    fn add_scopes(
        &mut self,
        dmar: &Dmar<'_>,
        rmrr: &Rmrr<'_>,
        range: IdentityRange,
        topology: &dyn PciTopology,
    ) {
        let segment = rmrr.segment();
        for scope in rmrr.scopes() {
            let issue = |device, kind| RmrrIssue {
                rmrr_offset: rmrr.offset(),
                base: rmrr.base(),
                limit: rmrr.limit(),
                scope_offset: Some(scope.offset()),
                device,
                kind,
            };
            let kind = scope.scope_type();
            if !matches!(kind, ScopeType::Endpoint | ScopeType::Bridge) {
                self.report(issue(None, RmrrIssueKind::NotAPciDevice(kind)));
                continue;
            }
            let resolved = match scope.resolve(segment, topology) {
                Ok(r) => r,
                Err(e) => {
                    self.report(issue(None, RmrrIssueKind::Unresolved(e)));
                    continue;
                }
            };
            let device = Some((segment, resolved.source_id()));
            if kind == ScopeType::Bridge {
                self.report(issue(device, RmrrIssueKind::SubHierarchy));
            }
            let (bus, dev, func) = (resolved.bus, resolved.device, resolved.function);
            let Some(unit) = dmar.unit_for_device(segment, bus, dev, func, topology) else {
                self.report(issue(device, RmrrIssueKind::NoUnit));
                continue;
            };
            let key = (unit.register_base, segment, resolved.source_id());
            let slot = match self.devices().iter().position(|d| d.key() >= key) {
                Some(i) if self.devices[i].key() == key => Some(i),
                at => self.insert_device(at.unwrap_or(self.device_count), key, unit.index),
            };
            let Some(i) = slot else {
                self.report(issue(device, RmrrIssueKind::DeviceOverflow));
                continue;
            };
            if !self.devices[i].add(range) {
                self.report(issue(device, RmrrIssueKind::RangeOverflow));
            }
        }
    }

    /// Inserts an empty device at `at` (keeping the order); `None` when full.
    fn insert_device(
        &mut self,
        at: usize,
        (unit, segment, sid): (u64, u16, u16),
        drhd_index: usize,
    ) -> Option<usize> {
        if self.device_count == MAX_RMRR_DEVICES {
            return None;
        }
        self.devices.copy_within(at..self.device_count, at + 1);
        self.devices[at] = RmrrDevice {
            unit,
            drhd_index,
            segment,
            sid,
            ..RmrrDevice::EMPTY
        };
        self.device_count += 1;
        Some(at)
    }

    fn report(&mut self, issue: RmrrIssue) {
        if issue.makes_incomplete() {
            self.incomplete = true;
        }
        if self.issue_count < MAX_RMRR_ISSUES {
            self.issues[self.issue_count] = issue;
            self.issue_count += 1;
        } else {
            self.issues_dropped += 1;
        }
    }

    /// Every device with RMRRs, sorted by (unit, segment, SID).
    pub fn devices(&self) -> &[RmrrDevice] {
        &self.devices[..self.device_count]
    }

    /// The device `segment:sid`, if it has RMRRs.
    pub fn device(&self, segment: u16, sid: u16) -> Option<&RmrrDevice> {
        self.devices()
            .iter()
            .find(|d| d.segment == segment && d.sid == sid)
    }

    /// What was skipped, repaired or lost, in table order.
    pub fn issues(&self) -> &[RmrrIssue] {
        &self.issues[..self.issue_count]
    }

    /// Issues beyond [`MAX_RMRR_ISSUES`], counted only.
    pub fn issues_dropped(&self) -> usize {
        self.issues_dropped
    }

    /// False if a device or range was lost to capacity, or a sub-hierarchy scope could not be
    /// expanded: then some device that needs an RMRR may be missing from the plan.
    pub fn is_complete(&self) -> bool {
        !self.incomplete
    }

    /// RMRR structures in the table, and how many of them had a usable range.
    pub fn rmrr_counts(&self) -> (usize, usize) {
        (self.rmrrs, self.rmrrs_used)
    }

    /// The plan of the unit at `register_base` (no devices if it has none).
    pub fn for_unit(&self, register_base: u64) -> UnitRmrrPlan<'_> {
        let all = self.devices();
        let first = all.iter().position(|d| d.unit == register_base);
        let devices = match first {
            Some(i) => {
                let n = all[i..]
                    .iter()
                    .take_while(|d| d.unit == register_base)
                    .count();
                &all[i..i + n]
            }
            None => &[],
        };
        UnitRmrrPlan {
            register_base,
            devices,
            complete: self.is_complete(),
        }
    }

    /// The units that have RMRR devices, in register-base order.
    pub fn units(&self) -> impl Iterator<Item = UnitRmrrPlan<'_>> + '_ {
        let all = self.devices();
        (0..all.len())
            .filter(move |&i| i == 0 || all[i - 1].unit != all[i].unit)
            .map(move |i| self.for_unit(all[i].unit))
    }
}

/// The part of an [`RmrrPlan`] for one remapping unit: the input of
/// [`VtdUnit::apply_rmrr`]. Only [`RmrrPlan`] makes one, so its devices are sorted and at most
/// [`MAX_RMRR_DEVICES`].
#[derive(Clone, Copy, Debug)]
pub struct UnitRmrrPlan<'a> {
    register_base: u64,
    devices: &'a [RmrrDevice],
    complete: bool,
}

impl<'a> UnitRmrrPlan<'a> {
    pub fn register_base(&self) -> u64 {
        self.register_base
    }

    /// The unit's RMRR devices, sorted by (segment, SID).
    pub fn devices(&self) -> &'a [RmrrDevice] {
        self.devices
    }

    /// The whole plan is complete ([`RmrrPlan::is_complete`]). An incomplete plan still
    /// applies; the unit then treats no device as assignable.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The union of every device's ranges: sorted, merged where they overlap or touch. This is
    /// what the unit's identity domain maps.
    pub fn identity_ranges(&self) -> IdentityRanges<'a> {
        IdentityRanges {
            devices: self.devices,
            cursor: 0,
        }
    }
}

/// Iterator over the union of a unit's identity ranges ([`UnitRmrrPlan::identity_ranges`]).
/// Quadratic in the number of ranges (at most a few hundred), no buffer.
#[derive(Clone, Debug)]
pub struct IdentityRanges<'a> {
    devices: &'a [RmrrDevice],
    /// Everything below has been yielded.
    cursor: u64,
}

impl IdentityRanges<'_> {
    fn every_range(&self) -> impl Iterator<Item = IdentityRange> + '_ {
        self.devices.iter().flat_map(|d| d.ranges().iter().copied())
    }
}

impl Iterator for IdentityRanges<'_> {
    type Item = IdentityRange;

    fn next(&mut self) -> Option<IdentityRange> {
        let cursor = self.cursor;
        let start = self
            .every_range()
            .filter(|r| r.end > cursor)
            .map(|r| r.start.max(cursor))
            .min()?;
        let mut end = start;
        // Grow while some range starts inside (or right at the end of) what is covered.
        loop {
            let grown = self
                .every_range()
                .filter(|r| r.start <= end && r.end > end)
                .map(|r| r.end)
                .max();
            match grown {
                Some(e) => end = e,
                None => break,
            }
        }
        self.cursor = end;
        Some(IdentityRange { start, end })
    }
}

/// What [`VtdUnit::apply_rmrr`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RmrrReport {
    /// The identity domain's id; `None` if the unit has no RMRR device.
    pub domain_id: Option<u16>,
    /// Its address width (39, 48 or 57); 0 without a domain.
    pub address_width: u32,
    /// Devices attached to it.
    pub devices: usize,
    /// Merged ranges mapped, and their total size.
    pub ranges: usize,
    pub bytes: u64,
    /// [`UnitRmrrPlan::is_complete`]: false means no device of the unit is assignable.
    pub complete: bool,
}

/// The RMRR state a unit keeps.
pub(super) struct RmrrState {
    pub domain: Option<Domain>,
    sids: [u16; MAX_RMRR_DEVICES],
    len: usize,
    pub incomplete: bool,
    pub applied: bool,
}

impl RmrrState {
    pub const fn new() -> Self {
        RmrrState {
            domain: None,
            sids: [0; MAX_RMRR_DEVICES],
            len: 0,
            incomplete: false,
            applied: false,
        }
    }

    pub fn holds(&self, sid: u16) -> bool {
        self.sids().contains(&sid)
    }

    pub fn sids(&self) -> &[u16] {
        &self.sids[..self.len]
    }
}

/// Pages the attach phase of [`VtdUnit::apply_rmrr`] may need, allocated up front so that it
/// cannot run out of memory half way: legacy, one context table per bus; scalable mode, one
/// context table per bus half plus a PASID directory and a PASID table per device.
const RESERVE_CAPACITY: usize = 3 * MAX_RMRR_DEVICES;

/// A [`VtdMemory`] that hands out pre-allocated pages and forwards everything else.
struct Reserve<'m, T: VtdMemory> {
    inner: &'m T,
    pages: [u64; RESERVE_CAPACITY],
    len: usize,
    /// Pages handed out so far (`alloc_table` takes `&self`).
    next: Cell<usize>,
}

impl<'m, T: VtdMemory> Reserve<'m, T> {
    /// Allocates `n` pages from `inner`, or none (all given back) if it runs out.
    fn fill(inner: &'m T, n: usize) -> Result<Self, VtdError> {
        let mut r = Reserve {
            inner,
            pages: [0; RESERVE_CAPACITY],
            len: 0,
            next: Cell::new(0),
        };
        for _ in 0..n.min(RESERVE_CAPACITY) {
            match inner.alloc_table(4096) {
                Some(pa) => {
                    r.pages[r.len] = pa;
                    r.len += 1;
                }
                None => {
                    r.release();
                    return Err(VtdError::NoMemory);
                }
            }
        }
        Ok(r)
    }

    /// Frees the pages not handed out: nothing but this reserve ever saw them.
    fn release(&self) {
        for &pa in &self.pages[self.next.get()..self.len] {
            self.inner.free_table(pa, 4096);
        }
        self.next.set(self.len);
    }
}

impl<T: VtdMemory> TableMemory for Reserve<'_, T> {
    type Entry = AtomicU64;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        let next = self.next.get();
        if bytes != 4096 || next >= self.len {
            return None;
        }
        self.next.set(next + 1);
        Some(self.pages[next])
    }

    fn free_table(&self, pa: PhysAddr, bytes: usize) {
        self.inner.free_table(pa, bytes)
    }

    fn retire_table(&self, pa: PhysAddr, bytes: usize) {
        self.inner.retire_table(pa, bytes)
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[AtomicU64] {
        self.inner.table(pa, entries)
    }

    fn clean(&self, pa: PhysAddr, bytes: usize) {
        self.inner.clean(pa, bytes)
    }
}

impl<T: VtdMemory> VtdMemory for Reserve<'_, T> {
    fn store128(&self, pa: u64, lo: u64, hi: u64) {
        self.inner.store128(pa, lo, hi)
    }

    fn store64(&self, pa: u64, value: u64) {
        self.inner.store64(pa, value)
    }
}

impl<M: Mmio> VtdUnit<M> {
    /// Sets up the unit's RMRR identity domain from `plan` (VT-d 4.1 §8.4), at bring-up,
    /// before any device of the unit is attached and before translation is enabled:
    ///
    /// 1. checks every SID against the unit's bus range;
    /// 2. creates one second-stage domain whose address width is the smallest SAGAW depth
    ///    covering the highest RMRR address (MGAW permitting), and maps the union of the
    ///    unit's ranges IOVA == PA, read and write;
    /// 3. allocates up front every structure page the attachments can need;
    /// 4. attaches every device (PASID: RID_PASID) to the domain.
    ///
    /// On failure everything done is undone (devices detached, domain destroyed, spare pages
    /// freed) and the error returned: after an allocation failure the remapping structures are
    /// exactly as before. Afterwards the devices are not assignable
    /// ([`is_assignable`](Self::is_assignable)) and `attach`/`replace`/`detach` refuse them.
    /// All RMRR devices of a unit share the one domain, so each sees the others' ranges too
    /// (they are all host-owned). A unit without RMRR devices gets no domain. Runs once:
    /// [`VtdError::RmrrAlreadyApplied`] afterwards.
    pub fn apply_rmrr<T: VtdMemory>(
        &mut self,
        mem: &T,
        plan: &UnitRmrrPlan<'_>,
    ) -> Result<RmrrReport, VtdError> {
        if self.rmrr.applied {
            return Err(VtdError::RmrrAlreadyApplied);
        }
        for dev in plan.devices {
            self.check_sid(dev.sid)?;
        }
        let mut report = RmrrReport {
            complete: plan.complete,
            ..RmrrReport::default()
        };
        let Some(top) = plan.identity_ranges().map(|r| r.end).max() else {
            self.rmrr.applied = true;
            self.rmrr.incomplete = !plan.complete;
            return Ok(report);
        };
        let aw = self.identity_width(top)?;
        let domain = self.create_domain(mem, DomainConfig::second_stage(aw))?;
        for r in plan.identity_ranges() {
            let rw = Prot::READ | Prot::WRITE;
            if let Err(e) = self.map(mem, &domain, r.start, r.start, r.len(), rw) {
                self.destroy_quietly(mem, domain);
                return Err(e);
            }
            report.ranges += 1;
            report.bytes += r.len();
        }
        let reserve = match Reserve::fill(mem, self.reserve_need(plan)) {
            Ok(r) => r,
            Err(e) => {
                self.destroy_quietly(mem, domain);
                return Err(e);
            }
        };
        let mut attached = 0;
        let mut failure = None;
        for dev in plan.devices {
            match self.attach(&reserve, dev.sid, None, &domain) {
                Ok(()) => attached += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        reserve.release();
        if let Some(e) = failure {
            for dev in plan.devices[..attached].iter().rev() {
                // Best effort: the first error is the one reported.
                let _ = self.detach_unchecked(mem, dev.sid, None);
            }
            self.destroy_quietly(mem, domain);
            return Err(e);
        }
        for (slot, dev) in self.rmrr.sids.iter_mut().zip(plan.devices) {
            *slot = dev.sid;
        }
        self.rmrr.len = plan.devices.len().min(MAX_RMRR_DEVICES);
        self.rmrr.incomplete = !plan.complete;
        self.rmrr.applied = true;
        report.domain_id = Some(domain.did());
        report.address_width = aw;
        report.devices = attached;
        self.rmrr.domain = Some(domain);
        Ok(report)
    }

    /// Whether `sid` may be given to a guest: false for a device held by the RMRR identity
    /// domain, and for every device when the applied plan was incomplete (the unit cannot tell
    /// which devices firmware still needs). True before [`apply_rmrr`](Self::apply_rmrr) runs.
    pub fn is_assignable(&self, sid: u16) -> bool {
        !(self.rmrr.incomplete || self.rmrr.holds(sid))
    }

    /// The SIDs held by the RMRR identity domain, sorted.
    pub fn rmrr_devices(&self) -> &[u16] {
        self.rmrr.sids()
    }

    /// The RMRR identity domain, once applied (if the unit has RMRR devices).
    pub fn rmrr_domain(&self) -> Option<&Domain> {
        self.rmrr.domain.as_ref()
    }

    /// The smallest supported second-stage width (39/48/57) covering addresses below `top`.
    fn identity_width(&self, top: u64) -> Result<u32, VtdError> {
        let cap = self.regs().cap;
        let needed = 64 - (top - 1).leading_zeros();
        if needed > cap.mgaw() as u32 {
            return Err(VtdError::AddressWidthUnsupported { requested: needed });
        }
        cap.sagaw()
            .supported_levels()
            .map(|l| Sagaw::address_width(l) as u32)
            .find(|&w| w >= needed)
            .ok_or(VtdError::AddressWidthUnsupported { requested: needed })
    }

    /// An upper bound of the structure pages attaching `plan`'s devices allocates.
    fn reserve_need(&self, plan: &UnitRmrrPlan<'_>) -> usize {
        let devices = plan.devices;
        // Devices are sorted by SID: a new bus (or bus half) starts where the key changes.
        let tables = |key: fn(u16) -> u16| {
            (0..devices.len())
                .filter(|&i| i == 0 || key(devices[i - 1].sid) != key(devices[i].sid))
                .count()
        };
        match self.mode() {
            TranslationMode::Legacy => tables(|sid| sid >> 8),
            TranslationMode::Scalable => tables(|sid| sid >> 7) + 2 * devices.len(),
        }
    }

    fn destroy_quietly<T: VtdMemory>(&mut self, mem: &T, d: Domain) {
        // Nothing is attached to it; a failing flush leaks the domain, which is safe.
        let _ = self.destroy_domain(mem, d);
    }
}

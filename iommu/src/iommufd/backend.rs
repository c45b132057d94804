//! The one [`IommuHw`] skeleton every backend shares (VT-d, SMMUv3, the software model):
//! the device table, the domain table, the attachment record, and the prepare / commit /
//! abort bookkeeping of `hw.rs`. A driver supplies only what differs, through [`DriverOps`]:
//! building and freeing a domain, mapping and unmapping it, the checks of a switch that are
//! its own, and the switch of **one** hardware ID (requester ID, StreamID) of a device.
//!
//! # Devices with several IDs
//!
//! A device may emit DMA under more than one ID (PCI DMA aliases: a conventional-PCI device
//! behind a PCIe-to-PCI bridge shows up with the bridge's requester ID too; some functions
//! issue DMA as function 0). Every alias must translate through the same domain, or the
//! device's DMA is split between two translations. So a device carries [`Ids`], a small
//! fixed list, and every switch is made per ID, in list order:
//!
//! * prepare prepares every ID; if one fails, the IDs prepared before it are aborted in
//!   reverse order and the error returned (nothing changed);
//! * commit commits every ID, even after one reports a hardware fault (the switch has been
//!   made for that ID anyway, so the others must follow), and returns the first fault;
//! * abort aborts every ID; detach blocks every ID and returns the first fault.
//!
//! The attachment record (`(device, PASID) → domain`) stays per device: the object model
//! moves devices, not IDs.
//!
//! # What the hardware says
//!
//! The record drives the protocol (is the device blocked now?), but introspection does not
//! trust it: [`IommuHw::device_domain`] reads every ID's entry back from the hardware's own
//! structures ([`DriverOps::programmed`]) and maps the table root found there to a live
//! domain, so the consistency checker compares the object model with what the IOMMU walks.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::hw::HwInvalidation;
use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwTranslation, IommuHw,
};
use crate::pgtable::{Gather, MapOutput, Prot, RunSource};

/// IDs (the device's own and its DMA aliases) one device can have.
pub const MAX_IDS_PER_DEVICE: usize = 8;

/// A device's hardware IDs: its own first, then its aliases; never empty, no duplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids<I> {
    ids: [I; MAX_IDS_PER_DEVICE],
    len: u8,
}

/// The ID list is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdsFull;

impl<I: Copy + Default + PartialEq> Ids<I> {
    /// A device with one ID.
    pub fn one(id: I) -> Self {
        let mut ids = [I::default(); MAX_IDS_PER_DEVICE];
        ids[0] = id;
        Ids { ids, len: 1 }
    }

    /// Adds an alias (an ID already in the list is accepted and not repeated).
    pub fn push(&mut self, id: I) -> Result<(), IdsFull> {
        if self.as_slice().contains(&id) {
            return Ok(());
        }
        let n = self.len as usize;
        if n >= MAX_IDS_PER_DEVICE {
            return Err(IdsFull);
        }
        self.ids[n] = id;
        self.len += 1;
        Ok(())
    }

    /// The device's own ID.
    pub fn primary(&self) -> I {
        self.ids[0]
    }

    pub fn as_slice(&self) -> &[I] {
        &self.ids[..(self.len as usize).min(MAX_IDS_PER_DEVICE)]
    }
}

/// One device as a backend drives it.
#[derive(Clone, Copy, Debug)]
pub struct BackendDevice<I> {
    pub info: HwDeviceInfo,
    /// Index of the IOMMU unit in front of it (the driver's numbering).
    pub unit: usize,
    /// The IDs its DMA carries.
    pub ids: Ids<I>,
}

/// What one hardware ID (or a PASID of it) translates through, as read back from the
/// hardware's own structures (context / PASID entry, STE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programmed {
    /// DMA is blocked (no entry, entry not present, abort).
    Blocked,
    /// Translated by the page table rooted here.
    Table(u64),
    /// Neither: bypass, pass-through, another stage or format.
    Other,
}

/// One live domain: which unit it was built on, how, and the driver's domain.
pub struct DomainSlot<Dm> {
    pub unit: usize,
    pub cfg: DomainConfig,
    pub domain: Dm,
}

/// What one driver does differently. Every method gets checked arguments: the device exists,
/// the domain exists, and [`DriverOps::check`] (after the generic checks) has passed for a
/// switch.
pub trait DriverOps {
    /// A hardware ID (PCI requester ID, SMMU StreamID).
    type Id: Copy + Default + PartialEq + core::fmt::Debug;
    /// The driver's domain.
    type Domain;
    /// The invalidations of one round on one unit, collected before it runs (fixed
    /// capacity: it lives on the stack of the unmap path).
    type Round: Default;
    /// The driver can switch PASIDs (substreams) separately; when `false` every PASID switch
    /// is [`HwError::Unsupported`] whatever the device record says.
    const PASIDS: bool;
    /// Preparing a switch of a *blocked* device (PASID) already makes it translate through
    /// the new domain (the allocations the switch needs happen in the same driver call), and
    /// aborting it blocks it again; commit then has nothing left to do for it.
    const SWITCHES_BLOCKED_AT_PREPARE: bool;

    /// Builds an empty domain for `dev` (whose record is `rec`), checking what the driver
    /// cannot build for it.
    fn domain_alloc(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<Self::Id>,
        cfg: DomainConfig,
    ) -> Result<Self::Domain, HwError>;
    /// Frees a domain; `in_use` says the object model freed it while a device still uses it
    /// (never, through the object model).
    fn domain_free(&mut self, unit: usize, domain: Self::Domain, in_use: bool);
    fn domain_info(&self, dom: &DomainSlot<Self::Domain>) -> Option<DomainInfo>;
    /// Maps `[iova, iova + len)` to `out`: one physical range ([`IommuHw::map`]) or the runs
    /// of a [`RunSource`] ([`IommuHw::map_runs`]), in one page-table walk either way.
    fn map<O: MapOutput>(
        &self,
        dom: &DomainSlot<Self::Domain>,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), HwError>;
    /// Unmaps into `gather` (range, leaf size, unlinked table pages); invalidates nothing.
    fn unmap(
        &self,
        dom: &DomainSlot<Self::Domain>,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, HwError>;
    /// Adds to `round` (the invalidations of one round on `dom.unit`) what `gather` owes.
    fn plan_flush(&self, dom: &DomainSlot<Self::Domain>, gather: &Gather, round: &mut Self::Round);
    /// Runs one round on `unit`: every invalidation planned, then one completion wait.
    fn run_flush(&self, unit: usize, round: &Self::Round) -> Result<(), HwError>;
    /// After the round covering `gather` completed: retires its table pages.
    fn complete(&self, dom: &DomainSlot<Self::Domain>, gather: &mut Gather);
    fn translate(&self, dom: &DomainSlot<Self::Domain>, iova: u64) -> Option<HwTranslation>;
    fn mapped_bytes(&self, dom: &DomainSlot<Self::Domain>) -> u64;
    /// The table root the hardware's entries hold for `dom` (what [`Self::programmed`]
    /// reports for an ID attached to it).
    fn domain_root(&self, dom: &DomainSlot<Self::Domain>) -> u64;
    /// What `id` (`pasid`) of a device behind `rec.unit` translates through, read from the
    /// hardware's structures (for the consistency checker and tests: a device's state is then
    /// never taken from the skeleton's own record).
    fn programmed(
        &self,
        rec: &BackendDevice<Self::Id>,
        id: Self::Id,
        pasid: Option<u32>,
    ) -> Programmed;

    /// Checks of a switch of `rec` to `dom` of the driver's own, run after the unit check and
    /// before the coherency, dirty-tracking and PASID checks. Allocates nothing.
    fn check(
        &self,
        rec: &BackendDevice<Self::Id>,
        dom: &DomainSlot<Self::Domain>,
    ) -> Result<(), HwError> {
        let _ = (rec, dom);
        Ok(())
    }
    /// The unit can force DMA to snoop (beyond what the device record says).
    fn unit_coherent(&self, unit: usize) -> bool {
        let _ = unit;
        true
    }

    /// Step 1 of a switch, for one ID of `dev`. `blocked`: the device (PASID) has no domain
    /// now.
    #[allow(clippy::too_many_arguments)]
    fn prepare_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<Self::Id>,
        id: Self::Id,
        pasid: Option<u32>,
        d: HwDomain,
        dom: &DomainSlot<Self::Domain>,
        blocked: bool,
    ) -> Result<(), HwError>;
    /// Step 2, for one prepared ID.
    #[allow(clippy::too_many_arguments)]
    fn commit_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<Self::Id>,
        id: Self::Id,
        pasid: Option<u32>,
        d: HwDomain,
        dom: &DomainSlot<Self::Domain>,
        blocked: bool,
    ) -> Result<(), HwError>;
    /// Step 2 on failure, for one prepared ID.
    fn abort_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<Self::Id>,
        id: Self::Id,
        pasid: Option<u32>,
        blocked: bool,
    );
    /// Blocks one ID of an attached device (PASID).
    fn detach_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<Self::Id>,
        id: Self::Id,
        pasid: Option<u32>,
    ) -> Result<(), HwError>;

    fn set_dirty_tracking(
        &mut self,
        dom: &mut DomainSlot<Self::Domain>,
        enable: bool,
    ) -> Result<(), HwError> {
        let _ = (dom, enable);
        Err(HwError::Unsupported)
    }
    fn read_dirty(
        &mut self,
        dom: &mut DomainSlot<Self::Domain>,
        iova: u64,
        len: u64,
        clear: bool,
        report: &mut dyn FnMut(u64, u64),
    ) -> Result<(), HwError> {
        let _ = (dom, iova, len, clear, report);
        Err(HwError::Unsupported)
    }
}

/// A prepared switch of one device (or PASID): every ID of it prepared.
#[derive(Debug)]
pub struct Prepared {
    dev: HwDev,
    pasid: Option<u32>,
    d: HwDomain,
    /// The device was blocked when prepared.
    blocked: bool,
}

/// An [`IommuHw`] over one driver.
pub struct Backend<D: DriverOps> {
    pub(crate) drv: D,
    pub(crate) devices: Vec<BackendDevice<D::Id>>,
    pub(crate) domains: Vec<Option<DomainSlot<D::Domain>>>,
    pub(crate) attached: BTreeMap<(HwDev, Option<u32>), HwDomain>,
    outstanding: u32,
}

impl<D: DriverOps> Backend<D> {
    /// The driver and the devices to offer (device `i` is `HwDev` `i`).
    pub fn with_driver(drv: D, devices: Vec<BackendDevice<D::Id>>) -> Self {
        Backend {
            drv,
            devices,
            domains: Vec::new(),
            attached: BTreeMap::new(),
            outstanding: 0,
        }
    }

    pub fn driver(&self) -> &D {
        &self.drv
    }

    pub fn driver_mut(&mut self) -> &mut D {
        &mut self.drv
    }

    /// The record of device `dev` (its unit and IDs).
    pub fn device(&self, dev: HwDev) -> Option<&BackendDevice<D::Id>> {
        self.devices.get(dev as usize)
    }

    /// The driver's domain behind a handle (for inspection).
    pub fn domain(&self, d: HwDomain) -> Option<&D::Domain> {
        self.slot(d).map(|x| &x.domain)
    }

    /// Every (device, PASID) with a domain.
    pub fn attachments(&self) -> impl Iterator<Item = (HwDev, Option<u32>, HwDomain)> + '_ {
        self.attached.iter().map(|(&(d, p), &x)| (d, p, x))
    }

    pub(crate) fn slot(&self, d: HwDomain) -> Option<&DomainSlot<D::Domain>> {
        self.domains.get(d.0 as usize)?.as_ref()
    }

    fn rec(&self, dev: HwDev) -> Result<BackendDevice<D::Id>, HwError> {
        self.devices
            .get(dev as usize)
            .copied()
            .ok_or(HwError::Invalid)
    }

    /// Every check of a switch of `dev` (`pasid`) to `d` that allocates nothing.
    fn check(
        &self,
        dev: HwDev,
        pasid: Option<u32>,
        d: HwDomain,
    ) -> Result<BackendDevice<D::Id>, HwError> {
        let rec = self.rec(dev)?;
        let dom = self.slot(d).ok_or(HwError::Invalid)?;
        if dom.unit != rec.unit {
            return Err(HwError::Incompatible);
        }
        self.drv.check(&rec, dom)?;
        if dom.cfg.enforce_cc && !(rec.info.enforce_cc && self.drv.unit_coherent(rec.unit)) {
            return Err(HwError::NotCoherent);
        }
        if dom.cfg.dirty_tracking && !rec.info.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if let Some(p) = pasid {
            let bits = rec.info.pasid_bits.min(20);
            if !D::PASIDS || bits == 0 {
                return Err(HwError::Unsupported);
            }
            if p == 0 || p >= 1 << bits {
                return Err(HwError::PasidOutOfRange);
            }
        }
        Ok(rec)
    }
}

impl<D: DriverOps> IommuHw for Backend<D> {
    type Prepared = Prepared;

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    fn device_info(&self, dev: HwDev) -> Option<HwDeviceInfo> {
        self.devices.get(dev as usize).map(|d| d.info)
    }

    fn domain_alloc(&mut self, dev: HwDev, cfg: DomainConfig) -> Result<HwDomain, HwError> {
        let rec = self.rec(dev)?;
        let slot = match self.domains.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.domains.try_reserve(1).map_err(|_| HwError::NoMemory)?;
                self.domains.push(None);
                self.domains.len() - 1
            }
        };
        let domain = self.drv.domain_alloc(dev, &rec, cfg)?;
        self.domains[slot] = Some(DomainSlot {
            unit: rec.unit,
            cfg,
            domain,
        });
        Ok(HwDomain(slot as u32))
    }

    fn domain_free(&mut self, d: HwDomain) {
        let in_use = self.attached.values().any(|&x| x == d);
        if let Some(x) = self.domains.get_mut(d.0 as usize).and_then(Option::take) {
            self.drv.domain_free(x.unit, x.domain, in_use);
        }
    }

    fn domain_info(&self, d: HwDomain) -> Option<DomainInfo> {
        self.drv.domain_info(self.slot(d)?)
    }

    fn compatible(&self, dev: HwDev, d: HwDomain) -> Result<(), HwError> {
        self.check(dev, None, d).map(|_| ())
    }

    fn map(&self, d: HwDomain, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), HwError> {
        let dom = self.slot(d).ok_or(HwError::Invalid)?;
        self.drv.map(dom, iova, pa, len, prot)
    }

    fn map_runs(
        &self,
        d: HwDomain,
        iova: u64,
        len: u64,
        runs: &mut dyn RunSource,
        prot: Prot,
    ) -> Result<(), HwError> {
        let dom = self.slot(d).ok_or(HwError::Invalid)?;
        self.drv.map(dom, iova, runs, len, prot)
    }

    fn unmap(
        &self,
        d: HwDomain,
        iova: u64,
        len: u64,
        inv: &mut HwInvalidation,
    ) -> Result<u64, HwError> {
        let dom = self.slot(d).ok_or(HwError::Invalid)?;
        let end = iova.saturating_add(len);
        let i = match inv.record_index(dom.unit, d, iova, end) {
            Some(i) => i,
            None => {
                // Full, and no record of this domain to merge into: run the rounds now.
                inv.note_early_flush();
                self.flush(inv)?;
                inv.record_index(dom.unit, d, iova, end)
                    .ok_or(HwError::Invalid)?
            }
        };
        self.drv
            .unmap(dom, iova, len, inv.gather_at(i, dom.unit, d))
    }

    /// Unit by unit: plan every record of the unit into one round, run it, then complete (or,
    /// if the round failed, leak) each record's table pages. A record whose domain is gone
    /// (freed before the flush, which the object model never does) is leaked: freeing the
    /// domain invalidated it, but its table pages may belong to a format-specific allocator
    /// only the domain knows.
    fn flush(&self, inv: &mut HwInvalidation) -> Result<(), HwError> {
        let mut first = Ok(());
        while let Some(unit) = inv.next_unit() {
            let mut round = D::Round::default();
            for p in inv.of_unit(unit) {
                if let Some(dom) = self.slot(p.domain) {
                    self.drv.plan_flush(dom, &p.gather, &mut round);
                }
            }
            let r = self.drv.run_flush(unit, &round);
            inv.drain_unit(unit, |mut p| match (r, self.slot(p.domain)) {
                (Ok(()), Some(dom)) if dom.unit == unit => self.drv.complete(dom, &mut p.gather),
                _ => p.gather.leak(),
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn prepare(
        &mut self,
        dev: HwDev,
        pasid: Option<u32>,
        d: HwDomain,
    ) -> Result<Prepared, HwError> {
        let rec = self.check(dev, pasid, d)?;
        let blocked = !self.attached.contains_key(&(dev, pasid));
        let dom = self.domains[d.0 as usize]
            .as_ref()
            .ok_or(HwError::Invalid)?;
        let ids = rec.ids.as_slice();
        for (i, &id) in ids.iter().enumerate() {
            if let Err(e) = self.drv.prepare_id(dev, &rec, id, pasid, d, dom, blocked) {
                for &done in ids[..i].iter().rev() {
                    self.drv.abort_id(dev, &rec, done, pasid, blocked);
                }
                return Err(e);
            }
        }
        if blocked && D::SWITCHES_BLOCKED_AT_PREPARE {
            self.attached.insert((dev, pasid), d);
        }
        self.outstanding += 1;
        Ok(Prepared {
            dev,
            pasid,
            d,
            blocked,
        })
    }

    fn commit(&mut self, p: Prepared) -> Result<(), HwError> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let rec = self.rec(p.dev)?;
        let dom = self
            .domains
            .get(p.d.0 as usize)
            .and_then(Option::as_ref)
            .ok_or(HwError::Invalid)?;
        let mut first = Ok(());
        for &id in rec.ids.as_slice() {
            let r = self
                .drv
                .commit_id(p.dev, &rec, id, p.pasid, p.d, dom, p.blocked);
            if first.is_ok() {
                first = r;
            }
        }
        self.attached.insert((p.dev, p.pasid), p.d);
        first
    }

    fn abort(&mut self, p: Prepared) {
        self.outstanding = self.outstanding.saturating_sub(1);
        let Ok(rec) = self.rec(p.dev) else { return };
        for &id in rec.ids.as_slice().iter().rev() {
            self.drv.abort_id(p.dev, &rec, id, p.pasid, p.blocked);
        }
        if p.blocked && D::SWITCHES_BLOCKED_AT_PREPARE {
            self.attached.remove(&(p.dev, p.pasid));
        }
    }

    fn detach(&mut self, dev: HwDev, pasid: Option<u32>) -> Result<(), HwError> {
        let rec = self.rec(dev)?;
        if self.attached.remove(&(dev, pasid)).is_none() {
            return Ok(());
        }
        let mut first = Ok(());
        for &id in rec.ids.as_slice() {
            let r = self.drv.detach_id(dev, &rec, id, pasid);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn set_dirty_tracking(&mut self, d: HwDomain, enable: bool) -> Result<(), HwError> {
        let dom = self
            .domains
            .get_mut(d.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(HwError::Invalid)?;
        self.drv.set_dirty_tracking(dom, enable)
    }

    fn read_dirty(
        &mut self,
        d: HwDomain,
        iova: u64,
        len: u64,
        clear: bool,
        report: &mut dyn FnMut(u64, u64),
    ) -> Result<(), HwError> {
        let dom = self
            .domains
            .get_mut(d.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(HwError::Invalid)?;
        self.drv.read_dirty(dom, iova, len, clear, report)
    }

    fn translate(&self, d: HwDomain, iova: u64) -> Option<HwTranslation> {
        self.drv.translate(self.slot(d)?, iova)
    }

    fn mapped_bytes(&self, d: HwDomain) -> u64 {
        self.slot(d).map_or(0, |x| self.drv.mapped_bytes(x))
    }

    /// Read back from the hardware: every ID of the device must translate through the same
    /// live domain ([`HwDomain::UNKNOWN`] when an ID's entry points at no live domain, is
    /// not a translation the object model makes, or when the IDs disagree), or all be
    /// blocked (`None`).
    fn device_domain(&self, dev: HwDev, pasid: Option<u32>) -> Option<HwDomain> {
        let rec = self.devices.get(dev as usize)?;
        let mut seen: Option<Option<HwDomain>> = None;
        for &id in rec.ids.as_slice() {
            let now = match self.drv.programmed(rec, id, pasid) {
                Programmed::Blocked => None,
                Programmed::Other => Some(HwDomain::UNKNOWN),
                Programmed::Table(root) => Some(
                    self.domains
                        .iter()
                        .position(|s| s.as_ref().is_some_and(|s| self.drv.domain_root(s) == root))
                        .map_or(HwDomain::UNKNOWN, |i| HwDomain(i as u32)),
                ),
            };
            match seen {
                Some(prev) if prev != now => return Some(HwDomain::UNKNOWN),
                _ => seen = Some(now),
            }
        }
        seen.flatten()
    }

    fn live_domains(&self) -> Option<u32> {
        Some(self.domains.iter().flatten().count() as u32)
    }

    fn outstanding_prepared(&self) -> Option<u32> {
        Some(self.outstanding)
    }
}

//! [`IommuHw`] over the VT-d driver: one or more [`VtdUnit`]s, the devices behind them, and
//! second-stage domains.
//!
//! * `domain_alloc`: a second-stage domain on the device's unit, 48-bit (4 levels) where
//!   CAP.SAGAW allows it, else 39-bit or 57-bit; `enforce_cc` becomes the driver's snoop
//!   control (SNP in every leaf in legacy mode, PGSNP in scalable mode).
//! * Devices can use a domain of their own unit only; a coherent domain needs ECAP.SC.
//! * The attach protocol (see `hw.rs`):
//!   * **prepare** of a device (PASID) that has a domain checks the switch (unit, snoop
//!     control, PASID) and allocates nothing: the driver's `replace` of a second-stage domain is
//!     one 128-bit store of the context (legacy) or PASID (scalable) entry, preceded only by
//!     checks this prepare has made, so **commit** cannot fail except by an invalidation
//!     time-out (reported as [`HwError::Fault`], after the switch);
//!   * **prepare** of a blocked device attaches it right away (the driver's `attach`, which may
//!     need a context table, a PASID directory or PASID table: the allocations happen here,
//!     where failure is allowed); **abort** detaches it again, so an aborted group attach
//!     leaves every member blocked, as before. Between the two the device translates through
//!     the new domain, which its guest asked for; no other guest's memory is reachable.
//!     Commit of such a token has nothing left to do.
//! * Dirty tracking is not offered yet (the driver has no harvest-and-invalidate entry point):
//!   devices report no dirty capability and the dirty operations return `Unsupported`.
//! * Nesting is not offered.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwReserved, HwTranslation,
    IommuHw, MAX_RESERVED_PER_DEVICE, Span,
};
use crate::hw::Mmio;
use crate::pgtable::format::vtd_bits;
use crate::pgtable::{MapError, Prot};
use crate::vtd::domain::Table;
use crate::vtd::regs::LargePages;
use crate::vtd::{Domain, TranslationMode, VtdError, VtdMemory, VtdUnit};

/// One device behind a unit.
#[derive(Clone, Copy, Debug)]
pub struct VtdDevice {
    pub info: HwDeviceInfo,
    /// Index into the backend's units.
    pub unit: usize,
    /// PCI requester ID (bus << 8 | devfn).
    pub sid: u16,
}

/// The x86 interrupt-address window: DMA writes there are interrupt requests.
pub const X86_MSI_WINDOW: Span = Span::new(0xfee0_0000, 0xfeef_ffff);

/// Address width of the domains built on `unit`.
fn domain_width<M: Mmio>(unit: &VtdUnit<M>) -> u32 {
    let sagaw = unit.regs().cap.sagaw();
    if sagaw.supports(4) {
        48
    } else if sagaw.supports(3) {
        39
    } else {
        57
    }
}

/// What the object model should know about a device with requester ID `sid` behind `unit`:
/// coherency enforcement from ECAP.SC, the aperture of the unit's domains (capped by
/// CAP.MGAW), the x86 MSI window reserved, no dirty tracking, `pasid_bits` as the caller found
/// them (0 in legacy mode). Add RMRRs with [`with_reserved`].
pub fn device_info<M: Mmio>(
    unit: &VtdUnit<M>,
    sid: u16,
    group: u32,
    pasid_bits: u8,
) -> HwDeviceInfo {
    let regs = unit.regs();
    let bits = domain_width(unit).min(regs.cap.mgaw() as u32).min(63);
    let mut reserved = [HwReserved::default(); MAX_RESERVED_PER_DEVICE];
    reserved[0] = HwReserved {
        span: X86_MSI_WINDOW,
        kind: hvabi::resv::MSI,
    };
    let pasid_bits = if unit.mode() == TranslationMode::Legacy || !regs.ecap.pasid() {
        0
    } else {
        pasid_bits.min(regs.ecap.pasid_bits().min(15))
    };
    HwDeviceInfo {
        hw_id: sid as u64,
        group,
        pasid_bits,
        enforce_cc: regs.ecap.sc(),
        dirty_tracking: false,
        aperture: Span::new(0, (1u64 << bits) - 1),
        reserved,
        nr_reserved: 1,
    }
}

/// Adds a reserved region (an RMRR) to `info`; `false` when the table is full.
pub fn with_reserved(info: &mut HwDeviceInfo, span: Span, kind: u32) -> bool {
    let n = info.nr_reserved as usize;
    if n >= MAX_RESERVED_PER_DEVICE {
        return false;
    }
    info.reserved[n] = HwReserved { span, kind };
    info.nr_reserved += 1;
    true
}

struct VtdDom {
    unit: usize,
    domain: Domain,
    cfg: DomainConfig,
}

/// A prepared switch.
#[derive(Debug)]
pub struct VtdPrepared {
    dev: HwDev,
    pasid: Option<u32>,
    d: HwDomain,
    /// The device was blocked and prepare attached it.
    attached_now: bool,
}

/// The VT-d backend. `mem` is where the units' structures and every domain's tables live
/// (the hypervisor's IOMMU frame source).
pub struct VtdBackend<'m, M: Mmio, T: VtdMemory> {
    units: Vec<VtdUnit<M>>,
    mem: &'m T,
    devices: Vec<VtdDevice>,
    domains: Vec<Option<VtdDom>>,
    attached: BTreeMap<(HwDev, Option<u32>), HwDomain>,
    outstanding: u32,
}

fn err(e: VtdError) -> HwError {
    match e {
        VtdError::NoMemory | VtdError::DomainIdsExhausted => HwError::NoMemory,
        VtdError::Map(MapError::NoMemory { .. }) => HwError::NoMemory,
        VtdError::SnoopControlUnsupported => HwError::NotCoherent,
        VtdError::DirtyTrackingUnsupported => HwError::NoDirtyTracking,
        VtdError::PasidUnsupported => HwError::Unsupported,
        VtdError::PasidOutOfRange { .. } => HwError::PasidOutOfRange,
        VtdError::Timeout { .. }
        | VtdError::InvalidationQueueError { .. }
        | VtdError::InvalidationRejected { .. } => HwError::Fault,
        VtdError::ForeignDomain | VtdError::BadSid { .. } => HwError::Incompatible,
        _ => HwError::Invalid,
    }
}

impl<'m, M: Mmio, T: VtdMemory> VtdBackend<'m, M, T> {
    /// Units (brought up, translation enabled or not: the caller's choice), the memory their
    /// structures come from, and the devices to offer.
    pub fn new(units: Vec<VtdUnit<M>>, mem: &'m T, devices: Vec<VtdDevice>) -> Self {
        VtdBackend {
            units,
            mem,
            devices,
            domains: Vec::new(),
            attached: BTreeMap::new(),
            outstanding: 0,
        }
    }

    pub fn units(&self) -> &[VtdUnit<M>] {
        &self.units
    }

    pub fn units_mut(&mut self) -> &mut [VtdUnit<M>] {
        &mut self.units
    }

    pub fn mem(&self) -> &'m T {
        self.mem
    }

    /// The driver's domain behind a handle (for inspection).
    pub fn domain(&self, d: HwDomain) -> Option<&Domain> {
        self.dom(d).map(|x| &x.domain)
    }

    fn dom(&self, d: HwDomain) -> Option<&VtdDom> {
        self.domains.get(d.0 as usize)?.as_ref()
    }

    fn dev(&self, dev: HwDev) -> Result<VtdDevice, HwError> {
        self.devices
            .get(dev as usize)
            .copied()
            .ok_or(HwError::Invalid)
    }

    fn check(&self, dev: HwDev, pasid: Option<u32>, d: HwDomain) -> Result<VtdDevice, HwError> {
        let vd = self.dev(dev)?;
        let dom = self.dom(d).ok_or(HwError::Invalid)?;
        if dom.unit != vd.unit {
            return Err(HwError::Incompatible);
        }
        let unit = self.units.get(vd.unit).ok_or(HwError::Invalid)?;
        if dom.cfg.enforce_cc && !(vd.info.enforce_cc && unit.regs().ecap.sc()) {
            return Err(HwError::NotCoherent);
        }
        if dom.cfg.dirty_tracking && !vd.info.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if let Some(p) = pasid {
            let bits = vd.info.pasid_bits.min(20);
            if bits == 0 {
                return Err(HwError::Unsupported);
            }
            if p == 0 || p >= 1 << bits {
                return Err(HwError::PasidOutOfRange);
            }
        }
        Ok(vd)
    }
}

impl<M: Mmio, T: VtdMemory> IommuHw for VtdBackend<'_, M, T> {
    type Prepared = VtdPrepared;

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    fn device_info(&self, dev: HwDev) -> Option<HwDeviceInfo> {
        self.devices.get(dev as usize).map(|d| d.info)
    }

    fn domain_alloc(&mut self, dev: HwDev, cfg: DomainConfig) -> Result<HwDomain, HwError> {
        let vd = self.dev(dev)?;
        if cfg.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if cfg.enforce_cc && !vd.info.enforce_cc {
            return Err(HwError::NotCoherent);
        }
        let unit = self.units.get_mut(vd.unit).ok_or(HwError::Invalid)?;
        let mut dc = crate::vtd::DomainConfig::second_stage(domain_width(unit));
        dc.enforce_cache_coherency = cfg.enforce_cc;
        let slot = match self.domains.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.domains.try_reserve(1).map_err(|_| HwError::NoMemory)?;
                self.domains.push(None);
                self.domains.len() - 1
            }
        };
        let domain = unit.create_domain(self.mem, dc).map_err(err)?;
        self.domains[slot] = Some(VtdDom {
            unit: vd.unit,
            domain,
            cfg,
        });
        Ok(HwDomain(slot as u32))
    }

    fn domain_free(&mut self, d: HwDomain) {
        let Some(x) = self.domains.get_mut(d.0 as usize).and_then(Option::take) else {
            return;
        };
        if let Some(unit) = self.units.get_mut(x.unit) {
            // Busy (still attached) cannot happen through the object model; the driver then
            // leaks the table rather than free it under a device.
            let _ = unit.destroy_domain(self.mem, x.domain);
        }
    }

    fn domain_info(&self, d: HwDomain) -> Option<DomainInfo> {
        let x = self.dom(d)?;
        let bits = x.domain.input_bits().min(63);
        let sllps = self.units.get(x.unit)?.regs().cap.sllps();
        let mut sizes = 1 << 12;
        if sllps.contains(LargePages::SIZE_2M) {
            sizes |= 1 << 21;
        }
        if sllps.contains(LargePages::SIZE_1G) {
            sizes |= 1 << 30;
        }
        Some(DomainInfo {
            aperture: Span::new(0, (1u64 << bits) - 1),
            page_sizes: sizes,
        })
    }

    fn compatible(&self, dev: HwDev, d: HwDomain) -> Result<(), HwError> {
        self.check(dev, None, d).map(|_| ())
    }

    fn map(
        &mut self,
        d: HwDomain,
        iova: u64,
        pa: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), HwError> {
        let x = self.dom(d).ok_or(HwError::Invalid)?;
        let unit = self.units.get(x.unit).ok_or(HwError::Invalid)?;
        unit.map(self.mem, &x.domain, iova, pa, len, prot)
            .map_err(err)
    }

    fn unmap(&mut self, d: HwDomain, iova: u64, len: u64) -> Result<u64, HwError> {
        let x = self.dom(d).ok_or(HwError::Invalid)?;
        let unit = self.units.get(x.unit).ok_or(HwError::Invalid)?;
        unit.unmap(self.mem, &x.domain, iova, len).map_err(err)
    }

    fn prepare(
        &mut self,
        dev: HwDev,
        pasid: Option<u32>,
        d: HwDomain,
    ) -> Result<VtdPrepared, HwError> {
        let vd = self.check(dev, pasid, d)?;
        let attached_now = !self.attached.contains_key(&(dev, pasid));
        if attached_now {
            let x = self.domains[d.0 as usize]
                .as_ref()
                .ok_or(HwError::Invalid)?;
            let unit = self.units.get_mut(vd.unit).ok_or(HwError::Invalid)?;
            match unit.attach(self.mem, vd.sid, pasid, &x.domain) {
                Ok(()) => {}
                // The entry was written; only the invalidation after it failed.
                Err(e) if err(e) == HwError::Fault => {}
                Err(e) => return Err(err(e)),
            }
            self.attached.insert((dev, pasid), d);
        }
        self.outstanding += 1;
        Ok(VtdPrepared {
            dev,
            pasid,
            d,
            attached_now,
        })
    }

    fn commit(&mut self, p: VtdPrepared) -> Result<(), HwError> {
        self.outstanding = self.outstanding.saturating_sub(1);
        if p.attached_now {
            return Ok(());
        }
        let vd = self.dev(p.dev)?;
        let x = self.domains[p.d.0 as usize]
            .as_ref()
            .ok_or(HwError::Invalid)?;
        let unit = self.units.get_mut(vd.unit).ok_or(HwError::Invalid)?;
        let r = unit.replace(self.mem, vd.sid, p.pasid, &x.domain);
        self.attached.insert((p.dev, p.pasid), p.d);
        r.map_err(|_| HwError::Fault)
    }

    fn abort(&mut self, p: VtdPrepared) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if p.attached_now {
            let _ = self.detach(p.dev, p.pasid);
        }
    }

    fn detach(&mut self, dev: HwDev, pasid: Option<u32>) -> Result<(), HwError> {
        let vd = self.dev(dev)?;
        if self.attached.remove(&(dev, pasid)).is_none() {
            return Ok(());
        }
        let unit = self.units.get_mut(vd.unit).ok_or(HwError::Invalid)?;
        match unit.detach(self.mem, vd.sid, pasid) {
            Ok(()) | Err(VtdError::NotAttached) => Ok(()),
            Err(_) => Err(HwError::Fault),
        }
    }

    fn translate(&self, d: HwDomain, iova: u64) -> Option<HwTranslation> {
        let x = self.dom(d)?;
        let t = x.domain.table.as_ref()?.translate(self.mem, iova)?;
        let snoop = if x.domain.snoops_leaves() || !x.domain.enforce_cache_coherency() {
            Some(t.pte & vtd_bits::SNP != 0)
        } else {
            // Scalable mode: PGSNP in the PASID entry, not in the leaves.
            None
        };
        Some(HwTranslation {
            pa: t.pa,
            leaf: Span::new(t.leaf.start, t.leaf.end - 1),
            read: t.pte & vtd_bits::R != 0,
            write: t.pte & vtd_bits::W != 0,
            snoop,
        })
    }

    fn mapped_bytes(&self, d: HwDomain) -> u64 {
        let Some(table) = self.dom(d).and_then(|x| x.domain.table.as_ref()) else {
            return 0;
        };
        let m = self.mem;
        match table {
            Table::Ss3(t) => t.census(m).mapped,
            Table::Ss4(t) => t.census(m).mapped,
            Table::Ss5(t) => t.census(m).mapped,
            Table::Fs4(t) => t.census(m).mapped,
            Table::Fs5(t) => t.census(m).mapped,
        }
    }

    fn device_domain(&self, dev: HwDev, pasid: Option<u32>) -> Option<HwDomain> {
        self.attached.get(&(dev, pasid)).copied()
    }

    fn live_domains(&self) -> Option<u32> {
        Some(self.domains.iter().flatten().count() as u32)
    }

    fn outstanding_prepared(&self) -> Option<u32> {
        Some(self.outstanding)
    }
}

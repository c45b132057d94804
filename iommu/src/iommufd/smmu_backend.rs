//! [`IommuHw`] over the SMMUv3 driver: one or more [`SmmuUnit`]s, the streams (devices) behind
//! them, and stage-2 domains.
//!
//! * A device is (unit index, StreamID). A domain is a stage-2 domain (IPA → PA: the guest's
//!   IOVA → host PA; stage 2 is what a hypervisor owns) on the device's unit, with an input size
//!   of min(48, IDR5.OAS) bits and 4 KiB granule tables (4 KiB, 2 MiB and 1 GiB leaves).
//! * Devices can use a domain of their own unit only. A coherent domain (`enforce_cc`) needs a
//!   unit driven as coherent (IDR0.COHACC, or the firmware's override in `UnitConfig`): its
//!   table walks and the attributes programmed in the STE are then cacheable, and the device
//!   reports `enforce_cc`. The leaves carry no per-leaf snoop bit ([`HwTranslation::snoop`] is
//!   `None`).
//! * `nest_parent` domains are plain stage-2 domains (the driver can hang nested stage-1
//!   domains off any of them); refused as [`HwError::Unsupported`] on an SMMU without both
//!   stages. Nesting itself is not offered through this trait yet.
//! * Dirty tracking is not offered (it needs IDR0.HTTU with DBM and a harvest path in the
//!   driver): devices report no dirty capability, `dirty_tracking` domains are refused.
//! * PASIDs (substreams) are not offered: the driver builds one-CD tables and QEMU has
//!   IDR1.SSIDSIZE = 0. Devices report `pasid_bits` 0 and a PASID switch is
//!   [`HwError::Unsupported`].
//! * The attach protocol (see `hw.rs`):
//!   * **prepare** checks the switch (unit, StreamID range, coherency, dirty tracking, PASID)
//!     and touches no STE a device uses. The one thing it may allocate is the level-2 stream
//!     table of a StreamID never used before (a 2-level stream table creates them on first use):
//!     it is created here, where failure is allowed, with every STE in it abort. Such a stream
//!     was blocked before (C_BAD_STREAMID) and stays blocked (abort); abort keeps the table,
//!     as the driver does (level-2 tables are never freed).
//!   * **commit** is the driver's `attach`: one ordered STE update. Hitless from abort (a first
//!     attach). A REPLACE between two stage-2 domains changes S2VMID and S2TTB (two words), so
//!     the driver breaks through abort: for one CMD_SYNC round trip the stream's DMA is
//!     terminated (without an event), never translated through a torn or foreign entry.
//!     Commit can fail only by a command-queue time-out or error ([`HwError::Fault`], the STE
//!     written anyway).
//!   * **abort** forgets the token. **detach** is the driver's `set_abort` (DMA blocked).
//! * Reserved regions: none architecturally. An SMMUv3 system routes MSIs as DMA writes to the
//!   interrupt controller's doorbell (GICv3 ITS GITS_TRANSLATER), which goes through stage 2
//!   like any write; a platform that lets assigned devices raise MSIs reserves the doorbell's
//!   window with [`with_reserved`] (QEMU virt: [`QEMU_VIRT_ITS_WINDOW`]).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwReserved, HwTranslation,
    IommuHw, MAX_RESERVED_PER_DEVICE, Span,
};
use crate::hw::Mmio;
use crate::pgtable::format::arm_bits;
use crate::pgtable::{MapError, Prot, TableMemory};
use crate::smmuv3::domain::Kind;
use crate::smmuv3::{Domain, SmmuError, SmmuUnit};

pub use super::vtd_backend::with_reserved;

/// One stream behind a unit.
#[derive(Clone, Copy, Debug)]
pub struct SmmuDevice {
    pub info: HwDeviceInfo,
    /// Index into the backend's units.
    pub unit: usize,
    /// The device's StreamID.
    pub sid: u32,
}

/// The GICv3 ITS of QEMU's `virt` machine (64 KiB control frame, then the 64 KiB frame of
/// GITS_TRANSLATER, the MSI doorbell at 0x0809_0040).
pub const QEMU_VIRT_ITS_WINDOW: Span = Span::new(0x0808_0000, 0x0809_ffff);

/// Input (IPA) bits of the stage-2 domains built on `unit`: 48 with the 4 KiB granule, capped
/// by IDR5.OAS (a stage-2 input may not exceed the output size).
fn domain_width<M: Mmio, E: crate::pgtable::sync::PteAtomic>(unit: &SmmuUnit<'_, M, E>) -> u32 {
    (unit.regs().idr5.oas_bits() as u32).min(48)
}

/// What the object model should know about the stream `sid` behind `unit`: coherency
/// enforcement when the unit is driven as coherent (IDR0.COHACC unless firmware overrode it),
/// the aperture of the unit's stage-2 domains, no reserved region (add the MSI doorbell window
/// with [`with_reserved`] where the platform needs one), no dirty tracking, and no PASIDs:
/// `pasid_bits` is accepted for the shape of `vtd_backend::device_info` but the backend has no
/// substream support, so the device reports 0.
pub fn device_info<M: Mmio, E: crate::pgtable::sync::PteAtomic>(
    unit: &SmmuUnit<'_, M, E>,
    sid: u32,
    group: u32,
    pasid_bits: u8,
) -> HwDeviceInfo {
    let _ = pasid_bits;
    let bits = domain_width(unit);
    HwDeviceInfo {
        hw_id: sid as u64,
        group,
        pasid_bits: 0,
        enforce_cc: unit.coherent(),
        dirty_tracking: false,
        aperture: Span::new(0, (1u64 << bits) - 1),
        reserved: [HwReserved::default(); MAX_RESERVED_PER_DEVICE],
        nr_reserved: 0,
    }
}

struct SmmuDom {
    unit: usize,
    domain: Domain,
    cfg: DomainConfig,
}

/// A prepared switch.
#[derive(Debug)]
pub struct SmmuPrepared {
    dev: HwDev,
    d: HwDomain,
}

/// The SMMUv3 backend. `mem` is where the units' structures and every domain's tables live
/// (the hypervisor's IOMMU frame source, the one the units were brought up with).
pub struct SmmuBackend<'m, M: Mmio, T: TableMemory + Sync>
where
    T::Entry: 'static,
{
    units: Vec<SmmuUnit<'m, M, T::Entry>>,
    mem: &'m T,
    devices: Vec<SmmuDevice>,
    domains: Vec<Option<SmmuDom>>,
    attached: BTreeMap<HwDev, HwDomain>,
    outstanding: u32,
}

fn err(e: SmmuError) -> HwError {
    match e {
        SmmuError::NoMemory
        | SmmuError::VmidExhausted
        | SmmuError::AsidExhausted
        | SmmuError::Map(MapError::NoMemory { .. }) => HwError::NoMemory,
        SmmuError::Timeout { .. } | SmmuError::CommandError { .. } => HwError::Fault,
        SmmuError::ForeignDomain | SmmuError::StreamIdOutOfRange => HwError::Incompatible,
        SmmuError::StageUnsupported | SmmuError::Unsupported { .. } => HwError::Unsupported,
        _ => HwError::Invalid,
    }
}

impl<'m, M: Mmio, T: TableMemory + Sync> SmmuBackend<'m, M, T>
where
    T::Entry: 'static,
{
    /// Units (brought up with `mem`), the memory their structures come from, and the devices
    /// to offer. Touches no STE: a device starts as the unit left it (abort after bring-up).
    pub fn new(
        units: Vec<SmmuUnit<'m, M, T::Entry>>,
        mem: &'m T,
        devices: Vec<SmmuDevice>,
    ) -> Self {
        SmmuBackend {
            units,
            mem,
            devices,
            domains: Vec::new(),
            attached: BTreeMap::new(),
            outstanding: 0,
        }
    }

    pub fn units(&self) -> &[SmmuUnit<'m, M, T::Entry>] {
        &self.units
    }

    pub fn units_mut(&mut self) -> &mut [SmmuUnit<'m, M, T::Entry>] {
        &mut self.units
    }

    pub fn mem(&self) -> &'m T {
        self.mem
    }

    /// The driver's domain behind a handle (for inspection).
    pub fn domain(&self, d: HwDomain) -> Option<&Domain> {
        self.dom(d).map(|x| &x.domain)
    }

    fn dom(&self, d: HwDomain) -> Option<&SmmuDom> {
        self.domains.get(d.0 as usize)?.as_ref()
    }

    fn dev(&self, dev: HwDev) -> Result<SmmuDevice, HwError> {
        self.devices
            .get(dev as usize)
            .copied()
            .ok_or(HwError::Invalid)
    }

    fn check(&self, dev: HwDev, pasid: Option<u32>, d: HwDomain) -> Result<SmmuDevice, HwError> {
        let sd = self.dev(dev)?;
        let dom = self.dom(d).ok_or(HwError::Invalid)?;
        if dom.unit != sd.unit {
            return Err(HwError::Incompatible);
        }
        let unit = self.units.get(sd.unit).ok_or(HwError::Invalid)?;
        if (sd.sid as u64) >> unit.stream_id_bits() != 0 {
            return Err(HwError::Incompatible);
        }
        if dom.cfg.enforce_cc && !(sd.info.enforce_cc && unit.coherent()) {
            return Err(HwError::NotCoherent);
        }
        if dom.cfg.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if pasid.is_some() {
            return Err(HwError::Unsupported);
        }
        Ok(sd)
    }
}

impl<M: Mmio, T: TableMemory + Sync> IommuHw for SmmuBackend<'_, M, T>
where
    T::Entry: 'static,
{
    type Prepared = SmmuPrepared;

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    fn device_info(&self, dev: HwDev) -> Option<HwDeviceInfo> {
        self.devices.get(dev as usize).map(|d| d.info)
    }

    fn domain_alloc(&mut self, dev: HwDev, cfg: DomainConfig) -> Result<HwDomain, HwError> {
        let sd = self.dev(dev)?;
        if cfg.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        let unit = self.units.get_mut(sd.unit).ok_or(HwError::Invalid)?;
        if cfg.enforce_cc && !(sd.info.enforce_cc && unit.coherent()) {
            return Err(HwError::NotCoherent);
        }
        if cfg.nest_parent && !(unit.regs().idr0.s1p() && unit.regs().idr0.s2p()) {
            return Err(HwError::Unsupported);
        }
        let slot = match self.domains.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.domains.try_reserve(1).map_err(|_| HwError::NoMemory)?;
                self.domains.push(None);
                self.domains.len() - 1
            }
        };
        let dc = crate::smmuv3::DomainConfig::stage2(domain_width(unit));
        let domain = unit.create_domain(self.mem, dc).map_err(err)?;
        self.domains[slot] = Some(SmmuDom {
            unit: sd.unit,
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
            // leaks the tables rather than free them under a stream.
            let _ = unit.destroy_domain(self.mem, x.domain);
        }
    }

    fn domain_info(&self, d: HwDomain) -> Option<DomainInfo> {
        let x = self.dom(d)?;
        let bits = x.domain.input_bits().min(63);
        Some(DomainInfo {
            aperture: Span::new(0, (1u64 << bits) - 1),
            page_sizes: 1 << 12 | 1 << 21 | 1 << 30,
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
    ) -> Result<SmmuPrepared, HwError> {
        let sd = self.check(dev, pasid, d)?;
        let unit = self.units.get_mut(sd.unit).ok_or(HwError::Invalid)?;
        if unit.ste(self.mem, sd.sid).is_none() {
            // First use of a StreamID whose level-2 table does not exist: create it (abort
            // STEs), so that commit allocates nothing. The stream stays blocked.
            unit.set_abort(self.mem, sd.sid).map_err(err)?;
        }
        self.outstanding += 1;
        Ok(SmmuPrepared { dev, d })
    }

    fn commit(&mut self, p: SmmuPrepared) -> Result<(), HwError> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let sd = self.dev(p.dev)?;
        let x = self.domains[p.d.0 as usize]
            .as_ref()
            .ok_or(HwError::Invalid)?;
        let unit = self.units.get_mut(sd.unit).ok_or(HwError::Invalid)?;
        let r = unit.attach(self.mem, sd.sid, &x.domain);
        self.attached.insert(p.dev, p.d);
        r.map_err(|_| HwError::Fault)
    }

    fn abort(&mut self, p: SmmuPrepared) {
        let _ = p;
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    fn detach(&mut self, dev: HwDev, pasid: Option<u32>) -> Result<(), HwError> {
        let sd = self.dev(dev)?;
        if pasid.is_some() || self.attached.remove(&dev).is_none() {
            return Ok(());
        }
        let unit = self.units.get_mut(sd.unit).ok_or(HwError::Invalid)?;
        unit.set_abort(self.mem, sd.sid).map_err(|_| HwError::Fault)
    }

    fn translate(&self, d: HwDomain, iova: u64) -> Option<HwTranslation> {
        let x = self.dom(d)?;
        let t = x.domain.translate(self.mem, iova)?;
        Some(HwTranslation {
            pa: t.pa,
            leaf: Span::new(t.leaf.start, t.leaf.end - 1),
            read: t.pte & arm_bits::S2AP_R != 0,
            write: t.pte & arm_bits::S2AP_W != 0,
            snoop: None,
        })
    }

    fn mapped_bytes(&self, d: HwDomain) -> u64 {
        match self.dom(d).map(|x| &x.domain.kind) {
            Some(Kind::S2 { table, .. }) => table.census(self.mem).mapped,
            _ => 0,
        }
    }

    fn device_domain(&self, dev: HwDev, pasid: Option<u32>) -> Option<HwDomain> {
        match pasid {
            None => self.attached.get(&dev).copied(),
            Some(_) => None,
        }
    }

    fn live_domains(&self) -> Option<u32> {
        Some(self.domains.iter().flatten().count() as u32)
    }

    fn outstanding_prepared(&self) -> Option<u32> {
        Some(self.outstanding)
    }
}

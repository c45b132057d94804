//! [`IommuHw`](super::hw::IommuHw) over the VT-d driver: one or more [`VtdUnit`]s, the
//! devices behind them, and second-stage domains.
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
//! * A device is a unit and its requester IDs: a [`VtdDevice`] has one; a
//!   [`BackendDevice`] lists DMA aliases too, and every switch programs the context (or PASID)
//!   entry of each, in the skeleton's order (`backend.rs`).
//! * Dirty tracking is not offered yet (the driver has no harvest-and-invalidate entry point):
//!   devices report no dirty capability and the dirty operations return `Unsupported`.
//! * Nesting is not offered.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use core::sync::atomic::Ordering::Relaxed;

use super::backend::{Backend, BackendDevice, DomainSlot, DriverOps, Ids, Programmed};
use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwReserved, HwTranslation,
    MAX_RESERVED_PER_DEVICE, Span,
};
use crate::hw::Mmio;
use crate::pgtable::format::vtd_bits;
use crate::pgtable::{Gather, MapError, MapOutput, Prot};
use crate::vtd::domain::Table;
use crate::vtd::regs::LargePages;
use crate::vtd::tables::{
    ContextEntry, PasidEntry, Pgtt, RootEntry, ScalableContextEntry, TranslationType,
};
use crate::vtd::{Domain, InvalidationRound, TranslationMode, VtdError, VtdMemory, VtdUnit};

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

/// The VT-d driver under the [`Backend`] skeleton: the units and the memory their
/// structures and every domain's tables come from (the hypervisor's IOMMU frame source).
pub struct VtdOps<'m, M: Mmio, T: VtdMemory> {
    units: Vec<VtdUnit<M>>,
    mem: &'m T,
    /// (device, requester ID, PASID) of DMA aliases a prepare found already on the target
    /// domain: devices of one IOMMU group share aliases (a PCIe-to-PCI bridge's ID), and the
    /// first member to attach put them there. Such an ID belongs to that member's attachment,
    /// so aborting this prepare must not block it.
    shared: BTreeSet<(HwDev, u16, u32)>,
}

/// The VT-d backend.
pub type VtdBackend<'m, M, T> = Backend<VtdOps<'m, M, T>>;

impl From<VtdDevice> for BackendDevice<u16> {
    fn from(d: VtdDevice) -> Self {
        BackendDevice {
            info: d.info,
            unit: d.unit,
            ids: Ids::one(d.sid),
        }
    }
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

impl<'m, M: Mmio, T: VtdMemory> Backend<VtdOps<'m, M, T>> {
    /// Units (brought up, translation enabled or not: the caller's choice), the memory their
    /// structures come from, and the devices to offer (a [`VtdDevice`] or, for a device with
    /// DMA aliases, a [`BackendDevice`] listing every requester ID).
    pub fn new<X: Into<BackendDevice<u16>>>(
        units: Vec<VtdUnit<M>>,
        mem: &'m T,
        devices: Vec<X>,
    ) -> Self {
        let devices = devices.into_iter().map(Into::into).collect();
        Backend::with_driver(
            VtdOps {
                units,
                mem,
                shared: BTreeSet::new(),
            },
            devices,
        )
    }

    pub fn units(&self) -> &[VtdUnit<M>] {
        &self.drv.units
    }

    pub fn units_mut(&mut self) -> &mut [VtdUnit<M>] {
        &mut self.drv.units
    }

    pub fn mem(&self) -> &'m T {
        self.drv.mem
    }
}

impl<M: Mmio, T: VtdMemory> VtdOps<'_, M, T> {
    fn unit(&self, i: usize) -> Result<&VtdUnit<M>, HwError> {
        self.units.get(i).ok_or(HwError::Invalid)
    }

    fn unit_mut(&mut self, i: usize) -> Result<&mut VtdUnit<M>, HwError> {
        self.units.get_mut(i).ok_or(HwError::Invalid)
    }
}

impl<M: Mmio, T: VtdMemory> DriverOps for VtdOps<'_, M, T> {
    type Id = u16;
    type Domain = Domain;
    type Round = InvalidationRound;
    const PASIDS: bool = true;
    // The driver's `attach` of a blocked requester ID allocates (context table, PASID
    // directory and table) and writes the entry in one call.
    const SWITCHES_BLOCKED_AT_PREPARE: bool = true;

    fn domain_alloc(
        &mut self,
        _dev: HwDev,
        rec: &BackendDevice<u16>,
        cfg: DomainConfig,
    ) -> Result<Domain, HwError> {
        if cfg.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if cfg.enforce_cc && !rec.info.enforce_cc {
            return Err(HwError::NotCoherent);
        }
        let mem = self.mem;
        let unit = self.unit_mut(rec.unit)?;
        let mut dc = crate::vtd::DomainConfig::second_stage(domain_width(unit));
        dc.enforce_cache_coherency = cfg.enforce_cc;
        unit.create_domain(mem, dc).map_err(err)
    }

    fn domain_free(&mut self, unit: usize, domain: Domain, _in_use: bool) {
        let mem = self.mem;
        if let Some(unit) = self.units.get_mut(unit) {
            // Busy (still attached) cannot happen through the object model; the driver then
            // leaks the table rather than free it under a device.
            let _ = unit.destroy_domain(mem, domain);
        }
    }

    fn domain_info(&self, x: &DomainSlot<Domain>) -> Option<DomainInfo> {
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

    fn map<O: MapOutput>(
        &self,
        x: &DomainSlot<Domain>,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), HwError> {
        self.unit(x.unit)?
            .map_to(self.mem, &x.domain, iova, out, len, prot)
            .map_err(err)
    }

    fn unmap(
        &self,
        x: &DomainSlot<Domain>,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, HwError> {
        self.unit(x.unit)?
            .unmap_deferred(self.mem, &x.domain, iova, len, gather)
            .map_err(err)
    }

    fn plan_flush(&self, x: &DomainSlot<Domain>, gather: &Gather, round: &mut InvalidationRound) {
        if let Ok(unit) = self.unit(x.unit) {
            unit.plan_invalidation(&x.domain, gather, round);
        }
    }

    /// One batch of descriptors and one wait on the unit's queue (VT-d 4.1 §6.5.2.8);
    /// register-based, one command per planned invalidation.
    fn run_flush(&self, unit: usize, round: &InvalidationRound) -> Result<(), HwError> {
        self.unit(unit)?.flush_round(self.mem, round).map_err(err)
    }

    fn complete(&self, _: &DomainSlot<Domain>, gather: &mut Gather) {
        gather.complete(self.mem);
    }

    fn translate(&self, x: &DomainSlot<Domain>, iova: u64) -> Option<HwTranslation> {
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

    fn mapped_bytes(&self, x: &DomainSlot<Domain>) -> u64 {
        let Some(table) = x.domain.table.as_ref() else {
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

    fn domain_root(&self, x: &DomainSlot<Domain>) -> u64 {
        x.domain.root()
    }

    /// From RTADDR_REG (TTM selects the format): legacy root → context entry (VT-d 4.1
    /// §9.1, §9.3); scalable root → scalable context entry → PASID directory → PASID-table
    /// entry at `pasid` or the context entry's RID_PASID (§9.2, §9.4-§9.6).
    fn programmed(&self, rec: &BackendDevice<u16>, sid: u16, pasid: Option<u32>) -> Programmed {
        let Some(unit) = self.units.get(rec.unit) else {
            return Programmed::Other;
        };
        let word = |pa: u64| -> u64 {
            self.mem
                .table(pa & !0xfff, 512)
                .get(((pa & 0xfff) / 8) as usize)
                .map_or(0, |w| w.load(Relaxed))
        };
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        let rtaddr = unit.mmio().read64(crate::vtd::regs::offset::RTADDR);
        let root = rtaddr & ADDR;
        let (bus, devfn) = ((sid >> 8) as u64, (sid & 0xff) as u64);
        let re = RootEntry {
            lo: word(root + bus * 16),
            hi: word(root + bus * 16 + 8),
        };
        match (rtaddr >> 10) & 3 {
            0 => {
                if pasid.is_some() || !re.present() {
                    return Programmed::Blocked;
                }
                let at = re.context_table() + devfn * 16;
                let ce = ContextEntry {
                    lo: word(at),
                    hi: word(at + 8),
                };
                if !ce.present() {
                    Programmed::Blocked
                } else if ce.translation_type() == TranslationType::PassThrough {
                    Programmed::Other
                } else {
                    Programmed::Table(ce.slptptr())
                }
            }
            1 => {
                let table = if devfn < 128 { re.lower() } else { re.upper() };
                let Some(table) = table else {
                    return Programmed::Blocked;
                };
                let at = table + (devfn & 0x7f) * 32;
                let ce = ScalableContextEntry {
                    q: core::array::from_fn(|i| word(at + 8 * i as u64)),
                };
                if !ce.present() {
                    return Programmed::Blocked;
                }
                let p = pasid.unwrap_or(ce.rid_pasid()) as u64;
                if (p >> 6) as usize >= ce.pasid_dir_entries() {
                    return Programmed::Blocked;
                }
                // PASID-directory entry (§9.5): bit 0 P, bits 63:12 the PASID table.
                let de = word(ce.pasid_dir() + (p >> 6) * 8);
                if de & 1 == 0 {
                    return Programmed::Blocked;
                }
                let at = (de & ADDR) + (p & 0x3f) * 64;
                let pe = PasidEntry {
                    q: core::array::from_fn(|i| word(at + 8 * i as u64)),
                };
                match (pe.present(), pe.pgtt()) {
                    (false, _) => Programmed::Blocked,
                    (true, Some(Pgtt::SecondStage)) => Programmed::Table(pe.ssptptr()),
                    (true, _) => Programmed::Other,
                }
            }
            _ => Programmed::Other,
        }
    }

    fn unit_coherent(&self, unit: usize) -> bool {
        self.units.get(unit).is_some_and(|u| u.regs().ecap.sc())
    }

    fn prepare_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<u16>,
        sid: u16,
        pasid: Option<u32>,
        _d: HwDomain,
        x: &DomainSlot<Domain>,
        blocked: bool,
    ) -> Result<(), HwError> {
        if !blocked {
            // A replace is one 128-bit store preceded by the checks already made.
            return Ok(());
        }
        let mem = self.mem;
        let unit = self.unit_mut(rec.unit)?;
        if sid != rec.ids.primary()
            && unit.domain_id_of(mem, sid, pasid).ok().flatten() == Some(x.domain.did())
        {
            // A DMA alias a group peer already attached to this domain.
            self.shared.insert((dev, sid, pasid.unwrap_or(0)));
            return Ok(());
        }
        match unit.attach(mem, sid, pasid, &x.domain) {
            // The entry was written; only the invalidation after it failed.
            Ok(()) => Ok(()),
            Err(e) if err(e) == HwError::Fault => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    fn commit_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<u16>,
        sid: u16,
        pasid: Option<u32>,
        _d: HwDomain,
        x: &DomainSlot<Domain>,
        blocked: bool,
    ) -> Result<(), HwError> {
        if blocked {
            self.shared.remove(&(dev, sid, pasid.unwrap_or(0)));
            return Ok(());
        }
        let mem = self.mem;
        self.unit_mut(rec.unit)?
            .replace(mem, sid, pasid, &x.domain)
            .map_err(|_| HwError::Fault)
    }

    fn abort_id(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<u16>,
        sid: u16,
        pasid: Option<u32>,
        blocked: bool,
    ) {
        if blocked && !self.shared.remove(&(dev, sid, pasid.unwrap_or(0))) {
            let _ = self.detach_id(dev, rec, sid, pasid);
        }
    }

    fn detach_id(
        &mut self,
        _dev: HwDev,
        rec: &BackendDevice<u16>,
        sid: u16,
        pasid: Option<u32>,
    ) -> Result<(), HwError> {
        let mem = self.mem;
        match self.unit_mut(rec.unit)?.detach(mem, sid, pasid) {
            Ok(()) | Err(VtdError::NotAttached) => Ok(()),
            Err(_) => Err(HwError::Fault),
        }
    }
}

#[cfg(test)]
mod alias_tests {
    //! Two conventional devices behind one PCIe-to-PCI bridge (one IOMMU group) share the
    //! bridge's IDs: the second member's attach finds them on the group's domain, and aborting
    //! it leaves them there. Checked on the VT-d register and memory model with hand-written
    //! root/context entry layouts (VT-d 4.1 §9.1, §9.3).

    use alloc::vec;

    use super::super::backend::{BackendDevice, Ids};
    use super::super::hw::{DomainConfig, IommuHw};
    use super::{VtdBackend, device_info};
    use crate::vtd::fake::{FakeMem, FakeVtd};
    use crate::vtd::{TranslationMode, UnitConfig, VtdUnit};

    /// QEMU 10 q35 intel-iommu CAP and legacy ECAP.
    const CAP: u64 = 0x00d2_008c_222f_0606;
    const ECAP: u64 = 0xf0_0f4a;

    /// The DID of `sid`'s present context entry, read from the tables the unit latched.
    fn context_did(mem: &FakeMem, hw: &FakeVtd<'_>, sid: u16) -> Option<u16> {
        let rt = hw.s.borrow().latched_rtaddr.unwrap() & !0xfff;
        let root_lo = mem.read(rt + u64::from(sid >> 8) * 16);
        if root_lo & 1 == 0 {
            return None;
        }
        let ce = (root_lo & !0xfff) + u64::from(sid & 0xff) * 16;
        let (lo, hi) = (mem.read(ce), mem.read(ce + 8));
        (lo & 1 == 1).then_some(((hi >> 8) & 0xffff) as u16)
    }

    fn ids(list: &[u16]) -> Ids<u16> {
        let mut ids = Ids::one(list[0]);
        for &id in &list[1..] {
            ids.push(id).unwrap();
        }
        ids
    }

    #[test]
    fn group_peers_share_bridge_aliases() {
        let mem = FakeMem::new(64);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let unit = VtdUnit::new(
            &hw,
            &mem,
            UnitConfig {
                poll_budget: 1000,
                ..UnitConfig::new(TranslationMode::Legacy)
            },
        )
        .unwrap();
        let a = BackendDevice {
            info: device_info(&unit, 0x0108, 7, 0),
            unit: 0,
            ids: ids(&[0x0108, 0x0100, 0x00f0]),
        };
        let b = BackendDevice {
            info: device_info(&unit, 0x0110, 7, 0),
            unit: 0,
            ids: ids(&[0x0110, 0x0100, 0x00f0]),
        };
        let mut be = VtdBackend::new(vec![unit], &mem, vec![a, b]);
        let d = be.domain_alloc(0, DomainConfig::default()).unwrap();
        let p = be.prepare(0, None, d).unwrap();
        be.commit(p).unwrap();
        let did = context_did(&mem, &hw, 0x0108).expect("own ID attached");
        for sid in [0x0100, 0x00f0] {
            assert_eq!(context_did(&mem, &hw, sid), Some(did), "alias {sid:#x}");
        }
        // The peer: its shared aliases are already on the domain; an aborted attach must not
        // take them away from the first member.
        let p = be.prepare(1, None, d).unwrap();
        be.abort(p);
        assert_eq!(context_did(&mem, &hw, 0x0110), None);
        for sid in [0x0108, 0x0100, 0x00f0] {
            assert_eq!(context_did(&mem, &hw, sid), Some(did), "{sid:#x} kept");
        }
        let p = be.prepare(1, None, d).unwrap();
        be.commit(p).unwrap();
        for sid in [0x0108, 0x0110, 0x0100, 0x00f0] {
            assert_eq!(context_did(&mem, &hw, sid), Some(did), "{sid:#x}");
        }
        assert_eq!(be.device_domain(1, None), Some(d));
        // Detaching the group: every ID blocked.
        be.detach(0, None).unwrap();
        be.detach(1, None).unwrap();
        for sid in [0x0108, 0x0110, 0x0100, 0x00f0] {
            assert_eq!(context_did(&mem, &hw, sid), None, "{sid:#x}");
        }
    }

    /// The same pair through the object model (docs/abi.md §6.2): the first attach moves the
    /// whole group (both devices' IDs), the other member attaching elsewhere is EXDEV, joining
    /// is fine, a REPLACE moves every ID of both devices at once, and detaching the last member
    /// blocks them all.
    #[test]
    fn group_sharing_aliases_through_the_object_model() {
        use hvabi::errno;

        use super::super::check::check;
        use super::super::client::Client;
        use super::super::sim::VecGuestMemory;
        use super::super::tests::{PG, SCRATCH};
        use super::super::{Iommufd, Limits};

        let mem: &'static FakeMem =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(FakeMem::new(256)));
        let hw: &'static FakeVtd<'static> =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(FakeVtd::new(mem, CAP, ECAP)));
        let mut unit = VtdUnit::new(
            hw,
            mem,
            UnitConfig {
                poll_budget: 1000,
                ..UnitConfig::new(TranslationMode::Legacy)
            },
        )
        .unwrap();
        unit.enable_translation().unwrap();
        let devices = vec![
            BackendDevice {
                info: device_info(&unit, 0x0108, 7, 0),
                unit: 0,
                ids: ids(&[0x0108, 0x0100, 0x00f0]),
            },
            BackendDevice {
                info: device_info(&unit, 0x0110, 7, 0),
                unit: 0,
                ids: ids(&[0x0110, 0x0100, 0x00f0]),
            },
        ];
        let mut fd =
            Iommufd::new(VtdBackend::new(vec![unit], mem, devices), Limits::default()).unwrap();
        let g = fd.create_guest().unwrap();
        let a = fd.assign_device(g, 0).unwrap();
        let b = fd.assign_device(g, 1).unwrap();
        let gm = VecGuestMemory::standard();
        let all = [0x0108, 0x0110, 0x0100, 0x00f0];
        let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        let ioas2 = c.ioas_alloc().unwrap();
        c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
        c.map_fixed(ioas2, 0x10_0000, 8 * PG, PG).unwrap();
        c.attach(a, ioas).unwrap();
        let first = context_did(mem, hw, 0x0108).expect("attached");
        for sid in all {
            assert_eq!(
                context_did(mem, hw, sid),
                Some(first),
                "{sid:#x}: the group moved"
            );
        }
        assert_eq!(c.attach(b, ioas2), Err(errno::EXDEV));
        c.attach(b, ioas).unwrap();
        c.replace(a, ioas2).unwrap();
        let second = context_did(mem, hw, 0x0108).expect("attached");
        assert_ne!(second, first);
        for sid in all {
            assert_eq!(
                context_did(mem, hw, sid),
                Some(second),
                "{sid:#x}: replaced"
            );
        }
        c.detach(a).unwrap();
        assert_eq!(
            context_did(mem, hw, 0x0110),
            Some(second),
            "b still attached"
        );
        c.detach(b).unwrap();
        for sid in all {
            assert_eq!(context_did(mem, hw, sid), None, "{sid:#x}: blocked");
        }
        check(&fd, &[(g, &gm)]).unwrap();
        fd.destroy_guest(g).unwrap();
    }
}

#[cfg(test)]
mod batch_tests {
    //! One IOAS_UNMAP (or IOAS_UNMAP_BATCH) ends in one invalidation round per VT-d unit,
    //! checked on the queue the register model consumed: descriptors decoded by hand from the
    //! VT-d 4.1 §6.5.2 layouts (type in bits 3:0; IOTLB invalidate: G 5:4, DID 31:16, high
    //! qword AM 5:0, IH 6, ADDR 63:12; wait: type 5, status write SW bit 5).

    use alloc::vec;
    use alloc::vec::Vec;

    use super::super::client::Client;
    use super::super::hw::{HwInvalidation, IommuHw};
    use super::super::sim::VecGuestMemory;
    use super::super::tests::SCRATCH;
    use super::super::{GuestId, Iommufd, Limits};
    use super::{VtdBackend, VtdDevice, device_info};
    use crate::pgtable::{Gather, Prot};
    use crate::vtd::fake::{FakeMem, FakeVtd, Processed};
    use crate::vtd::{DomainConfig, TranslationMode, UnitConfig, VtdUnit};

    /// QEMU 10 q35 intel-iommu CAP (PSI, MAMV 18) and legacy ECAP (QI).
    const CAP: u64 = 0x00d2_008c_222f_0606;
    const ECAP: u64 = 0xf0_0f4a;
    const PG: u64 = 0x1000;

    type Be<'a> = VtdBackend<'a, &'a FakeVtd<'a>, FakeMem>;

    fn unit<'a>(hw: &'a FakeVtd<'a>, mem: &'a FakeMem) -> VtdUnit<&'a FakeVtd<'a>> {
        let mut u = VtdUnit::new(
            hw,
            mem,
            UnitConfig {
                poll_budget: 1000,
                ..UnitConfig::new(TranslationMode::Legacy)
            },
        )
        .unwrap();
        u.enable_translation().unwrap();
        u
    }

    /// An object model over `units`; device `i` is requester ID `sids[i].0` behind unit
    /// `sids[i].1`, each in a group of its own.
    fn fd<'a>(
        units: Vec<VtdUnit<&'a FakeVtd<'a>>>,
        mem: &'a FakeMem,
        sids: &[(u16, usize)],
    ) -> (Iommufd<Be<'a>>, GuestId, Vec<u32>) {
        let devices: Vec<_> = sids
            .iter()
            .enumerate()
            .map(|(i, &(sid, u))| VtdDevice {
                info: device_info(&units[u], sid, i as u32 + 1, 0),
                unit: u,
                sid,
            })
            .collect();
        let mut fd = Iommufd::new(VtdBackend::new(units, mem, devices), Limits::default()).unwrap();
        let g = fd.create_guest().unwrap();
        let ids = (0..sids.len() as u32)
            .map(|d| fd.assign_device(g, d).unwrap())
            .collect();
        (fd, g, ids)
    }

    /// The DID of `sid`'s present context entry, read from the root table the unit latched
    /// (VT-d 4.1 §9.1, §9.3: root entry P bit 0, CTP 63:12; context entry P bit 0, DID
    /// 87:72).
    fn context_did(mem: &FakeMem, hw: &FakeVtd<'_>, sid: u16) -> u16 {
        let rt = hw.s.borrow().latched_rtaddr.unwrap() & !0xfff;
        let root_lo = mem.read(rt + u64::from(sid >> 8) * 16);
        assert_eq!(root_lo & 1, 1, "root entry present");
        let ce = (root_lo & !0xfff) + u64::from(sid & 0xff) * 16;
        assert_eq!(mem.read(ce) & 1, 1, "context entry present");
        ((mem.read(ce + 8) >> 8) & 0xffff) as u16
    }

    /// An IOTLB invalidate descriptor, decoded.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Iotlb {
        Global,
        Domain(u16),
        /// DID, first byte, bytes covered.
        Pages(u16, u64, u64),
    }

    /// The round(s) in `p`: (IOTLB descriptors per round, in order). Every descriptor must be
    /// an IOTLB invalidation or a wait with status write; a round ends at its wait.
    fn rounds(p: &[Processed]) -> Vec<Vec<Iotlb>> {
        let mut out = vec![];
        let mut cur = vec![];
        for d in p {
            match d.lo & 0xf {
                2 => cur.push(match (d.lo >> 4) & 3 {
                    1 => Iotlb::Global,
                    2 => Iotlb::Domain((d.lo >> 16) as u16),
                    3 => {
                        let am = d.hi & 0x3f;
                        let addr = d.hi & !0xfff;
                        assert_eq!(addr % (PG << am), 0, "ADDR aligned to 2^AM pages");
                        Iotlb::Pages((d.lo >> 16) as u16, addr, PG << am)
                    }
                    g => panic!("IOTLB granularity {g}"),
                }),
                5 => {
                    assert_ne!(d.lo & 1 << 5, 0, "wait with status write");
                    out.push(core::mem::take(&mut cur));
                }
                k => panic!("unexpected descriptor type {k} ({d:x?})"),
            }
        }
        assert!(cur.is_empty(), "descriptors after the last wait");
        out
    }

    /// Whether `round` invalidates `[start, start + len)` of domain `did`.
    fn covers(round: &[Iotlb], did: u16, start: u64, len: u64) -> bool {
        round.iter().any(|i| match *i {
            Iotlb::Global => true,
            Iotlb::Domain(d) => d == did,
            Iotlb::Pages(d, a, n) => d == did && a <= start && start + len <= a + n,
        })
    }

    /// Three adjacent areas and one apart, in an IOAS with two HWPTs (two domains, two DIDs)
    /// on one unit: one IOAS_UNMAP of all of them is one round: the page-selective
    /// invalidations of both domains, then a single wait.
    #[test]
    fn one_unmap_of_several_areas_and_two_domains_is_one_round() {
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let (mut fd, g, ids) = fd(vec![unit(&hw, &mem)], &mem, &[(0x08, 0), (0x10, 0)]);
        let gm = VecGuestMemory::standard();
        let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        let h0 = c.hwpt_alloc(ids[0], ioas, 0).unwrap();
        let h1 = c.hwpt_alloc(ids[1], ioas, 0).unwrap();
        c.attach(ids[0], h0).unwrap();
        c.attach(ids[1], h1).unwrap();
        let areas = [
            (0x10_0000, 4 * PG),
            (0x10_4000, 2 * PG),
            (0x10_6000, PG),
            (0x30_0000, 8 * PG),
        ];
        for (i, &(iova, len)) in areas.iter().enumerate() {
            c.map_fixed(ioas, iova, 0x80_0000 + i as u64 * 0x10_0000, len)
                .unwrap();
        }
        let dids = [context_did(&mem, &hw, 0x08), context_did(&mem, &hw, 0x10)];
        assert_ne!(dids[0], dids[1]);
        hw.take_processed();
        // Before batching this was 8 rounds (4 areas x 2 domains).
        assert_eq!(c.unmap(ioas, 0x10_0000, 0x20_8000).unwrap(), 15 * PG);
        let r = rounds(&hw.take_processed());
        assert_eq!(r.len(), 1, "one wait descriptor: {r:x?}");
        for did in dids {
            for &(iova, len) in &areas {
                assert!(covers(&r[0], did, iova, len), "{did} {iova:#x}: {r:x?}");
            }
            // Page-selective, not domain-wide: the adjacent areas merged into one range, the
            // far one kept apart.
            assert!(!r[0].contains(&Iotlb::Domain(did)) && !r[0].contains(&Iotlb::Global));
        }
        assert_eq!(r[0].len(), 4, "two ranges per domain: {r:x?}");
        // The unmap is real: nothing translates any more.
        for &(iova, _) in &areas {
            let d = fd.hwpt_domain(g, h0).unwrap();
            assert!(fd.hw().translate(d, iova).is_none());
        }
    }

    /// One IOAS over two units (a HWPT on each): one round on each unit's queue, naming only
    /// that unit's domain.
    #[test]
    fn two_units_one_round_each() {
        let mem = FakeMem::new(256);
        let hw0 = FakeVtd::new(&mem, CAP, ECAP);
        let hw1 = FakeVtd::new(&mem, CAP, ECAP);
        let units = vec![unit(&hw0, &mem), unit(&hw1, &mem)];
        let (mut fd, g, ids) = fd(units, &mem, &[(0x08, 0), (0x08, 1)]);
        let gm = VecGuestMemory::standard();
        let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        for &dev in &ids {
            let h = c.hwpt_alloc(dev, ioas, 0).unwrap();
            c.attach(dev, h).unwrap();
        }
        for i in 0..3u64 {
            c.map_fixed(ioas, 0x10_0000 + i * 0x1_0000, 0x80_0000, PG)
                .unwrap();
        }
        let did0 = context_did(&mem, &hw0, 0x08);
        let did1 = context_did(&mem, &hw1, 0x08);
        hw0.take_processed();
        hw1.take_processed();
        assert_eq!(c.unmap(ioas, 0, u64::MAX).unwrap(), 3 * PG);
        for (hw, did) in [(&hw0, did0), (&hw1, did1)] {
            let r = rounds(&hw.take_processed());
            assert_eq!(r.len(), 1, "{r:x?}");
            for i in 0..3u64 {
                assert!(covers(&r[0], did, 0x10_0000 + i * 0x1_0000, PG));
            }
            assert!(
                r[0].iter()
                    .all(|i| matches!(*i, Iotlb::Pages(d, ..) if d == did))
            );
        }
    }

    /// IOAS_UNMAP_BATCH of more disjoint ranges than a batch records separately: still one
    /// round; ranges merged (never more than `MAX_PENDING_RANGES` descriptors) and every
    /// entry covered. Entries of one call share the batch whatever their order.
    #[test]
    fn unmap_batch_of_many_ranges_is_one_round() {
        use hvabi::UnmapEntry;
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let (mut fd, g, ids) = fd(vec![unit(&hw, &mem)], &mem, &[(0x08, 0)]);
        let gm = VecGuestMemory::standard();
        let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        let h = c.hwpt_alloc(ids[0], ioas, 0).unwrap();
        c.attach(ids[0], h).unwrap();
        // 24 pages 64 KiB apart, unmapped in a scrambled order.
        let iova = |i: u64| 0x100_0000 + ((i * 7) % 24) * 0x1_0000;
        for i in 0..24 {
            c.map_fixed(ioas, iova(i), 0x80_0000, PG).unwrap();
        }
        let did = context_did(&mem, &hw, 0x08);
        hw.take_processed();
        let entries: Vec<_> = (0..24)
            .map(|i| UnmapEntry {
                iova: iova(i),
                length: PG,
            })
            .collect();
        let (err, done, out) = c.unmap_batch(ioas, 0, &entries);
        assert_eq!((err, done), (0, 24));
        assert!(out.iter().all(|e| e.length == PG));
        let r = rounds(&hw.take_processed());
        assert_eq!(r.len(), 1, "{r:x?}");
        assert!(r[0].len() <= super::super::hw::MAX_PENDING_RANGES);
        for i in 0..24 {
            assert!(covers(&r[0], did, iova(i), PG), "{:#x}: {r:x?}", iova(i));
        }
    }

    /// A driver-level round with more page-selective invalidations than it holds degrades to
    /// one global IOTLB invalidation, still closed by one wait.
    #[test]
    fn full_round_degrades_to_a_global_invalidation() {
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let mut u = unit(&hw, &mem);
        let d = u
            .create_domain(&mem, DomainConfig::second_stage(48))
            .unwrap();
        let n = crate::vtd::InvalidationRound::IOTLB_CAPACITY as u64 + 1;
        // One page in each of n different 1 GiB regions: n distinct page-selective ops.
        for i in 0..n {
            u.map(&mem, &d, i << 30, 0x8000_0000, PG, Prot::READ)
                .unwrap();
        }
        let mut gathers: Vec<Gather> = (0..n).map(|_| Gather::new()).collect();
        for (i, g) in gathers.iter_mut().enumerate() {
            assert_eq!(u.unmap_deferred(&mem, &d, (i as u64) << 30, PG, g), Ok(PG));
        }
        hw.take_processed();
        let mut batch: Vec<_> = gathers.iter_mut().map(|g| (&d, g)).collect();
        u.flush_batch(&mem, &mut batch).unwrap();
        assert_eq!(rounds(&hw.take_processed()), [[Iotlb::Global]]);
        // At capacity it is still page-selective.
        for i in 0..n - 1 {
            u.map(&mem, &d, i << 30, 0x8000_0000, PG, Prot::READ)
                .unwrap();
        }
        let mut gathers: Vec<Gather> = (0..n - 1).map(|_| Gather::new()).collect();
        for (i, g) in gathers.iter_mut().enumerate() {
            u.unmap_deferred(&mem, &d, (i as u64) << 30, PG, g).unwrap();
        }
        let mut batch: Vec<_> = gathers.iter_mut().map(|g| (&d, g)).collect();
        u.flush_batch(&mem, &mut batch).unwrap();
        let r = rounds(&hw.take_processed());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].len() as u64, n - 1);
        for i in 0..n - 1 {
            assert!(covers(&r[0], d.did(), i << 30, PG));
        }
        u.destroy_domain(&mem, d).unwrap();
    }

    /// A round that fails (the queue is stuck: the wait never completes) leaks the table pages
    /// the unmap unlinked: neither freed nor retired, so never reused. The same unmap with a
    /// working queue retires them.
    #[test]
    fn failed_round_leaks_table_pages() {
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let (mut fd, g, ids) = fd(vec![unit(&hw, &mem)], &mem, &[(0x08, 0)]);
        let gm = VecGuestMemory::standard();
        let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        let h = c.hwpt_alloc(ids[0], ioas, 0).unwrap();
        c.attach(ids[0], h).unwrap();
        // IOVA 2 MiB-aligned, GPA not: 512 4 KiB leaves filling one leaf table, which the
        // unmap of the 2 MiB unlinks.
        const M2: u64 = 0x20_0000;
        for base in [M2, 4 * M2] {
            c.map_fixed(ioas, base, 0x1000, M2).unwrap();
        }
        let (retires, frees, live) = (mem.retires.get(), mem.frees.get(), mem.live_frames());
        hw.s.borrow_mut().stall = true;
        assert_eq!(c.unmap(ioas, M2, M2), Err(hvabi::errno::EIO));
        assert_eq!((mem.retires.get(), mem.frees.get()), (retires, frees));
        assert_eq!(
            mem.live_frames(),
            live,
            "the unlinked table stays allocated"
        );
        hw.unstall();
        // The area is gone from the IOAS (EIO after the fact) and from the table.
        assert_eq!(c.unmap(ioas, M2, M2), Err(hvabi::errno::ENOENT));
        assert_eq!(c.unmap(ioas, 4 * M2, M2), Ok(M2));
        assert!(
            mem.retires.get() > retires,
            "a completed round retires the table"
        );
        assert_eq!(mem.frees.get(), frees);
    }

    /// IOAS_UNMAP_BATCH whose one round fails: EIO at the last entry, every entry's mapping gone
    /// (`out_done` counts them all), and the unlinked table leaked.
    #[test]
    fn failed_round_of_an_unmap_batch_is_eio_at_the_last_entry() {
        use hvabi::UnmapEntry;
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let (mut fd, g, ids) = fd(vec![unit(&hw, &mem)], &mem, &[(0x08, 0)]);
        let gm = VecGuestMemory::standard();
        let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        c.attach(ids[0], ioas).unwrap();
        const M2: u64 = 0x20_0000;
        let entries = [M2, 4 * M2, 8 * M2].map(|iova| UnmapEntry { iova, length: M2 });
        for e in &entries {
            c.map_fixed(ioas, e.iova, 0x1000, M2).unwrap();
        }
        let (retires, frees) = (mem.retires.get(), mem.frees.get());
        hw.take_processed();
        hw.s.borrow_mut().stall = true;
        let (err, done, _) = c.unmap_batch(ioas, 0, &entries);
        hw.unstall();
        assert_eq!((err, done), (hvabi::errno::EIO, 3));
        let le = c.last_error();
        assert_eq!((le.out_errno, le.out_index), (hvabi::errno::EIO, 2));
        assert_eq!((mem.retires.get(), mem.frees.get()), (retires, frees));
        // Nothing left mapped in the IOAS.
        assert_eq!(c.unmap(ioas, 0, u64::MAX), Ok(0));
    }

    /// More distinct domains than a batch has records (never through the object model, which
    /// has at most 8 HWPTs per IOAS): the documented degrade is one early round, so
    /// ceil(domains / `MAX_PENDING_RANGES`) rounds in all, each covering its domains.
    #[test]
    fn more_domains_than_records_flush_early() {
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let u = unit(&hw, &mem);
        let dev = VtdDevice {
            info: device_info(&u, 0x08, 1, 0),
            unit: 0,
            sid: 0x08,
        };
        let mut be = VtdBackend::new(vec![u], &mem, vec![dev]);
        let n = super::super::hw::MAX_PENDING_RANGES + 1;
        let doms: Vec<_> = (0..n)
            .map(|_| be.domain_alloc(0, Default::default()).unwrap())
            .collect();
        for &d in &doms {
            be.map(d, 0x10_0000, 0x8000_0000, PG, Prot::READ).unwrap();
        }
        hw.take_processed();
        let mut inv = HwInvalidation::new();
        for &d in &doms {
            assert_eq!(be.unmap(d, 0x10_0000, PG, &mut inv), Ok(PG));
        }
        assert_eq!(inv.early_flushes(), 1);
        be.flush(&mut inv).unwrap();
        let r = rounds(&hw.take_processed());
        assert_eq!(r.len(), 2, "{r:x?}");
        assert_eq!((r[0].len(), r[1].len()), (n - 1, 1));
        for (i, &d) in doms.iter().enumerate() {
            let did = be.domain(d).unwrap().did();
            assert!(covers(&r[usize::from(i == n - 1)], did, 0x10_0000, PG));
        }
        for d in doms {
            be.domain_free(d);
        }
    }

    /// The skeleton's record rule: adjacent ranges of a domain share a record, disjoint ones
    /// get their own until the batch is full, then merge into the nearest one.
    #[test]
    fn records_merge_when_full() {
        let mem = FakeMem::new(256);
        let hw = FakeVtd::new(&mem, CAP, ECAP);
        let u = unit(&hw, &mem);
        let dev = VtdDevice {
            info: device_info(&u, 0x08, 1, 0),
            unit: 0,
            sid: 0x08,
        };
        let mut be = VtdBackend::new(vec![u], &mem, vec![dev]);
        let d = be.domain_alloc(0, Default::default()).unwrap();
        let n = super::super::hw::MAX_PENDING_RANGES as u64 + 4;
        for i in 0..n {
            be.map(d, i << 24, 0x8000_0000, 2 * PG, Prot::READ).unwrap();
        }
        let mut inv = HwInvalidation::new();
        for i in 0..n {
            assert_eq!(be.unmap(d, i << 24, PG, &mut inv), Ok(PG));
            assert_eq!(be.unmap(d, (i << 24) + PG, PG, &mut inv), Ok(PG));
        }
        assert_eq!(inv.len(), super::super::hw::MAX_PENDING_RANGES);
        assert_eq!(inv.early_flushes(), 0);
        hw.take_processed();
        be.flush(&mut inv).unwrap();
        assert!(inv.is_empty());
        let r = rounds(&hw.take_processed());
        assert_eq!(r.len(), 1);
        let did = be.domain(d).unwrap().did();
        for i in 0..n {
            assert!(covers(&r[0], did, i << 24, 2 * PG), "{i}: {r:x?}");
        }
        be.domain_free(d);
    }
}

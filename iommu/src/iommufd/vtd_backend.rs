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
use crate::pgtable::{MapError, Prot};
use crate::vtd::domain::Table;
use crate::vtd::regs::LargePages;
use crate::vtd::tables::{
    ContextEntry, PasidEntry, Pgtt, RootEntry, ScalableContextEntry, TranslationType,
};
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

    fn map(
        &self,
        x: &DomainSlot<Domain>,
        iova: u64,
        pa: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), HwError> {
        self.unit(x.unit)?
            .map(self.mem, &x.domain, iova, pa, len, prot)
            .map_err(err)
    }

    fn unmap(&self, x: &DomainSlot<Domain>, iova: u64, len: u64) -> Result<u64, HwError> {
        self.unit(x.unit)?
            .unmap(self.mem, &x.domain, iova, len)
            .map_err(err)
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

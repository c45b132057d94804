//! [`IommuHw`](super::hw::IommuHw) over the SMMUv3 driver: one or more [`SmmuUnit`]s, the
//! streams (devices) behind them, and stage-2 domains.
//!
//! * A device is (unit index, StreamIDs): a [`SmmuDevice`] has one; a [`BackendDevice`] lists
//!   every StreamID the device's DMA may carry, and every switch writes the STE of each. A
//!   domain is a stage-2 domain (IPA → PA: the guest's IOVA → host PA; stage 2 is what a
//!   hypervisor owns) on the device's unit, with an input size of min(48, IDR5.OAS) bits and
//!   4 KiB granule tables (4 KiB, 2 MiB and 1 GiB leaves).
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

use alloc::vec::Vec;

use super::backend::{Backend, BackendDevice, DomainSlot, DriverOps, Ids, Programmed};
use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwReserved, HwTranslation,
    MAX_RESERVED_PER_DEVICE, Span,
};
use crate::hw::Mmio;
use crate::pgtable::format::arm_bits;
use crate::pgtable::{Gather, MapError, MapOutput, Prot, TableMemory};
use crate::smmuv3::domain::Kind;
use crate::smmuv3::ste::StreamConfig;
use crate::smmuv3::{Domain, InvalidationRound, SmmuError, SmmuUnit};

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

/// The SMMUv3 driver under the [`Backend`] skeleton: the units (brought up with `mem`) and the
/// memory their structures and every domain's tables come from (the hypervisor's IOMMU frame
/// source).
pub struct SmmuOps<'m, M: Mmio, T: TableMemory + Sync>
where
    T::Entry: 'static,
{
    units: Vec<SmmuUnit<'m, M, T::Entry>>,
    mem: &'m T,
    /// The MSI doorbell every domain maps (IOVA page, physical page): see
    /// [`Backend::set_msi_doorbell`].
    msi_doorbell: Option<(u64, u64)>,
}

/// The SMMUv3 backend.
pub type SmmuBackend<'m, M, T> = Backend<SmmuOps<'m, M, T>>;

impl From<SmmuDevice> for BackendDevice<u32> {
    fn from(d: SmmuDevice) -> Self {
        BackendDevice {
            info: d.info,
            unit: d.unit,
            ids: Ids::one(d.sid),
        }
    }
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

impl<'m, M: Mmio, T: TableMemory + Sync> Backend<SmmuOps<'m, M, T>>
where
    T::Entry: 'static,
{
    /// Units (brought up with `mem`), the memory their structures come from, and the devices
    /// to offer (a [`SmmuDevice`] or, for a device with several StreamIDs, a
    /// [`BackendDevice`] listing them). Touches no STE: a device starts as the unit left it
    /// (abort after bring-up).
    pub fn new<X: Into<BackendDevice<u32>>>(
        units: Vec<SmmuUnit<'m, M, T::Entry>>,
        mem: &'m T,
        devices: Vec<X>,
    ) -> Self {
        let devices = devices.into_iter().map(Into::into).collect();
        Backend::with_driver(
            SmmuOps {
                units,
                mem,
                msi_doorbell: None,
            },
            devices,
        )
    }

    /// Every domain created from now on maps the 4 KiB page `pa` (the GICv3 ITS's
    /// GITS_TRANSLATER page) at `iova`, write-only, Device memory, for its whole life, so the
    /// devices attached to it can raise their MSIs (a write to the doorbell, translated like
    /// any DMA). `iova` must lie in a window every device reserves (`RESV_MSI`: no IOAS can map
    /// it), so the page never collides with an IOAS mapping; it is not counted as IOAS bytes
    /// (`mapped_bytes`). Which EventIDs a device may raise is the ITS's business (its ITT).
    pub fn set_msi_doorbell(&mut self, iova: u64, pa: u64) {
        self.drv.msi_doorbell = Some((iova & !0xfff, pa & !0xfff));
    }

    pub fn units(&self) -> &[SmmuUnit<'m, M, T::Entry>] {
        &self.drv.units
    }

    pub fn units_mut(&mut self) -> &mut [SmmuUnit<'m, M, T::Entry>] {
        &mut self.drv.units
    }

    pub fn mem(&self) -> &'m T {
        self.drv.mem
    }
}

impl<'m, M: Mmio, T: TableMemory + Sync> SmmuOps<'m, M, T>
where
    T::Entry: 'static,
{
    fn unit(&self, i: usize) -> Result<&SmmuUnit<'m, M, T::Entry>, HwError> {
        self.units.get(i).ok_or(HwError::Invalid)
    }

    fn unit_mut(&mut self, i: usize) -> Result<&mut SmmuUnit<'m, M, T::Entry>, HwError> {
        self.units.get_mut(i).ok_or(HwError::Invalid)
    }
}

impl<M: Mmio, T: TableMemory + Sync> DriverOps for SmmuOps<'_, M, T>
where
    T::Entry: 'static,
{
    type Id = u32;
    type Domain = Domain;
    type Round = InvalidationRound;
    // One-CD tables: no substreams.
    const PASIDS: bool = false;
    const SWITCHES_BLOCKED_AT_PREPARE: bool = false;

    fn domain_alloc(
        &mut self,
        _dev: HwDev,
        rec: &BackendDevice<u32>,
        cfg: DomainConfig,
    ) -> Result<Domain, HwError> {
        if cfg.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        let mem = self.mem;
        let unit = self.unit_mut(rec.unit)?;
        if cfg.enforce_cc && !(rec.info.enforce_cc && unit.coherent()) {
            return Err(HwError::NotCoherent);
        }
        if cfg.nest_parent && !(unit.regs().idr0.s1p() && unit.regs().idr0.s2p()) {
            return Err(HwError::Unsupported);
        }
        let dc = crate::smmuv3::DomainConfig::stage2(domain_width(unit));
        let domain = unit.create_domain(mem, dc).map_err(err)?;
        if let Some((iova, pa)) = self.msi_doorbell {
            let unit = self.unit_mut(rec.unit)?;
            if let Err(e) = unit.map(mem, &domain, iova, pa, 0x1000, Prot::WRITE | Prot::DEVICE) {
                let _ = unit.destroy_domain(mem, domain);
                return Err(err(e));
            }
        }
        Ok(domain)
    }

    fn domain_free(&mut self, unit: usize, domain: Domain, _in_use: bool) {
        let mem = self.mem;
        if let Some(unit) = self.units.get_mut(unit) {
            // Busy (still attached) cannot happen through the object model; the driver then
            // leaks the tables rather than free them under a stream.
            let _ = unit.destroy_domain(mem, domain);
        }
    }

    fn domain_info(&self, x: &DomainSlot<Domain>) -> Option<DomainInfo> {
        let bits = x.domain.input_bits().min(63);
        Some(DomainInfo {
            aperture: Span::new(0, (1u64 << bits) - 1),
            page_sizes: 1 << 12 | 1 << 21 | 1 << 30,
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

    /// Every TLBI command, then one CMD_SYNC (SMMUv3 §4.7).
    fn run_flush(&self, unit: usize, round: &InvalidationRound) -> Result<(), HwError> {
        self.unit(unit)?.flush_round(self.mem, round).map_err(err)
    }

    fn complete(&self, x: &DomainSlot<Domain>, gather: &mut Gather) {
        if let Ok(unit) = self.unit(x.unit) {
            unit.complete(self.mem, &x.domain, gather);
        } else {
            gather.leak();
        }
    }

    fn translate(&self, x: &DomainSlot<Domain>, iova: u64) -> Option<HwTranslation> {
        let t = x.domain.translate(self.mem, iova)?;
        Some(HwTranslation {
            pa: t.pa,
            leaf: Span::new(t.leaf.start, t.leaf.end - 1),
            read: t.pte & arm_bits::S2AP_R != 0,
            write: t.pte & arm_bits::S2AP_W != 0,
            snoop: None,
        })
    }

    fn mapped_bytes(&self, x: &DomainSlot<Domain>) -> u64 {
        let mapped = match &x.domain.kind {
            Kind::S2 { table, .. } => table.census(self.mem).mapped,
            _ => 0,
        };
        // The MSI doorbell page is the backend's, not the IOAS's.
        let doorbell = self
            .msi_doorbell
            .filter(|&(iova, _)| self.translate(x, iova).is_some())
            .map_or(0, |_| 0x1000);
        mapped - doorbell
    }

    fn domain_root(&self, x: &DomainSlot<Domain>) -> u64 {
        x.domain.root()
    }

    /// The STE in the stream table (SMMUv3 §5.2): V and Config, and S2TTB for stage 2.
    fn programmed(&self, rec: &BackendDevice<u32>, sid: u32, pasid: Option<u32>) -> Programmed {
        let Some(unit) = self.units.get(rec.unit) else {
            return Programmed::Other;
        };
        if pasid.is_some() {
            return Programmed::Blocked;
        }
        match unit.ste(self.mem, sid) {
            None => Programmed::Blocked,
            Some(ste) if !ste.valid() => Programmed::Blocked,
            Some(ste) => match ste.config() {
                StreamConfig::Abort => Programmed::Blocked,
                StreamConfig::S2 => Programmed::Table(ste.s2_ttb()),
                _ => Programmed::Other,
            },
        }
    }

    /// Every StreamID of the device within the unit's StreamID range.
    fn check(&self, rec: &BackendDevice<u32>, _x: &DomainSlot<Domain>) -> Result<(), HwError> {
        let unit = self.unit(rec.unit)?;
        if rec
            .ids
            .as_slice()
            .iter()
            .any(|&sid| (sid as u64) >> unit.stream_id_bits() != 0)
        {
            return Err(HwError::Incompatible);
        }
        Ok(())
    }

    fn unit_coherent(&self, unit: usize) -> bool {
        self.units.get(unit).is_some_and(|u| u.coherent())
    }

    fn prepare_id(
        &mut self,
        _dev: HwDev,
        rec: &BackendDevice<u32>,
        sid: u32,
        _pasid: Option<u32>,
        _d: HwDomain,
        _x: &DomainSlot<Domain>,
        _blocked: bool,
    ) -> Result<(), HwError> {
        let mem = self.mem;
        let unit = self.unit_mut(rec.unit)?;
        if unit.ste(mem, sid).is_none() {
            // First use of a StreamID whose level-2 table does not exist: create it (abort
            // STEs), so that commit allocates nothing. The stream stays blocked.
            unit.set_abort(mem, sid).map_err(err)?;
        }
        Ok(())
    }

    fn commit_id(
        &mut self,
        _dev: HwDev,
        rec: &BackendDevice<u32>,
        sid: u32,
        _pasid: Option<u32>,
        _d: HwDomain,
        x: &DomainSlot<Domain>,
        _blocked: bool,
    ) -> Result<(), HwError> {
        let mem = self.mem;
        self.unit_mut(rec.unit)?
            .attach(mem, sid, &x.domain)
            .map_err(|_| HwError::Fault)
    }

    /// Nothing to release: a level-2 stream table prepare created stays (abort STEs), as the
    /// driver keeps every level-2 table.
    fn abort_id(&mut self, _: HwDev, _: &BackendDevice<u32>, _: u32, _: Option<u32>, _: bool) {}

    fn detach_id(
        &mut self,
        _dev: HwDev,
        rec: &BackendDevice<u32>,
        sid: u32,
        _pasid: Option<u32>,
    ) -> Result<(), HwError> {
        let mem = self.mem;
        self.unit_mut(rec.unit)?
            .set_abort(mem, sid)
            .map_err(|_| HwError::Fault)
    }
}

#[cfg(test)]
mod tests {
    use std::boxed::Box;
    use std::vec;
    use std::vec::Vec;

    use hvabi::{HWPT_ENFORCE_CACHE_COHERENCY, errno};

    use super::super::check::check;
    use super::super::client::Client;
    use super::super::hw::IommuHw;
    use super::super::selftest::{DmaEngine, FLOW_MEMORY, SliceMemory, dma_flow};
    use super::super::sim::VecGuestMemory;
    use super::super::{GuestId, Iommufd, Limits};
    use super::*;
    use crate::pgtable::Gather;
    use crate::smmuv3::fake::{FakeMem, FakeSmmu, Word};
    use crate::smmuv3::{Ste, StreamConfig, UnitConfig};

    type Unit<'a> = SmmuUnit<'a, &'a FakeSmmu<'a>, Word>;
    type Backend<'a> = SmmuBackend<'a, &'a FakeSmmu<'a>, FakeMem>;

    const PG: u64 = 0x1000;
    /// (StreamID, group): a two-stream group whose streams sit in different level-2 stream
    /// tables, and a stream of its own (the flow's device).
    const DEVS: [(u32, u32); 3] = [(0x08, 1), (0x1008, 1), (0x10, 2)];

    fn up<'a>(hw: &'a FakeSmmu<'a>, mem: &'a FakeMem) -> Unit<'a> {
        let cfg = UnitConfig {
            poll_budget: 1000,
            ..UnitConfig::new()
        };
        let unit = SmmuUnit::new(hw, mem, cfg).unwrap();
        hw.take_commands();
        unit
    }

    fn backend<'a>(hw: &'a FakeSmmu<'a>, mem: &'a FakeMem) -> Backend<'a> {
        let unit = up(hw, mem);
        let devices = DEVS
            .iter()
            .map(|&(sid, group)| SmmuDevice {
                info: device_info(&unit, sid, group, 0),
                unit: 0,
                sid,
            })
            .collect();
        SmmuBackend::new(vec![unit], mem, devices)
    }

    fn fd<'a>(hw: &'a FakeSmmu<'a>, mem: &'a FakeMem) -> (Iommufd<Backend<'a>>, GuestId) {
        let mut fd = Iommufd::new(backend(hw, mem), Limits::default()).unwrap();
        let g = fd.create_guest().unwrap();
        for d in 0..DEVS.len() as u32 {
            fd.assign_device(g, d).unwrap();
        }
        (fd, g)
    }

    fn ste(fd: &mut Iommufd<Backend<'_>>, sid: u32) -> Option<Ste> {
        let b = fd.hw();
        b.units()[0].ste(b.mem(), sid)
    }

    /// What a DMA of `sid` at `iova` reaches, walked from the fake's registers: the stream
    /// table (linear or 2-level, STRTAB_BASE_CFG), the STE (V, Config = stage 2 only, S2T0SZ,
    /// S2SL0, S2TTB), then the VMSAv8-64 stage-2 tables (4 KiB granule, concatenated root),
    /// S2AP for the permission. Not the driver's decoders.
    fn walk(
        hw: &FakeSmmu<'_>,
        mem: &FakeMem,
        sid: u32,
        iova: u64,
        write: bool,
    ) -> Result<u64, &'static str> {
        let (base, cfg, cr0) = {
            let s = hw.hw();
            (
                s.strtab_base & 0x000f_ffff_ffff_ffc0,
                s.strtab_base_cfg,
                s.cr0,
            )
        };
        if cr0 & 1 == 0 {
            return Err("SMMU disabled");
        }
        let (log2size, split) = (cfg & 0x3f, (cfg >> 6) & 0x1f);
        if (sid as u64) >> log2size != 0 {
            return Err("C_BAD_STREAMID");
        }
        let ste = if (cfg >> 16) & 3 == 1 {
            let l1 = mem.read(base + (sid >> split) as u64 * 8);
            let idx = (sid & ((1 << split) - 1)) as u64;
            if l1 & 0x1f == 0 || idx >= 1 << ((l1 & 0x1f) - 1) {
                return Err("C_BAD_STREAMID");
            }
            (l1 & 0x000f_ffff_ffff_ffc0) + idx * 64
        } else {
            base + sid as u64 * 64
        };
        let w: [u64; 4] = core::array::from_fn(|i| mem.read(ste + 8 * i as u64));
        if w[0] & 1 == 0 {
            return Err("C_BAD_STE");
        }
        match (w[0] >> 1) & 7 {
            0 => return Err("abort"),
            6 => {}
            _ => return Err("not a stage-2-only STE"),
        }
        let ias = 64 - ((w[2] >> 32) & 0x3f);
        let mut level = 2 - ((w[2] >> 38) & 3);
        if iova >> ias != 0 {
            return Err("translation fault (input size)");
        }
        let mut table = w[3] & 0x000f_ffff_ffff_fff0;
        let mut root = true;
        loop {
            let shift = 12 + 9 * (3 - level);
            let idx = if root {
                iova >> shift
            } else {
                (iova >> shift) & 511
            };
            root = false;
            let desc = mem.read(table + idx * 8);
            if desc & 1 == 0 {
                return Err("translation fault");
            }
            let out = desc & 0x0000_ffff_ffff_f000;
            if level < 3 && desc & 2 != 0 {
                table = out;
                level += 1;
                continue;
            }
            if level == 3 && desc & 2 == 0 {
                return Err("translation fault (reserved descriptor)");
            }
            let need = if write { 1 << 7 } else { 1 << 6 };
            if desc & need == 0 {
                return Err("permission fault");
            }
            let size = 1u64 << shift;
            return Ok((out & !(size - 1)) | (iova & (size - 1)));
        }
    }

    /// The flow's device: DMA through the fake SMMU's stream table and stage-2 tables.
    struct Walker<'a> {
        hw: &'a FakeSmmu<'a>,
        fake: &'a FakeMem,
        mem: &'a SliceMemory<'a>,
        sid: u32,
        buf: [u8; PG as usize],
    }

    impl<H: IommuHw> DmaEngine<H> for Walker<'_> {
        fn memory_to_device(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
            for off in (0..len as u64).step_by(PG as usize) {
                let pa = walk(self.hw, self.fake, self.sid, iova + off, false)?;
                let n = (len as u64 - off).min(PG - (pa & (PG - 1))) as usize;
                let o = off as usize;
                self.mem
                    .read_hpa(pa, &mut self.buf[o..o + n])
                    .map_err(|_| "DMA outside the buffer")?;
            }
            Ok(())
        }
        fn device_to_memory(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
            for off in (0..len as u64).step_by(PG as usize) {
                let pa = walk(self.hw, self.fake, self.sid, iova + off, true)?;
                let n = (len as u64 - off).min(PG - (pa & (PG - 1))) as usize;
                let o = off as usize;
                self.mem
                    .write_hpa(pa, &self.buf[o..o + n])
                    .map_err(|_| "DMA outside the buffer")?;
            }
            Ok(())
        }
    }

    #[test]
    fn smmu_device_info() {
        let mem = FakeMem::new(256);
        let hw = FakeSmmu::qemu(&mem);
        let unit = up(&hw, &mem);
        let info = device_info(&unit, 0x10, 7, 20);
        // QEMU: IDR0.COHACC, IDR5.OAS = 44 bits, no substreams.
        assert!(info.enforce_cc && !info.dirty_tracking);
        assert_eq!(info.aperture, Span::new(0, (1 << 44) - 1));
        assert_eq!((info.hw_id, info.group, info.pasid_bits), (0x10, 7, 0));
        assert!(info.reserved().is_empty());
        let mut info = info;
        assert!(with_reserved(
            &mut info,
            QEMU_VIRT_ITS_WINDOW,
            hvabi::resv::MSI
        ));
        assert_eq!(info.reserved()[0].span.start, 0x0808_0000);
    }

    #[test]
    fn smmu_dma_flow() {
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let (mut fd, g) = fd(&hw, &mem);
        let bytes = Box::leak(vec![0u8; FLOW_MEMORY as usize].into_boxed_slice());
        let gm = SliceMemory::new(0x8000_0000, 0x8000_0000, bytes);
        let mut dma = Walker {
            hw: &hw,
            fake: &mem,
            mem: &gm,
            sid: 0x10,
            buf: [0; PG as usize],
        };
        let mut lines = 0;
        dma_flow(&mut fd, g, &gm, 0x10, &mut dma, &mut |_| lines += 1).unwrap();
        assert_eq!(lines, 5);
        check(&fd, &[(g, &gm)]).unwrap();
        // Detached: abort STE, DMA blocked.
        assert_eq!(ste(&mut fd, 0x10).unwrap().config(), StreamConfig::Abort);
        assert_eq!(walk(&hw, &mem, 0x10, 0x10_0000, false), Err("abort"));
        // The two-stream group: the flow moves both streams.
        let mut dma = Walker { sid: 0x1008, ..dma };
        dma_flow(&mut fd, g, &gm, 0x08, &mut dma, &mut |_| {}).unwrap();
        check(&fd, &[(g, &gm)]).unwrap();
        assert_eq!(fd.hw().live_domains(), Some(0));
        assert_eq!(fd.hw().outstanding_prepared(), Some(0));
        fd.destroy_guest(g).unwrap();
    }

    #[test]
    fn smmu_msi_doorbell_in_every_domain() {
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let mut b = backend(&hw, &mem);
        // Before the doorbell is known: nothing at the window.
        let plain = b.domain_alloc(0, DomainConfig::default()).unwrap();
        b.set_msi_doorbell(0x1000_0000, 0x0809_0040);
        let d = b.domain_alloc(0, DomainConfig::default()).unwrap();
        b.map(d, 0x10_0000, 0x8000_0000, PG, Prot::READ).unwrap();
        let p = b.prepare(2, None, d).unwrap();
        b.commit(p).unwrap();
        // Walked from the fake's stream table and stage-2 tables: the doorbell page at the
        // window, writable, not readable; the IOAS page as mapped; nothing past the doorbell.
        assert_eq!(walk(&hw, &mem, 0x10, 0x1000_0040, true), Ok(0x0809_0040));
        assert!(walk(&hw, &mem, 0x10, 0x1000_0040, false).is_err());
        assert!(walk(&hw, &mem, 0x10, 0x1000_1000, true).is_err());
        assert_eq!(walk(&hw, &mem, 0x10, 0x10_0000, false), Ok(0x8000_0000));
        // The doorbell is the backend's: only the IOAS's page counts as mapped bytes.
        assert_eq!(b.mapped_bytes(d), PG);
        let p = b.prepare(2, None, plain).unwrap();
        b.commit(p).unwrap();
        assert!(walk(&hw, &mem, 0x10, 0x1000_0040, true).is_err());
        assert_eq!(b.mapped_bytes(plain), 0);
    }

    #[test]
    fn smmu_prepare_abort_leaves_stes() {
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let mut b = backend(&hw, &mem);
        let d1 = b.domain_alloc(0, DomainConfig::default()).unwrap();
        let d2 = b.domain_alloc(0, DomainConfig::default()).unwrap();
        b.map(d1, 0x10_0000, 0x8000_0000, PG, Prot::READ).unwrap();
        // Blocked streams: prepare creates a level-2 table at most, abort keeps it abort.
        let before: Vec<_> = [0x08, 0x1008].map(|s| b.units()[0].ste(&mem, s)).to_vec();
        let p = b.prepare(0, None, d1).unwrap();
        assert_eq!(b.outstanding_prepared(), Some(1));
        b.abort(p);
        assert_eq!(b.outstanding_prepared(), Some(0));
        let ste0 = b.units()[0].ste(&mem, 0x08).unwrap();
        assert_eq!(ste0.config(), StreamConfig::Abort);
        assert!(before[0].is_none_or(|s| s.0 == ste0.0));
        assert_eq!(b.device_domain(0, None), None);
        // Attached streams: prepare and abort of a REPLACE change no STE word.
        for dev in [0, 1] {
            let p = b.prepare(dev, None, d1).unwrap();
            b.commit(p).unwrap();
        }
        assert_eq!(walk(&hw, &mem, 0x1008, 0x10_0000, false), Ok(0x8000_0000));
        let stes: Vec<_> = [0x08, 0x1008]
            .map(|s| b.units()[0].ste(&mem, s).unwrap().0)
            .to_vec();
        let updates = b.units()[0].counters().ste_updates;
        hw.take_commands();
        let p0 = b.prepare(0, None, d2).unwrap();
        // The second member fails (here: a PASID, which this backend does not offer); the
        // first is aborted.
        assert_eq!(b.prepare(1, Some(1), d2).unwrap_err(), HwError::Unsupported);
        b.abort(p0);
        let after: Vec<_> = [0x08, 0x1008]
            .map(|s| b.units()[0].ste(&mem, s).unwrap().0)
            .to_vec();
        assert_eq!(stes, after);
        assert_eq!(b.units()[0].counters().ste_updates, updates);
        assert!(hw.take_commands().is_empty());
        assert_eq!(b.device_domain(0, None), Some(d1));
        assert_eq!(b.device_domain(1, None), Some(d1));
        assert_eq!(b.outstanding_prepared(), Some(0));
        // Refused up front: another unit's rules (coherency is fine on QEMU), dirty tracking,
        // PASIDs.
        let dirty = DomainConfig {
            dirty_tracking: true,
            ..DomainConfig::default()
        };
        assert_eq!(b.domain_alloc(0, dirty), Err(HwError::NoDirtyTracking));
        assert_eq!(b.prepare(0, Some(1), d2).unwrap_err(), HwError::Unsupported);
        for dev in [0, 1] {
            b.detach(dev, None).unwrap();
        }
        assert_eq!(walk(&hw, &mem, 0x08, 0x10_0000, false), Err("abort"));
        b.domain_free(d1);
        b.domain_free(d2);
        assert_eq!(b.live_domains(), Some(0));
    }

    /// A group attach whose second member's prepare fails (its level-2 stream table cannot be
    /// allocated) aborts the first member: ENOMEM, nothing attached, no STE changed.
    #[test]
    fn smmu_group_attach_rolls_back() {
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let (mut fd, g) = fd(&hw, &mem);
        let gm = VecGuestMemory::standard();
        // Stream 0x10 attached first: the level-2 table of 0x00-0xff (0x08 too) exists.
        let (dev0, dev2) = (fd.device_id(g, 0).unwrap(), fd.device_id(g, 2).unwrap());
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        c.attach(dev2, ioas).unwrap();
        let hwpt = c
            .hwpt_alloc(dev0, ioas, HWPT_ENFORCE_CACHE_COHERENCY)
            .unwrap();
        let ste08 = ste(&mut fd, 0x08).unwrap();
        assert!(ste(&mut fd, 0x1008).is_none());
        mem.fail_allocs
            .store(true, core::sync::atomic::Ordering::Relaxed);
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        assert_eq!(c.attach(dev0, hwpt).unwrap_err(), errno::ENOMEM);
        mem.fail_allocs
            .store(false, core::sync::atomic::Ordering::Relaxed);
        assert_eq!(ste(&mut fd, 0x08).unwrap().0, ste08.0);
        assert!(ste(&mut fd, 0x1008).is_none());
        assert_eq!(fd.hw().device_domain(0, None), None);
        assert_eq!(fd.hw().device_domain(1, None), None);
        assert_eq!(fd.hw().outstanding_prepared(), Some(0));
        check(&fd, &[(g, &gm)]).unwrap();
        // With memory, the same attach moves both streams.
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        c.attach(dev0, hwpt).unwrap();
        let d = fd.hwpt_domain(g, hwpt).unwrap();
        assert_eq!(fd.hw().device_domain(0, None), Some(d));
        assert_eq!(fd.hw().device_domain(1, None), Some(d));
        assert_eq!(ste(&mut fd, 0x1008).unwrap().config(), StreamConfig::S2);
        check(&fd, &[(g, &gm)]).unwrap();
        fd.destroy_guest(g).unwrap();
        assert_eq!(fd.hw().live_domains(), Some(0));
    }

    /// The checker reads the STE: a stream aborted behind the object model's back is a
    /// violation though the backend's record still says attached.
    /// Guest memory whose host pages are scattered (`iommufd/tests/scatter.rs`), mapped through
    /// the SMMUv3 driver: every page reaches the guest memory's own translation by the
    /// hand-written stage-2 walk; a bad host run in the middle fails with EFAULT and leaves the
    /// whole range unreachable.
    #[test]
    fn smmu_maps_scattered_host_pages() {
        use super::super::GuestMemory;
        use super::super::tests::scatter::{MIXED, MIXED_LEN, SCATTERED, scattered_memory};
        const MB: u64 = 1 << 20;
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let (mut fd, g) = fd(&hw, &mem);
        let gm = scattered_memory(None);
        let dev2 = fd.device_id(g, 2).unwrap();
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        c.attach(dev2, ioas).unwrap();
        let (iova, iova2) = (0x4000_0000, 0x8000_0000 - 2 * MB);
        c.map_fixed(ioas, iova, SCATTERED, MB).unwrap();
        c.map_fixed(ioas, iova2, MIXED, MIXED_LEN).unwrap();
        for (at, gpa, len) in [(iova, SCATTERED, MB), (iova2, MIXED, MIXED_LEN)] {
            for k in 0..len / PG {
                let want = gm.translate(gpa + k * PG).map(|r| r.hpa);
                assert_eq!(
                    walk(&hw, &mem, 0x10, at + k * PG, true).ok(),
                    want,
                    "{at:#x} + {k}"
                );
            }
        }
        check(&fd, &[(g, &gm)]).unwrap();
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        assert_eq!(c.unmap(ioas, iova, MB), Ok(MB));
        // Page 200 of the scattered range at a host address that is not page-aligned.
        let bad = scattered_memory(Some(200));
        let mut c = Client::new(&mut fd, g, &bad, super::super::tests::SCRATCH);
        assert_eq!(c.map_fixed(ioas, iova, SCATTERED, MB), Err(errno::EFAULT));
        assert_eq!(c.last_error().out_value, SCATTERED + 200 * PG);
        for k in 0..MB / PG {
            assert!(
                walk(&hw, &mem, 0x10, iova + k * PG, true).is_err(),
                "page {k}"
            );
        }
        check(&fd, &[(g, &bad)]).unwrap();
        fd.destroy_guest(g).unwrap();
    }

    #[test]
    fn smmu_checker_reads_the_ste() {
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let (mut fd, g) = fd(&hw, &mem);
        let gm = VecGuestMemory::standard();
        let dev2 = fd.device_id(g, 2).unwrap();
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        c.attach(dev2, ioas).unwrap();
        check(&fd, &[(g, &gm)]).unwrap();
        fd.hw_mut().units_mut()[0].set_abort(&mem, 0x10).unwrap();
        assert_eq!(fd.hw().attachments().count(), 1);
        assert_eq!(fd.hw().device_domain(2, None), None);
        let v = check(&fd, &[(g, &gm)]).unwrap_err();
        assert_eq!(v.what, "member not on the group's domain");
        fd.destroy_guest(g).unwrap();
    }

    // -----------------------------------------------------------------------------------------
    // One invalidation round per unit. Commands are decoded by hand from what the fake SMMU
    // consumed from its queue (SMMUv3 §4.4: opcode 7:0; CMD_TLBI_S2_IPA 0x2a with NUM 16:12,
    // SCALE 24:20, VMID 47:32, and Leaf 64, TTL 73:72, TG 75:74, IPA 115:76; CMD_SYNC 0x46).
    // -----------------------------------------------------------------------------------------

    /// A TLB invalidation seen on the queue.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Tlbi {
        /// VMID, first byte, bytes covered.
        S2Ipa(u16, u64, u64),
        S12Vmall(u16),
        NsnhAll,
    }

    /// The rounds on the queue: the TLBIs before each CMD_SYNC.
    fn rounds(cmds: &[crate::smmuv3::Command]) -> Vec<Vec<Tlbi>> {
        let mut out = vec![];
        let mut cur = vec![];
        for c in cmds {
            let [w0, w1] = c.0;
            match w0 & 0xff {
                0x2a => {
                    let (num, scale, tg) = ((w0 >> 12) & 0x1f, (w0 >> 20) & 0x1f, (w1 >> 10) & 3);
                    let bytes = if tg == 0 {
                        PG
                    } else {
                        (num + 1) << (scale + 10 + 2 * tg)
                    };
                    cur.push(Tlbi::S2Ipa(
                        (w0 >> 32) as u16,
                        w1 & 0x000f_ffff_ffff_f000,
                        bytes,
                    ));
                }
                0x28 => cur.push(Tlbi::S12Vmall((w0 >> 32) as u16)),
                0x30 => cur.push(Tlbi::NsnhAll),
                0x46 => out.push(core::mem::take(&mut cur)),
                o => panic!("unexpected command {o:#x} ({c:?})"),
            }
        }
        assert!(cur.is_empty(), "commands after the last CMD_SYNC");
        out
    }

    fn covers(round: &[Tlbi], vmid: u16, start: u64, len: u64) -> bool {
        round.iter().any(|t| match *t {
            Tlbi::NsnhAll => true,
            Tlbi::S12Vmall(v) => v == vmid,
            Tlbi::S2Ipa(v, a, n) => v == vmid && a <= start && start + len <= a + n,
        })
    }

    /// S2VMID (STE bits 143:128) of `sid`'s STE, located through STRTAB_BASE(_CFG) as in
    /// [`walk`].
    fn ste_vmid(hw: &FakeSmmu<'_>, mem: &FakeMem, sid: u32) -> u16 {
        let (base, cfg) = {
            let s = hw.hw();
            (s.strtab_base & 0x000f_ffff_ffff_ffc0, s.strtab_base_cfg)
        };
        let split = (cfg >> 6) & 0x1f;
        let ste = if (cfg >> 16) & 3 == 1 {
            let l1 = mem.read(base + (sid >> split) as u64 * 8);
            (l1 & 0x000f_ffff_ffff_ffc0) + (sid & ((1 << split) - 1)) as u64 * 64
        } else {
            base + sid as u64 * 64
        };
        assert_eq!(mem.read(ste) & 0xf, 0b1101, "valid stage-2 STE");
        mem.read(ste + 16) as u16
    }

    /// Three adjacent areas and one apart, in an IOAS with two HWPTs (two stage-2 domains, two
    /// VMIDs) on one SMMU: one IOAS_UNMAP is one round, the range TLBIs of both VMIDs then a
    /// single CMD_SYNC.
    #[test]
    fn smmu_one_unmap_of_several_areas_and_two_domains_is_one_sync() {
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let (mut fd, g) = fd(&hw, &mem);
        let gm = VecGuestMemory::standard();
        let (dev0, dev2) = (fd.device_id(g, 0).unwrap(), fd.device_id(g, 2).unwrap());
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        for dev in [dev0, dev2] {
            let h = c.hwpt_alloc(dev, ioas, 0).unwrap();
            c.attach(dev, h).unwrap();
        }
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
        let vmids = [ste_vmid(&hw, &mem, 0x08), ste_vmid(&hw, &mem, 0x10)];
        assert_ne!(vmids[0], vmids[1]);
        hw.take_commands();
        assert_eq!(c.unmap(ioas, 0x10_0000, 0x20_8000).unwrap(), 15 * PG);
        let r = rounds(&hw.take_commands());
        assert_eq!(r.len(), 1, "one CMD_SYNC: {r:x?}");
        for vmid in vmids {
            for &(iova, len) in &areas {
                assert!(covers(&r[0], vmid, iova, len), "{vmid} {iova:#x}: {r:x?}");
            }
        }
        assert!(
            r[0].iter().all(|t| matches!(t, Tlbi::S2Ipa(..))),
            "range commands, not VMID-wide: {r:x?}"
        );
        assert_eq!(r[0].len(), 4, "two ranges per VMID: {r:x?}");
        assert_eq!(
            walk(&hw, &mem, 0x08, 0x10_0000, false),
            Err("translation fault")
        );
    }

    /// Two SMMUs under one IOAS: one CMD_SYNC on each queue, naming only its own VMID.
    #[test]
    fn smmu_two_units_one_sync_each() {
        let mem = FakeMem::new(2048);
        let hws = [FakeSmmu::qemu(&mem), FakeSmmu::qemu(&mem)];
        let units: Vec<Unit<'_>> = hws.iter().map(|hw| up(hw, &mem)).collect();
        let devices = (0..2)
            .map(|u| SmmuDevice {
                info: device_info(&units[u], 0x10, u as u32 + 1, 0),
                unit: u,
                sid: 0x10,
            })
            .collect();
        let mut fd =
            Iommufd::new(SmmuBackend::new(units, &mem, devices), Limits::default()).unwrap();
        let g = fd.create_guest().unwrap();
        let ids: Vec<u32> = (0..2).map(|d| fd.assign_device(g, d).unwrap()).collect();
        let gm = VecGuestMemory::standard();
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        for &dev in &ids {
            let h = c.hwpt_alloc(dev, ioas, 0).unwrap();
            c.attach(dev, h).unwrap();
        }
        for i in 0..3u64 {
            c.map_fixed(ioas, 0x10_0000 + i * 0x1_0000, 0x80_0000, PG)
                .unwrap();
        }
        let vmids = [ste_vmid(&hws[0], &mem, 0x10), ste_vmid(&hws[1], &mem, 0x10)];
        for hw in &hws {
            hw.take_commands();
        }
        assert_eq!(c.unmap(ioas, 0, u64::MAX).unwrap(), 3 * PG);
        for (hw, vmid) in hws.iter().zip(vmids) {
            let r = rounds(&hw.take_commands());
            assert_eq!(r.len(), 1, "{r:x?}");
            for i in 0..3u64 {
                assert!(covers(&r[0], vmid, 0x10_0000 + i * 0x1_0000, PG), "{r:x?}");
            }
            assert!(
                r[0].iter()
                    .all(|t| matches!(*t, Tlbi::S2Ipa(v, ..) if v == vmid))
            );
        }
    }

    /// Without IDR3.RIL a range is one CMD_TLBI_S2_IPA per page: a round whose commands do
    /// not fit falls back to CMD_TLBI_NSNH_ALL, still one CMD_SYNC; at capacity every page
    /// command is issued.
    #[test]
    fn smmu_full_round_degrades_to_nsnh_all() {
        use crate::smmuv3::fake::{QEMU_IDR0, QEMU_IDR1, QEMU_IDR3, QEMU_IDR5};
        use crate::smmuv3::{DomainConfig as SmmuDomainConfig, InvalidationRound};
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::new(
            &mem,
            [
                QEMU_IDR0,
                QEMU_IDR1,
                0,
                QEMU_IDR3 & !(1 << 10),
                0,
                QEMU_IDR5,
            ],
        );
        let mut u = up(&hw, &mem);
        let d = u.create_domain(&mem, SmmuDomainConfig::stage2(40)).unwrap();
        let per = 32u64;
        let unmap_all = |u: &Unit<'_>, n: u64| {
            let mut gathers: Vec<Gather> = (0..n).map(|_| Gather::new()).collect();
            for (i, g) in gathers.iter_mut().enumerate() {
                let iova = (i as u64) << 30;
                u.map(&mem, &d, iova, 0x8000_0000, per * PG, Prot::READ)
                    .unwrap();
                assert_eq!(u.unmap_deferred(&mem, &d, iova, per * PG, g), Ok(per * PG));
            }
            hw.take_commands();
            let mut batch: Vec<_> = gathers.iter_mut().map(|g| (&d, g)).collect();
            u.flush_batch(&mem, &mut batch).unwrap();
            rounds(&hw.take_commands())
        };
        let fits = InvalidationRound::CAPACITY as u64 / per;
        let r = unmap_all(&u, fits);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].len() as u64, fits * per);
        for i in 0..fits {
            for p in 0..per {
                assert!(covers(&r[0], d.vmid(), (i << 30) + p * PG, PG));
            }
        }
        assert_eq!(unmap_all(&u, fits + 1), [[Tlbi::NsnhAll]]);
        u.destroy_domain(&mem, d).unwrap();
    }

    /// A round that fails (the queue is stuck: CMD_SYNC never completes) leaks the table pages
    /// the unmap unlinked; a completed round retires them.
    #[test]
    fn smmu_failed_round_leaks_table_pages() {
        use core::sync::atomic::Ordering::Relaxed;
        let mem = FakeMem::new(2048);
        let hw = FakeSmmu::qemu(&mem);
        let (mut fd, g) = fd(&hw, &mem);
        let gm = VecGuestMemory::standard();
        let dev2 = fd.device_id(g, 2).unwrap();
        let mut c = Client::new(&mut fd, g, &gm, super::super::tests::SCRATCH);
        let ioas = c.ioas_alloc().unwrap();
        c.attach(dev2, ioas).unwrap();
        // IOVA 2 MiB-aligned, GPA not: one full leaf table, unlinked by the 2 MiB unmap.
        const M2: u64 = 0x20_0000;
        for base in [M2, 4 * M2] {
            c.map_fixed(ioas, base, 0x1000, M2).unwrap();
        }
        let (retires, frees, live) = (
            mem.retires.load(Relaxed),
            mem.frees.load(Relaxed),
            mem.live_frames(),
        );
        hw.hw().stall = true;
        assert_eq!(c.unmap(ioas, M2, M2), Err(errno::EIO));
        assert_eq!(
            (mem.retires.load(Relaxed), mem.frees.load(Relaxed)),
            (retires, frees)
        );
        assert_eq!(
            mem.live_frames(),
            live,
            "the unlinked table stays allocated"
        );
        hw.unstall();
        assert_eq!(c.unmap(ioas, M2, M2), Err(errno::ENOENT));
        assert_eq!(c.unmap(ioas, 4 * M2, M2), Ok(M2));
        assert!(mem.retires.load(Relaxed) > retires);
    }
}

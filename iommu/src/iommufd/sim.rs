//! A software IOMMU for host tests and the fuzzer: devices with groups, IOMMU units, PASID
//! widths, coherency and dirty capabilities, apertures and reserved regions; domains that are
//! real page tables of the page-table engine (VT-d second-stage format, 4 levels) over a
//! fixed pool of table pages; per-device (and per-PASID) current domains; emulated device DMA
//! through them; and fault injection (a [`FailNth`] shared with the object model, plus
//! one-shot prepare failures and commit faults for a chosen device).
//!
//! Also [`VecGuestMemory`], a guest-memory backend over host memory with explicit regions
//! (RAM, read-only, holes, host-discontiguous runs).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::backend::{Backend, BackendDevice, DomainSlot, DriverOps, Ids, Programmed};
use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwReserved, HwTranslation,
    MAX_RESERVED_PER_DEVICE, Span,
};
use super::{FailNth, GuestMemory, HostRun, MemFault, PAGE};
use crate::gate::SpinLock;
use crate::pgtable::format::vtd_bits;
use crate::pgtable::{
    Config, Gather, MapError, MapOutput, PageTable, PhysAddr, Prot, TableMemory, VtdSecondStage,
};

/// Fake physical address of frame 0 of the table pool.
const POOL_BASE: u64 = 0x1000;

/// A pool of 4 KiB table pages at fake physical addresses.
pub struct SimMem {
    storage: Box<[AtomicU64]>,
    frames: usize,
    /// The allocator's state: one short lock (the model is used from several threads by the
    /// concurrency tests; the hypervisor's pools are per-CPU instead).
    pool: SpinLock<Pool>,
    fail: Option<Arc<FailNth>>,
}

struct Pool {
    live: Vec<bool>,
    free: Vec<u32>,
    in_use: usize,
}

impl SimMem {
    pub fn new(frames: usize, fail: Option<Arc<FailNth>>) -> Self {
        SimMem {
            storage: (0..frames * 512).map(|_| AtomicU64::new(0)).collect(),
            frames,
            pool: SpinLock::new(Pool {
                live: vec![false; frames],
                free: (0..frames as u32).rev().collect(),
                in_use: 0,
            }),
            fail,
        }
    }

    pub fn frames_in_use(&self) -> usize {
        self.pool.lock().in_use
    }

    fn index(&self, pa: PhysAddr) -> Option<usize> {
        let i = (pa.checked_sub(POOL_BASE)? / 4096) as usize;
        (pa.is_multiple_of(4096) && i < self.frames).then_some(i)
    }

    fn release(&self, pa: PhysAddr) {
        if let Some(i) = self.index(pa) {
            let mut p = self.pool.lock();
            if p.live[i] {
                p.live[i] = false;
                p.free.push(i as u32);
                p.in_use -= 1;
            }
        }
    }
}

impl TableMemory for SimMem {
    type Entry = AtomicU64;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        if bytes != 4096 || self.fail.as_ref().is_some_and(|f| f.hit()) {
            return None;
        }
        let i = {
            let mut p = self.pool.lock();
            let i = p.free.pop()? as usize;
            p.live[i] = true;
            p.in_use += 1;
            i
        };
        for e in &self.storage[i * 512..(i + 1) * 512] {
            e.store(0, Relaxed);
        }
        Some(POOL_BASE + i as u64 * 4096)
    }

    fn free_table(&self, pa: PhysAddr, _bytes: usize) {
        self.release(pa);
    }

    fn retire_table(&self, pa: PhysAddr, _bytes: usize) {
        // No IOTLB and no other CPU in the model: reusable at once.
        self.release(pa);
    }

    fn table(&self, pa: PhysAddr, entries: usize) -> &[AtomicU64] {
        let i = self.index(pa).unwrap_or(0);
        let n = entries.min(512);
        &self.storage[i * 512..i * 512 + n]
    }
}

/// The VT-d driver's memory: its structures are single pages from the same pool.
impl crate::vtd::VtdMemory for SimMem {
    fn store128(&self, pa: u64, lo: u64, hi: u64) {
        let page = self.table(pa & !0xfff, 512);
        let i = ((pa & 0xfff) / 8) as usize;
        if let (Some(h), Some(l)) = (page.get(i + 1), page.get(i)) {
            h.store(hi, Relaxed);
            l.store(lo, Relaxed);
        }
    }
}

/// How to build one simulated device.
#[derive(Clone, Copy, Debug)]
pub struct SimDevice {
    pub info: HwDeviceInfo,
    /// The IOMMU unit in front of it: domains are usable only on their unit.
    pub unit: u32,
    /// Input address bits of domains built for it (aperture `[0, 2^bits)`), 39..=48.
    pub aperture_bits: u32,
    /// Requester IDs its DMA carries: `hw_id` and any DMA alias.
    pub ids: Ids<u32>,
}

/// The usual MSI window.
pub const MSI_WINDOW: Span = Span::new(0xfee0_0000, 0xfeef_ffff);

impl SimDevice {
    /// A device on unit 0 in its own group `group`: 48-bit aperture, the MSI window reserved,
    /// can enforce cache coherency, no PASID, no dirty tracking.
    pub fn new(hw_id: u64, group: u32) -> Self {
        let mut reserved = [HwReserved::default(); MAX_RESERVED_PER_DEVICE];
        reserved[0] = HwReserved {
            span: MSI_WINDOW,
            kind: hvabi::resv::MSI,
        };
        SimDevice {
            info: HwDeviceInfo {
                hw_id,
                group,
                pasid_bits: 0,
                enforce_cc: true,
                dirty_tracking: false,
                aperture: Span::new(0, (1 << 48) - 1),
                reserved,
                nr_reserved: 1,
            },
            unit: 0,
            aperture_bits: 48,
            ids: Ids::one(hw_id as u32),
        }
    }
    /// Adds a DMA alias: the device's DMA may also carry requester ID `id` (ignored past the
    /// list's capacity).
    pub fn alias(mut self, id: u32) -> Self {
        let _ = self.ids.push(id);
        self
    }
    pub fn pasid(mut self, bits: u8) -> Self {
        self.info.pasid_bits = bits;
        self
    }
    pub fn no_cc(mut self) -> Self {
        self.info.enforce_cc = false;
        self
    }
    pub fn dirty(mut self) -> Self {
        self.info.dirty_tracking = true;
        self
    }
    pub fn unit(mut self, unit: u32) -> Self {
        self.unit = unit;
        self
    }
    pub fn aperture_bits(mut self, bits: u32) -> Self {
        let bits = bits.clamp(39, 48);
        self.aperture_bits = bits;
        self.info.aperture = Span::new(0, (1 << bits) - 1);
        self
    }
    /// Adds a reserved region (ignored past the table's capacity).
    pub fn reserve(mut self, start: u64, last: u64, kind: u32) -> Self {
        let n = self.info.nr_reserved as usize;
        if n < MAX_RESERVED_PER_DEVICE {
            self.info.reserved[n] = HwReserved {
                span: Span::new(start, last),
                kind,
            };
            self.info.nr_reserved += 1;
        }
        self
    }
}

/// A direct-mapped (RMRR-like) region of device 8 of [`demo_platform`].
pub const DEMO_RMRR: (u64, u64) = (0x8000_0000, 0x80ff_ffff);
/// A reserved region of device 11 of [`demo_platform`] only.
pub const DEMO_L_RESV: (u64, u64) = (0x4000_0000, 0x400f_ffff);

/// The platform host tests and the fuzzer use (index = `HwDev`):
///
/// | dev | group | notes |
/// |---|---|---|
/// | 0 A | 1 | coherent, no PASID |
/// | 1 B | 2 | cannot enforce coherency |
/// | 2 C | 3 | coherent, 8 PASID bits, dirty tracking |
/// | 3 D, 4 E | 4 | two-device group |
/// | 5 F, 6 G | 5 | two-device group, G cannot enforce coherency |
/// | 7 H | 6 | behind IOMMU unit 1 |
/// | 8 I | 7 | 39-bit aperture, direct-mapped region [`DEMO_RMRR`] |
/// | 9 J | 8 | dirty tracking, not coherent |
/// | 10 K, 11 L | 9 | two-device group, 4 PASID bits; L reserves [`DEMO_L_RESV`] |
pub fn demo_platform() -> Vec<SimDevice> {
    vec![
        SimDevice::new(0x0008, 1),
        SimDevice::new(0x0010, 2).no_cc(),
        SimDevice::new(0x0018, 3).pasid(8).dirty(),
        SimDevice::new(0x0100, 4),
        SimDevice::new(0x0101, 4),
        SimDevice::new(0x0200, 5),
        SimDevice::new(0x0201, 5).no_cc(),
        SimDevice::new(0x0300, 6).unit(1),
        SimDevice::new(0x0400, 7).aperture_bits(39).reserve(
            DEMO_RMRR.0,
            DEMO_RMRR.1,
            hvabi::resv::DIRECT,
        ),
        SimDevice::new(0x0500, 8).dirty().no_cc(),
        SimDevice::new(0x0600, 9).pasid(4),
        SimDevice::new(0x0601, 9).pasid(4).reserve(
            DEMO_L_RESV.0,
            DEMO_L_RESV.1,
            hvabi::resv::RESERVED,
        ),
    ]
}

/// A domain of the model: a page table and its dirty record.
pub struct SimDomain {
    pt: PageTable<VtdSecondStage<4>>,
    aperture: Span,
    dirty_enabled: bool,
    dirty: BTreeSet<u64>,
}

/// Why an emulated DMA failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFault {
    /// The device (PASID) is blocked.
    Blocked,
    NotMapped,
    Permission,
}

/// The software model under the [`Backend`] skeleton: the table pool, the per-ID "hardware"
/// entries (what a requester ID, or a PASID of it, translates through) and the fault
/// injection.
pub struct SimOps {
    mem: SimMem,
    aperture_bits: Vec<u32>,
    /// The model's device-context entries, per requester ID (and PASID): the root of the
    /// page table its DMA walks, as a hardware entry holds it. Written by commit and detach
    /// only.
    entries: BTreeMap<(u32, Option<u32>), PhysAddr>,
    fail: Option<Arc<FailNth>>,
    fail_prepare: Option<HwDev>,
    fail_prepare_id: Option<u32>,
    fault_commit: Option<HwDev>,
    bad_frees: u32,
    commits: u64,
    aborts: u64,
}

/// The software IOMMU.
pub type SimHw = Backend<SimOps>;

impl SimOps {
    fn hit(&self) -> bool {
        self.fail.as_ref().is_some_and(|f| f.hit())
    }
}

impl DriverOps for SimOps {
    /// A requester ID.
    type Id = u32;
    type Domain = SimDomain;
    type Round = ();
    const PASIDS: bool = true;
    const SWITCHES_BLOCKED_AT_PREPARE: bool = false;

    fn domain_alloc(
        &mut self,
        dev: HwDev,
        rec: &BackendDevice<u32>,
        cfg: DomainConfig,
    ) -> Result<SimDomain, HwError> {
        if cfg.enforce_cc && !rec.info.enforce_cc {
            return Err(HwError::NotCoherent);
        }
        if cfg.dirty_tracking && !rec.info.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if self.hit() {
            return Err(HwError::NoMemory);
        }
        let bits = self.aperture_bits.get(dev as usize).copied().unwrap_or(48);
        let pt_cfg = Config {
            leaf_sizes: 1 << 12 | 1 << 21 | 1 << 30,
            contiguous_hint: false,
            dirty_tracking: cfg.dirty_tracking,
            snoop_control: true,
            ..Config::new(bits, 48)
        };
        let pt = PageTable::new(&self.mem, pt_cfg).map_err(|_| HwError::NoMemory)?;
        Ok(SimDomain {
            pt,
            aperture: Span::new(0, (1u64 << bits) - 1),
            dirty_enabled: false,
            dirty: BTreeSet::new(),
        })
    }

    fn domain_free(&mut self, _unit: usize, domain: SimDomain, in_use: bool) {
        if in_use {
            self.bad_frees += 1;
        }
        domain.pt.destroy(&self.mem);
    }

    fn domain_info(&self, x: &DomainSlot<SimDomain>) -> Option<DomainInfo> {
        Some(DomainInfo {
            aperture: x.domain.aperture,
            page_sizes: x.domain.pt.leaf_sizes(),
        })
    }

    fn map<O: MapOutput>(
        &self,
        x: &DomainSlot<SimDomain>,
        iova: u64,
        out: O,
        len: u64,
        prot: Prot,
    ) -> Result<(), HwError> {
        let prot = if x.cfg.enforce_cc {
            prot | Prot::SNOOP
        } else {
            prot
        };
        out.map_into(&x.domain.pt, &self.mem, iova, len, prot)
            .map_err(|e| match e {
                MapError::NoMemory { .. } => HwError::NoMemory,
                _ => HwError::Invalid,
            })
    }

    fn unmap(
        &self,
        x: &DomainSlot<SimDomain>,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<u64, HwError> {
        x.domain
            .pt
            .unmap(&self.mem, iova, len, gather)
            .map_err(|_| HwError::Invalid)
    }

    /// The model caches no translations: nothing to invalidate.
    fn plan_flush(&self, _: &DomainSlot<SimDomain>, _: &Gather, _: &mut ()) {}

    fn run_flush(&self, _unit: usize, _: &()) -> Result<(), HwError> {
        Ok(())
    }

    fn complete(&self, _: &DomainSlot<SimDomain>, gather: &mut Gather) {
        gather.complete(&self.mem);
    }

    fn translate(&self, x: &DomainSlot<SimDomain>, iova: u64) -> Option<HwTranslation> {
        let t = x.domain.pt.translate(&self.mem, iova)?;
        Some(HwTranslation {
            pa: t.pa,
            leaf: Span::new(t.leaf.start, t.leaf.end - 1),
            read: t.pte & vtd_bits::R != 0,
            write: t.pte & vtd_bits::W != 0,
            snoop: Some(t.pte & vtd_bits::SNP != 0),
        })
    }

    fn mapped_bytes(&self, x: &DomainSlot<SimDomain>) -> u64 {
        x.domain.pt.census(&self.mem).mapped
    }

    fn domain_root(&self, x: &DomainSlot<SimDomain>) -> u64 {
        x.domain.pt.root()
    }

    fn programmed(&self, _rec: &BackendDevice<u32>, id: u32, pasid: Option<u32>) -> Programmed {
        self.entries
            .get(&(id, pasid))
            .map_or(Programmed::Blocked, |&root| Programmed::Table(root))
    }

    fn prepare_id(
        &mut self,
        dev: HwDev,
        _rec: &BackendDevice<u32>,
        id: u32,
        _pasid: Option<u32>,
        _d: HwDomain,
        _x: &DomainSlot<SimDomain>,
        _blocked: bool,
    ) -> Result<(), HwError> {
        if self.fail_prepare == Some(dev) {
            self.fail_prepare = None;
            return Err(HwError::NoMemory);
        }
        if self.fail_prepare_id == Some(id) {
            self.fail_prepare_id = None;
            return Err(HwError::NoMemory);
        }
        // Models the context/PASID-table pages a real IOMMU may need.
        if self.hit() {
            return Err(HwError::NoMemory);
        }
        Ok(())
    }

    fn commit_id(
        &mut self,
        dev: HwDev,
        _rec: &BackendDevice<u32>,
        id: u32,
        pasid: Option<u32>,
        _d: HwDomain,
        x: &DomainSlot<SimDomain>,
        _blocked: bool,
    ) -> Result<(), HwError> {
        self.commits += 1;
        self.entries.insert((id, pasid), x.domain.pt.root());
        if self.fault_commit == Some(dev) {
            self.fault_commit = None;
            return Err(HwError::Fault);
        }
        Ok(())
    }

    fn abort_id(&mut self, _: HwDev, _: &BackendDevice<u32>, _: u32, _: Option<u32>, _: bool) {
        self.aborts += 1;
    }

    fn detach_id(
        &mut self,
        _dev: HwDev,
        _rec: &BackendDevice<u32>,
        id: u32,
        pasid: Option<u32>,
    ) -> Result<(), HwError> {
        self.entries.remove(&(id, pasid));
        Ok(())
    }

    fn set_dirty_tracking(
        &mut self,
        x: &mut DomainSlot<SimDomain>,
        enable: bool,
    ) -> Result<(), HwError> {
        if !x.cfg.dirty_tracking {
            return Err(HwError::Unsupported);
        }
        // Enabling starts a clean snapshot; disabling keeps what was recorded, so a read after
        // tracking stopped still returns the last writes (docs/abi.md §5).
        if enable {
            x.domain.dirty.clear();
        }
        x.domain.dirty_enabled = enable;
        Ok(())
    }

    fn read_dirty(
        &mut self,
        x: &mut DomainSlot<SimDomain>,
        iova: u64,
        len: u64,
        clear: bool,
        report: &mut dyn FnMut(u64, u64),
    ) -> Result<(), HwError> {
        if !x.cfg.dirty_tracking {
            return Err(HwError::Unsupported);
        }
        let dom = &mut x.domain;
        let last = Span::from_len(iova, len).ok_or(HwError::Invalid)?.last;
        let pages: Vec<u64> = dom.dirty.range(iova..=last).copied().collect();
        for p in pages {
            report(p, PAGE);
            if clear {
                dom.dirty.remove(&p);
            }
        }
        Ok(())
    }
}

impl Backend<SimOps> {
    /// `devices` in that order (device `i` is `HwDev` `i`), `frames` table pages.
    pub fn new(devices: &[SimDevice], frames: usize, fail: Option<Arc<FailNth>>) -> Self {
        let ops = SimOps {
            mem: SimMem::new(frames, fail.clone()),
            aperture_bits: devices.iter().map(|d| d.aperture_bits).collect(),
            entries: BTreeMap::new(),
            fail,
            fail_prepare: None,
            fail_prepare_id: None,
            fault_commit: None,
            bad_frees: 0,
            commits: 0,
            aborts: 0,
        };
        let devices = devices
            .iter()
            .map(|d| BackendDevice {
                info: d.info,
                unit: d.unit as usize,
                ids: d.ids,
            })
            .collect();
        Backend::with_driver(ops, devices)
    }

    pub fn frames_in_use(&self) -> usize {
        self.drv.mem.frames_in_use()
    }

    /// The next prepare for `dev` fails with `NoMemory`.
    pub fn fail_next_prepare(&mut self, dev: HwDev) {
        self.drv.fail_prepare = Some(dev);
    }

    /// The next prepare of requester ID `id` (of whichever device) fails with `NoMemory`.
    pub fn fail_next_prepare_id(&mut self, id: u32) {
        self.drv.fail_prepare_id = Some(id);
    }

    /// The next commit for `dev` switches and then reports a hardware fault.
    pub fn fault_next_commit(&mut self, dev: HwDev) {
        self.drv.fault_commit = Some(dev);
    }

    /// Domains freed while a device still used them (an object-model bug).
    pub fn bad_frees(&self) -> u32 {
        self.drv.bad_frees
    }

    /// Requester IDs committed (one per ID of every committed switch).
    pub fn commits(&self) -> u64 {
        self.drv.commits
    }

    /// Requester IDs aborted (one per ID of every aborted switch).
    pub fn aborts(&self) -> u64 {
        self.drv.aborts
    }

    /// Emulated DMA by `dev` (`pasid`) at `iova`, under the device's own requester ID: the
    /// physical address reached. A write to a domain tracking dirty pages marks the page
    /// dirty.
    pub fn dma(
        &mut self,
        dev: HwDev,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<u64, DmaFault> {
        let id = self.device(dev).ok_or(DmaFault::Blocked)?.ids.primary();
        self.dma_as(id, pasid, iova, write)
    }

    /// Emulated DMA carrying requester ID `id` (a device's own or one of its aliases),
    /// translated through the table the model's entry for `id` points at, as the hardware
    /// would.
    pub fn dma_as(
        &mut self,
        id: u32,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<u64, DmaFault> {
        let root = *self
            .drv
            .entries
            .get(&(id, pasid))
            .ok_or(DmaFault::Blocked)?;
        let mem = &self.drv.mem;
        // A table freed under a live entry would be a use-after-free in hardware; the model
        // reports it as blocked and the checker as a device on no live domain.
        let dom = self
            .domains
            .iter_mut()
            .flatten()
            .find(|s| s.domain.pt.root() == root)
            .ok_or(DmaFault::Blocked)?;
        let t = dom
            .domain
            .pt
            .translate(mem, iova)
            .ok_or(DmaFault::NotMapped)?;
        let need = if write { vtd_bits::W } else { vtd_bits::R };
        if t.pte & need == 0 {
            return Err(DmaFault::Permission);
        }
        if write && dom.domain.dirty_enabled {
            dom.domain.dirty.insert(iova & !(PAGE - 1));
        }
        Ok(t.pa)
    }

    /// The table root requester ID `id` (`pasid`) translates through in the model's
    /// entries.
    pub fn entry(&self, id: u32, pasid: Option<u32>) -> Option<PhysAddr> {
        self.drv.entries.get(&(id, pasid)).copied()
    }

    /// Overwrites the model's entry for `id` (`pasid`) behind the object model's back (`None`:
    /// blocked), as a buggy driver or stray write would: for tests of the checker.
    pub fn corrupt_entry(&mut self, id: u32, pasid: Option<u32>, root: Option<PhysAddr>) {
        match root {
            Some(r) => self.drv.entries.insert((id, pasid), r),
            None => self.drv.entries.remove(&(id, pasid)),
        };
    }

    /// Table pages held by live domains (a leak check: the pool holds nothing else).
    pub fn domain_table_pages(&self) -> usize {
        self.domains
            .iter()
            .flatten()
            .map(|d| d.domain.pt.census(&self.drv.mem).table_pages())
            .sum()
    }
}

/// One region of a [`VecGuestMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub len: u64,
    /// Host-physical address of `gpa` (the region is host-contiguous).
    pub hpa: u64,
    pub writable: bool,
}

/// Guest memory over host memory: regions of guest-physical space (each host-contiguous),
/// contents kept sparsely per page (unwritten pages read as zero).
pub struct VecGuestMemory {
    regions: Vec<Region>,
    pages: RefCell<BTreeMap<u64, Vec<u8>>>,
}

impl VecGuestMemory {
    pub fn new(regions: &[Region]) -> Self {
        let mut regions = regions.to_vec();
        regions.sort_by_key(|r| r.gpa);
        VecGuestMemory {
            regions,
            pages: RefCell::new(BTreeMap::new()),
        }
    }

    /// The standard test guest: RAM at GPA `[0, 256 MiB)` made of two host runs (the second
    /// 128 MiB elsewhere in host memory), a 1 MiB read-only region at 1 GiB, a hole between.
    pub fn standard() -> Self {
        Self::new(&[
            Region {
                gpa: 0,
                len: 128 << 20,
                hpa: 0x1_0000_0000,
                writable: true,
            },
            Region {
                gpa: 128 << 20,
                len: 128 << 20,
                hpa: 0x3_0000_0000,
                writable: true,
            },
            Region {
                gpa: 1 << 30,
                len: 1 << 20,
                hpa: 0x5_0000_0000,
                writable: false,
            },
        ])
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    fn region(&self, gpa: u64) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
    }

    /// Host-physical address of `gpa`.
    pub fn hpa(&self, gpa: u64) -> Option<u64> {
        self.region(gpa).map(|r| r.hpa + (gpa - r.gpa))
    }
}

impl GuestMemory for VecGuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        if !self.owns(gpa, buf.len() as u64, false) {
            return Err(MemFault);
        }
        let pages = self.pages.borrow();
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa + i as u64;
            *b = pages
                .get(&(a & !(PAGE - 1)))
                .map_or(0, |p| p[(a & (PAGE - 1)) as usize]);
        }
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemFault> {
        if !self.owns(gpa, buf.len() as u64, true) {
            return Err(MemFault);
        }
        let mut pages = self.pages.borrow_mut();
        for (i, &b) in buf.iter().enumerate() {
            let a = gpa + i as u64;
            let p = pages
                .entry(a & !(PAGE - 1))
                .or_insert_with(|| vec![0; PAGE as usize]);
            p[(a & (PAGE - 1)) as usize] = b;
        }
        Ok(())
    }

    fn owns(&self, gpa: u64, len: u64, write: bool) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut cursor = gpa;
        for _ in 0..=self.regions.len() {
            if cursor >= end {
                return true;
            }
            match self.region(cursor) {
                Some(r) if r.writable || !write => cursor = r.gpa + r.len,
                _ => return false,
            }
        }
        cursor >= end
    }

    fn translate(&self, gpa: u64) -> Option<HostRun> {
        let r = self.region(gpa)?;
        Some(HostRun {
            hpa: r.hpa + (gpa - r.gpa),
            len: r.len - (gpa - r.gpa),
        })
    }

    /// `cursor`: the index of the region the last run was in. A walk upwards finds the next
    /// run there or in the next region (the regions are sorted); anything else searches.
    fn translate_next(&self, gpa: u64, cursor: &mut usize) -> Option<HostRun> {
        let hit = |i: usize| {
            self.regions
                .get(i)
                .filter(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
        };
        let i = [*cursor, *cursor + 1]
            .into_iter()
            .find(|&i| hit(i).is_some())
            .or_else(|| {
                let i = self
                    .regions
                    .partition_point(|r| r.gpa <= gpa)
                    .checked_sub(1)?;
                hit(i).map(|_| i)
            })?;
        *cursor = i;
        let r = &self.regions[i];
        Some(HostRun {
            hpa: r.hpa + (gpa - r.gpa),
            len: r.len - (gpa - r.gpa),
        })
    }
}

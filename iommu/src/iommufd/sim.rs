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
use core::cell::{Cell, RefCell};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::hw::{
    DomainConfig, DomainInfo, HwDev, HwDeviceInfo, HwDomain, HwError, HwReserved, HwTranslation,
    IommuHw, MAX_RESERVED_PER_DEVICE, Span,
};
use super::{FailNth, GuestMemory, HostRun, MemFault, PAGE};
use crate::pgtable::format::vtd_bits;
use crate::pgtable::{
    Config, Gather, MapError, PageTable, PhysAddr, Prot, TableMemory, VtdSecondStage,
};

/// Fake physical address of frame 0 of the table pool.
const POOL_BASE: u64 = 0x1000;

/// A pool of 4 KiB table pages at fake physical addresses.
pub struct SimMem {
    storage: Box<[AtomicU64]>,
    live: RefCell<Vec<bool>>,
    free: RefCell<Vec<u32>>,
    in_use: Cell<usize>,
    fail: Option<Arc<FailNth>>,
}

impl SimMem {
    pub fn new(frames: usize, fail: Option<Arc<FailNth>>) -> Self {
        SimMem {
            storage: (0..frames * 512).map(|_| AtomicU64::new(0)).collect(),
            live: RefCell::new(vec![false; frames]),
            free: RefCell::new((0..frames as u32).rev().collect()),
            in_use: Cell::new(0),
            fail,
        }
    }

    pub fn frames_in_use(&self) -> usize {
        self.in_use.get()
    }

    fn index(&self, pa: PhysAddr) -> Option<usize> {
        let i = (pa.checked_sub(POOL_BASE)? / 4096) as usize;
        (pa.is_multiple_of(4096) && i < self.live.borrow().len()).then_some(i)
    }

    fn release(&self, pa: PhysAddr) {
        if let Some(i) = self.index(pa) {
            let mut live = self.live.borrow_mut();
            if live[i] {
                live[i] = false;
                self.free.borrow_mut().push(i as u32);
                self.in_use.set(self.in_use.get() - 1);
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
        let i = self.free.borrow_mut().pop()? as usize;
        self.live.borrow_mut()[i] = true;
        self.in_use.set(self.in_use.get() + 1);
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
        }
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

struct SimDomain {
    pt: PageTable<VtdSecondStage<4>>,
    cfg: DomainConfig,
    unit: u32,
    aperture: Span,
    dirty_enabled: bool,
    dirty: BTreeSet<u64>,
}

/// A prepared switch.
#[derive(Debug)]
pub struct SimPrepared {
    dev: HwDev,
    pasid: Option<u32>,
    d: HwDomain,
}

/// Why an emulated DMA failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFault {
    /// The device (PASID) is blocked.
    Blocked,
    NotMapped,
    Permission,
}

/// The software IOMMU.
pub struct SimHw {
    mem: SimMem,
    devices: Vec<SimDevice>,
    domains: Vec<Option<SimDomain>>,
    attach: BTreeMap<(HwDev, Option<u32>), HwDomain>,
    fail: Option<Arc<FailNth>>,
    outstanding: u32,
    fail_prepare: Option<HwDev>,
    fault_commit: Option<HwDev>,
    /// Domains freed while a device still used them (an object-model bug).
    pub bad_frees: u32,
    pub commits: u64,
    pub aborts: u64,
}

impl SimHw {
    /// `devices` in that order (device `i` is `HwDev` `i`), `frames` table pages.
    pub fn new(devices: &[SimDevice], frames: usize, fail: Option<Arc<FailNth>>) -> Self {
        SimHw {
            mem: SimMem::new(frames, fail.clone()),
            devices: devices.to_vec(),
            domains: Vec::new(),
            attach: BTreeMap::new(),
            fail,
            outstanding: 0,
            fail_prepare: None,
            fault_commit: None,
            bad_frees: 0,
            commits: 0,
            aborts: 0,
        }
    }

    pub fn frames_in_use(&self) -> usize {
        self.mem.frames_in_use()
    }

    /// The next prepare for `dev` fails with `NoMemory`.
    pub fn fail_next_prepare(&mut self, dev: HwDev) {
        self.fail_prepare = Some(dev);
    }

    /// The next commit for `dev` switches and then reports a hardware fault.
    pub fn fault_next_commit(&mut self, dev: HwDev) {
        self.fault_commit = Some(dev);
    }

    fn hit(&self) -> bool {
        self.fail.as_ref().is_some_and(|f| f.hit())
    }

    fn dom(&self, d: HwDomain) -> Option<&SimDomain> {
        self.domains.get(d.0 as usize)?.as_ref()
    }

    fn dom_mut(&mut self, d: HwDomain) -> Option<&mut SimDomain> {
        self.domains.get_mut(d.0 as usize)?.as_mut()
    }

    /// Emulated DMA by `dev` (`pasid`) at `iova`: the physical address reached. A write to a
    /// domain tracking dirty pages marks the page dirty.
    pub fn dma(
        &mut self,
        dev: HwDev,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<u64, DmaFault> {
        let d = *self.attach.get(&(dev, pasid)).ok_or(DmaFault::Blocked)?;
        let mem = &self.mem;
        let dom = self
            .domains
            .get_mut(d.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(DmaFault::Blocked)?;
        let t = dom.pt.translate(mem, iova).ok_or(DmaFault::NotMapped)?;
        let need = if write { vtd_bits::W } else { vtd_bits::R };
        if t.pte & need == 0 {
            return Err(DmaFault::Permission);
        }
        if write && dom.dirty_enabled {
            dom.dirty.insert(iova & !(PAGE - 1));
        }
        Ok(t.pa)
    }

    fn check_compat(&self, dev: HwDev, d: HwDomain) -> Result<(), HwError> {
        let sd = self.devices.get(dev as usize).ok_or(HwError::Invalid)?;
        let dom = self.dom(d).ok_or(HwError::Invalid)?;
        if sd.unit != dom.unit {
            return Err(HwError::Incompatible);
        }
        if dom.cfg.enforce_cc && !sd.info.enforce_cc {
            return Err(HwError::NotCoherent);
        }
        if dom.cfg.dirty_tracking && !sd.info.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        Ok(())
    }
}

impl IommuHw for SimHw {
    type Prepared = SimPrepared;

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    fn device_info(&self, dev: HwDev) -> Option<HwDeviceInfo> {
        self.devices.get(dev as usize).map(|d| d.info)
    }

    fn domain_alloc(&mut self, dev: HwDev, cfg: DomainConfig) -> Result<HwDomain, HwError> {
        let sd = *self.devices.get(dev as usize).ok_or(HwError::Invalid)?;
        if cfg.enforce_cc && !sd.info.enforce_cc {
            return Err(HwError::NotCoherent);
        }
        if cfg.dirty_tracking && !sd.info.dirty_tracking {
            return Err(HwError::NoDirtyTracking);
        }
        if self.hit() {
            return Err(HwError::NoMemory);
        }
        let slot = match self.domains.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.domains.try_reserve(1).map_err(|_| HwError::NoMemory)?;
                self.domains.push(None);
                self.domains.len() - 1
            }
        };
        let pt_cfg = Config {
            leaf_sizes: 1 << 12 | 1 << 21 | 1 << 30,
            contiguous_hint: false,
            dirty_tracking: cfg.dirty_tracking,
            snoop_control: true,
            ..Config::new(sd.aperture_bits, 48)
        };
        let pt = PageTable::new(&self.mem, pt_cfg).map_err(|_| HwError::NoMemory)?;
        self.domains[slot] = Some(SimDomain {
            pt,
            cfg,
            unit: sd.unit,
            aperture: Span::new(0, (1u64 << sd.aperture_bits) - 1),
            dirty_enabled: false,
            dirty: BTreeSet::new(),
        });
        Ok(HwDomain(slot as u32))
    }

    fn domain_free(&mut self, d: HwDomain) {
        if self.attach.values().any(|&x| x == d) {
            self.bad_frees += 1;
        }
        if let Some(dom) = self.domains.get_mut(d.0 as usize).and_then(Option::take) {
            dom.pt.destroy(&self.mem);
        }
    }

    fn domain_info(&self, d: HwDomain) -> Option<DomainInfo> {
        let dom = self.dom(d)?;
        Some(DomainInfo {
            aperture: dom.aperture,
            page_sizes: dom.pt.leaf_sizes(),
        })
    }

    fn compatible(&self, dev: HwDev, d: HwDomain) -> Result<(), HwError> {
        self.check_compat(dev, d)
    }

    fn map(
        &mut self,
        d: HwDomain,
        iova: u64,
        pa: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), HwError> {
        let dom = self.dom(d).ok_or(HwError::Invalid)?;
        let prot = if dom.cfg.enforce_cc {
            prot | Prot::SNOOP
        } else {
            prot
        };
        dom.pt
            .map(&self.mem, iova, pa, len, prot)
            .map_err(|e| match e {
                MapError::NoMemory { .. } => HwError::NoMemory,
                _ => HwError::Invalid,
            })
    }

    fn unmap(&mut self, d: HwDomain, iova: u64, len: u64) -> Result<u64, HwError> {
        let dom = self.dom(d).ok_or(HwError::Invalid)?;
        let mut g = Gather::new();
        let r = dom.pt.unmap(&self.mem, iova, len, &mut g);
        g.complete(&self.mem);
        r.map_err(|_| HwError::Invalid)
    }

    fn prepare(
        &mut self,
        dev: HwDev,
        pasid: Option<u32>,
        d: HwDomain,
    ) -> Result<SimPrepared, HwError> {
        self.check_compat(dev, d)?;
        let sd = &self.devices[dev as usize];
        if let Some(p) = pasid {
            let bits = sd.info.pasid_bits.min(20);
            if bits == 0 {
                return Err(HwError::Unsupported);
            }
            if p == 0 || p >= 1 << bits {
                return Err(HwError::PasidOutOfRange);
            }
        }
        if self.fail_prepare == Some(dev) {
            self.fail_prepare = None;
            return Err(HwError::NoMemory);
        }
        // Models the context/PASID-table pages a real IOMMU may need.
        if self.hit() {
            return Err(HwError::NoMemory);
        }
        self.outstanding += 1;
        Ok(SimPrepared { dev, pasid, d })
    }

    fn commit(&mut self, p: SimPrepared) -> Result<(), HwError> {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.commits += 1;
        self.attach.insert((p.dev, p.pasid), p.d);
        if self.fault_commit == Some(p.dev) {
            self.fault_commit = None;
            return Err(HwError::Fault);
        }
        Ok(())
    }

    fn abort(&mut self, _p: SimPrepared) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.aborts += 1;
    }

    fn detach(&mut self, dev: HwDev, pasid: Option<u32>) -> Result<(), HwError> {
        self.attach.remove(&(dev, pasid));
        Ok(())
    }

    fn set_dirty_tracking(&mut self, d: HwDomain, enable: bool) -> Result<(), HwError> {
        let dom = self.dom_mut(d).ok_or(HwError::Invalid)?;
        if !dom.cfg.dirty_tracking {
            return Err(HwError::Unsupported);
        }
        dom.dirty.clear();
        dom.dirty_enabled = enable;
        Ok(())
    }

    fn read_dirty(
        &mut self,
        d: HwDomain,
        iova: u64,
        len: u64,
        clear: bool,
        report: &mut dyn FnMut(u64, u64),
    ) -> Result<(), HwError> {
        let dom = self.dom_mut(d).ok_or(HwError::Invalid)?;
        if !dom.cfg.dirty_tracking {
            return Err(HwError::Unsupported);
        }
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

    fn translate(&self, d: HwDomain, iova: u64) -> Option<HwTranslation> {
        let t = self.dom(d)?.pt.translate(&self.mem, iova)?;
        Some(HwTranslation {
            pa: t.pa,
            leaf: Span::new(t.leaf.start, t.leaf.end - 1),
            read: t.pte & vtd_bits::R != 0,
            write: t.pte & vtd_bits::W != 0,
            snoop: Some(t.pte & vtd_bits::SNP != 0),
        })
    }

    fn mapped_bytes(&self, d: HwDomain) -> u64 {
        self.dom(d)
            .map(|x| x.pt.census(&self.mem).mapped)
            .unwrap_or(0)
    }

    fn device_domain(&self, dev: HwDev, pasid: Option<u32>) -> Option<HwDomain> {
        self.attach.get(&(dev, pasid)).copied()
    }

    fn live_domains(&self) -> Option<u32> {
        Some(self.domains.iter().filter(|d| d.is_some()).count() as u32)
    }

    fn outstanding_prepared(&self) -> Option<u32> {
        Some(self.outstanding)
    }
}

impl SimHw {
    /// Every (device, PASID) with a domain.
    pub fn attachments(&self) -> impl Iterator<Item = (HwDev, Option<u32>, HwDomain)> + '_ {
        self.attach.iter().map(|(&(d, p), &x)| (d, p, x))
    }

    /// Table pages held by live domains (a leak check: the pool holds nothing else).
    pub fn domain_table_pages(&self) -> usize {
        self.domains
            .iter()
            .flatten()
            .map(|d| d.pt.census(&self.mem).table_pages())
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
}

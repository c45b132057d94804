//! The object model over the real VT-d driver (`VtdBackend`), against a minimal register model
//! (legacy mode, register-based invalidation, snoop control): what the hardware walks — root
//! and context entries, second-stage tables — is checked after attach, group replace, detach,
//! and under allocation-failure injection. The DMA flows' device walks those structures from
//! the root-table pointer the register model latched (legacy, and scalable on the driver
//! tests' register model), with hand-written VT-d layouts.

use std::boxed::Box;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::vec::Vec;

use hvabi::{HWPT_ENFORCE_CACHE_COHERENCY, errno};

use super::super::GuestMemory;
use super::super::check::{check, snapshot};
use super::super::client::Client;
use super::super::hw::IommuHw;
use super::super::selftest::{DmaEngine, FLOW_MEMORY, SliceMemory, dma_flow};
use super::super::sim::{SimMem, VecGuestMemory};
use super::super::vtd_backend::{VtdBackend, VtdDevice, device_info};
use super::super::{FailNth, GuestId, Iommufd, Limits};
use super::scatter::{MIXED, MIXED_LEN, SCATTERED, scattered_memory};
use super::{MB, PG, SCRATCH};
use crate::hw::Mmio;
use crate::pgtable::TableMemory;
use crate::vtd::{TranslationMode, UnitConfig, VtdUnit};

/// CAP: ND = 2 (256 domain ids), SAGAW = 4 levels, MGAW = 48, 2 MiB leaves.
const CAP: u64 = 2 | 1 << 10 | 47 << 16 | 1 << 34;
/// ECAP: coherent walks (C), snoop control (SC), IOTLB registers at 0x200, no QI.
const ECAP: u64 = 1 | 1 << 7 | 0x20 << 8;
const IOTLB_REG: usize = 0x208;

#[derive(Default)]
struct State {
    gsts: u32,
    regs: std::collections::BTreeMap<usize, u64>,
    /// RTADDR_REG as latched by the last SRTP: the root-table pointer the hardware walks.
    latched_rtaddr: Option<u64>,
}

/// Just enough of a VT-d unit for the driver: GCMD/GSTS handshakes complete at once, context
/// and IOTLB invalidations complete at once with the granularity requested.
#[derive(Clone, Default)]
struct MiniVtd(Rc<RefCell<State>>);

impl MiniVtd {
    /// The root-table pointer the unit translates with: RTADDR latched by SRTP, while
    /// GSTS.TES is set.
    fn translating_root(&self) -> Option<u64> {
        let s = self.0.borrow();
        if s.gsts & 1 << 31 == 0 {
            return None;
        }
        s.latched_rtaddr
    }
}

impl Mmio for MiniVtd {
    fn read32(&self, off: usize) -> u32 {
        match off {
            0x00 => 0x10,
            0x1c => self.0.borrow().gsts,
            _ => self.read64(off & !7) as u32,
        }
    }
    fn write32(&self, off: usize, v: u32) {
        if off == 0x18 {
            // Persistent commands (TE, QIE, IRE, CFI) show in GSTS; SRTP and SIRTP latch at
            // once; WBF completes at once.
            let persistent = v & (1 << 31 | 1 << 26 | 1 << 25 | 1 << 23);
            let latched = v & (1 << 30 | 1 << 24);
            let mut s = self.0.borrow_mut();
            if v & 1 << 30 != 0 {
                s.latched_rtaddr = Some(s.regs.get(&0x20).copied().unwrap_or(0));
            }
            s.gsts = persistent | latched;
        }
    }
    fn read64(&self, off: usize) -> u64 {
        match off {
            0x08 => CAP,
            0x10 => ECAP,
            _ => self.0.borrow().regs.get(&off).copied().unwrap_or(0),
        }
    }
    fn write64(&self, off: usize, v: u64) {
        let v = match off {
            // CCMD: ICC clears, CAIG = CIRG.
            0x28 if v >> 63 != 0 => (v & !(1 << 63)) | ((v >> 61) & 3) << 59,
            // IOTLB: IVT clears, IAIG = IIRG.
            IOTLB_REG if v >> 63 != 0 => (v & !(1 << 63)) | ((v >> 60) & 3) << 57,
            _ => v,
        };
        self.0.borrow_mut().regs.insert(off, v);
    }
}

type Backend = VtdBackend<'static, MiniVtd, SimMem>;

struct VEnv {
    fd: Iommufd<Backend>,
    mem: VecGuestMemory,
    g: GuestId,
    fail: Arc<FailNth>,
    /// The register model the unit drives (shared state).
    regs: MiniVtd,
    /// Table pages the unit itself holds (root table, context tables are counted live).
    base_frames: usize,
}

/// Requester IDs: 00:01.0 alone; 00:02.0 and 00:02.1 in one group; 00:03.0 alone and
/// (pretending) unable to enforce coherency.
const SIDS: [u16; 4] = [0x0008, 0x0010, 0x0011, 0x0018];

fn venv() -> VEnv {
    let fail = Arc::new(FailNth::new());
    // Leaked per test: the backend borrows its memory for the life of the object model.
    let mem: &'static SimMem = Box::leak(Box::new(SimMem::new(256, Some(fail.clone()))));
    let regs = MiniVtd::default();
    let mut unit =
        VtdUnit::new(regs.clone(), mem, UnitConfig::new(TranslationMode::Legacy)).unwrap();
    unit.enable_translation().unwrap();
    let groups = [1, 2, 2, 3];
    let devices: Vec<_> = SIDS
        .iter()
        .zip(groups)
        .map(|(&sid, g)| {
            let mut info = device_info(&unit, sid, g, 0);
            if sid == 0x0018 {
                info.enforce_cc = false;
            }
            VtdDevice { info, unit: 0, sid }
        })
        .collect();
    let base_frames = mem.frames_in_use();
    let backend = VtdBackend::new(std::vec![unit], mem, devices);
    let mut fd = Iommufd::new(backend, Limits::default()).unwrap();
    fd.set_fault_injector(Some(fail.clone()));
    let g = fd.create_guest().unwrap();
    for d in 0..4 {
        fd.assign_device(g, d).unwrap();
    }
    VEnv {
        fd,
        mem: VecGuestMemory::standard(),
        g,
        fail,
        regs,
        base_frames,
    }
}

impl VEnv {
    fn c(&mut self) -> Client<'_, Backend> {
        Client::new(&mut self.fd, self.g, &self.mem, SCRATCH)
    }
    fn id(&mut self, hw: u32) -> u32 {
        self.fd.device_id(self.g, hw).unwrap()
    }
    fn check(&self) {
        check(&self.fd, &[(self.g, &self.mem)]).unwrap();
    }
    /// The context entry of `sid` as the hardware finds it from the root-table pointer it
    /// latched: (SLPTPTR, DID), if present.
    fn context(&mut self, sid: u16) -> Option<(u64, u16)> {
        let word = sim_word(self.fd.hw().mem());
        let root = self.regs.translating_root().expect("translation enabled") & !0xfff;
        let re = word(root + (sid >> 8) as u64 * 16);
        if re & 1 == 0 {
            return None;
        }
        let ce = (re & !0xfff) + (sid & 0xff) as u64 * 16;
        let (lo, hi) = (word(ce), word(ce + 8));
        (lo & 1 != 0).then_some((lo & 0x000f_ffff_ffff_f000, (hi >> 8) as u16))
    }
    /// The (root, DID) of HWPT `h`'s domain.
    fn hwpt_root(&mut self, h: u32) -> (u64, u16) {
        let d = self.fd.hwpt_domain(self.g, h).unwrap();
        let dom = self.fd.hw().domain(d).unwrap();
        (dom.root(), dom.did())
    }
}

#[test]
fn vtd_attach_map_replace_detach() {
    let mut env = venv();
    let (a, d1, d2, nc) = (env.id(0), env.id(1), env.id(2), env.id(3));
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, 4 * PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, 64 * PG, 4 * PG).unwrap();
    // Coherent HWPT for the coherent device; the "non-coherent" one gets its own.
    let ha = c.attach(a, ioas).unwrap();
    let hn = c.attach(nc, ioas).unwrap();
    assert_ne!(ha, hn);
    assert_eq!(
        c.hwpt_alloc(nc, ioas, HWPT_ENFORCE_CACHE_COHERENCY),
        Err(errno::EMEDIUMTYPE)
    );
    // The two-function group: one attach, both context entries.
    let hg = c.attach(d1, ioas).unwrap();
    assert_eq!(hg, ha);
    env.check();
    let want = env.hwpt_root(ha);
    for sid in [0x0008, 0x0010, 0x0011] {
        assert_eq!(env.context(sid), Some(want), "sid {sid:#x}");
    }
    assert_eq!(env.context(0x0018), Some(env.hwpt_root(hn)));
    // Leaves carry SNP in the coherent domain only (legacy snoop control).
    let dom = env.fd.hwpt_domain(env.g, ha).unwrap();
    assert_eq!(
        env.fd.hw().translate(dom, 0x10_0000).unwrap().snoop,
        Some(true)
    );
    let dom = env.fd.hwpt_domain(env.g, hn).unwrap();
    assert_eq!(
        env.fd.hw().translate(dom, 0x10_0000).unwrap().snoop,
        Some(false)
    );
    // Group replace by the member that did not attach first: both functions switch.
    env.c().attach(d2, ioas).unwrap();
    let h2 = env.c().replace(d2, ioas2).unwrap();
    env.check();
    let want2 = env.hwpt_root(h2);
    assert_eq!(env.context(0x0010), Some(want2));
    assert_eq!(env.context(0x0011), Some(want2));
    assert_eq!(env.context(0x0008), Some(want));
    // Injected failure during a group replace to a new IOAS: nothing moves.
    let ioas3 = env.c().ioas_alloc().unwrap();
    env.c().map_fixed(ioas3, 0x10_0000, 0, 4 * PG).unwrap();
    let snap = snapshot(&env.fd);
    env.fail.arm(1);
    assert_eq!(env.c().replace(d1, ioas3), Err(errno::ENOMEM));
    env.fail.disarm();
    assert_eq!(snapshot(&env.fd), snap);
    assert_eq!(env.context(0x0010), Some(want2));
    // Detach: the last attached member blocks both functions.
    env.c().detach(d1).unwrap();
    assert_eq!(env.context(0x0011), Some(want2));
    env.c().detach(d2).unwrap();
    assert_eq!(env.context(0x0010), None);
    assert_eq!(env.context(0x0011), None);
    env.check();
    let base = env.base_frames;
    env.fd.destroy_guest(env.g).unwrap();
    assert_eq!(env.context(0x0008), None);
    assert_eq!(env.fd.hw().live_domains(), Some(0));
    // What is left are the unit's root table and the context table of bus 0.
    assert_eq!(env.fd.hw().mem().frames_in_use(), base + 1);
}

#[test]
fn vtd_fail_nth() {
    // Every allocation of attach (domain, page tables, context table), map and replace, failed
    // in turn, over the real driver.
    let mut total = 0;
    for step in 0..4 {
        for n in 1.. {
            let mut env = venv();
            let (a, d1) = (env.id(0), env.id(1));
            let ioas = env.c().ioas_alloc().unwrap();
            let ioas2 = env.c().ioas_alloc().unwrap();
            env.c().map_fixed(ioas2, 0x40_0000, 0, 2 << 20).unwrap();
            if step > 0 {
                env.c().attach(a, ioas).unwrap();
            }
            if step > 1 {
                env.c().map_fixed(ioas, 0x10_0000, 0, 16 * PG).unwrap();
                env.c().attach(d1, ioas).unwrap();
            }
            let src = env_hwpt(&mut env, ioas);
            let snap = snapshot(&env.fd);
            env.fail.arm(n);
            let r = match step {
                0 => env.c().attach(a, ioas).map(|_| ()),
                1 => env
                    .c()
                    .map_fixed(ioas, 0x7fff_0000_0000, 0, 2 << 20)
                    .map(|_| ()),
                2 => env.c().replace(d1, ioas2).map(|_| ()),
                _ => env.c().hwpt_clone(src, a, 0).map(|_| ()),
            };
            env.fail.disarm();
            env.check();
            if !env.fail.fired() {
                r.unwrap();
                break;
            }
            assert_eq!(r, Err(errno::ENOMEM), "step {step} n {n}");
            assert_eq!(snapshot(&env.fd), snap, "step {step} n {n}");
            total += 1;
        }
    }
    assert!(total >= 4);
}

fn env_hwpt(env: &mut VEnv, ioas: u32) -> u32 {
    let a = env.id(0);
    env.c()
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.dev_id == a)
        .map(|d| d.attached_hwpt)
        .filter(|&h| h != 0)
        .unwrap_or(ioas)
}

/// A 64-bit word of the table pool, read as the remapping hardware reads memory.
fn sim_word(mem: &SimMem) -> impl Fn(u64) -> u64 + '_ {
    |pa: u64| mem.table(pa & !0xfff, 512)[((pa & 0xfff) / 8) as usize].load(Relaxed)
}

/// Bits 51:12 of a table pointer or an entry's output address.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Second-stage levels for an address-width field (AW of a legacy context entry, VT-d 4.1
/// §9.3; of a scalable-mode PASID entry, §9.6): 001b 39-bit, 010b 48-bit, 011b 57-bit.
fn aw_levels(aw: u64) -> Result<u32, &'static str> {
    match aw {
        1 => Ok(3),
        2 => Ok(4),
        3 => Ok(5),
        _ => Err("reserved AW"),
    }
}

/// Where a DMA without PASID of requester `sid` at `iova` lands, walked as the remapping
/// hardware walks it from the root-table pointer it latched (`rtaddr`: RTADDR_REG, TTM in bits
/// 11:10). Legacy (TTM 00b): root entry → context entry → second-stage tables (§3.4.2, §9.1,
/// §9.3). Scalable (TTM 01b): scalable root entry (lower or upper context table by devfn) →
/// scalable context entry → PASID directory → PASID table, at the context entry's RID_PASID
/// → second-stage tables (§3.4.3, §9.2, §9.4-§9.6). Second-stage entries per §9.8: R (bit
/// 0) and W (bit 1) at every level, PS (bit 7) ends the walk at a 2 MiB or 1 GiB leaf.
/// Hand-written layouts; nothing from the driver.
fn vtd_walk(
    word: &dyn Fn(u64) -> u64,
    rtaddr: u64,
    sid: u16,
    iova: u64,
    write: bool,
) -> Result<u64, &'static str> {
    let (bus, devfn) = ((sid >> 8) as u64, (sid & 0xff) as u64);
    let root = rtaddr & ADDR;
    let (mut table, levels) = match (rtaddr >> 10) & 3 {
        0 => {
            let re = word(root + bus * 16);
            if re & 1 == 0 {
                return Err("root entry not present");
            }
            let ce = (re & ADDR) + devfn * 16;
            let (lo, hi) = (word(ce), word(ce + 8));
            if lo & 1 == 0 {
                return Err("context entry not present");
            }
            match (lo >> 2) & 3 {
                0 | 1 => {}
                2 => return Err("pass-through context entry"),
                _ => return Err("reserved TT"),
            }
            (lo & ADDR, aw_levels(hi & 7)?)
        }
        1 => {
            let half = if devfn >= 128 { 8 } else { 0 };
            let re = word(root + bus * 16 + half);
            if re & 1 == 0 {
                return Err("scalable root entry: context table not present");
            }
            let ce = (re & ADDR) + (devfn & 0x7f) * 32;
            let (q0, q1) = (word(ce), word(ce + 8));
            if q0 & 1 == 0 {
                return Err("scalable context entry not present");
            }
            let pasid = q1 & 0xf_ffff;
            let pdts = (q0 >> 9) & 7;
            if pasid >> 6 >= 1 << (pdts + 7) {
                return Err("RID_PASID beyond the PASID directory");
            }
            let de = word((q0 & ADDR) + (pasid >> 6) * 8);
            if de & 1 == 0 {
                return Err("PASID directory entry not present");
            }
            let pe = word((de & ADDR) + (pasid & 0x3f) * 64);
            if pe & 1 == 0 {
                return Err("PASID entry not present");
            }
            if (pe >> 6) & 7 != 2 {
                return Err("PASID entry is not second-stage only (PGTT)");
            }
            (pe & ADDR, aw_levels((pe >> 2) & 7)?)
        }
        _ => return Err("reserved TTM"),
    };
    let bits = 12 + 9 * levels;
    if iova >> bits != 0 {
        return Err("input address beyond the AGAW");
    }
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = word(table + ((iova >> shift) & 511) * 8);
        if e & 3 == 0 {
            return Err("second-stage entry not present");
        }
        if e & if write { 2 } else { 1 } == 0 {
            return Err("permission fault");
        }
        if level == 1 || e & 1 << 7 != 0 {
            let size = 1u64 << shift;
            return Ok((e & ADDR & !(size - 1)) | (iova & (size - 1)));
        }
        table = e & ADDR;
    }
    Err("no leaf")
}

/// The flow's device: DMA of requester `sid` through the tables the VT-d unit walks, from
/// the root-table pointer the register model latched (`root`, `None` when translation is
/// off) over the memory `word` reads.
struct TableWalker<'a> {
    word: &'a dyn Fn(u64) -> u64,
    root: &'a dyn Fn() -> Option<u64>,
    mem: &'a SliceMemory<'a>,
    sid: u16,
    buf: [u8; PG as usize],
}

impl TableWalker<'_> {
    fn dma(&mut self, iova: u64, len: usize, write: bool) -> Result<(), &'static str> {
        let root = (self.root)().ok_or("translation disabled")?;
        for off in (0..len as u64).step_by(PG as usize) {
            let pa = vtd_walk(self.word, root, self.sid, iova + off, write)?;
            let n = (len as u64 - off).min(PG - (pa & (PG - 1))) as usize;
            let o = off as usize;
            let r = if write {
                self.mem.write_hpa(pa, &self.buf[o..o + n])
            } else {
                self.mem.read_hpa(pa, &mut self.buf[o..o + n])
            };
            r.map_err(|_| "DMA outside the buffer")?;
        }
        Ok(())
    }
}

impl<H: IommuHw> DmaEngine<H> for TableWalker<'_> {
    fn memory_to_device(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
        self.dma(iova, len, false)
    }
    fn device_to_memory(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
        self.dma(iova, len, true)
    }
}

#[test]
fn vtd_dma_flow() {
    let mut env = venv();
    let bytes = Box::leak(std::vec![0u8; FLOW_MEMORY as usize].into_boxed_slice());
    let mem = SliceMemory::new(0x2000_0000, 0x2000_0000, bytes);
    let pool: &'static SimMem = env.fd.hw().mem();
    let word = sim_word(pool);
    let regs = env.regs.clone();
    let root = move || regs.translating_root();
    let mut dma = TableWalker {
        word: &word,
        root: &root,
        mem: &mem,
        sid: 0x0008,
        buf: [0; PG as usize],
    };
    let mut lines = 0;
    dma_flow(&mut env.fd, env.g, &mem, 0x0008, &mut dma, &mut |_| {
        lines += 1
    })
    .unwrap();
    assert_eq!(lines, 5);
    env.check();
    // Detached: the context entry is gone, the walk faults.
    assert_eq!(
        vtd_walk(&word, root().unwrap(), 0x0008, 0x10_0000, false),
        Err("context entry not present")
    );
    // A device of the two-function group: the flow moves both functions; DMA by the
    // function the flow did not name goes through the same tables.
    let mut dma = TableWalker { sid: 0x0011, ..dma };
    dma_flow(&mut env.fd, env.g, &mem, 0x0011, &mut dma, &mut |_| {}).unwrap();
    env.check();
    assert_eq!(env.fd.hw().live_domains(), Some(0));
}

/// The same flow on a scalable-mode unit (the register model of the VT-d driver's tests, with
/// QEMU's `x-scalable-mode=on` CAP/ECAP and queued invalidation): the walk goes through the
/// scalable context entry, the PASID directory and the RID_PASID entry.
#[test]
fn vtd_scalable_dma_flow() {
    use crate::vtd::fake::{FakeMem, FakeVtd};
    /// QEMU intel-iommu, `x-scalable-mode=on`: CAP and ECAP as the device model reports them.
    const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
    const QEMU_ECAP_SM: u64 = 0x4800_80f0_0f4a;
    let pool = FakeMem::new(512);
    let regs = FakeVtd::new(&pool, QEMU_CAP, QEMU_ECAP_SM);
    let cfg = UnitConfig {
        poll_budget: 1000,
        ..UnitConfig::new(TranslationMode::Scalable)
    };
    let mut unit = VtdUnit::new(&regs, &pool, cfg).unwrap();
    unit.enable_translation().unwrap();
    let sid = 0x0018;
    let info = device_info(&unit, sid, 1, 0);
    let backend = VtdBackend::new(
        std::vec![unit],
        &pool,
        std::vec![VtdDevice { info, unit: 0, sid }],
    );
    let mut fd = Iommufd::new(backend, Limits::default()).unwrap();
    let g = fd.create_guest().unwrap();
    fd.assign_device(g, 0).unwrap();
    let bytes = Box::leak(std::vec![0u8; FLOW_MEMORY as usize].into_boxed_slice());
    let mem = SliceMemory::new(0x2000_0000, 0x2000_0000, bytes);
    let word = |pa: u64| pool.read(pa);
    let root = || {
        let s = regs.s.borrow();
        (s.gsts & 1 << 31 != 0)
            .then_some(s.latched_rtaddr)
            .flatten()
    };
    assert_eq!((root().unwrap() >> 10) & 3, 1, "scalable-mode root table");
    let mut dma = TableWalker {
        word: &word,
        root: &root,
        mem: &mem,
        sid,
        buf: [0; PG as usize],
    };
    dma_flow(&mut fd, g, &mem, sid as u64, &mut dma, &mut |_| {}).unwrap();
    check(&fd, &[(g, &mem)]).unwrap();
    assert_eq!(
        vtd_walk(&word, root().unwrap(), sid, 0x10_0000, false),
        Err("PASID entry not present")
    );
    fd.destroy_guest(g).unwrap();
    assert_eq!(fd.hw().live_domains(), Some(0));
}

/// The consistency checker reads a device's translation from the unit's structures, not from
/// the backend's record: a context entry cleared behind the object model's back is a
/// violation (the backend's record still says attached).
#[test]
fn vtd_checker_reads_the_context_entries() {
    let mut env = venv();
    let a = env.id(0);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.attach(a, ioas).unwrap();
    env.check();
    let mem = env.fd.hw().mem();
    env.fd.hw_mut().units_mut()[0]
        .detach(mem, 0x0008, None)
        .unwrap();
    assert_eq!(
        env.fd.hw().attachments().count(),
        1,
        "the record is unchanged"
    );
    let v = check(&env.fd, &[(env.g, &env.mem)]).unwrap_err();
    assert_eq!(v.what, "member not on the group's domain");
    assert_eq!(env.fd.hw().device_domain(0, None), None);
    env.fd.destroy_guest(env.g).unwrap();
}

/// A device with a DMA alias (here 00:01.0 also seen as 00:1e.0, a bridge's requester ID) on
/// the real driver: attach, replace and detach program both context entries, and the flow's
/// DMA under the alias walks the same tables.
#[test]
fn vtd_alias_programs_every_requester_id() {
    use super::super::backend::{BackendDevice, Ids};
    let mem: &'static SimMem = Box::leak(Box::new(SimMem::new(256, None)));
    let regs = MiniVtd::default();
    let mut unit =
        VtdUnit::new(regs.clone(), mem, UnitConfig::new(TranslationMode::Legacy)).unwrap();
    unit.enable_translation().unwrap();
    let mut ids = Ids::one(0x0008);
    ids.push(0x00f0).unwrap();
    let dev = BackendDevice {
        info: device_info(&unit, 0x0008, 1, 0),
        unit: 0,
        ids,
    };
    let mut fd = Iommufd::new(
        VtdBackend::new(std::vec![unit], mem, std::vec![dev]),
        Limits::default(),
    )
    .unwrap();
    let g = fd.create_guest().unwrap();
    let id = fd.assign_device(g, 0).unwrap();
    let gm = VecGuestMemory::standard();
    let word = sim_word(mem);
    let root = || regs.translating_root().unwrap();
    let mut c = Client::new(&mut fd, g, &gm, SCRATCH);
    let ioas = c.ioas_alloc().unwrap();
    let ioas2 = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, PG).unwrap();
    c.map_fixed(ioas2, 0x10_0000, 8 * PG, PG).unwrap();
    c.attach(id, ioas).unwrap();
    for sid in [0x0008, 0x00f0] {
        assert_eq!(
            vtd_walk(&word, root(), sid, 0x10_0000, true),
            Ok(gm.hpa(0).unwrap()),
            "sid {sid:#x}"
        );
    }
    check(&fd, &[(g, &gm)]).unwrap();
    Client::new(&mut fd, g, &gm, SCRATCH)
        .replace(id, ioas2)
        .unwrap();
    for sid in [0x0008, 0x00f0] {
        assert_eq!(
            vtd_walk(&word, root(), sid, 0x10_0000, false),
            Ok(gm.hpa(8 * PG).unwrap())
        );
    }
    Client::new(&mut fd, g, &gm, SCRATCH).detach(id).unwrap();
    for sid in [0x0008, 0x00f0] {
        assert_eq!(
            vtd_walk(&word, root(), sid, 0x10_0000, false),
            Err("context entry not present")
        );
    }
    check(&fd, &[(g, &gm)]).unwrap();
    fd.destroy_guest(g).unwrap();
    assert_eq!(fd.hw().live_domains(), Some(0));
}

/// Guest memory whose host pages are scattered (`tests/scatter.rs`), mapped through the VT-d
/// driver: every page reaches the guest memory's own translation by the hand-written walk from
/// the latched root-table pointer; every table allocation failed in turn leaves the range
/// unreachable and the checker satisfied.
#[test]
fn vtd_maps_scattered_host_pages() {
    let mut env = venv();
    env.mem = scattered_memory(None);
    let a = env.id(0);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.attach(a, ioas).unwrap();
    let (iova, iova2) = (0x4000_0000, 0x8000_0000 - 2 * MB);
    c.map_fixed(ioas, iova, SCATTERED, MB).unwrap();
    c.map_fixed(ioas, iova2 - PG, 0, PG).unwrap();
    let rt = env.regs.translating_root().unwrap();
    let reach = |env: &mut VEnv, iova: u64| {
        let word = sim_word(env.fd.hw().mem());
        vtd_walk(&word, rt, SIDS[0], iova, true).ok()
    };
    for k in 0..MB / PG {
        let want = env.mem.translate(SCATTERED + k * PG).map(|r| r.hpa);
        assert_eq!(reach(&mut env, iova + k * PG), want, "page {k}");
    }
    env.check();
    let mut n = 1;
    loop {
        env.fail.arm(n);
        let r = env.c().map_fixed(ioas, iova2, MIXED, MIXED_LEN);
        let fired = env.fail.fired();
        env.fail.disarm();
        if !fired {
            r.unwrap();
            break;
        }
        assert_eq!(r, Err(errno::ENOMEM), "failure {n}");
        for k in 0..MIXED_LEN / PG {
            assert_eq!(
                reach(&mut env, iova2 + k * PG),
                None,
                "failure {n}, page {k}"
            );
        }
        env.check();
        n += 1;
    }
    assert!(n > 2, "the map allocated tables ({n})");
    for k in 0..MIXED_LEN / PG {
        let want = env.mem.translate(MIXED + k * PG).map(|r| r.hpa);
        assert_eq!(reach(&mut env, iova2 + k * PG), want, "page {k}");
    }
    env.check();
    let mut c = env.c();
    assert_eq!(c.unmap(ioas, iova2, MIXED_LEN), Ok(MIXED_LEN));
    assert_eq!(c.unmap(ioas, iova, MB), Ok(MB));
    assert_eq!(reach(&mut env, iova), None);
}

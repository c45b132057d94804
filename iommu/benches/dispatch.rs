//! Host benchmark of the hypercall entry itself:
//! `cargo bench -p iommu --features testing --bench dispatch` (what `cargo xtask bench dispatch`
//! runs, adding instruction counts under callgrind). The `testing` feature is needed for the
//! test support it uses (`SimMem`); `[[bench]] required-features` names it.
//!
//! Every call goes through `iommufd::dispatch` as a guest's hypercall does: the argument
//! struct (and a batch's entry array) is written into the calling vCPU's argument window in
//! guest memory and `dispatch` gets its guest-physical address. Underneath is the real VT-d
//! backend (`VtdBackend`: the VT-d driver, its second-stage page tables in a `SimMem` pool)
//! driving [`FakeVtd`], a register model written for this bench: GCMD/GSTS handshakes, a
//! latched root-table pointer, and queued invalidation that executes the descriptors at every
//! IQT write (VT-d 4.1 §6.5.2: a wait descriptor's status write, IQH moved to the tail). So every
//! map writes hardware page tables and every unmap ends in an invalidation round.
//!
//! The bench checks what it measures, independently of the driver's bookkeeping: every call's
//! return code (and an unmap's `length` out, a batch's `out_done`); after each timed block every IOVA it mapped is
//! translated by the fake's own walk (root table latched by SRTP → root entry → context entry →
//! four levels of second-stage entries, hand-decoded VT-d 4.1 §9.1, §9.3, §9.8 layouts) to the
//! expected host address, and after the unmaps not at all; the fake counts the IQT writes
//! (rounds) and the descriptors it executed, and each map must make no round and each unmap call
//! exactly one with one wait (one unit). A first untimed pass also checks that each unmap's IOTLB
//! invalidations cover the unmapped range, with the domain id of the device's context entry.
//!
//! Rows (one guest, one vCPU, edu-like device 00:01.0 attached to the IOAS):
//! * `null`: an unknown op (ENOTTY), the null hypercall;
//! * `4k`: IOAS_MAP of one page at a fixed IOVA (64 slots per block), IOAS_UNMAP of it;
//! * `256x4k-contiguous`: one IOAS_MAP of 1 MiB of contiguous guest pages, one IOAS_UNMAP;
//! * `256x4k-scattered`: four IOAS_MAP_BATCH of 64 entries (`MAX_BATCH`), every other guest page
//!   to consecutive IOVAs, then one IOAS_UNMAP of the 1 MiB;
//! * `1m-host-scattered`: one IOAS_MAP of 1 MiB of contiguous guest pages whose host pages are
//!   scattered (256 host runs of one page, none adjacent, in descending order: see `BenchMem`),
//!   one IOAS_UNMAP; the Linux peer's row (b);
//! * `2m`: IOAS_MAP of a 2 MiB-aligned guest range at a 2 MiB-aligned IOVA (one 2 MiB leaf,
//!   checked by the walk), IOAS_UNMAP.
//!
//! Scaling rows: pairs (map + unmap) per microsecond of 1 thread vs 2, medians of alternating
//! rounds: two vCPUs of one guest on disjoint IOVA ranges of one IOAS; two guests (each its own
//! IOAS and device, one VT-d unit); and as the peer, in the same run on the same threads, the
//! page-table engine's own `map`/`unmap` + `Gather::complete` on disjoint ranges of one table.
//! With each thread's CPU time, to tell a busy host (the threads took turns) from contention
//! (a pair costs more CPU time with two threads).
//!
//! Environment / arguments: `--quick` (or `DISPATCH_BENCH_QUICK=1`) runs fewer rounds;
//! `DISPATCH_BENCH_ONLY=<row>` runs one row in a loop with every `dispatch` inside
//! `cg_dispatch` (`DISPATCH_BENCH_ROUNDS` rounds, default 20) and prints `callgrind: ROW N units,
//! ...` (for `valgrind --tool=callgrind
//! --toggle-collect='*cg_dispatch*'`, see docs/perf.md).
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Instant;

use hvabi::{
    AbiStruct, DeviceAttach, IoasAlloc, IoasMap, IoasMapBatch, IoasUnmap, MAP_FIXED_IOVA,
    MAP_READABLE, MAP_WRITEABLE, MapEntry, errno, op,
};
use iommu::hw::Mmio;
use iommu::iommufd::sim::SimMem;
use iommu::iommufd::vtd_backend::{VtdBackend, VtdDevice, device_info};
use iommu::iommufd::{GuestId, GuestMemory, HostRun, Iommufd, Limits, MemFault, dispatch};
use iommu::pgtable::{Config, Gather, PageTable, Prot, TableMemory, VtdSecondStage};
use iommu::vtd::{TranslationMode, UnitConfig, VtdUnit};

const K4: u64 = 4 << 10;
const M1: u64 = 1 << 20;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const RW: u32 = MAP_READABLE | MAP_WRITEABLE;

// ------------------------------------------------------------------------------------------
// The VT-d register model
// ------------------------------------------------------------------------------------------

/// Register offsets (VT-d 4.1 §11.4).
mod reg {
    pub const VER: usize = 0x00;
    pub const CAP: usize = 0x08;
    pub const ECAP: usize = 0x10;
    pub const GCMD: usize = 0x18;
    pub const GSTS: usize = 0x1c;
    pub const RTADDR: usize = 0x20;
    pub const CCMD: usize = 0x28;
    pub const IQH: usize = 0x80;
    pub const IQT: usize = 0x88;
    pub const IQA: usize = 0x90;
    /// IOTLB_REG at ECAP.IRO * 16 + 8 (IRO = 0x20 below).
    pub const IOTLB: usize = 0x208;
}

/// CAP (§11.4.2): ND = 2 (256 domain ids, bits 2:0), RWBF = 0, SAGAW = 4-level (bit 10),
/// MGAW = 47 (bits 21:16), FRO = 0x30 (fault records at 0x300, bits 33:24), SLLPS = 2 MiB
/// (bit 34), PSI (bit 39), NFR = 0 (one record), MAMV = 9 (bits 53:48).
const CAP: u64 = 2 | 1 << 10 | 47 << 16 | 0x30 << 24 | 1 << 34 | 1 << 39 | 9 << 48;
/// ECAP (§11.4.3): C (coherent walks, bit 0), QI (bit 1), SC (snoop control, bit 7),
/// IRO = 0x20 (bits 17:8).
const ECAP: u64 = 1 | 1 << 1 | 1 << 7 | 0x20 << 8;

/// GCMD/GSTS bits (§11.4.4, §11.4.5).
const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;
const CFI: u32 = 1 << 23;

/// What the model executed from the invalidation queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QiCounts {
    /// IQT writes that moved the tail (one per invalidation round).
    rounds: u64,
    /// IOTLB invalidations: page-selective, domain-selective, global.
    psi: u64,
    dsi: u64,
    global: u64,
    /// Wait descriptors with a status write.
    waits: u64,
    /// Any other descriptor type.
    other: u64,
}

/// An IOTLB invalidation the model executed: domain id (`None`: global) and
/// `[addr, addr + 4 KiB << am)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Psi {
    did: Option<u16>,
    addr: u64,
    am: u32,
}

/// Just enough of a VT-d unit for the driver in legacy mode with queued invalidation, safe to
/// share between threads (the driver serialises its queue with its own lock; the model's state
/// is atomics).
struct FakeVtd {
    mem: &'static SimMem,
    /// The register file as 32-bit words (1 KiB: up to the fault records at 0x300).
    regs: Box<[AtomicU32]>,
    /// RTADDR as latched by the last SRTP: the root table the hardware walks.
    root: AtomicU64,
    rounds: AtomicU64,
    psi: AtomicU64,
    dsi: AtomicU64,
    global: AtomicU64,
    waits: AtomicU64,
    other: AtomicU64,
    /// When set, IOTLB invalidations are recorded in `psis` (the untimed check pass).
    record: std::sync::atomic::AtomicBool,
    psis: std::sync::Mutex<Vec<Psi>>,
}

impl FakeVtd {
    fn new(mem: &'static SimMem) -> Self {
        let f = FakeVtd {
            mem,
            regs: (0..256).map(|_| AtomicU32::new(0)).collect(),
            root: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            psi: AtomicU64::new(0),
            dsi: AtomicU64::new(0),
            global: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            other: AtomicU64::new(0),
            record: std::sync::atomic::AtomicBool::new(false),
            psis: std::sync::Mutex::new(Vec::new()),
        };
        f.set64(reg::CAP, CAP);
        f.set64(reg::ECAP, ECAP);
        f.regs[reg::VER / 4].store(0x10, Relaxed);
        f
    }

    fn get64(&self, off: usize) -> u64 {
        let lo = self.regs[off / 4].load(SeqCst) as u64;
        let hi = self.regs[off / 4 + 1].load(SeqCst) as u64;
        lo | hi << 32
    }

    fn set64(&self, off: usize, v: u64) {
        self.regs[off / 4].store(v as u32, SeqCst);
        self.regs[off / 4 + 1].store((v >> 32) as u32, SeqCst);
    }

    fn counts(&self) -> QiCounts {
        QiCounts {
            rounds: self.rounds.load(SeqCst),
            psi: self.psi.load(SeqCst),
            dsi: self.dsi.load(SeqCst),
            global: self.global.load(SeqCst),
            waits: self.waits.load(SeqCst),
            other: self.other.load(SeqCst),
        }
    }

    fn word(&self, pa: u64) -> &AtomicU64 {
        &self.mem.table(pa & !0xfff, 512)[((pa & 0xfff) / 8) as usize]
    }

    /// Executes the descriptors from IQH up to the new tail (128-bit descriptors, IQA.DW = 0;
    /// the queue is 256 << IQA.QS entries at IQA bits 63:12), VT-d 4.1 §6.5.2.
    fn run_queue(&self, new_tail: u64) {
        let iqa = self.get64(reg::IQA);
        let base = iqa & !0xfff;
        let entries = 256u64 << (iqa & 7);
        let mut head = (self.get64(reg::IQH) >> 4) & 0x7fff;
        let tail = (new_tail >> 4) & 0x7fff;
        if head == tail {
            return;
        }
        self.rounds.fetch_add(1, SeqCst);
        while head != tail {
            let lo = self.word(base + head * 16).load(SeqCst);
            let hi = self.word(base + head * 16 + 8).load(SeqCst);
            // Type: bits 3:0, extended by bits 11:9 (§6.5.2).
            match (lo & 0xf) | ((lo >> 9) & 7) << 4 {
                // IOTLB invalidate (§6.5.2.3): G in bits 5:4, DID 31:16; ADDR hi 63:12, AM hi 5:0.
                2 => {
                    let g = (lo >> 4) & 3;
                    let counter = match g {
                        1 => &self.global,
                        2 => &self.dsi,
                        _ => &self.psi,
                    };
                    counter.fetch_add(1, SeqCst);
                    if self.record.load(SeqCst) {
                        // A domain-selective one covers the whole domain, a global one every
                        // domain: recorded as a span of 2^52 pages.
                        let (addr, am) = if g == 3 {
                            (hi & !0xfff, (hi & 0x3f) as u32)
                        } else {
                            (0, 52)
                        };
                        let did = if g == 1 {
                            None
                        } else {
                            Some((lo >> 16) as u16)
                        };
                        self.psis.lock().unwrap().push(Psi { did, addr, am });
                    }
                }
                // Wait (§6.5.2.8): SW (bit 5) writes the status data (63:32) to the dword at
                // hi 63:2.
                5 => {
                    if lo & 1 << 5 != 0 {
                        let at = hi & !3;
                        let data = lo >> 32;
                        let w = self.word(at & !7);
                        let shift = (at & 4) * 8;
                        let _ = w.fetch_update(SeqCst, SeqCst, |old| {
                            Some(old & !(0xffff_ffff << shift) | data << shift)
                        });
                        self.waits.fetch_add(1, SeqCst);
                    }
                }
                _ => _ = self.other.fetch_add(1, SeqCst),
            }
            head = (head + 1) % entries;
        }
        self.set64(reg::IQH, head << 4);
    }

    /// The domain id of `sid`'s context entry (hi bits 23:8, VT-d 4.1 §9.3), if present.
    fn did(&self, sid: u16) -> Option<u16> {
        let root = self.root.load(SeqCst) & !0xfff;
        let re = self.word(root + (sid as u64 >> 8) * 16).load(SeqCst);
        let ce = (re & 0x000f_ffff_ffff_f000) + (sid as u64 & 0xff) * 16;
        (re & 1 != 0 && self.word(ce).load(SeqCst) & 1 != 0)
            .then(|| (self.word(ce + 8).load(SeqCst) >> 8) as u16)
    }

    /// The host address `iova` reaches for requester `sid` by the walk the hardware makes in
    /// legacy mode (VT-d 4.1 §3.4.2, §9.1 root entry, §9.3 context entry, §9.8 second-stage
    /// entries), with the leaf size and R/W; `None` if any entry on the way is not present.
    fn walk(&self, sid: u16, iova: u64) -> Option<(u64, u64, bool, bool)> {
        if self.regs[reg::GSTS / 4].load(SeqCst) & TE == 0 {
            return None;
        }
        let addr = |e: u64| e & 0x000f_ffff_ffff_f000;
        let root = self.root.load(SeqCst) & !0xfff;
        // Root entry for the bus: P = lo bit 0, context-table pointer lo 63:12.
        let re = self.word(root + (sid as u64 >> 8) * 16).load(SeqCst);
        if re & 1 == 0 {
            return None;
        }
        // Context entry for devfn: P = lo bit 0, TT = lo 3:2 (00: second stage only),
        // SLPTPTR lo 63:12; AW = hi 2:0 (010: 48-bit, four levels).
        let ce = addr(re) + (sid as u64 & 0xff) * 16;
        let (lo, hi) = (self.word(ce).load(SeqCst), self.word(ce + 8).load(SeqCst));
        if lo & 1 == 0 || (lo >> 2) & 3 != 0 || hi & 7 != 2 {
            return None;
        }
        let mut table = addr(lo);
        for level in (1..=4u32).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = self
                .word(table + ((iova >> shift) & 0x1ff) * 8)
                .load(SeqCst);
            // Second-stage entry: R bit 0, W bit 1, PS bit 7 (levels 2 and 3).
            if e & 3 == 0 {
                return None;
            }
            if level == 1 || e & 1 << 7 != 0 {
                let size = 1u64 << shift;
                let pa = addr(e) & !(size - 1) | (iova & (size - 1));
                return Some((pa, size, e & 1 != 0, e & 2 != 0));
            }
            table = addr(e);
        }
        None
    }
}

impl Mmio for FakeVtd {
    fn read32(&self, off: usize) -> u32 {
        self.regs.get(off / 4).map_or(0, |r| r.load(SeqCst))
    }
    fn write32(&self, off: usize, v: u32) {
        match off {
            reg::GCMD => {
                // Persistent commands show in GSTS; SRTP and SIRTP latch at once; WBF (never
                // issued: CAP.RWBF = 0) would complete at once.
                let persistent = v & (TE | QIE | IRE | CFI);
                let latched = v & (SRTP | SIRTP);
                if v & SRTP != 0 {
                    self.root.store(self.get64(reg::RTADDR), SeqCst);
                }
                let was = self.regs[reg::GSTS / 4].load(SeqCst);
                if persistent & QIE != 0 && was & QIE == 0 {
                    // Enabling queued invalidation resets IQH (§6.5.2).
                    self.set64(reg::IQH, 0);
                }
                self.regs[reg::GSTS / 4].store(persistent | latched, SeqCst);
            }
            reg::GSTS | reg::VER => {}
            _ => {
                if let Some(r) = self.regs.get(off / 4) {
                    r.store(v, SeqCst);
                }
            }
        }
    }
    fn read64(&self, off: usize) -> u64 {
        if off + 8 > self.regs.len() * 4 {
            return 0;
        }
        self.get64(off)
    }
    fn write64(&self, off: usize, v: u64) {
        match off {
            reg::CAP | reg::ECAP | reg::IQH => {}
            // CCMD: ICC clears, CAIG = CIRG (§11.4.6).
            reg::CCMD if v >> 63 != 0 => {
                self.set64(off, (v & !(1 << 63)) | ((v >> 61) & 3) << 59);
            }
            // IOTLB_REG: IVT clears, IAIG = IIRG (§11.4.8.1).
            reg::IOTLB if v >> 63 != 0 => {
                self.set64(off, (v & !(1 << 63)) | ((v >> 60) & 3) << 57);
            }
            reg::IQT => {
                self.set64(off, v);
                self.run_queue(v);
            }
            _ if off + 8 <= self.regs.len() * 4 => self.set64(off, v),
            _ => {}
        }
    }
}

// ------------------------------------------------------------------------------------------
// Guest memory
// ------------------------------------------------------------------------------------------

/// Guest RAM `[0, RAM)` is host-contiguous at `HPA_BASE`, except `[GPA_HOST_SCATTERED, +1 MiB)`:
/// guest page `k` of it is the host page `HPA_SCATTERED + (255 - k) · 8 KiB` (256 runs of one
/// page, none adjacent to another).
const RAM: u64 = 64 << 20;
const HPA_BASE: u64 = 0x1_0000_0000;
const GPA_HOST_SCATTERED: u64 = 0xc0_0000;
const HPA_SCATTERED: u64 = 0x2_0000_0000;
/// Each vCPU's argument window: the struct at its start, a batch array at +`ARRAY`.
const WINDOW: u64 = 0x0300_0000;
const WINDOW_LEN: u64 = 0x4000;
const ARRAY: u64 = 0x1000;

/// One vCPU's view of its guest's memory. The hypervisor reads and writes a guest's memory only
/// for argument structs and arrays, which all live in the caller's window; only the window has
/// contents (other owned RAM is mapped for DMA, never read here; an access there is refused, so
/// a call that tried would fail the bench's return-code check).
struct BenchMem {
    window: u64,
    bytes: RefCell<Vec<u8>>,
}

impl BenchMem {
    fn new(vcpu: u32) -> Self {
        BenchMem {
            window: WINDOW + vcpu as u64 * WINDOW_LEN,
            bytes: RefCell::new(vec![0; WINDOW_LEN as usize]),
        }
    }

    fn offset(&self, gpa: u64, len: usize) -> Result<usize, MemFault> {
        let off = gpa.checked_sub(self.window).ok_or(MemFault)?;
        (off + len as u64 <= WINDOW_LEN)
            .then_some(off as usize)
            .ok_or(MemFault)
    }

    fn put<T: AbiStruct>(&self, at: u64, v: &T) {
        let mut b = [0u8; 64];
        v.encode(&mut b[..T::SIZE]);
        if T::SIZE >= 4 && at == self.window {
            b[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
        }
        self.write(at, &b[..T::SIZE]).unwrap();
    }

    fn get<T: AbiStruct>(&self, at: u64) -> T {
        let mut b = [0u8; 64];
        self.read(at, &mut b[..T::SIZE]).unwrap();
        T::decode(&b[..T::SIZE])
    }
}

impl GuestMemory for BenchMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let o = self.offset(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemFault> {
        let o = self.offset(gpa, buf.len())?;
        self.bytes.borrow_mut()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn owns(&self, gpa: u64, len: u64, _write: bool) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= RAM)
    }
    fn translate(&self, gpa: u64) -> Option<HostRun> {
        let s = GPA_HOST_SCATTERED;
        if gpa.wrapping_sub(s) < M1 {
            let k = (gpa - s) / K4;
            return Some(HostRun {
                hpa: HPA_SCATTERED + (255 - k) * 2 * K4 + gpa % K4,
                len: K4 - gpa % K4,
            });
        }
        (gpa < RAM).then(|| HostRun {
            hpa: HPA_BASE + gpa,
            len: if gpa < s { s - gpa } else { RAM - gpa },
        })
    }
}

// ------------------------------------------------------------------------------------------
// The machine: one VT-d unit, two devices, two guests
// ------------------------------------------------------------------------------------------

type Hw = VtdBackend<'static, &'static FakeVtd, SimMem>;

/// Requester IDs 00:01.0 (guest A's device) and 00:02.0 (guest B's).
const SIDS: [u16; 2] = [0x0008, 0x0010];

struct Machine {
    fd: Iommufd<Hw>,
    vtd: &'static FakeVtd,
    guests: [GuestId; 2],
    ioas: [u32; 2],
}

impl Mmio for &FakeVtd {
    fn read32(&self, off: usize) -> u32 {
        (**self).read32(off)
    }
    fn write32(&self, off: usize, v: u32) {
        (**self).write32(off, v)
    }
    fn read64(&self, off: usize) -> u64 {
        (**self).read64(off)
    }
    fn write64(&self, off: usize, v: u64) {
        (**self).write64(off, v)
    }
}

/// Makes one hypercall from `vcpu`'s window: writes `a` there, dispatches, returns the return
/// code and the struct as the hypervisor left it.
fn call<T: AbiStruct>(
    fd: &Iommufd<Hw>,
    g: GuestId,
    vcpu: u32,
    m: &BenchMem,
    o: u32,
    a: &T,
) -> (i64, T) {
    m.put(m.window, a);
    let r = hv(fd, g, vcpu, m, o, m.window);
    (r, m.get(m.window))
}

/// Set while the callgrind loop runs: only then do calls go through `cg_dispatch`, so the
/// instructions collected are those of the measured calls and nothing else.
static COLLECT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Every call of the bench enters the hypervisor here.
fn hv(fd: &Iommufd<Hw>, g: GuestId, vcpu: u32, m: &BenchMem, o: u32, gpa: u64) -> i64 {
    if COLLECT.load(Relaxed) {
        cg_dispatch(fd, g, vcpu, m, o, gpa)
    } else {
        dispatch(fd, g, vcpu, m, o, gpa)
    }
}

/// The calls callgrind counts (`--toggle-collect='*cg_dispatch*'`).
#[inline(never)]
fn cg_dispatch(fd: &Iommufd<Hw>, g: GuestId, vcpu: u32, m: &BenchMem, o: u32, gpa: u64) -> i64 {
    dispatch(fd, g, vcpu, m, o, gpa)
}

impl Machine {
    fn new() -> Self {
        let mem: &'static SimMem = Box::leak(Box::new(SimMem::new(4096, None)));
        let vtd: &'static FakeVtd = Box::leak(Box::new(FakeVtd::new(mem)));
        let mut unit = VtdUnit::new(vtd, mem, UnitConfig::new(TranslationMode::Legacy)).unwrap();
        unit.enable_translation().unwrap();
        let devices: Vec<VtdDevice> = SIDS
            .iter()
            .enumerate()
            .map(|(i, &sid)| VtdDevice {
                info: device_info(&unit, sid, i as u32 + 1, 0),
                unit: 0,
                sid,
            })
            .collect();
        let hw = VtdBackend::new(vec![unit], mem, devices);
        let mut fd = Iommufd::new(hw, Limits::default()).unwrap();
        let mut guests = [0; 2];
        let mut ioas = [0; 2];
        for i in 0..2 {
            let g = fd.create_guest().unwrap();
            let dev = fd.assign_device(g, i as u32).unwrap();
            let m = BenchMem::new(0);
            let (r, a) = call(&fd, g, 0, &m, op::IOAS_ALLOC, &IoasAlloc::default());
            assert_eq!(r, 0, "IOAS_ALLOC");
            let at = DeviceAttach {
                dev_id: dev,
                pt_id: a.out_ioas_id,
                ..Default::default()
            };
            let (r, _) = call(&fd, g, 0, &m, op::DEVICE_ATTACH, &at);
            assert_eq!(r, 0, "DEVICE_ATTACH");
            guests[i] = g;
            ioas[i] = a.out_ioas_id;
        }
        Machine {
            fd,
            vtd,
            guests,
            ioas,
        }
    }
}

/// IOVA base of `vcpu`'s ranges (1 GiB apart, above 4 GiB).
fn iova_base(vcpu: u32) -> u64 {
    4 * G1 + vcpu as u64 * G1
}

/// Guest-physical sources of the rows.
const GPA_4K: u64 = 0x10_0000;
const GPA_2M: u64 = 0x20_0000;
const GPA_CONTIG: u64 = 0x40_0000;
const GPA_SCATTER: u64 = 0x80_0000;
/// IOVA offsets of the rows within a vCPU's range.
const OFF_CONTIG: u64 = 0x100_0000;
const OFF_SCATTER: u64 = 0x200_0000;
const OFF_2M: u64 = 0x400_0000;
const OFF_HOST_SCATTERED: u64 = 0x300_0000;
/// 4 KiB slots per block of the `4k` row.
const SLOTS: u64 = 64;

// ------------------------------------------------------------------------------------------
// One vCPU's calls, checked
// ------------------------------------------------------------------------------------------

/// One vCPU of one guest: its window, its IOAS, its device's requester ID.
struct Vcpu<'a> {
    m: &'a Machine,
    g: GuestId,
    vcpu: u32,
    ioas: u32,
    sid: u16,
    mem: BenchMem,
    base: u64,
}

impl<'a> Vcpu<'a> {
    fn new(m: &'a Machine, guest: usize, vcpu: u32) -> Self {
        Vcpu {
            m,
            g: m.guests[guest],
            vcpu,
            ioas: m.ioas[guest],
            sid: SIDS[guest],
            mem: BenchMem::new(vcpu),
            base: iova_base(vcpu + guest as u32 * 2),
        }
    }

    fn map(&self, iova: u64, gpa: u64, len: u64) -> i64 {
        let a = IoasMap {
            flags: RW | MAP_FIXED_IOVA,
            ioas_id: self.ioas,
            gpa,
            length: len,
            iova,
            ..Default::default()
        };
        self.mem.put(self.mem.window, &a);
        hv(
            &self.m.fd,
            self.g,
            self.vcpu,
            &self.mem,
            op::IOAS_MAP,
            self.mem.window,
        )
    }

    /// Unmaps; returns the return code, or an error code if `length` out is not `len`.
    fn unmap(&self, iova: u64, len: u64) -> i64 {
        let a = IoasUnmap {
            ioas_id: self.ioas,
            iova,
            length: len,
            ..Default::default()
        };
        self.mem.put(self.mem.window, &a);
        let r = hv(
            &self.m.fd,
            self.g,
            self.vcpu,
            &self.mem,
            op::IOAS_UNMAP,
            self.mem.window,
        );
        if r == 0 && self.mem.get::<IoasUnmap>(self.mem.window).length != len {
            return -1000;
        }
        r
    }

    fn null(&self) -> i64 {
        hv(
            &self.m.fd,
            self.g,
            self.vcpu,
            &self.mem,
            0xff,
            self.mem.window,
        )
    }

    /// Writes the scattered row's 256 entries (every other guest page → consecutive IOVAs) as
    /// four arrays of 64 at the window's array area, one after the other.
    fn scatter_entries(&self, iova: u64) {
        for i in 0..256u64 {
            let e = MapEntry {
                flags: RW | MAP_FIXED_IOVA,
                gpa: GPA_SCATTER + 2 * i * K4,
                length: K4,
                iova: iova + i * K4,
                ..Default::default()
            };
            self.mem
                .put(self.mem.window + ARRAY + i * MapEntry::SIZE as u64, &e);
        }
    }

    /// Four IOAS_MAP_BATCH calls of 64 (the array written by `scatter_entries`); the first
    /// failing return code, or an error code if a batch did not complete every entry.
    fn map_scattered(&self) -> i64 {
        for b in 0..4u64 {
            let a = IoasMapBatch {
                flags: 0,
                ioas_id: self.ioas,
                num_entries: 64,
                entries_gpa: self.mem.window + ARRAY + b * 64 * MapEntry::SIZE as u64,
                ..Default::default()
            };
            self.mem.put(self.mem.window, &a);
            let r = hv(
                &self.m.fd,
                self.g,
                self.vcpu,
                &self.mem,
                op::IOAS_MAP_BATCH,
                self.mem.window,
            );
            if r != 0 {
                return r;
            }
            if self.mem.get::<IoasMapBatch>(self.mem.window).out_done != 64 {
                return -1001;
            }
        }
        0
    }

    /// Every page of `[iova, iova + len)` translates to `gpa`'s host page through the fake's
    /// walk, readable and writable, with leaves of `leaf` bytes.
    fn check_mapped(&self, iova: u64, gpa: u64, len: u64, leaf: u64, what: &str) {
        for k in 0..len / K4 {
            let got = self.m.vtd.walk(self.sid, iova + k * K4);
            // The guest memory's own translation of the page.
            let hpa = self.mem.translate(gpa + k * K4).unwrap().hpa;
            let want = Some((hpa, leaf, true, true));
            assert_eq!(got, want, "{what}: IOVA {:#x} after map", iova + k * K4);
        }
    }

    fn check_unmapped(&self, iova: u64, len: u64, what: &str) {
        for k in 0..len / K4 {
            let got = self.m.vtd.walk(self.sid, iova + k * K4);
            assert_eq!(got, None, "{what}: IOVA {:#x} after unmap", iova + k * K4);
        }
    }
}

fn ok(r: i64, what: &str) {
    assert_eq!(r, 0, "{what}: dispatch returned {r}");
}

fn ns(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ------------------------------------------------------------------------------------------
// Single-thread rows: one round each, timed and checked
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Row {
    Null,
    Map4k,
    Contig,
    Scatter,
    HostScatter,
    Map2m,
}

const ROWS: [(Row, &str); 6] = [
    (Row::Null, "null"),
    (Row::Map4k, "4k"),
    (Row::Contig, "256x4k-contiguous"),
    (Row::Scatter, "256x4k-scattered"),
    (Row::HostScatter, "1m-host-scattered"),
    (Row::Map2m, "2m"),
];

/// One round of `row`: (map ns, unmap ns) per unit (a call for `null`, whose unmap part is 0;
/// a map+unmap group otherwise). Asserts every call's code, the tables after the maps and after
/// the unmaps, and the invalidation rounds. With `check_psi`, also that the unmap's
/// page-selective invalidations cover what it unmapped.
fn round(v: &Vcpu<'_>, row: Row, check_psi: bool) -> (f64, f64) {
    let vtd = v.m.vtd;
    let (what, iova, gpa, len, leaf, units) = match row {
        Row::Null => {
            let t = Instant::now();
            let mut bad = 0;
            for _ in 0..256 {
                bad += (v.null() != -(errno::ENOTTY as i64)) as u32;
            }
            let t = ns(t.elapsed());
            assert_eq!(bad, 0, "null: unknown op must return ENOTTY");
            return (t / 256.0, 0.0);
        }
        Row::Map4k => ("4k", v.base, GPA_4K, SLOTS * K4, K4, SLOTS),
        Row::Contig => (
            "256x4k-contiguous",
            v.base + OFF_CONTIG,
            GPA_CONTIG,
            M1,
            K4,
            1,
        ),
        Row::Scatter => (
            "256x4k-scattered",
            v.base + OFF_SCATTER,
            GPA_SCATTER,
            M1,
            K4,
            1,
        ),
        Row::HostScatter => (
            "1m-host-scattered",
            v.base + OFF_HOST_SCATTERED,
            GPA_HOST_SCATTERED,
            M1,
            K4,
            1,
        ),
        Row::Map2m => ("2m", v.base + OFF_2M, GPA_2M, M2, M2, 1),
    };
    if row == Row::Scatter {
        v.scatter_entries(iova);
    }
    let before = vtd.counts();
    // Maps.
    let t0 = Instant::now();
    let r = match row {
        Row::Map4k => {
            let mut first_bad = 0;
            for k in 0..SLOTS {
                let r = v.map(iova + k * K4, gpa + k * K4, K4);
                if r != 0 && first_bad == 0 {
                    first_bad = r;
                }
            }
            first_bad
        }
        Row::Scatter => v.map_scattered(),
        _ => v.map(iova, gpa, len),
    };
    let t_map = ns(t0.elapsed());
    ok(r, what);
    assert_eq!(
        vtd.counts().rounds,
        before.rounds,
        "{what}: a map made an invalidation round"
    );
    if row == Row::Scatter {
        for i in 0..256 {
            v.check_mapped(iova + i * K4, GPA_SCATTER + 2 * i * K4, K4, K4, what);
        }
    } else {
        v.check_mapped(iova, gpa, len, leaf, what);
    }
    // Unmaps.
    if check_psi {
        vtd.psis.lock().unwrap().clear();
        vtd.record.store(true, SeqCst);
    }
    let t1 = Instant::now();
    let r = if row == Row::Map4k {
        let mut first_bad = 0;
        for k in 0..SLOTS {
            let r = v.unmap(iova + k * K4, K4);
            if r != 0 && first_bad == 0 {
                first_bad = r;
            }
        }
        first_bad
    } else {
        v.unmap(iova, len)
    };
    let t_unmap = ns(t1.elapsed());
    vtd.record.store(false, SeqCst);
    ok(r, what);
    v.check_unmapped(iova, len, what);
    let after = vtd.counts();
    assert_eq!(
        after.rounds - before.rounds,
        units,
        "{what}: one invalidation round per unmap call (one unit)"
    );
    assert_eq!(
        after.waits - before.waits,
        units,
        "{what}: one wait per round"
    );
    if check_psi {
        let psis = vtd.psis.lock().unwrap();
        let did = vtd.did(v.sid);
        assert!(did.is_some(), "{what}: the device has no context entry");
        for k in 0..len / K4 {
            let a = iova + k * K4;
            let covered = psis.iter().any(|p| {
                (p.did.is_none() || p.did == did) && a >= p.addr && a - p.addr < K4 << p.am
            });
            assert!(
                covered,
                "{what}: IOVA {a:#x} unmapped without an IOTLB invalidation of its domain"
            );
        }
    }
    (t_map / units as f64, t_unmap / units as f64)
}

// ------------------------------------------------------------------------------------------
// Scaling: pairs per microsecond, 1 thread vs 2
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    /// vCPUs 0 and 1 of guest A, one IOAS.
    OneGuest,
    /// vCPU 0 of guest A and vCPU 0 of guest B, an IOAS each.
    TwoGuests,
    /// The page-table engine alone, disjoint ranges of one table.
    Engine,
}

/// Pairs (map + unmap of `pages` 4 KiB pages in one call each) per microsecond by `threads`
/// threads, `pairs` pairs each, from the first thread's start to the last thread's end (each
/// thread reads the clock itself after the start barrier: on a loaded machine the thread that
/// spawned the workers may run long after they did).
/// Checks every call and, after the run, that every range is unmapped and that the unit saw
/// exactly one invalidation round per unmap call.
fn throughput(
    m: &Machine,
    pt: &PageTable<VtdSecondStage<4>>,
    load: Load,
    threads: u32,
    pages: u64,
    pairs: u64,
) -> Rate {
    // Thread `t` is vCPU `t` of guest A, or vCPU 0 of guest `t`.
    let who = |t: u32| match load {
        Load::TwoGuests => (t as usize, 0),
        _ => (0, t),
    };
    let len = pages * K4;
    let rounds0 = m.vtd.counts().rounds;
    let barrier = Barrier::new(threads as usize);
    let failures = AtomicU64::new(0);
    let worker = |t: u32| {
        let mut bad = 0u64;
        let start;
        if load == Load::Engine {
            let (iova, pa) = (iova_base(t) + OFF_CONTIG, HPA_BASE + GPA_CONTIG);
            let mem = m.vtd.mem;
            barrier.wait();
            start = (Instant::now(), on_cpu_ns());
            for _ in 0..pairs {
                bad += pt
                    .map(mem, iova, pa, len, Prot::READ | Prot::WRITE)
                    .is_err() as u64;
                let mut g = Gather::new();
                bad += (pt.unmap(mem, iova, len, &mut g) != Ok(len)) as u64;
                g.complete(mem);
            }
        } else {
            // Each vCPU has its own view of the guest's memory (its own window).
            let (guest, vcpu) = who(t);
            let v = Vcpu::new(m, guest, vcpu);
            let iova = v.base + OFF_CONTIG;
            barrier.wait();
            start = (Instant::now(), on_cpu_ns());
            for _ in 0..pairs {
                bad += (v.map(iova, GPA_CONTIG, len) != 0) as u64;
                bad += (v.unmap(iova, len) != 0) as u64;
            }
        }
        let end = (Instant::now(), on_cpu_ns());
        failures.fetch_add(bad, SeqCst);
        (start.0, end.0, end.1.saturating_sub(start.1))
    };
    let spans: Vec<(Instant, Instant, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let worker = &worker;
                s.spawn(move || worker(t))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    let us = (last - first).as_secs_f64() * 1e6;
    let cpu_us = spans.iter().map(|s| s.2).sum::<u64>() as f64 / 1e3;
    assert_eq!(failures.load(SeqCst), 0, "{load:?}: a call failed");
    if load == Load::Engine {
        for t in 0..threads {
            assert_eq!(pt.translate(m.vtd.mem, iova_base(t) + OFF_CONTIG), None);
        }
    } else {
        for t in 0..threads {
            let (guest, vcpu) = who(t);
            let v = Vcpu::new(m, guest, vcpu);
            v.check_unmapped(v.base + OFF_CONTIG, len, "scaling");
        }
        assert_eq!(
            m.vtd.counts().rounds - rounds0,
            threads as u64 * pairs,
            "{load:?}: one invalidation round per unmap call"
        );
    }
    let done = (threads as u64 * pairs) as f64;
    Rate {
        wall: done / us,
        cpu: done / cpu_us.max(1e-3),
        busy: cpu_us / us,
    }
}

/// Pairs per microsecond of wall time (first start to last end) and per microsecond of the
/// threads' own time on a CPU; how many threads were on a CPU on average over the run.
#[derive(Clone, Copy, Debug)]
struct Rate {
    wall: f64,
    cpu: f64,
    busy: f64,
}

/// Nanoseconds the calling thread has spent on a CPU (`CLOCK_THREAD_CPUTIME_ID`). Time spent
/// spinning on a lock counts; time the thread waited for a CPU while other processes ran does
/// not.
fn on_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_THREAD_CPUTIME_ID is a clock every Linux kernel the bench runs on provides.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ------------------------------------------------------------------------------------------

fn quick() -> bool {
    std::env::var_os("DISPATCH_BENCH_QUICK").is_some() || std::env::args().any(|a| a == "--quick")
}

fn main() {
    let m = Machine::new();
    if let Ok(row) = std::env::var("DISPATCH_BENCH_ONLY") {
        return callgrind(&m, &row);
    }
    let q = quick();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Host benchmark of iommufd::dispatch (VT-d backend over a register model, legacy mode, queued invalidation)"
    );
    println!(
        "host: {cpu}, {} CPUs, load average {}{}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        if q { " (QUICK)" } else { "" }
    );

    let v = Vcpu::new(&m, 0, 0);
    // Untimed check pass: builds the tables of every row's range and checks the invalidations.
    for (row, _) in ROWS {
        round(&v, row, true);
    }
    let n = if q { 30 } else { 300 };
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> =
        ROWS.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for _ in 0..n {
        for (i, (row, _)) in ROWS.iter().enumerate() {
            let (a, b) = round(&v, *row, false);
            samples[i].0.push(a);
            samples[i].1.push(b);
        }
    }
    println!("\nns per call (group), medians of {n} interleaved rounds; every call checked\n");
    println!(
        "| {:<48} | {:>10} | {:>10} | {:>10} |",
        "row", "map", "unmap", "map+unmap"
    );
    println!("|{:-<50}|{:-<12}|{:-<12}|{:-<12}|", "", "", "", "");
    for (i, (row, name)) in ROWS.iter().enumerate() {
        let (a, b) = (median(&mut samples[i].0), median(&mut samples[i].1));
        let pairs: Vec<f64> = samples[i]
            .0
            .iter()
            .zip(&samples[i].1)
            .map(|(x, y)| x + y)
            .collect();
        let mut pairs = pairs;
        let p = median(&mut pairs);
        let label = match row {
            Row::Null => "null (unknown op, ENOTTY)".to_string(),
            Row::Scatter => format!("{name} (4 MAP_BATCH of 64 + 1 UNMAP)"),
            Row::HostScatter => format!("{name} (256 host runs, 1 MAP + 1 UNMAP)"),
            _ => name.to_string(),
        };
        if *row == Row::Null {
            println!("| {label:<48} | {a:>10.0} | {:>10} | {:>10} |", "", "");
        } else {
            println!("| {label:<48} | {a:>10.0} | {b:>10.0} | {p:>10.0} |");
        }
    }

    // Scaling.
    let pool_pt = PageTable::<VtdSecondStage<4>>::new(
        m.vtd.mem,
        Config {
            leaf_sizes: 1 << 12 | 1 << 21 | 1 << 30,
            ..Config::new(48, 48)
        },
    )
    .unwrap();
    let rounds = if q { 5 } else { 15 };
    println!(
        "\nThroughput, map+unmap pairs per microsecond (higher is better), disjoint IOVA ranges;\nmedians of {rounds} alternating 1- and 2-thread rounds; peer: the engine's map/unmap alone\n"
    );
    println!(
        "| {:<44} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} | {:>6} | {:>7} | {:>7} |",
        "workload",
        "1 thread",
        "2 threads",
        "scaling",
        "peer",
        "vs peer",
        "busy",
        "CPU eff",
        "peer eff"
    );
    println!(
        "|{:-<46}|{:-<11}|{:-<11}|{:-<10}|{:-<10}|{:-<10}|{:-<8}|{:-<9}|{:-<9}|",
        "", "", "", "", "", "", "", "", ""
    );
    for (name, load, pages) in [
        ("4 KiB, one guest, 2 vCPUs on one IOAS", Load::OneGuest, 1),
        (
            "256 x 4 KiB in one call, one guest, 2 vCPUs",
            Load::OneGuest,
            256,
        ),
        ("4 KiB, two guests (one vCPU each)", Load::TwoGuests, 1),
        ("256 x 4 KiB in one call, two guests", Load::TwoGuests, 256),
    ] {
        // About 20 ms per run (4 ms in quick mode): several scheduler slices.
        let (pairs, peer_pairs) = match pages {
            1 => (30_000, 600_000),
            _ => (5_000, 5_000),
        };
        let (pairs, peer_pairs) = if q {
            (pairs / 5, peer_pairs / 5)
        } else {
            (pairs, peer_pairs)
        };
        let mut r: [Vec<Rate>; 4] = Default::default();
        for _ in 0..rounds {
            r[0].push(throughput(&m, &pool_pt, load, 1, pages, pairs));
            r[1].push(throughput(&m, &pool_pt, Load::Engine, 1, pages, peer_pairs));
            r[2].push(throughput(&m, &pool_pt, load, 2, pages, pairs));
            r[3].push(throughput(&m, &pool_pt, Load::Engine, 2, pages, peer_pairs));
        }
        let wall = |v: &[Rate]| median(&mut v.iter().map(|x| x.wall).collect::<Vec<_>>());
        let cpu = |v: &[Rate]| median(&mut v.iter().map(|x| x.cpu).collect::<Vec<_>>());
        let (o, t) = (wall(&r[0]), wall(&r[2]));
        let (s, ps) = (t / o, wall(&r[3]) / wall(&r[1]));
        let (e, pe) = (cpu(&r[2]) / cpu(&r[0]), cpu(&r[3]) / cpu(&r[1]));
        let busy = median(&mut r[2].iter().map(|x| x.busy).collect::<Vec<_>>());
        println!(
            "| {name:<44} | {o:>9.3} | {t:>9.3} | {s:>7.2}x | {ps:>7.2}x | {:>7.2}x | {busy:>6.2} | {e:>7.2} | {pe:>7.2} |",
            s / ps
        );
    }
    println!(
        "\n(peer = the page-table engine's map + unmap + Gather::complete of the same pages on the same"
    );
    println!(
        " threads, measured in alternation with each workload; vs peer = our scaling / the peer's;"
    );
    println!(
        " busy = threads on a CPU on average during the 2-thread runs (their CPU time / wall time): 2.00"
    );
    println!(
        " when both ran the whole time, 1.00 when they took turns; CPU eff = pairs per microsecond of the"
    );
    println!(
        " threads' own CPU time (CLOCK_THREAD_CPUTIME_ID), 2 threads over 1: 1.00 = a pair costs the same"
    );
    println!(
        " CPU time with two threads as with one; spinning on a lock or bouncing cache lines lowers it,"
    );
    println!(
        " other processes taking the CPU do not. It measures contention only when busy is near 2)"
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nload average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Every call, table walk and invalidation count above was asserted: a failure panics.
    println!("bench: every call checked, 0 calls failed");
}

/// One row in a loop for callgrind: every `dispatch` is inside `cg_dispatch`; prints the units
/// (calls for `null`, map+unmap groups otherwise) the collected instructions are spread over.
fn callgrind(m: &Machine, row: &str) {
    let v = Vcpu::new(m, 0, 0);
    let Some(&(row, name)) = ROWS.iter().find(|(_, n)| *n == row) else {
        panic!(
            "unknown row {row:?}; rows: null, 4k, 256x4k-contiguous, 256x4k-scattered, 1m-host-scattered, 2m"
        );
    };
    round(&v, row, true); // builds the tables (the timed rows run with them present)
    let base = m.vtd.counts();
    let rounds: u64 = std::env::var("DISPATCH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    COLLECT.store(true, Relaxed);
    for _ in 0..rounds {
        round(&v, row, false);
    }
    COLLECT.store(false, Relaxed);
    let units = match row {
        Row::Null => 256 * rounds,
        Row::Map4k => SLOTS * rounds,
        _ => rounds,
    };
    let c = m.vtd.counts();
    println!(
        "callgrind: {name} {units} units, {} invalidation rounds, {} page-selective invalidations",
        c.rounds - base.rounds,
        c.psi - base.psi
    );
}

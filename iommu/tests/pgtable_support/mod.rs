//! Host-side support shared by the page-table tests, the loom models and the benchmark
//! (`#[path]`-included by each): a [`TableMemory`] over a pool of atomics with fake physical
//! addresses, deferred reuse through quiescent states, and a use-after-free checker; plus the
//! reference walkers in `refwalk.rs`.
//!
//! Built with `--cfg loom`, every table entry and every synchronisation the pool uses is a loom
//! object, so the models check the engine and the reclamation protocol together.
#![allow(dead_code)]

pub mod refwalk;

#[cfg(loom)]
use iommu::pgtable::sync::PteAtomic;
use iommu::pgtable::{PhysAddr, TableMemory};
use std::sync::atomic::{AtomicU8, AtomicUsize as StdAtomicUsize, Ordering::*};

#[cfg(loom)]
use loom::sync::{
    Mutex,
    atomic::{AtomicU64 as SyncU64, AtomicUsize as SyncUsize, fence},
};
#[cfg(not(loom))]
use std::sync::{
    Mutex,
    atomic::{AtomicU64 as SyncU64, AtomicUsize as SyncUsize, fence},
};

/// The entry type handed to the engine.
#[cfg(not(loom))]
pub type Entry = std::sync::atomic::AtomicU64;

/// Under loom: a newtype, because neither `PteAtomic` nor loom's atomic is local to this crate.
#[cfg(loom)]
pub struct Entry(loom::sync::atomic::AtomicU64);

#[cfg(loom)]
impl Entry {
    fn new(v: u64) -> Self {
        Entry(loom::sync::atomic::AtomicU64::new(v))
    }
}

#[cfg(loom)]
impl PteAtomic for Entry {
    fn load(&self, o: std::sync::atomic::Ordering) -> u64 {
        self.0.load(o)
    }
    fn store(&self, v: u64, o: std::sync::atomic::Ordering) {
        self.0.store(v, o)
    }
    fn compare_exchange(
        &self,
        c: u64,
        n: u64,
        s: std::sync::atomic::Ordering,
        f: std::sync::atomic::Ordering,
    ) -> Result<u64, u64> {
        self.0.compare_exchange(c, n, s, f)
    }
    fn swap(&self, v: u64, o: std::sync::atomic::Ordering) -> u64 {
        self.0.swap(v, o)
    }
    fn fetch_and(&self, v: u64, o: std::sync::atomic::Ordering) -> u64 {
        self.0.fetch_and(v, o)
    }
    fn fetch_or(&self, v: u64, o: std::sync::atomic::Ordering) -> u64 {
        self.0.fetch_or(v, o)
    }
}

#[cfg(not(loom))]
fn new_entry() -> Entry {
    Entry::new(0)
}
#[cfg(loom)]
fn new_entry() -> Entry {
    Entry::new(0)
}

const FREE: u8 = 0;
const LIVE: u8 = 1;
const RETIRED: u8 = 2;

/// Fake physical address of frame `i`: 4 KiB frames, frame 0 at 4 KiB (never address 0).
pub fn frame_pa(i: usize) -> PhysAddr {
    ((i + 1) as u64) << 12
}
fn frame_index(pa: PhysAddr) -> usize {
    assert!(pa >= 0x1000, "pa {pa:#x} is not a pool address");
    ((pa >> 12) - 1) as usize
}

/// A retired area waiting for a grace period: every registered CPU slot that was online when it
/// was retired must pass a quiescent state (or go offline).
struct Limbo {
    first: usize,
    frames: usize,
    snapshot: Vec<u64>,
}

struct Inner {
    /// Free single frames (may hold stale indices of frames a multi-frame allocation took: the
    /// frame state is the truth).
    free: Vec<u32>,
    limbo: Vec<Limbo>,
}

/// Per-CPU quiescent-state counter, on its own cache line. Odd = online. Only increases.
#[repr(align(128))]
struct Slot(SyncU64);

/// A pool of table frames with fake physical addresses.
///
/// * Frames hold `entries_per_frame` entries (512 for real 4 KiB tables; 4 for loom's narrow
///   tables) and sit at fake addresses 4 KiB apart, so table addresses look like the real thing
///   to the descriptor encodings. A multi-frame area is contiguous in both.
/// * Reuse after `retire_table` waits for a grace period, quiescent-state style (what the
///   hypervisor does at VM entry): CPUs [`register`](Self::register) a slot and call
///   [`quiescent`](Self::quiescent) between engine calls.
/// * With checking on, `table()` on a free frame panics: the engine touched a page after
///   returning it.
pub struct HostPool {
    epf: usize,
    frames: usize,
    storage: Box<[Entry]>,
    state: Box<[AtomicU8]>,
    /// The frame may hold non-zero entries (it was handed out, or scribbled on). Fresh frames are
    /// zero already, and zeroing 512 atomics is what dominates table allocation under miri.
    dirty: Box<[AtomicU8]>,
    /// Race anchors, one per frame, for loom only (see `touch`).
    touches: Box<[SyncUsize]>,
    inner: Mutex<Inner>,
    slots: Box<[Slot]>,
    slots_used: StdAtomicUsize,
    check: bool,
    pub allocs: StdAtomicUsize,
    pub frees: StdAtomicUsize,
    pub retires: StdAtomicUsize,
    pub reclaimed: StdAtomicUsize,
}

impl HostPool {
    /// `frames` frames of 512 entries (real 4 KiB tables), checking on.
    pub fn new(frames: usize) -> Self {
        Self::with_geometry(frames, 512, 4, true)
    }

    pub fn with_geometry(
        frames: usize,
        entries_per_frame: usize,
        slots: usize,
        check: bool,
    ) -> Self {
        let storage = (0..frames * entries_per_frame)
            .map(|_| new_entry())
            .collect();
        let state = (0..frames).map(|_| AtomicU8::new(FREE)).collect();
        let dirty = (0..frames).map(|_| AtomicU8::new(0)).collect();
        let touches = (0..frames).map(|_| SyncUsize::new(0)).collect();
        let free = (0..frames as u32).rev().collect();
        HostPool {
            epf: entries_per_frame,
            frames,
            storage,
            state,
            dirty,
            touches,
            inner: Mutex::new(Inner {
                free,
                limbo: Vec::new(),
            }),
            // Even = offline.
            slots: (0..slots).map(|_| Slot(SyncU64::new(0))).collect(),
            slots_used: StdAtomicUsize::new(0),
            check,
            allocs: StdAtomicUsize::new(0),
            frees: StdAtomicUsize::new(0),
            retires: StdAtomicUsize::new(0),
            reclaimed: StdAtomicUsize::new(0),
        }
    }

    /// Frames currently allocated (live or waiting in limbo).
    pub fn frames_in_use(&self) -> usize {
        self.state
            .iter()
            .filter(|s| s.load(Relaxed) != FREE)
            .count()
    }
    /// Frames waiting for a grace period.
    pub fn frames_in_limbo(&self) -> usize {
        self.state
            .iter()
            .filter(|s| s.load(Relaxed) == RETIRED)
            .count()
    }

    /// Fills every free frame with garbage that looks like present descriptors, as recycled pages
    /// would hold. The allocator's zeroing is then observable: a table published without
    /// `Release` lets another CPU read the garbage (which the loom models would catch).
    pub fn scribble(&self) {
        for (f, st) in self.state.iter().enumerate() {
            if st.load(Relaxed) == FREE {
                self.dirty[f].store(1, Relaxed);
                for (k, e) in self.storage[f * self.epf..(f + 1) * self.epf]
                    .iter()
                    .enumerate()
                {
                    // R|W / P / valid+table bits set, address of a frame far outside the pool.
                    e.store(0xdead_0000_0003 | (k as u64) << 12, Relaxed);
                }
            }
        }
    }

    /// Raw 64-bit read at a fake physical address (for the reference walkers).
    pub fn read_phys(&self, pa: PhysAddr) -> u64 {
        assert_eq!(pa & 7, 0);
        let frame = frame_index(pa & !0xfff);
        let within = ((pa & 0xfff) / 8) as usize;
        // A read inside a frame beyond its entries spills into the next frame only for real
        // 512-entry frames, which is exactly physical contiguity.
        let idx = frame * self.epf + within;
        self.storage[idx].load(Relaxed)
    }

    /// Simulates a hardware update (A/D, AF, DBM) of the descriptor at `pa`: atomic OR / AND.
    pub fn hw_update(&self, pa: PhysAddr, or: u64, and: u64) {
        let frame = frame_index(pa & !0xfff);
        let idx = frame * self.epf + ((pa & 0xfff) / 8) as usize;
        let e = &self.storage[idx];
        // Relaxed: hardware updates carry no ordering towards the CPU.
        e.fetch_or(or, Relaxed);
        e.fetch_and(and, Relaxed);
    }

    // ---- quiescent states -------------------------------------------------------------------

    /// Registers the calling CPU; returns its slot (online).
    pub fn register(&self) -> usize {
        let s = self.slots_used.fetch_add(1, Relaxed);
        assert!(s < self.slots.len(), "too many CPUs for this pool");
        // Release: nothing to publish yet, but keeps the counter monotonic under every model.
        self.slots[s].0.fetch_add(1, Release);
        // SeqCst fence: our later table reads are ordered after the online mark for any
        // retirer whose snapshot comes after its unlink (the store-buffering pattern).
        fence(SeqCst);
        s
    }

    /// The CPU in `slot` holds no reference into any table (between engine calls).
    pub fn quiescent(&self, slot: usize) {
        // Release: every table read of the calls before this point happens-before a reclaimer
        // that Acquire-reads the new value and reuses a page.
        self.slots[slot].0.fetch_add(2, Release);
        // SeqCst fence: a walk after this point either sees the unlink of any table whose retirer
        // snapshotted our old value, or that retirer's snapshot sees the new one (SB pattern;
        // the retirer has the matching fence).
        fence(SeqCst);
        self.reclaim();
    }

    /// The CPU in `slot` stops using the engine.
    pub fn offline(&self, slot: usize) {
        // Release: as in `quiescent`.
        self.slots[slot].0.fetch_add(1, Release);
        self.reclaim();
    }

    /// Frees every limbo area whose grace period has elapsed.
    pub fn reclaim(&self) {
        let mut inner = self.inner.lock().unwrap();
        let mut k = 0;
        while k < inner.limbo.len() {
            let done = inner.limbo[k]
                .snapshot
                .iter()
                .enumerate()
                .all(|(s, &snap)| {
                    // Acquire: pairs with the Release in `quiescent`/`offline`.
                    snap & 1 == 0 || self.slots[s].0.load(Acquire) > snap
                });
            if done {
                let l = inner.limbo.swap_remove(k);
                for f in l.first..l.first + l.frames {
                    self.touch(f);
                    self.state[f].store(FREE, Relaxed);
                    inner.free.push(f as u32);
                }
                self.reclaimed.fetch_add(l.frames, Relaxed);
            } else {
                k += 1;
            }
        }
    }

    /// loom race anchor: every use of a frame (a table visit, allocation, free, retirement) is an
    /// RMW on one loom atomic per frame. loom's DPOR remembers only the *last* access to each
    /// location, and the engine always loads an entry before it CASes it, so a CPU's own load
    /// hides a reader's earlier load of the same entry from the race detector: the "walker holds
    /// a stale pointer while the page is freed and reused" interleavings would never be tried.
    /// Conflicting RMWs at frame granularity make those races visible to DPOR. Outside loom this
    /// is compiled out.
    #[inline(always)]
    fn touch(&self, frame: usize) {
        if cfg!(loom) {
            // Relaxed: an anchor for the model checker, no synchronisation intended.
            self.touches[frame].fetch_add(1, Relaxed);
        }
    }

    fn frames_for(&self, bytes: usize) -> usize {
        let per = self.epf * 8;
        assert!(bytes.is_power_of_two());
        bytes.div_ceil(per).max(1)
    }

    fn zero(&self, first: usize, frames: usize) {
        for f in first..first + frames {
            // Once handed out a frame counts as dirty until zeroed at its next allocation.
            if self.dirty[f].swap(1, Relaxed) == 0 {
                continue;
            }
            for e in &self.storage[f * self.epf..(f + 1) * self.epf] {
                // Relaxed: the engine publishes the table with a Release CAS.
                e.store(0, Relaxed);
            }
        }
    }
}

impl TableMemory for HostPool {
    type Entry = Entry;

    fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
        let n = self.frames_for(bytes);
        let mut inner = self.inner.lock().unwrap();
        let first = if n == 1 {
            loop {
                let f = inner.free.pop()? as usize;
                if self.state[f].load(Relaxed) == FREE {
                    break f;
                }
            }
        } else {
            // Naturally aligned run of free frames: fake pa (i + 1) << 12 aligned to n frames.
            let mut start = n - 1;
            loop {
                if start + n > self.frames {
                    return None;
                }
                if (start..start + n).all(|f| self.state[f].load(Relaxed) == FREE) {
                    break start;
                }
                start += n;
            }
        };
        for f in first..first + n {
            self.state[f].store(LIVE, Relaxed);
            self.touch(f);
        }
        drop(inner);
        self.zero(first, n);
        self.allocs.fetch_add(1, Relaxed);
        Some(frame_pa(first))
    }

    fn free_table(&self, pa: PhysAddr, bytes: usize) {
        let n = self.frames_for(bytes);
        let first = frame_index(pa);
        let mut inner = self.inner.lock().unwrap();
        for f in first..first + n {
            let was = self.state[f].swap(FREE, Relaxed);
            assert_eq!(
                was, LIVE,
                "free_table({pa:#x}) of a frame that was not live"
            );
            inner.free.push(f as u32);
        }
        self.frees.fetch_add(1, Relaxed);
    }

    fn retire_table(&self, pa: PhysAddr, bytes: usize) {
        let n = self.frames_for(bytes);
        let first = frame_index(pa);
        for f in first..first + n {
            let was = self.state[f].swap(RETIRED, Relaxed);
            assert_eq!(
                was, LIVE,
                "retire_table({pa:#x}) of a frame that was not live"
            );
        }
        // SeqCst fence: the unlink (earlier in program order) is ordered before the snapshot;
        // pairs with the fence in `quiescent`.
        fence(SeqCst);
        let used = self.slots_used.load(Relaxed);
        let snapshot = self.slots[..used]
            .iter()
            .map(|s| s.0.load(Relaxed))
            .collect();
        self.inner.lock().unwrap().limbo.push(Limbo {
            first,
            frames: n,
            snapshot,
        });
        self.retires.fetch_add(1, Relaxed);
        self.reclaim();
    }

    #[inline]
    fn table(&self, pa: PhysAddr, entries: usize) -> &[Entry] {
        let f = frame_index(pa);
        self.touch(f);
        if self.check {
            assert_ne!(
                self.state[f].load(Relaxed),
                FREE,
                "engine used table {pa:#x} after it was freed"
            );
        }
        let start = f * self.epf;
        &self.storage[start..start + entries]
    }
}

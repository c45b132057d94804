//! The crate's only `unsafe`: two small synchronisation cells the object model builds on.
//!
//! * [`Gate`]: a distributed reader-writer lock ("big-reader" lock, as Linux's percpu-rwsem).
//!   Each reader slot (one per vCPU of a guest) is a cache-padded flag only its own vCPU
//!   writes, so readers on different vCPUs never write a common word: the hypercall fast path
//!   (IOAS_MAP / IOAS_UNMAP) scales with the number of vCPUs. A writer (a control operation)
//!   serialises with other writers on a spin lock, raises `writer` and waits until every
//!   reader flag is clear; readers that see `writer` raised withdraw and retry. Readers get
//!   `&T`, the writer `&mut T`.
//! * [`SpinLock`]: a plain test-and-set lock for short critical sections (a guest's last error,
//!   an IOAS's area table, the software model's page pool).
//!
//! Both wait by spinning, without a bound: a holder only ever runs a bounded hypercall (no
//! holder waits for a guest), so every wait ends. The loom model `tests/gate_loom.rs` explores
//! a reader against a writer (this file is compiled into it with loom's atomics, through the
//! `gate_sync` facade); `cargo +nightly miri test -p iommu --lib gate` runs the unit tests
//! below under miri.
#![allow(unsafe_code)]

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::gate_sync::{AtomicBool, spin};

/// One reader flag on a cache line (two 64-byte lines: x86 prefetches line pairs, and some
/// Arm cores have 128-byte lines) of its own, so vCPUs never share a written line.
#[repr(align(128))]
struct Padded(AtomicBool);

/// Why a reader could not enter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The slot index is beyond the gate's slots (a vCPU index the gate was not built for).
    NoSuchSlot,
    /// The slot is already held: two callers claimed to be the same vCPU.
    SlotBusy,
    /// A writer is in or entering: retry (after spinning) or give up.
    Writer,
}

/// A value shared by readers (one per slot) and exclusive writers. See the module docs.
pub struct Gate<T> {
    value: UnsafeCell<T>,
    readers: Box<[Padded]>,
    /// A writer is in, or waiting for the readers to leave.
    writer: AtomicBool,
    /// Serialises writers.
    writers: AtomicBool,
}

// SAFETY: readers on several threads share `&T` (needs `T: Sync`); a writer on any thread gets
// `&mut T` (needs `T: Send`). The protocol below makes the writer's access exclusive.
unsafe impl<T: Send + Sync> Sync for Gate<T> {}

impl<T> Gate<T> {
    /// A gate with `slots` reader slots; `None` if the slots cannot be allocated.
    pub fn new(value: T, slots: usize) -> Option<Self> {
        let mut readers = Vec::new();
        readers.try_reserve_exact(slots).ok()?;
        for _ in 0..slots {
            readers.push(Padded(AtomicBool::new(false)));
        }
        Some(Gate {
            value: UnsafeCell::new(value),
            readers: readers.into_boxed_slice(),
            writer: AtomicBool::new(false),
            writers: AtomicBool::new(false),
        })
    }

    pub fn slots(&self) -> usize {
        self.readers.len()
    }

    /// Enters as reader `slot` if no writer is in or entering; never waits.
    pub fn try_read(&self, slot: usize) -> Result<ReadGuard<'_, T>, ReadError> {
        let flag = &self.readers.get(slot).ok_or(ReadError::NoSuchSlot)?.0;
        // The handshake with a writer (which raises `writer`, then reads our flag with a
        // read-modify-write) needs no total order, only the modification order of our flag: a
        // writer's RMW of the flag either comes after this swap (it reads `true` and waits for
        // us), or before it. In that case this swap (Acquire) reads the value that RMW
        // (Release) wrote, so the writer's raising of `writer` happens-before our load below,
        // which therefore sees it and withdraws. Because it is an RMW on both sides (not a
        // plain load on the writer's), this holds without relying on SeqCst's total order, and
        // loom (which models SeqCst as AcqRel) checks it as written.
        if flag.swap(true, SeqCst) {
            return Err(ReadError::SlotBusy);
        }
        if self.writer.load(SeqCst) {
            flag.store(false, Release);
            return Err(ReadError::Writer);
        }
        // Having read `writer == false` from a writer's releasing store (or the initial value),
        // everything that writer did to the value happens-before what we do now.
        Ok(ReadGuard { gate: self, flag })
    }

    /// Enters as reader `slot`, spinning while a writer is in.
    pub fn read(&self, slot: usize) -> Result<ReadGuard<'_, T>, ReadError> {
        loop {
            match self.try_read(slot) {
                Err(ReadError::Writer) => {
                    while self.writer.load(Relaxed) {
                        spin();
                    }
                }
                r => return r,
            }
        }
    }

    /// Enters as the writer: waits for other writers, then for every reader to leave.
    pub fn write(&self) -> WriteGuard<'_, T> {
        // Acquire pairs with the previous writer's Release in `WriteGuard::drop`.
        while self
            .writers
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            spin();
        }
        // See `try_read`: sequenced before the RMWs of the flags below, whose Release half
        // carries it to a reader whose swap reads from them.
        self.writer.store(true, SeqCst);
        for r in self.readers.iter() {
            // A compare-and-swap of `false` to `false`: while the flag is set it fails (a load:
            // the reader is in, wait); once it succeeds it is an RMW, ordered with the reader's
            // swap by the flag's modification order (see `try_read`). A reader leaves with a
            // Release store of `false`; reading it (Acquire) makes everything that reader did
            // happen-before our access.
            while r.0.compare_exchange(false, false, SeqCst, SeqCst).is_err() {
                spin();
            }
        }
        WriteGuard { gate: self }
    }

    /// Exclusive access through `&mut self`: nobody else can hold the gate.
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

/// A reader inside a [`Gate`]; leaving on drop.
pub struct ReadGuard<'a, T> {
    gate: &'a Gate<T>,
    flag: &'a AtomicBool,
}

impl<T> Deref for ReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: our flag is set and no writer was in when we set it (`try_read`); a writer
        // that came later waits in `write` until we clear the flag. So for this guard's life
        // only shared references to the value exist.
        unsafe { &*self.gate.value.get() }
    }
}

impl<T> Drop for ReadGuard<'_, T> {
    fn drop(&mut self) {
        // Release: our reads of the value happen-before a writer's access (it loads `false`).
        self.flag.store(false, Release);
    }
}

/// The writer inside a [`Gate`]; leaving on drop.
pub struct WriteGuard<'a, T> {
    gate: &'a Gate<T>,
}

impl<T> Deref for WriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: as in `deref_mut`; a shared reborrow of the exclusive access.
        unsafe { &*self.gate.value.get() }
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: we hold `writers` (no other writer), `writer` is raised (no reader enters:
        // `try_read` withdraws) and every reader flag was seen clear after it was raised (every
        // reader that was in has left). Exclusive until the guard drops.
        unsafe { &mut *self.gate.value.get() }
    }
}

impl<T> Drop for WriteGuard<'_, T> {
    fn drop(&mut self) {
        // Release: what we wrote happens-before the accesses of a reader that reads `false`,
        // and of the next writer (which acquires `writers`).
        self.gate.writer.store(false, Release);
        self.gate.writers.store(false, Release);
    }
}

/// A test-and-set spin lock.
pub struct SpinLock<T> {
    value: UnsafeCell<T>,
    held: AtomicBool,
}

// SAFETY: the lock hands `&mut T` to one thread at a time; moving that access between threads
// needs `T: Send`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub fn new(value: T) -> Self {
        SpinLock {
            value: UnsafeCell::new(value),
            held: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_, T> {
        // Acquire pairs with the Release in `SpinGuard::drop`: the previous holder's writes
        // are visible.
        while self
            .held
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            spin();
        }
        SpinGuard { lock: self }
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: we hold the lock (see `deref_mut`).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: `held` was CASed from false to true by us and is cleared only when this
        // guard drops: no other guard exists meanwhile.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.held.store(false, Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn gate_slots_are_checked_and_exclusive() {
        let g = Gate::new(5u32, 2).unwrap();
        assert_eq!(g.try_read(2).err(), Some(ReadError::NoSuchSlot));
        let r = g.try_read(0).unwrap();
        assert_eq!(*r, 5);
        assert_eq!(g.try_read(0).err(), Some(ReadError::SlotBusy));
        let r1 = g.try_read(1).unwrap();
        drop((r, r1));
        *g.write() += 1;
        assert_eq!(*g.read(1).unwrap(), 6);
    }

    #[test]
    fn gate_readers_never_see_a_writer_half_way() {
        // The writer keeps the two fields equal only while it is outside; a reader that
        // overlapped it would see them differ (and miri would flag the data race).
        const ROUNDS: usize = if cfg!(miri) { 20 } else { 2000 };
        let g = Arc::new(Gate::new((0u64, 0u64), 2).unwrap());
        let readers: Vec<_> = (0..2)
            .map(|slot| {
                let g = g.clone();
                thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        let r = g.read(slot).unwrap();
                        assert_eq!(r.0, r.1);
                    }
                })
            })
            .collect();
        for _ in 0..ROUNDS {
            let mut w = g.write();
            w.0 += 1;
            w.1 += 1;
        }
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(*g.read(0).unwrap(), (ROUNDS as u64, ROUNDS as u64));
    }

    #[test]
    fn spin_lock_counts_exactly() {
        const ROUNDS: u64 = if cfg!(miri) { 50 } else { 10_000 };
        let l = Arc::new(SpinLock::new(0u64));
        let t: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for t in t {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 2 * ROUNDS);
    }
}

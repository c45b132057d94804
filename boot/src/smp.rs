//! The per-CPU state word and work slot of the SMP layers (`kernel::arch::{x86_64,aarch64}::smp`):
//! the bring-up handshake between the boot CPU and a CPU it starts (aarch64: PSCI CPU_ON;
//! x86_64 marks its CPUs ready once they are online, its INIT-SIPI-SIPI time-out having its own
//! bookkeeping), then the work hand-off between any launcher and that CPU. Plain atomics, so
//! the protocol runs in host tests with real threads (below and `boot/tests/smp_mailbox.rs`).
//!
//! States and who moves them:
//!
//! ```text
//!  OFFLINE --prepare_start (boot)--> STARTING --arrive (CPU, CAS)--> ARRIVED --ready (CPU)--> IDLE
//!                                        \--abandon (boot, CAS)--> ABANDONED (the CPU parks if it ever arrives)
//!  IDLE --post: CAS (launcher)--> CLAIMED --post: store--> POSTED --take (CPU)--> RUNNING --finish (CPU)--> IDLE
//! ```
//!
//! Orderings (each pair publishes the data written before the Release to the thread whose
//! Acquire load sees the value):
//! - `ready` Release / `is_up` Acquire: the CPU's setup (its GIC, its per-CPU fields) is
//!   visible to the boot CPU once it sees the CPU up;
//! - `post`'s CAS IDLE→CLAIMED Acquire: the launcher sees the previous work's effects, and the
//!   CAS makes it the slot's only writer; the slot is then written Relaxed and published by the
//!   store of POSTED with Release;
//! - `take`'s load of POSTED with Acquire pairs with it: the CPU reads the slot and everything
//!   the launcher wrote before posting;
//! - `finish`'s store of IDLE with Release / `is_idle`'s Acquire load: the work's effects are
//!   visible to whoever sees it finished;
//! - `arrive` and `abandon` are CASes on STARTING: exactly one of them succeeds, so a CPU the
//!   boot CPU gave up on can never be counted online, and a CPU that arrived is never given up.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const OFFLINE: u8 = 0;
const STARTING: u8 = 1;
const ARRIVED: u8 = 2;
const IDLE: u8 = 3;
const CLAIMED: u8 = 4;
const POSTED: u8 = 5;
const RUNNING: u8 = 6;
const ABANDONED: u8 = 7;

/// [`Mailbox::post`] refused: the CPU is not idle (running or being posted work, or not up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// One CPU's state word and its one-entry work slot (two words: a function address and its
/// argument, as the kernel's `launch` gives them).
pub struct Mailbox {
    state: AtomicU8,
    func: AtomicUsize,
    arg: AtomicUsize,
}

impl Default for Mailbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Mailbox {
    pub const fn new() -> Self {
        Mailbox {
            state: AtomicU8::new(OFFLINE),
            func: AtomicUsize::new(0),
            arg: AtomicUsize::new(0),
        }
    }

    /// The boot CPU's own mailbox: permanently running (it never takes posted work).
    pub fn set_running(&self) {
        self.state.store(RUNNING, Ordering::Relaxed);
    }

    /// Boot CPU, before CPU_ON. Relaxed: what the CPU needs before it arrives reaches it through
    /// the cache clean and DSB before the firmware call, not through this word.
    pub fn prepare_start(&self) {
        self.state.store(STARTING, Ordering::Relaxed);
    }

    /// Boot CPU, after CPU_ON failed: the CPU will never come.
    pub fn reset(&self) {
        self.state.store(OFFLINE, Ordering::Relaxed);
    }

    /// The started CPU, first thing in Rust. `false`: the boot CPU gave up on it; park.
    pub fn arrive(&self) -> bool {
        self.state
            .compare_exchange(STARTING, ARRIVED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Boot CPU, when the arrival wait timed out. `true`: given up for good (the CPU's
    /// `arrive` will fail); `false`: the CPU arrived after all.
    pub fn abandon(&self) -> bool {
        self.state
            .compare_exchange(STARTING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Boot CPU: whether the CPU has left STARTING (arrived, or abandoned).
    pub fn left_starting(&self) -> bool {
        self.state.load(Ordering::Acquire) != STARTING
    }

    /// The started CPU, once its setup is done: idle, ready for work.
    pub fn ready(&self) {
        self.state.store(IDLE, Ordering::Release);
    }

    /// Whether the CPU is up (has called [`ready`](Self::ready)) — idle or working.
    pub fn is_up(&self) -> bool {
        matches!(
            self.state.load(Ordering::Acquire),
            IDLE | CLAIMED | POSTED | RUNNING
        )
    }

    /// Posts `(func, arg)` if the CPU is idle; of several concurrent posters at most one wins.
    pub fn post(&self, func: usize, arg: usize) -> Result<(), Busy> {
        self.state
            .compare_exchange(IDLE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| Busy)?;
        self.func.store(func, Ordering::Relaxed);
        self.arg.store(arg, Ordering::Relaxed);
        self.state.store(POSTED, Ordering::Release);
        Ok(())
    }

    /// The CPU: the posted work, if any; it is then RUNNING until [`finish`](Self::finish).
    pub fn take(&self) -> Option<(usize, usize)> {
        if self.state.load(Ordering::Acquire) != POSTED {
            return None;
        }
        let work = (
            self.func.load(Ordering::Relaxed),
            self.arg.load(Ordering::Relaxed),
        );
        // Only the owner CPU moves POSTED on, so this cannot race with another store.
        self.state.store(RUNNING, Ordering::Relaxed);
        Some(work)
    }

    /// The CPU: the work it took has returned.
    pub fn finish(&self) {
        self.state.store(IDLE, Ordering::Release);
    }

    /// Whether the CPU is idle: up, with no work posted or running.
    pub fn is_idle(&self) -> bool {
        self.state.load(Ordering::Acquire) == IDLE
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::sync::atomic::AtomicU32;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn one_cycle() {
        let m = Mailbox::new();
        assert!(!m.is_idle(), "offline until its CPU says ready");
        m.ready();
        assert!(m.is_idle());
        assert_eq!(m.take(), None);
        m.post(10, 20).unwrap();
        assert!(!m.is_idle());
        assert_eq!(m.post(1, 2), Err(Busy), "a second post before the work ran");
        assert_eq!(m.take(), Some((10, 20)));
        assert_eq!(m.take(), None, "taken once");
        assert_eq!(m.post(1, 2), Err(Busy), "still running");
        assert!(!m.is_idle());
        m.finish();
        assert!(m.is_idle());
        m.post(3, 4).unwrap();
        assert_eq!(m.take(), Some((3, 4)));
    }

    /// An owner thread runs posted work (adding `arg` to a plain-ish counter via Relaxed
    /// atomics); posters on two threads race. Every accepted post runs exactly once, and after
    /// `is_idle` the poster sees the work's effect (Release in `finish`, Acquire in `is_idle`).
    #[test]
    fn racing_posters_each_accepted_post_runs_once() {
        let m = Arc::new(Mailbox::new());
        m.ready();
        let sum = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicU32::new(0));
        let owner = {
            let (m, sum, stop) = (m.clone(), sum.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ran = 0u64;
                loop {
                    if let Some((f, a)) = m.take() {
                        assert_eq!(f, 0xf00);
                        sum.store(sum.load(Ordering::Relaxed) + a as u64, Ordering::Relaxed);
                        ran += 1;
                        m.finish();
                    } else if stop.load(Ordering::Acquire) == 1 {
                        return ran;
                    }
                    std::hint::spin_loop();
                }
            })
        };
        let posters: std::vec::Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut accepted = 0u64;
                    for _ in 0..2000 {
                        if m.post(0xf00, 1).is_ok() {
                            accepted += 1;
                        }
                        std::hint::spin_loop();
                    }
                    accepted
                })
            })
            .collect();
        let accepted: u64 = posters.into_iter().map(|p| p.join().unwrap()).sum();
        while !m.is_idle() {
            std::hint::spin_loop();
        }
        assert_eq!(sum.load(Ordering::Relaxed), accepted);
        stop.store(1, Ordering::Release);
        assert_eq!(owner.join().unwrap(), accepted);
        assert!(accepted > 0);
    }
}

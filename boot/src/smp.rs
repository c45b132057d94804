//! The work mailbox between the boot CPU and an idle secondary CPU (architecture-neutral; the
//! x86_64 and aarch64 `arch::smp` modules use it). Safe code over atomics; host-tested.
//!
//! One mailbox per secondary CPU. Its state moves only forward around one cycle:
//!
//! ```text
//!   IDLE --post (CAS, one poster wins)--> CLAIMED --(work written)--> POSTED
//!     ^                                                                 |
//!     |                                                       take (owner CPU)
//!     +------------------- finish (owner CPU) <------- RUNNING <--------+
//! ```
//!
//! Memory ordering: the poster writes the work words (Relaxed) and then stores POSTED with
//! **Release**; the owner's **Acquire** load that sees POSTED therefore sees the work words
//! (and everything the poster wrote before posting). When the work is done, the owner stores
//! IDLE with **Release**; a caller whose **Acquire** load (`is_idle`) sees IDLE sees everything
//! the work wrote. The CAS IDLE -> CLAIMED is Acquire so a new poster also sees the previous
//! work's effects before overwriting the words. Only the owner CPU calls `take` and `finish`.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

const IDLE: u32 = 0;
const CLAIMED: u32 = 1;
const POSTED: u32 = 2;
const RUNNING: u32 = 3;

/// Why [`Mailbox::post`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// Two words of work (a function address and its argument) and the state above.
#[derive(Debug)]
pub struct Mailbox {
    state: AtomicU32,
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
        Self {
            state: AtomicU32::new(IDLE),
            func: AtomicUsize::new(0),
            arg: AtomicUsize::new(0),
        }
    }

    /// Posts `(func, arg)` if the owner is idle; at most one of several concurrent posters wins.
    pub fn post(&self, func: usize, arg: usize) -> Result<(), Busy> {
        // Acquire: pairs with `finish`'s Release, so the previous work is over before its words
        // are overwritten.
        self.state
            .compare_exchange(IDLE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| Busy)?;
        // Only the CLAIMED holder writes the words; the owner does not read them before POSTED.
        self.func.store(func, Ordering::Relaxed);
        self.arg.store(arg, Ordering::Relaxed);
        // Release: publishes the two words (and the poster's earlier writes) to `take`.
        self.state.store(POSTED, Ordering::Release);
        Ok(())
    }

    /// The owner CPU: the posted work, if any, which is now RUNNING until [`finish`](Self::finish).
    pub fn take(&self) -> Option<(usize, usize)> {
        // Acquire: pairs with `post`'s Release store of POSTED.
        if self.state.load(Ordering::Acquire) != POSTED {
            return None;
        }
        let work = (
            self.func.load(Ordering::Relaxed),
            self.arg.load(Ordering::Relaxed),
        );
        // Only the owner moves POSTED -> RUNNING; nobody else writes the state until IDLE.
        self.state.store(RUNNING, Ordering::Relaxed);
        Some(work)
    }

    /// The owner CPU: the work taken last has returned.
    pub fn finish(&self) {
        // Release: publishes everything the work wrote to `is_idle`'s and `post`'s Acquire.
        self.state.store(IDLE, Ordering::Release);
    }

    /// Whether no work is posted or running (the last posted work has finished).
    pub fn is_idle(&self) -> bool {
        self.state.load(Ordering::Acquire) == IDLE
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn one_cycle() {
        let m = Mailbox::new();
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

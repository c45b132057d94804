//! Posted virtual interrupts: a 256-bit set of vectors that interrupt handlers on any CPU add
//! to and one vCPU takes before it enters its guest (`kernel/src/guest/msi/`). Lock-free.
//!
//! Orderings: [`PostedVectors::post`] is a `fetch_or` with Release, so whatever the handler
//! wrote before (a route's delivery count) happens-before the vCPU's [`take`](PostedVectors::take),
//! a `swap(0)` with Acquire that reads the bit. Each bit is delivered exactly once: the swap
//! is one atomic read-modify-write, so a concurrent `fetch_or` is ordered either before it
//! (the bit is in this take) or after it (the bit stays for the next take); the two never
//! both see it, and it is never lost. Two posts of one vector before a take are one bit, as
//! an edge-triggered interrupt's IRR bit is.
//!
//! `tests/posted_loom.rs` compiles this file against loom's atomics (through the
//! `posted_sync` facade in `lib.rs`) and checks exactly these claims.

use crate::posted_sync::AtomicU64;
use core::sync::atomic::Ordering;

pub struct PostedVectors([AtomicU64; 4]);

impl Default for PostedVectors {
    fn default() -> Self {
        Self::new()
    }
}

impl PostedVectors {
    #[cfg(loom)]
    pub fn new() -> Self {
        // loom's atomics have no const constructor.
        PostedVectors(core::array::from_fn(|_| AtomicU64::new(0)))
    }

    #[cfg(not(loom))]
    pub const fn new() -> Self {
        PostedVectors([const { AtomicU64::new(0) }; 4])
    }

    pub fn post(&self, vector: u8) {
        self.0[usize::from(vector / 64)].fetch_or(1 << (vector % 64), Ordering::Release);
    }

    /// Every vector posted since the last take, as four 64-bit words (vector v is bit v % 64
    /// of word v / 64).
    pub fn take(&self) -> [u64; 4] {
        let mut out = [0; 4];
        for (o, w) in out.iter_mut().zip(&self.0) {
            *o = w.swap(0, Ordering::Acquire);
        }
        out
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use core::sync::atomic::AtomicU32;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn posts_coalesce_and_take_clears() {
        let p = PostedVectors::new();
        p.post(0x41);
        p.post(0x41);
        p.post(0xff);
        p.post(0x20);
        assert_eq!(p.take(), [1 << 0x20, 1 << 1, 0, 1 << 63]);
        assert_eq!(p.take(), [0; 4]);
    }

    /// Four posting threads, each posting its own vectors one at a time after counting them;
    /// the taker sees every vector exactly once overall, and never a bit before its count.
    #[test]
    fn concurrent_posts_are_taken_exactly_once() {
        let p = Arc::new(PostedVectors::new());
        let counted = Arc::new([const { AtomicU32::new(0) }; 256]);
        let mut threads = Vec::new();
        for t in 0..4u32 {
            let (p, counted) = (p.clone(), counted.clone());
            threads.push(std::thread::spawn(move || {
                for v in (16 + t * 60)..(16 + t * 60 + 60) {
                    counted[v as usize].fetch_add(1, Ordering::Relaxed);
                    p.post(v as u8);
                }
            }));
        }
        let mut seen = [0u32; 256];
        let take = |seen: &mut [u32; 256]| {
            for (w, bits) in p.take().into_iter().enumerate() {
                for b in 0..64 {
                    if bits & 1 << b != 0 {
                        let v = w * 64 + b;
                        // Release/Acquire: the handler's count is visible with its bit.
                        assert_eq!(counted[v].load(Ordering::Relaxed), 1);
                        seen[v] += 1;
                    }
                }
            }
        };
        while !threads.iter().all(|t| t.is_finished()) {
            take(&mut seen);
        }
        for t in threads {
            t.join().unwrap();
        }
        take(&mut seen);
        for (v, &n) in seen.iter().enumerate() {
            assert_eq!(n, u32::from(v >= 16), "vector {v:#x}");
        }
    }
}

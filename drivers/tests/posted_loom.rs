//! loom model of the posted-interrupt set (`drivers/src/posted.rs`): host MSI handlers on two
//! CPUs post vectors (`fetch_or`, Release) while the vCPU takes everything posted
//! (`swap(0)`, Acquire) before it enters its guest. The last model puts the kernel's per-slot
//! summary flag (`ANY_POSTED`, `kernel/src/guest/msi/mod.rs`) in front of the set.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p drivers --release --test posted_loom -- --nocapture`
//!
//! `posted.rs` is compiled into this test against loom's atomics (the `posted_sync` module
//! below replaces the library's facade). Each model prints how many executions loom explored
//! and fails below its floor (`FLOOR_*`, about half the count observed when the floor was
//! set), so a model that stopped racing fails instead of passing vacuously.
//!
//! The payloads are Relaxed atomics on purpose: loom lets a Relaxed load return any value
//! not ordered before it, so a payload is only guaranteed visible through the post's
//! Release / the take's Acquire. Weakening either ordering in `posted.rs` fails the models.
#![cfg(loom)]

#[path = "../../iommu/tests/loom_support/mod.rs"]
mod loom_support;

#[allow(dead_code)]
#[path = "../src/posted.rs"]
mod posted;

mod posted_sync {
    pub use loom::sync::atomic::AtomicU64;
}

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU32};
use loom::thread;
use loom_support::model;
use posted::PostedVectors;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// Observed 321: two posters on three vectors against two takes.
const FLOOR_EXACTLY_ONCE: usize = 160;
/// Observed 285: two posts of one vector against two takes.
const FLOOR_COALESCED: usize = 142;

/// Vectors of word 0 (both posters contend on one word) and of word 2.
const A: u8 = 0x21;
const B: u8 = 0x22;
const C: u8 = 0xa0;

fn has(take: &[u64; 4], v: u8) -> bool {
    take[usize::from(v / 64)] & 1 << (v % 64) != 0
}

/// Two handlers post distinct vectors (one of them two, in different words), each after
/// writing that vector's payload; the vCPU takes once while they run and once after. Every
/// vector is taken exactly once — a post racing the first take lands in it or in the next,
/// never in both and never in neither — and its payload is visible when its bit is taken.
#[test]
fn every_post_is_taken_exactly_once_with_its_payload() {
    model("posted exactly once", FLOOR_EXACTLY_ONCE, || {
        let p = Arc::new(PostedVectors::new());
        // Payload per vector, indexed A, B, C.
        let payload = Arc::new([AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)]);
        let posters: Vec<_> = [&[(A, 0usize)][..], &[(B, 1), (C, 2)][..]]
            .into_iter()
            .map(|vs| {
                let (p, payload) = (p.clone(), payload.clone());
                let vs = vs.to_vec();
                thread::spawn(move || {
                    for (v, i) in vs {
                        payload[i].store(u32::from(v), Relaxed);
                        p.post(v);
                    }
                })
            })
            .collect();
        let mut seen = [0u32; 3];
        let take = |seen: &mut [u32; 3]| {
            let t = p.take();
            for (i, v) in [A, B, C].into_iter().enumerate() {
                if has(&t, v) {
                    // Acquire (take) pairs with Release (post): the payload is there.
                    assert_eq!(payload[i].load(Relaxed), u32::from(v), "vector {v:#x}");
                    seen[i] += 1;
                }
            }
            // Nothing but posted vectors ever shows up.
            let mut stray = t;
            for v in [A, B, C] {
                stray[usize::from(v / 64)] &= !(1 << (v % 64));
            }
            assert_eq!(stray, [0; 4], "stray bits in {t:x?}");
        };
        take(&mut seen);
        for t in posters {
            t.join().unwrap();
        }
        take(&mut seen);
        assert_eq!(seen, [1, 1, 1], "a vector was lost or taken twice");
        assert_eq!(p.take(), [0; 4]);
    });
}

/// Both handlers post the same vector, each after its own payload. The two posts are one
/// bit or two takes, but no post is lost: each handler's payload is visible at a take that
/// saw the vector (the second `fetch_or` continues the first one's release sequence, so a
/// take that reads the merged bit acquires both).
#[test]
fn coalesced_posts_carry_every_posters_payload() {
    model("posted coalesced", FLOOR_COALESCED, || {
        let p = Arc::new(PostedVectors::new());
        let payload = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let posters: Vec<_> = (0..2)
            .map(|i| {
                let (p, payload) = (p.clone(), payload.clone());
                thread::spawn(move || {
                    payload[i].store(1, Relaxed);
                    p.post(A);
                })
            })
            .collect();
        let mut takes = 0;
        let mut covered = [false; 2];
        let take = |takes: &mut u32, covered: &mut [bool; 2]| {
            if has(&p.take(), A) {
                *takes += 1;
                for (c, pl) in covered.iter_mut().zip(payload.iter()) {
                    *c |= pl.load(Relaxed) == 1;
                }
            }
        };
        take(&mut takes, &mut covered);
        for t in posters {
            t.join().unwrap();
        }
        take(&mut takes, &mut covered);
        assert!((1..=2).contains(&takes), "vector taken {takes} times");
        assert_eq!(
            covered,
            [true, true],
            "a post's payload was never delivered"
        );
    });
}

// Mirrors `kernel/src/guest/msi/mod.rs`: `post` (the bit, then the per-slot summary flag
// `ANY_POSTED`) and `take_posted_if_any` (a Relaxed check, then an Acquire swap of the flag to
// false, then the words), step for step and with the same orderings, over the real
// `PostedVectors`. The kernel's statics cannot be compiled against loom, so a change to either
// kernel function must be copied here.

/// `msi::post`: the vector's bit (`fetch_or`, Release), *then* the summary (`swap(true)`,
/// Release: an RMW, so a later post's swap continues this one's release sequence).
fn post_flagged(p: &PostedVectors, any: &AtomicBool, vector: u8) {
    p.post(vector);
    any.swap(true, Release);
}

/// `msi::take_posted_if_any`: `None` unless the Relaxed check and then the Acquire swap to
/// false both read true; only then the words.
fn take_if_any(p: &PostedVectors, any: &AtomicBool) -> Option<[u64; 4]> {
    if !any.load(Relaxed) || !any.swap(false, Acquire) {
        return None;
    }
    Some(p.take())
}

/// Observed 2940: two flagged posters on three vectors against three flagged takes.
const FLOOR_FLAGGED: usize = 1470;

/// The summary flag in front of the set: two handlers post A (word 0) and B, C (word 0 and
/// word 2) through `post_flagged` while the vCPU calls `take_if_any` twice; after the
/// handlers are joined one more `take_if_any` must get everything not yet taken (a post the
/// flag hid from an earlier take left the flag true), every vector is taken exactly once
/// with its payload visible, and nothing is left in the words.
#[test]
fn summary_flag_never_hides_a_post() {
    model("posted behind summary flag", FLOOR_FLAGGED, || {
        let p = Arc::new(PostedVectors::new());
        let any = Arc::new(AtomicBool::new(false));
        let payload = Arc::new([AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)]);
        let posters: Vec<_> = [&[(A, 0usize)][..], &[(B, 1), (C, 2)][..]]
            .into_iter()
            .map(|vs| {
                let (p, any, payload) = (p.clone(), any.clone(), payload.clone());
                let vs = vs.to_vec();
                thread::spawn(move || {
                    for (v, i) in vs {
                        payload[i].store(u32::from(v), Relaxed);
                        post_flagged(&p, &any, v);
                    }
                })
            })
            .collect();
        let mut seen = [0u32; 3];
        let take = |seen: &mut [u32; 3]| {
            let Some(t) = take_if_any(&p, &any) else {
                return;
            };
            for (i, v) in [A, B, C].into_iter().enumerate() {
                if has(&t, v) {
                    // The word's Acquire swap pairs with the post's Release fetch_or.
                    assert_eq!(payload[i].load(Relaxed), u32::from(v), "vector {v:#x}");
                    seen[i] += 1;
                }
            }
        };
        take(&mut seen);
        take(&mut seen);
        for t in posters {
            t.join().unwrap();
        }
        // Every post is now ordered before this take: the flag must let it through to
        // whatever the first two takes left.
        take(&mut seen);
        assert_eq!(
            seen,
            [1, 1, 1],
            "a vector was hidden by the flag or taken twice"
        );
        assert_eq!(p.take(), [0; 4], "bits left behind a false summary");
    });
}

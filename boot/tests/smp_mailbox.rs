//! The SMP mailbox (`boot::smp`) with real threads: the bring-up handshake
//! and the work hand-off, including races between launchers and between arrival and time-out.

use boot::smp::{Busy, Mailbox};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[test]
fn sequential_protocol() {
    let m = Mailbox::new();
    assert_eq!(m.post(1, 2), Err(Busy), "offline");
    assert!(!m.is_idle() && !m.is_up());
    m.prepare_start();
    assert_eq!(m.post(1, 2), Err(Busy), "starting");
    assert!(!m.left_starting());
    assert!(m.arrive());
    assert!(m.left_starting());
    assert!(!m.abandon(), "an arrived CPU is never given up");
    assert_eq!(m.post(1, 2), Err(Busy), "arrived, not ready");
    m.ready();
    assert!(m.is_idle() && m.is_up());
    assert_eq!(m.take(), None, "nothing posted");
    assert_eq!(m.post(7, 9), Ok(()));
    assert_eq!(m.post(1, 2), Err(Busy), "a second post before the work ran");
    assert!(!m.is_idle() && m.is_up());
    assert_eq!(m.take(), Some((7, 9)));
    assert_eq!(m.take(), None, "taken once");
    assert_eq!(m.post(1, 2), Err(Busy), "still running");
    assert!(!m.is_idle());
    m.finish();
    assert!(m.is_idle());
    assert_eq!(m.post(3, 4), Ok(()));
    assert_eq!(m.take(), Some((3, 4)));
    m.finish();
}

#[test]
fn abandoned_cpu_never_arrives() {
    let m = Mailbox::new();
    m.prepare_start();
    assert!(m.abandon());
    assert!(!m.arrive(), "a late CPU must park");
    assert!(!m.is_up() && !m.is_idle());
    assert_eq!(m.post(1, 2), Err(Busy));
    let boot = Mailbox::new();
    boot.set_running();
    assert_eq!(boot.post(1, 2), Err(Busy), "the boot CPU takes no work");
    // CPU_ON refused: back to OFFLINE, still not up and taking no work.
    let refused = Mailbox::new();
    refused.prepare_start();
    refused.reset();
    assert!(!refused.is_up() && !refused.arrive());
    assert_eq!(refused.post(1, 2), Err(Busy));
}

/// Arrival against time-out, many times: exactly one side wins every race.
#[test]
fn arrive_and_abandon_race() {
    for _ in 0..2000 {
        let m = Arc::new(Mailbox::new());
        m.prepare_start();
        let cpu = {
            let m = Arc::clone(&m);
            std::thread::spawn(move || m.arrive())
        };
        let abandoned = m.abandon();
        let arrived = cpu.join().unwrap();
        assert!(
            arrived ^ abandoned,
            "arrived {arrived}, abandoned {abandoned}"
        );
    }
}

/// An owner thread runs posted work (adding `arg` to a counter written with Relaxed stores and
/// a plain `value` field the poster checks after `is_idle`); two posters race. Every accepted
/// post runs exactly once, and each poster, once it sees the CPU idle, sees its work's effect.
#[test]
fn posters_race_and_see_completed_work() {
    const POSTS: u64 = 2000;
    let m = Arc::new(Mailbox::new());
    let sum = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    m.prepare_start();
    let owner = {
        let (m, sum, last, stop) = (m.clone(), sum.clone(), last.clone(), stop.clone());
        std::thread::spawn(move || {
            assert!(m.arrive());
            m.ready();
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some((func, arg)) = m.take() {
                    assert_eq!(func, 0xf00d);
                    sum.fetch_add(arg as u64, Ordering::Relaxed);
                    last.store(arg as u64, Ordering::Relaxed);
                    runs += 1;
                    m.finish();
                } else {
                    std::hint::spin_loop();
                }
            }
            runs
        })
    };
    while !m.is_up() {
        std::hint::spin_loop();
    }
    let posters: Vec<_> = (0..2u64)
        .map(|p| {
            let (m, last) = (m.clone(), last.clone());
            std::thread::spawn(move || {
                let mut accepted = 0u64;
                let mut busy = 0u64;
                for i in 0..POSTS {
                    let arg = (p << 32) | (i + 1);
                    loop {
                        match m.post(0xf00d, arg as usize) {
                            Ok(()) => break,
                            Err(Busy) => {
                                busy += 1;
                                std::hint::spin_loop();
                            }
                        }
                    }
                    accepted += arg;
                    // Wait for this work (or a later one of the other poster) to finish; the
                    // Acquire in is_idle then shows a `last` at least as new as ours unless
                    // the other poster's work ran after it.
                    while !m.is_idle() {
                        std::hint::spin_loop();
                    }
                    let seen = last.load(Ordering::Relaxed);
                    assert!(
                        seen == arg || seen >> 32 != p,
                        "own work's effect not visible"
                    );
                }
                (accepted, busy)
            })
        })
        .collect();
    let mut expected = 0;
    for p in posters {
        expected += p.join().unwrap().0;
    }
    while !m.is_idle() {
        std::hint::spin_loop();
    }
    stop.store(true, Ordering::Relaxed);
    let runs = owner.join().unwrap();
    assert_eq!(runs, 2 * POSTS, "every accepted post ran exactly once");
    assert_eq!(sum.load(Ordering::Relaxed), expected);
}

//! The runner the interrupt loom models share (`iommu/tests/fault_events_loom.rs`,
//! `drivers/tests/vectors_loom.rs`, `drivers/tests/gic_handlers_loom.rs`, which include this
//! file by path): runs one model, prints how many executions loom explored and fails below the
//! model's floor (about half the count observed when the floor was set), so a model that
//! stopped racing fails instead of passing vacuously.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub fn model(name: &str, min_executions: usize, f: impl Fn() + Sync + Send + 'static) {
    let iterations = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = iterations.clone();
    let mut b = loom::model::Builder::new();
    // Bounded: every interleaving with at most three preemptions, which keeps `cargo xtask
    // test` fast as the models grow. With no bound these models also pass, exhaustively, in
    // under a second each (each file notes its unbounded counts).
    b.preemption_bound = Some(3);
    b.max_branches = 100_000;
    b.check(move || {
        counter.fetch_add(1, Relaxed);
        f();
    });
    let n = iterations.load(Relaxed);
    println!("loom model {name}: {n} executions explored");
    assert!(
        n >= min_executions,
        "{name} explored {n} executions, below its floor of {min_executions}"
    );
}

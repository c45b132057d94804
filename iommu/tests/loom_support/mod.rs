//! The runner the loom models share (`iommu/tests/{pgtable,gate,ioas,iova_index,
//! fault_events}_loom.rs`, `drivers/tests/{vectors,gic_handlers,posted,msi_route}_loom.rs`,
//! which include this file by path): runs one model within its preemption bound, prints how
//! many executions loom explored and fails below the model's floor (about half the count
//! observed when the floor was set), so a model that stopped racing fails instead of passing
//! vacuously.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// How many preemptions loom may make in one execution of a model.
// Each test that includes this file uses the bounds it needs, not all of them.
#[allow(dead_code)]
pub enum Preemptions {
    /// At most this many, whatever `LOOM_MAX_PREEMPTIONS` says.
    AtMost(usize),
    /// `LOOM_MAX_PREEMPTIONS` when it is set (`loom::model::Builder::new` reads it), else at
    /// most this many.
    EnvOr(usize),
    /// No bound: every interleaving.
    Unbounded,
}

/// [`model_with`] at most three preemptions, the interrupt models' bound: every interleaving
/// with at most three preemptions keeps `cargo xtask test` fast as the models grow. With no
/// bound these models also pass, exhaustively, in under a second each (each file notes its
/// unbounded counts).
#[allow(dead_code)] // not called by the models that choose their own bound
pub fn model(name: &str, min_executions: usize, f: impl Fn() + Sync + Send + 'static) {
    model_with(name, min_executions, Preemptions::AtMost(3), f);
}

/// Runs `f` under loom within `preemptions`, prints the number of executions explored and
/// fails if it is below `min_executions`.
pub fn model_with(
    name: &str,
    min_executions: usize,
    preemptions: Preemptions,
    f: impl Fn() + Sync + Send + 'static,
) {
    let iterations = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = iterations.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = match preemptions {
        Preemptions::AtMost(n) => Some(n),
        Preemptions::EnvOr(n) => b.preemption_bound.or(Some(n)),
        Preemptions::Unbounded => None,
    };
    b.max_branches = 100_000;
    b.check(move || {
        counter.fetch_add(1, Relaxed);
        f();
    });
    let n = iterations.load(Relaxed);
    println!("loom model {name}: {n} executions explored");
    assert!(
        n >= min_executions,
        "{name} explored {n} executions, below its floor of {min_executions}: \
         the threads no longer race as the model intends"
    );
}

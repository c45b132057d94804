//! `cargo xtask test`: host unit tests, then every QEMU scenario, then one summary line.

use crate::Arch;
use crate::build::{Image, build};
use crate::qemu::{command, execute, hypervisor_status, render};
use crate::scenario::{self, Scenario};
use crate::util::{Result, cargo};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

#[derive(Default)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    /// Scenarios that failed with a `known_bug` declared.
    pub known_bugs: usize,
    failures: Vec<String>,
}

pub fn test(
    arch: Option<Arch>,
    filter: Option<&str>,
    no_host: bool,
    no_loom: bool,
    release: bool,
) -> Result<ExitCode> {
    crate::setup::setup(crate::setup::Needs::all())?;
    let mut tally = Tally::default();
    if !no_host {
        host_tests(filter, &mut tally)?;
        if !no_loom && filter.is_none() {
            loom_models(&mut tally)?;
        }
    }
    let scenarios: Vec<Scenario> = scenario::load_all()?
        .into_iter()
        .filter(|s| arch.is_none_or(|a| a == s.arch))
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .collect();
    let mut images: HashMap<&'static str, Image> = HashMap::new();
    for s in &scenarios {
        if !images.contains_key(s.arch.name()) {
            match build(s.arch, release) {
                Ok(img) => {
                    images.insert(s.arch.name(), img);
                }
                Err(e) => {
                    println!("FAIL build {}: {e}", s.arch.name());
                    tally.failed += 1;
                    tally.failures.push(format!("build {}", s.arch.name()));
                    continue;
                }
            }
        }
    }
    for s in &scenarios {
        let Some(image) = images.get(s.arch.name()) else {
            tally.failed += 1;
            tally
                .failures
                .push(format!("scenario {} (no image)", s.name));
            continue;
        };
        run_scenario(s, image, &mut tally);
    }
    if !tally.failures.is_empty() {
        println!("\nfailed:");
        for f in &tally.failures {
            println!("    {f}");
        }
    }
    println!("\n{} passed, {} failed", tally.passed, tally.failed);
    if tally.known_bugs > 0 {
        println!(
            "{} scenario(s) hit their declared known bug (KNOWN-BUG above)",
            tally.known_bugs
        );
    }
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the workspace's host tests, echoing cargo's output and adding up libtest's counts.
fn host_tests(filter: Option<&str>, tally: &mut Tally) -> Result<()> {
    println!("== host unit tests ==");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "kernel"]);
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    run_libtest(cmd, "host unit tests", tally)
}

/// The loom models of the lock-free protocols: the page-table engine's, the reader/writer
/// gate `dispatch` runs behind, the lock-free IOAS area slots and their IOVA index, VT-d fault-event bookkeeping against
/// its drain, and the interrupt tables (x86 vectors, GICv3 handlers). Exhaustive interleavings
/// within each model's bound; each prints how many executions it explored. A separate target
/// directory keeps the `--cfg loom` build from invalidating the normal one. The interrupt
/// models take seconds once built (preemption bound 3).
pub fn loom_models(tally: &mut Tally) -> Result<()> {
    for (krate, test) in [
        ("iommu", "pgtable_loom"),
        ("iommu", "gate_loom"),
        ("iommu", "ioas_loom"),
        ("iommu", "iova_index_loom"),
        ("iommu", "fault_events_loom"),
        ("drivers", "vectors_loom"),
        ("drivers", "gic_handlers_loom"),
        ("drivers", "posted_loom"),
        ("drivers", "msi_route_loom"),
    ] {
        println!("== loom models ({krate}/tests/{test}.rs) ==");
        let mut cmd = cargo();
        cmd.args([
            "test",
            "--release",
            "-p",
            krate,
            "--test",
            test,
            "--",
            "--nocapture",
        ])
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", crate::build::target_dir().join("loom"));
        run_libtest(cmd, "loom models", tally)?;
    }
    Ok(())
}

/// Runs a libtest-based command, echoing its output and adding its counts to `tally`.
fn run_libtest(mut cmd: std::process::Command, what: &str, tally: &mut Tally) -> Result<()> {
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cargo test: {e}"))?;
    let out = child.stdout.take().expect("piped");
    let (mut passed, mut failed) = (0usize, 0usize);
    for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
        println!("{line}");
        // "test result: ok. 12 passed; 0 failed; 0 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| -> usize {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(key)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += num("passed");
            failed += num("failed");
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    tally.passed += passed;
    tally.failed += failed;
    if !status.success() {
        if failed == 0 {
            // A build error or a crashed test binary: count it, never let it look green.
            tally.failed += 1;
        }
        tally.failures.push(what.into());
    }
    println!("{what}: {passed} passed, {failed} failed");
    Ok(())
}

fn run_scenario(s: &Scenario, image: &Image, tally: &mut Tally) {
    let timeout = Some(Duration::from_secs(s.timeout_secs));
    let result = match s.bochs_cpu.as_deref() {
        Some(model) => crate::bochs::run(s, image, model, timeout, false),
        None => command(s, image, false, &[]).and_then(|cmd| {
            let rendered = render(&cmd);
            execute(cmd, timeout, false).map(|o| (o, rendered))
        }),
    };
    let (outcome, rendered) = match result {
        Ok(x) => x,
        Err(e) => {
            println!("FAIL {:<28} {e}", s.name);
            tally.failed += 1;
            tally.failures.push(format!("scenario {}", s.name));
            return;
        }
    };
    let status = match s.bochs_cpu {
        Some(_) => crate::bochs::hypervisor_status(&outcome, timeout),
        None => hypervisor_status(s.arch, &outcome, timeout),
    };
    let problems = scenario::check(s, &outcome.lines, status);
    let secs = outcome.elapsed.as_secs_f64();
    if problems.is_empty() {
        println!("PASS {:<28} {secs:6.2} s  {}", s.name, s.description);
        tally.passed += 1;
    } else {
        match &s.known_bug {
            Some(bug) => println!("KNOWN-BUG {:<23} {secs:6.2} s  {bug}", s.name),
            None => println!("FAIL {:<28} {secs:6.2} s  {}", s.name, s.description),
        }
        println!("  command: {rendered}");
        for p in &problems {
            println!("  - {p}");
        }
        println!("  console (last 40 lines):");
        for l in outcome
            .lines
            .iter()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("  | {l}");
        }
        if !outcome.stderr.trim().is_empty() {
            println!("  emulator stderr:");
            for l in outcome.stderr.lines().take(20) {
                println!("  ! {l}");
            }
        }
        if s.known_bug.is_some() {
            tally.known_bugs += 1;
        } else {
            tally.failed += 1;
            tally.failures.push(format!("scenario {}", s.name));
        }
    }
}

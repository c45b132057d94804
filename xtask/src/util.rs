//! Small process and path helpers shared by the subcommands.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

pub type Result<T> = std::result::Result<T, String>;

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The `cargo` that invoked us (keeps the toolchain pinned by rust-toolchain.toml).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, failing with a message naming it if it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Whether `program --version` runs successfully.
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The shared data directory beside the repository (`../shared`), overridable with `HV_SHARED`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("HV_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared"))
}

/// `cargo xtask fuzz TARGET`: runs a cargo-fuzz target of `iommu/fuzz` for a bounded time,
/// seeded with the real firmware tables.
pub fn fuzz(target: &str, seconds: u64) -> Result<ExitCode> {
    const TARGETS: [&str; 3] = ["dmar", "iort", "dispatch"];
    if !TARGETS.contains(&target) {
        return Err(format!(
            "unknown fuzz target {target:?}; known: {}",
            TARGETS.join(", ")
        ));
    }
    crate::setup::setup(crate::setup::Needs {
        fuzz: true,
        ..crate::setup::Needs::none()
    })?;
    let fuzz_dir = root().join("iommu/fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    // Seed with every real table of the kind, so the fuzzer starts from valid structure.
    let tables = shared_dir().join("acpi-tables");
    if let Ok(entries) = std::fs::read_dir(&tables) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(&format!("-{target}.bin")) {
                let _ = std::fs::copy(e.path(), corpus.join(&name));
            }
        }
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&fuzz_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "+nightly",
            "fuzz",
            "run",
            target,
            corpus.to_str().unwrap(),
            "--",
        ])
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048");
    run(&mut cmd)?;
    println!("fuzz {target}: ran {seconds} s with no crash");
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask bench SUITE [--peer]`: results explained in docs/perf.md.
pub fn bench(suite: &str, peer: bool) -> Result<ExitCode> {
    if peer && suite != "hypercall" {
        return Err("--peer is for `bench hypercall` only".into());
    }
    match suite {
        "pgtable" => {
            run(cargo().args(["bench", "-p", "iommu", "--bench", "pgtable"]))?;
            Ok(ExitCode::SUCCESS)
        }
        // Timed inside guests with the TSC / CNTVCT (tests/guests `bench`), both architectures.
        "hypercall" => crate::bench::hypercall(peer),
        other => Err(format!(
            "unknown bench suite {other:?}; known: pgtable, hypercall, dispatch"
        )),
    }
}

/// `cargo xtask verify [--miri]`.
pub fn verify(miri: bool) -> Result<ExitCode> {
    let mut tally = crate::test::Tally::default();
    crate::test::loom_models(&mut tally)?;
    if miri {
        let nightly_miri = Command::new("rustup")
            .args(["component", "add", "miri", "--toolchain", "nightly"])
            .status()
            .is_ok_and(|s| s.success());
        if !nightly_miri {
            return Err("cannot install miri for the nightly toolchain".into());
        }
        println!("== miri (page-table engine tests) ==");
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("MIRIFLAGS", "-Zmiri-disable-isolation")
            .env("CARGO_TARGET_DIR", crate::build::target_dir().join("miri"))
            .args([
                "+nightly",
                "miri",
                "test",
                "-p",
                "iommu",
                "--lib",
                "--test",
                "pgtable_ops",
                "--",
                "pgtable",
            ]);
        run(&mut cmd)?;
    }
    println!("verify: done");
    Ok(if tally_ok(&tally) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn tally_ok(t: &crate::test::Tally) -> bool {
    t.failed == 0
}

//! `cargo xtask`: the one entry point for building, booting and testing the hypervisor.
//!
//! Every subcommand has `--help`. `run` and `test` call `setup` first when a prerequisite is
//! missing, so a fresh machine needs nothing but Rust and this repository.

mod bench;
mod bochs;
mod build;
mod decode;
mod guests;
mod image;
mod qemu;
mod scenario;
mod setup;
mod spcr;
mod test;
mod util;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test the IOMMU hypervisor",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Target architecture of the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    pub fn triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-none",
            Arch::Aarch64 => "aarch64-unknown-none",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Install missing prerequisites (rustup targets and components, QEMU >= 10 from Debian
    /// bookworm-backports, GRUB tools); idempotent. Without root it prints the commands instead.
    Setup {
        /// Also install what `fuzz` needs (nightly toolchain, cargo-fuzz).
        #[arg(long)]
        fuzz: bool,
    },
    /// Build the hypervisor image.
    Build {
        #[arg(long, value_enum, default_value = "x86_64")]
        arch: Arch,
        #[arg(long)]
        release: bool,
    },
    /// Write a bootable image: a hybrid BIOS + UEFI ISO and an EFI System Partition tree with a
    /// user-editable command line (x86_64: GRUB entry with guests; aarch64: UEFI, startup.nsh).
    Image {
        #[arg(long, value_enum, default_value = "x86_64")]
        arch: Arch,
        #[arg(long)]
        release: bool,
        /// Output directory (default: target/image/ARCH).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Boot the hypervisor under QEMU, stream its console, exit with the hypervisor's status.
    Run {
        #[arg(long, value_enum, default_value = "x86_64")]
        arch: Arch,
        #[arg(long)]
        release: bool,
        /// Start QEMU's gdb server on :1234 and wait for the debugger before the first instruction.
        #[arg(long)]
        gdb: bool,
        /// A scenario from tests/scenarios/ (its QEMU devices and command line; its expectations are
        /// checked too). Default: the architecture's boot report.
        #[arg(long)]
        scenario: Option<String>,
        /// Extra QEMU arguments, after `--`.
        #[arg(last = true)]
        qemu_args: Vec<String>,
    },
    /// Host unit tests, then every QEMU scenario; ends with `N passed, N failed`.
    Test {
        /// Only scenarios of this architecture (host tests still run).
        #[arg(long, value_enum)]
        arch: Option<Arch>,
        /// Only host tests and scenarios whose name contains PATTERN.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the host unit tests (and the loom models).
        #[arg(long)]
        no_host: bool,
        /// Skip the loom models (page-table engine and dispatch gate; about two minutes).
        #[arg(long)]
        no_loom: bool,
        /// Build the hypervisor in release mode for the scenarios.
        #[arg(long)]
        release: bool,
    },
    /// Run a fuzz target (nightly cargo-fuzz, installed on demand): dmar, iort, dispatch.
    Fuzz {
        target: String,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Decode binary DMAR or IORT tables with the hypervisor's own parsers.
    DecodeTable {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// The page-table engine's concurrency checks: loom models, and with `--miri` its tests
    /// under miri (nightly; slow: tens of minutes on two cores).
    Verify {
        #[arg(long)]
        miri: bool,
    },
    /// Benchmarks (see docs/perf.md): `pgtable` (host), `hypercall` (inside guests under QEMU,
    /// both architectures; `--peer` also runs the Linux iommufd peer and prints the ratios),
    /// `dispatch` (host: `iommufd::dispatch` over the VT-d backend, ns per call and 1 vs 2
    /// threads, then instructions per call under valgrind's callgrind).
    Bench {
        #[arg(default_value = "pgtable")]
        suite: String,
        /// `hypercall` only: also run the Linux iommufd peer.
        #[arg(long)]
        peer: bool,
        /// `dispatch` only: fewer rounds (about a second instead of a minute).
        #[arg(long)]
        quick: bool,
        /// `dispatch` only: skip the instruction counts under callgrind.
        #[arg(long)]
        no_valgrind: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup { fuzz } => setup::setup(setup::Needs {
            fuzz,
            ..setup::Needs::all()
        }),
        Command::Build { arch, release } => build::build(arch, release).map(|_| ExitCode::SUCCESS),
        Command::Image { arch, release, out } => image::image_command(arch, release, out),
        Command::Run {
            arch,
            release,
            gdb,
            scenario,
            qemu_args,
        } => qemu::run_command(arch, release, gdb, scenario.as_deref(), &qemu_args),
        Command::Test {
            arch,
            filter,
            no_host,
            no_loom,
            release,
        } => test::test(arch, filter.as_deref(), no_host, no_loom, release),
        Command::Verify { miri } => util::verify(miri),
        Command::Fuzz { target, seconds } => util::fuzz(&target, seconds),
        Command::DecodeTable { files } => Ok(decode::decode_tables(&files)),
        Command::Bench {
            suite,
            quick,
            no_valgrind,
            ..
        } if suite == "dispatch" => bench::dispatch(quick, !no_valgrind),
        Command::Bench { quick: true, .. }
        | Command::Bench {
            no_valgrind: true, ..
        } => Err("--quick and --no-valgrind are for `bench dispatch` only".into()),
        Command::Bench { suite, peer, .. } => util::bench(&suite, peer),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_args(args: &[&str]) -> (String, bool, bool, bool) {
        let cli = Cli::try_parse_from(args).unwrap();
        match cli.command {
            Command::Bench {
                suite,
                peer,
                quick,
                no_valgrind,
            } => (suite, peer, quick, no_valgrind),
            _ => panic!("not the bench subcommand"),
        }
    }

    #[test]
    fn bench_dispatch_takes_quick_and_no_valgrind() {
        assert_eq!(
            bench_args(&["xtask", "bench", "dispatch", "--quick", "--no-valgrind"]),
            ("dispatch".into(), false, true, true)
        );
        assert_eq!(
            bench_args(&["xtask", "bench", "dispatch"]),
            ("dispatch".into(), false, false, false)
        );
        // The other suites parse as before.
        assert_eq!(
            bench_args(&["xtask", "bench", "hypercall", "--peer"]),
            ("hypercall".into(), true, false, false)
        );
        assert_eq!(
            bench_args(&["xtask", "bench"]),
            ("pgtable".into(), false, false, false)
        );
    }
}

//! Booting the hypervisor under Bochs: the x86 emulator with Intel VMX (and a second SVM model).
//!
//! QEMU's TCG has no VMX; Debian's Bochs 2.7 has VMX with EPT, VPID and unrestricted guest
//! (`cpu: model=corei7_haswell_4770`) and its own SVM with NRIPS (`model=ryzen`). It has no
//! IOMMU and no edu device. Bochs cannot load a kernel itself, so the hypervisor boots from the
//! same GRUB rescue ISO as the `boot = "grub"` QEMU scenarios (`multiboot2` plus one `module2`
//! per guest image).
//!
//! Facts this runner leans on (Debian bookworm's `bochs` 2.7, see
//! /work/shared/reference/guests-smp-uefi-facts.md): the build has no `nogui` display, so it
//! runs with `display_library: term` and stdin from /dev/null; the built-in debugger needs an rc
//! file whose only command is `c` (continue); COM1 goes to a file, which is the console; the
//! hypervisor (`exit=bochs`) ends Bochs by writing "Shutdown" to port 0x8900, after which Bochs
//! exits with status 1 whatever the hypervisor's status was, so the status comes from the
//! console line `hypervisor: exit status N` alone, and only together with that exit code.

use crate::build::{Image, target_dir};
use crate::qemu::{Outcome, execute, grub_iso, printed_status};
use crate::scenario::{Boot, Scenario};
use crate::util::Result;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Bochs's exit code after the "Shutdown" port sequence (and after most other ends).
const BOCHS_SHUTDOWN_RC: i32 = 1;

/// Bochs CPU models a scenario may name (Bochs 2.7 `cpu: model=`), with what each proves.
pub const MODELS: [&str; 2] = [
    // Intel Haswell: VMX with EPT, VPID, unrestricted guest, TRUE controls.
    "corei7_haswell_4770",
    // AMD Zen: SVM with NPT, NRIPS (fills nRIP), flush-by-ASID; no x2APIC, so the
    // hypervisor's preemption timer runs on the xAPIC MMIO page. Runs the SVM guest scenarios
    // (bochs-svm-*) as a second SVM implementation beside QEMU's.
    "ryzen",
];

/// The files of one Bochs run.
pub struct Run {
    pub cmd: Command,
    pub serial: PathBuf,
}

/// Builds the ISO, the bochsrc and the debugger rc file for scenario `s` and returns the Bochs
/// command. The hypervisor gets `exit=bochs` in front of the scenario's command line.
pub fn command(s: &Scenario, image: &Image, model: &str) -> Result<Run> {
    if !MODELS.contains(&model) {
        return Err(format!(
            "scenario {}: bochs cpu model {model:?} is not one of {MODELS:?}",
            s.name
        ));
    }
    if s.boot != Boot::Grub {
        return Err(format!(
            "scenario {}: Bochs boots only a GRUB ISO (boot = \"grub\")",
            s.name
        ));
    }
    let mut modules = Vec::new();
    for name in &s.guests {
        modules.push((name.clone(), crate::guests::build_image(s.arch, name)?));
    }
    let cmdline = format!("exit=bochs {}", s.cmdline).trim().to_string();
    let iso = grub_iso(&format!("bochs-{}", s.name), &image.elf, &cmdline, &modules)?;
    let dir = target_dir().join("xtask/bochs").join(&s.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let serial = dir.join("serial.txt");
    // A stale console from the last run must never be read as this run's.
    let _ = std::fs::remove_file(&serial);
    let megs = memory_megs(&s.memory)?;
    let rc = format!(
        "megs: {megs}\n\
         cpu: model={model}, count={count}, ips=100000000\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
         vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         boot: cdrom\n\
         display_library: term\n\
         com1: enabled=1, mode=file, dev={serial}\n\
         log: {log}\n\
         panic: action=fatal\n\
         clock: sync=none, time0=local\n\
         speaker: enabled=0\n",
        count = s.bochs_cpus.clamp(1, 16),
        iso = iso.display(),
        serial = serial.display(),
        log = dir.join("bochs.log").display(),
    );
    let bochsrc = dir.join("bochsrc");
    std::fs::write(&bochsrc, rc).map_err(|e| format!("{}: {e}", bochsrc.display()))?;
    // The debugger is compiled into Debian's Bochs: without a `c` it waits at the first
    // instruction.
    let debug_rc = dir.join("debug.rc");
    std::fs::write(&debug_rc, "c\n").map_err(|e| format!("{}: {e}", debug_rc.display()))?;
    let mut cmd = Command::new("bochs");
    cmd.arg("-q")
        .arg("-f")
        .arg(&bochsrc)
        .arg("-rc")
        .arg(&debug_rc);
    Ok(Run { cmd, serial })
}

/// `256M` / `1G` / `512` (MiB) -> MiB.
fn memory_megs(m: &str) -> Result<u64> {
    let (num, mul) = match m.trim().as_bytes().last() {
        Some(b'M' | b'm') => (&m[..m.len() - 1], 1),
        Some(b'G' | b'g') => (&m[..m.len() - 1], 1024),
        _ => (m, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mul)
        .map_err(|_| format!("memory {m:?}: not a size in MiB or GiB"))
}

/// Runs scenario `s` under Bochs until it ends (or `timeout`); the outcome's lines are the
/// serial console file, Bochs's own terminal output is dropped.
pub fn run(
    s: &Scenario,
    image: &Image,
    model: &str,
    timeout: Option<Duration>,
    echo: bool,
) -> Result<(Outcome, String)> {
    let Run { cmd, serial } = command(s, image, model)?;
    let rendered = crate::qemu::render(&cmd);
    let mut o = execute(cmd, timeout, false)?;
    let bytes = std::fs::read(&serial).unwrap_or_default();
    o.lines = String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    if echo {
        for l in &o.lines {
            println!("{l}");
        }
    }
    Ok((o, rendered))
}

/// The hypervisor's status: its console line, accepted only if Bochs ended the way the
/// shutdown port ends it (exit code 1), so a Bochs panic or a hang never passes for a result.
pub fn hypervisor_status(
    o: &Outcome,
    timeout: Option<Duration>,
) -> std::result::Result<u32, String> {
    let printed = printed_status(o, timeout)?;
    let rc = o.qemu_rc.ok_or("Bochs was killed by a signal")?;
    match printed {
        Some(st) if rc == BOCHS_SHUTDOWN_RC => Ok(st),
        Some(st) => Err(format!(
            "console said status {st} but Bochs exited with code {rc}, not the shutdown port's {BOCHS_SHUTDOWN_RC}"
        )),
        None => Err(format!(
            "Bochs exited with code {rc} and the hypervisor printed no exit status"
        )),
    }
}

/// `cargo xtask run --scenario NAME` for a Bochs scenario: boots it, echoes the console and,
/// when `check` is set, checks the scenario's expectations.
pub fn run_command(
    s: &Scenario,
    image: &Image,
    model: &str,
    check: bool,
) -> Result<std::process::ExitCode> {
    let timeout = Some(Duration::from_secs(s.timeout_secs));
    let (o, rendered) = run(s, image, model, timeout, true)?;
    eprintln!("xtask: {rendered}");
    let status = hypervisor_status(&o, timeout);
    if check {
        let problems = crate::scenario::check(s, &o.lines, status.clone());
        for p in &problems {
            eprintln!("xtask: scenario {}: {p}", s.name);
        }
        if !problems.is_empty() {
            return Ok(std::process::ExitCode::FAILURE);
        }
    }
    let st = status?;
    eprintln!("xtask: hypervisor exit status {st}");
    Ok(std::process::ExitCode::from(st.min(255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(lines: &[&str], rc: Option<i32>, timed_out: bool) -> Outcome {
        Outcome {
            lines: lines.iter().map(|s| s.to_string()).collect(),
            stderr: String::new(),
            qemu_rc: rc,
            timed_out,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn status_needs_both_the_line_and_the_shutdown_exit() {
        let line = ["x", "hypervisor: exit status 0"];
        assert_eq!(
            hypervisor_status(&outcome(&line, Some(1), false), None),
            Ok(0)
        );
        let failed = ["hypervisor: exit status 1"];
        assert_eq!(
            hypervisor_status(&outcome(&failed, Some(1), false), None),
            Ok(1)
        );
        assert!(hypervisor_status(&outcome(&line, Some(0), false), None).is_err());
        assert!(hypervisor_status(&outcome(&["boot"], Some(1), false), None).is_err());
        assert!(hypervisor_status(&outcome(&line, None, false), None).is_err());
        assert!(hypervisor_status(&outcome(&line, Some(1), true), None).is_err());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(memory_megs("256M").ok(), Some(256));
        assert_eq!(memory_megs("1G").ok(), Some(1024));
        assert_eq!(memory_megs("64").ok(), Some(64));
        assert!(memory_megs("lots").is_err());
    }
}

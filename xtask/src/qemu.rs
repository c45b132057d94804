//! Booting the hypervisor under QEMU: command lines, console capture, timeouts, and turning
//! QEMU's exit code back into the hypervisor's own status.

use crate::build::{Image, build, target_dir};
use crate::scenario::{Boot, Firmware, Scenario};
use crate::util::{Result, run};
use crate::{Arch, scenario};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The default machines, as the project documents them.
pub const X86_MACHINE: &str = "q35";
pub const ARM_MACHINE: &str = "virt-10.0,virtualization=on,iommu=smmuv3,gic-version=3";

fn default_devices(arch: Arch) -> Vec<String> {
    let d: &[&str] = match arch {
        Arch::X86_64 => &["-device", "intel-iommu", "-device", "edu"],
        Arch::Aarch64 => &["-device", "edu"],
    };
    d.iter().map(|s| s.to_string()).collect()
}

/// The isa-debug-exit device turns a write of `v` into QEMU exit code `(v << 1) | 1`; the
/// hypervisor writes `0x10 + status` so that no hypervisor status collides with QEMU's own
/// failure codes (1) or a plain power-off (0).
const X86_EXIT_BIAS: i32 = 0x10;

pub fn command(s: &Scenario, image: &Image, gdb: bool, extra: &[String]) -> Result<Command> {
    let mut cmd;
    let mut cmdline = s.cmdline.clone();
    match s.arch {
        Arch::X86_64 => {
            cmd = Command::new("qemu-system-x86_64");
            cmd.args([
                "-M",
                s.machine.as_deref().unwrap_or(X86_MACHINE),
                "-cpu",
                "max",
            ]);
            cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
            cmdline = format!("exit=qemu {cmdline}");
        }
        Arch::Aarch64 => {
            cmd = Command::new("qemu-system-aarch64");
            cmd.args([
                "-M",
                s.machine.as_deref().unwrap_or(ARM_MACHINE),
                "-cpu",
                "max",
            ]);
            cmd.args(["-semihosting-config", "enable=on,target=native"]);
            cmdline = format!("semihosting {cmdline}");
        }
    }
    // edu DMA completes on a virtual-clock timer; icount makes that instant (see docs).
    cmd.args(["-m", &s.memory, "-display", "none", "-no-reboot"]);
    // The console is read from stdio: COM1 (or the PL011) unless the scenario wires the ports.
    if s.serial.is_empty() {
        cmd.args(["-serial", "stdio"]);
    }
    for backend in &s.serial {
        cmd.args(["-serial", backend]);
    }
    // One virtual microsecond per instruction unless the scenario asks otherwise: edu DMA
    // completes on a virtual-clock timer, and the runs are reproducible.
    match s.icount.as_deref() {
        Some("off") => {}
        Some(v) => {
            cmd.args(["-icount", v]);
        }
        None => {
            cmd.args(["-icount", "shift=10,sleep=off"]);
        }
    }
    if let Some(n) = s.smp {
        cmd.args(["-smp", &n.to_string()]);
    }
    cmd.args(s.devices.clone().unwrap_or_else(|| default_devices(s.arch)));
    cmd.args(expand_qemu_args(&s.qemu_args)?);
    if s.firmware == Firmware::Uefi {
        cmd.args(uefi_pflash(s)?);
    }
    let cmdline = cmdline.trim().to_string();
    // Guests: one archive through -initrd (PVH has a single module), or under GRUB one
    // `module2` per image, as a server's GRUB would load them.
    let mut grub_modules = Vec::new();
    if !s.guests.is_empty() {
        match s.boot {
            // QEMU loads an initrd (and writes /chosen linux,initrd-start/end on aarch64) only
            // for a Linux-style kernel: PVH on x86_64, the raw arm64 Image (not an ELF) on arm.
            Boot::Kernel if s.arch == crate::Arch::Aarch64 => {
                return Err(format!(
                    "scenario {}: aarch64 guests need boot = \"image\" (QEMU passes no initrd to an ELF)",
                    s.name
                ));
            }
            Boot::Kernel | Boot::Image => {
                let archive = crate::guests::prepare(s.arch, &s.name, &s.guests)?;
                cmd.arg("-initrd").arg(archive);
            }
            Boot::Grub if s.arch == Arch::Aarch64 => {
                return Err(format!(
                    "scenario {}: guests cannot be passed through arm64 GRUB yet",
                    s.name
                ));
            }
            Boot::Grub => {
                for name in &s.guests {
                    grub_modules.push((name.clone(), crate::guests::build_image(s.arch, name)?));
                }
            }
            Boot::Esp => {
                return Err(format!(
                    "scenario {}: guests cannot be passed to an ESP boot yet",
                    s.name
                ));
            }
        }
    }
    match s.boot {
        Boot::Kernel => {
            cmd.arg("-kernel")
                .arg(&image.elf)
                .args(["-append", &cmdline]);
        }
        Boot::Image => {
            let raw = image.raw.as_ref().ok_or("no raw Image was built")?;
            cmd.arg("-kernel").arg(raw).args(["-append", &cmdline]);
        }
        Boot::Grub if s.arch == Arch::Aarch64 => {
            let raw = image.raw.as_ref().ok_or("no raw Image was built")?;
            let iso = arm_grub_iso(&s.name, raw, &cmdline)?;
            // A virtio disk, as for the ESP: AAVMF finds the ISO's EFI system partition
            // (grub-mkrescue's hybrid layout) and starts its \EFI\BOOT\BOOTAA64.EFI.
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                iso.display()
            ));
        }
        Boot::Grub => {
            let iso = grub_iso(&s.name, &image.elf, &cmdline, &grub_modules)?;
            cmd.arg("-cdrom").arg(iso).args(["-boot", "d"]);
        }
        Boot::Esp => {
            let dir = target_dir().join("xtask/esp").join(&s.name);
            let (esp, interface) = match s.arch {
                Arch::X86_64 => (
                    crate::image::write_esp(&image.elf, &dir, &cmdline, 0)?,
                    "ide",
                ),
                Arch::Aarch64 => {
                    let raw = image.raw.as_ref().ok_or("no raw Image was built")?;
                    // An empty scenario command line tests the firmware's own default boot of
                    // \EFI\BOOT\BOOTAA64.EFI; otherwise the UEFI shell passes it (startup.nsh).
                    let with = (!s.cmdline.trim().is_empty()).then_some(cmdline.as_str());
                    (crate::image::write_arm_esp(raw, &dir, with)?, "virtio")
                }
            };
            cmd.arg("-drive").arg(format!(
                "file=fat:rw:{},format=raw,if={interface}",
                esp.display()
            ));
        }
    }
    if gdb {
        cmd.args(["-s", "-S"]);
    }
    cmd.args(extra);
    Ok(cmd)
}

/// Replaces `{spcr:KIND:ADDRESS}` in scenario arguments with a built SPCR table's file
/// (`spcr.rs`), and `{acpi-tables}` with the directory of real firmware tables:
/// `IOMMU_ACPI_TABLES` if set (as for the host tests), else `acpi-tables` in the shared data
/// directory beside the repository (`HV_SHARED`, default `../shared`).
fn expand_qemu_args(args: &[String]) -> Result<Vec<String>> {
    const TABLES: &str = "{acpi-tables}";
    let spcr_dir = target_dir().join("xtask/acpi");
    let args = args
        .iter()
        .map(|a| crate::spcr::expand(a, &spcr_dir))
        .collect::<Result<Vec<_>>>()?;
    if !args.iter().any(|a| a.contains(TABLES)) {
        return Ok(args);
    }
    let dir = std::env::var_os("IOMMU_ACPI_TABLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::util::shared_dir().join("acpi-tables"));
    if !dir.is_dir() {
        return Err(format!(
            "{} missing: the real firmware tables live in shared/acpi-tables beside the \
             repository; set IOMMU_ACPI_TABLES to their directory",
            dir.display()
        ));
    }
    let dir = dir.to_string_lossy();
    Ok(args.iter().map(|a| a.replace(TABLES, &dir)).collect())
}

/// The pflash drives for UEFI firmware: the code volume read-only, and a fresh copy of the
/// variable store per run (the firmware writes boot entries into it; a shared or stale copy would
/// make runs depend on each other).
fn uefi_pflash(s: &Scenario) -> Result<Vec<String>> {
    use crate::setup::{AAVMF_CODE, AAVMF_VARS, OVMF_CODE, OVMF_VARS};
    let (code, vars) = match s.arch {
        Arch::X86_64 => (OVMF_CODE, OVMF_VARS),
        Arch::Aarch64 => (AAVMF_CODE, AAVMF_VARS),
    };
    if !Path::new(code).is_file() || !Path::new(vars).is_file() {
        return Err(format!(
            "{code} or {vars} missing (run `cargo xtask setup`)"
        ));
    }
    let dir = target_dir().join("xtask/uefi").join(&s.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let copy = dir.join("vars.fd");
    std::fs::copy(vars, &copy).map_err(|e| format!("copy {vars}: {e}"))?;
    Ok(vec![
        "-drive".into(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", copy.display()),
    ])
}

/// The grub.cfg of the arm64 GRUB ISO: GRUB's `linux` command checks the Image's PE/COFF header
/// ("MZ", "ARM\x64" at 0x38) and starts it as an EFI application whose load options are the
/// command line (after `BOOT_IMAGE=<path>`), the way an arm64 server's GRUB starts Linux.
fn arm_grub_cfg(cmdline: &str) -> String {
    format!(
        "set timeout=0\nset default=0\n\
         menuentry \"IOMMU hypervisor\" {{\n    linux /boot/Image {cmdline}\n    boot\n}}\n"
    )
}

/// Builds an arm64 GRUB rescue ISO (UEFI only) from the modules `cargo xtask setup` unpacks into
/// [`crate::setup::GRUB_ARM64_MODULES`].
fn arm_grub_iso(name: &str, raw: &Path, cmdline: &str) -> Result<PathBuf> {
    use crate::setup::{GRUB_ARM64_MODULES, grub_arm64_ok};
    if !grub_arm64_ok() {
        return Err(format!(
            "arm64 GRUB modules missing in {GRUB_ARM64_MODULES} (run `cargo xtask setup` as root)"
        ));
    }
    let dir = target_dir().join("xtask/grub-arm64").join(name);
    let iso_root = dir.join("iso");
    if iso_root.exists() {
        std::fs::remove_dir_all(&iso_root).map_err(|e| format!("{}: {e}", iso_root.display()))?;
    }
    let grub_dir = iso_root.join("boot/grub");
    std::fs::create_dir_all(&grub_dir).map_err(|e| format!("{}: {e}", grub_dir.display()))?;
    std::fs::copy(raw, iso_root.join("boot/Image")).map_err(|e| format!("copy Image: {e}"))?;
    std::fs::write(grub_dir.join("grub.cfg"), arm_grub_cfg(cmdline))
        .map_err(|e| format!("grub.cfg: {e}"))?;
    let iso = dir.join("hypervisor.iso");
    mkrescue(&["-d", GRUB_ARM64_MODULES], &iso, &iso_root, " (arm64-efi)")?;
    Ok(iso)
}

/// Runs `grub-mkrescue` with `args` first, writing the ISO `iso` from the tree `iso_root`;
/// `flavour` follows the command's name in the error if it fails.
fn mkrescue(args: &[&str], iso: &Path, iso_root: &Path, flavour: &str) -> Result<()> {
    let out = Command::new("grub-mkrescue")
        .args(args)
        .arg("-o")
        .arg(iso)
        .arg(iso_root)
        .output()
        .map_err(|e| format!("grub-mkrescue: {e} (run `cargo xtask setup`)"))?;
    if !out.status.success() {
        return Err(format!(
            "grub-mkrescue{flavour} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Builds a GRUB rescue ISO whose only entry loads the ELF with `multiboot2`, the way a test
/// server's GRUB or iPXE would.
pub fn grub_iso(
    name: &str,
    elf: &Path,
    cmdline: &str,
    modules: &[(String, PathBuf)],
) -> Result<PathBuf> {
    let dir = target_dir().join("xtask/grub").join(name);
    let iso_root = dir.join("iso");
    let grub_dir = iso_root.join("boot/grub");
    std::fs::create_dir_all(&grub_dir).map_err(|e| format!("{}: {e}", grub_dir.display()))?;
    std::fs::copy(elf, iso_root.join("boot/hypervisor")).map_err(|e| format!("copy image: {e}"))?;
    // Each guest image is a module whose command line is the image's name (docs/guests.md).
    let mut module_lines = String::new();
    for (image, path) in modules {
        let file = format!("boot/{image}.elf");
        std::fs::copy(path, iso_root.join(&file)).map_err(|e| format!("copy {image}: {e}"))?;
        module_lines.push_str(&format!("    module2 /{file} {image}\n"));
    }
    let cfg = format!(
        "set timeout=0\nset default=0\nserial --unit=0 --speed=115200\nterminal_output serial\n\
         menuentry \"IOMMU hypervisor\" {{\n    multiboot2 /boot/hypervisor {cmdline}\n{module_lines}    boot\n}}\n"
    );
    std::fs::write(grub_dir.join("grub.cfg"), cfg).map_err(|e| format!("grub.cfg: {e}"))?;
    let iso = dir.join("hypervisor.iso");
    mkrescue(&[], &iso, &iso_root, "")?;
    Ok(iso)
}

/// What one QEMU run produced.
pub struct Outcome {
    pub lines: Vec<String>,
    pub stderr: String,
    pub qemu_rc: Option<i32>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Runs QEMU to completion (or `timeout`), optionally echoing the console as it arrives.
pub fn execute(mut cmd: Command, timeout: Option<Duration>, echo: bool) -> Result<Outcome> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start QEMU ({cmd:?}): {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        // Split on '\n' ourselves: the console may emit bytes that are not UTF-8.
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut lines = Vec::new();
    let mut timed_out = false;
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            if echo {
                println!("{line}");
            }
            lines.push(line);
        }
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = reader.join();
    for line in rx.try_iter() {
        if echo {
            println!("{line}");
        }
        lines.push(line);
    }
    let stderr = err_reader.join().unwrap_or_default();
    if echo && !stderr.is_empty() {
        eprint!("{stderr}");
    }
    Ok(Outcome {
        lines,
        stderr,
        qemu_rc: status.and_then(|s| s.code()),
        timed_out,
        elapsed: start.elapsed(),
    })
}

/// The status in the hypervisor's last `hypervisor: exit status N` console line, if it printed
/// one; an error if the run timed out (`timeout`: the limit it had). What the emulator's exit
/// code must agree with (`hypervisor_status` here and in `bochs.rs`).
pub fn printed_status(
    o: &Outcome,
    timeout: Option<Duration>,
) -> std::result::Result<Option<u32>, String> {
    if o.timed_out {
        return Err(format!(
            "timed out after {} s",
            timeout.map_or(0, |t| t.as_secs())
        ));
    }
    Ok(o.lines.iter().rev().find_map(|l| {
        l.trim()
            .strip_prefix("hypervisor: exit status ")
            .and_then(|v| v.trim().parse::<u32>().ok())
    }))
}

/// The status the hypervisor reported: its console line `hypervisor: exit status N` and QEMU's
/// exit code must agree, so neither a crash that happens to exit 0 nor a stray line passes.
pub fn hypervisor_status(
    arch: Arch,
    o: &Outcome,
    timeout: Option<Duration>,
) -> std::result::Result<u32, String> {
    let printed = printed_status(o, timeout)?;
    let rc = o.qemu_rc.ok_or("QEMU was killed by a signal")?;
    let from_rc = match arch {
        Arch::X86_64 if rc >= (X86_EXIT_BIAS << 1) | 1 && rc % 2 == 1 => {
            Some(((rc >> 1) - X86_EXIT_BIAS) as u32)
        }
        // PSCI SYSTEM_OFF exits 0; semihosting SYS_EXIT carries the status itself.
        Arch::Aarch64 => Some(rc as u32),
        _ => None,
    };
    match (from_rc, printed) {
        (Some(a), Some(b)) if a == b => Ok(a),
        (Some(a), Some(b)) => Err(format!(
            "QEMU exit code {rc} means status {a}, but the console said {b}"
        )),
        (_, None) => Err(format!(
            "QEMU exited with code {rc} and the hypervisor printed no exit status"
        )),
        (None, Some(b)) => Err(format!(
            "console said status {b} but QEMU exited with code {rc} (no debug-exit)"
        )),
    }
}

pub fn run_command(
    arch: Arch,
    release: bool,
    gdb: bool,
    scenario_name: Option<&str>,
    extra: &[String],
) -> Result<ExitCode> {
    crate::setup::setup(crate::setup::Needs::all())?;
    let s = match scenario_name {
        // `--scenario guests`: the guest demo of the chosen architecture.
        Some("guests") => scenario::find(match arch {
            Arch::X86_64 => "x86-guests-contained",
            Arch::Aarch64 => "arm-guests-contained",
        })?,
        Some(name) => scenario::find(name)?,
        None => Scenario::default_for(arch),
    };
    let image = build(s.arch, release)?;
    if let Some(model) = s.bochs_cpu.as_deref() {
        return crate::bochs::run_command(&s, &image, model, scenario_name.is_some());
    }
    let cmd = command(&s, &image, gdb, extra)?;
    if gdb {
        eprintln!(
            "xtask: QEMU waits for gdb: `gdb {} -ex 'target remote :1234'`",
            image.elf.display()
        );
        run(&mut { cmd })?;
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("xtask: {}", render(&cmd));
    let timeout = Some(Duration::from_secs(s.timeout_secs));
    let outcome = execute(cmd, timeout, true)?;
    let status = hypervisor_status(s.arch, &outcome, timeout);
    if scenario_name.is_some() {
        let problems = scenario::check(&s, &outcome.lines, status.clone());
        for p in &problems {
            eprintln!("xtask: scenario {}: {p}", s.name);
        }
        if !problems.is_empty() {
            return Ok(ExitCode::FAILURE);
        }
    }
    match status {
        Ok(st) => {
            eprintln!("xtask: hypervisor exit status {st}");
            Ok(ExitCode::from(st.min(255) as u8))
        }
        Err(e) => Err(e),
    }
}

/// A shell-pasteable rendering of a command line, for logs.
pub fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains([' ', '"', '\'']) || a.is_empty() {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_grub_cfg_starts_the_image_with_linux_and_the_command_line() {
        let cfg = arm_grub_cfg("semihosting scenario=boot-report");
        let entry: Vec<&str> = cfg
            .lines()
            .skip_while(|l| !l.starts_with("menuentry"))
            .map(str::trim)
            .collect();
        assert_eq!(
            entry,
            [
                "menuentry \"IOMMU hypervisor\" {",
                "linux /boot/Image semihosting scenario=boot-report",
                "boot",
                "}",
            ]
        );
        // arm64 GRUB has no multiboot2 module: the x86 entry's loader would fail there.
        assert!(!cfg.contains("multiboot2"));
        assert!(cfg.contains("set timeout=0\n"));
    }
}

//! QEMU scenarios: one TOML file each in `tests/scenarios/`. A scenario names the machine, the
//! devices, the hypervisor command line, and what the console must (and must not) show.
//!
//! Expectations are facts about the *machine* as configured on the QEMU command line (a device
//! placed with `addr=05.0` must be reported at 00:05.0 with requester ID 0x0028), so the
//! hypervisor's report is checked against QEMU, not against itself.

use crate::Arch;
use crate::util::{Result, root};
use serde::Deserialize;
use std::path::Path;

/// How the image reaches the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boot {
    /// QEMU `-kernel` with the ELF: PVH on x86_64, the arm64 Image header on aarch64.
    #[default]
    Kernel,
    /// aarch64: QEMU `-kernel` with the raw `Image` (what U-Boot `booti` loads); DTB in x0.
    Image,
    /// A GRUB rescue ISO, as on a test server. x86_64: the ELF loaded with `multiboot2`;
    /// aarch64 (UEFI only; arm64 GRUB has no multiboot2): the Image started by GRUB's `linux`
    /// command as an EFI application, the command line as its load options.
    Grub,
    /// UEFI from a FAT EFI System Partition: on x86_64 the tree of `cargo xtask image` (GRUB's
    /// BOOTX64.EFI, the user-editable entry); on aarch64 the Image itself as an EFI application
    /// (BOOTAA64.EFI, or started by the UEFI shell's startup.nsh with the command line).
    Esp,
}

/// The machine's firmware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// QEMU's default: SeaBIOS on x86_64 (or `-kernel`'s direct boot), none on aarch64 virt.
    #[default]
    Default,
    /// UEFI: OVMF (x86_64) or AAVMF (aarch64) as pflash, with a fresh copy of the variable store.
    Uefi,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(skip)]
    pub name: String,
    pub description: String,
    pub arch: Arch,
    #[serde(default)]
    pub boot: Boot,
    #[serde(default)]
    pub firmware: Firmware,
    /// `-M` value; default: `q35` / `virt-10.0,virtualization=on,iommu=smmuv3,gic-version=3`.
    pub machine: Option<String>,
    /// Device arguments replacing the architecture's default devices.
    pub devices: Option<Vec<String>>,
    /// Further QEMU arguments appended after the devices. `{acpi-tables}` names the real
    /// firmware tables' directory, `{spcr:KIND:ADDRESS}` a built SPCR table (`spcr.rs`).
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// `-serial` backends in port order (COM1, COM2, ...); the console is read from the one that
    /// is `stdio`. Default: COM1 (the PL011 on aarch64) on stdio.
    #[serde(default)]
    pub serial: Vec<String>,
    /// QEMU's `-icount` value: default `shift=10,sleep=off` (see `qemu.rs`); `off` runs
    /// without icount (multi-threaded TCG, the guest clock follows host time).
    pub icount: Option<String>,
    /// `-smp` value; default: QEMU's (one CPU).
    pub smp: Option<u32>,
    /// The hypervisor command line (xtask adds `exit=qemu` / `semihosting`).
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Regular expressions that must each match at least one console line.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Regular expressions that must match no console line.
    #[serde(default)]
    pub reject: Vec<String>,
    /// An open bug this scenario is known to hit intermittently (what and where it is tracked).
    /// A failure is then printed in full as `KNOWN-BUG` and counted apart, not as a pass and
    /// not as a failure; a run that passes is a normal `PASS`.
    #[serde(default)]
    pub known_bug: Option<String>,
    /// The hypervisor's expected exit status.
    #[serde(default)]
    pub status: u32,
    /// Guest images to build and pass in a guest-image archive (`-initrd`); expectations may
    /// name their symbols as `{sym:NAME}` (see `guests.rs`).
    #[serde(default)]
    pub guests: Vec<String>,
    /// Run under Bochs instead of QEMU with this `cpu: model=` (`bochs.rs`): VMX needs
    /// `corei7_haswell_4770`. `machine`, `devices` and `qemu_args` do not apply there.
    pub bochs_cpu: Option<String>,
    /// Bochs `cpu: count=` (logical CPUs; default 1). QEMU scenarios pass `-smp` in `qemu_args`.
    #[serde(default = "default_bochs_cpus")]
    pub bochs_cpus: u32,
}

fn default_bochs_cpus() -> u32 {
    1
}

fn default_memory() -> String {
    "256M".into()
}

fn default_timeout() -> u64 {
    60
}

impl Scenario {
    /// The scenario `cargo xtask run` boots when none is named: the boot report with the default
    /// machine and devices.
    pub fn default_for(arch: Arch) -> Scenario {
        Scenario {
            name: format!("{}-default", arch.name()),
            description: "boot report on the default machine".into(),
            arch,
            boot: Boot::Kernel,
            firmware: Firmware::Default,
            machine: None,
            devices: None,
            qemu_args: Vec::new(),
            icount: None,
            smp: None,
            serial: Vec::new(),
            cmdline: String::new(),
            memory: default_memory(),
            timeout_secs: default_timeout(),
            expect: Vec::new(),
            reject: Vec::new(),
            known_bug: None,
            status: 0,
            guests: Vec::new(),
            bochs_cpu: None,
            bochs_cpus: default_bochs_cpus(),
        }
    }
}

pub fn scenario_dir() -> std::path::PathBuf {
    root().join("tests/scenarios")
}

pub fn load(path: &Path) -> Result<Scenario> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut s: Scenario = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    s.name = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    for re in s.expect.iter().chain(&s.reject) {
        let re = &crate::guests::substitute(re, |_| Some(0))?;
        regex::Regex::new(re).map_err(|e| format!("{}: bad regex {re:?}: {e}", path.display()))?;
    }
    if s.boot == Boot::Grub && s.arch == Arch::Aarch64 && s.firmware != Firmware::Uefi {
        return Err(format!(
            "{}: boot \"grub\" on aarch64 needs firmware = \"uefi\" (arm64 GRUB is an EFI application)",
            path.display()
        ));
    }
    if s.boot == Boot::Image && s.arch != Arch::Aarch64 {
        return Err(format!(
            "{}: boot {:?} does not exist on {}",
            path.display(),
            s.boot,
            s.arch.name()
        ));
    }
    if (s.firmware == Firmware::Uefi) != matches!(s.boot, Boot::Esp)
        && !matches!(s.boot, Boot::Grub)
    {
        // UEFI cannot be combined with QEMU's -kernel direct boot of our images, and an ESP
        // needs UEFI firmware.
        return Err(format!(
            "{}: firmware \"uefi\" needs boot = \"grub\" or \"esp\", and \"esp\" needs \"uefi\"",
            path.display()
        ));
    }
    if s.bochs_cpu.is_some() && (s.boot != Boot::Grub || s.arch != Arch::X86_64) {
        return Err(format!(
            "{}: bochs_cpu needs arch = \"x86_64\" and boot = \"grub\" (Bochs boots a GRUB ISO)",
            path.display()
        ));
    }
    Ok(s)
}

pub fn load_all() -> Result<Vec<Scenario>> {
    let dir = scenario_dir();
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = e.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            out.push(load(&path)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn find(name: &str) -> Result<Scenario> {
    let path = scenario_dir().join(format!("{name}.toml"));
    if !path.exists() {
        let known: Vec<_> = load_all()?.into_iter().map(|s| s.name).collect();
        return Err(format!("no scenario {name:?}; known: {}", known.join(", ")));
    }
    load(&path)
}

/// Checks a finished run against the scenario's expectations; returns every violation.
pub fn check(
    s: &Scenario,
    lines: &[String],
    status: std::result::Result<u32, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match status {
        Ok(st) if st == s.status => {}
        Ok(st) => problems.push(format!(
            "hypervisor exit status {st}, expected {}",
            s.status
        )),
        Err(e) => problems.push(e),
    }
    let resolve = |re: &String| match crate::guests::resolve(s.arch, &s.guests, re) {
        Ok(re) => re,
        // An unresolvable symbol can match nothing: the expectation fails and says why.
        Err(e) => format!("^unresolved guest symbol: {}$", regex::escape(&e)),
    };
    for re in &s.expect {
        let re = &resolve(re);
        let r = regex::Regex::new(re).expect("validated at load");
        if !lines.iter().any(|l| r.is_match(l)) {
            problems.push(format!("expected a console line matching /{re}/"));
        }
    }
    for re in &s.reject {
        let re = &resolve(re);
        let r = regex::Regex::new(re).expect("validated at load");
        if let Some(l) = lines.iter().find(|l| r.is_match(l)) {
            problems.push(format!("console line {l:?} matches rejected /{re}/"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(name: &str, text: &str) -> Result<Scenario> {
        let dir = std::env::temp_dir().join(format!("xtask-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let s = load(&path);
        let _ = std::fs::remove_file(&path);
        s
    }

    #[test]
    fn arm_grub_needs_uefi() {
        let base = "description = \"d\"\narch = \"aarch64\"\nboot = \"grub\"\n";
        let err = load_text("arm-grub-bios", base).unwrap_err();
        assert!(err.contains("needs firmware = \"uefi\""), "{err}");
        let s = load_text("arm-grub-uefi", &format!("{base}firmware = \"uefi\"\n")).unwrap();
        assert_eq!(
            (s.arch, s.boot, s.firmware),
            (Arch::Aarch64, Boot::Grub, Firmware::Uefi)
        );
    }
}

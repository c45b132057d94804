//! `cargo xtask setup`: installs what building, booting and testing need, idempotently.
//!
//! QEMU 10 comes from Debian bookworm-backports. The mirror is never hard-coded: it is taken from
//! the machine's existing apt sources (the entry that already serves `bookworm main`).

use crate::util::{Result, have, run};
use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};

/// Which groups of prerequisites to check.
#[derive(Clone, Copy)]
pub struct Needs {
    pub rust: bool,
    pub qemu: bool,
    pub grub: bool,
    pub fuzz: bool,
    /// Bochs (the VMX scenarios, `bochs.rs`).
    pub bochs: bool,
}

impl Needs {
    pub fn all() -> Self {
        Needs {
            rust: true,
            qemu: true,
            grub: true,
            fuzz: false,
            bochs: true,
        }
    }
    pub fn none() -> Self {
        Needs {
            rust: false,
            qemu: false,
            grub: false,
            fuzz: false,
            bochs: false,
        }
    }
}

const TARGETS: [&str; 2] = ["x86_64-unknown-none", "aarch64-unknown-none"];
const COMPONENTS: [&str; 4] = ["rustfmt", "clippy", "llvm-tools", "rust-src"];
const QEMU_MIN: (u32, u32) = (10, 0);
/// GRUB for both firmware kinds (`grub-mkrescue` makes a hybrid BIOS + UEFI ISO when both module
/// sets are present), the ISO/FAT tools it calls, and the UEFI firmware QEMU boots it with
/// (`ovmf`: OVMF_CODE_4M.fd + OVMF_VARS_4M.fd; `qemu-efi-aarch64`: AAVMF_CODE.fd + AAVMF_VARS.fd).
const GRUB_PACKAGES: [&str; 7] = [
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "ovmf",
    "qemu-efi-aarch64",
];

/// Paths whose presence shows that [`GRUB_PACKAGES`] are installed (Debian bookworm layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
pub const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";
/// arm64 GRUB's module directory, for `grub-mkrescue -d` (the `arm-uefi-grub` scenario). Debian
/// installs `grub-efi-arm64-bin` only on arm64, so `setup` downloads the arm64 package through the
/// machine's own apt sources (after `dpkg --add-architecture arm64`) and unpacks it here with
/// `dpkg -x`, outside the package database: shared by every checkout on the machine, and nothing
/// of another architecture is installed into the host system.
pub const GRUB_ARM64_ROOT: &str = "/var/cache/xtask/grub-arm64";
pub const GRUB_ARM64_MODULES: &str = "/var/cache/xtask/grub-arm64/usr/lib/grub/arm64-efi";
const GRUB_ARM64_PACKAGE: &str = "grub-efi-arm64-bin:arm64";
/// Debian's Bochs 2.7 (VMX with EPT), its BIOS and VGA BIOS, and the `term` display plugin (the
/// build has no `nogui`).
const BOCHS_PACKAGES: [&str; 4] = ["bochs", "bochsbios", "vgabios", "bochs-term"];

pub fn setup(needs: Needs) -> Result<ExitCode> {
    let mut todo: Vec<String> = Vec::new();
    if needs.rust {
        rust(&mut todo)?;
    }
    if needs.qemu {
        qemu(&mut todo)?;
    }
    if needs.grub {
        grub(&mut todo)?;
        grub_arm64(&mut todo)?;
    }
    if needs.fuzz {
        fuzz(&mut todo)?;
    }
    if needs.bochs {
        bochs(&mut todo)?;
    }
    if todo.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("xtask setup: not running as root; run these commands, then try again:");
    for line in &todo {
        eprintln!("    {line}");
    }
    Err("prerequisites missing".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn rust(_todo: &mut Vec<String>) -> Result<()> {
    // rustup honours rust-toolchain.toml, so these act on the pinned toolchain.
    let installed = |kind: &str| -> String {
        Command::new("rustup")
            .args([kind, "list", "--installed"])
            .current_dir(crate::util::root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let targets = installed("target");
    let missing: Vec<_> = TARGETS
        .iter()
        .filter(|t| !targets.lines().any(|l| l == **t))
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: rustup target add {missing:?}");
        let mut cmd = Command::new("rustup");
        cmd.current_dir(crate::util::root())
            .args(["target", "add"])
            .args(missing.iter().map(|s| **s));
        run(&mut cmd)?;
    }
    let components = installed("component");
    let missing: Vec<_> = COMPONENTS
        .iter()
        .filter(|c| {
            !components
                .lines()
                .any(|l| l.starts_with(&format!("{c}-")) || l == **c)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: rustup component add {missing:?}");
        let mut cmd = Command::new("rustup");
        cmd.current_dir(crate::util::root())
            .args(["component", "add"])
            .args(missing.iter().map(|s| **s));
        run(&mut cmd)?;
    }
    Ok(())
}

/// `QEMU emulator version 10.0.2 (...)` → (10, 0).
fn qemu_version(program: &str) -> Option<(u32, u32)> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

pub fn qemu_ok() -> bool {
    ["qemu-system-x86_64", "qemu-system-aarch64"]
        .iter()
        .all(|q| qemu_version(q).is_some_and(|v| v >= QEMU_MIN))
}

fn os_codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
}

/// One `deb` source: URI, suites, components and an optional Signed-By keyring.
#[derive(Debug, PartialEq)]
struct AptSource {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
}

/// Parses one-line (`deb [opts] URI suite comp...`) and deb822 (`Types:/URIs:/Suites:`) sources.
fn parse_apt_sources(text: &str, deb822: bool) -> Vec<AptSource> {
    let mut out = Vec::new();
    if deb822 {
        for para in text.split("\n\n") {
            let field = |name: &str| -> Option<String> {
                para.lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                    .map(|v| v.trim().to_string())
            };
            let types = field("Types").unwrap_or_default();
            if !types.split_whitespace().any(|t| t == "deb") {
                continue;
            }
            let words = |v: Option<String>| -> Vec<String> {
                v.unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            };
            let suites = words(field("Suites"));
            let components = words(field("Components"));
            let signed_by = field("Signed-By");
            for uri in words(field("URIs")) {
                out.push(AptSource {
                    uri,
                    suites: suites.clone(),
                    components: components.clone(),
                    signed_by: signed_by.clone(),
                });
            }
        }
    } else {
        for line in text.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("deb ") else {
                continue;
            };
            let mut rest = rest.trim();
            let mut signed_by = None;
            if let Some(opts) = rest.strip_prefix('[') {
                let (opts, after) = opts.split_once(']').unwrap_or((opts, ""));
                signed_by = opts
                    .split_whitespace()
                    .find_map(|o| o.strip_prefix("signed-by="))
                    .map(String::from);
                rest = after.trim();
            }
            let mut words = rest.split_whitespace();
            let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                continue;
            };
            out.push(AptSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
                components: words.map(String::from).collect(),
                signed_by,
            });
        }
    }
    out
}

fn all_apt_sources() -> Vec<AptSource> {
    let mut sources = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        sources.extend(parse_apt_sources(&t, false));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let Ok(t) = fs::read_to_string(&p) else {
                continue;
            };
            match p.extension().and_then(|e| e.to_str()) {
                Some("list") => sources.extend(parse_apt_sources(&t, false)),
                Some("sources") => sources.extend(parse_apt_sources(&t, true)),
                _ => {}
            }
        }
    }
    sources
}

/// The deb822 stanza that adds `<codename>-backports` from the mirror already serving `<codename>`.
fn backports_stanza(sources: &[AptSource], codename: &str) -> Result<Option<String>> {
    let backports = format!("{codename}-backports");
    if sources.iter().any(|s| s.suites.contains(&backports)) {
        return Ok(None); // already configured
    }
    let base = sources
        .iter()
        .find(|s| {
            s.suites.iter().any(|x| x == codename) && s.components.iter().any(|c| c == "main")
        })
        .ok_or_else(|| {
            format!(
                "no apt source serves `{codename} main`; cannot derive a mirror for {backports}"
            )
        })?;
    let mut stanza = format!(
        "Types: deb\nURIs: {}\nSuites: {backports}\nComponents: main\n",
        base.uri
    );
    if let Some(key) = &base.signed_by {
        stanza.push_str(&format!("Signed-By: {key}\n"));
    }
    Ok(Some(stanza))
}

const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/xtask-backports.sources";

fn qemu(todo: &mut Vec<String>) -> Result<()> {
    if qemu_ok() {
        return Ok(());
    }
    let codename = os_codename().unwrap_or_default();
    let packages = ["qemu-system-x86", "qemu-system-arm", "qemu-utils"];
    let mut commands: Vec<Vec<String>> = Vec::new();
    let mut stanza = None;
    let mut target_release = None;
    if codename == "bookworm" {
        stanza = backports_stanza(&all_apt_sources(), &codename)?;
        target_release = Some(format!("{codename}-backports"));
    }
    commands.push(vec!["apt-get".into(), "update".into()]);
    let mut install: Vec<String> = vec!["apt-get".into(), "install".into(), "-y".into()];
    if let Some(tr) = &target_release {
        install.extend(["-t".into(), tr.clone()]);
    }
    install.extend(packages.iter().map(|s| s.to_string()));
    commands.push(install);

    if !is_root() {
        if let Some(s) = &stanza {
            todo.push(format!(
                "printf '{}' | sudo tee {BACKPORTS_FILE}",
                s.replace('\n', "\\n")
            ));
        }
        todo.extend(commands.iter().map(|c| format!("sudo {}", c.join(" "))));
        return Ok(());
    }
    if let Some(s) = &stanza {
        eprintln!("xtask setup: adding {BACKPORTS_FILE}:\n{s}");
        fs::write(BACKPORTS_FILE, s).map_err(|e| format!("{BACKPORTS_FILE}: {e}"))?;
    }
    for c in &commands {
        eprintln!("xtask setup: {}", c.join(" "));
        run(Command::new(&c[0])
            .args(&c[1..])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !qemu_ok() {
        return Err(format!(
            "QEMU >= {}.{} still missing after installing",
            QEMU_MIN.0, QEMU_MIN.1
        ));
    }
    Ok(())
}

/// Runs the `apt-get install` command line `cmd` (retried once after `apt-get update`, for a
/// machine whose package lists are stale or missing); without root, adds it to `todo` as a
/// `sudo` line for the user instead.
fn apt_install(cmd: &[String], todo: &mut Vec<String>) -> Result<()> {
    if !is_root() {
        todo.push(format!("sudo {}", cmd.join(" ")));
        return Ok(());
    }
    eprintln!("xtask setup: {}", cmd.join(" "));
    if run(Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .is_err()
    {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn grub(todo: &mut Vec<String>) -> Result<()> {
    let have_all = have("grub-mkrescue")
        && have("xorriso")
        && Path::new("/usr/lib/grub/i386-pc").is_dir()
        && Path::new("/usr/lib/grub/x86_64-efi").is_dir()
        && [OVMF_CODE, OVMF_VARS, AAVMF_CODE, AAVMF_VARS]
            .iter()
            .all(|f| Path::new(f).is_file())
        && have("mformat");
    if have_all {
        return Ok(());
    }
    // No recommends: grub-efi-amd64-bin recommends the signed GRUB and shim, whose maintainer
    // scripts want to install a boot loader on this machine.
    let mut cmd = vec![
        "apt-get".to_string(),
        "install".into(),
        "-y".into(),
        "--no-install-recommends".into(),
    ];
    cmd.extend(GRUB_PACKAGES.iter().map(|s| s.to_string()));
    apt_install(&cmd, todo)
}

/// True once arm64 GRUB's modules are unpacked: `linux.mod` (the command the scenario uses) and
/// `modinfo.sh` (which `grub-mkrescue -d` reads to learn the platform).
pub fn grub_arm64_ok() -> bool {
    let dir = Path::new(GRUB_ARM64_MODULES);
    dir.join("linux.mod").is_file() && dir.join("modinfo.sh").is_file()
}

/// The commands that fetch and unpack arm64 GRUB into [`GRUB_ARM64_ROOT`] (run in `download`).
/// The package is unpacked into `staging`, which is renamed into place only when complete, so an
/// interrupted run never leaves a half-filled module directory that [`grub_arm64_ok`] accepts.
fn grub_arm64_commands(add_arch: bool, download: &str, staging: &str) -> Vec<Vec<String>> {
    let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut commands = Vec::new();
    if add_arch {
        commands.push(w(&["dpkg", "--add-architecture", "arm64"]));
    }
    // The arm64 package lists exist only after an update with arm64 enabled.
    commands.push(w(&["apt-get", "update"]));
    commands.push(w(&["apt-get", "download", GRUB_ARM64_PACKAGE]));
    commands.push(w(&[
        "sh",
        "-c",
        &format!("dpkg -x {download}/grub-efi-arm64-bin_*_arm64.deb {staging}"),
    ]));
    commands
}

fn grub_arm64(todo: &mut Vec<String>) -> Result<()> {
    if grub_arm64_ok() {
        return Ok(());
    }
    let add_arch = !Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == "arm64")
        });
    let download = format!("{GRUB_ARM64_ROOT}.download");
    let staging = format!("{GRUB_ARM64_ROOT}.staging");
    let commands = grub_arm64_commands(add_arch, &download, &staging);
    if !is_root() {
        todo.push(format!("sudo mkdir -p {download} {staging}"));
        for c in &commands {
            let line = match c[1].as_str() {
                "download" => format!("(cd {download} && sudo {})", c.join(" ")),
                _ if c[0] == "sh" => format!("sudo {} '{}'", c[..2].join(" "), c[2]),
                _ => format!("sudo {}", c.join(" ")),
            };
            todo.push(line);
        }
        todo.push(format!("sudo mv {staging} {GRUB_ARM64_ROOT}"));
        return Ok(());
    }
    let fail = |what: &str, e: String| -> String {
        format!(
            "arm64 GRUB for the arm-uefi-grub scenario: {what} failed: {e}\n    \
             (Debian ships grub-efi-arm64-bin for arm64 only; setup fetches it with \
             `apt-get download {GRUB_ARM64_PACKAGE}` from this machine's apt sources and \
             unpacks it into {GRUB_ARM64_ROOT})"
        )
    };
    for dir in [&download, &staging] {
        if Path::new(dir).exists() {
            fs::remove_dir_all(dir).map_err(|e| fail("cleaning up", format!("{dir}: {e}")))?;
        }
        fs::create_dir_all(dir).map_err(|e| fail("mkdir", format!("{dir}: {e}")))?;
    }
    for c in &commands {
        eprintln!("xtask setup: {}", c.join(" "));
        run(Command::new(&c[0])
            .args(&c[1..])
            .current_dir(&download)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .map_err(|e| fail(&c.join(" "), e))?;
    }
    if Path::new(GRUB_ARM64_ROOT).exists() {
        fs::remove_dir_all(GRUB_ARM64_ROOT)
            .map_err(|e| fail("replacing", format!("{GRUB_ARM64_ROOT}: {e}")))?;
    }
    fs::rename(&staging, GRUB_ARM64_ROOT)
        .map_err(|e| fail("rename", format!("{staging} -> {GRUB_ARM64_ROOT}: {e}")))?;
    let _ = fs::remove_dir_all(&download);
    if !grub_arm64_ok() {
        return Err(fail(
            "unpacking",
            format!("{GRUB_ARM64_MODULES} has no linux.mod or modinfo.sh"),
        ));
    }
    Ok(())
}

fn bochs(todo: &mut Vec<String>) -> Result<()> {
    // `bochs --version` starts a simulation; the packages' files and status say enough.
    let have_all = Path::new("/usr/bin/bochs").is_file()
        && Path::new("/usr/share/bochs/BIOS-bochs-latest").is_file()
        && Path::new("/usr/share/vgabios/vgabios.bin").is_file()
        && Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", "bochs-term"])
            .output()
            .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"));
    if have_all {
        return Ok(());
    }
    let mut cmd = vec!["apt-get".to_string(), "install".into(), "-y".into()];
    cmd.extend(BOCHS_PACKAGES.iter().map(|s| s.to_string()));
    apt_install(&cmd, todo)
}

fn fuzz(_todo: &mut Vec<String>) -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let fuzz_ok = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz_ok {
        run(Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backports_derived_from_deb822_source() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let sources = parse_apt_sources(text, true);
        assert_eq!(sources.len(), 2);
        let stanza = backports_stanza(&sources, "bookworm").unwrap().unwrap();
        assert_eq!(
            stanza,
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n"
        );
    }

    #[test]
    fn backports_derived_from_one_line_source_and_skipped_when_present() {
        let text = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n# deb http://x bookworm main\n";
        let sources = parse_apt_sources(text, false);
        assert_eq!(sources[0].uri, "http://m.example/debian");
        assert_eq!(sources[0].signed_by.as_deref(), Some("/k.gpg"));
        assert!(
            backports_stanza(&sources, "bookworm")
                .unwrap()
                .unwrap()
                .contains("URIs: http://m.example/debian\n")
        );
        let with_bpo = parse_apt_sources(
            "deb http://m.example/debian bookworm-backports main\n",
            false,
        );
        assert_eq!(backports_stanza(&with_bpo, "bookworm").unwrap(), None);
        assert!(
            backports_stanza(
                &parse_apt_sources("deb http://n/ubuntu jammy main\n", false),
                "bookworm"
            )
            .is_err()
        );
    }

    #[test]
    fn arm64_grub_fetched_through_apt_then_unpacked_into_staging() {
        let cmds = grub_arm64_commands(true, "/d", "/s");
        let lines: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "dpkg --add-architecture arm64",
                "apt-get update",
                "apt-get download grub-efi-arm64-bin:arm64",
                "sh -c dpkg -x /d/grub-efi-arm64-bin_*_arm64.deb /s",
            ]
        );
        // Already enabled: the architecture is not added twice, the rest is unchanged.
        let again = grub_arm64_commands(false, "/d", "/s");
        assert_eq!(again[..], cmds[1..]);
        // The modules land where grub-mkrescue -d is pointed.
        assert_eq!(
            Path::new(GRUB_ARM64_ROOT).join("usr/lib/grub/arm64-efi"),
            Path::new(GRUB_ARM64_MODULES)
        );
    }
}

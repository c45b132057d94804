//! Guest images for scenarios that run guests (`guests = [...]` in the scenario TOML): builds the
//! test guest for the guest target of the scenario's architecture, packs the images into the
//! guest-image archive that the hypervisor reads from its single boot module (`-initrd`: PVH's
//! module on x86_64, the DT `/chosen` initrd range on aarch64; format in docs/guests.md and
//! `boot::guests::Archive`), and resolves guest symbols for expectations (`{sym:NAME}`).

use crate::Arch;
use crate::build::target_dir;
use crate::util::{Result, cargo, root, run};
use std::path::PathBuf;

/// The guest images xtask knows how to build: (image name, crate directory, binary name).
const IMAGES: &[(&str, &str, &str)] = &[("testguest", "tests/guests", "testguest")];

/// Builds image `name` for `arch` (the same source for both: only its shim differs, selected by
/// `target_arch`); returns the ELF.
pub fn build_image(arch: Arch, name: &str) -> Result<PathBuf> {
    let &(_, dir, bin) = IMAGES.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        let known: Vec<_> = IMAGES.iter().map(|i| i.0).collect();
        format!("unknown guest image {name:?}; known: {}", known.join(", "))
    })?;
    let out = target_dir().join("guests");
    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root().join(dir).join("Cargo.toml"))
        .args(["--target", arch.triple(), "--target-dir"])
        .arg(&out);
    run(&mut cmd)?;
    Ok(out.join(arch.triple()).join("debug").join(bin))
}

/// The archive (docs/guests.md "Guest-image archive"): header `HVGUEST1`, `u32` count,
/// `u32` 0; then per image a 32-byte NUL-padded name, `u64` offset and `u64` size; then the
/// images, each 8-byte aligned. Little-endian.
pub fn pack(images: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(b"HVGUEST1");
    out.extend_from_slice(&(images.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut offset = (16 + 48 * images.len()) as u64;
    let mut layout = Vec::new();
    for (name, data) in images {
        if name.is_empty() || name.len() > 32 {
            return Err(format!("guest image name {name:?} must be 1-32 bytes"));
        }
        offset = offset.next_multiple_of(8);
        layout.push(offset);
        let mut n = [0u8; 32];
        n[..name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&n);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        offset += data.len() as u64;
    }
    for ((_, data), off) in images.iter().zip(layout) {
        out.resize(off as usize, 0);
        out.extend_from_slice(data);
    }
    Ok(out)
}

/// Builds every image the scenario names and writes their archive; returns its path.
pub fn prepare(arch: Arch, scenario: &str, names: &[String]) -> Result<PathBuf> {
    let mut images = Vec::new();
    for name in names {
        let elf = build_image(arch, name)?;
        let data = std::fs::read(&elf).map_err(|e| format!("{}: {e}", elf.display()))?;
        images.push((name.clone(), data));
    }
    let dir = target_dir().join("xtask/guests");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{scenario}.hvguests"));
    std::fs::write(&path, pack(&images)?).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// The value of symbol `sym` in an ELF64 little-endian file (its `.symtab`).
pub fn symbol(elf: &[u8], sym: &str) -> Option<u64> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let shoff = u64_at(0x28)? as usize;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let section = |i: usize| shoff + i * shentsize;
    let symtab = (0..shnum).find(|&i| u32_at(section(i) + 4) == Some(2))?;
    let (off, size) = (
        u64_at(section(symtab) + 0x18)? as usize,
        u64_at(section(symtab) + 0x20)? as usize,
    );
    let strtab = u32_at(section(symtab) + 0x28)? as usize;
    let str_off = u64_at(section(strtab) + 0x18)? as usize;
    for s in (off..off + size).step_by(24) {
        let name = str_off + u32_at(s)? as usize;
        let end = elf.get(name..)?.iter().position(|&c| c == 0)? + name;
        if &elf[name..end] == sym.as_bytes() {
            return u64_at(s + 8);
        }
    }
    None
}

/// Replaces every `{sym:NAME}` in `pattern` with `0x` and the hex value from `lookup`.
pub fn substitute(pattern: &str, lookup: impl Fn(&str) -> Option<u64>) -> Result<String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(i) = rest.find("{sym:") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 5..];
        let end = tail
            .find('}')
            .ok_or_else(|| format!("unterminated {{sym: in {pattern:?}"))?;
        let name = &tail[..end];
        let v = lookup(name).ok_or_else(|| format!("guest symbol {name:?} not found"))?;
        out.push_str(&format!("{v:#x}"));
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Resolves `{sym:NAME}` against the scenario's guest images (built by [`prepare`]).
pub fn resolve(arch: Arch, names: &[String], pattern: &str) -> Result<String> {
    if !pattern.contains("{sym:") {
        return Ok(pattern.to_string());
    }
    let mut elves = Vec::new();
    for name in names {
        let &(_, _, bin) = IMAGES
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| format!("unknown guest image {name:?}"))?;
        let path = target_dir()
            .join("guests")
            .join(arch.triple())
            .join("debug")
            .join(bin);
        elves.push(std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    substitute(pattern, |sym| elves.iter().find_map(|e| symbol(e, sym)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_what_the_hypervisor_parses() {
        let images = vec![
            ("testguest".to_string(), b"\x7fELF-one".to_vec()),
            ("other_2".to_string(), b"abc".to_vec()),
        ];
        let bytes = pack(&images).unwrap();
        let a = boot::guests::Archive::parse(&bytes).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a.find("testguest"), Some(&b"\x7fELF-one"[..]));
        assert_eq!(a.find("other_2"), Some(&b"abc"[..]));
        assert!(pack(&[("x".repeat(33), vec![1])]).is_err());
    }

    #[test]
    fn symbol_substitution() {
        let s = substitute("rip=\\{x\\} {sym:a} {sym:b}", |n| match n {
            "a" => Some(0x100a20),
            "b" => Some(1),
            _ => None,
        })
        .unwrap();
        assert_eq!(s, "rip=\\{x\\} 0x100a20 0x1");
        assert!(substitute("{sym:c}", |_| None).is_err());
        assert!(substitute("{sym:c", |_| Some(1)).is_err());
    }

    #[test]
    fn symbol_lookup_in_an_elf() {
        // The xtask binary itself is an ELF with a symbol table on Linux hosts.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        if me.starts_with(b"\x7fELF") {
            assert!(symbol(&me, "main").is_some());
            assert_eq!(symbol(&me, "no such symbol, surely"), None);
        }
    }
}

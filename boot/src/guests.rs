//! Guest configuration and guest images as the boot path delivers them (docs/guests.md):
//!
//! - [`GuestConfig::parse`]: one `guest=NAME,image=IMAGE,mem=SIZE[,slices=N][,vcpus=N]...` item
//!   of the hypervisor command line (`scatter=GPA+SIZE`: [`Scatter`]);
//! - [`Archive`]: the guest-image archive (`HVGUEST1`) that carries several images in one boot
//!   module (PVH `-initrd` gives exactly one module);
//! - [`ElfImage`]: the checks and `PT_LOAD` segments of one guest ELF image.
//!
//! All three parse untrusted bytes: they never panic, and every error names the item and why.

/// Magic at the start of a guest-image archive.
pub const ARCHIVE_MAGIC: [u8; 8] = *b"HVGUEST1";
/// Archive header: magic, `u32` entry count, `u32` reserved (zero).
pub const ARCHIVE_HEADER: usize = 16;
/// One directory entry: 32-byte NUL-padded name, `u64` offset, `u64` size (from the archive start).
pub const ARCHIVE_ENTRY: usize = 48;
/// Longest image name (bytes).
pub const MAX_IMAGE_NAME: usize = 32;
/// Longest guest name (bytes).
pub const MAX_GUEST_NAME: usize = 15;
/// Most devices one guest item may name.
pub const MAX_GUEST_DEVICES: usize = 8;
/// Most vCPUs one guest may have (`vcpus=`).
pub const MAX_GUEST_VCPUS: usize = 8;
/// Highest physical CPU number `cpus=` may name (whether it is online is the kernel's check).
pub const MAX_CPU_NUMBER: u32 = 255;
/// Largest `scatter=` window: 16 MiB, 4096 pages. Each page of the window is its own region of
/// the guest's memory map (about 40 bytes of hypervisor heap) and its own host allocation (two
/// frames: the page and a spacer that keeps it apart from the next), and its own 4 KiB leaf in
/// the second-stage table: 16 MiB bounds that at 160 KiB of heap and 32 MiB of host memory,
/// sixteen times what the 1 MiB benchmark window needs.
pub const MAX_SCATTER: u64 = 16 << 20;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}
fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

/// Names of guests and images: lowercase ASCII letters, digits, `-` and `_`.
pub fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

/// A guest-image archive in a boot module.
#[derive(Clone, Copy, Debug)]
pub struct Archive<'a> {
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Archive<'a> {
    /// Whether `bytes` starts like an archive (then [`Archive::parse`] decides if it is a good one).
    pub fn is_archive(bytes: &[u8]) -> bool {
        bytes.starts_with(&ARCHIVE_MAGIC)
    }

    /// Checks the header and every entry (name, bounds) up front.
    pub fn parse(bytes: &'a [u8]) -> Result<Archive<'a>, &'static str> {
        if !Self::is_archive(bytes) {
            return Err("not a guest-image archive (magic HVGUEST1 missing)");
        }
        let count = u32_at(bytes, 8).ok_or("archive header truncated")? as usize;
        if u32_at(bytes, 12) != Some(0) {
            return Err("archive header reserved field is not zero");
        }
        let table_end = count
            .checked_mul(ARCHIVE_ENTRY)
            .and_then(|n| n.checked_add(ARCHIVE_HEADER))
            .ok_or("archive entry count overflows")?;
        if table_end > bytes.len() {
            return Err("archive directory runs past the end of the module");
        }
        let a = Archive { bytes, count };
        for i in 0..count {
            let (name, data) = a.entry(i)?;
            if a.entries().take(i).any(|(n, _)| n == name) {
                return Err("archive holds two images with the same name");
            }
            if data.is_empty() {
                return Err("archive holds an empty image");
            }
        }
        Ok(a)
    }

    fn entry(&self, i: usize) -> Result<(&'a str, &'a [u8]), &'static str> {
        let e = ARCHIVE_HEADER + i * ARCHIVE_ENTRY;
        let raw = self
            .bytes
            .get(e..e + MAX_IMAGE_NAME)
            .ok_or("archive entry truncated")?;
        let len = raw.iter().position(|&c| c == 0).unwrap_or(MAX_IMAGE_NAME);
        if raw[len..].iter().any(|&c| c != 0) {
            return Err("archive image name is not NUL-padded");
        }
        let name =
            core::str::from_utf8(&raw[..len]).map_err(|_| "archive image name is not UTF-8")?;
        if !valid_name(name, MAX_IMAGE_NAME) {
            return Err("archive image name must be 1-32 characters of a-z 0-9 - _");
        }
        let off = u64_at(self.bytes, e + 32).ok_or("archive entry truncated")?;
        let size = u64_at(self.bytes, e + 40).ok_or("archive entry truncated")?;
        let end = off
            .checked_add(size)
            .ok_or("archive image range overflows")?;
        let table_end = (ARCHIVE_HEADER + self.count * ARCHIVE_ENTRY) as u64;
        if off < table_end || end > self.bytes.len() as u64 {
            return Err("archive image lies outside the module");
        }
        Ok((name, &self.bytes[off as usize..end as usize]))
    }

    /// `(name, image bytes)` of every image, in archive order.
    pub fn entries(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        (0..self.count).filter_map(|i| self.entry(i).ok())
    }

    pub fn find(&self, name: &str) -> Option<&'a [u8]> {
        self.entries().find(|(n, _)| *n == name).map(|(_, b)| b)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A PCI function by segment:bus:device.function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciAddress {
    pub segment: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// `SSSS:BB:DD.F` (hex), the form `lspci -D` prints.
    pub fn parse(s: &str) -> Option<PciAddress> {
        let (seg, rest) = s.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (dev, func) = rest.split_once('.')?;
        if seg.len() != 4 || bus.len() != 2 || dev.len() != 2 || func.len() != 1 {
            return None;
        }
        let a = PciAddress {
            segment: u16::from_str_radix(seg, 16).ok()?,
            bus: u8::from_str_radix(bus, 16).ok()?,
            device: u8::from_str_radix(dev, 16).ok()?,
            function: u8::from_str_radix(func, 16).ok()?,
        };
        (a.device < 32 && a.function < 8).then_some(a)
    }
}

/// One `guest=` item of the hypervisor command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestConfig<'a> {
    pub name: &'a str,
    pub image: &'a str,
    /// RAM bytes: a multiple of 2 MiB, 2 MiB to 1 GiB.
    pub mem: u64,
    /// CPU budget in time slices; the guest is stopped when it is used up. `None`: unlimited.
    pub slices: Option<u32>,
    /// The guest's own command line (the rest of the item after `cmdline=`, commas included).
    pub cmdline: &'a str,
    pub devices: [PciAddress; MAX_GUEST_DEVICES],
    pub device_count: usize,
    /// Number of vCPUs, 1 to [`MAX_GUEST_VCPUS`].
    pub vcpus: usize,
    /// The physical CPU each vCPU runs on (vCPU i on `cpus[i]`), for `..vcpus`; all 0 (the boot
    /// CPU, the vCPUs time-sliced there) unless `cpus=` names them.
    pub cpus: [u32; MAX_GUEST_VCPUS],
    /// `scatter=GPA+SIZE`: a window of the guest's RAM backed by separate host pages.
    pub scatter: Option<Scatter>,
}

/// `scatter=GPA+SIZE`: the guest-physical window `[gpa, gpa + size)` of the guest's RAM is backed
/// by separately allocated 4 KiB host frames, no two adjacent in host-physical memory, as on a
/// host whose memory is fragmented; the rest of its RAM stays one host-contiguous block. Checked
/// here: page-aligned, not empty, at most [`MAX_SCATTER`], inside `mem=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scatter {
    pub gpa: u64,
    pub size: u64,
}

/// Why a `guest=` item was refused: the key it concerns and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: &'static str,
    pub why: &'static str,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.key, self.why)
    }
}

/// `4M`, `512K`, `1G` or a byte count (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// An address: `0x...` (hex) or a size as [`parse_size`] reads it (`4M`).
fn parse_addr(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None => parse_size(s),
    }
}

impl<'a> GuestConfig<'a> {
    /// Parses the value of one `guest=` word: `NAME,image=IMAGE,mem=SIZE[,slices=N]
    /// [,vcpus=N][,cpus=C0,C1,...][,dev=SSSS:BB:DD.F]...[,cmdline=REST]`.
    ///
    /// `cpus=` takes a list: the numbers after it, up to the next `key=value`, are its items
    /// (the item separator is also the list's). Without `vcpus=`, the list's length is the
    /// number of vCPUs; with it, the two must agree. A CPU may appear once per guest (one vCPU
    /// of a guest per physical CPU); two guests may share CPUs (time-sliced there).
    pub fn parse(value: &'a str) -> Result<GuestConfig<'a>, ConfigError> {
        let err = |key, why| ConfigError { key, why };
        let (name, mut rest) = value.split_once(',').unwrap_or((value, ""));
        if !valid_name(name, MAX_GUEST_NAME) {
            return Err(err("name", "must be 1-15 characters of a-z 0-9 - _"));
        }
        let mut c = GuestConfig {
            name,
            image: "",
            mem: 0,
            slices: None,
            cmdline: "",
            devices: [PciAddress::default(); MAX_GUEST_DEVICES],
            device_count: 0,
            vcpus: 1,
            cpus: [0; MAX_GUEST_VCPUS],
            scatter: None,
        };
        let mut seen_mem = false;
        let mut vcpus: Option<usize> = None;
        let mut cpu_count: Option<usize> = None;
        while !rest.is_empty() {
            if let Some(cmdline) = rest.strip_prefix("cmdline=") {
                c.cmdline = cmdline;
                break;
            }
            let (item, tail) = rest.split_once(',').unwrap_or((rest, ""));
            rest = tail;
            let (key, v) = item
                .split_once('=')
                .ok_or(err("option", "expected key=value"))?;
            match key {
                "image" => {
                    if !c.image.is_empty() {
                        return Err(err("image", "given twice"));
                    }
                    if !valid_name(v, MAX_IMAGE_NAME) {
                        return Err(err("image", "must be 1-32 characters of a-z 0-9 - _"));
                    }
                    c.image = v;
                }
                "mem" => {
                    if seen_mem {
                        return Err(err("mem", "given twice"));
                    }
                    seen_mem = true;
                    let m = parse_size(v).ok_or(err("mem", "not a size (e.g. 4M)"))?;
                    if m == 0 || m % (2 << 20) != 0 || m > 1 << 30 {
                        return Err(err("mem", "must be a multiple of 2 MiB from 2M to 1G"));
                    }
                    c.mem = m;
                }
                "slices" => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| err("slices", "not a decimal number"))?;
                    if n == 0 {
                        return Err(err("slices", "must be at least 1"));
                    }
                    c.slices = Some(n);
                }
                "vcpus" => {
                    if vcpus.is_some() {
                        return Err(err("vcpus", "given twice"));
                    }
                    let n: usize = v
                        .parse()
                        .map_err(|_| err("vcpus", "not a decimal number"))?;
                    if n == 0 || n > MAX_GUEST_VCPUS {
                        return Err(err("vcpus", "must be from 1 to 8"));
                    }
                    vcpus = Some(n);
                }
                "cpus" => {
                    if cpu_count.is_some() {
                        return Err(err("cpus", "given twice"));
                    }
                    let mut n = 0;
                    let mut item = v;
                    loop {
                        let cpu: u32 = item
                            .parse()
                            .ok()
                            .filter(|&c| c <= MAX_CPU_NUMBER)
                            .ok_or(err("cpus", "not a CPU number from 0 to 255"))?;
                        if c.cpus[..n].contains(&cpu) {
                            return Err(err("cpus", "CPU named twice (one vCPU per CPU)"));
                        }
                        *c.cpus.get_mut(n).ok_or(err("cpus", "more than 8 CPUs"))? = cpu;
                        n += 1;
                        // The list goes on over the items that are bare numbers.
                        let (next, tail) = rest.split_once(',').unwrap_or((rest, ""));
                        if next.is_empty() || !next.bytes().all(|b| b.is_ascii_digit()) {
                            break;
                        }
                        item = next;
                        rest = tail;
                    }
                    cpu_count = Some(n);
                }
                "scatter" => {
                    if c.scatter.is_some() {
                        return Err(err("scatter", "given twice (at most one window)"));
                    }
                    let (gpa, size) = v
                        .split_once('+')
                        .and_then(|(g, s)| Some((parse_addr(g)?, parse_size(s)?)))
                        .ok_or(err("scatter", "not GPA+SIZE (e.g. 4M+1M or 0x400000+256K)"))?;
                    if size == 0 {
                        return Err(err("scatter", "the window is empty"));
                    }
                    if gpa % 4096 != 0 || size % 4096 != 0 {
                        return Err(err("scatter", "GPA and SIZE must be multiples of 4 KiB"));
                    }
                    if size > MAX_SCATTER {
                        return Err(err("scatter", "the window is larger than 16M"));
                    }
                    c.scatter = Some(Scatter { gpa, size });
                }
                "dev" => {
                    let d =
                        PciAddress::parse(v).ok_or(err("dev", "not a PCI address SSSS:BB:DD.F"))?;
                    if c.devices[..c.device_count].contains(&d) {
                        return Err(err("dev", "device named twice"));
                    }
                    let slot = c
                        .devices
                        .get_mut(c.device_count)
                        .ok_or(err("dev", "more than 8 devices"))?;
                    *slot = d;
                    c.device_count += 1;
                }
                _ => {
                    return Err(err(
                        "option",
                        "unknown key (image, mem, slices, vcpus, cpus, scatter, dev, cmdline)",
                    ));
                }
            }
        }
        if c.image.is_empty() {
            return Err(err("image", "missing"));
        }
        if !seen_mem {
            return Err(err("mem", "missing"));
        }
        // Checked once `mem=` is known, wherever the two appear in the item.
        if let Some(w) = c.scatter
            && w.gpa.checked_add(w.size).is_none_or(|end| end > c.mem)
        {
            return Err(err(
                "scatter",
                "the window is not inside the guest's RAM (mem=)",
            ));
        }
        c.vcpus = match (vcpus, cpu_count) {
            (Some(n), Some(k)) if n != k => {
                return Err(err("cpus", "lists a number of CPUs other than vcpus="));
            }
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => 1,
        };
        Ok(c)
    }

    pub fn devices(&self) -> &[PciAddress] {
        &self.devices[..self.device_count]
    }

    /// The physical CPU of each vCPU, by vCPU index.
    pub fn cpus(&self) -> &[u32] {
        &self.cpus[..self.vcpus]
    }
}

/// ELF machine numbers of the guest architectures (System V gABI).
pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;

/// One loadable segment: `file` bytes at guest-physical `paddr`, zero-filled up to `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    pub paddr: u64,
    pub memsz: u64,
    pub file: &'a [u8],
}

/// A checked guest ELF image (ELF64, little-endian, `ET_EXEC`, the expected machine).
#[derive(Clone, Copy, Debug)]
pub struct ElfImage<'a> {
    bytes: &'a [u8],
    pub entry: u64,
    phoff: usize,
    phnum: usize,
}

const PT_LOAD: u32 = 1;
const PHENT: usize = 56;

impl<'a> ElfImage<'a> {
    pub fn parse(bytes: &'a [u8], machine: u16) -> Result<ElfImage<'a>, &'static str> {
        if !bytes.starts_with(b"\x7fELF") {
            return Err("not an ELF file");
        }
        if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
            return Err("not a little-endian ELF64 file");
        }
        if u16_at(bytes, 16) != Some(2) {
            return Err("not an executable (ET_EXEC) ELF");
        }
        if u16_at(bytes, 18) != Some(machine) {
            return Err("ELF built for another machine");
        }
        let entry = u64_at(bytes, 24).ok_or("ELF header truncated")?;
        let phoff = u64_at(bytes, 32).ok_or("ELF header truncated")?;
        let phentsize = u16_at(bytes, 54).ok_or("ELF header truncated")?;
        let phnum = u16_at(bytes, 56).ok_or("ELF header truncated")? as usize;
        if usize::from(phentsize) != PHENT {
            return Err("unexpected ELF program header size");
        }
        let end = phoff
            .checked_add((phnum * PHENT) as u64)
            .ok_or("ELF program headers overflow")?;
        if end > bytes.len() as u64 {
            return Err("ELF program headers run past the end of the image");
        }
        let img = ElfImage {
            bytes,
            entry,
            phoff: phoff as usize,
            phnum,
        };
        let mut loads = 0;
        for i in 0..phnum {
            if img.segment(i)?.is_some() {
                loads += 1;
            }
        }
        if loads == 0 {
            return Err("ELF has no loadable segment");
        }
        Ok(img)
    }

    fn segment(&self, i: usize) -> Result<Option<Segment<'a>>, &'static str> {
        let p = self.phoff + i * PHENT;
        let t = u32_at(self.bytes, p).ok_or("ELF program header truncated")?;
        if t != PT_LOAD {
            return Ok(None);
        }
        let offset = u64_at(self.bytes, p + 8).ok_or("ELF program header truncated")?;
        let paddr = u64_at(self.bytes, p + 24).ok_or("ELF program header truncated")?;
        let filesz = u64_at(self.bytes, p + 32).ok_or("ELF program header truncated")?;
        let memsz = u64_at(self.bytes, p + 40).ok_or("ELF program header truncated")?;
        if filesz > memsz {
            return Err("ELF segment has filesz > memsz");
        }
        paddr
            .checked_add(memsz)
            .ok_or("ELF segment address overflows")?;
        let fend = offset
            .checked_add(filesz)
            .ok_or("ELF segment file range overflows")?;
        if fend > self.bytes.len() as u64 {
            return Err("ELF segment runs past the end of the image");
        }
        Ok(Some(Segment {
            paddr,
            memsz,
            file: &self.bytes[offset as usize..fend as usize],
        }))
    }

    /// The `PT_LOAD` segments (all checked by [`ElfImage::parse`]).
    pub fn segments(&self) -> impl Iterator<Item = Segment<'a>> + '_ {
        (0..self.phnum).filter_map(|i| self.segment(i).ok().flatten())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&ARCHIVE_MAGIC);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut off = (ARCHIVE_HEADER + entries.len() * ARCHIVE_ENTRY) as u64;
        for (name, data) in entries {
            let mut n = [0u8; 32];
            n[..name.len()].copy_from_slice(name.as_bytes());
            out.extend_from_slice(&n);
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            off += data.len() as u64;
        }
        for (_, data) in entries {
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn archive_roundtrip_and_lookup() {
        let a = archive(&[("one", b"abc"), ("two-2", b"defg")]);
        let p = Archive::parse(&a).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.find("one"), Some(&b"abc"[..]));
        assert_eq!(p.find("two-2"), Some(&b"defg"[..]));
        assert_eq!(p.find("three"), None);
    }

    #[test]
    fn archive_rejects_bad_input() {
        let good = archive(&[("one", b"abc")]);
        assert_eq!(
            Archive::parse(&good[..20]).err(),
            Some("archive directory runs past the end of the module"),
            "truncated directory"
        );
        let mut bad = good.clone();
        bad[16 + 32] = 0xff; // offset far past the end
        assert_eq!(
            Archive::parse(&bad).err(),
            Some("archive image lies outside the module")
        );
        let mut bad = good.clone();
        bad[16] = b'A'; // upper-case name
        assert_eq!(
            Archive::parse(&bad).err(),
            Some("archive image name must be 1-32 characters of a-z 0-9 - _")
        );
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Archive::parse(&bad).err(),
            Some("archive directory runs past the end of the module"),
            "count overflow"
        );
        let dup = archive(&[("x", b"1"), ("x", b"2")]);
        assert_eq!(
            Archive::parse(&dup).err(),
            Some("archive holds two images with the same name")
        );
        assert_eq!(
            Archive::parse(b"HVGUEST0").err(),
            Some("not a guest-image archive (magic HVGUEST1 missing)")
        );
    }

    #[test]
    fn config_full_item() {
        let c = GuestConfig::parse(
            "web,image=testguest,mem=4M,slices=20,dev=0000:00:05.0,cmdline=wild gpa=0x1,x",
        )
        .unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.image, "testguest");
        assert_eq!(c.mem, 4 << 20);
        assert_eq!(c.slices, Some(20));
        assert_eq!(c.cmdline, "wild gpa=0x1,x");
        assert_eq!(
            c.devices(),
            &[PciAddress {
                segment: 0,
                bus: 0,
                device: 5,
                function: 0
            }]
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let key = |s| GuestConfig::parse(s).unwrap_err().key;
        assert_eq!(key("Bad,image=a,mem=2M"), "name");
        assert_eq!(key("a,mem=2M"), "image");
        assert_eq!(key("a,image=x"), "mem");
        assert_eq!(key("a,image=x,mem=3M"), "mem");
        assert_eq!(key("a,image=x,mem=2G"), "mem");
        assert_eq!(key("a,image=x,mem=2M,mem=4M"), "mem");
        assert_eq!(key("a,image=x,mem=2M,slices=0"), "slices");
        assert_eq!(key("a,image=x,mem=2M,dev=00:05.0"), "dev");
        assert_eq!(key("a,image=x,mem=2M,dev=0000:00:20.0"), "dev");
        assert_eq!(key("a,image=x,mem=2M,colour=red"), "option");
        assert_eq!(key("a,image=x,mem=2M,junk"), "option");
    }

    #[test]
    fn config_vcpus_and_cpus() {
        let c = GuestConfig::parse("a,image=x,mem=2M").unwrap();
        assert_eq!((c.vcpus, c.cpus()), (1, &[0][..]));
        // Several vCPUs, no cpus=: all on the boot CPU.
        let c = GuestConfig::parse("a,image=x,mem=2M,vcpus=3,cmdline=smp").unwrap();
        assert_eq!((c.vcpus, c.cpus()), (3, &[0, 0, 0][..]));
        assert_eq!(c.cmdline, "smp");
        // The list runs over bare numbers and stops at the next key, in any position.
        let c = GuestConfig::parse("a,image=x,vcpus=2,cpus=1,0,mem=4M,cmdline=3,4").unwrap();
        assert_eq!((c.vcpus, c.cpus(), c.mem), (2, &[1, 0][..], 4 << 20));
        assert_eq!(c.cmdline, "3,4");
        // cpus= alone sets the number of vCPUs.
        let c = GuestConfig::parse("a,image=x,mem=2M,cpus=3,1,2").unwrap();
        assert_eq!((c.vcpus, c.cpus()), (3, &[3, 1, 2][..]));
        let c = GuestConfig::parse("a,image=x,mem=2M,cpus=1").unwrap();
        assert_eq!((c.vcpus, c.cpus()), (1, &[1][..]));
        let c = GuestConfig::parse("a,image=x,mem=2M,vcpus=8,cpus=0,1,2,3,4,5,6,7").unwrap();
        assert_eq!(c.cpus(), &[0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn config_vcpus_and_cpus_errors() {
        let e = |s| GuestConfig::parse(s).unwrap_err();
        let why = |s| e(s).why;
        assert_eq!(e("a,image=x,mem=2M,vcpus=0").key, "vcpus");
        assert_eq!(why("a,image=x,mem=2M,vcpus=0"), "must be from 1 to 8");
        assert_eq!(why("a,image=x,mem=2M,vcpus=9"), "must be from 1 to 8");
        assert_eq!(why("a,image=x,mem=2M,vcpus=-1"), "not a decimal number");
        assert_eq!(why("a,image=x,mem=2M,vcpus=2,vcpus=2"), "given twice");
        assert_eq!(e("a,image=x,mem=2M,vcpus=2,cpus=0").key, "cpus");
        assert_eq!(
            why("a,image=x,mem=2M,vcpus=2,cpus=0"),
            "lists a number of CPUs other than vcpus="
        );
        assert_eq!(
            why("a,image=x,mem=2M,vcpus=1,cpus=0,1"),
            "lists a number of CPUs other than vcpus="
        );
        assert_eq!(
            why("a,image=x,mem=2M,cpus=1,2,1"),
            "CPU named twice (one vCPU per CPU)"
        );
        assert_eq!(
            why("a,image=x,mem=2M,cpus=0,1,2,3,4,5,6,7,8"),
            "more than 8 CPUs"
        );
        assert_eq!(
            why("a,image=x,mem=2M,cpus=256"),
            "not a CPU number from 0 to 255"
        );
        assert_eq!(
            why("a,image=x,mem=2M,cpus="),
            "not a CPU number from 0 to 255"
        );
        assert_eq!(
            why("a,image=x,mem=2M,cpus=x"),
            "not a CPU number from 0 to 255"
        );
        assert_eq!(why("a,image=x,mem=2M,cpus=0,cpus=1"), "given twice");
        // A word that is not a number ends the list and must then be key=value.
        assert_eq!(e("a,image=x,mem=2M,cpus=0,1x").key, "option");
    }

    #[test]
    fn config_scatter() {
        let c = GuestConfig::parse("a,image=x,mem=8M,scatter=4M+1M").unwrap();
        assert_eq!(
            c.scatter,
            Some(Scatter {
                gpa: 4 << 20,
                size: 1 << 20
            })
        );
        // mem= after it, hex GPA, the window up to the end of RAM, the largest window.
        let c = GuestConfig::parse("a,image=x,scatter=0x1ff000+4K,mem=2M").unwrap();
        assert_eq!(
            c.scatter,
            Some(Scatter {
                gpa: 0x1f_f000,
                size: 4096
            })
        );
        let c = GuestConfig::parse("a,image=x,mem=32M,scatter=0+16M").unwrap();
        assert_eq!(c.scatter.map(|w| w.size), Some(MAX_SCATTER));
        assert_eq!(
            GuestConfig::parse("a,image=x,mem=2M").unwrap().scatter,
            None
        );
    }

    #[test]
    fn config_scatter_errors() {
        let e = |s| GuestConfig::parse(s).unwrap_err();
        let why = |s| {
            let e = e(s);
            assert_eq!(e.key, "scatter", "{s}");
            e.why
        };
        let not = "not GPA+SIZE (e.g. 4M+1M or 0x400000+256K)";
        assert_eq!(why("a,image=x,mem=8M,scatter=4M"), not);
        assert_eq!(why("a,image=x,mem=8M,scatter=4M+"), not);
        assert_eq!(why("a,image=x,mem=8M,scatter=+1M"), not);
        assert_eq!(why("a,image=x,mem=8M,scatter=0x+1M"), not);
        assert_eq!(why("a,image=x,mem=8M,scatter=4M+1X"), not);
        assert_eq!(why("a,image=x,mem=8M,scatter=4M+0"), "the window is empty");
        let align = "GPA and SIZE must be multiples of 4 KiB";
        assert_eq!(why("a,image=x,mem=8M,scatter=0x400800+4K"), align);
        assert_eq!(why("a,image=x,mem=8M,scatter=4M+100"), align);
        assert_eq!(
            why("a,image=x,mem=64M,scatter=0+17M"),
            "the window is larger than 16M"
        );
        let outside = "the window is not inside the guest's RAM (mem=)";
        assert_eq!(why("a,image=x,mem=8M,scatter=7M+2M"), outside);
        assert_eq!(why("a,image=x,mem=8M,scatter=8M+4K"), outside);
        assert_eq!(
            why("a,image=x,mem=8M,scatter=0xfffffffffffff000+8K"),
            outside
        );
        assert_eq!(
            why("a,image=x,mem=8M,scatter=4M+4K,scatter=5M+4K"),
            "given twice (at most one window)"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    fn elf(phdrs: &[(u32, u64, u64, u64, u64)], body: usize) -> Vec<u8> {
        let mut e = std::vec![0u8; 64 + phdrs.len() * PHENT + body];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        e[24..32].copy_from_slice(&0x100000u64.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&(PHENT as u16).to_le_bytes());
        e[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, &(t, off, paddr, filesz, memsz)) in phdrs.iter().enumerate() {
            let p = 64 + i * PHENT;
            e[p..p + 4].copy_from_slice(&t.to_le_bytes());
            e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            e[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            e[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            e[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        e
    }

    #[test]
    fn elf_segments_and_checks() {
        let e = elf(&[(1, 120, 0x100000, 16, 32), (4, 0, 0, 0, 0)], 16);
        let img = ElfImage::parse(&e, EM_X86_64).unwrap();
        assert_eq!(img.entry, 0x100000);
        let segs: Vec<_> = img.segments().collect();
        assert_eq!(segs.len(), 1);
        assert_eq!(
            (segs[0].paddr, segs[0].memsz, segs[0].file.len()),
            (0x100000, 32, 16)
        );
        assert_eq!(
            ElfImage::parse(&e, EM_AARCH64).err(),
            Some("ELF built for another machine")
        );
        let past_end = elf(&[(1, 120, 0x100000, 17, 32)], 16);
        assert_eq!(
            ElfImage::parse(&past_end, EM_X86_64).err(),
            Some("ELF segment runs past the end of the image")
        );
        let big_file = elf(&[(1, 120, 0x100000, 16, 8)], 16);
        assert_eq!(
            ElfImage::parse(&big_file, EM_X86_64).err(),
            Some("ELF segment has filesz > memsz")
        );
        let wrap = elf(&[(1, 120, u64::MAX, 16, 32)], 16);
        assert_eq!(
            ElfImage::parse(&wrap, EM_X86_64).err(),
            Some("ELF segment address overflows")
        );
        let none = elf(&[(4, 0, 0, 0, 0)], 0);
        assert_eq!(
            ElfImage::parse(&none, EM_X86_64).err(),
            Some("ELF has no loadable segment")
        );
        assert_eq!(
            ElfImage::parse(&e[..70], EM_X86_64).err(),
            Some("ELF program headers run past the end of the image")
        );
    }
}

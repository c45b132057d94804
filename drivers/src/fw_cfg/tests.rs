//! Host tests: a synthetic fw_cfg device (MMIO and I/O-port flavours) with a directory, ACPI
//! blobs and a loader script; results are checked independently of the loader.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::string::String;
use std::vec;
use std::vec::Vec;

use mmio::Mmio;

use super::loader::COMMAND_SIZE;
use super::*;

/// fw_cfg device model: items by key, a selector and a data offset.
#[derive(Default)]
struct FakeFwCfg {
    items: RefCell<HashMap<u16, Vec<u8>>>,
    selected: Cell<u16>,
    offset: Cell<usize>,
    /// Accesses QEMU would reject (wrong width or register).
    invalid: Cell<u32>,
    data_reads: Cell<u32>,
}

impl FakeFwCfg {
    fn new(files: &[(&str, Vec<u8>)]) -> Self {
        let f = Self::default();
        let mut items = f.items.borrow_mut();
        items.insert(KEY_SIGNATURE, b"QEMU".to_vec());
        items.insert(KEY_ID, 3u32.to_le_bytes().to_vec());
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in files.iter().enumerate() {
            let key = KEY_FILE_FIRST + i as u16;
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; 56];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
            items.insert(key, data.clone());
        }
        items.insert(KEY_FILE_DIR, dir);
        drop(items);
        f
    }

    fn select(&self, key: u16) {
        self.selected.set(key);
        self.offset.set(0);
    }

    fn next(&self) -> u8 {
        let items = self.items.borrow();
        let b = items
            .get(&self.selected.get())
            .and_then(|d| d.get(self.offset.get()))
            .copied()
            .unwrap_or(0);
        self.offset.set(self.offset.get() + 1);
        b
    }
}

impl Mmio for FakeFwCfg {
    fn read32(&self, offset: usize) -> u32 {
        if offset != MMIO_DATA_OFFSET {
            self.invalid.set(self.invalid.get() + 1);
            return 0;
        }
        self.data_reads.set(self.data_reads.get() + 1);
        u32::from_ne_bytes([self.next(), self.next(), self.next(), self.next()])
    }
    fn write32(&self, _: usize, _: u32) {
        self.invalid.set(self.invalid.get() + 1);
    }
    fn read64(&self, offset: usize) -> u64 {
        if offset != MMIO_DATA_OFFSET {
            self.invalid.set(self.invalid.get() + 1);
            return 0;
        }
        self.data_reads.set(self.data_reads.get() + 1);
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.next();
        }
        // "An N-byte wide read ... returns the next N bytes ... in increasing address order".
        u64::from_ne_bytes(b)
    }
    fn write64(&self, _: usize, _: u64) {
        self.invalid.set(self.invalid.get() + 1);
    }
}

impl MmioWrite16 for FakeFwCfg {
    fn write16(&self, offset: usize, value: u16) {
        if offset != MMIO_SELECTOR_OFFSET {
            self.invalid.set(self.invalid.get() + 1);
            return;
        }
        // The register is big-endian: the byte at the lower address is the high byte.
        self.select(u16::from_be_bytes(value.to_ne_bytes()));
    }
}

impl FwCfgPortIo for FakeFwCfg {
    fn read8(&self, port: u16) -> u8 {
        if port != IO_DATA_PORT {
            self.invalid.set(self.invalid.get() + 1);
            return 0xff;
        }
        self.next()
    }
    fn write16(&self, port: u16, value: u16) {
        if port != IO_SELECTOR_PORT {
            self.invalid.set(self.invalid.get() + 1);
            return;
        }
        self.select(value);
    }
}

impl MmioWrite16 for &FakeFwCfg {
    fn write16(&self, offset: usize, value: u16) {
        MmioWrite16::write16(*self, offset, value)
    }
}

impl Mmio for &FakeFwCfg {
    fn read32(&self, offset: usize) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        (**self).write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        (**self).read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        (**self).write64(offset, value)
    }
}

impl FwCfgPortIo for &FakeFwCfg {
    fn read8(&self, port: u16) -> u8 {
        (**self).read8(port)
    }
    fn write16(&self, port: u16, value: u16) {
        FwCfgPortIo::write16(*self, port, value)
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

// ---- synthetic ACPI ----

const XSDT_AT: usize = 0x40;
const RSDT_AT: usize = 0x80;
const TABLES_LEN: usize = 0x100;

fn sdt(sig: &[u8; 4], len: usize) -> Vec<u8> {
    let mut t = vec![0u8; len];
    t[..4].copy_from_slice(sig);
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    t[8] = 1;
    t[10..16].copy_from_slice(b"HVTEST");
    t
}

/// `etc/acpi/tables`: "TEST" at 0, XSDT at 0x40 (one 8-byte entry), RSDT at 0x80 (one 4-byte
/// entry); entries hold offsets into the blob, checksums are zero. `etc/acpi/rsdp`: RSDP rev 2
/// whose RSDT/XSDT fields hold offsets into the tables blob.
fn acpi_blobs() -> (Vec<u8>, Vec<u8>) {
    let mut tables = vec![0u8; TABLES_LEN];
    let test = sdt(b"TEST", 40);
    tables[..40].copy_from_slice(&test);
    tables[0x24..0x28].copy_from_slice(b"data");
    let mut xsdt = sdt(b"XSDT", 44);
    xsdt[36..44].copy_from_slice(&0u64.to_le_bytes());
    tables[XSDT_AT..XSDT_AT + 44].copy_from_slice(&xsdt);
    let mut rsdt = sdt(b"RSDT", 40);
    rsdt[36..40].copy_from_slice(&0u32.to_le_bytes());
    tables[RSDT_AT..RSDT_AT + 40].copy_from_slice(&rsdt);
    let mut rsdp = vec![0u8; 36];
    rsdp[..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(b"HVTEST");
    rsdp[15] = 2;
    rsdp[16..20].copy_from_slice(&(RSDT_AT as u32).to_le_bytes());
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&(XSDT_AT as u64).to_le_bytes());
    (rsdp, tables)
}

fn cmd(kind: u32) -> Vec<u8> {
    let mut c = vec![0u8; COMMAND_SIZE];
    c[..4].copy_from_slice(&kind.to_le_bytes());
    c
}

fn put_name(c: &mut [u8], at: usize, name: &str) {
    c[at..at + name.len()].copy_from_slice(name.as_bytes());
}

fn allocate(file: &str, align: u32, zone: u8) -> Vec<u8> {
    let mut c = cmd(1);
    put_name(&mut c, 4, file);
    c[60..64].copy_from_slice(&align.to_le_bytes());
    c[64] = zone;
    c
}

fn add_pointer(dest: &str, src: &str, offset: u32, size: u8) -> Vec<u8> {
    let mut c = cmd(2);
    put_name(&mut c, 4, dest);
    put_name(&mut c, 60, src);
    c[116..120].copy_from_slice(&offset.to_le_bytes());
    c[120] = size;
    c
}

fn add_checksum(file: &str, offset: u32, start: u32, length: u32) -> Vec<u8> {
    let mut c = cmd(3);
    put_name(&mut c, 4, file);
    c[60..64].copy_from_slice(&offset.to_le_bytes());
    c[64..68].copy_from_slice(&start.to_le_bytes());
    c[68..72].copy_from_slice(&length.to_le_bytes());
    c
}

const RSDP: &str = "etc/acpi/rsdp";
const TABLES: &str = "etc/acpi/tables";

fn script() -> Vec<Vec<u8>> {
    let x = XSDT_AT as u32;
    let r = RSDT_AT as u32;
    vec![
        allocate(RSDP, 16, 2),
        allocate(TABLES, 64, 1),
        add_checksum(TABLES, 9, 0, 40),
        add_pointer(TABLES, TABLES, x + 36, 8),
        add_checksum(TABLES, x + 9, x, 44),
        add_pointer(TABLES, TABLES, r + 36, 4),
        add_checksum(TABLES, r + 9, r, 40),
        add_pointer(RSDP, TABLES, 16, 4),
        add_pointer(RSDP, TABLES, 24, 8),
        add_checksum(RSDP, 8, 0, 20),
        add_checksum(RSDP, 32, 0, 36),
        {
            // WRITE_POINTER into a writable fw_cfg file: skipped.
            let mut c = cmd(4);
            put_name(&mut c, 4, "etc/vmgenid_addr");
            put_name(&mut c, 60, TABLES);
            c[124] = 8;
            c
        },
        cmd(0),
    ]
}

fn device(script: &[Vec<u8>]) -> FakeFwCfg {
    let (rsdp, tables) = acpi_blobs();
    FakeFwCfg::new(&[
        ("etc/boot-fail-wait", vec![5, 0, 0, 0]),
        (RSDP, rsdp),
        (TABLES, tables),
        ("etc/table-loader", script.concat()),
        ("opt/odd-sized", pattern(13)),
    ])
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

// ---- tests ----

#[test]
fn probe_and_directory_over_mmio_and_ports() {
    let dev = device(&script());
    let mut mmio = FwCfg::probe(MmioTransport::new(&dev)).unwrap();
    assert_eq!(mmio.features(), 3);
    assert!(mmio.has_dma());
    let mut port = FwCfg::probe(PortTransport::new(&dev)).unwrap();
    let mut names = Vec::new();
    mmio.for_each_file(|f| {
        names.push((
            String::from_utf8(f.name().to_vec()).unwrap(),
            f.select,
            f.size,
        ));
        core::ops::ControlFlow::Continue(())
    });
    assert_eq!(names[0], (String::from("etc/boot-fail-wait"), 0x20, 4));
    assert_eq!(names.len(), 5);
    let a = mmio.find_file("opt/odd-sized").unwrap();
    let b = port.find_file(b"opt/odd-sized").unwrap();
    assert_eq!(a, b);
    assert_eq!(
        (a.select, a.size, a.name()),
        (0x24, 13, &b"opt/odd-sized"[..])
    );
    assert_eq!(mmio.find_file("opt/missing"), None);
    assert_eq!(mmio.find_file("opt/odd"), None, "no prefix match");
    let mut buf = [0u8; 32];
    assert_eq!(mmio.read_file(&a, &mut buf), 13);
    assert_eq!(&buf[..13], &pattern(13)[..]);
    let mut buf2 = [0u8; 5];
    assert_eq!(port.read_file(&b, &mut buf2), 5);
    assert_eq!(&buf2, &pattern(13)[..5]);
    assert_eq!(
        dev.invalid.get(),
        0,
        "only valid accesses (16-bit BE selector, data reads)"
    );
}

#[test]
fn mmio_wide_reads_keep_byte_order_across_odd_lengths() {
    let data = pattern(100);
    let dev = FakeFwCfg::new(&[("opt/x", data.clone())]);
    let mut t = MmioTransport::new(&dev);
    t.select(KEY_FILE_FIRST);
    let mut got = Vec::new();
    for n in [3usize, 5, 9, 1, 16, 7, 8, 0, 30] {
        let mut b = vec![0u8; n];
        t.read_bytes(&mut b);
        got.extend_from_slice(&b);
    }
    assert_eq!(&got[..], &data[..79]);
    // Mostly 8-byte accesses: 79 bytes in at most 79 / 8 + one per call.
    assert!(
        dev.data_reads.get() <= 79 / 8 + 9,
        "{}",
        dev.data_reads.get()
    );
    // Re-selecting rewinds and drops buffered bytes.
    t.select(KEY_FILE_FIRST);
    let mut b = [0u8; 2];
    t.read_bytes(&mut b);
    assert_eq!(&b, &data[..2]);
    // Past the end: zeros.
    let mut fw = FwCfg::probe(MmioTransport::new(&dev)).unwrap();
    let mut big = [0xaau8; 110];
    fw.read_item(KEY_FILE_FIRST, &mut big);
    assert_eq!(&big[..100], &data[..]);
    assert!(big[100..].iter().all(|&b| b == 0));
}

#[test]
fn no_device_or_bad_signature() {
    let dev = FakeFwCfg::new(&[]);
    dev.items
        .borrow_mut()
        .insert(KEY_SIGNATURE, b"BOCH".to_vec());
    assert_eq!(
        FwCfg::probe(MmioTransport::new(&dev)).err(),
        Some(FwCfgError::BadSignature(*b"BOCH"))
    );
    let empty = FakeFwCfg::default();
    assert_eq!(
        FwCfg::probe(PortTransport::new(&empty)).err(),
        Some(FwCfgError::BadSignature([0; 4]))
    );
}

#[test]
fn hostile_directory_count_terminates() {
    let dev = FakeFwCfg::new(&[("opt/a", vec![1])]);
    // Claim 4 billion entries: the walk stops at the first all-zero entry.
    dev.items.borrow_mut().get_mut(&KEY_FILE_DIR).unwrap()[..4]
        .copy_from_slice(&u32::MAX.to_be_bytes());
    let mut fw = FwCfg::probe(PortTransport::new(&dev)).unwrap();
    let mut n = 0;
    fw.for_each_file(|_| {
        n += 1;
        core::ops::ControlFlow::Continue(())
    });
    assert_eq!(n, 1);
    assert_eq!(fw.find_file("opt/b"), None);
    // A directory of non-zero garbage is bounded by MAX_FILES.
    let junk: Vec<u8> = u32::MAX
        .to_be_bytes()
        .into_iter()
        .chain(core::iter::repeat_n(0x41, 64 * 20_000))
        .collect();
    dev.items.borrow_mut().insert(KEY_FILE_DIR, junk);
    let mut n = 0u32;
    fw.for_each_file(|f| {
        assert_eq!(f.name().len(), FILE_NAME_LEN, "no NUL: whole field");
        n += 1;
        core::ops::ControlFlow::Continue(())
    });
    assert_eq!(n, MAX_FILES);
}

const PHYS: u64 = 0x4000_0100;

fn load(dev: &FakeFwCfg, arena: &mut [u8], phys: u64) -> Result<LoadedTables, LoaderError> {
    let mut fw = FwCfg::probe(MmioTransport::new(dev)).unwrap();
    let mut script = [0u8; 4096];
    load_acpi_tables(&mut fw, &mut script, arena, phys)
}

#[test]
fn table_loader_patches_pointers_and_checksums() {
    let dev = device(&script());
    let mut arena = vec![0u8; 0x1000];
    let r = load(&dev, &mut arena, PHYS).unwrap();
    assert_eq!(
        (r.allocations, r.pointers, r.checksums, r.skipped),
        (2, 4, 5, 1)
    );
    // Independent checks on the arena: the RSDP is where the result says, 16-byte aligned.
    assert_eq!(r.rsdp % 16, 0);
    let rsdp_at = (r.rsdp - PHYS) as usize;
    let rsdp = &arena[rsdp_at..rsdp_at + 36];
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    // The tables blob follows, 64-byte aligned.
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let rsdt_addr = u64::from(u32::from_le_bytes(rsdp[16..20].try_into().unwrap()));
    let tables_phys = xsdt_addr - XSDT_AT as u64;
    assert_eq!(tables_phys % 64, 0);
    assert!(tables_phys >= r.rsdp + 36);
    assert_eq!(rsdt_addr, tables_phys + RSDT_AT as u64);
    let t = (tables_phys - PHYS) as usize;
    let xsdt = &arena[(xsdt_addr - PHYS) as usize..][..44];
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(sum(xsdt), 0);
    let entry = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
    assert_eq!(entry, tables_phys);
    let rsdt = &arena[(rsdt_addr - PHYS) as usize..][..40];
    assert_eq!(&rsdt[..4], b"RSDT");
    assert_eq!(sum(rsdt), 0);
    assert_eq!(
        u64::from(u32::from_le_bytes(rsdt[36..40].try_into().unwrap())),
        tables_phys
    );
    let test = &arena[t..t + 40];
    assert_eq!(&test[..4], b"TEST");
    assert_eq!(&test[0x24..0x28], b"data");
    assert_eq!(sum(test), 0);
}

#[test]
fn table_loader_over_ports_gives_the_same_bytes() {
    let dev = device(&script());
    let mut a = vec![0u8; 0x1000];
    let mut b = vec![0u8; 0x1000];
    load(&dev, &mut a, PHYS).unwrap();
    let mut fw = FwCfg::probe(PortTransport::new(&dev)).unwrap();
    let mut s = [0u8; 4096];
    load_acpi_tables(&mut fw, &mut s, &mut b, PHYS).unwrap();
    assert_eq!(a, b);
}

#[test]
fn malformed_scripts_are_errors() {
    let base = script();
    let with = |i: usize, c: Vec<u8>| {
        let mut s = base.clone();
        s[i] = c;
        s
    };
    let cases: Vec<(Vec<Vec<u8>>, LoaderError)> = vec![
        // Pointer field past the end of the 36-byte RSDP.
        (
            with(8, add_pointer(RSDP, TABLES, 32, 8)),
            LoaderError::OutOfBounds { command: 8 },
        ),
        (
            with(8, add_pointer(RSDP, TABLES, u32::MAX, 8)),
            LoaderError::OutOfBounds { command: 8 },
        ),
        // Source never allocated / not in fw_cfg.
        (
            with(8, add_pointer(RSDP, "etc/nope", 24, 8)),
            LoaderError::UnknownFile { command: 8 },
        ),
        (
            with(1, allocate("etc/nope", 64, 1)),
            LoaderError::Store {
                command: 1,
                error: BlobError::NotFound,
            },
        ),
        // Pointer size 3.
        (
            with(8, add_pointer(RSDP, TABLES, 24, 3)),
            LoaderError::BadPointerSize {
                command: 8,
                size: 3,
            },
        ),
        // Checksum range / result outside the blob.
        (
            with(9, add_checksum(RSDP, 8, 0, 37)),
            LoaderError::OutOfBounds { command: 9 },
        ),
        (
            with(9, add_checksum(RSDP, 36, 0, 20)),
            LoaderError::OutOfBounds { command: 9 },
        ),
        (
            with(9, add_checksum(RSDP, 8, u32::MAX, 2)),
            LoaderError::OutOfBounds { command: 9 },
        ),
        // Allocation parameters.
        (
            with(0, allocate(RSDP, 24, 2)),
            LoaderError::BadAlignment {
                command: 0,
                align: 24,
            },
        ),
        (
            with(0, allocate(RSDP, 0, 2)),
            LoaderError::BadAlignment {
                command: 0,
                align: 0,
            },
        ),
        (
            with(0, allocate(RSDP, 16, 7)),
            LoaderError::BadZone {
                command: 0,
                zone: 7,
            },
        ),
        (
            with(1, allocate(RSDP, 16, 2)),
            LoaderError::DuplicateAllocation { command: 1 },
        ),
        // Use before allocation.
        (with(0, cmd(0)), LoaderError::UnknownFile { command: 7 }),
        // Names: empty, or no NUL in 56 bytes.
        (
            with(2, add_checksum("", 9, 0, 40)),
            LoaderError::BadName { command: 2 },
        ),
        (
            with(2, {
                let mut c = add_checksum(TABLES, 9, 0, 40);
                c[4..60].fill(b'a');
                c
            }),
            LoaderError::BadName { command: 2 },
        ),
    ];
    for (i, (s, want)) in cases.into_iter().enumerate() {
        let dev = device(&s);
        let mut arena = vec![0u8; 0x1000];
        assert_eq!(load(&dev, &mut arena, PHYS), Err(want), "case {i}");
    }
    // No RSDP allocated at all.
    let s: Vec<Vec<u8>> = vec![allocate(TABLES, 64, 1)];
    assert_eq!(
        load(&device(&s), &mut vec![0u8; 0x1000], PHYS),
        Err(LoaderError::NoRsdp)
    );
    // A truncated script.
    let mut bad = script().concat();
    bad.truncate(bad.len() - 28);
    let fw_dev = device(&[bad]);
    assert_eq!(
        load(&fw_dev, &mut vec![0u8; 0x1000], PHYS),
        Err(LoaderError::Truncated {
            len: script().len() * COMMAND_SIZE - 28
        })
    );
    // The arena is too small.
    assert_eq!(
        load(&device(&script()), &mut [0u8; 0x80], PHYS),
        Err(LoaderError::Store {
            command: 1,
            error: BlobError::NoMemory
        })
    );
    // A 32-bit pointer to a blob above 4 GiB does not fit.
    assert_eq!(
        load(&device(&script()), &mut vec![0u8; 0x1000], 0x1_0000_0000),
        Err(LoaderError::PointerOverflow { command: 5 })
    );
    // No script, or a script larger than the buffer.
    let dev = FakeFwCfg::new(&[(RSDP, vec![0; 36])]);
    assert_eq!(
        load(&dev, &mut vec![0u8; 0x1000], PHYS),
        Err(LoaderError::NoTableLoader)
    );
    let dev = FakeFwCfg::new(&[("etc/table-loader", vec![0; 8192])]);
    assert_eq!(
        load(&dev, &mut vec![0u8; 0x1000], PHYS),
        Err(LoaderError::ScriptTooLarge { size: 8192 })
    );
}

#[test]
fn run_table_loader_with_a_custom_store() {
    // A store that is not fw_cfg-backed: the loader only needs the trait.
    struct Store(Vec<(Vec<u8>, u64, Vec<u8>)>);
    impl BlobStore for Store {
        fn allocate(&mut self, name: &[u8], align: u64, zone: AllocZone) -> Result<u64, BlobError> {
            let (rsdp, tables) = acpi_blobs();
            let data = match name {
                b"etc/acpi/rsdp" => rsdp,
                b"etc/acpi/tables" => tables,
                _ => return Err(BlobError::NotFound),
            };
            assert_eq!(
                zone,
                if name == b"etc/acpi/rsdp" {
                    AllocZone::FSeg
                } else {
                    AllocZone::High
                }
            );
            let addr = 0x8000_0000_0000 + align * 0x100 * (self.0.len() as u64 + 1);
            self.0.push((name.to_vec(), addr, data));
            Ok(addr)
        }
        fn blob(&mut self, name: &[u8]) -> Option<(u64, &mut [u8])> {
            self.0
                .iter_mut()
                .find(|b| b.0 == name)
                .map(|b| (b.1, &mut b.2[..]))
        }
    }
    let mut s = Store(Vec::new());
    let only64: Vec<Vec<u8>> = script()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| ![5, 6, 7].contains(i))
        .map(|x| x.1)
        .collect();
    let r = run_table_loader(&only64.concat(), &mut s).unwrap();
    let rsdp = &s.0[0].2;
    assert_eq!(r.rsdp, s.0[0].1);
    assert_eq!(
        u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
        s.0[1].1 + XSDT_AT as u64
    );
    assert_eq!(sum(&rsdp[..36]), 0);
    // Pointer size 1 and 2 add with wrapping checks too.
    let mut small: Vec<Vec<u8>> = vec![
        allocate(RSDP, 16, 2),
        allocate(TABLES, 64, 1),
        add_pointer(TABLES, TABLES, 0x30, 2),
    ];
    let mut s = Store(Vec::new());
    assert_eq!(
        run_table_loader(&small.concat(), &mut s),
        Err(LoaderError::PointerOverflow { command: 2 })
    );
    small[2] = add_pointer(TABLES, TABLES, 0x30, 8);
    let mut s = Store(Vec::new());
    run_table_loader(&small.concat(), &mut s).unwrap();
    assert_eq!(
        u64::from_le_bytes(s.0[1].2[0x30..0x38].try_into().unwrap()),
        s.0[1].1
    );
}

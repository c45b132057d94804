//! DTB → BootInfo conversion, console and PSCI discovery, and robustness against malformed DTBs.
//!
//! `data/qemu-virt.dtb` was dumped by QEMU 10.0.2:
//! `qemu-system-aarch64 -M virt-10.0,virtualization=on,iommu=smmuv3,gic-version=3,dumpdtb=qemu-virt.dtb
//!  -cpu max -m 256M -device edu -kernel <any file> -append "scenario=boot-report"`
//! (QEMU pads it to 1 MiB, as it does for the DTB it passes to an ELF kernel.)

use boot::aarch64::dtb::{self, Conduit, DeviceTree, DtbError, Psci, Uart, UartKind};
use boot::{BootInfo, BootProtocol, MemoryKind, MemoryRegion};

const QEMU_VIRT: &[u8] = include_bytes!("data/qemu-virt.dtb");
const IMAGE: (u64, u64) = (0x4020_0000, 0x4029_8000);

fn be32_at(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

fn set_be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// The QEMU DTB with `totalsize` shrunk to its content (no 1 MiB padding).
fn qemu_compact() -> Vec<u8> {
    let end = (be32_at(QEMU_VIRT, 12) + be32_at(QEMU_VIRT, 32)) as usize; // strings block end
    let mut v = QEMU_VIRT[..end].to_vec();
    set_be32(&mut v, 4, end as u32);
    v
}

fn regions(info: &BootInfo, kind: MemoryKind) -> Vec<(u64, u64)> {
    info.memory_regions()
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| (r.start, r.len))
        .collect()
}

#[test]
fn qemu_virt_boot_info() {
    let dt = DeviceTree::new(QEMU_VIRT).expect("QEMU's DTB is valid");
    assert_eq!(dt.total_size(), 1 << 20);
    let mut info = BootInfo::new(BootProtocol::Arm64Image);
    let report = dt.fill_boot_info(0x4000_0000, IMAGE, &mut info);
    assert_eq!(report.skipped_entries, 0);
    assert_eq!(info.protocol, BootProtocol::Arm64Image);
    assert_eq!(info.dtb, Some(0x4000_0000));
    assert_eq!(info.rsdp, None);
    assert_eq!(info.cmdline.as_str(), "scenario=boot-report");
    assert_eq!(info.cmdline_value("scenario"), Some("boot-report"));
    assert_eq!((info.image_start, info.image_end), IMAGE);
    assert_eq!(
        regions(&info, MemoryKind::Usable),
        [(0x4000_0000, 256 << 20)]
    );
    assert_eq!(regions(&info, MemoryKind::Reserved), []);
    assert_eq!(
        regions(&info, MemoryKind::InUse),
        [(IMAGE.0, IMAGE.1 - IMAGE.0), (0x4000_0000, 1 << 20)]
    );
    assert!(info.modules().is_empty());
    assert_eq!(info.usable_bytes(), 256 << 20);
}

#[test]
fn qemu_virt_console_and_psci() {
    let dt = DeviceTree::new(QEMU_VIRT).unwrap();
    let pl011 = Uart {
        base: 0x0900_0000,
        size: 0x1000,
        kind: UartKind::Pl011,
    };
    assert_eq!(dt.stdout_uart(), Some(pl011));
    assert_eq!(dt.console_uart(), Some(pl011));
    assert_eq!(
        dt.psci(),
        Some(Psci {
            conduit: Conduit::Smc,
            standard_ids: true
        })
    );
    assert_eq!(dt.bootargs(), Some(&b"scenario=boot-report"[..]));
    let smmu = dt.find_node("/smmuv3@9050000").expect("SMMUv3 node");
    assert!(smmu.property("dma-coherent").is_some());
    assert!(
        dt.find_node("/pl011").is_some(),
        "a component without @ matches by base name"
    );
    assert!(dt.find_node("/nonexistent").is_none());
    assert!(dt.find_node("relative").is_none());
    // The raw `fdt` handle is available for everything else (here: the SMMU by compatible).
    assert!(dt.fdt().find_compatible(&["arm,smmu-v3"]).is_some());
}

#[test]
fn compacted_dtb_is_equivalent() {
    let v = qemu_compact();
    let dt = DeviceTree::new(&v).unwrap();
    assert_eq!(dt.total_size(), v.len());
    let mut info = BootInfo::new(BootProtocol::Arm64Image);
    dt.fill_boot_info(0x4800_0000, IMAGE, &mut info);
    assert_eq!(
        regions(&info, MemoryKind::Usable),
        [(0x4000_0000, 256 << 20)]
    );
    assert_eq!(
        regions(&info, MemoryKind::InUse)[1],
        (0x4800_0000, v.len() as u64)
    );
}

#[test]
fn truncated_dtbs_are_errors() {
    for len in [0, 1, 8, 39, 40, 41, 1000, 4096, QEMU_VIRT.len() - 1] {
        let r = DeviceTree::new(&QEMU_VIRT[..len]);
        assert!(
            matches!(r, Err(DtbError::Truncated { .. })),
            "len {len}: {:?}",
            r.map(|_| ())
        );
    }
    // A consistent header whose structure block is cut short.
    let mut v = qemu_compact();
    let off_struct = be32_at(&v, 8) as usize;
    set_be32(&mut v, 36, 64); // size_dt_struct: 64 bytes, ends inside the root's properties
    assert!(matches!(
        DeviceTree::new(&v),
        Err(DtbError::Structure { .. })
    ));
    let mut v = qemu_compact();
    let size = v.len();
    set_be32(&mut v, 4, (off_struct + 8) as u32); // totalsize inside the structure block
    assert!(matches!(
        DeviceTree::new(&v[..size]),
        Err(DtbError::Header(_))
    ));
}

#[test]
fn bad_header_fields_are_errors() {
    let good = qemu_compact();
    let with = |off: usize, v: u32| {
        let mut b = good.clone();
        set_be32(&mut b, off, v);
        DeviceTree::new(&b).map(|_| ())
    };
    assert_eq!(with(0, 0xfeed_d00d), Err(DtbError::BadMagic(0xfeed_d00d)));
    assert_eq!(with(0, 0), Err(DtbError::BadMagic(0)));
    assert_eq!(with(4, 3 << 20), Err(DtbError::TooLarge(3 << 20)));
    assert!(matches!(with(4, 12), Err(DtbError::Header(_))));
    assert!(matches!(with(8, 0xffff_fff0), Err(DtbError::Header(_))));
    assert!(matches!(with(8, 2), Err(DtbError::Header(_))));
    assert!(matches!(with(12, 0x8000_0000), Err(DtbError::Header(_))));
    assert!(matches!(with(16, 0xffff_fff8), Err(DtbError::Header(_))));
    assert!(matches!(with(16, 0x31), Err(DtbError::Header(_))));
    assert_eq!(
        with(20, 16),
        Err(DtbError::Version {
            version: 16,
            last_compatible: 16
        })
    );
    assert!(matches!(with(32, 0xffff_ffff), Err(DtbError::Header(_))));
    assert!(matches!(with(36, 0xffff_fffc), Err(DtbError::Header(_))));
    assert_eq!(
        dtb::header_total_size(*b"\xd0\x0d\xfe\xed\x00\x00\x10\x00"),
        Ok(4096)
    );
    assert_eq!(
        dtb::header_total_size(*b"\xd0\x0d\xfe\xed\x00\x30\x00\x00"),
        Err(DtbError::TooLarge(3 << 20))
    );
}

/// Tiny FDT writer for hand-made trees (Devicetree Specification v0.4, chapter 5).
#[derive(Default)]
struct Fdt {
    st: Vec<u8>,
    strings: Vec<u8>,
    rsv: Vec<(u64, u64)>,
}

impl Fdt {
    fn token(&mut self, t: u32) -> &mut Self {
        self.st.extend_from_slice(&t.to_be_bytes());
        self
    }
    fn pad(&mut self) {
        while !self.st.len().is_multiple_of(4) {
            self.st.push(0);
        }
    }
    fn begin(&mut self, name: &str) -> &mut Self {
        self.token(1);
        self.st.extend_from_slice(name.as_bytes());
        self.st.push(0);
        self.pad();
        self
    }
    fn end(&mut self) -> &mut Self {
        self.token(2)
    }
    fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let off = match self
            .strings
            .windows(name.len() + 1)
            .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
        {
            Some(o) => o,
            None => {
                let o = self.strings.len();
                self.strings.extend_from_slice(name.as_bytes());
                self.strings.push(0);
                o
            }
        };
        self.token(3);
        self.st
            .extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.st.extend_from_slice(&(off as u32).to_be_bytes());
        self.st.extend_from_slice(value);
        self.pad();
        self
    }
    fn cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.prop(name, &v)
    }
    fn str(&mut self, name: &str, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.prop(name, &v)
    }
    fn finish(&mut self) -> Vec<u8> {
        self.token(9);
        let rsv_off = 40;
        let st_off = rsv_off + (self.rsv.len() + 1) * 16;
        let str_off = st_off + self.st.len();
        let total = str_off + self.strings.len();
        let mut out = Vec::new();
        for v in [
            0xd00d_feed,
            total as u32,
            st_off as u32,
            str_off as u32,
            rsv_off as u32,
            17,
            16,
            0,
            self.strings.len() as u32,
            self.st.len() as u32,
        ] {
            out.extend_from_slice(&u32::to_be_bytes(v));
        }
        for &(a, s) in self.rsv.iter().chain([(0, 0)].iter()) {
            out.extend_from_slice(&a.to_be_bytes());
            out.extend_from_slice(&s.to_be_bytes());
        }
        out.extend_from_slice(&self.st);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// A board-like tree: RAM in two nodes, a memreserve, reserved-memory, a UART behind a /soc bus
/// with `ranges`, stdout-path through an alias with options, an initrd, PSCI over HVC.
fn board() -> Vec<u8> {
    let mut f = Fdt {
        rsv: vec![(0x8000_0000, 0x1000)],
        ..Default::default()
    };
    f.begin("")
        .cells("#address-cells", &[2])
        .cells("#size-cells", &[2]);
    f.begin("memory@80000000")
        .str("device_type", "memory")
        .cells(
            "reg",
            &[
                0,
                0x8000_0000,
                0,
                0x4000_0000,
                0x8,
                0x8000_0000,
                0,
                0x1000_0000,
            ],
        )
        .end();
    f.begin("memory@1000000000")
        .str("device_type", "memory")
        .str("status", "disabled")
        .cells("reg", &[0x10, 0, 0, 0x1000_0000])
        .end();
    f.begin("reserved-memory")
        .cells("#address-cells", &[2])
        .cells("#size-cells", &[2])
        .prop("ranges", &[]);
    f.begin("secmon@81000000")
        .prop("no-map", &[])
        .cells("reg", &[0, 0x8100_0000, 0, 0x20_0000])
        .end();
    f.begin("pool").cells("size", &[0, 0x40_0000]).end(); // dynamically placed: nothing to reserve
    f.end();
    f.begin("soc")
        .cells("#address-cells", &[1])
        .cells("#size-cells", &[1])
        .cells("ranges", &[0, 0, 0x1000_0000, 0x1000_0000]);
    f.begin("serial@1c28000")
        .str("compatible", "snps,dw-apb-uart")
        .cells("reg", &[0x1c2_8000, 0x400])
        .end();
    f.begin("serial@2000")
        .prop("compatible", b"arm,pl011\0arm,primecell\0")
        .cells("reg", &[0x2000, 0x1000])
        .end();
    f.end();
    f.begin("psci")
        .prop("compatible", b"arm,psci-0.2\0arm,psci\0")
        .str("method", "hvc")
        .end();
    f.begin("aliases")
        .str("serial0", "/soc/serial@2000")
        .str("loop", "loop")
        .end();
    f.begin("chosen")
        .str("bootargs", "console=ttyAMA0 semihosting loglevel=debug")
        .str("stdout-path", "serial0:115200n8");
    f.cells("linux,initrd-start", &[0x8800_0000])
        .cells("linux,initrd-end", &[0, 0x8840_0000])
        .end();
    f.end();
    f.finish()
}

#[test]
fn board_tree() {
    let bytes = board();
    let dt = DeviceTree::new(&bytes).unwrap();
    let mut info = BootInfo::new(BootProtocol::Arm64Image);
    let image = (0x8020_0000, 0x8030_0000);
    let report = dt.fill_boot_info(0x8f00_0000, image, &mut info);
    assert_eq!(report.skipped_entries, 0);
    assert_eq!(
        regions(&info, MemoryKind::Usable),
        [(0x8000_0000, 0x4000_0000), (0x8_8000_0000, 0x1000_0000)]
    );
    assert_eq!(
        regions(&info, MemoryKind::Reserved),
        [(0x8000_0000, 0x1000), (0x8100_0000, 0x20_0000)]
    );
    assert_eq!(
        regions(&info, MemoryKind::InUse),
        [
            (0x8020_0000, 0x10_0000),
            (0x8f00_0000, bytes.len() as u64),
            (0x8800_0000, 0x40_0000)
        ]
    );
    assert_eq!(info.modules().len(), 1);
    assert_eq!(
        (info.modules()[0].start, info.modules()[0].len),
        (0x8800_0000, 0x40_0000)
    );
    assert_eq!(info.cmdline_value("loglevel"), Some("debug"));
    assert!(info.cmdline_value("semihosting").is_some());
    // stdout-path = alias + options, and the /soc ranges move the UART to 0x1000_2000.
    let uart = Uart {
        base: 0x1000_2000,
        size: 0x1000,
        kind: UartKind::Pl011,
    };
    assert_eq!(dt.stdout_uart(), Some(uart));
    assert_eq!(
        dt.psci(),
        Some(Psci {
            conduit: Conduit::Hvc,
            standard_ids: true
        })
    );
    assert!(dt.find_node("/soc/serial@1c28000").is_some());
    assert!(dt.find_node("/soc/serial@9999").is_none());
}

#[test]
fn console_fallbacks() {
    // No stdout-path: the first enabled PL011/SBSA UART anywhere in the tree (a disabled one is
    // skipped) that has a CPU address.
    let mut f = Fdt::default();
    f.begin("")
        .cells("#address-cells", &[1])
        .cells("#size-cells", &[1]);
    f.begin("uart@1000")
        .str("compatible", "arm,pl011")
        .str("status", "disabled")
        .cells("reg", &[0x1000, 0x1000])
        .end();
    f.begin("bus")
        .cells("#address-cells", &[1])
        .cells("#size-cells", &[1]);
    f.begin("uart@3000")
        .str("compatible", "arm,sbsa-uart")
        .cells("reg", &[0x3000, 0x1000])
        .end();
    f.end();
    f.begin("uart@2000")
        .str("compatible", "arm,sbsa-uart")
        .cells("reg", &[0x2000, 0x1000])
        .end();
    f.begin("psci")
        .str("compatible", "arm,psci")
        .str("method", "smc")
        .end();
    f.end();
    let bytes = f.finish();
    let dt = DeviceTree::new(&bytes).unwrap();
    assert_eq!(dt.stdout_uart(), None);
    // uart@3000 comes first but sits on a bus without `ranges`: no CPU address, so skipped.
    let sbsa = Uart {
        base: 0x2000,
        size: 0x1000,
        kind: UartKind::SbsaGeneric,
    };
    assert_eq!(dt.console_uart(), Some(sbsa));
    assert_eq!(
        dt.psci(),
        Some(Psci {
            conduit: Conduit::Smc,
            standard_ids: false
        })
    );
    let mut info = BootInfo::new(BootProtocol::Arm64Image);
    dt.fill_boot_info(0x1000, (0, 0), &mut info);
    assert_eq!(info.usable_bytes(), 0, "no memory node, no usable memory");
}

#[test]
fn alias_loops_terminate() {
    let mut f = Fdt::default();
    f.begin("")
        .cells("#address-cells", &[1])
        .cells("#size-cells", &[1]);
    f.begin("aliases")
        .str("a", "a")
        .str("b", "/nonexistent")
        .str("/x", "/x")
        .end();
    f.begin("chosen").str("stdout-path", "a").end();
    f.end();
    let bytes = f.finish();
    let dt = DeviceTree::new(&bytes).unwrap();
    assert_eq!(dt.stdout_uart(), None);
    assert!(dt.find_node("/x").is_none());
}

#[test]
fn weird_reg_properties_are_skipped() {
    let mut f = Fdt::default();
    f.begin("")
        .cells("#address-cells", &[3])
        .cells("#size-cells", &[1]);
    f.begin("memory@0")
        .str("device_type", "memory")
        .cells("reg", &[0, 0, 0, 0x1000])
        .end(); // 3 cells, high 0: ok
    f.begin("memory@1")
        .str("device_type", "memory")
        .cells("reg", &[1, 0, 0, 0x1000])
        .end(); // > 64 bits
    f.begin("memory@2")
        .str("device_type", "memory")
        .cells("reg", &[0, 0x2000])
        .end(); // wrong length
    f.begin("memory@3")
        .str("device_type", "memory")
        .cells("reg", &[0, 0xffff_ffff, 0xffff_f000, 0xffff_ffff])
        .end(); // wraps
    f.begin("chosen")
        .prop("bootargs", b"")
        .prop("linux,initrd-start", &[1, 2, 3])
        .cells("linux,initrd-end", &[5])
        .end();
    f.end();
    let bytes = f.finish();
    let dt = DeviceTree::new(&bytes).unwrap();
    let mut info = BootInfo::new(BootProtocol::Arm64Image);
    let report = dt.fill_boot_info(0x10_0000, (0, 0), &mut info);
    assert_eq!(report.skipped_entries, 2);
    assert_eq!(
        regions(&info, MemoryKind::Usable),
        [(0, 0x1000), (0xffff_ffff_ffff_f000, 0xfff)]
    );
    assert_eq!(info.cmdline.as_str(), "");
    assert!(info.modules().is_empty());
    assert!(
        info.memory_regions()
            .iter()
            .all(|r: &MemoryRegion| r.start.checked_add(r.len).is_some())
    );
}

#[test]
fn malformed_structures_are_errors() {
    let check = |build: &dyn Fn(&mut Fdt), what: &str| {
        let mut f = Fdt::default();
        build(&mut f);
        let bytes = f.finish();
        match DeviceTree::new(&bytes) {
            Err(DtbError::Structure { what: w, .. }) => {
                assert!(w.contains(what), "{w:?} vs {what:?}")
            }
            other => panic!(
                "expected a structure error containing {what:?}, got {:?}",
                other.map(|_| ())
            ),
        }
    };
    check(
        &|f| {
            f.begin("")
                .begin("a")
                .end()
                .cells("#size-cells", &[1])
                .end();
        },
        "after a subnode",
    );
    check(
        &|f| {
            f.begin("").token(4).end();
        },
        "FDT_NOP",
    );
    check(
        &|f| {
            f.begin("").prop("#address-cells", &[0, 2]).end();
        },
        "shorter than one cell",
    );
    check(
        &|f| {
            f.begin("").end().begin("").end();
        },
        "second root",
    );
    check(
        &|f| {
            f.begin("x").end();
        },
        "root node has a name",
    );
    check(
        &|f| {
            f.begin("").begin("").end().end();
        },
        "empty node name",
    );
    check(
        &|f| {
            f.begin("").end().end();
        },
        "without a node",
    );
    check(
        &|f| {
            f.begin("");
        },
        "before the root node is closed",
    );
    check(
        &|f| {
            f.begin("").token(7).end();
        },
        "unknown token",
    );
    check(
        &|f| {
            f.begin("");
            for _ in 0..40 {
                f.begin("n");
            }
            for _ in 0..40 {
                f.end();
            }
            f.end();
        },
        "too deeply",
    );
    // A property whose name offset points past the strings block.
    let mut f = Fdt::default();
    f.begin("").prop("p", &[]).end();
    let mut bytes = f.finish();
    let st_off = be32_at(&bytes, 8) as usize;
    set_be32(&mut bytes, st_off + 16, 0x100); // BEGIN_NODE "" is 8 bytes; then PROP, len, nameoff
    assert!(matches!(
        DeviceTree::new(&bytes),
        Err(DtbError::Structure { .. })
    ));
}

/// Exercises every query the hypervisor makes on a (validated) tree.
fn use_everything(bytes: &[u8]) {
    if let Ok(dt) = DeviceTree::new(bytes) {
        let mut info = BootInfo::new(BootProtocol::Arm64Image);
        dt.fill_boot_info(0x4000_0000, IMAGE, &mut info);
        let _ = (
            dt.console_uart(),
            dt.stdout_uart(),
            dt.psci(),
            dt.bootargs(),
        );
        let _ = dt.find_node("/chosen");
        let _ = dt.find_node("/pcie@10000000");
        for node in dt.fdt().all_nodes() {
            let _ = node.compatible().map(|c| c.all().count());
            let _ = node.properties().count();
            let _ = node.children().count();
        }
        let _ = dt.fdt().find_compatible(&["arm,smmu-v3"]);
    }
}

/// Seeded xorshift, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_corruption_never_panics() {
    let seeds: [&[u8]; 2] = [&qemu_compact(), &board()];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..6000 {
        let mut b = seeds[round % 2].to_vec();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            match rng.below(4) {
                0 => b[i] = rng.next() as u8,
                1 => b[i] ^= 1 << rng.below(8),
                // Hit the token / length words more often: they drive the walk.
                2 if (i & !3) + 4 <= b.len() => {
                    b[i & !3..(i & !3) + 4].copy_from_slice(&(rng.below(12) as u32).to_be_bytes())
                }
                2 => {}
                _ => b.truncate(i.max(1)),
            }
            if b.len() < 8 {
                break;
            }
        }
        let result = std::panic::catch_unwind(|| use_everything(&b));
        assert!(
            result.is_ok(),
            "round {round}: panicked on input {:02x?}",
            &b[..b.len().min(64)]
        );
    }
}

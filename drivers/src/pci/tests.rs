//! Host tests: a QEMU-q35-like topology with and without firmware configuration, a switch
//! hierarchy, hostile configuration spaces, and ECAM addressing.

use std::boxed::Box;
use std::cell::RefCell;
use std::vec;
use std::vec::Vec;

use iommu::hw::Mmio;

use super::fake::{AllOnes, FakeFn, FakePci, SameEverywhere};
use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
    Bdf::new(bus, device, function).unwrap()
}

fn q35_windows() -> [Window; 3] {
    [
        Window {
            base: 0xc000_0000,
            size: 0x3ec0_0000,
            kind: WindowKind::Mem32,
        },
        Window {
            base: 0x80_0000_0000,
            size: 0x80_0000_0000,
            kind: WindowKind::Mem64,
        },
        Window {
            base: 0xc000,
            size: 0x4000,
            kind: WindowKind::Io,
        },
    ]
}

fn edu() -> FakeFn {
    // 1234:11e8, class 00ffh, BAR0 1 MiB 32-bit memory, MSI (64-bit capable).
    FakeFn::endpoint(0x1234, 0x11e8, 0x00, 0xff)
        .mem32_bar(0, MIB as u32, false)
        .cap(0x05, &[0x80, 0x00])
}

fn disabled_windows(f: FakeFn) -> FakeFn {
    let mut f = f;
    f.regs[0x1c] = 0xf1; // I/O base 0xf000 > limit 0x0fff
    f.regs[0x1d] = 0x01;
    f.set16(0x20, 0xfff0);
    f.set16(0x22, 0x0000);
    f.set16(0x24, 0xfff1);
    f.set16(0x26, 0x0001);
    f
}

/// host bridge 00:00.0, edu 00:03.0, root port 00:1c.0 → edu-like PCIe endpoint 01:00.0,
/// multi-function ICH9 at 00:1f.{0,2,3} (function 1 absent).
fn q35(firmware: bool) -> FakePci {
    let mut p = FakePci::new();
    p.add(0, 0, 0, FakeFn::endpoint(0x8086, 0x29c0, 0x06, 0x00));
    let mut e = edu();
    if firmware {
        e = e.at(0, 0xfea0_0000);
    }
    p.add(0, 3, 0, e);
    let mut rp = FakeFn::bridge(0x8086, 0x2940)
        .pcie(4)
        .cap(0x05, &[0x00, 0x00]);
    if firmware {
        rp = disabled_windows(rp)
            .buses(0, 1, 1)
            .mem_window(0xfe80_0000, 0xfe8f_ffff);
    }
    let (_, below) = p.add_bridge(0, 0x1c, 0, rp);
    // MSI-X: 4 entries, table at BAR0 + 0x3000, PBA at BAR0 + 0x3800.
    let mut ep = edu()
        .pcie(0)
        .cap(0x11, &[0x03, 0x00, 0x00, 0x30, 0, 0, 0x00, 0x38, 0, 0])
        .ext_cap(0x000f, &[0x00, 0x00])
        .ext_cap(0x0013, &[0; 12])
        .ext_cap(0x001b, &[0x06, 20, 0, 0]);
    if firmware {
        ep = ep.at(0, 0xfe80_0000);
    }
    p.add(below, 0, 0, ep);
    p.add(
        0,
        0x1f,
        0,
        FakeFn::endpoint(0x8086, 0x2918, 0x06, 0x01).multifunction(),
    );
    let mut sata = FakeFn::endpoint(0x8086, 0x2922, 0x01, 0x06)
        .io_bar(4, 0x20)
        .mem32_bar(5, 0x1000, false);
    let mut smbus = FakeFn::endpoint(0x8086, 0x2930, 0x0c, 0x05).io_bar(4, 0x40);
    if firmware {
        sata = sata.at(4, 0xc040).at(5, 0xfeb0_0000);
        smbus = smbus.at(4, 0xc000);
    }
    p.add(0, 0x1f, 2, sata);
    p.add(0, 0x1f, 3, smbus);
    p
}

fn scan(p: &FakePci, config: &EnumConfig) -> Box<PciDevices> {
    let ecam = Ecam::new(p, 0, config.root_bus, config.max_bus);
    let mut d = Box::new(PciDevices::new());
    enumerate(&ecam, config, &mut d);
    d
}

fn errors(d: &PciDevices) -> Vec<PciError> {
    d.errors().copied().collect()
}

fn addrs(d: &PciDevices) -> Vec<Bdf> {
    d.functions().iter().map(|f| f.bdf).collect()
}

// Independent decoders of the bridge window registers (PCIe Base 5.0 §7.5.1.3).
fn hw_mem_window(f: &FakeFn) -> Option<(u64, u64)> {
    let v = f.get32(0x20);
    let base = u64::from(v & 0xfff0) << 16;
    let last = (u64::from(v >> 16) & 0xfff0) << 16 | 0xf_ffff;
    (base <= last).then_some((base, last))
}

fn hw_pref_window(f: &FakeFn) -> Option<(u64, u64)> {
    let v = f.get32(0x24);
    let base = u64::from(v & 0xfff0) << 16 | u64::from(f.get32(0x28)) << 32;
    let last = (u64::from(v >> 16) & 0xfff0) << 16 | 0xf_ffff | u64::from(f.get32(0x2c)) << 32;
    (base <= last).then_some((base, last))
}

fn hw_io_window(f: &FakeFn) -> Option<(u64, u64)> {
    let v = f.get32(0x1c);
    let up = f.get32(0x30);
    let base = u64::from(v & 0xf0) << 8 | u64::from(up & 0xffff) << 16;
    let last = u64::from((v >> 8) & 0xf0) << 8 | 0xfff | u64::from(up >> 16) << 16;
    (base <= last).then_some((base, last))
}

fn hw_bar(f: &FakeFn, index: usize) -> u64 {
    let lo = f.get32(0x10 + 4 * index);
    if lo & 1 == 1 {
        return u64::from(lo & !3);
    }
    let mut v = u64::from(lo & !0xf);
    if lo & 0x6 == 0x4 {
        v |= u64::from(f.get32(0x14 + 4 * index)) << 32;
    }
    v
}

fn contains(outer: (u64, u64), base: u64, size: u64) -> bool {
    base >= outer.0 && base + size - 1 <= outer.1
}

fn in_window(windows: &[Window], kind: WindowKind, base: u64, size: u64) -> bool {
    windows
        .iter()
        .any(|w| w.kind == kind && base >= w.base && base + size <= w.base + w.size)
}

/// All live BAR ranges on the segment are pairwise disjoint, naturally aligned, and match the
/// hardware registers.
fn check_bars_disjoint(p: &FakePci, d: &PciDevices) {
    let mut ranges: Vec<(bool, u64, u64, Bdf)> = Vec::new();
    for f in d.functions() {
        for b in f.bars().filter(|b| b.is_live()) {
            assert_eq!(
                b.base % b.size,
                0,
                "{} BAR{} not naturally aligned",
                f.bdf,
                b.index
            );
            let hw = p.with(f.bdf.bus, f.bdf.device, f.bdf.function, |x| {
                hw_bar(x, usize::from(b.index))
            });
            assert_eq!(hw, b.base, "{} BAR{} register", f.bdf, b.index);
            ranges.push((b.kind == BarKind::Io, b.base, b.base + b.size - 1, f.bdf));
        }
    }
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            assert!(
                a.0 != b.0 || a.2 < b.1 || b.2 < a.1,
                "overlap {a:x?} {b:x?}"
            );
        }
    }
}

#[test]
fn bdf_display_and_rid() {
    let b = bdf(0x01, 0x1c, 7);
    assert_eq!(std::format!("{b}"), "01:1c.7");
    assert_eq!(b.rid(), 0x01e7);
    assert_eq!(Bdf::from_rid(0x0018), bdf(0, 3, 0));
    assert_eq!(bdf(0, 3, 0).rid(), 0x0018);
    assert_eq!(Bdf::new(0, 32, 0), None);
    assert_eq!(Bdf::new(0, 0, 8), None);
}

/// Records every MMIO access; reads return a pattern derived from the offset.
#[derive(Default)]
struct Recorder {
    log: RefCell<Vec<(char, usize, u64)>>,
    value: RefCell<u32>,
}

impl Mmio for Recorder {
    fn read32(&self, offset: usize) -> u32 {
        self.log.borrow_mut().push(('r', offset, 0));
        *self.value.borrow()
    }
    fn write32(&self, offset: usize, value: u32) {
        self.log.borrow_mut().push(('w', offset, u64::from(value)));
    }
    fn read64(&self, offset: usize) -> u64 {
        self.log.borrow_mut().push(('R', offset, 0));
        0
    }
    fn write64(&self, offset: usize, value: u64) {
        self.log.borrow_mut().push(('W', offset, value));
    }
}

#[test]
fn ecam_addressing_and_range() {
    let ecam = Ecam::new(Recorder::default(), 1, 0x10, 0x1f);
    *ecam.mmio().value.borrow_mut() = 0xaabb_ccdd;
    assert_eq!(ecam.read32(bdf(0x12, 3, 5), 0x44), 0xaabb_ccdd);
    assert_eq!(
        ecam.mmio().log.borrow()[0],
        ('r', (2 << 20) | (3 << 15) | (5 << 12) | 0x44, 0)
    );
    // Narrow reads extract from the containing dword.
    assert_eq!(ecam.read16(bdf(0x12, 3, 5), 0x46), 0xaabb);
    assert_eq!(ecam.read8(bdf(0x12, 3, 5), 0x45), 0xcc);
    ecam.mmio().log.borrow_mut().clear();
    // Out of range, invalid device/function, misaligned or past 4 KiB: all ones, no access.
    assert_eq!(ecam.read32(bdf(0x0f, 0, 0), 0), u32::MAX);
    assert_eq!(ecam.read32(bdf(0x20, 0, 0), 0), u32::MAX);
    assert_eq!(
        ecam.read32(
            Bdf {
                bus: 0x10,
                device: 32,
                function: 0
            },
            0
        ),
        u32::MAX
    );
    assert_eq!(
        ecam.read32(
            Bdf {
                bus: 0x10,
                device: 0,
                function: 8
            },
            0
        ),
        u32::MAX
    );
    assert_eq!(ecam.read32(bdf(0x10, 0, 0), 2), u32::MAX);
    assert_eq!(ecam.read32(bdf(0x10, 0, 0), 4096), u32::MAX);
    assert_eq!(ecam.read16(bdf(0x10, 0, 0), 1), 0xffff);
    ecam.write32(bdf(0x20, 0, 0), 0, 0);
    ecam.write32(bdf(0x0f, 0, 0), 0, 0);
    assert!(ecam.mmio().log.borrow().is_empty());
    // The last bus of the range is the last 1 MiB of the region.
    ecam.write32(bdf(0x1f, 31, 7), 0xffc, 1);
    assert_eq!(
        ecam.mmio().log.borrow()[0],
        ('w', (15 << 20) | (31 << 15) | (7 << 12) | 0xffc, 1)
    );
}

#[test]
fn narrow_writes_do_not_clear_rw1c_status() {
    let ecam = Ecam::new(Recorder::default(), 0, 0, 0);
    // STATUS has error bits set (upper half); writing COMMAND must write zeros there.
    *ecam.mmio().value.borrow_mut() = 0xf900_0000;
    ecam.write16(bdf(0, 1, 0), reg::COMMAND, 0x0006);
    let log = ecam.mmio().log.borrow();
    assert_eq!(*log.last().unwrap(), ('w', (1 << 15) | 4, 0x0000_0006));
}

#[test]
fn firmware_configured_q35() {
    let p = q35(true);
    let d = scan(&p, &EnumConfig::new());
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(
        addrs(&d),
        [
            bdf(0, 0, 0),
            bdf(0, 3, 0),
            bdf(0, 0x1c, 0),
            bdf(1, 0, 0),
            bdf(0, 0x1f, 0),
            bdf(0, 0x1f, 2),
            bdf(0, 0x1f, 3)
        ]
    );
    let e = d.get(bdf(0, 3, 0)).unwrap();
    assert_eq!(
        (e.vendor_id, e.device_id, e.class, e.subclass, e.revision),
        (0x1234, 0x11e8, 0x00, 0xff, 0x10)
    );
    let bar0 = e.bars[0].unwrap();
    assert_eq!(
        bar0,
        Bar {
            index: 0,
            kind: BarKind::Mem32,
            prefetchable: false,
            base: 0xfea0_0000,
            size: MIB,
            state: BarState::Firmware
        }
    );
    assert_eq!(e.bars().count(), 1);
    assert!(e.caps.msi.unwrap().addr64);
    assert_eq!(e.caps.pcie, None);

    let rp = d.get(bdf(0, 0x1c, 0)).unwrap();
    assert_eq!((rp.class, rp.subclass, rp.header_type), (0x06, 0x04, 1));
    let b = rp.bridge.unwrap();
    assert_eq!(
        (
            b.primary,
            b.secondary,
            b.subordinate,
            b.buses_assigned,
            b.scanned
        ),
        (0, 1, 1, false, true)
    );
    assert_eq!(rp.caps.pcie.unwrap().port_type, 4);
    assert_eq!(d.bridge_buses(0, 0, 0x1c, 0), Some((1, 1)));
    assert_eq!(d.bridge_buses(1, 0, 0x1c, 0), None, "other segment");
    assert_eq!(d.bridge_buses(0, 0, 3, 0), None, "not a bridge");

    let ep = d.get(bdf(1, 0, 0)).unwrap();
    let c = ep.caps;
    assert_eq!(c.pcie.unwrap().port_type, 0);
    let msix = c.msix.unwrap();
    assert_eq!(
        (
            msix.table_size,
            msix.table_bar,
            msix.table_offset,
            msix.pba_bar,
            msix.pba_offset
        ),
        (4, 0, 0x3000, 0, 0x3800)
    );
    assert!(c.msi.is_some());
    assert_eq!(c.ats.unwrap().offset, 0x100);
    assert!(c.pri.is_some());
    let pasid = c.pasid.unwrap();
    assert_eq!(
        (
            pasid.max_width,
            pasid.execute_permission,
            pasid.privileged_mode
        ),
        (20, true, true)
    );

    assert!(d.get(bdf(0, 0x1f, 0)).unwrap().multifunction);
    assert!(d.get(bdf(0, 0x1f, 1)).is_none());
    let sata = d.get(bdf(0, 0x1f, 2)).unwrap();
    assert_eq!(sata.bars[4].unwrap().kind, BarKind::Io);
    assert_eq!(sata.bars[4].unwrap().size, 0x20);
    assert_eq!(sata.bars[5].unwrap().size, 0x1000);

    // Assignment keeps everything firmware did.
    let before: Vec<Vec<u8>> = p
        .fns
        .borrow()
        .iter()
        .map(|f| f.regs[0x10..0x34].to_vec())
        .collect();
    let mut d = d;
    let r = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &q35_windows()).unwrap();
    assert_eq!(
        r,
        AssignReport {
            kept: 5,
            assigned: 0,
            bridges_programmed: 0
        }
    );
    let after: Vec<Vec<u8>> = p
        .fns
        .borrow()
        .iter()
        .map(|f| f.regs[0x10..0x34].to_vec())
        .collect();
    assert_eq!(before, after);
    assert!(
        d.functions()
            .iter()
            .flat_map(|f| f.bars())
            .all(|b| b.state == BarState::Kept)
    );
    assert_eq!(
        d.get(bdf(0, 0x1c, 0)).unwrap().bridge.unwrap().mem_window,
        Some((0xfe80_0000, 0xfe8f_ffff))
    );
    // Decode enabled.
    assert_eq!(p.with(0, 3, 0, |f| f.regs[4]) & 0x3, 0x2);
    assert_eq!(p.with(0, 0x1f, 2, |f| f.regs[4]) & 0x3, 0x3);
    assert_eq!(p.with(0, 0x1c, 0, |f| f.regs[4]) & 0x3, 0x2);
}

#[test]
fn unconfigured_q35_gets_buses_and_bars() {
    let p = q35(false);
    let mut d = scan(&p, &EnumConfig::new());
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(d.functions().len(), 7);
    let b = d.get(bdf(0, 0x1c, 0)).unwrap().bridge.unwrap();
    assert_eq!(
        (b.primary, b.secondary, b.subordinate, b.buses_assigned),
        (0, 1, 1, true)
    );
    assert_eq!(
        p.with(0, 0x1c, 0, |f| (f.regs[0x18], f.regs[0x19], f.regs[0x1a])),
        (0, 1, 1)
    );
    let e = d.get(bdf(0, 3, 0)).unwrap().bars[0].unwrap();
    assert_eq!(
        (e.kind, e.prefetchable, e.size, e.base, e.state),
        (BarKind::Mem32, false, MIB, 0, BarState::Unassigned)
    );

    let w = q35_windows();
    let r = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap();
    assert_eq!(r.kept, 0);
    assert_eq!(r.assigned, 5);
    assert_eq!(r.bridges_programmed, 1);
    check_bars_disjoint(&p, &d);
    for f in d.functions() {
        for b in f.bars() {
            assert_eq!(b.state, BarState::Assigned);
            let kind = if b.kind == BarKind::Io {
                WindowKind::Io
            } else {
                WindowKind::Mem32
            };
            assert!(in_window(&w, kind, b.base, b.size), "{} {b:x?}", f.bdf);
        }
    }
    // The root port's memory window covers the endpoint behind it; I/O and prefetchable
    // windows are closed because nothing behind it needs them.
    let child = d.get(bdf(1, 0, 0)).unwrap().bars[0].unwrap();
    let mw = p.with(0, 0x1c, 0, hw_mem_window).unwrap();
    assert!(contains(mw, child.base, child.size), "{mw:x?} {child:x?}");
    assert_eq!(mw.1 - mw.0 + 1, MIB);
    assert!(in_window(&w, WindowKind::Mem32, mw.0, mw.1 - mw.0 + 1));
    assert_eq!(p.with(0, 0x1c, 0, hw_io_window), None);
    assert_eq!(p.with(0, 0x1c, 0, hw_pref_window), None);
    assert_eq!(
        d.get(bdf(0, 0x1c, 0)).unwrap().bridge.unwrap().mem_window,
        Some(mw)
    );
    // The root port's window does not overlap the edu on bus 0.
    let e = d.get(bdf(0, 3, 0)).unwrap().bars[0].unwrap();
    assert!(e.base + e.size - 1 < mw.0 || mw.1 < e.base);
    // Decode is on where resources are live, bus master stays off.
    for (b, want) in [
        (bdf(0, 3, 0), 0x2),
        (bdf(1, 0, 0), 0x2),
        (bdf(0, 0x1c, 0), 0x2),
        (bdf(0, 0x1f, 2), 0x3),
        (bdf(0, 0x1f, 3), 0x1),
    ] {
        assert_eq!(
            p.with(b.bus, b.device, b.function, |f| f.regs[4]) & 0x7,
            want,
            "{b}"
        );
    }
    // Host bridge and LPC have no BARs: COMMAND untouched.
    assert_eq!(p.with(0, 0, 0, |f| f.regs[4]), 0);

    // Bus master along the path to the endpoint only.
    assert!(enable_bus_master(
        &Ecam::new(&p, 0, 0, 255),
        &d,
        bdf(1, 0, 0)
    ));
    assert_eq!(p.with(1, 0, 0, |f| f.regs[4]) & 0x4, 0x4);
    assert_eq!(p.with(0, 0x1c, 0, |f| f.regs[4]) & 0x4, 0x4);
    assert_eq!(p.with(0, 3, 0, |f| f.regs[4]) & 0x4, 0);
    assert!(!enable_bus_master(
        &Ecam::new(&p, 0, 0, 255),
        &d,
        bdf(7, 0, 0)
    ));

    // Running it again keeps everything (now consistent) and changes nothing.
    let before: Vec<Vec<u8>> = p
        .fns
        .borrow()
        .iter()
        .map(|f| f.regs[0x10..0x34].to_vec())
        .collect();
    let mut d2 = scan(&p, &EnumConfig::new());
    let r2 = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d2, &w).unwrap();
    assert_eq!((r2.kept, r2.assigned), (5, 0));
    let after: Vec<Vec<u8>> = p
        .fns
        .borrow()
        .iter()
        .map(|f| f.regs[0x10..0x34].to_vec())
        .collect();
    assert_eq!(before, after);
}

/// Root port 00:1c.0 → switch upstream port 01:00.0 → downstream ports 02:00.0, 02:01.0 →
/// endpoints 03:00.0 (64-bit prefetchable 256 MiB + 16 KiB) and 04:00.0 (I/O 256 + 1 MiB),
/// and an empty root port 00:1d.0.
fn switch_topology() -> FakePci {
    let mut p = FakePci::new();
    let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).pcie(4));
    let (_, b2) = p.add_bridge(b1, 0, 0, FakeFn::bridge(0x10b5, 0x8747).pcie(5));
    let (_, b3) = p.add_bridge(b2, 0, 0, FakeFn::bridge(0x10b5, 0x8747).pcie(6));
    let (_, b4) = p.add_bridge(b2, 1, 0, FakeFn::bridge(0x10b5, 0x8747).pcie(6));
    p.add(
        b3,
        0,
        0,
        FakeFn::endpoint(0x1af4, 0x1041, 0x02, 0x00)
            .mem64_bar(0, 256 * MIB, true)
            .mem32_bar(2, 0x4000, false)
            .pcie(0),
    );
    // A device that ignores the device number: it would alias on 04:01..04:1f if probed there.
    p.add(
        b4,
        0,
        0,
        FakeFn::endpoint(0x1af4, 0x1000, 0x02, 0x00)
            .io_bar(0, 0x100)
            .mem32_bar(1, MIB as u32, false)
            .pcie(0),
    );
    for dev in 1..32 {
        p.add(b4, dev, 0, FakeFn::endpoint(0x1af4, 0x1000, 0x02, 0x00));
    }
    p.add_bridge(0, 0x1d, 0, FakeFn::bridge(0x8086, 0x2942).pcie(4));
    p
}

#[test]
fn switch_hierarchy_numbering_and_windows() {
    let p = switch_topology();
    let mut d = scan(&p, &EnumConfig::new());
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(
        addrs(&d),
        [
            bdf(0, 0x1c, 0),
            bdf(1, 0, 0),
            bdf(2, 0, 0),
            bdf(3, 0, 0),
            bdf(2, 1, 0),
            bdf(4, 0, 0),
            bdf(0, 0x1d, 0)
        ],
        "only device 0 below PCIe downstream ports"
    );
    let buses = |b: Bdf| d.get(b).unwrap().bridge_buses().unwrap();
    assert_eq!(buses(bdf(0, 0x1c, 0)), (1, 4));
    assert_eq!(buses(bdf(1, 0, 0)), (2, 4));
    assert_eq!(buses(bdf(2, 0, 0)), (3, 3));
    assert_eq!(buses(bdf(2, 1, 0)), (4, 4));
    assert_eq!(buses(bdf(0, 0x1d, 0)), (5, 5));
    // Subordinates were fixed in hardware too.
    assert_eq!(
        p.with(0, 0x1c, 0, |f| (f.regs[0x18], f.regs[0x19], f.regs[0x1a])),
        (0, 1, 4)
    );
    assert_eq!(
        p.with(1, 0, 0, |f| (f.regs[0x18], f.regs[0x19], f.regs[0x1a])),
        (1, 2, 4)
    );
    assert_eq!(
        p.with(0, 0x1d, 0, |f| (f.regs[0x18], f.regs[0x19], f.regs[0x1a])),
        (0, 5, 5)
    );

    let big = d.get(bdf(3, 0, 0)).unwrap().bars[0].unwrap();
    assert_eq!(
        (big.kind, big.prefetchable, big.size),
        (BarKind::Mem64, true, 256 * MIB)
    );
    assert_eq!(
        d.get(bdf(3, 0, 0)).unwrap().bars[1],
        None,
        "upper half of the 64-bit BAR"
    );

    let w = q35_windows();
    let r = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap();
    assert_eq!(r.assigned, 4);
    check_bars_disjoint(&p, &d);
    let big = d.get(bdf(3, 0, 0)).unwrap().bars[0].unwrap();
    assert!(
        in_window(&w, WindowKind::Mem64, big.base, big.size),
        "{big:x?}"
    );
    // Every bridge on the path forwards it through its prefetchable window, nested.
    let path = [bdf(2, 0, 0), bdf(1, 0, 0), bdf(0, 0x1c, 0)];
    let mut inner = (big.base, big.base + big.size - 1);
    for b in path {
        let pw = p.with(b.bus, b.device, b.function, hw_pref_window).unwrap();
        assert!(
            contains(pw, inner.0, inner.1 - inner.0 + 1),
            "{b} {pw:x?} {inner:x?}"
        );
        inner = pw;
    }
    assert!(in_window(
        &w,
        WindowKind::Mem64,
        inner.0,
        inner.1 - inner.0 + 1
    ));
    // The 32-bit BARs go through the memory windows below 4 GiB.
    let small = d.get(bdf(3, 0, 0)).unwrap().bars[2].unwrap();
    let io = d.get(bdf(4, 0, 0)).unwrap().bars[0].unwrap();
    let m4 = d.get(bdf(4, 0, 0)).unwrap().bars[1].unwrap();
    for (b, bar) in [(bdf(2, 0, 0), small), (bdf(2, 1, 0), m4)] {
        let mw = p.with(b.bus, b.device, b.function, hw_mem_window).unwrap();
        assert!(contains(mw, bar.base, bar.size));
        let up = p.with(1, 0, 0, hw_mem_window).unwrap();
        assert!(contains(up, mw.0, mw.1 - mw.0 + 1));
        let root = p.with(0, 0x1c, 0, hw_mem_window).unwrap();
        assert!(contains(root, up.0, up.1 - up.0 + 1));
        assert!(in_window(
            &w,
            WindowKind::Mem32,
            root.0,
            root.1 - root.0 + 1
        ));
    }
    // I/O nests too, with 4 KiB granularity.
    let mut inner = (io.base, io.base + io.size - 1);
    for b in [bdf(2, 1, 0), bdf(1, 0, 0), bdf(0, 0x1c, 0)] {
        let iw = p.with(b.bus, b.device, b.function, hw_io_window).unwrap();
        assert!(contains(iw, inner.0, inner.1 - inner.0 + 1));
        assert_eq!(iw.0 % 0x1000, 0);
        inner = iw;
    }
    assert!(in_window(
        &w,
        WindowKind::Io,
        inner.0,
        inner.1 - inner.0 + 1
    ));
    // 02:00.0 needs no I/O; the empty root port needs nothing.
    assert_eq!(p.with(2, 0, 0, hw_io_window), None);
    for f in [hw_io_window, hw_mem_window, hw_pref_window] {
        assert_eq!(p.with(0, 0x1d, 0, f), None);
    }
    // Every bridge with a window decodes memory.
    assert_eq!(p.with(0, 0x1c, 0, |f| f.regs[4]) & 3, 3);
    assert_eq!(p.with(0, 0x1d, 0, |f| f.regs[4]) & 3, 0);
    // Topology query for the DMAR path resolver.
    assert_eq!(d.bridge_buses(0, 1, 0, 0), Some((2, 4)));
    assert_eq!(d.bridge_buses(0, 3, 0, 0), None);
}

#[test]
fn reassign_policy_renumbers_firmware_buses() {
    let mut p = FakePci::new();
    let (_, b) = p.add_bridge(
        0,
        0x1c,
        0,
        disabled_windows(FakeFn::bridge(0x8086, 0x2940)).buses(0, 7, 9),
    );
    p.add(b, 0, 0, edu());
    let d = scan(
        &p,
        &EnumConfig {
            bus_policy: BusPolicy::KeepFirmware,
            ..EnumConfig::new()
        },
    );
    assert_eq!(d.bridge_buses(0, 0, 0x1c, 0), Some((7, 9)));
    assert!(d.get(bdf(7, 0, 0)).is_some());
    let d = scan(
        &p,
        &EnumConfig {
            bus_policy: BusPolicy::Reassign,
            ..EnumConfig::new()
        },
    );
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(d.bridge_buses(0, 0, 0x1c, 0), Some((1, 1)));
    assert!(d.get(bdf(1, 0, 0)).is_some());
}

#[test]
fn keep_firmware_and_number_an_unconfigured_sibling() {
    // 00:1c.0 numbered 1..=2 by firmware (with 01:00.0 → bus 2), 00:1d.0 unconfigured: it must
    // get bus 3, not 1 or 2.
    let mut p = FakePci::new();
    let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 2));
    let (_, b2) = p.add_bridge(b1, 0, 0, FakeFn::bridge(0x8086, 0x244e).buses(1, 2, 2));
    p.add(b2, 0, 0, edu());
    let (_, b3) = p.add_bridge(0, 0x1d, 0, FakeFn::bridge(0x8086, 0x2942));
    p.add(b3, 0, 0, edu());
    // Put 00:1d.0 first in scan order to test the look-ahead.
    let mut d = Box::new(PciDevices::new());
    enumerate(&Ecam::new(&p, 0, 0, 255), &EnumConfig::new(), &mut d);
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(d.bridge_buses(0, 0, 0x1d, 0), Some((3, 3)));
    assert_eq!(d.bridge_buses(0, 1, 0, 0), Some((2, 2)));
    assert_eq!(d.find(0x1234, 0x11e8).count(), 2);

    // With the unconfigured bridge scanned *before* the configured one.
    let mut p = FakePci::new();
    let (_, b3) = p.add_bridge(0, 0x01, 0, FakeFn::bridge(0x8086, 0x2942));
    p.add(b3, 0, 0, edu());
    let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 2));
    p.add(b1, 0, 0, edu());
    let d = scan(&p, &EnumConfig::new());
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(d.bridge_buses(0, 0, 0x01, 0), Some((3, 3)));
    assert_eq!(d.bridge_buses(0, 0, 0x1c, 0), Some((1, 2)));
    assert_eq!(d.find(0x1234, 0x11e8).count(), 2);
}

#[test]
fn root_bars_kept_moved_or_deconflicted() {
    let mut p = FakePci::new();
    p.add(0, 1, 0, edu().at(0, 0xc000_0000)); // inside: kept
    p.add(0, 2, 0, edu().at(0, 0xc000_0000)); // conflicts with 00:01.0: moved
    p.add(0, 3, 0, edu().at(0, 0x1000_0000)); // outside every window: moved
    let mut d = scan(&p, &EnumConfig::new());
    let w = q35_windows();
    let r = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap();
    assert_eq!((r.kept, r.assigned), (1, 2));
    assert_eq!(
        d.get(bdf(0, 1, 0)).unwrap().bars[0].unwrap().base,
        0xc000_0000
    );
    assert_eq!(
        d.get(bdf(0, 1, 0)).unwrap().bars[0].unwrap().state,
        BarState::Kept
    );
    for dev in [2, 3] {
        let b = d.get(bdf(0, dev, 0)).unwrap().bars[0].unwrap();
        assert_eq!(b.state, BarState::Assigned);
        assert!(in_window(&w, WindowKind::Mem32, b.base, b.size));
    }
    check_bars_disjoint(&p, &d);
}

#[test]
fn largest_first_natural_alignment() {
    let mut p = FakePci::new();
    p.add(
        0,
        1,
        0,
        FakeFn::endpoint(1, 1, 0, 0).mem32_bar(0, 0x1000, false),
    );
    p.add(
        0,
        2,
        0,
        FakeFn::endpoint(1, 2, 0, 0).mem32_bar(0, 0x10_0000, false),
    );
    p.add(
        0,
        3,
        0,
        FakeFn::endpoint(1, 3, 0, 0)
            .mem32_bar(0, 0x4000, false)
            .mem32_bar(1, 0x20_0000, true),
    );
    let mut d = scan(&p, &EnumConfig::new());
    // An odd window start forces alignment.
    let w = [Window {
        base: 0x1000_1000,
        size: 0x100_0000,
        kind: WindowKind::Mem32,
    }];
    assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap();
    check_bars_disjoint(&p, &d);
    let base = |dev, i: usize| d.get(bdf(0, dev, 0)).unwrap().bars[i].unwrap().base;
    assert_eq!(base(3, 1), 0x1020_0000, "2 MiB first, 2 MiB-aligned");
    // Then first fit fills the hole below it, each naturally aligned.
    assert_eq!(base(2, 0), 0x1010_0000);
    assert_eq!(base(3, 0), 0x1000_4000);
    assert_eq!(base(1, 0), 0x1000_1000);
}

#[test]
fn no_space_is_a_typed_error_and_others_still_work() {
    let mut p = FakePci::new();
    // A 2 GiB 32-bit BAR cannot fit a 256 MiB window.
    p.add(
        0,
        1,
        0,
        FakeFn::endpoint(0xdead, 0xbeef, 0, 0).mem32_bar(0, 0x8000_0000, false),
    );
    p.add(0, 2, 0, edu());
    let mut d = scan(&p, &EnumConfig::new());
    assert_eq!(d.get(bdf(0, 1, 0)).unwrap().bars[0].unwrap().size, 2 * GIB);
    let w = [Window {
        base: 0xc000_0000,
        size: 0x1000_0000,
        kind: WindowKind::Mem32,
    }];
    let err = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap_err();
    assert_eq!(
        err,
        AssignError::NoSpace {
            bdf: bdf(0, 1, 0),
            resource: Resource::Bar(0),
            size: 2 * GIB
        }
    );
    assert_eq!(
        d.get(bdf(0, 1, 0)).unwrap().bars[0].unwrap().state,
        BarState::Failed
    );
    assert_eq!(p.with(0, 1, 0, |f| f.regs[4]) & 2, 0, "decode stays off");
    let e = d.get(bdf(0, 2, 0)).unwrap().bars[0].unwrap();
    assert_eq!(e.state, BarState::Assigned);
    assert_eq!(p.with(0, 2, 0, |f| f.regs[4]) & 2, 2);

    // Behind a bridge: the bridge window error is reported, the BAR marked failed.
    let mut p = FakePci::new();
    let (_, b) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940));
    p.add(
        b,
        0,
        0,
        FakeFn::endpoint(0xdead, 0xbeef, 0, 0).mem32_bar(0, 0x8000_0000, false),
    );
    let mut d = scan(&p, &EnumConfig::new());
    let err = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap_err();
    assert!(
        matches!(
            err,
            AssignError::NoSpace {
                resource: Resource::MemWindow,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        d.get(bdf(1, 0, 0)).unwrap().bars[0].unwrap().state,
        BarState::Failed
    );
    assert_eq!(p.with(0, 0x1c, 0, hw_mem_window), None);

    // I/O BAR without an I/O window.
    let mut p = FakePci::new();
    p.add(0, 1, 0, FakeFn::endpoint(1, 1, 0, 0).io_bar(0, 0x20));
    let mut d = scan(&p, &EnumConfig::new());
    let err = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w[..]).unwrap_err();
    assert!(matches!(
        err,
        AssignError::NoSpace {
            resource: Resource::Bar(0),
            size: 0x20,
            ..
        }
    ));
}

#[test]
fn bad_windows_are_rejected_untouched() {
    let p = q35(false);
    let mut d = scan(&p, &EnumConfig::new());
    let ecam = Ecam::new(&p, 0, 0, 255);
    let bad = [
        Window {
            base: 0xffff_f000,
            size: 0x2000,
            kind: WindowKind::Mem32,
        },
        Window {
            base: u64::MAX,
            size: 2,
            kind: WindowKind::Mem64,
        },
        Window {
            base: 0x1000,
            size: 0,
            kind: WindowKind::Io,
        },
    ];
    for (i, w) in bad.iter().enumerate() {
        assert_eq!(
            assign_resources(&ecam, &mut d, std::slice::from_ref(w)),
            Err(AssignError::BadWindow { index: 0 }),
            "{i}"
        );
    }
    let many = [q35_windows()[0]; MAX_WINDOWS + 1];
    assert_eq!(
        assign_resources(&ecam, &mut d, &many),
        Err(AssignError::TooManyWindows {
            count: MAX_WINDOWS + 1
        })
    );
    assert!(
        d.functions()
            .iter()
            .flat_map(|f| f.bars())
            .all(|b| b.state == BarState::Unassigned)
    );
}

// ---- hostile configuration spaces ----

#[test]
fn all_ones_everywhere() {
    let ecam = Ecam::new(AllOnes, 0, 0, 255);
    let mut d = Box::new(PciDevices::new());
    enumerate(&ecam, &EnumConfig::new(), &mut d);
    assert_eq!(d.functions().len(), 0);
    assert_eq!(d.error_count(), 0);
    assert_eq!(
        assign_resources(&ecam, &mut d, &q35_windows()),
        Ok(AssignReport::default())
    );
}

#[test]
fn bridge_loops_are_skipped() {
    // A bridge behind the root port whose bus registers are stuck pointing back at bus 0 (it
    // ignores writes), and whose downstream side is wired back to the root bus.
    let mut p = FakePci::new();
    let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 5));
    let mut stuck = FakeFn::bridge(0x1b36, 0x0001).buses(1, 0, 0);
    for r in 0x18..0x1b {
        stuck.wmask[r] = 0;
    }
    let id = p.add(b1, 0, 0, stuck);
    p.downstream.insert(id, 0);
    p.add(0, 3, 0, edu());
    for policy in [BusPolicy::KeepFirmware, BusPolicy::Reassign] {
        let d = scan(
            &p,
            &EnumConfig {
                bus_policy: policy,
                ..EnumConfig::new()
            },
        );
        let e = errors(&d);
        assert!(
            e.iter().any(|e| e.bdf == bdf(1, 0, 0)
                && matches!(
                    e.kind,
                    PciErrorKind::BridgeNotProgrammable {
                        read: [1, 0, 0],
                        ..
                    }
                )),
            "{policy:?} {e:?}"
        );
        assert_eq!(d.get(bdf(1, 0, 0)).unwrap().bridge_buses(), None);
        assert_eq!(d.find(0x1234, 0x11e8).count(), 1);
    }

    // Firmware secondary bus at or below the bridge's own bus.
    for (sec, sub) in [(1u8, 1u8), (0x01, 0x05)] {
        let mut p = FakePci::new();
        let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 5));
        let id = p.add(b1, 0, 0, FakeFn::bridge(0x1b36, 0x0001).buses(1, sec, sub));
        p.downstream.insert(id, b1);
        let d = scan(&p, &EnumConfig::new());
        assert!(
            errors(&d).contains(&PciError {
                bdf: bdf(1, 0, 0),
                kind: PciErrorKind::BadBridgeBuses {
                    secondary: sec,
                    subordinate: sub
                }
            }),
            "{:?}",
            errors(&d)
        );
    }
    // Subordinate below secondary; range beyond the parent's subordinate.
    for (sec, sub) in [(3u8, 2u8), (2, 9)] {
        let mut p = FakePci::new();
        let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 5));
        p.add_bridge(b1, 0, 0, FakeFn::bridge(0x1b36, 0x0001).buses(1, sec, sub));
        let d = scan(&p, &EnumConfig::new());
        assert!(
            matches!(
                errors(&d)[..],
                [PciError {
                    kind: PciErrorKind::BadBridgeBuses { .. },
                    ..
                }]
            ),
            "{:?}",
            errors(&d)
        );
    }
    // Two bridges claiming the same secondary bus.
    let mut p = FakePci::new();
    let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 1));
    p.add(b1, 0, 0, edu());
    p.add_bridge(0, 0x1d, 0, FakeFn::bridge(0x8086, 0x2942).buses(0, 1, 1));
    let d = scan(&p, &EnumConfig::new());
    assert_eq!(
        errors(&d),
        [PciError {
            bdf: bdf(0, 0x1d, 0),
            kind: PciErrorKind::BusRevisited { bus: 1 }
        }]
    );
    assert_eq!(d.find(0x1234, 0x11e8).count(), 1);
}

#[test]
fn bus_numbers_run_out() {
    // Only buses 0..=1 available: the second root port cannot be numbered.
    let mut p = FakePci::new();
    p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940));
    p.add_bridge(0, 0x1d, 0, FakeFn::bridge(0x8086, 0x2942));
    let d = scan(
        &p,
        &EnumConfig {
            max_bus: 1,
            ..EnumConfig::new()
        },
    );
    assert_eq!(d.bridge_buses(0, 0, 0x1c, 0), Some((1, 1)));
    assert_eq!(
        errors(&d),
        [PciError {
            bdf: bdf(0, 0x1d, 0),
            kind: PciErrorKind::BusNumbersExhausted
        }]
    );
}

#[test]
fn hostile_bars() {
    let mut p = FakePci::new();
    let mut f = FakeFn::endpoint(0xbad, 0xbad, 0, 0);
    // BAR0: prefetchable flag but no writable address bit ("4 GiB" to a naive sizer).
    f.set32(0x10, 0x8);
    // BAR1..2: 64-bit with no writable address bit ("2^64").
    f.set32(0x14, 0x4);
    // BAR3: reserved memory type 11b.
    f.set32(0x1c, 0x6);
    f.wmask[0x1f] = 0xff;
    // BAR5: 64-bit in the last slot.
    f.set32(0x24, 0x4);
    f.wmask[0x27] = 0xf0;
    p.add(0, 1, 0, f);
    let mut d = scan(&p, &EnumConfig::new());
    assert!(d.get(bdf(0, 1, 0)).unwrap().bars().next().is_none());
    let kinds: Vec<BarError> = d
        .errors()
        .filter_map(|e| match e.kind {
            PciErrorKind::Bar(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            BarError::NoAddressBits {
                index: 0,
                readback: 0x8
            },
            BarError::NoAddressBits {
                index: 1,
                readback: 0x4
            },
            BarError::ReservedType { index: 3 },
            BarError::Mem64InLastSlot { index: 5 },
        ]
    );
    // Sizing restored the registers.
    assert_eq!(
        p.with(0, 1, 0, |f| (f.get32(0x10), f.get32(0x1c))),
        (0x8, 0x6)
    );
    assert_eq!(
        assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &q35_windows()),
        Ok(AssignReport::default())
    );
}

#[test]
fn bar_sizing_restores_and_disables_decode() {
    let mut p = FakePci::new();
    let mut f = edu()
        .mem64_bar(2, 4 * GIB, true)
        .io_bar(4, 0x100)
        .at(0, 0xfea0_0000)
        .at(2, 0x80_0000_0000)
        .at(4, 0xc100);
    f.regs[4] = 0x7;
    p.add(0, 1, 0, f);
    let d = scan(&p, &EnumConfig::new());
    let f = d.get(bdf(0, 1, 0)).unwrap();
    let b = f.bars[2].unwrap();
    assert_eq!(
        (b.kind, b.prefetchable, b.size, b.base),
        (BarKind::Mem64, true, 4 * GIB, 0x80_0000_0000)
    );
    let io = f.bars[4].unwrap();
    assert_eq!((io.kind, io.size, io.base), (BarKind::Io, 0x100, 0xc100));
    assert_eq!(
        p.with(0, 1, 0, |f| (
            f.regs[4],
            hw_bar(f, 0),
            hw_bar(f, 2),
            hw_bar(f, 4)
        )),
        (0x7, 0xfea0_0000, 0x80_0000_0000, 0xc100)
    );
}

#[test]
fn capability_loops_end_with_errors() {
    let mut p = FakePci::new();
    // PCI list: 0x40 → 0x40.
    let mut f = FakeFn::endpoint(1, 1, 0, 0).cap(0x05, &[0, 0]);
    f.regs[0x41] = 0x40;
    p.add(0, 1, 0, f);
    // PCI list pointing into the header.
    let mut f = FakeFn::endpoint(1, 2, 0, 0).cap(0x05, &[0, 0]);
    f.regs[0x41] = 0x10;
    p.add(0, 2, 0, f);
    // Extended list: 0x100 → 0x104 → 0x100.
    let mut f = FakeFn::endpoint(1, 3, 0, 0)
        .pcie(0)
        .ext_cap(0x000f, &[])
        .ext_cap(0x001b, &[0, 8, 0, 0]);
    let h = f.get32(0x104) | 0x100 << 20;
    f.set32(0x104, h);
    p.add(0, 3, 0, f);
    // Extended pointer into the PCI-compatible space.
    let mut f = FakeFn::endpoint(1, 4, 0, 0).pcie(0).ext_cap(0x0013, &[]);
    let h = f.get32(0x100) | 0x40 << 20;
    f.set32(0x100, h);
    p.add(0, 4, 0, f);
    let d = scan(&p, &EnumConfig::new());
    assert_eq!(
        errors(&d),
        [
            PciError {
                bdf: bdf(0, 1, 0),
                kind: PciErrorKind::Capability(CapError::Loop { offset: 0x40 })
            },
            PciError {
                bdf: bdf(0, 2, 0),
                kind: PciErrorKind::Capability(CapError::BadPointer { offset: 0x10 })
            },
            PciError {
                bdf: bdf(0, 3, 0),
                kind: PciErrorKind::Capability(CapError::ExtLoop { offset: 0x100 })
            },
            PciError {
                bdf: bdf(0, 4, 0),
                kind: PciErrorKind::Capability(CapError::ExtBadPointer { offset: 0x40 })
            },
        ]
    );
    // What was found before the loop is kept.
    assert!(d.get(bdf(0, 1, 0)).unwrap().caps.msi.is_some());
    let c = d.get(bdf(0, 3, 0)).unwrap().caps;
    assert_eq!(
        (c.ats.unwrap().offset, c.pasid.unwrap().max_width),
        (0x100, 8)
    );
}

#[test]
fn same_function_at_every_address_terminates() {
    // A broken host bridge answering every bus/device/function with the same multi-function
    // bridge whose registers are shared: every number written "sticks" everywhere.
    let mut f = FakeFn::bridge(0x1b36, 0x0001)
        .multifunction()
        .pcie(4)
        .cap(0x05, &[0, 0]);
    f.regs[0x41] = 0x40; // and a capability loop for good measure
    let cfg = SameEverywhere {
        f: RefCell::new(f),
        accesses: Default::default(),
    };
    for policy in [BusPolicy::KeepFirmware, BusPolicy::Reassign] {
        let mut d = Box::new(PciDevices::new());
        enumerate(
            &cfg,
            &EnumConfig {
                bus_policy: policy,
                ..EnumConfig::new()
            },
            &mut d,
        );
        assert_eq!(d.functions().len(), MAX_FUNCTIONS);
        assert!(d.error_count() > 0);
        assert!(cfg.accesses.get() < 20_000_000, "{}", cfg.accesses.get());
        let _ = assign_resources(&cfg, &mut d, &q35_windows());
    }
}

#[test]
fn free_list_reserve_release_alloc() {
    // Exercised through assignment with many kept firmware BARs fragmenting one window.
    let mut p = FakePci::new();
    for dev in 0..32u8 {
        let f = FakeFn::endpoint(1, u16::from(dev), 0, 0).mem32_bar(0, 0x1000, false);
        let f = if dev % 2 == 0 {
            f.at(0, 0xc000_0000 + u64::from(dev) * 0x2000)
        } else {
            f
        };
        p.add(0, dev, 0, f);
    }
    let mut d = scan(&p, &EnumConfig::new());
    let w = [Window {
        base: 0xc000_0000,
        size: 0x40000,
        kind: WindowKind::Mem32,
    }];
    let r = assign_resources(&Ecam::new(&p, 0, 0, 255), &mut d, &w).unwrap();
    assert_eq!((r.kept, r.assigned), (16, 16));
    check_bars_disjoint(&p, &d);
    // The holes between kept BARs are used first (first fit).
    assert_eq!(
        d.get(bdf(0, 1, 0)).unwrap().bars[0].unwrap().base,
        0xc000_1000
    );
}

#[test]
fn unconfigured_bridge_inside_firmware_range() {
    // Firmware numbered the root port 1..=5 but not the bridge behind it: that one gets bus 2
    // from inside the root port's range, and its subordinate is fixed to 2.
    let mut p = FakePci::new();
    let (_, b1) = p.add_bridge(0, 0x1c, 0, FakeFn::bridge(0x8086, 0x2940).buses(0, 1, 5));
    let (_, b2) = p.add_bridge(b1, 0, 0, FakeFn::bridge(0x8086, 0x244e));
    p.add(b2, 3, 0, edu());
    let (_, b3) = p.add_bridge(0, 0x1d, 0, FakeFn::bridge(0x8086, 0x2942));
    p.add(b3, 0, 0, edu());
    let d = scan(&p, &EnumConfig::new());
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    assert_eq!(d.bridge_buses(0, 0, 0x1c, 0), Some((1, 5)));
    assert_eq!(d.bridge_buses(0, 1, 0, 0), Some((2, 2)));
    assert_eq!(
        p.with(1, 0, 0, |f| (f.regs[0x18], f.regs[0x19], f.regs[0x1a])),
        (1, 2, 2)
    );
    assert!(d.get(bdf(2, 3, 0)).is_some());
    assert_eq!(
        d.bridge_buses(0, 0, 0x1d, 0),
        Some((6, 6)),
        "above the firmware range"
    );
}

#[test]
fn footprint() {
    std::println!(
        "PciFunction {} B, PciDevices {} B",
        core::mem::size_of::<PciFunction>(),
        core::mem::size_of::<PciDevices>()
    );
    assert!(core::mem::size_of::<PciDevices>() <= 160 * 1024);
}

/// A DMAR with a DRHD whose endpoint scope is the path 00:1c.0 → 00.0 (the device behind the
/// root port), and a catch-all INCLUDE_PCI_ALL DRHD.
fn dmar_with_path() -> Vec<u8> {
    let mut t = vec![0u8; 48];
    t[..4].copy_from_slice(b"DMAR");
    t[8] = 1;
    t[10..16].copy_from_slice(b"HVTEST");
    t[36] = 47; // host address width - 1
    // DRHD 1: flags 0, segment 0, base 0xfed90000, one endpoint scope, path (1c.0)(00.0).
    let mut d = vec![0u8; 16];
    d[0..2].copy_from_slice(&0u16.to_le_bytes());
    d[8..16].copy_from_slice(&0xfed9_0000u64.to_le_bytes());
    d.extend_from_slice(&[1, 10, 0, 0, 0, 0, 0x1c, 0, 0, 0]);
    let len = d.len() as u16;
    d[2..4].copy_from_slice(&len.to_le_bytes());
    t.extend_from_slice(&d);
    // DRHD 2: INCLUDE_PCI_ALL.
    let mut d = vec![0u8; 16];
    d[2..4].copy_from_slice(&16u16.to_le_bytes());
    d[4] = 1;
    d[8..16].copy_from_slice(&0xfed9_1000u64.to_le_bytes());
    t.extend_from_slice(&d);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

#[test]
fn dmar_scope_paths_resolve_through_the_enumeration() {
    use iommu::firmware::dmar::{Dmar, MatchVia, PciTopology};
    let table = dmar_with_path();
    let dmar = Dmar::parse(&table).unwrap();
    // Firmware numbered the root port's bus 7; the path still finds the endpoint there.
    for (fw_bus, policy, bus) in [
        (7u8, BusPolicy::KeepFirmware, 7u8),
        (7, BusPolicy::Reassign, 1),
        (0, BusPolicy::KeepFirmware, 1),
    ] {
        let mut p = FakePci::new();
        let mut rp = FakeFn::bridge(0x8086, 0x2940).pcie(4);
        if fw_bus != 0 {
            rp = rp.buses(0, fw_bus, fw_bus);
        }
        let (_, b) = p.add_bridge(0, 0x1c, 0, rp);
        p.add(b, 0, 0, edu());
        p.add(0, 3, 0, edu());
        let d = scan(
            &p,
            &EnumConfig {
                bus_policy: policy,
                ..EnumConfig::new()
            },
        );
        let topo: &dyn PciTopology = &*d;
        assert_eq!(topo.bridge_buses(0, 0, 0x1c, 0), Some((bus, bus)));
        let m = dmar.unit_for_device(0, bus, 0, 0, topo).unwrap();
        assert_eq!(m.register_base, 0xfed9_0000, "{policy:?}");
        assert_eq!(m.via, MatchVia::Endpoint);
        // Everything else falls to the catch-all unit.
        let m = dmar.unit_for_device(0, 0, 3, 0, topo).unwrap();
        assert_eq!(m.register_base, 0xfed9_1000);
    }
}

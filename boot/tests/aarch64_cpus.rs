//! The CPU list and PSCI CPU_ON as the device tree gives them (SMP bring-up).
//!
//! `data/qemu-virt-smp4.dtb` was dumped by QEMU 10.0.2:
//! `qemu-system-aarch64 -M virt-10.0,virtualization=on,iommu=smmuv3,gic-version=3,dumpdtb=x.dtb
//!  -cpu max -m 256M -smp 4`, then cut to its content (`totalsize` = the end of the strings
//! block, 8416 bytes) instead of QEMU's 1 MiB padding. QEMU (hw/arm/virt.c) writes
//! `/cpus/cpu@N` with `reg = <N>` (one address cell), `enable-method = "psci"`, and a `/psci`
//! node with `compatible = "arm,psci-1.0", "arm,psci-0.2", "arm,psci"`, `method = "smc"` (EL2 is
//! present) and `cpu_on = <0xc4000003>`.

use boot::aarch64::dtb::{
    Conduit, CpuList, CpuListError, DeviceTree, PSCI_CPU_ON_64, PsciCpuOn, PsciCpuOnError,
};

const SMP4: &[u8] = include_bytes!("data/qemu-virt-smp4.dtb");
const UP: &[u8] = include_bytes!("data/qemu-virt.dtb");

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// Offset and length of the value of property `prop` in the node named `node` (full name with
/// unit address), found by walking the structure block (DTSpec §5.4) independently of `fdt`.
fn prop_value(blob: &[u8], node: &str, prop: &str) -> (usize, usize) {
    let off_struct = be32(blob, 8) as usize;
    let off_strings = be32(blob, 12) as usize;
    let mut pos = off_struct;
    let mut path: Vec<String> = Vec::new();
    loop {
        let token = be32(blob, pos);
        pos += 4;
        match token {
            1 => {
                let end = blob[pos..].iter().position(|&b| b == 0).unwrap();
                path.push(String::from_utf8(blob[pos..pos + end].to_vec()).unwrap());
                pos = (pos + end + 1 + 3) & !3;
            }
            2 => {
                path.pop();
            }
            3 => {
                let len = be32(blob, pos) as usize;
                let nameoff = be32(blob, pos + 4) as usize;
                let name_start = off_strings + nameoff;
                let name_end =
                    name_start + blob[name_start..].iter().position(|&b| b == 0).unwrap();
                let name = std::str::from_utf8(&blob[name_start..name_end]).unwrap();
                if path.last().map(String::as_str) == Some(node) && name == prop {
                    return (pos + 8, len);
                }
                pos = (pos + 8 + len + 3) & !3;
            }
            4 => {}
            9 => panic!("{node}/{prop} not found"),
            t => panic!("bad token {t}"),
        }
    }
}

fn patched(node: &str, prop: &str, value: &[u8]) -> Vec<u8> {
    let mut blob = SMP4.to_vec();
    let (off, len) = prop_value(&blob, node, prop);
    assert_eq!(len, value.len(), "patch keeps the length");
    blob[off..off + len].copy_from_slice(value);
    blob
}

fn cpus(blob: &[u8], n: usize) -> (Result<CpuList, CpuListError>, Vec<u64>) {
    let dt = DeviceTree::new(blob).expect("valid DTB");
    let mut out = vec![u64::MAX; n];
    let r = dt.cpus(&mut out);
    let count = r.map_or(0, |l| l.count);
    out.truncate(count);
    (r, out)
}

#[test]
fn qemu_smp4_lists_four_psci_cpus() {
    let (r, list) = cpus(SMP4, 16);
    assert_eq!(
        r,
        Ok(CpuList {
            count: 4,
            dropped: 0,
            disabled: 0,
            not_psci: 0
        })
    );
    assert_eq!(list, [0, 1, 2, 3]);
    let dt = DeviceTree::new(SMP4).unwrap();
    assert_eq!(
        dt.psci_cpu_on(),
        Ok(PsciCpuOn {
            conduit: Conduit::Smc,
            function_id: 0xc400_0003
        })
    );
}

#[test]
fn qemu_uniprocessor_lists_cpu_zero() {
    let (r, list) = cpus(UP, 16);
    assert_eq!(r.map(|l| l.count), Ok(1));
    assert_eq!(list, [0]);
}

#[test]
fn more_cpus_than_room_are_counted() {
    let (r, list) = cpus(SMP4, 3);
    assert_eq!(
        r,
        Ok(CpuList {
            count: 3,
            dropped: 1,
            disabled: 0,
            not_psci: 0
        })
    );
    assert_eq!(list, [0, 1, 2]);
}

#[test]
fn non_cpu_node_is_skipped() {
    // QEMU's cpu nodes have no `status` to patch in place; a `device_type` other than "cpu"
    // (like the `cpu-map` node beside them, which has none) is not a CPU.
    let blob = patched("cpu@2", "device_type", b"cpX\0");
    let (r, list) = cpus(&blob, 16);
    assert_eq!(r.map(|l| l.count), Ok(3));
    assert_eq!(list, [0, 1, 3]);
}

#[test]
fn spin_table_cpu_is_skipped() {
    let blob = patched("cpu@3", "enable-method", b"spin\0");
    let (r, list) = cpus(&blob, 16);
    assert_eq!(
        r,
        Ok(CpuList {
            count: 3,
            dropped: 0,
            disabled: 0,
            not_psci: 1
        })
    );
    assert_eq!(list, [0, 1, 2]);
}

#[test]
fn bad_reg_and_cells_are_refused() {
    // An MPIDR with bits outside the affinity fields (bit 24 is MT, not affinity).
    let blob = patched("cpu@1", "reg", &0x0100_0001u32.to_be_bytes());
    assert_eq!(cpus(&blob, 16).0, Err(CpuListError::BadReg));
    let blob = patched("cpus", "#address-cells", &3u32.to_be_bytes());
    assert_eq!(cpus(&blob, 16).0, Err(CpuListError::BadAddressCells(3)));
    let blob = patched("cpu@1", "reg", &2u32.to_be_bytes());
    assert_eq!(cpus(&blob, 16).0, Err(CpuListError::Duplicate { mpidr: 2 }));
    // Aff1 = 1, Aff0 = 0 is a valid affinity (a second cluster).
    let blob = patched("cpu@1", "reg", &0x100u32.to_be_bytes());
    assert_eq!(cpus(&blob, 16).1, [0, 0x100, 2, 3]);
}

#[test]
fn psci_method_and_function_id() {
    let blob = patched("psci", "method", b"hvc\0");
    let dt = DeviceTree::new(&blob).unwrap();
    assert_eq!(dt.psci_cpu_on().map(|p| p.conduit), Ok(Conduit::Hvc));
    let blob = patched("psci", "method", b"xyz\0");
    let dt = DeviceTree::new(&blob).unwrap();
    assert_eq!(dt.psci_cpu_on(), Err(PsciCpuOnError::UnknownMethod));
    // A cpu_on property overrides the standard ID.
    let blob = patched("psci", "cpu_on", &0x8400_0003u32.to_be_bytes());
    let dt = DeviceTree::new(&blob).unwrap();
    assert_eq!(dt.psci_cpu_on().map(|p| p.function_id), Ok(0x8400_0003));
}

#[test]
fn psci_0_1_needs_cpu_on() {
    // compatible = "arm,psci-1.0\0arm,psci-0.2\0arm,psci\0": make the first two unknown, leaving
    // a PSCI 0.1 node, and rename its cpu_on property's string (shared strings block).
    let (off, len) = prop_value(SMP4, "psci", "compatible");
    let mut blob = SMP4.to_vec();
    let value = b"arm,psci-1.X\0arm,psci-0.X\0arm,psci\0";
    assert_eq!(len, value.len());
    blob[off..off + len].copy_from_slice(value);
    let dt = DeviceTree::new(&blob).unwrap();
    assert_eq!(dt.psci_cpu_on().map(|p| p.function_id), Ok(0xc400_0003));
    let strings = be32(&blob, 12) as usize;
    let at = strings
        + blob[strings..]
            .windows(7)
            .position(|w| w == b"cpu_on\0")
            .unwrap();
    blob[at..at + 6].copy_from_slice(b"cpu_no");
    let dt = DeviceTree::new(&blob).unwrap();
    assert_eq!(dt.psci_cpu_on(), Err(PsciCpuOnError::NoCpuOnId));
    assert_eq!(PSCI_CPU_ON_64, 0xc400_0003);
}

#[test]
fn malformed_cpu_on_is_refused() {
    let mut blob = SMP4.to_vec();
    let (off, _) = prop_value(&blob, "psci", "cpu_on");
    // Shrink the property's length field to 2: no longer one cell.
    blob[off - 8..off - 4].copy_from_slice(&2u32.to_be_bytes());
    let dt = DeviceTree::new(&blob).unwrap();
    assert_eq!(dt.psci_cpu_on(), Err(PsciCpuOnError::BadCpuOnProperty));
}

/// The MADT path: QEMU virt's `-smp 4` GICC entries (hw/arm/virt-acpi-build.c: MPIDR =
/// Aff0 = CPU number, flags Enabled) and hand-made variations.
#[test]
fn acpi_gicc_selection() {
    use boot::aarch64::dtb::acpi_cpus;
    let mut out = [u64::MAX; 16];
    let qemu = [(0, true), (1, true), (2, true), (3, true)];
    let l = acpi_cpus(qemu, &mut out);
    assert_eq!((l.count, l.dropped, l.disabled), (4, 0, 0));
    assert_eq!(out[..4], [0, 1, 2, 3]);
    // Disabled (not enabled, e.g. only Online Capable) and repeated entries are not started;
    // bits outside the affinity fields are dropped.
    let mixed = [
        (0x8000_0000, true),
        (0x1, false),
        (0x1_0000_0102, true),
        (0x102, true),
        (0x0, true),
    ];
    let l = acpi_cpus(mixed, &mut out);
    assert_eq!((l.count, l.dropped, l.disabled), (3, 0, 2));
    // Aff3 = 1 (bits 39:32) is a different CPU from Aff3 = 0 with the same Aff1/Aff0.
    assert_eq!(out[..3], [0, 0x1_0000_0102, 0x102]);
    // More than fit.
    let many = (0..20u64).map(|i| (i, true));
    let mut small = [0u64; 16];
    let l = acpi_cpus(many, &mut small);
    assert_eq!((l.count, l.dropped), (16, 4));
    assert_eq!(small[15], 15);
}

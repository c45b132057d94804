//! `boot::x86_64::madt` on MADTs dumped from QEMU 10.0.2 (q35, SeaBIOS), read from guest memory
//! through the QEMU monitor's `xp` after the firmware built them (`qemu-system-x86_64 -M q35
//! -cpu max -m 256M -smp ... -kernel hypervisor -monitor unix:SOCK,server,nowait`, then RSDP ->
//! RSDT -> "APIC" with `xp /Nxb ADDR`; length and checksum verified):
//! - `qemu-q35-smp4-madt.bin`: `-smp 4`: four Local APIC structures (IDs 0-3, flags 1), the
//!   I/O APIC, five interrupt source overrides, a local APIC NMI;
//! - `qemu-q35-smp2-max4-madt.bin`: `-smp 2,maxcpus=4`: IDs 2 and 3 are listed with flags 0
//!   (not enabled, not online capable: QEMU's hot-pluggable CPUs are found through ACPI
//!   methods, not this bit).

use boot::x86_64::madt::local_apics;

const SMP4: &[u8] = include_bytes!("data/qemu-q35-smp4-madt.bin");
const SMP2_MAX4: &[u8] = include_bytes!("data/qemu-q35-smp2-max4-madt.bin");

#[test]
fn qemu_smp4_lists_four_enabled_cpus() {
    let cpus = local_apics::<16>(SMP4).unwrap();
    assert_eq!(cpus.ids(), &[0, 1, 2, 3]);
    assert_eq!(
        (cpus.enabled(), cpus.dropped, cpus.hotplug, cpus.skipped),
        (4, 0, 0, 0)
    );
}

#[test]
fn qemu_maxcpus_lists_only_present_cpus() {
    let cpus = local_apics::<16>(SMP2_MAX4).unwrap();
    assert_eq!(cpus.ids(), &[0, 1]);
    assert_eq!((cpus.enabled(), cpus.hotplug), (2, 0));
}

#[test]
fn cap_below_the_table() {
    let cpus = local_apics::<3>(SMP4).unwrap();
    assert_eq!(cpus.ids(), &[0, 1, 2]);
    assert_eq!((cpus.enabled(), cpus.dropped), (4, 1));
}

#[test]
fn a_flipped_byte_is_refused() {
    let mut t = SMP4.to_vec();
    t[0x2e] ^= 1; // first Local APIC structure's APIC ID: the checksum no longer holds
    assert!(local_apics::<16>(&t).is_err());
}

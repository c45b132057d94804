//! The x86 CPUs the ACPI MADT ("APIC", ACPI 6.5 §5.2.12) lists: one Processor Local APIC or
//! Processor Local x2APIC structure per logical processor. Safe code over the table bytes;
//! host-tested. What the secondary-CPU bring-up starts comes from here.
//!
//! ```text
//! MADT        36-byte SDT header, +36 u32 local APIC address, +40 u32 flags, +44 structures:
//!             u8 type, u8 length, ...
//! Local APIC  type 0, length 8 (§5.2.12.2): +2 u8 ACPI processor UID, +3 u8 APIC ID,
//!             +4 u32 flags (Table 5.23: bit 0 Enabled, bit 1 Online Capable)
//! x2APIC      type 9, length 16 (§5.2.12.12): +4 u32 x2APIC ID, +8 u32 flags (as above),
//!             +12 u32 ACPI processor UID
//! ```
//!
//! Enabled processors can be started now. A processor with Enabled = 0 and Online Capable = 1 is
//! one firmware says may be *hot-added* later (§5.2.12.2, Table 5.23): it is counted but not
//! listed, because starting a socket that is not there only costs a timeout. Firmware lists APIC
//! IDs below 255 as type 0 and the others as type 9 (§5.2.12.12), some list a CPU in both forms:
//! an ID is listed once. IDs 0xFF (type 0) and 0xFFFF_FFFF (type 9) are placeholders some
//! firmware uses for absent sockets; they are skipped.

/// Offset of the first interrupt controller structure: the 36-byte header, then two u32s.
const MADT_ENTRIES: usize = 36 + 8;
const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_LOCAL_X2APIC: u8 = 9;
const FLAG_ENABLED: u32 = 1 << 0;
const FLAG_ONLINE_CAPABLE: u32 = 1 << 1;

/// The MADT's enabled local APICs, in table order, at most `N` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalApics<const N: usize> {
    ids: [u32; N],
    len: usize,
    /// Enabled processors that did not fit in `N`.
    pub dropped: usize,
    /// Processors marked Online Capable but not Enabled (hot-pluggable, not started).
    pub hotplug: usize,
    /// Structures with a placeholder ID (0xFF / 0xFFFF_FFFF) or listing an ID a second time.
    pub skipped: usize,
}

impl<const N: usize> LocalApics<N> {
    /// The APIC IDs listed, in table order.
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }

    /// Enabled processors the table lists (including those beyond `N`).
    pub fn enabled(&self) -> usize {
        self.len + self.dropped
    }

    fn push(&mut self, id: u32) {
        if self.ids().contains(&id) {
            self.skipped += 1;
        } else if self.len < N {
            self.ids[self.len] = id;
            self.len += 1;
        } else {
            self.dropped += 1;
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// Extracts the local APICs from a whole MADT (header included). Refuses a table whose
/// signature, length or checksum is wrong, or whose structures run past its end: a malformed
/// table starts no CPU.
pub fn local_apics<const N: usize>(table: &[u8]) -> Result<LocalApics<N>, &'static str> {
    if table.len() < MADT_ENTRIES || &table[..4] != b"APIC" {
        return Err("not an MADT (signature or length)");
    }
    let len = u32_at(table, 4).ok_or("MADT header truncated")? as usize;
    if len < MADT_ENTRIES || len > table.len() {
        return Err("MADT length field out of range");
    }
    let table = &table[..len];
    if table.iter().fold(0u8, |a, &b| a.wrapping_add(b)) != 0 {
        return Err("MADT checksum mismatch");
    }
    let mut cpus = LocalApics {
        ids: [0; N],
        len: 0,
        dropped: 0,
        hotplug: 0,
        skipped: 0,
    };
    let mut off = MADT_ENTRIES;
    while off < table.len() {
        let (Some(&ty), Some(&entry_len)) = (table.get(off), table.get(off + 1)) else {
            return Err("MADT structure header runs past the table");
        };
        let entry_len = usize::from(entry_len);
        if entry_len < 2 || off + entry_len > table.len() {
            return Err("MADT structure length below 2 or past the table");
        }
        let entry = &table[off..off + entry_len];
        let (id, flags) = match ty {
            TYPE_LOCAL_APIC => {
                if entry_len < 8 {
                    return Err("Local APIC structure shorter than 8 bytes");
                }
                let id = u32::from(entry[3]);
                (if id == 0xff { None } else { Some(id) }, u32_at(entry, 4))
            }
            TYPE_LOCAL_X2APIC => {
                if entry_len < 16 {
                    return Err("Local x2APIC structure shorter than 16 bytes");
                }
                let id = u32_at(entry, 4).filter(|&id| id != u32::MAX);
                (id, u32_at(entry, 8))
            }
            _ => {
                off += entry_len;
                continue;
            }
        };
        let flags = flags.unwrap_or(0);
        match id {
            _ if flags & FLAG_ENABLED == 0 => {
                if flags & FLAG_ONLINE_CAPABLE != 0 {
                    cpus.hotplug += 1;
                }
            }
            Some(id) => cpus.push(id),
            None => cpus.skipped += 1,
        }
        off += entry_len;
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// A MADT built from the ACPI 6.5 layouts above, with a valid length and checksum.
    fn madt(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut t = std::vec![0u8; MADT_ENTRIES];
        t[..4].copy_from_slice(b"APIC");
        t[8] = 5; // revision
        t[36..40].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        t[40] = 1; // PCAT_COMPAT
        for e in entries {
            t.extend_from_slice(e);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    fn lapic(uid: u8, id: u8, flags: u32) -> Vec<u8> {
        let mut e = std::vec![TYPE_LOCAL_APIC, 8, uid, id];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    }

    fn x2apic(id: u32, flags: u32, uid: u32) -> Vec<u8> {
        let mut e = std::vec![TYPE_LOCAL_X2APIC, 16, 0, 0];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&uid.to_le_bytes());
        e
    }

    fn ioapic() -> Vec<u8> {
        // I/O APIC (type 1, length 12, §5.2.12.3): id 0, base 0xfec00000, GSI base 0.
        let mut e = std::vec![1, 12, 0, 0];
        e.extend_from_slice(&0xfec0_0000u32.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e
    }

    /// QEMU q35 with -smp 4 (hw/i386/acpi-common.c): four type-0 entries (UID = APIC ID = 0..3,
    /// flags 1), then the I/O APIC and interrupt source overrides.
    #[test]
    fn qemu_style_four_cpus() {
        let t = madt(&[
            lapic(0, 0, 1),
            lapic(1, 1, 1),
            lapic(2, 2, 1),
            lapic(3, 3, 1),
            ioapic(),
            std::vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0], // ISO: IRQ0 -> GSI 2
        ]);
        let cpus = local_apics::<16>(&t).unwrap();
        assert_eq!(cpus.ids(), &[0, 1, 2, 3]);
        assert_eq!((cpus.enabled(), cpus.dropped, cpus.hotplug), (4, 0, 0));
    }

    #[test]
    fn x2apic_entries_disabled_hotplug_and_duplicates() {
        let t = madt(&[
            lapic(0, 0, 1),
            lapic(1, 2, 0),                   // disabled, not online capable: ignored
            lapic(2, 4, FLAG_ONLINE_CAPABLE), // hot-pluggable
            lapic(3, 0xff, 1),                // placeholder
            x2apic(0, 1, 0),                  // same CPU as the first entry
            x2apic(300, 1, 5),
            x2apic(u32::MAX, 1, 6),
        ]);
        let cpus = local_apics::<16>(&t).unwrap();
        assert_eq!(cpus.ids(), &[0, 300]);
        assert_eq!(cpus.hotplug, 1);
        assert_eq!(cpus.skipped, 3);
    }

    #[test]
    fn cap_counts_the_rest() {
        let entries: Vec<Vec<u8>> = (0..20).map(|i| lapic(i, i * 2, 1)).collect();
        let cpus = local_apics::<16>(&madt(&entries)).unwrap();
        assert_eq!(cpus.ids().len(), 16);
        assert_eq!(cpus.ids()[15], 30);
        assert_eq!((cpus.dropped, cpus.enabled()), (4, 20));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let good = madt(&[lapic(0, 0, 1), lapic(1, 1, 1)]);
        assert!(local_apics::<16>(&good).is_ok());
        let mut bad_sum = good.clone();
        bad_sum[MADT_ENTRIES + 3] ^= 1;
        assert!(local_apics::<16>(&bad_sum).is_err());
        let mut bad_sig = good.clone();
        bad_sig[0] = b'X';
        assert!(local_apics::<16>(&bad_sig).is_err());
        assert!(local_apics::<16>(&good[..good.len() - 1]).is_err());
        // A structure whose length runs past the table, or is 0 (would loop forever).
        for l in [0u8, 1, 9, 200] {
            let mut e = lapic(1, 1, 1);
            e[1] = l;
            let t = madt(&[lapic(0, 0, 1), e]);
            assert!(local_apics::<16>(&t).is_err(), "length {l}");
        }
        // Short local APIC / x2APIC structures.
        let t = madt(&[std::vec![TYPE_LOCAL_APIC, 4, 0, 0]]);
        assert!(local_apics::<16>(&t).is_err());
        let t = madt(&[std::vec![TYPE_LOCAL_X2APIC, 8, 0, 0, 1, 0, 0, 0]]);
        assert!(local_apics::<16>(&t).is_err());
    }

    /// Every truncation and single-byte corruption of a valid table is either refused or
    /// parsed into at most the CPUs the table can hold: never a panic.
    #[test]
    fn no_panic_on_corruption() {
        let good = madt(&[lapic(0, 0, 1), x2apic(7, 1, 1), ioapic()]);
        for cut in 0..good.len() {
            let _ = local_apics::<4>(&good[..cut]);
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut t = good.clone();
                t[i] = v;
                if let Ok(c) = local_apics::<4>(&t) {
                    assert!(c.ids().len() <= 4);
                }
            }
        }
    }
}

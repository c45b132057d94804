//! Arbitrary bytes into the DMAR parser. If a table parses, everything a consumer can do with
//! it (iterate, resolve scopes, match devices, dump) must also succeed without panicking.
#![no_main]

use core::fmt::{self, Write};

use iommu::firmware::dmar::{Dmar, NoBridges, PciTopology, RemappingStructure};
use libfuzzer_sys::fuzz_target;

/// Bridges whose bus numbers come from the input too, so path walks take fuzzed turns:
/// device `d` on bus `b` is a bridge iff its entry byte is non-zero, with secondary `b + 1`.
struct FuzzTopology<'a>(&'a [u8]);

impl PciTopology for FuzzTopology<'_> {
    fn bridge_buses(&self, _segment: u16, bus: u8, device: u8, function: u8) -> Option<(u8, u8)> {
        let key = usize::from(bus) ^ (usize::from(device) << 3) ^ usize::from(function);
        let span = *self.0.get(key % self.0.len().max(1))?;
        if span == 0 {
            return None;
        }
        let secondary = bus.checked_add(1)?;
        Some((secondary, secondary.saturating_add(span % 8)))
    }
}

/// Discards output; the dump is exercised for panics, not content.
struct Sink(usize);

impl Write for Sink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.wrapping_add(s.len());
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    // Random mutations almost never keep the checksum right, which would stop nearly every
    // input at the header; a repaired copy lets the structure walk see them too.
    if data.len() >= 10 {
        let mut fixed = data.to_vec();
        let len = u32::try_from(fixed.len()).unwrap_or(u32::MAX);
        fixed[4..8].copy_from_slice(&len.to_le_bytes());
        fixed[9] = 0;
        let sum = fixed.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        fixed[9] = 0u8.wrapping_sub(sum);
        exercise(&fixed);
    }
});

fn exercise(data: &[u8]) {
    let Ok(dmar) = Dmar::parse(data) else {
        return;
    };
    let topo = FuzzTopology(data);
    for s in dmar.structures() {
        let _ = (s.offset(), s.length(), s.type_code());
        if let RemappingStructure::Andd(a) = &s {
            let _ = a.object_name();
        }
        if let RemappingStructure::Rmrr(r) = &s {
            let _ = (r.size(), r.is_well_formed());
        }
        let segment = match &s {
            RemappingStructure::Drhd(d) => d.segment(),
            _ => 0,
        };
        for scope in s.scopes().into_iter().flatten() {
            let _ = scope.path().count();
            let _ = scope.resolve(segment, &NoBridges);
            if let Ok(r) = scope.resolve(segment, &topo) {
                let _ = r.source_id();
                let _ = dmar.unit_for_device(r.segment, r.bus, r.device, r.function, &topo);
                let _ = dmar
                    .rmrrs_for_device(r.segment, r.bus, r.device, r.function, &topo)
                    .count();
            }
            let _ = dmar.unit_for_enumeration_id(scope.scope_type(), scope.enumeration_id());
        }
    }
    let mut sink = Sink(0);
    let _ = dmar.dump(&mut sink);
    let _ = dmar.dump_with_topology(&mut sink, Some(&topo));
}

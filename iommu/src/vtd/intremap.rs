//! Interrupt remapping (VT-d 4.1 chapter 5, §9.10): the interrupt remapping table entry (IRTE),
//! the table's size and its address register (IRTA, §11.4.29), source-ID validation
//! (SVT/SQ/SID), remappable-format MSI addresses (§5.1.5.2), and an allocator of table entries
//! that needs no heap.
//!
//! With GSTS.IRES set every interrupt request a device writes to 0xFEEx_xxxx is checked by the
//! unit: a remappable-format request (address bit 4 set) names an IRTE by its handle; the IRTE
//! must be present, its source-ID check must accept the requester ID the request carried, and
//! only then is the interrupt delivered with the IRTE's vector and destination. A
//! compatibility-format request (bit 4 clear, the vector in the data word) is blocked with fault
//! reason 0x25 unless GSTS.CFIS is set; the hypervisor never sets CFI, so a device that writes
//! a forged compatibility MSI only leaves a fault record.

use super::VtdError;
use super::mem::VtdMemory;
use super::regs::{GlobalCommand, GlobalStatus, offset};
use super::unit::VtdUnit;
use crate::hw::Mmio;

/// IRTE bits 63:0 (§9.10, remapped-interrupt format, IM = 0).
mod lo {
    /// P, bit 0: present.
    pub const PRESENT: u64 = 1 << 0;
    /// FPD, bit 1: fault processing disable.
    pub const FPD: u64 = 1 << 1;
    /// DM, bit 2: destination mode (0 physical, 1 logical).
    pub const DM: u64 = 1 << 2;
    /// RH, bit 3: redirection hint.
    pub const RH: u64 = 1 << 3;
    /// TM, bit 4: trigger mode (0 edge, 1 level).
    pub const TM: u64 = 1 << 4;
    /// DLM, bits 7:5: delivery mode.
    pub const DLM_SHIFT: u32 = 5;
    /// IM, bit 15: IRTE mode (0 remapped, 1 posted).
    pub const IM: u64 = 1 << 15;
    /// V, bits 23:16: vector.
    pub const VECTOR_SHIFT: u32 = 16;
    /// DST, bits 63:32: destination ID.
    pub const DST_SHIFT: u32 = 32;
    /// Bits that must be zero in a remapped IRTE: 14:12 and 31:24 (AVAIL 11:8 is software's).
    pub const RESERVED: u64 = 0x7 << 12 | 0xff << 24;
}

/// IRTE bits 127:64.
mod hi {
    /// SID, bits 79:64.
    pub const SID_MASK: u64 = 0xffff;
    /// SQ, bits 81:80.
    pub const SQ_SHIFT: u32 = 16;
    /// SVT, bits 83:82.
    pub const SVT_SHIFT: u32 = 18;
    /// Bits 127:84 are reserved.
    pub const RESERVED: u64 = !0 << 20;
}

/// How the unit checks the requester ID of an interrupt request against the IRTE (SVT, SQ and
/// SID, §9.10 Table 9-37).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceValidation {
    /// SVT = 00b: any requester may use the entry. Never used for a device's entry.
    None,
    /// SVT = 01b: the requester ID must equal `sid` in the bits `sq` compares: SQ = 00b all 16
    /// bits, 01b ignores bit 2, 10b bits 2:1, 11b bits 2:0 (the function number).
    RequesterId { sid: u16, sq: u8 },
    /// SVT = 10b: the requester's bus number must lie in `[start_bus, end_bus]` (SID 15:8 is
    /// the start bus, SID 7:0 the end bus).
    BusRange { start_bus: u8, end_bus: u8 },
}

impl SourceValidation {
    /// The check for a device whose DMA carries `ids`: its own requester ID first, then its
    /// DMA aliases (discovery's list, `ids[0]` being the device's own).
    ///
    /// - No alias: SVT = 01b, SQ = 00b, SID = the device's requester ID: only the device itself
    ///   can use its entries.
    /// - With aliases (the device sits behind a PCIe-to-PCI/PCI-X bridge, which may forward the
    ///   device's own ID or replace it with (secondary bus, 00.0), PCIe-to-PCI bridge spec
    ///   §2.3): SVT = 10b over the buses from the lowest such (bus, 00.0) alias down to the
    ///   device's own bus (its own bus alone if there is none). An exact SID check on either
    ///   form would reject the other, and every requester the range admits sits behind the
    ///   same bridge, where the IOMMU cannot tell devices apart for DMA either: one IOMMU group.
    ///   A bridge's *own* ID in the list (a conventional bridge may tag forwarded requests with
    ///   it) lies on the bridge's upstream bus, which holds other groups' devices; it is left out
    ///   of the range, so such a request is blocked with a fault rather than admitting that bus.
    pub fn for_device(ids: &[u16]) -> Option<Self> {
        let (&own, aliases) = ids.split_first()?;
        if aliases.iter().all(|&a| a == own) {
            return Some(SourceValidation::RequesterId { sid: own, sq: 0 });
        }
        let own_bus = (own >> 8) as u8;
        let start_bus = aliases
            .iter()
            .filter(|&&a| a & 0xff == 0 && (a >> 8) as u8 <= own_bus)
            .map(|&a| (a >> 8) as u8)
            .min()
            .unwrap_or(own_bus);
        Some(SourceValidation::BusRange {
            start_bus,
            end_bus: own_bus,
        })
    }

    /// Whether a request carrying requester ID `rid` passes this check (what the unit does,
    /// for host tests and the documentation).
    pub fn accepts(self, rid: u16) -> bool {
        match self {
            SourceValidation::None => true,
            SourceValidation::RequesterId { sid, sq } => {
                let ignore: u16 = match sq & 3 {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                rid & !ignore == sid & !ignore
            }
            SourceValidation::BusRange { start_bus, end_bus } => {
                (start_bus..=end_bus).contains(&((rid >> 8) as u8))
            }
        }
    }

    fn encode(self) -> u64 {
        match self {
            SourceValidation::None => 0,
            SourceValidation::RequesterId { sid, sq } => {
                1 << hi::SVT_SHIFT | u64::from(sq & 3) << hi::SQ_SHIFT | u64::from(sid)
            }
            SourceValidation::BusRange { start_bus, end_bus } => {
                2 << hi::SVT_SHIFT | u64::from(start_bus) << 8 | u64::from(end_bus)
            }
        }
    }

    fn decode(h: u64) -> Result<Self, IrteError> {
        let sid = (h & hi::SID_MASK) as u16;
        let sq = ((h >> hi::SQ_SHIFT) & 3) as u8;
        match (h >> hi::SVT_SHIFT) & 3 {
            0 => Ok(SourceValidation::None),
            1 => Ok(SourceValidation::RequesterId { sid, sq }),
            2 => Ok(SourceValidation::BusRange {
                start_bus: (sid >> 8) as u8,
                end_bus: sid as u8,
            }),
            _ => Err(IrteError::ReservedSvt),
        }
    }
}

/// Destination format: with EIM (IRTA.EIME = 1) DST holds a 32-bit x2APIC ID; without it,
/// an 8-bit xAPIC ID in DST bits 15:8 (IRTE bits 47:40), the rest zero (§9.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationFormat {
    Xapic,
    X2apic,
}

/// A remapped-format IRTE: fixed delivery, edge-triggered, physical destination, no
/// redirection hint (the hypervisor targets one CPU per interrupt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Irte {
    pub vector: u8,
    /// The destination APIC ID.
    pub destination: u32,
    pub source: SourceValidation,
    /// FPD: when set, faults on this entry are not recorded.
    pub fault_processing_disabled: bool,
}

/// Why an IRTE could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrteError {
    /// Vectors 0-15 are reserved for exceptions; an interrupt there is an error (SDM §6.2).
    Vector(u8),
    /// A destination above 255 without EIM.
    Destination(u32),
    NotPresent,
    /// IM = 1: a posted-interrupt entry, which the hypervisor does not write.
    Posted,
    /// A reserved bit is set, or a mode this driver never writes (logical destination,
    /// redirection hint, level trigger, a delivery mode other than fixed).
    Reserved,
    ReservedSvt,
}

impl Irte {
    /// The 128-bit entry, `(bits 63:0, bits 127:64)`.
    pub fn encode(&self, format: DestinationFormat) -> Result<(u64, u64), IrteError> {
        if self.vector < 16 {
            return Err(IrteError::Vector(self.vector));
        }
        let dst = match format {
            DestinationFormat::X2apic => u64::from(self.destination),
            DestinationFormat::Xapic if self.destination <= 0xff => {
                u64::from(self.destination) << 8
            }
            DestinationFormat::Xapic => return Err(IrteError::Destination(self.destination)),
        };
        let mut l = lo::PRESENT | u64::from(self.vector) << lo::VECTOR_SHIFT | dst << lo::DST_SHIFT;
        if self.fault_processing_disabled {
            l |= lo::FPD;
        }
        Ok((l, self.source.encode()))
    }

    /// Reads an entry back (what the unit will use), refusing what the driver never writes.
    pub fn decode(l: u64, h: u64, format: DestinationFormat) -> Result<Self, IrteError> {
        if l & lo::PRESENT == 0 {
            return Err(IrteError::NotPresent);
        }
        if l & lo::IM != 0 {
            return Err(IrteError::Posted);
        }
        let modes = lo::DM | lo::RH | lo::TM | 0x7 << lo::DLM_SHIFT;
        if l & (lo::RESERVED | modes) != 0 || h & hi::RESERVED != 0 {
            return Err(IrteError::Reserved);
        }
        let dst = (l >> lo::DST_SHIFT) as u32;
        let destination = match format {
            DestinationFormat::X2apic => dst,
            DestinationFormat::Xapic if dst & !0xff00 == 0 => dst >> 8,
            DestinationFormat::Xapic => return Err(IrteError::Reserved),
        };
        Ok(Irte {
            vector: (l >> lo::VECTOR_SHIFT) as u8,
            destination,
            source: SourceValidation::decode(h)?,
            fault_processing_disabled: l & lo::FPD != 0,
        })
    }
}

/// Number of entries of a table whose IRTA.S field is `s`: 2^(S+1) (§11.4.29).
pub const fn table_entries(s: u8) -> u32 {
    1 << ((s & 0xf) + 1)
}

/// The IRTA.S value for a table of `entries` entries (a power of two from 2 to 65536).
pub const fn size_field(entries: u32) -> Option<u8> {
    if entries < 2 || entries > 65536 || !entries.is_power_of_two() {
        return None;
    }
    Some((entries.trailing_zeros() - 1) as u8)
}

/// IRTA_REG (§11.4.29): IRTA bits 63:12 (the table, 4 KiB aligned), EIME bit 11, S bits 3:0.
pub fn irta_value(table: u64, entries: u32, eim: bool) -> Option<u64> {
    if table & 0xfff != 0 {
        return None;
    }
    Some(table | u64::from(eim) << 11 | u64::from(size_field(entries)?))
}

/// The remappable-format MSI that names IRTE `handle` (§5.1.5.2): address bits 31:20 = 0xFEE,
/// 19:5 = handle 14:0, 4 = 1 (remappable), 3 = SHV (0: no subhandle), 2 = handle 15; data 0.
/// Returns `(address, data)`.
pub const fn remappable_msi(handle: u16) -> (u64, u32) {
    let h = handle as u64;
    (0xfee0_0000 | (h & 0x7fff) << 5 | 1 << 4 | (h >> 15) << 2, 0)
}

/// The compatibility-format MSI (SDM vol 3 §11.11.1): physical destination `apic_id` (8 bits),
/// fixed delivery, edge, `vector`. Blocked by a unit with IR on and CFI off.
pub const fn compatibility_msi(apic_id: u8, vector: u8) -> (u64, u32) {
    (0xfee0_0000 | (apic_id as u64) << 12, vector as u32)
}

/// The interrupt index a fault record names in FI bits 63:48 (§11.4.14) for reasons 0x20-0x27.
pub const fn fault_index(fault_info: u64) -> u16 {
    (fault_info >> 48) as u16
}

/// Whether fault reason `reason` is an interrupt-remapping fault (§7.1.3, Table 7-2: 0x20-0x27).
pub const fn is_remapping_fault(reason: u8) -> bool {
    matches!(reason, 0x20..=0x27)
}

/// Which IRTEs are in use: one bit per entry, fixed size, no heap.
#[derive(Clone, Debug)]
pub struct IrteAllocator<const WORDS: usize> {
    used: [u64; WORDS],
    entries: u32,
}

impl<const WORDS: usize> IrteAllocator<WORDS> {
    /// An allocator over `entries` entries (at most `64 * WORDS`).
    pub const fn new(entries: u32) -> Self {
        let cap = 64 * WORDS as u32;
        IrteAllocator {
            used: [0; WORDS],
            entries: if entries < cap { entries } else { cap },
        }
    }

    pub const fn entries(&self) -> u32 {
        self.entries
    }

    /// The lowest free index, now marked used.
    pub fn alloc(&mut self) -> Option<u16> {
        for (w, word) in self.used.iter_mut().enumerate() {
            if *word == u64::MAX {
                continue;
            }
            let bit = (!*word).trailing_zeros();
            let index = w as u32 * 64 + bit;
            if index >= self.entries {
                return None;
            }
            *word |= 1 << bit;
            return Some(index as u16);
        }
        None
    }

    /// Marks `index` free; false if it was not in use.
    pub fn free(&mut self, index: u16) -> bool {
        let (w, b) = (usize::from(index) / 64, index % 64);
        match self.used.get_mut(w) {
            Some(word) if *word & 1 << b != 0 => {
                *word &= !(1 << b);
                true
            }
            _ => false,
        }
    }

    pub fn in_use(&self, index: u16) -> bool {
        let (w, b) = (usize::from(index) / 64, index % 64);
        self.used.get(w).is_some_and(|word| word & 1 << b != 0)
    }
}

/// An interrupt remapping table in memory the unit reads: one 4 KiB page of 256 entries (what
/// a hypervisor with a handful of devices needs; IRTA.S = 7).
pub struct IrTable {
    pa: u64,
    format: DestinationFormat,
    alloc: IrteAllocator<4>,
}

impl IrTable {
    /// Entries per table page.
    pub const ENTRIES: u32 = 256;

    /// Allocates a zeroed (all entries not present) table.
    pub fn new<T: VtdMemory>(mem: &T, format: DestinationFormat) -> Result<Self, VtdError> {
        let pa = mem.alloc_table(4096).ok_or(VtdError::NoMemory)?;
        for i in 0..512 {
            mem.store64(pa + i * 8, 0);
        }
        mem.clean(pa, 4096);
        Ok(IrTable {
            pa,
            format,
            alloc: IrteAllocator::new(Self::ENTRIES),
        })
    }

    pub fn address(&self) -> u64 {
        self.pa
    }

    pub fn format(&self) -> DestinationFormat {
        self.format
    }

    /// IRTA_REG for this table.
    pub fn irta(&self) -> u64 {
        // 256 entries and a page-aligned table are always encodable.
        irta_value(
            self.pa,
            Self::ENTRIES,
            self.format == DestinationFormat::X2apic,
        )
        .unwrap_or(0)
    }

    /// Takes a free entry and writes `irte` into it: the high half first, then the low half
    /// with P, so the unit never sees a present entry with a stale source check (VT-d 4.1
    /// §9.10; the entry was not present, so no interrupt used it). The caller must invalidate
    /// the interrupt entry cache for the index ([`super::invalidation::Descriptor::iec_index`]) before handing the
    /// index to a device.
    pub fn install<T: VtdMemory>(&mut self, mem: &T, irte: &Irte) -> Result<u16, IrteError> {
        let (l, h) = irte.encode(self.format)?;
        let index = self.alloc.alloc().ok_or(IrteError::Reserved)?;
        let at = self.pa + u64::from(index) * 16;
        mem.store64(at + 8, h);
        mem.store64(at, l);
        mem.clean(at, 16);
        Ok(index)
    }

    /// Makes entry `index` not present (P cleared first) and frees it; the caller invalidates
    /// the entry cache for it.
    pub fn remove<T: VtdMemory>(&mut self, mem: &T, index: u16) -> bool {
        if !self.alloc.in_use(index) {
            return false;
        }
        let at = self.pa + u64::from(index) * 16;
        mem.store64(at, 0);
        mem.store64(at + 8, 0);
        mem.clean(at, 16);
        self.alloc.free(index)
    }

    /// The entry at `index` as stored.
    pub fn read<T: VtdMemory>(&self, mem: &T, index: u16) -> (u64, u64) {
        let at = self.pa + u64::from(index) * 16;
        (super::mem::load64(mem, at), super::mem::load64(mem, at + 8))
    }
}

/// Turns interrupt remapping on in `unit` with `table` (VT-d 4.1 §11.4.4, §11.4.29, §6.5.2.7):
///
/// 1. refuses a unit without ECAP.IR or ECAP.QI (entry-cache invalidation exists only as a
///    queue descriptor), and an x2APIC-format table on a unit without ECAP.EIM;
/// 2. IRTA = table | EIME | S, then GCMD.SIRTP and poll GSTS.IRTPS;
/// 3. a global interrupt-entry-cache invalidation: the unit may hold entries of a table a
///    previous owner installed;
/// 4. turns CFI off if a previous owner left it on, so compatibility-format interrupts are
///    blocked (fault 0x25) from the moment remapping is on;
/// 5. GCMD.IRE, poll GSTS.IRES.
///
/// Every GCMD write carries the persistent bits in effect (see [`GlobalCommand`]).
pub fn enable<M: Mmio, T: VtdMemory>(
    unit: &VtdUnit<M>,
    mem: &T,
    table: &IrTable,
    budget: u32,
) -> Result<(), VtdError> {
    let ecap = unit.regs().ecap;
    if !ecap.ir() || !ecap.qi() {
        return Err(VtdError::ModeUnsupported);
    }
    if table.format() == DestinationFormat::X2apic && !ecap.eim() {
        return Err(VtdError::ModeUnsupported);
    }
    let mmio = unit.mmio();
    let gsts = || GlobalStatus::from_bits_retain(mmio.read32(offset::GSTS));
    let poll = |flag: GlobalStatus, on: bool, what: &'static str| {
        for _ in 0..budget.max(1) {
            if gsts().contains(flag) == on {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(VtdError::Timeout { what })
    };
    mmio.write64(offset::IRTA, table.irta());
    let base = GlobalCommand::from_status(gsts());
    mmio.write32(offset::GCMD, (base | GlobalCommand::SIRTP).bits());
    poll(GlobalStatus::IRTPS, true, "GSTS.IRTPS")?;
    unit.invalidate_interrupt_entries(mem, None)?;
    if gsts().contains(GlobalStatus::CFIS) {
        let base = GlobalCommand::from_status(gsts());
        mmio.write32(offset::GCMD, (base - GlobalCommand::CFI).bits());
        poll(GlobalStatus::CFIS, false, "GSTS.CFIS clear")?;
    }
    let base = GlobalCommand::from_status(gsts());
    mmio.write32(offset::GCMD, (base | GlobalCommand::IRE).bits());
    poll(GlobalStatus::IRES, true, "GSTS.IRES")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vtd::invalidation::Descriptor;

    /// The spec's bit positions written out one by one (VT-d 4.1 §9.10, Figure 9-36).
    #[test]
    fn irte_layout_matches_the_spec() {
        let e = Irte {
            vector: 0x41,
            destination: 0x1234_5678,
            source: SourceValidation::RequesterId { sid: 0x0018, sq: 0 },
            fault_processing_disabled: false,
        };
        let (l, h) = e.encode(DestinationFormat::X2apic).unwrap();
        assert_eq!(l & 1, 1, "P bit 0");
        assert_eq!((l >> 1) & 1, 0, "FPD bit 1");
        assert_eq!((l >> 2) & 0x7, 0, "DM, RH, TM bits 4:2");
        assert_eq!((l >> 5) & 0x7, 0, "DLM bits 7:5 fixed");
        assert_eq!((l >> 15) & 1, 0, "IM bit 15 remapped");
        assert_eq!((l >> 16) & 0xff, 0x41, "vector bits 23:16");
        assert_eq!(l >> 32, 0x1234_5678, "DST bits 63:32");
        assert_eq!(l, 0x1234_5678_0041_0001);
        assert_eq!(h & 0xffff, 0x0018, "SID bits 79:64");
        assert_eq!((h >> 16) & 3, 0, "SQ bits 81:80");
        assert_eq!((h >> 18) & 3, 1, "SVT bits 83:82 = 01b");
        assert_eq!(h, 0x0004_0018);
        assert_eq!(Irte::decode(l, h, DestinationFormat::X2apic), Ok(e));
    }

    #[test]
    fn xapic_destination_sits_in_bits_47_40() {
        let e = Irte {
            vector: 0x30,
            destination: 3,
            source: SourceValidation::BusRange {
                start_bus: 2,
                end_bus: 4,
            },
            fault_processing_disabled: true,
        };
        let (l, h) = e.encode(DestinationFormat::Xapic).unwrap();
        assert_eq!(l, 0x0000_0300_0030_0003);
        assert_eq!(h, 2 << 18 | 0x0204);
        assert_eq!(Irte::decode(l, h, DestinationFormat::Xapic), Ok(e));
        let far = Irte {
            destination: 256,
            ..e
        };
        assert_eq!(
            far.encode(DestinationFormat::Xapic),
            Err(IrteError::Destination(256))
        );
        // Bits of DST outside 15:8 are reserved in xAPIC format.
        assert_eq!(
            Irte::decode(l | 1 << 32, h, DestinationFormat::Xapic),
            Err(IrteError::Reserved)
        );
    }

    #[test]
    fn decode_refuses_what_is_never_written() {
        let (l, h) = (0x0000_0000_0041_0001u64, 0x0004_0018u64);
        assert_eq!(
            Irte::decode(l & !1, h, DestinationFormat::X2apic),
            Err(IrteError::NotPresent)
        );
        assert_eq!(
            Irte::decode(l | 1 << 15, h, DestinationFormat::X2apic),
            Err(IrteError::Posted)
        );
        for bit in [2, 3, 4, 5, 12, 24, 31] {
            assert_eq!(
                Irte::decode(l | 1 << bit, h, DestinationFormat::X2apic),
                Err(IrteError::Reserved),
                "bit {bit}"
            );
        }
        assert_eq!(
            Irte::decode(l, h | 1 << 20, DestinationFormat::X2apic),
            Err(IrteError::Reserved)
        );
        assert_eq!(
            Irte::decode(l, h | 3 << 18, DestinationFormat::X2apic),
            Err(IrteError::ReservedSvt)
        );
        let low_vector = Irte {
            vector: 15,
            destination: 0,
            source: SourceValidation::None,
            fault_processing_disabled: false,
        };
        assert_eq!(
            low_vector.encode(DestinationFormat::X2apic),
            Err(IrteError::Vector(15))
        );
    }

    #[test]
    fn table_size_is_two_to_the_s_plus_one() {
        assert_eq!(table_entries(0), 2);
        assert_eq!(table_entries(7), 256);
        assert_eq!(table_entries(15), 65536);
        assert_eq!(size_field(256), Some(7));
        assert_eq!(size_field(65536), Some(15));
        assert_eq!(size_field(1), None);
        assert_eq!(size_field(300), None);
        assert_eq!(size_field(131072), None);
        // IRTA: address 63:12, EIME bit 11, S 3:0.
        assert_eq!(irta_value(0x12_3000, 256, true), Some(0x12_3807));
        assert_eq!(irta_value(0x12_3000, 256, false), Some(0x12_3007));
        assert_eq!(irta_value(0x12_3800, 256, false), None);
    }

    #[test]
    fn remappable_msi_address_carries_the_handle() {
        // Handle 5: bits 19:5 = 5, bit 4 interrupt format, SHV 0, bit 2 = handle 15 = 0.
        assert_eq!(remappable_msi(5), (0xfee0_00b0, 0));
        // Handle 0x8001: bit 2 carries handle bit 15.
        assert_eq!(remappable_msi(0x8001), (0xfee0_0034, 0));
        assert_eq!(compatibility_msi(1, 0x99), (0xfee0_1000, 0x99));
        assert_eq!(fault_index(0x0022_0000_0000_0000), 0x22);
        assert!(is_remapping_fault(0x25) && !is_remapping_fault(0x05));
    }

    #[test]
    fn source_validation_rules() {
        let exact = SourceValidation::for_device(&[0x0018]).unwrap();
        assert_eq!(exact, SourceValidation::RequesterId { sid: 0x18, sq: 0 });
        assert!(exact.accepts(0x0018));
        assert!(!exact.accepts(0x0019) && !exact.accepts(0x0118) && !exact.accepts(0x001c));
        // SQ = 11b ignores the function number.
        let any_fn = SourceValidation::RequesterId { sid: 0x0018, sq: 3 };
        assert!(any_fn.accepts(0x001f) && !any_fn.accepts(0x0020));
        let sq1 = SourceValidation::RequesterId { sid: 0x0018, sq: 1 };
        assert!(sq1.accepts(0x001c) && !sq1.accepts(0x001a));
        // Behind a PCIe-to-PCI bridge (00:1e.0) with secondary bus 2: own ID 02:01.0, alias
        // 02:00.0, and the bridge's own ID, which stays out of the range (bus 0 is not the
        // group's).
        let behind = SourceValidation::for_device(&[0x0208, 0x0200, 0x00f0]).unwrap();
        assert_eq!(
            behind,
            SourceValidation::BusRange {
                start_bus: 2,
                end_bus: 2
            }
        );
        assert!(behind.accepts(0x0208) && behind.accepts(0x0200));
        assert!(!behind.accepts(0x0108) && !behind.accepts(0x0308) && !behind.accepts(0x00f0));
        // Nested: device 03:00.0 behind a PCI bridge on bus 2, behind a PCIe-to-PCI bridge with
        // secondary bus 2: alias 02:00.0 -> buses 2..=3.
        assert_eq!(
            SourceValidation::for_device(&[0x0300, 0x0200]),
            Some(SourceValidation::BusRange {
                start_bus: 2,
                end_bus: 3
            })
        );
        assert_eq!(SourceValidation::for_device(&[]), None);
        // Encoding of the bus range: SVT 10b, SID 15:8 start bus, 7:0 end bus.
        assert_eq!(
            SourceValidation::BusRange {
                start_bus: 1,
                end_bus: 3
            }
            .encode(),
            2 << 18 | 0x0103
        );
    }

    #[test]
    fn allocator_hands_out_each_index_once() {
        let mut a = IrteAllocator::<2>::new(100);
        let got: alloc::vec::Vec<u16> = (0..100).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, (0..100).collect::<alloc::vec::Vec<u16>>());
        assert_eq!(a.alloc(), None);
        assert!(a.free(37));
        assert!(!a.free(37));
        assert!(!a.free(1000));
        assert_eq!(a.alloc(), Some(37));
        let mut big = IrteAllocator::<1>::new(1000);
        assert_eq!(big.entries(), 64);
        for _ in 0..64 {
            big.alloc().unwrap();
        }
        assert_eq!(big.alloc(), None);
    }

    #[test]
    fn iec_descriptors_match_the_spec() {
        // §6.5.2.7: type 3:0 = 4, G bit 4, IM 31:27, IIDX 47:32.
        assert_eq!(Descriptor::iec_global().lo, 0x4);
        assert_eq!(Descriptor::iec_global().hi, 0);
        let d = Descriptor::iec_index(0x0123, 2);
        assert_eq!(d.lo, 0x0000_0123_1000_0014);
        assert_eq!(d.kind(), 4);
    }
}

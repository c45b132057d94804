//! ITS registers (IHI 0069 §12.19) and the redistributor's LPI registers (§12.11), with
//! decoders of the fields the driver reads back.

/// ITS control frame (ITS_base) offsets.
pub mod gits {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0008;
    pub const CBASER: usize = 0x0080;
    pub const CWRITER: usize = 0x0088;
    pub const CREADR: usize = 0x0090;
    /// GITS_BASER<n>, n = 0..7, 8 bytes apart.
    pub const BASER: usize = 0x0100;
    /// GITS_TRANSLATER: in the translation register frame, the second 64 KiB page.
    pub const TRANSLATER: usize = 0x1_0040;
    pub const CTLR_ENABLED: u32 = 1 << 0;
    pub const CTLR_QUIESCENT: u32 = 1 << 31;
    /// GITS_CREADR.Stalled (bit 0): a command error stopped the queue.
    pub const CREADR_STALLED: u64 = 1 << 0;
    /// CWRITER/CREADR Offset, bits 19:5.
    pub const QUEUE_OFFSET_MASK: u64 = 0xf_ffe0;
}

/// Redistributor RD_base frame: LPI registers.
pub mod gicr_lpi {
    pub const CTLR_ENABLE_LPIS: u32 = 1 << 0;
    /// GICR_TYPER.PLPIS (bit 0): physical LPIs supported.
    pub const TYPER_PLPIS: u64 = 1 << 0;
    pub const PROPBASER: usize = 0x0070;
    pub const PENDBASER: usize = 0x0078;
    /// Inner-shareable (bits 11:10 = 0b01), inner write-back read/write-allocate (InnerCache
    /// 0b111, bits 9:7 in PROPBASER/PENDBASER): the attributes of the LPI table walks.
    pub const ATTR_IS_WB: u64 = 0b01 << 10 | 0b111 << 7;
    /// The same for GITS_BASER<n>/GITS_CBASER, whose InnerCache is bits 61:59 (bits 9:8 are
    /// BASER's Page_Size there).
    pub const ITS_ATTR_IS_WB: u64 = 0b01 << 10 | 0b111 << 59;
    /// GICR_PENDBASER.PTZ (bit 62): the pending table is known to be zero.
    pub const PENDBASER_PTZ: u64 = 1 << 62;
}

/// GITS_TYPER (§12.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItsTyper(pub u64);

impl ItsTyper {
    /// Physical LPIs supported (bit 0).
    pub fn physical(self) -> bool {
        self.0 & 1 != 0
    }
    /// Bytes per ITT entry: ITT_entry_size (bits 7:4) + 1.
    pub fn itt_entry_size(self) -> u32 {
        ((self.0 >> 4) & 0xf) as u32 + 1
    }
    /// EventID bits: IDbits (bits 12:8) + 1.
    pub fn event_id_bits(self) -> u32 {
        ((self.0 >> 8) & 0x1f) as u32 + 1
    }
    /// DeviceID bits: Devbits (bits 17:13) + 1.
    pub fn device_id_bits(self) -> u32 {
        ((self.0 >> 13) & 0x1f) as u32 + 1
    }
    /// PTA (bit 19): collection targets are physical addresses (else processor numbers).
    pub fn pta(self) -> bool {
        self.0 & (1 << 19) != 0
    }
    /// Collection ID bits: 16 unless CIL (bit 36), then CIDbits (bits 35:32) + 1.
    pub fn collection_id_bits(self) -> u32 {
        if self.0 & (1 << 36) != 0 {
            ((self.0 >> 32) & 0xf) as u32 + 1
        } else {
            16
        }
    }
}

/// GITS_BASER<n>.Type (bits 58:56, §12.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableType {
    Unimplemented,
    Devices,
    VPEs,
    Collections,
    Reserved(u8),
}

/// GITS_BASER<n> (§12.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Baser(pub u64);

impl Baser {
    pub const VALID: u64 = 1 << 63;
    pub const INDIRECT: u64 = 1 << 62;

    pub fn table_type(self) -> TableType {
        match (self.0 >> 56) & 7 {
            0 => TableType::Unimplemented,
            1 => TableType::Devices,
            2 => TableType::VPEs,
            4 => TableType::Collections,
            t => TableType::Reserved(t as u8),
        }
    }
    /// Bytes per entry: Entry_Size (bits 52:48) + 1.
    pub fn entry_size(self) -> u32 {
        ((self.0 >> 48) & 0x1f) as u32 + 1
    }
    /// Page size in bytes from Page_Size (bits 9:8): 4 KiB, 16 KiB, 64 KiB (0b11 reads as 64).
    pub fn page_size(self) -> u64 {
        match (self.0 >> 8) & 3 {
            0 => 0x1000,
            1 => 0x4000,
            _ => 0x1_0000,
        }
    }
    /// A flat (not indirect) table of `pages` pages of `page_size` at `pa`, Valid, with this
    /// register's read-only fields (Type, Entry_Size) kept. `pa` must be aligned to the page
    /// size and, for 4 and 16 KiB pages, below 2^48 (bits 47:12).
    pub fn flat(self, pa: u64, page_size: u64, pages: u32) -> Option<u64> {
        let ps = match page_size {
            0x1000 => 0u64,
            0x4000 => 1,
            0x1_0000 => 2,
            _ => return None,
        };
        if !pa.is_multiple_of(page_size) || pa >= 1 << 48 || !(1..=256).contains(&pages) {
            return None;
        }
        let keep = self.0 & (0x7 << 56 | 0x1f << 48);
        Some(Self::VALID | keep | pa | gicr_lpi::ITS_ATTR_IS_WB | ps << 8 | u64::from(pages - 1))
    }
}

/// GITS_CBASER for a queue of `pages` 4 KiB pages (1..=256) at `pa` (4 KiB aligned, below
/// 2^52): Valid, Physical_Address bits 51:12, Size = pages - 1.
pub fn cbaser(pa: u64, pages: u32) -> Option<u64> {
    if pa & 0xfff != 0 || pa >= 1 << 52 || !(1..=256).contains(&pages) {
        return None;
    }
    Some(Baser::VALID | pa | gicr_lpi::ITS_ATTR_IS_WB | u64::from(pages - 1))
}

/// GICR_PROPBASER for a configuration table at `pa` covering INTIDs below 2^`id_bits`.
pub fn propbaser(pa: u64, id_bits: u32) -> u64 {
    pa | gicr_lpi::ATTR_IS_WB | u64::from(id_bits.clamp(14, 32) - 1)
}

/// GICR_PENDBASER for a zeroed pending table at `pa` (64 KiB aligned).
pub fn pendbaser(pa: u64) -> u64 {
    pa | gicr_lpi::ATTR_IS_WB | gicr_lpi::PENDBASER_PTZ
}

/// One LPI configuration table byte (§5.1): priority in bits 7:2, bit 1 RES1, Enable bit 0.
pub fn lpi_config(priority: u8, enable: bool) -> u8 {
    (priority & 0xfc) | 0b10 | u8::from(enable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typer_fields_of_qemus_its() {
        // As QEMU 10's ITS reports it (boot report of arm-its-msi): Physical, ITT_entry_size 12
        // (field 0xb), IDbits 16 (field 15), Devbits 16 (field 15), PTA 0, CIL 0.
        let t = ItsTyper(1 | 0xb << 4 | 15 << 8 | 15 << 13);
        assert!(t.physical());
        assert_eq!(t.itt_entry_size(), 12);
        assert_eq!(t.event_id_bits(), 16);
        assert_eq!(t.device_id_bits(), 16);
        assert!(!t.pta());
        assert_eq!(t.collection_id_bits(), 16);
        assert_eq!(
            ItsTyper(1 << 36 | 7 << 32 | 1 << 19).collection_id_bits(),
            8
        );
        assert!(ItsTyper(1 << 19).pta());
    }

    #[test]
    fn baser_keeps_type_and_entry_size_and_places_address_and_size() {
        // A Devices table, 8-byte entries, as read back.
        let r = Baser(1 << 56 | 7 << 48);
        assert_eq!(r.table_type(), TableType::Devices);
        assert_eq!(r.entry_size(), 8);
        let v = r.flat(0x4100_0000, 0x1_0000, 2).unwrap();
        assert_eq!(v >> 63, 1);
        assert_eq!((v >> 56) & 7, 1);
        assert_eq!((v >> 48) & 0x1f, 7);
        assert_eq!(v & 0xffff_ffff_f000 & !0xfff, 0x4100_0000);
        assert_eq!((v >> 8) & 3, 2, "64 KiB pages");
        assert_eq!(v & 0xff, 1, "Size = pages - 1");
        assert_eq!(Baser(v).page_size(), 0x1_0000);
        assert_eq!(r.flat(0x4100_1000, 0x1_0000, 1), None);
        assert_eq!(r.flat(0x4100_0000, 0x2000, 1), None);
        assert_eq!(r.flat(0x4100_0000, 0x1000, 0), None);
        assert_eq!(Baser(4 << 56).table_type(), TableType::Collections);
    }

    #[test]
    fn queue_and_lpi_table_registers() {
        let c = cbaser(0x4200_0000, 1).unwrap();
        assert_eq!(c >> 63, 1);
        assert_eq!(c & 0xff, 0);
        assert_eq!((c >> 59) & 7, 0b111, "InnerCache at 61:59");
        assert_eq!(c & 0x000f_ffff_ffff_f000, 0x4200_0000);
        assert_eq!(cbaser(0x4200_0800, 1), None);
        let p = propbaser(0x4300_0000, 16);
        assert_eq!(p & 0x1f, 15, "IDbits = 16 - 1");
        assert_eq!(p & 0x000f_ffff_ffff_f000, 0x4300_0000);
        assert_eq!((p >> 10) & 3, 1, "inner shareable");
        let q = pendbaser(0x4400_0000);
        assert_eq!((q >> 62) & 1, 1);
        assert_eq!(q & 0x000f_ffff_ffff_0000, 0x4400_0000);
        assert_eq!(lpi_config(0x40, true), 0x43);
        assert_eq!(lpi_config(0xa3, false), 0xa2);
    }
}

//! ITS commands (IHI 0069 §5.3): 32-byte records of four little-endian doublewords written to
//! the command queue at GITS_CWRITER. DW0 bits 7:0 hold the command number; the other fields
//! sit where §5.3 places them for each command, listed on each encoder.
//!
//! Every encoder refuses a value that does not fit its field instead of truncating it: a
//! truncated DeviceID or ITT address would silently program another device's translation.

/// One encoded command: DW0..DW3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command(pub [u64; 4]);

/// Bytes in one command (§5.3).
pub const COMMAND_BYTES: usize = 32;

/// Command numbers (§5.3, table "ITS command summary").
pub mod opcode {
    pub const INT: u8 = 0x03;
    pub const CLEAR: u8 = 0x04;
    pub const SYNC: u8 = 0x05;
    pub const MAPD: u8 = 0x08;
    pub const MAPC: u8 = 0x09;
    pub const MAPTI: u8 = 0x0a;
    pub const MAPI: u8 = 0x0b;
    pub const INV: u8 = 0x0c;
    pub const INVALL: u8 = 0x0d;
    pub const DISCARD: u8 = 0x0f;
}

/// Why a command could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// ITT address not 256-byte aligned or beyond 52 bits (MAPD ITT_addr is bits 51:8).
    IttAddress(u64),
    /// MAPD Size is EventID bits minus 1, 5 bits: 1..=32 bits.
    EventIdBits(u32),
    /// The target (RDbase) does not fit bits 50:16: a processor number (GITS_TYPER.PTA = 0)
    /// must be below 2^35, a physical address (PTA = 1) 64 KiB aligned and below 2^51.
    Target(u64),
    /// A physical LPI INTID must be at least 8192.
    NotLpi(u32),
}

/// Where a collection's interrupts go (§5.3 RDbase): GITS_TYPER.PTA says which form the ITS
/// takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// PTA = 0: the redistributor's GICR_TYPER.Processor_Number.
    ProcessorNumber(u32),
    /// PTA = 1: the physical address of the redistributor's RD_base frame.
    Address(u64),
}

impl Target {
    /// The RDbase field, already at bits 50:16.
    fn field(self) -> Result<u64, EncodeError> {
        match self {
            Target::ProcessorNumber(n) => Ok(u64::from(n) << 16),
            Target::Address(pa) if pa & 0xffff == 0 && pa < 1 << 51 => Ok(pa),
            Target::Address(pa) => Err(EncodeError::Target(pa)),
        }
    }
}

const VALID: u64 = 1 << 63;

fn op(code: u8, device: u32) -> u64 {
    u64::from(code) | u64::from(device) << 32
}

/// MAPD (§5.3): DW0 63:32 DeviceID; DW1 4:0 Size (EventID bits - 1); DW2 51:8 ITT_addr,
/// bit 63 V. Maps `device` to its interrupt translation table at `itt` with `event_bits` of
/// EventID.
pub fn mapd(device: u32, itt: u64, event_bits: u32) -> Result<Command, EncodeError> {
    if itt & 0xff != 0 || itt >= 1 << 52 {
        return Err(EncodeError::IttAddress(itt));
    }
    if !(1..=32).contains(&event_bits) {
        return Err(EncodeError::EventIdBits(event_bits));
    }
    Ok(Command([
        op(opcode::MAPD, device),
        u64::from(event_bits - 1),
        itt | VALID,
        0,
    ]))
}

/// MAPD with V = 0: unmaps `device` (its ITT is no longer used).
pub fn unmapd(device: u32) -> Command {
    Command([op(opcode::MAPD, device), 0, 0, 0])
}

/// MAPC (§5.3): DW2 15:0 ICID, 50:16 RDbase, bit 63 V.
pub fn mapc(icid: u16, target: Target) -> Result<Command, EncodeError> {
    Ok(Command([
        u64::from(opcode::MAPC),
        0,
        u64::from(icid) | target.field()? | VALID,
        0,
    ]))
}

/// MAPTI (§5.3): DW0 63:32 DeviceID; DW1 31:0 EventID, 63:32 pINTID; DW2 15:0 ICID.
pub fn mapti(device: u32, event: u32, lpi: u32, icid: u16) -> Result<Command, EncodeError> {
    if lpi < 8192 {
        return Err(EncodeError::NotLpi(lpi));
    }
    Ok(Command([
        op(opcode::MAPTI, device),
        u64::from(event) | u64::from(lpi) << 32,
        u64::from(icid),
        0,
    ]))
}

/// MAPI (§5.3): MAPTI with pINTID = EventID; DW0 63:32 DeviceID, DW1 31:0 EventID, DW2
/// 15:0 ICID.
pub fn mapi(device: u32, event: u32, icid: u16) -> Result<Command, EncodeError> {
    if event < 8192 {
        return Err(EncodeError::NotLpi(event));
    }
    Ok(Command([
        op(opcode::MAPI, device),
        u64::from(event),
        u64::from(icid),
        0,
    ]))
}

/// INV (§5.3): DW0 63:32 DeviceID, DW1 31:0 EventID: reload the LPI's configuration.
pub fn inv(device: u32, event: u32) -> Command {
    Command([op(opcode::INV, device), u64::from(event), 0, 0])
}

/// INVALL (§5.3): DW2 15:0 ICID: reload the configuration of every LPI of the collection.
pub fn invall(icid: u16) -> Command {
    Command([u64::from(opcode::INVALL), 0, u64::from(icid), 0])
}

/// SYNC (§5.3): DW2 50:16 RDbase: every earlier command's effects on that redistributor
/// are visible once the ITS has consumed this one.
pub fn sync(target: Target) -> Result<Command, EncodeError> {
    Ok(Command([u64::from(opcode::SYNC), 0, target.field()?, 0]))
}

/// DISCARD (§5.3): DW0 63:32 DeviceID, DW1 31:0 EventID: removes the mapping (and any
/// pending state of its LPI).
pub fn discard(device: u32, event: u32) -> Command {
    Command([op(opcode::DISCARD, device), u64::from(event), 0, 0])
}

/// INT (§5.3): DW0 63:32 DeviceID, DW1 31:0 EventID: makes the ITS behave as if the device
/// had written EventID to GITS_TRANSLATER.
pub fn int(device: u32, event: u32) -> Command {
    Command([op(opcode::INT, device), u64::from(event), 0, 0])
}

/// CLEAR (§5.3): same fields as INT; clears the LPI's pending state.
pub fn clear(device: u32, event: u32) -> Command {
    Command([op(opcode::CLEAR, device), u64::from(event), 0, 0])
}

impl Command {
    /// The command number (DW0 7:0).
    pub fn opcode(&self) -> u8 {
        self.0[0] as u8
    }

    /// The 32 bytes as the queue holds them (little-endian doublewords, §5.3).
    pub fn to_bytes(&self) -> [u8; COMMAND_BYTES] {
        let mut out = [0u8; COMMAND_BYTES];
        for (chunk, dw) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&dw.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit ranges written by hand from IHI 0069 §5.3: (doubleword, high bit, low bit).
    fn field(c: &Command, dw: usize, hi: u32, lo: u32) -> u64 {
        let v = c.0[dw] >> lo;
        if hi - lo == 63 {
            v
        } else {
            v & ((1u64 << (hi - lo + 1)) - 1)
        }
    }

    #[test]
    fn mapd_places_deviceid_size_itt_and_valid() {
        let c = mapd(0x0028, 0x4123_4500, 5).unwrap();
        assert_eq!(field(&c, 0, 7, 0), 0x08);
        assert_eq!(field(&c, 0, 63, 32), 0x28);
        assert_eq!(field(&c, 1, 4, 0), 4, "Size = EventID bits - 1");
        assert_eq!(field(&c, 2, 51, 8), 0x4123_4500 >> 8);
        assert_eq!(field(&c, 2, 63, 63), 1);
        assert_eq!(c.0[3], 0);
        // Reserved bits stay zero.
        assert_eq!(field(&c, 0, 31, 8), 0);
        assert_eq!(field(&c, 1, 63, 5), 0);
        assert_eq!(field(&c, 2, 7, 0) | field(&c, 2, 62, 52), 0);
        assert_eq!(unmapd(0x28).0, [0x28_0000_0008, 0, 0, 0]);
    }

    #[test]
    fn mapd_refuses_misaligned_or_wide_itt_and_bad_sizes() {
        assert_eq!(mapd(1, 0x1080, 4), Err(EncodeError::IttAddress(0x1080)));
        assert_eq!(mapd(1, 1 << 52, 4), Err(EncodeError::IttAddress(1 << 52)));
        assert_eq!(mapd(1, 0x1000, 0), Err(EncodeError::EventIdBits(0)));
        assert_eq!(mapd(1, 0x1000, 33), Err(EncodeError::EventIdBits(33)));
        assert!(mapd(u32::MAX, 0xf_ffff_ffff_ff00, 32).is_ok());
    }

    #[test]
    fn mapc_encodes_both_target_forms() {
        let c = mapc(3, Target::ProcessorNumber(1)).unwrap();
        assert_eq!(field(&c, 0, 7, 0), 0x09);
        assert_eq!(field(&c, 2, 15, 0), 3);
        assert_eq!(field(&c, 2, 50, 16), 1);
        assert_eq!(field(&c, 2, 63, 63), 1);
        let c = mapc(0xffff, Target::Address(0x080a_0000)).unwrap();
        assert_eq!(field(&c, 2, 15, 0), 0xffff);
        assert_eq!(field(&c, 2, 50, 16) << 16, 0x080a_0000);
        assert_eq!(
            mapc(0, Target::Address(0x080a_1000)),
            Err(EncodeError::Target(0x080a_1000))
        );
        assert_eq!(
            mapc(0, Target::Address(1 << 51)),
            Err(EncodeError::Target(1 << 51))
        );
    }

    #[test]
    fn mapti_and_mapi_place_event_lpi_and_collection() {
        let c = mapti(0x28, 7, 8192 + 5, 2).unwrap();
        assert_eq!(field(&c, 0, 7, 0), 0x0a);
        assert_eq!(field(&c, 0, 63, 32), 0x28);
        assert_eq!(field(&c, 1, 31, 0), 7);
        assert_eq!(field(&c, 1, 63, 32), 8197);
        assert_eq!(field(&c, 2, 15, 0), 2);
        assert_eq!(field(&c, 2, 63, 16), 0);
        assert_eq!(mapti(0x28, 7, 8191, 0), Err(EncodeError::NotLpi(8191)));
        let c = mapi(0x30, 9000, 1).unwrap();
        assert_eq!(field(&c, 0, 7, 0), 0x0b);
        assert_eq!(field(&c, 0, 63, 32), 0x30);
        assert_eq!(field(&c, 1, 31, 0), 9000);
        assert_eq!(field(&c, 1, 63, 32), 0);
        assert_eq!(field(&c, 2, 15, 0), 1);
        assert_eq!(mapi(0x30, 5, 1), Err(EncodeError::NotLpi(5)));
    }

    #[test]
    fn event_commands_and_collection_commands() {
        for (c, code) in [
            (inv(0x28, 3), 0x0c),
            (discard(0x28, 3), 0x0f),
            (int(0x28, 3), 0x03),
            (clear(0x28, 3), 0x04),
        ] {
            assert_eq!(c.opcode(), code);
            assert_eq!(field(&c, 0, 63, 32), 0x28);
            assert_eq!(field(&c, 1, 31, 0), 3);
            assert_eq!((c.0[2], c.0[3]), (0, 0));
        }
        let c = invall(0x1234);
        assert_eq!(c.opcode(), 0x0d);
        assert_eq!(c.0, [0x0d, 0, 0x1234, 0]);
        let c = sync(Target::ProcessorNumber(2)).unwrap();
        assert_eq!(c.opcode(), 0x05);
        assert_eq!(field(&c, 2, 50, 16), 2);
        assert_eq!(field(&c, 2, 63, 63), 0);
    }

    #[test]
    fn bytes_are_little_endian_doublewords() {
        let b = mapti(0x0102_0304, 0x0a0b_0c0d, 0x2000, 0x0e0f)
            .unwrap()
            .to_bytes();
        assert_eq!(b[0], 0x0a);
        assert_eq!(&b[4..8], &[0x04, 0x03, 0x02, 0x01]);
        assert_eq!(&b[8..12], &[0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(&b[12..16], &[0x00, 0x20, 0x00, 0x00]);
        assert_eq!(&b[16..18], &[0x0f, 0x0e]);
        assert!(b[18..].iter().all(|&x| x == 0));
    }
}

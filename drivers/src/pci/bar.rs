//! Base Address Registers: decoding and sizing (PCI Local Bus 3.0 §6.2.5).

use super::config::{Bdf, ConfigSpace, reg};

/// What a BAR decodes (PCI Local Bus 3.0 §6.2.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// I/O space (bit 0 set).
    Io,
    /// Memory, 32-bit address (type 00b; the PCI 2.x "below 1 MiB" type 01b is treated alike).
    Mem32,
    /// Memory, 64-bit address (type 10b), occupying this BAR and the next.
    Mem64,
}

/// Where a BAR's address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarState {
    /// Enumeration found address 0: firmware left it unassigned.
    Unassigned,
    /// Enumeration found a non-zero address, presumably firmware's.
    Firmware,
    /// [`assign_resources`](super::assign_resources) kept the firmware address.
    Kept,
    /// [`assign_resources`](super::assign_resources) programmed a new address.
    Assigned,
    /// [`assign_resources`](super::assign_resources) found no room for it; the function's decode
    /// of this space stays disabled.
    Failed,
}

/// One implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bar {
    /// BAR number, 0..=5; the register is at `0x10 + 4 * index` (the upper half of a
    /// [`BarKind::Mem64`] BAR is at `index + 1`).
    pub index: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    /// Bus address (what the BAR register holds), 0 if unassigned.
    pub base: u64,
    /// Size in bytes, a power of two.
    pub size: u64,
    pub state: BarState,
}

impl Bar {
    pub const fn is_memory(&self) -> bool {
        !matches!(self.kind, BarKind::Io)
    }

    /// The register offset of the (low half of the) BAR.
    pub const fn register(&self) -> u16 {
        reg::BAR0 + 4 * self.index as u16
    }

    /// Whether the current address is usable: assigned by us or kept from firmware.
    pub const fn is_live(&self) -> bool {
        matches!(self.state, BarState::Kept | BarState::Assigned)
    }
}

/// A BAR that cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    /// Memory type 11b is reserved.
    ReservedType { index: u8 },
    /// A 64-bit BAR in the last BAR slot has no upper half.
    Mem64InLastSlot { index: u8 },
    /// No writable address bit, although the type bits or the old value say the BAR exists:
    /// the naive size computation would claim 4 GiB (32-bit) or 2^64 bytes (64-bit).
    NoAddressBits { index: u8, readback: u64 },
}

/// Sizes the first `count` BARs (6 for a type-0 header, 2 for type 1) by the procedure of PCI
/// Local Bus 3.0 §6.2.5.1: with memory and I/O decode disabled in COMMAND, save each BAR, write
/// all ones, read back the writable mask, restore the saved value; both halves of a 64-bit BAR
/// together. Decode is restored afterwards. Errors are passed to `on_error`; the faulty BAR is
/// left out.
pub(crate) fn size_bars<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    count: u8,
    on_error: &mut dyn FnMut(BarError),
) -> [Option<Bar>; 6] {
    let mut bars = [None; 6];
    let count = count.min(6);
    if count == 0 {
        return bars;
    }
    let command = cfg.read16(bdf, reg::COMMAND);
    let decode = reg::CMD_IO | reg::CMD_MEM;
    if command & decode != 0 {
        cfg.write16(bdf, reg::COMMAND, command & !decode);
    }
    let mut index = 0u8;
    while index < count {
        let off = reg::BAR0 + 4 * u16::from(index);
        let orig = cfg.read32(bdf, off);
        let mut used = 1;
        if orig & 1 == 1 {
            let mask = probe(cfg, bdf, off);
            // I/O BAR: bits 1:0 are flags. A device that decodes only 16 bits of I/O address may
            // return 0 in bits 31:16; the size is given by the lowest writable bit either way.
            let addr_mask = mask & !0x3;
            if addr_mask != 0 {
                bars[usize::from(index)] = Some(Bar {
                    index,
                    kind: BarKind::Io,
                    prefetchable: false,
                    base: u64::from(orig & !0x3),
                    size: lowest_bit(u64::from(addr_mask)),
                    state: state_of(u64::from(orig & !0x3)),
                });
            } else {
                on_error(BarError::NoAddressBits {
                    index,
                    readback: u64::from(mask),
                });
            }
        } else {
            let prefetchable = orig & (1 << 3) != 0;
            match (orig >> 1) & 0x3 {
                0b00 | 0b01 => {
                    let mask = probe(cfg, bdf, off);
                    let addr_mask = mask & !0xf;
                    if addr_mask != 0 {
                        bars[usize::from(index)] = Some(Bar {
                            index,
                            kind: BarKind::Mem32,
                            prefetchable,
                            base: u64::from(orig & !0xf),
                            size: lowest_bit(u64::from(addr_mask)),
                            state: state_of(u64::from(orig & !0xf)),
                        });
                    } else if mask != 0 || orig != 0 {
                        on_error(BarError::NoAddressBits {
                            index,
                            readback: u64::from(mask),
                        });
                    }
                    // All zero before and after: an unimplemented BAR (hardwired to 0).
                }
                0b10 => {
                    if index + 1 >= count {
                        on_error(BarError::Mem64InLastSlot { index });
                    } else {
                        used = 2;
                        let orig_hi = cfg.read32(bdf, off + 4);
                        cfg.write32(bdf, off, u32::MAX);
                        cfg.write32(bdf, off + 4, u32::MAX);
                        let lo = cfg.read32(bdf, off);
                        let hi = cfg.read32(bdf, off + 4);
                        cfg.write32(bdf, off, orig);
                        cfg.write32(bdf, off + 4, orig_hi);
                        let addr_mask = (u64::from(hi) << 32 | u64::from(lo)) & !0xf;
                        let base = (u64::from(orig_hi) << 32 | u64::from(orig)) & !0xf;
                        if addr_mask != 0 {
                            bars[usize::from(index)] = Some(Bar {
                                index,
                                kind: BarKind::Mem64,
                                prefetchable,
                                base,
                                size: lowest_bit(addr_mask),
                                state: state_of(base),
                            });
                        } else {
                            on_error(BarError::NoAddressBits {
                                index,
                                readback: u64::from(hi) << 32 | u64::from(lo),
                            });
                        }
                    }
                }
                _ => on_error(BarError::ReservedType { index }),
            }
        }
        index += used;
    }
    if command & decode != 0 {
        cfg.write16(bdf, reg::COMMAND, command);
    }
    bars
}

/// Writes all ones to the BAR at `off`, returns what reads back, and restores the old value.
fn probe<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf, off: u16) -> u32 {
    let orig = cfg.read32(bdf, off);
    cfg.write32(bdf, off, u32::MAX);
    let mask = cfg.read32(bdf, off);
    cfg.write32(bdf, off, orig);
    mask
}

/// The lowest set bit of `mask` (non-zero): the BAR size, since the writable address bits are
/// those at and above log2(size) (PCI Local Bus 3.0 §6.2.5.1).
const fn lowest_bit(mask: u64) -> u64 {
    mask & mask.wrapping_neg()
}

const fn state_of(base: u64) -> BarState {
    if base == 0 {
        BarState::Unassigned
    } else {
        BarState::Firmware
    }
}

//! The guest's copy of an assigned function's MSI capability (PCI Local Bus 3.0 §6.8.1).
//!
//! A guest programs MSI with guest values (a virtual APIC's address and vector, or a virtual
//! ITS doorbell); the device must carry the host's (a remappable-format handle of an IRTE the
//! hypervisor owns, VT-d 4.1 §5.1.2.2). So the registers the guest sees are a shadow: reads
//! return what the guest wrote, never the device's real address/data, and writes only change
//! the shadow. [`MsiShadow::write`] says when the guest's *effective* MSI changed (enabled,
//! retargeted while enabled, disabled, masked), and the caller then programs the device.
//!
//! Register layout (§6.8.1.1-§6.8.1.7), offsets from the capability:
//!
//! | offset | 32-bit form | 64-bit form |
//! | --- | --- | --- |
//! | +0 | ID, next, Message Control | same |
//! | +4 | Message Address | Message Address (low) |
//! | +8 | Message Data | Message Upper Address |
//! | +0xC | Mask Bits (if per-vector masking) | Message Data |
//! | +0x10 | Pending Bits (if per-vector masking) | Mask Bits (if per-vector masking) |
//! | +0x14 | — | Pending Bits (if per-vector masking) |
//!
//! Message Control: bit 0 MSI Enable (RW), bits 3:1 Multiple Message Capable (RO), 6:4
//! Multiple Message Enable (RW), 7 64-bit capable (RO), 8 per-vector masking capable (RO).
//! The shadow advertises one vector (MMC = 0) and keeps MME at 0: a guest gets exactly one
//! host vector per function, so it cannot claim a block of vectors the hypervisor never
//! allocated. Only mask bit 0 exists for the same reason.

use super::caps::MsiCap;

/// The guest's MSI message (its own address and data, not the host's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// What a guest write changed in its effective MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiChange {
    /// Nothing the device needs to know.
    None,
    /// MSI is (now, or still) enabled with this message, which differs from the one the
    /// device was last programmed for: route it (replacing any previous route).
    Route(MsiMessage),
    /// MSI went from enabled to disabled: unroute and disable the device's MSI.
    Unroute,
    /// Only the guest's mask bit for vector 0 changed (per-vector masking capable only).
    Mask(bool),
}

/// Message Control bits (§6.8.1.3).
const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_MMC: u16 = 0b111 << 1;
const CTRL_MME: u16 = 0b111 << 4;
const CTRL_64: u16 = 1 << 7;
const CTRL_PVM: u16 = 1 << 8;

/// The shadow of one MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiShadow {
    cap: MsiCap,
    enabled: bool,
    address: u64,
    data: u16,
    mask: bool,
    /// The message the device is programmed with while enabled (None: not routed).
    routed: Option<MsiMessage>,
}

impl MsiShadow {
    /// A shadow in the reset state (§6.8.1.3: MSI disabled, MME 0, address/data 0; mask bits
    /// reset to 0, §6.8.1.7).
    pub const fn new(cap: MsiCap) -> MsiShadow {
        MsiShadow {
            cap,
            enabled: false,
            address: 0,
            data: 0,
            mask: false,
            routed: None,
        }
    }

    /// Offset of the capability in configuration space.
    pub const fn offset(&self) -> u16 {
        self.cap.offset as u16
    }

    /// Size in bytes of the capability's registers.
    pub const fn len(&self) -> u16 {
        match (self.cap.addr64, self.cap.per_vector_mask) {
            (false, false) => 0x0c,
            (false, true) => 0x14,
            (true, false) => 0x10,
            (true, true) => 0x18,
        }
    }

    /// Always false: the capability has at least its header.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Whether the dword at `offset` (dword-aligned) belongs to the capability.
    pub fn covers(&self, offset: u16) -> bool {
        let start = self.offset();
        offset >= start && offset < start + self.len()
    }

    /// The guest's MSI while enabled.
    pub fn message(&self) -> Option<MsiMessage> {
        self.enabled.then_some(MsiMessage {
            address: self.address,
            data: u32::from(self.data),
        })
    }

    pub fn masked(&self) -> bool {
        self.mask
    }

    /// The message the device was last programmed for.
    pub fn routed(&self) -> Option<MsiMessage> {
        self.routed
    }

    /// Records that the device now carries (a host translation of) `m`, or nothing.
    pub fn set_routed(&mut self, m: Option<MsiMessage>) {
        self.routed = m;
    }

    /// Register offsets relative to the capability: (data, mask, pending).
    fn layout(&self) -> (u16, Option<u16>, Option<u16>) {
        let data = if self.cap.addr64 { 0x0c } else { 0x08 };
        if self.cap.per_vector_mask {
            (data, Some(data + 4), Some(data + 8))
        } else {
            (data, None, None)
        }
    }

    /// What the guest reads in the dword at `offset` (dword-aligned, [`covers`](Self::covers)),
    /// given the device's real dword there (`real`): the capability ID and next pointer are
    /// the device's, everything the guest can write is the shadow, the pending bit is the
    /// device's bit 0 (the only vector it has).
    pub fn read(&self, offset: u16, real: u32) -> u32 {
        let rel = offset - self.offset();
        let (data, mask, pending) = self.layout();
        if rel == 0 {
            let mut ctrl = ((real >> 16) as u16) & (CTRL_64 | CTRL_PVM);
            ctrl &= !(CTRL_MMC | CTRL_MME);
            if self.enabled {
                ctrl |= CTRL_ENABLE;
            }
            return (real & 0xffff) | u32::from(ctrl) << 16;
        }
        if rel == 4 {
            return self.address as u32;
        }
        if rel == 8 && self.cap.addr64 {
            return (self.address >> 32) as u32;
        }
        if rel == data {
            return u32::from(self.data);
        }
        if Some(rel) == mask {
            return u32::from(self.mask);
        }
        if Some(rel) == pending {
            return real & 1;
        }
        0
    }

    /// The guest writes `value` to the dword at `offset`, `written` being the byte lanes it
    /// wrote (the rest of `value` is what [`read`](Self::read) returned). Read-only fields
    /// ignore the write. Returns what the device must be told.
    pub fn write(&mut self, offset: u16, value: u32, written: u32) -> MsiChange {
        let rel = offset - self.offset();
        let (data, mask, _) = self.layout();
        let was_mask = self.mask;
        if rel == 0 {
            if written & 0xffff_0000 != 0 {
                self.enabled = (value >> 16) as u16 & CTRL_ENABLE != 0;
            }
        } else if rel == 4 {
            // Bits 1:0 are reserved (the address is dword-aligned).
            self.address = (self.address & !0xffff_ffff) | u64::from(value & !3);
        } else if rel == 8 && self.cap.addr64 {
            self.address = (self.address & 0xffff_ffff) | u64::from(value) << 32;
        } else if rel == data {
            // Bits 31:16 are the extended message data, absent unless Extended Message Data
            // Capable (PCIe 5.0 §7.7.1.2), which the shadow does not advertise.
            self.data = value as u16;
        } else if Some(rel) == mask {
            self.mask = value & 1 != 0;
        }
        match (self.message(), self.routed) {
            (Some(m), r) if r != Some(m) => MsiChange::Route(m),
            (None, Some(_)) => MsiChange::Unroute,
            _ if self.mask != was_mask => MsiChange::Mask(self.mask),
            _ => MsiChange::None,
        }
    }

    /// Absolute offsets of the device's real registers, for the caller that programs it:
    /// (message control, address low, address high if 64-bit, data, mask if any).
    pub fn registers(&self) -> (u16, u16, Option<u16>, u16, Option<u16>) {
        let o = self.offset();
        let (data, mask, _) = self.layout();
        (
            o + 2,
            o + 4,
            self.cap.addr64.then_some(o + 8),
            o + data,
            mask.map(|m| o + m),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(addr64: bool, pvm: bool) -> MsiCap {
        MsiCap {
            offset: 0x40,
            addr64,
            per_vector_mask: pvm,
            multiple_message_log2: 2,
        }
    }

    /// edu's real first dword: ID 05, next 0, control 0x0080 (64-bit), MMC 0 — plus a host
    /// enable bit and MMC = 4 vectors, to check the guest sees neither.
    const REAL_HEADER: u32 = 0x0081_0005 | 0b010 << 17;

    #[test]
    fn layout_matches_pci_3_0_table_6_8() {
        assert_eq!(MsiShadow::new(cap(false, false)).len(), 0x0c);
        assert_eq!(MsiShadow::new(cap(true, false)).len(), 0x10);
        assert_eq!(MsiShadow::new(cap(true, true)).len(), 0x18);
        let s = MsiShadow::new(cap(true, true));
        assert_eq!(s.registers(), (0x42, 0x44, Some(0x48), 0x4c, Some(0x50)));
        let s = MsiShadow::new(cap(false, true));
        assert_eq!(s.registers(), (0x42, 0x44, None, 0x48, Some(0x4c)));
        assert!(s.covers(0x40) && s.covers(0x50) && !s.covers(0x54) && !s.covers(0x3c));
    }

    #[test]
    fn reads_show_the_guest_values_not_the_host_ones() {
        let mut s = MsiShadow::new(cap(true, false));
        // Reset: disabled, MME 0, MMC 0, ID/next and 64-bit bit from the device.
        assert_eq!(s.read(0x40, REAL_HEADER), 0x0080_0005);
        assert_eq!(s.read(0x44, 0xfee0_0010), 0);
        assert_eq!(s.write(0x44, 0xfee0_1003, !0), MsiChange::None);
        assert_eq!(s.write(0x48, 0x1, !0), MsiChange::None);
        assert_eq!(s.write(0x4c, 0xdead_0041, !0), MsiChange::None);
        assert_eq!(s.read(0x44, 0x1234), 0xfee0_1000); // reserved bits 1:0 dropped
        assert_eq!(s.read(0x48, 0x1234), 1);
        assert_eq!(s.read(0x4c, 0x1234), 0x41); // upper 16 bits: no extended data
    }

    #[test]
    fn enable_routes_retarget_reroutes_disable_unroutes() {
        let mut s = MsiShadow::new(cap(true, false));
        s.write(0x44, 0xfee0_0000, !0);
        s.write(0x4c, 0x41, !0);
        // Enable with MME = 3 (8 vectors) asked: enabled, MME stays 0.
        let c = s.write(0x40, (1 | 3 << 4) << 16, 0xffff_0000);
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(c, MsiChange::Route(m));
        s.set_routed(Some(m));
        assert_eq!(s.read(0x40, REAL_HEADER) >> 16, 0x0081);
        // Writing the same again changes nothing.
        assert_eq!(s.write(0x4c, 0x41, !0), MsiChange::None);
        // Byte write to the ID/next bytes only: enable untouched.
        assert_eq!(s.write(0x40, 0, 0xff), MsiChange::None);
        assert!(s.message().is_some());
        // New vector while enabled: re-route.
        let c = s.write(0x4c, 0x42, 0xffff);
        let m2 = MsiMessage { data: 0x42, ..m };
        assert_eq!(c, MsiChange::Route(m2));
        s.set_routed(Some(m2));
        assert_eq!(s.write(0x40, 0, 0xffff_0000), MsiChange::Unroute);
        s.set_routed(None);
        assert_eq!(s.write(0x40, 0, 0xffff_0000), MsiChange::None);
    }

    #[test]
    fn a_failed_route_is_retried_by_the_next_write() {
        let mut s = MsiShadow::new(cap(false, false));
        s.write(0x44, 0xfee0_0000, !0);
        s.write(0x48, 0x30, !0);
        assert!(matches!(
            s.write(0x40, 1 << 16, 0xffff_0000),
            MsiChange::Route(_)
        ));
        // The caller did not record a route (refused): the next write asks again.
        assert!(matches!(s.write(0x48, 0x30, !0), MsiChange::Route(_)));
        // And disabling with nothing routed needs no unroute.
        assert_eq!(s.write(0x40, 0, 0xffff_0000), MsiChange::None);
    }

    #[test]
    fn mask_and_pending_only_for_vector_zero() {
        let mut s = MsiShadow::new(cap(true, true));
        assert_eq!(s.write(0x50, 0xffff_ffff, !0), MsiChange::Mask(true));
        assert_eq!(s.read(0x50, 0), 1);
        assert_eq!(s.read(0x54, 0xffff_ffff), 1);
        assert_eq!(s.write(0x50, 0, !0), MsiChange::Mask(false));
        // Without per-vector masking, there is no mask register: +0x10 is outside.
        let s = MsiShadow::new(cap(true, false));
        assert!(!s.covers(0x50));
    }
}

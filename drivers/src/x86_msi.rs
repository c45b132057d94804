//! The compatibility-format x86 MSI message a guest programs for its virtual local APIC
//! (Intel SDM vol 3 §11.11.1-2; AMD APM vol 2 §16.7): what the hypervisor accepts when it
//! routes an assigned device's MSI to a guest.
//!
//! Address: bits 31:20 = 0xFEE, 19:12 destination ID, 3 redirection hint, 2 destination mode
//! (0 physical), bit 4 (the VT-d remappable-format flag, VT-d 4.1 §5.1.2.2) must be 0: a
//! guest has no interrupt remapping table. Data: bits 7:0 vector, 10:8 delivery mode (000
//! fixed; 001 lowest priority is taken as fixed, one destination), 14 level, 15 trigger mode
//! (0 edge).

/// Where a guest's MSI goes: a vCPU (by its virtual APIC ID) and a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMsiTarget {
    pub apic_id: u8,
    pub vector: u8,
}

/// Why a guest's message is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMsiError {
    /// Not 0x0000_0000_FEEx_xxxx.
    NotApicWindow,
    /// Remappable format (address bit 4).
    Remappable,
    /// Logical destination mode (address bit 2).
    LogicalDestination,
    /// Delivery mode other than fixed / lowest priority (SMI, NMI, INIT, ExtINT, ...).
    DeliveryMode(u8),
    /// Level-triggered (data bit 15).
    LevelTriggered,
    /// Vectors 0-15 are reserved (SDM §6.2; the APIC treats them as illegal).
    ReservedVector(u8),
}

impl core::fmt::Display for GuestMsiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotApicWindow => f.write_str("address is not in the APIC window 0xfee00000"),
            Self::Remappable => {
                f.write_str("remappable-format address (bit 4): a guest has no IRTE")
            }
            Self::LogicalDestination => f.write_str("logical destination mode is not supported"),
            Self::DeliveryMode(m) => {
                write!(f, "delivery mode {m:#05b} (only fixed / lowest priority)")
            }
            Self::LevelTriggered => f.write_str("level-triggered MSI (edge only)"),
            Self::ReservedVector(v) => write!(f, "reserved vector {v:#x}"),
        }
    }
}

impl GuestMsiTarget {
    pub fn decode(address: u64, data: u32) -> Result<Self, GuestMsiError> {
        if address >> 20 != 0xfee {
            return Err(GuestMsiError::NotApicWindow);
        }
        if address & 1 << 4 != 0 {
            return Err(GuestMsiError::Remappable);
        }
        if address & 1 << 2 != 0 {
            return Err(GuestMsiError::LogicalDestination);
        }
        let mode = ((data >> 8) & 7) as u8;
        if mode > 1 {
            return Err(GuestMsiError::DeliveryMode(mode));
        }
        if data & 1 << 15 != 0 {
            return Err(GuestMsiError::LevelTriggered);
        }
        let vector = data as u8;
        if vector < 16 {
            return Err(GuestMsiError::ReservedVector(vector));
        }
        Ok(GuestMsiTarget {
            apic_id: (address >> 12) as u8,
            vector,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_sdm_layout() {
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_1000, 0x41),
            Ok(GuestMsiTarget {
                apic_id: 1,
                vector: 0x41
            })
        );
        // Lowest priority (001) with redirection hint is one destination here.
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_0008, 0x0151),
            Ok(GuestMsiTarget {
                apic_id: 0,
                vector: 0x51
            })
        );
    }

    #[test]
    fn refuses_what_a_guest_may_not_ask_for() {
        use GuestMsiError::*;
        assert_eq!(
            GuestMsiTarget::decode(0x1_fee0_0000, 0x41),
            Err(NotApicWindow)
        );
        assert_eq!(
            GuestMsiTarget::decode(0xfed0_0000, 0x41),
            Err(NotApicWindow)
        );
        assert_eq!(GuestMsiTarget::decode(0xfee0_0010, 0x41), Err(Remappable));
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_0004, 0x41),
            Err(LogicalDestination)
        );
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_0000, 0x0441),
            Err(DeliveryMode(4))
        ); // NMI
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_0000, 0x0541),
            Err(DeliveryMode(5))
        ); // INIT
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_0000, 0x8041),
            Err(LevelTriggered)
        );
        assert_eq!(
            GuestMsiTarget::decode(0xfee0_0000, 0x0f),
            Err(ReservedVector(0xf))
        );
    }
}

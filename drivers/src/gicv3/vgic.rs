//! The GICv3 virtual CPU interface as the hypervisor drives it for its EL1 guests (IHI 0069
//! ch. 6 "Virtual interrupt handling and prioritization", §12.4 the ICH_* registers): the
//! list-register encoding, the set of virtual interrupts a vCPU has pending beyond its list
//! registers, and the refill of the list registers from that set. Pure logic: the kernel's
//! EL1 backend reads and writes the ICH_* system registers and calls this in between.
//!
//! What a guest can be given: virtual INTIDs below [`MAX_VINTID`] (SGIs/PPIs 0-31, of which
//! the hypervisor only injects the virtual timer, and "virtual SPIs" 32-127 that assigned
//! devices' MSIs name, docs/guests.md). Every virtual interrupt is Group 1.

use core::sync::atomic::{AtomicU64, Ordering};

/// Virtual INTIDs a vCPU can have pending: 0..128 (two 64-bit words).
pub const MAX_VINTID: u32 = 128;
/// The first virtual INTID an assigned device's MSI may name (the SPI range).
pub const FIRST_MSI_VINTID: u32 = 32;

/// ICH_LR<n>_EL2 fields (IHI 0069 §12.4.6).
pub mod lr {
    /// State, bits 63:62: 0b00 invalid, 0b01 pending, 0b10 active, 0b11 pending and active.
    pub const STATE_SHIFT: u32 = 62;
    pub const STATE_PENDING: u64 = 0b01 << STATE_SHIFT;
    pub const STATE_ACTIVE: u64 = 0b10 << STATE_SHIFT;
    pub const STATE_MASK: u64 = 0b11 << STATE_SHIFT;
    /// HW, bit 61: the virtual interrupt is linked to physical INTID pINTID, which the GIC
    /// deactivates when the guest deactivates the virtual one.
    pub const HW: u64 = 1 << 61;
    /// Group, bit 60: Group 1.
    pub const GROUP1: u64 = 1 << 60;
    /// Priority, bits 55:48.
    pub const PRIORITY_SHIFT: u32 = 48;
    /// pINTID, bits 44:32 (with HW = 1).
    pub const PINTID_SHIFT: u32 = 32;
    pub const PINTID_MASK: u64 = 0x1fff << PINTID_SHIFT;
    /// EOI, bit 41 (with HW = 0): a maintenance interrupt when the guest deactivates it.
    pub const EOI: u64 = 1 << 41;
    /// vINTID, bits 31:0.
    pub const VINTID_MASK: u64 = 0xffff_ffff;
}

/// ICH_HCR_EL2 bits (IHI 0069 §12.4.3).
pub mod hcr {
    /// En: the virtual CPU interface is enabled.
    pub const EN: u64 = 1 << 0;
    /// UIE: a maintenance interrupt while at most one list register holds a valid entry.
    pub const UIE: u64 = 1 << 1;
}

/// A list register's state field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrState {
    Invalid,
    Pending,
    Active,
    PendingActive,
}

/// Encodes a list register: Group 1, `priority` (the upper bits the implementation has count),
/// pending. `hw` links it to physical INTID `pintid`, which must then be active at the
/// physical GIC until the guest deactivates the virtual interrupt. Returns `None` for a vINTID
/// the hypervisor never injects or a pINTID outside the 13-bit field.
pub fn encode(vintid: u32, priority: u8, hw: Option<u32>) -> Option<u64> {
    if vintid >= MAX_VINTID {
        return None;
    }
    let mut v = lr::STATE_PENDING
        | lr::GROUP1
        | u64::from(priority) << lr::PRIORITY_SHIFT
        | u64::from(vintid);
    if let Some(p) = hw {
        // pINTIDs 1020-1023 are special and the field is 13 bits (§12.4.6).
        if p >= 1020 {
            return None;
        }
        v |= lr::HW | u64::from(p) << lr::PINTID_SHIFT;
    }
    Some(v)
}

pub fn state(lr: u64) -> LrState {
    match (lr & lr::STATE_MASK) >> lr::STATE_SHIFT {
        0 => LrState::Invalid,
        1 => LrState::Pending,
        2 => LrState::Active,
        _ => LrState::PendingActive,
    }
}

pub fn vintid(lr: u64) -> u32 {
    (lr & lr::VINTID_MASK) as u32
}

/// Virtual INTIDs waiting for a list register, set from interrupt context on any CPU (an LPI
/// handler) and taken by the CPU that runs the vCPU. One bit per INTID: an interrupt that
/// arrives again while it is still pending merges, as a level or an LPI's pending bit does.
pub struct PendingSet([AtomicU64; 2]);

impl Default for PendingSet {
    fn default() -> Self {
        Self::new()
    }
}

impl PendingSet {
    pub const fn new() -> PendingSet {
        PendingSet([AtomicU64::new(0), AtomicU64::new(0)])
    }

    /// Marks `vintid` pending; `false` if it is out of range. Release: pairs with the Acquire
    /// of [`PendingSet::take`], so the vCPU sees whatever the injector recorded before.
    pub fn raise(&self, vintid: u32) -> bool {
        if vintid >= MAX_VINTID {
            return false;
        }
        self.0[(vintid / 64) as usize].fetch_or(1 << (vintid % 64), Ordering::Release);
        true
    }

    /// Takes the lowest pending INTID (clears its bit).
    pub fn take(&self) -> Option<u32> {
        for (w, word) in self.0.iter().enumerate() {
            let mut cur = word.load(Ordering::Acquire);
            while cur != 0 {
                let bit = cur.trailing_zeros();
                match word.compare_exchange_weak(
                    cur,
                    cur & !(1 << bit),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(w as u32 * 64 + bit),
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    pub fn contains(&self, vintid: u32) -> bool {
        vintid < MAX_VINTID
            && self.0[(vintid / 64) as usize].load(Ordering::Acquire) & (1 << (vintid % 64)) != 0
    }

    /// Forgets everything (the vCPU is gone).
    pub fn clear(&self) {
        for w in &self.0 {
            w.store(0, Ordering::Release);
        }
    }
}

/// How the hypervisor encodes one virtual INTID it delivers: its priority and, for the
/// virtual timer, the physical PPI it is linked to.
pub trait Encoding {
    fn encode(&self, vintid: u32) -> Option<u64>;
}

/// Moves pending INTIDs of `set` into the list registers `lrs` (the saved images of the
/// implemented ones): an INTID already in a list register as active becomes pending and
/// active there; otherwise it takes an invalid list register. What does not fit stays in
/// `set`. Returns how many INTIDs were placed. The caller sets ICH_HCR_EL2.UIE when `set` is
/// still not empty, so the guest's completions bring it back to refill.
pub fn refill(lrs: &mut [u64], set: &PendingSet, enc: &impl Encoding) -> usize {
    let mut placed = 0;
    let mut left_over = [0u32; MAX_VINTID as usize];
    let mut n_left = 0;
    while let Some(v) = set.take() {
        // Already in a list register: pending there (or pending+active) needs nothing more.
        if let Some(i) = lrs
            .iter()
            .position(|&l| state(l) != LrState::Invalid && vintid(l) == v)
        {
            if state(lrs[i]) == LrState::Active {
                lrs[i] |= lr::STATE_PENDING;
                placed += 1;
            }
            continue;
        }
        match (
            lrs.iter().position(|&l| state(l) == LrState::Invalid),
            enc.encode(v),
        ) {
            (Some(i), Some(l)) => {
                lrs[i] = l;
                placed += 1;
            }
            // Out of list registers: it stays pending for the next refill.
            (None, Some(_)) => {
                left_over[n_left] = v;
                n_left += 1;
            }
            // Nothing to encode it as: dropped (never raised by the hypervisor).
            (_, None) => {}
        }
    }
    for &v in &left_over[..n_left] {
        set.raise(v);
    }
    placed
}

/// ICH_VTR_EL2.ListRegs (bits 4:0): the number of implemented list registers minus one.
pub fn list_registers(vtr: u64) -> usize {
    (vtr & 0x1f) as usize + 1
}

/// ICH_VTR_EL2.PRIbits (bits 31:29): priority bits minus one. The list-register priority
/// field keeps the upper bits only.
pub fn priority_bits(vtr: u64) -> u32 {
    ((vtr >> 29) & 7) as u32 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;
    impl Encoding for Plain {
        fn encode(&self, v: u32) -> Option<u64> {
            encode(v, 0xa0, (v == 27).then_some(27))
        }
    }

    #[test]
    fn list_register_bits_follow_the_spec_layout() {
        // IHI 0069 §12.4.6: State 63:62, HW 61, Group 60, Priority 55:48, pINTID 44:32,
        // vINTID 31:0. Written out by hand: pending (0b01<<62), group 1, priority 0xa0, vINTID 40.
        assert_eq!(
            encode(40, 0xa0, None),
            Some(0x5000_0000_0000_0000 | 0x00a0_0000_0000_0000 | 40)
        );
        // The timer: HW with pINTID 27.
        assert_eq!(
            encode(27, 0x80, Some(27)),
            Some(0x4000_0000_0000_0000 | 1 << 61 | 1 << 60 | 0x80 << 48 | 27 << 32 | 27)
        );
        assert_eq!(encode(MAX_VINTID, 0, None), None);
        assert_eq!(encode(27, 0, Some(1023)), None);
        assert_eq!(state(0), LrState::Invalid);
        assert_eq!(state(1 << 62), LrState::Pending);
        assert_eq!(state(2 << 62), LrState::Active);
        assert_eq!(state(3 << 62), LrState::PendingActive);
        assert_eq!(vintid(0xc000_0000_0000_0029), 41);
        // QEMU TCG's ICH_VTR_EL2 (0x90b80003): 4 list registers, 5 priority bits.
        assert_eq!(list_registers(0x90b8_0003), 4);
        assert_eq!(priority_bits(0x90b8_0003), 5);
    }

    #[test]
    fn pending_set_merges_and_takes_lowest_first() {
        let s = PendingSet::new();
        assert!(s.is_empty());
        assert!(s.raise(100));
        assert!(s.raise(33));
        assert!(s.raise(33));
        assert!(!s.raise(128));
        assert!(s.contains(100) && s.contains(33) && !s.contains(34));
        assert_eq!(s.take(), Some(33));
        assert_eq!(s.take(), Some(100));
        assert_eq!(s.take(), None);
        assert!(s.is_empty());
    }

    #[test]
    fn refill_fills_invalid_registers_and_keeps_the_rest_pending() {
        let s = PendingSet::new();
        for v in [27, 32, 33, 34, 35, 36] {
            s.raise(v);
        }
        // One LR busy with an active vINTID 50.
        let mut lrs = [0u64, encode(50, 0xa0, None).unwrap() ^ (0b11 << 62), 0, 0];
        assert_eq!(state(lrs[1]), LrState::Active);
        assert_eq!(refill(&mut lrs, &s, &Plain), 3);
        assert_eq!(vintid(lrs[0]), 27);
        assert_ne!(lrs[0] & lr::HW, 0);
        assert_eq!(vintid(lrs[2]), 32);
        assert_eq!(vintid(lrs[3]), 33);
        assert_eq!(vintid(lrs[1]), 50);
        // 34, 35, 36 did not fit and are still pending, none lost.
        assert_eq!(
            (s.take(), s.take(), s.take(), s.take()),
            (Some(34), Some(35), Some(36), None)
        );
    }

    #[test]
    fn refill_marks_an_active_interrupt_pending_again() {
        let s = PendingSet::new();
        s.raise(40);
        let active = (encode(40, 0xa0, None).unwrap() & !lr::STATE_MASK) | lr::STATE_ACTIVE;
        let mut lrs = [active, 0];
        assert_eq!(refill(&mut lrs, &s, &Plain), 1);
        assert_eq!(state(lrs[0]), LrState::PendingActive);
        assert_eq!(lrs[1], 0);
        // Pending already: merges, nothing placed.
        s.raise(40);
        assert_eq!(refill(&mut lrs, &s, &Plain), 0);
        assert!(s.is_empty());
    }
}

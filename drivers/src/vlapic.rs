//! A virtual local APIC in x2APIC mode, minimal enough for a guest that uses MSIs and the
//! APIC timer: the register logic only (no hardware), so it is host-tested. The SVM backend
//! (`kernel/src/vcpu/svm/`) owns one per vCPU, feeds it the guest's x2APIC MSR accesses and
//! the posted interrupts, and injects what [`VirtualLapic::pending`] returns.
//!
//! Registers (Intel SDM vol 3 §11.12.1.2, Table 11-6: x2APIC MSR address = 0x800 + MMIO
//! offset >> 4): APIC ID 0x802 (RO), version 0x803, TPR 0x808, PPR 0x80A (RO), EOI 0x80B (WO),
//! LDR 0x80D (RO, derived from the ID, §11.12.10.2), SVR 0x80F, ISR 0x810-0x817, TMR
//! 0x818-0x81F, IRR 0x820-0x827 (RO), ESR 0x828, ICR 0x830 (self only), the LVT entries
//! 0x82F and 0x832-0x837, initial count 0x838, current count 0x839 (RO), divide
//! configuration 0x83E, SELF IPI 0x83F (WO).
//!
//! Priorities (§11.8.3.1): PPR = TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4] << 4; the highest
//! IRR vector is delivered only when its class (bits 7:4) is above PPR[7:4]. EOI clears the
//! highest ISR bit (§11.8.5). The timer (§11.5.4) counts down once every `divide` time units
//! of the caller's clock (the host TSC); one-shot and periodic; TSC-deadline mode is not
//! offered (CPUID hides it), so that mode never fires.

/// x2APIC MSR numbers.
pub mod msr {
    pub const APIC_BASE: u32 = 0x1b;
    pub const ID: u32 = 0x802;
    pub const VERSION: u32 = 0x803;
    pub const TPR: u32 = 0x808;
    pub const PPR: u32 = 0x80a;
    pub const EOI: u32 = 0x80b;
    pub const LDR: u32 = 0x80d;
    pub const SVR: u32 = 0x80f;
    pub const ISR0: u32 = 0x810;
    pub const TMR0: u32 = 0x818;
    pub const IRR0: u32 = 0x820;
    pub const ESR: u32 = 0x828;
    pub const LVT_CMCI: u32 = 0x82f;
    pub const ICR: u32 = 0x830;
    pub const LVT_TIMER: u32 = 0x832;
    pub const LVT_ERROR: u32 = 0x837;
    pub const INITIAL_COUNT: u32 = 0x838;
    pub const CURRENT_COUNT: u32 = 0x839;
    pub const DIVIDE: u32 = 0x83e;
    pub const SELF_IPI: u32 = 0x83f;
}

/// Version register: version 0x14 (integrated APIC), max LVT entry 6 (CMCI ... error).
pub const VERSION: u32 = 0x0006_0014;
const LVT_MASK: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const TIMER_PERIODIC: u32 = 0b01 << 17;
const TIMER_MODE: u32 = 0b11 << 17;

/// Why an MSR access is refused (the caller stops the guest: QEMU's SVM cannot inject #GP
/// with its error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// Not an x2APIC register this model has.
    Unknown(u32),
    /// A write to a read-only register.
    ReadOnly(u32),
    /// An IPI to another CPU (only self-IPIs are modelled).
    Ipi(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualLapic {
    id: u32,
    irr: [u64; 4],
    isr: [u64; 4],
    tpr: u32,
    svr: u32,
    /// CMCI, timer, thermal, performance, LINT0, LINT1, error (0x82F, 0x832-0x837).
    lvt: [u32; 7],
    initial: u32,
    divide_reg: u32,
    /// Timer: when it next fires and its period (clock units); `None` when stopped.
    deadline: Option<u64>,
    period: u64,
    /// Timer interrupts raised (for the hypervisor's report).
    pub timer_fired: u64,
}

fn highest(bits: &[u64; 4]) -> Option<u8> {
    (0..4)
        .rev()
        .find(|&w| bits[w] != 0)
        .map(|w| (w * 64 + 63 - bits[w].leading_zeros() as usize) as u8)
}

fn set(bits: &mut [u64; 4], v: u8) {
    bits[usize::from(v / 64)] |= 1 << (v % 64);
}

fn clear(bits: &mut [u64; 4], v: u8) {
    bits[usize::from(v / 64)] &= !(1 << (v % 64));
}

impl VirtualLapic {
    /// The reset state (§11.4.7.1): SVR 0xFF (software-disabled), every LVT masked.
    pub const fn new(id: u32) -> Self {
        VirtualLapic {
            id,
            irr: [0; 4],
            isr: [0; 4],
            tpr: 0,
            svr: 0xff,
            lvt: [LVT_MASK; 7],
            initial: 0,
            divide_reg: 0,
            deadline: None,
            period: 0,
            timer_fired: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Divide configuration (§11.5.4, Figure 11-10): bits 3 and 1:0; 0b111 is 1.
    fn divisor(&self) -> u64 {
        let v = (self.divide_reg >> 1 & 4) | (self.divide_reg & 3);
        if v == 7 { 1 } else { 2 << v }
    }

    fn lvt_index(msr: u32) -> Option<usize> {
        match msr {
            msr::LVT_CMCI => Some(0),
            0x832..=0x837 => Some((msr - 0x832 + 1) as usize),
            _ => None,
        }
    }

    pub fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The vector to deliver now, if any (not yet accepted: call [`accept`](Self::accept) when
    /// it is injected).
    pub fn pending(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// Whether any vector is requested at all (a halted vCPU wakes for one it can take).
    pub fn has_requests(&self) -> bool {
        self.irr.iter().any(|&w| w != 0)
    }

    /// The injected vector moves from IRR to ISR (§11.8.4).
    pub fn accept(&mut self, v: u8) {
        clear(&mut self.irr, v);
        set(&mut self.isr, v);
    }

    /// A vector requested (an MSI, a self-IPI, the timer). Vectors 0-15 are illegal (§11.5.3)
    /// and dropped.
    pub fn request(&mut self, v: u8) {
        if v >= 16 {
            set(&mut self.irr, v);
        }
    }

    /// Vectors posted by host interrupt handlers, merged into IRR.
    pub fn request_bits(&mut self, bits: [u64; 4]) {
        for (i, b) in bits.into_iter().enumerate() {
            self.irr[i] |= if i == 0 { b & !0xffff } else { b };
        }
    }

    pub fn eoi(&mut self) {
        if let Some(v) = highest(&self.isr) {
            clear(&mut self.isr, v);
        }
    }

    /// When the timer next fires, in clock units.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Fires the timer if its deadline passed at `now`: its vector requested once (a real
    /// APIC's IRR bit coalesces missed periods too); a periodic timer re-arms one period after
    /// the deadline, or after `now` if it fell more than a period behind.
    pub fn tick(&mut self, now: u64) {
        let Some(d) = self.deadline.filter(|&d| now >= d) else {
            return;
        };
        let lvt = self.lvt[1];
        if lvt & LVT_MASK == 0 && self.enabled() {
            self.request(lvt as u8);
            self.timer_fired += 1;
        }
        self.deadline = if lvt & TIMER_MODE == TIMER_PERIODIC && self.period != 0 {
            let next = d.saturating_add(self.period);
            Some(if next > now { next } else { now + self.period })
        } else {
            None
        };
    }

    pub fn read_msr(&self, m: u32, now: u64) -> Result<u64, ApicError> {
        let chunk = |bits: &[u64; 4], n: u32| (bits[(n / 2) as usize] >> (32 * (n % 2))) as u32;
        let v = match m {
            msr::ID => self.id,
            msr::VERSION => VERSION,
            msr::TPR => self.tpr,
            msr::PPR => self.ppr(),
            msr::LDR => (self.id >> 4) << 16 | 1 << (self.id & 0xf),
            msr::SVR => self.svr,
            0x810..=0x817 => chunk(&self.isr, m - msr::ISR0),
            0x818..=0x81f => 0, // edge only: TMR stays clear
            0x820..=0x827 => chunk(&self.irr, m - msr::IRR0),
            msr::ESR => 0,
            msr::ICR => 0,
            msr::INITIAL_COUNT => self.initial,
            msr::CURRENT_COUNT => match self.deadline {
                Some(d) if d > now => {
                    ((d - now).div_ceil(self.divisor())).min(u64::from(u32::MAX)) as u32
                }
                _ => 0,
            },
            msr::DIVIDE => self.divide_reg,
            _ => match Self::lvt_index(m) {
                Some(i) => self.lvt[i],
                None => return Err(ApicError::Unknown(m)),
            },
        };
        Ok(u64::from(v))
    }

    pub fn write_msr(&mut self, m: u32, value: u64, now: u64) -> Result<(), ApicError> {
        let v = value as u32;
        match m {
            msr::TPR => self.tpr = v & 0xff,
            msr::EOI => self.eoi(),
            msr::SVR => {
                self.svr = v & (0xff | SVR_ENABLE);
                if !self.enabled() {
                    // §11.4.7.2: software-disabling sets every LVT mask bit.
                    for l in &mut self.lvt {
                        *l |= LVT_MASK;
                    }
                }
            }
            msr::ESR => {}
            msr::ICR => {
                // Fixed delivery to self: shorthand 01, or no shorthand and our own ID.
                let shorthand = (value >> 18) & 3;
                let fixed = (value >> 8) & 7 == 0;
                if fixed
                    && (shorthand == 1 || (shorthand == 0 && value >> 32 == u64::from(self.id)))
                {
                    self.request(v as u8);
                } else {
                    return Err(ApicError::Ipi(value));
                }
            }
            msr::SELF_IPI => self.request(v as u8),
            msr::INITIAL_COUNT => {
                self.initial = v;
                if v == 0 {
                    self.deadline = None;
                } else {
                    let span = u64::from(v) * self.divisor();
                    self.period = span;
                    self.deadline = Some(now + span);
                }
            }
            msr::DIVIDE => self.divide_reg = v & 0b1011,
            msr::ID | msr::VERSION | msr::PPR | msr::LDR | msr::CURRENT_COUNT => {
                return Err(ApicError::ReadOnly(m));
            }
            0x810..=0x827 => return Err(ApicError::ReadOnly(m)),
            _ => match Self::lvt_index(m) {
                Some(i) => {
                    let mut v = v & (0xff | 0x7 << 8 | 1 << 13 | 1 << 15 | LVT_MASK | TIMER_MODE);
                    if !self.enabled() {
                        v |= LVT_MASK;
                    }
                    self.lvt[i] = v;
                }
                None => return Err(ApicError::Unknown(m)),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> VirtualLapic {
        let mut a = VirtualLapic::new(1);
        a.write_msr(msr::SVR, 0x1ff, 0).unwrap();
        a
    }

    #[test]
    fn nothing_is_delivered_while_software_disabled() {
        let mut a = VirtualLapic::new(0);
        a.request(0x41);
        assert_eq!(a.pending(), None);
        a.write_msr(msr::SVR, 0x1ff, 0).unwrap();
        assert_eq!(a.pending(), Some(0x41));
    }

    #[test]
    fn highest_vector_first_and_priority_class_blocks_until_eoi() {
        let mut a = enabled();
        a.request(0x41);
        a.request(0x52);
        a.request(0x45);
        assert_eq!(a.pending(), Some(0x52));
        a.accept(0x52);
        // 0x45 and 0x41 are of class 4 < 5: blocked while 0x52 is in service.
        assert_eq!(a.pending(), None);
        assert_eq!(a.read_msr(msr::PPR, 0), Ok(0x50));
        assert_eq!(a.read_msr(msr::ISR0 + 2, 0), Ok(1 << (0x52 - 0x40)));
        a.write_msr(msr::EOI, 0, 0).unwrap();
        assert_eq!(a.pending(), Some(0x45));
        a.accept(0x45);
        // Same class as in service: blocked too (strictly higher class needed).
        assert_eq!(a.pending(), None);
        a.eoi();
        assert_eq!(a.pending(), Some(0x41));
        // A higher class nests.
        a.accept(0x41);
        a.request(0x61);
        assert_eq!(a.pending(), Some(0x61));
    }

    #[test]
    fn tpr_masks_classes_at_or_below_it() {
        let mut a = enabled();
        a.write_msr(msr::TPR, 0x50, 0).unwrap();
        a.request(0x55);
        assert_eq!(a.pending(), None);
        a.request(0x61);
        assert_eq!(a.pending(), Some(0x61));
        assert_eq!(a.read_msr(msr::IRR0 + 2, 0), Ok(1 << 0x15));
        assert_eq!(a.read_msr(msr::IRR0 + 3, 0), Ok(1 << 1));
    }

    #[test]
    fn eoi_clears_the_highest_in_service_only() {
        let mut a = enabled();
        a.accept(0x30);
        a.accept(0x80);
        a.eoi();
        assert_eq!(a.read_msr(msr::ISR0 + 4, 0), Ok(0));
        assert_eq!(a.read_msr(msr::ISR0 + 1, 0), Ok(1 << 16));
    }

    #[test]
    fn illegal_vectors_and_posted_low_bits_are_dropped() {
        let mut a = enabled();
        a.request(7);
        a.request_bits([0xffff, 0, 0, 0]);
        assert!(!a.has_requests());
        a.request_bits([0, 0, 0, 1 << 63]);
        assert_eq!(a.pending(), Some(0xff));
    }

    #[test]
    fn one_shot_timer_with_divide_by_4() {
        let mut a = enabled();
        a.write_msr(msr::LVT_TIMER, 0xec, 0).unwrap();
        a.write_msr(msr::DIVIDE, 0b0001, 0).unwrap(); // divide by 4
        a.write_msr(msr::INITIAL_COUNT, 100, 1000).unwrap();
        assert_eq!(a.deadline(), Some(1400));
        assert_eq!(a.read_msr(msr::CURRENT_COUNT, 1200), Ok(50));
        a.tick(1399);
        assert_eq!(a.pending(), None);
        a.tick(1400);
        assert_eq!(a.pending(), Some(0xec));
        assert_eq!(a.deadline(), None);
        assert_eq!(a.read_msr(msr::CURRENT_COUNT, 1500), Ok(0));
        assert_eq!(a.timer_fired, 1);
    }

    #[test]
    fn periodic_timer_rearms_and_coalesces() {
        let mut a = enabled();
        a.write_msr(msr::DIVIDE, 0b1011, 0).unwrap(); // divide by 1
        a.write_msr(msr::LVT_TIMER, 0x2_00ec, 0).unwrap(); // periodic
        a.write_msr(msr::INITIAL_COUNT, 10, 0).unwrap();
        a.tick(10);
        assert_eq!(a.deadline(), Some(20));
        a.tick(95); // far behind: one interrupt, next one period after now
        assert_eq!(a.deadline(), Some(105));
        assert_eq!(a.timer_fired, 2);
        a.write_msr(msr::INITIAL_COUNT, 0, 100).unwrap();
        assert_eq!(a.deadline(), None);
    }

    #[test]
    fn masked_timer_counts_but_does_not_interrupt() {
        let mut a = enabled();
        a.write_msr(msr::LVT_TIMER, 0x1_00ec, 0).unwrap();
        a.write_msr(msr::DIVIDE, 0b1011, 0).unwrap();
        a.write_msr(msr::INITIAL_COUNT, 5, 0).unwrap();
        a.tick(5);
        assert!(!a.has_requests());
    }

    #[test]
    fn registers_and_refusals() {
        let mut a = enabled();
        assert_eq!(a.read_msr(msr::ID, 0), Ok(1));
        assert_eq!(a.read_msr(msr::LDR, 0), Ok(0b10));
        assert_eq!(a.read_msr(msr::VERSION, 0), Ok(u64::from(VERSION)));
        assert_eq!(
            a.write_msr(msr::ID, 5, 0),
            Err(ApicError::ReadOnly(msr::ID))
        );
        assert_eq!(a.read_msr(0x8ff, 0), Err(ApicError::Unknown(0x8ff)));
        // Self IPI by the SELF IPI register and by ICR shorthand; an IPI to APIC ID 0 refused.
        a.write_msr(msr::SELF_IPI, 0x33, 0).unwrap();
        a.write_msr(msr::ICR, 1 << 18 | 0x34, 0).unwrap();
        assert_eq!(a.read_msr(msr::IRR0 + 1, 0), Ok(0b11 << 0x13));
        assert_eq!(a.write_msr(msr::ICR, 0x35, 0), Err(ApicError::Ipi(0x35)));
        // Software-disable masks every LVT.
        a.write_msr(msr::LVT_TIMER, 0xec, 0).unwrap();
        a.write_msr(msr::SVR, 0xff, 0).unwrap();
        assert_eq!(a.read_msr(msr::LVT_TIMER, 0), Ok(0x1_00ec));
    }
}

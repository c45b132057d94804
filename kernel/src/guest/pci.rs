//! A guest's view of PCI configuration space through configuration mechanism #1 (ports 0xCF8 /
//! 0xCFC-0xCFF, PCI Local Bus 3.0 §3.2.2.3.2), mediated by the hypervisor:
//!
//! - only the guest's own functions exist; every other address reads all ones and ignores
//!   writes, so the guest cannot see or reach another guest's (or the hypervisor's) devices;
//! - reads of its functions return the real registers (IDs, class, capabilities, BARs), except
//!   that a BAR being sized (all ones written) returns its size mask, and the expansion ROM BAR
//!   reads 0 (no ROM is mapped);
//! - writes: COMMAND may change Memory Space, Bus Master and INTx Disable only; a BAR accepts
//!   only the sizing pattern and its own current address (it cannot be moved, so it can never
//!   overlap memory the guest does not own); everything else is ignored, MSI-X included;
//! - the MSI capability (cap ID 0x05) is a shadow ([`drivers::pci::MsiShadow`]): the guest
//!   reads back its own address/data/enable, never the host's; when its effective MSI changes
//!   the device's MSI is disabled at once, and [`GuestPci::take_msi_work`] /
//!   [`GuestPci::finish_msi_work`] route it through `guest::msi` with the guest's lock released
//!   (routing takes the IOMMU owner, which the fault drain holds while it takes the guest's
//!   lock) and program the device with the host message.
//!
//! Only segment 0 is reachable this way (the mechanism has no segment field).

use alloc::vec::Vec;

use drivers::pci::{Bdf, ConfigSpace, MsiChange, MsiMessage, MsiShadow, reg};

use super::msi::{self, GuestMsi, HostMsi};

use crate::discovery::Platform;

/// COMMAND bits a guest may change: Memory Space, Bus Master, INTx Disable (PCIe 5.0 §7.5.1.1.3).
const GUEST_COMMAND_BITS: u32 = 1 << 1 | 1 << 2 | 1 << 10;
const EXPANSION_ROM: u16 = 0x30;

/// One function of the guest.
struct Function {
    bdf: Bdf,
    /// Size of each memory BAR (0: none / I/O / upper half).
    bar_sizes: [u64; 6],
    /// The guest wrote all ones to this BAR register and has not written anything else since.
    sizing: [bool; 6],
    segment: u16,
    /// The MSI shadow: `None` until the first access looks the capability up, then
    /// `Some(None)` for a function without MSI.
    msi: Option<Option<MsiShadow>>,
    /// A route for this message is being made with the lock released.
    msi_busy: bool,
    /// The last message the route refused (not asked again until the guest changes it).
    msi_refused: Option<MsiMessage>,
}

/// A route to make or remove with the guest's lock released ([`GuestPci::take_msi_work`]).
pub struct MsiWork {
    function: usize,
    pub device: msi::Device,
    /// `Some`: route this message; `None`: remove the route.
    pub want: Option<MsiMessage>,
}

impl MsiWork {
    /// Makes or removes the route (takes the IOMMU owner: call with the guest's lock
    /// released).
    pub fn run(&self) -> Option<Result<HostMsi, alloc::string::String>> {
        match self.want {
            Some(m) => Some(msi::route(
                self.device,
                GuestMsi {
                    address: m.address,
                    data: m.data,
                },
            )),
            None => {
                msi::unroute(self.device);
                None
            }
        }
    }
}

/// The guest's configuration-space state: the address latch and its functions.
pub struct GuestPci {
    latch: u32,
    /// The owning guest's index (what its MSI routes are recorded against).
    guest: usize,
    functions: Vec<Function>,
}

/// What the guest's port access did.
pub enum Access {
    /// Not a configuration-mechanism port: the guest may not touch it.
    NotConfig,
    /// Handled; for a read, the value.
    Done(Option<u32>),
}

impl GuestPci {
    /// `functions`: (segment, BDF, BAR sizes) of the guest's devices. Functions outside segment 0
    /// are unreachable through this mechanism.
    pub fn new(guest: usize, functions: &[(u16, Bdf, [u64; 6])]) -> GuestPci {
        GuestPci {
            latch: 0,
            guest,
            functions: functions
                .iter()
                .filter(|(seg, _, _)| *seg == 0)
                .map(|&(segment, bdf, bar_sizes)| Function {
                    bdf,
                    bar_sizes,
                    sizing: [false; 6],
                    segment,
                    msi: None,
                    msi_busy: false,
                    msi_refused: None,
                })
                .collect(),
        }
    }

    /// One port access of `size` bytes.
    pub fn access(
        &mut self,
        platform: &Platform,
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    ) -> Access {
        match (port, size) {
            (0xcf8, 4) => {
                if write {
                    self.latch = value;
                    return Access::Done(None);
                }
                return Access::Done(Some(self.latch));
            }
            (0xcfc..=0xcff, _) if u16::from(size) <= 4 - (port - 0xcfc) => {}
            _ => return Access::NotConfig,
        }
        let byte = u32::from(port - 0xcfc);
        let mask = if size == 4 {
            u32::MAX
        } else {
            (1u32 << (8 * u32::from(size))) - 1
        };
        let l = self.latch;
        let bdf = Bdf {
            bus: (l >> 16) as u8,
            device: ((l >> 11) & 0x1f) as u8,
            function: ((l >> 8) & 7) as u8,
        };
        let offset = (l & 0xfc) as u16;
        let Some(seg) = platform.segments.iter().find(|s| s.segment == 0) else {
            return Access::Done((!write).then_some(mask));
        };
        let found = self.functions.iter_mut().find(|f| f.bdf == bdf);
        let (Some(f), true) = (found, l & (1 << 31) != 0) else {
            // Not the guest's: absent.
            return Access::Done((!write).then_some(mask));
        };
        if f.msi.is_none() {
            f.msi = Some(
                seg.devices
                    .get(bdf)
                    .and_then(|d| d.caps.msi)
                    .map(MsiShadow::new),
            );
        }
        let current = read(f, &seg.ecam, offset);
        if !write {
            return Access::Done(Some((current >> (8 * byte)) & mask));
        }
        // Merge the written bytes into the dword, then apply the rules to the whole register.
        let shifted = (value & mask) << (8 * byte);
        let merged = (current & !(mask << (8 * byte))) | shifted;
        write_reg(f, &seg.ecam, offset, merged, mask << (8 * byte));
        Access::Done(None)
    }
}

impl GuestPci {
    /// One access of `size` bytes at `offset` into the guest's ECAM window (PCIe 5.0 §7.2.2:
    /// bus << 20 | device << 15 | function << 12 | register), with the same mediation as the
    /// port mechanism: the access is turned into the equivalent 0xCF8/0xCFC pair (segment 0,
    /// extended registers above 0xFF read all ones). `None` for an access no configuration
    /// cycle can express (misaligned, wider than 4 bytes).
    pub fn ecam_access(
        &mut self,
        platform: &Platform,
        offset: u64,
        size: u8,
        write: bool,
        value: u32,
    ) -> Option<Option<u32>> {
        if !matches!(size, 1 | 2 | 4)
            || !offset.is_multiple_of(u64::from(size))
            || offset >= 1 << 28
        {
            return None;
        }
        let reg = offset & 0xfff;
        if reg > 0xff {
            let all = if size == 4 {
                u32::MAX
            } else {
                (1 << (8 * u32::from(size))) - 1
            };
            return Some((!write).then_some(all));
        }
        let saved = self.latch;
        self.latch = 1 << 31
            | ((offset >> 20) as u32 & 0xff) << 16
            | ((offset >> 12) as u32 & 0xff) << 8
            | reg as u32 & 0xfc;
        let result = self.access(platform, 0xcfc + (reg as u16 & 3), size, write, value);
        self.latch = saved;
        match result {
            Access::Done(v) => Some(v),
            Access::NotConfig => None,
        }
    }
}

fn bar_index(offset: u16) -> Option<usize> {
    (0x10..0x28)
        .contains(&offset)
        .then(|| usize::from((offset - reg::BAR0) / 4))
}

fn read(f: &Function, cfg: &impl ConfigSpace, offset: u16) -> u32 {
    if offset == EXPANSION_ROM {
        return 0;
    }
    if let Some(Some(m)) = &f.msi
        && m.covers(offset)
    {
        return m.read(offset, cfg.read32(f.bdf, offset));
    }
    if let Some(i) = bar_index(offset)
        && f.sizing[i]
    {
        return sizing_value(f, cfg, i);
    }
    cfg.read32(f.bdf, offset)
}

/// What a BAR register reads while it is being sized: the size mask over the type bits
/// (PCI 3.0 §6.2.5.1); for the upper half of a 64-bit BAR, the upper 32 bits of the mask.
fn sizing_value(f: &Function, cfg: &impl ConfigSpace, i: usize) -> u32 {
    let real = cfg.read32(f.bdf, reg::BAR0 + 4 * i as u16);
    if f.bar_sizes[i] != 0 {
        let mask = !(f.bar_sizes[i] - 1);
        return (mask as u32 & !0xf) | (real & 0xf);
    }
    // The upper half of a 64-bit BAR whose lower half is `i - 1`.
    if i > 0 && f.bar_sizes[i - 1] != 0 {
        let lower = cfg.read32(f.bdf, reg::BAR0 + 4 * (i as u16 - 1));
        if lower & 0b110 == 0b100 {
            return (!(f.bar_sizes[i - 1] - 1) >> 32) as u32;
        }
    }
    0
}

fn write_reg(f: &mut Function, cfg: &impl ConfigSpace, offset: u16, value: u32, written: u32) {
    if offset == reg::COMMAND && written & 0xffff != 0 {
        let real = cfg.read32(f.bdf, offset) & 0xffff;
        let command = (real & !GUEST_COMMAND_BITS) | (value & GUEST_COMMAND_BITS);
        if command != real {
            cfg.write16(f.bdf, offset, command as u16);
        }
        return;
    }
    if let Some(Some(m)) = &mut f.msi
        && m.covers(offset)
    {
        let change = m.write(offset, value, written);
        let (control, _, _, _, mask) = m.registers();
        match change {
            MsiChange::None => {}
            // The device stops using its old message now; the new route is made with the
            // guest's lock released (take_msi_work) and only then is MSI enabled again.
            MsiChange::Route(_) | MsiChange::Unroute => {
                let c = cfg.read16(f.bdf, control);
                cfg.write16(f.bdf, control, c & !1);
            }
            MsiChange::Mask(on) => {
                if let Some(mask) = mask {
                    let v = cfg.read32(f.bdf, mask);
                    cfg.write32(f.bdf, mask, (v & !1) | u32::from(on));
                }
            }
        }
        return;
    }
    if let Some(i) = bar_index(offset) {
        // All ones starts sizing; anything else ends it. The register itself never changes.
        f.sizing[i] = value == u32::MAX;
    }
}

impl GuestPci {
    /// The next MSI route to make or remove, if a function's effective MSI differs from what
    /// its device carries and no other vCPU is already on it. Call with the guest's lock held,
    /// then [`MsiWork::run`] without it, then [`finish_msi_work`](Self::finish_msi_work).
    pub fn take_msi_work(&mut self) -> Option<MsiWork> {
        let guest = self.guest;
        for (i, f) in self.functions.iter_mut().enumerate() {
            let Some(Some(m)) = &f.msi else {
                continue;
            };
            let want = m.message();
            if f.msi_busy || want == m.routed() || (want.is_some() && want == f.msi_refused) {
                continue;
            }
            f.msi_busy = true;
            return Some(MsiWork {
                function: i,
                device: msi::Device {
                    guest,
                    segment: f.segment,
                    bdf: f.bdf,
                },
                want,
            });
        }
        None
    }

    /// Records what [`MsiWork::run`] did and programs the device: with a route, the host's
    /// address and data, one vector (MME = 0), then MSI Enable, if the guest still wants that
    /// message (else the next [`take_msi_work`](Self::take_msi_work) re-routes); a refusal is
    /// returned for the caller to report, and the device's MSI stays disabled.
    pub fn finish_msi_work(
        &mut self,
        platform: &Platform,
        work: MsiWork,
        result: Option<Result<HostMsi, alloc::string::String>>,
    ) -> Option<alloc::string::String> {
        let f = self.functions.get_mut(work.function)?;
        f.msi_busy = false;
        let seg = platform.segments.iter().find(|s| s.segment == 0)?;
        let Some(Some(m)) = &mut f.msi else {
            return None;
        };
        match result {
            None => {
                m.set_routed(None);
                None
            }
            Some(Err(e)) => {
                m.set_routed(None);
                f.msi_refused = work.want;
                Some(e)
            }
            Some(Ok(host)) => {
                m.set_routed(work.want);
                f.msi_refused = None;
                let (control, lo, hi, data, _) = m.registers();
                let cfg = &seg.ecam;
                let c = cfg.read16(f.bdf, control) & !(1 | 0b111 << 4);
                cfg.write16(f.bdf, control, c);
                cfg.write32(f.bdf, lo, host.address as u32);
                if let Some(hi) = hi {
                    cfg.write32(f.bdf, hi, (host.address >> 32) as u32);
                }
                cfg.write16(f.bdf, data, host.data as u16);
                if m.message() == work.want {
                    cfg.write16(f.bdf, control, c | 1);
                }
                None
            }
        }
    }

    /// The guest is going away: every function's MSI disabled on the device and its route
    /// removed (the IRTE cleared and invalidated), so the device can interrupt no one.
    pub fn release(&mut self, platform: &Platform) {
        let Some(seg) = platform.segments.iter().find(|s| s.segment == 0) else {
            return;
        };
        for f in &mut self.functions {
            let Some(Some(m)) = &mut f.msi else {
                continue;
            };
            let (control, _, _, _, _) = m.registers();
            let c = seg.ecam.read16(f.bdf, control);
            seg.ecam.write16(f.bdf, control, c & !1);
            msi::unroute(msi::Device {
                guest: self.guest,
                segment: f.segment,
                bdf: f.bdf,
            });
            m.set_routed(None);
        }
    }
}

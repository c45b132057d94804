//! The guests' side of the IOMMU object model: the kernel's one [`Iommufd`](::iommu::iommufd)
//! (`iommu_owner.rs`, brought up at boot with every unit and assignable device), with one
//! object-model guest per running guest, so a guest's VMMCALLs reach `dispatch` with its own
//! [`GuestMemory`](super::memory::GuestMemory) and can name only its own objects.
//!
//! A device named by a guest's `dev=` is given to that guest and stays blocked (the owner
//! enabled translation at boot, before any guest existed) until the guest attaches it through
//! the ABI.

use alloc::string::String;
use alloc::vec::Vec;

use iommu::iommufd::sim::SimHw;
use iommu::iommufd::{GuestId, Iommufd, Limits, dispatch};

use super::memory::GuestMemory;
use crate::iommu_owner;

/// The guests' handle on the owner: which of the owner's devices the configuration assigns.
pub struct GuestIommu {
    units: usize,
    mode: &'static str,
    /// The owner's hardware-device index of each assigned device, by assignment index.
    devices: Vec<usize>,
    /// With no IOMMU hardware and `guest-iommu=model` (Bochs): the ABI v1 calls run on the
    /// software IOMMU model instead of the owner's object model, page tables in heap memory;
    /// no device can be assigned then (nothing would contain its DMA).
    model: Option<Iommufd<SimHw>>,
}

/// Table pages of the software model's pool: enough for the domains of a few IOASes (no device
/// is ever attached, so none is allocated today).
const MODEL_TABLE_PAGES: usize = 64;

/// A DMA fault the units recorded, attributed to an assigned device when it is one.
pub struct DmaFault {
    /// Assignment index (`attach`'s `devices`), or `None` for a device no guest owns.
    pub device: Option<usize>,
    pub sid: u16,
    pub page: u64,
    pub reason: u8,
    pub reason_name: &'static str,
    pub write: bool,
}

fn model_err(e: impl core::fmt::Debug) -> String {
    alloc::format!("object model: {e:?}")
}

impl GuestIommu {
    /// The owner's object model with `devices` (segment, PCI address) known to the guests as
    /// assignment indices `0..devices.len()`, in that order; `Ok(None)` when the machine has
    /// no IOMMU (an error if the owner refused to bring its units up).
    pub fn attach(devices: &[(u16, drivers::pci::Bdf)]) -> Result<Option<GuestIommu>, String> {
        let owner = iommu_owner::lock();
        let Some(o) = owner.as_ref() else {
            return match iommu_owner::refusal() {
                Some(why) => Err(alloc::format!("its bring-up was refused: {why}")),
                None => Ok(None),
            };
        };
        let mut indices = Vec::new();
        for &(segment, bdf) in devices {
            let i = o.device_index(segment, bdf).ok_or_else(|| {
                alloc::format!("{segment:04x}:{bdf}: the IOMMU owner does not hold it")
            })?;
            indices.push(i);
        }
        Ok(Some(GuestIommu {
            units: o.units.len(),
            #[cfg(target_arch = "x86_64")]
            mode: match o.mode {
                ::iommu::vtd::TranslationMode::Legacy => "VT-d unit(s), legacy mode",
                ::iommu::vtd::TranslationMode::Scalable => "VT-d unit(s), scalable mode",
            },
            #[cfg(target_arch = "aarch64")]
            mode: "SMMUv3 unit(s)",
            devices: indices,
            model: None,
        }))
    }

    /// The software IOMMU model, for a machine without IOMMU hardware (see [`GuestIommu::model`]).
    pub fn software_model() -> Result<GuestIommu, String> {
        let fd = Iommufd::new(SimHw::new(&[], MODEL_TABLE_PAGES, None), Limits::default())
            .map_err(model_err)?;
        Ok(GuestIommu {
            units: 0,
            mode: "software IOMMU model(s)",
            devices: Vec::new(),
            model: Some(fd),
        })
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn mode(&self) -> &'static str {
        self.mode
    }

    pub fn create_guest(&mut self) -> Result<GuestId, String> {
        if let Some(fd) = &mut self.model {
            return fd.create_guest().map_err(model_err);
        }
        owned(|o| o.fd.create_guest().map_err(model_err))
    }

    /// Gives assigned device `hw` (an index into `attach`'s `devices`) to `guest`; returns the
    /// `dev_id` the guest names it by. Its DMA stays blocked until the guest attaches it.
    pub fn assign_device(&mut self, guest: GuestId, hw: usize) -> Result<u32, String> {
        let dev = *self.devices.get(hw).ok_or("no such assigned device")?;
        owned(|o| {
            o.fd.assign_device(guest, dev as iommu::iommufd::HwDev)
                .map_err(model_err)
        })
    }

    /// Drains every unit's fault recording registers (VT-d 4.1 §7.2.1) and hands each DMA
    /// fault to `sink`, attributed by (unit, source ID) to the assigned device that raised it.
    #[cfg(target_arch = "x86_64")]
    pub fn poll_faults(&mut self, sink: &mut dyn FnMut(&DmaFault)) {
        if self.model.is_some() {
            return; // the software model makes no DMA
        }
        let mut owner = iommu_owner::lock();
        let Some(o) = owner.as_mut() else {
            return;
        };
        // Every ID the device's DMA may carry (its own and its DMA aliases) is the device's.
        let ids: Vec<(usize, Vec<u32>)> = self
            .devices
            .iter()
            .map(|&d| (o.devices[d].unit, o.devices[d].ids.clone()))
            .collect();
        for (u, unit) in o.fd.hw_mut().units_mut().iter_mut().enumerate() {
            unit.poll_faults(&mut |r| {
                sink(&DmaFault {
                    device: ids.iter().position(|(unit, sids)| {
                        *unit == u && sids.contains(&u32::from(r.source_id))
                    }),
                    sid: r.source_id,
                    page: r.fault_info,
                    reason: r.reason,
                    reason_name: iommu::vtd::regs::fault_reason_name(r.reason),
                    write: matches!(r.request, iommu::vtd::regs::RequestType::Write),
                })
            });
        }
    }

    /// Drains every unit's event queue (SMMUv3 §7.3) and hands each fault record to `sink`,
    /// attributed by (unit, StreamID, or one of its DMA aliases) to the assigned device that
    /// raised it. QEMU's SMMU records one event per faulting transaction (a 256-byte edu DMA is
    /// dozens), so consecutive identical records (same StreamID, page, type and direction) are
    /// reported once and the rest counted in the log.
    #[cfg(target_arch = "aarch64")]
    pub fn poll_faults(&mut self, sink: &mut dyn FnMut(&DmaFault)) {
        let mut owner = iommu_owner::lock();
        let Some(o) = owner.as_mut() else {
            return;
        };
        let ids: Vec<(usize, Vec<u32>)> = self
            .devices
            .iter()
            .map(|&d| (o.devices[d].unit, o.devices[d].ids.clone()))
            .collect();
        for (u, unit) in o.fd.hw_mut().units_mut().iter_mut().enumerate() {
            let mut last = None;
            let mut repeats = 0u64;
            let _ = unit.poll_events(&mut |e| {
                let key = (e.stream_id, e.input_addr & !0xfff, e.kind.code(), e.read);
                if last == Some(key) {
                    repeats += 1;
                    return;
                }
                last = Some(key);
                sink(&DmaFault {
                    device: ids
                        .iter()
                        .position(|(unit, sids)| *unit == u && sids.contains(&e.stream_id)),
                    sid: e.stream_id as u16,
                    page: e.input_addr & !0xfff,
                    reason: e.kind.code(),
                    reason_name: e.kind.name(),
                    write: !e.read,
                })
            });
            if repeats > 0 {
                log::info!("smmu{u}: {repeats} repeated event records coalesced");
            }
        }
    }

    /// One ABI v1 call of `guest` (docs/abi.md §2): 0 or `-errno`.
    pub fn call(&mut self, guest: GuestId, mem: &GuestMemory, op: u32, args_gpa: u64) -> i64 {
        if let Some(fd) = &mut self.model {
            return dispatch(fd, guest, 0, mem, op, args_gpa);
        }
        match iommu_owner::lock().as_mut() {
            Some(o) => dispatch(&o.fd, guest, 0, mem, op, args_gpa),
            None => -i64::from(hvabi::errno::EOPNOTSUPP),
        }
    }

    /// Destroys every object of `guest` (its mappings leave the hardware) before its memory is
    /// freed.
    pub fn destroy_guest(&mut self, guest: GuestId) -> Result<(), String> {
        if let Some(fd) = &mut self.model {
            return fd.destroy_guest(guest).map_err(model_err);
        }
        owned(|o| o.fd.destroy_guest(guest).map_err(model_err))
    }
}

/// Runs `f` on the owner; an error if there is none (a `GuestIommu` exists only when there is).
fn owned<R, E: From<&'static str>>(
    f: impl FnOnce(&mut iommu_owner::IommuOwner) -> Result<R, E>,
) -> Result<R, E> {
    match iommu_owner::lock().as_mut() {
        Some(o) => f(o),
        None => Err(E::from("no IOMMU owner")),
    }
}

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

use iommu::gate::Gate;
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
    /// no device can be assigned then (nothing would contain its DMA). Behind a big-reader
    /// gate with one slot per physical CPU, as the owner is (`iommu_owner.rs`).
    model: Option<Gate<Iommufd<SimHw>>>,
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
            model: Some(
                Gate::new(fd, crate::arch::smp::MAX_CPUS)
                    .ok_or("out of heap for the software model's gate")?,
            ),
        })
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn mode(&self) -> &'static str {
        self.mode
    }

    pub fn create_guest(&self) -> Result<GuestId, String> {
        if let Some(fd) = &self.model {
            return fd.write().create_guest().map_err(model_err);
        }
        owned(|o| o.fd.create_guest().map_err(model_err))
    }

    /// Gives assigned device `hw` (an index into `attach`'s `devices`) to `guest`; returns the
    /// `dev_id` the guest names it by. Its DMA stays blocked until the guest attaches it.
    pub fn assign_device(&self, guest: GuestId, hw: usize) -> Result<u32, String> {
        let dev = *self.devices.get(hw).ok_or("no such assigned device")?;
        owned(|o| {
            o.fd.assign_device(guest, dev as iommu::iommufd::HwDev)
                .map_err(model_err)
        })
    }

    /// Drains every unit's fault recording registers (VT-d 4.1 §7.2.1) and hands each DMA
    /// fault to `sink`, attributed by (unit, source ID) to the assigned device that raised it.
    ///
    /// Inlined into the exit path: most exits have nothing to drain, and then this is the
    /// check alone, without the drain's frame.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn poll_faults(&self, sink: &mut dyn FnMut(&DmaFault)) {
        if self.model.is_some() {
            return; // the software model makes no DMA
        }
        // Most exits have nothing to drain: then the owner is not taken at all.
        if !crate::irq::vtd::may_have_faults(self.units) {
            return;
        }
        self.drain_faults(sink);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    fn drain_faults(&self, sink: &mut dyn FnMut(&DmaFault)) {
        let mut owner = iommu_owner::lock();
        let Some(o) = owner.as_mut() else {
            return;
        };
        // Every ID the device's DMA may carry (its own and its DMA aliases) is the device's.
        // Looked up in place only when a record is there: this runs after every exit, and
        // copying the ID lists each time (two heap allocations per device) was a fifth of a
        // null hypercall.
        let iommu_owner::IommuOwner { fd, devices, .. } = o;
        let assigned = &self.devices;
        for (u, unit) in fd.hw_mut().units_mut().iter_mut().enumerate() {
            crate::irq::vtd::drain(u, unit, &mut |r| {
                sink(&DmaFault {
                    device: owner_of(assigned, devices, u, u32::from(r.source_id)),
                    sid: r.source_id,
                    page: r.fault_info,
                    reason: r.reason,
                    reason_name: iommu::vtd::regs::fault_reason_name(r.reason),
                    write: matches!(r.request, iommu::vtd::regs::RequestType::Write),
                })
            });
        }
    }

    /// Drains every unit's event queue (SMMUv3 §7.3) that signalled events (or is polled) and hands each fault record to `sink`,
    /// attributed by (unit, StreamID, or one of its DMA aliases) to the assigned device that
    /// raised it. QEMU's SMMU records one event per faulting transaction (a 256-byte edu DMA is
    /// dozens), so consecutive identical records (same StreamID, page, type and direction) are
    /// reported once and the rest counted in the log.
    ///
    /// Inlined into the exit path, as on x86_64: usually only the check runs.
    #[cfg(target_arch = "aarch64")]
    #[inline]
    pub fn poll_faults(&self, sink: &mut dyn FnMut(&DmaFault)) {
        if self.model.is_some() {
            return; // the software model makes no DMA
        }
        // Most exits have nothing to drain: then the owner is not taken at all.
        if !crate::smmu_irq::may_have_events(self.units) {
            return;
        }
        self.drain_faults(sink);
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(never)]
    fn drain_faults(&self, sink: &mut dyn FnMut(&DmaFault)) {
        let mut owner = iommu_owner::lock();
        let Some(o) = owner.as_mut() else {
            return;
        };
        // As on x86_64: no copy of the ID lists per exit.
        let iommu_owner::IommuOwner { fd, devices, .. } = o;
        let assigned = &self.devices;
        for (u, unit) in fd.hw_mut().units_mut().iter_mut().enumerate() {
            let mut last = None;
            let mut repeats = 0u64;
            // Reads the queue only when the unit's interrupt said so (smmu_irq.rs).
            let _ = crate::smmu_irq::drain(u, unit, &mut |e| {
                let key = (e.stream_id, e.input_addr & !0xfff, e.kind.code(), e.read);
                if last == Some(key) {
                    repeats += 1;
                    return;
                }
                last = Some(key);
                sink(&DmaFault {
                    device: owner_of(assigned, devices, u, e.stream_id),
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

    /// One ABI v1 call of `guest` (docs/abi.md §2) made by its vCPU `vcpu` (the index the
    /// guest's vCPU got at entry): 0 or `-errno`. Calls of several vCPUs run at once: the
    /// owner is only read here, and `dispatch` keeps per-vCPU reader slots (EINVAL for a vCPU
    /// index beyond `Limits::max_vcpus`).
    pub fn call(
        &self,
        guest: GuestId,
        mem: &GuestMemory,
        op: u32,
        args_gpa: u64,
        vcpu: u32,
    ) -> i64 {
        if let Some(fd) = &self.model {
            return match fd.read(crate::arch::smp::cpu_index()) {
                Ok(fd) => dispatch(&fd, guest, vcpu, mem, op, args_gpa),
                Err(_) => -i64::from(hvabi::errno::EBUSY),
            };
        }
        match iommu_owner::read().as_deref() {
            Ok(Some(o)) => dispatch(&o.fd, guest, vcpu, mem, op, args_gpa),
            Ok(None) => -i64::from(hvabi::errno::EOPNOTSUPP),
            // This CPU is already inside the owner (never on the exit path): refused, as
            // `dispatch` refuses a vCPU slot entered twice.
            Err(_) => -i64::from(hvabi::errno::EBUSY),
        }
    }

    /// Destroys every object of `guest` (its mappings leave the hardware) before its memory is
    /// freed.
    pub fn destroy_guest(&self, guest: GuestId) -> Result<(), String> {
        if let Some(fd) = &self.model {
            return fd.write().destroy_guest(guest).map_err(model_err);
        }
        owned(|o| o.fd.destroy_guest(guest).map_err(model_err))
    }
}

/// The assignment index of the device behind unit `unit` whose DMA carries `id` (its own ID or
/// one of its DMA aliases), if one is assigned.
fn owner_of(
    assigned: &[usize],
    devices: &[iommu_owner::OwnedDevice],
    unit: usize,
    id: u32,
) -> Option<usize> {
    assigned.iter().position(|&d| {
        devices
            .get(d)
            .is_some_and(|d| d.unit == unit && d.ids.contains(&id))
    })
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

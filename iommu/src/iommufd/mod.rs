//! The iommufd-like object model guests drive through hypercalls (ABI v1, crate `hvabi`,
//! `docs/abi.md`).
//!
//! # Objects
//!
//! Per guest, in one ID table ([`table`]): **IOAS** (an IOVA → guest-physical map),
//! **HWPT** (a hardware page table mirroring one IOAS; automatic or guest-allocated),
//! **DEVICE** and **GROUP** (assigned by the hypervisor; a group is the unit of isolation and
//! its members share one translation), **ACCESS** (an in-hypervisor emulated DMA user reading
//! and writing through an IOAS). References are explicit counters checked by the
//! consistency checker (`check`, test support): HWPT → IOAS (`Ioas::hwpts`), attachment →
//! HWPT (`Hwpt::users`), ACCESS → IOAS (`Ioas::accesses`), pins → area.
//!
//! # Rules every operation follows
//!
//! * Guests are untrusted: every argument is validated before anything changes; an error
//!   leaves every object, page table and hardware entry as it was (checked by the fail-nth
//!   sweep in the tests); nothing panics; every loop is bounded by a table size or by the
//!   request's length in pages.
//! * The map path never allocates from the general heap: an IOAS's mapping table is allocated
//!   once, at IOAS_ALLOC, with a fixed capacity; page-table pages come from the backend's
//!   `TableMemory`. Object creation allocates (the ID table, an IOAS's tables) through
//!   fallible `try_reserve`, gated by the fault injector [`FailNth`].
//! * Hardware is reached only through [`hw::IommuHw`]; attach, replace and detach of a group
//!   use its prepare/commit/abort protocol so that a group moves all at once or not at all.
//!
//! # Concurrency
//!
//! [`dispatch`] takes `&Iommufd` and a vCPU index: several CPUs call it at once.
//!
//! * Every guest has a [`Gate`] (a big-reader lock, `gate.rs`) around its objects, with one
//!   reader slot per vCPU; the hardware (`H`) has one around it too, with one reader slot per
//!   vCPU of every guest. A reader writes only its own (cache-padded) slot.
//! * The fast path (IOAS_MAP, IOAS_UNMAP, IOAS_MAP_BATCH, IOAS_UNMAP_BATCH) enters both gates as
//!   a reader: fast paths of different guests, and of different vCPUs of one guest, never write
//!   a common word to get in. Inside, an IOAS's area table takes no lock (`ioas.rs`,
//!   `area_slots.rs`): a map claims its range by compare-and-swap on its own area slot
//!   (overlap arbitration), writes the page tables, then publishes the area; an unmap retires
//!   the areas (compare-and-swap, marking them dying), clears the page tables, and frees them
//!   after the invalidation round.
//! * Every other operation is a control operation: it enters the guest's gate as the writer
//!   (it waits for the guest's fast paths in flight and holds off new ones) and gets
//!   `&mut Guest`. Those that change domains or attachments, which all guests share (DESTROY,
//!   HWPT_*, DEVICE_ATTACH/REPLACE/DETACH), also enter the hardware's gate as the writer
//!   (`&mut H`: they pause every guest's fast path while they run); the others (IOAS_ALLOC,
//!   IOAS_COPY, IOAS_ALLOW_IOVAS, the queries) enter it as a reader and pause only their own
//!   guest. GET_LAST_ERROR and the error record take a per-guest spin lock only.
//! * The hypervisor's own calls (`create_guest`, `assign_device`, ACCESS DMA, ...) take
//!   `&mut Iommufd`.
//!
//! An ACCESS's IOAS is switched by one assignment inside a control operation, so an emulated
//! device's DMA (which takes `&mut Iommufd`) sees the old IOAS or the new one, never none.

pub mod access;
pub mod backend;
#[cfg(any(test, feature = "testing"))]
pub mod check;
#[cfg(any(test, feature = "testing"))]
pub mod client;
pub mod device;
pub mod dispatch;
pub mod group;
pub mod hw;
pub mod hwpt;
pub mod ioas;
mod marshal;
mod object;
#[cfg(any(test, feature = "testing"))]
pub mod selftest;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod smmu_backend;
pub mod table;
pub mod vtd_backend;

// `check`, `client`, `selftest` and `sim` are test support: the host tests, the fuzzer and the
// hypervisor's in-VM scenarios enable them with the crate's `testing` feature; the product's
// object model never uses them.

#[cfg(test)]
mod tests;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hvabi::{LastError, errno, kind, reason};

pub use dispatch::dispatch;
/// The ABI crate, re-exported for users of this crate (the fuzzer, the hypervisor).
pub use hvabi as abi;
pub use hw::{HwDev, HwDeviceInfo, HwDomain, HwError, IommuHw, Span};

use crate::gate::{Gate, SpinLock};
use object::{Guest, Object};
use table::Table;

/// A guest, as the hypervisor numbers them for this object model.
pub type GuestId = u32;

/// The page granule of every IOVA, guest-physical address and length.
pub const PAGE: u64 = hvabi::PAGE_SIZE;
/// HWPTs one IOAS can carry.
pub const MAX_HWPTS_PER_IOAS: usize = 8;
/// Ranges in an IOAS's allowed list.
pub const MAX_ALLOWED_IOVAS: usize = 16;
/// Devices in one group.
pub const MAX_GROUP_MEMBERS: usize = 8;
/// PASIDs one device can have attached at once.
pub const MAX_PASIDS_PER_DEVICE: usize = 8;
/// Pins one ACCESS can hold at once.
pub const MAX_PINS_PER_ACCESS: usize = 8;

/// Why a call failed: the errno the guest sees and the detail GET_LAST_ERROR reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    /// Positive `hvabi::errno` value.
    pub errno: u32,
    /// `hvabi::reason` code.
    pub reason: u32,
    /// The object the reason names (`hvabi::kind`), if any.
    pub kind: u32,
    pub id: u32,
    /// Batch or array index.
    pub index: u32,
    /// An address the reason names.
    pub value: u64,
}

impl Error {
    pub const fn new(errno: u32, reason: u32) -> Self {
        Error {
            errno,
            reason,
            kind: kind::NONE,
            id: 0,
            index: 0,
            value: 0,
        }
    }
    pub const fn nomem() -> Self {
        Error::new(errno::ENOMEM, reason::NO_MEMORY)
    }
    pub const fn obj(mut self, kind: u32, id: u32) -> Self {
        self.kind = kind;
        self.id = id;
        self
    }
    pub const fn at(mut self, value: u64) -> Self {
        self.value = value;
        self
    }
    pub const fn index(mut self, index: u32) -> Self {
        self.index = index;
        self
    }
}

pub(crate) const fn inval(r: u32) -> Error {
    Error::new(errno::EINVAL, r)
}

/// The errno and reason for a hardware error.
pub(crate) fn hw_err(e: HwError) -> Error {
    match e {
        HwError::NoMemory => Error::nomem(),
        HwError::NotCoherent => Error::new(errno::EMEDIUMTYPE, reason::CC_UNSUPPORTED_BY_DEVICE),
        HwError::NoDirtyTracking => inval(reason::DIRTY_UNSUPPORTED_BY_DEVICE),
        HwError::Incompatible => inval(reason::HW_INCOMPATIBLE),
        HwError::Unsupported => Error::new(errno::EOPNOTSUPP, reason::NONE),
        HwError::PasidOutOfRange => Error::new(errno::ERANGE, reason::PASID_OUT_OF_RANGE),
        HwError::Invalid => inval(reason::NONE),
        HwError::Fault => Error::new(errno::EIO, reason::HW_FAULT),
    }
}

/// A guest-physical access the guest-memory backend refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemFault;

/// Where guest-physical memory is: `[gpa, gpa + len)` is host-physical `[hpa, hpa + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRun {
    pub hpa: u64,
    pub len: u64,
}

/// A guest's memory, as the hypervisor (its stage-2 and ownership tables) or a host test
/// (a `Vec`) provides it.
///
/// Contract: within one call, `owns(gpa, len, write)` true implies that `read` (and with
/// `write`, `write`) of any part of the range succeeds, and `translate` of every page in it
/// returns `Some`. The hypervisor keeps a guest's memory owned, and its translation fixed,
/// while any of it is mapped in an IOAS (the IOMMU may DMA to it at any time).
pub trait GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemFault>;
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemFault>;
    /// The whole range belongs to the guest (and is writable by it, with `write`). Memory the
    /// guest may hand to a device: RAM, or a BAR of a device assigned to it.
    fn owns(&self, gpa: u64, len: u64, write: bool) -> bool;
    /// The host-physical address of `gpa` and how many bytes from `gpa` on are contiguous in
    /// host memory (at least to the end of `gpa`'s page).
    fn translate(&self, gpa: u64) -> Option<HostRun>;
    /// [`translate`](Self::translate) for a caller walking a range upwards run by run (a map of
    /// memory whose host pages are scattered): `cursor` is the backend's own position state,
    /// 0 for the first call of a walk and passed back unchanged for the next run, so a backend
    /// with many runs finds the next one without searching from the start. Must return what
    /// `translate(gpa)` returns, whatever `cursor` holds.
    fn translate_next(&self, gpa: u64, cursor: &mut usize) -> Option<HostRun> {
        let _ = cursor;
        self.translate(gpa)
    }

    /// Reads `buf.len()` little-endian 64-bit words from `gpa` (any alignment): the bytes
    /// `read` would give, word `k` from bytes `8k..8k + 8`. What the argument structs are read
    /// with (`hvabi::AbiStruct::decode_words`); a backend whose memory is words (the
    /// hypervisor's) copies them without going through bytes.
    fn read_words(&self, gpa: u64, buf: &mut [u64]) -> Result<(), MemFault> {
        // Eight words (one struct) per `read`, so a range that is not all guest memory fails
        // as one access, as `read` of the bytes would.
        let mut bytes = [0u8; 64];
        for (k, chunk) in buf.chunks_mut(8).enumerate() {
            let at = gpa.checked_add(64 * k as u64).ok_or(MemFault)?;
            let b = &mut bytes[..8 * chunk.len()];
            self.read(at, b)?;
            for (w, c) in chunk.iter_mut().zip(b.chunks_exact(8)) {
                let mut x = [0u8; 8];
                x.copy_from_slice(c);
                *w = u64::from_le_bytes(x);
            }
        }
        Ok(())
    }

    /// Writes `buf` as little-endian 64-bit words at `gpa` (any alignment), as
    /// [`read_words`](Self::read_words) reads them; up to eight words (one struct) are one
    /// `write`, all or nothing.
    fn write_words(&self, gpa: u64, buf: &[u64]) -> Result<(), MemFault> {
        let mut bytes = [0u8; 64];
        for (k, chunk) in buf.chunks(8).enumerate() {
            let at = gpa.checked_add(64 * k as u64).ok_or(MemFault)?;
            for (w, c) in chunk.iter().zip(bytes.chunks_exact_mut(8)) {
                c.copy_from_slice(&w.to_le_bytes());
            }
            self.write(at, &bytes[..8 * chunk.len()])?;
        }
        Ok(())
    }
}

/// Limits of one object model instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Objects per guest (at most 65535).
    pub max_objects: u32,
    /// Mappings per IOAS (the capacity allocated at IOAS_ALLOC).
    pub max_areas_per_ioas: u32,
    /// Guests.
    pub max_guests: u32,
    /// vCPUs per guest: the reader slots of the gates (`dispatch`'s `vcpu` is below this).
    pub max_vcpus: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_objects: 1024,
            max_areas_per_ioas: 512,
            max_guests: 16,
            max_vcpus: 8,
        }
    }
}

/// Fault injection: fail the `n`-th allocation (object-model `try_reserve`s and every
/// allocation of a backend that shares the injector: domains, table pages, prepared switches).
#[derive(Debug, Default)]
pub struct FailNth {
    count: AtomicU64,
    nth: AtomicU64,
    fired: AtomicU64,
}

impl FailNth {
    pub const fn new() -> Self {
        FailNth {
            count: AtomicU64::new(0),
            nth: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        }
    }
    /// Fail the `n`-th allocation from now (1-based); 0 disarms.
    pub fn arm(&self, n: u64) {
        self.count.store(0, Relaxed);
        self.fired.store(0, Relaxed);
        self.nth.store(n, Relaxed);
    }
    pub fn disarm(&self) {
        self.nth.store(0, Relaxed);
    }
    /// Whether the armed failure happened.
    pub fn fired(&self) -> bool {
        self.fired.load(Relaxed) != 0
    }
    /// Allocations counted since `arm`.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
    /// Called before an allocation: `true` means "fail it".
    pub fn hit(&self) -> bool {
        let c = self.count.fetch_add(1, Relaxed) + 1;
        let n = self.nth.load(Relaxed);
        if n != 0 && c == n {
            self.fired.store(1, Relaxed);
            true
        } else {
            false
        }
    }
}

/// One hardware device and who owns it.
pub(crate) struct DevSlot {
    pub info: HwDeviceInfo,
    pub owner: Option<GuestId>,
}

/// One guest: its objects behind its gate, and its last error.
pub(crate) struct GuestCell {
    pub gate: Gate<Guest>,
    /// Written by failing calls of every kind (fast path included): a lock of its own.
    pub last_error: SpinLock<LastError>,
}

/// The object model: the hardware, the assigned devices and every guest's objects.
pub struct Iommufd<H: IommuHw> {
    /// Reader slot of vCPU `v` of guest `g`: `g * max_vcpus + v`.
    pub(crate) hw: Gate<H>,
    pub(crate) devs: Vec<DevSlot>,
    pub(crate) guests: Vec<Option<GuestCell>>,
    pub(crate) limits: Limits,
    pub(crate) fail: Option<Arc<FailNth>>,
}

/// How a control operation holds the hardware: shared (operations that only map, unmap or
/// read it: they let other guests' fast paths run) or exclusively (operations that change
/// domains or attachments).
pub(crate) enum HwRef<'a, H> {
    Shared(&'a H),
    Excl(&'a mut H),
}

impl<H> core::ops::Deref for HwRef<'_, H> {
    type Target = H;
    fn deref(&self) -> &H {
        match self {
            HwRef::Shared(h) => h,
            HwRef::Excl(h) => h,
        }
    }
}

impl<H> HwRef<'_, H> {
    /// The hardware for a change. `dispatch` takes the hardware exclusively for every op that
    /// gets here; EIO rather than a panic if that classification is ever wrong.
    pub(crate) fn excl(&mut self) -> Result<&mut H, Error> {
        match self {
            HwRef::Excl(h) => Ok(h),
            HwRef::Shared(_) => Err(Error::new(errno::EIO, reason::HW_FAULT)),
        }
    }
}

/// A control operation's context: the hardware and one guest (exclusively).
pub(crate) struct Cx<'a, H: IommuHw> {
    pub hw: HwRef<'a, H>,
    pub g: &'a mut Guest,
    pub limits: &'a Limits,
    pub fail: Option<&'a FailNth>,
    /// The vCPU making the call (0 for the hypervisor's own calls).
    pub vcpu: u32,
}

/// A fast-path context: the hardware and one guest, shared with other vCPUs' fast paths.
pub(crate) struct Rx<'a, H: IommuHw> {
    pub hw: &'a H,
    pub g: &'a Guest,
    /// The vCPU making the call: tags the areas it is mapping or unmapping.
    pub vcpu: u32,
}

impl<H: IommuHw> Cx<'_, H> {
    /// The fast-path view of this context (for control operations that map or unmap).
    pub(crate) fn rx(&self) -> Rx<'_, H> {
        Rx {
            hw: &self.hw,
            g: self.g,
            vcpu: self.vcpu,
        }
    }
}

/// Makes a vector with room for exactly `n` elements, fallibly.
pub(crate) fn try_vec<T>(n: usize, alloc_ok: bool) -> Result<Vec<T>, Error> {
    if !alloc_ok {
        return Err(Error::nomem());
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::nomem())?;
    Ok(v)
}

impl<H: IommuHw> Iommufd<H> {
    /// Takes over `hw` and its devices (none assigned yet).
    pub fn new(hw: H, limits: Limits) -> Result<Self, Error> {
        let n = hw.device_count();
        let mut devs = try_vec(n as usize, true)?;
        for d in 0..n {
            let info = hw
                .device_info(d)
                .ok_or(Error::new(errno::EIO, reason::HW_FAULT))?;
            devs.push(DevSlot { info, owner: None });
        }
        let slots = limits.max_guests as usize * limits.max_vcpus as usize;
        let hw = Gate::new(hw, slots).ok_or(Error::nomem())?;
        Ok(Iommufd {
            hw,
            devs,
            guests: Vec::new(),
            limits,
            fail: None,
        })
    }

    /// Shares a fault injector with the object model (the backend gets its own handle).
    pub fn set_fault_injector(&mut self, f: Option<Arc<FailNth>>) {
        self.fail = f;
    }

    /// The hardware (`&mut self`: no call is in flight).
    pub fn hw(&mut self) -> &H {
        self.hw.get_mut()
    }

    /// The hardware, for tests that inject faults or inspect the model.
    pub fn hw_mut(&mut self) -> &mut H {
        self.hw.get_mut()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn cx(&mut self, gid: GuestId) -> Result<Cx<'_, H>, Error> {
        let g = self
            .guests
            .get_mut(gid as usize)
            .and_then(Option::as_mut)
            .ok_or(Error::new(errno::ENOENT, reason::BAD_ID))?;
        Ok(Cx {
            hw: HwRef::Excl(self.hw.get_mut()),
            g: g.gate.get_mut(),
            limits: &self.limits,
            fail: self.fail.as_deref(),
            vcpu: 0,
        })
    }

    /// Creates a guest context (empty object table).
    pub fn create_guest(&mut self) -> Result<GuestId, Error> {
        let g = Guest {
            objs: Table::new(self.limits.max_objects),
        };
        let g = GuestCell {
            gate: Gate::new(g, self.limits.max_vcpus as usize).ok_or(Error::nomem())?,
            last_error: SpinLock::new(LastError::default()),
        };
        if let Some(i) = self.guests.iter().position(Option::is_none) {
            self.guests[i] = Some(g);
            return Ok(i as GuestId);
        }
        if self.guests.len() as u32 >= self.limits.max_guests {
            return Err(Error::new(errno::ENOSPC, reason::OBJECT_TABLE_FULL));
        }
        self.guests.try_reserve(1).map_err(|_| Error::nomem())?;
        self.guests.push(Some(g));
        Ok((self.guests.len() - 1) as GuestId)
    }

    /// Destroys a guest context and everything in it, as closing an iommufd does: detaches
    /// every device and PASID (DMA blocked), frees every page table, gives the devices back.
    pub fn destroy_guest(&mut self, gid: GuestId) -> Result<(), Error> {
        let Some(g) = self.guests.get_mut(gid as usize).and_then(Option::take) else {
            return Err(Error::new(errno::ENOENT, reason::BAD_ID));
        };
        let mut g = g.gate;
        let g = g.get_mut();
        let hw = self.hw.get_mut();
        let mut hw_failed = false;
        for (_, o) in g.objs.iter() {
            match o {
                Object::Group(gr) if gr.rid.is_some() => {
                    for &m in gr.members() {
                        if let Ok(d) = g.device(m) {
                            hw_failed |= hw.detach(d.hw, None).is_err();
                        }
                    }
                }
                Object::Device(d) => {
                    for p in d.pasids.iter().flatten() {
                        hw_failed |= hw.detach(d.hw, Some(p.pasid)).is_err();
                    }
                }
                _ => {}
            }
        }
        for (_, o) in g.objs.iter() {
            if let Object::Hwpt(h) = o {
                hw.domain_free(h.domain);
            }
        }
        for d in self.devs.iter_mut() {
            if d.owner == Some(gid) {
                d.owner = None;
            }
        }
        if hw_failed {
            return Err(Error::new(errno::EIO, reason::HW_FAULT));
        }
        Ok(())
    }

    /// Guests that exist.
    pub fn guest_ids(&self) -> impl Iterator<Item = GuestId> + '_ {
        self.guests
            .iter()
            .enumerate()
            .filter(|(_, g)| g.is_some())
            .map(|(i, _)| i as GuestId)
    }

    /// Hardware devices.
    pub fn device_count(&self) -> u32 {
        self.devs.len() as u32
    }

    pub fn device_owner(&self, dev: HwDev) -> Option<GuestId> {
        self.devs.get(dev as usize).and_then(|d| d.owner)
    }

    /// Assigns `dev`'s whole group to `gid` (a group is owned by one guest or none): creates
    /// the GROUP object and a DEVICE object per member. Returns `dev`'s DEVICE ID.
    /// EBUSY if another guest owns the group.
    pub fn assign_device(&mut self, gid: GuestId, dev: HwDev) -> Result<u32, Error> {
        let info = self
            .devs
            .get(dev as usize)
            .ok_or(Error::new(errno::ENOENT, reason::BAD_ID))?
            .info;
        match self.devs[dev as usize].owner {
            Some(o) if o == gid => {
                let cx = self.cx(gid)?;
                return device::find_device(cx.g, dev)
                    .ok_or(Error::new(errno::EIO, reason::HW_FAULT));
            }
            Some(_) => return Err(Error::new(errno::EBUSY, reason::BUSY)),
            None => {}
        }
        let mut members = [0 as HwDev; MAX_GROUP_MEMBERS];
        let mut n = 0;
        for (i, d) in self.devs.iter().enumerate() {
            if d.info.group != info.group {
                continue;
            }
            if d.owner.is_some() {
                return Err(Error::new(errno::EBUSY, reason::BUSY));
            }
            if n == MAX_GROUP_MEMBERS {
                return Err(inval(reason::TOO_MANY));
            }
            members[n] = i as HwDev;
            n += 1;
        }
        let infos: [HwDeviceInfo; MAX_GROUP_MEMBERS] =
            core::array::from_fn(|i| self.devs[members[i.min(n - 1)] as usize].info);
        let cx = self.cx(gid)?;
        let ids = group::create_group(cx, info.group, &members[..n], &infos[..n])?;
        for &m in &members[..n] {
            self.devs[m as usize].owner = Some(gid);
        }
        let i = members[..n].iter().position(|&m| m == dev).unwrap_or(0);
        Ok(ids[i])
    }

    /// Takes `dev`'s group back from `gid`. EBUSY while any member (or PASID) is attached.
    pub fn unassign_device(&mut self, gid: GuestId, dev: HwDev) -> Result<(), Error> {
        if self.device_owner(dev) != Some(gid) {
            return Err(Error::new(errno::ENOENT, reason::BAD_ID));
        }
        let members = {
            let cx = self.cx(gid)?;
            group::destroy_group(cx, dev)?
        };
        for m in members.into_iter().flatten() {
            if let Some(d) = self.devs.get_mut(m as usize) {
                d.owner = None;
            }
        }
        Ok(())
    }

    /// The DEVICE ID `gid` knows `dev` by.
    pub fn device_id(&mut self, gid: GuestId, dev: HwDev) -> Option<u32> {
        let cx = self.cx(gid).ok()?;
        device::find_device(cx.g, dev)
    }

    /// The hardware device behind DEVICE `id` of `gid`.
    pub fn device_hw(&mut self, gid: GuestId, id: u32) -> Option<HwDev> {
        let cx = self.cx(gid).ok()?;
        cx.g.device(id).ok().map(|d| d.hw)
    }

    /// The HWPT's hardware domain (for tests and the in-hypervisor checks).
    pub fn hwpt_domain(&mut self, gid: GuestId, id: u32) -> Option<HwDomain> {
        let cx = self.cx(gid).ok()?;
        cx.g.hwpt(id).ok().map(|h| h.domain)
    }

    /// Objects `gid` has.
    pub fn object_count(&mut self, gid: GuestId) -> u32 {
        self.cx(gid).map(|c| c.g.objs.live()).unwrap_or(0)
    }

    /// Every object ID of `gid`, in table order.
    pub fn object_ids(&mut self, gid: GuestId) -> Vec<u32> {
        match self.cx(gid) {
            Ok(cx) => cx.g.objs.iter().map(|(id, _)| id).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The kind (`hvabi::kind`) of object `id` of `gid`.
    pub fn object_kind(&mut self, gid: GuestId, id: u32) -> Option<u32> {
        self.cx(gid).ok()?.g.kind_of(id).ok()
    }
}

//! The hypercall entry: `dispatch(fd, guest, vcpu, mem, op, args_gpa)`, used by the
//! hypervisor's hypercall handler on every architecture and by host tests. It takes `&Iommufd`:
//! the fast path (IOAS_MAP/UNMAP and their batches) runs on several vCPUs at once, every other
//! op is a control operation that has the guest and the hardware to itself (module docs of
//! `iommufd`).
//!
//! Argument handling, for every op (`hvabi` crate docs):
//!
//! 1. unknown op: ENOTTY;
//! 2. read `size` (u32 at `args_gpa`): EFAULT unless it is writable guest memory;
//! 3. `size` < the v1 size: EINVAL; `size` > `MAX_ARG_SIZE`: E2BIG;
//! 4. `[args_gpa, args_gpa + size)` must be writable guest memory: EFAULT;
//! 5. bytes past the v1 size must be zero: E2BIG;
//! 6. decode, run, and write the v1 struct back (on success; on failure only for the cases
//!    `docs/abi.md` lists: DESTROY's blocker, an array's required count, a batch's progress).
//!
//! Every failure is recorded for GET_LAST_ERROR.

use hvabi::{
    AbiStruct, Destroy, DeviceAttach, DeviceDetach, DeviceList, DeviceReservedRanges, GetInfo,
    HwptAlloc, HwptClone, HwptGetDirtyBitmap, HwptSetDirtyTracking, IoasAlloc, IoasAllowIovas,
    IoasCopy, IoasIovaRanges, IoasMap, IoasMapBatch, IoasUnmap, IoasUnmapBatch, LastError,
    MAX_ARG_SIZE, MAX_BATCH, cap, errno, kind, op, reason,
};

use super::marshal::{owns_array, reserved_nonzero};
use super::object::{Guest, Object};
use super::{
    Cx, Error, GuestCell, GuestId, GuestMemory, HwRef, IommuHw, Iommufd, MAX_ALLOWED_IOVAS,
    MAX_HWPTS_PER_IOAS, MAX_PASIDS_PER_DEVICE, PAGE, Rx, inval,
};
use crate::gate::{ReadError, ReadGuard};

/// Runs one hypercall of vCPU `vcpu` of `guest`: returns 0 or a negated `hvabi::errno`.
///
/// Calls may run concurrently, each with its own `vcpu`; two concurrent calls with the same
/// `guest` and `vcpu` are a caller bug, refused with EBUSY (never undefined behaviour).
pub fn dispatch<H: IommuHw>(
    fd: &Iommufd<H>,
    guest: GuestId,
    vcpu: u32,
    mem: &dyn GuestMemory,
    op: u32,
    args_gpa: u64,
) -> i64 {
    match fd.call(guest, vcpu, mem, op, args_gpa) {
        Ok(()) => 0,
        Err(e) => -(e.errno as i64),
    }
}

/// The ops that run as readers of the gates (module docs of `iommufd`).
fn fast_path(op: u32) -> bool {
    matches!(
        op,
        op::IOAS_MAP | op::IOAS_UNMAP | op::IOAS_MAP_BATCH | op::IOAS_UNMAP_BATCH
    )
}

/// The control ops that change domains or attachments (shared by every guest): they hold the
/// hardware's gate as the writer. The other control ops hold it as a reader, so they do not
/// pause other guests.
fn changes_hardware(op: u32) -> bool {
    matches!(
        op,
        op::DESTROY
            | op::HWPT_ALLOC
            | op::HWPT_CLONE
            | op::HWPT_SET_DIRTY_TRACKING
            | op::HWPT_GET_DIRTY_BITMAP
            | op::DEVICE_ATTACH
            | op::DEVICE_REPLACE
            | op::DEVICE_DETACH
    )
}

fn slot_error(e: ReadError) -> Error {
    match e {
        ReadError::SlotBusy => Error::new(errno::EBUSY, reason::BUSY),
        _ => inval(reason::NONE),
    }
}

impl<H: IommuHw> Iommufd<H> {
    fn guest_cell(&self, guest: GuestId) -> Result<&GuestCell, Error> {
        self.guests
            .get(guest as usize)
            .and_then(Option::as_ref)
            .ok_or(Error::new(errno::ENOENT, reason::BAD_ID))
    }

    /// Enters the hardware's and the guest's gates as reader `vcpu`. Never waits while holding
    /// a slot: if either gate has a writer, both slots are released and it spins, so a writer
    /// that holds the guest's gate and waits for the hardware's readers always gets them.
    fn enter_fast<'a>(
        &'a self,
        cell: &'a GuestCell,
        guest: GuestId,
        vcpu: u32,
    ) -> Result<(ReadGuard<'a, H>, ReadGuard<'a, Guest>), Error> {
        let hw_slot = guest as usize * self.limits.max_vcpus as usize + vcpu as usize;
        loop {
            let hw = match self.hw.try_read(hw_slot) {
                Ok(h) => h,
                Err(ReadError::Writer) => {
                    core::hint::spin_loop();
                    continue;
                }
                Err(e) => return Err(slot_error(e)),
            };
            match cell.gate.try_read(vcpu as usize) {
                Ok(g) => return Ok((hw, g)),
                Err(ReadError::Writer) => {
                    drop(hw);
                    core::hint::spin_loop();
                }
                Err(e) => return Err(slot_error(e)),
            }
        }
    }

    /// [`dispatch`], with the typed error.
    pub fn call(
        &self,
        guest: GuestId,
        vcpu: u32,
        mem: &dyn GuestMemory,
        op: u32,
        args_gpa: u64,
    ) -> Result<(), Error> {
        let cell = self.guest_cell(guest)?;
        if vcpu >= self.limits.max_vcpus {
            return Err(inval(reason::NONE));
        }
        let hw_slot = guest as usize * self.limits.max_vcpus as usize + vcpu as usize;
        let r = match read_args(mem, op, args_gpa) {
            Err(e) => Err(e),
            Ok(mut buf) if op == op::GET_LAST_ERROR => with(
                &mut (),
                mem,
                args_gpa,
                &mut buf,
                never,
                |_, a: &mut LastError| {
                    if a.flags != 0 {
                        return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
                    }
                    *a = LastError {
                        size: a.size,
                        flags: 0,
                        ..*cell.last_error.lock()
                    };
                    Ok(())
                },
            ),
            Ok(mut buf) if fast_path(op) => {
                let (hw, g) = self.enter_fast(cell, guest, vcpu)?;
                let mut rx = Rx {
                    hw: &*hw,
                    g: &g,
                    vcpu,
                };
                rx.run(mem, op, args_gpa, &mut buf)
            }
            Ok(mut buf) => {
                // Lock order: the guest's gate, then the hardware's (fast paths never wait while
                // holding either; a shared entry below never waits holding its slot).
                let mut g = cell.gate.write();
                if changes_hardware(op) {
                    let mut hw = self.hw.write();
                    let mut cx = Cx {
                        hw: HwRef::Excl(&mut *hw),
                        g: &mut g,
                        limits: &self.limits,
                        fail: self.fail.as_deref(),
                        vcpu,
                    };
                    cx.run(mem, op, args_gpa, &mut buf)
                } else {
                    let hw = self.hw.read(hw_slot).map_err(slot_error)?;
                    let mut cx = Cx {
                        hw: HwRef::Shared(&*hw),
                        g: &mut g,
                        limits: &self.limits,
                        fail: self.fail.as_deref(),
                        vcpu,
                    };
                    cx.run(mem, op, args_gpa, &mut buf)
                }
            }
        };
        if let Err(e) = r
            && op != op::GET_LAST_ERROR
        {
            *cell.last_error.lock() = LastError {
                size: 0,
                flags: 0,
                out_op: op,
                out_errno: e.errno,
                out_reason: e.reason,
                out_object_kind: e.kind,
                out_object_id: e.id,
                out_index: e.index,
                out_value: e.value,
            };
        }
        r
    }

    /// The last error recorded for `guest`.
    pub fn last_error(&mut self, guest: GuestId) -> Option<LastError> {
        Some(*self.guest_cell(guest).ok()?.last_error.lock())
    }
}

const BUF: usize = 64;

fn fault() -> Error {
    Error::new(errno::EFAULT, reason::ARG_FAULT)
}

/// Handlers whose struct is written back on these errors too.
fn on_array_error(e: &Error) -> bool {
    e.errno == errno::EMSGSIZE
}
fn always(_: &Error) -> bool {
    true
}
fn never(_: &Error) -> bool {
    false
}

/// The argument struct, as little-endian 64-bit words (every v1 size is a multiple of 8):
/// read into the front, decoded, and encoded back from there (no second buffer). Words, not
/// bytes: on aarch64-unknown-none (strict alignment) a byte buffer is copied and decoded one
/// byte at a time.
type ArgBuf = [u64; BUF / 8];

/// Steps 1-5 of the module docs: the v1 bytes of the argument struct (at the front).
///
/// One guest-memory read in the common case: when the whole v1 struct is writable guest
/// memory, `size` and the struct come from one copy (a single snapshot, too, of memory another
/// vCPU may be writing). Otherwise the steps run one by one, so every error is the one the
/// rules name (a `size` word that is guest memory but a struct that is not: EINVAL if `size`
/// is short, EFAULT if not).
fn read_args(mem: &dyn GuestMemory, op: u32, gpa: u64) -> Result<ArgBuf, Error> {
    let Some(v1) = op::arg_size(op) else {
        return Err(Error::new(errno::ENOTTY, reason::UNKNOWN_OP));
    };
    let mut buf = [0u64; BUF / 8];
    let whole = owns_array(mem, gpa, v1 as u64);
    let size = if whole {
        mem.read_words(gpa, &mut buf[..v1 / 8])
            .map_err(|_| fault())?;
        // `size` is the first four bytes: the low half of the first word.
        buf[0] as u32
    } else {
        let mut size = [0u8; 4];
        if !mem.owns(gpa, 4, true) {
            return Err(fault());
        }
        mem.read(gpa, &mut size).map_err(|_| fault())?;
        u32::from_le_bytes(size)
    };
    if (size as usize) < v1 {
        return Err(Error::new(errno::EINVAL, reason::ARG_TOO_SHORT));
    }
    if size > MAX_ARG_SIZE {
        return Err(Error::new(errno::E2BIG, reason::ARG_TRAILING_NONZERO));
    }
    // `[gpa, gpa + v1)` was checked above when `whole`; a longer struct needs the rest too.
    if (!whole || size as usize > v1) && !owns_array(mem, gpa, size as u64) {
        return Err(fault());
    }
    if !whole {
        mem.read_words(gpa, &mut buf[..v1 / 8])
            .map_err(|_| fault())?;
    }
    let mut off = v1 as u64;
    // At most MAX_ARG_SIZE / BUF chunks.
    while off < size as u64 {
        let n = (size as u64 - off).min(BUF as u64) as usize;
        let mut tail = [0u8; BUF];
        mem.read(gpa + off, &mut tail[..n]).map_err(|_| fault())?;
        if tail[..n].iter().any(|&b| b != 0) {
            return Err(Error::new(errno::E2BIG, reason::ARG_TRAILING_NONZERO));
        }
        off += n as u64;
    }
    Ok(buf)
}

/// Decodes `T` from `buf`, runs `f`, writes `T` back on success (and on the errors
/// `write_on_err` selects), encoded into the same buffer.
fn with<C, T: AbiStruct>(
    cx: &mut C,
    mem: &dyn GuestMemory,
    gpa: u64,
    buf: &mut ArgBuf,
    write_on_err: fn(&Error) -> bool,
    f: impl FnOnce(&mut C, &mut T) -> Result<(), Error>,
) -> Result<(), Error> {
    let words = &mut buf[..T::SIZE.min(BUF) / 8];
    let mut a = T::decode_words(words);
    let r = f(cx, &mut a);
    let write = match &r {
        Ok(()) => true,
        Err(e) => write_on_err(e),
    };
    if write {
        a.encode_words(words);
        // The range was checked writable before the call.
        mem.write_words(gpa, words).map_err(|_| fault())?;
    }
    r
}

impl<H: IommuHw> Rx<'_, H> {
    /// The fast-path ops.
    fn run(
        &mut self,
        mem: &dyn GuestMemory,
        op: u32,
        gpa: u64,
        b: &mut ArgBuf,
    ) -> Result<(), Error> {
        match op {
            op::IOAS_MAP => with(self, mem, gpa, b, never, |cx, a: &mut IoasMap| {
                if a.reserved != 0 {
                    return Err(reserved_nonzero());
                }
                a.iova = cx.map(mem, a.ioas_id, a.flags, a.gpa, a.length, a.iova)?;
                Ok(())
            }),
            op::IOAS_UNMAP => with(self, mem, gpa, b, never, |cx, a: &mut IoasUnmap| {
                if a.flags != 0 {
                    return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
                }
                if a.reserved != 0 {
                    return Err(reserved_nonzero());
                }
                a.length = cx.unmap(a.ioas_id, a.iova, a.length)?;
                Ok(())
            }),
            op::IOAS_MAP_BATCH => with(self, mem, gpa, b, always, |cx, a: &mut IoasMapBatch| {
                cx.map_batch(mem, a)
            }),
            op::IOAS_UNMAP_BATCH => {
                with(self, mem, gpa, b, always, |cx, a: &mut IoasUnmapBatch| {
                    cx.unmap_batch(mem, a)
                })
            }
            _ => Err(Error::new(errno::ENOTTY, reason::UNKNOWN_OP)),
        }
    }
}

impl<H: IommuHw> Cx<'_, H> {
    /// The control ops.
    fn run(
        &mut self,
        mem: &dyn GuestMemory,
        op: u32,
        gpa: u64,
        b: &mut ArgBuf,
    ) -> Result<(), Error> {
        match op {
            op::GET_INFO => with(self, mem, gpa, b, never, |cx, a: &mut GetInfo| {
                cx.get_info(a)
            }),
            op::DESTROY => with(
                self,
                mem,
                gpa,
                b,
                |e| e.errno == errno::EBUSY,
                |cx, a| cx.destroy(a),
            ),
            op::DEVICE_LIST => with(
                self,
                mem,
                gpa,
                b,
                on_array_error,
                |cx, a: &mut DeviceList| cx.device_list(mem, a),
            ),
            op::DEVICE_RESERVED_RANGES => with(
                self,
                mem,
                gpa,
                b,
                on_array_error,
                |cx, a: &mut DeviceReservedRanges| cx.device_reserved_ranges(mem, a),
            ),
            op::IOAS_ALLOC => with(self, mem, gpa, b, never, |cx, a: &mut IoasAlloc| {
                if a.flags != 0 {
                    return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
                }
                if a.reserved != 0 {
                    return Err(reserved_nonzero());
                }
                a.out_ioas_id = cx.ioas_alloc()?;
                Ok(())
            }),
            op::IOAS_COPY => with(self, mem, gpa, b, never, |cx, a: &mut IoasCopy| {
                cx.copy(mem, a)
            }),
            op::IOAS_IOVA_RANGES => with(
                self,
                mem,
                gpa,
                b,
                on_array_error,
                |cx, a: &mut IoasIovaRanges| cx.iova_ranges(mem, a),
            ),
            op::IOAS_ALLOW_IOVAS => with(self, mem, gpa, b, never, |cx, a: &mut IoasAllowIovas| {
                cx.allow_iovas(mem, a)
            }),
            op::HWPT_ALLOC => with(self, mem, gpa, b, never, |cx, a: &mut HwptAlloc| {
                cx.hwpt_alloc(mem, a)
            }),
            op::HWPT_CLONE => with(self, mem, gpa, b, never, |cx, a: &mut HwptClone| {
                cx.hwpt_clone(mem, a)
            }),
            op::HWPT_SET_DIRTY_TRACKING => with(
                self,
                mem,
                gpa,
                b,
                never,
                |cx, a: &mut HwptSetDirtyTracking| cx.set_dirty_tracking(a),
            ),
            op::HWPT_GET_DIRTY_BITMAP => with(
                self,
                mem,
                gpa,
                b,
                never,
                |cx, a: &mut HwptGetDirtyBitmap| cx.get_dirty_bitmap(mem, a),
            ),
            op::DEVICE_ATTACH => with(self, mem, gpa, b, never, |cx, a: &mut DeviceAttach| {
                cx.device_attach(mem, a, false)
            }),
            op::DEVICE_REPLACE => with(self, mem, gpa, b, never, |cx, a: &mut DeviceAttach| {
                cx.device_attach(mem, a, true)
            }),
            op::DEVICE_DETACH => with(self, mem, gpa, b, never, |cx, a: &mut DeviceDetach| {
                cx.device_detach(a)
            }),
            _ => Err(Error::new(errno::ENOTTY, reason::UNKNOWN_OP)),
        }
    }

    fn get_info(&mut self, a: &mut GetInfo) -> Result<(), Error> {
        if a.flags != 0 {
            return Err(Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS));
        }
        let mut caps = 0;
        let mut devices = 0;
        for (_, o) in self.g.objs.iter() {
            if let Object::Device(d) = o {
                devices += 1;
                if d.info.pasid_bits != 0 {
                    caps |= cap::PASID;
                }
                if d.info.dirty_tracking {
                    caps |= cap::DIRTY_TRACKING;
                }
                if d.info.enforce_cc {
                    caps |= cap::ENFORCE_CACHE_COHERENCY;
                }
            }
        }
        if self.hw.nesting_supported() {
            caps |= cap::NESTING;
        }
        *a = GetInfo {
            size: a.size,
            flags: 0,
            out_abi_version: hvabi::ABI_VERSION,
            out_num_devices: devices,
            out_capabilities: caps,
            out_iova_alignment: PAGE,
            out_max_objects: self.g.objs.max(),
            out_max_areas_per_ioas: self.limits.max_areas_per_ioas,
            out_max_batch: MAX_BATCH,
            out_max_hwpts_per_ioas: MAX_HWPTS_PER_IOAS as u32,
            out_max_pasids_per_device: MAX_PASIDS_PER_DEVICE as u32,
            out_max_allowed_iovas: MAX_ALLOWED_IOVAS as u32,
        };
        Ok(())
    }

    /// DESTROY: IOAS and HWPT only; EBUSY names a blocker.
    fn destroy(&mut self, a: &mut Destroy) -> Result<(), Error> {
        a.out_blocker_kind = 0;
        a.out_blocker_id = 0;
        a.out_blocker_count = 0;
        if a.reserved != 0 {
            return Err(reserved_nonzero());
        }
        let (blocker, count) = match self.g.kind_of(a.id)? {
            kind::IOAS => ioas_blockers(self.g, a.id),
            kind::HWPT => {
                let users = self.g.hwpt(a.id)?.users;
                (hwpt_blocker(self.g, a.id), users)
            }
            k => {
                return Err(Error::new(errno::EPERM, reason::NOT_DESTROYABLE).obj(k, a.id));
            }
        };
        if count != 0 {
            let (k, id) = blocker.unwrap_or((kind::NONE, 0));
            a.out_blocker_kind = k;
            a.out_blocker_id = id;
            a.out_blocker_count = count;
            return Err(Error::new(errno::EBUSY, reason::BUSY).obj(k, id));
        }
        match self.g.kind_of(a.id)? {
            kind::HWPT => self.destroy_hwpt(a.id),
            _ => {
                self.g.objs.remove(a.id);
            }
        }
        Ok(())
    }
}

/// One device attached to HWPT `h` (requester ID or PASID).
fn hwpt_blocker(g: &Guest, h: u32) -> Option<(u32, u32)> {
    for (id, o) in g.objs.iter() {
        match o {
            Object::Group(gr) if gr.rid == Some(h) => {
                if let Some(&m) = gr.members().iter().find(|&&m| gr.is_attached(m)) {
                    return Some((kind::DEVICE, m));
                }
            }
            Object::Device(d) if d.pasids.iter().flatten().any(|p| p.hwpt == h) => {
                return Some((kind::DEVICE, id));
            }
            _ => {}
        }
    }
    None
}

/// What keeps IOAS `id` alive: manual HWPTs on it (named), automatic HWPTs (their attached
/// device is named), and attached ACCESS objects.
fn ioas_blockers(g: &Guest, id: u32) -> (Option<(u32, u32)>, u32) {
    let Ok(ioas) = g.ioas(id) else {
        return (None, 0);
    };
    let mut first = None;
    let mut count = 0;
    for &h in &ioas.hwpts {
        count += 1;
        let b = match g.hwpt(h) {
            Ok(x) if x.auto => hwpt_blocker(g, h).or(Some((kind::HWPT, h))),
            _ => Some((kind::HWPT, h)),
        };
        first = first.or(b);
    }
    if ioas.accesses != 0 {
        for (aid, o) in g.objs.iter() {
            if let Object::Access(x) = o
                && x.ioas == Some(id)
            {
                count += 1;
                first = first.or(Some((kind::ACCESS, aid)));
            }
        }
    }
    (first, count)
}

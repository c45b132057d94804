//! A guest-side driver of the ABI over [`dispatch`](super::dispatch): it writes argument
//! structs and arrays into a scratch area of guest memory and calls `dispatch` exactly as a
//! guest's hypercall would. Used by host tests, the fuzzer's oracle and the in-hypervisor test.
//!
//! Scratch layout: the argument struct at `scratch`, arrays from `scratch + 0x1000` (up to
//! 60 KiB). The scratch area must be 64 KiB of the guest's writable RAM.

use alloc::vec::Vec;

use hvabi::{
    ATTACH_PASID, AbiStruct, Destroy, DeviceAttach, DeviceDetach, DeviceEntry, DeviceList,
    DeviceReservedRanges, GetInfo, HwptAlloc, HwptClone, HwptGetDirtyBitmap, HwptSetDirtyTracking,
    IoasAlloc, IoasAllowIovas, IoasCopy, IoasIovaRanges, IoasMap, IoasMapBatch, IoasUnmap,
    IoasUnmapBatch, IovaRange, LastError, MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE, MapEntry,
    ReservedRange, UnmapEntry, op,
};

use super::{GuestId, GuestMemory, IommuHw, Iommufd, dispatch};

/// Read + write.
pub const RW: u32 = MAP_READABLE | MAP_WRITEABLE;

/// Offset of the array area in the scratch window.
pub const ARRAY_OFFSET: u64 = 0x1000;

pub struct Client<'a, H: IommuHw> {
    pub fd: &'a mut Iommufd<H>,
    pub guest: GuestId,
    pub mem: &'a dyn GuestMemory,
    pub scratch: u64,
    /// The vCPU the calls claim to come from.
    pub vcpu: u32,
}

/// A failed call: the errno and the struct as the hypervisor left it.
pub type Fail<T> = (u32, T);

impl<'a, H: IommuHw> Client<'a, H> {
    pub fn new(
        fd: &'a mut Iommufd<H>,
        guest: GuestId,
        mem: &'a dyn GuestMemory,
        scratch: u64,
    ) -> Self {
        Client {
            fd,
            guest,
            mem,
            scratch,
            vcpu: 0,
        }
    }

    /// The array area.
    pub fn array(&self) -> u64 {
        self.scratch + ARRAY_OFFSET
    }

    /// A raw hypercall.
    pub fn raw(&mut self, op: u32, gpa: u64) -> i64 {
        dispatch(self.fd, self.guest, self.vcpu, self.mem, op, gpa)
    }

    /// Writes `a` (with `size` set to its v1 size) to the scratch struct, calls `op`, reads the
    /// struct back.
    pub fn call<T: AbiStruct>(&mut self, op: u32, a: &T) -> Result<T, Fail<T>> {
        let mut buf = [0u8; 64];
        let b = &mut buf[..T::SIZE];
        a.encode(b);
        b[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
        let _ = self.mem.write(self.scratch, b);
        let r = self.raw(op, self.scratch);
        let _ = self.mem.read(self.scratch, b);
        let out = T::decode(b);
        if r == 0 {
            Ok(out)
        } else {
            Err(((-r) as u32, out))
        }
    }

    pub fn write_array<T: AbiStruct>(&self, at: u64, items: &[T]) {
        for (i, it) in items.iter().enumerate() {
            let mut buf = [0u8; 64];
            it.encode(&mut buf[..T::SIZE]);
            let _ = self.mem.write(at + (i * T::SIZE) as u64, &buf[..T::SIZE]);
        }
    }

    pub fn read_array<T: AbiStruct>(&self, at: u64, n: usize) -> Vec<T> {
        (0..n)
            .map(|i| {
                let mut buf = [0u8; 64];
                let _ = self
                    .mem
                    .read(at + (i * T::SIZE) as u64, &mut buf[..T::SIZE]);
                T::decode(&buf[..T::SIZE])
            })
            .collect()
    }

    pub fn get_info(&mut self) -> Result<GetInfo, u32> {
        self.call(op::GET_INFO, &GetInfo::default())
            .map_err(|e| e.0)
    }

    pub fn last_error(&mut self) -> LastError {
        self.call(op::GET_LAST_ERROR, &LastError::default())
            .unwrap_or_default()
    }

    pub fn devices(&mut self) -> Result<Vec<DeviceEntry>, u32> {
        let at = self.array();
        let a = DeviceList {
            num_devices: 64,
            devices_gpa: at,
            ..Default::default()
        };
        let r = self.call(op::DEVICE_LIST, &a).map_err(|e| e.0)?;
        Ok(self.read_array(at, r.num_devices as usize))
    }

    pub fn reserved_ranges(&mut self, dev_id: u32) -> Result<Vec<ReservedRange>, u32> {
        let at = self.array();
        let a = DeviceReservedRanges {
            dev_id,
            num_ranges: 128,
            ranges_gpa: at,
            ..Default::default()
        };
        let r = self.call(op::DEVICE_RESERVED_RANGES, &a).map_err(|e| e.0)?;
        Ok(self.read_array(at, r.num_ranges as usize))
    }

    pub fn ioas_alloc(&mut self) -> Result<u32, u32> {
        self.call(op::IOAS_ALLOC, &IoasAlloc::default())
            .map(|a| a.out_ioas_id)
            .map_err(|e| e.0)
    }

    /// IOAS_MAP with `flags` (add [`MAP_FIXED_IOVA`] to use `iova`).
    pub fn map(
        &mut self,
        ioas: u32,
        gpa: u64,
        len: u64,
        flags: u32,
        iova: u64,
    ) -> Result<u64, u32> {
        let a = IoasMap {
            flags,
            ioas_id: ioas,
            gpa,
            length: len,
            iova,
            ..Default::default()
        };
        self.call(op::IOAS_MAP, &a).map(|a| a.iova).map_err(|e| e.0)
    }

    /// Read/write map at a fixed IOVA.
    pub fn map_fixed(&mut self, ioas: u32, iova: u64, gpa: u64, len: u64) -> Result<u64, u32> {
        self.map(ioas, gpa, len, RW | MAP_FIXED_IOVA, iova)
    }

    /// Read/write map at an allocated IOVA.
    pub fn map_auto(&mut self, ioas: u32, gpa: u64, len: u64) -> Result<u64, u32> {
        self.map(ioas, gpa, len, RW, 0)
    }

    pub fn unmap(&mut self, ioas: u32, iova: u64, len: u64) -> Result<u64, u32> {
        let a = IoasUnmap {
            ioas_id: ioas,
            iova,
            length: len,
            ..Default::default()
        };
        self.call(op::IOAS_UNMAP, &a)
            .map(|a| a.length)
            .map_err(|e| e.0)
    }

    /// IOAS_MAP_BATCH: returns (errno or 0, done, entries as written back).
    pub fn map_batch(
        &mut self,
        ioas: u32,
        flags: u32,
        e: &[MapEntry],
    ) -> (u32, u32, Vec<MapEntry>) {
        let at = self.array();
        self.write_array(at, e);
        let a = IoasMapBatch {
            flags,
            ioas_id: ioas,
            num_entries: e.len() as u32,
            entries_gpa: at,
            ..Default::default()
        };
        let (err, out) = match self.call(op::IOAS_MAP_BATCH, &a) {
            Ok(o) => (0, o),
            Err((e, o)) => (e, o),
        };
        (err, out.out_done, self.read_array(at, e.len()))
    }

    pub fn unmap_batch(
        &mut self,
        ioas: u32,
        flags: u32,
        e: &[UnmapEntry],
    ) -> (u32, u32, Vec<UnmapEntry>) {
        let at = self.array();
        self.write_array(at, e);
        let a = IoasUnmapBatch {
            flags,
            ioas_id: ioas,
            num_entries: e.len() as u32,
            entries_gpa: at,
            ..Default::default()
        };
        let (err, out) = match self.call(op::IOAS_UNMAP_BATCH, &a) {
            Ok(o) => (0, o),
            Err((e, o)) => (e, o),
        };
        (err, out.out_done, self.read_array(at, e.len()))
    }

    pub fn copy(
        &mut self,
        dst: u32,
        src: u32,
        src_iova: u64,
        len: u64,
        flags: u32,
        dst_iova: u64,
    ) -> Result<u64, u32> {
        let a = IoasCopy {
            flags,
            dst_ioas_id: dst,
            src_ioas_id: src,
            length: len,
            dst_iova,
            src_iova,
            ..Default::default()
        };
        self.call(op::IOAS_COPY, &a)
            .map(|a| a.dst_iova)
            .map_err(|e| e.0)
    }

    /// IOAS_IOVA_RANGES with room for `cap` ranges: (errno or 0, reported count, ranges read).
    pub fn iova_ranges_cap(&mut self, ioas: u32, cap: u32) -> (u32, u32, Vec<(u64, u64)>) {
        let at = self.array();
        let a = IoasIovaRanges {
            ioas_id: ioas,
            num_iovas: cap,
            ranges_gpa: at,
            ..Default::default()
        };
        let (err, out) = match self.call(op::IOAS_IOVA_RANGES, &a) {
            Ok(o) => (0, o),
            Err((e, o)) => (e, o),
        };
        let n = out.num_iovas.min(cap) as usize;
        let r = self
            .read_array::<IovaRange>(at, n)
            .into_iter()
            .map(|r| (r.start, r.last))
            .collect();
        (err, out.num_iovas, r)
    }

    pub fn iova_ranges(&mut self, ioas: u32) -> Result<Vec<(u64, u64)>, u32> {
        match self.iova_ranges_cap(ioas, 128) {
            (0, _, r) => Ok(r),
            (e, _, _) => Err(e),
        }
    }

    pub fn allow_iovas(&mut self, ioas: u32, ranges: &[(u64, u64)]) -> Result<(), u32> {
        let at = self.array();
        let items: Vec<IovaRange> = ranges
            .iter()
            .map(|&(start, last)| IovaRange { start, last })
            .collect();
        self.write_array(at, &items);
        let a = IoasAllowIovas {
            ioas_id: ioas,
            num_iovas: ranges.len() as u32,
            ranges_gpa: at,
            ..Default::default()
        };
        self.call(op::IOAS_ALLOW_IOVAS, &a)
            .map(|_| ())
            .map_err(|e| e.0)
    }

    pub fn hwpt_alloc(&mut self, dev: u32, pt: u32, flags: u32) -> Result<u32, u32> {
        let a = HwptAlloc {
            flags,
            dev_id: dev,
            pt_id: pt,
            ..Default::default()
        };
        self.call(op::HWPT_ALLOC, &a)
            .map(|a| a.out_hwpt_id)
            .map_err(|e| e.0)
    }

    pub fn hwpt_clone(&mut self, src: u32, dev: u32, flags: u32) -> Result<u32, u32> {
        let a = HwptClone {
            flags,
            src_hwpt_id: src,
            dev_id: dev,
            ..Default::default()
        };
        self.call(op::HWPT_CLONE, &a)
            .map(|a| a.out_hwpt_id)
            .map_err(|e| e.0)
    }

    fn attach_op(&mut self, op: u32, dev: u32, pt: u32, pasid: Option<u32>) -> Result<u32, u32> {
        let a = DeviceAttach {
            flags: if pasid.is_some() { ATTACH_PASID } else { 0 },
            dev_id: dev,
            pt_id: pt,
            pasid: pasid.unwrap_or(0),
            ..Default::default()
        };
        self.call(op, &a).map(|a| a.pt_id).map_err(|e| e.0)
    }

    /// DEVICE_ATTACH: the HWPT attached.
    pub fn attach(&mut self, dev: u32, pt: u32) -> Result<u32, u32> {
        self.attach_op(op::DEVICE_ATTACH, dev, pt, None)
    }

    pub fn replace(&mut self, dev: u32, pt: u32) -> Result<u32, u32> {
        self.attach_op(op::DEVICE_REPLACE, dev, pt, None)
    }

    pub fn attach_pasid(&mut self, dev: u32, pasid: u32, pt: u32) -> Result<u32, u32> {
        self.attach_op(op::DEVICE_ATTACH, dev, pt, Some(pasid))
    }

    pub fn replace_pasid(&mut self, dev: u32, pasid: u32, pt: u32) -> Result<u32, u32> {
        self.attach_op(op::DEVICE_REPLACE, dev, pt, Some(pasid))
    }

    pub fn detach(&mut self, dev: u32) -> Result<(), u32> {
        let a = DeviceDetach {
            dev_id: dev,
            ..Default::default()
        };
        self.call(op::DEVICE_DETACH, &a)
            .map(|_| ())
            .map_err(|e| e.0)
    }

    pub fn detach_pasid(&mut self, dev: u32, pasid: u32) -> Result<(), u32> {
        let a = DeviceDetach {
            flags: ATTACH_PASID,
            dev_id: dev,
            pasid,
            ..Default::default()
        };
        self.call(op::DEVICE_DETACH, &a)
            .map(|_| ())
            .map_err(|e| e.0)
    }

    pub fn destroy(&mut self, id: u32) -> Result<(), Fail<Destroy>> {
        let a = Destroy {
            id,
            ..Default::default()
        };
        self.call(op::DESTROY, &a).map(|_| ())
    }

    pub fn set_dirty_tracking(&mut self, hwpt: u32, enable: bool) -> Result<(), u32> {
        let a = HwptSetDirtyTracking {
            flags: enable as u32,
            hwpt_id: hwpt,
            ..Default::default()
        };
        self.call(op::HWPT_SET_DIRTY_TRACKING, &a)
            .map(|_| ())
            .map_err(|e| e.0)
    }

    /// HWPT_GET_DIRTY_BITMAP into `bitmap_gpa`; returns the bitmap bytes.
    pub fn dirty_bitmap(
        &mut self,
        hwpt: u32,
        iova: u64,
        len: u64,
        page_size: u64,
        flags: u32,
        bitmap_gpa: u64,
    ) -> Result<Vec<u8>, u32> {
        let a = HwptGetDirtyBitmap {
            flags,
            hwpt_id: hwpt,
            iova,
            length: len,
            page_size,
            bitmap_gpa,
            ..Default::default()
        };
        self.call(op::HWPT_GET_DIRTY_BITMAP, &a).map_err(|e| e.0)?;
        let bits = len / page_size.max(1);
        let mut out = alloc::vec![0u8; bits.div_ceil(8) as usize];
        let _ = self.mem.read(bitmap_gpa, &mut out);
        Ok(out)
    }
}

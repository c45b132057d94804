//! An end-to-end exercise of the hypercall ABI with real device DMA, for the hypervisor's
//! in-VM tests (QEMU: VT-d + edu) and for host tests against the VT-d backend.
//!
//! [`dma_flow`] drives `dispatch` exactly as a guest would (through [`Client`]): discovers the
//! device, reads what it reserves, creates an IOAS limited to the device's DMA window, attaches,
//! maps a source and a destination page, makes the device copy one into the other, then moves
//! the device to a second IOAS with DEVICE_REPLACE and checks that its DMA now lands in another
//! page, unmaps, detaches and destroys everything. [`SliceMemory`] is a guest memory made of
//! one host-contiguous byte slice (a buffer the hypervisor owns), and [`DmaEngine`] is the device.
//!
//! The hypervisor side of a QEMU scenario is a few lines (verified with QEMU's intel-iommu in
//! legacy mode with and without snoop control, and in scalable mode, with edu at 00:05.0):
//!
//! ```ignore
//! struct EduDma<'a>(&'a EduDevice);
//! impl<H: IommuHw> DmaEngine<H> for EduDma<'_> {
//!     fn memory_to_device(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
//!         self.0.edu.dma_to_device(iova, len).map_err(|_| "edu")?;
//!         self.0.edu.wait_dma(DMA_POLLS).map_err(|_| "edu timed out")
//!     }
//!     fn device_to_memory(&mut self, _: &H, iova: u64, len: usize) -> Result<(), &'static str> {
//!         self.0.edu.dma_from_device(iova, len).map_err(|_| "edu")?;
//!         self.0.edu.wait_dma(DMA_POLLS).map_err(|_| "edu timed out")
//!     }
//! }
//! // unit: a VtdUnit brought up (RMRRs applied) with translation enabled; sid: edu's RID.
//! let info = vtd_backend::device_info(&unit, sid, 1, 0);
//! let backend = VtdBackend::new(vec![unit], &IOMMU_MEMORY, vec![VtdDevice { info, unit: 0, sid }]);
//! let mut fd = Iommufd::new(backend, Limits::default())?;
//! let g = fd.create_guest()?;
//! fd.assign_device(g, 0)?;
//! let pa = FRAMES.lock().alloc(FLOW_MEMORY / PAGE_SIZE, PAGE_SIZE, u64::MAX)?;
//! let buf = DmaBuffer::alloc(FLOW_MEMORY, PAGE_SIZE)?; // device-written: volatile accessors
//! let gm = DmaGuestMemory::new(&buf);                   // a `FlowMemory` over it
//! dma_flow(&mut fd, g, &gm, sid as u64, &mut EduDma(&dev), &mut |l| println!("{l}"))?;
//! fd.destroy_guest(g)?;
//! ```

use core::cell::RefCell;

use hvabi::{MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE, errno, kind, reason};

use super::client::Client;
use super::{GuestId, GuestMemory, HostRun, IommuHw, Iommufd, MemFault, PAGE};

/// Guest memory made of one byte slice: guest-physical `[gpa, gpa + len)` is host-physical
/// `[hpa, hpa + len)`.
pub struct SliceMemory<'a> {
    gpa: u64,
    hpa: u64,
    bytes: RefCell<&'a mut [u8]>,
}

impl<'a> SliceMemory<'a> {
    pub fn new(gpa: u64, hpa: u64, bytes: &'a mut [u8]) -> Self {
        SliceMemory {
            gpa,
            hpa,
            bytes: RefCell::new(bytes),
        }
    }

    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn hpa(&self) -> u64 {
        self.hpa
    }

    pub fn len(&self) -> u64 {
        self.bytes.borrow().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn range(&self, gpa: u64, len: u64) -> Option<core::ops::Range<usize>> {
        let off = gpa.checked_sub(self.gpa)?;
        let end = off.checked_add(len)?;
        (end <= self.len()).then_some(off as usize..end as usize)
    }

    /// Reads at a host-physical address (what a device reaches).
    pub fn read_hpa(&self, hpa: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let gpa = hpa.checked_sub(self.hpa).ok_or(MemFault)? + self.gpa;
        self.read(gpa, buf)
    }

    /// Writes at a host-physical address.
    pub fn write_hpa(&self, hpa: u64, buf: &[u8]) -> Result<(), MemFault> {
        let gpa = hpa.checked_sub(self.hpa).ok_or(MemFault)? + self.gpa;
        self.write(gpa, buf)
    }
}

impl GuestMemory for SliceMemory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let r = self.range(gpa, buf.len() as u64).ok_or(MemFault)?;
        buf.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemFault> {
        let r = self.range(gpa, buf.len() as u64).ok_or(MemFault)?;
        self.bytes.borrow_mut()[r].copy_from_slice(buf);
        Ok(())
    }

    fn owns(&self, gpa: u64, len: u64, _write: bool) -> bool {
        self.range(gpa, len).is_some()
    }

    fn translate(&self, gpa: u64) -> Option<HostRun> {
        let off = gpa.checked_sub(self.gpa)?;
        (off < self.len()).then(|| HostRun {
            hpa: self.hpa + off,
            len: self.len() - off,
        })
    }
}

/// The guest memory a flow runs in: one guest-physical run starting at [`gpa`](Self::gpa).
/// [`SliceMemory`] is one (host tests); the hypervisor's is a DMA buffer with volatile accessors,
/// since the device writes it behind the compiler's back.
pub trait FlowMemory: GuestMemory {
    /// Guest-physical address of the first byte.
    fn gpa(&self) -> u64;
    /// Bytes in the run.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn as_guest_memory(&self) -> &dyn GuestMemory;
}

impl FlowMemory for SliceMemory<'_> {
    fn gpa(&self) -> u64 {
        SliceMemory::gpa(self)
    }
    fn len(&self) -> u64 {
        SliceMemory::len(self)
    }
    fn as_guest_memory(&self) -> &dyn GuestMemory {
        self
    }
}

/// A DMA-capable device with an internal buffer (QEMU's edu has 4 KiB).
pub trait DmaEngine<H: IommuHw> {
    /// The device reads `len` bytes at `iova` into its buffer.
    fn memory_to_device(&mut self, hw: &H, iova: u64, len: usize) -> Result<(), &'static str>;
    /// The device writes `len` bytes of its buffer at `iova`.
    fn device_to_memory(&mut self, hw: &H, iova: u64, len: usize) -> Result<(), &'static str>;
}

/// Where a [`dma_flow`] failed: the step, and the errno if a hypercall failed (0 otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowError {
    pub step: &'static str,
    pub errno: u32,
}

fn fail(step: &'static str) -> impl Fn(u32) -> FlowError {
    move |errno| FlowError { step, errno }
}

fn check(ok: bool, step: &'static str) -> Result<(), FlowError> {
    if ok {
        Ok(())
    } else {
        Err(FlowError { step, errno: 0 })
    }
}

/// Bytes of `mem` the flow needs: 64 KiB of argument scratch, then three pages.
pub const FLOW_MEMORY: u64 = 0x14000;

/// The IOVA window used: within a 28-bit DMA mask (edu), above 1 MiB.
pub const FLOW_WINDOW: (u64, u64) = (0x10_0000, 0x0fff_ffff);

fn pattern(seed: u8, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = seed.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8;
    }
}

/// Runs the flow for the device whose `hw_id` is `hw_id`, assigned to `guest`, with `mem` of at
/// least [`FLOW_MEMORY`] bytes. `log` gets one line per step. Leaves no object behind.
pub fn dma_flow<H: IommuHw>(
    fd: &mut Iommufd<H>,
    guest: GuestId,
    mem: &dyn FlowMemory,
    hw_id: u64,
    dma: &mut dyn DmaEngine<H>,
    log: &mut dyn FnMut(&str),
) -> Result<(), FlowError> {
    check(mem.len() >= FLOW_MEMORY, "guest memory too small")?;
    let objects = fd.object_count(guest);
    let base = mem.gpa();
    let mem: &dyn GuestMemory = mem.as_guest_memory();
    let (src, dst1, dst2) = (base + 0x10000, base + 0x11000, base + 0x12000);
    let mut c = Client::new(fd, guest, mem, base);

    let info = c.get_info().map_err(fail("GET_INFO"))?;
    check(info.out_abi_version == 1, "ABI version")?;
    let devs = c.devices().map_err(fail("DEVICE_LIST"))?;
    let dev = devs
        .iter()
        .find(|d| d.hw_id == hw_id)
        .ok_or(FlowError {
            step: "device not assigned",
            errno: 0,
        })?
        .dev_id;
    log("iommufd: GET_INFO, DEVICE_LIST: device found");
    let resv = c
        .reserved_ranges(dev)
        .map_err(fail("DEVICE_RESERVED_RANGES"))?;
    let window_free = resv
        .iter()
        .all(|r| r.last < FLOW_WINDOW.0 || r.start > FLOW_WINDOW.1);
    check(window_free, "a reserved range inside the DMA window")?;

    // IOAS 1: attach, map the source (read-only) and the first destination (write-only).
    let ioas1 = c.ioas_alloc().map_err(fail("IOAS_ALLOC"))?;
    c.allow_iovas(ioas1, &[FLOW_WINDOW])
        .map_err(fail("IOAS_ALLOW_IOVAS"))?;
    let hwpt1 = c.attach(dev, ioas1).map_err(fail("DEVICE_ATTACH"))?;
    let iova_src = c
        .map(ioas1, src, PAGE, MAP_READABLE, 0)
        .map_err(fail("IOAS_MAP src"))?;
    let iova_dst = c
        .map(ioas1, dst1, PAGE, MAP_WRITEABLE, 0)
        .map_err(fail("IOAS_MAP dst"))?;
    for iova in [iova_src, iova_dst] {
        check(
            iova >= FLOW_WINDOW.0 && iova < FLOW_WINDOW.1,
            "automatic IOVA outside the allowed window",
        )?;
    }
    let ranges = c.iova_ranges(ioas1).map_err(fail("IOAS_IOVA_RANGES"))?;
    check(
        ranges.iter().any(|&(s, l)| s <= iova_src && iova_src <= l),
        "mapped IOVA not in IOVA_RANGES",
    )?;
    log("iommufd: IOAS 1 created, device attached, two pages mapped");

    let mut want = [0u8; PAGE as usize];
    pattern(0x5a, &mut want);
    let zero = [0u8; PAGE as usize];
    let w = |gpa, b: &[u8]| {
        mem.write(gpa, b).map_err(|_| FlowError {
            step: "memory",
            errno: 0,
        })
    };
    w(src, &want)?;
    w(dst1, &zero)?;
    w(dst2, &zero)?;
    dma.memory_to_device(c.fd.hw(), iova_src, PAGE as usize)
        .map_err(|step| FlowError { step, errno: 0 })?;
    dma.device_to_memory(c.fd.hw(), iova_dst, PAGE as usize)
        .map_err(|step| FlowError { step, errno: 0 })?;
    let mut got = [0u8; PAGE as usize];
    mem.read(dst1, &mut got).map_err(|_| FlowError {
        step: "memory",
        errno: 0,
    })?;
    check(got == want, "DMA through IOAS 1: destination differs")?;
    log("iommufd: device DMA through IOAS 1 copied the page");

    // IOAS 2: the same IOVAs, another destination page; REPLACE moves the device.
    let ioas2 = c.ioas_alloc().map_err(fail("IOAS_ALLOC 2"))?;
    c.map(ioas2, src, PAGE, MAP_READABLE | MAP_FIXED_IOVA, iova_src)
        .map_err(fail("IOAS_MAP 2 src"))?;
    c.map(ioas2, dst2, PAGE, MAP_WRITEABLE | MAP_FIXED_IOVA, iova_dst)
        .map_err(fail("IOAS_MAP 2 dst"))?;
    let hwpt2 = c.replace(dev, ioas2).map_err(fail("DEVICE_REPLACE"))?;
    check(hwpt2 != hwpt1, "REPLACE kept the HWPT")?;
    check(c.destroy(hwpt1).is_err(), "old automatic HWPT survived")?;
    w(dst1, &zero)?;
    pattern(0xa5, &mut want);
    w(src, &want)?;
    dma.memory_to_device(c.fd.hw(), iova_src, PAGE as usize)
        .map_err(|step| FlowError { step, errno: 0 })?;
    dma.device_to_memory(c.fd.hw(), iova_dst, PAGE as usize)
        .map_err(|step| FlowError { step, errno: 0 })?;
    mem.read(dst2, &mut got).map_err(|_| FlowError {
        step: "memory",
        errno: 0,
    })?;
    check(got == want, "DMA through IOAS 2: destination differs")?;
    mem.read(dst1, &mut got).map_err(|_| FlowError {
        step: "memory",
        errno: 0,
    })?;
    check(got == zero, "DMA after REPLACE reached IOAS 1's page")?;
    log("iommufd: DEVICE_REPLACE moved the device; DMA lands through IOAS 2");

    // Teardown with the ABI's checks: a busy IOAS names its blocker.
    let unmapped = c.unmap(ioas2, 0, u64::MAX).map_err(fail("IOAS_UNMAP"))?;
    check(unmapped == 2 * PAGE, "UNMAP byte count")?;
    c.destroy(ioas1).map_err(|e| fail("DESTROY ioas1")(e.0))?;
    match c.destroy(ioas2) {
        Err((errno::EBUSY, d)) if d.out_blocker_kind == kind::DEVICE && d.out_blocker_id == dev => {
        }
        _ => {
            return Err(FlowError {
                step: "DESTROY of a busy IOAS",
                errno: 0,
            });
        }
    }
    check(c.last_error().out_reason == reason::BUSY, "GET_LAST_ERROR")?;
    c.detach(dev).map_err(fail("DEVICE_DETACH"))?;
    c.destroy(ioas2).map_err(|e| fail("DESTROY ioas2")(e.0))?;
    check(c.fd.object_count(guest) == objects, "objects left behind")?;
    log("iommufd: unmapped, detached, destroyed; nothing left");
    Ok(())
}

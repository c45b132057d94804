//! Memory a device reads and writes by DMA behind the compiler's back.
//!
//! A [`DmaBuffer`] owns its frames and never hands out a Rust reference to them: a `&mut [u8]`
//! over memory a device writes would let the compiler assume nothing else changes it (and a
//! `&[u8]` that nothing does). Every access is a volatile load or store at an offset, like rust-
//! vmm's `VolatileSlice` and Asterinas' `DmaCoherent` reader/writer; comparisons and hashes read
//! the whole range through the same accessors. Memory a device writes is read only after the
//! device's completion signal and `Mmio::dma_rmb` (edu's `wait_dma` issues it).
//!
//! The frames are ordinary write-back RAM: on x86 and on QEMU's coherent SMMUv3 the device's
//! accesses snoop the CPU caches, so no cache maintenance is needed here.

use super::frame::PAGE_SIZE;
use super::phys::Frames;
use core::ops::Range;

/// A physically contiguous, zeroed buffer a device may DMA into or out of.
#[derive(Debug)]
pub struct DmaBuffer {
    /// The buffer's physical (and, untranslated, bus) address: a copy for mapping it into an
    /// IOMMU domain; the accessors never use it.
    pub pa: u64,
    len: usize,
    frames: Frames,
}

#[allow(
    dead_code,
    reason = "the whole accessor set; each scenario uses a subset"
)]
impl DmaBuffer {
    /// `len` bytes (rounded up to whole frames) aligned to `align`, zero-filled.
    pub fn alloc(len: u64, align: u64) -> Option<DmaBuffer> {
        let frames = Frames::alloc(len.div_ceil(PAGE_SIZE).max(1), align, u64::MAX)?;
        let buf = DmaBuffer {
            pa: frames.pa(),
            len: len as usize,
            frames,
        };
        buf.fill(0..buf.len, 0);
        Some(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Byte `offset` (out of range is a bug in the scenario code, never guest input: panics).
    pub fn read_u8(&self, offset: usize) -> u8 {
        assert!(
            offset < self.len,
            "DMA buffer read at {offset:#x} of {:#x}",
            self.len
        );
        self.frames.read_volatile(offset)
    }

    pub fn write_u8(&self, offset: usize, value: u8) {
        assert!(
            offset < self.len,
            "DMA buffer write at {offset:#x} of {:#x}",
            self.len
        );
        self.frames.write_volatile(offset, value)
    }

    fn check(&self, r: &Range<usize>) {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "DMA buffer range {r:?} outside {:#x}",
            self.len
        );
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.check(&(offset..offset + src.len()));
        for (i, &b) in src.iter().enumerate() {
            self.write_u8(offset + i, b);
        }
    }

    /// Copies bytes at `offset` out of the buffer into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check(&(offset..offset + dst.len()));
        for (i, b) in dst.iter_mut().enumerate() {
            *b = self.read_u8(offset + i);
        }
    }

    pub fn fill(&self, r: Range<usize>, value: u8) {
        self.check(&r);
        for i in r {
            self.write_u8(i, value);
        }
    }

    /// Writes [`pattern_byte`]`(seed, i)` at every offset `i` of `r`, counting from `r.start`.
    pub fn fill_pattern(&self, r: Range<usize>, seed: u8) {
        self.check(&r);
        for (i, at) in r.enumerate() {
            self.write_u8(at, pattern_byte(seed, i));
        }
    }

    /// The first offset in `r` whose byte differs from `expected(offset - r.start)`, if any.
    pub fn mismatch(&self, r: Range<usize>, expected: impl Fn(usize) -> u8) -> Option<usize> {
        self.check(&r);
        let start = r.start;
        r.into_iter()
            .find(|&at| self.read_u8(at) != expected(at - start))
    }

    /// Whether `r` holds the pattern [`fill_pattern`](Self::fill_pattern) wrote with `seed`.
    pub fn holds_pattern(&self, r: Range<usize>, seed: u8) -> bool {
        self.mismatch(r, |i| pattern_byte(seed, i)).is_none()
    }

    /// Whether the `len` bytes at `a` equal the `len` bytes at `b` (a DMA round trip: what the
    /// device read from one place and wrote back to another).
    pub fn same(&self, a: usize, b: usize, len: usize) -> bool {
        self.check(&(a..a + len));
        self.check(&(b..b + len));
        (0..len).all(|i| self.read_u8(a + i) == self.read_u8(b + i))
    }

    /// Whether every byte of `r` is `value`.
    pub fn all(&self, r: Range<usize>, value: u8) -> bool {
        self.mismatch(r, |_| value).is_none()
    }

    /// FNV-1a over the whole buffer: two snapshots that hash equal (almost surely) hold the same
    /// bytes, so "the device did not touch this buffer" checks every byte, not a sample.
    pub fn hash(&self) -> u64 {
        (0..self.len).fold(0xcbf2_9ce4_8422_2325u64, |h, i| {
            (h ^ u64::from(self.read_u8(i))).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// Returns the frames to the allocator. Only once no device can still reach them (the
    /// IOMMU mapping is gone and invalidated); dropping without this leaks them.
    pub fn free(self) {
        self.frames.free();
    }
}

/// A recognisable byte pattern, different per seed.
pub fn pattern_byte(seed: u8, i: usize) -> u8 {
    seed.wrapping_add((i as u8).wrapping_mul(7)) ^ (i >> 8) as u8
}

/// A [`DmaBuffer`] seen as one guest's memory, for the in-hypervisor ABI scenarios: the
/// "guest" is the hypervisor itself, its guest-physical addresses are the buffer's host-physical
/// ones, and every access goes through the buffer's volatile accessors, because the device
/// writes this memory by DMA while the object model reads it.
pub struct DmaGuestMemory<'a> {
    buf: &'a DmaBuffer,
}

impl<'a> DmaGuestMemory<'a> {
    pub fn new(buf: &'a DmaBuffer) -> Self {
        DmaGuestMemory { buf }
    }

    fn range(&self, gpa: u64, len: usize) -> Option<usize> {
        let off = gpa.checked_sub(self.buf.pa)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.buf.len() as u64).then_some(off as usize)
    }
}

impl iommu::iommufd::GuestMemory for DmaGuestMemory<'_> {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), iommu::iommufd::MemFault> {
        let off = self.range(gpa, out.len()).ok_or(iommu::iommufd::MemFault)?;
        self.buf.read(off, out);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), iommu::iommufd::MemFault> {
        let off = self
            .range(gpa, data.len())
            .ok_or(iommu::iommufd::MemFault)?;
        self.buf.write(off, data);
        Ok(())
    }

    fn owns(&self, gpa: u64, len: u64, _write: bool) -> bool {
        usize::try_from(len).is_ok_and(|len| self.range(gpa, len).is_some())
    }

    fn translate(&self, gpa: u64) -> Option<iommu::iommufd::HostRun> {
        let off = self.range(gpa, 1)? as u64;
        Some(iommu::iommufd::HostRun {
            hpa: self.buf.pa + off,
            len: self.buf.len() as u64 - off,
        })
    }
}

impl iommu::iommufd::selftest::FlowMemory for DmaGuestMemory<'_> {
    fn gpa(&self) -> u64 {
        self.buf.pa
    }

    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn as_guest_memory(&self) -> &dyn iommu::iommufd::GuestMemory {
        self
    }
}

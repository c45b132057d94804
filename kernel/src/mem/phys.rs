//! The unsafe edge between physical addresses and Rust references: every access to memory the
//! hypervisor did not allocate as a Rust object (firmware tables, MMIO registers, frames handed
//! out by the frame allocator) goes through this module and the direct map.

use crate::arch;
use core::ptr;

/// Errors when touching physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysError {
    /// The range is not covered by the direct map.
    NotMapped { pa: u64, len: u64 },
}

impl core::fmt::Display for PhysError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PhysError::NotMapped { pa, len } => {
                write!(
                    f,
                    "physical range {pa:#x}+{len:#x} is outside the direct map"
                )
            }
        }
    }
}

fn virt(pa: u64, len: u64) -> Result<usize, PhysError> {
    let end = pa
        .checked_add(len)
        .ok_or(PhysError::NotMapped { pa, len })?;
    if end > arch::direct_map_limit() {
        return Err(PhysError::NotMapped { pa, len });
    }
    arch::phys_to_virt(pa).ok_or(PhysError::NotMapped { pa, len })
}

/// A read-only view of firmware-provided memory (ACPI tables, the DTB).
///
/// The returned slice aliases memory that firmware wrote before we started and that nothing in
/// the hypervisor writes, so a shared `'static` reference is sound for read-only tables.
pub fn firmware_bytes(pa: u64, len: u64) -> Result<&'static [u8], PhysError> {
    let va = virt(pa, len)?;
    // SAFETY: `virt` checked the range lies inside the direct map, which maps it readable for the
    // hypervisor's lifetime. Callers only pass firmware-owned ranges (tables, DTB) that the
    // frame allocator has reserved, so no Rust object aliases them mutably.
    Ok(unsafe { core::slice::from_raw_parts(va as *const u8, len as usize) })
}

/// Exclusive access to frames the caller just allocated from the frame allocator.
pub fn frame_bytes_mut(pa: u64, len: u64) -> Result<&'static mut [u8], PhysError> {
    let va = virt(pa, len)?;
    // SAFETY: the frames came from the frame allocator, which hands each frame to one owner; the
    // direct map maps them read-write; the reference lives as long as the caller owns the frames.
    Ok(unsafe { core::slice::from_raw_parts_mut(va as *mut u8, len as usize) })
}

/// A window of MMIO registers reached through the direct map, implementing the IOMMU crate's
/// [`iommu::hw::Mmio`] with volatile accesses of exactly the width asked for.
#[derive(Clone, Copy, Debug)]
pub struct MmioRegion {
    base: usize,
    size: usize,
    pub phys: u64,
}

impl MmioRegion {
    pub fn new(pa: u64, size: u64) -> Result<Self, PhysError> {
        Ok(Self {
            base: virt(pa, size)?,
            size: size as usize,
            phys: pa,
        })
    }

    fn addr(&self, offset: usize, width: usize) -> usize {
        // A bad offset is a driver bug, not guest input: stop loudly rather than touch memory
        // outside the device.
        assert!(
            offset.is_multiple_of(width) && offset + width <= self.size,
            "MMIO access at {offset:#x} (width {width}) outside {:#x}+{:#x}",
            self.phys,
            self.size
        );
        self.base + offset
    }
}

impl iommu::hw::Mmio for MmioRegion {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `addr` keeps the access aligned and inside the register window, which the
        // direct map maps as device memory for the hypervisor's lifetime.
        unsafe { ptr::read_volatile(self.addr(offset, 4) as *const u32) }
    }

    fn write32(&self, offset: usize, value: u32) {
        // Register writes are doorbells for memory the device reads (queues, tables): order
        // earlier stores first, like Linux's writel.
        crate::arch::cache::dma_wmb();
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile(self.addr(offset, 4) as *mut u32, value) }
    }

    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read32`.
        unsafe { ptr::read_volatile(self.addr(offset, 8) as *const u64) }
    }

    fn write64(&self, offset: usize, value: u64) {
        crate::arch::cache::dma_wmb();
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile(self.addr(offset, 8) as *mut u64, value) }
    }

    fn dma_rmb(&self) {
        crate::arch::cache::dma_rmb();
    }
}

impl drivers::fw_cfg::MmioWrite16 for MmioRegion {
    fn write16(&self, offset: usize, value: u16) {
        // SAFETY: as in `read32`: aligned, inside the register window, device memory.
        unsafe { ptr::write_volatile(self.addr(offset, 2) as *mut u16, value) }
    }
}

/// A table of `n` 64-bit entries at `pa`, as atomics: how IOMMU tables are read and written.
pub fn atomic_u64s(
    pa: u64,
    n: usize,
) -> Result<&'static [core::sync::atomic::AtomicU64], PhysError> {
    let len = (n as u64)
        .checked_mul(8)
        .ok_or(PhysError::NotMapped { pa, len: u64::MAX })?;
    let va = virt(pa, len)?;
    if va % 8 != 0 {
        return Err(PhysError::NotMapped { pa, len });
    }
    // SAFETY: the range is mapped read-write (checked by `virt`), 8-byte aligned (checked), and
    // belongs to frames handed to the IOMMU memory source; every access to it goes through these
    // atomics (by the engine) or by the IOMMU hardware, so shared references are sound.
    Ok(unsafe { core::slice::from_raw_parts(va as *const core::sync::atomic::AtomicU64, n) })
}

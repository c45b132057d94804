//! Device registers at a fixed physical address, reached through the identity map.
//!
//! The boot console needs MMIO before (and independently of) the kernel's general MMIO layer, and
//! must work from exception context, so it has this minimal [`iommu::hw::Mmio`] implementation.

use core::ptr;

/// A register block at `base`, which the current EL2 map maps as Device memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceMmio {
    base: usize,
}

impl DeviceMmio {
    /// # Safety
    /// `base` must be the identity-mapped address of a device register block, mapped Device (not
    /// RAM, so no Rust object can alias it), large enough for every offset the driver uses, and
    /// it must stay mapped for as long as the value is used.
    pub const unsafe fn new(base: usize) -> Self {
        Self { base }
    }
}

impl iommu::hw::Mmio for DeviceMmio {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract: `base + offset` is a mapped device register; drivers pass
        // naturally aligned constant offsets inside their register block.
        unsafe { ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read32`.
        unsafe { ptr::read_volatile((self.base + offset) as *const u64) }
    }

    fn write64(&self, offset: usize, value: u64) {
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u64, value) }
    }
}

//! The narrow interfaces through which the IOMMU code touches hardware.
//!
//! The hypervisor implements them over real MMIO and its direct map (in `kernel`, the only place
//! with `unsafe`); host tests implement them over plain memory and fake register files.

/// A block of memory-mapped device registers, addressed by byte offset from its base.
///
/// Access widths are explicit because devices care: SMMUv3 32-bit registers must be accessed with
/// 32-bit loads and stores (SMMUv3 §6.2), and VT-d 64-bit registers may be accessed as two halves
/// only in a defined order (VT-d 3.4 §10.2). Offsets must be naturally aligned for the width.
pub trait Mmio {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    fn read64(&self, offset: usize) -> u64;
    fn write64(&self, offset: usize, value: u64);
}

//! The narrow interface through which drivers touch device registers, and the DMA ordering hooks
//! that go with it.
//!
//! This is the bottom crate of the driver stack: `iommu` (VT-d, SMMUv3) and `drivers` (UARTs,
//! PCI, fw_cfg, edu) both program devices through [`Mmio`] and neither needs the other for it.
//! The hypervisor implements the trait over real MMIO (in `kernel`, whose `mem::phys` and `arch`
//! modules hold the `unsafe` volatile accesses and barrier instructions); host tests implement it
//! over fake register files, where the barriers are no-ops because a fake device runs in program
//! order on the same thread.

#![no_std]
#![forbid(unsafe_code)]

/// A block of memory-mapped device registers, addressed by byte offset from its base.
///
/// Access widths are explicit because devices care: SMMUv3 32-bit registers must be accessed with
/// 32-bit loads and stores (SMMUv3 §6.2), and VT-d 64-bit registers may be accessed as two halves
/// only in a defined order (VT-d 3.4 §10.2). Offsets must be naturally aligned for the width.
///
/// # Ordering against DMA
///
/// A register write is often a doorbell for memory the device reads (queue entries, tables), so
/// implementations order the CPU's earlier normal-memory stores before every `write32`/`write64`
/// (Linux `writel` semantics: `dma_wmb` then the store).
///
/// The read side is not implied: after a driver reads a register that says "the device has
/// written memory" (SMMUv3 EVENTQ_PROD, a VT-d invalidation-wait status it polled), the CPU may
/// still have speculated loads of that memory from before the register read. The driver calls
/// [`Mmio::dma_rmb`] between the register read and the memory reads.
pub trait Mmio {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    fn read64(&self, offset: usize) -> u64;
    fn write64(&self, offset: usize, value: u64);

    /// Orders every earlier read (of registers or of memory) before every later read of memory
    /// that a device writes by DMA, as seen from the outer-shareable domain the device is in.
    ///
    /// Real hardware: a load-load barrier for DMA (`dmb oshld` on aarch64, Arm ARM B2.3.11). On
    /// x86 loads are not reordered with other loads (SDM vol 3 §10.2.2) and UC register reads are
    /// not passed by later WB loads, so a compiler fence suffices there. Fakes keep the default:
    /// a fake device writes its memory on the same thread, in program order.
    #[inline]
    fn dma_rmb(&self) {}
}

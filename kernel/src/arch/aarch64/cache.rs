//! Cache maintenance for structures a non-coherent SMMU walks (IDR0.COHACC = 0).

/// Smallest data-cache line, from CTR_EL0.DminLine (log2 of words; Arm ARM D23.2.34).
fn dcache_line() -> usize {
    let ctr: u64;
    // SAFETY: CTR_EL0 is readable at EL2 and has no side effects.
    unsafe {
        core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags))
    };
    4 << ((ctr >> 16) & 0xf)
}

/// Cleans `[va, va + len)` to the point of coherency (DC CVAC) and waits for completion (DSB),
/// so a walker that does not snoop the caches sees the data.
///
/// # Safety
/// `[va, va + len)` must be mapped memory. DC CVAC does not change memory contents, so no
/// reference to the range is needed or created; an unmapped line would fault.
pub unsafe fn clean(va: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let va = va as usize;
    let step = dcache_line();
    let mut line = va & !(step - 1);
    while line < va + len {
        // SAFETY: DC CVAC on a mapped address (the caller's contract) only affects cache state.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) line, options(nostack, preserves_flags)) };
        line += step;
    }
    // SAFETY: DSB SY waits for the cleans to complete before later accesses (the SMMU doorbell).
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Orders this CPU's earlier stores to memory before a later store to a device register, as
/// seen by a DMA master in the outer-shareable domain (DMB OSHST; Arm ARM B2.3.11): the
/// command-queue entries must be visible before the PROD doorbell that announces them.
#[inline(always)]
pub fn dma_wmb() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { core::arch::asm!("dmb oshst", options(nostack, preserves_flags)) };
}

/// Orders this CPU's earlier reads (e.g. of a queue's PROD register) before its later reads of
/// memory a DMA master in the outer-shareable domain wrote (DMB OSHLD; Arm ARM B2.3.11): the
/// event records the SMMU wrote before advancing EVENTQ_PROD must not be read speculatively
/// from before the PROD read.
#[inline(always)]
pub fn dma_rmb() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { core::arch::asm!("dmb oshld", options(nostack, preserves_flags)) };
}

//! Cache maintenance and wide stores for structures a non-coherent IOMMU walks.

/// Cache-line size assumed for CLFLUSH (CPUID.01H:EBX[15:8] × 8 is 64 on every x86-64 part
/// with VT-d).
const LINE: usize = 64;

/// Writes back (and invalidates) every cache line of `[va, va + len)` so a walker that does not
/// snoop the caches (VT-d ECAP.C = 0) sees the data, and waits for that to complete.
///
/// # Safety
/// `[va, va + len)` must be mapped memory. CLFLUSH does not change memory contents, so no
/// reference to the range is needed or created; an unmapped line would fault.
pub unsafe fn clean(va: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let va = va as usize;
    let mut line = va & !(LINE - 1);
    while line < va + len {
        // SAFETY: CLFLUSH only affects the cache state of a mapped line (the caller's contract);
        // it cannot fault on a mapped, readable line.
        unsafe {
            core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags))
        };
        line += LINE;
    }
    // SAFETY: MFENCE orders the CLFLUSHes before later stores (SDM vol 2 CLFLUSH: "ordered by
    // MFENCE"), e.g. the register write that tells the IOMMU to look.
    unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
}

/// Stores 16 bytes at `va` (16-byte aligned) as one single-copy-atomic write with LOCK
/// CMPXCHG16B (SDM vol 2), so an IOMMU walking a VT-d context or PASID entry sees the old or the
/// new entry, never half of each.
///
/// # Safety
/// `dst` must be a 16-byte aligned, mapped, writable address of memory that is only ever
/// accessed atomically (an IOMMU table entry), so this atomic read-modify-write cannot race with
/// a non-atomic access or alias a `&mut`.
pub unsafe fn store128(dst: *mut u8, lo: u64, hi: u64) {
    let va = dst as usize;
    assert!(va.is_multiple_of(16), "store128 at unaligned {va:#x}");
    let (mut cur_lo, mut cur_hi) = (0u64, 0u64);
    loop {
        let ok: u8;
        // SAFETY: the caller's contract: `va` is a 16-byte aligned, mapped address of atomic-only
        // memory. RBX is reserved by LLVM, so the new low half is swapped into it around the
        // instruction. On failure CMPXCHG16B loads the current value into RDX:RAX and we retry
        // with it, so the loop ends after at most one retry unless another CPU keeps writing.
        unsafe {
            core::arch::asm!(
                "xchg {lo}, rbx",
                "lock cmpxchg16b [{ptr}]",
                "sete {ok}",
                "mov rbx, {lo}",
                ptr = in(reg) va,
                lo = inout(reg) lo => _,
                ok = out(reg_byte) ok,
                inout("rax") cur_lo,
                inout("rdx") cur_hi,
                in("rcx") hi,
                options(nostack),
            );
        }
        if ok != 0 {
            return;
        }
    }
}

/// Orders earlier stores before a later device-register store. x86 keeps stores in program
/// order and UC MMIO stores are not reordered with earlier write-back stores (SDM vol 3
/// §10.2.2), so only the compiler must be stopped from reordering.
#[inline(always)]
pub fn dma_wmb() {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
}

/// Orders earlier reads before later reads of DMA-written memory. x86 does not reorder loads
/// with other loads, and a UC register read is not passed by later WB loads (SDM vol 3
/// §10.2.2, "reads are not reordered with other reads"), and DMA writes are snooped into the
/// coherent caches; so only the compiler must be stopped from moving the memory reads above
/// the register read.
#[inline(always)]
pub fn dma_rmb() {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Acquire);
}

//! Architecture layer. Each architecture module provides the same small interface, used by the
//! architecture-neutral rest of the hypervisor:
//!
//! ```text
//! fn init_cpu(info: &BootInfo)              // exception vectors, GDT/IDT, CPU features
//! fn console_init(info: &BootInfo)          // the boot console (16550 / PL011)
//! fn console_write(bytes: &[u8])            // polled console output, usable from exception context
//! fn init_direct_map(info: &BootInfo)       // map all RAM and the low MMIO holes
//! fn phys_to_virt(pa: u64) -> Option<usize> // address of `pa` in the direct map
//! fn direct_map_limit() -> u64              // first physical address not mapped
//! fn selftest(name: &str)                   // raise an exception on purpose (scenarios)
//! fn exit(status: u32) -> !                 // QEMU: report status and power off; hardware: halt
//! fn halt() -> !                            // stop this CPU for good
//! ```
//!
//! All inline assembly lives below this module, each block with a `SAFETY:` comment.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use self::aarch64::*;

/// `selftest=stack-overflow`: recurses with a 1 KiB frame until the stack runs into its guard
/// page. The fault is taken on a separate stack (x86: the #PF cannot be delivered, so #DF on
/// IST1; aarch64: the abort is taken on SP_EL2 while the hypervisor runs on SP_EL0), whose
/// handler reports "stack overflow" and exits with a failure status. Never returns normally.
#[inline(never)]
pub fn overflow_stack(depth: u64) -> u64 {
    let mut frame = [0u8; 1024];
    // black_box: the frame must really be on the stack and written, and the recursion must not
    // be turned into a loop.
    core::hint::black_box(&mut frame)[0] = depth as u8;
    if core::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    overflow_stack(depth + 1).wrapping_add(u64::from(core::hint::black_box(&frame)[1]))
}

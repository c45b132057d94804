//! aarch64: the hypervisor runs at EL2 in the non-VHE regime (HCR_EL2.E2H = 0), entered through
//! the arm64 Image protocol by `boot::aarch64`, which leaves the MMU on with a boot identity map.
//!
//! - [`console_init`]/[`console_write`]: polled PL011 (`drivers::pl011`) found through the DTB;
//! - [`init_cpu`]: refuses to go on if the entry reported a problem, then installs the EL2
//!   exception vectors (fatal exceptions are dumped and end with status 1);
//! - [`init_direct_map`]/[`phys_to_virt`]/[`direct_map_limit`]: the identity direct map rebuilt
//!   from the boot memory map;
//! - [`exit`]/[`halt`]: PSCI SYSTEM_OFF or semihosting SYS_EXIT, else `wfe` forever.
//!
//! Inline assembly and raw pointers are confined to `exception` (vectors), `mmu` (TTBR switch,
//! AT), `power` (SMC/HLT/WFE), `mmio` (the UART registers) and `selftest` (fault triggers).

pub mod cache;
mod exception;
pub mod irq;
mod mmio;
mod mmu;
mod power;
pub mod preempt;
mod selftest;
pub mod smp;
pub mod smp_check;
mod uart;

use boot::BootInfo;

pub use mmu::{direct_map_limit, init_direct_map, phys_to_virt};
pub use power::exit;
pub use selftest::selftest;
#[allow(
    unused_imports,
    reason = "arch interface for the memory and IOMMU code"
)]
pub use {
    mmu::{DIRECT_MAP_BASE, virt_to_phys},
    power::halt,
};

/// Finds the boot console in the device tree and prepares it. Called first by `hv_main`.
pub fn console_init(info: &BootInfo) {
    uart::init(info);
}

/// The console's register window (physical = identity address, size), for the physical-memory
/// ledger: it is MMIO the console writes without going through `mem::phys`.
pub fn console_mmio() -> Option<(u64, u64)> {
    uart::base().map(|b| (b, 0x1000))
}

/// Writes bytes to the boot console (polled; safe from exception context).
pub fn console_write(bytes: &[u8]) {
    uart::write(bytes);
}

/// Stops with a clear message if the entry could not set the CPU up (wrong Exception level, no or
/// bad DTB), then installs the EL2 exception vectors.
pub fn init_cpu(info: &BootInfo) {
    if let Some(error) = boot::aarch64::entry_error() {
        fatal(format_args!("boot: {error}"));
    }
    // TPIDR_EL2 -> this CPU's PerCpu before any vector can look at it.
    smp::init_boot_cpu();
    exception::install();
    uart::log_choice(info);
}

/// Prints `message` and the status line `cargo xtask` checks, then exits with status 1. Uses
/// the unlocked console: the caller may have interrupted a holder of the console lock.
fn fatal(message: core::fmt::Arguments<'_>) -> ! {
    crate::console::print_unlocked(format_args!("hypervisor: {message}\n"));
    crate::console::print_unlocked(format_args!(
        "hypervisor: exit status {}\n",
        crate::EXIT_FAILURE
    ));
    exit(crate::EXIT_FAILURE)
}

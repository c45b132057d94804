//! Leaving the hypervisor: PSCI SYSTEM_OFF, semihosting SYS_EXIT, or parking the CPU.
//!
//! - Success (status 0): PSCI SYSTEM_OFF (Arm DEN 0022, "Power State Coordination Interface",
//!   function SYSTEM_OFF, ID 0x8400_0008). QEMU powers off and exits 0; real firmware powers the machine off.
//! - Failure with `semihosting` on the command line: semihosting SYS_EXIT (operation 0x18; Arm
//!   "Semihosting for AArch32 and AArch64", SYS_EXIT), whose AArch64 form takes in x1 a pointer to
//!   the block [reason, subcode]. With reason ADP_Stopped_ApplicationExit (0x20026) the subcode is
//!   the exit status, which `qemu -semihosting` passes on as its own exit code. The A64 semihosting
//!   trap is `HLT #0xF000`. Without `-semihosting` that instruction is undefined; the exception
//!   handler then reports it and this module falls back to PSCI (see `EXITING`).
//! - Failure otherwise: PSCI SYSTEM_OFF too (the console already carries the status line).
//!
//! The PSCI conduit is the `/psci` node's `method` (the `arm,psci` DT binding). That property
//! describes the conduit for an OS at EL1; at EL2 the only way to firmware is SMC ("hvc" would
//! trap to ourselves), so any method means SMC here. At EL3 there is no firmware above us. No
//! `/psci` node (or a PSCI 0.1 one, which defines no SYSTEM_OFF) means: halt.

use aarch64_cpu::registers::{CurrentEL, Readable};
use boot::aarch64::dtb::Conduit;
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// PSCI SYSTEM_OFF, an SMC32 function ID (DEN 0022 function ID table; SMCCC, DEN 0028).
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
/// Semihosting SYS_EXIT.
const SYS_EXIT: u64 = 0x18;
/// Semihosting ADP_Stopped_ApplicationExit.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;

/// Set by the first `exit`; a second one (from the exception handler, after a failed semihosting
/// call, for example) skips semihosting so that exiting cannot loop.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Reports `status` to whoever started us and powers off; never returns.
pub fn exit(status: u32) -> ! {
    super::uart::flush();
    let first = !EXITING.swap(true, Ordering::Relaxed);
    if first && status != 0 && semihosting_requested() {
        semihosting_exit(status);
    }
    if let Some(conduit) = psci_conduit().or_else(acpi_psci_conduit) {
        psci_system_off(conduit);
    }
    halt()
}

/// Stops this CPU for good: all interrupts masked, WFE forever.
pub fn halt() -> ! {
    // SAFETY: masking D, A, I and F only affects this CPU's interrupt delivery; we never return.
    unsafe {
        asm!(
            "msr daifset, #0xf",
            options(nomem, nostack, preserves_flags)
        )
    };
    loop {
        aarch64_cpu::asm::wfe();
    }
}

fn semihosting_requested() -> bool {
    boot::aarch64::boot_info().is_some_and(|info| info.cmdline_value("semihosting").is_some())
}

fn semihosting_exit(status: u32) {
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, u64::from(status)];
    // SAFETY: the semihosting host reads the two-word block at x1 and ends the program; if it
    // returns (a debugger chose to continue), only x0 has changed.
    unsafe {
        asm!("hlt #0xf000", inout("x0") SYS_EXIT => _, in("x1") block.as_ptr(), options(nostack, readonly))
    };
}

fn psci_conduit() -> Option<Conduit> {
    let psci = boot::aarch64::device_tree()?.psci()?;
    if !psci.standard_ids {
        return None;
    }
    match CurrentEL.read(CurrentEL::EL) {
        2 => Some(Conduit::Smc),
        1 => Some(psci.conduit),
        _ => None,
    }
}

/// ACPI-only machines (UEFI boot, no device tree) announce PSCI in the FADT's ARM_BOOT_ARCH
/// flags (ACPI 6.5 §5.2.9): PSCI_COMPLIANT, and PSCI_USE_HVC for an EL1 OS; at EL2 it is SMC.
fn acpi_psci_conduit() -> Option<Conduit> {
    let rsdp = boot::aarch64::boot_info()?.rsdp?;
    let flags = crate::firmware::acpi::discover(rsdp).ok()?.arm_boot_flags?;
    if flags & 1 == 0 {
        return None;
    }
    match CurrentEL.read(CurrentEL::EL) {
        2 => Some(Conduit::Smc),
        1 if flags & 2 != 0 => Some(Conduit::Hvc),
        1 => Some(Conduit::Smc),
        _ => None,
    }
}

fn psci_system_off(conduit: Conduit) {
    // SAFETY: an SMCCC call into firmware (or, at EL1, a hypervisor) that powers the system off;
    // if it returns (NOT_SUPPORTED, DENIED), SMCCC allows x0-x17 to be clobbered, which
    // `clobber_abi("C")` declares, and no memory of ours is touched.
    unsafe {
        match conduit {
            Conduit::Smc => {
                asm!("smc #0", inout("x0") PSCI_SYSTEM_OFF => _, options(nostack), clobber_abi("C"))
            }
            Conduit::Hvc => {
                asm!("hvc #0", inout("x0") PSCI_SYSTEM_OFF => _, options(nostack), clobber_abi("C"))
            }
        }
    }
}

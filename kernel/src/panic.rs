//! Panic handler: report and leave with a failure status; never unwind, never spin silently.

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::console::print_unlocked(format_args!("\nPANIC: {info}\n"));
    crate::console::print_unlocked(format_args!(
        "hypervisor: exit status {}\n",
        crate::EXIT_FAILURE
    ));
    crate::arch::exit(crate::EXIT_FAILURE)
}

//! The hypervisor binary. `boot` enters here through [`hv_main`] with a [`BootInfo`] on every
//! architecture and boot protocol.
#![no_std]
#![no_main]

mod arch;
mod console;
mod panic;

use boot::BootInfo;

/// Exit status reported to QEMU (and to `cargo xtask run`): 0 = success.
pub const EXIT_SUCCESS: u32 = 0;
pub const EXIT_FAILURE: u32 = 1;

#[unsafe(no_mangle)]
pub fn hv_main(info: &'static BootInfo) -> ! {
    arch::console_init(info);
    console::init_logger(info.cmdline_value("loglevel"));
    arch::init_cpu(info);
    println!("hypervisor: booted via {:?}, cmdline {:?}", info.protocol, info.cmdline);
    for r in info.memory_regions() {
        println!("  mem {:#014x}-{:#014x} {:?}", r.start, r.end(), r.kind);
    }
    finish(EXIT_SUCCESS)
}

/// Prints the status line `cargo xtask` checks and leaves through the architecture's exit path.
pub fn finish(status: u32) -> ! {
    println!("hypervisor: exit status {status}");
    arch::exit(status)
}

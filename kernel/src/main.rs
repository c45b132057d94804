//! The hypervisor binary. `boot` enters here through [`hv_main`] with a [`BootInfo`] on every
//! architecture and boot protocol.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod console;
mod discovery;
mod firmware;
mod guest;
mod iommu_owner;
#[cfg(target_arch = "x86_64")]
mod irq;
#[cfg(target_arch = "aarch64")]
mod its;
mod mem;
mod panic;
mod pci;
mod scenarios;
#[cfg(target_arch = "aarch64")]
mod smmu_irq;
mod vcpu;

use boot::BootInfo;

/// Exit status reported to QEMU (and to `cargo xtask run`): 0 = success.
pub const EXIT_SUCCESS: u32 = 0;
pub const EXIT_FAILURE: u32 = 1;

#[unsafe(no_mangle)]
pub fn hv_main(info: &'static BootInfo) -> ! {
    arch::console_init(info);
    console::init_logger(info.cmdline_value("loglevel"));
    arch::init_cpu(info);
    arch::init_direct_map(info);
    if let Some(test) = info.cmdline_value("selftest")
        && test != "phys"
    {
        arch::selftest(test);
    }
    println!(
        "hypervisor: booted via {:?}, cmdline {:?}",
        info.protocol, info.cmdline
    );
    for r in info.memory_regions() {
        log::debug!("mem {:#014x}-{:#014x} {:?}", r.start, r.end(), r.kind);
    }
    mem::phys::init(info);
    if let Err(e) = mem::init(info, firmware::dtb_len(info)) {
        log::error!("memory: {e}");
        finish(EXIT_FAILURE);
    }
    if info.cmdline_value("selftest") == Some("phys") {
        match mem::phys::selftest() {
            Ok(()) => println!("hypervisor: selftest phys: ok"),
            Err(e) => {
                log::error!("selftest phys: FAILED: {e}");
                finish(EXIT_FAILURE);
            }
        }
    }
    // Secondary CPUs need memory (their stacks), the exception tables and the physical-memory
    // ledger (the trampoline page); they then idle until work is launched on them.
    arch::smp::start_secondaries(info);
    // With guests configured and no scenario named, the hypervisor's job is to run them.
    let default = if info.cmdline_value("guest").is_some() {
        "guests"
    } else {
        "boot-report"
    };
    let scenario = info.cmdline_value("scenario").unwrap_or(default);
    // Leaked: it lives as long as the hypervisor (hv_main never returns), and the guests' schedulers
    // on secondary CPUs borrow it for good.
    let platform: &'static discovery::Platform =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(discovery::discover_and_report(info)));
    // The one owner of the IOMMUs: every unit brought up once, for the life of the system.
    iommu_owner::bring_up(info, platform);
    // LPIs and the MSI doorbell (its.rs); without an ITS, device MSIs stay off.
    #[cfg(target_arch = "aarch64")]
    if let Err(e) = its::init(info) {
        println!("report: gicv3 its none ({e})");
    }
    // Interrupt remapping before any MSI is programmed; fault events before any DMA.
    #[cfg(target_arch = "x86_64")]
    irq::init(info);
    guest::report_backend();
    let status = match scenario {
        "boot-report" => EXIT_SUCCESS,
        #[cfg(target_arch = "x86_64")]
        "vtd" => scenarios::vtd::run(info, platform),
        "abi" => scenarios::abi::run(info, platform),
        #[cfg(target_arch = "x86_64")]
        "irq" => scenarios::irq::run(info, platform),
        #[cfg(target_arch = "x86_64")]
        "smp" => arch::smp::scenario(info),
        "guests" => guest::run(info, platform),
        #[cfg(target_arch = "aarch64")]
        "smmu" => scenarios::smmu::run(info, platform),
        #[cfg(target_arch = "aarch64")]
        "its-msi" => scenarios::msi::run(info, platform),
        #[cfg(target_arch = "aarch64")]
        "smp" => arch::smp_check::run(info),
        other => {
            log::error!("unknown scenario {other:?}");
            EXIT_FAILURE
        }
    };
    #[cfg(target_arch = "x86_64")]
    irq::report();
    mem::iommu_mem::report();
    println!("report: done");
    finish(status)
}

/// Prints the status line `cargo xtask` checks and leaves through the architecture's exit path.
pub fn finish(status: u32) -> ! {
    println!("hypervisor: exit status {status}");
    arch::exit(status)
}

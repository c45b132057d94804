//! Self-tests of the aarch64 layer, selected by name (the `selftest=NAME` command-line option;
//! same entry point and conventions as the x86_64 layer). The fault tests deliberately take an
//! exception, whose handler dumps it and exits with status 1; they never return. The checks print
//! `hypervisor: selftest NAME: ok` and return, or report the failure and exit with status 1.
//! Unknown names are logged and ignored.
//!
//! | name        | checks                                                                      |
//! |-------------|-----------------------------------------------------------------------------|
//! | `brk`       | BRK #0x5e1f: EC 0x3c, ISS = the immediate                                   |
//! | `undef`     | UDF (permanently undefined): EC 0x00 "Unknown reason"                       |
//! | `dabort`    | load from `direct_map_limit()`: EC 0x25, translation fault, FAR = address   |
//! | `panic`     | the panic path rather than an exception                                     |
//! | `stack-overflow` | recursion into the boot stack's guard page: reported as a stack overflow |
//! | `directmap` | `phys_to_virt` bounds; the MMU sees the image Normal and the UART/top Device |

use core::arch::asm;

/// Runs the self-test `name` (see the module documentation).
pub fn selftest(name: &str) {
    match run(name) {
        Some(Ok(())) => crate::println!("hypervisor: selftest {name}: ok"),
        Some(Err(e)) => {
            log::error!("selftest {name}: FAILED: {e}");
            crate::finish(crate::EXIT_FAILURE)
        }
        None => log::warn!(
            "selftest: unknown test {name:?} (known: brk, undef, dabort, panic, stack-overflow, directmap)"
        ),
    }
}

/// `None` for an unknown name.
fn run(name: &str) -> Option<Result<(), &'static str>> {
    // Each fault trigger takes its exception before touching any Rust-visible state; the handler
    // reports and exits, so execution never continues after it.
    match name {
        // SAFETY: BRK only generates a Breakpoint Instruction exception to EL2.
        "brk" => unsafe { asm!("brk #0x5e1f", options(nomem, nostack)) },
        // SAFETY: UDF is permanently UNDEFINED: it only generates an exception to EL2.
        "undef" => unsafe { asm!("udf #0x5e1f", options(nomem, nostack)) },
        "dabort" => {
            let va = super::direct_map_limit();
            // SAFETY: nothing is mapped at or above the direct-map limit, so the load takes a
            // translation-fault Data Abort without accessing memory.
            unsafe { asm!("ldr {0}, [{0}]", inout(reg) va => _, options(nostack, readonly)) };
        }
        "panic" => panic!("selftest: deliberate panic"),
        "stack-overflow" => {
            crate::arch::overflow_stack(0);
        }
        "directmap" => return Some(direct_map()),
        _ => return None,
    }
    Some(Err("the fault trigger returned"))
}

fn direct_map() -> Result<(), &'static str> {
    let limit = super::direct_map_limit();
    if super::phys_to_virt(limit).is_some()
        || super::phys_to_virt(limit - 1) != Some(limit as usize - 1)
    {
        return Err("phys_to_virt bounds");
    }
    let info = boot::aarch64::boot_info().ok_or("no BootInfo")?;
    if super::mmu::attributes(info.image_start) != Some(super::mmu::ATTR_NORMAL_WB) {
        return Err("the image is not mapped Normal Write-Back");
    }
    if let Some(uart) = super::uart::base()
        && super::mmu::attributes(uart) != Some(super::mmu::ATTR_DEVICE_NGNRNE)
    {
        return Err("the console UART is not mapped Device-nGnRnE");
    }
    for r in info
        .memory_regions()
        .iter()
        .filter(|r| r.kind == boot::MemoryKind::Usable)
    {
        let page = (r.start + 0xfff) & !0xfff;
        if page + 0x1000 <= r.end()
            && super::mmu::attributes(page) != Some(super::mmu::ATTR_NORMAL_WB)
        {
            return Err("usable RAM is not mapped Normal Write-Back");
        }
    }
    if super::mmu::attributes(limit - 0x1000).is_none() || super::mmu::attributes(limit).is_some() {
        return Err("the map does not end exactly at the limit");
    }
    Ok(())
}

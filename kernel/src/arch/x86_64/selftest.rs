//! Self-tests of the x86_64 layer, selected by name (the `selftest=NAME` command-line option;
//! same entry point and conventions as the aarch64 layer). The fault tests deliberately raise an
//! exception, whose handler reports it and exits with status 1; they never return. The checks
//! print `hypervisor: selftest NAME: ok` and return, or report the failure and exit with status 1.
//! Unknown names are logged and ignored.
//!
//! | name        | checks                                                                    |
//! |-------------|---------------------------------------------------------------------------|
//! | `ud2`       | #UD report                                                                |
//! | `int3`      | #BP report                                                                |
//! | `de`        | #DE (divide by zero)                                                      |
//! | `gp`        | #GP (non-canonical load)                                                  |
//! | `pf`        | #PF with CR2 (load from an unmapped canonical address)                    |
//! | `df`        | #DF on its IST stack: a #PF that cannot push its frame (dead stack)       |
//! | `nmi`, `mc` | the NMI / #MC gates and their IST stacks (via `int 2` / `int 18`)         |
//! | `panic`     | the panic path rather than an exception                                   |
//! | `stack-overflow` | recursion into the boot stack's guard page: #DF reports "stack overflow" |
//! | `directmap` | direct-map reads match the identity map; bounds of `phys_to_virt`         |

use core::arch::asm;

/// A canonical lower-half address that neither the boot map nor `paging` maps (PML4 entry 128).
const UNMAPPED: u64 = 0x0000_4000_0000_0000;

/// Runs the self-test `name` (see the module documentation).
pub fn selftest(name: &str) {
    match run(name) {
        Some(Ok(())) => crate::println!("hypervisor: selftest {name}: ok"),
        Some(Err(e)) => {
            log::error!("selftest {name}: FAILED: {e}");
            crate::finish(crate::EXIT_FAILURE)
        }
        None => log::warn!(
            "selftest: unknown test {name:?} (known: ud2, int3, de, gp, pf, df, nmi, mc, panic, stack-overflow, directmap)"
        ),
    }
}

/// `None` for an unknown name.
fn run(name: &str) -> Option<Result<(), &'static str>> {
    // Each fault trigger raises its exception before touching any Rust-visible state; the
    // handler reports and exits, so execution never continues after it.
    match name {
        // SAFETY: `ud2` only raises #UD.
        "ud2" => unsafe { asm!("ud2", options(nomem, nostack)) },
        // SAFETY: `int3` only raises #BP.
        "int3" => unsafe { asm!("int3", options(nomem, nostack)) },
        // SAFETY: dividing by zero raises #DE; the clobbered registers are declared.
        "de" => unsafe {
            asm!("xor ecx, ecx", "div ecx", out("eax") _, out("ecx") _, out("edx") _, options(nomem, nostack))
        },
        // SAFETY: a load from a non-canonical address raises #GP without accessing memory.
        "gp" => unsafe {
            asm!("mov rax, [rax]", inout("rax") 0x8000_0000_0000_0000u64 => _, options(nostack))
        },
        // SAFETY: a load from an unmapped address raises #PF without accessing memory.
        "pf" => unsafe { asm!("mov rax, [rax]", inout("rax") UNMAPPED => _, options(nostack)) },
        // SAFETY: the push faults (#PF); delivering that #PF needs the same dead stack, so the CPU
        // escalates to #DF (SDM §6.15, Table 6-5), which runs on IST1 and never returns here.
        "df" => unsafe { asm!("mov rsp, {0}", "push rax", in(reg) UNMAPPED, options(noreturn)) },
        // SAFETY: a software interrupt through the NMI gate (IST2); no memory effect.
        "nmi" => unsafe { asm!("int 2", options(nomem, nostack)) },
        // SAFETY: a software interrupt through the #MC gate (IST3); no memory effect.
        "mc" => unsafe { asm!("int 18", options(nomem, nostack)) },
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
    if limit == 0 {
        return Err("init_direct_map has not run");
    }
    if super::phys_to_virt(limit).is_some() || super::phys_to_virt(limit - 1).is_none() {
        return Err("phys_to_virt bounds");
    }
    let (start, end) = super::image_range();
    // Compare the whole image (code, data, stacks) through both maps, one quadword at a time.
    let mut pa = start;
    while pa + 8 <= end {
        let va = super::phys_to_virt(pa).ok_or("image not in the direct map")?;
        // SAFETY: `pa` is inside the image, which is identity-mapped; `va` maps the same frame in
        // the direct map (checked against the limit above); both are 8-aligned. Stack and
        // statics may change between the two reads only through this code, which does not.
        let (a, b) = unsafe {
            (
                (pa as *const u64).read_volatile(),
                (va as *const u64).read_volatile(),
            )
        };
        if a != b {
            return Err("direct map and identity map disagree");
        }
        pa += 4096;
    }
    if super::virt_to_phys(super::DIRECT_MAP_BASE + 0x1000) != Some(0x1000) {
        return Err("virt_to_phys");
    }
    Ok(())
}

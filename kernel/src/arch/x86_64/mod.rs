//! x86_64 implementation of the architecture interface (see `arch/mod.rs`).
//!
//! - console: a 16550 (`console=`, else the ACPI SPCR table's, else COM1 at 0x3f8), 115200 8N1,
//!   polled ([`drivers::uart16550`], [`uart`]);
//! - CPU: GDT + TSS with IST stacks for #DF/NMI/#MC, IDT with reports for all 32 exceptions;
//! - memory: identity map of 0-4 GiB plus the direct map at [`DIRECT_MAP_BASE`] ([`paging`]);
//! - exit: QEMU's isa-debug-exit when the command line says `exit=qemu`, else halt.
//!
//! `unsafe` lives in [`pio`] (port I/O), [`gdt`]/[`exceptions`] (descriptor tables, stubs,
//! backtrace reads), [`paging`] (page tables, CR3, PAT) and [`selftest`] (fault triggers).

pub mod apic;
pub mod cache;
mod exceptions;
mod gdt;
pub mod irq;
mod paging;
pub mod pio;
mod selftest;
pub mod smp;
mod uart;

use core::sync::atomic::{AtomicBool, Ordering};

use boot::BootInfo;
use boot::console::{ConsoleArch, ConsoleChoice, ConsoleSource, ConsoleUart};
use drivers::uart16550::{COM1, Uart16550, UartError};
use spin::Once;

pub use gdt::tss_base;
pub use paging::{DIRECT_MAP_BASE, phys_to_virt, virt_to_phys};
pub use selftest::selftest;

/// The console; built with base 0 because [`uart::ConsolePorts`] adds the selected UART's base.
static UART: Uart16550<uart::ConsolePorts> = Uart16550::new(uart::ConsolePorts::new(), 0);

/// What `console_init` decided, for `log_console` once the logger exists.
static CONSOLE: Once<(ConsoleChoice, Option<ConsoleUart>)> = Once::new();

/// Whether `exit` may use QEMU's isa-debug-exit device (`exit=qemu` on the command line).
static QEMU_EXIT: AtomicBool = AtomicBool::new(false);
/// Whether `exit` may use Bochs's shutdown port 0x8900 (`exit=bochs` on the command line).
static BOCHS_EXIT: AtomicBool = AtomicBool::new(false);

/// Console baud rate; 8N1, no flow control.
const BAUD: u32 = 115_200;

/// Chooses and programs the console UART (`console=`, else SPCR's, else COM1; see
/// [`boot::console`]) and records the exit method from the command line. A chosen UART that does
/// not answer gives way to COM1; if no UART answers, output is dropped silently (a headless server
/// without COM1 still boots).
pub fn console_init(info: &BootInfo) {
    QEMU_EXIT.store(
        info.cmdline_value("exit") == Some("qemu"),
        Ordering::Relaxed,
    );
    BOCHS_EXIT.store(
        info.cmdline_value("exit") == Some("bochs"),
        Ordering::Relaxed,
    );
    let com1 = ConsoleUart::Io16550 { port: COM1 };
    let choice = boot::console::choose_console(
        ConsoleArch::X86_64,
        info.cmdline_value("console"),
        boot::x86_64::boot_notes().spcr,
        Some(com1),
        |u| uart::usable(u, info),
    );
    let mut absent = None;
    if let Some(chosen) = choice.uart
        && UART.io().select(&chosen, info)
        && UART.init(BAUD) == Err(UartError::Absent)
        && chosen != com1
    {
        absent = Some(chosen);
        UART.io().select(&com1, info);
        let _ = UART.init(BAUD);
    }
    CONSOLE.call_once(|| (choice, absent));
}

/// Logs which console is in use and why any `console=` or SPCR candidate was passed over, on the
/// console that is in use.
fn log_console(info: &BootInfo) {
    let Some((choice, absent)) = CONSOLE.get() else {
        return;
    };
    if let Some(e) = choice.cmdline_error {
        log::warn!(
            "console: ignoring console={:?}: {e}",
            info.cmdline_value("console").unwrap_or("")
        );
    }
    if let Some(e) = choice.spcr_error {
        log::info!("console: ACPI SPCR not used: {e}");
    }
    if let Some(u) = absent {
        log::warn!("console: no UART answers at {u}; using COM1");
    } else if let Some(u) = choice.uart {
        let from = match choice.source {
            ConsoleSource::CommandLine => "console=",
            ConsoleSource::Spcr => "ACPI SPCR",
            ConsoleSource::Default => "default",
        };
        log::info!("console: 16550 {u} (from {from}), {BAUD} 8N1");
    }
}

/// Polled output; callable from any context, including exception handlers (no lock).
pub fn console_write(bytes: &[u8]) {
    UART.write_bytes(bytes);
}

/// Loads the GDT/TSS and the IDT on the boot CPU (once), then logs the CPU and what the boot path
/// noticed. Needs the logger (`console::init_logger`) for the log lines only.
pub fn init_cpu(info: &BootInfo) {
    static DONE: Once<()> = Once::new();
    DONE.call_once(|| {
        smp::init_boot_cpu();
        let cs = gdt::init();
        exceptions::init(cs);
    });
    log_console(info);
    log_cpu();
    log_boot_notes(info);
}

fn log_cpu() {
    use core::arch::x86_64::__cpuid;
    let v = __cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&v.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&v.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&v.ecx.to_le_bytes());
    let vendor = core::str::from_utf8(&vendor).unwrap_or("?");
    let leaf1 = __cpuid(1);
    let max_ext = __cpuid(0x8000_0000).eax;
    let ext1 = if max_ext >= 0x8000_0001 {
        __cpuid(0x8000_0001)
    } else {
        __cpuid(0)
    };
    let phys_bits = if max_ext >= 0x8000_0008 {
        __cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    };
    log::info!(
        "x86_64: CPU {vendor} signature {:#x}, MAXPHYADDR {phys_bits}, VMX {} SVM {} x2APIC {} NX {} 1GiB-pages {}",
        leaf1.eax,
        yes(leaf1.ecx & (1 << 5) != 0),
        yes(max_ext >= 0x8000_0001 && ext1.ecx & (1 << 2) != 0),
        yes(leaf1.ecx & (1 << 21) != 0),
        yes(max_ext >= 0x8000_0001 && ext1.edx & (1 << 20) != 0),
        yes(has_1g_pages()),
    );
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// CPUID.80000001h:EDX.Page1GB[26] (SDM vol 3 §4.1.4).
fn has_1g_pages() -> bool {
    use core::arch::x86_64::__cpuid;
    __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).edx & (1 << 26) != 0
}

fn log_boot_notes(info: &BootInfo) {
    let notes = boot::x86_64::boot_notes();
    if !notes.loader_name.as_str().is_empty() {
        log::info!("x86_64: boot loader {:?}", notes.loader_name);
    }
    match info.rsdp {
        Some(pa) => log::info!(
            "x86_64: ACPI RSDP at {pa:#x} (from {:?})",
            notes.rsdp_source
        ),
        None => log::warn!("x86_64: no ACPI RSDP found"),
    }
    if let Some(st) = info.efi_system_table {
        log::info!("x86_64: booted through UEFI, system table at {st:#x}");
    }
    if let Some(fb) = info.framebuffer {
        log::info!(
            "x86_64: boot framebuffer {}x{}x{} at {:#x} (not used as console)",
            fb.width,
            fb.height,
            fb.bpp,
            fb.addr
        );
    }
    for issue in notes.issues() {
        log::warn!("boot: {} ({:#x})", issue.what, issue.value);
    }
    if notes.issues_dropped > 0 {
        log::warn!(
            "boot: {} more boot issues not recorded",
            notes.issues_dropped
        );
    }
    if info.regions_dropped > 0 {
        log::warn!(
            "boot: {} memory regions did not fit in BootInfo",
            info.regions_dropped
        );
    }
}

/// Builds the hypervisor's page tables (identity 0-4 GiB + direct map, see [`paging`]) and
/// switches to them. Call once, after `init_cpu`, before [`phys_to_virt`] is used.
pub fn init_direct_map(info: &BootInfo) {
    let guards = stack_guards().map(|(_, g)| g);
    let Some(r) = paging::init(info, has_1g_pages(), &guards) else {
        log::warn!("x86_64: init_direct_map called twice; ignored");
        return;
    };
    if r.guards_unmapped == guards.len() {
        log::info!("x86_64: {} stack guard pages unmapped", r.guards_unmapped);
    } else {
        log::warn!(
            "x86_64: only {} of {} stack guard pages could be unmapped",
            r.guards_unmapped,
            guards.len()
        );
    }
    log::info!(
        "x86_64: direct map [0, {:#x}) at {:#x} (memory map ends at {:#x}) with {} pages ({} page directories, {} UC granules), NX {}",
        r.limit,
        DIRECT_MAP_BASE,
        paging::memory_map_end(info),
        if r.huge_1g { "1 GiB" } else { "2 MiB" },
        r.pds_used,
        r.uc_granules,
        yes(r.nx),
    );
    if r.limit < r.wanted {
        log::warn!(
            "x86_64: RAM reaches {:#x}; direct map capped at {:#x} ({})",
            r.wanted,
            r.limit,
            if r.huge_1g {
                "512 GiB: one PML4 entry"
            } else {
                "64 GiB: no 1 GiB pages, static pool"
            }
        );
    }
    if r.pool_exhausted {
        log::warn!(
            "x86_64: page-directory pool exhausted; some mixed GiBs mapped write-back as 1 GiB pages"
        );
    }
}

/// The console's register window, for the physical-memory ledger: a memory-mapped 16550's
/// registers, none for a port-I/O one.
pub fn console_mmio() -> Option<(u64, u64)> {
    let (choice, absent) = CONSOLE.get()?;
    if absent.is_some() {
        return None;
    }
    choice.uart?.mmio_window()
}

/// Every stack's guard page (unmapped by `init_direct_map`): which stack, and the page address.
pub fn stack_guards() -> [(&'static str, u64); 4] {
    let [(_, df), (_, nmi), (_, mc)] = gdt::ist_guards();
    [
        ("boot", boot::x86_64::boot_stack().0),
        ("IST1 (#DF)", df),
        ("IST2 (NMI)", nmi),
        ("IST3 (#MC)", mc),
    ]
}

/// End (exclusive) of the physical range the direct map covers; 0 before `init_direct_map`.
#[allow(dead_code, reason = "arch interface for the memory and IOMMU code")]
pub fn direct_map_limit() -> u64 {
    paging::limit()
}

/// Leaves the hypervisor: under QEMU with `exit=qemu`, through isa-debug-exit (QEMU's exit status
/// becomes `((0x10 + status) << 1) | 1`, so 33 for success); under Bochs with `exit=bochs`, through
/// its shutdown port; otherwise halts this CPU for good.
pub fn exit(status: u32) -> ! {
    if QEMU_EXIT.load(Ordering::Relaxed) {
        // QEMU 10 only *requests* the shutdown here; the main loop ends the process shortly
        // after, so halt quietly instead of printing while that happens.
        pio::qemu_debug_exit(0x10u32.wrapping_add(status));
    } else if BOCHS_EXIT.load(Ordering::Relaxed) {
        // Bochs has no exit-status device: it ends with status 1 whatever the hypervisor's, so
        // the status line printed before this is the only record (xtask reads it).
        pio::bochs_shutdown();
    } else {
        crate::console::print_unlocked(format_args!(
            "hypervisor: halted; reset the machine to restart\n"
        ));
    }
    halt()
}

/// Stops this CPU: interrupts off, `hlt` forever (an NMI or SMI may wake it; it halts again).
pub fn halt() -> ! {
    loop {
        ::x86_64::instructions::interrupts::disable();
        ::x86_64::instructions::hlt();
    }
}

unsafe extern "C" {
    // Defined by linker/x86_64.ld; only their addresses are used.
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical (= identity-mapped virtual) range of the hypervisor image.
fn image_range() -> (u64, u64) {
    (
        (&raw const __image_start) as u64,
        (&raw const __image_end) as u64,
    )
}

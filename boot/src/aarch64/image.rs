//! The arm64 `Image` header and the assembly entry (`aarch64-unknown-none` only).
//!
//! Machine state at entry (booting.rst "Call the kernel image"): MMU off, D-cache off, I-cache on
//! or off, `x0` = physical address of the DTB (0 for a QEMU ELF `-kernel`, see
//! [`QEMU_RAM_BASE`]), `x1`-`x3` = 0, the image "cleaned to the PoC" by the loader, at EL2 (or
//! non-secure EL1, which we report and refuse).
//!
//! The entry, in order:
//! 1. masks DAIF and checks that it runs at its link address (the image is linked statically);
//! 2. reads CurrentEL. At EL2: writes HCR_EL2 (E2H = 0), un-traps FP/SIMD in CPTR_EL2, builds the
//!    boot page table and turns the MMU and caches on. At EL1/EL3 it only un-traps FP/SIMD and
//!    leaves the MMU off, so that Rust can report the error;
//! 3. zeroes `.bss` (with the caches already on at EL2, so no stale line can hide the zeroes),
//!    points SP_ELx at the exception stack, switches to SP_EL0 (SPSel = 0) on the boot stack, and
//!    calls [`rust_entry`] with the DTB pointer and the EL.
//!
//! The boot page table is one level-1 table (T0SZ = 25, 512 × 1 GiB blocks, identity). The
//! 1 GiB block(s) holding the image are Normal Write-Back; everything else is Device-nGnRnE and
//! execute-never. On QEMU `virt` that block is 0x4000_0000..0x8000_0000, which holds all RAM up to
//! `-m 1G`, the DTB of both boot paths, and the image. Mapping only the image's block Normal (not a
//! guessed RAM window) keeps device registers out of cacheable mappings on machines with a
//! different layout. `init_direct_map` replaces this table with one built from the DTB.

use super::dtb::{self, DeviceTree, DtbError};
use super::{BOOT_MAP_LIMIT, EntryError, QEMU_RAM_BASE, TEXT_OFFSET, map};
use crate::{BootInfo, BootProtocol};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Boot stack size. Rust code before the kernel sets up per-CPU stacks runs on it.
/// A multiple of 4 KiB, so the exception stack's guard page above it is page-aligned.
const BOOT_STACK_SIZE: usize = 256 * 1024;
/// The exception stack (SP_EL2): the fatal-exception report runs on it.
const EXCEPTION_STACK_SIZE: usize = 64 * 1024;
const _: () =
    assert!(BOOT_STACK_SIZE.is_multiple_of(4096) && EXCEPTION_STACK_SIZE.is_multiple_of(4096));

/// Image header `flags` (booting.rst "Header notes"): bit 0 = 0, little-endian kernel; bits 1-2 =
/// 0b01, 4 KiB pages; bit 3 = 0, "2MB aligned base should be as close as possible to the base of
/// DRAM". Bit 3 stays 0 because the image is not position-independent: a loader that honours the
/// bit places it at DRAM base + [`TEXT_OFFSET`], which is the link address on QEMU `virt`.
const IMAGE_FLAGS: u64 = 0b0010;

/// `x1` to [`rust_entry`]: CurrentEL (EL in `bits [3:2]`) and this flag.
const STATE_E2H_FORCED: u64 = 1 << 8;

core::arch::global_asm!(
    // The header must be the first 64 bytes of the image (`linker/aarch64.ld` puts .text.head
    // first). code0 branches over it, so the ELF entry point and the Image's first byte are the
    // same instruction.
    ".pushsection .text.head, \"ax\"",
    ".global _start",
    ".type _start, %function",
    "_start:",
    // code0: "MZ" (the DOS signature UEFI's PE loader looks for) is also the instruction
    // `ccmp x18, #0, #0xd, pl`, which only changes the flags, so Image loaders may execute it.
    "    .long   0xfa405a4d",
    "    b       2f",                 // code1
    "    .quad   {text_offset}",      // text_offset
    "    .quad   __image_size",       // image_size: from the linker script, includes .bss
    "    .quad   {flags}",            // flags
    "    .quad   0, 0, 0",            // res2-res4
    "    .long   0x644d5241",         // magic "ARM\x64", little-endian, at offset 0x38
    "    .long   3f - _start",        // res5 = DOS e_lfanew: offset of the PE header
    // PE/COFF header (Microsoft PE format; UEFI 2.10 §2.1.1): one section, file page 1 to the
    // end of .data, virtual size up to the end of .bss; no relocations (the stub copies the
    // image to its link address instead, see efi_pe_entry).
    "3:  .ascii  \"PE\\0\\0\"",
    "    .short  0xaa64",             // Machine: IMAGE_FILE_MACHINE_ARM64
    "    .short  1",                  // NumberOfSections
    "    .long   0, 0, 0",            // TimeDateStamp, PointerToSymbolTable, NumberOfSymbols
    "    .short  4f - 1f",            // SizeOfOptionalHeader
    "    .short  0x0206",             // EXECUTABLE_IMAGE | LINE_NUMS_STRIPPED | DEBUG_STRIPPED
    "1:  .short  0x20b",              // PE32+
    "    .byte   0, 0",               // linker version
    "    .long   __pe_raw_size",      // SizeOfCode
    "    .long   0, 0",               // SizeOfInitializedData, SizeOfUninitializedData
    "    .long   efi_pe_entry - _start", // AddressOfEntryPoint (RVA)
    "    .long   0x1000",             // BaseOfCode
    "    .quad   __image_start",      // ImageBase: the link address
    "    .long   0x1000, 0x1000",     // SectionAlignment, FileAlignment
    "    .short  0, 0, 0, 0, 0, 0",   // OS, image and subsystem versions
    "    .long   0",                  // Win32VersionValue
    "    .long   __image_size",       // SizeOfImage
    "    .long   0x1000",             // SizeOfHeaders
    "    .long   0",                  // CheckSum
    "    .short  10",                 // Subsystem: EFI application
    "    .short  0",                  // DllCharacteristics
    "    .quad   0, 0, 0, 0",         // stack and heap reserve/commit
    "    .long   0",                  // LoaderFlags
    "    .long   6",                  // NumberOfRvaAndSizes
    "    .quad   0, 0, 0, 0, 0, 0",   // export, import, resource, exception, security, basereloc
    "4:  .ascii  \".text\\0\\0\\0\"",  // section header
    "    .long   __pe_virt_size",     // VirtualSize (includes .bss, which the loader zeroes)
    "    .long   0x1000",             // VirtualAddress
    "    .long   __pe_raw_size",      // SizeOfRawData
    "    .long   0x1000",             // PointerToRawData
    "    .long   0, 0",               // PointerToRelocations, PointerToLinenumbers
    "    .short  0, 0",               // NumberOfRelocations, NumberOfLinenumbers
    "    .long   0xe0000060",         // code | initialized data | execute | read | write
    ".balign 4096",
    ".global __image_entry",
    "__image_entry:",
    "2:",
    "    msr     daifset, #0xf",      // booting.rst wants DAIF masked; make sure
    "    mov     x19, x0",            // the DTB pointer (or 0), kept until Rust
    // Statically linked: run address must equal link address, or every absolute pointer in the
    // image is wrong. Nothing can be printed yet (the UART is unknown), so stop here.
    "    adr     x9, _start",
    "    ldr     x10, =_start",
    "    cmp     x9, x10",
    "    b.ne    9f",
    "    mrs     x20, CurrentEL",
    "    and     x20, x20, #0xc",
    "    cmp     x20, #0x8",
    "    b.eq    3f",
    // EL1 or EL3: un-trap FP/SIMD there (CPACR_EL1.FPEN = 0b11; CPTR_EL3.TFP = 0), leave the MMU
    // off, and let Rust report the error.
    "    cmp     x20, #0x4",
    "    b.ne    1f",
    "    mrs     x9, cpacr_el1",
    "    orr     x9, x9, #(3 << 20)",
    "    msr     cpacr_el1, x9",
    "    isb",
    "    b       6f",
    "1:  msr     cptr_el3, xzr",
    "    isb",
    "    b       6f",
    // EL2. HCR_EL2 first: E2H selects the layout of CPTR_EL2, TCR_EL2 and SCTLR_EL2.
    "3:  ldr     x9, ={hcr}",
    "    msr     hcr_el2, x9",
    "    isb",
    "    mrs     x9, hcr_el2",
    "    tbz     x9, #34, 4f",
    // E2H is RES1 on this CPU: un-trap FP/SIMD in the E2H = 1 layout (FPEN, bits [21:20]), leave
    // the MMU off, and report.
    "    orr     x20, x20, #{e2h_forced}",
    "    mov     x9, #(3 << 20)",
    "    msr     cptr_el2, x9",
    "    isb",
    "    b       6f",
    "4:  ldr     x9, ={cptr}",
    "    msr     cptr_el2, x9",
    "    isb",
    // Fill the boot level-1 table: entry i maps [i GiB, i+1 GiB).
    "    adrp    x0, __boot_l1",
    "    add     x0, x0, :lo12:__boot_l1",
    "    adrp    x1, __image_start",
    "    add     x1, x1, :lo12:__image_start",
    "    lsr     x1, x1, #30",        // first GiB of the image
    "    adrp    x2, __image_end",
    "    add     x2, x2, :lo12:__image_end",
    "    sub     x2, x2, #1",
    "    lsr     x2, x2, #30",        // last GiB of the image
    "    ldr     x5, ={normal}",
    "    ldr     x6, ={device}",
    "    mov     x3, #0",
    "5:  lsl     x4, x3, #30",
    "    cmp     x3, x1",
    "    csel    x7, x6, x5, lo",
    "    cmp     x3, x2",
    "    csel    x7, x6, x7, hi",
    "    orr     x4, x4, x7",
    "    str     x4, [x0, x3, lsl #3]",
    "    add     x3, x3, #1",
    "    cmp     x3, #512",
    "    b.lo    5b",
    // The table was written with the MMU (hence the data cache) off, straight to memory, but the
    // walker will read it through the cache (TCR_EL2.IRGN0/ORGN0 = WB). Invalidate its lines so
    // that no stale copy (the image was only *cleaned* to the PoC by the loader) shadows it.
    "    dsb     sy",
    "    mrs     x3, ctr_el0",
    "    ubfx    x3, x3, #16, #4",    // DminLine: log2(words) of the smallest D-cache line
    "    mov     x4, #4",
    "    lsl     x3, x4, x3",
    "    mov     x4, x0",
    "    add     x5, x0, #4096",
    "7:  dc      ivac, x4",
    "    add     x4, x4, x3",
    "    cmp     x4, x5",
    "    b.lo    7b",
    "    dsb     sy",
    // MAIR, TCR (PS = PARange, capped at 48 bits), TTBR0; drop any EL2 TLB entries a previous
    // stage left; then MMU + caches on.
    "    ldr     x9, ={mair}",
    "    msr     mair_el2, x9",
    "    ldr     x9, ={tcr}",
    "    mrs     x10, id_aa64mmfr0_el1",
    "    and     x10, x10, #0xf",
    "    mov     x11, #{parange_max}",
    "    cmp     x10, x11",
    "    csel    x10, x10, x11, ls",
    "    bfi     x9, x10, #{ps_shift}, #3",
    "    msr     tcr_el2, x9",
    "    msr     ttbr0_el2, x0",
    "    isb",
    "    tlbi    alle2",
    "    ic      iallu",
    "    dsb     nsh",
    "    isb",
    "    ldr     x9, ={sctlr}",
    "    msr     sctlr_el2, x9",
    "    isb",
    // Zero .bss (16-byte aligned at both ends by the linker script).
    "6:  adrp    x9, __bss_start",
    "    add     x9, x9, :lo12:__bss_start",
    "    adrp    x10, __bss_end",
    "    add     x10, x10, :lo12:__bss_end",
    "8:  cmp     x9, x10",
    "    b.hs    10f",
    "    stp     xzr, xzr, [x9], #16",
    "    b       8b",
    // SPSel = 1 at entry, so this sets SP_ELx: the exception stack. Every exception taken to
    // this EL switches to it (PSTATE.SP = 1 on entry), so an overflow of the boot stack is
    // reported from a stack that still works.
    "10: adrp    x9, __exception_stack_top",
    "    add     x9, x9, :lo12:__exception_stack_top",
    "    mov     sp, x9",
    // From here on the hypervisor runs on SP_EL0 (EL2t): the boot stack.
    "    msr     spsel, #0",
    "    adrp    x9, __boot_stack_top",
    "    add     x9, x9, :lo12:__boot_stack_top",
    "    mov     sp, x9",
    "    mov     x29, xzr",           // terminate frame-pointer chains
    "    mov     x30, xzr",
    "    mov     x0, x19",
    "    mov     x1, x20",
    "    bl      {rust_entry}",
    "9:  wfe",
    "    b       9b",
    ".ltorg",
    // ---- UEFI entry (PE/COFF AddressOfEntryPoint) ---------------------------------------------
    // Firmware state: EL2, MMU and caches on with an identity map, x0 = ImageHandle,
    // x1 = SystemTable, the image loaded at an address of the firmware's choosing. This code is
    // position-independent (adr, literal-pool constants only): it copies the whole image,
    // .bss included (zeroed by the loader), to its link address with AllocatePages
    // (AllocateAddress), makes the copy executable, and calls `efi_main` there.
    ".global efi_pe_entry",
    "efi_pe_entry:",
    "    stp     x29, x30, [sp, #-48]!",
    "    mov     x29, sp",
    "    stp     x19, x20, [sp, #16]",
    "    stp     x21, x22, [sp, #32]",
    "    mov     x19, x0",
    "    mov     x20, x1",
    "    adr     x21, _start",        // where the firmware put us
    "    ldr     x22, =_start",       // where we are linked
    "    cmp     x21, x22",
    "    b.eq    13f",
    "    ldr     x9, [x20, #96]",     // SystemTable->BootServices
    "    ldr     x9, [x9, #40]",      // ->AllocatePages
    "    sub     sp, sp, #16",
    "    str     x22, [sp]",          // in/out: the address wanted
    "    mov     x0, #2",             // AllocateAddress
    "    mov     x1, #2",             // EfiLoaderData
    "    ldr     x2, =__image_pages",
    "    mov     x3, sp",
    "    blr     x9",
    "    add     sp, sp, #16",
    "    cbnz    x0, 14f",
    "    ldr     x2, =__image_size",  // a multiple of 4 KiB
    "    mov     x3, x21",
    "    mov     x4, x22",
    "11: ldp     x5, x6, [x3], #16",
    "    stp     x5, x6, [x4], #16",
    "    subs    x2, x2, #16",
    "    b.hi    11b",
    // Clean the copy to the point of unification and drop stale instructions (ARM ARM D7.5.9).
    "    mrs     x5, ctr_el0",
    "    ubfx    x5, x5, #16, #4",
    "    mov     x6, #4",
    "    lsl     x5, x6, x5",
    "    mov     x3, x22",
    "    ldr     x2, =__image_size",
    "    add     x4, x22, x2",
    "12: dc      cvau, x3",
    "    add     x3, x3, x5",
    "    cmp     x3, x4",
    "    b.lo    12b",
    "    dsb     ish",
    "    ic      iallu",
    "    dsb     ish",
    "    isb",
    "13: ldr     x9, ={efi_main}",
    "    mov     x0, x19",
    "    mov     x1, x20",
    "    blr     x9",                 // returns only with an error status, boot services alive
    "    b       15f",
    "14: mov     x21, x0",            // AllocatePages failed: say so on ConOut, return its status
    "    ldr     x9, [x20, #64]",     // SystemTable->ConOut
    "    ldr     x10, [x9, #8]",      // ->OutputString
    "    mov     x0, x9",
    "    adr     x1, 16f",
    "    blr     x10",
    "    mov     x0, x21",
    "15: ldp     x21, x22, [sp, #32]",
    "    ldp     x19, x20, [sp, #16]",
    "    ldp     x29, x30, [sp], #48",
    "    ret",
    ".ltorg",
    ".balign 2",
    "16: .short 104, 121, 112, 101, 114, 118, 105, 115, 111, 114, 58, 32, 99, 97, 110, 110, 111, 116",
    "    .short 32, 97, 108, 108, 111, 99, 97, 116, 101, 32, 105, 116, 115, 32, 108, 105, 110, 107",
    "    .short 32, 97, 100, 100, 114, 101, 115, 115, 13, 10, 0", // \"hypervisor: cannot allocate its link address\"
    ".balign 4",
    // Boot services are gone (efi_main called ExitBootServices) and interrupts are masked: make
    // the image and the hand-off in .data visible without caches, turn the MMU off, and enter the
    // Image path at _start as an Image loader would (x0 = 0; the hand-off says it is UEFI).
    ".global efi_leave",
    "efi_leave:",
    "    msr     daifset, #0xf",
    "    mrs     x5, ctr_el0",
    "    ubfx    x5, x5, #16, #4",
    "    mov     x6, #4",
    "    lsl     x5, x6, x5",
    "    adrp    x3, __image_start",
    "    add     x3, x3, :lo12:__image_start",
    "    adrp    x4, __image_end",
    "    add     x4, x4, :lo12:__image_end",
    "17: dc      civac, x3",
    "    add     x3, x3, x5",
    "    cmp     x3, x4",
    "    b.lo    17b",
    "    dsb     sy",
    "    mrs     x9, sctlr_el2",
    "    bic     x9, x9, #1",         // M
    "    bic     x9, x9, #4",         // C
    "    msr     sctlr_el2, x9",
    "    isb",
    "    ic      iallu",
    "    tlbi    alle2",
    "    dsb     sy",
    "    isb",
    "    mov     x0, #0",
    "    b       _start",
    ".size _start, . - _start",
    ".popsection",
    // Outside the zeroed .bss range (the linker script places .bss.boot_page_table first): the
    // table is written before .bss is zeroed.
    ".pushsection .bss.boot_page_table, \"aw\", %nobits",
    ".balign 4096",
    "__boot_l1:",
    "    .space  4096",
    ".popsection",
    // Each stack sits directly above a guard page that the kernel's map leaves unmapped
    // (`stack_guards`), so running off its end faults instead of overwriting what lies below.
    ".pushsection .bss.boot_stack, \"aw\", %nobits",
    // Global: `stack_guards` names them from Rust, which a release build may place in another
    // object file than this block.
    ".global __boot_stack_guard",
    ".global __exception_stack_guard",
    ".balign 4096",
    "__boot_stack_guard:",
    "    .space  4096",
    "    .space  {stack_size}",
    "__boot_stack_top:",
    "__exception_stack_guard:",
    "    .space  4096",
    "    .space  {exception_stack_size}",
    "__exception_stack_top:",
    ".popsection",
    text_offset = const TEXT_OFFSET,
    flags = const IMAGE_FLAGS,
    hcr = const map::HCR_EL2,
    cptr = const map::CPTR_EL2,
    e2h_forced = const STATE_E2H_FORCED,
    normal = const map::NORMAL | map::DESC_BLOCK,
    device = const map::DEVICE | map::DESC_BLOCK,
    mair = const map::MAIR_EL2,
    tcr = const map::BOOT_TCR_EL2,
    parange_max = const map::PARANGE_MAX,
    ps_shift = const map::TCR_PS_SHIFT,
    sctlr = const map::SCTLR_EL2,
    stack_size = const BOOT_STACK_SIZE,
    exception_stack_size = const EXCEPTION_STACK_SIZE,
    rust_entry = sym rust_entry,
    efi_main = sym super::efi::efi_main,
);

unsafe extern "C" {
    // Defined by `linker/aarch64.ld`; only their addresses are used.
    static __image_start: u8;
    static __image_end: u8;
    // Defined by the assembly above; only their addresses are used.
    static __boot_stack_guard: u8;
    static __exception_stack_guard: u8;
}

/// The 4 KiB guard page under each stack, which the kernel's map leaves unmapped: the boot
/// stack (SP_EL0, everything but exception handlers) and the exception stack (SP_EL2).
/// Identity-mapped, so these are also physical addresses.
pub fn stack_guards() -> [(&'static str, u64); 2] {
    [
        ("boot", (&raw const __boot_stack_guard) as u64),
        ("exception", (&raw const __exception_stack_guard) as u64),
    ]
}

/// What the entry hands to the kernel: written once by [`rust_entry`] on the boot CPU before
/// `hv_main` runs, read-only afterwards.
struct EntryRecord {
    info: BootInfo,
    dt: Option<DeviceTree<'static>>,
    error: Option<EntryError>,
    el: u8,
}

struct EntryCell(UnsafeCell<EntryRecord>);

// SAFETY: the record is written only by `rust_entry`, on the boot CPU, before `READY` is set with
// Release ordering and before any other CPU or any reader exists; readers go through `record`,
// which checks `READY` with Acquire ordering and only ever hands out shared references.
unsafe impl Sync for EntryCell {}

static ENTRY: EntryCell = EntryCell(UnsafeCell::new(EntryRecord {
    info: BootInfo::new(BootProtocol::Arm64Image),
    dt: None,
    error: None,
    el: 0,
}));
static READY: AtomicBool = AtomicBool::new(false);

fn record() -> Option<&'static EntryRecord> {
    if READY.load(Ordering::Acquire) {
        // SAFETY: `READY` is set only after the last write to `ENTRY` (see `EntryCell`).
        Some(unsafe { &*ENTRY.0.get() })
    } else {
        None
    }
}

/// The `BootInfo` the entry built (the same one `hv_main` received), once the entry has run.
pub fn boot_info() -> Option<&'static BootInfo> {
    record().map(|r| &r.info)
}

/// The validated device tree the loader passed, if any.
pub fn device_tree() -> Option<DeviceTree<'static>> {
    record().and_then(|r| r.dt)
}

/// What went wrong at entry; the kernel reports it and powers off.
pub fn entry_error() -> Option<EntryError> {
    record().and_then(|r| r.error)
}

/// The Exception level the image was entered at (2 when all is well).
pub fn entry_el() -> u8 {
    record().map_or(0, |r| r.el)
}

/// Finds and validates the DTB. `x0` is the loader's pointer; 0 means the QEMU ELF case.
fn locate_dtb(x0: u64, image: (u64, u64)) -> Result<DeviceTree<'static>, EntryError> {
    let pa = if x0 != 0 {
        x0
    } else if (QEMU_RAM_BASE..QEMU_RAM_BASE + (1 << 30)).contains(&image.0) {
        // QEMU ELF case: the image runs in the first GiB of `virt` RAM, so RAM starts at
        // QEMU_RAM_BASE; probe for the magic there.
        // SAFETY: QEMU_RAM_BASE is aligned and lies in the image's GiB, which is RAM (the image
        // runs there) and which the boot map maps Normal (at EL1/EL3 the MMU is off and the read
        // goes straight to RAM); nothing else is writing it.
        let magic = unsafe { core::ptr::read_volatile(QEMU_RAM_BASE as *const u32) };
        if u32::from_be(magic) != dtb::FDT_MAGIC {
            return Err(EntryError::NoDeviceTree);
        }
        QEMU_RAM_BASE
    } else {
        return Err(EntryError::NoDeviceTree);
    };
    let fail = |error| EntryError::DeviceTree { pa, error };
    if !pa.is_multiple_of(8) {
        return Err(fail(DtbError::Misaligned(pa)));
    }
    if pa >= BOOT_MAP_LIMIT - 8 {
        return Err(fail(DtbError::Unreachable { end: pa }));
    }
    // SAFETY: `pa` is 8-byte aligned and below the end of the boot map, which maps every address
    // (as Device where it is not the image's GiB; with the MMU off at EL1/EL3 every address is
    // reachable anyway), and booting.rst makes the loader put the DTB in RAM. A loader that lies could make this read a device register; nothing better is possible
    // before we know the memory map.
    let first8 = unsafe { core::ptr::read_volatile(pa as *const [u8; 8]) };
    let size = dtb::header_total_size(first8).map_err(fail)?;
    let end = pa + size as u64;
    if end > BOOT_MAP_LIMIT {
        return Err(fail(DtbError::Unreachable { end }));
    }
    if pa < image.1 && image.0 < end {
        return Err(fail(DtbError::OverlapsImage));
    }
    // SAFETY: `[pa, end)` is inside the boot map (checked above) and outside the image; it is the
    // DTB the loader left in RAM (booting.rst), which nothing in the hypervisor writes, so a
    // shared `'static` slice over it is sound.
    let bytes = unsafe { core::slice::from_raw_parts(pa as *const u8, size) };
    DeviceTree::new(bytes).map_err(fail)
}

/// Called once by the assembly entry, on the boot stack, with `.bss` zeroed. `state` holds
/// CurrentEL and the `STATE_*` flags.
extern "C" fn rust_entry(x0: u64, state: u64) -> ! {
    let image = (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    // SAFETY: nothing reads `ENTRY` before `READY` is set below, and this function runs once, on
    // one CPU, so this is the only reference to the record.
    let rec = unsafe { &mut *ENTRY.0.get() };
    rec.el = ((state >> 2) & 3) as u8;
    rec.info.image_start = image.0;
    rec.info.image_end = image.1;
    // Started by UEFI (the EFI stub left a complete hand-off): ACPI only, no device tree.
    // (A stale DTB may still sit at the base of RAM; it is not looked for.)
    let from_efi = super::efi::fill_boot_info(image, &mut rec.info);
    let dtb = if from_efi {
        None
    } else {
        Some(locate_dtb(x0, image))
    };
    match dtb {
        None => {}
        Some(Ok(dt)) => {
            let pa = dt.bytes().as_ptr() as u64;
            // Unusable `reg` entries are skipped; the kernel sees what remains in the map.
            let _ = dt.fill_boot_info(pa, image, &mut rec.info);
            rec.dt = Some(dt);
        }
        Some(Err(e)) => rec.error = Some(e),
    }
    // Exception-level problems come first: with them the MMU is off, whatever the DTB said.
    if rec.el != 2 {
        rec.error = Some(EntryError::NotEl2 { el: rec.el });
    } else if state & STATE_E2H_FORCED != 0 {
        rec.error = Some(EntryError::E2hForced);
    }
    READY.store(true, Ordering::Release);
    // From here on the record is only read, through shared references.
    if let Some(info) = boot_info() {
        // SAFETY: `hv_main` is the kernel's entry, called exactly once, on the boot CPU, with a
        // valid stack and a `BootInfo` that lives forever. When `entry_error()` is set the MMU
        // may be off; the kernel checks that first (see `kernel/src/arch/aarch64`).
        unsafe { crate::hv_main(info) }
    }
    loop {
        core::hint::spin_loop();
    }
}

//! The EFI stub: UEFI firmware starts the Image as an EFI application (`\EFI\BOOT\BOOTAA64.EFI`,
//! a boot entry, the UEFI shell). `aarch64-unknown-none` only.
//!
//! `efi_pe_entry` (assembly in `image.rs`) has already copied the image to its link address and
//! calls [`efi_main`] there, still under the firmware's MMU, stack and boot services. It:
//!
//! 1. reads the load options of our LoadedImage (UEFI 2.10 §9.1): the hypervisor command line;
//! 2. finds the ACPI RSDP in the configuration table (§4.6; ACPI 2.0 GUID preferred);
//! 3. gets the memory map and calls ExitBootServices with its key (§7.4), retrying once with a
//!    fresh map as the specification allows;
//! 4. stores everything in the hand-off record in `.data` (which the Image entry does not zero)
//!    and jumps to `efi_leave`, which masks interrupts, turns the MMU off and enters `_start`
//!    like an Image loader would. The Image path then builds its own translation and vectors.
//!
//! Before ExitBootServices every failure is printed on ConOut and returned to the firmware as an
//! EFI status; after it, nothing can fail.

use super::super::x86_64::multiboot2::{EFI_ACPI_10_GUID, EFI_ACPI_20_GUID};
use super::dtb::{Uart, UartKind};
use crate::x86_64::PhysMem;
use crate::{BootInfo, FixedStr, MemoryKind, MemoryRegion};
use core::cell::UnsafeCell;

/// "HVEFIOK!": set last, so a hand-off is used only when it is complete.
const HANDOFF_MAGIC: u64 = 0x214b_4f49_4645_5648;
/// Room for the firmware memory map: AAVMF reports ~60 descriptors of 48 bytes; servers a few
/// hundred.
const MAP_CAPACITY: usize = 24 * 1024;
const CMDLINE_CAPACITY: usize = 512;

const EFI_SUCCESS: u64 = 0;
/// EFI_BUFFER_TOO_SMALL and EFI_INVALID_PARAMETER (UEFI 2.10 Appendix D).
const EFI_BUFFER_TOO_SMALL: u64 = (1 << 63) | 5;
const EFI_LOAD_ERROR: u64 = (1 << 63) | 1;

/// EFI_LOADED_IMAGE_PROTOCOL_GUID 5b1b31a1-9562-11d2-8e3f-00a0c969723b, in memory order.
const LOADED_IMAGE_GUID: [u8; 16] = [
    0xa1, 0x31, 0x1b, 0x5b, 0x62, 0x95, 0xd2, 0x11, 0x8e, 0x3f, 0x00, 0xa0, 0xc9, 0x69, 0x72, 0x3b,
];

/// Offsets in the UEFI tables used here (UEFI 2.10 §4.3, §4.4, §9.1; 64-bit pointers).
mod off {
    pub const ST_CON_OUT: usize = 64;
    pub const ST_BOOT_SERVICES: usize = 96;
    pub const ST_TABLE_COUNT: usize = 104;
    pub const ST_TABLE_PTR: usize = 112;
    pub const BS_GET_MEMORY_MAP: usize = 56;
    pub const BS_HANDLE_PROTOCOL: usize = 152;
    pub const BS_EXIT_BOOT_SERVICES: usize = 232;
    pub const CON_OUTPUT_STRING: usize = 8;
    pub const LI_LOAD_OPTIONS_SIZE: usize = 48;
    pub const LI_LOAD_OPTIONS: usize = 56;
}

#[repr(C)]
struct Handoff {
    magic: u64,
    system_table: u64,
    rsdp: u64,
    map_size: u64,
    desc_size: u64,
    cmdline_len: u64,
    /// The SPCR console: base (0 = none) and 1 = PL011, 2 = SBSA generic UART.
    uart_base: u64,
    uart_kind: u64,
    cmdline: [u8; CMDLINE_CAPACITY],
    map: [u8; MAP_CAPACITY],
}

struct HandoffCell(UnsafeCell<Handoff>);

// SAFETY: written only by `efi_main` while one CPU runs under the firmware, read only by
// `rust_entry` on that same CPU afterwards; there is never concurrent access.
unsafe impl Sync for HandoffCell {}

/// In `.data`, not `.bss`: the Image entry zeroes `.bss` after `efi_leave` enters it.
#[unsafe(link_section = ".data.efi_handoff")]
static HANDOFF: HandoffCell = HandoffCell(UnsafeCell::new(Handoff {
    magic: 0,
    system_table: 0,
    rsdp: 0,
    map_size: 0,
    desc_size: 0,
    cmdline_len: 0,
    uart_base: 0,
    uart_kind: 0,
    cmdline: [0; CMDLINE_CAPACITY],
    map: [0; MAP_CAPACITY],
}));

unsafe extern "C" {
    /// `image.rs`: masks DAIF, cleans the image to the PoC, MMU off, branches to `_start`.
    fn efi_leave() -> !;
}

type OutputString = unsafe extern "efiapi" fn(u64, *const u16) -> u64;
type HandleProtocol = unsafe extern "efiapi" fn(u64, *const [u8; 16], *mut u64) -> u64;
type GetMemoryMap =
    unsafe extern "efiapi" fn(*mut usize, *mut u8, *mut usize, *mut usize, *mut u32) -> u64;
type ExitBootServices = unsafe extern "efiapi" fn(u64, usize) -> u64;

/// Reads a firmware table field.
///
/// # Safety
/// `base + offset` must be a readable, 8-byte aligned u64 of a live firmware table.
unsafe fn field(base: u64, offset: usize) -> u64 {
    // SAFETY: guaranteed by the caller; the firmware's identity map makes it addressable.
    unsafe { core::ptr::read_volatile((base as usize + offset) as *const u64) }
}

/// Prints ASCII `msg` on ConOut (boot services alive).
///
/// # Safety
/// `st` is the firmware's system table and boot services have not been exited.
unsafe fn print(st: u64, msg: &str) {
    let mut buf = [0u16; 128];
    for (slot, b) in buf.iter_mut().zip(msg.bytes().take(127)) {
        *slot = u16::from(b);
    }
    // SAFETY: per the caller, ConOut is a live protocol; OutputString takes a NUL-terminated
    // UCS-2 string, which `buf` is (its last element stays 0).
    unsafe {
        let con = field(st, off::ST_CON_OUT);
        let output: OutputString = core::mem::transmute(field(con, off::CON_OUTPUT_STRING));
        output(con, buf.as_ptr());
    }
}

/// Called by `efi_pe_entry` at the link address. Returns only with an error, boot services alive.
///
/// # Safety
/// Called once, by the firmware's thread of control, with the firmware's ImageHandle and
/// SystemTable, before ExitBootServices.
pub unsafe extern "C" fn efi_main(image: u64, st: u64) -> u64 {
    // SAFETY: the only reference to the hand-off while boot services run (see `HandoffCell`).
    let h = unsafe { &mut *HANDOFF.0.get() };
    h.system_table = st;
    // SAFETY: (whole block) `st` is the system table the firmware passed; its boot-services
    // table and the protocols it returns are live until ExitBootServices, and each function
    // pointer is called with the arguments UEFI 2.10 defines for it.
    unsafe {
        let bs = field(st, off::ST_BOOT_SERVICES);

        // 1. Load options: UCS-2 text; keep printable ASCII, drop the rest.
        let handle_protocol: HandleProtocol =
            core::mem::transmute(field(bs, off::BS_HANDLE_PROTOCOL));
        let mut li = 0u64;
        if handle_protocol(image, &LOADED_IMAGE_GUID, &mut li) == EFI_SUCCESS && li != 0 {
            let size = (field(li, off::LI_LOAD_OPTIONS_SIZE) & 0xffff_ffff) as usize;
            let opts = field(li, off::LI_LOAD_OPTIONS);
            if opts != 0 {
                let units = core::slice::from_raw_parts(opts as *const u16, size / 2);
                let mut n = 0;
                for &u in units.iter().take_while(|&&u| u != 0) {
                    if n < CMDLINE_CAPACITY && (0x20..0x7f).contains(&u) {
                        h.cmdline[n] = u as u8;
                        n += 1;
                    }
                }
                h.cmdline_len = n as u64;
            }
        }

        // 2. ACPI from the configuration table.
        let count = field(st, off::ST_TABLE_COUNT).min(1024) as usize;
        let tables = field(st, off::ST_TABLE_PTR);
        let entries = core::slice::from_raw_parts(tables as *const [u8; 24], count);
        let mut acpi10 = 0;
        for e in entries {
            let ptr = u64::from_le_bytes(e[16..24].try_into().unwrap_or([0; 8]));
            if e[..16] == EFI_ACPI_20_GUID {
                h.rsdp = ptr;
            } else if e[..16] == EFI_ACPI_10_GUID {
                acpi10 = ptr;
            }
        }
        if h.rsdp == 0 {
            h.rsdp = acpi10;
        }
        // The console the firmware used: SPCR (servers put it anywhere, QEMU virt at 0x0900_0000).
        if h.rsdp != 0
            && let Ok(uart) = super::spcr::console_from_spcr(h.rsdp, &FirmwareMemory)
        {
            h.uart_base = uart.base;
            h.uart_kind = if uart.kind == UartKind::Pl011 { 1 } else { 2 };
        }

        // 3. Memory map and ExitBootServices (a failed EBS means the map changed: retry once).
        let get_map: GetMemoryMap = core::mem::transmute(field(bs, off::BS_GET_MEMORY_MAP));
        let exit: ExitBootServices = core::mem::transmute(field(bs, off::BS_EXIT_BOOT_SERVICES));
        let mut status = EFI_LOAD_ERROR;
        for _ in 0..2 {
            let mut size = MAP_CAPACITY;
            let (mut key, mut desc_size, mut version) = (0usize, 0usize, 0u32);
            status = get_map(
                &mut size,
                h.map.as_mut_ptr(),
                &mut key,
                &mut desc_size,
                &mut version,
            );
            if status == EFI_BUFFER_TOO_SMALL {
                print(
                    st,
                    "hypervisor: UEFI memory map larger than the stub's buffer\r\n",
                );
                return status;
            }
            if status != EFI_SUCCESS {
                break;
            }
            h.map_size = size as u64;
            h.desc_size = desc_size as u64;
            status = exit(image, key);
            if status == EFI_SUCCESS {
                break;
            }
        }
        if status != EFI_SUCCESS {
            print(st, "hypervisor: GetMemoryMap/ExitBootServices failed\r\n");
            return status;
        }
        // Boot services are gone: no more calls into the firmware from here on.
        h.magic = HANDOFF_MAGIC;
        efi_leave()
    }
}

/// Memory as the firmware maps it while boot services run (identity, all of RAM and the ACPI
/// tables).
struct FirmwareMemory;

impl PhysMem for FirmwareMemory {
    fn read(&self, pa: u64, max_len: usize) -> &[u8] {
        if pa == 0 {
            return &[];
        }
        // SAFETY: only used from `efi_main` before ExitBootServices, on ACPI table addresses the
        // firmware published; its identity map covers them and nothing writes them meanwhile.
        // Callers read only within the lengths the tables declare.
        unsafe { core::slice::from_raw_parts(pa as *const u8, max_len) }
    }
}

/// The console UART SPCR named, when the image was started by UEFI and SPCR had a usable one.
pub fn efi_console() -> Option<Uart> {
    let h = handoff()?;
    let kind = match h.uart_kind {
        1 => UartKind::Pl011,
        2 => UartKind::SbsaGeneric,
        _ => return None,
    };
    (h.uart_base != 0).then_some(Uart {
        base: h.uart_base,
        size: 0x1000,
        kind,
    })
}

/// The hand-off, if the image was started by UEFI (read by `rust_entry` after `_start`).
fn handoff() -> Option<&'static Handoff> {
    // SAFETY: after `efi_leave`, nothing writes the record again (see `HandoffCell`).
    let h = unsafe { &*HANDOFF.0.get() };
    (h.magic == HANDOFF_MAGIC).then_some(h)
}

/// Fills `info` from the UEFI hand-off: memory map, RSDP, system table, command line; the
/// image itself is `InUse`. Returns `false` when the image was not started by UEFI.
pub fn fill_boot_info(image: (u64, u64), info: &mut BootInfo) -> bool {
    let Some(h) = handoff() else {
        return false;
    };
    fill_from(h, image, info);
    true
}

fn fill_from(h: &Handoff, image: (u64, u64), info: &mut BootInfo) {
    info.protocol = crate::BootProtocol::Uefi;
    info.efi_system_table = Some(h.system_table);
    info.rsdp = (h.rsdp != 0).then_some(h.rsdp);
    info.cmdline =
        FixedStr::from_bytes(&h.cmdline[..(h.cmdline_len as usize).min(CMDLINE_CAPACITY)]);
    super::efi_map::regions_from_map(
        &h.map[..(h.map_size as usize).min(MAP_CAPACITY)],
        h.desc_size as usize,
        info,
    );
    info.image_start = image.0;
    info.image_end = image.1;
    info.push_region(MemoryRegion {
        start: image.0,
        len: image.1 - image.0,
        kind: MemoryKind::InUse,
    });
}

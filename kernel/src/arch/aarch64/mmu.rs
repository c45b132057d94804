//! The EL2 direct map: an identity map of RAM (Normal Write-Back, Inner Shareable) and everything
//! else up to [`direct_map_limit`] (Device-nGnRnE, execute-never), built by `boot::aarch64::map`
//! from the boot memory map, replacing the entry's boot table.
//!
//! Why identity (offset 0): EL2 without VHE (HCR_EL2.E2H = 0) has one VA range, translated by
//! TTBR0_EL2; there is no TTBR1_EL2 for a kernel-style high-half direct map. Mapping VA = PA also
//! keeps the image, the stack and the DTB at the addresses the entry already uses.
//!
//! Switching tables follows break-before-make (DDI 0487, D8 "The AArch64 Virtual Memory System
//! Architecture", "Using break-before-make when updating translation table entries", D8.16 in
//! recent issues): the boot table and the new one map some addresses with different memory types
//! (RAM outside the image's GiB was Device, non-RAM inside it was Normal), so old and new
//! translations must never be live together. The switch turns the MMU off (no translation at
//! all: the "break"), invalidates all EL2 TLB entries, installs TCR/TTBR, and turns the MMU back
//! on (the "make"). The code runs from the identity map, so turning the MMU off does not move it,
//! and the sequence makes no data access while the MMU is off.

use aarch64_cpu::registers::{ID_AA64MMFR0_EL1, Readable};
use boot::BootInfo;
use boot::aarch64::map::{self, MapError, Table};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Page-table pages for the direct map (256 KiB of .bss). QEMU `virt` needs 4; a server with a
/// few dozen RAM ranges needs tens. Running out of level-3 tables degrades 2 MiB blocks to Device
/// (logged); running out above that is fatal.
const POOL_TABLES: usize = 64;
/// Normal ranges tracked while planning the map.
const MAX_RANGES: usize = 512;

struct Pool(UnsafeCell<[Table; POOL_TABLES]>);

// SAFETY: the pool is written only by `init_direct_map`, once (guarded by `BUILT`), before the
// tables become live; afterwards only the MMU reads it.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([Table::EMPTY; POOL_TABLES]));
static BUILT: AtomicBool = AtomicBool::new(false);
/// Everything below this is mapped. Until `init_direct_map`, the boot map's 512 GiB.
static LIMIT: AtomicU64 = AtomicU64::new(boot::aarch64::BOOT_MAP_LIMIT);

/// Rebuilds the EL2 tables from `info`'s memory map and switches to them. Call once, before
/// anything allocates RAM from outside the image's own GiB (the boot map maps that as Device).
pub fn init_direct_map(info: &BootInfo) {
    if boot::aarch64::entry_error().is_some() {
        // Not at non-VHE EL2 with the MMU on (init_cpu reports this and exits): nothing to switch.
        return;
    }
    if BUILT.swap(true, Ordering::AcqRel) {
        log::warn!("aarch64: init_direct_map called twice; keeping the first map");
        return;
    }
    let parange = ID_AA64MMFR0_EL1.get() & 0xf;
    let pa_bits = map::parange_bits(parange).min(48);
    let mut ranges: [core::ops::Range<u64>; MAX_RANGES] = core::array::from_fn(|_| 0..0);
    let n = map::normal_ranges(info, &mut ranges).unwrap_or_else(|e| fail(e));
    let normal = &ranges[..n];
    let limit = map::limit_for(normal, pa_bits);

    // SAFETY: `BUILT` makes this the only access ever made through a Rust reference, and
    // TTBR0_EL2 still points at the boot table, so the MMU is not reading the pool yet.
    let tables = unsafe { &mut *POOL.0.get() };
    let tables_pa = tables.as_ptr() as u64;
    // The boot CPU's two stacks and every secondary's (`smp`): all in the image's .bss.
    let smp_guards = super::smp::stack_guards();
    let mut guards = [0u64; 2 + 2 * (super::smp::MAX_CPUS - 1)];
    guards[..2].copy_from_slice(&boot::aarch64::stack_guards().map(|(_, g)| g));
    guards[2..].copy_from_slice(&smp_guards);
    let stats = map::build_with_guards(
        normal,
        limit,
        info.image_start..info.image_end,
        &guards,
        tables,
        tables_pa,
    )
    .unwrap_or_else(|e| fail(e));
    let tcr = map::TCR_EL2 | (parange.min(map::PARANGE_MAX) << map::TCR_PS_SHIFT);

    // SAFETY: the new tables identity-map the image (Normal, checked by `build`), its stack and
    // data, and the console UART (Device, as it is not RAM); the switch itself is break-before-
    // make (see `switch`). Nothing else holds translations: one CPU is up, no guest exists.
    unsafe { switch(tables_pa, tcr) };
    LIMIT.store(limit, Ordering::Release);

    // The image is still running, so it is mapped; check that it is Normal (as `build` promised)
    // and that the map ends where it should, before anything relies on it.
    let top = limit - map::PAGE_SIZE;
    let top_ok = attributes(top)
        .is_some_and(|a| a == ATTR_DEVICE_NGNRNE || normal.iter().any(|r| r.contains(&top)));
    if attributes(info.image_start) != Some(ATTR_NORMAL_WB)
        || !top_ok
        || attributes(limit).is_some()
    {
        super::fatal(format_args!(
            "direct map: self-check after the switch failed"
        ));
    }
    log::info!(
        "aarch64: direct map 0..{limit:#x} identity, {} MiB Normal in {n} ranges, {} tables, {} stack guard pages unmapped{}",
        stats.normal_bytes >> 20,
        stats.tables_used,
        // Checked through the live tables, not taken from the request.
        guards.iter().filter(|&&g| attributes(g).is_none()).count(),
        if stats.degraded_blocks > 0 {
            " (some 2 MiB RAM blocks mapped Device: table pool full)"
        } else {
            ""
        }
    );
}

fn fail(e: MapError) -> ! {
    super::fatal(format_args!("direct map: {e}"))
}

/// Installs new tables with the MMU off in between (break-before-make for the whole VA space).
///
/// # Safety
/// `ttbr` must be a complete level-0 table for `tcr` (T0SZ = 16) that identity-maps this code,
/// the stack and every address in use, with page-table writes already made (they are completed
/// here with a DSB).
unsafe fn switch(ttbr: u64, tcr: u64) {
    // SAFETY: per the function contract. Between the two SCTLR_EL2 writes the MMU is off: fetches
    // continue at the same (identity) addresses and no data access is made. TLBI ALLE2IS removes
    // every EL2 translation from the boot table before the new table is installed.
    unsafe {
        core::arch::asm!(
            "dsb ishst",                 // table writes complete before the walker can see them
            "mrs {sctlr}, sctlr_el2",
            "bic {tmp}, {sctlr}, #1",    // SCTLR_EL2.M = 0: break
            "msr sctlr_el2, {tmp}",
            "isb",
            "tlbi alle2is",
            "dsb ish",
            "msr tcr_el2, {tcr}",
            "msr ttbr0_el2, {ttbr}",
            "isb",
            "msr sctlr_el2, {sctlr}",    // MMU on with the new tables: make
            "isb",
            sctlr = out(reg) _,
            tmp = out(reg) _,
            tcr = in(reg) tcr,
            ttbr = in(reg) ttbr,
            options(nostack, preserves_flags),
        );
    }
}

/// MAIR_EL2 attribute bytes of the two memory types (see `boot::aarch64::map::MAIR_EL2`).
pub const ATTR_NORMAL_WB: u64 = (map::MAIR_EL2 >> (8 * map::ATTR_NORMAL)) & 0xff;
pub const ATTR_DEVICE_NGNRNE: u64 = (map::MAIR_EL2 >> (8 * map::ATTR_DEVICE)) & 0xff;

/// MAIR attribute byte the MMU uses for `va` (by `AT S1E2R`), or `None` if unmapped.
pub fn attributes(va: u64) -> Option<u64> {
    let par: u64;
    // SAFETY: AT only performs a translation-table walk for `va` and writes the result to
    // PAR_EL1 (which holds no state of ours; no guest runs yet). It never faults.
    unsafe {
        core::arch::asm!("at s1e2r, {va}", "isb", "mrs {par}, par_el1", va = in(reg) va, par = out(reg) par, options(nostack, preserves_flags));
    }
    // PAR_EL1.F (bit 0) = 1: the walk faulted. Otherwise ATTR is in bits [63:56].
    (par & 1 == 0).then_some(par >> 56)
}

/// Where the direct map starts in the VA space: it is the identity (see the module comment).
#[allow(dead_code, reason = "arch interface for the memory and IOMMU code")]
pub const DIRECT_MAP_BASE: usize = 0;

/// Address of `pa` in the direct map (the identity), when the map covers it.
pub fn phys_to_virt(pa: u64) -> Option<usize> {
    (pa < direct_map_limit()).then_some(DIRECT_MAP_BASE + pa as usize)
}

/// The physical address behind a direct-map (identity) address.
#[allow(dead_code, reason = "arch interface for the memory and IOMMU code")]
pub fn virt_to_phys(va: usize) -> Option<u64> {
    let pa = (va - DIRECT_MAP_BASE) as u64;
    (pa < direct_map_limit()).then_some(pa)
}

/// Everything below this physical address is mapped (RAM Normal, the rest Device).
pub fn direct_map_limit() -> u64 {
    LIMIT.load(Ordering::Acquire)
}

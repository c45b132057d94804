//! Secondary CPUs on aarch64: found in the device tree (`/cpus`, `/psci`) or the ACPI MADT (GICC
//! entries) with the FADT's ARM boot flags, started with PSCI CPU_ON (Arm DEN 0022, §5.1.4 and
//! the SMC Calling Convention, DEN 0028: function ID in x0, target MPIDR in x1, entry point
//! address in x2, context ID in x3, status back in x0), then kept idle until work is posted.
//!
//! A CPU started by CPU_ON enters [`hv_secondary_entry`] at the Exception level of the caller
//! (EL2 here; DEN 0022 §6.4 "CPU_ON": "the same Exception level as the caller"), MMU and caches
//! off, `x0` = the context ID, which is the physical address of its [`StartBlock`]. With the MMU
//! off its data accesses are Device memory and do not look in the caches (DDI 0487, D8.2.11
//! "The effects of disabling an address translation stage"), so the boot CPU cleans the block to
//! the point of coherency before the call ([`super::cache::clean`]). The entry installs the boot
//! CPU's EL2 controls (HCR, CPTR, CNTHCTL, CNTVOFF, MAIR, TCR, TTBR0, then SCTLR with the MMU and
//! caches on: the same translation tables, already live), its vectors, TPIDR_EL2 = its
//! [`PerCpu`], and its two stacks, exactly as the boot entry does for the boot CPU: SP_EL2 = an
//! exception stack, SP_EL0 = the stack it runs on. Both stacks sit above a guard page the EL2
//! map leaves unmapped ([`stack_guards`], `mmu::init_direct_map`).
//!
//! In Rust ([`secondary_main`]) it wakes its GIC redistributor and CPU interface and enables its
//! EL2 timer PPI (`preempt::init_this_cpu`), announces itself, and waits for work with WFE.
//!
//! Work hand-off, per CPU: a [`Mailbox`] (`boot::smp`, host-tested with threads),
//! a state word and a one-entry slot:
//! - [`launch`] claims an idle CPU by CAS (so two launchers cannot both post), writes the slot,
//!   then publishes it with a **Release** store of POSTED, and wakes the CPU (DSB + SEV);
//! - the CPU's **Acquire** load of POSTED makes the slot and everything the launcher wrote before
//!   the Release visible to it; it runs the work and stores IDLE with **Release**;
//! - [`is_idle`] loads IDLE with **Acquire**, so whatever the work wrote is visible to the
//!   caller that saw it finish.
//!
//! The same word carries the bring-up handshake: the CPU's arrival and the boot CPU's time-out
//! are both CASes on STARTING, so exactly one of them wins.
//!
//! TPIDR_EL2 points at the CPU's [`PerCpu`] for the life of the system; its first word is the
//! vCPU context running on the CPU (0 when none), which the exception vectors and the EL1
//! world switch use (`exception.rs`, `vcpu::el1::asm`).

use core::arch::{asm, global_asm};
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use boot::BootInfo;
use boot::aarch64::dtb::{Conduit, MPIDR_AFFINITY_MASK, PSCI_CPU_ON_64};
use boot::smp::Mailbox;

pub const MAX_CPUS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// The index is at or beyond [`MAX_CPUS`].
    NoSuchCpu,
    /// The CPU is running earlier work (or is the boot CPU, which runs the caller).
    Busy,
    /// No CPU has this index (fewer CPUs came online).
    NotOnline,
}

/// The stack a secondary runs on (SP_EL0): as large as the boot CPU's boot stack, since a
/// secondary runs the same code (guests, dispatch).
const STACK_SIZE: usize = 256 * 1024;
/// Its exception stack (SP_EL2): the fatal-exception report and guest exits use it.
const EXCEPTION_STACK_SIZE: usize = 16 * 1024;
const PAGE: usize = 4096;

/// One secondary's stacks, each directly above its guard page.
#[repr(C, align(4096))]
struct CpuStacks {
    guard: [u8; PAGE],
    stack: [u8; STACK_SIZE],
    exception_guard: [u8; PAGE],
    exception_stack: [u8; EXCEPTION_STACK_SIZE],
}

const _: () = assert!(STACK_SIZE.is_multiple_of(PAGE) && EXCEPTION_STACK_SIZE.is_multiple_of(PAGE));

struct Stacks(core::cell::UnsafeCell<[CpuStacks; MAX_CPUS - 1]>);

// SAFETY: no Rust reference to the stacks' bytes is ever made; only their addresses are used,
// and each CPU's SP points into its own slot (one CPU per slot, see `start_one`).
unsafe impl Sync for Stacks {}

#[allow(
    clippy::large_stack_arrays,
    reason = "a static in .bss, never on a stack"
)]
static STACKS: Stacks = Stacks(core::cell::UnsafeCell::new(
    [const {
        CpuStacks {
            guard: [0; PAGE],
            stack: [0; STACK_SIZE],
            exception_guard: [0; PAGE],
            exception_stack: [0; EXCEPTION_STACK_SIZE],
        }
    }; MAX_CPUS - 1],
));

/// Address of secondary slot `slot`'s (1..MAX_CPUS) stacks.
fn stacks_base(slot: usize) -> u64 {
    STACKS.0.get() as u64 + ((slot - 1) * size_of::<CpuStacks>()) as u64
}

/// The guard pages under every secondary's two stacks (identity-mapped: also physical
/// addresses), for the EL2 map to leave unmapped. Slot order: (run, exception) per slot.
pub fn stack_guards() -> [u64; 2 * (MAX_CPUS - 1)] {
    core::array::from_fn(|i| {
        let base = stacks_base(i / 2 + 1);
        base + if i % 2 == 0 {
            offset_of!(CpuStacks, guard)
        } else {
            offset_of!(CpuStacks, exception_guard)
        } as u64
    })
}

/// The calling secondary's run stack (empty on the boot CPU, whose stack `boot` owns).
pub fn own_run_stack() -> core::ops::Range<u64> {
    match this_slot() {
        0 => 0..0,
        slot => {
            let bottom = stacks_base(slot) + offset_of!(CpuStacks, stack) as u64;
            bottom..bottom + STACK_SIZE as u64
        }
    }
}

/// Which stack `addr` is the guard page of: (CPU slot, "run"/"exception").
pub fn guard_owner(addr: u64) -> Option<(usize, &'static str)> {
    stack_guards()
        .iter()
        .position(|&g| (g..g + PAGE as u64).contains(&addr))
        .map(|i| (i / 2 + 1, if i % 2 == 0 { "run" } else { "exception" }))
}

/// What each CPU owns. TPIDR_EL2 points here; `guest_context` must stay the first field (the
/// vectors and the world switch load it at offset 0).
#[repr(C, align(64))]
pub struct PerCpu {
    /// The vCPU context running on this CPU, 0 when none (`vcpu::el1::asm`).
    pub guest_context: AtomicU64,
    /// Dense index (0 = boot CPU), in bring-up order.
    index: AtomicUsize,
    /// MPIDR affinity fields, as the firmware listed the CPU.
    mpidr: AtomicU64,
    /// Bring-up handshake and work hand-off (`boot::smp`, which documents the
    /// orderings and is host-tested with threads).
    mailbox: Mailbox,
    /// Whether `preempt::init_this_cpu` succeeded on this CPU.
    gic_ok: AtomicBool,
}

const _: () = assert!(offset_of!(PerCpu, guest_context) == 0);

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            guest_context: AtomicU64::new(0),
            index: AtomicUsize::new(0),
            mpidr: AtomicU64::new(0),
            mailbox: Mailbox::new(),
            gic_ok: AtomicBool::new(false),
        }
    }
}

/// Slot 0 is the boot CPU; slot `s` ≥ 1 uses stacks `s`. A CPU that was given up on keeps its
/// slot for good (it may still arrive and park on those stacks); only a slot whose CPU_ON was
/// refused is given to the next CPU.
static PERCPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
/// Dense index → slot, valid below [`ONLINE`].
static SLOT_OF: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// CPUs online, the boot CPU included. Incremented with Release after `SLOT_OF` is written.
static ONLINE: AtomicUsize = AtomicUsize::new(1);
static STARTED: AtomicBool = AtomicBool::new(false);

/// Words the secondary reads with its MMU off ([`hv_secondary_entry`]): 128 bytes per CPU,
/// aligned so that cleaning one CPU's block touches no other data.
#[repr(C, align(128))]
struct StartBlock([AtomicU64; START_WORDS]);

const START_WORDS: usize = 16;
mod word {
    pub const HCR: usize = 0;
    pub const CPTR: usize = 1;
    pub const CNTHCTL: usize = 2;
    pub const CNTVOFF: usize = 3;
    pub const MAIR: usize = 4;
    pub const TCR: usize = 5;
    pub const TTBR0: usize = 6;
    pub const SCTLR: usize = 7;
    pub const VBAR: usize = 8;
    pub const TPIDR: usize = 9;
    pub const SP_EL2: usize = 10;
    pub const SP_EL0: usize = 11;
    pub const SLOT: usize = 12;
}

static START: [StartBlock; MAX_CPUS] =
    [const { StartBlock([const { AtomicU64::new(0) }; START_WORDS]) }; MAX_CPUS];

global_asm!(
    ".pushsection .text.smp_entry, \"ax\"",
    ".balign 4",
    ".global hv_secondary_entry",
    "hv_secondary_entry:",
    "    msr     daifset, #0xf",
    "    mov     x19, x0",            // the StartBlock (physical = virtual: identity map)
    "    mrs     x9, CurrentEL",
    "    and     x9, x9, #0xc",
    "    cmp     x9, #0x8",
    "    b.ne    9f",                 // not EL2: cannot run; the boot CPU times out on us
    // EL2 controls, HCR first (E2H selects the layout of the others); then the translation
    // registers of the live EL2 tables, a local TLB and I-cache clean slate, and the MMU on.
    "    ldr     x9, [x19, #{hcr}]",
    "    msr     hcr_el2, x9",
    "    isb",
    "    ldr     x9, [x19, #{cptr}]",
    "    msr     cptr_el2, x9",
    "    ldr     x9, [x19, #{cnthctl}]",
    "    msr     cnthctl_el2, x9",
    "    ldr     x9, [x19, #{cntvoff}]",
    "    msr     cntvoff_el2, x9",
    "    msr     vttbr_el2, xzr",
    "    ldr     x9, [x19, #{mair}]",
    "    msr     mair_el2, x9",
    "    ldr     x9, [x19, #{tcr}]",
    "    msr     tcr_el2, x9",
    "    ldr     x9, [x19, #{ttbr0}]",
    "    msr     ttbr0_el2, x9",
    "    isb",
    "    tlbi    alle2",
    "    ic      iallu",
    "    dsb     nsh",
    "    isb",
    "    ldr     x9, [x19, #{sctlr}]",
    "    msr     sctlr_el2, x9",
    "    isb",
    // MMU and caches on: the rest is read through the (coherent) cache.
    "    ldr     x9, [x19, #{vbar}]",
    "    msr     vbar_el2, x9",
    "    ldr     x9, [x19, #{tpidr}]",
    "    msr     tpidr_el2, x9",
    "    ldr     x9, [x19, #{sp_el2}]",
    "    mov     sp, x9",             // SPSel = 1 at entry: this is SP_EL2, the exception stack
    "    msr     spsel, #0",
    "    ldr     x9, [x19, #{sp_el0}]",
    "    mov     sp, x9",             // the run stack, as the boot CPU runs on SP_EL0
    "    mov     x29, xzr",
    "    mov     x30, xzr",
    "    ldr     x0, [x19, #{slot}]",
    "    bl      {main}",
    "9:  wfe",
    "    b       9b",
    // The `smp-park=MPIDR` test knob starts that CPU here: it never arrives in Rust.
    ".global hv_secondary_park",
    "hv_secondary_park:",
    "    msr     daifset, #0xf",
    "10: wfe",
    "    b       10b",
    ".popsection",
    hcr = const word::HCR * 8,
    cptr = const word::CPTR * 8,
    cnthctl = const word::CNTHCTL * 8,
    cntvoff = const word::CNTVOFF * 8,
    mair = const word::MAIR * 8,
    tcr = const word::TCR * 8,
    ttbr0 = const word::TTBR0 * 8,
    sctlr = const word::SCTLR * 8,
    vbar = const word::VBAR * 8,
    tpidr = const word::TPIDR * 8,
    sp_el2 = const word::SP_EL2 * 8,
    sp_el0 = const word::SP_EL0 * 8,
    slot = const word::SLOT * 8,
    main = sym secondary_main,
);

unsafe extern "C" {
    fn hv_secondary_entry();
    fn hv_secondary_park();
}

macro_rules! read_sysreg {
    ($name:literal) => {{
        let v: u64;
        // SAFETY: reading an EL2 (or ID) system register has no side effect.
        unsafe {
            asm!(concat!("mrs {}, ", $name), out(reg) v, options(nomem, nostack, preserves_flags))
        };
        v
    }};
}

/// Points TPIDR_EL2 at the boot CPU's [`PerCpu`] (slot 0, index 0). Called by `init_cpu` before
/// the vectors are installed: from then on TPIDR_EL2 is never 0.
pub(super) fn init_boot_cpu() {
    let me = &PERCPU[0];
    me.mpidr.store(
        read_sysreg!("mpidr_el1") & MPIDR_AFFINITY_MASK,
        Ordering::Relaxed,
    );
    me.mailbox.set_running();
    me.gic_ok.store(false, Ordering::Relaxed);
    let tpidr = me as *const PerCpu as u64;
    // SAFETY: TPIDR_EL2 is a software thread-ID register; the vectors and the world switch
    // expect a `PerCpu` there, which this is (static, lives forever).
    unsafe { asm!("msr tpidr_el2, {}", in(reg) tpidr, options(nomem, nostack, preserves_flags)) };
}

/// The calling CPU's [`PerCpu`] slot, from TPIDR_EL2 (checked to point into [`PERCPU`]).
fn this_slot() -> usize {
    let tpidr = read_sysreg!("tpidr_el2") as usize;
    let base = PERCPU.as_ptr() as usize;
    let slot = tpidr.wrapping_sub(base) / size_of::<PerCpu>();
    // Before `init_boot_cpu` (or with a corrupted register) the boot CPU's slot is the answer
    // that keeps callers safe: only the boot CPU runs then.
    if tpidr.wrapping_sub(base).is_multiple_of(size_of::<PerCpu>()) && slot < MAX_CPUS {
        slot
    } else {
        0
    }
}

/// CPUs online, the boot CPU included.
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// The calling CPU's index: 0 = boot CPU; dense indices in bring-up order. Inlined: the exit
/// path asks for it several times per exit.
#[inline]
pub fn cpu_index() -> usize {
    PERCPU[this_slot()].index.load(Ordering::Relaxed)
}

/// The MPIDR affinity the firmware listed for CPU `cpu` (online CPUs only).
pub fn mpidr_of(cpu: usize) -> Option<u64> {
    (cpu < online()).then(|| {
        PERCPU[SLOT_OF[cpu].load(Ordering::Relaxed)]
            .mpidr
            .load(Ordering::Relaxed)
    })
}

fn percpu_of(cpu: usize) -> Result<&'static PerCpu, SmpError> {
    if cpu >= MAX_CPUS {
        return Err(SmpError::NoSuchCpu);
    }
    // Acquire pairs with the Release increment in `start_one`: SLOT_OF[cpu] is written then.
    if cpu >= online() {
        return Err(SmpError::NotOnline);
    }
    Ok(&PERCPU[SLOT_OF[cpu].load(Ordering::Relaxed)])
}

/// Posts `f(arg)` to idle online secondary `cpu` and returns at once; the CPU runs it, then
/// idles again. The boot CPU (0) never takes posted work: `Busy`.
pub fn launch(cpu: usize, f: fn(usize), arg: usize) -> Result<(), SmpError> {
    let pc = percpu_of(cpu)?;
    if cpu == 0 {
        return Err(SmpError::Busy);
    }
    // The mailbox's CAS lets one launcher in; its Release store of POSTED publishes the slot
    // and everything the caller wrote before `launch` to the CPU.
    pc.mailbox
        .post(f as *const () as usize, arg)
        .map_err(|_| SmpError::Busy)?;
    wake_all();
    Ok(())
}

/// Whether `cpu` finished its last launched work (true for an idle online CPU; false for the
/// boot CPU, which is never idle, and for CPUs that are not online).
pub fn is_idle(cpu: usize) -> bool {
    // Acquire (in the mailbox) pairs with the CPU's Release of IDLE after the work returned.
    percpu_of(cpu).is_ok_and(|pc| cpu != 0 && pc.mailbox.is_idle())
}

/// DSB then SEV: the state store is visible before any CPU waiting in WFE wakes to look.
fn wake_all() {
    // SAFETY: barriers and SEV have no memory-safety effect.
    unsafe { asm!("dsb ish", "sev", options(nostack, preserves_flags)) };
}

fn wait_for_event() {
    // SAFETY: WFE only waits; an event (SEV, or the CPU's own event register) ends it.
    unsafe { asm!("wfe", options(nomem, nostack, preserves_flags)) };
}

/// Counter ticks (CNTPCT_EL0) and their frequency, for bounded waits.
fn now() -> u64 {
    let t: u64;
    // SAFETY: CNTPCT_EL0 is a read-only counter; ISB keeps the read in order.
    unsafe {
        asm!("isb", "mrs {}, cntpct_el0", out(reg) t, options(nomem, nostack, preserves_flags))
    };
    t
}

/// Waits at most `millis` for `done`; returns whether it became true.
pub fn wait_until(millis: u64, mut done: impl FnMut() -> bool) -> bool {
    let freq = read_sysreg!("cntfrq_el0").max(1);
    let start = now();
    let budget = freq.saturating_mul(millis) / 1000;
    loop {
        if done() {
            return true;
        }
        if now().wrapping_sub(start) > budget {
            return done();
        }
        core::hint::spin_loop();
    }
}

/// Waits (bounded) until `cpu` has finished its launched work.
pub fn wait_idle(cpu: usize, millis: u64) -> bool {
    wait_until(millis, || is_idle(cpu))
}

/// Rust entry of a secondary, on its own run stack with TPIDR_EL2 set (see the module comment).
extern "C" fn secondary_main(slot: usize) -> ! {
    let Some(me) = PERCPU.get(slot) else {
        super::halt()
    };
    // Claim arrival first: if the boot CPU already gave up on us (abandoned), our index may
    // belong to another CPU by now, so touch nothing and park.
    if !me.mailbox.arrive() {
        super::halt()
    }
    me.gic_ok
        .store(super::preempt::init_this_cpu().is_ok(), Ordering::Relaxed);
    // Release: the GIC setup and `gic_ok` are visible to the boot CPU once it sees us up.
    me.mailbox.ready();
    wake_all();
    loop {
        // Acquire (in `take`) pairs with `launch`'s Release of the posted work.
        let Some((func, arg)) = me.mailbox.take() else {
            wait_for_event();
            continue;
        };
        // SAFETY: the only writer of a mailbox's function word is `launch`, which stores a
        // `fn(usize)` converted to its address; converting it back yields that same function.
        let f = unsafe { core::mem::transmute::<usize, fn(usize)>(func) };
        f(arg);
        // Release (in `finish`): the work's effects are visible to whoever sees it idle.
        me.mailbox.finish();
        wake_all();
    }
}

/// How CPU_ON is reached, from the device tree or the FADT.
struct CpuOn {
    function_id: u32,
}

/// PSCI return codes (DEN 0022 §5.2.2).
fn psci_error(code: i64) -> &'static str {
    match code {
        -1 => "NOT_SUPPORTED",
        -2 => "INVALID_PARAMETERS",
        -3 => "DENIED",
        -4 => "ALREADY_ON",
        -5 => "ON_PENDING",
        -6 => "INTERNAL_FAILURE",
        -7 => "NOT_PRESENT",
        -8 => "DISABLED",
        -9 => "INVALID_ADDRESS",
        _ => "unknown PSCI status",
    }
}

fn psci_cpu_on(function_id: u32, mpidr: u64, entry: u64, context: u64) -> i64 {
    let ret: u64;
    // SAFETY: an SMCCC call to the firmware's PSCI CPU_ON: it starts another CPU at `entry` with
    // x0 = `context` and returns a status in x0; SMCCC lets it clobber x0-x17, which
    // `clobber_abi("C")` declares. No memory of ours is written by the firmware.
    unsafe {
        asm!(
            "smc #0",
            inout("x0") u64::from(function_id) => ret,
            inout("x1") mpidr => _,
            inout("x2") entry => _,
            inout("x3") context => _,
            options(nostack),
            clobber_abi("C"),
        );
    }
    ret as i64
}

/// CPU_ON of `mpidr` with an entry that parks, as the bring-up would call it; returns the PSCI
/// status and its name. For `scenario=smp`, which asks for CPUs that are already on or do not
/// exist: the firmware's answers (ALREADY_ON, INVALID_PARAMETERS) must be decoded, and nothing
/// starts.
pub fn cpu_on_status(mpidr: u64) -> Option<(i64, &'static str)> {
    let on = cpu_on_method()?;
    let ret = psci_cpu_on(
        on.function_id,
        mpidr,
        hv_secondary_park as *const () as u64,
        0,
    );
    Some((ret, if ret == 0 { "SUCCESS" } else { psci_error(ret) }))
}

/// CPU_ON's function ID as the bring-up found it.
fn cpu_on_method() -> Option<CpuOn> {
    let f = CPU_ON_ID.load(Ordering::Relaxed);
    (f != 0).then_some(CpuOn {
        function_id: f as u32,
    })
}

static CPU_ON_ID: AtomicU64 = AtomicU64::new(0);

/// The firmware's CPU list (MPIDR affinities) into `out`; returns how many were written, how
/// many enabled CPUs the firmware lists (more than `MAX_CPUS` are counted, not started), and how
/// to call CPU_ON.
fn firmware_cpus(
    info: &BootInfo,
    out: &mut [u64; MAX_CPUS],
) -> Result<(usize, usize, CpuOn), &'static str> {
    if let Some(dt) = boot::aarch64::device_tree() {
        let list = dt.cpus(out).map_err(|e| {
            log::error!("smp: device tree /cpus: {e}");
            "unusable /cpus node"
        })?;
        if list.not_psci > 0 || list.disabled > 0 {
            log::warn!(
                "smp: {} CPUs with a non-PSCI enable-method and {} disabled CPUs are not started",
                list.not_psci,
                list.disabled
            );
        }
        let on = dt.psci_cpu_on().map_err(|e| {
            log::error!("smp: device tree: {e}");
            "no PSCI CPU_ON"
        })?;
        if on.conduit == Conduit::Hvc {
            return Err(
                "the PSCI method is \"hvc\", which an EL2 hypervisor cannot use (an HVC \
                        from EL2 is taken by EL2 itself); only the boot CPU runs",
            );
        }
        return Ok((
            list.count,
            list.count + list.dropped,
            CpuOn {
                function_id: on.function_id,
            },
        ));
    }
    // ACPI only: MADT GICC entries, PSCI per the FADT (ACPI 6.5 §5.2.9 ARM_BOOT_ARCH: bit 0
    // PSCI_COMPLIANT, bit 1 PSCI_USE_HVC). ACPI implies PSCI 0.2 or later, so CPU_ON_64.
    let rsdp = info.rsdp.ok_or("no device tree and no ACPI RSDP")?;
    let acpi = crate::firmware::acpi::discover(rsdp).map_err(|_| "ACPI tables unreadable")?;
    let flags = acpi.arm_boot_flags.ok_or("no FADT ARM boot flags")?;
    if flags & 1 == 0 {
        return Err(
            "the FADT says the firmware is not PSCI compliant (parking protocol unsupported)",
        );
    }
    if flags & 2 != 0 {
        return Err(
            "the FADT says PSCI uses HVC, which an EL2 hypervisor cannot use; only the boot CPU runs",
        );
    }
    let madt = acpi.madt.ok_or("no MADT")?;
    let madt = iommu::firmware::madt::Madt::parse(madt.bytes).map_err(|_| "MADT malformed")?;
    let list = boot::aarch64::dtb::acpi_cpus(madt.cpus.iter().map(|c| (c.mpidr, c.enabled)), out);
    let (count, total) = (list.count, list.count + list.dropped);
    Ok((
        count,
        total,
        CpuOn {
            function_id: PSCI_CPU_ON_64,
        },
    ))
}

/// Brings every CPU the firmware lists online; returns how many are online incl. the boot CPU.
/// Prints "smp: N of M CPUs online". A CPU that fails CPU_ON or does not arrive within
/// [`ARRIVAL_MS`] is reported and skipped, never waited for without bound. Call once, after
/// memory, exceptions and the direct map are up; it brings up the GIC distributor itself.
pub fn start_secondaries(info: &'static BootInfo) -> usize {
    if STARTED.swap(true, Ordering::AcqRel) {
        return online();
    }
    if let Err(e) = super::preempt::init_timer(info) {
        log::warn!("smp: GIC: {e}; CPUs run without their EL2 timer");
    }
    PERCPU[0].gic_ok.store(
        super::preempt::redistributor_state().is_some(),
        Ordering::Relaxed,
    );
    // Test knob (`aarch64-smp-park`): start this CPU at an entry that parks at once, to show
    // that a CPU which never arrives is reported and skipped, and that indices stay dense.
    let park = info
        .cmdline_value("smp-park")
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    let mut mpidrs = [0u64; MAX_CPUS];
    let (count, total) = match firmware_cpus(info, &mut mpidrs) {
        Ok((count, total, on)) => {
            CPU_ON_ID.store(on.function_id.into(), Ordering::Relaxed);
            let me = PERCPU[0].mpidr.load(Ordering::Relaxed);
            let mut next_slot = 1;
            for &mpidr in mpidrs[..count].iter().filter(|&&m| m != me) {
                if next_slot >= MAX_CPUS {
                    log::warn!(
                        "smp: no free CPU slot for MPIDR {mpidr:#x} (MAX_CPUS = {MAX_CPUS})"
                    );
                    break;
                }
                match start_one(next_slot, mpidr, &on, park == Some(mpidr)) {
                    // CPU_ON refused: the slot was never used; try the next CPU in it.
                    Err(StartError::Skipped) => {}
                    Ok(()) | Err(StartError::SlotLost) => next_slot += 1,
                    Err(StartError::Stop) => break,
                }
            }
            (count, total)
        }
        Err(e) => {
            log::warn!("smp: {e}");
            (1, 1)
        }
    };
    let n = online();
    crate::println!("smp: {n} of {} CPUs online", total.max(count).max(1));
    n
}

/// How long a CPU may take from CPU_ON to idle in Rust.
const ARRIVAL_MS: u64 = 3000;

enum StartError {
    /// CPU_ON refused: the slot was not used.
    Skipped,
    /// The CPU did not arrive: its slot is burnt (it may still arrive and park there).
    SlotLost,
    /// The CPU arrived but did not finish its setup: its index may be in use; stop here.
    Stop,
}

fn start_one(slot: usize, mpidr: u64, on: &CpuOn, park: bool) -> Result<(), StartError> {
    let pc = &PERCPU[slot];
    let index = online();
    pc.index.store(index, Ordering::Relaxed);
    pc.mpidr.store(mpidr, Ordering::Relaxed);
    pc.mailbox.prepare_start();
    let stacks = stacks_base(slot);
    let block = &START[slot].0;
    let set = |w: usize, v: u64| block[w].store(v, Ordering::Relaxed);
    set(word::HCR, read_sysreg!("hcr_el2"));
    set(word::CPTR, read_sysreg!("cptr_el2"));
    set(word::CNTHCTL, read_sysreg!("cnthctl_el2"));
    set(word::CNTVOFF, read_sysreg!("cntvoff_el2"));
    set(word::MAIR, read_sysreg!("mair_el2"));
    set(word::TCR, read_sysreg!("tcr_el2"));
    set(word::TTBR0, read_sysreg!("ttbr0_el2"));
    set(word::SCTLR, read_sysreg!("sctlr_el2"));
    set(word::VBAR, read_sysreg!("vbar_el2"));
    set(word::TPIDR, pc as *const PerCpu as u64);
    set(
        word::SP_EL2,
        stacks + (offset_of!(CpuStacks, exception_stack) + EXCEPTION_STACK_SIZE) as u64,
    );
    set(
        word::SP_EL0,
        stacks + (offset_of!(CpuStacks, stack) + STACK_SIZE) as u64,
    );
    set(word::SLOT, slot as u64);
    let block_pa = block.as_ptr() as u64;
    // SAFETY: the block is mapped (a static) and `clean` only writes cache lines back; the
    // secondary reads it with its MMU and caches off, from memory (see the module comment).
    // The DSB inside `clean` also orders the PerCpu stores before CPU_ON.
    unsafe { super::cache::clean(block.as_ptr().cast(), size_of::<StartBlock>()) };
    let entry = if park {
        hv_secondary_park as *const () as u64
    } else {
        hv_secondary_entry as *const () as u64
    };
    let ret = psci_cpu_on(on.function_id, mpidr, entry, block_pa);
    if ret != 0 {
        pc.mailbox.reset();
        log::warn!(
            "smp: CPU_ON of MPIDR {mpidr:#x} failed: {} ({ret}); skipped",
            psci_error(ret)
        );
        return Err(StartError::Skipped);
    }
    let arrived = wait_until(ARRIVAL_MS, || pc.mailbox.left_starting());
    if !arrived && pc.mailbox.abandon() {
        log::warn!("smp: MPIDR {mpidr:#x} did not come up within {ARRIVAL_MS} ms; skipped");
        return Err(StartError::SlotLost);
    }
    // Arrived: its GIC setup is bounded (the GIC driver's polls are), so this wait is too.
    if !wait_until(ARRIVAL_MS, || pc.mailbox.is_up()) {
        log::error!(
            "smp: MPIDR {mpidr:#x} arrived but did not finish its setup; no further CPUs are started"
        );
        return Err(StartError::Stop);
    }
    if !pc.gic_ok.load(Ordering::Relaxed) {
        log::warn!(
            "smp: cpu {index} (MPIDR {mpidr:#x}) has no working redistributor: no EL2 timer there"
        );
    }
    SLOT_OF[index].store(slot, Ordering::Relaxed);
    // Release: SLOT_OF[index] is visible to whoever sees the new count (`percpu_of`).
    ONLINE.store(index + 1, Ordering::Release);
    log::info!("smp: cpu {index} MPIDR {mpidr:#x} online");
    Ok(())
}

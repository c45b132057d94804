//! Secondary CPUs (docs/smp.md "x86_64"): which ones exist (the ACPI MADT), how they are started
//! (INIT-SIPI-SIPI into a real-mode trampoline below 1 MiB, Intel SDM vol 3 §9.4.4, §11.6.1),
//! what each owns (GDT, TSS, IST and main stacks with unmapped guard pages, per-CPU data behind
//! GS), and how work reaches them (a [`boot::smp::Mailbox`] per CPU).
//!
//! Bring-up, one CPU at a time, on the boot CPU:
//! 1. the MADT's enabled local APICs minus the boot CPU's, at most [`MAX_CPUS`] in all;
//! 2. the trampoline page ([`TRAMPOLINE_PA`], claimed in the physical-memory ledger) gets the
//!    code below and a data block: a GDT, CR3 (the boot CPU's page tables), the EFER bits, and
//!    per start the expected APIC ID, the stack top and the CPU index;
//! 3. for each CPU: its stacks are allocated and their guard pages unmapped, then INIT, 10 ms,
//!    SIPI, 200 µs, SIPI again if it has not answered (the SDM's "universal start-up algorithm"),
//!    then up to [`ANSWER_TIMEOUT_US`] for it to say it is online. Delays come from the PIT
//!    (works under QEMU, icount and Bochs alike; no calibration). A CPU that stays silent gets
//!    another INIT (parking it in wait-for-SIPI) and is reported and skipped; its stacks are
//!    never reused, and the trampoline's APIC-ID check keeps a late starter from running on the
//!    next CPU's stack.
//!
//! Each secondary CPU then loads its own GDT/TSS and the shared IDT, sets GS base to its
//! [`PerCpu`], sets PAT like the boot CPU, brings up its local APIC in the boot CPU's mode (and
//! timer programming), switches SVM on with its own host save area when the CPU has SVM (VMX
//! stays on the boot CPU: docs/smp.md), says it is online and idles polling its mailbox.

use core::arch::{asm, global_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use boot::BootInfo;
use boot::smp::Mailbox;

use super::{apic, gdt, paging, pio};
use crate::mem::phys::{Frames, TRAMPOLINE_PA};
use crate::println;

/// Most CPUs brought online, the boot CPU included.
pub const MAX_CPUS: usize = 16;

/// Why [`launch`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// Not a secondary CPU index: 0 (the boot CPU) or `>= MAX_CPUS`.
    NoSuchCpu,
    /// The CPU still runs (or has not yet taken) earlier work.
    Busy,
    /// No CPU was brought online under this index.
    NotOnline,
}

/// How long a started CPU may take to say it is online (PIT time).
const ANSWER_TIMEOUT_US: u64 = 1_000_000;

/// Stack sizes in 4 KiB pages: the main stack as large as the boot CPU's (debug builds are
/// stack-hungry and guests are scheduled from it), the three IST stacks as the boot CPU's.
const MAIN_STACK_PAGES: u64 = 64;
const IST_STACK_PAGES: u64 = 4;
/// One allocation per CPU: `[guard][main][guard][#DF][guard][NMI][guard][#MC]`.
const CPU_PAGES: u64 = 4 + MAIN_STACK_PAGES + 3 * IST_STACK_PAGES;
const PAGE: u64 = 4096;

/// Per-CPU data; GS base points at this CPU's entry, so [`cpu_index`] is one load.
#[repr(C)]
pub struct PerCpu {
    /// Dense index (0 = boot CPU), read by [`cpu_index`] at GS:[INDEX_OFFSET].
    index: AtomicUsize,
    /// Timer interrupts taken on this CPU; the timer ISR increments GS:[TICKS_OFFSET] with a
    /// plain aligned 8-byte `inc` (only this CPU writes it, and an aligned quadword access is
    /// single-copy atomic, SDM §9.1.1, so atomic loads elsewhere never see a torn value).
    ticks: AtomicU64,
    /// Local APIC ID (from the MADT; the CPU checks it against its own in the trampoline).
    apic_id: AtomicU32,
    /// SVM on this CPU: 0 = CPU has none, 1 = enabled, 2 = enabling failed.
    svm: AtomicU8,
    /// Local APIC brought up in the boot CPU's mode.
    apic_ok: AtomicBool,
    /// Set by the CPU itself on entering Rust code (its slot's GDT/TSS may then be in use).
    entered: AtomicBool,
    /// Set (Release) by the CPU itself once its setup is complete; read with Acquire.
    online: AtomicBool,
    /// Main stack top and the four guard pages (main, #DF, NMI, #MC), physical = identity.
    stack_top: AtomicU64,
    guards: [AtomicU64; 4],
    ist_tops: [AtomicU64; 3],
    mailbox: Mailbox,
}

impl PerCpu {
    const fn new(index: usize) -> Self {
        Self {
            index: AtomicUsize::new(index),
            ticks: AtomicU64::new(0),
            apic_id: AtomicU32::new(0),
            svm: AtomicU8::new(0),
            apic_ok: AtomicBool::new(false),
            entered: AtomicBool::new(false),
            online: AtomicBool::new(false),
            stack_top: AtomicU64::new(0),
            guards: [const { AtomicU64::new(0) }; 4],
            ist_tops: [const { AtomicU64::new(0) }; 3],
            mailbox: Mailbox::new(),
        }
    }
}

pub const INDEX_OFFSET: usize = offset_of!(PerCpu, index);
pub const TICKS_OFFSET: usize = offset_of!(PerCpu, ticks);

static PER_CPU: [PerCpu; MAX_CPUS] = {
    let mut cpus = [const { PerCpu::new(0) }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        cpus[i] = PerCpu::new(i);
        i += 1;
    }
    cpus
};

/// CPUs online: indices `0..ONLINE` (the boot CPU is always online).
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// Set once the boot CPU's GS base points at `PER_CPU[0]`; before that `cpu_index` is 0.
static GS_READY: AtomicBool = AtomicBool::new(false);

const IA32_GS_BASE: u32 = 0xc000_0101;
const IA32_EFER: u32 = 0xc000_0080;
const EFER_SVME: u64 = 1 << 12;
const EFER_LME_NXE: u64 = 1 << 8 | 1 << 11;
const VM_HSAVE_PA: u32 = 0xc001_0117;

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers pass IA32_EFER, IA32_GS_BASE, or VM_HSAVE_PA (only on CPUs with SVM, which
    // defines it); reading them has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

fn set_gs_base(cpu: &'static PerCpu) {
    let v = core::ptr::from_ref(cpu) as u64;
    // SAFETY: GS base only changes what GS-relative loads read; the hypervisor uses GS for
    // nothing but `PerCpu`, and this is the calling CPU's own, 'static entry.
    unsafe {
        asm!("wrmsr", in("ecx") IA32_GS_BASE, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags));
    }
}

/// Points the boot CPU's GS base at its `PerCpu` (from `init_cpu`, before anything else uses
/// [`cpu_index`] or the timer).
pub fn init_boot_cpu() {
    set_gs_base(&PER_CPU[0]);
    GS_READY.store(true, Ordering::Release);
}

/// The calling CPU's index: 0 = boot CPU; secondaries dense, in bring-up order.
#[inline]
pub fn cpu_index() -> usize {
    if !GS_READY.load(Ordering::Acquire) {
        return 0;
    }
    let index: usize;
    // SAFETY: once GS_READY is set, GS base on every CPU that runs hypervisor code points at
    // its `PER_CPU` entry (the boot CPU in `init_boot_cpu`, each secondary first thing in
    // `x86_64_ap_entry`, before it runs any other Rust code); VMRUN/VMX exits restore it (SVM:
    // VMLOAD of the host block; VMX: HOST_GS_BASE). The load is of an AtomicUsize's word.
    unsafe {
        asm!("mov {}, qword ptr gs:[{off}]", out(reg) index, off = const INDEX_OFFSET, options(nostack, readonly, preserves_flags));
    }
    index.min(MAX_CPUS - 1)
}

/// Timer ticks of the calling CPU.
#[inline]
pub fn this_cpu_ticks() -> u64 {
    PER_CPU[cpu_index()].ticks.load(Ordering::Relaxed)
}

/// Which secondary CPU's guard page holds `cr2` or `rsp` (the exception report's "stack
/// overflow" line): (CPU index, stack name, guard address).
pub fn guard_hit(cr2: u64, rsp: u64) -> Option<(usize, &'static str, u64)> {
    const NAMES: [&str; 4] = ["main", "IST1 (#DF)", "IST2 (NMI)", "IST3 (#MC)"];
    (1..MAX_CPUS).find_map(|cpu| {
        PER_CPU[cpu]
            .guards
            .iter()
            .zip(NAMES)
            .map(|(g, name)| (g.load(Ordering::Relaxed), name))
            .find(|&(g, _)| {
                g != 0 && ((g..g + PAGE).contains(&cr2) || (g..g + PAGE).contains(&rsp))
            })
            .map(|(g, name)| (cpu, name, g))
    })
}

/// Which of the calling secondary CPU's IST stacks (1-3) holds `addr`, for the exception report.
pub fn this_cpu_ist(addr: u64) -> Option<u8> {
    let cpu = &PER_CPU[cpu_index()];
    (1u8..)
        .zip(&cpu.ist_tops)
        .map(|(n, top)| (n, top.load(Ordering::Relaxed)))
        .find(|&(_, top)| top != 0 && (top - PAGE * IST_STACK_PAGES..top).contains(&addr))
        .map(|(n, _)| n)
}

/// CPUs online, the boot CPU included.
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

fn secondary(cpu: usize) -> Result<&'static PerCpu, SmpError> {
    if cpu == 0 || cpu >= MAX_CPUS {
        return Err(SmpError::NoSuchCpu);
    }
    if cpu >= online() {
        return Err(SmpError::NotOnline);
    }
    Ok(&PER_CPU[cpu])
}

/// Posts `f(arg)` to idle online secondary `cpu` and returns at once; the CPU runs it, then idles
/// again. The mailbox's Release store of POSTED publishes `f`, `arg` and everything the caller
/// wrote before; the CPU's Release store of IDLE after `f` returns publishes `f`'s writes to
/// an [`is_idle`] that sees it (Acquire).
pub fn launch(cpu: usize, f: fn(usize), arg: usize) -> Result<(), SmpError> {
    let c = secondary(cpu)?;
    c.mailbox
        .post(f as usize, arg)
        .map_err(|boot::smp::Busy| SmpError::Busy)
}

/// Whether `cpu` finished its last launched work (true for an idle online secondary; false for
/// the boot CPU and CPUs not online).
pub fn is_idle(cpu: usize) -> bool {
    secondary(cpu).is_ok_and(|c| c.mailbox.is_idle())
}

/// This CPU's APIC ID as CPUID reports it (leaf 0Bh EDX: the x2APIC ID; else leaf 1 EBX[31:24]),
/// which the trampoline compares the same way.
fn cpuid_apic_id() -> (u32, u32) {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax >= 0xb && __cpuid_count(0xb, 0).ebx & 0xffff != 0 {
        (0xb, __cpuid_count(0xb, 0).edx)
    } else {
        (1, __cpuid(1).ebx >> 24)
    }
}

// ---- The trampoline ------------------------------------------------------------------------
// Copied to TRAMPOLINE_PA; the SIPI starts the CPU at CS = TRAMPOLINE_PA >> 4, IP = 0 in real
// mode. Data block at DATA (written by `start_secondaries`): GDT (null, 0x08 code32, 0x10 data,
// 0x18 code64), GDT pointer, CR3, EFER bits, stack top, CPU index, Rust entry, expected APIC ID,
// CPUID leaf for the ID.
const DATA: usize = 0xf00;
const D_GDT: usize = DATA;
const D_GDTP: usize = DATA + 0x20;
const D_CR3: usize = DATA + 0x28;
const D_EFER: usize = DATA + 0x30;
const D_STACK: usize = DATA + 0x38;
const D_INDEX: usize = DATA + 0x40;
const D_ENTRY: usize = DATA + 0x48;
const D_APIC_ID: usize = DATA + 0x50;
const D_ID_LEAF: usize = DATA + 0x54;

global_asm!(
    r#"
    .pushsection .rodata.x86_64_ap_trampoline, "a"
    .global x86_64_ap_trampoline_start, x86_64_ap_trampoline_end
    .code16
x86_64_ap_trampoline_start:
    cli
    cld
    mov ax, cs
    mov ds, ax
    lgdt [{gdtp}]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea
    .long {pa} + (2f - x86_64_ap_trampoline_start)
    .short 0x08
    .code32
2:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    /* Only the CPU the data block is for goes on: a CPU that answers late must not use the
       next CPU's stack. */
    mov eax, dword ptr [{pa} + {id_leaf}]
    xor ecx, ecx
    cpuid
    cmp dword ptr [{pa} + {id_leaf}], 1
    jne 3f
    shr ebx, 24
    mov edx, ebx
3:
    cmp edx, dword ptr [{pa} + {apic_id}]
    jne 9f
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, dword ptr [{pa} + {cr3}]
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, dword ptr [{pa} + {efer}]
    wrmsr
    mov eax, cr0
    and eax, 0x9fffffff
    or eax, 0x80010001
    mov cr0, eax
    .byte 0xea
    .long {pa} + (4f - x86_64_ap_trampoline_start)
    .short 0x18
    .code64
4:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, qword ptr [{pa} + {stack}]
    mov rdi, qword ptr [{pa} + {index}]
    mov rax, qword ptr [{pa} + {entry}]
    xor ebp, ebp
    call rax
    ud2
    .code32
9:
    cli
    hlt
    jmp 9b
x86_64_ap_trampoline_end:
    .code64
    .popsection
"#,
    pa = const TRAMPOLINE_PA,
    gdtp = const D_GDTP,
    id_leaf = const D_ID_LEAF,
    apic_id = const D_APIC_ID,
    cr3 = const D_CR3,
    efer = const D_EFER,
    stack = const D_STACK,
    index = const D_INDEX,
    entry = const D_ENTRY,
);

unsafe extern "C" {
    // Only their addresses are used: the bounds of the code copied to the trampoline page.
    static x86_64_ap_trampoline_start: u8;
    static x86_64_ap_trampoline_end: u8;
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Writes the code and the fixed part of the data block; `None` if the code does not fit.
fn prepare_trampoline(page: &mut [u8], id_leaf: u32) -> Option<()> {
    let start = (&raw const x86_64_ap_trampoline_start) as usize;
    let end = (&raw const x86_64_ap_trampoline_end) as usize;
    let len = end.checked_sub(start).filter(|&l| l <= DATA)?;
    // SAFETY: `start..end` is the assembled trampoline in .rodata of the image (identity
    // mapped, immutable), bounded by the two labels above.
    let code = unsafe { core::slice::from_raw_parts(start as *const u8, len) };
    put(page, 0, code);
    // Flat 4 GiB segments; accessed bits preset so the CPU never writes the table.
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff, // 0x08: 32-bit code
        0x00cf_9300_0000_ffff, // 0x10: data
        0x00af_9b00_0000_ffff, // 0x18: 64-bit code (L=1)
    ];
    for (i, d) in gdt.iter().enumerate() {
        put(page, D_GDT + 8 * i, &d.to_le_bytes());
    }
    put(page, D_GDTP, &(31u16).to_le_bytes());
    put(
        page,
        D_GDTP + 2,
        &((TRAMPOLINE_PA as u32) + D_GDT as u32).to_le_bytes(),
    );
    let cr3 = paging::root();
    if cr3 == 0 || cr3 >= 1 << 32 {
        return None; // the 32-bit part loads CR3 from 32 bits
    }
    put(page, D_CR3, &cr3.to_le_bytes());
    let efer = rdmsr(IA32_EFER) & EFER_LME_NXE | 1 << 8;
    put(page, D_EFER, &efer.to_le_bytes());
    let entry = x86_64_ap_entry as *const () as u64;
    put(page, D_ENTRY, &entry.to_le_bytes());
    put(page, D_ID_LEAF, &id_leaf.to_le_bytes());
    Some(())
}

/// Allocates CPU `index`'s stacks (below 4 GiB: the identity map, which the page-table walk
/// from the trampoline's CR3 also covers) and unmaps their guard pages. The frames are never
/// freed: they stay this slot's, or are abandoned with a CPU that did not answer.
fn prepare_stacks(cpu: &PerCpu) -> Result<(), &'static str> {
    let frames =
        Frames::alloc(CPU_PAGES, PAGE, 1 << 32).ok_or("no memory below 4 GiB for its stacks")?;
    // The token is never freed (it has no Drop): the CPU uses the memory as its stacks for good,
    // and nothing else can obtain it.
    let base = frames.pa();
    let main_guard = base;
    let main_top = base + PAGE * (1 + MAIN_STACK_PAGES);
    let mut guards = [main_guard, 0, 0, 0];
    let mut ist_tops = [0; 3];
    for i in 0..3 {
        let guard = main_top + i as u64 * PAGE * (1 + IST_STACK_PAGES);
        guards[i + 1] = guard;
        ist_tops[i] = guard + PAGE * (1 + IST_STACK_PAGES);
    }
    for &g in &guards {
        if !paging::unmap_page(g) {
            return Err("a stack guard page could not be unmapped");
        }
    }
    cpu.stack_top.store(main_top, Ordering::Relaxed);
    for (slot, g) in cpu.guards.iter().zip(guards) {
        slot.store(g, Ordering::Relaxed);
    }
    for (slot, t) in cpu.ist_tops.iter().zip(ist_tops) {
        slot.store(t, Ordering::Relaxed);
    }
    Ok(())
}

/// Waits (PIT) until `cpu` says it is online or `us` passed.
fn wait_online(cpu: &PerCpu, us: u64) -> bool {
    let mut waited = 0;
    loop {
        // Acquire: pairs with the CPU's Release store; its whole setup is visible after.
        if cpu.online.load(Ordering::Acquire) {
            return true;
        }
        if waited >= us {
            return false;
        }
        pio::pit_wait_us(1000);
        waited += 1000;
    }
}

/// INIT-SIPI-SIPI to `apic_id` (SDM §9.4.4.1): INIT, 10 ms, SIPI, 200 µs, a second SIPI only if
/// the first did not start it.
fn start_cpu(cpu: &PerCpu, apic_id: u32) -> Result<(), &'static str> {
    let page = (TRAMPOLINE_PA >> 12) as u8;
    // The trampoline data must be visible before the CPU starts; WRMSR to the x2APIC ICR is not
    // serializing (SDM §11.12.3), so fence explicitly.
    core::sync::atomic::fence(Ordering::SeqCst);
    apic::send_init(apic_id)?;
    pio::pit_wait_us(10_000);
    apic::send_startup(apic_id, page)?;
    pio::pit_wait_us(200);
    if !cpu.online.load(Ordering::Acquire) {
        apic::send_startup(apic_id, page)?;
    }
    Ok(())
}

/// Brings every CPU the firmware lists online; returns how many are online incl. the boot CPU.
/// Prints "smp: N of M CPUs online". Runs once (later calls return [`online`]).
pub fn start_secondaries(info: &'static BootInfo) -> usize {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::AcqRel) {
        return online();
    }
    let (id_leaf, bsp_id) = cpuid_apic_id();
    PER_CPU[0].apic_id.store(bsp_id, Ordering::Relaxed);
    let cpus = match madt_cpus(info) {
        Ok(c) => c,
        Err(e) => {
            println!("smp: 1 of 1 CPUs online ({e})");
            return 1;
        }
    };
    let bsp_listed = cpus.ids().contains(&bsp_id);
    let listed = cpus.enabled() + usize::from(!bsp_listed);
    let aps = cpus.ids().iter().copied().filter(|&id| id != bsp_id);
    if cpus.hotplug > 0 {
        log::info!("smp: {} hot-pluggable CPUs not started", cpus.hotplug);
    }
    if listed == 1 {
        println!("smp: 1 of 1 CPUs online");
        return 1;
    }
    if let Err(e) = apic::init_timer() {
        println!("smp: 1 of {listed} CPUs online (local APIC: {e})");
        return 1;
    }
    let Some(page) = crate::mem::phys::trampoline_page() else {
        println!(
            "smp: 1 of {listed} CPUs online (page {TRAMPOLINE_PA:#x} is not free RAM: no trampoline)"
        );
        return 1;
    };
    if prepare_trampoline(page, id_leaf).is_none() {
        println!("smp: 1 of {listed} CPUs online (trampoline does not fit or CR3 above 4 GiB)");
        return 1;
    }
    // `smp-test=silent-cpu`: the first secondary is told to expect another APIC ID, so it parks
    // in the trampoline and never answers (the timeout path, and the ID check itself).
    let mut silence_next = info.cmdline_value("smp-test") == Some("silent-cpu");
    let mut beyond = cpus.dropped;
    for id in aps {
        let index = online();
        if index == MAX_CPUS {
            beyond += 1;
            continue;
        }
        let cpu = &PER_CPU[index];
        if let Err(e) = prepare_stacks(cpu) {
            println!("smp: CPU with APIC ID {id} not started: {e}");
            continue;
        }
        cpu.apic_id.store(id, Ordering::Relaxed);
        let expected = if core::mem::take(&mut silence_next) {
            id ^ 0x8000_0000
        } else {
            id
        };
        put(page, D_APIC_ID, &expected.to_le_bytes());
        put(
            page,
            D_STACK,
            &cpu.stack_top.load(Ordering::Relaxed).to_le_bytes(),
        );
        put(page, D_INDEX, &(index as u64).to_le_bytes());
        let started = start_cpu(cpu, id);
        if started.is_ok() && wait_online(cpu, ANSWER_TIMEOUT_US) {
            ONLINE.store(index + 1, Ordering::Release);
            let svm = match cpu.svm.load(Ordering::Relaxed) {
                1 => ", SVM on",
                2 => ", SVM FAILED",
                _ => "",
            };
            println!(
                "smp: cpu{index} apic_id={id} online ({}{svm}{})",
                if apic::is_x2apic() { "x2APIC" } else { "xAPIC" },
                if cpu.apic_ok.load(Ordering::Relaxed) {
                    ""
                } else {
                    ", local APIC FAILED"
                },
            );
        } else {
            // Park it in wait-for-SIPI; its stacks stay allocated and are never reused.
            let _ = apic::send_init(id);
            let why = started.err().unwrap_or("did not answer within 1 s");
            println!("smp: CPU with APIC ID {id} skipped: {why}");
            if cpu.entered.load(Ordering::Acquire) {
                // It got as far as its slot's GDT/TSS (loaded once per slot): the slot cannot
                // be given to another CPU, and indices stay dense, so stop here.
                println!("smp: it had entered the hypervisor; no further CPUs started");
                break;
            }
        }
    }
    // The trampoline's ID check stops anything that still wakes up.
    put(page, D_APIC_ID, &u32::MAX.to_le_bytes());
    if beyond > 0 {
        println!("smp: {beyond} more CPUs not started (MAX_CPUS = {MAX_CPUS})");
    }
    let n = online();
    println!("smp: {n} of {listed} CPUs online");
    n
}

fn madt_cpus(info: &BootInfo) -> Result<boot::x86_64::madt::LocalApics<MAX_CPUS>, &'static str> {
    let rsdp = info.rsdp.ok_or("no ACPI RSDP: no MADT")?;
    let acpi = crate::firmware::acpi::discover(rsdp).map_err(|_| "ACPI tables unreadable")?;
    let madt = acpi.madt.ok_or("no MADT")?;
    boot::x86_64::madt::local_apics::<MAX_CPUS>(madt.bytes)
}

/// A secondary CPU's first Rust code, on its own stack, from the trampoline (64-bit mode, the
/// boot CPU's page tables, interrupts off).
extern "C" fn x86_64_ap_entry(index: usize) -> ! {
    let Some(cpu) = PER_CPU.get(index).filter(|_| index != 0) else {
        super::halt()
    };
    set_gs_base(cpu);
    cpu.entered.store(true, Ordering::Release);
    let ist = [
        cpu.ist_tops[0].load(Ordering::Relaxed),
        cpu.ist_tops[1].load(Ordering::Relaxed),
        cpu.ist_tops[2].load(Ordering::Relaxed),
    ];
    let Some(cs) = gdt::init_secondary(index, ist) else {
        super::halt()
    };
    super::exceptions::init(cs);
    paging::init_secondary();
    cpu.apic_ok
        .store(apic::init_secondary().is_ok(), Ordering::Relaxed);
    let svm = match crate::vcpu::svm::enable_this_cpu() {
        Ok(_) => 1,
        Err(_) if !has_svm() => 0,
        Err(_) => 2,
    };
    cpu.svm.store(svm, Ordering::Relaxed);
    // The mailbox takes work from now on (its Release store of IDLE).
    cpu.mailbox.ready();
    // Release: everything above is visible to the boot CPU's Acquire in `wait_online`.
    cpu.online.store(true, Ordering::Release);
    loop {
        if let Some((f, arg)) = cpu.mailbox.take() {
            // SAFETY: `launch` is the only writer of mailbox work and stores a `fn(usize)` cast
            // to usize; the mailbox hands back exactly that word.
            let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(f) };
            f(arg);
            cpu.mailbox.finish();
        }
        core::hint::spin_loop();
    }
}

fn has_svm() -> bool {
    use core::arch::x86_64::__cpuid;
    __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 2) != 0
}

/// What launched work observed on the CPU it ran on (`scenario=smp`).
struct Observed {
    apic_id: AtomicU32,
    gs_index: AtomicUsize,
    arg: AtomicUsize,
    svme: AtomicBool,
    hsave: AtomicU64,
    guard_mapped: AtomicBool,
    stack_mapped: AtomicBool,
    ticks: AtomicU64,
}

static OBSERVED: [Observed; MAX_CPUS] = [const {
    Observed {
        apic_id: AtomicU32::new(u32::MAX),
        gs_index: AtomicUsize::new(usize::MAX),
        arg: AtomicUsize::new(0),
        svme: AtomicBool::new(false),
        hsave: AtomicU64::new(0),
        guard_mapped: AtomicBool::new(true),
        stack_mapped: AtomicBool::new(false),
        ticks: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Work for `scenario=smp`: records, on the CPU it runs on, what that CPU's own registers say.
fn observe(arg: usize) {
    let index = cpu_index();
    let o = &OBSERVED[index];
    o.apic_id
        .store(apic::id().unwrap_or(u32::MAX), Ordering::Relaxed);
    o.gs_index.store(index, Ordering::Relaxed);
    o.arg.store(arg, Ordering::Relaxed);
    if has_svm() {
        o.svme
            .store(rdmsr(IA32_EFER) & EFER_SVME != 0, Ordering::Relaxed);
        o.hsave.store(rdmsr(VM_HSAVE_PA), Ordering::Relaxed);
    }
    // This CPU's own local APIC timer, through the shared IDT, counted in its own PerCpu.
    let before = this_cpu_ticks();
    apic::arm_timer(100_000);
    ::x86_64::instructions::interrupts::enable();
    for _ in 0..10_000_000 {
        if this_cpu_ticks() != before {
            break;
        }
        core::hint::spin_loop();
    }
    ::x86_64::instructions::interrupts::disable();
    apic::arm_timer(0);
    o.ticks.store(this_cpu_ticks() - before, Ordering::Relaxed);
    let guard = PER_CPU[index].guards[0].load(Ordering::Relaxed);
    o.guard_mapped
        .store(paging::is_mapped(guard), Ordering::Relaxed);
    o.stack_mapped
        .store(paging::is_mapped(guard + PAGE), Ordering::Relaxed);
    println!(
        "smp: cpu{index} ran launched work: apic_id={} (from {}) gs_index={index} arg={arg:#x}",
        o.apic_id.load(Ordering::Relaxed),
        if apic::is_x2apic() {
            "x2APIC MSR 0x802"
        } else {
            "xAPIC ID register"
        }
    );
}

/// `scenario=smp smp-test=stack-overflow`: recursion on cpu1 until its main stack runs into its
/// guard page; the #PF cannot be delivered on that stack, so cpu1 takes #DF on its own IST1,
/// whose report names the guard and ends the run with a failure status. Returning here means
/// the overflow went unnoticed.
fn overflow_on_cpu1() -> u32 {
    fn overflow(_: usize) {
        core::hint::black_box(super::super::overflow_stack(0));
    }
    if let Err(e) = launch(1, overflow, 0) {
        println!("smp: FAILED: launch on cpu1: {e:?}");
        return crate::EXIT_FAILURE;
    }
    wait_idle(1);
    println!("smp: FAILED: cpu1 overflowed its stack without a fault");
    crate::EXIT_FAILURE
}

/// Work that holds its CPU until `RELEASE` is set (for the Busy check).
static RELEASE: AtomicBool = AtomicBool::new(false);
fn hold(_: usize) {
    while !RELEASE.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
}

/// Waits (PIT, bounded) until `cpu` is idle.
fn wait_idle(cpu: usize) -> bool {
    for _ in 0..2000 {
        if is_idle(cpu) {
            return true;
        }
        pio::pit_wait_us(1000);
    }
    is_idle(cpu)
}

/// `scenario=smp`: launches work on every secondary CPU, all at once, and checks what each saw on
/// its own CPU against what bring-up set up for it (APIC ID from the MADT, the index it was
/// launched on, SVM with a host save area distinct per CPU, its main stack's guard page not
/// present in the page tables); then the launch errors. Returns the exit status.
pub fn scenario(info: &BootInfo) -> u32 {
    let n = online();
    if info.cmdline_value("smp-test") == Some("stack-overflow") {
        return overflow_on_cpu1();
    }
    let mut failed = 0;
    let mut fail = |what: core::fmt::Arguments<'_>| {
        println!("smp: FAILED: {what}");
        failed += 1;
    };
    let boot_ticks = this_cpu_ticks();
    for cpu in 1..n {
        if let Err(e) = launch(cpu, observe, 0x5a00 + cpu) {
            fail(format_args!("launch on cpu{cpu}: {e:?}"));
        }
    }
    for cpu in 1..n {
        if !wait_idle(cpu) {
            fail(format_args!("cpu{cpu} did not finish its work"));
            continue;
        }
        let o = &OBSERVED[cpu];
        let expected_id = PER_CPU[cpu].apic_id.load(Ordering::Relaxed);
        let id = o.apic_id.load(Ordering::Relaxed);
        let gs = o.gs_index.load(Ordering::Relaxed);
        if id != expected_id || gs != cpu || o.arg.load(Ordering::Relaxed) != 0x5a00 + cpu {
            fail(format_args!(
                "cpu{cpu}: work saw APIC ID {id} (MADT: {expected_id}), GS index {gs}"
            ));
        }
        if has_svm() {
            let hsave = o.hsave.load(Ordering::Relaxed);
            let distinct = (1..n)
                .filter(|&c| c != cpu)
                .all(|c| OBSERVED[c].hsave.load(Ordering::Relaxed) != hsave)
                && hsave != rdmsr(VM_HSAVE_PA);
            if o.svme.load(Ordering::Relaxed)
                && hsave != 0
                && hsave.is_multiple_of(PAGE)
                && distinct
            {
                println!("smp: cpu{cpu} EFER.SVME=1 VM_HSAVE_PA={hsave:#x} (its own page)");
            } else {
                fail(format_args!(
                    "cpu{cpu}: EFER.SVME={} VM_HSAVE_PA={hsave:#x}",
                    o.svme.load(Ordering::Relaxed)
                ));
            }
        }
        let ticks = o.ticks.load(Ordering::Relaxed);
        if ticks > 0 {
            println!("smp: cpu{cpu} took {ticks} timer interrupt(s) from its own local APIC");
        } else {
            fail(format_args!("cpu{cpu}: no timer interrupt"));
        }
        let guard = PER_CPU[cpu].guards[0].load(Ordering::Relaxed);
        if !o.guard_mapped.load(Ordering::Relaxed) && o.stack_mapped.load(Ordering::Relaxed) {
            println!(
                "smp: cpu{cpu} stack guard page {guard:#x} not present in the page tables, stack bottom present"
            );
        } else {
            fail(format_args!(
                "cpu{cpu}: stack guard {guard:#x} mapped, or stack not"
            ));
        }
    }
    if this_cpu_ticks() != boot_ticks {
        fail(format_args!(
            "the boot CPU counted the secondaries' timer interrupts"
        ));
    }
    if n > 1 {
        RELEASE.store(false, Ordering::Release);
        let busy = launch(1, hold, 0).and_then(|()| launch(1, hold, 0));
        RELEASE.store(true, Ordering::Release);
        let idle = wait_idle(1);
        let errors = (
            busy,
            launch(n, observe, 0),
            launch(0, observe, 0),
            launch(MAX_CPUS, observe, 0),
        );
        let expect_not_online = if n < MAX_CPUS {
            Err(SmpError::NotOnline)
        } else {
            Err(SmpError::NoSuchCpu)
        };
        if errors
            == (
                Err(SmpError::Busy),
                expect_not_online,
                Err(SmpError::NoSuchCpu),
                Err(SmpError::NoSuchCpu),
            )
            && idle
        {
            println!(
                "smp: launch refuses a busy CPU, an offline index, the boot CPU and index {MAX_CPUS}"
            );
        } else {
            fail(format_args!(
                "launch errors {errors:?}, idle after hold: {idle}"
            ));
        }
    }
    if failed == 0 {
        println!("smp: scenario ok, {n} CPUs");
        crate::EXIT_SUCCESS
    } else {
        crate::EXIT_FAILURE
    }
}

//! The hypervisor's GDT and TSS (Intel SDM vol 3 §3.4.5, §8.7 "Task Management in 64-bit Mode").
//!
//! In 64-bit mode the TSS holds no task state, only stack pointers: RSP0-2 for privilege changes
//! (unused: the hypervisor runs at CPL 0 only) and the seven Interrupt Stack Table entries. The
//! IST gives #DF, NMI and #MC known-good stacks, so that e.g. a kernel stack overflow (a #PF that
//! cannot push its frame, escalating to #DF) still produces a report (SDM §6.14.5).
//!
//! Every CPU has its own GDT and TSS (the TSS descriptor's busy bit and the IST pointers are per
//! CPU): the boot CPU's are statics here with IST stacks in the image; each secondary CPU's are
//! built by [`init_secondary`] with IST stacks that `smp` allocated, guard pages included.

use core::cell::UnsafeCell;

use ::x86_64::VirtAddr;
use ::x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use ::x86_64::instructions::tables::load_tss;
use ::x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use ::x86_64::structures::tss::TaskStateSegment;
use spin::Once;

/// IST slots (1-based, as the IDT gate's IST field counts them; 0 means "no stack switch").
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;

const IST_STACK_SIZE: usize = 16 * 1024;
/// One 4 KiB page below every stack that `paging` leaves unmapped, so an overflow faults.
pub const GUARD_SIZE: usize = 4096;

/// A guard page followed by a stack the CPU switches to; only ever accessed by hardware and the
/// exception stubs. Page-aligned so the guard is exactly one page `paging` can unmap.
#[repr(C, align(4096))]
struct IstStack(UnsafeCell<([u8; GUARD_SIZE], [u8; IST_STACK_SIZE])>);

// SAFETY: Rust code never reads or writes the arrays; only their addresses are taken, and the CPU
// uses the memory as a stack for one exception at a time per slot (the guard not at all).
unsafe impl Sync for IstStack {}

impl IstStack {
    const fn new() -> Self {
        Self(UnsafeCell::new(([0; GUARD_SIZE], [0; IST_STACK_SIZE])))
    }

    /// The guard page's address (the lowest page of the object).
    fn guard(&self) -> u64 {
        self.0.get() as u64
    }

    /// The initial RSP: one past the highest byte, 16-byte aligned (the CPU aligns RSP to 16
    /// before pushing an interrupt frame anyway, SDM §6.14.2).
    fn top(&self) -> VirtAddr {
        VirtAddr::new(self.0.get() as u64 + (GUARD_SIZE + IST_STACK_SIZE) as u64)
    }
}

static DOUBLE_FAULT_STACK: IstStack = IstStack::new();
static NMI_STACK: IstStack = IstStack::new();
static MACHINE_CHECK_STACK: IstStack = IstStack::new();

static TSS: Once<TaskStateSegment> = Once::new();

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// The secondary CPUs' TSS and GDT, by CPU index (slot 0, the boot CPU's, stays unused).
static AP_TSS: [Once<TaskStateSegment>; super::smp::MAX_CPUS] =
    [const { Once::new() }; super::smp::MAX_CPUS];
static AP_GDT: [Once<(GlobalDescriptorTable, Selectors)>; super::smp::MAX_CPUS] =
    [const { Once::new() }; super::smp::MAX_CPUS];

fn build_gdt(tss: &'static TaskStateSegment) -> (GlobalDescriptorTable, Selectors) {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(tss));
    (gdt, Selectors { code, data, tss })
}

/// Secondary CPU `index` (1..MAX_CPUS): builds its own TSS, with IST1-3 (#DF, NMI, #MC) at the
/// stack tops `ist_tops`, and its own GDT, loads them on the calling CPU and returns the code
/// selector. `None` if `index` is out of range or was already set up (a TSS is loaded once).
pub fn init_secondary(index: usize, ist_tops: [u64; 3]) -> Option<SegmentSelector> {
    if index == 0 || AP_TSS.get(index)?.is_completed() {
        return None;
    }
    let tss = AP_TSS[index].call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[usize::from(IST_DOUBLE_FAULT - 1)] = VirtAddr::new(ist_tops[0]);
        tss.interrupt_stack_table[usize::from(IST_NMI - 1)] = VirtAddr::new(ist_tops[1]);
        tss.interrupt_stack_table[usize::from(IST_MACHINE_CHECK - 1)] = VirtAddr::new(ist_tops[2]);
        tss
    });
    let (gdt, sel) = AP_GDT[index].call_once(|| build_gdt(tss));
    load(gdt, sel);
    Some(sel.code)
}

/// Builds and loads the GDT and TSS on the calling CPU; returns the kernel code selector for
/// the IDT gates.
pub fn init() -> SegmentSelector {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[usize::from(IST_DOUBLE_FAULT - 1)] = DOUBLE_FAULT_STACK.top();
        tss.interrupt_stack_table[usize::from(IST_NMI - 1)] = NMI_STACK.top();
        tss.interrupt_stack_table[usize::from(IST_MACHINE_CHECK - 1)] = MACHINE_CHECK_STACK.top();
        tss
    });
    let (gdt, sel) = GDT.call_once(|| build_gdt(tss));
    load(gdt, sel);
    sel.code
}

fn load(gdt: &'static GlobalDescriptorTable, sel: &Selectors) {
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which is 'static: a
    // 64-bit code segment for CS, a flat data segment for the others, and an available 64-bit TSS
    // (loading it marks it busy, so this runs once per TSS: `init` on the boot CPU, which
    // `init_cpu` calls once, and `init_secondary` once per secondary CPU slot).
    unsafe {
        CS::set_reg(sel.code);
        SS::set_reg(sel.data);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        load_tss(sel.tss);
    }
}

/// The IST stack ranges, for the exception report ("which stack was I on").
/// The guard page under each IST stack: (IST index, guard address).
pub fn ist_guards() -> [(u8, u64); 3] {
    [
        (IST_DOUBLE_FAULT, DOUBLE_FAULT_STACK.guard()),
        (IST_NMI, NMI_STACK.guard()),
        (IST_MACHINE_CHECK, MACHINE_CHECK_STACK.guard()),
    ]
}

pub fn ist_stacks() -> [(u8, u64, u64); 3] {
    let range = |n: u8, s: &IstStack| {
        (
            n,
            s.top().as_u64() - IST_STACK_SIZE as u64,
            s.top().as_u64(),
        )
    };
    [
        range(IST_DOUBLE_FAULT, &DOUBLE_FAULT_STACK),
        range(IST_NMI, &NMI_STACK),
        range(IST_MACHINE_CHECK, &MACHINE_CHECK_STACK),
    ]
}

/// Linear address of the calling CPU's TSS (the host TR base a VMX VM exit restores, SDM
/// §28.5.2), or `None` before [`init`] / [`init_secondary`].
pub fn tss_base() -> Option<u64> {
    let tss = match super::smp::cpu_index() {
        0 => TSS.get(),
        i => AP_TSS.get(i)?.get(),
    };
    tss.map(|t| core::ptr::from_ref(t) as u64)
}

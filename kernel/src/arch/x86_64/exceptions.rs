//! The IDT and the 32 architectural exception vectors (Intel SDM vol 3 §6.3.1, Table 6-1).
//!
//! Stable Rust has no `x86-interrupt` ABI, so each vector has a small assembly stub: it pushes a
//! dummy error code where the CPU does not push one (so every frame has the same shape), pushes
//! the vector number, saves all 15 general-purpose registers and calls [`x86_64_exception`] with a
//! pointer to the resulting [`TrapFrame`]. All exceptions are fatal for now: the handler reports
//! the state and leaves through `exit(EXIT_FAILURE)`. The stub still has a return path (`iretq`)
//! for handlers that will want to resume.

use core::arch::global_asm;
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use ::x86_64::VirtAddr;
use ::x86_64::instructions::tables::lidt;
use ::x86_64::registers::control::{Cr2, Cr3};
use ::x86_64::structures::DescriptorTablePointer;
use ::x86_64::structures::gdt::SegmentSelector;
use spin::Once;

use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI};

// Stubs. Vectors with a CPU-pushed error code (SDM Table 6-1): 8 #DF, 10 #TS, 11 #NP, 12 #SS,
// 13 #GP, 14 #PF, 17 #AC, 21 #CP, 29 #VC, 30 #SX. In 64-bit mode the CPU aligns RSP to 16 and
// pushes SS, RSP, RFLAGS, CS, RIP (+ error code); with our vector and 15 registers the frame is
// 22 quadwords, so RSP stays 16-byte aligned at the `call` as the SysV ABI requires.
global_asm!(
    r#"
    .pushsection .text.x86_64_exceptions, "ax"
    .macro ISR vec, has_err
    .balign 16
x86_64_isr_\vec:
    .if \has_err == 0
    push $0
    .endif
    push $\vec
    jmp x86_64_isr_common
    .endm

    ISR 0, 0
    ISR 1, 0
    ISR 2, 0
    ISR 3, 0
    ISR 4, 0
    ISR 5, 0
    ISR 6, 0
    ISR 7, 0
    ISR 8, 1
    ISR 9, 0
    ISR 10, 1
    ISR 11, 1
    ISR 12, 1
    ISR 13, 1
    ISR 14, 1
    ISR 15, 0
    ISR 16, 0
    ISR 17, 1
    ISR 18, 0
    ISR 19, 0
    ISR 20, 0
    ISR 21, 1
    ISR 22, 0
    ISR 23, 0
    ISR 24, 0
    ISR 25, 0
    ISR 26, 0
    ISR 27, 0
    ISR 28, 0
    ISR 29, 1
    ISR 30, 1
    ISR 31, 0

    .balign 16
x86_64_isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call x86_64_exception
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq
    .popsection

    .pushsection .rodata.x86_64_isr_table, "a"
    .balign 8
    .global x86_64_isr_table
x86_64_isr_table:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad x86_64_isr_\vec
    .endr
    .popsection
"#,
    options(att_syntax)
);

unsafe extern "C" {
    /// Addresses of the 32 stubs above, in vector order.
    static x86_64_isr_table: [u64; 32];
}

/// The stack frame the stubs build, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    // Pushed by the CPU (SDM §6.14.2, Figure 6-9).
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One 16-byte IDT gate (SDM §6.14.1, Figure 6-8).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    /// Bits 0-2: IST index; the rest must be zero.
    ist: u8,
    /// P | DPL | 0 | type; 0x8E = present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64, cs: SegmentSelector, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: cs.0,
            ist: ist & 7,
            attributes: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// Which IST stack a vector runs on: #DF, NMI and #MC must not depend on the current stack.
fn ist_for(vector: usize) -> u8 {
    match vector {
        2 => IST_NMI,
        8 => IST_DOUBLE_FAULT,
        18 => IST_MACHINE_CHECK,
        _ => 0,
    }
}

/// Builds the IDT (vectors 0-31, the device range of `irq`, the APIC timer and spurious vectors;
/// the rest not present, so a stray interrupt there raises #NP, which is reported with the vector
/// in its error code) and loads it on the calling CPU.
pub fn init(cs: SegmentSelector) {
    let idt = IDT.call_once(|| {
        let mut gates = [Gate::MISSING; 256];
        // SAFETY: `x86_64_isr_table` is an immutable table of 32 code addresses emitted above.
        let stubs = unsafe { &x86_64_isr_table };
        for (vector, (gate, &stub)) in gates.iter_mut().zip(stubs.iter()).enumerate() {
            *gate = Gate::interrupt(stub, cs, ist_for(vector));
        }
        for (vector, stub) in super::irq::gates() {
            gates[usize::from(vector)] = Gate::interrupt(stub, cs, 0);
        }
        for (vector, stub) in super::apic::interrupt_gates() {
            gates[usize::from(vector)] = Gate::interrupt(stub, cs, 0);
        }
        Idt(gates)
    });
    let pointer = DescriptorTablePointer {
        limit: (size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the IDT is 'static and every present gate points at a stub above with the kernel
    // code selector; the IST indices name stacks installed in the TSS by `gdt::init`, which runs
    // first.
    unsafe { lidt(&pointer) };
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range exceeded",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack-segment fault",
    "#GP general protection",
    "#PF page fault",
    "reserved (15)",
    "#MF x87 floating-point error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating-point",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved (31)",
];

/// Nesting depth: a fault while reporting a fault must not recurse forever.
static DEPTH: AtomicU32 = AtomicU32::new(0);

macro_rules! out {
    ($($arg:tt)*) => { crate::console::print_unlocked(format_args!($($arg)*)) };
}

/// Called by the stubs with interrupts disabled (interrupt gates) on the faulting or IST stack.
#[unsafe(no_mangle)]
extern "C" fn x86_64_exception(frame: &mut TrapFrame) {
    let depth = DEPTH.fetch_add(1, Ordering::SeqCst);
    if depth >= 2 {
        // The report itself keeps faulting: leave without touching anything else.
        super::exit(crate::EXIT_FAILURE);
    }
    if depth == 1 {
        out!(
            "\n*** nested exception {} at RIP {:#x} while reporting another; giving up\n",
            frame.vector,
            frame.rip
        );
    } else {
        report(frame);
    }
    out!("hypervisor: exit status {}\n", crate::EXIT_FAILURE);
    super::exit(crate::EXIT_FAILURE)
}

fn report(f: &TrapFrame) {
    let vector = f.vector as usize;
    let name = NAMES.get(vector).copied().unwrap_or("unknown vector");
    out!(
        "\n*** x86_64 exception {vector} ({name}), error code {:#x}{}",
        f.error_code,
        ErrorCode(f)
    );
    match super::smp::cpu_index() {
        0 => out!("\n"),
        cpu => out!(" on cpu{cpu}\n"),
    }
    out!(
        "    RIP {:#018x}  CS {:#06x}  RFLAGS {:#010x}  RSP {:#018x}  SS {:#06x}\n",
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss
    );
    let (cr3, _) = Cr3::read_raw();
    if vector == 14 {
        out!("    CR2 {:#018x}  ", Cr2::read_raw());
    } else {
        out!("    ");
    }
    out!("CR3 {:#018x}", cr3.start_address().as_u64());
    let here = f as *const TrapFrame as u64;
    if let Some(n) = super::gdt::ist_stacks()
        .into_iter()
        .find(|&(_, lo, hi)| (lo..hi).contains(&here))
        .map(|(n, _, _)| n)
        .or_else(|| super::smp::this_cpu_ist(here))
    {
        out!("  (handler on IST{n})");
    }
    out!("\n");
    // A #PF on a guard page, or a #DF because the #PF could not even push its frame there (SDM
    // §6.15 Table 6-5), is a stack overflow: say which stack.
    if vector == 14 || vector == 8 {
        let cr2 = Cr2::read_raw();
        let guard = super::stack_guards().into_iter().find(|&(_, g)| {
            let page = g..g + super::gdt::GUARD_SIZE as u64;
            page.contains(&cr2) || page.contains(&f.rsp)
        });
        if let Some((stack, g)) = guard {
            out!(
                "*** stack overflow: the {stack} stack ran into its guard page at {g:#x} (CR2 {cr2:#x})\n"
            );
        } else if let Some((cpu, stack, g)) = super::smp::guard_hit(cr2, f.rsp) {
            out!(
                "*** stack overflow: cpu{cpu}'s {stack} stack ran into its guard page at {g:#x} (CR2 {cr2:#x})\n"
            );
        }
    }
    let regs = [
        ("RAX", f.rax),
        ("RBX", f.rbx),
        ("RCX", f.rcx),
        ("RDX", f.rdx),
        ("RSI", f.rsi),
        ("RDI", f.rdi),
        ("RBP", f.rbp),
        ("R8 ", f.r8),
        ("R9 ", f.r9),
        ("R10", f.r10),
        ("R11", f.r11),
        ("R12", f.r12),
        ("R13", f.r13),
        ("R14", f.r14),
        ("R15", f.r15),
    ];
    for row in regs.chunks(4) {
        out!("   ");
        for (name, value) in row {
            out!(" {name} {value:#018x}");
        }
        out!("\n");
    }
    out!("    backtrace (frame pointers; resolve with addr2line -fie hypervisor ADDR):\n");
    out!("      #0 {:#018x}\n", f.rip);
    for (i, ret) in Backtrace::new(f.rbp).enumerate() {
        out!("      #{} {:#018x}\n", i + 1, ret);
    }
}

/// Decodes the error code of the vectors that define one (SDM §6.13, §6.15).
struct ErrorCode<'a>(&'a TrapFrame);

impl fmt::Display for ErrorCode<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0.error_code;
        match self.0.vector {
            14 => {
                f.write_str(if e & 1 != 0 {
                    " [protection"
                } else {
                    " [not-present"
                })?;
                f.write_str(if e & 2 != 0 { ", write" } else { ", read" })?;
                f.write_str(if e & 4 != 0 { ", user" } else { ", supervisor" })?;
                if e & 8 != 0 {
                    f.write_str(", reserved bit set")?;
                }
                if e & 16 != 0 {
                    f.write_str(", instruction fetch")?;
                }
                f.write_str("]")
            }
            // Selector error code: EXT (bit 0), IDT (bit 1), TI (bit 2), index (bits 3-15).
            10..=13 if e != 0 => {
                let table = if e & 2 != 0 {
                    "IDT"
                } else if e & 4 != 0 {
                    "LDT"
                } else {
                    "GDT"
                };
                let ext = if e & 1 != 0 { ", external" } else { "" };
                write!(f, " [{table} index {}{ext}]", (e >> 3) & 0x1fff)
            }
            _ => Ok(()),
        }
    }
}

/// Walks the RBP chain (`[rbp]` = caller's RBP, `[rbp + 8]` = return address; the image is built
/// with `-C force-frame-pointers=yes`). Only frames inside the hypervisor image, where all stacks
/// live, are followed, strictly upwards and at most 32 deep, so a corrupt chain ends the walk
/// instead of faulting.
struct Backtrace {
    rbp: u64,
    left: u32,
    image: (u64, u64),
}

impl Backtrace {
    fn new(rbp: u64) -> Self {
        Self {
            rbp,
            left: 32,
            image: super::image_range(),
        }
    }
}

impl Iterator for Backtrace {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let (lo, hi) = self.image;
        if self.left == 0
            || !self.rbp.is_multiple_of(8)
            || self.rbp < lo
            || self.rbp.checked_add(16)? > hi
        {
            return None;
        }
        self.left -= 1;
        let p = self.rbp as *const u64;
        // SAFETY: [rbp, rbp + 16) is 8-aligned and inside the hypervisor image, which the low
        // identity map keeps mapped and readable; reading plain integers cannot break invariants.
        let (next, ret) = unsafe { (p.read_volatile(), p.add(1).read_volatile()) };
        if ret == 0 || next <= self.rbp {
            self.left = 0;
            if ret == 0 {
                return None;
            }
        }
        self.rbp = next;
        Some(ret)
    }
}

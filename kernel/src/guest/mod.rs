//! Guests: configuration from the command line, images from the boot modules, and a round-robin
//! scheduler over the vCPU backend on the boot CPU (docs/guests.md).
//!
//! Containment: every exit the hypervisor does not expect from a well-behaved guest (an access to
//! unmapped guest-physical memory, a triple fault, a forbidden instruction or port, an
//! intercepted exception, a HLT that nothing will ever wake) stops that guest with a report
//! naming it, the reason and its RIP; the others keep running. The local APIC timer ends every
//! time slice, so a guest that spins costs the others one slice per round and, with `slices=N`,
//! is stopped when its budget is used up. A stopped guest's VM, vCPU and RAM are freed at once.

mod iommu;
pub mod loader;
pub mod memory;

use alloc::vec::Vec;
use boot::BootInfo;
use boot::guests::{Archive, ElfImage, GuestConfig};
use hvabi::{errno, op, platform};

use crate::mem::{frame::FRAMES, phys};
use crate::vcpu::{Backend, Event, Exit, Native};
use crate::{EXIT_FAILURE, EXIT_SUCCESS, println};
use iommu::GuestIommu;
use memory::GuestMemory;

/// One time slice: 10 ms (x86_64: APIC timer ticks at QEMU's 1 GHz APIC clock, divide by 1;
/// aarch64: nanoseconds, converted at CNTFRQ).
pub const SLICE_TICKS: u32 = 10_000_000;
/// Most guests configured at once.
pub const MAX_GUESTS: usize = 8;

/// The architecture's preemption timer (x86_64: the local APIC timer; aarch64: the EL2 physical
/// timer through the GICv3) and its words for the reports.
#[cfg(target_arch = "x86_64")]
mod native {
    pub use crate::arch::apic::{arm_timer, ticks};
    pub fn init_timer(_: &boot::BootInfo) -> Result<(), &'static str> {
        crate::arch::apic::init_timer()
    }
    pub const ELF_MACHINE: u16 = boot::guests::EM_X86_64;
    pub const PC: &str = "rip";
    pub const STAGE2_FAULT: &str = "nested page fault";
    pub const CONTROL: &str = "its VMCB and nested page tables";
    pub const HALT: &str = "hlt";
    pub const IOMMU_UNITS: &str = "VT-d unit(s), legacy mode";
}
#[cfg(target_arch = "aarch64")]
mod native {
    pub use crate::arch::preempt::{arm_timer, ticks};
    pub fn init_timer(info: &boot::BootInfo) -> Result<(), &'static str> {
        crate::arch::preempt::init_timer(info)
    }
    pub const ELF_MACHINE: u16 = boot::guests::EM_AARCH64;
    pub const PC: &str = "pc";
    pub const STAGE2_FAULT: &str = "stage-2 fault";
    pub const CONTROL: &str = "its vCPU state and stage-2 tables";
    pub const HALT: &str = "wfi";
    pub const IOMMU_UNITS: &str = "SMMUv3 unit(s)";
}

/// Prints the vCPU backend line of the boot report (ID registers only; nothing is switched on).
#[cfg(target_arch = "aarch64")]
pub fn report_backend() {
    match crate::vcpu::el1::El1::check() {
        Ok((ipa_bits, vmids)) => {
            println!("report: vcpu backend=el1 vmids={vmids} stage2=4k ipa-bits={ipa_bits}")
        }
        Err(e) => println!("report: vcpu backend=none reason=\"{e}\""),
    }
}

/// Prints the vCPU backend line of the boot report (CPUID only; nothing is switched on).
#[cfg(target_arch = "x86_64")]
pub fn report_backend() {
    use core::arch::x86_64::__cpuid;
    let ext = __cpuid(0x8000_0000).eax;
    if ext >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 2) != 0 && ext >= 0x8000_000a {
        let l = __cpuid(0x8000_000a);
        println!(
            "report: vcpu backend=svm asids={} npt={} nrips={}",
            l.ebx,
            if l.edx & 1 != 0 { "yes" } else { "no" },
            if l.edx & (1 << 3) != 0 { "yes" } else { "no" },
        );
    } else {
        println!("report: vcpu backend=none reason=\"no AMD SVM (CPUID 8000_0001h ECX.SVM = 0)\"");
    }
}

/// A guest image found in the boot modules.
struct Image {
    name: &'static str,
    bytes: &'static [u8],
}

/// Images from every boot module: an `HVGUEST1` archive contributes its entries; any other
/// module is one image named by the first word of its command line (Multiboot2 `module2`).
fn collect_images(info: &'static BootInfo) -> Result<Vec<Image>, &'static str> {
    let mut images = Vec::new();
    for m in info.modules() {
        let bytes = phys::firmware_bytes(m.start, m.len)
            .map_err(|_| "boot module outside the direct map")?;
        if Archive::is_archive(bytes) {
            let a = Archive::parse(bytes)?;
            for (name, bytes) in a.entries() {
                images.push(Image { name, bytes });
            }
        } else if let Some(name) = m.cmdline.as_str().split_ascii_whitespace().next() {
            images.push(Image { name, bytes });
        }
    }
    Ok(images)
}

/// How a guest ended.
enum State {
    Runnable,
    Done,
}

struct Guest<B: Backend> {
    name: &'static str,
    /// This guest in the IOMMU object model, if there is one.
    iommu_guest: Option<::iommu::iommufd::GuestId>,
    memory: Option<GuestMemory>,
    vm: Option<B::Vm>,
    vcpu: Option<B::Vcpu>,
    budget: Option<u32>,
    slices: u32,
    state: State,
    line: [u8; 120],
    line_len: usize,
}

/// Parses the `guest=` items, loads and runs the guests until every one has exited or been
/// stopped. Returns the hypervisor's status: failure only if the configuration was refused.
pub fn run(info: &'static BootInfo, platform: &crate::discovery::Platform) -> u32 {
    let items: Vec<&'static str> = info
        .cmdline
        .as_str()
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("guest="))
        .collect();
    if items.is_empty() {
        println!("guests: refused: no guest=NAME,image=IMAGE,mem=SIZE item on the command line");
        return EXIT_FAILURE;
    }
    if items.len() > MAX_GUESTS {
        println!(
            "guests: refused: {} guest items, at most {MAX_GUESTS}",
            items.len()
        );
        return EXIT_FAILURE;
    }
    let images = match collect_images(info) {
        Ok(i) => i,
        Err(e) => {
            println!("guests: refused: boot module: {e}");
            return EXIT_FAILURE;
        }
    };
    let mut configs: Vec<GuestConfig<'static>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let refuse = |why: &dyn core::fmt::Display| {
            println!("guests: refused guest item {} (guest={item}): {why}", i + 1);
            EXIT_FAILURE
        };
        let c = match GuestConfig::parse(item) {
            Ok(c) => c,
            Err(e) => return refuse(&e),
        };
        if configs.iter().any(|o| o.name == c.name) {
            return refuse(&"name: another guest has this name");
        }
        if !c.devices().is_empty() {
            return refuse(&"dev: device assignment is not implemented yet");
        }
        if !images.iter().any(|im| im.name == c.image) {
            return refuse(&format_args!(
                "image: no image {:?} in the boot modules",
                c.image
            ));
        }
        configs.push(c);
    }
    let mut backend = match Native::probe() {
        Ok(b) => b,
        Err(e) => {
            println!("guests: refused: no vCPU backend: {e}");
            return EXIT_FAILURE;
        }
    };
    if let Err(e) = native::init_timer(info) {
        println!("guests: refused: no preemption timer: {e}");
        return EXIT_FAILURE;
    }
    let mut iommu = match GuestIommu::bring_up(platform) {
        Ok(Some(i)) => {
            println!(
                "guests: IOMMU ABI v1 on {} {}",
                i.units(),
                native::IOMMU_UNITS
            );
            Some(i)
        }
        Ok(None) => {
            println!("guests: no IOMMU: the ABI v1 ops return EOPNOTSUPP");
            None
        }
        Err(e) => {
            println!("guests: refused: IOMMU bring-up: {e}");
            return EXIT_FAILURE;
        }
    };
    println!(
        "guests: backend {} with {} ASIDs, {} guests, slice {} ms",
        backend.name(),
        backend.asids(),
        configs.len(),
        SLICE_TICKS / 1_000_000
    );
    let free_before = FRAMES.lock().free_bytes();
    let mut guests: Vec<Guest<Native>> = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        match create(&mut backend, &mut iommu, c, &images) {
            Ok(g) => {
                println!(
                    "guest {} started: image {}, {} MiB, cmdline {:?}",
                    c.name,
                    c.image,
                    c.mem >> 20,
                    c.cmdline
                );
                guests.push(g);
            }
            Err(e) => {
                println!(
                    "guests: refused guest item {} (guest={}): {e}",
                    i + 1,
                    items[i]
                );
                for g in guests.iter_mut() {
                    teardown(&mut backend, &mut iommu, g, false);
                }
                return EXIT_FAILURE;
            }
        }
    }
    let ticks = native::ticks();
    schedule(&mut backend, &mut iommu, &mut guests);
    println!(
        "guests: {} preemption timer interrupts while guests ran",
        native::ticks() - ticks
    );
    let free_after = FRAMES.lock().free_bytes();
    let exited = guests.len();
    if free_after == free_before {
        println!(
            "guests: all {exited} guests done; every guest frame returned ({} KiB free before and after)",
            free_after >> 10
        );
    } else {
        println!(
            "guests: all {exited} guests done; FRAME LEAK: {} KiB free before, {} KiB after",
            free_before >> 10,
            free_after >> 10
        );
        return EXIT_FAILURE;
    }
    EXIT_SUCCESS
}

fn create(
    backend: &mut Native,
    iommu: &mut Option<GuestIommu>,
    c: &GuestConfig<'static>,
    images: &[Image],
) -> Result<Guest<Native>, alloc::string::String> {
    use alloc::string::ToString;
    let image = images
        .iter()
        .find(|im| im.name == c.image)
        .ok_or_else(|| "image: missing".to_string())?;
    let elf = ElfImage::parse(image.bytes, native::ELF_MACHINE)
        .map_err(|e| alloc::format!("image {}: {e}", c.image))?;
    let memory = GuestMemory::new(c.mem).map_err(|e| alloc::format!("mem: {e}"))?;
    let entry = loader::load(&memory, &elf, c.cmdline)
        .map_err(|e| alloc::format!("image {}: {e}", c.image))?;
    let vm = backend
        .create_vm(&memory)
        .map_err(|e| alloc::format!("vm: {e}"))?;
    let vcpu = match backend.create_vcpu(&vm, &entry) {
        Ok(v) => v,
        Err(e) => {
            backend.destroy_vm(vm);
            return Err(alloc::format!("vcpu: {e}"));
        }
    };
    let iommu_guest = match iommu.as_mut().map(GuestIommu::create_guest).transpose() {
        Ok(g) => g,
        Err(e) => {
            backend.destroy_vcpu(vcpu);
            backend.destroy_vm(vm);
            return Err(e);
        }
    };
    Ok(Guest {
        name: c.name,
        iommu_guest,
        memory: Some(memory),
        vm: Some(vm),
        vcpu: Some(vcpu),
        budget: c.slices,
        slices: 0,
        state: State::Runnable,
        line: [0; 120],
        line_len: 0,
    })
}

/// Frees a guest's vCPU, VM and RAM (in that order: nothing may point at RAM that is gone).
fn teardown<B: Backend>(
    backend: &mut B,
    iommu: &mut Option<GuestIommu>,
    g: &mut Guest<B>,
    report: bool,
) {
    flush_line(g);
    // Its IOMMU objects go first: no device may keep a mapping of RAM that is about to be freed.
    if let (Some(fd), Some(id)) = (iommu.as_mut(), g.iommu_guest.take()) {
        match fd.destroy_guest(id) {
            Ok(()) if report => println!("guest {}: its IOMMU objects destroyed", g.name),
            Ok(()) => {}
            Err(e) => println!("guest {}: destroying its IOMMU objects failed: {e}", g.name),
        }
    }
    if let Some(v) = g.vcpu.take() {
        backend.destroy_vcpu(v);
    }
    if let Some(vm) = g.vm.take() {
        backend.destroy_vm(vm);
    }
    if let Some(m) = g.memory.take() {
        let kib = m.size() >> 10;
        drop(m);
        if report {
            println!(
                "guest {}: {kib} KiB of RAM, {} freed",
                g.name,
                native::CONTROL
            );
        }
    }
    g.state = State::Done;
}

/// Per-run context the exit handlers need besides the guest itself.
struct Cx<'a, B: Backend> {
    backend: &'a mut B,
    iommu: &'a mut Option<GuestIommu>,
}

fn stop<B: Backend>(cx: &mut Cx<'_, B>, g: &mut Guest<B>, pc: u64, why: core::fmt::Arguments) {
    flush_line(g);
    println!("guest {} stopped: {why}, {}={pc:#x}", g.name, native::PC);
    teardown(cx.backend, cx.iommu, g, true);
}

/// What the scheduler does after an exit.
enum Next {
    Resume,
    Reschedule,
}

/// Round robin over the runnable guests until none is left.
fn schedule<B: Backend>(backend: &mut B, iommu: &mut Option<GuestIommu>, guests: &mut [Guest<B>]) {
    let mut cx = Cx { backend, iommu };
    let mut current = 0;
    while let Some(i) = (0..guests.len())
        .map(|k| (current + k) % guests.len())
        .find(|&k| matches!(guests[k].state, State::Runnable))
    {
        current = i + 1;
        let g = &mut guests[i];
        native::arm_timer(SLICE_TICKS);
        while let (Some(vm), Some(vcpu)) = (g.vm.as_ref(), g.vcpu.as_mut()) {
            let exit = cx.backend.run(vm, vcpu);
            match handle(&mut cx, g, exit) {
                Next::Resume => {}
                Next::Reschedule => break,
            }
        }
    }
    native::arm_timer(0);
}

fn errno_result(e: u32) -> u64 {
    (-i64::from(e)) as u64
}

fn handle<B: Backend>(cx: &mut Cx<'_, B>, g: &mut Guest<B>, exit: Exit) -> Next {
    let pc = exit.pc;
    match exit.event {
        Event::Preempted => {
            g.slices += 1;
            if let Some(budget) = g.budget.filter(|&b| g.slices >= b) {
                stop(
                    cx,
                    g,
                    pc,
                    format_args!("CPU budget of {budget} time slices used up"),
                );
            }
            Next::Reschedule
        }
        Event::Hypercall(regs) => {
            let op = u32::try_from(regs.op).unwrap_or(u32::MAX);
            let result = match op {
                platform::CONSOLE_WRITE => console_write(g, regs.args[0], regs.args[1]),
                platform::EXIT => {
                    flush_line(g);
                    println!("guest {} exited: status {}", g.name, regs.args[0] as u32);
                    teardown(cx.backend, cx.iommu, g, true);
                    return Next::Reschedule;
                }
                // ABI v1 (docs/abi.md): the guest's own objects, its own memory. Without an
                // IOMMU on the machine a valid op is EOPNOTSUPP; an unknown op is ENOTTY.
                o if op::ALL.contains(&o) => {
                    match (cx.iommu.as_mut(), g.iommu_guest, g.memory.as_ref()) {
                        (Some(fd), Some(id), Some(mem)) => fd.call(id, mem, o, regs.args[0]) as u64,
                        _ => errno_result(errno::EOPNOTSUPP),
                    }
                }
                _ => errno_result(errno::ENOTTY),
            };
            if let Some(vcpu) = g.vcpu.as_mut() {
                cx.backend.complete_hypercall(vcpu, result);
            }
            Next::Resume
        }
        Event::MmioFault { gpa, write, fetch } => {
            let kind = if fetch {
                "fetch"
            } else if write {
                "write"
            } else {
                "read"
            };
            stop(
                cx,
                g,
                pc,
                format_args!(
                    "{} at gpa={gpa:#x} ({kind}): not guest memory",
                    native::STAGE2_FAULT
                ),
            );
            Next::Reschedule
        }
        Event::PortIo {
            port, size, write, ..
        } => {
            let dir = if write { "out" } else { "in" };
            stop(
                cx,
                g,
                pc,
                format_args!("forbidden port I/O: {dir} port {port:#x} ({size} bytes)"),
            );
            Next::Reschedule
        }
        Event::Halt => {
            stop(
                cx,
                g,
                pc,
                format_args!(
                    "{} with no interrupt source (guests get no interrupts)",
                    native::HALT
                ),
            );
            Next::Reschedule
        }
        Event::TripleFault => {
            stop(cx, g, pc, format_args!("triple fault (shutdown)"));
            Next::Reschedule
        }
        Event::UnexpectedException { vector, error_code } => {
            stop(
                cx,
                g,
                pc,
                format_args!("intercepted exception {vector} (error code {error_code:#x})"),
            );
            Next::Reschedule
        }
        Event::Forbidden { what, detail } => {
            stop(
                cx,
                g,
                pc,
                format_args!("forbidden instruction {what} ({detail:#x})"),
            );
            Next::Reschedule
        }
        Event::Invalid(code) => {
            stop(
                cx,
                g,
                pc,
                format_args!("unhandled exit code {code:#x} (invalid guest state)"),
            );
            Next::Reschedule
        }
    }
}

/// CONSOLE_WRITE: copies the bytes out of guest RAM (bounds-checked) and prints whole lines as
/// `guest NAME: ...`, unprintable bytes as `.`.
fn console_write<B: Backend>(g: &mut Guest<B>, gpa: u64, len: u64) -> u64 {
    if len > platform::CONSOLE_WRITE_MAX {
        return errno_result(errno::EINVAL);
    }
    if !g.memory.as_ref().is_some_and(|m| m.contains(gpa, len)) {
        return errno_result(errno::EFAULT);
    }
    let mut chunk = [0u8; 256];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        let read = g
            .memory
            .as_ref()
            .map(|m| m.read(gpa + done, &mut chunk[..n]));
        if !matches!(read, Some(Ok(()))) {
            return errno_result(errno::EFAULT);
        }
        for &b in &chunk[..n] {
            if b == b'\n' {
                flush_line(g);
                continue;
            }
            if g.line_len == g.line.len() {
                flush_line(g);
            }
            g.line[g.line_len] = if (0x20..0x7f).contains(&b) { b } else { b'.' };
            g.line_len += 1;
        }
        done += n as u64;
    }
    len
}

fn flush_line<B: Backend>(g: &mut Guest<B>) {
    if g.line_len > 0 {
        let text = core::str::from_utf8(&g.line[..g.line_len]).unwrap_or("?");
        println!("guest {}: {text}", g.name);
        g.line_len = 0;
    }
}

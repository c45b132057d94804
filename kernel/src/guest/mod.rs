//! Guests: configuration from the command line, images from the boot modules, and a round-robin
//! scheduler over the vCPU backend on the boot CPU (docs/guests.md).
//!
//! Containment: every exit the hypervisor does not expect from a well-behaved guest (an access to
//! unmapped guest-physical memory, a triple fault, a forbidden instruction or port, an
//! intercepted exception, a HLT that nothing will ever wake) stops that guest with a report
//! naming it, the reason and its RIP; the others keep running. The local APIC timer ends every
//! time slice, so a guest that spins costs the others one slice per round and, with `slices=N`,
//! is stopped when its budget is used up. A stopped guest's IOMMU objects, VM, vCPU and RAM are
//! freed at once.
//!
//! Devices: `devices.rs` decides what a `dev=` may name, `pci.rs` mediates the guest's
//! configuration space, `iommu.rs` is the object model its ABI v1 hypercalls reach; DMA faults
//! are drained after every exit and attributed to the guest and device.

mod devices;
mod guard;
mod iommu;
pub mod loader;
pub mod memory;
mod pci;

use alloc::vec::Vec;
use boot::BootInfo;
use boot::guests::{Archive, ElfImage, GuestConfig};
use hvabi::{errno, op, platform};

use crate::mem::iommu_mem::IOMMU_MEMORY;
use crate::mem::{frame::FRAMES, phys};
#[cfg(target_arch = "x86_64")]
use crate::vcpu::Kind;
#[cfg(target_arch = "x86_64")]
use crate::vcpu::svm::Svm;
#[cfg(target_arch = "x86_64")]
use crate::vcpu::vmx::Vmx;
use crate::vcpu::{Backend, Event, Exit};
use crate::{EXIT_FAILURE, EXIT_SUCCESS, println};
use iommu::GuestIommu;
use memory::GuestMemory;
use native::STAGE2_MEMORY;

/// One time slice: 10 ms (x86_64: APIC timer ticks at QEMU's 1 GHz APIC clock, divide by 1;
/// aarch64: nanoseconds, converted at CNTFRQ).
pub const SLICE_TICKS: u32 = 10_000_000;
/// Most guests configured at once.
pub const MAX_GUESTS: usize = 8;

/// The architecture's preemption timer (x86_64: the local APIC timer; aarch64: the EL2 physical
/// timer through the GICv3), second-stage table memory, and its words for the reports.
#[cfg(target_arch = "x86_64")]
mod native {
    pub use crate::arch::apic::{arm_timer, ticks};
    pub use crate::vcpu::svm::NPT_MEMORY as STAGE2_MEMORY;
    pub fn init_timer(_: &boot::BootInfo) -> Result<(), &'static str> {
        crate::arch::apic::init_timer()
    }
    pub const ELF_MACHINE: u16 = boot::guests::EM_X86_64;
    pub const PC: &str = "rip";
    pub const STAGE2_FAULT: &str = "nested page fault";
    pub const CONTROL: &str = "its VMCB and nested page tables";
    pub const HALT: &str = "hlt";
}
#[cfg(target_arch = "aarch64")]
mod native {
    pub use crate::arch::preempt::{arm_timer, ticks};
    pub use crate::vcpu::el1::STAGE2_MEMORY;
    pub fn init_timer(info: &boot::BootInfo) -> Result<(), &'static str> {
        crate::arch::preempt::init_timer(info)
    }
    pub const ELF_MACHINE: u16 = boot::guests::EM_AARCH64;
    pub const PC: &str = "pc";
    pub const STAGE2_FAULT: &str = "stage-2 fault";
    pub const CONTROL: &str = "its vCPU state and stage-2 tables";
    pub const HALT: &str = "wfi";
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
    if crate::vcpu::kind() == Kind::Vmx {
        match crate::vcpu::vmx::capabilities() {
            Ok(c) => println!(
                "report: vcpu backend=vmx revision={:#x} true-controls={} ept=yes vpid=yes ept-2m={} ept-1g={} unrestricted-guest={}",
                c.revision,
                if c.true_controls { "yes" } else { "no" },
                if c.ept_vpid & (1 << 16) != 0 {
                    "yes"
                } else {
                    "no"
                },
                if c.ept_vpid & (1 << 17) != 0 {
                    "yes"
                } else {
                    "no"
                },
                if c.unrestricted { "yes" } else { "no" },
            ),
            Err(e) => println!("report: vcpu backend=none reason=\"no usable Intel VMX: {e}\""),
        }
        return;
    }
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

/// Whether a guest can still be scheduled.
enum State {
    Runnable,
    Done,
}

struct Guest<B: Backend> {
    name: &'static str,
    /// Its position in the configuration (`devices::Assigned::guest`).
    index: usize,
    /// The range it asked the hypervisor to watch (platform call GUARD).
    guard: Option<guard::Guard>,
    /// Its view of PCI configuration space (its own functions only).
    pci: pci::GuestPci,
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
        if !images.iter().any(|im| im.name == c.image) {
            return refuse(&format_args!(
                "image: no image {:?} in the boot modules",
                c.image
            ));
        }
        configs.push(c);
    }
    let assigned = match devices::resolve(platform, &configs) {
        Ok(a) => a,
        Err((i, why)) => {
            println!(
                "guests: refused guest item {} (guest={}): {why}",
                i + 1,
                items[i]
            );
            return EXIT_FAILURE;
        }
    };
    let refuse = |e: &str| {
        println!("guests: refused: no vCPU backend: {e}");
        EXIT_FAILURE
    };
    // The backend the CPU's vendor calls for (vcpu::kind); the rest is the same for all.
    #[cfg(target_arch = "x86_64")]
    match crate::vcpu::kind() {
        Kind::Svm => match Svm::probe() {
            Ok(b) => {
                let ids = b.asids();
                run_on(b, ids, info, &items, &configs, &assigned, platform, &images)
            }
            Err(e) => refuse(e),
        },
        Kind::Vmx => match Vmx::probe() {
            Ok(b) => {
                let ids = b.asids();
                run_on(b, ids, info, &items, &configs, &assigned, platform, &images)
            }
            Err(e) => refuse(e),
        },
    }
    #[cfg(target_arch = "aarch64")]
    match crate::vcpu::Native::probe() {
        Ok(b) => {
            let ids = b.asids();
            run_on(b, ids, info, &items, &configs, &assigned, platform, &images)
        }
        Err(e) => refuse(e),
    }
}

/// Runs the configured guests on `backend` (`asids`: its address-space identifiers, for the
/// report).
#[allow(
    clippy::too_many_arguments,
    reason = "the second half of `run`: one call site per backend"
)]
fn run_on<B: Backend>(
    mut backend: B,
    asids: u32,
    info: &'static BootInfo,
    items: &[&'static str],
    configs: &[GuestConfig<'static>],
    assigned: &[devices::Assigned],
    platform: &crate::discovery::Platform,
    images: &[Image],
) -> u32 {
    if let Err(e) = native::init_timer(info) {
        println!("guests: refused: no preemption timer: {e}");
        return EXIT_FAILURE;
    }
    let hw: Vec<(u16, drivers::pci::Bdf)> = assigned
        .iter()
        .map(|a| {
            (
                a.addr.segment,
                drivers::pci::Bdf {
                    bus: a.addr.bus,
                    device: a.addr.device,
                    function: a.addr.function,
                },
            )
        })
        .collect();
    let mut iommu = match GuestIommu::attach(&hw) {
        Ok(Some(i)) => {
            println!("guests: IOMMU ABI v1 on {} {}", i.units(), i.mode());
            Some(i)
        }
        // No IOMMU hardware (Bochs): `guest-iommu=model` runs the ABI v1 calls on the software
        // IOMMU model instead, so the call path is exercised; no device can be assigned then.
        Ok(None) if assigned.is_empty() && info.cmdline_value("guest-iommu") == Some("model") => {
            match GuestIommu::software_model() {
                Ok(i) => {
                    println!(
                        "guests: IOMMU ABI v1 on the software IOMMU model (no IOMMU hardware; no device can be assigned)"
                    );
                    Some(i)
                }
                Err(e) => {
                    println!("guests: refused: software IOMMU model: {e}");
                    return EXIT_FAILURE;
                }
            }
        }
        Ok(None) if assigned.is_empty() => {
            println!("guests: no IOMMU: the ABI v1 ops return EOPNOTSUPP");
            None
        }
        Ok(None) => {
            println!("guests: refused: devices are assigned but there is no IOMMU to contain them");
            return EXIT_FAILURE;
        }
        Err(e) => {
            println!("guests: refused: IOMMU owner: {e}");
            return EXIT_FAILURE;
        }
    };
    println!(
        "guests: backend {} with {} ASIDs, {} guests, slice {} ms",
        backend.name(),
        asids,
        configs.len(),
        SLICE_TICKS / 1_000_000
    );
    let free_before = free_frames();
    let units_before = IOMMU_MEMORY.live_bytes();
    let mut guests: Vec<Guest<B>> = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        match create(&mut backend, &mut iommu, c, i, assigned, platform, images) {
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
    // Who owns each hardware device, for fault attribution: "guest NAME device S:B:D.F".
    let owners: Vec<alloc::string::String> = assigned
        .iter()
        .map(|a| {
            alloc::format!(
                "guest {} device {:04x}:{:02x}:{:02x}.{}",
                configs[a.guest].name,
                a.addr.segment,
                a.addr.bus,
                a.addr.device,
                a.addr.function
            )
        })
        .collect();
    let device_guest: Vec<usize> = assigned.iter().map(|a| a.guest).collect();
    let mut cx = Cx {
        backend: &mut backend,
        iommu: &mut iommu,
        platform,
        device_guest: &device_guest,
        faults: alloc::vec![0; guests.len()],
        tamper: info
            .cmdline
            .as_str()
            .split_ascii_whitespace()
            .any(|w| w == "guard-tamper"),
    };
    schedule(&mut cx, &owners, &mut guests);
    println!(
        "guests: {} preemption timer interrupts while guests ran",
        native::ticks() - ticks
    );
    // Frame accounting: whatever is not free again must be structures the IOMMU units keep for
    // themselves (a context table made by the first attach on a bus stays with its unit), and no
    // nested page-table page may be left.
    let free_after = free_frames();
    let units_kept = IOMMU_MEMORY.live_bytes().saturating_sub(units_before);
    let npt_left = STAGE2_MEMORY.live_bytes();
    let exited = guests.len();
    if free_before.checked_sub(free_after) == Some(units_kept) && npt_left == 0 {
        println!(
            "guests: all {exited} guests done; every guest frame returned ({} KiB free before, {} KiB after: the IOMMU units keep {} KiB of their own tables)",
            free_before >> 10,
            free_after >> 10,
            units_kept >> 10
        );
    } else {
        println!(
            "guests: all {exited} guests done; FRAME LEAK: {} KiB free before, {} KiB after, IOMMU units keep {} KiB, nested tables left {} KiB",
            free_before >> 10,
            free_after >> 10,
            units_kept >> 10,
            npt_left >> 10
        );
        return EXIT_FAILURE;
    }
    EXIT_SUCCESS
}

/// Builds guest `index`: its object-model guest and devices, RAM, image, VM (RAM and device
/// BARs), vCPU. On failure everything built so far is undone.
fn create<B: Backend>(
    backend: &mut B,
    iommu: &mut Option<GuestIommu>,
    c: &GuestConfig<'static>,
    index: usize,
    assigned: &[devices::Assigned],
    platform: &crate::discovery::Platform,
    images: &[Image],
) -> Result<Guest<B>, alloc::string::String> {
    let iommu_guest = iommu.as_mut().map(GuestIommu::create_guest).transpose()?;
    let undo_iommu = |iommu: &mut Option<GuestIommu>| {
        if let (Some(fd), Some(id)) = (iommu.as_mut(), iommu_guest) {
            let _ = fd.destroy_guest(id);
        }
    };
    let built = build(
        backend,
        iommu,
        iommu_guest,
        c,
        index,
        assigned,
        platform,
        images,
    );
    match built {
        Ok((memory, vm, vcpu)) => Ok(Guest {
            name: c.name,
            index,
            guard: None,
            pci: pci::GuestPci::new(
                &assigned
                    .iter()
                    .filter(|a| a.guest == index)
                    .map(|a| {
                        (
                            a.addr.segment,
                            drivers::pci::Bdf {
                                bus: a.addr.bus,
                                device: a.addr.device,
                                function: a.addr.function,
                            },
                            a.bars.map(|(_, size)| size),
                        )
                    })
                    .collect::<Vec<_>>(),
            ),
            iommu_guest,
            memory: Some(memory),
            vm: Some(vm),
            vcpu: Some(vcpu),
            budget: c.slices,
            slices: 0,
            state: State::Runnable,
            line: [0; 120],
            line_len: 0,
        }),
        Err(e) => {
            undo_iommu(iommu);
            Err(e)
        }
    }
}

type Built<B> = (GuestMemory, <B as Backend>::Vm, <B as Backend>::Vcpu);

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the steps share all of it"
)]
fn build<B: Backend>(
    backend: &mut B,
    iommu: &mut Option<GuestIommu>,
    iommu_guest: Option<::iommu::iommufd::GuestId>,
    c: &GuestConfig<'static>,
    index: usize,
    assigned: &[devices::Assigned],
    platform: &crate::discovery::Platform,
    images: &[Image],
) -> Result<Built<B>, alloc::string::String> {
    use alloc::format;
    let image = images
        .iter()
        .find(|im| im.name == c.image)
        .ok_or_else(|| format!("image: no image {:?}", c.image))?;
    let elf = ElfImage::parse(image.bytes, native::ELF_MACHINE)
        .map_err(|e| format!("image {}: {e}", c.image))?;
    // Devices: ABI dev_ids first (the start-info page lists them).
    let mut start_devices = Vec::new();
    for (hw, a) in assigned
        .iter()
        .enumerate()
        .filter(|(_, a)| a.guest == index)
    {
        let (Some(fd), Some(id)) = (iommu.as_mut(), iommu_guest) else {
            return Err("dev: no IOMMU".into());
        };
        let dev_id = fd.assign_device(id, hw)?;
        start_devices.push(loader::StartDevice {
            segment: a.addr.segment,
            bus: a.addr.bus,
            devfn: a.addr.device << 3 | a.addr.function,
            vendor: a.vendor,
            device: a.device,
            dev_id,
            bars: a.bars,
        });
    }
    let memory = GuestMemory::new(c.mem).map_err(|e| format!("mem: {e}"))?;
    if assigned
        .iter()
        .filter(|a| a.guest == index)
        .flat_map(|a| a.bars)
        .any(|(gpa, size)| size != 0 && gpa < memory.size())
    {
        return Err("dev: a BAR overlaps the guest's RAM".into());
    }
    let entry = loader::load(&memory, &elf, c.cmdline, &start_devices)
        .map_err(|e| format!("image {}: {e}", c.image))?;
    let vm = backend.create_vm(&memory).map_err(|e| format!("vm: {e}"))?;
    for a in assigned.iter().filter(|a| a.guest == index) {
        for (i, &(base, size)) in a.bars.iter().enumerate() {
            if size == 0 {
                continue;
            }
            if let Err(e) = backend.map_device_memory(&vm, base, base, size) {
                backend.destroy_vm(vm);
                return Err(format!("dev: BAR{i} at {base:#x}: {e}"));
            }
            println!(
                "guest {}: {:04x}:{:02x}:{:02x}.{} BAR{i} {base:#x}+{size:#x} mapped at the same GPA",
                c.name, a.addr.segment, a.addr.bus, a.addr.device, a.addr.function
            );
        }
        if !devices::enable_dma(platform, a) {
            backend.destroy_vm(vm);
            return Err("dev: cannot enable bus mastering".into());
        }
    }
    let vcpu = match backend.create_vcpu(&vm, &entry) {
        Ok(v) => v,
        Err(e) => {
            backend.destroy_vm(vm);
            return Err(format!("vcpu: {e}"));
        }
    };
    Ok((memory, vm, vcpu))
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
    platform: &'a crate::discovery::Platform,
    /// The guest index of each hardware device (fault attribution).
    device_guest: &'a [usize],
    /// DMA faults raised by each guest's devices so far, by guest index.
    faults: Vec<u64>,
    /// `guard-tamper`: the hypervisor flips one bit of every guarded range (guard.rs).
    tamper: bool,
}

impl<B: Backend> Cx<'_, B> {
    /// DMA faults raised so far by the devices of every guest but `index`.
    fn foreign_faults(&self, index: usize) -> u64 {
        self.faults
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != index)
            .map(|(_, n)| n)
            .sum()
    }
}

fn stop<B: Backend>(cx: &mut Cx<'_, B>, g: &mut Guest<B>, pc: u64, why: core::fmt::Arguments) {
    flush_line(g);
    println!("guest {} stopped: {why}, {}={pc:#x}", g.name, native::PC);
    check_guard(cx, g, "at its own end");
    teardown(cx.backend, cx.iommu, g, true);
}

/// What the scheduler does after an exit.
enum Next {
    Resume,
    Reschedule,
}

/// Round robin over the runnable guests until none is left.
fn schedule<B: Backend>(
    cx: &mut Cx<'_, B>,
    owners: &[alloc::string::String],
    guests: &mut [Guest<B>],
) {
    let mut current = 0;
    while let Some(i) = (0..guests.len())
        .map(|k| (current + k) % guests.len())
        .find(|&k| matches!(guests[k].state, State::Runnable))
    {
        current = i + 1;
        let g = &mut guests[i];
        native::arm_timer(SLICE_TICKS);
        #[cfg(target_arch = "x86_64")]
        let slice_start = native::ticks();
        while let (Some(vm), Some(vcpu)) = (g.vm.as_ref(), g.vcpu.as_mut()) {
            #[cfg(target_arch = "x86_64")]
            let device_irqs = crate::irq::taken();
            let exit = cx.backend.run(vm, vcpu);
            // A device interrupt (an IOMMU fault event) exits like the timer; only the timer
            // ends the slice.
            #[cfg(target_arch = "x86_64")]
            if matches!(exit.event, Event::Preempted)
                && native::ticks() == slice_start
                && crate::irq::taken() != device_irqs
            {
                report_dma_faults(cx, owners, g);
                continue;
            }
            let next = handle(cx, g, exit);
            report_dma_faults(cx, owners, g);
            match next {
                Next::Resume => {}
                Next::Reschedule => break,
            }
            // The slice's timer may also fire while the hypervisor has interrupts open (the
            // fault drain's window): the slice is over then too.
            #[cfg(target_arch = "x86_64")]
            if native::ticks() != slice_start {
                break;
            }
        }
        if matches!(guests[i].state, State::Done) {
            // Guest i has just ended: whatever it did is done, so every range another guest
            // guards must still hash as it did when the guard was set.
            let after = alloc::format!("after guest {} ended", guests[i].name);
            for other in guests.iter() {
                check_guard(cx, other, &after);
            }
        }
    }
    native::arm_timer(0);
}

/// Reports the DMA faults the IOMMU recorded since the last call, each attributed to the guest
/// and device that raised it. Called after every exit: an assigned device only runs DMA its
/// guest started, and the fault registers must be drained before they overflow (VT-d 4.1
/// §7.2.1; QEMU has one).
fn report_dma_faults<B: Backend>(
    cx: &mut Cx<'_, B>,
    owners: &[alloc::string::String],
    g: &mut Guest<B>,
) {
    let Some(fd) = cx.iommu.as_mut() else {
        return;
    };
    let (device_guest, faults) = (cx.device_guest, &mut cx.faults);
    fd.poll_faults(&mut |f| {
        flush_line(g);
        if let Some(n) = f
            .device
            .and_then(|d| device_guest.get(d))
            .and_then(|&k| faults.get_mut(k))
        {
            *n += 1;
        }
        let who = f
            .device
            .and_then(|d| owners.get(d))
            .map_or("no guest's device", |s| s.as_str());
        println!(
            "dma fault: {who} (sid {:#06x}) {} at iova page {:#x}: reason {} ({})",
            f.sid,
            if f.write { "write" } else { "read" },
            f.page,
            f.reason,
            f.reason_name
        );
    });
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
                platform::GUARD => set_guard(cx, g, regs.args[0], regs.args[1]),
                platform::EXIT => {
                    flush_line(g);
                    println!("guest {} exited: status {}", g.name, regs.args[0] as u32);
                    check_guard(cx, g, "at its own end");
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
        Event::MmioAccess {
            gpa,
            write,
            size,
            value,
        } => {
            // The guest's emulated ECAM window (aarch64, docs/guests.md): its configuration
            // space, mediated like the port mechanism. Anything else is a wild access.
            let emulated = gpa
                .checked_sub(loader::ECAM)
                .filter(|&off| off < loader::ECAM_SIZE)
                .and_then(|off| {
                    g.pci
                        .ecam_access(cx.platform, off, size, write, value as u32)
                });
            if let Some(read) = emulated {
                if let Some(vcpu) = g.vcpu.as_mut() {
                    cx.backend.complete_mmio(vcpu, read.map(u64::from));
                }
                return Next::Resume;
            }
            let kind = if write { "write" } else { "read" };
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
            port,
            size,
            write,
            value,
        } => {
            if let pci::Access::Done(read) = g.pci.access(cx.platform, port, size, write, value) {
                if let Some(vcpu) = g.vcpu.as_mut() {
                    cx.backend.complete_port_io(vcpu, size, read);
                }
                return Next::Resume;
            }
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

/// GUARD: hashes `len` bytes of the guest's RAM at `gpa` (guard.rs). 0, `-EINVAL` for an empty
/// or too long range, `-EFAULT` if it is not all the guest's RAM; a second GUARD replaces the
/// first.
fn set_guard<B: Backend>(cx: &mut Cx<'_, B>, g: &mut Guest<B>, gpa: u64, len: u64) -> u64 {
    if len == 0 || len > guard::GUARD_MAX {
        return errno_result(errno::EINVAL);
    }
    flush_line(g);
    let Some(mem) = g.memory.as_ref() else {
        return errno_result(errno::EFAULT);
    };
    let Some(hash) = guard::hash(mem, gpa, len) else {
        return errno_result(errno::EFAULT);
    };
    println!(
        "guard: guest {} gpa {gpa:#x}+{len:#x}: hash {hash:#018x}",
        g.name
    );
    if cx.tamper && guard::tamper(mem, gpa) {
        println!("guard: guard-tamper: the hypervisor flipped a bit at gpa {gpa:#x}");
    }
    g.guard = Some(guard::Guard {
        gpa,
        len,
        hash,
        foreign_faults_at: cx.foreign_faults(g.index),
    });
    0
}

/// Re-hashes the range `g` guards, if any, and says whether it is unchanged.
fn check_guard<B: Backend>(cx: &Cx<'_, B>, g: &Guest<B>, when: &str) {
    let (Some(gd), Some(mem)) = (g.guard.as_ref(), g.memory.as_ref()) else {
        return;
    };
    let blocked = cx
        .foreign_faults(g.index)
        .saturating_sub(gd.foreign_faults_at);
    match guard::hash(mem, gd.gpa, gd.len) {
        Some(now) if now == gd.hash => println!(
            "guard: guest {} gpa {:#x}+{:#x} {when}: hash unchanged: {:#018x} == {now:#018x} ({blocked} DMA faults of other guests' devices meanwhile)",
            g.name, gd.gpa, gd.len, gd.hash
        ),
        Some(now) => println!(
            "guard: guest {} gpa {:#x}+{:#x} {when}: hash CHANGED: {:#018x} != {now:#018x} ({blocked} DMA faults of other guests' devices meanwhile)",
            g.name, gd.gpa, gd.len, gd.hash
        ),
        None => println!(
            "guard: guest {} gpa {:#x}+{:#x} {when}: cannot read the range",
            g.name, gd.gpa, gd.len
        ),
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

/// Free memory for the leak check: the frame allocator's, plus the frames the two table pools
/// (IOMMU tables, nested page tables) hold on their free lists, which stay atomic-only memory
/// for good and so never return to the allocator (`mem::iommu_mem`).
fn free_frames() -> u64 {
    FRAMES.lock().free_bytes() + IOMMU_MEMORY.pooled_bytes() + STAGE2_MEMORY.pooled_bytes()
}

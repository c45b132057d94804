//! Guests: configuration from the command line, images from the boot modules, and a round-robin
//! scheduler of vCPUs over the vCPU backend (docs/guests.md).
//!
//! A guest is one VM ([`Guest`]: second-stage table, RAM, object-model guest, console, GUARD,
//! PCI view) with one or more vCPUs ([`Vcpu`], the scheduled unit). Guest-wide state is shared by
//! its vCPUs: what they only read while running (VM, RAM) behind a read-write lock that the
//! teardown alone takes for writing, what they change (console line, GUARD, PCI latch, slices)
//! behind a spin lock, and the `stopping` flag as an atomic.
//!
//! Containment: every exit the hypervisor does not expect from a well-behaved guest (an access to
//! unmapped guest-physical memory, a triple fault, a forbidden instruction or port, an
//! intercepted exception, a HLT that nothing will ever wake) stops that guest, all its vCPUs,
//! with a report naming it, the vCPU, the reason and its RIP; the others keep running. The
//! preemption timer ends every time slice, so a guest that spins costs the others one slice per
//! round and, with `slices=N`, is stopped when its budget is used up; it also bounds how long
//! another vCPU of a stopping guest runs before it sees the flag. The last vCPU of a stopped
//! guest to leave frees its IOMMU objects, VM and RAM, once.
//!
//! Devices: `devices.rs` decides what a `dev=` may name, `pci.rs` mediates the guest's
//! configuration space, `iommu.rs` is the object model its ABI v1 hypercalls reach; DMA faults
//! are drained after every exit and attributed to the guest and device.

mod devices;
mod guard;
mod iommu;
pub mod loader;
pub mod memory;
pub mod msi;
mod pci;

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use boot::BootInfo;
use boot::guests::{Archive, ElfImage, GuestConfig};
use hvabi::{errno, op, platform};

use crate::arch::smp::MAX_CPUS;
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
use spin::{Mutex, RwLock};

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

/// What a guest's vCPUs use while they run and its teardown frees, once: its VM (second-stage
/// table, ASID/VMID), its RAM and its guest in the IOMMU object model.
struct Resources<B: Backend> {
    memory: GuestMemory,
    vm: B::Vm,
    iommu_guest: Option<::iommu::iommufd::GuestId>,
}

/// Guest-wide state its vCPUs change, behind the guest's one lock: the console line being
/// assembled, the GUARD range, its view of PCI configuration space (one 0xCF8 latch per guest,
/// as one machine has one) and the time slices its vCPUs have used (the budget is the guest's).
struct Shared {
    guard: Option<guard::Guard>,
    pci: pci::GuestPci,
    slices: u32,
    line: [u8; 120],
    line_len: usize,
}

/// One guest: a VM and everything its vCPUs share. The scheduled unit is the vCPU ([`Vcpu`]).
struct Guest<B: Backend> {
    name: &'static str,
    /// Its position in the configuration (`devices::Assigned::guest`).
    index: usize,
    budget: Option<u32>,
    /// Number of vCPUs it was configured with.
    vcpu_count: u32,
    /// Set once, by whatever ends the guest (one vCPU's offence, EXIT, the budget). Every
    /// vCPU of the guest leaves at its next exit when it sees it: a scheduler checks it before
    /// each entry, and the preemption timer bounds how long a vCPU runs before it looks again.
    /// Release/Acquire: the vCPU that set it wrote its report first.
    stopping: AtomicBool,
    /// Its vCPUs that have not left yet; the one that brings this to 0 tears the guest down.
    live: AtomicU32,
    /// Read-locked by each of its vCPUs for a time slice; taken (write) by the teardown, when
    /// no vCPU of it is left, so the VM and RAM are freed exactly once and after every vCPU.
    res: RwLock<Option<Resources<B>>>,
    shared: Mutex<Shared>,
    /// DMA faults raised by its devices so far (GUARD reports count other guests').
    faults: AtomicU64,
}

/// One vCPU: the unit a CPU's scheduler runs, pinned to the CPU `cpus=` gave it.
struct Vcpu<B: Backend> {
    /// Its guest (index into the guests).
    guest: usize,
    /// Its index in the guest (what the guest got in RSI / x1).
    index: u32,
    /// The physical CPU it is pinned to.
    cpu: u32,
    /// Its backend state; `None` once it has left.
    state: Option<B::Vcpu>,
    /// Exits taken, and the physical CPUs its exit path ran on (bit per CPU index): measured
    /// at every exit, not taken from the configuration.
    exits: u64,
    ran_on: u64,
}

/// Parses the `guest=` items, loads and runs the guests until every one has exited or been
/// stopped. Returns the hypervisor's status: failure only if the configuration was refused.
pub fn run(info: &'static BootInfo, platform: &'static crate::discovery::Platform) -> u32 {
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
        if let Some(cpu) = c.cpus().iter().find(|&&cpu| !cpu_online(cpu)) {
            return refuse(&format_args!(
                "cpus: CPU {cpu} is not online (online: {})",
                cpu_list(&(0..64).filter(|&k| cpu_online(k)).collect::<Vec<u32>>())
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
fn run_on<B: Backend + 'static>(
    mut backend: B,
    asids: u32,
    info: &'static BootInfo,
    items: &[&'static str],
    configs: &[GuestConfig<'static>],
    assigned: &[devices::Assigned],
    platform: &'static crate::discovery::Platform,
    images: &[Image],
) -> u32 {
    if !B::SMP
        && let Some(i) = configs
            .iter()
            .position(|c| c.cpus().iter().any(|&cpu| cpu != 0))
    {
        println!(
            "guests: refused guest item {} (guest={}): cpus: the {} backend runs guests on the boot CPU only",
            i + 1,
            items[i],
            backend.name()
        );
        return EXIT_FAILURE;
    }
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
    let iommu = match GuestIommu::attach(&hw) {
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
    let mut vcpus: Vec<Vcpu<B>> = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        match create(
            &mut backend,
            iommu.as_ref(),
            c,
            i,
            assigned,
            platform,
            images,
        ) {
            Ok((g, states)) => {
                println!(
                    "guest {} started: image {}, {} MiB, cmdline {:?}",
                    c.name,
                    c.image,
                    c.mem >> 20,
                    c.cmdline
                );
                if c.vcpus > 1 {
                    println!(
                        "guest {}: {} vCPUs on CPU(s) {}",
                        c.name,
                        c.vcpus,
                        cpu_list(c.cpus())
                    );
                }
                for (k, mut s) in states.into_iter().enumerate() {
                    bind_interrupts(&mut backend, &mut s, i, k);
                    vcpus.push(Vcpu {
                        guest: i,
                        index: k as u32,
                        cpu: c.cpus()[k],
                        state: Some(s),
                        exits: 0,
                        ran_on: 0,
                    });
                }
                guests.push(g);
            }
            Err(e) => {
                println!(
                    "guests: refused guest item {} (guest={}): {e}",
                    i + 1,
                    items[i]
                );
                for v in vcpus.iter_mut() {
                    if let Some(s) = v.state.take() {
                        backend.destroy_vcpu(s);
                    }
                }
                for g in guests.iter() {
                    teardown(&mut backend, iommu.as_ref(), g, false);
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
    let common = Arc::new(Common {
        guests,
        iommu,
        platform,
        device_guest: assigned.iter().map(|a| a.guest).collect(),
        owners,
        tamper: info
            .cmdline
            .as_str()
            .split_ascii_whitespace()
            .any(|w| w == "guard-tamper"),
    });
    run_everywhere(&mut backend, &common, vcpus);
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
    let exited = common.guests.len();
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

/// `0,1,1` for the report.
fn cpu_list(cpus: &[u32]) -> alloc::string::String {
    let mut s = alloc::string::String::new();
    for (i, c) in cpus.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = core::fmt::Write::write_fmt(&mut s, format_args!("{c}"));
    }
    s
}

/// Whether physical CPU `cpu` is online (`arch::smp`: dense indices, the boot CPU is 0), so that
/// a vCPU may be pinned to it.
fn cpu_online(cpu: u32) -> bool {
    usize::try_from(cpu).is_ok_and(|c| c < crate::arch::smp::online())
}

/// Builds guest `index`: its object-model guest and devices, RAM, image, VM (RAM and device
/// BARs) and its vCPUs. On failure everything built so far is undone.
fn create<B: Backend>(
    backend: &mut B,
    iommu: Option<&GuestIommu>,
    c: &GuestConfig<'static>,
    index: usize,
    assigned: &[devices::Assigned],
    platform: &crate::discovery::Platform,
    images: &[Image],
) -> Result<(Guest<B>, Vec<B::Vcpu>), alloc::string::String> {
    let iommu_guest = iommu.map(GuestIommu::create_guest).transpose()?;
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
        Ok((memory, vm, states)) => Ok((
            Guest {
                name: c.name,
                index,
                budget: c.slices,
                vcpu_count: c.vcpus as u32,
                stopping: AtomicBool::new(false),
                live: AtomicU32::new(c.vcpus as u32),
                res: RwLock::new(Some(Resources {
                    memory,
                    vm,
                    iommu_guest,
                })),
                shared: Mutex::new(Shared {
                    guard: None,
                    pci: pci::GuestPci::new(
                        index,
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
                    slices: 0,
                    line: [0; 120],
                    line_len: 0,
                }),
                faults: AtomicU64::new(0),
            },
            states,
        )),
        Err(e) => {
            if let (Some(fd), Some(id)) = (iommu, iommu_guest) {
                let _ = fd.destroy_guest(id);
            }
            Err(e)
        }
    }
}

type Built<B> = (GuestMemory, <B as Backend>::Vm, Vec<<B as Backend>::Vcpu>);

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the steps share all of it"
)]
fn build<B: Backend>(
    backend: &mut B,
    iommu: Option<&GuestIommu>,
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
        let (Some(fd), Some(id)) = (iommu, iommu_guest) else {
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
    let memory = GuestMemory::new(c.mem, c.scatter).map_err(|e| format!("{e}"))?;
    if let Some(w) = memory.scatter() {
        // Computed from the frames the window got, not from what was asked for.
        let adjacent = match w.adjacent_pairs {
            0 => alloc::string::String::from("none adjacent"),
            n => format!("{n} pairs adjacent"),
        };
        println!(
            "report: guest {}: scatter {:#x}+{:#x}: {} host runs, {adjacent}",
            c.name, w.gpa, w.size, w.host_runs
        );
    }
    if assigned
        .iter()
        .filter(|a| a.guest == index)
        .flat_map(|a| a.bars)
        .any(|(gpa, size)| size != 0 && gpa < memory.size())
    {
        return Err("dev: a BAR overlaps the guest's RAM".into());
    }
    let entry = loader::load(&memory, &elf, c.cmdline, &start_devices, c.vcpus as u32)
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
    let count = c.vcpus as u32;
    let mut states = Vec::new();
    for k in 0..count {
        match backend.create_vcpu(&vm, &loader::secondary_entry(&entry, k, count)) {
            Ok(v) => states.push(v),
            Err(e) => {
                for v in states {
                    backend.destroy_vcpu(v);
                }
                backend.destroy_vm(vm);
                return Err(format!("vcpu {k}: {e}"));
            }
        }
    }
    Ok((memory, vm, states))
}

/// Frees a guest's IOMMU objects, VM and RAM (in that order: nothing may point at RAM that is
/// gone). Its vCPUs are gone already; called once, by the last of them to leave.
fn teardown<B: Backend>(backend: &mut B, iommu: Option<&GuestIommu>, g: &Guest<B>, report: bool) {
    flush_line(g.name, &mut g.shared.lock());
    let Some(r) = g.res.write().take() else {
        return;
    };
    // Its IOMMU objects go first: no device may keep a mapping of RAM that is about to be freed.
    if let (Some(fd), Some(id)) = (iommu, r.iommu_guest) {
        match fd.destroy_guest(id) {
            Ok(()) if report => println!("guest {}: its IOMMU objects destroyed", g.name),
            Ok(()) => {}
            Err(e) => println!("guest {}: destroying its IOMMU objects failed: {e}", g.name),
        }
    }
    backend.destroy_vm(r.vm);
    let kib = r.memory.size() >> 10;
    drop(r.memory);
    if report {
        println!(
            "guest {}: {kib} KiB of RAM, {} freed",
            g.name,
            native::CONTROL
        );
    }
}

/// What every CPU's scheduler shares: the guests and what the exit handlers need.
struct Common<B: Backend> {
    guests: Vec<Guest<B>>,
    iommu: Option<GuestIommu>,
    platform: &'static crate::discovery::Platform,
    /// The guest index of each hardware device (fault attribution).
    device_guest: Vec<usize>,
    /// Who owns each hardware device, as the fault reports name it.
    owners: Vec<alloc::string::String>,
    /// `guard-tamper`: the hypervisor flips one bit of every guarded range (guard.rs).
    tamper: bool,
}

impl<B: Backend> Common<B> {
    /// DMA faults raised so far by the devices of every guest but `index`.
    fn foreign_faults(&self, index: usize) -> u64 {
        self.guests
            .iter()
            .filter(|g| g.index != index)
            .map(|g| g.faults.load(Ordering::Relaxed))
            .sum()
    }
}

/// Ends guest `g` because of what its vCPU `vcpu` did: the first reason wins and is reported;
/// every vCPU of it then leaves (this one at once, the others at their next exit).
fn stop<B: Backend>(g: &Guest<B>, vcpu: u32, pc: u64, why: core::fmt::Arguments) {
    let mut s = g.shared.lock();
    if g.stopping.load(Ordering::Relaxed) {
        return; // another vCPU of it ended it first; that report stands
    }
    flush_line(g.name, &mut s);
    if g.vcpu_count > 1 {
        println!(
            "guest {} stopped: vcpu {vcpu}: {why}, {}={pc:#x}",
            g.name,
            native::PC
        );
    } else {
        println!("guest {} stopped: {why}, {}={pc:#x}", g.name, native::PC);
    }
    g.stopping.store(true, Ordering::Release);
}

/// What the scheduler does after an exit.
enum Next {
    /// Re-enter the same vCPU.
    Resume,
    /// Its time slice is over.
    Reschedule,
    /// The vCPU's guest is ending: the vCPU leaves for good.
    Leave,
}

/// What a secondary CPU's scheduler is handed: the shared state and the vCPUs pinned to it.
type Work<B> = (Arc<Common<B>>, Vec<Vcpu<B>>);

/// One hand-off slot per CPU: the boot CPU puts a [`Work`] there before it launches the CPU's
/// scheduler ([`secondary`]), which takes it. `launch` takes only a function and a word, and
/// the slot keeps the hand-off free of raw pointers: the type is checked when it is taken.
static HANDOFF: Mutex<[Option<Box<dyn Any + Send>>; MAX_CPUS]> =
    Mutex::new([const { None }; MAX_CPUS]);

/// Runs every vCPU on the CPU it is pinned to: one scheduler per physical CPU that has vCPUs,
/// each with its own preemption timer; this (boot) CPU runs its own and then waits for the
/// others to finish (every vCPU of theirs has left, so every guest is torn down).
fn run_everywhere<B: Backend + 'static>(
    backend: &mut B,
    common: &Arc<Common<B>>,
    vcpus: Vec<Vcpu<B>>,
) {
    let mut by_cpu: Vec<Vec<Vcpu<B>>> = (0..MAX_CPUS).map(|_| Vec::new()).collect();
    for v in vcpus {
        // `cpus=` was checked against the CPUs online, which are fewer than MAX_CPUS.
        let cpu = (v.cpu as usize).min(MAX_CPUS - 1);
        by_cpu[cpu].push(v);
    }
    let mut launched = Vec::new();
    for (cpu, mine) in by_cpu.iter_mut().enumerate().skip(1) {
        if mine.is_empty() {
            continue;
        }
        let work: Work<B> = (common.clone(), core::mem::take(mine));
        HANDOFF.lock()[cpu] = Some(Box::new(work));
        match crate::arch::smp::launch(cpu, secondary::<B>, cpu) {
            Ok(()) => launched.push(cpu),
            Err(e) => {
                // Its vCPUs never run: their guests are stopped and they leave from here.
                let back = HANDOFF.lock()[cpu].take();
                if let Some(Ok(work)) = back.map(|w| w.downcast::<Work<B>>()) {
                    let (_, mut orphans) = *work;
                    for v in orphans.iter_mut() {
                        let why = format_args!("its CPU {cpu} cannot be launched ({e:?})");
                        stop(&common.guests[v.guest], v.index, 0, why);
                        leave(backend, common, v);
                    }
                }
            }
        }
    }
    schedule(backend, common, &mut by_cpu[0]);
    for cpu in launched {
        while !crate::arch::smp::is_idle(cpu) {
            core::hint::spin_loop();
        }
        // A CPU that could not make a backend handed its vCPUs back, unrun: they leave here.
        let back = HANDOFF.lock()[cpu].take();
        if let Some(Ok(work)) = back.map(|w| w.downcast::<Work<B>>()) {
            let (_, mut orphans) = *work;
            for v in orphans.iter_mut() {
                leave(backend, common, v);
            }
        }
    }
}

/// The scheduler of secondary CPU `cpu`, launched by [`run_everywhere`]: its own backend, then
/// the same round robin over the vCPUs pinned to it.
fn secondary<B: Backend + 'static>(cpu: usize) {
    let Some(work) = HANDOFF.lock().get_mut(cpu).and_then(Option::take) else {
        return;
    };
    let Ok(work) = work.downcast::<Work<B>>() else {
        return;
    };
    let (common, mut vcpus) = *work;
    match B::for_this_cpu() {
        Ok(mut backend) => schedule(&mut backend, &common, &mut vcpus),
        Err(e) => {
            for v in &vcpus {
                let why = format_args!("CPU {cpu} cannot run guests: {e}");
                stop(&common.guests[v.guest], v.index, 0, why);
            }
            HANDOFF.lock()[cpu] = Some(Box::new((common, vcpus)));
        }
    }
}

/// The scheduler of one physical CPU: round robin over the vCPUs pinned to it until none is
/// left, one time slice each.
fn schedule<B: Backend>(backend: &mut B, c: &Common<B>, vcpus: &mut [Vcpu<B>]) {
    let mut current = 0;
    while let Some(k) = (0..vcpus.len())
        .map(|k| (current + k) % vcpus.len())
        .find(|&k| vcpus[k].state.is_some())
    {
        current = k + 1;
        native::arm_timer(SLICE_TICKS);
        if run_slice(backend, c, &mut vcpus[k]) {
            leave(backend, c, &mut vcpus[k]);
        }
    }
    native::arm_timer(0);
}

/// Runs vCPU `v` for one time slice; `true` when it must leave (its guest is ending).
fn run_slice<B: Backend>(backend: &mut B, c: &Common<B>, v: &mut Vcpu<B>) -> bool {
    let g = &c.guests[v.guest];
    let res = g.res.read();
    let (Some(r), Some(state)) = (res.as_ref(), v.state.as_mut()) else {
        return true;
    };
    #[cfg(target_arch = "x86_64")]
    let slice_start = native::ticks();
    // The whole slice runs on this CPU: its bit in `ran_on`, looked up once per slice rather
    // than once per exit.
    let this_cpu_bit = 1 << (this_cpu() % 64);
    loop {
        // Acquire: pairs with the Release of `stop`; checked before every entry, so a vCPU of
        // a guest another CPU has stopped never runs for more than the slice it is in.
        if g.stopping.load(Ordering::Acquire) {
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        let device_irqs = crate::irq::taken();
        let exit = backend.run(&r.vm, state);
        v.exits += 1;
        v.ran_on |= this_cpu_bit;
        // A device interrupt (an IOMMU fault event) exits like the timer; only the timer ends
        // the slice.
        #[cfg(target_arch = "x86_64")]
        if matches!(exit.event, Event::Preempted)
            && native::ticks() == slice_start
            && crate::irq::taken() != device_irqs
        {
            report_dma_faults(c, g);
            continue;
        }
        let next = handle(backend, c, g, r, v.index, state, exit);
        report_dma_faults(c, g);
        match next {
            Next::Resume => {}
            Next::Reschedule => return false,
            Next::Leave => return true,
        }
        // The slice's timer may also fire while the hypervisor has interrupts open (the fault
        // drain's window): the slice is over then too.
        #[cfg(target_arch = "x86_64")]
        if native::ticks() != slice_start {
            return false;
        }
    }
}

/// The physical CPU this code runs on (the exit path's measurement of where a vCPU ran).
fn this_cpu() -> u32 {
    crate::arch::smp::cpu_index() as u32
}

/// vCPU `v` leaves: its control block is freed here, by the CPU that ran it (a VMCS is
/// VMCLEARed where it is current); the last vCPU of a guest to leave tears the guest down.
fn leave<B: Backend>(backend: &mut B, c: &Common<B>, v: &mut Vcpu<B>) {
    let Some(state) = v.state.take() else {
        return;
    };
    if let Some(slot) = msi::slot(v.guest, v.index as usize) {
        msi::bind(slot, false);
    }
    backend.destroy_vcpu(state);
    let g = &c.guests[v.guest];
    if g.vcpu_count > 1 || v.cpu != 0 {
        let mut on = alloc::vec::Vec::new();
        for cpu in 0..64 {
            if v.ran_on & (1 << cpu) != 0 {
                on.push(cpu);
            }
        }
        println!(
            "guest {} vcpu {}: left after {} exits; exits taken on CPU(s) {} (pinned to CPU {})",
            g.name,
            v.index,
            v.exits,
            cpu_list(&on),
            v.cpu
        );
    }
    // AcqRel: the last one out sees everything the others did before they left.
    if g.live.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    // Every fault the IOMMU recorded against this guest's devices, drained and attributed
    // after each exit: the storm scenarios compare it with the DMAs the guest says it aimed.
    println!(
        "guest {}: {} DMA fault record(s) attributed to its devices",
        g.name,
        g.faults.load(Ordering::Relaxed)
    );
    check_guard(c, g, "at its own end");
    // No vCPU of it is left to hold the guest's lock against the IOMMU owner's.
    g.shared.lock().pci.release(c.platform);
    teardown(backend, c.iommu.as_ref(), g, true);
    // Guest g has just ended: whatever it did is done, so every range another guest guards
    // must still hash as it did when the guard was set.
    let after = alloc::format!("after guest {} ended", g.name);
    for other in c.guests.iter() {
        check_guard(c, other, &after);
    }
}

/// Reports the DMA faults the IOMMU recorded since the last call, each attributed to the guest
/// and device that raised it. Called after every exit: an assigned device only runs DMA its
/// guest started, and the fault registers must be drained before they overflow (VT-d 4.1
/// §7.2.1; QEMU has one).
fn report_dma_faults<B: Backend>(c: &Common<B>, g: &Guest<B>) {
    let Some(fd) = c.iommu.as_ref() else {
        return;
    };
    fd.poll_faults(&mut |f| {
        flush_line(g.name, &mut g.shared.lock());
        if let Some(owner) = f
            .device
            .and_then(|d| c.device_guest.get(d))
            .and_then(|&k| c.guests.get(k))
        {
            owner.faults.fetch_add(1, Ordering::Relaxed);
        }
        let who = f
            .device
            .and_then(|d| c.owners.get(d))
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

/// A wild access: `... at gpa=... (kind): not guest memory`.
fn stop_wild<B: Backend>(g: &Guest<B>, vcpu: u32, pc: u64, gpa: u64, kind: &str) -> Next {
    stop(
        g,
        vcpu,
        pc,
        format_args!(
            "{} at gpa={gpa:#x} ({kind}): not guest memory",
            native::STAGE2_FAULT
        ),
    );
    Next::Leave
}

#[allow(
    clippy::too_many_arguments,
    reason = "the exit and everything it may touch: backend, guest, its resources, the vCPU"
)]
fn handle<B: Backend>(
    backend: &mut B,
    c: &Common<B>,
    g: &Guest<B>,
    r: &Resources<B>,
    vcpu: u32,
    state: &mut B::Vcpu,
    exit: Exit,
) -> Next {
    let pc = exit.pc;
    // Another vCPU ended the guest while this one ran: nothing it did since is acted on (no
    // hypercall of a stopping guest reaches the object model).
    if g.stopping.load(Ordering::Acquire) {
        return Next::Leave;
    }
    match exit.event {
        Event::Preempted => {
            let used = {
                let mut s = g.shared.lock();
                s.slices += 1;
                s.slices
            };
            if let Some(budget) = g.budget.filter(|&b| used >= b) {
                stop(
                    g,
                    vcpu,
                    pc,
                    format_args!("CPU budget of {budget} time slices used up"),
                );
                return Next::Leave;
            }
            Next::Reschedule
        }
        Event::Hypercall(regs) => {
            let op = u32::try_from(regs.op).unwrap_or(u32::MAX);
            let result = match op {
                platform::CONSOLE_WRITE => console_write(g, r, regs.args[0], regs.args[1]),
                platform::GUARD => set_guard(c, g, r, regs.args[0], regs.args[1]),
                platform::EXIT => {
                    // The whole guest ends, whichever vCPU asks (a power-off, not a CPU off).
                    let mut s = g.shared.lock();
                    if !g.stopping.load(Ordering::Relaxed) {
                        flush_line(g.name, &mut s);
                        if g.vcpu_count > 1 {
                            println!(
                                "guest {} exited: status {} (EXIT from vcpu {vcpu})",
                                g.name, regs.args[0] as u32
                            );
                        } else {
                            println!("guest {} exited: status {}", g.name, regs.args[0] as u32);
                        }
                        g.stopping.store(true, Ordering::Release);
                    }
                    return Next::Leave;
                }
                // ABI v1 (docs/abi.md): the guest's own objects, its own memory. Without an
                // IOMMU on the machine a valid op is EOPNOTSUPP; an unknown op is ENOTTY.
                o if op::arg_size(o).is_some() => match (c.iommu.as_ref(), r.iommu_guest) {
                    (Some(fd), Some(id)) => fd.call(id, &r.memory, o, regs.args[0], vcpu) as u64,
                    _ => errno_result(errno::EOPNOTSUPP),
                },
                _ => errno_result(errno::ENOTTY),
            };
            backend.complete_hypercall(state, result);
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
            stop_wild(g, vcpu, pc, gpa, kind)
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
                    g.shared
                        .lock()
                        .pci
                        .ecam_access(c.platform, off, size, write, value as u32)
                });
            if let Some(read) = emulated {
                settle_msi(c, g);
                backend.complete_mmio(state, read.map(u64::from));
                return Next::Resume;
            }
            stop_wild(g, vcpu, pc, gpa, if write { "write" } else { "read" })
        }
        Event::PortIo {
            port,
            size,
            write,
            value,
        } => {
            let access = g
                .shared
                .lock()
                .pci
                .access(c.platform, port, size, write, value);
            if let pci::Access::Done(read) = access {
                settle_msi(c, g);
                backend.complete_port_io(state, size, read);
                return Next::Resume;
            }
            let dir = if write { "out" } else { "in" };
            stop(
                g,
                vcpu,
                pc,
                format_args!("forbidden port I/O: {dir} port {port:#x} ({size} bytes)"),
            );
            Next::Leave
        }
        Event::Halt => {
            stop(
                g,
                vcpu,
                pc,
                format_args!(
                    "{} with no interrupt source (guests get no interrupts)",
                    native::HALT
                ),
            );
            Next::Leave
        }
        Event::TripleFault => {
            stop(g, vcpu, pc, format_args!("triple fault (shutdown)"));
            Next::Leave
        }
        Event::UnexpectedException { vector, error_code } => {
            stop(
                g,
                vcpu,
                pc,
                format_args!("intercepted exception {vector} (error code {error_code:#x})"),
            );
            Next::Leave
        }
        Event::Forbidden { what, detail } => {
            stop(
                g,
                vcpu,
                pc,
                format_args!("forbidden instruction {what} ({detail:#x})"),
            );
            Next::Leave
        }
        Event::Invalid(code) => {
            stop(
                g,
                vcpu,
                pc,
                format_args!("unhandled exit code {code:#x} (invalid guest state)"),
            );
            Next::Leave
        }
    }
}

/// Makes the MSI routes the guest's configuration writes asked for (pci.rs): each one with
/// the guest's lock released, since routing takes the IOMMU owner and the fault drain takes
/// the two in the other order.
fn settle_msi<B: Backend>(c: &Common<B>, g: &Guest<B>) {
    loop {
        // Its own statement: the guard is dropped before the route is made.
        let work = g.shared.lock().pci.take_msi_work();
        let Some(work) = work else {
            return;
        };
        let result = work.run();
        let mut s = g.shared.lock();
        if let Some(e) = s.pci.finish_msi_work(c.platform, work, result) {
            flush_line(g.name, &mut s);
            println!("guest {}: MSI not routed: {e}", g.name);
        }
    }
}

/// Lets vCPU `k` of guest `i` take the virtual interrupts its MSI routes post, if the backend
/// delivers any.
fn bind_interrupts<B: Backend>(backend: &mut B, state: &mut B::Vcpu, i: usize, k: usize) {
    if let Some(slot) = msi::slot(i, k)
        && backend.bind_interrupts(state, slot)
    {
        msi::bind(slot, true);
    }
}

/// GUARD: hashes `len` bytes of the guest's RAM at `gpa` (guard.rs). 0, `-EINVAL` for an empty
/// or too long range, `-EFAULT` if it is not all the guest's RAM; a second GUARD replaces the
/// first.
fn set_guard<B: Backend>(c: &Common<B>, g: &Guest<B>, r: &Resources<B>, gpa: u64, len: u64) -> u64 {
    if len == 0 || len > guard::GUARD_MAX {
        return errno_result(errno::EINVAL);
    }
    let mut s = g.shared.lock();
    flush_line(g.name, &mut s);
    let Some(hash) = guard::hash(&r.memory, gpa, len) else {
        return errno_result(errno::EFAULT);
    };
    println!(
        "guard: guest {} gpa {gpa:#x}+{len:#x}: hash {hash:#018x}",
        g.name
    );
    if c.tamper && guard::tamper(&r.memory, gpa) {
        println!("guard: guard-tamper: the hypervisor flipped a bit at gpa {gpa:#x}");
    }
    s.guard = Some(guard::Guard {
        gpa,
        len,
        hash,
        foreign_faults_at: c.foreign_faults(g.index),
    });
    0
}

/// Re-hashes the range `g` guards, if any, and says whether it is unchanged.
fn check_guard<B: Backend>(c: &Common<B>, g: &Guest<B>, when: &str) {
    let res = g.res.read();
    let s = g.shared.lock();
    let (Some(gd), Some(r)) = (s.guard.as_ref(), res.as_ref()) else {
        return;
    };
    let blocked = c
        .foreign_faults(g.index)
        .saturating_sub(gd.foreign_faults_at);
    match guard::hash(&r.memory, gd.gpa, gd.len) {
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
/// `guest NAME: ...`, unprintable bytes as `.`. The line buffer is the guest's (one console),
/// so a guest whose vCPUs write at once gets their bytes in the order the calls ran.
fn console_write<B: Backend>(g: &Guest<B>, r: &Resources<B>, gpa: u64, len: u64) -> u64 {
    if len > platform::CONSOLE_WRITE_MAX {
        return errno_result(errno::EINVAL);
    }
    if !r.memory.contains(gpa, len) {
        return errno_result(errno::EFAULT);
    }
    let mut chunk = [0u8; 256];
    let mut done = 0u64;
    let mut s = g.shared.lock();
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        if r.memory.read(gpa + done, &mut chunk[..n]).is_err() {
            return errno_result(errno::EFAULT);
        }
        for &b in &chunk[..n] {
            if b == b'\n' {
                flush_line(g.name, &mut s);
                continue;
            }
            if s.line_len == s.line.len() {
                flush_line(g.name, &mut s);
            }
            let at = s.line_len;
            s.line[at] = if (0x20..0x7f).contains(&b) { b } else { b'.' };
            s.line_len += 1;
        }
        done += n as u64;
    }
    len
}

fn flush_line(name: &str, s: &mut Shared) {
    if s.line_len > 0 {
        let text = core::str::from_utf8(&s.line[..s.line_len]).unwrap_or("?");
        println!("guest {name}: {text}");
        s.line_len = 0;
    }
}

/// Free memory for the leak check: the frame allocator's, plus the frames the two table pools
/// (IOMMU tables, nested page tables) hold on their free lists, which stay atomic-only memory
/// for good and so never return to the allocator (`mem::iommu_mem`).
fn free_frames() -> u64 {
    FRAMES.lock().free_bytes() + IOMMU_MEMORY.pooled_bytes() + STAGE2_MEMORY.pooled_bytes()
}

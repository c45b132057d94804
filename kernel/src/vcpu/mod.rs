//! The vCPU backend interface: what the architecture-neutral guest code (`guest/`) needs from a
//! hardware virtualization extension, and nothing more.
//!
//! One [`Backend`] per machine, chosen at boot from the CPU's vendor and features ([`kind`]:
//! [`svm`] on AMD, [`vmx`] on Intel; the aarch64 EL1 backend (issue 10) implements the same
//! trait). A backend
//! creates a [`Backend::Vm`] from a guest's memory map (it builds its own second-stage table in
//! the format its hardware walks: SVM nested paging and VMX EPT use x86 formats, EL2 stage 2 the
//! Arm one) and vCPUs inside it; [`Backend::run`] enters the guest and returns at the next exit
//! the backend cannot finish by itself, decoded into an [`Event`].
//!
//! How the other backends map onto it: VMX ([`vmx`]) creates its VM with an EPT built by the
//! engine, decodes exit reasons 18 (VMCALL -> [`Event::Hypercall`]), 30 (I/O -> `PortIo`, the
//! qualification has port/size/direction), 48 (EPT violation -> `MmioFault`), 12 (HLT), 2 (triple
//! fault) and the preemption timer or external interrupt (`Preempted`). The EL1 backend (issue 10)
//! builds the VM's stage 2 with the engine's Arm format and decodes ESR_EL2: EC 0x16 (HVC ->
//! `Hypercall`, SMCCC function ID `0xC600_0000 + op` in x0, x1-x3 = args), EC 0x24 (stage-2
//! data abort, IPA from HPFAR_EL2: `MmioAccess` when ESR.ISV describes the access, completed by
//! `complete_mmio`, else `MmioFault`), EC 0x20 (instruction abort -> `MmioFault`), WFI (`Halt`), WFE and IRQ (`Preempted`),
//! SMC and trapped system registers (`Forbidden`); it never reports `PortIo`, so its
//! `complete_port_io` is never called. `EntryState::gdt` is x86 entry state; on aarch64
//! `page_table` is TTBR0_EL1 (EL1 enters with its MMU on, docs/guests.md).
//!
//! Exits a backend finishes internally never surface here (on SVM: CPUID emulation, `#VMEXIT`s
//! that only resume). Everything a guest does that the hypervisor must decide about does: a
//! hypercall, a port access, a fault on guest-physical memory it does not own, halting,
//! shutting down, an exception the hypervisor intercepts, or the end of its time slice.

#[cfg(target_arch = "aarch64")]
pub mod el1;
#[cfg(target_arch = "x86_64")]
pub mod svm;
#[cfg(target_arch = "x86_64")]
pub mod vmx;

/// The backend of aarch64 (x86_64 chooses between SVM and VMX at boot: [`kind`]).
#[cfg(target_arch = "aarch64")]
pub type Native = el1::El1;

use crate::guest::memory::GuestMemory;

/// The registers that carry a hypercall (docs/abi.md §2): on x86_64 RAX = op, RBX/RCX/RDX =
/// arguments; on aarch64 (SMCCC) the function ID in x0 maps to `op`, x1-x3 to the arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallRegs {
    pub op: u64,
    pub args: [u64; 3],
}

/// Why a vCPU left the guest, in architecture-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest made a hypercall (VMMCALL / VMCALL / HVC). Finish it with
    /// [`Backend::complete_hypercall`], which writes the result and steps past the instruction.
    Hypercall(HypercallRegs),
    /// Port I/O (x86 only). `value` holds the data for a write.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code, reason = "x86 only"))]
    PortIo {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    /// An access to guest-physical memory the guest has no mapping for (SVM NPF, VMX EPT
    /// violation, Arm stage-2 abort): the candidate for MMIO emulation, or a wild access.
    MmioFault { gpa: u64, write: bool, fetch: bool },
    /// A data access to guest-physical memory the guest has no mapping for, decoded by the
    /// hardware (Arm ESR_EL2.ISV: size, direction and register without instruction decoding):
    /// `value` is the data of a write. If the hypervisor emulates it, it finishes the access
    /// with [`Backend::complete_mmio`]; otherwise it is a wild access like `MmioFault`.
    #[cfg_attr(
        target_arch = "x86_64",
        allow(dead_code, reason = "no decode assists on SVM")
    )]
    MmioAccess {
        gpa: u64,
        write: bool,
        size: u8,
        value: u64,
    },
    /// The guest halted (HLT / WFI) with nothing to wake it.
    Halt,
    /// The guest shut itself down the hard way: a triple fault (SVM SHUTDOWN, VMX exit 2).
    #[cfg_attr(target_arch = "aarch64", allow(dead_code, reason = "x86 only"))]
    TripleFault,
    /// An exception the backend intercepts because the hypervisor must see it (#MC, and #DB/#AC
    /// which could otherwise loop forever inside event delivery).
    UnexpectedException { vector: u8, error_code: u64 },
    /// The guest executed something it may not (a virtualization instruction, an MSR access,
    /// an instruction the backend does not emulate); `what` names it, `detail` is e.g. the MSR.
    Forbidden { what: &'static str, detail: u64 },
    /// A physical interrupt arrived (the preemption timer): the time slice is over.
    Preempted,
    /// Anything else, with the hardware's own exit code (SVM EXITCODE, VMX exit reason, ESR).
    Invalid(u64),
}

/// One exit: the event and where the guest was (RIP / ELR) when it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub pc: u64,
    pub event: Event,
}

/// The architectural state a vCPU starts in (docs/guests.md, "Entry state"): 64-bit mode with
/// paging on (x86_64: long mode with `page_table` in CR3; aarch64: EL1h with the MMU off or on
/// per the protocol), `entry` in RIP/PC, `stack` in RSP/SP, `arg` in the first argument
/// register (RDI / x0) and `vcpu` in the second (RSI / x1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub entry: u64,
    pub stack: u64,
    pub arg: u64,
    /// Guest-physical address of the guest's own top-level page table (x86 CR3), built by the
    /// hypervisor inside guest RAM.
    pub page_table: u64,
    /// Guest-physical address and limit of the descriptor table the hypervisor built (x86 GDT).
    pub gdt: (u64, u16),
    /// This vCPU's index in its VM (0 for the first), and how many the VM has (aarch64: the
    /// MPIDR_EL1 the guest reads says uniprocessor only when there is one).
    pub vcpu: u32,
    pub vcpu_count: u32,
}

/// Errors creating VMs and vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuError {
    /// No frames for control structures or second-stage tables.
    NoMemory,
    /// All address-space identifiers (ASIDs / VPIDs / VMIDs) are in use.
    NoAsid,
    /// The second-stage table could not map the guest's memory (engine error).
    Map,
    /// The processor refused a control structure (a VMCS field VMWRITE rejected, VMPTRLD).
    #[cfg_attr(target_arch = "aarch64", allow(dead_code, reason = "VMX only"))]
    Control,
}

impl core::fmt::Display for VcpuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            VcpuError::NoMemory => "out of memory for virtualization structures",
            VcpuError::NoAsid => "no free address-space identifier",
            VcpuError::Map => "cannot map guest memory in the second-stage table",
            VcpuError::Control => "the processor refused a virtualization control structure",
        })
    }
}

/// Address-space identifiers 1..256 (ASIDs, VPIDs, VMIDs; 0 is the host's), one set for the
/// whole machine: a VM's identifier tags its translations on every CPU its vCPUs run on, and the
/// VM may be created by one CPU's backend and destroyed by another's (the last of its vCPUs to
/// leave). Each bit is claimed by CAS and released by one `fetch_and`; AcqRel so a claim sees
/// the release (and the TLB invalidation before it) of the VM that had the identifier last.
pub struct IdBitmap([core::sync::atomic::AtomicU64; 4]);

impl IdBitmap {
    pub const fn new() -> IdBitmap {
        use core::sync::atomic::AtomicU64;
        IdBitmap([
            AtomicU64::new(1), // identifier 0: the host's
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        ])
    }

    /// The lowest free identifier below `limit` (at most 256), now taken.
    pub fn alloc(&self, limit: u32) -> Option<u32> {
        use core::sync::atomic::Ordering;
        for id in 1..limit.min(256) {
            let (word, bit) = (&self.0[(id / 64) as usize], 1u64 << (id % 64));
            if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                return Some(id);
            }
        }
        None
    }

    /// Gives `id` back (ignores 0 and out-of-range values).
    pub fn free(&self, id: u32) {
        if (1..256).contains(&id) {
            self.0[(id / 64) as usize]
                .fetch_and(!(1u64 << (id % 64)), core::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Which backend this CPU calls for, from CPUID alone (nothing is switched on): Intel CPUs
/// (vendor "GenuineIntel") have VMX and never SVM; every other x86 vendor is asked for SVM.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Svm,
    Vmx,
}

/// The backend kind for this CPU's vendor (CPUID leaf 0: EBX, EDX, ECX spell the vendor).
#[cfg(target_arch = "x86_64")]
pub fn kind() -> Kind {
    let l = core::arch::x86_64::__cpuid(0);
    if (l.ebx, l.edx, l.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e) {
        Kind::Vmx
    } else {
        Kind::Svm
    }
}

/// A hardware virtualization backend. All methods run on the CPU the backend was brought up on
/// (the boot CPU today); a vCPU is only ever run by one CPU at a time.
///
/// A VM may have several vCPUs ([`Backend::create_vcpu`] once per vCPU): they share its
/// second-stage table and its address-space identifier (ASID / VPID / VMID), and each has its
/// own control block and registers. Because the identifier tags the guest's *first*-stage
/// translations too, and two vCPUs of one VM may run different first-stage tables, a backend
/// invalidates this CPU's entries of the identifier when it runs a vCPU other than the one of
/// the same VM that ran there last (SVM TLB_CONTROL, VMX INVVPID, Arm TLBI VMALLE1; KVM does the
/// same when a CPU switches between vCPUs of one VM).
pub trait Backend {
    /// One guest's address-space state: second-stage table, ASID/VMID. Shared by the VM's vCPUs,
    /// which may run on several CPUs at once (`run` takes it by shared reference).
    type Vm: Send + Sync;
    /// One virtual CPU: its control block (VMCB / VMCS / saved EL1 state) and registers. Moved
    /// to the CPU it is pinned to before it first runs; only that CPU runs it.
    type Vcpu: Send;

    /// Whether this backend can run guests on secondary CPUs ([`Backend::for_this_cpu`]).
    const SMP: bool;

    /// The backend of the calling CPU, for a secondary CPU that runs vCPUs: the CPU's own
    /// virtualization state (SVM's host save area, EL2's per-CPU controls), the machine-wide
    /// identifiers shared with every other CPU's backend. VMs are created by the boot CPU's.
    fn for_this_cpu() -> Result<Self, &'static str>
    where
        Self: Sized;

    /// Short name for the boot report (`svm`, `vmx`, `el2`).
    fn name(&self) -> &'static str;

    /// Creates a VM whose second stage maps exactly `memory`'s RAM regions; every other
    /// guest-physical address faults to the hypervisor ([`Event::MmioFault`]).
    fn create_vm(&mut self, memory: &GuestMemory) -> Result<Self::Vm, VcpuError>;

    /// Maps device memory (an assigned device's BAR) at `[gpa, gpa + len)` of `vm` to host
    /// `[hpa, hpa + len)`, uncached. Page-aligned; must not overlap what is mapped already.
    fn map_device_memory(
        &mut self,
        vm: &Self::Vm,
        gpa: u64,
        hpa: u64,
        len: u64,
    ) -> Result<(), VcpuError>;

    /// Creates a vCPU of `vm` in `state`.
    fn create_vcpu(&mut self, vm: &Self::Vm, state: &EntryState) -> Result<Self::Vcpu, VcpuError>;

    /// Runs `vcpu` until the next exit the hypervisor must handle.
    fn run(&mut self, vm: &Self::Vm, vcpu: &mut Self::Vcpu) -> Exit;

    /// Finishes a [`Event::Hypercall`]: `result` into the result register, past the instruction.
    fn complete_hypercall(&mut self, vcpu: &mut Self::Vcpu, result: u64);

    /// Finishes an [`Event::PortIo`] the hypervisor emulated: for a read, `value` goes into the
    /// low `size` bytes of the data register; the guest continues after the instruction.
    fn complete_port_io(&mut self, vcpu: &mut Self::Vcpu, size: u8, value: Option<u32>);

    /// Finishes an [`Event::MmioAccess`] the hypervisor emulated: for a read, `value` goes into
    /// the access's register (extended as the instruction says); the guest continues after the
    /// instruction.
    fn complete_mmio(&mut self, vcpu: &mut Self::Vcpu, value: Option<u64>);

    /// Frees the VM's second-stage table and identifier. The vCPUs must be destroyed first.
    fn destroy_vm(&mut self, vm: Self::Vm);

    /// Frees the vCPU's control structures.
    fn destroy_vcpu(&mut self, vcpu: Self::Vcpu);

    /// Makes the vCPU take the virtual interrupts posted to `slot` (`guest::msi`), before each
    /// entry. `false`: this backend delivers no interrupts to guests (MSI routes to the vCPU
    /// are then refused).
    fn bind_interrupts(&mut self, _vcpu: &mut Self::Vcpu, _slot: usize) -> bool {
        false
    }
}

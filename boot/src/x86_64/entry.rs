//! Machine-level x86_64 entry: the PVH ELF note, the Multiboot2 header, the two 32-bit entry
//! points, the switch to long mode, and the one unsafe step that lets the safe parsers read boot
//! loader memory. Built only for `x86_64-unknown-none`.
//!
//! Both protocols start in 32-bit protected mode with flat 4 GiB segments, paging off and
//! interrupts off (Xen `docs/misc/pvh.pandoc`; Multiboot2 spec 2.0 §3.3). From there the common
//! path does what Intel SDM vol 3 §10.8.5 ("Initializing IA-32e Mode") requires:
//!
//! 1. zero .bss (neither protocol promises it; .bss is NOLOAD in the image), set a stack;
//! 2. check CPUID.80000001h:EDX.LM[29] (and note NX[20]);
//! 3. build PML4 -> PDPT -> 4 PDs identity-mapping 0-4 GiB with 2 MiB pages (SDM §4.5), which
//!    covers the image at 1 MiB, the boot loader's structures and the legacy/PCI MMIO holes;
//! 4. CR3 = PML4, CR4.PAE = 1, EFER.LME = 1 (+ EFER.NXE when NX exists, so later page tables may
//!    use XD), CR0.PG = 1 (with PE, WP; CD/NW cleared) -> IA-32e compatibility mode;
//! 5. load a boot GDT with a 64-bit code segment (L=1) and far-jump to it -> 64-bit mode;
//! 6. call [`x86_64_boot_main`] with the protocol, the information pointer and `eax`.

use core::arch::global_asm;
use core::cell::UnsafeCell;

use super::{
    BootNotes, PhysMem, RSDP_V2_LEN, RsdpCopy, RsdpSource, choose_rsdp, mark_in_use, multiboot2,
    pvh,
};
use crate::{BootInfo, BootProtocol};

/// Protocol numbers passed from the assembly to [`x86_64_boot_main`].
const ENTRY_PVH: u32 = 1;
const ENTRY_MULTIBOOT2: u32 = 2;

global_asm!(
    r#"
    /* ---- Xen PVH ELF note (xen/include/public/elfnote.h) -------------------------------------
     * XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit physical entry point. The linker script gives
     * this section its own PT_NOTE program header, which is where QEMU and Xen look for it. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz: a 32-bit address */
    .long 18                        /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    /* ---- Multiboot2 header (spec 2.0 §3.1): 8-byte aligned, within the first 32 KiB --------
     * The linker script puts .multiboot2 first in the image. GRUB loads the ELF program headers
     * at their physical addresses; the entry-address tag sends it to mb2_start32 rather than the
     * ELF entry (which is the PVH entry). */
    .pushsection .multiboot2, "a"
    .balign 8
mb2_header:
    .long 0xe85250d6                /* magic */
    .long 0                         /* architecture 0: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xe85250d6 + 0 + (mb2_header_end - mb2_header))
    .balign 8                       /* entry address tag (§3.1.6) */
    .short 3, 0
    .long 12
    .long mb2_start32
    .balign 8                       /* module alignment tag (§3.1.11): page-aligned modules */
    .short 6, 0
    .long 8
    .balign 8                       /* end tag */
    .short 0, 0
    .long 8
mb2_header_end:
    .popsection

    /* ---- 32-bit entry points -------------------------------------------------------------- */
    .pushsection .text.boot, "ax"
    .code32

    /* PVH: ebx = hvm_start_info physical address. */
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov ${pvh}, %esi
    xor %edx, %edx
    jmp .Lcommon32

    /* Multiboot2: eax = 0x36d76289, ebx = boot information structure. The magic is checked in
     * Rust, where a mismatch can be reported instead of hanging here. */
    .global mb2_start32
mb2_start32:
    cli
    cld
    mov ${multiboot2}, %esi
    mov %eax, %edx

.Lcommon32:
    /* ebx = info, esi = protocol, edx = magic. rep stosb uses only eax/ecx/edi. */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov %esi, boot_protocol
    mov %ebx, boot_info_pa
    mov %edx, boot_magic
    mov $boot_stack_top, %esp

    /* Long mode present? CPUID.80000001h:EDX[29] (SDM vol 2A, CPUID). */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb .Lno_long_mode
    mov $0x80000001, %eax
    cpuid
    bt $29, %edx
    jnc .Lno_long_mode
    mov %edx, %ebp                  /* keep the feature bits for the NX check */

    /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3; PDn[i] = 2 MiB page at (n * 512 + i) * 2 MiB.
     * Flags: P|RW (0x3) on tables, P|RW|PS (0x83) on leaves: write-back via PAT entry 0, so the
     * effective memory type of MMIO holes comes from the firmware's MTRRs (SDM §12.5.2.2). */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
.Lfill_pdpt:
    mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    dec %ecx
    jnz .Lfill_pdpt
    mov $0x83, %eax
    mov $boot_pd, %edi
    mov $2048, %ecx
.Lfill_pd:
    mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz .Lfill_pd

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                  /* CR4.PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx           /* IA32_EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    bt $20, %ebp                    /* CPUID.80000001h:EDX.NX: EFER.NXE would #GP without it */
    jnc .Lno_nx
    or $0x800, %eax                 /* NXE */
.Lno_nx:
    wrmsr
    mov %cr0, %eax
    and $0x9fffffff, %eax           /* clear CD, NW: caches on */
    or $0x80010001, %eax            /* PG | WP | PE */
    mov %eax, %cr0                  /* now in IA-32e compatibility mode */
    lgdt boot_gdt_ptr
    ljmp $0x08, $.Llong_mode

.Lno_long_mode:
    /* Not a 64-bit CPU. Best effort message on COM1 (unprogrammed; QEMU does not care). */
    mov $.Lno_lm_msg, %esi
    mov $0x3f8, %dx
.Lno_lm_putc:
    lodsb
    test %al, %al
    jz .Lhalt32
    outb %al, %dx
    jmp .Lno_lm_putc
.Lhalt32:
    cli
    hlt
    jmp .Lhalt32

    /* ---- 64-bit ------------------------------------------------------------------------------ */
    .code64
.Llong_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    /* Upper register halves are undefined after the mode switch (SDM §3.4.1.1): reload all. */
    lea boot_stack_top(%rip), %rsp
    xor %ebp, %ebp                  /* terminates frame-pointer backtraces */
    mov boot_protocol(%rip), %edi
    mov boot_info_pa(%rip), %esi
    mov boot_magic(%rip), %edx
    call x86_64_boot_main
.Lhalt64:
    cli
    hlt
    jmp .Lhalt64
    .popsection

    .pushsection .rodata.boot, "a"
.Lno_lm_msg:
    .asciz "hypervisor: CPU has no long mode; halting\r\n"
    .balign 16
    /* Boot GDT (SDM §3.4.5): null, 0x08 64-bit code (L=1, D=0), 0x10 flat data. Accessed bits
     * preset so the CPU never writes to this read-only table. */
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
boot_gdt_end:
    .balign 8
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    /* The boot CPU's stack, used until the hypervisor switches to its own. 256 KiB: debug
     * builds are stack-hungry (large values are built on the stack before being moved) and
     * exception handlers run on it too (except the IST vectors). */
    /* One page the hypervisor's page tables leave unmapped, so that overflowing the boot
     * stack faults instead of running into the page tables above (docs/boot-x86_64.md). */
    .balign 4096
    .global boot_stack_guard
boot_stack_guard:
    .skip 4096
    .global boot_stack_bottom, boot_stack_top
boot_stack_bottom:
    .skip 262144
boot_stack_top:
boot_protocol:
    .skip 4
boot_info_pa:
    .skip 4
boot_magic:
    .skip 4
    .popsection
"#,
    pvh = const ENTRY_PVH,
    multiboot2 = const ENTRY_MULTIBOOT2,
    options(att_syntax)
);

/// A boot-time global: written only by [`x86_64_boot_main`] on the boot CPU before `hv_main`
/// runs, read-only afterwards.
struct BootCell<T>(UnsafeCell<T>);

// SAFETY: the contents are mutated only in `x86_64_boot_main`, which runs once, on the single CPU
// that is running at that point and before anything can obtain a shared reference; from then on
// only shared references exist.
unsafe impl<T> Sync for BootCell<T> {}

static BOOT_INFO: BootCell<BootInfo> = BootCell(UnsafeCell::new(BootInfo::new(BootProtocol::Pvh)));
static NOTES: BootCell<BootNotes> = BootCell(UnsafeCell::new(BootNotes::new()));
/// Home of the Multiboot2 RSDP copy when the firmware's original cannot be found; 16-byte
/// aligned like a firmware RSDP (ACPI 6.5 §5.2.5.1).
#[repr(C, align(16))]
struct RsdpBuffer([u8; RSDP_V2_LEN]);
static RSDP_COPY: BootCell<RsdpBuffer> = BootCell(UnsafeCell::new(RsdpBuffer([0; RSDP_V2_LEN])));

unsafe extern "C" {
    // Defined by linker/x86_64.ld; only their addresses are used.
    static __image_start: u8;
    static __image_end: u8;
    // Defined by the assembly above; only their addresses are used.
    static boot_stack_guard: u8;
    static boot_stack_top: u8;
}

/// The boot stack, as `(guard, top)`: the 4 KiB guard page directly below the stack (the kernel's
/// page tables leave it unmapped) and one past the stack's highest byte. Identity-mapped, so
/// virtual and physical addresses are equal.
pub fn boot_stack() -> (u64, u64) {
    (
        (&raw const boot_stack_guard) as u64,
        (&raw const boot_stack_top) as u64,
    )
}

fn image_range() -> (u64, u64) {
    // Addresses equal physical addresses: the image is linked and identity-mapped at 1 MiB.
    (
        (&raw const __image_start) as u64,
        (&raw const __image_end) as u64,
    )
}

/// Boot loader memory as seen through the boot identity map: [0, 4 GiB), minus address 0 (a null
/// slice is never valid) and minus our own image (which Rust statics live in).
struct IdentityMap {
    image: (u64, u64),
}

/// End of the boot identity map built by the assembly above.
const IDENTITY_LIMIT: u64 = 4 << 30;

impl PhysMem for IdentityMap {
    fn read(&self, pa: u64, max_len: usize) -> &[u8] {
        let (img_start, img_end) = self.image;
        if pa == 0 || pa >= IDENTITY_LIMIT || (img_start..img_end).contains(&pa) {
            return &[];
        }
        let mut end = pa.saturating_add(max_len as u64).min(IDENTITY_LIMIT);
        if pa < img_start {
            end = end.min(img_start);
        }
        // SAFETY: [pa, end) lies in [1, 4 GiB), which the boot page tables identity-map, so the
        // pointer is non-null and dereferenceable; u8 has no alignment requirement. The range
        // excludes the hypervisor image, so it never aliases a Rust static or the stack (both live
        // in the image). Boot-loader memory is not written by anyone while the returned borrow
        // lives: only this CPU runs, and the boot path copies what it needs into `BootInfo`.
        unsafe { core::slice::from_raw_parts(pa as *const u8, (end - pa) as usize) }
    }
}

/// Boot-loader memory plus the RSDP copy kept in the image, at the address the copy was placed.
struct WithRsdpCopy<'a> {
    mem: &'a IdentityMap,
    at: u64,
    copy: &'a [u8],
}

impl PhysMem for WithRsdpCopy<'_> {
    fn read(&self, pa: u64, max_len: usize) -> &[u8] {
        if pa == self.at {
            &self.copy[..max_len.min(self.copy.len())]
        } else {
            self.mem.read(pa, max_len)
        }
    }
}

/// The first Rust code, called by the assembly above in 64-bit mode on the boot stack.
#[unsafe(no_mangle)]
extern "C" fn x86_64_boot_main(protocol: u32, info_pa: u32, magic: u32) -> ! {
    // SAFETY: the assembly calls this function exactly once, on the only running CPU, and no
    // other reference to these statics exists yet (see `BootCell`).
    let (info, notes) = unsafe { (&mut *BOOT_INFO.0.get(), &mut *NOTES.0.get()) };
    let mem = IdentityMap {
        image: image_range(),
    };
    let info_pa = u64::from(info_pa);
    if protocol == ENTRY_MULTIBOOT2 {
        info.protocol = BootProtocol::Multiboot2;
        if magic == multiboot2::BOOTLOADER_MAGIC {
            multiboot2::parse(info_pa, &mem, info, notes);
        } else {
            notes.record(
                "Multiboot2 entry with a bad eax magic; information ignored",
                magic.into(),
            );
        }
    } else {
        // ENTRY_PVH: the only other value the assembly passes.
        info.protocol = BootProtocol::Pvh;
        pvh::parse(info_pa, &mem, info, notes);
    }
    (info.image_start, info.image_end) = mem.image;
    mark_in_use(info);
    info.rsdp = choose_rsdp(info.rsdp, &mem, notes, place_rsdp_copy);
    // Under UEFI the RSDP is often only the Multiboot2 copy, which lives in the image (that the
    // identity-map reader refuses): read it from the notes instead.
    notes.spcr = info.rsdp.map(|rsdp| match notes.rsdp_copy {
        Some(copy) if notes.rsdp_source == RsdpSource::ImageCopy => crate::spcr::spcr_uart(
            rsdp,
            &WithRsdpCopy {
                mem: &mem,
                at: rsdp,
                copy: copy.as_bytes(),
            },
        ),
        _ => crate::spcr::spcr_uart(rsdp, &mem),
    });
    let info: &'static BootInfo = info;
    // SAFETY: `hv_main` is defined by the kernel with exactly this signature (boot/src/lib.rs) and
    // its preconditions hold: boot CPU, paging on (identity map of 0-4 GiB), valid stack.
    unsafe { crate::hv_main(info) }
}

fn place_rsdp_copy(copy: &RsdpCopy) -> u64 {
    let dst = RSDP_COPY.0.get();
    let src = copy.as_bytes();
    // SAFETY: called at most once, from `x86_64_boot_main`, before any reader of the copy exists.
    unsafe { (&mut (*dst).0)[..src.len()].copy_from_slice(src) };
    dst as u64
}

/// What the boot path noticed (boot loader name, RSDP source, malformed input it worked around).
/// Valid once `hv_main` runs.
pub fn boot_notes() -> &'static BootNotes {
    // SAFETY: written only in `x86_64_boot_main` before `hv_main` is called; every caller runs
    // after that (the kernel is entered through `hv_main`), so only shared references remain.
    unsafe { &*NOTES.0.get() }
}

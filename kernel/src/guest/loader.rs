//! Builds a guest's initial memory image (docs/guests.md "Memory map" and "Entry state"): the
//! start-info page, the command line, a GDT, page tables identity-mapping the first 4 GiB, and
//! the ELF image's `PT_LOAD` segments.

use boot::guests::{ElfImage, Segment};
use hvabi::start_info as si;

use super::memory::GuestMemory;
use crate::vcpu::EntryState;

/// Guest-physical layout of what the loader writes (all below [`IMAGE_MIN`]).
pub const START_INFO: u64 = 0x1000;
pub const GDT: u64 = 0x2000;
pub const PML4: u64 = 0x3000;
#[cfg(target_arch = "x86_64")]
pub const PDPT: u64 = 0x4000;
/// Four page directories, 0x5000-0x8fff: 4 GiB in 2 MiB pages.
#[cfg(target_arch = "x86_64")]
pub const PD0: u64 = 0x5000;
pub const CMDLINE: u64 = 0x9000;
/// aarch64: the guest's emulated PCI configuration space (ECAM, PCIe 5.0 §7.2.2, buses 0-255 of
/// segment 0) in the Device part of the boot map; accesses trap to the hypervisor (stage 2 maps
/// nothing here) and are mediated (`pci.rs`).
pub const ECAM: u64 = 0x4000_0000;
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// Lowest address an image segment may use.
pub const IMAGE_MIN: u64 = 0x10000;
/// Bytes at the top of RAM kept for the initial stack.
pub const STACK_BYTES: u64 = 0x10000;

// x86-64 paging bits (SDM vol 3 §4.5): present, writable, page size.
#[cfg(target_arch = "x86_64")]
const P: u64 = 1;
#[cfg(target_arch = "x86_64")]
const RW: u64 = 2;
#[cfg(target_arch = "x86_64")]
const PS: u64 = 1 << 7;

/// Flat GDT: null, 64-bit code (selector 0x08), data (0x10); the descriptors SDM §3.4.5 and the
/// VMCB segment attributes the backend loads describe the same segments.
const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];

/// One assigned device as the start-info page describes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartDevice {
    pub segment: u16,
    pub bus: u8,
    pub devfn: u8,
    pub vendor: u16,
    pub device: u16,
    pub dev_id: u32,
    /// (guest-physical address, size) per BAR; (0, 0) when not mapped.
    pub bars: [(u64, u64); 6],
}

impl StartDevice {
    fn encode(&self) -> [u8; si::DEVICE_ENTRY] {
        let mut e = [0u8; si::DEVICE_ENTRY];
        e[0..2].copy_from_slice(&self.segment.to_le_bytes());
        e[2] = self.bus;
        e[3] = self.devfn;
        e[4..6].copy_from_slice(&self.vendor.to_le_bytes());
        e[6..8].copy_from_slice(&self.device.to_le_bytes());
        e[8..12].copy_from_slice(&self.dev_id.to_le_bytes());
        for (i, (gpa, size)) in self.bars.iter().enumerate() {
            let o = 16 + 16 * i;
            e[o..o + 8].copy_from_slice(&gpa.to_le_bytes());
            e[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        }
        e
    }
}

/// Writes everything into `mem` and returns the entry state, or why the image does not fit.
pub fn load(
    mem: &GuestMemory,
    elf: &ElfImage,
    cmdline: &str,
    devices: &[StartDevice],
    vcpu_count: u32,
) -> Result<EntryState, &'static str> {
    let size = mem.size();
    let stack_floor = size
        .checked_sub(STACK_BYTES)
        .ok_or("guest RAM is smaller than the stack")?;
    let mut free_start = IMAGE_MIN;
    for Segment { paddr, memsz, file } in elf.segments() {
        let end = paddr + memsz; // cannot overflow: checked by ElfImage::parse
        if paddr < IMAGE_MIN || end > stack_floor {
            return Err("image segment outside guest RAM [0x10000, RAM - 64 KiB)");
        }
        mem.write(paddr, file)
            .map_err(|_| "image segment outside guest RAM")?;
        // The rest up to memsz is .bss: guest RAM is zeroed when allocated.
        free_start = free_start.max(end.next_multiple_of(4096));
    }
    if elf.entry < IMAGE_MIN || elf.entry >= stack_floor {
        return Err("image entry point outside the loaded image range");
    }
    if cmdline.len() > si::CMDLINE_MAX {
        return Err("guest command line longer than 1024 bytes");
    }
    let err = |_| "guest RAM too small for the boot structures";
    mem.write(CMDLINE, cmdline.as_bytes()).map_err(err)?;
    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        mem.write_u64(GDT + 8 * i as u64, *d).map_err(err)?;
    }
    write_page_tables(mem).map_err(err)?;
    let mut info = [0u8; 40];
    info[si::OFF_MAGIC..si::OFF_MAGIC + 4].copy_from_slice(&si::MAGIC.to_le_bytes());
    info[si::OFF_VERSION..si::OFF_VERSION + 4].copy_from_slice(&si::VERSION.to_le_bytes());
    let fields = [
        (si::OFF_MEM_BYTES, size),
        (si::OFF_CMDLINE_GPA, CMDLINE),
        (si::OFF_CMDLINE_LEN, cmdline.len() as u64),
        (si::OFF_FREE_START, free_start),
    ];
    for (off, v) in fields {
        info[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    mem.write(START_INFO, &info).map_err(err)?;
    if devices.len() > si::MAX_DEVICES {
        return Err("more devices than the start-info page describes");
    }
    mem.write(
        START_INFO + si::OFF_DEVICE_COUNT as u64,
        &(devices.len() as u32).to_le_bytes(),
    )
    .map_err(err)?;
    mem.write(
        START_INFO + si::OFF_VCPU_COUNT as u64,
        &vcpu_count.to_le_bytes(),
    )
    .map_err(err)?;
    for (i, d) in devices.iter().enumerate() {
        let at = START_INFO + (si::OFF_DEVICES + i * si::DEVICE_ENTRY) as u64;
        mem.write(at, &d.encode()).map_err(err)?;
    }
    Ok(EntryState {
        entry: elf.entry,
        // x86_64: as if `call entry` had pushed a return address (the SysV ABI's alignment at
        // entry); aarch64: SP 16-byte aligned (AAPCS64).
        stack: if cfg!(target_arch = "x86_64") {
            size - 8
        } else {
            size
        },
        arg: START_INFO,
        page_table: PML4,
        gdt: (GDT, (GDT_ENTRIES.len() * 8 - 1) as u16),
        vcpu: 0,
        vcpu_count,
    })
}

/// The entry state of vCPU `index` of `count` (docs/guests.md "Several vCPUs"): vCPU 0's, with
/// the index in the second argument register and no stack (RSP/SP = 0): the guest gives each
/// further vCPU its own stack, so a guest that forgot to faults at its first push instead of
/// sharing vCPU 0's.
pub fn secondary_entry(first: &EntryState, index: u32, count: u32) -> EntryState {
    EntryState {
        stack: if index == 0 { first.stack } else { 0 },
        vcpu: index,
        vcpu_count: count,
        ..*first
    }
}

/// x86_64: PML4 -> PDPT -> four page directories identity-mapping 4 GiB with 2 MiB pages.
#[cfg(target_arch = "x86_64")]
fn write_page_tables(mem: &GuestMemory) -> Result<(), super::memory::GuestMemoryError> {
    mem.write_u64(PML4, PDPT | P | RW)?;
    for gib in 0..4u64 {
        let pd = PD0 + gib * 0x1000;
        mem.write_u64(PDPT + 8 * gib, pd | P | RW)?;
        for j in 0..512u64 {
            let pa = (gib << 30) | (j << 21);
            mem.write_u64(pd + 8 * j, pa | P | RW | PS)?;
        }
    }
    Ok(())
}

/// aarch64: one level-1 table at [`PML4`] (TCR_EL1.T0SZ = 32, 4 KiB granule: four 1 GiB
/// blocks, DDI 0487 D8.3) identity-mapping 4 GiB: the first GiB (all guest RAM, at most
/// [`MAX_GUEST_RAM`](super::memory::MAX_GUEST_RAM)) Normal write-back inner-shareable, the
/// rest Device-nGnRE and execute-never. MAIR indices are the page-table engine's
/// (`ARM_S1_MAIR`), which the backend programs into MAIR_EL1.
#[cfg(target_arch = "aarch64")]
fn write_page_tables(mem: &GuestMemory) -> Result<(), super::memory::GuestMemoryError> {
    use iommu::pgtable::format::arm_bits as b;
    let block = b::VALID | b::AF;
    let normal = block | (b::MAIR_IDX_WB << b::ATTRIDX_SHIFT) | b::SH_INNER;
    let device = block | (b::MAIR_IDX_DEVICE << b::ATTRIDX_SHIFT) | b::PXN | b::UXN;
    for gib in 0..4u64 {
        let attrs = if gib == 0 { normal } else { device };
        mem.write_u64(PML4 + 8 * gib, (gib << 30) | attrs)?;
    }
    Ok(())
}

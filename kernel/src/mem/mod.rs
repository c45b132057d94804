//! Memory: the frame allocator, the heap, and the physical-access edge.

pub mod dma;
pub mod frame;
pub mod heap;
pub mod iommu_mem;
pub mod phys;

use boot::BootInfo;

/// Heap size: 1/16 of free RAM, between 1 MiB and 64 MiB.
fn heap_size(free: u64) -> u64 {
    (free / 16).clamp(1 << 20, 64 << 20) & !(frame::PAGE_SIZE - 1)
}

/// Brings up the frame allocator and the heap. The direct map must already cover RAM.
pub fn init(info: &BootInfo, dtb_len: u64) -> Result<(), &'static str> {
    frame::init(info, dtb_len);
    let free = frame::FRAMES.lock().free_bytes();
    let size = heap_size(free);
    let bytes = phys::Frames::alloc(size / frame::PAGE_SIZE, 2 << 20, u64::MAX)
        .ok_or("no physical memory for the heap")?
        .leak();
    if !heap::init(bytes) {
        return Err("heap initialised twice");
    }
    let ram_end = info
        .memory_regions()
        .iter()
        .filter(|r| r.kind == boot::MemoryKind::Usable)
        .map(|r| r.end())
        .max()
        .unwrap_or(0)
        .min(crate::arch::direct_map_limit());
    phys::init_atomic(ram_end).map_err(|_| "no physical memory for the IOMMU-memory bitmap")?;
    Ok(())
}

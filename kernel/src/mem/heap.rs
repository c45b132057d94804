//! The general heap (`linked_list_allocator`): boot and control paths only.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Hands `[virt, virt + size)` to the heap. Called once, with memory from the frame allocator
/// reached through the direct map.
pub fn init(virt: usize, size: usize) {
    // SAFETY: the range is fresh frames from the frame allocator, mapped read-write in the direct
    // map and owned by nobody else; `init` runs once on the boot CPU before any allocation.
    unsafe { HEAP.lock().init(virt as *mut u8, size) };
}

pub fn stats() -> (usize, usize) {
    let h = HEAP.lock();
    (h.used(), h.size())
}

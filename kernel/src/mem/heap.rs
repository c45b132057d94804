//! The general heap (`linked_list_allocator`): boot and control paths only.

use core::sync::atomic::{AtomicBool, Ordering};
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Hands `mem` to the heap for good (frames leaked from the frame allocator). Only the first
/// call takes effect; later ones are refused with `false` (the allocator may be initialised once).
pub fn init(mem: &'static mut [u8]) -> bool {
    if INITIALISED.swap(true, Ordering::AcqRel) {
        return false;
    }
    // SAFETY: `mem` is exclusively owned for the rest of the program (a `'static mut` borrow),
    // so nothing else can touch it; `INITIALISED` makes this the only `init` of the empty heap.
    unsafe { HEAP.lock().init(mem.as_mut_ptr(), mem.len()) };
    true
}

pub fn stats() -> (usize, usize) {
    let h = HEAP.lock();
    (h.used(), h.size())
}

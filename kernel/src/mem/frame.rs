//! The physical frame allocator, built from the boot memory map.
//!
//! Free memory is a small sorted list of page-aligned ranges; allocation carves from the lowest
//! range that fits (with alignment), and freeing merges back. It serves boot and control paths
//! (heap, firmware blobs, IOMMU tables); the map hot path gets table pages from per-CPU pools that
//! are refilled from here, never from the general heap.

use boot::{BootInfo, MemoryKind};
use spin::Mutex;

pub const PAGE_SIZE: u64 = 4096;
const MAX_RANGES: usize = 128;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
}

/// Free physical memory as disjoint, sorted, page-aligned ranges.
pub struct FrameAllocator {
    ranges: [Range; MAX_RANGES],
    count: usize,
    /// Bytes lost because the range table was full (reported in the boot log).
    pub dropped: u64,
    pub total: u64,
    pub allocated: u64,
}

impl FrameAllocator {
    pub const fn new() -> Self {
        Self {
            ranges: [Range { start: 0, end: 0 }; MAX_RANGES],
            count: 0,
            dropped: 0,
            total: 0,
            allocated: 0,
        }
    }

    /// Adds `[start, end)` shrunk to page boundaries, merging with neighbours.
    pub fn add(&mut self, start: u64, end: u64) {
        let start = start.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = end & !(PAGE_SIZE - 1);
        if start >= end {
            return;
        }
        self.total += end - start;
        self.insert(Range { start, end });
    }

    fn insert(&mut self, r: Range) {
        let i = self.ranges[..self.count].partition_point(|x| x.start < r.start);
        // Merge with the previous and/or next range when they touch.
        let merge_prev = i > 0 && self.ranges[i - 1].end == r.start;
        let merge_next = i < self.count && self.ranges[i].start == r.end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ranges[i - 1].end = self.ranges[i].end;
                self.remove_at(i);
            }
            (true, false) => self.ranges[i - 1].end = r.end,
            (false, true) => self.ranges[i].start = r.start,
            (false, false) => {
                if self.count == MAX_RANGES {
                    self.dropped += r.end - r.start;
                    return;
                }
                self.ranges.copy_within(i..self.count, i + 1);
                self.ranges[i] = r;
                self.count += 1;
            }
        }
    }

    fn remove_at(&mut self, i: usize) {
        self.ranges.copy_within(i + 1..self.count, i);
        self.count -= 1;
    }

    /// Removes `[start, end)` from the free set (for reservations: the image, the DTB, modules).
    pub fn reserve(&mut self, start: u64, end: u64) {
        let start = start & !(PAGE_SIZE - 1);
        let end = end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let mut i = 0;
        while i < self.count {
            let r = self.ranges[i];
            if r.end <= start || r.start >= end {
                i += 1;
                continue;
            }
            self.total -= r.end.min(end) - r.start.max(start);
            self.remove_at(i);
            if r.start < start {
                self.insert(Range {
                    start: r.start,
                    end: start,
                });
                i += 1;
            }
            if r.end > end {
                self.insert(Range {
                    start: end,
                    end: r.end,
                });
                i += 1;
            }
        }
    }

    /// Allocates `pages` contiguous frames aligned to `align` bytes (a power of two >= 4 KiB),
    /// below `limit`. The memory is not zeroed.
    pub fn alloc(&mut self, pages: u64, align: u64, limit: u64) -> Option<u64> {
        let align = align.max(PAGE_SIZE);
        if !align.is_power_of_two() || pages == 0 {
            return None;
        }
        let size = pages.checked_mul(PAGE_SIZE)?;
        for i in 0..self.count {
            let r = self.ranges[i];
            let start = r.start.checked_add(align - 1)? & !(align - 1);
            let end = start.checked_add(size)?;
            if end <= r.end && end <= limit {
                self.remove_at(i);
                if r.start < start {
                    self.insert(Range {
                        start: r.start,
                        end: start,
                    });
                }
                if end < r.end {
                    self.insert(Range {
                        start: end,
                        end: r.end,
                    });
                }
                self.total -= size;
                self.allocated += size;
                return Some(start);
            }
        }
        None
    }

    #[cfg_attr(target_arch = "x86_64", allow(dead_code))] // fw_cfg (aarch64) is the first user
    pub fn free(&mut self, start: u64, pages: u64) {
        let size = pages * PAGE_SIZE;
        self.allocated = self.allocated.saturating_sub(size);
        self.total += size;
        self.insert(Range {
            start,
            end: start + size,
        });
    }

    pub fn free_bytes(&self) -> u64 {
        self.total
    }
}

impl Default for FrameAllocator {
    fn default() -> Self {
        Self::new()
    }
}

pub static FRAMES: Mutex<FrameAllocator> = Mutex::new(FrameAllocator::new());

/// Builds the allocator from the boot memory map: usable RAM minus the image, the DTB, boot
/// modules and the first MiB (BIOS data, real-mode IVT, PVH start info live there on x86).
pub fn init(info: &BootInfo, dtb_len: u64) {
    let mut f = FRAMES.lock();
    for r in info
        .memory_regions()
        .iter()
        .filter(|r| r.kind == MemoryKind::Usable)
    {
        f.add(r.start, r.end());
    }
    for r in info
        .memory_regions()
        .iter()
        .filter(|r| r.kind != MemoryKind::Usable)
    {
        f.reserve(r.start, r.end());
    }
    f.reserve(0, 0x10_0000);
    f.reserve(info.image_start, info.image_end);
    if let Some(dtb) = info.dtb {
        f.reserve(dtb, dtb + dtb_len.max(PAGE_SIZE));
    }
    for m in info.modules() {
        f.reserve(m.start, m.start + m.len);
    }
}

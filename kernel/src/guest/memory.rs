//! Guest-physical memory: each guest's RAM is its own run of frames from the frame allocator
//! (never the heap, never shared with another guest or the hypervisor), zeroed before the guest
//! sees it and returned when the guest is gone.
//!
//! [`GuestMemory`] is the guest's memory map (GPA ranges and the frames behind them) and the only
//! way the hypervisor reads or writes guest memory: every access is bounds-checked against the
//! map, so a guest-supplied GPA can never reach a frame the guest does not own. The vCPU backend
//! builds its second-stage table from [`GuestMemory::regions`]; the object model's IOAS_MAP will
//! check GPAs against the same map.

use crate::mem::frame::{FRAMES, PAGE_SIZE};
use crate::mem::phys;

/// A run of contiguous, zeroed frames owned by one object; freed on drop.
pub struct Frames {
    pa: u64,
    pages: u64,
    bytes: &'static mut [u8],
}

impl Frames {
    /// `pages` zeroed frames aligned to `align` bytes, or `None` when memory is short.
    pub fn alloc(pages: u64, align: u64) -> Option<Frames> {
        let pa = FRAMES.lock().alloc(pages, align, u64::MAX)?;
        match phys::frame_bytes_mut(pa, pages * PAGE_SIZE) {
            Ok(bytes) => {
                bytes.fill(0);
                Some(Frames { pa, pages, bytes })
            }
            Err(_) => {
                FRAMES.lock().free(pa, pages);
                None
            }
        }
    }

    pub fn pa(&self) -> u64 {
        self.pa
    }

    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        // Scrub before the frames go back: the next owner may be another guest's RAM or a table
        // a device walks, and nothing of this owner's data may leak there.
        self.bytes.fill(0);
        FRAMES.lock().free(self.pa, self.pages);
    }
}

/// One RAM region of a guest: `[gpa, gpa + len)` backed by `frames`.
pub struct RamRegion {
    pub gpa: u64,
    frames: Frames,
}

impl RamRegion {
    pub fn len(&self) -> u64 {
        self.frames.len()
    }

    /// Host-physical address of the first byte (for the second-stage table only).
    pub fn pa(&self) -> u64 {
        self.frames.pa()
    }
}

/// Why a guest-memory access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMemoryError {
    pub gpa: u64,
    pub len: u64,
}

impl core::fmt::Display for GuestMemoryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "guest-physical range {:#x}+{:#x} is not guest RAM",
            self.gpa, self.len
        )
    }
}

/// The guest's RAM. Today one region at GPA 0 (docs/guests.md "Memory map"); the type keeps a
/// list so device BAR windows and holes can join it without changing its users.
pub struct GuestMemory {
    regions: alloc::vec::Vec<RamRegion>,
}

/// Largest guest RAM accepted (the guest's boot page tables identity-map 4 GiB).
pub const MAX_GUEST_RAM: u64 = 1 << 30;

impl GuestMemory {
    /// `bytes` of RAM at GPA 0, 2 MiB-aligned in host memory so the second stage can use 2 MiB
    /// leaves. `bytes` must be a non-zero multiple of 2 MiB no larger than [`MAX_GUEST_RAM`].
    pub fn new(bytes: u64) -> Result<GuestMemory, &'static str> {
        if bytes == 0 || !bytes.is_multiple_of(2 << 20) || bytes > MAX_GUEST_RAM {
            return Err("guest RAM must be a multiple of 2 MiB between 2 MiB and 1 GiB");
        }
        let frames = Frames::alloc(bytes / PAGE_SIZE, 2 << 20).ok_or("not enough free memory")?;
        let mut regions = alloc::vec::Vec::new();
        regions
            .try_reserve_exact(1)
            .map_err(|_| "out of heap for the memory map")?;
        regions.push(RamRegion { gpa: 0, frames });
        Ok(GuestMemory { regions })
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len()).sum()
    }

    /// Whether `[gpa, gpa + len)` lies entirely in one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.locate(gpa, len).is_some()
    }

    fn locate(&self, gpa: u64, len: u64) -> Option<(usize, usize)> {
        let end = gpa.checked_add(len)?;
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (gpa >= r.gpa && end <= r.gpa + r.len()).then(|| (i, (gpa - r.gpa) as usize))
        })
    }

    /// Copies guest memory at `gpa` into `out`.
    ///
    /// The guest is not running while the hypervisor handles its exit (one CPU runs it), so a
    /// plain copy sees a stable snapshot; with SMP guests this becomes a racy-copy primitive.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        let err = GuestMemoryError {
            gpa,
            len: out.len() as u64,
        };
        let (i, off) = self.locate(gpa, out.len() as u64).ok_or(err)?;
        out.copy_from_slice(&self.regions[i].frames.bytes()[off..off + out.len()]);
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let err = GuestMemoryError {
            gpa,
            len: data.len() as u64,
        };
        let (i, off) = self.locate(gpa, data.len() as u64).ok_or(err)?;
        self.regions[i].frames.bytes_mut()[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn write_u64(&mut self, gpa: u64, v: u64) -> Result<(), GuestMemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

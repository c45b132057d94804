//! Guest-physical memory: each guest's RAM is its own run of frames from the frame allocator
//! (never the heap, never shared with another guest or the hypervisor), zeroed before the guest
//! sees it and returned when the guest is gone.
//!
//! [`GuestMemory`] is the guest's memory map (GPA ranges and the frames behind them) and the only
//! way the hypervisor reads or writes guest memory: every access is bounds-checked against the
//! map, so a guest-supplied GPA can never reach a frame the guest does not own. The vCPU backend
//! builds its second-stage table from [`GuestMemory::regions`]; the object model's IOAS_MAP will
//! check GPAs against the same map.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::mem::frame::PAGE_SIZE;
use crate::mem::phys;

/// A run of contiguous, zeroed frames owned by one object; freed (scrubbed) on drop.
///
/// The contents are reached as 64-bit atomics, never as `&mut [u8]`: guest RAM is written by the
/// guest (and, later, by its devices' DMA and other CPUs) while the hypervisor holds this object,
/// so the hypervisor's view must tolerate concurrent writers. Relaxed ordering is enough: the
/// hypervisor only copies bytes in and out and orders nothing else against them (a vCPU is
/// stopped while its exit is handled; VMRUN/#VMEXIT are serializing).
pub struct Frames {
    /// `Some` until drop hands the token back to the allocator.
    frames: Option<phys::Frames>,
}

impl Frames {
    /// `pages` zeroed frames aligned to `align` bytes, or `None` when memory is short.
    pub fn alloc(pages: u64, align: u64) -> Option<Frames> {
        let f = Frames {
            frames: Some(phys::Frames::alloc(pages, align, u64::MAX)?),
        };
        f.fill(0);
        Some(f)
    }

    fn token(&self) -> &phys::Frames {
        self.frames.as_ref().expect("guest frames used after drop")
    }

    fn words(&self) -> &[AtomicU64] {
        self.token().words()
    }

    pub fn pa(&self) -> u64 {
        self.token().pa()
    }

    pub fn len(&self) -> u64 {
        self.token().len()
    }

    /// Sets every byte to `byte`.
    #[cfg_attr(
        target_arch = "aarch64",
        allow(dead_code, reason = "SVM permission maps only")
    )]
    pub fn fill_bytes(&self, byte: u8) {
        self.fill(u64::from_ne_bytes([byte; 8]));
    }

    fn fill(&self, word: u64) {
        for w in self.words() {
            w.store(word, Relaxed);
        }
    }

    /// The 64-bit words at byte offsets `offs` (8-aligned, inside the run: a caller's constant,
    /// such as a VMCB field offset), with one lookup of the frames for all of them: the exit
    /// path reads its fields this way.
    #[cfg_attr(
        target_arch = "aarch64",
        allow(dead_code, reason = "SVM VMCB fields only")
    )]
    pub fn load_u64s<const N: usize>(&self, offs: [usize; N]) -> [u64; N] {
        let words = self.words();
        let mut out = [0; N];
        for (v, off) in out.iter_mut().zip(offs) {
            debug_assert!(off.is_multiple_of(8));
            *v = words[off / 8].load(Relaxed);
        }
        out
    }

    /// Stores `(offset, value)` words (offsets as in [`Frames::load_u64s`]) with one lookup.
    #[cfg_attr(
        target_arch = "aarch64",
        allow(dead_code, reason = "SVM VMCB fields only")
    )]
    pub fn store_u64s<const N: usize>(&self, stores: [(usize, u64); N]) {
        let words = self.words();
        for (off, v) in stores {
            debug_assert!(off.is_multiple_of(8));
            words[off / 8].store(v, Relaxed);
        }
    }

    /// Copies `out.len()` bytes from offset `off` (bounds checked by the caller): the bytes of
    /// a partial first word, then one word load per 8 bytes, then a partial last word. The
    /// hypercall path copies every argument struct and batch array through here (a load per
    /// byte was a fifth of a hypercall's instructions).
    pub fn read(&self, off: usize, out: &mut [u8]) {
        let words = self.words();
        // Little-endian: byte k of guest memory is bits 8k.. of its word.
        let head = ((8 - off % 8) % 8).min(out.len());
        let (first, rest) = out.split_at_mut(head);
        if !first.is_empty() {
            let b = words[off / 8].load(Relaxed).to_le_bytes();
            first.copy_from_slice(&b[off % 8..off % 8 + head]);
        }
        let base = (off + head) / 8;
        let whole = rest.len() / 8;
        let mut chunks = rest.chunks_exact_mut(8);
        for (k, chunk) in (&mut chunks).enumerate() {
            chunk.copy_from_slice(&words[base + k].load(Relaxed).to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let b = words[base + whole].load(Relaxed).to_le_bytes();
            tail.copy_from_slice(&b[..tail.len()]);
        }
    }

    /// Loads `out.len()` little-endian words from offset `off` (bounds checked by the caller):
    /// one atomic load each when `off` is 8-aligned (argument structs are, in practice),
    /// through [`Frames::read`] otherwise.
    pub fn read_words(&self, off: usize, out: &mut [u64]) {
        if !off.is_multiple_of(8) {
            let mut b = [0u8; 8];
            for (k, w) in out.iter_mut().enumerate() {
                self.read(off + 8 * k, &mut b);
                *w = u64::from_le_bytes(b);
            }
            return;
        }
        let words = &self.words()[off / 8..off / 8 + out.len()];
        for (w, src) in out.iter_mut().zip(words) {
            *w = src.load(Relaxed);
        }
    }

    /// Stores little-endian words at offset `off` (bounds checked by the caller): one atomic
    /// store each when `off` is 8-aligned, through [`Frames::write`] otherwise.
    pub fn write_words(&self, off: usize, data: &[u64]) {
        if !off.is_multiple_of(8) {
            for (k, w) in data.iter().enumerate() {
                self.write(off + 8 * k, &w.to_le_bytes());
            }
            return;
        }
        let words = &self.words()[off / 8..off / 8 + data.len()];
        for (dst, &w) in words.iter().zip(data) {
            dst.store(w, Relaxed);
        }
    }

    /// Copies `data` to offset `off` (bounds checked by the caller). Whole words are stored;
    /// partial words are merged with compare-and-swap so that a concurrent writer of the other
    /// bytes of the word is never undone.
    pub fn write(&self, off: usize, data: &[u8]) {
        let words = self.words();
        let merge = |word: usize, shift: usize, bytes: &[u8]| {
            let mut v = [0u8; 8];
            v[shift..shift + bytes.len()].copy_from_slice(bytes);
            let bits = u64::from_le_bytes(v);
            let mask = (u64::MAX >> (64 - 8 * bytes.len() as u32)) << (8 * shift as u32);
            let _ = words[word].fetch_update(Relaxed, Relaxed, |old| Some(old & !mask | bits));
        };
        let head = ((8 - off % 8) % 8).min(data.len());
        let (first, rest) = data.split_at(head);
        if !first.is_empty() {
            merge(off / 8, off % 8, first);
        }
        let base = (off + head) / 8;
        let mut chunks = rest.chunks_exact(8);
        for (k, chunk) in (&mut chunks).enumerate() {
            let mut v = [0u8; 8];
            v.copy_from_slice(chunk);
            words[base + k].store(u64::from_le_bytes(v), Relaxed);
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            merge(base + rest.len() / 8, 0, tail);
        }
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        // Scrub before the frames go back: the next owner may be another guest's RAM or a table
        // a device walks, and nothing of this owner's data may leak there.
        self.fill(0);
        if let Some(f) = self.frames.take() {
            f.free();
        }
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

    /// The frames holding `[gpa, gpa + len)` and the offset of `gpa` in them.
    fn locate(&self, gpa: u64, len: u64) -> Option<(&Frames, usize)> {
        let end = gpa.checked_add(len)?;
        self.regions.iter().find_map(|r| {
            (gpa >= r.gpa && end <= r.gpa + r.len()).then(|| (&r.frames, (gpa - r.gpa) as usize))
        })
    }

    /// Copies guest memory at `gpa` into `out`.
    ///
    /// The guest is not running while the hypervisor handles its exit (one CPU runs it), so the
    /// copy is a stable snapshot; once guests have several vCPUs or DMA, it is a racy copy
    /// (each byte is some value that was written), which is all a hypervisor may assume about
    /// memory a guest controls: callers copy first, then validate the copy.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        let err = GuestMemoryError {
            gpa,
            len: out.len() as u64,
        };
        let (frames, off) = self.locate(gpa, out.len() as u64).ok_or(err)?;
        frames.read(off, out);
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let err = GuestMemoryError {
            gpa,
            len: data.len() as u64,
        };
        let (frames, off) = self.locate(gpa, data.len() as u64).ok_or(err)?;
        frames.write(off, data);
        Ok(())
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), GuestMemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// The object model's view of a guest's memory (`iommu::iommufd::GuestMemory`): IOAS_MAP of a
/// GPA the guest does not own fails, and the host-physical runs it maps stay valid for as long
/// as the guest exists (its RAM is freed only after its vCPU and VM are destroyed).
impl iommu::iommufd::GuestMemory for GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), iommu::iommufd::MemFault> {
        GuestMemory::read(self, gpa, buf).map_err(|_| iommu::iommufd::MemFault)
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), iommu::iommufd::MemFault> {
        GuestMemory::write(self, gpa, buf).map_err(|_| iommu::iommufd::MemFault)
    }

    fn read_words(&self, gpa: u64, buf: &mut [u64]) -> Result<(), iommu::iommufd::MemFault> {
        let (frames, off) = self
            .locate(gpa, 8 * buf.len() as u64)
            .ok_or(iommu::iommufd::MemFault)?;
        frames.read_words(off, buf);
        Ok(())
    }

    fn write_words(&self, gpa: u64, buf: &[u64]) -> Result<(), iommu::iommufd::MemFault> {
        let (frames, off) = self
            .locate(gpa, 8 * buf.len() as u64)
            .ok_or(iommu::iommufd::MemFault)?;
        frames.write_words(off, buf);
        Ok(())
    }

    fn owns(&self, gpa: u64, len: u64, _write: bool) -> bool {
        self.contains(gpa, len)
    }

    fn translate(&self, gpa: u64) -> Option<iommu::iommufd::HostRun> {
        self.regions.iter().find_map(|r| {
            let off = gpa.checked_sub(r.gpa)?;
            (off < r.len()).then(|| iommu::iommufd::HostRun {
                hpa: r.pa() + off,
                len: r.len() - off,
            })
        })
    }
}

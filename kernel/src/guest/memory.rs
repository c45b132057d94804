//! Guest-physical memory: each guest's RAM is its own run of frames from the frame allocator
//! (never the heap, never shared with another guest or the hypervisor), zeroed before the guest
//! sees it and returned when the guest is gone.
//!
//! [`GuestMemory`] is the guest's memory map (GPA ranges and the frames behind them) and the only
//! way the hypervisor reads or writes guest memory: every access is bounds-checked against the
//! map, so a guest-supplied GPA can never reach a frame the guest does not own. The vCPU backend
//! builds its second-stage table from [`GuestMemory::regions`]; the object model's IOAS_MAP
//! checks GPAs against the same map and maps the host runs [`GuestMemory`] translates them to.

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

/// One RAM region of a guest: `[gpa, gpa + len)`, host-physical `[pa, pa + len)`, held either
/// by the guest's block (at byte `off` in it) or by frames of its own (`own`, at `off` in them).
pub struct RamRegion {
    pub gpa: u64,
    len: u64,
    pa: u64,
    off: usize,
    /// `None`: the region is part of [`GuestMemory`]'s block.
    own: Option<Frames>,
}

impl RamRegion {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Host-physical address of the first byte (for the second-stage table only).
    pub fn pa(&self) -> u64 {
        self.pa
    }

    fn end(&self) -> u64 {
        self.gpa + self.len
    }

    fn holds(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
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

/// Why guest RAM could not be made: the configuration key concerned and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfigError {
    pub key: &'static str,
    pub why: &'static str,
}

impl core::fmt::Display for MemoryConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.key, self.why)
    }
}

/// What a `scatter=` window's host frames look like, computed from the frames themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScatterLayout {
    pub gpa: u64,
    pub size: u64,
    /// Host-contiguous runs the window's pages form in GPA order (a run continues while the
    /// next page's host address follows the previous page's).
    pub host_runs: u64,
    /// Pairs of the window's frames that are adjacent in host-physical memory, in any order.
    pub adjacent_pairs: u64,
}

/// The guest's RAM: `[0, mem)`, as regions sorted by GPA, disjoint and together covering it.
/// Without `scatter=` one region, the whole block (2 MiB-aligned, host-contiguous). With
/// `scatter=GPA+SIZE` the block's region is cut around the window and each page of the window
/// is a region of its own, backed by its own allocation (docs/guests.md "Memory map"); the
/// block's bytes under the window stay allocated (scrubbed on drop like the rest) and unused,
/// so the block's regions keep their 2 MiB-aligned host addresses for the second stage.
pub struct GuestMemory {
    /// Every region, sorted by GPA. Region 0 starts at GPA 0 and the last one ends at the top
    /// of RAM: a guest's image and stack, where the argument structs of hypercalls normally
    /// live, are in those two, and [`GuestMemory::locate`] checks them before any search.
    regions: alloc::vec::Vec<RamRegion>,
    /// The host-contiguous block of `mem=` bytes behind the block's regions.
    block: Frames,
    scatter: Option<ScatterLayout>,
}

/// Largest guest RAM accepted (the guest's boot page tables identity-map 4 GiB).
pub const MAX_GUEST_RAM: u64 = 1 << 30;

impl GuestMemory {
    /// `bytes` of RAM at GPA 0, 2 MiB-aligned in host memory so the second stage can use 2 MiB
    /// leaves. `bytes` must be a non-zero multiple of 2 MiB no larger than [`MAX_GUEST_RAM`].
    /// With `scatter`, that window is backed by separate host pages (the type's comment).
    pub fn new(
        bytes: u64,
        scatter: Option<boot::guests::Scatter>,
    ) -> Result<GuestMemory, MemoryConfigError> {
        let mem = |why| MemoryConfigError { key: "mem", why };
        let scat = |why| MemoryConfigError {
            key: "scatter",
            why,
        };
        if bytes == 0 || !bytes.is_multiple_of(2 << 20) || bytes > MAX_GUEST_RAM {
            return Err(mem(
                "guest RAM must be a multiple of 2 MiB between 2 MiB and 1 GiB",
            ));
        }
        // The parser checked the window; checked again here, where it decides what memory is
        // allocated (this type trusts no caller with the guest's memory map).
        if let Some(w) = scatter {
            if w.size == 0 || !w.gpa.is_multiple_of(PAGE_SIZE) || !w.size.is_multiple_of(PAGE_SIZE)
            {
                return Err(scat(
                    "the window must be a non-empty multiple of 4 KiB at a 4 KiB-aligned GPA",
                ));
            }
            if w.size > boot::guests::MAX_SCATTER {
                return Err(scat("the window is larger than 16M"));
            }
            if w.gpa.checked_add(w.size).is_none_or(|end| end > bytes) {
                return Err(scat("the window is not inside the guest's RAM (mem=)"));
            }
        }
        let block =
            Frames::alloc(bytes / PAGE_SIZE, 2 << 20).ok_or(mem("not enough free memory"))?;
        let pages = scatter.map_or(0, |w| w.size / PAGE_SIZE) as usize;
        let mut regions = alloc::vec::Vec::new();
        regions
            .try_reserve_exact(pages + 2)
            .map_err(|_| mem("out of heap for the memory map"))?;
        let Some(w) = scatter else {
            regions.push(RamRegion {
                gpa: 0,
                len: bytes,
                pa: block.pa(),
                off: 0,
                own: None,
            });
            return Ok(GuestMemory {
                regions,
                block,
                scatter: None,
            });
        };
        let of_block = |gpa: u64, len: u64| RamRegion {
            gpa,
            len,
            pa: block.pa() + gpa,
            off: gpa as usize,
            own: None,
        };
        if w.gpa > 0 {
            regions.push(of_block(0, w.gpa));
        }
        // Each page: an allocation of two frames, the page and a spacer after it, so no two
        // pages of the window are adjacent in host memory whatever order the allocator hands
        // them out in (8 KiB apart at least). Two-frame allocations carve the allocator's free
        // ranges from their start and free back into one range (`mem::frame`: its range list
        // is short), where 8 KiB-aligned single frames would leave a free hole beside each.
        // The pages are used in the reverse of the allocation order, so host addresses fall
        // as GPAs rise (the allocator hands them out rising): no host run spans two pages.
        for _ in 0..pages {
            let frames = Frames::alloc(2, PAGE_SIZE).ok_or(scat("not enough free memory"))?;
            regions.push(RamRegion {
                gpa: 0,
                len: PAGE_SIZE,
                pa: frames.pa(),
                off: 0,
                own: Some(frames),
            });
        }
        let first = regions.len() - pages;
        regions[first..].reverse();
        for (k, r) in regions[first..].iter_mut().enumerate() {
            r.gpa = w.gpa + k as u64 * PAGE_SIZE;
        }
        let end = w.gpa + w.size;
        if end < bytes {
            regions.push(of_block(end, bytes - end));
        }
        let mut m = GuestMemory {
            regions,
            block,
            scatter: None,
        };
        m.scatter = Some(m.layout(w.gpa, w.size).map_err(scat)?);
        Ok(m)
    }

    /// The host layout of the window `[gpa, gpa + size)`. The runs are counted by walking the
    /// window as IOAS_MAP does, with `translate_next` (each answer checked against
    /// `translate`, which must agree whatever the cursor), merging runs that happen to follow
    /// each other in host memory; the adjacent pairs from the frames' host addresses sorted.
    fn layout(&self, gpa: u64, size: u64) -> Result<ScatterLayout, &'static str> {
        use iommu::iommufd::GuestMemory as _;
        let end = gpa + size;
        let (mut at, mut cursor, mut host_runs) = (gpa, 0, 0u64);
        let mut prev_end = None;
        while at < end {
            let run = self
                .translate_next(at, &mut cursor)
                .ok_or("a page has no host run")?;
            if self.translate(at) != Some(run) {
                return Err("translate_next and translate disagree");
            }
            if prev_end != Some(run.hpa) {
                host_runs += 1;
            }
            let n = run.len.min(end - at);
            prev_end = Some(run.hpa + n);
            at += n;
        }
        let mut pas: alloc::vec::Vec<(u64, u64)> = self
            .regions
            .iter()
            .filter(|r| r.gpa >= gpa && r.end() <= end)
            .map(|r| (r.pa, r.len))
            .collect();
        pas.sort_unstable();
        let adjacent_pairs = pas.windows(2).filter(|p| p[0].0 + p[0].1 == p[1].0).count() as u64;
        Ok(ScatterLayout {
            gpa,
            size,
            host_runs,
            adjacent_pairs,
        })
    }

    /// The `scatter=` window's host layout, if the guest has one.
    pub fn scatter(&self) -> Option<ScatterLayout> {
        self.scatter
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len()).sum()
    }

    /// Whether `[gpa, gpa + len)` lies entirely in guest RAM (in one region or in regions that
    /// follow each other).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.locate(gpa, len).is_some() || self.covered(gpa, len).is_some()
    }

    #[inline(always)]
    fn frames_of<'a>(&'a self, r: &'a RamRegion) -> &'a Frames {
        r.own.as_ref().unwrap_or(&self.block)
    }

    /// The frames holding `[gpa, gpa + len)` and the offset of `gpa` in them, when one region
    /// holds all of it. This is every hypercall's argument read: region 0 (all of RAM without
    /// `scatter=`) and the last region (with it, the guest's stack at the top of RAM,
    /// docs/guests.md "Entry state") are checked inline, as the one region was before there
    /// could be several; the binary search over the others is out of line.
    #[inline(always)]
    fn locate(&self, gpa: u64, len: u64) -> Option<(&Frames, usize)> {
        let end = gpa.checked_add(len)?;
        let inside = |r: &RamRegion| gpa >= r.gpa && end <= r.end();
        let r = match (self.regions.first()?, self.regions.last()?) {
            (r0, _) if inside(r0) => r0,
            (_, last) if inside(last) => last,
            _ => &self.regions[self.search(gpa)?],
        };
        (end <= r.end()).then(|| (self.frames_of(r), r.off + (gpa - r.gpa) as usize))
    }

    /// The index of the region holding `gpa`: the first and the last region inline (all of
    /// RAM without `scatter=`; with it, where a guest's image and stack are, so what it hands
    /// the hypervisor outside the window is found as cheaply as without), the others by
    /// [`GuestMemory::search`].
    #[inline(always)]
    fn find(&self, gpa: u64) -> Option<usize> {
        let last = self.regions.len().checked_sub(1)?;
        if self.regions[0].holds(gpa) {
            Some(0)
        } else if self.regions[last].holds(gpa) {
            Some(last)
        } else {
            self.search(gpa)
        }
    }

    /// Binary search over the regions (sorted by GPA) for the one holding `gpa`.
    #[inline(never)]
    fn search(&self, gpa: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        self.regions[i].holds(gpa).then_some(i)
    }

    /// The first of the regions that hold `[gpa, gpa + len)` together (each starting where the
    /// one before ends), if they do; for a range across region boundaries.
    fn covered(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        let first = self.find(gpa)?;
        let mut reach = self.regions[first].end();
        let mut next = first + 1;
        while reach < end {
            let r = self.regions.get(next)?;
            if r.gpa != reach {
                return None;
            }
            reach = r.end();
            next += 1;
        }
        Some(first)
    }

    /// Calls `f(frames, offset in them, offset in the range, bytes)` for each region's part of
    /// `[gpa, gpa + len)` in order; `first` from [`GuestMemory::covered`].
    fn pieces(
        &self,
        first: usize,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(&Frames, usize, usize, usize),
    ) {
        let mut done = 0;
        for r in &self.regions[first..] {
            if done == len {
                break;
            }
            let at = gpa + done - r.gpa;
            let n = (r.len - at).min(len - done);
            f(
                self.frames_of(r),
                r.off + at as usize,
                done as usize,
                n as usize,
            );
            done += n;
        }
    }

    /// Copies guest memory at `gpa` into `out`.
    ///
    /// The guest is not running while the hypervisor handles its exit (one CPU runs it), so the
    /// copy is a stable snapshot; once guests have several vCPUs or DMA, it is a racy copy
    /// (each byte is some value that was written), which is all a hypervisor may assume about
    /// memory a guest controls: callers copy first, then validate the copy.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        let len = out.len() as u64;
        if let Some((frames, off)) = self.locate(gpa, len) {
            frames.read(off, out);
            return Ok(());
        }
        let first = self
            .covered(gpa, len)
            .ok_or(GuestMemoryError { gpa, len })?;
        self.pieces(first, gpa, len, |frames, off, at, n| {
            frames.read(off, &mut out[at..at + n]);
        });
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`: all of it, or nothing if any of the range is
    /// not guest RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let len = data.len() as u64;
        if let Some((frames, off)) = self.locate(gpa, len) {
            frames.write(off, data);
            return Ok(());
        }
        let first = self
            .covered(gpa, len)
            .ok_or(GuestMemoryError { gpa, len })?;
        self.pieces(first, gpa, len, |frames, off, at, n| {
            frames.write(off, &data[at..at + n]);
        });
        Ok(())
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), GuestMemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// The host run at `gpa` in region `i` (which holds it).
    #[inline(always)]
    fn run_at(&self, i: usize, gpa: u64) -> iommu::iommufd::HostRun {
        let r = &self.regions[i];
        let off = gpa - r.gpa;
        iommu::iommufd::HostRun {
            hpa: r.pa + off,
            len: r.len - off,
        }
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
        let len = 8 * buf.len() as u64;
        if let Some((frames, off)) = self.locate(gpa, len) {
            frames.read_words(off, buf);
            return Ok(());
        }
        // Across regions (rare: an argument array over the edge of a `scatter=` page): word by
        // word through the byte path, once the whole range is known to be RAM.
        if !self.contains(gpa, len) {
            return Err(iommu::iommufd::MemFault);
        }
        for (k, w) in buf.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            GuestMemory::read(self, gpa + 8 * k as u64, &mut b)
                .map_err(|_| iommu::iommufd::MemFault)?;
            *w = u64::from_le_bytes(b);
        }
        Ok(())
    }

    fn write_words(&self, gpa: u64, buf: &[u64]) -> Result<(), iommu::iommufd::MemFault> {
        let len = 8 * buf.len() as u64;
        if let Some((frames, off)) = self.locate(gpa, len) {
            frames.write_words(off, buf);
            return Ok(());
        }
        // All or nothing: the whole range is checked before the first word is written.
        if !self.contains(gpa, len) {
            return Err(iommu::iommufd::MemFault);
        }
        for (k, w) in buf.iter().enumerate() {
            GuestMemory::write(self, gpa + 8 * k as u64, &w.to_le_bytes())
                .map_err(|_| iommu::iommufd::MemFault)?;
        }
        Ok(())
    }

    fn owns(&self, gpa: u64, len: u64, _write: bool) -> bool {
        self.contains(gpa, len)
    }

    fn translate(&self, gpa: u64) -> Option<iommu::iommufd::HostRun> {
        Some(self.run_at(self.find(gpa)?, gpa))
    }

    /// `cursor` is the index of the region the previous run was in: a walk upwards finds
    /// `gpa` there or in the next region without a search; anything else (a fresh cursor, a
    /// jump) falls back to [`translate`](Self::translate)'s binary search.
    fn translate_next(&self, gpa: u64, cursor: &mut usize) -> Option<iommu::iommufd::HostRun> {
        let c = *cursor;
        let i = [c, c.wrapping_add(1)]
            .into_iter()
            .find(|&i| self.regions.get(i).is_some_and(|r| r.holds(gpa)))
            .or_else(|| self.find(gpa))?;
        *cursor = i;
        Some(self.run_at(i, gpa))
    }
}

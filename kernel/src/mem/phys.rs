//! The unsafe edge between physical addresses and Rust references: every access to memory the
//! hypervisor did not allocate as a Rust object (firmware tables, MMIO registers, frames handed
//! out by the frame allocator, IOMMU tables) goes through this module and the direct map.
//!
//! Every constructor here is safe *and* sound for every input, because none of them trusts the
//! address it is given: each kind of access is a capability backed by evidence this module
//! checks or owns.
//!
//! - [`Frames`]: an owning token for frames from the frame allocator. Only [`Frames::alloc`]
//!   makes one; the allocator hands each frame to one owner, so `&mut self` access is exclusive.
//! - Firmware views ([`firmware_bytes`]) and MMIO windows ([`MmioRegion::new`]) are *claims*
//!   checked against a ledger of the physical address space ([`init`]): neither may overlap RAM
//!   the hypervisor allocates from (or its image and boot modules), and the two kinds may never
//!   overlap each other, so a volatile register store can never land in memory a
//!   `&'static [u8]` promises is immutable, and a firmware view can never alias a Rust object.
//! - Atomic-only memory ([`atomic_u64s`], [`Frames::into_atomic`]): frames converted for good into
//!   memory that is only ever accessed through atomics (IOMMU tables and queues, which the IOMMU
//!   also reads and writes). They are marked in a bitmap and never return to the frame
//!   allocator, so a `&'static [AtomicU64]` over them can never alias a `&mut`.

use crate::arch;
use boot::{BootInfo, MemoryKind};
use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::{Mutex, Once};

/// Errors when touching physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysError {
    /// The range is not covered by the direct map.
    NotMapped { pa: u64, len: u64 },
    /// The range is not what the access needs: RAM asked for as MMIO or firmware, firmware
    /// data asked for as MMIO (or the reverse), or not atomic-only memory.
    Conflict { pa: u64, len: u64 },
}

impl core::fmt::Display for PhysError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PhysError::NotMapped { pa, len } => {
                write!(
                    f,
                    "physical range {pa:#x}+{len:#x} is outside the direct map"
                )
            }
            PhysError::Conflict { pa, len } => {
                write!(
                    f,
                    "physical range {pa:#x}+{len:#x} is RAM, firmware data or device registers \
                     in conflict with this use"
                )
            }
        }
    }
}

fn virt(pa: u64, len: u64) -> Result<usize, PhysError> {
    let end = pa
        .checked_add(len)
        .ok_or(PhysError::NotMapped { pa, len })?;
    if end > arch::direct_map_limit() {
        return Err(PhysError::NotMapped { pa, len });
    }
    arch::phys_to_virt(pa).ok_or(PhysError::NotMapped { pa, len })
}

/// A physical range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
}

impl Span {
    fn overlaps(&self, other: Span) -> bool {
        self.start < other.end && other.start < self.end
    }

    fn contains(&self, other: Span) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

const LEDGER_SLOTS: usize = 128;

/// What the hypervisor knows about the physical address space (see the module docs).
struct Ledger {
    /// RAM the hypervisor allocates from or runs in: usable regions, the image, boot modules.
    ram: [Span; LEDGER_SLOTS],
    ram_count: usize,
    /// Ranges claimed as read-only firmware data (including the carve-outs of RAM that hold
    /// firmware data: the DTB, the x86 BIOS area below 1 MiB).
    firmware: [Span; LEDGER_SLOTS],
    firmware_count: usize,
    /// Ranges claimed as device registers.
    mmio: [Span; LEDGER_SLOTS],
    mmio_count: usize,
    /// x86: the real-mode page secondary CPUs start in ([`trampoline_page`]); no view of any
    /// kind may cover it.
    trampoline: Option<Span>,
    ready: bool,
}

impl Ledger {
    const fn new() -> Self {
        Self {
            ram: [Span { start: 0, end: 0 }; LEDGER_SLOTS],
            ram_count: 0,
            firmware: [Span { start: 0, end: 0 }; LEDGER_SLOTS],
            firmware_count: 0,
            mmio: [Span { start: 0, end: 0 }; LEDGER_SLOTS],
            mmio_count: 0,
            trampoline: None,
            ready: false,
        }
    }

    fn ram(&self) -> &[Span] {
        &self.ram[..self.ram_count]
    }

    fn firmware(&self) -> &[Span] {
        &self.firmware[..self.firmware_count]
    }

    fn mmio(&self) -> &[Span] {
        &self.mmio[..self.mmio_count]
    }

    fn push(list: &mut [Span; LEDGER_SLOTS], count: &mut usize, s: Span) -> Result<(), ()> {
        if list[..*count].iter().any(|c| c.contains(s)) {
            return Ok(());
        }
        if *count == LEDGER_SLOTS {
            return Err(());
        }
        list[*count] = s;
        *count += 1;
        Ok(())
    }

    /// Whether a read-only firmware view of `s` is sound: every byte of it is either inside an
    /// earlier firmware claim or outside RAM, and no byte is a device register.
    fn firmware_ok(&self, s: Span) -> bool {
        if self.mmio().iter().any(|m| m.overlaps(s))
            || self.trampoline.is_some_and(|t| t.overlaps(s))
        {
            return false;
        }
        let mut cur = s.start;
        while cur < s.end {
            if let Some(f) = self
                .firmware()
                .iter()
                .filter(|f| f.start <= cur && cur < f.end)
                .max_by_key(|f| f.end)
            {
                cur = f.end;
                continue;
            }
            // Up to the next firmware claim (or the end), nothing may be RAM.
            let next = self
                .firmware()
                .iter()
                .filter(|f| f.start > cur)
                .map(|f| f.start)
                .min()
                .unwrap_or(s.end)
                .min(s.end);
            let gap = Span {
                start: cur,
                end: next,
            };
            if self.ram().iter().any(|r| r.overlaps(gap)) {
                return false;
            }
            cur = next;
        }
        true
    }

    /// Whether `s` may be used as device registers: not RAM, not firmware data.
    fn mmio_ok(&self, s: Span) -> bool {
        !self.ram().iter().any(|r| r.overlaps(s)) && !self.firmware().iter().any(|f| f.overlaps(s))
    }
}

static LEDGER: Mutex<Ledger> = Mutex::new(Ledger::new());

/// Largest DTB the arm64 boot protocol allows (Documentation/arm64/booting: "must not exceed 2
/// megabytes"); the carve-out never extends past it whatever the header claims.
const DTB_MAX: u64 = 2 << 20;

/// Records the physical address space from the boot memory map. Must run after the direct map
/// is up and before the first firmware view or MMIO window; until then every claim is refused.
pub fn init(info: &BootInfo) {
    let mut l = LEDGER.lock();
    if l.ready {
        return;
    }
    let ram = |start: u64, end: u64, l: &mut Ledger| {
        if start < end {
            let Ledger { ram, ram_count, .. } = l;
            if Ledger::push(ram, ram_count, Span { start, end }).is_err() {
                // Out of slots: treat everything up to the direct-map limit as RAM rather than
                // forget some (fail closed: later claims are refused, not unsound).
                l.ram[0] = Span {
                    start: 0,
                    end: u64::MAX,
                };
                l.ram_count = 1;
            }
        }
    };
    for r in info.memory_regions() {
        if matches!(r.kind, MemoryKind::Usable | MemoryKind::InUse) {
            ram(r.start, r.end(), &mut l);
        }
    }
    ram(info.image_start, info.image_end, &mut l);
    for m in info.modules() {
        ram(m.start, m.start.saturating_add(m.len), &mut l);
    }
    // Firmware data inside what the memory map calls RAM. The frame allocator reserves the same
    // ranges (`frame::init`), so no frame is ever handed out from them.
    let firmware = |start: u64, end: u64, l: &mut Ledger| {
        let Ledger {
            firmware,
            firmware_count,
            ..
        } = l;
        let _ = Ledger::push(firmware, firmware_count, Span { start, end });
    };
    #[cfg(target_arch = "x86_64")]
    {
        // The first MiB is firmware data (IVT, BDA, EBDA, BIOS), except the page the secondary
        // CPUs start in, when the memory map says it is ordinary free RAM.
        let t = TRAMPOLINE;
        let free_ram = info
            .memory_regions()
            .iter()
            .any(|r| r.kind == MemoryKind::Usable && r.start <= t.start && t.end <= r.end())
            && !info.memory_regions().iter().any(|r| {
                r.kind != MemoryKind::Usable
                    && (Span {
                        start: r.start,
                        end: r.end(),
                    })
                    .overlaps(t)
            })
            && !(Span {
                start: info.image_start,
                end: info.image_end,
            })
            .overlaps(t)
            && !info.modules().iter().any(|m| {
                t.overlaps(Span {
                    start: m.start,
                    end: m.start.saturating_add(m.len),
                })
            });
        if free_ram {
            l.trampoline = Some(t);
            firmware(0, t.start, &mut l);
            firmware(t.end, 0x10_0000, &mut l);
        } else {
            firmware(0, 0x10_0000, &mut l);
        }
    }
    if let Some(dtb) = info.dtb {
        firmware(dtb, dtb.saturating_add(dtb_size(dtb)), &mut l);
    }
    // Boot modules (guest images) are loader-provided data the hypervisor only reads; the frame
    // allocator never hands them out (they are in-use RAM), so they may be viewed as firmware.
    for m in info.modules() {
        firmware(m.start, m.start.saturating_add(m.len), &mut l);
    }
    // The console was set up before the ledger; its registers are MMIO, never firmware data.
    if let Some((base, size)) = arch::console_mmio() {
        let Ledger {
            mmio, mmio_count, ..
        } = &mut *l;
        let _ = Ledger::push(
            mmio,
            mmio_count,
            Span {
                start: base,
                end: base.saturating_add(size),
            },
        );
    }
    l.ready = true;
}

/// The page below 1 MiB where secondary x86 CPUs start in real mode (SIPI vector 0x08: Intel SDM
/// vol 3 §9.4.4.1 / §11.6.1, the vector is the page number).
#[cfg(target_arch = "x86_64")]
pub const TRAMPOLINE_PA: u64 = 0x8000;
#[cfg(target_arch = "x86_64")]
const TRAMPOLINE: Span = Span {
    start: TRAMPOLINE_PA,
    end: TRAMPOLINE_PA + super::frame::PAGE_SIZE,
};

/// The secondary-CPU start page ([`TRAMPOLINE_PA`]), writable, once: `None` if the memory map
/// does not show it as free RAM (then no secondary CPU can be started) or if it was taken before.
///
/// Sound because the page is usable RAM the frame allocator never hands out (it reserves the
/// first MiB), [`init`] carved it out of the first-MiB firmware claim, and the ledger refuses
/// every firmware or MMIO view overlapping it; the `AtomicBool` makes the `&'static mut` unique.
#[cfg(target_arch = "x86_64")]
pub fn trampoline_page() -> Option<&'static mut [u8]> {
    use core::sync::atomic::AtomicBool;
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let t = {
        let l = LEDGER.lock();
        if !l.ready {
            return None;
        }
        l.trampoline?
    };
    let va = virt(t.start, t.end - t.start).ok()?;
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: see the function docs: free RAM in the direct map that no allocator, view or
    // Rust object covers, handed out exactly once (the swap above), so the slice is unique.
    Some(unsafe { core::slice::from_raw_parts_mut(va as *mut u8, (t.end - t.start) as usize) })
}

/// The DTB's `totalsize`, read from its header, bounded by [`DTB_MAX`] (0 if there is no valid
/// header in the direct map).
fn dtb_size(pa: u64) -> u64 {
    let Ok(va) = virt(pa, 8) else { return 0 };
    let mut h = [0u8; 8];
    for (i, b) in h.iter_mut().enumerate() {
        // SAFETY: `virt` checked the 8 bytes are in the direct map; this runs in `init`, before
        // the frame allocator exists, so no Rust object can live there yet; a volatile byte read
        // creates no reference.
        *b = unsafe { ptr::read_volatile((va + i) as *const u8) };
    }
    if h[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
        return 0;
    }
    u64::from(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))
        .clamp(crate::mem::frame::PAGE_SIZE, DTB_MAX)
}

/// A read-only view of firmware-provided memory (ACPI tables, the DTB, the BIOS area).
///
/// Refused unless the ledger shows the range is firmware data or outside RAM, and not device
/// registers; the range is then claimed as firmware for good, so no MMIO window can cover it
/// later. Nothing in the hypervisor writes such memory, so a shared `'static` slice is sound.
pub fn firmware_bytes(pa: u64, len: u64) -> Result<&'static [u8], PhysError> {
    let va = virt(pa, len)?;
    let span = Span {
        start: pa,
        end: pa + len,
    };
    {
        let mut l = LEDGER.lock();
        if !l.ready || !l.firmware_ok(span) {
            return Err(PhysError::Conflict { pa, len });
        }
        let Ledger {
            firmware,
            firmware_count,
            ..
        } = &mut *l;
        Ledger::push(firmware, firmware_count, span)
            .map_err(|_| PhysError::Conflict { pa, len })?;
    }
    // SAFETY: `virt` checked the range lies inside the direct map, which maps it readable for
    // the hypervisor's lifetime. The ledger shows it is not RAM any Rust object or frame can
    // occupy (or is firmware data carved out of RAM), and never device registers, and it is now
    // claimed as firmware so no MMIO window can be created over it: nothing writes it.
    Ok(unsafe { core::slice::from_raw_parts(va as *const u8, len as usize) })
}

/// Frames owned exclusively by this token, from the frame allocator: the only way to get a
/// reference to allocated physical memory. Dropping the token without [`free`](Self::free)
/// leaks the frames (never unsound).
#[derive(Debug)]
pub struct Frames {
    pa: u64,
    pages: u64,
    /// Where the direct map shows the frames, computed and checked once by `alloc`: every
    /// access through the token (each VMCB field, each guest-memory copy of the hypercall
    /// path) used to repeat the direct-map lookup and its bounds checks.
    va: usize,
}

impl Frames {
    /// `pages` contiguous frames aligned to `align` bytes, below `limit`, reachable through the
    /// direct map. The contents are whatever the last owner left.
    pub fn alloc(pages: u64, align: u64, limit: u64) -> Option<Frames> {
        use super::frame::{FRAMES, PAGE_SIZE};
        let pa = FRAMES.lock().alloc(pages, align, limit)?;
        match virt(pa, pages * PAGE_SIZE) {
            Ok(va) => Some(Frames { pa, pages, va }),
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
        self.pages * super::frame::PAGE_SIZE
    }

    fn va(&self) -> usize {
        // Checked in `alloc` (the only constructor); the direct map never shrinks or moves.
        self.va
    }

    /// The frames' bytes, for as long as the token is borrowed.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the frame allocator handed these frames to this token alone (it is not Copy
        // or Clone), they are mapped read-write by the direct map, and the slice borrows the
        // token mutably, so no other reference to them can exist while it lives.
        unsafe { core::slice::from_raw_parts_mut(self.va() as *mut u8, self.len() as usize) }
    }

    /// Byte `offset` read with a volatile load, never through a reference: for memory a device
    /// writes behind the compiler's back (`mem::dma`). Out of range is a caller bug: panics.
    pub fn read_volatile(&self, offset: usize) -> u8 {
        assert!((offset as u64) < self.len(), "frame access out of range");
        // SAFETY: inside the frames this token owns (checked), mapped read-write by the direct
        // map; a volatile byte load creates no reference, so a concurrent device write yields an
        // unknown value, not undefined behaviour.
        unsafe { ptr::read_volatile((self.va() + offset) as *const u8) }
    }

    /// Byte `offset` written with a volatile store, never through a reference.
    pub fn write_volatile(&self, offset: usize, value: u8) {
        assert!((offset as u64) < self.len(), "frame access out of range");
        // SAFETY: as in `read_volatile`; the token owns the frames, so no Rust reference to them
        // exists while `&self` is borrowed without `bytes_mut`.
        unsafe { ptr::write_volatile((self.va() + offset) as *mut u8, value) }
    }

    /// The frames as 64-bit atomics, for as long as the token is borrowed: the view for memory
    /// that others write concurrently (a running guest's RAM, its control blocks).
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the token owns the frames (page aligned, so 8-byte aligned) and the direct map
        // maps them read-write. The slice borrows the token, so it cannot outlive the ownership
        // (`free` consumes the token) and cannot coexist with `bytes_mut`'s `&mut`; atomics
        // tolerate the other shared accessors and concurrent writers.
        unsafe {
            core::slice::from_raw_parts(self.va() as *const AtomicU64, (self.len() / 8) as usize)
        }
    }

    /// Gives the frames back to the allocator.
    pub fn free(self) {
        super::frame::FRAMES.lock().free(self.pa, self.pages);
    }

    /// Keeps the frames for the hypervisor's lifetime as plain memory (the heap).
    pub fn leak(mut self) -> &'static mut [u8] {
        let bytes = self.bytes_mut() as *mut [u8];
        // SAFETY: the token is consumed without freeing, so the exclusive ownership `bytes_mut`
        // relied on now lasts forever.
        unsafe { &mut *bytes }
    }

    #[cfg_attr(
        target_arch = "x86_64",
        allow(dead_code, reason = "fw_cfg (aarch64) builds tables")
    )]
    /// Freezes the frames as firmware data (tables the fw_cfg loader built): they become a
    /// firmware claim in the ledger and are never written or freed again.
    pub fn into_firmware(self) -> &'static [u8] {
        let span = Span {
            start: self.pa,
            end: self.pa + self.len(),
        };
        let bytes = self.leak();
        let mut l = LEDGER.lock();
        let Ledger {
            firmware,
            firmware_count,
            ..
        } = &mut *l;
        // A full ledger only means later views of these tables are refused (fail closed).
        let _ = Ledger::push(firmware, firmware_count, span);
        bytes
    }

    /// Converts the frames for good into atomic-only memory (zeroed): see [`atomic_u64s`].
    /// Returns their physical address; they never return to the frame allocator.
    pub fn into_atomic(self) -> Result<u64, PhysError> {
        let atomic = ATOMIC.get().ok_or(PhysError::NotMapped {
            pa: self.pa,
            len: self.len(),
        })?;
        let (pa, len) = (self.pa, self.len());
        let first = pa / super::frame::PAGE_SIZE;
        if (first + self.pages).div_ceil(64) as usize > atomic.len() {
            return Err(PhysError::NotMapped { pa, len });
        }
        let words = self.leak();
        // From here on the bytes are only reached as atomics: zero them that way.
        words.fill(0);
        for f in first..first + len / super::frame::PAGE_SIZE {
            // Release: a CPU that sees the bit (Acquire in `atomic_u64s`) sees the zeroes.
            atomic[(f / 64) as usize].fetch_or(1 << (f % 64), Ordering::Release);
        }
        Ok(pa)
    }
}

/// One bit per 4 KiB frame of RAM: set once the frame became atomic-only memory.
static ATOMIC: Once<&'static [AtomicU64]> = Once::new();

/// Sets up the atomic-only memory bitmap for RAM below `ram_end` (after the frame allocator).
pub fn init_atomic(ram_end: u64) -> Result<(), PhysError> {
    use super::frame::PAGE_SIZE;
    let words = (ram_end / PAGE_SIZE).div_ceil(64);
    let bytes = (words * 8).max(1);
    let frames = Frames::alloc(bytes.div_ceil(PAGE_SIZE), PAGE_SIZE, u64::MAX)
        .ok_or(PhysError::NotMapped { pa: 0, len: bytes })?;
    let mem = frames.leak();
    mem.fill(0);
    let ptr = mem.as_mut_ptr() as *const AtomicU64;
    // SAFETY: the frames were just allocated and leaked (this is their only owner, forever),
    // are page aligned (so 8-byte aligned), zeroed, and hold `words` whole u64s; the `&mut`
    // above is not used again, so the atomics are the only view.
    let bitmap = unsafe { core::slice::from_raw_parts(ptr, words as usize) };
    ATOMIC.call_once(|| bitmap);
    Ok(())
}

fn is_atomic(pa: u64, len: u64) -> bool {
    use super::frame::PAGE_SIZE;
    let Some(atomic) = ATOMIC.get() else {
        return false;
    };
    let Some(end) = pa.checked_add(len) else {
        return false;
    };
    if len == 0 {
        return false;
    }
    (pa / PAGE_SIZE..end.div_ceil(PAGE_SIZE)).all(|f| {
        atomic
            .get((f / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & 1 << (f % 64) != 0)
    })
}

/// A window of MMIO registers reached through the direct map, implementing the IOMMU crate's
/// [`iommu::hw::Mmio`] with volatile accesses of exactly the width asked for.
#[derive(Clone, Copy, Debug)]
pub struct MmioRegion {
    base: usize,
    size: usize,
    pub phys: u64,
}

impl MmioRegion {
    /// The register window `[pa, pa + size)`. Refused unless the ledger shows it is neither RAM
    /// nor firmware data (see the module docs); it is then claimed as MMIO for good. Volatile
    /// accesses to it can therefore never touch memory a Rust reference covers.
    pub fn new(pa: u64, size: u64) -> Result<Self, PhysError> {
        let base = virt(pa, size)?;
        let span = Span {
            start: pa,
            end: pa + size,
        };
        let mut l = LEDGER.lock();
        if !l.ready || !l.mmio_ok(span) {
            return Err(PhysError::Conflict { pa, len: size });
        }
        let Ledger {
            mmio, mmio_count, ..
        } = &mut *l;
        Ledger::push(mmio, mmio_count, span).map_err(|_| PhysError::Conflict { pa, len: size })?;
        Ok(Self {
            base,
            size: size as usize,
            phys: pa,
        })
    }

    fn addr(&self, offset: usize, width: usize) -> usize {
        // A bad offset is a driver bug, not guest input: stop loudly rather than touch memory
        // outside the device.
        assert!(
            offset.is_multiple_of(width) && offset + width <= self.size,
            "MMIO access at {offset:#x} (width {width}) outside {:#x}+{:#x}",
            self.phys,
            self.size
        );
        self.base + offset
    }
}

impl iommu::hw::Mmio for MmioRegion {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `addr` keeps the access aligned and inside the register window, which the
        // direct map maps as device memory for the hypervisor's lifetime.
        unsafe { ptr::read_volatile(self.addr(offset, 4) as *const u32) }
    }

    fn write32(&self, offset: usize, value: u32) {
        // Register writes are doorbells for memory the device reads (queues, tables): order
        // earlier stores first, like Linux's writel.
        crate::arch::cache::dma_wmb();
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile(self.addr(offset, 4) as *mut u32, value) }
    }

    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read32`.
        unsafe { ptr::read_volatile(self.addr(offset, 8) as *const u64) }
    }

    fn write64(&self, offset: usize, value: u64) {
        crate::arch::cache::dma_wmb();
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile(self.addr(offset, 8) as *mut u64, value) }
    }

    fn dma_rmb(&self) {
        crate::arch::cache::dma_rmb();
    }
}

impl drivers::fw_cfg::MmioWrite16 for MmioRegion {
    fn write16(&self, offset: usize, value: u16) {
        // SAFETY: as in `read32`: aligned, inside the register window, device memory.
        unsafe { ptr::write_volatile(self.addr(offset, 2) as *mut u16, value) }
    }
}

/// The `n` 64-bit words at `pa` as atomics: how IOMMU tables and queues are read and written.
///
/// Only atomic-only memory qualifies ([`Frames::into_atomic`]): memory that is never viewed any
/// other way and never returns to the frame allocator, so the `'static` shared slice is sound
/// whatever `pa` is asked for; anything else is refused.
pub fn atomic_u64s(pa: u64, n: usize) -> Result<&'static [AtomicU64], PhysError> {
    let len = (n as u64)
        .checked_mul(8)
        .ok_or(PhysError::NotMapped { pa, len: u64::MAX })?;
    let va = virt(pa, len)?;
    if va % 8 != 0 || !is_atomic(pa, len) {
        return Err(PhysError::Conflict { pa, len });
    }
    // SAFETY: the range is mapped read-write (checked by `virt`), 8-byte aligned (checked), and
    // atomic-only memory (checked): every access to it, by any CPU, is through these atomics or
    // by the IOMMU hardware, and it is never freed, so shared `'static` references are sound.
    Ok(unsafe { core::slice::from_raw_parts(va as *const AtomicU64, n) })
}

/// Cleans the data cache over atomic-only memory for a non-coherent IOMMU walker (no reference
/// is created: the cache instructions take the address).
pub fn clean_atomic(pa: u64, len: u64) -> Result<(), PhysError> {
    let va = virt(pa, len)?;
    if !is_atomic(pa, len) {
        return Err(PhysError::Conflict { pa, len });
    }
    // SAFETY: `virt` checked the range is mapped by the direct map.
    unsafe { arch::cache::clean(va as *const u8, len as usize) };
    Ok(())
}

/// Stores 16 bytes at `pa` (16-byte aligned, atomic-only memory) as one single-copy-atomic
/// write (a VT-d context or scalable-mode entry), without creating any reference to it.
#[cfg(target_arch = "x86_64")]
pub fn store128_atomic(pa: u64, lo: u64, hi: u64) -> Result<(), PhysError> {
    let va = virt(pa, 16)?;
    if !pa.is_multiple_of(16) || !is_atomic(pa, 16) {
        return Err(PhysError::Conflict { pa, len: 16 });
    }
    // SAFETY: mapped (checked by `virt`), 16-byte aligned and atomic-only memory (checked).
    unsafe { arch::cache::store128(va as *mut u8, lo, hi) };
    Ok(())
}

/// `selftest=phys`: the edge refuses every view that would be unsound and grants the ones
/// discovery needs. Run after `mem::init`, before discovery claims anything.
pub fn selftest() -> Result<(), &'static str> {
    use super::frame::PAGE_SIZE;
    // Allocatable RAM (a frame from the allocator): never MMIO, firmware, or atomic-only.
    let frames = Frames::alloc(1, PAGE_SIZE, u64::MAX).ok_or("no frames")?;
    let ram = frames.pa();
    let ram_refused = MmioRegion::new(ram, PAGE_SIZE).is_err()
        && firmware_bytes(ram, 16).is_err()
        && atomic_u64s(ram, 512).is_err()
        && clean_atomic(ram, 64).is_err();
    frames.free();
    if !ram_refused {
        return Err("a view of allocatable RAM was granted");
    }
    // The image (a static in it): never MMIO or firmware.
    static PROBE: u8 = 0;
    let image = arch::virt_to_phys(&raw const PROBE as usize).ok_or("image not mapped")?;
    if MmioRegion::new(image & !(PAGE_SIZE - 1), PAGE_SIZE).is_ok()
        || firmware_bytes(image, 1).is_ok()
    {
        return Err("a view of the hypervisor image was granted");
    }
    // Firmware data carved out of RAM (x86: the BIOS area; aarch64: the DTB): readable as
    // firmware, never MMIO.
    let carve = LEDGER.lock().firmware().first().copied();
    if let Some(f) = carve {
        if firmware_bytes(f.start, 16).is_err() {
            return Err("the firmware carve-out is not readable as firmware");
        }
        if MmioRegion::new(f.start & !(PAGE_SIZE - 1), PAGE_SIZE).is_ok() {
            return Err("an MMIO window over firmware data was granted");
        }
    }
    // The secondary-CPU start page, when carved out: neither firmware data nor registers.
    #[cfg(target_arch = "x86_64")]
    if LEDGER.lock().trampoline.is_some()
        && (firmware_bytes(TRAMPOLINE_PA, 16).is_ok()
            || firmware_bytes(0, 0x10_0000).is_ok()
            || MmioRegion::new(TRAMPOLINE_PA, PAGE_SIZE).is_ok())
    {
        return Err("a view over the secondary-CPU trampoline page was granted");
    }
    // The console's registers (claimed at `init`): never firmware.
    if let Some((base, _)) = arch::console_mmio()
        && firmware_bytes(base, 16).is_ok()
    {
        return Err("a firmware view over the console's registers was granted");
    }
    // A range outside RAM becomes MMIO, and from then on never firmware.
    let hole = arch::direct_map_limit() - PAGE_SIZE;
    if LEDGER.lock().ram().iter().any(|r| r.end > hole) {
        return Err("RAM reaches the top of the direct map: no hole to probe");
    }
    MmioRegion::new(hole, PAGE_SIZE).map_err(|_| "an MMIO window outside RAM was refused")?;
    if firmware_bytes(hole, 16).is_ok() {
        return Err("a firmware view over an MMIO window was granted");
    }
    // Atomic-only frames: the whole frame as atomics, nothing else.
    let atomic = Frames::alloc(1, PAGE_SIZE, u64::MAX)
        .ok_or("no frames")?
        .into_atomic()
        .map_err(|_| "into_atomic failed")?;
    let words = atomic_u64s(atomic, 512).map_err(|_| "atomic-only frame refused")?;
    if words.iter().any(|w| w.load(Ordering::Relaxed) != 0) {
        return Err("atomic-only frame not zeroed");
    }
    if atomic_u64s(atomic + 4, 1).is_ok() || atomic_u64s(u64::MAX - 7, 1).is_ok() {
        return Err("a misaligned or wrapping atomic view was granted");
    }
    if MmioRegion::new(atomic, PAGE_SIZE).is_ok() || firmware_bytes(atomic, 16).is_ok() {
        return Err("an MMIO or firmware view of IOMMU memory was granted");
    }
    Ok(())
}

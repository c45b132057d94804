//! The `scatter gpa=ADDR size=BYTES` variant, for a guest configured with the same window as
//! `scatter=ADDR+BYTES` (docs/guests.md): that window of its RAM is backed by separate host
//! pages, no two adjacent, so a GPA-contiguous buffer there is many host runs.
//!
//! What it checks, each against an implementation other than the hypervisor's bookkeeping:
//! - the CPU sees the window as ordinary RAM (a pattern written and read back through the
//!   second stage, whose 4 KiB leaves point at the separate pages);
//! - hypercall arguments that straddle a page boundary of the window (CONSOLE_WRITE bytes, an
//!   IOAS_ALLOC struct read and written back) reach the right bytes;
//! - ONE IOAS_MAP of the whole window at a contiguous IOVA is right in the IOMMU: QEMU's edu
//!   DMA engine, through QEMU's VT-d or SMMUv3 model, copies 4 KiB stretches that straddle page
//!   boundaries of the window to edu's buffer and on into another mapping (and back into the
//!   window), and every byte is compared with what the CPU wrote or reads;
//! - a page of the window left out of a map (ONE IOAS_MAP of all the other pages) is not
//!   reachable: edu's DMA there is blocked (the hypervisor reports the IOMMU's fault) and the
//!   page keeps its bytes.

use crate::{arch, call, check, device_attach, edu, edu_dma, ioas_alloc, si, u64_at};
use hvabi::PAGE_SIZE;

/// Where the window is mapped: one contiguous IOVA range below edu's 28-bit DMA mask and the
/// aarch64 MSI doorbell window at 256 MiB.
const IOVA_WINDOW: u64 = 0x0100_0000;
/// The destination mapping (two pages of the guest's block RAM after the image).
const IOVA_DST: u64 = 0x0200_0000;

/// The pattern byte at offset `i` of the window: different in every byte of a page, and
/// different from page to page, so bytes from a wrong page or offset never match.
fn pattern(i: u64) -> u8 {
    (i as u8).wrapping_mul(31) ^ (i >> 12) as u8 ^ 0x5a
}

fn write_byte(gpa: u64, v: u8) {
    // SAFETY: `gpa` is in this guest's own RAM (the window or the pages after the image),
    // identity-mapped by the boot page tables; nothing else uses those bytes.
    unsafe { core::ptr::write_volatile(gpa as *mut u8, v) }
}

fn read_byte(gpa: u64) -> u8 {
    // SAFETY: as in `write_byte`.
    unsafe { core::ptr::read_volatile(gpa as *const u8) }
}

fn unmap(ioas_id: u32, iova: u64, length: u64) -> i64 {
    use hvabi::*;
    call(
        op::IOAS_UNMAP,
        IoasUnmap {
            size: IoasUnmap::SIZE as u32,
            flags: 0,
            ioas_id,
            reserved: 0,
            iova,
            length,
        },
    )
    .0
}

/// Bytes of `[gpa, gpa + len)` that differ from `want(k)` (k from 0).
fn mismatches(gpa: u64, len: u64, want: impl Fn(u64) -> u8) -> i64 {
    (0..len).filter(|&k| read_byte(gpa + k) != want(k)).count() as i64
}

/// Hypercall arguments across a page boundary of the window (`at`: the boundary's GPA). Uses
/// the 128 bytes around it; the caller writes its pattern afterwards.
fn args_across(at: u64) -> u32 {
    use hvabi::*;
    let mut failed = 0;
    let line = b"testguest: console bytes across a scatter page boundary\n";
    let start = at - 20;
    for (k, &b) in line.iter().enumerate() {
        write_byte(start + k as u64, b);
    }
    let r = arch::hypercall(platform::CONSOLE_WRITE, start, line.len() as u64, 0);
    failed += check("console-across-pages", r, line.len() as i64);
    // IOAS_ALLOC's struct straddles the boundary: read in, `out_ioas_id` written back across it.
    let s = at - 8;
    let mut b = [0u8; IoasAlloc::SIZE];
    IoasAlloc {
        size: IoasAlloc::SIZE as u32,
        ..IoasAlloc::default()
    }
    .encode(&mut b);
    for (k, &v) in b.iter().enumerate() {
        write_byte(s + k as u64, v);
    }
    let r = arch::hypercall(op::IOAS_ALLOC, s, 0, 0);
    failed += check("ioas-alloc-args-across-pages", r, 0);
    for (k, v) in b.iter_mut().enumerate() {
        *v = read_byte(s + k as u64);
    }
    let id = IoasAlloc::decode(&b).out_ioas_id;
    // The ID written back is a live IOAS: DESTROY of it succeeds (once).
    let destroy = Destroy {
        size: Destroy::SIZE as u32,
        id,
        ..Destroy::default()
    };
    failed += check(
        "ioas-id-written-across-pages",
        call(op::DESTROY, destroy).0,
        0,
    );
    failed
}

/// The variant: returns the number of failed checks.
pub fn scatter_checks(start_info: u64, free: u64, words: &mut dyn Iterator<Item = &str>) -> u32 {
    let (mut gpa, mut size) = (0, 0);
    for w in words {
        if let Some(v) = w.strip_prefix("gpa=").and_then(crate::parse_u64) {
            gpa = v;
        }
        if let Some(v) = w.strip_prefix("size=").and_then(crate::parse_u64) {
            size = v;
        }
    }
    let pages = size / PAGE_SIZE;
    if pages < 4 || !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
        println!("testguest: scatter: needs gpa=ADDR size=BYTES, at least 4 pages");
        return 1;
    }
    println!("testguest: scatter window {gpa:#x}+{size:#x}, {pages} pages");
    let mut e = [0u8; si::DEVICE_ENTRY];
    arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
    let dev_id = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let bar = u64_at(&e, 16);
    let mut failed = 0;
    failed += check(
        "edu-id-register",
        crate::mmio_read(bar + edu::ID) as i64,
        0x010000ed,
    );

    failed += args_across(gpa + PAGE_SIZE);

    // The pattern over the whole window, read back by the CPU.
    for k in 0..size {
        write_byte(gpa + k, pattern(k));
    }
    failed += check("cpu-pattern", mismatches(gpa, size, pattern), 0);

    let (r, ioas) = ioas_alloc();
    failed += check("ioas-alloc", r, 0);
    failed += check("attach", device_attach(dev_id, ioas), 0);
    failed += check(
        "map-window-one-call",
        crate::map_range(ioas, gpa, size, IOVA_WINDOW),
        0,
    );
    failed += check(
        "map-dst",
        crate::map_range(ioas, free, 2 * PAGE_SIZE, IOVA_DST),
        0,
    );

    // Window -> edu -> destination, 4 KiB straddling a page boundary of the window each time:
    // the first boundary, one in the middle, the last one.
    for (n, k) in [1, pages / 2, pages - 1].into_iter().enumerate() {
        let off = k * PAGE_SIZE - 0x800;
        for j in 0..2 * PAGE_SIZE {
            write_byte(free + j, 0xee);
        }
        let ok = edu_dma(bar, IOVA_WINDOW + off, edu::BUFFER, PAGE_SIZE, false)
            && edu_dma(bar, edu::BUFFER, IOVA_DST + 0x10, PAGE_SIZE, true);
        failed += check("dma-window-to-dst", i64::from(ok), 1);
        let bad = mismatches(free + 0x10, PAGE_SIZE, |j| pattern(off + j));
        println!(
            "testguest: window bytes {off:#x}..{:#x} (pages {} and {k}) through edu: {bad} differ",
            off + PAGE_SIZE,
            k - 1
        );
        failed += check("dma-window-every-byte", bad, 0);
        // The destination's bytes outside the copy are untouched.
        failed += check("dma-dst-rest", mismatches(free, 0x10, |_| 0xee), 0);
        if n == 0 {
            failed += check(
                "dma-dst-tail",
                mismatches(free + 0x10 + PAGE_SIZE, PAGE_SIZE - 0x10, |_| 0xee),
                0,
            );
        }
    }

    // Destination -> edu -> window, across the boundary between pages 2 and 3: the device's
    // writes land in the right separate pages, as the CPU reads them.
    let fresh = |j: u64| (j as u8).wrapping_mul(7) ^ 0xa5;
    for j in 0..PAGE_SIZE {
        write_byte(free + j, fresh(j));
    }
    let off = 3 * PAGE_SIZE - 0x400;
    let ok = edu_dma(bar, IOVA_DST, edu::BUFFER, PAGE_SIZE, false)
        && edu_dma(bar, edu::BUFFER, IOVA_WINDOW + off, PAGE_SIZE, true);
    failed += check("dma-into-window", i64::from(ok), 1);
    failed += check(
        "dma-into-window-every-byte",
        mismatches(gpa + off, PAGE_SIZE, fresh),
        0,
    );
    // Around it, the window still holds its pattern.
    failed += check(
        "dma-into-window-neighbours",
        mismatches(gpa + off - 0x100, 0x100, |j| pattern(off - 0x100 + j))
            + mismatches(gpa + off + PAGE_SIZE, 0x100, |j| {
                pattern(off + PAGE_SIZE + j)
            }),
        0,
    );

    // The window again, all pages but the last in ONE map: the last page is not reachable.
    failed += check("unmap-window", unmap(ioas, IOVA_WINDOW, size), 0);
    let part = size - PAGE_SIZE;
    failed += check(
        "map-all-but-last-page",
        crate::map_range(ioas, gpa, part, IOVA_WINDOW),
        0,
    );
    let last = part;
    println!(
        "testguest: DMA to the unmapped last page of the window, iova {:#x}",
        IOVA_WINDOW + last + 0x100
    );
    let ok = edu_dma(bar, edu::BUFFER, IOVA_WINDOW + last + 0x100, 0x100, true);
    failed += check("dma-to-unmapped-page-completes", i64::from(ok), 1);
    failed += check(
        "dma-to-unmapped-page-blocked",
        mismatches(gpa + last, PAGE_SIZE, |j| pattern(last + j)),
        0,
    );
    // The page before it is still mapped, and the map of all but one page still right there.
    let ok = edu_dma(
        bar,
        IOVA_WINDOW + last - PAGE_SIZE,
        edu::BUFFER,
        PAGE_SIZE,
        false,
    ) && edu_dma(bar, edu::BUFFER, IOVA_DST, PAGE_SIZE, true);
    failed += check("dma-second-last-page", i64::from(ok), 1);
    failed += check(
        "dma-second-last-page-every-byte",
        mismatches(free, PAGE_SIZE, |j| pattern(last - PAGE_SIZE + j)),
        0,
    );
    failed += check("unmap-part", unmap(ioas, IOVA_WINDOW, part), 0);
    println!("testguest: scatter checks: {failed} failed");
    failed
}

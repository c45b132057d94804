//! In-hypervisor scenarios, selected with `scenario=NAME` on the command line. Each prints one
//! `check: NAME ok` / `check: NAME FAILED: why` line per behaviour it proves, against the
//! independent implementations QEMU provides (its VT-d model, the edu DMA engine), and returns
//! the exit status.

pub mod abi;
#[cfg(target_arch = "x86_64")]
pub mod irq;
#[cfg(target_arch = "aarch64")]
pub mod msi;
#[cfg(target_arch = "aarch64")]
pub mod smmu;
#[cfg(target_arch = "x86_64")]
pub mod vtd;

use crate::discovery::Platform;
use crate::mem::phys::MmioRegion;
use crate::println;
use alloc::string::String;
use drivers::edu::Edu;

/// Tally of checks.
#[derive(Default)]
pub struct Checks {
    pub passed: u32,
    pub failed: u32,
}

impl Checks {
    pub fn record(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("check: {name} ok");
            }
            Err(why) => {
                self.failed += 1;
                println!("check: {name} FAILED: {why}");
            }
        }
    }

    pub fn status(&self) -> u32 {
        println!("checks: {} passed, {} failed", self.passed, self.failed);
        if self.failed == 0 {
            crate::EXIT_SUCCESS
        } else {
            crate::EXIT_FAILURE
        }
    }
}

/// The first edu device with a live BAR0: its segment index, BDF, and the driver, with bus
/// mastering enabled (without it the DMA silently goes nowhere).
pub struct EduDevice {
    pub segment: u16,
    pub bdf: drivers::pci::Bdf,
    pub edu: Edu<MmioRegion>,
}

/// The first edu with a live BAR0 (see [`edus`]). `dma_mask` must match the QEMU device's
/// `dma_mask` property (28 bits by default): the driver cannot read it from the device.
pub fn find_edu(platform: &Platform, dma_mask: u64) -> Result<EduDevice, String> {
    edus(platform, dma_mask)
        .next()
        .unwrap_or_else(|| Err("no edu device with an assigned BAR0 (add -device edu)".into()))
}

/// Every edu with a live BAR0, in segment and enumeration order, each with bus mastering
/// enabled and probed as the iterator reaches it (a caller that stops early leaves the others
/// untouched). `dma_mask` as for [`find_edu`].
pub fn edus(
    platform: &Platform,
    dma_mask: u64,
) -> impl Iterator<Item = Result<EduDevice, String>> + '_ {
    use alloc::format;
    platform.segments.iter().flat_map(move |s| {
        s.devices
            .find(drivers::edu::VENDOR_ID, drivers::edu::DEVICE_ID)
            .filter_map(move |f| {
                let bar = f.bars.first().copied().flatten().filter(|b| b.is_live())?;
                Some((|| {
                    let mmio = MmioRegion::new(bar.base, drivers::edu::BAR0_SIZE)
                        .map_err(|e| format!("edu BAR0: {e}"))?;
                    if !drivers::pci::enable_bus_master(&s.ecam, &s.devices, f.bdf) {
                        return Err(format!("edu {}: cannot enable bus mastering", f.bdf));
                    }
                    let edu = Edu::probe(mmio)
                        .map_err(|e| format!("edu {}: {e:?}", f.bdf))?
                        .with_dma_mask(dma_mask);
                    Ok(EduDevice {
                        segment: s.segment,
                        bdf: f.bdf,
                        edu,
                    })
                })())
            })
    })
}

/// Polls for a DMA to finish: edu completes on a QEMU virtual-clock timer (100 ms virtual, a
/// few thousand polls under `-icount`), so this bound is generous, never infinite.
pub const DMA_POLLS: u32 = 50_000_000;

/// A physically contiguous DMA buffer from the frame allocator, zeroed: the device writes it,
/// so it is only reached through volatile accessors (see `mem::dma`).
pub type Buffer = crate::mem::dma::DmaBuffer;

pub fn buffer(len: u64, align: u64) -> Result<Buffer, String> {
    Buffer::alloc(len, align).ok_or_else(|| "out of frames".into())
}

/// Runs `f` in a throwaway in-hypervisor guest of the owner's `fd`: created, given owned device
/// `hw` and a frame-backed buffer of [`FLOW_MEMORY`](iommu::iommufd::selftest::FLOW_MEMORY)
/// bytes as its memory, then destroyed whatever `f` returned: its objects leave the hardware
/// before the buffer is freed.
pub fn in_throwaway_guest<T>(
    fd: &mut iommu::iommufd::Iommufd<crate::iommu_owner::Backend>,
    hw: usize,
    f: impl FnOnce(
        &mut iommu::iommufd::Iommufd<crate::iommu_owner::Backend>,
        iommu::iommufd::GuestId,
        &Buffer,
    ) -> Result<T, String>,
) -> Result<T, String> {
    use alloc::format;
    let g = fd
        .create_guest()
        .map_err(|e| format!("create_guest: {e:?}"))?;
    let buf = match buffer(
        iommu::iommufd::selftest::FLOW_MEMORY,
        crate::mem::frame::PAGE_SIZE,
    ) {
        Ok(b) => b,
        Err(e) => {
            let _ = fd.destroy_guest(g);
            return Err(e);
        }
    };
    let r = fd
        .assign_device(g, hw as iommu::iommufd::HwDev)
        .map_err(|e| format!("assign_device: {e:?}"))
        .and_then(|_| f(fd, g, &buf));
    let d = fd
        .destroy_guest(g)
        .map_err(|e| format!("destroy_guest: {e:?}"));
    buf.free();
    r.and_then(|ok| d.map(|()| ok))
}

/// A recognisable byte pattern, different per seed, into ordinary memory (DMA buffers have
/// [`Buffer::fill_pattern`], which writes the same bytes).
#[allow(dead_code, reason = "for scenarios that fill plain memory")]
pub fn pattern(seed: u8, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = crate::mem::dma::pattern_byte(seed, i);
    }
}

/// edu reads `len` bytes at `iova` into its buffer, and the transfer completes.
pub fn dma_to_device(d: &EduDevice, iova: u64, len: usize) -> Result<(), String> {
    d.edu
        .dma_to_device(iova, len)
        .map_err(|e| alloc::format!("edu: {e:?}"))?;
    d.edu
        .wait_dma(DMA_POLLS)
        .map_err(|e| alloc::format!("edu: {e:?}"))
}

/// edu writes `len` bytes of its buffer at `iova`, and the transfer completes.
pub fn dma_from_device(d: &EduDevice, iova: u64, len: usize) -> Result<(), String> {
    d.edu
        .dma_from_device(iova, len)
        .map_err(|e| alloc::format!("edu: {e:?}"))?;
    d.edu
        .wait_dma(DMA_POLLS)
        .map_err(|e| alloc::format!("edu: {e:?}"))
}

/// Records a check whose success carries what it observed, printed on the check line
/// (`check: NAME ok: OBSERVED`), so the scenario's expected lines can pin the observation.
pub fn record_observed(checks: &mut Checks, name: &str, result: Result<String, String>) {
    match result {
        Ok(observed) => {
            checks.passed += 1;
            println!("check: {name} ok: {observed}");
        }
        Err(why) => checks.record(name, Err(why)),
    }
}

/// Compares the whole of `buf` with `expected`; on a difference, names the first differing
/// offset (a check of one byte would miss a DMA that landed anywhere else).
pub fn whole_buffer_eq(buf: &Buffer, expected: &[u8]) -> Result<(), String> {
    if buf.len() != expected.len() {
        return Err(alloc::format!(
            "buffer is {:#x} bytes, expected {:#x}",
            buf.len(),
            expected.len()
        ));
    }
    match buf.mismatch(0..buf.len(), |i| expected[i]) {
        None => Ok(()),
        Some(off) => Err(alloc::format!(
            "byte {off:#x} of {:#x} is {:#04x}, expected {:#04x}",
            buf.len(),
            buf.read_u8(off),
            expected[off]
        )),
    }
}

/// A copy of the whole buffer, read through its volatile accessors.
pub fn snapshot(buf: &Buffer) -> alloc::vec::Vec<u8> {
    let mut v = alloc::vec![0; buf.len()];
    buf.read(0, &mut v);
    v
}

//! QEMU's fw_cfg: where a firmware-less aarch64 boot finds ACPI. The tables arrive as blobs with
//! unpatched pointers and checksums; running QEMU's `etc/table-loader` script (as UEFI or
//! SeaBIOS would) lays them out in memory we own and fixes them up.

use crate::mem::frame::PAGE_SIZE;
use crate::mem::phys::{Frames, MmioRegion};
use alloc::vec;
use boot::BootInfo;
use drivers::fw_cfg::{FwCfg, MmioTransport, load_acpi_tables};

/// Room for every blob the loader allocates (QEMU pads `etc/acpi/tables` to 128 KiB).
const ARENA_BYTES: u64 = 1 << 20;

/// Loads the ACPI tables from fw_cfg and returns the RSDP's physical address.
pub fn load_acpi(info: &BootInfo) -> Option<u64> {
    let fdt = super::devicetree::fdt(info)?;
    let region = match iommu::firmware::devicetree::fw_cfg(&fdt)? {
        Ok(r) => r,
        Err(e) => {
            log::warn!("fw_cfg: bad DT node: {e:?}");
            return None;
        }
    };
    let mmio = MmioRegion::new(region.base, region.size.max(0x18)).ok()?;
    let mut fw = match FwCfg::probe(MmioTransport::new(mmio)) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("fw_cfg at {:#x}: {e:?}", region.base);
            return None;
        }
    };
    let script_size = fw.find_file("etc/table-loader").map(|f| f.size as usize)?;
    let mut script = vec![0u8; script_size];
    let mut frames = Frames::alloc(ARENA_BYTES / PAGE_SIZE, PAGE_SIZE, u64::MAX)?;
    let pa = frames.pa();
    let arena = frames.bytes_mut();
    arena.fill(0);
    match load_acpi_tables(&mut fw, &mut script, arena, pa) {
        Ok(t) => {
            // From now on the tables are firmware data: read-only, found by physical address.
            frames.into_firmware();
            log::info!(
                "fw_cfg: ACPI tables loaded at {pa:#x}: {} blobs, {} pointers, {} checksums",
                t.allocations,
                t.pointers,
                t.checksums
            );
            Some(t.rsdp)
        }
        Err(e) => {
            log::warn!("fw_cfg: table loader: {e:?}");
            frames.free();
            None
        }
    }
}

//! ACPI discovery through the `acpi` crate: RSDP validation and the RSDT/XSDT walk. The IOMMU
//! tables it finds (DMAR, IORT) are handed as byte slices to our own parsers in `iommu`.

use crate::mem::phys;
use alloc::vec::Vec;
use core::ptr::NonNull;

/// The `acpi` crate reaches tables through this handler: every table lies in the direct map.
#[derive(Clone, Copy)]
struct DirectMap;

/// Returned for addresses the direct map does not cover, so that a bogus table pointer in a
/// broken RSDT reads as an all-zero header (wrong signature) instead of faulting.
static ZERO_PAGE: [u8; 4096] = [0; 4096];

impl acpi::AcpiHandler for DirectMap {
    unsafe fn map_physical_region<T>(
        &self,
        pa: usize,
        size: usize,
    ) -> acpi::PhysicalMapping<Self, T> {
        let (ptr, size) = match phys::firmware_bytes(pa as u64, size as u64) {
            Ok(bytes) => (bytes.as_ptr(), size),
            // Unmapped (a bogus pointer in a broken root table): the all-zero page fails the
            // crate's signature check, so the table is skipped instead of faulting.
            Err(_) => (ZERO_PAGE.as_ptr(), size.min(ZERO_PAGE.len())),
        };
        let ptr = NonNull::new(ptr as *mut T).expect("slices are never null");
        // SAFETY: `ptr` points to `size` readable bytes (the direct map, or the zero page) that
        // stay mapped forever (see `unmap_physical_region`).
        unsafe { acpi::PhysicalMapping::new(pa, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &acpi::PhysicalMapping<Self, T>) {
        // The direct map is permanent: nothing to undo.
    }
}

/// A table found through the root table: its location and bytes.
#[derive(Clone, Copy)]
pub struct Table {
    pub phys: u64,
    pub bytes: &'static [u8],
}

/// What ACPI told us about IOMMUs and PCI.
pub struct Acpi {
    pub rsdp: u64,
    pub revision: u8,
    pub signatures: Vec<[u8; 4]>,
    pub dmar: Option<Table>,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))] // SMMUs exist on Arm only
    pub iort: Option<Table>,
    pub mcfg: Vec<McfgEntry>,
    /// FADT ARM_BOOT_ARCH (ACPI 6.5 §5.2.9, Table 5.10, offset 129): bit 0 PSCI_COMPLIANT,
    /// bit 1 PSCI_USE_HVC. `None` without a FADT long enough to hold it.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub arm_boot_flags: Option<u16>,
    /// The MADT ("APIC"), GTDT and DBG2, for the aarch64 boot report (GIC, timers, debug ports).
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub madt: Option<Table>,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub gtdt: Option<Table>,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub dbg2: Option<Table>,
}

/// One ECAM window from the MCFG (PCI Firmware 3.3 §4.1.2).
#[derive(Clone, Copy, Debug)]
pub struct McfgEntry {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

macro_rules! raw_table {
    ($name:ident, $sig:ident) => {
        #[repr(C, packed)]
        struct $name {
            header: acpi::sdt::SdtHeader,
        }
        // SAFETY: the struct is exactly the standard header, as `AcpiTable` requires; the body is
        // read separately as bytes.
        unsafe impl acpi::AcpiTable for $name {
            const SIGNATURE: acpi::sdt::Signature = acpi::sdt::Signature::$sig;
            fn header(&self) -> &acpi::sdt::SdtHeader {
                &self.header
            }
        }
    };
}

raw_table!(RawDmar, DMAR);
raw_table!(RawIort, IORT);
raw_table!(RawFadt, FADT);
raw_table!(RawMadt, MADT);
raw_table!(RawGtdt, GTDT);
raw_table!(RawDbg2, DBG2);

fn raw<T: acpi::AcpiTable>(tables: &acpi::AcpiTables<DirectMap>) -> Option<Table> {
    let m = tables.find_table::<T>().ok()?;
    let phys = m.physical_start() as u64;
    let bytes = phys::firmware_bytes(phys, m.region_length() as u64).ok()?;
    Some(Table { phys, bytes })
}

#[derive(Debug)]
pub enum AcpiError {
    NotMapped(u64),
    Crate(acpi::AcpiError),
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiError::NotMapped(pa) => write!(f, "RSDP at {pa:#x} is outside the direct map"),
            AcpiError::Crate(e) => write!(f, "ACPI: {e:?}"),
        }
    }
}

fn sig_bytes(s: &str) -> [u8; 4] {
    s.as_bytes().try_into().unwrap_or(*b"????")
}

/// Walks the RSDP at `rsdp` (located by the boot path, the BIOS-area scan or fw_cfg).
pub fn discover(rsdp: u64) -> Result<Acpi, AcpiError> {
    phys::firmware_bytes(rsdp, 36).map_err(|_| AcpiError::NotMapped(rsdp))?;
    // SAFETY: `rsdp` is mapped (checked above); the crate validates signature and checksum before
    // trusting anything else, and every further address goes through `DirectMap`, which only
    // hands out mapped memory (or the zero page).
    let tables = unsafe { acpi::AcpiTables::from_rsdp(DirectMap, rsdp as usize) }
        .map_err(AcpiError::Crate)?;
    let signatures = tables
        .headers()
        .map(|h| sig_bytes(h.signature.as_str()))
        .collect();
    let mcfg = match tables.find_table::<acpi::mcfg::Mcfg>() {
        Ok(m) => m
            .entries()
            .iter()
            .map(|e| McfgEntry {
                base: e.base_address,
                segment: e.pci_segment_group,
                bus_start: e.bus_number_start,
                bus_end: e.bus_number_end,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    Ok(Acpi {
        rsdp,
        revision: tables.revision(),
        signatures,
        dmar: raw::<RawDmar>(&tables),
        iort: raw::<RawIort>(&tables),
        mcfg,
        arm_boot_flags: raw::<RawFadt>(&tables)
            .and_then(|t| t.bytes.get(129..131))
            .map(|b| u16::from_le_bytes([b[0], b[1]])),
        madt: raw::<RawMadt>(&tables),
        gtdt: raw::<RawGtdt>(&tables),
        dbg2: raw::<RawDbg2>(&tables),
    })
}

#[cfg(target_arch = "x86_64")]
/// The legacy BIOS search for the RSDP (ACPI 6.5 §5.2.5.1): the first KiB of the EBDA and
/// 0xE0000–0xFFFFF, on 16-byte boundaries, signature plus a valid 20-byte checksum.
pub fn find_rsdp_in_bios_area() -> Option<u64> {
    let ebda = phys::firmware_bytes(0x40e, 2)
        .ok()
        .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])) << 4)
        .filter(|e| (0x8_0000..0xa_0000).contains(e));
    let areas = [ebda.map(|e| (e, 1024)), Some((0xe_0000, 0x2_0000))];
    for (start, len) in areas.into_iter().flatten() {
        let Ok(bytes) = phys::firmware_bytes(start, len) else {
            continue;
        };
        for off in (0..bytes.len().saturating_sub(20)).step_by(16) {
            let cand = &bytes[off..off + 20];
            if &cand[..8] == b"RSD PTR " && iommu::firmware::acpi::checksum(cand) == 0 {
                return Some(start + off as u64);
            }
        }
    }
    None
}

//! The ACPI table linker/loader script QEMU publishes as the fw_cfg file `etc/table-loader`.
//!
//! QEMU builds its ACPI tables as fw_cfg blobs with unpatched pointers and zeroed checksums;
//! firmware (or we) must allocate memory for each blob, load it, and patch it as the script
//! says. The script is a sequence of 128-byte little-endian commands: a u32 command number and a
//! 124-byte body (QEMU `hw/acpi/bios-linker-loader.c`, `BiosLinkerLoaderEntry`):
//!
//! | cmd | name | body |
//! | --- | --- | --- |
//! | 1 | ALLOCATE | `file[56]`, `align: u32` (power of 2), `zone: u8` (1 high, 2 FSEG) |
//! | 2 | ADD_POINTER | `dest_file[56]`, `src_file[56]`, `offset: u32`, `size: u8` (1, 2, 4, 8) |
//! | 3 | ADD_CHECKSUM | `file[56]`, `offset: u32`, `start: u32`, `length: u32` |
//! | 4 | WRITE_POINTER | `dest_file[56]`, `src_file[56]`, `dst_offset: u32`, `src_offset: u32`, `size: u8` |
//!
//! ADD_POINTER adds the physical address of `src_file`'s blob to the little-endian integer of
//! `size` bytes at `dest_file[offset]` (which holds an offset into the source blob).
//! ADD_CHECKSUM adds to the byte at `offset` the 8-bit negated sum of bytes `start..start+length`
//! (the ACPI checksum; QEMU zeroes the field and places it inside the range, so the range then
//! sums to 0). WRITE_POINTER asks firmware to write a pointer back into a *writable fw_cfg file*
//! through the DMA interface (GHES, VM generation ID); it is skipped and counted here. Command 0
//! is padding; unknown commands are skipped and counted, so newer QEMUs still load.
//!
//! Everything in the script is untrusted: every name, offset, size, alignment and zone is
//! checked, and a bad command stops the loader with a [`LoaderError`] naming it.

use super::{FILE_NAME_LEN, FwCfg, FwCfgTransport};

/// Size of one loader command.
pub const COMMAND_SIZE: usize = 128;
/// The fw_cfg file holding the script.
pub const TABLE_LOADER_FILE: &str = "etc/table-loader";
/// The blob holding the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const CMD_WRITE_POINTER: u32 = 4;

/// Where firmware would put a blob. FSEG (0xe0000..0x100000) matters to legacy OSes that scan
/// for the RSDP; a store may ignore it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocZone {
    High,
    FSeg,
}

/// Why a [`BlobStore`] could not provide a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobError {
    /// No fw_cfg file of that name.
    NotFound,
    /// No memory left for it.
    NoMemory,
    /// The store tracks no more blobs.
    TooManyBlobs,
}

/// Memory for the blobs the script allocates. The kernel backs it with physical frames it maps;
/// [`ArenaBlobStore`] carves blobs out of one physically contiguous buffer.
pub trait BlobStore {
    /// ALLOCATE: reserve memory for the fw_cfg file `name`, aligned to `align` (a power of two)
    /// in physical address space, fill it with the file's contents, and return its physical
    /// address. Called at most once per name.
    fn allocate(&mut self, name: &[u8], align: u64, zone: AllocZone) -> Result<u64, BlobError>;

    /// A blob allocated earlier: its physical address and its bytes.
    fn blob(&mut self, name: &[u8]) -> Option<(u64, &mut [u8])>;
}

/// What the script did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadedTables {
    /// Physical address of the RSDP (the blob `etc/acpi/rsdp`).
    pub rsdp: u64,
    pub allocations: usize,
    pub pointers: usize,
    pub checksums: usize,
    /// WRITE_POINTER and unknown commands.
    pub skipped: usize,
}

/// A malformed script; `command` is the index of the offending command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoaderError {
    /// The script length is not a multiple of 128.
    Truncated { len: usize },
    /// A file name is empty or has no NUL within its 56 bytes.
    BadName { command: usize },
    /// ALLOCATE with an alignment that is not a power of two.
    BadAlignment { command: usize, align: u32 },
    /// ALLOCATE with a zone other than 1 or 2.
    BadZone { command: usize, zone: u8 },
    /// A second ALLOCATE of the same file.
    DuplicateAllocation { command: usize },
    /// A file used before (or without) its ALLOCATE.
    UnknownFile { command: usize },
    /// The store could not allocate or load the file.
    Store { command: usize, error: BlobError },
    /// ADD_POINTER with a size other than 1, 2, 4 or 8.
    BadPointerSize { command: usize, size: u8 },
    /// An offset or range outside the blob.
    OutOfBounds { command: usize },
    /// The patched pointer does not fit in its `size` bytes (e.g. a 32-bit RSDT entry for a
    /// blob above 4 GiB).
    PointerOverflow { command: usize },
    /// The script never allocated `etc/acpi/rsdp`.
    NoRsdp,
    /// [`load_acpi_tables`]: there is no `etc/table-loader` file.
    NoTableLoader,
    /// [`load_acpi_tables`]: the script is larger than the buffer given for it.
    ScriptTooLarge { size: u32 },
}

/// A NUL-terminated name field.
fn name(field: &[u8], command: usize) -> Result<&[u8], LoaderError> {
    match field.iter().position(|&b| b == 0) {
        Some(0) | None => Err(LoaderError::BadName { command }),
        Some(n) => Ok(&field[..n]),
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Runs the `etc/table-loader` script `commands` against `store`, returning the RSDP's
/// physical address. See the module documentation for the commands.
pub fn run_table_loader(
    commands: &[u8],
    store: &mut dyn BlobStore,
) -> Result<LoadedTables, LoaderError> {
    if !commands.len().is_multiple_of(COMMAND_SIZE) {
        return Err(LoaderError::Truncated {
            len: commands.len(),
        });
    }
    let mut done = LoadedTables::default();
    let mut rsdp = None;
    for (command, c) in commands.chunks_exact(COMMAND_SIZE).enumerate() {
        // Body layout: offsets below are from the start of the 128-byte command.
        match le32(c, 0) {
            0 => {}
            CMD_ALLOCATE => {
                let file = name(&c[4..4 + FILE_NAME_LEN], command)?;
                let align = le32(c, 60);
                let zone = match c[64] {
                    1 => AllocZone::High,
                    2 => AllocZone::FSeg,
                    zone => return Err(LoaderError::BadZone { command, zone }),
                };
                if !align.is_power_of_two() {
                    return Err(LoaderError::BadAlignment { command, align });
                }
                if store.blob(file).is_some() {
                    return Err(LoaderError::DuplicateAllocation { command });
                }
                let addr = store
                    .allocate(file, u64::from(align), zone)
                    .map_err(|error| LoaderError::Store { command, error })?;
                if file == RSDP_FILE.as_bytes() {
                    rsdp = Some(addr);
                }
                done.allocations += 1;
            }
            CMD_ADD_POINTER => {
                let dest = name(&c[4..4 + FILE_NAME_LEN], command)?;
                let src = name(&c[60..60 + FILE_NAME_LEN], command)?;
                let offset = le32(c, 116) as usize;
                let size = c[120];
                if !matches!(size, 1 | 2 | 4 | 8) {
                    return Err(LoaderError::BadPointerSize { command, size });
                }
                let size = usize::from(size);
                let (src_addr, _) = store
                    .blob(src)
                    .ok_or(LoaderError::UnknownFile { command })?;
                let (_, dest) = store
                    .blob(dest)
                    .ok_or(LoaderError::UnknownFile { command })?;
                let field = offset
                    .checked_add(size)
                    .and_then(|end| dest.get_mut(offset..end))
                    .ok_or(LoaderError::OutOfBounds { command })?;
                let mut value = [0u8; 8];
                value[..size].copy_from_slice(field);
                let sum = u64::from_le_bytes(value)
                    .checked_add(src_addr)
                    .filter(|&v| size == 8 || v >> (8 * size) == 0)
                    .ok_or(LoaderError::PointerOverflow { command })?;
                field.copy_from_slice(&sum.to_le_bytes()[..size]);
                done.pointers += 1;
            }
            CMD_ADD_CHECKSUM => {
                let file = name(&c[4..4 + FILE_NAME_LEN], command)?;
                let offset = le32(c, 60) as usize;
                let start = le32(c, 64) as usize;
                let length = le32(c, 68) as usize;
                let (_, blob) = store
                    .blob(file)
                    .ok_or(LoaderError::UnknownFile { command })?;
                let range = start
                    .checked_add(length)
                    .and_then(|end| blob.get(start..end))
                    .ok_or(LoaderError::OutOfBounds { command })?;
                let sum = range.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
                let slot = blob
                    .get_mut(offset)
                    .ok_or(LoaderError::OutOfBounds { command })?;
                *slot = slot.wrapping_sub(sum);
                done.checksums += 1;
            }
            // Writing back to QEMU needs the DMA interface; nothing to patch in memory.
            CMD_WRITE_POINTER => done.skipped += 1,
            _ => done.skipped += 1,
        }
    }
    done.rsdp = rsdp.ok_or(LoaderError::NoRsdp)?;
    Ok(done)
}

/// A [`BlobStore`] over one physically contiguous buffer `arena` that starts at physical
/// address `phys_base`, loading files from `fw_cfg`. Holds up to `N` blobs. The zone is
/// ignored: the hypervisor gets the RSDP address from the result, not by scanning FSEG.
pub struct ArenaBlobStore<'a, T, const N: usize = 8> {
    fw_cfg: &'a mut FwCfg<T>,
    arena: &'a mut [u8],
    phys_base: u64,
    used: usize,
    blobs: [Option<Blob>; N],
}

#[derive(Clone, Copy)]
struct Blob {
    name: [u8; FILE_NAME_LEN],
    name_len: usize,
    start: usize,
    len: usize,
}

impl<'a, T: FwCfgTransport, const N: usize> ArenaBlobStore<'a, T, N> {
    pub fn new(fw_cfg: &'a mut FwCfg<T>, arena: &'a mut [u8], phys_base: u64) -> Self {
        Self {
            fw_cfg,
            arena,
            phys_base,
            used: 0,
            blobs: [None; N],
        }
    }

    /// Bytes of the arena in use (including alignment padding).
    pub const fn used(&self) -> usize {
        self.used
    }
}

impl<T: FwCfgTransport, const N: usize> BlobStore for ArenaBlobStore<'_, T, N> {
    fn allocate(&mut self, name: &[u8], align: u64, _zone: AllocZone) -> Result<u64, BlobError> {
        if name.len() > FILE_NAME_LEN {
            return Err(BlobError::NotFound);
        }
        let slot = self
            .blobs
            .iter()
            .position(Option::is_none)
            .ok_or(BlobError::TooManyBlobs)?;
        let file = self.fw_cfg.find_file(name).ok_or(BlobError::NotFound)?;
        let len = usize::try_from(file.size).map_err(|_| BlobError::NoMemory)?;
        // Align the physical address, not the arena offset.
        let here = self
            .phys_base
            .checked_add(self.used as u64)
            .ok_or(BlobError::NoMemory)?;
        let mask = align.max(1) - 1;
        let pad = (here.checked_add(mask).ok_or(BlobError::NoMemory)? & !mask) - here;
        let start = usize::try_from(pad)
            .ok()
            .and_then(|pad| self.used.checked_add(pad))
            .ok_or(BlobError::NoMemory)?;
        let end = start.checked_add(len).ok_or(BlobError::NoMemory)?;
        let buf = self.arena.get_mut(start..end).ok_or(BlobError::NoMemory)?;
        let n = self.fw_cfg.read_file(&file, buf);
        buf[n..].fill(0);
        let mut stored = [0; FILE_NAME_LEN];
        stored[..name.len()].copy_from_slice(name);
        self.blobs[slot] = Some(Blob {
            name: stored,
            name_len: name.len(),
            start,
            len,
        });
        self.used = end;
        Ok(self.phys_base + start as u64)
    }

    fn blob(&mut self, name: &[u8]) -> Option<(u64, &mut [u8])> {
        let b = self
            .blobs
            .iter()
            .flatten()
            .find(|b| &b.name[..b.name_len] == name)?;
        let (start, len) = (b.start, b.len);
        Some((
            self.phys_base + start as u64,
            &mut self.arena[start..start + len],
        ))
    }
}

/// Reads `etc/table-loader` into `script` and runs it with an [`ArenaBlobStore`] over `arena`
/// (at physical address `phys_base`). Returns the RSDP's physical address among the counts.
pub fn load_acpi_tables<T: FwCfgTransport>(
    fw_cfg: &mut FwCfg<T>,
    script: &mut [u8],
    arena: &mut [u8],
    phys_base: u64,
) -> Result<LoadedTables, LoaderError> {
    let file = fw_cfg
        .find_file(TABLE_LOADER_FILE)
        .ok_or(LoaderError::NoTableLoader)?;
    let size = usize::try_from(file.size).unwrap_or(usize::MAX);
    let script = script
        .get_mut(..size)
        .ok_or(LoaderError::ScriptTooLarge { size: file.size })?;
    fw_cfg.read_file(&file, script);
    let mut store: ArenaBlobStore<'_, T> = ArenaBlobStore::new(fw_cfg, arena, phys_base);
    run_table_loader(script, &mut store)
}

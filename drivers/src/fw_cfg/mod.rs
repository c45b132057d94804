//! The QEMU firmware configuration device (fw_cfg), as specified in QEMU's
//! `docs/specs/fw_cfg.rst`, and the ACPI table loader that runs its `etc/table-loader` script
//! (see [`loader`]).
//!
//! Facts used here (all from `fw_cfg.rst`):
//! - A 16-bit *selector* register picks an item by key and resets the data offset to 0; the
//!   *data* register then returns the item's bytes in order, and 0 past its end.
//! - x86: selector at I/O port 0x510 (little-endian 16-bit), data at 0x511 (8-bit), DMA at 0x514.
//! - MMIO (Arm `virt`, base 0x0902_0000 from the DT node `qemu,fw-cfg-mmio`): data at +0
//!   (8/16/32/64-bit reads; an N-byte read returns the next N bytes "in increasing address
//!   order, similar to memcpy()"), selector at +8 (16-bit, *big-endian*), DMA at +16.
//! - Key 0x0000 holds the signature "QEMU"; key 0x0001 a little-endian u32 feature bitmap (bit 0
//!   traditional interface, bit 1 DMA); key 0x0019 the file directory: a big-endian u32 count,
//!   then 64-byte entries `{ size: be32, select: be16, reserved: u16, name: [u8; 56] }` with a
//!   NUL-terminated name.
//!
//! Only the traditional (register) interface is used: the DMA interface would need a buffer at
//! a known physical address, and the reads here are small except for the ACPI tables.

use core::ops::ControlFlow;

use mmio::Mmio;

pub mod loader;

#[cfg(test)]
mod tests;

pub use loader::{
    AllocZone, ArenaBlobStore, BlobError, BlobStore, LoadedTables, LoaderError, load_acpi_tables,
    run_table_loader,
};

/// Key of the signature item ("QEMU").
pub const KEY_SIGNATURE: u16 = 0x0000;
/// Key of the feature bitmap (little-endian u32).
pub const KEY_ID: u16 = 0x0001;
/// Key of the file directory.
pub const KEY_FILE_DIR: u16 = 0x0019;
/// Keys of directory files start here (`FW_CFG_FILE_FIRST`).
pub const KEY_FILE_FIRST: u16 = 0x0020;
/// Feature bit 1: the DMA interface is present.
pub const FEATURE_DMA: u32 = 1 << 1;

/// x86 I/O ports.
pub const IO_SELECTOR_PORT: u16 = 0x510;
pub const IO_DATA_PORT: u16 = 0x511;
pub const IO_DMA_PORT: u16 = 0x514;

/// MMIO register offsets, and the base on QEMU's Arm `virt` machine.
pub const MMIO_DATA_OFFSET: usize = 0;
pub const MMIO_SELECTOR_OFFSET: usize = 8;
pub const MMIO_DMA_OFFSET: usize = 16;
pub const QEMU_VIRT_BASE: u64 = 0x0902_0000;

/// Length of the name field of a directory entry (`FW_CFG_MAX_FILE_PATH`).
pub const FILE_NAME_LEN: usize = 56;
/// Generic items are keys 0x0000..0x4000 (bit 14 is the legacy write flag, bit 15 the
/// architecture flag), so a directory cannot list more files than this.
pub const MAX_FILES: u32 = 0x4000 - KEY_FILE_FIRST as u32;

/// The 16-bit MMIO store the fw_cfg selector needs: [`mmio::Mmio`] only has 32- and 64-bit
/// accesses, and QEMU accepts only 2-byte accesses to the selector register. The kernel
/// implements this next to its `Mmio` (a volatile `u16` store).
pub trait MmioWrite16 {
    fn write16(&self, offset: usize, value: u16);
}

/// The x86 port I/O fw_cfg needs: a 16-bit `out` to the selector port and 8-bit `in` from the
/// data port. (QEMU treats a 1-byte write to 0x510 as a data write, so the selector really needs
/// a 16-bit access; this is why `uart16550::PortIo`, which is byte-wide, does not suffice.)
pub trait FwCfgPortIo {
    fn read8(&self, port: u16) -> u8;
    fn write16(&self, port: u16, value: u16);
}

/// How the fw_cfg registers are reached.
pub trait FwCfgTransport {
    /// Writes the selector: picks item `key` and rewinds its data offset to 0.
    fn select(&mut self, key: u16);
    /// Reads the next `buf.len()` bytes of the selected item.
    fn read_bytes(&mut self, buf: &mut [u8]);
}

/// fw_cfg over MMIO. Data is read 8 bytes at a time through [`Mmio::read64`]; bytes of the last
/// read that the caller did not ask for are kept for the next `read_bytes`, so the item is
/// still consumed strictly in order.
pub struct MmioTransport<M> {
    mmio: M,
    pending: [u8; 8],
    pending_pos: usize,
}

impl<M: Mmio + MmioWrite16> MmioTransport<M> {
    /// `mmio` covers the device's registers (`reg` of the `qemu,fw-cfg-mmio` DT node).
    pub const fn new(mmio: M) -> Self {
        Self {
            mmio,
            pending: [0; 8],
            pending_pos: 8,
        }
    }

    pub const fn mmio(&self) -> &M {
        &self.mmio
    }
}

impl<M: Mmio + MmioWrite16> FwCfgTransport for MmioTransport<M> {
    fn select(&mut self, key: u16) {
        // Big-endian on MMIO: store the bytes of `key` most significant first, whatever the
        // CPU's byte order.
        self.mmio
            .write16(MMIO_SELECTOR_OFFSET, u16::from_ne_bytes(key.to_be_bytes()));
        self.pending_pos = self.pending.len();
    }

    fn read_bytes(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            if self.pending_pos == self.pending.len() {
                if buf.len() - i >= 8 {
                    let chunk = self.mmio.read64(MMIO_DATA_OFFSET).to_ne_bytes();
                    buf[i..i + 8].copy_from_slice(&chunk);
                    i += 8;
                    continue;
                }
                self.pending = self.mmio.read64(MMIO_DATA_OFFSET).to_ne_bytes();
                self.pending_pos = 0;
            }
            buf[i] = self.pending[self.pending_pos];
            self.pending_pos += 1;
            i += 1;
        }
    }
}

/// fw_cfg over x86 I/O ports (0x510/0x511).
pub struct PortTransport<P> {
    io: P,
}

impl<P: FwCfgPortIo> PortTransport<P> {
    pub const fn new(io: P) -> Self {
        Self { io }
    }

    pub const fn io(&self) -> &P {
        &self.io
    }
}

impl<P: FwCfgPortIo> FwCfgTransport for PortTransport<P> {
    fn select(&mut self, key: u16) {
        // Little-endian on I/O ports: a plain 16-bit `out`.
        self.io.write16(IO_SELECTOR_PORT, key);
    }

    fn read_bytes(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.io.read8(IO_DATA_PORT);
        }
    }
}

/// A directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwCfgFile {
    /// Selector key of the item.
    pub select: u16,
    /// Size in bytes.
    pub size: u32,
    name: [u8; FILE_NAME_LEN],
}

impl FwCfgFile {
    /// Parses a 64-byte directory entry (big-endian size and select).
    pub fn from_entry(entry: &[u8; 64]) -> Self {
        let mut name = [0; FILE_NAME_LEN];
        name.copy_from_slice(&entry[8..]);
        Self {
            size: u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]),
            select: u16::from_be_bytes([entry[4], entry[5]]),
            name,
        }
    }

    /// The name up to its NUL (all 56 bytes if there is none).
    pub fn name(&self) -> &[u8] {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FILE_NAME_LEN);
        &self.name[..len]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwCfgError {
    /// Key 0 did not read "QEMU": no fw_cfg device here.
    BadSignature([u8; 4]),
}

/// A probed fw_cfg device.
pub struct FwCfg<T> {
    transport: T,
    features: u32,
}

impl<T: FwCfgTransport> FwCfg<T> {
    /// Checks the signature and reads the feature bitmap.
    pub fn probe(mut transport: T) -> Result<Self, FwCfgError> {
        let mut sig = [0; 4];
        transport.select(KEY_SIGNATURE);
        transport.read_bytes(&mut sig);
        if &sig != b"QEMU" {
            return Err(FwCfgError::BadSignature(sig));
        }
        let mut id = [0; 4];
        transport.select(KEY_ID);
        transport.read_bytes(&mut id);
        Ok(Self {
            transport,
            features: u32::from_le_bytes(id),
        })
    }

    pub const fn features(&self) -> u32 {
        self.features
    }

    pub const fn has_dma(&self) -> bool {
        self.features & FEATURE_DMA != 0
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Reads the first `buf.len()` bytes of item `key` (zeros past its end).
    pub fn read_item(&mut self, key: u16, buf: &mut [u8]) {
        self.transport.select(key);
        self.transport.read_bytes(buf);
    }

    /// Calls `f` for each directory entry until it breaks. At most [`MAX_FILES`] entries are
    /// read whatever the count says, and the walk stops at an all-zero entry (the device returns
    /// zeros past the directory's end), so a bogus count cannot make this run long.
    pub fn for_each_file(&mut self, mut f: impl FnMut(&FwCfgFile) -> ControlFlow<()>) {
        let mut count = [0; 4];
        self.transport.select(KEY_FILE_DIR);
        self.transport.read_bytes(&mut count);
        let count = u32::from_be_bytes(count).min(MAX_FILES);
        let mut entry = [0u8; 64];
        for _ in 0..count {
            self.transport.read_bytes(&mut entry);
            if entry.iter().all(|&b| b == 0) {
                return;
            }
            if f(&FwCfgFile::from_entry(&entry)).is_break() {
                return;
            }
        }
    }

    /// The directory entry named `name`.
    pub fn find_file(&mut self, name: impl AsRef<[u8]>) -> Option<FwCfgFile> {
        let name = name.as_ref();
        let mut found = None;
        self.for_each_file(|file| {
            if file.name() == name {
                found = Some(*file);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        found
    }

    /// Reads the start of `file` into `buf`; returns how many bytes were read
    /// (`min(buf.len(), file.size)`).
    pub fn read_file(&mut self, file: &FwCfgFile, buf: &mut [u8]) -> usize {
        let n = buf
            .len()
            .min(usize::try_from(file.size).unwrap_or(usize::MAX));
        self.read_item(file.select, &mut buf[..n]);
        n
    }
}

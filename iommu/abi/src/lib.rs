//! The IOMMU hypercall ABI, version 1: what a guest needs to drive the hypervisor's
//! iommufd-like object model (IOAS, HWPT, DEVICE, GROUP, ACCESS).
//!
//! Shared by the hypervisor (`iommu::iommufd`) and by guests. `no_std`, no dependencies, no
//! `unsafe`. The prose contract (what every operation does, every error code it returns and
//! why) is `docs/abi.md`; this crate is its machine-readable half.
//!
//! # Calling convention
//!
//! One hypercall, two arguments: an operation number from [`op`] and the guest-physical
//! address of the operation's argument struct. The return value is `0` on success or a
//! negated error number from [`errno`]. After any failure, [`op::GET_LAST_ERROR`] returns a
//! [`LastError`] with a [`reason`] code naming the exact check that failed.
//!
//! # Argument structs
//!
//! Every struct is `#[repr(C)]`, little-endian, made of naturally aligned `u32`/`u64` fields
//! with no implicit padding, and starts with `size: u32`, the number of bytes the caller
//! provides. The hypervisor reads `size` first, then:
//!
//! * `size < SIZE` (the v1 size of that struct): `EINVAL`;
//! * `size > SIZE`: the bytes past `SIZE` (up to `size`) must all be zero, else `E2BIG`;
//!   `size > MAX_ARG_SIZE` is `E2BIG` as well;
//! * fields named `reserved` must be zero, else `EOPNOTSUPP`; unknown flag bits are
//!   `EOPNOTSUPP`.
//!
//! Output fields (named `out_*`, or marked in/out) are written back only on success, except
//! where `docs/abi.md` says otherwise ([`Destroy`] on `EBUSY`, arrays on `EMSGSIZE`,
//! [`IoasMapBatch::out_done`]).
//!
//! Use [`AbiStruct::encode`] and [`AbiStruct::decode`] to move structs to and from guest
//! memory; they are exact, endian-independent and never panic. [`AbiStruct::encode_words`]
//! and [`AbiStruct::decode_words`] give the same bytes as little-endian 64-bit words, for
//! memory that is read a word at a time (the hypervisor's view of guest RAM).
#![no_std]
#![forbid(unsafe_code)]

/// The ABI version [`GetInfo::out_abi_version`] reports.
pub const ABI_VERSION: u32 = 1;

/// The IOVA, guest-physical and length granule of every mapping.
pub const PAGE_SIZE: u64 = 4096;

/// The largest `size` an argument struct may claim (`E2BIG` above).
pub const MAX_ARG_SIZE: u32 = 4096;

/// Operation numbers (the hypercall's first argument). Any other number is `ENOTTY`.
pub mod op {
    /// [`GetInfo`](super::GetInfo): ABI version, capabilities, limits.
    pub const GET_INFO: u32 = 0x01;
    /// [`Destroy`](super::Destroy): destroy an IOAS or HWPT.
    pub const DESTROY: u32 = 0x02;
    /// [`LastError`](super::LastError): why the previous failing call failed.
    pub const GET_LAST_ERROR: u32 = 0x03;
    /// [`DeviceList`](super::DeviceList): devices assigned to the caller.
    pub const DEVICE_LIST: u32 = 0x04;
    /// [`DeviceReservedRanges`](super::DeviceReservedRanges): the IOVA ranges attaching a device
    /// (its whole group) would reserve, asked before the attach.
    pub const DEVICE_RESERVED_RANGES: u32 = 0x05;
    /// [`IoasAlloc`](super::IoasAlloc).
    pub const IOAS_ALLOC: u32 = 0x10;
    /// [`IoasMap`](super::IoasMap).
    pub const IOAS_MAP: u32 = 0x11;
    /// [`IoasUnmap`](super::IoasUnmap).
    pub const IOAS_UNMAP: u32 = 0x12;
    /// [`IoasMapBatch`](super::IoasMapBatch) over [`MapEntry`](super::MapEntry).
    pub const IOAS_MAP_BATCH: u32 = 0x13;
    /// [`IoasUnmapBatch`](super::IoasUnmapBatch) over [`UnmapEntry`](super::UnmapEntry).
    pub const IOAS_UNMAP_BATCH: u32 = 0x14;
    /// [`IoasCopy`](super::IoasCopy).
    pub const IOAS_COPY: u32 = 0x15;
    /// [`IoasIovaRanges`](super::IoasIovaRanges).
    pub const IOAS_IOVA_RANGES: u32 = 0x16;
    /// [`IoasAllowIovas`](super::IoasAllowIovas).
    pub const IOAS_ALLOW_IOVAS: u32 = 0x17;
    /// [`HwptAlloc`](super::HwptAlloc).
    pub const HWPT_ALLOC: u32 = 0x20;
    /// [`HwptClone`](super::HwptClone).
    pub const HWPT_CLONE: u32 = 0x21;
    /// [`HwptSetDirtyTracking`](super::HwptSetDirtyTracking).
    pub const HWPT_SET_DIRTY_TRACKING: u32 = 0x22;
    /// [`HwptGetDirtyBitmap`](super::HwptGetDirtyBitmap).
    pub const HWPT_GET_DIRTY_BITMAP: u32 = 0x23;
    /// [`DeviceAttach`](super::DeviceAttach): attach a device (or one PASID of it).
    pub const DEVICE_ATTACH: u32 = 0x30;
    /// [`DeviceAttach`](super::DeviceAttach): atomically move an attached device (its whole
    /// group) or PASID to another page table.
    pub const DEVICE_REPLACE: u32 = 0x31;
    /// [`DeviceDetach`](super::DeviceDetach).
    pub const DEVICE_DETACH: u32 = 0x32;

    /// Every v1 operation, for table-driven guests and tests.
    pub const ALL: [u32; 20] = [
        GET_INFO,
        DESTROY,
        GET_LAST_ERROR,
        DEVICE_LIST,
        DEVICE_RESERVED_RANGES,
        IOAS_ALLOC,
        IOAS_MAP,
        IOAS_UNMAP,
        IOAS_MAP_BATCH,
        IOAS_UNMAP_BATCH,
        IOAS_COPY,
        IOAS_IOVA_RANGES,
        IOAS_ALLOW_IOVAS,
        HWPT_ALLOC,
        HWPT_CLONE,
        HWPT_SET_DIRTY_TRACKING,
        HWPT_GET_DIRTY_BITMAP,
        DEVICE_ATTACH,
        DEVICE_REPLACE,
        DEVICE_DETACH,
    ];

    /// The v1 size of the argument struct of `op`, or `None` for an unknown op.
    pub const fn arg_size(op: u32) -> Option<usize> {
        use super::*;
        Some(match op {
            GET_INFO => GetInfo::SIZE,
            DESTROY => Destroy::SIZE,
            GET_LAST_ERROR => LastError::SIZE,
            DEVICE_LIST => DeviceList::SIZE,
            DEVICE_RESERVED_RANGES => DeviceReservedRanges::SIZE,
            IOAS_ALLOC => IoasAlloc::SIZE,
            IOAS_MAP => IoasMap::SIZE,
            IOAS_UNMAP => IoasUnmap::SIZE,
            IOAS_MAP_BATCH => IoasMapBatch::SIZE,
            IOAS_UNMAP_BATCH => IoasUnmapBatch::SIZE,
            IOAS_COPY => IoasCopy::SIZE,
            IOAS_IOVA_RANGES => IoasIovaRanges::SIZE,
            IOAS_ALLOW_IOVAS => IoasAllowIovas::SIZE,
            HWPT_ALLOC => HwptAlloc::SIZE,
            HWPT_CLONE => HwptClone::SIZE,
            HWPT_SET_DIRTY_TRACKING => HwptSetDirtyTracking::SIZE,
            HWPT_GET_DIRTY_BITMAP => HwptGetDirtyBitmap::SIZE,
            DEVICE_ATTACH | DEVICE_REPLACE => DeviceAttach::SIZE,
            DEVICE_DETACH => DeviceDetach::SIZE,
            _ => return None,
        })
    }
}

/// Error numbers (Linux values). A call returns the negated value.
pub mod errno {
    /// Not permitted: the guest-physical memory is not the caller's (or not writable for a
    /// writeable mapping); the object is not guest-destroyable; PASID attach in a
    /// multi-device group.
    pub const EPERM: u32 = 1;
    /// No such object (or not the caller's, or of the wrong kind); no mapping in the range; a
    /// range cuts through a mapping.
    pub const ENOENT: u32 = 2;
    /// Hardware malfunction (invalidation time-out, ...).
    pub const EIO: u32 = 5;
    /// `size` larger than the v1 struct with non-zero trailing bytes, or above
    /// [`MAX_ARG_SIZE`](super::MAX_ARG_SIZE).
    pub const E2BIG: u32 = 7;
    /// Out of memory (object table pages, page-table pages, hardware structures).
    pub const ENOMEM: u32 = 12;
    /// The argument struct or an array it points to is not readable/writable guest memory.
    pub const EFAULT: u32 = 14;
    /// The object is in use (destroy, see [`Destroy`](super::Destroy)); the device or PASID
    /// is already attached (use REPLACE); pinned by an ACCESS.
    pub const EBUSY: u32 = 16;
    /// The IOVA range overlaps an existing mapping.
    pub const EEXIST: u32 = 17;
    /// The device's group is attached to a different page table.
    pub const EXDEV: u32 = 18;
    /// A field has an invalid value (zero length, misalignment, wrong object kind as a
    /// target, not attached for REPLACE, ...).
    pub const EINVAL: u32 = 22;
    /// Unknown operation number.
    pub const ENOTTY: u32 = 25;
    /// No IOVA hole fits, or a fixed-capacity table (objects, areas, HWPTs per IOAS, PASIDs per
    /// device, pins per ACCESS, the 128 ranges of an IOAS's reserved set) is full.
    pub const ENOSPC: u32 = 28;
    /// PASID outside the device's PASID width.
    pub const ERANGE: u32 = 34;
    /// Address arithmetic overflows 64 bits.
    pub const EOVERFLOW: u32 = 75;
    /// The output array is too small; the count field holds the required count.
    pub const EMSGSIZE: u32 = 90;
    /// Unknown flag, non-zero reserved field, or a feature the hardware lacks.
    pub const EOPNOTSUPP: u32 = 95;
    /// The IOVA range is reserved (device reserved region, MSI window, outside the aperture),
    /// or a reserved region would collide with a mapping or an allowed range.
    pub const EADDRINUSE: u32 = 98;
    /// Cache-coherency mismatch: a device that cannot enforce cache coherency and a page
    /// table that enforces it.
    pub const EMEDIUMTYPE: u32 = 124;
}

/// Reason codes reported by [`LastError::out_reason`]: which check failed.
pub mod reason {
    pub const NONE: u32 = 0;
    /// The argument struct (or its trailing bytes) is not readable or writable.
    pub const ARG_FAULT: u32 = 1;
    pub const ARG_TOO_SHORT: u32 = 2;
    pub const ARG_TRAILING_NONZERO: u32 = 3;
    pub const ARG_RESERVED_NONZERO: u32 = 4;
    pub const ARG_UNKNOWN_FLAGS: u32 = 5;
    pub const UNKNOWN_OP: u32 = 6;
    /// No object with this ID belongs to the caller.
    pub const BAD_ID: u32 = 7;
    /// The object exists but is of the wrong kind for this field.
    pub const WRONG_KIND: u32 = 8;
    /// An array the struct points to is not readable/writable guest memory.
    pub const ARRAY_FAULT: u32 = 9;
    /// A guest-physical range is not (writably, for a writeable mapping) owned by the caller.
    pub const GPA_NOT_OWNED: u32 = 10;
    pub const ZERO_LENGTH: u32 = 20;
    pub const MISALIGNED: u32 = 21;
    pub const OVERFLOW: u32 = 22;
    /// Neither READABLE nor WRITEABLE.
    pub const NO_PROT: u32 = 23;
    /// EEXIST: overlaps the mapping starting at `out_value`.
    pub const IOVA_IN_USE: u32 = 24;
    /// EADDRINUSE: overlaps the reserved range starting at `out_value`.
    pub const IOVA_RESERVED: u32 = 25;
    /// ENOSPC: no IOVA hole fits.
    pub const NO_IOVA_SPACE: u32 = 26;
    /// ENOENT: nothing mapped in the range.
    pub const NOT_MAPPED: u32 = 27;
    /// ENOENT: the range cuts through the mapping starting at `out_value`.
    pub const SPLITS_MAPPING: u32 = 28;
    /// ENOSPC: the IOAS's mapping table is full.
    pub const AREA_TABLE_FULL: u32 = 29;
    /// EINVAL: ranges in one request overlap each other.
    pub const RANGES_OVERLAP: u32 = 30;
    /// EINVAL: more array entries than the limit. EMSGSIZE: an output array too small.
    /// ENOSPC: an IOAS's reserved set would need more than
    /// [`MAX_RESERVED_RANGES_PER_IOAS`](super::MAX_RESERVED_RANGES_PER_IOAS) disjoint ranges.
    pub const TOO_MANY: u32 = 31;
    /// EBUSY: pinned by the ACCESS named in `out_object_id`.
    pub const PINNED: u32 = 32;
    /// EINVAL/ENOENT: the range is not fully covered by contiguous mappings.
    pub const NOT_COVERED: u32 = 33;
    /// EBUSY: the object is in use; `out_object_kind`/`out_object_id` name one blocker.
    pub const BUSY: u32 = 40;
    /// EPERM: DEVICE, GROUP and ACCESS objects belong to the hypervisor.
    pub const NOT_DESTROYABLE: u32 = 41;
    /// ENOSPC: the caller's object table is full.
    pub const OBJECT_TABLE_FULL: u32 = 42;
    /// ENOSPC: the IOAS has the maximum number of HWPTs.
    pub const HWPT_TABLE_FULL: u32 = 43;
    /// EXDEV: the group is attached to the HWPT named in `out_object_id`.
    pub const GROUP_ATTACHED_ELSEWHERE: u32 = 50;
    /// EBUSY: already attached (use REPLACE).
    pub const ALREADY_ATTACHED: u32 = 51;
    /// EINVAL: REPLACE of something not attached.
    pub const NOT_ATTACHED: u32 = 52;
    /// EMEDIUMTYPE: the device named in `out_object_id` (maybe another member of the group)
    /// cannot enforce cache coherency.
    pub const CC_UNSUPPORTED_BY_DEVICE: u32 = 53;
    /// The device named in `out_object_id` cannot do dirty tracking.
    pub const DIRTY_UNSUPPORTED_BY_DEVICE: u32 = 54;
    /// EINVAL: the hardware cannot attach this device to this page table (other IOMMU unit,
    /// aperture, ...).
    pub const HW_INCOMPATIBLE: u32 = 55;
    /// EOPNOTSUPP: the device has no PASID support.
    pub const PASID_UNSUPPORTED: u32 = 56;
    /// ERANGE: PASID beyond the device's width (or PASID 0, which is the RID itself: EINVAL).
    pub const PASID_OUT_OF_RANGE: u32 = 57;
    /// EPERM: PASID attach in a group with more than one device.
    pub const PASID_MULTI_DEVICE_GROUP: u32 = 58;
    /// ENOSPC: the device has the maximum number of attached PASIDs.
    pub const PASID_TABLE_FULL: u32 = 59;
    /// EADDRINUSE: a reserved range of the group collides with the mapping at `out_value`.
    pub const RESERVED_OVERLAPS_MAPPING: u32 = 60;
    /// EADDRINUSE: a reserved range of the group lies inside an allowed range (`out_value` =
    /// the reserved range's start).
    pub const RESERVED_IN_ALLOWED: u32 = 61;
    /// EOPNOTSUPP: nested page tables are not supported by the hardware.
    pub const NESTING_UNSUPPORTED: u32 = 62;
    /// EOPNOTSUPP: unknown `data_type`.
    pub const DATA_TYPE_UNSUPPORTED: u32 = 63;
    /// EINVAL: an ACCESS attaches only to an IOAS, without PASID.
    pub const ACCESS_TARGET: u32 = 64;
    /// EADDRINUSE: a new page table would not cover the existing mapping at `out_value` (it
    /// lies outside the page table's aperture).
    pub const MAPPING_OUTSIDE_APERTURE: u32 = 65;
    /// ENOMEM.
    pub const NO_MEMORY: u32 = 70;
    /// EIO.
    pub const HW_FAULT: u32 = 71;
    /// EOPNOTSUPP: the HWPT was not created with DIRTY_TRACKING.
    pub const DIRTY_NOT_SUPPORTED_BY_HWPT: u32 = 72;
    /// EINVAL: the bitmap would be larger than [`MAX_DIRTY_BITMAP_BITS`](super::MAX_DIRTY_BITMAP_BITS).
    pub const BITMAP_TOO_LARGE: u32 = 73;
    /// EINVAL: `page_size` is not a power of two of at least [`PAGE_SIZE`](super::PAGE_SIZE).
    pub const BAD_PAGE_SIZE: u32 = 74;
    /// EINVAL: PASID 0 names the RID; attach without the PASID flag.
    pub const PASID_ZERO: u32 = 75;
}

/// Object kinds ([`LastError::out_object_kind`], [`Destroy::out_blocker_kind`]).
pub mod kind {
    pub const NONE: u32 = 0;
    pub const IOAS: u32 = 1;
    pub const HWPT: u32 = 2;
    pub const DEVICE: u32 = 3;
    pub const GROUP: u32 = 4;
    pub const ACCESS: u32 = 5;
}

/// [`GetInfo::out_capabilities`] bits.
pub mod cap {
    /// At least one assigned device supports PASIDs.
    pub const PASID: u64 = 1 << 0;
    /// At least one assigned device supports dirty tracking.
    pub const DIRTY_TRACKING: u64 = 1 << 1;
    /// At least one assigned device can enforce cache coherency.
    pub const ENFORCE_CACHE_COHERENCY: u64 = 1 << 2;
    /// Nested (stage-1 over stage-2) HWPTs can be allocated.
    pub const NESTING: u64 = 1 << 3;
}

/// Flags of [`IoasMap`], [`MapEntry`] and [`IoasCopy`].
pub const MAP_FIXED_IOVA: u32 = 1 << 0;
pub const MAP_WRITEABLE: u32 = 1 << 1;
pub const MAP_READABLE: u32 = 1 << 2;

/// [`IoasMapBatch::flags`] / [`IoasUnmapBatch::flags`]: all entries or none.
pub const BATCH_ATOMIC: u32 = 1 << 0;
/// The most entries one batch call takes.
pub const MAX_BATCH: u32 = 64;

/// [`HwptAlloc::flags`] and [`HwptClone::flags`].
pub const HWPT_NEST_PARENT: u32 = 1 << 0;
pub const HWPT_DIRTY_TRACKING: u32 = 1 << 1;
pub const HWPT_ENFORCE_CACHE_COHERENCY: u32 = 1 << 2;
/// [`HwptAlloc::data_type`]: no driver data (the only v1 type).
pub const HWPT_DATA_NONE: u32 = 0;

/// [`DeviceAttach::flags`] / [`DeviceDetach::flags`]: the `pasid` field is meaningful.
/// Without it `pasid` is a reserved field: non-zero is `EOPNOTSUPP`
/// ([`reason::ARG_RESERVED_NONZERO`]).
pub const ATTACH_PASID: u32 = 1 << 0;

/// Disjoint ranges an IOAS's reserved set can hold (after merging overlapping and adjacent
/// ones); an attach or HWPT creation needing more fails with `ENOSPC`
/// ([`reason::TOO_MANY`]).
pub const MAX_RESERVED_RANGES_PER_IOAS: u32 = 128;

/// [`HwptSetDirtyTracking::flags`]: set to enable (clearing every dirty bit first), clear
/// to disable (the bits recorded so far are kept for GET_DIRTY_BITMAP; nothing new is
/// recorded).
pub const DIRTY_TRACKING_ENABLE: u32 = 1 << 0;
/// [`HwptGetDirtyBitmap::flags`]: read without clearing.
pub const DIRTY_BITMAP_NO_CLEAR: u32 = 1 << 0;
/// The most bits one GET_DIRTY_BITMAP call reports.
pub const MAX_DIRTY_BITMAP_BITS: u64 = 1 << 18;

/// [`DeviceEntry::flags`].
pub const DEVICE_ENFORCE_CACHE_COHERENCY: u32 = 1 << 0;
pub const DEVICE_DIRTY_TRACKING: u32 = 1 << 1;
pub const DEVICE_PASID: u32 = 1 << 2;
/// The device's group is attached (its DMA is translated), by this device or another member.
pub const DEVICE_GROUP_ATTACHED: u32 = 1 << 3;

/// [`ReservedRange::kind`].
pub mod resv {
    /// The interrupt (MSI) window.
    pub const MSI: u32 = 1;
    /// A direct-mapped region the firmware requires (RMRR, IORT RMR).
    pub const DIRECT: u32 = 2;
    /// Otherwise reserved by the platform.
    pub const RESERVED: u32 = 3;
    /// Outside the device's input address range.
    pub const APERTURE: u32 = 4;
}

/// A struct of the ABI: fixed v1 size, little-endian encoding.
pub trait AbiStruct: Sized + Copy + Default {
    /// Bytes of the v1 layout.
    const SIZE: usize;
    /// Encodes into `out`: byte `i` of the encoding goes to `out[i]` for `i < out.len()`.
    fn encode(&self, out: &mut [u8]);
    /// Decodes from `bytes`; fields (or parts) beyond `bytes.len()` read as zero.
    fn decode(bytes: &[u8]) -> Self;
    /// Encodes into little-endian 64-bit words (word `k` holds bytes `8k..8k + 8` of the
    /// encoding, byte `8k + i` in bits `8i..8i + 8`); words beyond `out.len()` are dropped.
    /// The same bytes as [`encode`](Self::encode), without byte-wise stores: on a target that
    /// may not access memory unaligned (aarch64-unknown-none), a byte buffer is copied and
    /// decoded one byte at a time.
    fn encode_words(&self, out: &mut [u64]);
    /// Decodes from little-endian 64-bit words (as [`encode_words`](Self::encode_words) lays
    /// them out); words beyond `words.len()` read as zero.
    fn decode_words(words: &[u64]) -> Self;
}

/// Byte-wise store of `bytes` at `off`, dropping what falls beyond `out` (the slow path of
/// `encode` for a short output).
fn put(out: &mut [u8], off: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(o) = out.get_mut(off + i) {
            *o = b;
        }
    }
}

/// Byte-wise load of `N` bytes at `off`, zero beyond `b` (the slow path of `decode` for a
/// short input).
fn get<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    for (i, x) in a.iter_mut().enumerate() {
        if let Some(&v) = b.get(off + i) {
            *x = v;
        }
    }
    a
}

/// `N` bytes at the constant offset `off` of a whole struct's bytes: with `S` and `off`
/// known at compile time the range check folds away, so a field is one load.
#[inline(always)]
fn field<const N: usize, const S: usize>(b: &[u8; S], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

macro_rules! abi_struct {
    ($(#[$m:meta])* $name:ident { $( $(#[$fm:meta])* $f:ident : $t:ty ),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $( $(#[$fm])* pub $f: $t, )* }

        impl $name {
            /// Bytes of the v1 layout.
            pub const SIZE: usize = core::mem::size_of::<$name>();
        }

        impl AbiStruct for $name {
            const SIZE: usize = core::mem::size_of::<$name>();
            fn encode(&self, out: &mut [u8]) {
                // The whole struct fits (every caller but a short output): one store per field.
                if let Some(w) = out.first_chunk_mut::<{ core::mem::size_of::<$name>() }>() {
                    $(
                        let off = core::mem::offset_of!($name, $f);
                        w[off..off + core::mem::size_of::<$t>()]
                            .copy_from_slice(&self.$f.to_le_bytes());
                    )*
                    return;
                }
                $( put(out, core::mem::offset_of!($name, $f), &self.$f.to_le_bytes()); )*
            }
            fn decode(b: &[u8]) -> Self {
                // The whole struct is there (every caller but a short input): one load per field.
                if let Some(w) = b.first_chunk::<{ core::mem::size_of::<$name>() }>() {
                    return $name {
                        $( $f: <$t>::from_le_bytes(field(w, core::mem::offset_of!($name, $f))), )*
                    };
                }
                $name { $( $f: <$t>::from_le_bytes(get(b, core::mem::offset_of!($name, $f))), )* }
            }
            fn encode_words(&self, out: &mut [u64]) {
                const WORDS: usize = core::mem::size_of::<$name>() / 8;
                let mut w = [0u64; WORDS];
                $(
                    // A field never straddles two words (natural alignment): its bytes are
                    // bits 8i.. of word off / 8, i = off % 8. Folded to a shift and an or.
                    let off = core::mem::offset_of!($name, $f);
                    let mut b = w[off / 8].to_le_bytes();
                    b[off % 8..off % 8 + core::mem::size_of::<$t>()]
                        .copy_from_slice(&self.$f.to_le_bytes());
                    w[off / 8] = u64::from_le_bytes(b);
                )*
                match out.first_chunk_mut::<WORDS>() {
                    Some(o) => *o = w,
                    None => {
                        let n = out.len();
                        out.copy_from_slice(&w[..n]);
                    }
                }
            }
            fn decode_words(words: &[u64]) -> Self {
                const WORDS: usize = core::mem::size_of::<$name>() / 8;
                let mut padded = [0u64; WORDS];
                let w = match words.first_chunk::<WORDS>() {
                    Some(w) => w,
                    None => {
                        padded[..words.len()].copy_from_slice(words);
                        &padded
                    }
                };
                $name {
                    $( $f: <$t>::from_le_bytes(field(
                        &w[core::mem::offset_of!($name, $f) / 8].to_le_bytes(),
                        core::mem::offset_of!($name, $f) % 8,
                    )), )*
                }
            }
        }

        // No implicit padding: the fields tile the struct exactly, and its size is a multiple
        // of 8 so arrays of it keep `u64` fields aligned.
        const _: () = assert!(0 $(+ core::mem::size_of::<$t>())* == core::mem::size_of::<$name>());
        const _: () = assert!(core::mem::size_of::<$name>() % 8 == 0);
    };
}

abi_struct! {
    /// `GET_INFO` (in: `size`, `flags` = 0).
    GetInfo {
        size: u32,
        flags: u32,
        out_abi_version: u32,
        /// Devices assigned to the caller (what DEVICE_LIST returns).
        out_num_devices: u32,
        /// [`cap`] bits.
        out_capabilities: u64,
        /// The IOVA/GPA/length granule: [`PAGE_SIZE`].
        out_iova_alignment: u64,
        out_max_objects: u32,
        out_max_areas_per_ioas: u32,
        out_max_batch: u32,
        out_max_hwpts_per_ioas: u32,
        out_max_pasids_per_device: u32,
        out_max_allowed_iovas: u32,
    }
}

abi_struct! {
    /// `DESTROY`. On `EBUSY` the `out_blocker_*` fields are written: one object that blocks
    /// the destroy and how many blockers there are.
    Destroy {
        size: u32,
        id: u32,
        out_blocker_kind: u32,
        out_blocker_id: u32,
        out_blocker_count: u32,
        reserved: u32,
    }
}

abi_struct! {
    /// `GET_LAST_ERROR`: the caller's most recent failed call (calls that succeed do not change
    /// it; GET_LAST_ERROR never does).
    LastError {
        size: u32,
        flags: u32,
        /// The op that failed (0: none yet).
        out_op: u32,
        /// Positive errno it returned.
        out_errno: u32,
        /// [`reason`] code.
        out_reason: u32,
        /// [`kind`] and ID of the object the reason names, if any.
        out_object_kind: u32,
        out_object_id: u32,
        /// Batch entry index or array index the error concerns (0 otherwise).
        out_index: u32,
        /// An address the reason names (conflicting mapping or reserved range start), or 0.
        out_value: u64,
    }
}

abi_struct! {
    /// `DEVICE_LIST`: `num_devices` in = capacity of the array at `devices_gpa` (entries of
    /// [`DeviceEntry`]), out = devices assigned. `EMSGSIZE` if the capacity is too small (the
    /// array is filled as far as it goes and `num_devices` is still written).
    DeviceList {
        size: u32,
        flags: u32,
        num_devices: u32,
        reserved: u32,
        devices_gpa: u64,
    }
}

abi_struct! {
    /// One device in a [`DeviceList`] array.
    DeviceEntry {
        dev_id: u32,
        group_id: u32,
        /// `DEVICE_*` flags.
        flags: u32,
        /// log2 of the number of PASIDs (0: no PASID support).
        pasid_bits: u32,
        /// The platform's identity for the device (PCI: segment << 16 | bus << 8 | devfn).
        hw_id: u64,
        /// The HWPT this device is attached to (by its own ATTACH; 0 if none).
        attached_hwpt: u32,
        /// Devices in its group (1 for an isolated device).
        group_members: u32,
    }
}

abi_struct! {
    /// `DEVICE_RESERVED_RANGES`: what attaching `dev_id` would reserve in an IOAS: the reserved
    /// regions of **every** member of its group and the IOVA outside their apertures. Array of
    /// [`ReservedRange`] at `ranges_gpa`, `num_ranges` in = capacity, out = count (`EMSGSIZE`
    /// if too small).
    DeviceReservedRanges {
        size: u32,
        dev_id: u32,
        num_ranges: u32,
        flags: u32,
        ranges_gpa: u64,
    }
}

abi_struct! {
    /// One entry of [`DeviceReservedRanges`]; `last` is inclusive.
    ReservedRange {
        start: u64,
        last: u64,
        /// [`resv`] kind.
        kind: u32,
        /// The group member that imposes it.
        dev_id: u32,
    }
}

abi_struct! {
    /// `IOAS_ALLOC`.
    IoasAlloc {
        size: u32,
        flags: u32,
        out_ioas_id: u32,
        reserved: u32,
    }
}

abi_struct! {
    /// `IOAS_MAP`: map guest-physical `[gpa, gpa + length)` at IOVA `iova` (in with
    /// [`MAP_FIXED_IOVA`], else out).
    IoasMap {
        size: u32,
        flags: u32,
        ioas_id: u32,
        reserved: u32,
        gpa: u64,
        length: u64,
        iova: u64,
    }
}

abi_struct! {
    /// `IOAS_UNMAP`: unmap every mapping inside `[iova, iova + length)`, all or nothing;
    /// `length` out = bytes unmapped. `iova = 0, length = u64::MAX` unmaps everything.
    IoasUnmap {
        size: u32,
        flags: u32,
        ioas_id: u32,
        reserved: u32,
        iova: u64,
        length: u64,
    }
}

abi_struct! {
    /// `IOAS_MAP_BATCH`: `num_entries` [`MapEntry`] at `entries_gpa`, done in order.
    /// `out_done` is written on success **and** on failure: the entries completed (without
    /// [`BATCH_ATOMIC`] they stay mapped; with it a failure undoes them all and `out_done` is
    /// 0). Each completed entry's `iova` is written back.
    IoasMapBatch {
        size: u32,
        flags: u32,
        ioas_id: u32,
        num_entries: u32,
        out_done: u32,
        reserved: u32,
        entries_gpa: u64,
    }
}

abi_struct! {
    /// One entry of [`IoasMapBatch`], with the fields and meaning of [`IoasMap`].
    MapEntry {
        flags: u32,
        reserved: u32,
        gpa: u64,
        length: u64,
        iova: u64,
    }
}

abi_struct! {
    /// `IOAS_UNMAP_BATCH`: `num_entries` [`UnmapEntry`] at `entries_gpa`; progress as for
    /// [`IoasMapBatch`] (with [`BATCH_ATOMIC`] every entry is validated before any unmap).
    IoasUnmapBatch {
        size: u32,
        flags: u32,
        ioas_id: u32,
        num_entries: u32,
        out_done: u32,
        reserved: u32,
        entries_gpa: u64,
    }
}

abi_struct! {
    /// One entry of [`IoasUnmapBatch`]: as [`IoasUnmap`]; `length` out = bytes unmapped.
    UnmapEntry {
        iova: u64,
        length: u64,
    }
}

abi_struct! {
    /// `IOAS_COPY`: map at `dst_iova` of `dst_ioas_id` the guest memory that
    /// `[src_iova, src_iova + length)` of `src_ioas_id` maps (fully covered by contiguous
    /// mappings). Flags as [`IoasMap`].
    IoasCopy {
        size: u32,
        flags: u32,
        dst_ioas_id: u32,
        src_ioas_id: u32,
        length: u64,
        dst_iova: u64,
        src_iova: u64,
    }
}

abi_struct! {
    /// `IOAS_IOVA_RANGES`: the IOVA ranges usable for MAP now, as [`IovaRange`] at
    /// `ranges_gpa`; `num_iovas` in = capacity, out = count (`EMSGSIZE` if too small).
    IoasIovaRanges {
        size: u32,
        ioas_id: u32,
        num_iovas: u32,
        reserved: u32,
        ranges_gpa: u64,
        out_iova_alignment: u64,
    }
}

abi_struct! {
    /// An inclusive IOVA range.
    IovaRange {
        start: u64,
        last: u64,
    }
}

abi_struct! {
    /// `IOAS_ALLOW_IOVAS`: replace the IOAS's allowed list by `num_iovas` [`IovaRange`] at
    /// `ranges_gpa` (0 clears it).
    IoasAllowIovas {
        size: u32,
        ioas_id: u32,
        num_iovas: u32,
        reserved: u32,
        ranges_gpa: u64,
    }
}

abi_struct! {
    /// `HWPT_ALLOC`: a paging HWPT mirroring IOAS `pt_id`, built for the hardware behind
    /// `dev_id`.
    HwptAlloc {
        size: u32,
        /// `HWPT_*` flags.
        flags: u32,
        dev_id: u32,
        pt_id: u32,
        out_hwpt_id: u32,
        /// [`HWPT_DATA_NONE`].
        data_type: u32,
        data_len: u32,
        reserved: u32,
        data_gpa: u64,
    }
}

abi_struct! {
    /// `HWPT_CLONE`: a new paging HWPT on the same IOAS as `src_hwpt_id`, with `flags`.
    HwptClone {
        size: u32,
        flags: u32,
        src_hwpt_id: u32,
        dev_id: u32,
        out_hwpt_id: u32,
        reserved: u32,
    }
}

abi_struct! {
    /// `DEVICE_ATTACH` and `DEVICE_REPLACE`: `pt_id` in = an IOAS or HWPT, out = the HWPT
    /// actually attached.
    DeviceAttach {
        size: u32,
        /// [`ATTACH_PASID`].
        flags: u32,
        dev_id: u32,
        pt_id: u32,
        pasid: u32,
        reserved: u32,
    }
}

abi_struct! {
    /// `DEVICE_DETACH`.
    DeviceDetach {
        size: u32,
        /// [`ATTACH_PASID`].
        flags: u32,
        dev_id: u32,
        pasid: u32,
    }
}

abi_struct! {
    /// `HWPT_SET_DIRTY_TRACKING`.
    HwptSetDirtyTracking {
        size: u32,
        /// [`DIRTY_TRACKING_ENABLE`].
        flags: u32,
        hwpt_id: u32,
        reserved: u32,
    }
}

abi_struct! {
    /// `HWPT_GET_DIRTY_BITMAP`: bit `n` of the bitmap at `bitmap_gpa` (byte `n / 8`, bit
    /// `n % 8`) is set iff `[iova + n * page_size, + page_size)` was written since the last
    /// clear.
    HwptGetDirtyBitmap {
        size: u32,
        /// [`DIRTY_BITMAP_NO_CLEAR`].
        flags: u32,
        hwpt_id: u32,
        reserved: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap_gpa: u64,
    }
}

/// Platform calls: the guest's console and exit, in the same op-number space as [`op`] (the
/// range 0xF0-0xFF is reserved for them, so no IOMMU op will ever take these numbers). They take
/// their arguments in registers, not in an argument struct (docs/abi.md §2.1); they are not in
/// [`op::ALL`].
pub mod platform {
    /// Write `arg1` bytes at guest-physical `arg0` to the guest's console. Returns the number of
    /// bytes written, `-EFAULT` if the range is not the guest's RAM, `-EINVAL` above
    /// [`CONSOLE_WRITE_MAX`].
    pub const CONSOLE_WRITE: u32 = 0xF0;
    /// End the calling guest with exit status `arg0` (low 32 bits). Does not return.
    pub const EXIT: u32 = 0xF1;
    /// Ask the hypervisor to watch `arg1` bytes of the caller's RAM at guest-physical `arg0`
    /// (at most 1 MiB) that the caller will not change again: the hypervisor hashes them now and
    /// again whenever another guest ends and when the caller ends, and reports whether they
    /// changed (a test of isolation no guest can fake). 0, `-EINVAL` for an empty or too long
    /// range, `-EFAULT` if it is not all the caller's RAM.
    pub const GUARD: u32 = 0xF2;
    /// The most bytes one CONSOLE_WRITE accepts.
    pub const CONSOLE_WRITE_MAX: u64 = 4096;
}

/// The start-info page a guest finds at entry (docs/guests.md "Entry state"): its address is in
/// the first argument register (x86_64 RDI, aarch64 x0). All fields little-endian.
pub mod start_info {
    /// `u32` at offset 0: [`MAGIC`].
    pub const OFF_MAGIC: usize = 0;
    /// `u32` at offset 4: [`VERSION`].
    pub const OFF_VERSION: usize = 4;
    /// `u64`: bytes of guest RAM, starting at guest-physical 0.
    pub const OFF_MEM_BYTES: usize = 8;
    /// `u64`: guest-physical address of the guest's command line (UTF-8, not NUL-terminated).
    pub const OFF_CMDLINE_GPA: usize = 16;
    /// `u64`: length of the command line in bytes.
    pub const OFF_CMDLINE_LEN: usize = 24;
    /// `u64`: first guest-physical byte not used by the loader (image end, page aligned); free
    /// RAM is from here to the stack.
    pub const OFF_FREE_START: usize = 32;
    /// `u32`: number of devices assigned to the guest (entries at [`OFF_DEVICES`]).
    pub const OFF_DEVICE_COUNT: usize = 40;
    /// `u32`: number of vCPUs of the guest (0 from a hypervisor that predates the field: read
    /// it as 1). See [`smp`](super::smp) for how the other vCPUs start.
    pub const OFF_VCPU_COUNT: usize = 44;
    /// The device entries, [`DEVICE_ENTRY`] bytes each, at most [`MAX_DEVICES`]:
    /// `u16` PCI segment, `u8` bus, `u8` devfn (device << 3 | function), `u16` vendor ID,
    /// `u16` device ID, `u32` the device's ABI `dev_id` (DEVICE_ATTACH), `u32` reserved, then
    /// for BARs 0-5 a `u64` guest-physical address and a `u64` size each (0, 0 for a BAR that
    /// is absent, an I/O BAR, or the upper half of a 64-bit BAR).
    pub const OFF_DEVICES: usize = 48;
    pub const DEVICE_ENTRY: usize = 112;
    pub const MAX_DEVICES: usize = 8;
    /// "HVSI".
    pub const MAGIC: u32 = u32::from_le_bytes(*b"HVSI");
    pub const VERSION: u32 = 1;
    /// The most command-line bytes the hypervisor passes.
    pub const CMDLINE_MAX: usize = 1024;
}

/// Several vCPUs (docs/guests.md "Several vCPUs"): a guest configured with `vcpus=N` has N
/// vCPUs, all started at once at the ELF entry point in the state vCPU 0 gets, with two
/// differences:
///
/// * the vCPU index (0 to N-1) is in the second argument register: `entry(start_info, index)`,
///   RSI on x86_64, x1 on aarch64 (0 for vCPU 0, whose registers are otherwise unchanged from the
///   single-vCPU protocol);
/// * vCPUs other than 0 get no stack: RSP / SP is 0, and the guest's entry code loads a stack
///   of its own choosing, derived from the index, before anything is pushed (a guest that
///   forgets faults at its first push instead of corrupting vCPU 0's stack).
///
/// All vCPUs share the guest's RAM, objects and console; the number of vCPUs is in the start-info
/// page ([`start_info::OFF_VCPU_COUNT`]); on aarch64 MPIDR_EL1.Aff0 is the index too. Any vCPU's
/// EXIT ends the whole guest, and a vCPU that is stopped (a wild access, a forbidden
/// instruction) stops the whole guest: its other vCPUs do not run again.
pub mod smp {
    /// The register that carries the vCPU index at entry, by architecture.
    pub const X86_64_INDEX_REGISTER: &str = "rsi";
    pub const AARCH64_INDEX_REGISTER: &str = "x1";
}

/// The aarch64 hypercall entry (docs/abi.md §2.2): `HVC #0` with an SMC Calling Convention
/// (Arm DEN0028) function ID in x0, in the vendor-specific hypervisor service range (owner 6).
/// The guest puts [`function_id`]`(op)` in x0; the hypervisor [`classify`]s what it finds there.
pub mod smccc {
    /// Fast call (bit 31), SMC64 (bit 30), owner 6 (bits 29:24), function number 0.
    pub const HV_SMC64_BASE: u32 = 0xC600_0000;
    /// The same owner with the SMC32 convention (bit 30 clear).
    pub const HV_SMC32_BASE: u32 = 0x8600_0000;
    /// Queries every owner range defines (function numbers 0xFF00-0xFFFF are reserved for them).
    pub const FN_CALL_COUNT: u32 = 0xFF00;
    pub const FN_CALL_UID: u32 = 0xFF01;
    pub const FN_REVISION: u32 = 0xFF03;
    /// SMCCC's NOT_SUPPORTED, as x0 returns it.
    pub const NOT_SUPPORTED: i64 = -1;
    /// The service's UID (5c3b8d8e-6f1a-4c52-9a0e-2b7d41f09e63) as the UID query returns it in
    /// w0-w3.
    pub const UID: [u32; 4] = [0x8e8d_3b5c, 0x524c_1a6f, 0x7d2b_0e9a, 0x639e_f041];
    /// Revision 1.0 of the service (x0 = major, x1 = minor).
    pub const REVISION: (u32, u32) = (1, 0);

    /// The function ID of ABI op or platform call `op`.
    pub const fn function_id(op: u32) -> u64 {
        (HV_SMC64_BASE | (op & 0xFFFF)) as u64
    }

    /// What an `HVC` is, from x0 and the instruction's immediate.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Call {
        /// An ABI op or platform call (SMC64, owner 6, function number below 0xFF00).
        Op(u32),
        CallCount,
        CallUid,
        Revision,
        /// Anything else: another owner, SMC32 for an op, a reserved query, `HVC` with a
        /// non-zero immediate, or bits 63:32 of x0 set. Answered with [`NOT_SUPPORTED`].
        NotSupported,
    }

    pub const fn classify(x0: u64, hvc_imm: u16) -> Call {
        if hvc_imm != 0 || x0 >> 32 != 0 {
            return Call::NotSupported;
        }
        let fid = x0 as u32;
        let base = fid & !0xFFFF;
        let number = fid & 0xFFFF;
        if base != HV_SMC64_BASE && base != HV_SMC32_BASE {
            return Call::NotSupported;
        }
        match number {
            FN_CALL_COUNT => Call::CallCount,
            FN_CALL_UID => Call::CallUid,
            FN_REVISION => Call::Revision,
            n if n >= 0xFF00 => Call::NotSupported,
            n if base == HV_SMC64_BASE => Call::Op(n),
            _ => Call::NotSupported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(GetInfo::SIZE, 56);
        assert_eq!(Destroy::SIZE, 24);
        assert_eq!(LastError::SIZE, 40);
        assert_eq!(DeviceList::SIZE, 24);
        assert_eq!(DeviceEntry::SIZE, 32);
        assert_eq!(DeviceReservedRanges::SIZE, 24);
        assert_eq!(ReservedRange::SIZE, 24);
        assert_eq!(IoasAlloc::SIZE, 16);
        assert_eq!(IoasMap::SIZE, 40);
        assert_eq!(IoasUnmap::SIZE, 32);
        assert_eq!(IoasMapBatch::SIZE, 32);
        assert_eq!(MapEntry::SIZE, 32);
        assert_eq!(IoasUnmapBatch::SIZE, 32);
        assert_eq!(UnmapEntry::SIZE, 16);
        assert_eq!(IoasCopy::SIZE, 40);
        assert_eq!(IoasIovaRanges::SIZE, 32);
        assert_eq!(IovaRange::SIZE, 16);
        assert_eq!(IoasAllowIovas::SIZE, 24);
        assert_eq!(HwptAlloc::SIZE, 40);
        assert_eq!(HwptClone::SIZE, 24);
        assert_eq!(DeviceAttach::SIZE, 24);
        assert_eq!(DeviceDetach::SIZE, 16);
        assert_eq!(HwptSetDirtyTracking::SIZE, 16);
        assert_eq!(HwptGetDirtyBitmap::SIZE, 48);
        for op in op::ALL {
            assert!(op::arg_size(op).is_some());
        }
        assert_eq!(op::arg_size(0), None);
    }

    #[test]
    fn little_endian_round_trip() {
        let m = IoasMap {
            size: 40,
            flags: MAP_READABLE,
            ioas_id: 0x0102_0304,
            reserved: 0,
            gpa: 0x1122_3344_5566_7788,
            length: 0x1000,
            iova: u64::MAX,
        };
        let mut b = [0u8; IoasMap::SIZE];
        m.encode(&mut b);
        assert_eq!(&b[0..4], &[40, 0, 0, 0]);
        assert_eq!(&b[8..12], &[4, 3, 2, 1]);
        assert_eq!(
            &b[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(IoasMap::decode(&b), m);
        // Short input: missing fields read as zero; short output: truncated, no panic.
        let d = IoasMap::decode(&b[..12]);
        assert_eq!((d.ioas_id, d.gpa), (0x0102_0304, 0));
        let mut short = [0u8; 5];
        m.encode(&mut short);
        assert_eq!(short, [40, 0, 0, 0, 4]);
    }

    #[test]
    fn every_prefix_decodes_as_the_zero_padded_struct() {
        // `decode` of a whole struct loads fields directly; of a shorter input it goes byte
        // by byte. Both must agree with the spec rule "fields beyond the input read as zero",
        // checked against hand-padded bytes; `encode` writes exactly the struct's bytes.
        let bytes: [u8; 48] = core::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a);
        for n in 0..=bytes.len() {
            let mut padded = [0u8; IoasMap::SIZE];
            let k = n.min(IoasMap::SIZE);
            padded[..k].copy_from_slice(&bytes[..k]);
            let want = IoasMap {
                size: u32::from_le_bytes(padded[0..4].try_into().unwrap()),
                flags: u32::from_le_bytes(padded[4..8].try_into().unwrap()),
                ioas_id: u32::from_le_bytes(padded[8..12].try_into().unwrap()),
                reserved: u32::from_le_bytes(padded[12..16].try_into().unwrap()),
                gpa: u64::from_le_bytes(padded[16..24].try_into().unwrap()),
                length: u64::from_le_bytes(padded[24..32].try_into().unwrap()),
                iova: u64::from_le_bytes(padded[32..40].try_into().unwrap()),
            };
            assert_eq!(IoasMap::decode(&bytes[..n]), want, "prefix of {n} bytes");
            let mut out = [0xeeu8; 48];
            want.encode(&mut out[..n]);
            assert_eq!(&out[..k], &padded[..k], "encode into {n} bytes");
            assert!(out[k..].iter().all(|&b| b == 0xee), "encode into {n} bytes");
        }
    }

    #[test]
    fn words_are_the_little_endian_bytes() {
        // The word codec must give exactly the byte codec's bytes, word k = bytes 8k..8k+8
        // little-endian, for whole, short and long word buffers.
        let m = IoasMap {
            size: 40,
            flags: 0x8000_0003,
            ioas_id: 0x0102_0304,
            reserved: 0xdead_beef,
            gpa: 0x1122_3344_5566_7788,
            length: 0x1000,
            iova: u64::MAX - 1,
        };
        let mut b = [0u8; IoasMap::SIZE];
        m.encode(&mut b);
        let want: [u64; 5] =
            core::array::from_fn(|k| u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().unwrap()));
        assert_eq!(want[0], 0x8000_0003_0000_0028);
        assert_eq!(want[1], 0xdead_beef_0102_0304);
        for n in 0..=7 {
            let mut out = [0xeeee_eeee_eeee_eeeeu64; 7];
            m.encode_words(&mut out[..n]);
            let k = n.min(5);
            assert_eq!(&out[..k], &want[..k], "encode into {n} words");
            assert!(out[k..].iter().all(|&w| w == 0xeeee_eeee_eeee_eeee));
            let mut bytes = [0u8; 56];
            for (i, w) in out[..n].iter().enumerate() {
                bytes[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
            }
            assert_eq!(
                IoasMap::decode_words(&out[..n]),
                IoasMap::decode(&bytes[..8 * k]),
                "decode of {n} words"
            );
        }
        assert_eq!(IoasMap::decode_words(&want), m);
    }

    #[test]
    fn smccc_function_ids_follow_den0028() {
        use smccc::*;
        // Owner 6 (bits 29:24), fast (31), SMC64 (30).
        assert_eq!(HV_SMC64_BASE >> 24 & 0x3f, 6);
        assert_eq!(HV_SMC64_BASE >> 30, 0b11);
        assert_eq!(HV_SMC32_BASE >> 30, 0b10);
        assert_eq!(function_id(op::IOAS_MAP), 0xC600_0011);
        assert_eq!(
            classify(function_id(op::IOAS_MAP), 0),
            Call::Op(op::IOAS_MAP)
        );
        assert_eq!(
            classify(function_id(platform::EXIT), 0),
            Call::Op(platform::EXIT)
        );
        // Unknown numbers inside the range are still ops (the ABI answers ENOTTY).
        assert_eq!(classify(0xC600_DEAD, 0), Call::Op(0xDEAD));
        assert_eq!(classify(0xC600_FF01, 0), Call::CallUid);
        assert_eq!(classify(0x8600_FF01, 0), Call::CallUid);
        assert_eq!(classify(0xC600_FF03, 0), Call::Revision);
        assert_eq!(classify(0xC600_FF00, 0), Call::CallCount);
        assert_eq!(classify(0xC600_FF02, 0), Call::NotSupported);
        assert_eq!(classify(0x8600_0011, 0), Call::NotSupported); // ops are SMC64 only
        assert_eq!(classify(0x8400_0000, 0), Call::NotSupported); // PSCI_VERSION
        assert_eq!(classify(0xC500_0011, 0), Call::NotSupported); // owner 5
        assert_eq!(classify(0xC600_0011, 1), Call::NotSupported); // HVC #1
        assert_eq!(classify(1 << 32 | 0xC600_0011, 0), Call::NotSupported);
        assert_eq!(classify(0x4600_0011, 0), Call::NotSupported); // yielding call
    }
}

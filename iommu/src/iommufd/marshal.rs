//! Argument marshalling shared by every object's hypercalls: the errors of malformed
//! arguments and the reads and writes of fixed-size ABI structs (array elements, batch
//! entries) in guest memory. The argument struct itself is read and written back by
//! `dispatch.rs`; the rules are in the `hvabi` crate docs and `docs/abi.md` §2.

use hvabi::{AbiStruct, errno, reason};

use super::{Error, GuestMemory};

/// A flag this ABI version does not know.
pub(crate) fn unknown_flags() -> Error {
    Error::new(errno::EOPNOTSUPP, reason::ARG_UNKNOWN_FLAGS)
}

/// A reserved field is not zero.
pub(crate) fn reserved_nonzero() -> Error {
    Error::new(errno::EOPNOTSUPP, reason::ARG_RESERVED_NONZERO)
}

/// `[gpa, gpa + bytes)` is writable guest memory.
pub(crate) fn owns_array(mem: &dyn GuestMemory, gpa: u64, bytes: u64) -> bool {
    gpa.checked_add(bytes).is_some() && mem.owns(gpa, bytes, true)
}

/// Reads an array element or other fixed-size struct from guest memory.
/// In 64-bit words (every ABI struct is a multiple of 8 bytes): see `dispatch::ArgBuf`.
pub(crate) fn read_struct<T: AbiStruct>(mem: &dyn GuestMemory, gpa: u64) -> Result<T, Error> {
    let mut buf = [0u64; 8];
    let w = &mut buf[..T::SIZE.min(64) / 8];
    mem.read_words(gpa, w)
        .map_err(|_| Error::new(errno::EFAULT, reason::ARRAY_FAULT))?;
    Ok(T::decode_words(w))
}

/// Writes an array element or other fixed-size struct to guest memory.
pub(crate) fn write_struct<T: AbiStruct>(
    mem: &dyn GuestMemory,
    gpa: u64,
    v: &T,
) -> Result<(), Error> {
    let mut buf = [0u64; 8];
    let w = &mut buf[..T::SIZE.min(64) / 8];
    v.encode_words(w);
    mem.write_words(gpa, w)
        .map_err(|_| Error::new(errno::EFAULT, reason::ARRAY_FAULT))
}

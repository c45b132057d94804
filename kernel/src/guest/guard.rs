//! GUARD (platform call 0xF2, docs/abi.md §2.1): the hypervisor's own proof that one guest cannot
//! change another's memory. A guest names a range of its RAM it will not touch again (for
//! example its DMA buffer once its checks are done); the hypervisor hashes the range there and
//! then, and hashes it again each time another guest exits or is stopped and when the guarding
//! guest itself ends (before its RAM is freed), and says whether the hash is unchanged. The
//! hashes are taken from the guest's frames by the hypervisor, so a guest cannot fake them, and
//! nothing but that guest and its own devices could have changed the bytes: the check fails if
//! anyone else's DMA, a shared frame or a stray nested mapping reached them.
//!
//! `guard-tamper` on the hypervisor command line makes the hypervisor itself flip one byte of
//! the range right after the first hash: the test that proves the comparison can fail.

use super::memory::GuestMemory;

/// Most bytes one GUARD may cover (bounds the time one hypercall spends hashing).
pub const GUARD_MAX: u64 = 1 << 20;

/// A guarded range and what the hypervisor saw in it when the guard was set.
pub struct Guard {
    pub gpa: u64,
    pub len: u64,
    pub hash: u64,
    /// DMA faults raised by other guests' devices before the guard was set (the difference at
    /// each check is how many of their DMAs were blocked while the range was guarded).
    pub foreign_faults_at: u64,
}

/// FNV-1a, 64 bits, over `len` bytes of guest RAM at `gpa`, read from the guest's frames;
/// `None` if the range is not all the guest's RAM.
pub fn hash(mem: &GuestMemory, gpa: u64, len: u64) -> Option<u64> {
    if !mem.contains(gpa, len) {
        return None;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunk = [0u8; 256];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        mem.read(gpa + done, &mut chunk[..n]).ok()?;
        for &b in &chunk[..n] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        done += n as u64;
    }
    Some(h)
}

/// Flips the low bit of the first byte of the range (`guard-tamper`).
pub fn tamper(mem: &GuestMemory, gpa: u64) -> bool {
    let mut b = [0u8; 1];
    mem.read(gpa, &mut b).is_ok() && mem.write(gpa, &[b[0] ^ 1]).is_ok()
}

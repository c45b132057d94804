//! The stream table (IHI 0070 §3.3): linear, or 2-level with level-2 tables allocated on first
//! use of a StreamID.
//!
//! * **Linear** (§3.3.1): 2^N STEs, N = the StreamID bits covered. Used when it fits in one
//!   4 KiB page (N ≤ 6), or when the SMMU has no 2-level support (IDR0.ST_LEVEL = 0).
//! * **2-level** (§3.3.2): a level-1 table of 8-byte descriptors indexed by
//!   `StreamID >> SPLIT`, each pointing at a level-2 array of 2^SPLIT STEs. SPLIT is 6 (level-2
//!   tables of one 4 KiB page) unless that makes the level-1 table larger than 64 KiB, then 8,
//!   then 10. Level-1 descriptors start invalid (Span = 0: the SMMU terminates the traffic and
//!   records C_BAD_STREAMID); a level-2 table is allocated, filled with abort STEs and cleaned
//!   before its descriptor is published with one 64-bit store.
//!
//! Every STE the driver makes reachable starts as V = 1, Config = abort, so a StreamID nobody
//! configured cannot DMA.

use core::sync::atomic::Ordering;

use super::error::SmmuError;
use super::regs::{StrtabBaseCfg, StrtabFormat};
use super::ste::{STE_BYTES, Ste, bits as ste_bits, l1_descriptor};
use crate::pgtable::TableMemory;
use crate::pgtable::sync::PteAtomic;

/// Largest level-1 table the driver allocates before it chooses a larger SPLIT.
const MAX_L1_BYTES: usize = 64 * 1024;

/// Stores one 64-bit word of a structure the driver allocated (8-byte aligned `pa`).
pub(crate) fn store64<T: TableMemory + ?Sized>(mem: &T, pa: u64, value: u64) {
    let page = pa & !0xfff;
    let index = ((pa & 0xfff) / 8) as usize;
    // Release: anything the word points at (a filled level-2 table, a written CD) was written
    // before and must be visible to whoever finds the pointer.
    mem.table(page, 512)[index].store(value, Ordering::Release);
}

/// Loads one 64-bit word of a structure the driver allocated.
pub(crate) fn load64<T: TableMemory + ?Sized>(mem: &T, pa: u64) -> u64 {
    let page = pa & !0xfff;
    let index = ((pa & 0xfff) / 8) as usize;
    // Acquire: a pointer read here leads to a structure whose contents are read next.
    mem.table(page, 512)[index].load(Ordering::Acquire)
}

/// Loads the STE at `pa`.
pub(crate) fn load_ste<T: TableMemory + ?Sized>(mem: &T, pa: u64) -> Ste {
    Ste(core::array::from_fn(|i| load64(mem, pa + 8 * i as u64)))
}

/// The stream table's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Linear,
    /// 2-level with level-2 tables of 2^`split` STEs.
    TwoLevel {
        split: u8,
    },
}

/// The stream table of one SMMU.
pub(crate) struct StreamTable {
    /// Linear table or level-1 table.
    pub base: u64,
    /// Bytes allocated at `base`.
    pub bytes: usize,
    /// StreamID bits covered (STRTAB_BASE_CFG.LOG2SIZE).
    pub sid_bits: u32,
    pub layout: Layout,
    coherent: bool,
}

impl StreamTable {
    /// Allocates the table for `sid_bits` StreamID bits; linear when it fits in a page or when
    /// `two_level` (IDR0.ST_LEVEL) is false.
    pub fn new<T: TableMemory>(
        mem: &T,
        sid_bits: u32,
        two_level: bool,
        coherent: bool,
    ) -> Result<Self, SmmuError> {
        let linear_bytes = STE_BYTES << sid_bits;
        let layout = if linear_bytes <= 4096 || !two_level {
            Layout::Linear
        } else {
            let split = [6u8, 8, 10]
                .into_iter()
                .find(|&s| l1_bytes(sid_bits, s) <= MAX_L1_BYTES)
                .unwrap_or(10);
            Layout::TwoLevel { split }
        };
        let bytes = match layout {
            Layout::Linear => linear_bytes,
            Layout::TwoLevel { split } => l1_bytes(sid_bits, split),
        }
        .max(4096);
        let base = mem.alloc_table(bytes).ok_or(SmmuError::NoMemory)?;
        let st = StreamTable {
            base,
            bytes,
            sid_bits,
            layout,
            coherent,
        };
        if layout == Layout::Linear {
            // Not yet reachable by the SMMU (STRTAB_BASE is written later): plain stores.
            st.fill_abort(mem, base, 1 << sid_bits);
        }
        // A zeroed level-1 table is all invalid descriptors already.
        st.clean(mem, base, bytes);
        Ok(st)
    }

    /// STRTAB_BASE_CFG for this table.
    pub fn base_cfg(&self) -> StrtabBaseCfg {
        match self.layout {
            Layout::Linear => StrtabBaseCfg {
                log2size: self.sid_bits as u8,
                split: 0,
                format: StrtabFormat::Linear,
            },
            Layout::TwoLevel { split } => StrtabBaseCfg {
                log2size: self.sid_bits as u8,
                split,
                format: StrtabFormat::TwoLevel,
            },
        }
    }

    pub fn clean<T: TableMemory>(&self, mem: &T, pa: u64, bytes: usize) {
        if !self.coherent {
            mem.clean(pa, bytes);
        }
    }

    /// Writes an abort STE into each of `count` slots from `pa` (word 0; the rest is zero).
    fn fill_abort<T: TableMemory>(&self, mem: &T, pa: u64, count: usize) {
        let abort = Ste::abort();
        for i in 0..count as u64 {
            let ste = pa + i * STE_BYTES as u64;
            for (w, &v) in abort.0.iter().enumerate() {
                if v != 0 {
                    store64(mem, ste + 8 * w as u64, v);
                }
            }
        }
    }

    fn l1_entry(&self, split: u8, sid: u32) -> u64 {
        self.base + ((sid >> split) as u64) * 8
    }

    /// Physical address of `sid`'s STE, or `None` if its level-2 table does not exist yet.
    /// `sid` must be in range.
    pub fn ste_pa<T: TableMemory>(&self, mem: &T, sid: u32) -> Option<u64> {
        match self.layout {
            Layout::Linear => Some(self.base + sid as u64 * STE_BYTES as u64),
            Layout::TwoLevel { split } => {
                let d = load64(mem, self.l1_entry(split, sid));
                if d & ste_bits::L1_SPAN_MASK == 0 {
                    return None;
                }
                let l2 = d & ste_bits::L1_L2PTR;
                let index = sid & ((1 << split) - 1);
                Some(l2 + index as u64 * STE_BYTES as u64)
            }
        }
    }

    /// Physical address of `sid`'s STE, allocating its level-2 table (all abort STEs) on first
    /// use. The new descriptor becomes visible with one 64-bit store, after the table's
    /// contents (and, non-coherent, after they were cleaned). `sid` must be in range.
    ///
    /// The SMMU may still hold the old invalid descriptor in its configuration cache: the
    /// caller's next STE change issues CMD_CFGI_STE with Leaf = 0, which drops it.
    pub fn ensure<T: TableMemory>(&self, mem: &T, sid: u32) -> Result<u64, SmmuError> {
        if let Some(pa) = self.ste_pa(mem, sid) {
            return Ok(pa);
        }
        let Layout::TwoLevel { split } = self.layout else {
            unreachable!("a linear table has every STE");
        };
        let bytes = (STE_BYTES << split).max(4096);
        let l2 = mem.alloc_table(bytes).ok_or(SmmuError::NoMemory)?;
        self.fill_abort(mem, l2, 1 << split);
        self.clean(mem, l2, bytes);
        let entry = self.l1_entry(split, sid);
        store64(mem, entry, l1_descriptor(l2, split));
        self.clean(mem, entry, 8);
        Ok(self.ste_pa(mem, sid).unwrap_or(l2))
    }

    /// Calls `f` with every reachable STE (StreamID and entry).
    pub fn for_each<T: TableMemory>(&self, mem: &T, mut f: impl FnMut(u32, Ste)) {
        match self.layout {
            Layout::Linear => {
                for sid in 0..1u32 << self.sid_bits {
                    let pa = self.base + sid as u64 * STE_BYTES as u64;
                    f(sid, load_ste(mem, pa));
                }
            }
            Layout::TwoLevel { split } => {
                for l1 in 0..1u32 << (self.sid_bits - split as u32) {
                    let d = load64(mem, self.base + l1 as u64 * 8);
                    if d & ste_bits::L1_SPAN_MASK == 0 {
                        continue;
                    }
                    let l2 = d & ste_bits::L1_L2PTR;
                    for i in 0..1u32 << split {
                        let pa = l2 + i as u64 * STE_BYTES as u64;
                        f(l1 << split | i, load_ste(mem, pa));
                    }
                }
            }
        }
    }
}

fn l1_bytes(sid_bits: u32, split: u8) -> usize {
    8usize << sid_bits.saturating_sub(split as u32)
}

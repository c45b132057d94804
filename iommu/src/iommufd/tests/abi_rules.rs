//! The ABI rules `docs/abi.md` fixes for cases it used to leave open, and the behaviour
//! changes that closed its loose ends: dirty bits kept when tracking stops, the reserved
//! range's start in `RESERVED_IN_ALLOWED`, `MAPPING_OUTSIDE_APERTURE`'s errno on every path,
//! the reserved-set limit, a PASID without `ATTACH_PASID`, where IOAS_COPY puts an automatic
//! destination, unaligned UNMAP, output arrays validated whole, an ACCESS attach's `pt_id`,
//! and which error wins.

use hvabi::{
    AbiStruct, DeviceAttach, DeviceDetach, DeviceList, DeviceReservedRanges, HWPT_DIRTY_TRACKING,
    HwptAlloc, HwptClone, HwptGetDirtyBitmap, HwptSetDirtyTracking, IoasAllowIovas, IoasCopy,
    IoasIovaRanges, IoasMap, IoasMapBatch, IoasUnmap, MAP_FIXED_IOVA, errno, kind, op, reason,
};

use super::super::Limits;
use super::super::client::{Client, RW};
use super::super::sim::{SimDevice, SimHw, VecGuestMemory};
use super::super::{GuestMemory, Iommufd};
use super::{Env, MB, PG, SCRATCH, dev};

fn bit(b: &[u8], i: u64) -> bool {
    b[(i / 8) as usize] & (1 << (i % 8)) != 0
}

/// Stopping dirty tracking keeps the bits: a migration that stops tracking before its final
/// read still sees the last writes. Nothing new is recorded while off; enabling clears.
#[test]
fn dirty_bits_survive_disable() {
    let mut env = Env::new();
    let cd = env.id(dev::C);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let hwpt = c.hwpt_alloc(cd, ioas, HWPT_DIRTY_TRACKING).unwrap();
    c.attach(cd, hwpt).unwrap();
    let iova = 0x1000_0000;
    c.map_fixed(ioas, iova, 0, 8 * PG).unwrap();
    c.set_dirty_tracking(hwpt, true).unwrap();
    env.fd
        .hw_mut()
        .dma(dev::C, None, iova + 2 * PG, true)
        .unwrap();
    env.c().set_dirty_tracking(hwpt, false).unwrap();
    // Written while off: not recorded.
    env.fd
        .hw_mut()
        .dma(dev::C, None, iova + 5 * PG, true)
        .unwrap();
    let at = 0x0e00_0000;
    let bm = env
        .c()
        .dirty_bitmap(hwpt, iova, 8 * PG, PG, hvabi::DIRTY_BITMAP_NO_CLEAR, at)
        .unwrap();
    assert!(bit(&bm, 2), "the write before disable is kept");
    assert!(!bit(&bm, 5), "nothing is recorded while tracking is off");
    // A clearing read while off returns and clears them.
    let bm = env.c().dirty_bitmap(hwpt, iova, 8 * PG, PG, 0, at).unwrap();
    assert!(bit(&bm, 2));
    let bm = env.c().dirty_bitmap(hwpt, iova, 8 * PG, PG, 0, at).unwrap();
    assert!(!bit(&bm, 2));
    // Enabling starts from a clean snapshot.
    env.c().set_dirty_tracking(hwpt, true).unwrap();
    env.fd
        .hw_mut()
        .dma(dev::C, None, iova + 3 * PG, true)
        .unwrap();
    env.c().set_dirty_tracking(hwpt, false).unwrap();
    env.c().set_dirty_tracking(hwpt, true).unwrap();
    let bm = env.c().dirty_bitmap(hwpt, iova, 8 * PG, PG, 0, at).unwrap();
    assert!(bm.iter().all(|&b| b == 0));
    env.teardown();
}

/// `got` failed with `err` and GET_LAST_ERROR names `why` with `value`.
#[track_caller]
fn failed_with(got: Result<u32, u32>, c: &mut Client<'_, SimHw>, err: u32, why: u32, value: u64) {
    assert_eq!(got, Err(err));
    let le = c.last_error();
    assert_eq!((le.out_reason, le.out_value), (why, value));
}

/// RESERVED_IN_ALLOWED names the reserved range (here: the IOVA above device I's 39-bit
/// aperture, from 2^39), not the allowed range it would cover, on the HWPT path as on the
/// attach path.
#[test]
fn reserved_in_allowed_reports_the_reserved_start() {
    let mut env = Env::new();
    let di = env.id(dev::I);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.allow_iovas(ioas, &[(1 << 40, (1 << 40) + PG - 1)])
        .unwrap();
    // Each call's LAST_ERROR is read before the next call replaces it.
    let (e, r) = (errno::EADDRINUSE, reason::RESERVED_IN_ALLOWED);
    failed_with(c.hwpt_alloc(di, ioas, 0), &mut c, e, r, 1 << 39);
    failed_with(c.attach(di, ioas), &mut c, e, r, 1 << 39);
    env.teardown();
}

/// A mapping a new page table cannot hold is EADDRINUSE (MAPPING_OUTSIDE_APERTURE, the
/// mapping's IOVA) for HWPT_ALLOC; DEVICE_ATTACH to the IOAS reports the same mapping as
/// covered by the device's reserved set (RESERVED_OVERLAPS_MAPPING), also EADDRINUSE.
#[test]
fn mapping_outside_aperture_is_eaddrinuse() {
    let mut env = Env::new();
    let di = env.id(dev::I);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 1 << 40, 0, PG).unwrap();
    let before = env.snapshot();
    let mut c = env.c();
    failed_with(
        c.hwpt_alloc(di, ioas, 0),
        &mut c,
        errno::EADDRINUSE,
        reason::MAPPING_OUTSIDE_APERTURE,
        1 << 40,
    );
    assert_eq!(c.attach(di, ioas), Err(errno::EADDRINUSE));
    let le = c.last_error();
    assert_eq!(le.out_value, 1 << 40);
    assert!(
        [
            reason::MAPPING_OUTSIDE_APERTURE,
            reason::RESERVED_OVERLAPS_MAPPING
        ]
        .contains(&le.out_reason)
    );
    assert_eq!(env.snapshot(), before);
    env.teardown();
}

/// An IOAS's reserved set holds at most 128 disjoint ranges (docs/abi.md §7): an attach that
/// would need more fails with ENOSPC (TOO_MANY) and changes nothing.
#[test]
fn reserved_set_limit() {
    // 20 isolated devices, each with 7 reserved regions of its own.
    let devices: std::vec::Vec<SimDevice> = (0..20u64)
        .map(|i| {
            let mut d = SimDevice::new(0x100 + i, 1 + i as u32);
            for r in 0..7u64 {
                let start = 0x1_0000_0000 + (i * 8 + r) * 0x10_0000;
                d = d.reserve(start, start + PG - 1, hvabi::resv::RESERVED);
            }
            d
        })
        .collect();
    let mut fd = Iommufd::new(SimHw::new(&devices, 1024, None), Limits::default()).unwrap();
    let g = fd.create_guest().unwrap();
    let ids: std::vec::Vec<u32> = (0..20).map(|d| fd.assign_device(g, d).unwrap()).collect();
    let mem = VecGuestMemory::standard();
    let mut c = Client::new(&mut fd, g, &mem, SCRATCH);
    let ioas = c.ioas_alloc().unwrap();
    // The MSI window (shared) merges; each device adds 7 ranges: 1 + 7n + the space above
    // the 48-bit aperture fits in 128 for n ≤ 18.
    let mut attached = 0;
    let mut refused = None;
    for &id in &ids {
        match c.attach(id, ioas) {
            Ok(_) => attached += 1,
            Err(e) => {
                refused = Some((e, c.last_error().out_reason));
                break;
            }
        }
    }
    assert_eq!(attached, 18);
    assert_eq!(refused, Some((errno::ENOSPC, reason::TOO_MANY)));
    // 128 reserved ranges (the MSI window, 18 × 7 regions, the space above the aperture),
    // each with a usable range below it.
    let (_, n, _) = c.iova_ranges_cap(ioas, 0);
    assert_eq!(n, 128);
}

/// A non-zero `pasid` without ATTACH_PASID is a non-zero reserved field: EOPNOTSUPP
/// (ARG_RESERVED_NONZERO), for ATTACH, REPLACE and DETACH.
#[test]
fn pasid_without_flag() {
    let mut env = Env::new();
    let cd = env.id(dev::C);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let a = DeviceAttach {
        dev_id: cd,
        pt_id: ioas,
        pasid: 5,
        ..Default::default()
    };
    for o in [op::DEVICE_ATTACH, op::DEVICE_REPLACE] {
        assert_eq!(c.call(o, &a).unwrap_err().0, errno::EOPNOTSUPP);
        assert_eq!(c.last_error().out_reason, reason::ARG_RESERVED_NONZERO);
    }
    let d = DeviceDetach {
        dev_id: cd,
        pasid: 5,
        ..Default::default()
    };
    assert_eq!(
        c.call(op::DEVICE_DETACH, &d).unwrap_err().0,
        errno::EOPNOTSUPP
    );
    assert_eq!(c.last_error().out_reason, reason::ARG_RESERVED_NONZERO);
    env.teardown();
}

/// IOAS_COPY without MAP_FIXED_IOVA places the destination exactly where IOAS_MAP of the
/// first source byte's guest-physical address and `length` would (§6.1.3): same IOVA in an
/// IOAS in the same state, inside the allowed list, aligned for large pages.
#[test]
fn copy_automatic_destination_is_map_placement() {
    let mut env = Env::new();
    let mut c = env.c();
    let src = c.ioas_alloc().unwrap();
    let dst = c.ioas_alloc().unwrap();
    let twin = c.ioas_alloc().unwrap();
    let window = (0x4000_0000, 0x7fff_ffff);
    for i in [dst, twin] {
        c.allow_iovas(i, &[window]).unwrap();
        c.map_fixed(i, 0x4000_0000, 0, PG).unwrap();
    }
    // 2 MiB of 2 MiB-aligned memory at an IOVA that is only page aligned in the source.
    c.map_fixed(src, 0x12_3000, 2 * MB, 2 * MB).unwrap();
    let got = c.copy(dst, src, 0x12_3000, 2 * MB, RW, 0).unwrap();
    let want = c.map_auto(twin, 2 * MB, 2 * MB).unwrap();
    assert_eq!(got, want);
    assert_eq!(got % (2 * MB), 0);
    assert!(got >= window.0 && got + 2 * MB - 1 <= window.1);
    env.teardown();
}

/// UNMAP need not be page aligned: it removes the mappings wholly inside the range (and
/// fails SPLITS_MAPPING on one it cuts).
#[test]
fn unaligned_unmap() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10_0000, 0, 2 * PG).unwrap();
    c.map_fixed(ioas, 0x10_4000, 4 * PG, PG).unwrap();
    assert_eq!(c.unmap(ioas, 0x10_0800, PG), Err(errno::ENOENT));
    assert_eq!(c.last_error().out_reason, reason::SPLITS_MAPPING);
    assert_eq!(c.unmap(ioas, 0xf_f800, 0x3923), Ok(2 * PG));
    assert_eq!(c.iova_ranges(ioas).unwrap(), [(0, u64::MAX)]);
    assert_eq!(c.unmap(ioas, 0x10_3fff, 0x1002), Ok(PG));
    env.teardown();
}

/// An output array's whole capacity must be writable guest memory, even when fewer entries
/// would be written: EFAULT (ARRAY_FAULT) and nothing written.
#[test]
fn output_array_capacity_is_validated_whole() {
    let mut env = Env::new();
    let end_of_ram = 256 * MB;
    let at = end_of_ram - 16 * 32;
    let mut c = env.c();
    let a = DeviceList {
        num_devices: 100,
        devices_gpa: at,
        ..Default::default()
    };
    let (e, out) = c.call(op::DEVICE_LIST, &a).unwrap_err();
    assert_eq!(e, errno::EFAULT);
    assert_eq!(out.num_devices, 100, "nothing written back");
    assert_eq!(c.last_error().out_reason, reason::ARRAY_FAULT);
    let mut first = [0u8; 8];
    env.mem.read(at, &mut first).unwrap();
    assert_eq!(first, [0; 8]);
    // With a capacity that fits, the same place works.
    let a = DeviceList {
        num_devices: 16,
        ..a
    };
    assert_eq!(env.c().call(op::DEVICE_LIST, &a).unwrap().num_devices, 11);
    env.teardown();
}

/// DEVICE_ATTACH of an ACCESS returns the IOAS ID in `pt_id` (an emulated device has no HWPT).
#[test]
fn access_attach_returns_the_ioas() {
    let mut env = Env::new();
    let g = env.g;
    let ioas = env.c().ioas_alloc().unwrap();
    let acc = env.fd.create_access(g).unwrap();
    assert_eq!(env.fd.object_kind(g, acc), Some(kind::ACCESS));
    let mut c = env.c();
    assert_eq!(c.attach(acc, ioas), Ok(ioas));
    let ioas2 = c.ioas_alloc().unwrap();
    assert_eq!(c.replace(acc, ioas2), Ok(ioas2));
    c.detach(acc).unwrap();
    env.fd.destroy_access(g, acc).unwrap();
    env.teardown();
}

/// One call of `unknown_flags_win`: refused with EOPNOTSUPP, the reason naming its flags or
/// reserved fields.
#[track_caller]
fn refused_for_flags<T: AbiStruct>(c: &mut Client<'_, SimHw>, op: u32, a: &T) {
    let e = c.call(op, a).map(|_| ()).map_err(|e| e.0);
    assert_eq!(e, Err(errno::EOPNOTSUPP), "op {op:#x}");
    let le = c.last_error();
    assert!(
        [reason::ARG_UNKNOWN_FLAGS, reason::ARG_RESERVED_NONZERO].contains(&le.out_reason),
        "op {op:#x}: {le:?}"
    );
}

/// Unknown flags and non-zero reserved fields are reported before anything that looks at an
/// ID, a value or the state (here every ID is bogus and every value wrong as well).
#[test]
fn unknown_flags_win() {
    let mut env = Env::new();
    let mut c = env.c();
    let bad = 0xdead;
    refused_for_flags(
        &mut c,
        op::IOAS_MAP,
        &IoasMap {
            flags: MAP_FIXED_IOVA | 1 << 9,
            ioas_id: bad,
            iova: 1,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::IOAS_UNMAP,
        &IoasUnmap {
            flags: 1,
            ioas_id: bad,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::IOAS_COPY,
        &IoasCopy {
            flags: 1 << 9,
            dst_ioas_id: bad,
            src_ioas_id: bad,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::HWPT_ALLOC,
        &HwptAlloc {
            flags: 1 << 9,
            dev_id: bad,
            pt_id: bad,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::HWPT_SET_DIRTY_TRACKING,
        &HwptSetDirtyTracking {
            flags: 1 << 9,
            hwpt_id: bad,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::HWPT_GET_DIRTY_BITMAP,
        &HwptGetDirtyBitmap {
            flags: 1 << 9,
            hwpt_id: bad,
            ..Default::default()
        },
    );
    for o in [op::DEVICE_ATTACH, op::DEVICE_REPLACE] {
        refused_for_flags(
            &mut c,
            o,
            &DeviceAttach {
                flags: 1 << 9,
                dev_id: bad,
                pt_id: bad,
                ..Default::default()
            },
        );
    }
    refused_for_flags(
        &mut c,
        op::DEVICE_DETACH,
        &DeviceDetach {
            flags: 1 << 9,
            dev_id: bad,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::HWPT_CLONE,
        &HwptClone {
            flags: 1 << 9,
            src_hwpt_id: bad,
            dev_id: bad,
            ..Default::default()
        },
    );
    for o in [op::IOAS_MAP_BATCH, op::IOAS_UNMAP_BATCH] {
        refused_for_flags(
            &mut c,
            o,
            &IoasMapBatch {
                flags: 1 << 9,
                ioas_id: bad,
                num_entries: 1000,
                entries_gpa: u64::MAX,
                ..Default::default()
            },
        );
    }
    refused_for_flags(
        &mut c,
        op::IOAS_ALLOW_IOVAS,
        &IoasAllowIovas {
            ioas_id: bad,
            num_iovas: 1000,
            reserved: 1,
            ranges_gpa: u64::MAX,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::IOAS_IOVA_RANGES,
        &IoasIovaRanges {
            ioas_id: bad,
            num_iovas: 1000,
            reserved: 1,
            ranges_gpa: u64::MAX,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::DEVICE_RESERVED_RANGES,
        &DeviceReservedRanges {
            dev_id: bad,
            num_ranges: 1000,
            flags: 1,
            ranges_gpa: u64::MAX,
            ..Default::default()
        },
    );
    refused_for_flags(
        &mut c,
        op::DEVICE_LIST,
        &DeviceList {
            flags: 1,
            num_devices: 1000,
            devices_gpa: u64::MAX,
            ..Default::default()
        },
    );
    env.teardown();
}

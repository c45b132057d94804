//! ABI basics: argument struct sizing, unknown ops, bad pointers, GET_INFO, DEVICE_LIST,
//! GET_LAST_ERROR, guest isolation.

use hvabi::{
    DeviceList, IoasAlloc, IoasMap, MAP_READABLE, MAP_WRITEABLE, cap, errno, kind, op, reason,
};

use super::super::client::RW;
use super::super::{Error, GuestMemory};
use super::{Env, MB, PG, SCRATCH, dev};

/// Writes `bytes` at the scratch struct and calls `op` on it.
fn raw(env: &mut Env, op: u32, bytes: &[u8]) -> i64 {
    env.mem.write(SCRATCH, bytes).unwrap();
    let mut c = env.c();
    c.raw(op, SCRATCH)
}

fn with_size(size: usize, len: usize) -> std::vec::Vec<u8> {
    let mut b = std::vec![0u8; len];
    b[..4].copy_from_slice(&(size as u32).to_le_bytes());
    b
}

#[test]
fn cmd_fail() {
    let mut env = Env::new();
    let mut c = env.c();
    // DESTROY of id 0.
    assert_eq!(c.destroy(0).unwrap_err().0, errno::ENOENT);
    // An argument pointer outside the guest's memory, or in read-only memory.
    assert_eq!(c.raw(op::IOAS_ALLOC, 0x2000_0000), -(errno::EFAULT as i64));
    assert_eq!(c.raw(op::IOAS_ALLOC, 1 << 30), -(errno::EFAULT as i64));
    assert_eq!(c.raw(op::IOAS_ALLOC, u64::MAX - 2), -(errno::EFAULT as i64));
    // Unknown ops.
    for o in [0u32, 0x06, 0x0f, 0x18, 0x24, 0x33, 0x80, u32::MAX] {
        assert_eq!(c.raw(o, SCRATCH), -(errno::ENOTTY as i64), "op {o:#x}");
    }
    let le = c.last_error();
    assert_eq!((le.out_op, le.out_reason), (u32::MAX, reason::UNKNOWN_OP));
    env.teardown();
}

#[test]
fn cmd_length() {
    for o in op::ALL {
        let size = op::arg_size(o).unwrap();
        // Too short: EINVAL, for every size below the v1 size.
        for short in [0usize, 4, size - 4] {
            let mut env = Env::new();
            let r = raw(&mut env, o, &with_size(short, size));
            assert_eq!(r, -(errno::EINVAL as i64), "op {o:#x} size {short}");
            env.teardown();
        }
        // Oversize with a non-zero tail: E2BIG, whatever the rest says.
        for pos in [size, size + 7, size + 100] {
            let mut env = Env::new();
            let mut b = with_size(size + 128, size + 128);
            b[pos] = 1;
            assert_eq!(raw(&mut env, o, &b), -(errno::E2BIG as i64), "op {o:#x}");
            let snap = env.snapshot();
            env.check();
            assert_eq!(snap, env.snapshot());
            env.teardown();
        }
        // Oversize with a zero tail behaves exactly like the exact size.
        let mut exact_env = Env::new();
        let exact = raw(&mut exact_env, o, &with_size(size, size));
        let mut padded_env = Env::new();
        let padded = raw(&mut padded_env, o, &with_size(size + 256, size + 256));
        assert_eq!(exact, padded, "op {o:#x}");
        assert_eq!(exact_env.snapshot(), padded_env.snapshot(), "op {o:#x}");
        // The output struct is the same too (bytes past the v1 size untouched).
        let mut a = std::vec![0u8; size + 256];
        let mut b = std::vec![0u8; size + 256];
        exact_env.mem.read(SCRATCH, &mut a[..size]).unwrap();
        padded_env.mem.read(SCRATCH, &mut b).unwrap();
        assert_eq!(&a[4..size], &b[4..size], "op {o:#x}");
        assert!(b[size..].iter().all(|&x| x == 0));
        exact_env.teardown();
        padded_env.teardown();
    }
}

#[test]
fn cmd_ex_fail() {
    let mut env = Env::new();
    // A longer struct with a zero tail works.
    let b = with_size(IoasAlloc::SIZE + 64, IoasAlloc::SIZE + 64);
    assert_eq!(raw(&mut env, op::IOAS_ALLOC, &b), 0);
    // Above MAX_ARG_SIZE: E2BIG even if zero.
    let b = with_size(hvabi::MAX_ARG_SIZE as usize + 8, 16);
    assert_eq!(raw(&mut env, op::IOAS_ALLOC, &b), -(errno::E2BIG as i64));
    // The whole claimed size must be the guest's writable memory.
    let end_of_ram = 256 * MB - 8;
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&32u32.to_le_bytes());
    env.mem.write(end_of_ram, &bytes).unwrap();
    let mut c = env.c();
    assert_eq!(c.raw(op::IOAS_ALLOC, end_of_ram), -(errno::EFAULT as i64));
    // There, a `size` word in RAM that is too short is EINVAL even though the v1 struct would
    // run past RAM: the size is checked before the range it claims (steps 2-4).
    env.mem.write(end_of_ram, &8u32.to_le_bytes()).unwrap();
    let mut c = env.c();
    assert_eq!(c.raw(op::IOAS_ALLOC, end_of_ram), -(errno::EINVAL as i64));
    assert_eq!(c.last_error().out_reason, reason::ARG_TOO_SHORT);
    // Reserved fields and unknown flags.
    let a = IoasAlloc {
        reserved: 1,
        ..Default::default()
    };
    assert_eq!(c.call(op::IOAS_ALLOC, &a).unwrap_err().0, errno::EOPNOTSUPP);
    let a = IoasAlloc {
        flags: 1,
        ..Default::default()
    };
    assert_eq!(c.call(op::IOAS_ALLOC, &a).unwrap_err().0, errno::EOPNOTSUPP);
    let ioas = c.ioas_alloc().unwrap();
    let m = IoasMap {
        flags: RW | 1 << 7,
        ioas_id: ioas,
        length: PG,
        ..Default::default()
    };
    assert_eq!(c.call(op::IOAS_MAP, &m).unwrap_err().0, errno::EOPNOTSUPP);
    let le = c.last_error();
    assert_eq!(le.out_reason, reason::ARG_UNKNOWN_FLAGS);
    env.teardown();
}

#[test]
fn simple_close() {
    let mut env = Env::new();
    let g = env.fd.create_guest().unwrap();
    env.fd.destroy_guest(g).unwrap();
    // A second close: the guest context is gone (ENOENT, BAD_ID), nothing else happens.
    assert_eq!(
        env.fd.destroy_guest(g),
        Err(Error::new(errno::ENOENT, reason::BAD_ID))
    );
    env.teardown();
}

#[test]
fn get_hw_info() {
    let mut env = Env::new();
    let mut c = env.c();
    let info = c.get_info().unwrap();
    assert_eq!(info.out_abi_version, 1);
    assert_eq!(info.out_num_devices, 11);
    assert_eq!(info.out_iova_alignment, 4096);
    assert_eq!(
        info.out_capabilities,
        cap::PASID | cap::DIRTY_TRACKING | cap::ENFORCE_CACHE_COHERENCY
    );
    // DEVICE_LIST: capacity 0, smaller, exact, larger.
    let at = c.array();
    let list = |c: &mut super::super::client::Client<'_, _>, n| {
        c.call(
            op::DEVICE_LIST,
            &DeviceList {
                num_devices: n,
                devices_gpa: at,
                ..Default::default()
            },
        )
    };
    let (e, out) = list(&mut c, 0).unwrap_err();
    assert_eq!((e, out.num_devices), (errno::EMSGSIZE, 11));
    let (e, out) = list(&mut c, 3).unwrap_err();
    assert_eq!((e, out.num_devices), (errno::EMSGSIZE, 11));
    assert_eq!(list(&mut c, 11).unwrap().num_devices, 11);
    assert_eq!(list(&mut c, 40).unwrap().num_devices, 11);
    let devs = c.devices().unwrap();
    assert_eq!(devs.len(), 11);
    let by_hw = |hw: u64| devs.iter().find(|d| d.hw_id == hw).copied().unwrap();
    let a = by_hw(0x0008);
    assert_eq!((a.pasid_bits, a.group_members), (0, 1));
    assert_eq!(a.flags, hvabi::DEVICE_ENFORCE_CACHE_COHERENCY);
    let cdev = by_hw(0x0018);
    assert_eq!(cdev.pasid_bits, 8);
    assert_eq!(
        cdev.flags,
        hvabi::DEVICE_ENFORCE_CACHE_COHERENCY | hvabi::DEVICE_PASID | hvabi::DEVICE_DIRTY_TRACKING
    );
    let d = by_hw(0x0100);
    let e2 = by_hw(0x0101);
    assert_eq!((d.group_members, d.group_id), (2, e2.group_id));
    assert_eq!(by_hw(0x0010).flags, 0);
    // The capacity-sized array must be writable guest memory.
    let mut c = env.c();
    let r = c.call(
        op::DEVICE_LIST,
        &DeviceList {
            num_devices: 4,
            devices_gpa: 1 << 30,
            ..Default::default()
        },
    );
    assert_eq!(r.unwrap_err().0, errno::EFAULT);
    env.teardown();
}

#[test]
fn last_error_detail() {
    let mut env = Env::new();
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    c.map_fixed(ioas, 0x10000, 0, PG).unwrap();
    assert_eq!(c.map_fixed(ioas, 0x10000, PG, PG), Err(errno::EEXIST));
    let le = c.last_error();
    assert_eq!(le.out_op, op::IOAS_MAP);
    assert_eq!(le.out_errno, errno::EEXIST);
    assert_eq!(le.out_reason, reason::IOVA_IN_USE);
    assert_eq!(le.out_value, 0x10000);
    // Success does not clear it; GET_LAST_ERROR never overwrites it.
    c.ioas_alloc().unwrap();
    assert_eq!(c.last_error().out_reason, reason::IOVA_IN_USE);
    let bad = hvabi::LastError {
        flags: 1,
        ..Default::default()
    };
    assert_eq!(
        c.call(op::GET_LAST_ERROR, &bad).unwrap_err().0,
        errno::EOPNOTSUPP
    );
    assert_eq!(c.last_error().out_reason, reason::IOVA_IN_USE);
    env.teardown();
}

#[test]
fn guests_are_isolated() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let ioas = env.c().ioas_alloc().unwrap();
    env.c().attach(a, ioas).unwrap();
    // The second guest sees only its own device and none of the first guest's objects.
    let mut c2 = env.c2();
    let devs = c2.devices().unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0].hw_id, 0x0500);
    let own = c2.ioas_alloc().unwrap();
    // IDs are per guest: the first guest's IOAS (created after its 19 devices and groups)
    // names nothing in the second guest.
    assert!(ioas > own);
    assert_eq!(c2.map_fixed(ioas, 0x1000, 0, PG), Err(errno::ENOENT));
    assert_eq!(c2.destroy(ioas).unwrap_err().0, errno::ENOENT);
    assert_eq!(c2.attach(devs[0].dev_id, ioas), Err(errno::ENOENT));
    assert_eq!(c2.last_error().out_reason, reason::BAD_ID);
    assert_eq!(
        c2.fd.assign_device(c2.guest, dev::A).unwrap_err().errno,
        errno::EBUSY
    );
    // Guest memory ownership: a hole, a read-only region mapped writeable.
    let mut c = env.c();
    assert_eq!(c.map_auto(ioas, 0x2000_0000, PG), Err(errno::EPERM));
    assert_eq!(c.last_error().out_reason, reason::GPA_NOT_OWNED);
    assert_eq!(c.map_auto(ioas, 256 * MB - PG, 2 * PG), Err(errno::EPERM));
    assert_eq!(c.map_auto(ioas, 1 << 30, PG), Err(errno::EPERM));
    c.map(ioas, 1 << 30, PG, MAP_READABLE, 0).unwrap();
    assert_eq!(
        c.map(ioas, 1 << 30, PG, MAP_WRITEABLE, 0),
        Err(errno::EPERM)
    );
    env.check();
    env.teardown();
}

#[test]
fn destroy_names_blockers() {
    let mut env = Env::new();
    let a = env.id(dev::A);
    let mut c = env.c();
    let ioas = c.ioas_alloc().unwrap();
    let hwpt = c.attach(a, ioas).unwrap();
    let (e, d) = c.destroy(ioas).unwrap_err();
    assert_eq!(e, errno::EBUSY);
    assert_eq!(
        (d.out_blocker_kind, d.out_blocker_id, d.out_blocker_count),
        (kind::DEVICE, a, 1)
    );
    let (e, d) = c.destroy(hwpt).unwrap_err();
    assert_eq!(e, errno::EBUSY);
    assert_eq!((d.out_blocker_kind, d.out_blocker_id), (kind::DEVICE, a));
    let manual = c.hwpt_alloc(a, ioas, 0).unwrap();
    c.detach(a).unwrap();
    let (_, d) = c.destroy(ioas).unwrap_err();
    assert_eq!((d.out_blocker_kind, d.out_blocker_id), (kind::HWPT, manual));
    let le = c.last_error();
    assert_eq!(
        (le.out_reason, le.out_object_kind, le.out_object_id),
        (reason::BUSY, kind::HWPT, manual)
    );
    // Hypervisor-owned objects cannot be destroyed by the guest.
    assert_eq!(c.destroy(a).unwrap_err().0, errno::EPERM);
    let group = c.devices().unwrap()[0].group_id;
    assert_eq!(c.destroy(group).unwrap_err().0, errno::EPERM);
    c.destroy(manual).unwrap();
    c.destroy(ioas).unwrap();
    // A destroyed ID stays dead; a new object gets a different ID.
    assert_eq!(c.destroy(ioas).unwrap_err().0, errno::ENOENT);
    let again = c.ioas_alloc().unwrap();
    assert_ne!(again, ioas);
    assert_eq!(again & 0xffff, ioas & 0xffff);
    env.teardown();
}

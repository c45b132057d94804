//! The test guest (docs/guests.md). Its command line picks the variant:
//!
//! - `hello`: prints through the console call and exits with status 0;
//! - `spin`: prints, then loops forever (the hypervisor preempts it and stops it at its budget);
//! - `wild gpa=ADDR`: reads guest-physical ADDR, which should not be its memory;
//! - `triple`: triple-faults;
//! - `abi`: ABI v1 calls (GET_INFO, IOAS_ALLOC/MAP/UNMAP, DESTROY) on its own memory, and the
//!   ones that must fail; exits with the number of failed checks;
//! - `msr`, `io`, `vmrun`, `hlt`: executes an instruction a guest may not (RDMSR, OUT, VMRUN)
//!   or one that can never finish (HLT with interrupts off).
//!
//! Everything but the hypercall instruction is architecture-neutral; `arch_x86_64.rs` and
//! `arch_aarch64.rs` are the only shims (VMMCALL / HVC, and the instructions the containment
//! variants execute).
#![no_std]
#![no_main]

#[cfg(target_arch = "x86_64")]
mod arch_x86_64;
#[cfg(target_arch = "x86_64")]
use arch_x86_64 as arch;
#[cfg(target_arch = "aarch64")]
mod arch_aarch64;
#[cfg(target_arch = "aarch64")]
use arch_aarch64 as arch;

use hvabi::{AbiStruct, platform, start_info as si};

fn print(s: &str) {
    let _ = arch::hypercall(
        platform::CONSOLE_WRITE,
        s.as_ptr() as u64,
        s.len() as u64,
        0,
    );
}

fn exit(status: u32) -> ! {
    arch::hypercall(platform::EXIT, u64::from(status), 0, 0);
    // EXIT does not return; if it did, spinning is the only safe thing left.
    loop {
        core::hint::spin_loop();
    }
}

/// A small fixed buffer for formatting lines without an allocator.
struct Line {
    buf: [u8; 200],
    len: usize,
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

macro_rules! println {
    ($($arg:tt)*) => {{
        let mut l = Line { buf: [0; 200], len: 0 };
        let _ = core::fmt::Write::write_fmt(&mut l, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut l, "\n");
        print(core::str::from_utf8(&l.buf[..l.len]).unwrap_or("?\n"));
    }};
}

fn u64_at(page: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[off..off + 8]);
    u64::from_le_bytes(b)
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Entered as `guest_entry(start_info)` per docs/guests.md: 64-bit mode, paging on, RSP at the
/// top of RAM as after a `call`.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.entry")]
pub extern "C" fn guest_entry(start_info: u64) -> ! {
    let mut page = [0u8; 40];
    arch::read_bytes(start_info, &mut page);
    let magic = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
    if magic != si::MAGIC {
        print("testguest: bad start-info magic\n");
        exit(2);
    }
    let mem = u64_at(&page, si::OFF_MEM_BYTES);
    let cmd_gpa = u64_at(&page, si::OFF_CMDLINE_GPA);
    let cmd_len = (u64_at(&page, si::OFF_CMDLINE_LEN) as usize).min(si::CMDLINE_MAX);
    let mut cmd = [0u8; si::CMDLINE_MAX];
    arch::read_bytes(cmd_gpa, &mut cmd[..cmd_len]);
    let cmdline = core::str::from_utf8(&cmd[..cmd_len]).unwrap_or("");
    let mut words = cmdline.split([' ', ',']).filter(|w| !w.is_empty());
    let variant = words.next().unwrap_or("hello");
    println!("testguest: {variant}, {} KiB of RAM", mem >> 10);
    match variant {
        "hello" => {
            // Calls that must fail cleanly and return: an unknown op (ENOTTY), a console write
            // from memory that is not the guest's (EFAULT) or too long (EINVAL).
            let r = arch::hypercall(0xdead, 0, 0, 0);
            println!("testguest: unknown op returned {r}");
            let r = arch::hypercall(platform::CONSOLE_WRITE, mem - 4, 8, 0);
            println!("testguest: console write across the end of RAM returned {r}");
            let r = arch::hypercall(
                platform::CONSOLE_WRITE,
                0x1000,
                platform::CONSOLE_WRITE_MAX + 1,
                0,
            );
            println!("testguest: console write of 4097 bytes returned {r}");
            #[cfg(target_arch = "aarch64")]
            smccc_queries();
            println!("testguest: hello, exiting with status 0");
            exit(0)
        }
        "spin" => {
            println!("testguest: spinning forever");
            loop {
                core::hint::spin_loop();
            }
        }
        "wild" => {
            let gpa = words
                .find_map(|w| w.strip_prefix("gpa=").and_then(parse_u64))
                .unwrap_or(0x4000_0000);
            println!("testguest: reading gpa {gpa:#x}");
            let v = arch::wild_read(gpa);
            println!("testguest: read {v:#x}: the hypervisor let a wild read through");
            exit(1)
        }
        "triple" => {
            println!("testguest: triple-faulting");
            arch::triple_fault()
        }
        "abi" => {
            let free = u64_at(&page, si::OFF_FREE_START);
            let failed = abi_checks(mem, free);
            exit(failed)
        }
        "msr" | "io" | "vmrun" | "hlt" | "smc" => {
            println!("testguest: executing forbidden {variant}");
            arch::forbidden(variant);
            println!("testguest: {variant} returned: the hypervisor let it through");
            exit(1)
        }
        other => {
            println!("testguest: unknown variant {other:?}");
            exit(3)
        }
    }
}

/// The SMCCC queries of the hypervisor's service (docs/abi.md §2.2), and a function ID outside
/// it (PSCI_VERSION, which a guest would normally send to firmware).
#[cfg(target_arch = "aarch64")]
fn smccc_queries() {
    let uid = arch::smccc(0xc600_ff01);
    println!(
        "testguest: smccc uid {:08x} {:08x} {:08x} {:08x}",
        uid[0], uid[1], uid[2], uid[3]
    );
    let rev = arch::smccc(0xc600_ff03);
    println!("testguest: smccc revision {}.{}", rev[0], rev[1]);
    let r = arch::smccc(0x8400_0000)[0] as i64;
    println!("testguest: smccc psci-version over hvc returned {r}");
}

/// Issues ABI v1 call `op` with `arg` encoded in a buffer on this stack (identity-mapped, so
/// its address is its guest-physical address); returns the result and the struct as written back.
fn call<T: AbiStruct>(op: u32, arg: T) -> (i64, T) {
    let mut buf = [0u8; 128];
    arg.encode(&mut buf[..T::SIZE]);
    let r = arch::hypercall(op, buf.as_ptr() as u64, 0, 0);
    (r, T::decode(&buf[..T::SIZE]))
}

/// Reports one check; returns 1 if it failed.
fn check(name: &str, got: i64, want: i64) -> u32 {
    if got == want {
        println!("testguest: check {name}: ok");
        0
    } else {
        println!("testguest: check {name}: FAILED (got {got}, want {want})");
        1
    }
}

/// The `abi` variant: ABI v1 calls on the guest's own memory and objects, and the calls that must
/// fail: memory that is not the guest's, an argument struct outside its RAM, a destroyed object.
/// Leaves one IOAS with a mapping behind for the hypervisor to clean up at exit.
fn abi_checks(mem: u64, free: u64) -> u32 {
    use hvabi::*;
    let mut failed = 0;
    let (r, info) = call(
        op::GET_INFO,
        GetInfo {
            size: GetInfo::SIZE as u32,
            ..GetInfo::default()
        },
    );
    failed += check("get-info", r, 0);
    failed += check(
        "abi-version",
        info.out_abi_version.into(),
        ABI_VERSION.into(),
    );
    failed += check("no-devices", info.out_num_devices.into(), 0);
    let (r, ioas) = call(
        op::IOAS_ALLOC,
        IoasAlloc {
            size: IoasAlloc::SIZE as u32,
            ..IoasAlloc::default()
        },
    );
    failed += check("ioas-alloc", r, 0);
    let id = ioas.out_ioas_id;
    let map = |gpa: u64, iova: u64| IoasMap {
        size: IoasMap::SIZE as u32,
        flags: MAP_READABLE | MAP_WRITEABLE | MAP_FIXED_IOVA,
        ioas_id: id,
        reserved: 0,
        gpa,
        length: PAGE_SIZE,
        iova,
    };
    let (r, _) = call(op::IOAS_MAP, map(free, 0x10_0000));
    failed += check("map-own-page", r, 0);
    let (r, _) = call(op::IOAS_MAP, map(mem, 0x20_0000));
    failed += check("map-beyond-ram-eperm", r, -i64::from(errno::EPERM));
    let r = arch::hypercall(op::IOAS_MAP, mem + PAGE_SIZE, 0, 0);
    failed += check("args-beyond-ram-efault", r, -i64::from(errno::EFAULT));
    let (r, _) = call(
        op::IOAS_UNMAP,
        IoasUnmap {
            size: IoasUnmap::SIZE as u32,
            flags: 0,
            ioas_id: id,
            reserved: 0,
            iova: 0x10_0000,
            length: PAGE_SIZE,
        },
    );
    failed += check("unmap", r, 0);
    let destroy = Destroy {
        size: Destroy::SIZE as u32,
        id,
        ..Destroy::default()
    };
    let (r, _) = call(op::DESTROY, destroy);
    failed += check("destroy", r, 0);
    let (r, _) = call(op::DESTROY, destroy);
    failed += check("destroy-again-enoent", r, -i64::from(errno::ENOENT));
    // Left behind on purpose: the hypervisor must destroy it when the guest exits.
    let (r, ioas) = call(
        op::IOAS_ALLOC,
        IoasAlloc {
            size: IoasAlloc::SIZE as u32,
            ..IoasAlloc::default()
        },
    );
    failed += check("ioas-alloc-2", r, 0);
    let (r, _) = call(
        op::IOAS_MAP,
        IoasMap {
            ioas_id: ioas.out_ioas_id,
            ..map(free, 0x30_0000)
        },
    );
    failed += check("map-left-behind", r, 0);
    println!("testguest: abi checks: {failed} failed");
    failed
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    print("testguest: panic\n");
    exit(101)
}

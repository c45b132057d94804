//! The test guest (docs/guests.md). Its command line picks the variant:
//!
//! - `hello`: prints through the console call and exits with status 0;
//! - `spin`: prints, then loops forever (the hypervisor preempts it and stops it at its budget);
//! - `wild gpa=ADDR [write]`: reads (or writes) guest-physical ADDR, which should not be its memory;
//! - `triple`: triple-faults;
//! - `dma[,fault][,linger]`: its assigned edu does DMA both ways through an IOAS it attached it to
//!   (with `fault`, then a DMA to the unmapped IOVA, which must be blocked; with `linger`, it
//!   keeps its objects a while before exiting; `dma,abandon` starts a DMA and gets itself stopped
//!   before it completes);
//! - `pci`: what configuration space shows it (its edu only, sizing, BARs that do not move);
//! - `scatter gpa=ADDR size=BYTES`: with `scatter=ADDR+BYTES` on its guest item, ONE IOAS_MAP
//!   of that window of separate host pages, checked by edu DMA across its page boundaries, and
//!   a page left out of the map that edu cannot reach (`scatter.rs`);
//! - `irq[,raises=N][,forge][,linger=K]`: its edu's MSI and its timer as interrupts, waited for
//!   by HLT (`interrupts.rs`);
//! - `intruder`: beside a `dma` guest, tries to see, name, map and DMA into what is not its own;
//! - `bench [rounds=N] [row=NAME]`: times null hypercalls and IOAS_MAP/UNMAP of 4 KiB, 256 × 4 KiB
//!   (one map of host-contiguous pages, one map of a `scatter=` window of separate host pages,
//!   and 256 separate mappings in 4 batches) and 2 MiB with the TSC / CNTVCT, its edu attached; with 2 vCPUs
//!   also 1 vs 2 vCPUs mapping disjoint ranges of its IOAS at once (`row=scaling`: only that);
//! - `hostile`: thousands of random hypercalls, then a read of unmapped memory;
//! - `abi`: ABI v1 calls (GET_INFO, IOAS_ALLOC/MAP/UNMAP, DESTROY) on its own memory, and the
//!   ones that must fail; exits with the number of failed checks;
//! - `smp-map` (several vCPUs): every vCPU maps and unmaps pages of its own IOVA range of one
//!   shared IOAS in a loop, checking each result; vCPU 0 adds up the counts the others publish
//!   in shared memory and prints the total;
//! - `smp-wild` (several vCPUs): vCPU 1 reads unmapped guest-physical memory while vCPU 0 spins:
//!   the whole guest must be stopped;
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
        let mut l = $crate::Line { buf: [0; 200], len: 0 };
        let _ = core::fmt::Write::write_fmt(&mut l, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut l, "\n");
        $crate::print(core::str::from_utf8(&l.buf[..l.len]).unwrap_or("?\n"));
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

#[cfg(target_arch = "aarch64")]
mod msi_arm;
mod scatter;
mod smp;

// Interrupt delivery to the guest; the aarch64 shim gets the same hooks with its own delivery.
#[cfg(target_arch = "x86_64")]
mod interrupts;

/// Entered from `guest_entry` (arch_*.rs) as `guest_main(start_info, vcpu)` per docs/guests.md:
/// 64-bit mode, paging on, on this vCPU's stack.
#[unsafe(no_mangle)]
pub extern "C" fn guest_main(start_info: u64, vcpu: u64) -> ! {
    let mut page = [0u8; 48];
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
    // 0 from a hypervisor without the field: one vCPU.
    let vc = si::OFF_VCPU_COUNT;
    let vcpus = u32::from_le_bytes([page[vc], page[vc + 1], page[vc + 2], page[vc + 3]]).max(1);
    if vcpu != 0 {
        smp::secondary(
            variant,
            vcpu as u32,
            vcpus,
            u64_at(&page, si::OFF_FREE_START),
        )
    }
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
            let mut gpa = 0x4000_0000;
            let mut write = false;
            for w in words {
                if let Some(g) = w.strip_prefix("gpa=").and_then(parse_u64) {
                    gpa = g;
                }
                write |= w == "write";
            }
            if write {
                println!("testguest: writing gpa {gpa:#x}");
                arch::wild_write(gpa, 0x5afe_c0de);
                println!("testguest: wrote {gpa:#x}: the hypervisor let a wild write through");
                exit(1)
            }
            println!("testguest: reading gpa {gpa:#x}");
            let v = arch::wild_read(gpa);
            println!("testguest: read {v:#x}: the hypervisor let a wild read through");
            exit(1)
        }
        "triple" => {
            println!("testguest: triple-faulting");
            arch::triple_fault()
        }
        "dma" => {
            let free = u64_at(&page, si::OFF_FREE_START);
            let (mut fault, mut linger, mut abandon, mut guard) = (false, false, false, false);
            for w in words {
                fault |= w == "fault";
                linger |= w == "linger";
                abandon |= w == "abandon";
                guard |= w == "guard";
            }
            if abandon {
                abandon_dma(start_info, free, mem)
            }
            let (mut failed, edu) = dma_checks(start_info, free, fault);
            if guard {
                // Its DMA buffer is final: the hypervisor hashes it now and again when the
                // neighbour ends (platform call GUARD); this guest never touches it again.
                let r = arch::hypercall(platform::GUARD, free, hvabi::PAGE_SIZE, 0);
                failed += check("guard-own-buffer", r, 0);
            }
            if linger {
                // Keep its objects alive a while longer (a neighbour's test aims at them); with
                // `guard`, long enough for the neighbour's last attack to end first. Counted in
                // null hypercalls, whose cost fell about sixfold with issue 11's exit path while
                // the neighbour's edu DMAs still wait on the virtual clock: scaled to match.
                let rounds = if guard { 80_000 } else { 20_000 };
                // With `guard` (the storm scenarios' victim), its DMA keeps being checked while
                // it lingers, through a second page: the neighbour's storm falls in this time.
                let trips = match edu {
                    Some(e) if guard => Some(LingerDma::new(e, free + hvabi::PAGE_SIZE)),
                    _ => None,
                };
                let (mut ok, mut bad) = (0u32, 0u32);
                for k in 0..rounds {
                    if let Some(t) = trips.as_ref().filter(|_| k % 2_000 == 0) {
                        if t.round_trip(k / 2_000) {
                            ok += 1;
                        } else {
                            bad += 1;
                        }
                    }
                    let _ = arch::hypercall(0x7777, 0, 0, 0);
                }
                if trips.is_some() {
                    println!(
                        "testguest: linger: {ok} DMA round trips through a second page, every byte checked, {bad} failed"
                    );
                    failed += check("dma-during-linger", i64::from(bad), 0);
                }
                println!("testguest: done lingering");
            }
            exit(failed)
        }
        "pci" => exit(pci_checks(start_info)),
        "scatter" => exit(scatter::scatter_checks(
            start_info,
            u64_at(&page, si::OFF_FREE_START),
            &mut words,
        )),
        #[cfg(target_arch = "x86_64")]
        "irq" => exit(interrupts::irq_checks(
            start_info,
            u64_at(&page, si::OFF_FREE_START),
            &mut words,
        )),
        "intruder" => exit(intruder(start_info, mem)),
        "bench" => {
            let (mut rounds, mut only) = (BENCH_ROUNDS, None);
            for w in words {
                if let Some(r) = w.strip_prefix("rounds=").and_then(parse_u64) {
                    rounds = r as usize;
                }
                only = only.or(w.strip_prefix("row="));
            }
            exit(bench(start_info, mem, vcpus, rounds, only))
        }
        "hostile" => {
            let free = u64_at(&page, si::OFF_FREE_START);
            hostile(start_info, mem, free)
        }
        "smp-map" => exit(smp::map_unmap(0, vcpus, u64_at(&page, si::OFF_FREE_START))),
        "smp-wild" => smp::wait_for_stop(vcpus),
        "abi" => {
            let free = u64_at(&page, si::OFF_FREE_START);
            let failed = abi_checks(mem, free);
            exit(failed)
        }
        #[cfg(target_arch = "aarch64")]
        "msi" => {
            let (mut raises, mut forge) = (5, false);
            for w in words {
                if let Some(r) = w.strip_prefix("raises=").and_then(parse_u64) {
                    raises = r as u32;
                }
                forge |= w == "forge";
            }
            exit(msi_arm::msi_checks(
                start_info,
                u64_at(&page, si::OFF_FREE_START),
                raises,
                forge,
            ))
        }
        #[cfg(target_arch = "aarch64")]
        "timer" => {
            let (mut rounds, mut ms) = (3, 2);
            for w in words {
                if let Some(r) = w.strip_prefix("rounds=").and_then(parse_u64) {
                    rounds = r as u32;
                }
                if let Some(m) = w.strip_prefix("ms=").and_then(parse_u64) {
                    ms = m;
                }
            }
            exit(arch::timer_checks(rounds, ms))
        }
        #[cfg(target_arch = "aarch64")]
        "aarch32" => {
            println!("testguest: spinning at EL0 in AArch32 state");
            arch::spin_in_aarch32_el0()
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
    use hvabi::smccc::{FN_CALL_UID, FN_REVISION, HV_SMC64_BASE};
    let uid = arch::smccc(u64::from(HV_SMC64_BASE | FN_CALL_UID));
    println!(
        "testguest: smccc uid {:08x} {:08x} {:08x} {:08x}",
        uid[0], uid[1], uid[2], uid[3]
    );
    let rev = arch::smccc(u64::from(HV_SMC64_BASE | FN_REVISION));
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

/// IOAS_ALLOC: its result and the new IOAS's ID (as written back).
fn ioas_alloc() -> (i64, u32) {
    use hvabi::*;
    let (r, ioas) = call(
        op::IOAS_ALLOC,
        IoasAlloc {
            size: IoasAlloc::SIZE as u32,
            ..IoasAlloc::default()
        },
    );
    (r, ioas.out_ioas_id)
}

/// DEVICE_ATTACH of device `dev_id` to IOAS (or HWPT) `pt_id`: its result.
fn device_attach(dev_id: u32, pt_id: u32) -> i64 {
    use hvabi::*;
    call(
        op::DEVICE_ATTACH,
        DeviceAttach {
            size: DeviceAttach::SIZE as u32,
            dev_id,
            pt_id,
            ..DeviceAttach::default()
        },
    )
    .0
}

/// The IOAS_MAP arguments every variant uses: `[gpa, gpa + length)` read/write at the fixed
/// `iova` in IOAS `ioas_id`.
pub(crate) fn fixed_map(ioas_id: u32, gpa: u64, length: u64, iova: u64) -> hvabi::IoasMap {
    use hvabi::*;
    IoasMap {
        size: IoasMap::SIZE as u32,
        flags: MAP_READABLE | MAP_WRITEABLE | MAP_FIXED_IOVA,
        ioas_id,
        reserved: 0,
        gpa,
        length,
        iova,
    }
}

/// IOAS_MAP of `[gpa, gpa + length)`, read/write, at the fixed `iova` in IOAS `ioas_id`: its
/// result.
pub(crate) fn map_range(ioas_id: u32, gpa: u64, length: u64, iova: u64) -> i64 {
    call(hvabi::op::IOAS_MAP, fixed_map(ioas_id, gpa, length, iova)).0
}

/// IOAS_MAP of the page at `gpa`, read/write, at the fixed `iova` in IOAS `ioas_id`: its result.
fn map_page(ioas_id: u32, gpa: u64, iova: u64) -> i64 {
    map_range(ioas_id, gpa, hvabi::PAGE_SIZE, iova)
}

/// The setup every edu DMA variant starts with: IOAS_ALLOC, DEVICE_ATTACH of `dev_id` to the
/// new IOAS, IOAS_MAP of the page at `gpa` (read/write) at the fixed `iova`. `status` sees each
/// call's result as it returns (0: IOAS_ALLOC, 1: DEVICE_ATTACH, 2: IOAS_MAP), before the next
/// call is made; every call is made whatever the ones before returned. Returns the IOAS's ID (as
/// IOAS_ALLOC wrote it back).
fn ioas_with_page(dev_id: u32, gpa: u64, iova: u64, mut status: impl FnMut(usize, i64)) -> u32 {
    let (r, ioas) = ioas_alloc();
    status(0, r);
    status(1, device_attach(dev_id, ioas));
    status(2, map_page(ioas, gpa, iova));
    ioas
}

/// [`ioas_with_page`] with each call checked to succeed, under the check names `names` (IOAS_ALLOC,
/// DEVICE_ATTACH, IOAS_MAP). Returns the number of failed checks and the IOAS's ID.
fn checked_ioas_with_page(dev_id: u32, gpa: u64, iova: u64, names: [&str; 3]) -> (u32, u32) {
    let mut failed = 0;
    let ioas = ioas_with_page(dev_id, gpa, iova, |step, r| {
        failed += check(names[step], r, 0);
    });
    (failed, ioas)
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
    let (r, id) = ioas_alloc();
    failed += check("ioas-alloc", r, 0);
    failed += check("map-own-page", map_page(id, free, 0x10_0000), 0);
    let r = map_page(id, mem, 0x20_0000);
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
    let (r, ioas) = ioas_alloc();
    failed += check("ioas-alloc-2", r, 0);
    failed += check("map-left-behind", map_page(ioas, free, 0x30_0000), 0);
    println!("testguest: abi checks: {failed} failed");
    failed
}

/// edu (QEMU's educational PCI device) registers in BAR0 and its DMA buffer address.
mod edu {
    pub const VENDOR: u16 = 0x1234;
    pub const DEVICE: u16 = 0x11e8;
    pub const ID: u64 = 0x00;
    pub const DMA_SRC: u64 = 0x80;
    pub const DMA_DST: u64 = 0x88;
    pub const DMA_COUNT: u64 = 0x90;
    pub const DMA_CMD: u64 = 0x98;
    pub const CMD_START: u64 = 1;
    pub const CMD_TO_RAM: u64 = 2;
    pub const BUFFER: u64 = 0x40000;
}

fn mmio_read(addr: u64) -> u64 {
    // SAFETY: `addr` is in a BAR of a device assigned to this guest (from the start-info page),
    // which the hypervisor mapped at that guest-physical address; edu accepts 64-bit accesses
    // from 0x80 up and 32-bit ones below.
    unsafe {
        if addr & 0xff < 0x80 {
            u64::from(core::ptr::read_volatile(addr as *const u32))
        } else {
            core::ptr::read_volatile(addr as *const u64)
        }
    }
}

fn mmio_write(addr: u64, v: u64) {
    // SAFETY: as in `mmio_read`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Runs one edu DMA and waits for it (edu clears CMD_START when done).
fn edu_dma(bar: u64, src: u64, dst: u64, len: u64, to_ram: bool) -> bool {
    mmio_write(bar + edu::DMA_SRC, src);
    mmio_write(bar + edu::DMA_DST, dst);
    mmio_write(bar + edu::DMA_COUNT, len);
    let cmd = edu::CMD_START | if to_ram { edu::CMD_TO_RAM } else { 0 };
    mmio_write(bar + edu::DMA_CMD, cmd);
    for _ in 0..50_000_000u64 {
        if mmio_read(bar + edu::DMA_CMD) & edu::CMD_START == 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// What the `dma` variant's linger needs of its edu: BAR, IOAS and the byte-pattern seed.
#[derive(Clone, Copy)]
struct EduIoas {
    bar: u64,
    ioas: u32,
    seed: u8,
}

/// DMA round trips through one more page of the guest's own RAM, mapped at [`LINGER_IOVA`].
struct LingerDma {
    edu: EduIoas,
    page: u64,
    mapped: bool,
}

const LINGER_IOVA: u64 = 0x10_1000;

impl LingerDma {
    fn new(edu: EduIoas, page: u64) -> Self {
        let r = map_page(edu.ioas, page, LINGER_IOVA);
        LingerDma {
            edu,
            page,
            mapped: check("linger-map", r, 0) == 0,
        }
    }

    /// RAM -> edu -> RAM, 256 bytes whose pattern changes with `round`; every byte checked.
    fn round_trip(&self, round: u32) -> bool {
        if !self.mapped {
            return false;
        }
        let buf = self.page as *mut u8;
        let byte = |i: usize| (i as u8).wrapping_mul(13) ^ self.edu.seed ^ round as u8;
        for i in 0..256usize {
            // SAFETY: the page after `free` in this guest's own RAM, identity-mapped, used by
            // nothing else.
            unsafe { buf.add(i).write_volatile(byte(i)) };
            // SAFETY: as above; the second half receives the copy.
            unsafe { buf.add(0x800 + i).write_volatile(!byte(i)) };
        }
        let bar = self.edu.bar;
        edu_dma(bar, LINGER_IOVA, edu::BUFFER, 256, false)
            && edu_dma(bar, edu::BUFFER, LINGER_IOVA + 0x800, 256, true)
            // SAFETY: as above.
            && (0..256usize).all(|i| unsafe { buf.add(0x800 + i).read_volatile() } == byte(i))
    }
}

/// The `dma` variant: finds its edu in the start-info device list, checks its registers through
/// the mapped BAR, lists its devices, attaches the edu to a fresh IOAS, maps one page of its RAM
/// and makes the edu copy 256 bytes RAM -> device -> RAM through the IOMMU; every byte checked.
///
/// With `fault`: then unmaps the page and aims one more device-to-RAM DMA at it, which the IOMMU
/// must block (the hypervisor reports the fault) and which must leave the page unchanged.
fn dma_checks(start_info: u64, free: u64, fault: bool) -> (u32, Option<EduIoas>) {
    use hvabi::*;
    let mut failed = 0;
    let mut count = [0u8; 4];
    arch::read_bytes(start_info + si::OFF_DEVICE_COUNT as u64, &mut count);
    let n = (u32::from_le_bytes(count) as usize).min(si::MAX_DEVICES);
    let mut found = None;
    for i in 0..n {
        let mut e = [0u8; si::DEVICE_ENTRY];
        arch::read_bytes(
            start_info + (si::OFF_DEVICES + i * si::DEVICE_ENTRY) as u64,
            &mut e,
        );
        let vendor = u16::from_le_bytes([e[4], e[5]]);
        let device = u16::from_le_bytes([e[6], e[7]]);
        let dev_id = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        let bar0 = u64_at(&e, 16);
        println!(
            "testguest: device {:04x}:{:02x}:{:02x}.{} {vendor:04x}:{device:04x} dev_id {dev_id} bar0 {bar0:#x}",
            u16::from_le_bytes([e[0], e[1]]),
            e[2],
            e[3] >> 3,
            e[3] & 7
        );
        if (vendor, device) == (edu::VENDOR, edu::DEVICE) && bar0 != 0 {
            found = Some((dev_id, bar0, e[3]));
        }
    }
    // The byte pattern depends on the device's devfn, so two guests doing this at once never
    // write the same bytes: a DMA that reached the other guest's page would fail its check.
    let Some((dev_id, bar, seed)) = found else {
        println!("testguest: check edu-present: FAILED (no edu in the start-info page)");
        return (1, None);
    };
    failed += check(
        "edu-id-register",
        mmio_read(bar + edu::ID) as i64,
        0x010000ed,
    );
    let mut entries = [0u8; 4 * DeviceEntry::SIZE];
    let (r, list) = call(
        op::DEVICE_LIST,
        DeviceList {
            size: DeviceList::SIZE as u32,
            num_devices: 4,
            devices_gpa: entries.as_mut_ptr() as u64,
            ..DeviceList::default()
        },
    );
    failed += check("device-list", r, 0);
    failed += check("device-list-count", list.num_devices.into(), n as i64);
    let first = DeviceEntry::decode(&entries[..DeviceEntry::SIZE]);
    failed += check("device-list-dev-id", first.dev_id.into(), dev_id.into());
    const IOVA: u64 = 0x10_0000;
    let (setup_failed, ioas) =
        checked_ioas_with_page(dev_id, free, IOVA, ["ioas-alloc", "attach", "map"]);
    failed += setup_failed;
    let buf = free as *mut u8;
    for i in 0..256usize {
        // SAFETY: `free` is the first page after the image in this guest's own RAM (start-info
        // page), identity-mapped, used by nothing else.
        unsafe { buf.add(i).write_volatile((i as u8).wrapping_mul(7) ^ seed) };
        // SAFETY: as above; the second half of the page receives the copy.
        unsafe { buf.add(0x800 + i).write_volatile(0) };
    }
    let ok = edu_dma(bar, IOVA, edu::BUFFER, 256, false);
    failed += check("dma-to-device", i64::from(ok), 1);
    let ok = edu_dma(bar, edu::BUFFER, IOVA + 0x800, 256, true);
    failed += check("dma-to-ram", i64::from(ok), 1);
    let mut bad = 0;
    for i in 0..256usize {
        // SAFETY: as above.
        let v = unsafe { buf.add(0x800 + i).read_volatile() };
        if v != (i as u8).wrapping_mul(7) ^ seed {
            bad += 1;
        }
    }
    failed += check("dma-every-byte", bad, 0);
    if fault {
        let (r, _) = call(
            op::IOAS_UNMAP,
            IoasUnmap {
                size: IoasUnmap::SIZE as u32,
                flags: 0,
                ioas_id: ioas,
                reserved: 0,
                iova: IOVA,
                length: PAGE_SIZE,
            },
        );
        failed += check("unmap", r, 0);
        for i in 0..256usize {
            // SAFETY: as above: the guest's own page, no longer mapped for the device.
            unsafe { buf.add(0x800 + i).write_volatile(0xee) };
        }
        println!("testguest: DMA to the unmapped iova {:#x}", IOVA + 0x800);
        let ok = edu_dma(bar, edu::BUFFER, IOVA + 0x800, 256, true);
        failed += check("dma-after-unmap-completes", i64::from(ok), 1);
        let mut changed = 0;
        for i in 0..256usize {
            // SAFETY: as above.
            if unsafe { buf.add(0x800 + i).read_volatile() } != 0xee {
                changed += 1;
            }
        }
        failed += check("dma-after-unmap-blocked", changed, 0);
    }
    println!("testguest: dma checks: {failed} failed");
    let edu = EduIoas { bar, ioas, seed };
    (failed, Some(edu))
}

fn cfg_address(bus: u8, dev: u8, func: u8, offset: u8) -> u32 {
    1 << 31
        | u32::from(bus) << 16
        | u32::from(dev) << 11
        | u32::from(func) << 8
        | u32::from(offset & 0xfc)
}

/// The `pci` variant: what configuration space shows this guest (its first assigned device must
/// be an edu): only its own function on bus 0, the real IDs and BAR, BAR sizing, a BAR that does
/// not move, COMMAND bits it may and may not set, the capability list.
fn pci_checks(start_info: u64) -> u32 {
    let mut e = [0u8; si::DEVICE_ENTRY];
    arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
    let (bus, dev, func) = (e[2], e[3] >> 3, e[3] & 7);
    let bar0 = u64_at(&e, 16);
    let mut failed = 0;
    let mut visible = 0;
    for d in 0..32u8 {
        let id = arch::pci_config_read(cfg_address(0, d, 0, 0));
        if id & 0xffff != 0xffff {
            visible += 1;
            println!("testguest: pci 00:{d:02x}.0 visible, id {id:#010x}");
        }
    }
    failed += check("one-function-visible-on-bus-0", visible, 1);
    let me = |off| cfg_address(bus, dev, func, off);
    failed += check("own-id", arch::pci_config_read(me(0)).into(), 0x11e8_1234);
    failed += check(
        "host-bridge-invisible",
        arch::pci_config_read(cfg_address(0, 0, 0, 0)).into(),
        0xffff_ffff,
    );
    let bar = arch::pci_config_read(me(0x10));
    failed += check("bar0-address", i64::from(bar & !0xf), bar0 as i64);
    arch::pci_config_write(me(0x10), u32::MAX);
    let mask = arch::pci_config_read(me(0x10));
    arch::pci_config_write(me(0x10), bar);
    failed += check("bar0-sizing-1MiB", i64::from(mask & !0xf), 0xfff0_0000);
    failed += check(
        "bar0-restored",
        arch::pci_config_read(me(0x10)).into(),
        bar.into(),
    );
    arch::pci_config_write(me(0x10), bar.wrapping_add(0x100_0000));
    failed += check(
        "bar0-cannot-move",
        arch::pci_config_read(me(0x10)).into(),
        bar.into(),
    );
    // COMMAND: memory space and bus master are the guest's to set; I/O space (bit 0) is not
    // the guest's to change (it writes the opposite of what is there; it must stay).
    let io_before = arch::pci_config_read(me(0x04)) & 1;
    arch::pci_config_write16(me(0x04), 0, 0b110 | (io_before as u16 ^ 1));
    let command = arch::pci_config_read(me(0x04)) & 0xffff;
    failed += check("command-mem-and-master", i64::from(command & 0b110), 0b110);
    failed += check(
        "command-io-unchanged",
        i64::from(command & 1),
        i64::from(io_before),
    );
    let cap = (arch::pci_config_read(me(0x34)) & 0xfc) as u8;
    let cap_id = arch::pci_config_read(me(cap)) & 0xff;
    println!("testguest: pci capability list starts at {cap:#x} with id {cap_id:#x}");
    failed += check("first-capability-is-msi", cap_id.into(), 0x05);
    println!("testguest: pci checks: {failed} failed");
    failed
}

/// `dma,abandon`: attaches its edu, maps a page, starts a device-to-RAM DMA into it and, before
/// the DMA can complete (edu takes 100 ms of virtual time), reads unmapped memory. The hypervisor
/// stops it and destroys its objects; the DMA that the device then performs must be blocked (and
/// is reported as this guest's fault): a stopped guest's device cannot write memory that is no
/// longer its own.
fn abandon_dma(start_info: u64, free: u64, mem: u64) -> ! {
    let mut e = [0u8; si::DEVICE_ENTRY];
    arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
    let dev_id = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let bar = u64_at(&e, 16);
    let mut results = [0; 3];
    ioas_with_page(dev_id, free, 0x10_0000, |step, r| results[step] = r);
    let [_, r1, r2] = results;
    println!("testguest: attach {r1}, map {r2}; starting a DMA and abandoning it");
    mmio_write(bar + edu::DMA_SRC, edu::BUFFER);
    mmio_write(bar + edu::DMA_DST, 0x10_0000);
    mmio_write(bar + edu::DMA_COUNT, 256);
    mmio_write(bar + edu::DMA_CMD, edu::CMD_START | edu::CMD_TO_RAM);
    let v = arch::wild_read(mem + 0x10_0000);
    println!("testguest: read {v:#x}: the hypervisor let a wild read through");
    exit(1)
}

/// The `intruder` variant, run beside a `dma` guest: everything it tries against the other guest
/// must fail. It sees one device (its own) in DEVICE_LIST and in configuration space, cannot map
/// memory beyond its RAM, cannot name object IDs it did not create (the other guest's IOAS among
/// them), and a DMA its own edu aims at the IOVA the other guest uses is blocked (the hypervisor
/// reports the fault as this guest's).
fn intruder(start_info: u64, mem: u64) -> u32 {
    use hvabi::*;
    let mut failed = 0;
    let mut e = [0u8; si::DEVICE_ENTRY];
    arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
    let dev_id = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let bar = u64_at(&e, 16);
    let mut entries = [0u8; 8 * DeviceEntry::SIZE];
    let (r, list) = call(
        op::DEVICE_LIST,
        DeviceList {
            size: DeviceList::SIZE as u32,
            num_devices: 8,
            devices_gpa: entries.as_mut_ptr() as u64,
            ..DeviceList::default()
        },
    );
    failed += check("device-list", r, 0);
    failed += check("device-list-only-own", list.num_devices.into(), 1);
    // First (while the other guest is still setting up and using its IOVA): its own edu,
    // attached to its own empty IOAS, aims a DMA at the IOVA the other guest maps.
    let (r, ioas) = ioas_alloc();
    failed += check("ioas-alloc", r, 0);
    failed += check("attach-own", device_attach(dev_id, ioas), 0);
    println!("testguest: aiming a DMA at iova 0x100800, the other guest's IOVA");
    let done = edu_dma(bar, edu::BUFFER, 0x10_0800, 256, true);
    failed += check("aimed-dma-completes", i64::from(done), 1);
    let r = map_page(ioas, mem, 0x20_0000);
    failed += check("map-beyond-own-ram-eperm", r, -i64::from(errno::EPERM));
    let mut visible = 0;
    for d in 0..32u8 {
        if arch::pci_config_read(cfg_address(0, d, 0, 0)) & 0xffff != 0xffff {
            visible += 1;
        }
    }
    failed += check("config-space-only-own", visible, 1);
    // Object IDs it never created: the other guest's are among these numbers in its own table.
    let mut named = 0;
    for id in 1..=64u32 {
        if id == dev_id || id == ioas {
            continue;
        }
        let (r, _) = call(
            op::IOAS_MAP,
            IoasMap {
                size: IoasMap::SIZE as u32,
                flags: MAP_READABLE,
                ioas_id: id,
                reserved: 0,
                gpa: 0x10000,
                length: PAGE_SIZE,
                iova: 0,
            },
        );
        if r != -i64::from(errno::ENOENT) {
            named += 1;
        }
    }
    failed += check("foreign-ids-enoent", named, 0);
    // Last, while the other guest lingers with its finished buffer guarded by the hypervisor:
    // more DMAs at its IOVA, spread out in time, each of which must be blocked.
    for _ in 0..AIMED_AGAIN {
        for _ in 0..400 {
            let _ = arch::hypercall(0x7777, 0, 0, 0);
        }
        failed += check(
            "aimed-dma-again-completes",
            i64::from(edu_dma(bar, edu::BUFFER, 0x10_0800, 256, true)),
            1,
        );
    }
    // The guest's own count of what it caused, for the scenario to compare with the faults the
    // hypervisor attributes to it.
    println!(
        "testguest: intruder: {} DMAs of 256 bytes aimed at the other guest's IOVA",
        1 + AIMED_AGAIN
    );
    println!("testguest: intruder checks: {failed} failed");
    failed
}

/// DMAs the intruder aims at the other guest's IOVA after its first one.
const AIMED_AGAIN: u32 = 8;

/// Rounds of the `bench` variant unless its command line says `rounds=N`.
const BENCH_ROUNDS: usize = 3;
/// Most rounds a `bench` run takes (the per-row sample arrays live on the stack).
const BENCH_MAX_ROUNDS: usize = 15;
/// Guest-physical layout of the `bench` variant (needs `mem=8M,scatter=4M+1M`): the 2 MiB row
/// maps the 2 MiB-aligned `[2 MiB, 4 MiB)`, and the separate row every other page of it; the
/// scattered row maps `[4 MiB, 5 MiB)`, the `scatter=` window (separate host pages, no two
/// adjacent); the 4 KiB rows and the contiguous row map `[5 MiB, 6 MiB)`, host-contiguous like
/// all RAM outside the window (the 2-vCPU scaling rows: 1 MiB per vCPU from there).
const BENCH_GPA_2M: u64 = 2 << 20;
const BENCH_GPA_1M: u64 = 4 << 20;
const BENCH_GPA_CONTIG: u64 = 5 << 20;
/// IOVAs of the rows: 4 KiB pages cycle through 64 slots at `IOVA_4K` (above the aarch64 MSI
/// doorbell window at 256 MiB, which DEVICE_RESERVED_RANGES reports); 1 MiB at `IOVA_1M`; the
/// 2 MiB row at a 2 MiB-aligned IOVA, so the engine may use one 2 MiB leaf.
const BENCH_IOVA_4K: u64 = 0x3000_0000;
const BENCH_IOVA_1M: u64 = 0x2000_0000;
const BENCH_IOVA_2M: u64 = 0x4020_0000;

/// One benchmark row: what it is called in the output and how many calls (or call groups)
/// one round times.
#[derive(Clone, Copy)]
enum Row {
    Null,
    Map4k,
    Unmap4k,
    Pair4k,
    Map1mContig,
    Unmap1mContig,
    Pair1mContig,
    Pair1mScattered,
    Pair1mSeparate,
    Map2m,
    Unmap2m,
    Pair2m,
}

impl Row {
    const ALL: [Row; 12] = [
        Row::Null,
        Row::Map4k,
        Row::Unmap4k,
        Row::Pair4k,
        Row::Map1mContig,
        Row::Unmap1mContig,
        Row::Pair1mContig,
        Row::Pair1mScattered,
        Row::Pair1mSeparate,
        Row::Map2m,
        Row::Unmap2m,
        Row::Pair2m,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::Null => "null-hypercall",
            Row::Map4k => "ioas-map-4k",
            Row::Unmap4k => "ioas-unmap-4k",
            Row::Pair4k => "map-unmap-4k",
            Row::Map1mContig => "ioas-map-256x4k-contiguous",
            Row::Unmap1mContig => "ioas-unmap-256x4k-contiguous",
            Row::Pair1mContig => "map-unmap-256x4k-contiguous",
            Row::Pair1mScattered => "map-unmap-256x4k-scattered",
            Row::Pair1mSeparate => "map-unmap-256x4k-separate",
            Row::Map2m => "ioas-map-2m",
            Row::Unmap2m => "ioas-unmap-2m",
            Row::Pair2m => "map-unmap-2m",
        }
    }

    fn calls(self) -> u64 {
        match self {
            Row::Null => 1000,
            Row::Map4k | Row::Unmap4k | Row::Pair4k => 200,
            Row::Map2m | Row::Unmap2m | Row::Pair2m => 50,
            _ => 10,
        }
    }
}

/// The `bench` variant. With its device attached to a fresh IOAS (so every map and unmap
/// writes the IOMMU's tables and invalidates its TLB), it times each [`Row`] `calls()` times per
/// round, the rows interleaved round by round (so slow phases of the host spread over all rows
/// when the clock is real time), and prints per row the median, minimum and maximum over the
/// rounds of the ticks per call. Under `-icount shift=0` a tick is one instruction.
fn bench(start_info: u64, mem: u64, vcpus: u32, rounds: usize, only: Option<&str>) -> u32 {
    use hvabi::*;
    let rounds = rounds.clamp(1, BENCH_MAX_ROUNDS);
    if mem < BENCH_GPA_CONTIG + (2 << 20) {
        println!("bench: needs mem=8M (has {} KiB)", mem >> 10);
        return 1;
    }
    let Some(dev_id) = first_edu(start_info) else {
        println!("bench: no edu device assigned: maps would reach no IOMMU table");
        return 1;
    };
    let (r, ioas) = call(
        op::IOAS_ALLOC,
        IoasAlloc {
            size: IoasAlloc::SIZE as u32,
            ..IoasAlloc::default()
        },
    );
    if r != 0 {
        println!("bench: IOAS_ALLOC failed with {r}");
        return 1;
    }
    let ioas = ioas.out_ioas_id;
    let (r, _) = call(
        op::DEVICE_ATTACH,
        DeviceAttach {
            size: DeviceAttach::SIZE as u32,
            dev_id,
            pt_id: ioas,
            ..DeviceAttach::default()
        },
    );
    if r != 0 {
        println!("bench: DEVICE_ATTACH failed with {r}");
        return 1;
    }
    let mut b = Bench::new(ioas);
    // Ticks per call, by round and row.
    let mut samples = [[0u64; Row::ALL.len()]; BENCH_MAX_ROUNDS];
    for round in samples.iter_mut().take(rounds) {
        for (sample, &row) in round.iter_mut().zip(Row::ALL.iter()) {
            if only.is_none_or(|o| o == row.name()) {
                *sample = b.run(row) / row.calls();
            }
        }
    }
    println!(
        "bench: device dev_id {dev_id} attached to ioas {ioas}; {rounds} rounds, {} ticks",
        arch::TIMESTAMP_NAME
    );
    for (k, &row) in Row::ALL.iter().enumerate() {
        if only.is_some_and(|o| o != row.name()) {
            continue;
        }
        let mut column = [0u64; BENCH_MAX_ROUNDS];
        for (c, round) in column.iter_mut().zip(&samples[..rounds]) {
            *c = round[k];
        }
        let s = &mut column[..rounds];
        s.sort_unstable();
        println!(
            "bench: {} {} calls x {rounds} rounds, median {} min {} max {} {} ticks each",
            row.name(),
            row.calls(),
            s[rounds / 2],
            s[0],
            s[rounds - 1],
            arch::TIMESTAMP_NAME
        );
    }
    // With 2 vCPUs (`row=scaling` alone, or every row): the 1 vs 2 vCPU scaling rows.
    if only.is_none_or(|o| o == "scaling") {
        b.errors += crate::smp::bench_scaling(ioas, vcpus, rounds);
    }
    println!("bench: {} calls failed", b.errors);
    b.errors
}

/// The dev_id of the first edu in the start-info page's device list.
fn first_edu(start_info: u64) -> Option<u32> {
    let mut count = [0u8; 4];
    arch::read_bytes(start_info + si::OFF_DEVICE_COUNT as u64, &mut count);
    let n = (u32::from_le_bytes(count) as usize).min(si::MAX_DEVICES);
    (0..n).find_map(|i| {
        let mut e = [0u8; si::DEVICE_ENTRY];
        arch::read_bytes(
            start_info + (si::OFF_DEVICES + i * si::DEVICE_ENTRY) as u64,
            &mut e,
        );
        let id = (
            u16::from_le_bytes([e[4], e[5]]),
            u16::from_le_bytes([e[6], e[7]]),
        );
        (id == (edu::VENDOR, edu::DEVICE)).then(|| u32::from_le_bytes([e[8], e[9], e[10], e[11]]))
    })
}

/// Pre-encoded argument structs of the bench rows.
struct Bench {
    ioas: u32,
    errors: u32,
    /// Map / unmap of one page at each of the 64 4 KiB IOVA slots.
    map_4k: [[u8; hvabi::IoasMap::SIZE]; 64],
    unmap_4k: [[u8; hvabi::IoasUnmap::SIZE]; 64],
    /// The contiguous row: 1 MiB of host-contiguous RAM.
    map_1m: [u8; hvabi::IoasMap::SIZE],
    unmap_1m: [u8; hvabi::IoasUnmap::SIZE],
    /// The scattered row: the 1 MiB `scatter=` window, 256 host runs, in one map.
    map_1m_scattered: [u8; hvabi::IoasMap::SIZE],
    map_2m: [u8; hvabi::IoasMap::SIZE],
    unmap_2m: [u8; hvabi::IoasUnmap::SIZE],
    /// The separate row: 256 one-page entries, IOVAs contiguous from `IOVA_1M`, guest pages
    /// (and so host pages: RAM outside the window is one host-contiguous block) every other
    /// page of `[2 MiB, 4 MiB)`, so no two are adjacent; `MAX_BATCH` entries per call.
    batch_entries: [[u8; hvabi::MapEntry::SIZE]; 256],
    batch: [[u8; hvabi::IoasMapBatch::SIZE]; 256 / hvabi::MAX_BATCH as usize],
}

impl Bench {
    fn new(ioas: u32) -> Bench {
        use hvabi::*;
        let map = |gpa, length, iova| {
            let mut b = [0u8; IoasMap::SIZE];
            fixed_map(ioas, gpa, length, iova).encode(&mut b);
            b
        };
        let unmap = |iova, length| {
            let mut b = [0u8; IoasUnmap::SIZE];
            IoasUnmap {
                size: IoasUnmap::SIZE as u32,
                flags: 0,
                ioas_id: ioas,
                reserved: 0,
                iova,
                length,
            }
            .encode(&mut b);
            b
        };
        let mut b = Bench {
            ioas,
            errors: 0,
            map_4k: [[0; IoasMap::SIZE]; 64],
            unmap_4k: [[0; IoasUnmap::SIZE]; 64],
            map_1m: map(BENCH_GPA_CONTIG, 1 << 20, BENCH_IOVA_1M),
            unmap_1m: unmap(BENCH_IOVA_1M, 1 << 20),
            map_1m_scattered: map(BENCH_GPA_1M, 1 << 20, BENCH_IOVA_1M),
            map_2m: map(BENCH_GPA_2M, 2 << 20, BENCH_IOVA_2M),
            unmap_2m: unmap(BENCH_IOVA_2M, 2 << 20),
            batch_entries: [[0; MapEntry::SIZE]; 256],
            batch: [[0; IoasMapBatch::SIZE]; 256 / MAX_BATCH as usize],
        };
        for i in 0..64u64 {
            let iova = BENCH_IOVA_4K + i * PAGE_SIZE;
            b.map_4k[i as usize] = map(BENCH_GPA_CONTIG, PAGE_SIZE, iova);
            b.unmap_4k[i as usize] = unmap(iova, PAGE_SIZE);
        }
        for (i, e) in b.batch_entries.iter_mut().enumerate() {
            MapEntry {
                flags: MAP_READABLE | MAP_WRITEABLE | MAP_FIXED_IOVA,
                reserved: 0,
                gpa: BENCH_GPA_2M + 2 * i as u64 * PAGE_SIZE,
                length: PAGE_SIZE,
                iova: BENCH_IOVA_1M + i as u64 * PAGE_SIZE,
            }
            .encode(e);
        }
        b
    }

    fn call(&mut self, op: u32, arg: &[u8]) {
        let r = arch::hypercall(op, arg.as_ptr() as u64, 0, 0);
        self.errors += u32::from(r != 0);
    }

    /// The separate row's map: `256 / MAX_BATCH` IOAS_MAP_BATCH calls (the ABI's batch limit).
    fn map_separate(&mut self) {
        use hvabi::*;
        let per = MAX_BATCH as usize;
        for c in 0..self.batch.len() {
            // The entries are encoded again before every call: the hypervisor writes each
            // completed entry's IOVA back, and a batch must not depend on what it left there.
            IoasMapBatch {
                size: IoasMapBatch::SIZE as u32,
                flags: 0,
                ioas_id: self.ioas,
                num_entries: MAX_BATCH,
                out_done: 0,
                reserved: 0,
                entries_gpa: self.batch_entries[c * per].as_ptr() as u64,
            }
            .encode(&mut self.batch[c]);
            let arg = self.batch[c];
            let r = arch::hypercall(op::IOAS_MAP_BATCH, arg.as_ptr() as u64, 0, 0);
            self.errors += u32::from(r != 0);
        }
    }

    /// Runs `row` `row.calls()` times; returns the ticks the timed part took.
    fn run(&mut self, row: Row) -> u64 {
        use hvabi::op::{IOAS_MAP, IOAS_UNMAP};
        let n = row.calls();
        let mut ticks = 0;
        for i in 0..n {
            let slot = (i % 64) as usize;
            let (m4, u4) = (self.map_4k[slot], self.unmap_4k[slot]);
            let (m1, u1, m2, u2) = (self.map_1m, self.unmap_1m, self.map_2m, self.unmap_2m);
            let m1s = self.map_1m_scattered;
            match row {
                Row::Null => {
                    let t = arch::timestamp();
                    for _ in 0..n {
                        let _ = arch::hypercall(0x7777, 0, 0, 0);
                    }
                    return arch::timestamp() - t;
                }
                Row::Map4k | Row::Map1mContig | Row::Map2m => {
                    let (m, u) = match row {
                        Row::Map4k => (&m4, &u4),
                        Row::Map1mContig => (&m1, &u1),
                        _ => (&m2, &u2),
                    };
                    let t = arch::timestamp();
                    self.call(IOAS_MAP, m);
                    ticks += arch::timestamp() - t;
                    self.call(IOAS_UNMAP, u);
                }
                Row::Unmap4k | Row::Unmap1mContig | Row::Unmap2m => {
                    let (m, u) = match row {
                        Row::Unmap4k => (&m4, &u4),
                        Row::Unmap1mContig => (&m1, &u1),
                        _ => (&m2, &u2),
                    };
                    self.call(IOAS_MAP, m);
                    let t = arch::timestamp();
                    self.call(IOAS_UNMAP, u);
                    ticks += arch::timestamp() - t;
                }
                Row::Pair4k | Row::Pair1mContig | Row::Pair2m => {
                    let (m, u) = match row {
                        Row::Pair4k => (&m4, &u4),
                        Row::Pair1mContig => (&m1, &u1),
                        _ => (&m2, &u2),
                    };
                    let t = arch::timestamp();
                    self.call(IOAS_MAP, m);
                    self.call(IOAS_UNMAP, u);
                    ticks += arch::timestamp() - t;
                }
                Row::Pair1mScattered => {
                    let t = arch::timestamp();
                    self.call(IOAS_MAP, &m1s);
                    self.call(IOAS_UNMAP, &u1);
                    ticks += arch::timestamp() - t;
                }
                Row::Pair1mSeparate => {
                    let t = arch::timestamp();
                    self.map_separate();
                    self.call(IOAS_UNMAP, &u1);
                    ticks += arch::timestamp() - t;
                }
            }
        }
        ticks
    }
}

/// xorshift64: a fixed sequence, so a failing run can be replayed exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The `hostile` variant: thousands of hypercalls with random ops (every ABI v1 op and random
/// numbers outside the platform range), random argument bytes and sizes, and argument addresses
/// in its RAM, across its end, in its device's BAR, far outside and near 2^64; then a read of
/// unmapped guest-physical memory, which must stop it. It only reports counts: the hypervisor
/// must survive, and answer every call.
fn hostile(start_info: u64, mem: u64, free: u64) -> ! {
    let mut bar0 = 0;
    let mut count = [0u8; 4];
    arch::read_bytes(start_info + si::OFF_DEVICE_COUNT as u64, &mut count);
    if u32::from_le_bytes(count) > 0 {
        let mut e = [0u8; si::DEVICE_ENTRY];
        arch::read_bytes(start_info + si::OFF_DEVICES as u64, &mut e);
        bar0 = u64_at(&e, 16);
    }
    let scratch = free as *mut u8;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    const CALLS: u32 = 3000;
    let (mut ok, mut errors) = (0u32, 0u32);
    for _ in 0..CALLS {
        // Random argument bytes in the guest's scratch page, with a plausible `size` half the
        // time so calls get past the size check and into the op's own checks.
        for i in 0..256usize {
            // SAFETY: the scratch page is the first free page of this guest's own RAM.
            unsafe { scratch.add(i).write_volatile(rng.next() as u8) };
        }
        let op = match rng.next() % 4 {
            0 => {
                let r = rng.next() as u32;
                if (0xf0..=0xff).contains(&r) {
                    0x7777
                } else {
                    r
                }
            }
            _ => hvabi::op::ALL[(rng.next() % hvabi::op::ALL.len() as u64) as usize],
        };
        let shape = rng.next() % 3;
        match shape {
            // Random bytes with a random small size.
            0 => {
                let size = 8 * (rng.next() % 12) as u32;
                // SAFETY: as above (4-byte aligned: the page is).
                unsafe { (scratch as *mut u32).write_volatile(size) };
            }
            // Plausible: the op's exact size, few flags, small IDs, a page of its own RAM as
            // gpa, one page as length, a small page-aligned IOVA. Gets calls deep into the ops
            // (and some succeed).
            1 => {
                let mut arg = [0u8; 64];
                let size = hvabi::op::arg_size(op).unwrap_or(16) as u32;
                arg[0..4].copy_from_slice(&size.to_le_bytes());
                arg[4..8].copy_from_slice(&((rng.next() % 8) as u32).to_le_bytes());
                arg[8..12].copy_from_slice(&((rng.next() % 6) as u32).to_le_bytes());
                arg[12..16].copy_from_slice(&((rng.next() % 4) as u32).to_le_bytes());
                arg[16..24].copy_from_slice(&(free + 0x1000).to_le_bytes());
                arg[24..32].copy_from_slice(&4096u64.to_le_bytes());
                arg[32..40].copy_from_slice(&((rng.next() % 16) << 12).to_le_bytes());
                for (i, b) in arg.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { scratch.add(i).write_volatile(*b) };
                }
            }
            _ => {}
        }
        let gpa = match if shape == 1 { 8 } else { rng.next() % 8 } {
            8 => free,
            0 => mem - 4 - rng.next() % 64,
            1 => mem + rng.next() % (1 << 30),
            2 if bar0 != 0 => bar0 + rng.next() % 0x1000,
            3 => u64::MAX - rng.next() % 64,
            4 => rng.next(),
            _ => free + rng.next() % 192,
        };
        let r = arch::hypercall(op, gpa, rng.next(), rng.next());
        if r == 0 {
            ok += 1;
        } else if (-4095..0).contains(&r) {
            errors += 1;
        } else {
            println!("testguest: hostile: op {op:#x} returned {r}, neither 0 nor -errno");
        }
    }
    println!(
        "testguest: hostile: {CALLS} calls answered ({ok} succeeded, {errors} errors); now reading unmapped memory"
    );
    let v = arch::wild_read(mem + 0x10_0000);
    println!("testguest: read {v:#x}: the hypervisor let a wild read through");
    exit(1)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    print("testguest: panic\n");
    exit(101)
}

//! Port I/O: the only place in the x86 layer that executes `in`/`out`.
//!
//! Each accessor is scoped to the ports it exists for (a UART's eight registers, the PCI
//! configuration mechanism #1 pair, QEMU's isa-debug-exit port), so safe code elsewhere cannot
//! poke arbitrary ports through it.

use ::x86_64::instructions::port::Port;
use drivers::uart16550::PortIo;
use spin::Mutex;

/// The eight I/O ports of one 16550 UART starting at `base`.
pub struct UartPorts {
    base: u16,
}

impl UartPorts {
    pub const fn new(base: u16) -> Self {
        Self { base }
    }

    fn owns(&self, port: u16) -> bool {
        port.wrapping_sub(self.base) < 8
    }
}

impl PortIo for UartPorts {
    fn read8(&self, port: u16) -> u8 {
        if !self.owns(port) {
            return 0xff;
        }
        // SAFETY: `port` is one of the UART's own registers; reading them has no effect on
        // memory (at most it pops a received byte or clears a status bit of the UART).
        unsafe { Port::<u8>::new(port).read() }
    }

    fn write8(&self, port: u16, value: u8) {
        if !self.owns(port) {
            return;
        }
        // SAFETY: as above; a 16550 cannot do DMA, so no register value can touch memory.
        unsafe { Port::<u8>::new(port).write(value) }
    }
}

/// QEMU's `isa-debug-exit` device (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;

/// Writes `value` to the isa-debug-exit port: QEMU exits with status `(value << 1) | 1`. On a
/// machine without the device the write goes nowhere and this returns.
pub fn qemu_debug_exit(value: u32) {
    // SAFETY: port 0xf4 is the QEMU debug-exit device when the operator asked for it
    // (`exit=qemu`), and unassigned on PC hardware otherwise; a 32-bit write has no memory effect.
    unsafe { Port::<u32>::new(QEMU_DEBUG_EXIT_PORT).write(value) }
}

/// Bochs's shutdown port: writing the bytes of "Shutdown" in order ends the emulator (Bochs
/// `iodev/unmapped.cc`, the BIOS's shutdown request).
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Asks Bochs to end the simulation. On other machines the port is unassigned and this returns.
pub fn bochs_shutdown() {
    for b in *b"Shutdown" {
        // SAFETY: port 0x8900 is Bochs's shutdown port when the operator asked for it
        // (`exit=bochs`) and unassigned on PC hardware otherwise; a byte write has no memory
        // effect.
        unsafe { Port::<u8>::new(BOCHS_SHUTDOWN_PORT).write(b) }
    }
}

/// The 8254 PIT's channel 2 as a delay (ports 0x42/0x43; its gate and output through port 0x61,
/// the AT "system control port B"): the one timer every PC, QEMU and Bochs has at a known rate
/// (1.193182 MHz) without calibration. Channel 2 drives only the speaker, which stays off.
const PIT_HZ: u64 = 1_193_182;
const PIT_CH2: u16 = 0x42;
const PIT_MODE: u16 = 0x43;
const PORT_B: u16 = 0x61;

/// Busy-waits at least `us` microseconds on PIT channel 2 (mode 0, "interrupt on terminal
/// count": OUT2 rises when the count reaches 0). Returns `false` if OUT2 never rose within a
/// bounded number of polls (no PIT); the wait is then shorter than asked, never endless.
pub fn pit_wait_us(us: u64) -> bool {
    static PIT: Mutex<()> = Mutex::new(());
    let _pit = PIT.lock();
    let mut left = us;
    while left > 0 {
        let chunk = left.min(50_000);
        left -= chunk;
        let count = (chunk * PIT_HZ).div_ceil(1_000_000).clamp(1, 0xffff) as u16;
        // SAFETY: ports 0x42/0x43/0x61 are the PIT's channel 2 and the speaker gate on every PC
        // (and unassigned otherwise); channel 2 is used by nothing else in the hypervisor
        // (serialised by `PIT`), and none of these writes touches memory. Port B bits 0 (gate)
        // and 1 (speaker data) are the only ones changed; the speaker stays off.
        let risen = unsafe {
            let mut port_b = Port::<u8>::new(PORT_B);
            let b = port_b.read() & !0x03;
            port_b.write(b); // gate low: stop channel 2, speaker off
            Port::<u8>::new(PIT_MODE).write(0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
            let mut ch2 = Port::<u8>::new(PIT_CH2);
            ch2.write(count as u8);
            ch2.write((count >> 8) as u8);
            port_b.write(b | 0x01); // gate high: count down
            let mut risen = false;
            for _ in 0..50_000_000u32 {
                if port_b.read() & 0x20 != 0 {
                    risen = true;
                    break;
                }
                core::hint::spin_loop();
            }
            port_b.write(b);
            risen
        };
        if !risen {
            return false;
        }
    }
    true
}

/// PCI configuration mechanism #1 (PCI Local Bus Specification 3.0 §3.2.2.3.2): write the
/// address to 0xCF8, then access the dword at 0xCFC. Reaches offsets 0-255 only; the extended
/// space needs ECAM (MCFG). The address/data pair is one critical section.
static PCI_CONFIG: Mutex<()> = Mutex::new(());
const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
const PCI_CONFIG_DATA: u16 = 0xcfc;

fn pci_address(bus: u8, dev: u8, func: u8, offset: u16) -> Option<u32> {
    if dev >= 32 || func >= 8 || offset >= 256 || !offset.is_multiple_of(4) {
        return None;
    }
    Some(
        0x8000_0000
            | u32::from(bus) << 16
            | u32::from(dev) << 11
            | u32::from(func) << 8
            | u32::from(offset),
    )
}

/// Reads the dword at `offset` of function `bus:dev.func`. Absent functions, and out-of-range
/// arguments, read as all ones, as the bus itself does for a master abort.
#[allow(dead_code, reason = "arch interface for PCI enumeration")]
pub fn pci_config_read32(bus: u8, dev: u8, func: u8, offset: u16) -> u32 {
    let Some(address) = pci_address(bus, dev, func, offset) else {
        return u32::MAX;
    };
    let _guard = PCI_CONFIG.lock();
    // SAFETY: 0xCF8/0xCFC are the host bridge's configuration ports on every PC chipset; a
    // configuration read has no side effects on memory. The lock keeps the pair atomic.
    unsafe {
        Port::<u32>::new(PCI_CONFIG_ADDRESS).write(address);
        Port::<u32>::new(PCI_CONFIG_DATA).read()
    }
}

/// Writes the dword at `offset` of function `bus:dev.func`; out-of-range arguments are ignored.
///
/// # Safety
///
/// Configuration writes can move BARs or enable bus mastering, i.e. let a device read or write
/// arbitrary memory. The caller must know what the register does and that the result keeps
/// memory safe (e.g. BARs moved only into unused MMIO space, DMA only behind the IOMMU).
#[allow(dead_code, reason = "arch interface for PCI enumeration")]
pub unsafe fn pci_config_write32(bus: u8, dev: u8, func: u8, offset: u16, value: u32) {
    let Some(address) = pci_address(bus, dev, func, offset) else {
        return;
    };
    let _guard = PCI_CONFIG.lock();
    // SAFETY: the ports are the configuration mechanism (see the read); the effect of the write
    // itself is the caller's obligation, stated in this function's contract.
    unsafe {
        Port::<u32>::new(PCI_CONFIG_ADDRESS).write(address);
        Port::<u32>::new(PCI_CONFIG_DATA).write(value);
    }
}

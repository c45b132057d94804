//! Host interrupts (docs/interrupts.md): the table of device vectors and what each one's
//! handler does, the I/O APICs masked at boot, and the VT-d units' fault events and interrupt
//! remapping ([`vtd`]).
//!
//! The vectors' IDT stubs, EOI and the interrupt window are the architecture's
//! (`arch::x86_64::irq`); here is only safe code. A handler runs with interrupts closed and
//! does the minimum: count, mark, mask. Everything else happens in normal context.

pub mod vtd;

use core::num::NonZeroU32;
use core::sync::atomic::{AtomicU64, Ordering};

use boot::BootInfo;
use drivers::vectors::VectorTable;
use iommu::hw::Mmio;

use crate::mem::phys::MmioRegion;
use crate::println;

/// Which handler owns each device vector, and how often each fired.
pub static VECTORS: VectorTable = VectorTable::new();

/// What a vector's handler does, encoded as the table's token: kind in bits 31:16, argument
/// in bits 15:0 (never all zero: every kind is non-zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    /// The fault event of VT-d unit `n` (the owner's unit index).
    VtdFault(u16),
    /// Count only: the vector's counter is the record (the MSI scenarios' vectors).
    Count(u16),
    /// A guest's MSI route (`guest::msi`): posts the guest's virtual vector.
    GuestMsi(u16),
}

impl Handler {
    pub fn token(self) -> NonZeroU32 {
        let (kind, arg) = match self {
            Handler::VtdFault(n) => (1u32, n),
            Handler::Count(n) => (2, n),
            Handler::GuestMsi(n) => (3, n),
        };
        NonZeroU32::new(kind << 16 | u32::from(arg)).unwrap_or(NonZeroU32::MIN)
    }

    fn from_token(t: NonZeroU32) -> Option<Self> {
        let arg = t.get() as u16;
        match t.get() >> 16 {
            1 => Some(Handler::VtdFault(arg)),
            2 => Some(Handler::Count(arg)),
            3 => Some(Handler::GuestMsi(arg)),
            _ => None,
        }
    }
}

/// Interrupts whose vector had a token no handler kind knows (cannot happen unless the table
/// is corrupt; counted, not acted on).
static UNKNOWN: AtomicU64 = AtomicU64::new(0);

/// Device interrupts taken (every vector of the device range, claimed or not).
static TAKEN: AtomicU64 = AtomicU64::new(0);

/// Device interrupts taken so far: the guest scheduler tells a device interrupt's exit from
/// the end of a time slice with it.
pub fn taken() -> u64 {
    TAKEN.load(Ordering::Relaxed)
}

/// The interrupt path, from the architecture's stub (interrupts closed; EOI follows).
pub fn dispatch(vector: u8) {
    TAKEN.fetch_add(1, Ordering::Relaxed);
    // The handler runs inside the table's dispatch, so an `unregister` that returned has
    // waited for it.
    VECTORS.dispatch(vector, |token| match Handler::from_token(token) {
        Some(Handler::VtdFault(unit)) => vtd::on_fault_event(usize::from(unit)),
        Some(Handler::GuestMsi(route)) => crate::guest::msi::on_interrupt(route),
        Some(Handler::Count(_)) => {}
        None => {
            UNKNOWN.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// Brings up host interrupts, after the IOMMU owner: the boot CPU's local APIC (x2APIC, else
/// xAPIC; the timer is programmed but not armed), every I/O APIC pin masked, then each VT-d
/// unit's interrupt remapping and fault event (see [`vtd`]).
pub fn init(info: &BootInfo) {
    match crate::arch::apic::init_timer() {
        Ok(()) => println!(
            "irq: local APIC in {} mode, APIC ID {}, device vectors {:#x}-{:#x}",
            if crate::arch::apic::is_x2apic() {
                "x2APIC"
            } else {
                "xAPIC"
            },
            crate::arch::apic::id().unwrap_or(0),
            drivers::vectors::FIRST,
            drivers::vectors::LAST
        ),
        Err(e) => println!("irq: no local APIC ({e}): fault events will be polled"),
    }
    mask_io_apics(info);
    vtd::init(info);
}

/// I/O APIC registers (82093AA datasheet §3.1): IOREGSEL at +0x00 selects, IOWIN at +0x10
/// reads/writes; register 0x01 is the version register (bits 23:16 = number of redirection
/// entries - 1), entry n is registers 0x10 + 2n (low dword, bit 16 = mask) and 0x11 + 2n.
const IOREGSEL: usize = 0x00;
const IOWIN: usize = 0x10;
const IOAPIC_VERSION: u32 = 0x01;
const REDIR_MASK: u32 = 1 << 16;

fn mask_io_apics(info: &BootInfo) {
    let madt = info
        .rsdp
        .ok_or("no ACPI RSDP")
        .and_then(|rsdp| {
            crate::firmware::acpi::discover(rsdp).map_err(|_| "ACPI tables unreadable")
        })
        .and_then(|acpi| acpi.madt.ok_or("no MADT"));
    let madt = match madt {
        Ok(m) => m,
        Err(e) => {
            println!("ioapic: none masked ({e})");
            return;
        }
    };
    let (apics, dropped) = match boot::x86_64::madt_ioapic::io_apics::<8>(madt.bytes) {
        Ok(a) => a,
        Err(e) => {
            println!("ioapic: none masked (MADT refused: {e})");
            return;
        }
    };
    let (mut total, mut units) = (0u32, 0u32);
    for a in apics.iter().flatten() {
        let regs = match MmioRegion::new(u64::from(a.address), 0x20) {
            Ok(r) => r,
            Err(e) => {
                log::warn!(
                    "ioapic {}: registers at {:#x} refused: {e}",
                    a.id,
                    a.address
                );
                continue;
            }
        };
        let read = |reg: u32| {
            regs.write32(IOREGSEL, reg);
            regs.read32(IOWIN)
        };
        let pins = ((read(IOAPIC_VERSION) >> 16) & 0xff) + 1;
        let mut masked = 0;
        for pin in 0..pins {
            let low = 0x10 + 2 * pin;
            let v = read(low);
            regs.write32(IOREGSEL, low);
            regs.write32(IOWIN, v | REDIR_MASK);
            if read(low) & REDIR_MASK != 0 {
                masked += 1;
            }
        }
        println!(
            "ioapic {} at {:#x} (GSI base {}): {masked} of {pins} pins masked",
            a.id, a.address, a.gsi_base
        );
        total += masked;
        units += 1;
    }
    if dropped > 0 {
        log::warn!("ioapic: {dropped} more I/O APICs not masked (table of 8)");
    }
    println!("ioapic: {total} pins masked on {units} I/O APIC(s)");
}

/// The end-of-run report: fault events per unit and interrupts no handler claimed.
pub fn report() {
    vtd::report();
    crate::guest::msi::report();
    let c = crate::vcpu::svm::interrupt_counts();
    println!(
        "report: svm guest interrupts: {} injected by EVENTINJ, {} taken through V_IRQ, {} VINTR exit(s), {} re-injected (delivery cut short by an exit)",
        c.injected, c.taken, c.vintr_exits, c.reinjected
    );
    println!(
        "report: irq: {} interrupt(s) on vectors without a handler, {} unknown",
        VECTORS.unclaimed(),
        UNKNOWN.load(Ordering::Relaxed)
    );
}

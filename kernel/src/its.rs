//! The GICv3 ITS on aarch64 hosts (IHI 0069 ch. 5-6): LPIs for device MSIs, and the MSI
//! doorbell window in the devices' SMMU translation.
//!
//! Bring-up ([`init`], once, on the boot CPU after the distributor): the ITS from the device
//! tree (`arm,gic-v3-its` / `msi-controller`) or the MADT GIC ITS entry; GITS_BASER<n> for the
//! device and collection tables (flat, 4 KiB pages, the page size and the read-only Type and
//! Entry_Size read back), the command queue (GITS_CBASER, one 4 KiB page = 128 commands), the
//! boot CPU's LPI configuration and pending tables (GICR_PROPBASER/PENDBASER, then
//! GICR_CTLR.EnableLPIs), collection 0 mapped to the boot CPU (MAPC + SYNC). Commands go through
//! [`Its::submit`]: written at CWRITER, waited for at CREADR with a bounded poll, a stalled
//! queue (GITS_CREADR.Stalled) reported as an error.
//!
//! LPIs ([`Its::map_event`]): an INTID from 8192 up, enabled with priority
//! `irq::DEVICE_PRIORITY` in the configuration table, its handler in `irq::HANDLERS` (the same
//! table the SPIs use), mapped with MAPD/MAPTI/INV/SYNC.
//!
//! The doorbell: a device's MSI is a write to GITS_TRANSLATER that goes through the device's
//! SMMU translation like any DMA (the pcie node's `msi-map` gives the ITS and the DeviceID,
//! which is the RID on QEMU virt). The hypervisor's own devices get GITS_TRANSLATER's 4 KiB page
//! mapped at [`MSI_IOVA_BASE`]; for devices assigned to guests the ABI reserves
//! [`MSI_IOVA_BASE`]..+[`MSI_IOVA_SIZE`] (DEVICE_RESERVED_RANGES reports it as `RESV_MSI`), so
//! no guest mapping can ever occupy the window its MSIs will use.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use boot::BootInfo;
use drivers::gicv3::its::cmd::{self, COMMAND_BYTES, Command, Target};
use drivers::gicv3::its::regs::{
    Baser, ItsTyper, TableType, cbaser, gicr_lpi, gits, lpi_config, pendbaser, propbaser,
};
use iommu::hw::Mmio;
use spin::Mutex;

use crate::arch::irq::{DEVICE_PRIORITY, HANDLERS};
use crate::mem::phys::{Frames, MmioRegion};

/// The IOVA window reserved for MSIs in every device's SMMU translation: 1 MiB at 256 MiB, just
/// above the 28-bit IOVA space a default edu can DMA to (and the ABI self-test's window), so it
/// takes nothing from such devices; an MSI address is not limited by a DMA mask.
pub const MSI_IOVA_BASE: u64 = 0x1000_0000;
pub const MSI_IOVA_SIZE: u64 = 0x10_0000;

/// ITS register frames: ITS_base (control) and the translation frame, 64 KiB each.
const ITS_SIZE: u64 = 0x2_0000;
/// LPI INTIDs below 2^14 (8192 LPIs): the configuration table is 8 KiB.
const LPI_ID_BITS: u32 = 14;
const FIRST_LPI: u32 = 8192;
/// EventID bits per device ITT.
const EVENT_BITS: u32 = 5;
/// DeviceIDs the flat device table covers (bus 0-31 of segment 0 with RID = DeviceID).
const DEVICE_TABLE_PAGES: u32 = 16;
const POLL_LIMIT: u32 = 10_000_000;

pub struct Its {
    pub base: u64,
    regs: MmioRegion,
    typer: ItsTyper,
    queue: Frames,
    /// Offset of the next command in the queue.
    write: u64,
    target: Target,
    /// Per mapped device: (DeviceID, its ITT).
    devices: Vec<(u32, Frames)>,
    lpi_config: Frames,
    _tables: Vec<Frames>,
    _pending: Frames,
    /// By CPU index: whether collection `cpu` is mapped to that CPU's redistributor (MAPC).
    /// Collection 0 is the boot CPU's, mapped at bring-up; the others are mapped the first
    /// time an LPI is routed to a CPU ([`Its::collection_for_this_cpu`]).
    collections: [bool; crate::arch::smp::MAX_CPUS],
    /// The other CPUs' LPI pending tables (one per redistributor, IHI 0069 §5.1.2): in use,
    /// and not yet used (allocated at bring-up for every other online CPU).
    other_pending: Vec<Frames>,
    pending_pool: Vec<Frames>,
}

static ITS: Mutex<Option<Its>> = Mutex::new(None);
/// What [`init`] was given: where [`device_id`] looks for `msi-map` and the IORT.
static BOOT_INFO: spin::Once<&'static BootInfo> = spin::Once::new();
static NEXT_LPI: AtomicU32 = AtomicU32::new(FIRST_LPI);

/// The ITS, once [`init`] has brought it up.
pub fn lock() -> spin::MutexGuard<'static, Option<Its>> {
    ITS.lock()
}

fn zeroed(pages: u64, align: u64) -> Result<Frames, String> {
    let mut f = Frames::alloc(pages, align, u64::MAX).ok_or("ITS: out of frames")?;
    f.bytes_mut().fill(0);
    Ok(f)
}

/// The ITS base from the device tree, else the MADT.
fn find(info: &BootInfo) -> Option<u64> {
    if let Some(fdt) = crate::firmware::devicetree::fdt(info) {
        let node = fdt.find_compatible(&["arm,gic-v3-its"])?;
        return node
            .reg()
            .and_then(|mut r| r.next())
            .map(|r| r.starting_address as u64);
    }
    let rsdp = info.rsdp?;
    let acpi = crate::firmware::acpi::discover(rsdp).ok()?;
    let madt = iommu::firmware::madt::Madt::parse(acpi.madt?.bytes).ok()?;
    madt.its.first().copied()
}

/// Brings the ITS up (see the module comment); prints its report line. An error leaves LPIs
/// off; nothing else depends on them.
pub fn init(info: &'static BootInfo) -> Result<(), String> {
    BOOT_INFO.call_once(|| info);
    let mut slot = ITS.lock();
    if slot.is_some() {
        return Ok(());
    }
    let base = find(info).ok_or("no GICv3 ITS described")?;
    let regs = MmioRegion::new(base, ITS_SIZE).map_err(|e| alloc::format!("ITS: {e}"))?;
    let (gicd, gicd_typer, _) =
        crate::arch::preempt::distributor().ok_or("GIC distributor not up")?;
    let _ = gicd;
    // GICD_TYPER.LPIS (bit 17) and IDbits (bits 23:19, INTID bits - 1) (IHI 0069 §12.9).
    if gicd_typer & (1 << 17) == 0 || ((gicd_typer >> 19) & 0x1f) + 1 < LPI_ID_BITS {
        return Err("the distributor has no LPIs (GICD_TYPER.LPIS/IDbits)".into());
    }
    let (gicr, rd) =
        crate::arch::preempt::this_redistributor().ok_or("boot CPU redistributor not up")?;
    let gicr_typer = gicr.read64(rd + drivers::gicv3::gicr::TYPER);
    if gicr_typer & gicr_lpi::TYPER_PLPIS == 0 {
        return Err("the redistributor has no physical LPIs (GICR_TYPER.PLPIS)".into());
    }
    let typer = ItsTyper(regs.read64(gits::TYPER));
    if !typer.physical() {
        return Err("the ITS does not translate physical LPIs (GITS_TYPER.Physical)".into());
    }
    // The ITS must be disabled and quiescent before its tables change (§12.19).
    let ctlr = regs.read32(gits::CTLR);
    regs.write32(gits::CTLR, ctlr & !gits::CTLR_ENABLED);
    if !(0..POLL_LIMIT).any(|_| regs.read32(gits::CTLR) & gits::CTLR_QUIESCENT != 0) {
        return Err("GITS_CTLR.Quiescent did not set".into());
    }
    let mut tables = Vec::new();
    for n in 0..8 {
        let off = gits::BASER + 8 * n;
        let baser = Baser(regs.read64(off));
        let pages = match baser.table_type() {
            TableType::Devices => DEVICE_TABLE_PAGES,
            TableType::Collections => 1,
            _ => continue,
        };
        let mem = zeroed(u64::from(pages), 0x1000)?;
        let value = baser
            .flat(mem.pa(), 0x1000, pages)
            .ok_or("ITS table outside GITS_BASER's address range")?;
        regs.write64(off, value);
        let back = Baser(regs.read64(off));
        // Page_Size may be fixed (§12.19: writes of an unsupported size read back another):
        // this driver only builds 4 KiB pages.
        if back.page_size() != 0x1000 || back.0 & Baser::VALID == 0 {
            return Err(alloc::format!(
                "GITS_BASER{n} read back {:#x}: 4 KiB flat tables unsupported",
                back.0
            ));
        }
        tables.push(mem);
    }
    let queue = zeroed(1, 0x1000)?;
    regs.write64(
        gits::CBASER,
        cbaser(queue.pa(), 1).ok_or("ITS queue address")?,
    );
    regs.write64(gits::CWRITER, 0);
    // LPI tables of the boot CPU's redistributor: EnableLPIs must be 0 while they are set
    // (§12.11: PROPBASER/PENDBASER are UNPREDICTABLE to change with LPIs enabled).
    let ctlr_off = rd + drivers::gicv3::gicr::CTLR;
    if gicr.read32(ctlr_off) & gicr_lpi::CTLR_ENABLE_LPIS != 0 {
        return Err("LPIs already enabled on the boot CPU (firmware left them on)".into());
    }
    let lpi_config = zeroed(
        (((1u64 << LPI_ID_BITS) - u64::from(FIRST_LPI)) / 4096).max(1),
        0x1000,
    )?;
    let pending = zeroed(((1u64 << LPI_ID_BITS) / 8).div_ceil(4096), 0x1_0000)?;
    gicr.write64(
        rd + gicr_lpi::PROPBASER,
        propbaser(lpi_config.pa(), LPI_ID_BITS),
    );
    gicr.write64(rd + gicr_lpi::PENDBASER, pendbaser(pending.pa()));
    gicr.write32(ctlr_off, gicr_lpi::CTLR_ENABLE_LPIS);
    regs.write32(gits::CTLR, gits::CTLR_ENABLED);
    let target = if typer.pta() {
        Target::Address(gicr.phys + rd as u64)
    } else {
        // GICR_TYPER.Processor_Number, bits 23:8.
        Target::ProcessorNumber(((gicr_typer >> 8) & 0xffff) as u32)
    };
    let mut its = Its {
        base,
        regs,
        typer,
        queue,
        write: 0,
        target,
        devices: Vec::new(),
        lpi_config,
        _tables: tables,
        _pending: pending,
        collections: [false; crate::arch::smp::MAX_CPUS],
        other_pending: Vec::new(),
        pending_pool: Vec::new(),
    };
    for _ in 1..crate::arch::smp::online() {
        its.pending_pool.push(zeroed(
            ((1u64 << LPI_ID_BITS) / 8).div_ceil(4096),
            0x1_0000,
        )?);
    }
    its.collections[crate::arch::smp::cpu_index()] = true;
    let mapc = cmd::mapc(0, target).map_err(|e| alloc::format!("MAPC: {e:?}"))?;
    its.submit(&[mapc])?;
    its.sync()?;
    crate::println!(
        "report: gicv3 its base={base:#x} devbits={} eventbits={} itt-entry={} pta={} lpis={}..{} collection0={target:?}",
        typer.device_id_bits(),
        typer.event_id_bits(),
        typer.itt_entry_size(),
        u8::from(typer.pta()),
        FIRST_LPI,
        (1u32 << LPI_ID_BITS) - 1,
    );
    let translater = its.translater();
    *slot = Some(its);
    drop(slot);
    // Every SMMU domain the object model creates from now on (guests' HWPTs) maps the doorbell
    // at its reserved IOVA, so an assigned device can raise the MSIs its guest routes.
    if let Some(o) = crate::iommu_owner::lock().as_mut() {
        o.fd.hw_mut().set_msi_doorbell(MSI_IOVA_BASE, translater);
    }
    Ok(())
}

impl Its {
    /// GITS_TRANSLATER's physical address: the doorbell devices write EventIDs to.
    pub fn translater(&self) -> u64 {
        self.base + gits::TRANSLATER as u64
    }

    /// Writes `cmds` to the queue and waits (bounded) until the ITS has consumed them.
    pub fn submit(&mut self, cmds: &[Command]) -> Result<(), String> {
        let queue_len = self.queue.len();
        // The queue is empty between calls (each waits for CREADR); one slot stays free so that
        // CWRITER == CREADR always means empty (IHI 0069, the ITS command queue).
        if cmds.len() as u64 >= queue_len / COMMAND_BYTES as u64 {
            return Err(alloc::format!(
                "{} ITS commands do not fit the queue",
                cmds.len()
            ));
        }
        for c in cmds {
            let words = self.queue.words();
            let first = (self.write / 8) as usize;
            for (i, dw) in c.0.iter().enumerate() {
                words[first + i].store(*dw, Ordering::Relaxed);
            }
            self.write = (self.write + COMMAND_BYTES as u64) % queue_len;
        }
        // The ITS reads the commands from memory after it sees CWRITER: order the stores
        // before the MMIO write (the direct map is Normal write-back, inner shareable, and the
        // ITS's walks are inner-shareable write-back per CBASER, so no cache maintenance).
        core::sync::atomic::fence(Ordering::SeqCst);
        self.regs.write64(gits::CWRITER, self.write);
        for _ in 0..POLL_LIMIT {
            let creadr = self.regs.read64(gits::CREADR);
            if creadr & gits::CREADR_STALLED != 0 {
                return Err(alloc::format!(
                    "ITS command queue stalled at {:#x}",
                    creadr & gits::QUEUE_OFFSET_MASK
                ));
            }
            if creadr & gits::QUEUE_OFFSET_MASK == self.write {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err("ITS command queue did not drain".into())
    }

    fn sync(&mut self) -> Result<(), String> {
        let c = cmd::sync(self.target).map_err(|e| alloc::format!("SYNC: {e:?}"))?;
        self.submit(&[c])
    }

    /// Maps (DeviceID `device`, EventID `event`) to a fresh LPI whose handler is `handler`;
    /// returns the LPI. The device gets its ITT (MAPD) the first time. The LPI goes to
    /// collection 0 (the boot CPU).
    pub fn map_event(
        &mut self,
        device: u32,
        event: u32,
        handler: drivers::gicv3::handlers::HandlerFn,
        context: usize,
    ) -> Result<u32, String> {
        self.map_event_to(device, event, 0, handler, context)
    }

    /// The calling CPU's collection (its CPU index), mapped on first use: the CPU's
    /// redistributor gets the shared LPI configuration table and its own pending table
    /// (GICR_PROPBASER/PENDBASER while EnableLPIs is 0, then EnableLPIs), then MAPC + SYNC
    /// (IHI 0069 §5.3.9). An LPI routed to the collection is taken by this CPU.
    pub fn collection_for_this_cpu(&mut self) -> Result<u16, String> {
        let cpu = crate::arch::smp::cpu_index();
        if self.collections.get(cpu).copied().unwrap_or(false) {
            return Ok(cpu as u16);
        }
        let (gicr, rd) = crate::arch::preempt::this_redistributor()
            .ok_or("this CPU's redistributor is not up")?;
        let gicr_typer = gicr.read64(rd + drivers::gicv3::gicr::TYPER);
        if gicr_typer & gicr_lpi::TYPER_PLPIS == 0 {
            return Err(alloc::format!(
                "CPU {cpu}: no physical LPIs (GICR_TYPER.PLPIS)"
            ));
        }
        let ctlr_off = rd + drivers::gicv3::gicr::CTLR;
        if gicr.read32(ctlr_off) & gicr_lpi::CTLR_ENABLE_LPIS == 0 {
            // Every redistributor shares one configuration table (§5.1.1: GICR_PROPBASER
            // should be the same everywhere); the pending table is per redistributor.
            // From the pool made at bring-up (one per other online CPU): taken here, kept for
            // good, so routing at run time allocates nothing.
            let pending = self
                .pending_pool
                .pop()
                .ok_or_else(|| alloc::format!("CPU {cpu}: no LPI pending table left"))?;
            gicr.write64(
                rd + gicr_lpi::PROPBASER,
                propbaser(self.lpi_config.pa(), LPI_ID_BITS),
            );
            gicr.write64(rd + gicr_lpi::PENDBASER, pendbaser(pending.pa()));
            gicr.write32(ctlr_off, gicr_lpi::CTLR_ENABLE_LPIS);
            self.other_pending.push(pending);
        }
        let target = if self.typer.pta() {
            Target::Address(gicr.phys + rd as u64)
        } else {
            Target::ProcessorNumber(((gicr_typer >> 8) & 0xffff) as u32)
        };
        let icid = cpu as u16;
        let mapc = cmd::mapc(icid, target).map_err(|e| alloc::format!("MAPC: {e:?}"))?;
        self.submit(&[mapc])?;
        let sync = cmd::sync(target).map_err(|e| alloc::format!("SYNC: {e:?}"))?;
        self.submit(&[sync])?;
        self.collections[cpu] = true;
        crate::println!("its: collection {icid} mapped to CPU {cpu} ({target:?})");
        Ok(icid)
    }

    /// As [`Its::map_event`], to collection `icid` (the CPU that takes the LPI).
    pub fn map_event_to(
        &mut self,
        device: u32,
        event: u32,
        icid: u16,
        handler: drivers::gicv3::handlers::HandlerFn,
        context: usize,
    ) -> Result<u32, String> {
        if device >= 1 << self.typer.device_id_bits().min(31)
            || u64::from(device) >= u64::from(DEVICE_TABLE_PAGES) * 4096 / 8
        {
            return Err(alloc::format!(
                "DeviceID {device:#x} beyond the device table"
            ));
        }
        if event >= 1 << EVENT_BITS {
            return Err(alloc::format!(
                "EventID {event} beyond the {EVENT_BITS}-bit ITT"
            ));
        }
        let lpi = NEXT_LPI.fetch_add(1, Ordering::Relaxed);
        if lpi >= 1 << LPI_ID_BITS {
            return Err("out of LPIs".into());
        }
        HANDLERS
            .register(lpi, handler, context)
            .map_err(|e| alloc::format!("LPI {lpi}: {e:?}"))?;
        let index = (lpi - FIRST_LPI) as usize;
        self.lpi_config
            .write_volatile(index, lpi_config(DEVICE_PRIORITY, true));
        let mut cmds = Vec::new();
        self.ensure_device(device, &mut cmds)?;
        cmds.push(
            cmd::mapti(device, event, lpi, icid).map_err(|e| alloc::format!("MAPTI: {e:?}"))?,
        );
        cmds.push(cmd::inv(device, event));
        core::sync::atomic::fence(Ordering::SeqCst);
        self.submit(&cmds)?;
        self.sync()?;
        Ok(lpi)
    }

    /// Maps (DeviceID, EventID) again to an LPI it had before (after [`Its::discard`]), in
    /// collection `icid`: MAPTI, INV, SYNC. The LPI keeps its handler.
    pub fn remap_event(
        &mut self,
        device: u32,
        event: u32,
        lpi: u32,
        icid: u16,
    ) -> Result<(), String> {
        let mut cmds = Vec::new();
        self.ensure_device(device, &mut cmds)?;
        cmds.push(
            cmd::mapti(device, event, lpi, icid).map_err(|e| alloc::format!("MAPTI: {e:?}"))?,
        );
        cmds.push(cmd::inv(device, event));
        self.submit(&cmds)?;
        self.sync()
    }

    /// Gives `device` its ITT (a MAPD into `cmds`) unless it has one.
    fn ensure_device(&mut self, device: u32, cmds: &mut Vec<Command>) -> Result<(), String> {
        if !self.devices.iter().any(|(d, _)| *d == device) {
            let itt_bytes = (1u64 << EVENT_BITS) * u64::from(self.typer.itt_entry_size());
            let itt = zeroed(itt_bytes.div_ceil(4096), 0x1000)?;
            cmds.push(
                cmd::mapd(device, itt.pa(), EVENT_BITS)
                    .map_err(|e| alloc::format!("MAPD: {e:?}"))?,
            );
            self.devices.push((device, itt));
        }
        Ok(())
    }

    /// Unmaps `device` (MAPD with V = 0, then SYNC: every event of it is dropped from then on)
    /// and frees its ITT once the ITS no longer uses it.
    pub fn unmap_device(&mut self, device: u32) -> Result<(), String> {
        let Some(i) = self.devices.iter().position(|(d, _)| *d == device) else {
            return Ok(());
        };
        self.submit(&[cmd::unmapd(device)])?;
        self.sync()?;
        // Dropping a `Frames` would leak it: give the ITT back.
        let (_, itt) = self.devices.swap_remove(i);
        itt.free();
        Ok(())
    }

    /// Removes (DeviceID, EventID)'s mapping (DISCARD): its writes are then dropped.
    pub fn discard(&mut self, device: u32, event: u32) -> Result<(), String> {
        self.submit(&[cmd::discard(device, event)])?;
        self.sync()
    }

    /// Makes the ITS translate (DeviceID, EventID) as if the device had written it (INT).
    pub fn trigger(&mut self, device: u32, event: u32) -> Result<(), String> {
        self.submit(&[cmd::int(device, event)])?;
        self.sync()
    }
}

/// A device's ITS DeviceID from its requester ID: the device tree's `msi-map` on its host
/// bridge, the IORT's root complex mapping to an ITS group, or both (then they must agree).
/// Needs [`init`] (the boot information it keeps).
pub fn device_id(segment: u16, rid: u32) -> Result<(u32, &'static str), String> {
    let info = BOOT_INFO.get().ok_or("no ITS")?;
    let iort = info
        .rsdp
        .and_then(|r| crate::firmware::acpi::discover(r).ok())
        .and_then(|a| a.iort);
    device_id_in(info, iort.map(|t| t.bytes), segment, rid)
}

/// [`device_id`] from `info`'s device tree and the IORT `iort` (its bytes, when the firmware
/// has one), for a caller that has found the IORT already. Returns the DeviceID and which
/// table(s) gave it.
pub fn device_id_in(
    info: &BootInfo,
    iort: Option<&[u8]>,
    segment: u16,
    rid: u32,
) -> Result<(u32, &'static str), String> {
    let dt = crate::firmware::devicetree::fdt(info).and_then(|fdt| {
        iommu::firmware::devicetree::pci_host_bridge(&fdt, u32::from(segment))
            .ok()?
            .msi_map
            .as_ref()?
            .resolve(rid)
            .map(|(_its_phandle, id)| id)
    });
    let iort = iort
        .and_then(|t| iommu::firmware::iort::Iort::parse(t).ok())
        .and_then(|i| i.resolve_msi(segment, rid).ok())
        .map(|r| r.device_id);
    match (dt, iort) {
        (Some(a), Some(b)) if a != b => Err(alloc::format!(
            "msi-map gives DeviceID {a:#x}, the IORT {b:#x} for RID {rid:#x}"
        )),
        (Some(a), Some(_)) => Ok((a, "msi-map and IORT agree")),
        (Some(a), None) => Ok((a, "msi-map")),
        (None, Some(b)) => Ok((b, "IORT")),
        (None, None) => Err(alloc::format!(
            "neither an msi-map nor an IORT ITS mapping covers RID {rid:#x}"
        )),
    }
}

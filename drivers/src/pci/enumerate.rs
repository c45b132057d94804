//! Depth-first enumeration of a PCI segment, with bus-number assignment where firmware left
//! bridges unconfigured.

use super::bar::{self, Bar, BarError};
use super::caps::{self, CapError, Capabilities};
use super::config::{Bdf, ConfigSpace, reg};

/// Capacity of [`PciDevices`]; functions beyond it are counted in
/// [`PciDevices::dropped_functions`].
pub const MAX_FUNCTIONS: usize = 256;
/// Capacity of the error log of [`PciDevices`].
pub const MAX_ERRORS: usize = 32;

/// What to do with bus numbers firmware already programmed into bridges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BusPolicy {
    /// Follow bridges whose secondary bus firmware set (if it is consistent); number only the
    /// unconfigured ones (secondary bus 0). This is the right choice with SeaBIOS/OVMF, and
    /// with qboot or no firmware at all (where every bridge is unconfigured).
    #[default]
    KeepFirmware,
    /// Renumber every bridge depth-first, ignoring what firmware did.
    Reassign,
}

/// Parameters of [`enumerate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnumConfig {
    /// Segment (PCI domain) number, recorded for [`PciDevices::bridge_buses`].
    pub segment: u16,
    /// The root bus (ECAM/MCFG start bus).
    pub root_bus: u8,
    /// The highest bus number that may be used (ECAM/MCFG end bus).
    pub max_bus: u8,
    pub bus_policy: BusPolicy,
}

impl EnumConfig {
    /// Segment 0, buses 0..=255, [`BusPolicy::KeepFirmware`].
    pub const fn new() -> Self {
        Self {
            segment: 0,
            root_bus: 0,
            max_bus: 0xff,
            bus_policy: BusPolicy::KeepFirmware,
        }
    }
}

impl Default for EnumConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Bus numbers and state of a PCI-to-PCI bridge (type-1 header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeInfo {
    pub primary: u8,
    pub secondary: u8,
    pub subordinate: u8,
    /// Enumeration programmed the bus numbers (firmware had left them at 0, or
    /// [`BusPolicy::Reassign`]).
    pub buses_assigned: bool,
    /// The secondary bus was scanned. `false` means the bridge's bus numbers were unusable (an
    /// error was logged) and nothing behind it is known.
    pub scanned: bool,
    /// Forwarding windows, filled in by [`assign_resources`](super::assign_resources)
    /// (`None`: disabled or not yet known).
    pub io_window: Option<(u64, u64)>,
    pub mem_window: Option<(u64, u64)>,
    pub pref_window: Option<(u64, u64)>,
    pub(crate) plan: super::assign::BridgePlan,
}

/// One PCI function found by [`enumerate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    pub bdf: Bdf,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    /// Header layout (bits 6:0 of HEADER_TYPE): 0 endpoint, 1 PCI-to-PCI bridge, 2 CardBus.
    pub header_type: u8,
    /// Bit 7 of HEADER_TYPE of this function.
    pub multifunction: bool,
    /// For header type 1.
    pub bridge: Option<BridgeInfo>,
    pub caps: Capabilities,
    /// Indexed by BAR number; the slot after a 64-bit BAR is `None`.
    pub bars: [Option<Bar>; 6],
}

impl PciFunction {
    const EMPTY: Self = Self {
        bdf: Bdf {
            bus: 0,
            device: 0,
            function: 0,
        },
        vendor_id: 0xffff,
        device_id: 0xffff,
        class: 0,
        subclass: 0,
        prog_if: 0,
        revision: 0,
        header_type: 0,
        multifunction: false,
        bridge: None,
        caps: Capabilities::NONE,
        bars: [None; 6],
    };

    pub const fn is_bridge(&self) -> bool {
        self.bridge.is_some()
    }

    /// Implemented BARs in index order.
    pub fn bars(&self) -> impl Iterator<Item = &Bar> {
        self.bars.iter().flatten()
    }

    /// `(secondary, subordinate)` for a bridge whose hierarchy was scanned.
    pub fn bridge_buses(&self) -> Option<(u8, u8)> {
        match self.bridge {
            Some(b) if b.scanned => Some((b.secondary, b.subordinate)),
            _ => None,
        }
    }
}

/// Something wrong with the configuration space of one function. Enumeration logs it and goes
/// on with the rest of the hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciError {
    pub bdf: Bdf,
    pub kind: PciErrorKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciErrorKind {
    /// Firmware's secondary bus is not above the bridge's own bus, the subordinate bus is below
    /// the secondary, or the range leaves the range allowed below the parent: following it
    /// could loop. The bridge is skipped.
    BadBridgeBuses {
        secondary: u8,
        subordinate: u8,
    },
    /// The secondary bus was already scanned through another bridge. Skipped.
    BusRevisited {
        bus: u8,
    },
    /// No bus number left for an unconfigured bridge (below its parent's subordinate bus, or
    /// the configured `max_bus`). Skipped.
    BusNumbersExhausted,
    /// The bus-number register did not keep what was written (it read back
    /// `primary/secondary/subordinate` = `read`). Skipped.
    BridgeNotProgrammable {
        wrote: [u8; 3],
        read: [u8; 3],
    },
    /// Header layout other than 0, 1 or 2. Recorded without BARs or capabilities.
    UnknownHeaderType(u8),
    Capability(CapError),
    Bar(BarError),
}

/// The result of [`enumerate`]: up to [`MAX_FUNCTIONS`] functions in depth-first order (every
/// bridge before the functions behind it) plus an error log. About 100 KiB — keep it in a
/// `static` or on the heap, not on a small stack.
#[derive(Clone, Debug)]
pub struct PciDevices {
    segment: u16,
    root_bus: u8,
    functions: [PciFunction; MAX_FUNCTIONS],
    len: usize,
    dropped_functions: usize,
    errors: [Option<PciError>; MAX_ERRORS],
    error_count: usize,
}

impl PciDevices {
    pub const fn new() -> Self {
        Self {
            segment: 0,
            root_bus: 0,
            functions: [PciFunction::EMPTY; MAX_FUNCTIONS],
            len: 0,
            dropped_functions: 0,
            errors: [None; MAX_ERRORS],
            error_count: 0,
        }
    }

    pub const fn segment(&self) -> u16 {
        self.segment
    }

    pub const fn root_bus(&self) -> u8 {
        self.root_bus
    }

    pub fn functions(&self) -> &[PciFunction] {
        &self.functions[..self.len]
    }

    pub(crate) fn functions_mut(&mut self) -> &mut [PciFunction] {
        &mut self.functions[..self.len]
    }

    /// Functions found beyond [`MAX_FUNCTIONS`] (not recorded, not configured).
    pub const fn dropped_functions(&self) -> usize {
        self.dropped_functions
    }

    /// The first [`MAX_ERRORS`] errors.
    pub fn errors(&self) -> impl Iterator<Item = &PciError> {
        self.errors.iter().flatten()
    }

    /// All errors, including those beyond the log's capacity.
    pub const fn error_count(&self) -> usize {
        self.error_count
    }

    pub fn get(&self, bdf: Bdf) -> Option<&PciFunction> {
        self.functions().iter().find(|f| f.bdf == bdf)
    }

    /// Functions with the given vendor and device ID.
    pub fn find(&self, vendor_id: u16, device_id: u16) -> impl Iterator<Item = &PciFunction> {
        self.functions()
            .iter()
            .filter(move |f| f.vendor_id == vendor_id && f.device_id == device_id)
    }

    /// The bridge whose secondary bus is `bus`, or `None` for the root bus and unknown buses.
    pub fn bridge_above_bus(&self, bus: u8) -> Option<&PciFunction> {
        if bus == self.root_bus {
            return None;
        }
        self.functions()
            .iter()
            .find(|f| matches!(f.bridge_buses(), Some((s, _)) if s == bus))
    }

    /// The topology query of the DMAR device-scope resolver (VT-d 3.4 §8.3.2): if
    /// `segment:bus:device.function` is a PCI-to-PCI bridge whose hierarchy was scanned, its
    /// `(secondary, subordinate)` buses as now programmed.
    pub fn bridge_buses(
        &self,
        segment: u16,
        bus: u8,
        device: u8,
        function: u8,
    ) -> Option<(u8, u8)> {
        if segment != self.segment {
            return None;
        }
        let bdf = Bdf::new(bus, device, function)?;
        self.get(bdf)?.bridge_buses()
    }

    pub(crate) fn log(&mut self, bdf: Bdf, kind: PciErrorKind) {
        if let Some(slot) = self.errors.get_mut(self.error_count) {
            *slot = Some(PciError { bdf, kind });
        }
        self.error_count = self.error_count.saturating_add(1);
    }

    fn push(&mut self, f: PciFunction) -> Option<usize> {
        if self.len < MAX_FUNCTIONS {
            self.functions[self.len] = f;
            self.len += 1;
            Some(self.len - 1)
        } else {
            self.dropped_functions = self.dropped_functions.saturating_add(1);
            None
        }
    }
}

impl Default for PciDevices {
    fn default() -> Self {
        Self::new()
    }
}

/// A bus being scanned.
#[derive(Clone, Copy)]
struct Frame {
    bus: u8,
    /// Next device/function to probe; `device == 32` means the bus is done.
    device: u8,
    function: u8,
    /// Function 0 of the current device has the multi-function bit set.
    multifunction: bool,
    /// Only device 0 can exist: the secondary bus of a PCIe root or downstream port, whose link
    /// carries one device (PCIe Base 5.0 §7.3.1; ARI is not enabled here). Probing devices 1..31
    /// there could find aliases of device 0.
    only_device_0: bool,
    /// Next bus number this frame may hand to an unconfigured bridge on its bus, and the
    /// highest it may use.
    next: u16,
    limit: u8,
    /// Highest bus number in use at or below this bus so far.
    max_bus: u8,
    /// The bridge leading to this bus: its index in `PciDevices` (if recorded), its address,
    /// and whether we programmed its bus numbers (then its subordinate is fixed on the way back).
    bridge: Option<(Option<usize>, Bdf, bool)>,
}

impl Frame {
    const fn new(bus: u8, limit: u8, max_bus: u8) -> Self {
        Self {
            bus,
            next: bus as u16 + 1,
            device: 0,
            function: 0,
            multifunction: false,
            only_device_0: false,
            limit,
            max_bus,
            bridge: None,
        }
    }

    const fn done(&self) -> bool {
        self.device >= 32 || (self.only_device_0 && self.device > 0)
    }

    /// Moves to the next device/function. Functions 1..7 are probed only if function 0 is
    /// present and multi-function (PCI Local Bus 3.0 §6.2.1).
    fn advance(&mut self, fn0_header: Option<u8>) {
        if self.function == 0 {
            self.multifunction = fn0_header.is_some_and(|h| h & reg::HEADER_MULTIFUNCTION != 0);
        }
        if self.multifunction && self.function < 7 {
            self.function += 1;
        } else {
            self.device += 1;
            self.function = 0;
        }
    }
}

/// Deepest possible hierarchy: every level takes a new, higher bus number.
const MAX_DEPTH: usize = 256;

/// Enumerates the segment depth-first from `config.root_bus` into `out` (which is cleared),
/// numbering unconfigured bridges as it goes (see [`BusPolicy`]) and sizing every BAR.
///
/// Writes to configuration space: bridges' bus-number registers (when numbering) and the BAR
/// sizing sequence. It assigns no addresses — see [`assign_resources`](super::assign_resources).
///
/// Hostile or broken hardware cannot make this loop: a bridge is followed only to a bus number
/// above its own that has not been scanned yet, so every bus is scanned at most once and depth
/// is bounded by the bus count; each bus has at most 256 functions. Problems are logged in
/// `out` ([`PciDevices::errors`]) and the offending bridge or capability is skipped.
pub fn enumerate<C: ConfigSpace + ?Sized>(cfg: &C, config: &EnumConfig, out: &mut PciDevices) {
    // Reset in place: `PciDevices` is large, and building a fresh one would put it on the stack.
    out.len = 0;
    out.dropped_functions = 0;
    out.errors = [None; MAX_ERRORS];
    out.error_count = 0;
    out.segment = config.segment;
    out.root_bus = config.root_bus;
    if config.max_bus < config.root_bus {
        return;
    }
    let mut w = Walker {
        cfg,
        config,
        out,
        visited: [0; 4],
    };
    w.mark(config.root_bus);
    let mut stack = [Frame::new(0, 0, 0); MAX_DEPTH];
    stack[0] = Frame::new(config.root_bus, config.max_bus, config.root_bus);
    let mut depth = 1;
    w.prepare_bus(&mut stack[0]);

    while depth > 0 {
        let frame = stack[depth - 1];
        if frame.done() {
            depth -= 1;
            w.finish_bridge(&frame);
            if depth > 0 {
                // Numbers up to the child's highest bus are taken.
                let parent = &mut stack[depth - 1];
                parent.max_bus = parent.max_bus.max(frame.max_bus);
                parent.next = parent.next.max(u16::from(frame.max_bus) + 1);
            }
            continue;
        }
        let bdf = Bdf {
            bus: frame.bus,
            device: frame.device,
            function: frame.function,
        };
        let header = header_if_present(cfg, bdf);
        stack[depth - 1].advance(header);
        let Some(header) = header else { continue };
        let Some(child) = w.probe_function(bdf, header, &mut stack[depth - 1]) else {
            continue;
        };
        if depth >= MAX_DEPTH {
            // Unreachable: bus numbers strictly increase with depth.
            w.out.log(bdf, PciErrorKind::BusNumbersExhausted);
            continue;
        }
        stack[depth] = child;
        w.prepare_bus(&mut stack[depth]);
        depth += 1;
    }
}

/// The HEADER_TYPE byte if a function answers at `bdf` (Vendor ID not FFFFh — the master-abort
/// value — and not the invalid 0000h).
fn header_if_present<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf) -> Option<u8> {
    let vendor = cfg.read16(bdf, reg::VENDOR_ID);
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    Some(cfg.read8(bdf, reg::HEADER_TYPE))
}

struct Walker<'a, C: ?Sized> {
    cfg: &'a C,
    config: &'a EnumConfig,
    out: &'a mut PciDevices,
    /// Buses scanned (or being scanned), one bit each.
    visited: [u64; 4],
}

impl<C: ConfigSpace + ?Sized> Walker<'_, C> {
    fn mark(&mut self, bus: u8) {
        self.visited[usize::from(bus >> 6)] |= 1 << (bus & 63);
    }

    fn is_visited(&self, bus: u8) -> bool {
        self.visited[usize::from(bus >> 6)] & (1 << (bus & 63)) != 0
    }

    /// Before scanning `frame.bus`: with [`BusPolicy::Reassign`], clear the bus numbers of its
    /// bridges so stale firmware ranges cannot claim the numbers handed out now; with
    /// [`BusPolicy::KeepFirmware`], move the frame's next free number past the ranges of its
    /// configured bridges so numbers given to unconfigured siblings do not collide with them.
    fn prepare_bus(&mut self, frame: &mut Frame) {
        let mut cursor = Frame {
            device: 0,
            function: 0,
            ..*frame
        };
        while !cursor.done() {
            let bdf = Bdf {
                bus: cursor.bus,
                device: cursor.device,
                function: cursor.function,
            };
            let header = header_if_present(self.cfg, bdf);
            cursor.advance(header);
            if header.is_none_or(|h| h & 0x7f != 1) {
                continue;
            }
            let buses = self.cfg.read32(bdf, reg::BUS_NUMBERS);
            match self.config.bus_policy {
                BusPolicy::Reassign => {
                    self.cfg.write32(bdf, reg::BUS_NUMBERS, buses & 0xff00_0000);
                }
                BusPolicy::KeepFirmware => {
                    let (sec, sub) = ((buses >> 8) as u8, (buses >> 16) as u8);
                    if sec > bdf.bus && sub >= sec && sub <= frame.limit {
                        frame.next = frame.next.max(u16::from(sub) + 1);
                    }
                }
            }
        }
    }

    /// Records the function at `bdf`; for a bridge that should be followed, returns the frame
    /// for its secondary bus.
    fn probe_function(&mut self, bdf: Bdf, header: u8, parent: &mut Frame) -> Option<Frame> {
        let cfg = self.cfg;
        let ids = cfg.read32(bdf, reg::VENDOR_ID);
        let class = cfg.read32(bdf, reg::REVISION_CLASS);
        let layout = header & 0x7f;
        let mut f = PciFunction {
            bdf,
            vendor_id: ids as u16,
            device_id: (ids >> 16) as u16,
            class: (class >> 24) as u8,
            subclass: (class >> 16) as u8,
            prog_if: (class >> 8) as u8,
            revision: class as u8,
            header_type: layout,
            multifunction: header & reg::HEADER_MULTIFUNCTION != 0,
            ..PciFunction::EMPTY
        };
        let bar_count = match layout {
            0 => 6,
            1 => 2,
            2 => 0,
            other => {
                self.out.log(bdf, PciErrorKind::UnknownHeaderType(other));
                self.out.push(f);
                return None;
            }
        };
        // CardBus (type 2) keeps its capability pointer at 0x14; nothing here needs it.
        if layout != 2 {
            let (caps, err) = caps::walk(cfg, bdf, reg::CAPABILITIES_PTR);
            f.caps = caps;
            if let Some(e) = err {
                self.out.log(bdf, PciErrorKind::Capability(e));
            }
        }
        let out = &mut *self.out;
        f.bars = bar::size_bars(cfg, bdf, bar_count, &mut |e| {
            out.log(bdf, PciErrorKind::Bar(e))
        });
        if layout != 1 {
            self.out.push(f);
            return None;
        }
        let mut info = BridgeInfo::default();
        let child = self.bridge_child(bdf, parent, &mut info);
        info.scanned = child.is_some();
        f.bridge = Some(info);
        let index = self.out.push(f);
        let (secondary, limit, assigned) = child?;
        self.mark(secondary);
        parent.next = parent.next.max(u16::from(secondary) + 1);
        Some(Frame {
            only_device_0: f.caps.pcie.is_some_and(|p| p.is_downstream_port()),
            bridge: Some((index, bdf, assigned)),
            ..Frame::new(secondary, limit, if assigned { secondary } else { limit })
        })
    }

    /// Reads or programs a bridge's bus numbers (PCIe Base 5.0 §7.5.1.3: primary, secondary,
    /// subordinate at 0x18..0x1a). Returns `(secondary, limit, assigned)` if the bridge is to
    /// be followed, where `limit` is the highest bus number usable below it.
    fn bridge_child(
        &mut self,
        bdf: Bdf,
        parent: &Frame,
        info: &mut BridgeInfo,
    ) -> Option<(u8, u8, bool)> {
        let buses = self.cfg.read32(bdf, reg::BUS_NUMBERS);
        let (sec, sub) = ((buses >> 8) as u8, (buses >> 16) as u8);
        info.primary = buses as u8;
        info.secondary = sec;
        info.subordinate = sub;
        if self.config.bus_policy == BusPolicy::KeepFirmware && sec != 0 {
            // Firmware numbered it. Follow it only if the range is above this bus, inside what
            // the parent forwards, and new: anything else could loop or alias.
            if sec <= bdf.bus || sub < sec || sub > parent.limit {
                self.out.log(
                    bdf,
                    PciErrorKind::BadBridgeBuses {
                        secondary: sec,
                        subordinate: sub,
                    },
                );
                return None;
            }
            if self.is_visited(sec) {
                self.out.log(bdf, PciErrorKind::BusRevisited { bus: sec });
                return None;
            }
            return Some((sec, sub, false));
        }
        // Unconfigured (secondary 0), or renumbering everything: take the next free number.
        // The subordinate is set to the parent's limit while the hierarchy below is scanned, so
        // the bridge forwards configuration requests for every bus that may be handed out
        // below it, and lowered to the real maximum afterwards (`finish_bridge`).
        // Skip numbers already scanned (a firmware range this frame did not see coming).
        let mut next = parent.next;
        while next <= u16::from(parent.limit) && self.is_visited(next as u8) {
            next += 1;
        }
        if next > u16::from(parent.limit) {
            self.out.log(bdf, PciErrorKind::BusNumbersExhausted);
            return None;
        }
        let new_sec = next as u8;
        let wrote = [bdf.bus, new_sec, parent.limit];
        self.cfg.write32(
            bdf,
            reg::BUS_NUMBERS,
            (buses & 0xff00_0000)
                | u32::from(parent.limit) << 16
                | u32::from(new_sec) << 8
                | u32::from(bdf.bus),
        );
        let back = self.cfg.read32(bdf, reg::BUS_NUMBERS);
        let read = [back as u8, (back >> 8) as u8, (back >> 16) as u8];
        if read != wrote {
            self.cfg.write32(bdf, reg::BUS_NUMBERS, buses);
            self.out
                .log(bdf, PciErrorKind::BridgeNotProgrammable { wrote, read });
            return None;
        }
        info.primary = bdf.bus;
        info.secondary = new_sec;
        info.subordinate = parent.limit;
        info.buses_assigned = true;
        Some((new_sec, parent.limit, true))
    }

    /// After the bus below a bridge is done: lower the subordinate bus of a bridge we numbered
    /// to the highest bus actually found below it.
    fn finish_bridge(&mut self, frame: &Frame) {
        let Some((index, bdf, assigned)) = frame.bridge else {
            return;
        };
        if assigned {
            let buses = self.cfg.read32(bdf, reg::BUS_NUMBERS);
            self.cfg.write32(
                bdf,
                reg::BUS_NUMBERS,
                (buses & !0x00ff_0000) | u32::from(frame.max_bus) << 16,
            );
        }
        if let Some(b) = index.and_then(|i| self.out.functions[i].bridge.as_mut()) {
            b.subordinate = frame.max_bus;
        }
    }
}

/// The topology the DMAR device-scope resolver walks (VT-d 3.4 §8.3.2): scope paths name
/// bridges by device/function from a start bus, and the buses in between come from here.
impl iommu::firmware::dmar::PciTopology for PciDevices {
    fn bridge_buses(&self, segment: u16, bus: u8, device: u8, function: u8) -> Option<(u8, u8)> {
        PciDevices::bridge_buses(self, segment, bus, device, function)
    }
}

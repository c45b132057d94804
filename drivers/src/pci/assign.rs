//! Address assignment for BARs and bridge forwarding windows, for when firmware left them
//! unprogrammed (qboot; QEMU `-kernel` on aarch64 `virt` without firmware).
//!
//! The plan works bottom-up, then top-down:
//! 1. Probe which forwarding windows each bridge implements (PCIe Base 5.0 §7.5.1.3: I/O
//!    base/limit 16- or 32-bit, memory base/limit, prefetchable base/limit 32- or 64-bit).
//! 2. Size every bridge's windows from the bottom: the resources behind it packed largest
//!    alignment first, rounded up to the window granularity (1 MiB memory, 4 KiB I/O).
//! 3. Decide what firmware configuration to keep: a root-bus BAR whose address lies inside a
//!    caller window of the right kind and overlaps nothing kept so far, and a root-bus bridge
//!    whose whole hierarchy is consistently programmed inside such windows. Everything else
//!    is (re)assigned.
//! 4. Allocate root-bus resources from the caller's windows (first fit, largest alignment
//!    first, naturally aligned), then lay out each reassigned bridge's children inside its
//!    windows top-down, programming BARs and window registers and checking what reads back.
//! 5. Enable COMMAND memory/I/O decode where a function has live resources of that space.
//!
//! Bus master enable is left to the drivers that want DMA ([`enable_bus_master`]).

use core::cmp::Reverse;

use super::bar::{Bar, BarKind, BarState};
use super::config::{Bdf, ConfigSpace, reg};
use super::enumerate::{PciDevices, PciFunction};

/// Most caller windows accepted by [`assign_resources`].
pub const MAX_WINDOWS: usize = 8;
/// Free-list capacity per window (fragments left by kept firmware assignments).
const FREE_SEGMENTS: usize = 64;

/// What a caller window may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WindowKind {
    /// Memory below 4 GiB: any memory BAR, bridge memory and prefetchable windows.
    Mem32,
    /// Memory that only 64-bit BARs (and 64-bit prefetchable bridge windows) may use; usually
    /// above 4 GiB.
    Mem64,
    /// I/O space.
    Io,
}

/// A range of *bus* addresses the host bridge forwards to PCI (ACPI `_CRS` / DT `ranges`): the
/// values programmed into BARs. On QEMU `virt` I/O bus addresses 0..0x10000 appear at CPU
/// address 0x3eff0000; translating is the caller's business.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    pub base: u64,
    pub size: u64,
    pub kind: WindowKind,
}

/// A resource of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Bar(u8),
    IoWindow,
    MemWindow,
    PrefWindow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssignError {
    /// More than [`MAX_WINDOWS`] windows.
    TooManyWindows { count: usize },
    /// Window `index` is empty, wraps around, or (for `Mem32`/`Io`) extends past 4 GiB.
    BadWindow { index: usize },
    /// No room for `resource` of `bdf` (`size` is `u64::MAX` when the resources behind a bridge
    /// cannot be laid out at all, e.g. I/O BARs behind a bridge without an I/O window).
    NoSpace {
        bdf: Bdf,
        resource: Resource,
        size: u64,
    },
    /// The register did not keep the value written.
    NotProgrammable { bdf: Bdf, resource: Resource },
}

/// Counts from a successful [`assign_resources`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssignReport {
    /// BARs whose firmware address was kept.
    pub kept: usize,
    /// BARs given a new address.
    pub assigned: usize,
    /// Bridges whose forwarding windows were programmed.
    pub bridges_programmed: usize,
}

const IO: usize = 0;
const MEM: usize = 1;
const PREF: usize = 2;
/// Bridge window granularity: I/O 4 KiB, memory 1 MiB (PCIe Base 5.0 §7.5.1.3).
const GRANULE: [u64; 3] = [0x1000, 0x10_0000, 0x10_0000];
const IMPOSSIBLE: u64 = u64::MAX;

/// Size and alignment of one bridge window, for the resources behind it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Need {
    size: u64,
    align: u64,
}

/// Per-bridge working state of [`assign_resources`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BridgePlan {
    io_supported: bool,
    io32: bool,
    pref_supported: bool,
    pref64: bool,
    need: [Need; 3],
    /// The prefetchable window may live above 4 GiB (64-bit window, 64-bit contents only).
    pref_high_ok: bool,
    /// Firmware's windows and everything behind them are consistent.
    keep: bool,
    /// This hierarchy is being laid out by us.
    reassign: bool,
    current: [Option<(u64, u64)>; 3],
    base: [Option<u64>; 3],
}

/// Assigns addresses from `windows` to every BAR and bridge window that needs one, keeping
/// consistent firmware assignments, and enables memory/I/O decode (see the module docs).
///
/// `Err(TooManyWindows | BadWindow)` means nothing was touched. `Err(NoSpace | NotProgrammable)`
/// reports the first resource that could not be assigned: everything else *has* been
/// programmed, each [`Bar::state`] and bridge window in `devices` says what happened, and a
/// function with a failed BAR keeps that space's decode disabled.
pub fn assign_resources<C: ConfigSpace + ?Sized>(
    cfg: &C,
    devices: &mut PciDevices,
    windows: &[Window],
) -> Result<AssignReport, AssignError> {
    let mut pools = [FreeList::EMPTY; MAX_WINDOWS];
    if windows.len() > MAX_WINDOWS {
        return Err(AssignError::TooManyWindows {
            count: windows.len(),
        });
    }
    for (index, w) in windows.iter().enumerate() {
        let Some(last) = w.size.checked_sub(1).and_then(|s| w.base.checked_add(s)) else {
            return Err(AssignError::BadWindow { index });
        };
        if w.kind != WindowKind::Mem64 && last > u64::from(u32::MAX) {
            return Err(AssignError::BadWindow { index });
        }
        // Never hand out bus address 0 (it reads as "unassigned"), nor the legacy ISA I/O
        // range below 0x1000.
        let first = match w.kind {
            WindowKind::Io => w.base.max(0x1000),
            _ => w.base.max(1),
        };
        pools[index] = if first <= last {
            FreeList::new(first, last)
        } else {
            FreeList::EMPTY
        };
    }

    let mut st = State {
        cfg,
        windows,
        pools,
        report: AssignReport::default(),
        first_error: None,
        touched: [0; 4],
    };
    let root = devices.root_bus();
    let bus_bridge = bus_map(devices);

    // 1. What each bridge implements, and its current windows.
    for f in devices.functions_mut() {
        let bdf = f.bdf;
        if let Some(b) = f.bridge.as_mut().filter(|b| b.scanned) {
            probe_bridge(cfg, bdf, &mut b.plan);
        }
    }

    // 2. and 3. Bottom-up: bus numbers grow with depth, so descending secondary bus visits
    // children before parents.
    for bus in (0..=255u8).rev() {
        let Some(bi) = bus_bridge[usize::from(bus)] else {
            continue;
        };
        size_bridge(devices.functions_mut(), bi, bus);
        let keep = bridge_consistent(devices.functions(), bi, bus);
        if let Some(b) = devices.functions_mut()[bi].bridge.as_mut() {
            b.plan.keep = keep;
        }
    }

    // 4a. Root bus: keep what can be kept, then allocate the rest.
    st.place_root(devices, root);

    // 4b. Top-down through reassigned bridges.
    for bus in 0..=255u8 {
        let Some(bi) = bus_bridge[usize::from(bus)] else {
            continue;
        };
        let plan = match devices.functions()[bi].bridge {
            Some(b) if b.plan.reassign => b.plan,
            _ => continue,
        };
        st.program_bridge(devices, bi, plan);
    }

    // What survives in kept hierarchies: firmware BARs and bridge windows.
    for f in devices.functions_mut() {
        if f.bdf.bus != root && bus_bridge[usize::from(f.bdf.bus)].is_none() {
            continue;
        }
        if let Some(b) = f.bridge.as_mut().filter(|b| b.scanned && !b.plan.reassign) {
            [b.io_window, b.mem_window, b.pref_window] = b.plan.current;
        }
        for bar in f.bars.iter_mut().flatten() {
            if bar.state == BarState::Firmware {
                bar.state = BarState::Kept;
                st.report.kept += 1;
            }
        }
    }

    // 5. Decode enables.
    for i in 0..devices.functions().len() {
        let f = devices.functions()[i];
        let reachable = f.bdf.bus == root || bus_bridge[usize::from(f.bdf.bus)].is_some();
        if reachable {
            st.enable_decode(&f);
        }
    }

    match st.first_error {
        None => Ok(st.report),
        Some(e) => Err(e),
    }
}

/// Sets Bus Master Enable on `bdf` and on every bridge above it, which a bridge needs to
/// forward the function's DMA upstream (PCIe Base 5.0 §7.5.1.1, Command register). Returns
/// `false` (touching nothing) if `bdf` is not in `devices`.
pub fn enable_bus_master<C: ConfigSpace + ?Sized>(cfg: &C, devices: &PciDevices, bdf: Bdf) -> bool {
    if devices.get(bdf).is_none() {
        return false;
    }
    let mut cur = bdf;
    // Each step goes to a strictly lower secondary bus, so this ends within 256 steps.
    for _ in 0..=256 {
        let cmd = cfg.read16(cur, reg::COMMAND);
        if cmd & reg::CMD_BUS_MASTER == 0 {
            cfg.write16(cur, reg::COMMAND, cmd | reg::CMD_BUS_MASTER);
        }
        match devices.bridge_above_bus(cur.bus) {
            Some(up) if up.bdf.bus < cur.bus => cur = up.bdf,
            _ => break,
        }
    }
    true
}

/// Index of the scanned bridge whose secondary bus is `bus`, per bus.
fn bus_map(devices: &PciDevices) -> [Option<usize>; 256] {
    let mut map = [None; 256];
    for (i, f) in devices.functions().iter().enumerate() {
        if let Some((sec, _)) = f.bridge_buses()
            && sec != devices.root_bus()
        {
            map[usize::from(sec)] = Some(i);
        }
    }
    map
}

fn read_windows<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    p: &BridgePlan,
) -> [Option<(u64, u64)>; 3] {
    let mut cur = [None; 3];
    if p.io_supported {
        let v = cfg.read32(bdf, reg::IO_BASE_LIMIT);
        let mut base = u64::from(v & 0xf0) << 8;
        let mut last = u64::from((v >> 8) & 0xf0) << 8 | 0xfff;
        if p.io32 {
            let up = cfg.read32(bdf, reg::IO_UPPER);
            base |= u64::from(up & 0xffff) << 16;
            last |= u64::from(up >> 16) << 16;
        }
        cur[IO] = (base <= last).then_some((base, last));
    }
    let v = cfg.read32(bdf, reg::MEM_BASE_LIMIT);
    let base = u64::from(v & 0xfff0) << 16;
    let last = u64::from((v >> 16) & 0xfff0) << 16 | 0xf_ffff;
    cur[MEM] = (base <= last).then_some((base, last));
    if p.pref_supported {
        let v = cfg.read32(bdf, reg::PREF_BASE_LIMIT);
        let mut base = u64::from(v & 0xfff0) << 16;
        let mut last = u64::from((v >> 16) & 0xfff0) << 16 | 0xf_ffff;
        if p.pref64 {
            base |= u64::from(cfg.read32(bdf, reg::PREF_BASE_UPPER)) << 32;
            last |= u64::from(cfg.read32(bdf, reg::PREF_LIMIT_UPPER)) << 32;
        }
        cur[PREF] = (base <= last).then_some((base, last));
    }
    cur
}

/// Which optional windows the bridge implements: an unimplemented I/O or prefetchable window
/// has read-only zero base and limit registers; bits 3:0 of the base say 16/32-bit (I/O) or
/// 32/64-bit (prefetchable) (PCIe Base 5.0 §7.5.1.3). Probing writes a test pattern and
/// restores the old value.
fn probe_bridge<C: ConfigSpace + ?Sized>(cfg: &C, bdf: Bdf, p: &mut BridgePlan) {
    // I/O base/limit share a dword with the RW1C secondary status: write that half as zero.
    let io = cfg.read32(bdf, reg::IO_BASE_LIMIT) & 0xffff;
    let io_probe = if io != 0 {
        io
    } else {
        cfg.write32(bdf, reg::IO_BASE_LIMIT, 0xf0f0);
        let v = cfg.read32(bdf, reg::IO_BASE_LIMIT) & 0xffff;
        cfg.write32(bdf, reg::IO_BASE_LIMIT, io);
        v
    };
    p.io_supported = io_probe != 0;
    p.io32 = io_probe & 0xf == 0x1;
    let pref = cfg.read32(bdf, reg::PREF_BASE_LIMIT);
    let pref_probe = if pref != 0 {
        pref
    } else {
        cfg.write32(bdf, reg::PREF_BASE_LIMIT, 0xfff0_fff0);
        let v = cfg.read32(bdf, reg::PREF_BASE_LIMIT);
        cfg.write32(bdf, reg::PREF_BASE_LIMIT, pref);
        v
    };
    p.pref_supported = pref_probe != 0;
    p.pref64 = pref_probe & 0xf == 0x1;
    p.current = read_windows(cfg, bdf, p);
}

/// Class (IO/MEM/PREF) of a BAR inside a bridge's windows (`parent`), or at the root.
fn bar_class(bar: &Bar, parent: Option<&BridgePlan>) -> usize {
    match (bar.kind, bar.prefetchable) {
        (BarKind::Io, _) => IO,
        (_, false) => MEM,
        (_, true) if parent.is_none_or(|p| p.pref_supported) => PREF,
        _ => MEM,
    }
}

/// Class of a child bridge's window `k` inside its parent's windows. Prefetchable memory may
/// sit in a non-prefetchable window, not the other way round.
fn window_class(k: usize, parent: Option<&BridgePlan>) -> usize {
    if k == PREF && parent.is_some_and(|p| !p.pref_supported) {
        MEM
    } else {
        k
    }
}

/// Order of placement: largest alignment first, then by function and slot for determinism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    align: Reverse<u64>,
    func: usize,
    /// 0..=5: BAR index; 6 + class: a bridge window.
    slot: u8,
}

#[derive(Clone, Copy, Debug)]
struct Item {
    key: Key,
    size: u64,
    class: usize,
    /// May be placed above 4 GiB.
    high_ok: bool,
}

/// Calls `f` for each resource on `bus` that needs a place. At the root (`parent == None`)
/// kept BARs and kept bridges are skipped; below a reassigned bridge everything is placed.
fn for_each_item(
    funcs: &[PciFunction],
    bus: u8,
    parent: Option<&BridgePlan>,
    mut f: impl FnMut(Item),
) {
    for (i, func) in funcs.iter().enumerate() {
        if func.bdf.bus != bus {
            continue;
        }
        for bar in func.bars() {
            if parent.is_none() && bar.state == BarState::Kept {
                continue;
            }
            f(Item {
                key: Key {
                    align: Reverse(bar.size),
                    func: i,
                    slot: bar.index,
                },
                size: bar.size,
                class: bar_class(bar, parent),
                high_ok: bar.kind == BarKind::Mem64,
            });
        }
        let Some(b) = func.bridge.filter(|b| b.scanned) else {
            continue;
        };
        if parent.is_none() && !b.plan.reassign {
            continue;
        }
        for k in [IO, MEM, PREF] {
            let n = b.plan.need[k];
            if n.size == 0 || n.size == IMPOSSIBLE {
                continue;
            }
            f(Item {
                key: Key {
                    align: Reverse(n.align),
                    func: i,
                    slot: 6 + k as u8,
                },
                size: n.size,
                class: window_class(k, parent),
                high_ok: k == PREF && b.plan.pref_high_ok,
            });
        }
    }
}

/// The next item after `after` in placement order, restricted to `class` if given.
fn next_item(
    funcs: &[PciFunction],
    bus: u8,
    parent: Option<&BridgePlan>,
    class: Option<usize>,
    after: Option<Key>,
) -> Option<Item> {
    let mut best: Option<Item> = None;
    for_each_item(funcs, bus, parent, |it| {
        if class.is_some_and(|c| c != it.class) || after.is_some_and(|a| it.key <= a) {
            return;
        }
        if best.is_none_or(|b| it.key < b.key) {
            best = Some(it);
        }
    });
    best
}

const fn align_up(x: u64, align: u64) -> Option<u64> {
    match x.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// Packs the `class` resources behind bridge `plan` (on bus `bus`) from address 0 in
/// placement order. Returns the end and the largest alignment, or `None` on overflow. Placing
/// from a window base aligned to that largest alignment (`State::program_bridge`) reproduces
/// the same relative layout, so it fits the window sized from this.
fn pack(funcs: &[PciFunction], bus: u8, plan: &BridgePlan, class: usize) -> Option<(u64, u64)> {
    let (mut cursor, mut max_align, mut after) = (0u64, 1u64, None);
    while let Some(it) = next_item(funcs, bus, Some(plan), Some(class), after) {
        after = Some(it.key);
        let addr = align_up(cursor, it.key.align.0)?;
        cursor = addr.checked_add(it.size)?;
        max_align = max_align.max(it.key.align.0);
    }
    Some((cursor, max_align))
}

/// Computes the window sizes of bridge `bi` (secondary bus `bus`) from what is behind it.
fn size_bridge(funcs: &mut [PciFunction], bi: usize, bus: u8) {
    let Some(mut plan) = funcs[bi].bridge.map(|b| b.plan) else {
        return;
    };
    for k in [IO, MEM, PREF] {
        plan.need[k] = match pack(funcs, bus, &plan, k) {
            Some((0, _)) => Need::default(),
            Some((end, align)) => {
                let align = align.max(GRANULE[k]);
                match align_up(end, GRANULE[k]) {
                    Some(size) => Need { size, align },
                    None => Need {
                        size: IMPOSSIBLE,
                        align,
                    },
                }
            }
            None => Need {
                size: IMPOSSIBLE,
                align: GRANULE[k],
            },
        };
    }
    if !plan.io_supported && plan.need[IO].size != 0 {
        plan.need[IO].size = IMPOSSIBLE;
    }
    let mut all_high = true;
    for_each_item(funcs, bus, Some(&plan), |it| {
        if it.class == PREF && !it.high_ok {
            all_high = false;
        }
    });
    plan.pref_high_ok = plan.pref_supported && plan.pref64 && all_high;
    if let Some(b) = funcs[bi].bridge.as_mut() {
        b.plan = plan;
    }
}

fn inside(inner: (u64, u64), outer: Option<(u64, u64)>) -> bool {
    outer.is_some_and(|(b, l)| inner.0 >= b && inner.1 <= l)
}

/// Whether firmware programmed bridge `bi` and everything behind it consistently: every BAR
/// has an address inside the matching window, and every child bridge is itself consistent with
/// its windows inside this bridge's.
fn bridge_consistent(funcs: &[PciFunction], bi: usize, bus: u8) -> bool {
    let Some(me) = funcs[bi].bridge else {
        return false;
    };
    let cur = me.plan.current;
    for f in funcs.iter().filter(|f| f.bdf.bus == bus) {
        for bar in f.bars() {
            let Some(last) = bar.base.checked_add(bar.size - 1) else {
                return false;
            };
            let ok = bar.state == BarState::Firmware
                && match bar_class(bar, Some(&me.plan)) {
                    IO => inside((bar.base, last), cur[IO]),
                    MEM => inside((bar.base, last), cur[MEM]),
                    _ => inside((bar.base, last), cur[PREF]) || inside((bar.base, last), cur[MEM]),
                };
            if !ok {
                return false;
            }
        }
        if let Some(child) = f.bridge.filter(|b| b.scanned) {
            if !child.plan.keep {
                return false;
            }
            let c = child.plan.current;
            let ok = c[IO].is_none_or(|w| inside(w, cur[IO]))
                && c[MEM].is_none_or(|w| inside(w, cur[MEM]))
                && c[PREF].is_none_or(|w| inside(w, cur[PREF]) || inside(w, cur[MEM]));
            if !ok {
                return false;
            }
        }
    }
    true
}

struct State<'a, C: ?Sized> {
    cfg: &'a C,
    windows: &'a [Window],
    pools: [FreeList; MAX_WINDOWS],
    report: AssignReport,
    first_error: Option<AssignError>,
    /// Functions (by index) whose decode was turned off before reprogramming.
    touched: [u64; 4],
}

impl<C: ConfigSpace + ?Sized> State<'_, C> {
    fn error(&mut self, e: AssignError) {
        self.first_error.get_or_insert(e);
    }

    /// Caller windows a root-bus resource may use, in order of preference.
    fn candidates(
        &self,
        class: usize,
        high_ok: bool,
        is_bar: bool,
        pref: bool,
    ) -> [Option<WindowKind>; 2] {
        use WindowKind::*;
        match class {
            IO => [Some(Io), None],
            // A 64-bit prefetchable BAR or window prefers high memory.
            _ if high_ok && (pref || !is_bar) => [Some(Mem64), Some(Mem32)],
            // A 64-bit non-prefetchable BAR on the root bus may still go high if low is full.
            _ if high_ok => [Some(Mem32), Some(Mem64)],
            _ => [Some(Mem32), None],
        }
    }

    /// Reserves `(first, last)` in a window of one of the kinds if it lies inside one and is
    /// free; returns the window's index.
    fn reserve(&mut self, range: (u64, u64), kinds: [Option<WindowKind>; 2]) -> Option<usize> {
        for kind in kinds.into_iter().flatten() {
            for (i, w) in self.windows.iter().enumerate() {
                if w.kind == kind && self.pools[i].reserve(range.0, range.1) {
                    return Some(i);
                }
            }
        }
        None
    }

    fn allocate(&mut self, size: u64, align: u64, kinds: [Option<WindowKind>; 2]) -> Option<u64> {
        for kind in kinds.into_iter().flatten() {
            for (i, w) in self.windows.iter().enumerate() {
                if w.kind == kind
                    && let Some(a) = self.pools[i].alloc(size, align)
                {
                    return Some(a);
                }
            }
        }
        None
    }

    fn place_root(&mut self, devices: &mut PciDevices, root: u8) {
        // Keep firmware BARs of root-bus functions that sit inside a window and overlap
        // nothing kept before them.
        for f in devices
            .functions_mut()
            .iter_mut()
            .filter(|f| f.bdf.bus == root)
        {
            for bar in f.bars.iter_mut().flatten() {
                if bar.state != BarState::Firmware {
                    continue;
                }
                let kinds = self.candidates(
                    bar_class(bar, None),
                    bar.kind == BarKind::Mem64,
                    true,
                    bar.prefetchable,
                );
                let keep = bar
                    .base
                    .checked_add(bar.size - 1)
                    .is_some_and(|last| self.reserve((bar.base, last), kinds).is_some());
                if keep {
                    bar.state = BarState::Kept;
                    self.report.kept += 1;
                }
            }
        }
        // Keep root-bus bridges whose whole hierarchy is consistent and whose windows fit.
        for f in devices
            .functions_mut()
            .iter_mut()
            .filter(|f| f.bdf.bus == root)
        {
            let Some(b) = f.bridge.as_mut().filter(|b| b.scanned) else {
                continue;
            };
            let mut ok = b.plan.keep;
            let mut reserved = [None; 3];
            for k in [IO, MEM, PREF] {
                let Some(w) = b.plan.current[k] else { continue };
                if !ok {
                    break;
                }
                let kinds = self.candidates(k, k == PREF && b.plan.pref64, false, true);
                let pool = self.reserve(w, kinds);
                ok = pool.is_some();
                reserved[k] = pool.map(|p| (p, w));
            }
            if !ok {
                for (pool, w) in reserved.into_iter().flatten() {
                    // Cannot fail: the range was just taken out of this list.
                    let _ = self.pools[pool].release(w.0, w.1);
                }
            }
            b.plan.reassign = !ok;
        }
        // Allocate everything else, largest alignment first.
        let mut after = None;
        while let Some(it) = next_item(devices.functions(), root, None, None, after) {
            after = Some(it.key);
            let func = it.key.func;
            if it.key.slot < 6 {
                let Some(mut bar) = devices.functions()[func].bars[usize::from(it.key.slot)] else {
                    continue;
                };
                let kinds = self.candidates(it.class, it.high_ok, true, bar.prefetchable);
                match self.allocate(bar.size, bar.size, kinds) {
                    Some(addr) => self.program_bar(devices, func, &mut bar, addr),
                    None => {
                        bar.state = BarState::Failed;
                        self.error(AssignError::NoSpace {
                            bdf: devices.functions()[func].bdf,
                            resource: Resource::Bar(bar.index),
                            size: bar.size,
                        });
                    }
                }
                devices.functions_mut()[func].bars[usize::from(it.key.slot)] = Some(bar);
            } else {
                let k = usize::from(it.key.slot - 6);
                let kinds = self.candidates(k, it.high_ok, false, true);
                let addr = self.allocate(it.size, it.key.align.0, kinds);
                if let Some(b) = devices.functions_mut()[func].bridge.as_mut() {
                    // `None` is reported when the bridge is programmed.
                    b.plan.base[k] = addr;
                }
            }
        }
    }

    /// Turns off a function's decode (once) before any of its BARs is reprogrammed.
    fn quiesce(&mut self, bdf: Bdf, func: usize) {
        let bit = 1u64 << (func % 64);
        let word = &mut self.touched[(func / 64) % 4];
        if *word & bit == 0 {
            *word |= bit;
            let cmd = self.cfg.read16(bdf, reg::COMMAND);
            if cmd & (reg::CMD_IO | reg::CMD_MEM) != 0 {
                self.cfg
                    .write16(bdf, reg::COMMAND, cmd & !(reg::CMD_IO | reg::CMD_MEM));
            }
        }
    }

    /// Writes `addr` into `bar` and checks what reads back.
    fn program_bar(&mut self, devices: &PciDevices, func: usize, bar: &mut Bar, addr: u64) {
        let bdf = devices.functions()[func].bdf;
        self.quiesce(bdf, func);
        let r = bar.register();
        self.cfg.write32(bdf, r, addr as u32);
        let mut back = u64::from(self.cfg.read32(bdf, r));
        if bar.kind == BarKind::Mem64 {
            self.cfg.write32(bdf, r + 4, (addr >> 32) as u32);
            back |= u64::from(self.cfg.read32(bdf, r + 4)) << 32;
        }
        let back = back & if bar.kind == BarKind::Io { !0x3 } else { !0xf };
        bar.base = addr;
        if back == addr {
            bar.state = BarState::Assigned;
            self.report.assigned += 1;
        } else {
            bar.state = BarState::Failed;
            self.error(AssignError::NotProgrammable {
                bdf,
                resource: Resource::Bar(bar.index),
            });
        }
    }

    /// Programs the windows of reassigned bridge `bi` from its plan, then lays out the
    /// resources on its secondary bus inside them.
    fn program_bridge(&mut self, devices: &mut PciDevices, bi: usize, mut plan: BridgePlan) {
        let f = devices.functions()[bi];
        let bdf = f.bdf;
        let Some((bus, _)) = f.bridge_buses() else {
            return;
        };
        let cfg = self.cfg;
        let resources = [
            Resource::IoWindow,
            Resource::MemWindow,
            Resource::PrefWindow,
        ];
        let mut windows: [Option<(u64, u64)>; 3] = [None; 3];
        for k in [IO, MEM, PREF] {
            let n = plan.need[k];
            if n.size == 0 {
                continue;
            }
            match plan.base[k] {
                Some(base) => windows[k] = Some((base, base + (n.size - 1))),
                None => self.error(AssignError::NoSpace {
                    bdf,
                    resource: resources[k],
                    size: n.size,
                }),
            }
        }
        // A 16-bit I/O window or a 32-bit prefetchable window cannot reach a high address
        // (the candidate rules avoid this; refuse rather than truncate).
        let reach = [
            if plan.io32 {
                u64::from(u32::MAX)
            } else {
                0xffff
            },
            u64::from(u32::MAX),
            if plan.pref64 {
                u64::MAX
            } else {
                u64::from(u32::MAX)
            },
        ];
        for k in [IO, MEM, PREF] {
            if windows[k].is_some_and(|(_, l)| l > reach[k]) {
                windows[k] = None;
                self.error(AssignError::NoSpace {
                    bdf,
                    resource: resources[k],
                    size: plan.need[k].size,
                });
            }
        }
        self.quiesce(bdf, bi);
        write_windows(cfg, bdf, &plan, &windows);
        let back = read_windows(cfg, bdf, &plan);
        for k in [IO, MEM, PREF] {
            let want = if k == IO && !plan.io_supported || k == PREF && !plan.pref_supported {
                None
            } else {
                windows[k]
            };
            if back[k] != want && want.is_some() {
                windows[k] = None;
                self.error(AssignError::NotProgrammable {
                    bdf,
                    resource: resources[k],
                });
            }
        }
        self.report.bridges_programmed += 1;
        plan.current = windows;
        if let Some(b) = devices.functions_mut()[bi].bridge.as_mut() {
            b.plan = plan;
            b.io_window = windows[IO];
            b.mem_window = windows[MEM];
            b.pref_window = windows[PREF];
        }

        // Everything behind a reassigned bridge is reassigned.
        for f in devices
            .functions_mut()
            .iter_mut()
            .filter(|f| f.bdf.bus == bus)
        {
            if let Some(child) = f.bridge.as_mut() {
                child.plan.reassign = true;
                child.plan.base = [None; 3];
            }
        }
        for class in [IO, MEM, PREF] {
            let base = windows[class].map(|w| w.0);
            // Walk the items of this class in layout order (the order `size_bridge` used),
            // releasing the borrow of `devices` between look-ups to program each.
            let mut cursor = base.unwrap_or(0);
            let mut after = None;
            while let Some(it) =
                next_item(devices.functions(), bus, Some(&plan), Some(class), after)
            {
                after = Some(it.key);
                let addr = match base {
                    Some(_) => align_up(cursor, it.key.align.0)
                        .and_then(|a| a.checked_add(it.size).map(|end| (a, end))),
                    None => None,
                };
                match addr {
                    Some((a, end)) if windows[class].is_some_and(|w| end - 1 <= w.1) => {
                        cursor = end;
                        self.place_item(devices, it, Some(a));
                    }
                    _ => self.place_item(devices, it, None),
                }
            }
        }
    }

    /// Gives `item` (behind a bridge) its address, or marks it failed.
    fn place_item(&mut self, devices: &mut PciDevices, it: Item, addr: Option<u64>) {
        let func = it.key.func;
        if it.key.slot < 6 {
            let Some(mut bar) = devices.functions()[func].bars[usize::from(it.key.slot)] else {
                return;
            };
            match addr {
                Some(a) => self.program_bar(devices, func, &mut bar, a),
                None => {
                    // The window error was reported for the bridge; quiesce so a stale
                    // address is not decoded.
                    self.quiesce(devices.functions()[func].bdf, func);
                    bar.state = BarState::Failed;
                }
            }
            devices.functions_mut()[func].bars[usize::from(it.key.slot)] = Some(bar);
        } else if let Some(b) = devices.functions_mut()[func].bridge.as_mut() {
            b.plan.base[usize::from(it.key.slot - 6)] = addr;
        }
    }

    /// Enables memory and I/O decode for the spaces in which `f` has live resources and no
    /// failed BAR.
    fn enable_decode(&mut self, f: &PciFunction) {
        let (mut mem, mut io, mut mem_bad, mut io_bad) = (false, false, false, false);
        for bar in f.bars() {
            let (live, bad) = match bar.kind {
                BarKind::Io => (&mut io, &mut io_bad),
                _ => (&mut mem, &mut mem_bad),
            };
            match bar.state {
                BarState::Kept | BarState::Assigned => *live = true,
                BarState::Failed | BarState::Unassigned | BarState::Firmware => *bad = true,
            }
        }
        if let Some(b) = f.bridge.filter(|b| b.scanned) {
            let w = if b.plan.reassign {
                [b.io_window, b.mem_window, b.pref_window]
            } else {
                b.plan.current
            };
            io |= w[IO].is_some();
            mem |= w[MEM].is_some() || w[PREF].is_some();
        }
        let cmd = self.cfg.read16(f.bdf, reg::COMMAND);
        let mut new = cmd;
        for (live, bad, bit) in [(mem, mem_bad, reg::CMD_MEM), (io, io_bad, reg::CMD_IO)] {
            if bad {
                new &= !bit;
            } else if live {
                new |= bit;
            }
        }
        if new != cmd {
            self.cfg.write16(f.bdf, reg::COMMAND, new);
        }
    }
}

/// Programs a bridge's windows; `None` disables one (base above limit).
fn write_windows<C: ConfigSpace + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    p: &BridgePlan,
    w: &[Option<(u64, u64)>; 3],
) {
    if p.io_supported {
        let (base, last) = w[IO].unwrap_or((0xf000, 0x0fff));
        // Secondary status (upper half) is RW1C: write zeros there.
        cfg.write32(
            bdf,
            reg::IO_BASE_LIMIT,
            ((base >> 8) as u32 & 0xf0) | (((last >> 8) as u32 & 0xf0) << 8),
        );
        if p.io32 {
            cfg.write32(
                bdf,
                reg::IO_UPPER,
                ((base >> 16) as u32 & 0xffff) | (((last >> 16) as u32) << 16),
            );
        }
    }
    let (base, last) = w[MEM].unwrap_or((0xfff0_0000, 0x000f_ffff));
    cfg.write32(
        bdf,
        reg::MEM_BASE_LIMIT,
        ((base >> 16) as u32 & 0xfff0) | (((last >> 16) as u32 & 0xfff0) << 16),
    );
    if p.pref_supported {
        let (base, last) = w[PREF].unwrap_or((0xfff0_0000, 0x000f_ffff));
        // Disable first so that no intermediate state opens a stray window.
        cfg.write32(bdf, reg::PREF_BASE_LIMIT, 0x0000_fff0);
        if p.pref64 {
            cfg.write32(bdf, reg::PREF_BASE_UPPER, (base >> 32) as u32);
            cfg.write32(bdf, reg::PREF_LIMIT_UPPER, (last >> 32) as u32);
        }
        cfg.write32(
            bdf,
            reg::PREF_BASE_LIMIT,
            ((base >> 16) as u32 & 0xfff0) | (((last >> 16) as u32 & 0xfff0) << 16),
        );
    }
}

/// Sorted, disjoint free ranges (inclusive) of one window.
#[derive(Clone, Copy)]
struct FreeList {
    segs: [(u64, u64); FREE_SEGMENTS],
    len: usize,
}

impl FreeList {
    const EMPTY: Self = Self {
        segs: [(0, 0); FREE_SEGMENTS],
        len: 0,
    };

    fn new(first: u64, last: u64) -> Self {
        let mut l = Self::EMPTY;
        l.segs[0] = (first, last);
        l.len = 1;
        l
    }

    fn insert(&mut self, at: usize, seg: (u64, u64)) -> bool {
        if self.len == FREE_SEGMENTS {
            return false;
        }
        self.segs.copy_within(at..self.len, at + 1);
        self.segs[at] = seg;
        self.len += 1;
        true
    }

    fn remove(&mut self, at: usize) {
        self.segs.copy_within(at + 1..self.len, at);
        self.len -= 1;
    }

    /// Takes `first..=last` out of the free space if all of it is free.
    fn reserve(&mut self, first: u64, last: u64) -> bool {
        if first > last {
            return false;
        }
        let Some(i) = self.segs[..self.len]
            .iter()
            .position(|&(a, b)| a <= first && last <= b)
        else {
            return false;
        };
        let (a, b) = self.segs[i];
        match (first > a, last < b) {
            (true, true) => {
                if !self.insert(i + 1, (last + 1, b)) {
                    return false;
                }
                self.segs[i] = (a, first - 1);
            }
            (true, false) => self.segs[i] = (a, first - 1),
            (false, true) => self.segs[i] = (last + 1, b),
            (false, false) => self.remove(i),
        }
        true
    }

    /// Returns `first..=last` (which must have been reserved from this list) to the free space.
    /// `false` if it overlaps free space or the list is full.
    fn release(&mut self, first: u64, last: u64) -> bool {
        let at = self.segs[..self.len]
            .iter()
            .position(|&(a, _)| a > last)
            .unwrap_or(self.len);
        if at > 0 && self.segs[at - 1].1 >= first {
            return false;
        }
        let touches_prev = at > 0 && self.segs[at - 1].1.checked_add(1) == Some(first);
        let touches_next = at < self.len && last.checked_add(1) == Some(self.segs[at].0);
        match (touches_prev, touches_next) {
            (true, true) => {
                self.segs[at - 1].1 = self.segs[at].1;
                self.remove(at);
            }
            (true, false) => self.segs[at - 1].1 = last,
            (false, true) => self.segs[at].0 = first,
            (false, false) => return self.insert(at, (first, last)),
        }
        true
    }

    /// First fit of `size` bytes aligned to `align` (a power of two).
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        for i in 0..self.len {
            let (a, b) = self.segs[i];
            let Some(start) = align_up(a, align) else {
                continue;
            };
            let Some(last) = start.checked_add(size - 1) else {
                continue;
            };
            if last <= b && self.reserve(start, last) {
                return Some(start);
            }
        }
        None
    }
}

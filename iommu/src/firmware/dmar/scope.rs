//! Device scopes (VT-d 4.1 §8.3.1) and their resolution against the live PCI hierarchy
//! (§8.3.2): a scope names a device by a start bus plus a path of (device, function) hops, so
//! which bus a hop lands on depends on how the bridges along the path were programmed.

use core::fmt;

use super::DmarError;

/// Fixed part of a device scope: type, length, flags, reserved, enumeration ID, start bus.
pub const SCOPE_HEADER_LEN: usize = 6;

/// Device scope entry types (VT-d 4.1 §8.3.1, Table "Device Scope Structure").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeType {
    /// 0x01: a PCI endpoint device.
    Endpoint,
    /// 0x02: a PCI-PCI bridge and every device below it ("PCI sub-hierarchy").
    Bridge,
    /// 0x03: an I/O APIC; the enumeration ID is its I/O APIC ID.
    IoApic,
    /// 0x04: an MSI-capable HPET; the enumeration ID is its HPET number.
    Hpet,
    /// 0x05: an ACPI namespace device; the enumeration ID is an ANDD device number (§8.7).
    AcpiNamespaceDevice,
    /// 0x00 and 0x06..=0xff: reserved by the spec, kept raw for forward compatibility.
    Reserved(u8),
}

impl ScopeType {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::Endpoint,
            2 => Self::Bridge,
            3 => Self::IoApic,
            4 => Self::Hpet,
            5 => Self::AcpiNamespaceDevice,
            other => Self::Reserved(other),
        }
    }

    pub const fn raw(self) -> u8 {
        match self {
            Self::Endpoint => 1,
            Self::Bridge => 2,
            Self::IoApic => 3,
            Self::Hpet => 4,
            Self::AcpiNamespaceDevice => 5,
            Self::Reserved(raw) => raw,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Endpoint => "PCI Endpoint Device",
            Self::Bridge => "PCI Sub-hierarchy",
            Self::IoApic => "IOAPIC",
            Self::Hpet => "MSI Capable HPET",
            Self::AcpiNamespaceDevice => "ACPI Namespace Device",
            Self::Reserved(_) => "Reserved",
        }
    }
}

/// One (device, function) hop of a device scope path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PathEntry {
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PathEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{:x}", self.device, self.function)
    }
}

/// The hops of a device scope path, first (on the start bus) to last (the device itself).
#[derive(Clone, Debug)]
pub struct PathIter<'a>(core::slice::Iter<'a, [u8; 2]>);

impl Iterator for PathIter<'_> {
    type Item = PathEntry;

    fn next(&mut self) -> Option<PathEntry> {
        self.0
            .next()
            .map(|&[device, function]| PathEntry { device, function })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for PathIter<'_> {
    fn next_back(&mut self) -> Option<PathEntry> {
        self.0
            .next_back()
            .map(|&[device, function]| PathEntry { device, function })
    }
}

impl ExactSizeIterator for PathIter<'_> {}

/// A validated device scope (VT-d 4.1 §8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceScope<'a> {
    offset: usize,
    length: u8,
    raw_type: u8,
    flags: u8,
    reserved: u8,
    enumeration_id: u8,
    start_bus: u8,
    path: &'a [[u8; 2]],
}

impl<'a> DeviceScope<'a> {
    /// Byte offset of this scope from the start of the DMAR table.
    pub const fn offset(&self) -> usize {
        self.offset
    }

    pub const fn length(&self) -> u8 {
        self.length
    }

    pub const fn scope_type(&self) -> ScopeType {
        ScopeType::from_raw(self.raw_type)
    }

    pub const fn raw_type(&self) -> u8 {
        self.raw_type
    }

    /// Byte 2. Reserved before VT-d 4.0; VT-d 4.x gives it per-device property bits that matter
    /// for scopes under an SIDP structure (§8.9), so it is exposed raw for every scope.
    pub const fn flags(&self) -> u8 {
        self.flags
    }

    /// Byte 3, reserved in every revision; exposed so a dump can show what firmware put there.
    pub const fn reserved(&self) -> u8 {
        self.reserved
    }

    /// I/O APIC ID, HPET number or ANDD device number, depending on the type; 0 otherwise.
    pub const fn enumeration_id(&self) -> u8 {
        self.enumeration_id
    }

    pub const fn start_bus(&self) -> u8 {
        self.start_bus
    }

    pub fn path(&self) -> PathIter<'a> {
        PathIter(self.path.iter())
    }

    pub const fn path_len(&self) -> usize {
        self.path.len()
    }

    /// Walks the path through the live topology (VT-d 4.1 §8.3.2): the first hop is on the start
    /// bus, and every hop but the last must be a bridge whose secondary bus carries the next hop.
    /// Bus numbers come from the running system, not the table, because firmware and OS may
    /// renumber buses; that is why the spec encodes paths rather than BDFs.
    ///
    /// For a [`ScopeType::Bridge`] scope, `subordinate` is the bus range below the bridge, or
    /// `None` if the topology does not report the final device as a bridge (e.g. an empty
    /// hot-plug slot's root port that is disabled).
    pub fn resolve(
        &self,
        segment: u16,
        topology: &dyn PciTopology,
    ) -> Result<ResolvedScope, ResolveError> {
        let Some((&[device, function], bridges)) = self.path.split_last() else {
            return Err(ResolveError::EmptyPath);
        };
        let mut bus = self.start_bus;
        for (hop, &[d, f]) in bridges.iter().enumerate() {
            check_devfn(hop, d, f)?;
            let Some((secondary, subordinate)) = topology.bridge_buses(segment, bus, d, f) else {
                return Err(ResolveError::NotABridge {
                    hop,
                    bus,
                    device: d,
                    function: f,
                });
            };
            check_bridge_range(hop, bus, secondary, subordinate)?;
            bus = secondary;
        }
        let last = bridges.len();
        check_devfn(last, device, function)?;
        let kind = self.scope_type();
        let subordinate = match kind {
            ScopeType::Bridge => match topology.bridge_buses(segment, bus, device, function) {
                Some((secondary, subordinate)) => {
                    check_bridge_range(last, bus, secondary, subordinate)?;
                    Some((secondary, subordinate))
                }
                None => None,
            },
            _ => None,
        };
        Ok(ResolvedScope {
            segment,
            bus,
            device,
            function,
            kind,
            subordinate,
        })
    }
}

/// Devices are 5 bits and functions 3 bits wide in a PCI requester ID; anything else in a path
/// is firmware garbage and must not reach an ECAM address computation.
fn check_devfn(hop: usize, device: u8, function: u8) -> Result<(), ResolveError> {
    if device > 31 || function > 7 {
        return Err(ResolveError::InvalidDevFn {
            hop,
            device,
            function,
        });
    }
    Ok(())
}

/// A bridge's secondary bus is always numbered above its own bus, and the subordinate bus is the
/// highest below it; an unconfigured bridge (secondary 0) or a loop must not be followed.
fn check_bridge_range(
    hop: usize,
    bus: u8,
    secondary: u8,
    subordinate: u8,
) -> Result<(), ResolveError> {
    if secondary <= bus || subordinate < secondary {
        return Err(ResolveError::BadBridgeBuses {
            hop,
            bus,
            secondary,
            subordinate,
        });
    }
    Ok(())
}

/// What the hypervisor knows about the live PCI hierarchy (it reads it from ECAM).
pub trait PciTopology {
    /// If `segment:bus:device.function` is a present PCI-to-PCI bridge, its secondary and
    /// subordinate bus numbers as currently programmed; `None` for anything else.
    fn bridge_buses(&self, segment: u16, bus: u8, device: u8, function: u8) -> Option<(u8, u8)>;
}

/// A topology with no bridges at all: resolves single-hop scopes only.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBridges;

impl PciTopology for NoBridges {
    fn bridge_buses(&self, _: u16, _: u8, _: u8, _: u8) -> Option<(u8, u8)> {
        None
    }
}

/// A device scope turned into a concrete PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResolvedScope {
    pub segment: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    pub kind: ScopeType,
    /// For a bridge scope: the (secondary, subordinate) bus range it covers.
    pub subordinate: Option<(u8, u8)>,
}

impl ResolvedScope {
    /// The 16-bit source-id / requester ID (bus, device, function) used by context entries and
    /// interrupt remapping table entries (VT-d 4.1 §3.4.1, §5.1.4).
    pub const fn source_id(&self) -> u16 {
        // Device and function were range-checked by `resolve`, so this cannot overflow.
        ((self.bus as u16) << 8) | ((self.device as u16) << 3) | self.function as u16
    }

    /// Whether this scope names `bus:device.function`, either exactly or, for a bridge scope, as
    /// a device on a bus below the bridge (VT-d 4.1 §8.3.1: a sub-hierarchy scope covers the
    /// bridge and everything behind it).
    pub fn covers(&self, bus: u8, device: u8, function: u8) -> Option<MatchVia> {
        if (self.bus, self.device, self.function) == (bus, device, function) {
            return match self.kind {
                ScopeType::Bridge => Some(MatchVia::Bridge),
                _ => Some(MatchVia::Endpoint),
            };
        }
        match (self.kind, self.subordinate) {
            (ScopeType::Bridge, Some((secondary, subordinate)))
                if (secondary..=subordinate).contains(&bus) =>
            {
                Some(MatchVia::BehindBridge {
                    secondary,
                    subordinate,
                })
            }
            _ => None,
        }
    }
}

/// How a device matched a DRHD (or an RMRR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatchVia {
    /// An endpoint scope names the device.
    Endpoint,
    /// A sub-hierarchy scope names the device itself (it is the bridge).
    Bridge,
    /// The device is on a bus in a sub-hierarchy scope's range.
    BehindBridge { secondary: u8, subordinate: u8 },
    /// No scope names it; the segment's INCLUDE_PCI_ALL unit takes it (§8.3).
    IncludePciAll,
}

/// Why a device scope could not be resolved against the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// The scope has no path entries, so it names no device.
    EmptyPath,
    /// Hop `hop` has a device above 31 or a function above 7.
    InvalidDevFn {
        hop: usize,
        device: u8,
        function: u8,
    },
    /// Hop `hop` must be a bridge to reach the next hop, but the topology has none there.
    NotABridge {
        hop: usize,
        bus: u8,
        device: u8,
        function: u8,
    },
    /// The bridge at hop `hop` reports a bus range that cannot be right.
    BadBridgeBuses {
        hop: usize,
        bus: u8,
        secondary: u8,
        subordinate: u8,
    },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::EmptyPath => f.write_str("device scope has an empty path"),
            Self::InvalidDevFn {
                hop,
                device,
                function,
            } => {
                write!(
                    f,
                    "path hop {hop}: invalid device {device:#x} function {function:#x}"
                )
            }
            Self::NotABridge {
                hop,
                bus,
                device,
                function,
            } => write!(
                f,
                "path hop {hop}: {bus:02x}:{device:02x}.{function:x} is not a bridge"
            ),
            Self::BadBridgeBuses {
                hop,
                bus,
                secondary,
                subordinate,
            } => write!(
                f,
                "path hop {hop}: bridge on bus {bus:#04x} has secondary {secondary:#04x} \
                 subordinate {subordinate:#04x}"
            ),
        }
    }
}

/// Iterator over the device scopes of one remapping structure. Scopes were validated when the
/// table was parsed, so iteration itself cannot fail.
#[derive(Clone, Debug)]
pub struct DeviceScopes<'a> {
    region: &'a [u8],
    /// Table offset of `region`, for error and dump offsets.
    base: usize,
    pos: usize,
}

impl<'a> DeviceScopes<'a> {
    pub(super) const fn new(region: &'a [u8], base: usize) -> Self {
        Self {
            region,
            base,
            pos: 0,
        }
    }

    /// Checks every scope in the region; returns how many there are.
    pub(super) fn validate(&self) -> Result<usize, DmarError> {
        let mut pos = 0;
        let mut count = 0usize;
        while pos < self.region.len() {
            let (_, next) = decode_scope(self.region, pos, self.base)?;
            pos = next;
            count = count.saturating_add(1);
        }
        Ok(count)
    }
}

impl<'a> Iterator for DeviceScopes<'a> {
    type Item = DeviceScope<'a>;

    fn next(&mut self) -> Option<DeviceScope<'a>> {
        if self.pos >= self.region.len() {
            return None;
        }
        match decode_scope(self.region, self.pos, self.base) {
            Ok((scope, next)) => {
                self.pos = next;
                Some(scope)
            }
            // Unreachable for a region that passed `validate`; stop rather than loop.
            Err(_) => {
                self.pos = self.region.len();
                None
            }
        }
    }
}

impl core::iter::FusedIterator for DeviceScopes<'_> {}

impl core::iter::FusedIterator for PathIter<'_> {}

/// Decodes the scope at `pos` of `region`; returns it and the position just past it.
fn decode_scope(
    region: &[u8],
    pos: usize,
    base: usize,
) -> Result<(DeviceScope<'_>, usize), DmarError> {
    let offset = base.saturating_add(pos);
    let rest = region.get(pos..).unwrap_or(&[]);
    let (ty, length) = match *rest {
        [ty, length, ..] => (ty, length),
        _ => {
            return Err(DmarError::ScopeTruncated {
                offset,
                remaining: rest.len(),
            });
        }
    };
    let len = usize::from(length);
    if length == 0 {
        return Err(DmarError::ScopeZeroLength { offset });
    }
    if len < SCOPE_HEADER_LEN {
        return Err(DmarError::ScopeTooShort { offset, length });
    }
    if !(len - SCOPE_HEADER_LEN).is_multiple_of(2) {
        return Err(DmarError::ScopeOddLength { offset, length });
    }
    let Some(body) = rest.get(..len) else {
        return Err(DmarError::ScopePastStructure {
            offset,
            length,
            remaining: rest.len(),
        });
    };
    let [
        _,
        _,
        flags,
        reserved,
        enumeration_id,
        start_bus,
        ref path @ ..,
    ] = *body
    else {
        return Err(DmarError::ScopeTooShort { offset, length });
    };
    let (path, odd) = path.as_chunks::<2>();
    if !odd.is_empty() {
        return Err(DmarError::ScopeOddLength { offset, length });
    }
    // Every defined type names a device by its path (§8.3.1); a reserved type might not.
    if path.is_empty() && !matches!(ScopeType::from_raw(ty), ScopeType::Reserved(_)) {
        return Err(DmarError::ScopeEmptyPath { offset, ty });
    }
    let scope = DeviceScope {
        offset,
        length,
        raw_type: ty,
        flags,
        reserved,
        enumeration_id,
        start_bus,
        path,
    };
    Ok((scope, pos.saturating_add(len)))
}

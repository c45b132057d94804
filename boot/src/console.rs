//! Which UART is the boot console: the `console=` command-line option, else the UART the
//! firmware's SPCR table names, else the architecture's default (x86_64: COM1; aarch64: the
//! device tree's or QEMU `virt`'s PL011). Pure logic, host-tested; the kernel's `arch` code
//! drives the UART chosen here.
//!
//! `console=` syntax (the same on both architectures; each accepts the kinds it can drive):
//!
//! ```text
//! ttyS0 .. ttyS3          16550 at the PC standard I/O ports 0x3f8, 0x2f8, 0x3e8, 0x2e8 (x86_64)
//! io:0x2f8                16550 at an I/O port base (x86_64)
//! mmio:0xfe030000         16550 in memory space, byte-wide registers at consecutive addresses
//! mmio32:0xfe030000       16550 in memory space, 32-bit registers 4 bytes apart (DesignWare-style)
//! pl011:0x9000000         Arm PL011 (aarch64)
//! sbsa:0x9000000          SBSA generic UART (aarch64)
//! ```
//!
//! Numbers are hexadecimal with `0x` or decimal. A value that does not parse, names a kind this
//! architecture cannot drive, or an address that cannot be a register block is refused with a
//! reason; the caller reports it on whatever console it ends up using and carries on.

/// A UART the console code can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleUart {
    /// 8250/16550 at an x86 I/O port base.
    Io16550 {
        port: u16,
    },
    /// 16550 in memory space; `stride` is the distance between registers (1 or 4 bytes; with 4
    /// the registers are accessed as 32-bit words).
    Mmio16550 {
        base: u64,
        stride: u8,
    },
    Pl011 {
        base: u64,
    },
    SbsaGeneric {
        base: u64,
    },
}

/// Where the chosen console came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleSource {
    CommandLine,
    Spcr,
    Default,
}

/// What the caller can drive on this architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleArch {
    X86_64,
    Aarch64,
}

/// The PC standard serial port bases, `ttyS0`..`ttyS3`.
pub const PC_PORTS: [u16; 4] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];

impl ConsoleUart {
    /// Whether this architecture has a driver for the UART.
    pub fn drivable_on(&self, arch: ConsoleArch) -> bool {
        match self {
            Self::Io16550 { .. } => arch == ConsoleArch::X86_64,
            Self::Mmio16550 { .. } => arch == ConsoleArch::X86_64,
            Self::Pl011 { .. } | Self::SbsaGeneric { .. } => arch == ConsoleArch::Aarch64,
        }
    }

    /// The register window in memory space, if the UART has one: (base, length).
    pub fn mmio_window(&self) -> Option<(u64, u64)> {
        match *self {
            Self::Io16550 { .. } => None,
            // Eight registers (16550 data sheet §8) at `stride` bytes each.
            Self::Mmio16550 { base, stride } => Some((base, 8 * u64::from(stride))),
            // The PrimeCell footprint is 4 KiB (PL011 TRM §3.2).
            Self::Pl011 { base } | Self::SbsaGeneric { base } => Some((base, 0x1000)),
        }
    }
}

impl core::fmt::Display for ConsoleUart {
    /// The `console=` spelling of the UART, so a report line can be pasted back as an option.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Io16550 { port } => write!(f, "io:{port:#x}"),
            Self::Mmio16550 { base, stride: 4 } => write!(f, "mmio32:{base:#x}"),
            Self::Mmio16550 { base, .. } => write!(f, "mmio:{base:#x}"),
            Self::Pl011 { base } => write!(f, "pl011:{base:#x}"),
            Self::SbsaGeneric { base } => write!(f, "sbsa:{base:#x}"),
        }
    }
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a `console=` value (syntax in the module comment).
pub fn parse_console_arg(value: &str) -> Result<ConsoleUart, &'static str> {
    if let Some(n) = value.strip_prefix("ttyS") {
        return match n.parse::<usize>().ok().and_then(|i| PC_PORTS.get(i)) {
            Some(&port) => Ok(ConsoleUart::Io16550 { port }),
            None => Err("ttyS index must be 0-3"),
        };
    }
    let (kind, addr) = value
        .split_once(':')
        .ok_or("expected ttySN or KIND:ADDRESS (io, mmio, mmio32, pl011, sbsa)")?;
    let addr = number(addr).ok_or("address is not a number")?;
    let mmio_base = |align: u64| {
        if addr == 0 || !addr.is_multiple_of(align) {
            Err("memory-mapped UART base must be non-zero and aligned to its register width")
        } else {
            Ok(addr)
        }
    };
    match kind {
        "io" => match u16::try_from(addr) {
            // The eight registers must fit below port 0x10000.
            Ok(port) if port != 0 && port <= 0xfff8 => Ok(ConsoleUart::Io16550 { port }),
            _ => Err("I/O port base must be in 0x1-0xfff8"),
        },
        "mmio" => Ok(ConsoleUart::Mmio16550 {
            base: mmio_base(1)?,
            stride: 1,
        }),
        "mmio32" => Ok(ConsoleUart::Mmio16550 {
            base: mmio_base(4)?,
            stride: 4,
        }),
        "pl011" => Ok(ConsoleUart::Pl011 {
            base: mmio_base(0x1000)?,
        }),
        "sbsa" => Ok(ConsoleUart::SbsaGeneric {
            base: mmio_base(0x1000)?,
        }),
        _ => Err("unknown UART kind (io, mmio, mmio32, pl011, sbsa)"),
    }
}

/// The console decision and what to report about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleChoice {
    /// `None`: nothing usable (aarch64 under UEFI without SPCR); the console stays silent.
    pub uart: Option<ConsoleUart>,
    pub source: ConsoleSource,
    /// Why `console=` was ignored, if it was given and refused.
    pub cmdline_error: Option<&'static str>,
    /// Why SPCR was not used, if it was consulted and refused.
    pub spcr_error: Option<&'static str>,
}

/// Chooses the console: a valid `console=` for this architecture, else SPCR's UART if this
/// architecture can drive it, else `default`. `usable` is the caller's check that the address may
/// be touched (not RAM, mapped); a refused `console=` or SPCR UART falls through to the next.
pub fn choose_console(
    arch: ConsoleArch,
    cmdline: Option<&str>,
    spcr: Option<Result<ConsoleUart, &'static str>>,
    default: Option<ConsoleUart>,
    usable: impl Fn(&ConsoleUart) -> bool,
) -> ConsoleChoice {
    let check = |u: ConsoleUart, not_here: &'static str| {
        if !u.drivable_on(arch) {
            Err(not_here)
        } else if !usable(&u) {
            Err("address is RAM or outside the boot map")
        } else {
            Ok(u)
        }
    };
    let mut choice = ConsoleChoice {
        uart: default,
        source: ConsoleSource::Default,
        cmdline_error: None,
        spcr_error: None,
    };
    if let Some(value) = cmdline {
        match parse_console_arg(value)
            .and_then(|u| check(u, "this architecture has no driver for that UART kind"))
        {
            Ok(u) => {
                choice.uart = Some(u);
                choice.source = ConsoleSource::CommandLine;
                return choice;
            }
            Err(e) => choice.cmdline_error = Some(e),
        }
    }
    match spcr.map(|r| r.and_then(|u| check(u, "SPCR UART kind has no driver here"))) {
        Some(Ok(u)) => {
            choice.uart = Some(u);
            choice.source = ConsoleSource::Spcr;
        }
        Some(Err(e)) => choice.spcr_error = Some(e),
        None => {}
    }
    choice
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use ConsoleUart::*;

    #[test]
    fn parses_every_documented_form() {
        assert_eq!(parse_console_arg("ttyS0"), Ok(Io16550 { port: 0x3f8 }));
        assert_eq!(parse_console_arg("ttyS1"), Ok(Io16550 { port: 0x2f8 }));
        assert_eq!(parse_console_arg("ttyS3"), Ok(Io16550 { port: 0x2e8 }));
        assert_eq!(parse_console_arg("io:0x2f8"), Ok(Io16550 { port: 0x2f8 }));
        assert_eq!(parse_console_arg("io:760"), Ok(Io16550 { port: 0x2f8 }));
        assert_eq!(
            parse_console_arg("mmio:0xfe030001"),
            Ok(Mmio16550 {
                base: 0xfe03_0001,
                stride: 1
            })
        );
        assert_eq!(
            parse_console_arg("mmio32:0xFE030000"),
            Ok(Mmio16550 {
                base: 0xfe03_0000,
                stride: 4
            })
        );
        assert_eq!(
            parse_console_arg("pl011:0x9000000"),
            Ok(Pl011 { base: 0x900_0000 })
        );
        assert_eq!(
            parse_console_arg("sbsa:0x1c090000"),
            Ok(SbsaGeneric { base: 0x1c09_0000 })
        );
    }

    #[test]
    fn refuses_malformed_values_with_a_reason() {
        for (bad, why) in [
            ("ttyS4", "ttyS index must be 0-3"),
            ("ttyS", "ttyS index must be 0-3"),
            (
                "",
                "expected ttySN or KIND:ADDRESS (io, mmio, mmio32, pl011, sbsa)",
            ),
            (
                "com2",
                "expected ttySN or KIND:ADDRESS (io, mmio, mmio32, pl011, sbsa)",
            ),
            ("io:", "address is not a number"),
            ("io:0xzz", "address is not a number"),
            ("io:0x10000", "I/O port base must be in 0x1-0xfff8"),
            ("io:0xfffc", "I/O port base must be in 0x1-0xfff8"),
            ("io:0", "I/O port base must be in 0x1-0xfff8"),
            (
                "mmio32:0xfe030002",
                "memory-mapped UART base must be non-zero and aligned to its register width",
            ),
            (
                "pl011:0x9000800",
                "memory-mapped UART base must be non-zero and aligned to its register width",
            ),
            (
                "mmio:0",
                "memory-mapped UART base must be non-zero and aligned to its register width",
            ),
            (
                "usb:0x1000",
                "unknown UART kind (io, mmio, mmio32, pl011, sbsa)",
            ),
            ("mmio:0x1_0000_0000_0000_0000", "address is not a number"),
        ] {
            assert_eq!(parse_console_arg(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn display_round_trips_through_the_parser() {
        for u in [
            Io16550 { port: 0x2f8 },
            Mmio16550 {
                base: 0xfe03_0000,
                stride: 4,
            },
            Mmio16550 {
                base: 0xfe03_0001,
                stride: 1,
            },
            Pl011 { base: 0x900_0000 },
            SbsaGeneric { base: 0x1c09_0000 },
        ] {
            assert_eq!(parse_console_arg(&std::format!("{u}")), Ok(u));
        }
    }

    const COM1: Option<ConsoleUart> = Some(Io16550 { port: 0x3f8 });

    #[test]
    fn cmdline_overrides_spcr_which_overrides_the_default() {
        let spcr = Some(Ok(Io16550 { port: 0x2f8 }));
        let x86 = ConsoleArch::X86_64;
        let c = choose_console(x86, Some("io:0x3e8"), spcr, COM1, |_| true);
        assert_eq!(
            (c.uart, c.source),
            (Some(Io16550 { port: 0x3e8 }), ConsoleSource::CommandLine)
        );
        let c = choose_console(x86, None, spcr, COM1, |_| true);
        assert_eq!(
            (c.uart, c.source),
            (Some(Io16550 { port: 0x2f8 }), ConsoleSource::Spcr)
        );
        let c = choose_console(x86, None, None, COM1, |_| true);
        assert_eq!((c.uart, c.source), (COM1, ConsoleSource::Default));
        assert_eq!((c.cmdline_error, c.spcr_error), (None, None));
    }

    #[test]
    fn a_bad_override_falls_back_and_says_why() {
        let x86 = ConsoleArch::X86_64;
        let spcr = Some(Ok(Io16550 { port: 0x2f8 }));
        let c = choose_console(x86, Some("ttyS9"), spcr, COM1, |_| true);
        assert_eq!(
            (c.uart, c.source, c.cmdline_error),
            (
                Some(Io16550 { port: 0x2f8 }),
                ConsoleSource::Spcr,
                Some("ttyS index must be 0-3")
            )
        );
        // A PL011 on x86_64 parses but cannot be driven.
        let c = choose_console(x86, Some("pl011:0x9000000"), None, COM1, |_| true);
        assert_eq!(
            (c.uart, c.cmdline_error),
            (
                COM1,
                Some("this architecture has no driver for that UART kind")
            )
        );
        // An address the caller refuses (RAM) falls back too.
        let c = choose_console(
            ConsoleArch::Aarch64,
            Some("pl011:0x40000000"),
            None,
            Some(Pl011 { base: 0x900_0000 }),
            |u| *u != Pl011 { base: 0x4000_0000 },
        );
        assert_eq!(
            (c.uart, c.cmdline_error),
            (
                Some(Pl011 { base: 0x900_0000 }),
                Some("address is RAM or outside the boot map")
            )
        );
    }

    #[test]
    fn an_unusable_spcr_is_reported_and_skipped() {
        let x86 = ConsoleArch::X86_64;
        let c = choose_console(x86, None, Some(Err("SPCR too short")), COM1, |_| true);
        assert_eq!((c.uart, c.spcr_error), (COM1, Some("SPCR too short")));
        let c = choose_console(
            x86,
            None,
            Some(Ok(Pl011 { base: 0x900_0000 })),
            COM1,
            |_| true,
        );
        assert_eq!(
            (c.uart, c.source, c.spcr_error),
            (
                COM1,
                ConsoleSource::Default,
                Some("SPCR UART kind has no driver here")
            )
        );
        // aarch64 under UEFI has no default: nothing usable means silence, not a guess.
        let c = choose_console(
            ConsoleArch::Aarch64,
            None,
            Some(Err("no SPCR table")),
            None,
            |_| true,
        );
        assert_eq!(c.uart, None);
    }
}

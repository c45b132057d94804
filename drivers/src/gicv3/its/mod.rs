//! The GICv3 Interrupt Translation Service (IHI 0069 ch. 5-6, registers §12.19): turns a
//! device's MSI write to GITS_TRANSLATER (DeviceID from the bus, EventID = the data written)
//! into an LPI on the collection's redistributor, through tables the ITS keeps in memory and
//! software fills only through the ITS command queue.
//!
//! [`cmd`] encodes the commands (safe, host-tested against the spec's bit layouts);
//! [`regs`] holds the register layout and the decoders of GITS_TYPER and GITS_BASER<n>.

pub mod cmd;
pub mod regs;

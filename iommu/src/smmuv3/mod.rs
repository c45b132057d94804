//! Arm SMMUv3 (Arm IHI 0070, System Memory Management Unit Architecture v3).
//!
//! See `docs/smmuv3.md` for the design: bring-up, stream table, STE update ordering per
//! transition, command queue concurrency and error recovery, invalidation policy, events,
//! nested domains.

pub mod regs;

pub mod cd;
pub mod cmdq;
pub mod domain;
pub mod error;
pub mod eventq;
pub mod irq;
pub mod ste;
pub mod stream_table;
pub mod unit;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod spec_values;
#[cfg(test)]
mod tests;

pub use cmdq::{Command, SyncSignal, TlbiRange};
pub use domain::{Domain, DomainConfig, Stage};
pub use error::SmmuError;
pub use eventq::{Event, EventPoll, EventType, FaultClass};
pub use ste::{Ste, StreamConfig};
pub use stream_table::Layout;
pub use unit::{Counters, InvalidationRound, SmmuUnit, UnitConfig};

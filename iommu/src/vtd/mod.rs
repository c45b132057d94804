//! Intel VT-d (Intel Virtualization Technology for Directed I/O, rev 3.4/4.x).

pub mod regs;

pub mod domain;
pub mod error;
pub mod fault;
pub mod fault_events;
pub mod intremap;
pub mod invalidation;
pub mod mem;
pub mod rmrr;
pub mod tables;
pub mod unit;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod spec_values;
#[cfg(test)]
mod tests;

pub use domain::{Domain, DomainConfig, Stage};
pub use error::{QueueError, VtdError};
pub use fault::FaultPoll;
pub use mem::VtdMemory;
pub use rmrr::{
    IdentityRange, RmrrDevice, RmrrIssue, RmrrIssueKind, RmrrPlan, RmrrReport, UnitRmrrPlan,
};
pub use unit::{AttachOptions, Counters, InvalidationRound, TranslationMode, UnitConfig, VtdUnit};

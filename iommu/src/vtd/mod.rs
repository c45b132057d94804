//! Intel VT-d (Intel Virtualization Technology for Directed I/O, rev 3.4/4.x).

pub mod regs;

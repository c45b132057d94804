//! Arm SMMUv3 (Arm IHI 0070, System Memory Management Unit Architecture v3).

pub mod regs;

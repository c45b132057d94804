//! VMCS field encodings (Intel SDM vol 3D Appendix B) and the VMCS / VMXON region pages.
//!
//! Unlike the SVM VMCB, a VMCS is not a memory layout software may touch: its format is the
//! processor's own, and fields are reached only with VMREAD/VMWRITE on the *current* VMCS
//! (SDM §24.11). The page holds just the revision identifier software writes before first use.

use crate::guest::memory::Frames;

/// Field encodings, SDM Appendix B (B.1-B.4: 16-bit, 64-bit, 32-bit, natural-width).
pub mod field {
    // 16-bit control and guest/host selectors.
    pub const VPID: u32 = 0x0000;
    pub const GUEST_ES_SEL: u32 = 0x0800;
    pub const GUEST_TR_SEL: u32 = 0x080e;
    pub const HOST_ES_SEL: u32 = 0x0c00;
    pub const HOST_CS_SEL: u32 = 0x0c02;
    pub const HOST_SS_SEL: u32 = 0x0c04;
    pub const HOST_DS_SEL: u32 = 0x0c06;
    pub const HOST_FS_SEL: u32 = 0x0c08;
    pub const HOST_GS_SEL: u32 = 0x0c0a;
    pub const HOST_TR_SEL: u32 = 0x0c0c;
    // 64-bit.
    pub const EPT_POINTER: u32 = 0x201a;
    pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
    pub const VMCS_LINK_POINTER: u32 = 0x2800;
    pub const GUEST_DEBUGCTL: u32 = 0x2802;
    pub const GUEST_PAT: u32 = 0x2804;
    pub const GUEST_EFER: u32 = 0x2806;
    pub const HOST_PAT: u32 = 0x2c00;
    pub const HOST_EFER: u32 = 0x2c02;
    // 32-bit.
    pub const PIN_CONTROLS: u32 = 0x4000;
    pub const PROC_CONTROLS: u32 = 0x4002;
    pub const EXCEPTION_BITMAP: u32 = 0x4004;
    pub const EXIT_CONTROLS: u32 = 0x400c;
    pub const ENTRY_CONTROLS: u32 = 0x4012;
    pub const PROC2_CONTROLS: u32 = 0x401e;
    pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
    pub const EXIT_REASON: u32 = 0x4402;
    pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
    pub const EXIT_INTERRUPTION_ERROR: u32 = 0x4406;
    pub const EXIT_INSTRUCTION_LEN: u32 = 0x440c;
    pub const GUEST_ES_LIMIT: u32 = 0x4800;
    pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
    pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
    pub const GUEST_ES_AR: u32 = 0x4814;
    pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
    pub const GUEST_ACTIVITY: u32 = 0x4826;
    pub const GUEST_SYSENTER_CS: u32 = 0x482a;
    pub const GUEST_PREEMPTION_TIMER: u32 = 0x482e;
    pub const HOST_SYSENTER_CS: u32 = 0x4c00;
    // Natural width.
    pub const CR0_MASK: u32 = 0x6000;
    pub const CR4_MASK: u32 = 0x6002;
    pub const CR0_SHADOW: u32 = 0x6004;
    pub const CR4_SHADOW: u32 = 0x6006;
    pub const EXIT_QUALIFICATION: u32 = 0x6400;
    pub const GUEST_CR0: u32 = 0x6800;
    pub const GUEST_CR3: u32 = 0x6802;
    pub const GUEST_CR4: u32 = 0x6804;
    pub const GUEST_ES_BASE: u32 = 0x6806;
    pub const GUEST_GDTR_BASE: u32 = 0x6816;
    pub const GUEST_IDTR_BASE: u32 = 0x6818;
    pub const GUEST_DR7: u32 = 0x681a;
    pub const GUEST_RSP: u32 = 0x681c;
    pub const GUEST_RIP: u32 = 0x681e;
    pub const GUEST_RFLAGS: u32 = 0x6820;
    pub const GUEST_PENDING_DEBUG: u32 = 0x6822;
    pub const GUEST_SYSENTER_ESP: u32 = 0x6824;
    pub const GUEST_SYSENTER_EIP: u32 = 0x6826;
    pub const HOST_CR0: u32 = 0x6c00;
    pub const HOST_CR3: u32 = 0x6c02;
    pub const HOST_CR4: u32 = 0x6c04;
    pub const HOST_FS_BASE: u32 = 0x6c06;
    pub const HOST_GS_BASE: u32 = 0x6c08;
    pub const HOST_TR_BASE: u32 = 0x6c0a;
    pub const HOST_GDTR_BASE: u32 = 0x6c0c;
    pub const HOST_IDTR_BASE: u32 = 0x6c0e;
    pub const HOST_SYSENTER_ESP: u32 = 0x6c10;
    pub const HOST_SYSENTER_EIP: u32 = 0x6c12;
    pub const HOST_RSP: u32 = 0x6c14;
    pub const HOST_RIP: u32 = 0x6c16;

    /// The guest segment registers ES, CS, SS, DS, FS, GS, LDTR, TR are consecutive in each
    /// group (selector, limit, access rights, base), 2 apart (Appendix B).
    pub const fn segment(index: u32, group_base: u32) -> u32 {
        group_base + 2 * index
    }
}

/// One VMCS (or VMXON region): a 4 KiB frame whose first 31 bits hold the VMCS revision
/// identifier from IA32_VMX_BASIC (SDM §24.2, §24.11.5).
pub struct Vmcs {
    page: Frames,
}

impl Vmcs {
    /// A zeroed region stamped with `revision`, or `None` when memory is short.
    pub fn new(revision: u32) -> Option<Vmcs> {
        let page = Frames::alloc(1, 4096)?;
        page.write(0, &(revision & 0x7fff_ffff).to_le_bytes());
        Some(Vmcs { page })
    }

    pub fn pa(&self) -> u64 {
        self.page.pa()
    }

    /// The frame, for VMXON (which owns it for good).
    pub fn into_frames(self) -> Frames {
        self.page
    }
}

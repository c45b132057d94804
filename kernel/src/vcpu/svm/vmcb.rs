//! The VMCB (AMD APM vol 2 Appendix B) and the other pages SVM hardware reads: the host save
//! area and the I/O and MSR permission maps. Each is an owned run of frames; fields are written
//! through named setters at the offsets of Appendix B (Table B-1 control area, Table B-2 state
//! save area), so no code outside this file knows an offset.

use iommu::pgtable::{PageTable, X86FirstStage};

use crate::guest::memory::Frames;

/// Control-area offsets (Table B-1).
mod ctl {
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00c;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE_PA: usize = 0x040;
    pub const MSRPM_BASE_PA: usize = 0x048;
    pub const GUEST_ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05c;
    pub const VINTR: usize = 0x060;
    /// V_INTR_VECTOR, bits 7:0 (APM vol 2 Table B-1).
    pub const VINTR_VECTOR: usize = 0x064;
    /// Bit 0: the guest is in an interrupt shadow (after STI / MOV SS).
    pub const INTERRUPT_SHADOW: usize = 0x068;
    pub const EXITCODE: usize = 0x070;
    pub const EXITINFO1: usize = 0x078;
    pub const EXITINFO2: usize = 0x080;
    pub const EXITINTINFO: usize = 0x088;
    pub const NP_ENABLE: usize = 0x090;
    pub const EVENTINJ: usize = 0x0a8;
    pub const N_CR3: usize = 0x0b0;
    pub const NRIP: usize = 0x0c8;
}

/// State-save-area offsets (Table B-2).
mod save {
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const G_PAT: usize = 0x668;
}

/// Intercept bits, vector 3 (offset 0x00C) and vector 4 (offset 0x010), APM Table B-1.
pub mod intercept {
    pub const INTR: u32 = 1 << 0;
    /// Virtual interrupt taken (V_IRQ delivered to a guest that can take it), APM §15.21.4.
    pub const VINTR: u32 = 1 << 4;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;

    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const ICEBP: u32 = 1 << 8;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const XSETBV: u32 = 1 << 13;
}

/// A segment register in VMCB format: selector, attributes (descriptor bits 8-15 and 20-23
/// packed into 12 bits), limit, base (Table B-2, §15.5.1).
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// V_IRQ, bit 8 of the word at offset 0x60 (APM Table B-1): a virtual interrupt is offered;
/// the processor clears it when the guest takes the interrupt.
pub const V_IRQ: u64 = 1 << 8;

/// The exit fields of a VMCB after `#VMEXIT` (Table B-1 EXITCODE, EXITINFO1/2, EXITINTINFO,
/// nRIP; Table B-2 RIP, RAX).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitState {
    pub code: u64,
    pub info1: u64,
    pub info2: u64,
    pub int_info: u64,
    /// The V_TPR / V_IRQ / V_INTR_VECTOR word (offset 0x60), as the processor wrote it back.
    pub int_ctl: u64,
    pub next_rip: u64,
    pub rip: u64,
    pub rax: u64,
}

/// One VMCB page.
pub struct Vmcb {
    page: Frames,
}

impl Vmcb {
    /// A zeroed VMCB, or `None` when memory is short.
    pub fn new() -> Option<Vmcb> {
        Some(Vmcb {
            page: Frames::alloc(1, 4096)?,
        })
    }

    pub fn pa(&self) -> u64 {
        self.page.pa()
    }

    // Every 64-bit field of Appendix B is 8-aligned: one store each.
    fn w64(&mut self, off: usize, v: u64) {
        self.page.store_u64s([(off, v)]);
    }

    fn w32(&mut self, off: usize, v: u32) {
        self.page.write(off, &v.to_le_bytes());
    }

    fn w16(&mut self, off: usize, v: u16) {
        self.page.write(off, &v.to_le_bytes());
    }

    pub fn set_intercepts(&mut self, exceptions: u32, misc1: u32, misc2: u32) {
        self.w32(ctl::INTERCEPT_EXCEPTIONS, exceptions);
        self.w32(ctl::INTERCEPT_MISC1, misc1);
        self.w32(ctl::INTERCEPT_MISC2, misc2);
    }

    pub fn set_permission_maps(&mut self, maps: &PermissionMaps) {
        self.w64(ctl::IOPM_BASE_PA, maps.iopm.pa());
        self.w64(ctl::MSRPM_BASE_PA, maps.msrpm.pa());
    }

    /// Guest ASID (never 0: ASID 0 is the host's and VMRUN rejects it, §15.16) and the TLB
    /// control byte (0 = nothing, 1 = flush everything on this VMRUN).
    pub fn set_asid(&mut self, asid: u32, flush_all: bool) {
        // ASID (0x58, 4 bytes), TLB_CONTROL (0x5C, 1 byte) and three reserved zero bytes share
        // one 8-aligned word: one store.
        const _: () =
            assert!(ctl::GUEST_ASID.is_multiple_of(8) && ctl::TLB_CONTROL == ctl::GUEST_ASID + 4);
        self.w64(
            ctl::GUEST_ASID,
            u64::from(asid) | u64::from(flush_all) << 32,
        );
    }

    /// V_INTR_MASKING (bit 24 of offset 0x60): physical interrupts are masked by the host's
    /// RFLAGS.IF, never by the guest's, so a guest with IF = 0 is still preempted (§15.21.1).
    pub fn set_virtual_interrupt_masking(&mut self) {
        self.w32(ctl::VINTR, 1 << 24);
    }

    /// V_IRQ (APM vol 2 §15.21.4): `Some(vector)` offers the guest a virtual interrupt of
    /// that vector, with V_IGN_TPR (the virtual APIC's own priority check already allowed it).
    /// With `intercept` the VINTR intercept is set too, so that the guest exits as soon as it
    /// can take it (RFLAGS.IF = 1, no interrupt shadow) instead of taking it; without, it takes
    /// it through its IDT and the processor clears V_IRQ (read back as
    /// [`ExitState::int_ctl`]). `None` withdraws the offer and the intercept. V_INTR_MASKING
    /// stays set; V_TPR is kept.
    pub fn set_virtual_irq(&mut self, vector: Option<u8>, intercept: bool) {
        let [vintr, misc] = self.page.load_u64s([ctl::VINTR, ctl::INTERCEPT_EXCEPTIONS]);
        let tpr = vintr & 0xff;
        let misc1 = (misc >> 32) as u32;
        let (vintr, misc1) = match vector {
            Some(v) => (
                tpr | V_IRQ | u64::from(v >> 4) << 16 | 1 << 20 | 1 << 24 | u64::from(v) << 32,
                if intercept {
                    misc1 | intercept::VINTR
                } else {
                    misc1 & !intercept::VINTR
                },
            ),
            None => (tpr | 1 << 24, misc1 & !intercept::VINTR),
        };
        // VINTR (0x60) and V_INTR_VECTOR (0x64) share one 8-aligned word.
        const _: () = assert!(ctl::VINTR.is_multiple_of(8) && ctl::VINTR_VECTOR == ctl::VINTR + 4);
        self.w64(ctl::VINTR, vintr);
        if misc1 != (misc >> 32) as u32 {
            self.w32(ctl::INTERCEPT_MISC1, misc1);
        }
    }

    /// Whether the guest can take an external interrupt now: RFLAGS.IF = 1 and no
    /// interrupt shadow (APM vol 2 §15.20).
    pub fn interruptible(&self) -> bool {
        let [rflags, shadow] = self.page.load_u64s([save::RFLAGS, ctl::INTERRUPT_SHADOW]);
        rflags & 1 << 9 != 0 && shadow & 1 == 0
    }

    /// Ends an interrupt shadow: the instruction after STI / MOV SS was an intercepted one
    /// the backend completed (HLT in `sti; hlt`), so the shadow is over (as KVM does when it
    /// skips an emulated instruction).
    pub fn clear_interrupt_shadow(&mut self) {
        self.w64(ctl::INTERRUPT_SHADOW, 0);
    }

    /// The guest's RFLAGS.IF.
    pub fn interrupts_enabled(&self) -> bool {
        self.page.load_u64s([save::RFLAGS])[0] & 1 << 9 != 0
    }

    /// Nested paging on with `table` as nCR3 (§15.25.3). Takes the table itself, not an address,
    /// so the VMCB can only point at a nested table built by the engine.
    pub fn set_nested_paging(&mut self, table: &PageTable<X86FirstStage<4>>) {
        self.w64(ctl::NP_ENABLE, 1);
        self.w64(ctl::N_CR3, table.root());
    }

    /// What an exit handler reads, loaded together (one lookup of the page instead of one per
    /// field).
    pub fn exit_state(&self) -> ExitState {
        let [code, info1, info2, int_info, int_ctl, next_rip, rip, rax] = self.page.load_u64s([
            ctl::EXITCODE,
            ctl::EXITINFO1,
            ctl::EXITINFO2,
            ctl::EXITINTINFO,
            ctl::VINTR,
            ctl::NRIP,
            save::RIP,
            save::RAX,
        ]);
        ExitState {
            code,
            info1,
            info2,
            int_info,
            int_ctl,
            next_rip,
            rip,
            rax,
        }
    }

    /// Completes an emulated instruction: RAX and RIP in one go.
    pub fn set_rax_rip(&mut self, rax: u64, rip: u64) {
        self.page.store_u64s([(save::RAX, rax), (save::RIP, rip)]);
    }

    /// EVENTINJ (§15.20): an event to deliver to the guest at the next VMRUN (bit 31 valid).
    pub fn set_event_injection(&mut self, event: u64) {
        self.w64(ctl::EVENTINJ, event);
    }

    fn set_segment(&mut self, off: usize, s: Segment) {
        self.w16(off, s.selector);
        self.w16(off + 2, s.attrib);
        self.w32(off + 4, s.limit);
        self.w64(off + 8, s.base);
    }

    /// CS, then DS/ES/SS/FS/GS all `data`.
    pub fn set_segments(&mut self, code: Segment, data: Segment) {
        self.set_segment(save::CS, code);
        for off in [save::DS, save::ES, save::SS, save::FS, save::GS] {
            self.set_segment(off, data);
        }
    }

    pub fn set_tr(&mut self, tr: Segment) {
        self.set_segment(save::TR, tr);
    }

    pub fn set_ldtr(&mut self, ldtr: Segment) {
        self.set_segment(save::LDTR, ldtr);
    }

    pub fn set_gdtr(&mut self, base: u64, limit: u16) {
        self.set_segment(
            save::GDTR,
            Segment {
                selector: 0,
                attrib: 0,
                limit: limit.into(),
                base,
            },
        );
    }

    pub fn set_idtr(&mut self, base: u64, limit: u16) {
        self.set_segment(
            save::IDTR,
            Segment {
                selector: 0,
                attrib: 0,
                limit: limit.into(),
                base,
            },
        );
    }

    pub fn set_control_registers(&mut self, cr0: u64, cr3: u64, cr4: u64, efer: u64) {
        self.w64(save::CR0, cr0);
        self.w64(save::CR3, cr3);
        self.w64(save::CR4, cr4);
        self.w64(save::EFER, efer);
    }

    pub fn set_debug_registers(&mut self, dr6: u64, dr7: u64) {
        self.w64(save::DR6, dr6);
        self.w64(save::DR7, dr7);
    }

    pub fn set_guest_pat(&mut self, pat: u64) {
        self.w64(save::G_PAT, pat);
    }

    pub fn set_rip(&mut self, v: u64) {
        self.w64(save::RIP, v);
    }
    pub fn set_rsp(&mut self, v: u64) {
        self.w64(save::RSP, v);
    }
    pub fn set_rax(&mut self, v: u64) {
        self.w64(save::RAX, v);
    }
    pub fn set_rflags(&mut self, v: u64) {
        self.w64(save::RFLAGS, v);
    }
}

/// The host save area VM_HSAVE_PA points at (one page, contents processor-defined, §15.30.4).
pub struct HostSaveArea {
    page: Frames,
}

impl HostSaveArea {
    pub fn new() -> Option<HostSaveArea> {
        Some(HostSaveArea {
            page: Frames::alloc(1, 4096)?,
        })
    }

    pub fn pa(&self) -> u64 {
        self.page.pa()
    }
}

/// The I/O permission map (12 KiB: one bit per port plus the bits an access crossing port
/// 0xFFFF reads, §15.10.1) and the MSR permission map (8 KiB: read and write bits for the three
/// MSR ranges, §15.11), both all ones: every port and every MSR access exits. Shared by all VMs
/// (the processor only reads them).
pub struct PermissionMaps {
    iopm: Frames,
    msrpm: Frames,
}

impl PermissionMaps {
    pub fn new() -> Option<PermissionMaps> {
        let iopm = Frames::alloc(3, 4096)?;
        let msrpm = Frames::alloc(2, 4096)?;
        iopm.fill_bytes(0xff);
        msrpm.fill_bytes(0xff);
        Some(PermissionMaps { iopm, msrpm })
    }
}

//! ACCESS: an in-hypervisor DMA user (an emulated device) that reads and writes guest memory
//! through an IOAS's translations, without a hardware page table.
//!
//! Created by the hypervisor ([`Iommufd::create_access`]); it appears in the guest's object
//! table (so a guest can attach it with DEVICE_ATTACH/REPLACE/DETACH to an IOAS, and a
//! DESTROY of that IOAS names it as the blocker) but only the hypervisor destroys it.
//!
//! Switching IOAS is one assignment, made after every check has passed: DMA through the
//! access sees the old IOAS or the new one, never none (Linux has a window without an IOAS,
//! during which pins fail). A REPLACE or DETACH while pins are held fails with EBUSY instead of
//! revoking them behind the emulated device's back.
//!
//! A pin (`access_pin`) keeps the mappings it covers from being unmapped (UNMAP fails with
//! EBUSY, naming the ACCESS) until `access_unpin` with exactly the same range.

use hvabi::{errno, kind, reason};

use super::hw::Span;
use super::ioas::{PROT_READ, PROT_WRITE};
use super::object::Object;
use super::{Cx, Error, GuestId, GuestMemory, IommuHw, Iommufd, MAX_PINS_PER_ACCESS, PAGE, inval};

pub struct Access {
    pub(crate) ioas: Option<u32>,
    pub(crate) pins: [Option<Span>; MAX_PINS_PER_ACCESS],
}

impl Access {
    pub fn ioas(&self) -> Option<u32> {
        self.ioas
    }
    pub fn pins(&self) -> impl Iterator<Item = Span> + '_ {
        self.pins.iter().flatten().copied()
    }
    fn pinned(&self) -> bool {
        self.pins.iter().any(Option::is_some)
    }
}

fn busy_pinned(id: u32) -> Error {
    Error::new(errno::EBUSY, reason::PINNED).obj(kind::ACCESS, id)
}

impl<H: IommuHw> Cx<'_, H> {
    pub(crate) fn access_attach(&mut self, id: u32, ioas_id: u32) -> Result<(), Error> {
        if self.g.access(id)?.ioas.is_some() {
            return Err(Error::new(errno::EBUSY, reason::ALREADY_ATTACHED));
        }
        self.g.ioas(ioas_id)?;
        self.g.ioas_mut(ioas_id)?.accesses += 1;
        self.g.access_mut(id)?.ioas = Some(ioas_id);
        Ok(())
    }

    pub(crate) fn access_replace(&mut self, id: u32, ioas_id: u32) -> Result<(), Error> {
        let a = self.g.access(id)?;
        let old = a.ioas.ok_or(inval(reason::NOT_ATTACHED))?;
        if old == ioas_id {
            return Ok(());
        }
        if a.pinned() {
            return Err(busy_pinned(id));
        }
        self.g.ioas(ioas_id)?;
        // Every check passed: switch with one assignment.
        self.g.ioas_mut(ioas_id)?.accesses += 1;
        if let Ok(o) = self.g.ioas_mut(old) {
            o.accesses -= 1;
        }
        self.g.access_mut(id)?.ioas = Some(ioas_id);
        Ok(())
    }

    pub(crate) fn access_detach(&mut self, id: u32) -> Result<(), Error> {
        let a = self.g.access(id)?;
        let Some(old) = a.ioas else {
            return Ok(());
        };
        if a.pinned() {
            return Err(busy_pinned(id));
        }
        if let Ok(o) = self.g.ioas_mut(old) {
            o.accesses -= 1;
        }
        self.g.access_mut(id)?.ioas = None;
        Ok(())
    }

    /// Resolves `[iova, iova + len)` of the access's IOAS to guest-physical pieces, checking
    /// that it is covered and allows `prot`; `f(gpa, offset, len)` per piece.
    fn access_walk(
        &self,
        id: u32,
        iova: u64,
        len: u64,
        prot: u8,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let ioas_id = self
            .g
            .access(id)?
            .ioas
            .ok_or(Error::new(errno::ENOENT, reason::NOT_ATTACHED))?;
        if len == 0 {
            return Err(inval(reason::ZERO_LENGTH));
        }
        let span =
            Span::from_len(iova, len).ok_or(Error::new(errno::EOVERFLOW, reason::OVERFLOW))?;
        let ioas = self.g.ioas(ioas_id)?;
        ioas.covered(span, |a, _| {
            if a.prot & prot != prot {
                return Err(Error::new(errno::EPERM, reason::NO_PROT).at(a.iova));
            }
            Ok(())
        })?;
        ioas.covered(span, |a, piece| {
            f(
                a.gpa + (piece.start - a.iova),
                piece.start - iova,
                piece.len(),
            )
        })
    }

    pub(crate) fn access_pin(&mut self, id: u32, iova: u64, len: u64) -> Result<(), Error> {
        if !iova.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(inval(reason::MISALIGNED));
        }
        self.access_walk(id, iova, len, 0, |_, _, _| Ok(()))?;
        let a = self.g.access(id)?;
        let slot = a
            .pins
            .iter()
            .position(Option::is_none)
            .ok_or(Error::new(errno::ENOSPC, reason::TOO_MANY))?;
        let ioas_id = a.ioas.ok_or(inval(reason::NOT_ATTACHED))?;
        let span = Span::new(iova, iova + (len - 1));
        self.g.ioas_mut(ioas_id)?.add_pins(span, 1);
        self.g.access_mut(id)?.pins[slot] = Some(span);
        Ok(())
    }

    pub(crate) fn access_unpin(&mut self, id: u32, iova: u64, len: u64) -> Result<(), Error> {
        let span = Span::from_len(iova, len).ok_or(inval(reason::ZERO_LENGTH))?;
        let a = self.g.access(id)?;
        let slot = a
            .pins
            .iter()
            .position(|p| *p == Some(span))
            .ok_or(inval(reason::NOT_MAPPED))?;
        let ioas_id = a.ioas.ok_or(inval(reason::NOT_ATTACHED))?;
        self.g.ioas_mut(ioas_id)?.add_pins(span, -1);
        self.g.access_mut(id)?.pins[slot] = None;
        Ok(())
    }
}

impl<H: IommuHw> Iommufd<H> {
    /// Creates an ACCESS in `gid`'s table (not attached).
    pub fn create_access(&mut self, gid: GuestId) -> Result<u32, Error> {
        let cx = self.cx(gid)?;
        let fail = cx.fail;
        let slot = cx.g.objs.reserve(|| !fail.is_some_and(|f| f.hit()))?;
        Ok(cx.g.objs.publish(
            slot,
            Object::Access(Access {
                ioas: None,
                pins: [None; MAX_PINS_PER_ACCESS],
            }),
        ))
    }

    /// Destroys an ACCESS: EBUSY while it holds pins; detaches it otherwise.
    pub fn destroy_access(&mut self, gid: GuestId, id: u32) -> Result<(), Error> {
        let mut cx = self.cx(gid)?;
        cx.access_detach(id)?;
        cx.g.objs.remove(id);
        Ok(())
    }

    pub fn access_attach(&mut self, gid: GuestId, id: u32, ioas: u32) -> Result<(), Error> {
        self.cx(gid)?.access_attach(id, ioas)
    }

    pub fn access_replace(&mut self, gid: GuestId, id: u32, ioas: u32) -> Result<(), Error> {
        self.cx(gid)?.access_replace(id, ioas)
    }

    pub fn access_detach(&mut self, gid: GuestId, id: u32) -> Result<(), Error> {
        self.cx(gid)?.access_detach(id)
    }

    /// The IOAS the access uses now.
    pub fn access_ioas(&mut self, gid: GuestId, id: u32) -> Option<u32> {
        self.cx(gid).ok()?.g.access(id).ok()?.ioas
    }

    /// Pins `[iova, iova + len)` (page aligned, fully mapped) against UNMAP.
    pub fn access_pin(&mut self, gid: GuestId, id: u32, iova: u64, len: u64) -> Result<(), Error> {
        self.cx(gid)?.access_pin(id, iova, len)
    }

    /// Releases a pin made with exactly this range.
    pub fn access_unpin(
        &mut self,
        gid: GuestId,
        id: u32,
        iova: u64,
        len: u64,
    ) -> Result<(), Error> {
        self.cx(gid)?.access_unpin(id, iova, len)
    }

    /// Emulated DMA read: `buf.len()` bytes at `iova` of the access's IOAS, at any byte
    /// alignment. The whole range must be mapped readable (nothing is read otherwise).
    pub fn access_read(
        &mut self,
        gid: GuestId,
        mem: &dyn GuestMemory,
        id: u32,
        iova: u64,
        buf: &mut [u8],
    ) -> Result<(), Error> {
        let cx = self.cx(gid)?;
        cx.access_walk(id, iova, buf.len() as u64, PROT_READ, |gpa, off, n| {
            let b = buf
                .get_mut(off as usize..(off + n) as usize)
                .ok_or(inval(reason::NONE))?;
            mem.read(gpa, b)
                .map_err(|_| Error::new(errno::EFAULT, reason::GPA_NOT_OWNED).at(gpa))
        })
    }

    /// Emulated DMA write: as [`access_read`](Self::access_read), needs WRITE permission on the
    /// whole range (nothing is written otherwise).
    pub fn access_write(
        &mut self,
        gid: GuestId,
        mem: &dyn GuestMemory,
        id: u32,
        iova: u64,
        buf: &[u8],
    ) -> Result<(), Error> {
        let cx = self.cx(gid)?;
        cx.access_walk(id, iova, buf.len() as u64, PROT_WRITE, |gpa, off, n| {
            let b = buf
                .get(off as usize..(off + n) as usize)
                .ok_or(inval(reason::NONE))?;
            mem.write(gpa, b)
                .map_err(|_| Error::new(errno::EFAULT, reason::GPA_NOT_OWNED).at(gpa))
        })
    }
}

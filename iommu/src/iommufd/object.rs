//! The object enum and typed lookups.

use hvabi::{errno, kind, reason};

use super::Error;
use super::access::Access;
use super::device::Device;
use super::group::Group;
use super::hwpt::Hwpt;
use super::ioas::Ioas;
use super::table::Table;

pub(crate) enum Object {
    Ioas(Ioas),
    Hwpt(Hwpt),
    Device(Device),
    Group(Group),
    Access(Access),
}

impl Object {
    pub fn kind(&self) -> u32 {
        match self {
            Object::Ioas(_) => kind::IOAS,
            Object::Hwpt(_) => kind::HWPT,
            Object::Device(_) => kind::DEVICE,
            Object::Group(_) => kind::GROUP,
            Object::Access(_) => kind::ACCESS,
        }
    }
}

/// One guest's objects.
pub(crate) struct Guest {
    pub objs: Table,
}

fn missing(id: u32) -> Error {
    Error::new(errno::ENOENT, reason::BAD_ID).obj(kind::NONE, id)
}

fn wrong(o: &Object, id: u32) -> Error {
    Error::new(errno::ENOENT, reason::WRONG_KIND).obj(o.kind(), id)
}

macro_rules! lookup {
    ($get:ident, $get_mut:ident, $variant:ident, $ty:ty) => {
        pub fn $get(&self, id: u32) -> Result<&$ty, Error> {
            match self.objs.get(id) {
                Some(Object::$variant(x)) => Ok(x),
                Some(o) => Err(wrong(o, id)),
                None => Err(missing(id)),
            }
        }
        pub fn $get_mut(&mut self, id: u32) -> Result<&mut $ty, Error> {
            match self.objs.get_mut(id) {
                Some(Object::$variant(x)) => Ok(x),
                Some(o) => Err(wrong(o, id)),
                None => Err(missing(id)),
            }
        }
    };
}

impl Guest {
    lookup!(ioas, ioas_mut, Ioas, Ioas);
    lookup!(hwpt, hwpt_mut, Hwpt, Hwpt);
    lookup!(device, device_mut, Device, Device);
    lookup!(group, group_mut, Group, Group);
    lookup!(access, access_mut, Access, Access);

    /// The kind of `id`, or ENOENT.
    pub fn kind_of(&self, id: u32) -> Result<u32, Error> {
        self.objs
            .get(id)
            .map(Object::kind)
            .ok_or_else(|| missing(id))
    }
}

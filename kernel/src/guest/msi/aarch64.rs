//! aarch64: guest MSI delivery (the ITS doorbell in the device's stage 2, virtual LPIs or
//! list registers) is not built yet; every route is refused, so a guest's device keeps its
//! MSI disabled and cannot raise anything.

use alloc::string::String;

use super::{Device, GuestMsi, HostMsi};

pub fn route(_dev: Device, _msi: GuestMsi) -> Result<HostMsi, String> {
    Err(
        "MSI delivery to aarch64 guests is not implemented (the device's MSI stays disabled)"
            .into(),
    )
}

pub fn unroute(_dev: Device) {}

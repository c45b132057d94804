//! Reconciling two firmware descriptions of where a requester ID's DMA goes. On aarch64 the
//! ACPI IORT and the device tree's `iommu-map` each map a PCI requester ID to an SMMU and a
//! StreamID; both describe the same wiring, so when both answer they must agree. A
//! disagreement means one of them is wrong, and programming the SMMU from the wrong one would
//! leave the device's DMA untranslated (or another device's translated for it): the boot is
//! refused rather than guessing.

/// One description's answer: the IOMMU's register base and the ID the IOMMU sees.
pub type IommuTarget = (u64, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdAgreement {
    /// Both describe the ID, identically.
    Agree(IommuTarget),
    /// Only one description covers the ID (the other is absent or has no mapping for it).
    OnlyIort(IommuTarget),
    OnlyDeviceTree(IommuTarget),
    /// Both cover it, differently.
    Disagree {
        iort: IommuTarget,
        device_tree: IommuTarget,
    },
    /// Neither covers it: the ID's DMA is not translated by any described IOMMU.
    Neither,
}

impl IdAgreement {
    pub const fn reconcile(iort: Option<IommuTarget>, device_tree: Option<IommuTarget>) -> Self {
        match (iort, device_tree) {
            (Some(a), Some(b)) if a.0 == b.0 && a.1 == b.1 => Self::Agree(a),
            (Some(iort), Some(device_tree)) => Self::Disagree { iort, device_tree },
            (Some(a), None) => Self::OnlyIort(a),
            (None, Some(b)) => Self::OnlyDeviceTree(b),
            (None, None) => Self::Neither,
        }
    }

    /// The target to program, or `Err` when the descriptions conflict and the boot must stop.
    pub const fn target(self) -> Result<Option<IommuTarget>, (IommuTarget, IommuTarget)> {
        match self {
            Self::Agree(t) | Self::OnlyIort(t) | Self::OnlyDeviceTree(t) => Ok(Some(t)),
            Self::Neither => Ok(None),
            Self::Disagree { iort, device_tree } => Err((iort, device_tree)),
        }
    }

    /// Both descriptions were consulted and matched.
    pub const fn is_agreement(self) -> bool {
        matches!(self, Self::Agree(_))
    }
}

#[cfg(test)]
mod tests {
    use super::IdAgreement;

    const SMMU: u64 = 0x0905_0000;

    #[test]
    fn reconcile_every_combination() {
        let a = (SMMU, 0x0100);
        assert_eq!(
            IdAgreement::reconcile(Some(a), Some(a)).target(),
            Ok(Some(a))
        );
        assert!(IdAgreement::reconcile(Some(a), Some(a)).is_agreement());
        assert_eq!(IdAgreement::reconcile(Some(a), None).target(), Ok(Some(a)));
        assert_eq!(IdAgreement::reconcile(None, Some(a)).target(), Ok(Some(a)));
        assert!(!IdAgreement::reconcile(None, Some(a)).is_agreement());
        assert_eq!(IdAgreement::reconcile(None, None).target(), Ok(None));
        // Same SMMU, different StreamID; same StreamID, different SMMU: both refuse.
        let other_sid = (SMMU, 0x0108);
        assert_eq!(
            IdAgreement::reconcile(Some(a), Some(other_sid)).target(),
            Err((a, other_sid))
        );
        let other_smmu = (0x0906_0000, 0x0100);
        assert_eq!(
            IdAgreement::reconcile(Some(a), Some(other_smmu)),
            IdAgreement::Disagree {
                iort: a,
                device_tree: other_smmu
            }
        );
    }
}

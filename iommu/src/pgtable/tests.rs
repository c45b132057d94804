//! Unit tests of the pieces that need no table memory: geometries, templates, root info.
//! The engine itself is tested through the public API in `iommu/tests/pgtable_*.rs`.

use super::format::{Format, arm_bits, vtd_bits, x86_bits};
use super::*;

#[test]
fn vtd_geometry_by_levels() {
    for (levels, ias) in [(3u32, 39u32), (4, 48), (5, 57)] {
        let cfg = Config::new(ias, 46);
        let g = match levels {
            3 => VtdSecondStage::<3>::geometry(&cfg),
            4 => VtdSecondStage::<4>::geometry(&cfg),
            _ => VtdSecondStage::<5>::geometry(&cfg),
        }
        .unwrap();
        assert_eq!(
            (g.levels, g.root_entries, g.root_bytes),
            (levels, 512, 4096)
        );
    }
    assert_eq!(
        VtdSecondStage::<3>::geometry(&Config::new(40, 46)),
        Err(ConfigError::InputSize)
    );
    assert_eq!(
        VtdSecondStage::<6>::geometry(&Config::new(40, 46)),
        Err(ConfigError::Format)
    );
}

#[test]
fn x86_geometry_is_lower_half() {
    assert!(X86FirstStage::<4>::geometry(&Config::new(47, 46)).is_ok());
    assert_eq!(
        X86FirstStage::<4>::geometry(&Config::new(48, 46)),
        Err(ConfigError::InputSize)
    );
    assert!(X86FirstStage::<5>::geometry(&Config::new(56, 52)).is_ok());
}

#[test]
fn arm_stage2_concatenates_instead_of_adding_a_level() {
    // (granule, ias) -> (levels, root entries): Arm ARM D8.2 concatenation for stage 2.
    let cases: &[(u32, u32, u32, usize)] = &[
        (12, 48, 4, 512),
        (12, 44, 4, 32),
        (12, 43, 3, 8192), // 16 tables at level 1
        (12, 40, 3, 1024), // 2 tables at level 1
        (12, 39, 3, 512),
        (12, 34, 2, 8192), // 16 tables at level 2
        (12, 32, 2, 2048),
        (16, 52, 3, 1024),
        (16, 48, 3, 64),
        (16, 46, 2, 131072), // 16 × 8192 at level 2
        (14, 48, 3, 4096),   // 2 tables of 2048 at level 1
        (14, 40, 2, 32768),
    ];
    for &(g, ias, levels, entries) in cases {
        let cfg = Config::new(ias, 48);
        let geo = match g {
            12 => ArmStage2::<12>::geometry(&cfg),
            14 => ArmStage2::<14>::geometry(&cfg),
            _ => ArmStage2::<16>::geometry(&cfg),
        }
        .unwrap();
        assert_eq!(
            (geo.levels, geo.root_entries),
            (levels, entries),
            "g={g} ias={ias}"
        );
        assert_eq!(geo.root_bytes, (entries * 8).max(1 << g));
        assert!(geo.root_bytes <= 16 << g, "at most 16 concatenated tables");
    }
    // Stage 1 never concatenates: 40 bits with 4 KiB = 4 levels, 2-entry root.
    let s1 = ArmStage1::<12>::geometry(&Config::new(40, 48)).unwrap();
    assert_eq!((s1.levels, s1.root_entries, s1.root_bytes), (4, 2, 4096));
}

#[test]
fn arm_pa_sizes() {
    assert_eq!(format::arm_pa_bits(0), Some(32));
    assert_eq!(format::arm_pa_bits(5), Some(48));
    assert_eq!(format::arm_pa_bits(6), Some(52));
    assert_eq!(format::arm_pa_bits(7), None);
}

#[test]
fn templates_follow_the_specs() {
    let cfg = Config {
        snoop_control: true,
        memory_types: true,
        ..Config::new(48, 46)
    };
    let rw = Prot::READ | Prot::WRITE;
    let v = VtdSecondStage::<4>::leaf_template(rw | Prot::SNOOP, &cfg, true).unwrap();
    assert_eq!(
        v,
        vtd_bits::R | vtd_bits::W | vtd_bits::SNP | vtd_bits::PS | (6 << 3)
    );
    assert_eq!(
        VtdSecondStage::<4>::leaf_template(Prot::SNOOP | Prot::READ, &Config::new(48, 46), false),
        Err(MapError::Unsupported)
    );
    assert_eq!(
        X86FirstStage::<4>::leaf_template(Prot::WRITE, &cfg, false),
        Err(MapError::InvalidProt)
    );
    let x = X86FirstStage::<4>::leaf_template(rw | Prot::DEVICE, &cfg, false).unwrap();
    assert_eq!(
        x,
        x86_bits::P
            | x86_bits::RW
            | x86_bits::US
            | x86_bits::A
            | x86_bits::D
            | x86_bits::PCD
            | x86_bits::PWT
    );
    let a = ArmStage1::<12>::leaf_template(Prot::READ, &cfg, false).unwrap();
    assert_eq!(
        a,
        arm_bits::VALID
            | arm_bits::PAGE
            | arm_bits::AF
            | arm_bits::SH_INNER
            | (arm_bits::MAIR_IDX_WB << 2)
            | arm_bits::AP_RDONLY
            | arm_bits::AP_UNPRIV
            | arm_bits::NG
            | arm_bits::PXN
            | arm_bits::UXN
    );
    let s2 = ArmStage2::<12>::leaf_template(Prot::WRITE, &cfg, true).unwrap();
    assert_eq!(
        s2,
        arm_bits::VALID
            | arm_bits::AF
            | arm_bits::SH_INNER
            | (0b1111 << 2)
            | arm_bits::S2AP_W
            | arm_bits::S2XN
    );
}

#[test]
fn arm_64k_granule_encodes_52_bit_addresses() {
    let pa = 0x000f_1234_5678_0000u64;
    let bits = ArmStage2::<16>::oa_bits(pa);
    assert_eq!(
        bits & 0xf000,
        0xf000,
        "PA[51:48] in descriptor bits [15:12]"
    );
    assert_eq!(ArmStage2::<16>::entry_addr(bits | 3), pa);
}

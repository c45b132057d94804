//! Bit-exact format tests: the engine maps, an independent reference walker (written from the
//! specifications, `pgtable_support/refwalk.rs`) translates, and every leaf size, permission,
//! attribute, SNP bit and contiguous run is checked against values written out here from the
//! specifications' field tables.

#[path = "pgtable_support/mod.rs"]
mod support;

mod pgtable {
    use super::support::HostPool;
    use super::support::refwalk::{self, ArmRegime, Fault};
    use iommu::pgtable::{
        ArmStage1, ArmStage2, Config, Format, Gather, PageTable, Prot, VtdSecondStage,
        X86FirstStage,
    };

    const K4: u64 = 4 << 10;
    const K64: u64 = 64 << 10;
    const M2: u64 = 2 << 20;
    const G1: u64 = 1 << 30;

    fn rw() -> Prot {
        Prot::READ | Prot::WRITE
    }

    /// One mapping and the leaves it must produce: (offset into the mapping, leaf size).
    struct Case {
        iova: u64,
        pa: u64,
        len: u64,
        prot: Prot,
        leaves: Vec<(u64, u64)>,
    }

    fn leaves(spec: &[(u64, u64)]) -> Vec<(u64, u64)> {
        // (count, size) pairs → (offset, size) list.
        let mut off = 0;
        let mut v = Vec::new();
        for &(count, size) in spec {
            for _ in 0..count {
                v.push((off, size));
                off += size;
            }
        }
        v
    }

    /// Maps every case, then calls `check(case, leaf offset, leaf size, probe iova)` at the
    /// first and last granule of every expected leaf.
    fn run<F: Format>(
        pool: &HostPool,
        cfg: Config,
        cases: &[Case],
        mut check: impl FnMut(&PageTable<F>, &Case, u64, u64, u64),
    ) -> PageTable<F> {
        let pt = PageTable::<F>::new(pool, cfg).unwrap();
        for c in cases {
            pt.map(pool, c.iova, c.pa, c.len, c.prot)
                .unwrap_or_else(|e| panic!("map {:#x}+{:#x}: {e:?}", c.iova, c.len));
            let total: u64 = c.leaves.iter().map(|l| l.1).sum();
            assert_eq!(total, c.len, "case leaves must cover the mapping");
        }
        let g = 1u64 << F::GRANULE_SHIFT;
        for c in cases {
            for (n, &(off, size)) in c.leaves.iter().enumerate() {
                // Under miri (~0.1 ms per atomic access) sample long runs of leaves: the first,
                // the last and every 17th. Natively, every leaf.
                if cfg!(miri) && c.leaves.len() > 32 && n % 17 != 0 && n + 1 != c.leaves.len() {
                    continue;
                }
                for probe in [c.iova + off, c.iova + off + size - g] {
                    check(&pt, c, off, size, probe);
                    // The engine's own lookup agrees with the reference walk.
                    assert_eq!(pt.iova_to_phys(pool, probe), Some(c.pa + (probe - c.iova)));
                }
            }
        }
        pt
    }

    fn destroy<F: Format>(pool: &HostPool, pt: PageTable<F>) {
        pt.destroy(pool);
        assert_eq!(pool.frames_in_use(), 0, "destroy returned every table page");
    }

    // --------------------------------------------------------------------------------------
    // VT-d second stage
    // --------------------------------------------------------------------------------------

    /// VT-d §9.8 leaf: R bit 0, W bit 1, X bit 2, EMT 5:3, IPAT 6, PS 7, SNP 11, ADDR [HAW-1:12].
    fn vtd_leaf(pa: u64, r: bool, w: bool, x: bool, emt: u64, ps: bool, snp: bool) -> u64 {
        pa | r as u64
            | (w as u64) << 1
            | (x as u64) << 2
            | emt << 3
            | (ps as u64) << 7
            | (snp as u64) << 11
    }

    fn vtd_cases(top: u64) -> Vec<Case> {
        vec![
            // A single read-only page.
            Case {
                iova: 0x1000,
                pa: 0x1234_5000,
                len: K4,
                prot: Prot::READ,
                leaves: leaves(&[(1, K4)]),
            },
            // Write-only is expressible in VT-d second stage.
            Case {
                iova: 0x3000,
                pa: 0x7000,
                len: K4,
                prot: Prot::WRITE,
                leaves: leaves(&[(1, K4)]),
            },
            // Three pages, forced snoop.
            Case {
                iova: 0x10000,
                pa: 0x2000_0000,
                len: 3 * K4,
                prot: rw() | Prot::SNOOP,
                leaves: leaves(&[(3, K4)]),
            },
            // 2 MiB superpage, executable.
            Case {
                iova: 0x4020_0000,
                pa: 0x8000_0000,
                len: M2,
                prot: rw() | Prot::EXEC,
                leaves: leaves(&[(1, M2)]),
            },
            // 2 MiB of 4 KiB pages: the output address is only 4 KiB aligned.
            Case {
                iova: 0x4060_0000,
                pa: 0x8040_1000,
                len: M2,
                prot: rw(),
                leaves: leaves(&[(512, K4)]),
            },
            // 1 GiB superpage, device memory (EMT UC).
            Case {
                iova: 0x80_0000_0000,
                pa: 0x40_0000_0000,
                len: G1,
                prot: rw() | Prot::DEVICE,
                leaves: leaves(&[(1, G1)]),
            },
            // Mixed: 4K, 1G, 2M, 4K, NONCACHED (EMT WC). Crosses a 4 GiB boundary.
            Case {
                iova: 0x1_0000_0000 - K4,
                pa: 0x2_0000_0000 - K4,
                len: K4 + G1 + M2 + K4,
                prot: rw() | Prot::NONCACHED,
                leaves: leaves(&[(1, K4), (1, G1), (1, M2), (1, K4)]),
            },
            // Near the top of the input space.
            Case {
                iova: top - M2,
                pa: 0xc0_0000,
                len: M2,
                prot: Prot::READ,
                leaves: leaves(&[(1, M2)]),
            },
        ]
    }

    fn vtd_check<const L: u32>(haw: u32) {
        let pool = HostPool::new(64);
        let ias = 12 + 9 * L;
        let cfg = Config {
            snoop_control: true,
            memory_types: true,
            execute_control: true,
            ..Config::new(ias, haw)
        };
        let mut cases = vtd_cases(1u64 << ias);
        cases.retain(|c| c.iova + c.len <= 1 << ias && c.pa + c.len <= 1 << haw);
        assert!(cases.len() >= 7);
        let pt = run::<VtdSecondStage<L>>(&pool, cfg, &cases, |pt, c, off, size, probe| {
            let w = refwalk::vtd_ss(&pool, pt.root(), L, haw, probe).unwrap();
            let leaf_pa = c.pa + off;
            assert_eq!(w.pa, c.pa + (probe - c.iova));
            assert_eq!(w.page_size, size);
            let emt = if c.prot.contains(Prot::DEVICE) {
                0
            } else if c.prot.contains(Prot::NONCACHED) {
                1
            } else {
                6
            };
            let want = vtd_leaf(
                leaf_pa,
                c.prot.contains(Prot::READ),
                c.prot.contains(Prot::WRITE),
                c.prot.contains(Prot::EXEC),
                emt,
                size > K4,
                c.prot.contains(Prot::SNOOP),
            );
            assert_eq!(w.leaf, want, "leaf at {probe:#x}");
            assert_eq!(
                (w.read, w.write, w.exec),
                (
                    c.prot.contains(Prot::READ),
                    c.prot.contains(Prot::WRITE),
                    c.prot.contains(Prot::EXEC)
                )
            );
            assert_eq!(w.snp, c.prot.contains(Prot::SNOOP));
            assert!(!w.ipat && !w.dirty);
        });
        // Non-leaf entries grant R, W and X (execute control on) and nothing else.
        let mut table = pt.root();
        let iova = 0x1000u64;
        for l in (2..=L).rev() {
            let e = pool.read_phys(table + ((iova >> (12 + 9 * (l - 1))) & 0x1ff) * 8);
            assert_eq!(e & 0xfff, 0b111, "table entry at VT-d level {l}");
            table = e & 0x000f_ffff_ffff_f000;
        }
        // Holes are holes.
        assert_eq!(
            refwalk::vtd_ss(&pool, pt.root(), L, haw, 0x2000),
            Err(Fault::NotPresent { level: 1 })
        );
        destroy(&pool, pt);
    }

    #[test]
    fn vtd_second_stage_3_levels() {
        vtd_check::<3>(39);
    }
    #[test]
    fn vtd_second_stage_4_levels() {
        vtd_check::<4>(46);
    }
    #[test]
    fn vtd_second_stage_5_levels() {
        vtd_check::<5>(52);
    }

    // --------------------------------------------------------------------------------------
    // Intel EPT (SDM vol 3C §29.3.2-29.3.3), which the VMX backend builds with the VT-d
    // second-stage format: a reference EPT walker written from the SDM's entry tables, checking
    // what the processor would do with the table, including every EPT-misconfiguration rule.
    // --------------------------------------------------------------------------------------

    /// What a 4-level EPT walk of a guest-physical address gives.
    #[derive(Debug, PartialEq, Eq)]
    enum Ept {
        /// Translation: output address, page size, R/W/X (AND over the walk), memory type
        /// (leaf bits 5:3), ignore-PAT (leaf bit 6).
        Leaf {
            pa: u64,
            size: u64,
            r: bool,
            w: bool,
            x: bool,
            memtype: u64,
            ipat: bool,
        },
        /// Bits 2:0 of an entry are 0 at this level (4 = PML4E ... 1 = PTE): EPT violation.
        Violation(u32),
        /// An EPT misconfiguration (§29.3.3.1) at this level: the processor would not walk on.
        Misconfig(u32, &'static str),
    }

    /// SDM Tables 29-1..29-6 with MAXPHYADDR `maxphy`, no mode-based execute control.
    fn ept_walk(pool: &HostPool, pml4: u64, maxphy: u32, gpa: u64) -> Ept {
        let addr_mask = ((1u64 << maxphy) - 1) & !0xfff;
        // Bits 51:MAXPHYADDR of every entry are reserved (must be 0).
        let reserved_high = ((1u64 << 52) - 1) & !((1u64 << maxphy) - 1);
        let (mut table, mut r, mut w, mut x) = (pml4, true, true, true);
        for level in (1..=4u32).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = pool.read_phys(table + ((gpa >> shift) & 0x1ff) * 8);
            if e & 0b111 == 0 {
                return Ept::Violation(level);
            }
            // Write without read (010b, 110b) is a misconfiguration (§29.3.3.1).
            if e & 0b011 == 0b010 {
                return Ept::Misconfig(level, "write without read");
            }
            if e & reserved_high != 0 {
                return Ept::Misconfig(level, "address bits above MAXPHYADDR");
            }
            (r, w, x) = (r && e & 1 != 0, w && e & 2 != 0, x && e & 4 != 0);
            let leaf = level == 1 || (level <= 3 && e & (1 << 7) != 0);
            if !leaf {
                // PML4E bits 7:3 and non-leaf PDPTE/PDE bits 6:3 (with bit 7 = 0) are reserved.
                if e & 0xf8 != 0 {
                    return Ept::Misconfig(level, "reserved bits 7:3 in a table entry");
                }
                table = e & addr_mask;
                continue;
            }
            let memtype = (e >> 3) & 7;
            if matches!(memtype, 2 | 3 | 7) {
                return Ept::Misconfig(level, "reserved memory type");
            }
            let size = 1u64 << shift;
            // A 1 GiB / 2 MiB leaf has bits 29:12 / 20:12 reserved.
            if e & (size - 1) & !0xfff & addr_mask != 0 {
                return Ept::Misconfig(level, "reserved low address bits of a large page");
            }
            return Ept::Leaf {
                pa: (e & addr_mask & !(size - 1)) | (gpa & (size - 1)),
                size,
                r,
                w,
                x,
                memtype,
                ipat: e & (1 << 6) != 0,
            };
        }
        unreachable!()
    }

    #[test]
    fn vtd_second_stage_is_valid_ept_as_the_vmx_backend_configures_it() {
        // The VMX backend's configuration (kernel/src/vcpu/vmx): 48-bit GPAs (4-level walk),
        // memory types and execute permission written, 4K/2M/1G leaves, MAXPHYADDR 40.
        let maxphy = 40;
        let pool = HostPool::new(64);
        let cfg = Config {
            memory_types: true,
            execute_control: true,
            leaf_sizes: K4 | M2 | G1,
            ..Config::new(48, maxphy)
        };
        let pt = PageTable::<VtdSecondStage<4>>::new(&pool, cfg).unwrap();
        let rwx = rw() | Prot::EXEC;
        // (gpa, hpa, len, prot): guest RAM as 4K pages and a 2M block, a 1G block, a device BAR
        // (uncacheable), a read-only page.
        let maps = [
            (0x0, 0x7_0000_0000, 0x20_0000 - K4, rwx),
            (0x20_0000, 0x7_4000_0000, M2, rwx),
            (G1, 0x8_0000_0000, G1, rwx),
            (0xfebf_0000, 0xfebf_0000, K4, rw() | Prot::DEVICE),
            (0x1_0000_0000, 0x9_0000_1000, K4, Prot::READ),
        ];
        for &(gpa, hpa, len, prot) in &maps {
            pt.map(&pool, gpa, hpa, len, prot).unwrap();
        }
        for &(gpa, hpa, len, prot) in &maps {
            for probe in [gpa, gpa + len / 2 + 8, gpa + len - 8] {
                let Ept::Leaf {
                    pa,
                    size,
                    r,
                    w,
                    x,
                    memtype,
                    ipat,
                } = ept_walk(&pool, pt.root(), maxphy, probe)
                else {
                    panic!(
                        "{probe:#x}: {:?}",
                        ept_walk(&pool, pt.root(), maxphy, probe)
                    );
                };
                assert_eq!(pa, hpa + (probe - gpa), "{probe:#x}");
                let want_size = if len >= G1 {
                    G1
                } else if len == M2 && gpa % M2 == 0 {
                    M2
                } else {
                    K4
                };
                assert_eq!(size, want_size, "{probe:#x}");
                assert_eq!(
                    (r, w, x),
                    (
                        prot.contains(Prot::READ),
                        prot.contains(Prot::WRITE),
                        prot.contains(Prot::EXEC)
                    ),
                    "{probe:#x}"
                );
                // Write-back (6) for RAM, uncacheable (0) for device memory; PAT not ignored.
                let want_type = if prot.contains(Prot::DEVICE) { 0 } else { 6 };
                assert_eq!(memtype, want_type, "{probe:#x}");
                assert!(!ipat);
            }
        }
        // Everything else is an EPT violation (never a misconfiguration), at the level where
        // the walk finds nothing.
        assert_eq!(
            ept_walk(&pool, pt.root(), maxphy, 0x40_0000),
            Ept::Violation(2)
        );
        assert_eq!(
            ept_walk(&pool, pt.root(), maxphy, 0x1234_5678),
            Ept::Violation(2)
        );
        assert_eq!(
            ept_walk(&pool, pt.root(), maxphy, 0x80_0000_0000),
            Ept::Violation(4)
        );
        assert_eq!(
            ept_walk(&pool, pt.root(), maxphy, 0x1_0000_2000),
            Ept::Violation(1)
        );
        destroy(&pool, pt);
    }

    #[test]
    fn ept_reference_walker_sees_misconfigurations() {
        // The walker itself: hand-written entries that the SDM calls misconfigured.
        let pool = HostPool::new(8);
        let cfg = Config::new(48, 40);
        let pt = PageTable::<VtdSecondStage<4>>::new(&pool, cfg).unwrap();
        pt.map(&pool, 0, 0x1000, K4, rw()).unwrap();
        let root = pt.root();
        let pml4e = pool.read_phys(root);
        let pdpt = pml4e & 0x000f_ffff_ffff_f000;
        let pd = pool.read_phys(pdpt) & 0x000f_ffff_ffff_f000;
        let pde = pool.read_phys(pd);
        let pte_addr = pde & 0x000f_ffff_ffff_f000;
        let pte = pool.read_phys(pte_addr);
        assert!(matches!(ept_walk(&pool, root, 40, 0), Ept::Leaf { .. }));
        // Write-only leaf.
        pool.hw_update(pte_addr, 0, !0b1);
        assert_eq!(
            ept_walk(&pool, root, 40, 0),
            Ept::Misconfig(1, "write without read")
        );
        // Memory type 2 (reserved).
        pool.hw_update(pte_addr, 0b1 | 2 << 3, !0);
        assert_eq!(
            ept_walk(&pool, root, 40, 0),
            Ept::Misconfig(1, "reserved memory type")
        );
        // Back to the engine's leaf: valid again.
        pool.hw_update(pte_addr, pte, pte);
        assert!(matches!(ept_walk(&pool, root, 40, 0), Ept::Leaf { .. }));
        // A PML4E with bit 7 set.
        pool.hw_update(root, 1 << 7, !0);
        assert!(matches!(ept_walk(&pool, root, 40, 0), Ept::Misconfig(4, _)));
        pool.hw_update(root, pml4e, pml4e);
        destroy(&pool, pt);
    }

    #[test]
    fn vtd_without_optional_features_writes_zero_fields() {
        // No SC, no MTS, no execute control: SNP refused, EMT and X left 0 (reserved/ignored).
        let pool = HostPool::new(16);
        let pt = PageTable::<VtdSecondStage<4>>::new(&pool, Config::new(48, 46)).unwrap();
        assert_eq!(
            pt.map(&pool, 0, 0x1000, K4, Prot::READ | Prot::SNOOP),
            Err(iommu::pgtable::MapError::Unsupported)
        );
        pt.map(&pool, 0, 0x1000, K4, rw() | Prot::EXEC | Prot::DEVICE)
            .unwrap();
        let w = refwalk::vtd_ss(&pool, pt.root(), 4, 46, 0).unwrap();
        assert_eq!(w.leaf, 0x1000 | 0b11);
        // Table entries: R and W only.
        assert_eq!(pool.read_phys(pt.root()) & 0xfff, 0b11);
        destroy(&pool, pt);
    }

    #[test]
    fn vtd_hardware_without_superpages_gets_4k_leaves() {
        // CAP.SLLPS = 0b01: 2 MiB only, no 1 GiB.
        let pool = HostPool::new(16);
        let cfg = Config {
            leaf_sizes: M2,
            ..Config::new(48, 46)
        };
        let pt = PageTable::<VtdSecondStage<4>>::new(&pool, cfg).unwrap();
        pt.map(&pool, G1, G1, G1, rw()).unwrap();
        for probe in [G1, G1 + G1 - K4] {
            assert_eq!(
                refwalk::vtd_ss(&pool, pt.root(), 4, 46, probe)
                    .unwrap()
                    .page_size,
                M2
            );
        }
        assert_eq!(pt.census(&pool).leaves[1], 512);
        destroy(&pool, pt);
    }

    // --------------------------------------------------------------------------------------
    // x86-64 paging (VT-d first stage)
    // --------------------------------------------------------------------------------------

    fn x86_check<const L: u32>() {
        let pool = HostPool::new(64);
        let ias = 12 + 9 * L - 1;
        let cfg = Config {
            execute_control: true,
            ..Config::new(ias, 46)
        };
        let cases = vec![
            Case {
                iova: 0x1000,
                pa: 0x5000,
                len: K4,
                prot: Prot::READ,
                leaves: leaves(&[(1, K4)]),
            },
            Case {
                iova: 0x2000,
                pa: 0x6000,
                len: 2 * K4,
                prot: rw() | Prot::EXEC | Prot::GLOBAL,
                leaves: leaves(&[(2, K4)]),
            },
            Case {
                iova: 0x8000,
                pa: 0x9000,
                len: K4,
                prot: rw() | Prot::PRIV | Prot::DEVICE,
                leaves: leaves(&[(1, K4)]),
            },
            Case {
                iova: 0x60_0000,
                pa: 0x20_0000,
                len: 2 * M2,
                prot: rw() | Prot::NONCACHED,
                leaves: leaves(&[(2, M2)]),
            },
            Case {
                iova: 0x40_0000_0000,
                pa: 0x80_0000_0000,
                len: G1,
                prot: Prot::READ | Prot::EXEC,
                leaves: leaves(&[(1, G1)]),
            },
            Case {
                iova: 0x8000_0000 - K4,
                pa: 0x1_8000_0000 - K4,
                len: K4 + G1 + M2,
                prot: rw() | Prot::DEVICE | Prot::GLOBAL,
                leaves: leaves(&[(1, K4), (1, G1), (1, M2)]),
            },
            Case {
                iova: (1 << ias) - M2,
                pa: 0x40_0000,
                len: M2,
                prot: rw(),
                leaves: leaves(&[(1, M2)]),
            },
        ];
        let pt = run::<X86FirstStage<L>>(&pool, cfg, &cases, |pt, c, off, size, probe| {
            let w = refwalk::x86(&pool, pt.root(), L, 46, probe).unwrap();
            assert_eq!(w.pa, c.pa + (probe - c.iova));
            assert_eq!(w.page_size, size);
            let write = c.prot.contains(Prot::WRITE);
            assert_eq!(w.writable, write);
            assert_eq!(w.user, !c.prot.contains(Prot::PRIV));
            assert_eq!(w.exec_disable, !c.prot.contains(Prot::EXEC));
            assert_eq!(w.global, c.prot.contains(Prot::GLOBAL));
            assert!(w.accessed);
            assert_eq!(
                w.dirty, write,
                "D preset on writable leaves without dirty tracking"
            );
            // Default PAT: 0 = WB, 2 = UC-, 3 = UC.
            let pat = if c.prot.contains(Prot::DEVICE) {
                3
            } else if c.prot.contains(Prot::NONCACHED) {
                2
            } else {
                0
            };
            assert_eq!(w.pat_index, pat);
            // Exact leaf: SDM table 4-18/4-19/4-20.
            let want = (c.pa + off)
                | 1
                | (write as u64) << 1
                | (!c.prot.contains(Prot::PRIV) as u64) << 2
                | (pat as u64 & 3) << 3
                | 1 << 5
                | (write as u64) << 6
                | ((size > K4) as u64) << 7
                | (c.prot.contains(Prot::GLOBAL) as u64) << 8
                | (!c.prot.contains(Prot::EXEC) as u64) << 63;
            assert_eq!(w.leaf, want, "leaf at {probe:#x}");
        });
        // Non-leaf entries: P, RW, US, A.
        assert_eq!(pool.read_phys(pt.root()) & 0xfff, 0b100111);
        destroy(&pool, pt);
    }

    #[test]
    fn x86_first_stage_4_levels() {
        x86_check::<4>();
    }
    #[test]
    fn x86_first_stage_5_levels() {
        x86_check::<5>();
    }

    #[test]
    fn x86_dirty_tracking_starts_clean() {
        let pool = HostPool::new(16);
        let cfg = Config {
            dirty_tracking: true,
            ..Config::new(47, 46)
        };
        let pt = PageTable::<X86FirstStage<4>>::new(&pool, cfg).unwrap();
        pt.map(&pool, 0, 0x1000, K4, rw()).unwrap();
        let w = refwalk::x86(&pool, pt.root(), 4, 46, 0).unwrap();
        assert!(w.writable && !w.dirty && w.accessed);
        destroy(&pool, pt);
    }

    // --------------------------------------------------------------------------------------
    // Arm VMSAv8-64
    // --------------------------------------------------------------------------------------

    /// Expected attribute fields for an Arm leaf, from D8.3 / D8.5.
    fn arm_expect(c: &Case, stage2: bool, dirty_tracking: bool) -> (u8, u8, u8, u8) {
        let cached = !c.prot.intersects(Prot::DEVICE | Prot::NONCACHED);
        let sh = if cached { 0b11 } else { 0b10 };
        let write = c.prot.contains(Prot::WRITE);
        if stage2 {
            let attr = if c.prot.contains(Prot::DEVICE) {
                0b0001
            } else if c.prot.contains(Prot::NONCACHED) {
                0b0101
            } else {
                0b1111
            };
            // S2AP[0] read, S2AP[1] write (withheld until the first write under DBM).
            let ap = c.prot.contains(Prot::READ) as u8 | ((write && !dirty_tracking) as u8) << 1;
            let xn = if c.prot.contains(Prot::EXEC) { 0 } else { 0b10 };
            (attr, ap, sh, xn)
        } else {
            // MAIR index: 0 device, 1 WB, 2 NC.
            let attr = if c.prot.contains(Prot::DEVICE) {
                0
            } else if c.prot.contains(Prot::NONCACHED) {
                2
            } else {
                1
            };
            // AP[2] = read-only (also writable-clean under DBM), AP[1] = EL0 access.
            let ap = (!c.prot.contains(Prot::PRIV)) as u8 | ((!write || dirty_tracking) as u8) << 1;
            let xn = if c.prot.contains(Prot::EXEC) { 0 } else { 0b11 };
            (attr, ap, sh, xn)
        }
    }

    fn arm_check<F: Format>(
        granule: u32,
        ias: u32,
        oas: u32,
        stage2: bool,
        cases: &[Case],
        contiguous: &[(u64, bool)],
    ) {
        // 64 KiB tables are 16 frames each; a 16-table concatenated root is 256.
        let pool = HostPool::new(match granule {
            16 if ias < 48 => 512,
            16 => 128,
            _ => 64,
        });
        let cfg = Config::new(ias, oas);
        let mut regime = None;
        let pt = run::<F>(&pool, cfg, cases, |pt, c, _off, size, probe| {
            let info = pt.root_info();
            let r = *regime.get_or_insert_with(|| {
                if stage2 {
                    ArmRegime::stage2(granule, ias, oas, info.arm_sl0().unwrap())
                } else {
                    ArmRegime::stage1(granule, ias, oas)
                }
            });
            assert_eq!(r.start_level, info.arm_start_level());
            assert_eq!(r.t0sz, info.arm_t0sz());
            let w = refwalk::arm(&pool, pt.root(), &r, probe).unwrap();
            assert_eq!(w.pa, c.pa + (probe - c.iova), "pa at {probe:#x}");
            assert_eq!(w.page_size, size, "leaf size at {probe:#x}");
            let (attr, ap, sh, xn) = arm_expect(c, stage2, false);
            assert_eq!(
                (w.attr, w.ap, w.sh, w.xn),
                (attr, ap, sh, xn),
                "attrs at {probe:#x}"
            );
            assert!(w.af, "AF preset");
            assert_eq!(w.ng, !stage2 && !c.prot.contains(Prot::GLOBAL));
            assert!(!w.dbm);
            // Each run once, from its first entry (the probes include every leaf's first granule).
            let run = refwalk::arm_contiguous_entries(granule, w.level) * w.page_size;
            if w.contiguous && probe % run == 0 {
                refwalk::arm_check_contiguous(&pool, pt.root(), &r, probe).unwrap();
            }
        });
        let r = regime.unwrap();
        for &(ia, cont) in contiguous {
            let w = refwalk::arm(&pool, pt.root(), &r, ia).unwrap();
            assert_eq!(w.contiguous, cont, "contiguous hint at {ia:#x}");
        }
        destroy(&pool, pt);
    }

    fn arm_4k_cases() -> Vec<Case> {
        vec![
            Case {
                iova: 0x1000,
                pa: 0x9000,
                len: K4,
                prot: Prot::READ,
                leaves: leaves(&[(1, K4)]),
            },
            // 15 pages: one short of a contiguous run.
            Case {
                iova: 0x10_0000,
                pa: 0x20_0000,
                len: 15 * K4,
                prot: rw(),
                leaves: leaves(&[(15, K4)]),
            },
            // 64 KiB + 4 KiB: one run of 16 with the hint, then a plain page.
            Case {
                iova: 0x20_0000,
                pa: 0x50_0000,
                len: K64 + K4,
                prot: rw() | Prot::EXEC,
                leaves: leaves(&[(17, K4)]),
            },
            // 64 KiB with only 4 KiB-aligned output: no hint.
            Case {
                iova: 0x30_0000,
                pa: 0x60_1000,
                len: K64,
                prot: rw() | Prot::DEVICE,
                leaves: leaves(&[(16, K4)]),
            },
            // 2 MiB blocks, 3 of them (no run of 16).
            Case {
                iova: 0x4000_0000,
                pa: 0x8000_0000,
                len: 3 * M2,
                prot: rw() | Prot::NONCACHED,
                leaves: leaves(&[(3, M2)]),
            },
            // 32 MiB: a run of 16 × 2 MiB blocks with the hint.
            Case {
                iova: 0x6000_0000,
                pa: 0x2_0000_0000,
                len: 32 << 20,
                prot: Prot::READ | Prot::PRIV | Prot::GLOBAL,
                leaves: leaves(&[(16, M2)]),
            },
            // 1 GiB block.
            Case {
                iova: 0x80_0000_0000,
                pa: 0x40_0000_0000,
                len: G1,
                prot: rw(),
                leaves: leaves(&[(1, G1)]),
            },
        ]
    }

    const ARM_4K_CONT: &[(u64, bool)] = &[
        (0x10_0000, false),
        (0x20_0000, true),
        (0x20_f000, true),
        (0x21_0000, false),
        (0x30_0000, false),
        (0x4000_0000, false),
        (0x6000_0000, true),
        (0x80_0000_0000, false),
    ];

    #[test]
    fn arm_stage1_4k() {
        arm_check::<ArmStage1<12>>(12, 48, 48, false, &arm_4k_cases(), ARM_4K_CONT);
    }

    #[test]
    fn arm_stage2_4k() {
        arm_check::<ArmStage2<12>>(12, 48, 48, true, &arm_4k_cases(), ARM_4K_CONT);
    }

    #[test]
    fn arm_stage2_concatenated_root() {
        // 40-bit IPA with 4 KiB: two concatenated level-1 tables (1024 entries), start level 1.
        let mut cases = arm_4k_cases();
        cases.retain(|c| c.iova < 1 << 39);
        // Entries in the second concatenated table (index ≥ 512 at level 1).
        cases.push(Case {
            iova: 0x80_4000_0000,
            pa: 0x1000_0000,
            len: M2 + K4,
            prot: rw(),
            leaves: leaves(&[(1, M2), (1, K4)]),
        });
        cases.push(Case {
            iova: 0xff_c000_0000,
            pa: 0xc000_0000,
            len: G1,
            prot: rw(),
            leaves: leaves(&[(1, G1)]),
        });
        let pool = HostPool::new(64);
        let pt = PageTable::<ArmStage2<12>>::new(&pool, Config::new(40, 48)).unwrap();
        let info = pt.root_info();
        assert_eq!(
            (info.levels, info.root_entries, info.concatenated_tables()),
            (3, 1024, 2)
        );
        assert_eq!(
            (info.arm_start_level(), info.arm_sl0(), info.arm_t0sz()),
            (1, Some(1), 24)
        );
        pt.destroy(&pool);
        arm_check::<ArmStage2<12>>(12, 40, 48, true, &cases, &[(0x6000_0000, true)]);
    }

    #[test]
    fn arm_stage2_16_concatenated_tables() {
        // 43-bit IPA: 16 level-1 tables concatenated (8192 entries), the most allowed.
        let cases = vec![Case {
            iova: (1 << 43) - G1,
            pa: G1,
            len: G1,
            prot: rw(),
            leaves: leaves(&[(1, G1)]),
        }];
        arm_check::<ArmStage2<12>>(12, 43, 48, true, &cases, &[]);
    }

    #[test]
    fn arm_16k_granule() {
        const K16: u64 = 16 << 10;
        const M32: u64 = 32 << 20;
        let cases = vec![
            Case {
                iova: 0x4000,
                pa: 0x8000,
                len: K16,
                prot: rw(),
                leaves: leaves(&[(1, K16)]),
            },
            // 128 × 16 KiB = 2 MiB: one contiguous run.
            Case {
                iova: 0x40_0000,
                pa: 0x80_0000,
                len: M2,
                prot: rw(),
                leaves: leaves(&[(128, K16)]),
            },
            // 32 MiB level-2 blocks, 2 of them.
            Case {
                iova: 0x1_0000_0000,
                pa: 0x4000_0000,
                len: 2 * M32,
                prot: Prot::READ,
                leaves: leaves(&[(2, M32)]),
            },
        ];
        let cont = &[
            (0x4000, false),
            (0x40_0000, true),
            (0x5f_c000, true),
            (0x1_0000_0000, false),
        ];
        arm_check::<ArmStage1<14>>(14, 47, 48, false, &cases, cont);
        arm_check::<ArmStage2<14>>(14, 48, 48, true, &cases, cont);
    }

    #[test]
    fn arm_64k_granule_52_bit_output() {
        const M512: u64 = 512 << 20;
        let hi = 0xa_0000_0000_0000u64; // above 48 bits: OA[51:48] in descriptor bits [15:12]
        let cases = vec![
            Case {
                iova: 0x1_0000,
                pa: hi + 0x3_0000,
                len: K64,
                prot: rw(),
                leaves: leaves(&[(1, K64)]),
            },
            // 32 × 64 KiB = 2 MiB contiguous run.
            Case {
                iova: 0x20_0000,
                pa: hi + 0x20_0000,
                len: M2,
                prot: rw(),
                leaves: leaves(&[(32, K64)]),
            },
            // 512 MiB level-2 block.
            Case {
                iova: 0x4000_0000,
                pa: hi + 0x2000_0000,
                len: M512,
                prot: rw() | Prot::DEVICE,
                leaves: leaves(&[(1, M512)]),
            },
        ];
        let cont = &[(0x1_0000, false), (0x20_0000, true), (0x4000_0000, false)];
        arm_check::<ArmStage1<16>>(16, 52, 52, false, &cases, cont);
        arm_check::<ArmStage2<16>>(16, 52, 52, true, &cases, cont);
        if !cfg!(miri) {
            // 16 concatenated level-2 tables: a 1 MiB root (too slow to set up under miri).
            arm_check::<ArmStage2<16>>(16, 46, 52, true, &cases, cont);
        }
    }

    #[test]
    fn arm_dirty_bit_modifier() {
        for stage2 in [false, true] {
            let pool = HostPool::new(16);
            let cfg = Config {
                dirty_tracking: true,
                ..Config::new(48, 48)
            };
            let c = Case {
                iova: 0,
                pa: 0x1000,
                len: K4,
                prot: rw(),
                leaves: vec![],
            };
            let (root, sl0) = if stage2 {
                let pt = PageTable::<ArmStage2<12>>::new(&pool, cfg).unwrap();
                pt.map(&pool, c.iova, c.pa, c.len, c.prot).unwrap();
                (pt.root(), pt.root_info().arm_sl0())
            } else {
                let pt = PageTable::<ArmStage1<12>>::new(&pool, cfg).unwrap();
                pt.map(&pool, c.iova, c.pa, c.len, c.prot).unwrap();
                (pt.root(), None)
            };
            // (The tables are dropped without `destroy`: the pool goes with them.)
            let r = match sl0 {
                Some(sl0) => ArmRegime::stage2(12, 48, 48, sl0),
                None => ArmRegime::stage1(12, 48, 48),
            };
            let w = refwalk::arm(&pool, root, &r, 0).unwrap();
            assert!(w.dbm, "DBM set on writable leaves");
            assert_eq!(
                (w.attr, w.ap, w.sh, w.xn),
                arm_expect(&c, stage2, true),
                "writable-clean"
            );
        }
    }

    #[test]
    fn stage1_formats_reject_unreadable_mappings() {
        let pool = HostPool::new(8);
        let pt = PageTable::<ArmStage1<12>>::new(&pool, Config::new(48, 48)).unwrap();
        assert_eq!(
            pt.map(&pool, 0, 0, K4, Prot::WRITE),
            Err(iommu::pgtable::MapError::InvalidProt)
        );
        let mut g = Gather::new();
        assert_eq!(pt.unmap(&pool, 0, K4, &mut g), Ok(0));
        g.complete(&pool);
        destroy(&pool, pt);
    }
}

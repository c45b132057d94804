//! Operation semantics: unmap accounting and gathering, the partial-superpage policy, rollback of
//! failed maps, table-page reclamation, dirty bits, cache cleaning for non-coherent walkers, the
//! debug dump, table-page counts per mapping size, and multi-threaded smoke tests.

#[path = "pgtable_support/mod.rs"]
mod support;

mod pgtable {
    use super::support::{HostPool, refwalk};
    use iommu::pgtable::{
        ArmStage1, ArmStage2, Concurrency, Config, Format, Gather, IovaRange, MapError, PageTable,
        PhysAddr, Prot, RunSource, TableMemory, UnmapError, VtdSecondStage, X86FirstStage,
    };
    use std::sync::Mutex;

    const K4: u64 = 4 << 10;
    const K64: u64 = 64 << 10;
    const M2: u64 = 2 << 20;
    const G1: u64 = 1 << 30;
    type Vtd = VtdSecondStage<4>;
    /// Page stride of before/after snapshots: every page natively; under miri (~0.1 ms per
    /// atomic access) every 61st, coprime with every alignment in play.
    const STRIDE: u64 = if cfg!(miri) { 61 * K4 } else { K4 };

    fn rw() -> Prot {
        Prot::READ | Prot::WRITE
    }
    fn r(start: u64, end: u64) -> IovaRange {
        IovaRange { start, end }
    }
    fn modes() -> [Concurrency; 2] {
        [Concurrency::Untrusted, Concurrency::Cooperative]
    }
    fn vtd(pool: &HostPool, mode: Concurrency) -> PageTable<Vtd> {
        let cfg = Config {
            concurrency: mode,
            ..Config::new(48, 46)
        };
        PageTable::new(pool, cfg).unwrap()
    }
    /// Every mapped page, by lookup, over `[start, end)`.
    fn snapshot<F: Format>(
        pt: &PageTable<F>,
        pool: &HostPool,
        start: u64,
        end: u64,
    ) -> Vec<Option<PhysAddr>> {
        (start..end)
            .step_by(STRIDE as usize)
            .map(|a| pt.iova_to_phys(pool, a))
            .collect()
    }
    fn finish<F: Format>(pool: &HostPool, pt: PageTable<F>) {
        pt.destroy(pool);
        pool.reclaim();
        assert_eq!(pool.frames_in_use(), 0, "every table page returned");
    }

    #[test]
    fn unmap_returns_bytes_and_gathers_one_range() {
        for mode in modes() {
            let pool = HostPool::new(64);
            let pt = vtd(&pool, mode);
            pt.map(&pool, 0x100_0000, 0x4000_0000, 256 * K4, rw())
                .unwrap();
            let mut g = Gather::new();
            assert_eq!(pt.unmap(&pool, 0x100_0000, 256 * K4, &mut g), Ok(256 * K4));
            assert_eq!(g.range(), Some(r(0x100_0000, 0x100_0000 + 256 * K4)));
            assert_eq!(g.leaf_entries(), 256);
            assert_eq!(g.min_leaf_size(), Some(K4));
            assert!(
                !g.has_gaps() && !g.frees_tables(),
                "1 MiB does not cover the 2 MiB table"
            );
            g.complete(&pool);
            // Nothing left, and unmapping again is a no-op that gathers nothing.
            assert_eq!(pt.unmap(&pool, 0x100_0000, 256 * K4, &mut g), Ok(0));
            assert_eq!(g.range(), None);
            g.complete(&pool);
            finish(&pool, pt);
        }
    }

    #[test]
    fn unmap_skips_holes_and_reports_exactly_what_was_mapped() {
        let pool = HostPool::new(64);
        let pt = vtd(&pool, Concurrency::Untrusted);
        pt.map(&pool, 0x1000, 0x1000, K4, rw()).unwrap();
        pt.map(&pool, 0x5000, 0x9000, 2 * K4, rw()).unwrap();
        pt.map(&pool, 4 * M2, 8 * M2, M2, rw()).unwrap();
        let mut g = Gather::new();
        assert_eq!(pt.unmap(&pool, 0, 6 * M2, &mut g), Ok(3 * K4 + M2));
        // Hull of what was cleared, not of the request; one table unlinked (the 2 MiB leaf table
        // under [0, 2M) was wholly covered).
        assert_eq!(g.range(), Some(r(0, 5 * M2)));
        assert_eq!(g.table_pages(), 1);
        assert_eq!(g.min_leaf_size(), Some(K4));
        g.complete(&pool);
        // Several unmaps into one gather: the hull, flagged as having gaps.
        pt.map(&pool, 0, 0, K4, rw()).unwrap();
        pt.map(&pool, 10 * M2, 0, K4, rw()).unwrap();
        pt.unmap(&pool, 0, K4, &mut g).unwrap();
        pt.unmap(&pool, 10 * M2, K4, &mut g).unwrap();
        assert_eq!(g.range(), Some(r(0, 10 * M2 + K4)));
        assert!(g.has_gaps());
        g.complete(&pool);
        finish(&pool, pt);
    }

    #[test]
    fn partial_unmap_of_a_superpage_is_rejected_and_changes_nothing() {
        for mode in modes() {
            let pool = HostPool::new(64);
            let pt = vtd(&pool, mode);
            pt.map(&pool, 0, 0x10_0000, K4, rw()).unwrap();
            pt.map(&pool, M2, 0x4000_0000, M2, rw()).unwrap(); // a 2 MiB leaf
            pt.map(&pool, G1, 0x8000_0000, G1, rw()).unwrap(); // a 1 GiB leaf
            let before = snapshot(&pt, &pool, 0, 2 * M2);
            let census = pt.census(&pool);
            let mut g = Gather::new();
            let cases = [
                (M2 + K4, K4, r(M2, 2 * M2)),     // inside
                (M2, K4, r(M2, 2 * M2)),          // head
                (2 * M2 - K4, K4, r(M2, 2 * M2)), // tail
                (0, M2 + K4, r(M2, 2 * M2)),      // ends inside: 0 must stay mapped
                (M2 + K4, 4 * M2, r(M2, 2 * M2)), // starts inside
                (G1 + M2, M2, r(G1, 2 * G1)),     // 2 MiB of a 1 GiB leaf
                (G1 - K4, 2 * K4, r(G1, 2 * G1)), // straddles into the 1 GiB leaf
            ];
            for (iova, len, leaf) in cases {
                assert_eq!(
                    pt.unmap(&pool, iova, len, &mut g),
                    Err(UnmapError::SplitsLeaf { leaf, unmapped: 0 }),
                    "unmap {iova:#x}+{len:#x}"
                );
                assert!(g.is_empty());
                assert_eq!(snapshot(&pt, &pool, 0, 2 * M2), before);
                assert_eq!(pt.census(&pool), census);
            }
            // Whole leaves go.
            assert_eq!(pt.unmap(&pool, M2, M2, &mut g), Ok(M2));
            assert_eq!(pt.unmap(&pool, 0, 2 * G1, &mut g), Ok(K4 + G1));
            g.complete(&pool);
            finish(&pool, pt);
        }
    }

    #[test]
    fn partial_unmap_of_a_contiguous_run_is_rejected() {
        let pool = HostPool::new(64);
        let pt = PageTable::<ArmStage2<12>>::new(&pool, Config::new(48, 48)).unwrap();
        pt.map(&pool, K64, 0x20_0000, K64, rw()).unwrap();
        assert_eq!(pt.census(&pool).contiguous[0], 16);
        let mut g = Gather::new();
        assert_eq!(
            pt.unmap(&pool, K64 + 5 * K4, K4, &mut g),
            Err(UnmapError::SplitsLeaf {
                leaf: r(K64, 2 * K64),
                unmapped: 0
            })
        );
        assert_eq!(
            pt.unmap(&pool, 0, K64 + K4, &mut g),
            Err(UnmapError::SplitsLeaf {
                leaf: r(K64, 2 * K64),
                unmapped: 0
            })
        );
        assert_eq!(pt.census(&pool).contiguous[0], 16);
        assert_eq!(pt.unmap(&pool, 0, 4 * K64, &mut g), Ok(K64));
        g.complete(&pool);
        // With the hint disabled the same run is 16 independent pages.
        let cfg = Config {
            contiguous_hint: false,
            ..Config::new(48, 48)
        };
        let pt2 = PageTable::<ArmStage2<12>>::new(&pool, cfg).unwrap();
        pt2.map(&pool, K64, 0x20_0000, K64, rw()).unwrap();
        assert_eq!(pt2.unmap(&pool, K64 + 5 * K4, K4, &mut g), Ok(K4));
        g.complete(&pool);
        pt.destroy(&pool);
        finish(&pool, pt2);
    }

    /// A level-0 unmap over several contiguous runs whose ends are single pages (the engine
    /// clears whole runs inside the request without a per-entry split check, and checks only
    /// the edges): the runs and the edge pages all go, exactly the request is gathered, and a
    /// request whose first or last run is cut changes nothing. Checked against the reference
    /// walker, by both concurrency modes.
    #[test]
    fn unmap_of_runs_with_single_page_edges() {
        for mode in modes() {
            let pool = HostPool::new(64);
            let cfg = Config {
                concurrency: mode,
                ..Config::new(48, 48)
            };
            let pt = PageTable::<ArmStage2<12>>::new(&pool, cfg).unwrap();
            // [3 pages before K64, 3 runs, 5 pages after): pages 13..16 and 64..69 (in K4)
            // are single leaves, [K64, 4 * K64) three runs of 16.
            let (start, end) = (K64 - 3 * K4, 4 * K64 + 5 * K4);
            pt.map(&pool, start, 0x40_0000 + start, end - start, rw())
                .unwrap();
            assert_eq!(pt.census(&pool).contiguous[0], 48);
            let regime = refwalk::ArmRegime::stage2(12, 48, 48, pt.root_info().arm_sl0().unwrap());
            for a in (start..end).step_by(K4 as usize) {
                let w = refwalk::arm(&pool, pt.root(), &regime, a).unwrap();
                assert_eq!(w.pa, 0x40_0000 + a);
                assert_eq!(w.contiguous, (K64..4 * K64).contains(&a), "{a:#x}");
            }
            let before = snapshot(&pt, &pool, 0, 8 * K64);
            let mut g = Gather::new();
            // The first run cut by the request's start; then the last by its end.
            for (iova, stop, leaf) in [
                (K64 + K4, 4 * K64, r(K64, 2 * K64)),
                (start, 4 * K64 - K4, r(3 * K64, 4 * K64)),
                (2 * K64 + 7 * K4, end, r(2 * K64, 3 * K64)),
            ] {
                assert_eq!(
                    pt.unmap(&pool, iova, stop - iova, &mut g),
                    Err(UnmapError::SplitsLeaf { leaf, unmapped: 0 }),
                    "unmap [{iova:#x}, {stop:#x})"
                );
                assert!(g.is_empty());
                assert_eq!(snapshot(&pt, &pool, 0, 8 * K64), before);
            }
            // Everything, with a page of hole on each side.
            assert_eq!(
                pt.unmap(&pool, start - K4, end - start + 2 * K4, &mut g),
                Ok(end - start)
            );
            assert_eq!(g.range(), Some(r(start, end)));
            for a in (0..8 * K64).step_by(K4 as usize) {
                assert!(
                    refwalk::arm(&pool, pt.root(), &regime, a).is_err(),
                    "{a:#x} still mapped"
                );
            }
            assert_eq!(pt.census(&pool).mapped, 0);
            g.complete(&pool);
            finish(&pool, pt);
        }
    }

    #[test]
    fn overlapping_map_fails_rolls_back_and_changes_nothing() {
        for mode in modes() {
            let pool = HostPool::new(64);
            let pt = vtd(&pool, mode);
            pt.map(&pool, 3 * K4, 0x7000, K4, rw()).unwrap();
            pt.map(&pool, M2, 0x4000_0000, M2, rw()).unwrap();
            let before = snapshot(&pt, &pool, 0, 3 * M2);
            // Installs 0, 4K, 8K, then meets 12K: rolls those three back.
            assert_eq!(
                pt.map(&pool, 0, 0x10_0000, 4 * K4, rw()),
                Err(MapError::Overlap {
                    iova: 3 * K4,
                    rolled_back: r(0, 3 * K4)
                })
            );
            // Meets the 2 MiB leaf after one page.
            assert_eq!(
                pt.map(&pool, M2 - K4, 0x10_0000, 2 * K4, rw()),
                Err(MapError::Overlap {
                    iova: M2,
                    rolled_back: r(M2 - K4, M2)
                })
            );
            // Starts inside the superpage: nothing installed.
            assert_eq!(
                pt.map(&pool, M2 + K4, 0x10_0000, K4, rw()),
                Err(MapError::Overlap {
                    iova: M2 + K4,
                    rolled_back: r(M2 + K4, M2 + K4)
                })
            );
            // A superpage-sized map over a table holding one page.
            assert_eq!(
                pt.map(&pool, 0, 0, M2, rw()),
                Err(MapError::Overlap {
                    iova: 3 * K4,
                    rolled_back: r(0, 3 * K4)
                })
            );
            assert_eq!(snapshot(&pt, &pool, 0, 3 * M2), before);
            let mut g = Gather::new();
            pt.unmap(&pool, 0, 4 * M2, &mut g).unwrap();
            g.complete(&pool);
            finish(&pool, pt);
        }
    }

    #[test]
    fn out_of_memory_rolls_back() {
        // Root + 2 tables: enough for one path down to level 1, not for the level-0 table.
        let pool = HostPool::new(3);
        let pt = vtd(&pool, Concurrency::Untrusted);
        assert_eq!(
            pt.map(&pool, 0, 0, K4, rw()),
            Err(MapError::NoMemory {
                rolled_back: r(0, 0)
            })
        );
        // A 2 MiB leaf at level 1 needs no more memory.
        pt.map(&pool, M2, 0, M2, rw()).unwrap();
        // Superpage, then a 4K page that needs a table: the superpage is rolled back.
        assert_eq!(
            pt.map(&pool, 4 * M2, 0, M2 + K4, rw()),
            Err(MapError::NoMemory {
                rolled_back: r(4 * M2, 5 * M2)
            })
        );
        assert_eq!(pt.iova_to_phys(&pool, 4 * M2), None);
        assert_eq!(pt.iova_to_phys(&pool, M2), Some(0));
        finish(&pool, pt);
    }

    #[test]
    fn bad_requests() {
        let pool = HostPool::new(8);
        let pt = vtd(&pool, Concurrency::Untrusted);
        assert_eq!(pt.map(&pool, 1, 0, K4, rw()), Err(MapError::Misaligned));
        assert_eq!(pt.map(&pool, 0, 0x800, K4, rw()), Err(MapError::Misaligned));
        assert_eq!(pt.map(&pool, 0, 0, 0, rw()), Err(MapError::Misaligned));
        assert_eq!(
            pt.map(&pool, 1 << 48, 0, K4, rw()),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            pt.map(&pool, (1 << 48) - K4, 0, 2 * K4, rw()),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            pt.map(&pool, 0, 1 << 46, K4, rw()),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            pt.map(&pool, !0xfff, 0, K4, rw()),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            pt.map(&pool, 0, 0, K4, Prot::EXEC),
            Err(MapError::InvalidProt)
        );
        let mut g = Gather::new();
        assert_eq!(
            pt.unmap(&pool, 0x800, K4, &mut g),
            Err(UnmapError::Misaligned)
        );
        assert_eq!(
            pt.unmap(&pool, 0, 1 << 49, &mut g),
            Err(UnmapError::OutOfRange)
        );
        assert_eq!(pt.iova_to_phys(&pool, 1 << 50), None);
        finish(&pool, pt);
    }

    #[test]
    fn covered_tables_are_freed_only_after_complete_and_a_grace_period() {
        let pool = HostPool::new(64);
        let cpu = pool.register();
        let pt = vtd(&pool, Concurrency::Untrusted);
        // 2 MiB of 4 KiB pages (pa only 4 KiB aligned): one leaf table.
        pt.map(&pool, 0, K4, M2, rw()).unwrap();
        assert_eq!(pt.table_pages(), 4);
        let mut g = Gather::new();
        // Half of it: the table stays.
        assert_eq!(pt.unmap(&pool, 0, M2 / 2, &mut g), Ok(M2 / 2));
        assert_eq!(g.table_pages(), 0);
        // The rest, plus the already-empty half: the whole span, so the table is unlinked.
        assert_eq!(pt.unmap(&pool, 0, M2, &mut g), Ok(M2 / 2));
        assert_eq!(g.table_pages(), 1);
        assert!(g.frees_tables());
        assert_eq!(g.range(), Some(r(0, M2)));
        assert_eq!(pt.table_pages(), 3);
        // Unlinked but not reusable before `complete` ...
        assert_eq!(pool.frames_in_use(), 4);
        // ... (here the caller would invalidate and wait) ...
        g.complete(&pool);
        // ... and not before this CPU passes a quiescent state.
        assert_eq!(pool.frames_in_limbo(), 1);
        pool.quiescent(cpu);
        assert_eq!(pool.frames_in_limbo(), 0);
        assert_eq!(pool.frames_in_use(), 3);
        // A whole 1 GiB span of 4 KiB pages: 512 leaf tables and their parent go at once.
        if !cfg!(miri) {
            let pool = HostPool::new(600);
            let cfg = Config::new(48, 46).granule_only();
            let pt = PageTable::<Vtd>::new(&pool, cfg).unwrap();
            pt.map(&pool, G1, 0, G1, rw()).unwrap();
            assert_eq!(pt.table_pages(), 1 + 1 + 1 + 512);
            let mut g = Gather::new();
            assert_eq!(pt.unmap(&pool, G1, G1, &mut g), Ok(G1));
            assert_eq!((g.table_pages(), g.leaf_entries()), (513, 512 * 512));
            assert_eq!(pt.table_pages(), 2);
            g.complete(&pool);
            finish(&pool, pt);
        }
        pool.offline(cpu);
        finish(&pool, pt);
    }

    #[test]
    fn an_empty_leftover_table_is_reused() {
        let pool = HostPool::new(16);
        let pt = vtd(&pool, Concurrency::Untrusted);
        pt.map(&pool, 0, 0, M2 / 2, rw()).unwrap();
        let mut g = Gather::new();
        pt.unmap(&pool, 0, M2 / 2, &mut g).unwrap();
        g.complete(&pool);
        // The slot holds an empty table, so the 2 MiB map goes into it as 512 pages.
        pt.map(&pool, 0, 0, M2, rw()).unwrap();
        let c = pt.census(&pool);
        assert_eq!((c.leaves[0], c.leaves[1]), (512, 0));
        assert_eq!(pt.iova_to_phys(&pool, M2 - K4), Some(M2 - K4));
        // Unmapping all of it frees the table; now the superpage fits.
        pt.unmap(&pool, 0, M2, &mut g).unwrap();
        g.complete(&pool);
        pt.map(&pool, 0, 0, M2, rw()).unwrap();
        assert_eq!(pt.census(&pool).leaves[1], 1);
        finish(&pool, pt);
    }

    #[test]
    fn table_pages_per_mapping_size() {
        // (format, mapping) → table pages including the root, as docs/pgtable.md reports them.
        let pool = HostPool::new(if cfg!(miri) { 16 } else { 1100 });
        let count = |len: u64, pa: u64, granule_only: bool| {
            let mut cfg = Config::new(48, 46);
            if granule_only {
                cfg = cfg.granule_only();
            }
            let pt = PageTable::<Vtd>::new(&pool, cfg).unwrap();
            pt.map(&pool, G1, pa, len, rw()).unwrap();
            let n = (pt.table_pages(), pt.census(&pool).table_pages());
            finish_keep(&pool, pt);
            n
        };
        assert_eq!(count(K4, 0, false), (4, 4));
        assert_eq!(count(256 * K4, 0, false), (4, 4));
        assert_eq!(count(M2, 0, false), (3, 3)); // one 2 MiB leaf
        assert_eq!(count(256 * M2, 0, false), (3, 3));
        assert_eq!(count(G1, 0, false), (2, 2)); // one 1 GiB leaf
        if !cfg!(miri) {
            assert_eq!(count(G1, 0, true), (515, 515)); // 1 GiB of 4 KiB pages
        }
    }

    fn finish_keep<F: Format>(pool: &HostPool, pt: PageTable<F>) {
        pt.destroy(pool);
        assert_eq!(pool.frames_in_use(), 0);
    }

    #[test]
    fn dirty_bits_are_read_cleared_and_gathered() {
        let cfg = Config {
            dirty_tracking: true,
            ..Config::new(48, 46)
        };
        // VT-d: hardware sets D (bit 9).
        let pool = HostPool::new(16);
        let pt = PageTable::<Vtd>::new(&pool, cfg).unwrap();
        pt.map(&pool, 0, 0x10_0000, 4 * K4, rw()).unwrap();
        pt.map(&pool, M2, 0x4000_0000, M2, rw()).unwrap();
        let leaf_addr = |iova: u64| {
            let t = pt.translate(&pool, iova).unwrap();
            (t.pte, t)
        };
        let _ = leaf_addr(0);
        // Find the descriptors' physical addresses through the reference walk path.
        let pte_pa = |iova: u64| -> u64 {
            let mut table = pt.root();
            for l in (1..=4u32).rev() {
                let a = table + ((iova >> (12 + 9 * (l - 1))) & 0x1ff) * 8;
                let e = pool.read_phys(a);
                if l == 1 || e & (1 << 7) != 0 {
                    return a;
                }
                table = e & 0x000f_ffff_ffff_f000;
            }
            unreachable!()
        };
        pool.hw_update(pte_pa(K4), 1 << 9 | 1 << 8, !0);
        pool.hw_update(pte_pa(M2), 1 << 9 | 1 << 8, !0);
        let mut g = Gather::new();
        let mut seen = Vec::new();
        pt.read_and_clear_dirty(&pool, 0, 4 * M2, false, &mut g, |l| seen.push(l))
            .unwrap();
        assert_eq!(seen, vec![r(K4, 2 * K4), r(M2, 2 * M2)]);
        assert!(
            g.is_empty(),
            "reading without clearing needs no invalidation"
        );
        seen.clear();
        pt.read_and_clear_dirty(&pool, 0, 4 * M2, true, &mut g, |l| seen.push(l))
            .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(g.range(), Some(r(K4, 2 * M2)));
        assert!(!refwalk::vtd_ss(&pool, pt.root(), 4, 46, K4).unwrap().dirty);
        seen.clear();
        pt.read_and_clear_dirty(&pool, 0, 4 * M2, true, &mut g, |l| seen.push(l))
            .unwrap();
        assert!(seen.is_empty());
        g.complete(&pool);
        finish(&pool, pt);

        // Arm stage 2 (DBM): hardware grants S2AP[1] on the first write; a dirty page inside a
        // contiguous run reports and cleans the whole run.
        let pool = HostPool::new(16);
        let pt = PageTable::<ArmStage2<12>>::new(
            &pool,
            Config {
                dirty_tracking: true,
                ..Config::new(48, 48)
            },
        )
        .unwrap();
        pt.map(&pool, 0, 0x10_0000, K64, rw()).unwrap();
        let leaf_table = {
            let mut t = pt.root();
            for _ in 0..3 {
                t = pool.read_phys(t) & 0x0000_ffff_ffff_f000;
            }
            t
        };
        pool.hw_update(leaf_table + 3 * 8, 1 << 7, !0);
        let mut seen = Vec::new();
        pt.read_and_clear_dirty(&pool, 0, K64, true, &mut g, |l| seen.push(l))
            .unwrap();
        assert_eq!(seen, vec![r(0, K64)]);
        assert_eq!(g.leaf_entries(), 16);
        assert_eq!(
            pool.read_phys(leaf_table + 3 * 8) & (1 << 7),
            0,
            "write permission withdrawn"
        );
        g.complete(&pool);
        finish(&pool, pt);

        // Arm stage 1: clean = AP[2] set again.
        let pool = HostPool::new(16);
        let pt = PageTable::<ArmStage1<12>>::new(
            &pool,
            Config {
                dirty_tracking: true,
                contiguous_hint: false,
                ..Config::new(48, 48)
            },
        )
        .unwrap();
        pt.map(&pool, 0, 0x10_0000, K4, rw()).unwrap();
        let mut t = pt.root();
        for _ in 0..3 {
            t = pool.read_phys(t) & 0x0000_ffff_ffff_f000;
        }
        pool.hw_update(t, 0, !(1 << 7));
        let mut n = 0;
        pt.read_and_clear_dirty(&pool, 0, K4, true, &mut g, |_| n += 1)
            .unwrap();
        assert_eq!(n, 1);
        assert_ne!(pool.read_phys(t) & (1 << 7), 0);
        g.complete(&pool);
        finish(&pool, pt);
    }

    #[test]
    fn unmap_survives_hardware_access_bit_updates() {
        // VT-d with A/D sets A in table entries and A/D in leaves behind the engine's back; the
        // unmap CAS must retry, not give up.
        let pool = HostPool::new(16);
        let pt = PageTable::<Vtd>::new(
            &pool,
            Config {
                dirty_tracking: true,
                ..Config::new(48, 46)
            },
        )
        .unwrap();
        pt.map(&pool, 0, 0x1000, M2, rw()).unwrap();
        pool.hw_update(pt.root(), 1 << 8, !0);
        let mut g = Gather::new();
        assert_eq!(pt.unmap(&pool, 0, M2, &mut g), Ok(M2));
        g.complete(&pool);
        finish(&pool, pt);
    }

    /// Records every `clean` call on top of a `HostPool`.
    struct CleanLog<'a> {
        pool: &'a HostPool,
        log: Mutex<Vec<(PhysAddr, usize)>>,
    }
    impl TableMemory for CleanLog<'_> {
        type Entry = <HostPool as TableMemory>::Entry;
        fn alloc_table(&self, bytes: usize) -> Option<PhysAddr> {
            self.pool.alloc_table(bytes)
        }
        fn free_table(&self, pa: PhysAddr, bytes: usize) {
            self.pool.free_table(pa, bytes)
        }
        fn retire_table(&self, pa: PhysAddr, bytes: usize) {
            self.pool.retire_table(pa, bytes)
        }
        fn table(&self, pa: PhysAddr, entries: usize) -> &[Self::Entry] {
            self.pool.table(pa, entries)
        }
        fn clean(&self, pa: PhysAddr, bytes: usize) {
            self.log.lock().unwrap().push((pa, bytes));
        }
    }

    #[test]
    fn non_coherent_walkers_get_every_update_cleaned() {
        let pool = HostPool::new(16);
        let mem = CleanLog {
            pool: &pool,
            log: Mutex::new(Vec::new()),
        };
        let cfg = Config {
            coherent: false,
            ..Config::new(48, 46)
        };
        let pt = PageTable::<Vtd>::new(&mem, cfg).unwrap();
        assert_eq!(
            mem.log.lock().unwrap()[0],
            (pt.root(), 4096),
            "root cleaned before use"
        );
        mem.log.lock().unwrap().clear();
        pt.map(&mem, 0x20_0000, 0x1000, 3 * K4, rw()).unwrap();
        let log = mem.log.lock().unwrap().clone();
        // The three new tables are built privately and each cleaned whole, children first,
        // before anything points at them; then the single root entry that publishes the subtree.
        let whole: Vec<_> = log.iter().filter(|c| c.1 == 4096).map(|c| c.0).collect();
        assert_eq!(whole.len(), 3);
        assert_eq!(log[..3].iter().map(|c| c.0).collect::<Vec<_>>(), whole);
        let leaf_table = whole[0];
        let mut t = pt.root();
        for l in (2..=4u32).rev() {
            let idx = (0x20_0000u64 >> (12 + 9 * (l - 1))) & 0x1ff;
            t = pool.read_phys(t + idx * 8) & 0x000f_ffff_ffff_f000;
        }
        assert_eq!(t, leaf_table, "the leaf table is cleaned first");
        assert_eq!(
            log[3..],
            [(pt.root(), 8)],
            "then the publishing root entry, last"
        );
        // Unmap cleans the cleared run too.
        mem.log.lock().unwrap().clear();
        let mut g = Gather::new();
        pt.unmap(&mem, 0x20_0000, 3 * K4, &mut g).unwrap();
        assert_eq!(*mem.log.lock().unwrap(), vec![(leaf_table, 24)]);
        g.complete(&mem);
        // A mapper descending through existing tables cleans the entries it relies on.
        mem.log.lock().unwrap().clear();
        pt.map(&mem, 0x20_1000, 0x1000, K4, rw()).unwrap();
        assert_eq!(mem.log.lock().unwrap().len(), 4);
        finish(&pool, pt);
    }

    #[test]
    fn dump_and_census() {
        let pool = HostPool::new(16);
        let pt = PageTable::<ArmStage1<12>>::new(&pool, Config::new(48, 48)).unwrap();
        pt.map(&pool, 0, 0x10_0000, K64 + K4, rw()).unwrap();
        pt.map(
            &pool,
            0x4000_0000,
            0x8000_0000,
            M2,
            Prot::READ | Prot::DEVICE,
        )
        .unwrap();
        let mut s = String::new();
        pt.dump(&pool, &mut s).unwrap();
        println!("{s}");
        assert!(s.starts_with("Arm VMSAv8-64 stage 1: 4 levels, ias 48 oas 48"));
        assert!(
            s.contains("L0[0..16] 0x0..0x10000 -> 0x100000 (16 x 4K)"),
            "{s}"
        );
        assert!(s.contains("CONT"));
        assert!(
            s.contains("L0[16..17] 0x10000..0x11000 -> 0x110000 (1 x 4K)"),
            "{s}"
        );
        assert!(
            s.contains("L1[0..1] 0x40000000..0x40200000 -> 0x80000000 (1 x 2M)"),
            "{s}"
        );
        assert!(
            s.contains("AttrIndx=0"),
            "device memory uses MAIR index 0: {s}"
        );
        let c = pt.census(&pool);
        assert_eq!(c.leaves[0], 17);
        assert_eq!(c.contiguous[0], 16);
        assert_eq!(c.leaves[1], 1);
        assert_eq!(c.mapped, K64 + K4 + M2);
        assert_eq!(c.tables, [1, 2, 1, 1, 0]);
        finish(&pool, pt);
    }

    #[test]
    fn x86_and_arm_unmap_and_superpages_behave_alike() {
        fn exercise<F: Format>(ias: u32, oas: u32) {
            let pool = HostPool::new(64);
            let pt = PageTable::<F>::new(&pool, Config::new(ias, oas)).unwrap();
            pt.map(&pool, M2, 0, 2 * M2 + K4, rw()).unwrap();
            let mut g = Gather::new();
            assert_eq!(
                pt.unmap(&pool, M2 + K4, K4, &mut g),
                Err(UnmapError::SplitsLeaf {
                    leaf: r(M2, 2 * M2),
                    unmapped: 0
                })
            );
            assert_eq!(pt.unmap(&pool, 0, 8 * M2, &mut g), Ok(2 * M2 + K4));
            g.complete(&pool);
            finish(&pool, pt);
        }
        exercise::<X86FirstStage<4>>(47, 46);
        exercise::<X86FirstStage<5>>(56, 46);
        exercise::<ArmStage1<12>>(48, 48);
        exercise::<ArmStage2<12>>(40, 48);
        exercise::<VtdSecondStage<3>>(39, 39);
    }

    // ------------------------------------------------------------------------------------
    // Threads (real ones; the exhaustive interleavings are in pgtable_loom.rs)
    // ------------------------------------------------------------------------------------

    #[test]
    fn threads_on_disjoint_ranges_share_tables() {
        let threads = 4u64;
        let rounds = if cfg!(miri) { 2 } else { 200 };
        for mode in modes() {
            // Each round retires one table, reusable only after every thread has passed a
            // quiescent state. A descheduled thread holds reclamation back (that is what a grace
            // period means), so size the pool for every round's table waiting at once.
            let pool = HostPool::new((threads * rounds) as usize + 64);
            let pt = vtd(&pool, mode);
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (pool, pt) = (&pool, &pt);
                    s.spawn(move || {
                        let cpu = pool.register();
                        for round in 0..rounds {
                            // Interleaved pages in one leaf table, plus a private 2 MiB span so
                            // whole tables come and go next to the neighbours.
                            for k in 0..8u64 {
                                let iova = (k * threads + t) * K4;
                                pt.map(pool, iova, iova + 0x1000_0000, K4, rw()).unwrap();
                            }
                            let own = (8 + t) * M2 + (round % 2) * G1;
                            pt.map(pool, own, K4, M2, rw()).unwrap();
                            for k in 0..8u64 {
                                let iova = (k * threads + t) * K4;
                                assert_eq!(pt.iova_to_phys(pool, iova), Some(iova + 0x1000_0000));
                                let mut g = Gather::new();
                                assert_eq!(pt.unmap(pool, iova, K4, &mut g), Ok(K4));
                                g.complete(pool);
                            }
                            let mut g = Gather::new();
                            assert_eq!(pt.unmap(pool, own, M2, &mut g), Ok(M2));
                            assert_eq!(g.table_pages(), 1);
                            g.complete(pool);
                            pool.quiescent(cpu);
                        }
                        pool.offline(cpu);
                    });
                }
            });
            assert_eq!(pt.census(&pool).mapped, 0);
            assert_eq!(pt.table_pages(), pt.census(&pool).table_pages());
            finish(&pool, pt);
        }
    }

    #[test]
    fn racing_overlapping_calls_are_exact_in_untrusted_mode() {
        // Contract-breaking callers: maps of the same range from 4 threads. Exactly one wins each
        // round, the losers roll back; racing unmaps account for every page exactly once.
        let rounds = if cfg!(miri) { 2 } else { 300 };
        let pool = HostPool::new(64);
        let pt = vtd(&pool, Concurrency::Untrusted);
        let wins = std::sync::atomic::AtomicU64::new(0);
        let unmapped = std::sync::atomic::AtomicU64::new(0);
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (pool, pt, wins, unmapped, barrier) = (&pool, &pt, &wins, &unmapped, &barrier);
                s.spawn(move || {
                    for _ in 0..rounds {
                        barrier.wait();
                        match pt.map(pool, 0, t << 20, 8 * K4, rw()) {
                            Ok(()) => {
                                wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(MapError::Overlap { .. }) => {}
                            Err(e) => panic!("{e:?}"),
                        }
                        barrier.wait();
                        let mut g = Gather::new();
                        let n = pt.unmap(pool, 0, 8 * K4, &mut g).unwrap();
                        unmapped.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        g.complete(pool);
                    }
                });
            }
        });
        // At most one map per round can win, and every page it mapped is unmapped exactly once.
        let w = wins.load(std::sync::atomic::Ordering::Relaxed);
        // Identical ranges: every map starts at the same entry, so exactly one wins each round.
        assert_eq!(w, rounds);
        assert_eq!(
            unmapped.load(std::sync::atomic::Ordering::Relaxed),
            w * 8 * K4
        );
        assert_eq!(pt.census(&pool).mapped, 0);
        finish(&pool, pt);
    }

    // ---------------------------------------------------------------------------------------
    // map_runs: one walk over many physical runs
    // ---------------------------------------------------------------------------------------

    /// What a piece of a [`Pieces`] source does when asked for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Piece {
        Good,
        /// `run_at` returns `None`.
        Refused,
        /// A run at an address that is not granule-aligned.
        Misaligned,
        /// A run shorter than a granule.
        Short,
        /// A run past any output size.
        TooHigh,
    }

    /// Runs `(offset, pa, len)` back to back from offset 0, recording every offset asked for.
    struct Pieces {
        runs: Vec<(u64, PhysAddr, u64, Piece)>,
        asked: Vec<u64>,
    }

    impl Pieces {
        fn new(runs: &[(PhysAddr, u64)]) -> Self {
            let mut off = 0;
            let runs = runs
                .iter()
                .map(|&(pa, len)| {
                    let r = (off, pa, len, Piece::Good);
                    off += len;
                    r
                })
                .collect();
            Pieces {
                runs,
                asked: Vec::new(),
            }
        }
        fn spoil(mut self, k: usize, how: Piece) -> Self {
            self.runs[k].3 = how;
            self
        }
        fn len(&self) -> u64 {
            self.runs.last().map_or(0, |r| r.0 + r.2)
        }
        fn starts(&self) -> Vec<u64> {
            self.runs.iter().map(|r| r.0).collect()
        }
        /// The physical address of byte `off` of the range, per the pieces.
        fn pa_of(&self, off: u64) -> PhysAddr {
            let r = self
                .runs
                .iter()
                .find(|r| r.0 <= off && off < r.0 + r.2)
                .unwrap();
            r.1 + (off - r.0)
        }
    }

    impl RunSource for Pieces {
        fn run_at(&mut self, off: u64) -> Option<(PhysAddr, u64)> {
            self.asked.push(off);
            let &(o, pa, len, how) = self.runs.iter().find(|r| r.0 <= off && off < r.0 + r.2)?;
            let (pa, len) = (pa + (off - o), len - (off - o));
            match how {
                Piece::Good => Some((pa, len)),
                Piece::Refused => None,
                Piece::Misaligned => Some((pa | 0x800, len)),
                Piece::Short => Some((pa, 0x800)),
                Piece::TooHigh => Some((1 << 52, len)),
            }
        }
    }

    /// 256 single pages, none adjacent, in descending host order.
    fn scattered_pages(n: u64) -> Vec<(PhysAddr, u64)> {
        (0..n)
            .map(|k| (0x8000_0000 + (n - k) * 2 * K4, K4))
            .collect()
    }

    #[test]
    fn map_runs_maps_scattered_pages_in_one_leaf_table() {
        for mode in modes() {
            let pool = HostPool::new(16);
            let pt = vtd(&pool, mode);
            let iova = 0x4000_0000;
            let mut src = Pieces::new(&scattered_pages(256));
            pt.map_runs(&pool, iova, M2 / 2, &mut src, rw()).unwrap();
            assert_eq!(src.asked, src.starts(), "one request per run, in order");
            // Checked with the spec-derived walker, not the engine's own lookup.
            for k in 0..256 {
                let w = refwalk::vtd_ss(&pool, pt.root(), 4, 46, iova + k * K4).unwrap();
                assert_eq!((w.pa, w.page_size), (src.pa_of(k * K4), K4), "page {k}");
                assert!(w.read && w.write);
            }
            assert_eq!(pt.iova_to_phys(&pool, iova + M2 / 2), None);
            // Root + one table per level below: the runs share one leaf table.
            assert_eq!(pt.table_pages(), 4);
            let c = pt.census(&pool);
            assert_eq!((c.leaves[0], c.mapped), (256, M2 / 2));
            let mut g = Gather::new();
            assert_eq!(pt.unmap(&pool, iova, M2 / 2, &mut g), Ok(M2 / 2));
            g.complete(&pool);
            finish(&pool, pt);
        }
    }

    #[test]
    fn map_runs_picks_each_leaf_size_from_the_run() {
        for mode in modes() {
            let pool = HostPool::new(16);
            let pt = vtd(&pool, mode);
            // Three pages, then a run that reaches a 2 MiB boundary, then a 2 MiB-aligned
            // 2 MiB run (one 2 MiB leaf), a 64 KiB run, a 2 MiB run that is only 4 KiB-aligned
            // (pages), and a last run reported longer than what is left (clipped).
            let iova = 0x4000_0000 - 3 * K4 - (M2 - 4 * K4);
            let pieces = [
                (0x9000_3000, K4),
                (0x9001_0000, K4),
                (0x9000_0000, K4),
                (0xa000_0000, M2 - 4 * K4),
                (0xc000_0000, M2),
                (0xd000_0000, K64),
                (0xe000_1000, M2),
                (0xf000_0000, 2 * M2),
            ];
            let mut src = Pieces::new(&pieces);
            let len = src.len() - M2 - K4;
            pt.map_runs(&pool, iova, len, &mut src, rw()).unwrap();
            assert_eq!(src.asked, src.starts());
            for off in (0..len).step_by(K4 as usize) {
                let w = refwalk::vtd_ss(&pool, pt.root(), 4, 46, iova + off).unwrap();
                assert_eq!(w.pa, src.pa_of(off), "offset {off:#x}");
            }
            // Only the aligned 2 MiB run gets a 2 MiB leaf, its neighbours pages.
            let two_meg = iova + 3 * K4 + (M2 - 4 * K4);
            assert_eq!(two_meg % M2, 0);
            assert_eq!(pt.translate(&pool, two_meg).unwrap().page_size, M2);
            assert_eq!(pt.translate(&pool, two_meg - K4).unwrap().page_size, K4);
            assert_eq!(pt.translate(&pool, two_meg + M2).unwrap().page_size, K4);
            let c = pt.census(&pool);
            assert_eq!((c.leaves[1], c.mapped), (1, len));
            assert_eq!(pt.iova_to_phys(&pool, iova + len), None);
            let mut g = Gather::new();
            assert_eq!(pt.unmap(&pool, iova, len, &mut g), Ok(len));
            g.complete(&pool);
            finish(&pool, pt);
        }
    }

    #[test]
    fn map_runs_failures_roll_back_everything_this_call_installed() {
        for mode in modes() {
            for how in [
                Piece::Refused,
                Piece::Misaligned,
                Piece::Short,
                Piece::TooHigh,
            ] {
                let pool = HostPool::new(16);
                let pt = vtd(&pool, mode);
                let iova = 0x4000_0000;
                // Something mapped in the same leaf table, which must survive (and makes the
                // leaf table a published one: installed entries are then rolled back one by one).
                pt.map(&pool, iova + M2 - K4, 0x7000_0000, K4, rw())
                    .unwrap();
                let before = snapshot(&pt, &pool, iova - M2, iova + 2 * M2);
                let mut src = Pieces::new(&scattered_pages(300)).spoil(200, how);
                let len = src.len();
                assert_eq!(
                    pt.map_runs(&pool, iova, len, &mut src, rw()),
                    Err(MapError::BadRun {
                        iova: iova + 200 * K4,
                        rolled_back: r(iova, iova + 200 * K4)
                    }),
                    "{how:?} ({mode:?})"
                );
                assert_eq!(
                    src.asked,
                    src.starts()[..201],
                    "nothing asked past the bad run"
                );
                assert_eq!(snapshot(&pt, &pool, iova - M2, iova + 2 * M2), before);
                // Into tables this call builds: the subtree is never published, so nothing is
                // rolled back (nothing was ever visible) and the pages go back to the pool.
                let in_use = pool.frames_in_use();
                let mut src = Pieces::new(&scattered_pages(300)).spoil(200, how);
                assert_eq!(
                    pt.map_runs(&pool, 4 * G1, len, &mut src, rw()),
                    Err(MapError::BadRun {
                        iova: 4 * G1 + 200 * K4,
                        rolled_back: r(4 * G1, 4 * G1)
                    })
                );
                assert_eq!(pool.frames_in_use(), in_use);
                assert_eq!(pt.iova_to_phys(&pool, 4 * G1), None);
                // The very first run bad: nothing installed.
                let mut src = Pieces::new(&scattered_pages(4)).spoil(0, how);
                assert_eq!(
                    pt.map_runs(&pool, iova, 4 * K4, &mut src, rw()),
                    Err(MapError::BadRun {
                        iova,
                        rolled_back: r(iova, iova)
                    })
                );
                let mut src = Pieces::new(&scattered_pages(1)).spoil(0, how);
                assert_eq!(
                    pt.map_runs(&pool, iova, K4, &mut src, rw()),
                    Err(MapError::BadRun {
                        iova,
                        rolled_back: r(iova, iova)
                    })
                );
                assert_eq!(snapshot(&pt, &pool, iova - M2, iova + 2 * M2), before);
                // An overlap before the bad run wins; after it, the bad run does.
                pt.map(&pool, iova + 100 * K4, 0x7000_0000, K4, rw())
                    .unwrap();
                let before = snapshot(&pt, &pool, iova - M2, iova + 2 * M2);
                let mut src = Pieces::new(&scattered_pages(300)).spoil(200, how);
                assert_eq!(
                    pt.map_runs(&pool, iova, len, &mut src, rw()),
                    Err(MapError::Overlap {
                        iova: iova + 100 * K4,
                        rolled_back: r(iova, iova + 100 * K4)
                    })
                );
                let mut src = Pieces::new(&scattered_pages(300)).spoil(50, how);
                assert_eq!(
                    pt.map_runs(&pool, iova, len, &mut src, rw()),
                    Err(MapError::BadRun {
                        iova: iova + 50 * K4,
                        rolled_back: r(iova, iova + 50 * K4)
                    })
                );
                assert_eq!(snapshot(&pt, &pool, iova - M2, iova + 2 * M2), before);
                let mut g = Gather::new();
                pt.unmap(&pool, iova - M2, 4 * M2, &mut g).unwrap();
                g.complete(&pool);
                finish(&pool, pt);
            }
        }
    }

    #[test]
    fn map_runs_out_of_memory_rolls_back() {
        // Root + 3 tables: one path down to a leaf table, no second leaf table.
        let pool = HostPool::new(4);
        let pt = vtd(&pool, Concurrency::Untrusted);
        let iova = 0x4000_0000 + M2 - 8 * K4;
        pt.map(&pool, iova - K4, 0x7000_0000, K4, rw()).unwrap();
        let mut src = Pieces::new(&scattered_pages(16));
        // The first 8 pages go into the published leaf table; the next 2 MiB needs a second
        // leaf table, and there is no page for it.
        assert_eq!(
            pt.map_runs(&pool, iova, 16 * K4, &mut src, rw()),
            Err(MapError::NoMemory {
                rolled_back: r(iova, iova + 8 * K4)
            })
        );
        // The ninth run was fetched (its address decides the leaf size) before the table.
        assert_eq!(src.asked, src.starts()[..9]);
        for k in 0..16 {
            assert_eq!(pt.iova_to_phys(&pool, iova + k * K4), None);
        }
        assert_eq!(pt.iova_to_phys(&pool, iova - K4), Some(0x7000_0000));
        finish(&pool, pt);
    }

    #[test]
    fn map_runs_cleans_each_leaf_line_once_for_non_coherent_walkers() {
        let pool = HostPool::new(16);
        let mem = CleanLog {
            pool: &pool,
            log: Mutex::new(Vec::new()),
        };
        let cfg = Config {
            coherent: false,
            ..Config::new(48, 46)
        };
        let pt = PageTable::<Vtd>::new(&mem, cfg).unwrap();
        let iova = 0x4000_0000;
        // A page at the far end of the 2 MiB span: the leaf table is published before the runs.
        pt.map(&mem, iova + M2 - K4, 0x7000_0000, K4, rw()).unwrap();
        let mut t = pt.root();
        for l in (2..=4u32).rev() {
            let idx = (iova >> (12 + 9 * (l - 1))) & 0x1ff;
            t = pool.read_phys(t + idx * 8) & 0x000f_ffff_ffff_f000;
        }
        mem.log.lock().unwrap().clear();
        let mut src = Pieces::new(&scattered_pages(256));
        pt.map_runs(&mem, iova, M2 / 2, &mut src, rw()).unwrap();
        let log = mem.log.lock().unwrap().clone();
        let in_leaf: Vec<_> = log
            .iter()
            .filter(|c| c.0 >= t && c.0 < t + 4096)
            .copied()
            .collect();
        // 256 leaves written by 256 runs: one clean of their 2 KiB (32 lines), not one per run.
        assert_eq!(in_leaf, vec![(t, 256 * 8)]);
        // And one per table entry descended through (levels 4, 3, 2).
        assert_eq!(log.len(), 4, "{log:x?}");
        finish_keep(&pool, pt);
    }
}

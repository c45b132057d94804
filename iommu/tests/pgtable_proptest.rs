//! Property tests: random sequences of maps and unmaps (sizes from 4 KiB to 6 MiB, alignments
//! that do and do not allow superpages and contiguous runs, overlaps) checked against a model
//! that knows nothing about tables: a map from IOVA page to physical page, plus the extents of the
//! successful map calls.
//!
//! Properties, after every operation:
//! * a map succeeds iff none of its pages is mapped; a failed map reports the first mapped page
//!   and rolls back exactly what it installed, so no translation changes;
//! * an unmap returns exactly the bytes the model had mapped in the range, or is rejected as
//!   splitting a leaf; a rejection changes nothing, and the leaf it names is larger than a page,
//!   lies within a single earlier map call and straddles one end of the range;
//! * every page in and around the touched range translates as the model says;
//! * at the end: the table's own page count matches a census, unmapping the whole window removes
//!   everything, and destroying the table returns every page to the pool.

#[path = "pgtable_support/mod.rs"]
mod support;

mod pgtable {
    use super::support::{HostPool, refwalk};
    use iommu::pgtable::{
        ArmStage2, Concurrency, Config, Format, Gather, IovaRange, MapError, PageTable, Prot,
        RunSource, UnmapError, VtdSecondStage, X86FirstStage,
    };
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const K4: u64 = 4 << 10;
    const K64: u64 = 64 << 10;
    const M2: u64 = 2 << 20;
    /// The window straddles a 1 GiB boundary, so level-2 tables differ within it.
    const BASE: u64 = (1 << 30) - (32 << 20);
    const WINDOW: u64 = 64 << 20;
    /// Every page natively; under miri (where each atomic load is ~0.1 ms) every 61st page, a
    /// stride coprime with every alignment in play.
    const STRIDE: u64 = if cfg!(miri) { 61 * K4 } else { K4 };

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            iova: u64,
            len: u64,
            pa_off: u64,
            write: bool,
        },
        Unmap {
            iova: u64,
            len: u64,
        },
        /// `map_runs` over runs `(len, pa)` back to back; `bad`: the run that is refused.
        MapRuns {
            iova: u64,
            runs: Vec<(u64, u64)>,
            bad: Option<usize>,
            write: bool,
        },
    }

    fn aligned_iova() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0..WINDOW / K4).prop_map(|p| BASE + p * K4),
            (0..WINDOW / K64).prop_map(|p| BASE + p * K64),
            (0..WINDOW / M2).prop_map(|p| BASE + p * M2),
        ]
    }

    fn length() -> impl Strategy<Value = u64> {
        prop_oneof![
            (1..=20u64).prop_map(|n| n * K4),
            (1..=3u64).prop_map(|n| n * K64),
            (1..=3u64).prop_map(|n| n * M2),
            (1..=2u64, 1..=3u64).prop_map(|(a, b)| a * M2 + b * K4),
        ]
    }

    /// Runs of a scattered output: pages, short runs, 64 KiB and 2 MiB runs, at addresses that
    /// keep or break superpage / contiguous alignment, each far from the others.
    fn map_runs() -> impl Strategy<Value = Op> {
        let run = (
            prop_oneof![
                Just(K4),
                (2..=5u64).prop_map(|n| n * K4),
                Just(K64),
                Just(M2)
            ],
            prop_oneof![Just(0u64), Just(0x1000), Just(0x1_0000)],
        );
        (
            aligned_iova(),
            proptest::collection::vec(run, 1..10),
            proptest::option::weighted(0.3, 0..10usize),
            any::<bool>(),
        )
            .prop_map(|(iova, runs, bad, write)| {
                let mut left = BASE + WINDOW - iova;
                let runs: Vec<(u64, u64)> = runs
                    .into_iter()
                    .enumerate()
                    .map_while(|(k, (len, off))| {
                        let len = len.min(left);
                        left -= len;
                        (len != 0).then_some((len, 0x2_0000_0000 + k as u64 * (8 << 20) + off))
                    })
                    .collect();
                let bad = bad.filter(|&b| b < runs.len());
                Op::MapRuns {
                    iova,
                    runs,
                    bad,
                    write,
                }
            })
    }

    /// The runs of an `Op::MapRuns` as a source, recording the offsets asked for.
    struct Src<'a> {
        runs: &'a [(u64, u64)],
        bad: Option<usize>,
        asked: Vec<u64>,
    }

    impl RunSource for Src<'_> {
        fn run_at(&mut self, off: u64) -> Option<(u64, u64)> {
            self.asked.push(off);
            let mut start = 0;
            for (k, &(len, pa)) in self.runs.iter().enumerate() {
                if off < start + len {
                    return (self.bad != Some(k))
                        .then_some((pa + (off - start), len - (off - start)));
                }
                start += len;
            }
            None
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        // Output offsets: keep superpage/contiguous alignment, or break it.
        let pa_off = prop_oneof![
            Just(0x1_0000_0000u64),
            Just(0x1_0000_1000),
            Just(0x1_0001_0000)
        ];
        prop_oneof![
            3 => (aligned_iova(), length(), pa_off, any::<bool>()).prop_map(|(iova, len, pa_off, write)| {
                Op::Map { iova, len: len.min(BASE + WINDOW - iova), pa_off, write }
            }),
            2 => (aligned_iova(), length()).prop_map(|(iova, len)| Op::Unmap {
                iova,
                len: len.min(BASE + WINDOW - iova),
            }),
            2 => map_runs(),
        ]
    }

    #[derive(Default)]
    struct Model {
        pages: BTreeMap<u64, u64>,
        extents: Vec<IovaRange>,
    }

    impl Model {
        fn bytes_in(&self, start: u64, end: u64) -> u64 {
            self.pages.range(start..end).count() as u64 * K4
        }
        fn remove(&mut self, start: u64, end: u64) {
            let keys: Vec<u64> = self.pages.range(start..end).map(|(k, _)| *k).collect();
            for k in keys {
                self.pages.remove(&k);
            }
            let mut out = Vec::new();
            for e in self.extents.drain(..) {
                if e.end <= start || e.start >= end {
                    out.push(e);
                    continue;
                }
                if e.start < start {
                    out.push(IovaRange {
                        start: e.start,
                        end: start,
                    });
                }
                if e.end > end {
                    out.push(IovaRange {
                        start: end,
                        end: e.end,
                    });
                }
            }
            self.extents = out;
        }
    }

    fn check_range<F: Format>(pt: &PageTable<F>, pool: &HostPool, m: &Model, start: u64, end: u64) {
        let lo = start.saturating_sub(K64).max(BASE);
        let hi = (end + K64).min(BASE + WINDOW);
        for a in (lo..hi).step_by(STRIDE as usize) {
            assert_eq!(
                pt.iova_to_phys(pool, a),
                m.pages.get(&a).copied(),
                "page {a:#x}"
            );
        }
    }

    fn run<F: Format>(cfg: Config, ops: &[Op]) {
        let pool = HostPool::new(96);
        let pt = PageTable::<F>::new(&pool, cfg).unwrap();
        let mut m = Model::default();
        for op in ops {
            match *op {
                Op::Map {
                    iova,
                    len,
                    pa_off,
                    write,
                } => {
                    let pa = iova + pa_off;
                    let prot = if write {
                        Prot::READ | Prot::WRITE
                    } else {
                        Prot::READ
                    };
                    let end = iova + len;
                    let first_mapped = m.pages.range(iova..end).next().map(|(k, _)| *k);
                    let r = pt.map(&pool, iova, pa, len, prot);
                    match first_mapped {
                        Some(at) => assert_eq!(
                            r,
                            Err(MapError::Overlap {
                                iova: at,
                                rolled_back: IovaRange {
                                    start: iova,
                                    end: at
                                }
                            }),
                            "{op:?}"
                        ),
                        None => {
                            assert_eq!(r, Ok(()), "{op:?}");
                            for k in 0..len / K4 {
                                m.pages.insert(iova + k * K4, pa + k * K4);
                            }
                            m.extents.push(IovaRange { start: iova, end });
                        }
                    }
                    check_range(&pt, &pool, &m, iova, end);
                }
                Op::MapRuns {
                    ref runs,
                    iova,
                    bad,
                    write,
                } => {
                    let prot = if write {
                        Prot::READ | Prot::WRITE
                    } else {
                        Prot::READ
                    };
                    let starts: Vec<u64> = runs
                        .iter()
                        .scan(0, |off, &(len, _)| {
                            *off += len;
                            Some(*off - len)
                        })
                        .collect();
                    let len: u64 = runs.iter().map(|r| r.0).sum();
                    let end = iova + len;
                    let first_mapped = m.pages.range(iova..end).next().map(|(k, _)| *k);
                    let bad_at = bad.map(|b| iova + starts[b]);
                    let mut src = Src {
                        runs,
                        bad,
                        asked: Vec::new(),
                    };
                    let r = pt.map_runs(&pool, iova, len, &mut src, prot);
                    // The walk meets the first problem in IOVA order, and asks for each run once,
                    // in order, up to the run it stops in.
                    let stop = match (first_mapped, bad_at) {
                        (Some(at), b) if b.is_none_or(|b| at < b) => {
                            assert_eq!(
                                r,
                                Err(MapError::Overlap {
                                    iova: at,
                                    rolled_back: IovaRange {
                                        start: iova,
                                        end: at
                                    }
                                }),
                                "{op:?}"
                            );
                            at
                        }
                        (_, Some(b)) => {
                            match r {
                                Err(MapError::BadRun {
                                    iova: x,
                                    rolled_back,
                                }) if x == b
                                    && rolled_back.start == iova
                                    && rolled_back.end <= b => {}
                                _ => panic!("{op:?}: {r:?}"),
                            }
                            b
                        }
                        _ => {
                            assert_eq!(r, Ok(()), "{op:?}");
                            for (&(rlen, pa), &s) in runs.iter().zip(&starts) {
                                for k in 0..rlen / K4 {
                                    m.pages.insert(iova + s + k * K4, pa + k * K4);
                                }
                            }
                            m.extents.push(IovaRange { start: iova, end });
                            end - 1
                        }
                    };
                    let want: Vec<u64> = starts
                        .iter()
                        .copied()
                        .filter(|&s| iova + s <= stop)
                        .collect();
                    assert_eq!(src.asked, want, "{op:?}");
                    check_range(&pt, &pool, &m, iova, end);
                }
                Op::Unmap { iova, len } => {
                    let end = iova + len;
                    let mut g = Gather::new();
                    match pt.unmap(&pool, iova, len, &mut g) {
                        Ok(bytes) => {
                            assert_eq!(bytes, m.bytes_in(iova, end), "{op:?}");
                            if bytes != 0 {
                                let gr = g.range().unwrap();
                                assert!(
                                    gr.start >= iova && gr.end <= end,
                                    "gathered {gr:?} for {op:?}"
                                );
                            }
                            m.remove(iova, end);
                        }
                        Err(UnmapError::SplitsLeaf { leaf, unmapped }) => {
                            assert_eq!(unmapped, 0);
                            assert!(g.is_empty(), "a rejected unmap gathers nothing");
                            assert!(leaf.len() > K4, "{leaf:?}");
                            assert!(
                                (leaf.start < iova && iova < leaf.end)
                                    || (leaf.start < end && end < leaf.end),
                                "{leaf:?} does not straddle {op:?}"
                            );
                            assert!(
                                m.extents
                                    .iter()
                                    .any(|e| e.start <= leaf.start && leaf.end <= e.end),
                                "{leaf:?} is not inside one map call"
                            );
                        }
                        Err(e) => panic!("{op:?}: {e:?}"),
                    }
                    g.complete(&pool);
                    check_range(&pt, &pool, &m, iova, end);
                }
            }
        }
        // Full check, then tear down.
        check_range(&pt, &pool, &m, BASE, BASE + WINDOW);
        let c = pt.census(&pool);
        assert_eq!(c.mapped, m.pages.len() as u64 * K4);
        assert_eq!(c.table_pages(), pt.table_pages());
        let mut g = Gather::new();
        assert_eq!(
            pt.unmap(&pool, BASE, WINDOW, &mut g),
            Ok(m.pages.len() as u64 * K4)
        );
        g.complete(&pool);
        assert_eq!(pt.census(&pool).mapped, 0);
        assert_eq!(pt.census(&pool).table_pages(), pt.table_pages());
        pt.destroy(&pool);
        pool.reclaim();
        assert_eq!(pool.frames_in_use(), 0);
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: if cfg!(miri) { 2 } else { 256 },
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(op(), if cfg!(miri) { 1..8 } else { 1..48 })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn vtd_second_stage_matches_model(ops in ops()) {
            run::<VtdSecondStage<4>>(Config::new(48, 46), &ops);
        }

        #[test]
        fn vtd_cooperative_matches_model(ops in ops()) {
            let cfg = Config { concurrency: Concurrency::Cooperative, ..Config::new(48, 46) };
            run::<VtdSecondStage<4>>(cfg, &ops);
        }

        #[test]
        fn arm_stage2_with_contiguous_runs_matches_model(ops in ops()) {
            run::<ArmStage2<12>>(Config::new(40, 48), &ops);
        }

        #[test]
        fn x86_first_stage_matches_model(ops in ops()) {
            run::<X86FirstStage<4>>(Config::new(47, 46), &ops);
        }

        /// The engine's translations agree with the spec-derived reference walker.
        #[test]
        fn vtd_reference_walk_agrees(ops in ops()) {
            let pool = HostPool::new(96);
            let pt = PageTable::<VtdSecondStage<4>>::new(&pool, Config::new(48, 46)).unwrap();
            for op in &ops {
                match *op {
                    Op::Map { iova, len, pa_off, .. } => {
                        let _ = pt.map(&pool, iova, iova + pa_off, len, Prot::READ | Prot::WRITE);
                    }
                    Op::Unmap { iova, len } => {
                        let mut g = Gather::new();
                        let _ = pt.unmap(&pool, iova, len, &mut g);
                        g.complete(&pool);
                    }
                    Op::MapRuns { iova, ref runs, bad, .. } => {
                        let len = runs.iter().map(|r| r.0).sum();
                        let mut src = Src { runs, bad, asked: Vec::new() };
                        let _ = pt.map_runs(&pool, iova, len, &mut src, Prot::READ | Prot::WRITE);
                    }
                }
            }
            for a in (BASE..BASE + WINDOW).step_by(STRIDE as usize) {
                let r = refwalk::vtd_ss(&pool, pt.root(), 4, 46, a).ok().map(|w| w.pa);
                prop_assert_eq!(r, pt.iova_to_phys(&pool, a));
            }
            pt.destroy(&pool);
        }
    }
}

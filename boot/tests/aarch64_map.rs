//! The EL2 identity map builder: RAM Normal, everything else Device, checked by walking the
//! tables the way the MMU does.

use boot::aarch64::map::{self, DESC_BLOCK, MapError, Table};
use boot::{BootInfo, BootProtocol, MemoryKind, MemoryRegion};
use std::ops::Range;

const TABLES_PA: u64 = 0x4030_0000;

fn info(regions: &[(u64, u64, MemoryKind)]) -> BootInfo {
    let mut info = BootInfo::new(BootProtocol::Arm64Image);
    for &(start, len, kind) in regions {
        info.push_region(MemoryRegion { start, len, kind });
    }
    info
}

/// A single range, as a Vec (clippy rightly distrusts `[a..b]` literals).
fn one(start: u64, end: u64) -> Vec<Range<u64>> {
    vec![Range { start, end }]
}

fn normal_of(info: &BootInfo) -> Vec<Range<u64>> {
    let mut buf: Vec<Range<u64>> = (0..512).map(|_| 0..0).collect();
    let n = map::normal_ranges(info, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

struct Built {
    tables: Vec<Table>,
    limit: u64,
    stats: map::MapStats,
}

fn build(normal: &[Range<u64>], pool: usize, image: Range<u64>) -> Result<Built, MapError> {
    let mut tables = vec![Table::EMPTY; pool];
    let limit = map::limit_for(normal, 48);
    let stats = map::build(normal, limit, image, &mut tables, TABLES_PA)?;
    Ok(Built {
        tables,
        limit,
        stats,
    })
}

/// (memory type, level of the leaf) for `va`, or None when unmapped.
fn lookup(b: &Built, va: u64) -> Option<(&'static str, usize)> {
    let (desc, level) = map::walk(&b.tables, TABLES_PA, 0, va)?;
    let oa_mask = !(map::level_size(level) - 1) & map::OA_MASK;
    assert_eq!(desc & oa_mask, va & oa_mask, "identity map at {va:#x}");
    assert_eq!(desc & map::DESC_VALID, 1);
    assert_eq!(
        desc & 0b11 == DESC_BLOCK,
        level < 3,
        "blocks at levels 1-2, pages at 3"
    );
    let kind = match (desc >> 2) & 7 {
        1 => {
            assert_eq!(desc & map::XN, 0, "RAM is executable");
            "normal"
        }
        0 => {
            assert_ne!(desc & map::XN, 0, "devices are execute-never");
            "device"
        }
        other => panic!("unexpected AttrIndx {other}"),
    };
    assert_ne!(desc & map::AF, 0);
    Some((kind, level))
}

fn qemu_virt() -> BootInfo {
    info(&[
        (0x4000_0000, 256 << 20, MemoryKind::Usable),
        (0x4020_0000, 0x98000, MemoryKind::InUse),
        (0x4000_0000, 1 << 20, MemoryKind::InUse),
    ])
}

#[test]
fn qemu_virt_layout() {
    let info = qemu_virt();
    let normal = normal_of(&info);
    assert_eq!(normal, one(0x4000_0000, 0x5000_0000));
    let b = build(&normal, 64, 0x4020_0000..0x4029_8000).unwrap();
    assert_eq!(
        b.limit,
        1 << 40,
        "at least 40 bits: QEMU's high ECAM is at 0x40_1000_0000"
    );
    assert_eq!(
        b.stats.tables_used, 4,
        "L0 + 2 L1 (1 TiB) + one L2 for the RAM GiB"
    );
    assert_eq!(b.stats.normal_bytes, 256 << 20);
    assert_eq!(lookup(&b, 0x0900_0000), Some(("device", 1)), "PL011");
    assert_eq!(lookup(&b, 0x0905_0000), Some(("device", 1)), "SMMUv3");
    assert_eq!(lookup(&b, 0x4000_0000), Some(("normal", 2)), "DTB");
    assert_eq!(lookup(&b, 0x4020_0000), Some(("normal", 2)), "image");
    assert_eq!(lookup(&b, 0x4fff_ffff), Some(("normal", 2)));
    assert_eq!(
        lookup(&b, 0x5000_0000),
        Some(("device", 2)),
        "above RAM in the same GiB"
    );
    assert_eq!(
        lookup(&b, 0x40_1000_0000),
        Some(("device", 1)),
        "high PCIe ECAM"
    );
    assert_eq!(lookup(&b, 0xff_ffff_ffff), Some(("device", 1)));
    assert_eq!(lookup(&b, 1 << 40), None, "nothing above the limit");
}

#[test]
fn reservations_are_carved_out_but_in_use_wins() {
    let info = info(&[
        (0x8000_0000, 0x8000_0000, MemoryKind::Usable),
        (0x8000_1800, 0x1000, MemoryKind::Reserved), // grows to 0x8000_1000..0x8000_3000
        (0x9000_0000, 0x20_0000, MemoryKind::Reserved),
        (0x9000_0000, 0x1000, MemoryKind::InUse), // e.g. a DTB the loader also /memreserve/d
        (0x1_0000_0000, 0x10_0000, MemoryKind::Reserved), // outside RAM: no effect
    ]);
    let normal = normal_of(&info);
    assert_eq!(
        normal,
        [
            0x8000_0000..0x8000_1000,
            0x8000_3000..0x9000_0000 + 0x1000,
            0x9020_0000..0x1_0000_0000
        ]
    );
    let b = build(&normal, 64, 0x8020_0000..0x8030_0000).unwrap();
    assert_eq!(lookup(&b, 0x8000_0000), Some(("normal", 3)));
    assert_eq!(lookup(&b, 0x8000_1000), Some(("device", 3)));
    assert_eq!(lookup(&b, 0x8000_2fff), Some(("device", 3)));
    assert_eq!(lookup(&b, 0x8000_3000), Some(("normal", 3)));
    assert_eq!(lookup(&b, 0x8020_0000), Some(("normal", 2)));
    assert_eq!(lookup(&b, 0x9000_0000), Some(("normal", 3)));
    assert_eq!(lookup(&b, 0x9000_1000), Some(("device", 3)));
    assert_eq!(lookup(&b, 0x9020_0000), Some(("normal", 2)));
    assert_eq!(lookup(&b, 0xc000_0000), Some(("normal", 1)));
    assert_eq!(lookup(&b, 0x1_0000_0000), Some(("device", 1)));
}

#[test]
fn unaligned_ram_shrinks_and_merges() {
    let info = info(&[
        (0x4000_0800, 0x1000, MemoryKind::Usable), // no whole page: nothing
        (0x5000_0000, 0x10_0000, MemoryKind::Usable),
        (0x5010_0000, 0x10_0000, MemoryKind::Usable), // touches the previous one
        (0x6000_0001, 0x2000, MemoryKind::Usable),    // one whole page: 0x6000_1000
    ]);
    assert_eq!(
        normal_of(&info),
        [0x5000_0000..0x5020_0000, 0x6000_1000..0x6000_2000]
    );
}

#[test]
fn limit_follows_ram_and_pa_size() {
    assert_eq!(map::limit_for(&[], 48), 1 << 40);
    assert_eq!(
        map::limit_for(&one(0x80_0000_0000, 0x200_4000_0000), 48),
        0x200_4000_0000
    );
    assert_eq!(
        map::limit_for(&one(0x8000_0000, 0x1_0000_0000), 36),
        1 << 36
    );
    assert_eq!(map::limit_for(&one(0, 1 << 47), 52), 1 << 47);
    assert_eq!(map::parange_bits(0b0010), 40);
    assert_eq!(map::parange_bits(0b0101), 48);
    assert_eq!(map::parange_bits(0b0110), 52);
}

#[test]
fn ram_high_up_is_covered() {
    // A server with RAM at 0x80_0000_0000 (512 GiB) and beyond 1 TiB.
    let info = info(&[(0x80_0000_0000, 0x100_0000_0000, MemoryKind::Usable)]);
    let normal = normal_of(&info);
    let b = build(&normal, 64, 0x80_0020_0000..0x80_0030_0000).unwrap();
    assert_eq!(b.limit, 0x180_0000_0000);
    assert_eq!(lookup(&b, 0x80_0000_0000), Some(("normal", 1)));
    assert_eq!(lookup(&b, 0x17f_ffff_ffff), Some(("normal", 1)));
    assert_eq!(lookup(&b, 0x7f_ffff_ffff), Some(("device", 1)));
    assert_eq!(lookup(&b, 0x180_0000_0000), None);
}

#[test]
fn pool_exhaustion() {
    // Many small RAM fragments, each needing its own level-3 table.
    let mut regions: Vec<(u64, u64, MemoryKind)> = (0..40)
        .map(|i| {
            (
                0x4000_0000 + i * 0x40_0000 + 0x1000,
                0x10_0000,
                MemoryKind::Usable,
            )
        })
        .collect();
    regions.push((0x4000_0000, 0x10_0000, MemoryKind::InUse)); // "image", its own 2 MiB block
    let normal = normal_of(&info(&regions));
    // Enough tables: exact.
    let b = build(&normal, 64, 0x4000_0000..0x4010_0000).unwrap();
    assert_eq!(b.stats.degraded_blocks, 0);
    assert_eq!(lookup(&b, 0x4000_1000 + 0x40_0000), Some(("normal", 3)));
    // Too few: fragments fall back to Device (safe), the image block keeps its table.
    let b = build(&normal, 12, 0x4000_0000..0x4010_0000).unwrap();
    assert!(b.stats.degraded_blocks > 0);
    assert_eq!(lookup(&b, 0x4000_0000), Some(("normal", 3)));
    assert_eq!(
        lookup(&b, 0x4000_1000 + 39 * 0x40_0000),
        Some(("device", 2))
    );
    // The image's block gets a table even when it comes after the budget is spent elsewhere.
    let late = 0x4000_0000 + 39 * 0x40_0000..0x4000_0000 + 39 * 0x40_0000 + 0x1000;
    let b = build(&normal, 12, late.clone()).unwrap();
    assert_eq!(
        lookup(&b, late.start),
        Some(("device", 3)),
        "page below the fragment"
    );
    assert_eq!(lookup(&b, late.start + 0x1000), Some(("normal", 3)));
    // No level-3 table at all for the image's mixed block: an error, not a silent Device map.
    assert_eq!(
        build(&normal, 4, late).err(),
        Some(MapError::ImageNotNormal)
    );
    // Not even the upper levels fit.
    assert!(matches!(
        build(&normal, 2, 0..0).err(),
        Some(MapError::OutOfTables { .. })
    ));
    assert!(matches!(
        build(&normal, 0, 0..0).err(),
        Some(MapError::OutOfTables { level: 0, .. })
    ));
}

#[test]
fn too_many_ranges_is_an_error() {
    let regions: Vec<(u64, u64, MemoryKind)> = (0..200)
        .map(|i| (i * 0x10_0000, 0x8_0000, MemoryKind::Usable))
        .collect();
    let info = info(&regions);
    let mut small: Vec<Range<u64>> = (0..100).map(|_| 0..0).collect();
    assert_eq!(
        map::normal_ranges(&info, &mut small),
        Err(MapError::TooManyRanges)
    );
    assert_eq!(normal_of(&info).len(), 200);
}

/// Seeded xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_maps_match_a_reference_model() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..200 {
        let mut regions = Vec::new();
        for _ in 0..1 + rng.next() % 12 {
            let kind = match rng.next() % 4 {
                0 | 1 => MemoryKind::Usable,
                2 => MemoryKind::Reserved,
                _ => MemoryKind::InUse,
            };
            let start = (rng.next() % (8 << 30)) & !0xff;
            let len = rng.next() % (1 << (12 + rng.next() % 20));
            regions.push((start, len, kind));
        }
        let info = info(&regions);
        let normal = normal_of(&info);
        // Reference: page p is Normal iff (covered by a whole Usable page and no Reserved page)
        // or touched by InUse.
        let page_normal = |p: u64| {
            let page = p..p + 4096;
            let within = |s: u64, l: u64| s <= page.start && page.end <= s + l;
            let touches = |s: u64, l: u64| l > 0 && s < page.end && page.start < s + l;
            let usable = regions
                .iter()
                .any(|&(s, l, k)| k == MemoryKind::Usable && within(s, l));
            let reserved = regions
                .iter()
                .any(|&(s, l, k)| k == MemoryKind::Reserved && touches(s, l));
            let in_use = regions
                .iter()
                .any(|&(s, l, k)| k == MemoryKind::InUse && touches(s, l));
            (usable && !reserved) || in_use
        };
        let b = build(&normal, 256, 0..0).unwrap();
        assert_eq!(b.stats.degraded_blocks, 0);
        for _ in 0..300 {
            // Probe near region edges as well as anywhere.
            let va = if rng.next().is_multiple_of(2) {
                let (s, l, _) = regions[(rng.next() % regions.len() as u64) as usize];
                (s + l).saturating_sub(8192) + rng.next() % 16384
            } else {
                rng.next() % (10 << 30)
            } & !0xfff;
            let want = if page_normal(va) { "normal" } else { "device" };
            let got = lookup(&b, va).map(|(k, _)| k);
            assert_eq!(
                got,
                Some(want),
                "round {round}, va {va:#x}, regions {regions:x?}"
            );
        }
    }
}

/// Guard pages under the stacks: the page itself is invalid, its neighbours stay Normal (as
/// 4 KiB pages: the 2 MiB block around the guard is split), and the rest of RAM keeps blocks.
#[test]
fn guard_pages_are_unmapped_and_only_they() {
    let info = qemu_virt();
    let normal = normal_of(&info);
    let image = 0x4020_0000..0x4029_8000;
    let guards = [0x4024_0000u64, 0x4028_1000];
    let mut tables = vec![Table::EMPTY; 64];
    let limit = map::limit_for(&normal, 48);
    let stats =
        map::build_with_guards(&normal, limit, image, &guards, &mut tables, TABLES_PA).unwrap();
    let b = Built {
        tables,
        limit,
        stats,
    };
    assert_eq!(
        b.stats.tables_used, 5,
        "one level-3 table for the image's 2 MiB"
    );
    for g in guards {
        assert_eq!(lookup(&b, g), None, "guard {g:#x} unmapped");
        assert_eq!(lookup(&b, g + 0xfff), None, "the whole guard page");
        assert_eq!(lookup(&b, g - 1), Some(("normal", 3)), "below {g:#x}");
        assert_eq!(lookup(&b, g + 0x1000), Some(("normal", 3)), "above {g:#x}");
    }
    assert_eq!(
        lookup(&b, 0x4040_0000),
        Some(("normal", 2)),
        "other blocks stay"
    );
    assert_eq!(
        b.stats.normal_bytes,
        (256 << 20) - 2 * 4096,
        "everything but the guards is Normal"
    );
}

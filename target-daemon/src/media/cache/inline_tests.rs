//! Reads through the cache inside an inline scope ([`crate::media::inline`]): blocks in
//! the ring and blocks of pending discards are served from memory, blocks on the mirrors
//! only from the page cache, and a refused read changes nothing, in the cache or on the
//! mirrors.

use super::discard_tests::media;
use super::*;
use crate::media::disk::{drop_cached_pages, tries_until_refused, SimFs};
use crate::media::inline::run_inline;
use crate::media::mirror::MirrorState;

/// What a read could change: the cache's log and counters, the mirrors' states and repair
/// counters.
fn effects(c: &WriteCache, m: &MirrorSet) -> (u64, u64, u64, Vec<MirrorState>, u64) {
    let s = c.stats();
    (
        c.appended_seq(),
        s.records,
        s.dirty_bytes,
        m.status().into_iter().map(|x| x.state).collect(),
        m.repairs() + m.repair_failures(),
    )
}

fn fill(tag: u8, blocks: u64) -> Vec<u8> {
    (0..blocks * 512)
        .map(|i| tag ^ (i % 251) as u8 | 1)
        .collect()
}

/// `blocks` blocks from `lba` read inline: `None` when refused.
fn inline_read(v: &CachedVolume, lba: u64, blocks: u64) -> Option<Vec<u8>> {
    let mut b = vec![0u8; blocks as usize * 512];
    let mut inner = None;
    let served = run_inline(|| inner = Some(v.read_blocks(lba, &mut b)));
    let inner = inner.expect("the read ran");
    match served {
        Some(()) => {
            inner.expect("served inline");
            Some(b)
        }
        None => {
            assert!(matches!(inner, Err(MediaError::WouldBlock)), "{inner:?}");
            None
        }
    }
}

fn blocking_read(v: &CachedVolume, lba: u64, blocks: u64) -> Vec<u8> {
    let mut b = vec![0u8; blocks as usize * 512];
    v.read_blocks(lba, &mut b).expect("read");
    b
}

/// On the simulated file system, whose disks never read without waiting, exactly the
/// reads that need no mirror are served inline.
#[test]
fn ring_blocks_and_pending_discards_are_served_inline_and_mirror_blocks_are_refused() {
    let fs = SimFs::new(21);
    let (c, m, v) = media(&fs, true);
    v.write_blocks(0, &fill(1, 16), false).expect("write");
    assert_eq!(inline_read(&v, 0, 16), Some(fill(1, 16)), "all in the ring");
    c.destage_committed().expect("destage");
    let before = effects(&c, &m);
    assert_eq!(inline_read(&v, 0, 16), None, "on the mirrors now");
    assert_eq!(inline_read(&v, 4, 1), None);
    assert_eq!(effects(&c, &m), before, "a refused read changes nothing");
    assert_eq!(blocking_read(&v, 0, 16), fill(1, 16));

    // One block back in the ring: a read that needs the others is still refused as a
    // whole; the ring block alone is served.
    v.write_blocks(5, &fill(2, 1), false).expect("overwrite");
    let mut want = fill(1, 16);
    want[5 * 512..6 * 512].copy_from_slice(&fill(2, 1));
    let before = effects(&c, &m);
    assert_eq!(inline_read(&v, 0, 16), None);
    assert_eq!(effects(&c, &m), before);
    assert_eq!(inline_read(&v, 5, 1), Some(fill(2, 1)));
    assert_eq!(blocking_read(&v, 0, 16), want);

    // A pending discard over all of them, then a write of one: zeros and that block,
    // served from memory without a look at the mirrors.
    v.unmap(0, 16).expect("unmap");
    v.write_blocks(9, &fill(3, 1), false)
        .expect("write after the discard");
    let mut want = vec![0u8; 16 * 512];
    want[9 * 512..10 * 512].copy_from_slice(&fill(3, 1));
    assert_eq!(inline_read(&v, 0, 16), Some(want.clone()));
    assert_eq!(blocking_read(&v, 0, 16), want);
    // Destaged, the discarded blocks are on the mirrors again (as holes).
    c.destage_committed().expect("destage");
    assert_eq!(inline_read(&v, 0, 16), None);
    assert_eq!(blocking_read(&v, 0, 16), want);
    // Out of range is an answer, not a wait.
    let mut b = vec![0u8; 512];
    assert!(matches!(
        run_inline(|| v.read_blocks(BLOCKS_PAST_END, &mut b)),
        Some(Err(MediaError::OutOfRange { .. }))
    ));
}

/// Past the end of the volume of [`media`] (256 blocks).
const BLOCKS_PAST_END: u64 = 256;

/// On real files: ring blocks are served even with the mirrors' pages dropped; destaged
/// blocks are served from the page cache, and refused without effect once it lost them.
#[test]
fn destaged_blocks_are_served_inline_from_the_page_cache_and_refused_once_dropped() {
    let d = std::env::temp_dir().join(format!("ftss-cache-inline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let paths = [d.join("v0a"), d.join("v0b")];
    let m = Arc::new(MirrorSet::open(&paths, 4096, 512).expect("mirrors"));
    let vols = HashMap::from([(0u32, Arc::clone(&m))]);
    let c = WriteCache::open(&d.join("wc"), 2 << 20, vols).expect("open");
    let v = CachedVolume::new(Arc::clone(&c), Arc::clone(&m), 0, CacheMode::Nonvolatile);

    v.write_blocks(100, &fill(4, 64), false).expect("write");
    assert!(c.drain(Duration::from_secs(10)), "destaged");
    assert_eq!(inline_read(&v, 100, 64), Some(fill(4, 64)), "page cache");
    v.write_blocks(300, &fill(5, 8), false).expect("write");
    for p in &paths {
        drop_cached_pages(p);
    }
    assert_eq!(
        inline_read(&v, 300, 8),
        Some(fill(5, 8)),
        "ring blocks need no mirror page"
    );

    // Nothing in flight, so the destage thread changes nothing from here on.
    assert!(c.drain(Duration::from_secs(10)), "destaged");
    let before = effects(&c, &m);
    let served = tries_until_refused(|| {
        for p in &paths {
            drop_cached_pages(p);
        }
        let r = inline_read(&v, 100, 64);
        assert_eq!(effects(&c, &m), before, "a refused read changes nothing");
        match r {
            None => true,
            Some(b) => {
                assert_eq!(b, fill(4, 64), "served after all: right");
                false
            }
        }
    });
    eprintln!("reads of dropped pages served before one was refused: {served}");
    assert_eq!(blocking_read(&v, 100, 64), fill(4, 64));
    assert_eq!(inline_read(&v, 100, 64), Some(fill(4, 64)), "cached again");
    assert_eq!(effects(&c, &m), before);
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

use super::super::disk::{Disk, SimFs};
use super::super::mirror::DEALLOCATED;
use super::*;
use std::path::PathBuf;

const BLOCKS: u64 = 256;

/// The cache and a mirror set on a simulated file system, without the destage thread
/// so each test decides when records reach the mirrors.
pub(super) fn media(fs: &SimFs, fresh: bool) -> (Arc<WriteCache>, Arc<MirrorSet>, CachedVolume) {
    media_of(fs, fresh, BLOCKS)
}

fn media_of(
    fs: &SimFs,
    fresh: bool,
    blocks: u64,
) -> (Arc<WriteCache>, Arc<MirrorSet>, CachedVolume) {
    let disks: Vec<(PathBuf, Box<dyn Disk>)> = ["a", "b"]
        .iter()
        .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
        .collect();
    let set = Arc::new(MirrorSet::open_disks(disks, blocks, 512).expect("mirrors"));
    let region = fs.file("wc");
    if fresh {
        region.set_size(RING_START + (1 << 20)).expect("size");
    }
    let cache = WriteCache::open_region_without_destage(
        Box::new(region),
        fresh,
        "wc",
        HashMap::from([(0u32, Arc::clone(&set))]),
    )
    .expect("cache");
    let v = CachedVolume::new(
        Arc::clone(&cache),
        Arc::clone(&set),
        0,
        CacheMode::Nonvolatile,
    );
    (cache, set, v)
}

fn fill(tag: u8, blocks: u64) -> Vec<u8> {
    (0..blocks * 512)
        .map(|i| tag ^ (i % 251) as u8 | 1)
        .collect()
}

/// Block `k` of `v` as the volume reads it.
fn block(v: &CachedVolume, k: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    v.read_blocks(k, &mut b).expect("read");
    b
}

/// GET LBA STATUS from `lba` to the end, as (state, count) runs.
fn runs(v: &CachedVolume, mut lba: u64) -> Vec<(Provisioning, u64)> {
    let mut out = Vec::new();
    while lba < BLOCKS {
        let (s, n) = v.provisioning(lba, BLOCKS - lba).expect("status");
        out.push((s, n));
        lba += n;
    }
    out
}

use Provisioning::{Deallocated as D, Mapped as M};

#[test]
fn a_discard_is_ordered_with_the_cached_writes_around_it() {
    let fs = SimFs::new(1);
    let (cache, set, v) = media(&fs, true);
    assert!(v.thin_provisioned());
    assert_eq!(runs(&v, 0), vec![(D, BLOCKS)], "a new volume is unmapped");
    let old = fill(1, 16);
    v.write_blocks(0, &old, false).expect("write");
    cache.destage_committed().expect("destage");
    // An older write of blocks 4-7 still in the ring, then the discard over it.
    v.write_blocks(4, &fill(2, 4), false).expect("write");
    v.unmap(2, 8).expect("unmap");
    let check = |v: &CachedVolume, at: &str| {
        for k in 0..16u64 {
            let b = block(v, k);
            if (2..10).contains(&k) && k != 6 {
                assert!(b.iter().all(|&x| x == 0), "{at}: lba {k} reads zeros");
            } else if k == 6 {
                assert_eq!(b, fill(3, 1), "{at}: the write after the discard wins");
            } else {
                assert_eq!(b, old[k as usize * 512..][..512], "{at}: lba {k}");
            }
        }
        assert_eq!(
            runs(v, 0),
            vec![(M, 2), (D, 4), (M, 1), (D, 3), (M, 6), (D, BLOCKS - 16)],
            "{at}"
        );
    };
    // Reads see the discard at once, while the mirrors still hold the old data.
    assert!(block(&v, 4).iter().all(|&x| x == 0));
    let mut raw = vec![0u8; 512];
    set.read(4, &mut raw).expect("mirror");
    assert_eq!(raw, old[4 * 512..5 * 512], "not destaged yet");
    v.write_blocks(6, &fill(3, 1), false).expect("write");
    check(&v, "in the ring");
    cache.destage_committed().expect("destage");
    assert_eq!(cache.stats().dirty_bytes, 0);
    check(&v, "destaged");
    let crcs = set.checksums(0, 16).expect("crcs");
    for (k, c) in crcs.iter().enumerate() {
        assert_eq!(
            *c == DEALLOCATED,
            (2..10).contains(&k) && k != 6,
            "lba {k} on the mirrors"
        );
    }
    assert_eq!(set.scrub().expect("scrub").mismatches, 0);
    // A discard of the whole volume over a few cached writes (the index is smaller
    // than the range, so it is walked instead).
    v.write_blocks(100, &fill(4, 2), false).expect("write");
    v.unmap(0, BLOCKS).expect("unmap everything");
    assert!(block(&v, 100).iter().all(|&x| x == 0));
    assert_eq!(runs(&v, 0), vec![(D, BLOCKS)]);
    cache.destage_committed().expect("destage");
    assert_eq!(runs(&v, 0), vec![(D, BLOCKS)]);
    assert!(block(&v, 0).iter().all(|&x| x == 0));
    assert!(matches!(
        v.unmap(BLOCKS - 1, 2),
        Err(MediaError::OutOfRange { .. })
    ));
}

#[test]
fn lba_status_extents_span_the_checksum_chunks() {
    let fs = SimFs::new(3);
    let (cache, _set, v) = media_of(&fs, true, 5000);
    v.write_blocks(3000, &fill(1, 1), false).expect("write");
    let status = |v: &CachedVolume| {
        let mut out = Vec::new();
        let mut lba = 0;
        while lba < 5000 {
            let (s, n) = v.provisioning(lba, 5000 - lba).expect("status");
            out.push((s, n));
            lba += n;
        }
        out
    };
    let want = vec![(D, 3000), (M, 1), (D, 1999)];
    assert_eq!(status(&v), want, "in the ring");
    cache.destage_committed().expect("destage");
    assert_eq!(status(&v), want, "on the mirrors");
    assert_eq!(
        v.provisioning(10, 20).expect("status"),
        (D, 20),
        "at most max"
    );
}

#[test]
fn a_committed_discard_is_replayed_after_a_power_cut() {
    let fs = SimFs::new(7);
    let (cache, _set, v) = media(&fs, true);
    let old = fill(5, 32);
    v.write_blocks(0, &old, false).expect("write");
    cache.destage_committed().expect("destage");
    // Acknowledged (committed) but not destaged when the power goes.
    v.unmap(8, 16).expect("unmap");
    v.write_blocks(10, &fill(6, 1), false).expect("write");
    let snap = fs.snapshot();
    drop(v);
    drop(cache);
    let fs = SimFs::from_snapshot(8, snap);
    let (cache, set, v) = media(&fs, false);
    assert_eq!(
        cache.stats().recovered_records,
        2,
        "the discard and the write"
    );
    for k in 0..32u64 {
        let b = block(&v, k);
        if k == 10 {
            assert_eq!(b, fill(6, 1), "the write after the discard");
        } else if (8..24).contains(&k) {
            assert!(b.iter().all(|&x| x == 0), "lba {k} stays unmapped");
        } else {
            assert_eq!(b, old[k as usize * 512..][..512], "lba {k}");
        }
    }
    assert_eq!(
        runs(&v, 0),
        vec![(M, 8), (D, 2), (M, 1), (D, 13), (M, 8), (D, BLOCKS - 32)]
    );
    assert_eq!(set.scrub().expect("scrub").mismatches, 0);
}

#[test]
fn a_record_of_an_unknown_kind_stops_recovery() {
    let fs = SimFs::new(9);
    let (cache, _set, v) = media(&fs, true);
    v.unmap(0, 4).expect("unmap");
    // The same record as a newer build's kind 9, crc and all.
    let pos = lock(&cache.inner)
        .expect("not poisoned")
        .queue
        .back()
        .map(|p| p.pos)
        .expect("queued");
    let seq = cache.appended_seq();
    let hdr = cache.header(9, seq, 0, 0, &4u64.to_le_bytes());
    cache.put(cache.phys(pos), &hdr).expect("put");
    cache.map.flush_range(0, cache.map.size()).expect("flush");
    let snap = fs.snapshot();
    drop(v);
    drop(cache);
    let fs = SimFs::from_snapshot(10, snap);
    let e = WriteCache::open_region_without_destage(
        Box::new(fs.file("wc")),
        false,
        "wc",
        HashMap::from([(
            0u32,
            Arc::new(
                MirrorSet::open_disks(
                    ["a", "b"]
                        .iter()
                        .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
                        .collect(),
                    BLOCKS,
                    512,
                )
                .expect("mirrors"),
            ),
        )]),
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("unknown kind 9"), "{e}");
}

/// Without a destage thread nothing frees ring space while a writer waits, so a full
/// ring refuses at once instead of stalling the only thread that could destage for
/// SPACE_WAIT (the fuzz harness's WRITE SAME hung 30 s this way); after an explicit
/// destage the same write goes in.
#[test]
fn without_a_destage_thread_a_full_ring_refuses_at_once() {
    let fs = SimFs::new(5);
    let (cache, _set, v) = media_of(&fs, true, 4096);
    let chunk = vec![0x5au8; 64 * 512];
    let mut full = None;
    for i in 0..64u64 {
        let started = Instant::now();
        match v.write_blocks(i * 64 % 4096, &chunk, false) {
            Ok(()) => {}
            Err(e) => {
                full = Some((e, started.elapsed()));
                break;
            }
        }
    }
    let (e, took) = full.expect("a 1 MiB ring fills with 2 MiB of writes");
    assert!(matches!(e, MediaError::Full), "{e:?}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    cache.destage_committed().expect("destage");
    v.write_blocks(0, &chunk, false)
        .expect("room again after destage");
}

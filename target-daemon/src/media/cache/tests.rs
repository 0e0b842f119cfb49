use super::*;
use crate::media::inline::run_inline;
use std::path::PathBuf;

fn setup(tag: &str, cache_mib: u64) -> (PathBuf, HashMap<u32, Arc<MirrorSet>>) {
    let d = std::env::temp_dir().join(format!("ftss-cache-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let _ = cache_mib;
    let vols = open_volumes(&d);
    (d, vols)
}

fn open_volumes(d: &Path) -> HashMap<u32, Arc<MirrorSet>> {
    let m = MirrorSet::open(&[d.join("v0a"), d.join("v0b")], 4096, 512).expect("mirrors");
    HashMap::from([(0u32, Arc::new(m))])
}

fn block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(tag ^ i as u64).to_le_bytes());
    }
    b
}

#[test]
fn writes_read_back_before_and_after_destage() {
    for (writes, name) in [
        (CacheWrites::Direct, "rw-direct"),
        (CacheWrites::Write, "rw"),
        (CacheWrites::Map, "rw-map"),
    ] {
        writes_read_back(writes, name);
    }
}

/// Every way records enter the file (stores into a private map committed by direct
/// writes, pwrite, stores through the shared map) is read back through the map, from the
/// ring and after destage, and recovered after a reopen.
fn writes_read_back(writes: CacheWrites, name: &str) {
    let (d, vols) = setup(name, 2);
    let c = WriteCache::open_with(&d.join("wc"), 2 << 20, vols.clone(), writes).expect("open");
    let v = CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Nonvolatile,
    );
    for i in 0..64u64 {
        v.write_blocks(i, &block(i), false).expect("write");
    }
    let mut b = vec![0u8; 512];
    v.read_blocks(5, &mut b).expect("read");
    assert_eq!(b, block(5));
    assert!(c.drain(Duration::from_secs(10)), "destage drains");
    let mut raw = vec![0u8; 512];
    vols[&0].read(63, &mut raw).expect("mirror read");
    assert_eq!(raw, block(63), "destaged to the mirrors");
    // Committed but not destaged: replayed from the file after a reopen.
    for i in 0..16u64 {
        v.write_blocks(100 + i, &block(1000 + i), false)
            .expect("write");
    }
    c.shutdown();
    drop(v);
    drop(c);
    let vols = open_volumes(&d);
    let c = WriteCache::open_with(&d.join("wc"), 2 << 20, vols.clone(), writes).expect("reopen");
    for i in 0..16u64 {
        c.read(0, 100 + i, &mut b).expect("read");
        assert_eq!(b, block(1000 + i), "block {} after reopen", 100 + i);
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

/// A thread that panics holding the cache's state (an assertion on ring arithmetic
/// failing) leaves it untrusted: every later write, commit wait and read fails with an
/// error instead of working from it, statistics still report, and the next start
/// recovers every committed record from the media.
#[test]
fn a_panic_under_the_state_lock_fails_every_later_operation_until_a_restart() {
    let (d, vols) = setup("poison", 2);
    let c = WriteCache::open(&d.join("wc"), 2 << 20, vols.clone()).expect("open");
    let v = CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Nonvolatile,
    );
    for i in 0..8u64 {
        v.write_blocks(i, &block(i), false).expect("write");
    }
    let held = Arc::clone(&c);
    let panicked = std::thread::spawn(move || {
        let _g = held.inner.lock().expect("not poisoned yet");
        panic!("an assertion failed mid-update");
    })
    .join();
    assert!(panicked.is_err(), "the thread panicked");
    let refused = |r: Result<(), MediaError>, what: &str| match r {
        Err(MediaError::Failed(msg)) => assert!(msg.contains("restart"), "{what}: {msg}"),
        other => panic!("{what} after the panic: {other:?}"),
    };
    refused(v.write_blocks(9, &block(9), false).map(|_| ()), "write");
    refused(c.wait_durable(c.appended_seq()), "commit wait");
    let mut b = vec![0u8; 512];
    refused(v.read_blocks(0, &mut b), "read");
    assert!(!c.drain(Duration::from_millis(50)), "nothing drains");
    assert_eq!(c.stats().records, 8, "statistics still report");
    c.shutdown();
    drop(v);
    drop(c);
    let vols = open_volumes(&d);
    let c = WriteCache::open(&d.join("wc"), 2 << 20, vols.clone()).expect("reopen");
    for i in 0..8u64 {
        c.read(0, i, &mut b).expect("read after restart");
        assert_eq!(b, block(i), "block {i} recovered");
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn ring_wraps_many_times() {
    let (d, vols) = setup("wrap", 1);
    let c = WriteCache::open(&d.join("wc"), RING_START + (1 << 20), vols.clone()).expect("open");
    let v = CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Nonvolatile,
    );
    // 12 MiB through a 1 MiB ring, in 4 KiB + header records (which do not divide
    // the ring evenly, so wrap records are exercised).
    for i in 0..3000u64 {
        let lba = (i * 8) % 4000;
        let data: Vec<u8> = (0..8).flat_map(|k| block(i * 8 + k)).collect();
        v.write_blocks(lba, &data, false).expect("write");
    }
    assert!(c.drain(Duration::from_secs(20)));
    let mut b = vec![0u8; 512];
    let last = 2999u64;
    v.read_blocks((last * 8) % 4000, &mut b).expect("read");
    assert_eq!(b, block(last * 8));
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn stale_records_past_a_hole_are_never_replayed_after_a_second_crash() {
    let (d, vols) = setup("stale", 4);
    let path = d.join("wc");
    let positions: Vec<u64>;
    {
        let c = WriteCache::open(&path, 4 << 20, vols.clone()).expect("open");
        c.shutdown();
        // Five records reach the disk, but the first one's bytes do not (a hole).
        for (i, lba) in [0u64, 1, 2, 5, 6].iter().enumerate() {
            let s = c.append(0, *lba, &block(100 + i as u64)).expect("append");
            c.wait_durable(s).expect("commit");
        }
        positions = lock(&c.inner)
            .expect("not poisoned")
            .queue
            .iter()
            .map(|p| p.pos)
            .collect();
        c.put(c.phys(positions[0]) + HDR_LEN + 3, &[0x55])
            .expect("put");
        c.map.flush_range(0, c.map.size()).expect("flush");
    }
    drop(vols);
    let vols = open_volumes(&d);
    {
        let c = WriteCache::open(&path, 4 << 20, vols.clone()).expect("reopen");
        assert_eq!(c.stats().recovered_records, 0, "nothing before the hole");
        c.shutdown();
        // The same shapes again, at the same places: acknowledged new data for lba 5.
        let s = c.append(0, 5, &block(900)).expect("append");
        c.wait_durable(s).expect("commit");
        let s = c.append(0, 7, &block(901)).expect("append");
        c.wait_durable(s).expect("commit");
    }
    drop(vols);
    let vols = open_volumes(&d);
    let c = WriteCache::open(&path, 4 << 20, vols.clone()).expect("reopen again");
    assert_eq!(c.stats().recovered_records, 2, "only the two new records");
    let mut b = vec![0u8; 512];
    // Through the cache at once (recovery leaves the records in the ring), then on the
    // mirrors once destage has moved them.
    for drained in [false, true] {
        let read = |lba, b: &mut Vec<u8>| match drained {
            false => c.read(0, lba, b).expect("read"),
            true => vols[&0].read(lba, b).expect("mirror"),
        };
        read(5, &mut b);
        assert_eq!(
            b,
            block(900),
            "the acknowledged write wins over a stale record (drained: {drained})"
        );
        read(6, &mut b);
        assert!(
            b.iter().all(|&x| x == 0),
            "a stale record is never applied (drained: {drained})"
        );
        assert!(c.drain(Duration::from_secs(10)), "destage finishes");
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn committed_records_are_replayed_and_a_torn_tail_is_dropped() {
    let (d, vols) = setup("recover", 4);
    let path = d.join("wc");
    {
        let c = WriteCache::open(&path, 4 << 20, vols.clone()).expect("open");
        // Stop destage first, so the records stay only in the cache.
        c.shutdown();
        for i in 0..100u64 {
            let s = c.append(0, i, &block(1000 + i)).expect("append");
            c.wait_durable(s).expect("commit");
        }
        // One more record, torn: written but with its payload damaged.
        let s = c.append(0, 100, &block(9999)).expect("append");
        c.wait_durable(s).expect("commit");
        let pos = lock(&c.inner)
            .expect("not poisoned")
            .queue
            .back()
            .map(|p| p.pos)
            .expect("queued");
        let off = c.phys(pos) + HDR_LEN + 7;
        c.put(off, &[0xee]).expect("put");
        c.map.flush_range(0, c.map.size()).expect("flush");
    }
    drop(vols);
    let vols = open_volumes(&d);
    let c = WriteCache::open(&path, 4 << 20, vols.clone()).expect("reopen recovers");
    assert_eq!(c.stats().recovered_records, 100, "torn tail record dropped");
    let mut b = vec![0u8; 512];
    for drained in [false, true] {
        let read = |lba, b: &mut Vec<u8>| match drained {
            false => c.read(0, lba, b).expect("read"),
            true => vols[&0].read(lba, b).expect("mirror"),
        };
        for i in 0..100u64 {
            read(i, &mut b);
            assert_eq!(
                b,
                block(1000 + i),
                "record {i} recovered (drained: {drained})"
            );
        }
        read(100, &mut b);
        assert!(
            b.iter().all(|&x| x == 0),
            "the torn record was never applied (drained: {drained})"
        );
        assert!(c.drain(Duration::from_secs(10)), "destage finishes");
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn concurrent_writers_share_flushes() {
    let (d, vols) = setup("group", 16);
    let c = WriteCache::open(&d.join("wc"), 16 << 20, vols.clone()).expect("open");
    let v = Arc::new(CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Nonvolatile,
    ));
    let threads: Vec<_> = (0..32u64)
        .map(|t| {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    v.write_blocks(t * 100 + i, &block(t * 1000 + i), false)
                        .expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    let s = c.stats();
    eprintln!(
        "group commit: {} records, {} msyncs, {} us in them",
        s.records, s.commit_flushes, s.commit_flush_us
    );
    assert_eq!(s.records, 1600);
    // Every msync here wrote pages of a real file: none took no time.
    assert!(s.commit_flush_us > 0, "msync time not counted");
    assert!(
        s.commit_flushes < 1600,
        "{} flushes for 1600 writes: no grouping",
        s.commit_flushes
    );
    let mut b = vec![0u8; 512];
    v.read_blocks(31 * 100 + 49, &mut b).expect("read");
    assert_eq!(b, block(31 * 1000 + 49));
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn an_inline_write_that_would_wait_for_ring_space_is_refused_without_effect() {
    let (d, vols) = setup("inline", 2);
    let c = WriteCache::open(&d.join("wc"), 2 << 20, vols.clone()).expect("open");
    let v = CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Volatile,
    );
    // Both mirrors fail, so destage cannot free the ring: it fills up.
    vols[&0].inject_eio(0, true);
    vols[&0].inject_eio(1, true);
    let mut refused = None;
    for i in 0..10_000u64 {
        let before = c.appended_seq();
        match run_inline(|| v.write_blocks(i % 4096, &block(i), false)) {
            Some(r) => r.expect("a write with room succeeds"),
            None => {
                refused = Some((i, before));
                break;
            }
        }
    }
    let (i, before) = refused.expect("the ring filled up and an inline write was refused");
    assert!(i > 1000, "refused only when full, after {i} writes");
    assert_eq!(c.appended_seq(), before, "a refused write appends nothing");
    // Outside the scope the same write would wait for space instead (not run here: it
    // would wait out SPACE_WAIT); inside a new scope it is refused again.
    assert!(run_inline(|| v.write_blocks(0, &block(0), false)).is_none());
    assert!(run_inline(|| 7).is_some());
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn deferred_writes_are_committed_by_async_waiters_and_survive_a_reopen() {
    let (d, vols) = setup("defer", 16);
    let c = WriteCache::open(&d.join("wc"), 16 << 20, vols.clone()).expect("open");
    let v = Arc::new(CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Nonvolatile,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    // 64 commands of 4 writes each, as the connection runs them: execute under
    // `defer_commits`, then wait for the commits asynchronously.
    let mut waits = Vec::new();
    for t in 0..64u64 {
        let v = Arc::clone(&v);
        let ((), commits) = defer_commits(|| {
            for i in 0..4 {
                v.write_blocks(t * 4 + i, &block(t * 10 + i), false)
                    .expect("write");
            }
        });
        // One cache, so one wait per command, for its newest record.
        assert_eq!(commits.0.len(), 1);
        assert_eq!(commits.0[0].1, c.appended_seq());
        waits.push(rt.spawn(commits.wait()));
    }
    rt.block_on(async {
        for w in waits {
            w.await.expect("task").expect("commit");
        }
    });
    let appended = c.appended_seq();
    assert!(lock(&c.inner).expect("not poisoned").durable_seq >= appended);
    let s = c.stats();
    assert!(s.commit_flushes >= 1 && s.commit_flushes < 64);
    // Outside a scope a write waits for its own commit, as before.
    v.write_blocks(1000, &block(1000), false).expect("write");
    let appended = c.appended_seq();
    assert!(lock(&c.inner).expect("not poisoned").durable_seq >= appended);
    // A command that panics leaves the thread deferring nothing.
    let r = std::panic::catch_unwind(|| defer_commits(|| panic!("command panicked")));
    assert!(r.is_err());
    assert!(!defer(&c, 1));
    // Committed, not yet destaged (or destaged): a reopen reads them all back.
    c.shutdown();
    drop(v);
    drop(c);
    let vols = open_volumes(&d);
    let c = WriteCache::open(&d.join("wc"), 16 << 20, vols.clone()).expect("reopen");
    let v = CachedVolume::new(
        Arc::clone(&c),
        Arc::clone(&vols[&0]),
        0,
        CacheMode::Nonvolatile,
    );
    let mut b = vec![0u8; 512];
    for t in 0..64u64 {
        for i in 0..4 {
            v.read_blocks(t * 4 + i, &mut b).expect("read");
            assert_eq!(b, block(t * 10 + i), "block {}", t * 4 + i);
        }
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

/// A ring full to the last record leaves no room for the jump recovery writes after the
/// log: recovery then destages the records first. A crash right after that recovery (the
/// jump committed, nothing new) and another recovery lose nothing, and a write after it
/// survives a third.
#[test]
fn recovery_of_a_brim_full_ring_destages_first_and_survives_more_crashes() {
    let (d, vols) = setup("brim", 1);
    let path = d.join("wc");
    let size = RING_START + (1 << 20);
    let (mut n, mut discards) = (0u64, 0u64);
    {
        let c = WriteCache::open(&path, size, vols).expect("open");
        c.shutdown();
        // No destage thread any more: an append that does not fit is refused at once.
        while c.append(0, n % 4000, &block(5000 + n)).is_ok() {
            n += 1;
        }
        // Then 64-byte discard records (of a block never written) to the last byte.
        while c.append_discard(0, 4095, 1).is_ok() {
            discards += 1;
        }
        c.wait_durable(c.appended_seq()).expect("commit");
        let s = c.stats();
        assert!(
            s.ring_bytes - s.dirty_bytes < ALIGN,
            "the ring is full: {} of {} bytes",
            s.dirty_bytes,
            s.ring_bytes
        );
    }
    let newest = |lba: u64| {
        (0..n)
            .rev()
            .find(|i| i % 4000 == lba)
            .map(|i| block(5000 + i))
    };
    // Each reopen is a crash of the one before: nothing is shut down or drained.
    let reopen = || {
        let vols = open_volumes(&d);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("cache file");
        let map = crate::media::disk::MmapRegion::new(&f, false).expect("map");
        let c = WriteCache::open_region_without_destage(Box::new(map), false, "wc", vols.clone())
            .expect("recovers");
        (c, vols)
    };
    let check = |c: &WriteCache, vols: &HashMap<u32, Arc<MirrorSet>>, what: &str| {
        let mut b = vec![0u8; 512];
        for lba in (0..n.min(4000)).step_by(37) {
            let want = newest(lba).expect("written");
            c.read(0, lba, &mut b).expect("read");
            assert_eq!(b, want, "lba {lba} {what}");
            vols[&0].read(lba, &mut b).expect("mirror");
            assert_eq!(b, want, "lba {lba} on the mirrors {what}");
        }
    };

    let (c, vols) = reopen();
    assert_eq!(
        c.stats().recovered_records,
        n + discards,
        "every record recovered"
    );
    // The jump needed room, so recovery moved everything to the mirrors first.
    assert_eq!(c.stats().dirty_bytes, ALIGN, "only the jump record is left");
    check(&c, &vols, "after the first recovery");
    drop((c, vols));

    let (c, vols) = reopen();
    assert_eq!(c.stats().recovered_records, 0, "nothing new since the jump");
    check(&c, &vols, "after the second recovery");
    let s = c
        .append(0, 4000 - 1, &block(77))
        .expect("append after recovery");
    c.wait_durable(s).expect("commit");
    drop((c, vols));

    let (c, _vols) = reopen();
    assert_eq!(
        c.stats().recovered_records,
        1,
        "the write after the second recovery"
    );
    let mut b = vec![0u8; 512];
    c.read(0, 4000 - 1, &mut b).expect("read");
    assert_eq!(b, block(77), "the acknowledged write survives");
    let _ = std::fs::remove_dir_all(d);
}

/// The jump recovery writes after the log takes the place of the first missing record.
/// When that record was a 64-byte one (a discard), the stale record after it starts
/// exactly where the jump ends: only the jump's gap in numbering keeps a second recovery
/// from taking it for the jump's successor. (Fails with a jump of one.)
#[test]
fn stale_records_right_after_the_jump_are_never_replayed() {
    let (d, vols) = setup("jump", 1);
    let path = d.join("wc");
    {
        let c = WriteCache::open(&path, 4 << 20, vols).expect("open");
        c.shutdown();
        let s = c.append(0, 1, &block(1)).expect("append");
        c.wait_durable(s).expect("commit");
        // A discard (64 bytes) and two writes reach the disk; the discard's bytes do not.
        let s = c.append_discard(0, 3, 1).expect("discard");
        c.wait_durable(s).expect("commit");
        for lba in [5u64, 6] {
            let s = c.append(0, lba, &block(100 + lba)).expect("append");
            c.wait_durable(s).expect("commit");
        }
        let hole = lock(&c.inner).expect("not poisoned").queue[1].pos;
        c.put(c.phys(hole) + HDR_LEN, &[0x55]).expect("put");
        c.map.flush_range(0, c.map.size()).expect("flush");
    }
    for round in 0..2 {
        // Without a destage thread: one that started before a shutdown could destage the
        // recovered write when the test thread is held up for its interval (it was once,
        // in a loaded CI run), and the next round would then find nothing in the ring.
        let vols = open_volumes(&d);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("cache file");
        let map = crate::media::disk::MmapRegion::new(&f, false).expect("map");
        let c = WriteCache::open_region_without_destage(Box::new(map), false, "wc", vols)
            .expect("reopen");
        // The write before the hole stays in the ring (nothing destaged it), so both
        // recoveries find it, and then the jump.
        assert_eq!(
            c.stats().recovered_records,
            1,
            "only the write before the hole (round {round})"
        );
        let mut b = vec![0u8; 512];
        c.read(0, 1, &mut b).expect("read");
        assert_eq!(b, block(1), "the committed write (round {round})");
        for lba in [5u64, 6] {
            c.read(0, lba, &mut b).expect("read");
            assert!(
                b.iter().all(|&x| x == 0),
                "stale record for lba {lba} applied (round {round})"
            );
        }
        // Crash: no drain, no new writes; the next round recovers again.
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn an_append_of_a_partial_block_is_refused_and_leaves_nothing_behind() {
    let (d, vols) = setup("partial", 2);
    let c = WriteCache::open_with(&d.join("wc"), 2 << 20, vols, CacheWrites::Direct).expect("open");
    let before = c.appended_seq();
    let e = c
        .append(0, 3, &[7u8; 700])
        .expect_err("700 bytes of 512-byte blocks");
    assert!(e.to_string().contains("whole number"), "{e}");
    assert_eq!(c.appended_seq(), before, "no record");
    // Whole blocks still go, and read back.
    c.append(0, 3, &block(3)).expect("one block");
    let mut b = vec![0u8; 512];
    c.read(0, 3, &mut b).expect("read");
    assert_eq!(b, block(3));
    let _ = std::fs::remove_dir_all(d);
}

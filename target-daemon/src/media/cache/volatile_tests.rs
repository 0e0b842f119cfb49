use super::*;

#[test]
fn the_longest_space_and_commit_waits_are_kept() {
    let d = std::env::temp_dir().join(format!("ftss-cache-waits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let m = Arc::new(MirrorSet::open(&[d.join("a"), d.join("b")], 4096, 512).expect("mirrors"));
    let vols = HashMap::from([(0u32, Arc::clone(&m))]);
    let c = WriteCache::open(&d.join("wc"), RING_START + (1 << 20), vols).expect("open");
    let s = c.stats();
    assert_eq!((s.commit_wait_max_us, s.space_wait_max_us), (0, 0));
    // Volatile writes are copies into the map: ten times the ring outruns destage (a
    // mirror sync per batch), so some append waits for space.
    let v = CachedVolume::new(Arc::clone(&c), Arc::clone(&m), 0, CacheMode::Volatile);
    for i in 0..2500u64 {
        v.write_blocks((i * 8) % 4000, &vec![(i % 251) as u8; 4096], false)
            .expect("write");
    }
    let s = c.stats();
    assert!(s.space_wait_max_us > 0, "{s:?}");
    // Destage committed those records itself; no writer waited for a commit.
    assert_eq!(s.commit_wait_max_us, 0, "{s:?}");
    // A nonvolatile write waits at least for the msync of a real file.
    let v = CachedVolume::new(Arc::clone(&c), Arc::clone(&m), 0, CacheMode::Nonvolatile);
    v.write_blocks(0, &[7u8; 4096], false).expect("write");
    let first = c.stats().commit_wait_max_us;
    assert!(first > 0);
    // A wait for a record already committed returns at once and lowers nothing.
    c.wait_durable(c.appended_seq()).expect("committed");
    assert!(c.stats().commit_wait_max_us >= first);
    // The async waiter keeps the same figure.
    let seq = c.append(0, 8, &[9u8; 4096]).expect("append");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(c.committed(seq)).expect("committed");
    assert!(c.stats().commit_wait_max_us >= first);
    assert!(c.drain(Duration::from_secs(10)));
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn volatile_mode_destages_without_flushes_from_writers() {
    let d = std::env::temp_dir().join(format!("ftss-cache-vol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let m = Arc::new(MirrorSet::open(&[d.join("a"), d.join("b")], 4096, 512).expect("mirrors"));
    let vols = HashMap::from([(0u32, Arc::clone(&m))]);
    let c = WriteCache::open(&d.join("wc"), RING_START + (1 << 20), vols).expect("open");
    let v = CachedVolume::new(Arc::clone(&c), Arc::clone(&m), 0, CacheMode::Volatile);
    // Ten times the ring: only possible if destage frees space on its own.
    for i in 0..2500u64 {
        v.write_blocks((i * 8) % 4000, &vec![(i % 251) as u8; 4096], false)
            .expect("write");
    }
    assert!(c.drain(Duration::from_secs(10)));
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

use super::*;

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

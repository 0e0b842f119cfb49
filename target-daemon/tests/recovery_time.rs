//! Recovery of a full 256 MiB write cache on real files: fill the ring with committed
//! 64 KiB records while destage is stopped, drop everything as a crash would, reopen, and
//! check that every record reads back at once and reaches both mirrors by destage. Prints how long recovery took
//! (the figure issue 3 asks for; `cargo test --release -- --nocapture` for a fair number).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftss_target::media::cache::WriteCache;
use ftss_target::media::mirror::MirrorSet;

const CACHE: u64 = 8192 + (256 << 20);
const BS: u32 = 4096;
/// A 512 MiB volume, so the records never overwrite each other.
const BLOCKS: u64 = 131_072;
const REC_BLOCKS: u64 = 16;

fn data(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; (REC_BLOCKS * u64::from(BS)) as usize];
    for (k, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(i.rotate_left(32) ^ k as u64).to_le_bytes());
    }
    b
}

#[test]
fn a_full_256mib_cache_recovers_every_record() {
    let dir = ftss_test_support::temp_dir("recovery");
    let paths = [dir.join("a.mirror"), dir.join("b.mirror")];
    let open = || {
        let m = Arc::new(MirrorSet::open(&paths, BLOCKS, BS).expect("mirrors"));
        (m.clone(), HashMap::from([(7u32, m)]))
    };
    let (_, vols) = open();
    let cache = WriteCache::open(&dir.join("cache"), CACHE, vols).expect("cache");
    // No destage: every record stays in the ring, as after a crash under heavy load.
    cache.shutdown();
    let mut n = 0u64;
    // Fill to the brim: 95% of the ring (a record never straddles the end).
    while (n + 1) * (REC_BLOCKS * u64::from(BS) + 64) < (CACHE - 8192) / 100 * 95 {
        let s = cache.append(7, n * REC_BLOCKS, &data(n)).expect("append");
        if n % 256 == 255 {
            cache.wait_durable(s).expect("commit");
        }
        n += 1;
    }
    cache.wait_durable(cache.appended_seq()).expect("commit");
    let dirty = cache.stats().dirty_bytes;
    drop(cache);

    let (set, vols) = open();
    let t = Instant::now();
    let cache = WriteCache::open(&dir.join("cache"), CACHE, vols).expect("recovers");
    let wall = t.elapsed();
    let st = cache.stats();
    println!(
        "recovery of a full 256 MiB cache: {} records, {} MiB, {} ms (wall {:.0} ms)",
        st.recovered_records,
        dirty >> 20,
        st.recovery_ms,
        wall.as_secs_f64() * 1000.0
    );
    assert_eq!(st.recovered_records, n, "every committed record recovered");
    // Recovery indexes the records where they are; reads see them at once.
    let mut buf = vec![0u8; (REC_BLOCKS * u64::from(BS)) as usize];
    for i in (0..n).step_by(97).chain([n - 1]) {
        cache.read(7, i * REC_BLOCKS, &mut buf).expect("read");
        assert!(buf == data(i), "record {i} read through the cache");
    }
    // Destage then moves them to both mirrors in the background.
    let t = Instant::now();
    assert!(cache.drain(Duration::from_secs(120)), "destage finishes");
    println!(
        "destage of the recovered records to both mirrors: {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    for i in (0..n).step_by(97).chain([n - 1]) {
        set.read(i * REC_BLOCKS, &mut buf).expect("read");
        assert!(buf == data(i), "record {i} on the mirrors");
    }
    assert_eq!(set.scrub().expect("scrub").mismatches, 0);
    cache.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

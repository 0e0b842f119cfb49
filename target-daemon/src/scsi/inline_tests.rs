//! Which commands may run on the connection's async worker ([`ScsiTarget::runs_inline`]),
//! and what they do there ([`crate::media::inline::run_inline`]): a READ on a cached LUN
//! is served from the ring or the page cache, and a READ or WRITE that would wait for
//! the media lock is refused before it has any effect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::target::{LunSpec, ScsiTarget, TargetIdentity};
use super::{ItNexus, ScsiCommand, ScsiOutcome, TaskAttr};
use crate::media::cache::{CachedVolume, WriteCache};
use crate::media::file::FileStore;
use crate::media::inline::run_inline;
use crate::media::mirror::MirrorSet;
use crate::media::CacheMode;

const BS: usize = 512;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ftss-scsi-inline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// LUN 0 on a plain file, LUN 1 on a mirror set behind the write cache (volatile, so a
/// write is an append and nothing else), and a nexus past its power-on attentions.
fn target(d: &Path) -> (ScsiTarget, Arc<WriteCache>, ItNexus) {
    let m = Arc::new(MirrorSet::open(&[d.join("a"), d.join("b")], 2048, 512).expect("mirrors"));
    let c = WriteCache::open(&d.join("wc"), 2 << 20, HashMap::from([(9, Arc::clone(&m))]))
        .expect("cache");
    let cached = CachedVolume::new(Arc::clone(&c), m, 9, CacheMode::Volatile);
    let spec = |lun: u64, store: Arc<dyn crate::media::BlockStore>| LunSpec {
        lun,
        store,
        read_only: false,
        removable: false,
        initiators: None,
        physical_block_size: None,
    };
    let file = FileStore::open(&d.join("plain.img"), 2048 * 512, 512).expect("file");
    let t = ScsiTarget::new(
        TargetIdentity {
            iqn: "iqn.2026-11.org.ftss:inline".into(),
        },
        vec![spec(0, Arc::new(file)), spec(1, Arc::new(cached))],
    )
    .expect("target");
    let n = ItNexus {
        id: 1,
        initiator_name: Arc::from("iqn.2026-11.org.ftss:i"),
        isid: [0x40, 0, 0, 0, 0, 1],
        tpgt: 1,
    };
    t.nexus_added(&n);
    for lun in [0, 1] {
        run(&t, &n, lun, &[0u8; 6], &[]);
    }
    (t, c, n)
}

fn run(t: &ScsiTarget, n: &ItNexus, lun: u64, cdb: &[u8], data: &[u8]) -> ScsiOutcome {
    t.execute(
        n,
        &ScsiCommand {
            lun,
            cdb,
            data_out: data,
            expected_len: u32::try_from(data.len().max(1 << 20)).expect("small"),
            attr: TaskAttr::Simple,
            resume_until: None,
        },
    )
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    rw10(0x28, lba, blocks)
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    rw10(0x2a, lba, blocks)
}

fn data(tag: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * BS).map(|i| tag ^ (i % 253) as u8).collect()
}

#[test]
fn small_reads_and_writes_run_inline_on_a_cached_lun_only() {
    let d = dir("which");
    let (t, c, _) = target(&d);
    assert!(t.runs_inline(1, &read10(0, 8), 0));
    assert!(t.runs_inline(1, &read10(0, 256), 0), "128 KiB");
    assert!(!t.runs_inline(1, &read10(0, 257), 0), "past 128 KiB");
    assert!(t.runs_inline(1, &write10(0, 8), 8 * BS));
    assert!(!t.runs_inline(1, &write10(0, 257), 257 * BS));
    let read16 = [0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    assert!(t.runs_inline(1, &read16, 0), "READ (16) of 256 blocks");
    let mut read16 = read16;
    read16[13] = 1;
    assert!(!t.runs_inline(1, &read16, 0), "READ (16) of 257 blocks");
    assert!(t.runs_inline(1, &[0x08, 0, 0, 0, 8, 0], 0), "READ (6)");
    assert!(
        !t.runs_inline(1, &[0x28, 0, 0], 0),
        "a CDB too short to decode"
    );
    assert!(
        !t.runs_inline(0, &read10(0, 8), 0),
        "plain file: reads block"
    );
    assert!(!t.runs_inline(0, &write10(0, 8), 8 * BS));
    assert!(!t.runs_inline(7, &read10(0, 8), 0), "no such LUN");
    let verify10 = rw10(0x2f, 0, 8);
    assert!(
        !t.runs_inline(1, &verify10, 0),
        "VERIFY reads too, but not inline"
    );
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn an_inline_read_is_served_from_the_ring_and_equals_the_blocking_read() {
    let d = dir("ring");
    let (t, c, n) = target(&d);
    let w = data(3, 16);
    assert_eq!(run(&t, &n, 1, &write10(40, 16), &w).status, 0);
    let inline = run_inline(|| run(&t, &n, 1, &read10(40, 16), &[])).expect("served inline");
    assert_eq!(inline.status, 0);
    assert_eq!(inline.data_in, w);
    assert_eq!(run(&t, &n, 1, &read10(40, 16), &[]).data_in, w);
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

/// A COMPARE AND WRITE holds the LUN's media lock exclusively across its read and write;
/// an inline READ or WRITE meanwhile gives up instead of holding the async worker.
#[test]
fn an_inline_read_or_write_behind_an_exclusive_holder_is_refused_without_effect() {
    let d = dir("lock");
    let (t, c, n) = target(&d);
    let w = data(5, 8);
    assert_eq!(run(&t, &n, 1, &write10(0, 8), &w).status, 0);
    let lun = t.lun(1).expect("LUN 1");
    let before = c.appended_seq();
    // The holder lets go after a while: a READ that waited for it would come back
    // served, late, instead of hanging the test.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let lun = &lun;
        s.spawn(move || {
            let _caw = lun.media_exclusive();
            held_tx.send(()).expect("tell");
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(2));
        });
        held_rx.recv().expect("held");
        assert!(run_inline(|| run(&t, &n, 1, &read10(0, 8), &[])).is_none());
        assert!(run_inline(|| run(&t, &n, 1, &write10(0, 8), &data(6, 8))).is_none());
        assert_eq!(
            c.appended_seq(),
            before,
            "the refused write appended nothing"
        );
        done_tx.send(()).expect("release");
    });
    let inline = run_inline(|| run(&t, &n, 1, &read10(0, 8), &[])).expect("lock free");
    assert_eq!(
        inline.data_in, w,
        "the refused write left the data as it was"
    );
    c.shutdown();
    let _ = std::fs::remove_dir_all(d);
}

//! Failures injected on the simulated file system: write and sync errors during rebuild,
//! read-repair and scrub, concurrent rebuilds, and repair racing a newer write.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::super::disk::{Disk, SimFault, SimFs};
use super::format::HEADER_LEN;
use super::tests::pattern;
use super::{MirrorSet, MirrorState};

/// Blocks in the simulated sets: two rebuild chunks of 512-byte blocks.
const SIM_BLOCKS: u64 = 4096;

fn sim_set(fs: &SimFs, names: &[&str]) -> MirrorSet {
    let disks: Vec<(PathBuf, Box<dyn Disk>)> = names
        .iter()
        .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
        .collect();
    MirrorSet::open_disks(disks, SIM_BLOCKS, 512).expect("open")
}

/// Fails mirror `name` (index `i`) with one injected write error.
fn fail_by_write(fs: &SimFs, s: &MirrorSet, name: &str, i: usize) {
    fs.fail_next(name, SimFault::Write, 1);
    s.write(SIM_BLOCKS - 8, &pattern(0xee))
        .expect("the others take it");
    assert!(
        matches!(s.status()[i].state, MirrorState::Failed(_)),
        "{:?}",
        s.status()
    );
}

fn failed(s: &MirrorSet, i: usize) -> bool {
    matches!(s.status()[i].state, MirrorState::Failed(_))
}

/// Overwrites block `lba`'s data on the simulated file `name`, leaving its crc: a
/// copy that no longer verifies.
fn corrupt(fs: &SimFs, name: &str, lba: u64) {
    fs.file(name)
        .write_at(&[0xa5; 512], HEADER_LEN + lba * 512)
        .expect("corrupt");
}

#[test]
fn a_write_or_sync_error_on_the_rebuild_target_leaves_it_failed() {
    for fault in [SimFault::Write, SimFault::Sync] {
        let fs = SimFs::new(1);
        let s = sim_set(&fs, &["a", "b"]);
        s.write(10, &pattern(1)).expect("write");
        fail_by_write(&fs, &s, "b", 1);
        let mut chunks = 0;
        let r = s.rebuild(1, 0, |_, _| {
            chunks += 1;
            if chunks == 1 {
                // Block 10 is already copied: this write is the only way b gets
                // the new data, and b fails it.
                fs.fail_next("b", fault, 1);
                s.write(10, &pattern(3)).expect("a takes the write");
                s.sync().expect("a syncs");
            }
        });
        assert!(chunks >= 1, "{fault:?}: the rebuild copied a chunk");
        let mut got = vec![0u8; 4096];
        s.read(10, &mut got).expect("read");
        assert!(got == pattern(3), "{fault:?}: the new data");
        // Without a, only b could answer: it must not, for it missed the write.
        s.inject_eio(0, true);
        let stale = s.read(10, &mut got).is_ok() && got == pattern(1);
        assert!(!stale, "{fault:?}: a read returned stale data from b");
        assert!(
            failed(&s, 1),
            "{fault:?}: b stays failed after its {fault:?} error, state {:?}, rebuild {r:?}",
            s.status()[1].state
        );
        assert!(r.is_err(), "{fault:?}: the rebuild reports the failure");
    }
}

#[test]
fn a_write_error_of_the_rebuild_itself_leaves_the_target_failed() {
    let fs = SimFs::new(2);
    let s = sim_set(&fs, &["a", "b"]);
    s.write(10, &pattern(1)).expect("write");
    fail_by_write(&fs, &s, "b", 1);
    fs.fail_next("b", SimFault::Write, 1);
    assert!(s.rebuild(1, 0, |_, _| {}).is_err());
    assert!(failed(&s, 1), "{:?}", s.status());
    // A new, explicit rebuild may run again and succeeds.
    s.rebuild(1, 0, |_, _| {}).expect("second rebuild");
    assert_eq!(s.status()[1].state, MirrorState::Healthy);
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
}

#[test]
fn of_two_concurrent_rebuilds_exactly_one_runs() {
    use std::sync::mpsc;
    let fs = SimFs::new(3);
    let s = sim_set(&fs, &["a", "b", "c"]);
    s.write(10, &pattern(1)).expect("write");
    fail_by_write(&fs, &s, "b", 1);
    fail_by_write(&fs, &s, "c", 2);
    let (running_tx, running_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let wait = Duration::from_secs(20);
    std::thread::scope(|sc| {
        let first = sc.spawn(|| {
            let mut running = Some(running_tx);
            s.rebuild(1, 0, move |_, _| {
                if let Some(tx) = running.take() {
                    let _ = tx.send(());
                    let _ = go_rx.recv_timeout(wait);
                }
            })
        });
        running_rx
            .recv_timeout(wait)
            .expect("the first rebuild runs");
        let same = s.rebuild(1, 0, |_, _| {});
        let other = s.rebuild(2, 0, |_, _| {});
        let _ = go_tx.send(());
        let first = first.join().expect("first rebuild thread");
        assert!(
            same.is_err(),
            "a second rebuild of mirror 1 ran beside the first: {same:?}"
        );
        assert!(
            other.is_err(),
            "a rebuild of mirror 2 ran beside the one of mirror 1: {other:?}"
        );
        let msg = same.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("already"), "{msg}");
        first.expect("the first rebuild completes");
    });
    assert_eq!(s.status()[1].state, MirrorState::Healthy);
    assert!(failed(&s, 2), "mirror 2 was never started");
    s.rebuild(2, 0, |_, _| {}).expect("one after the other");
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
}

#[test]
fn the_last_healthy_mirror_is_not_rebuilt() {
    let fs = SimFs::new(4);
    let s = sim_set(&fs, &["a", "b"]);
    s.write(10, &pattern(1)).expect("write");
    fail_by_write(&fs, &s, "b", 1);
    let r = s.rebuild(0, 0, |_, _| {});
    assert_eq!(
        s.status()[0].state,
        MirrorState::Healthy,
        "the last healthy mirror stays in service (rebuild said {r:?})"
    );
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("last healthy"), "refused by name: {msg:?}");
    let mut got = vec![0u8; 4096];
    s.read(10, &mut got).expect("reads go on");
    assert_eq!(got, pattern(1));
    // A healthy mirror with a healthy partner has nothing to rebuild either.
    s.rebuild(1, 0, |_, _| {}).expect("rebuild b");
    let msg = s.rebuild(0, 0, |_, _| {}).err().map(|e| e.to_string());
    assert!(
        msg.as_deref().is_some_and(|m| m.contains("healthy")),
        "{msg:?}"
    );
    assert_eq!(s.status()[0].state, MirrorState::Healthy);
}

#[test]
fn a_failed_repair_write_or_sync_on_read_fails_that_mirror() {
    for fault in [SimFault::Write, SimFault::Sync] {
        let fs = SimFs::new(5);
        let s = sim_set(&fs, &["a", "b"]);
        s.write(0, &pattern(7)).expect("write");
        s.sync().expect("sync");
        corrupt(&fs, "a", 3);
        fs.fail_next("a", fault, 1);
        let mut got = vec![0u8; 4096];
        s.read(0, &mut got).expect("b answers");
        assert_eq!(got, pattern(7));
        assert!(
            failed(&s, 0),
            "{fault:?}: a failed repair leaves a out of service, state {:?}",
            s.status()[0].state
        );
        assert_eq!(s.repairs(), 0, "{fault:?}: nothing was repaired");
    }
}

#[test]
fn a_failed_repair_write_or_sync_in_scrub_fails_that_mirror() {
    for fault in [SimFault::Write, SimFault::Sync] {
        // A copy that fails its checksum.
        let fs = SimFs::new(6);
        let s = sim_set(&fs, &["a", "b"]);
        s.write(0, &pattern(7)).expect("write");
        corrupt(&fs, "a", 3);
        fs.fail_next("a", fault, 1);
        s.scrub().expect("scrub");
        assert!(
            failed(&s, 0),
            "{fault:?}: checksum repair, state {:?}",
            s.status()[0].state
        );
        // Copies that each verify but differ: b gets a's, and fails to take it.
        let fs = SimFs::new(7);
        let s = sim_set(&fs, &["a", "b"]);
        s.write(0, &pattern(7)).expect("write");
        let other = pattern(8);
        let crc = crc32c::crc32c(&other[..512]).max(1);
        let a = fs.file("a");
        a.write_at(&other[..512], HEADER_LEN).expect("data");
        a.write_at(&crc.to_le_bytes(), HEADER_LEN + SIM_BLOCKS * 512)
            .expect("crc");
        fs.fail_next("b", fault, 1);
        let r = s.scrub().expect("scrub");
        assert_eq!(r.mismatches, 1);
        assert!(
            failed(&s, 1),
            "{fault:?}: copies-differ repair, state {:?}",
            s.status()[1].state
        );
    }
}

/// A reader finds a bad copy on a, reads the good one on b, and before it rewrites a
/// a newer write (a destage) of the same block lands on both: the repair must not
/// put the old data back over it.
#[test]
fn read_repair_never_overwrites_a_newer_write() {
    use std::sync::mpsc;
    let fs = SimFs::new(8);
    let s = Arc::new(sim_set(&fs, &["a", "b"]));
    s.write(0, &pattern(1)).expect("write");
    s.sync().expect("sync");
    corrupt(&fs, "a", 0);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let writer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            if go_rx.recv().is_ok() {
                s.write(0, &pattern(2)).expect("newer write");
                let _ = done_tx.send(());
            }
        })
    };
    // The reader reads b's data, then its crcs: right after those, the writer runs.
    let mut reads_of_b = 0;
    let mut go = Some(go_tx);
    fs.after_read(
        "b",
        Box::new(move || {
            reads_of_b += 1;
            if reads_of_b == 2 {
                if let Some(go) = go.take() {
                    let _ = go.send(());
                    // Were the writer held back by a lock the reader holds, it
                    // could not finish now: go on after a while rather than hang.
                    let _ = done_rx.recv_timeout(Duration::from_secs(5));
                }
            }
        }),
    );
    let mut got = vec![0u8; 4096];
    s.read(0, &mut got).expect("read");
    assert!(got == pattern(1) || got == pattern(2), "old or new");
    writer.join().expect("writer");
    s.read(0, &mut got).expect("read");
    assert!(
        got == pattern(2),
        "a repair wrote the old block 0 over the newer write: {}",
        if got[..512] == pattern(1)[..512] {
            "block 0 is the old data"
        } else {
            "block 0 is neither"
        }
    );
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
}

//! The metadata record: its layout, round trips, torn slots, repair and rebuild, and
//! power loss during a write.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{layout, META_HEAD, META_MAX, META_SLOT};
use super::tests::{dir, pattern, set};
use super::{MirrorSet, MirrorState};
use crate::media::disk::Disk;
use crate::media::MediaError;

/// Offset of metadata slot `k` (0 = A, 1 = B) in the test sets' files.
fn slot(k: u64) -> u64 {
    let (meta_off, _) = layout(256, 512).expect("layout");
    meta_off + k * META_SLOT
}

fn flip(path: &Path, off: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, off).expect("read");
    f.write_all_at(&[one[0] ^ 0x5a], off).expect("write");
}

#[test]
fn layout_puts_the_metadata_area_after_the_crcs_on_a_4096_boundary() {
    // 256 blocks of 512: header 4096, data 131072, crcs 1024 -> 136192, rounded up.
    assert_eq!(layout(256, 512), Some((139_264, 139_264 + 2 * META_SLOT)));
    // 1 GiB of 4096-byte blocks: the crc area ends on a boundary already.
    assert_eq!(
        layout(262_144, 4096),
        Some((
            4096 + (1 << 30) + (1 << 20),
            4096 + (1 << 30) + (1 << 20) + 2 * META_SLOT
        ))
    );
    assert_eq!(layout(u64::MAX / 2, 4096), None);
}

#[test]
fn meta_round_trip_and_limits() {
    let d = dir("meta-rt");
    let (s, paths) = set(&d);
    assert_eq!(s.read_meta(), None, "a new set has no record");
    s.write_meta(b"first").expect("write");
    assert_eq!(s.read_meta().as_deref(), Some(&b"first"[..]));
    s.write_meta(b"second").expect("write");
    assert_eq!(s.read_meta().as_deref(), Some(&b"second"[..]));
    s.write_meta(b"").expect("an empty record is a record");
    assert_eq!(s.read_meta(), Some(Vec::new()));
    let big = vec![1u8; META_MAX];
    s.write_meta(&big).expect("a full slot");
    assert_eq!(s.read_meta(), Some(big));
    assert!(matches!(
        s.write_meta(&vec![1u8; META_MAX + 1]),
        Err(MediaError::MetaTooLarge { .. })
    ));
    // The data blocks are untouched by all this.
    s.write(0, &pattern(4)).expect("write");
    let mut b = vec![0u8; 4096];
    s.read(0, &mut b).expect("read");
    assert_eq!(b, pattern(4));
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    drop(s);
    let len = std::fs::metadata(&paths[0]).expect("stat").len();
    assert_eq!(Some(len), layout(256, 512).map(|l| l.1), "file length");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn meta_survives_reopen() {
    let d = dir("meta-reopen");
    let (s, paths) = set(&d);
    for k in 0..5u8 {
        s.write_meta(&[k; 100]).expect("write");
    }
    drop(s);
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(s.read_meta(), Some(vec![4; 100]));
    // Generations go on from where they were: the next record wins after a reopen.
    s.write_meta(b"later").expect("write");
    drop(s);
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(s.read_meta().as_deref(), Some(&b"later"[..]));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_torn_newest_slot_falls_back_to_the_previous_generation() {
    let d = dir("meta-torn");
    let (s, paths) = set(&d);
    s.write_meta(b"old").expect("generation 1, slot B");
    s.write_meta(b"new").expect("generation 2, slot A");
    drop(s);
    // Damage the newest record's payload on every mirror.
    for p in &paths {
        flip(p, slot(0) + META_HEAD as u64 + 1);
    }
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(s.read_meta().as_deref(), Some(&b"old"[..]));
    assert!(s.status().iter().all(|m| m.state == MirrorState::Healthy));
    // The next record overwrites the damaged slot; the fallback record stays.
    s.write_meta(b"newer").expect("write");
    drop(s);
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(s.read_meta().as_deref(), Some(&b"newer"[..]));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_damaged_copy_on_one_mirror_is_repaired_at_open_and_by_scrub() {
    let d = dir("meta-one");
    let (s, paths) = set(&d);
    s.write_meta(b"old").expect("write");
    s.write_meta(b"new").expect("write");
    drop(s);
    flip(&paths[1], slot(0) + 3);
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(
        s.read_meta().as_deref(),
        Some(&b"new"[..]),
        "the good copy wins"
    );
    assert_eq!(s.scrub().expect("scrub").mismatches, 0, "copied at open");
    // Damage under a running set: the scrub finds and rewrites it.
    flip(&paths[0], slot(0) + META_HEAD as u64);
    let r = s.scrub().expect("scrub");
    assert_eq!((r.mismatches, r.repaired), (1, 1));
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    // Both copies good again: either mirror alone gives the record.
    drop(s);
    std::fs::remove_file(&paths[1]).expect("lose b");
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(s.read_meta().as_deref(), Some(&b"new"[..]));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_failed_mirror_does_not_stop_write_meta() {
    let d = dir("meta-eio");
    let (s, paths) = set(&d);
    s.write_meta(b"both").expect("write");
    s.inject_eio(1, true);
    s.write_meta(b"survivor")
        .expect("the healthy mirror takes it");
    assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
    assert_eq!(s.read_meta().as_deref(), Some(&b"survivor"[..]));
    s.inject_eio(0, true);
    assert!(
        s.write_meta(b"nowhere").is_err(),
        "no mirror left to take it"
    );
    assert_eq!(
        s.read_meta().as_deref(),
        Some(&b"survivor"[..]),
        "a failed write changes nothing"
    );
    drop(s);
    // After a restart the stale mirror b is not read; a has the newest record.
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
    assert_eq!(s.read_meta().as_deref(), Some(&b"survivor"[..]));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn rebuild_carries_the_metadata_to_the_new_mirror() {
    let d = dir("meta-rebuild");
    let (s, paths) = set(&d);
    s.write_meta(b"one").expect("write");
    drop(s);
    // Mirror b is replaced by an empty file: a new mirror with no record at all.
    std::fs::remove_file(&paths[1]).expect("lose b");
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
    s.write_meta(b"two").expect("written to a only");
    s.rebuild(1, 0, |_, _| {}).expect("rebuild");
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    drop(s);
    // Now lose a: b alone must give the newest record.
    std::fs::remove_file(&paths[0]).expect("lose a");
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert_eq!(s.status()[1].state, MirrorState::Healthy);
    assert_eq!(s.read_meta().as_deref(), Some(&b"two"[..]));
    let _ = std::fs::remove_dir_all(d);
}

/// A power cut at every step of a `write_meta` (two mirrors: two writes, two syncs),
/// each with a few write-back outcomes: after the reboot the record is the old one or
/// the new one, never missing, and the new one whenever the call returned.
#[test]
fn power_loss_during_write_meta_keeps_the_old_or_the_new_record() {
    use super::super::disk::SimFs;
    let open = |fs: &SimFs| {
        let disks: Vec<(PathBuf, Box<dyn Disk>)> = ["a", "b"]
            .iter()
            .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
            .collect();
        MirrorSet::open_disks(disks, 64, 512)
    };
    let (mut old, mut new, mut acked) = (0, 0, 0);
    for ops in 0..6 {
        for seed in 0..8 {
            let fs = SimFs::new(seed);
            let s = open(&fs).expect("open");
            // Header and payload span three sectors: a cut before the syncs keeps
            // all, some or none of them, so some records come back whole, some torn.
            s.write_meta(&[1u8; 1000]).expect("old record");
            fs.arm(ops);
            let returned = s.write_meta(&[2u8; 1000]).is_ok();
            let snap = fs.snapshot();
            let fs = SimFs::from_snapshot(seed, snap);
            let s = open(&fs).expect("reopen after the cut");
            let got = s.read_meta().expect("a record survives");
            assert!(
                got == [2u8; 1000] || (!returned && got == [1u8; 1000]),
                "ops {ops} seed {seed}: returned {returned}, got {:?}",
                &got[..4]
            );
            // Whatever won is now on every healthy mirror.
            assert_eq!(s.scrub().expect("scrub").mismatches, 0);
            acked += usize::from(returned);
            if got == [1u8; 1000] {
                old += 1;
            } else {
                new += 1;
            }
        }
    }
    assert!(
        old > 0 && new > acked && acked > 0,
        "cuts before, during and after: {old} old, {new} new, {acked} acknowledged"
    );
}

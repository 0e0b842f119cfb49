//! The block path: writes, reads, corruption and repair, failing and rebuilding a mirror,
//! deallocation. The metadata record's tests are in `meta_tests.rs`, failures injected on
//! the simulated file system in `sim_tests.rs`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{header, DEALLOCATED, HEADER_BODY, HEADER_LEN, META_SLOT};
use super::{MirrorSet, MirrorState};
use crate::media::MediaError;

pub(super) fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ftss-mirror-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

pub(super) fn set(d: &Path) -> (MirrorSet, Vec<PathBuf>) {
    let paths = vec![d.join("a.mir"), d.join("b.mir")];
    (MirrorSet::open(&paths, 256, 512).expect("open"), paths)
}

/// Flips one bit of a byte inside block 3's data in the mirror file at `path`, behind the
/// set's back; returns the file, the byte's offset and its value before.
pub(super) fn flip_block3_byte(path: &Path) -> (std::fs::File, u64, u8) {
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .expect("open");
    let off = HEADER_LEN + 3 * 512 + 17;
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, off).expect("read");
    f.write_all_at(&[one[0] ^ 0x40], off).expect("flip");
    (f, off, one[0])
}

pub(super) fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_read_and_unwritten_blocks_read_zero() {
    let d = dir("rw");
    let (s, _) = set(&d);
    s.write(8, &pattern(1)).expect("write");
    let mut b = vec![0u8; 4096];
    s.read(8, &mut b).expect("read");
    assert_eq!(b, pattern(1));
    s.read(100, &mut b).expect("unwritten");
    assert!(b.iter().all(|&x| x == 0));
    assert!(matches!(
        s.read(255, &mut b),
        Err(MediaError::OutOfRange { .. })
    ));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn flipped_byte_is_detected_and_repaired_from_the_good_copy() {
    let d = dir("flip");
    let (s, paths) = set(&d);
    s.write(0, &pattern(7)).expect("write");
    s.sync().expect("sync");
    // Flip one byte of block 3's data on mirror a.
    flip_block3_byte(&paths[0]);
    let mut b = vec![0u8; 4096];
    s.read(0, &mut b).expect("read survives");
    assert_eq!(b, pattern(7));
    assert_eq!(s.repairs(), 1);
    assert_eq!(
        s.scrub().expect("scrub").mismatches,
        0,
        "repair made both copies good"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn eio_fails_one_mirror_service_continues_rebuild_restores_two_copies() {
    let d = dir("eio");
    let (s, paths) = set(&d);
    for k in 0..16u64 {
        s.write(k * 8, &pattern(k as u8)).expect("write");
    }
    s.inject_eio(1, true);
    s.write(200, &pattern(99))
        .expect("write continues on the survivor");
    assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
    let mut b = vec![0u8; 4096];
    for k in 0..16u64 {
        s.read(k * 8, &mut b).expect("read from survivor");
        assert_eq!(b, pattern(k as u8), "zero data loss");
    }
    // The survivor's epoch moved on: after a restart the failed mirror stays out.
    drop(s);
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    assert!(
        matches!(s.status()[1].state, MirrorState::Failed(_)),
        "stale mirror not trusted"
    );
    let mut seen = 0;
    s.rebuild(1, 0, |done, total| {
        assert!(done <= total);
        seen += 1;
    })
    .expect("rebuild");
    assert!(seen > 0);
    assert_eq!(s.status()[1].state, MirrorState::Healthy);
    let r = s.scrub().expect("scrub");
    assert_eq!(r.mismatches, 0);
    assert_eq!(r.blocks, 256);
    // Both copies now serve: fail the first and read everything from the rebuilt one.
    s.inject_eio(0, true);
    for k in 0..16u64 {
        s.read(k * 8, &mut b).expect("read from rebuilt mirror");
        assert_eq!(b, pattern(k as u8));
    }
    s.read(200, &mut b).expect("read");
    assert_eq!(b, pattern(99));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn truncated_mirror_fails_on_read_and_data_stays_correct() {
    let d = dir("trunc");
    let (s, paths) = set(&d);
    s.write(128, &pattern(3)).expect("write");
    s.sync().expect("sync");
    OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .expect("open")
        .set_len(4096)
        .expect("truncate");
    let mut b = vec![0u8; 4096];
    s.read(128, &mut b).expect("read from the other mirror");
    assert_eq!(b, pattern(3));
    assert!(matches!(s.status()[0].state, MirrorState::Failed(_)));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn foreign_and_mismatched_files_are_refused() {
    let d = dir("foreign");
    let (s, paths) = set(&d);
    drop(s);
    std::fs::write(d.join("junk.mir"), b"not a mirror at all").expect("write");
    let e = MirrorSet::open(&[paths[0].clone(), d.join("junk.mir")], 256, 512)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("junk.mir"), "{e}");
    let e = MirrorSet::open(&paths, 512, 512).err().expect("refused");
    assert!(e.to_string().contains("256 blocks"), "{e}");
    let other = dir("foreign2");
    let (s2, p2) = set(&other);
    drop(s2);
    let e = MirrorSet::open(&[paths[0].clone(), p2[0].clone()], 256, 512)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("another set"), "{e}");
    let _ = std::fs::remove_dir_all(d);
    let _ = std::fs::remove_dir_all(other);
}

#[test]
fn a_version_1_mirror_is_refused_by_name_and_version() {
    let d = dir("v1");
    let (s, paths) = set(&d);
    drop(s);
    // A version 1 header, crc and all, as an older build wrote it.
    let mut h = header(&[7; 16], 0, 512, 256, 1);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_BODY]);
    h[HEADER_BODY..HEADER_BODY + 4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&paths[0], &h).expect("write");
    let e = MirrorSet::open(&paths, 256, 512).err().expect("refused");
    assert!(
        e.to_string().contains("a.mir") && e.to_string().contains("version 1"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// Bytes the file system has allocated to `path`.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn deallocate_punches_holes_reads_zeros_and_keeps_checksums_consistent() {
    let d = dir("dealloc");
    let (s, paths) = set(&d);
    for k in 0..32u64 {
        s.write(k * 8, &pattern(k as u8)).expect("write");
    }
    s.sync().expect("sync");
    let before: Vec<u64> = paths.iter().map(|p| allocated(p)).collect();
    assert!(
        s.checksums(0, 256)
            .expect("crcs")
            .iter()
            .all(|&c| c != DEALLOCATED),
        "every block mapped"
    );
    // Blocks 16-111: 48 KiB, whole 4 KiB pages of the data area (which starts at 4096).
    s.deallocate(16, 96).expect("deallocate");
    s.sync().expect("sync");
    for (p, b) in paths.iter().zip(&before) {
        assert!(
            allocated(p) + 40 * 1024 <= *b,
            "{}: the space went back to the file system",
            p.display()
        );
    }
    let crcs = s.checksums(0, 256).expect("crcs");
    for (lba, c) in crcs.iter().enumerate() {
        assert_eq!(
            *c == DEALLOCATED,
            (16..112).contains(&lba),
            "lba {lba}: crc {c:#x}"
        );
    }
    let mut b = vec![0u8; 4096];
    s.read(16, &mut b).expect("read");
    assert!(
        b.iter().all(|&x| x == 0),
        "deallocated blocks read as zeros"
    );
    s.read(8, &mut b).expect("read");
    assert_eq!(b, pattern(1), "neighbours untouched");
    s.read(112, &mut b).expect("read");
    assert_eq!(b, pattern(14), "neighbours untouched");
    // A lone block inside a page: zeroed in place, deallocated all the same.
    s.deallocate(3, 1).expect("deallocate");
    let mut one = vec![0u8; 512];
    s.read(3, &mut one).expect("read");
    assert!(one.iter().all(|&x| x == 0));
    assert_eq!(s.checksums(2, 3).expect("crcs")[1], DEALLOCATED);
    assert_eq!(s.scrub().expect("scrub").mismatches, 0, "scrub is clean");
    // Written again, a block is mapped again.
    s.write(16, &pattern(9)).expect("write");
    assert!(s
        .checksums(16, 8)
        .expect("crcs")
        .iter()
        .all(|&c| c != DEALLOCATED));
    assert!(matches!(
        s.deallocate(250, 7),
        Err(MediaError::OutOfRange { .. })
    ));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn repair_and_rebuild_keep_deallocated_blocks_deallocated() {
    let d = dir("dealloc-repair");
    let (s, paths) = set(&d);
    for k in 0..32u64 {
        s.write(k * 8, &pattern(k as u8)).expect("write");
    }
    s.deallocate(64, 64).expect("deallocate");
    s.sync().expect("sync");
    // Garbage lands in a deallocated block of mirror a (crc 0 says it must be zeros).
    let f = OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .expect("open");
    f.write_all_at(&[0x77; 16], HEADER_LEN + 70 * 512 + 100)
        .expect("write");
    let mut b = vec![0u8; 4096];
    s.read(64, &mut b).expect("read from the good copy");
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(s.repairs(), 1);
    assert_eq!(
        s.checksums(64, 64).expect("crcs"),
        vec![DEALLOCATED; 64],
        "the repair deallocated the block again rather than writing it"
    );
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    // Mirror b is replaced: the rebuild copies holes as holes.
    drop(s);
    std::fs::remove_file(&paths[1]).expect("lose b");
    let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
    s.rebuild(1, 0, |_, _| {}).expect("rebuild");
    assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    s.inject_eio(0, true);
    let crcs = s.checksums(0, 256).expect("crcs from b");
    for (lba, c) in crcs.iter().enumerate() {
        assert_eq!(*c == DEALLOCATED, (64..128).contains(&lba), "lba {lba}");
    }
    s.read(60, &mut b).expect("read from b");
    assert_eq!(&b[..2048], &pattern(7)[2048..], "mapped blocks copied");
    assert!(b[2048..].iter().all(|&x| x == 0), "deallocated ones zeros");
    // The rebuild writes b's whole metadata area, which a never had written.
    let (a, b) = (allocated(&paths[0]), allocated(&paths[1]));
    assert!(
        b <= a + 2 * META_SLOT,
        "b is as sparse as a where the set is unmapped: {b} bytes against {a}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn all_zero_sees_a_single_nonzero_byte_anywhere() {
    use super::io::all_zero;
    assert!(all_zero(&[]));
    for len in [1usize, 511, 512, 4095, 4096, 4097, 131_072] {
        let mut b = vec![0u8; len];
        assert!(all_zero(&b), "{len} zeros");
        for at in [0, len / 2, len - 1] {
            b[at] = 1;
            assert!(!all_zero(&b), "byte {at} of {len}");
            b[at] = 0;
        }
    }
}

//! Reads inside an inline scope ([`crate::media::inline`]): served from the page cache
//! when the first copy is there and verifies, refused without any effect otherwise, and
//! the blocking read that follows does what it always did.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::tests::{dir, flip_block3_byte, pattern, set};
use super::{MirrorSet, MirrorState};
use crate::media::disk::{drop_cached_pages, tries_until_refused};
use crate::media::inline::run_inline;
use crate::media::MediaError;

/// Runs `f` and counts the events at WARN or ERROR it logs on this thread.
fn warnings_in<R>(f: impl FnOnce() -> R) -> (R, usize) {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;
    struct Count(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            // Levels order by verbosity: WARN and ERROR are the least verbose.
            if *e.metadata().level() <= tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let n = Arc::new(AtomicUsize::new(0));
    let sub = tracing_subscriber::registry().with(Count(Arc::clone(&n)));
    let r = tracing::subscriber::with_default(sub, f);
    (r, n.load(Ordering::SeqCst))
}

/// [`run_inline`], asserting that nothing in it logged a warning or an error: an inline
/// read that is refused leaves that to the blocking read.
fn quiet_inline<R>(f: impl FnOnce() -> R) -> Option<R> {
    let (r, warnings) = warnings_in(|| run_inline(f));
    assert_eq!(warnings, 0, "an inline read logs no warning or error");
    r
}

/// Everything a failure, a repair or a log-worthy event would change: mirror states, the
/// epoch (raised by every failed mirror), repair counters.
fn effects(s: &MirrorSet) -> (Vec<MirrorState>, u64, u64, u64) {
    (
        s.status().into_iter().map(|m| m.state).collect(),
        s.epoch.load(Ordering::SeqCst),
        s.repairs(),
        s.repair_failures(),
    )
}

fn all_healthy(s: &MirrorSet) -> bool {
    s.status().iter().all(|m| m.state == MirrorState::Healthy)
}

/// Drops the pages of `paths` and reads blocks from `lba` inline until a read is refused
/// (see [`tries_until_refused`] for why it may take more than one try), checking every
/// try against `want` and [`effects`]; returns how many the kernel served anyway.
fn refused_after_dropping(
    s: &MirrorSet,
    paths: &[std::path::PathBuf],
    lba: u64,
    want: &[u8],
) -> usize {
    let before = effects(s);
    let mut b = vec![0u8; want.len()];
    tries_until_refused(|| {
        for p in paths {
            drop_cached_pages(p);
        }
        b.fill(0xee);
        let mut inner = None;
        let outcome = quiet_inline(|| inner = Some(s.read(lba, &mut b)));
        assert_eq!(
            effects(s),
            before,
            "an inline read fails, repairs and counts nothing"
        );
        let inner = inner.expect("the read ran");
        if outcome.is_none() {
            // What the command saw before the scope discarded its outcome.
            assert!(matches!(inner, Err(MediaError::WouldBlock)), "{inner:?}");
            return true;
        }
        inner.expect("served inline");
        assert_eq!(b, want, "served inline after all: the data is right");
        false
    })
}

#[test]
fn a_read_of_dropped_pages_is_refused_without_effect_and_then_read_blocking() {
    let d = dir("inline-cold");
    let (s, paths) = set(&d);
    s.write(16, &pattern(5)).expect("write");
    s.sync().expect("sync");
    let mut b = vec![0u8; 4096];
    // Just written: in the page cache, served inline.
    let r = quiet_inline(|| s.read(16, &mut b));
    assert!(matches!(r, Some(Ok(()))), "cached pages are read inline");
    assert_eq!(b, pattern(5));

    let before = effects(&s);
    let served = refused_after_dropping(&s, &paths, 16, &pattern(5));
    eprintln!("reads of dropped pages the kernel served before it refused one: {served}");
    assert!(all_healthy(&s));
    // Run again as the connection would, on a blocking thread (outside the scope).
    b.fill(0);
    s.read(16, &mut b).expect("blocking read");
    assert_eq!(b, pattern(5));
    assert_eq!(effects(&s), before);
    // The blocking read brought the pages back.
    b.fill(0);
    assert!(matches!(quiet_inline(|| s.read(16, &mut b)), Some(Ok(()))));
    assert_eq!(b, pattern(5));
    let _ = std::fs::remove_dir_all(d);
}

/// The same without a kernel to race: the simulated disk never reads without waiting, so
/// every inline read of a mirror is refused, and the blocking one serves it.
#[test]
fn on_a_disk_that_cannot_read_without_waiting_every_inline_read_is_refused() {
    use crate::media::disk::{Disk, SimFs};
    let fs = SimFs::new(11);
    let disks: Vec<(std::path::PathBuf, Box<dyn Disk>)> = ["a", "b"]
        .iter()
        .map(|n| {
            (
                std::path::PathBuf::from(n),
                Box::new(fs.file(n)) as Box<dyn Disk>,
            )
        })
        .collect();
    let s = MirrorSet::open_disks(disks, 256, 512).expect("open");
    s.write(8, &pattern(2)).expect("write");
    s.sync().expect("sync");
    let before = effects(&s);
    let mut b = vec![0u8; 4096];
    let mut seen = None;
    assert!(quiet_inline(|| seen = Some(s.read(8, &mut b))).is_none());
    assert!(
        matches!(seen, Some(Err(MediaError::WouldBlock))),
        "{seen:?}"
    );
    assert_eq!(effects(&s), before);
    s.read(8, &mut b).expect("blocking read");
    assert_eq!(b, pattern(2));
    assert_eq!(effects(&s), before);
}

#[test]
fn a_checksum_mismatch_is_left_to_the_blocking_read_to_log_and_repair() {
    let d = dir("inline-flip");
    let (s, paths) = set(&d);
    s.write(0, &pattern(7)).expect("write");
    s.sync().expect("sync");
    let (f, off, was) = flip_block3_byte(&paths[0]);
    let before = effects(&s);
    let mut b = vec![0u8; 4096];
    assert!(quiet_inline(|| s.read(0, &mut b)).is_none(), "refused");
    assert_eq!(effects(&s), before, "no repair inline");
    let mut now = [0u8; 1];
    f.read_exact_at(&mut now, off).expect("read");
    assert_eq!(now[0], was ^ 0x40, "the bad copy is still there");
    let (r, warnings) = warnings_in(|| s.read(0, &mut b));
    r.expect("blocking read repairs");
    assert!(
        warnings >= 1,
        "the blocking read logs the mismatch and the repair"
    );
    assert_eq!(b, pattern(7));
    assert_eq!(s.repairs(), 1, "repaired once, by the blocking read");
    assert!(matches!(quiet_inline(|| s.read(0, &mut b)), Some(Ok(()))));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_failing_or_missing_mirror_is_never_read_inline_and_never_failed_by_it() {
    let d = dir("inline-eio");
    let (s, paths) = set(&d);
    s.write(128, &pattern(3)).expect("write");
    s.sync().expect("sync");
    let mut b = vec![0u8; 4096];
    // A read error: refused, and the mirror stays in service until a blocking read
    // meets the error itself.
    s.inject_eio(0, true);
    let before = effects(&s);
    assert!(quiet_inline(|| s.read(128, &mut b)).is_none());
    assert_eq!(effects(&s), before);
    s.inject_eio(0, false);
    // A truncated file: a short read, refused the same way.
    OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .expect("open")
        .set_len(4096)
        .expect("truncate");
    assert!(quiet_inline(|| s.read(128, &mut b)).is_none());
    assert_eq!(effects(&s), before, "not failed inline");
    let (r, warnings) = warnings_in(|| s.read(128, &mut b));
    r.expect("the blocking read takes the other copy");
    assert!(warnings >= 1, "the blocking read logs the failed mirror");
    assert_eq!(b, pattern(3));
    assert!(matches!(s.status()[0].state, MirrorState::Failed(_)));
    // Degraded: the ordinary path serves every read, the inline one none.
    let degraded = effects(&s);
    assert!(quiet_inline(|| s.read(128, &mut b)).is_none());
    assert_eq!(effects(&s), degraded);
    // Out of range is an answer, not a wait.
    assert!(matches!(
        quiet_inline(|| s.read(255, &mut b)),
        Some(Err(MediaError::OutOfRange { .. }))
    ));
    let _ = std::fs::remove_dir_all(d);
}

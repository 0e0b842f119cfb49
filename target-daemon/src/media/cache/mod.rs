//! The write cache: an mmap'd circular journal of records, committed in groups with one
//! direct write (or `msync`) for many writers, destaged in the background to each
//! volume's mirror set.
//! Formats, commit order and recovery: docs/design.md.
//!
//! This file holds the state and opening; each step has its own file: `format.rs` (the
//! superblock and record header on the media), `recovery.rs` (rebuilding the index at
//! open), `commit.rs` (append and group commit, and deferring a command's wait),
//! `lookup.rs` (reads), `destage.rs` (to the mirrors, moving the tail), `volume.rs`
//! (a LUN's block store over the cache).

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::direct::DirectRegion;
use super::disk::{MmapRegion, Region};
use super::mirror::MirrorSet;
use super::{BlockStore, CacheMode, CacheWrites, MediaError, Provisioning};

const SB_MAGIC: &[u8; 8] = b"FTSSWC01";
const SB_LEN: u64 = 4096;
const RING_START: u64 = 2 * SB_LEN;
const REC_MAGIC: u32 = 0x4654_5752;
const VERSION: u16 = 1;
const KIND_BLOCKS: u16 = 1;
const KIND_WRAP: u16 = 3;
/// Deallocate (UNMAP) a range: the header's lba is the first block, the payload the block
/// count (u64 little endian). Through the journal, so it is ordered with the writes
/// around it and as durable as they are.
const KIND_DISCARD: u16 = 4;
/// Sequence jump, written by recovery where the log ended: the payload is the sequence
/// number of the record that follows it (u64 little endian). Recovery leaves the records
/// it found in the ring, so it cannot restart numbering with a new superblock; this record
/// carries the restart instead (see `recover`).
const KIND_JUMP: u16 = 5;
/// Blocks of checksums GET LBA STATUS reads from the mirrors at first, and at most, at a
/// time: it starts small, since a short extent ends the answer, and doubles.
const PROVISIONING_CHUNK_FIRST: u64 = 1 << 10;
const PROVISIONING_CHUNK_MAX: u64 = 1 << 16;
const HDR_LEN: u64 = 48;
const ALIGN: u64 = 64;
/// The longest a volatile write waits for its commit: destage commits volatile records
/// at this interval even while they wait for destage.
const DESTAGE_INTERVAL: Duration = Duration::from_millis(100);
/// The longest committed records wait in the ring for destage while appends keep coming
/// and the ring is under [`DESTAGE_DUE_DIV`] full.
const DESTAGE_AGE_MAX: Duration = Duration::from_secs(1);
/// No append for this long: the device is free, so destage whatever is there.
const DESTAGE_QUIET: Duration = Duration::from_millis(20);
/// Records destaged per batch (one mirror sync and one superblock write per batch).
const DESTAGE_BATCH_RECORDS_MAX: usize = 16384;
/// Destage starts at once when 1/this of the ring waits, writers still appending; below
/// it, only after [`DESTAGE_AGE_MAX`] or [`DESTAGE_QUIET`]. The ring is there to take a
/// burst while destage's mirror writes and syncs stay off the device the writers' commits
/// use (docs/bench/diary.md: +14-21% on a 195 MiB burst of 4 KiB writes, the same
/// sustained rate and commit waits).
const DESTAGE_DUE_DIV: u64 = 2;
/// Records waiting that start destage at once, however few bytes they hold: each costs
/// memory until destage (its queue entry and at least one index extent), so for small
/// records the count, not the bytes, bounds it. Two full batches.
const DESTAGE_RECORDS_DUE: usize = 2 * DESTAGE_BATCH_RECORDS_MAX;
/// A destage batch covers at most 1/this of the ring (and at least one record). Ring
/// space comes back only when a batch's mirror syncs and superblock are done, and
/// destage under load starts with the ring half full: a batch of all that was there
/// (64 MiB of 4 KiB writes) held writers waiting for space for up to a second.
const DESTAGE_BATCH_DIV: u64 = 16;
/// Largest single write destage hands a mirror set when it coalesces contiguous blocks.
const DESTAGE_RUN_MAX: usize = 1 << 20;
/// Writers wait this long for ring space before the write is refused (BUSY upstream).
const SPACE_WAIT: Duration = Duration::from_secs(30);
/// Commit flushes allowed to run at once (see `wait_durable`). Measured on this
/// project's test machine (ext4 on virtio): 4 concurrent msyncs gave 10.8K 4 KiB writes/s
/// at queue depth 32 against 15.7K for 1, because concurrent flushes do not overlap on
/// the device and only split the groups. Raise it for devices with parallel flushes. With
/// direct commits ([`DirectRegion`]) consecutive groups usually share a page, and a commit
/// waits for the one before it that holds the page, so more would gain little there.
const FLUSHES_MAX: usize = 1;

fn lock_plain<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Raises `max` to the microseconds since `since`. Loads first: on the common path (no
/// new maximum) every writer only reads the shared counter.
fn raise_max(max: &AtomicU64, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    if us > max.load(Ordering::Relaxed) {
        max.fetch_max(us, Ordering::Relaxed);
    }
}

/// Counters for status and benchmarks.
#[derive(Debug, Default, serde::Serialize)]
pub struct CacheStats {
    /// Group commits made (each one direct write, or one msync).
    pub commit_flushes: u64,
    /// Microseconds those commits took in all: with `commit_flushes` and `records`, the
    /// cost of a commit on this device and how many records share one.
    pub commit_flush_us: u64,
    /// Longest one writer waited for its record to be committed, in microseconds: an
    /// average hides the stall a sustained load meets behind a slow commit.
    pub commit_wait_max_us: u64,
    /// Longest one append waited for ring space (destage behind), in microseconds.
    pub space_wait_max_us: u64,
    /// Records appended (each committed before its write is acknowledged in nonvolatile
    /// mode; in volatile mode only by a later flush or destage).
    pub records: u64,
    /// Records replayed at the last start.
    pub recovered_records: u64,
    /// Milliseconds the last recovery took.
    pub recovery_ms: u64,
    /// Bytes in the ring not yet destaged.
    pub dirty_bytes: u64,
    /// Ring size in bytes.
    pub ring_bytes: u64,
    /// Bytes destaged to the mirror sets (each block once per set, after coalescing).
    pub destaged_bytes: u64,
}

/// What destage does with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Writes the record's `len` payload bytes from its lba.
    Blocks { len: u32 },
    /// Deallocates `blocks` blocks from its lba.
    Discard { blocks: u64 },
    /// Nothing: the rest of the ring's lap is unused.
    Wrap,
    /// Nothing: a sequence jump; the next record is numbered `to`. Its queue entry
    /// carries `to - 1`, so the tail after it is recorded with the number that follows.
    Jump { to: u64 },
}

#[derive(Clone, Copy)]
struct Pending {
    seq: u64,
    /// Log position of the record (monotonic; physical = RING_START + pos % ring).
    pos: u64,
    /// Log position just past it.
    end: u64,
    volume: u32,
    lba: u64,
    op: Op,
}

/// A discard record not yet destaged: its blocks read as zeros (unless written again
/// since, which the index then says) while the mirrors still hold the old data.
struct Discard {
    seq: u64,
    volume: u32,
    lba: u64,
    blocks: u64,
}

/// Where the current copy of a block is, for a read or GET LBA STATUS.
enum Source {
    /// In the ring, at this log position.
    Ring(u64),
    /// Deallocated by a discard not yet destaged: zeros.
    Discarded,
    /// On the mirrors.
    Mirrors,
}

/// A commit flush claimed by one waiter: its id in `Inner::inflight` and the log span.
struct Flight {
    id: u64,
    from: u64,
    to: u64,
}

struct Inner {
    head: u64,
    tail: u64,
    next_seq: u64,
    appended_seq: u64,
    durable_seq: u64,
    durable_pos: u64,
    /// End position and last sequence covered by flushes started so far.
    claimed_pos: u64,
    claimed_seq: u64,
    /// Highest sequence number any waiter has asked to see committed.
    wanted_seq: u64,
    /// Flushes running, oldest first: (end position, last sequence, finished).
    inflight: VecDeque<(u64, u64, bool)>,
    /// Ids are positions in `inflight` offset by this (ids of popped flights are gone).
    inflight_base: u64,
    queue: VecDeque<Pending>,
    /// Latest cached copy of each block, as extents of back-to-back blocks in one
    /// record. A discard removes the entries it covers, so an entry is always newer than
    /// every pending discard of its block.
    index: BlockIndex,
    /// Discard records not yet destaged, oldest first.
    discards: VecDeque<Discard>,
    sb_seq: u64,
}

/// The nonvolatile write cache shared by every volume of the daemon.
pub struct WriteCache {
    map: Box<dyn Region>,
    ring: u64,
    inner: Mutex<Inner>,
    cond: Condvar,
    /// The durable frontier (last committed sequence number) for async waiters.
    durable_tx: tokio::sync::watch::Sender<u64>,
    volumes: HashMap<u32, Arc<MirrorSet>>,
    stop: AtomicBool,
    /// Callers of [`WriteCache::drain`] waiting now: destage goes at once for them.
    draining: AtomicU64,
    /// The destage thread, joined by [`WriteCache::shutdown`].
    destage_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when a commit flush failed: no record may be called committed after that.
    stop_commits: AtomicBool,
    flushes: AtomicU64,
    /// Microseconds spent in commits.
    flush_us: AtomicU64,
    /// Each commit's duration, for the metrics endpoint.
    commit_latency: crate::counters::Histogram,
    /// See [`CacheStats::commit_wait_max_us`] and [`CacheStats::space_wait_max_us`].
    commit_wait_max_us: AtomicU64,
    space_wait_max_us: AtomicU64,
    /// Bytes written to the mirror sets by destage.
    destaged: AtomicU64,
    records: AtomicU64,
    recovered: AtomicU64,
    recovery_ms: AtomicU64,
    /// Fault injection (tests): appends to let through before failing, then how many
    /// to fail; and whether the next commit flush fails.
    fault_append: Mutex<(u64, u64)>,
    /// Set while `fault_append` counts: the append path reads only this.
    fault_armed: AtomicBool,
    fault_flush: AtomicBool,
}

/// Warns when a direct-commit cache is large for this machine. Its written pages are the
/// process's own (a private map), so after one lap of the ring the whole cache is resident
/// and, unlike the page cache behind a shared map, the kernel cannot reclaim it: memory
/// must be planned for `media.cache_size`, as for a hardware cache's RAM.
fn warn_if_unreclaimable(path: &Path, size: u64) {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return;
    }
    let ram = pages as u64 * page as u64;
    if size > ram / 2 {
        warn!(
            "{}: the write cache ({} MiB) will stay resident, and that is more than half of \
             this machine's memory ({} MiB)",
            path.display(),
            size >> 20,
            ram >> 20
        );
    }
}

/// Writes zeros over the whole file once. A sparse or fallocated journal would allocate
/// or convert extents on first write, turning every commit into a file-system
/// metadata commit as well; after this, commits write data only.
pub(crate) fn preallocate(f: &std::fs::File, size: u64) -> Result<(), MediaError> {
    use std::os::unix::fs::FileExt;
    f.set_len(size)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// The cache's state. A thread that panicked holding it (a failed assertion on ring or
/// index arithmetic) may have left it half-changed, so from then on every operation fails
/// instead of trusting it. The records on the media are untouched: recovery at the next
/// start rebuilds the state from them.
fn lock(m: &Mutex<Inner>) -> Result<MutexGuard<'_, Inner>, MediaError> {
    m.lock().map_err(poisoned)
}

/// The error every operation returns once the state's lock is poisoned (see [`lock`]).
fn poisoned<T>(_: std::sync::PoisonError<T>) -> MediaError {
    MediaError::Failed(
        "write cache state abandoned by a panicking thread; restart to recover from the media"
            .into(),
    )
}

/// The state for a figure that only reports (statistics, the last sequence number): a
/// poisoned lock is no reason to stop reporting, and nothing is changed.
fn lock_to_report(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WriteCache {
    /// The block size of `volume`; 512 for records of no known volume (wrap, jump), which
    /// hold no blocks.
    fn block_size_of(&self, volume: u32) -> u64 {
        self.volumes
            .get(&volume)
            .map_or(512, |m| u64::from(m.block_size()))
    }

    fn phys(&self, pos: u64) -> u64 {
        RING_START + pos % self.ring
    }

    /// Copies `data` into the map at byte `off`.
    fn put(&self, off: u64, data: &[u8]) -> Result<(), MediaError> {
        self.map.put(off as usize, data).map_err(MediaError::Io)
    }

    /// Copies bytes out of the map at byte `off`.
    fn get(&self, off: u64, buf: &mut [u8]) {
        self.map.get(off as usize, buf);
    }

    fn flush(&self, from: u64, to: u64) -> Result<(), MediaError> {
        if self.fault_flush.swap(false, Ordering::Relaxed) {
            return Err(MediaError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        // Two ranges when the dirty span wraps the ring end.
        let mut pos = from;
        while pos < to {
            let phys = self.phys(pos);
            let run = (to - pos).min(RING_START + self.ring - phys);
            self.map
                .flush_range(phys as usize, run as usize)
                .map_err(MediaError::Io)?;
            pos += run;
        }
        Ok(())
    }

    /// Opens the cache file (creating it with `size` bytes), recovers committed records
    /// into the mirror sets, and starts the destage thread. Records are committed by
    /// direct writes ([`CacheWrites::Direct`]).
    pub fn open(
        path: &Path,
        size: u64,
        volumes: HashMap<u32, Arc<MirrorSet>>,
    ) -> Result<Arc<Self>, MediaError> {
        Self::open_with(path, size, volumes, CacheWrites::Direct)
    }

    /// [`open`](Self::open) with the given way of storing and committing records. Where
    /// the file system takes no direct I/O, [`CacheWrites::Direct`] falls back to
    /// [`CacheWrites::Write`] (logged).
    pub fn open_with(
        path: &Path,
        size: u64,
        volumes: HashMap<u32, Arc<MirrorSet>>,
        writes: CacheWrites,
    ) -> Result<Arc<Self>, MediaError> {
        let (map, fresh) = Self::open_file(path, size, writes)?;
        Self::open_region(map, fresh, &path.display().to_string(), volumes)
    }

    /// The cache file as a region: created with `size` zeroed bytes if missing (then
    /// `fresh` is true), refused if it holds another size, and mapped for `writes`.
    pub(crate) fn open_file(
        path: &Path,
        size: u64,
        writes: CacheWrites,
    ) -> Result<(Box<dyn Region>, bool), MediaError> {
        if size < RING_START + (1 << 20) {
            return Err(MediaError::Failed(format!(
                "{}: the write cache needs at least 1 MiB",
                path.display()
            )));
        }
        // Owner-only: the journal holds written data not yet on the mirrors.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = f.metadata()?.len();
        if len != 0 && len != size {
            return Err(MediaError::Failed(format!(
                "{}: cache file holds {len} bytes, the configuration says {size}",
                path.display()
            )));
        }
        let fresh = len == 0;
        if fresh {
            preallocate(&f, size)?;
        }
        let map: Box<dyn Region> = match writes {
            CacheWrites::Direct => match DirectRegion::new(&f, path) {
                Ok(r) => {
                    warn_if_unreclaimable(path, size);
                    Box::new(r)
                }
                Err(e) => {
                    warn!(
                        "{}: no direct writes ({e}); commits use msync of a shared map",
                        path.display()
                    );
                    Box::new(MmapRegion::new(&f, false)?)
                }
            },
            CacheWrites::Write => Box::new(MmapRegion::new(&f, false)?),
            CacheWrites::Map => Box::new(MmapRegion::new(&f, true)?),
        };
        Ok((map, fresh))
    }

    /// [`open`](Self::open) over a region already sized (a mapped file or the test double);
    /// `fresh` says it holds zeros and no cache yet. `name` names it in errors.
    pub fn open_region(
        map: Box<dyn Region>,
        fresh: bool,
        name: &str,
        volumes: HashMap<u32, Arc<MirrorSet>>,
    ) -> Result<Arc<Self>, MediaError> {
        let cache = Self::open_region_without_destage(map, fresh, name, volumes)?;
        let c = Arc::clone(&cache);
        let handle = std::thread::Builder::new()
            .name("ftss-destage".into())
            .spawn(move || c.destage_loop())
            .map_err(MediaError::Io)?;
        *cache
            .destage_thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
        Ok(cache)
    }

    /// [`open_region`](Self::open_region) without the destage thread: the caller moves
    /// committed records to the mirrors with [`destage_committed`](Self::destage_committed).
    /// For the deterministic simulations, where a thread's timing must not decide which
    /// file operation a power cut lands on.
    pub fn open_region_without_destage(
        map: Box<dyn Region>,
        fresh: bool,
        name: &str,
        volumes: HashMap<u32, Arc<MirrorSet>>,
    ) -> Result<Arc<Self>, MediaError> {
        let size = map.size() as u64;
        let cache = WriteCache {
            map,
            ring: size - RING_START,
            inner: Mutex::new(Inner {
                head: 0,
                tail: 0,
                next_seq: 1,
                appended_seq: 0,
                durable_seq: 0,
                durable_pos: 0,
                claimed_pos: 0,
                claimed_seq: 0,
                wanted_seq: 0,
                inflight: VecDeque::new(),
                inflight_base: 0,
                queue: VecDeque::new(),
                index: BlockIndex::default(),
                discards: VecDeque::new(),
                sb_seq: 0,
            }),
            cond: Condvar::new(),
            durable_tx: tokio::sync::watch::Sender::new(0),
            volumes,
            stop: AtomicBool::new(false),
            draining: AtomicU64::new(0),
            destage_thread: Mutex::new(None),
            stop_commits: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            flush_us: AtomicU64::new(0),
            commit_latency: crate::counters::Histogram::default(),
            commit_wait_max_us: AtomicU64::new(0),
            space_wait_max_us: AtomicU64::new(0),
            destaged: AtomicU64::new(0),
            records: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            recovery_ms: AtomicU64::new(0),
            fault_append: Mutex::new((0, 0)),
            fault_armed: AtomicBool::new(false),
            fault_flush: AtomicBool::new(false),
        };
        if !fresh {
            cache.recover(name)?;
        } else {
            cache.write_superblock(0, 1, 1)?;
            lock(&cache.inner)?.sb_seq = 1;
        }
        Ok(Arc::new(cache))
    }

    /// Largest `data` one [`append`](Self::append) takes: a record may fill at most half
    /// the ring, so a writer never waits for space that cannot come.
    pub fn append_max(&self) -> usize {
        let max = (self.ring / 2).saturating_sub(HDR_LEN) / ALIGN * ALIGN;
        usize::try_from(max).unwrap_or(usize::MAX)
    }

    /// Sequence number of the last record appended.
    pub fn appended_seq(&self) -> u64 {
        lock_to_report(&self.inner).appended_seq
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let g = lock_to_report(&self.inner);
        CacheStats {
            commit_flushes: self.flushes.load(Ordering::Relaxed),
            commit_flush_us: self.flush_us.load(Ordering::Relaxed),
            commit_wait_max_us: self.commit_wait_max_us.load(Ordering::Relaxed),
            space_wait_max_us: self.space_wait_max_us.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            recovered_records: self.recovered.load(Ordering::Relaxed),
            recovery_ms: self.recovery_ms.load(Ordering::Relaxed),
            dirty_bytes: g.head - g.tail,
            ring_bytes: self.ring,
            destaged_bytes: self.destaged.load(Ordering::Relaxed),
        }
    }

    /// Durations of the commits so far.
    pub fn commit_latency(&self) -> &crate::counters::Histogram {
        &self.commit_latency
    }
}

mod commit;
mod destage;
mod destage_plan;
mod format;
mod index;
mod lookup;
mod recovery;
mod volume;

use commit::defer;
pub use commit::{defer_commits, PendingCommits};
use index::BlockIndex;
pub use volume::CachedVolume;

#[cfg(test)]
mod discard_tests;
#[cfg(test)]
mod inline_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod volatile_tests;

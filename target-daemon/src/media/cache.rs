//! The write cache: an mmap'd circular journal of records, committed in groups with one
//! `msync` for many writers, destaged in the background to each volume's mirror set.
//! Formats, commit order and recovery: docs/design.md.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{error, info};

use super::disk::{MmapRegion, Region};
use super::mirror::MirrorSet;
use super::{BlockStore, CacheMode, MediaError, Provisioning};

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
/// Blocks of checksums GET LBA STATUS reads from the mirrors at first, and at most, at a
/// time: it starts small, since a short extent ends the answer, and doubles.
const PROVISIONING_CHUNK_FIRST: u64 = 1 << 10;
const PROVISIONING_CHUNK_MAX: u64 = 1 << 16;
const HDR_LEN: u64 = 48;
const ALIGN: u64 = 64;
/// How long committed records may wait in the ring before destage (unless it fills).
const DESTAGE_INTERVAL: Duration = Duration::from_millis(100);
/// Records destaged per batch (one mirror sync and one superblock write per batch).
const DESTAGE_BATCH_RECORDS_MAX: usize = 16384;
/// Largest single write destage hands a mirror set when it coalesces contiguous blocks.
const DESTAGE_RUN_MAX: usize = 1 << 20;
/// Writers wait this long for ring space before the write is refused (BUSY upstream).
const SPACE_WAIT: Duration = Duration::from_secs(30);
/// Commit flushes allowed to run at once (see `wait_durable`). Measured on this
/// project's test machine (ext4 on virtio): 4 concurrent msyncs gave 10.8K 4 KiB writes/s
/// at queue depth 32 against 15.7K for 1, because concurrent flushes do not overlap on
/// the device and only split the groups. Raise it for devices with parallel flushes.
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
    /// msync calls made for group commits.
    pub commit_flushes: u64,
    /// Microseconds those msyncs took in all: with `commit_flushes` and `records`, the
    /// cost of a commit on this device and how many records share one.
    pub commit_flush_us: u64,
    /// Longest one writer waited for its record to be committed, in microseconds: an
    /// average hides the stall a sustained load meets behind a slow msync.
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
    /// Latest cached copy of each block: (volume, lba) -> (seq, log position of its data).
    /// A discard removes the entries it covers, so an entry is always newer than every
    /// pending discard of its block.
    index: HashMap<(u32, u64), (u64, u64)>,
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
    /// The destage thread, joined by [`WriteCache::shutdown`].
    destage_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when a commit flush failed: no record may be called committed after that.
    stop_commits: AtomicBool,
    flushes: AtomicU64,
    /// Microseconds spent in commit msyncs.
    flush_us: AtomicU64,
    /// Each commit msync's duration, for the metrics endpoint.
    commit_latency: crate::metrics::Histogram,
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

/// Writes zeros over the whole file once. A sparse or fallocated journal would allocate
/// or convert extents on first write, turning every commit's msync into a file-system
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

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WriteCache {
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
    /// into the mirror sets, and starts the destage thread. Records go in with `pwrite`
    /// ([`Stores::Write`](super::disk::Stores)).
    pub fn open(
        path: &Path,
        size: u64,
        volumes: HashMap<u32, Arc<MirrorSet>>,
    ) -> Result<Arc<Self>, MediaError> {
        Self::open_with(path, size, volumes, false)
    }

    /// [`open`](Self::open), storing records through the map when `map_stores` is set
    /// ([`Stores::Map`](super::disk::Stores), for DAX files).
    pub fn open_with(
        path: &Path,
        size: u64,
        volumes: HashMap<u32, Arc<MirrorSet>>,
        map_stores: bool,
    ) -> Result<Arc<Self>, MediaError> {
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
        let map = MmapRegion::new(&f, map_stores)?;
        Self::open_region(Box::new(map), fresh, &path.display().to_string(), volumes)
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
                index: HashMap::new(),
                discards: VecDeque::new(),
                sb_seq: 0,
            }),
            cond: Condvar::new(),
            durable_tx: tokio::sync::watch::Sender::new(0),
            volumes,
            stop: AtomicBool::new(false),
            destage_thread: Mutex::new(None),
            stop_commits: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            flush_us: AtomicU64::new(0),
            commit_latency: crate::metrics::Histogram::default(),
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
            lock(&cache.inner).sb_seq = 1;
        }
        Ok(Arc::new(cache))
    }

    /// Destages every committed record now, in the calling thread (what the destage
    /// thread does in batches); for caches opened without that thread.
    pub fn destage_committed(&self) -> Result<(), MediaError> {
        let batch: Vec<Pending> = {
            let g = lock(&self.inner);
            let durable = g.durable_seq;
            g.queue
                .iter()
                .take_while(|p| p.seq <= durable)
                .copied()
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.destage(&batch)
    }

    fn write_superblock(&self, tail: u64, tail_seq: u64, sb_seq: u64) -> Result<(), MediaError> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(SB_MAGIC);
        b.extend_from_slice(&u32::from(VERSION).to_le_bytes());
        b.extend_from_slice(&sb_seq.to_le_bytes());
        b.extend_from_slice(&self.ring.to_le_bytes());
        b.extend_from_slice(&tail.to_le_bytes());
        b.extend_from_slice(&tail_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let slot = (sb_seq % 2) * SB_LEN;
        self.put(slot, &b)?;
        self.map
            .flush_range(slot as usize, SB_LEN as usize)
            .map_err(MediaError::Io)
    }

    /// The valid superblock with the highest sequence: (tail, tail seq, sb seq).
    fn read_superblock(&self) -> Option<(u64, u64, u64)> {
        let mut best = None;
        for slot in 0..2u64 {
            // magic 8, version 4, sb seq 8, ring 8, tail 8, tail seq 8, then the crc.
            let mut b = [0u8; 48];
            self.get(slot * SB_LEN, &mut b);
            if &b[..8] != SB_MAGIC
                || crc32c::crc32c(&b[..44]) != u32::from_le_bytes([b[44], b[45], b[46], b[47]])
            {
                continue;
            }
            let rd = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
            let (sb_seq, ring, tail, tail_seq) = (rd(12), rd(20), rd(28), rd(36));
            if ring != self.ring {
                continue;
            }
            if best.is_none_or(|(_, _, s)| sb_seq > s) {
                best = Some((tail, tail_seq, sb_seq));
            }
        }
        best
    }

    /// Parses the record at log position `pos`, expecting sequence `seq`.
    fn parse_record(&self, pos: u64, seq: u64) -> Option<(u16, u32, u64, Vec<u8>)> {
        let phys = self.phys(pos);
        if RING_START + self.ring - phys < HDR_LEN {
            return None;
        }
        let mut h = [0u8; HDR_LEN as usize];
        self.get(phys, &mut h);
        let u32at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        if u32at(0) != REC_MAGIC || u16::from_le_bytes([h[4], h[5]]) != VERSION {
            return None;
        }
        let kind = u16::from_le_bytes([h[6], h[7]]);
        if u64at(8) != seq {
            return None;
        }
        let (volume, len, lba) = (u32at(16), u64::from(u32at(20)), u64at(24));
        if len > self.ring || phys + HDR_LEN + len > RING_START + self.ring {
            return None;
        }
        let want = u32at(40);
        let mut payload = vec![0u8; len as usize];
        self.get(phys + HDR_LEN, &mut payload);
        h[40..44].fill(0);
        let mut c = crc32c::crc32c(&h);
        c = crc32c::crc32c_append(c, &payload);
        (c == want).then_some((kind, volume, lba, payload))
    }

    fn recover(&self, name: &str) -> Result<(), MediaError> {
        let started = Instant::now();
        let (tail, tail_seq, sb_seq) = self.read_superblock().ok_or_else(|| {
            MediaError::Failed(format!(
                "{name}: no valid superblock: not an ftss write cache"
            ))
        })?;
        let (mut pos, mut seq, mut n) = (tail, tail_seq, 0u64);
        let mut touched = Vec::new();
        while let Some((kind, volume, lba, payload)) = self.parse_record(pos, seq) {
            let rec_len = align(HDR_LEN + payload.len() as u64);
            if kind == KIND_WRAP {
                // A wrap record never sits at the ring start, so this is the next lap.
                pos = pos.div_ceil(self.ring) * self.ring;
            } else {
                let m = self.volumes.get(&volume).ok_or_else(|| {
                    MediaError::Failed(format!("{name}: record for unknown volume {volume}"))
                })?;
                match kind {
                    KIND_BLOCKS => m.write(lba, &payload)?,
                    KIND_DISCARD => {
                        let blocks = <[u8; 8]>::try_from(payload.as_slice())
                            .map(u64::from_le_bytes)
                            .map_err(|_| {
                                MediaError::Failed(format!(
                                    "{name}: discard record {seq} with a {}-byte payload",
                                    payload.len()
                                ))
                            })?;
                        m.deallocate(lba, blocks)?;
                    }
                    // Its crc verified, so a newer build wrote it: applying it as
                    // something else, or skipping it, could lose acknowledged data.
                    _ => {
                        return Err(MediaError::Failed(format!(
                            "{name}: record {seq} of unknown kind {kind}: written by a newer \
                             version of ftss"
                        )))
                    }
                }
                if !touched.contains(&volume) {
                    touched.push(volume);
                }
                pos += rec_len;
                n += 1;
            }
            seq += 1;
            if pos - tail >= self.ring {
                break;
            }
        }
        for v in touched {
            if let Some(m) = self.volumes.get(&v) {
                m.sync()?;
            }
        }
        // Every replayed record is on the mirrors: start with an empty ring after them.
        // Records past the first bad one were never acknowledged, but some may be intact
        // on disk (the kernel writes back mapped pages in any order). Skipping sequence
        // numbers by more than the ring can hold keeps a later recovery from taking one of
        // them for a new record written at the same place with the same number.
        let seq = seq + self.ring / ALIGN + 1;
        self.write_superblock(pos, seq, sb_seq + 1)?;
        let mut g = lock(&self.inner);
        g.head = pos;
        g.tail = pos;
        g.durable_pos = pos;
        g.claimed_pos = pos;
        g.claimed_seq = seq - 1;
        g.next_seq = seq;
        g.appended_seq = seq - 1;
        g.durable_seq = seq - 1;
        g.sb_seq = sb_seq + 1;
        drop(g);
        let ms = started.elapsed().as_millis() as u64;
        self.recovered.store(n, Ordering::Relaxed);
        self.recovery_ms.store(ms, Ordering::Relaxed);
        info!(records = n, ms, "write cache recovered");
        Ok(())
    }

    /// Appends a block-write record; returns its sequence number. Reads see it at once.
    pub fn append(&self, volume: u32, lba: u64, data: &[u8]) -> Result<u64, MediaError> {
        let op = Op::Blocks {
            len: u32::try_from(data.len())
                .map_err(|_| MediaError::Failed("write larger than half the write cache".into()))?,
        };
        self.append_record(volume, lba, op, data)
    }

    /// Appends a discard record: `blocks` blocks from `lba` of `volume` are deallocated
    /// (they read as zeros and count as unmapped), ordered after every record appended
    /// before it and before every later one. Returns its sequence number; reads and GET
    /// LBA STATUS see it at once, and it is durable once committed, like a write.
    pub fn append_discard(&self, volume: u32, lba: u64, blocks: u64) -> Result<u64, MediaError> {
        let m = self
            .volumes
            .get(&volume)
            .ok_or_else(|| MediaError::Failed(format!("no volume {volume}")))?;
        // Checked here: recovery would refuse a record the mirrors cannot apply.
        if lba.checked_add(blocks).is_none_or(|e| e > m.blocks()) {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        self.append_record(volume, lba, Op::Discard { blocks }, &blocks.to_le_bytes())
    }

    /// Drops the index entries of `blocks` blocks from `lba` of `volume` (a discard
    /// supersedes them), walking whichever is smaller: the range or the index.
    fn unindex(g: &mut Inner, volume: u32, lba: u64, blocks: u64) {
        let end = lba.saturating_add(blocks);
        if blocks < g.index.len() as u64 {
            for b in lba..end {
                g.index.remove(&(volume, b));
            }
        } else {
            g.index
                .retain(|&(v, b), _| !(v == volume && (lba..end).contains(&b)));
        }
    }

    /// Appends one record of kind `op` with `payload`, waiting for ring space.
    fn append_record(&self, volume: u32, lba: u64, op: Op, data: &[u8]) -> Result<u64, MediaError> {
        self.append_fault()?;
        let len = align(HDR_LEN + data.len() as u64);
        if len > self.ring / 2 {
            return Err(MediaError::Failed(
                "write larger than half the write cache".into(),
            ));
        }
        let bs = self
            .volumes
            .get(&volume)
            .map_or(512, |m| u64::from(m.block_size()));
        let started = Instant::now();
        let deadline = started + SPACE_WAIT;
        let mut waited = false;
        let mut g = lock(&self.inner);
        loop {
            // A record never straddles the ring end: it starts over at the ring start.
            let room_to_end = self.ring - g.head % self.ring;
            let need = if room_to_end < len {
                room_to_end + len
            } else {
                len
            };
            if g.head + need - g.tail <= self.ring {
                if room_to_end < len {
                    let seq = g.next_seq;
                    let hdr = self.header(KIND_WRAP, seq, 0, 0, &[]);
                    // A sequence number is used up only by a record that is in: recovery
                    // stops at a gap.
                    self.put(self.phys(g.head), &hdr)?;
                    g.next_seq += 1;
                    let (pos, end) = (g.head, g.head + room_to_end);
                    g.queue.push_back(Pending {
                        seq,
                        pos,
                        end,
                        volume: u32::MAX,
                        lba: 0,
                        op: Op::Wrap,
                    });
                    g.head = end;
                    g.appended_seq = seq;
                }
                break;
            }
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::Relaxed) || refuse_wait() {
                if waited {
                    raise_max(&self.space_wait_max_us, started);
                }
                return Err(MediaError::Full);
            }
            waited = true;
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if waited {
            raise_max(&self.space_wait_max_us, started);
        }
        let seq = g.next_seq;
        let pos = g.head;
        // TigerBeetle's habit: an assert costs nanoseconds, a record over live data costs
        // the journal. The ring never holds more than its size, and a record never crosses
        // the end of the region (a WRAP record took the rest of the lap above).
        assert!(
            g.tail <= pos && pos + len - g.tail <= self.ring,
            "ring overrun: tail {} head {pos} len {len} ring {}",
            g.tail,
            self.ring
        );
        assert!(
            pos % self.ring + len <= self.ring,
            "record at {pos} of {len} bytes crosses the ring's end"
        );
        assert_eq!(seq, g.appended_seq + 1, "sequence numbers have no gap");
        let kind = match op {
            Op::Discard { .. } => KIND_DISCARD,
            _ => KIND_BLOCKS,
        };
        let hdr = self.header(kind, seq, volume, lba, data);
        // Head moves only once both parts are in: a failed store leaves no record, and the
        // next append overwrites what it left.
        self.map
            .put_parts(self.phys(pos) as usize, &[&hdr, data])
            .map_err(MediaError::Io)?;
        g.next_seq += 1;
        g.head = pos + len;
        g.appended_seq = seq;
        match op {
            Op::Discard { blocks } => {
                Self::unindex(&mut g, volume, lba, blocks);
                g.discards.push_back(Discard {
                    seq,
                    volume,
                    lba,
                    blocks,
                });
            }
            _ => {
                for (k, _) in data.chunks(bs as usize).enumerate() {
                    g.index.insert(
                        (volume, lba + k as u64),
                        (seq, pos + HDR_LEN + k as u64 * bs),
                    );
                }
            }
        }
        g.queue.push_back(Pending {
            seq,
            pos,
            end: pos + len,
            volume,
            lba,
            op,
        });
        drop(g);
        self.records.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    fn header(
        &self,
        kind: u16,
        seq: u64,
        volume: u32,
        lba: u64,
        payload: &[u8],
    ) -> [u8; HDR_LEN as usize] {
        let mut h = [0u8; HDR_LEN as usize];
        h[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..20].copy_from_slice(&volume.to_le_bytes());
        h[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[24..32].copy_from_slice(&lba.to_le_bytes());
        let mut c = crc32c::crc32c(&h);
        c = crc32c::crc32c_append(c, payload);
        h[40..44].copy_from_slice(&c.to_le_bytes());
        h
    }

    /// Fault injection for tests: after `after` more successful appends, the next
    /// `count` appends fail with EIO and store nothing, as a failed store into the map
    /// would.
    pub fn inject_append_failures(&self, after: u64, count: u64) {
        *lock_plain(&self.fault_append) = (after, count);
        self.fault_armed.store(count > 0, Ordering::Relaxed);
    }

    /// Fault injection for tests: the next commit flush fails with EIO, as a failed
    /// msync does (the cache then refuses every later commit).
    pub fn inject_commit_failure(&self) {
        self.fault_flush.store(true, Ordering::Relaxed);
    }

    fn append_fault(&self) -> Result<(), MediaError> {
        if !self.fault_armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut f = lock_plain(&self.fault_append);
        match *f {
            (_, 0) => Ok(()),
            (0, n) => {
                f.1 = n - 1;
                self.fault_armed.store(n > 1, Ordering::Relaxed);
                Err(MediaError::Io(std::io::Error::from_raw_os_error(libc::EIO)))
            }
            (a, _) => {
                f.0 = a - 1;
                Ok(())
            }
        }
    }

    /// Largest `data` one [`append`](Self::append) takes: a record may fill at most half
    /// the ring, so a writer never waits for space that cannot come.
    pub fn append_max(&self) -> usize {
        let max = (self.ring / 2).saturating_sub(HDR_LEN) / ALIGN * ALIGN;
        usize::try_from(max).unwrap_or(usize::MAX)
    }

    /// Sequence number of the last record appended.
    pub fn appended_seq(&self) -> u64 {
        lock(&self.inner).appended_seq
    }

    /// Claims the next commit flush if record `seq` needs one and a flush may start: it
    /// covers everything appended so far (group commit). Up to `FLUSHES_MAX` run at once.
    fn claim(&self, g: &mut Inner, seq: u64) -> Option<Flight> {
        if g.claimed_seq >= seq || g.inflight.len() >= FLUSHES_MAX {
            return None;
        }
        let (from, to, target) = (g.claimed_pos, g.head, g.appended_seq);
        g.claimed_pos = to;
        g.claimed_seq = target;
        let id = g.inflight_base + g.inflight.len() as u64;
        g.inflight.push_back((to, target, false));
        Some(Flight { id, from, to })
    }

    /// Runs a claimed flush and publishes the new durable frontier to both kinds of
    /// waiters. A record counts as committed only when its flush and every earlier one
    /// have finished: recovery stops at the first record missing from the disk, so
    /// nothing after a hole may be acknowledged.
    fn fly(&self, f: Flight) -> Result<(), MediaError> {
        let t0 = Instant::now();
        let r = self.flush(f.from, f.to);
        let took = t0.elapsed();
        self.flush_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.commit_latency.observe(took);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let mut g = lock(&self.inner);
        if let Err(e) = r {
            // An msync failure leaves the cache's contents unknown: stop taking writes
            // rather than acknowledge what may not be stored. The flight stays unfinished,
            // so the frontier never passes it.
            error!("write cache msync failed: {e}");
            self.stop.store(true, Ordering::Relaxed);
            self.stop_commits.store(true, Ordering::Relaxed);
            self.cond.notify_all();
            drop(g);
            self.durable_tx.send_modify(|_| {});
            return Err(e);
        }
        let k = (f.id - g.inflight_base) as usize;
        if let Some(fl) = g.inflight.get_mut(k) {
            fl.2 = true;
        }
        while g.inflight.front().is_some_and(|fl| fl.2) {
            if let Some((to, target, _)) = g.inflight.pop_front() {
                g.inflight_base += 1;
                g.durable_seq = g.durable_seq.max(target);
                g.durable_pos = g.durable_pos.max(to);
            }
        }
        let durable = g.durable_seq;
        self.cond.notify_all();
        drop(g);
        self.durable_tx.send_replace(durable);
        Ok(())
    }

    /// Runs `f`, then at once the next flush for whatever waiters have asked for in the
    /// meantime: a queue-deep writer then finds the device busy with back-to-back commits
    /// instead of idle while a new flusher is woken.
    fn fly_on(&self, mut f: Flight) {
        loop {
            if self.fly(f).is_err() {
                return;
            }
            let mut g = lock(&self.inner);
            let wanted = g.wanted_seq;
            match self.claim(&mut g, wanted) {
                Some(next) => f = next,
                None => return,
            }
        }
    }

    /// Waits until record `seq` is committed, blocking the thread. A waiter whose record
    /// no running flush covers runs one itself for everything appended so far.
    pub fn wait_durable(&self, seq: u64) -> Result<(), MediaError> {
        let started = Instant::now();
        self.wait_commit(seq)?;
        raise_max(&self.commit_wait_max_us, started);
        Ok(())
    }

    /// [`wait_durable`](Self::wait_durable) for the cache's own waits (destage in volatile
    /// mode, drain): no writer stalls in them, so they stay out of the maximum.
    fn wait_commit(&self, seq: u64) -> Result<(), MediaError> {
        let mut g = lock(&self.inner);
        loop {
            if g.durable_seq >= seq {
                return Ok(());
            }
            if self.stop_commits.load(Ordering::Relaxed) {
                return Err(MediaError::Failed("write cache stopped".into()));
            }
            g.wanted_seq = g.wanted_seq.max(seq);
            if let Some(f) = self.claim(&mut g, seq) {
                drop(g);
                self.fly(f)?;
                g = lock(&self.inner);
            } else {
                g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Waits until record `seq` is committed without holding a thread: the commands of a
    /// queue-deep initiator then cost one parked task each instead of one blocked thread
    /// each, and a finished flush wakes them with one notification instead of a
    /// condition-variable stampede. The msync itself runs on a blocking thread.
    pub async fn committed(self: &Arc<Self>, seq: u64) -> Result<(), MediaError> {
        let started = Instant::now();
        let mut rx = self.durable_tx.subscribe();
        loop {
            // Marked seen before the check, so a flush finishing after it wakes us.
            rx.borrow_and_update();
            {
                let mut g = lock(&self.inner);
                if g.durable_seq >= seq {
                    drop(g);
                    raise_max(&self.commit_wait_max_us, started);
                    return Ok(());
                }
                if self.stop_commits.load(Ordering::Relaxed) {
                    return Err(MediaError::Failed("write cache stopped".into()));
                }
                g.wanted_seq = g.wanted_seq.max(seq);
                if let Some(f) = self.claim(&mut g, seq) {
                    drop(g);
                    let c = Arc::clone(self);
                    // The outcome reaches every waiter through `durable_tx`.
                    tokio::task::spawn_blocking(move || c.fly_on(f));
                }
            }
            if rx.changed().await.is_err() {
                return Err(MediaError::Failed("write cache stopped".into()));
            }
        }
    }

    /// Where the current copy of each of `n` blocks from `lba` of `volume` is. Destage
    /// drops an index entry or a pending discard only after the mirrors hold its effect,
    /// so a block that neither covers is already on the mirrors. Callers look at the
    /// mirrors only after this, never before: the other order could miss a block whose
    /// destage finished in between.
    fn sources(g: &Inner, volume: u32, lba: u64, n: u64) -> Vec<Source> {
        let end = lba.saturating_add(n);
        let discarded: Vec<(u64, u64)> = g
            .discards
            .iter()
            .filter(|d| d.volume == volume && d.lba < end && lba < d.lba + d.blocks)
            .map(|d| (d.lba, d.lba + d.blocks))
            .collect();
        (lba..end)
            .map(|b| {
                if let Some(&(_, pos)) = g.index.get(&(volume, b)) {
                    // Newer than any pending discard of the block (see `index`).
                    Source::Ring(pos)
                } else if discarded.iter().any(|&(s, e)| (s..e).contains(&b)) {
                    Source::Discarded
                } else {
                    Source::Mirrors
                }
            })
            .collect()
    }

    /// Reads blocks of `volume`: cached copies from the ring, blocks of pending discards
    /// as zeros, the rest from the mirrors.
    pub fn read(&self, volume: u32, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let m = self
            .volumes
            .get(&volume)
            .ok_or_else(|| MediaError::Failed(format!("no volume {volume}")))?;
        let bs = m.block_size() as usize;
        let n = buf.len() / bs;
        let sources = {
            let g = lock(&self.inner);
            let sources = Self::sources(&g, volume, lba, n as u64);
            // Copied under the lock: destage may release the space once it lets go.
            for (k, src) in sources.iter().enumerate() {
                let b = &mut buf[k * bs..(k + 1) * bs];
                match src {
                    Source::Ring(pos) => self.get(self.phys(*pos), b),
                    Source::Discarded => b.fill(0),
                    Source::Mirrors => {}
                }
            }
            sources
        };
        // Only the blocks the mirrors hold are read there: a block being destaged is
        // mid-write on the mirrors, and a verified read that met it there could "repair"
        // one mirror with the other's older copy.
        let mut k = 0;
        while k < n {
            if !matches!(sources[k], Source::Mirrors) {
                k += 1;
                continue;
            }
            let run = sources[k..]
                .iter()
                .take_while(|s| matches!(s, Source::Mirrors))
                .count();
            m.read(lba + k as u64, &mut buf[k * bs..(k + run) * bs])?;
            k += run;
        }
        Ok(())
    }

    /// Provisioning of the blocks from `lba` of `volume` (GET LBA STATUS): the status of
    /// `lba` and how many blocks from it, at least 1 and at most `max`, share it. Cached
    /// writes are mapped, pending discards deallocated; the rest is what the mirrors'
    /// checksums say ([`DEALLOCATED`](super::mirror::DEALLOCATED) or not).
    pub fn provisioning(
        &self,
        volume: u32,
        lba: u64,
        max: u64,
    ) -> Result<(Provisioning, u64), MediaError> {
        let m = self
            .volumes
            .get(&volume)
            .ok_or_else(|| MediaError::Failed(format!("no volume {volume}")))?;
        let max = max.max(1);
        if lba >= m.blocks() {
            return Err(MediaError::OutOfRange { lba, blocks: 1 });
        }
        let end = lba.saturating_add(max).min(m.blocks());
        let mut state = None;
        let mut at = lba;
        let mut chunk = PROVISIONING_CHUNK_FIRST;
        while at < end {
            let n = (end - at).min(chunk);
            chunk = (chunk * 2).min(PROVISIONING_CHUNK_MAX);
            let sources = Self::sources(&lock(&self.inner), volume, at, n);
            let crcs = m.checksums(at, n)?;
            for (src, crc) in sources.iter().zip(crcs) {
                let s = match src {
                    Source::Ring(_) => Provisioning::Mapped,
                    Source::Discarded => Provisioning::Deallocated,
                    Source::Mirrors if crc == super::mirror::DEALLOCATED => {
                        Provisioning::Deallocated
                    }
                    Source::Mirrors => Provisioning::Mapped,
                };
                match state {
                    None => state = Some(s),
                    Some(first) if first != s => return Ok((first, at - lba)),
                    Some(_) => {}
                }
                at += 1;
            }
        }
        Ok((state.unwrap_or(Provisioning::Mapped), at - lba))
    }

    fn destage_loop(self: Arc<Self>) {
        let mut last_report = Instant::now();
        let mut last_records = 0;
        while !self.stop.load(Ordering::Relaxed) {
            if last_report.elapsed() >= Duration::from_secs(5) {
                let s = self.stats();
                if s.records != last_records {
                    let us = s.commit_flush_us / s.commit_flushes.max(1);
                    info!(
                        records = s.records,
                        msyncs = s.commit_flushes,
                        msync_us_avg = us,
                        dirty_bytes = s.dirty_bytes,
                        "write cache"
                    );
                    last_records = s.records;
                }
                last_report = Instant::now();
            }
            let batch: Vec<Pending> = {
                // Destage in large batches: every mirror sync is a file-system commit
                // that the writers' msyncs queue behind, so fewer, bigger ones keep
                // commits fast. Go at once when the ring is half full.
                let mut g = lock(&self.inner);
                let started = Instant::now();
                while !self.stop.load(Ordering::Relaxed) {
                    let pending = !g.queue.is_empty();
                    let due =
                        (g.head - g.tail) * 2 >= self.ring || started.elapsed() >= DESTAGE_INTERVAL;
                    if pending && due {
                        if g.queue.front().is_some_and(|p| p.seq > g.durable_seq) {
                            // Volatile mode: no writer waited for a commit, so destage
                            // commits first (only committed records may reach the mirrors
                            // and move the tail).
                            let seq = g.appended_seq;
                            drop(g);
                            if let Err(e) = self.wait_commit(seq) {
                                error!("commit before destage failed: {e}");
                            }
                            g = lock(&self.inner);
                        }
                        break;
                    }
                    let (ng, _) = self
                        .cond
                        .wait_timeout(g, Duration::from_millis(10))
                        .unwrap_or_else(|e| e.into_inner());
                    g = ng;
                }
                let durable = g.durable_seq;
                g.queue
                    .iter()
                    .take_while(|p| p.seq <= durable)
                    .take(DESTAGE_BATCH_RECORDS_MAX)
                    .copied()
                    .collect()
            };
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = self.destage(&batch) {
                error!("destage failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn destage(&self, batch: &[Pending]) -> Result<(), MediaError> {
        // Coalesce: the newest copy of each block wins, and contiguous blocks go to the
        // mirrors as one write. Sequential and rewritten workloads then cost a few large
        // pwrites per batch instead of two per block per mirror. A discard drops the
        // older copies it covers, so every copy left is newer than every discard of its
        // block in the batch: applying the discards first, then the writes, gives the
        // log's order.
        let mut newest: BTreeMap<(u32, u64), u64> = BTreeMap::new();
        let mut discards: Vec<(u32, u64, u64)> = Vec::new();
        for p in batch {
            let Some(m) = self.volumes.get(&p.volume) else {
                continue; // wrap markers and records of volumes no longer configured
            };
            let bs = u64::from(m.block_size());
            match p.op {
                Op::Blocks { len } => {
                    for k in 0..u64::from(len) / bs {
                        newest.insert((p.volume, p.lba + k), p.pos + HDR_LEN + k * bs);
                    }
                }
                Op::Discard { blocks } => {
                    let end = p.lba.saturating_add(blocks);
                    let gone: Vec<(u32, u64)> = newest
                        .range((p.volume, p.lba)..(p.volume, end))
                        .map(|(k, _)| *k)
                        .collect();
                    for k in gone {
                        newest.remove(&k);
                    }
                    discards.push((p.volume, p.lba, blocks));
                }
                Op::Wrap => {}
            }
        }
        let mut touched = Vec::new();
        for &(v, lba, blocks) in &discards {
            if let Some(m) = self.volumes.get(&v) {
                m.deallocate(lba, blocks)?;
                if !touched.contains(&v) {
                    touched.push(v);
                }
            }
        }
        let mut run: Vec<u8> = Vec::new();
        let mut run_start: Option<(u32, u64)> = None;
        let mut blocks = newest.iter().peekable();
        while let Some((&(volume, lba), &pos)) = blocks.next() {
            let m = self
                .volumes
                .get(&volume)
                .ok_or_else(|| MediaError::Failed(format!("no volume {volume}")))?;
            let bs = m.block_size() as usize;
            if run_start.is_none() {
                run_start = Some((volume, lba));
                run.clear();
            }
            let at = run.len();
            run.resize(at + bs, 0);
            self.get(self.phys(pos), &mut run[at..]);
            let continues = blocks.peek().is_some_and(|(&(v, l), _)| {
                v == volume && l == lba + 1 && run.len() < DESTAGE_RUN_MAX
            });
            if !continues {
                if let Some((v, first)) = run_start.take() {
                    m.write(first, &run)?;
                    self.destaged.fetch_add(run.len() as u64, Ordering::Relaxed);
                    if !touched.contains(&v) {
                        touched.push(v);
                    }
                }
            }
        }
        for v in touched {
            if let Some(m) = self.volumes.get(&v) {
                m.sync()?;
            }
        }
        let last = batch.last().map_or(0, |b| b.seq);
        let (new_tail, tail_seq, sb_seq) = {
            let g = lock(&self.inner);
            let end = g
                .queue
                .iter()
                .take_while(|p| p.seq <= last)
                .last()
                .map_or(g.tail, |p| p.end);
            (end, last + 1, g.sb_seq + 1)
        };
        // The mirrors hold everything before `new_tail`; only now may the ring reuse it.
        self.write_superblock(new_tail, tail_seq, sb_seq)?;
        let mut g = lock(&self.inner);
        assert!(
            g.tail <= new_tail && new_tail <= g.head,
            "tail {} moved to {new_tail} outside the log (head {})",
            g.tail,
            g.head
        );
        g.sb_seq = sb_seq;
        g.tail = new_tail;
        while g.queue.front().is_some_and(|p| p.seq <= last) {
            if let Some(p) = g.queue.pop_front() {
                let bs = self
                    .volumes
                    .get(&p.volume)
                    .map_or(512, |m| u64::from(m.block_size()));
                let Op::Blocks { len } = p.op else {
                    continue;
                };
                for k in 0..u64::from(len) / bs {
                    let key = (p.volume, p.lba + k);
                    if g.index.get(&key).is_some_and(|&(s, _)| s == p.seq) {
                        g.index.remove(&key);
                    }
                }
            }
        }
        // The mirrors hold these discards now; reads may go there.
        while g.discards.front().is_some_and(|d| d.seq <= last) {
            g.discards.pop_front();
        }
        drop(g);
        self.cond.notify_all();
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let g = lock(&self.inner);
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

    /// Durations of the commit msyncs so far.
    pub fn commit_latency(&self) -> &crate::metrics::Histogram {
        &self.commit_latency
    }

    /// Waits until everything appended has been destaged (for tests and shutdown).
    pub fn drain(&self, timeout: Duration) -> bool {
        let seq = self.appended_seq();
        if self.wait_commit(seq).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.inner);
        while !g.queue.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    /// Stops the destage thread and waits for it to end (it finishes the batch it is
    /// writing), so a caller that then reopens the files meets no writer left behind.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        {
            // Under the lock the loop waits on, so the wake-up cannot slip between its
            // check of `stop` and its wait.
            let _g = lock(&self.inner);
            self.cond.notify_all();
        }
        let handle = self
            .destage_thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                // A destage thread that panicked has already said so in the log.
                let _ = h.join();
            }
        }
    }
}

/// Commits a command waits for: the newest record it appended, per cache.
type Waits = Vec<(Arc<WriteCache>, u64)>;

thread_local! {
    /// Set by [`defer_commits`] for the command running on this thread: the records it
    /// must see committed before it may be acknowledged, newest per cache.
    static DEFERRED: std::cell::RefCell<Option<Waits>> =
        const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// Set by [`run_inline`]: `Some(false)` while a command runs on an async worker,
    /// `Some(true)` once an append found the ring full and gave up instead of waiting.
    static NO_WAIT: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (one write command) on the calling async worker: an append that would have
/// to wait for ring space fails instead, and then `None` says to discard the outcome and
/// run the command again on a blocking thread. Only for commands whose single append is
/// their first and only effect, so a refused one has changed nothing. A write that fits
/// is a copy into the map; running it in place saves the thread handoff that otherwise
/// dominates a small write's cost.
pub fn run_inline<R>(f: impl FnOnce() -> R) -> Option<R> {
    struct Scope(Option<bool>);
    impl Drop for Scope {
        fn drop(&mut self) {
            NO_WAIT.with(|n| n.set(self.0));
        }
    }
    let _scope = Scope(NO_WAIT.with(|n| n.replace(Some(false))));
    let r = f();
    match NO_WAIT.with(std::cell::Cell::get) {
        Some(true) => None,
        _ => Some(r),
    }
}

/// In a [`run_inline`] scope: notes that the command would have blocked. `false` outside.
fn refuse_wait() -> bool {
    NO_WAIT.with(|n| match n.get() {
        Some(_) => {
            n.set(Some(true));
            true
        }
        None => false,
    })
}

/// Commits that a command's writes still need before it may be acknowledged.
#[derive(Default)]
pub struct PendingCommits(Waits);

impl PendingCommits {
    /// Whether the command can be acknowledged at once.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits for every pending commit; an error means the writes may not be stored and
    /// the command must not report GOOD.
    pub async fn wait(self) -> Result<(), MediaError> {
        for (cache, seq) in self.0 {
            cache.committed(seq).await?;
        }
        Ok(())
    }
}

/// Runs `f` (one SCSI command) with commit waits deferred: writes that must be durable
/// before they are acknowledged append their records and return at once, and the caller
/// gets the commits to wait for (asynchronously) before it sends the status. Nothing
/// changes for the command itself: its writes are visible to later reads as before.
pub fn defer_commits<R>(f: impl FnOnce() -> R) -> (R, PendingCommits) {
    /// Restores the previous state even if `f` unwinds, so a pooled thread never keeps
    /// deferring for a later caller that expects `write_blocks` to wait.
    struct Scope(Option<Option<Waits>>);
    impl Drop for Scope {
        fn drop(&mut self) {
            if let Some(prev) = self.0.take() {
                DEFERRED.with(|d| *d.borrow_mut() = prev);
            }
        }
    }
    let mut scope = Scope(Some(DEFERRED.with(|d| d.replace(Some(Vec::new())))));
    let r = f();
    let prev = scope.0.take().unwrap_or(None);
    let waits = DEFERRED.with(|d| d.replace(prev)).unwrap_or_default();
    (r, PendingCommits(waits))
}

/// Notes that the running command needs `seq` of `cache` committed; `false` when no
/// [`defer_commits`] scope is active and the caller must wait itself.
fn defer(cache: &Arc<WriteCache>, seq: u64) -> bool {
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(waits) => {
            match waits.iter_mut().find(|(c, _)| Arc::ptr_eq(c, cache)) {
                Some(w) => w.1 = w.1.max(seq),
                None => waits.push((Arc::clone(cache), seq)),
            }
            true
        }
        None => false,
    })
}

/// A LUN's storage: the write cache in front of its mirror set.
pub struct CachedVolume {
    cache: Arc<WriteCache>,
    mirrors: Arc<MirrorSet>,
    volume: u32,
    mode: CacheMode,
}

impl CachedVolume {
    /// Volume `volume` of `cache`, acknowledging writes as `mode` says.
    pub fn new(
        cache: Arc<WriteCache>,
        mirrors: Arc<MirrorSet>,
        volume: u32,
        mode: CacheMode,
    ) -> Self {
        Self {
            cache,
            mirrors,
            volume,
            mode,
        }
    }
}

impl BlockStore for CachedVolume {
    fn block_size(&self) -> u32 {
        self.mirrors.block_size()
    }

    fn num_blocks(&self) -> u64 {
        self.mirrors.blocks()
    }

    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.cache.read(self.volume, lba, buf)
    }

    fn write_blocks(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), MediaError> {
        let bs = u64::from(self.block_size());
        let n = data.len() as u64 / bs;
        if !(data.len() as u64).is_multiple_of(bs)
            || lba.checked_add(n).is_none_or(|e| e > self.num_blocks())
        {
            return Err(MediaError::OutOfRange { lba, blocks: n });
        }
        let seq = self.cache.append(self.volume, lba, data)?;
        if (fua || self.mode != CacheMode::Volatile) && !defer(&self.cache, seq) {
            self.cache.wait_durable(seq)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), MediaError> {
        let seq = self.cache.appended_seq();
        if defer(&self.cache, seq) {
            return Ok(());
        }
        self.cache.wait_durable(seq)
    }

    /// One discard record, acknowledged like a write of the same blocks: committed first
    /// in nonvolatile mode, at the next flush in volatile mode.
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), MediaError> {
        if lba
            .checked_add(blocks)
            .is_none_or(|e| e > self.num_blocks())
        {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        if blocks == 0 {
            return Ok(());
        }
        let seq = self.cache.append_discard(self.volume, lba, blocks)?;
        if self.mode != CacheMode::Volatile && !defer(&self.cache, seq) {
            self.cache.wait_durable(seq)?;
        }
        Ok(())
    }

    fn thin_provisioned(&self) -> bool {
        true
    }

    fn provisioning(&self, lba: u64, max: u64) -> Result<(Provisioning, u64), MediaError> {
        self.cache.provisioning(self.volume, lba, max)
    }

    fn cache_mode(&self) -> CacheMode {
        self.mode
    }

    fn writes_in_memory(&self) -> bool {
        true
    }

    fn health(&self) -> Result<(), MediaError> {
        if self
            .mirrors
            .status()
            .iter()
            .any(|s| s.state == super::mirror::MirrorState::Healthy)
        {
            Ok(())
        } else {
            Err(MediaError::Failed("every mirror has failed".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        for map_stores in [false, true] {
            writes_read_back(map_stores);
        }
    }

    /// Both ways records enter the file (pwrite, stores through the map) are read back
    /// through the map, from the ring and after destage, and recovered after a reopen.
    fn writes_read_back(map_stores: bool) {
        let (d, vols) = setup(if map_stores { "rw-map" } else { "rw" }, 2);
        let c =
            WriteCache::open_with(&d.join("wc"), 2 << 20, vols.clone(), map_stores).expect("open");
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
        let c = WriteCache::open_with(&d.join("wc"), 2 << 20, vols.clone(), map_stores)
            .expect("reopen");
        for i in 0..16u64 {
            c.read(0, 100 + i, &mut b).expect("read");
            assert_eq!(b, block(1000 + i), "block {} after reopen", 100 + i);
        }
        c.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn ring_wraps_many_times() {
        let (d, vols) = setup("wrap", 1);
        let c =
            WriteCache::open(&d.join("wc"), RING_START + (1 << 20), vols.clone()).expect("open");
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
            std::thread::sleep(Duration::from_millis(100));
            // Five records reach the disk, but the first one's bytes do not (a hole).
            for (i, lba) in [0u64, 1, 2, 5, 6].iter().enumerate() {
                let s = c.append(0, *lba, &block(100 + i as u64)).expect("append");
                c.wait_durable(s).expect("commit");
            }
            positions = lock(&c.inner).queue.iter().map(|p| p.pos).collect();
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
            std::thread::sleep(Duration::from_millis(100));
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
        vols[&0].read(5, &mut b).expect("mirror");
        assert_eq!(
            b,
            block(900),
            "the acknowledged write wins over a stale record"
        );
        vols[&0].read(6, &mut b).expect("mirror");
        assert!(b.iter().all(|&x| x == 0), "a stale record is never applied");
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
            std::thread::sleep(Duration::from_millis(100));
            for i in 0..100u64 {
                let s = c.append(0, i, &block(1000 + i)).expect("append");
                c.wait_durable(s).expect("commit");
            }
            // One more record, torn: written but with its payload damaged.
            let s = c.append(0, 100, &block(9999)).expect("append");
            c.wait_durable(s).expect("commit");
            let pos = lock(&c.inner).queue.back().map(|p| p.pos).expect("queued");
            let off = c.phys(pos) + HDR_LEN + 7;
            c.put(off, &[0xee]).expect("put");
            c.map.flush_range(0, c.map.size()).expect("flush");
        }
        drop(vols);
        let vols = open_volumes(&d);
        let c = WriteCache::open(&path, 4 << 20, vols.clone()).expect("reopen recovers");
        assert_eq!(c.stats().recovered_records, 100, "torn tail record dropped");
        let mut b = vec![0u8; 512];
        for i in 0..100u64 {
            vols[&0].read(i, &mut b).expect("mirror");
            assert_eq!(b, block(1000 + i), "record {i} replayed to the mirrors");
        }
        vols[&0].read(100, &mut b).expect("mirror");
        assert!(
            b.iter().all(|&x| x == 0),
            "the torn record was never applied"
        );
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
        assert!(lock(&c.inner).durable_seq >= appended);
        let s = c.stats();
        assert!(s.commit_flushes >= 1 && s.commit_flushes < 64);
        // Outside a scope a write waits for its own commit, as before.
        v.write_blocks(1000, &block(1000), false).expect("write");
        let appended = c.appended_seq();
        assert!(lock(&c.inner).durable_seq >= appended);
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
}

#[cfg(test)]
mod discard_tests {
    use super::super::disk::{Disk, SimFs};
    use super::super::mirror::DEALLOCATED;
    use super::*;
    use std::path::PathBuf;

    const BLOCKS: u64 = 256;

    /// The cache and a mirror set on a simulated file system, without the destage thread
    /// so each test decides when records reach the mirrors.
    fn media(fs: &SimFs, fresh: bool) -> (Arc<WriteCache>, Arc<MirrorSet>, CachedVolume) {
        media_of(fs, fresh, BLOCKS)
    }

    fn media_of(
        fs: &SimFs,
        fresh: bool,
        blocks: u64,
    ) -> (Arc<WriteCache>, Arc<MirrorSet>, CachedVolume) {
        let disks: Vec<(PathBuf, Box<dyn Disk>)> = ["a", "b"]
            .iter()
            .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
            .collect();
        let set = Arc::new(MirrorSet::open_disks(disks, blocks, 512).expect("mirrors"));
        let region = fs.file("wc");
        if fresh {
            region.set_size(RING_START + (1 << 20)).expect("size");
        }
        let cache = WriteCache::open_region_without_destage(
            Box::new(region),
            fresh,
            "wc",
            HashMap::from([(0u32, Arc::clone(&set))]),
        )
        .expect("cache");
        let v = CachedVolume::new(
            Arc::clone(&cache),
            Arc::clone(&set),
            0,
            CacheMode::Nonvolatile,
        );
        (cache, set, v)
    }

    fn fill(tag: u8, blocks: u64) -> Vec<u8> {
        (0..blocks * 512)
            .map(|i| tag ^ (i % 251) as u8 | 1)
            .collect()
    }

    /// Block `k` of `v` as the volume reads it.
    fn block(v: &CachedVolume, k: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        v.read_blocks(k, &mut b).expect("read");
        b
    }

    /// GET LBA STATUS from `lba` to the end, as (state, count) runs.
    fn runs(v: &CachedVolume, mut lba: u64) -> Vec<(Provisioning, u64)> {
        let mut out = Vec::new();
        while lba < BLOCKS {
            let (s, n) = v.provisioning(lba, BLOCKS - lba).expect("status");
            out.push((s, n));
            lba += n;
        }
        out
    }

    use Provisioning::{Deallocated as D, Mapped as M};

    #[test]
    fn a_discard_is_ordered_with_the_cached_writes_around_it() {
        let fs = SimFs::new(1);
        let (cache, set, v) = media(&fs, true);
        assert!(v.thin_provisioned());
        assert_eq!(runs(&v, 0), vec![(D, BLOCKS)], "a new volume is unmapped");
        let old = fill(1, 16);
        v.write_blocks(0, &old, false).expect("write");
        cache.destage_committed().expect("destage");
        // An older write of blocks 4-7 still in the ring, then the discard over it.
        v.write_blocks(4, &fill(2, 4), false).expect("write");
        v.unmap(2, 8).expect("unmap");
        let check = |v: &CachedVolume, at: &str| {
            for k in 0..16u64 {
                let b = block(v, k);
                if (2..10).contains(&k) && k != 6 {
                    assert!(b.iter().all(|&x| x == 0), "{at}: lba {k} reads zeros");
                } else if k == 6 {
                    assert_eq!(b, fill(3, 1), "{at}: the write after the discard wins");
                } else {
                    assert_eq!(b, old[k as usize * 512..][..512], "{at}: lba {k}");
                }
            }
            assert_eq!(
                runs(v, 0),
                vec![(M, 2), (D, 4), (M, 1), (D, 3), (M, 6), (D, BLOCKS - 16)],
                "{at}"
            );
        };
        // Reads see the discard at once, while the mirrors still hold the old data.
        assert!(block(&v, 4).iter().all(|&x| x == 0));
        let mut raw = vec![0u8; 512];
        set.read(4, &mut raw).expect("mirror");
        assert_eq!(raw, old[4 * 512..5 * 512], "not destaged yet");
        v.write_blocks(6, &fill(3, 1), false).expect("write");
        check(&v, "in the ring");
        cache.destage_committed().expect("destage");
        assert_eq!(cache.stats().dirty_bytes, 0);
        check(&v, "destaged");
        let crcs = set.checksums(0, 16).expect("crcs");
        for (k, c) in crcs.iter().enumerate() {
            assert_eq!(
                *c == DEALLOCATED,
                (2..10).contains(&k) && k != 6,
                "lba {k} on the mirrors"
            );
        }
        assert_eq!(set.scrub().expect("scrub").mismatches, 0);
        // A discard of the whole volume over a few cached writes (the index is smaller
        // than the range, so it is walked instead).
        v.write_blocks(100, &fill(4, 2), false).expect("write");
        v.unmap(0, BLOCKS).expect("unmap everything");
        assert!(block(&v, 100).iter().all(|&x| x == 0));
        assert_eq!(runs(&v, 0), vec![(D, BLOCKS)]);
        cache.destage_committed().expect("destage");
        assert_eq!(runs(&v, 0), vec![(D, BLOCKS)]);
        assert!(block(&v, 0).iter().all(|&x| x == 0));
        assert!(matches!(
            v.unmap(BLOCKS - 1, 2),
            Err(MediaError::OutOfRange { .. })
        ));
    }

    #[test]
    fn lba_status_extents_span_the_checksum_chunks() {
        let fs = SimFs::new(3);
        let (cache, _set, v) = media_of(&fs, true, 5000);
        v.write_blocks(3000, &fill(1, 1), false).expect("write");
        let status = |v: &CachedVolume| {
            let mut out = Vec::new();
            let mut lba = 0;
            while lba < 5000 {
                let (s, n) = v.provisioning(lba, 5000 - lba).expect("status");
                out.push((s, n));
                lba += n;
            }
            out
        };
        let want = vec![(D, 3000), (M, 1), (D, 1999)];
        assert_eq!(status(&v), want, "in the ring");
        cache.destage_committed().expect("destage");
        assert_eq!(status(&v), want, "on the mirrors");
        assert_eq!(
            v.provisioning(10, 20).expect("status"),
            (D, 20),
            "at most max"
        );
    }

    #[test]
    fn a_committed_discard_is_replayed_after_a_power_cut() {
        let fs = SimFs::new(7);
        let (cache, _set, v) = media(&fs, true);
        let old = fill(5, 32);
        v.write_blocks(0, &old, false).expect("write");
        cache.destage_committed().expect("destage");
        // Acknowledged (committed) but not destaged when the power goes.
        v.unmap(8, 16).expect("unmap");
        v.write_blocks(10, &fill(6, 1), false).expect("write");
        let snap = fs.snapshot();
        drop(v);
        drop(cache);
        let fs = SimFs::from_snapshot(8, snap);
        let (cache, set, v) = media(&fs, false);
        assert_eq!(
            cache.stats().recovered_records,
            2,
            "the discard and the write"
        );
        for k in 0..32u64 {
            let b = block(&v, k);
            if k == 10 {
                assert_eq!(b, fill(6, 1), "the write after the discard");
            } else if (8..24).contains(&k) {
                assert!(b.iter().all(|&x| x == 0), "lba {k} stays unmapped");
            } else {
                assert_eq!(b, old[k as usize * 512..][..512], "lba {k}");
            }
        }
        assert_eq!(
            runs(&v, 0),
            vec![(M, 8), (D, 2), (M, 1), (D, 13), (M, 8), (D, BLOCKS - 32)]
        );
        assert_eq!(set.scrub().expect("scrub").mismatches, 0);
    }

    #[test]
    fn a_record_of_an_unknown_kind_stops_recovery() {
        let fs = SimFs::new(9);
        let (cache, _set, v) = media(&fs, true);
        v.unmap(0, 4).expect("unmap");
        // The same record as a newer build's kind 9, crc and all.
        let pos = lock(&cache.inner)
            .queue
            .back()
            .map(|p| p.pos)
            .expect("queued");
        let seq = cache.appended_seq();
        let hdr = cache.header(9, seq, 0, 0, &4u64.to_le_bytes());
        cache.put(cache.phys(pos), &hdr).expect("put");
        cache.map.flush_range(0, cache.map.size()).expect("flush");
        let snap = fs.snapshot();
        drop(v);
        drop(cache);
        let fs = SimFs::from_snapshot(10, snap);
        let e = WriteCache::open_region_without_destage(
            Box::new(fs.file("wc")),
            false,
            "wc",
            HashMap::from([(
                0u32,
                Arc::new(
                    MirrorSet::open_disks(
                        ["a", "b"]
                            .iter()
                            .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
                            .collect(),
                        BLOCKS,
                        512,
                    )
                    .expect("mirrors"),
                ),
            )]),
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains("unknown kind 9"), "{e}");
    }
}

#[cfg(test)]
mod volatile_tests {
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
}

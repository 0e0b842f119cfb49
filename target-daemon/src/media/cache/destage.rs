//! Destage: committed records copied to their volume's mirrors in the background, the
//! mirrors synced, then the tail moved past them in a new superblock.

use super::destage_plan::{self, Extent};
use super::*;

/// Whether destage should run now, with `dirty` of the `ring`'s bytes in `records`
/// records waiting, `waited` since the last batch ended and `quiet` since the last
/// append: at once when the ring is half full, [`DESTAGE_RECORDS_DUE`] records wait or a
/// drain waits; otherwise only after a quiet moment or [`DESTAGE_AGE_MAX`]. While
/// writers keep appending, the ring takes them up to half its size before destage's
/// mirror writes and syncs compete with their commits on the device: that is the burst a
/// nonvolatile cache is for (docs/bench/diary.md).
fn destage_due(
    dirty: u64,
    records: usize,
    ring: u64,
    waited: Duration,
    quiet: Duration,
    draining: bool,
) -> bool {
    dirty * DESTAGE_DUE_DIV >= ring
        || records >= DESTAGE_RECORDS_DUE
        || draining
        || waited >= DESTAGE_AGE_MAX
        || quiet >= DESTAGE_QUIET
}

/// How many records from the front of `queue` the next batch takes: committed ones only
/// (sequence up to `durable`), at most [`DESTAGE_BATCH_RECORDS_MAX`], and no more than
/// `cap` bytes of ring unless the first record alone is larger.
fn batch_len(queue: &VecDeque<Pending>, durable: u64, cap: u64) -> usize {
    let Some(first) = queue.front() else {
        return 0;
    };
    queue
        .iter()
        .take_while(|p| p.seq <= durable)
        .take(DESTAGE_BATCH_RECORDS_MAX)
        .enumerate()
        .take_while(|(i, p)| *i == 0 || p.end - first.pos <= cap)
        .count()
}

impl WriteCache {
    /// Destages every committed record now, in the calling thread (what the destage
    /// thread does in batches); for caches opened without that thread.
    pub fn destage_committed(&self) -> Result<(), MediaError> {
        let batch: Vec<Pending> = {
            let g = lock(&self.inner)?;
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

    pub(super) fn destage_loop(self: Arc<Self>) {
        let mut last_report = Instant::now();
        let mut last_records = 0;
        while !self.stop.load(Ordering::Relaxed) {
            if last_report.elapsed() >= Duration::from_secs(5) {
                let s = self.stats();
                if s.records != last_records {
                    let us = s.commit_flush_us / s.commit_flushes.max(1);
                    info!(
                        records = s.records,
                        commits = s.commit_flushes,
                        commit_us_avg = us,
                        dirty_bytes = s.dirty_bytes,
                        "write cache"
                    );
                    last_records = s.records;
                }
                last_report = Instant::now();
            }
            let batch: Vec<Pending> = {
                // Every mirror sync is a device flush that the writers' commits queue
                // behind: destage goes at once only when the ring is half full or a
                // drain waits, and otherwise waits for a quiet moment or
                // DESTAGE_AGE_MAX.
                let Ok(mut g) = lock(&self.inner) else {
                    error!("write cache state lost to a panic: destage stops");
                    return;
                };
                let started = Instant::now();
                let mut next_commit = started + DESTAGE_INTERVAL;
                let mut seen = g.appended_seq;
                let mut quiet_since = started;
                while !self.stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if g.appended_seq != seen {
                        seen = g.appended_seq;
                        quiet_since = now;
                    }
                    let pending = !g.queue.is_empty();
                    let due = destage_due(
                        g.head - g.tail,
                        g.queue.len(),
                        self.ring,
                        now - started,
                        now - quiet_since,
                        self.draining.load(Ordering::Relaxed) > 0,
                    );
                    let uncommitted = g.queue.front().is_some_and(|p| p.seq > g.durable_seq);
                    if pending && uncommitted && (due || now >= next_commit) {
                        // Volatile mode: no writer waited for a commit, so destage commits
                        // (only committed records may reach the mirrors and move the
                        // tail), and does so every DESTAGE_INTERVAL even while the records
                        // wait for destage: the longest a volatile write stays volatile.
                        let seq = g.appended_seq;
                        drop(g);
                        if let Err(e) = self.wait_commit(seq) {
                            error!("commit before destage failed: {e}");
                        }
                        next_commit = Instant::now() + DESTAGE_INTERVAL;
                        let Ok(ng) = lock(&self.inner) else {
                            error!("write cache state lost to a panic: destage stops");
                            return;
                        };
                        g = ng;
                        if !due {
                            continue;
                        }
                    }
                    if pending && due {
                        break;
                    }
                    if now >= next_commit {
                        // Nothing volatile was waiting at this tick: the next one counts
                        // from here, so a write arriving now still waits at most the
                        // interval and commits do not run at every wake-up.
                        next_commit = now + DESTAGE_INTERVAL;
                    }
                    let Ok((ng, _)) = self.cond.wait_timeout(g, Duration::from_millis(10)) else {
                        error!("write cache state lost to a panic: destage stops");
                        return;
                    };
                    g = ng;
                }
                let n = batch_len(&g.queue, g.durable_seq, self.ring / DESTAGE_BATCH_DIV);
                g.queue.iter().take(n).copied().collect()
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

    pub(super) fn destage(&self, batch: &[Pending]) -> Result<(), MediaError> {
        // Coalesce: the newest copy of each block wins, and contiguous blocks go to the
        // mirrors as one write. Sequential and rewritten workloads then cost a few large
        // pwrites per batch instead of two per block per mirror (see `destage_plan`).
        let extents: Vec<Extent> = batch
            .iter()
            .filter_map(|p| {
                // Wrap markers and records of volumes no longer configured write nothing.
                let bs = u64::from(self.volumes.get(&p.volume)?.block_size());
                match p.op {
                    Op::Blocks { len } => Some(Extent {
                        volume: p.volume,
                        lba: p.lba,
                        blocks: u64::from(len) / bs,
                        data: Some(p.pos + HDR_LEN),
                    }),
                    Op::Discard { blocks } => Some(Extent {
                        volume: p.volume,
                        lba: p.lba,
                        blocks,
                        data: None,
                    }),
                    Op::Wrap | Op::Jump { .. } => None,
                }
            })
            .collect();
        let plan = destage_plan::plan(&extents, |v| self.block_size_of(v));
        let mut touched = Vec::new();
        for &(v, lba, blocks) in &plan.discards {
            if let Some(m) = self.volumes.get(&v) {
                m.deallocate(lba, blocks)?;
                if !touched.contains(&v) {
                    touched.push(v);
                }
            }
        }
        // One mirror write per run of contiguous blocks, at most DESTAGE_RUN_MAX bytes.
        let mut run: Vec<u8> = Vec::new();
        let mut run_at: Option<(u32, u64)> = None;
        let mut write_run = |run: &mut Vec<u8>, at: Option<(u32, u64)>| -> Result<(), MediaError> {
            if let Some((v, first)) = at {
                if let Some(m) = self.volumes.get(&v) {
                    m.write(first, run)?;
                    self.destaged.fetch_add(run.len() as u64, Ordering::Relaxed);
                    if !touched.contains(&v) {
                        touched.push(v);
                    }
                }
            }
            run.clear();
            Ok(())
        };
        for piece in &plan.pieces {
            let bs = self.block_size_of(piece.volume);
            let (mut lba, mut data, mut left) = (piece.lba, piece.data, piece.blocks);
            while left > 0 {
                let continues = run_at.is_some_and(|(v, first)| {
                    v == piece.volume && first + run.len() as u64 / bs == lba
                });
                if !continues || run.len() as u64 + bs > DESTAGE_RUN_MAX as u64 {
                    write_run(&mut run, run_at.take())?;
                    run_at = Some((piece.volume, lba));
                }
                let room = (DESTAGE_RUN_MAX as u64 - run.len() as u64) / bs;
                let n = left.min(room.max(1));
                let at = run.len();
                run.resize(at + (n * bs) as usize, 0);
                // A record's data is contiguous in the ring (a record never wraps).
                self.get(self.phys(data), &mut run[at..]);
                lba += n;
                data += n * bs;
                left -= n;
            }
        }
        write_run(&mut run, run_at.take())?;
        for v in touched {
            if let Some(m) = self.volumes.get(&v) {
                m.sync()?;
            }
        }
        let last = batch.last().map_or(0, |b| b.seq);
        let (new_tail, tail_seq, sb_seq) = {
            let g = lock(&self.inner)?;
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
        let mut g = lock(&self.inner)?;
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
                let Op::Blocks { len } = p.op else {
                    continue;
                };
                let bs = self.block_size_of(p.volume);
                // Blocks a newer record holds keep that record's entries.
                g.index
                    .release(p.volume, p.lba, u64::from(len) / bs, p.pos..p.end);
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

    /// Waits until everything appended has been destaged (for tests and shutdown).
    pub fn drain(&self, timeout: Duration) -> bool {
        /// Counts this caller in [`WriteCache::draining`] while it waits, so destage goes
        /// at once instead of waiting for a quiet moment or the age limit.
        struct Draining<'a>(&'a AtomicU64);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.draining.fetch_add(1, Ordering::Relaxed);
        let _draining = Draining(&self.draining);
        self.cond.notify_all();
        let seq = self.appended_seq();
        if self.wait_commit(seq).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let Ok(mut g) = lock(&self.inner) else {
            return false;
        };
        while !g.queue.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let ng = self.cond.wait_timeout(g, deadline - now).map(|(g, _)| g);
            let Ok(ng) = ng else {
                return false;
            };
            g = ng;
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

#[cfg(test)]
mod due_tests {
    use super::*;

    const RING: u64 = 256 << 20;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn while_appends_keep_coming_destage_waits_for_half_full_the_age_limit_or_quiet() {
        let under_half = RING / DESTAGE_DUE_DIV - 1;
        // Appends keep coming and the ring is under half full: the burst is the ring's,
        // however long since the last batch, short of the age limit.
        for waited in [MS(0), MS(100), DESTAGE_AGE_MAX - MS(1)] {
            assert!(!destage_due(under_half, 100, RING, waited, MS(19), false));
        }
        assert!(!destage_due(1, 1, RING, MS(500), MS(5), false));
        // A quiet moment, or the age limit, starts it for any amount.
        assert!(destage_due(1, 1, RING, MS(30), DESTAGE_QUIET, false));
        assert!(destage_due(1, 1, RING, DESTAGE_AGE_MAX, MS(0), false));
    }

    #[test]
    fn many_small_records_go_at_once_however_few_bytes() {
        // 64-byte packets: their index and queue entries cost memory, the bytes do not.
        let few_bytes = (DESTAGE_RECORDS_DUE as u64) * 128;
        assert!(destage_due(
            few_bytes,
            DESTAGE_RECORDS_DUE,
            RING,
            MS(0),
            MS(0),
            false
        ));
        assert!(!destage_due(
            few_bytes,
            DESTAGE_RECORDS_DUE - 1,
            RING,
            MS(0),
            MS(0),
            false
        ));
    }

    #[test]
    fn a_half_full_ring_or_a_drain_goes_at_once() {
        assert!(destage_due(
            RING / DESTAGE_DUE_DIV,
            100,
            RING,
            MS(0),
            MS(0),
            false
        ));
        assert!(destage_due(RING, 100, RING, MS(0), MS(0), false));
        assert!(destage_due(1, 1, RING, MS(0), MS(0), true));
    }

    /// Records of `len` bytes each, back to back from log position `at`, numbered from 1.
    fn records(at: u64, lens: &[u64]) -> VecDeque<Pending> {
        let mut pos = at;
        lens.iter()
            .zip(1..)
            .map(|(&len, seq)| {
                let p = Pending {
                    seq,
                    pos,
                    end: pos + len,
                    volume: 0,
                    lba: 0,
                    op: Op::Blocks { len: 0 },
                };
                pos += len;
                p
            })
            .collect()
    }

    #[test]
    fn a_batch_is_committed_records_within_the_byte_cap() {
        let q = records(RING * 3 + 4096, &[4160; 100]);
        // The cap counts ring bytes from the first record's start, wherever the log is.
        assert_eq!(batch_len(&q, 100, 4160 * 10), 10);
        assert_eq!(batch_len(&q, 100, 4160 * 10 - 1), 9);
        // Uncommitted records never go, whatever the cap.
        assert_eq!(batch_len(&q, 7, u64::MAX), 7);
        assert_eq!(batch_len(&q, 0, u64::MAX), 0);
        // A first record larger than the cap still goes, alone: destage must progress.
        let big = records(0, &[1 << 20, 4160]);
        assert_eq!(batch_len(&big, 2, 4096), 1);
        assert_eq!(batch_len(&VecDeque::new(), 5, 4096), 0);
    }

    #[test]
    fn a_batch_takes_at_most_the_record_limit() {
        let n = DESTAGE_BATCH_RECORDS_MAX + 5;
        let q = records(0, &vec![64; n]);
        assert_eq!(batch_len(&q, n as u64, u64::MAX), DESTAGE_BATCH_RECORDS_MAX);
    }
}

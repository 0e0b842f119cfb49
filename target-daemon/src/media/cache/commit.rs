//! The write path: records appended to the ring under the state lock, then committed in
//! groups (one flush covers every record appended before it), and the deferral of a
//! command's commit waits to the async side.

use super::*;
use crate::media::inline;

/// Commits a command waits for: the newest record it appended, per cache.
type Waits = Vec<(Arc<WriteCache>, u64)>;

thread_local! {
    /// Set by [`defer_commits`] for the command running on this thread: the records it
    /// must see committed before it may be acknowledged, newest per cache.
    static DEFERRED: std::cell::RefCell<Option<Waits>> =
        const { std::cell::RefCell::new(None) };
}

/// Commits that a command's writes still need before it may be acknowledged.
#[derive(Default)]
pub struct PendingCommits(pub(super) Waits);

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
pub(super) fn defer(cache: &Arc<WriteCache>, seq: u64) -> bool {
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        // Already durable (a SYNCHRONIZE CACHE after committed writes, the common case on
        // a nonvolatile LUN): nothing to wait for, so the command completes at once.
        Some(_) if *cache.durable_tx.borrow() >= seq => true,
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

impl WriteCache {
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

    /// Appends one record of kind `op` with `payload`, waiting for ring space.
    pub(super) fn append_record(
        &self,
        volume: u32,
        lba: u64,
        op: Op,
        data: &[u8],
    ) -> Result<u64, MediaError> {
        self.append_fault()?;
        let len = align(HDR_LEN + data.len() as u64);
        if len > self.ring / 2 {
            return Err(MediaError::Failed(
                "write larger than half the write cache".into(),
            ));
        }
        let bs = self.block_size_of(volume);
        // The index, destage and recovery all count a record's payload in whole blocks: a
        // partial last block would be indexed but never destaged.
        if matches!(op, Op::Blocks { .. }) && !(data.len() as u64).is_multiple_of(bs) {
            return Err(MediaError::Failed(format!(
                "a write of {} bytes is not a whole number of {bs}-byte blocks",
                data.len()
            )));
        }
        let started = Instant::now();
        let deadline = started + SPACE_WAIT;
        let mut waited = false;
        let mut g = lock(&self.inner)?;
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
            // Only a destage thread frees space while a writer waits. Without one (the
            // deterministic simulations, which destage between steps) a full ring is
            // full at once: waiting would only stall the one thread that could destage.
            // Asked only here, so the common append takes no extra lock.
            let no_destage = || lock_plain(&self.destage_thread).is_none();
            if now >= deadline
                || self.stop.load(Ordering::Relaxed)
                || inline::refuse()
                || no_destage()
            {
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
                .map_err(poisoned)?;
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
            Op::Jump { .. } => KIND_JUMP,
            _ => KIND_BLOCKS,
        };
        let hdr = self.header(kind, seq, volume, lba, data);
        // Head moves only once both parts are in: a failed store leaves no record, and the
        // next append overwrites what it left.
        self.map
            .put_parts(self.phys(pos) as usize, &[&hdr, data])
            .map_err(MediaError::Io)?;
        // A jump's queue entry stands for every number it skips (see `Op::Jump`).
        let last = match op {
            Op::Jump { to } => to - 1,
            _ => seq,
        };
        g.next_seq = last + 1;
        g.head = pos + len;
        g.appended_seq = last;
        match op {
            Op::Discard { blocks } => {
                g.index.remove(volume, lba, blocks, bs);
                g.discards.push_back(Discard {
                    seq,
                    volume,
                    lba,
                    blocks,
                });
            }
            Op::Jump { .. } | Op::Wrap => {}
            Op::Blocks { .. } => {
                g.index
                    .insert(volume, lba, data.len() as u64 / bs, pos + HDR_LEN, bs);
            }
        }
        g.queue.push_back(Pending {
            seq: last,
            pos,
            end: pos + len,
            volume,
            lba,
            op,
        });
        drop(g);
        self.records.fetch_add(1, Ordering::Relaxed);
        Ok(last)
    }

    /// Fault injection for tests: after `after` more successful appends, the next
    /// `count` appends fail with EIO and store nothing, as a failed store into the map
    /// would.
    pub fn inject_append_failures(&self, after: u64, count: u64) {
        *lock_plain(&self.fault_append) = (after, count);
        self.fault_armed.store(count > 0, Ordering::Relaxed);
    }

    /// Fault injection for tests: the next commit flush fails with EIO, as a failed
    /// commit write or msync does (the cache then refuses every later commit).
    pub fn inject_commit_failure(&self) {
        self.fault_flush.store(true, Ordering::Relaxed);
    }

    pub(super) fn append_fault(&self) -> Result<(), MediaError> {
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

    /// Claims the next commit flush if record `seq` needs one and a flush may start: it
    /// covers everything appended so far (group commit). Up to `FLUSHES_MAX` run at once.
    pub(super) fn claim(&self, g: &mut Inner, seq: u64) -> Option<Flight> {
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
    pub(super) fn fly(&self, f: Flight) -> Result<(), MediaError> {
        let t0 = Instant::now();
        let r = self.flush(f.from, f.to);
        let took = t0.elapsed();
        self.flush_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.commit_latency.observe(took);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let mut g = lock(&self.inner)?;
        if let Err(e) = r {
            // A failed commit leaves the cache's contents unknown: stop taking writes
            // rather than acknowledge what may not be stored. The flight stays unfinished,
            // so the frontier never passes it.
            error!("write cache commit failed: {e}");
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
    pub(super) fn fly_on(&self, mut f: Flight) {
        loop {
            if self.fly(f).is_err() {
                return;
            }
            let Ok(mut g) = lock(&self.inner) else {
                return;
            };
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
    pub(super) fn wait_commit(&self, seq: u64) -> Result<(), MediaError> {
        let mut g = lock(&self.inner)?;
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
                g = lock(&self.inner)?;
            } else {
                g = self.cond.wait(g).map_err(poisoned)?;
            }
        }
    }

    /// Waits until record `seq` is committed without holding a thread: the commands of a
    /// queue-deep initiator then cost one parked task each instead of one blocked thread
    /// each, and a finished flush wakes them with one notification instead of a
    /// condition-variable stampede. The commit itself runs on a blocking thread.
    pub async fn committed(self: &Arc<Self>, seq: u64) -> Result<(), MediaError> {
        let started = Instant::now();
        let mut rx = self.durable_tx.subscribe();
        loop {
            // Marked seen before the check, so a flush finishing after it wakes us.
            rx.borrow_and_update();
            {
                let mut g = lock(&self.inner)?;
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
}

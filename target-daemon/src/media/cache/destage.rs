//! Destage: committed records copied to their volume's mirrors in the background, the
//! mirrors synced, then the tail moved past them in a new superblock.

use super::*;

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
                let Ok(mut g) = lock(&self.inner) else {
                    error!("write cache state lost to a panic: destage stops");
                    return;
                };
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
                            let Ok(ng) = lock(&self.inner) else {
                                error!("write cache state lost to a panic: destage stops");
                                return;
                            };
                            g = ng;
                        }
                        break;
                    }
                    let Ok((ng, _)) = self.cond.wait_timeout(g, Duration::from_millis(10)) else {
                        error!("write cache state lost to a panic: destage stops");
                        return;
                    };
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

    pub(super) fn destage(&self, batch: &[Pending]) -> Result<(), MediaError> {
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
                Op::Wrap | Op::Jump { .. } => {}
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

    /// Waits until everything appended has been destaged (for tests and shutdown).
    pub fn drain(&self, timeout: Duration) -> bool {
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

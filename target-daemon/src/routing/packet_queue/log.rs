//! The log itself: recovery at open, appending packet and ACK records through the write
//! cache in log order, making room by moving the tail past acknowledged records, and
//! retention.

use super::*;

impl PacketQueue {
    pub(super) fn recover(&self) -> Result<(), QueueError> {
        let started = Instant::now();
        let mut sb = vec![0u8; self.bs as usize];
        self.cache.read(self.volume, 0, &mut sb)?;
        let (tail, tail_seq) = if sb.iter().all(|&b| b == 0) {
            (0, 1)
        } else {
            if &sb[..8] != SB_MAGIC || crc32c::crc32c(&sb[..36]) != le32(&sb, 36) {
                return Err(QueueError::Corrupt(
                    "superblock is not a packet queue's (or is damaged)".into(),
                ));
            }
            if le64(&sb, 28) != self.cap {
                return Err(QueueError::Corrupt(format!(
                    "queue was made for {} bytes, the configuration gives {}",
                    le64(&sb, 28),
                    self.cap
                )));
            }
            (le64(&sb, 12), le64(&sb, 20))
        };
        let mut g = lock(&self.inner)?;
        g.tail = tail;
        g.tail_seq = tail_seq;
        let (mut pos, mut seq) = (tail, tail_seq);
        let mut packets = 0u64;
        while pos - tail < self.cap {
            let Some((h, body)) = self.record(pos, Some(seq))? else {
                break;
            };
            match h.kind {
                KIND_PAD => pos = pos.div_ceil(self.cap) * self.cap,
                KIND_PACKET => {
                    let p = parse_packet(seq, &body)
                        .ok_or_else(|| QueueError::Corrupt(format!("packet {seq} malformed")))?;
                    self.index_packet(&mut g, &p, p.payload.len(), pos);
                    packets += 1;
                    pos += self.rec_len(h.body_len);
                }
                KIND_ACK => {
                    let (node, upto, list) = parse_ack(&body)
                        .ok_or_else(|| QueueError::Corrupt(format!("ack {seq} malformed")))?;
                    Self::apply_ack(&mut g, node, upto, &list);
                    pos += self.rec_len(h.body_len);
                }
                _ => break,
            }
            seq += 1;
        }
        g.head = pos;
        g.next_seq = seq;
        g.frontier = seq - 1;
        for n in g.nodes.values_mut() {
            n.delivered = n.acked_upto;
        }
        let spilled: Vec<NodeAddr> = g
            .nodes
            .iter()
            .filter(|(_, n)| n.spill.is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in spilled {
            self.refill(&mut g, k)?;
        }
        info!(
            packets,
            live_bytes = pos - tail,
            ms = started.elapsed().as_millis() as u64,
            "packet queue recovered"
        );
        Ok(())
    }

    /// Makes room for `need` bytes (plus a lap's padding) by moving the tail past records
    /// that are acknowledged (and past their retention, unless room is short). Appends a
    /// superblock when the tail moved, before anything reuses the space.
    ///
    /// Once room is not short, it stops after [`RELEASE_CHUNK`] records and says so
    /// (`Ok(true)`): each record is read to be judged, under the queue's lock, and a
    /// drained backlog of 50,000 packets held every SEND and RECEIVE for 60 ms.
    pub(super) fn make_room(&self, g: &mut Inner, need: u64) -> Result<bool, QueueError> {
        let now = self.clock.now_ms();
        let retain_ms = self.retain.as_millis() as u64;
        let (tail0, tail_seq0) = (g.tail, g.tail_seq);
        let mut released: Vec<u64> = Vec::new();
        let mut moved = false;
        let mut more = false;
        let mut walked = 0usize;
        loop {
            let used = g.head - g.tail;
            let short = self.cap - used < need;
            if g.tail == g.head {
                break;
            }
            if !short && walked >= RELEASE_CHUNK {
                more = true;
                break;
            }
            walked += 1;
            let Some((h, body)) = self.record(g.tail, Some(g.tail_seq))? else {
                return Err(QueueError::Corrupt(format!(
                    "record {} at the tail is unreadable",
                    g.tail_seq
                )));
            };
            let len = match h.kind {
                KIND_PAD => g.tail.div_ceil(self.cap) * self.cap - g.tail,
                KIND_ACK => self.rec_len(h.body_len),
                _ => {
                    let p = parse_packet(h.seq, &body).ok_or_else(|| {
                        QueueError::Corrupt(format!("packet {} malformed", h.seq))
                    })?;
                    let acked = g.nodes.get(&p.node).is_none_or(|n| n.is_acked(p.seq));
                    let expired = now.saturating_sub(p.ts_ms) >= retain_ms;
                    if !acked || !(short || expired) {
                        break;
                    }
                    released.push(p.seq);
                    self.rec_len(h.body_len)
                }
            };
            g.tail += len;
            g.tail_seq += 1;
            moved = true;
        }
        if moved {
            // Until the superblock that releases them is in the cache, the released
            // records must stay untouched: a crash would recover from the old tail.
            if let Err(e) = self.append_superblock(g) {
                g.tail = tail0;
                g.tail_seq = tail_seq0;
                return Err(e);
            }
            // A sender that lost the SEND's answer may still be failing over to send
            // it again: the ids stay retries for `dedup_hold` after the release.
            for seq in released {
                g.dedup.note_released(seq, now);
            }
        }
        let hold_ms = u64::try_from(self.dedup_hold.as_millis()).unwrap_or(u64::MAX);
        // Bounded by the window as the entries themselves are, not only by time.
        g.dedup.expire(now, hold_ms);
        if self.cap - (g.head - g.tail) < need {
            return Err(QueueError::Full);
        }
        Ok(more)
    }

    pub(super) fn append_superblock(&self, g: &Inner) -> Result<u64, QueueError> {
        let mut b = vec![0u8; self.bs as usize];
        b[..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&u32::from(VERSION).to_le_bytes());
        b[12..20].copy_from_slice(&g.tail.to_le_bytes());
        b[20..28].copy_from_slice(&g.tail_seq.to_le_bytes());
        b[28..36].copy_from_slice(&self.cap.to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        Ok(self.cache.append(self.volume, 0, &b)?)
    }

    /// Appends encoded records at the head (under the lock), padding the lap when a
    /// record does not fit before the volume end. Returns the cache sequence of the last
    /// append, each appended record's (sequence number, position), and the error that
    /// stopped it, if one did.
    ///
    /// Head and sequence numbers move only past what the cache took: every append is
    /// all or nothing, so a failure leaves the records before it in the log and the head
    /// right after them. Advancing past a failed append would leave a hole that recovery
    /// stops at, losing every record after it.
    pub(super) fn append_records(
        &self,
        g: &mut Inner,
        recs: &[(u16, Vec<u8>)],
    ) -> (u64, Vec<(u64, u64)>, Option<QueueError>) {
        let run_max = APPEND_MAX.min(self.cache.append_max());
        let mut cache_seq = 0;
        let mut placed: Vec<(u64, u64)> = Vec::with_capacity(recs.len());
        let mut run: Vec<u8> = Vec::new();
        // Where the records of `run` start, and the first of them in `placed`.
        let mut run_pos = g.head;
        let mut run_first = 0;
        let flush = |g: &mut Inner,
                     run: &mut Vec<u8>,
                     run_pos: u64,
                     run_first: usize,
                     placed: &mut Vec<(u64, u64)>|
         -> Result<u64, QueueError> {
            match self.cache.append(self.volume, self.lba(run_pos), run) {
                Ok(seq) => {
                    run.clear();
                    Ok(seq)
                }
                Err(e) => {
                    if let Some(&(seq, pos)) = placed.get(run_first) {
                        g.head = pos;
                        g.next_seq = seq;
                    }
                    placed.truncate(run_first);
                    run.clear();
                    Err(e.into())
                }
            }
        };
        for (kind, body) in recs {
            let len = self.rec_len(body.len());
            let room = self.cap - g.head % self.cap;
            if len > room || (g.head.is_multiple_of(self.cap) && !run.is_empty()) {
                // A run never crosses the volume end.
                if !run.is_empty() {
                    match flush(g, &mut run, run_pos, run_first, &mut placed) {
                        Ok(s) => cache_seq = s,
                        Err(e) => return (cache_seq, placed, Some(e)),
                    }
                }
                if len > room {
                    let pad = encode_record(KIND_PAD, g.next_seq, &[], self.bs);
                    match self.cache.append(self.volume, self.lba(g.head), &pad) {
                        Ok(s) => cache_seq = s,
                        Err(e) => return (cache_seq, placed, Some(e.into())),
                    }
                    g.next_seq += 1;
                    g.head += room;
                }
                run_pos = g.head;
                run_first = placed.len();
            }
            let r = encode_record(*kind, g.next_seq, body, self.bs);
            if run.len() + r.len() > run_max && !run.is_empty() {
                match flush(g, &mut run, run_pos, run_first, &mut placed) {
                    Ok(s) => cache_seq = s,
                    Err(e) => return (cache_seq, placed, Some(e)),
                }
                run_pos = g.head;
                run_first = placed.len();
            }
            // Checked in release builds too: a record over the tail or across the lap end
            // would be read back as garbage or not at all after a crash.
            assert!(
                g.head % self.cap + len <= self.cap,
                "record at {} of {len} bytes crosses the volume end (cap {})",
                g.head,
                self.cap
            );
            assert!(
                g.head + len - g.tail <= self.cap,
                "log overrun: tail {} head {} len {len} cap {}",
                g.tail,
                g.head,
                self.cap
            );
            placed.push((g.next_seq, g.head));
            g.next_seq += 1;
            run.extend_from_slice(&r);
            g.head += len;
        }
        if !run.is_empty() {
            match flush(g, &mut run, run_pos, run_first, &mut placed) {
                Ok(s) => cache_seq = s,
                Err(e) => return (cache_seq, placed, Some(e)),
            }
        }
        (cache_seq, placed, None)
    }

    /// Space a batch of packet bodies needs: the records, plus the padding a lap end can
    /// cost (less than the longest record).
    pub(super) fn need(&self, bodies: &[Vec<u8>]) -> u64 {
        let lens = bodies.iter().map(|b| self.rec_len(b.len()));
        lens.clone().sum::<u64>() + lens.max().unwrap_or(0)
    }

    /// Stores packets durably and says what became of each ([`StoreResult`]).
    ///
    /// A packet whose (sender, packet id) is still stored is a retry and is not stored
    /// twice (checked under the same lock that stores, so a retry racing its original on
    /// another path is caught too); it is answered only once its original is durable.
    /// Packets to a node at its quota are not stored; the copies of one broadcast (same
    /// sender and id, [`flags::BROADCAST`]) are stored all or none. Nothing is stored
    /// when the log is full ([`QueueError::Full`]). On a media error, packets appended
    /// before it stay stored (their senders' retries find them) and nothing after it is.
    pub fn store(&self, packets: &[NewPacket]) -> Result<Vec<StoreResult>, QueueError> {
        if packets.is_empty() {
            return Ok(Vec::new());
        }
        let ts = self.clock.now_ms();
        let (cache_seq, results, last) = {
            let mut g = lock(&self.inner)?;
            let results = self.admit(&g, packets);
            let bodies: Vec<Vec<u8>> = packets
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_none())
                .map(|(p, _)| packet_body(p, ts))
                .collect();
            // Packets leave ACK_RESERVE free, so acknowledgements (which free space)
            // always fit.
            let need = self.need(&bodies) + ACK_RESERVE;
            if !bodies.is_empty() && self.cap - (g.head - g.tail) < need {
                self.make_room(&mut g, need)?;
            }
            let recs: Vec<(u16, Vec<u8>)> = bodies.into_iter().map(|b| (KIND_PACKET, b)).collect();
            let (cache_seq, placed, failed) = if recs.is_empty() {
                (self.cache.appended_seq(), Vec::new(), None)
            } else {
                self.append_records(&mut g, &recs)
            };
            let mut placed_it = placed.iter();
            let mut out = Vec::with_capacity(packets.len());
            for (p, r) in packets.iter().zip(results) {
                if let Some(r) = r {
                    out.push(r);
                    continue;
                }
                let Some(&(seq, pos)) = placed_it.next() else {
                    // Not appended: a media error stopped the batch; returned below.
                    continue;
                };
                let stored = Packet {
                    seq,
                    node: p.node,
                    dest: p.dest,
                    source: p.source,
                    sender: p.sender,
                    packet_id: p.packet_id,
                    ts_ms: ts,
                    flags: p.flags,
                    payload: Vec::new(),
                };
                self.index_packet(&mut g, &stored, p.payload.len(), pos);
                out.push(StoreResult::Stored(seq));
            }
            if let Some(e) = failed {
                return Err(e);
            }
            // A duplicate's original may still be on its way to the disk: then wait for
            // everything appended so far, which includes it.
            let frontier = g.frontier;
            let wait_all = out
                .iter()
                .any(|r| matches!(r, StoreResult::Duplicate(s, _) if *s > frontier));
            if wait_all {
                (self.cache.appended_seq(), out, g.next_seq - 1)
            } else {
                (cache_seq, out, placed.last().map_or(0, |x| x.0))
            }
        };
        self.cache.wait_durable(cache_seq)?;
        if last > 0 {
            self.advance_frontier(last)?;
            self.wake_stored(packets);
        }
        Ok(results)
    }

    /// Every record up to `seq` is durable: deliverable from now on.
    pub(super) fn advance_frontier(&self, seq: u64) -> Result<(), QueueError> {
        let mut g = lock(&self.inner)?;
        // Appends are in log order, so a commit covers every earlier record too.
        g.frontier = g.frontier.max(seq);
        Ok(())
    }

    /// Returns once stored packet `seq` is durable, or the error that keeps it from ever
    /// becoming so (the write cache refuses every commit after a failed one). A retry
    /// is answered with its original's outcome only after this.
    pub fn wait_stored(&self, seq: u64) -> Result<(), QueueError> {
        let (cache_seq, upto) = {
            let g = lock(&self.inner)?;
            if g.frontier >= seq {
                return Ok(());
            }
            // Every record before next_seq is in the cache by now (appends happen under
            // this lock), so this commit covers `seq`.
            (self.cache.appended_seq(), g.next_seq - 1)
        };
        self.cache.wait_durable(cache_seq)?;
        self.advance_frontier(upto)?;
        Ok(())
    }

    /// Acknowledges packets of `node`, durably.
    pub fn ack(&self, node: NodeAddr, upto: u64, list: &[u64]) -> Result<(), QueueError> {
        let cache_seq = {
            let mut g = lock(&self.inner)?;
            // Applied first, so the tail may pass what this acknowledges and make room
            // for the ACK record itself. Safe before the record is durable: a crash
            // before it only redelivers packets the destination has (at least once),
            // and a superblock that released them is appended before the record.
            Self::apply_ack(&mut g, node, upto, list);
            let body = ack_body(node, upto, list);
            let need = 2 * self.rec_len(body.len());
            if self.cap - (g.head - g.tail) < need {
                // An ACK frees space; it must never be refused for lack of it.
                match self.make_room(&mut g, need) {
                    Ok(_) | Err(QueueError::Full) => {}
                    Err(e) => return Err(e),
                }
                if self.cap - (g.head - g.tail) < need {
                    return Err(QueueError::Full);
                }
            }
            let (cache_seq, _, failed) = self.append_records(&mut g, &[(KIND_ACK, body)]);
            if let Some(e) = failed {
                return Err(e);
            }
            cache_seq
        };
        self.cache.wait_durable(cache_seq)?;
        let mut g = lock(&self.inner)?;
        self.refill(&mut g, node)?;
        Ok(())
    }

    /// Moves the tail past expired, acknowledged packets (retention by age), a chunk at
    /// a time, letting go of the lock between chunks so senders and receivers go on.
    pub fn expire(&self) -> Result<(), QueueError> {
        loop {
            let more = {
                let mut g = lock(&self.inner)?;
                match self.make_room(&mut g, 0) {
                    Ok(more) => more,
                    Err(QueueError::Full) => false,
                    Err(e) => {
                        warn!("packet queue expiry: {e}");
                        return Err(e);
                    }
                }
            };
            if !more {
                return Ok(());
            }
            std::thread::yield_now();
        }
    }
}

//! Taking packets out: RECEIVE up to the durable frontier, giving back what was not sent,
//! and REPLAY from a sequence number or a time.

use super::*;

impl PacketQueue {
    /// Takes deliverable packets of `node` after its RECEIVE position: at most `max`
    /// records whose encoded sizes (`size_of`) fit `budget` bytes, and moves the position
    /// past them. Never waits (a long poll parks on [`Self::subscribe`]). Returns the
    /// packets and whether more are queued.
    ///
    /// The records are chosen under the queue's lock and read from the media outside it;
    /// one released meanwhile (another session of the node acknowledged it and its space
    /// was reused) is skipped.
    pub fn receive(
        &self,
        node: NodeAddr,
        max: usize,
        budget: usize,
        size_of: impl Fn(usize) -> usize,
    ) -> Result<(Vec<Packet>, bool), QueueError> {
        let max = max.max(1);
        let (picked, more) = {
            let mut g = lock(&self.inner)?;
            let frontier = g.frontier;
            let Some(n) = g.nodes.get_mut(&node) else {
                return Ok((Vec::new(), false));
            };
            let mut picked: Vec<Entry> = Vec::new();
            let (mut used, mut more) = (0usize, false);
            for e in n
                .pending
                .iter()
                .filter(|e| e.seq > n.delivered && e.seq <= frontier)
            {
                let sz = size_of(e.payload_len as usize);
                if picked.len() >= max || used.saturating_add(sz) > budget {
                    more = true;
                    break;
                }
                used += sz;
                picked.push(e.clone());
            }
            if let Some(last) = picked.last() {
                n.delivered = n.delivered.max(last.seq);
            }
            // Packets past the in-memory index wait in the log: they come once ACKs have
            // drained the index (a flow-control window of `index_max` unacknowledged
            // packets), and MORE tells the node to acknowledge and ask again.
            more |= n.spill.is_some();
            (picked, more)
        };
        let mut out = Vec::with_capacity(picked.len());
        for e in &picked {
            match self.read_released(node, e) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => {}
                Err(err) => {
                    // The command fails: what it would have returned is not skipped.
                    if let Some(first) = picked.first() {
                        self.undeliver(node, first.seq);
                    }
                    return Err(err);
                }
            }
        }
        Ok((out, more))
    }

    /// Reads a packet chosen for delivery: `None` when it was released since (it no
    /// longer verifies and is no longer pending), an error when it is pending and
    /// unreadable.
    pub(super) fn read_released(
        &self,
        node: NodeAddr,
        e: &Entry,
    ) -> Result<Option<Packet>, QueueError> {
        if let Some((h, body)) = self.record(e.pos, Some(e.seq))? {
            return parse_packet(h.seq, &body)
                .map(Some)
                .ok_or_else(|| QueueError::Corrupt(format!("packet {} malformed", e.seq)));
        }
        let g = lock(&self.inner)?;
        let pending = g
            .nodes
            .get(&node)
            .is_some_and(|n| n.pending.iter().any(|x| x.seq == e.seq));
        if pending {
            return Err(QueueError::Corrupt(format!(
                "packet {} unreadable at {}",
                e.seq, e.pos
            )));
        }
        Ok(None)
    }

    /// Puts `node`'s RECEIVE position back before `first_unsent`: a response carrying
    /// that record did not reach the initiator whole, so it and every later record are
    /// delivered again (at least once; never skipped).
    pub fn undeliver(&self, node: NodeAddr, first_unsent: u64) {
        let Ok(mut g) = lock(&self.inner) else {
            return;
        };
        if let Some(n) = g.nodes.get_mut(&node) {
            let back = first_unsent.saturating_sub(1).max(n.acked_upto);
            n.delivered = n.delivered.min(back);
        }
        drop(g);
        self.wake.notify([node]);
    }

    /// Puts a node's RECEIVE position back to its first unacknowledged packet (a new
    /// session of the node gets again what an old one may have lost).
    pub fn rewind(&self, node: NodeAddr) {
        let Ok(mut g) = lock(&self.inner) else {
            return;
        };
        if let Some(n) = g.nodes.get_mut(&node) {
            n.delivered = n.acked_upto;
        }
        drop(g);
        self.wake.notify([node]);
    }

    /// Stored packets of `node` (acknowledged ones too, while retained) with a sequence
    /// number >= `from_seq` and a timestamp >= `from_ms`, oldest first, up to `budget`.
    /// Starts from the sparse index's nearest mark rather than the tail.
    pub fn replay(
        &self,
        node: NodeAddr,
        from_seq: u64,
        from_ms: u64,
        max: usize,
        budget: usize,
        size_of: impl Fn(usize) -> usize,
    ) -> Result<(Vec<Packet>, bool), QueueError> {
        let (tail, tail_seq, head, frontier) = {
            let g = lock(&self.inner)?;
            (g.tail, g.tail_seq, g.head, g.frontier)
        };
        let scan = ReplayScan {
            node,
            from_seq,
            from_ms,
            max,
            budget,
            head,
            frontier,
        };
        let mark = self
            .sparse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start(from_seq, from_ms, tail_seq)
            .filter(|m| m.seq <= frontier && m.pos < head);
        if let Some(m) = mark {
            if let Some(found) = self.replay_from(&scan, m.pos, m.seq, &size_of)? {
                return Ok(found);
            }
        }
        // No mark, or it no longer verifies (the tail passed it): scan from the tail.
        let (tail, tail_seq) = if mark.is_some() {
            let g = lock(&self.inner)?;
            (g.tail, g.tail_seq)
        } else {
            (tail, tail_seq)
        };
        Ok(self
            .replay_from(&scan, tail, tail_seq, &size_of)?
            .unwrap_or_default())
    }

    /// Scans the log from the record (`pos`, `seq`) for [`Self::replay`]; `None` when
    /// that first record does not verify.
    pub(super) fn replay_from(
        &self,
        s: &ReplayScan,
        mut pos: u64,
        mut seq: u64,
        size_of: &impl Fn(usize) -> usize,
    ) -> Result<Option<(Vec<Packet>, bool)>, QueueError> {
        let (mut out, mut used, mut more) = (Vec::new(), 0usize, false);
        let mut first = true;
        while pos < s.head && seq <= s.frontier {
            // The tail may pass us while we read; a record that no longer verifies was
            // released, and the scan ends there.
            let Some((h, body)) = self.record(pos, Some(seq))? else {
                if first {
                    return Ok(None);
                }
                break;
            };
            first = false;
            if h.kind == KIND_PAD {
                pos = pos.div_ceil(self.cap) * self.cap;
                seq += 1;
                continue;
            }
            if h.kind == KIND_PACKET {
                if let Some(p) = parse_packet(h.seq, &body) {
                    if p.node == s.node && p.seq >= s.from_seq && p.ts_ms >= s.from_ms {
                        let sz = size_of(p.payload.len());
                        if out.len() >= s.max || used.saturating_add(sz) > s.budget {
                            more = true;
                            break;
                        }
                        used += sz;
                        out.push(p);
                    }
                }
            }
            pos += self.rec_len(h.body_len);
            seq += 1;
        }
        Ok(Some((out, more)))
    }
}

//! What the queue remembers in memory: each node's bounded index of unacknowledged
//! packets (refilled from the log as it drains), the sparse index REPLAY starts from, what
//! the duplicate index (`dedup.rs`) is told, and the per-node wake-ups of parked RECEIVEs.

use super::*;

/// Per-node wake-ups: a RECEIVE that found nothing subscribes before it looks, and is
/// woken when records of its node become deliverable (or its position moves back).
/// Per node, so a store re-runs only the polls of the nodes it stored for.
#[derive(Default)]
pub(super) struct Wake(Mutex<HashMap<NodeAddr, tokio::sync::watch::Sender<()>>>);

impl Wake {
    pub(super) fn subscribe(&self, node: NodeAddr) -> tokio::sync::watch::Receiver<()> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(node)
            .or_insert_with(|| tokio::sync::watch::channel(()).0)
            .subscribe()
    }

    pub(super) fn notify(&self, nodes: impl IntoIterator<Item = NodeAddr>) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for node in nodes {
            if let Some(tx) = m.get(&node) {
                if tx.receiver_count() == 0 {
                    // Nobody waits: forget the node rather than keep a sender per node
                    // that ever polled.
                    m.remove(&node);
                } else {
                    tx.send_replace(());
                }
            }
        }
    }
}

/// Records between two marks of the sparse index at least; the stride grows with the
/// log so the index never holds more than about [`SPARSE_MARKS_MAX`] marks.
pub(super) const SPARSE_STRIDE_MIN: u64 = 64;
/// Marks the sparse index aims to stay under.
pub(super) const SPARSE_MARKS_MAX: u64 = 4096;
/// How far back in time REPLAY starts before the mark it picks: timestamps are taken
/// before the queue's lock, so concurrent stores may log them slightly out of order.
pub(super) const SPARSE_TIME_SLACK_MS: u64 = 5_000;

/// One packet record's place in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) seq: u64,
    pub(super) pos: u64,
    pub(super) ts_ms: u64,
}

/// What a REPLAY looks for, and the log's end when it started.
pub(super) struct ReplayScan {
    pub(super) node: NodeAddr,
    pub(super) from_seq: u64,
    pub(super) from_ms: u64,
    pub(super) max: usize,
    pub(super) budget: usize,
    pub(super) head: u64,
    pub(super) frontier: u64,
}

/// Every `stride`-th packet record's place, oldest first, pruned as the tail passes.
#[derive(Debug, Default)]
pub(super) struct SparseIndex {
    pub(super) marks: VecDeque<Mark>,
    pub(super) stride: u64,
}

impl SparseIndex {
    pub(super) fn new(cap: u64, bs: u64) -> Self {
        let records_max = cap / bs.max(1);
        SparseIndex {
            marks: VecDeque::new(),
            stride: (records_max / SPARSE_MARKS_MAX).max(SPARSE_STRIDE_MIN),
        }
    }

    /// A packet record was placed; `tail_seq` is the oldest sequence still in the log.
    pub(super) fn note(&mut self, m: Mark, tail_seq: u64) {
        while self.marks.front().is_some_and(|f| f.seq < tail_seq) {
            self.marks.pop_front();
        }
        let due = self
            .marks
            .back()
            .is_none_or(|b| m.seq >= b.seq.saturating_add(self.stride));
        if due {
            self.marks.push_back(m);
        }
    }

    /// The latest mark a replay of records with seq >= `from_seq` and timestamp >=
    /// `from_ms` may start from: every record before it fails one of the two bounds.
    pub(super) fn start(&self, from_seq: u64, from_ms: u64, tail_seq: u64) -> Option<Mark> {
        self.marks
            .iter()
            .rev()
            .filter(|m| m.seq >= tail_seq)
            .find(|m| m.seq <= from_seq || m.ts_ms.saturating_add(SPARSE_TIME_SLACK_MS) < from_ms)
            .copied()
    }
}

impl PacketQueue {
    /// Records a stored packet in the in-memory state (store and recovery).
    pub(super) fn index_packet(&self, g: &mut Inner, p: &Packet, payload_len: usize, pos: u64) {
        self.note_placed(g, p, pos);
        let n = g.nodes.entry(p.node).or_default();
        n.last_assigned = n.last_assigned.max(p.seq);
        if !n.is_acked(p.seq) {
            n.queued_records += 1;
            n.queued_bytes += payload_len as u64;
            if n.spill.is_none() && n.pending.len() < self.index_max {
                n.pending.push_back(Entry {
                    seq: p.seq,
                    pos,
                    payload_len: payload_len as u32,
                    ts_ms: p.ts_ms,
                    sender: p.sender,
                    packet_id: p.packet_id,
                });
            } else if n.spill.is_none() {
                n.spill = Some(pos);
            }
        }
        if p.flags & flags::NOTICE == 0 {
            let outcome = if p.flags & flags::TO_EXTERNAL != 0 {
                Outcome::Accepted
            } else {
                Outcome::Delivered
            };
            // The copies of one broadcast share their key and are stored one after the
            // other: the entry follows the last copy, so it lasts until the tail has
            // released every copy (it releases in log order), and a retry waits for all.
            g.dedup.note_stored(
                p.sender,
                p.packet_id,
                outcome,
                p.seq,
                p.flags & flags::BROADCAST != 0,
            );
        }
    }

    pub(super) fn apply_ack(g: &mut Inner, node: NodeAddr, upto: u64, list: &[u64]) {
        let n = g.nodes.entry(node).or_default();
        let upto = upto.min(n.last_assigned);
        if upto > n.acked_upto {
            n.acked_upto = upto;
            let acked_upto = n.acked_upto;
            n.acked.retain(|&s| s > acked_upto);
        }
        for &s in list {
            if s > n.acked_upto && s <= n.last_assigned {
                n.acked.insert(s);
            }
        }
        // Drop acknowledged entries from the index and the counters.
        let mut kept = VecDeque::with_capacity(n.pending.len());
        for e in n.pending.drain(..) {
            if e.seq <= n.acked_upto || n.acked.contains(&e.seq) {
                n.queued_records = n.queued_records.saturating_sub(1);
                n.queued_bytes = n.queued_bytes.saturating_sub(u64::from(e.payload_len));
            } else {
                kept.push_back(e);
            }
        }
        n.pending = kept;
        n.delivered = n.delivered.max(n.acked_upto);
        n.noticed_upto = n.noticed_upto.max(n.acked_upto);
    }

    /// Refills a node's index from the log after it drained below half.
    pub(super) fn refill(&self, g: &mut Inner, node: NodeAddr) -> Result<(), QueueError> {
        let Some(n) = g.nodes.get(&node) else {
            return Ok(());
        };
        let Some(mut pos) = n.spill else {
            return Ok(());
        };
        if n.pending.len() > self.index_max / 2 {
            return Ok(());
        }
        let head = g.head;
        let mut found = Vec::new();
        let room = self.index_max - n.pending.len();
        let mut next_spill = None;
        // Packets acknowledged while spilled were counted when stored and never seen by
        // `apply_ack` (it only walks the index): they leave the counters here.
        let (mut gone_records, mut gone_bytes) = (0u64, 0u64);
        while pos < head {
            let Some((h, body)) = self.record(pos, None)? else {
                return Err(QueueError::Corrupt(format!("unreadable record at {pos}")));
            };
            if h.kind == KIND_PAD {
                pos = pos.div_ceil(self.cap) * self.cap;
                continue;
            }
            if h.kind == KIND_PACKET {
                if let Some(p) = parse_packet(h.seq, &body) {
                    if p.node == node && n.is_acked(p.seq) {
                        gone_records += 1;
                        gone_bytes += p.payload.len() as u64;
                    } else if p.node == node {
                        if found.len() == room {
                            next_spill = Some(pos);
                            break;
                        }
                        found.push(Entry {
                            seq: p.seq,
                            pos,
                            payload_len: p.payload.len() as u32,
                            ts_ms: p.ts_ms,
                            sender: p.sender,
                            packet_id: p.packet_id,
                        });
                    }
                }
            }
            pos += self.rec_len(h.body_len);
        }
        if let Some(n) = g.nodes.get_mut(&node) {
            n.pending.extend(found);
            n.spill = next_spill;
            n.queued_records = n.queued_records.saturating_sub(gone_records);
            n.queued_bytes = n.queued_bytes.saturating_sub(gone_bytes);
        }
        Ok(())
    }

    /// Keeps the sparse index current as a packet record is placed (store, recovery).
    pub(super) fn note_placed(&self, g: &Inner, p: &Packet, pos: u64) {
        let m = Mark {
            seq: p.seq,
            pos,
            ts_ms: p.ts_ms,
        };
        self.sparse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .note(m, g.tail_seq);
    }

    /// Wakes the long polls of the nodes `packets` went to (their records are now
    /// deliverable).
    pub(super) fn wake_stored(&self, packets: &[NewPacket]) {
        let mut nodes: Vec<NodeAddr> = packets.iter().map(|p| p.node).collect();
        nodes.sort_unstable_by_key(|n| n.0);
        nodes.dedup();
        self.wake.notify(nodes);
    }

    /// The outcome and sequence number a (sender, packet id) got, while that packet is
    /// stored.
    pub fn duplicate(&self, sender: NodeAddr, packet_id: u64) -> Option<(Outcome, u64)> {
        // A poisoned state knows no duplicates; the store that follows fails anyway.
        lock(&self.inner).ok()?.dedup.get(sender, packet_id)
    }

    /// Decides, under the lock, which packets of a batch are not to be stored: retries
    /// of stored packets and packets over their destination's quota. `None`: store it.
    pub(super) fn admit(&self, g: &Inner, packets: &[NewPacket]) -> Vec<Option<StoreResult>> {
        let mut out: Vec<Option<StoreResult>> = packets
            .iter()
            .map(|p| {
                if p.flags & flags::NOTICE != 0 || p.packet_id == 0 {
                    return None;
                }
                g.dedup
                    .get(p.sender, p.packet_id)
                    .map(|(o, seq)| StoreResult::Duplicate(seq, o))
            })
            .collect();
        // Quota: what the batch adds per node on top of what each node holds. Notices
        // (the target's own, bounded by the node's sends) and packets for the external
        // port (acknowledged as they leave) do not count.
        let mut added: HashMap<NodeAddr, (u64, u64)> = HashMap::new();
        let mut i = 0;
        while i < packets.len() {
            // A group: one packet, or the consecutive copies of one broadcast.
            let p = &packets[i];
            let mut end = i + 1;
            if p.flags & flags::BROADCAST != 0 {
                while end < packets.len()
                    && packets[end].flags & flags::BROADCAST != 0
                    && packets[end].sender == p.sender
                    && packets[end].packet_id == p.packet_id
                {
                    end += 1;
                }
            }
            let counted = |q: &NewPacket| q.flags & (flags::NOTICE | flags::TO_EXTERNAL) == 0;
            let fits = (i..end).filter(|&k| out[k].is_none()).all(|k| {
                let q = &packets[k];
                if !counted(q) {
                    return true;
                }
                let (held_r, held_b) = g
                    .nodes
                    .get(&q.node)
                    .map_or((0, 0), |n| (n.queued_records, n.queued_bytes));
                let (add_r, add_b) = added.get(&q.node).copied().unwrap_or_default();
                held_r + add_r < self.quota_records
                    && held_b + add_b + q.payload.len() as u64 <= self.quota_bytes
            });
            for k in i..end {
                if out[k].is_some() {
                    continue;
                }
                if !fits {
                    out[k] = Some(StoreResult::OverQuota);
                } else if counted(&packets[k]) {
                    let a = added.entry(packets[k].node).or_default();
                    a.0 += 1;
                    a.1 += packets[k].payload.len() as u64;
                }
            }
            i = end;
        }
        out
    }

    /// A wake-up for a long poll of `node`: it fires once records of the node may have
    /// become deliverable (or its position moved back) after this call. Subscribe before
    /// [`Self::receive`], so nothing stored between the two is missed.
    pub fn subscribe(&self, node: NodeAddr) -> tokio::sync::watch::Receiver<()> {
        self.wake.subscribe(node)
    }
}

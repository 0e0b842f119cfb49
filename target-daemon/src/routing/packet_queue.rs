//! The packet queue: every packet the target accepts, stored in a log on a mirrored
//! volume behind the write cache, so a packet is as durable as a block write before its
//! sender hears GOOD.
//!
//! Layout of the volume (512-byte blocks): block 0 is the superblock (where the log's
//! tail is), the rest a circular log of records. A record is a 24-byte header (magic,
//! version, kind, sequence number, body length, crc32c) and a body, padded to whole
//! blocks; it never wraps the volume end (a PAD record fills the rest of the lap).
//!
//! Sequence numbers are global and increase with the log, so every packet's number also
//! increases per destination node (the numbers RECEIVE, ACK and REPLAY use). Ordering is
//! the write cache's: records and superblock updates are appended to the cache under this
//! queue's lock in log order, and the cache commits in append order, so a durable record
//! implies every earlier one (and the superblock that made room for it) is durable.
//!
//! Memory stays bounded however large a node's backlog: each node indexes at most
//! `INDEX_MAX` of its unacknowledged packets; past that it remembers where in the log its
//! unindexed packets start and refills the index by reading the log as it drains.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ftss_proto::vendor::{NodeAddr, Outcome};
use tracing::{info, warn};

use super::clock::{Clock, SystemClock};
use crate::media::cache::WriteCache;
use crate::media::MediaError;

const MAGIC: u32 = 0x4654_5051; // "FTPQ"
const VERSION: u16 = 1;
const KIND_PACKET: u16 = 1;
const KIND_ACK: u16 = 2;
const KIND_PAD: u16 = 3;
const HDR: usize = 24;
const SB_MAGIC: &[u8; 8] = b"FTPQSB01";
/// Bytes of a packet record body before the payload.
const PKT_FIXED: usize = 16 * 4 + 8 + 8 + 2 + 4;
/// Unacknowledged packets a node keeps indexed in memory.
pub const INDEX_MAX: usize = 65_536;
/// Log space only ACK records may use.
const ACK_RESERVE: u64 = 64 * 512;
/// Largest single append handed to the write cache.
const APPEND_MAX: usize = 1 << 20;

/// Packet flags as stored.
pub mod flags {
    /// Sent as a broadcast.
    pub const BROADCAST: u16 = 1;
    /// Came in through the external port.
    pub const FROM_EXTERNAL: u16 = 2;
    /// A delivery-failure notice.
    pub const NOTICE: u16 = 4;
    /// For the external port: accepted, delivery not guaranteed.
    pub const TO_EXTERNAL: u16 = 8;
}

/// A packet to store.
#[derive(Clone, Debug)]
pub struct NewPacket {
    /// Key of the destination node (its canonical address); the external port's key for
    /// packets leaving the nodes' network.
    pub node: NodeAddr,
    /// Destination address the sender gave.
    pub dest: NodeAddr,
    /// Source stamped by the target.
    pub source: NodeAddr,
    /// Key of the sending node (for duplicate suppression and failure notices).
    pub sender: NodeAddr,
    /// The sender's packet id.
    pub packet_id: u64,
    /// [`flags`].
    pub flags: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A stored packet read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Sequence number.
    pub seq: u64,
    /// Destination node key.
    pub node: NodeAddr,
    /// Destination address.
    pub dest: NodeAddr,
    /// Stamped source.
    pub source: NodeAddr,
    /// Sender node key.
    pub sender: NodeAddr,
    /// Sender's packet id.
    pub packet_id: u64,
    /// When stored, ms since the epoch.
    pub ts_ms: u64,
    /// [`flags`].
    pub flags: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Errors of the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No room without dropping unacknowledged packets (TASK SET FULL).
    #[error("packet queue full")]
    Full,
    /// The media failed.
    #[error(transparent)]
    Media(#[from] MediaError),
    /// The volume holds something that is not a packet queue.
    #[error("packet queue: {0}")]
    Corrupt(String),
    /// A thread panicked while changing the queue's state (a failed assertion), so the
    /// index may be half-updated: nothing is served from it any more. The log on the
    /// media is untouched and the next start rebuilds the index from it.
    #[error("packet queue state abandoned by a panicking thread; restart to recover from the log")]
    Poisoned,
}

/// What became of one packet handed to [`PacketQueue::store`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreResult {
    /// Stored under this sequence number (durable once `store` returned).
    Stored(u64),
    /// A retry of a packet that is still stored: the original's sequence number and
    /// outcome. `store` returns only once the original is durable.
    Duplicate(u64, Outcome),
    /// The destination node holds its quota of unacknowledged packets: not stored.
    OverQuota,
}

#[derive(Clone, Debug)]
struct Entry {
    seq: u64,
    pos: u64,
    payload_len: u32,
    ts_ms: u64,
    sender: NodeAddr,
    packet_id: u64,
}

#[derive(Default, Debug)]
struct NodeQ {
    acked_upto: u64,
    /// Acknowledged numbers above `acked_upto`.
    acked: BTreeSet<u64>,
    /// Unacknowledged packets, in order; at most INDEX_MAX.
    pending: VecDeque<Entry>,
    /// Log position from which this node's packets are not in `pending`.
    spill: Option<u64>,
    /// RECEIVE position.
    delivered: u64,
    last_assigned: u64,
    queued_records: u64,
    queued_bytes: u64,
    /// Failure notices were produced for packets up to here.
    noticed_upto: u64,
}

impl NodeQ {
    fn is_acked(&self, seq: u64) -> bool {
        seq <= self.acked_upto || self.acked.contains(&seq)
    }
}

struct Inner {
    head: u64,
    tail: u64,
    next_seq: u64,
    tail_seq: u64,
    /// Every record up to this sequence number is durable (deliverable).
    frontier: u64,
    nodes: HashMap<NodeAddr, NodeQ>,
    /// (sender, packet id) of stored packets -> (outcome, sequence number). An entry
    /// goes when the tail releases its record, so an id is a duplicate exactly while
    /// its packet is stored (and among the last `dedup_window` stored).
    dedup: HashMap<(NodeAddr, u64), (Outcome, u64)>,
    /// Insertion order with the sequence number inserted, so evicting an old entry
    /// never removes a newer packet that reused the id.
    dedup_order: VecDeque<((NodeAddr, u64), u64)>,
}

/// Per-node figures for QUEUE STATS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Stored, not acknowledged.
    pub queued_records: u64,
    /// Their payload bytes.
    pub queued_bytes: u64,
    /// First unacknowledged sequence number (0 = none).
    pub first_unacked: u64,
    /// RECEIVE position.
    pub last_delivered: u64,
    /// Last number assigned to this node.
    pub last_assigned: u64,
    /// When the oldest unacknowledged packet was stored, ms since the epoch (0 = none).
    pub oldest_unacked_ms: u64,
}

/// Tunables of a [`PacketQueue`].
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// How long acknowledged packets stay readable by REPLAY (while space allows).
    pub retain: Duration,
    /// (sender, packet id) pairs remembered for duplicate suppression.
    pub dedup_window: usize,
    /// Unacknowledged packets indexed in memory per node.
    pub index_max: usize,
    /// Unacknowledged payload bytes one destination node may hold; `None`: a quarter
    /// of the log. Past it, packets to that node get
    /// [`Outcome::DestinationQueueFull`], so one node that stops acknowledging fills
    /// its own share, not the log every node shares.
    pub node_quota_bytes: Option<u64>,
    /// Unacknowledged packets one destination node may hold; `None`: as many
    /// one-block records as a quarter of the log holds.
    pub node_quota_records: Option<u64>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            retain: Duration::ZERO,
            dedup_window: 1 << 20,
            index_max: INDEX_MAX,
            node_quota_bytes: None,
            node_quota_records: None,
        }
    }
}

/// The packet queue.
pub struct PacketQueue {
    cache: Arc<WriteCache>,
    volume: u32,
    bs: u64,
    cap: u64,
    retain: Duration,
    dedup_window: usize,
    index_max: usize,
    quota_bytes: u64,
    quota_records: u64,
    inner: Mutex<Inner>,
    /// Per-node wake-ups for parked long-poll RECEIVEs.
    wake: Wake,
    /// Every few records' place in the log, so REPLAY starts near its point.
    sparse: Mutex<SparseIndex>,
    /// Timestamps and retention read it (a fake one in the packet simulation).
    clock: Arc<dyn Clock>,
}

/// Per-node wake-ups: a RECEIVE that found nothing subscribes before it looks, and is
/// woken when records of its node become deliverable (or its position moves back).
/// Per node, so a store re-runs only the polls of the nodes it stored for.
#[derive(Default)]
struct Wake(Mutex<HashMap<NodeAddr, tokio::sync::watch::Sender<()>>>);

impl Wake {
    fn subscribe(&self, node: NodeAddr) -> tokio::sync::watch::Receiver<()> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(node)
            .or_insert_with(|| tokio::sync::watch::channel(()).0)
            .subscribe()
    }

    fn notify(&self, nodes: impl IntoIterator<Item = NodeAddr>) {
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
const SPARSE_STRIDE_MIN: u64 = 64;
/// Marks the sparse index aims to stay under.
const SPARSE_MARKS_MAX: u64 = 4096;
/// How far back in time REPLAY starts before the mark it picks: timestamps are taken
/// before the queue's lock, so concurrent stores may log them slightly out of order.
const SPARSE_TIME_SLACK_MS: u64 = 5_000;

/// One packet record's place in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    seq: u64,
    pos: u64,
    ts_ms: u64,
}

/// What a REPLAY looks for, and the log's end when it started.
struct ReplayScan {
    node: NodeAddr,
    from_seq: u64,
    from_ms: u64,
    max: usize,
    budget: usize,
    head: u64,
    frontier: u64,
}

/// Every `stride`-th packet record's place, oldest first, pruned as the tail passes.
#[derive(Debug, Default)]
struct SparseIndex {
    marks: VecDeque<Mark>,
    stride: u64,
}

impl SparseIndex {
    fn new(cap: u64, bs: u64) -> Self {
        let records_max = cap / bs.max(1);
        SparseIndex {
            marks: VecDeque::new(),
            stride: (records_max / SPARSE_MARKS_MAX).max(SPARSE_STRIDE_MIN),
        }
    }

    /// A packet record was placed; `tail_seq` is the oldest sequence still in the log.
    fn note(&mut self, m: Mark, tail_seq: u64) {
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
    fn start(&self, from_seq: u64, from_ms: u64, tail_seq: u64) -> Option<Mark> {
        self.marks
            .iter()
            .rev()
            .filter(|m| m.seq >= tail_seq)
            .find(|m| m.seq <= from_seq || m.ts_ms.saturating_add(SPARSE_TIME_SLACK_MS) < from_ms)
            .copied()
    }
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn le32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn addr(b: &[u8], o: usize) -> NodeAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[o..o + 16]);
    NodeAddr(a)
}

fn encode_record(kind: u16, seq: u64, body: &[u8], bs: u64) -> Vec<u8> {
    let len = (HDR + body.len()).div_ceil(bs as usize) * bs as usize;
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&MAGIC.to_le_bytes());
    r.extend_from_slice(&VERSION.to_le_bytes());
    r.extend_from_slice(&kind.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(body);
    let crc = crc32c::crc32c(&r);
    r[20..24].copy_from_slice(&crc.to_le_bytes());
    r.resize(len, 0);
    r
}

fn packet_body(p: &NewPacket, ts_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(PKT_FIXED + p.payload.len());
    b.extend_from_slice(&p.node.0);
    b.extend_from_slice(&p.dest.0);
    b.extend_from_slice(&p.source.0);
    b.extend_from_slice(&p.sender.0);
    b.extend_from_slice(&p.packet_id.to_le_bytes());
    b.extend_from_slice(&ts_ms.to_le_bytes());
    b.extend_from_slice(&p.flags.to_le_bytes());
    b.extend_from_slice(&(p.payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&p.payload);
    b
}

fn parse_packet(seq: u64, body: &[u8]) -> Option<Packet> {
    if body.len() < PKT_FIXED {
        return None;
    }
    let n = le32(body, 82) as usize;
    if body.len() != PKT_FIXED + n {
        return None;
    }
    Some(Packet {
        seq,
        node: addr(body, 0),
        dest: addr(body, 16),
        source: addr(body, 32),
        sender: addr(body, 48),
        packet_id: le64(body, 64),
        ts_ms: le64(body, 72),
        flags: u16::from_le_bytes([body[80], body[81]]),
        payload: body[PKT_FIXED..].to_vec(),
    })
}

fn ack_body(node: NodeAddr, upto: u64, list: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + list.len() * 8);
    b.extend_from_slice(&node.0);
    b.extend_from_slice(&upto.to_le_bytes());
    b.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for s in list {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

fn parse_ack(body: &[u8]) -> Option<(NodeAddr, u64, Vec<u64>)> {
    if body.len() < 28 {
        return None;
    }
    let n = le32(body, 24) as usize;
    if body.len() != 28 + n * 8 {
        return None;
    }
    Some((
        addr(body, 0),
        le64(body, 16),
        (0..n).map(|i| le64(body, 28 + i * 8)).collect(),
    ))
}

/// A record header read from the log.
struct Hdr {
    kind: u16,
    seq: u64,
    body_len: usize,
}

/// The queue's state, or [`QueueError::Poisoned`] once a thread panicked holding it.
fn lock(m: &Mutex<Inner>) -> Result<MutexGuard<'_, Inner>, QueueError> {
    m.lock().map_err(|_| QueueError::Poisoned)
}

/// The state for figures that only report (statistics, overdue lists, space used): a
/// poisoned lock is no reason to stop reporting, and nothing is changed.
fn lock_to_report(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PacketQueue {
    /// Opens the queue stored as `volume` of `cache` (`blocks` blocks of `bs` bytes),
    /// rebuilding its state from the log. A volume of zeros becomes an empty queue.
    pub fn open(
        cache: Arc<WriteCache>,
        volume: u32,
        blocks: u64,
        bs: u32,
        opts: QueueOptions,
    ) -> Result<Arc<Self>, QueueError> {
        Self::open_with_clock(cache, volume, blocks, bs, opts, Arc::new(SystemClock))
    }

    /// [`open`](Self::open) reading the time from `clock`.
    pub fn open_with_clock(
        cache: Arc<WriteCache>,
        volume: u32,
        blocks: u64,
        bs: u32,
        opts: QueueOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, QueueError> {
        let QueueOptions {
            retain,
            dedup_window,
            index_max,
            node_quota_bytes,
            node_quota_records,
        } = opts;
        let bs = u64::from(bs);
        if blocks < 16 {
            return Err(QueueError::Corrupt("volume too small".into()));
        }
        let cap = (blocks - 1) * bs;
        let q = PacketQueue {
            cache,
            volume,
            bs,
            cap,
            retain,
            dedup_window,
            index_max: index_max.max(2),
            quota_bytes: node_quota_bytes.unwrap_or(cap / 4),
            quota_records: node_quota_records.unwrap_or(cap / 4 / bs).max(1),
            inner: Mutex::new(Inner {
                head: 0,
                tail: 0,
                next_seq: 1,
                tail_seq: 1,
                frontier: 0,
                nodes: HashMap::new(),
                dedup: HashMap::new(),
                dedup_order: VecDeque::new(),
            }),
            wake: Wake::default(),
            sparse: Mutex::new(SparseIndex::new((blocks - 1) * bs, bs)),
            clock,
        };
        q.recover()?;
        Ok(Arc::new(q))
    }

    fn lba(&self, pos: u64) -> u64 {
        1 + (pos % self.cap) / self.bs
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<(), QueueError> {
        self.cache.read(self.volume, self.lba(pos), buf)?;
        Ok(())
    }

    /// Reads the header at `pos` if a valid record of sequence `want` starts there.
    fn header(&self, pos: u64, want: Option<u64>) -> Result<Option<(Hdr, Vec<u8>)>, QueueError> {
        let mut first = vec![0u8; self.bs as usize];
        self.read_at(pos, &mut first)?;
        if le32(&first, 0) != MAGIC || u16::from_le_bytes([first[4], first[5]]) != VERSION {
            return Ok(None);
        }
        let h = Hdr {
            kind: u16::from_le_bytes([first[6], first[7]]),
            seq: le64(&first, 8),
            body_len: le32(&first, 16) as usize,
        };
        if want.is_some_and(|w| w != h.seq) {
            return Ok(None);
        }
        let room = self.cap - pos % self.cap;
        if (HDR + h.body_len) as u64 > room {
            return Ok(None);
        }
        Ok(Some((h, first)))
    }

    /// Reads and verifies a whole record; returns its header and body.
    fn record(&self, pos: u64, want: Option<u64>) -> Result<Option<(Hdr, Vec<u8>)>, QueueError> {
        let Some((h, first)) = self.header(pos, want)? else {
            return Ok(None);
        };
        let len = (HDR + h.body_len).div_ceil(self.bs as usize) * self.bs as usize;
        let mut r = first;
        if len > r.len() {
            let mut rest = vec![0u8; len - r.len()];
            self.read_at(pos + r.len() as u64, &mut rest)?;
            r.extend_from_slice(&rest);
        }
        let want_crc = le32(&r, 20);
        r[20..24].fill(0);
        if crc32c::crc32c(&r[..HDR + h.body_len]) != want_crc {
            return Ok(None);
        }
        let body = r[HDR..HDR + h.body_len].to_vec();
        Ok(Some((h, body)))
    }

    fn rec_len(&self, body_len: usize) -> u64 {
        ((HDR + body_len) as u64).div_ceil(self.bs) * self.bs
    }

    fn recover(&self) -> Result<(), QueueError> {
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

    /// Records a stored packet in the in-memory state (store and recovery).
    fn index_packet(&self, g: &mut Inner, p: &Packet, payload_len: usize, pos: u64) {
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
            let key = (p.sender, p.packet_id);
            // The copies of one broadcast share their key and are stored one after the
            // other: the entry follows the last copy, so it lasts until the tail has
            // released every copy (it releases in log order), and a retry waits for all.
            let entry = match g.dedup.entry(key) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((outcome, p.seq));
                    true
                }
                std::collections::hash_map::Entry::Occupied(mut o)
                    if p.flags & flags::BROADCAST != 0 && o.get().1 < p.seq =>
                {
                    o.get_mut().1 = p.seq;
                    true
                }
                std::collections::hash_map::Entry::Occupied(_) => false,
            };
            if entry {
                g.dedup_order.push_back((key, p.seq));
                while g.dedup_order.len() > self.dedup_window {
                    if let Some((old, seq)) = g.dedup_order.pop_front() {
                        Self::forget(g, old, seq);
                    }
                }
            }
        }
    }

    /// Drops the duplicate entry of `key` if it is still the one of packet `seq`.
    fn forget(g: &mut Inner, key: (NodeAddr, u64), seq: u64) {
        if g.dedup.get(&key).is_some_and(|&(_, s)| s == seq) {
            g.dedup.remove(&key);
        }
    }

    fn apply_ack(g: &mut Inner, node: NodeAddr, upto: u64, list: &[u64]) {
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

    /// Makes room for `need` bytes (plus a lap's padding) by moving the tail past records
    /// that are acknowledged (and past their retention, unless room is short). Appends a
    /// superblock when the tail moved, before anything reuses the space.
    fn make_room(&self, g: &mut Inner, need: u64) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        let retain_ms = self.retain.as_millis() as u64;
        let (tail0, tail_seq0) = (g.tail, g.tail_seq);
        let mut released: Vec<((NodeAddr, u64), u64)> = Vec::new();
        let mut moved = false;
        loop {
            let used = g.head - g.tail;
            let short = self.cap - used < need;
            if g.tail == g.head {
                break;
            }
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
                    released.push(((p.sender, p.packet_id), p.seq));
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
            for (key, seq) in released {
                Self::forget(g, key, seq);
            }
        }
        if self.cap - (g.head - g.tail) < need {
            return Err(QueueError::Full);
        }
        Ok(())
    }

    fn append_superblock(&self, g: &Inner) -> Result<u64, QueueError> {
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
    fn append_records(
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
    fn need(&self, bodies: &[Vec<u8>]) -> u64 {
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

    /// Decides, under the lock, which packets of a batch are not to be stored: retries
    /// of stored packets and packets over their destination's quota. `None`: store it.
    fn admit(&self, g: &Inner, packets: &[NewPacket]) -> Vec<Option<StoreResult>> {
        let mut out: Vec<Option<StoreResult>> = packets
            .iter()
            .map(|p| {
                if p.flags & flags::NOTICE != 0 || p.packet_id == 0 {
                    return None;
                }
                g.dedup
                    .get(&(p.sender, p.packet_id))
                    .map(|&(o, seq)| StoreResult::Duplicate(seq, o))
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

    /// Every record up to `seq` is durable: deliverable from now on.
    fn advance_frontier(&self, seq: u64) -> Result<(), QueueError> {
        let mut g = lock(&self.inner)?;
        // Appends are in log order, so a commit covers every earlier record too.
        g.frontier = g.frontier.max(seq);
        Ok(())
    }

    /// The outcome and sequence number a (sender, packet id) got, while that packet is
    /// stored.
    pub fn duplicate(&self, sender: NodeAddr, packet_id: u64) -> Option<(Outcome, u64)> {
        // A poisoned state knows no duplicates; the store that follows fails anyway.
        lock(&self.inner)
            .ok()?
            .dedup
            .get(&(sender, packet_id))
            .copied()
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
                    Ok(()) | Err(QueueError::Full) => {}
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

    /// Refills a node's index from the log after it drained below half.
    fn refill(&self, g: &mut Inner, node: NodeAddr) -> Result<(), QueueError> {
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

    /// A wake-up for a long poll of `node`: it fires once records of the node may have
    /// become deliverable (or its position moved back) after this call. Subscribe before
    /// [`Self::receive`], so nothing stored between the two is missed.
    pub fn subscribe(&self, node: NodeAddr) -> tokio::sync::watch::Receiver<()> {
        self.wake.subscribe(node)
    }

    /// Wakes the long polls of the nodes `packets` went to (their records are now
    /// deliverable).
    fn wake_stored(&self, packets: &[NewPacket]) {
        let mut nodes: Vec<NodeAddr> = packets.iter().map(|p| p.node).collect();
        nodes.sort_unstable_by_key(|n| n.0);
        nodes.dedup();
        self.wake.notify(nodes);
    }

    /// Keeps the sparse index current as a packet record is placed (store, recovery).
    fn note_placed(&self, g: &Inner, p: &Packet, pos: u64) {
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
    fn read_released(&self, node: NodeAddr, e: &Entry) -> Result<Option<Packet>, QueueError> {
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
    fn replay_from(
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

    /// QUEUE STATS figures of `node`.
    pub fn stats(&self, node: NodeAddr) -> NodeStats {
        let g = lock_to_report(&self.inner);
        g.nodes
            .get(&node)
            .map_or_else(NodeStats::default, |n| NodeStats {
                queued_records: n.queued_records,
                queued_bytes: n.queued_bytes,
                first_unacked: n.pending.front().map_or(0, |e| e.seq),
                last_delivered: n.delivered,
                last_assigned: n.last_assigned,
                oldest_unacked_ms: n.pending.front().map_or(0, |e| e.ts_ms),
            })
    }

    /// The per-node quota: unacknowledged payload bytes and packets one node may hold.
    pub fn node_quota(&self) -> (u64, u64) {
        (self.quota_bytes, self.quota_records)
    }

    /// Size of the queue's volume in bytes (what `packets.size` configured); the log
    /// holds all of it but one block.
    pub fn capacity(&self) -> u64 {
        self.cap + self.bs
    }

    /// Unacknowledged packets of `node` stored before `older_than_ms` that have not been
    /// reported yet: (sender, packet id, seq). Marks them reported.
    pub fn overdue(&self, node: NodeAddr, older_than_ms: u64) -> Vec<(NodeAddr, u64, u64)> {
        let mut g = lock_to_report(&self.inner);
        let Some(n) = g.nodes.get_mut(&node) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut upto = n.noticed_upto;
        for e in &n.pending {
            if e.seq <= n.noticed_upto {
                continue;
            }
            if e.ts_ms > older_than_ms {
                break;
            }
            out.push((e.sender, e.packet_id, e.seq));
            upto = e.seq;
        }
        n.noticed_upto = upto;
        out
    }

    /// Moves the tail past expired, acknowledged packets (retention by age).
    pub fn expire(&self) -> Result<(), QueueError> {
        let mut g = lock(&self.inner)?;
        match self.make_room(&mut g, 0) {
            Ok(()) | Err(QueueError::Full) => Ok(()),
            Err(e) => {
                warn!("packet queue expiry: {e}");
                Err(e)
            }
        }
    }

    /// Bytes used by the log (live records, acknowledged ones still retained included).
    pub fn used_bytes(&self) -> u64 {
        let g = lock_to_report(&self.inner);
        g.head - g.tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::mirror::MirrorSet;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    const VOL: u32 = 9;

    fn a(x: u8) -> NodeAddr {
        NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
    }

    struct Rig {
        dir: PathBuf,
        blocks: u64,
        cache: Arc<WriteCache>,
        q: Arc<PacketQueue>,
    }

    impl Rig {
        fn open(dir: PathBuf, blocks: u64, opts: QueueOptions) -> Rig {
            let set = Arc::new(
                MirrorSet::open(&[dir.join("a"), dir.join("b")], blocks, 512).expect("mirrors"),
            );
            let cache = WriteCache::open(
                &dir.join("cache"),
                8192 + (2 << 20),
                HashMap::from([(VOL, set)]),
            )
            .expect("cache");
            let q = PacketQueue::open(Arc::clone(&cache), VOL, blocks, 512, opts).expect("queue");
            Rig {
                dir,
                blocks,
                cache,
                q,
            }
        }

        /// Drops everything, as a crash would, and opens it all again.
        fn crash_and_reopen(self, opts: QueueOptions) -> Rig {
            let (dir, blocks) = (self.dir.clone(), self.blocks);
            self.cache.shutdown();
            drop(self);
            std::thread::sleep(Duration::from_millis(50));
            Rig::open(dir, blocks, opts)
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ftss-pq-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn pkt(to: NodeAddr, id: u64, len: usize) -> NewPacket {
        NewPacket {
            node: to,
            dest: to,
            source: a(1),
            sender: a(1),
            packet_id: id,
            flags: 0,
            payload: (0..len).map(|i| (i as u64 ^ id) as u8).collect(),
        }
    }

    fn take(q: &PacketQueue, node: NodeAddr, max: usize) -> (Vec<Packet>, bool) {
        q.receive(node, max, 1 << 20, |n| 52 + n).expect("receive")
    }

    /// A thread that panics holding the queue's state leaves its index untrusted: stores,
    /// receives and ACKs fail with `Poisoned` (the agent answers them with an error, not
    /// from a half-updated index), statistics still report, and a restart rebuilds the
    /// index from the log with every stored packet.
    #[test]
    fn a_panic_under_the_state_lock_fails_stores_and_receives_until_a_restart() {
        let d = dir("poison");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        r.q.store(&[pkt(a(2), 1, 10), pkt(a(2), 2, 20)])
            .expect("store");
        let q = Arc::clone(&r.q);
        let panicked = std::thread::spawn(move || {
            let _g = q.inner.lock().expect("not poisoned yet");
            panic!("an assertion failed mid-update");
        })
        .join();
        assert!(panicked.is_err(), "the thread panicked");
        assert!(matches!(
            r.q.store(&[pkt(a(2), 3, 30)]),
            Err(QueueError::Poisoned)
        ));
        assert!(matches!(
            r.q.receive(a(2), 10, 1 << 20, |n| 52 + n),
            Err(QueueError::Poisoned)
        ));
        assert!(matches!(r.q.ack(a(2), 1, &[]), Err(QueueError::Poisoned)));
        assert_eq!(r.q.duplicate(a(1), 1), None, "no answer from the index");
        assert_eq!(r.q.stats(a(2)).queued_records, 2, "statistics still report");
        let r = r.crash_and_reopen(QueueOptions::default());
        let (got, _) = take(&r.q, a(2), 10);
        assert_eq!(
            got.iter().map(|p| p.packet_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn stored_packets_survive_a_crash_and_acks_hold() {
        let d = dir("crash");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        let seqs =
            r.q.store(&[pkt(a(2), 1, 10), pkt(a(2), 2, 20), pkt(a(3), 3, 30)])
                .expect("store");
        let seqs: Vec<u64> = seqs
            .into_iter()
            .filter_map(|r| match r {
                StoreResult::Stored(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(seqs.len(), 3);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let (got, more) = take(&r.q, a(2), 1);
        assert_eq!((got.len(), more), (1, true));
        r.q.ack(a(2), got[0].seq, &[]).expect("ack");
        let r = r.crash_and_reopen(QueueOptions::default());
        let (got, _) = take(&r.q, a(2), 10);
        assert_eq!(got.iter().map(|p| p.packet_id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(got[0].payload, pkt(a(2), 2, 20).payload);
        assert_eq!(take(&r.q, a(3), 10).0.len(), 1);
        assert_eq!(
            r.q.duplicate(a(1), 3).map(|d| d.0),
            Some(Outcome::Delivered)
        );
        assert_eq!(r.q.stats(a(2)).queued_records, 1);
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_full_queue_refuses_then_acks_free_space_across_many_laps() {
        // 1000-byte payloads leave a pad at each lap end; 400-byte ones (one block per
        // record) end laps exactly.
        laps("laps-pad", 1000);
        laps("laps-exact", 400);
    }

    fn laps(tag: &str, size: usize) {
        let d = dir(tag);
        // 127.5 KiB of log, 32 KiB of it kept for ACK records; no quota, so the whole
        // log fills.
        let opts = QueueOptions {
            node_quota_bytes: Some(u64::MAX),
            node_quota_records: Some(u64::MAX),
            ..QueueOptions::default()
        };
        let mut r = Rig::open(d.clone(), 256, opts);
        let mut id = 0u64;
        let mut delivered = 0u64;
        for lap in 0..6 {
            let mut stored = 0;
            loop {
                id += 1;
                match r
                    .q
                    .store(&[pkt(a(2), id, size), pkt(a(2), id + 1_000_000, size)])
                {
                    Ok(_) => stored += 1,
                    Err(QueueError::Full) => break,
                    Err(e) => panic!("lap {lap}: {e}"),
                }
            }
            assert!(stored > 10, "lap {lap}: {stored} fit");
            let (got, _) = take(&r.q, a(2), 1000);
            assert_eq!(
                got.len(),
                2 * stored,
                "lap {lap}: all stored are deliverable"
            );
            for p in &got {
                assert_eq!(p.payload, pkt(a(2), p.packet_id, size).payload);
            }
            delivered += got.len() as u64;
            // Acknowledge all but the last, crash, and find exactly that one again.
            let last = got.last().map(|p| p.seq).expect("some");
            r.q.ack(a(2), last - 1, &[]).expect("ack");
            r = r.crash_and_reopen(opts);
            let (again, _) = take(&r.q, a(2), 1000);
            assert_eq!(again.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![last]);
            r.q.ack(a(2), last, &[]).expect("ack");
        }
        assert!(delivered > 100, "{delivered} packets over six laps");
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_backlog_beyond_the_index_is_delivered_in_order_from_the_log() {
        let d = dir("spill");
        let opts = QueueOptions {
            index_max: 4,
            ..QueueOptions::default()
        };
        let r = Rig::open(d.clone(), 4096, opts);
        for i in 0..20u64 {
            r.q.store(&[pkt(a(2), i, 50), pkt(a(3), 100 + i, 50)])
                .expect("store");
        }
        let r = r.crash_and_reopen(opts);
        let mut ids = Vec::new();
        loop {
            let (got, more) = take(&r.q, a(2), 100);
            assert!(got.len() <= 4, "never more than the index holds");
            if let Some(last) = got.last() {
                r.q.ack(a(2), last.seq, &[]).expect("ack");
            }
            ids.extend(got.iter().map(|p| p.packet_id));
            if !more {
                break;
            }
        }
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert_eq!(r.q.stats(a(2)).queued_records, 0);
        assert_eq!(r.q.stats(a(3)).queued_records, 20);
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    fn ids(q: &PacketQueue, node: NodeAddr) -> Vec<u64> {
        q.receive(node, 100_000, 64 << 20, |n| 52 + n)
            .expect("receive")
            .0
            .iter()
            .map(|p| p.packet_id)
            .collect()
    }

    #[test]
    fn a_failed_append_leaves_no_hole_before_later_packets() {
        // Reproduces the lost-packets report: the head moved past a failed append, and
        // recovery stopped at the hole, losing every acknowledged packet after it.
        let d = dir("hole");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        r.q.store(&[pkt(a(2), 1, 100)]).expect("store 1");
        r.cache.inject_append_failures(0, 1);
        assert!(matches!(
            r.q.store(&[pkt(a(2), 2, 100)]),
            Err(QueueError::Media(_))
        ));
        for id in 3..8 {
            r.q.store(&[pkt(a(2), id, 100)])
                .expect("store after the failure");
        }
        let r = r.crash_and_reopen(QueueOptions::default());
        assert_eq!(ids(&r.q, a(2)), vec![1, 3, 4, 5, 6, 7]);
        // The failed id was never stored: sending it again stores it.
        assert_eq!(r.q.duplicate(a(1), 2), None);
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_batch_cut_by_a_failed_append_keeps_its_first_part_and_a_retry_completes_it() {
        let d = dir("cut");
        let r = Rig::open(d.clone(), 16384, QueueOptions::default());
        // 3,000 records of two blocks: more than one cache append (at most half the
        // 2 MiB ring each), so the second append fails mid-batch.
        let batch: Vec<NewPacket> = (1..=3000).map(|id| pkt(a(2), id, 600)).collect();
        r.cache.inject_append_failures(1, 1);
        assert!(r.q.store(&batch).is_err());
        let kept = r.q.stats(a(2)).queued_records;
        assert!(kept > 0 && kept < 3000, "first part stored: {kept}");
        // The sender retries the whole batch: what was stored is a duplicate.
        let again = r.q.store(&batch).expect("retry");
        let dups = again
            .iter()
            .filter(|x| matches!(x, StoreResult::Duplicate(..)))
            .count();
        assert_eq!(dups as u64, kept);
        let r = r.crash_and_reopen(QueueOptions::default());
        assert!(
            ids(&r.q, a(2)) == (1..=3000).collect::<Vec<_>>(),
            "each exactly once, in order"
        );
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_retry_gets_no_answer_before_its_original_is_durable() {
        let d = dir("retry");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        r.cache.inject_commit_failure();
        assert!(r.q.store(&[pkt(a(2), 1, 10)]).is_err(), "the commit failed");
        // The record is in the log, but never became durable: the retry must fail too.
        assert!(matches!(
            r.q.store(&[pkt(a(2), 1, 10)]).as_deref(),
            Err(_) | Ok([StoreResult::Stored(_)])
        ));
        let dup = r.q.duplicate(a(1), 1).expect("indexed");
        assert!(r.q.wait_stored(dup.1).is_err());
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn an_id_is_a_duplicate_while_stored_and_new_once_released() {
        let d = dir("reuse");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        assert!(matches!(
            r.q.store(&[pkt(a(2), 1, 10)]).expect("store").as_slice(),
            [StoreResult::Stored(_)]
        ));
        assert!(matches!(
            r.q.store(&[pkt(a(2), 1, 10)]).expect("retry").as_slice(),
            [StoreResult::Duplicate(_, Outcome::Delivered)]
        ));
        let (got, _) = take(&r.q, a(2), 10);
        r.q.ack(a(2), got[0].seq, &[]).expect("ack");
        // Retention 0: the next expiry releases the record, and with it the id.
        r.q.expire().expect("expire");
        assert_eq!(r.q.duplicate(a(1), 1), None);
        assert!(matches!(
            r.q.store(&[pkt(a(2), 1, 10)]).expect("reuse").as_slice(),
            [StoreResult::Stored(_)]
        ));
        assert_eq!(ids(&r.q, a(2)), vec![1], "the reused id is a new packet");
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn undeliver_puts_the_position_back_but_not_below_acks() {
        let d = dir("undeliver");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        for i in 1..=4u64 {
            r.q.store(&[pkt(a(2), i, 10)]).expect("store");
        }
        let (got, _) = take(&r.q, a(2), 10);
        let seqs: Vec<u64> = got.iter().map(|p| p.seq).collect();
        assert_eq!(seqs.len(), 4);
        r.q.ack(a(2), seqs[0], &[]).expect("ack");
        // The response carrying the third record and on was not sent whole.
        r.q.undeliver(a(2), seqs[2]);
        let again: Vec<u64> = take(&r.q, a(2), 10).0.iter().map(|p| p.seq).collect();
        assert_eq!(again, seqs[2..].to_vec());
        // Never behind what is acknowledged; never forward.
        r.q.undeliver(a(2), 1);
        let again: Vec<u64> = take(&r.q, a(2), 10).0.iter().map(|p| p.seq).collect();
        assert_eq!(again, seqs[1..].to_vec());
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_node_at_its_quota_blocks_only_its_own_senders() {
        let d = dir("quota");
        let opts = QueueOptions {
            node_quota_records: Some(10),
            node_quota_bytes: Some(1 << 20),
            ..QueueOptions::default()
        };
        let r = Rig::open(d.clone(), 4096, opts);
        for id in 0..10 {
            r.q.store(&[pkt(a(2), id, 100)]).expect("store");
        }
        assert_eq!(
            r.q.store(&[pkt(a(2), 10, 100)]).expect("over"),
            vec![StoreResult::OverQuota]
        );
        // Another node is untouched; a broadcast that reaches the full node is refused
        // whole.
        for id in 100..200 {
            let got = r.q.store(&[pkt(a(3), id, 100)]).expect("store");
            assert!(matches!(got.as_slice(), [StoreResult::Stored(_)]));
            let (p, _) = take(&r.q, a(3), 1);
            r.q.ack(a(3), p[0].seq, &[]).expect("ack");
        }
        let bcast: Vec<NewPacket> = [a(2), a(3)]
            .iter()
            .map(|&n| NewPacket {
                flags: flags::BROADCAST,
                ..pkt(n, 500, 10)
            })
            .collect();
        assert_eq!(
            r.q.store(&bcast).expect("bcast"),
            vec![StoreResult::OverQuota; 2]
        );
        assert_eq!(r.q.stats(a(3)).queued_records, 0);
        // Acknowledging makes room again, also after a restart.
        let r = r.crash_and_reopen(opts);
        assert_eq!(
            r.q.store(&[pkt(a(2), 11, 100)]).expect("over"),
            vec![StoreResult::OverQuota]
        );
        let (p, _) = take(&r.q, a(2), 1);
        r.q.ack(a(2), p[0].seq, &[]).expect("ack");
        assert!(matches!(
            r.q.store(&[pkt(a(2), 11, 100)]).expect("room").as_slice(),
            [StoreResult::Stored(_)]
        ));
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_store_wakes_the_polls_of_its_node_only() {
        let d = dir("wake");
        let r = Rig::open(d.clone(), 4096, QueueOptions::default());
        let mut w2 = r.q.subscribe(a(2));
        let w3 = r.q.subscribe(a(3));
        r.q.store(&[pkt(a(2), 1, 10)]).expect("store");
        assert!(
            w2.has_changed().expect("queue alive"),
            "node 2's poll is woken"
        );
        assert!(!w3.has_changed().expect("queue alive"), "node 3's is not");
        w2.mark_unchanged();
        r.q.rewind(a(3));
        assert!(w3.has_changed().expect("queue alive"));
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn replay_starts_at_a_sparse_mark_and_finds_what_a_full_scan_finds() {
        let d = dir("sparse");
        let opts = QueueOptions {
            retain: Duration::from_secs(3600),
            ..QueueOptions::default()
        };
        let r = Rig::open(d.clone(), 4096, opts);
        let mut seqs = Vec::new();
        for i in 0..400u64 {
            let to = if i % 4 == 0 { a(2) } else { a(3) };
            seqs.extend(
                r.q.store(&[pkt(to, i, 20)])
                    .expect("store")
                    .into_iter()
                    .filter_map(|x| match x {
                        StoreResult::Stored(s) => Some(s),
                        _ => None,
                    }),
            );
        }
        let tail_seq = lock(&r.q.inner).expect("not poisoned").tail_seq;
        let from = seqs[300];
        let mark = lock_sparse(&r.q)
            .start(from, 0, tail_seq)
            .expect("a mark before the point");
        assert!(
            mark.seq > seqs[200] && mark.seq <= from,
            "{mark:?} near {from}"
        );
        let (got, more) =
            r.q.replay(a(2), from, 0, 1000, 1 << 20, |n| 52 + n)
                .expect("replay");
        let ids: Vec<u64> = got.iter().map(|p| p.packet_id).collect();
        assert_eq!(ids, (300..400).step_by(4).collect::<Vec<u64>>());
        assert!(!more);
        // By time: everything was stored within the slack, so a replay from the first
        // timestamp starts at the tail and finds all of node 2's packets.
        let (all, _) =
            r.q.replay(a(2), 0, 1, 1000, 1 << 20, |n| 52 + n)
                .expect("replay");
        assert_eq!(all.len(), 100);
        // After a crash the index is rebuilt from the log.
        let r = r.crash_and_reopen(opts);
        let (got, _) =
            r.q.replay(a(2), from, 0, 1000, 1 << 20, |n| 52 + n)
                .expect("replay");
        assert_eq!(got.len(), 25);
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn acknowledged_packets_beyond_the_index_leave_the_quota_counters() {
        let d = dir("spill-count");
        let opts = QueueOptions {
            index_max: 4,
            ..QueueOptions::default()
        };
        let r = Rig::open(d.clone(), 4096, opts);
        for i in 0..20u64 {
            r.q.store(&[pkt(a(2), i, 50)]).expect("store");
        }
        let last = r.q.stats(a(2)).last_assigned;
        r.q.ack(a(2), last, &[]).expect("ack all");
        let s = r.q.stats(a(2));
        assert_eq!((s.queued_records, s.queued_bytes), (0, 0));
        r.cache.shutdown();
        let _ = std::fs::remove_dir_all(d);
    }

    fn lock_sparse(q: &PacketQueue) -> MutexGuard<'_, SparseIndex> {
        q.sparse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

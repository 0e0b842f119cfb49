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
//!
//! This file holds the queue's types, state and opening; by concept: `record.rs` (the
//! record codec), `index.rs` (what is kept in memory: node indexes, the sparse REPLAY
//! index, wake-ups), `dedup.rs` (the duplicate index, as runs of ids), `log.rs` (recovery, appending, making room, retention) and
//! `delivery.rs` (RECEIVE and REPLAY). The byte layout is in docs/design.md.

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
/// Records [`PacketQueue::expire`] judges per hold of the queue's lock (each is read):
/// about a millisecond's work for 1 KiB packets.
const RELEASE_CHUNK: usize = 1024;
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
    /// (sender, packet id) of stored packets -> (outcome, sequence number). An id is a
    /// duplicate while its packet is stored and for `dedup_hold` after the tail released
    /// its record (and while among the last `dedup_window` stored).
    dedup: DedupIndex,
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
    /// How long a released packet's id is still taken for a retry (within
    /// `dedup_window`). Zero: an id is free as soon as its record is released.
    pub dedup_hold: Duration,
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
            dedup_hold: Duration::ZERO,
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
    dedup_hold: Duration,
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
            dedup_hold,
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
            dedup_hold,
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
                dedup: DedupIndex::new(dedup_window),
            }),
            wake: Wake::default(),
            sparse: Mutex::new(SparseIndex::new((blocks - 1) * bs, bs)),
            clock,
        };
        q.recover()?;
        Ok(Arc::new(q))
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

    /// Bytes used by the log (live records, acknowledged ones still retained included).
    pub fn used_bytes(&self) -> u64 {
        let g = lock_to_report(&self.inner);
        g.head - g.tail
    }
}

mod dedup;
mod delivery;
mod index;
mod log;
mod record;

use dedup::DedupIndex;
use index::*;
use record::*;

#[cfg(test)]
mod tests;

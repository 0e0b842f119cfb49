//! The packet API: send and receive network packets through an ftss target with its
//! vendor SCSI commands (`docs/vendor-commands.md`), over any [`Transport`].
//!
//! [`PacketClient`] maps one method to one command (or a short, bounded series of them)
//! and turns status and sense into [`Outcome`]s and [`Error`]s. [`Receiver`] builds a
//! loop on top that hands each record to the application once and acknowledges it after
//! the application has taken it.
//!
//! # Coalescing
//!
//! Concurrent [`PacketClient::send`] calls share SENDs: at most
//! [`DEFAULT_SENDS_IN_FLIGHT`] SENDs of a client are in flight at once, the packets of
//! callers that come meanwhile queue, and the next SEND carries all of them (up to 1024
//! packets or 16 MiB). The target stores each SEND with one group-committed msync, so 32
//! tasks each sending one packet at a time cost a few SENDs in flight of ~8 packets rather
//! than 32 one-packet SENDs. There is no timer: a call that finds a slot free and nobody
//! queued is sent at once, as before. Each caller gets its own packets' outcomes; a SEND
//! refused or lost is every one of its callers' error.
//!
//! # Retrying a SEND
//!
//! A SEND whose connection fails may or may not have been stored. The target stores a
//! packet id of a sending node once while the packet is stored and answers a repeat with
//! the first outcome, so the remedy is to reconnect and send the *same packets with the
//! same ids* again. [`PacketClient::send_with_retry`] does exactly that; by hand:
//!
//! ```no_run
//! # async fn demo(client: ftss_initiator::PacketClient<ftss_initiator::IscsiTransport>,
//! #     reconnect: impl Fn() -> ftss_initiator::IscsiTransport) -> Result<(), ftss_initiator::Error> {
//! use ftss_initiator::OutPacket;
//! let mut packets = vec![OutPacket::to("10.0.0.2".parse().expect("ip"), &b"hi"[..])];
//! client.assign_ids(&mut packets); // fix the ids before the first attempt
//! let outcomes = loop {
//!     match client.send(&packets).await {
//!         Err(e) if e.is_connection_error() => client.replace_transport(reconnect()),
//!         r => break r?,
//!     }
//! };
//! # Ok(()) }
//! ```
//!
//! [`Error::Busy`] (media full) means nothing was stored: retry later, same ids.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ftss_proto::sense::{key, Sense};
use ftss_proto::vendor::{
    self, AckCdb, AckList, AddressList, DeliveredRecord, DeliveryFlags, NodeAddr, NodeCdb,
    NodeInfo, NodeState, Outcome, QueueStats, RecordList, ReplayCdb, ReplayFrom, RouteList,
    SendCdb, SendList, SendRecord, SendResults, SendResultsCdb, SendStatus,
};

use crate::scsi::{CHECK_CONDITION, GOOD};
use crate::transport::Transport;
use crate::{Error, ScsiResult};

/// Data-in room for RECEIVE and REPLAY: at least one largest record (64 KiB) and enough
/// for a good batch of small ones, without a large allocation per poll.
pub const RECEIVE_ALLOC_LEN: u32 = 1 << 20;

/// Longest wait a RECEIVE asks the target for by default. It must stay below the
/// transport's command timeout (30 s for a default [`SessionConfig`](crate::SessionConfig)):
/// a RECEIVE that times out on our side may still complete on the target and move the
/// RECEIVE position past records we never saw.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(20);

/// Extra RECEIVE rounds one [`PacketClient::receive`] issues while the target reports
/// MORE: bounds the memory and time of one call; the rest waits for the next call.
const MORE_ROUNDS: usize = 8;

/// How often a command answered with UNIT ATTENTION (the first command of a new nexus
/// reports the reset) or with a data CRC error (nothing stored) is issued again.
const COMMAND_RETRIES: usize = 3;

/// Room for the routing table on the first try: 256 entries; a bigger table is read
/// again with the size the header reports.
const ROUTES_FIRST_ALLOC: u32 = (vendor::LIST_HEADER_LEN + 256 * vendor::ROUTE_ENTRY_LEN) as u32;

/// Where a packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// The node that registered this address.
    Node(IpAddr),
    /// Every available node but the sender.
    Broadcast,
}

/// One packet to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutPacket {
    /// Destination.
    pub dest: Destination,
    /// At most [`vendor::PAYLOAD_MAX`] bytes.
    pub payload: Bytes,
    /// Packet id; `None` lets the client assign the next one. Ids must be unique per
    /// sending node while the packet is stored: a reused id is not stored again.
    pub packet_id: Option<u64>,
}

impl OutPacket {
    /// A packet for the node with address `dest`.
    pub fn to(dest: IpAddr, payload: impl Into<Bytes>) -> Self {
        OutPacket {
            dest: Destination::Node(dest),
            payload: payload.into(),
            packet_id: None,
        }
    }

    /// A packet for every available node but the sender.
    pub fn broadcast(payload: impl Into<Bytes>) -> Self {
        OutPacket {
            dest: Destination::Broadcast,
            payload: payload.into(),
            packet_id: None,
        }
    }

    /// With packet id `id` instead of one the client assigns.
    #[must_use]
    pub fn with_id(mut self, id: u64) -> Self {
        self.packet_id = Some(id);
        self
    }
}

/// One packet as RECEIVE or REPLAY returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// Sequence number, per destination node, from 1.
    pub seq: u64,
    /// Sender (for a delivery failure notice: the destination that failed).
    pub source: IpAddr,
    /// Broadcast, from the external port, failure notice.
    pub flags: DeliveryFlags,
    /// The sender's packet id.
    pub packet_id: u64,
    /// When the target stored it, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The payload.
    pub payload: Bytes,
}

impl Delivered {
    /// When the target stored it.
    #[must_use]
    pub fn timestamp(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.timestamp_ms)
    }

    /// For a delivery failure notice, why the packet `packet_id` this node sent to
    /// `source` was not delivered; `None` for an ordinary packet.
    #[must_use]
    pub fn failure_notice(&self) -> Option<Outcome> {
        if !self.flags.failure_notice {
            return None;
        }
        match self.payload.as_ref() {
            [code, 0, 0, 0] => Outcome::from_code(*code),
            _ => None,
        }
    }
}

impl From<DeliveredRecord> for Delivered {
    fn from(r: DeliveredRecord) -> Self {
        Delivered {
            seq: r.seq,
            source: r.source.ip(),
            flags: r.flags,
            packet_id: r.packet_id,
            timestamp_ms: r.timestamp_ms,
            payload: Bytes::from(r.payload),
        }
    }
}

mod send;
use send::*;
pub use send::{SendStats, DEFAULT_SENDS_IN_FLIGHT};

/// Sends and receives packets over a [`Transport`]. Every method takes `&self`; share
/// the client with `Arc` to send from many tasks at once over one session: concurrent
/// [`PacketClient::send`] calls are coalesced into shared SENDs (see there).
///
/// One nexus keeps the per-packet results of its *last* SEND only, so use one
/// `PacketClient` per session: concurrent SENDs of one client coordinate so that a mixed
/// batch still gets its results, SENDs of two clients on one session do not.
pub struct PacketClient<T> {
    core: Arc<Core<T>>,
    next_packet_id: AtomicU64,
    max_wait: Duration,
    alloc_len: u32,
}

impl<T: Transport> PacketClient<T> {
    /// A client on `transport`. Packet ids start at the current time in nanoseconds since
    /// the Unix epoch so that a restarted client does not reuse the ids of packets still
    /// stored (a reused id would be silently taken for a retry).
    pub fn new(transport: T) -> Self {
        let first_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1)
            .max(1);
        PacketClient {
            core: Arc::new(Core {
                transport: RwLock::new(Arc::new(transport)),
                next_tag: AtomicU64::new(1),
                send_gate: tokio::sync::RwLock::new(()),
                queue: Mutex::new(SendQueue {
                    waiting: std::collections::VecDeque::new(),
                    tasks: 0,
                    max_tasks: DEFAULT_SENDS_IN_FLIGHT,
                }),
                sends: AtomicU64::new(0),
                packets_sent: AtomicU64::new(0),
                send_results: AtomicU64::new(0),
            }),
            next_packet_id: AtomicU64::new(first_id),
            max_wait: DEFAULT_MAX_WAIT,
            alloc_len: RECEIVE_ALLOC_LEN,
        }
    }

    /// The next packet id the client assigns will be `id` (and then `id + 1`, ...).
    #[must_use]
    pub fn with_first_packet_id(self, id: u64) -> Self {
        self.next_packet_id.store(id, Ordering::Relaxed);
        self
    }

    /// Caps the wait of one RECEIVE; keep it below the transport's command timeout.
    #[must_use]
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Keeps at most `n` SENDs in flight at once (at least 1; default
    /// [`DEFAULT_SENDS_IN_FLIGHT`]); concurrent sends beyond them are coalesced.
    #[must_use]
    pub fn with_sends_in_flight(self, n: usize) -> Self {
        self.core.queue().max_tasks = n.max(1);
        self
    }

    /// Data-in room of each RECEIVE and REPLAY (at least one largest record, 65600
    /// bytes, is enforced).
    #[must_use]
    pub fn with_alloc_len(mut self, alloc_len: u32) -> Self {
        let least = (vendor::RECORD_LIST_HEADER_LEN
            + vendor::DELIVERED_HEADER_LEN
            + vendor::PAYLOAD_MAX
            + 1) as u32;
        self.alloc_len = alloc_len.max(least);
        self
    }

    /// The transport in use now.
    #[must_use]
    pub fn transport(&self) -> Arc<T> {
        self.core.transport()
    }

    /// Uses `transport` from now on (after a reconnect). Commands already running finish
    /// on the old one. Tags and packet ids carry on, so a retry keeps its ids.
    pub fn replace_transport(&self, transport: T) {
        *self
            .core
            .transport
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(transport);
    }

    /// Gives every packet without an id the next one, in order.
    pub fn assign_ids(&self, packets: &mut [OutPacket]) {
        for p in packets.iter_mut().filter(|p| p.packet_id.is_none()) {
            p.packet_id = Some(self.next_packet_id.fetch_add(1, Ordering::Relaxed));
        }
    }

    /// SEND and SEND RESULTS commands this client issued so far, and the packets they
    /// carried: packets per SEND shows how far concurrent sends were coalesced.
    #[must_use]
    pub fn send_stats(&self) -> SendStats {
        SendStats {
            sends: self.core.sends.load(Ordering::Relaxed),
            packets: self.core.packets_sent.load(Ordering::Relaxed),
            send_results: self.core.send_results.load(Ordering::Relaxed),
        }
    }

    /// Runs a command, repeating it on UNIT ATTENTION and on a data CRC error.
    async fn run(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        self.core.run(cdb, data_out, data_in_len).await
    }

    /// Runs a command that must complete with GOOD.
    async fn run_good(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        let r = self.run(cdb, data_out, data_in_len).await?;
        check_good(&r)?;
        Ok(r)
    }
}

impl<T: Transport + 'static> PacketClient<T> {
    // -----------------------------------------------------------------------------------
    // SEND

    /// Sends `packets` and returns one outcome per packet, in order. Packets without an
    /// id get the next ones (call [`PacketClient::assign_ids`] first to know them). More
    /// than one SEND's worth (1024 packets or 16 MiB) goes out as several SENDs in order;
    /// if one fails, the earlier ones stayed sent (a retry with the same ids is safe).
    ///
    /// Concurrent calls on one client are coalesced: while the maximum of SENDs is in
    /// flight ([`PacketClient::with_sends_in_flight`]), the packets of every caller that
    /// comes wait, and the next SEND carries all of them (up to one SEND's worth). A call
    /// that finds a SEND slot free and nobody queued is sent at once; nothing waits for a
    /// timer. A shared SEND runs in a task of its own: dropping this future before its
    /// packets were taken sends nothing of them, dropping it later leaves their outcome
    /// unknown but does not disturb the other callers in that SEND. (Outside a tokio
    /// runtime every call sends alone.)
    ///
    /// Errors: [`Error::Busy`] when the media is full (nothing of that SEND stored),
    /// [`Error::ScsiStatus`] for any other refusal (nothing stored), connection errors
    /// ([`Error::is_connection_error`]) when the outcome is unknown. A SEND succeeds or
    /// fails as a whole, so every caller whose packets it carried gets its error.
    pub async fn send(&self, packets: &[OutPacket]) -> Result<Vec<Outcome>, Error> {
        let mut packets = packets.to_vec();
        self.assign_ids(&mut packets);
        let records = packets
            .iter()
            .map(to_record)
            .collect::<Result<Vec<_>, _>>()?;
        let mut outcomes = Vec::with_capacity(records.len());
        // One SEND's worth at a time, each after the one before it was answered: a
        // caller's packets go in order even when coalesced with other callers'.
        for batch in batches(records) {
            outcomes.extend(self.core.submit(batch).await?);
        }
        Ok(outcomes)
    }

    /// Sends one packet and returns its outcome. `broadcast` ignores `dest`.
    pub async fn send_one(
        &self,
        dest: IpAddr,
        payload: impl Into<Bytes>,
        broadcast: bool,
    ) -> Result<Outcome, Error> {
        let p = if broadcast {
            OutPacket::broadcast(payload)
        } else {
            OutPacket::to(dest, payload)
        };
        let o = self.send(&[p]).await?;
        o.first()
            .copied()
            .ok_or_else(|| Error::Protocol("SEND of one packet returned no outcome".into()))
    }

    /// [`PacketClient::send`], retried after connection errors: fixes the packet ids
    /// first, then on a connection error calls `reconnect` for a new transport and sends
    /// the same packets again (the target does not store an id twice), up to `attempts`
    /// times in all. [`Error::Busy`] and refusals are returned, not retried.
    pub async fn send_with_retry<F, Fut>(
        &self,
        packets: &[OutPacket],
        attempts: usize,
        reconnect: F,
    ) -> Result<Vec<Outcome>, Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut packets = packets.to_vec();
        self.assign_ids(&mut packets);
        let mut attempt = 1;
        loop {
            let err = match self.send(&packets).await {
                Err(e) if e.is_connection_error() => e,
                r => return r,
            };
            // Reconnect until it works or the attempts run out; each try counts.
            loop {
                if attempt >= attempts.max(1) {
                    return Err(err);
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                match reconnect().await {
                    Ok(t) => {
                        self.replace_transport(t);
                        break;
                    }
                    Err(e) if e.is_connection_error() => {
                        tracing::debug!("reconnect failed: {e}");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl<T: Transport> PacketClient<T> {
    // -----------------------------------------------------------------------------------
    // RECEIVE, ACK, REPLAY

    /// Takes the records queued for this node, oldest first: at most `max_records`
    /// (0 = as many as fit). With `wait`, the target holds the command until a first
    /// record arrives or the wait (capped at the client's maximum, in 100 ms steps) runs
    /// out; an empty result is not an error. While the target reports MORE, a few more
    /// RECEIVEs (without waiting) follow. Records stay stored until acknowledged.
    pub async fn receive(
        &self,
        max_records: u32,
        wait: Option<Duration>,
    ) -> Result<Vec<Delivered>, Error> {
        let mut out: Vec<Delivered> = Vec::new();
        let mut wait = wait.map(|w| timeout_units(w.min(self.max_wait)));
        for _ in 0..=MORE_ROUNDS {
            let left = if max_records == 0 {
                0
            } else {
                max_records.saturating_sub(out.len() as u32)
            };
            let cdb = vendor::ReceiveCdb {
                wait: wait.is_some(),
                max_records: left,
                alloc_len: self.alloc_len,
                timeout: wait.unwrap_or(0),
            }
            .encode();
            let r = self.run_good(&cdb, None, self.alloc_len).await?;
            let list = RecordList::decode(&r.data_in)?;
            if list.more && list.records.is_empty() {
                return Err(Error::Protocol(format!(
                    "RECEIVE returned no record in {} bytes but reports more",
                    self.alloc_len
                )));
            }
            out.extend(list.records.into_iter().map(Delivered::from));
            let full = max_records != 0 && out.len() as u32 >= max_records;
            if !list.more || full {
                break;
            }
            // Records are queued: take them now rather than waiting again.
            wait = None;
        }
        Ok(out)
    }

    /// Acknowledges every record up to and including `seq` (0 does nothing).
    pub async fn ack_upto(&self, seq: u64) -> Result<(), Error> {
        if seq == 0 {
            return Ok(());
        }
        self.run_good(&AckCdb::UpTo(seq).encode(), None, 0).await?;
        Ok(())
    }

    /// Acknowledges the records with these sequence numbers (in ACKs of at most 1024).
    pub async fn ack_list(&self, seqs: &[u64]) -> Result<(), Error> {
        for chunk in seqs.chunks(vendor::ACK_LIST_MAX) {
            let data = AckList {
                seqs: chunk.to_vec(),
            }
            .encode();
            let cdb = AckCdb::List {
                param_len: data.len() as u32,
            }
            .encode();
            self.run_good(&cdb, Some(Bytes::from(data)), 0).await?;
        }
        Ok(())
    }

    /// One REPLAY: the records still stored from `from` that fit one response, and
    /// whether more follow. Does not move the RECEIVE position.
    pub async fn replay_page(&self, from: ReplayFrom) -> Result<(Vec<Delivered>, bool), Error> {
        let cdb = ReplayCdb {
            from,
            alloc_len: self.alloc_len,
        }
        .encode();
        let r = self.run_good(&cdb, None, self.alloc_len).await?;
        let list = RecordList::decode(&r.data_in)?;
        if list.more && list.records.is_empty() {
            return Err(Error::Protocol(format!(
                "REPLAY returned no record in {} bytes but reports more",
                self.alloc_len
            )));
        }
        let records = list.records.into_iter().map(Delivered::from).collect();
        Ok((records, list.more))
    }

    /// Every record still stored from `from` on, in as many REPLAYs as it takes.
    pub async fn replay(&self, from: ReplayFrom) -> Result<Vec<Delivered>, Error> {
        let mut out: Vec<Delivered> = Vec::new();
        let mut from = from;
        loop {
            let (page, more) = self.replay_page(from).await?;
            let Some(last) = page.last().map(|d| d.seq) else {
                break;
            };
            out.extend(page);
            if !more {
                break;
            }
            // Sequence numbers follow storage order, so "after the last one" continues a
            // replay by time as well.
            from = ReplayFrom::Seq(last.saturating_add(1));
        }
        Ok(out)
    }

    /// Every record still stored with a sequence number of `seq` or more.
    pub async fn replay_from_seq(&self, seq: u64) -> Result<Vec<Delivered>, Error> {
        self.replay(ReplayFrom::Seq(seq)).await
    }

    /// Every record still stored that was stored at or after `since`.
    pub async fn replay_from_time(&self, since: SystemTime) -> Result<Vec<Delivered>, Error> {
        let ms = since
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.replay(ReplayFrom::Time(ms)).await
    }

    // -----------------------------------------------------------------------------------
    // NODE

    /// Registers `addrs` as this node's addresses (replacing any earlier ones).
    pub async fn register(&self, addrs: &[IpAddr]) -> Result<(), Error> {
        if addrs.len() > vendor::ADDRESSES_MAX {
            return Err(Error::InvalidArgument(format!(
                "{} addresses, at most {}",
                addrs.len(),
                vendor::ADDRESSES_MAX
            )));
        }
        if addrs.iter().any(|a| NodeAddr::from(*a).is_unspecified()) {
            return Err(Error::InvalidArgument("address :: names no node".into()));
        }
        let data = AddressList {
            addrs: addrs.iter().copied().map(NodeAddr::from).collect(),
        }
        .encode();
        let cdb = NodeCdb::Register {
            param_len: data.len() as u32,
        }
        .encode();
        self.run_good(&cdb, Some(Bytes::from(data)), 0).await?;
        Ok(())
    }

    /// Puts this node in maintenance (packets to it are refused) or makes it available.
    pub async fn set_state(&self, state: NodeState) -> Result<(), Error> {
        self.run_good(&NodeCdb::SetState(state).encode(), None, 0)
            .await?;
        Ok(())
    }

    /// This node's state and addresses.
    pub async fn query(&self) -> Result<NodeInfo, Error> {
        let alloc = vendor::REGISTER_LIST_MAX;
        let r = self
            .run_good(&NodeCdb::Query { alloc_len: alloc }.encode(), None, alloc)
            .await?;
        Ok(NodeInfo::decode(&r.data_in)?)
    }

    /// The target's routing table, whole.
    pub async fn routing_table(&self) -> Result<RouteList, Error> {
        let mut alloc = ROUTES_FIRST_ALLOC;
        loop {
            let cdb = NodeCdb::RoutingTable { alloc_len: alloc }.encode();
            let r = self.run_good(&cdb, None, alloc).await?;
            let table = RouteList::decode(&r.data_in)?;
            let need = (vendor::LIST_HEADER_LEN
                + vendor::ROUTE_ENTRY_LEN * usize::from(table.total)) as u32;
            // Entries may come and go between the two reads: only grow, never loop back.
            if table.entries.len() >= usize::from(table.total) || need <= alloc {
                return Ok(table);
            }
            alloc = need;
        }
    }

    /// This node's receive queue: records and bytes queued, sequence numbers, capacity.
    pub async fn queue_stats(&self) -> Result<QueueStats, Error> {
        let alloc = vendor::QUEUE_STATS_LEN as u32;
        let r = self
            .run_good(
                &NodeCdb::QueueStats { alloc_len: alloc }.encode(),
                None,
                alloc,
            )
            .await?;
        Ok(QueueStats::decode(&r.data_in)?)
    }
}

/// Key, ASC and ASCQ of a completion, from the raw sense (either format) or, for a
/// transport that only decodes it, from [`ScsiResult::sense`].
fn sense_code(r: &ScsiResult) -> Option<(u8, u8, u8)> {
    Sense::parse(&r.sense_data).or_else(|| r.sense.map(|s| (s.key, s.asc, s.ascq)))
}

/// The error for a completion other than GOOD.
fn status_error(r: &ScsiResult) -> Error {
    match r.status {
        vendor::status::BUSY | vendor::status::TASK_SET_FULL => Error::Busy,
        status => Error::ScsiStatus {
            status,
            sense: r
                .sense
                .or_else(|| sense_code(r).map(|(k, a, q)| Sense::new(k, a, q))),
        },
    }
}

fn check_good(r: &ScsiResult) -> Result<(), Error> {
    if r.status == GOOD {
        Ok(())
    } else {
        Err(status_error(r))
    }
}

/// A wait in the RECEIVE TIMEOUT's 100 ms units, rounded up so that a short wait still
/// waits.
fn timeout_units(w: Duration) -> u16 {
    u16::try_from(w.as_millis().div_ceil(100)).unwrap_or(u16::MAX)
}

fn backoff(attempt: usize) -> Duration {
    Duration::from_millis(100 << attempt.min(5))
}

fn to_record(p: &OutPacket) -> Result<SendRecord, Error> {
    if p.payload.len() > vendor::PAYLOAD_MAX {
        return Err(Error::InvalidArgument(format!(
            "payload of {} bytes, at most {}",
            p.payload.len(),
            vendor::PAYLOAD_MAX
        )));
    }
    let (dest, broadcast) = match p.dest {
        Destination::Broadcast => (NodeAddr::UNSPECIFIED, true),
        Destination::Node(ip) => {
            let a = NodeAddr::from(ip);
            if a.is_unspecified() {
                return Err(Error::InvalidArgument(
                    "destination :: names no node".into(),
                ));
            }
            (a, false)
        }
    };
    let packet_id = p
        .packet_id
        .ok_or_else(|| Error::InvalidArgument("packet without an id".into()))?;
    Ok(SendRecord {
        dest,
        broadcast,
        packet_id,
        payload: p.payload.to_vec(),
    })
}

/// Splits records into SEND-sized batches: at most 1024 records and 16 MiB of list each.
fn batches(records: Vec<SendRecord>) -> Vec<Vec<SendRecord>> {
    let mut out = Vec::new();
    let mut cur: Vec<SendRecord> = Vec::new();
    let mut len = vendor::SEND_HEADER_LEN;
    for r in records {
        let n = r.encoded_len();
        if !cur.is_empty()
            && (cur.len() >= vendor::SEND_RECORDS_MAX || len + n > vendor::PARAM_LIST_MAX as usize)
        {
            out.push(std::mem::take(&mut cur));
            len = vendor::SEND_HEADER_LEN;
        }
        len += n;
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

mod receiver;
pub use receiver::Receiver;

#[cfg(test)]
mod tests;

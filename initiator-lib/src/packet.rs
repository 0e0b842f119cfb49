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

/// What a SEND attempt ended with, before errors.
enum Sent {
    /// One outcome per packet, in order.
    Outcomes(Vec<Outcome>),
    /// The batch was MIXED but another SEND on this nexus replaced its results before we
    /// asked for them.
    ResultsLost,
}

/// SEND commands one client keeps in flight at once by default. Concurrent
/// [`PacketClient::send`] calls beyond it wait in a queue, and the next SEND takes all of
/// them: 32 callers sending one packet at a time make ~6 packets per SEND (`ftss bench`)
/// instead of 32 one-packet SENDs. More than one in flight keeps the target busy while a
/// SEND's answer travels back and the next list is built; a few are enough for that.
pub const DEFAULT_SENDS_IN_FLIGHT: usize = 4;

/// What the SENDs of one [`PacketClient`] have done so far ([`PacketClient::send_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// SEND commands issued, repeats (after a lost SEND RESULTS) included.
    pub sends: u64,
    /// Packets those SENDs carried (a repeated SEND counts its packets again).
    pub packets: u64,
    /// SEND RESULTS commands issued (for SENDs whose packets had different outcomes).
    pub send_results: u64,
}

/// One caller's packets waiting for a SEND (at most one SEND's worth: [`batches`]).
struct Queued {
    records: Vec<SendRecord>,
    /// Encoded length of `records` in a SEND list.
    len: usize,
    /// Where the outcomes of `records` (or the SEND's error) go.
    reply: Reply,
}

/// Packets of concurrent callers waiting for a SEND, and the SEND tasks running.
struct SendQueue {
    waiting: std::collections::VecDeque<Queued>,
    /// SEND slots taken: SEND tasks running ([`Core::flush`], each sends until `waiting`
    /// is empty) and callers sending alone ([`Slot`]).
    tasks: usize,
    /// Most slots at once, so most SENDs in flight.
    max_tasks: usize,
}

/// Takes the callers for the next SEND from the front of the queue: as many as fit in one
/// SEND (1024 packets, 16 MiB of list), in queue order. A caller that went away (its
/// future dropped) before its packets were sent is dropped from the queue unsent: it can
/// no longer learn the outcome, and sending nothing is what dropping a send before its
/// SEND always meant.
fn take_batch(q: &mut SendQueue) -> Vec<Queued> {
    let mut out: Vec<Queued> = Vec::new();
    let mut records = 0;
    let mut len = vendor::SEND_HEADER_LEN;
    while let Some(next) = q.waiting.front() {
        if next.reply.is_closed() {
            q.waiting.pop_front();
            continue;
        }
        // Every entry fits one SEND alone ([`batches`]), so the first is always taken.
        let full = records + next.records.len() > vendor::SEND_RECORDS_MAX
            || len + next.len > vendor::PARAM_LIST_MAX as usize;
        if !out.is_empty() && full {
            break;
        }
        let Some(next) = q.waiting.pop_front() else {
            break;
        };
        records += next.records.len();
        len += next.len;
        out.push(next);
    }
    out
}

/// Hands each caller of one SEND its share: its packets' outcomes in its order, or the
/// SEND's error (the SEND succeeded or failed as a whole, so it is every caller's).
fn answer(batch: Vec<(usize, Reply)>, result: Result<Vec<Outcome>, Error>) {
    let outcomes = match result {
        Ok(o) if o.len() == batch.iter().map(|(n, _)| n).sum::<usize>() => o,
        Ok(o) => {
            // send_batch returns one outcome per packet; never trust that blindly.
            let e = Error::Protocol(format!(
                "{} outcomes for a SEND of {} packets",
                o.len(),
                batch.iter().map(|(n, _)| n).sum::<usize>()
            ));
            return answer_error(batch, &e);
        }
        Err(e) => return answer_error(batch, &e),
    };
    let mut rest = outcomes.into_iter();
    for (n, reply) in batch {
        // A caller that went away while its SEND was in flight just misses its answer.
        let _ = reply.send(Ok(rest.by_ref().take(n).collect()));
    }
}

fn answer_error(batch: Vec<(usize, Reply)>, e: &Error) {
    for (_, reply) in batch {
        let _ = reply.send(Err(e.duplicate()));
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<Outcome>, Error>>;

/// What SENDs need of a client, shared with the tasks that run them: a SEND runs in a task
/// of its own so that a caller that goes away (its future dropped) cannot take the answer
/// of the other callers in that SEND with it.
struct Core<T> {
    transport: RwLock<Arc<T>>,
    next_tag: AtomicU64,
    /// SENDs hold it shared; a SEND whose results another SEND replaced is repeated
    /// holding it exclusively, so that nothing can come between its SEND and SEND RESULTS.
    send_gate: tokio::sync::RwLock<()>,
    queue: Mutex<SendQueue>,
    sends: AtomicU64,
    packets_sent: AtomicU64,
    send_results: AtomicU64,
}

impl<T: Transport> Core<T> {
    fn transport(&self) -> Arc<T> {
        // A panic elsewhere while holding the lock cannot leave an Arc half-written.
        Arc::clone(&self.transport.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, SendQueue> {
        // Every change to the queue is a push or a pop: a panic cannot leave it torn.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a command, repeating it on UNIT ATTENTION and on a data CRC error: both mean
    /// the command did nothing, and the first command of every new nexus gets the former.
    async fn run(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        let t = self.transport();
        let mut tries = 0;
        loop {
            let r = t.execute(cdb, data_out.clone(), data_in_len).await?;
            let again = r.status == CHECK_CONDITION
                && matches!(sense_code(&r), Some((k, a, q))
                    if k == key::UNIT_ATTENTION
                        || (k == key::ABORTED_COMMAND && (a, q) == vendor::asc::DATA_PHASE_CRC));
            if !again || tries >= COMMAND_RETRIES {
                return Ok(r);
            }
            tries += 1;
        }
    }

    async fn send_batch(&self, records: Vec<SendRecord>) -> Result<Vec<Outcome>, Error> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = records.iter().map(|r| r.packet_id).collect();
        let data = Bytes::from(SendList { records }.encode());
        {
            let _shared = self.send_gate.read().await;
            if let Sent::Outcomes(o) = self.send_once(&data, &ids).await? {
                return Ok(o);
            }
        }
        // Repeating the SEND is safe (same ids: stored packets keep their outcome) and,
        // alone on the nexus, its results stay until we read them.
        tracing::debug!("SEND RESULTS replaced by a concurrent SEND; repeating the batch");
        let _exclusive = self.send_gate.write().await;
        match self.send_once(&data, &ids).await? {
            Sent::Outcomes(o) => Ok(o),
            Sent::ResultsLost => Err(Error::Protocol(
                "SEND RESULTS refused the tag of the SEND just made".into(),
            )),
        }
    }

    async fn send_once(&self, data: &Bytes, ids: &[u64]) -> Result<Sent, Error> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let param_len = u32::try_from(data.len())
            .map_err(|_| Error::InvalidArgument("SEND list above 4 GiB".into()))?;
        let cdb = SendCdb {
            batch_tag: tag,
            param_len,
        }
        .encode();
        self.sends.fetch_add(1, Ordering::Relaxed);
        self.packets_sent
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        let r = self.run(&cdb, Some(data.clone()), 0).await?;
        match SendStatus::from_reply(r.status, &r.sense_data) {
            Some(SendStatus::All(o)) => Ok(Sent::Outcomes(vec![o; ids.len()])),
            Some(SendStatus::MediaFull) => Err(Error::Busy),
            Some(SendStatus::Mixed) => self.send_results(tag, ids).await,
            None => Err(status_error(&r)),
        }
    }

    async fn send_results(&self, tag: u64, ids: &[u64]) -> Result<Sent, Error> {
        let alloc = vendor::RESULTS_HEADER_LEN + vendor::RESULT_ENTRY_LEN * ids.len();
        let cdb = SendResultsCdb {
            batch_tag: tag,
            alloc_len: alloc as u32,
        }
        .encode();
        self.send_results.fetch_add(1, Ordering::Relaxed);
        let r = self.run(&cdb, None, alloc as u32).await?;
        // The target refuses a tag that is not the nexus's last SEND: INVALID FIELD IN CDB.
        if r.status == CHECK_CONDITION
            && matches!(sense_code(&r), Some((key::ILLEGAL_REQUEST, 0x24, 0)))
        {
            return Ok(Sent::ResultsLost);
        }
        check_good(&r)?;
        let res = SendResults::decode(&r.data_in)?;
        if res.batch_tag != tag {
            return Ok(Sent::ResultsLost);
        }
        let same_ids = res.results.len() == ids.len()
            && res
                .results
                .iter()
                .zip(ids)
                .all(|(p, id)| p.packet_id == *id);
        if !same_ids {
            return Err(Error::Protocol(format!(
                "SEND RESULTS for tag {tag}: {} entries that do not match the {} packets sent",
                res.results.len(),
                ids.len()
            )));
        }
        Ok(Sent::Outcomes(
            res.results.into_iter().map(|p| p.outcome).collect(),
        ))
    }
}

impl<T: Transport + 'static> Core<T> {
    /// Sends one caller's packets (at most one SEND's worth) and waits for their
    /// outcomes. With a SEND slot free and nobody waiting, they go at once as a SEND of
    /// their own; otherwise they queue, and a SEND task takes them with the others queued
    /// (starting one when fewer than the maximum run).
    async fn submit(self: &Arc<Self>, records: Vec<SendRecord>) -> Result<Vec<Outcome>, Error> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No tokio runtime to run SEND tasks on (another executor): send alone, as
            // before coalescing, rather than panic in spawn.
            return self.send_batch(records).await;
        };
        let path = {
            let mut q = self.queue();
            let free = q.tasks < q.max_tasks;
            if free {
                q.tasks += 1;
            }
            if free && q.waiting.is_empty() {
                Path::Alone(records)
            } else {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let len = records.iter().map(SendRecord::encoded_len).sum();
                q.waiting.push_back(Queued {
                    records,
                    len,
                    reply,
                });
                if free {
                    Path::Task(answer)
                } else {
                    Path::Queued(answer)
                }
            }
        };
        match path {
            Path::Alone(records) => {
                // On the caller's own task, not a SEND task: a lone sender pays no hop
                // to another task and back (its latency is the SEND's). Its SEND carries
                // only its packets, so dropping this future loses no one else's answer;
                // the slot hands the queue to a SEND task when it ends, however it ends.
                let _slot = Slot {
                    core: Arc::clone(self),
                };
                return self.send_batch(records).await;
            }
            // No delay and no batching window: callers that come while SENDs are in
            // flight make up the next one.
            Path::Task(answer) => {
                drop(rt.spawn(Arc::clone(self).flush()));
                wait_answer(answer).await
            }
            Path::Queued(answer) => wait_answer(answer).await,
        }
    }

    /// A SEND task: sends what is queued, answers its callers, and goes on until the
    /// queue is empty. Its slot (counted in `tasks` by whoever made it) is guarded from
    /// here on, before the task first runs: a task dropped unpolled gives it back too.
    fn flush(self: Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let mut guard = TaskGuard {
            core: Arc::clone(&self),
            done: false,
        };
        async move { self.flush_loop(&mut guard).await }
    }

    async fn flush_loop(&self, guard: &mut TaskGuard<T>) {
        loop {
            let batch = {
                let mut q = self.queue();
                let batch = take_batch(&mut q);
                if batch.is_empty() {
                    // Under the lock that a caller queues under: a caller either sees this
                    // task still counted and is taken by it, or sees it gone and starts one.
                    q.tasks -= 1;
                    guard.done = true;
                    return;
                }
                batch
            };
            let mut records = Vec::new();
            let mut replies = Vec::with_capacity(batch.len());
            for q in batch {
                replies.push((q.records.len(), q.reply));
                records.extend(q.records);
            }
            let result = self.send_batch(records).await;
            answer(replies, result);
        }
    }
}

/// How [`Core::submit`] sends a caller's packets.
enum Path {
    /// In a SEND of their own, from the caller's task.
    Alone(Vec<SendRecord>),
    /// Queued, with a new SEND task started; the answer comes here.
    Task(Answer),
    /// Queued for a SEND task already running; the answer comes here.
    Queued(Answer),
}

type Answer = tokio::sync::oneshot::Receiver<Result<Vec<Outcome>, Error>>;

async fn wait_answer(answer: Answer) -> Result<Vec<Outcome>, Error> {
    // The sender is dropped unanswered only if the SEND task died (a panic, or the
    // runtime shutting down) with the packets taken: they may or may not have been sent,
    // which is what a connection error means to the caller (retry with the same ids).
    answer.await.unwrap_or(Err(Error::ConnectionClosed))
}

/// The SEND slot of a caller sending alone ([`Path::Alone`]). When its SEND ends (or the
/// caller goes away), callers that queued meanwhile would wait for a SEND task that may
/// not exist (they queued because the slots were taken): a new one takes over the slot.
struct Slot<T: Transport + 'static> {
    core: Arc<Core<T>>,
}

impl<T: Transport + 'static> Drop for Slot<T> {
    fn drop(&mut self) {
        {
            let mut q = self.core.queue();
            if q.waiting.is_empty() {
                q.tasks = q.tasks.saturating_sub(1);
                return;
            }
        }
        // The slot stays counted: it is the new task's. Spawned without the queue's lock:
        // a runtime shutting down drops the task at once, and its guard takes the lock.
        let task = Arc::clone(&self.core).flush();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(task)),
            // Dropped outside a runtime: no task can send them. Dropping the task's
            // guard gives the slot back and, if it was the last, fails the waiting
            // callers rather than leave them waiting forever.
            Err(_) => drop(task),
        }
    }
}

/// Keeps the count of SEND tasks right when one ends without emptying the queue (a panic,
/// or the runtime dropping it): the last one to go drops the waiting callers, whose
/// answers then fail (rather than wait forever for a task that is gone).
struct TaskGuard<T> {
    core: Arc<Core<T>>,
    done: bool,
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut q = self.core.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.tasks = q.tasks.saturating_sub(1);
        if q.tasks == 0 {
            q.waiting.clear();
        }
    }
}

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

// ---------------------------------------------------------------------------------------
// Receiver

/// Long-polls a [`PacketClient`] and hands each record to the application once.
///
/// The target keeps records until they are acknowledged and a new nexus starts at the
/// first unacknowledged one, so after a reconnect records come again. The receiver
/// remembers the highest sequence number it handed out and drops anything at or below
/// it. It acknowledges records when the application asks for the next batch (or calls
/// [`Receiver::ack`]), i.e. after the application has taken them: a crash of the
/// application in between gets them again from the target (at least once across crashes,
/// exactly once within the process; persist [`Receiver::last_seq`] and resume with
/// [`Receiver::starting_after`] to stretch that across restarts).
///
/// After a connection error the receive position on the target may have moved past a
/// response that never arrived (a timed-out RECEIVE can still complete), so the next poll
/// first reads the records up to the target's position again with REPLAY.
pub struct Receiver<T> {
    client: Arc<PacketClient<T>>,
    wait: Duration,
    max_records: u32,
    /// Highest sequence number handed to the application.
    handed: u64,
    /// Highest sequence number the target has (as far as we know) acknowledged.
    acked: u64,
    /// The last receive failed: catch up with REPLAY before the next RECEIVE.
    resync: bool,
}

impl<T: Transport> Receiver<T> {
    /// A receiver on `client` that waits up to the client's maximum per poll.
    #[must_use]
    pub fn new(client: Arc<PacketClient<T>>) -> Self {
        Receiver {
            wait: client.max_wait,
            client,
            max_records: 0,
            handed: 0,
            acked: 0,
            resync: false,
        }
    }

    /// Waits up to `wait` per poll (the client caps it).
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Takes at most `n` records per poll (0 = as many as fit).
    #[must_use]
    pub fn with_max_records(mut self, n: u32) -> Self {
        self.max_records = n;
        self
    }

    /// Treats every record up to `seq` as already handed to the application (and
    /// acknowledges up to it on the first poll): resume where a previous run stopped.
    #[must_use]
    pub fn starting_after(mut self, seq: u64) -> Self {
        self.handed = seq;
        self
    }

    /// The client, e.g. to [`PacketClient::replace_transport`] after a reconnect.
    #[must_use]
    pub fn client(&self) -> &Arc<PacketClient<T>> {
        &self.client
    }

    /// Highest sequence number handed to the application (0 = none yet).
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.handed
    }

    /// Acknowledges everything handed out so far, if not done yet.
    pub async fn ack(&mut self) -> Result<(), Error> {
        if self.handed > self.acked {
            self.client.ack_upto(self.handed).await?;
            self.acked = self.handed;
        }
        Ok(())
    }

    /// One round: acknowledges what was handed out before, waits for records, returns
    /// the new ones (possibly none when the wait ran out or only repeats came).
    pub async fn poll(&mut self) -> Result<Vec<Delivered>, Error> {
        self.ack().await?;
        let got = if self.resync {
            self.catch_up().await
        } else {
            self.client.receive(self.max_records, Some(self.wait)).await
        };
        match got {
            Ok(records) => {
                self.resync = false;
                Ok(self.take_new(records))
            }
            Err(e) => {
                if e.is_connection_error() {
                    self.resync = true;
                }
                Err(e)
            }
        }
    }

    /// Polls until at least one new record comes.
    pub async fn next(&mut self) -> Result<Vec<Delivered>, Error> {
        loop {
            let r = self.poll().await?;
            if !r.is_empty() {
                return Ok(r);
            }
        }
    }

    /// The records after the last one handed out, up to the target's RECEIVE position.
    async fn catch_up(&self) -> Result<Vec<Delivered>, Error> {
        let upto = self.client.queue_stats().await?.last_delivered;
        let mut out = Vec::new();
        let mut next = self.handed.saturating_add(1);
        while next <= upto {
            let (page, more) = self.client.replay_page(ReplayFrom::Seq(next)).await?;
            let Some(last) = page.last().map(|d| d.seq) else {
                break;
            };
            out.extend(page.into_iter().filter(|d| d.seq <= upto));
            if !more {
                break;
            }
            next = last.saturating_add(1);
        }
        Ok(out)
    }

    /// Drops records already handed out and remembers the rest.
    fn take_new(&mut self, records: Vec<Delivered>) -> Vec<Delivered> {
        let mut fresh = Vec::with_capacity(records.len());
        for d in records {
            if d.seq <= self.handed {
                // Sent again: the target did not get (or keep) our ACK for it.
                self.acked = self.acked.min(d.seq.saturating_sub(1));
                continue;
            }
            self.handed = d.seq;
            fresh.push(d);
        }
        fresh
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use ftss_proto::pdu::Residual;
    use ftss_proto::sense::common;
    use ftss_proto::vendor::{op, PacketResult, ReceiveCdb, VendorCdb};

    /// One command as the mock saw it.
    #[derive(Clone, Debug)]
    struct Call {
        cdb: VendorCdb,
        data_out: Option<Bytes>,
        data_in_len: u32,
    }

    type Reply = Result<ScsiResult, Error>;

    /// Records every command (in a log shared by the mocks of one test, so a reconnect
    /// shows in one sequence) and answers with scripted replies in order.
    struct Mock {
        log: Arc<Mutex<Vec<Call>>>,
        replies: Mutex<VecDeque<Reply>>,
        /// When set, each command's answer waits for a permit: the test decides when a
        /// command in flight completes.
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Mock {
        fn new(log: &Arc<Mutex<Vec<Call>>>, replies: Vec<Reply>) -> Self {
            Mock {
                log: Arc::clone(log),
                replies: Mutex::new(replies.into()),
                gate: None,
            }
        }
    }

    impl Transport for Mock {
        fn execute(
            &self,
            cdb: &[u8],
            data_out: Option<Bytes>,
            data_in_len: u32,
        ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
            let cdb = VendorCdb::parse(cdb).expect("the client sends valid vendor CDBs");
            self.log.lock().unwrap().push(Call {
                cdb,
                data_out,
                data_in_len,
            });
            let r =
                self.replies.lock().unwrap().pop_front().unwrap_or_else(|| {
                    Err(Error::Protocol(format!("no reply scripted for {cdb:?}")))
                });
            let gate = self.gate.clone();
            async move {
                if let Some(g) = gate {
                    g.acquire().await.unwrap().forget();
                }
                r
            }
        }
    }

    fn log() -> Arc<Mutex<Vec<Call>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    fn calls(log: &Arc<Mutex<Vec<Call>>>) -> Vec<Call> {
        log.lock().unwrap().clone()
    }

    fn reply(status: u8, sense: Option<Sense>, data_in: Vec<u8>) -> Reply {
        Ok(ScsiResult {
            status,
            sense,
            sense_data: Bytes::from(sense.map(|s| s.fixed()).unwrap_or_default()),
            data_in: Bytes::from(data_in),
            residual: Residual::default(),
        })
    }

    fn good(data_in: Vec<u8>) -> Reply {
        reply(GOOD, None, data_in)
    }

    fn send_status(s: SendStatus) -> Reply {
        reply(s.status(), s.sense(), Vec::new())
    }

    fn check(sense: Sense) -> Reply {
        reply(CHECK_CONDITION, Some(sense), Vec::new())
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn record(seq: u64) -> DeliveredRecord {
        DeliveredRecord {
            seq,
            source: NodeAddr::from(ip(1)),
            flags: DeliveryFlags::default(),
            packet_id: 1000 + seq,
            timestamp_ms: 1_767_225_600_000,
            payload: format!("packet {seq}").into_bytes(),
        }
    }

    fn records(more: bool, seqs: &[u64]) -> Reply {
        good(
            RecordList {
                more,
                records: seqs.iter().map(|&s| record(s)).collect(),
            }
            .encode(),
        )
    }

    fn seqs(d: &[Delivered]) -> Vec<u64> {
        d.iter().map(|d| d.seq).collect()
    }

    fn client(log: &Arc<Mutex<Vec<Call>>>, replies: Vec<Reply>) -> PacketClient<Mock> {
        PacketClient::new(Mock::new(log, replies)).with_first_packet_id(100)
    }

    /// Tag and packet ids of a SEND call.
    fn sent(c: &Call) -> (u64, Vec<u64>) {
        let VendorCdb::Send(cdb) = c.cdb else {
            panic!("not a SEND: {c:?}");
        };
        let data = c.data_out.as_ref().expect("SEND data");
        assert_eq!(cdb.param_len as usize, data.len());
        let list = SendList::decode(data).expect("valid packet list");
        (
            cdb.batch_tag,
            list.records.iter().map(|r| r.packet_id).collect(),
        )
    }

    #[tokio::test]
    async fn tags_increase_and_ids_are_assigned_unless_given() {
        let log = log();
        let c = client(&log, vec![good(vec![]), good(vec![])]);
        let out = c
            .send(&[
                OutPacket::to(ip(2), &b"a"[..]),
                OutPacket::to(ip(3), &b"b"[..]).with_id(7),
                OutPacket::broadcast(&b"c"[..]),
            ])
            .await
            .unwrap();
        assert_eq!(out, vec![Outcome::Delivered; 3]);
        assert_eq!(
            c.send_one(ip(2), &b"d"[..], false).await.unwrap(),
            Outcome::Delivered
        );
        let calls = calls(&log);
        assert_eq!(sent(&calls[0]), (1, vec![100, 7, 101]));
        assert_eq!(sent(&calls[1]), (2, vec![102]));
        let list = SendList::decode(calls[0].data_out.as_ref().unwrap()).unwrap();
        assert_eq!(list.records[0].dest, NodeAddr::from(ip(2)));
        assert!(list.records[2].broadcast && list.records[2].dest.is_unspecified());
        assert_eq!(list.records[1].payload, b"b");
    }

    #[test]
    fn assign_ids_fills_only_missing_ones() {
        let c = client(&log(), vec![]);
        let mut p = vec![
            OutPacket::broadcast(&b""[..]).with_id(5),
            OutPacket::broadcast(&b""[..]),
        ];
        c.assign_ids(&mut p);
        c.assign_ids(&mut p);
        assert_eq!(p[0].packet_id, Some(5));
        assert_eq!(p[1].packet_id, Some(100));
    }

    #[test]
    fn fresh_clients_do_not_start_at_small_ids() {
        // Seeded from the clock, so a restart does not reuse ids of stored packets.
        let c = PacketClient::new(Mock::new(&log(), vec![]));
        let mut p = vec![OutPacket::broadcast(&b""[..])];
        c.assign_ids(&mut p);
        assert!(p[0].packet_id.unwrap() > 1 << 60);
    }

    #[tokio::test]
    async fn same_outcome_for_all_packets_is_read_from_sense() {
        let log = log();
        let c = client(
            &log,
            vec![
                send_status(SendStatus::All(Outcome::UnknownDestination)),
                send_status(SendStatus::All(Outcome::Accepted)),
            ],
        );
        let two = [
            OutPacket::to(ip(9), &b"x"[..]),
            OutPacket::to(ip(9), &b"y"[..]),
        ];
        assert_eq!(
            c.send(&two).await.unwrap(),
            vec![Outcome::UnknownDestination; 2]
        );
        assert_eq!(c.send(&two).await.unwrap(), vec![Outcome::Accepted; 2]);
        assert_eq!(calls(&log).len(), 2, "no SEND RESULTS needed");
    }

    #[tokio::test]
    async fn mixed_batch_reads_send_results() {
        let log = log();
        let results = SendResults {
            batch_tag: 1,
            total: 2,
            results: vec![
                PacketResult {
                    packet_id: 100,
                    outcome: Outcome::Delivered,
                },
                PacketResult {
                    packet_id: 101,
                    outcome: Outcome::DestinationDown,
                },
            ],
        };
        let c = client(
            &log,
            vec![send_status(SendStatus::Mixed), good(results.encode())],
        );
        let out = c
            .send(&[
                OutPacket::to(ip(2), &b"a"[..]),
                OutPacket::to(ip(3), &b"b"[..]),
            ])
            .await
            .unwrap();
        assert_eq!(out, vec![Outcome::Delivered, Outcome::DestinationDown]);
        let calls = calls(&log);
        let VendorCdb::SendResults(r) = calls[1].cdb else {
            panic!("{:?}", calls[1]);
        };
        assert_eq!(r.batch_tag, 1);
        assert_eq!(r.alloc_len, 16 + 2 * 16);
        assert_eq!(calls[1].data_in_len, r.alloc_len);
    }

    #[tokio::test]
    async fn results_replaced_by_another_send_repeat_the_batch_with_the_same_ids() {
        let log = log();
        let results = |tag| SendResults {
            batch_tag: tag,
            total: 1,
            results: vec![PacketResult {
                packet_id: 100,
                outcome: Outcome::Accepted,
            }],
        };
        let c = client(
            &log,
            vec![
                send_status(SendStatus::Mixed),
                // Another SEND came between: the target no longer knows tag 1.
                check(common::INVALID_FIELD_IN_CDB.cdb_field(2, None)),
                send_status(SendStatus::Mixed),
                good(results(2).encode()),
            ],
        );
        let out = c.send(&[OutPacket::to(ip(2), &b"a"[..])]).await.unwrap();
        assert_eq!(out, vec![Outcome::Accepted]);
        let calls = calls(&log);
        assert_eq!(calls.len(), 4);
        assert_eq!(sent(&calls[0]), (1, vec![100]));
        assert_eq!(sent(&calls[2]), (2, vec![100]));
    }

    #[tokio::test]
    async fn media_full_is_busy_and_unit_attention_is_retried() {
        let log = log();
        let c = client(
            &log,
            vec![
                reply(vendor::status::TASK_SET_FULL, None, vec![]),
                reply(vendor::status::BUSY, None, vec![]),
                check(common::POWER_ON_RESET),
                good(vec![]),
                check(common::INVALID_FIELD_IN_PARAM_LIST.param_field(8, None)),
            ],
        );
        let p = [OutPacket::to(ip(2), &b"a"[..]).with_id(1)];
        assert!(matches!(c.send(&p).await, Err(Error::Busy)));
        assert!(matches!(c.send(&p).await, Err(Error::Busy)));
        assert_eq!(c.send(&p).await.unwrap(), vec![Outcome::Delivered]);
        match c.send(&p).await {
            Err(Error::ScsiStatus {
                status: CHECK_CONDITION,
                sense: Some(s),
            }) => assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x26)),
            r => panic!("{r:?}"),
        }
        // The UNIT ATTENTION'd SEND went out again with the same CDB.
        let calls = calls(&log);
        assert_eq!(sent(&calls[2]), sent(&calls[3]));
    }

    #[tokio::test]
    async fn bad_packets_are_refused_before_sending() {
        let log = log();
        let c = client(&log, vec![]);
        let big = OutPacket::to(ip(2), vec![0u8; vendor::PAYLOAD_MAX + 1]);
        assert!(matches!(
            c.send(&[big]).await,
            Err(Error::InvalidArgument(_))
        ));
        let nowhere = OutPacket::to(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), &b"x"[..]);
        assert!(matches!(
            c.send(&[nowhere]).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(c.send(&[]).await.unwrap().is_empty());
        assert!(calls(&log).is_empty());
    }

    #[test]
    fn large_sends_are_split_into_batches() {
        let rec = |id, len| SendRecord {
            dest: NodeAddr::from(ip(2)),
            broadcast: false,
            packet_id: id,
            payload: vec![0; len],
        };
        let b = batches((0..1030).map(|i| rec(i, 1)).collect());
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![1024, 6]);
        assert_eq!(b[1][0].packet_id, 1024);
        // 300 packets of 64 KiB: 255 fit in 16 MiB.
        let b = batches((0..300).map(|i| rec(i, 65535)).collect());
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![255, 45]);
        for batch in &b {
            let len: usize = batch.iter().map(SendRecord::encoded_len).sum();
            assert!(vendor::SEND_HEADER_LEN + len <= vendor::PARAM_LIST_MAX as usize);
        }
    }

    #[tokio::test]
    async fn send_with_retry_reconnects_and_keeps_the_ids() {
        let log = log();
        let c = client(&log, vec![Err(Error::ConnectionClosed)]);
        let log2 = Arc::clone(&log);
        let out = c
            .send_with_retry(
                &[
                    OutPacket::to(ip(2), &b"a"[..]),
                    OutPacket::broadcast(&b"b"[..]),
                ],
                3,
                move || {
                    let log = Arc::clone(&log2);
                    async move { Ok(Mock::new(&log, vec![good(vec![])])) }
                },
            )
            .await
            .unwrap();
        assert_eq!(out, vec![Outcome::Delivered; 2]);
        let calls = calls(&log);
        assert_eq!(calls.len(), 2);
        assert_eq!(sent(&calls[0]).1, vec![100, 101]);
        assert_eq!(sent(&calls[1]).1, vec![100, 101]);
    }

    #[tokio::test]
    async fn receive_waits_then_follows_more_without_waiting() {
        let log = log();
        let c = client(&log, vec![records(true, &[1, 2]), records(false, &[3])]);
        let got = c
            .receive(0, Some(Duration::from_millis(1450)))
            .await
            .unwrap();
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        assert_eq!(got[0].source, ip(1));
        assert_eq!(got[0].payload, Bytes::from_static(b"packet 1"));
        let calls = calls(&log);
        let cdb = |i: usize| match calls[i].cdb {
            VendorCdb::Receive(r) => r,
            _ => panic!("{:?}", calls[i]),
        };
        assert_eq!(
            cdb(0),
            ReceiveCdb {
                wait: true,
                max_records: 0,
                alloc_len: RECEIVE_ALLOC_LEN,
                timeout: 15,
            }
        );
        assert!(!cdb(1).wait && cdb(1).timeout == 0);
        assert_eq!(calls[0].data_in_len, RECEIVE_ALLOC_LEN);
    }

    #[tokio::test]
    async fn receive_stops_at_max_records_and_caps_the_wait() {
        let log = log();
        let c = client(&log, vec![records(true, &[1]), records(true, &[2])])
            .with_max_wait(Duration::from_secs(5));
        let got = c.receive(2, Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(seqs(&got), vec![1, 2]);
        let calls = calls(&log);
        assert_eq!(calls.len(), 2, "stops with MORE set once 2 records are in");
        let VendorCdb::Receive(first) = calls[0].cdb else {
            panic!()
        };
        let VendorCdb::Receive(second) = calls[1].cdb else {
            panic!()
        };
        assert_eq!((first.max_records, first.timeout), (2, 50));
        assert_eq!(second.max_records, 1);
    }

    #[tokio::test]
    async fn replay_continues_after_the_last_record() {
        let log = log();
        let c = client(&log, vec![records(true, &[5, 6]), records(false, &[7])]);
        let since = UNIX_EPOCH + Duration::from_millis(1_767_225_600_000);
        let got = c.replay_from_time(since).await.unwrap();
        assert_eq!(seqs(&got), vec![5, 6, 7]);
        let from: Vec<_> = calls(&log)
            .iter()
            .map(|c| match c.cdb {
                VendorCdb::Replay(r) => r.from,
                _ => panic!("{c:?}"),
            })
            .collect();
        assert_eq!(
            from,
            vec![ReplayFrom::Time(1_767_225_600_000), ReplayFrom::Seq(7)]
        );
    }

    #[tokio::test]
    async fn acks_by_sequence_and_by_list() {
        let log = log();
        let c = client(&log, vec![good(vec![]), good(vec![]), good(vec![])]);
        c.ack_upto(0).await.unwrap();
        c.ack_upto(4).await.unwrap();
        let many: Vec<u64> = (1..=1030).collect();
        c.ack_list(&many).await.unwrap();
        let calls = calls(&log);
        assert_eq!(
            calls.len(),
            3,
            "ack of 0 sends nothing; 1030 seqs take two lists"
        );
        assert_eq!(calls[0].cdb, VendorCdb::Ack(AckCdb::UpTo(4)));
        assert_eq!(
            calls[1].cdb,
            VendorCdb::Ack(AckCdb::List {
                param_len: 1024 * 8
            })
        );
        let list = AckList::decode(calls[2].data_out.as_ref().unwrap()).unwrap();
        assert_eq!(list.seqs, (1025..=1030).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn receiver_hands_each_record_once_across_a_reconnect() {
        let log = log();
        let client = Arc::new(client(
            &log,
            vec![records(false, &[1, 2]), Err(Error::ConnectionClosed)],
        ));
        let mut rx = Receiver::new(Arc::clone(&client)).with_wait(Duration::from_secs(1));
        assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1, 2]);
        // The ACK for 1-2 is lost with the connection.
        assert!(rx.poll().await.unwrap_err().is_connection_error());
        assert_eq!(rx.last_seq(), 2);
        // A new nexus starts at the first unacknowledged record: 1 and 2 come again.
        client.replace_transport(Mock::new(
            &log,
            vec![
                good(vec![]),
                records(false, &[1, 2, 3]),
                good(vec![]),
                records(false, &[]),
            ],
        ));
        assert_eq!(seqs(&rx.poll().await.unwrap()), vec![3]);
        assert!(rx.poll().await.unwrap().is_empty());
        let cdbs: Vec<u8> = calls(&log)
            .iter()
            .map(|c| VendorCdb::encode(&c.cdb)[0])
            .collect();
        assert_eq!(
            cdbs,
            vec![
                op::RECEIVE,
                op::ACK,
                op::ACK,
                op::RECEIVE,
                op::ACK,
                op::RECEIVE
            ]
        );
        let calls = calls(&log);
        assert_eq!(calls[2].cdb, VendorCdb::Ack(AckCdb::UpTo(2)));
        assert_eq!(calls[4].cdb, VendorCdb::Ack(AckCdb::UpTo(3)));
    }

    #[tokio::test]
    async fn redelivered_records_are_acknowledged_again() {
        let log = log();
        let client = Arc::new(client(
            &log,
            vec![
                records(false, &[1]),
                good(vec![]), // ACK 1: "done", but the target loses it (new nexus)
                records(false, &[1]),
                good(vec![]), // ACK 1 again
                records(false, &[]),
            ],
        ));
        let mut rx = Receiver::new(client);
        assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1]);
        assert!(rx.poll().await.unwrap().is_empty());
        assert!(rx.poll().await.unwrap().is_empty());
        let acks = calls(&log)
            .iter()
            .filter(|c| c.cdb == VendorCdb::Ack(AckCdb::UpTo(1)))
            .count();
        assert_eq!(acks, 2);
    }

    #[tokio::test]
    async fn receiver_catches_up_with_replay_after_a_lost_response() {
        let log = log();
        let stats = QueueStats {
            queued_records: 3,
            queued_bytes: 24,
            first_unacked: 2,
            last_delivered: 4,
            last_assigned: 5,
            capacity_bytes: 1 << 30,
        };
        let client = Arc::new(client(
            &log,
            vec![
                records(false, &[1]),
                good(vec![]), // ACK 1
                // This RECEIVE took 2-4 on the target, but its answer never came.
                Err(Error::Timeout),
                good(stats.encode()),
                records(false, &[2, 3, 4, 5]),
                good(vec![]), // ACK 4
                records(false, &[5]),
            ],
        ));
        let mut rx = Receiver::new(client).starting_after(0);
        assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1]);
        assert!(matches!(rx.poll().await, Err(Error::Timeout)));
        // 5 is past the target's RECEIVE position: RECEIVE will return it.
        assert_eq!(seqs(&rx.poll().await.unwrap()), vec![2, 3, 4]);
        assert_eq!(seqs(&rx.next().await.unwrap()), vec![5]);
        let calls = calls(&log);
        assert!(matches!(
            calls[3].cdb,
            VendorCdb::Node(NodeCdb::QueueStats { .. })
        ));
        assert!(matches!(
            calls[4].cdb,
            VendorCdb::Replay(ReplayCdb {
                from: ReplayFrom::Seq(2),
                ..
            })
        ));
        assert_eq!(calls[5].cdb, VendorCdb::Ack(AckCdb::UpTo(4)));
    }

    #[tokio::test]
    async fn node_commands_decode_their_lists() {
        let log = log();
        let table = RouteList {
            total: 300,
            entries: Vec::new(),
        };
        let full = RouteList {
            total: 1,
            entries: vec![vendor::RouteEntry {
                addr: NodeAddr::from(ip(1)),
                state: vendor::RouteState::Available,
                local: true,
                external: false,
                node_id: 1,
            }],
        };
        let c = client(
            &log,
            vec![
                good(vec![]),
                good(vec![]),
                good(table.encode()),
                good(full.encode()),
            ],
        );
        c.register(&[ip(1), "2001:db8::7".parse().unwrap()])
            .await
            .unwrap();
        c.set_state(NodeState::Maintenance).await.unwrap();
        assert_eq!(c.routing_table().await.unwrap(), full);
        let calls = calls(&log);
        let list = AddressList::decode(calls[0].data_out.as_ref().unwrap()).unwrap();
        assert_eq!(list.addrs.len(), 2);
        assert_eq!(
            calls[1].cdb,
            VendorCdb::Node(NodeCdb::SetState(NodeState::Maintenance))
        );
        // The table reported 300 entries: read again with room for all of them.
        assert_eq!(
            calls[3].cdb,
            VendorCdb::Node(NodeCdb::RoutingTable {
                alloc_len: 8 + 300 * 24
            })
        );
    }

    // -----------------------------------------------------------------------------------
    // Coalescing of concurrent sends

    /// A client on a gated mock with one SEND in flight at most: a caller that comes while
    /// a SEND is in flight queues, deterministically, until the test releases it.
    fn gated(
        log: &Arc<Mutex<Vec<Call>>>,
        replies: Vec<Reply>,
        gate: &Arc<tokio::sync::Semaphore>,
    ) -> Arc<PacketClient<Mock>> {
        let mut m = Mock::new(log, replies);
        m.gate = Some(Arc::clone(gate));
        Arc::new(
            PacketClient::new(m)
                .with_first_packet_id(100)
                .with_sends_in_flight(1),
        )
    }

    /// Yields until `cond` holds; the spawned callers and SEND tasks of this
    /// single-threaded runtime run meanwhile.
    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never held");
    }

    fn waiting(c: &PacketClient<Mock>) -> usize {
        c.core.queue().waiting.len()
    }

    type Caller = tokio::task::JoinHandle<Result<Vec<Outcome>, Error>>;

    /// A caller sending packets with these ids (to 10.0.0.2), started once the callers
    /// before it are queued or in flight (`queued` of them waiting), so that the queue
    /// order is the order of the calls.
    async fn caller(c: &Arc<PacketClient<Mock>>, ids: &[u64], queued: usize) -> Caller {
        let packets: Vec<_> = ids
            .iter()
            .map(|&i| OutPacket::to(ip(2), &b"p"[..]).with_id(i))
            .collect();
        let c2 = Arc::clone(c);
        let h = tokio::spawn(async move { c2.send(&packets).await });
        until(|| waiting(c) == queued).await;
        h
    }

    fn results(tag: u64, r: &[(u64, Outcome)]) -> Reply {
        good(
            SendResults {
                batch_tag: tag,
                total: r.len() as u16,
                results: r
                    .iter()
                    .map(|&(packet_id, outcome)| PacketResult { packet_id, outcome })
                    .collect(),
            }
            .encode(),
        )
    }

    #[test]
    fn a_batch_takes_callers_in_order_up_to_one_sends_worth_and_skips_the_gone() {
        let rec = |len| SendRecord {
            dest: NodeAddr::from(ip(2)),
            broadcast: false,
            packet_id: 1,
            payload: vec![0; len],
        };
        let mut kept = Vec::new();
        let mut entry = |n: usize, len: usize, keep: bool| {
            let (reply, rx) = tokio::sync::oneshot::channel();
            if keep {
                kept.push(rx);
            }
            let records: Vec<_> = (0..n).map(|_| rec(len)).collect();
            let len = records.iter().map(SendRecord::encoded_len).sum();
            Queued {
                records,
                len,
                reply,
            }
        };
        let mut q = SendQueue {
            waiting: [
                entry(600, 1, true),
                entry(5, 1, false), // its caller went away: not sent
                entry(424, 1, true),
                entry(1, 1, true), // would make 1025
                entry(200, 65535, true),
                entry(60, 65535, true), // would pass 16 MiB
            ]
            .into(),
            tasks: 1,
            max_tasks: 1,
        };
        let sizes = |b: Vec<Queued>| b.iter().map(|q| q.records.len()).collect::<Vec<_>>();
        assert_eq!(sizes(take_batch(&mut q)), vec![600, 424]);
        assert_eq!(sizes(take_batch(&mut q)), vec![1, 200]);
        assert_eq!(sizes(take_batch(&mut q)), vec![60]);
        assert!(take_batch(&mut q).is_empty());
        drop(kept);
    }

    #[tokio::test]
    async fn callers_queued_behind_a_send_share_the_next_and_split_its_results() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let c = gated(
            &log,
            vec![
                good(vec![]),
                send_status(SendStatus::Mixed),
                results(
                    2,
                    &[
                        (10, Outcome::Delivered),
                        (11, Outcome::UnknownDestination),
                        (20, Outcome::DestinationDown),
                        (30, Outcome::Delivered),
                        (31, Outcome::Delivered),
                        (32, Outcome::UnknownDestination),
                    ],
                ),
            ],
            &gate,
        );
        let a = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        let b = caller(&c, &[10, 11], 1).await;
        let d = caller(&c, &[20], 2).await;
        let e = caller(&c, &[30, 31, 32], 3).await;
        gate.add_permits(3);
        assert_eq!(a.await.unwrap().unwrap(), vec![Outcome::Delivered]);
        assert_eq!(
            b.await.unwrap().unwrap(),
            vec![Outcome::Delivered, Outcome::UnknownDestination]
        );
        assert_eq!(d.await.unwrap().unwrap(), vec![Outcome::DestinationDown]);
        assert_eq!(
            e.await.unwrap().unwrap(),
            vec![
                Outcome::Delivered,
                Outcome::Delivered,
                Outcome::UnknownDestination
            ]
        );
        let calls = calls(&log);
        assert_eq!(calls.len(), 3);
        assert_eq!(sent(&calls[0]), (1, vec![1]));
        assert_eq!(sent(&calls[1]), (2, vec![10, 11, 20, 30, 31, 32]));
        assert_eq!(
            c.send_stats(),
            SendStats {
                sends: 2,
                packets: 7,
                send_results: 1
            }
        );
    }

    #[tokio::test]
    async fn busy_and_refusals_reach_every_caller_of_the_send() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let c = gated(
            &log,
            vec![
                good(vec![]),
                send_status(SendStatus::MediaFull),
                check(common::INVALID_FIELD_IN_PARAM_LIST.param_field(8, None)),
            ],
            &gate,
        );
        let a = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        let busy = [
            caller(&c, &[10, 11], 1).await,
            caller(&c, &[20], 2).await,
            caller(&c, &[30], 3).await,
        ];
        gate.add_permits(1);
        assert_eq!(a.await.unwrap().unwrap(), vec![Outcome::Delivered]);
        // The second SEND is in flight now: queue behind it for the third.
        until(|| calls(&log).len() == 2).await;
        let refused = [caller(&c, &[40], 1).await, caller(&c, &[50, 51], 2).await];
        gate.add_permits(2);
        for h in busy {
            assert!(matches!(h.await.unwrap(), Err(Error::Busy)));
        }
        for h in refused {
            match h.await.unwrap() {
                Err(Error::ScsiStatus {
                    status: CHECK_CONDITION,
                    sense: Some(s),
                }) => assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x26)),
                r => panic!("{r:?}"),
            }
        }
        assert_eq!(sent(&calls(&log)[1]).1, vec![10, 11, 20, 30]);
        assert_eq!(sent(&calls(&log)[2]).1, vec![40, 50, 51]);
    }

    #[tokio::test]
    async fn a_connection_error_reaches_every_caller_as_one() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reset by peer");
        let c = gated(&log, vec![good(vec![]), Err(Error::Io(broken))], &gate);
        let a = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        let others = [
            caller(&c, &[10], 1).await,
            caller(&c, &[20, 21], 2).await,
            caller(&c, &[30], 3).await,
        ];
        gate.add_permits(2);
        a.await.unwrap().unwrap();
        for h in others {
            match h.await.unwrap() {
                Err(e @ Error::Io(_)) => {
                    assert!(e.is_connection_error());
                    assert!(e.to_string().contains("reset by peer"), "{e}");
                }
                r => panic!("{r:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_caller_gone_while_queued_is_not_sent_and_the_others_keep_their_outcomes() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let c = gated(
            &log,
            vec![
                good(vec![]),
                send_status(SendStatus::Mixed),
                results(
                    2,
                    &[
                        (10, Outcome::DestinationDown),
                        (30, Outcome::Delivered),
                        (31, Outcome::UnknownDestination),
                    ],
                ),
            ],
            &gate,
        );
        let a = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        let b = caller(&c, &[10], 1).await;
        let gone = caller(&c, &[20, 21], 2).await;
        let d = caller(&c, &[30, 31], 3).await;
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        gate.add_permits(3);
        a.await.unwrap().unwrap();
        assert_eq!(b.await.unwrap().unwrap(), vec![Outcome::DestinationDown]);
        assert_eq!(
            d.await.unwrap().unwrap(),
            vec![Outcome::Delivered, Outcome::UnknownDestination]
        );
        assert_eq!(sent(&calls(&log)[1]).1, vec![10, 30, 31]);
        assert_eq!(waiting(&c), 0);
    }

    #[tokio::test]
    async fn callers_gone_while_in_flight_do_not_stop_or_disturb_the_others() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let c = gated(
            &log,
            vec![
                good(vec![]),
                send_status(SendStatus::Mixed),
                results(
                    2,
                    &[
                        (10, Outcome::DestinationDown),
                        (20, Outcome::Delivered),
                        (30, Outcome::UnknownDestination),
                    ],
                ),
                good(vec![]),
            ],
            &gate,
        );
        // A lone caller's SEND runs on its own task and goes with it; the callers queued
        // behind it are handed to a SEND task, which sends them at once.
        let a = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        let b = caller(&c, &[10], 1).await;
        let gone = caller(&c, &[20], 2).await;
        let d = caller(&c, &[30], 3).await;
        a.abort();
        assert!(a.await.unwrap_err().is_cancelled());
        until(|| calls(&log).len() == 2).await;
        assert_eq!(sent(&calls(&log)[1]).1, vec![10, 20, 30]);
        // A caller in the middle of that SEND goes away before its answer.
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        gate.add_permits(2);
        assert_eq!(b.await.unwrap().unwrap(), vec![Outcome::DestinationDown]);
        assert_eq!(d.await.unwrap().unwrap(), vec![Outcome::UnknownDestination]);
        // Nothing is stuck: the next caller has a SEND of its own.
        gate.add_permits(1);
        assert_eq!(
            caller(&c, &[40], 0).await.await.unwrap().unwrap(),
            vec![Outcome::Delivered]
        );
        assert_eq!(sent(&calls(&log)[3]).1, vec![40]);
        assert_eq!(c.core.queue().tasks, 0);
    }

    #[test]
    fn a_slot_dropped_outside_a_runtime_fails_the_waiting_callers() {
        let c = client(&log(), vec![]);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        {
            let mut q = c.core.queue();
            q.tasks = 1;
            q.waiting.push_back(Queued {
                records: Vec::new(),
                len: 0,
                reply,
            });
        }
        drop(Slot {
            core: Arc::clone(&c.core),
        });
        // The reply was dropped unanswered: the caller gets a connection error.
        assert!(matches!(
            answer.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        ));
        let tasks = c.core.queue().tasks;
        assert_eq!((tasks, waiting(&c)), (0, 0));
    }

    #[tokio::test]
    async fn a_large_send_keeps_its_order_across_sends_shared_with_others() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let unknown = || send_status(SendStatus::All(Outcome::UnknownDestination));
        let c = gated(
            &log,
            vec![
                good(vec![]),
                send_status(SendStatus::All(Outcome::Delivered)),
                unknown(),
                unknown(),
            ],
            &gate,
        );
        let a = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        let big: Vec<u64> = (1000..2030).collect();
        let b = caller(&c, &big, 1).await;
        let small = caller(&c, &[5], 2).await;
        gate.add_permits(1);
        a.await.unwrap().unwrap();
        // SEND 2: the big caller's first 1024 (the small one does not fit beside them).
        until(|| calls(&log).len() == 2).await;
        assert_eq!(sent(&calls(&log)[1]).1, big[..1024].to_vec());
        // Its last 6 are queued only once the first 1024 are answered: after the small
        // caller, in the same SEND or the next one.
        gate.add_permits(3);
        let out = b.await.unwrap().unwrap();
        assert_eq!(out.len(), 1030);
        assert!(out[..1024].iter().all(|o| *o == Outcome::Delivered));
        assert!(out[1024..]
            .iter()
            .all(|o| *o == Outcome::UnknownDestination));
        assert_eq!(
            small.await.unwrap().unwrap(),
            vec![Outcome::UnknownDestination]
        );
        let rest: Vec<u64> = calls(&log)[2..].iter().flat_map(|c| sent(c).1).collect();
        let mut expected = vec![5];
        expected.extend(&big[1024..]);
        assert_eq!(rest, expected);
    }

    #[tokio::test]
    async fn a_lone_sender_goes_at_once_and_up_to_the_limit_go_in_parallel() {
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut m = Mock::new(&log, (0..4).map(|_| good(vec![])).collect());
        m.gate = Some(Arc::clone(&gate));
        let c = Arc::new(PacketClient::new(m).with_sends_in_flight(3));
        let first = caller(&c, &[1], 0).await;
        until(|| calls(&log).len() == 1).await;
        // Each caller that finds fewer than 3 in flight has its own SEND.
        let second = caller(&c, &[2], 0).await;
        until(|| calls(&log).len() == 2).await;
        let more = [second, caller(&c, &[3], 0).await];
        until(|| calls(&log).len() == 3).await;
        // The fourth waits: three SENDs are in flight.
        let fourth = caller(&c, &[4], 1).await;
        gate.add_permits(4);
        first.await.unwrap().unwrap();
        for h in more {
            h.await.unwrap().unwrap();
        }
        fourth.await.unwrap().unwrap();
        assert_eq!(c.send_stats().sends, 4);
    }

    #[test]
    fn sends_outside_a_tokio_runtime_go_alone() {
        use std::task::{Context, Poll, Waker};
        let log = log();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        // One SEND slot: inside tokio the second call would queue for a SEND task.
        let c = gated(&log, vec![good(vec![]), good(vec![])], &gate);
        let (p1, p2) = (
            [OutPacket::to(ip(2), &b"a"[..])],
            [OutPacket::to(ip(2), &b"b"[..])],
        );
        let mut first = std::pin::pin!(c.send(&p1));
        let mut second = std::pin::pin!(c.send(&p2));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        // No runtime to spawn on: the second went out as a SEND of its own, not queued.
        assert_eq!(calls(&log).len(), 2);
        assert_eq!(waiting(&c), 0);
        gate.add_permits(2);
        for f in [first, second] {
            match f.poll(&mut cx) {
                Poll::Ready(r) => assert_eq!(r.unwrap(), vec![Outcome::Delivered]),
                Poll::Pending => panic!("answered SEND still pending"),
            }
        }
    }

    #[test]
    fn duplicated_errors_keep_their_kind() {
        let io = Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "gone",
        ));
        let d = io.duplicate();
        assert!(d.is_connection_error());
        assert!(matches!(&d, Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset));
        assert_eq!(d.to_string(), io.to_string());
        assert!(matches!(Error::Busy.duplicate(), Error::Busy));
        assert!(Error::Timeout.duplicate().is_connection_error());
        let s = Error::ScsiStatus {
            status: CHECK_CONDITION,
            sense: Some(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0)),
        };
        assert_eq!(s.duplicate().to_string(), s.to_string());
    }
}

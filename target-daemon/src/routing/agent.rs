//! The routing agent: executes the vendor commands the link unit hands it. It decides
//! each packet's outcome from the routing table, stores accepted packets in the packet
//! queue (durable before the sender hears GOOD), hands packets for the outside to the
//! external port, and delivers, acknowledges and replays a node's packets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ftss_proto::sense::{common, key, Sense};
use ftss_proto::vendor::{
    self, asc, AckCdb, AckList, AddressList, DeliveredRecord, DeliveryFlags, NodeAddr, NodeCdb,
    NodeInfo, NodeState, Outcome, PacketResult, QueueStats, RecordList, ReplayFrom, RouteState,
    SendList, SendResults, SendStatus, VendorCdb,
};
use tracing::{error, info, warn};

use super::clock::{Clock, SystemClock};
use super::external::{DropReason, ExternalPort, ExternalStats};
use super::interfaces::{
    IfDrop, Inbound, Interfaces, InterfacesConfig, InterfacesStatus, SendVerdict,
};
use super::netif::NetifError;
use super::packet_queue::{flags, NewPacket, Packet, PacketQueue, QueueError, StoreResult};
use super::table::{RegisterError, RegistryError, RoutingTable};
use crate::media::mirror::MirrorSet;
use crate::media::MediaError;
use crate::scsi::{DataInSent, ItNexus, Park, ScsiCommand, ScsiOutcome, VendorHandler};

/// Key the external port's packets are queued under: no node can have it (it is not a
/// unicast address).
pub const EXTERNAL_KEY: NodeAddr = NodeAddr([0xff; 16]);
/// Longest a RECEIVE waits, whatever its CDB asks: below initiators' command timeouts.
const RECEIVE_WAIT_MAX: Duration = Duration::from_secs(20);
/// Largest RECEIVE or REPLAY response, whatever the allocation length allows: a response
/// is built whole in memory, and the list's MORE flag tells the client to ask again.
const RESPONSE_BYTES_MAX: u32 = 16 << 20;

/// How one record of a SEND is answered.
enum Slot {
    /// Decided without storing (a retry of a stored packet, or undeliverable).
    Fixed(Outcome),
    /// The same packet id earlier in the batch: answered as that record.
    SameAs(usize),
    /// Stored as these entries of the batch handed to the queue, with this outcome
    /// unless the queue says otherwise.
    Copies(std::ops::Range<usize>, Outcome),
}

/// Settings of the agent.
pub struct AgentConfig {
    /// Nodes from the configuration: initiator name and addresses.
    pub nodes: Vec<(String, Vec<NodeAddr>)>,
    /// Time a destination may stay down before senders get failure notices.
    pub delivery_timeout: Duration,
    /// External port: bind address and gateways.
    pub external: Option<(SocketAddr, Vec<SocketAddr>)>,
    /// Where registrations are kept durably: the metadata area of the packet queue's
    /// mirror set. `None` keeps them in memory only (tests of other parts).
    pub registry: Option<Arc<MirrorSet>>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A thread or the external port could not be set up.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The stored node registry is unreadable: starting without it would hand its
    /// addresses to whoever registers first.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The packet queue failed while forwarding the external backlog.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// An external interface (TUN) could not be opened or configured.
    #[error(transparent)]
    Interface(#[from] NetifError),
}

/// The routing agent.
pub struct RoutingAgent {
    table: Mutex<RoutingTable>,
    queue: Arc<PacketQueue>,
    external: Option<ExternalPort>,
    /// The external interfaces (TUN devices of the host) and the echo interface.
    interfaces: Option<Interfaces>,
    /// Last SEND's per-packet outcomes, per nexus.
    results: Mutex<HashMap<u64, (u64, Vec<PacketResult>)>>,
    delivery_timeout: Duration,
    registry: Option<Arc<MirrorSet>>,
    /// Delivery timeouts read it (a fake one in the packet simulation).
    clock: Arc<dyn Clock>,
    /// Packets of SEND commands per outcome, indexed like [`Outcome::ALL`].
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// The same per sending node; pruned to the routing table's nodes when read.
    sent_by: Mutex<HashMap<NodeAddr, [u64; Outcome::ALL.len()]>>,
}

/// One node's queue as the metrics endpoint shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeMetrics {
    /// The node's key address (its canonical address).
    pub node: String,
    /// Packets stored for it and not acknowledged.
    pub queued_packets: u64,
    /// Their payload bytes.
    pub queued_bytes: u64,
    /// Age of the oldest of them in ms (0 = none).
    pub oldest_unacked_ms: u64,
    /// Share of its quota in use: the larger of the bytes' and the packets' share.
    pub quota_used: f64,
    /// Packets it sent, per outcome, indexed like [`Outcome::ALL`].
    pub sent: [u64; Outcome::ALL.len()],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check(s: Sense) -> ScsiOutcome {
    ScsiOutcome {
        status: vendor::status::CHECK_CONDITION,
        sense: Some(s.encode(false)),
        ..ScsiOutcome::default()
    }
}

fn good(data_in: Vec<u8>) -> ScsiOutcome {
    ScsiOutcome {
        status: vendor::status::GOOD,
        data_in,
        ..ScsiOutcome::default()
    }
}

fn not_registered() -> ScsiOutcome {
    check(Sense::new(
        key::ILLEGAL_REQUEST,
        asc::PACKET,
        asc::NODE_NOT_REGISTERED,
    ))
}

fn media_failed(e: &QueueError) -> ScsiOutcome {
    error!("packet queue: {e}");
    // LOGICAL UNIT FAILURE: nothing of the command took effect.
    check(Sense::new(key::HARDWARE_ERROR, 0x3e, 0x01))
}

fn delivered(p: Packet) -> DeliveredRecord {
    DeliveredRecord {
        seq: p.seq,
        source: p.source,
        flags: DeliveryFlags {
            broadcast: p.flags & flags::BROADCAST != 0,
            from_external: p.flags & flags::FROM_EXTERNAL != 0,
            failure_notice: p.flags & flags::NOTICE != 0,
        },
        packet_id: p.packet_id,
        timestamp_ms: p.ts_ms,
        payload: p.payload,
    }
}

/// Encoded size of a delivered record with `n` payload bytes.
fn record_size(n: usize) -> usize {
    vendor::DELIVERED_HEADER_LEN + n.div_ceil(4) * 4
}

impl RoutingAgent {
    /// An agent over `queue`; starts its housekeeping and external-port threads.
    pub fn start(queue: Arc<PacketQueue>, cfg: AgentConfig) -> Result<Arc<Self>, AgentError> {
        Self::start_with_interfaces(queue, cfg, None)
    }

    /// [`start`](Self::start) with external interfaces (TUN devices on this host, and
    /// perhaps an echo interface): opens them and starts their reader and prober
    /// threads.
    pub fn start_with_interfaces(
        queue: Arc<PacketQueue>,
        cfg: AgentConfig,
        interfaces: Option<InterfacesConfig>,
    ) -> Result<Arc<Self>, AgentError> {
        let interfaces = interfaces.as_ref().map(Interfaces::open).transpose()?;
        let agent = Self::build(queue, cfg, Arc::new(SystemClock), interfaces)?;
        if let Some(ifs) = &agent.interfaces {
            for i in 0..ifs.len() {
                let weak = Arc::downgrade(&agent);
                std::thread::Builder::new()
                    .name(format!("ftss-ext-in{i}"))
                    .spawn(move || interface_in(&weak, i))?;
            }
            if !ifs.is_empty() {
                let weak = Arc::downgrade(&agent);
                std::thread::Builder::new()
                    .name("ftss-ext-probe".into())
                    .spawn(move || prober(&weak))?;
            }
        }
        let weak = Arc::downgrade(&agent);
        std::thread::Builder::new()
            .name("ftss-routing".into())
            .spawn(move || housekeeping(&weak))?;
        if agent.external.is_some() {
            let weak = Arc::downgrade(&agent);
            std::thread::Builder::new()
                .name("ftss-external".into())
                .spawn(move || external_in(&weak))?;
        }
        Ok(agent)
    }

    /// An agent over `queue` reading the time from `clock`, with no threads: the caller
    /// runs [`tick`](Self::tick) itself, and nothing arriving at the external port (if
    /// configured) is taken in. For the deterministic packet simulation, where a thread's
    /// timing must not decide anything.
    pub fn without_threads(
        queue: Arc<PacketQueue>,
        cfg: AgentConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, AgentError> {
        Self::build(queue, cfg, clock, None)
    }

    fn build(
        queue: Arc<PacketQueue>,
        cfg: AgentConfig,
        clock: Arc<dyn Clock>,
        interfaces: Option<Interfaces>,
    ) -> Result<Arc<Self>, AgentError> {
        let external = match &cfg.external {
            Some((bind, peers)) => Some(ExternalPort::open(*bind, peers)?),
            None => None,
        };
        let mut table = RoutingTable::new(&cfg.nodes);
        if let Some(record) = cfg
            .registry
            .as_ref()
            .and_then(|set| set.read_meta())
            .filter(|r| !r.is_empty())
        {
            table.restore(&record)?;
        }
        let agent = Arc::new(RoutingAgent {
            table: Mutex::new(table),
            queue,
            external,
            interfaces,
            results: Mutex::new(HashMap::new()),
            delivery_timeout: cfg.delivery_timeout,
            registry: cfg.registry,
            clock,
            outcomes: Default::default(),
            sent_by: Mutex::new(HashMap::new()),
        });
        agent.forward_backlog()?;
        Ok(agent)
    }

    /// Packets for the outside that a crash left stored but not forwarded: they go out
    /// now (or, with no external port configured any more, are dropped and counted, so
    /// they never pin the log's tail).
    fn forward_backlog(&self) -> Result<(), QueueError> {
        let mut total = 0usize;
        loop {
            let (packets, _) = self
                .queue
                .receive(EXTERNAL_KEY, 1024, 16 << 20, record_size)?;
            let Some(last) = packets.last().map(|p| p.seq) else {
                break;
            };
            total += packets.len();
            match (self.routes_out(), &self.external) {
                (true, _) => {
                    for p in &packets {
                        if !self.send_out(p.dest, p.source, &p.payload) {
                            warn!(seq = p.seq, "external backlog: no gateway took a packet");
                        }
                    }
                }
                (false, Some(x)) => {
                    for p in &packets {
                        if !x.send(p.dest, p.source, &p.payload) {
                            warn!(seq = p.seq, "external backlog: no gateway took a packet");
                        }
                    }
                }
                (false, None) => warn!(
                    count = packets.len(),
                    "external backlog dropped: no external port configured"
                ),
            }
            self.queue.ack(EXTERNAL_KEY, last, &[])?;
        }
        if total > 0 {
            info!(packets = total, "external backlog forwarded");
        }
        Ok(())
    }

    /// Stores the registry (before a registration or retirement is answered).
    fn persist(&self, table: &RoutingTable) -> Result<(), MediaError> {
        match &self.registry {
            Some(set) => set.write_meta(&table.registry()),
            None => Ok(()),
        }
    }

    /// Retires an initiator's run-time registrations (admin): its addresses become free
    /// and the packets queued under them are discarded, so whoever registers them next
    /// starts with an empty queue and no history. Returns the keys discarded.
    pub fn retire(&self, initiator: &str) -> Result<Vec<NodeAddr>, String> {
        let keys = {
            let mut t = lock(&self.table);
            let before = t.clone();
            let keys = t.retire(initiator)?;
            if let Err(e) = self.persist(&t) {
                *t = before;
                return Err(format!("registry not stored: {e}"));
            }
            keys
        };
        for k in &keys {
            let s = self.queue.stats(*k);
            if s.last_assigned > 0 {
                self.queue
                    .ack(*k, s.last_assigned, &[])
                    .map_err(|e| format!("discarding the queue of {k}: {e}"))?;
            }
        }
        info!(initiator, keys = keys.len(), "node retired");
        Ok(keys)
    }

    /// Checks that every node in `nodes` could join the table, then adds them all, or
    /// none: (index in the file, initiator, addresses). On refusal, the index at fault.
    pub fn add_configured(
        &self,
        nodes: &[(usize, String, Vec<NodeAddr>)],
    ) -> Result<(), (usize, String)> {
        let mut t = lock(&self.table);
        let mut next = t.clone();
        for (i, initiator, addrs) in nodes {
            next.add_configured(initiator, addrs).map_err(|e| (*i, e))?;
        }
        *t = next;
        for (_, initiator, _) in nodes {
            info!(initiator, "node added by reload");
        }
        Ok(())
    }

    /// The `admin nodes` listing: one line per node, then one per owned address.
    pub fn nodes_report(&self) -> String {
        let t = lock(&self.table);
        let mut out = String::new();
        for n in t.nodes() {
            let s = self.queue.stats(n.key());
            let addrs: Vec<String> = n.addrs.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "node {} initiator={} kind={} state={:?} sessions={} addrs={} queued_records={} queued_bytes={}\n",
                n.id,
                n.initiator.as_deref().unwrap_or("-"),
                if n.registered { "registered" } else { "configured" },
                n.state(),
                n.nexuses.len(),
                addrs.join(","),
                s.queued_records,
                s.queued_bytes
            ));
        }
        for (a, i) in t.owners() {
            out.push_str(&format!("owner {a} initiator={i}\n"));
        }
        out
    }

    /// The `admin nodes` listing for scripts: the same facts as [`Self::nodes_report`].
    pub fn nodes_json(&self) -> serde_json::Value {
        let t = lock(&self.table);
        let nodes: Vec<serde_json::Value> = t
            .nodes()
            .iter()
            .map(|n| {
                let s = self.queue.stats(n.key());
                serde_json::json!({
                    "id": n.id,
                    "initiator": n.initiator,
                    "kind": if n.registered { "registered" } else { "configured" },
                    "state": format!("{:?}", n.state()),
                    "sessions": n.nexuses.len(),
                    "addrs": n.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "queued_records": s.queued_records,
                    "queued_bytes": s.queued_bytes,
                })
            })
            .collect();
        let owners: Vec<serde_json::Value> = t
            .owners()
            .map(|(a, i)| serde_json::json!({ "addr": a.to_string(), "initiator": i }))
            .collect();
        serde_json::json!({ "nodes": nodes, "owners": owners })
    }

    /// Packets of SEND commands so far, per outcome.
    pub fn outcome_counts(&self) -> [(Outcome, u64); Outcome::ALL.len()] {
        let mut out = Outcome::ALL.map(|o| (o, 0));
        for (slot, n) in out.iter_mut().zip(&self.outcomes) {
            slot.1 = n.load(Ordering::Relaxed);
        }
        out
    }

    /// Every node's queue figures, for the metrics endpoint.
    pub fn node_metrics(&self) -> Vec<NodeMetrics> {
        let keys: Vec<NodeAddr> = lock(&self.table).nodes().iter().map(|n| n.key()).collect();
        let sent = {
            let mut by = lock(&self.sent_by);
            // A retired node's counts go with it: the map never outgrows the table.
            let live: std::collections::HashSet<&NodeAddr> = keys.iter().collect();
            by.retain(|k, _| live.contains(k));
            by.clone()
        };
        let now = self.clock.now_ms();
        let (quota_bytes, quota_records) = self.queue.node_quota();
        let share = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        keys.into_iter()
            .map(|k| {
                let s = self.queue.stats(k);
                NodeMetrics {
                    node: k.to_string(),
                    queued_packets: s.queued_records,
                    queued_bytes: s.queued_bytes,
                    oldest_unacked_ms: if s.oldest_unacked_ms == 0 {
                        0
                    } else {
                        now.saturating_sub(s.oldest_unacked_ms)
                    },
                    quota_used: share(s.queued_bytes, quota_bytes)
                        .max(share(s.queued_records, quota_records)),
                    sent: sent.get(&k).copied().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The external port's receiving address, when there is one.
    pub fn external_addr(&self) -> Option<SocketAddr> {
        self.external.as_ref().and_then(|x| x.local_addr().ok())
    }

    /// The external port's counters (for admin status), when there is a port.
    pub fn external_stats(&self) -> Option<ExternalStats> {
        self.external.as_ref().map(ExternalPort::stats)
    }

    /// The external interfaces' figures (for admin status), when there are any.
    pub fn interfaces_status(&self) -> Option<InterfacesStatus> {
        self.interfaces.as_ref().map(Interfaces::status)
    }

    /// The packet queue.
    pub fn queue(&self) -> &Arc<PacketQueue> {
        &self.queue
    }

    fn node_key(&self, nexus: u64) -> Option<(NodeAddr, NodeAddr)> {
        lock(&self.table)
            .node_of(nexus)
            .map(|n| (n.key(), n.source()))
    }

    fn send(&self, nexus: &ItNexus, tag: u64, param_len: u32, data: &[u8]) -> ScsiOutcome {
        if param_len == 0 {
            return good(Vec::new());
        }
        let data = &data[..data.len().min(param_len as usize)];
        let list = match SendList::decode(data) {
            Ok(l) => l,
            Err(e) => return check(e.sense()),
        };
        let Some((sender, source)) = self.node_key(nexus.id) else {
            return not_registered();
        };
        // Decide every packet's fate first, then store the batch in one go.
        let mut slots: Vec<Slot> = Vec::with_capacity(list.records.len());
        let mut to_store: Vec<NewPacket> = Vec::new();
        let mut in_batch: HashMap<u64, usize> = HashMap::new();
        // A retry is answered with its original's outcome, once the original is durable.
        let mut originals = 0u64;
        {
            let table = lock(&self.table);
            for (i, r) in list.records.iter().enumerate() {
                if let Some(&first) = in_batch.get(&r.packet_id) {
                    slots.push(Slot::SameAs(first));
                    continue;
                }
                in_batch.insert(r.packet_id, i);
                if let Some((o, seq)) = self.queue.duplicate(sender, r.packet_id) {
                    originals = originals.max(seq);
                    slots.push(Slot::Fixed(o));
                    continue;
                }
                let base = NewPacket {
                    node: EXTERNAL_KEY,
                    dest: r.dest,
                    source,
                    sender,
                    packet_id: r.packet_id,
                    flags: 0,
                    payload: r.payload.clone(),
                };
                let first = to_store.len();
                let o = if r.broadcast {
                    for n in table.nodes() {
                        if n.state() == RouteState::Available && n.key() != sender {
                            to_store.push(NewPacket {
                                node: n.key(),
                                dest: n.source(),
                                flags: flags::BROADCAST,
                                ..base.clone()
                            });
                        }
                    }
                    Outcome::Delivered
                } else if let Some(n) = table.lookup(&r.dest) {
                    match n.state() {
                        RouteState::Available => {
                            to_store.push(NewPacket {
                                node: n.key(),
                                ..base
                            });
                            Outcome::Delivered
                        }
                        RouteState::Maintenance => Outcome::DestinationMaintenance,
                        RouteState::Down => Outcome::DestinationDown,
                    }
                } else if self.external.is_some() || self.routes_out() {
                    to_store.push(NewPacket {
                        flags: flags::TO_EXTERNAL,
                        ..base
                    });
                    Outcome::Accepted
                } else {
                    Outcome::UnknownDestination
                };
                slots.push(Slot::Copies(first..to_store.len(), o));
            }
        }
        let stored = match self.queue.store(&to_store) {
            Ok(s) => s,
            Err(QueueError::Full) => {
                return ScsiOutcome {
                    status: vendor::status::TASK_SET_FULL,
                    data_out_len: Some(param_len),
                    ..ScsiOutcome::default()
                }
            }
            Err(e) => return media_failed(&e),
        };
        if originals > 0 {
            if let Err(e) = self.queue.wait_stored(originals) {
                return media_failed(&e);
            }
        }
        self.forward_external(&to_store, &stored);
        self.echo_delivered(&list.records, &slots, &stored);
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(slots.len());
        for slot in &slots {
            let o = match slot {
                Slot::Fixed(o) => *o,
                Slot::SameAs(i) => outcomes[*i],
                Slot::Copies(range, o) => {
                    let copies = &stored[range.clone()];
                    if copies.contains(&StoreResult::OverQuota) {
                        Outcome::DestinationQueueFull
                    } else if let Some(StoreResult::Duplicate(_, orig)) = copies.first() {
                        // Its original raced it in on another path.
                        *orig
                    } else {
                        *o
                    }
                }
            };
            outcomes.push(o);
        }
        let results: Vec<PacketResult> = list
            .records
            .iter()
            .zip(&outcomes)
            .map(|(r, &outcome)| PacketResult {
                packet_id: r.packet_id,
                outcome,
            })
            .collect();
        lock(&self.results).insert(nexus.id, (tag, results));
        {
            let mut by = lock(&self.sent_by);
            let mine = by.entry(sender).or_default();
            for o in &outcomes {
                if let Some(i) = Outcome::ALL.iter().position(|a| a == o) {
                    self.outcomes[i].fetch_add(1, Ordering::Relaxed);
                    mine[i] += 1;
                }
            }
        }
        let st = SendStatus::of(outcomes);
        let mut out = match st.sense() {
            Some(s) => check(s),
            None => good(Vec::new()),
        };
        out.data_out_len = Some(param_len);
        out
    }

    /// Hands stored packets for the outside to the external port; it acknowledges them
    /// (they have left), and a packet no gateway takes earns its sender a notice.
    fn forward_external(&self, stored: &[NewPacket], results: &[StoreResult]) {
        if self.external.is_none() && !self.routes_out() {
            return;
        }
        let mut acked = Vec::new();
        let mut notices = Vec::new();
        for (p, r) in stored.iter().zip(results) {
            // A retry was forwarded with its original.
            let StoreResult::Stored(seq) = *r else {
                continue;
            };
            if p.node != EXTERNAL_KEY {
                continue;
            }
            if !self.send_out(p.dest, p.source, &p.payload) {
                notices.push(self.notice(p.sender, p.dest, p.packet_id, Outcome::DestinationDown));
            }
            acked.push(seq);
        }
        if !acked.is_empty() {
            if let Err(e) = self.queue.ack(EXTERNAL_KEY, 0, &acked) {
                warn!("external port ack: {e}");
            }
        }
        let notices: Vec<NewPacket> = notices.into_iter().flatten().collect();
        if !notices.is_empty() {
            if let Err(e) = self.queue.store(&notices) {
                warn!("delivery-failure notices not stored: {e}");
            }
        }
    }

    /// Whether the external interfaces carry packets out (there is at least one).
    fn routes_out(&self) -> bool {
        self.interfaces.as_ref().is_some_and(|i| !i.is_empty())
    }

    /// One packet for the outside: through the external interfaces when there are any
    /// (a packet kept until a path is healthy counts as taken), else the UDP port.
    /// `false` when nothing took it.
    fn send_out(&self, dest: NodeAddr, source: NodeAddr, payload: &[u8]) -> bool {
        match (&self.interfaces, &self.external) {
            (Some(ifs), _) if !ifs.is_empty() => ifs.send(payload) != SendVerdict::Dropped,
            (_, Some(x)) => x.send(dest, source, payload),
            _ => false,
        }
    }

    /// Copies of the packets just delivered between nodes to the echo interface: one per
    /// packet (a broadcast once), and only those that were stored.
    fn echo_delivered(
        &self,
        records: &[vendor::SendRecord],
        slots: &[Slot],
        stored: &[StoreResult],
    ) {
        let Some(ifs) = self.interfaces.as_ref().filter(|i| i.echoes()) else {
            return;
        };
        for (r, slot) in records.iter().zip(slots) {
            let Slot::Copies(range, Outcome::Delivered) = slot else {
                continue;
            };
            if stored.get(range.clone()).is_some_and(|c| {
                !c.is_empty() && c.iter().all(|x| matches!(x, StoreResult::Stored(_)))
            }) {
                ifs.echo(&r.payload);
            }
        }
    }

    /// A delivery-failure notice for `sender` about its packet to `dest`.
    fn notice(
        &self,
        sender: NodeAddr,
        dest: NodeAddr,
        packet_id: u64,
        why: Outcome,
    ) -> Option<NewPacket> {
        let table = lock(&self.table);
        let n = table.by_key(&sender)?;
        Some(NewPacket {
            node: n.key(),
            dest: n.source(),
            source: dest,
            // The target itself sends notices; they take no part in duplicate checks.
            sender: NodeAddr::default(),
            packet_id,
            flags: flags::NOTICE,
            payload: vec![why.code(), 0, 0, 0],
        })
    }

    /// Room for a RECEIVE or REPLAY response: what the CDB allows, cut to what the
    /// transport will carry (the Expected Data Transfer Length) and to
    /// [`RESPONSE_BYTES_MAX`], so no record is built that could not reach the initiator.
    fn response_room(alloc_len: u32, cmd: &ScsiCommand<'_>) -> usize {
        alloc_len.min(cmd.expected_len).min(RESPONSE_BYTES_MAX) as usize
    }

    fn receive(
        &self,
        nexus: &ItNexus,
        c: vendor::ReceiveCdb,
        cmd: &ScsiCommand<'_>,
    ) -> ScsiOutcome {
        let Some((key, _)) = self.node_key(nexus.id) else {
            return not_registered();
        };
        if c.alloc_len == 0 {
            return good(Vec::new());
        }
        let room = Self::response_room(c.alloc_len, cmd);
        let budget = room.saturating_sub(vendor::RECORD_LIST_HEADER_LEN);
        let max = if c.max_records == 0 {
            65_535
        } else {
            (c.max_records as usize).min(65_535)
        };
        let now = Instant::now();
        let until = match cmd.resume_until {
            Some(u) => u,
            None if c.wait => now + Duration::from_millis(c.timeout_ms()).min(RECEIVE_WAIT_MAX),
            None => now,
        };
        // Subscribed before looking, so a store in between wakes the parked command.
        let wake = (until > now).then(|| self.queue.subscribe(key));
        let (packets, more) = match self.queue.receive(key, max, budget, record_size) {
            Ok(x) => x,
            Err(e) => return media_failed(&e),
        };
        if packets.is_empty() && !more {
            if let Some(wake) = wake {
                // Nothing yet: the transport waits without a thread and runs this again.
                let mut out = good(RecordList::default().encode());
                out.park = Some(Park { wake, until });
                return out;
            }
        }
        // Where each record ends in the response, to know which were not sent whole.
        let mut ends = Vec::with_capacity(packets.len());
        let mut end = vendor::RECORD_LIST_HEADER_LEN;
        for p in &packets {
            end += record_size(p.payload.len());
            ends.push((p.seq, end));
        }
        let data = RecordList {
            more,
            records: packets.into_iter().map(delivered).collect(),
        }
        .encode();
        debug_assert_eq!(data.len(), end, "records are laid out as record_size says");
        let mut out = good(data);
        if !ends.is_empty() {
            let queue = Arc::clone(&self.queue);
            out.on_sent = Some(DataInSent::new(move |sent| {
                if let Some(&(seq, _)) = ends.iter().find(|&&(_, end)| end > sent) {
                    queue.undeliver(key, seq);
                }
            }));
        }
        out
    }

    fn replay(&self, nexus: &ItNexus, c: vendor::ReplayCdb, cmd: &ScsiCommand<'_>) -> ScsiOutcome {
        let Some((key, _)) = self.node_key(nexus.id) else {
            return not_registered();
        };
        if c.alloc_len == 0 {
            return good(Vec::new());
        }
        let room = Self::response_room(c.alloc_len, cmd);
        let budget = room.saturating_sub(vendor::RECORD_LIST_HEADER_LEN);
        let (seq, ms) = match c.from {
            ReplayFrom::Seq(s) => (s, 0),
            ReplayFrom::Time(t) => (0, t),
        };
        match self.queue.replay(key, seq, ms, 65_535, budget, record_size) {
            Ok((packets, more)) => good(
                RecordList {
                    more,
                    records: packets.into_iter().map(delivered).collect(),
                }
                .encode(),
            ),
            Err(e) => media_failed(&e),
        }
    }

    fn ack(&self, nexus: &ItNexus, c: AckCdb, data: &[u8]) -> ScsiOutcome {
        let Some((key, _)) = self.node_key(nexus.id) else {
            return not_registered();
        };
        let (upto, list, param_len) = match c {
            AckCdb::UpTo(s) => (s, Vec::new(), None),
            AckCdb::List { param_len } => {
                let d = &data[..data.len().min(param_len as usize)];
                match AckList::decode(d) {
                    Ok(l) => (0, l.seqs, Some(param_len)),
                    Err(e) => return check(e.sense()),
                }
            }
        };
        let mut out = match self.queue.ack(key, upto, &list) {
            Ok(()) => good(Vec::new()),
            Err(QueueError::Full) => ScsiOutcome {
                status: vendor::status::TASK_SET_FULL,
                ..ScsiOutcome::default()
            },
            Err(e) => media_failed(&e),
        };
        out.data_out_len = param_len;
        out
    }

    fn node(&self, nexus: &ItNexus, c: NodeCdb, data: &[u8]) -> ScsiOutcome {
        match c {
            NodeCdb::Register { param_len } => {
                let d = &data[..data.len().min(param_len as usize)];
                let list = match AddressList::decode(d) {
                    Ok(l) => l,
                    Err(e) => return check(e.sense()),
                };
                let r = {
                    let mut t = lock(&self.table);
                    let before = t.clone();
                    let r = t.register(nexus.id, &nexus.initiator_name, &list.addrs);
                    if r.is_ok() && t.registry() != before.registry() {
                        // Durable before GOOD: a restart must not hand these addresses
                        // (and the packets queued under them) to another initiator.
                        if let Err(e) = self.persist(&t) {
                            *t = before;
                            error!("node registry not stored: {e}");
                            let mut out = check(Sense::new(key::HARDWARE_ERROR, 0x3e, 0x01));
                            out.data_out_len = Some(param_len);
                            return out;
                        }
                    }
                    r
                };
                let mut out = match r {
                    Ok(key) => {
                        info!(initiator = %nexus.initiator_name, node = %key, "node registered");
                        self.queue.rewind(key);
                        good(Vec::new())
                    }
                    Err(RegisterError::Taken(k)) => {
                        let off = vendor::LIST_HEADER_LEN + 16 * k;
                        check(
                            common::INVALID_FIELD_IN_PARAM_LIST
                                .param_field(off as u16, None)
                                .with_info(off as u64),
                        )
                    }
                };
                out.data_out_len = Some(param_len);
                out
            }
            NodeCdb::SetState(s) => {
                if lock(&self.table).set_maintenance(nexus.id, s == NodeState::Maintenance) {
                    good(Vec::new())
                } else {
                    not_registered()
                }
            }
            NodeCdb::Query { alloc_len } => {
                let table = lock(&self.table);
                let Some(n) = table.node_of(nexus.id) else {
                    return not_registered();
                };
                let fit = (alloc_len as usize).saturating_sub(vendor::LIST_HEADER_LEN) / 16;
                good(
                    NodeInfo {
                        state: if n.maintenance {
                            NodeState::Maintenance
                        } else {
                            NodeState::Available
                        },
                        total: n.addrs.len() as u16,
                        addrs: n.addrs.iter().take(fit).copied().collect(),
                    }
                    .encode(),
                )
            }
            NodeCdb::RoutingTable { alloc_len } => {
                // The table lists every node's addresses and state: a map of the network
                // is for its members only, as QUEUE STATS is.
                let entries = {
                    let table = lock(&self.table);
                    if table.node_of(nexus.id).is_none() {
                        return not_registered();
                    }
                    table.entries(nexus.id)
                };
                let fit = (alloc_len as usize).saturating_sub(vendor::LIST_HEADER_LEN)
                    / vendor::ROUTE_ENTRY_LEN;
                good(
                    vendor::RouteList {
                        total: entries.len().min(usize::from(u16::MAX)) as u16,
                        entries: entries.into_iter().take(fit).collect(),
                    }
                    .encode(),
                )
            }
            NodeCdb::QueueStats { alloc_len: _ } => {
                let Some((key, _)) = self.node_key(nexus.id) else {
                    return not_registered();
                };
                let s = self.queue.stats(key);
                good(
                    QueueStats {
                        queued_records: s.queued_records,
                        queued_bytes: s.queued_bytes,
                        first_unacked: s.first_unacked,
                        last_delivered: s.last_delivered,
                        last_assigned: s.last_assigned,
                        capacity_bytes: self.queue.capacity(),
                    }
                    .encode(),
                )
            }
        }
    }

    fn send_results(&self, nexus: &ItNexus, c: vendor::SendResultsCdb) -> ScsiOutcome {
        let results = lock(&self.results);
        let Some((tag, list)) = results.get(&nexus.id).filter(|(t, _)| *t == c.batch_tag) else {
            return check(common::INVALID_FIELD_IN_CDB.cdb_field(2, None));
        };
        if c.alloc_len == 0 {
            return good(Vec::new());
        }
        let fit = (c.alloc_len as usize).saturating_sub(vendor::RESULTS_HEADER_LEN)
            / vendor::RESULT_ENTRY_LEN;
        good(
            SendResults {
                batch_tag: *tag,
                total: list.len() as u16,
                results: list.iter().take(fit).copied().collect(),
            }
            .encode(),
        )
    }

    /// Sends failure notices for packets whose destination stayed down too long, and
    /// lets retention expire acknowledged packets.
    /// The housekeeping thread runs it every second.
    pub fn tick(&self) {
        let down: Vec<(NodeAddr, NodeAddr)> = lock(&self.table)
            .nodes()
            .iter()
            .filter(|n| n.state() == RouteState::Down)
            .map(|n| (n.key(), n.source()))
            .collect();
        let cutoff = self
            .clock
            .now_ms()
            .saturating_sub(self.delivery_timeout.as_millis() as u64);
        let mut notices = Vec::new();
        for (key, addr) in down {
            for (sender, id, _seq) in self.queue.overdue(key, cutoff) {
                if sender != NodeAddr::default() {
                    notices.extend(self.notice(sender, addr, id, Outcome::DestinationDown));
                }
            }
        }
        if !notices.is_empty() {
            info!(count = notices.len(), "delivery-failure notices");
            if let Err(e) = self.queue.store(&notices) {
                warn!("delivery-failure notices not stored: {e}");
            }
        }
        let _ = self.queue.expire();
    }

    /// A packet from outside: delivered if its destination is an available node, else
    /// dropped (Figure 8). A packet whose source is a node's address is dropped too: it
    /// would let the outside pose as that node to the others.
    fn deliver_incoming(
        &self,
        dest: NodeAddr,
        source: NodeAddr,
        payload: Vec<u8>,
    ) -> Result<(), DropReason> {
        self.take_incoming(dest, source, payload)
            .map_err(|e| match e {
                IfDrop::SpoofedSource => DropReason::SpoofedSource,
                _ => DropReason::Undeliverable,
            })
    }

    /// [`deliver_incoming`](Self::deliver_incoming) with the precise reason of a drop.
    fn take_incoming(
        &self,
        dest: NodeAddr,
        source: NodeAddr,
        payload: Vec<u8>,
    ) -> Result<(), IfDrop> {
        self.take_incoming_batch(vec![(dest, source, payload)])
            .pop()
            .unwrap_or(Err(IfDrop::QueueFull))
    }

    /// Packets from outside (destination, source, payload), decided one by one and
    /// stored together: one commit for the batch, so a reader behind a busy interface
    /// catches up instead of falling further behind. One result per packet, in order.
    fn take_incoming_batch(
        &self,
        packets: Vec<(NodeAddr, NodeAddr, Vec<u8>)>,
    ) -> Vec<Result<(), IfDrop>> {
        let mut verdicts: Vec<Result<(), IfDrop>> = Vec::with_capacity(packets.len());
        let mut to_store = Vec::new();
        {
            let table = lock(&self.table);
            for (dest, source, payload) in packets {
                // Checked before the destination, and against every node known, down or
                // not: whether the source is spoofed does not depend on where it goes.
                let node = if table.lookup(&source).is_some() {
                    Err(IfDrop::SpoofedSource)
                } else {
                    match table.lookup(&dest) {
                        Some(n) => match n.state() {
                            RouteState::Available => Ok(n.key()),
                            RouteState::Maintenance => Err(IfDrop::DestMaintenance),
                            RouteState::Down => Err(IfDrop::DestDown),
                        },
                        None => Err(IfDrop::DestUnknown),
                    }
                };
                verdicts.push(node.map(|node| {
                    to_store.push(NewPacket {
                        node,
                        dest,
                        source,
                        sender: EXTERNAL_KEY,
                        packet_id: 0,
                        flags: flags::FROM_EXTERNAL,
                        payload,
                    });
                }));
            }
        }
        if to_store.is_empty() {
            return verdicts;
        }
        let stored = self.queue.store(&to_store);
        let mut results = stored.as_deref().unwrap_or(&[]).iter();
        for v in verdicts.iter_mut().filter(|v| v.is_ok()) {
            // The node's quota is full, or the queue failed: dropped like any
            // undeliverable packet.
            if !matches!(results.next(), Some(StoreResult::Stored(_))) {
                *v = Err(IfDrop::QueueFull);
            }
        }
        verdicts
    }
}

fn housekeeping(agent: &Weak<RoutingAgent>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(a) = agent.upgrade() else {
            return;
        };
        a.tick();
    }
}

fn external_in(agent: &Weak<RoutingAgent>) {
    loop {
        let Some(a) = agent.upgrade() else {
            return;
        };
        let Some(x) = &a.external else {
            return;
        };
        if let Some(d) = x.recv(Duration::from_millis(500)) {
            match a.deliver_incoming(d.dest, d.source, d.payload) {
                Ok(()) => {
                    x.received
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(why) => x.drop_datagram(why, d.from),
            }
        }
    }
}

/// Packets read from an interface in one go at most: what has queued up while the last
/// batch was stored.
const INBOUND_BATCH_MAX: usize = 256;

/// Reads interface `i` and hands what comes in to the agent, in batches.
fn interface_in(agent: &Weak<RoutingAgent>, i: usize) {
    let mut buf = vec![0u8; super::interfaces::PACKET_MAX];
    loop {
        let Some(a) = agent.upgrade() else {
            return;
        };
        let Some(ifs) = &a.interfaces else {
            return;
        };
        let batch = ifs.receive_batch(i, &mut buf, Duration::from_millis(500), INBOUND_BATCH_MAX);
        if batch.is_empty() {
            continue;
        }
        let verdicts = a.take_incoming_batch(
            batch
                .iter()
                .map(|d: &Inbound| {
                    (
                        NodeAddr::from(d.dest),
                        NodeAddr::from(d.source),
                        d.packet.clone(),
                    )
                })
                .collect(),
        );
        for (d, v) in batch.iter().zip(verdicts) {
            match v {
                Ok(()) => ifs.taken(d),
                Err(why) => ifs.refused(d, why),
            }
        }
    }
}

/// Judges the interfaces' health every tick and sends each one's probes at its interval;
/// between ticks it waits on rtnetlink, and judges again at once when a link changes, so
/// a link that drops fails its path without waiting for probe misses.
fn prober(agent: &Weak<RoutingAgent>) {
    let mut last_probe: Vec<Option<Instant>> = Vec::new();
    loop {
        let Some(a) = agent.upgrade() else {
            return;
        };
        let Some(ifs) = &a.interfaces else {
            return;
        };
        last_probe.resize(ifs.len(), None);
        let now = Instant::now();
        let due: Vec<bool> = (0..ifs.len())
            .map(|i| last_probe[i].is_none_or(|t| now.duration_since(t) >= ifs.probe_interval(i)))
            .collect();
        for (i, d) in due.iter().enumerate() {
            if *d {
                last_probe[i] = Some(now);
            }
        }
        ifs.probe_round(now, &|i| due.get(i).copied().unwrap_or(false));
        let next = now + ifs.tick();
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if ifs.watch_links(left) {
                // No probe is due: only the link states are judged again.
                ifs.probe_round(Instant::now(), &|_| false);
            }
        }
    }
}

impl VendorHandler for RoutingAgent {
    fn execute(&self, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> ScsiOutcome {
        let c = match VendorCdb::parse(cmd.cdb) {
            Ok(c) => c,
            Err(e) => return check(e.sense()),
        };
        match c {
            VendorCdb::Send(s) => self.send(nexus, s.batch_tag, s.param_len, cmd.data_out),
            VendorCdb::Receive(r) => self.receive(nexus, r, cmd),
            VendorCdb::Ack(a) => self.ack(nexus, a, cmd.data_out),
            VendorCdb::Replay(r) => self.replay(nexus, r, cmd),
            VendorCdb::Node(n) => self.node(nexus, n, cmd.data_out),
            VendorCdb::SendResults(r) => self.send_results(nexus, r),
        }
    }

    fn nexus_added(&self, nexus: &ItNexus) {
        let key = lock(&self.table).nexus_added(nexus.id, &nexus.initiator_name);
        if let Some(k) = key {
            // A new session gets again what an old one may have lost with its connection.
            self.queue.rewind(k);
        }
    }

    fn nexus_removed(&self, nexus: &ItNexus) {
        lock(&self.table).nexus_removed(nexus.id);
        lock(&self.results).remove(&nexus.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::cache::WriteCache;
    use crate::media::mirror::MirrorSet;
    use crate::routing::packet_queue::QueueOptions;
    use crate::scsi::TaskAttr;
    use std::net::Ipv4Addr;

    const NAME: &str = "iqn.2026-11.org.ftss:agent-test";

    fn a(x: u8) -> NodeAddr {
        NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
    }

    fn nexus() -> ItNexus {
        ItNexus {
            id: 7,
            initiator_name: NAME.into(),
            isid: [0; 6],
            tpgt: 1,
        }
    }

    fn receive_cmd(cdb: &[u8], resume_until: Option<Instant>) -> ScsiCommand<'_> {
        ScsiCommand {
            lun: 0,
            cdb,
            data_out: &[],
            expected_len: 1 << 20,
            attr: TaskAttr::Simple,
            resume_until,
        }
    }

    fn receive_cdb(wait_100ms: u16) -> Vec<u8> {
        vendor::ReceiveCdb {
            wait: wait_100ms > 0,
            max_records: 0,
            alloc_len: 1 << 20,
            timeout: wait_100ms,
        }
        .encode()
    }

    fn ids(o: &ScsiOutcome) -> Vec<u64> {
        RecordList::decode(&o.data_in)
            .expect("FR list")
            .records
            .iter()
            .map(|r| r.packet_id)
            .collect()
    }

    #[test]
    fn receive_parks_when_empty_and_redelivers_what_was_not_sent() {
        let dir = std::env::temp_dir().join(format!("ftss-agent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let blocks = 4096;
        let set = Arc::new(
            MirrorSet::open(&[dir.join("a"), dir.join("b")], blocks, 512).expect("mirrors"),
        );
        let cache = WriteCache::open(
            &dir.join("cache"),
            8192 + (2 << 20),
            HashMap::from([(1, set)]),
        )
        .expect("cache");
        let queue = PacketQueue::open(Arc::clone(&cache), 1, blocks, 512, QueueOptions::default())
            .expect("queue");
        let agent = RoutingAgent::start(
            Arc::clone(&queue),
            AgentConfig {
                nodes: vec![(NAME.into(), vec![a(2)])],
                delivery_timeout: Duration::from_secs(60),
                external: None,
                registry: None,
            },
        )
        .expect("agent");
        let n = nexus();
        agent.nexus_added(&n);

        // Nothing queued: a long poll parks, with its deadline, and answers an empty list
        // to a transport that cannot park.
        let cdb = receive_cdb(50);
        let mut parked = agent.execute(&n, &receive_cmd(&cdb, None));
        let park = parked.park.take().expect("parked");
        assert!(park.until > Instant::now() + Duration::from_secs(4));
        assert!(ids(&parked).is_empty());
        let stored = queue
            .store(&[NewPacket {
                node: a(2),
                dest: a(2),
                source: a(1),
                sender: a(1),
                packet_id: 1,
                flags: 0,
                payload: vec![1; 10],
            }])
            .expect("store");
        assert_eq!(stored.len(), 1);
        assert!(park.wake.has_changed().expect("queue alive"), "woken");

        // Run again after the wake: the record comes, with a hook.
        let got = agent.execute(&n, &receive_cmd(&cdb, Some(park.until)));
        assert!(got.park.is_none());
        assert_eq!(ids(&got), vec![1]);
        // The response never went out (aborted): the hook drops and the record comes
        // again.
        drop(got);
        let mut again = agent.execute(&n, &receive_cmd(&receive_cdb(0), None));
        assert_eq!(ids(&again), vec![1]);
        // Sent whole this time: nothing comes again, and a poll past its deadline answers
        // at once.
        let len = again.data_in.len();
        again.on_sent.take().expect("a hook").sent(len);
        let past = Instant::now();
        let done = agent.execute(&n, &receive_cmd(&cdb, Some(past)));
        assert!(done.park.is_none());
        assert!(ids(&done).is_empty());

        cache.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn packets_for_the_outside_left_by_a_crash_go_out_at_start() {
        let dir = std::env::temp_dir().join(format!("ftss-agent-backlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let blocks = 4096;
        let set = Arc::new(
            MirrorSet::open(&[dir.join("a"), dir.join("b")], blocks, 512).expect("mirrors"),
        );
        let cache = WriteCache::open(
            &dir.join("cache"),
            8192 + (2 << 20),
            HashMap::from([(1, set)]),
        )
        .expect("cache");
        let queue = PacketQueue::open(Arc::clone(&cache), 1, blocks, 512, QueueOptions::default())
            .expect("queue");
        // What a crash between storing and forwarding leaves: stored, not acknowledged.
        let outside = NodeAddr::from(Ipv4Addr::new(198, 51, 100, 10));
        let left: Vec<NewPacket> = (1..=3u64)
            .map(|id| NewPacket {
                node: EXTERNAL_KEY,
                dest: outside,
                source: a(2),
                sender: a(2),
                packet_id: id,
                flags: flags::TO_EXTERNAL,
                payload: vec![id as u8; 8],
            })
            .collect();
        queue.store(&left).expect("store");
        assert_eq!(queue.stats(EXTERNAL_KEY).queued_records, 3);
        let gateway = std::net::UdpSocket::bind("127.0.0.1:0").expect("gateway");
        gateway
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let agent = RoutingAgent::start(
            Arc::clone(&queue),
            AgentConfig {
                nodes: vec![(NAME.into(), vec![a(2)])],
                delivery_timeout: Duration::from_secs(60),
                external: Some((
                    "127.0.0.1:0".parse().expect("bind"),
                    vec![gateway.local_addr().expect("addr")],
                )),
                registry: None,
            },
        )
        .expect("agent");
        let mut buf = [0u8; 256];
        for id in 1..=3u8 {
            let n = gateway.recv(&mut buf).expect("forwarded at start");
            assert_eq!(&buf[..16], &outside.0, "destination");
            assert_eq!(&buf[n - 8..n], &[id; 8], "payload {id}, in order");
        }
        assert_eq!(
            queue.stats(EXTERNAL_KEY).queued_records,
            0,
            "acknowledged once gone"
        );
        drop(agent);
        cache.shutdown();
        let _ = std::fs::remove_dir_all(dir);
    }
}

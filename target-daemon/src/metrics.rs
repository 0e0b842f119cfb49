//! The Prometheus endpoint: `GET /metrics` on `server.metrics` (off when unset), in the
//! OpenMetrics text format of the `prometheus-client` crate.
//!
//! Two kinds of figures:
//! - counters and latency histograms the hot paths bump as they go: per LUN and kind of
//!   command ([`LunMetrics`], recorded where a command's response goes out), the write
//!   cache's commits and destaged bytes, the routing agent's SEND outcomes. They
//!   are plain atomics with fixed buckets ([`Histogram`]): a command pays a few relaxed
//!   adds and no allocation or lock;
//! - gauges read at scrape time from the same sources as `admin status` and
//!   `admin nodes` (cache dirty bytes, mirror states and rebuild or scrub progress,
//!   per-node queues, sessions and connections per target, external port counters, the
//!   external interfaces' health, roles, counters and backlog),
//!   so nothing is threaded through the daemon just to be exported.
//!
//! The HTTP side is deliberately tiny: one request per connection, read with a size
//! bound ([`REQUEST_BYTES_MAX`]) and a deadline ([`REQUEST_TIMEOUT`]), at most
//! [`CONNECTIONS_MAX`] at once, answered and closed. A slow or hostile client can hold
//! neither memory nor tasks.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ftss_proto::vendor::Outcome;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

pub use crate::counters::{Histogram, HistogramSnapshot, LunMetrics, OpKind, LATENCY_BOUNDS_S};

use crate::admin::MediaHandles;
use crate::iscsi::session::Shared;
use crate::media::mirror::MirrorState;
use crate::routing::interfaces::{Health, IfDrop, InterfaceStatus};

/// Most bytes of a request read before it is refused (431): a scrape is one short line
/// and a few headers.
pub const REQUEST_BYTES_MAX: usize = 8 << 10;
/// Longest a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrape connections served at once; more are closed unanswered.
pub const CONNECTIONS_MAX: usize = 16;
/// After answering, how long and how many bytes of a request's rest are read and
/// dropped before closing (see [`serve`]).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES_MAX: usize = 1 << 20;

/// The `outcome` label value of a packet outcome.
pub const fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Delivered => "delivered",
        Outcome::Accepted => "accepted",
        Outcome::UnknownDestination => "unknown_destination",
        Outcome::DestinationDown => "destination_down",
        Outcome::DestinationMaintenance => "destination_maintenance",
        Outcome::DestinationQueueFull => "destination_queue_full",
    }
}

/// Reads every figure at scrape time from the daemon's live state.
struct DaemonCollector {
    media: MediaHandles,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DaemonCollector")
    }
}

/// A gauge or counter value as the encoder wants it.
#[derive(Clone, Copy)]
enum Value {
    Counter(u64),
    Gauge(f64),
}

/// Writes one metric family: its descriptor, then each labelled sample.
fn family<'a, const N: usize>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = ([(&'a str, &'a str); N], Value)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, v) in samples {
        let mut s = m.encode_family(&labels)?;
        encode_value(&mut s, v)?;
    }
    Ok(())
}

/// Writes a metric without labels.
fn single(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: Value,
) -> Result<(), std::fmt::Error> {
    let kind = match v {
        Value::Counter(_) => MetricType::Counter,
        Value::Gauge(_) => MetricType::Gauge,
    };
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    encode_value(&mut m, v)
}

fn encode_value(m: &mut MetricEncoder<'_>, v: Value) -> Result<(), std::fmt::Error> {
    match v {
        Value::Counter(c) => {
            m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&c, None)
        }
        Value::Gauge(g) => m.encode_gauge(&g),
    }
}

fn encode_histogram(
    m: &mut MetricEncoder<'_>,
    h: &HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum_s, h.count, &h.buckets, None,
    )
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl DaemonCollector {
    fn luns(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Label values are built once per scrape; the iteration order is stable.
        let mut luns = Vec::new();
        for t in &self.shared.targets {
            for lun in t.scsi.luns() {
                luns.push((t.iqn.as_str(), lun));
            }
        }
        let rows: Vec<_> = luns
            .iter()
            .map(|(iqn, l)| (*iqn, l.number.to_string(), &l.metrics))
            .collect();
        let each = |f: &dyn Fn(&LunMetrics, OpKind) -> Value| {
            let mut out = Vec::new();
            for (iqn, n, m) in &rows {
                for k in OpKind::ALL {
                    out.push((
                        [("target", *iqn), ("lun", n.as_str()), ("kind", k.name())],
                        f(m, k),
                    ));
                }
            }
            out
        };
        family(
            enc,
            "ftss_lun_ops",
            "SCSI commands completed per LUN and kind (vendor packet commands not included).",
            None,
            MetricType::Counter,
            each(&|m, k| Value::Counter(m.ops(k))),
        )?;
        family(
            enc,
            "ftss_lun",
            "Data bytes moved by successful commands per LUN and kind (data-out of writes, data-in of reads).",
            Some(&Unit::Bytes),
            MetricType::Counter,
            each(&|m, k| Value::Counter(m.bytes(k))),
        )?;
        family(
            enc,
            "ftss_lun_inline_served",
            "Commands per LUN and kind completed on the connection's async worker, without a thread handoff (READ, WRITE and SYNCHRONIZE CACHE on cached LUNs).",
            None,
            MetricType::Counter,
            each(&|m, k| Value::Counter(m.inline_served(k))),
        )?;
        family(
            enc,
            "ftss_lun_inline_refused",
            "Commands per LUN and kind tried on the async worker that would have waited there (data not in memory, ring full, lock held) and ran again on a blocking thread.",
            None,
            MetricType::Counter,
            each(&|m, k| Value::Counter(m.inline_refused(k))),
        )?;
        let mut h = enc.encode_descriptor(
            "ftss_lun_latency",
            "Time from a command's PDU to its response, write-cache commit included.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (iqn, n, m) in &rows {
            for k in OpKind::ALL {
                let labels = [("target", *iqn), ("lun", n.as_str()), ("kind", k.name())];
                let mut s = h.encode_family(&labels)?;
                encode_histogram(&mut s, &m.latency(k).snapshot())?;
            }
        }
        Ok(())
    }

    fn cache(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(c) = &self.media.cache else {
            return Ok(());
        };
        let s = c.stats();
        single(
            enc,
            "ftss_cache_dirty",
            "Bytes in the write cache not yet destaged to the mirrors.",
            Some(&Unit::Bytes),
            Value::Gauge(s.dirty_bytes as f64),
        )?;
        single(
            enc,
            "ftss_cache_size",
            "Size of the write cache's ring.",
            Some(&Unit::Bytes),
            Value::Gauge(s.ring_bytes as f64),
        )?;
        single(
            enc,
            "ftss_cache_records",
            "Records appended to the write cache.",
            None,
            Value::Counter(s.records),
        )?;
        single(
            enc,
            "ftss_cache_destage",
            "Bytes the write cache destaged to the mirror sets.",
            Some(&Unit::Bytes),
            Value::Counter(s.destaged_bytes),
        )?;
        let mut h = enc.encode_descriptor(
            "ftss_cache_commit",
            "Duration of each group commit of the write cache (its write and flush).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        encode_histogram(&mut h, &c.commit_latency().snapshot())
    }

    fn mirrors(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut members = Vec::new();
        let mut sets = Vec::new();
        for (name, set) in &self.media.volumes {
            for (i, m) in set.status().into_iter().enumerate() {
                members.push((name.as_str(), i.to_string(), m.state, set.blocks()));
            }
            sets.push((name.as_str(), Arc::clone(set)));
        }
        family(
            enc,
            "ftss_mirror_state",
            "State of each mirror of a set: 0 healthy, 1 rebuilding, 2 failed.",
            None,
            MetricType::Gauge,
            members.iter().map(|(set, i, st, _)| {
                let v = match st {
                    MirrorState::Healthy => 0.0,
                    MirrorState::Rebuilding(_) => 1.0,
                    MirrorState::Failed(_) => 2.0,
                };
                ([("set", *set), ("member", i.as_str())], Value::Gauge(v))
            }),
        )?;
        family(
            enc,
            "ftss_mirror_rebuild_progress",
            "Part of a mirror that holds current data: 1 healthy, done/total while rebuilding, 0 failed.",
            Some(&Unit::Other("ratio".into())),
            MetricType::Gauge,
            members.iter().map(|(set, i, st, blocks)| {
                let v = match st {
                    MirrorState::Healthy => 1.0,
                    MirrorState::Rebuilding(done) => ratio(*done, *blocks),
                    MirrorState::Failed(_) => 0.0,
                };
                ([("set", *set), ("member", i.as_str())], Value::Gauge(v))
            }),
        )?;
        family(
            enc,
            "ftss_mirror_scrub_progress",
            "Part of the set the running scrub has verified; 0 when none runs.",
            Some(&Unit::Other("ratio".into())),
            MetricType::Gauge,
            sets.iter().map(|(name, set)| {
                let v = set.scrub_progress().map_or(0.0, |d| ratio(d, set.blocks()));
                ([("set", *name)], Value::Gauge(v))
            }),
        )?;
        family(
            enc,
            "ftss_mirror_repairs",
            "Bad copies of blocks rewritten from a good one.",
            None,
            MetricType::Counter,
            sets.iter()
                .map(|(name, set)| ([("set", *name)], Value::Counter(set.repairs()))),
        )
    }

    fn packets(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(agent) = &self.media.agent else {
            return Ok(());
        };
        family(
            enc,
            "ftss_packet_outcomes",
            "Packets of SEND commands by outcome.",
            None,
            MetricType::Counter,
            agent
                .outcome_counts()
                .map(|(o, n)| ([("outcome", outcome_name(o))], Value::Counter(n))),
        )?;
        let nodes = agent.node_metrics();
        let per_node = |f: &dyn Fn(&crate::routing::agent::NodeMetrics) -> f64| {
            nodes
                .iter()
                .map(|n| ([("node", n.node.as_str())], Value::Gauge(f(n))))
                .collect::<Vec<_>>()
        };
        family(
            enc,
            "ftss_node_queued_packets",
            "Packets stored for a node and not acknowledged.",
            None,
            MetricType::Gauge,
            per_node(&|n| n.queued_packets as f64),
        )?;
        family(
            enc,
            "ftss_node_queued",
            "Payload bytes stored for a node and not acknowledged.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            per_node(&|n| n.queued_bytes as f64),
        )?;
        family(
            enc,
            "ftss_node_oldest_unacked",
            "Age of a node's oldest unacknowledged packet; 0 when none waits.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
            per_node(&|n| n.oldest_unacked_ms as f64 / 1e3),
        )?;
        family(
            enc,
            "ftss_node_sent_packets",
            "Packets a node sent, by outcome.",
            None,
            MetricType::Counter,
            nodes.iter().flat_map(|n| {
                Outcome::ALL.iter().zip(n.sent).map(|(o, c)| {
                    (
                        [("node", n.node.as_str()), ("outcome", outcome_name(*o))],
                        Value::Counter(c),
                    )
                })
            }),
        )?;
        family(
            enc,
            "ftss_node_quota_used",
            "Share of its quota a node's queue holds (the larger of bytes and packets).",
            Some(&Unit::Other("ratio".into())),
            MetricType::Gauge,
            per_node(&|n| n.quota_used),
        )?;
        let q = agent.queue();
        single(
            enc,
            "ftss_packet_log_used",
            "Bytes of the packet log in use (unacknowledged and retained packets).",
            Some(&Unit::Bytes),
            Value::Gauge(q.used_bytes() as f64),
        )?;
        let Some(x) = agent.external_stats() else {
            return Ok(());
        };
        let rows = [
            (
                "ftss_external_sent",
                "Datagrams sent out through the external port.",
                x.sent,
            ),
            (
                "ftss_external_failed",
                "Packets for the outside no gateway took.",
                x.failed,
            ),
            (
                "ftss_external_received",
                "Datagrams from outside delivered to a node.",
                x.received,
            ),
        ];
        for (name, help, v) in rows {
            single(enc, name, help, None, Value::Counter(v))?;
        }
        family(
            enc,
            "ftss_external_dropped",
            "Datagrams from outside dropped, by reason.",
            None,
            MetricType::Counter,
            [
                ("malformed", x.dropped_malformed),
                ("unknown_peer", x.dropped_unknown_peer),
                ("spoofed_source", x.dropped_spoofed_source),
                ("undeliverable", x.dropped_undeliverable),
            ]
            .map(|(r, v)| ([("reason", r)], Value::Counter(v))),
        )
    }

    /// The external TUN interfaces, from the figures `admin status` shows.
    fn interfaces(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(st) = self
            .media
            .agent
            .as_ref()
            .and_then(|a| a.interfaces_status())
        else {
            return Ok(());
        };
        let ifs = &st.interfaces;
        let gauge = |f: &dyn Fn(&InterfaceStatus) -> bool| {
            ifs.iter()
                .map(|i| {
                    let v = if f(i) { 1.0 } else { 0.0 };
                    ([("interface", i.name.as_str())], Value::Gauge(v))
                })
                .collect::<Vec<_>>()
        };
        let counter = |f: &dyn Fn(&InterfaceStatus) -> u64| {
            ifs.iter()
                .map(|i| ([("interface", i.name.as_str())], Value::Counter(f(i))))
                .collect::<Vec<_>>()
        };
        let both_ways = |f_in: &dyn Fn(&InterfaceStatus) -> u64,
                         f_out: &dyn Fn(&InterfaceStatus) -> u64| {
            ifs.iter()
                .flat_map(|i| {
                    [
                        (
                            [("interface", i.name.as_str()), ("direction", "in")],
                            Value::Counter(f_in(i)),
                        ),
                        (
                            [("interface", i.name.as_str()), ("direction", "out")],
                            Value::Counter(f_out(i)),
                        ),
                    ]
                })
                .collect::<Vec<_>>()
        };
        family(
            enc,
            "ftss_external_interface_up",
            "Whether an external interface is healthy (link up and probes answered): 1 or 0.",
            None,
            MetricType::Gauge,
            gauge(&|i| i.state == Health::Up.name()),
        )?;
        family(
            enc,
            "ftss_external_interface_active",
            "Whether an external interface carries the traffic out: 1 or 0 (standby).",
            None,
            MetricType::Gauge,
            gauge(&|i| i.role == "active"),
        )?;
        family(
            enc,
            "ftss_external_interface_packets",
            "IP packets through an external interface: in (stored for a node), out (written).",
            None,
            MetricType::Counter,
            both_ways(&|i| i.in_packets, &|i| i.out_packets),
        )?;
        family(
            enc,
            "ftss_external_interface",
            "Bytes of those IP packets.",
            Some(&Unit::Bytes),
            MetricType::Counter,
            both_ways(&|i| i.in_bytes, &|i| i.out_bytes),
        )?;
        family(
            enc,
            "ftss_external_interface_dropped",
            "Packets dropped at an external interface, by reason.",
            None,
            MetricType::Counter,
            ifs.iter().flat_map(|i| {
                // Every reason, zero or not: a series that appears only on its first
                // drop cannot be rated.
                IfDrop::ALL.iter().map(|r| {
                    let n = i
                        .dropped
                        .iter()
                        .find(|(name, _)| *name == r.name())
                        .map_or(0, |(_, n)| *n);
                    (
                        [("interface", i.name.as_str()), ("reason", r.name())],
                        Value::Counter(n),
                    )
                })
            }),
        )?;
        family(
            enc,
            "ftss_external_interface_probes_sent",
            "ICMP echo probes sent through an external interface.",
            None,
            MetricType::Counter,
            counter(&|i| i.probes_sent),
        )?;
        family(
            enc,
            "ftss_external_interface_probes_answered",
            "ICMP echo probes answered through an external interface.",
            None,
            MetricType::Counter,
            counter(&|i| i.probes_answered),
        )?;
        family(
            enc,
            "ftss_external_interface_unreachable_sent",
            "ICMP host unreachable answers sent back through an external interface.",
            None,
            MetricType::Counter,
            counter(&|i| i.unreachable_sent),
        )?;
        single(
            enc,
            "ftss_external_backlog_packets",
            "Packets for the outside waiting for a healthy external interface.",
            None,
            Value::Gauge(st.backlog_packets as f64),
        )?;
        single(
            enc,
            "ftss_external_backlog",
            "Bytes of the packets waiting for a healthy external interface.",
            Some(&Unit::Bytes),
            Value::Gauge(st.backlog_bytes as f64),
        )?;
        family(
            enc,
            "ftss_external_backlog_dropped",
            "Packets for the outside dropped before an interface took them, by reason.",
            None,
            MetricType::Counter,
            [
                (IfDrop::BacklogExpired.name(), st.backlog_expired),
                (IfDrop::BacklogFull.name(), st.backlog_full),
                (IfDrop::Malformed.name(), st.not_ip),
            ]
            .map(|(r, v)| ([("reason", r)], Value::Counter(v))),
        )?;
        single(
            enc,
            "ftss_external_interface_switches",
            "Times the active external interface changed (to none included).",
            None,
            Value::Counter(st.switches),
        )
    }

    fn sessions(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let sessions = self.shared.registry.sessions_by_target();
        let rows: Vec<(&str, u64, u64)> = self
            .shared
            .targets
            .iter()
            .map(|t| {
                let s = sessions
                    .iter()
                    .filter(|(n, _)| n.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(&t.iqn)))
                    .map(|(_, c)| *c)
                    .sum();
                (t.iqn.as_str(), s, t.connections.load(Ordering::Relaxed))
            })
            .collect();
        family(
            enc,
            "ftss_sessions",
            "Normal sessions logged in, per target.",
            None,
            MetricType::Gauge,
            rows.iter()
                .map(|(t, s, _)| ([("target", *t)], Value::Gauge(*s as f64))),
        )?;
        family(
            enc,
            "ftss_connections",
            "Connections in the full feature phase, per target.",
            None,
            MetricType::Gauge,
            rows.iter()
                .map(|(t, _, c)| ([("target", *t)], Value::Gauge(*c as f64))),
        )?;
        let discovery = sessions
            .iter()
            .filter(|(n, _)| n.is_none())
            .map(|(_, c)| *c)
            .sum::<u64>();
        single(
            enc,
            "ftss_discovery_sessions",
            "Discovery sessions logged in.",
            None,
            Value::Gauge(discovery as f64),
        )
    }
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.luns(&mut enc)?;
        self.cache(&mut enc)?;
        self.mirrors(&mut enc)?;
        self.packets(&mut enc)?;
        self.interfaces(&mut enc)?;
        self.sessions(&mut enc)
    }
}

/// The scrape body: every metric in the OpenMetrics text format.
pub(crate) fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 << 10);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Binds the endpoint on `addr` and serves it until `stop` changes. Returns the bound
/// address (the real port when `addr` said 0) and the accept task.
pub(crate) async fn start(
    addr: SocketAddr,
    media: MediaHandles,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector { media, shared }));
    let registry = Arc::new(registry);
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((sock, peer)) => {
                        // Past the bound the connection is closed at once: scrapes are
                        // rare, so only a flood gets here.
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            debug!("metrics: too many connections, closing {peer}");
                            continue;
                        };
                        let registry = Arc::clone(&registry);
                        tokio::spawn(async move {
                            serve(sock, registry).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        warn!("metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
    });
    Ok((local, task))
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /metrics` (or HEAD: headers only).
    Metrics { head: bool },
    /// Another path.
    NotFound,
    /// A method other than GET or HEAD.
    BadMethod,
    /// Not an HTTP request line.
    Bad,
}

/// Parses the request line of `head` (the bytes up to the blank line).
fn parse_request(head: &[u8]) -> Request {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Bad;
    };
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") || words.next().is_some() {
        return Request::Bad;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::BadMethod,
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Request::Metrics { head }
    } else {
        Request::NotFound
    }
}

/// Reads until the end of the request headers, at most [`REQUEST_BYTES_MAX`] bytes.
/// `Ok(None)`: the request is too large.
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut len = 0;
    loop {
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..len].windows(2).any(|w| w == b"\n\n")
        {
            buf.truncate(len);
            return Ok(Some(buf));
        }
        if len == buf.len() {
            return Ok(None);
        }
        let n = sock.read(&mut buf[len..]).await?;
        if n == 0 {
            // The peer closed after (maybe) a bare request line: answer what it sent.
            buf.truncate(len);
            return Ok(Some(buf));
        }
        len += n;
    }
}

async fn serve(mut sock: TcpStream, registry: Arc<Registry>) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            debug!("metrics request: {e}");
            return;
        }
        Err(_) => {
            debug!("metrics request timed out");
            return;
        }
    };
    let (status, ctype, body, head_only) = match head.as_deref().map(parse_request) {
        None => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request too large\n".to_owned(),
            false,
        ),
        Some(Request::Metrics { head }) => {
            let r = Arc::clone(&registry);
            // Reading the figures takes the daemon's locks (routing table, queue, cache)
            // briefly; off the async workers like the admin socket's status.
            match tokio::task::spawn_blocking(move || render(&r)).await {
                Ok(Ok(body)) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                    head,
                ),
                Ok(Err(_)) | Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "metrics could not be encoded\n".to_owned(),
                    false,
                ),
            }
        }
        Some(Request::NotFound) => (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics\n".to_owned(),
            false,
        ),
        Some(Request::BadMethod) => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_owned(),
            false,
        ),
        Some(Request::Bad) => (
            "400 Bad Request",
            "text/plain",
            "bad request\n".to_owned(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let write = async {
        sock.write_all(&out).await?;
        sock.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        debug!("metrics answer: {e}");
        return;
    }
    // Closing with unread request bytes (an oversized request) makes the kernel send a
    // reset, which can destroy the answer before the client reads it: read and drop
    // what is left first, within a bound of bytes and time.
    let linger = async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES_MAX;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(
            parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics { head: true }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::BadMethod
        );
        assert_eq!(parse_request(b"hello\r\n\r\n"), Request::Bad);
        assert_eq!(
            parse_request(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"),
            Request::Bad
        );
    }
}

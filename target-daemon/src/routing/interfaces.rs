//! The external interfaces: TUN devices on the target host that make ftss a router
//! between the nodes and the host's network (`[[packets.external.interface]]`).
//!
//! Out: an IP packet from a node for an address no node has is written to the *active*
//! interface, the healthy one with the lowest priority number; the host's routing table,
//! NAT and firewall decide what happens beyond it. In: an IP packet the host routes into
//! any of the interfaces (its destination a node's address) is read by the daemon and
//! stored for that node like any packet (the routing agent decides; Figure 8).
//!
//! Health: each interface's link must be up and running (its `IFF_UP | IFF_RUNNING`
//! flags, as rtnetlink reports them: a dump at the start, then an event the moment a
//! link changes, which is judged at once rather than at the next probe) and, when a
//! probe address is configured, of the ICMP echoes sent every `probe_interval_ms` from
//! the daemon's own end of the link no more than `probe_misses` in a row (before the
//! one just sent) may go unanswered.
//! Misses are counted in probes, not in time: a prober thread delayed by a loaded
//! machine sends fewer probes and so fails a path later, never falsely. A TUN's own link stays up
//! while the network behind it is cut, so the probe is what sees a cut router. An
//! interface that failed is used again only after it has stayed healthy for
//! `hold_down_ms`, so a flapping path does not take the traffic back and forth.
//!
//! Packets accepted while no interface is healthy wait in a bounded backlog (age and
//! bytes); what expires or does not fit is dropped and counted. The optional echo
//! interface gets a copy of every packet delivered between nodes, so ordinary tools
//! (tcpdump) see the fabric's traffic; the daemon turns forwarding off on it so the
//! host never routes those copies.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::linkwatch::LinkWatch;
use super::netif::{self, NetifError, TunDevice};

/// Largest IP packet read from an interface (the vendor payload limit).
pub const PACKET_MAX: usize = ftss_proto::vendor::PAYLOAD_MAX;
/// Shortest interval between two log lines about drops of one reason.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest interval between two ICMP unreachable answers from one interface: a flood
/// from outside must not become a flood back.
const UNREACHABLE_GAP: Duration = Duration::from_millis(10);
/// Longest wait for the kernel's answer to the first link dump; it is local and quick,
/// so running out means something is badly wrong.
const LINK_DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// One interface's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// TUN interface name (created if missing).
    pub name: String,
    /// The host's address on the link and its prefix length; `None` leaves addressing
    /// to the operator.
    pub address: Option<(Ipv4Addr, u8)>,
    /// The daemon's own end of the link: the source of its probes and unreachable
    /// answers (the host routes replies to it into the interface).
    pub local: Option<Ipv4Addr>,
    /// MTU of the interface.
    pub mtu: u32,
    /// Lower is preferred.
    pub priority: u32,
    /// Address answering ICMP echo through this interface, when probed.
    pub probe: Option<Ipv4Addr>,
    /// Interval between probes.
    pub probe_interval: Duration,
    /// Consecutive unanswered probe intervals that make the interface unhealthy.
    pub probe_misses: u32,
    /// How long a recovered interface must stay healthy before it carries traffic again.
    pub hold_down: Duration,
}

/// Settings of all external interfaces.
#[derive(Debug, Clone, Default)]
pub struct InterfacesConfig {
    /// The interfaces, in configuration order.
    pub interfaces: Vec<InterfaceSpec>,
    /// Oldest a packet may get in the backlog (no healthy interface) before it is
    /// dropped.
    pub backlog_age_max: Duration,
    /// Most payload bytes the backlog holds; the oldest packets go first.
    pub backlog_bytes_max: usize,
    /// The monitoring interface that gets copies of inter-node packets (off if `None`).
    pub echo: Option<String>,
}

/// Why a packet was dropped at an external interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IfDrop {
    /// In: not an IPv4 or IPv6 packet.
    Malformed,
    /// In: for a multicast or broadcast address (docs/design.md: not taken in).
    Group,
    /// In: no node has the destination address.
    DestUnknown,
    /// In: the destination node is down (no session).
    DestDown,
    /// In: the destination node is in maintenance.
    DestMaintenance,
    /// In: the source is a node's address.
    SpoofedSource,
    /// In: the destination's queue did not take it (quota, media).
    QueueFull,
    /// Out: waited in the backlog longer than its age bound.
    BacklogExpired,
    /// Out: did not fit in the backlog.
    BacklogFull,
    /// Out: the interface refused the write.
    WriteFailed,
}

impl IfDrop {
    /// Every reason, in counter order.
    pub const ALL: [IfDrop; 10] = [
        IfDrop::Malformed,
        IfDrop::Group,
        IfDrop::DestUnknown,
        IfDrop::DestDown,
        IfDrop::DestMaintenance,
        IfDrop::SpoofedSource,
        IfDrop::QueueFull,
        IfDrop::BacklogExpired,
        IfDrop::BacklogFull,
        IfDrop::WriteFailed,
    ];

    fn index(self) -> usize {
        IfDrop::ALL.iter().position(|&r| r == self).unwrap_or(0)
    }

    /// The reason's name in logs and admin status.
    pub fn name(self) -> &'static str {
        match self {
            IfDrop::Malformed => "malformed",
            IfDrop::Group => "group",
            IfDrop::DestUnknown => "dest_unknown",
            IfDrop::DestDown => "dest_down",
            IfDrop::DestMaintenance => "dest_maintenance",
            IfDrop::SpoofedSource => "spoofed_source",
            IfDrop::QueueFull => "queue_full",
            IfDrop::BacklogExpired => "backlog_expired",
            IfDrop::BacklogFull => "backlog_full",
            IfDrop::WriteFailed => "write_failed",
        }
    }

    /// Whether the sender outside is told (ICMP host unreachable).
    fn answers_unreachable(self) -> bool {
        matches!(
            self,
            IfDrop::DestUnknown | IfDrop::DestDown | IfDrop::DestMaintenance
        )
    }
}

/// Health of an interface as the prober last judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not judged yet: waiting for the link and the first probe answer.
    Unknown,
    /// Link up and probes answered.
    Up,
    /// Link down or probes unanswered.
    Down,
}

impl Health {
    /// The state's name in admin status.
    pub fn name(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// The health state machine of one interface, fed with observations and `now`.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Current judgement.
    pub health: Health,
    /// Last probe answer.
    pub last_reply: Option<Instant>,
    /// Probes sent since the last answer (the one just sent included).
    pub unanswered: u32,
    /// When the interface may carry traffic (hold-down after a recovery).
    pub usable_from: Option<Instant>,
}

impl HealthCheck {
    fn new() -> Self {
        HealthCheck {
            health: Health::Unknown,
            last_reply: None,
            unanswered: 0,
            usable_from: None,
        }
    }

    /// Judges the interface at `now` from its link state and probe answers; returns the
    /// new health when it changed.
    pub fn judge(&mut self, spec: &InterfaceSpec, link_up: bool, now: Instant) -> Option<Health> {
        // The probe just sent has had no time to be answered: it is not a miss yet.
        let probe_ok = spec.probe.is_none()
            || (self.last_reply.is_some() && self.unanswered <= spec.probe_misses);
        let next = match (self.health, link_up && probe_ok) {
            (Health::Up, true) => Health::Up,
            (Health::Unknown, true) => {
                // The first time: no earlier failure to hold down.
                self.usable_from = Some(now);
                Health::Up
            }
            (Health::Down, true) => {
                // A hold-down too long to add is no way back at all.
                self.usable_from = now.checked_add(spec.hold_down);
                Health::Up
            }
            (Health::Unknown, false) if !link_up => Health::Down,
            (Health::Unknown, false) => Health::Unknown,
            (_, false) => Health::Down,
        };
        let changed = next != self.health;
        self.health = next;
        changed.then_some(next)
    }

    /// Whether the interface may carry traffic at `now`.
    pub fn usable(&self, now: Instant) -> bool {
        self.health == Health::Up && self.usable_from.is_some_and(|t| now >= t)
    }
}

/// The interface to use: the usable one with the lowest priority (then the first in
/// configuration order).
pub fn choose(specs: &[InterfaceSpec], checks: &[HealthCheck], now: Instant) -> Option<usize> {
    specs
        .iter()
        .zip(checks)
        .enumerate()
        .filter(|(_, (_, c))| c.usable(now))
        .min_by_key(|(i, (s, _))| (s.priority, *i))
        .map(|(i, _)| i)
}

#[derive(Default)]
struct Counters {
    in_packets: AtomicU64,
    in_bytes: AtomicU64,
    out_packets: AtomicU64,
    out_bytes: AtomicU64,
    probes_sent: AtomicU64,
    probes_answered: AtomicU64,
    unreachable_sent: AtomicU64,
    drops: [AtomicU64; IfDrop::ALL.len()],
}

struct Iface {
    spec: InterfaceSpec,
    tun: TunDevice,
    /// The link's index, by which rtnetlink reports its state.
    index: u32,
    check: Mutex<HealthCheck>,
    counters: Counters,
    /// Identifier of this interface's echo requests.
    probe_id: u16,
    probe_seq: Mutex<u16>,
    last_unreachable: Mutex<Option<Instant>>,
}

/// One interface in admin status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InterfaceStatus {
    /// Interface name.
    pub name: String,
    /// `up`, `down` or `unknown`.
    pub state: &'static str,
    /// `active` (carries the traffic out) or `standby`.
    pub role: &'static str,
    /// Configured priority.
    pub priority: u32,
    /// Packets from outside stored for a node, and their bytes.
    pub in_packets: u64,
    /// Bytes of those.
    pub in_bytes: u64,
    /// Packets written out, and their bytes.
    pub out_packets: u64,
    /// Bytes of those.
    pub out_bytes: u64,
    /// Probes sent and answered.
    pub probes_sent: u64,
    /// Probes answered.
    pub probes_answered: u64,
    /// ICMP host unreachable answers sent back.
    pub unreachable_sent: u64,
    /// Drops by reason (name, count), only reasons with a count.
    pub dropped: Vec<(&'static str, u64)>,
}

/// The backlog and echo figures in admin status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InterfacesStatus {
    /// Every interface.
    pub interfaces: Vec<InterfaceStatus>,
    /// Packets waiting for a healthy interface.
    pub backlog_packets: u64,
    /// Payload bytes of those.
    pub backlog_bytes: u64,
    /// Packets dropped from the backlog: expired.
    pub backlog_expired: u64,
    /// Packets dropped from the backlog: did not fit.
    pub backlog_full: u64,
    /// Packets for the outside dropped: not IPv4 or IPv6.
    pub not_ip: u64,
    /// Times the active interface changed.
    pub switches: u64,
    /// Copies written to the echo interface.
    pub echo_packets: u64,
}

impl std::fmt::Display for InterfacesStatus {
    /// Admin status lines: one per interface, then the backlog.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for i in &self.interfaces {
            write!(
                f,
                "external-interface {} state={} role={} priority={} in_packets={} in_bytes={} out_packets={} out_bytes={} probes_sent={} probes_answered={} unreachable_sent={}",
                i.name,
                i.state,
                i.role,
                i.priority,
                i.in_packets,
                i.in_bytes,
                i.out_packets,
                i.out_bytes,
                i.probes_sent,
                i.probes_answered,
                i.unreachable_sent
            )?;
            for (r, n) in &i.dropped {
                write!(f, " dropped_{r}={n}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "external-backlog packets={} bytes={} dropped_backlog_expired={} dropped_backlog_full={} dropped_not_ip={} switches={} echo_packets={}",
            self.backlog_packets,
            self.backlog_bytes,
            self.backlog_expired,
            self.backlog_full,
            self.not_ip,
            self.switches,
            self.echo_packets
        )
    }
}

/// What became of a packet handed to [`Interfaces::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendVerdict {
    /// Written to the active interface.
    Sent,
    /// No healthy interface: kept in the backlog.
    Kept,
    /// Dropped (not IP, or the backlog had no room even after dropping older packets).
    Dropped,
}

#[derive(Default)]
struct Backlog {
    packets: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

/// The external interfaces of the target host.
pub struct Interfaces {
    ifaces: Vec<Iface>,
    /// Link state of the interfaces (`None` without any): only the prober waits on it.
    links: Mutex<Option<LinkWatch>>,
    active: Mutex<Option<usize>>,
    backlog: Mutex<Backlog>,
    backlog_age_max: Duration,
    backlog_bytes_max: usize,
    /// Drops of packets going out before an interface was chosen, by reason.
    backlog_drops: [AtomicU64; IfDrop::ALL.len()],
    switches: AtomicU64,
    echo: Option<TunDevice>,
    echo_packets: AtomicU64,
    /// Last log line per reason.
    logged: Mutex<[Option<Instant>; IfDrop::ALL.len()]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Turns forwarding off on the echo interface: the copies written to it are for
/// watching, and must never be routed by the host (they would come back in through an
/// external interface as packets from outside with a node's source).
fn no_forwarding(name: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "0")?;
    // IPv6 forwarding is not per interface: IPv6 is turned off on it instead, which
    // drops the copies after the capture taps have seen them.
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1").or_else(|e| {
        // A kernel without IPv6 has nothing to forward.
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })
}

impl Interfaces {
    /// Opens and configures every interface (and the echo interface).
    pub fn open(cfg: &InterfacesConfig) -> Result<Interfaces, NetifError> {
        let mut ifaces = Vec::new();
        for (i, spec) in cfg.interfaces.iter().enumerate() {
            let tun = TunDevice::open(&spec.name)?;
            tun.configure(spec.address, spec.mtu)?;
            info!(
                name = tun.name(),
                address = ?spec.address,
                priority = spec.priority,
                probe = ?spec.probe,
                "external interface open"
            );
            let index = tun.index()?;
            ifaces.push(Iface {
                spec: spec.clone(),
                tun,
                index,
                check: Mutex::new(HealthCheck::new()),
                counters: Counters::default(),
                probe_id: (std::process::id() as u16) ^ ((i as u16) << 12),
                probe_seq: Mutex::new(0),
                last_unreachable: Mutex::new(None),
            });
        }
        let echo = match &cfg.echo {
            Some(name) => {
                let tun = TunDevice::open(name)?;
                tun.configure(None, 65_535)?;
                no_forwarding(tun.name()).map_err(|source| NetifError::Os {
                    what: "turning forwarding off",
                    name: name.clone(),
                    source,
                })?;
                info!(name = tun.name(), "echo interface open");
                Some(tun)
            }
            None => None,
        };
        let links = if ifaces.is_empty() {
            None
        } else {
            let indexes: Vec<u32> = ifaces.iter().map(|f| f.index).collect();
            Some(
                LinkWatch::open(&indexes, LINK_DUMP_TIMEOUT).map_err(|source| NetifError::Os {
                    what: "reading link state (rtnetlink)",
                    name: cfg
                        .interfaces
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    source,
                })?,
            )
        };
        Ok(Interfaces {
            ifaces,
            links: Mutex::new(links),
            active: Mutex::new(None),
            backlog: Mutex::new(Backlog::default()),
            backlog_age_max: cfg.backlog_age_max,
            backlog_bytes_max: cfg.backlog_bytes_max,
            backlog_drops: Default::default(),
            switches: AtomicU64::new(0),
            echo,
            echo_packets: AtomicU64::new(0),
            logged: Mutex::new([None; IfDrop::ALL.len()]),
        })
    }

    /// How many interfaces there are (0: only an echo interface).
    pub fn len(&self) -> usize {
        self.ifaces.len()
    }

    /// Whether there are no external interfaces (only, perhaps, an echo interface).
    pub fn is_empty(&self) -> bool {
        self.ifaces.is_empty()
    }

    /// Counts a drop at interface `i` (`None`: the backlog) and logs it, at most once
    /// per [`LOG_INTERVAL`] per reason.
    fn count_drop(&self, i: Option<usize>, why: IfDrop) {
        let total = match i.and_then(|i| self.ifaces.get(i)) {
            Some(f) => f.counters.drops[why.index()].fetch_add(1, Ordering::Relaxed) + 1,
            None => self.backlog_drops[why.index()].fetch_add(1, Ordering::Relaxed) + 1,
        };
        let now = Instant::now();
        let mut logged = lock(&self.logged);
        let last = &mut logged[why.index()];
        if last.is_some_and(|t| now.duration_since(t) < LOG_INTERVAL) {
            return;
        }
        *last = Some(now);
        let name = i
            .and_then(|i| self.ifaces.get(i))
            .map_or("-", |f| f.spec.name.as_str());
        warn!(
            interface = name,
            reason = why.name(),
            total,
            "external packet dropped"
        );
    }

    /// Writes `packet` out through the active interface, or keeps it until one is
    /// healthy.
    pub fn send(&self, packet: &[u8]) -> SendVerdict {
        if netif::ip_addrs(packet).is_none() {
            self.count_drop(None, IfDrop::Malformed);
            return SendVerdict::Dropped;
        }
        let active = *lock(&self.active);
        if let Some(i) = active {
            if self.write_out(i, packet) {
                return SendVerdict::Sent;
            }
        }
        self.keep(packet.to_vec())
    }

    fn write_out(&self, i: usize, packet: &[u8]) -> bool {
        let Some(f) = self.ifaces.get(i) else {
            return false;
        };
        match f.tun.write_packet(packet) {
            Ok(()) => {
                f.counters.out_packets.fetch_add(1, Ordering::Relaxed);
                f.counters
                    .out_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                // Typically EIO: the link was taken down. The prober sees it at its
                // next look; meanwhile the packet waits in the backlog.
                tracing::debug!(interface = %f.spec.name, "external write: {e}");
                self.count_drop(Some(i), IfDrop::WriteFailed);
                false
            }
        }
    }

    fn keep(&self, packet: Vec<u8>) -> SendVerdict {
        if packet.len() > self.backlog_bytes_max {
            self.count_drop(None, IfDrop::BacklogFull);
            return SendVerdict::Dropped;
        }
        let mut full = 0;
        {
            let mut b = lock(&self.backlog);
            while b.bytes + packet.len() > self.backlog_bytes_max {
                match b.packets.pop_front() {
                    Some((_, old)) => {
                        b.bytes -= old.len();
                        full += 1;
                    }
                    None => break,
                }
            }
            b.bytes += packet.len();
            b.packets.push_back((Instant::now(), packet));
        }
        for _ in 0..full {
            self.count_drop(None, IfDrop::BacklogFull);
        }
        SendVerdict::Kept
    }

    /// Writes a copy of an inter-node packet to the echo interface, if there is one.
    pub fn echo(&self, packet: &[u8]) {
        if let Some(t) = &self.echo {
            // A failed copy is no loss to the packet itself: not counted as a drop.
            if t.write_packet(packet).is_ok() {
                self.echo_packets.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether an echo interface is configured.
    pub fn echoes(&self) -> bool {
        self.echo.is_some()
    }

    /// Reads what interface `i` has (waiting up to `timeout` for the first packet, then
    /// taking only what is already there, `max` at most). Probe answers are taken here,
    /// at once, before anything is stored: a slow store must not look like a dead path.
    /// The rest is returned with its addresses for the routing agent, or dropped and
    /// counted when it is not for a single host.
    pub fn receive_batch(
        &self,
        i: usize,
        buf: &mut [u8],
        timeout: Duration,
        max: usize,
    ) -> Vec<Inbound> {
        let mut out = Vec::new();
        let Some(f) = self.ifaces.get(i) else {
            return out;
        };
        let mut wait = timeout;
        for _ in 0..max {
            let n = match f.tun.read_timeout(buf, wait) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    warn!(interface = %f.spec.name, "external read: {e}");
                    // Not a busy loop if the device keeps failing.
                    std::thread::sleep(timeout);
                    break;
                }
            };
            wait = Duration::ZERO;
            if let Some(d) = self.inbound(i, f, &buf[..n]) {
                out.push(d);
            }
        }
        out
    }

    fn inbound(&self, i: usize, f: &Iface, p: &[u8]) -> Option<Inbound> {
        let Some((source, dest)) = netif::ip_addrs(p) else {
            self.count_drop(Some(i), IfDrop::Malformed);
            return None;
        };
        if let (Some(local), IpAddr::V4(d)) = (f.spec.local, dest) {
            if d == local {
                // For the daemon itself: a probe answer, or an error about a probe.
                if netif::echo_reply_seq(p, local, f.probe_id).is_some() {
                    let mut c = lock(&f.check);
                    c.last_reply = Some(Instant::now());
                    c.unanswered = 0;
                    drop(c);
                    f.counters.probes_answered.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
        }
        if netif::is_group(dest) {
            self.count_drop(Some(i), IfDrop::Group);
            return None;
        }
        Some(Inbound {
            iface: i,
            source,
            dest,
            packet: p.to_vec(),
        })
    }

    /// The routing agent took an inbound packet.
    pub fn taken(&self, d: &Inbound) {
        if let Some(f) = self.ifaces.get(d.iface) {
            f.counters.in_packets.fetch_add(1, Ordering::Relaxed);
            f.counters
                .in_bytes
                .fetch_add(d.packet.len() as u64, Ordering::Relaxed);
        }
    }

    /// The routing agent refused an inbound packet: counted, and its sender told
    /// (ICMP host unreachable, IPv4 only) when the destination is not reachable.
    pub fn refused(&self, d: &Inbound, why: IfDrop) {
        self.count_drop(Some(d.iface), why);
        let Some(f) = self.ifaces.get(d.iface) else {
            return;
        };
        let Some(from) = f.spec.local else {
            return;
        };
        if !why.answers_unreachable() {
            return;
        }
        {
            let now = Instant::now();
            let mut last = lock(&f.last_unreachable);
            if last.is_some_and(|t| now.duration_since(t) < UNREACHABLE_GAP) {
                return;
            }
            *last = Some(now);
        }
        if let Some(u) = netif::host_unreachable(from, &d.packet) {
            if f.tun.write_packet(&u).is_ok() {
                f.counters.unreachable_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits up to `timeout` for link-state news from rtnetlink; returns whether an
    /// interface's link became usable or unusable (the caller judges again at once).
    /// Without interfaces it just sleeps.
    pub fn watch_links(&self, timeout: Duration) -> bool {
        let mut links = lock(&self.links);
        let Some(w) = links.as_mut() else {
            drop(links);
            std::thread::sleep(timeout);
            return false;
        };
        match w.wait(timeout) {
            Ok(changed) => changed,
            Err(e) => {
                // The last known state stands; the probes still see a dead path.
                warn!("rtnetlink: {e}");
                drop(links);
                // Not a busy loop if the socket keeps failing.
                std::thread::sleep(timeout);
                false
            }
        }
    }

    /// Whether interface `i`'s link is up and running, as rtnetlink last said.
    fn link_up(&self, i: usize) -> bool {
        let Some(f) = self.ifaces.get(i) else {
            return false;
        };
        lock(&self.links)
            .as_ref()
            .is_some_and(|w| w.usable(f.index))
    }

    /// One round of the prober: sends due probes on links that are up, judges health,
    /// picks the active interface and, when there is one, flushes the backlog.
    /// `due(i)` says whether interface `i` probes this round.
    pub fn probe_round(&self, now: Instant, due: &dyn Fn(usize) -> bool) {
        let mut checks = Vec::with_capacity(self.ifaces.len());
        for (i, f) in self.ifaces.iter().enumerate() {
            let link_up = self.link_up(i);
            if due(i) && link_up {
                if let (Some(probe), Some(local)) = (f.spec.probe, f.spec.local) {
                    let seq = {
                        let mut s = lock(&f.probe_seq);
                        *s = s.wrapping_add(1);
                        *s
                    };
                    let req = netif::echo_request(local, probe, f.probe_id, seq);
                    // A probe the interface refused counts as unanswered all the same.
                    if f.tun.write_packet(&req).is_ok() {
                        f.counters.probes_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut c = lock(&f.check);
                    c.unanswered = c.unanswered.saturating_add(1);
                }
            }
            let mut c = lock(&f.check);
            if let Some(h) = c.judge(&f.spec, link_up, now) {
                match h {
                    Health::Down => {
                        warn!(interface = %f.spec.name, link_up, "external interface unhealthy")
                    }
                    _ => info!(interface = %f.spec.name, "external interface healthy"),
                }
            }
            checks.push(c.clone());
        }
        let specs: Vec<InterfaceSpec> = self.ifaces.iter().map(|f| f.spec.clone()).collect();
        let next = choose(&specs, &checks, now);
        let changed = {
            let mut a = lock(&self.active);
            let changed = *a != next;
            *a = next;
            changed
        };
        if changed {
            self.switches.fetch_add(1, Ordering::Relaxed);
            match next {
                Some(i) => info!(interface = %self.ifaces[i].spec.name, "external path active"),
                None => warn!("no healthy external interface: packets wait in the backlog"),
            }
        }
        self.flush(next, now);
    }

    /// Drops expired backlog packets; with an active interface, sends the rest.
    fn flush(&self, active: Option<usize>, now: Instant) {
        loop {
            let next = {
                let mut b = lock(&self.backlog);
                match b.packets.pop_front() {
                    Some((at, p)) => {
                        b.bytes -= p.len();
                        if now.saturating_duration_since(at) > self.backlog_age_max {
                            Err(())
                        } else if active.is_none() {
                            // Nothing expired further on: the queue is in arrival order.
                            b.bytes += p.len();
                            b.packets.push_front((at, p));
                            return;
                        } else {
                            Ok(p)
                        }
                    }
                    None => return,
                }
            };
            match (next, active) {
                (Err(()), _) => self.count_drop(None, IfDrop::BacklogExpired),
                (Ok(p), Some(i)) => {
                    if !self.write_out(i, &p) {
                        self.keep(p);
                        return;
                    }
                }
                (Ok(_), None) => return,
            }
        }
    }

    /// The shortest probe interval: how often the prober runs.
    pub fn tick(&self) -> Duration {
        self.ifaces
            .iter()
            .map(|f| f.spec.probe_interval)
            .min()
            .unwrap_or(Duration::from_millis(200))
            .max(Duration::from_millis(10))
    }

    /// Interval of interface `i`'s probes.
    pub fn probe_interval(&self, i: usize) -> Duration {
        self.ifaces
            .get(i)
            .map_or(Duration::from_millis(200), |f| f.spec.probe_interval)
    }

    /// The figures for admin status.
    pub fn status(&self) -> InterfacesStatus {
        let active = *lock(&self.active);
        let (backlog_packets, backlog_bytes) = {
            let b = lock(&self.backlog);
            (b.packets.len() as u64, b.bytes as u64)
        };
        InterfacesStatus {
            interfaces: self
                .ifaces
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let c = &f.counters;
                    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                    InterfaceStatus {
                        name: f.spec.name.clone(),
                        state: lock(&f.check).health.name(),
                        role: if active == Some(i) {
                            "active"
                        } else {
                            "standby"
                        },
                        priority: f.spec.priority,
                        in_packets: l(&c.in_packets),
                        in_bytes: l(&c.in_bytes),
                        out_packets: l(&c.out_packets),
                        out_bytes: l(&c.out_bytes),
                        probes_sent: l(&c.probes_sent),
                        probes_answered: l(&c.probes_answered),
                        unreachable_sent: l(&c.unreachable_sent),
                        dropped: IfDrop::ALL
                            .iter()
                            .map(|r| (r.name(), l(&c.drops[r.index()])))
                            .filter(|(_, n)| *n > 0)
                            .collect(),
                    }
                })
                .collect(),
            backlog_packets,
            backlog_bytes,
            backlog_expired: self.backlog_drops[IfDrop::BacklogExpired.index()]
                .load(Ordering::Relaxed),
            backlog_full: self.backlog_drops[IfDrop::BacklogFull.index()].load(Ordering::Relaxed),
            not_ip: self.backlog_drops[IfDrop::Malformed.index()].load(Ordering::Relaxed),
            switches: self.switches.load(Ordering::Relaxed),
            echo_packets: self.echo_packets.load(Ordering::Relaxed),
        }
    }
}

/// A packet from outside read from an external interface.
pub struct Inbound {
    /// Index of the interface it came in through.
    pub iface: usize,
    /// IP source.
    pub source: IpAddr,
    /// IP destination.
    pub dest: IpAddr,
    /// The whole IP packet.
    pub packet: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, priority: u32, probe: bool) -> InterfaceSpec {
        InterfaceSpec {
            name: name.into(),
            address: None,
            local: Some(Ipv4Addr::new(10, 200, 1, 2)),
            mtu: 1500,
            priority,
            probe: probe.then_some(Ipv4Addr::new(198, 51, 100, 10)),
            probe_interval: Duration::from_millis(200),
            probe_misses: 3,
            hold_down: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_probed_path_fails_after_its_misses_and_returns_after_the_hold_down() {
        let s = spec("ext1", 1, true);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut c = HealthCheck::new();
        // Link up, a probe sent, no answer yet: not judged healthy.
        c.unanswered = 1;
        assert_eq!(c.judge(&s, true, ms(0)), None);
        assert!(!c.usable(ms(0)));
        c.last_reply = Some(ms(100));
        c.unanswered = 0;
        assert_eq!(c.judge(&s, true, ms(200)), Some(Health::Up));
        assert!(c.usable(ms(200)), "first health: no hold-down");
        // Answers stop: three probes unanswered and a fourth just sent: down, however
        // little time passed (a delayed prober sends fewer probes, fails later).
        for n in 1..=3 {
            c.unanswered = n;
            assert_eq!(c.judge(&s, true, ms(200 + 200 * u64::from(n))), None);
        }
        c.unanswered = 4;
        assert_eq!(c.judge(&s, true, ms(1000)), Some(Health::Down));
        assert!(!c.usable(ms(1000)));
        // Answers again: healthy at once, usable only 2 s later.
        c.last_reply = Some(ms(3000));
        c.unanswered = 0;
        assert_eq!(c.judge(&s, true, ms(3000)), Some(Health::Up));
        assert!(!c.usable(ms(4999)));
        assert!(c.usable(ms(5000)));
        // The link going down is enough, answers or not.
        c.last_reply = Some(ms(5100));
        assert_eq!(c.judge(&s, false, ms(5100)), Some(Health::Down));
    }

    #[test]
    fn an_unprobed_path_follows_its_link() {
        let s = spec("ext1", 1, false);
        let t0 = Instant::now();
        let mut c = HealthCheck::new();
        assert_eq!(c.judge(&s, false, t0), Some(Health::Down));
        assert_eq!(c.judge(&s, true, t0), Some(Health::Up));
        assert!(!c.usable(t0), "recovered from a known failure: held down");
        assert!(c.usable(t0 + Duration::from_secs(2)));
    }

    fn ipv4_packet(len: usize) -> Vec<u8> {
        let mut p = netif::echo_request(
            Ipv4Addr::new(10, 99, 0, 1),
            Ipv4Addr::new(198, 51, 100, 10),
            1,
            1,
        );
        p.resize(len, 0);
        p
    }

    #[test]
    fn with_no_path_packets_wait_bounded_by_bytes_and_age() {
        let ifs = Interfaces::open(&InterfacesConfig {
            interfaces: Vec::new(),
            backlog_age_max: Duration::from_secs(5),
            backlog_bytes_max: 1000,
            echo: None,
        })
        .expect("no devices to open");
        assert_eq!(ifs.send(&[0x55; 40]), SendVerdict::Dropped, "not IP");
        for _ in 0..3 {
            assert_eq!(ifs.send(&ipv4_packet(400)), SendVerdict::Kept);
        }
        assert_eq!(
            ifs.send(&ipv4_packet(1001)),
            SendVerdict::Dropped,
            "never fits"
        );
        let st = ifs.status();
        // 3 x 400 > 1000: the oldest made room for the third.
        assert_eq!((st.backlog_packets, st.backlog_bytes), (2, 800));
        assert_eq!(st.backlog_full, 2, "the oldest one and the one too large");
        assert_eq!(st.not_ip, 1);
        // Still no path: nothing expires before its age...
        ifs.flush(None, Instant::now() + Duration::from_secs(4));
        assert_eq!(ifs.status().backlog_packets, 2);
        // ...and everything after it.
        ifs.flush(None, Instant::now() + Duration::from_secs(6));
        let st = ifs.status();
        assert_eq!(
            (st.backlog_packets, st.backlog_bytes, st.backlog_expired),
            (0, 0, 2)
        );
    }

    #[test]
    fn the_usable_path_of_lowest_priority_is_chosen() {
        let specs = [
            spec("a", 20, false),
            spec("b", 10, false),
            spec("c", 10, false),
        ];
        let t0 = Instant::now();
        let mut checks: Vec<HealthCheck> = specs.iter().map(|_| HealthCheck::new()).collect();
        assert_eq!(choose(&specs, &checks, t0), None);
        for (s, c) in specs.iter().zip(checks.iter_mut()) {
            c.judge(s, true, t0);
        }
        assert_eq!(choose(&specs, &checks, t0), Some(1), "priority 10, first");
        checks[1].judge(&specs[1], false, t0);
        assert_eq!(choose(&specs, &checks, t0), Some(2));
        checks[2].judge(&specs[2], false, t0);
        assert_eq!(choose(&specs, &checks, t0), Some(0), "the last one left");
    }
}

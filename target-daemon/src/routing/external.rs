//! The external port: where packets for addresses no node has leave the nodes' network,
//! and where packets from outside come in (the seed's Figure 8).
//!
//! Here it is a UDP socket. A datagram carries the destination address (16 bytes), the
//! source address (16 bytes) and the payload. Outgoing packets go to the first gateway
//! that works; a gateway that fails (ICMP port unreachable, reported on the socket) is
//! set aside for a while and the next one is the alternate path.
//!
//! Only the configured gateways may send packets in: a datagram from any other socket
//! is dropped, so a host that can merely reach the UDP port cannot inject packets. The
//! routing agent further drops a datagram whose inner source is a node's address (a
//! packet from outside cannot come from inside). Drops are counted by reason
//! ([`ExternalPort::stats`]) and logged at most once per [`LOG_INTERVAL`] per reason.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ftss_proto::vendor::NodeAddr;
use tracing::{debug, warn};

/// How long a failed gateway is passed over.
const HOLD_DOWN: Duration = Duration::from_secs(5);
/// Largest datagram accepted from outside.
pub const DATAGRAM_MAX: usize = 32 + ftss_proto::vendor::PAYLOAD_MAX;
/// Shortest interval between two log lines about dropped datagrams of one reason: a
/// flood from outside must not become a flood in the log.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a datagram from outside was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Shorter than the two addresses, or longer than [`DATAGRAM_MAX`].
    Malformed,
    /// Sent from a socket that is not one of the configured peers.
    UnknownPeer,
    /// Its inner source address belongs to a node: the outside posing as a node.
    SpoofedSource,
    /// No available node has its destination address, or the queue did not take it.
    Undeliverable,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::SpoofedSource,
        DropReason::Undeliverable,
    ];

    fn index(self) -> usize {
        match self {
            DropReason::Malformed => 0,
            DropReason::UnknownPeer => 1,
            DropReason::SpoofedSource => 2,
            DropReason::Undeliverable => 3,
        }
    }

    /// The reason's name in logs and admin status.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Undeliverable => "undeliverable",
        }
    }
}

/// A snapshot of the port's counters, for admin status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExternalStats {
    /// Datagrams sent out.
    pub sent: u64,
    /// Packets no gateway took (those too big included).
    pub failed: u64,
    /// Packets too big for one datagram: refused without holding any gateway down.
    pub too_big: u64,
    /// Datagrams received from outside and delivered to a node.
    pub received: u64,
    /// Datagrams dropped: malformed.
    pub dropped_malformed: u64,
    /// Datagrams dropped: not from a configured peer.
    pub dropped_unknown_peer: u64,
    /// Datagrams dropped: inner source is a node's address.
    pub dropped_spoofed_source: u64,
    /// Datagrams dropped: no available node for the destination.
    pub dropped_undeliverable: u64,
}

impl ExternalStats {
    /// Every dropped datagram, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_malformed
            + self.dropped_unknown_peer
            + self.dropped_spoofed_source
            + self.dropped_undeliverable
    }
}

impl std::fmt::Display for ExternalStats {
    /// One admin status line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "external sent={} failed={} too_big={} received={} dropped_malformed={} dropped_unknown_peer={} dropped_spoofed_source={} dropped_undeliverable={}",
            self.sent,
            self.failed,
            self.too_big,
            self.received,
            self.dropped_malformed,
            self.dropped_unknown_peer,
            self.dropped_spoofed_source,
            self.dropped_undeliverable
        )
    }
}

/// Dropped datagrams of one reason, and when that reason was last logged.
#[derive(Default)]
struct DropCounter {
    count: AtomicU64,
    /// Last log line and the count it reported.
    logged: Mutex<Option<(Instant, u64)>>,
}

struct Gateway {
    addr: SocketAddr,
    sock: UdpSocket,
    failed_until: Option<Instant>,
}

/// The external port.
pub struct ExternalPort {
    gateways: Mutex<Vec<Gateway>>,
    listen: UdpSocket,
    /// The sockets packets may come in from: the gateways (canonical addresses).
    peers: HashSet<SocketAddr>,
    /// Datagrams sent out.
    pub sent: AtomicU64,
    /// Packets no gateway took.
    pub failed: AtomicU64,
    /// Packets too big for one datagram.
    pub too_big: AtomicU64,
    /// Datagrams received from outside and delivered to a node.
    pub received: AtomicU64,
    drops: [DropCounter; DropReason::ALL.len()],
}

/// `a` with an IPv4-mapped IPv6 address as IPv4, so a dual-stack socket's view of an
/// IPv4 peer compares equal to the configured address.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A datagram from outside.
pub struct Incoming {
    /// The peer it came from.
    pub from: SocketAddr,
    /// Destination address.
    pub dest: NodeAddr,
    /// Source address.
    pub source: NodeAddr,
    /// Payload.
    pub payload: Vec<u8>,
}

impl ExternalPort {
    /// Binds the port and one connected socket per gateway (connected, so ICMP errors
    /// from a dead gateway come back to us).
    pub fn open(bind: SocketAddr, peers: &[SocketAddr]) -> std::io::Result<Self> {
        let listen = UdpSocket::bind(bind)?;
        let mut gateways = Vec::new();
        for &addr in peers {
            let local = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(local)?;
            sock.connect(addr)?;
            gateways.push(Gateway {
                addr,
                sock,
                failed_until: None,
            });
        }
        Ok(Self {
            gateways: Mutex::new(gateways),
            listen,
            peers: peers.iter().copied().map(canonical).collect(),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            too_big: AtomicU64::new(0),
            received: AtomicU64::new(0),
            drops: Default::default(),
        })
    }

    /// Counts a dropped datagram and logs it, at most once per [`LOG_INTERVAL`] per
    /// reason (with how many were dropped meanwhile).
    pub fn drop_datagram(&self, why: DropReason, from: SocketAddr) {
        let c = &self.drops[why.index()];
        let total = c.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = c
            .logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let since = match *logged {
            Some((at, _)) if now.duration_since(at) < LOG_INTERVAL => return,
            Some((_, n)) => total - n,
            None => 1,
        };
        *logged = Some((now, total));
        warn!(%from, reason = why.name(), since_last_log = since, total, "external datagram dropped");
    }

    /// The counters now.
    pub fn stats(&self) -> ExternalStats {
        let d = |r: DropReason| self.drops[r.index()].count.load(Ordering::Relaxed);
        ExternalStats {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            too_big: self.too_big.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            dropped_malformed: d(DropReason::Malformed),
            dropped_unknown_peer: d(DropReason::UnknownPeer),
            dropped_spoofed_source: d(DropReason::SpoofedSource),
            dropped_undeliverable: d(DropReason::Undeliverable),
        }
    }

    /// The local address the port receives on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    /// Sends one packet out through the first working gateway. `false` when none took it.
    pub fn send(&self, dest: NodeAddr, source: NodeAddr, payload: &[u8]) -> bool {
        let mut d = Vec::with_capacity(32 + payload.len());
        d.extend_from_slice(&dest.0);
        d.extend_from_slice(&source.0);
        d.extend_from_slice(payload);
        let mut gws = self
            .gateways
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        for g in gws.iter_mut() {
            if g.failed_until.is_some_and(|t| now < t) {
                continue;
            }
            // A pending ICMP error from an earlier datagram surfaces here.
            match g.sock.send(&d) {
                Ok(_) => {
                    g.failed_until = None;
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                // The datagram's fault, not the gateway's: it is as big for every one of
                // them, and holding them down would stop every node's packets out.
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    debug!(bytes = d.len(), "packet too big for one datagram: {e}");
                    self.too_big.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    warn!(gateway = %g.addr, "external gateway failed, trying the next: {e}");
                    g.failed_until = Some(now + HOLD_DOWN);
                }
            }
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Waits up to `timeout` for a datagram from outside. Datagrams from sockets other
    /// than the configured peers, and malformed ones, are counted and dropped here.
    pub fn recv(&self, timeout: Duration) -> Option<Incoming> {
        let _ = self.listen.set_read_timeout(Some(timeout));
        let mut buf = vec![0u8; DATAGRAM_MAX + 1];
        let (n, from) = self.listen.recv_from(&mut buf).ok()?;
        let from = canonical(from);
        if !self.peers.contains(&from) {
            self.drop_datagram(DropReason::UnknownPeer, from);
            return None;
        }
        if !(32..=DATAGRAM_MAX).contains(&n) {
            self.drop_datagram(DropReason::Malformed, from);
            return None;
        }
        let mut dest = [0u8; 16];
        dest.copy_from_slice(&buf[..16]);
        let mut source = [0u8; 16];
        source.copy_from_slice(&buf[16..32]);
        Some(Incoming {
            from,
            dest: NodeAddr(dest),
            source: NodeAddr(source),
            payload: buf[32..n].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_too_big_for_a_datagram_holds_no_gateway_down() {
        let gw = UdpSocket::bind("127.0.0.1:0").expect("udp");
        gw.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let port = ExternalPort::open(
            "127.0.0.1:0".parse().expect("addr"),
            &[gw.local_addr().expect("addr")],
        )
        .expect("open");
        let (dest, source) = (NodeAddr([1; 16]), NodeAddr([2; 16]));
        // Payloads up to PAYLOAD_MAX are valid packets, but IPv4 UDP carries at most
        // 65,507 bytes: with the 32-byte header, this one cannot go out.
        assert!(!port.send(dest, source, &vec![7u8; ftss_proto::vendor::PAYLOAD_MAX]));
        assert!(
            port.send(dest, source, b"small"),
            "the gateway is still in use"
        );
        let mut buf = vec![0u8; DATAGRAM_MAX];
        let n = gw.recv(&mut buf).expect("the small packet arrives");
        assert_eq!(&buf[32..n], b"small");
        let st = port.stats();
        assert_eq!((st.sent, st.failed, st.too_big), (1, 1, 1));
        assert!(st.to_string().contains("too_big=1"));
    }

    #[test]
    fn only_configured_peers_get_in_and_drops_are_counted_by_reason() {
        let peer = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let stranger = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let port = ExternalPort::open(
            "127.0.0.1:0".parse().expect("addr"),
            &[peer.local_addr().expect("addr")],
        )
        .expect("open");
        let to = port.local_addr().expect("addr");
        let mut d = vec![1u8; 32];
        d.extend_from_slice(b"payload");
        stranger.send_to(&d, to).expect("send");
        stranger.send_to(&d, to).expect("send");
        peer.send_to(&d[..31], to).expect("send");
        peer.send_to(&d, to).expect("send");
        let wait = Duration::from_secs(2);
        assert!(port.recv(wait).is_none(), "stranger");
        assert!(
            port.recv(wait).is_none(),
            "stranger again (not logged again)"
        );
        assert!(port.recv(wait).is_none(), "too short");
        let got = port.recv(wait).expect("from the peer");
        assert_eq!(got.from, peer.local_addr().expect("addr"));
        assert_eq!(got.payload, b"payload");
        port.drop_datagram(DropReason::SpoofedSource, got.from);
        let st = port.stats();
        assert_eq!(
            (
                st.dropped_unknown_peer,
                st.dropped_malformed,
                st.dropped_spoofed_source,
                st.dropped_undeliverable,
                st.dropped()
            ),
            (2, 1, 1, 0, 4)
        );
        assert!(st.to_string().contains("dropped_unknown_peer=2"));
    }
}

//! The external port: where packets for addresses no node has leave the nodes' network,
//! and where packets from outside come in (the seed's Figure 8).
//!
//! Here it is a UDP socket. A datagram carries the destination address (16 bytes), the
//! source address (16 bytes) and the payload. Outgoing packets go to the first gateway
//! that works; a gateway that fails (ICMP port unreachable, reported on the socket) is
//! set aside for a while and the next one is the alternate path.

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

struct Gateway {
    addr: SocketAddr,
    sock: UdpSocket,
    failed_until: Option<Instant>,
}

/// The external port.
pub struct ExternalPort {
    gateways: Mutex<Vec<Gateway>>,
    listen: UdpSocket,
    /// Datagrams sent out.
    pub sent: AtomicU64,
    /// Packets no gateway took.
    pub failed: AtomicU64,
    /// Datagrams received from outside and delivered to a node.
    pub received: AtomicU64,
    /// Datagrams from outside dropped (no such node, node not available, malformed).
    pub dropped: AtomicU64,
}

/// A datagram from outside.
pub struct Incoming {
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
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
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
                Err(e) => {
                    warn!(gateway = %g.addr, "external gateway failed, trying the next: {e}");
                    g.failed_until = Some(now + HOLD_DOWN);
                }
            }
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Waits up to `timeout` for a datagram from outside.
    pub fn recv(&self, timeout: Duration) -> Option<Incoming> {
        let _ = self.listen.set_read_timeout(Some(timeout));
        let mut buf = vec![0u8; DATAGRAM_MAX + 1];
        let (n, from) = self.listen.recv_from(&mut buf).ok()?;
        if !(32..=DATAGRAM_MAX).contains(&n) {
            debug!(%from, len = n, "malformed external datagram dropped");
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut dest = [0u8; 16];
        dest.copy_from_slice(&buf[..16]);
        let mut source = [0u8; 16];
        source.copy_from_slice(&buf[16..32]);
        Some(Incoming {
            dest: NodeAddr(dest),
            source: NodeAddr(source),
            payload: buf[32..n].to_vec(),
        })
    }
}

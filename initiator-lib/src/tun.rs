//! The packet conversion unit: links a TUN interface to the target, so ordinary IP
//! traffic of the host rides the storage fabric.
//!
//! IP packets the kernel routes into the TUN device go out as SEND, addressed by their
//! IP destination; packets the node receives (RECEIVE, long poll) are written to the TUN
//! device. After a broken session (a restarted target, a cut connection) the unit logs
//! in again, registers again and resends the unanswered batch under the same packet ids,
//! so the target stores each packet once; the [`Receiver`] drops records it has already
//! written. TCP sees a pause, never a duplicate or a corrupted segment.
//!
//! The unit keeps the kernel honest about sources both ways. A packet from the target
//! carries the source the target stamped (the sending node's first address, or the outside
//! source of an external packet); the IP packet inside must come from that address, or
//! from another address of the same node (learnt from ROUTING TABLE), else it is dropped
//! and counted ([`BridgeStats::dropped_source_in`]): a node cannot have our kernel believe
//! a packet came from someone else. Going out, only IP packets whose source is one of this
//! node's addresses go to the target ([`BridgeStats::dropped_source_out`]); the target
//! stamps the source anyway, this keeps a misrouted packet from leaving under our name.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_proto::vendor::{NodeAddr, RouteList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::packet::{OutPacket, PacketClient, Receiver};
use crate::transport::Transport;
use crate::Error;

/// Largest IP packet the unit moves (the vendor payload limit).
pub const MTU_MAX: usize = 65_535;
/// Packets sent in one SEND at most: what the reader has queued when the last SEND ends.
const BATCH_MAX: usize = 256;
/// Shortest interval between two ROUTING TABLE reads prompted by an unknown source: a
/// stream of spoofed packets must not turn into a stream of commands.
const TABLE_REFRESH_MIN: Duration = Duration::from_secs(1);

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN device (layer 3, no packet information header).
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`. Needs CAP_NET_ADMIN. The
    /// interface lives as long as this value; it may be moved to another network
    /// namespace meanwhile, and keeps working.
    pub fn open(name: &str) -> std::io::Result<Tun> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("interface name {name:?} must have 1 to 15 bytes"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which IfReq lays out
        // (16-byte name, then the flags in the union, 40 bytes in all); `req` outlives
        // the call and `fd` is open.
        #[allow(unsafe_code)]
        let r = unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        Ok(Tun {
            file,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
        })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet (blocking).
    pub fn read_packet(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one IP packet.
    pub fn write_packet(&self, p: &[u8]) -> std::io::Result<()> {
        (&self.file).write(p).map(drop)
    }
}

/// The destination address of an IPv4 or IPv6 packet.
pub fn destination(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let b: [u8; 4] = p[16..20].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 if p.len() >= 40 => {
            let b: [u8; 16] = p[24..40].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// The source address of an IPv4 or IPv6 packet.
pub fn source(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let b: [u8; 4] = p[12..16].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 if p.len() >= 40 => {
            let b: [u8; 16] = p[8..24].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Why the bridge dropped an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// Not an IPv4 or IPv6 packet (or a truncated header).
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    /// From the target: the IP source is neither the stamped source nor an address of the
    /// same node.
    #[error("IP source {inner} does not match the stamped source {stamped}")]
    NotStamped {
        /// Source in the IP header.
        inner: IpAddr,
        /// Source the target stamped.
        stamped: IpAddr,
    },
    /// To the target: the IP source is not one of this node's addresses.
    #[error("IP source {0} is not one of this node's addresses")]
    NotOurs(IpAddr),
}

/// Which addresses belong to which node, from ROUTING TABLE.
#[derive(Debug, Default, Clone)]
pub struct NodeMap {
    node_of: HashMap<NodeAddr, u32>,
}

impl NodeMap {
    /// The map of a routing table (external routes belong to no node).
    pub fn from_table(t: &RouteList) -> Self {
        NodeMap {
            node_of: t
                .entries
                .iter()
                .filter(|e| !e.external)
                .map(|e| (e.addr, e.node_id))
                .collect(),
        }
    }

    /// Whether `a` and `b` are addresses of one node.
    pub fn same_node(&self, a: IpAddr, b: IpAddr) -> bool {
        let id = |x: IpAddr| self.node_of.get(&NodeAddr::from(x));
        id(a).is_some_and(|i| Some(i) == id(b))
    }
}

/// Checks a packet received from the target: its IP source must be `stamped` (the
/// source the target put on the record) or another address of the stamped node.
pub fn check_inbound(stamped: IpAddr, nodes: &NodeMap, p: &[u8]) -> Result<(), SourceError> {
    let inner = source(p).ok_or(SourceError::NotIp)?;
    // Compared as node addresses: an IPv4 address and its IPv4-mapped form are one.
    if NodeAddr::from(inner) == NodeAddr::from(stamped) || nodes.same_node(inner, stamped) {
        Ok(())
    } else {
        Err(SourceError::NotStamped { inner, stamped })
    }
}

/// Checks a packet the kernel routed into the TUN device: its IP source must be one of
/// `ours`. Returns its destination.
pub fn check_outbound(ours: &[IpAddr], p: &[u8]) -> Result<IpAddr, SourceError> {
    let (Some(src), Some(dest)) = (source(p), destination(p)) else {
        return Err(SourceError::NotIp);
    };
    let s = NodeAddr::from(src);
    if ours.iter().any(|&a| NodeAddr::from(a) == s) {
        Ok(dest)
    } else {
        Err(SourceError::NotOurs(src))
    }
}

/// Counters of a running bridge.
#[derive(Default, Debug)]
pub struct BridgeStats {
    /// IP packets sent through the target.
    pub sent: AtomicU64,
    /// IP packets the target refused (no such node, down, maintenance): dropped, as a
    /// router drops what it cannot deliver.
    pub refused: AtomicU64,
    /// IP packets received and written to the TUN device.
    pub received: AtomicU64,
    /// Sessions started (1 + reconnects).
    pub sessions: AtomicU64,
    /// Packets from the target dropped: the IP source is not the stamped source's node.
    pub dropped_source_in: AtomicU64,
    /// Packets from the kernel dropped: not IP, or the IP source is not this node's.
    pub dropped_source_out: AtomicU64,
}

/// Runs the packet conversion unit until the TUN device fails: `connect` makes a new
/// transport (a logged-in session); `addrs` are this node's addresses, registered on
/// every session.
pub async fn bridge<T, C, F>(
    tun: Arc<Tun>,
    connect: C,
    addrs: Vec<IpAddr>,
    stats: Arc<BridgeStats>,
) -> Result<(), Error>
where
    T: Transport + 'static,
    C: Fn() -> F,
    F: Future<Output = Result<T, Error>>,
{
    let mut rx = spawn_reader(Arc::clone(&tun))?;
    let mut client: Option<Arc<PacketClient<T>>> = None;
    // Highest sequence number written to the TUN device, across sessions.
    let handed = Arc::new(AtomicU64::new(0));
    // A batch that was not answered: resent with the same ids after a reconnect.
    let mut unanswered: Option<Vec<OutPacket>> = None;
    loop {
        let t = match connect().await {
            Ok(t) => t,
            Err(e) => {
                debug!("login failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // One client for the whole run: its packet ids carry on across sessions.
        let c = match &client {
            Some(c) => {
                c.replace_transport(t);
                Arc::clone(c)
            }
            None => {
                let c = Arc::new(PacketClient::new(t).with_max_wait(Duration::from_secs(2)));
                client = Some(Arc::clone(&c));
                c
            }
        };
        if let Err(e) = c.register(&addrs).await {
            warn!("register failed, retrying: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        info!(addrs = ?addrs, "TUN bridge connected");
        // Receive side: its own task on the same client; it ends with the session.
        let recv_client = Arc::clone(&c);
        let recv_tun = Arc::clone(&tun);
        let recv_stats = Arc::clone(&stats);
        let recv_handed = Arc::clone(&handed);
        let table_client = Arc::clone(&recv_client);
        let receiver = Receiver::new(recv_client)
            .starting_after(handed.load(Ordering::Relaxed))
            .with_wait(Duration::from_secs(2));
        let mut recv_task = tokio::spawn(receive_loop(
            receiver,
            table_client,
            recv_tun,
            recv_stats,
            recv_handed,
        ));
        // Send side: whatever the reader has queued goes out as one SEND.
        let mut recv_ended = false;
        let broken = loop {
            let mut batch = match unanswered.take() {
                Some(b) => b,
                None => {
                    // A node that mostly receives may have nothing to send for a long
                    // time: the receive side ending (the session is gone) must wake this
                    // loop too, or the bridge would reconnect only at its next packet out.
                    let first = tokio::select! {
                        p = rx.recv() => p,
                        _ = &mut recv_task => {
                            recv_ended = true;
                            break Error::ConnectionClosed;
                        }
                    };
                    let Some(first) = first else {
                        recv_task.abort();
                        return Ok(());
                    };
                    outbound_batch(first, &mut rx, &addrs, &stats)
                }
            };
            if batch.is_empty() {
                continue;
            }
            c.assign_ids(&mut batch);
            match c.send(&batch).await {
                Ok(outcomes) => count_sent(&stats, &outcomes),
                Err(Error::Busy) => {
                    unanswered = Some(batch);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) if e.is_connection_error() => {
                    unanswered = Some(batch);
                    break e;
                }
                Err(e) => warn!("send: {e}"),
            }
            if recv_task.is_finished() {
                break Error::ConnectionClosed;
            }
        };
        warn!("session lost ({broken}); reconnecting");
        if !recv_ended {
            recv_task.abort();
            let _ = recv_task.await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the thread that reads IP packets off the TUN device (a blocking read) and
/// queues them for the send side; it ends when the device fails or the queue is gone.
fn spawn_reader(tun: Arc<Tun>) -> Result<mpsc::Receiver<Bytes>, Error> {
    let (tx, rx) = mpsc::channel::<Bytes>(4096);
    std::thread::Builder::new()
        .name("ftss-tun-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; MTU_MAX];
            loop {
                match tun.read_packet(&mut buf) {
                    Ok(n) if n > 0 => {
                        if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!("TUN read failed: {e}");
                        return;
                    }
                }
            }
        })
        .map_err(Error::Io)?;
    Ok(rx)
}

/// `first` and whatever else the reader has queued (up to `BATCH_MAX`), as packets to
/// send: those whose IP source is not one of this node's `addrs` are dropped (a node
/// sends only as itself).
fn outbound_batch(
    first: Bytes,
    rx: &mut mpsc::Receiver<Bytes>,
    addrs: &[IpAddr],
    stats: &BridgeStats,
) -> Vec<OutPacket> {
    let mut raw = vec![first];
    while raw.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(p) => raw.push(p),
            Err(_) => break,
        }
    }
    raw.into_iter()
        .filter_map(|p| match check_outbound(addrs, &p) {
            Ok(d) => Some(OutPacket::to(d, p)),
            Err(e) => {
                debug!("packet to the target dropped: {e}");
                stats.dropped_source_out.fetch_add(1, Ordering::Relaxed);
                None
            }
        })
        .collect()
}

/// Counts a SEND's outcomes: delivered or accepted packets as sent, the rest as refused.
fn count_sent(stats: &BridgeStats, outcomes: &[crate::Outcome]) {
    let refused = outcomes
        .iter()
        .filter(|o| !matches!(o, crate::Outcome::Delivered | crate::Outcome::Accepted))
        .count() as u64;
    stats.refused.fetch_add(refused, Ordering::Relaxed);
    stats
        .sent
        .fetch_add(outcomes.len() as u64 - refused, Ordering::Relaxed);
}

/// The receive side of one session: polls the target and writes each packet whose IP
/// source matches its stamped sender to the TUN device, until the session is gone.
/// `handed` keeps the highest sequence number written, so the next session starts
/// after it.
async fn receive_loop<T: Transport + 'static>(
    mut receiver: Receiver<T>,
    table_client: Arc<PacketClient<T>>,
    tun: Arc<Tun>,
    stats: Arc<BridgeStats>,
    handed: Arc<AtomicU64>,
) {
    let mut nodes = NodeMap::default();
    let mut nodes_read: Option<Instant> = None;
    loop {
        let r = receiver.poll().await;
        handed.fetch_max(receiver.last_seq(), Ordering::Relaxed);
        match r {
            Ok(records) => {
                for d in records {
                    if d.failure_notice().is_some() {
                        continue;
                    }
                    let mut ok = check_inbound(d.source, &nodes, &d.payload);
                    if matches!(ok, Err(SourceError::NotStamped { .. }))
                        && nodes_read.is_none_or(|t| t.elapsed() >= TABLE_REFRESH_MIN)
                    {
                        // Perhaps another address of the sender that registered after our
                        // last look: read the table again, then decide.
                        nodes_read = Some(Instant::now());
                        match table_client.routing_table().await {
                            Ok(t) => nodes = NodeMap::from_table(&t),
                            Err(e) => debug!("routing table: {e}"),
                        }
                        ok = check_inbound(d.source, &nodes, &d.payload);
                    }
                    if let Err(e) = ok {
                        debug!(seq = d.seq, "packet from the target dropped: {e}");
                        stats.dropped_source_in.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Err(e) = tun.write_packet(&d.payload) {
                        debug!("TUN write: {e}");
                    }
                    stats.received.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.is_connection_error() => return,
            Err(e) => {
                warn!("receive: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_of_ipv4_and_ipv6_packets() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 99, 0, 2]);
        assert_eq!(destination(&v4), Some("10.99.0.2".parse().expect("ip")));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[24..40].copy_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        assert_eq!(destination(&v6), Some("2001:db8::2".parse().expect("ip")));
        assert_eq!(destination(&v4[..19]), None, "truncated");
        assert_eq!(destination(&[0x55; 40]), None, "not IP");
    }

    fn v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn v6(src: &str, dst: &str) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        let a = |s: &str| s.parse::<std::net::Ipv6Addr>().expect("ip").octets();
        p[8..24].copy_from_slice(&a(src));
        p[24..40].copy_from_slice(&a(dst));
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn inbound_ip_source_must_be_the_stamped_source() {
        let none = NodeMap::default();
        let p = v4([10, 0, 0, 1], [10, 0, 0, 2]);
        assert_eq!(source(&p), Some(ip("10.0.0.1")));
        assert_eq!(check_inbound(ip("10.0.0.1"), &none, &p), Ok(()));
        // A node stamped 10.0.0.3 writing 10.0.0.1 into its packet: dropped.
        assert_eq!(
            check_inbound(ip("10.0.0.3"), &none, &p),
            Err(SourceError::NotStamped {
                inner: ip("10.0.0.1"),
                stamped: ip("10.0.0.3")
            })
        );
        let p6 = v6("2001:db8::1", "2001:db8::2");
        assert_eq!(source(&p6), Some(ip("2001:db8::1")));
        assert_eq!(check_inbound(ip("2001:db8::1"), &none, &p6), Ok(()));
        assert!(check_inbound(ip("2001:db8::9"), &none, &p6).is_err());
        assert!(check_inbound(ip("10.0.0.1"), &none, &p6).is_err());
        assert_eq!(
            check_inbound(ip("10.0.0.1"), &none, &p[..19]),
            Err(SourceError::NotIp)
        );
        assert_eq!(
            check_inbound(ip("10.0.0.1"), &none, &[0x55; 40]),
            Err(SourceError::NotIp)
        );
    }

    #[test]
    fn inbound_ip_source_may_be_another_address_of_the_stamped_node() {
        use ftss_proto::vendor::{RouteEntry, RouteState};
        let entry = |a: &str, node_id: u32| RouteEntry {
            addr: NodeAddr::from(ip(a)),
            state: RouteState::Available,
            local: false,
            external: false,
            node_id,
        };
        let nodes = NodeMap::from_table(&RouteList {
            total: 3,
            entries: vec![
                entry("10.0.0.1", 1),
                entry("2001:db8::1", 1),
                entry("10.0.0.3", 2),
            ],
        });
        // Node 1 is stamped 10.0.0.1 and sends IPv6 from its other address.
        let p6 = v6("2001:db8::1", "2001:db8::2");
        assert_eq!(check_inbound(ip("10.0.0.1"), &nodes, &p6), Ok(()));
        // Node 2 cannot use node 1's addresses.
        assert!(check_inbound(ip("10.0.0.3"), &nodes, &p6).is_err());
        let p = v4([10, 0, 0, 1], [10, 0, 0, 2]);
        assert!(check_inbound(ip("10.0.0.3"), &nodes, &p).is_err());
        // An outside source matches only itself.
        assert!(check_inbound(ip("192.0.2.50"), &nodes, &p).is_err());
    }

    #[test]
    fn outbound_ip_source_must_be_ours() {
        let ours = [ip("10.0.0.1"), ip("2001:db8::1")];
        let p = v4([10, 0, 0, 1], [10, 0, 0, 2]);
        assert_eq!(check_outbound(&ours, &p), Ok(ip("10.0.0.2")));
        let p6 = v6("2001:db8::1", "2001:db8::2");
        assert_eq!(check_outbound(&ours, &p6), Ok(ip("2001:db8::2")));
        let foreign = v4([10, 0, 0, 3], [10, 0, 0, 2]);
        assert_eq!(
            check_outbound(&ours, &foreign),
            Err(SourceError::NotOurs(ip("10.0.0.3")))
        );
        let foreign6 = v6("2001:db8::3", "2001:db8::2");
        assert_eq!(
            check_outbound(&ours, &foreign6),
            Err(SourceError::NotOurs(ip("2001:db8::3")))
        );
        assert_eq!(check_outbound(&ours, &p[..12]), Err(SourceError::NotIp));
    }
}

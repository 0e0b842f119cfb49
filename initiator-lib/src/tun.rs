//! The packet conversion unit: links a TUN interface to the target, so ordinary IP
//! traffic of the host rides the storage fabric.
//!
//! IP packets the kernel routes into the TUN device go out as SEND, addressed by their
//! IP destination; packets the node receives (RECEIVE, long poll) are written to the TUN
//! device. After a broken session (a restarted target, a cut connection) the unit logs
//! in again, registers again and resends the unanswered batch under the same packet ids,
//! so the target stores each packet once; the [`Receiver`] drops records it has already
//! written. TCP sees a pause, never a duplicate or a corrupted segment.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::packet::{OutPacket, PacketClient, Receiver};
use crate::transport::Transport;
use crate::Error;

/// Largest IP packet the unit moves (the vendor payload limit).
pub const MTU_MAX: usize = 65_535;
/// Packets sent in one SEND at most: what the reader has queued when the last SEND ends.
const BATCH_MAX: usize = 256;

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
    let (tx, mut rx) = mpsc::channel::<Bytes>(4096);
    let reader = Arc::clone(&tun);
    std::thread::Builder::new()
        .name("ftss-tun-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; MTU_MAX];
            loop {
                match reader.read_packet(&mut buf) {
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
        let mut receiver = Receiver::new(recv_client)
            .starting_after(handed.load(Ordering::Relaxed))
            .with_wait(Duration::from_secs(2));
        let mut recv_task = tokio::spawn(async move {
            loop {
                let r = receiver.poll().await;
                recv_handed.fetch_max(receiver.last_seq(), Ordering::Relaxed);
                match r {
                    Ok(records) => {
                        for d in records {
                            if d.failure_notice().is_some() {
                                continue;
                            }
                            if let Err(e) = recv_tun.write_packet(&d.payload) {
                                debug!("TUN write: {e}");
                            }
                            recv_stats.received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.is_connection_error() => return,
                    Err(e) => {
                        warn!("receive: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
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
                    let mut raw = vec![first];
                    while raw.len() < BATCH_MAX {
                        match rx.try_recv() {
                            Ok(p) => raw.push(p),
                            Err(_) => break,
                        }
                    }
                    raw.into_iter()
                        .filter_map(|p| destination(&p).map(|d| OutPacket::to(d, p)))
                        .collect()
                }
            };
            if batch.is_empty() {
                continue;
            }
            c.assign_ids(&mut batch);
            match c.send(&batch).await {
                Ok(outcomes) => {
                    let refused = outcomes
                        .iter()
                        .filter(|o| {
                            !matches!(o, crate::Outcome::Delivered | crate::Outcome::Accepted)
                        })
                        .count() as u64;
                    stats.refused.fetch_add(refused, Ordering::Relaxed);
                    stats
                        .sent
                        .fetch_add(batch.len() as u64 - refused, Ordering::Relaxed);
                }
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
}

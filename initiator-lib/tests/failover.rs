//! Redundant paths under fire: the target listens on two portals; a sender node and a
//! receiver node each hold a session on both (through TCP proxies this test controls).
//! While 100 000 packets stream, the connections of one proxy or the other are reset
//! every 700 ms. The sender fails over and retries with the same packet ids; the
//! receiver fails over and catches up. The receiver must get every packet exactly once,
//! in the order sent.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_initiator::multipath::MultipathTransport;
use ftss_initiator::{OutPacket, Outcome, PacketClient, Receiver, SessionConfig};
use ftss_test_support::{temp_dir, Daemon};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TARGET: &str = "iqn.2026-11.org.ftss:failover";
const PACKETS: u64 = 100_000;
const BATCH: u64 = 25;

/// A TCP relay to `to` whose connections can all be reset at once.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    cuts: AtomicU64,
}

impl Proxy {
    async fn start(to: SocketAddr) -> Arc<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (cut, _) = watch::channel(0u64);
        let p = Arc::new(Proxy {
            addr: l.local_addr().expect("addr"),
            cut,
            cuts: AtomicU64::new(0),
        });
        let me = Arc::clone(&p);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                let mut cut = me.cut.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => {}
                        _ = tokio::io::copy(&mut ro, &mut wi) => {}
                        _ = cut.changed() => {
                            // Reset rather than close: both ends see a dead connection.
                            // A zero linger sends RST at once and never blocks on drop.
                            #[allow(deprecated)]
                            if let (Ok(i), Ok(o)) = (ri.reunite(wi), ro.reunite(wo)) {
                                let _ = i.set_linger(Some(Duration::ZERO));
                                let _ = o.set_linger(Some(Duration::ZERO));
                            }
                        }
                    }
                });
            }
        });
        p
    }

    fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.cut.send_modify(|n| *n += 1);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_cut_connections_exactly_once_and_in_order() {
    let dir = temp_dir("failover");
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0", "127.0.0.1:0"]
data_dir = "{}"
[media]
cache_size = "32MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "1MiB"
[packets]
size = "256MiB"
"#,
        dir.display()
    );
    let mut d = Daemon::start(dir, &text).await;
    let portals = d.server().local_addrs().to_vec();
    let proxies = [
        Proxy::start(portals[0]).await,
        Proxy::start(portals[1]).await,
    ];
    let via: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();

    let mut cfg = SessionConfig::new("iqn.2026-11.org.ftss:failover-rx", Some(TARGET));
    cfg.timeout = Duration::from_secs(10);
    let rx_t = MultipathTransport::new(&via, &cfg, 0, &[ip("10.7.0.2")]).expect("paths");
    rx_t.connect_all().await;
    let mut cfg = SessionConfig::new("iqn.2026-11.org.ftss:failover-tx", Some(TARGET));
    cfg.timeout = Duration::from_secs(10);
    let tx_t = MultipathTransport::new(&via, &cfg, 0, &[ip("10.7.0.1")]).expect("paths");
    tx_t.connect_all().await;

    let done = Arc::new(AtomicBool::new(false));
    // The cutter: one proxy, then the other, every 700 ms.
    let cutter = {
        let (done, proxies) = (Arc::clone(&done), proxies.clone());
        tokio::spawn(async move {
            let mut k = 0usize;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(700)).await;
                proxies[k % 2].cut();
                k += 1;
            }
        })
    };
    // The receiver: every payload is the packet's number; they must come 0, 1, 2, ...
    let got = Arc::new(Mutex::new(Vec::<u64>::with_capacity(PACKETS as usize)));
    let receiver = {
        let (got, t) = (Arc::clone(&got), Arc::clone(&rx_t));
        tokio::spawn(async move {
            let client = Arc::new(PacketClient::new(t).with_max_wait(Duration::from_secs(1)));
            let mut r = Receiver::new(client).with_wait(Duration::from_secs(1));
            let deadline = Instant::now() + Duration::from_secs(600);
            while (got.lock().expect("got").len() as u64) < PACKETS {
                assert!(Instant::now() < deadline, "receiver timed out");
                match r.poll().await {
                    Ok(records) => {
                        let mut g = got.lock().expect("got");
                        for d in records {
                            let n = u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
                            g.push(n);
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let _ = r.ack().await;
        })
    };
    // The sender: batches in order; a batch whose SEND failed goes again, same ids.
    let client = PacketClient::new(Arc::clone(&tx_t));
    let started = Instant::now();
    let mut retries = 0u64;
    let mut down = 0u64;
    let mut n = 0u64;
    while n < PACKETS {
        let mut batch: Vec<OutPacket> = (n..(n + BATCH).min(PACKETS))
            .map(|k| OutPacket::to(ip("10.7.0.2"), Bytes::from(k.to_le_bytes().repeat(8))))
            .collect();
        client.assign_ids(&mut batch);
        loop {
            match client.send(&batch).await {
                Ok(outcomes) if outcomes.iter().all(|o| *o == Outcome::Delivered) => break,
                Ok(outcomes) => {
                    // Both of the receiver's paths were down at that instant: nothing
                    // was stored; the application tries again later, same ids.
                    assert!(
                        outcomes.iter().all(|o| *o == Outcome::DestinationDown),
                        "{outcomes:?}"
                    );
                    down += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    assert!(e.is_connection_error(), "unexpected error: {e}");
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        n += batch.len() as u64;
    }
    let send_secs = started.elapsed().as_secs_f64();
    tokio::time::timeout(Duration::from_secs(120), receiver)
        .await
        .expect("receiver finishes")
        .expect("receiver task");
    done.store(true, Ordering::Relaxed);
    let _ = cutter.await;
    let got = got.lock().expect("got").clone();
    let cuts: u64 = proxies.iter().map(|p| p.cuts.load(Ordering::Relaxed)).sum();
    println!(
        "failover: {PACKETS} packets in {send_secs:.1} s, {cuts} connection resets, sender: {} failovers, {retries} SENDs retried after a reset, {down} refused while the receiver had no path, {} logins; receiver: {} failovers, {} logins",
        tx_t.failovers.load(Ordering::Relaxed),
        tx_t.logins.load(Ordering::Relaxed),
        rx_t.failovers.load(Ordering::Relaxed),
        rx_t.logins.load(Ordering::Relaxed),
    );
    assert_eq!(got.len() as u64, PACKETS, "every packet, none twice");
    for (i, &v) in got.iter().enumerate() {
        assert_eq!(v, i as u64, "in order, exactly once: position {i}");
    }
    assert!(cuts >= 3, "the stream saw connection resets ({cuts})");
    assert!(
        tx_t.failovers.load(Ordering::Relaxed) + rx_t.failovers.load(Ordering::Relaxed) > 0,
        "and some commands were hit by them"
    );
    if let Some(server) = d.server.take() {
        server.shutdown().await;
    }
}

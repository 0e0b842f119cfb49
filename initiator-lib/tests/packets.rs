//! The packet API against an in-process ftss target: nodes register, send, receive,
//! acknowledge and replay through the vendor commands.
//! The nodes are not in the configuration: they register their addresses at run time.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ftss_initiator::{
    Error, IscsiTransport, OutPacket, Outcome, PacketClient, Receiver, RouteState, Session,
    SessionConfig,
};
use ftss_test_support::{temp_dir, Daemon};

const TARGET: &str = "iqn.2026-11.org.ftss:packets";
const WAIT: Duration = Duration::from_secs(5);

async fn daemon(tag: &str) -> Daemon {
    daemon_with(tag, 16, "").await
}

/// A daemon with a packet queue of `packets_mib` MiB and `packets_extra` added to its
/// `[packets]` table.
async fn daemon_with(tag: &str, packets_mib: u32, packets_extra: &str) -> Daemon {
    let dir = temp_dir(tag);
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"

[media]
cache_size = "8MiB"

[[target]]
iqn = "{TARGET}"

[[target.lun]]
lun = 0
path = "lun0.img"
size = "16MiB"

[packets]
size = "{packets_mib}MiB"
retain_s = 3600
{packets_extra}
"#,
        dir.display()
    );
    Daemon::start(dir, &text).await
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// A node: its own session (initiator name `node-<name>`) with `addr` registered.
struct Node {
    session: Arc<Session>,
    client: Arc<PacketClient<IscsiTransport>>,
}

async fn login(d: &Daemon, name: &str) -> Arc<Session> {
    let config = SessionConfig::new(&format!("iqn.2026-11.org.ftss:node-{name}"), Some(TARGET));
    Arc::new(Session::connect(d.addr, config).await.expect("login"))
}

async fn node(d: &Daemon, name: &str, addr: &str) -> Node {
    let session = login(d, name).await;
    let client = Arc::new(PacketClient::new(IscsiTransport::new(
        Arc::clone(&session),
        0,
    )));
    client.register(&[ip(addr)]).await.expect("register");
    Node { session, client }
}

/// Receives until `n` records came or the wait ran out.
async fn receive_n(c: &PacketClient<IscsiTransport>, n: usize) -> Vec<ftss_initiator::Delivered> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        out.extend(c.receive(0, Some(left)).await.expect("receive"));
    }
    out
}

#[tokio::test]

async fn two_nodes_register_and_see_each_other() {
    let d = daemon("routes").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let info = n1.client.query().await.expect("query");
    assert_eq!(
        info.addrs.iter().map(|a| a.ip()).collect::<Vec<_>>(),
        [ip("10.0.0.1")]
    );
    let table = n2.client.routing_table().await.expect("routing table");
    let find = |a: &str| {
        table
            .entries
            .iter()
            .find(|e| e.addr.ip() == ip(a))
            .unwrap_or_else(|| panic!("{a} in {table:?}"))
    };
    assert!(find("10.0.0.2").local && !find("10.0.0.1").local);
    assert_eq!(find("10.0.0.1").state, RouteState::Available);
    assert_ne!(find("10.0.0.1").node_id, find("10.0.0.2").node_id);
    // An address another node holds is refused.
    let n3 = login(&d, "3").await;
    let c3 = PacketClient::new(IscsiTransport::new(n3, 0));
    assert!(matches!(
        c3.register(&[ip("10.0.0.1")]).await,
        Err(Error::ScsiStatus { .. })
    ));
    n1.session.logout().await.expect("logout");
}

#[tokio::test]

async fn guaranteed_send_is_received_and_acknowledged() {
    let d = daemon("send").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let mut p = [OutPacket::to(ip("10.0.0.2"), &b"hello"[..])];
    n1.client.assign_ids(&mut p);
    let out = n1.client.send(&p).await.expect("send");
    assert_eq!(out, vec![Outcome::Delivered]);

    let got = receive_n(&n2.client, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.source, ip("10.0.0.1"));
    assert_eq!(r.payload, Bytes::from_static(b"hello"));
    assert_eq!(Some(r.packet_id), p[0].packet_id);
    assert!(r.seq >= 1 && !r.flags.broadcast && r.failure_notice().is_none());
    let stats = n2.client.queue_stats().await.expect("stats");
    assert_eq!((stats.queued_records, stats.queued_bytes), (1, 5));
    assert_eq!(stats.last_delivered, r.seq);

    n2.client.ack_upto(r.seq).await.expect("ack");
    let stats = n2.client.queue_stats().await.expect("stats");
    assert_eq!(stats.queued_records, 0);
    assert_eq!(stats.first_unacked, 0);
    // Nothing more is queued: a short wait comes back empty.
    let more = n2
        .client
        .receive(0, Some(Duration::from_millis(200)))
        .await
        .expect("receive");
    assert!(more.is_empty(), "{more:?}");
}

#[tokio::test]

async fn unknown_destination_is_undeliverable_and_mixed_batches_report_each_packet() {
    let d = daemon("unknown").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let _n2 = node(&d, "2", "10.0.0.2").await;
    let o = n1
        .client
        .send_one(ip("10.0.0.99"), &b"nobody"[..], false)
        .await
        .expect("send");
    assert_eq!(o, Outcome::UnknownDestination);
    let out = n1
        .client
        .send(&[
            OutPacket::to(ip("10.0.0.2"), &b"a"[..]),
            OutPacket::to(ip("10.0.0.99"), &b"b"[..]),
        ])
        .await
        .expect("send");
    assert_eq!(out, vec![Outcome::Delivered, Outcome::UnknownDestination]);
}

#[tokio::test]

async fn a_packet_id_sent_twice_is_delivered_once() {
    let d = daemon("dup").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let p = [OutPacket::to(ip("10.0.0.2"), &b"once"[..]).with_id(42)];
    assert_eq!(
        n1.client.send(&p).await.expect("send"),
        [Outcome::Delivered]
    );
    // The retry after a "lost response": same id, the original's outcome, not stored.
    assert_eq!(
        n1.client.send(&p).await.expect("send"),
        [Outcome::Delivered]
    );
    let got = receive_n(&n2.client, 2).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].packet_id, 42);
}

#[tokio::test]

async fn broadcast_reaches_every_other_node() {
    let d = daemon("bcast").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let n3 = node(&d, "3", "10.0.0.3").await;
    let o = n3
        .client
        .send_one(ip("10.0.0.3"), &b"all"[..], true)
        .await
        .expect("broadcast");
    assert_eq!(o, Outcome::Delivered);
    for n in [&n1, &n2] {
        let got = receive_n(&n.client, 1).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].flags.broadcast);
        assert_eq!(got[0].source, ip("10.0.0.3"));
        assert_eq!(got[0].payload, Bytes::from_static(b"all"));
    }
    // Not to the sender.
    let own = n3
        .client
        .receive(0, Some(Duration::from_millis(200)))
        .await
        .expect("receive");
    assert!(own.is_empty(), "{own:?}");
}

#[tokio::test]

async fn replay_after_ack_reads_the_records_again() {
    let d = daemon("replay").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let since = SystemTime::now() - Duration::from_secs(1);
    let payloads: [&[u8]; 3] = [b"one", b"two", b"three"];
    let packets: Vec<_> = payloads
        .iter()
        .map(|p| OutPacket::to(ip("10.0.0.2"), Bytes::from_static(p)))
        .collect();
    assert_eq!(
        n1.client.send(&packets).await.expect("send"),
        vec![Outcome::Delivered; 3]
    );
    let got = receive_n(&n2.client, 3).await;
    assert_eq!(got.len(), 3);
    let last = got[2].seq;
    n2.client.ack_upto(last).await.expect("ack");

    let again = n2.client.replay_from_seq(got[0].seq).await.expect("replay");
    assert_eq!(
        again, got,
        "REPLAY returns the acknowledged records as RECEIVE did"
    );
    let by_time = n2.client.replay_from_time(since).await.expect("replay");
    assert_eq!(by_time, got);
    let tail = n2.client.replay_from_seq(last).await.expect("replay");
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].payload, Bytes::from_static(b"three"));
    // REPLAY does not move the RECEIVE position or bring records back.
    let none = n2
        .client
        .receive(0, Some(Duration::from_millis(200)))
        .await
        .expect("receive");
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test]
async fn acks_sent_beside_the_next_receive_all_reach_the_target() {
    let d = daemon("pipelined-acks").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    for i in 0..20u8 {
        n1.client
            .send_one(ip("10.0.0.2"), vec![i; 100], false)
            .await
            .expect("send");
    }
    // One record per poll: every poll after the first sends an ACK beside its RECEIVE.
    let mut rx = Receiver::new(Arc::clone(&n2.client))
        .with_wait(Duration::from_millis(200))
        .with_max_records(1);
    let mut got = Vec::new();
    while got.len() < 20 {
        got.extend(rx.poll().await.expect("poll"));
    }
    let payloads: Vec<u8> = got.iter().map(|d| d.payload[0]).collect();
    assert_eq!(
        payloads,
        (0..20).collect::<Vec<u8>>(),
        "once each, in order"
    );
    // A poll that finds nothing still carries the last ACK; it ends after the wait.
    assert!(rx.poll().await.expect("poll").is_empty());
    let stats = n2.client.queue_stats().await.expect("stats");
    assert_eq!(stats.queued_records, 0, "{stats:?}");
    assert_eq!(stats.first_unacked, 0, "{stats:?}");
}

#[tokio::test]

async fn receiver_hands_records_once_across_a_new_session() {
    let d = daemon("reconnect").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let mut rx = Receiver::new(Arc::clone(&n2.client)).with_wait(WAIT);
    n1.client
        .send_one(ip("10.0.0.2"), &b"first"[..], false)
        .await
        .expect("send");
    let got = rx.next().await.expect("receive");
    assert_eq!(got.len(), 1);
    // The session ends before the receiver acknowledged: the records stay queued and a
    // new session of the node gets them again.
    n2.session.logout().await.expect("logout");
    let s = login(&d, "2").await;
    n2.client.replace_transport(IscsiTransport::new(s, 0));
    n2.client
        .register(&[ip("10.0.0.2")])
        .await
        .expect("register again");
    n1.client
        .send_one(ip("10.0.0.2"), &b"second"[..], false)
        .await
        .expect("send");
    let got = rx.next().await.expect("receive");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, Bytes::from_static(b"second"));
    rx.ack().await.expect("ack");
    let stats = n2.client.queue_stats().await.expect("stats");
    assert_eq!(stats.queued_records, 0);
}

/// Receives until `n` records came or `wait` ran out.
async fn receive_all(
    c: &PacketClient<IscsiTransport>,
    n: usize,
    wait: Duration,
) -> Vec<ftss_initiator::Delivered> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let got = c.receive(0, Some(left.min(WAIT))).await.expect("receive");
        if let Some(last) = got.last() {
            c.ack_upto(last.seq).await.expect("ack");
        }
        out.extend(got);
    }
    out
}

const SENDERS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_are_coalesced_and_keep_their_order() {
    const EACH: usize = 40;
    let d = daemon("coalesce").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    let before = n1.client.send_stats();
    let mut tasks = Vec::new();
    for t in 0..SENDERS {
        let c = Arc::clone(&n1.client);
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                // One packet at a time, each sent once the one before it was answered.
                let mut p = [OutPacket::to(ip("10.0.0.2"), format!("{t}:{i}"))];
                c.assign_ids(&mut p);
                let out = c.send(&p).await.expect("send");
                assert_eq!(out, [Outcome::Delivered], "sender {t} packet {i}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let total = SENDERS * EACH;
    let stats = n1.client.send_stats();
    let (sends, packets) = (stats.sends - before.sends, stats.packets - before.packets);
    assert_eq!(packets, total as u64, "{stats:?}");
    // 4 SENDs in flight for 32 senders: about 8 packets per SEND; 3 allows for a slow,
    // shared machine scheduling the senders late.
    assert!(sends * 3 <= packets, "{sends} SENDs for {packets} packets");
    assert_eq!(stats.send_results, 0, "every packet was delivered");

    // Every packet arrived once, and each sender's in the order it sent them.
    let got = receive_all(&n2.client, total, Duration::from_secs(60)).await;
    assert_eq!(got.len(), total);
    let mut next = vec![0usize; SENDERS];
    for r in &got {
        let text = std::str::from_utf8(&r.payload).expect("text payload");
        let (t, i) = text.split_once(':').expect("t:i");
        let (t, i): (usize, usize) = (t.parse().expect("t"), i.parse().expect("i"));
        assert_eq!(i, next[t], "sender {t}: packet {i} came after {}", next[t]);
        next[t] += 1;
    }
    assert!(next.iter().all(|&n| n == EACH), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_outcomes_of_coalesced_sends_reach_the_right_callers() {
    const CALLS: usize = 10;
    let d = daemon("coalesce-mixed").await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let n2 = node(&d, "2", "10.0.0.2").await;
    // Packet j of call i of sender t goes nowhere when 3 divides t + i + j: SENDs of
    // several callers mix known and unknown destinations differently in every call.
    let known = |t: usize, i: usize, j: usize| !(t + i + j).is_multiple_of(3);
    let mut tasks = Vec::new();
    for t in 0..SENDERS {
        let c = Arc::clone(&n1.client);
        tasks.push(tokio::spawn(async move {
            let mut delivered = 0;
            for i in 0..CALLS {
                let packets: Vec<_> = (0..3)
                    .map(|j| {
                        let to = if known(t, i, j) {
                            "10.0.0.2"
                        } else {
                            "10.0.0.99"
                        };
                        OutPacket::to(ip(to), format!("{t}:{i}:{j}"))
                    })
                    .collect();
                let out = c.send(&packets).await.expect("send");
                let want: Vec<_> = (0..3)
                    .map(|j| {
                        if known(t, i, j) {
                            Outcome::Delivered
                        } else {
                            Outcome::UnknownDestination
                        }
                    })
                    .collect();
                assert_eq!(out, want, "sender {t} call {i}");
                delivered += want.iter().filter(|o| **o == Outcome::Delivered).count();
            }
            delivered
        }));
    }
    let mut delivered = 0;
    for t in tasks {
        delivered += t.await.expect("sender");
    }
    let stats = n1.client.send_stats();
    assert!(stats.send_results > 0, "{stats:?}");
    assert!(
        stats.sends < (SENDERS * CALLS) as u64,
        "no SEND carried two callers: {stats:?}"
    );
    // Exactly the packets reported delivered arrived (a repeated SEND stores nothing
    // twice), each with the payload its sender gave it.
    let got = receive_all(&n2.client, delivered, Duration::from_secs(60)).await;
    assert_eq!(got.len(), delivered);
    for r in &got {
        let text = std::str::from_utf8(&r.payload).expect("text payload");
        let f: Vec<usize> = text.split(':').map(|x| x.parse().expect("n")).collect();
        assert!(known(f[0], f[1], f[2]), "{text} was for nobody");
    }
    let more = n2
        .client
        .receive(0, Some(Duration::from_millis(200)))
        .await
        .expect("receive");
    assert!(more.is_empty(), "{more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_refused_for_busy_reaches_every_coalesced_caller() {
    // The node's quota as large as the queue: the media fills before the quota does.
    let d = daemon_with(
        "coalesce-busy",
        4,
        "node_quota_bytes = \"4MiB\"\nnode_quota_records = 100000",
    )
    .await;
    let n1 = node(&d, "1", "10.0.0.1").await;
    let _n2 = node(&d, "2", "10.0.0.2").await;
    let big = Bytes::from(vec![7u8; 60_000]);
    // Fill the queue for a node that never takes its packets.
    let mut stored = 0;
    loop {
        match n1.client.send_one(ip("10.0.0.2"), big.clone(), false).await {
            Ok(o) => {
                assert_eq!(o, Outcome::Delivered);
                stored += 1;
                assert!(stored < 200, "a 4 MiB queue took {stored} packets of 60 KB");
            }
            Err(Error::Busy) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let before = n1.client.send_stats();
    let gate = Arc::new(tokio::sync::Barrier::new(SENDERS));
    let mut tasks = Vec::new();
    for t in 0..SENDERS {
        let (c, gate, big) = (Arc::clone(&n1.client), Arc::clone(&gate), big.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let p = [
                OutPacket::to(ip("10.0.0.2"), big),
                OutPacket::to(ip("10.0.0.99"), format!("{t}")),
            ];
            c.send(&p).await
        }));
    }
    for t in tasks {
        let r = t.await.expect("sender");
        assert!(matches!(r, Err(Error::Busy)), "{r:?}");
    }
    let sends = n1.client.send_stats().sends - before.sends;
    assert!(
        sends < SENDERS as u64,
        "{sends} SENDs for {SENDERS} callers"
    );
}

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
size = "16MiB"
retain_s = 3600
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

//! Packet flows end to end: real iSCSI sessions (initiator-lib) send vendor commands to an
//! in-process daemon; every flow of the packet issue is checked from status, sense and the
//! records the destination receives.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::sense::Sense;
use ftss_proto::vendor::{
    AckCdb, NodeAddr, NodeCdb, NodeState, Outcome, QueueStats, ReceiveCdb, RecordList, ReplayCdb,
    ReplayFrom, SendCdb, SendList, SendRecord, SendResults, SendResultsCdb, SendStatus,
};
use ftss_target::config::Config;
use ftss_target::startup::Server;

const TARGET: &str = "iqn.2026-11.org.ftss:packets";

fn ip(x: u8) -> NodeAddr {
    NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
}

fn init(n: u8) -> String {
    format!("iqn.2026-11.org.ftss:node{n}")
}

fn config(dir: &Path, extra: &str) -> Config {
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
mirrors = ["lun-a.mirror", "lun-b.mirror"]
size = "4MiB"
[packets]
size = "16MiB"
delivery_timeout_s = 2
{extra}
[[node]]
initiator = "{}"
addresses = ["10.0.0.1"]
[[node]]
initiator = "{}"
addresses = ["10.0.0.2"]
[[node]]
initiator = "{}"
addresses = ["10.0.0.3"]
[[node]]
initiator = "{}"
addresses = ["10.0.0.4"]
"#,
        dir.display(),
        init(1),
        init(2),
        init(3),
        init(4)
    );
    Config::parse(&text).expect("config")
}

struct Node {
    s: Session,
}

struct Reply {
    status: u8,
    sense: Option<Sense>,
    sense_data: Bytes,
    data: Bytes,
}

impl Node {
    async fn login(addr: SocketAddr, name: &str) -> Node {
        let s = Session::connect(addr, SessionConfig::new(name, Some(TARGET)))
            .await
            .expect("login");
        Node { s }
    }

    async fn exec(&self, cdb: Vec<u8>, out: Option<Vec<u8>>, alloc: u32) -> Reply {
        let r = self
            .s
            .execute(0, &cdb, out.map(Bytes::from), alloc)
            .await
            .expect("command completes");
        Reply {
            status: r.status,
            sense: r.sense,
            sense_data: r.sense_data,
            data: r.data_in,
        }
    }

    async fn send(&self, tag: u64, records: Vec<SendRecord>) -> (Option<SendStatus>, Reply) {
        let data = SendList { records }.encode();
        let cdb = SendCdb {
            batch_tag: tag,
            param_len: data.len() as u32,
        }
        .encode();
        let r = self.exec(cdb, Some(data), 0).await;
        (SendStatus::from_reply(r.status, &r.sense_data), r)
    }

    async fn send_one(&self, dest: NodeAddr, id: u64, payload: &[u8]) -> Option<SendStatus> {
        self.send(id, vec![rec(dest, id, payload)]).await.0
    }

    async fn receive(&self, wait_100ms: u16) -> RecordList {
        let cdb = ReceiveCdb {
            wait: wait_100ms > 0,
            max_records: 0,
            alloc_len: 1 << 20,
            timeout: wait_100ms,
        }
        .encode();
        let r = self.exec(cdb, None, 1 << 20).await;
        assert_eq!(r.status, 0, "RECEIVE: {:?}", r.sense);
        RecordList::decode(&r.data).expect("FR list")
    }

    async fn ack(&self, upto: u64) {
        let r = self.exec(AckCdb::UpTo(upto).encode(), None, 0).await;
        assert_eq!(r.status, 0, "ACK: {:?}", r.sense);
    }

    async fn replay(&self, from: ReplayFrom) -> RecordList {
        let cdb = ReplayCdb {
            from,
            alloc_len: 1 << 20,
        }
        .encode();
        let r = self.exec(cdb, None, 1 << 20).await;
        assert_eq!(r.status, 0, "REPLAY: {:?}", r.sense);
        RecordList::decode(&r.data).expect("FR list")
    }

    async fn stats(&self) -> QueueStats {
        let r = self
            .exec(NodeCdb::QueueStats { alloc_len: 56 }.encode(), None, 56)
            .await;
        assert_eq!(r.status, 0, "QUEUE STATS: {:?}", r.sense);
        QueueStats::decode(&r.data).expect("FQ")
    }

    async fn set_state(&self, s: NodeState) {
        let r = self.exec(NodeCdb::SetState(s).encode(), None, 0).await;
        assert_eq!(r.status, 0);
    }
}

fn rec(dest: NodeAddr, id: u64, payload: &[u8]) -> SendRecord {
    SendRecord {
        dest,
        broadcast: false,
        packet_id: id,
        payload: payload.to_vec(),
    }
}

async fn daemon(tag: &str, extra: &str) -> (Server, SocketAddr, std::path::PathBuf) {
    let dir = ftss_test_support::temp_dir(tag);
    let server = Server::start(config(&dir, extra)).await.expect("daemon");
    let addr = server.local_addrs()[0];
    (server, addr, dir)
}

#[tokio::test]
async fn guaranteed_delivery_receive_ack_and_stamped_source() {
    let (server, addr, dir) = daemon("pk-guaranteed", "").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let n4 = Node::login(addr, &init(4)).await;
    assert_eq!(
        n1.send_one(ip(2), 1, b"hello").await,
        Some(SendStatus::All(Outcome::Delivered))
    );
    let got = n2.receive(0).await;
    assert_eq!(got.records.len(), 1);
    let r = &got.records[0];
    assert_eq!(r.payload, b"hello");
    assert_eq!(r.source, ip(1), "the target stamps the sender's address");
    assert_eq!(r.packet_id, 1);
    assert!(n4.receive(0).await.records.is_empty(), "others get nothing");
    assert!(n1.receive(0).await.records.is_empty());
    let st = n2.stats().await;
    assert_eq!((st.queued_records, st.last_delivered), (1, r.seq));
    n2.ack(r.seq).await;
    let st = n2.stats().await;
    assert_eq!((st.queued_records, st.queued_bytes), (0, 0), "{st:?}");
    // A long poll returns as soon as a packet arrives.
    let waiter = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let got = n2.receive(50).await;
        (got, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    n1.send_one(ip(2), 2, b"later").await;
    let (got, took) = waiter.await.expect("waiter");
    assert_eq!(got.records.len(), 1);
    assert!(
        took < Duration::from_secs(3),
        "long poll woke at once: {took:?}"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn undeliverable_unknown_down_and_maintenance_store_nothing() {
    let (server, addr, dir) = daemon("pk-undeliverable", "").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let (st, r) = n1
        .send(
            1,
            vec![rec(NodeAddr::from(Ipv4Addr::new(10, 9, 9, 9)), 1, b"x")],
        )
        .await;
    assert_eq!(st, Some(SendStatus::All(Outcome::UnknownDestination)));
    let s = r.sense.expect("sense");
    assert_eq!((s.key, s.asc, s.ascq), (0xb, 0x80, 0x02));
    assert_eq!(
        n1.send_one(ip(3), 2, b"x").await,
        Some(SendStatus::All(Outcome::DestinationDown))
    );
    n2.set_state(NodeState::Maintenance).await;
    assert_eq!(
        n1.send_one(ip(2), 3, b"x").await,
        Some(SendStatus::All(Outcome::DestinationMaintenance))
    );
    n2.set_state(NodeState::Available).await;
    assert!(n2.receive(0).await.records.is_empty(), "nothing was kept");
    // A session that is no node cannot send.
    let stranger = Node::login(addr, "iqn.2026-11.org.ftss:stranger").await;
    let (_, r) = stranger.send(1, vec![rec(ip(2), 1, b"x")]).await;
    let s = r.sense.expect("sense");
    assert_eq!((r.status, s.key, s.asc, s.ascq), (2, 5, 0x80, 0x20));
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn mixed_batch_reports_per_packet_outcomes_and_duplicates_are_suppressed() {
    let (server, addr, dir) = daemon("pk-mixed", "").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let (st, _) = n1
        .send(
            9,
            vec![
                rec(ip(2), 10, b"a"),
                rec(NodeAddr::from(Ipv4Addr::new(10, 9, 9, 9)), 11, b"b"),
                rec(ip(2), 10, b"a again, same id in the batch"),
            ],
        )
        .await;
    assert_eq!(st, Some(SendStatus::Mixed));
    let r = n1
        .exec(
            SendResultsCdb {
                batch_tag: 9,
                alloc_len: 1024,
            }
            .encode(),
            None,
            1024,
        )
        .await;
    let res = SendResults::decode(&r.data).expect("FS");
    let outcomes: Vec<Outcome> = res.results.iter().map(|x| x.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Delivered,
            Outcome::UnknownDestination,
            Outcome::Delivered
        ]
    );
    // A retry of packet 10 (a lost response) is answered, not stored again.
    assert_eq!(
        n1.send_one(ip(2), 10, b"a").await,
        Some(SendStatus::All(Outcome::Delivered))
    );
    let got = n2.receive(0).await;
    assert_eq!(got.records.len(), 1, "packet 10 delivered exactly once");
    // Asking about another batch is refused with a field pointer.
    let r = n1
        .exec(
            SendResultsCdb {
                batch_tag: 8,
                alloc_len: 1024,
            }
            .encode(),
            None,
            1024,
        )
        .await;
    assert_eq!(r.status, 2);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn broadcast_reaches_every_available_node_but_the_sender() {
    let (server, addr, dir) = daemon("pk-broadcast", "").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let n4 = Node::login(addr, &init(4)).await;
    let (st, _) = n1
        .send(
            1,
            vec![SendRecord {
                dest: NodeAddr::default(),
                broadcast: true,
                packet_id: 5,
                payload: b"to all".to_vec(),
            }],
        )
        .await;
    assert_eq!(st, Some(SendStatus::All(Outcome::Delivered)));
    for n in [&n2, &n4] {
        let got = n.receive(0).await;
        assert_eq!(got.records.len(), 1);
        assert!(got.records[0].flags.broadcast);
        assert_eq!(got.records[0].source, ip(1));
        n.ack(got.records[0].seq).await;
        assert_eq!(n.stats().await.queued_records, 0);
    }
    assert!(n1.receive(0).await.records.is_empty(), "not to the sender");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn acknowledged_packets_are_retained_for_replay() {
    let (server, addr, dir) = daemon("pk-replay", "retain_s = 3600").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for i in 0..5u64 {
        n1.send_one(ip(2), i, format!("msg {i}").as_bytes()).await;
    }
    let got = n2.receive(0).await;
    assert_eq!(got.records.len(), 5);
    let last = got.records[4].seq;
    n2.ack(last).await;
    let third = got.records[2].seq;
    let again = n2.replay(ReplayFrom::Seq(third)).await;
    let payloads: Vec<&[u8]> = again.records.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(payloads, vec![&b"msg 2"[..], b"msg 3", b"msg 4"]);
    let by_time = n2.replay(ReplayFrom::Time(t0)).await;
    assert_eq!(by_time.records.len(), 5);
    assert!(
        n1.replay(ReplayFrom::Seq(0)).await.records.is_empty(),
        "only one's own"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn without_retention_acknowledged_packets_are_deleted() {
    let (server, addr, dir) = daemon("pk-delete", "retain_s = 0").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    n1.send_one(ip(2), 1, b"gone soon").await;
    let got = n2.receive(0).await;
    n2.ack(got.records[0].seq).await;
    // The housekeeping tick (1 s) moves the log's tail past it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(n2.replay(ReplayFrom::Seq(0)).await.records.is_empty());
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_destination_down_too_long_earns_the_sender_a_notice() {
    let (server, addr, dir) = daemon("pk-notice", "").await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    assert_eq!(
        n1.send_one(ip(2), 42, b"are you there").await,
        Some(SendStatus::All(Outcome::Delivered))
    );
    n2.s.logout().await.expect("logout");
    drop(n2);
    // delivery_timeout_s = 2, checked every second.
    let got = n1.receive(60).await;
    assert_eq!(got.records.len(), 1, "a failure notice");
    let r = &got.records[0];
    assert!(r.flags.failure_notice);
    assert_eq!((r.packet_id, r.source), (42, ip(2)));
    assert_eq!(r.failure_notice(), Some(Outcome::DestinationDown));
    // The packet itself is still kept for node 2.
    let n2 = Node::login(addr, &init(2)).await;
    assert_eq!(n2.receive(0).await.records.len(), 1);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn after_a_restart_unacknowledged_packets_are_delivered_again_once() {
    let dir = ftss_test_support::temp_dir("pk-restart");
    let server = Server::start(config(&dir, "")).await.expect("daemon");
    let addr = server.local_addrs()[0];
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    for i in 0..10u64 {
        n1.send_one(ip(2), 100 + i, &[i as u8; 100]).await;
    }
    let got = n2.receive(0).await;
    assert_eq!(got.records.len(), 10);
    n2.ack(got.records[3].seq).await;
    drop((n1, n2));
    server.shutdown().await;
    let server = Server::start(config(&dir, "")).await.expect("restart");
    let addr = server.local_addrs()[0];
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let again = n2.receive(0).await;
    let ids: Vec<u64> = again.records.iter().map(|r| r.packet_id).collect();
    assert_eq!(
        ids,
        (104..110).collect::<Vec<_>>(),
        "the six unacknowledged"
    );
    // A sender retrying after the restart is not delivered twice.
    assert_eq!(
        n1.send_one(ip(2), 107, &[7; 100]).await,
        Some(SendStatus::All(Outcome::Delivered))
    );
    assert!(n2.receive(0).await.records.is_empty());
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn external_port_accepts_outgoing_uses_the_alternate_path_and_delivers_incoming() {
    let live = UdpSocket::bind("127.0.0.1:0").expect("udp");
    live.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let dead_port = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("udp");
        s.local_addr().expect("addr")
    };
    let extra = format!(
        "[packets.external]\nbind = \"127.0.0.1:0\"\npeers = [\"{dead_port}\", \"{}\"]",
        live.local_addr().expect("addr")
    );
    let (server, addr, dir) = daemon("pk-external", &extra).await;
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let outside = NodeAddr::from(Ipv4Addr::new(192, 0, 2, 50));
    let mut got = Vec::new();
    for i in 0..4u64 {
        let (st, r) = n1
            .send(i, vec![rec(outside, i, format!("out {i}").as_bytes())])
            .await;
        assert_eq!(
            st,
            Some(SendStatus::All(Outcome::Accepted)),
            "{:?}",
            r.sense
        );
        let s = r.sense.expect("sense");
        assert_eq!((s.key, s.asc, s.ascq), (1, 0x80, 0x01));
    }
    let mut buf = [0u8; 2048];
    while let Ok(n) = live.recv(&mut buf) {
        got.push(buf[..n].to_vec());
        if got.len() == 3 {
            break;
        }
    }
    // The first datagram went to the dead gateway (its ICMP error shows on the next
    // send), the rest took the alternate path.
    assert!(got.len() >= 3, "alternate path carried {} of 4", got.len());
    assert_eq!(&got[0][..16], &outside.0);
    assert_eq!(&got[0][16..32], &ip(1).0, "source stamped");
    // Figure 8: from outside to a known, available node: delivered; else dropped.
    let port = {
        let st = server.media().agent.as_ref().expect("agent");
        st.external_addr().expect("bound")
    };
    // From the gateway: the port takes datagrams only from its configured peers.
    let sock = &live;
    let mut d = Vec::new();
    d.extend_from_slice(&ip(2).0);
    d.extend_from_slice(&outside.0);
    d.extend_from_slice(b"from outside");
    sock.send_to(&d, port).expect("send");
    let mut d3 = d.clone();
    d3[..16].copy_from_slice(&ip(3).0);
    sock.send_to(&d3, port).expect("send");
    let rec2 = n2.receive(30).await;
    assert_eq!(rec2.records.len(), 1);
    assert!(rec2.records[0].flags.from_external);
    assert_eq!(rec2.records[0].source, outside);
    assert_eq!(rec2.records[0].payload, b"from outside");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_full_queue_answers_task_set_full_and_takes_packets_again_after_acks() {
    let dir = ftss_test_support::temp_dir("pk-full");
    let mut cfg = config(&dir, "");
    if let Some(p) = cfg.packets.as_mut() {
        p.size = "1MiB".into();
        // One destination may fill the whole log here: this is about the log, not the
        // per-node quota (tests/packet_guarantee.rs).
        p.node_quota_bytes = Some("1MiB".into());
    }
    let server = Server::start(cfg).await.expect("daemon");
    let addr = server.local_addrs()[0];
    let n1 = Node::login(addr, &init(1)).await;
    let n2 = Node::login(addr, &init(2)).await;
    let payload = vec![7u8; 4000];
    let mut stored = 0u64;
    let full = loop {
        let (st, r) = n1.send(stored, vec![rec(ip(2), stored, &payload)]).await;
        match st {
            Some(SendStatus::All(Outcome::Delivered)) => stored += 1,
            Some(SendStatus::MediaFull) => break r,
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            stored < 1000,
            "1 MiB cannot hold 1000 packets of 4000 bytes"
        );
    };
    assert_eq!(full.status, 0x28, "TASK SET FULL");
    assert!(full.sense_data.is_empty(), "no sense with TASK SET FULL");
    assert!(stored > 100, "{stored} stored before full");
    // Nothing acknowledged was dropped to make room: all of them are there.
    let mut got = 0;
    loop {
        let l = n2.receive(0).await;
        let Some(last) = l.records.last() else { break };
        got += l.records.len() as u64;
        n2.ack(last.seq).await;
    }
    assert_eq!(got, stored);
    let (st, _) = n1.send(9999, vec![rec(ip(2), 9999, &payload)]).await;
    assert_eq!(st, Some(SendStatus::All(Outcome::Delivered)), "room again");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

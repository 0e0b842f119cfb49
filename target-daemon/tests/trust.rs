//! What one initiator can and cannot do to another (docs/design.md, "Trust model"), over
//! real sessions against an in-process daemon: the external port takes datagrams only
//! from its peers and never with a node's address as source; ROUTING TABLE answers only
//! nodes; target resets only from the initiators the configuration names; an initiator
//! with per-node CHAP credentials cannot be impersonated without its secret.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use bytes::Bytes;

use ftss_initiator::{ChapCredentials, Error, Session, SessionConfig};
use ftss_proto::pdu::{Itt, Lun, Pdu, TaskMgmtRequest, TmfFunction};
use ftss_proto::serial::{CmdSn, DataSn};
use ftss_proto::vendor::{NodeAddr, NodeCdb, NodeInfo, ReceiveCdb, RecordList, RouteList};
use ftss_test_support::{Raw, INITIATOR, TARGET};

const NODE1: &str = "iqn.2026-11.org.ftss:trust-node1";
const NODE2: &str = "iqn.2026-11.org.ftss:trust-node2";
const ADMIN: &str = "iqn.2026-11.org.ftss:trust-admin";
const NODE1_SECRET: &str = "node1-secret-1234";

fn ip(x: u8) -> NodeAddr {
    NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
}

/// A daemon with packets, two configured nodes (node 1 with CHAP credentials), `extra`
/// appended to `[packets]` and `target_extra` to the `[[target]]` table.
async fn daemon(tag: &str, extra: &str, target_extra: &str) -> ftss_test_support::Daemon {
    let dir = ftss_test_support::temp_dir(tag);
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
nop_interval_s = 60
[media]
cache_size = "8MiB"
[[target]]
iqn = "{TARGET}"
{target_extra}
[[target.lun]]
lun = 0
path = "lun0.img"
size = "4MiB"
[packets]
size = "16MiB"
{extra}
[[node]]
initiator = "{NODE1}"
addresses = ["10.0.0.1"]
[node.chap]
username = "node1"
secret = "{NODE1_SECRET}"
[[node]]
initiator = "{NODE2}"
addresses = ["10.0.0.2"]
"#,
        dir.display()
    );
    ftss_test_support::Daemon::start(dir, &text).await
}

fn node1_config(secret: Option<&str>) -> SessionConfig {
    let mut c = SessionConfig::new(NODE1, Some(TARGET));
    c.chap = secret.map(|s| ChapCredentials {
        username: "node1".into(),
        secret: s.as_bytes().to_vec(),
        mutual: None,
    });
    c
}

async fn node1(addr: SocketAddr) -> Session {
    Session::connect(addr, node1_config(Some(NODE1_SECRET)))
        .await
        .expect("node 1 logs in with its secret")
}

async fn node2(addr: SocketAddr) -> Session {
    Session::connect(addr, SessionConfig::new(NODE2, Some(TARGET)))
        .await
        .expect("node 2 logs in without CHAP")
}

async fn receive(s: &Session, wait_100ms: u16) -> RecordList {
    let cdb = ReceiveCdb {
        wait: wait_100ms > 0,
        max_records: 0,
        alloc_len: 1 << 16,
        timeout: wait_100ms,
    }
    .encode();
    let r = s.execute(0, &cdb, None, 1 << 16).await.expect("RECEIVE");
    assert_eq!(r.status, 0, "RECEIVE: {:?}", r.sense);
    RecordList::decode(&r.data_in).expect("FR list")
}

fn datagram(dest: NodeAddr, source: NodeAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&dest.0);
    d.extend_from_slice(&source.0);
    d.extend_from_slice(payload);
    d
}

#[tokio::test]
async fn external_datagrams_only_from_peers_and_never_with_a_node_source() {
    let peer = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let extra = format!(
        "[packets.external]\nbind = \"127.0.0.1:0\"\npeers = [\"{}\"]",
        peer.local_addr().expect("addr")
    );
    let d = daemon("trust-external", &extra, "").await;
    let n2 = node2(d.addr).await;
    let media = d.server.as_ref().expect("server").media();
    let agent = media.agent.as_ref().expect("agent");
    let port = agent.external_addr().expect("bound");
    let outside = NodeAddr::from(Ipv4Addr::new(192, 0, 2, 50));
    // A host that is not a configured peer: dropped, however well formed.
    let stranger = UdpSocket::bind("127.0.0.1:0").expect("udp");
    stranger
        .send_to(&datagram(ip(2), outside, b"stranger"), port)
        .expect("send");
    // The peer posing as node 1 (configured, not even logged in): dropped.
    peer.send_to(&datagram(ip(2), ip(1), b"spoofed"), port)
        .expect("send");
    // The peer with an outside source: delivered.
    peer.send_to(&datagram(ip(2), outside, b"genuine"), port)
        .expect("send");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.is_empty() && Instant::now() < deadline {
        got.extend(receive(&n2, 10).await.records);
    }
    // The two dropped datagrams came from other sockets: wait for their verdicts rather
    // than rely on the order two senders' datagrams are read in. The delivered one is
    // counted after its store returns, which may be after the receiver already has it.
    let mut st = agent.external_stats().expect("external port");
    while (st.dropped_unknown_peer < 1 || st.dropped_spoofed_source < 1 || st.received < 1)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        st = agent.external_stats().expect("external port");
    }
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, b"genuine");
    assert_eq!(got[0].source, outside);
    assert!(got[0].flags.from_external);
    assert_eq!(st.dropped_unknown_peer, 1, "{st}");
    assert_eq!(st.dropped_spoofed_source, 1, "{st}");
    assert_eq!(st.received, 1, "{st}");
    assert!(
        receive(&n2, 3).await.records.is_empty(),
        "nothing else came"
    );
    drop(d);
}

#[tokio::test]
async fn routing_table_only_for_registered_nodes() {
    let d = daemon("trust-routes", "", "").await;
    let stranger = Session::connect(
        d.addr,
        SessionConfig::new("iqn.2026-11.org.ftss:trust-stranger", Some(TARGET)),
    )
    .await
    .expect("login");
    let cdb = NodeCdb::RoutingTable { alloc_len: 4096 }.encode();
    let r = stranger
        .execute(0, &cdb, None, 4096)
        .await
        .expect("completes");
    assert_eq!(
        r.status, 2,
        "CHECK CONDITION, not the table: {:?}",
        r.data_in
    );
    let s = r.sense.expect("sense");
    assert_eq!(
        (s.key, s.asc, s.ascq),
        (5, 0x80, 0x20),
        "NODE NOT REGISTERED"
    );
    assert!(r.data_in.is_empty());
    // A configured node gets it.
    let n2 = node2(d.addr).await;
    let r = n2.execute(0, &cdb, None, 4096).await.expect("completes");
    assert_eq!(r.status, 0, "{:?}", r.sense);
    let t = RouteList::decode(&r.data_in).expect("FT");
    assert_eq!(t.entries.len(), 2);
    drop(d);
}

/// A one-PDU login of `name` straight to the full feature phase.
async fn raw_login(c: &mut Raw, name: &str, isid: [u8; 6]) {
    let cmd_sn = c.cmd_sn.0;
    let (r, _) = c.login_with(isid, cmd_sn, &[("InitiatorName", name)]).await;
    assert_eq!((r.status_class, r.status_detail), (0, 0), "{name} logs in");
}

async fn tmf(c: &mut Raw, function: TmfFunction) -> u8 {
    let itt = c.itt();
    let t = TaskMgmtRequest {
        immediate: true,
        function,
        lun: Lun::from_number(0),
        itt,
        rtt: Itt(u32::MAX),
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        ref_cmd_sn: CmdSn(0),
        exp_data_sn: DataSn(0),
    };
    c.send(&Pdu::TaskMgmtRequest(t)).await;
    loop {
        match c.recv().await {
            Pdu::TaskMgmtResponse(r) => return r.response,
            Pdu::NopIn(_) => {}
            other => panic!("expected a TMF response, got {other:?}"),
        }
    }
}

/// TEST UNIT READY's status.
async fn tur(c: &mut Raw) -> u8 {
    let cmd = c.command(&ftss_test_support::TUR, 0, false, false, Bytes::new());
    c.run(cmd).await.0
}

#[tokio::test]
async fn target_resets_only_from_the_configured_initiators() {
    let d = daemon(
        "trust-reset",
        "",
        &format!("reset_initiators = [\"{ADMIN}\"]"),
    )
    .await;
    let mut user = Raw::connect(d.addr).await;
    user.login().await;
    // The power-on unit attention first, so a reset's unit attention would show.
    for _ in 0..4 {
        if tur(&mut user).await == 0 {
            break;
        }
    }
    for f in [TmfFunction::TargetColdReset, TmfFunction::TargetWarmReset] {
        assert_eq!(
            tmf(&mut user, f).await,
            6,
            "{f:?}: function authorization failed"
        );
    }
    // Refused means not done: the session is still there, and no reset's unit attention.
    assert_eq!(tur(&mut user).await, 0, "no unit attention");
    let nop = user.nop(b"still here").await;
    assert_eq!(&nop.data[..], b"still here");
    // The configured initiator may: its cold reset ends the other session too.
    let mut admin = Raw::connect(d.addr).await;
    raw_login(&mut admin, ADMIN, [0x40, 0, 0, 0, 0, 2]).await;
    assert_eq!(tmf(&mut admin, TmfFunction::TargetColdReset).await, 0);
    // End of stream, not a timeout: the connection was closed.
    let asked = Instant::now();
    let p = user.recv_within(Duration::from_secs(10)).await;
    assert!(
        p.is_none() && asked.elapsed() < Duration::from_secs(9),
        "the cold reset closes {INITIATOR}'s session: {p:?}"
    );
    drop(d);
}

#[tokio::test]
async fn per_node_chap_authenticates_the_initiator_name() {
    let d = daemon("trust-chap", "", "").await;
    let cdb = NodeCdb::Query { alloc_len: 1032 }.encode();
    // Claiming node 1's name without CHAP, or with a wrong secret or another CHAP_N:
    // authentication failure (2/1).
    let auth_failed = |e: &Error| {
        matches!(
            e,
            Error::LoginRejected {
                class: 2,
                detail: 1
            }
        )
    };
    let e = Session::connect(d.addr, node1_config(None))
        .await
        .err()
        .expect("no CHAP, no login");
    assert!(auth_failed(&e), "{e}");
    let e = Session::connect(d.addr, node1_config(Some("guessed-secret-99")))
        .await
        .err()
        .expect("wrong secret");
    assert!(auth_failed(&e), "{e}");
    let mut other_name = node1_config(Some(NODE1_SECRET));
    if let Some(c) = other_name.chap.as_mut() {
        c.username = "node2".into();
    }
    let e = Session::connect(d.addr, other_name)
        .await
        .err()
        .expect("another CHAP_N");
    assert!(auth_failed(&e), "{e}");
    // A discovery session is a login with that name too.
    let mut disc = node1_config(None);
    disc.target_name = None;
    let e = Session::connect(d.addr, disc)
        .await
        .err()
        .expect("discovery without CHAP");
    assert!(auth_failed(&e), "{e}");
    // The right secret: logged in, and the session is node 1's.
    let n1 = node1(d.addr).await;
    let r = n1.execute(0, &cdb, None, 1032).await.expect("QUERY");
    assert_eq!(r.status, 0, "{:?}", r.sense);
    let info = NodeInfo::decode(&r.data_in).expect("FN");
    assert_eq!(info.addrs, vec![ip(1)]);
    // A node without credentials logs in as before.
    let n2 = node2(d.addr).await;
    let r = n2.execute(0, &cdb, None, 1032).await.expect("QUERY");
    assert_eq!(r.status, 0, "{:?}", r.sense);
    assert_eq!(NodeInfo::decode(&r.data_in).expect("FN").addrs, vec![ip(2)]);
    drop(d);
}

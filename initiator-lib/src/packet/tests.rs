#![allow(clippy::unwrap_used)]

use super::*;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use ftss_proto::pdu::Residual;
use ftss_proto::sense::common;
use ftss_proto::vendor::{op, PacketResult, ReceiveCdb, VendorCdb};

/// One command as the mock saw it.
#[derive(Clone, Debug)]
struct Call {
    cdb: VendorCdb,
    data_out: Option<Bytes>,
    data_in_len: u32,
}

type Reply = Result<ScsiResult, Error>;

/// Records every command (in a log shared by the mocks of one test, so a reconnect
/// shows in one sequence) and answers with scripted replies in order.
struct Mock {
    log: Arc<Mutex<Vec<Call>>>,
    replies: Mutex<VecDeque<Reply>>,
    /// When set, each command's answer waits for a permit: the test decides when a
    /// command in flight completes.
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// The same for ACK commands alone.
    ack_gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl Mock {
    fn new(log: &Arc<Mutex<Vec<Call>>>, replies: Vec<Reply>) -> Self {
        Mock {
            log: Arc::clone(log),
            replies: Mutex::new(replies.into()),
            gate: None,
            ack_gate: None,
        }
    }
}

impl Transport for Mock {
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
        let cdb = VendorCdb::parse(cdb).expect("the client sends valid vendor CDBs");
        self.log.lock().unwrap().push(Call {
            cdb,
            data_out,
            data_in_len,
        });
        let r = self
            .replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Err(Error::Protocol(format!("no reply scripted for {cdb:?}"))));
        let gate = match cdb {
            VendorCdb::Ack(_) => self.ack_gate.clone().or_else(|| self.gate.clone()),
            _ => self.gate.clone(),
        };
        async move {
            if let Some(g) = gate {
                g.acquire().await.unwrap().forget();
            }
            r
        }
    }
}

fn log() -> Arc<Mutex<Vec<Call>>> {
    Arc::new(Mutex::new(Vec::new()))
}

fn calls(log: &Arc<Mutex<Vec<Call>>>) -> Vec<Call> {
    log.lock().unwrap().clone()
}

fn reply(status: u8, sense: Option<Sense>, data_in: Vec<u8>) -> Reply {
    Ok(ScsiResult {
        status,
        sense,
        sense_data: Bytes::from(sense.map(|s| s.fixed()).unwrap_or_default()),
        data_in: Bytes::from(data_in),
        residual: Residual::default(),
    })
}

fn good(data_in: Vec<u8>) -> Reply {
    reply(GOOD, None, data_in)
}

fn send_status(s: SendStatus) -> Reply {
    reply(s.status(), s.sense(), Vec::new())
}

fn check(sense: Sense) -> Reply {
    reply(CHECK_CONDITION, Some(sense), Vec::new())
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn record(seq: u64) -> DeliveredRecord {
    DeliveredRecord {
        seq,
        source: NodeAddr::from(ip(1)),
        flags: DeliveryFlags::default(),
        packet_id: 1000 + seq,
        timestamp_ms: 1_767_225_600_000,
        payload: format!("packet {seq}").into_bytes(),
    }
}

fn records(more: bool, seqs: &[u64]) -> Reply {
    good(
        RecordList {
            more,
            records: seqs.iter().map(|&s| record(s)).collect(),
        }
        .encode(),
    )
}

fn seqs(d: &[Delivered]) -> Vec<u64> {
    d.iter().map(|d| d.seq).collect()
}

fn client(log: &Arc<Mutex<Vec<Call>>>, replies: Vec<Reply>) -> PacketClient<Mock> {
    PacketClient::new(Mock::new(log, replies)).with_first_packet_id(100)
}

/// Tag and packet ids of a SEND call.
fn sent(c: &Call) -> (u64, Vec<u64>) {
    let VendorCdb::Send(cdb) = c.cdb else {
        panic!("not a SEND: {c:?}");
    };
    let data = c.data_out.as_ref().expect("SEND data");
    assert_eq!(cdb.param_len as usize, data.len());
    let list = SendList::decode(data).expect("valid packet list");
    (
        cdb.batch_tag,
        list.records.iter().map(|r| r.packet_id).collect(),
    )
}

#[tokio::test]
async fn tags_increase_and_ids_are_assigned_unless_given() {
    let log = log();
    let c = client(&log, vec![good(vec![]), good(vec![])]);
    let out = c
        .send(&[
            OutPacket::to(ip(2), &b"a"[..]),
            OutPacket::to(ip(3), &b"b"[..]).with_id(7),
            OutPacket::broadcast(&b"c"[..]),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![Outcome::Delivered; 3]);
    assert_eq!(
        c.send_one(ip(2), &b"d"[..], false).await.unwrap(),
        Outcome::Delivered
    );
    let calls = calls(&log);
    assert_eq!(sent(&calls[0]), (1, vec![100, 7, 101]));
    assert_eq!(sent(&calls[1]), (2, vec![102]));
    let list = SendList::decode(calls[0].data_out.as_ref().unwrap()).unwrap();
    assert_eq!(list.records[0].dest, NodeAddr::from(ip(2)));
    assert!(list.records[2].broadcast && list.records[2].dest.is_unspecified());
    assert_eq!(list.records[1].payload, b"b");
}

#[test]
fn assign_ids_fills_only_missing_ones() {
    let c = client(&log(), vec![]);
    let mut p = vec![
        OutPacket::broadcast(&b""[..]).with_id(5),
        OutPacket::broadcast(&b""[..]),
    ];
    c.assign_ids(&mut p);
    c.assign_ids(&mut p);
    assert_eq!(p[0].packet_id, Some(5));
    assert_eq!(p[1].packet_id, Some(100));
}

#[test]
fn fresh_clients_do_not_start_at_small_ids() {
    // Seeded from the clock, so a restart does not reuse ids of stored packets.
    let c = PacketClient::new(Mock::new(&log(), vec![]));
    let mut p = vec![OutPacket::broadcast(&b""[..])];
    c.assign_ids(&mut p);
    assert!(p[0].packet_id.unwrap() > 1 << 60);
}

#[tokio::test]
async fn same_outcome_for_all_packets_is_read_from_sense() {
    let log = log();
    let c = client(
        &log,
        vec![
            send_status(SendStatus::All(Outcome::UnknownDestination)),
            send_status(SendStatus::All(Outcome::Accepted)),
        ],
    );
    let two = [
        OutPacket::to(ip(9), &b"x"[..]),
        OutPacket::to(ip(9), &b"y"[..]),
    ];
    assert_eq!(
        c.send(&two).await.unwrap(),
        vec![Outcome::UnknownDestination; 2]
    );
    assert_eq!(c.send(&two).await.unwrap(), vec![Outcome::Accepted; 2]);
    assert_eq!(calls(&log).len(), 2, "no SEND RESULTS needed");
}

#[tokio::test]
async fn mixed_batch_reads_send_results() {
    let log = log();
    let results = SendResults {
        batch_tag: 1,
        total: 2,
        results: vec![
            PacketResult {
                packet_id: 100,
                outcome: Outcome::Delivered,
            },
            PacketResult {
                packet_id: 101,
                outcome: Outcome::DestinationDown,
            },
        ],
    };
    let c = client(
        &log,
        vec![send_status(SendStatus::Mixed), good(results.encode())],
    );
    let out = c
        .send(&[
            OutPacket::to(ip(2), &b"a"[..]),
            OutPacket::to(ip(3), &b"b"[..]),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![Outcome::Delivered, Outcome::DestinationDown]);
    let calls = calls(&log);
    let VendorCdb::SendResults(r) = calls[1].cdb else {
        panic!("{:?}", calls[1]);
    };
    assert_eq!(r.batch_tag, 1);
    assert_eq!(r.alloc_len, 16 + 2 * 16);
    assert_eq!(calls[1].data_in_len, r.alloc_len);
}

#[tokio::test]
async fn results_replaced_by_another_send_repeat_the_batch_with_the_same_ids() {
    let log = log();
    let results = |tag| SendResults {
        batch_tag: tag,
        total: 1,
        results: vec![PacketResult {
            packet_id: 100,
            outcome: Outcome::Accepted,
        }],
    };
    let c = client(
        &log,
        vec![
            send_status(SendStatus::Mixed),
            // Another SEND came between: the target no longer knows tag 1.
            check(common::INVALID_FIELD_IN_CDB.cdb_field(2, None)),
            send_status(SendStatus::Mixed),
            good(results(2).encode()),
        ],
    );
    let out = c.send(&[OutPacket::to(ip(2), &b"a"[..])]).await.unwrap();
    assert_eq!(out, vec![Outcome::Accepted]);
    let calls = calls(&log);
    assert_eq!(calls.len(), 4);
    assert_eq!(sent(&calls[0]), (1, vec![100]));
    assert_eq!(sent(&calls[2]), (2, vec![100]));
}

#[tokio::test]
async fn media_full_is_busy_and_unit_attention_is_retried() {
    let log = log();
    let c = client(
        &log,
        vec![
            reply(vendor::status::TASK_SET_FULL, None, vec![]),
            reply(vendor::status::BUSY, None, vec![]),
            check(common::POWER_ON_RESET),
            good(vec![]),
            check(common::INVALID_FIELD_IN_PARAM_LIST.param_field(8, None)),
        ],
    );
    let p = [OutPacket::to(ip(2), &b"a"[..]).with_id(1)];
    assert!(matches!(c.send(&p).await, Err(Error::Busy)));
    assert!(matches!(c.send(&p).await, Err(Error::Busy)));
    assert_eq!(c.send(&p).await.unwrap(), vec![Outcome::Delivered]);
    match c.send(&p).await {
        Err(Error::ScsiStatus {
            status: CHECK_CONDITION,
            sense: Some(s),
        }) => assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x26)),
        r => panic!("{r:?}"),
    }
    // The UNIT ATTENTION'd SEND went out again with the same CDB.
    let calls = calls(&log);
    assert_eq!(sent(&calls[2]), sent(&calls[3]));
}

#[tokio::test]
async fn bad_packets_are_refused_before_sending() {
    let log = log();
    let c = client(&log, vec![]);
    let big = OutPacket::to(ip(2), vec![0u8; vendor::PAYLOAD_MAX + 1]);
    assert!(matches!(
        c.send(&[big]).await,
        Err(Error::InvalidArgument(_))
    ));
    let nowhere = OutPacket::to(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), &b"x"[..]);
    assert!(matches!(
        c.send(&[nowhere]).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(c.send(&[]).await.unwrap().is_empty());
    assert!(calls(&log).is_empty());
}

#[test]
fn large_sends_are_split_into_batches() {
    let rec = |id, len| SendRecord {
        dest: NodeAddr::from(ip(2)),
        broadcast: false,
        packet_id: id,
        payload: vec![0; len],
    };
    let b = batches((0..1030).map(|i| rec(i, 1)).collect());
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![1024, 6]);
    assert_eq!(b[1][0].packet_id, 1024);
    // 300 packets of 64 KiB: 255 fit in 16 MiB.
    let b = batches((0..300).map(|i| rec(i, 65535)).collect());
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![255, 45]);
    for batch in &b {
        let len: usize = batch.iter().map(SendRecord::encoded_len).sum();
        assert!(vendor::SEND_HEADER_LEN + len <= vendor::PARAM_LIST_MAX as usize);
    }
}

#[tokio::test]
async fn send_with_retry_reconnects_and_keeps_the_ids() {
    let log = log();
    let c = client(&log, vec![Err(Error::ConnectionClosed)]);
    let log2 = Arc::clone(&log);
    let out = c
        .send_with_retry(
            &[
                OutPacket::to(ip(2), &b"a"[..]),
                OutPacket::broadcast(&b"b"[..]),
            ],
            3,
            move || {
                let log = Arc::clone(&log2);
                async move { Ok(Mock::new(&log, vec![good(vec![])])) }
            },
        )
        .await
        .unwrap();
    assert_eq!(out, vec![Outcome::Delivered; 2]);
    let calls = calls(&log);
    assert_eq!(calls.len(), 2);
    assert_eq!(sent(&calls[0]).1, vec![100, 101]);
    assert_eq!(sent(&calls[1]).1, vec![100, 101]);
}

#[tokio::test]
async fn receive_waits_then_follows_more_without_waiting() {
    let log = log();
    let c = client(&log, vec![records(true, &[1, 2]), records(false, &[3])]);
    let got = c
        .receive(0, Some(Duration::from_millis(1450)))
        .await
        .unwrap();
    assert_eq!(seqs(&got), vec![1, 2, 3]);
    assert_eq!(got[0].source, ip(1));
    assert_eq!(got[0].payload, Bytes::from_static(b"packet 1"));
    let calls = calls(&log);
    let cdb = |i: usize| match calls[i].cdb {
        VendorCdb::Receive(r) => r,
        _ => panic!("{:?}", calls[i]),
    };
    assert_eq!(
        cdb(0),
        ReceiveCdb {
            wait: true,
            max_records: 0,
            alloc_len: RECEIVE_ALLOC_LEN,
            timeout: 15,
        }
    );
    assert!(!cdb(1).wait && cdb(1).timeout == 0);
    assert_eq!(calls[0].data_in_len, RECEIVE_ALLOC_LEN);
}

#[tokio::test]
async fn receive_stops_at_max_records_and_caps_the_wait() {
    let log = log();
    let c = client(&log, vec![records(true, &[1]), records(true, &[2])])
        .with_max_wait(Duration::from_secs(5));
    let got = c.receive(2, Some(Duration::from_secs(60))).await.unwrap();
    assert_eq!(seqs(&got), vec![1, 2]);
    let calls = calls(&log);
    assert_eq!(calls.len(), 2, "stops with MORE set once 2 records are in");
    let VendorCdb::Receive(first) = calls[0].cdb else {
        panic!()
    };
    let VendorCdb::Receive(second) = calls[1].cdb else {
        panic!()
    };
    assert_eq!((first.max_records, first.timeout), (2, 50));
    assert_eq!(second.max_records, 1);
}

#[tokio::test]
async fn replay_continues_after_the_last_record() {
    let log = log();
    let c = client(&log, vec![records(true, &[5, 6]), records(false, &[7])]);
    let since = UNIX_EPOCH + Duration::from_millis(1_767_225_600_000);
    let got = c.replay_from_time(since).await.unwrap();
    assert_eq!(seqs(&got), vec![5, 6, 7]);
    let from: Vec<_> = calls(&log)
        .iter()
        .map(|c| match c.cdb {
            VendorCdb::Replay(r) => r.from,
            _ => panic!("{c:?}"),
        })
        .collect();
    assert_eq!(
        from,
        vec![ReplayFrom::Time(1_767_225_600_000), ReplayFrom::Seq(7)]
    );
}

#[tokio::test]
async fn acks_by_sequence_and_by_list() {
    let log = log();
    let c = client(&log, vec![good(vec![]), good(vec![]), good(vec![])]);
    c.ack_upto(0).await.unwrap();
    c.ack_upto(4).await.unwrap();
    let many: Vec<u64> = (1..=1030).collect();
    c.ack_list(&many).await.unwrap();
    let calls = calls(&log);
    assert_eq!(
        calls.len(),
        3,
        "ack of 0 sends nothing; 1030 seqs take two lists"
    );
    assert_eq!(calls[0].cdb, VendorCdb::Ack(AckCdb::UpTo(4)));
    assert_eq!(
        calls[1].cdb,
        VendorCdb::Ack(AckCdb::List {
            param_len: 1024 * 8
        })
    );
    let list = AckList::decode(calls[2].data_out.as_ref().unwrap()).unwrap();
    assert_eq!(list.seqs, (1025..=1030).collect::<Vec<_>>());
}

#[tokio::test]
async fn receiver_hands_each_record_once_across_a_reconnect() {
    let log = log();
    let client = Arc::new(client(
        &log,
        vec![
            records(false, &[1, 2]),
            // The connection goes: the ACK for 1-2 and the RECEIVE beside it fail.
            Err(Error::ConnectionClosed),
            Err(Error::ConnectionClosed),
        ],
    ));
    let mut rx = Receiver::new(Arc::clone(&client)).with_wait(Duration::from_secs(1));
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1, 2]);
    assert!(rx.poll().await.unwrap_err().is_connection_error());
    assert_eq!(rx.last_seq(), 2);
    let fresh_nexus = QueueStats {
        queued_records: 3,
        queued_bytes: 24,
        first_unacked: 1,
        last_delivered: 0,
        last_assigned: 3,
        capacity_bytes: 1 << 30,
    };
    client.replace_transport(Mock::new(
        &log,
        vec![
            good(vec![]), // ACK 2, again
            good(fresh_nexus.encode()),
            // The RECEIVE ran before the ACK on the target: 1 and 2 come again.
            records(false, &[1, 2, 3]),
            good(vec![]),
            records(false, &[]),
        ],
    ));
    // The failed RECEIVE may have moved the target's position: the poll catches up first
    // (nothing was delivered on the new nexus).
    assert!(rx.poll().await.unwrap().is_empty());
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![3]);
    assert!(rx.poll().await.unwrap().is_empty());
    let cdbs: Vec<u8> = calls(&log)
        .iter()
        .map(|c| VendorCdb::encode(&c.cdb)[0])
        .collect();
    assert_eq!(
        cdbs,
        vec![
            op::RECEIVE,
            op::ACK,
            op::RECEIVE,
            op::ACK,
            op::NODE,
            op::RECEIVE,
            op::ACK,
            op::RECEIVE
        ]
    );
    let calls = calls(&log);
    assert_eq!(calls[3].cdb, VendorCdb::Ack(AckCdb::UpTo(2)));
    assert_eq!(calls[6].cdb, VendorCdb::Ack(AckCdb::UpTo(3)));
}

#[tokio::test]
async fn a_slow_ack_does_not_hold_back_the_records_behind_it() {
    let log = log();
    let mut m = Mock::new(
        &log,
        vec![
            records(false, &[1, 2]),
            good(vec![]), // ACK 2: answered only when the test says
            records(false, &[3]),
            good(vec![]), // ACK 3, sent as soon as ACK 2 is answered
            records(false, &[]),
            records(false, &[]),
        ],
    );
    let ack_gate = Arc::new(tokio::sync::Semaphore::new(0));
    m.ack_gate = Some(Arc::clone(&ack_gate));
    let mut rx = Receiver::new(Arc::new(PacketClient::new(m)));
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1, 2]);
    // The ACK of 1-2 hangs; the RECEIVE sent beside it brings 3 all the same.
    let got = tokio::time::timeout(Duration::from_secs(5), rx.poll())
        .await
        .expect("the poll must not wait for the ACK");
    assert_eq!(seqs(&got.unwrap()), vec![3]);
    // One ACK at a time: the next poll sends the ACK of 3 once that of 1-2 is answered,
    // before its RECEIVE; a quiet poll then leaves nothing unacknowledged.
    ack_gate.add_permits(2);
    assert!(rx.poll().await.unwrap().is_empty());
    assert!(rx.poll().await.unwrap().is_empty());
    let calls = calls(&log);
    let cdbs: Vec<&VendorCdb> = calls.iter().map(|c| &c.cdb).collect();
    assert_eq!(cdbs.len(), 6);
    assert!(matches!(cdbs[0], VendorCdb::Receive(_)));
    assert_eq!(*cdbs[1], VendorCdb::Ack(AckCdb::UpTo(2)), "sent first");
    assert!(matches!(cdbs[2], VendorCdb::Receive(_)));
    assert_eq!(*cdbs[3], VendorCdb::Ack(AckCdb::UpTo(3)));
    assert!(matches!(cdbs[4], VendorCdb::Receive(_)));
    assert!(
        matches!(cdbs[5], VendorCdb::Receive(_)),
        "nothing left to ack"
    );
}

#[tokio::test]
async fn a_refused_ack_reaches_the_application_after_the_records_beside_it() {
    let log = log();
    let client = Arc::new(client(
        &log,
        vec![
            records(false, &[1]),
            check(Sense::new(key::ILLEGAL_REQUEST, 0x24, 0)), // ACK 1
            records(false, &[2]),
            good(vec![]), // ACK 2
            records(false, &[]),
        ],
    ));
    let mut rx = Receiver::new(client);
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1]);
    // The RECEIVE beside the refused ACK brought 2: handed out, not lost.
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![2]);
    let e = rx.poll().await.unwrap_err();
    assert!(!e.is_connection_error(), "{e}");
    // Then the ACK goes again, covering both.
    assert!(rx.poll().await.unwrap().is_empty());
    let calls = calls(&log);
    assert_eq!(calls.len(), 5, "the failed poll sent nothing");
    assert_eq!(calls[3].cdb, VendorCdb::Ack(AckCdb::UpTo(2)));
}

#[tokio::test]
async fn redelivered_records_are_acknowledged_again() {
    let log = log();
    let client = Arc::new(client(
        &log,
        vec![
            records(false, &[1]),
            good(vec![]), // ACK 1: "done", but the target loses it (new nexus)
            records(false, &[1]),
            good(vec![]), // ACK 1 again
            records(false, &[]),
        ],
    ));
    let mut rx = Receiver::new(client);
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1]);
    assert!(rx.poll().await.unwrap().is_empty());
    assert!(rx.poll().await.unwrap().is_empty());
    let acks = calls(&log)
        .iter()
        .filter(|c| c.cdb == VendorCdb::Ack(AckCdb::UpTo(1)))
        .count();
    assert_eq!(acks, 2);
}

#[tokio::test]
async fn receiver_catches_up_with_replay_after_a_lost_response() {
    let log = log();
    let stats = QueueStats {
        queued_records: 3,
        queued_bytes: 24,
        first_unacked: 2,
        last_delivered: 4,
        last_assigned: 5,
        capacity_bytes: 1 << 30,
    };
    let client = Arc::new(client(
        &log,
        vec![
            records(false, &[1]),
            good(vec![]), // ACK 1
            // This RECEIVE took 2-4 on the target, but its answer never came.
            Err(Error::Timeout),
            good(stats.encode()),
            records(false, &[2, 3, 4, 5]),
            good(vec![]), // ACK 4
            records(false, &[5]),
        ],
    ));
    let mut rx = Receiver::new(client).starting_after(0);
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![1]);
    assert!(matches!(rx.poll().await, Err(Error::Timeout)));
    // 5 is past the target's RECEIVE position: RECEIVE will return it.
    assert_eq!(seqs(&rx.poll().await.unwrap()), vec![2, 3, 4]);
    assert_eq!(seqs(&rx.next().await.unwrap()), vec![5]);
    let calls = calls(&log);
    assert!(matches!(
        calls[3].cdb,
        VendorCdb::Node(NodeCdb::QueueStats { .. })
    ));
    assert!(matches!(
        calls[4].cdb,
        VendorCdb::Replay(ReplayCdb {
            from: ReplayFrom::Seq(2),
            ..
        })
    ));
    assert_eq!(calls[5].cdb, VendorCdb::Ack(AckCdb::UpTo(4)));
}

#[tokio::test]
async fn node_commands_decode_their_lists() {
    let log = log();
    let table = RouteList {
        total: 300,
        entries: Vec::new(),
    };
    let full = RouteList {
        total: 1,
        entries: vec![vendor::RouteEntry {
            addr: NodeAddr::from(ip(1)),
            state: vendor::RouteState::Available,
            local: true,
            external: false,
            node_id: 1,
        }],
    };
    let c = client(
        &log,
        vec![
            good(vec![]),
            good(vec![]),
            good(table.encode()),
            good(full.encode()),
        ],
    );
    c.register(&[ip(1), "2001:db8::7".parse().unwrap()])
        .await
        .unwrap();
    c.set_state(NodeState::Maintenance).await.unwrap();
    assert_eq!(c.routing_table().await.unwrap(), full);
    let calls = calls(&log);
    let list = AddressList::decode(calls[0].data_out.as_ref().unwrap()).unwrap();
    assert_eq!(list.addrs.len(), 2);
    assert_eq!(
        calls[1].cdb,
        VendorCdb::Node(NodeCdb::SetState(NodeState::Maintenance))
    );
    // The table reported 300 entries: read again with room for all of them.
    assert_eq!(
        calls[3].cdb,
        VendorCdb::Node(NodeCdb::RoutingTable {
            alloc_len: 8 + 300 * 24
        })
    );
}

// -----------------------------------------------------------------------------------
// Coalescing of concurrent sends

/// A client on a gated mock with one SEND in flight at most: a caller that comes while
/// a SEND is in flight queues, deterministically, until the test releases it.
fn gated(
    log: &Arc<Mutex<Vec<Call>>>,
    replies: Vec<Reply>,
    gate: &Arc<tokio::sync::Semaphore>,
) -> Arc<PacketClient<Mock>> {
    let mut m = Mock::new(log, replies);
    m.gate = Some(Arc::clone(gate));
    Arc::new(
        PacketClient::new(m)
            .with_first_packet_id(100)
            .with_sends_in_flight(1),
    )
}

/// Yields until `cond` holds; the spawned callers and SEND tasks of this
/// single-threaded runtime run meanwhile.
async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

fn waiting(c: &PacketClient<Mock>) -> usize {
    c.core.queue().waiting.len()
}

type Caller = tokio::task::JoinHandle<Result<Vec<Outcome>, Error>>;

/// A caller sending packets with these ids (to 10.0.0.2), started once the callers
/// before it are queued or in flight (`queued` of them waiting), so that the queue
/// order is the order of the calls.
async fn caller(c: &Arc<PacketClient<Mock>>, ids: &[u64], queued: usize) -> Caller {
    let packets: Vec<_> = ids
        .iter()
        .map(|&i| OutPacket::to(ip(2), &b"p"[..]).with_id(i))
        .collect();
    let c2 = Arc::clone(c);
    let h = tokio::spawn(async move { c2.send(&packets).await });
    until(|| waiting(c) == queued).await;
    h
}

fn results(tag: u64, r: &[(u64, Outcome)]) -> Reply {
    good(
        SendResults {
            batch_tag: tag,
            total: r.len() as u16,
            results: r
                .iter()
                .map(|&(packet_id, outcome)| PacketResult { packet_id, outcome })
                .collect(),
        }
        .encode(),
    )
}

#[test]
fn a_batch_takes_callers_in_order_up_to_one_sends_worth_and_skips_the_gone() {
    let rec = |len| SendRecord {
        dest: NodeAddr::from(ip(2)),
        broadcast: false,
        packet_id: 1,
        payload: vec![0; len],
    };
    let mut kept = Vec::new();
    let mut entry = |n: usize, len: usize, keep: bool| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if keep {
            kept.push(rx);
        }
        let records: Vec<_> = (0..n).map(|_| rec(len)).collect();
        let len = records.iter().map(SendRecord::encoded_len).sum();
        Queued {
            records,
            len,
            reply,
        }
    };
    let mut q = SendQueue {
        waiting: [
            entry(600, 1, true),
            entry(5, 1, false), // its caller went away: not sent
            entry(424, 1, true),
            entry(1, 1, true), // would make 1025
            entry(200, 65535, true),
            entry(60, 65535, true), // would pass 16 MiB
        ]
        .into(),
        tasks: 1,
        max_tasks: 1,
    };
    let sizes = |b: Vec<Queued>| b.iter().map(|q| q.records.len()).collect::<Vec<_>>();
    assert_eq!(sizes(take_batch(&mut q)), vec![600, 424]);
    assert_eq!(sizes(take_batch(&mut q)), vec![1, 200]);
    assert_eq!(sizes(take_batch(&mut q)), vec![60]);
    assert!(take_batch(&mut q).is_empty());
    drop(kept);
}

#[tokio::test]
async fn callers_queued_behind_a_send_share_the_next_and_split_its_results() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = gated(
        &log,
        vec![
            good(vec![]),
            send_status(SendStatus::Mixed),
            results(
                2,
                &[
                    (10, Outcome::Delivered),
                    (11, Outcome::UnknownDestination),
                    (20, Outcome::DestinationDown),
                    (30, Outcome::Delivered),
                    (31, Outcome::Delivered),
                    (32, Outcome::UnknownDestination),
                ],
            ),
        ],
        &gate,
    );
    let a = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    let b = caller(&c, &[10, 11], 1).await;
    let d = caller(&c, &[20], 2).await;
    let e = caller(&c, &[30, 31, 32], 3).await;
    gate.add_permits(3);
    assert_eq!(a.await.unwrap().unwrap(), vec![Outcome::Delivered]);
    assert_eq!(
        b.await.unwrap().unwrap(),
        vec![Outcome::Delivered, Outcome::UnknownDestination]
    );
    assert_eq!(d.await.unwrap().unwrap(), vec![Outcome::DestinationDown]);
    assert_eq!(
        e.await.unwrap().unwrap(),
        vec![
            Outcome::Delivered,
            Outcome::Delivered,
            Outcome::UnknownDestination
        ]
    );
    let calls = calls(&log);
    assert_eq!(calls.len(), 3);
    assert_eq!(sent(&calls[0]), (1, vec![1]));
    assert_eq!(sent(&calls[1]), (2, vec![10, 11, 20, 30, 31, 32]));
    assert_eq!(
        c.send_stats(),
        SendStats {
            sends: 2,
            packets: 7,
            send_results: 1
        }
    );
}

#[tokio::test]
async fn busy_and_refusals_reach_every_caller_of_the_send() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = gated(
        &log,
        vec![
            good(vec![]),
            send_status(SendStatus::MediaFull),
            check(common::INVALID_FIELD_IN_PARAM_LIST.param_field(8, None)),
        ],
        &gate,
    );
    let a = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    let busy = [
        caller(&c, &[10, 11], 1).await,
        caller(&c, &[20], 2).await,
        caller(&c, &[30], 3).await,
    ];
    gate.add_permits(1);
    assert_eq!(a.await.unwrap().unwrap(), vec![Outcome::Delivered]);
    // The second SEND is in flight now: queue behind it for the third.
    until(|| calls(&log).len() == 2).await;
    let refused = [caller(&c, &[40], 1).await, caller(&c, &[50, 51], 2).await];
    gate.add_permits(2);
    for h in busy {
        assert!(matches!(h.await.unwrap(), Err(Error::Busy)));
    }
    for h in refused {
        match h.await.unwrap() {
            Err(Error::ScsiStatus {
                status: CHECK_CONDITION,
                sense: Some(s),
            }) => assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x26)),
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(sent(&calls(&log)[1]).1, vec![10, 11, 20, 30]);
    assert_eq!(sent(&calls(&log)[2]).1, vec![40, 50, 51]);
}

#[tokio::test]
async fn a_connection_error_reaches_every_caller_as_one() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reset by peer");
    let c = gated(&log, vec![good(vec![]), Err(Error::Io(broken))], &gate);
    let a = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    let others = [
        caller(&c, &[10], 1).await,
        caller(&c, &[20, 21], 2).await,
        caller(&c, &[30], 3).await,
    ];
    gate.add_permits(2);
    a.await.unwrap().unwrap();
    for h in others {
        match h.await.unwrap() {
            Err(e @ Error::Io(_)) => {
                assert!(e.is_connection_error());
                assert!(e.to_string().contains("reset by peer"), "{e}");
            }
            r => panic!("{r:?}"),
        }
    }
}

#[tokio::test]
async fn a_caller_gone_while_queued_is_not_sent_and_the_others_keep_their_outcomes() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = gated(
        &log,
        vec![
            good(vec![]),
            send_status(SendStatus::Mixed),
            results(
                2,
                &[
                    (10, Outcome::DestinationDown),
                    (30, Outcome::Delivered),
                    (31, Outcome::UnknownDestination),
                ],
            ),
        ],
        &gate,
    );
    let a = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    let b = caller(&c, &[10], 1).await;
    let gone = caller(&c, &[20, 21], 2).await;
    let d = caller(&c, &[30, 31], 3).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    gate.add_permits(3);
    a.await.unwrap().unwrap();
    assert_eq!(b.await.unwrap().unwrap(), vec![Outcome::DestinationDown]);
    assert_eq!(
        d.await.unwrap().unwrap(),
        vec![Outcome::Delivered, Outcome::UnknownDestination]
    );
    assert_eq!(sent(&calls(&log)[1]).1, vec![10, 30, 31]);
    assert_eq!(waiting(&c), 0);
}

#[tokio::test]
async fn callers_gone_while_in_flight_do_not_stop_or_disturb_the_others() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = gated(
        &log,
        vec![
            good(vec![]),
            send_status(SendStatus::Mixed),
            results(
                2,
                &[
                    (10, Outcome::DestinationDown),
                    (20, Outcome::Delivered),
                    (30, Outcome::UnknownDestination),
                ],
            ),
            good(vec![]),
        ],
        &gate,
    );
    // A lone caller's SEND runs on its own task and goes with it; the callers queued
    // behind it are handed to a SEND task, which sends them at once.
    let a = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    let b = caller(&c, &[10], 1).await;
    let gone = caller(&c, &[20], 2).await;
    let d = caller(&c, &[30], 3).await;
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());
    until(|| calls(&log).len() == 2).await;
    assert_eq!(sent(&calls(&log)[1]).1, vec![10, 20, 30]);
    // A caller in the middle of that SEND goes away before its answer.
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    gate.add_permits(2);
    assert_eq!(b.await.unwrap().unwrap(), vec![Outcome::DestinationDown]);
    assert_eq!(d.await.unwrap().unwrap(), vec![Outcome::UnknownDestination]);
    // Nothing is stuck: the next caller has a SEND of its own.
    gate.add_permits(1);
    assert_eq!(
        caller(&c, &[40], 0).await.await.unwrap().unwrap(),
        vec![Outcome::Delivered]
    );
    assert_eq!(sent(&calls(&log)[3]).1, vec![40]);
    assert_eq!(c.core.queue().tasks, 0);
}

#[test]
fn a_slot_dropped_outside_a_runtime_fails_the_waiting_callers() {
    let c = client(&log(), vec![]);
    let (reply, mut answer) = tokio::sync::oneshot::channel();
    {
        let mut q = c.core.queue();
        q.tasks = 1;
        q.waiting.push_back(Queued {
            records: Vec::new(),
            len: 0,
            reply,
        });
    }
    drop(Slot {
        core: Arc::clone(&c.core),
    });
    // The reply was dropped unanswered: the caller gets a connection error.
    assert!(matches!(
        answer.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed)
    ));
    let tasks = c.core.queue().tasks;
    assert_eq!((tasks, waiting(&c)), (0, 0));
}

#[tokio::test]
async fn a_large_send_keeps_its_order_across_sends_shared_with_others() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let unknown = || send_status(SendStatus::All(Outcome::UnknownDestination));
    let c = gated(
        &log,
        vec![
            good(vec![]),
            send_status(SendStatus::All(Outcome::Delivered)),
            unknown(),
            unknown(),
        ],
        &gate,
    );
    let a = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    let big: Vec<u64> = (1000..2030).collect();
    let b = caller(&c, &big, 1).await;
    let small = caller(&c, &[5], 2).await;
    gate.add_permits(1);
    a.await.unwrap().unwrap();
    // SEND 2: the big caller's first 1024 (the small one does not fit beside them).
    until(|| calls(&log).len() == 2).await;
    assert_eq!(sent(&calls(&log)[1]).1, big[..1024].to_vec());
    // Its last 6 are queued only once the first 1024 are answered: after the small
    // caller, in the same SEND or the next one.
    gate.add_permits(3);
    let out = b.await.unwrap().unwrap();
    assert_eq!(out.len(), 1030);
    assert!(out[..1024].iter().all(|o| *o == Outcome::Delivered));
    assert!(out[1024..]
        .iter()
        .all(|o| *o == Outcome::UnknownDestination));
    assert_eq!(
        small.await.unwrap().unwrap(),
        vec![Outcome::UnknownDestination]
    );
    let rest: Vec<u64> = calls(&log)[2..].iter().flat_map(|c| sent(c).1).collect();
    let mut expected = vec![5];
    expected.extend(&big[1024..]);
    assert_eq!(rest, expected);
}

#[tokio::test]
async fn a_lone_sender_goes_at_once_and_up_to_the_limit_go_in_parallel() {
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut m = Mock::new(&log, (0..4).map(|_| good(vec![])).collect());
    m.gate = Some(Arc::clone(&gate));
    let c = Arc::new(PacketClient::new(m).with_sends_in_flight(3));
    let first = caller(&c, &[1], 0).await;
    until(|| calls(&log).len() == 1).await;
    // Each caller that finds fewer than 3 in flight has its own SEND.
    let second = caller(&c, &[2], 0).await;
    until(|| calls(&log).len() == 2).await;
    let more = [second, caller(&c, &[3], 0).await];
    until(|| calls(&log).len() == 3).await;
    // The fourth waits: three SENDs are in flight.
    let fourth = caller(&c, &[4], 1).await;
    gate.add_permits(4);
    first.await.unwrap().unwrap();
    for h in more {
        h.await.unwrap().unwrap();
    }
    fourth.await.unwrap().unwrap();
    assert_eq!(c.send_stats().sends, 4);
}

#[test]
fn sends_outside_a_tokio_runtime_go_alone() {
    use std::task::{Context, Poll, Waker};
    let log = log();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    // One SEND slot: inside tokio the second call would queue for a SEND task.
    let c = gated(&log, vec![good(vec![]), good(vec![])], &gate);
    let (p1, p2) = (
        [OutPacket::to(ip(2), &b"a"[..])],
        [OutPacket::to(ip(2), &b"b"[..])],
    );
    let mut first = std::pin::pin!(c.send(&p1));
    let mut second = std::pin::pin!(c.send(&p2));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert!(second.as_mut().poll(&mut cx).is_pending());
    // No runtime to spawn on: the second went out as a SEND of its own, not queued.
    assert_eq!(calls(&log).len(), 2);
    assert_eq!(waiting(&c), 0);
    gate.add_permits(2);
    for f in [first, second] {
        match f.poll(&mut cx) {
            Poll::Ready(r) => assert_eq!(r.unwrap(), vec![Outcome::Delivered]),
            Poll::Pending => panic!("answered SEND still pending"),
        }
    }
}

#[test]
fn duplicated_errors_keep_their_kind() {
    let io = Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "gone",
    ));
    let d = io.duplicate();
    assert!(d.is_connection_error());
    assert!(matches!(&d, Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset));
    assert_eq!(d.to_string(), io.to_string());
    assert!(matches!(Error::Busy.duplicate(), Error::Busy));
    assert!(Error::Timeout.duplicate().is_connection_error());
    let s = Error::ScsiStatus {
        status: CHECK_CONDITION,
        sense: Some(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0)),
    };
    assert_eq!(s.duplicate().to_string(), s.to_string());
}

//! Long-poll RECEIVEs: parked on the async side, they hold no thread, so many of them
//! leave LUN I/O and other nodes' packets prompt; an abort ends one at once; a response
//! cut short by the transport skips no record.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::pdu::{Itt, Lun, Pdu, TaskMgmtRequest, TmfFunction};
use ftss_proto::serial::DataSn;
use ftss_proto::vendor::{
    NodeAddr, Outcome, ReceiveCdb, RecordList, SendCdb, SendList, SendRecord, SendStatus,
};
use ftss_test_support::{read10, write10, Raw};

/// The raw client of `ftss_test_support` logs in to this name.
const TARGET: &str = ftss_test_support::TARGET;
/// Sessions holding long polls, and the polls over all of them.
const POLL_SESSIONS: usize = 16;
const POLLS: usize = 1000;
/// What "promptly" means here: far below the 20 s a poll waits.
const PROMPT: Duration = Duration::from_secs(5);
const DELIVERED: Option<SendStatus> = Some(SendStatus::All(Outcome::Delivered));

fn ip(x: u8) -> NodeAddr {
    NodeAddr::from(Ipv4Addr::new(10, 0, 1, x))
}

fn init(n: usize) -> String {
    format!("iqn.2026-11.org.ftss:lp{n}")
}

/// Nodes 1..=18: 1-16 poll, 17 sends, 18 receives. `ftss_test_support::INITIATOR` is node 19.
fn config_text(dir: &Path, portal: &str) -> String {
    config_sized(dir, portal, "16MiB")
}

fn config_sized(dir: &Path, portal: &str, packets_size: &str) -> String {
    let mut t = format!(
        r#"
[server]
portals = ["{portal}"]
data_dir = "{}"
cmd_window = 128
nop_interval_s = 60
[media]
cache_size = "64MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
mirrors = ["lun-a.mirror", "lun-b.mirror"]
size = "4MiB"
[packets]
size = "{packets_size}"
"#,
        dir.display()
    );
    for n in 1..=18 {
        t.push_str(&format!(
            "[[node]]\ninitiator = \"{}\"\naddresses = [\"{}\"]\n",
            init(n),
            Ipv4Addr::new(10, 0, 1, n as u8)
        ));
    }
    t.push_str(&format!(
        "[[node]]\ninitiator = \"{}\"\naddresses = [\"10.0.1.19\"]\n",
        ftss_test_support::INITIATOR
    ));
    t
}

fn receive_cdb(wait_100ms: u16, alloc_len: u32) -> Vec<u8> {
    ReceiveCdb {
        wait: wait_100ms > 0,
        max_records: 0,
        alloc_len,
        timeout: wait_100ms,
    }
    .encode()
}

async fn login(addr: SocketAddr, n: usize) -> Arc<Session> {
    let cfg = SessionConfig::new(&init(n), Some(TARGET));
    Arc::new(Session::connect(addr, cfg).await.expect("login"))
}

async fn send_one(s: &Session, dest: NodeAddr, id: u64, payload: &[u8]) -> Option<SendStatus> {
    let data = SendList {
        records: vec![SendRecord {
            dest,
            broadcast: false,
            packet_id: id,
            payload: payload.to_vec(),
        }],
    }
    .encode();
    let cdb = SendCdb {
        batch_tag: id,
        param_len: data.len() as u32,
    }
    .encode();
    let r = s
        .execute(0, &cdb, Some(Bytes::from(data)), 0)
        .await
        .expect("SEND completes");
    SendStatus::from_reply(r.status, &r.sense_data)
}

async fn receive(s: &Session, wait_100ms: u16, edtl: u32) -> RecordList {
    let r = s
        .execute(0, &receive_cdb(wait_100ms, 1 << 20), None, edtl)
        .await
        .expect("RECEIVE completes");
    assert_eq!(r.status, 0, "RECEIVE: {:?}", r.sense);
    RecordList::decode(&r.data_in).expect("FR list")
}

/// Runs `f` and fails the test if it takes longer than [`PROMPT`].
async fn prompt<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    match tokio::time::timeout(PROMPT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} not done within {PROMPT:?} (started {t:?})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_long_polls_leave_lun_io_and_packets_prompt() {
    let dir = ftss_test_support::temp_dir("longpoll-load");
    let port = ftss_test_support::free_port();
    let cfg = dir.join("ftss.toml");
    std::fs::write(&cfg, config_text(&dir, &format!("127.0.0.1:{port}"))).expect("config");
    let mut child = ftss_test_support::start_binary(env!("CARGO_BIN_EXE_ftss-target"), &cfg, port);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let sender = login(addr, 17).await;
    let dest = login(addr, 18).await;
    // Takes the power-on unit attention, so the LUN I/O below answers GOOD.
    let tur = sender
        .execute(0, &ftss_test_support::TUR, None, 0)
        .await
        .expect("TUR");
    assert!(tur.status == 0 || tur.status == 2);

    let mut pollers = Vec::new();
    let mut polls = Vec::new();
    for n in 1..=POLL_SESSIONS {
        let s = login(addr, n).await;
        let share = POLLS / POLL_SESSIONS + usize::from(n <= POLLS % POLL_SESSIONS);
        for _ in 0..share {
            let s = Arc::clone(&s);
            polls.push(tokio::spawn(async move {
                s.execute(0, &receive_cdb(200, 1 << 16), None, 1 << 16)
                    .await
                    .map(|r| r.data_in)
            }));
        }
        pollers.push(s);
    }
    assert_eq!(polls.len(), POLLS);
    // A NOP-Out goes through the CmdSN window after every poll of its session: its echo
    // says the target has taken them all.
    for s in &pollers {
        prompt("NOP behind the polls", s.nop_ping())
            .await
            .expect("ping");
    }

    // LUN I/O on another session.
    let block = Bytes::from(vec![0x5a; 512]);
    let w = prompt(
        "WRITE",
        sender.execute(0, &write10(8, 1), Some(block.clone()), 0),
    )
    .await
    .expect("WRITE");
    assert_eq!(w.status, 0);
    let r = prompt("READ", sender.execute(0, &read10(8, 1), None, 512))
        .await
        .expect("READ");
    assert_eq!((r.status, &r.data_in[..]), (0, &block[..]));
    // A packet between two other nodes.
    let st = prompt("SEND", send_one(&sender, ip(18), 1, b"between others")).await;
    assert_eq!(st, DELIVERED);
    let got = prompt("RECEIVE", receive(&dest, 0, 1 << 20)).await;
    assert_eq!(got.records.len(), 1);
    assert_eq!(got.records[0].payload, b"between others");
    // A packet for a polling node wakes one of its parked polls.
    let st = prompt("SEND to a poller", send_one(&sender, ip(1), 2, b"wake up")).await;
    assert_eq!(st, DELIVERED);
    let data = prompt("a woken poll", async {
        loop {
            if let Some(i) = polls.iter().position(tokio::task::JoinHandle::is_finished) {
                break polls.swap_remove(i).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("poll task")
    .expect("the woken poll completes");
    let list = RecordList::decode(&data).expect("FR list");
    assert_eq!(list.records.len(), 1);
    assert_eq!(list.records[0].payload, b"wake up");
    assert!(
        polls.iter().all(|p| !p.is_finished()),
        "the other polls stay parked"
    );

    for p in &polls {
        p.abort();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn tmf(c: &mut Raw, function: TmfFunction, rtt: Itt) -> Pdu {
    let itt = c.itt();
    Pdu::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function,
        lun: Lun::from_number(0),
        itt,
        rtt,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        ref_cmd_sn: c.cmd_sn,
        exp_data_sn: DataSn(0),
    })
}

/// Waits for the TMF response, ignoring target pings; panics after [`PROMPT`].
async fn tmf_response(c: &mut Raw) -> u8 {
    let deadline = Instant::now() + PROMPT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv_within(left).await {
            Some(Pdu::TaskMgmtResponse(r)) => return r.response,
            Some(Pdu::NopIn(_)) => {}
            Some(other) => panic!("unexpected PDU {other:?}"),
            None => panic!("no task management response within {PROMPT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_task_and_lun_reset_end_a_parked_receive_at_once() {
    let dir = ftss_test_support::temp_dir("longpoll-abort");
    let config =
        ftss_target::config::Config::parse(&config_text(&dir, "127.0.0.1:0")).expect("config");
    let server = ftss_target::startup::Server::start(config)
        .await
        .expect("daemon");
    let addr = server.local_addrs()[0];
    let mut c = Raw::connect(addr).await;
    c.login().await;

    for function in [TmfFunction::AbortTask, TmfFunction::LogicalUnitReset] {
        let cmd = c.command(&receive_cdb(200, 4096), 4096, true, false, Bytes::new());
        let rtt = cmd.itt;
        c.send(&Pdu::ScsiCommand(cmd)).await;
        // Nothing answers a parked poll.
        assert!(
            c.recv_within(Duration::from_millis(300)).await.is_none(),
            "the poll waits"
        );
        let t = tmf(&mut c, function, rtt);
        c.send(&t).await;
        assert_eq!(tmf_response(&mut c).await, 0, "{function:?} done");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_cut_by_its_expected_length_skips_no_record() {
    let dir = ftss_test_support::temp_dir("longpoll-edtl");
    let config =
        ftss_target::config::Config::parse(&config_text(&dir, "127.0.0.1:0")).expect("config");
    let server = ftss_target::startup::Server::start(config)
        .await
        .expect("daemon");
    let addr = server.local_addrs()[0];
    let sender = login(addr, 17).await;
    let dest = login(addr, 18).await;
    for id in 1..=3u64 {
        assert_eq!(
            send_one(&sender, ip(18), id, &[id as u8; 100]).await,
            DELIVERED
        );
    }
    // Room (EDTL) for the list header, one 152-byte record and part of the next, while
    // the CDB's allocation length would take them all.
    let r = dest
        .execute(0, &receive_cdb(0, 1 << 20), None, 12 + 152 + 100)
        .await
        .expect("RECEIVE");
    assert_eq!(r.status, 0);
    let mut ids: Vec<u64> = match RecordList::decode(&r.data_in) {
        Ok(l) => l.records.iter().map(|x| x.packet_id).collect(),
        // A list cut by the transport does not decode: whatever it held is lost.
        Err(_) => Vec::new(),
    };
    let rest = receive(&dest, 0, 1 << 20).await;
    ids.extend(rest.records.iter().map(|x| x.packet_id));
    assert_eq!(
        ids,
        vec![1, 2, 3],
        "every record arrives whole, none skipped"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_whose_data_in_is_not_transferred_is_delivered_again() {
    let dir = ftss_test_support::temp_dir("longpoll-unsent");
    let config =
        ftss_target::config::Config::parse(&config_text(&dir, "127.0.0.1:0")).expect("config");
    let server = ftss_target::startup::Server::start(config)
        .await
        .expect("daemon");
    let addr = server.local_addrs()[0];
    let mut c = Raw::connect(addr).await;
    c.login().await;
    let sender = login(addr, 17).await;
    for id in 1..=2u64 {
        assert_eq!(
            send_one(&sender, ip(19), id, b"for the raw node").await,
            DELIVERED
        );
    }
    // Without the R bit the transport carries no data-in: nothing reaches the initiator,
    // so nothing may count as delivered.
    let cmd = c.command(&receive_cdb(0, 4096), 4096, false, false, Bytes::new());
    let (status, data, _, _) = c.run(cmd).await;
    assert_eq!((status, data.len()), (0, 0));
    let cmd = c.command(&receive_cdb(0, 4096), 4096, true, false, Bytes::new());
    let (status, data, _, _) = c.run(cmd).await;
    assert_eq!(status, 0);
    let list = RecordList::decode(&data).expect("FR list");
    let ids: Vec<u64> = list.records.iter().map(|r| r.packet_id).collect();
    assert_eq!(
        ids,
        vec![1, 2],
        "the records of the unsent response come again"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_response_is_capped_whatever_its_allocation_length() {
    let dir = ftss_test_support::temp_dir("longpoll-cap");
    // 128 MiB of queue: the default per-node quota (a quarter) holds the 18 MB below.
    let config = ftss_target::config::Config::parse(&config_sized(&dir, "127.0.0.1:0", "128MiB"))
        .expect("config");
    let server = ftss_target::startup::Server::start(config)
        .await
        .expect("daemon");
    let addr = server.local_addrs()[0];
    let sender = login(addr, 17).await;
    let dest = login(addr, 18).await;
    // 300 packets of 60,000 bytes: about 18 MB of records, more than the 16 MiB cap.
    let payload = vec![0xa5u8; 60_000];
    for batch in 0..10u64 {
        let records = (0..30u64)
            .map(|i| SendRecord {
                dest: ip(18),
                broadcast: false,
                packet_id: 1 + batch * 30 + i,
                payload: payload.clone(),
            })
            .collect();
        let data = SendList { records }.encode();
        let cdb = SendCdb {
            batch_tag: batch,
            param_len: data.len() as u32,
        }
        .encode();
        let r = sender
            .execute(0, &cdb, Some(Bytes::from(data)), 0)
            .await
            .expect("SEND");
        assert_eq!(r.status, 0, "SEND {batch}: {:?}", r.sense);
    }
    let room = 64 << 20;
    let first = dest
        .execute(0, &receive_cdb(0, room), None, room)
        .await
        .expect("RECEIVE");
    assert_eq!(first.status, 0);
    assert!(
        first.data_in.len() <= 16 << 20,
        "{} bytes in one response",
        first.data_in.len()
    );
    let first = RecordList::decode(&first.data_in).expect("FR list");
    assert!(first.more, "the MORE flag says the rest is waiting");
    let rest = dest
        .execute(0, &receive_cdb(0, room), None, room)
        .await
        .expect("RECEIVE");
    let rest = RecordList::decode(&rest.data_in).expect("FR list");
    let ids: Vec<u64> = first
        .records
        .iter()
        .chain(&rest.records)
        .map(|r| r.packet_id)
        .collect();
    assert_eq!(ids, (1..=300).collect::<Vec<u64>>());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

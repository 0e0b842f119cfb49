//! Packets across SIGKILL: a sender streams packets (8 SENDs in flight) to a receiver
//! through the real `ftss-target` binary, which is killed with SIGKILL at random points
//! and restarted. The sender retries every SEND that did not complete with the same
//! packet ids. At the end every packet that got GOOD has been delivered, and no packet id
//! was stored twice (a packet seen again after a restart carries the same sequence
//! number: it is a redelivery of an unacknowledged packet, not a duplicate).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::vendor::{
    AckCdb, NodeAddr, Outcome, ReceiveCdb, RecordList, SendCdb, SendList, SendRecord, SendStatus,
};
use ftss_test_support::{free_port, start_binary};

const TARGET: &str = "iqn.2026-11.org.ftss:pcrash";
const KILLS: u32 = 12;

fn ip(x: u8) -> NodeAddr {
    NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
}

async fn connect(port: u16, name: &str) -> Option<Session> {
    let addr = format!("127.0.0.1:{port}").parse().ok()?;
    let mut cfg = SessionConfig::new(name, Some(TARGET));
    cfg.timeout = Duration::from_secs(5);
    Session::connect(addr, cfg).await.ok()
}

#[derive(Default)]
struct Book {
    /// Packet ids the target answered GOOD for.
    good: Vec<u64>,
    /// Packet id -> sequence numbers it was delivered with.
    seen: BTreeMap<u64, Vec<u64>>,
}

/// Sends ids `ids` as one SEND until the target answers; `None` if the session broke.
async fn send(s: &Session, ids: &[u64]) -> Option<SendStatus> {
    let list = SendList {
        records: ids
            .iter()
            .map(|&id| SendRecord {
                dest: ip(2),
                broadcast: false,
                packet_id: id,
                payload: id.to_le_bytes().repeat(16),
            })
            .collect(),
    }
    .encode();
    let cdb = SendCdb {
        batch_tag: ids[0],
        param_len: list.len() as u32,
    }
    .encode();
    let r = s.execute(0, &cdb, Some(Bytes::from(list)), 0).await.ok()?;
    SendStatus::from_reply(r.status, &r.sense_data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_packets_survive_sigkill_and_retries_are_not_stored_twice() {
    let dir = std::env::temp_dir().join(format!("ftss-pcrash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let port = free_port();
    let cfg = dir.join("ftss.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
portals = ["127.0.0.1:{port}"]
data_dir = "{}"
[media]
cache_size = "8MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
mirrors = ["l-a.mirror", "l-b.mirror"]
size = "1MiB"
[packets]
size = "64MiB"
[[node]]
initiator = "iqn.2026-11.org.ftss:sender"
addresses = ["10.0.0.1"]
[[node]]
initiator = "iqn.2026-11.org.ftss:receiver"
addresses = ["10.0.0.2"]
"#,
            dir.display()
        ),
    )
    .expect("config");
    let book = Arc::new(Mutex::new(Book::default()));
    let mut child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &cfg, port);
    let next_id = Arc::new(Mutex::new(1u64));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..=KILLS {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Senders: 8 in flight, each retrying its batch with the same ids until answered.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (book, next_id, stop) =
                (Arc::clone(&book), Arc::clone(&next_id), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let mut pending: Option<Vec<u64>> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Some(s) = connect(port, "iqn.2026-11.org.ftss:sender").await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    loop {
                        let ids = pending.take().unwrap_or_else(|| {
                            let mut n = next_id.lock().expect("ids");
                            let ids: Vec<u64> = (*n..*n + 4).collect();
                            *n += 4;
                            ids
                        });
                        match send(&s, &ids).await {
                            Some(SendStatus::All(Outcome::Delivered)) => {
                                book.lock().expect("book").good.extend(&ids);
                            }
                            // The receiver is not logged in (yet, or again after a
                            // restart): nothing was stored; try the same ids later.
                            Some(SendStatus::All(Outcome::DestinationDown)) => {
                                pending = Some(ids);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Some(other) => panic!("unexpected outcome {other:?}"),
                            None => {
                                pending = Some(ids);
                                break;
                            }
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                // Whatever is still pending was never answered: retry it to the end.
                pending
            }));
        }
        // Receiver: takes and acknowledges.
        let rbook = Arc::clone(&book);
        let rstop = Arc::clone(&stop);
        let receiver = tokio::spawn(async move {
            while !rstop.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(s) = connect(port, "iqn.2026-11.org.ftss:receiver").await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                loop {
                    let cdb = ReceiveCdb {
                        wait: true,
                        max_records: 0,
                        alloc_len: 1 << 20,
                        timeout: 2,
                    }
                    .encode();
                    let Ok(r) = s.execute(0, &cdb, None, 1 << 20).await else {
                        break;
                    };
                    let Ok(list) = RecordList::decode(&r.data_in) else {
                        break;
                    };
                    if let Some(last) = list.records.last() {
                        {
                            let mut b = rbook.lock().expect("book");
                            for rec in &list.records {
                                assert_eq!(rec.source, ip(1));
                                let id = rec.packet_id;
                                assert_eq!(
                                    rec.payload,
                                    id.to_le_bytes().repeat(16),
                                    "payload of {id}"
                                );
                                let seqs = b.seen.entry(id).or_default();
                                if !seqs.contains(&rec.seq) {
                                    seqs.push(rec.seq);
                                }
                            }
                        }
                        if s.execute(0, &AckCdb::UpTo(last.seq).encode(), None, 0)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    if rstop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                }
            }
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_ms = if round == KILLS {
            1500
        } else {
            200 + rng % 800
        };
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        if round < KILLS {
            // SIGKILL mid-stream, then restart.
            let _ = child.kill();
            let _ = child.wait();
            child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &cfg, port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut leftovers = Vec::new();
        for t in tasks {
            if let Some(p) = t.await.expect("sender") {
                leftovers.push(p);
            }
        }
        let _ = receiver.await;
        // Batches in flight at the kill are retried, same ids, before the next round.
        if let Some(s) = connect(port, "iqn.2026-11.org.ftss:sender").await {
            // The receiver may not be back yet: retry while it is down.
            let r = connect(port, "iqn.2026-11.org.ftss:receiver").await;
            for ids in leftovers {
                for _ in 0..100 {
                    match send(&s, &ids).await {
                        Some(SendStatus::All(Outcome::Delivered)) => {
                            book.lock().expect("book").good.extend(&ids);
                            break;
                        }
                        Some(SendStatus::All(Outcome::DestinationDown)) | None => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Some(other) => panic!("unexpected outcome {other:?}"),
                    }
                }
            }
            drop(r);
        }
    }
    // Drain: everything GOOD must arrive.
    let s = connect(port, "iqn.2026-11.org.ftss:receiver")
        .await
        .expect("receiver");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cdb = ReceiveCdb {
            wait: true,
            max_records: 0,
            alloc_len: 1 << 20,
            timeout: 5,
        }
        .encode();
        let r = s.execute(0, &cdb, None, 1 << 20).await.expect("receive");
        let list = RecordList::decode(&r.data_in).expect("FR");
        let Some(last) = list.records.last() else {
            break;
        };
        {
            let mut b = book.lock().expect("book");
            for rec in &list.records {
                let seqs = b.seen.entry(rec.packet_id).or_default();
                if !seqs.contains(&rec.seq) {
                    seqs.push(rec.seq);
                }
            }
        }
        s.execute(0, &AckCdb::UpTo(last.seq).encode(), None, 0)
            .await
            .expect("ack");
        assert!(Instant::now() < deadline, "drain takes too long");
    }
    let _ = child.kill();
    let _ = child.wait();
    let b = book.lock().expect("book");
    let lost: Vec<u64> = b
        .good
        .iter()
        .copied()
        .filter(|id| !b.seen.contains_key(id))
        .collect();
    let twice: HashMap<u64, Vec<u64>> = b
        .seen
        .iter()
        .filter(|(_, s)| s.len() > 1)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    println!(
        "packets across {KILLS} SIGKILLs: {} acknowledged by the target, {} delivered, {} lost, {} stored twice",
        b.good.len(),
        b.seen.len(),
        lost.len(),
        twice.len()
    );
    assert!(b.good.len() > 1000, "enough traffic: {}", b.good.len());
    assert!(lost.is_empty(), "lost: {:?}", &lost[..lost.len().min(20)]);
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

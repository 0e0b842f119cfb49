//! The Prometheus endpoint of the real `ftss-target` binary, scraped over plain TCP
//! before, during and after block I/O and packet SENDs through real iSCSI sessions
//! (initiator-lib): counters move by what was done, bytes match, histograms are
//! consistent, and the endpoint survives odd requests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::vendor::{NodeAddr, SendCdb, SendList, SendRecord, SendStatus};
use ftss_target::config::Config;
use ftss_test_support::{free_port, start_binary};

const TARGET: &str = "iqn.2026-11.org.ftss:metrics";
const BS: u32 = 512;

fn init(n: u8) -> String {
    format!("iqn.2026-11.org.ftss:mnode{n}")
}

fn ip(x: u8) -> NodeAddr {
    NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
}

fn write_config(dir: &Path, port: u16, metrics: u16) -> PathBuf {
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:{port}"]
data_dir = "{}"
metrics = "127.0.0.1:{metrics}"
[media]
cache_size = "8MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
mirrors = ["lun-a.mirror", "lun-b.mirror"]
size = "8MiB"
[packets]
size = "16MiB"
[[node]]
initiator = "{}"
addresses = ["10.0.0.1"]
[[node]]
initiator = "{}"
addresses = ["10.0.0.2"]
"#,
        dir.display(),
        init(1),
        init(2)
    );
    let path = dir.join("ftss.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// One HTTP exchange over a fresh connection: the status line's code and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // A refused oversized request may be answered and closed before it is all sent.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(usize::MAX);
    if !request.starts_with(b"HEAD ") {
        assert_eq!(len, body.len(), "Content-Length matches the body");
    }
    (code, head.to_owned(), body.to_owned())
}

/// Labels of a sample, as (name, value) pairs.
type Labels = Vec<(String, String)>;
/// One sample: metric name, labels, value.
type Sample = (String, Labels, f64);

/// A parsed scrape.
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

/// Splits `name{k="v",...}` into the name and its labels (our values hold no quotes).
fn parse_series(series: &str) -> (String, Vec<(String, String)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series.to_owned(), Vec::new());
    };
    let mut labels = Vec::new();
    let mut rest = rest.trim_end_matches('}');
    while let Some((k, tail)) = rest.split_once("=\"") {
        let (v, tail) = tail.split_once('"').expect("closing quote");
        labels.push((k.to_owned(), v.to_owned()));
        rest = tail.trim_start_matches(',');
    }
    (name.to_owned(), labels)
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (code, head, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "a complete exposition");
    let mut samples = Vec::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value` lines");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("a number in {line:?}"));
        let (name, labels) = parse_series(series);
        samples.push((name, labels, v));
    }
    Scrape {
        samples,
        text: body,
    }
}

fn has(labels: &[(String, String)], want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| labels.iter().any(|(a, b)| a == k && b == v))
}

impl Scrape {
    /// The sample of `name` whose labels include every one of `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let hits: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && has(l, labels))
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "one sample of {name}{labels:?}, found {hits:?} in\n{}",
            self.text
        );
        hits[0]
    }

    /// Checks every histogram of the scrape: buckets cumulative (non-decreasing in the
    /// order of their bounds), the last one +Inf, `_count` equal to it, `_sum` present.
    /// Returns how many histogram series there were.
    fn check_histograms(&self) -> usize {
        // Buckets by (histogram name, labels other than `le`).
        let mut series: HashMap<(String, Labels), Vec<(f64, f64)>> = HashMap::new();
        for (n, labels, v) in &self.samples {
            let Some(name) = n.strip_suffix("_bucket") else {
                continue;
            };
            let le = labels
                .iter()
                .find(|(k, _)| k == "le")
                .map(|(_, v)| v.as_str())
                .expect("a bucket has le");
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a number")
            };
            let mut rest: Vec<(String, String)> =
                labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            rest.sort();
            series
                .entry((name.to_owned(), rest))
                .or_default()
                .push((bound, *v));
        }
        for ((name, labels), mut b) in series.clone() {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            assert!(
                b.windows(2).all(|w| w[0].1 <= w[1].1),
                "{name}{labels:?}: buckets decrease: {b:?}"
            );
            assert_eq!(b.last().map(|x| x.0), Some(f64::INFINITY), "+Inf last");
            let want: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = self.get(&format!("{name}_count"), &want);
            let sum = self.get(&format!("{name}_sum"), &want);
            let inf = b.last().map_or(0.0, |x| x.1);
            assert_eq!(
                count, inf,
                "{name}{labels:?}: _count equals the +Inf bucket"
            );
            assert!(
                sum >= 0.0 && (count > 0.0 || sum == 0.0),
                "{name}{labels:?}"
            );
        }
        series.len()
    }
}

async fn login(port: u16, name: &str) -> Session {
    Session::connect(
        SocketAddr::from(([127, 0, 0, 1], port)),
        SessionConfig::new(name, Some(TARGET)),
    )
    .await
    .expect("login")
}

async fn send(s: &Session, dest: NodeAddr, id: u64, payload: &[u8]) -> Option<SendStatus> {
    let list = SendList {
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
        param_len: list.len() as u32,
    }
    .encode();
    let r = s
        .execute(0, &cdb, Some(Bytes::from(list)), 0)
        .await
        .expect("SEND answered");
    SendStatus::from_reply(r.status, &r.sense_data)
}

fn wait_for(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "metrics endpoint did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Scrapes on a blocking thread, so the async I/O keeps running meanwhile.
async fn scrape_async(addr: SocketAddr) -> Scrape {
    tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .expect("scrape thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_during_io_show_counters_bytes_and_consistent_histograms() {
    let dir = ftss_test_support::temp_dir("metrics");
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(&dir, port, mport);
    let mut child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &cfg, port);
    let maddr = SocketAddr::from(([127, 0, 0, 1], mport));
    wait_for(maddr);

    let before = scrape(maddr);
    let lun = [("target", TARGET), ("lun", "0")];
    let kind = |k: &'static str| [lun[0], lun[1], ("kind", k)];
    assert_eq!(before.get("ftss_sessions", &[("target", TARGET)]), 0.0);

    let n1 = login(port, &init(1)).await;
    let n2 = login(port, &init(2)).await;

    // Block I/O in the background, writing until told to stop (and at least WRITES
    // times); the scrapes below run while it does.
    const WRITES: u64 = 100;
    const BLOCKS: u32 = 8;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (p, st) = (Arc::clone(&progress), Arc::clone(&stop));
    let io = tokio::spawn(async move {
        n1.test_unit_ready(0).await.expect("TEST UNIT READY");
        let mut writes = 0u64;
        while writes < WRITES || !st.load(Ordering::Relaxed) {
            let data = Bytes::from(vec![writes as u8; (BLOCKS * BS) as usize]);
            let lba = (writes % 1000) * u64::from(BLOCKS);
            n1.write16(0, lba, data, BS).await.expect("WRITE");
            writes += 1;
            p.store(writes, Ordering::Relaxed);
        }
        for i in 0..WRITES {
            n1.read16(0, i * u64::from(BLOCKS), BLOCKS, BS)
                .await
                .expect("READ");
        }
        n1.synchronize_cache(0).await.expect("SYNCHRONIZE CACHE");
        (n1, writes)
    });
    while progress.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Two scrapes at once, while the writes run: both answered in full, and the
    // counters already show the writes done before them.
    let seen = progress.load(Ordering::Relaxed);
    let (a, b) = tokio::join!(scrape_async(maddr), scrape_async(maddr));
    stop.store(true, Ordering::Relaxed);
    for s in [&a, &b] {
        assert_eq!(
            s.check_histograms(),
            7,
            "six kinds on one LUN, and the cache"
        );
        assert_eq!(s.get("ftss_sessions", &[("target", TARGET)]), 2.0);
        assert_eq!(s.get("ftss_connections", &[("target", TARGET)]), 2.0);
        let w = s.get("ftss_lun_ops_total", &kind("write"))
            - before.get("ftss_lun_ops_total", &kind("write"));
        assert!(w >= seen as f64, "{w} writes counted of {seen} done");
    }
    let during = a.text.clone();
    let (n1, writes) = io.await.expect("I/O task");

    // Packets: 3 delivered to node 2 (not received, so queued), 1 to nobody.
    for id in 1..=3 {
        assert_eq!(
            send(&n1, ip(2), id, &[7u8; 100]).await,
            Some(SendStatus::All(ftss_proto::vendor::Outcome::Delivered))
        );
    }
    assert_eq!(
        send(&n1, NodeAddr::from(Ipv4Addr::new(10, 9, 9, 9)), 4, b"x").await,
        Some(SendStatus::All(
            ftss_proto::vendor::Outcome::UnknownDestination
        ))
    );

    let after = scrape(maddr);
    after.check_histograms();
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let bytes = (writes * u64::from(BLOCKS * BS)) as f64;
    let read_bytes = (WRITES * u64::from(BLOCKS * BS)) as f64;
    assert!(delta("ftss_lun_ops_total", &kind("write")) >= writes as f64);
    assert!(delta("ftss_lun_ops_total", &kind("read")) >= WRITES as f64);
    assert!(delta("ftss_lun_ops_total", &kind("flush")) >= 1.0);
    assert!(
        delta("ftss_lun_ops_total", &kind("other")) >= 1.0,
        "TEST UNIT READY"
    );
    assert_eq!(delta("ftss_lun_bytes_total", &kind("write")), bytes);
    assert_eq!(delta("ftss_lun_bytes_total", &kind("read")), read_bytes);
    for k in ["read", "write", "flush"] {
        assert!(
            after.get("ftss_lun_latency_seconds_sum", &kind(k)) > 0.0,
            "{k}"
        );
        assert_eq!(
            after.get("ftss_lun_latency_seconds_count", &kind(k)),
            after.get("ftss_lun_ops_total", &kind(k)),
            "{k}: one latency per command"
        );
    }
    // Nonvolatile cache: every acknowledged write waited for a commit.
    assert!(after.get("ftss_cache_commit_seconds_count", &[]) > 0.0);
    assert!(after.get("ftss_cache_commit_seconds_sum", &[]) > 0.0);
    assert!(after.get("ftss_cache_records_total", &[]) >= WRITES as f64);
    for set in ["iqn.2026-11.org.ftss:metrics/0", "packets"] {
        for m in ["0", "1"] {
            let l = [("set", set), ("member", m)];
            assert_eq!(after.get("ftss_mirror_state", &l), 0.0, "healthy");
            assert_eq!(after.get("ftss_mirror_rebuild_progress_ratio", &l), 1.0);
        }
    }
    let out = |o: &str| delta("ftss_packet_outcomes_total", &[("outcome", o)]);
    assert_eq!(out("delivered"), 3.0);
    assert_eq!(out("unknown_destination"), 1.0);
    let sent = |node: &str, o: &str| {
        delta(
            "ftss_node_sent_packets_total",
            &[("node", node), ("outcome", o)],
        )
    };
    assert_eq!(sent("10.0.0.1", "delivered"), 3.0);
    assert_eq!(sent("10.0.0.1", "unknown_destination"), 1.0);
    assert_eq!(sent("10.0.0.2", "delivered"), 0.0);
    let n2l = [("node", "10.0.0.2")];
    assert_eq!(after.get("ftss_node_queued_packets", &n2l), 3.0);
    assert_eq!(after.get("ftss_node_queued_bytes", &n2l), 300.0);
    assert!(after.get("ftss_node_oldest_unacked_seconds", &n2l) >= 0.0);
    assert!(after.get("ftss_node_quota_used_ratio", &n2l) > 0.0);
    assert_eq!(
        after.get("ftss_node_queued_packets", &[("node", "10.0.0.1")]),
        0.0
    );

    // The destage thread moves the written blocks to the mirrors within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(maddr);
        if s.get("ftss_cache_destage_bytes_total", &[]) >= bytes {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "destage not counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Other paths, methods and oversized requests: answered, and the daemon lives on.
    let (code, _, _) = http(maddr, b"GET /nope HTTP/1.1\r\n\r\n");
    assert_eq!(code, 404);
    let (code, _, _) = http(maddr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 405);
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "a".repeat(40)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    for _ in 0..5 {
        let (code, _, _) = http(maddr, &huge);
        assert_eq!(
            code, 431,
            "an oversized request is refused, the answer readable"
        );
    }
    // A client that sends nothing holds one slot until its timeout, not the endpoint.
    let idle = TcpStream::connect(maddr).expect("idle client");
    let again = scrape(maddr);
    assert!(again.get("ftss_lun_ops_total", &kind("write")) >= WRITES as f64);
    drop(idle);
    assert!(
        child.try_wait().expect("child status").is_none(),
        "daemon alive"
    );

    drop(n2);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // A few lines of the scrape taken during I/O, for the record.
    for l in during.lines().filter(|l| {
        l.starts_with("ftss_lun_ops_total") && l.contains("kind=\"write\"")
            || l.starts_with("ftss_lun_latency_seconds_count")
            || l.starts_with("ftss_cache_dirty_bytes")
            || l.starts_with("ftss_sessions")
    }) {
        eprintln!("{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_bounded_and_timed_out() {
    let d = ftss_test_support::daemon_with("metrics-idle", "metrics = \"127.0.0.1:0\"").await;
    let addr = d
        .server
        .as_ref()
        .and_then(|s| s.metrics_addr())
        .expect("endpoint on");
    assert_ne!(addr.port(), 0, "the bound port is reported");
    let (code, head, body) =
        tokio::task::spawn_blocking(move || http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
            .await
            .expect("thread");
    assert_eq!(code, 200, "{head}");
    assert!(body.is_empty(), "HEAD has no body");
    tokio::task::spawn_blocking(move || {
        // Every slot taken by a client that sends nothing...
        let idle: Vec<TcpStream> = (0..ftss_target::metrics::CONNECTIONS_MAX)
            .map(|_| TcpStream::connect(addr).expect("idle client"))
            .collect();
        // ...so one more is closed unanswered, once the server has taken them all in: a
        // loaded machine may accept them later than they connected, and an extra that
        // still found a slot is answered, so ask again (well within the idle ones' timeout,
        // which would free their slots).
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let refused = loop {
            let mut extra = TcpStream::connect(addr).expect("connect");
            extra
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
            let mut got = Vec::new();
            let _ = extra.read_to_end(&mut got);
            if got.is_empty() {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(refused, "no answer past the bound");
        // ...and the idle ones are dropped after the request timeout.
        let started = std::time::Instant::now();
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut buf = [0u8; 16];
            assert_eq!(s.read(&mut buf).expect("closed, not timed out"), 0);
        }
        assert!(
            started.elapsed() < ftss_target::metrics::REQUEST_TIMEOUT + Duration::from_secs(2),
            "closed at the request timeout"
        );
        let s = scrape(addr);
        assert!(s.text.contains("ftss_lun_ops_total"));
    })
    .await
    .expect("client thread");
}

#[tokio::test]
async fn without_the_key_there_is_no_endpoint_and_a_bad_address_names_it() {
    let d = ftss_test_support::daemon("metrics-off").await;
    assert_eq!(
        d.server.as_ref().and_then(|s| s.metrics_addr()),
        None,
        "no listener when server.metrics is unset"
    );
    let bad = format!(
        "[server]\nportals = [\"127.0.0.1:0\"]\nmetrics = \"localhost\"\n[[target]]\niqn = \"{TARGET}\"\n"
    );
    let e = Config::parse(&bad).expect_err("refused").to_string();
    assert!(e.starts_with("server.metrics:"), "{e}");
}

/// A TUN interface name of this test process; deleted (if the daemon left it) on drop,
/// so a failed assertion does not leave it behind. Only this name is ever touched.
struct OwnLink(String);

impl Drop for OwnLink {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.0).exists() {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", "dev", &self.0])
                .status();
        }
    }
}

/// The daemon of a test, stopped on drop, so a failed assertion does not leave it
/// running with its interface.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Scrapes until `ok` holds for the scrape or `within` passes; the last scrape.
fn scrape_until(addr: SocketAddr, within: Duration, ok: &dyn Fn(&Scrape) -> bool) -> Scrape {
    let deadline = std::time::Instant::now() + within;
    loop {
        let s = scrape(addr);
        if ok(&s) || std::time::Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_interface_shows_its_health_role_counters_and_backlog() {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: creating a TUN interface needs root");
        return;
    }
    let name = format!("ftsst{}", std::process::id());
    let link = OwnLink(name.clone());
    let dir = ftss_test_support::temp_dir("metrics-ext");
    let (port, mport) = (free_port(), free_port());
    let cfg = write_config(&dir, port, mport);
    // No address (no route is added to the host) and no probe; a probe interval far
    // longer than the test, so only rtnetlink can tell the link went down in time.
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str(&format!(
        "[packets.external]\nbacklog_age_ms_max = 60000\n[[packets.external.interface]]\nname = \"{name}\"\npriority = 10\nprobe_interval_ms = 60000\n"
    ));
    std::fs::write(&cfg, text).expect("config");
    // Declared after `link`: dropped before it, so the interface goes with the daemon.
    let child = Running(start_binary(env!("CARGO_BIN_EXE_ftss-target"), &cfg, port));
    let maddr = SocketAddr::from(([127, 0, 0, 1], mport));
    wait_for(maddr);
    let ifl = [("interface", name.as_str())];
    let up = |s: &Scrape| s.get("ftss_external_interface_up", &ifl);
    let active = |s: &Scrape| s.get("ftss_external_interface_active", &ifl);

    let s = scrape_until(maddr, Duration::from_secs(5), &|s| active(s) == 1.0);
    assert_eq!((up(&s), active(&s)), (1.0, 1.0), "{}", s.text);
    assert_eq!(s.get("ftss_external_backlog_packets", &[]), 0.0);
    for r in ["dest_unknown", "write_failed", "backlog_full"] {
        assert_eq!(
            s.get(
                "ftss_external_interface_dropped_total",
                &[ifl[0], ("reason", r)]
            ),
            0.0,
            "every reason is there before its first drop"
        );
    }

    // A packet for the outside leaves through the interface.
    let n1 = login(port, &init(1)).await;
    let outside = Ipv4Addr::new(198, 51, 100, 77);
    let packet =
        ftss_target::routing::netif::echo_request(Ipv4Addr::new(10, 0, 0, 1), outside, 1, 1);
    assert!(send(&n1, NodeAddr::from(outside), 1, &packet)
        .await
        .is_some());
    let out = [ifl[0], ("direction", "out")];
    let s = scrape_until(maddr, Duration::from_secs(5), &|s| {
        s.get("ftss_external_interface_packets_total", &out) >= 1.0
    });
    assert_eq!(s.get("ftss_external_interface_packets_total", &out), 1.0);
    assert_eq!(
        s.get("ftss_external_interface_bytes_total", &out),
        packet.len() as f64
    );
    assert_eq!(
        s.get(
            "ftss_external_interface_packets_total",
            &[ifl[0], ("direction", "in")]
        ),
        0.0
    );

    // The link goes down: the next probe is a minute away, so only the rtnetlink event
    // can fail the path this soon.
    let downed = std::time::Instant::now();
    let st = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "down"])
        .status()
        .expect("ip link set down");
    assert!(st.success());
    let s = scrape_until(maddr, Duration::from_secs(3), &|s| up(s) == 0.0);
    assert_eq!((up(&s), active(&s)), (0.0, 0.0), "{}", s.text);
    eprintln!("path down {:?} after the link", downed.elapsed());
    assert!(s.get("ftss_external_interface_switches_total", &[]) >= 2.0);

    // With no path, a packet waits in the backlog.
    assert!(send(&n1, NodeAddr::from(outside), 2, &packet)
        .await
        .is_some());
    let s = scrape_until(maddr, Duration::from_secs(5), &|s| {
        s.get("ftss_external_backlog_packets", &[]) >= 1.0
    });
    assert_eq!(s.get("ftss_external_backlog_packets", &[]), 1.0);
    assert_eq!(
        s.get("ftss_external_backlog_bytes", &[]),
        packet.len() as f64
    );

    // Up again: healthy at once (after a known failure, carrying traffic only after the
    // hold-down).
    let st = std::process::Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status()
        .expect("ip link set up");
    assert!(st.success());
    let s = scrape_until(maddr, Duration::from_secs(3), &|s| up(s) == 1.0);
    assert_eq!(up(&s), 1.0, "{}", s.text);

    drop(n1);
    drop(child);
    drop(link);
    let _ = std::fs::remove_dir_all(&dir);
}

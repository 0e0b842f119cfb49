//! Running under a service manager, through the real binary: readiness only once the
//! portal listens, watchdog pings while up, a SIGTERM that finishes the commands and
//! destages the write cache before exit 0, and JSON log lines. A bound datagram socket
//! stands in for systemd's notification socket.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_test_support::{free_port, temp_dir, write10};

const TARGET: &str = "iqn.2026-12.org.ftss:service";

/// The embedded default's media (mirrored LUN behind the nonvolatile cache), smaller.
fn write_config(dir: &Path, port: u16) -> PathBuf {
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:{port}"]
data_dir = "{}"
shutdown_timeout_s = 30
[media]
cache_size = "128MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
mirrors = ["lun0-a.mirror", "lun0-b.mirror"]
size = "256MiB"
block_size = 512
"#,
        dir.display()
    );
    let path = dir.join("ftss.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn spawn(config: &Path, envs: &[(&str, &str)], args: &[&str], log: &Path) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftss-target"));
    c.arg("--config").arg(config).args(args);
    c.env("RUST_LOG", "info");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start ftss-target")
}

fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ftss-target did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(r, 0, "kill SIGTERM");
}

fn wait_portal(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ready_once_the_portal_listens_watchdog_while_up_stopping_then_exit_0() {
    let dir = temp_dir("service-notify");
    let port = free_port();
    let config = write_config(&dir, port);
    let sock_path = dir.join("notify");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut child = spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", &sock_path.to_string_lossy()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &[],
        &dir.join("daemon.log"),
    );
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a first notification");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    // READY=1 promises a listening portal: connect at once, no retry.
    let connected = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "first notification {first:?}"
    );
    assert!(connected.is_ok(), "READY=1 came before the portal listened");
    assert!(
        first.contains(&format!("STATUS=serving on 127.0.0.1:{port}")),
        "{first:?}"
    );
    // WATCHDOG_USEC = 200 ms: a ping every 100 ms.
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if let Ok(n) = sock.recv(&mut buf) {
            pings += usize::from(&buf[..n] == b"WATCHDOG=1");
        }
    }
    assert!(pings >= 5, "{pings} watchdog pings in 1 s, want about 10");
    sigterm(&child);
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut stopping = false;
    while !stopping {
        let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        stopping = String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1");
    }
    let status = wait_exit(&mut child, Duration::from_secs(40));
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn pattern(lba: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lba as usize * 131 + i * 7 + i / 512) as u8)
        .collect()
}

#[test]
fn sigterm_finishes_the_commands_and_leaves_nothing_in_the_write_cache() {
    let dir = temp_dir("service-stop");
    let port = free_port();
    let config = write_config(&dir, port);
    let log = dir.join("daemon.log");
    let mut child = spawn(&config, &[], &[], &log);
    wait_portal(port);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // 64 MiB in 1 MiB WRITEs, 8 at a time: more than the destager moves in the moment
    // between the last GOOD and the SIGTERM.
    const CHUNK_BLOCKS: u16 = 2048;
    const CHUNKS: u32 = 64;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let s = Arc::new(
            Session::connect(
                addr,
                SessionConfig::new("iqn.2026-12.org.ftss:service-writer", Some(TARGET)),
            )
            .await
            .expect("login"),
        );
        let mut tasks = Vec::new();
        for w in 0..8u32 {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                for c in (w..CHUNKS).step_by(8) {
                    let lba = c * u32::from(CHUNK_BLOCKS);
                    let data = Bytes::from(pattern(lba, usize::from(CHUNK_BLOCKS) * 512));
                    let mut r = s
                        .execute(0, &write10(lba, CHUNK_BLOCKS), Some(data.clone()), 0)
                        .await
                        .expect("WRITE");
                    // Each new nexus first hears POWER ON OCCURRED once.
                    if r.sense.as_ref().is_some_and(|k| k.key == 6) {
                        r = s
                            .execute(0, &write10(lba, CHUNK_BLOCKS), Some(data), 0)
                            .await
                            .expect("WRITE");
                    }
                    assert_eq!(r.status, 0, "WRITE at {lba}: {:?}", r.sense);
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(70));
    assert!(status.success(), "exit status {status:?}");
    let mut text = String::new();
    std::fs::File::open(&log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("log");
    assert!(
        text.contains("shut down: commands finished, write cache destaged"),
        "{text}"
    );

    // Started again, the daemon finds nothing to recover, and every block is there.
    let mut child = spawn(&config, &[], &[], &dir.join("daemon2.log"));
    wait_portal(port);
    // The admin socket is bound just after the portals: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match ftss_target::admin::request(&dir.join("ftss-admin.sock"), "status") {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("admin status: {e}"),
        }
    };
    let recovered = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("recovered_records="))
        .expect("recovered_records in status");
    assert_eq!(
        recovered, "0",
        "the write cache still held records at exit: {status}"
    );
    rt.block_on(async {
        let s = Session::connect(
            addr,
            SessionConfig::new("iqn.2026-12.org.ftss:service-reader", Some(TARGET)),
        )
        .await
        .expect("login");
        for c in 0..CHUNKS {
            let lba = c * u32::from(CHUNK_BLOCKS);
            let mut r = s
                .execute(
                    0,
                    &ftss_test_support::read10(lba, CHUNK_BLOCKS),
                    None,
                    u32::from(CHUNK_BLOCKS) * 512,
                )
                .await
                .expect("READ");
            if r.sense.as_ref().is_some_and(|k| k.key == 6) {
                r = s
                    .execute(
                        0,
                        &ftss_test_support::read10(lba, CHUNK_BLOCKS),
                        None,
                        u32::from(CHUNK_BLOCKS) * 512,
                    )
                    .await
                    .expect("READ");
            }
            assert_eq!(r.status, 0, "READ at {lba}: {:?}", r.sense);
            assert!(
                r.data_in[..] == pattern(lba, usize::from(CHUNK_BLOCKS) * 512)[..],
                "data at {lba} differs"
            );
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = temp_dir("service-json");
    let port = free_port();
    let config = write_config(&dir, port);
    let log = dir.join("daemon.log");
    let mut child = spawn(&config, &[], &["--log-format", "json"], &log);
    wait_portal(port);
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(40));
    assert!(status.success(), "exit status {status:?}");
    let text = std::fs::read_to_string(&log).expect("log");
    let mut listening = false;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object: {line:?}: {e}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        listening |= v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m == format!("listening on 127.0.0.1:{port}"));
    }
    assert!(listening, "no 'listening on' line in {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

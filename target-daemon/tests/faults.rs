//! Mirror faults while I/O runs over iSCSI: flipped bytes, a truncated mirror, a mirror
//! returning EIO, and a deleted mirror file (noticed at the next start). Throughout, every
//! read an initiator gets is checked against what it last wrote; afterwards the admin
//! interface rebuilds the failed mirror and a scrub finds 0 mismatches.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_target::admin;
use ftss_target::config::Config;
use ftss_target::startup::Server;

const TARGET: &str = "iqn.2026-11.org.ftss:faults";
const BS: u32 = 512;
/// 16 MiB of 512-byte blocks, written 4 KiB at a time.
const BLOCKS: u64 = 32768;
const IO_BLOCKS: u64 = 8;

fn config(dir: &Path) -> Config {
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
[media]
cache_size = "4MiB"
rebuild_rate = "256MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
mirrors = ["a.mirror", "b.mirror"]
size = "16MiB"
"#,
        dir.display()
    );
    Config::parse(&text).expect("config")
}

fn content(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; (IO_BLOCKS * u64::from(BS)) as usize];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(
            &(lba.rotate_left(20) ^ version.rotate_left(40) ^ i as u64).to_le_bytes(),
        );
    }
    b
}

/// Writers and checkers at queue depth 8 until `stop`; every read must match the last
/// acknowledged write of its extent (extents are owned by one task, so no races).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    ios: Arc<AtomicU64>,
    written: Arc<Mutex<HashMap<u64, u64>>>,
}

async fn start_load(addr: std::net::SocketAddr, prior: &HashMap<u64, u64>) -> Load {
    let s = Arc::new(
        Session::connect(
            addr,
            SessionConfig::new("iqn.2026-11.org.ftss:faults-init", Some(TARGET)),
        )
        .await
        .expect("login"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ios = Arc::new(AtomicU64::new(0));
    let written = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (s, stop, ios, written) = (
            Arc::clone(&s),
            Arc::clone(&stop),
            Arc::clone(&ios),
            Arc::clone(&written),
        );
        let extents = BLOCKS / IO_BLOCKS / 8;
        let span = t * extents * IO_BLOCKS..(t + 1) * extents * IO_BLOCKS;
        let mut mine: HashMap<u64, u64> = prior
            .iter()
            .filter(|(l, _)| span.contains(l))
            .map(|(&l, &v)| (l, v))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut x = t * 7919 + 1;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let lba = (t * extents + x % extents) * IO_BLOCKS;
                if x % 3 == 0 {
                    if let Some(&v) = mine.get(&lba) {
                        let got = s
                            .read16(0, lba, IO_BLOCKS as u32, BS)
                            .await
                            .map_err(|e| format!("read {lba}: {e}"))?;
                        if got[..] != content(lba, v)[..] {
                            return Err(format!("lba {lba}: read does not match version {v}"));
                        }
                    }
                } else {
                    let v = mine.get(&lba).map_or(1, |v| v + 1);
                    s.write16(0, lba, Bytes::from(content(lba, v)), BS)
                        .await
                        .map_err(|e| format!("write {lba}: {e}"))?;
                    mine.insert(lba, v);
                }
                ios.fetch_add(1, Ordering::Relaxed);
            }
            written.lock().expect("map").extend(mine);
            Ok(())
        }));
    }
    Load {
        stop,
        tasks,
        ios,
        written,
    }
}

impl Load {
    async fn finish(self) -> (u64, HashMap<u64, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await
                .expect("task")
                .expect("every I/O succeeds and reads back right");
        }
        let w = self.written.lock().expect("map").clone();
        (self.ios.load(Ordering::Relaxed), w)
    }
}

async fn verify_all(addr: std::net::SocketAddr, written: &HashMap<u64, u64>) {
    let s = Session::connect(
        addr,
        SessionConfig::new("iqn.2026-11.org.ftss:faults-check", Some(TARGET)),
    )
    .await
    .expect("login");
    for (&lba, &v) in written {
        let got = s.read16(0, lba, IO_BLOCKS as u32, BS).await.expect("read");
        assert!(got[..] == content(lba, v)[..], "lba {lba}: not version {v}");
    }
    let _ = s.logout().await;
}

fn ask(server: &Server, line: &str) -> String {
    let a = admin::request(server.admin_path(), line).expect("admin socket");
    assert!(a.starts_with("ok"), "{line}: {a}");
    a
}

async fn rebuild_and_wait(server: &Server, mirror: usize) {
    let vol = format!("{TARGET}/0");
    ask(server, &format!("rebuild {vol} {mirror}"));
    for _ in 0..600 {
        let st = ask(server, "status");
        let line = st
            .lines()
            .find(|l| l.starts_with(&format!("mirror {vol} {mirror} ")))
            .expect("mirror in status")
            .to_owned();
        if line.contains(" healthy ") {
            return;
        }
        assert!(!line.contains("failed"), "rebuild failed: {line}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rebuild did not finish");
}

fn scrub(server: &Server) -> (u64, u64) {
    let a = ask(server, &format!("scrub {TARGET}/0"));
    let num = |k: &str| -> u64 {
        a.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .expect("scrub field")
    };
    (num("mismatches="), num("repaired="))
}

fn mirror_state(server: &Server, mirror: usize) -> String {
    let st = ask(server, "status");
    st.lines()
        .find(|l| l.starts_with(&format!("mirror {TARGET}/0 {mirror} ")))
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Flips one byte in each of `n` written extents of a mirror file, past its header.
fn flip_bytes(path: &PathBuf, written: &HashMap<u64, u64>, n: usize) -> usize {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("mirror file");
    let mut flipped = 0;
    for &lba in written.keys().take(n) {
        let off = 4096 + lba * u64::from(BS) + 100;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).expect("read");
        f.write_all_at(&[b[0] ^ 0x5a], off).expect("write");
        flipped += 1;
    }
    f.sync_all().expect("sync");
    flipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_faults_while_io_runs_then_rebuild_and_a_clean_scrub() {
    let dir = ftss_test_support::temp_dir("faults");
    let a = dir.join("a.mirror");
    let b = dir.join("b.mirror");
    let server = Server::start(config(&dir)).await.expect("daemon");
    let addr = server.local_addrs()[0];
    let vol = Arc::clone(&server.media().volumes[0].1);

    // 1. Flipped bytes on mirror a while I/O runs: reads stay right, copies get repaired.
    let load = start_load(addr, &HashMap::new()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut ios, written) = load.finish().await;
    // Destage first, so the damage lands under blocks the mirrors really hold.
    assert!(
        server
            .media()
            .cache
            .as_ref()
            .expect("cache")
            .drain(Duration::from_secs(20)),
        "destage drains"
    );
    let flipped = flip_bytes(&a, &written, 64);
    verify_all(addr, &written).await;
    let on_read = vol.repairs();
    println!("flips: {flipped} flipped, {on_read} found and repaired by reads");
    assert_eq!(
        on_read, flipped as u64,
        "every flipped copy was detected and repaired"
    );
    assert_eq!(scrub(&server), (0, 0), "clean after repair");
    // Again with writers and readers running over the damage; what reads do not meet,
    // the scrub finds (or a rewrite replaced).
    let load = start_load(addr, &written).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flipped2 = flip_bytes(&a, &written, 64);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (n, written) = load.finish().await;
    ios += n;
    verify_all(addr, &written).await;
    let (found, repaired) = scrub(&server);
    assert_eq!(found, repaired, "the scrub repairs what it finds");
    println!(
        "flips under load: {flipped2} flipped, {} repaired by reads, {found} by the scrub",
        vol.repairs() - on_read - repaired
    );
    assert_eq!(scrub(&server), (0, 0), "clean after repair");

    // 2. Mirror b returns EIO while I/O runs: it fails, service continues.
    let load = start_load(addr, &written).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    vol.inject_eio(1, true);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (n, written) = load.finish().await;
    ios += n;
    let state = mirror_state(&server, 1);
    assert!(state.contains("failed"), "{state}");
    verify_all(addr, &written).await;
    // The rebuild clears the injected fault (a replaced disk) while writers run.
    let load = start_load(addr, &written).await;
    rebuild_and_wait(&server, 1).await;
    let (n, written) = load.finish().await;
    ios += n;
    verify_all(addr, &written).await;
    assert_eq!(scrub(&server), (0, 0), "two good copies after the rebuild");

    // 3. Mirror b truncated under the daemon while I/O runs: reads stay right (served by
    //    a, checked); the scrub notices the short file and fails b; a rebuild restores it.
    let load = start_load(addr, &written).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .expect("b")
        .set_len(8192)
        .expect("truncate");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (n, written) = load.finish().await;
    ios += n;
    verify_all(addr, &written).await;
    scrub(&server);
    let state = mirror_state(&server, 1);
    assert!(
        state.contains("failed"),
        "the truncated mirror is out of service: {state}"
    );
    rebuild_and_wait(&server, 1).await;
    verify_all(addr, &written).await;
    assert_eq!(scrub(&server), (0, 0), "clean after rebuilding");

    // 4. Mirror a deleted: noticed at the next start, rebuilt online under load.
    std::fs::remove_file(&a).expect("delete a");
    drop(vol);
    server.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = Server::start(config(&dir)).await.expect("restart");
    let addr = server.local_addrs()[0];
    let state = mirror_state(&server, 0);
    assert!(
        state.contains("failed"),
        "a new empty mirror needs a rebuild: {state}"
    );
    verify_all(addr, &written).await;
    let load = start_load(addr, &written).await;
    rebuild_and_wait(&server, 0).await;
    let (n, written) = load.finish().await;
    ios += n;
    verify_all(addr, &written).await;
    assert_eq!(
        scrub(&server),
        (0, 0),
        "clean after the rebuild of a deleted mirror"
    );
    println!(
        "faults: {} I/Os checked across flips, EIO, truncation, deletion; 0 wrong reads",
        ios
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

//! READs of a cached LUN through a real iSCSI session: those of at most 128 KiB run on
//! the connection's async worker when their data is in memory (the write cache's ring,
//! or the mirrors' pages in the page cache), which `ftss_lun_inline_served_total` counts,
//! and run again on a blocking thread when it is not (`ftss_lun_inline_refused_total`).
//! Either way they return what the blocking path returns (a READ larger than 128 KiB
//! never runs inline), after writes, overwrites and UNMAPs, before and after destage;
//! and a refusal leaves no trace: each READ is counted once, the mirrors stay healthy,
//! nothing is repaired.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_target::media::mirror::MirrorState;
use ftss_test_support::{temp_dir, Daemon, TARGET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BS: usize = 512;
/// Blocks the test writes and reads (2 MiB of the 8 MiB LUN).
const BLOCKS: usize = 4096;
/// Blocks per READ that may run inline: 32 KiB.
const CHUNK: usize = 64;
const MIRRORS: [&str; 2] = ["inline-a.mirror", "inline-b.mirror"];

fn config(dir: &Path) -> String {
    format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
nop_interval_s = 60
metrics = "127.0.0.1:0"
[media]
cache_size = "8MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
mirrors = ["{}", "{}"]
size = "8MiB"
"#,
        dir.display(),
        MIRRORS[0],
        MIRRORS[1]
    )
}

/// The counters of LUN 0 for `kind`, from one scrape: (ops, inline served, inline refused).
async fn counters(metrics: SocketAddr, kind: &str) -> (u64, u64, u64) {
    let mut s = tokio::net::TcpStream::connect(metrics)
        .await
        .expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("answer");
    let values: HashMap<&str, u64> = text
        .lines()
        .filter(|l| l.contains("lun=\"0\"") && l.contains(&format!("kind=\"{kind}\"")))
        .filter_map(|l| {
            let metric = l.split('{').next()?;
            let v = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((metric, v as u64))
        })
        .collect();
    let get = |n: &str| {
        *values
            .get(n)
            .unwrap_or_else(|| panic!("{n} not in:\n{text}"))
    };
    (
        get("ftss_lun_ops_total"),
        get("ftss_lun_inline_served_total"),
        get("ftss_lun_inline_refused_total"),
    )
}

fn cdb16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

async fn write(s: &Session, model: &mut [u8], lba: usize, data: Vec<u8>) {
    let r = s
        .execute(
            0,
            &cdb16(0x8a, lba as u64, (data.len() / BS) as u32),
            Some(Bytes::from(data.clone())),
            0,
        )
        .await
        .expect("WRITE (16)");
    assert_eq!(r.status, 0, "WRITE: {:?}", r.sense);
    model[lba * BS..lba * BS + data.len()].copy_from_slice(&data);
}

async fn unmap(s: &Session, model: &mut [u8], lba: usize, blocks: usize) {
    let mut p = vec![0u8; 24];
    p[0..2].copy_from_slice(&22u16.to_be_bytes());
    p[2..4].copy_from_slice(&16u16.to_be_bytes());
    p[8..16].copy_from_slice(&(lba as u64).to_be_bytes());
    p[16..20].copy_from_slice(&(blocks as u32).to_be_bytes());
    let mut cdb = [0u8; 10];
    cdb[0] = 0x42;
    cdb[7..9].copy_from_slice(&24u16.to_be_bytes());
    let r = s
        .execute(0, &cdb, Some(Bytes::from(p)), 0)
        .await
        .expect("UNMAP");
    assert_eq!(r.status, 0, "UNMAP: {:?}", r.sense);
    model[lba * BS..(lba + blocks) * BS].fill(0);
}

async fn read(s: &Session, lba: usize, blocks: usize) -> Vec<u8> {
    let r = s
        .execute(
            0,
            &cdb16(0x88, lba as u64, blocks as u32),
            None,
            (blocks * BS) as u32,
        )
        .await
        .expect("READ (16)");
    assert_eq!(r.status, 0, "READ: {:?}", r.sense);
    r.data_in.to_vec()
}

/// Every block as READs that may run inline, each compared with the model; returns how
/// many READs that was.
async fn read_inline_sized(s: &Session, model: &[u8]) -> u64 {
    let mut n = 0;
    for lba in (0..BLOCKS).step_by(CHUNK) {
        let got = read(s, lba, CHUNK).await;
        assert!(
            got == model[lba * BS..(lba + CHUNK) * BS],
            "blocks {lba}..{} differ from what was written",
            lba + CHUNK
        );
        n += 1;
    }
    n
}

/// Every block in one READ too large to run inline: the blocking path.
async fn read_blocking(s: &Session, model: &[u8]) {
    let got = read(s, 0, BLOCKS).await;
    assert!(got == model, "the blocking path reads what was written");
}

fn data(tag: u32, blocks: usize) -> Vec<u8> {
    (0..blocks * BS)
        .map(|i| (tag.wrapping_mul(2_654_435_761) ^ i as u32).to_le_bytes()[0] | 1)
        .collect()
}

fn drop_cached_pages(path: &Path) {
    let f = std::fs::File::open(path).expect("open mirror");
    f.sync_data().expect("fdatasync");
    // SAFETY: posix_fadvise only reads its integer arguments; `f` is open for the call.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

fn mirrors_untouched(d: &Daemon) {
    for (name, set) in &d.server().media().volumes {
        assert!(
            set.status().iter().all(|m| m.state == MirrorState::Healthy),
            "{name}: {:?}",
            set.status()
        );
        assert_eq!(set.repairs() + set.repair_failures(), 0, "{name}: repaired");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_inline_from_memory_and_again_blocking_otherwise_with_the_same_data() {
    let dir = temp_dir("inline-reads");
    let d = Daemon::start(dir.clone(), &config(&dir)).await;
    let metrics = d.server().metrics_addr().expect("metrics endpoint");
    let cache = d.server().media().cache.clone().expect("write cache");
    let s = Session::connect(
        d.addr,
        SessionConfig::new("iqn.2026-11.org.ftss:inline", Some(TARGET)),
    )
    .await
    .expect("login");
    let _ = s.execute(0, &[0u8; 6], None, 0).await.expect("TUR");

    // Writes of many sizes, overwrites across their edges, UNMAPs across both.
    let mut model = vec![0u8; BLOCKS * BS];
    let mut lba = 0;
    let mut tag = 1;
    while lba < BLOCKS {
        let n = (1 + (tag as usize * 37) % 200).min(BLOCKS - lba);
        write(&s, &mut model, lba, data(tag, n)).await;
        lba += n;
        tag += 1;
    }
    for (at, n) in [(3usize, 5usize), (60, 9), (127, 2), (1000, 300), (4090, 6)] {
        write(&s, &mut model, at, data(tag, n)).await;
        tag += 1;
    }
    for (at, n) in [(10usize, 70usize), (500, 1), (2047, 130), (4000, 96)] {
        unmap(&s, &mut model, at, n).await;
    }
    write(&s, &mut model, 40, data(tag, 8)).await;

    // From the ring (or, for what destage took meanwhile, freshly written mirror pages):
    // every inline-sized READ is served inline.
    let (ops0, served0, refused0) = counters(metrics, "read").await;
    let reads = read_inline_sized(&s, &model).await;
    read_blocking(&s, &model).await;
    let (ops1, served1, refused1) = counters(metrics, "read").await;
    assert_eq!(ops1 - ops0, reads + 1, "each READ counted once");
    assert_eq!(served1 - served0, reads, "all served inline");
    assert_eq!(refused1, refused0);

    // Destaged: now from the mirrors, whose pages are in the page cache.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache.stats().dirty_bytes > 0 {
        assert!(Instant::now() < deadline, "destage did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reads = read_inline_sized(&s, &model).await;
    read_blocking(&s, &model).await;
    let (ops2, served2, refused2) = counters(metrics, "read").await;
    assert_eq!(ops2 - ops1, reads + 1);
    assert_eq!(
        served2 - served1,
        reads,
        "page cache hits are served inline"
    );
    assert_eq!(refused2, refused1);

    // Pages dropped: a READ is refused inline and served blocking, with the same data.
    // (Now and then the kernel completes the read inside RWF_NOWAIT on this VM, see
    // media::disk::tries_until_refused: try until one is refused.)
    let paths: Vec<_> = MIRRORS.iter().map(|m| dir.join(m)).collect();
    let started = Instant::now();
    let mut issued = 0;
    loop {
        for p in &paths {
            drop_cached_pages(p);
        }
        issued += read_inline_sized(&s, &model).await;
        let (_, _, refused) = counters(metrics, "read").await;
        if refused > refused2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no READ of dropped pages was refused inline"
        );
    }
    read_blocking(&s, &model).await;
    let (ops3, served3, refused3) = counters(metrics, "read").await;
    assert_eq!(ops3 - ops2, issued + 1, "a refused READ is counted once");
    assert_eq!(
        (served3 - served2) + (refused3 - refused2),
        issued,
        "every inline-sized READ was tried inline"
    );
    mirrors_untouched(&d);

    // Writes after destage land in the ring again: read inline, mixed with mirror blocks.
    write(&s, &mut model, 70, data(tag, 3)).await;
    unmap(&s, &mut model, 200, 20).await;
    read_inline_sized(&s, &model).await;
    read_blocking(&s, &model).await;
    mirrors_untouched(&d);
    s.logout().await.expect("logout");
}

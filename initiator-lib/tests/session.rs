//! The initiator against an in-process ftss target on a loopback port.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ftss_initiator::{ChapCredentials, Digest, Error, MutualChap, Session, SessionConfig};
use ftss_test_support::{temp_dir, Daemon};

const TARGET: &str = "iqn.2026-11.org.ftss:itest";
const INITIATOR: &str = "iqn.2026-11.org.ftss:initiator";
const LUN_BYTES: u64 = 64 << 20;

/// `server_extra` goes into `[server]`, `target_extra` after the `[[target]]` header.
async fn daemon(tag: &str, server_extra: &str, target_extra: &str) -> Daemon {
    let dir = temp_dir(tag);
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
{server_extra}
[[target]]
iqn = "{TARGET}"
{target_extra}
[[target.lun]]
lun = 0
path = "lun0.img"
size = "{LUN_BYTES}"
"#,
        dir.display()
    );
    Daemon::start(dir, &text).await
}

fn config() -> SessionConfig {
    SessionConfig::new(INITIATOR, Some(TARGET))
}

const CHAP_TARGET: &str = r#"
[target.chap]
username = "alice"
secret = "alice-secret-123"
mutual_username = "ftss-target"
mutual_secret = "target-secret-456"
"#;

fn chap(secret: &str, mutual: Option<(&str, &str)>) -> ChapCredentials {
    ChapCredentials {
        username: "alice".into(),
        secret: secret.as_bytes().to_vec(),
        mutual: mutual.map(|(n, s)| MutualChap {
            target_username: n.into(),
            secret: s.as_bytes().to_vec(),
        }),
    }
}

/// A block pattern that differs per block and per run, so misplaced data shows.
fn pattern(lba: u64, len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (lba as usize * 31 + i * 7 + usize::from(seed)) as u8)
            .collect::<Vec<_>>(),
    )
}

/// `count` concurrent writes of `size` bytes at disjoint places, then `count`
/// concurrent reads checking every byte.
async fn write_read_concurrently(s: &Arc<Session>, size: usize, count: u64, seed: u8) {
    let cap = s.read_capacity16(0).await.expect("read capacity");
    let bs = cap.block_size;
    let blocks = (size / bs as usize) as u64;
    assert!(count * blocks <= cap.blocks, "LUN big enough for the test");
    let mut tasks = Vec::new();
    for i in 0..count {
        let s = Arc::clone(s);
        tasks.push(tokio::spawn(async move {
            let lba = i * blocks;
            s.write16(0, lba, pattern(lba, size, seed), bs).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("write");
    }
    s.synchronize_cache(0).await.expect("sync");
    let mut tasks = Vec::new();
    for i in 0..count {
        let s = Arc::clone(s);
        tasks.push(tokio::spawn(async move {
            let lba = i * blocks;
            let d = s.read16(0, lba, blocks as u32, bs).await?;
            Ok::<_, Error>((lba, d))
        }));
    }
    for t in tasks {
        let (lba, d) = t.await.expect("task").expect("read");
        assert!(d == pattern(lba, size, seed), "data read back at LBA {lba}");
    }
}

#[tokio::test]
async fn discovery_lists_the_target() {
    let d = daemon("disc", "", "").await;
    let s = Session::connect(d.addr, SessionConfig::new(INITIATOR, None))
        .await
        .expect("discovery login");
    let targets = s.send_targets().await.expect("SendTargets");
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0].0, TARGET);
    // Addresses are "host:port,tpgt", with the port the daemon bound (the config says 0).
    assert_eq!(targets[0].1, vec![format!("{},1", d.addr)]);
    s.logout().await.expect("logout");
    assert!(s.is_closed());
}

#[tokio::test]
async fn login_inquiry_and_capacity() {
    let d = daemon("inq", "", "").await;
    let s = Session::connect(d.addr, config()).await.expect("login");
    assert_ne!(s.tsih(), 0);
    let p = s.params();
    assert!(!p.header_digest && !p.data_digest);
    assert!(!p.initial_r2t && p.immediate_data);
    assert_eq!(p.max_burst_length, 1 << 20);
    assert_eq!(p.first_burst_length, 256 << 10);
    s.test_unit_ready(0).await.expect("TUR");
    let inq = s.inquiry(0).await.expect("inquiry");
    assert_eq!((inq.peripheral_qualifier, inq.device_type), (0, 0));
    assert!(!inq.vendor.is_empty());
    let pages = s.inquiry_vpd(0, 0x00).await.expect("VPD page list");
    assert!(pages[4..].contains(&0x80), "serial number page listed");
    let serial = s.inquiry_vpd(0, 0x80).await.expect("VPD serial");
    assert_eq!(serial[1], 0x80);
    let cap = s.read_capacity16(0).await.expect("read capacity");
    assert_eq!(cap.block_size, 512);
    assert_eq!(cap.blocks * 512, LUN_BYTES);
    assert_eq!(s.report_luns().await.expect("report luns"), vec![0]);
    // A LUN that does not exist comes back as CHECK CONDITION, not as an error.
    let r = s
        .execute(7, &[0, 0, 0, 0, 0, 0], None, 0)
        .await
        .expect("command completes");
    assert_eq!(r.status, ftss_initiator::scsi::CHECK_CONDITION);
    let sense = r.sense.expect("sense data");
    assert_eq!((sense.key, sense.asc), (0x5, 0x25));
    // Reads shorter than asked report an underflow residual.
    let r = s
        .execute(0, &[0x12, 0, 0, 0, 255, 0], None, 255)
        .await
        .expect("inquiry");
    assert_eq!(r.residual.underflow, r.data_in.len() < 255);
    s.logout().await.expect("logout");
    assert!(matches!(s.nop_ping().await, Err(Error::ConnectionClosed)));
}

#[tokio::test]
async fn concurrent_1mib_writes_and_reads() {
    let d = daemon("big", "", "").await;
    let s = Arc::new(Session::connect(d.addr, config()).await.expect("login"));
    write_read_concurrently(&s, 1 << 20, 32, 1).await;
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn concurrent_4k_writes_and_reads_in_a_narrow_window() {
    // Eight commands in the target's window: the other 24 must wait for MaxCmdSN.
    let d = daemon("small", "cmd_window = 8", "").await;
    let s = Arc::new(Session::connect(d.addr, config()).await.expect("login"));
    write_read_concurrently(&s, 4096, 32, 2).await;
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn unsolicited_data_out_without_immediate_data() {
    let d = daemon("unsol", "", "").await;
    let mut c = config();
    c.immediate_data = false;
    let s = Arc::new(Session::connect(d.addr, c).await.expect("login"));
    assert!(!s.params().immediate_data && !s.params().initial_r2t);
    write_read_concurrently(&s, 1 << 20, 4, 3).await;
    write_read_concurrently(&s, 4096, 4, 4).await;
}

#[tokio::test]
async fn header_and_data_digests() {
    let d = daemon("digest", "", "").await;
    let mut c = config();
    c.header_digest = Digest::Crc32c;
    c.data_digest = Digest::Crc32c;
    let s = Arc::new(Session::connect(d.addr, c).await.expect("login"));
    assert!(s.params().header_digest && s.params().data_digest);
    write_read_concurrently(&s, 1 << 20, 8, 5).await;
    s.nop_ping().await.expect("ping");
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn chap_one_way() {
    let d = daemon("chap1", "", CHAP_TARGET).await;
    let mut c = config();
    c.chap = Some(chap("alice-secret-123", None));
    let s = Session::connect(d.addr, c).await.expect("CHAP login");
    s.test_unit_ready(0).await.expect("TUR");
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn chap_mutual() {
    let d = daemon("chap2", "", CHAP_TARGET).await;
    let mut c = config();
    c.chap = Some(chap(
        "alice-secret-123",
        Some(("ftss-target", "target-secret-456")),
    ));
    let s = Session::connect(d.addr, c)
        .await
        .expect("mutual CHAP login");
    s.inquiry(0).await.expect("inquiry");
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn chap_failures_are_refused() {
    let d = daemon("chap3", "", CHAP_TARGET).await;
    // Our secret is wrong: the target refuses.
    let mut c = config();
    c.chap = Some(chap("not-the-secret!!", None));
    let e = Session::connect(d.addr, c).await.err().expect("refused");
    assert!(e.is_auth_failure(), "{e}");
    assert!(matches!(
        e,
        Error::LoginRejected {
            class: 2,
            detail: 1
        }
    ));
    // The target does not know the secret we expect of it: we refuse.
    let mut c = config();
    c.chap = Some(chap(
        "alice-secret-123",
        Some(("ftss-target", "some-other-secret")),
    ));
    let e = Session::connect(d.addr, c).await.err().expect("refused");
    assert!(matches!(e, Error::Auth(_)), "{e}");
    // No credentials for a target that requires them.
    let e = Session::connect(d.addr, config())
        .await
        .err()
        .expect("refused");
    assert!(e.is_auth_failure(), "{e}");
}

#[tokio::test]
async fn nop_ping_and_target_pings() {
    let d = daemon("nop", "nop_interval_s = 1\nnop_timeout_s = 1", "").await;
    let s = Session::connect(d.addr, config()).await.expect("login");
    s.nop_ping().await.expect("ping");
    // The target pings an idle connection every second and drops it after one second
    // without an answer; we must answer to survive.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!s.is_closed(), "connection survived the target's pings");
    s.nop_ping().await.expect("ping after idling");
    s.test_unit_ready(0).await.expect("TUR");
    s.logout().await.expect("logout");
}

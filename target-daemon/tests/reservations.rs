//! Reservations end to end: the SCSI-3 persistent reservation sequence Windows failover
//! cluster validation runs, APTPL state across a daemon restart for a plain-file LUN (a
//! state file) and a mirrored LUN (the mirror set's metadata area, surviving the loss of
//! either mirror), damaged state refusing the start, an SPC-2 reservation released when
//! its session logs out, and PREEMPT AND ABORT ending a preempted node's queued write
//! where plain PREEMPT does not.

use std::sync::Arc;

use bytes::Bytes;
use ftss_initiator::{ScsiResult, Session, SessionConfig};
use ftss_proto::pdu::{DataOut, Itt, Lun, Pdu, R2t};
use ftss_proto::sense::Sense;
use ftss_proto::serial::DataSn;
use ftss_target::config::Config;
use ftss_target::media::mirror::{MirrorSet, MirrorState};
use ftss_target::startup::Server;
use ftss_test_support::{daemon, Daemon, Raw, TARGET, TUR};

const NODE_A: &str = "iqn.2026-11.org.ftss:cluster-node-a";
const NODE_B: &str = "iqn.2026-11.org.ftss:cluster-node-b";
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const CONFLICT: u8 = 0x18;

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const PREEMPT: u8 = 4;
const PREEMPT_AND_ABORT: u8 = 5;
const REGISTER_AND_IGNORE: u8 = 6;
const TASK_ABORTED: u8 = 0x40;
const WE: u8 = 1;
const WE_RO: u8 = 5;
const EA_RO: u8 = 6;

async fn login(addr: std::net::SocketAddr, name: &str, isid: [u8; 6]) -> Session {
    let mut cfg = SessionConfig::new(name, Some(TARGET));
    cfg.isid = isid;
    let s = Session::connect(addr, cfg).await.expect("login");
    // The first command of a new nexus reports the power-on unit attention.
    let r = run(&s, &[0; 6], None, 0).await;
    assert!(r.status == GOOD || r.status == CHECK_CONDITION);
    s
}

async fn run(s: &Session, cdb: &[u8], out: Option<Vec<u8>>, len: u32) -> ScsiResult {
    run_on(s, 0, cdb, out, len).await
}

async fn run_on(s: &Session, lun: u16, cdb: &[u8], out: Option<Vec<u8>>, len: u32) -> ScsiResult {
    s.execute(lun, cdb, out.map(Bytes::from), len)
        .await
        .expect("command completes")
}

fn sense(r: &ScsiResult) -> Option<(u8, u8, u8)> {
    Sense::parse(&r.sense_data)
}

/// PERSISTENT RESERVE OUT to LUN 0; returns the status.
async fn prout(s: &Session, sa: u8, ty: u8, key: u64, sa_key: u64, aptpl: bool) -> u8 {
    prout_on(s, 0, sa, ty, key, sa_key, aptpl).await
}

/// PERSISTENT RESERVE OUT to `lun`; returns the status.
async fn prout_on(s: &Session, lun: u16, sa: u8, ty: u8, key: u64, sa_key: u64, aptpl: bool) -> u8 {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    let cdb = [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let r = run_on(s, lun, &cdb, Some(p), 0).await;
    assert!(
        r.status != CHECK_CONDITION,
        "LUN {lun} PR OUT {sa}: {:?}",
        sense(&r)
    );
    r.status
}

async fn prin(s: &Session, sa: u8) -> Vec<u8> {
    prin_on(s, 0, sa).await
}

async fn prin_on(s: &Session, lun: u16, sa: u8) -> Vec<u8> {
    let r = run_on(s, lun, &[0x5e, sa, 0, 0, 0, 0, 0, 0x10, 0, 0], None, 4096).await;
    assert_eq!(r.status, GOOD, "LUN {lun} PR IN {sa}: {:?}", sense(&r));
    r.data_in.to_vec()
}

fn keys(d: &[u8]) -> Vec<u64> {
    let n = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
    d[8..8 + n]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// (key, type) of the reservation, if any.
fn reservation(d: &[u8]) -> Option<(u64, u8)> {
    if u32::from_be_bytes([d[4], d[5], d[6], d[7]]) == 0 {
        return None;
    }
    Some((
        u64::from_be_bytes(d[8..16].try_into().expect("8 bytes")),
        d[21] & 0x0f,
    ))
}

async fn read1(s: &Session) -> u8 {
    read1_on(s, 0).await
}

async fn read1_on(s: &Session, lun: u16) -> u8 {
    run_on(s, lun, &ftss_test_support::read10(0, 1), None, 512)
        .await
        .status
}

async fn write1(s: &Session) -> u8 {
    write1_on(s, 0).await
}

async fn write1_on(s: &Session, lun: u16) -> u8 {
    run_on(
        s,
        lun,
        &ftss_test_support::write10(0, 1),
        Some(vec![0x5a; 512]),
        0,
    )
    .await
    .status
}

#[tokio::test]
async fn windows_cluster_persistent_reservation_validation() {
    let d = daemon("pr-cluster").await;
    let (ka, kb, ka2) = (
        0xa1a1_0000_0000_0001u64,
        0xb2b2_0000_0000_0002,
        0xa1a1_0000_0000_0003,
    );
    let a = login(d.addr, NODE_A, [0x40, 0, 0, 0, 0xa0, 1]).await;
    let b = login(d.addr, NODE_B, [0x40, 0, 0, 0, 0xb0, 1]).await;

    // Node A registers and reserves Write Exclusive - Registrants Only.
    assert_eq!(prout(&a, REGISTER_AND_IGNORE, 0, 0, ka, false).await, GOOD);
    assert_eq!(keys(&prin(&a, 0).await), vec![ka]);
    assert_eq!(prout(&a, RESERVE, WE_RO, ka, 0, false).await, GOOD);
    assert_eq!(reservation(&prin(&a, 1).await), Some((ka, WE_RO)));
    // An unregistered node may read but not write; registered, it may do both.
    assert_eq!(read1(&b).await, GOOD);
    assert_eq!(write1(&b).await, CONFLICT);
    assert_eq!(prout(&b, REGISTER, 0, 0, kb, false).await, GOOD);
    assert_eq!(write1(&b).await, GOOD);
    // A key mismatch conflicts.
    assert_eq!(prout(&b, RESERVE, WE_RO, ka, 0, false).await, CONFLICT);

    // READ FULL STATUS: both registrations, A the holder, TransportIDs with ISIDs.
    let fs = prin(&a, 3).await;
    let mut pos = 8;
    let mut seen = Vec::new();
    while pos < fs.len() {
        let key = u64::from_be_bytes(fs[pos..pos + 8].try_into().expect("8 bytes"));
        let holder = fs[pos + 12] & 1 != 0;
        let tlen = u32::from_be_bytes(fs[pos + 20..pos + 24].try_into().expect("4")) as usize;
        let tid = &fs[pos + 24..pos + 24 + tlen];
        assert_eq!(tid[0], 0x45, "iSCSI TransportID with ISID");
        let name = String::from_utf8_lossy(&tid[4..])
            .trim_end_matches('\0')
            .to_owned();
        seen.push((key, holder, name, fs[pos + 13] & 0x0f));
        pos += 24 + tlen;
    }
    assert_eq!(
        seen,
        vec![
            (ka, true, format!("{NODE_A},i,0x40000000a001"), WE_RO),
            (kb, false, format!("{NODE_B},i,0x40000000b001"), 0),
        ]
    );

    // Release: the other registrant hears RESERVATIONS RELEASED.
    assert_eq!(prout(&a, RELEASE, WE_RO, ka, 0, false).await, GOOD);
    let r = run(&b, &[0; 6], None, 0).await;
    assert_eq!(sense(&r), Some((0x06, 0x2a, 0x04)));

    // Exclusive Access - Registrants Only; node B preempts node A.
    assert_eq!(prout(&a, RESERVE, EA_RO, ka, 0, false).await, GOOD);
    assert_eq!(read1(&b).await, GOOD, "registrants keep access");
    assert_eq!(prout(&b, PREEMPT, EA_RO, kb, ka, false).await, GOOD);
    assert_eq!(reservation(&prin(&b, 1).await), Some((kb, EA_RO)));
    let r = run(&a, &[0; 6], None, 0).await;
    assert_eq!(
        sense(&r),
        Some((0x06, 0x2a, 0x05)),
        "REGISTRATIONS PREEMPTED"
    );
    assert_eq!(read1(&a).await, CONFLICT, "no longer registered");
    assert_eq!(keys(&prin(&a, 0).await), vec![kb]);

    // Node A comes back with a new ISID: a new I_T nexus, unregistered.
    a.logout().await.expect("logout");
    let a2 = login(d.addr, NODE_A, [0x40, 0, 0, 0, 0xa0, 2]).await;
    assert_eq!(write1(&a2).await, CONFLICT);
    assert_eq!(prout(&a2, REGISTER, 0, 0, ka2, false).await, GOOD);
    assert_eq!(prout(&a2, PREEMPT, EA_RO, ka2, kb, false).await, GOOD);
    assert_eq!(reservation(&prin(&a2, 1).await), Some((ka2, EA_RO)));
    assert_eq!(prout(&a2, RELEASE, EA_RO, ka2, 0, false).await, GOOD);
    assert_eq!(reservation(&prin(&a2, 1).await), None);
    assert_eq!(prout(&a2, REGISTER, 0, ka2, 0, false).await, GOOD);
    let rk = prin(&a2, 0).await;
    assert!(keys(&rk).is_empty());
    assert!(
        u32::from_be_bytes([rk[0], rk[1], rk[2], rk[3]]) >= 5,
        "generation"
    );
    a2.logout().await.expect("logout");
    b.logout().await.expect("logout");
}

/// LUN 0 on a plain file, LUN 1 on a mirror set behind the write cache.
fn config_text(d: &Daemon) -> String {
    format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
nop_interval_s = 60
[media]
cache_size = "4MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "16MiB"
[[target.lun]]
lun = 1
mirrors = ["lun1-a.mirror", "lun1-b.mirror"]
size = "4MiB"
"#,
        d.dir.display()
    )
}

const LUN1_BLOCKS: u64 = (4 << 20) / 512;

async fn start(d: &mut Daemon) {
    let config = Config::parse(&config_text(d)).expect("config");
    let server = Server::start(config).await.expect("daemon starts");
    d.addr = server.local_addrs()[0];
    d.server = Some(server);
}

async fn stop(d: &mut Daemon) {
    if let Some(s) = d.server.take() {
        s.shutdown().await;
    }
}

fn state_files(d: &Daemon) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(&d.dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".state"))
        .collect()
}

/// LUN 1's mirror set, as the running daemon holds it.
fn lun1_set(d: &Daemon) -> Arc<MirrorSet> {
    let server = d.server.as_ref().expect("running");
    let (_, set) = server
        .media()
        .volumes
        .iter()
        .find(|(name, _)| *name == format!("{TARGET}/1"))
        .expect("LUN 1 is mirrored");
    Arc::clone(set)
}

/// [`login`] to the two-LUN target: LUN 1's power-on unit attention is consumed too.
async fn login2(addr: std::net::SocketAddr, name: &str, isid: [u8; 6]) -> Session {
    let s = login(addr, name, isid).await;
    let r = run_on(&s, 1, &[0; 6], None, 0).await;
    assert!(r.status == GOOD || r.status == CHECK_CONDITION);
    s
}

/// Registrations and reservation of `lun` as node A sees them.
async fn pr_of(s: &Session, lun: u16) -> (Vec<u64>, Option<(u64, u8)>) {
    (
        keys(&prin_on(s, lun, 0).await),
        reservation(&prin_on(s, lun, 1).await),
    )
}

#[tokio::test]
async fn aptpl_reservation_survives_restart() {
    let mut d = Daemon {
        server: None,
        addr: ([127, 0, 0, 1], 0).into(),
        dir: ftss_test_support::temp_dir("pr-aptpl"),
    };
    start(&mut d).await;
    let isid = [0x40, 0, 0, 0, 0xa0, 9];
    let isid_b = [0x40, 0, 0, 0, 0xb0, 9];
    // One key per LUN, so a state found in the wrong place would show.
    let key = [0x1234_5678_9abc_def0u64, 0x0fed_cba9_8765_4321];
    let a = login2(d.addr, NODE_A, isid).await;
    for lun in [0, 1] {
        let k = key[lun as usize];
        assert_eq!(prout_on(&a, lun, REGISTER, 0, 0, k, true).await, GOOD);
        assert_eq!(prout_on(&a, lun, RESERVE, WE, k, 0, false).await, GOOD);
        let caps = prin_on(&a, lun, 2).await;
        assert_eq!(caps[2] & 0x01, 0x01, "LUN {lun} PTPL_C");
        assert_eq!(caps[3] & 0x01, 0x01, "LUN {lun} PTPL_A");
    }
    a.logout().await.expect("logout");
    stop(&mut d).await;

    // The plain-file LUN keeps a state file; the mirrored LUN keeps none: its state is
    // in the mirror set's metadata area.
    let state = state_files(&d);
    assert_eq!(state.len(), 1, "one state file: {state:?}");
    let name = state[0]
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    assert!(
        name.as_deref().is_some_and(|n| n.starts_with("pr-")),
        "{name:?}"
    );
    let bytes = std::fs::read(&state[0]).expect("state file");
    let has = |k: u64| bytes.windows(8).any(|w| w == k.to_be_bytes());
    assert!(has(key[0]) && !has(key[1]), "the file is LUN 0's");

    // Both come back after a restart, in force.
    start(&mut d).await;
    let a = login2(d.addr, NODE_A, isid).await;
    let b = login2(d.addr, NODE_B, isid_b).await;
    for lun in [0, 1] {
        let k = key[lun as usize];
        assert_eq!(pr_of(&a, lun).await, (vec![k], Some((k, WE))), "LUN {lun}");
        assert_eq!(write1_on(&b, lun).await, CONFLICT, "LUN {lun} reserved");
        assert_eq!(read1_on(&b, lun).await, GOOD);
    }
    a.logout().await.expect("logout");
    b.logout().await.expect("logout");
    stop(&mut d).await;

    // Lose mirror b of LUN 1: the daemon starts with an empty new b, failed until
    // rebuilt, and reads the state from the survivor a.
    let (mir_a, mir_b) = (d.dir.join("lun1-a.mirror"), d.dir.join("lun1-b.mirror"));
    std::fs::remove_file(&mir_b).expect("lose mirror b");
    start(&mut d).await;
    let set = lun1_set(&d);
    assert!(
        matches!(set.status()[1].state, MirrorState::Failed(_)),
        "{:?}",
        set.status()
    );
    let a = login2(d.addr, NODE_A, isid).await;
    let b = login2(d.addr, NODE_B, isid_b).await;
    assert_eq!(pr_of(&a, 1).await, (vec![key[1]], Some((key[1], WE))));
    assert_eq!(
        write1_on(&b, 1).await,
        CONFLICT,
        "the reservation is in force"
    );
    // Rebuild b, then lose a: b alone carries the state.
    tokio::task::spawn_blocking(move || set.rebuild(1, 0, |_, _| {}))
        .await
        .expect("rebuild task")
        .expect("rebuild");
    a.logout().await.expect("logout");
    b.logout().await.expect("logout");
    stop(&mut d).await;
    std::fs::remove_file(&mir_a).expect("lose mirror a");
    start(&mut d).await;
    let a = login2(d.addr, NODE_A, isid).await;
    let b = login2(d.addr, NODE_B, isid_b).await;
    assert_eq!(pr_of(&a, 1).await, (vec![key[1]], Some((key[1], WE))));
    assert_eq!(
        write1_on(&b, 1).await,
        CONFLICT,
        "the reservation is in force"
    );
    assert_eq!(state_files(&d), state, "still no state file for LUN 1");

    // APTPL cleared by the next REGISTER: LUN 0's file goes, LUN 1's record empties.
    for lun in [0, 1] {
        let k = key[lun as usize];
        assert_eq!(prout_on(&a, lun, REGISTER, 0, k, k, false).await, GOOD);
    }
    assert!(!state[0].exists());
    assert_eq!(lun1_set(&d).read_meta(), Some(Vec::new()));
    assert_eq!(prout(&a, REGISTER, 0, key[0], key[0], true).await, GOOD);
    a.logout().await.expect("logout");
    b.logout().await.expect("logout");
    stop(&mut d).await;
    // Without APTPL LUN 1's registrations do not survive a restart.
    start(&mut d).await;
    let a = login2(d.addr, NODE_A, isid).await;
    assert_eq!(pr_of(&a, 1).await, (vec![], None));
    assert_eq!(pr_of(&a, 0).await.0, vec![key[0]]);
    a.logout().await.expect("logout");
    stop(&mut d).await;

    // A damaged state file stops the start with a clear error.
    let good = std::fs::read(&state[0]).expect("state file");
    let mut bytes = good.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state[0], bytes).expect("damage");
    let config = Config::parse(&config_text(&d)).expect("config");
    match Server::start(config).await {
        Ok(_) => panic!("a damaged reservation file must stop the start"),
        Err(e) => assert!(e.to_string().contains("crc32c"), "{e}"),
    }
    std::fs::write(&state[0], good).expect("repair");

    // So does a record on the mirror set that is not reservation state.
    let paths = [mir_a, mir_b];
    MirrorSet::open(&paths, LUN1_BLOCKS, 512)
        .expect("LUN 1's mirror set")
        .write_meta(b"not reservation state")
        .expect("write a foreign record");
    let config = Config::parse(&config_text(&d)).expect("config");
    match Server::start(config).await {
        Ok(_) => panic!("an undecodable reservation record must stop the start"),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("LUN 1") && e.contains("metadata area") && e.contains("bad magic"),
                "{e}"
            );
        }
    }
}

#[tokio::test]
async fn spc2_reservation_released_on_logout() {
    let d = daemon("spc2-logout").await;
    let a = login(d.addr, NODE_A, [0x40, 0, 0, 0, 0xa0, 3]).await;
    let b = login(d.addr, NODE_B, [0x40, 0, 0, 0, 0xb0, 3]).await;
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    let release6 = [0x17, 0, 0, 0, 0, 0];
    assert_eq!(run(&a, &reserve6, None, 0).await.status, GOOD);
    assert_eq!(run(&b, &reserve6, None, 0).await.status, CONFLICT);
    assert_eq!(read1(&b).await, CONFLICT);
    assert_eq!(
        run(&b, &[0x12, 0, 0, 0, 36, 0], None, 36).await.status,
        GOOD
    );
    // RELEASE from a non-holder does nothing, successfully.
    assert_eq!(run(&b, &release6, None, 0).await.status, GOOD);
    assert_eq!(write1(&b).await, CONFLICT);
    // Persistent reservation commands conflict while the SPC-2 reservation stands.
    assert_eq!(prout(&a, REGISTER, 0, 0, 7, false).await, CONFLICT);
    a.logout().await.expect("logout");
    assert_eq!(run(&b, &reserve6, None, 0).await.status, GOOD);
    assert_eq!(write1(&b).await, GOOD);
    assert_eq!(run(&b, &release6, None, 0).await.status, GOOD);
    b.logout().await.expect("logout");
}

// ---- a raw initiator whose writes wait for R2Ts, for PREEMPT AND ABORT ----

/// Logs in over a raw connection with InitialR2T=Yes and ImmediateData=No, so every
/// write waits for an R2T and a test can hold one between its R2T and its data. Clears
/// the power-on unit attention.
async fn raw_login(addr: std::net::SocketAddr, isid: [u8; 6]) -> Raw {
    let mut c = Raw::connect(addr).await;
    let (r, _) = c
        .login_with(isid, 1, &[("InitialR2T", "Yes"), ("ImmediateData", "No")])
        .await;
    assert_eq!((r.status_class, r.status_detail), (0, 0), "raw login");
    let tur = c.command(&TUR, 0, false, false, Bytes::new());
    let (status, ..) = c.run(tur).await;
    assert!(status == GOOD || status == CHECK_CONDITION);
    c
}

/// Sends a write command carrying no data and waits for its (only) R2T.
async fn raw_start_write(c: &mut Raw, cdb: &[u8], len: u32) -> (Itt, R2t) {
    let cmd = c.command(cdb, len, false, true, Bytes::new());
    let itt = cmd.itt;
    c.send(&Pdu::ScsiCommand(cmd)).await;
    loop {
        match c.recv().await {
            Pdu::R2t(r) if r.itt == itt => {
                assert_eq!(r.desired_len, len, "one R2T for the whole write");
                return (itt, r);
            }
            Pdu::NopIn(_) => {}
            other => panic!("expected an R2T, got {other:?}"),
        }
    }
}

/// Answers `r2t` with `data` in one Data-Out PDU.
async fn raw_data_out(c: &mut Raw, r2t: &R2t, data: &[u8]) {
    let p = Pdu::DataOut(DataOut {
        final_: true,
        lun: Lun::from_number(0),
        itt: r2t.itt,
        ttt: r2t.ttt,
        exp_stat_sn: c.exp_stat_sn,
        data_sn: DataSn(0),
        buffer_offset: r2t.buffer_offset,
        data: Bytes::copy_from_slice(data),
    });
    c.send(&p).await;
}

/// The SCSI Response for `itt`: status and sense. Anything else but a ping fails.
async fn raw_status(c: &mut Raw, itt: Itt) -> (u8, Bytes) {
    loop {
        match c.recv().await {
            Pdu::ScsiResponse(r) if r.itt == itt => return (r.status, r.sense),
            Pdu::NopIn(_) => {}
            other => panic!("expected the response to {itt:?}, got {other:?}"),
        }
    }
}

/// A whole write: command, R2T, data, status.
async fn raw_write(c: &mut Raw, cdb: &[u8], data: &[u8]) -> (u8, Bytes) {
    let (itt, r2t) = raw_start_write(c, cdb, data.len() as u32).await;
    raw_data_out(c, &r2t, data).await;
    raw_status(c, itt).await
}

/// PERSISTENT RESERVE OUT over the raw connection; returns the status.
async fn raw_prout(c: &mut Raw, sa: u8, ty: u8, key: u64, sa_key: u64) -> u8 {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let cdb = [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let (status, sense) = raw_write(c, &cdb, &p).await;
    assert!(
        status != CHECK_CONDITION,
        "PR OUT {sa}: {:?}",
        Sense::parse(&sense)
    );
    status
}

/// The block both preempt tests fight over.
const LBA: u32 = 40;

async fn read_block(s: &Session) -> Vec<u8> {
    let r = run(s, &ftss_test_support::read10(LBA, 1), None, 512).await;
    assert_eq!(r.status, GOOD, "read: {:?}", sense(&r));
    r.data_in.to_vec()
}

/// A (a userspace session) and B (raw, writes wait for R2Ts) both registered, B holding
/// Write Exclusive; the block holds 0x11 bytes. Returns A, B and their keys.
async fn two_nodes_b_reserved(d: &Daemon, tag: u8) -> (Session, Raw, u64, u64) {
    let (ka, kb) = (0xa1a1_0000_0000_00a1u64, 0xb2b2_0000_0000_00b2);
    let a = login(d.addr, NODE_A, [0x40, 0, 0, 0, 0xa0, tag]).await;
    let w = run(
        &a,
        &ftss_test_support::write10(LBA, 1),
        Some(vec![0x11; 512]),
        0,
    )
    .await;
    assert_eq!(w.status, GOOD, "initial write: {:?}", sense(&w));
    let mut b = raw_login(d.addr, [0x40, 0, 0, 0, 0xb0, tag]).await;
    assert_eq!(prout(&a, REGISTER_AND_IGNORE, 0, 0, ka, false).await, GOOD);
    assert_eq!(raw_prout(&mut b, REGISTER, 0, 0, kb).await, GOOD);
    assert_eq!(raw_prout(&mut b, RESERVE, WE, kb, 0).await, GOOD);
    assert_eq!(reservation(&prin(&a, 1).await), Some((kb, WE)));
    (a, b, ka, kb)
}

#[tokio::test]
async fn preempt_and_abort_ends_the_preempted_nodes_queued_write() {
    let d = daemon("pr-abort").await;
    let (a, mut b, ka, kb) = two_nodes_b_reserved(&d, 4).await;
    // B's write waits for its data when A preempts B's key and aborts B's tasks.
    let (itt, r2t) = raw_start_write(&mut b, &ftss_test_support::write10(LBA, 1), 512).await;
    assert_eq!(
        prout(&a, PREEMPT_AND_ABORT, WE, ka, kb, false).await,
        GOOD,
        "PREEMPT AND ABORT"
    );
    assert_eq!(reservation(&prin(&a, 1).await), Some((ka, WE)));
    assert_eq!(keys(&prin(&a, 0).await), vec![ka]);
    // The Control mode page says how aborted tasks end: TAS=1, with TASK ABORTED status.
    let ms = run(&a, &[0x1a, 0x08, 0x0a, 0, 255, 0], None, 255).await;
    assert_eq!(ms.status, GOOD, "MODE SENSE: {:?}", sense(&ms));
    assert_eq!(ms.data_in[4] & 0x3f, 0x0a, "Control mode page");
    assert_eq!(ms.data_in[4 + 5] & 0x40, 0x40, "TAS");
    // The write ended before A heard GOOD: TASK ABORTED, no sense.
    let (status, sense_data) = raw_status(&mut b, itt).await;
    assert_eq!(
        status,
        TASK_ABORTED,
        "B's write: {:?}",
        Sense::parse(&sense_data)
    );
    assert!(sense_data.is_empty());

    // B's data arrives late: dropped without a word (the next PDU B sees answers its
    // next command; a Reject would fail Raw::run).
    raw_data_out(&mut b, &r2t, &[0x99; 512]).await;
    let tur = b.command(&TUR, 0, false, false, Bytes::new());
    let (status, _, _, sense_data) = b.run(tur).await;
    assert_eq!(status, CHECK_CONDITION);
    assert_eq!(
        Sense::parse(&sense_data),
        Some((0x06, 0x2a, 0x05)),
        "REGISTRATIONS PREEMPTED"
    );
    // B is fenced: unregistered under A's Write Exclusive.
    let (status, _) = raw_write(&mut b, &ftss_test_support::write10(LBA, 1), &[0x77; 512]).await;
    assert_eq!(status, CONFLICT);
    assert_eq!(
        read_block(&a).await,
        vec![0x11; 512],
        "no write of B landed"
    );
    a.logout().await.expect("logout");
}

/// Plain PREEMPT aborts nothing: B's queued write completes when its data arrives. It is
/// checked against the reservation when it runs, after the preempt, so it meets A's
/// Write Exclusive as an unregistered nexus: RESERVATION CONFLICT (SPC-4 5.9.1 lets a new
/// reservation apply to tasks already in the task set; applying it is what keeps a
/// preempted node off the medium). The unit attention was established after the write
/// arrived, so the write does not take it; B's next command does (SAM-5 5.14).
#[tokio::test]
async fn plain_preempt_leaves_the_queued_write_to_the_new_reservation() {
    let d = daemon("pr-preempt").await;
    let (a, mut b, ka, kb) = two_nodes_b_reserved(&d, 5).await;
    let (itt, r2t) = raw_start_write(&mut b, &ftss_test_support::write10(LBA, 1), 512).await;
    assert_eq!(prout(&a, PREEMPT, WE, ka, kb, false).await, GOOD);
    assert_eq!(reservation(&prin(&a, 1).await), Some((ka, WE)));
    raw_data_out(&mut b, &r2t, &[0x99; 512]).await;
    let (status, sense_data) = raw_status(&mut b, itt).await;
    assert_eq!(
        status,
        CONFLICT,
        "B's queued write: {:?}",
        Sense::parse(&sense_data)
    );
    let tur = b.command(&TUR, 0, false, false, Bytes::new());
    let (status, _, _, sense_data) = b.run(tur).await;
    assert_eq!(status, CHECK_CONDITION);
    assert_eq!(
        Sense::parse(&sense_data),
        Some((0x06, 0x2a, 0x05)),
        "REGISTRATIONS PREEMPTED"
    );
    assert_eq!(
        read_block(&a).await,
        vec![0x11; 512],
        "B's write did not land"
    );
    a.logout().await.expect("logout");
}

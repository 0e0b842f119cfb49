//! COMPARE AND WRITE is atomic against other initiators: two sessions race it on one
//! block, round after round, both expecting the block's current state and both writing
//! the next one. Exactly one must win each round; the other must see MISCOMPARE. Were the
//! compare and the write separable, both could compare before either wrote and both win.
//!
//! A longer storm then runs VMware-ATS-like traffic from two initiators with many
//! commands in flight: heartbeats, a shared on-disk lock, and plain data I/O.

use std::sync::Arc;

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::sense::key;

const ROUNDS: u64 = 200;
const LBA: u64 = 7;
const BS: usize = 512;

/// The block's content in round `r`.
fn state(r: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&r.to_be_bytes());
    }
    b
}

fn caw_cdb() -> Vec<u8> {
    let mut cdb = vec![0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&LBA.to_be_bytes());
    cdb[13] = 1;
    cdb
}

async fn login(addr: std::net::SocketAddr, name: &str) -> Session {
    let s = Session::connect(
        addr,
        SessionConfig::new(name, Some(ftss_test_support::TARGET)),
    )
    .await
    .expect("login");
    // The first command reports the power-on unit attention.
    let _ = s
        .execute(0, &[0u8; 6], None, 0)
        .await
        .expect("TEST UNIT READY");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_initiators_race_compare_and_write_and_exactly_one_wins_each_round() {
    let d = ftss_test_support::daemon("caw-race").await;
    let a = login(d.addr, "iqn.2026-11.org.ftss:race-a").await;
    let b = login(d.addr, "iqn.2026-11.org.ftss:race-b").await;
    let mut write = vec![0x2a, 0, 0, 0, 0, LBA as u8, 0, 0, 1, 0];
    write[2..6].copy_from_slice(&(LBA as u32).to_be_bytes());
    let r = a
        .execute(0, &write, Some(Bytes::from(state(0))), 0)
        .await
        .expect("WRITE(10)");
    assert_eq!(r.status, 0, "initial write: {:?}", r.sense);
    let cdb = caw_cdb();
    let mut wins = [0u64; 2];
    for round in 0..ROUNDS {
        let mut data = state(round);
        data.extend(state(round + 1));
        let data = Bytes::from(data);
        let (ra, rb) = tokio::join!(
            a.execute(0, &cdb, Some(data.clone()), 0),
            b.execute(0, &cdb, Some(data), 0)
        );
        let (ra, rb) = (ra.expect("a's CAW"), rb.expect("b's CAW"));
        let won: Vec<bool> = [&ra, &rb].iter().map(|r| r.status == 0).collect();
        assert_eq!(
            won.iter().filter(|&&w| w).count(),
            1,
            "round {round}: exactly one winner (a {:?}, b {:?})",
            ra.sense,
            rb.sense
        );
        for (i, r) in [&ra, &rb].iter().enumerate() {
            if won[i] {
                wins[i] += 1;
            } else {
                assert_eq!(r.status, 2, "round {round}: loser status");
                let s = r.sense.expect("loser sense");
                assert_eq!((s.key, s.asc, s.ascq), (key::MISCOMPARE, 0x1d, 0));
            }
        }
    }
    assert_eq!(wins[0] + wins[1], ROUNDS);
    // The block went through every state once: it holds the last one.
    let mut read = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    read[2..6].copy_from_slice(&(LBA as u32).to_be_bytes());
    let r = a
        .execute(0, &read, None, BS as u32)
        .await
        .expect("READ(10)");
    assert_eq!(&r.data_in[..], &state(ROUNDS)[..]);
    let _ = a.logout().await;
    let _ = b.logout().await;
}

// ---- the ATS storm ----

/// Concurrent workers per initiator, each with one command in flight at a time.
const WORKERS: u64 = 8;
/// Operations each worker runs.
const OPS: u64 = 2000;
/// Heartbeat blocks: one per worker, written only by it.
const HB_LBA: u64 = 100;
/// The shared lock block.
const LOCK_LBA: u64 = 200;
/// The block the lock protects: only the holder writes it.
const GUARDED_LBA: u64 = 201;
/// Plain data: 64 slots per worker from here.
const DATA_LBA: u64 = 1024;
/// Blocks in one data slot.
const SLOT_BLOCKS: u64 = 8;

/// A 512-byte record: tag, two numbers, and a fill derived from them, so a compare
/// covers the whole block.
fn record(tag: &[u8; 8], a: u64, b: u64) -> Vec<u8> {
    let mut r = vec![0u8; BS];
    r[0..8].copy_from_slice(tag);
    r[8..16].copy_from_slice(&a.to_be_bytes());
    r[16..24].copy_from_slice(&b.to_be_bytes());
    for (i, x) in r[24..].iter_mut().enumerate() {
        *x = (a.wrapping_mul(31) ^ b.wrapping_mul(131) ^ i as u64) as u8;
    }
    r
}

fn heartbeat(owner: u64, beat: u64) -> Vec<u8> {
    record(b"FTSS-HB\0", owner, beat)
}

/// The lock record: version, and the owner holding it (0: free).
fn lock_record(version: u64, owner: u64) -> Vec<u8> {
    record(b"FTSSLOCK", version, owner)
}

fn parse_lock(b: &[u8]) -> (u64, u64) {
    assert_eq!(&b[..8], b"FTSSLOCK", "lock block holds a lock record");
    let n = |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().expect("8 bytes"));
    let (version, owner) = (n(8..16), n(16..24));
    assert_eq!(b, &lock_record(version, owner)[..], "lock record intact");
    (version, owner)
}

fn cdb16(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

async fn write(s: &Session, lba: u64, data: Vec<u8>) {
    let blocks = (data.len() / BS) as u32;
    let r = s
        .execute(0, &cdb16(0x8a, lba, blocks), Some(Bytes::from(data)), 0)
        .await
        .expect("WRITE(16) completes");
    assert_eq!(r.status, 0, "WRITE(16) at {lba}: {:?}", r.sense);
}

async fn read(s: &Session, lba: u64, blocks: u32) -> Vec<u8> {
    let r = s
        .execute(0, &cdb16(0x88, lba, blocks), None, blocks * BS as u32)
        .await
        .expect("READ(16) completes");
    assert_eq!(r.status, 0, "READ(16) at {lba}: {:?}", r.sense);
    r.data_in.to_vec()
}

/// COMPARE AND WRITE of one block: true when it wrote, false on MISCOMPARE (anything
/// else fails the test).
async fn caw(s: &Session, lba: u64, old: &[u8], new: &[u8]) -> bool {
    let mut cdb = vec![0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = 1;
    let mut data = old.to_vec();
    data.extend_from_slice(new);
    let r = s
        .execute(0, &cdb, Some(Bytes::from(data)), 0)
        .await
        .expect("COMPARE AND WRITE completes");
    if r.status == 0 {
        return true;
    }
    assert_eq!(r.status, 2, "COMPARE AND WRITE at {lba}: status");
    let sense = r.sense.expect("MISCOMPARE sense");
    assert_eq!(
        (sense.key, sense.asc, sense.ascq),
        (key::MISCOMPARE, 0x1d, 0)
    );
    false
}

#[derive(Default, Debug)]
struct Tally {
    caws: u64,
    heartbeats: u64,
    lock_tries: u64,
    lock_wins: u64,
    lock_miscompares: u64,
    lock_busy: u64,
    releases: u64,
    data_writes: u64,
    data_reads: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.caws += o.caws;
        self.heartbeats += o.heartbeats;
        self.lock_tries += o.lock_tries;
        self.lock_wins += o.lock_wins;
        self.lock_miscompares += o.lock_miscompares;
        self.lock_busy += o.lock_busy;
        self.releases += o.releases;
        self.data_writes += o.data_writes;
        self.data_reads += o.data_reads;
    }
}

/// One successful lock transition: the version it wrote, by whom, and whether it took
/// the lock (else released it).
#[derive(Clone, Copy, Debug)]
struct Transition {
    version: u64,
    owner: u64,
    acquire: bool,
}

/// What a worker leaves behind.
struct WorkerEnd {
    tally: Tally,
    transitions: Vec<Transition>,
    /// Its heartbeat block's index and last beat.
    hb: (u64, u64, u64),
}

/// One ESXi-like I/O thread: heartbeats its own block, tries the shared lock (read it,
/// CAW free -> held, write and read back the guarded block, CAW held -> free), and does
/// plain writes and reads, in a pseudo-random mix fixed by its seed.
async fn ats_worker(s: Arc<Session>, owner: u64, slot: u64) -> WorkerEnd {
    let mut t = Tally::default();
    let mut transitions = Vec::new();
    let hb_lba = HB_LBA + slot;
    let mut beat = 0u64;
    let mut rng = owner.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for n in 0..OPS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        match rng % 10 {
            0..=3 => {
                t.caws += 1;
                t.heartbeats += 1;
                let ok = caw(
                    &s,
                    hb_lba,
                    &heartbeat(owner, beat),
                    &heartbeat(owner, beat + 1),
                )
                .await;
                assert!(
                    ok,
                    "heartbeat of {owner} at beat {beat}: MISCOMPARE on a block no one else writes"
                );
                beat += 1;
            }
            4..=5 => {
                let cur = read(&s, LOCK_LBA, 1).await;
                t.data_reads += 1;
                let (version, holder) = parse_lock(&cur);
                if holder != 0 {
                    t.lock_busy += 1;
                    continue;
                }
                t.caws += 1;
                t.lock_tries += 1;
                if !caw(&s, LOCK_LBA, &cur, &lock_record(version + 1, owner)).await {
                    t.lock_miscompares += 1;
                    continue;
                }
                t.lock_wins += 1;
                transitions.push(Transition {
                    version: version + 1,
                    owner,
                    acquire: true,
                });
                // The guarded block is the holder's alone until it releases.
                let mine = record(b"FTSS-GRD", version + 1, owner);
                write(&s, GUARDED_LBA, mine.clone()).await;
                let got = read(&s, GUARDED_LBA, 1).await;
                assert!(
                    got == mine,
                    "guarded block changed under lock holder {owner} (version {}): it now starts {:02x?}",
                    version + 1,
                    &got[..24]
                );
                t.data_writes += 1;
                t.data_reads += 1;
                t.caws += 1;
                let released = caw(
                    &s,
                    LOCK_LBA,
                    &lock_record(version + 1, owner),
                    &lock_record(version + 2, 0),
                )
                .await;
                assert!(
                    released,
                    "release of version {} by {owner}: the held lock changed",
                    version + 1
                );
                t.releases += 1;
                transitions.push(Transition {
                    version: version + 2,
                    owner,
                    acquire: false,
                });
            }
            _ => {
                let lba = DATA_LBA + (slot * 64 + n % 64) * SLOT_BLOCKS;
                let data: Vec<u8> = (0..SLOT_BLOCKS as usize * BS)
                    .map(|i| (i as u64 ^ owner.wrapping_mul(7) ^ n) as u8)
                    .collect();
                write(&s, lba, data.clone()).await;
                let got = read(&s, lba, SLOT_BLOCKS as u32).await;
                let bad = got.iter().zip(&data).position(|(a, b)| a != b);
                assert!(
                    got.len() == data.len() && bad.is_none(),
                    "data read back at {lba}: first difference at byte {bad:?}"
                );
                t.data_writes += 1;
                t.data_reads += 1;
            }
        }
    }
    WorkerEnd {
        tally: t,
        transitions,
        hb: (hb_lba, owner, beat),
    }
}

/// Two hosts, eight workers each (eight commands in flight per session), a fixed number
/// of operations: heartbeats never miscompare and end at their last beat; the lock's
/// successful CAWs form one version chain with one winner per version, each acquisition
/// released by its taker before the next one; the lock block ends at the chain's last
/// record. Prints how many CAWs ran, won and miscompared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ats_heartbeat_and_lock_storm_from_two_initiators() {
    let started = std::time::Instant::now();
    let d = ftss_test_support::daemon("caw-storm").await;
    let hosts = [
        Arc::new(login(d.addr, "iqn.2026-11.org.ftss:esx-a").await),
        Arc::new(login(d.addr, "iqn.2026-11.org.ftss:esx-b").await),
    ];
    // Owners 1..=16: host h's worker w is owner h * WORKERS + w + 1, heartbeat slot
    // h * WORKERS + w.
    for slot in 0..2 * WORKERS {
        write(&hosts[0], HB_LBA + slot, heartbeat(slot + 1, 0)).await;
    }
    write(&hosts[0], LOCK_LBA, lock_record(0, 0)).await;
    let mut jobs = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        for w in 0..WORKERS {
            let slot = h as u64 * WORKERS + w;
            jobs.push(tokio::spawn(ats_worker(Arc::clone(host), slot + 1, slot)));
        }
    }
    let mut total = Tally::default();
    let mut per_host = [Tally::default(), Tally::default()];
    let mut chain = Vec::new();
    let mut beats = Vec::new();
    for (i, j) in jobs.into_iter().enumerate() {
        let end = j.await.expect("worker finished without failing");
        total.add(&end.tally);
        per_host[i / WORKERS as usize].add(&end.tally);
        chain.extend(end.transitions);
        beats.push(end.hb);
    }

    // Heartbeats: every CAW succeeded (checked as they ran); each block holds its last beat.
    for &(lba, owner, beat) in &beats {
        let got = read(&hosts[1], lba, 1).await;
        assert!(
            got == heartbeat(owner, beat),
            "heartbeat block {lba} should hold beat {beat} of {owner}; it starts {:02x?}",
            &got[..24]
        );
    }
    // The lock: successful transitions form one chain 1, 2, ..., N with one winner per
    // version, acquisitions on odd versions and each released (next version) by the
    // owner that took it, so no two owners ever held it at once.
    chain.sort_by_key(|t| t.version);
    for (i, t) in chain.iter().enumerate() {
        assert_eq!(
            t.version,
            i as u64 + 1,
            "lock versions reused or skipped: {:?}",
            &chain[i.saturating_sub(2)..(i + 2).min(chain.len())]
        );
        assert_eq!(
            t.acquire,
            t.version % 2 == 1,
            "version {}: acquire/release alternate",
            t.version
        );
        if !t.acquire {
            assert_eq!(
                t.owner,
                chain[i - 1].owner,
                "version {} released by a non-holder",
                t.version
            );
        }
    }
    let last = chain.last().map_or(0, |t| t.version);
    assert_eq!(last % 2, 0, "the lock ends free");
    assert_eq!(last, 2 * total.lock_wins);
    let got = read(&hosts[1], LOCK_LBA, 1).await;
    assert_eq!(
        parse_lock(&got),
        (last, 0),
        "lock block holds the last transition"
    );
    assert!(total.lock_wins > 0, "nobody ever took the lock");

    println!(
        "ATS storm: {} initiators x {WORKERS} workers x {OPS} ops in {:?}",
        hosts.len(),
        started.elapsed()
    );
    println!("  total  {total:?}");
    for (h, t) in per_host.iter().enumerate() {
        println!("  host {h} {t:?}");
    }
    println!(
        "  CAWs {}, heartbeat CAWs {} (0 miscompares), lock attempts {}, wins {}, lock miscompares {}, found held {}",
        total.caws, total.heartbeats, total.lock_tries, total.lock_wins, total.lock_miscompares, total.lock_busy
    );
    for h in &hosts {
        let _ = h.logout().await;
    }
}

//! Crash test: a writer at queue depth 32 over iSCSI against the real `ftss-target` binary
//! in nonvolatile mode (write cache + mirror set), the daemon killed with SIGKILL at random
//! points 50 times and restarted; every write that got GOOD must read back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ftss_proto::pdu::Pdu;
use ftss_test_support::*;

const BLOCKS: u32 = 4096;
const KILLS: u32 = 50;

/// A 512-byte block stamped with its LBA and a global write counter.
fn stamped(lba: u32, counter: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    while b.len() < 512 {
        b.extend_from_slice(&u64::from(lba).to_le_bytes());
        b.extend_from_slice(&counter.to_le_bytes());
    }
    b
}

/// The counter a block holds, or None if it is not a whole stamp for `lba`.
fn stamp_of(lba: u32, b: &[u8]) -> Option<u64> {
    let first = &b[..16];
    if b.chunks(16).any(|c| c != first)
        || u64::from_le_bytes(first[..8].try_into().ok()?) != u64::from(lba)
    {
        return None;
    }
    Some(u64::from_le_bytes(first[8..16].try_into().ok()?))
}

async fn login(port: u16) -> Raw {
    let mut c = Raw::connect(format!("127.0.0.1:{port}").parse().expect("addr")).await;
    c.login().await;
    for _ in 0..4 {
        let cmd = c.command(&TUR, 0, false, false, Bytes::new());
        if c.run(cmd).await.0 == 0 {
            break;
        }
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = temp_dir("crash");
    let config = dir.join("ftss.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[server]\nportals = [\"127.0.0.1:{port}\"]\ndata_dir = \"{}\"\n[media]\ncache_size = \"4MiB\"\ncache = \"nonvolatile\"\n[[target]]\niqn = \"{TARGET}\"\n[[target.lun]]\nlun = 0\nmirrors = [\"a.mirror\", \"b.mirror\"]\nsize = \"2MiB\"\n",
            dir.display()
        ),
    )
    .expect("config");
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Highest acknowledged counter per LBA, over all rounds.
    let mut acked: HashMap<u32, u64> = HashMap::new();
    let mut counter = 0u64;
    let (mut checked, mut lost, mut total_acks) = (0u64, 0u64, 0u64);
    // Round KILLS only verifies what the last round acknowledged.
    for round in 0..=KILLS {
        let mut daemon = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &config, port);
        let mut c = login(port).await;
        // Verify everything acknowledged before the last kill.
        let cmd = c.command(
            &read10(0, BLOCKS as u16),
            BLOCKS * 512,
            true,
            false,
            Bytes::new(),
        );
        let (st, data, _, _) = c.run(cmd).await;
        assert_eq!(st, 0, "round {round}: read back");
        for (&lba, &want) in &acked {
            checked += 1;
            let b = &data[lba as usize * 512..(lba as usize + 1) * 512];
            match stamp_of(lba, b) {
                // A later write that was in flight may have landed: never an older one.
                Some(got) if got >= want => {}
                _ => lost += 1,
            }
        }
        if round == KILLS {
            daemon.kill().expect("SIGKILL");
            daemon.wait().expect("reap");
            break;
        }
        // Write at queue depth 32 until the kill; never two writes to one LBA in flight,
        // so the order in which the target runs them cannot matter.
        let kill_at = Instant::now() + Duration::from_millis(100 + next() % 400);
        let mut inflight: HashMap<u32, (u32, u64)> = HashMap::new();
        let mut busy: std::collections::HashSet<u32> = std::collections::HashSet::new();
        while Instant::now() < kill_at {
            while inflight.len() < 32 {
                let lba = (next() % u64::from(BLOCKS)) as u32;
                if !busy.insert(lba) {
                    continue;
                }
                counter += 1;
                let cmd = c.command(
                    &write10(lba, 1),
                    512,
                    false,
                    true,
                    Bytes::from(stamped(lba, counter)),
                );
                inflight.insert(cmd.itt.0, (lba, counter));
                c.send(&Pdu::ScsiCommand(cmd)).await;
            }
            if let Some(Pdu::ScsiResponse(r)) = c.recv_within(Duration::from_millis(50)).await {
                if let Some((lba, n)) = inflight.remove(&r.itt.0) {
                    busy.remove(&lba);
                    if r.status == 0 {
                        total_acks += 1;
                        let e = acked.entry(lba).or_insert(0);
                        *e = (*e).max(n);
                    }
                }
            }
        }
        daemon.kill().expect("SIGKILL");
        daemon.wait().expect("reap");
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("crash test: {KILLS} SIGKILLs, {total_acks} acknowledged writes, {checked} block checks, {lost} lost");
    assert!(
        total_acks > 1000,
        "the writer made too little progress to prove anything"
    );
    assert_eq!(lost, 0, "acknowledged writes lost");
}

//! Holds many long-poll RECEIVEs open on an ftss target, for load tests such as
//! `ci/bench-longpoll.sh`.
//!
//! `longpolls PORTAL TARGET INITIATOR_PREFIX SESSIONS POLLS SECONDS`: logs in SESSIONS
//! sessions as `{INITIATOR_PREFIX}1`, `{INITIATOR_PREFIX}2`, ... (each must be a node in
//! the target's configuration), spreads POLLS RECEIVEs with WAIT (20 s each) over them and
//! issues a new one whenever one ends, for SECONDS seconds. Prints `ready POLLS` once the
//! target has taken every poll (a NOP-Out behind them on each session came back).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::vendor::ReceiveCdb;

/// Data-in room of each poll.
const POLL_BYTES: u32 = 64 << 10;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T> {
    args.get(i)
        .with_context(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| anyhow::anyhow!("bad {what}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        bail!("usage: longpolls PORTAL TARGET INITIATOR_PREFIX SESSIONS POLLS SECONDS");
    }
    let portal: SocketAddr = arg(&args, 1, "portal")?;
    let target = args[2].clone();
    let prefix = args[3].clone();
    let sessions: usize = arg(&args, 4, "session count")?;
    let polls: usize = arg(&args, 5, "poll count")?;
    let seconds: u64 = arg(&args, 6, "seconds")?;
    if sessions == 0 {
        bail!("at least one session");
    }
    let cdb = ReceiveCdb {
        wait: true,
        max_records: 0,
        alloc_len: POLL_BYTES,
        timeout: 200,
    }
    .encode();
    let ended = Arc::new(AtomicU64::new(0));
    let mut all = Vec::new();
    let mut tasks = Vec::new();
    for n in 1..=sessions {
        let name = format!("{prefix}{n}");
        let s = Session::connect(portal, SessionConfig::new(&name, Some(&target)))
            .await
            .with_context(|| format!("login as {name}"))?;
        let s = Arc::new(s);
        let share = polls / sessions + usize::from(n <= polls % sessions);
        for _ in 0..share {
            let (s, cdb, ended) = (Arc::clone(&s), cdb.clone(), Arc::clone(&ended));
            tasks.push(tokio::spawn(async move {
                // One poll after another: always one outstanding for this slot.
                while !s.is_closed() {
                    let r = s.execute(0, &cdb, None, POLL_BYTES).await;
                    ended.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = r {
                        eprintln!("poll: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        all.push(s);
    }
    for s in &all {
        s.nop_ping().await.context("NOP behind the polls")?;
    }
    println!("ready {polls}");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    eprintln!(
        "{} polls ended (answered or failed) in {seconds} s",
        ended.load(Ordering::Relaxed)
    );
    for t in &tasks {
        t.abort();
    }
    Ok(())
}

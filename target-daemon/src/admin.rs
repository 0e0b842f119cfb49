//! The admin interface: a Unix socket in the data directory that `ftss-target admin`
//! talks to. One request line per connection, answered with text lines, then closed:
//!
//! - `status`: the write cache's counters and every mirror's state (with rebuild
//!   progress as `done/total` blocks);
//! - `rebuild <iqn>/<lun> <mirror> [bytes-per-second]`: starts an online rebuild of one
//!   failed mirror from the healthy copies, rate-limited, while I/O continues (refused
//!   for a healthy mirror, the last healthy one above all, and while the set rebuilds);
//! - `scrub <iqn>/<lun>`: verifies every copy of every block, repairs bad ones, reports;
//! - `nodes`: the routing table's nodes and the owners of registered addresses;
//! - `nodes retire <initiator>`: releases an initiator's registered addresses and
//!   discards the packets queued under them (the only way they change hands);
//! - `sessions`: every live session (initiator, ISID, TSIH, target, peer, since when);
//! - `queues`: every packet node's queue (packets, bytes, oldest unacked age, quota use);
//! - `luns`: every target's LUNs (size, block size, masking);
//! - `luns add <iqn> <lun> <bytes> [block-size]`: a new plain-file LUN, served at once
//!   and kept in `runtime-luns.toml` for the next start;
//! - `luns resize <iqn> <lun> <bytes>`: grows a LUN added that way (sessions hear
//!   CAPACITY DATA HAS CHANGED);
//! - `luns remove <iqn> <lun>`: drops a LUN added that way while no session is logged
//!   in to its target (its file stays on disk);
//! - `config effective`: the configuration in force (the file as read at start or at the
//!   last accepted reload, secrets hidden) and what changed at run time (nodes
//!   registered by their initiators, kept in the packet registry).
//!
//! Answers start with `ok` or `error`. Plain text keeps it usable with `socat` when the
//! CLI is not at hand. A listing request prefixed with `json ` (`json sessions`) is
//! answered with `ok` and one line of JSON instead, for scripts; the text answers stay
//! as they are for people.
//!
//! Whoever reaches the socket can take mirrors through rebuilds and retire nodes, so the
//! socket is 0600 and every connection's peer uid (SO_PEERCRED) must be root or the
//! daemon's own; anyone else gets `error permission denied`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::iscsi::session::{SessionInfo, Shared};
use crate::media::cache::WriteCache;
use crate::media::mirror::{MirrorSet, MirrorState, RebuildTicket};
use crate::runtime_luns::{RuntimeLun, RuntimeState};

/// The media the admin interface manages.
#[derive(Clone, Default)]
pub struct MediaHandles {
    /// The shared write cache, when any LUN is mirrored.
    pub cache: Option<Arc<WriteCache>>,
    /// Cache mode name, for status.
    pub cache_mode: String,
    /// Mirror sets by volume name (`<iqn>/<lun>`).
    pub volumes: Vec<(String, Arc<MirrorSet>)>,
    /// Default rebuild rate in bytes per second.
    pub rebuild_rate: u64,
    /// The routing agent, when packets are configured.
    pub agent: Option<Arc<crate::routing::RoutingAgent>>,
}

impl MediaHandles {
    fn volume(&self, name: &str) -> Option<&Arc<MirrorSet>> {
        self.volumes
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The `status` answer.
    pub fn status(&self) -> String {
        let mut out = String::from("ok\n");
        if let Some(c) = &self.cache {
            let s = c.stats();
            out.push_str(&format!(
                "cache mode={} ring_bytes={} dirty_bytes={} records={} commit_flushes={} commit_flush_us={} commit_wait_max_us={} space_wait_max_us={} recovered_records={} recovery_ms={}\n",
                self.cache_mode,
                s.ring_bytes,
                s.dirty_bytes,
                s.records,
                s.commit_flushes,
                s.commit_flush_us,
                s.commit_wait_max_us,
                s.space_wait_max_us,
                s.recovered_records,
                s.recovery_ms
            ));
        }
        if let Some(x) = self.agent.as_ref().and_then(|a| a.external_stats()) {
            out.push_str(&format!("{x}\n"));
        }
        if let Some(x) = self.agent.as_ref().and_then(|a| a.interfaces_status()) {
            out.push_str(&format!("{x}\n"));
        }
        for (name, v) in &self.volumes {
            out.push_str(&format!(
                "volume {name} blocks={} block_size={} repairs={} repair_failures={}\n",
                v.blocks(),
                v.block_size(),
                v.repairs(),
                v.repair_failures()
            ));
            for (i, m) in v.status().iter().enumerate() {
                let state = match &m.state {
                    MirrorState::Healthy => "healthy".to_owned(),
                    MirrorState::Rebuilding(done) => format!("rebuilding {done}/{}", v.blocks()),
                    MirrorState::Failed(why) => format!("failed ({why})"),
                };
                out.push_str(&format!(
                    "mirror {name} {i} {state} path={}\n",
                    m.path.display()
                ));
            }
        }
        out
    }

    /// Runs one request line; blocking (scrub reads every block).
    pub fn handle(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => self.status(),
            ["nodes"] => match &self.agent {
                Some(a) => format!("ok\n{}", a.nodes_report()),
                None => "error no [packets] configured\n".into(),
            },
            ["nodes", "retire", initiator] => match &self.agent {
                Some(a) => match a.retire(initiator) {
                    Ok(keys) => {
                        let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
                        format!("ok retired {initiator} addresses={}\n", keys.join(","))
                    }
                    Err(e) => format!("error {e}\n"),
                },
                None => "error no [packets] configured\n".into(),
            },
            ["rebuild", name, mirror, rest @ ..] if rest.len() <= 1 => {
                let Some(v) = self.volume(name) else {
                    return format!("error no mirrored volume {name}\n");
                };
                let Ok(i) = mirror.parse::<usize>() else {
                    return format!("error mirror index {mirror:?} is not a number\n");
                };
                if i >= v.status().len() {
                    return format!("error {name} has no mirror {i}\n");
                }
                let rate = match rest.first().map(|r| r.parse::<u64>()) {
                    None => self.rebuild_rate,
                    Some(Ok(r)) => r,
                    Some(Err(_)) => return "error rate must be bytes per second\n".into(),
                };
                // Visible as rebuilding before the answer, so a status right after it
                // never shows the old failed state. The set refuses a healthy mirror, the
                // last healthy one and a second rebuild, and says which.
                let ticket = match v.begin_rebuild(i) {
                    Ok(t) => t,
                    Err(e) => return format!("error cannot start the rebuild: {e}\n"),
                };
                // The ticket goes to the thread once it exists, so a thread that cannot
                // start leaves it here to give back.
                let (tx, rx) = std::sync::mpsc::channel::<RebuildTicket>();
                let (set, name) = (Arc::clone(v), (*name).to_owned());
                let spawned = std::thread::Builder::new()
                    .name("ftss-rebuild".into())
                    .spawn(move || {
                        let Ok(ticket) = rx.recv() else { return };
                        match set.run_rebuild(ticket, rate, |_, _| {}) {
                            Ok(()) => info!(volume = %name, mirror = i, "rebuild done"),
                            Err(e) => warn!(volume = %name, mirror = i, "rebuild failed: {e}"),
                        }
                    });
                let sent = match spawned {
                    Ok(_) => tx
                        .send(ticket)
                        .map_err(|e| (e.0, "the thread is gone".to_owned())),
                    Err(e) => Err((ticket, e.to_string())),
                };
                match sent {
                    Ok(()) => format!("ok rebuild of mirror {i} started at {rate} bytes/s\n"),
                    Err((ticket, e)) => {
                        // Out of service again: no copy is running to make it whole.
                        v.abandon_rebuild(ticket, format!("rebuild not started: {e}"));
                        format!("error cannot start the rebuild: {e}\n")
                    }
                }
            }
            ["scrub", name] => {
                let Some(v) = self.volume(name) else {
                    return format!("error no mirrored volume {name}\n");
                };
                match v.scrub() {
                    Ok(r) => format!(
                        "ok blocks={} mismatches={} repaired={}\n",
                        r.blocks, r.mismatches, r.repaired
                    ),
                    Err(e) => format!("error scrub failed: {e}\n"),
                }
            }
            _ => format!("error unknown request; want: {USAGE}\n"),
        }
    }
}

/// The requests the socket understands, for the refusal of any other.
const USAGE: &str = "status | rebuild <iqn>/<lun> <mirror> [bytes/s] | scrub <iqn>/<lun> | nodes [retire <initiator>] | sessions | queues | luns [add <iqn> <lun> <bytes> [block-size] | resize <iqn> <lun> <bytes> | remove <iqn> <lun>] | config effective; `json ` before status, nodes, sessions, queues, luns or config effective";

/// Everything the admin socket answers about: the media and the live server state.
pub(crate) struct Admin {
    pub(crate) media: MediaHandles,
    pub(crate) shared: Arc<Shared>,
    /// The LUNs added at run time, as stored in the data directory; the lock also keeps
    /// two adds or removes from interleaving their file writes.
    pub(crate) runtime: std::sync::Mutex<RuntimeState>,
}

impl MediaHandles {
    /// The `status` answer as JSON.
    fn status_json(&self) -> serde_json::Value {
        let cache = self.cache.as_ref().map(|c| {
            let s = c.stats();
            json!({
                "mode": self.cache_mode,
                "ring_bytes": s.ring_bytes,
                "dirty_bytes": s.dirty_bytes,
                "records": s.records,
                "commit_flushes": s.commit_flushes,
                "commit_flush_us": s.commit_flush_us,
                "commit_wait_max_us": s.commit_wait_max_us,
                "space_wait_max_us": s.space_wait_max_us,
                "recovered_records": s.recovered_records,
                "recovery_ms": s.recovery_ms,
            })
        });
        let external = self
            .agent
            .as_ref()
            .and_then(|a| a.external_stats())
            .map(|x| x.to_string());
        let volumes: Vec<serde_json::Value> = self
            .volumes
            .iter()
            .map(|(name, v)| {
                let mirrors: Vec<serde_json::Value> = v
                    .status()
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let (state, done, reason) = match &m.state {
                            MirrorState::Healthy => ("healthy", None, None),
                            MirrorState::Rebuilding(done) => ("rebuilding", Some(*done), None),
                            MirrorState::Failed(why) => ("failed", None, Some(why.to_string())),
                        };
                        json!({
                            "index": i,
                            "state": state,
                            "rebuilt_blocks": done,
                            "reason": reason,
                            "path": m.path.display().to_string(),
                        })
                    })
                    .collect();
                json!({
                    "name": name,
                    "blocks": v.blocks(),
                    "block_size": v.block_size(),
                    "repairs": v.repairs(),
                    "repair_failures": v.repair_failures(),
                    "mirrors": mirrors,
                })
            })
            .collect();
        let interfaces = self.agent.as_ref().and_then(|a| a.interfaces_status());
        json!({
            "cache": cache,
            "external": external,
            "external_interfaces": interfaces,
            "volumes": volumes
        })
    }
}

/// A live session's line in the `sessions` answer.
fn session_line(s: &SessionInfo) -> String {
    format!(
        "session tsih={} initiator={} isid={} target={} peer={} since={}\n",
        s.tsih,
        s.initiator,
        s.isid,
        s.target.as_deref().unwrap_or("-"),
        s.peer.as_deref().unwrap_or("-"),
        s.since_unix_s
    )
}

/// One LUN as `luns` lists it.
#[derive(serde::Serialize)]
struct LunInfo {
    target: String,
    lun: u64,
    blocks: u64,
    block_size: u32,
    read_only: bool,
    /// LUN masking; `None`: every initiator the target admits.
    initiators: Option<Vec<String>>,
}

impl Admin {
    fn luns(&self) -> Vec<LunInfo> {
        let mut out = Vec::new();
        for t in &self.shared.targets {
            for l in t.scsi.luns() {
                out.push(LunInfo {
                    target: t.iqn.clone(),
                    lun: l.number,
                    blocks: l.blocks(),
                    block_size: l.block_size(),
                    read_only: l.read_only,
                    initiators: l.initiator_names(),
                });
            }
        }
        out
    }

    fn runtime(&self) -> std::sync::MutexGuard<'_, RuntimeState> {
        // The state is replaced whole after its file is written, never torn.
        self.runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `luns add`: opens (creates) the file, serves the LUN, then records it; a record
    /// that cannot be written takes the LUN away again, so what runs is what restarts.
    fn add_lun(
        &self,
        iqn: &str,
        lun: u16,
        bytes: u64,
        block_size: u32,
    ) -> Result<std::path::PathBuf, String> {
        let target = self
            .shared
            .target(iqn)
            .ok_or_else(|| format!("no target {iqn}"))?;
        if target.scsi.lun_exists(u64::from(lun)) {
            return Err(format!("{iqn} already has LUN {lun}"));
        }
        // As the configuration file allows.
        if !matches!(block_size, 512 | 4096) {
            return Err("block size must be 512 or 4096".into());
        }
        if bytes == 0 || !bytes.is_multiple_of(u64::from(block_size)) {
            return Err(format!(
                "size must be a non-zero multiple of {block_size} bytes"
            ));
        }
        let mut state = self.runtime();
        let entry = RuntimeLun {
            target: target.iqn.clone(),
            lun,
            path: format!(
                "runtime-lun-{:08x}.img",
                crate::media::volume_id(&target.iqn, lun)
            )
            .into(),
            size_bytes: bytes,
            block_size,
        };
        let dir = &self.shared.config.server.data_dir;
        let store = entry.open(dir)?;
        target
            .scsi
            .add_lun(entry.spec(store), dir)
            .map_err(|e| e.to_string())?;
        let mut next = state.clone();
        next.luns.push(entry.clone());
        if let Err(e) = next.store(dir) {
            let _ = target.scsi.remove_lun(u64::from(lun));
            return Err(format!("not recorded, so not added: {e}"));
        }
        *state = next;
        info!(target = %target.iqn, lun, bytes, "LUN added by admin");
        Ok(dir.join(&entry.path))
    }

    /// `luns resize`: grows a LUN added at run time. The record goes first: a crash
    /// before the file grows leaves a record larger than the file, which the next start
    /// refuses by name rather than serve a LUN of the wrong size.
    fn resize_lun(&self, iqn: &str, lun: u16, bytes: u64) -> Result<(), String> {
        let target = self
            .shared
            .target(iqn)
            .ok_or_else(|| format!("no target {iqn}"))?;
        let mut state = self.runtime();
        let Some(i) = state.position(&target.iqn, lun) else {
            return Err(format!(
                "{iqn}/{lun} was not added at run time: change its size in the configuration file and restart"
            ));
        };
        let old = state.luns[i].clone();
        if bytes < old.size_bytes {
            return Err("a LUN only grows (shrinking would cut off data)".into());
        }
        if !bytes.is_multiple_of(u64::from(old.block_size)) {
            return Err(format!(
                "size must be a multiple of {} bytes",
                old.block_size
            ));
        }
        let dir = &self.shared.config.server.data_dir;
        let mut next = state.clone();
        next.luns[i].size_bytes = bytes;
        next.store(dir)
            .map_err(|e| format!("not recorded, so not resized: {e}"))?;
        if let Err(e) = target
            .scsi
            .grow_lun(u64::from(lun), bytes / u64::from(old.block_size))
        {
            // Put the record back to the size the file has.
            if let Err(e2) = state.store(dir) {
                warn!("{iqn}/{lun}: the record says {bytes} bytes, the file did not grow: {e2}");
            }
            return Err(e.to_string());
        }
        *state = next;
        info!(target = %target.iqn, lun, bytes, "LUN grown by admin");
        Ok(())
    }

    /// `luns remove`: only a LUN added at run time, and only while nobody is logged in to
    /// its target (no initiator can be using it). The record goes first, so a crash
    /// between the two never brings back a LUN the operator removed.
    fn remove_lun(&self, iqn: &str, lun: u16) -> Result<(), String> {
        let target = self
            .shared
            .target(iqn)
            .ok_or_else(|| format!("no target {iqn}"))?;
        let mut state = self.runtime();
        let Some(i) = state.position(&target.iqn, lun) else {
            return Err(format!(
                "{iqn}/{lun} was not added at run time: remove it from the configuration file and restart"
            ));
        };
        if self.shared.registry.has_target(&target.iqn) {
            return Err(format!("{iqn} has sessions logged in: log them out first"));
        }
        let mut next = state.clone();
        next.luns.remove(i);
        next.store(&self.shared.config.server.data_dir)
            .map_err(|e| format!("not recorded, so not removed: {e}"))?;
        *state = next;
        let _ = target.scsi.remove_lun(u64::from(lun));
        info!(target = %target.iqn, lun, "LUN removed by admin");
        Ok(())
    }

    /// Nodes registered at run time (NODE REGISTER), as `nodes` lists them.
    fn runtime_json(&self) -> serde_json::Value {
        let registered: Vec<serde_json::Value> = self
            .media
            .agent
            .as_ref()
            .map(|a| a.nodes_json())
            .and_then(|v| v["nodes"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n["kind"] == "registered")
            .collect();
        json!({ "registered_nodes": registered, "luns": self.runtime().luns.clone() })
    }

    /// `config effective` for people: the TOML in force, then the run-time changes as
    /// comments (they live in the packet registry, not in any file).
    fn effective_text(&self) -> String {
        let config = self.shared.in_force().redacted();
        let toml = match toml::to_string(&config) {
            Ok(t) => t,
            Err(e) => return format!("error {e}\n"),
        };
        let mut out = String::from(
            "ok\n# The configuration in force: the file as read at start or at the last accepted\n# reload (SIGHUP); CHAP secrets hidden.\n",
        );
        out.push_str(&toml);
        let rt = self.runtime_json();
        let luns = self.runtime().luns.clone();
        out.push_str(&format!(
            "\n# Added at run time (admin luns add; runtime-luns.toml, restored at start): {} LUN(s)\n",
            luns.len()
        ));
        for l in luns {
            out.push_str(&format!(
                "# lun {}/{} path={} size_bytes={} block_size={}\n",
                l.target,
                l.lun,
                l.path.display(),
                l.size_bytes,
                l.block_size
            ));
        }
        let nodes = rt["registered_nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        out.push_str(&format!(
            "\n# Changed at run time (packet registry, restored at start): {} registered node(s)\n",
            nodes.len()
        ));
        for n in nodes {
            let addrs: Vec<&str> = n["addrs"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            out.push_str(&format!(
                "# node {} initiator={} addrs={}\n",
                n["id"],
                n["initiator"].as_str().unwrap_or("-"),
                addrs.join(",")
            ));
        }
        out
    }

    fn queues(&self) -> Option<Vec<crate::routing::agent::NodeMetrics>> {
        self.media.agent.as_ref().map(|a| a.node_metrics())
    }

    /// Runs one request line; blocking (scrub reads every block).
    pub(crate) fn handle(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let to_json = |v: serde_json::Value| format!("ok\n{v}\n");
        match words.as_slice() {
            ["sessions"] => {
                let mut out = String::from("ok\n");
                for s in self.shared.registry.list() {
                    out.push_str(&session_line(&s));
                }
                out
            }
            ["json", "sessions"] => to_json(json!({ "sessions": self.shared.registry.list() })),
            ["queues"] => {
                match self.queues() {
                    Some(q) => {
                        let mut out = String::from("ok\n");
                        for n in q {
                            out.push_str(&format!(
                            "queue {} packets={} bytes={} oldest_unacked_ms={} quota_used={:.3}\n",
                            n.node, n.queued_packets, n.queued_bytes, n.oldest_unacked_ms, n.quota_used
                        ));
                        }
                        out
                    }
                    None => "error no [packets] configured\n".into(),
                }
            }
            ["json", "queues"] => match self.queues() {
                Some(q) => {
                    let q: Vec<serde_json::Value> = q
                        .iter()
                        .map(|n| {
                            json!({
                                "node": n.node,
                                "queued_packets": n.queued_packets,
                                "queued_bytes": n.queued_bytes,
                                "oldest_unacked_ms": n.oldest_unacked_ms,
                                "quota_used": n.quota_used,
                            })
                        })
                        .collect();
                    to_json(json!({ "queues": q }))
                }
                None => "error no [packets] configured\n".into(),
            },
            ["luns"] => {
                let mut out = String::from("ok\n");
                for l in self.luns() {
                    out.push_str(&format!(
                        "lun {}/{} blocks={} block_size={} read_only={} initiators={}\n",
                        l.target,
                        l.lun,
                        l.blocks,
                        l.block_size,
                        l.read_only,
                        l.initiators.map_or_else(|| "*".to_owned(), |i| i.join(","))
                    ));
                }
                out
            }
            ["json", "luns"] => to_json(json!({ "luns": self.luns() })),
            ["luns", "add", iqn, lun, bytes, rest @ ..] if rest.len() <= 1 => {
                let (Ok(lun), Ok(bytes)) = (lun.parse::<u16>(), bytes.parse::<u64>()) else {
                    return "error want: luns add <iqn> <lun> <bytes> [block-size]\n".into();
                };
                let block_size = match rest.first().map(|b| b.parse::<u32>()) {
                    None => 512,
                    Some(Ok(b)) => b,
                    Some(Err(_)) => return "error block size must be a number\n".into(),
                };
                match self.add_lun(iqn, lun, bytes, block_size) {
                    Ok(path) => format!("ok added {iqn}/{lun} path={}\n", path.display()),
                    Err(e) => format!("error {e}\n"),
                }
            }
            ["luns", "resize", iqn, lun, bytes] => {
                let (Ok(lun), Ok(bytes)) = (lun.parse::<u16>(), bytes.parse::<u64>()) else {
                    return "error want: luns resize <iqn> <lun> <bytes>\n".into();
                };
                match self.resize_lun(iqn, lun, bytes) {
                    Ok(()) => format!("ok resized {iqn}/{lun} to {bytes} bytes\n"),
                    Err(e) => format!("error {e}\n"),
                }
            }
            ["luns", "remove", iqn, lun] => {
                let Ok(lun) = lun.parse::<u16>() else {
                    return "error want: luns remove <iqn> <lun>\n".into();
                };
                match self.remove_lun(iqn, lun) {
                    Ok(()) => format!("ok removed {iqn}/{lun} (its file stays)\n"),
                    Err(e) => format!("error {e}\n"),
                }
            }
            ["config", "effective"] => self.effective_text(),
            ["json", "config", "effective"] => {
                let config = self.shared.in_force().redacted();
                match serde_json::to_value(&config) {
                    Ok(c) => to_json(json!({ "config": c, "runtime": self.runtime_json() })),
                    Err(e) => format!("error {e}\n"),
                }
            }
            ["json", "status"] => to_json(self.media.status_json()),
            ["json", "nodes"] => match &self.media.agent {
                Some(a) => to_json(a.nodes_json()),
                None => "error no [packets] configured\n".into(),
            },
            ["json", ..] => format!(
                "error no JSON form of {:?}; want: {USAGE}\n",
                &line[4..].trim()
            ),
            _ => self.media.handle(line),
        }
    }
}

/// Binds the admin socket (replacing a stale one left by a killed daemon) and serves it
/// until `stop` changes.
pub(crate) fn start(
    path: &Path,
    admin: Admin,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: another daemon is serving it", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Owner-only at once: whoever may connect may rebuild, scrub and retire nodes. The
    // umask may have left it wider for this moment; the peer check covers that too.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let path: PathBuf = path.to_owned();
    let media = Arc::new(admin);
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((sock, _)) => {
                        tokio::spawn(serve(sock, Arc::clone(&media)));
                    }
                    Err(e) => {
                        warn!("admin accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// The daemon's effective uid.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer running as `peer_uid` may use the admin socket of a daemon running as
/// `own_uid`: root and the daemon's own user, nobody else. The socket's file mode says
/// the same; this holds even if someone loosens it or the socket lives elsewhere.
pub(crate) fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

async fn serve(sock: UnixStream, media: Arc<Admin>) {
    let own = effective_uid();
    let refused = match sock.peer_cred() {
        Ok(c) if peer_allowed(c.uid(), own) => None,
        Ok(c) => Some(format!("uid {}", c.uid())),
        Err(e) => Some(format!("unknown peer ({e})")),
    };
    let (r, mut w) = sock.into_split();
    let mut line = String::new();
    // One short line; a peer sending more is cut off rather than buffered. Read before
    // a refusal too: closing on an unread request would reset the connection, and the
    // peer would see a broken pipe instead of the answer.
    let mut r = BufReader::new(r).take(4096);
    if r.read_line(&mut line).await.is_err() {
        return;
    }
    let answer = match refused {
        Some(who) => {
            warn!("admin connection from {who} refused: only root and uid {own} may use it");
            "error permission denied\n".to_owned()
        }
        None => tokio::task::spawn_blocking(move || media.handle(line.trim()))
            .await
            .unwrap_or_else(|e| format!("error {e}\n")),
    };
    let _ = w.write_all(answer.as_bytes()).await;
    let _ = w.shutdown().await;
}

/// Sends one request to the admin socket at `path` and returns the answer.
pub fn request(path: &Path, line: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::disk::{Disk, SimFault, SimFs};

    fn handles(fs: &SimFs) -> (MediaHandles, Arc<MirrorSet>) {
        let disks: Vec<(PathBuf, Box<dyn Disk>)> = ["a", "b"]
            .iter()
            .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
            .collect();
        let set = Arc::new(MirrorSet::open_disks(disks, 64, 512).expect("open"));
        let h = MediaHandles {
            volumes: vec![("vol".into(), Arc::clone(&set))],
            ..MediaHandles::default()
        };
        (h, set)
    }

    fn admin_with_sessions() -> Admin {
        let shared = Arc::new(Shared::new(
            crate::config::Config::default_config(),
            Vec::new(),
        ));
        let (tsih, _rx) = shared
            .registry
            .register("iqn.x", [0x80, 0, 0, 0, 0, 1], Some("iqn.t"), 7, 8)
            .expect("room");
        shared
            .registry
            .set_peer(tsih, 7, "10.0.0.9:51000".parse().expect("addr"));
        Admin {
            media: MediaHandles::default(),
            shared,
            runtime: std::sync::Mutex::new(RuntimeState::default()),
        }
    }

    #[test]
    fn sessions_answer_in_text_and_json() {
        let a = admin_with_sessions();
        let text = a.handle("sessions");
        assert!(text.starts_with("ok\n"), "{text}");
        assert!(
            text.contains("session tsih=1 initiator=iqn.x isid=800000000001 target=iqn.t peer=10.0.0.9:51000 since="),
            "{text}"
        );
        let json = a.handle("json sessions");
        let body = json.strip_prefix("ok\n").expect("ok");
        let v: serde_json::Value = serde_json::from_str(body).expect("one JSON line");
        let s = &v["sessions"][0];
        assert_eq!(s["initiator"], "iqn.x");
        assert_eq!(s["isid"], "800000000001");
        assert_eq!(s["tsih"], 1);
        assert_eq!(s["target"], "iqn.t");
        assert_eq!(s["peer"], "10.0.0.9:51000");
        assert!(s["since_unix_s"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000));
    }

    #[test]
    fn json_listings_parse_and_other_requests_are_refused() {
        let a = admin_with_sessions();
        for what in ["status", "luns"] {
            let ans = a.handle(&format!("json {what}"));
            let body = ans.strip_prefix("ok\n").expect(&ans);
            let _: serde_json::Value = serde_json::from_str(body).expect(what);
        }
        // Text answers stay as they were.
        assert_eq!(a.handle("status"), "ok\n");
        for r in [
            "json scrub vol",
            "json queues",
            "json nodes",
            "queues",
            "frob",
        ] {
            assert!(a.handle(r).starts_with("error"), "{r}");
        }
    }

    #[test]
    fn config_effective_shows_the_config_in_force_without_secrets() {
        let a = admin_with_sessions();
        let mut c = crate::config::Config::default_config();
        c.targets[0].initiators = Some(vec!["iqn.2026-12.x:reloaded".into()]);
        c.targets[0].chap = Some(crate::config::ChapConfig {
            username: "u".into(),
            secret: "very-secret-1".into(),
            mutual_username: None,
            mutual_secret: None,
        });
        a.shared.set_in_force(c);
        let text = a.handle("config effective");
        let body = text.strip_prefix("ok\n").expect(&text);
        assert!(body.contains("iqn.2026-12.x:reloaded"), "{body}");
        assert!(!body.contains("very-secret-1"), "{body}");
        assert!(body.contains("<hidden secret>"), "{body}");
        // The TOML part parses back as a configuration.
        let back = crate::config::Config::parse(body).expect("the TOML parses");
        assert_eq!(
            back.targets[0].initiators,
            Some(vec!["iqn.2026-12.x:reloaded".into()])
        );
        let json = a.handle("json config effective");
        let v: serde_json::Value =
            serde_json::from_str(json.strip_prefix("ok\n").expect(&json)).expect("JSON");
        assert_eq!(
            v["config"]["target"][0]["chap"]["secret"],
            "<hidden secret>"
        );
        assert!(v["runtime"]["registered_nodes"].as_array().is_some());
    }

    #[test]
    fn only_root_and_the_daemons_user_pass_the_peer_check() {
        let me = effective_uid();
        assert!(peer_allowed(0, me), "root");
        assert!(peer_allowed(me, me), "the daemon's own user");
        assert!(peer_allowed(1000, 1000));
        assert!(
            peer_allowed(0, 1000),
            "root, for a daemon not running as root"
        );
        let other = if me == 65534 { 65533 } else { 65534 };
        assert!(
            !peer_allowed(other, me),
            "uid {other} for a daemon of uid {me}"
        );
        assert!(!peer_allowed(1001, 1000));
    }

    #[test]
    fn rebuild_refusals_are_clear_errors() {
        let fs = SimFs::new(1);
        let (h, set) = handles(&fs);
        let a = h.handle("rebuild vol 1");
        assert!(a.starts_with("error") && a.contains("is healthy"), "{a}");
        fs.fail_next("b", SimFault::Write, 1);
        set.write(0, &[1u8; 512]).expect("a takes it");
        let a = h.handle("rebuild vol 0");
        assert!(
            a.starts_with("error") && a.contains("last healthy mirror"),
            "{a}"
        );
        assert_eq!(set.status()[0].state, MirrorState::Healthy);
        let a = h.handle("rebuild vol 1 0");
        assert!(a.starts_with("ok"), "{a}");
        for _ in 0..2000 {
            if set.status()[1].state == MirrorState::Healthy {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("rebuild did not finish: {:?}", set.status());
    }
}

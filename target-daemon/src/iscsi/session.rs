//! Sessions: the registry that hands out TSIHs and reinstates sessions, and the context
//! a connection task runs with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::scsi::{ItNexus, ScsiTarget};

/// One configured iSCSI target.
pub(crate) struct TargetEntry {
    pub(crate) iqn: String,
    pub(crate) alias: Option<String>,
    pub(crate) scsi: Arc<ScsiTarget>,
    /// Connections of this target in the full feature phase (for the metrics).
    pub(crate) connections: AtomicU64,
}

/// Counts one full-feature connection of a target while it lives.
pub(crate) struct ConnectionCount(Arc<TargetEntry>);

impl ConnectionCount {
    pub(crate) fn new(t: Arc<TargetEntry>) -> Self {
        t.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionCount(t)
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// State shared by every connection of the daemon.
pub(crate) struct Shared {
    /// The configuration the daemon started with: portals, limits, media. What a reload
    /// may change (ACLs, CHAP secrets, nodes) is read from [`Self::in_force`] instead.
    pub(crate) config: Config,
    /// The configuration last accepted (at start or by a reload); logins take a snapshot.
    in_force: std::sync::RwLock<Arc<Config>>,
    pub(crate) targets: Vec<Arc<TargetEntry>>,
    /// The portals as bound (the real port where the configuration said 0), set once
    /// they listen; SendTargets answers list them.
    portals: std::sync::OnceLock<Vec<SocketAddr>>,
    pub(crate) registry: Registry,
    next_nexus: AtomicU64,
    /// Connections being served (login or full feature phase, until their commands
    /// drained), so a graceful shutdown knows when the last one is gone.
    pub(crate) live: LiveConnections,
}

/// A count of live connections that can be awaited down to zero.
#[derive(Default)]
pub(crate) struct LiveConnections {
    n: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// Held by a connection's task for as long as it lives.
pub(crate) struct LiveGuard(Arc<Shared>);

impl LiveConnections {
    /// Counts a connection until the guard drops.
    pub(crate) fn enter(shared: &Arc<Shared>) -> LiveGuard {
        shared.live.n.fetch_add(1, Ordering::AcqRel);
        LiveGuard(Arc::clone(shared))
    }

    /// Connections alive now.
    pub(crate) fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    /// Waits until no connection is left; false if `timeout` passed first.
    pub(crate) async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.n.fetch_sub(1, Ordering::AcqRel);
        self.0.live.changed.notify_waiters();
    }
}

impl Shared {
    pub(crate) fn new(config: Config, targets: Vec<Arc<TargetEntry>>) -> Self {
        Self {
            in_force: std::sync::RwLock::new(Arc::new(config.clone())),
            config,
            targets,
            portals: std::sync::OnceLock::new(),
            registry: Registry::default(),
            next_nexus: AtomicU64::new(1),
            live: LiveConnections::default(),
        }
    }

    /// The configuration in force now, for ACL and CHAP decisions.
    pub(crate) fn in_force(&self) -> Arc<Config> {
        // Only whole Arcs are swapped under this lock, so a poisoned one is still whole.
        Arc::clone(
            &self
                .in_force
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Puts `config` in force for new logins and returns the one it replaces; live
    /// sessions are not touched.
    pub(crate) fn set_in_force(&self, config: Config) -> Arc<Config> {
        let mut g = self
            .in_force
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *g, Arc::new(config))
    }

    /// Records the portals as bound, for SendTargets, and puts them in the configuration
    /// in force (so `config effective` and a reload see the real ports). Set once, before
    /// the first connection is accepted; a second call changes nothing.
    pub(crate) fn set_portals(&self, bound: Vec<SocketAddr>) {
        let mut config = (*self.in_force()).clone();
        config.server.portals = bound.iter().map(ToString::to_string).collect();
        if self.portals.set(bound).is_ok() {
            self.set_in_force(config);
        }
    }

    pub(crate) fn target(&self, iqn: &str) -> Option<&Arc<TargetEntry>> {
        self.targets
            .iter()
            .find(|t| t.iqn.eq_ignore_ascii_case(iqn))
    }

    pub(crate) fn next_nexus_id(&self) -> u64 {
        self.next_nexus.fetch_add(1, Ordering::Relaxed)
    }

    /// SendTargets answer text for `initiator`: `value` is "All", a target name, or empty
    /// (the session's own target). Only targets the ACL shows are listed.
    pub(crate) fn send_targets(
        &self,
        initiator: &str,
        value: &str,
        session_target: Option<&str>,
        local: SocketAddr,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let live = self.in_force();
        for t in &self.targets {
            let wanted = match value {
                "All" => {
                    session_target.is_none()
                        || session_target.is_some_and(|s| s.eq_ignore_ascii_case(&t.iqn))
                }
                "" => session_target.is_some_and(|s| s.eq_ignore_ascii_case(&t.iqn)),
                name => name.eq_ignore_ascii_case(&t.iqn),
            };
            if !wanted || !live.target_allows(&t.iqn, initiator) {
                continue;
            }
            out.push(("TargetName".to_owned(), t.iqn.clone()));
            for addr in self.portals.get().into_iter().flatten() {
                // A wildcard portal is advertised as the address this connection reached.
                let ip = if addr.ip().is_unspecified() {
                    local.ip()
                } else {
                    addr.ip()
                };
                let a = SocketAddr::new(ip, addr.port());
                out.push(("TargetAddress".to_owned(), format!("{a},1")));
            }
        }
        out
    }
}

/// What a session is for.
pub(crate) enum SessionKind {
    /// SendTargets only.
    Discovery,
    /// I/O to one target's LUNs.
    Normal(Arc<ScsiTarget>),
}

/// Everything a connection task needs about its session.
pub(crate) struct SessionCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) kind: SessionKind,
    pub(crate) target_iqn: Option<String>,
    pub(crate) nexus: ItNexus,
    pub(crate) tsih: u16,
    pub(crate) local: SocketAddr,
    pub(crate) cmd_window: u32,
    pub(crate) nop_interval_s: u32,
    pub(crate) nop_timeout_s: u32,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Set once the session's I_T nexus state has been released.
    pub(crate) released: AtomicBool,
}

impl SessionCtx {
    /// Releases the session's I_T nexus state (registration, removal prevention,
    /// reservations, copies) once: at logout before the Logout Response goes out, so
    /// an initiator that logs straight back in never meets its old session's state,
    /// and again (a no-op) when the connection ends.
    pub(crate) fn connection_closed(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.registry.remove(self.tsih, self.nexus.id);
        if let SessionKind::Normal(scsi) = &self.kind {
            scsi.nexus_removed(&self.nexus);
        }
        info!(initiator = %self.nexus.initiator_name, tsih = self.tsih, "session closed");
    }

    /// TARGET COLD RESET: every session of this target closes.
    pub(crate) fn target_cold_reset(&self) {
        if let Some(t) = &self.target_iqn {
            self.shared.registry.close_target(t);
        }
    }

    /// Answers a full-feature Text Request.
    pub(crate) fn text_answer(&self, request: &[u8]) -> Vec<u8> {
        super::text_answer(self, request)
    }
}

struct Entry {
    initiator: String,
    isid: [u8; 6],
    target: Option<String>,
    nexus_id: u64,
    shutdown: watch::Sender<bool>,
    /// The initiator's address, once the connection task knows it.
    peer: Option<SocketAddr>,
    /// When the session entered the full feature phase.
    since: std::time::SystemTime,
}

/// One live session as `admin sessions` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct SessionInfo {
    pub(crate) initiator: String,
    /// The ISID as 12 hex digits.
    pub(crate) isid: String,
    pub(crate) tsih: u16,
    /// `None` for a discovery session.
    pub(crate) target: Option<String>,
    pub(crate) peer: Option<String>,
    /// Seconds since the Unix epoch.
    pub(crate) since_unix_s: u64,
}

/// Live sessions by TSIH.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_tsih: u16,
    sessions: HashMap<u16, Entry>,
    /// Set by a graceful shutdown: no new sessions.
    closing: bool,
}

/// Why a session could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RegisterError {
    /// `server.sessions_max` reached.
    TooMany,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the map consistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new session, reinstating (closing) any session with the same
    /// initiator name, ISID and target (RFC 7143 6.3.5). Does not wait for the old
    /// session's connection to finish: it is told to close and goes on its own.
    pub(crate) fn register(
        &self,
        initiator: &str,
        isid: [u8; 6],
        target: Option<&str>,
        nexus_id: u64,
        sessions_max: u32,
    ) -> Result<(u16, watch::Receiver<bool>), RegisterError> {
        let mut g = self.lock();
        if g.closing {
            return Err(RegisterError::ShuttingDown);
        }
        let old: Vec<u16> = g
            .sessions
            .iter()
            .filter(|(_, e)| {
                e.isid == isid
                    && e.initiator.eq_ignore_ascii_case(initiator)
                    && match (&e.target, target) {
                        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                        (None, None) => true,
                        _ => false,
                    }
            })
            .map(|(&t, _)| t)
            .collect();
        for t in old {
            if let Some(e) = g.sessions.remove(&t) {
                info!(
                    initiator,
                    tsih = t,
                    "session reinstatement: closing the old session"
                );
                let _ = e.shutdown.send(true);
            }
        }
        if g.sessions.len() >= sessions_max as usize {
            return Err(RegisterError::TooMany);
        }
        let tsih = loop {
            g.next_tsih = g.next_tsih.wrapping_add(1);
            let t = g.next_tsih;
            if t != 0 && !g.sessions.contains_key(&t) {
                break t;
            }
        };
        let (tx, rx) = watch::channel(false);
        g.sessions.insert(
            tsih,
            Entry {
                initiator: initiator.to_owned(),
                isid,
                target: target.map(str::to_owned),
                nexus_id,
                shutdown: tx,
                peer: None,
                since: std::time::SystemTime::now(),
            },
        );
        Ok((tsih, rx))
    }

    /// Forgets a session, if it is still the one registered under `tsih`.
    pub(crate) fn remove(&self, tsih: u16, nexus_id: u64) {
        let mut g = self.lock();
        if g.sessions
            .get(&tsih)
            .is_some_and(|e| e.nexus_id == nexus_id)
        {
            g.sessions.remove(&tsih);
        }
    }

    /// Notes the initiator's address of the session registered under `tsih`, if it is
    /// still the one of `nexus_id` (login does not see the socket's peer).
    pub(crate) fn set_peer(&self, tsih: u16, nexus_id: u64, peer: SocketAddr) {
        let mut g = self.lock();
        if let Some(e) = g.sessions.get_mut(&tsih) {
            if e.nexus_id == nexus_id {
                e.peer = Some(peer);
            }
        }
    }

    /// Every live session, by TSIH.
    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        let g = self.lock();
        let mut out: Vec<SessionInfo> = g
            .sessions
            .iter()
            .map(|(&tsih, e)| SessionInfo {
                initiator: e.initiator.clone(),
                isid: e.isid.iter().map(|b| format!("{b:02x}")).collect(),
                tsih,
                target: e.target.clone(),
                peer: e.peer.map(|p| p.to_string()),
                since_unix_s: e
                    .since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })
            .collect();
        out.sort_by_key(|s| s.tsih);
        out
    }

    /// Whether any session is logged in to `target`.
    pub(crate) fn has_target(&self, target: &str) -> bool {
        self.lock().sessions.values().any(|e| {
            e.target
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(target))
        })
    }

    /// Live sessions per target name (`None`: discovery sessions).
    pub(crate) fn sessions_by_target(&self) -> Vec<(Option<String>, u64)> {
        let g = self.lock();
        let mut out: Vec<(Option<String>, u64)> = Vec::new();
        for e in g.sessions.values() {
            match out.iter_mut().find(|(t, _)| {
                t.as_deref().map(str::to_ascii_lowercase)
                    == e.target.as_deref().map(str::to_ascii_lowercase)
            }) {
                Some((_, n)) => *n += 1,
                None => out.push((e.target.clone(), 1)),
            }
        }
        out
    }

    /// Whether a session with this TSIH exists.
    pub(crate) fn contains(&self, tsih: u16) -> bool {
        self.lock().sessions.contains_key(&tsih)
    }

    /// Graceful shutdown: refuses new sessions from now on and tells every session to
    /// close (each finishes the commands it is executing first). Returns how many.
    pub(crate) fn close_all(&self) -> usize {
        let mut g = self.lock();
        g.closing = true;
        for e in g.sessions.values() {
            let _ = e.shutdown.send(true);
        }
        g.sessions.len()
    }

    /// Tells every session of `target` to close.
    pub(crate) fn close_target(&self, target: &str) {
        let g = self.lock();
        for e in g.sessions.values() {
            if e.target
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(target))
            {
                let _ = e.shutdown.send(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reinstatement_closes_the_old_session() {
        let r = Registry::default();
        let (t1, rx1) = r
            .register("iqn.a", [1; 6], Some("iqn.t"), 1, 8)
            .expect("room");
        let (t2, rx2) = r
            .register("iqn.a", [2; 6], Some("iqn.t"), 2, 8)
            .expect("room");
        assert_ne!(t1, t2);
        assert!(!*rx1.borrow());
        let (t3, _rx3) = r
            .register("IQN.A", [1; 6], Some("iqn.t"), 3, 8)
            .expect("room");
        assert!(*rx1.borrow(), "old session told to close");
        assert!(!*rx2.borrow(), "other ISID untouched");
        assert!(!r.contains(t1));
        assert!(r.contains(t3));
        // The old connection's late cleanup must not remove the new session.
        r.remove(t1, 1);
        assert!(r.contains(t3));
    }

    #[test]
    fn list_shows_each_session_with_its_peer() {
        let r = Registry::default();
        let (t1, _rx1) = r
            .register("iqn.a", [0, 1, 2, 3, 4, 0xab], Some("iqn.t"), 1, 8)
            .expect("room");
        let (t2, _rx2) = r.register("iqn.b", [9; 6], None, 2, 8).expect("room");
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        r.set_peer(t1, 1, peer);
        // A stale nexus id must not annotate a newer session.
        r.set_peer(t2, 99, peer);
        let l = r.list();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].initiator, "iqn.a");
        assert_eq!(l[0].isid, "0001020304ab");
        assert_eq!(l[0].target.as_deref(), Some("iqn.t"));
        assert_eq!(l[0].peer.as_deref(), Some("127.0.0.1:4000"));
        assert!(l[0].since_unix_s > 1_600_000_000);
        assert_eq!(l[1].target, None);
        assert_eq!(l[1].peer, None);
    }

    #[test]
    fn session_limit() {
        let r = Registry::default();
        r.register("iqn.a", [1; 6], None, 1, 1).expect("room");
        assert_eq!(
            r.register("iqn.b", [1; 6], None, 2, 1).err(),
            Some(RegisterError::TooMany)
        );
    }
}

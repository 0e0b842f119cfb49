//! Redundant paths: one session per target portal, all in one node, used one at a time.
//!
//! A command runs on the current path. When that path's connection fails, the command's
//! error goes back to the caller (the command may or may not have been carried out: the
//! packet API retries SEND with the same packet ids, and a [`Receiver`](crate::Receiver)
//! catches up with REPLAY), and the next command takes the next path. A failed path is
//! logged in again the next time it is chosen. Every new session registers the node's
//! addresses, so the target counts it as the same node and delivers on whichever session
//! asks. A failed path is logged in again in the background at once, so the node keeps
//! a live session even when the paths fail one after the other.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ftss_proto::vendor::{AddressList, NodeAddr, NodeCdb};
use tokio::sync::{mpsc, Mutex};
use tracing::{info, warn};

use crate::transport::Transport;
use crate::{Error, ScsiResult, Session, SessionConfig};

struct Path {
    portal: SocketAddr,
    config: SessionConfig,
    session: Mutex<Option<Arc<Session>>>,
}

/// A [`Transport`] over several portals of one target.
pub struct MultipathTransport {
    paths: Vec<Path>,
    current: AtomicUsize,
    lun: u16,
    addrs: Vec<IpAddr>,
    /// Sessions opened (first logins and reconnects).
    pub logins: AtomicU64,
    /// Times a command found its path broken and the transport moved on.
    pub failovers: AtomicU64,
    /// Failed paths to log in again.
    heal: mpsc::UnboundedSender<usize>,
}

impl MultipathTransport {
    /// Paths to `portals` (one session each, logged in on first use), commands on `lun`,
    /// registering `addrs` on every session. Each path gets its own ISID, so the target
    /// sees separate sessions rather than one reinstating the other.
    ///
    /// Must be called inside a tokio runtime: it starts the task that logs failed paths
    /// in again (it ends when the transport is dropped).
    pub fn new(
        portals: &[SocketAddr],
        config: &SessionConfig,
        lun: u16,
        addrs: &[IpAddr],
    ) -> Result<Arc<Self>, Error> {
        if portals.is_empty() {
            return Err(Error::InvalidArgument("no portals".into()));
        }
        let paths = portals
            .iter()
            .enumerate()
            .map(|(i, &portal)| {
                let mut c = config.clone();
                c.isid[5] = c.isid[5].wrapping_add(i as u8);
                Path {
                    portal,
                    config: c,
                    session: Mutex::new(None),
                }
            })
            .collect();
        let (heal, mut failed) = mpsc::unbounded_channel::<usize>();
        let t = Arc::new(MultipathTransport {
            paths,
            current: AtomicUsize::new(0),
            lun,
            addrs: addrs.to_vec(),
            logins: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            heal,
        });
        let weak = Arc::downgrade(&t);
        tokio::spawn(async move {
            while let Some(i) = failed.recv().await {
                let mut backoff = std::time::Duration::from_millis(20);
                loop {
                    let Some(t) = weak.upgrade() else {
                        return;
                    };
                    if t.session(i).await.is_ok() {
                        break;
                    }
                    drop(t);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                }
            }
        });
        Ok(t)
    }

    /// Logs in every path now (instead of on first use); errors are only logged.
    pub async fn connect_all(&self) {
        for i in 0..self.paths.len() {
            if let Err(e) = self.session(i).await {
                warn!(portal = %self.paths[i].portal, "path down: {e}");
            }
        }
    }

    /// Logs out every path's session (best effort: the target also cleans up a dropped
    /// connection). A path that fails later is logged in again as usual.
    pub async fn logout_all(&self) {
        for p in &self.paths {
            let s = p.session.lock().await.take();
            if let Some(s) = s {
                if let Err(e) = s.logout().await {
                    tracing::debug!(portal = %p.portal, "logout: {e}");
                }
            }
        }
    }

    /// Path `i`'s session, logging in (and registering the node) if it has none.
    async fn session(&self, i: usize) -> Result<Arc<Session>, Error> {
        let p = &self.paths[i];
        let mut slot = p.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(Session::connect(p.portal, p.config.clone()).await?);
        if !self.addrs.is_empty() {
            let list = AddressList {
                addrs: self.addrs.iter().map(|&a| NodeAddr::from(a)).collect(),
            }
            .encode();
            let cdb = NodeCdb::Register {
                param_len: list.len() as u32,
            }
            .encode();
            // The first command of a new session may meet a unit attention.
            let mut done = false;
            for _ in 0..3 {
                let r = s
                    .execute(self.lun, &cdb, Some(Bytes::from(list.clone())), 0)
                    .await?;
                if r.status == 0 {
                    done = true;
                    break;
                }
            }
            if !done {
                return Err(Error::Protocol(format!(
                    "NODE REGISTER refused on {}",
                    p.portal
                )));
            }
        }
        self.logins.fetch_add(1, Ordering::Relaxed);
        info!(portal = %p.portal, "path up");
        *slot = Some(Arc::clone(&s));
        Ok(s)
    }

    async fn run(
        &self,
        cdb: Vec<u8>,
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        let n = self.paths.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = Error::ConnectionClosed;
        for k in 0..n {
            let i = (start + k) % n;
            // A path that cannot log in is skipped: nothing was sent on it.
            let s = match self.session(i).await {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            self.current.store(i, Ordering::Relaxed);
            return match s.execute(self.lun, &cdb, data_out, data_in_len).await {
                Err(e) if e.is_connection_error() => {
                    // Sent, fate unknown: the caller decides (same packet ids, REPLAY).
                    *self.paths[i].session.lock().await = None;
                    let _ = self.heal.send(i);
                    self.current.store((i + 1) % n, Ordering::Relaxed);
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    warn!(portal = %self.paths[i].portal, "path failed: {e}");
                    Err(e)
                }
                r => r,
            };
        }
        Err(last)
    }
}

impl Transport for MultipathTransport {
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
        self.run(cdb.to_vec(), data_out, data_in_len)
    }
}

impl std::fmt::Debug for MultipathTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultipathTransport")
            .field(
                "portals",
                &self.paths.iter().map(|p| p.portal).collect::<Vec<_>>(),
            )
            .finish()
    }
}

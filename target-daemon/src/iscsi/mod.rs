//! The iSCSI transport: listeners, login, sessions and connections (RFC 7143).
//!
//! [`Server::start`] binds every portal and serves until dropped or shut down. Each
//! accepted connection runs the login phase (`login`) and then the full feature phase
//! (`connection`) in its own task; a bad connection never disturbs the others.

pub(crate) mod connection;
pub(crate) mod login;
pub(crate) mod session;
pub(crate) mod transfer;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
pub(crate) use session::TargetEntry;
use session::{SessionCtx, Shared};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A portal could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The portal.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The metrics endpoint could not be bound.
    #[error("metrics endpoint (server.metrics) {addr}: {source}")]
    Metrics {
        /// The configured address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A LUN's backing store could not be opened.
    #[error("target {iqn} LUN {lun}: {msg}")]
    Lun {
        /// Target IQN.
        iqn: String,
        /// LUN number.
        lun: u16,
        /// What went wrong.
        msg: String,
    },
}

/// A running target server.
pub struct Server {
    addrs: Vec<SocketAddr>,
    admin_path: std::path::PathBuf,
    media: crate::admin::MediaHandles,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Whether an ACL, CHAP secret or node changed.
    pub changed: bool,
    /// Keys changed in the file that take effect only at a restart.
    pub restart_needed: Vec<String>,
    /// Initiators of the nodes added.
    pub nodes_added: Vec<String>,
    /// LUNs added, as `<iqn>/<lun>`.
    pub luns_added: Vec<String>,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions told to close.
    pub sessions: usize,
    /// Connections still alive when the wait for them ended (0: every command finished).
    pub connections_left: usize,
    /// Write cache bytes not yet on the mirrors when the connections were gone.
    pub dirty_bytes: u64,
    /// Whether the write cache destaged everything before the timeout.
    pub destaged: bool,
}

impl Server {
    /// Opens every LUN, binds every portal and starts accepting connections.
    pub async fn start(mut config: Config) -> Result<Server, ServerError> {
        let (targets, media) = crate::media_setup::open_targets(&config)?;
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for addr in config.portal_addrs() {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let local = l
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            info!("listening on {local}");
            addrs.push(local);
            listeners.push(l);
        }
        // SendTargets advertises the portals as bound, so a port 0 in the config (tests,
        // ephemeral deployments) is answered with the real port.
        config.server.portals = addrs.iter().map(ToString::to_string).collect();
        let shared = Arc::new(Shared::new(config, targets));
        let (stop, stop_rx) = watch::channel(false);
        let admin_path = config_admin_path(&shared);
        let mut tasks: Vec<_> = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(l, Arc::clone(&shared), stop_rx.clone())))
            .collect();
        let runtime = restore_runtime_luns(&shared)?;
        let handler = crate::admin::Admin {
            media: media.clone(),
            shared: Arc::clone(&shared),
            runtime: std::sync::Mutex::new(runtime),
        };
        let admin =
            crate::admin::start(&admin_path, handler, stop_rx).map_err(|e| ServerError::Lun {
                iqn: String::new(),
                lun: 0,
                msg: format!("admin socket {}: {e}", admin_path.display()),
            })?;
        tasks.push(admin);
        info!("admin socket {}", admin_path.display());
        let metrics_addr = match shared.config.metrics_addr() {
            Some(addr) => {
                let (local, task) = crate::metrics::start(
                    addr,
                    media.clone(),
                    Arc::clone(&shared),
                    stop.subscribe(),
                )
                .await
                .map_err(|source| ServerError::Metrics { addr, source })?;
                info!("metrics on http://{local}/metrics");
                tasks.push(task);
                Some(local)
            }
            None => None,
        };
        Ok(Server {
            addrs,
            stop,
            tasks,
            admin_path,
            media,
            shared,
            metrics_addr,
        })
    }

    /// Puts the reloadable parts of `new` in force (ACLs, CHAP secrets, new nodes) for
    /// the logins that follow, and opens and adds its new plain-file LUNs (the target's
    /// sessions hear REPORTED LUNS DATA HAS CHANGED); live sessions stay up. Refused, with the key at
    /// fault, when the file changes what a reload cannot (see [`crate::reload`]):
    /// nothing changes then.
    pub fn reload(&self, new: Config) -> Result<ReloadReport, ConfigError> {
        let running = self.shared.in_force();
        let plan = crate::reload::plan(&running, new)?;
        // Storage first: opening a file is what most likely fails, and nothing has
        // changed yet when it does.
        let dir = &self.shared.config.server.data_dir;
        let mut new_luns = Vec::new();
        for (iqn, key, l) in &plan.luns_added {
            let invalid = |msg: String| ConfigError::Invalid {
                key: key.clone(),
                msg,
            };
            let target = self
                .shared
                .target(iqn)
                .ok_or_else(|| invalid(format!("no target {iqn}")))?;
            let path = l.path.as_deref().ok_or_else(|| invalid("no path".into()))?;
            let store = crate::media_setup::open_file_lun(dir, path, l).map_err(invalid)?;
            let spec = crate::scsi::LunSpec {
                lun: u64::from(l.lun),
                store,
                read_only: l.read_only,
                removable: l.removable,
                initiators: l.initiators.clone(),
            };
            new_luns.push((Arc::clone(target), key.clone(), spec));
        }
        if !plan.nodes_added.is_empty() {
            let Some(agent) = &self.media.agent else {
                let (i, _, _) = &plan.nodes_added[0];
                return Err(ConfigError::Invalid {
                    key: format!("node[{i}]"),
                    msg: "nodes need [packets], which a reload cannot add".into(),
                });
            };
            // Validated with the file: every address parses.
            let nodes: Vec<_> = plan
                .nodes_added
                .iter()
                .map(|(i, initiator, addrs)| {
                    let addrs = addrs
                        .iter()
                        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                        .map(ftss_proto::vendor::NodeAddr::from)
                        .collect();
                    (*i, initiator.clone(), addrs)
                })
                .collect();
            agent
                .add_configured(&nodes)
                .map_err(|(i, msg)| ConfigError::Invalid {
                    key: format!("node[{i}].addresses"),
                    msg,
                })?;
        }
        let mut luns_added = Vec::new();
        for (target, key, spec) in new_luns {
            let n = spec.lun;
            target
                .scsi
                .add_lun(spec, dir)
                .map_err(|e| ConfigError::Invalid {
                    key,
                    msg: e.to_string(),
                })?;
            info!(target = %target.iqn, lun = n, "LUN added by reload");
            luns_added.push(format!("{}/{n}", target.iqn));
        }
        let nodes_added = plan.nodes_added.into_iter().map(|(_, n, _)| n).collect();
        self.shared.set_in_force(plan.config);
        Ok(ReloadReport {
            changed: plan.changed,
            restart_needed: plan.restart_needed,
            nodes_added,
            luns_added,
        })
    }

    /// The bound portal addresses (with the real port when the config said port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The write cache and mirror sets behind the LUNs (what the admin socket manages).
    pub fn media(&self) -> &crate::admin::MediaHandles {
        &self.media
    }

    /// The metrics endpoint's bound address, when `server.metrics` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin socket's path.
    pub fn admin_path(&self) -> &std::path::Path {
        &self.admin_path
    }

    /// Stops accepting connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Graceful shutdown: stops accepting connections (and drops logins under way),
    /// closes every session once the commands it is executing finish, waits up to
    /// `timeout` for that, then up to `timeout` again for the write cache to destage
    /// everything to the mirrors, so a restart begins with an empty cache.
    pub async fn shutdown_gracefully(self, timeout: std::time::Duration) -> ShutdownReport {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let sessions = self.shared.registry.close_all();
        self.shared.live.wait_idle(timeout).await;
        let connections_left = self.shared.live.count();
        let (dirty_bytes, destaged) = match &self.media.cache {
            Some(cache) => {
                let dirty = cache.stats().dirty_bytes;
                let c = Arc::clone(cache);
                let destaged = tokio::task::spawn_blocking(move || {
                    let ok = c.drain(timeout);
                    c.shutdown();
                    ok
                })
                .await
                .unwrap_or(false);
                (dirty, destaged)
            }
            None => (0, true),
        };
        ShutdownReport {
            sessions,
            connections_left,
            dirty_bytes,
            destaged,
        }
    }
}

/// Serves again the LUNs `admin luns add` created in earlier runs. A missing file stops
/// the start (an empty LUN in its place would hide lost data); a LUN the configuration
/// file now defines itself is the file's, and its run-time record is left unused.
fn restore_runtime_luns(shared: &Shared) -> Result<crate::runtime_luns::RuntimeState, ServerError> {
    use crate::runtime_luns::RuntimeState;
    let dir = &shared.config.server.data_dir;
    let err = |iqn: &str, lun: u16, msg: String| ServerError::Lun {
        iqn: iqn.to_owned(),
        lun,
        msg: format!(
            "{} (added at run time): {msg}",
            crate::runtime_luns::FILE_NAME
        ),
    };
    let state = RuntimeState::load(dir).map_err(|e| err("", 0, e.to_string()))?;
    for l in &state.luns {
        let Some(t) = shared.target(&l.target) else {
            return Err(err(
                &l.target,
                l.lun,
                "the target is no longer configured".into(),
            ));
        };
        if t.scsi.lun_exists(u64::from(l.lun)) {
            warn!(target = %l.target, lun = l.lun, "LUN added at run time is now in the configuration file; the file's definition is served");
            continue;
        }
        let path = if l.path.is_absolute() {
            l.path.clone()
        } else {
            dir.join(&l.path)
        };
        if !path.exists() {
            return Err(err(
                &l.target,
                l.lun,
                format!("{} is missing", path.display()),
            ));
        }
        let store =
            crate::media_setup::open_runtime_lun(dir, l).map_err(|m| err(&l.target, l.lun, m))?;
        t.scsi
            .add_lun(crate::media_setup::runtime_spec(l, store), dir)
            .map_err(|e| err(&l.target, l.lun, e.to_string()))?;
        info!(target = %l.target, lun = l.lun, "LUN added at run time restored");
    }
    Ok(state)
}

fn config_admin_path(shared: &Shared) -> std::path::PathBuf {
    let s = &shared.config.server;
    if s.admin_socket.is_absolute() {
        s.admin_socket.clone()
    } else {
        s.data_dir.join(&s.admin_socket)
    }
}

async fn accept_loop(l: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((sock, peer)) => {
                    debug!("connection from {peer}");
                    let shared = Arc::clone(&shared);
                    let stop = stop.clone();
                    tokio::spawn(async move { serve(sock, peer, shared, stop).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn serve(
    sock: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _live = session::LiveConnections::enter(&shared);
    let _ = sock.set_nodelay(true);
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let (mut rd, mut wr) = sock.into_split();
    // A login still under way when the daemon stops has no session to finish: drop it,
    // or a client that connected and said nothing would hold the shutdown.
    let login = tokio::select! {
        r = login::run(&mut rd, &mut wr, &shared, local) => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    let done = match login {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(e) => {
            debug!("login from {peer} ended: {e}");
            return;
        }
    };
    let ctx = Arc::new(SessionCtx {
        shared: Arc::clone(&shared),
        kind: done.kind,
        target_iqn: done.target_iqn,
        nexus: done.nexus,
        tsih: done.tsih,
        local,
        cmd_window: shared.config.server.cmd_window,
        nop_interval_s: shared.config.server.nop_interval_s,
        nop_timeout_s: shared.config.server.nop_timeout_s,
        shutdown: done.shutdown,
        released: std::sync::atomic::AtomicBool::new(false),
    });
    shared.registry.set_peer(ctx.tsih, ctx.nexus.id, peer);
    // Counted for the metrics until the connection's task ends.
    let _counted = ctx
        .target_iqn
        .as_deref()
        .and_then(|t| shared.target(t))
        .filter(|_| matches!(ctx.kind, session::SessionKind::Normal(_)))
        .map(|t| session::ConnectionCount::new(Arc::clone(t)));
    let (aborter, ctl_rx) = connection::control_channel();
    if let session::SessionKind::Normal(scsi) = &ctx.kind {
        scsi.nexus_added(&ctx.nexus);
        scsi.set_task_aborter(&ctx.nexus, Arc::new(aborter));
    }
    connection::run(
        ctx,
        done.params,
        done.exp_cmd_sn,
        done.stat_sn,
        rd,
        wr,
        ctl_rx,
    )
    .await;
}

/// Answers a full-feature Text Request: SendTargets; every other key is answered as the
/// RFC requires for keys not negotiable in the full feature phase.
fn text_answer(ctx: &SessionCtx, request: &[u8]) -> Vec<u8> {
    let pairs = match ftss_proto::text::parse(request) {
        Ok(p) => p,
        Err(_) => return Vec::new(),
    };
    let mut answer = Vec::new();
    for (k, v) in &pairs {
        if k == "SendTargets" {
            let target = match ctx.kind {
                session::SessionKind::Discovery => None,
                session::SessionKind::Normal(_) => ctx.target_iqn.as_deref(),
            };
            answer.extend(
                ctx.shared
                    .send_targets(&ctx.nexus.initiator_name, v, target, ctx.local),
            );
        } else {
            answer.push((k.clone(), full_feature_answer(k).to_owned()));
        }
    }
    let mut out = Vec::new();
    ftss_proto::text::encode(&answer, &mut out);
    out
}

/// The answer to a key other than SendTargets in a full-feature Text Request: this target
/// renegotiates nothing after login, so keys it knows are refused and others are not
/// understood (RFC 7143 6.2).
fn full_feature_answer(key: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "HeaderDigest",
        "DataDigest",
        "MaxConnections",
        "TargetName",
        "InitiatorName",
        "TargetAlias",
        "InitiatorAlias",
        "TargetAddress",
        "TargetPortalGroupTag",
        "InitialR2T",
        "ImmediateData",
        "MaxRecvDataSegmentLength",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
        "SessionType",
        "AuthMethod",
        "TaskReporting",
        "iSCSIProtocolLevel",
    ];
    if KNOWN.contains(&key) {
        "Reject"
    } else {
        "NotUnderstood"
    }
}

//! Daemon startup: the one place the daemon is assembled.
//!
//! [`Server::start`] resolves the configuration (each value parsed once, see
//! [`Config::resolve`]) and opens, in this order: the media (data directory, mirror sets,
//! write cache, the targets' LUNs, the LUNs added at run time), the packet queue and the
//! routing agent, the admin socket, then the portals, whose connections the transport
//! ([`crate::iscsi`]) accepts and serves; last the metrics endpoint. Initiators can
//! connect only once everything they may reach is open. [`Server::reload`] opens what a
//! SIGHUP adds, and the shutdowns close it all.

mod media;
mod packets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{Admin, MediaHandles};
use crate::config::{Config, ConfigError, ResolvedConfig};
use crate::iscsi::session::Shared;
use crate::media::MediaError;
use crate::routing::packet_queue::QueueError;
use crate::routing::AgentError;
use crate::runtime_luns::{RuntimeError, RuntimeState};
use crate::scsi::{ScsiError, VendorHandler};

/// Why the daemon did not start: each variant names what failed to open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// The configuration does not validate (the message names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be created or its mode set.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// `server.data_dir`.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A LUN's media (its file, or its mirror set's files) could not be opened.
    #[error("target {iqn} LUN {lun} ({}): {source}", show(paths))]
    LunMedia {
        /// Target IQN.
        iqn: String,
        /// LUN number.
        lun: u16,
        /// The files.
        paths: Vec<PathBuf>,
        /// Cause.
        source: MediaError,
    },
    /// A mirrored LUN has no mirror set or no write cache in front of it.
    #[error("target {iqn} LUN {lun}: mirror set missing")]
    NoMirrorSet {
        /// Target IQN.
        iqn: String,
        /// LUN number.
        lun: u16,
    },
    /// Two volumes hash to one write-cache volume id.
    #[error("volume {volume}: volume id collision: rename the target")]
    VolumeIdCollision {
        /// The volume (`<iqn>/<lun>` or `packets`).
        volume: String,
    },
    /// The packet queue's mirror set could not be opened.
    #[error("packets ({}): {source}", show(paths))]
    PacketsMedia {
        /// Its files.
        paths: Vec<PathBuf>,
        /// Cause.
        source: MediaError,
    },
    /// The write cache could not be opened or recovered.
    #[error("write cache {path}: {source}")]
    WriteCache {
        /// The cache file.
        path: PathBuf,
        /// Cause.
        source: MediaError,
    },
    /// A target could not be built over its LUNs, or its saved persistent reservations
    /// do not load.
    #[error("target {iqn}: {source}")]
    Target {
        /// Target IQN.
        iqn: String,
        /// Cause.
        source: ScsiError,
    },
    /// The packet queue could not be opened from its log.
    #[error("packet queue: {source}")]
    PacketQueue {
        /// Cause.
        source: QueueError,
    },
    /// The routing agent could not start (threads, external port, node registry).
    #[error("routing agent: {source}")]
    RoutingAgent {
        /// Cause.
        source: AgentError,
    },
    /// The record of LUNs added at run time does not load.
    #[error("{} (added at run time): {source}", crate::runtime_luns::FILE_NAME)]
    RuntimeLuns {
        /// Cause.
        source: RuntimeError,
    },
    /// A LUN added at run time cannot be served again.
    #[error(
        "target {iqn} LUN {lun}: {} (added at run time): {msg}",
        crate::runtime_luns::FILE_NAME
    )]
    RuntimeLun {
        /// Target IQN.
        iqn: String,
        /// LUN number.
        lun: u16,
        /// What went wrong.
        msg: String,
    },
    /// The admin socket could not be bound.
    #[error("admin socket {path}: {source}")]
    AdminSocket {
        /// The socket's path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A portal could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
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
}

/// Paths for an error message.
fn show(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A running daemon: its media, admin socket, portals and metrics endpoint.
pub struct Server {
    addrs: Vec<SocketAddr>,
    admin_path: PathBuf,
    media: MediaHandles,
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
    /// Opens the media, the routing agent, the admin socket and the portals, in that
    /// order, and starts serving; then the metrics endpoint when configured.
    pub async fn start(config: Config) -> Result<Server, StartupError> {
        // The fields are public: whatever the caller changed since parsing is checked
        // here, and every value below comes from this one resolution.
        let config = config.resolve()?;
        let opened = media::open(&config)?;
        let mut handles = opened.handles;
        if let (Some(cache), Some(volume)) = (&handles.cache, opened.packets) {
            if let Some(agent) = packets::start_agent(&config, cache, volume)? {
                for t in &opened.targets {
                    t.scsi
                        .set_vendor_handler(Arc::clone(&agent) as Arc<dyn VendorHandler>);
                }
                handles.agent = Some(agent);
            }
        }
        let shared = Arc::new(Shared::new(config.file.clone(), opened.targets));
        let runtime = restore_runtime_luns(&shared)?;
        let (stop, stop_rx) = watch::channel(false);
        let admin_path = config.file.server.admin_socket_path();
        let handler = Admin {
            media: handles.clone(),
            shared: Arc::clone(&shared),
            runtime: std::sync::Mutex::new(runtime),
        };
        let admin =
            crate::admin::start(&admin_path, handler, stop_rx.clone()).map_err(|source| {
                StartupError::AdminSocket {
                    path: admin_path.clone(),
                    source,
                }
            })?;
        info!("admin socket {}", admin_path.display());
        let mut tasks = vec![admin];
        let (listeners, addrs) = listen(&config).await?;
        // SendTargets advertises the portals as bound, so a port 0 in the config (tests,
        // ephemeral deployments) is answered with the real port.
        shared.set_portals(addrs.clone());
        tasks.extend(crate::iscsi::serve(listeners, &shared, &stop_rx));
        let metrics_addr = match config.metrics {
            Some(addr) => {
                let (local, task) = crate::metrics::start(
                    addr,
                    handles.clone(),
                    Arc::clone(&shared),
                    stop.subscribe(),
                )
                .await
                .map_err(|source| StartupError::Metrics { addr, source })?;
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
            media: handles,
            shared,
            metrics_addr,
        })
    }

    /// Puts the reloadable parts of `new` in force (ACLs, CHAP secrets, new nodes) for
    /// the logins that follow, and opens and adds its new plain-file LUNs (the target's
    /// sessions hear REPORTED LUNS DATA HAS CHANGED); live sessions stay up. Refused, with
    /// the key at fault, when the file changes what a reload cannot (see
    /// [`crate::reload`]): nothing changes then.
    pub fn reload(&self, new: Config) -> Result<ReloadReport, ConfigError> {
        let new = new.resolve()?;
        let running = self.shared.in_force();
        let plan = crate::reload::plan(&running, &new)?;
        // Storage first: opening a file is what most likely fails, and nothing has
        // changed yet when it does.
        let dir = &self.shared.config.server.data_dir;
        let mut new_luns = Vec::new();
        for added in &plan.luns_added {
            let invalid = |msg: String| ConfigError::Invalid {
                key: added.key.clone(),
                msg,
            };
            let target = self
                .shared
                .target(&added.iqn)
                .ok_or_else(|| invalid(format!("no target {}", added.iqn)))?;
            let path = added
                .lun
                .path
                .as_deref()
                .ok_or_else(|| invalid("no path".into()))?;
            let store = media::open_file_lun(dir, &added.iqn, &added.lun, path, added.size_bytes)
                .map_err(|e| invalid(e.to_string()))?;
            let spec = media::lun_spec(&added.lun, store);
            new_luns.push((Arc::clone(target), added.key.clone(), spec));
        }
        if !plan.nodes_added.is_empty() {
            let Some(agent) = &self.media.agent else {
                let (i, _, _) = &plan.nodes_added[0];
                return Err(ConfigError::Invalid {
                    key: format!("node[{i}]"),
                    msg: "nodes need [packets], which a reload cannot add".into(),
                });
            };
            let nodes: Vec<_> = plan
                .nodes_added
                .iter()
                .map(|(i, initiator, addrs)| {
                    let addrs = addrs
                        .iter()
                        .copied()
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
    pub fn media(&self) -> &MediaHandles {
        &self.media
    }

    /// The metrics endpoint's bound address, when `server.metrics` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin socket's path.
    pub fn admin_path(&self) -> &Path {
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

/// Binds every portal; returns the listeners and their bound addresses.
async fn listen(
    config: &ResolvedConfig,
) -> Result<(Vec<TcpListener>, Vec<SocketAddr>), StartupError> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for &addr in &config.portals {
        let err = |source| StartupError::Listen { addr, source };
        let l = TcpListener::bind(addr).await.map_err(err)?;
        let local = l.local_addr().map_err(err)?;
        info!("listening on {local}");
        addrs.push(local);
        listeners.push(l);
    }
    Ok((listeners, addrs))
}

/// Serves again the LUNs `admin luns add` created in earlier runs. A missing file stops
/// the start (an empty LUN in its place would hide lost data); a LUN the configuration
/// file now defines itself is the file's, and its run-time record is left unused.
fn restore_runtime_luns(shared: &Shared) -> Result<RuntimeState, StartupError> {
    let dir = &shared.config.server.data_dir;
    let err = |iqn: &str, lun: u16, msg: String| StartupError::RuntimeLun {
        iqn: iqn.to_owned(),
        lun,
        msg,
    };
    let state = RuntimeState::load(dir).map_err(|source| StartupError::RuntimeLuns { source })?;
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
        let store = l.open(dir).map_err(|m| err(&l.target, l.lun, m))?;
        t.scsi
            .add_lun(l.spec(store), dir)
            .map_err(|e| err(&l.target, l.lun, e.to_string()))?;
        info!(target = %l.target, lun = l.lun, "LUN added at run time restored");
    }
    Ok(state)
}

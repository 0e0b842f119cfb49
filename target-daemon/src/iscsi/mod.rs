//! The iSCSI transport: listeners, login, sessions and connections (RFC 7143).
//!
//! The transport only accepts and serves: [`crate::startup`] opens the media and binds
//! the portals, and hands their listeners and the shared state to `serve`. Each
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
use tracing::{debug, warn};

use session::{SessionCtx, Shared};

/// Accepts connections on `listeners` (bound already) and serves each in its own task
/// with the targets of `shared`, until `stop` changes. Returns the accepting tasks.
pub(crate) fn serve(
    listeners: Vec<TcpListener>,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(l, Arc::clone(shared), stop.clone())))
        .collect()
}

async fn accept_loop(l: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((sock, peer)) => {
                    debug!("connection from {peer}");
                    let shared = Arc::clone(&shared);
                    let stop = stop.clone();
                    tokio::spawn(async move { serve_connection(sock, peer, shared, stop).await });
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

async fn serve_connection(
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

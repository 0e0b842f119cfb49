//! `ftss`: send and receive network packets through an ftss target from the command line,
//! over the userspace iSCSI initiator of `ftss_initiator`, or (`--device`, Linux) over
//! SG_IO on a LUN the kernel's initiator logged in to.
//!
//! ```text
//! ftss --portal 10.0.0.9:3260 --node-addr 10.0.0.2 echo
//! ftss --portal 10.0.0.9:3260 --node-addr 10.0.0.1 ping 10.0.0.2 --count 5
//! ftss --node-addr 10.0.0.1 send 10.0.0.2 hello
//! ftss --node-addr 10.0.0.2 recv --wait 10
//! ftss --device auto --node-addr 10.0.0.3 recv --wait 10
//! ftss --portal 10.0.0.9:3260 --portal 10.0.1.9:3260 -a 10.0.0.1 --json whoami
//! ftss completions bash > /etc/bash_completion.d/ftss
//! ```

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
#[cfg(target_os = "linux")]
use ftss_initiator::SgTransport;
use ftss_initiator::{
    multipath::MultipathTransport, scsi, ChapCredentials, Delivered, IscsiTransport, NodeState,
    OutPacket, Outcome, PacketClient, Receiver, ReplayFrom, RouteState, ScsiResult, Session,
    SessionConfig, Transport,
};
use serde_json::json;

/// Send and receive network packets through an ftss iSCSI target.
#[derive(Parser, Debug)]
#[command(name = "ftss", version)]
struct Cli {
    /// Target portal, host:port. Repeat it for redundant paths to one target: a session
    /// on each, commands on one at a time, the next one taken when a path fails (packets
    /// are retried with the same ids). `discover`, `tun` and `latency` use the first.
    #[arg(long, global = true, default_value = "127.0.0.1:3260")]
    portal: Vec<String>,
    /// Target IQN; default: the first target SendTargets discovery reports.
    #[arg(long, global = true)]
    target: Option<String>,
    /// Our initiator name; default: iqn.2026-11.org.ftss:cli-HOSTNAME (or the pid).
    #[arg(long, global = true)]
    initiator: Option<String>,
    /// LUN the vendor commands are addressed to (any existing LUN works).
    #[arg(long, global = true, default_value_t = 0)]
    lun: u16,
    /// CHAP user name; the secret comes from --chap-secret or FTSS_CHAP_SECRET.
    #[arg(long, global = true)]
    chap_user: Option<String>,
    /// CHAP secret (visible in the process list: prefer FTSS_CHAP_SECRET).
    #[arg(long, global = true)]
    chap_secret: Option<String>,
    /// Register these node addresses right after login (repeatable): the target knows a
    /// node by the addresses its sessions registered.
    #[arg(long = "node-addr", short = 'a', global = true)]
    node_addrs: Vec<IpAddr>,
    /// Command timeout in seconds (a RECEIVE waits at most this minus 5 s).
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    /// Use this SCSI device (Linux SG_IO, e.g. /dev/sg1) of a LUN the kernel's iSCSI
    /// initiator logged in to, instead of logging in with our own session; `auto`: the
    /// first LUN whose INQUIRY vendor is FTSS. The portal, target, initiator, LUN and
    /// CHAP options then do not apply (the node is the kernel session's initiator name).
    #[arg(long, global = true, value_name = "PATH|auto")]
    device: Option<String>,
    /// Print `whoami`, `nodes` and `stats` as JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the targets of the portal (SendTargets).
    Discover,
    /// Standard INQUIRY and capacity of the LUN.
    Inquiry,
    /// Register this node's addresses (replacing earlier ones).
    Register {
        /// Addresses, IPv4 or IPv6.
        #[arg(required = true)]
        addrs: Vec<IpAddr>,
    },
    /// Put this node in maintenance or make it available.
    State {
        /// New state.
        state: StateArg,
    },
    /// This node's state and addresses (NODE QUERY).
    Whoami,
    /// Send one packet and print its outcome.
    Send {
        /// Destination address (ignored with --broadcast; `::` will do).
        dest: IpAddr,
        /// Payload text.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        payload: Option<String>,
        /// Payload from a file (`-`: standard input).
        #[arg(long)]
        file: Option<PathBuf>,
        /// To every available node but this one.
        #[arg(long)]
        broadcast: bool,
        /// Packet id (default: the client's next one). Sending an id again that is still
        /// stored is a retry: it is not stored twice.
        #[arg(long)]
        id: Option<u64>,
    },
    /// Take delivered packets and print them; acknowledges them unless --no-ack.
    Recv {
        /// Wait up to this many seconds for a first packet.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
        /// Keep receiving until this many packets came (each wait as --wait).
        #[arg(long)]
        count: Option<usize>,
        /// Leave them queued (a new session gets them again).
        #[arg(long)]
        no_ack: bool,
        /// Print no packets, only how many came (to stderr): for draining a queue, and
        /// for benchmarks, where formatting every payload would cost more CPU than
        /// taking it.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Send timestamped packets to a node running `ftss echo` and time the echoes.
    Ping {
        /// Destination address.
        dest: IpAddr,
        /// Packets to send.
        #[arg(long, short = 'c', default_value_t = 5)]
        count: u32,
        /// Seconds between packets.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Seconds to wait for each echo.
        #[arg(long, default_value_t = 5.0)]
        reply_timeout: f64,
    },
    /// Send every packet received back to its source (until Ctrl-C or --count).
    Echo {
        /// Stop after echoing this many packets.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Read stored packets again (does not move the receive position or acknowledge).
    Replay {
        /// From this sequence number.
        #[arg(
            long,
            required_unless_present = "since_ms",
            conflicts_with = "since_ms"
        )]
        from_seq: Option<u64>,
        /// Stored at or after this time, ms since the Unix epoch.
        #[arg(long)]
        since_ms: Option<u64>,
    },
    /// The target's routing table (answered to nodes only: give --node-addr, or be a
    /// configured `[[node]]`).
    Nodes,
    /// This node's receive queue statistics.
    Stats,
    /// Send packets as fast as K concurrent senders on one session allow (the client
    /// coalesces their packets into shared SENDs, a few in flight).
    Bench {
        /// Destination address.
        dest: IpAddr,
        /// Payload bytes per packet.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Packets to send.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Concurrent senders, each with one send in flight.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// Packets per send call.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// The packet conversion unit: link a TUN interface to the target. IP packets routed
    /// into it go out as SEND to their destination address; packets received come out of
    /// it. Logs in again (same packet ids) when the session breaks. Needs CAP_NET_ADMIN;
    /// give the interface its address (one of --node-addr) and bring it up yourself.
    Tun {
        /// Interface name.
        #[arg(long, default_value = "ftss0")]
        name: String,
    },
    /// Stay logged in (the node available) without receiving, for SECS seconds: a node
    /// whose application is away while its backlog grows.
    Hold {
        /// Seconds to stay.
        secs: u64,
    },
    /// Send-to-receive latency at a fixed rate: this process also logs in as the
    /// receiving node (its own session, --peer-initiator, registering DEST), so both ends
    /// read one clock.
    Latency {
        /// The receiving node's address.
        dest: IpAddr,
        /// Initiator name of the receiving session.
        #[arg(long, default_value = "iqn.2026-11.org.ftss:latency-receiver")]
        peer_initiator: String,
        /// Packets per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Packets to send.
        #[arg(long, default_value_t = 5000)]
        count: u64,
        /// Payload bytes per packet (at least 16: the packet's index and the run's nonce).
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StateArg {
    Available,
    Maintenance,
}

/// The CLI's way to the target, chosen at run time: its own iSCSI session, or SG_IO on
/// a LUN of the kernel's initiator (`--device`). [`Transport`] is not object safe, hence
/// an enum that delegates.
#[derive(Clone)]
enum AnyTransport {
    Iscsi(IscsiTransport),
    Multipath(Arc<MultipathTransport>),
    #[cfg(target_os = "linux")]
    Sg(SgTransport),
}

impl Transport for AnyTransport {
    async fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, ftss_initiator::Error> {
        match self {
            AnyTransport::Iscsi(t) => t.execute(cdb, data_out, data_in_len).await,
            AnyTransport::Multipath(t) => t.execute(cdb, data_out, data_in_len).await,
            #[cfg(target_os = "linux")]
            AnyTransport::Sg(t) => t.execute(cdb, data_out, data_in_len).await,
        }
    }
}

type Client = PacketClient<AnyTransport>;

#[tokio::main]
async fn main() -> Result<()> {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`ftss recv | head`): Rust ignores SIGPIPE and println! would panic instead.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default, before any thread of ours
    // could be relying on it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(shell, &mut Cli::command(), "ftss", &mut std::io::stdout());
        return Ok(());
    }
    if let Some(device) = &cli.device {
        if let Cmd::Discover = cli.cmd {
            bail!("discover needs a portal (--portal HOST:PORT), not --device: SendTargets is part of an iSCSI session of this CLI's own");
        }
        let transport = open_device(device, &cli).await?;
        return run(&cli, transport).await.map_err(explain);
    }
    let portal = resolve(first_portal(&cli)).await?;
    if let Cmd::Discover = cli.cmd {
        for (name, addrs) in discover(&cli, portal).await? {
            println!("{name}\t{}", addrs.join(" "));
        }
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    if let Cmd::Tun { name } = &cli.cmd {
        return tun(&cli, portal, name).await.map_err(explain);
    }
    if cli.portal.len() > 1 {
        return multipath(&cli).await.map_err(explain);
    }
    let session = Arc::new(login(&cli, portal).await?);
    let transport = AnyTransport::Iscsi(IscsiTransport::new(Arc::clone(&session), cli.lun));
    let result = run(&cli, transport).await;
    // Best effort: the target cleans up a dropped connection too.
    if let Err(e) = session.logout().await {
        tracing::debug!("logout: {e}");
    }
    result.map_err(explain)
}

/// The first `--portal` (clap always gives one: the default).
fn first_portal(cli: &Cli) -> &str {
    cli.portal.first().map_or("127.0.0.1:3260", String::as_str)
}

/// Several `--portal`s: one session on each through the library's multipath transport,
/// which registers the node's addresses on every session it opens.
async fn multipath(cli: &Cli) -> Result<()> {
    let mut portals = Vec::with_capacity(cli.portal.len());
    for p in &cli.portal {
        portals.push(resolve(p).await?);
    }
    let target = match &cli.target {
        Some(t) => t.clone(),
        None => {
            let mut found = None;
            for &p in &portals {
                match discover(cli, p).await {
                    Ok(t) => {
                        found = t.into_iter().next().map(|(name, _)| name);
                        break;
                    }
                    Err(e) => tracing::warn!("discovery at {p}: {e:#}"),
                }
            }
            found.context("no portal reports a target")?
        }
    };
    let config = session_config(cli, Some(&target))?;
    let t = MultipathTransport::new(&portals, &config, cli.lun, &cli.node_addrs)?;
    t.connect_all().await;
    let result = run(cli, AnyTransport::Multipath(Arc::clone(&t))).await;
    t.logout_all().await;
    result
}

/// `--device PATH` or `--device auto` (the first ftss LUN the kernel initiator sees).
#[cfg(target_os = "linux")]
async fn open_device(device: &str, cli: &Cli) -> Result<AnyTransport> {
    let t = if device == "auto" {
        SgTransport::find().await?
    } else {
        SgTransport::open(device)?
    };
    tracing::info!("using {}", t.path().display());
    Ok(AnyTransport::Sg(
        t.with_timeout(Duration::from_secs(cli.timeout.max(1))),
    ))
}

#[cfg(not(target_os = "linux"))]
async fn open_device(_device: &str, _cli: &Cli) -> Result<AnyTransport> {
    bail!("--device (SG_IO) is only available on Linux; use --portal")
}

/// Adds a hint to the errors a user is likely to meet first.
fn explain(e: anyhow::Error) -> anyhow::Error {
    let hint = match e.downcast_ref::<ftss_initiator::Error>() {
        Some(ftss_initiator::Error::ScsiStatus { sense: Some(s), .. })
            if (s.key, s.asc) == (0x5, 0x20) =>
        {
            "the target does not implement the ftss vendor commands (is packet routing enabled?)"
        }
        Some(ftss_initiator::Error::ScsiStatus { sense: Some(s), .. })
            if (s.key, s.asc) == (0x5, 0x24) || (s.key, s.asc) == (0x5, 0x26) =>
        {
            "the target refused a field of the command (e.g. an address another node holds)"
        }
        Some(ftss_initiator::Error::Busy) => "the target's media is full; try again later",
        _ => return e,
    };
    e.context(hint)
}

async fn run(cli: &Cli, transport: AnyTransport) -> Result<()> {
    let wait_cap = Duration::from_secs(cli.timeout.saturating_sub(5).max(1));
    let client = Arc::new(PacketClient::new(transport.clone()).with_max_wait(wait_cap));
    if !cli.node_addrs.is_empty() {
        client
            .register(&cli.node_addrs)
            .await
            .context("registering --node-addr")?;
    }
    match &cli.cmd {
        // Handled in main before logging in to a target.
        Cmd::Discover | Cmd::Tun { .. } | Cmd::Completions { .. } => Ok(()),
        Cmd::Inquiry => inquiry(&transport).await,
        Cmd::Register { addrs } => {
            client.register(addrs).await?;
            println!("registered {}", join(addrs));
            Ok(())
        }
        Cmd::State { state } => {
            let s = match state {
                StateArg::Available => NodeState::Available,
                StateArg::Maintenance => NodeState::Maintenance,
            };
            client.set_state(s).await?;
            println!("state {s:?}");
            Ok(())
        }
        Cmd::Whoami => whoami(&client, cli.json).await,
        Cmd::Send {
            dest,
            payload,
            file,
            broadcast,
            id,
        } => {
            send(
                &client,
                *dest,
                payload.as_deref(),
                file.as_deref(),
                *broadcast,
                *id,
            )
            .await
        }
        Cmd::Recv {
            wait,
            count,
            no_ack,
            quiet,
        } => recv(&client, secs(*wait)?, *count, *no_ack, *quiet).await,
        Cmd::Ping {
            dest,
            count,
            interval,
            reply_timeout,
        } => {
            ping(
                &client,
                *dest,
                *count,
                secs(*interval)?,
                secs(*reply_timeout)?,
            )
            .await
        }
        Cmd::Echo { count } => echo(&client, *count).await,
        Cmd::Replay { from_seq, since_ms } => replay(&client, *from_seq, *since_ms).await,
        Cmd::Nodes => nodes(&client, cli.json).await,
        Cmd::Stats => stats(&client, cli.json).await,
        Cmd::Bench {
            dest,
            size,
            count,
            inflight,
            batch,
        } => bench(&client, *dest, *size, *count, *inflight, *batch).await,
        Cmd::Hold { secs } => {
            tokio::time::sleep(Duration::from_secs(*secs)).await;
            Ok(())
        }
        Cmd::Latency {
            dest,
            peer_initiator,
            rate,
            count,
            size,
        } => {
            let receiver = receiver_session(cli, peer_initiator, wait_cap).await?;
            receiver
                .1
                .register(&[*dest])
                .await
                .context("receiver register")?;
            let r = latency(&client, &receiver.1, *dest, *rate, *count, *size).await;
            let _ = receiver.0.logout().await;
            r
        }
    }
}

async fn whoami(client: &PacketClient<AnyTransport>, json_out: bool) -> Result<()> {
    let info = client.query().await?;
    let addrs: Vec<IpAddr> = info.addrs.iter().map(|a| a.ip()).collect();
    if json_out {
        let state = match info.state {
            NodeState::Available => "available",
            NodeState::Maintenance => "maintenance",
        };
        println!("{}", json!({ "state": state, "addresses": addrs }));
    } else {
        println!("state {:?}, addresses {}", info.state, join(&addrs));
    }
    Ok(())
}

async fn send(
    client: &PacketClient<AnyTransport>,
    dest: IpAddr,
    payload: Option<&str>,
    file: Option<&std::path::Path>,
    broadcast: bool,
    id: Option<u64>,
) -> Result<()> {
    let payload = match (payload, file) {
        (_, Some(f)) => read_payload(f)?,
        (Some(p), None) => Bytes::from(p.to_owned().into_bytes()),
        (None, None) => bail!("give a PAYLOAD or --file"),
    };
    let mut p = if broadcast {
        OutPacket::broadcast(payload)
    } else {
        OutPacket::to(dest, payload)
    };
    p.packet_id = id;
    let mut packets = [p];
    client.assign_ids(&mut packets);
    let outcome = client.send(&packets).await?;
    let id = packets[0].packet_id.unwrap_or_default();
    for o in outcome {
        println!("packet {id}: {}", describe(o));
    }
    Ok(())
}

async fn replay(
    client: &PacketClient<AnyTransport>,
    from_seq: Option<u64>,
    since_ms: Option<u64>,
) -> Result<()> {
    let from = match (from_seq, since_ms) {
        (Some(s), _) => ReplayFrom::Seq(s),
        (None, Some(t)) => ReplayFrom::Time(t),
        (None, None) => bail!("give --from-seq or --since-ms"),
    };
    let records = client.replay(from).await?;
    for d in &records {
        print_record(d);
    }
    eprintln!("{} records", records.len());
    Ok(())
}

async fn nodes(client: &PacketClient<AnyTransport>, json_out: bool) -> Result<()> {
    let t = client.routing_table().await?;
    let state_name = |s: RouteState| match s {
        RouteState::Available => "available",
        RouteState::Maintenance => "maintenance",
        RouteState::Down => "down",
    };
    if json_out {
        let entries: Vec<serde_json::Value> = t
            .entries
            .iter()
            .map(|e| {
                json!({
                    "address": e.addr.ip(),
                    "node": e.node_id,
                    "state": state_name(e.state),
                    "local": e.local,
                    "external": e.external,
                })
            })
            .collect();
        println!("{}", json!({ "total": t.total, "entries": entries }));
        return Ok(());
    }
    println!("{:<40} {:>7} {:<12} flags", "address", "node", "state");
    for e in &t.entries {
        let state = state_name(e.state);
        let mut flags = Vec::new();
        if e.local {
            flags.push("local");
        }
        if e.external {
            flags.push("external");
        }
        println!(
            "{:<40} {:>7} {:<12} {}",
            e.addr.ip(),
            e.node_id,
            state,
            flags.join(",")
        );
    }
    if t.entries.len() < usize::from(t.total) {
        eprintln!("{} of {} entries", t.entries.len(), t.total);
    }
    Ok(())
}

async fn stats(client: &PacketClient<AnyTransport>, json_out: bool) -> Result<()> {
    let s = client.queue_stats().await?;
    if json_out {
        println!(
            "{}",
            json!({
                "queued_records": s.queued_records,
                "queued_bytes": s.queued_bytes,
                "first_unacked_seq": s.first_unacked,
                "last_delivered_seq": s.last_delivered,
                "last_assigned_seq": s.last_assigned,
                "capacity_bytes": s.capacity_bytes,
            })
        );
        return Ok(());
    }
    println!("queued records      {}", s.queued_records);
    println!("queued bytes        {}", s.queued_bytes);
    println!("first unacked seq   {}", s.first_unacked);
    println!("last delivered seq  {}", s.last_delivered);
    println!("last assigned seq   {}", s.last_assigned);
    println!("capacity bytes      {}", s.capacity_bytes);
    Ok(())
}

/// The receiving node of `ftss latency`: its own session (as `peer_initiator`) to the
/// same target, and a packet client on it.
async fn receiver_session(
    cli: &Cli,
    peer_initiator: &str,
    wait_cap: Duration,
) -> Result<(Arc<Session>, Arc<PacketClient<AnyTransport>>)> {
    let portal = resolve(first_portal(cli)).await?;
    let mut peer_cfg = session_config(cli, None)?;
    peer_cfg.initiator_name = peer_initiator.to_owned();
    let target = match &cli.target {
        Some(t) => t.clone(),
        None => discover(cli, portal)
            .await?
            .into_iter()
            .next()
            .map(|(name, _)| name)
            .context("no targets")?,
    };
    peer_cfg.target_name = Some(target);
    let peer = Arc::new(
        Session::connect(portal, peer_cfg)
            .await
            .context("receiver login")?,
    );
    let receiver = PacketClient::new(AnyTransport::Iscsi(IscsiTransport::new(
        Arc::clone(&peer),
        cli.lun,
    )))
    .with_max_wait(wait_cap);
    Ok((peer, Arc::new(receiver)))
}

// ---------------------------------------------------------------------------------------
// Login

async fn resolve(portal: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(portal)
        .await
        .with_context(|| format!("resolving portal {portal}"))?
        .next()
        .with_context(|| format!("portal {portal} has no address"))
}

/// The default initiator name: per host, so a target's ACLs can name it.
fn default_initiator() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    // IQNs allow lower-case letters, digits, '.', '-' and ':'.
    let host: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect();
    let suffix = if host.is_empty() {
        std::process::id().to_string()
    } else {
        host
    };
    format!("iqn.2026-11.org.ftss:cli-{suffix}")
}

fn session_config(cli: &Cli, target: Option<&str>) -> Result<SessionConfig> {
    let name = cli.initiator.clone().unwrap_or_else(default_initiator);
    let mut c = SessionConfig::new(&name, target);
    c.timeout = Duration::from_secs(cli.timeout.max(1));
    if let Some(user) = &cli.chap_user {
        let secret = match &cli.chap_secret {
            Some(s) => s.clone(),
            None => std::env::var("FTSS_CHAP_SECRET")
                .context("--chap-user needs --chap-secret or FTSS_CHAP_SECRET")?,
        };
        c.chap = Some(ChapCredentials {
            username: user.clone(),
            secret: secret.into_bytes(),
            mutual: None,
        });
    }
    Ok(c)
}

async fn discover(cli: &Cli, portal: SocketAddr) -> Result<Vec<(String, Vec<String>)>> {
    let s = Session::connect(portal, session_config(cli, None)?)
        .await
        .with_context(|| format!("discovery login to {portal}"))?;
    let targets = s.send_targets().await.context("SendTargets")?;
    if let Err(e) = s.logout().await {
        tracing::debug!("logout: {e}");
    }
    Ok(targets)
}

async fn login(cli: &Cli, portal: SocketAddr) -> Result<Session> {
    let target = match &cli.target {
        Some(t) => t.clone(),
        None => discover(cli, portal)
            .await?
            .into_iter()
            .next()
            .map(|(name, _)| name)
            .with_context(|| format!("{portal} reports no targets"))?,
    };
    Session::connect(portal, session_config(cli, Some(&target))?)
        .await
        .with_context(|| format!("login to {target} at {portal}"))
}

async fn inquiry(t: &AnyTransport) -> Result<()> {
    let inq = scsi::inquiry(t).await.context("INQUIRY")?;
    println!(
        "vendor {:?} product {:?} revision {:?}",
        inq.vendor, inq.product, inq.revision
    );
    println!(
        "peripheral qualifier {} device type {:#04x}{}",
        inq.peripheral_qualifier,
        inq.device_type,
        if inq.removable { " removable" } else { "" }
    );
    let cap = scsi::read_capacity16(t)
        .await
        .context("READ CAPACITY(16)")?;
    let bytes = u128::from(cap.blocks) * u128::from(cap.block_size);
    println!(
        "capacity {} blocks of {} bytes ({bytes} bytes, {:.1} MiB)",
        cap.blocks,
        cap.block_size,
        bytes as f64 / f64::from(1u32 << 20)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Packets

fn secs(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{s} is not a number of seconds"))
}

fn join(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_payload(f: &std::path::Path) -> Result<Bytes> {
    let data = if f.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::stdin().read_to_end(&mut v).context("stdin")?;
        v
    } else {
        std::fs::read(f).with_context(|| format!("reading {}", f.display()))?
    };
    Ok(Bytes::from(data))
}

fn describe(o: Outcome) -> &'static str {
    match o {
        Outcome::Delivered => "delivered (stored, delivery guaranteed)",
        Outcome::Accepted => "accepted (delivery not guaranteed)",
        Outcome::UnknownDestination => "undeliverable: unknown destination",
        Outcome::DestinationDown => "undeliverable: destination down",
        Outcome::DestinationMaintenance => "undeliverable: destination in maintenance",
        Outcome::DestinationQueueFull => "not stored: destination queue at its quota, retry later",
    }
}

/// Printable text as is (quoted), anything else as hex.
fn show_payload(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) if s.chars().all(|c| !c.is_control() || c == '\n' || c == '\t') => {
            format!("{s:?}")
        }
        _ => p.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn print_record(d: &Delivered) {
    let mut flags = String::new();
    if d.flags.broadcast {
        flags.push('B');
    }
    if d.flags.from_external {
        flags.push('X');
    }
    if d.flags.failure_notice {
        flags.push('N');
    }
    if flags.is_empty() {
        flags.push('-');
    }
    let body = match d.failure_notice() {
        Some(o) => format!("failure notice: {}", describe(o)),
        None => show_payload(&d.payload),
    };
    println!(
        "seq={} from={} flags={} id={} ts={} len={} {}",
        d.seq,
        d.source,
        flags,
        d.packet_id,
        d.timestamp_ms,
        d.payload.len(),
        body
    );
}

async fn recv(
    client: &Client,
    wait: Duration,
    count: Option<usize>,
    no_ack: bool,
    quiet: bool,
) -> Result<()> {
    let mut got = 0usize;
    loop {
        let max = count.map_or(0, |c| {
            u32::try_from(c.saturating_sub(got)).unwrap_or(u32::MAX)
        });
        let records = client.receive(max, Some(wait)).await?;
        if !quiet {
            for d in &records {
                print_record(d);
            }
        }
        got += records.len();
        // Records come oldest first, so acknowledging up to the last covers exactly these.
        if let (false, Some(last)) = (no_ack, records.last()) {
            client.ack_upto(last.seq).await?;
        }
        match count {
            Some(c) if got < c && !records.is_empty() => continue,
            _ => break,
        }
    }
    if got == 0 {
        eprintln!("no packets");
    } else if quiet {
        eprintln!("{got} packets");
    }
    Ok(())
}

const PING_MAGIC: &str = "ftss-ping";

async fn ping(
    client: &Client,
    dest: IpAddr,
    count: u32,
    interval: Duration,
    reply_timeout: Duration,
) -> Result<()> {
    // Tells our echoes from those of another ping run.
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
        .unwrap_or_default();
    let mut rtts: Vec<Duration> = Vec::new();
    for seq in 1..=count {
        let sent_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let payload = format!("{PING_MAGIC} {run} {seq} {sent_ns}");
        let start = Instant::now();
        let outcome = client
            .send_one(dest, Bytes::from(payload.clone().into_bytes()), false)
            .await?;
        if !outcome.accepted() {
            println!("seq={seq}: {}", describe(outcome));
        } else {
            match await_echo(client, &payload, start + reply_timeout).await? {
                Some(arrived) => {
                    let rtt = arrived.duration_since(start);
                    println!(
                        "echo from {dest}: seq={seq} time={:.3} ms",
                        rtt.as_secs_f64() * 1e3
                    );
                    rtts.push(rtt);
                }
                None => println!("seq={seq}: no echo within {reply_timeout:?}"),
            }
        }
        if seq < count {
            tokio::time::sleep(interval.saturating_sub(start.elapsed())).await;
        }
    }
    let lost = count as usize - rtts.len();
    println!(
        "{count} sent, {} echoed, {:.0}% lost",
        rtts.len(),
        100.0 * lost as f64 / f64::from(count.max(1))
    );
    if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
        let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        println!(
            "rtt min/avg/max = {:.3}/{:.3}/{:.3} ms",
            ms(min),
            ms(&avg),
            ms(max)
        );
    }
    Ok(())
}

/// Waits for the echo of `payload` and returns when it arrived (before the ACK, which is
/// not part of the round trip). The source is not checked: the echo node may answer from
/// any of its addresses. Acknowledges ping echoes (also late ones of earlier pings) and
/// leaves other packets queued for the next session.
async fn await_echo(client: &Client, payload: &str, deadline: Instant) -> Result<Option<Instant>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let records = client.receive(0, Some(left)).await?;
        let arrived = Instant::now();
        let mut ours = Vec::new();
        let mut hit = false;
        for d in &records {
            let text = std::str::from_utf8(&d.payload).unwrap_or("");
            if text.starts_with(PING_MAGIC) {
                ours.push(d.seq);
                hit |= text == payload;
            } else {
                tracing::info!("leaving packet seq {} from {} queued", d.seq, d.source);
            }
        }
        client.ack_list(&ours).await?;
        if hit {
            return Ok(Some(arrived));
        }
        if left.is_zero() {
            return Ok(None);
        }
    }
}

async fn echo(client: &Arc<Client>, count: Option<u64>) -> Result<()> {
    let mut rx = Receiver::new(Arc::clone(client));
    let mut echoed = 0u64;
    eprintln!("echoing; Ctrl-C to stop");
    loop {
        let records = tokio::select! {
            r = rx.next() => r?,
            _ = tokio::signal::ctrl_c() => break,
        };
        for d in records {
            // Echoing broadcasts or notices would answer things nobody asked for, and two
            // echo nodes would bounce a broadcast forever.
            if d.flags.broadcast || d.flags.failure_notice {
                print_record(&d);
                continue;
            }
            let o = client.send_one(d.source, d.payload.clone(), false).await?;
            println!(
                "seq={} from={} len={} echoed: {}",
                d.seq,
                d.source,
                d.payload.len(),
                describe(o)
            );
            echoed += 1;
        }
        if count.is_some_and(|c| echoed >= c) {
            break;
        }
    }
    // The last batch was echoed: acknowledge it before leaving.
    rx.ack().await?;
    Ok(())
}

async fn bench(
    client: &Arc<Client>,
    dest: IpAddr,
    size: usize,
    count: u64,
    inflight: usize,
    batch: usize,
) -> Result<()> {
    let payload = Bytes::from((0..size).map(|i| i as u8).collect::<Vec<_>>());
    let next = Arc::new(AtomicU64::new(0));
    let sent_before = client.send_stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let batch = batch.max(1) as u64;
    for _ in 0..inflight.max(1) {
        let (client, next, payload) = (Arc::clone(client), Arc::clone(&next), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut not_delivered = 0u64;
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let n = batch.min(count - first);
                let packets: Vec<OutPacket> = (0..n)
                    .map(|_| OutPacket::to(dest, payload.clone()))
                    .collect();
                let t = Instant::now();
                let outcomes = client.send(&packets).await?;
                let took = t.elapsed();
                for o in outcomes {
                    lat.push(took);
                    not_delivered += u64::from(o != Outcome::Delivered);
                }
            }
            Ok::<_, ftss_initiator::Error>((lat, not_delivered))
        }));
    }
    let mut lat = Vec::new();
    let mut not_delivered = 0;
    for t in tasks {
        let (l, n) = t.await.context("bench task")??;
        lat.extend(l);
        not_delivered += n;
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len().max(1)) - 1;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let n = lat.len() as f64;
    let sent = client.send_stats();
    let sends = sent.sends - sent_before.sends;
    println!(
        "{} packets of {size} bytes in {:.3} s, {inflight} sends of {batch} in flight: {:.0} packets/s, {:.1} MB/s",
        lat.len(),
        elapsed.as_secs_f64(),
        n / elapsed.as_secs_f64(),
        n * size as f64 / elapsed.as_secs_f64() / 1e6
    );
    println!(
        "latency p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    // How far the client coalesced the senders' packets into shared SENDs.
    println!(
        "{sends} SEND commands, {:.1} packets per SEND, {} SEND RESULTS",
        (sent.packets - sent_before.packets) as f64 / sends.max(1) as f64,
        sent.send_results - sent_before.send_results
    );
    if not_delivered > 0 {
        println!("{not_delivered} packets not delivered (see `ftss send` for the outcome)");
    }
    Ok(())
}

/// Sends `count` packets at `rate` per second and times each from just before its SEND to
/// the moment the receiving session's RECEIVE hands it over.
async fn latency(
    sender: &Arc<Client>,
    receiver: &Arc<Client>,
    dest: IpAddr,
    rate: u64,
    count: u64,
    size: usize,
) -> Result<()> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    // Packets carry this run's nonce beside their index: a packet left by an earlier run
    // (sent but never received) is not taken for one of ours. Packet ids stay the
    // library's own, unique per client start: fixed ids (1, 2, ...) would be answered as
    // retries of the previous run's packets while those are still stored, and never
    // arrive.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let rx = {
        let (receiver, sent) = (Arc::clone(receiver), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(count as usize);
            // The library's receive loop, as an application would run it (its ACKs travel
            // beside the next RECEIVE).
            let mut rx = Receiver::new(receiver).with_wait(Duration::from_secs(1));
            let deadline = Instant::now() + Duration::from_secs(count / rate.max(1) + 30);
            while (lat.len() as u64) < count && Instant::now() < deadline {
                let got = rx.poll().await?;
                let now = Instant::now();
                for d in &got {
                    let word = |k: usize| {
                        d.payload
                            .get(k * 8..k * 8 + 8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(0, u64::from_le_bytes)
                    };
                    let id = word(0);
                    if word(1) != run {
                        continue;
                    }
                    if let Some(t) = sent
                        .lock()
                        .map_err(|_| ftss_initiator::Error::Protocol("lock".into()))?
                        .get(&id)
                    {
                        lat.push(now.duration_since(*t));
                    }
                }
            }
            rx.ack().await?;
            Ok::<_, ftss_initiator::Error>(lat)
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut sends = Vec::new();
    for i in 0..count {
        tick.tick().await;
        let mut payload = vec![0u8; size.max(16)];
        payload[..8].copy_from_slice(&i.to_le_bytes());
        payload[8..16].copy_from_slice(&run.to_le_bytes());
        let (sender, sent) = (Arc::clone(sender), Arc::clone(&sent));
        // Each SEND on its own task, so a slow one does not hold back the rate.
        sends.push(tokio::spawn(async move {
            if let Ok(mut m) = sent.lock() {
                m.insert(i, Instant::now());
            }
            sender
                .send(&[OutPacket::to(dest, Bytes::from(payload))])
                .await
        }));
    }
    for s in sends {
        s.await.context("send task")??;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let mut lat = rx.await.context("receiver task")??;
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len().max(1)) - 1;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{} of {count} packets of {size} bytes at {:.0}/s: send-to-receive p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        lat.len(),
        count as f64 / send_secs,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    if (lat.len() as u64) < count {
        bail!("{} packets did not arrive", count - lat.len() as u64);
    }
    Ok(())
}

/// `ftss tun`: runs the packet conversion unit until the TUN device fails.
#[cfg(target_os = "linux")]
async fn tun(cli: &Cli, portal: SocketAddr, name: &str) -> Result<()> {
    use ftss_initiator::tun::{bridge, BridgeStats, Tun};
    if cli.node_addrs.is_empty() {
        bail!("give this node's addresses with --node-addr (-a)");
    }
    let dev = Arc::new(Tun::open(name).with_context(|| format!("creating TUN interface {name}"))?);
    // Scripts wait for this line before moving or configuring the interface.
    println!("tun {} ready", dev.name());
    let stats = Arc::new(BridgeStats::default());
    let report = Arc::clone(&stats);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            tracing::info!(
                sent = report.sent.load(Ordering::Relaxed),
                received = report.received.load(Ordering::Relaxed),
                refused = report.refused.load(Ordering::Relaxed),
                sessions = report.sessions.load(Ordering::Relaxed),
                dropped_source_in = report.dropped_source_in.load(Ordering::Relaxed),
                dropped_source_out = report.dropped_source_out.load(Ordering::Relaxed),
                "tun"
            );
        }
    });
    let lun = cli.lun;
    let connect = || async move {
        let s = login(cli, portal)
            .await
            .map_err(|e| ftss_initiator::Error::Protocol(format!("{e:#}")))?;
        Ok(IscsiTransport::new(Arc::new(s), lun))
    };
    bridge(dev, connect, cli.node_addrs.clone(), stats).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn portal_repeats_and_defaults_to_one() {
        let one = Cli::try_parse_from(["ftss", "whoami"]).expect("parses");
        assert_eq!(one.portal, vec!["127.0.0.1:3260".to_string()]);
        let two = Cli::try_parse_from([
            "ftss",
            "--portal",
            "10.0.0.9:3260",
            "--portal",
            "10.0.1.9:3260",
            "--json",
            "stats",
        ])
        .expect("parses");
        assert_eq!(two.portal, vec!["10.0.0.9:3260", "10.0.1.9:3260"]);
        assert!(two.json);
    }

    #[test]
    fn completions_name_every_subcommand_and_global_option() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ftss", &mut out);
            let text = String::from_utf8(out).expect("utf-8");
            for word in Cli::command()
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .chain(["--portal".into(), "--json".into(), "--node-addr".into()])
            {
                assert!(text.contains(&word), "{shell:?} completion lacks {word}");
            }
        }
    }
}

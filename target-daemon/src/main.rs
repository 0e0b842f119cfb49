//! `ftss-target`: the ftss iSCSI target daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ftss_target::config::{Config, DEFAULT_CONFIG};
use ftss_target::startup::Server;

/// ftss iSCSI target daemon.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Without it the embedded default is used: one 1 GiB LUN
    /// in ./ftss-data, portal 127.0.0.1:3260.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log lines as text (for people) or as one JSON object each (for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Talk to a running daemon through its admin socket (found from --config, or the
    /// embedded default's data directory, unless --socket names it).
    Admin {
        /// The admin socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Answer with one JSON object (status, nodes, sessions, queues, luns), for
        /// scripts.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        request: AdminRequest,
    },
}

#[derive(clap::Subcommand)]
enum AdminRequest {
    /// Write cache counters and the state of every mirror.
    Status,
    /// Rebuild one mirror of a volume online, with a progress bar.
    Rebuild {
        /// Volume as `<iqn>/<lun>`.
        volume: String,
        /// Mirror index (its position in the LUN's `mirrors` list).
        mirror: usize,
        /// Copy rate, e.g. 64MiB (per second); default: media.rebuild_rate.
        #[arg(long)]
        rate: Option<String>,
        /// Start it and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Verify every copy of every block of a volume; repair bad copies.
    Scrub {
        /// Volume as `<iqn>/<lun>`.
        volume: String,
    },
    /// The packet nodes and who owns each registered address.
    Nodes {
        /// Release this initiator's registered addresses and discard the packets queued
        /// under them (it must have no session logged in).
        #[arg(long, value_name = "INITIATOR")]
        retire: Option<String>,
    },
    /// Live sessions: initiator, ISID, TSIH, target, peer address, since when.
    Sessions,
    /// Per packet node: queued packets and bytes, oldest unacknowledged age, quota use.
    Queues,
    /// Every target's LUNs: size, block size, masking; or add or remove one.
    Luns {
        #[command(subcommand)]
        action: Option<LunAction>,
    },
    /// The configuration in force and what changed at run time.
    Config {
        /// The file as last accepted (at start or by SIGHUP), secrets hidden, plus the
        /// nodes registered at run time (the only form for now).
        #[arg(long)]
        effective: bool,
    },
}

#[derive(clap::Subcommand)]
enum LunAction {
    /// A new plain-file LUN in the data directory, served at once and again after a
    /// restart (kept in runtime-luns.toml; the configuration file is not touched).
    Add {
        /// Target IQN.
        target: String,
        /// LUN number.
        lun: u16,
        /// Size, e.g. 1GiB.
        size: String,
        /// Logical block size.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
    },
    /// Grow a LUN added with `luns add` (it never shrinks).
    Resize {
        /// Target IQN.
        target: String,
        /// LUN number.
        lun: u16,
        /// New size, e.g. 2GiB.
        size: String,
    },
    /// Remove a LUN added with `luns add`, while no session is logged in to its target
    /// (its file stays).
    Remove {
        /// Target IQN.
        target: String,
        /// LUN number.
        lun: u16,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let config = match &args.config {
        Some(p) => Config::load(p).with_context(|| format!("configuration {}", p.display()))?,
        None => Config::default_config(),
    };
    if let Some(Command::Admin {
        socket,
        json,
        request,
    }) = args.command
    {
        let socket = socket.unwrap_or_else(|| config.server.admin_socket_path());
        return admin(&socket, request, json);
    }
    if args.check_config {
        println!("configuration OK");
        return Ok(());
    }
    let workers = config.server.workers();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    tracing::info!(worker_threads = workers, "runtime started");
    let grace = std::time::Duration::from_secs(u64::from(config.server.shutdown_timeout_s));
    let notifier = ftss_target::service::Notifier::from_env()
        .context("NOTIFY_SOCKET")?
        .map(std::sync::Arc::new);
    let notify = |what: &str| {
        if let Some(n) = &notifier {
            if let Err(e) = n.notify(what) {
                tracing::warn!("service manager notification {what:?}: {e}");
            }
        }
    };
    let config_path = args.config.clone();
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let server = Server::start(config).await?;
        // Every portal listens and the media are recovered: ready for initiators.
        notify(&format!(
            "READY=1\nSTATUS=serving on {}",
            server
                .local_addrs()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ));
        if let (Some(n), Some(every)) = (&notifier, ftss_target::service::watchdog_interval()) {
            let n = std::sync::Arc::clone(n);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if let Err(e) = n.notify("WATCHDOG=1") {
                        tracing::warn!("watchdog notification: {e}");
                    }
                }
            });
        }
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        loop {
            tokio::select! {
                r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; break }
                _ = term.recv() => break,
                _ = hup.recv() => {
                    notify("RELOADING=1");
                    reload(&server, config_path.as_deref());
                    notify("READY=1");
                }
            }
        }
        notify("STOPPING=1\nSTATUS=shutting down");
        tracing::info!(timeout_s = grace.as_secs(), "shutting down");
        let r = server.shutdown_gracefully(grace).await;
        if r.connections_left > 0 || !r.destaged {
            tracing::warn!(
                sessions = r.sessions,
                connections_left = r.connections_left,
                destaged = r.destaged,
                "shutdown timed out; what was acknowledged stays in the write cache"
            );
        } else {
            tracing::info!(
                sessions = r.sessions,
                destaged_bytes = r.dirty_bytes,
                "shut down: commands finished, write cache destaged"
            );
        }
        Ok(())
    });
    // Nothing of ours runs any more; a thread still blocked in a system call must not
    // hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// SIGHUP: reads the file again and puts what a reload may change in force; a file that
/// does not parse or validate, or changes what needs a restart, leaves everything as it
/// was and says which key is at fault.
fn reload(server: &Server, path: Option<&std::path::Path>) {
    let Some(path) = path else {
        tracing::warn!("reload: no --config file to read again (the embedded default runs)");
        return;
    };
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused: {e}");
            return;
        }
    };
    match server.reload(new) {
        Ok(r) => {
            for key in &r.restart_needed {
                tracing::warn!("reload: {key} changed; that takes effect at the next start");
            }
            tracing::info!(
                changed = r.changed,
                nodes_added = r.nodes_added.join(","),
                luns_added = r.luns_added.join(","),
                "reloaded {}: ACLs, CHAP secrets, nodes and new LUNs in force",
                path.display()
            );
        }
        Err(e) => tracing::error!("reload refused: {e}"),
    }
}

fn ask(socket: &std::path::Path, line: &str) -> anyhow::Result<String> {
    let answer = ftss_target::admin::request(socket, line)
        .with_context(|| format!("admin socket {} (is the daemon running?)", socket.display()))?;
    if let Some(err) = answer.strip_prefix("error ") {
        anyhow::bail!("{}", err.trim());
    }
    Ok(answer)
}

fn admin(socket: &std::path::Path, request: AdminRequest, json: bool) -> anyhow::Result<()> {
    let listing = match &request {
        AdminRequest::Status => Some("status"),
        AdminRequest::Nodes { retire: None } => Some("nodes"),
        AdminRequest::Sessions => Some("sessions"),
        AdminRequest::Queues => Some("queues"),
        AdminRequest::Luns { action: None } => Some("luns"),
        AdminRequest::Config { .. } => Some("config effective"),
        _ => None,
    };
    if let Some(what) = listing {
        // The daemon answers `ok` and then the listing, as text lines or one JSON line.
        let line = if json {
            format!("json {what}")
        } else {
            what.to_owned()
        };
        print!("{}", ask(socket, &line)?.trim_start_matches("ok\n"));
        return Ok(());
    }
    if json {
        anyhow::bail!("--json applies to status, nodes, sessions, queues, luns and config");
    }
    match request {
        AdminRequest::Status
        | AdminRequest::Nodes { retire: None }
        | AdminRequest::Sessions
        | AdminRequest::Queues
        | AdminRequest::Luns { action: None }
        | AdminRequest::Config { .. } => {}
        AdminRequest::Luns {
            action:
                Some(LunAction::Add {
                    target,
                    lun,
                    size,
                    block_size,
                }),
        } => {
            let bytes =
                ftss_target::config::parse_size(&size).map_err(|e| anyhow::anyhow!("size: {e}"))?;
            println!(
                "{}",
                ask(
                    socket,
                    &format!("luns add {target} {lun} {bytes} {block_size}")
                )?
                .trim()
            );
        }
        AdminRequest::Luns {
            action: Some(LunAction::Resize { target, lun, size }),
        } => {
            let bytes =
                ftss_target::config::parse_size(&size).map_err(|e| anyhow::anyhow!("size: {e}"))?;
            println!(
                "{}",
                ask(socket, &format!("luns resize {target} {lun} {bytes}"))?.trim()
            );
        }
        AdminRequest::Luns {
            action: Some(LunAction::Remove { target, lun }),
        } => {
            println!(
                "{}",
                ask(socket, &format!("luns remove {target} {lun}"))?.trim()
            );
        }
        AdminRequest::Scrub { volume } => {
            println!("{}", ask(socket, &format!("scrub {volume}"))?.trim());
        }
        AdminRequest::Nodes {
            retire: Some(initiator),
        } => {
            println!(
                "{}",
                ask(socket, &format!("nodes retire {initiator}"))?.trim()
            );
        }
        AdminRequest::Rebuild {
            volume,
            mirror,
            rate,
            no_wait,
        } => {
            let rate = match rate {
                Some(r) => format!(
                    " {}",
                    ftss_target::config::parse_size(&r)
                        .map_err(|e| anyhow::anyhow!("--rate: {e}"))?
                ),
                None => String::new(),
            };
            println!(
                "{}",
                ask(socket, &format!("rebuild {volume} {mirror}{rate}"))?.trim()
            );
            if !no_wait {
                follow_rebuild(socket, &volume, mirror)?;
            }
        }
    }
    Ok(())
}

/// Polls the daemon's status and draws a progress bar until the mirror is healthy again.
fn follow_rebuild(socket: &std::path::Path, volume: &str, mirror: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let prefix = format!("mirror {volume} {mirror} ");
    let started = std::time::Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_pct = u64::MAX;
    loop {
        let status = ask(socket, "status")?;
        let line = status
            .lines()
            .find(|l| {
                l.to_ascii_lowercase()
                    .starts_with(&prefix.to_ascii_lowercase())
            })
            .ok_or_else(|| anyhow::anyhow!("{volume} mirror {mirror} not in the status"))?;
        let state = &line[prefix.len()..];
        if state.starts_with("healthy") {
            eprintln!(
                "\rrebuild of {volume} mirror {mirror}: done in {:.1} s{:30}",
                started.elapsed().as_secs_f64(),
                ""
            );
            return Ok(());
        }
        if state.starts_with("failed") {
            anyhow::bail!("rebuild of {volume} mirror {mirror} failed: {state}");
        }
        if let Some(p) = state.strip_prefix("rebuilding ") {
            let frac = p.split_whitespace().next().unwrap_or("0/1");
            let (done, total) = frac.split_once('/').unwrap_or(("0", "1"));
            let (done, total): (u64, u64) = (done.parse()?, total.parse::<u64>()?.max(1));
            let pct = done * 100 / total;
            let width = 40;
            let filled = (done * width / total) as usize;
            let secs = started.elapsed().as_secs_f64().max(0.001);
            // Without a terminal, print a line per 10% instead of redrawing.
            if tty || pct / 10 != last_pct / 10 {
                let bar = format!(
                    "[{}{}] {pct:3}% {done}/{total} blocks, {:.0} blocks/s",
                    "#".repeat(filled),
                    ".".repeat(width as usize - filled),
                    done as f64 / secs
                );
                if tty {
                    eprint!("\r{bar}");
                } else {
                    eprintln!("{bar}");
                }
                let _ = std::io::stderr().flush();
                last_pct = pct;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

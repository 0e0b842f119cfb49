//! `ftss-target`: the ftss iSCSI target daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ftss_target::config::{Config, DEFAULT_CONFIG};
use ftss_target::iscsi::Server;

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match &args.config {
        Some(p) => Config::load(p).with_context(|| format!("configuration {}", p.display()))?,
        None => Config::default_config(),
    };
    if args.check_config {
        println!("configuration OK");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let server = Server::start(config).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    })
}

//! `regrelay serve` / `regrelay check-config`: parse flags, validate the config before binding
//! anything (invalid config exits 64, EX_USAGE), start logging, bind, serve until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use regrelay::config::{Config, ConfigFile};
use regrelay::{server, telemetry, App};

/// Exit code for a usage or configuration error (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "Registry proxy that preserves and refreshes GitLab registry auth"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Proxy the registry API to the upstream registry.
    Serve(ConfigFile),
    /// Validate the configuration (same flags) and exit.
    CheckConfig(ConfigFile),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    let (raw, check_only) = match cli.command {
        Command::Serve(raw) => (raw, false),
        Command::CheckConfig(raw) => (raw, true),
    };
    let app = match Config::load(raw).and_then(App::new) {
        Ok(app) => app,
        Err(err) => {
            eprintln!("regrelay: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let config = app.config();
    if check_only {
        println!(
            "config ok: listen {} -> registry {}",
            config.listen, config.registry
        );
        return ExitCode::SUCCESS;
    }
    telemetry::init(config.log_format);
    match server::raise_fd_limit(&config.limits, config.upstreams.len()) {
        Ok(n) => tracing::info!(open_files = n, "file descriptor limit"),
        Err(err) => {
            tracing::error!(error = %err, "refusing to start");
            return ExitCode::from(EX_USAGE);
        }
    }
    match serve(app) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "fatal");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(app: App) -> anyhow::Result<()> {
    let config = app.config();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("bind {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let tls = config.tls.is_some();
    tracing::info!(addr = %addr, tls, registry = %config.registry, "listening");
    if app.access().keys().is_ephemeral() {
        tracing::warn!(
            "no --session-key-file: sessions are sealed with a random key of this process; \
             they die on restart and other replicas cannot open them (run one replica only)"
        );
    }
    // The first SIGTERM/SIGINT starts the phased shutdown; a second one ends the drain at once.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        let _ = first_tx.send(());
        server::shutdown_signal().await;
        let _ = second_tx.send(());
    });
    let first = async {
        let _ = first_rx.await;
    };
    let second = async {
        let _ = second_rx.await;
    };
    server::run(listener, Arc::new(app), first, second).await;
    Ok(())
}

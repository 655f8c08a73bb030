//! `regrelay serve` / `check-config` / `healthcheck` / `doctor`: parse flags, validate the config before binding
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
    /// Ask a running regrelay's health endpoint: exit 0 when it answers 200, 1 otherwise (for
    /// container HEALTHCHECKs and exec probes; the image needs no shell or curl).
    Healthcheck {
        /// The endpoint (`/-/healthy` is liveness, `/-/ready` readiness).
        #[arg(long, env = "REGRELAY_HEALTHCHECK_URL", default_value = regrelay::healthcheck::DEFAULT_URL)]
        url: String,
        /// Extra CA certificate (PEM) for an https URL.
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
    /// Say why `docker login` or a push fails from this CI job's environment, and how to fix it.
    Doctor(regrelay::doctor::DoctorArgs),
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
        Command::Healthcheck {
            url,
            ca_file,
            timeout_secs,
        } => return healthcheck(&url, ca_file.as_deref(), timeout_secs),
        Command::Doctor(args) => return doctor(args),
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

#[tokio::main(flavor = "current_thread")]
async fn doctor(args: regrelay::doctor::DoctorArgs) -> ExitCode {
    regrelay::doctor::run(args).await
}

#[tokio::main(flavor = "current_thread")]
async fn healthcheck(url: &str, ca_file: Option<&std::path::Path>, timeout_secs: u64) -> ExitCode {
    let timeout = std::time::Duration::from_secs(timeout_secs.max(1));
    match regrelay::healthcheck::check(url, ca_file, timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ regrelay::healthcheck::CheckError::Usage(_)) => {
            eprintln!("regrelay healthcheck: {err}");
            ExitCode::from(EX_USAGE)
        }
        Err(err) => {
            eprintln!("regrelay healthcheck: unhealthy: {err}");
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
    if let Some(metrics_addr) = config.metrics_listen {
        let metrics_listener = regrelay::metrics::bind(metrics_addr)
            .await
            .map_err(|e| anyhow::anyhow!("bind metrics {metrics_addr}: {e}"))?;
        let bound = metrics_listener.local_addr()?;
        tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
        tokio::spawn(regrelay::metrics::serve(
            metrics_listener,
            app.metrics().clone(),
        ));
    }
    tracing::info!(addr = %addr, tls, registry = %config.registry, "listening");
    if app.access().keys().is_ephemeral() {
        tracing::warn!(
            "no --session-key-file: sessions are sealed with a random key of this process; \
             they die on restart and other replicas cannot open them (run one replica only)"
        );
    }
    let app = Arc::new(app);
    // SIGHUP (`systemctl reload`) re-reads the TLS pair, the key ring and credential files.
    let reloading = app.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return tracing::warn!("SIGHUP cannot be caught: reload by restart");
        };
        while hangups.recv().await.is_some() {
            let refused = reloading.reload();
            tracing::info!(refused, "SIGHUP: reload done");
        }
    });
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
    server::run(listener, app, first, second).await;
    Ok(())
}

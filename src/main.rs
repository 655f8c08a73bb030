//! `regrelay serve` / `check-config` / `upgrade` / `healthcheck` / `doctor`: parse flags,
//! validate the config before binding or taking over anything (invalid config exits 64,
//! EX_USAGE), start logging, obtain the listening sockets, serve until SIGTERM/SIGINT or a
//! handover.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use regrelay::config::{Config, ConfigFile};
use regrelay::listeners::{self, Listeners};
use regrelay::upgrade::launch::Launcher;
use regrelay::upgrade::Takeover;
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
    Serve(ServeArgs),
    /// Validate the configuration (same flags) and exit.
    CheckConfig(ConfigFile),
    /// Upgrade in place (systemd's ExecReload): start `regrelay serve` with these flags from the
    /// binary installed now; it takes the listening sockets over from the regrelay running on
    /// `--upgrade-socket`, which drains and exits. Exits 0 once the new process serves, else with
    /// its exit code (the running one serves on).
    Upgrade(ConfigFile),
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

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigFile,
    /// Started by `regrelay upgrade`: take the sockets over (never bind them), report on stdin.
    #[arg(long = "launched-by-upgrade", hide = true)]
    launched_by_upgrade: bool,
}

fn main() -> ExitCode {
    // Socket activation's descriptors, taken (and LISTEN_FDS cleared) before any thread starts.
    let mut activation = listenfd::ListenFd::from_env();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let args: Vec<_> = std::env::args_os().collect();
            match regrelay::config::cli::explain(&err, &Cli::command(), &args) {
                Some(explained) => eprintln!("{explained}"),
                None => {
                    let _ = err.print();
                }
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    let (raw, launched, check_only) = match cli.command {
        Command::Serve(args) => (args.config, args.launched_by_upgrade, false),
        Command::CheckConfig(raw) => (raw, false, true),
        Command::Upgrade(raw) => return upgrade(raw),
        Command::Healthcheck {
            url,
            ca_file,
            timeout_secs,
        } => return healthcheck(&url, ca_file.as_deref(), timeout_secs),
        Command::Doctor(args) => return doctor(args),
    };
    let mut config = match Config::load(raw) {
        Ok(config) => config,
        Err(err) => {
            // Every problem, one line each: one run shows every mistake.
            for problem in err.each() {
                eprintln!("regrelay: {problem}");
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    // Logging first, so that opening the cache and the key ring is logged too.
    if !check_only {
        telemetry::init(config.log_format);
    }
    // Every check `serve` makes before it binds, the open-file limit included.
    let upstreams = config.upstreams.len();
    let (open_files, fitted) = match server::raise_fd_limit(&mut config.limits, upstreams) {
        Ok(got) => got,
        Err(err) => {
            eprintln!("regrelay: refusing to start: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let app = match App::new(config) {
        Ok(app) => app,
        Err(err) => {
            eprintln!("regrelay: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let config = app.config();
    if check_only {
        for warning in fitted.into_iter().chain(app.startup_warnings()) {
            eprintln!("regrelay: warning: {warning}");
        }
        println!(
            "config ok: listen {} -> registry {} (open-file limit {open_files})",
            config.listen, config.registry
        );
        return ExitCode::SUCCESS;
    }
    regrelay::lifecycle::log_checks(open_files, fitted, &app);
    // The configuration is valid: only now are a running regrelay's sockets taken over.
    let (listeners, takeover) = match listeners::obtain(config, &mut activation, launched) {
        Ok(got) => got,
        Err(err) => {
            tracing::error!(error = %err, "refusing to start");
            let code = if err.is_usage() { EX_USAGE } else { 1 };
            return ExitCode::from(code);
        }
    };
    let launcher = launched.then(Launcher::from_stdin).and_then(|l| {
        l.map_err(|e| tracing::warn!(error = %e, "cannot report to `regrelay upgrade`"))
            .ok()
    });
    match serve(app, listeners, takeover, launcher) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "fatal");
            ExitCode::FAILURE
        }
    }
}

/// `regrelay upgrade FLAGS…`: checks the flags, then runs `regrelay serve FLAGS…` to take over.
fn upgrade(raw: ConfigFile) -> ExitCode {
    let config = match Config::load(raw) {
        Ok(config) => config,
        Err(err) => {
            for problem in err.each() {
                eprintln!("regrelay upgrade: {problem}");
            }
            eprintln!("regrelay upgrade: nothing was changed; the running regrelay serves on");
            return ExitCode::from(EX_USAGE);
        }
    };
    if config.upgrade_socket.is_none() {
        eprintln!(
            "regrelay upgrade: needs --upgrade-socket, the path the running regrelay listens on \
             (its own --upgrade-socket)"
        );
        return ExitCode::from(EX_USAGE);
    }
    // The same flags, as given: argv is `regrelay upgrade FLAGS…`.
    let flags: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    regrelay::upgrade::launch::run(&flags)
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

/// Serves on `--workers` threads of their own (the process's runtime, one thread, accepts and
/// runs the metrics listener, signals and upgrades), or with `--workers 0` everything on one
/// work-stealing runtime.
fn serve(
    app: App,
    listeners: Listeners,
    takeover: Option<Takeover>,
    launcher: Option<Launcher>,
) -> anyhow::Result<()> {
    let count = app.config().workers;
    let workers = server::Workers::start(count, None, None)
        .map_err(|e| anyhow::anyhow!("cannot start {count} worker threads: {e}"))?;
    let mut runtime = match count {
        0 => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = runtime
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start a runtime: {e}"))?;
    runtime.block_on(regrelay::lifecycle::serve(
        app,
        listeners,
        takeover,
        launcher,
        regrelay::lifecycle::Stops::Signals,
        workers,
    ))
}

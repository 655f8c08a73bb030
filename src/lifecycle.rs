//! A serving process from its sockets to its exit: serves the proxy ([`server::run`]) and the
//! metrics ([`server::admin`], drained with the proxy) on the sockets [`crate::listeners`] obtained, re-reads its files on SIGHUP, stops in
//! phases on SIGTERM/SIGINT (a second signal ends the drain), and, with `--upgrade-socket`,
//! hands its sockets to a successor ([`crate::upgrade`]) and drains without the not-ready delay.
//! A process that took over tells its predecessor to drain once it serves, says so in its
//! `listening` line, and tells systemd it is the unit's main process now.
//!
//! Not here: flags, config validation and the choice of sockets (the binary's `main` and
//! [`crate::listeners`], before the runtime starts).

use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::listeners::Listeners;
use crate::server::{self, Stop, Workers};
use crate::upgrade::launch::Launcher;
use crate::upgrade::wire::Role;
use crate::upgrade::{self, notify, Offer, Takeover, UpgradeSocket};
use crate::App;

/// Logs what `serve` found before it binds: the open-file limit, and every warning of the
/// configuration (`fitted`: limits lowered to fit the open-file limit).
pub fn log_checks(open_files: u64, fitted: Option<String>, app: &App) {
    tracing::info!(open_files, "file descriptor limit");
    for warning in fitted.into_iter().chain(app.startup_warnings()) {
        tracing::warn!("{warning}");
    }
}

/// Serves until the process should exit: after a signal's (or the embedding's [`Stops`]) or a
/// handover's drain. Connections run on `workers`, which end with the drain.
pub async fn serve(
    app: App,
    listeners: Listeners,
    takeover: Option<Takeover>,
    launcher: Option<Launcher>,
    stops: Stops,
    workers: Workers,
) -> anyhow::Result<()> {
    let config = app.config().clone();
    let activated = listeners.activated;
    let listener = tokio::net::TcpListener::from_std(listeners.main)?;
    let addr = listener.local_addr()?;
    let mut offer = Offer::new();
    let upgrades = config.upgrade_socket.is_some();
    if upgrades {
        offer.add(Role::Listen, &listener, addr, activated)?;
    }
    // The admin listener serves until the proxy's drain ends, or a handover (see below).
    let (admin_stop, mut admin_stopping) = watch::channel(false);
    let admin_stop = Arc::new(admin_stop);
    let mut admin = None;
    if let Some(metrics) = listeners.metrics {
        let metrics = tokio::net::TcpListener::from_std(metrics)?;
        let bound = metrics.local_addr()?;
        if upgrades {
            offer.add(Role::Metrics, &metrics, bound, activated)?;
        }
        tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
        let until = async move {
            let _ = admin_stopping.wait_for(|stop| *stop).await;
        };
        admin = Some(tokio::spawn(server::admin::serve(
            metrics,
            app.metrics().clone(),
            until,
        )));
    }
    warn_of_ephemeral_keys(&app, upgrades);
    // A fresh process fails here, before serving, when its upgrade socket cannot be made; one
    // that takes over makes it only once its predecessor let go (see below).
    let mut upgrade_socket = match (&config.upgrade_socket, &takeover) {
        (Some(path), None) => Some(upgrade::listen(path)?),
        _ => None,
    };
    let app = Arc::new(app);
    let signals = match stops {
        Stops::Signals => {
            reload_on_sighup(app.clone());
            Signals::watch()
        }
        Stops::Handle(signals) => signals,
    };
    let (handed_tx, handed_rx) = oneshot::channel::<u32>();
    let shutdown = {
        let mut stopping = signals.stopping.clone();
        async move {
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => Stop::Signal,
                Ok(to_pid) = handed_rx => Stop::HandedOver { to_pid },
            }
        }
    };
    let force = signals.force;
    let workers = Arc::new(workers);
    let server = tokio::spawn(server::run(
        listener,
        workers.clone(),
        app.clone(),
        shutdown,
        async move {
            let _ = force.await;
        },
    ));
    let from_pid = match takeover {
        Some(takeover) => Some(finish_takeover(takeover).await),
        None => None,
    };
    if let (Some(path), Some(_)) = (&config.upgrade_socket, from_pid) {
        upgrade_socket = upgrade::listen(path)
            .map_err(|e| tracing::error!(error = %e, "upgrades of this process are off"))
            .ok();
    }
    if let Some(socket) = upgrade_socket {
        let stopping = signals.stopping.clone();
        tokio::spawn(serve_upgrades(
            socket,
            offer,
            stopping,
            handed_tx,
            admin_stop.clone(),
        ));
    }
    let tls = config.tls.is_some();
    let s = Summary::of(&app);
    match from_pid {
        Some(from) => tracing::info!(
            addr = %addr, tls, registry = %config.registry, version = s.version,
            public_urls = %s.public_urls, upstreams = %s.upstreams, cache = %s.cache,
            session_keys = %s.session_keys, took_over_from = from, "listening"
        ),
        None => tracing::info!(
            addr = %addr, tls, registry = %config.registry, version = s.version,
            public_urls = %s.public_urls, upstreams = %s.upstreams, cache = %s.cache,
            session_keys = %s.session_keys, "listening"
        ),
    }
    if let Err(e) = notify::ready(&format!("serving on {addr}")) {
        tracing::warn!(error = %e, "cannot tell systemd (NOTIFY_SOCKET) that regrelay is ready");
    }
    if let (Some(launcher), Some(from)) = (launcher, from_pid) {
        launcher.took_over(from);
    }
    server.await?;
    if let Some(workers) = Arc::into_inner(workers) {
        workers.stop().await;
    }
    // The drain is over: so is the admin listener's.
    admin_stop.send_replace(true);
    if let Some(admin) = admin {
        admin.await?;
    }
    Ok(())
}

/// What the `listening` line says of the process, so that one line answers "what is running
/// here": the version, the names clients use, where each upstream goes, the cache and the key
/// ring (never a secret: paths, origins and a key id).
struct Summary {
    version: &'static str,
    public_urls: String,
    upstreams: String,
    cache: String,
    session_keys: String,
}

impl Summary {
    fn of(app: &App) -> Summary {
        let config = app.config();
        let public_urls = config
            .public_url
            .iter()
            .chain(&config.public_aliases)
            .map(ToString::to_string)
            .collect::<Vec<_>>();
        let public_urls = if public_urls.is_empty() {
            "each request's Host".to_owned()
        } else {
            public_urls.join(",")
        };
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| match i {
                0 => format!("default={}", u.origin),
                _ => format!("{}={}", u.name, u.origin),
            })
            .collect::<Vec<_>>()
            .join(",");
        let cache = match &config.cache {
            Some(c) => format!(
                "{} (max {} bytes{})",
                c.dir.display(),
                c.max_bytes,
                if c.serve_stale { ", serves stale" } else { "" }
            ),
            None => "off".to_owned(),
        };
        let keys = app.access().keys().describe();
        let session_keys = match &config.session_key_file {
            Some(path) => format!("{keys} from {}", path.display()),
            None => keys,
        };
        Summary {
            version: env!("CARGO_PKG_VERSION"),
            public_urls,
            upstreams,
            cache,
            session_keys,
        }
    }
}

/// Tells the predecessor to drain (this process accepts already); returns its pid. Serving goes
/// on if it does not answer: it may have died, and if not, it drains on the next signal.
async fn finish_takeover(takeover: Takeover) -> u32 {
    let from = takeover.from_pid();
    match tokio::task::spawn_blocking(move || takeover.drain()).await {
        Ok(Ok(())) => tracing::info!(
            from_pid = from,
            "took over the listening sockets; the old process drains"
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, from_pid = from, "the old process did not confirm it stopped accepting")
        }
        Err(e) => tracing::warn!(error = %e, "takeover task failed"),
    }
    from
}

/// Serves upgrades until one succeeds (then the admin listener stops accepting here, and
/// `handed` stops the server's accepting) or this process starts stopping (it hands nothing
/// over; its duplicates of the sockets close, so the port closes with its listener).
async fn serve_upgrades(
    socket: UpgradeSocket,
    offer: Offer,
    mut stopping: watch::Receiver<bool>,
    handed: oneshot::Sender<u32>,
    admin_stop: Arc<watch::Sender<bool>>,
) {
    tokio::select! {
        to_pid = socket.serve(offer) => {
            admin_stop.send_replace(true);
            let _ = handed.send(to_pid);
        }
        _ = stopping.wait_for(|s| *s) => {}
    }
}

fn warn_of_ephemeral_keys(app: &App, upgrades: bool) {
    if !app.access().keys().is_ephemeral() {
        return;
    }
    tracing::warn!(
        "no --session-key-file: sessions are sealed with a random key of this process; \
         they die on restart and other replicas cannot open them (run one replica only)"
    );
    if upgrades {
        tracing::warn!(
            "--upgrade-socket without --session-key-file: the process taking over cannot open \
             this one's sessions, so clients log in again after an upgrade"
        );
    }
}

/// SIGHUP (`kill -HUP`) re-reads the TLS pair, the key ring and credential files.
fn reload_on_sighup(app: Arc<App>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return tracing::warn!("SIGHUP cannot be caught: reload by restart");
        };
        while hangups.recv().await.is_some() {
            let refused = app.reload();
            tracing::info!(refused, "SIGHUP: reload done");
        }
    });
}

/// What stops serving (and what reloads).
pub enum Stops {
    /// The process's signals: SIGTERM/SIGINT stop, SIGHUP reloads (the binary).
    Signals,
    /// A [`StopHandle`] (regrelay embedded in another program: no signal is caught).
    Handle(Signals),
}

impl Stops {
    /// Stops by the returned handle.
    pub fn handle() -> (Stops, StopHandle) {
        let (stopping_tx, stopping) = watch::channel(false);
        let (force_tx, force) = oneshot::channel();
        let handle = StopHandle {
            stopping: stopping_tx,
            force: Some(force_tx),
        };
        (Stops::Handle(Signals { stopping, force }), handle)
    }
}

/// Stops a proxy served with [`Stops::handle`], as the first and the second signal do.
pub struct StopHandle {
    stopping: watch::Sender<bool>,
    force: Option<oneshot::Sender<()>>,
}

impl StopHandle {
    /// The phased shutdown, as the first SIGTERM: not ready for the shutdown delay, then the
    /// drain.
    pub fn shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Ends the drain at once, as a second SIGTERM (and starts it, when it had not started).
    pub fn force(&mut self) {
        self.shutdown();
        if let Some(force) = self.force.take() {
            let _ = force.send(());
        }
    }
}

/// What stops serving: the first sets `stopping` (the phased shutdown; no more upgrades), the
/// second resolves `force` (the drain ends at once). From SIGTERM/SIGINT, signals within
/// [`server::SIGNAL_BURST`] of the first are part of it (`timeout` sends SIGTERM twice at once):
/// they end nothing.
pub struct Signals {
    stopping: watch::Receiver<bool>,
    force: oneshot::Receiver<()>,
}

impl Signals {
    fn watch() -> Signals {
        let (stopping_tx, stopping) = watch::channel(false);
        let (force_tx, force) = oneshot::channel();
        let mut signals = server::ShutdownSignals::listen();
        tokio::spawn(async move {
            let first = signals.next().await;
            let again = if first == "SIGINT" {
                "Ctrl-C"
            } else {
                "SIGTERM"
            };
            tracing::info!(
                signal = first,
                "shutting down: not ready for the shutdown delay, then the drain; {again} \
                 again ends them at once"
            );
            let _ = stopping_tx.send(true);
            let burst = tokio::time::sleep(server::SIGNAL_BURST);
            tokio::pin!(burst);
            let mut armed = false;
            loop {
                tokio::select! {
                    () = &mut burst, if !armed => {
                        armed = true;
                        tracing::info!("a second signal now ends the drain at once");
                    }
                    signal = signals.next() => {
                        if armed {
                            tracing::info!(signal, "second signal");
                            let _ = force_tx.send(());
                            return;
                        }
                        tracing::info!(
                            signal,
                            "arrived with the first (one burst, as `timeout` or a process-group \
                             kill sends): the drain goes on; send it again to end it at once"
                        );
                    }
                }
            }
        });
        Signals { stopping, force }
    }
}

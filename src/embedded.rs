//! regrelay inside another program: [`Proxy::start`] serves `regrelay serve FLAGS…` on a runtime
//! of its own, in this process, and returns once it listens (port 0 binds an ephemeral port:
//! [`Proxy::addr`]). Its log lines go to the writer it is given, in the format its flags ask
//! for; a panic on any of its threads (a request's task included, which tokio would otherwise
//! swallow) is raised again by [`Proxy::join`], [`Proxy::stop`] and the drop.
//!
//! The integration tests run regrelay this way; they spawn the binary only where the binary is
//! under test (flags and exit codes, signals, upgrades, systemd, the image, its memory and
//! descriptors). The same checks as `regrelay serve`'s run before it binds: every config
//! problem, the open-file limit (raised for this process), `App::new`.
//!
//! Not here: signals (an embedded proxy catches none; [`Proxy::shutdown`] and [`Proxy::stop`]
//! do what SIGTERM and a second one do), socket activation and `--launched-by-upgrade`.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::Parser;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{Config, ConfigFile};
use crate::lifecycle::{self, StopHandle, Stops};
use crate::listeners::{self, Listeners};
use crate::lock::lock;
use crate::server::Workers;
use crate::upgrade::Takeover;
use crate::{server, telemetry, App};

/// How long a stopped proxy's runtime waits for its blocking work (disk reads of the cache).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

/// `regrelay serve`'s flags.
#[derive(Parser)]
#[command(name = "regrelay serve")]
struct ServeFlags {
    #[command(flatten)]
    config: ConfigFile,
}

/// A proxy serving in this process. Dropping it stops it at once (as a second SIGTERM) and
/// waits for its threads.
pub struct Proxy {
    id: u64,
    addr: SocketAddr,
    /// Its runtime (the tests here run a task on it).
    #[cfg_attr(not(test), allow(dead_code))]
    runtime: tokio::runtime::Handle,
    stop: StopHandle,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("addr", &self.addr).finish()
    }
}

/// What `regrelay serve` checks and makes before the runtime starts.
struct Prepared {
    config: Config,
    open_files: u64,
    fitted: Option<String>,
    dispatch: tracing::Dispatch,
}

impl Prepared {
    fn new<W>(
        flags: impl IntoIterator<Item = impl Into<OsString> + Clone>,
        log_filter: &str,
        log: W,
    ) -> anyhow::Result<Prepared>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let argv = std::iter::once(OsString::from("regrelay serve"))
            .chain(flags.into_iter().map(Into::into))
            .collect::<Vec<_>>();
        let flags = ServeFlags::try_parse_from(argv).map_err(|e| anyhow!("{e}"))?;
        let mut config = Config::load(flags.config).map_err(|err| {
            let all = err.each().map(ToString::to_string).collect::<Vec<_>>();
            anyhow!("invalid configuration:\n{}", all.join("\n"))
        })?;
        let upstreams = config.upstreams.len();
        let (open_files, fitted) =
            server::raise_fd_limit(&mut config.limits, upstreams).map_err(|e| anyhow!(e))?;
        let (filter, refused) = telemetry::log_filter(Some(log_filter));
        let dispatch = telemetry::dispatch(config.log_format, filter, log);
        if let Some(why) = refused {
            tracing::dispatcher::with_default(&dispatch, || tracing::warn!("{why}"));
        }
        Ok(Prepared {
            config,
            open_files,
            fitted,
            dispatch,
        })
    }

    /// The app and its sockets (inside a runtime: the cache's index is read on it).
    fn bind(self) -> anyhow::Result<(App, Listeners, Option<Takeover>)> {
        let app = App::new(self.config).map_err(|e| anyhow!("{e}"))?;
        lifecycle::log_checks(self.open_files, self.fitted, &app);
        let no_activation = &mut listenfd::ListenFd::empty();
        let (listeners, takeover) = listeners::obtain(app.config(), no_activation, false)?;
        Ok((app, listeners, takeover))
    }
}

impl Proxy {
    /// Validates `regrelay serve`'s `flags` (without the program and subcommand names), binds,
    /// and serves on a runtime of its own until stopped; returns once it listens. `log_filter`
    /// is what `REGRELAY_LOG` would say (e.g. `regrelay=debug,info`); lines go to `log` (text or
    /// JSON as `--log-format` says). Environment variables count as for the binary.
    pub fn start<W>(
        flags: impl IntoIterator<Item = impl Into<OsString> + Clone>,
        log_filter: &str,
        log: W,
    ) -> anyhow::Result<Proxy>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let prepared = Prepared::new(flags, log_filter, log)?;
        let dispatch = prepared.dispatch.clone();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        watch_panics();
        let runtime = {
            let dispatch = dispatch.clone();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name(format!("regrelay-{id}"))
                .on_thread_start(move || enter(id, &dispatch))
                .on_thread_stop(leave)
                .build()
                .context("cannot start a runtime")?
        };
        let handle = runtime.handle().clone();
        let (stops, stop) = Stops::handle();
        let workers = {
            let dispatch = dispatch.clone();
            let start: server::ThreadHook = Arc::new(move || enter(id, &dispatch));
            let stop: server::ThreadHook = Arc::new(leave);
            Workers::start(prepared.config.workers, Some(start), Some(stop))
                .context("cannot start the worker threads")?
        };
        let (started_tx, started) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("regrelay-{id}"))
            .spawn(move || {
                enter(id, &dispatch);
                let served = runtime.block_on(async move {
                    let (app, listeners, takeover) = prepared.bind()?;
                    let _ = started_tx.send(listeners.main.local_addr()?);
                    lifecycle::serve(app, listeners, takeover, None, stops, workers).await
                });
                runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
                leave();
                served
            })
            .context("cannot start a thread")?;
        let mut proxy = Proxy {
            id,
            runtime: handle,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stop,
            thread: Some(thread),
        };
        match started.recv() {
            Ok(addr) => {
                proxy.addr = addr;
                Ok(proxy)
            }
            // It ended before listening: its error (or panic, raised again here).
            Err(_) => match proxy.join() {
                Ok(()) => Err(anyhow!("regrelay stopped before it listened")),
                Err(e) => Err(e),
            },
        }
    }

    /// Like [`Proxy::start`], serving on the current runtime, which must be a current-thread
    /// one (the test's: under `tokio::time::pause`, its deadlines run on the paused clock). Its
    /// log lines go to `log` while the [`LocalProxy`] lives, as this thread's default subscriber.
    pub fn start_local<W>(
        flags: impl IntoIterator<Item = impl Into<OsString> + Clone>,
        log_filter: &str,
        log: W,
    ) -> anyhow::Result<LocalProxy>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let prepared = Prepared::new(flags, log_filter, log)?;
        let log = tracing::dispatcher::set_default(&prepared.dispatch);
        let (app, listeners, takeover) = prepared.bind()?;
        let addr = listeners.main.local_addr()?;
        let (stops, stop) = Stops::handle();
        // Everything on the test's runtime (its clock): no worker threads.
        let task = tokio::spawn(lifecycle::serve(
            app,
            listeners,
            takeover,
            None,
            stops,
            Workers::here(),
        ));
        Ok(LocalProxy {
            addr,
            stop,
            task,
            _log: log,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the phased shutdown, as SIGTERM does (not ready for `--shutdown-delay-secs`, then
    /// the drain); [`Proxy::join`] waits for its end.
    pub fn shutdown(&self) {
        self.stop.shutdown();
    }

    /// Stops at once (as a second SIGTERM) and waits: see [`Proxy::join`].
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.force();
        self.join()
    }

    /// Waits until it has stopped; its error, if serving failed. A panic on any of its threads
    /// is raised again here.
    pub fn join(mut self) -> anyhow::Result<()> {
        self.wait()
    }

    fn wait(&mut self) -> anyhow::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let served = match thread.join() {
            Ok(served) => served,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        if let Some(message) = lock(panics()).remove(&self.id) {
            panic!(
                "a thread of the regrelay serving on {} panicked: {message}",
                self.addr
            );
        }
        served
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.force();
        if std::thread::panicking() {
            // Already unwinding (a failed test): end it without a second panic.
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            return;
        }
        if let Err(e) = self.wait() {
            tracing::debug!(error = %e, "embedded regrelay ended with an error");
        }
    }
}

/// A proxy serving on the test's current-thread runtime ([`Proxy::start_local`]). Dropping it
/// stops it at once.
pub struct LocalProxy {
    addr: SocketAddr,
    stop: StopHandle,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _log: tracing::dispatcher::DefaultGuard,
}

impl LocalProxy {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops at once and waits; a panic of its serving task is raised again here (a request's
    /// task that panics ends only its connection, as in the binary).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.force();
        match (&mut self.task).await {
            Ok(served) => served,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow!("regrelay's task ended: {e}")),
        }
    }
}

impl Drop for LocalProxy {
    fn drop(&mut self) {
        self.stop.force();
        self.task.abort();
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The proxy this thread serves, and its log subscriber.
    static SERVES: Cell<Option<u64>> = const { Cell::new(None) };
    static LOG: std::cell::RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { std::cell::RefCell::new(None) };
}

fn enter(id: u64, dispatch: &tracing::Dispatch) {
    SERVES.with(|s| s.set(Some(id)));
    let guard = tracing::dispatcher::set_default(dispatch);
    LOG.with(|l| *l.borrow_mut() = Some(guard));
}

fn leave() {
    LOG.with(|l| l.borrow_mut().take());
    SERVES.with(|s| s.set(None));
}

/// The first panic message of each proxy's threads, until its join takes it.
fn panics() -> &'static Mutex<HashMap<u64, String>> {
    static PANICS: OnceLock<Mutex<HashMap<u64, String>>> = OnceLock::new();
    PANICS.get_or_init(Mutex::default)
}

/// Chains a panic hook (once per process) that records a panic on a proxy's thread for its join.
fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(id) = SERVES.with(Cell::get) {
                let message = match info.payload().downcast_ref::<&str>() {
                    Some(s) => (*s).to_owned(),
                    None => info
                        .payload()
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "(not a string)".to_owned()),
                };
                let at = info
                    .location()
                    .map(|l| format!(" at {l}"))
                    .unwrap_or_default();
                lock(panics())
                    .entry(id)
                    .or_insert_with(|| format!("{message}{at}"));
            }
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Proxy {
        let flags = [
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "http://127.0.0.1:9",
        ];
        Proxy::start(flags, "regrelay=debug", std::io::sink).unwrap()
    }

    #[test]
    fn a_panic_on_any_of_its_threads_is_raised_by_stop() {
        let proxy = start();
        let task = proxy
            .runtime
            .spawn(async { panic!("a request's task broke") });
        // The task's own handle sees the panic; the proxy's owner would not, but for the join.
        assert!(proxy.runtime.block_on(task).unwrap_err().is_panic());
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| proxy.stop()));
        let message = match stopped {
            Ok(r) => panic!("stop() returned {r:?} after a panic on the proxy's runtime"),
            Err(panic) => panic.downcast::<String>().map(|s| *s).unwrap_or_default(),
        };
        assert!(message.contains("a request's task broke"), "{message}");
    }

    #[test]
    fn it_listens_on_the_address_it_reports_and_stops_at_once() {
        let proxy = start();
        let addr = proxy.addr();
        assert_ne!(addr.port(), 0);
        std::net::TcpStream::connect(addr).unwrap();
        proxy.stop().unwrap();
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "still listening"
        );
    }

    #[test]
    fn every_config_problem_is_returned() {
        let err = Proxy::start(["--max-connections", "0"], "info", std::io::sink).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`registry`"), "{err:#}");
        assert!(text.contains("`max_connections`"), "{err:#}");
    }
}

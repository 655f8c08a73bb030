//! Where the listening sockets come from, before anything is served: taken over from the
//! regrelay this process replaces ([`crate::upgrade`], when `--upgrade-socket` has one), passed
//! by systemd (socket activation: `LISTEN_FDS`, a `regrelay.socket` unit), or bound here.
//! A taken-over socket must be the one the configuration names (`--listen`, `--metrics-listen`;
//! port 0 matches any port): a new address is a restart, not an upgrade, and the old process is
//! told why and serves on. Only blocking std sockets here; [`crate::server`] and
//! [`crate::metrics`] serve them.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::upgrade::wire::Role;
use crate::upgrade::{self, Takeover, UpgradeError};

/// Pending connections the kernel queues per listener (tokio's and mio's own default).
const LISTEN_BACKLOG: i32 = 1024;

/// The sockets to serve.
pub struct Listeners {
    /// `--listen`.
    pub main: TcpListener,
    /// `--metrics-listen`, when on.
    pub metrics: Option<TcpListener>,
    /// The sockets came from systemd (directly, or through the process taken over from): their
    /// addresses are the socket unit's.
    pub activated: bool,
}

/// Why there is nothing to serve on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The configuration does not fit the sockets (exit 64).
    #[error("{0}")]
    Mismatch(String),
    /// The handover failed.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    /// `regrelay upgrade` started this process, and there is nothing to take over.
    #[error(
        "nothing listens on the upgrade socket {0}: no running regrelay to upgrade (start one \
         with `regrelay serve`, or `systemctl start regrelay`)"
    )]
    NothingToUpgrade(String),
}

impl ListenError {
    /// A configuration problem (exit 64, EX_USAGE), not a failure of the machine.
    pub fn is_usage(&self) -> bool {
        matches!(self, ListenError::Mismatch(_))
    }
}

/// The sockets, and the handover to finish once they are served (when taken over). Blocking;
/// call before the runtime starts (socket activation reads and clears `LISTEN_FDS`).
pub fn obtain(
    config: &Config,
    activation: &mut listenfd::ListenFd,
    must_take_over: bool,
) -> Result<(Listeners, Option<Takeover>), ListenError> {
    if let Some(path) = &config.upgrade_socket {
        if let Some(mut takeover) = upgrade::take_over(path)? {
            return match from_takeover(config, &mut takeover) {
                Ok(listeners) => Ok((listeners, Some(takeover))),
                Err(e) => {
                    takeover.refuse(&e.to_string());
                    Err(e)
                }
            };
        }
        if must_take_over {
            return Err(ListenError::NothingToUpgrade(display(path)));
        }
    }
    if activation.len() > 0 {
        return Ok((activated(config, activation)?, None));
    }
    let main = bind(config.listen)?;
    let metrics = config.metrics_listen.map(bind).transpose()?;
    let listeners = Listeners {
        main,
        metrics,
        activated: false,
    };
    Ok((listeners, None))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Binds `addr` as tokio would (`SO_REUSEADDR`, a backlog of 1024), close-on-exec and
/// non-blocking.
fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let bound = || -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    bound().map_err(|source| ListenError::Bind { addr, source })
}

/// True when `actual` is what `configured` asks for (port 0: any port of that IP).
fn same_address(configured: SocketAddr, actual: SocketAddr) -> bool {
    configured.ip() == actual.ip() && (configured.port() == 0 || configured.port() == actual.port())
}

/// The offered sockets, checked against the configuration.
fn from_takeover(config: &Config, takeover: &mut Takeover) -> Result<Listeners, ListenError> {
    let pid = takeover.from_pid();
    let (described, fd) = takeover.take(Role::Listen).ok_or_else(|| {
        ListenError::Mismatch(format!(
            "the running regrelay (pid {pid}) offered no --listen socket"
        ))
    })?;
    let activated = described.activated;
    if !activated && !same_address(config.listen, described.addr) {
        return Err(ListenError::Mismatch(format!(
            "--listen {} differs from the running regrelay's {} (pid {pid}): a new address \
             needs a restart (`systemctl restart regrelay`), not an upgrade",
            config.listen, described.addr
        )));
    }
    let main = TcpListener::from(fd);
    let metrics = match (config.metrics_listen, takeover.take(Role::Metrics)) {
        (Some(want), Some((offered, fd))) => {
            if !offered.activated && !same_address(want, offered.addr) {
                return Err(ListenError::Mismatch(format!(
                    "--metrics-listen {want} differs from the running regrelay's {} (pid \
                     {pid}): a new address needs a restart, not an upgrade",
                    offered.addr
                )));
            }
            Some(TcpListener::from(fd))
        }
        // Metrics newly on: a port of their own (the old process has none to close).
        (Some(want), None) => Some(bind(want)?),
        (None, Some((offered, _))) => {
            tracing::info!(addr = %offered.addr, "metrics are off in this configuration: their port closes with the old process");
            None
        }
        (None, None) => None,
    };
    for l in std::iter::once(&main).chain(&metrics) {
        l.set_nonblocking(true)
            .map_err(|source| ListenError::Bind {
                addr: l.local_addr().unwrap_or(config.listen),
                source,
            })?;
    }
    Ok(Listeners {
        main,
        metrics,
        activated,
    })
}

/// The sockets systemd passed: the first serves `--listen`, a second one `--metrics-listen`.
fn activated(config: &Config, fds: &mut listenfd::ListenFd) -> Result<Listeners, ListenError> {
    let n = fds.len();
    let wrong = |why: String| ListenError::Mismatch(format!("socket activation: {why}"));
    if n > 2 || (n == 2 && config.metrics_listen.is_none()) {
        return Err(wrong(format!(
            "systemd passed {n} sockets (LISTEN_FDS); regrelay serves the first on --listen's \
             behalf and a second only with --metrics-listen"
        )));
    }
    let take = |fds: &mut listenfd::ListenFd, i: usize| -> Result<TcpListener, ListenError> {
        let l = fds
            .take_tcp_listener(i)
            .map_err(|e| wrong(format!("socket {i}: {e} (ListenStream= of a TCP address)")))?
            .ok_or_else(|| wrong(format!("socket {i} was taken already")))?;
        l.set_nonblocking(true)
            .map_err(|e| wrong(format!("socket {i}: {e}")))?;
        Ok(l)
    };
    let main = take(fds, 0)?;
    let metrics = match config.metrics_listen {
        Some(_) if n == 2 => Some(take(fds, 1)?),
        Some(addr) => Some(bind(addr)?),
        None => None,
    };
    if let Ok(addr) = main.local_addr() {
        tracing::info!(%addr, "socket activation: serving the socket systemd passed (its address, not --listen's)");
    }
    Ok(Listeners {
        main,
        metrics,
        activated: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_matches_any_port_of_its_ip() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_address(a("127.0.0.1:0"), a("127.0.0.1:5000")));
        assert!(same_address(a("0.0.0.0:443"), a("0.0.0.0:443")));
        assert!(!same_address(a("0.0.0.0:443"), a("0.0.0.0:8443")));
        assert!(!same_address(a("127.0.0.1:0"), a("0.0.0.0:5000")));
    }
}

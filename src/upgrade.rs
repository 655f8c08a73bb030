//! Upgrades in place on one host: the running regrelay hands its listening sockets to its
//! successor over a Unix socket (`--upgrade-socket`), then drains. The port never closes, so no
//! client is refused and nothing in the listen backlog is lost: until the old process stops
//! accepting, both hold the same sockets, and whichever calls `accept` serves the connection.
//!
//! The new process pulls, as HAProxy's `-x` does (nginx's binary upgrade and Pingora's graceful
//! upgrade push from the old one instead); unlike Pingora, the old process stops accepting when
//! the new one says it serves, not after a fixed pause:
//!
//! ```text
//! new (serve, config valid)          old (serving, listening on --upgrade-socket, mode 0600)
//!   connect ------------------------>  accept; peer must be the same user (SO_PEERCRED) or root
//!   hello {version, pid} ------------>
//!                       <-------------  offer {pid, listeners} + SCM_RIGHTS (listen, metrics)
//!   checks the sockets against its own config; on a mismatch: refuse {reason} -> old serves on
//!   starts accepting
//!   drain --------------------------->  stops accepting at once (no not-ready delay), then the
//!                       <-------------  draining    grace / upload drain of SIGTERM, and exits
//!   listens on --upgrade-socket (a new socket renamed over the path), says it took over
//! ```
//!
//! A new process whose configuration does not load never connects (`regrelay serve` validates
//! first and exits 64). One that dies before `drain` leaves the old one serving: it never closed
//! anything. The old process serves upgrades until the first SIGTERM/SIGINT (a stopping process
//! hands nothing over) or until one succeeded.
//!
//! Not here: what a takeover does with the sockets ([`crate::listeners`] checks them against the
//! config), the drain itself ([`crate::server`]), and systemd's side of a reload ([`launch`]:
//! the `regrelay upgrade` command, [`notify`]: `sd_notify`).

pub mod launch;
pub mod notify;
pub mod wire;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wire::{Described, Message, Role};

/// Longest wait for each message of a handover; a peer silent for longer is given up on.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The upgrade socket exists but cannot be reached.
    #[error(
        "cannot connect to the upgrade socket {path}: {source} (is it another user's? \
         run as the user of the running regrelay)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The upgrade socket cannot be made.
    #[error(
        "cannot listen on the upgrade socket {path}: {source} (its directory must exist and be \
         writable, e.g. systemd's RuntimeDirectory=)"
    )]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The conversation broke off.
    #[error("upgrade handshake with pid {peer}: {source}")]
    Handshake {
        /// The other process (0: not known yet).
        peer: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The other side said something out of turn.
    #[error("upgrade handshake with pid {peer}: expected {expected}, got {got}")]
    Protocol {
        /// The other process.
        peer: u32,
        /// What should have come.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// The running regrelay declined to hand its sockets over, with its reason.
    #[error("the running regrelay declined the upgrade: {reason}")]
    Declined {
        /// Its reason.
        reason: String,
    },
    /// The successor declined, with its reason.
    #[error("pid {peer} declined to take over: {reason}")]
    Refused {
        /// The successor.
        peer: u32,
        /// Its reason.
        reason: String,
    },
}

fn handshake(peer: u32) -> impl Fn(io::Error) -> UpgradeError {
    move |source| UpgradeError::Handshake { peer, source }
}

fn unexpected(peer: u32, expected: &'static str, got: &Message) -> UpgradeError {
    UpgradeError::Protocol {
        peer,
        expected,
        got: format!("{got:?}"),
    }
}

/// The sockets a process hands to its successor: duplicates of its listeners, held only while
/// it serves upgrades (a stopping process must not keep its port open through them).
pub struct Offer {
    sockets: Vec<(Described, OwnedFd)>,
}

impl Offer {
    /// An empty offer.
    pub fn new() -> Offer {
        Offer { sockets: vec![] }
    }

    /// Adds a duplicate of `listener`.
    pub fn add(
        &mut self,
        role: Role,
        listener: &impl AsFd,
        addr: SocketAddr,
        activated: bool,
    ) -> io::Result<()> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        let described = Described {
            role,
            addr,
            activated,
        };
        self.sockets.push((described, fd));
        Ok(())
    }
}

impl Default for Offer {
    fn default() -> Offer {
        Offer::new()
    }
}

/// The old side: the listening upgrade socket.
pub struct UpgradeSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

/// Listens on `path` (mode 0600): binds a new socket beside it, restricts it, and renames it
/// over the path, so the path always names a socket only this user can reach, and a
/// successor's replaces its predecessor's atomically. Call within the runtime.
pub fn listen(path: &Path) -> Result<UpgradeSocket, UpgradeError> {
    let err = |source| UpgradeError::Listen {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(io::ErrorKind::InvalidInput.into()))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let bound = std::os::unix::net::UnixListener::bind(&temp).map_err(err)?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(err(e));
    }
    bound.set_nonblocking(true).map_err(err)?;
    let listener = tokio::net::UnixListener::from_std(bound).map_err(err)?;
    Ok(UpgradeSocket {
        listener,
        path: path.to_owned(),
    })
}

impl UpgradeSocket {
    /// Serves upgrade requests until one succeeds; returns the successor's pid. A failed one is
    /// logged and this process serves on. Dropping the future stops serving upgrades (the
    /// offer's duplicates close once a handover under way has given up).
    pub async fn serve(self, offer: Offer) -> u32 {
        let offer = Arc::new(offer);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(peer) = trusted_peer(&stream) else {
                continue;
            };
            tracing::info!(pid = peer, socket = %self.path.display(), "upgrade requested");
            let offer = offer.clone();
            let stream = match stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade socket: cannot use the connection");
                    continue;
                }
            };
            let done = tokio::task::spawn_blocking(move || hand_over(&stream, &offer)).await;
            match done {
                Ok(Ok(pid)) => return pid,
                Ok(Err(e)) => tracing::warn!(error = %e, "upgrade did not happen; still serving"),
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade handshake task failed; still serving")
                }
            }
        }
    }
}

/// The peer's pid when it runs as this process's user or as root; `None` (logged) otherwise.
/// The socket's mode already keeps other users out; this holds even if its directory's
/// permissions do not.
fn trusted_peer(stream: &tokio::net::UnixStream) -> Option<u32> {
    match rustix::net::sockopt::socket_peercred(stream) {
        Ok(cred) => {
            let uid = cred.uid.as_raw();
            if uid == rustix::process::getuid().as_raw() || uid == 0 {
                return Some(cred.pid.as_raw_pid().unsigned_abs());
            }
            tracing::warn!(
                pid = cred.pid.as_raw_pid(),
                uid,
                "upgrade socket: a process of another user connected; refused"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "upgrade socket: peer credentials unreadable; refused");
            None
        }
    }
}

/// Blocking, old side: offers the sockets; returns the successor's pid once it said `drain`
/// (and was told `draining`).
fn hand_over(stream: &UnixStream, offer: &Offer) -> Result<u32, UpgradeError> {
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(handshake(0))?;
    let peer = match wire::read(stream).map_err(handshake(0))? {
        Message::Hello { version, pid } if version == wire::VERSION => pid,
        Message::Hello { version, pid } => {
            let reason = format!(
                "it speaks upgrade protocol {version}, the running regrelay (pid {}) speaks {}: \
                 restart instead (`systemctl restart regrelay`)",
                std::process::id(),
                wire::VERSION
            );
            let _ = wire::send(
                stream,
                &Message::Refuse {
                    reason: reason.clone(),
                },
            );
            return Err(UpgradeError::Refused { peer: pid, reason });
        }
        other => return Err(unexpected(0, "hello", &other)),
    };
    let listeners = offer.sockets.iter().map(|(d, _)| d.clone()).collect();
    let fds: Vec<_> = offer.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let msg = Message::Offer {
        pid: std::process::id(),
        listeners,
    };
    wire::send_with_fds(stream, &msg, &fds).map_err(handshake(peer))?;
    match wire::read(stream).map_err(handshake(peer))? {
        Message::Drain => {
            wire::send(stream, &Message::Draining).map_err(handshake(peer))?;
            Ok(peer)
        }
        Message::Refuse { reason } => Err(UpgradeError::Refused { peer, reason }),
        other => Err(unexpected(peer, "drain or refuse", &other)),
    }
}

/// The new side: the sockets received, and the conversation to finish.
pub struct Takeover {
    stream: UnixStream,
    from_pid: u32,
    sockets: Vec<(Described, OwnedFd)>,
}

/// Blocking, new side: asks the regrelay listening on `path` for its sockets. `Ok(None)` when
/// none listens there (no socket file, or a stale one).
pub fn take_over(path: &Path) -> Result<Option<Takeover>, UpgradeError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(UpgradeError::Connect {
                path: path.to_owned(),
                source,
            })
        }
    };
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(handshake(0))?;
    let hello = Message::Hello {
        version: wire::VERSION,
        pid: std::process::id(),
    };
    wire::send(&stream, &hello).map_err(handshake(0))?;
    let (msg, fds) = wire::read_with_fds(&stream).map_err(handshake(0))?;
    let (pid, listeners) = match msg {
        Message::Offer { pid, listeners } => (pid, listeners),
        // The running regrelay declines (another protocol version).
        Message::Refuse { reason } => return Err(UpgradeError::Declined { reason }),
        other => return Err(unexpected(0, "offer", &other)),
    };
    if listeners.len() != fds.len() {
        return Err(UpgradeError::Protocol {
            peer: pid,
            expected: "one descriptor per listener",
            got: format!("{} listeners, {} descriptors", listeners.len(), fds.len()),
        });
    }
    Ok(Some(Takeover {
        stream,
        from_pid: pid,
        sockets: listeners.into_iter().zip(fds).collect(),
    }))
}

impl Takeover {
    /// The process taken over from.
    pub fn from_pid(&self) -> u32 {
        self.from_pid
    }

    /// Takes the socket for `role`, when offered.
    pub fn take(&mut self, role: Role) -> Option<(Described, OwnedFd)> {
        let i = self.sockets.iter().position(|(d, _)| d.role == role)?;
        Some(self.sockets.remove(i))
    }

    /// Declines: the old process keeps serving and logs `reason`.
    pub fn refuse(self, reason: &str) {
        let msg = Message::Refuse {
            reason: reason.to_owned(),
        };
        if let Err(e) = wire::send(&self.stream, &msg) {
            tracing::debug!(error = %e, "telling the old process why not");
        }
    }

    /// Blocking: tells the old process to stop accepting (call once this one accepts) and waits
    /// until it says it does.
    pub fn drain(self) -> Result<(), UpgradeError> {
        let peer = self.from_pid;
        wire::send(&self.stream, &Message::Drain).map_err(handshake(peer))?;
        match wire::read(&self.stream).map_err(handshake(peer))? {
            Message::Draining => Ok(()),
            other => Err(unexpected(peer, "draining", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;

    /// An old side on `path` (one connection, run on a thread) with one listening socket.
    fn old_side(
        path: &Path,
    ) -> (
        SocketAddr,
        std::thread::JoinHandle<Result<u32, UpgradeError>>,
    ) {
        let unix = UnixListener::bind(path).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut offer = Offer::new();
        offer.add(Role::Listen, &tcp, addr, false).unwrap();
        let old = std::thread::spawn(move || {
            let (stream, _) = unix.accept().unwrap();
            hand_over(&stream, &offer)
        });
        (addr, old)
    }

    #[test]
    fn a_takeover_receives_the_socket_and_the_old_side_learns_who_drains_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        let (addr, old) = old_side(&path);
        let mut takeover = take_over(&path).unwrap().expect("someone listens");
        assert_eq!(takeover.from_pid(), std::process::id());
        let (described, fd) = takeover.take(Role::Listen).unwrap();
        assert_eq!(described.addr, addr);
        assert!(takeover.take(Role::Metrics).is_none());
        let listener = TcpListener::from(fd);
        takeover.drain().unwrap();
        assert_eq!(old.join().unwrap().unwrap(), std::process::id());
        // The offer's duplicate is gone with the old side; the received socket still accepts.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.accept().unwrap();
    }

    #[test]
    fn a_refusal_reaches_the_old_side_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        let (_, old) = old_side(&path);
        take_over(&path)
            .unwrap()
            .unwrap()
            .refuse("--listen differs");
        let err = old.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, UpgradeError::Refused { reason, .. } if reason == "--listen differs"),
            "{err}"
        );
    }

    #[test]
    fn no_socket_or_a_stale_one_is_nothing_to_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        assert!(take_over(&path).unwrap().is_none());
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(take_over(&path).unwrap().is_none());
    }
}

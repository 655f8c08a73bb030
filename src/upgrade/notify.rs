//! `sd_notify(3)` for `Type=notify` units: one datagram of `KEY=VALUE` lines to the socket named
//! by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). regrelay says `READY=1`
//! once it accepts, with `MAINPID=` its own pid: after an upgrade the new process is not the one
//! systemd started, and `NotifyAccess=all` lets systemd take its word for it (systemd accepts a
//! new main pid while a reload runs, which is when `regrelay upgrade` starts it).
//!
//! Not here: `STOPPING=1`. systemd would stop the unit on it, and after a handover the draining
//! process is no longer the unit's main process.

use std::ffi::OsStr;
use std::io;

/// The variable systemd sets for `Type=notify` units.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd that this process is the unit's main process and ready. No-op outside
/// systemd (no `NOTIFY_SOCKET`); returns whether a message was sent.
pub fn ready(status: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(target) => ready_to(&target, status).map(|()| true),
        None => Ok(false),
    }
}

/// [`ready`] to `target`.
fn ready_to(target: &OsStr, status: &str) -> io::Result<()> {
    let status: String = status.chars().filter(|c| *c != '\n').collect();
    let state = format!("MAINPID={}\nREADY=1\nSTATUS={status}\n", std::process::id());
    send(target, &state)
}

/// Sends `state` to `target` (a path, or `@name`).
fn send(target: &OsStr, state: &str) -> io::Result<()> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => send_abstract(&socket, name, state)?,
        None => socket.send_to(state.as_bytes(), target)?,
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "NOTIFY_SOCKET took part of the message",
        ));
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn send_abstract(
    socket: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    state: &str,
) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(
    _socket: &std::os::unix::net::UnixDatagram,
    _name: &[u8],
    _state: &str,
) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract NOTIFY_SOCKET addresses exist on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_names_this_process_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        ready_to(path.as_os_str(), "serving\non 127.0.0.1:1").unwrap();
        let got = received(&systemd);
        let pid = std::process::id();
        assert_eq!(
            got,
            format!("MAINPID={pid}\nREADY=1\nSTATUS=servingon 127.0.0.1:1\n")
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_at_sign_names_the_abstract_namespace() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("regrelay-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        ready_to(OsStr::new(&format!("@{name}")), "ok").unwrap();
        assert!(received(&systemd).contains("READY=1\n"));
    }
}

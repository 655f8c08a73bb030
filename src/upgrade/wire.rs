//! The upgrade socket's messages: one JSON object per line, and the listening sockets attached to
//! the offer by `SCM_RIGHTS`. Blocking std sockets with a deadline on every read: a handover is a
//! handful of small messages, run on a blocking thread (old side) or before the runtime starts
//! (new side). Knows nothing of what the sockets are for.
//!
//! Lines are read without a buffer that could run ahead: `read(2)` on a Unix socket discards
//! the descriptors of the bytes it returns, so the offer (the one message carrying them) is read
//! with `recvmsg` alone, and each side sends one message and then waits for the other's.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The protocol's version: a successor that speaks another is refused before anything is sent.
pub const VERSION: u32 = 1;
/// Most listening sockets one offer carries (the proxy's, the metrics one, room to grow).
pub const MAX_FDS: usize = 4;
/// Longest message; anything longer is a peer that is not regrelay.
const MAX_LINE: usize = 16 * 1024;

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `--listen`: the proxy (plain or TLS: TLS is the serving process's, not the socket's).
    Listen,
    /// `--metrics-listen`.
    Metrics,
}

/// One socket of an offer, in the order of the attached descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Described {
    /// What it is for.
    pub role: Role,
    /// Its bound address.
    pub addr: SocketAddr,
    /// Handed to the first process by systemd (`LISTEN_FDS`): its address is the socket unit's,
    /// not necessarily `--listen`'s.
    pub activated: bool,
}

/// A message on the upgrade socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Message {
    /// New → old: who asks, and in which protocol version.
    Hello {
        /// Protocol version ([`VERSION`]).
        version: u32,
        /// The new process.
        pid: u32,
    },
    /// Old → new, with the descriptors attached.
    Offer {
        /// The old process.
        pid: u32,
        /// The sockets, in descriptor order.
        listeners: Vec<Described>,
    },
    /// New → old: serving now; stop accepting and drain.
    Drain,
    /// New → old: the new process will not take over (its reason); keep serving.
    Refuse {
        /// Why, for the old process's log.
        reason: String,
    },
    /// Old → new: no longer accepting.
    Draining,
}

/// A line of JSON.
fn encode(msg: &Message) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).expect("messages serialize");
    line.push(b'\n');
    line
}

fn decode(line: &[u8]) -> io::Result<Message> {
    serde_json::from_slice(line).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a regrelay upgrade message ({e})"),
        )
    })
}

/// Sends `msg`.
pub fn send(mut stream: &UnixStream, msg: &Message) -> io::Result<()> {
    stream.write_all(&encode(msg))
}

/// Reads one message (the stream's read timeout applies to each read).
pub fn read(mut stream: &UnixStream) -> io::Result<Message> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: a handful of short messages, and nothing may be read past the line.
    loop {
        match stream.read(&mut byte)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => return decode(&line),
            _ if line.len() >= MAX_LINE => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message too long",
                ))
            }
            _ => line.push(byte[0]),
        }
    }
}

/// Sends `msg` with `fds` attached (to its first byte).
pub fn send_with_fds(stream: &UnixStream, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
    let line = encode(msg);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let sent = rustix::net::sendmsg(
        stream.as_fd(),
        &[IoSlice::new(&line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; the rest of the line (if the kernel took only
    // part of it) follows plainly.
    let mut stream = stream;
    stream.write_all(&line[sent..])
}

/// Reads one message and the descriptors attached to it (close-on-exec).
pub fn read_with_fds(stream: &UnixStream) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            stream.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_FDS} descriptors offered"),
            ));
        }
        if got.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // The peer sends one message and waits: nothing follows its newline.
        line.extend_from_slice(&buf[..got.bytes]);
        if line.last() == Some(&b'\n') {
            line.pop();
            return Ok((decode(&line)?, fds));
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message too long",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn an_offer_carries_listening_sockets_that_still_accept() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Message::Offer {
            pid: 7,
            listeners: vec![Described {
                role: Role::Listen,
                addr,
                activated: false,
            }],
        };
        send_with_fds(&a, &offer, &[listener.as_fd()]).unwrap();
        drop(listener);
        let (msg, mut fds) = read_with_fds(&b).unwrap();
        let Message::Offer { pid, listeners } = msg else {
            panic!("{msg:?}")
        };
        assert_eq!((pid, listeners[0].addr, fds.len()), (7, addr, 1));
        // The same socket: a connection to its address is accepted through the received one.
        let received = TcpListener::from(fds.remove(0));
        assert_eq!(received.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        received.accept().unwrap();
    }

    #[test]
    fn lines_round_trip_and_garbage_is_named() {
        let (a, b) = UnixStream::pair().unwrap();
        send(
            &a,
            &Message::Refuse {
                reason: "bad --registry".into(),
            },
        )
        .unwrap();
        send(&a, &Message::Drain).unwrap();
        assert!(
            matches!(read(&b).unwrap(), Message::Refuse { reason } if reason == "bad --registry")
        );
        assert!(matches!(read(&b).unwrap(), Message::Drain));
        (&a).write_all(b"GET / HTTP/1.1\n").unwrap();
        let err = read(&b).unwrap_err();
        assert!(
            err.to_string().contains("not a regrelay upgrade message"),
            "{err}"
        );
        drop(a);
        assert_eq!(read(&b).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}

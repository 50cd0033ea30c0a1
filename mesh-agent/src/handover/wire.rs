//! The handover channel: a `SOCK_SEQPACKET` Unix socket, so each message arrives
//! whole and with exactly the file descriptors sent with it (a stream socket can
//! split a frame and leave its descriptors on another read). A message is one JSON
//! object; descriptors ride in `SCM_RIGHTS`, in the order the message lists them.
use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

/// A listener of the node's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeListener {
    Readiness,
    Metrics,
}

/// A listener the agent binds in a pod's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodListener {
    Outbound,
    Tunnel,
    Plaintext,
}

/// What goes over the channel, in this order: `Hello` (successor), `Offer`
/// (previous agent, with the node listeners), one `Pod` per enrolled pod (with its
/// listeners), `End`; then, once the successor is ready, `Ready` (successor), and
/// `Draining` reports (previous agent) until it exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        pid: u32,
        version: String,
    },
    Offer {
        pid: u32,
        version: String,
        listeners: Vec<NodeListener>,
    },
    Pod {
        netns_cookie: u64,
        listeners: Vec<PodListener>,
    },
    End,
    Ready,
    Draining {
        connections: u64,
        /// Milliseconds since the Unix epoch.
        deadline_unix_ms: u64,
    },
}

impl Message {
    /// How many descriptors travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Offer { listeners, .. } => listeners.len(),
            Message::Pod { listeners, .. } => listeners.len(),
            _ => 0,
        }
    }
}

/// The largest message, and the most descriptors one message may carry (a pod has
/// at most six listeners).
pub const MAX_MESSAGE: usize = 16 * 1024;
pub const MAX_FDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("handover socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("handover channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("handover channel closed by the other agent")]
    Closed,
    #[error("handover message is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("handover message carries {got} descriptors where {want} were expected")]
    FdCount { got: usize, want: usize },
    #[error("handover message or its descriptors were truncated")]
    Truncated,
    #[error("handover message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("handover peer runs as uid {0}; only root or the agent's own user may take over")]
    NotAllowed(u32),
}

/// One end of a handover connection. Blocking: each side drives it from its own
/// thread (a handful of messages in the agent's lifetime).
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

impl Channel {
    /// Connects to an agent's handover socket. `Ok(None)`: no agent listens there
    /// (no socket file, or one left by an agent that is gone).
    pub fn connect(path: &Path) -> Result<Option<Channel>, WireError> {
        let err = |source| WireError::Socket {
            path: path.display().to_string(),
            source,
        };
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        let fd = seqpacket().map_err(err)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(Some(Channel { fd })),
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => Ok(None),
            Err(e) => Err(err(e.into())),
        }
    }

    /// Two connected ends (tests).
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// How long a receive may wait; `None`: for ever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        let tv = nix::sys::time::TimeVal::from(libc_timeval(timeout.unwrap_or_default()));
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// The uid of the process at the other end.
    pub fn peer_uid(&self) -> std::io::Result<u32> {
        Ok(socket::getsockopt(&self.fd, sockopt::PeerCredentials)?.uid())
    }

    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        if fds.len() != message.fd_count() {
            return Err(WireError::FdCount {
                got: fds.len(),
                want: message.fd_count(),
            });
        }
        let bytes = serde_json::to_vec(message)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsgs = if raw.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let iov = [IoSlice::new(&bytes)];
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        Ok(())
    }

    /// The next message and the descriptors that came with it (owned: they are
    /// closed if the caller drops them).
    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), WireError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(list) = c {
                    // SAFETY: the kernel just installed these descriptors in this
                    // process for us; nothing else owns them.
                    fds.extend(
                        list.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, fds, truncated)
        };
        if truncated {
            return Err(WireError::Truncated);
        }
        if len == 0 {
            return Err(WireError::Closed);
        }
        let message: Message = serde_json::from_slice(&buf[..len])?;
        if fds.len() != message.fd_count() {
            return Err(WireError::FdCount {
                got: fds.len(),
                want: message.fd_count(),
            });
        }
        Ok((message, fds))
    }
}

fn libc_timeval(d: Duration) -> nix::libc::timeval {
    nix::libc::timeval {
        tv_sec: d.as_secs() as nix::libc::time_t,
        tv_usec: d.subsec_micros() as nix::libc::suseconds_t,
    }
}

/// The previous agent's end: a listening socket only root (or the agent's user) can
/// reach.
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Binds `path`, replacing a socket file no agent answers on.
    pub fn bind(path: &Path) -> Result<Listener, WireError> {
        let err = |source| WireError::Socket {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // Whoever held it is gone (the caller checked that no agent answers).
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        let fd = seqpacket().map_err(err)?;
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = socket::bind(fd.as_raw_fd(), &addr);
        nix::sys::stat::umask(old);
        bound.map_err(|e| err(e.into()))?;
        socket::listen(&fd, Backlog::new(4).map_err(|e| err(e.into()))?)
            .map_err(|e| err(e.into()))?;
        Ok(Listener { fd })
    }

    /// The next agent that connects (blocking).
    pub fn accept(&self) -> Result<Channel, WireError> {
        let raw = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(std::io::Error::from)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Channel { fd })
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_arrive_whole_with_their_descriptors() {
        let (a, b) = Channel::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let msg = Message::Pod {
            netns_cookie: 42,
            listeners: vec![PodListener::Outbound, PodListener::Tunnel],
        };
        a.send(&msg, &[l1.as_fd(), l2.as_fd()]).unwrap();
        a.send(&Message::End, &[]).unwrap();
        let (got, fds) = b.recv().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 2);
        // The same sockets: bound to the same ports.
        let back = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(back.local_addr().unwrap(), l1.local_addr().unwrap());
        assert_eq!(b.recv().unwrap().0, Message::End);
        drop(a);
        assert!(matches!(b.recv(), Err(WireError::Closed)));
    }

    #[test]
    fn a_message_with_the_wrong_number_of_descriptors_is_refused() {
        let (a, b) = Channel::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let msg = Message::Pod {
            netns_cookie: 1,
            listeners: vec![PodListener::Outbound, PodListener::Tunnel],
        };
        assert!(matches!(
            a.send(&msg, &[l1.as_fd()]),
            Err(WireError::FdCount { got: 1, want: 2 })
        ));
        // A peer that sends them anyway (or garbage) is refused on receipt.
        let raw = [l1.as_raw_fd()];
        let bytes = serde_json::to_vec(&msg).unwrap();
        socket::sendmsg::<()>(
            a.fd.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(matches!(b.recv(), Err(WireError::FdCount { .. })));
        socket::send(a.fd.as_raw_fd(), b"{not json", MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv(), Err(WireError::Decode(_))));
    }

    #[test]
    fn a_receive_times_out() {
        let (_a, b) = Channel::pair().unwrap();
        b.set_timeout(Some(Duration::from_millis(50))).unwrap();
        assert!(matches!(b.recv(), Err(WireError::Io(_))));
    }
}

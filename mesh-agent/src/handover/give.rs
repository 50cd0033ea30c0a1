//! The running agent's side: serve the handover socket, hand the listeners to a
//! successor, and report the drain to it.
//!
//! One thread accepts successors one at a time and talks to the agent's main loop
//! through [`Event`]s: the main loop owns the listeners (it dups them into an
//! [`Offer`]) and decides when to stop accepting.
use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::mpsc as std_mpsc,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{
    HELLO_TIMEOUT, unix_ms,
    wire::{Channel, Listener, Message, NodeListener, PodListener, WireError},
};

/// What the handover thread asks of, or tells, the main loop.
pub enum Event {
    /// A successor connected: answer with the listeners to hand over. From now on
    /// this agent is not ready (the successor is taking over).
    Successor {
        pid: u32,
        version: String,
        reply: oneshot::Sender<Offer>,
    },
    /// The successor is ready: stop accepting and drain. Send drain progress to
    /// `reports`; dropping it closes the channel (the successor sees this agent go).
    Ready { reports: std_mpsc::Sender<Report> },
    /// The successor went away before it was ready: serve on as before.
    Gone { error: String },
}

/// Duplicates of the listening sockets, to hand over.
#[derive(Default)]
pub struct Offer {
    pub node: Vec<(NodeListener, OwnedFd)>,
    pub pods: Vec<(u64, Vec<(PodListener, OwnedFd)>)>,
}

/// Drain progress, for the successor's `meshctl status`.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub connections: u64,
    pub deadline: SystemTime,
}

/// How long a connected successor may take to become ready before this agent gives
/// up on it and serves on (it keeps its listeners either way).
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Binds the handover socket and starts the thread that serves it.
pub fn serve(path: &Path) -> Result<mpsc::Receiver<Event>, WireError> {
    let listener = Listener::bind(path)?;
    let (tx, rx) = mpsc::channel(4);
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("mesh-handover".into())
        .spawn(move || {
            info!(socket = %path.display(), "handover socket listening");
            loop {
                let channel = match listener.accept() {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "handover accept failed");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                match hand_over(&channel, &tx) {
                    Ok(Some(reports)) => {
                        forward_reports(&channel, reports);
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        warn!(error = %e, "handover to a successor failed; serving on");
                        if tx
                            .blocking_send(Event::Gone {
                                error: e.to_string(),
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        })?;
    Ok(rx)
}

/// One successor: hello, offer, wait for ready. `Ok(Some(reports))` once it is
/// ready; `Ok(None)` when the main loop is gone.
fn hand_over(
    channel: &Channel,
    tx: &mpsc::Sender<Event>,
) -> Result<Option<std_mpsc::Receiver<Report>>, WireError> {
    let uid = channel.peer_uid()?;
    let me = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != me {
        return Err(WireError::NotAllowed(uid));
    }
    channel.set_timeout(Some(HELLO_TIMEOUT))?;
    let (pid, version) = match channel.recv()?.0 {
        Message::Hello { pid, version } => (pid, version),
        other => return Err(unexpected(&other)),
    };
    info!(successor_pid = pid, successor_version = %version, "a successor is taking over");
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx
        .blocking_send(Event::Successor {
            pid,
            version,
            reply: reply_tx,
        })
        .is_err()
    {
        return Ok(None);
    }
    let Ok(offer) = reply_rx.blocking_recv() else {
        return Ok(None);
    };
    send_offer(channel, &offer)?;
    // The sockets are the successor's now too; this agent's copies of the dups go.
    drop(offer);
    channel.set_timeout(Some(READY_TIMEOUT))?;
    match channel.recv()?.0 {
        Message::Ready => {}
        other => return Err(unexpected(&other)),
    }
    let (reports_tx, reports_rx) = std_mpsc::channel();
    if tx
        .blocking_send(Event::Ready {
            reports: reports_tx,
        })
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(reports_rx))
}

fn send_offer(channel: &Channel, offer: &Offer) -> Result<(), WireError> {
    let node: Vec<_> = offer.node.iter().map(|(k, _)| *k).collect();
    let fds: Vec<_> = offer.node.iter().map(|(_, fd)| fd.as_fd()).collect();
    channel.send(
        &Message::Offer {
            pid: std::process::id(),
            version: crate::admin::VERSION.to_owned(),
            listeners: node,
        },
        &fds,
    )?;
    for (cookie, listeners) in &offer.pods {
        let kinds: Vec<_> = listeners.iter().map(|(k, _)| *k).collect();
        let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        channel.send(
            &Message::Pod {
                netns_cookie: *cookie,
                listeners: kinds,
            },
            &fds,
        )?;
    }
    channel.send(&Message::End, &[])
}

/// Passes drain progress on until the main loop drops its end (the agent exits).
fn forward_reports(channel: &Channel, reports: std_mpsc::Receiver<Report>) {
    for r in reports {
        let sent = channel.send(
            &Message::Draining {
                connections: r.connections,
                deadline_unix_ms: unix_ms(r.deadline),
            },
            &[],
        );
        if sent.is_err() {
            // The successor is gone; the drain goes on regardless.
            return;
        }
    }
}

fn unexpected(m: &Message) -> WireError {
    WireError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected handover message {m:?}"),
    ))
}

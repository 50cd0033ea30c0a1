//! The new agent's side: receive the running agent's listeners, tell it when this
//! agent is ready, and follow its drain.
use std::{collections::HashMap, net::TcpListener, path::Path, sync::Arc};

use tracing::{info, warn};

use super::{
    HELLO_TIMEOUT, PreviousAgent, PreviousAgentStatus, PreviousState, from_unix_ms,
    wire::{Channel, Message, NodeListener, PodListener, WireError},
};

/// What a successor receives.
pub struct Inherited {
    pub node: HashMap<NodeListener, TcpListener>,
    /// By the netns cookie of the pod's network namespace.
    pub pods: HashMap<u64, Vec<(PodListener, TcpListener)>>,
    pub previous: Previous,
}

/// The agent being taken over from, still running.
pub struct Previous {
    pub pid: u32,
    pub version: String,
    channel: Channel,
}

/// Connects to the running agent, if there is one, and takes its listeners.
/// `Ok(None)`: no agent runs (a first start, or a restart after a crash).
pub fn take_over(path: &Path) -> Result<Option<Inherited>, WireError> {
    let Some(channel) = Channel::connect(path)? else {
        return Ok(None);
    };
    // The previous agent may be busy for a moment (a config change); a long wait
    // here holds this agent's start, not traffic.
    channel.set_timeout(Some(HELLO_TIMEOUT * 4))?;
    channel.send(
        &Message::Hello {
            pid: std::process::id(),
            version: crate::admin::VERSION.to_owned(),
        },
        &[],
    )?;
    let (pid, version, node) = match channel.recv()? {
        (
            Message::Offer {
                pid,
                version,
                listeners,
            },
            fds,
        ) => {
            let node = listeners
                .into_iter()
                .zip(fds)
                .map(|(k, fd)| (k, TcpListener::from(fd)))
                .collect();
            (pid, version, node)
        }
        (other, _) => return Err(unexpected(&other)),
    };
    let mut pods = HashMap::new();
    loop {
        match channel.recv()? {
            (
                Message::Pod {
                    netns_cookie,
                    listeners,
                },
                fds,
            ) => {
                let set: Vec<(PodListener, TcpListener)> = listeners
                    .into_iter()
                    .zip(fds)
                    .map(|(k, fd)| (k, TcpListener::from(fd)))
                    .collect();
                match check_pod_listeners(netns_cookie, &set) {
                    Ok(()) => {
                        pods.insert(netns_cookie, set);
                    }
                    Err(e) => {
                        warn!(netns_cookie, error = %e, "handed-over listeners refused; the pod's will be bound anew");
                    }
                }
            }
            (Message::End, _) => break,
            (other, _) => return Err(unexpected(&other)),
        }
    }
    info!(previous_pid = pid, previous_version = %version, pods = pods.len(),
        "took over the listeners of the running agent");
    Ok(Some(Inherited {
        node,
        pods,
        previous: Previous {
            pid,
            version,
            channel,
        },
    }))
}

/// A handed-over pod listener must be a listening socket of the pod's own network
/// namespace: the kernel's word, not the message's.
fn check_pod_listeners(cookie: u64, set: &[(PodListener, TcpListener)]) -> std::io::Result<()> {
    for (kind, l) in set {
        let sock = socket2::SockRef::from(l);
        if !sock.is_listener()? {
            return Err(std::io::Error::other(format!("{kind:?} is not listening")));
        }
        let actual = crate::inpod::netns_cookie(l)?;
        if actual != cookie {
            return Err(std::io::Error::other(format!(
                "{kind:?} belongs to netns {actual}, not {cookie}"
            )));
        }
    }
    Ok(())
}

impl Previous {
    /// Tells the previous agent this one is ready, then follows its drain into
    /// `status` until it exits, and calls `exited` then.
    pub fn ready(
        self,
        status: Arc<PreviousAgentStatus>,
        exited: impl FnOnce() + Send + 'static,
    ) -> Result<(), WireError> {
        let Previous {
            pid,
            version,
            channel,
        } = self;
        channel.send(&Message::Ready, &[])?;
        channel.set_timeout(None)?;
        info!(previous_pid = pid, "ready; the previous agent drains");
        status.set(|s| {
            *s = Some(PreviousAgent {
                pid,
                version,
                state: PreviousState::Draining,
                connections: 0,
                deadline: None,
            })
        });
        std::thread::Builder::new()
            .name("mesh-handover".into())
            .spawn(move || {
                loop {
                    match channel.recv() {
                        Ok((
                            Message::Draining {
                                connections,
                                deadline_unix_ms,
                            },
                            _,
                        )) => status.set(|s| {
                            if let Some(p) = s {
                                p.connections = connections;
                                p.deadline = Some(from_unix_ms(deadline_unix_ms));
                            }
                        }),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                info!(previous_pid = pid, "the previous agent exited");
                status.set(|s| {
                    if let Some(p) = s {
                        p.state = PreviousState::Exited;
                        p.connections = 0;
                    }
                });
                exited();
            })?;
        Ok(())
    }
}

fn unexpected(m: &Message) -> WireError {
    WireError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected handover message {m:?}"),
    ))
}

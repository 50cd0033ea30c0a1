//! The agent's end of the CNI plugin (`mesh-cni`): the container runtime's word on
//! where a new pod's network namespace is, and the answer the plugin waits for before
//! the pod's application may start.
//!
//! ADD opens the namespace at once and keeps the fd (the path is never opened again),
//! wakes the pod manager, and answers when the manager has enrolled the pod, or knows
//! it is not to be enrolled here. A pod the config does not know yet (the API source
//! may lag the runtime) is waited for until the timeout; then the sandbox fails and
//! the kubelet retries it: fail closed. DEL releases the namespace and the pod's
//! enrollment. Only root may use the socket (its mode, and the peer's credentials),
//! and a namespace is used for a pod only if it holds one of the pod's IPs.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_cni::protocol::{Command, MAX_LINE, Outcome, Reply, Request};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Notify, watch},
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::config::NamespacedName;

/// A request must arrive within this after the plugin connects.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Plugin connections handled at once (the runtime starts sandboxes in parallel).
const MAX_CONNS: usize = 64;

/// The namespaces the runtime named, by pod, and the pods whose sandbox was deleted.
/// One lock: ADD and DEL change both sets together.
#[derive(Default)]
pub struct CniNetns(Mutex<Sandboxes>);

#[derive(Default)]
struct Sandboxes {
    added: HashMap<NamespacedName, File>,
    deleted: HashSet<NamespacedName>,
}

impl CniNetns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sandboxes> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod's namespace, if the runtime named one (a new fd on the same file).
    pub fn get(&self, pod: &NamespacedName) -> Option<std::io::Result<File>> {
        self.lock().added.get(pod).map(File::try_clone)
    }

    /// Whether the pod's sandbox was deleted (and no new one added since).
    pub fn is_deleted(&self, pod: &NamespacedName) -> bool {
        self.lock().deleted.contains(pod)
    }

    fn add(&self, pod: NamespacedName, netns: File) {
        let mut s = self.lock();
        s.deleted.remove(&pod);
        s.added.insert(pod, netns);
    }

    fn delete(&self, pod: NamespacedName) {
        let mut s = self.lock();
        s.added.remove(&pod);
        s.deleted.insert(pod);
    }

    /// Forgets deleted sandboxes of pods the config no longer has (a deleted pod
    /// leaves the config soon after its sandbox), so the set is bounded by the config.
    pub fn retain_deleted(&self, known: impl Fn(&NamespacedName) -> bool) {
        self.lock().deleted.retain(|k| known(k));
    }

    /// Some sandbox was deleted and is remembered.
    pub fn has_deleted(&self) -> bool {
        !self.lock().deleted.is_empty()
    }

    /// Forgets the namespace of a sandbox whose ADD failed (the runtime tears it
    /// down and retries with a new one). Entries live from an ADD to its failure or
    /// to the sandbox's DEL, so they are bounded by the runtime's live sandboxes; a
    /// pod the config does not know yet keeps its entry while its ADD waits.
    fn forget(&self, pod: &NamespacedName) {
        self.lock().added.remove(pod);
    }
}

/// What the pod manager knows after each reconcile.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodStates {
    pub running: HashSet<NamespacedName>,
    /// This node's pods in the config that this agent does not enroll (not in the
    /// mesh, finished). Another node's pods are never asked about here.
    pub not_here: HashSet<NamespacedName>,
    /// Why a pod to enroll could not be, so far.
    pub failing: HashMap<NamespacedName, String>,
}

/// The answer for `pod` now, or `None` to keep waiting.
pub fn answer(states: &PodStates, pod: &NamespacedName) -> Option<Reply> {
    if states.running.contains(pod) {
        return Some(reply(Outcome::Enrolled, "enrolled"));
    }
    if states.not_here.contains(pod) {
        return Some(reply(Outcome::NotMeshed, "not in the mesh on this node"));
    }
    None
}

fn reply(outcome: Outcome, message: impl Into<String>) -> Reply {
    Reply {
        outcome,
        message: message.into(),
    }
}

/// Where the CNI server's answers come from and go.
#[derive(Clone)]
pub struct CniContext {
    pub netns: Arc<CniNetns>,
    /// Wakes the pod manager.
    pub kick: Arc<Notify>,
    pub states: watch::Receiver<Arc<PodStates>>,
    /// How long an ADD waits for the pod's enrollment.
    pub timeout: Duration,
}

/// Binds the root-only socket at `path` and serves the plugin until the agent stops.
/// `take_over`: the agent serving it now hands over to this one.
pub fn start(
    path: &Path,
    ctx: CniContext,
    take_over: bool,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = crate::admin::server::bind_socket(path, take_over)?;
    let listener = UnixListener::from_std(listener)?;
    info!(socket = %path.display(), "CNI socket listening");
    Ok(tokio::spawn(serve(listener, ctx)))
}

async fn serve(listener: UnixListener, ctx: CniContext) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("CNI connection refused: too many at once");
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(stream, ctx).await;
        });
    }
}

async fn handle(stream: UnixStream, ctx: CniContext) {
    // The socket is 0600; this holds even if someone loosens it.
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred().map(|c| c.uid()) {
        Ok(0) => {}
        Ok(u) if u == me => {}
        other => {
            warn!(peer = ?other, "CNI connection from a non-root peer refused");
            return;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE as u64));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let span = info_span!("cni", command = ?req.command, pod = %format!("{}/{}", req.namespace, req.name));
                carry(req, &ctx).instrument(span).await
            }
            Err(e) => reply(Outcome::Failed, format!("bad request: {e}")),
        },
        _ => return,
    };
    if let Ok(mut out) = serde_json::to_string(&reply) {
        out.push('\n');
        let _ = write.write_all(out.as_bytes()).await;
    }
}

async fn carry(req: Request, ctx: &CniContext) -> Reply {
    let pod = NamespacedName {
        namespace: req.namespace.clone(),
        name: req.name.clone(),
    };
    match req.command {
        Command::Del => {
            ctx.netns.delete(pod);
            ctx.kick.notify_one();
            info!("sandbox deleted: pod released");
            reply(Outcome::Released, "released")
        }
        Command::Check => answer(&ctx.states.borrow(), &pod)
            .unwrap_or_else(|| reply(Outcome::Failed, "the pod is not enrolled")),
        Command::Add => {
            let netns = match File::open(&req.netns) {
                Ok(f) => f,
                Err(e) => return reply(Outcome::Failed, format!("opening {}: {e}", req.netns)),
            };
            ctx.netns.add(pod.clone(), netns);
            ctx.kick.notify_one();
            let mut states = ctx.states.clone();
            let waited = tokio::time::timeout(ctx.timeout, async {
                loop {
                    if let Some(r) = answer(&states.borrow_and_update(), &pod) {
                        return r;
                    }
                    if states.changed().await.is_err() {
                        return reply(Outcome::Failed, "the agent is stopping");
                    }
                }
            })
            .await;
            match waited {
                Ok(r) => {
                    info!(outcome = ?r.outcome, "sandbox added");
                    r
                }
                Err(_) => {
                    ctx.netns.forget(&pod);
                    let why = ctx
                        .states
                        .borrow()
                        .failing
                        .get(&pod)
                        .cloned()
                        .unwrap_or_else(|| {
                            "the agent's config does not know the pod yet".to_owned()
                        });
                    warn!(error = %why, "sandbox not enrolled in time");
                    reply(
                        Outcome::Failed,
                        format!("not enrolled within {:?}: {why}", ctx.timeout),
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NamespacedName {
        NamespacedName {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_plugin_waits_until_the_pod_is_enrolled_or_known_to_stay_out() {
        let mut s = PodStates::default();
        assert_eq!(answer(&s, &id("web")), None);
        s.failing.insert(id("web"), "netns has no such IP".into());
        assert_eq!(
            answer(&s, &id("web")),
            None,
            "a failure so far is not the answer"
        );
        s.running.insert(id("web"));
        assert_eq!(answer(&s, &id("web")).unwrap().outcome, Outcome::Enrolled);
        s.not_here.insert(id("batch"));
        assert_eq!(
            answer(&s, &id("batch")).unwrap().outcome,
            Outcome::NotMeshed
        );
    }

    #[test]
    fn a_deleted_sandbox_stays_released_until_added_again() {
        let n = CniNetns::default();
        let f = File::open("/proc/self/ns/net").unwrap();
        n.add(id("web"), f);
        assert!(n.get(&id("web")).is_some());
        n.delete(id("web"));
        assert!(n.get(&id("web")).is_none());
        assert!(n.is_deleted(&id("web")));
        n.add(id("web"), File::open("/proc/self/ns/net").unwrap());
        assert!(!n.is_deleted(&id("web")));
        n.forget(&id("web"));
        assert!(n.get(&id("web")).is_none());
    }
}

//! The Kubernetes API source: one watch per kind (`kube::runtime::watcher`: list, then
//! watch from the list's resourceVersion, bookmarks, re-list on 410 Gone, exponential
//! backoff on errors), each object translated by the one translation on the kind's
//! own task, and applied one at a time to a [`Store`], so a bad object is refused
//! alone while the rest applies.
//!
//! Nothing is published until every kind has been listed once (or found absent): an
//! agent that enrolled pods from half a list could refuse traffic its policy allows.
//! After that, changes are published in batches, at most one config per [`SETTLE`].
//! Pods are in the mesh only when their labels (or their namespace's) say so.
pub mod annotate;
mod events;
pub mod lease;
mod resource;
mod route_status;
mod status_writer;
mod sync;

use std::{collections::BTreeMap, time::Duration};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tracing::{info, warn};

use super::{
    Kind, Store, enrollment, error::FieldError, object::translate, publish::Publisher,
    watch::ConfigSource,
};
pub use status_writer::ProblemsFn;
use status_writer::RouteStatusWriter;
use sync::{Input, Tracker};

/// At most one config is built per this long: a change after a quiet spell is
/// applied at once, and a burst of changes behind it gathers into one config.
const SETTLE: Duration = Duration::from_millis(100);
/// Inputs queued between the watches and the loop; a full queue holds the watches
/// back (the API server buffers), never grows the agent.
const QUEUE: usize = 1024;

pub struct ApiSource {
    client: Client,
    server: String,
    /// The kinds watched: all of them for the agent; the CA needs only Pods (and so
    /// needs RBAC on nothing else).
    kinds: Vec<Kind>,
    /// Where refused objects are reported as Events (the agents do it).
    events: Option<events::RejectionEvents>,
    /// Writes routes' status when this agent holds the lease (the agents do it).
    route_status: Option<RouteStatusWriter>,
}

impl ApiSource {
    pub fn new(client: Client, server: String) -> ApiSource {
        ApiSource {
            client,
            server,
            kinds: Kind::ALL.to_vec(),
            events: None,
            route_status: None,
        }
    }

    /// Reports each refused object as a Kubernetes Event, from reporting instance
    /// `instance` (the node's name). Call inside the runtime.
    pub fn report_events(mut self, instance: String) -> ApiSource {
        self.events = Some(events::RejectionEvents::start(
            self.client.clone(),
            instance,
        ));
        self
    }

    /// Writes each route's `status.parents` while this agent holds the lease
    /// `lease`; `problems` tells which routes could not attach to which parent. Call
    /// inside the runtime.
    pub fn write_route_status(
        mut self,
        lease: lease::LeaseSettings,
        problems: ProblemsFn,
    ) -> ApiSource {
        self.route_status = Some(RouteStatusWriter::start(
            self.client.clone(),
            lease,
            problems,
        ));
        self
    }

    /// Watches only `kinds`; the others stay empty.
    pub fn only(mut self, kinds: &[Kind]) -> ApiSource {
        self.kinds = kinds.to_vec();
        self
    }
}

impl ConfigSource for ApiSource {
    fn describe(&self) -> String {
        format!("kubernetes {}", self.server)
    }

    async fn run(mut self, mut publisher: Publisher) {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let watches: Vec<JoinHandle<()>> = self
            .kinds
            .iter()
            .map(|kind| tokio::spawn(watch_kind(self.client.clone(), *kind, tx.clone())))
            .collect();
        drop(tx);
        let mut tracker = Tracker::new(&self.kinds);
        let mut store = Store::default();
        let mut reported: BTreeMap<super::ObjectKey, FieldError> = BTreeMap::new();
        let mut errors: BTreeMap<Kind, String> = BTreeMap::new();
        let mut dirty = false;
        let mut publish_at: Option<Instant> = None;
        // When the last config was built, and when the oldest change not yet in a
        // config arrived.
        let mut last_built: Option<Instant> = None;
        let mut since: Option<Instant> = None;
        let mut announced = false;
        let mut route_status = self.route_status.take();
        loop {
            let deadline = publish_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let leadership = async {
                match route_status.as_mut() {
                    Some(w) => w.leadership_changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = rx.recv() => {
                    let Some(mut input) = input else { break };
                    note_errors(&input, &mut errors, &mut publisher, announced);
                    // Only objects arriving or leaving change what is refused.
                    let refusals_may_change =
                        !matches!(input, Input::Init(_) | Input::Failed(..) | Input::Expired(_));
                    if let (Some(w), Input::Applied { key, route: Some(meta), .. }) =
                        (route_status.as_mut(), &mut input)
                    {
                        w.seen(key, std::mem::take(meta.as_mut()));
                    }
                    let changed = tracker.apply(input, &mut store);
                    if changed {
                        since.get_or_insert_with(Instant::now);
                    }
                    if let Some(w) = route_status.as_mut().filter(|_| changed) {
                        w.touch();
                    }
                    dirty |= changed;
                    if refusals_may_change {
                        report_rejections(&store, &mut reported, self.events.as_ref());
                        publisher.rejected_objects(count_by_kind(&self.kinds, &reported));
                    }
                    let status_turn = route_status.as_ref().is_some_and(RouteStatusWriter::wants_turn);
                    if (dirty || status_turn || (tracker.ready() && !announced)) && publish_at.is_none() {
                        publish_at = Some(next_build(last_built, Instant::now()));
                    }
                }
                _ = leadership => {
                    if publish_at.is_none() {
                        publish_at = Some(next_build(last_built, Instant::now()));
                    }
                }
                _ = tokio::time::sleep_until(deadline), if publish_at.is_some() => {
                    publish_at = None;
                    // Whole once every kind was listed; a later re-list of one kind only
                    // adds and updates until its end removes what it did not send.
                    if announced || tracker.ready() {
                        if !announced {
                            info!(source = %self.server, "every kind listed; config is whole");
                            announced = true;
                        }
                        let config = store.config(enrollment::Default::NotEnrolled);
                        if let Some(w) = route_status.as_mut() {
                            w.write(&store, &config);
                        }
                        publisher.publish_since(config, since.take().map(Instant::into_std));
                        last_built = Some(Instant::now());
                        dirty = false;
                    }
                }
            }
            if publisher.is_closed() {
                break;
            }
        }
        watches.iter().for_each(JoinHandle::abort);
    }
}

/// When to build the next config: now, unless one was built less than [`SETTLE`]
/// ago.
fn next_build(last_built: Option<Instant>, now: Instant) -> Instant {
    last_built.map_or(now, |t| (t + SETTLE).max(now))
}

/// Logs each kind's watch failure once per distinct error, and recovery. Before the
/// first whole config a failure is the source's error (the agent is not ready and
/// says why); after it, the last good config keeps serving.
fn note_errors(
    input: &Input,
    errors: &mut BTreeMap<Kind, String>,
    publisher: &mut Publisher,
    ready: bool,
) {
    let (kind, now) = match input {
        Input::Expired(kind) => {
            info!(%kind, "the API server compacted the watch's history (410 Gone); re-listing");
            return;
        }
        Input::Failed(kind, e) => (kind, Some(e.as_str())),
        Input::Absent(kind) => (kind, Some(ABSENT)),
        Input::InitDone(kind) => (kind, None),
        _ => return,
    };
    if errors.get(kind).map(String::as_str) == now {
        return;
    }
    match now {
        None => info!(%kind, "watch recovered"),
        Some(ABSENT) => warn!(%kind, "the API server does not serve this kind (CRD not \
            installed?); none are applied, and the watch retries"),
        Some(e) if ready => {
            warn!(%kind, error = %e, "watch failed; retrying, the last good config serves");
        }
        Some(e) => publisher.reject(format!("watching {kind}: {e}")),
    }
    match now {
        Some(e) => errors.insert(*kind, e.to_owned()),
        None => errors.remove(kind),
    };
}

const ABSENT: &str = "absent";

/// Logs each refused object once per distinct error: the object, the field, and
/// whether an earlier version of it keeps serving.
fn report_rejections(
    store: &Store,
    reported: &mut BTreeMap<super::ObjectKey, FieldError>,
    events: Option<&events::RejectionEvents>,
) {
    let now: BTreeMap<_, _> = store
        .rejected()
        .into_iter()
        .map(|r| (r.key, (r.error, r.previous_serves)))
        .collect();
    for (key, (error, previous_serves)) in &now {
        if reported.get(key) != Some(error) {
            warn!(object = %key, field = %error.field, error = %error.message, previous_serves,
                "object rejected; the rest of the config applies");
            if let Some(events) = events {
                events.report(key, error, *previous_serves);
            }
        }
    }
    *reported = now.into_iter().map(|(k, (e, _))| (k, e)).collect();
}

/// How many objects of each watched kind are refused (zeros included, so a metric
/// shows every kind).
fn count_by_kind(
    kinds: &[Kind],
    refused: &BTreeMap<super::ObjectKey, FieldError>,
) -> BTreeMap<&'static str, u64> {
    let mut counts: BTreeMap<&'static str, u64> = kinds.iter().map(|k| (k.name(), 0)).collect();
    for key in refused.keys() {
        *counts.entry(key.kind.name()).or_default() += 1;
    }
    counts
}

/// Watches one kind for as long as the loop listens.
async fn watch_kind(client: Client, kind: Kind, tx: mpsc::Sender<Input>) {
    let ar = resource::api_resource(kind);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let input = match event {
            Ok(watcher::Event::Init) => Input::Init(kind),
            Ok(watcher::Event::InitApply(o)) => match applied(kind, o, true) {
                Some(i) => i,
                None => continue,
            },
            Ok(watcher::Event::Apply(o)) => match applied(kind, o, false) {
                Some(i) => i,
                None => continue,
            },
            Ok(watcher::Event::Delete(o)) => match resource::key_of(kind, &o.metadata) {
                Some(key) => Input::Deleted(key),
                None => continue,
            },
            Ok(watcher::Event::InitDone) => Input::InitDone(kind),
            Err(e) if not_served(&e) => Input::Absent(kind),
            Err(e) if expired(&e) => Input::Expired(kind),
            Err(e) => Input::Failed(kind, e.to_string()),
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

fn applied(kind: Kind, object: DynamicObject, listed: bool) -> Option<Input> {
    let key = resource::key_of(kind, &object.metadata)?;
    let route =
        status_writer::has_status(kind).then(|| Box::new(route_status::RouteMeta::of(&object)));
    let translated = translate(kind, resource::to_json(kind, object));
    Some(Input::Applied {
        key,
        object: Box::new(translated),
        listed,
        route,
    })
}

/// The resourceVersion the watch resumes from is compacted away (410 Gone), as an
/// event in the stream or as the answer to the watch request.
fn expired(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// The server has no such resource: 404 on the list (a CRD not installed).
fn not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// A client for the API server: from `kubeconfig` if given, else inferred (the pod's
/// service account in a cluster, `$KUBECONFIG` or `~/.kube/config` elsewhere). The
/// server's address comes back for the log.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<(Client, String)> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes API configuration (not in a pod, no $KUBECONFIG)")?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).context("building the Kubernetes API client")?;
    Ok((client, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_after_a_quiet_spell_builds_at_once_and_a_burst_at_most_every_settle() {
        let now = Instant::now();
        assert_eq!(next_build(None, now), now);
        assert_eq!(next_build(Some(now - SETTLE * 2), now), now);
        let just = now - SETTLE / 4;
        assert_eq!(next_build(Some(just), now), just + SETTLE);
    }
}

//! Which events and spans the agent records, as one filter for the whole subscriber,
//! and the two log streams split by target after it.
//!
//! Why not tracing-subscriber's per-layer filters (`Layer::with_filter`), which would
//! say the same thing more briefly: every connection's future is instrumented with its
//! span and enters and leaves it on every poll, and a relayed request polls several
//! such futures several times. With a filter per layer, each enter and each exit looked
//! the span up once per filtered layer and took two read locks (the reload layer's and
//! the environment filter's own span table). Measured at 1,000 req/s, entering and
//! leaving spans was 3.7% of the L4 mTLS path's agent CPU. Here one global layer
//! decides, and an enter or exit costs an atomic load unless a span filter
//! (`[span]=level`) asks for span tracking.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use arc_swap::ArcSwap;
use tracing::{
    Event, Metadata, Subscriber, level_filters::LevelFilter, span, subscriber::Interest,
};
use tracing_subscriber::{EnvFilter, Layer, layer::Context, registry::LookupSpan};

use super::access;

/// A diagnostics filter and whether it filters by span (then it must see every span
/// open, enter, exit and close; otherwise none).
struct Diagnostics {
    env: EnvFilter,
    by_span: bool,
}

/// The state a running agent changes (`meshctl log-level set`), shared by the
/// subscriber's [`Gate`] and the admin side's `LogControl`.
pub struct GateState {
    diagnostics: ArcSwap<Diagnostics>,
    /// A copy of `diagnostics.by_span`, read first on every span enter and exit.
    by_span: AtomicBool,
    access: bool,
}

impl GateState {
    /// `env` filters diagnostics; `access` turns the access log on.
    pub fn new(env: EnvFilter, span_directives: bool, access: bool) -> Arc<GateState> {
        Arc::new(GateState {
            diagnostics: ArcSwap::from_pointee(Diagnostics {
                env,
                by_span: span_directives,
            }),
            by_span: AtomicBool::new(span_directives),
            access,
        })
    }

    /// Replaces the diagnostics filter, and has every callsite asked again.
    pub fn set(&self, env: EnvFilter, span_directives: bool) {
        self.diagnostics.store(Arc::new(Diagnostics {
            env,
            by_span: span_directives,
        }));
        self.by_span.store(span_directives, Ordering::Release);
        tracing::callsite::rebuild_interest_cache();
    }

    /// The filter, if it tracks spans.
    fn tracking(&self) -> Option<arc_swap::Guard<Arc<Diagnostics>>> {
        if !self.by_span.load(Ordering::Acquire) {
            return None;
        }
        let d = self.diagnostics.load();
        d.by_span.then_some(d)
    }
}

/// Whether an event or span belongs to the access log.
pub fn is_access(meta: &Metadata<'_>) -> bool {
    meta.target() == access::TARGET
}

/// The subscriber's one filter: access log events when the access log is on, the rest
/// as the diagnostics filter says.
pub struct Gate(pub Arc<GateState>);

impl<S> Layer<S> for Gate
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_access(meta) {
            return if self.0.access {
                Interest::always()
            } else {
                Interest::never()
            };
        }
        Layer::<S>::register_callsite(&self.0.diagnostics.load().env, meta)
    }

    fn enabled(&self, meta: &Metadata<'_>, cx: Context<'_, S>) -> bool {
        if is_access(meta) {
            return self.0.access;
        }
        Layer::<S>::enabled(&self.0.diagnostics.load().env, meta, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        let diagnostics = Layer::<S>::max_level_hint(&self.0.diagnostics.load().env);
        // Access lines are `info`.
        let access = self.0.access.then_some(LevelFilter::INFO);
        match (diagnostics, access) {
            (Some(d), Some(a)) => Some(d.max(a)),
            (Some(d), None) => Some(d),
            // No hint from the diagnostics filter: everything may be enabled.
            (None, _) => None,
        }
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, cx: Context<'_, S>) {
        if let Some(d) = self.0.tracking() {
            Layer::<S>::on_new_span(&d.env, attrs, id, cx);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, cx: Context<'_, S>) {
        if let Some(d) = self.0.tracking() {
            Layer::<S>::on_record(&d.env, id, values, cx);
        }
    }

    fn on_enter(&self, id: &span::Id, cx: Context<'_, S>) {
        if let Some(d) = self.0.tracking() {
            Layer::<S>::on_enter(&d.env, id, cx);
        }
    }

    fn on_exit(&self, id: &span::Id, cx: Context<'_, S>) {
        if let Some(d) = self.0.tracking() {
            Layer::<S>::on_exit(&d.env, id, cx);
        }
    }

    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        if let Some(d) = self.0.tracking() {
            Layer::<S>::on_close(&d.env, id, cx);
        }
    }
}

/// Which stream a formatting layer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Diagnostics,
    Access,
}

/// A formatting layer that writes only its stream's events; it sees every span, so
/// that both streams show the span an event happened in.
pub struct Only<L> {
    pub stream: Stream,
    pub layer: L,
}

impl<S, L> Layer<S> for Only<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.layer.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.layer.on_layer(subscriber);
    }

    fn on_event(&self, event: &Event<'_>, cx: Context<'_, S>) {
        let access = is_access(event.metadata());
        if access == (self.stream == Stream::Access) {
            self.layer.on_event(event, cx);
        }
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, cx: Context<'_, S>) {
        self.layer.on_new_span(attrs, id, cx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, cx: Context<'_, S>) {
        self.layer.on_record(id, values, cx);
    }

    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, cx: Context<'_, S>) {
        self.layer.on_follows_from(span, follows, cx);
    }

    fn on_enter(&self, id: &span::Id, cx: Context<'_, S>) {
        self.layer.on_enter(id, cx);
    }

    fn on_exit(&self, id: &span::Id, cx: Context<'_, S>) {
        self.layer.on_exit(id, cx);
    }

    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        self.layer.on_close(id, cx);
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, cx: Context<'_, S>) {
        self.layer.on_id_change(old, new, cx);
    }
}

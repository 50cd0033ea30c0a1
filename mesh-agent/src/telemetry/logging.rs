//! Two log streams on stderr: diagnostics, filtered by `RUST_LOG` or the level set at
//! run time (`meshctl log-level set`), and the access log (`access` target), switched
//! and formatted on its own so that turning diagnostics down never hides traffic.
use std::sync::{Arc, Mutex};

use tracing_subscriber::{
    EnvFilter, Layer, Registry, fmt,
    layer::{Layered, SubscriberExt as _},
    util::SubscriberInitExt as _,
};

use super::{
    access,
    log_gate::{Gate, GateState, Only, Stream},
    log_writer::{self, Batched, FlushGuard},
};

/// Bytes buffered for stderr before new lines are dropped.
const LOG_BUFFER_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--access-log`: off, on (in `--log-format`), or an explicit format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLog {
    On,
    Off,
    Text,
    Json,
}

/// Changes the diagnostics filter of a running agent.
pub struct LogControl {
    gate: Arc<GateState>,
    /// Flushes the lines still buffered when the agent exits.
    _flush: Option<FlushGuard>,
    current: Mutex<String>,
}

/// Whether `directives` is a filter `LogControl::set` would take (the admin API's
/// input, checked before anything changes).
pub fn check_filter(directives: &str) -> Result<(), String> {
    if directives.trim().is_empty() {
        return Err("empty filter".to_owned());
    }
    diagnostics_filter(directives).map(drop)
}

/// The longest filter taken (the agent's targets fit in a few hundred bytes).
const MAX_FILTER: usize = 1024;

/// Whether a `{...}` part of the directives holds a `=`.
fn has_field_value(directives: &str) -> bool {
    let mut in_fields = false;
    for c in directives.chars() {
        match c {
            '{' => in_fields = true,
            '}' => in_fields = false,
            '=' if in_fields => return true,
            _ => {}
        }
    }
    false
}

/// The access target never goes through the diagnostics filter.
fn diagnostics_filter(directives: &str) -> Result<EnvFilter, String> {
    // tracing-subscriber's directive parser slices by byte and panics inside a
    // multi-byte character (found by the `admin_request` fuzz target: `[ⓖ{` through
    // `meshctl log-level set`). Targets, levels, span and field names are ASCII, so
    // anything else is refused before it is parsed.
    if !directives.is_ascii() {
        return Err("a filter is ASCII: module paths, levels, span and field names".to_owned());
    }
    // A field value in a span filter (`[span{field=value}]`) is compiled as a regular
    // expression, and some compile for seconds (the same fuzz target: `[be~{=\w*.h|n}]`
    // held the admin thread for 11 s). The agent's spans are filtered by name only.
    if has_field_value(directives) {
        return Err(
            "field value filters ({field=value}) are not supported; filter spans by name"
                .to_owned(),
        );
    }
    if directives.len() > MAX_FILTER {
        return Err(format!("a filter is at most {MAX_FILTER} bytes"));
    }
    EnvFilter::try_new(format!("{directives},{}=off", access::TARGET)).map_err(|e| e.to_string())
}

impl LogControl {
    pub fn get(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `directives` is an EnvFilter string such as `info,mesh_agent::proxy=debug`.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        check_filter(directives)?;
        let filter = diagnostics_filter(directives)?;
        self.gate.set(filter, filters_spans(directives));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = directives.to_owned();
        Ok(())
    }
}

/// The subscriber the formatting layers sit on: the registry behind the one filter.
type Gated = Layered<Gate, Registry>;
type BoxedLayer = Box<dyn Layer<Gated> + Send + Sync>;

fn boxed(format: LogFormat, stream: Stream, writer: Batched) -> BoxedLayer {
    // Colour only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Only { stream, layer }.boxed(),
        LogFormat::Json => Only {
            stream,
            layer: layer.json().flatten_event(true).with_current_span(true),
        }
        .boxed(),
    }
}

/// Whether a diagnostics filter selects by span (`[conn]=debug`).
fn filters_spans(directives: &str) -> bool {
    directives.contains('[')
}

/// `RUST_LOG` overrides `default_level` (for example `mesh_agent=debug`).
pub fn init_logging(
    format: LogFormat,
    default_level: &str,
    access_log: AccessLog,
) -> Arc<LogControl> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| diagnostics_filter(v).is_ok())
        .unwrap_or_else(|| default_level.to_owned());
    // Lines are written in batches by a thread of their own (`log_writer`): a request
    // or connection never waits for stderr, and lines past the buffer are dropped,
    // never the traffic.
    let (writer, guard) = match log_writer::start(std::io::stderr(), LOG_BUFFER_BYTES) {
        Ok((w, g)) => (w, Some(g)),
        Err(e) => {
            eprintln!("mesh-agent: no log writer thread ({e}); lines are dropped");
            (log_writer::Batched::discarding(), None)
        }
    };
    let (gate, layers) = layers(format, &directives, access_log, writer.clone(), writer);
    // A second init (tests) keeps the first subscriber.
    let _ = subscriber(gate.clone(), layers).try_init();
    Arc::new(LogControl {
        gate,
        current: Mutex::new(directives),
        _flush: guard,
    })
}

/// The registry behind the one filter, and the formatting layers after it.
fn subscriber(gate: Arc<GateState>, layers: Vec<BoxedLayer>) -> impl tracing::Subscriber {
    tracing_subscriber::registry().with(Gate(gate)).with(layers)
}

/// The filter's state (the diagnostics filter from `directives`, changeable later, and
/// whether the access log is on) and the formatting layers of the two streams, each
/// with its writer (the agent gives both the same one).
fn layers(
    format: LogFormat,
    directives: &str,
    access_log: AccessLog,
    diagnostics: Batched,
    access: Batched,
) -> (Arc<GateState>, Vec<BoxedLayer>) {
    let (filter, by_span) = match diagnostics_filter(directives) {
        Ok(f) => (f, filters_spans(directives)),
        Err(_) => (
            EnvFilter::new(format!("info,{}=off", access::TARGET)),
            false,
        ),
    };
    let mut layers = vec![boxed(format, Stream::Diagnostics, diagnostics)];
    let access_format = match access_log {
        AccessLog::Off => None,
        AccessLog::On => Some(format),
        AccessLog::Text => Some(LogFormat::Text),
        AccessLog::Json => Some(LogFormat::Json),
    };
    if let Some(f) = access_format {
        layers.push(boxed(f, Stream::Access, access));
    }
    (
        GateState::new(filter, by_span, access_format.is_some()),
        layers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::{Subscriber as _, level_filters::LevelFilter};

    /// The subscriber `init_logging` makes global, with its filter's state, writing
    /// the two streams to `diagnostics` and `access`.
    fn composed(
        directives: &str,
        access_log: AccessLog,
        diagnostics: Batched,
        access: Batched,
    ) -> (Arc<GateState>, impl tracing::Subscriber) {
        let (gate, layers) = layers(LogFormat::Text, directives, access_log, diagnostics, access);
        let s = subscriber(gate.clone(), layers);
        (gate, s)
    }

    /// The level below which tracing skips a callsite with one comparison: the
    /// composed subscriber's hint, as `try_init` makes it global.
    fn hint(directives: &str, access_log: AccessLog) -> Option<LevelFilter> {
        let quiet = Batched::discarding;
        composed(directives, access_log, quiet(), quiet())
            .1
            .max_level_hint()
    }

    #[test]
    fn the_global_level_follows_the_diagnostics_filter_with_the_access_log_on() {
        for access in [AccessLog::Off, AccessLog::On, AccessLog::Json] {
            assert_eq!(hint("info", access), Some(LevelFilter::INFO), "{access:?}");
            // Access lines are `info`: with the access log on, that is the floor.
            let quiet = if access == AccessLog::Off {
                LevelFilter::WARN
            } else {
                LevelFilter::INFO
            };
            assert_eq!(hint("warn", access), Some(quiet), "{access:?}");
            assert_eq!(
                hint("info,mesh_agent::proxy=debug", access),
                Some(LevelFilter::DEBUG),
                "{access:?}"
            );
        }
    }

    #[test]
    fn a_level_set_at_run_time_moves_the_global_level() {
        let quiet = Batched::discarding;
        let (gate, subscriber) = composed("info", AccessLog::On, quiet(), quiet());
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::INFO));
        gate.set(diagnostics_filter("trace").expect("filter"), false);
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::TRACE));
    }

    /// What each stream writes for an `info` diagnostic, a `debug` one, an access
    /// line, and a `debug` event inside a span `conn`.
    fn written(directives: &str, access_log: AccessLog) -> (String, String) {
        let diagnostics = Batched::capturing();
        let access = Batched::capturing();
        let (_, s) = composed(directives, access_log, diagnostics.clone(), access.clone());
        tracing::subscriber::with_default(s, || {
            tracing::info!("plain info");
            tracing::debug!("plain debug");
            tracing::info!(target: access::TARGET, id = 7, "request");
            let span = tracing::info_span!("conn", id = 9);
            let _in = span.enter();
            tracing::debug!("inside conn");
        });
        (diagnostics.captured(), access.captured())
    }

    #[test]
    fn each_stream_writes_its_own_events_and_span_filters_still_work() {
        let (diag, access) = written("info", AccessLog::On);
        assert!(diag.contains("plain info"), "{diag}");
        assert!(!diag.contains("plain debug"), "{diag}");
        assert!(
            !diag.contains("request"),
            "the access line in diagnostics: {diag}"
        );
        assert!(!diag.contains("inside conn"), "{diag}");
        assert!(
            access.contains("request") && access.contains("id=7"),
            "{access}"
        );
        assert!(!access.contains("plain info"), "{access}");

        let (diag, access) = written("info", AccessLog::Off);
        assert!(
            diag.contains("plain info") && !diag.contains("request"),
            "{diag}"
        );
        assert!(access.is_empty(), "{access}");

        // A span filter: debug inside `conn` only.
        let (diag, _) = written("info,[conn]=debug", AccessLog::On);
        assert!(
            diag.contains("inside conn") && diag.contains("conn{id=9}"),
            "{diag}"
        );
        assert!(!diag.contains("plain debug"), "{diag}");
    }

    #[test]
    fn a_filter_with_a_multibyte_character_is_refused_not_a_panic() {
        // The input the fuzzer found: it panicked in tracing-subscriber's parser.
        let e = check_filter("io-\0\u{24d6}eS[2S{e\u{24d6}").unwrap_err();
        assert!(e.contains("ASCII"), "{e}");
        assert!(check_filter("[\u{24d6}{x}]").is_err());
        assert!(check_filter("info,mesh_agent::proxy=debug").is_ok());
        assert!(check_filter("info,[[broken").is_err());
        assert!(check_filter("  ").is_err());
    }

    #[test]
    fn field_value_filters_and_huge_filters_are_refused_before_they_compile() {
        // The input the fuzzer found: its regex took 11 s to compile.
        let e = check_filter("[be~{=\\w*.h|n}]").unwrap_err();
        assert!(e.contains("field value"), "{e}");
        assert!(check_filter("[conn{id=7}]=debug").is_err());
        // Span names and field names alone are fine.
        assert!(check_filter("[conn]=debug").is_ok());
        assert!(check_filter("[conn{id}]=debug").is_ok());
        assert!(check_filter(&"a,".repeat(600)).is_err());
    }
}

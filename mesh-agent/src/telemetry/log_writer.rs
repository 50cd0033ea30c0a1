//! Where log lines go: a bounded buffer that a thread of its own writes to stderr in
//! batches, every [`FLUSH_EVERY`] or sooner once half the buffer is used.
//!
//! Why not a channel with a writer thread woken per line (tracing-appender's
//! non-blocking writer): with an access log line per request, waking that thread per
//! line cost about four system calls per request (futex wake and wait, and the
//! receiver's spin-then-yield), more than the rest of the logging. Here a line is a
//! copy under an uncontended lock, and stderr gets one write per batch.
//!
//! A request or connection never waits for stderr: when it cannot keep up (a stalled
//! log collector, a full pipe), lines past the buffer are dropped and counted, and the
//! count is written once stderr moves again.
use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// A batch waits at most this long.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    limit: usize,
}

impl Shared {
    fn new(limit: usize) -> Self {
        Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one whole line (or event) or counts it dropped.
    fn push(&self, line: &[u8]) {
        let mut p = self.lock();
        if p.buf.len() + line.len() > self.limit {
            p.dropped += 1;
            return;
        }
        p.buf.extend_from_slice(line);
        if p.buf.len() > self.limit / 2 {
            self.wake.notify_one();
        }
    }
}

/// The `MakeWriter` for the fmt layers: cheap to clone, one buffer behind it.
#[derive(Clone)]
pub struct Batched(Arc<Shared>);

impl Batched {
    /// A writer that keeps nothing (no thread could be started to write).
    pub fn discarding() -> Self {
        Batched(Arc::new(Shared::new(0)))
    }

    /// A writer that keeps up to 1 MiB for a test to read, with no thread.
    #[cfg(test)]
    pub fn capturing() -> Self {
        Batched(Arc::new(Shared::new(1 << 20)))
    }

    /// What a capturing writer kept.
    #[cfg(test)]
    pub fn captured(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().buf).into_owned()
    }
}

/// One event's bytes, added to the batch whole when the event is formatted.
pub struct EventWriter {
    shared: Arc<Shared>,
    line: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.shared.push(&self.line);
        }
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            shared: self.0.clone(),
            line: Vec::with_capacity(256),
        }
    }
}

/// Held for the process's life: dropping it writes what is still buffered.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer thread over `out`, buffering at most `limit` bytes.
pub fn start<W: Write + Send + 'static>(
    out: W,
    limit: usize,
) -> std::io::Result<(Batched, FlushGuard)> {
    let shared = Arc::new(Shared::new(limit));
    let thread = std::thread::Builder::new().name("mesh-log".into()).spawn({
        let shared = shared.clone();
        move || write_batches(&shared, out)
    })?;
    Ok((
        Batched(shared.clone()),
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    // Swapped with the shared buffer each round, so neither reallocates in steady state.
    let mut batch = Vec::new();
    loop {
        let (dropped, closing) = {
            let mut p = shared.lock();
            // Woken early when half the buffer is used, or at exit.
            if !p.closing && p.buf.len() <= shared.limit / 2 {
                p = shared
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut p.buf, &mut batch);
            (std::mem::take(&mut p.dropped), p.closing)
        };
        // A failed write (stderr closed) loses this batch only; the agent goes on.
        let _ = out.write_all(&batch);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "mesh-agent: {dropped} log lines dropped: stderr did not keep up"
            );
        }
        let _ = out.flush();
        batch.clear();
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read, or hold still.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        stall: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _held = self.stall.lock().unwrap_or_else(|p| p.into_inner());
            self.bytes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            *self.writes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &Batched, text: &str) {
        let mut e = w.make_writer();
        let _ = e.write_all(text.as_bytes());
    }

    #[test]
    fn lines_arrive_whole_in_order_and_in_few_writes() {
        let sink = Sink::default();
        let (w, guard) = start(sink.clone(), 1 << 20).expect("thread");
        for i in 0..1000 {
            line(&w, &format!("line {i}\n"));
        }
        drop(guard);
        let text = String::from_utf8(sink.bytes.lock().expect("sink").clone()).expect("utf8");
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
        let writes = *sink.writes.lock().expect("count");
        assert!(writes < 50, "{writes} writes for 1000 lines");
    }

    #[test]
    fn a_stalled_stderr_drops_lines_past_the_limit_and_says_so() {
        let sink = Sink::default();
        let stalled = sink.stall.lock().expect("stall");
        let (w, guard) = start(sink.clone(), 1000).expect("thread");
        let t0 = std::time::Instant::now();
        for _ in 0..10_000 {
            line(&w, "0123456789\n");
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "the writer waited");
        drop(stalled);
        drop(guard);
        let text = String::from_utf8(sink.bytes.lock().expect("sink").clone()).expect("utf8");
        let kept = text.matches("0123456789\n").count();
        // What the buffer holds (90 lines), and at most one batch the stalled write took.
        assert!(kept > 0 && kept <= 2 * 91, "{kept} lines kept");
        // Each batch says how many were dropped since the one before.
        let dropped: usize = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("mesh-agent: ")?
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        assert_eq!(dropped, 10_000 - kept, "{text}");
    }
}

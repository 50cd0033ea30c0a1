//! The workload of the simulated cluster: a server and the client scenarios the tests
//! drive. Clients print one JSON object on stdout.
//!
//! Wire protocol: the client sends one command line, then:
//!   WHO            server answers "<name> <client ip:port>\n" and closes
//!   ECHO           server echoes until EOF, then shuts down its side
//!   SINK           server reads until EOF, answers "<bytes> <sha256>\n"
//!   SOURCE <n>     server sends n bytes and shuts down its side, then reads until EOF
//!                  and appends "SOURCE-TAIL <bytes> <sha256>" to its --log file
//!   GET / HTTP/1.1 (curl) an HTTP/1.1 200 whose body is the WHO answer
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// HTTP/1.1 server for benchmarks: every request gets a `body`-byte response.
    Http {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1024)]
        body: usize,
    },
    /// HTTP echo server (HTTP/1.1 and h2c): answers with what it received, as JSON.
    EchoServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// `count` HTTP requests on one connection; prints statuses and answering pods.
    EchoGet {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// HTTP/2 requests in flight at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value = "GET")]
        method: String,
        /// The Host / :authority (default: the address).
        #[arg(long)]
        host: Option<String>,
        /// `name:value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// `METHOD PATH`, repeatable: more requests on the same connection, after the
        /// others, each answer's status reported in order (`then`).
        #[arg(long = "then")]
        then: Vec<String>,
        /// Send a request body of this many bytes.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
    },
    /// A bidirectional stream shaped as gRPC through the echo server: `count` chunks,
    /// each echoed before the next, then trailers both ways.
    EchoStream {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/echo.Echo/Stream")]
        path: String,
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
    /// A streamed upload of `mib` MiB to the echo server; prints both checksums.
    EchoUpload {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        mib: usize,
        #[arg(long)]
        h2: bool,
    },
    /// Connect, send nothing for `wait_secs`, then one HTTP/1.1 GET on that same
    /// connection; prints its status and the answering pod.
    SilentGet {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        wait_secs: u64,
    },
    /// gRPC calls (tonic) to the echo server's gRPC services: unary `get`, `delete`,
    /// `weighted` on one connection, or one bidirectional `stream`.
    GrpcCall {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        method: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// `name:value` request metadata, repeatable.
        #[arg(long = "metadata")]
        metadata: Vec<String>,
    },
    /// A WebSocket echo server.
    WsServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// `count` WebSocket messages on one connection; prints the echoes.
    WsGet {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Open `count` connections at once, then ask each who answers.
    Who {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// SO_MARK for the sockets (the agent's bypass mark, to prove it is honoured).
        #[arg(long)]
        mark: Option<u32>,
    },
    /// getpeername() of a connection, as the application sees it. With `--hold`, it
    /// first prints that alone, waits for a line on stdin, then asks the same
    /// connection again (what a long-lived connection sees later).
    Peername {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        hold: bool,
    },
    /// Start `count` connections to `addr` and abandon each at once (a non-blocking
    /// connect, then close): capture work for the kernel, next to none for anyone else.
    Churn {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Send `bytes` then half-close; the server answers with what it received.
    Sink {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        bytes: u64,
        /// Seed of the pseudo-random payload.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Receive `bytes` until the server half-closes, then send `then` bytes.
    Source {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        then: u64,
    },
    /// Hold `count` echo connections open at once, use each, close all.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Write to a server that does not read (STALL) for `secs`: how many bytes the
    /// path accepts before it pushes back. Then the server drains and counts them.
    Flood {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// The mirror of `flood`: ask the server to write as fast as it can (FLOOD) for
    /// `secs` while this client reads nothing for a second longer, then read it all.
    /// Prints what arrived beside what the server says the path accepted from it.
    Sulk {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// `count` long-lived echo connections streaming at once: each sends `chunk`
    /// pseudo-random bytes every `every_ms` and checks that the echo is the same bytes
    /// in the same order. Prints `{"ready": N}` once all are open, streams until a
    /// line (or EOF) on stdin, then half-closes each, reads the rest and prints what
    /// each sent and got back (SHA-256 of both).
    Streams {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        chunk: usize,
        #[arg(long, default_value_t = 50)]
        every_ms: u64,
    },
    /// One echo connection: prints "ready", then echoes each stdin line through it.
    Stream {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// WHO over a new connection, again and again for `secs`; counts failures.
    Loop {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// A connection every `every_ms` for `secs`, each asking WHO with a short timeout:
    /// how many were answered (a fail-open window shows as answers).
    Probe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
        #[arg(long, default_value_t = 50)]
        every_ms: u64,
        /// How long one probe may take before it counts as unanswered.
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
    },
    /// Open `count` connections at once, to each of `addrs` in turn, printing
    /// `{"connected": N}`; on a line on stdin, ask WHO on each and print, per
    /// connection, the address and the answer or the error.
    Burst {
        #[arg(long, value_delimiter = ',')]
        addrs: Vec<SocketAddr>,
        #[arg(long)]
        count: usize,
    },
    /// Open `count` TCP connections to `addr` that never send a byte; hold them for
    /// `secs`, then report how many were established and how many the server closed.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        secs: u64,
    },
    /// mTLS to a tunnel endpoint with the given workload certificate, then one
    /// CONNECT to `target`: print the status.
    TunnelConnect(TunnelClient),
    /// As tunnel-connect, twice with one client config: did the second handshake
    /// resume the first session?
    TunnelResume(TunnelClient),
    /// TLS 1.3 handshake without a client certificate: print the server's certificate.
    TlsPeek {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Try a TLS 1.2-only handshake.
    Tls12Probe {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// A TLS server presenting the given certificate chain, logging each handshake.
    TlsServe {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

/// A tunnel client: the endpoint, the CONNECT target and the workload certificate.
#[derive(clap::Args)]
struct TunnelClient {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    target: String,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

impl TunnelClient {
    /// (certificate chain PEM, key PEM).
    fn read_identity(&self) -> anyhow::Result<(String, String)> {
        Ok((
            std::fs::read_to_string(&self.cert)?,
            std::fs::read_to_string(&self.key)?,
        ))
    }
}

use mesh_tests::pattern::Pattern;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_fd_limit();
    match Cli::parse().cmd {
        Cmd::Serve { name, port, log } => serve(name, port, log).await,
        Cmd::Http { port, body } => http_serve(port, body).await,
        Cmd::EchoServe { name, port } => mesh_tests::echo::serve(name, port).await,
        Cmd::WsServe { name, port } => mesh_tests::ws::serve(name, port).await,
        Cmd::GrpcCall {
            addr,
            host,
            method,
            count,
            concurrency,
            metadata,
        } => {
            let metadata: Vec<(String, String)> = metadata
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let out = mesh_tests::grpc::call(mesh_tests::grpc::CallArgs {
                addr,
                host: &host,
                method: &method,
                count,
                concurrency,
                metadata: &metadata,
            })
            .await?;
            println!("{out}");
            Ok(())
        }
        Cmd::SilentGet {
            addr,
            host,
            wait_secs,
        } => {
            let out =
                mesh_tests::echo::silent_get(addr, &host, Duration::from_secs(wait_secs)).await?;
            println!("{out}");
            Ok(())
        }
        Cmd::EchoStream {
            addr,
            host,
            path,
            count,
        } => {
            println!(
                "{}",
                mesh_tests::stream::bidi(addr, &host, &path, count).await?
            );
            Ok(())
        }
        Cmd::EchoUpload {
            addr,
            host,
            mib,
            h2,
        } => {
            println!(
                "{}",
                mesh_tests::stream::upload(addr, &host, mib, h2).await?
            );
            Ok(())
        }
        Cmd::WsGet {
            addr,
            host,
            path,
            count,
        } => {
            let out = mesh_tests::ws::get(addr, &host, &path, count).await?;
            println!("{out}");
            Ok(())
        }
        Cmd::EchoGet {
            addr,
            path,
            h2,
            count,
            concurrency,
            method,
            host,
            headers,
            then,
            body_bytes,
        } => {
            let then: Vec<(String, String)> = then
                .iter()
                .filter_map(|t| t.split_once(' '))
                .map(|(m, p)| (m.trim().to_owned(), p.trim().to_owned()))
                .collect();
            let headers: Vec<(String, String)> = headers
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let out = mesh_tests::echo::get(mesh_tests::echo::GetArgs {
                addr,
                path: &path,
                h2,
                count,
                concurrency,
                method: &method,
                host: host.as_deref(),
                headers: &headers,
                then: &then,
                body_bytes,
            })
            .await?;
            println!("{out}");
            Ok(())
        }
        Cmd::Who { addr, count, mark } => {
            let mut conns = Vec::new();
            for _ in 0..count {
                conns.push(connect(addr, mark).await?);
            }
            let mut tasks = Vec::new();
            for mut c in conns {
                tasks.push(tokio::spawn(async move {
                    c.write_all(b"WHO\n").await?;
                    let mut s = String::new();
                    c.read_to_string(&mut s).await?;
                    anyhow::Ok(s.trim().to_owned())
                }));
            }
            let mut replies = Vec::new();
            for t in tasks {
                replies.push(t.await??);
            }
            println!("{}", json!({ "replies": replies }));
            Ok(())
        }
        Cmd::Loop { addr, secs } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(secs);
            let (mut ok, mut failed) = (0u64, Vec::new());
            while std::time::Instant::now() < deadline {
                let r = async {
                    let mut c = connect(addr, None).await?;
                    c.write_all(b"WHO\n").await?;
                    let mut s = String::new();
                    c.read_to_string(&mut s).await?;
                    anyhow::ensure!(!s.is_empty(), "empty answer");
                    anyhow::Ok(())
                }
                .await;
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            println!("{}", json!({ "ok": ok, "failed": failed }));
            Ok(())
        }
        Cmd::Probe {
            addr,
            secs,
            every_ms,
            timeout_ms,
        } => {
            let started = std::time::Instant::now();
            let deadline = started + Duration::from_secs(secs);
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            let (mut sent, mut answered, mut answers) = (0u64, 0u64, Vec::new());
            let mut errors: Vec<String> = Vec::new();
            // Each failure with when it started (ms after the start), so a caller can
            // tell one inside a window it caused from one outside; bounded.
            let mut failures: Vec<serde_json::Value> = Vec::new();
            while std::time::Instant::now() < deadline {
                tick.tick().await;
                sent += 1;
                let at_ms = started.elapsed().as_millis() as u64;
                let r = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
                    let mut c = connect(addr, None).await?;
                    c.write_all(b"WHO\n").await?;
                    let mut s = String::new();
                    c.read_to_string(&mut s).await?;
                    anyhow::ensure!(!s.is_empty(), "empty answer");
                    anyhow::Ok(s.trim().to_owned())
                })
                .await;
                match r {
                    Ok(Ok(who)) => {
                        answered += 1;
                        if answers.len() < 5 {
                            answers.push(who);
                        }
                    }
                    Ok(Err(e)) => {
                        let e = format!("{e:#}");
                        if failures.len() < 1000 {
                            failures.push(json!({ "at_ms": at_ms, "error": e }));
                        }
                        if errors.len() < 5 {
                            errors.push(e);
                        }
                    }
                    Err(_) => {
                        if failures.len() < 1000 {
                            failures.push(json!({ "at_ms": at_ms, "error": "timed out" }));
                        }
                        if errors.len() < 5 {
                            errors.push("timed out".to_owned());
                        }
                    }
                }
            }
            println!(
                "{}",
                json!({
                    "sent": sent,
                    "answered": answered,
                    "answers": answers,
                    "errors": errors,
                    "failures": failures,
                })
            );
            Ok(())
        }
        Cmd::Burst { addrs, count } => {
            anyhow::ensure!(!addrs.is_empty(), "--addrs is empty");
            let mut conns = Vec::new();
            for i in 0..count {
                let addr = addrs[i % addrs.len()];
                conns.push((addr, connect(addr, None).await));
            }
            let connected = conns.iter().filter(|(_, c)| c.is_ok()).count();
            println!("{}", json!({ "connected": connected }));
            let mut line = String::new();
            let _ = BufReader::new(tokio::io::stdin())
                .read_line(&mut line)
                .await;
            let mut results = Vec::new();
            for (addr, c) in conns {
                let r = async {
                    let mut c = c?;
                    c.write_all(b"WHO\n").await?;
                    let mut s = String::new();
                    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut s))
                        .await
                        .context("no answer in 5 s")??;
                    anyhow::ensure!(!s.is_empty(), "closed without an answer");
                    anyhow::Ok(s.trim().to_owned())
                }
                .await;
                results.push(match r {
                    Ok(who) => json!({ "addr": addr.to_string(), "answer": who }),
                    Err(e) => json!({ "addr": addr.to_string(), "error": format!("{e:#}") }),
                });
            }
            println!("{}", json!({ "results": results }));
            Ok(())
        }
        Cmd::Idle { addr, count, secs } => {
            let mut conns = Vec::new();
            let mut failed = 0u64;
            for _ in 0..count {
                match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
                    Ok(Ok(c)) => conns.push(c),
                    _ => failed += 1,
                }
            }
            println!(
                "{}",
                json!({ "established": conns.len(), "failed": failed })
            );
            tokio::time::sleep(Duration::from_secs(secs)).await;
            // A server that closed an idle connection shows as end-of-stream.
            let mut closed = 0u64;
            for c in &conns {
                let mut b = [0u8; 1];
                match c.try_read(&mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(n) if n > 0 => {}
                    _ => closed += 1,
                }
            }
            println!(
                "{}",
                json!({ "held": conns.len(), "closed_by_server": closed })
            );
            Ok(())
        }
        Cmd::TunnelConnect(t) => {
            let (cert, key) = t.read_identity()?;
            let status = mesh_tests::tls::connect_status(t.addr, &t.target, &cert, &key).await?;
            println!("{}", json!({ "status": status }));
            Ok(())
        }
        Cmd::TunnelResume(t) => {
            let (cert, key) = t.read_identity()?;
            let second = mesh_tests::tls::second_handshake(t.addr, &t.target, &cert, &key).await?;
            println!("{}", json!({ "second_handshake": second }));
            Ok(())
        }
        Cmd::TlsPeek { addr } => {
            println!("{}", mesh_tests::tls::peek(addr).await?);
            Ok(())
        }
        Cmd::Tls12Probe { addr } => {
            println!("{}", mesh_tests::tls::probe_tls12(addr).await);
            Ok(())
        }
        Cmd::TlsServe { port, cert, key } => mesh_tests::tls::serve(port, &cert, &key).await,
        Cmd::Peername { addr, hold } => {
            let mut c = connect(addr, None).await?;
            if hold {
                println!("{}", json!({ "peer": c.peer_addr()?.to_string() }));
                let mut line = String::new();
                BufReader::new(tokio::io::stdin())
                    .read_line(&mut line)
                    .await?;
            }
            let peer = c.peer_addr()?;
            c.write_all(b"WHO\n").await?;
            let mut s = String::new();
            c.read_to_string(&mut s).await?;
            println!("{}", json!({ "peer": peer.to_string(), "who": s.trim() }));
            Ok(())
        }
        Cmd::Churn { addr, count } => {
            let mut refused = 0u64;
            for _ in 0..count {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                s.set_nonblocking(true)?;
                match s.connect(&addr.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(_) => refused += 1,
                }
            }
            println!("{}", json!({ "tried": count, "refused": refused }));
            Ok(())
        }
        Cmd::Sink { addr, bytes, seed } => {
            let mut c = connect(addr, None).await?;
            c.write_all(b"SINK\n").await?;
            let (sent_sha, sent) = send_pattern(&mut c, bytes, seed).await?;
            c.shutdown().await?; // half-close: the server must still be able to answer
            let mut reply = String::new();
            c.read_to_string(&mut reply).await?;
            println!(
                "{}",
                json!({ "sent": sent, "sent_sha": sent_sha, "reply": reply.trim() })
            );
            Ok(())
        }
        Cmd::Flood { addr, secs } => {
            let mut c = connect(addr, None).await?;
            // Let the handshake settle on both ends first: a write racing it keeps a
            // sockmap hop on TCP for good, and this is about the flow-control path.
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.write_all(format!("STALL {}\n", secs + 1).as_bytes())
                .await?;
            let (mut accepted, flooded) = flood_for(&mut c, secs).await;
            if let Err(e) = flooded {
                println!(
                    "{}",
                    json!({ "accepted": accepted, "error": e.to_string() })
                );
                std::process::exit(1);
            }
            // Once the server has caught up, a few last writes: the path must carry
            // them in order after everything else, without waiting, and return to the
            // fast path.
            let (last, last_write_ms) = last_writes(&mut c).await?;
            accepted += last;
            let t = std::time::Instant::now();
            c.shutdown().await?;
            let mut reply = String::new();
            c.read_to_string(&mut reply).await?;
            let reply_ms = t.elapsed().as_millis() as u64;
            println!(
                "{}",
                json!({ "accepted": accepted, "reply": reply.trim(), "last_write_ms": last_write_ms, "reply_ms": reply_ms })
            );
            Ok(())
        }
        Cmd::Sulk { addr, secs } => {
            let mut c = connect(addr, None).await?;
            // As in `flood`: the handshake settles before any data moves.
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.write_all(format!("FLOOD {secs}\n").as_bytes()).await?;
            tokio::time::sleep(Duration::from_secs(secs + 1)).await;
            // Everything the server wrote is FLOOD_BYTE, then one line that says what
            // it counted.
            let mut got = Vec::new();
            c.read_to_end(&mut got).await?;
            let received = got.iter().take_while(|b| **b == FLOOD_BYTE).count();
            let tail = String::from_utf8_lossy(&got[received..]).trim().to_owned();
            let mut words = tail.split_whitespace();
            let field = |w: Option<&str>| w.and_then(|v| v.parse::<u64>().ok());
            let (accepted, last_write_ms) = match (words.next(), words.next(), words.next()) {
                (Some("END"), a, l) => (field(a), field(l)),
                _ => (None, None),
            };
            println!(
                "{}",
                json!({ "received": received, "accepted": accepted, "last_write_ms": last_write_ms, "tail": tail })
            );
            Ok(())
        }
        Cmd::Source { addr, bytes, then } => {
            let mut c = connect(addr, None).await?;
            c.write_all(format!("SOURCE {bytes}\n").as_bytes()).await?;
            let (got, sha) = drain(&mut c).await?;
            // The server has half-closed; our direction must still work.
            let (then_sha, then_sent) = send_pattern(&mut c, then, 11).await?;
            c.shutdown().await?;
            let (after, _) = drain(&mut c).await?;
            let mut expect = Sha256::new();
            let mut p = Pattern(5);
            let mut left = bytes;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                p.fill(&mut buf[..n]);
                expect.update(&buf[..n]);
                left -= n as u64;
            }
            println!(
                "{}",
                json!({ "received": got, "sha": sha, "expected_sha": hex(&expect.finalize()),
                        "then_sent": then_sent, "then_sha": then_sha, "after_eof": after })
            );
            Ok(())
        }
        Cmd::Hold { addr, count } => {
            let mut conns = Vec::new();
            let mut failed = 0usize;
            for _ in 0..count {
                match connect(addr, None).await {
                    Ok(c) => conns.push(c),
                    Err(_) => failed += 1,
                }
            }
            let mut tasks = Vec::new();
            for (i, mut c) in conns.into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let msg = format!("ECHO\nhello {i:08}");
                    c.write_all(msg.as_bytes()).await?;
                    let mut buf = vec![0u8; 14];
                    c.read_exact(&mut buf).await?;
                    anyhow::ensure!(buf == format!("hello {i:08}").as_bytes(), "wrong echo");
                    anyhow::Ok(c)
                }));
            }
            let mut open = Vec::new();
            for t in tasks {
                match t.await? {
                    Ok(c) => open.push(c),
                    Err(_) => failed += 1,
                }
            }
            let ok = open.len();
            drop(open);
            println!("{}", json!({ "ok": ok, "failed": failed }));
            Ok(())
        }
        Cmd::Streams {
            addr,
            count,
            chunk,
            every_ms,
        } => streams(addr, count, chunk, every_ms).await,
        Cmd::Stream { addr } => {
            let c = connect(addr, None).await?;
            let (r, mut w) = c.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"ECHO\n").await?;
            println!("ready");
            let mut stdin = BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = stdin.next_line().await? {
                w.write_all(format!("{line}\n").as_bytes()).await?;
                let mut echo = String::new();
                if r.read_line(&mut echo).await? == 0 {
                    anyhow::bail!("connection closed by the peer");
                }
                println!("{}", echo.trim_end());
            }
            Ok(())
        }
    }
}

/// See [`Cmd::Streams`].
async fn streams(
    addr: SocketAddr,
    count: usize,
    chunk: usize,
    every_ms: u64,
) -> anyhow::Result<()> {
    let mut conns = Vec::new();
    for _ in 0..count {
        let mut c = connect(addr, None).await?;
        c.write_all(b"ECHO\n").await?;
        conns.push(c);
    }
    println!("{}", json!({ "ready": conns.len() }));
    let started = std::time::Instant::now();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = c.into_split();
            let mut pattern = mesh_tests::pattern::Pattern(0x5eed_0000 + i as u64);
            let (mut sent, mut got) = (Sha256::new(), Sha256::new());
            let (mut out, mut back) = (vec![0u8; chunk], vec![0u8; chunk]);
            let mut bytes = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            let run = async {
                while !*stop.borrow() {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => break,
                    }
                    pattern.fill(&mut out);
                    w.write_all(&out).await.context("write")?;
                    r.read_exact(&mut back).await.context("read the echo")?;
                    anyhow::ensure!(back == out, "the echo differs at byte offset {bytes}");
                    sent.update(&out);
                    got.update(&back);
                    bytes += chunk as u64;
                }
                w.shutdown().await.context("half-close")?;
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).await.context("read to the end")?;
                anyhow::ensure!(
                    rest.is_empty(),
                    "{} bytes more than sent came back",
                    rest.len()
                );
                anyhow::Ok(())
            };
            let result = run.await;
            // When it failed, in ms after all were open.
            let failed_at_ms = result
                .is_err()
                .then(|| started.elapsed().as_millis() as u64);
            json!({
                "conn": i,
                "bytes": bytes,
                "sent_sha": hex(&sent.finalize()),
                "got_sha": hex(&got.finalize()),
                "error": result.err().map(|e| format!("{e:#}")),
                "failed_at_ms": failed_at_ms,
            })
        }));
    }
    let mut line = String::new();
    let _ = BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    let _ = stop_tx.send(true);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    println!("{}", json!({ "streams": results }));
    Ok(())
}

async fn connect(addr: SocketAddr, mark: Option<u32>) -> anyhow::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&sock).set_mark(mark)?;
    }
    tokio::time::timeout(Duration::from_secs(5), sock.connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect {addr}"))
}

async fn send_pattern(c: &mut TcpStream, bytes: u64, seed: u64) -> anyhow::Result<(String, u64)> {
    let mut p = Pattern(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        c.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok((hex(&h.finalize()), bytes))
}

/// What a flood writes: never a newline, so the line after it stands out.
const FLOOD_BYTE: u8 = 0x5a;

/// Writes as fast as `w` takes it for `secs`: the bytes it accepted, and the write
/// error that ended it early, if one did.
async fn flood_for<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    secs: u64,
) -> (u64, std::io::Result<()>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let chunk = vec![FLOOD_BYTE; 64 * 1024];
    let mut accepted = 0u64;
    while let Ok(written) = tokio::time::timeout_at(deadline, w.write(&chunk)).await {
        match written {
            Ok(n) => accepted += n as u64,
            Err(e) => return (accepted, Err(e)),
        }
    }
    (accepted, Ok(()))
}

/// Three seconds after a flood, when the reader has caught up: eight 8 KiB writes,
/// 20 ms apart (the kernel skips the sk_msg program for the first send after a TCP
/// push that failed part-way, so one write may not be enough). The bytes written and
/// the slowest write in ms.
async fn last_writes<W: tokio::io::AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<(u64, u64)> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = [FLOOD_BYTE; 8 * 1024];
    let (mut written, mut slowest_ms) = (0u64, 0u64);
    for _ in 0..8 {
        let t = std::time::Instant::now();
        w.write_all(&last).await?;
        slowest_ms = slowest_ms.max(t.elapsed().as_millis() as u64);
        written += last.len() as u64;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((written, slowest_ms))
}

async fn drain<R: AsyncReadExt + Unpin>(r: &mut R) -> anyhow::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hex(&h.finalize())));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn serve(name: String, port: u16, log: Option<PathBuf>) -> anyhow::Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    sock.listen(4096)?;
    let listener = TcpListener::from_std(sock.into())?;
    eprintln!("{name} listening on {port}");
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        let log = log.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer, &name, log).await {
                eprintln!("{name}: {peer}: {e:#}");
            }
        });
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    log: Option<PathBuf>,
) -> anyhow::Result<()> {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    match words.next() {
        Some("WHO") => {
            r.get_mut()
                .write_all(format!("{name} {peer}\n").as_bytes())
                .await?;
        }
        Some("ECHO") => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                r.get_mut().write_all(&buf[..n]).await?;
            }
            r.get_mut().shutdown().await?;
        }
        Some("STALL") => {
            let secs: u64 = words.next().context("STALL needs seconds")?.parse()?;
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let (n, _) = drain(&mut r).await?;
            r.get_mut().write_all(format!("{n}\n").as_bytes()).await?;
        }
        Some("FLOOD") => {
            let secs: u64 = words.next().context("FLOOD needs seconds")?.parse()?;
            let w = r.get_mut();
            let (mut accepted, flooded) = flood_for(w, secs).await;
            flooded?;
            // The client reads again a second after the deadline; two more seconds on,
            // the path is empty and the last writes must go straight through.
            let (last, last_write_ms) = last_writes(w).await?;
            accepted += last;
            w.write_all(format!("\nEND {accepted} {last_write_ms}\n").as_bytes())
                .await?;
            w.shutdown().await?;
        }
        Some("SINK") => {
            let (n, sha) = drain(&mut r).await?;
            r.get_mut()
                .write_all(format!("{n} {sha}\n").as_bytes())
                .await?;
        }
        Some("SOURCE") => {
            let n: u64 = words.next().context("SOURCE needs a length")?.parse()?;
            send_pattern(r.get_mut(), n, 5).await?;
            r.get_mut().shutdown().await?;
            let (tail, sha) = drain(&mut r).await?;
            if let Some(log) = log {
                use std::io::Write as _;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?;
                writeln!(f, "SOURCE-TAIL {tail} {sha}")?;
            }
        }
        // A plain HTTP/1 request (curl in the demo): the WHO answer as its body.
        Some("GET" | "HEAD")
            if line.trim_end().ends_with("HTTP/1.1") || line.trim_end().ends_with("HTTP/1.0") =>
        {
            loop {
                let mut header = String::new();
                if r.read_line(&mut header).await? == 0 || header.trim().is_empty() {
                    break;
                }
            }
            let body = format!("{name} {peer}\n");
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let w = r.get_mut();
            w.write_all(head.as_bytes()).await?;
            if line.starts_with("GET") {
                w.write_all(body.as_bytes()).await?;
            }
            w.shutdown().await?;
        }
        other => anyhow::bail!("unknown command {other:?}"),
    }
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // As root the hard limit can be raised too: the flood tests hold 20,000 sockets.
    if setrlimit(Resource::RLIMIT_NOFILE, 65_536, 65_536).is_ok() {
        return;
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Answers every request with the same body after reading the request's body, so a
/// POST with a payload costs what it should on both directions.
async fn http_serve(port: u16, body: usize) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Full};
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    println!("listening");
    let payload = bytes::Bytes::from(vec![b'x'; body]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let payload = payload.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let payload = payload.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(payload)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

//! The do-it-yourself baseline: one HAProxy per node, plain TCP from the client pod to
//! its node's HAProxy, mutual TLS 1.3 between the nodes' HAProxies, plain TCP to the
//! server pod. Configured and given certificates (openssl) by the bench itself.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use anyhow::Context as _;
use mesh_tests::Cluster;

pub const CLIENT_PORT: u16 = 7001;
const TLS_PORT: u16 = 7443;
/// The same path to the bulk (SINK) server.
pub const BULK_PORT: u16 = 7002;
const BULK_TLS_PORT: u16 = 7444;
/// HTTP mode: HAProxy parses every request (keep-alive to the client) and sends it
/// as HTTP/2 over mutual TLS to the other node's HAProxy: the L7 baseline.
pub const HTTP_PORT: u16 = 7003;
const HTTP_TLS_PORT: u16 = 7445;

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and one certificate per side, each as a PEM bundle HAProxy reads.
fn certificates(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=bench-ca",
        ],
        dir,
    )?;
    for side in ["client", "server"] {
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{side}.key"),
                "-out",
                &format!("{side}.csr"),
                "-subj",
                &format!("/CN={side}"),
            ],
            dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{side}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{side}.crt"),
                "-days",
                "2",
            ],
            dir,
        )?;
        let bundle = std::fs::read_to_string(dir.join(format!("{side}.crt")))?
            + &std::fs::read_to_string(dir.join(format!("{side}.key")))?;
        std::fs::write(dir.join(format!("{side}.pem")), bundle)?;
    }
    Ok(())
}

pub struct Haproxies {
    children: Vec<Child>,
    pub pids: Vec<u32>,
}

impl Haproxies {
    pub fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(c: &mut Cluster, node: &str, config: &Path) -> anyhow::Result<Child> {
    let check = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(config)
        .output()
        .context("running haproxy -c")?;
    anyhow::ensure!(
        check.status.success(),
        "{}: {}",
        config.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    let log = std::fs::File::create(config.with_extension("log"))?;
    let mut cmd = c.command_in_node(node, Path::new("haproxy"))?;
    cmd.arg("-db")
        .arg("-f")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd.spawn().context("starting haproxy")?;
    c.track(child.id());
    std::thread::sleep(std::time::Duration::from_millis(300));
    if let Some(status) = child.try_wait()? {
        anyhow::bail!(
            "haproxy on {node} exited ({status}): {}",
            std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
        );
    }
    Ok(child)
}

/// The addresses the client pod dials for each path.
pub struct Paths {
    /// TCP mode to the HTTP server.
    pub tcp: String,
    /// TCP mode to the bulk server.
    pub bulk: String,
    /// HTTP mode to the HTTP server.
    pub http: String,
}

/// Starts both HAProxies; the client pod dials `<client node gateway>:CLIENT_PORT`
/// for `server` and `:BULK_PORT` for `bulk` (TCP mode), `:HTTP_PORT` for `server`
/// in HTTP mode.
pub fn run(
    c: &mut Cluster,
    client_node: &str,
    server_node: &str,
    server: (IpAddr, u16),
    bulk: u16,
) -> anyhow::Result<(Haproxies, Paths)> {
    let dir: PathBuf = c.work_dir.join("haproxy");
    certificates(&dir)?;
    let server_node_ip = c.node(server_node).fabric_ip;
    let client_gw = Ipv4Addr::new(10, 244, c.node(client_node).index, 1);
    // Two threads each: the same budget the agent's runtime has on this machine.
    let global = "global\n  nbthread 2\n  maxconn 8000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\
                  defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let d = dir.display();
    let mut client_cfg = global.to_owned();
    let mut server_cfg = global.to_owned();
    for (name, front, tls, app_port, http) in [
        ("http", CLIENT_PORT, TLS_PORT, server.1, false),
        ("bulk", BULK_PORT, BULK_TLS_PORT, bulk, false),
        ("l7", HTTP_PORT, HTTP_TLS_PORT, server.1, true),
    ] {
        // HTTP mode: requests parsed and kept alive at each hop, HTTP/2 between the
        // nodes (as the agents do).
        let (mode, peer_alpn, bind_alpn) = if http {
            (
                "  mode http\n  option http-keep-alive\n",
                " alpn h2",
                " alpn h2",
            )
        } else {
            ("", "", "")
        };
        client_cfg.push_str(&format!(
            "frontend {name}\n{mode}  bind {client_gw}:{front}\n  default_backend {name}-peer\n\
             backend {name}-peer\n{mode}  server peer {server_node_ip}:{tls} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required verifyhost server{peer_alpn}\n"
        ));
        server_cfg.push_str(&format!(
            "frontend {name}-tunnel\n{mode}  bind {server_node_ip}:{tls} ssl crt {d}/server.pem ca-file {d}/ca.pem verify required{bind_alpn}\n  default_backend {name}-app\n\
             backend {name}-app\n{mode}  server app {}:{app_port}\n",
            server.0
        ));
    }
    let (cc, sc) = (dir.join("client.cfg"), dir.join("server.cfg"));
    std::fs::write(&cc, client_cfg)?;
    std::fs::write(&sc, server_cfg)?;
    let a = start(c, server_node, &sc)?;
    let b = start(c, client_node, &cc)?;
    let pids = vec![a.id(), b.id()];
    // Give both a moment to bind; the first request would otherwise race them.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok((
        Haproxies {
            children: vec![a, b],
            pids,
        },
        Paths {
            tcp: format!("{client_gw}:{CLIENT_PORT}"),
            bulk: format!("{client_gw}:{BULK_PORT}"),
            http: format!("{client_gw}:{HTTP_PORT}"),
        },
    ))
}

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
    let mut cmd = c.command_in_node(node, Path::new("/usr/sbin/haproxy"))?;
    cmd.arg("-db")
        .arg("-f")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().context("starting haproxy")?;
    c.track(child.id());
    Ok(child)
}

/// Starts both HAProxies; the client pod dials `<client node gateway>:CLIENT_PORT`.
pub fn run(
    c: &mut Cluster,
    client_node: &str,
    server_node: &str,
    server: (IpAddr, u16),
) -> anyhow::Result<(Haproxies, String)> {
    let dir: PathBuf = c.work_dir.join("haproxy");
    certificates(&dir)?;
    let server_node_ip = c.node(server_node).fabric_ip;
    let client_gw = Ipv4Addr::new(10, 244, c.node(client_node).index, 1);
    // Two threads each: the same budget the agent's runtime has on this machine.
    let global = "global\n  nbthread 2\n  maxconn 20000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\
                  defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let client_cfg = format!(
        "{global}frontend pods\n  bind {client_gw}:{CLIENT_PORT}\n  default_backend peer\n\
         backend peer\n  server peer {server_node_ip}:{TLS_PORT} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required\n",
        d = dir.display()
    );
    let server_cfg = format!(
        "{global}frontend tunnel\n  bind {server_node_ip}:{TLS_PORT} ssl crt {d}/server.pem ca-file {d}/ca.pem verify required\n  default_backend app\n\
         backend app\n  server app {}:{}\n",
        server.0,
        server.1,
        d = dir.display()
    );
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
        format!("{client_gw}:{CLIENT_PORT}"),
    ))
}

//! Protocol detection on routed ports, with real servers and clients from Debian: a
//! server-first protocol (MariaDB) is never held waiting, a client-first one that is
//! not HTTP (redis) falls back to TCP at once, and a client that sends nothing for
//! 20 s is not broken by detection.
mod common;

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use common::*;

/// A Service whose port has a neutral name (no protocol prefix), so nothing but
/// the port number or detection says what it speaks; with an HTTPRoute attached, so
/// the agents look at the first bytes.
fn routed(name: &str, v: u8, port: u16, endpoint: std::net::IpAddr) -> String {
    yaml::service(name, vip(v), port, port).replace("name: tcp,", "name: main,")
        + &yaml::endpoint_slice(name, port, &[endpoint]).replace("name: tcp,", "name: main,")
        + &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: {name}, namespace: default}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: {port}}}]\n\
             \x20 rules:\n  - backendRefs: [{{name: {name}, port: {port}}}]\n---\n"
        )
}

fn output_of(cmd: &mut std::process::Command) -> String {
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mariadb_redis_and_a_silent_client_work_through_routed_ports_with_detection() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let db = c.add_pod("node-2", "db").unwrap();
    let cache = c.add_pod("node-2", "cache").unwrap();
    let web = c.add_pod("node-2", "web").unwrap();
    c.start_echo_server(&web, 8080).unwrap();

    // MariaDB from Debian, its own data directory, started in the db pod.
    let data = c.work_dir.join("mariadb");
    std::fs::create_dir_all(&data).unwrap();
    output_of(
        std::process::Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--user=root")
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .stdout(Stdio::piped()),
    );
    let mut mysqld = c
        .command_in_pod(&db, Path::new("/usr/sbin/mariadbd"))
        .unwrap();
    mysqld
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--socket={}", data.join("sock").display()))
        .arg(format!("--pid-file={}", data.join("pid").display()))
        .args(["--user=root", "--port=3306", "--bind-address=0.0.0.0"])
        .args(["--skip-grant-tables", "--skip-name-resolve"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(c.work_dir.join("mariadb.log")).unwrap());
    let mut mysqld = mysqld.spawn().unwrap();
    c.track(mysqld.id());
    let mut redis = c
        .command_in_pod(&cache, Path::new("/usr/bin/redis-server"))
        .unwrap();
    redis
        .args([
            "--port",
            "6380",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut redis = redis.spawn().unwrap();
    c.track(redis.id());

    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&db, true)
        + &c.pod_yaml(&cache, true)
        + &c.pod_yaml(&web, true)
        + &routed("mysql", 30, 3306, db.ip)
        + &routed("cache", 31, 6380, cache.ip)
        + &routed("web", 32, 8080, web.ip);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();

    // MariaDB speaks first: port 3306 is a server-first port, never held for
    // detection. The query is answered in far less than the detection timeout.
    let mysql = |c: &Cluster, sql: &str| {
        let mut cmd = c
            .command_in_pod(&client, Path::new("/usr/bin/mariadb"))
            .unwrap();
        cmd.args(["--no-defaults", "-h", &vip(30).to_string(), "-P", "3306"])
            .args(["-u", "root", "--connect-timeout=5", "-N", "-B", "-e", sql]);
        output_of(&mut cmd)
    };
    let deadline = Instant::now() + SECS;
    loop {
        let mut cmd = c
            .command_in_pod(&db, Path::new("/usr/bin/mariadb-admin"))
            .unwrap();
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", data.join("sock").display()))
            .arg("ping");
        if cmd.output().is_ok_and(|o| o.status.success()) {
            break;
        }
        assert!(Instant::now() < deadline, "MariaDB did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    assert_eq!(mysql(&c, "SELECT 6*7").trim(), "42");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "MariaDB was held: {:?}",
        started.elapsed()
    );
    let out = mysql(
        &c,
        "CREATE DATABASE mesh; CREATE TABLE mesh.t (v INT); INSERT INTO mesh.t VALUES (1),(2); SELECT SUM(v) FROM mesh.t",
    );
    assert_eq!(out.trim(), "3", "{out}");

    // redis speaks first from the client, and not HTTP: TCP at once.
    let redis_cli = |c: &Cluster, args: &[&str]| {
        let mut cmd = c
            .command_in_pod(&client, Path::new("/usr/bin/redis-cli"))
            .unwrap();
        cmd.args(["-h", &vip(31).to_string(), "-p", "6380"])
            .args(args);
        output_of(&mut cmd)
    };
    let started = Instant::now();
    assert_eq!(redis_cli(&c, &["SET", "mesh", "works"]).trim(), "OK");
    assert_eq!(redis_cli(&c, &["GET", "mesh"]).trim(), "works");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "redis was held: {:?}",
        started.elapsed()
    );
    let mut bench = c
        .command_in_pod(&client, Path::new("/usr/bin/redis-benchmark"))
        .unwrap();
    bench
        .args(["-h", &vip(31).to_string(), "-p", "6380"])
        .args(["-n", "2000", "-c", "4", "-t", "set,get", "-q"]);
    let out = output_of(&mut bench);
    assert!(out.contains("SET") && out.contains("GET"), "{out}");

    // A client that says nothing for 20 s (twice the detection timeout): the
    // connection falls back to TCP and still carries its request when it comes.
    let addr = sa(vip(32), 8080);
    let out = json(
        &c.run_in(
            &client,
            &[
                "silent-get",
                "--addr",
                &addr,
                "--host",
                "web",
                "--wait-secs",
                "20",
            ],
            Duration::from_secs(40),
        )
        .unwrap(),
    );
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["pod"], "web", "{out}");
    // It went as TCP (a connection record for the Service), not as a routed request.
    // The record is written when the agent's relay has closed both ways, which can be
    // just after the client has its answer: wait for it.
    poll(
        "the silent client's connection record",
        Duration::from_secs(10),
        || {
            access_lines(&c.agent_log("node-1")).iter().any(|l| {
                l.contains("connection closed") && l.contains("dst_service=\"default/web\"")
            })
        },
    );
    let log = c.agent_log("node-1");
    assert!(!log.contains("path=\"/silent\""), "{log}");
    for server in [&mut mysqld, &mut redis] {
        let _ = server.kill();
        let _ = server.wait();
    }
}

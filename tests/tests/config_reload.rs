//! Hot reload of the config directory.
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    time::{Duration, Instant},
};

use common::*;

fn setup() -> (Cluster, Pod, Pod, Pod) {
    let mut c = cluster(&["node-1"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let one = c.add_pod("node-1", "one").unwrap();
    let two = c.add_pod("node-1", "two").unwrap();
    serve(&mut c, &one);
    serve(&mut c, &two);
    let pods = c.pod_yaml(&client, true) + &c.pod_yaml(&one, true) + &c.pod_yaml(&two, true);
    c.write_config("pods.yaml", &pods).unwrap();
    c.write_config("svc.yaml", &yaml::service("svc", vip(50), 80, PORT))
        .unwrap();
    c.write_config(
        "slice.yaml",
        &yaml::endpoint_slice("svc", PORT, &[one.ip, two.ip]),
    )
    .unwrap();
    c.start_agent("node-1").unwrap();
    (c, client, one, two)
}

fn backends(c: &mut Cluster, client: &Pod, n: usize) -> Vec<String> {
    answering(c, client, &sa(vip(50), 80), n)
}

#[test]
fn removed_endpoint_is_not_chosen_within_a_second_and_open_connections_survive() {
    let _g = serial();
    let (mut c, client, _one, _two) = setup();
    let seen = backends(&mut c, &client, 4);
    assert!(
        seen.contains(&"one".to_owned()) && seen.contains(&"two".to_owned()),
        "{seen:?}"
    );

    // A long-lived connection opened before the change.
    let mut stream = c
        .spawn(&client, &["stream", "--addr", &sa(vip(50), 80)])
        .unwrap();
    let mut out = BufReader::new(stream.stdout.take().unwrap());
    let mut stdin = stream.stdin.take().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // Remove endpoint `one`, keep only `two`.
    let two_ip = c.pod_ip("two");
    let changed = Instant::now();
    c.write_config("slice.yaml", &yaml::endpoint_slice("svc", PORT, &[two_ip]))
        .unwrap();
    let mut applied = None;
    while changed.elapsed() < Duration::from_secs(3) {
        if backends(&mut c, &client, 6).iter().all(|b| b == "two") {
            applied = Some(changed.elapsed());
            break;
        }
    }
    let applied = applied.expect("endpoint removal never took effect");
    assert!(applied < Duration::from_secs(1), "took {applied:?}");
    // And it stays removed.
    assert!(backends(&mut c, &client, 20).iter().all(|b| b == "two"));

    // The old connection still works.
    writeln!(stdin, "still here").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "still here");
    drop(stdin);
    assert!(stream.wait().unwrap().success(), "stream client failed");
}

#[test]
fn invalid_config_is_rejected_with_file_object_and_field_and_traffic_keeps_flowing() {
    let _g = serial();
    let (mut c, client, _one, _two) = setup();
    let cases = [
        (
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
            "broken.yaml: document 1: malformed YAML",
        ),
        (
            "unknown.yaml",
            "apiVersion: v1\nkind: Gadget\nmetadata: {name: thing}\n",
            "unknown.yaml: Gadget default/thing: field `kind`",
        ),
        (
            "badport.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 0}]}\n",
            "badport.yaml: Service default/bad: field `spec.ports[0].port`",
        ),
    ];
    let mut bomb =
        String::from("apiVersion: v1\nkind: Service\nmetadata: {name: bomb}\nspec:\n  a: &a [");
    bomb.push_str(&vec!["x"; 2000].join(","));
    bomb.push_str("]\n  b: [");
    bomb.push_str(&vec!["*a"; 3000].join(","));
    bomb.push_str("]\n");
    let cases = cases
        .into_iter()
        .map(|(f, c, e)| (f, c.to_owned(), e))
        .chain([(
            "bomb.yaml",
            bomb,
            "bomb.yaml: line 5: YAML anchors are not accepted",
        )]);
    for (file, content, expected) in cases {
        c.write_config(file, &content).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !c.agent_log("node-1").contains(expected) {
            assert!(
                Instant::now() < deadline,
                "no error naming {expected:?}:\n{}",
                c.agent_log("node-1")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The last good config keeps serving.
        let seen = backends(&mut c, &client, 4);
        assert_eq!(seen.len(), 4, "{seen:?}");
        c.remove_config(file).unwrap();
    }
    // An oversized file is refused unread, naming the file.
    let big = c.config_dir.join("big.yaml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(17 * 1024 * 1024)
        .unwrap();
    poll_log(&c, "big.yaml: 17825792 bytes, over the limit");
    assert_eq!(backends(&mut c, &client, 4).len(), 4);
    std::fs::remove_file(&big).unwrap();

    // A valid change written together with a broken file is not applied: the whole
    // directory is one generation, and the last good one keeps serving.
    let generations = |c: &Cluster| c.agent_log("node-1").matches("config applied").count();
    let before = generations(&c);
    let one_ip = c.pod_ip("one");
    // The valid change goes first, so a reload between the two writes could apply it;
    // the agent must wait for the directory to settle (or refuse it with the broken
    // file). The broken file has a name of its own, so its error is a new log line.
    c.write_config("slice.yaml", &yaml::endpoint_slice("svc", PORT, &[one_ip]))
        .unwrap();
    c.write_config("mixed.yaml", "apiVersion: v1\nkind: [\n")
        .unwrap();
    poll_log(&c, "mixed.yaml: document 1: malformed YAML");
    // Give a wrongly applied generation time to show in the log.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        generations(&c),
        before,
        "a generation was applied despite the broken file"
    );
    let seen = backends(&mut c, &client, 8);
    assert!(
        seen.iter().any(|b| b == "two"),
        "the valid half was applied: {seen:?}"
    );
    c.remove_config("mixed.yaml").unwrap();

    // An idle agent reads no config file: its own reads do not wake it. strace watches
    // it idle for 5 s, then sees a real change read (so a trace that saw nothing
    // because it never attached cannot pass).
    std::thread::sleep(Duration::from_millis(500));
    let pid = c.agent_pid("node-1").unwrap().to_string();
    let strace = std::process::Command::new("timeout")
        .args([
            "7",
            "strace",
            "-f",
            "-qq",
            "-ttt",
            "-e",
            "trace=open,openat,openat2",
            "-p",
            &pid,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (installed by cargo xtask setup)");
    std::thread::sleep(Duration::from_secs(5));
    let changed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    c.write_config("idle-check.yaml", &yaml::service("idle", vip(51), 80, PORT))
        .unwrap();
    let trace = strace.wait_with_output().unwrap();
    let trace = String::from_utf8_lossy(&trace.stderr);
    let dir = c.config_dir.display().to_string();
    // "[pid N] 1733480000.123456 openat(...)" or "1733480000.123456 openat(...)".
    let at = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.parse::<f64>().ok().filter(|t| *t > 1e9))
    };
    let (idle, woken): (Vec<&str>, Vec<&str>) = trace
        .lines()
        .filter(|l| l.contains(&dir))
        .partition(|l| at(l).is_some_and(|t| t < changed_at));
    assert!(
        idle.is_empty(),
        "an idle agent opened config files: {idle:?}"
    );
    assert!(
        !woken.is_empty(),
        "strace saw no read of the changed directory, so it saw nothing: {trace}"
    );
    c.remove_config("idle-check.yaml").unwrap();

    // A later valid change is applied again (the agent did not get stuck).
    c.write_config("slice.yaml", &yaml::endpoint_slice("svc", PORT, &[one_ip]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !backends(&mut c, &client, 4).iter().all(|b| b == "one") {
        assert!(
            Instant::now() < deadline,
            "valid config after errors was not applied"
        );
    }
}

fn poll_log(c: &Cluster, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.agent_log("node-1").contains(expected) {
        assert!(
            Instant::now() < deadline,
            "no log naming {expected:?}:\n{}",
            c.agent_log("node-1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

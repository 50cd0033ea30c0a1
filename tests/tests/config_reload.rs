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
    let out = json(
        &c.run_in(
            client,
            &["who", "--addr", &sa(vip(50), 80), "--count", &n.to_string()],
            SECS,
        )
        .unwrap(),
    );
    out["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().split(' ').next().unwrap().to_owned())
        .collect()
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
    for (file, content, expected) in cases {
        c.write_config(file, content).unwrap();
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
        std::fs::remove_file(c.config_dir.join(file)).unwrap();
    }
    // A later valid change is applied again (the agent did not get stuck).
    let one_ip = c.pod_ip("one");
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

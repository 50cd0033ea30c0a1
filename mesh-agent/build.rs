//! Builds the kernel object (`mesh-ebpf`) for the BPF target with the nightly
//! toolchain and places it in OUT_DIR, where `src/bpf/datapath.rs` embeds it; and
//! generates the gRPC code of the CA and admin APIs with a vendored `protoc`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    build_protos()?;
    build_ebpf()
}

fn build_protos() -> anyhow::Result<()> {
    // aya-build names the eBPF sources to watch; once a build script names any, cargo
    // watches only those, so the protos must be named too.
    println!("cargo:rerun-if-changed=proto");
    let protoc =
        protoc_bin_vendored::protoc_bin_path().context("no vendored protoc for this host")?;
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // meshctl prints the admin API's replies as JSON and YAML as they are.
        .type_attribute(".mesh.admin.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/ca.proto", "proto/admin.proto"], &["proto"])
        .context("compiling proto/ca.proto and proto/admin.proto")
}

fn build_ebpf() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .context("package mesh-ebpf not found in the workspace")?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("mesh-ebpf manifest has no parent directory")?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            features: if std::env::var_os("CARGO_FEATURE_NO_KERNEL_LOG").is_some() {
                &["no-kernel-log"]
            } else {
                &[]
            },
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object (run `cargo xtask setup` if the toolchain is missing)")
}

//! Builds the kernel object (`mesh-ebpf`) for the BPF target with the nightly
//! toolchain and places it in OUT_DIR, where `src/bpf/loader.rs` embeds it.
fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
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
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object (run `cargo xtask setup` if the toolchain is missing)")
}

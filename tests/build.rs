//! Generates the gRPC echo service of the tests with a vendored `protoc`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let protoc =
        protoc_bin_vendored::protoc_bin_path().context("no vendored protoc for this host")?;
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(&["proto/echo.proto"], &["proto"])
        .context("compiling proto/echo.proto")
}

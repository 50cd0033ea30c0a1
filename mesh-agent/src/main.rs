//! `mesh-agent`: the node agent. Everything lives in modules named for their concern;
//! this file only parses the command line and starts the runtime.
// Input and network paths must not panic: no unwrap/expect outside tests.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod api;
mod app;
mod authz;
mod bpf;
mod ca;
mod cli;
mod config;
mod identity;
mod inpod;
mod proxy;
mod state;
mod telemetry;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => {
            telemetry::init_logging(args.log_format, "info");
            block_on(app::run(args))
        }
        cli::Command::Ca(args) => {
            telemetry::init_logging(args.log_format, "info");
            block_on(ca::run(args))
        }
    }
}

fn block_on(main: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mesh-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

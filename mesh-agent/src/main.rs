//! `mesh-agent`: the node agent (`run`) and the mesh CA (`ca`). This file only parses
//! the command line and starts the runtime; everything else is in the library.
// Input and network paths must not panic: no unwrap/expect outside tests.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use clap::Parser as _;
use mesh_agent::{app, ca, cli, memory, telemetry};

fn main() -> std::process::ExitCode {
    memory::tune_allocator();
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(args) => {
            // Held to the end: it flushes the log lines still buffered at exit.
            let log = telemetry::init_logging(args.log_format, "info", args.access_log);
            block_on(app::run(args, log.clone()))
        }
        cli::Command::Ca(args) => {
            let _log = telemetry::init_logging(args.log_format, "info", telemetry::AccessLog::Off);
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

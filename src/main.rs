//! `lockstep`: parse settings, start logging and tracing, run the gateway until SIGTERM/Ctrl-C,
//! drain, flush buffered spans.

use anyhow::Context;
use clap::Parser;
use lockstep::config::{Cli, Command, Config, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::load(cli.settings, cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            // No configuration, so the log format comes straight from the environment: a JSON
            // log stays JSON even for this line.
            let json =
                std::env::var("LOCKSTEP_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
            let format = if json {
                LogFormat::Json
            } else {
                LogFormat::Text
            };
            let telemetry = lockstep::logging::init(format, "-");
            tracing::error!(error = %e, "invalid configuration");
            telemetry.shutdown().await;
            std::process::exit(1);
        }
    };
    let telemetry = lockstep::logging::init(config.log_format, &config.node_id);
    let result = run(cli.command.unwrap_or(Command::Serve), config).await;
    // Buffered spans (the drain's included) go out before the process ends.
    if let Err(e) = result {
        // Logged rather than returned, so a JSON log stays JSON to its last line.
        tracing::error!(error = format!("{e:#}"), "exiting on error");
        telemetry.shutdown().await;
        std::process::exit(1);
    }
    telemetry.shutdown().await;
    Ok(())
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let url = config
                .database_url
                .as_deref()
                .context("migrate needs LOCKSTEP_DATABASE_URL")?;
            let applied = lockstep::db::migrate(url).await?;
            if applied.is_empty() {
                tracing::info!("schema up to date");
            }
            for m in applied {
                tracing::info!(migration = %m, "applied");
            }
            Ok(())
        }
        Command::Serve => {
            raise_open_file_limit();
            let running = lockstep::start(config).await?;
            shutdown_signal().await;
            tracing::info!("shutdown signal: draining");
            running.shutdown().await;
            tracing::info!("drained, exiting");
            Ok(())
        }
    }
}

/// Each WebSocket is a file descriptor, and runtimes often start containers at a soft limit
/// of 1024 while allowing far more: raise the soft limit to the hard one, as Go's runtime and
/// most servers do, so the pod's capacity is set by the operator's hard limit.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(open_files = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

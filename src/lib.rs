//! snapq, the application: the command line, the HTTP APIs, the agent and the server wiring.
//! See ARCHITECTURE.md for the map.

pub mod agent;
pub mod cli;
pub mod http;
pub mod logging;
pub mod token;

use cli::Command;

/// Runs a validated command to completion.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent(config) => runtime()?.block_on(async {
            let agent = agent::Agent::build(config).await?;
            agent.run(shutdown_signal()).await
        }),
        Command::AgentExport {
            data_dir,
            out,
            hostname,
            json,
        } => {
            let exported = agent::export::export(&data_dir, &out, hostname.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&exported)?);
            } else {
                println!("{}", exported.path.display());
            }
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

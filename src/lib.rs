//! snapq, the application: the command line, the HTTP APIs, the agent and the server wiring.
//! See ARCHITECTURE.md for the map.

pub mod agent;
pub mod cli;
pub mod client;
pub mod client_access;
pub mod client_export;
pub mod client_fleet;
pub mod client_live;
pub mod doctor;
pub mod http;
pub mod layout;
pub mod logging;
pub mod server;
pub mod tls;
pub mod token;

use cli::Command;

/// Runs a validated command to completion.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Print(text) => {
            use std::io::Write;
            std::io::stdout().write_all(&text)?;
            Ok(())
        }
        Command::Agent(config) => runtime()?.block_on(async {
            let agent = agent::Agent::build(config).await?;
            agent.run(shutdown_signal()).await
        }),
        Command::Serve(config) => {
            server::bound_allocator();
            runtime()?.block_on(async {
                let server = server::Server::build(config).await?;
                server.run(shutdown_signal()).await
            })
        }
        Command::FleetSim(spec) => runtime()?.block_on(async {
            let fleet = agent::fleet::spawn(&spec).await?;
            for (host, addr) in &fleet.endpoints {
                println!("{host} listening on {addr}");
            }
            shutdown_signal().await;
            Ok(())
        }),
        Command::Client(config, command) => runtime()?.block_on(run_client(config, command)),
        Command::DbMigrate { from, to, json } => runtime()?.block_on(async {
            let (copied, queue) = server::migrate_to_postgres(&from, &to).await?;
            if json {
                let tables: serde_json::Map<String, serde_json::Value> = copied
                    .iter()
                    .map(|(t, n)| (t.to_string(), (*n).into()))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "copied": tables, "queue": {
                        "jobs": queue.jobs, "attempts": queue.attempts,
                        "requeued_running": queue.requeued_running,
                        "terminal_outcomes": queue.terminal_outcomes,
                    } })
                );
            } else {
                let total: u64 = copied.iter().map(|(_, n)| n).sum();
                println!("copied {total} rows of the catalog in {} into {to}:", from.display());
                for (table, rows) in &copied {
                    println!("  {table:<18} {rows}");
                }
                println!(
                    "copied the job queue: {} jobs with {} attempts ({} that were running are pending again)",
                    queue.jobs, queue.attempts, queue.requeued_running
                );
                println!("start every node with --database {to}");
            }
            Ok(())
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

async fn run_client(
    config: client::ClientConfig,
    command: cli::ClientCommand,
) -> anyhow::Result<()> {
    use cli::ClientCommand as C;
    if let C::Doctor = command {
        // The doctor diagnoses a client that cannot be built, too (no token, a bad CA file).
        return doctor::run(&config).await;
    }
    let c = client::Client::new(&config)?;
    match command {
        C::Doctor => unreachable!("handled above"),
        C::Endpoints { search } => client::endpoints(&c, &search).await,
        C::EndpointShow { host } => client::endpoint_show(&c, &host).await,
        C::EndpointIdentity { host, forget } => client::endpoint_identity(&c, &host, forget).await,
        C::EnrollTokenRotate => client::enroll_token_rotate(&c).await,
        C::Capture {
            hosts,
            yes,
            wait,
            timeout,
        } => {
            if client::capture(&c, &hosts, yes, wait, timeout).await? {
                Ok(())
            } else {
                anyhow::bail!("not every capture completed")
            }
        }
        C::SnapshotsList { endpoint } => client::snapshots_list(&c, endpoint.as_deref()).await,
        C::SnapshotShow { id } => client::snapshot_show(&c, &id).await,
        C::SnapshotsDelete { ids, endpoint } => {
            if client::snapshots_delete(&c, &ids, endpoint.as_deref()).await? {
                Ok(())
            } else {
                anyhow::bail!("not every snapshot was deleted")
            }
        }
        C::Upload {
            files,
            connect,
            timeout,
        } => {
            if client::upload(&c, &files, connect, timeout).await? {
                Ok(())
            } else {
                anyhow::bail!("not every upload was ingested")
            }
        }
        C::QueueStatus { watch } => client::queue_status(&c, watch).await,
        C::QueueList {
            state,
            kind,
            batch,
            limit,
        } => {
            client::queue_list(
                &c,
                state.as_deref(),
                kind.as_deref(),
                batch.as_deref(),
                limit,
            )
            .await
        }
        C::QueueShow { id } => client::queue_show(&c, &id).await,
        C::QueueRetry { id } => client::queue_action(&c, &id, "retry").await,
        C::QueueCancel { id } => client::queue_action(&c, &id, "cancel").await,
        C::QuarantineList => client::quarantine_list(&c).await,
        C::QuarantineShow { id } => client::quarantine_show(&c, &id).await,
        C::QuarantineRetry { ids, as_name } => {
            client::quarantine_retry(&c, &ids, as_name.as_deref()).await
        }
        C::QuarantineDelete { ids } => client::quarantine_delete(&c, &ids).await,
        C::Access(command) => client_access::run(&c, command).await,
        C::Export(command) => client_export::run(&c, command).await,
        C::Live(command) => client_live::run(&c, command).await,
        C::Fleet(command) => client_fleet::run(&c, command).await,
    }
}

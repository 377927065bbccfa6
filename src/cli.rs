//! The command line as the user typed it. Only this module knows clap: [`Cli::into_command`] turns
//! the parsed flags into validated configurations, and nothing past that point sees clap types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::agent::AgentConfig;
use crate::agent::recorder::{Limits, RecorderKind};

/// snapq: endpoint-forensics snapshots. Query endpoints live, capture consistent snapshots of their
/// recorder databases, and keep them as evidence.
#[derive(Debug, Parser)]
#[command(name = "snapq", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: CommandArgs,
}

#[derive(Debug, Subcommand)]
enum CommandArgs {
    /// Run the endpoint agent: recorder, recorder database and endpoint API.
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommandArgs>,
    /// Where the agent keeps monitor.db, agent.token and staged copies
    /// [default: $XDG_DATA_HOME/snapq-agent]
    #[arg(long, env = "SNAPQ_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address and port of the endpoint API.
    #[arg(long, default_value = "0.0.0.0:17444")]
    listen: SocketAddr,
    /// The endpoint's name in snapshots and on the server [default: the machine's hostname]
    #[arg(long)]
    hostname: Option<String>,
    /// Bearer token the endpoint API requires [default: read or create DATA_DIR/agent.token]
    #[arg(long, env = "SNAPQ_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Replace the real recorder with a simulator writing this many events per second.
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    simulate: Option<u32>,
    /// Before starting, write this many simulated events spread over the last 30 days.
    #[arg(long, value_name = "N", default_value_t = 0)]
    prefill_events: u64,
    /// Keep the recorder database under this many MiB, deleting the oldest events first.
    #[arg(long, value_name = "MIB")]
    max_db_mib: Option<u64>,
    /// Delete events older than this many days.
    #[arg(long, value_name = "DAYS")]
    max_age_days: Option<u64>,
    /// How often the real recorder polls /proc, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    poll_ms: u64,
    /// Staged snapshot copies not fetched within this many minutes are deleted.
    #[arg(long, value_name = "MINUTES", default_value_t = 60)]
    staging_ttl_minutes: u64,
}

#[derive(Debug, Subcommand)]
enum AgentCommandArgs {
    /// Write a consistent copy of the recorder database as <hostname>_<timestamp>.db, while the
    /// recorder keeps running (for offline endpoints; upload the file or drop it in the watched folder).
    Export(ExportArgs),
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// The agent's data directory (holding monitor.db) [default: $XDG_DATA_HOME/snapq-agent]
    #[arg(long, env = "SNAPQ_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Directory to write the export into (must exist).
    #[arg(long)]
    out: PathBuf,
    /// Name the export after this hostname instead of the one the recorder stored.
    #[arg(long)]
    hostname: Option<String>,
    /// Print path, size and sha256 as JSON.
    #[arg(long)]
    json: bool,
}

/// What to run, validated.
#[derive(Debug)]
pub enum Command {
    Agent(AgentConfig),
    AgentExport {
        data_dir: PathBuf,
        out: PathBuf,
        hostname: Option<String>,
        json: bool,
    },
}

impl Cli {
    pub fn into_command(self) -> anyhow::Result<Command> {
        match self.command {
            CommandArgs::Agent(args) => match args.command {
                Some(AgentCommandArgs::Export(e)) => Ok(Command::AgentExport {
                    data_dir: e
                        .data_dir
                        .unwrap_or_else(|| default_data_dir("snapq-agent")),
                    out: e.out,
                    hostname: e.hostname,
                    json: e.json,
                }),
                None => Ok(Command::Agent(args.into_config()?)),
            },
        }
    }
}

impl AgentArgs {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        if self.simulate == Some(0) {
            bail!("--simulate needs a rate above 0 events per second");
        }
        Ok(AgentConfig {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| default_data_dir("snapq-agent")),
            listen: self.listen,
            hostname: self.hostname.unwrap_or_else(crate::agent::system::hostname),
            token: self.token,
            recorder: match self.simulate {
                Some(events_per_sec) => RecorderKind::Simulate { events_per_sec },
                None => RecorderKind::Linux {
                    interval: Duration::from_millis(self.poll_ms.max(10)),
                },
            },
            prefill_events: self.prefill_events,
            limits: Limits {
                max_bytes: self.max_db_mib.map(|m| m * 1024 * 1024),
                max_age: self
                    .max_age_days
                    .map(|d| Duration::from_secs(d * 24 * 3600)),
            },
            staging_ttl: Duration::from_secs(self.staging_ttl_minutes * 60),
        })
    }
}

/// `$XDG_DATA_HOME/<name>`, else `~/.local/share/<name>`.
fn default_data_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(name)
}

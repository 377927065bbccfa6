//! The command line as the user typed it. Only this module knows clap: [`Cli::into_command`] turns
//! the parsed flags into validated configurations, and nothing past that point sees clap types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::agent::AgentConfig;
use crate::agent::enroll::{EnrollToken, ServerLink};
use crate::agent::fleet::FleetSpec;
use crate::agent::recorder::{Limits, LinuxConfig, RecorderKind};
use crate::client::ClientConfig;
use crate::client_access::AccessCommand;
use crate::client_export::{ExportCommand, FilterArgs, SourceArg};
use crate::client_live::{EventsQuery, LiveCommand};
use crate::server::ServeConfig;

/// snapq: endpoint-forensics snapshots. Query endpoints live, capture consistent snapshots of their
/// recorder databases, and keep them as evidence.
#[derive(Debug, Parser)]
#[command(name = "snapq", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: CommandArgs,
    /// How log lines on stderr are written: `text` for people, `json` (one object per line) for
    /// log shippers.
    #[arg(long, global = true, env = "SNAPQ_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

/// The shells `snapq completions` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
enum CommandArgs {
    /// Run the server: HTTPS API, job workers, catalog and snapshot store.
    Serve(ServeArgs),
    /// Run the endpoint agent: recorder, recorder database and endpoint API.
    Agent(AgentArgs),
    /// Run many simulated endpoints in one process, enrolled with a server.
    FleetSim(FleetSimArgs),
    /// List endpoints, or search them by hostname or IP.
    Endpoints {
        #[command(subcommand)]
        command: EndpointsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Capture snapshots of endpoints.
    Capture {
        /// Endpoints to capture, by hostname.
        #[arg(required = true)]
        hosts: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Wait for the captures, showing progress; exit 0 only if all complete.
        #[arg(long)]
        wait: bool,
        /// Stop waiting after this many seconds (exit 1; the captures go on) [default: no limit]
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List and show snapshots.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Upload exported snapshot files to the server, which ingests them.
    Upload {
        /// Files named `<hostname>_YYYY_MM_DDTHH.MM.SS.mmmZ.db`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Wait for each ingest, then open the snapshot it became for analysis (Upload & Connect:
        /// prints the connection to query with `snapq events --connection ID`).
        #[arg(long)]
        connect: bool,
        /// Stop waiting for an ingest after this many seconds (exit 1; the ingest goes on)
        /// [default: no limit]
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Live connections to endpoints and to stored snapshots: connect, list, reconnect, close,
    /// capture.
    Live {
        #[command(subcommand)]
        command: LiveCommandArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Query events through a connection: a page of a type with filters, a summary, a process
    /// tree.
    Events(EventsArgs),
    /// Show and steer the job queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Files the ingest job rejected: see why, send them back to ingest, or delete them.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The token new agents enroll with (admin).
    EnrollToken {
        #[command(subcommand)]
        command: EnrollTokenCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Users, their roles and granted computer groups (admin).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// API tokens: your own, or (admin) anyone's.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Computer groups: which endpoints a user may reach (admin).
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fleet batches: capture every endpoint of a computer group, watch, pause, resume, cancel.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cron schedules that start fleet batches, with retention of older snapshots.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The audit log of every state change (admin).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check what first-time users get wrong: the server reachable, its certificate trusted, the
    /// token valid (and its role), clock skew, the server's free disk, agent versions; prints what
    /// to do for each problem. Exit 1 if anything needs fixing.
    Doctor {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The server's database: move a single-node catalog into PostgreSQL.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Print a shell completion script: `snapq completions bash > /etc/bash_completion.d/snapq`.
    Completions {
        #[arg(value_enum)]
        shell: ShellArg,
    },
    /// Print the man page (roff): `snapq manpage > snapq.1`.
    Manpage,
    /// Export events of a connection, a snapshot or the evidence store to CSV, JSON Lines or
    /// XLSX (a job; the file lands under the server's exports/).
    Export(EventsExportArgs),
    /// Exports: list them, download one, delete them.
    Exports {
        #[command(subcommand)]
        command: ExportsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Saved evidence: events copied out of a connection or snapshot, kept on the server.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Copy the catalog of a stopped single-node server (DATA_DIR/catalog.db) into an empty
    /// PostgreSQL database, keeping every id; then start the nodes with `--database URL`.
    Migrate {
        /// The data directory of the server to move (it must not be running).
        #[arg(long, value_name = "DATA_DIR")]
        from: PathBuf,
        /// The PostgreSQL database to copy into (postgres://USER@HOST:PORT/DB); its catalog
        /// tables must be empty.
        #[arg(long, value_name = "URL")]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

/// Which rows: the filters of `snapq events`.
#[derive(Debug, Args)]
struct EventFilterArgs {
    /// Event type (repeat for several; default: every type that has the fields filtered on).
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// A condition `FIELD OP VALUE`, e.g. 'path co bash' (repeatable; all must hold).
    #[arg(long = "where", value_name = "COND")]
    wheres: Vec<String>,
    /// Any condition may hold, instead of all.
    #[arg(long)]
    any: bool,
    /// Events at or after this time (RFC 3339 or epoch ms).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Events before this time (RFC 3339 or epoch ms).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Order by FIELD, or -FIELD for newest/largest first [default: ts]
    #[arg(long, value_name = "FIELD", allow_hyphen_values = true)]
    sort: Option<String>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["connection", "snapshot", "evidence"]))]
struct EventsExportArgs {
    /// A live connection or an opened snapshot (`snapq live list`).
    #[arg(long, value_name = "ID")]
    connection: Option<String>,
    /// A stored snapshot by id (`snapq snapshots list`).
    #[arg(long, value_name = "ID")]
    snapshot: Option<i64>,
    /// The evidence store (with --endpoint: of that endpoint only).
    #[arg(long)]
    evidence: bool,
    /// With --evidence: only this endpoint's evidence.
    #[arg(long, value_name = "HOST", requires = "evidence")]
    endpoint: Option<String>,
    #[command(flatten)]
    filters: EventFilterArgs,
    /// csv, jsonl or xlsx.
    #[arg(long, value_parser = ["csv", "jsonl", "xlsx"])]
    format: String,
    /// Wait until the export ends; exit 1 if it failed or was cancelled.
    #[arg(long)]
    wait: bool,
    /// Stop waiting after this many seconds (exit 1; the export goes on) [default: no limit]
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Wait, then download the file here.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Subcommand)]
enum ExportsCommand {
    /// Exports you may see, newest first: id, state, format, rows, bytes, endpoint.
    List,
    /// One export.
    Show { id: i64 },
    /// Download a complete export (default: under its own name, here).
    Download {
        id: i64,
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Delete exports (the file and the entry; a running one is cancelled).
    Delete {
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Copy events (TYPE:ID, e.g. process:42) into the evidence store.
    #[command(group = clap::ArgGroup::new("from").required(true).args(["connection", "snapshot"]))]
    Save {
        /// The connection the events are in.
        #[arg(long, value_name = "ID")]
        connection: Option<String>,
        /// A stored snapshot the events are in.
        #[arg(long, value_name = "ID")]
        snapshot: Option<i64>,
        /// Why they matter.
        #[arg(long)]
        note: Option<String>,
        #[arg(required = true, value_name = "EVENT_REF")]
        events: Vec<String>,
    },
    /// Saved evidence, newest first.
    List {
        #[arg(long, value_name = "HOST")]
        endpoint: Option<String>,
    },
    /// One evidence item with every column of its event.
    Show { id: i64 },
    /// Delete evidence items.
    Delete {
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

const ROLES: [&str; 3] = ["admin", "operator", "viewer"];

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Add a user with a role and the computer groups they may reach.
    Add {
        name: String,
        /// admin (everything, every endpoint), operator (capture, upload, delete, retry, cancel
        /// in their groups) or viewer (find and look, in their groups).
        #[arg(long, value_parser = ROLES)]
        role: String,
        /// A computer group the user may reach (repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Every user with role, groups and number of usable tokens.
    List,
    /// One user with their tokens.
    Show { name: String },
    /// Remove a user; their tokens stop working at once.
    Remove {
        name: String,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Change a user's role.
    SetRole {
        name: String,
        #[arg(value_parser = ROLES)]
        role: String,
    },
    /// Let a user reach a computer group.
    Grant { name: String, group: String },
    /// Take a computer group away from a user.
    Revoke { name: String, group: String },
    /// Set a user's web-console password (asked twice on a terminal, else one line of stdin).
    Passwd { name: String },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Make an API token and print it (shown only this once).
    Create {
        /// Whose token [default: yours]; another user's needs admin.
        #[arg(long)]
        user: Option<String>,
        /// A label to recognise it by in `tokens list`.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, like 90m, 12h, 30d or 8w [default: never expires]
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// Tokens with user, label, prefix, created, last used and expiry: yours, or (admin) all.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by id: its next use gets 401.
    Revoke {
        id: i64,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsCommand {
    /// Define a group; an endpoint is a member when any rule matches its current facts.
    Add {
        name: String,
        /// Hostname glob (`web-*`, `db-0?`), case-insensitive (repeatable).
        #[arg(long, value_name = "GLOB")]
        hostname: Vec<String>,
        /// Network any of the endpoint's addresses is in (`10.1.0.0/16`; repeatable).
        #[arg(long)]
        cidr: Vec<String>,
        /// Label the endpoint's agent reports (`snapq agent --label`; repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Hostname that is a member whatever its facts (repeatable).
        #[arg(long, value_name = "HOST")]
        member: Vec<String>,
    },
    /// Every group with its rules, member count now and users.
    List,
    /// One group and its members now.
    Show { name: String },
    /// Remove a group; users granted it no longer reach its endpoints.
    Remove {
        name: String,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// How a batch runs (shared by `fleet capture` and `schedule add`).
#[derive(Debug, Args)]
struct BatchArgs {
    /// Captures of this batch running at once [default: 16]
    #[arg(long, value_name = "N")]
    max_concurrency: Option<u32>,
    /// How long offline endpoints are waited for before they are skipped, like 30m, 6h, 1d
    /// [default: 1h]
    #[arg(long, value_name = "DURATION")]
    expire: Option<String>,
    /// Pause the batch when this many captures failed (5) or this share of the batch (10%)
    /// [default: no limit]
    #[arg(long, value_name = "N|P%")]
    failure_limit: Option<String>,
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Capture every endpoint of a computer group: one capture per endpoint, at most
    /// --max-concurrency at a time; offline endpoints wait until they come online or the batch
    /// expires.
    Capture {
        /// The computer group (one granted to you).
        #[arg(long)]
        group: String,
        #[command(flatten)]
        batch: BatchArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Wait until the batch ends, showing its progress; exit 0 only if it ends complete.
        #[arg(long)]
        wait: bool,
        /// Stop waiting after this many seconds (exit 1; the batch goes on) [default: no limit]
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Batches, newest first, with their totals.
    List {
        /// Only running and paused ones.
        #[arg(long)]
        active: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One batch: totals and every endpoint's outcome.
    Show { id: String },
    /// Start no more captures (running ones finish).
    Pause { id: String },
    /// Go on with a paused batch (the failure limit counts failures from now on).
    Resume { id: String },
    /// End the batch: queued endpoints are skipped and running captures cancelled.
    Cancel {
        id: String,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// A schedule that starts one batch of a group per cron tick.
    Add {
        name: String,
        /// Five fields (minute hour day-of-month month day-of-week), e.g. "0 2 * * *", or @daily.
        #[arg(long)]
        cron: String,
        /// The IANA time zone the expression is read in, e.g. Europe/Berlin [default: UTC]
        #[arg(long)]
        tz: Option<String>,
        /// The computer group to capture (one granted to you).
        #[arg(long)]
        group: String,
        #[command(flatten)]
        batch: BatchArgs,
        /// After each batch, delete all but the newest K snapshots of each of its endpoints.
        #[arg(long, value_name = "K", conflicts_with = "keep_days")]
        keep_last: Option<u32>,
        /// After each batch, delete its endpoints' snapshots older than this many days.
        #[arg(long, value_name = "DAYS")]
        keep_days: Option<u32>,
    },
    /// Schedules with their next run (in their zone and in UTC) and their last batch.
    List,
    /// One schedule and its recent batches.
    Show { name: String },
    /// Stop starting batches (ticks while paused are not run later).
    Pause { name: String },
    /// Start batches again from the next tick.
    Resume { name: String },
    /// Remove a schedule (its batches stay listed).
    Remove {
        name: String,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Start a batch now, as a tick would.
    Run { name: String },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Audit entries, newest first.
    List {
        /// Since a time: RFC 3339, epoch ms, or a duration ago (30m, 24h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Before a time (same forms as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only what this user did.
        #[arg(long)]
        user: Option<String>,
        /// Only this action (`user.add`), or a family of them (`user`).
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// How a client subcommand reaches the server.

#[derive(Debug, Subcommand)]
enum QuarantineCommand {
    /// Quarantined files, newest first: id, name, origin, size, reason, when.
    List,
    /// One quarantined file with the full rejection.
    Show { id: String },
    /// Ingest quarantined files again (after a false reason, or under a fixed name).
    Retry {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Ingest it under this snapshot name (one id only).
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
    /// Delete quarantined files for good.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LiveCommandArgs {
    /// Connect to endpoints by hostname or IP address.
    Connect {
        #[arg(required = true, value_name = "HOST|IP")]
        targets: Vec<String>,
    },
    /// Connections not closed: endpoint, target, status, since, last activity, database size,
    /// events and their time range.
    List,
    /// One connection in full.
    Show { id: i64 },
    /// Connect again to the stored targets of connections.
    Reconnect {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Close connections (they leave the list).
    Close {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Open a stored snapshot for analysis: a connection whose target is the snapshot.
    Open { snapshot_id: i64 },
    /// Capture a snapshot of a live connection's endpoint (the capture job).
    Capture {
        id: i64,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Wait for the capture, showing progress; exit 0 only if it completes.
        #[arg(long)]
        wait: bool,
        /// Stop waiting after this many seconds (exit 1; the capture goes on) [default: no limit]
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EventsArgs {
    #[command(subcommand)]
    command: Option<EventsCommandArgs>,
    /// The connection to query (`snapq live list`).
    #[arg(long, value_name = "ID", required = true)]
    connection: Option<i64>,
    /// Event type: process, file, network, dns, image, auth or registry [default: process]
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// A condition `FIELD OP VALUE` (repeatable; all must hold unless --any). OP: eq ne gt gte
    /// lt lte co nc sw ew isempty range (`range A..B`).
    #[arg(long = "where", value_name = "CONDITION")]
    wheres: Vec<String>,
    /// Any condition may hold (OR) instead of all.
    #[arg(long)]
    any: bool,
    /// From this time (inclusive): RFC 3339 or epoch ms.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Until this time (exclusive): RFC 3339 or epoch ms.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Sort by FIELD, `-FIELD` for descending [default: -ts, newest first]
    #[arg(long, value_name = "[-]FIELD", allow_hyphen_values = true)]
    sort: Option<String>,
    /// Events per page [default: 100]
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// Continue after a page: the cursor the previous page printed.
    #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
    cursor: Option<String>,
    /// Follow every page to the end (with --json: one event per line).
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Subcommand)]
enum EventsCommandArgs {
    /// Events per type and their time range.
    Summary {
        #[arg(long, value_name = "ID")]
        connection: i64,
    },
    /// A process's parent chain and children, drawn as a tree.
    Tree {
        #[arg(long, value_name = "ID")]
        connection: i64,
        /// The process event's `id` (not its pid).
        process_id: i64,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollTokenCommand {
    /// Issue a new enroll token (printed, and written to the server's enroll.token); the old one
    /// stops admitting agents, enrolled agents keep working.
    Rotate,
}

/// How a client subcommand reaches the server.
#[derive(Debug, Args)]
struct ClientArgs {
    /// The server's URL.
    #[arg(
        long,
        global = true,
        env = "SNAPQ_SERVER",
        default_value = "https://127.0.0.1:17443"
    )]
    server: String,
    /// Trust the server's certificate if this CA file issued it [default: pin the local server's
    /// certificate from the data directory, else the system's roots]
    #[arg(long, global = true, env = "SNAPQ_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// API token [default: the local server's admin.token]
    #[arg(long, global = true, env = "SNAPQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local server's data directory, where admin.token is [default: $XDG_DATA_HOME/snapq]
    #[arg(long, global = true, env = "SNAPQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum EndpointsCommand {
    /// Every endpoint, with an online indicator.
    List,
    /// Endpoints whose hostname or IP contains TEXT (prefix matches first).
    Search { text: String },
    /// One endpoint: its facts, and what its agent reports now (database, event counts and time
    /// range, free disk, the recorder's mode per event type).
    Show { host: String },
    /// Let HOST enroll again with a new agent identity (a reimaged machine, a replaced
    /// certificate); its current agent's credential stops working (admin).
    Rekey {
        host: String,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Forget HOST's agent: its identity and address (and the endpoint, unless it has snapshots);
    /// its agent can enroll again (admin).
    Forget {
        host: String,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotsCommand {
    /// Snapshots grouped by endpoint with its number of captures.
    List {
        /// Only this endpoint's.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// One snapshot in full.
    Show { id: String },
    /// Delete snapshots (file and catalog entry), by id or all of an endpoint's.
    Delete {
        /// Snapshot ids.
        #[arg(required_unless_present = "endpoint", conflicts_with = "endpoint")]
        ids: Vec<i64>,
        /// Delete every snapshot of this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// Do not ask for confirmation (required when not run from a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Mark a snapshot to keep: a schedule's retention never deletes it.
    Keep { id: String },
    /// Let a schedule's retention delete a snapshot again.
    Unkeep { id: String },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Counts per job kind and state, oldest pending age, throughput, running jobs.
    Status {
        /// Refresh every second.
        #[arg(long)]
        watch: bool,
    },
    /// Jobs, newest first.
    List {
        /// pending, running, retrying, done, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
        /// capture, ingest, delete or fleet.
        #[arg(long)]
        kind: Option<String>,
        /// Only the jobs of this fleet batch.
        #[arg(long, value_name = "ID")]
        batch: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One job with every attempt and its error.
    Show { id: String },
    /// Run a failed or cancelled job again.
    Retry { id: String },
    /// Cancel a pending, retrying or running job.
    Cancel { id: String },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Settings file (TOML); flags and SNAPQ_* variables override it.
    #[arg(long, env = "SNAPQ_CONFIG")]
    config: Option<PathBuf>,
    /// Where the catalog, queue, snapshots and tokens live [default: $XDG_DATA_HOME/snapq]
    #[arg(long, env = "SNAPQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address and port of the API [default: 0.0.0.0:17443]
    #[arg(long, env = "SNAPQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// Keep the catalog in this PostgreSQL database (postgres://USER@HOST:PORT/DB) instead of
    /// catalog.db in the data directory, so several server nodes can share it [default: SQLite
    /// in the data directory]
    #[arg(
        long,
        value_name = "URL",
        env = "SNAPQ_DATABASE",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Keep snapshot files here (a file system every node mounts, for several nodes)
    /// [default: DATA_DIR/snapshots]
    #[arg(long, value_name = "PATH", env = "SNAPQ_STORE")]
    store: Option<PathBuf>,
    /// Also serve Prometheus metrics at http://ADDR/metrics, plain HTTP without a token: bind it
    /// to loopback or a monitoring network [default: off; admins can always scrape
    /// https://LISTEN/metrics with their token]
    #[arg(long, value_name = "ADDR", env = "SNAPQ_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Also start N simulated endpoints in this process (group `demo`).
    #[arg(long, value_name = "N", env = "SNAPQ_DEMO")]
    demo: Option<u32>,
    /// Disk space (MiB) captures always leave free [default: 2048]
    #[arg(long, value_name = "MIB", env = "SNAPQ_CAPTURE_RESERVE_MIB")]
    capture_reserve_mib: Option<u64>,
    /// Captures running at once [default: 8]
    #[arg(long, value_name = "N", env = "SNAPQ_CAPTURE_CONCURRENCY")]
    capture_concurrency: Option<usize>,
    /// Limit each capture's download to this many KiB/s [default: 0, no limit]
    #[arg(long, value_name = "KIB_PER_SEC", env = "SNAPQ_CAPTURE_RATE_KIB")]
    capture_rate_kib: Option<u64>,
    /// Attempts a job gets before it fails [default: 6]
    #[arg(long, value_name = "N", env = "SNAPQ_JOB_MAX_ATTEMPTS")]
    job_max_attempts: Option<u32>,
    /// First retry delay in milliseconds, doubled per attempt with jitter [default: 2000]
    #[arg(long, value_name = "MS", env = "SNAPQ_JOB_RETRY_BASE_MS")]
    job_retry_base_ms: Option<u64>,
    /// Finished jobs are pruned after this many days [default: 30]
    #[arg(long, value_name = "DAYS", env = "SNAPQ_JOB_RETENTION_DAYS")]
    job_retention_days: Option<u64>,
    /// A node whose workers send no heartbeat for this many seconds is dead; its running jobs
    /// are taken back and run again [default: 30]
    #[arg(long, value_name = "SECS", env = "SNAPQ_JOB_ORPHAN_SECS")]
    job_orphan_secs: Option<u64>,
    /// PostgreSQL only: the queue commits without waiting for the database to flush its WAL
    /// (`synchronous_commit = off` on its connections): enqueues several times faster; a crash of
    /// the database server (never of a node) may lose its last fraction of a second of queue
    /// changes, as SQLite's default may on power loss
    #[arg(long, env = "SNAPQ_QUEUE_ASYNC_COMMIT")]
    queue_async_commit: bool,
    /// An endpoint is online when it heartbeat within this many seconds [default: 45]
    #[arg(long, value_name = "SECS", env = "SNAPQ_ONLINE_WINDOW_SECS")]
    online_window_secs: Option<u64>,
    /// Uploads larger than this many MiB are refused while they stream [default: 16384]
    #[arg(long, value_name = "MIB", env = "SNAPQ_UPLOAD_MAX_MIB")]
    upload_max_mib: Option<u64>,
    /// The drop folder to watch for exported snapshots [default: DATA_DIR/watch]
    #[arg(long, value_name = "PATH", env = "SNAPQ_WATCH")]
    watch: Option<PathBuf>,
    /// A file written in place into the drop folder counts once unchanged this long [default: 2000]
    #[arg(long, value_name = "MS", env = "SNAPQ_WATCH_QUIET_MS")]
    watch_quiet_ms: Option<u64>,
    /// A dropped file that fails validation while it may still be arriving is quarantined only
    /// after it stayed unchanged this long [default: 60]
    #[arg(long, value_name = "SECS", env = "SNAPQ_WATCH_SETTLE_SECS")]
    watch_settle_secs: Option<u64>,
    /// Quarantined files are deleted after this many days [default: 30]
    #[arg(long, value_name = "DAYS", env = "SNAPQ_QUARANTINE_RETENTION_DAYS")]
    quarantine_retention_days: Option<u64>,
    /// Exports are deleted this many days after they finished (fractions allowed) [default: 7]
    #[arg(long, value_name = "DAYS", env = "SNAPQ_EXPORT_RETENTION_DAYS")]
    export_retention_days: Option<f64>,
    /// Most rows per second one export writes, to spare the disk [default: 0, no limit]
    #[arg(long, value_name = "ROWS", env = "SNAPQ_EXPORT_MAX_ROWS_PER_SEC")]
    export_max_rows_per_sec: Option<u64>,
    /// Ingests running at once; an ingest mostly waits on fsync, so more than the cores pay
    /// [default: 16]
    #[arg(long, value_name = "N", env = "SNAPQ_INGEST_CONCURRENCY")]
    ingest_concurrency: Option<usize>,
    /// A live connection unused this many minutes times out (fractions allowed) [default: 10]
    #[arg(long, value_name = "MINUTES", env = "SNAPQ_CONNECTION_IDLE_MINUTES")]
    connection_idle_minutes: Option<f64>,
    /// The time budget of one query on a stored snapshot, in milliseconds [default: 10000]
    #[arg(long, value_name = "MS", env = "SNAPQ_QUERY_BUDGET_MS")]
    query_budget_ms: Option<u64>,
}

/// The settings file: every key optional, same names as the flags with `_`.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    database: Option<String>,
    store: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    demo: Option<u32>,
    capture_reserve_mib: Option<u64>,
    capture_concurrency: Option<usize>,
    capture_rate_kib: Option<u64>,
    job_max_attempts: Option<u32>,
    job_retry_base_ms: Option<u64>,
    job_retention_days: Option<u64>,
    job_orphan_secs: Option<u64>,
    queue_async_commit: Option<bool>,
    online_window_secs: Option<u64>,
    upload_max_mib: Option<u64>,
    watch: Option<PathBuf>,
    watch_quiet_ms: Option<u64>,
    watch_settle_secs: Option<u64>,
    quarantine_retention_days: Option<u64>,
    export_retention_days: Option<f64>,
    export_max_rows_per_sec: Option<u64>,
    ingest_concurrency: Option<usize>,
    connection_idle_minutes: Option<f64>,
    query_budget_ms: Option<u64>,
}

#[derive(Debug, Args)]
struct FleetSimArgs {
    /// How many endpoints.
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// The server's URL.
    #[arg(long, env = "SNAPQ_SERVER", default_value = "https://127.0.0.1:17443")]
    server: String,
    /// The server's enroll token (the content of its enroll.token).
    #[arg(long, env = "SNAPQ_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: String,
    /// Where the endpoints keep their databases.
    #[arg(long)]
    data_dir: PathBuf,
    /// Hostname prefix: PREFIX-01, PREFIX-02, …
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Events per second each endpoint records.
    #[arg(long, default_value_t = 10)]
    events_per_sec: u32,
    /// Events each new endpoint database starts with.
    #[arg(long, default_value_t = 10_000)]
    prefill_events: u64,
    /// Label every endpoint with this (repeatable).
    #[arg(long)]
    label: Vec<String>,
    /// Prefill each new endpoint database to about this many MiB (instead of --prefill-events).
    #[arg(long, value_name = "MIB")]
    db_mib: Option<u64>,
    /// This share of the endpoints (0-100) misbehaves: half of them drop the connection in the
    /// middle of snapshot downloads, the other half go offline for a while.
    #[arg(long, value_name = "PERCENT", default_value_t = 0)]
    flaky: u8,
    /// Seconds between each endpoint's heartbeats.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    heartbeat_secs: u64,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommandArgs>,
    /// Where the agent keeps monitor.db, agent.token, its certificate pair (certs/), the server's
    /// credential and staged copies [default: $XDG_DATA_HOME/snapq-agent]
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
    /// How often the real recorder polls (sockets, logons; processes without kernel events) and
    /// writes a batch of kernel events, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    poll_ms: u64,
    /// Record file changes on the filesystem holding this path (repeatable) [default: /].
    #[arg(long, value_name = "PATH")]
    watch: Vec<PathBuf>,
    /// Do not record file changes under this path (repeatable); the data directory always is.
    #[arg(long, value_name = "PATH")]
    exclude: Vec<PathBuf>,
    /// Poll /proc even when kernel process and file events are available.
    #[arg(long)]
    no_kernel_events: bool,
    /// Staged snapshot copies not fetched within this many minutes are deleted.
    #[arg(long, value_name = "MINUTES", default_value_t = 60)]
    staging_ttl_minutes: u64,
    /// Disk space (MiB) staging a snapshot always leaves free on the endpoint.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    staging_reserve_mib: u64,
    /// The endpoint API's TLS certificate (PEM) [default: DATA_DIR/certs/httpPublicCert.pem,
    /// generated self-signed on first start]; the server pins it at enrollment.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Enroll with this server and send it heartbeats.
    #[arg(
        long,
        value_name = "URL",
        env = "SNAPQ_SERVER",
        requires = "enroll_token"
    )]
    server: Option<String>,
    /// The server's enroll token (the content of its enroll.token).
    #[arg(long, env = "SNAPQ_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// Verify the server with this CA file instead of the pin inside the enroll token.
    #[arg(long, value_name = "FILE")]
    server_ca: Option<PathBuf>,
    /// A label the server's computer groups can match (repeatable).
    #[arg(long)]
    label: Vec<String>,
    /// The URL the server should call this agent at [default: derived from --listen]
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    heartbeat_secs: u64,
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
    /// Text the command line itself produces (completions, the man page): print it.
    Print(Vec<u8>),
    Serve(ServeConfig),
    Agent(AgentConfig),
    FleetSim(FleetSpec),
    Client(ClientConfig, ClientCommand),
    AgentExport {
        data_dir: PathBuf,
        out: PathBuf,
        hostname: Option<String>,
        json: bool,
    },
    /// `snapq db migrate`.
    DbMigrate {
        from: PathBuf,
        to: crate::server::DatabaseUrl,
        json: bool,
    },
}

/// A request to the server's API.
#[derive(Debug)]
pub enum ClientCommand {
    Doctor,
    Endpoints {
        search: String,
    },
    EndpointShow {
        host: String,
    },
    /// `endpoints rekey` (`forget: false`) or `endpoints forget`.
    EndpointIdentity {
        host: String,
        forget: bool,
    },
    EnrollTokenRotate,
    Capture {
        hosts: Vec<String>,
        yes: bool,
        wait: bool,
        /// How long `wait` may take.
        timeout: Option<Duration>,
    },
    SnapshotsList {
        endpoint: Option<String>,
    },
    SnapshotShow {
        id: String,
    },
    SnapshotsDelete {
        ids: Vec<i64>,
        endpoint: Option<String>,
    },
    Upload {
        files: Vec<PathBuf>,
        connect: bool,
        /// How long `connect` may wait for one ingest.
        timeout: Option<Duration>,
    },
    QueueStatus {
        watch: bool,
    },
    QueueList {
        state: Option<String>,
        kind: Option<String>,
        batch: Option<String>,
        limit: u32,
    },
    QueueShow {
        id: String,
    },
    QueueRetry {
        id: String,
    },
    QueueCancel {
        id: String,
    },
    QuarantineList,
    QuarantineShow {
        id: String,
    },
    QuarantineRetry {
        ids: Vec<String>,
        as_name: Option<String>,
    },
    QuarantineDelete {
        ids: Vec<String>,
    },
    Access(AccessCommand),
    Export(ExportCommand),
    Live(LiveCommand),
    Fleet(crate::client_fleet::FleetCommand),
}

impl ClientArgs {
    fn into_config(self) -> ClientConfig {
        ClientConfig {
            server: self.server,
            token: self.token,
            ca_cert: self.ca_cert,
            data_dir: self
                .data_dir
                .unwrap_or_else(crate::layout::ServerDir::default_root),
            json: self.json,
        }
    }
}

impl Cli {
    /// How logs are written, for `logging::init` (before the command runs).
    pub fn log_format(&self) -> crate::logging::LogFormat {
        match self.log_format {
            LogFormatArg::Text => crate::logging::LogFormat::Text,
            LogFormatArg::Json => crate::logging::LogFormat::Json,
        }
    }

    pub fn into_command(self) -> anyhow::Result<Command> {
        match self.command {
            CommandArgs::Serve(args) => Ok(Command::Serve(args.into_config()?)),
            CommandArgs::FleetSim(args) => {
                if args.flaky > 100 {
                    return Err(UsageError("--flaky is a percentage: 0 to 100".into()).into());
                }
                Ok(Command::FleetSim(FleetSpec {
                    count: args.count,
                    base_dir: args.data_dir,
                    prefix: args.prefix,
                    server: ServerLink {
                        url: args.server,
                        enroll_token: EnrollToken::parse(&args.enroll_token),
                        server_ca: None,
                        labels: args.label,
                        advertise: None,
                        interval: Duration::from_secs(args.heartbeat_secs.max(1)),
                    },
                    events_per_sec: args.events_per_sec.max(1),
                    prefill: args.prefill_events,
                    db_bytes: args.db_mib.map(|m| m << 20),
                    flaky_percent: args.flaky,
                    own_addresses: true,
                }))
            }
            CommandArgs::Endpoints { command, client } => {
                let command = match command {
                    EndpointsCommand::List => ClientCommand::Endpoints {
                        search: String::new(),
                    },
                    EndpointsCommand::Search { text } => ClientCommand::Endpoints { search: text },
                    EndpointsCommand::Show { host } => ClientCommand::EndpointShow { host },
                    EndpointsCommand::Rekey { host, yes } => {
                        confirm(
                            yes,
                            &format!(
                                "Let another agent enroll as {host}? Its current agent will be refused."
                            ),
                            "rekey",
                        )?;
                        ClientCommand::EndpointIdentity {
                            host,
                            forget: false,
                        }
                    }
                    EndpointsCommand::Forget { host, yes } => {
                        confirm(yes, &format!("Forget {host}'s agent?"), "forget")?;
                        ClientCommand::EndpointIdentity { host, forget: true }
                    }
                };
                Ok(Command::Client(client.into_config(), command))
            }
            CommandArgs::EnrollToken { command, client } => Ok(Command::Client(
                client.into_config(),
                match command {
                    EnrollTokenCommand::Rotate => ClientCommand::EnrollTokenRotate,
                },
            )),
            CommandArgs::Capture {
                hosts,
                yes,
                wait,
                timeout,
                client,
            } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Capture {
                    hosts,
                    yes,
                    wait,
                    timeout: timeout.map(Duration::from_secs),
                },
            )),
            CommandArgs::Snapshots { command, client } => Ok(Command::Client(
                client.into_config(),
                match command {
                    SnapshotsCommand::List { endpoint } => {
                        ClientCommand::SnapshotsList { endpoint }
                    }
                    SnapshotsCommand::Show { id } => ClientCommand::SnapshotShow { id },
                    SnapshotsCommand::Delete { ids, endpoint, yes } => {
                        confirm_destructive(
                            yes,
                            &match &endpoint {
                                Some(host) => format!("Delete every snapshot of {host}?"),
                                None => format!("Delete {} snapshot(s)?", ids.len()),
                            },
                        )?;
                        ClientCommand::SnapshotsDelete { ids, endpoint }
                    }
                    SnapshotsCommand::Keep { id } => {
                        ClientCommand::Fleet(crate::client_fleet::FleetCommand::Keep {
                            id,
                            keep: true,
                        })
                    }
                    SnapshotsCommand::Unkeep { id } => {
                        ClientCommand::Fleet(crate::client_fleet::FleetCommand::Keep {
                            id,
                            keep: false,
                        })
                    }
                },
            )),
            CommandArgs::Upload {
                files,
                connect,
                timeout,
                client,
            } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Upload {
                    files,
                    connect,
                    timeout: timeout.map(Duration::from_secs),
                },
            )),
            CommandArgs::Live { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Live(match command {
                    LiveCommandArgs::Connect { targets } => LiveCommand::Connect { targets },
                    LiveCommandArgs::List => LiveCommand::List,
                    LiveCommandArgs::Show { id } => LiveCommand::Show { id },
                    LiveCommandArgs::Reconnect { ids } => LiveCommand::Reconnect { ids },
                    LiveCommandArgs::Close { ids } => LiveCommand::Close { ids },
                    LiveCommandArgs::Open { snapshot_id } => LiveCommand::Open { snapshot_id },
                    LiveCommandArgs::Capture {
                        id,
                        yes,
                        wait,
                        timeout,
                    } => LiveCommand::Capture {
                        id,
                        yes,
                        wait,
                        timeout: timeout.map(Duration::from_secs),
                    },
                }),
            )),
            CommandArgs::Events(args) => {
                let command = match args.command {
                    Some(EventsCommandArgs::Summary { connection }) => {
                        LiveCommand::Summary { connection }
                    }
                    Some(EventsCommandArgs::Tree {
                        connection,
                        process_id,
                    }) => LiveCommand::Tree {
                        connection,
                        process: process_id,
                    },
                    None => LiveCommand::Events {
                        connection: args.connection.ok_or_else(|| {
                            UsageError("--connection ID is required (`snapq live list`)".into())
                        })?,
                        query: EventsQuery {
                            event_type: args.event_type,
                            wheres: args.wheres,
                            any: args.any,
                            since: args.since,
                            until: args.until,
                            sort: args.sort,
                            limit: args.limit,
                            cursor: args.cursor,
                        },
                        all: args.all,
                    },
                };
                Ok(Command::Client(
                    args.client.into_config(),
                    ClientCommand::Live(command),
                ))
            }
            CommandArgs::Queue { command, client } => Ok(Command::Client(
                client.into_config(),
                match command {
                    QueueCommand::Status { watch } => ClientCommand::QueueStatus { watch },
                    QueueCommand::List {
                        state,
                        kind,
                        batch,
                        limit,
                    } => ClientCommand::QueueList {
                        state,
                        kind,
                        batch,
                        limit,
                    },
                    QueueCommand::Show { id } => ClientCommand::QueueShow { id },
                    QueueCommand::Retry { id } => ClientCommand::QueueRetry { id },
                    QueueCommand::Cancel { id } => ClientCommand::QueueCancel { id },
                },
            )),
            CommandArgs::Quarantine { command, client } => Ok(Command::Client(
                client.into_config(),
                match command {
                    QuarantineCommand::List => ClientCommand::QuarantineList,
                    QuarantineCommand::Show { id } => ClientCommand::QuarantineShow { id },
                    QuarantineCommand::Retry { ids, as_name } => {
                        if as_name.is_some() && ids.len() > 1 {
                            return Err(UsageError(
                                "--as renames one file: give one id with it".into(),
                            )
                            .into());
                        }
                        ClientCommand::QuarantineRetry { ids, as_name }
                    }
                    QuarantineCommand::Delete { ids, yes } => {
                        confirm_destructive(
                            yes,
                            &format!("Delete {} quarantined file(s) for good?", ids.len()),
                        )?;
                        ClientCommand::QuarantineDelete { ids }
                    }
                },
            )),
            CommandArgs::Export(args) => {
                let source = match (args.connection, args.snapshot, args.evidence) {
                    (Some(c), _, _) => SourceArg::Connection(c),
                    (_, Some(s), _) => SourceArg::Snapshot(s),
                    _ => SourceArg::Evidence(args.endpoint),
                };
                let f = args.filters;
                Ok(Command::Client(
                    args.client.into_config(),
                    ClientCommand::Export(ExportCommand::Create {
                        source,
                        filters: FilterArgs {
                            types: f.types,
                            wheres: f.wheres,
                            any: f.any,
                            since: f.since,
                            until: f.until,
                            sort: f.sort,
                        },
                        format: args.format,
                        wait: args.wait,
                        timeout: args.timeout.map(Duration::from_secs),
                        out: args.out,
                    }),
                ))
            }
            CommandArgs::Exports { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Export(match command {
                    ExportsCommand::List => ExportCommand::List,
                    ExportsCommand::Show { id } => ExportCommand::Show { id },
                    ExportsCommand::Download { id, out } => ExportCommand::Download { id, out },
                    ExportsCommand::Delete { ids, yes } => {
                        confirm_destructive(yes, &format!("Delete {} export(s)?", ids.len()))?;
                        ExportCommand::Delete { ids }
                    }
                }),
            )),
            CommandArgs::Evidence { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Export(match command {
                    EvidenceCommand::Save {
                        connection,
                        snapshot,
                        note,
                        events,
                    } => ExportCommand::EvidenceSave {
                        source: match (connection, snapshot) {
                            (Some(c), _) => SourceArg::Connection(c),
                            (_, Some(s)) => SourceArg::Snapshot(s),
                            _ => unreachable!("clap requires one source"),
                        },
                        events,
                        note,
                    },
                    EvidenceCommand::List { endpoint } => ExportCommand::EvidenceList { endpoint },
                    EvidenceCommand::Show { id } => ExportCommand::EvidenceShow { id },
                    EvidenceCommand::Delete { ids, yes } => {
                        confirm_destructive(
                            yes,
                            &format!("Delete {} evidence item(s)?", ids.len()),
                        )?;
                        ExportCommand::EvidenceDelete { ids }
                    }
                }),
            )),
            CommandArgs::Users { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Access(match command {
                    UsersCommand::Add { name, role, groups } => {
                        AccessCommand::UsersAdd { name, role, groups }
                    }
                    UsersCommand::List => AccessCommand::UsersList,
                    UsersCommand::Show { name } => AccessCommand::UsersShow { name },
                    UsersCommand::Remove { name, yes } => {
                        confirm(yes, &format!("Remove user {name}?"), "remove the user")?;
                        AccessCommand::UsersRemove { name }
                    }
                    UsersCommand::SetRole { name, role } => {
                        AccessCommand::UsersSetRole { name, role }
                    }
                    UsersCommand::Grant { name, group } => {
                        AccessCommand::UsersGrant { name, group }
                    }
                    UsersCommand::Revoke { name, group } => {
                        AccessCommand::UsersRevoke { name, group }
                    }
                    UsersCommand::Passwd { name } => AccessCommand::UsersPasswd { name },
                }),
            )),
            CommandArgs::Tokens { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Access(match command {
                    TokensCommand::Create {
                        user,
                        name,
                        expires,
                    } => AccessCommand::TokensCreate {
                        user,
                        label: name,
                        expires_in_secs: expires.as_deref().map(parse_duration).transpose()?,
                    },
                    TokensCommand::List { user } => AccessCommand::TokensList { user },
                    TokensCommand::Revoke { id, yes } => {
                        confirm(yes, &format!("Revoke token {id}?"), "revoke the token")?;
                        AccessCommand::TokensRevoke { id }
                    }
                }),
            )),
            CommandArgs::Groups { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Access(match command {
                    GroupsCommand::Add {
                        name,
                        hostname,
                        cidr,
                        label,
                        member,
                    } => {
                        let rules = snapq_core::access::GroupRules {
                            hostnames: hostname,
                            cidrs: cidr,
                            labels: label,
                            members: member,
                        };
                        rules.validate().map_err(|e| UsageError(e.to_string()))?;
                        AccessCommand::GroupsAdd { name, rules }
                    }
                    GroupsCommand::List => AccessCommand::GroupsList,
                    GroupsCommand::Show { name } => AccessCommand::GroupsShow { name },
                    GroupsCommand::Remove { name, yes } => {
                        confirm(yes, &format!("Remove group {name}?"), "remove the group")?;
                        AccessCommand::GroupsRemove { name }
                    }
                }),
            )),
            CommandArgs::Fleet { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Fleet(fleet_command(command)?),
            )),
            CommandArgs::Schedule { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Fleet(schedule_command(command)?),
            )),
            CommandArgs::Audit { command, client } => Ok(Command::Client(
                client.into_config(),
                ClientCommand::Access(match command {
                    AuditCommand::List {
                        since,
                        until,
                        user,
                        action,
                        limit,
                    } => AccessCommand::AuditList {
                        since_ms: since
                            .as_deref()
                            .map(|t| parse_time_or_ago("--since", t))
                            .transpose()?,
                        until_ms: until
                            .as_deref()
                            .map(|t| parse_time_or_ago("--until", t))
                            .transpose()?,
                        user,
                        action,
                        limit,
                    },
                }),
            )),
            CommandArgs::Doctor { client } => {
                Ok(Command::Client(client.into_config(), ClientCommand::Doctor))
            }
            CommandArgs::Completions { shell } => {
                let shell = match shell {
                    ShellArg::Bash => clap_complete::Shell::Bash,
                    ShellArg::Zsh => clap_complete::Shell::Zsh,
                    ShellArg::Fish => clap_complete::Shell::Fish,
                };
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "snapq", &mut out);
                Ok(Command::Print(out))
            }
            CommandArgs::Manpage => {
                let mut out = Vec::new();
                clap_mangen::Man::new(Cli::command())
                    .render(&mut out)
                    .context("rendering the man page")?;
                Ok(Command::Print(out))
            }
            CommandArgs::Agent(args) => match args.command {
                Some(AgentCommandArgs::Export(e)) => Ok(Command::AgentExport {
                    data_dir: e
                        .data_dir
                        .unwrap_or_else(crate::layout::AgentDir::default_root),
                    out: e.out,
                    hostname: e.hostname,
                    json: e.json,
                }),
                None => Ok(Command::Agent(args.into_config()?)),
            },
            CommandArgs::Db {
                command: DbCommand::Migrate { from, to, json },
            } => Ok(Command::DbMigrate {
                from,
                to: crate::server::DatabaseUrl::parse(&to).map_err(UsageError)?,
                json,
            }),
        }
    }
}

impl ServeArgs {
    /// Layers settings: defaults, then the TOML file, then `SNAPQ_*` variables and flags (clap
    /// has already let a flag win over its variable).
    fn into_config(self) -> anyhow::Result<ServeConfig> {
        let file: ServeFile = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading settings file {}", path.display()))?;
                // A usage error (exit 2); toml's message names the key, the line and the column.
                toml::from_str(&text).map_err(|e| {
                    UsageError(format!("settings file {} is invalid: {e}", path.display()))
                })?
            }
            None => ServeFile::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(crate::layout::ServerDir::default_root);
        let mut config = ServeConfig::with_data_dir(data_dir);
        if let Some(listen) = self.listen.or(file.listen) {
            config.listen = listen;
        }
        if let Some(url) = self.database.or(file.database).filter(|u| !u.is_empty()) {
            config.database = Some(crate::server::DatabaseUrl::parse(&url).map_err(UsageError)?);
        }
        if let Some(store) = self.store.or(file.store) {
            config.store_dir = store;
        }
        config.metrics_listen = self.metrics_listen.or(file.metrics_listen);
        config.demo_endpoints = self.demo.or(file.demo).unwrap_or(0);
        if let Some(mib) = self.capture_reserve_mib.or(file.capture_reserve_mib) {
            config.capture_reserve_bytes = mib << 20;
        }
        if let Some(n) = self.capture_concurrency.or(file.capture_concurrency) {
            if n == 0 {
                bail!("capture concurrency must be at least 1");
            }
            config.capture_concurrency = n;
        }
        // 0: no limit (the example settings file spells the default out).
        config.capture_max_bytes_per_sec = self
            .capture_rate_kib
            .or(file.capture_rate_kib)
            .filter(|&k| k > 0)
            .map(|k| k * 1024);
        if let Some(n) = self.job_max_attempts.or(file.job_max_attempts) {
            config.retry.max_attempts = n;
        }
        if let Some(ms) = self.job_retry_base_ms.or(file.job_retry_base_ms) {
            config.retry.base_delay = Duration::from_millis(ms);
        }
        if let Some(days) = self.job_retention_days.or(file.job_retention_days) {
            config.job_retention = Duration::from_secs(days * 24 * 3600);
        }
        if let Some(secs) = self.job_orphan_secs.or(file.job_orphan_secs) {
            if secs < 3 {
                bail!("--job-orphan-secs must be at least 3 (three heartbeats fit in it)");
            }
            config.job_orphan_after = Duration::from_secs(secs);
        }
        config.queue_async_commit =
            self.queue_async_commit || file.queue_async_commit.unwrap_or(false);
        if let Some(secs) = self.online_window_secs.or(file.online_window_secs) {
            config.online_window = Duration::from_secs(secs.max(1));
        }
        if let Some(mib) = self.upload_max_mib.or(file.upload_max_mib) {
            config.upload_max_bytes = mib << 20;
        }
        if let Some(dir) = self.watch.or(file.watch) {
            config.watch_dir = dir;
        }
        if let Some(ms) = self.watch_quiet_ms.or(file.watch_quiet_ms) {
            config.watch_quiet = Duration::from_millis(ms);
        }
        if let Some(secs) = self.watch_settle_secs.or(file.watch_settle_secs) {
            config.watch_settle = Duration::from_secs(secs);
        }
        if let Some(days) = self
            .quarantine_retention_days
            .or(file.quarantine_retention_days)
        {
            if days == 0 {
                bail!("quarantine retention must be at least 1 day");
            }
            config.quarantine_retention = Duration::from_secs(days * 24 * 3600);
        }
        if let Some(days) = self.export_retention_days.or(file.export_retention_days) {
            if !(days.is_finite() && days > 0.0) {
                bail!("--export-retention-days must be above 0");
            }
            config.export_retention = Duration::from_secs_f64(days * 24.0 * 3600.0);
        }
        // 0: no limit (the example settings file spells the default out).
        config.export_max_rows_per_sec = self
            .export_max_rows_per_sec
            .or(file.export_max_rows_per_sec)
            .filter(|&n| n > 0);
        if let Some(n) = self.ingest_concurrency.or(file.ingest_concurrency) {
            config.ingest_concurrency = n.max(1);
        }
        if let Some(minutes) = self
            .connection_idle_minutes
            .or(file.connection_idle_minutes)
        {
            if !(minutes.is_finite() && minutes > 0.0) {
                bail!("--connection-idle-minutes must be above 0");
            }
            config.connection_idle = Duration::from_secs_f64(minutes * 60.0);
        }
        if let Some(ms) = self.query_budget_ms.or(file.query_budget_ms) {
            if ms == 0 {
                bail!("--query-budget-ms must be at least 1");
            }
            config.query_budget = Duration::from_millis(ms);
        }
        Ok(config)
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
                .unwrap_or_else(crate::layout::AgentDir::default_root),
            listen: self.listen,
            hostname: self.hostname.unwrap_or_else(crate::agent::system::hostname),
            token: self.token,
            recorder: match self.simulate {
                Some(events_per_sec) => RecorderKind::Simulate { events_per_sec },
                None => {
                    let mut linux = LinuxConfig::new(Duration::from_millis(self.poll_ms.max(10)));
                    if !self.watch.is_empty() {
                        linux.watch = self.watch;
                    }
                    linux.exclude = self.exclude;
                    linux.kernel_events = !self.no_kernel_events;
                    RecorderKind::Linux(Box::new(linux))
                }
            },
            prefill_events: self.prefill_events,
            limits: Limits {
                max_bytes: self.max_db_mib.map(|m| m * 1024 * 1024),
                max_age: self
                    .max_age_days
                    .map(|d| Duration::from_secs(d * 24 * 3600)),
            },
            staging_ttl: Duration::from_secs(self.staging_ttl_minutes * 60),
            staging_reserve_bytes: self.staging_reserve_mib << 20,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::CertPair { cert, key }),
                _ => None,
            },
            server: match (self.server, self.enroll_token) {
                (Some(url), Some(enroll_token)) => Some(ServerLink {
                    url,
                    enroll_token: EnrollToken::parse(&enroll_token),
                    server_ca: self.server_ca,
                    labels: self.label,
                    advertise: self.advertise,
                    interval: Duration::from_secs(self.heartbeat_secs.max(1)),
                }),
                _ => None,
            },
        })
    }
}

impl BatchArgs {
    fn into_spec(self) -> anyhow::Result<crate::client_fleet::BatchSpec> {
        if self.max_concurrency == Some(0) {
            return Err(UsageError(
                "--max-concurrency must be at least 1 (captures of the batch running at once)"
                    .into(),
            )
            .into());
        }
        if let Some(limit) = &self.failure_limit {
            snapq_core::schedule::FailureLimit::parse(limit)
                .map_err(|e| UsageError(e.to_string()))?;
        }
        Ok(crate::client_fleet::BatchSpec {
            max_concurrency: self.max_concurrency,
            expire_secs: self.expire.as_deref().map(parse_duration).transpose()?,
            failure_limit: self.failure_limit,
        })
    }
}

fn fleet_command(command: FleetCommand) -> anyhow::Result<crate::client_fleet::FleetCommand> {
    use crate::client_fleet::FleetCommand as F;
    Ok(match command {
        FleetCommand::Capture {
            group,
            batch,
            yes,
            wait,
            timeout,
        } => F::Capture {
            group,
            spec: batch.into_spec()?,
            yes,
            wait,
            timeout: timeout.map(Duration::from_secs),
        },
        FleetCommand::List { active, limit } => F::List { active, limit },
        FleetCommand::Show { id } => F::Show { id },
        FleetCommand::Pause { id } => F::Action {
            id,
            action: "pause",
        },
        FleetCommand::Resume { id } => F::Action {
            id,
            action: "resume",
        },
        FleetCommand::Cancel { id, yes } => {
            confirm(yes, &format!("Cancel batch {id}?"), "cancel the batch")?;
            F::Action {
                id,
                action: "cancel",
            }
        }
    })
}

fn schedule_command(command: ScheduleCommand) -> anyhow::Result<crate::client_fleet::FleetCommand> {
    use crate::client_fleet::FleetCommand as F;
    Ok(match command {
        ScheduleCommand::Add {
            name,
            cron,
            tz,
            group,
            batch,
            keep_last,
            keep_days,
        } => {
            // Checked here too, so a typo is a usage error before any request.
            snapq_core::schedule::CronSchedule::parse(&cron, tz.as_deref().unwrap_or("UTC"))
                .map_err(|e| UsageError(e.to_string()))?;
            if keep_last == Some(0) || keep_days == Some(0) {
                return Err(UsageError(
                    "a keep rule of 0 would delete every snapshot; keep at least 1".into(),
                )
                .into());
            }
            F::ScheduleAdd {
                name,
                cron,
                tz,
                group,
                spec: batch.into_spec()?,
                keep_last,
                keep_days,
            }
        }
        ScheduleCommand::List => F::ScheduleList,
        ScheduleCommand::Show { name } => F::ScheduleShow { name },
        ScheduleCommand::Pause { name } => F::ScheduleAction {
            name,
            action: "pause",
        },
        ScheduleCommand::Resume { name } => F::ScheduleAction {
            name,
            action: "resume",
        },
        ScheduleCommand::Run { name } => F::ScheduleAction {
            name,
            action: "run",
        },
        ScheduleCommand::Remove { name, yes } => {
            confirm(
                yes,
                &format!("Remove schedule {name}?"),
                "remove the schedule",
            )?;
            F::ScheduleRemove { name }
        }
    })
}

/// A command line that is wrong as typed (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Destructive commands ask first; without a terminal to ask on they need `--yes`.
fn confirm_destructive(yes: bool, question: &str) -> anyhow::Result<()> {
    confirm(yes, question, "delete")
}

/// Asks `question` unless `--yes`; `verb` names what is refused without an answer.
fn confirm(yes: bool, question: &str, verb: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(UsageError(format!(
            "refusing to {verb} without confirmation: not a terminal; pass --yes"
        ))
        .into());
    }
    if crate::client::confirm(question) {
        Ok(())
    } else {
        Err(UsageError(format!("did not {verb}")).into())
    }
}

/// `90s`, `30m`, `12h`, `30d`, `8w` as seconds.
fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let usage = || {
        UsageError(format!(
            "{text:?} is not a duration; write a number and a unit: 90s, 30m, 12h, 30d or 8w"
        ))
    };
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(usage)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| usage())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(usage().into()),
    };
    match n.checked_mul(unit_secs) {
        Some(secs) if secs > 0 => Ok(secs),
        _ => Err(usage().into()),
    }
}

/// `--since` and `--until`: RFC 3339, epoch milliseconds, or a duration ago, as epoch milliseconds.
fn parse_time_or_ago(flag: &str, text: &str) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    match parse_duration(text) {
        Ok(secs) => Ok(chrono::Utc::now().timestamp_millis() - (secs as i64) * 1000),
        Err(_) => Err(UsageError(format!(
            "{flag} {text:?}: use RFC 3339 (2026-12-01T10:00:00Z), epoch ms, or a duration ago (24h)"
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `packaging/snapq.toml` is what the package installs: it must parse, and it must spell out
    /// every setting the server reads, so it stays the complete reference.
    #[test]
    fn the_example_settings_file_parses_and_names_every_setting() {
        const OFF_UNLESS_SET: &[&str] = &["metrics_listen", "database"];
        let text = include_str!("../packaging/snapq.toml");
        let file: ServeFile = toml::from_str(text).expect("packaging/snapq.toml parses");
        let keys = serde_json::to_value(&file).unwrap();
        let missing: Vec<&String> = keys
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_null())
            .map(|(k, _)| k)
            // Settings that are off unless set appear commented out, with an example value.
            .filter(|k| !OFF_UNLESS_SET.contains(&k.as_str()))
            .collect();
        assert!(missing.is_empty(), "packaging/snapq.toml lacks {missing:?}");
        for key in OFF_UNLESS_SET {
            assert!(
                text.contains(&format!("\n# {key} = ")),
                "packaging/snapq.toml lacks the commented-out {key}"
            );
        }
    }

    #[test]
    fn completions_and_the_man_page_cover_the_commands() {
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["snapq", "completions", shell]).unwrap();
            let Ok(Command::Print(text)) = cli.into_command() else {
                panic!("completions {shell} prints");
            };
            let text = String::from_utf8(text).unwrap();
            for word in ["capture", "snapshots", "quarantine", "doctor"] {
                assert!(text.contains(word), "{shell} completions lack {word}");
            }
        }
        let cli = Cli::try_parse_from(["snapq", "manpage"]).unwrap();
        let Ok(Command::Print(man)) = cli.into_command() else {
            panic!("manpage prints");
        };
        let man = String::from_utf8(man).unwrap();
        assert!(
            man.starts_with(".ie") || man.contains(".TH snapq"),
            "{}",
            &man[..200]
        );
        assert!(
            man.contains("capture"),
            "the man page lists the subcommands"
        );
    }
}

//! CLI commands `fleet`, `schedule` and `snapshots keep|unkeep`: clients of the server's fleet
//! routes (`src/server/fleet.rs`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use snapq_core::disk::human_bytes;

use crate::client::{Client, confirm, enc, time_of};

/// How a batch runs, validated by the CLI.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub max_concurrency: Option<u32>,
    pub expire_secs: Option<u64>,
    pub failure_limit: Option<String>,
}

#[derive(Debug)]
pub enum FleetCommand {
    Capture {
        group: String,
        spec: BatchSpec,
        yes: bool,
        wait: bool,
        timeout: Option<Duration>,
    },
    List {
        active: bool,
        limit: u32,
    },
    Show {
        id: String,
    },
    /// pause, resume or cancel
    Action {
        id: String,
        action: &'static str,
    },
    ScheduleAdd {
        name: String,
        cron: String,
        tz: Option<String>,
        group: String,
        spec: BatchSpec,
        keep_last: Option<u32>,
        keep_days: Option<u32>,
    },
    ScheduleList,
    ScheduleShow {
        name: String,
    },
    /// pause, resume or run
    ScheduleAction {
        name: String,
        action: &'static str,
    },
    ScheduleRemove {
        name: String,
    },
    Keep {
        id: String,
        keep: bool,
    },
}

pub async fn run(c: &Client, command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Capture {
            group,
            spec,
            yes,
            wait,
            timeout,
        } => capture(c, &group, &spec, yes, wait, timeout).await,
        FleetCommand::List { active, limit } => list(c, active, limit).await,
        FleetCommand::Show { id } => show(c, &id).await,
        FleetCommand::Action { id, action } => {
            let r: Value = c
                .post(
                    &format!("/v1/fleet/batches/{}/{action}", enc(&id)),
                    &Value::Null,
                )
                .await?;
            c.print(&r, |_| println!("batch {id}: {action} done"));
            Ok(())
        }
        FleetCommand::ScheduleAdd {
            name,
            cron,
            tz,
            group,
            spec,
            keep_last,
            keep_days,
        } => {
            let body = json!({
                "name": name, "cron": cron, "tz": tz, "group": group,
                "max_concurrency": spec.max_concurrency, "expire_secs": spec.expire_secs,
                "failure_limit": spec.failure_limit, "keep_last": keep_last, "keep_days": keep_days,
            });
            let s: Value = c.post("/v1/schedules", &body).await?;
            c.print(&s, |s| {
                println!(
                    "schedule {} added: {} ({}), group {}; next run {} ({})",
                    s["name"].as_str().unwrap_or(""),
                    s["cron"].as_str().unwrap_or(""),
                    s["tz"].as_str().unwrap_or(""),
                    s["group_name"].as_str().unwrap_or(""),
                    s["next_run_local"].as_str().unwrap_or("-"),
                    s["next_run_utc"].as_str().unwrap_or("-"),
                )
            });
            Ok(())
        }
        FleetCommand::ScheduleList => {
            let list: Value = c.get("/v1/schedules").await?;
            c.print(&list, |list| {
                println!(
                    "{:<20} {:<16} {:<16} {:<12} {:<26} {:<20} last batch",
                    "name", "cron", "zone", "group", "next run (zone)", "next run (UTC)"
                );
                for s in list.as_array().into_iter().flatten() {
                    let last = &s["last_batch"];
                    let last = if last.is_null() {
                        "-".to_owned()
                    } else {
                        format!("{} {}", last["id"], last["state"].as_str().unwrap_or(""))
                    };
                    println!(
                        "{:<20} {:<16} {:<16} {:<12} {:<26} {:<20} {}{}",
                        s["name"].as_str().unwrap_or(""),
                        s["cron"].as_str().unwrap_or(""),
                        s["tz"].as_str().unwrap_or(""),
                        s["group_name"].as_str().unwrap_or(""),
                        s["next_run_local"].as_str().unwrap_or("-"),
                        s["next_run_utc"].as_str().unwrap_or("-"),
                        last,
                        if s["paused"] == true {
                            "  (paused)"
                        } else {
                            ""
                        }
                    );
                }
            });
            Ok(())
        }
        FleetCommand::ScheduleShow { name } => {
            let s: Value = c.get(&format!("/v1/schedules/{}", enc(&name))).await?;
            c.print(&s, |s| {
                let sc = &s["schedule"];
                println!(
                    "{}: {} ({}) group {}, concurrency {}, expire {}s, failure limit {}, keep {}{}",
                    sc["name"].as_str().unwrap_or(""),
                    sc["cron"].as_str().unwrap_or(""),
                    sc["tz"].as_str().unwrap_or(""),
                    sc["group_name"].as_str().unwrap_or(""),
                    sc["max_concurrency"],
                    sc["expire_secs"],
                    sc["failure_limit"].as_str().unwrap_or("none"),
                    match (sc["keep_last"].as_i64(), sc["keep_days"].as_i64()) {
                        (Some(k), _) => format!("last {k}"),
                        (_, Some(d)) => format!("{d} day(s)"),
                        _ => "all".into(),
                    },
                    if sc["paused"] == true { ", paused" } else { "" }
                );
                println!(
                    "next run {} ({})",
                    sc["next_run_local"].as_str().unwrap_or("-"),
                    sc["next_run_utc"].as_str().unwrap_or("-")
                );
                for b in s["batches"].as_array().into_iter().flatten() {
                    println!(
                        "  batch {:<6} tick {}  {:<24} {}",
                        b["id"],
                        time_of(&b["tick_ms"]),
                        b["state"].as_str().unwrap_or(""),
                        b["reason"].as_str().unwrap_or("")
                    );
                }
            });
            Ok(())
        }
        FleetCommand::ScheduleAction { name, action } => {
            let r: Value = c
                .post(
                    &format!("/v1/schedules/{}/{action}", enc(&name)),
                    &Value::Null,
                )
                .await?;
            c.print(&r, |r| match action {
                "run" => println!(
                    "schedule {name}: batch {} {}{}",
                    r["id"],
                    r["state"].as_str().unwrap_or(""),
                    r["reason"]
                        .as_str()
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                ),
                _ => println!("schedule {name}: {action} done"),
            });
            Ok(())
        }
        FleetCommand::ScheduleRemove { name } => {
            let r: Value = c.delete(&format!("/v1/schedules/{}", enc(&name))).await?;
            c.print(&r, |_| println!("schedule {name} removed"));
            Ok(())
        }
        FleetCommand::Keep { id, keep } => {
            let action = if keep { "keep" } else { "unkeep" };
            let r: Value = c
                .post(
                    &format!("/v1/snapshots/{}/{action}", enc(&id)),
                    &Value::Null,
                )
                .await?;
            c.print(&r, |_| {
                if keep {
                    println!("snapshot {id} is kept: schedules never prune it");
                } else {
                    println!("snapshot {id} may be pruned by a schedule's keep rule again");
                }
            });
            Ok(())
        }
    }
}

async fn capture(
    c: &Client,
    group: &str,
    spec: &BatchSpec,
    yes: bool,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    if !yes
        && std::io::stdin().is_terminal()
        && !confirm(&format!("Capture every endpoint of group {group}?"))
    {
        bail!("nothing captured");
    }
    let body = json!({
        "group": group, "max_concurrency": spec.max_concurrency,
        "expire_secs": spec.expire_secs, "failure_limit": spec.failure_limit,
    });
    let started: Value = c.post("/v1/fleet/batches", &body).await?;
    let id = started["batch_id"].as_i64().unwrap_or_default();
    if !wait {
        c.print(&started, |s| {
            println!(
                "batch {} started for group {} (job {}); `snapq fleet show {}` shows its progress",
                id,
                s["group"].as_str().unwrap_or(""),
                s["job_id"].as_str().unwrap_or(""),
                id
            )
        });
        return Ok(());
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let progress = std::io::stderr().is_terminal() && !c.json;
    loop {
        let b: Value = c.get(&format!("/v1/fleet/batches/{id}")).await?;
        let state = b["state"].as_str().unwrap_or("").to_owned();
        if progress {
            eprint!("\r{}", totals_line(&b));
        }
        if !matches!(state.as_str(), "running" | "paused") {
            if progress {
                eprintln!();
            }
            c.print(&b, print_batch);
            if state == "complete" {
                return Ok(());
            }
            bail!(
                "batch {id} ended {state}: {}",
                b["reason"].as_str().unwrap_or("")
            );
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            bail!("stopped waiting for batch {id} (it goes on; `snapq fleet show {id}`)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn totals_line(b: &Value) -> String {
    let t = &b["totals"];
    format!(
        "{:<22} total {}  queued {}  running {}  done {}  failed {}  skipped {}  {}",
        b["state"].as_str().unwrap_or(""),
        t["total"],
        t["queued"],
        t["running"],
        t["done"],
        t["failed"],
        t["skipped"],
        human_bytes(t["bytes"].as_u64().unwrap_or(0))
    )
}

async fn list(c: &Client, active: bool, limit: u32) -> anyhow::Result<()> {
    let list: Value = c
        .get(&format!("/v1/fleet/batches?active={active}&limit={limit}"))
        .await?;
    c.print(&list, |list| {
        for b in list.as_array().into_iter().flatten() {
            println!(
                "{:<6} {:<14} {:<16} {}  {}",
                b["id"],
                b["group_name"].as_str().unwrap_or(""),
                b["schedule_name"].as_str().unwrap_or("manual"),
                totals_line(b),
                b["reason"].as_str().unwrap_or("")
            );
        }
        if list.as_array().is_none_or(|l| l.is_empty()) {
            eprintln!("no batches");
        }
    });
    Ok(())
}

fn print_batch(b: &Value) {
    println!(
        "batch {} of group {} ({}), requested by {}, started {}",
        b["id"],
        b["group_name"].as_str().unwrap_or(""),
        b["schedule_name"].as_str().unwrap_or("manual"),
        b["requested_by"].as_str().unwrap_or(""),
        time_of(&b["created_ms"])
    );
    println!("{}", totals_line(b));
    if let Some(reason) = b["reason"].as_str() {
        println!("reason: {reason}");
    }
    for i in b["items"].as_array().into_iter().flatten() {
        println!(
            "  {:<30} {:<8} {:>10}  {}",
            i["hostname"].as_str().unwrap_or(""),
            i["state"].as_str().unwrap_or(""),
            i["bytes"]
                .as_u64()
                .map(human_bytes)
                .unwrap_or_else(|| "-".into()),
            i["error"].as_str().unwrap_or("")
        );
    }
}

async fn show(c: &Client, id: &str) -> anyhow::Result<()> {
    let b: Value = c.get(&format!("/v1/fleet/batches/{}", enc(id))).await?;
    c.print(&b, print_batch);
    Ok(())
}

/// `queue status`: running and paused batches with their progress.
pub fn print_active_batches(batches: &Value) {
    let list = batches.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return;
    }
    println!("\nbatches:");
    for b in list {
        println!(
            "  {:<6} {:<14} {}",
            b["id"],
            b["group_name"].as_str().unwrap_or(""),
            totals_line(&b)
        );
    }
}

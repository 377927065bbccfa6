//! The CLI's `export`, `exports` and `evidence` commands: clients of `/v1/exports` and
//! `/v1/evidence` (`src/server/export/`), printing tables or `--json`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::client::{Client, enc, time_of};

/// Where an export's or a saved event's rows come from, as the user named it.
#[derive(Debug, Clone)]
pub enum SourceArg {
    Connection(String),
    Snapshot(i64),
    Endpoint(String),
    /// Saved evidence, optionally of one endpoint.
    Evidence(Option<String>),
}

/// The events filters, as typed (the server validates them).
#[derive(Debug, Clone, Default)]
pub struct FilterArgs {
    pub types: Vec<String>,
    pub wheres: Vec<String>,
    pub any: bool,
    pub since: Option<String>,
    pub until: Option<String>,
    pub sort: Option<String>,
}

#[derive(Debug)]
pub enum ExportCommand {
    Create {
        source: SourceArg,
        filters: FilterArgs,
        format: String,
        wait: bool,
        timeout: Option<Duration>,
        out: Option<PathBuf>,
    },
    List,
    Show {
        id: i64,
    },
    Download {
        id: i64,
        out: Option<PathBuf>,
    },
    Delete {
        ids: Vec<i64>,
    },
    EvidenceSave {
        source: SourceArg,
        events: Vec<String>,
        note: Option<String>,
    },
    EvidenceList {
        endpoint: Option<String>,
    },
    EvidenceShow {
        id: i64,
    },
    EvidenceDelete {
        ids: Vec<i64>,
    },
}

pub async fn run(client: &Client, command: ExportCommand) -> anyhow::Result<()> {
    match command {
        ExportCommand::Create {
            source,
            filters,
            format,
            wait,
            timeout,
            out,
        } => create(client, &source, &filters, &format, wait, timeout, out).await,
        ExportCommand::List => list(client).await,
        ExportCommand::Show { id } => {
            let export: Value = client.get(&format!("/v1/exports/{id}")).await?;
            client.print(&export, print_export);
            Ok(())
        }
        ExportCommand::Download { id, out } => {
            let export: Value = client.get(&format!("/v1/exports/{id}")).await?;
            download(client, &export, out.as_deref()).await
        }
        ExportCommand::Delete { ids } => {
            for id in ids {
                let _: Value = client.delete(&format!("/v1/exports/{id}")).await?;
                if !client.json {
                    println!("export {id} deleted");
                }
            }
            Ok(())
        }
        ExportCommand::EvidenceSave {
            source,
            events,
            note,
        } => evidence_save(client, &source, &events, note).await,
        ExportCommand::EvidenceList { endpoint } => {
            evidence_list(client, endpoint.as_deref()).await
        }
        ExportCommand::EvidenceShow { id } => {
            let e: Value = client.get(&format!("/v1/evidence/{id}")).await?;
            client.print(&e, |e| {
                println!(
                    "evidence {}: {} {}:{} saved by {} at {}",
                    e["id"],
                    e["hostname"].as_str().unwrap_or(""),
                    e["event_type"].as_str().unwrap_or(""),
                    e["event_id"],
                    e["saved_by"].as_str().unwrap_or(""),
                    time_of(&e["saved_ms"])
                );
                println!(
                    "source: {} {}",
                    e["source_kind"].as_str().unwrap_or(""),
                    e["source_id"].as_str().unwrap_or("")
                );
                if let Some(note) = e["note"].as_str() {
                    println!("note: {note}");
                }
                if let Some(event) = e["event"].as_object() {
                    for (k, v) in event {
                        println!("  {k:<12} {}", cell(v));
                    }
                }
            });
            Ok(())
        }
        ExportCommand::EvidenceDelete { ids } => {
            for id in ids {
                let _: Value = client.delete(&format!("/v1/evidence/{id}")).await?;
                if !client.json {
                    println!("evidence {id} deleted");
                }
            }
            Ok(())
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn source_body(source: &SourceArg) -> Value {
    match source {
        SourceArg::Connection(id) => json!({ "connection": id }),
        SourceArg::Snapshot(id) => json!({ "snapshot": id }),
        SourceArg::Endpoint(host) => json!({ "endpoint": host }),
        SourceArg::Evidence(host) => json!({ "evidence": true, "endpoint": host }),
    }
}

#[allow(clippy::too_many_arguments)]
async fn create(
    client: &Client,
    source: &SourceArg,
    filters: &FilterArgs,
    format: &str,
    wait: bool,
    timeout: Option<Duration>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut body = source_body(source);
    body["format"] = json!(format);
    body["types"] = json!(filters.types);
    body["where"] = json!(filters.wheres);
    body["any"] = json!(filters.any);
    for (k, v) in [
        ("since", &filters.since),
        ("until", &filters.until),
        ("sort", &filters.sort),
    ] {
        if let Some(v) = v {
            body[k] = json!(v);
        }
    }
    let export: Value = client.post("/v1/exports", &body).await?;
    let id = export["id"]
        .as_i64()
        .context("the server answered no export id")?;
    if !wait && out.is_none() {
        client.print(&export, |e| {
            println!(
                "export {id} queued (job {}); `snapq exports list` shows it, `snapq exports download {id}` fetches it",
                e["job_id"].as_str().unwrap_or("-")
            )
        });
        return Ok(());
    }
    let done = wait_export(client, id, timeout).await?;
    if done["state"] != "complete" {
        bail!(
            "export {id} {}: {}; `snapq queue retry {}` runs it again",
            done["state"].as_str().unwrap_or("ended"),
            done["error"].as_str().unwrap_or("no reason given"),
            done["job_id"].as_str().unwrap_or("JOB")
        );
    }
    match out {
        Some(path) => download(client, &done, Some(&path)).await,
        None => {
            client.print(&done, print_export);
            Ok(())
        }
    }
}

/// Polls the export until it ends, showing rows on a terminal.
async fn wait_export(client: &Client, id: i64, timeout: Option<Duration>) -> anyhow::Result<Value> {
    let started = Instant::now();
    let show = std::io::stderr().is_terminal();
    loop {
        let export: Value = client.get(&format!("/v1/exports/{id}")).await?;
        let state = export["state"].as_str().unwrap_or("");
        if show {
            eprint!("\rexport {id}: {state} {} rows   ", export["rows"]);
            let _ = std::io::stderr().flush();
        }
        if matches!(state, "complete" | "failed" | "cancelled") {
            if show {
                eprintln!();
            }
            return Ok(export);
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            bail!(
                "export {id} is still {state} after the timeout; it goes on (`snapq exports show {id}`)"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_export(e: &Value) {
    println!(
        "export {}: {} {} rows {} bytes {} ({})",
        e["id"],
        e["state"].as_str().unwrap_or(""),
        e["rows"],
        e["bytes"],
        e["file_name"].as_str().unwrap_or("-"),
        e["format"].as_str().unwrap_or("")
    );
    if let Some(err) = e["error"].as_str() {
        println!("error: {err}");
    }
}

async fn list(client: &Client) -> anyhow::Result<()> {
    let all: Value = client.get("/v1/exports").await?;
    client.print(&all, |all| {
        println!(
            "{:<6} {:<10} {:<6} {:>10} {:>12} {:<20} {:<12} CREATED",
            "ID", "STATE", "FORMAT", "ROWS", "BYTES", "ENDPOINT", "BY"
        );
        for e in all.as_array().into_iter().flatten() {
            println!(
                "{:<6} {:<10} {:<6} {:>10} {:>12} {:<20} {:<12} {}",
                e["id"],
                e["state"].as_str().unwrap_or(""),
                e["format"].as_str().unwrap_or(""),
                e["rows"],
                cell(&e["bytes"]),
                e["hostname"].as_str().unwrap_or("(several)"),
                e["requested_by"].as_str().unwrap_or(""),
                time_of(&e["created_ms"])
            );
        }
    });
    Ok(())
}

/// Downloads a complete export to `out` (default: its file name here), through a temporary
/// name beside it so an interrupted download never looks complete.
async fn download(client: &Client, export: &Value, out: Option<&Path>) -> anyhow::Result<()> {
    let id = export["id"].as_i64().unwrap_or(0);
    let name = export["file_name"]
        .as_str()
        .with_context(|| format!("export {id} has no file yet; wait until it is complete"))?;
    let out = out
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(name));
    let tmp = out.with_file_name(format!(
        ".{}.download",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("export")
    ));
    let mut response = client
        .get_response(&format!("/v1/exports/{id}/file"))
        .await?;
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut bytes = 0u64;
    while let Some(chunk) = response.chunk().await? {
        file.write_all(&chunk)?;
        bytes += chunk.len() as u64;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
    let result = json!({ "id": id, "path": out, "bytes": bytes, "rows": export["rows"] });
    client.print(&result, |_| {
        println!(
            "export {id}: {} rows, {bytes} bytes written to {}",
            export["rows"],
            out.display()
        )
    });
    Ok(())
}

async fn evidence_save(
    client: &Client,
    source: &SourceArg,
    events: &[String],
    note: Option<String>,
) -> anyhow::Result<()> {
    let mut body = source_body(source);
    body["events"] = json!(events);
    body["note"] = json!(note);
    let saved: Value = client.post("/v1/evidence", &body).await?;
    client.print(&saved, |saved| {
        for e in saved.as_array().into_iter().flatten() {
            println!(
                "saved {}:{} of {} as evidence {}",
                e["event_type"].as_str().unwrap_or(""),
                e["event_id"],
                e["hostname"].as_str().unwrap_or(""),
                e["id"]
            );
        }
    });
    Ok(())
}

async fn evidence_list(client: &Client, endpoint: Option<&str>) -> anyhow::Result<()> {
    let path = match endpoint {
        Some(h) => format!("/v1/evidence?endpoint={}", enc(h)),
        None => "/v1/evidence".into(),
    };
    let all: Value = client.get(&path).await?;
    client.print(&all, |all| {
        println!(
            "{:<6} {:<20} {:<16} {:<20} {:<12} {:<20} NOTE",
            "ID", "ENDPOINT", "EVENT", "SOURCE", "BY", "SAVED"
        );
        for e in all.as_array().into_iter().flatten() {
            println!(
                "{:<6} {:<20} {:<16} {:<20} {:<12} {:<20} {}",
                e["id"],
                e["hostname"].as_str().unwrap_or(""),
                format!(
                    "{}:{}",
                    e["event_type"].as_str().unwrap_or(""),
                    e["event_id"]
                ),
                format!(
                    "{} {}",
                    e["source_kind"].as_str().unwrap_or(""),
                    e["source_id"].as_str().unwrap_or("")
                ),
                e["saved_by"].as_str().unwrap_or(""),
                time_of(&e["saved_ms"]),
                e["note"].as_str().unwrap_or("")
            );
        }
    });
    Ok(())
}

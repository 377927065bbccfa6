//! The CLI's `live` and `events` commands: clients of the server's connection routes
//! (`src/server/connections.rs`), printing fitted tables, process trees or `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use snapq_core::disk::human_bytes;

use crate::client::{Client, enc, time_of};

/// A `live` or `events` command, validated.
#[derive(Debug)]
pub enum LiveCommand {
    Connect {
        targets: Vec<String>,
    },
    List,
    Show {
        id: i64,
    },
    Reconnect {
        ids: Vec<i64>,
    },
    Close {
        ids: Vec<i64>,
    },
    Open {
        snapshot_id: i64,
    },
    Capture {
        id: i64,
        yes: bool,
        wait: bool,
        timeout: Option<Duration>,
    },
    Events {
        connection: i64,
        query: EventsQuery,
        all: bool,
    },
    Summary {
        connection: i64,
    },
    Tree {
        connection: i64,
        process: i64,
    },
}

/// The filters of `snapq events`, as typed (the server validates them).
#[derive(Debug, Default, Clone)]
pub struct EventsQuery {
    pub event_type: Option<String>,
    pub wheres: Vec<String>,
    pub any: bool,
    pub since: Option<String>,
    pub until: Option<String>,
    pub sort: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl EventsQuery {
    fn query_string(&self, cursor: Option<&str>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("type", &self.event_type),
            ("since", &self.since),
            ("until", &self.until),
            ("sort", &self.sort),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if let Some(l) = self.limit {
            q.append_pair("limit", &l.to_string());
        }
        for w in &self.wheres {
            q.append_pair("where", w);
        }
        if self.any {
            q.append_pair("any", "true");
        }
        if let Some(c) = cursor {
            q.append_pair("cursor", c);
        }
        q.finish()
    }
}

pub async fn run(client: &Client, command: LiveCommand) -> anyhow::Result<()> {
    match command {
        LiveCommand::Connect { targets } => {
            let made: Value = client
                .post("/v1/connections", &json!({ "targets": targets }))
                .await?;
            client.print(&made, print_connections);
            let failed = made
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["status"] != "active")
                .count();
            if failed > 0 {
                bail!("{failed} connection(s) failed; `snapq live reconnect ID` tries again");
            }
            Ok(())
        }
        LiveCommand::List => {
            let list: Value = client.get("/v1/connections").await?;
            client.print(&list, |l| {
                if l.as_array().is_none_or(Vec::is_empty) {
                    println!("no connections; `snapq live connect HOST` makes one");
                } else {
                    print_connections(l);
                }
            });
            Ok(())
        }
        LiveCommand::Show { id } => {
            let c: Value = client.get(&format!("/v1/connections/{id}")).await?;
            client.print(&c, print_connection);
            Ok(())
        }
        LiveCommand::Reconnect { ids } => {
            let mut out = Vec::new();
            for id in ids {
                out.push(
                    client
                        .post::<Value>(&format!("/v1/connections/{id}/reconnect"), &Value::Null)
                        .await?,
                );
            }
            let out = Value::Array(out);
            client.print(&out, print_connections);
            let failed = out
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["status"] != "active")
                .count();
            if failed > 0 {
                bail!("{failed} connection(s) did not reconnect");
            }
            Ok(())
        }
        LiveCommand::Close { ids } => {
            let mut out = Vec::new();
            for id in ids {
                out.push(
                    client
                        .delete::<Value>(&format!("/v1/connections/{id}"))
                        .await?,
                );
            }
            client.print(&Value::Array(out.clone()), |_| {
                for c in &out {
                    println!("connection {} to {} closed", c["id"], target_text(c));
                }
            });
            Ok(())
        }
        LiveCommand::Open { snapshot_id } => {
            let c: Value = client
                .post(
                    &format!("/v1/snapshots/{snapshot_id}/connect"),
                    &Value::Null,
                )
                .await?;
            client.print(&c, print_connection);
            if c["status"] != "active" {
                bail!(
                    "snapshot {snapshot_id} could not be opened: {}",
                    c["reason"].as_str().unwrap_or("unknown reason")
                );
            }
            Ok(())
        }
        LiveCommand::Capture {
            id,
            yes,
            wait,
            timeout,
        } => capture(client, id, yes, wait, timeout).await,
        LiveCommand::Events {
            connection,
            query,
            all,
        } => events(client, connection, &query, all).await,
        LiveCommand::Summary { connection } => {
            let s: Value = client
                .get(&format!("/v1/connections/{connection}/summary"))
                .await?;
            client.print(&s, |s| {
                let mut rows = Vec::new();
                if let Some(counts) = s["counts"].as_object() {
                    for (t, n) in counts {
                        rows.push(vec![t.clone(), n.to_string()]);
                    }
                }
                rows.push(vec!["total".into(), s["total"].to_string()]);
                print_table(&["TYPE", "EVENTS"], &rows, &[false, true]);
                println!(
                    "from {} to {} (UTC)",
                    time_of(&s["oldest_ts"]),
                    time_of(&s["newest_ts"])
                );
            });
            Ok(())
        }
        LiveCommand::Tree {
            connection,
            process,
        } => {
            let t: Value = client
                .get(&format!(
                    "/v1/connections/{connection}/tree?process={process}"
                ))
                .await?;
            client.print(&t, print_tree);
            Ok(())
        }
    }
}

fn target_text(c: &Value) -> String {
    match c["target"]["kind"].as_str() {
        Some("snapshot") => format!("snapshot {}", c["target"]["id"]),
        _ => c["endpoint"].as_str().unwrap_or("").to_owned(),
    }
}

fn print_connections(list: &Value) {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                c["id"].to_string(),
                c["endpoint"].as_str().unwrap_or("").to_owned(),
                target_text(c),
                c["status"].as_str().unwrap_or("").to_owned(),
                time_of(&c["since_ms"]),
                time_of(&c["last_activity_ms"]),
                c["db_bytes"]
                    .as_u64()
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
                c["events"]
                    .as_u64()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                format!(
                    "{} .. {}",
                    time_of(&c["oldest_ts"]),
                    time_of(&c["newest_ts"])
                ),
                c["reason"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "ENDPOINT",
            "TARGET",
            "STATUS",
            "SINCE",
            "LAST ACTIVITY",
            "DB SIZE",
            "EVENTS",
            "EVENT TIME RANGE",
            "REASON",
        ],
        &rows,
        &[
            true, false, false, false, false, false, true, true, false, false,
        ],
    );
}

fn print_connection(c: &Value) {
    let line = |k: &str, v: String| println!("{k:<15} {v}");
    line("connection", c["id"].to_string());
    line("endpoint", c["endpoint"].as_str().unwrap_or("").into());
    line("target", target_text(c));
    line("address", c["address"].as_str().unwrap_or("-").into());
    line("status", c["status"].as_str().unwrap_or("").into());
    if let Some(r) = c["reason"].as_str() {
        line("reason", r.into());
    }
    line("since", time_of(&c["since_ms"]));
    line("last activity", time_of(&c["last_activity_ms"]));
    if c["idle_until_ms"].is_i64() {
        line("times out at", time_of(&c["idle_until_ms"]));
    }
    line(
        "database size",
        c["db_bytes"]
            .as_u64()
            .map(human_bytes)
            .unwrap_or_else(|| "-".into()),
    );
    line("events", c["events"].to_string());
    line(
        "event times",
        format!(
            "{} .. {} (UTC)",
            time_of(&c["oldest_ts"]),
            time_of(&c["newest_ts"])
        ),
    );
}

async fn capture(
    client: &Client,
    id: i64,
    yes: bool,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let c: Value = client.get(&format!("/v1/connections/{id}")).await?;
    if !yes && std::io::stdin().is_terminal() {
        let host = c["endpoint"].as_str().unwrap_or("");
        let info: Value = client.get(&format!("/v1/endpoints/{}", enc(host))).await?;
        let bytes = |v: &Value| v.as_u64().map(human_bytes).unwrap_or_else(|| "-".into());
        eprintln!(
            "{host}: database {}, server free {} (reserve {})",
            bytes(&info["live"]["db_bytes"]),
            bytes(&info["server_free_bytes"]),
            bytes(&info["capture_reserve_bytes"])
        );
        if !crate::client::confirm(&format!("Capture a snapshot of {host}?")) {
            bail!("nothing captured");
        }
    }
    let queued: Value = client
        .post(&format!("/v1/connections/{id}/capture"), &Value::Null)
        .await?;
    if crate::client::report_captures(client, Value::Array(vec![queued]), wait, timeout).await? {
        Ok(())
    } else {
        bail!("the capture did not complete")
    }
}

/// The columns of an event type in the recorder schema's order.
fn columns(event_type: &str) -> Vec<&'static str> {
    snapq_core::schema::event_table(event_type)
        .map(|t| t.all_columns().map(|(c, _)| c).collect())
        .unwrap_or_default()
}

async fn events(
    client: &Client,
    connection: i64,
    query: &EventsQuery,
    all: bool,
) -> anyhow::Result<()> {
    let event_type = query.event_type.clone().unwrap_or_else(|| "process".into());
    let cols = columns(&event_type);
    let mut cursor = query.cursor.clone();
    let mut printed = 0usize;
    loop {
        let page: Value = client
            .get(&format!(
                "/v1/connections/{connection}/events?{}",
                query.query_string(cursor.as_deref())
            ))
            .await?;
        let next = page["next_cursor"].as_str().map(str::to_owned);
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if client.json {
            if all {
                for e in &events {
                    println!("{e}");
                }
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&page).expect("JSON prints")
                );
            }
        } else {
            print_events(&cols, &events, printed == 0);
        }
        printed += events.len();
        match next {
            Some(c) if all => cursor = Some(c),
            Some(c) => {
                if !client.json {
                    eprintln!(
                        "{printed} events shown; more with --cursor {c} (or --all for every page)"
                    );
                }
                break;
            }
            None => {
                if !client.json {
                    eprintln!("{printed} events");
                }
                break;
            }
        }
    }
    Ok(())
}

fn cell(column: &str, v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(_) if column == "ts" || column.ends_with("_ts") => v
            .as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
            .unwrap_or_else(|| v.to_string()),
        other => other.to_string(),
    }
}

fn print_events(cols: &[&str], events: &[Value], header: bool) {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| cols.iter().map(|c| cell(c, &e[*c])).collect())
        .collect();
    let heads: Vec<String> = cols.iter().map(|c| c.to_uppercase()).collect();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
    let numeric: Vec<bool> = events
        .first()
        .map(|e| {
            cols.iter()
                .map(|c| e[*c].is_number() && *c != "ts" && !c.ends_with("_ts"))
                .collect()
        })
        .unwrap_or_else(|| vec![false; cols.len()]);
    if header || !rows.is_empty() {
        print_table(&heads, &rows, &numeric);
    }
}

/// The terminal's width in columns (`COLUMNS`, then the terminal itself), if stdout is one.
fn terminal_width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(n);
    }
    if !std::io::stdout().is_terminal() {
        return None;
    }
    // SAFETY: TIOCGWINSZ fills a winsize struct we own; no other memory is touched.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return Some(ws.ws_col as usize);
        }
    }
    None
}

/// The widest a column gets before its values are cut, whatever the terminal.
const MAX_COLUMN: usize = 60;
/// The narrowest a column is squeezed to fit the terminal.
const MIN_COLUMN: usize = 6;

/// Column widths: each column's widest value (at most [`MAX_COLUMN`]), then the widest columns
/// narrowed until the line fits `width`.
pub fn fit_widths(natural: &[usize], width: Option<usize>) -> Vec<usize> {
    let mut widths: Vec<usize> = natural.iter().map(|w| (*w).min(MAX_COLUMN)).collect();
    let Some(width) = width else {
        return widths;
    };
    let gaps = 2 * widths.len().saturating_sub(1);
    while widths.iter().sum::<usize>() + gaps > width {
        let (i, w) = widths
            .iter()
            .enumerate()
            .max_by_key(|(_, w)| **w)
            .map(|(i, w)| (i, *w))
            .unwrap_or((0, 0));
        if w <= MIN_COLUMN {
            break;
        }
        widths[i] -= 1;
    }
    widths
}

/// `value` in exactly `width` characters: cut with an ellipsis, or padded. Control characters
/// (newlines, tabs) are shown as spaces so one event stays one line.
pub fn fit(value: &str, width: usize, right: bool) -> String {
    let clean: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let len = clean.chars().count();
    let text = if len > width {
        let mut cut: String = clean.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        clean
    };
    let pad = width.saturating_sub(text.chars().count());
    if right {
        format!("{}{text}", " ".repeat(pad))
    } else {
        format!("{text}{}", " ".repeat(pad))
    }
}

/// Prints a table with fitted column widths; `right` aligns numeric columns.
pub fn print_table(headers: &[&str], rows: &[Vec<String>], right: &[bool]) {
    let natural: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |v| v.chars().count()))
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let widths = fit_widths(&natural, terminal_width());
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, v)| fit(v, widths[i], right.get(i).copied().unwrap_or(false)))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn process_line(p: &Value) -> String {
    let cmd = p["cmdline"]
        .as_str()
        .filter(|c| !c.is_empty())
        .or(p["path"].as_str())
        .unwrap_or("?");
    let cmd = fit(cmd, 80, false);
    format!(
        "{}  [id {}, pid {}, user {}, {}]",
        cmd.trim_end(),
        p["id"],
        p["pid"],
        p["user"].as_str().unwrap_or("-"),
        cell("ts", &p["ts"])
    )
}

/// The parent chain down to the process, then its children, drawn as a tree.
fn print_tree(t: &Value) {
    let ancestors = t["ancestors"].as_array().cloned().unwrap_or_default();
    if t["ancestors_truncated"] == true {
        println!("… (older ancestors not shown)");
    }
    let mut depth = 0;
    for a in &ancestors {
        let prefix = if depth == 0 {
            String::new()
        } else {
            format!("{}└─ ", "   ".repeat(depth - 1))
        };
        println!("{prefix}{}", process_line(a));
        depth += 1;
    }
    let prefix = if depth == 0 {
        String::new()
    } else {
        format!("{}└─ ", "   ".repeat(depth - 1))
    };
    println!("{prefix}{}   ◀ this process", process_line(&t["process"]));
    let children = t["children"].as_array().cloned().unwrap_or_default();
    for (i, c) in children.iter().enumerate() {
        let branch = if i + 1 == children.len() && t["children_truncated"] != true {
            "└─ "
        } else {
            "├─ "
        };
        println!("{}{branch}{}", "   ".repeat(depth), process_line(c));
    }
    if t["children_truncated"] == true {
        println!("{}└─ … (more children not shown)", "   ".repeat(depth));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_with_an_ellipsis_and_columns_fit_the_terminal() {
        assert_eq!(fit("abcdef", 4, false), "abc…");
        assert_eq!(fit("ab", 4, false), "ab  ");
        assert_eq!(fit("7", 3, true), "  7");
        assert_eq!(fit("a\nb\tc", 5, false), "a b c");
        assert_eq!(fit("ñandú-日本", 6, false), "ñandú…");
        let w = fit_widths(&[4, 200, 30], Some(80));
        assert!(w.iter().sum::<usize>() + 4 <= 80, "{w:?}");
        assert_eq!(w[0], 4);
        assert_eq!(fit_widths(&[4, 200], None), vec![4, MAX_COLUMN]);
    }
}

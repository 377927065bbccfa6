//! The CLI's client of the server's HTTP API. Every subcommand other than `serve`, `agent` and
//! `fleet-sim` goes through here; none of them opens the server's database files.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;
use snapq_core::disk::human_bytes;

/// Where the server is and how to authenticate, resolved from flags, environment and defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub server: String,
    /// `None`: read `admin.token` from `data_dir`.
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub json: bool,
}

impl ClientConfig {
    /// How the server's certificate is trusted: the CA file given, else the local server's
    /// certificate pinned from the data directory, else the system's roots.
    pub fn trust(&self) -> anyhow::Result<crate::tls::Trust> {
        let local_cert =
            crate::tls::CertPair::in_dir(&crate::layout::ServerDir::new(&self.data_dir).certs())
                .cert;
        Ok(match &self.ca_cert {
            Some(ca) => crate::tls::Trust::CaFile(ca.clone()),
            None if local_cert.exists() => {
                crate::tls::Trust::Pin(crate::tls::cert_pin(&local_cert)?)
            }
            None => crate::tls::Trust::System,
        })
    }
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    pub json: bool,
}

impl Client {
    pub fn new(config: &ClientConfig) -> anyhow::Result<Client> {
        let token = match &config.token {
            Some(t) => t.clone(),
            None => {
                let path = crate::layout::ServerDir::new(&config.data_dir).admin_token();
                crate::token::read(&path).with_context(|| {
                    format!(
                        "no token given and {} is unreadable; pass --token or SNAPQ_TOKEN, or --data-dir of the local server",
                        path.display()
                    )
                })?
            }
        };
        Ok(Client {
            http: crate::tls::client(&config.trust()?)?,
            base: config.server.trim_end_matches('/').to_owned(),
            token,
            json: config.json,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the snapq server at {}: {}; is `snapq serve` running? (--server / SNAPQ_SERVER)",
                self.base,
                snapq_core::agent_client::error_chain(&e)
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"].as_str().unwrap_or("no details").to_owned();
        bail!("{message} (HTTP {})", status.as_u16())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        Ok(self.send(self.http.get(&url)).await?.json().await?)
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        Ok(self
            .send(self.http.post(&url).json(body))
            .await?
            .json()
            .await?)
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        Ok(self.send(self.http.delete(&url)).await?.json().await?)
    }

    /// A GET whose body the caller streams (downloads).
    pub async fn get_response(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url)).await
    }

    /// Prints `value` as JSON when `--json` was given, else runs `human`.
    pub fn print(&self, value: &Value, human: impl FnOnce(&Value)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("JSON prints")
            );
        } else {
            human(value);
        }
    }
}

pub(crate) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub(crate) fn time_of(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn bytes_of(v: &Value) -> String {
    v.as_u64().map(human_bytes).unwrap_or_else(|| "-".into())
}

/// `snapq endpoints rekey HOST` / `snapq endpoints forget HOST`.
pub async fn endpoint_identity(client: &Client, host: &str, forget: bool) -> anyhow::Result<()> {
    let action = if forget { "forget" } else { "rekey" };
    let result: Value = client
        .post(
            &format!("/v1/endpoints/{}/{action}", enc(host)),
            &Value::Null,
        )
        .await?;
    client.print(&result, |_| {
        if forget {
            println!("{host}: agent forgotten; it can enroll again with the enroll token");
        } else {
            println!("{host}: re-keyed; the next agent to enroll as {host} with the enroll token is bound to it");
        }
    });
    Ok(())
}

/// `snapq enroll-token rotate`: prints the new token.
pub async fn enroll_token_rotate(client: &Client) -> anyhow::Result<()> {
    let result: Value = client.post("/v1/enroll-token/rotate", &Value::Null).await?;
    client.print(&result, |r| {
        println!("{}", r["enroll_token"].as_str().unwrap_or_default());
        eprintln!("new enroll token issued; agents already enrolled keep working");
    });
    Ok(())
}

pub async fn endpoints(client: &Client, search: &str) -> anyhow::Result<()> {
    let list: Value = client
        .get(&format!("/v1/endpoints?search={}", enc(search)))
        .await?;
    client.print(&list, |list| {
        for e in list.as_array().into_iter().flatten() {
            let dot = if e["online"].as_bool() == Some(true) {
                "●"
            } else {
                "○"
            };
            let ips: Vec<&str> = e["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            println!(
                "{dot} {:<30} {:<8} {:<40} last seen {}",
                e["hostname"].as_str().unwrap_or(""),
                if e["online"].as_bool() == Some(true) {
                    "online"
                } else {
                    "offline"
                },
                ips.join(","),
                time_of(&e["last_seen_ms"])
            );
        }
        if list.as_array().is_none_or(|l| l.is_empty()) {
            eprintln!("no endpoints match");
        }
    });
    Ok(())
}

/// `snapq endpoints show HOST`: the server's facts and what the agent reports now.
pub async fn endpoint_show(client: &Client, host: &str) -> anyhow::Result<()> {
    let info: Value = client.get(&format!("/v1/endpoints/{}", enc(host))).await?;
    client.print(&info, |info| {
        let e = &info["endpoint"];
        let list = |v: &Value| {
            let items: Vec<&str> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.join(", ")
            }
        };
        let online = if e["online"].as_bool() == Some(true) {
            "online"
        } else {
            "offline"
        };
        println!("endpoint     {}", e["hostname"].as_str().unwrap_or(host));
        println!(
            "status       {online}, last seen {}",
            time_of(&e["last_seen_ms"])
        );
        println!("addresses    {}", list(&e["ips"]));
        println!("os           {}", e["os"].as_str().unwrap_or("-"));
        println!("labels       {}", list(&e["labels"]));
        println!(
            "agent cert   {}",
            e["cert_sha256"].as_str().unwrap_or("- (no agent enrolled)")
        );
        let live = &info["live"];
        if live.is_null() {
            println!("agent        none (known from uploads or the drop folder only)");
            return;
        }
        if let Some(err) = live["error"].as_str() {
            println!("agent        not answering: {err}");
            return;
        }
        println!(
            "agent        version {}",
            live["agent_version"].as_str().unwrap_or("-")
        );
        println!("database     {}", bytes_of(&live["db_bytes"]));
        println!(
            "events       {} to {}",
            time_of(&live["oldest_ts"]),
            time_of(&live["newest_ts"])
        );
        if let Some(counts) = live["events"].as_object() {
            let counts: Vec<String> = counts.iter().map(|(t, n)| format!("{t} {n}")).collect();
            println!("counts       {}", counts.join(", "));
        }
        println!("free disk    {}", bytes_of(&live["disk_free_bytes"]));
        if let Some(modes) = live["recorder_modes"].as_object().filter(|m| !m.is_empty()) {
            println!("recorder");
            for (kind, mode) in modes {
                println!("  {kind:<10} {}", mode.as_str().unwrap_or("-"));
            }
        }
    });
    Ok(())
}

/// Transfer rate from successive progress readings, smoothed so the ETA does not jump about.
#[derive(Debug, Clone, Default)]
struct Rate {
    last: Option<(std::time::Instant, u64)>,
    per_sec: f64,
}

impl Rate {
    fn update(&mut self, done: u64) -> f64 {
        let now = std::time::Instant::now();
        if let Some((at, before)) = self.last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 && done >= before {
                let current = (done - before) as f64 / secs;
                self.per_sec = if self.per_sec == 0.0 {
                    current
                } else {
                    0.7 * self.per_sec + 0.3 * current
                };
            }
        }
        self.last = Some((now, done));
        self.per_sec
    }
}

/// Asks a yes/no question on the terminal; `false` unless the answer starts with y.
pub fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && answer.trim().to_lowercase().starts_with('y')
}

pub async fn capture(
    client: &Client,
    hosts: &[String],
    yes: bool,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<bool> {
    if !yes && std::io::stdin().is_terminal() {
        for host in hosts {
            let info: Value = client.get(&format!("/v1/endpoints/{}", enc(host))).await?;
            let size = &info["live"]["db_bytes"];
            eprintln!(
                "{host}: database {}, server free {} (reserve {})",
                bytes_of(size),
                bytes_of(&info["server_free_bytes"]),
                bytes_of(&info["capture_reserve_bytes"])
            );
        }
        if !confirm(&format!("Capture {} snapshot(s)?", hosts.len())) {
            eprintln!("nothing captured");
            return Ok(false);
        }
    }
    let queued: Value = client
        .post("/v1/captures", &serde_json::json!({ "hosts": hosts }))
        .await?;
    report_captures(client, queued, wait, timeout).await
}

/// Prints queued captures, or with `wait` follows them to their end with progress; true when
/// all completed (or, without `wait`, were queued).
pub async fn report_captures(
    client: &Client,
    queued: Value,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<bool> {
    let items = queued.as_array().cloned().unwrap_or_default();
    if !wait {
        client.print(&queued, |q| {
            for item in q.as_array().into_iter().flatten() {
                println!(
                    "queued capture of {} (snapshot {}, job {})",
                    item["hostname"].as_str().unwrap_or(""),
                    item["snapshot_id"],
                    item["job_id"].as_str().unwrap_or("")
                );
            }
        });
        return Ok(true);
    }
    let show_progress = std::io::stderr().is_terminal() && !client.json;
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut finished: Vec<Option<Value>> = vec![None; items.len()];
    let mut rates: Vec<Rate> = vec![Rate::default(); items.len()];
    while finished.iter().any(Option::is_none) {
        let timed_out = deadline.is_some_and(|d| std::time::Instant::now() >= d);
        // A capture in its last step (verifying): look again soon.
        let mut ending = false;
        for (i, item) in items.iter().enumerate() {
            if finished[i].is_some() {
                continue;
            }
            let mut snap: Value = client
                .get(&format!("/v1/snapshots/{}", item["snapshot_id"]))
                .await?;
            // The job is the truth about whether anything is still happening: a capture whose
            // job ended (cancelled, dead) is over even before its row says so.
            if !matches!(snap["state"].as_str(), Some("complete" | "failed")) {
                if let Some(reason) = job_ended_without_success(client, &item["job_id"]).await? {
                    // The row may have ended between the two reads: it wins if it did.
                    snap = client
                        .get(&format!("/v1/snapshots/{}", item["snapshot_id"]))
                        .await?;
                    if !matches!(snap["state"].as_str(), Some("complete" | "failed")) {
                        snap["state"] = "failed".into();
                        snap["error"] = reason.into();
                    }
                } else if timed_out {
                    snap["error"] = format!(
                        "still {} when --timeout ran out; the capture goes on as job {}",
                        snap["state"].as_str().unwrap_or("queued"),
                        item["job_id"].as_str().unwrap_or("")
                    )
                    .into();
                    snap["state"] = "waiting".into();
                }
            }
            if show_progress {
                let done = snap["bytes_done"].as_u64().unwrap_or(0);
                let total = snap["bytes_total"].as_u64().unwrap_or(0);
                let pct = (done * 100).checked_div(total).unwrap_or(0);
                let per_sec = rates[i].update(done);
                let eta = if per_sec > 0.0 && total > done {
                    format!("ETA {:.0}s", (total - done) as f64 / per_sec)
                } else {
                    String::new()
                };
                eprint!(
                    "\r{:<24} {:<12} {:>3}% {} / {} {}/s {}   ",
                    snap["hostname"].as_str().unwrap_or(""),
                    snap["state"].as_str().unwrap_or(""),
                    pct,
                    human_bytes(done),
                    human_bytes(total),
                    human_bytes(per_sec as u64),
                    eta
                );
            }
            ending |= snap["state"] == "verifying";
            if matches!(
                snap["state"].as_str(),
                Some("complete" | "failed" | "waiting")
            ) {
                if show_progress {
                    eprintln!();
                }
                finished[i] = Some(snap);
            }
        }
        if finished.iter().any(Option::is_none) {
            // Look often while a capture is about to end (its last step is seconds at most),
            // rarely while bytes are still streaming.
            let pause = if ending { 50 } else { 200 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    let results: Vec<Value> = finished.into_iter().flatten().collect();
    let all_ok = results.iter().all(|s| s["state"] == "complete");
    client.print(&Value::Array(results.clone()), |_| {
        for s in &results {
            match s["state"].as_str() {
                Some("complete") => println!(
                    "{} complete: {} ({}, sha256 {})",
                    s["hostname"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or(""),
                    bytes_of(&s["size"]),
                    s["sha256"].as_str().unwrap_or("")
                ),
                Some("waiting") => println!(
                    "{} {}",
                    s["hostname"].as_str().unwrap_or(""),
                    s["error"].as_str().unwrap_or("")
                ),
                _ => println!(
                    "{} failed: {}",
                    s["hostname"].as_str().unwrap_or(""),
                    s["error"].as_str().unwrap_or("unknown reason")
                ),
            }
        }
    });
    Ok(all_ok)
}

/// `Some(reason)` when the job ended failed or cancelled.
async fn job_ended_without_success(client: &Client, job: &Value) -> anyhow::Result<Option<String>> {
    let Some(job) = job.as_str() else {
        return Ok(None);
    };
    let detail: Value = client.get(&format!("/v1/queue/jobs/{}", enc(job))).await?;
    Ok(match detail["state"].as_str() {
        Some(state @ ("failed" | "cancelled")) => Some(
            detail["last_error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("job {job} {state}")),
        ),
        _ => None,
    })
}

pub async fn snapshots_list(client: &Client, endpoint: Option<&str>) -> anyhow::Result<()> {
    let mut next = Some(match endpoint {
        Some(h) => format!("/v1/snapshots?endpoint={}&limit={PAGE}", enc(h)),
        None => format!("/v1/snapshots?limit={PAGE}"),
    });
    // Every page (the server's `Link: <...>; rel="next"`), merged by endpoint.
    let mut merged = std::collections::BTreeMap::<String, Value>::new();
    while let Some(path) = next.take() {
        let response = client.get_response(&path).await?;
        next = next_link(response.headers());
        let page: Vec<Value> = response.json().await?;
        for g in page {
            let host = g["hostname"].as_str().unwrap_or("").to_owned();
            match merged.get_mut(&host) {
                Some(have) => {
                    let more = g["snapshots"].as_array().cloned().unwrap_or_default();
                    if let Some(list) = have["snapshots"].as_array_mut() {
                        list.extend(more);
                    }
                }
                None => {
                    merged.insert(host, g);
                }
            }
        }
    }
    let groups = Value::Array(merged.into_values().collect());
    client.print(&groups, |groups| {
        for g in groups.as_array().into_iter().flatten() {
            println!(
                "{} ({} captures)",
                g["hostname"].as_str().unwrap_or(""),
                g["captures"]
            );
            for s in g["snapshots"].as_array().into_iter().flatten() {
                println!(
                    "  {:>5}  {:<48} {:<12} {:>10}  {:<7} {}  {}",
                    s["id"],
                    s["name"].as_str().unwrap_or("(not staged yet)"),
                    s["state"].as_str().unwrap_or(""),
                    bytes_of(&s["size"]),
                    s["origin"].as_str().unwrap_or(""),
                    s["sha256"]
                        .as_str()
                        .map(|h| &h[..h.len().min(16)])
                        .unwrap_or("-"),
                    time_of(&s["created_ms"])
                );
            }
        }
        if groups.as_array().is_none_or(|g| g.is_empty()) {
            eprintln!("no snapshots yet; `snapq capture HOST` takes one");
        }
    });
    Ok(())
}

/// Rows per page when a command lists everything page by page.
const PAGE: u32 = 500;

/// The next page's path from a `Link: <PATH>; rel="next"` header, if the answer has one.
pub(crate) fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
    })
}

pub async fn snapshot_show(client: &Client, id: &str) -> anyhow::Result<()> {
    let snap: Value = client.get(&format!("/v1/snapshots/{}", enc(id))).await?;
    client.print(&snap, |s| {
        for key in [
            "id",
            "hostname",
            "name",
            "state",
            "origin",
            "size",
            "sha256",
            "events",
            "oldest_ts",
            "newest_ts",
            "bytes_done",
            "bytes_total",
            "error",
            "job_id",
            "requested_by",
            "created_ms",
            "completed_ms",
        ] {
            let v = &s[key];
            let text = match key {
                "size" | "bytes_done" | "bytes_total" => bytes_of(v),
                "created_ms" | "completed_ms" | "oldest_ts" | "newest_ts" => time_of(v),
                _ => v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()),
            };
            println!("{key:<14} {text}");
        }
        let kept = if s["kept"] == true {
            format!(
                "yes, never pruned (marked by {} at {}; `snapq snapshots unkeep {}` undoes it)",
                s["kept_by"].as_str().unwrap_or("-"),
                time_of(&s["kept_ms"]),
                s["id"]
            )
        } else {
            "no".to_owned()
        };
        println!("{:<14} {kept}", "kept");
    });
    Ok(())
}

/// A JSON number as an integer, so `{:>8}` pads it (a `Value` ignores width).
fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn print_status(status: &Value) {
    println!(
        "{:<9} {:>8} {:>8} {:>9} {:>9} {:>7} {:>10} {:>12} {:>10}",
        "kind",
        "pending",
        "running",
        "retrying",
        "done",
        "failed",
        "cancelled",
        "oldest wait",
        "done/60s"
    );
    for k in status["status"]["kinds"].as_array().into_iter().flatten() {
        let age = k["oldest_pending_age_ms"]
            .as_u64()
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<9} {:>8} {:>8} {:>9} {:>9} {:>7} {:>10} {:>12} {:>10}",
            k["kind"].as_str().unwrap_or(""),
            count(&k["pending"]),
            count(&k["running"]),
            count(&k["retrying"]),
            count(&k["done"]),
            count(&k["failed"]),
            count(&k["cancelled"]),
            age,
            count(&k["done_last_60s"])
        );
    }
    let running = status["running"].as_array().cloned().unwrap_or_default();
    if !running.is_empty() {
        println!("\nrunning:");
        for j in running {
            let p = &j["progress"];
            let progress = if p.is_null() {
                String::new()
            } else {
                format!(
                    "{} / {} {}",
                    bytes_of(&p["done"]),
                    bytes_of(&p["total"]),
                    p["note"].as_str().unwrap_or("")
                )
            };
            println!(
                "  {}  {:<8} attempt {}/{}  {}",
                j["id"].as_str().unwrap_or(""),
                j["kind"].as_str().unwrap_or(""),
                j["attempts"],
                j["max_attempts"],
                progress
            );
        }
    }
    crate::client_fleet::print_active_batches(&status["batches"]);
    print_nodes(&status["nodes"]);
    print_watch_status(&status["watch"]);
}

/// Every server process on the queue with its last heartbeat; `*` marks the one that answered.
fn print_nodes(nodes: &Value) {
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        return;
    }
    println!(
        "
nodes:"
    );
    for n in nodes {
        let kinds: Vec<&str> = n["kinds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  {} {:<28} heartbeat {:>6.1}s ago{}  running {:>3}  {}",
            if n["this_node"].as_bool() == Some(true) {
                "*"
            } else {
                " "
            },
            n["node"].as_str().unwrap_or(""),
            n["heartbeat_age_ms"].as_i64().unwrap_or(0) as f64 / 1000.0,
            if n["silent"].as_bool() == Some(true) {
                " (silent)"
            } else {
                ""
            },
            count(&n["running"]),
            kinds.join(",")
        );
    }
}

pub async fn queue_status(client: &Client, watch: bool) -> anyhow::Result<()> {
    loop {
        let status: Value = client.get("/v1/queue/status").await?;
        if watch && !client.json {
            print!("\x1b[2J\x1b[H");
        }
        client.print(&status, print_status);
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn queue_list(
    client: &Client,
    state: Option<&str>,
    kind: Option<&str>,
    batch: Option<&str>,
    limit: u32,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/queue/jobs?limit={limit}");
    if let Some(b) = batch {
        path += &format!("&batch={}", enc(b));
    }
    if let Some(s) = state {
        path += &format!("&state={}", enc(s));
    }
    if let Some(k) = kind {
        path += &format!("&kind={}", enc(k));
    }
    let jobs: Value = client.get(&path).await?;
    client.print(&jobs, |jobs| {
        for j in jobs.as_array().into_iter().flatten() {
            println!(
                "{}  {:<8} {:<9} attempts {}/{}  {}  {}",
                j["id"].as_str().unwrap_or(""),
                j["kind"].as_str().unwrap_or(""),
                j["state"].as_str().unwrap_or(""),
                j["attempts"],
                j["max_attempts"],
                j["requested_by"].as_str().unwrap_or("-"),
                j["last_error"].as_str().unwrap_or("")
            );
        }
    });
    Ok(())
}

pub async fn queue_show(client: &Client, id: &str) -> anyhow::Result<()> {
    let detail: Value = client.get(&format!("/v1/queue/jobs/{}", enc(id))).await?;
    client.print(&detail, |d| {
        println!("{}", serde_json::to_string_pretty(d).expect("JSON prints"));
    });
    Ok(())
}

pub async fn queue_action(client: &Client, id: &str, action: &str) -> anyhow::Result<()> {
    let result: Value = client
        .post(
            &format!("/v1/queue/jobs/{}/{action}", enc(id)),
            &Value::Null,
        )
        .await?;
    client.print(&result, |_| println!("job {id}: {action} requested"));
    Ok(())
}

/// `snapq upload FILE... [--connect]`: streams each file (never whole in memory) with a progress
/// line, then waits for its ingest when `connect` is set.
pub async fn upload(
    client: &Client,
    files: &[PathBuf],
    connect: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<bool> {
    use futures::StreamExt;
    let mut all_ok = true;
    let mut results = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no usable file name", path.display()))?
            .to_owned();
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let total = file.metadata().await?.len();
        let show = std::io::stderr().is_terminal() && !client.json;
        let mut sent = 0u64;
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                if let Ok(c) = &chunk {
                    sent += c.len() as u64;
                    if show {
                        eprint!(
                            "\r{name}: {} / {}   ",
                            human_bytes(sent),
                            human_bytes(total)
                        );
                    }
                }
                chunk
            });
        let url = format!("{}/v1/uploads?name={}", client.base, enc(&name_of(path)));
        let response = client
            .send(
                client
                    .http
                    .post(&url)
                    .header(reqwest::header::CONTENT_LENGTH, total)
                    .body(reqwest::Body::wrap_stream(stream)),
            )
            .await;
        if show {
            eprintln!();
        }
        let queued: Value = response?.json().await?;
        let job = queued["job_id"].as_str().unwrap_or_default().to_owned();
        if !connect {
            results.push(queued);
            continue;
        }
        let ingest = wait_ingest(client, &job, timeout).await?;
        let ok = matches!(ingest["state"].as_str(), Some("complete" | "duplicate"));
        all_ok &= ok;
        let (snapshot, connection) = match ingest["snapshot_id"].as_i64() {
            Some(id) if ok => (
                client.get::<Value>(&format!("/v1/snapshots/{id}")).await?,
                // Upload & Connect: open the snapshot for analysis.
                client
                    .post::<Value>(&format!("/v1/snapshots/{id}/connect"), &Value::Null)
                    .await?,
            ),
            _ => (Value::Null, Value::Null),
        };
        all_ok &= connection.is_null() || connection["status"] == "active";
        results.push(
            serde_json::json!({ "ingest": ingest, "snapshot": snapshot, "connection": connection }),
        );
    }
    let results = Value::Array(results);
    client.print(&results, |results| {
        for r in results.as_array().into_iter().flatten() {
            if !connect {
                println!(
                    "uploaded {} ({}); ingest job {}",
                    r["name"].as_str().unwrap_or(""),
                    bytes_of(&r["bytes"]),
                    r["job_id"].as_str().unwrap_or("")
                );
                continue;
            }
            let (ingest, snap, conn) = (&r["ingest"], &r["snapshot"], &r["connection"]);
            match ingest["state"].as_str() {
                Some(state @ ("complete" | "duplicate")) => {
                    println!(
                        "{} {}: snapshot {} of {}, {} events from {} to {}",
                        ingest["original_name"].as_str().unwrap_or(""),
                        if state == "duplicate" {
                            "is a duplicate"
                        } else {
                            "ingested"
                        },
                        snap["id"],
                        snap["hostname"].as_str().unwrap_or(""),
                        snap["events"],
                        time_of(&snap["oldest_ts"]),
                        time_of(&snap["newest_ts"])
                    );
                    match conn["status"].as_str() {
                        Some("active") => println!(
                            "connection {} open: `snapq events --connection {}` queries it",
                            conn["id"], conn["id"]
                        ),
                        _ => println!(
                            "could not open it: {}",
                            conn["reason"].as_str().unwrap_or("unknown reason")
                        ),
                    }
                }
                Some(state) => println!(
                    "{} {}: {}",
                    ingest["original_name"].as_str().unwrap_or(""),
                    if state == "quarantined" {
                        "rejected"
                    } else {
                        state
                    },
                    ingest["reason"].as_str().unwrap_or("unknown reason")
                ),
                None => println!("{}", ingest),
            }
        }
    });
    Ok(all_ok)
}

fn name_of(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Polls an ingest until it is no longer pending, its job ended, or `timeout` ran out.
async fn wait_ingest(
    client: &Client,
    job: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<Value> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let mut ingest: Value = client.get(&format!("/v1/ingests/{}", enc(job))).await?;
        if ingest["state"] != "pending" {
            return Ok(ingest);
        }
        if let Some(reason) = job_ended_without_success(client, &Value::from(job)).await? {
            // The row may have ended between the two reads: it wins if it did.
            ingest = client.get(&format!("/v1/ingests/{}", enc(job))).await?;
            if ingest["state"] == "pending" {
                ingest["state"] = "failed".into();
                ingest["reason"] = reason.into();
            }
            return Ok(ingest);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            ingest["reason"] =
                format!("still pending when --timeout ran out; the ingest goes on as job {job}")
                    .into();
            return Ok(ingest);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `snapq snapshots delete`: queues the delete jobs and waits for them.
pub async fn snapshots_delete(
    client: &Client,
    ids: &[i64],
    endpoint: Option<&str>,
) -> anyhow::Result<bool> {
    let body = match endpoint {
        Some(host) => serde_json::json!({ "endpoint": host }),
        None => serde_json::json!({ "ids": ids }),
    };
    let queued: Value = client.post("/v1/snapshots/delete", &body).await?;
    let mut results = Vec::new();
    for q in queued.as_array().into_iter().flatten() {
        let job = q["job_id"].as_str().unwrap_or_default();
        let detail = loop {
            let detail: Value = client.get(&format!("/v1/queue/jobs/{}", enc(job))).await?;
            if matches!(
                detail["state"].as_str(),
                Some("done" | "failed" | "cancelled")
            ) {
                break detail;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        results.push(serde_json::json!({
            "snapshot_id": q["snapshot_id"], "state": detail["state"], "error": detail["last_error"]
        }));
    }
    let all_ok = results.iter().all(|r| r["state"] == "done");
    client.print(&Value::Array(results.clone()), |_| {
        for r in &results {
            match r["state"].as_str() {
                Some("done") => println!("deleted snapshot {}", r["snapshot_id"]),
                _ => println!(
                    "snapshot {} not deleted: {}",
                    r["snapshot_id"],
                    r["error"].as_str().unwrap_or("unknown reason")
                ),
            }
        }
        if results.is_empty() {
            println!("nothing to delete");
        }
    });
    Ok(all_ok)
}

/// `snapq quarantine list`.
pub async fn quarantine_list(client: &Client) -> anyhow::Result<()> {
    let list: Value = client.get("/v1/quarantine").await?;
    client.print(&list, |list| {
        let entries = list.as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            println!("quarantine is empty");
        }
        for q in entries {
            println!(
                "{}  {}  {:<6} {:>9}  {}\n    {}",
                q["id"].as_str().unwrap_or(""),
                time_of(&q["quarantined_ms"]),
                q["origin"].as_str().unwrap_or(""),
                bytes_of(&q["size"]),
                q["name"].as_str().unwrap_or(""),
                q["reason"].as_str().unwrap_or("")
            );
        }
    });
    Ok(())
}

/// `snapq quarantine show ID`.
pub async fn quarantine_show(client: &Client, id: &str) -> anyhow::Result<()> {
    let q: Value = client.get(&format!("/v1/quarantine/{}", enc(id))).await?;
    client.print(&q, |q| {
        println!("id:          {}", q["id"].as_str().unwrap_or(""));
        println!("name:        {}", q["name"].as_str().unwrap_or(""));
        println!("origin:      {}", q["origin"].as_str().unwrap_or(""));
        println!("size:        {}", bytes_of(&q["size"]));
        println!("quarantined: {}", time_of(&q["quarantined_ms"]));
        println!("by:          {}", q["requested_by"].as_str().unwrap_or(""));
        println!("file:        {}", q["path"].as_str().unwrap_or("-"));
        println!("reason:      {}", q["reason"].as_str().unwrap_or(""));
        if let Some(sha) = q["rejection"]["sha256"].as_str() {
            println!("sha256:      {sha}");
        }
    });
    Ok(())
}

/// `snapq quarantine retry ID... [--as NAME]`: queues an ingest of each file where it lies.
pub async fn quarantine_retry(
    client: &Client,
    ids: &[String],
    as_name: Option<&str>,
) -> anyhow::Result<()> {
    let mut queued = Vec::new();
    for id in ids {
        let body = serde_json::json!({ "as": as_name });
        let r: Value = client
            .post(&format!("/v1/quarantine/{}/retry", enc(id)), &body)
            .await?;
        queued.push(r);
    }
    client.print(&Value::Array(queued), |queued| {
        for r in queued.as_array().into_iter().flatten() {
            println!(
                "{}: ingesting {} again (job {}); `snapq queue show {}` follows it",
                r["retry_of"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or(""),
                r["job_id"].as_str().unwrap_or(""),
                r["job_id"].as_str().unwrap_or("")
            );
        }
    });
    Ok(())
}

/// `snapq quarantine delete ID... [--yes]`.
pub async fn quarantine_delete(client: &Client, ids: &[String]) -> anyhow::Result<()> {
    let r: Value = client
        .post("/v1/quarantine/delete", &serde_json::json!({ "ids": ids }))
        .await?;
    client.print(&r, |r| {
        for id in r["deleted"].as_array().into_iter().flatten() {
            println!("deleted {}", id.as_str().unwrap_or(""));
        }
    });
    Ok(())
}

/// The drop folder's part of `snapq queue status`: files still waiting, and why.
fn print_watch_status(watch: &Value) {
    let waiting = watch["waiting"].as_array().cloned().unwrap_or_default();
    if waiting.is_empty() {
        return;
    }
    println!(
        "\ndrop folder {}: {} file(s) waiting",
        watch["dir"].as_str().unwrap_or(""),
        waiting.len()
    );
    for w in waiting {
        let why = if w["writer_open"].as_bool() == Some(true) {
            "waiting for its writer to close it"
        } else {
            "still changing or within the quiet period"
        };
        println!(
            "  {}  {}  unchanged {:.1}s  {why}",
            w["name"].as_str().unwrap_or(""),
            bytes_of(&w["size"]),
            w["unchanged_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::next_link;
    use reqwest::header::{HeaderMap, HeaderValue, LINK};

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(next_link(&headers), None);
        headers.insert(
            LINK,
            HeaderValue::from_static(
                "</v1/snapshots?limit=2&before=7>; rel=\"prev\", </v1/snapshots?limit=2&before=5>; rel=\"next\"",
            ),
        );
        assert_eq!(
            next_link(&headers).as_deref(),
            Some("/v1/snapshots?limit=2&before=5")
        );
        headers.insert(LINK, HeaderValue::from_static("</x>; rel=\"last\""));
        assert_eq!(next_link(&headers), None);
    }
}

//! `snapq doctor`: checks what first-time users get wrong, one line each, with what to do.
//!
//! The checks run in order and stop where the next cannot mean anything (no server: no token
//! check). Server reachable (`GET /status`), its certificate trusted (a TLS failure is told apart
//! from no server at all), the token valid and its role (`GET /v1/whoami`), the clock against the
//! server's, the server's free disk against the capture reserve, and agents whose version differs
//! from the server's. Exit 1 if anything failed; warnings alone exit 0.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::client::{Client, ClientConfig};

/// More clock skew than this is a warning: token expiry and job times would look wrong.
const MAX_SKEW: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    verdict: Verdict,
    detail: String,
    /// What to do about it (for warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Default)]
struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.push(check, Verdict::Ok, detail.into(), None);
    }

    fn warn(&mut self, check: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(check, Verdict::Warn, detail.into(), Some(fix.into()));
    }

    fn fail(&mut self, check: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(check, Verdict::Fail, detail.into(), Some(fix.into()));
    }

    fn push(&mut self, check: &'static str, verdict: Verdict, detail: String, fix: Option<String>) {
        self.checks.push(Check {
            check,
            verdict,
            detail,
            fix,
        });
    }

    fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self.checks).expect("JSON prints")
            );
            return;
        }
        for c in &self.checks {
            let mark = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            println!("{mark} {:<12} {}", c.check, c.detail);
            if let Some(fix) = &c.fix {
                println!("     {:<12} → {fix}", "");
            }
        }
    }

    fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.verdict == Verdict::Fail)
    }
}

pub async fn run(config: &ClientConfig) -> anyhow::Result<()> {
    let mut report = Report::default();
    diagnose(config, &mut report).await;
    report.print(config.json);
    if report.failed() {
        anyhow::bail!("snapq doctor found problems (see above)");
    }
    Ok(())
}

async fn diagnose(config: &ClientConfig, report: &mut Report) {
    let base = config.server.trim_end_matches('/');
    let trust = match config.trust() {
        Ok(t) => t,
        Err(e) => {
            return report.fail(
                "certificate",
                format!("cannot load what the server's certificate is trusted by: {e:#}"),
                "pass a readable PEM file to --ca-cert (SNAPQ_CA_CERT)",
            );
        }
    };
    let http = match crate::tls::client(&trust) {
        Ok(h) => h,
        Err(e) => {
            return report.fail(
                "certificate",
                format!("{e:#}"),
                "pass a PEM CA file to --ca-cert (SNAPQ_CA_CERT)",
            );
        }
    };

    // The server, and whether its certificate is trusted.
    let status = match http
        .get(format!("{base}/status"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let chain = snapq_core::agent_client::error_chain(&e);
            let lower = chain.to_lowercase();
            if lower.contains("certificate") || lower.contains("issuer") || lower.contains("tls") {
                report.ok("server", format!("something answers at {base}"));
                return report.fail(
                    "certificate",
                    format!("the server's certificate is not trusted: {chain}"),
                    "on the server's host pass --data-dir of its data directory (the CLI pins its certificate); elsewhere pass its CA with --ca-cert, or copy certs/httpPublicCert.pem from the server and pass it to --ca-cert",
                );
            }
            return report.fail(
                "server",
                format!("no snapq server answers at {base}: {chain}"),
                "start it with `snapq serve`, or point --server (SNAPQ_SERVER) at it",
            );
        }
    };
    let server_date = status
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok());
    let body: Value = status.json().await.unwrap_or(Value::Null);
    if body["service"] != "snapq" {
        return report.fail(
            "server",
            format!("{base} answers, but it is not a snapq server"),
            "point --server (SNAPQ_SERVER) at the snapq server's URL",
        );
    }
    let server_version = body["version"].as_str().unwrap_or("").to_owned();
    report.ok("server", format!("snapq {server_version} at {base}"));
    report.ok(
        "certificate",
        match trust {
            crate::tls::Trust::Pin(_) => "trusted: pinned from the local data directory".into(),
            crate::tls::Trust::CaFile(ref f) => format!("trusted: issued by {}", f.display()),
            crate::tls::Trust::System => "trusted by the system's roots".to_owned(),
        },
    );

    // Clock skew, from the server's Date header (second precision).
    if let Some(date) = server_date {
        let skew = (chrono::Utc::now() - date.with_timezone(&chrono::Utc)).num_seconds();
        if skew.unsigned_abs() > MAX_SKEW.as_secs() {
            report.warn(
                "clock",
                format!(
                    "this machine's clock is {} s {} the server's",
                    skew.abs(),
                    if skew > 0 { "ahead of" } else { "behind" }
                ),
                "enable time synchronisation on both (e.g. `timedatectl set-ntp true`): token expiry and job times depend on it",
            );
        } else {
            report.ok("clock", format!("within {} s of the server's", skew.abs()));
        }
    }

    // The token, and what it may do.
    let client = match Client::new(config) {
        Ok(c) => c,
        Err(e) => {
            return report.fail(
                "token",
                format!("{e:#}"),
                "pass --token (SNAPQ_TOKEN); an admin makes one with `snapq tokens create --user NAME`",
            );
        }
    };
    let me: Value = match client.get("/v1/whoami").await {
        Ok(v) => v,
        Err(e) => {
            return report.fail(
                "token",
                format!("refused: {e:#}"),
                "ask an admin for a new token (`snapq tokens create --user NAME`) and pass it with --token",
            );
        }
    };
    let role = me["role"].as_str().unwrap_or("?");
    let expiry = me["token"]["expires_ms"]
        .as_i64()
        .map(|ms| format!(", expires {}", crate::client::time_of(&Value::from(ms))))
        .unwrap_or_default();
    let groups: Vec<&str> = me["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_str())
        .collect();
    let scope = if role == "admin" {
        "every endpoint".to_owned()
    } else if groups.is_empty() {
        "no endpoint (no groups granted)".to_owned()
    } else {
        format!("groups {}", groups.join(", "))
    };
    if role != "admin" && groups.is_empty() {
        report.warn(
            "token",
            format!(
                "valid: {} ({role}){expiry}; sees {scope}",
                me["user"].as_str().unwrap_or("?")
            ),
            "an admin grants groups with `snapq users grant NAME GROUP`",
        );
    } else {
        report.ok(
            "token",
            format!(
                "valid: {} ({role}){expiry}; sees {scope}",
                me["user"].as_str().unwrap_or("?")
            ),
        );
    }

    // The server's free disk against what captures keep free.
    let server = &me["server"];
    if let (Some(free), Some(reserve)) = (
        server["free_bytes"].as_u64(),
        server["capture_reserve_bytes"].as_u64(),
    ) {
        let detail = format!(
            "{} free in the server's store, {} kept free for captures",
            snapq_core::disk::human_bytes(free),
            snapq_core::disk::human_bytes(reserve)
        );
        if free <= reserve {
            report.fail(
                "disk",
                detail,
                "free space in the server's data directory (or lower --capture-reserve-mib): every capture fails until then",
            );
        } else if free < reserve.saturating_mul(2) {
            report.warn(
                "disk",
                detail,
                "free space in the server's data directory soon: captures fail once free space is down to the reserve",
            );
        } else {
            report.ok("disk", detail);
        }
    }

    // Agents on another version than the server.
    match client.get::<Value>("/v1/endpoints").await {
        Ok(list) => {
            let different: Vec<String> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let v = e["agent_version"].as_str()?;
                    (v != server_version)
                        .then(|| format!("{} ({v})", e["hostname"].as_str().unwrap_or("?")))
                })
                .collect();
            if different.is_empty() {
                report.ok(
                    "agents",
                    format!("every agent you can see runs {server_version}"),
                );
            } else {
                report.warn(
                    "agents",
                    format!(
                        "{} agent(s) differ from the server's {server_version}: {}",
                        different.len(),
                        different.join(", ")
                    ),
                    "upgrade them to the server's version (older agents may lack what the server asks for)",
                );
            }
        }
        Err(e) => report.warn(
            "agents",
            format!("could not list endpoints: {e:#}"),
            "check the token's role and groups",
        ),
    }
}

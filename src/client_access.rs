//! The CLI's `users`, `tokens`, `groups` and `audit` commands: clients of the server API's
//! access routes (`src/server/admin.rs`), printing tables or `--json`.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use snapq_core::access::GroupRules;

use crate::client::{Client, enc, time_of};

/// A users, tokens, groups or audit command, validated.
#[derive(Debug)]
pub enum AccessCommand {
    UsersAdd {
        name: String,
        role: String,
        groups: Vec<String>,
    },
    UsersList,
    UsersShow {
        name: String,
    },
    UsersRemove {
        name: String,
    },
    UsersSetRole {
        name: String,
        role: String,
    },
    UsersGrant {
        name: String,
        group: String,
    },
    UsersRevoke {
        name: String,
        group: String,
    },
    UsersPasswd {
        name: String,
    },
    TokensCreate {
        user: Option<String>,
        label: Option<String>,
        expires_in_secs: Option<u64>,
    },
    TokensList {
        user: Option<String>,
    },
    TokensRevoke {
        id: i64,
    },
    GroupsAdd {
        name: String,
        rules: GroupRules,
    },
    GroupsList,
    GroupsShow {
        name: String,
    },
    GroupsRemove {
        name: String,
    },
    AuditList {
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        user: Option<String>,
        action: Option<String>,
        limit: u32,
    },
}

fn strings(v: &Value) -> String {
    let items: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

fn print_user(u: &Value) {
    println!(
        "{:<24} {:<9} groups {:<30} tokens {:<3} password {}",
        text(&u["name"]),
        text(&u["role"]),
        strings(&u["groups"]),
        u["tokens"],
        if u["has_password"] == true {
            "set"
        } else {
            "-"
        }
    );
}

fn token_state(t: &Value) -> String {
    if !t["revoked_ms"].is_null() {
        return format!(
            "revoked {} ({})",
            time_of(&t["revoked_ms"]),
            text(&t["revoked_reason"])
        );
    }
    match t["expires_ms"].as_i64() {
        Some(ms) if ms <= snapq_core::catalog::now_ms() => {
            format!("expired {}", time_of(&t["expires_ms"]))
        }
        Some(_) => format!("expires {}", time_of(&t["expires_ms"])),
        None => "active".into(),
    }
}

fn print_tokens(tokens: &Value) {
    println!(
        "{:>5}  {:<16} {:<20} {:<13} {:<19}  {:<19}  state",
        "id", "user", "label", "prefix", "created", "last used"
    );
    for t in tokens.as_array().into_iter().flatten() {
        println!(
            "{:>5}  {:<16} {:<20} {:<13} {:<19}  {:<19}  {}",
            t["id"],
            text(&t["user"]),
            text(&t["label"]),
            format!("{}…", text(&t["prefix"])),
            time_of(&t["created_ms"]),
            time_of(&t["last_used_ms"]),
            token_state(t)
        );
    }
}

/// Reads a password: asked twice without echo on a terminal, else one line from stdin.
fn read_password(name: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\n', '\r']).to_owned();
        if password.is_empty() {
            bail!("no password on stdin; pipe one line, or run on a terminal to be asked");
        }
        return Ok(password);
    }
    let first = prompt_hidden(&format!("New password for {name}: "))?;
    let second = prompt_hidden("Again: ")?;
    if first != second {
        bail!("the two passwords differ; nothing changed");
    }
    Ok(first)
}

/// Asks on the terminal with echo off, restoring the terminal afterwards.
fn prompt_hidden(question: &str) -> anyhow::Result<String> {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed, then filled, termios.
    let saved = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            None
        } else {
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Some(saved)
        }
    };
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    if let Some(saved) = saved {
        // SAFETY: restores the attributes read above.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &saved);
        }
    }
    eprintln!();
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

pub async fn run(c: &Client, command: AccessCommand) -> anyhow::Result<()> {
    use AccessCommand as A;
    match command {
        A::UsersAdd { name, role, groups } => {
            let user: Value = c
                .post(
                    "/v1/users",
                    &json!({ "name": name, "role": role, "groups": groups }),
                )
                .await?;
            c.print(&user, |u| {
                print!("added ");
                print_user(u);
            });
        }
        A::UsersList => {
            let users: Value = c.get("/v1/users").await?;
            c.print(&users, |users| {
                for u in users.as_array().into_iter().flatten() {
                    print_user(u);
                }
            });
        }
        A::UsersShow { name } => {
            let shown: Value = c.get(&format!("/v1/users/{}", enc(&name))).await?;
            c.print(&shown, |s| {
                print_user(&s["user"]);
                println!();
                print_tokens(&s["tokens"]);
            });
        }
        A::UsersRemove { name } => {
            let done: Value = c.delete(&format!("/v1/users/{}", enc(&name))).await?;
            c.print(&done, |_| {
                println!("removed user {name}; their tokens are revoked")
            });
        }
        A::UsersSetRole { name, role } => {
            let done: Value = c
                .post(
                    &format!("/v1/users/{}/role", enc(&name)),
                    &json!({ "role": role }),
                )
                .await?;
            c.print(&done, |_| println!("{name} is now {role}"));
        }
        A::UsersGrant { name, group } => {
            let done: Value = c
                .post(
                    &format!("/v1/users/{}/groups", enc(&name)),
                    &json!({ "group": group }),
                )
                .await?;
            c.print(&done, |_| println!("{name} may now reach group {group}"));
        }
        A::UsersRevoke { name, group } => {
            let done: Value = c
                .delete(&format!("/v1/users/{}/groups/{}", enc(&name), enc(&group)))
                .await?;
            c.print(&done, |d| {
                if d["had_it"] == true {
                    println!("{name} no longer reaches group {group}")
                } else {
                    println!("{name} did not have group {group}")
                }
            });
        }
        A::UsersPasswd { name } => {
            let password = read_password(&name)?;
            let done: Value = c
                .post(
                    &format!("/v1/users/{}/password", enc(&name)),
                    &json!({ "password": password }),
                )
                .await?;
            c.print(&done, |_| println!("password of {name} set"));
        }
        A::TokensCreate {
            user,
            label,
            expires_in_secs,
        } => {
            let made: Value = c
                .post(
                    "/v1/tokens",
                    &json!({ "user": user, "label": label, "expires_in_secs": expires_in_secs }),
                )
                .await?;
            c.print(&made, |m| {
                println!("{}", text(&m["token"]));
                eprintln!(
                    "token {} of {} ({}); it is shown only this once: store it now",
                    m["info"]["id"],
                    text(&m["info"]["user"]),
                    token_state(&m["info"])
                );
            });
        }
        A::TokensList { user } => {
            let path = match &user {
                Some(u) => format!("/v1/tokens?user={}", enc(u)),
                None => "/v1/tokens".into(),
            };
            let tokens: Value = c.get(&path).await?;
            c.print(&tokens, print_tokens);
        }
        A::TokensRevoke { id } => {
            let done: Value = c.delete(&format!("/v1/tokens/{id}")).await?;
            c.print(&done, |d| {
                if d["already_revoked"] == true {
                    println!("token {id} was already revoked")
                } else {
                    println!("token {id} of {} revoked", text(&d["user"]))
                }
            });
        }
        A::GroupsAdd { name, rules } => {
            let mut body = serde_json::to_value(&rules)?;
            body["name"] = name.into();
            let group: Value = c.post("/v1/groups", &body).await?;
            let shown: Value = c
                .get(&format!("/v1/groups/{}", enc(text(&group["name"]))))
                .await?;
            c.print(&shown, |s| {
                println!(
                    "added group {} ({} members now)",
                    text(&s["group"]["name"]),
                    s["members"].as_array().map_or(0, Vec::len)
                );
            });
        }
        A::GroupsList => {
            let groups: Value = c.get("/v1/groups").await?;
            c.print(&groups, |groups| {
                println!(
                    "{:<20} {:>7}  {:<20} {:<20} {:<12} {:<16} users",
                    "group", "members", "hostnames", "cidrs", "labels", "members (fixed)"
                );
                for g in groups.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:>7}  {:<20} {:<20} {:<12} {:<16} {}",
                        text(&g["name"]),
                        g["member_count"],
                        strings(&g["hostnames"]),
                        strings(&g["cidrs"]),
                        strings(&g["labels"]),
                        strings(&g["members"]),
                        strings(&g["users"])
                    );
                }
            });
        }
        A::GroupsShow { name } => {
            let shown: Value = c.get(&format!("/v1/groups/{}", enc(&name))).await?;
            c.print(&shown, |s| {
                let g = &s["group"];
                println!("group     {}", text(&g["name"]));
                println!("hostnames {}", strings(&g["hostnames"]));
                println!("cidrs     {}", strings(&g["cidrs"]));
                println!("labels    {}", strings(&g["labels"]));
                println!("fixed     {}", strings(&g["members"]));
                println!("users     {}", strings(&g["users"]));
                let members = s["members"].as_array().cloned().unwrap_or_default();
                println!("members now ({}):", members.len());
                for m in members {
                    println!("  {:<30} {}", text(&m["hostname"]), strings(&m["ips"]));
                }
            });
        }
        A::GroupsRemove { name } => {
            let done: Value = c.delete(&format!("/v1/groups/{}", enc(&name))).await?;
            c.print(&done, |_| println!("removed group {name}"));
        }
        A::AuditList {
            since_ms,
            until_ms,
            user,
            action,
            limit,
        } => {
            let mut path = format!("/v1/audit?limit={limit}");
            if let Some(s) = since_ms {
                path += &format!("&since_ms={s}");
            }
            if let Some(u) = until_ms {
                path += &format!("&until_ms={u}");
            }
            if let Some(u) = &user {
                path += &format!("&user={}", enc(u));
            }
            if let Some(a) = &action {
                path += &format!("&action={}", enc(a));
            }
            let entries: Value = c.get(&path).await?;
            c.print(&entries, |entries| {
                for e in entries.as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<16} {:<24} {:<30} {:<8} {}",
                        time_of(&e["ts_ms"]),
                        text(&e["actor"]),
                        text(&e["action"]),
                        text(&e["target"]),
                        text(&e["result"]),
                        e["detail"].as_str().unwrap_or("")
                    );
                }
            });
        }
    }
    Ok(())
}

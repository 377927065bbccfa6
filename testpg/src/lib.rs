//! A PostgreSQL for tests, found or started once per test process, and a fresh schema per test so
//! tests run in parallel without seeing each other's rows.
//!
//! Where the server comes from, in order:
//! 1. `SNAPQ_TEST_DATABASE_URL` (CI sets it to the machine's PostgreSQL). Set but unreachable is a
//!    test failure, not a skip: the run asked for PostgreSQL.
//! 2. A throwaway cluster started with `initdb` and `pg_ctl` in a temporary directory, listening
//!    only on a Unix socket there, stopped when the test process exits. As root it runs as the
//!    `postgres` user (`initdb` refuses root).
//! 3. Neither: [`schema`] answers why, and each PostgreSQL test prints that it was skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// The environment variable naming the PostgreSQL the tests use.
pub const URL_VAR: &str = "SNAPQ_TEST_DATABASE_URL";

/// A schema of its own in the test PostgreSQL.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// A URL whose connections use this schema only (`search_path`).
    pub url: String,
    /// Options for the same connections.
    pub options: PgConnectOptions,
    pub schema: String,
}

/// A fresh, empty schema for one test; `Err` says why PostgreSQL tests cannot run here (the caller
/// prints it as a skip). Panics when `SNAPQ_TEST_DATABASE_URL` is set but does not work.
pub async fn schema() -> Result<TestDb, String> {
    let base = server()?;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let schema = format!(
        "t{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let options: PgConnectOptions = base.parse().map_err(|e| format!("{URL_VAR}: {e}"))?;
    let mut conn = PgConnection::connect_with(&options)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL at {base}: {e}"));
    // The name is ours (digits and underscores), never user text.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("creating schema {schema}: {e}"));
    let _ = conn.close().await;
    let options = options.options([("search_path", schema.as_str())]);
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    Ok(TestDb {
        url,
        options,
        schema,
    })
}

/// Like [`schema`], printing the reason and returning `None` when PostgreSQL tests cannot run.
pub async fn schema_or_skip(test: &str) -> Option<TestDb> {
    match schema().await {
        Ok(db) => Some(db),
        Err(why) => {
            eprintln!("skipped {test} on PostgreSQL: {why}");
            None
        }
    }
}

/// The base URL of the test server, found or started once.
fn server() -> Result<String, String> {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var(URL_VAR)
                && !url.is_empty()
            {
                return Ok(url);
            }
            start_cluster()
        })
        .clone()
}

/// `initdb` + `pg_ctl start` in a temporary directory, stopped when the test process exits.
fn start_cluster() -> Result<String, String> {
    let cluster = Cluster::start("shared")?;
    let url = cluster.url.clone();
    SHARED.set(cluster).ok();
    unsafe { libc::atexit(stop_shared_cluster) };
    Ok(url)
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

extern "C" fn stop_shared_cluster() {
    if let Some(cluster) = SHARED.get() {
        cluster.stop_and_remove();
    }
}

/// A PostgreSQL cluster of its own (`initdb` and `pg_ctl` in a temporary directory, listening
/// only on a Unix socket there), for a test that restarts or stops the database server. Stopped
/// and removed when dropped. As root it runs as the `postgres` user (`initdb` refuses root).
pub struct Cluster {
    /// `postgres://postgres@localhost/postgres?host=SOCKET_DIR`.
    pub url: String,
    pg_ctl: PathBuf,
    data: PathBuf,
    as_root: bool,
}

impl Cluster {
    /// Initializes and starts a cluster; `Err` says why one cannot run here.
    pub fn start(name: &str) -> Result<Cluster, String> {
        let initdb = find_tool("initdb").ok_or_else(|| {
            format!("{URL_VAR} is not set and no initdb/pg_ctl is installed to start a PostgreSQL")
        })?;
        let pg_ctl = find_tool("pg_ctl").ok_or("initdb is installed but pg_ctl is not")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "snapq-testpg-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let data = root.join("data");
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            chown_to_postgres(&root)?;
        }
        let data_s = data.to_str().ok_or("temporary directory is not UTF-8")?;
        let root_s = root.to_str().ok_or("temporary directory is not UTF-8")?;
        run_tool(
            as_root,
            &initdb,
            &["-D", data_s, "-U", "postgres", "-A", "trust", "--no-sync"],
        )?;
        let cluster = Cluster {
            url: format!("postgres://postgres@localhost/postgres?host={root_s}"),
            pg_ctl,
            data,
            as_root,
        };
        cluster.pg_ctl("start")?;
        Ok(cluster)
    }

    /// Stops the server (fast: connections are cut) and starts it again on the same files.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl("restart")
    }

    /// `pg_ctl ACTION` (start, restart), waiting for it.
    fn pg_ctl(&self, action: &str) -> Result<(), String> {
        let data_s = self.data.to_str().expect("checked at start");
        let root = self.data.parent().expect("data is under the root");
        let root_s = root.to_str().expect("checked at start");
        let opts =
            format!("-c listen_addresses='' -k {root_s} -c fsync=off -c max_connections=300");
        let log = format!("{root_s}/log");
        let mut args = vec![action, "-w", "-D", data_s, "-l", &log, "-o", &opts];
        if action == "restart" {
            args.extend(["-m", "fast"]);
        }
        run_tool(self.as_root, &self.pg_ctl, &args)
    }

    fn stop_and_remove(&self) {
        let _ = run_tool(
            self.as_root,
            &self.pg_ctl,
            &[
                "stop",
                "-m",
                "immediate",
                "-D",
                self.data.to_str().unwrap_or(""),
            ],
        );
        if let Some(root) = self.data.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_and_remove();
    }
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root.
fn run_tool(as_root: bool, program: &Path, args: &[&str]) -> Result<(), String> {
    let mut cmd = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("running {}: {e}", program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn chown_to_postgres(dir: &Path) -> Result<(), String> {
    let out = Command::new("chown")
        .args(["postgres:"])
        .arg(dir)
        .output()
        .map_err(|e| format!("chown: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "running as root without a postgres user to run initdb as: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `name` on the PATH, else in Debian's versioned directory.
fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .collect::<Vec<_>>()
    });
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name));
    on_path.chain(debian).find(|p| p.is_file())
}

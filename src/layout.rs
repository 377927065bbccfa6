//! Where things live in a data directory: the one place that knows the file and folder names of the
//! server's (`ServerDir`) and the agent's (`AgentDir`) data directories, and where they default to.
//! Everything else asks these types for a path instead of joining names itself.

use std::path::{Path, PathBuf};

/// `$XDG_DATA_HOME/<name>`, else `~/.local/share/<name>`.
fn default_under_xdg(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(name)
}

/// The server's data directory (`snapq serve --data-dir`, default `$XDG_DATA_HOME/snapq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDir(PathBuf);

impl ServerDir {
    pub fn new(root: impl Into<PathBuf>) -> ServerDir {
        ServerDir(root.into())
    }

    /// `$XDG_DATA_HOME/snapq`.
    pub fn default_root() -> PathBuf {
        default_under_xdg("snapq")
    }

    pub fn root(&self) -> &Path {
        &self.0
    }
    pub fn catalog(&self) -> PathBuf {
        self.0.join("catalog.db")
    }
    pub fn queue(&self) -> PathBuf {
        self.0.join("queue.db")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.0.join("snapshots")
    }
    /// The upload spool.
    pub fn incoming(&self) -> PathBuf {
        self.0.join("incoming")
    }
    pub fn quarantine(&self) -> PathBuf {
        self.0.join("quarantine")
    }
    /// Exports, unless the snapshots are on a store of their own (see [`ExportDir`]).
    pub fn exports(&self) -> PathBuf {
        self.0.join("exports")
    }
    /// The default drop folder.
    pub fn watch(&self) -> PathBuf {
        self.0.join("watch")
    }
    /// The server's certificate pair.
    pub fn certs(&self) -> PathBuf {
        self.0.join("certs")
    }
    /// The bootstrap admin's token, which the local CLI reads when given none.
    pub fn admin_token(&self) -> PathBuf {
        self.0.join("admin.token")
    }
    /// What agents enroll with: a secret and the pin of the server's certificate.
    pub fn enroll_token(&self) -> PathBuf {
        self.0.join("enroll.token")
    }
    /// The key endpoint credentials derive from (never inside `catalog.db`).
    pub fn agents_key(&self) -> PathBuf {
        self.0.join("agents.key")
    }
    /// Where `serve --demo` keeps its simulated endpoints.
    pub fn demo(&self) -> PathBuf {
        self.0.join("demo")
    }
}

/// Where exports are written: `DATA_DIR/exports`, or `STORE/.exports` when the snapshots are on a
/// store of their own (`--store`), so that any node serves and deletes what another wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDir(PathBuf);

impl ExportDir {
    pub fn new(dir: impl Into<PathBuf>) -> ExportDir {
        ExportDir(dir.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// An export's file name: `export-ID.EXT`.
    pub fn file_name(id: i64, extension: &str) -> String {
        format!("export-{id}.{extension}")
    }
    /// Where an export is written before it is complete: `.NAME.partial`.
    pub fn partial(&self, name: &str) -> PathBuf {
        self.0.join(format!(".{name}.partial"))
    }
    /// Whether `path` is an export's partial file (one a crash may have left).
    pub fn is_partial(&self, path: &Path) -> bool {
        path.parent() == Some(self.0.as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".export-") && n.ends_with(".partial"))
    }
}

/// An agent's data directory (`snapq agent --data-dir`, default `$XDG_DATA_HOME/snapq-agent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDir(PathBuf);

impl AgentDir {
    pub fn new(root: impl Into<PathBuf>) -> AgentDir {
        AgentDir(root.into())
    }

    /// `$XDG_DATA_HOME/snapq-agent`.
    pub fn default_root() -> PathBuf {
        default_under_xdg("snapq-agent")
    }

    pub fn root(&self) -> &Path {
        &self.0
    }
    /// The recorder database.
    pub fn monitor_db(&self) -> PathBuf {
        self.0.join("monitor.db")
    }
    /// The local bearer token of the endpoint API (for calling the agent directly).
    pub fn agent_token(&self) -> PathBuf {
        self.0.join("agent.token")
    }
    /// The credential the server issued at enrollment (heartbeats and the server's calls).
    pub fn server_credential(&self) -> PathBuf {
        self.0.join("server.credential")
    }
    /// The endpoint API's certificate pair.
    pub fn certs(&self) -> PathBuf {
        self.0.join("certs")
    }
    /// Staged snapshot copies.
    pub fn staged(&self) -> PathBuf {
        self.0.join("staged")
    }
}

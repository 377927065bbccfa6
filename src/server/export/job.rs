//! The `export` job: run a filtered query on a stored snapshot, a live endpoint or the evidence
//! store and write every row it selects to a file under `exports/`.
//!
//! The story of one attempt: read the export's row (source, format, filters; a deleted export is
//! done), mark it `running`, write the rows to a hidden `.export-N.EXT.partial` beside the final
//! name, fsync it, rename it to `export-N.EXT` and record it `complete` with its rows and bytes.
//! Rows stream from the source to the file one at a time (a snapshot is read on a blocking thread
//! through one statement per event type; a live endpoint page by page with its cursor; evidence
//! page by page by id), so memory does not grow with the row count. A cancel interrupts the query
//! and removes the partial file; a crash leaves a partial that the next attempt (or the server's
//! start) removes; a rerun writes the whole file again. Failures end in the catalog through the
//! server's terminal hook (`record_terminal`), never here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapq_core::catalog::{Catalog, Evidence};
use snapq_core::query::EventQuery;
use snapq_core::schema::{self, Table};
use snapq_jobs::handlers::Services;
use snapq_jobs::{JobArgs, JobContext, JobError, JobKind, ResultExt};

use super::format::{Cell, Format, Sink};
use super::{ExportFilters, ExportSource};
use crate::layout::ExportDir;

/// What the export workers need besides the services.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub dir: ExportDir,
    /// `--export-max-rows-per-sec`.
    pub max_rows_per_sec: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportArgs {
    pub export_id: i64,
}

impl JobArgs for ExportArgs {
    const KIND: JobKind = JobKind::Export;
}

/// How often progress reaches the job and the catalog.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Evidence rows read from the catalog at a time.
const EVIDENCE_PAGE: u32 = 1_000;

/// Rows written so far and whether the job was told to stop, shared with the blocking writer.
#[derive(Default)]
struct Shared {
    rows: AtomicU64,
    stop: AtomicBool,
    pace: Option<Pace>,
    /// Interrupts the snapshot statement running on the blocking thread.
    interrupt: std::sync::Mutex<Option<rusqlite::InterruptHandle>>,
}

impl Shared {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = &*self.interrupt.lock().expect("interrupt lock") {
            handle.interrupt();
        }
    }

    /// Records `rows` written; waits as the rate limit asks; false once the job must stop.
    fn written(&self, rows: u64) -> bool {
        self.rows.store(rows, Ordering::Relaxed);
        if let Some(pace) = &self.pace {
            pace.wait_for(rows, &self.stop);
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// A rows-per-second limit, measured from the export's start.
struct Pace {
    per_sec: u64,
    start: std::time::Instant,
}

impl Pace {
    fn new(per_sec: u64) -> Pace {
        Pace {
            per_sec: per_sec.max(1),
            start: std::time::Instant::now(),
        }
    }

    /// Sleeps (on the blocking thread) until `rows` are due, waking early for a stop.
    fn wait_for(&self, rows: u64, stop: &AtomicBool) {
        let due = Duration::from_secs_f64(rows as f64 / self.per_sec as f64);
        while self.start.elapsed() < due && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((due - self.start.elapsed()).min(Duration::from_millis(20)));
        }
    }
}

/// Rows between progress updates (and rate-limit and cancel checks) of the blocking writer.
const CHECK_EVERY: u64 = 1024;

/// A partial file that is removed unless the export completes.
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tracing::instrument(skip(svc, settings, ctx), fields(job_id = %ctx.id(), export = args.export_id))]
pub async fn run(
    svc: Arc<Services>,
    settings: ExportSettings,
    args: ExportArgs,
    ctx: JobContext,
) -> Result<(), JobError> {
    let dir = &settings.dir;
    let catalog = &svc.catalog;
    let Some(export) = catalog.export(args.export_id).await.transient()? else {
        // Deleted before it ran: nothing to write.
        return Ok(());
    };
    let format: Format = export.format.parse().map_err(JobError::permanent)?;
    let source: ExportSource = serde_json::from_value(export.source.clone()).permanent()?;
    let filters: ExportFilters = serde_json::from_value(export.filters.clone()).permanent()?;
    let file_name = ExportDir::file_name(export.id, format.extension());
    let path = dir.path().join(&file_name);
    if export.state == "complete" && path.exists() {
        return Ok(());
    }
    catalog.start_export(export.id).await.transient()?;
    let partial_path = dir.partial(&file_name);
    let _ = std::fs::remove_file(&partial_path);
    let partial = Partial(partial_path.clone());

    let shared = Arc::new(Shared {
        pace: settings.max_rows_per_sec.map(Pace::new),
        ..Shared::default()
    });
    let work = write_rows(&svc, &source, &filters, format, &partial_path, &shared);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut reported = 0;
    let outcome = loop {
        tokio::select! {
            done = &mut work => break done,
            _ = ctx.cancelled(), if !shared.stop.load(Ordering::Relaxed) => shared.stop(),
            _ = tick.tick() => {
                let rows = shared.rows.load(Ordering::Relaxed);
                if rows != reported {
                    reported = rows;
                    ctx.progress(rows, 0, Some("rows"));
                    if let Err(e) = catalog.set_export_rows(export.id, rows).await {
                        tracing::debug!(error = %e, "could not record export progress");
                    }
                }
            }
        }
    };
    if ctx.is_cancelled() || shared.stop.load(Ordering::Relaxed) {
        return Err(JobError::permanent("cancelled"));
    }
    let (rows, bytes) = outcome?;
    // Complete and durable: publish it under its final name.
    std::fs::rename(&partial_path, &path)
        .with_context_path(&path)
        .transient()?;
    std::mem::forget(partial);
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    ctx.progress(rows, rows, Some("rows"));
    catalog
        .complete_export(export.id, rows, bytes, &file_name)
        .await
        .transient()?;
    // Deleted while it ran (the delete cancels, but the rename may have won): no orphan file.
    if catalog.export(export.id).await.transient()?.is_none() {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    }
    tracing::debug!(rows, bytes, file = %file_name, "export written");
    Ok(())
}

trait PathContext<T> {
    fn with_context_path(self, path: &Path) -> Result<T, String>;
}

impl<T> PathContext<T> for std::io::Result<T> {
    fn with_context_path(self, path: &Path) -> Result<T, String> {
        self.map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Writes every row of `source` through the filters into `partial`: (rows, bytes).
async fn write_rows(
    svc: &Services,
    source: &ExportSource,
    filters: &ExportFilters,
    format: Format,
    partial: &Path,
    shared: &Arc<Shared>,
) -> Result<(u64, u64), JobError> {
    match source {
        ExportSource::Snapshot { id, .. } => {
            let snap = svc
                .catalog
                .snapshot(*id)
                .await
                .transient()?
                .ok_or_else(|| {
                    JobError::permanent(format!("snapshot {id} was deleted before the export ran"))
                })?;
            let name: snapq_core::SnapshotName = snap
                .name
                .as_deref()
                .filter(|_| snap.state == "complete")
                .ok_or_else(|| JobError::permanent(format!("snapshot {id} is not complete")))?
                .parse()
                .permanent()?;
            let db = svc.store.path(&name);
            let queries = filters.queries().map_err(JobError::permanent)?;
            let (partial, shared) = (partial.to_owned(), shared.clone());
            tokio::task::spawn_blocking(move || {
                export_snapshot(&db, &queries, format, &partial, &shared)
            })
            .await
            .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
        }
        ExportSource::Evidence { hostnames, .. } => {
            export_evidence(&svc.catalog, hostnames, filters, format, partial, shared).await
        }
        ExportSource::Endpoint { hostname, .. } => {
            export_endpoint(svc, hostname, filters, format, partial, shared).await
        }
    }
}

/// The columns of an event export: `type`, then every column of the chosen tables, each once,
/// in schema order.
fn event_columns(tables: &[&'static Table]) -> Vec<&'static str> {
    let mut cols = vec!["type"];
    for t in tables {
        for (c, _) in t.all_columns() {
            if !cols.contains(&c) {
                cols.push(c);
            }
        }
    }
    cols
}

/// Where each of a table's columns goes in the export's row.
fn positions(table: &Table, columns: &[&str]) -> Vec<usize> {
    table
        .all_columns()
        .map(|(c, _)| {
            columns
                .iter()
                .position(|x| *x == c)
                .expect("column in header")
        })
        .collect()
}

fn export_snapshot(
    db: &Path,
    queries: &[EventQuery],
    format: Format,
    partial: &Path,
    shared: &Shared,
) -> Result<(u64, u64), JobError> {
    let conn = crate::server::events::open_snapshot_readonly(db).permanent()?;
    // A cancel interrupts a statement, also one still looking for its first row.
    *shared.interrupt.lock().expect("interrupt lock") = Some(conn.get_interrupt_handle());
    let tables: Vec<&Table> = queries.iter().map(|q| q.table()).collect();
    let columns = event_columns(&tables);
    let mut sink = Sink::create(format, partial, &columns).transient()?;
    // One allocation for every row's cells (they borrow from the row, so the buffer is handed
    // back empty between rows).
    let mut spare: Vec<Cell<'static>> = Vec::with_capacity(columns.len());
    let mut rows = 0u64;
    for q in queries {
        let table = q.table();
        let at = positions(table, &columns);
        let (sql, params) = q.stream_sql().permanent()?;
        let mut stmt = conn.prepare(&sql).map_err(|e| stopped_or(shared, e))?;
        let mut result = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(|e| stopped_or(shared, e))?;
        while let Some(row) = result.next().map_err(|e| stopped_or(shared, e))? {
            let mut cells = reuse(std::mem::take(&mut spare));
            cells.resize(columns.len(), Cell::Null);
            cells[0] = Cell::Text(table.name);
            for (i, pos) in at.iter().enumerate() {
                cells[*pos] = row.get_ref(i).map(Cell::from).unwrap_or(Cell::Null);
            }
            sink.row(&cells).transient()?;
            spare = reuse(cells);
            rows += 1;
            if rows.is_multiple_of(CHECK_EVERY) && !shared.written(rows) {
                return Err(JobError::permanent("cancelled"));
            }
        }
    }
    shared.rows.store(rows, Ordering::Relaxed);
    let bytes = sink.finish().transient()?;
    Ok((rows, bytes))
}

/// An empty vector of cells of any lifetime, in the allocation of `v` (collecting an emptied
/// vector into one of the same layout reuses its buffer).
fn reuse<'a>(mut v: Vec<Cell<'_>>) -> Vec<Cell<'a>> {
    v.clear();
    v.into_iter().map(|_| Cell::Null).collect()
}

/// A statement interrupted by a cancel says so; any other error of a snapshot is permanent.
fn stopped_or(shared: &Shared, e: rusqlite::Error) -> JobError {
    if shared.stop.load(Ordering::Relaxed) {
        JobError::permanent("cancelled")
    } else {
        JobError::permanent(format!("reading the snapshot: {e}"))
    }
}

/// Events per page asked of a live agent (a page is held in memory while it is written).
const LIVE_PAGE: u32 = 2_000;

/// Pages through the agent's `/v1/events` with its cursor, one event type after another. Rows
/// recorded after the export started are left out (an `until` of the start time unless the
/// filter has one), so a busy endpoint cannot keep the export chasing its newest events.
async fn export_endpoint(
    svc: &Services,
    hostname: &str,
    filters: &ExportFilters,
    format: Format,
    partial: &Path,
    shared: &Arc<Shared>,
) -> Result<(u64, u64), JobError> {
    let queries = filters.queries().map_err(JobError::permanent)?;
    let endpoint = svc
        .catalog
        .endpoint(hostname)
        .await
        .transient()?
        .ok_or_else(|| JobError::permanent(format!("endpoint {hostname} is no longer known")))?;
    let agent = svc.agents.client(&endpoint).permanent()?;
    let until = filters
        .until
        .clone()
        .unwrap_or_else(|| (snapq_core::catalog::now_ms() + 1).to_string());
    let tables: Vec<&Table> = queries.iter().map(|q| q.table()).collect();
    let columns = event_columns(&tables);
    let header: Vec<&'static str> = columns.clone();
    let partial = partial.to_owned();
    let mut sink = Some(
        tokio::task::spawn_blocking(move || Sink::create(format, &partial, &header))
            .await
            .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
            .transient()?,
    );
    let mut rows = 0u64;
    for table in tables {
        let mut cursor: Option<String> = None;
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return Err(JobError::permanent("cancelled"));
            }
            let params = crate::agent::api::EventParams {
                event_type: Some(table.name.to_owned()),
                wheres: filters.wheres.clone(),
                any: filters.any,
                since: filters.since.clone(),
                until: Some(until.clone()),
                sort: Some(filters.sort().to_owned()),
                limit: Some(LIVE_PAGE.to_string()),
                cursor: cursor.take(),
            };
            let page = agent.events(&params.to_query_string()).await.map_err(|e| {
                let message = format!("reading events of {hostname}: {e}");
                if e.is_transient() {
                    JobError::transient(message)
                } else {
                    JobError::permanent(message)
                }
            })?;
            let at = positions(table, &columns);
            let n = columns.len();
            let mut s = sink.take().expect("the sink is back after each page");
            let (shared2, before) = (shared.clone(), rows);
            let events = page.events;
            let (s, written) = tokio::task::spawn_blocking(move || {
                let mut written = 0u64;
                let mut cells = Vec::with_capacity(n);
                for event in &events {
                    cells.clear();
                    cells.resize(n, Cell::Null);
                    cells[0] = Cell::Text(table.name);
                    for ((name, _), pos) in table.all_columns().zip(&at) {
                        cells[*pos] = event.get(name).map(Cell::from).unwrap_or(Cell::Null);
                    }
                    s.row(&cells)?;
                    written += 1;
                    shared2.written(before + written);
                }
                Ok::<_, std::io::Error>((s, written))
            })
            .await
            .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
            .transient()?;
            sink = Some(s);
            rows += written;
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
    }
    let sink = sink.expect("the sink is back after each page");
    let bytes = tokio::task::spawn_blocking(move || sink.finish())
        .await
        .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
        .transient()?;
    Ok((rows, bytes))
}

/// The leading columns of an evidence export, before the event's own.
const EVIDENCE_COLUMNS: [&str; 7] = [
    "evidence_id",
    "endpoint",
    "type",
    "saved_by",
    "saved_at",
    "note",
    "source",
];

async fn export_evidence(
    catalog: &Catalog,
    hostnames: &[String],
    filters: &ExportFilters,
    format: Format,
    partial: &Path,
    shared: &Arc<Shared>,
) -> Result<(u64, u64), JobError> {
    let tables = filters.tables().map_err(JobError::permanent)?;
    let (since, until) = filters.window().map_err(JobError::permanent)?;
    // Conditions, `any` or a sort: the engine's own query decides (see `filter_evidence`).
    let queries = if !filters.wheres.is_empty() || filters.any || filters.sort.is_some() {
        Some(filters.queries().map_err(JobError::permanent)?)
    } else {
        None
    };
    let tables: Vec<&Table> = match &queries {
        Some(queries) => queries.iter().map(|q| q.table()).collect(),
        None => tables,
    };
    let mut columns: Vec<&str> = EVIDENCE_COLUMNS.to_vec();
    for c in event_columns(&tables).into_iter().skip(1) {
        columns.push(c);
    }
    let columns: Vec<String> = columns.into_iter().map(str::to_owned).collect();
    let partial = partial.to_owned();
    let header: Vec<&str> = columns.iter().map(String::as_str).collect();
    let sink = Sink::create(format, &partial, &header).transient()?;
    let mut sink = Some(sink);
    let mut after = 0;
    let mut rows = 0u64;
    let mut selected = Vec::new();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Err(JobError::permanent("cancelled"));
        }
        let page = catalog
            .evidence_page(hostnames, after, EVIDENCE_PAGE)
            .await
            .transient()?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let keep: Vec<_> = page
            .into_iter()
            .filter(|e| tables.iter().any(|t| t.name == e.event_type))
            .filter(|e| since.is_none_or(|s| e.event_ts.is_some_and(|ts| ts >= s)))
            .filter(|e| until.is_none_or(|u| e.event_ts.is_some_and(|ts| ts < u)))
            .collect();
        if queries.is_some() {
            // Saved evidence is what people picked by hand: small enough to filter at once.
            selected.extend(keep);
            continue;
        }
        let s = sink.take().expect("the sink is back after each page");
        let (s, written) = write_evidence(s, columns.clone(), keep, shared.clone(), rows).await?;
        sink = Some(s);
        rows += written;
        shared.rows.store(rows, Ordering::Relaxed);
    }
    if let Some(queries) = queries {
        let chosen = tokio::task::spawn_blocking(move || filter_evidence(&queries, selected))
            .await
            .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
            .map_err(|e| JobError::permanent(format!("filtering the evidence: {e}")))?;
        let s = sink.take().expect("the sink is back after each page");
        let (s, written) = write_evidence(s, columns.clone(), chosen, shared.clone(), rows).await?;
        sink = Some(s);
        rows += written;
        shared.rows.store(rows, Ordering::Relaxed);
    }
    let sink = sink.expect("the sink is back after each page");
    let bytes = tokio::task::spawn_blocking(move || sink.finish())
        .await
        .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
        .transient()?;
    Ok((rows, bytes))
}

/// Writes evidence rows (the evidence columns, then the event's own) on a blocking thread;
/// hands the sink back with how many rows it wrote.
async fn write_evidence(
    mut s: Sink,
    columns: Vec<String>,
    keep: Vec<Evidence>,
    shared: Arc<Shared>,
    before: u64,
) -> Result<(Sink, u64), JobError> {
    tokio::task::spawn_blocking(move || {
        let mut written = 0u64;
        for e in &keep {
            let saved_at = chrono::DateTime::from_timestamp_millis(e.saved_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default();
            let source = format!("{} {}", e.source_kind, e.source_id);
            let mut cells = Vec::with_capacity(columns.len());
            cells.extend([
                Cell::Int(e.id),
                Cell::Text(&e.hostname),
                Cell::Text(&e.event_type),
                Cell::Text(&e.saved_by),
                Cell::Text(&saved_at),
                e.note.as_deref().map(Cell::Text).unwrap_or(Cell::Null),
                Cell::Text(&source),
            ]);
            for c in &columns[EVIDENCE_COLUMNS.len()..] {
                cells.push(e.event.get(c).map(Cell::from).unwrap_or(Cell::Null));
            }
            s.row(&cells)?;
            written += 1;
            shared.written(before + written);
        }
        Ok::<_, std::io::Error>((s, written))
    })
    .await
    .map_err(|e| JobError::transient(format!("the export thread stopped: {e}")))?
    .transient()
}

/// The evidence rows that `queries` select, in each query's order, type after type. Each type's
/// rows go into an in-memory table of that type's columns (rowid = position in `evidence`) and
/// the engine's own SQL selects them, so conditions, `any`, time and sort mean exactly what they
/// mean on a snapshot: there is no second filter evaluator.
fn filter_evidence(
    queries: &[EventQuery],
    evidence: Vec<Evidence>,
) -> Result<Vec<Evidence>, String> {
    use rusqlite::types::Value as Sql;
    let conn = rusqlite::Connection::open_in_memory().map_err(|e| e.to_string())?;
    let mut pool: Vec<Option<Evidence>> = evidence.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for q in queries {
        let table = q.table();
        let columns: Vec<&str> = table.all_columns().map(|(c, _)| c).collect();
        conn.execute_batch(&format!(
            "CREATE TABLE {} ({})",
            table.name,
            table.column_list()
        ))
        .map_err(|e| e.to_string())?;
        let marks = vec!["?"; columns.len() + 1].join(", ");
        let mut insert = conn
            .prepare(&format!(
                "INSERT INTO {} (rowid, {}) VALUES ({marks})",
                table.name,
                table.column_list()
            ))
            .map_err(|e| e.to_string())?;
        for (i, e) in pool.iter().enumerate() {
            let Some(e) = e.as_ref().filter(|e| e.event_type == table.name) else {
                continue;
            };
            let mut values = vec![Sql::Integer(i as i64 + 1)];
            for c in &columns {
                values.push(match e.event.get(*c) {
                    Some(serde_json::Value::Number(n)) => n
                        .as_i64()
                        .map(Sql::Integer)
                        .or_else(|| n.as_f64().map(Sql::Real))
                        .unwrap_or(Sql::Null),
                    Some(serde_json::Value::String(t)) => Sql::Text(t.clone()),
                    Some(serde_json::Value::Bool(b)) => Sql::Integer(i64::from(*b)),
                    Some(other) if !other.is_null() => Sql::Text(other.to_string()),
                    _ => Sql::Null,
                });
            }
            insert
                .execute(rusqlite::params_from_iter(values))
                .map_err(|e| e.to_string())?;
        }
        let (sql, params) = q.stream_sql().map_err(|e| e.to_string())?;
        let sql = sql
            .strip_prefix("SELECT ")
            .map(|rest| format!("SELECT rowid, {rest}"))
            .ok_or_else(|| format!("unexpected event query: {sql}"))?;
        let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(|e| e.to_string())?;
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let at: i64 = row.get(0).map_err(|e| e.to_string())?;
            if let Some(e) = pool.get_mut((at - 1) as usize).and_then(Option::take) {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// Every event table, for exports that name no type.
pub fn all_tables() -> Vec<&'static Table> {
    schema::event_tables().collect()
}

//! Export jobs as the catalog remembers them: what was asked (source, format, filters), how far
//! the job got, and the file it wrote under `exports/`.

use serde::Serialize;
use sqlx::FromRow;

use super::db::{JsonText, run};
use super::{Catalog, Result, now_ms};

/// An export's life: `queued → running → complete`, or `failed` / `cancelled` (no file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportState {
    Queued,
    Running,
    Complete,
    Failed,
    Cancelled,
}

impl ExportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportState::Queued => "queued",
            ExportState::Running => "running",
            ExportState::Complete => "complete",
            ExportState::Failed => "failed",
            ExportState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct Export {
    pub id: i64,
    pub job_id: Option<String>,
    /// The endpoint the export belongs to; `None` for an evidence export over several.
    pub hostname: Option<String>,
    #[sqlx(try_from = "JsonText<serde_json::Value>")]
    pub source: serde_json::Value,
    pub format: String,
    #[sqlx(try_from = "JsonText<serde_json::Value>")]
    pub filters: serde_json::Value,
    pub state: String,
    pub rows: i64,
    pub bytes: Option<i64>,
    pub file_name: Option<String>,
    pub error: Option<String>,
    pub requested_by: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

/// What an export request asks for.
#[derive(Debug, Clone)]
pub struct NewExport {
    pub hostname: Option<String>,
    pub source: serde_json::Value,
    pub format: String,
    pub filters: serde_json::Value,
    pub requested_by: String,
}

const COLUMNS: &str = "id, job_id, hostname, source, format, filters, state, rows, bytes, file_name, \
    error, requested_by, created_ms, finished_ms";

impl Catalog {
    pub async fn create_export(&self, new: &NewExport) -> Result<i64> {
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
            "INSERT INTO exports (hostname, source, format, filters, state, requested_by, created_ms)
             VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6) RETURNING id",
            )
            .bind(&new.hostname)
            .bind(new.source.to_string())
            .bind(&new.format)
            .bind(new.filters.to_string())
            .bind(&new.requested_by)
            .bind(now_ms()),
            fetch_one
        )?)
    }

    pub async fn set_export_job(&self, id: i64, job_id: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE exports SET job_id = ?2 WHERE id = ?1")
                .bind(id)
                .bind(job_id),
            execute
        )?;
        Ok(())
    }

    /// An attempt starts (again): no file, no error, no rows yet.
    pub async fn start_export(&self, id: i64) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query(
                "UPDATE exports SET state = 'running', rows = 0, bytes = NULL, file_name = NULL,
                 error = NULL, finished_ms = NULL WHERE id = ?1",
            )
            .bind(id),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn set_export_rows(&self, id: i64, rows: u64) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE exports SET rows = ?2 WHERE id = ?1 AND state = 'running'")
                .bind(id)
                .bind(rows as i64),
            execute
        )?;
        Ok(())
    }

    pub async fn complete_export(
        &self,
        id: i64,
        rows: u64,
        bytes: u64,
        file_name: &str,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE exports SET state = 'complete', rows = ?2, bytes = ?3, file_name = ?4,
                 error = NULL, finished_ms = ?5 WHERE id = ?1",
            )
            .bind(id)
            .bind(rows as i64)
            .bind(bytes as i64)
            .bind(file_name)
            .bind(now_ms()),
            execute
        )?;
        Ok(())
    }

    /// Ends an export that did not complete (`failed` or `cancelled`) with the reason; an export
    /// that already completed is left alone. True if it changed.
    pub async fn end_unfinished_export(
        &self,
        id: i64,
        state: ExportState,
        reason: &str,
    ) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query(
                "UPDATE exports SET state = ?2, error = ?3, finished_ms = ?4
             WHERE id = ?1 AND state IN ('queued', 'running')",
            )
            .bind(id)
            .bind(state.as_str())
            .bind(reason)
            .bind(now_ms()),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn export(&self, id: i64) -> Result<Option<Export>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Export>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM exports WHERE id = ?1"
            )))
            .bind(id),
            fetch_optional
        )?)
    }

    /// Every export, newest first.
    pub async fn exports(&self) -> Result<Vec<Export>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Export>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM exports ORDER BY created_ms DESC, id DESC"
            ))),
            fetch_all
        )?)
    }

    /// Exports that finished before `cutoff_ms` (retention).
    pub async fn exports_finished_before(&self, cutoff_ms: i64) -> Result<Vec<Export>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Export>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM exports WHERE finished_ms IS NOT NULL AND finished_ms < ?1"
            )))
            .bind(cutoff_ms),
            fetch_all
        )?)
    }

    pub async fn delete_export(&self, id: i64) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query("DELETE FROM exports WHERE id = ?1").bind(id),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }
}

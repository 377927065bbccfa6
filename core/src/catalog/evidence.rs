//! Saved evidence: events copied into the catalog with their endpoint, their source and who saved
//! them and why. Rows are keyed by hostname, not by a foreign key, so evidence outlives the
//! connection, the snapshot and the endpoint's enrollment.

use serde::Serialize;
use sqlx::FromRow;

use super::db::{JsonText, run, run_tx, storable};
use super::{Catalog, Result, now_ms};

/// One saved event.
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct Evidence {
    pub id: i64,
    pub hostname: String,
    pub event_type: String,
    pub event_id: i64,
    pub event_ts: Option<i64>,
    /// Every column of the event, keyed by column name.
    #[sqlx(try_from = "JsonText<serde_json::Value>")]
    pub event: serde_json::Value,
    /// `snapshot` or `endpoint`.
    pub source_kind: String,
    /// The snapshot id or the endpoint's hostname.
    pub source_id: String,
    pub connection_id: Option<String>,
    pub saved_by: String,
    pub saved_ms: i64,
    pub note: Option<String>,
}

/// An event about to be saved.
#[derive(Debug, Clone)]
pub struct NewEvidence {
    pub hostname: String,
    pub event_type: String,
    pub event_id: i64,
    pub event_ts: Option<i64>,
    pub event: serde_json::Value,
    pub source_kind: String,
    pub source_id: String,
    pub connection_id: Option<String>,
    pub note: Option<String>,
}

const COLUMNS: &str = "id, hostname, event_type, event_id, event_ts, event, source_kind, source_id, \
    connection_id, saved_by, saved_ms, note";

impl Catalog {
    /// Saves events as evidence, all or none; their ids in order.
    pub async fn save_evidence(&self, items: &[NewEvidence], saved_by: &str) -> Result<Vec<i64>> {
        let mut tx = self.write_tx().await?;
        let now = now_ms();
        let mut ids = Vec::with_capacity(items.len());
        for item in items {
            let id: i64 = run_tx!(
                &mut tx,
                sqlx::query_scalar(
                "INSERT INTO evidence (hostname, event_type, event_id, event_ts, event, source_kind,
                     source_id, connection_id, saved_by, saved_ms, note)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING id",
                )
                .bind(&item.hostname)
                .bind(&item.event_type)
                .bind(item.event_id)
                .bind(item.event_ts)
                .bind(item.event.to_string())
                .bind(&item.source_kind)
                .bind(storable(&item.source_id).into_owned())
                .bind(&item.connection_id)
                .bind(saved_by)
                .bind(now)
                .bind(item.note.as_deref().map(|n| storable(n).into_owned())),
                fetch_one
            )?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Evidence, newest first, optionally of one endpoint.
    pub async fn evidence_list(&self, hostname: Option<&str>) -> Result<Vec<Evidence>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Evidence>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM evidence WHERE ?1 IS NULL OR hostname = ?1
             ORDER BY saved_ms DESC, id DESC"
            )))
            .bind(hostname),
            fetch_all
        )?)
    }

    /// Up to `limit` evidence rows of these endpoints with ids above `after`, by id: how an
    /// export walks the store without holding it in memory.
    pub async fn evidence_page(
        &self,
        hostnames: &[String],
        after: i64,
        limit: u32,
    ) -> Result<Vec<Evidence>> {
        let hosts = serde_json::to_string(hostnames).expect("strings serialize");
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Evidence>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM evidence
             WHERE id > ?1 AND hostname IN (SELECT value FROM json_each(?2))
             ORDER BY id LIMIT ?3"
            )))
            .bind(after)
            .bind(hosts)
            .bind(i64::from(limit)),
            fetch_all
        )?)
    }

    pub async fn evidence(&self, id: i64) -> Result<Option<Evidence>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Evidence>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM evidence WHERE id = ?1"
            )))
            .bind(id),
            fetch_optional
        )?)
    }

    /// Deletes one evidence item; false if it was already gone.
    pub async fn delete_evidence(&self, id: i64) -> Result<bool> {
        let done = run!(
            &self.pool,
            sqlx::query("DELETE FROM evidence WHERE id = ?1").bind(id),
            execute
        )?;
        Ok(done.rows_affected() > 0)
    }
}

//! The catalog's fleet rows: batches (one capture per endpoint of a computer group), their
//! per-endpoint items, cron schedules, and snapshots marked to keep.
//!
//! A batch fixes its endpoints when it starts (`batch_items`); each item goes `queued →
//! running → done | failed`, or `skipped` with a reason. An item gets its snapshot row in the
//! same transaction that marks it running ([`Catalog::dispatch_item`]), and its capture job is
//! enqueued under the key `fleet:<batch>:<endpoint>:<snapshot>`, so a crash anywhere in between
//! can never capture an endpoint twice for one batch. A capture that failed because its endpoint
//! went offline puts the item back to queued ([`Catalog::requeue_item`]): it waits for the
//! endpoint again, and its next capture has a new snapshot row and so a new key. A schedule's tick is one batch row, unique by
//! (schedule, tick time), also when the tick was skipped.

use serde::Serialize;
use sqlx::FromRow;

use crate::catalog::db::{run, run_tx};
use crate::catalog::{Catalog, Origin, Result, now_ms};

/// A batch's life: `running` (or `paused`) until it ends `complete`, `complete_with_failures`,
/// `expired` or `cancelled`; a schedule tick that could not start is `skipped`.
pub mod state {
    pub const RUNNING: &str = "running";
    pub const PAUSED: &str = "paused";
    pub const COMPLETE: &str = "complete";
    pub const COMPLETE_WITH_FAILURES: &str = "complete_with_failures";
    pub const EXPIRED: &str = "expired";
    pub const CANCELLED: &str = "cancelled";
    pub const SKIPPED: &str = "skipped";

    pub fn is_finished(state: &str) -> bool {
        !matches!(state, RUNNING | PAUSED)
    }
}

/// An item's life.
pub mod item {
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const DONE: &str = "done";
    pub const FAILED: &str = "failed";
    pub const SKIPPED: &str = "skipped";
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct Batch {
    pub id: i64,
    pub group_name: String,
    pub schedule_id: Option<i64>,
    pub schedule_name: Option<String>,
    pub tick_ms: Option<i64>,
    pub state: String,
    pub reason: Option<String>,
    pub max_concurrency: i64,
    pub expire_at_ms: i64,
    pub failure_limit: Option<String>,
    pub resolved: bool,
    pub cancel_requested: bool,
    pub stop_state: Option<String>,
    pub failure_base: i64,
    pub job_id: Option<String>,
    pub requested_by: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

impl Batch {
    pub fn is_finished(&self) -> bool {
        state::is_finished(&self.state)
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct BatchItem {
    pub batch_id: i64,
    pub endpoint_id: i64,
    pub hostname: String,
    pub state: String,
    pub snapshot_id: Option<i64>,
    pub job_id: Option<String>,
    pub error: Option<String>,
    pub bytes: Option<i64>,
}

/// Counts of a batch's items by state, and the bytes its finished captures stored.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct BatchTotals {
    pub total: u64,
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub skipped: u64,
    pub bytes: u64,
}

/// What a new batch is.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub group_name: String,
    /// (schedule id, schedule name, tick time in ms) for a scheduled batch.
    pub schedule: Option<(i64, String, i64)>,
    pub max_concurrency: u32,
    pub expire_at_ms: i64,
    pub failure_limit: Option<String>,
    pub requested_by: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct Schedule {
    pub id: i64,
    pub name: String,
    pub cron: String,
    pub tz: String,
    pub group_name: String,
    pub max_concurrency: i64,
    pub expire_secs: i64,
    pub failure_limit: Option<String>,
    pub keep_last: Option<i64>,
    pub keep_days: Option<i64>,
    pub paused: bool,
    pub created_by: String,
    pub created_ms: i64,
    pub last_tick_ms: Option<i64>,
}

/// A running queued item with what the dispatcher needs to know about its endpoint now.
#[derive(Debug, Clone, FromRow)]
pub struct QueuedItem {
    pub endpoint_id: i64,
    pub hostname: String,
    /// `None`: the endpoint was forgotten since the batch started.
    pub last_seen_ms: Option<i64>,
    pub api_url: Option<String>,
    pub known: bool,
    /// What happened to an earlier capture of it in this batch, if any.
    pub error: Option<String>,
}

/// A running item whose capture ended (its snapshot is complete or failed), with its
/// endpoint's liveness now.
#[derive(Debug, Clone, FromRow)]
pub struct SettledItem {
    pub endpoint_id: i64,
    pub snapshot_state: String,
    pub size: Option<i64>,
    pub error: Option<String>,
    pub last_seen_ms: Option<i64>,
    pub api_url: Option<String>,
}

const BATCH_COLUMNS: &str = "id, group_name, schedule_id, schedule_name, tick_ms, state, reason, \
    max_concurrency, expire_at_ms, failure_limit, resolved, cancel_requested, stop_state, \
    failure_base, job_id, requested_by, created_ms, finished_ms";

impl Catalog {
    // --- batches -------------------------------------------------------------------------------

    /// Creates a batch in `state` (`running`, or `skipped` with `reason` for a schedule tick that
    /// could not start). `None` when this schedule's tick already has its batch.
    pub async fn create_batch(
        &self,
        new: &NewBatch,
        state: &str,
        reason: Option<&str>,
    ) -> Result<Option<i64>> {
        let (schedule_id, schedule_name, tick_ms) = match &new.schedule {
            Some((id, name, tick)) => (Some(*id), Some(name.as_str()), Some(*tick)),
            None => (None, None, None),
        };
        let now = now_ms();
        let finished = state::is_finished(state).then_some(now);
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
            "INSERT INTO batches (group_name, schedule_id, schedule_name, tick_ms, state, reason,
                 max_concurrency, expire_at_ms, failure_limit, requested_by, created_ms, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (schedule_id, tick_ms) DO NOTHING RETURNING id",
            )
            .bind(&new.group_name)
            .bind(schedule_id)
            .bind(schedule_name)
            .bind(tick_ms)
            .bind(state)
            .bind(reason)
            .bind(new.max_concurrency as i64)
            .bind(new.expire_at_ms)
            .bind(&new.failure_limit)
            .bind(&new.requested_by)
            .bind(now)
            .bind(finished),
            fetch_optional
        )?)
    }

    pub async fn set_batch_job(&self, id: i64, job_id: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query("UPDATE batches SET job_id = ?2 WHERE id = ?1")
                .bind(id)
                .bind(job_id),
            execute
        )?;
        Ok(())
    }

    pub async fn batch(&self, id: i64) -> Result<Option<Batch>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Batch>(sqlx::AssertSqlSafe(format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"
            )))
            .bind(id),
            fetch_optional
        )?)
    }

    /// Batches, newest first; only unfinished ones with `active`.
    pub async fn batches(&self, active: bool, limit: u32) -> Result<Vec<Batch>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Batch>(sqlx::AssertSqlSafe(format!(
                "SELECT {BATCH_COLUMNS} FROM batches
             WHERE NOT ?1 OR state IN ('running', 'paused') ORDER BY id DESC LIMIT ?2"
            )))
            .bind(active)
            .bind(limit as i64),
            fetch_all
        )?)
    }

    /// The newest batch of a schedule, and its newest unfinished one.
    pub async fn schedule_batches(
        &self,
        schedule_id: i64,
    ) -> Result<(Option<Batch>, Option<Batch>)> {
        let last = run!(
            &self.pool,
            sqlx::query_as::<_, Batch>(sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE schedule_id = ?1 ORDER BY id DESC LIMIT 1"
            )))
            .bind(schedule_id),
            fetch_optional
        )?;
        let running = run!(
            &self.pool,
            sqlx::query_as::<_, Batch>(sqlx::AssertSqlSafe(format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE schedule_id = ?1
             AND state IN ('running', 'paused') ORDER BY id DESC LIMIT 1"
            )))
            .bind(schedule_id),
            fetch_optional
        )?;
        Ok((last, running))
    }

    /// A schedule's batches, newest first.
    pub async fn batches_of_schedule(&self, schedule_id: i64, limit: u32) -> Result<Vec<Batch>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Batch>(sqlx::AssertSqlSafe(format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE schedule_id = ?1 ORDER BY id DESC LIMIT ?2"
            )))
            .bind(schedule_id)
            .bind(limit as i64),
            fetch_all
        )?)
    }

    pub async fn batch_items(&self, batch_id: i64) -> Result<Vec<BatchItem>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, BatchItem>(
                "SELECT batch_id, endpoint_id, hostname, state, snapshot_id, job_id, error, bytes
             FROM batch_items WHERE batch_id = ?1 ORDER BY hostname",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    pub async fn batch_totals(&self, batch_id: i64) -> Result<BatchTotals> {
        let rows: Vec<(String, i64, i64)> = run!(
            &self.pool,
            sqlx::query_as(
                "SELECT state, COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM batch_items
             WHERE batch_id = ?1 GROUP BY state",
            )
            .bind(batch_id),
            fetch_all
        )?;
        let mut t = BatchTotals::default();
        for (state, n, bytes) in rows {
            let n = n.max(0) as u64;
            t.total += n;
            t.bytes += bytes.max(0) as u64;
            match state.as_str() {
                item::QUEUED => t.queued += n,
                item::RUNNING => t.running += n,
                item::DONE => t.done += n,
                item::FAILED => t.failed += n,
                _ => t.skipped += n,
            }
        }
        Ok(t)
    }

    /// Fixes the batch's endpoints (once: a second call after a crash changes nothing).
    pub async fn resolve_batch(&self, batch_id: i64, endpoints: &[(i64, String)]) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let resolved: bool = run_tx!(
            &mut tx,
            sqlx::query_scalar("SELECT resolved FROM batches WHERE id = ?1").bind(batch_id),
            fetch_one
        )?;
        if resolved {
            return Ok(());
        }
        for (id, hostname) in endpoints {
            run_tx!(
                &mut tx,
                sqlx::query(
                    "INSERT INTO batch_items (batch_id, endpoint_id, hostname, state)
                 VALUES (?1, ?2, ?3, 'queued') ON CONFLICT DO NOTHING",
                )
                .bind(batch_id)
                .bind(id)
                .bind(hostname),
                execute
            )?;
        }
        run_tx!(
            &mut tx,
            sqlx::query("UPDATE batches SET resolved = TRUE WHERE id = ?1").bind(batch_id),
            execute
        )?;
        tx.commit().await?;
        Ok(())
    }

    /// The batch's queued items with their endpoint's liveness now, by hostname.
    pub async fn queued_items(&self, batch_id: i64) -> Result<Vec<QueuedItem>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, QueuedItem>(
            "SELECT i.endpoint_id, i.hostname, e.last_seen_ms, e.api_url, e.id IS NOT NULL AS known,
                    i.error
             FROM batch_items i LEFT JOIN endpoints e ON e.id = i.endpoint_id
             WHERE i.batch_id = ?1 AND i.state = 'queued' ORDER BY i.hostname",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    /// Running items whose snapshot finished (complete or failed).
    pub async fn settled_items(&self, batch_id: i64) -> Result<Vec<SettledItem>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, SettledItem>(
            "SELECT i.endpoint_id, s.state AS snapshot_state, s.size, s.error, e.last_seen_ms, e.api_url
             FROM batch_items i JOIN snapshots s ON s.id = i.snapshot_id
             LEFT JOIN endpoints e ON e.id = i.endpoint_id
             WHERE i.batch_id = ?1 AND i.state = 'running' AND s.state IN ('complete', 'failed')",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    /// Running items whose snapshot row is gone (deleted while captured).
    pub async fn orphaned_items(&self, batch_id: i64) -> Result<Vec<i64>> {
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
            "SELECT i.endpoint_id FROM batch_items i LEFT JOIN snapshots s ON s.id = i.snapshot_id
             WHERE i.batch_id = ?1 AND i.state = 'running' AND s.id IS NULL",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    /// Running items without their capture job id yet (a crash between dispatch and enqueue):
    /// (endpoint id, hostname, snapshot id).
    pub async fn items_without_job(&self, batch_id: i64) -> Result<Vec<(i64, String, i64)>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as(
            "SELECT endpoint_id, hostname, snapshot_id FROM batch_items
             WHERE batch_id = ?1 AND state = 'running' AND job_id IS NULL AND snapshot_id IS NOT NULL",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    /// Running items' capture jobs.
    pub async fn running_item_jobs(&self, batch_id: i64) -> Result<Vec<String>> {
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
                "SELECT job_id FROM batch_items WHERE batch_id = ?1 AND state = 'running'
             AND job_id IS NOT NULL",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    /// Every job of a batch: its fleet job and its items' capture jobs.
    pub async fn batch_job_ids(&self, batch_id: i64) -> Result<Vec<String>> {
        Ok(run!(
            &self.pool,
            sqlx::query_scalar(
                "SELECT job_id FROM batches WHERE id = ?1 AND job_id IS NOT NULL
             UNION ALL
             SELECT job_id FROM batch_items WHERE batch_id = ?1 AND job_id IS NOT NULL",
            )
            .bind(batch_id),
            fetch_all
        )?)
    }

    /// Creates the item's snapshot row and marks it running, in one transaction: the snapshot
    /// id, or `None` if the item is no longer queued.
    pub async fn dispatch_item(
        &self,
        batch_id: i64,
        endpoint_id: i64,
        requested_by: &str,
    ) -> Result<Option<i64>> {
        let mut tx = self.write_tx().await?;
        let queued: Option<String> = run_tx!(
            &mut tx,
            sqlx::query_scalar(
            "SELECT state FROM batch_items WHERE batch_id = ?1 AND endpoint_id = ?2 AND state = 'queued'",
            )
            .bind(batch_id)
            .bind(endpoint_id),
            fetch_optional
        )?;
        if queued.is_none() {
            return Ok(None);
        }
        let snapshot_id: i64 = run_tx!(
            &mut tx,
            sqlx::query_scalar(
                "INSERT INTO snapshots (endpoint_id, state, origin, requested_by, created_ms)
             VALUES (?1, 'queued', ?2, ?3, ?4) RETURNING id",
            )
            .bind(endpoint_id)
            .bind(Origin::Capture.as_str())
            .bind(requested_by)
            .bind(now_ms()),
            fetch_one
        )?;
        run_tx!(
            &mut tx,
            sqlx::query(
                "UPDATE batch_items SET state = 'running', snapshot_id = ?3
             WHERE batch_id = ?1 AND endpoint_id = ?2",
            )
            .bind(batch_id)
            .bind(endpoint_id)
            .bind(snapshot_id),
            execute
        )?;
        tx.commit().await?;
        Ok(Some(snapshot_id))
    }

    pub async fn set_item_job(&self, batch_id: i64, endpoint_id: i64, job_id: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE batch_items SET job_id = ?3 WHERE batch_id = ?1 AND endpoint_id = ?2"
            )
            .bind(batch_id)
            .bind(endpoint_id)
            .bind(job_id),
            execute
        )?;
        Ok(())
    }

    /// Ends one item (`done` with bytes, `failed` or `skipped` with the reason).
    pub async fn finish_item(
        &self,
        batch_id: i64,
        endpoint_id: i64,
        state: &str,
        error: Option<&str>,
        bytes: Option<i64>,
    ) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE batch_items SET state = ?3, error = ?4, bytes = ?5
             WHERE batch_id = ?1 AND endpoint_id = ?2 AND state IN ('queued', 'running')",
            )
            .bind(batch_id)
            .bind(endpoint_id)
            .bind(state)
            .bind(error)
            .bind(bytes),
            execute
        )?;
        Ok(())
    }

    /// Puts a running item whose capture failed back to queued (its endpoint went offline): it
    /// waits for the endpoint like any queued one, and `note` says what happened meanwhile.
    pub async fn requeue_item(&self, batch_id: i64, endpoint_id: i64, note: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE batch_items SET state = 'queued', snapshot_id = NULL, job_id = NULL, error = ?3
             WHERE batch_id = ?1 AND endpoint_id = ?2 AND state = 'running'",
            )
            .bind(batch_id)
            .bind(endpoint_id)
            .bind(note),
            execute
        )?;
        Ok(())
    }

    /// Skips every queued item of the batch with `reason`; how many.
    pub async fn skip_queued_items(&self, batch_id: i64, reason: &str) -> Result<u64> {
        Ok(run!(
            &self.pool,
            sqlx::query(
                "UPDATE batch_items SET state = 'skipped', error = ?2
             WHERE batch_id = ?1 AND state = 'queued'",
            )
            .bind(batch_id)
            .bind(reason),
            execute
        )?
        .rows_affected())
    }

    /// Moves a batch from one of `from` to `to` with `reason`; false if it was in another state.
    pub async fn set_batch_state(
        &self,
        id: i64,
        from: &[&str],
        to: &str,
        reason: Option<&str>,
    ) -> Result<bool> {
        let from = serde_json::to_string(from).expect("strings serialize");
        let finished = state::is_finished(to).then(now_ms);
        Ok(run!(
            &self.pool,
            sqlx::query(
            "UPDATE batches SET state = ?3, reason = ?4, finished_ms = COALESCE(?5, finished_ms)
             WHERE id = ?1 AND state IN (SELECT value FROM json_each(?2))",
            )
            .bind(id)
            .bind(from)
            .bind(to)
            .bind(reason)
            .bind(finished),
            execute
        )?
        .rows_affected()
            == 1)
    }

    /// Resumes a paused batch: the failure limit counts the failures from now on.
    pub async fn resume_batch(&self, id: i64) -> Result<bool> {
        Ok(run!(
            &self.pool,
            sqlx::query(
            "UPDATE batches SET state = 'running', reason = NULL,
                 failure_base = (SELECT COUNT(*) FROM batch_items WHERE batch_id = ?1 AND state = 'failed')
             WHERE id = ?1 AND state = 'paused'",
            )
            .bind(id),
            execute
        )?
        .rows_affected()
            == 1)
    }

    /// Records the end state decided while captures still run (`cancelled`, `expired`).
    pub async fn set_batch_stop(&self, id: i64, stop_state: &str, reason: &str) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
                "UPDATE batches SET stop_state = COALESCE(stop_state, ?2),
                 reason = CASE WHEN stop_state IS NULL THEN ?3 ELSE reason END
             WHERE id = ?1",
            )
            .bind(id)
            .bind(stop_state)
            .bind(reason),
            execute
        )?;
        Ok(())
    }

    /// A user asked to cancel a batch; false when it already ended.
    pub async fn request_batch_cancel(&self, id: i64) -> Result<bool> {
        Ok(run!(
            &self.pool,
            sqlx::query(
            "UPDATE batches SET cancel_requested = TRUE WHERE id = ?1 AND state IN ('running', 'paused')",
            )
            .bind(id),
            execute
        )?
        .rows_affected()
            == 1)
    }

    // --- schedules -----------------------------------------------------------------------------

    pub async fn add_schedule(&self, s: &Schedule) -> Result<Option<Schedule>> {
        let id: Option<i64> = run!(
            &self.pool,
            sqlx::query_scalar(
                "INSERT INTO schedules (name, cron, tz, group_name, max_concurrency, expire_secs,
                 failure_limit, keep_last, keep_days, paused, created_by, created_ms, last_tick_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, FALSE, ?10, ?11, ?11)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            )
            .bind(&s.name)
            .bind(&s.cron)
            .bind(&s.tz)
            .bind(&s.group_name)
            .bind(s.max_concurrency)
            .bind(s.expire_secs)
            .bind(&s.failure_limit)
            .bind(s.keep_last)
            .bind(s.keep_days)
            .bind(&s.created_by)
            .bind(now_ms()),
            fetch_optional
        )?;
        match id {
            Some(_) => self.schedule(&s.name).await,
            None => Ok(None),
        }
    }

    pub async fn schedules(&self) -> Result<Vec<Schedule>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Schedule>("SELECT * FROM schedules ORDER BY name"),
            fetch_all
        )?)
    }

    pub async fn schedule(&self, name: &str) -> Result<Option<Schedule>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Schedule>("SELECT * FROM schedules WHERE name = ?1").bind(name),
            fetch_optional
        )?)
    }

    pub async fn schedule_by_id(&self, id: i64) -> Result<Option<Schedule>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as::<_, Schedule>("SELECT * FROM schedules WHERE id = ?1").bind(id),
            fetch_optional
        )?)
    }

    pub async fn remove_schedule(&self, name: &str) -> Result<bool> {
        Ok(run!(
            &self.pool,
            sqlx::query("DELETE FROM schedules WHERE name = ?1").bind(name),
            execute
        )?
        .rows_affected()
            == 1)
    }

    pub async fn set_schedule_paused(&self, name: &str, paused: bool) -> Result<bool> {
        Ok(run!(
            &self.pool,
            sqlx::query("UPDATE schedules SET paused = ?2 WHERE name = ?1")
                .bind(name)
                .bind(paused),
            execute
        )?
        .rows_affected()
            == 1)
    }

    /// Marks ticks up to `tick_ms` handled (never moves back).
    pub async fn set_schedule_tick(&self, id: i64, tick_ms: i64) -> Result<()> {
        run!(
            &self.pool,
            sqlx::query(
            "UPDATE schedules SET last_tick_ms = CASE WHEN last_tick_ms > ?2 THEN last_tick_ms ELSE ?2 END
             WHERE id = ?1",
            )
            .bind(id)
            .bind(tick_ms),
            execute
        )?;
        Ok(())
    }

    // --- keep and retention --------------------------------------------------------------------

    /// Marks a snapshot never to be pruned; false if it already was.
    pub async fn keep_snapshot(&self, id: i64, by: &str) -> Result<bool> {
        Ok(run!(
            &self.pool,
            sqlx::query(
                "INSERT INTO snapshot_keep (snapshot_id, kept_by, kept_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (snapshot_id) DO NOTHING",
            )
            .bind(id)
            .bind(by)
            .bind(now_ms()),
            execute
        )?
        .rows_affected()
            == 1)
    }

    pub async fn unkeep_snapshot(&self, id: i64) -> Result<bool> {
        Ok(run!(
            &self.pool,
            sqlx::query("DELETE FROM snapshot_keep WHERE snapshot_id = ?1").bind(id),
            execute
        )?
        .rows_affected()
            == 1)
    }

    /// Who marked a snapshot to keep and when (ms), if it is kept.
    pub async fn keep_mark(&self, id: i64) -> Result<Option<(String, i64)>> {
        Ok(run!(
            &self.pool,
            sqlx::query_as("SELECT kept_by, kept_ms FROM snapshot_keep WHERE snapshot_id = ?1")
                .bind(id),
            fetch_optional
        )?)
    }

    /// The keep marks of these snapshots (those kept): snapshot id → (who, when in ms). One
    /// statement for a whole listing.
    pub async fn keep_marks(
        &self,
        ids: &[i64],
    ) -> Result<std::collections::HashMap<i64, (String, i64)>> {
        let ids = serde_json::to_string(ids).expect("ids serialize");
        let rows: Vec<(i64, String, i64)> = run!(
            &self.pool,
            sqlx::query_as(
                "SELECT snapshot_id, kept_by, kept_ms FROM snapshot_keep
             WHERE snapshot_id IN (SELECT CAST(value AS BIGINT) FROM json_each(?1))",
            )
            .bind(ids),
            fetch_all
        )?;
        Ok(rows
            .into_iter()
            .map(|(id, by, ms)| (id, (by, ms)))
            .collect())
    }

    /// Complete snapshots of these endpoints that a keep rule prunes: beyond the newest
    /// `keep_last` per endpoint, or created before `older_than_ms`. Kept snapshots are neither
    /// pruned nor counted. (snapshot id, hostname).
    pub async fn prune_candidates(
        &self,
        hostnames: &[String],
        keep_last: Option<i64>,
        older_than_ms: Option<i64>,
    ) -> Result<Vec<(i64, String)>> {
        let hosts = serde_json::to_string(hostnames).expect("strings serialize");
        Ok(run!(
            &self.pool,
            sqlx::query_as(
            "SELECT id, hostname FROM (
                 SELECT s.id, e.hostname, s.created_ms,
                        ROW_NUMBER() OVER (PARTITION BY s.endpoint_id ORDER BY s.created_ms DESC, s.id DESC) AS rn
                 FROM snapshots s JOIN endpoints e ON e.id = s.endpoint_id
                 WHERE s.state = 'complete' AND e.hostname IN (SELECT value FROM json_each(?1))
                   AND s.id NOT IN (SELECT snapshot_id FROM snapshot_keep)) AS ranked
             WHERE (?2 IS NOT NULL AND rn > ?2) OR (?3 IS NOT NULL AND created_ms < ?3)
             ORDER BY id",
            )
            .bind(hosts)
            .bind(keep_last)
            .bind(older_than_ms),
            fetch_all
        )?)
    }
}

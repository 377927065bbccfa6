//! `snapq db migrate`: every row of a SQLite catalog copied into an empty PostgreSQL one.
//!
//! Table by table in the order their references need, in one PostgreSQL transaction (all or
//! nothing). The columns and their types are read from the PostgreSQL schema, so a column added
//! by a later migration is copied without a change here: integers stay integers, 0/1 flags become
//! booleans, text keeps its bytes (a NUL becomes U+FFFD, as every catalog write does). Ids are kept,
//! and each identity column then continues after the largest id copied, so an id is still never
//! given twice.

use sqlx::Row;

use super::db::{Pool, storable};
use super::{Catalog, CatalogError, Result};

/// Every catalog table, each after the tables it refers to.
const TABLES: &[&str] = &[
    "endpoints",
    "users",
    "computer_groups",
    "user_groups",
    "tokens",
    "audit",
    "ingests",
    "job_targets",
    "snapshots",
    "connections",
    "evidence",
    "exports",
    "schedules",
    "batches",
    "batch_items",
    "snapshot_keep",
    "console_sessions",
];

/// How many rows of each table were copied, in copy order.
pub type Copied = Vec<(&'static str, u64)>;

impl Catalog {
    /// Copies every row of this (SQLite) catalog into `to`, a PostgreSQL catalog that must hold
    /// no rows yet.
    pub async fn copy_into(&self, to: &Catalog) -> Result<Copied> {
        let (Pool::Sqlite(from), Pool::Postgres(pg)) = (&self.pool, &to.pool) else {
            return Err(CatalogError::Invalid(
                "a catalog is copied from SQLite into PostgreSQL".into(),
            ));
        };
        for table in TABLES {
            let rows: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(pg)
                    .await?;
            if rows > 0 {
                return Err(CatalogError::Conflict(format!(
                    "the PostgreSQL catalog is not empty ({table} holds {rows} rows); migrate into a new database"
                )));
            }
        }
        let mut tx = pg.begin().await?;
        let mut copied = Vec::new();
        for &table in TABLES {
            let columns: Vec<(String, String)> = sqlx::query_as(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1
                 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(&mut *tx)
            .await?;
            let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
            let list = names.join(", ");
            let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
            let insert = format!(
                "INSERT INTO {table} ({list}) OVERRIDING SYSTEM VALUE VALUES ({})",
                placeholders.join(", ")
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {list} FROM {table} ORDER BY rowid"
            )))
            .fetch_all(from)
            .await?;
            for row in &rows {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
                for (i, (_, kind)) in columns.iter().enumerate() {
                    query = match kind.as_str() {
                        "bigint" | "integer" => query.bind(row.try_get::<Option<i64>, _>(i)?),
                        "boolean" => query.bind(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0)),
                        _ => query.bind(
                            row.try_get::<Option<String>, _>(i)?
                                .map(|t| storable(&t).into_owned()),
                        ),
                    };
                }
                query.execute(&mut *tx).await?;
            }
            if names.contains(&"id") {
                // The next id after the largest copied (identity columns do not follow inserts
                // that name their id).
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'),
                                   COALESCE((SELECT max(id) FROM {table}), 0) + 1, false)"
                )))
                .execute(&mut *tx)
                .await?;
            }
            copied.push((table, rows.len() as u64));
        }
        tx.commit().await?;
        Ok(copied)
    }
}

use snapq_jobs::{JobKind, NoopArgs};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn probe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let q = snapq_jobs::Queue::open(&path, snapq_jobs::QueueConfig::default())
        .await
        .unwrap();
    q.push(&NoopArgs { n: 1 }, "x").await.unwrap();
    q.shutdown(Duration::from_secs(1)).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let claim = include_str!("../src/sql.rs");
    let start = claim.find("pub(crate) const CLAIM: &str = \"").unwrap()
        + "pub(crate) const CLAIM: &str = \"".len();
    let end = start + claim[start..].find("\";").unwrap();
    let sql = claim[start..end].replace("\\\"", "\"");
    let rows: Vec<(i64, i64, i64, String)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
            .bind("w")
            .bind(JobKind::Noop.queue_name())
            .bind(32)
            .bind(0)
            .bind(0)
            .fetch_all(&pool)
            .await
            .unwrap();
    for r in rows {
        println!("{:?}", r);
    }
    let idx: Vec<(String,)> =
        sqlx::query_as("SELECT sql FROM sqlite_schema WHERE tbl_name='Jobs' AND sql IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    for r in idx {
        println!("{}", r.0);
    }
}

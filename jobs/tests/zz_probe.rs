use sqlx::{
    Connection, SqliteConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn probe() {
    for ckpt in ["1000", "10000", "0", "1000", "10000"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let q = snapq_jobs::Queue::open(&path, snapq_jobs::QueueConfig::default())
            .await
            .unwrap();
        q.shutdown(Duration::from_secs(1)).await.unwrap();
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .pragma("wal_autocheckpoint", ckpt);
        let mut conn = SqliteConnection::connect_with(&opts).await.unwrap();
        let n = 5000;
        let ins = "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, last_result, lock_at, lock_by, done_at, priority, metadata, idempotency_key) VALUES (?1, ?2, 'q', 'Pending', 0, 6, 0, NULL, NULL, NULL, NULL, 0, '{}', NULL)";
        let mut lat = Vec::new();
        let t = Instant::now();
        for i in 0..n {
            let t0 = Instant::now();
            sqlx::query(ins)
                .bind(b"{}".to_vec())
                .bind(format!("a{i:08}"))
                .execute(&mut conn)
                .await
                .unwrap();
            lat.push(t0.elapsed());
        }
        let tot = t.elapsed();
        lat.sort();
        println!(
            "ckpt {ckpt}: autocommit insert: {:?}/call p50 {:?} p99 {:?} max {:?}",
            tot / n,
            lat[2500],
            lat[4950],
            lat[4999]
        );
        let t = Instant::now();
        let mut tx = conn.begin().await.unwrap();
        for i in 0..n {
            sqlx::query(ins)
                .bind(b"{}".to_vec())
                .bind(format!("c{i:08}"))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        println!("  in-tx insert: {:?}/call", t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            let tx = conn.begin().await.unwrap();
            tx.commit().await.unwrap();
        }
        println!("  empty begin/commit: {:?}/call", t.elapsed() / n);
    }
}

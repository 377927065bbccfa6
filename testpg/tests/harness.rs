//! The harness gives each test its own schema on a working PostgreSQL.

use sqlx::Connection;

#[tokio::test]
async fn each_schema_is_empty_and_its_own() {
    let Some(a) = snapq_testpg::schema_or_skip("the harness test").await else {
        return;
    };
    let b = snapq_testpg::schema().await.unwrap();
    assert_ne!(a.schema, b.schema);
    let mut conn = sqlx::PgConnection::connect(&a.url).await.unwrap();
    sqlx::query("CREATE TABLE t (x BIGINT)")
        .execute(&mut conn)
        .await
        .unwrap();
    let schema: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(schema, a.schema);
    // The other schema does not see the table; connecting with the options works the same.
    let mut other = sqlx::PgConnection::connect_with(&b.options).await.unwrap();
    let seen: Option<String> = sqlx::query_scalar("SELECT to_regclass('t')::text")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(seen, None);
}

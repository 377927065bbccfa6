//! The catalog's two backends behind one source of SQL: SQLite (the default, `catalog.db` in the
//! data directory) and PostgreSQL (`--database postgres://…`, several server nodes over one
//! catalog).
//!
//! Every statement is written once, in the dialect both engines accept (`ON CONFLICT`,
//! `RETURNING`, `COALESCE`, `CAST(… AS BIGINT)`, `TRUE`/`FALSE`), with SQLite's numbered
//! placeholders `?1, ?2, …`. [`run!`] runs it on whichever pool (or transaction) the catalog has:
//! on PostgreSQL the placeholders become `$1, $2, …` ([`postgres_sql`]). Where the dialects truly
//! differ (schema, advisory locks) the code says so next to the statement.

use std::borrow::Cow;

use sqlx::{AssertSqlSafe, PgPool, SqlSafeStr, SqlStr, SqlitePool};

/// The catalog's connection pool.
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A catalog transaction: on SQLite it holds the write lock from its start (`BEGIN IMMEDIATE`),
/// on PostgreSQL it is a READ COMMITTED transaction whose writers lock the rows they touch.
pub enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await,
            Tx::Postgres(tx) => tx.commit().await,
        }
    }
}

/// `text` as the catalog stores it: PostgreSQL's TEXT cannot hold a NUL character (SQLite's can),
/// so on both engines a NUL in free text a user or a file supplied (an audit target, an evidence
/// note) is kept as U+FFFD instead of failing the write and losing the row.
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// A value as [`run!`] binds it on PostgreSQL, whose TEXT cannot hold a NUL character (SQLite's
/// can): text is [`storable`], so a write keeps its row and a lookup by a key with a NUL (a search,
/// a name from a request) finds what such a write stored, or nothing, instead of failing the
/// statement; other values pass unchanged. One impl per type the statements bind.
pub trait PgBind {
    type Bound;
    fn pg_bind(self) -> Self::Bound;
}

impl<'a> PgBind for &'a str {
    type Bound = Cow<'a, str>;
    fn pg_bind(self) -> Cow<'a, str> {
        storable(self)
    }
}

impl<'a> PgBind for &'a String {
    type Bound = Cow<'a, str>;
    fn pg_bind(self) -> Cow<'a, str> {
        storable(self)
    }
}

impl PgBind for String {
    type Bound = String;
    fn pg_bind(self) -> String {
        match storable(&self) {
            Cow::Borrowed(_) => self,
            Cow::Owned(text) => text,
        }
    }
}

impl<'a> PgBind for Option<&'a str> {
    type Bound = Option<Cow<'a, str>>;
    fn pg_bind(self) -> Option<Cow<'a, str>> {
        self.map(storable)
    }
}

impl PgBind for Option<String> {
    type Bound = Option<String>;
    fn pg_bind(self) -> Option<String> {
        self.map(PgBind::pg_bind)
    }
}

impl<'a> PgBind for &'a Option<String> {
    type Bound = Option<Cow<'a, str>>;
    fn pg_bind(self) -> Option<Cow<'a, str>> {
        self.as_deref().map(storable)
    }
}

impl PgBind for &i64 {
    type Bound = i64;
    fn pg_bind(self) -> i64 {
        *self
    }
}

macro_rules! pg_bind_unchanged {
    ($($t:ty),*) => {$(
        impl PgBind for $t {
            type Bound = $t;
            fn pg_bind(self) -> $t {
                self
            }
        }
    )*};
}
pg_bind_unchanged!(i64, Option<i64>, bool);

/// A JSON document kept in a TEXT column, decoded on either backend (sqlx's `Json` decodes only
/// PostgreSQL's JSON types, and the catalog's columns are TEXT on both engines so the same
/// statements read and write them). Fields use it through `#[sqlx(try_from = "JsonText<…>")]`.
#[derive(Debug, Clone)]
pub struct JsonText<T>(pub T);

impl<'r, DB: sqlx::Database, T: serde::de::DeserializeOwned> sqlx::Decode<'r, DB> for JsonText<T>
where
    String: sqlx::Decode<'r, DB>,
{
    fn decode(
        value: <DB as sqlx::Database>::ValueRef<'r>,
    ) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <String as sqlx::Decode<DB>>::decode(value)?;
        Ok(JsonText(serde_json::from_str(&text)?))
    }
}

impl<DB: sqlx::Database, T> sqlx::Type<DB> for JsonText<T>
where
    String: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <String as sqlx::Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <String as sqlx::Type<DB>>::compatible(ty)
    }
}

impl From<JsonText<Vec<String>>> for Vec<String> {
    fn from(j: JsonText<Vec<String>>) -> Self {
        j.0
    }
}

impl From<JsonText<serde_json::Value>> for serde_json::Value {
    fn from(j: JsonText<serde_json::Value>) -> Self {
        j.0
    }
}

/// What an `execute` did, on either backend.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    rows_affected: u64,
}

impl Done {
    pub fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
}

impl From<sqlx::sqlite::SqliteQueryResult> for Done {
    fn from(r: sqlx::sqlite::SqliteQueryResult) -> Self {
        Done {
            rows_affected: r.rows_affected(),
        }
    }
}

impl From<sqlx::postgres::PgQueryResult> for Done {
    fn from(r: sqlx::postgres::PgQueryResult) -> Self {
        Done {
            rows_affected: r.rows_affected(),
        }
    }
}

/// `sql` with SQLite's `?N` placeholders turned into PostgreSQL's `$N`. Placeholders inside
/// string literals and quoted names are left alone. Borrowed when there is nothing to change.
pub fn postgres_sql(sql: &str) -> Cow<'_, str> {
    if !sql.contains('?') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                out.push('$');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// [`postgres_sql`] for any statement `sqlx::query` takes (a literal or `AssertSqlSafe(format!(…))`).
pub fn for_postgres(sql: impl SqlSafeStr) -> SqlStr {
    let sql = sql.into_sql_str();
    match postgres_sql(sql.as_str()) {
        Cow::Borrowed(_) => sql,
        Cow::Owned(translated) => AssertSqlSafe(translated).into_sql_str(),
    }
}

/// Runs one statement on the catalog's pool, on whichever backend it is:
/// `run!(&self.pool, sqlx::query_as::<_, Row>("… ?1 …").bind(a), fetch_all)`. It evaluates to the
/// method's `Result`, after `.await`.
macro_rules! run {
    ($pool:expr, sqlx::query ($sql:expr $(,)?) $(.bind($arg:expr))*, execute $(,)?) => {
        match $pool {
            $crate::catalog::db::Pool::Sqlite(p) => {
                sqlx::query($sql) $(.bind($arg))* .execute(p).await.map($crate::catalog::db::Done::from)
            }
            $crate::catalog::db::Pool::Postgres(p) => {
                let sql = $crate::catalog::db::for_postgres($sql);
                sqlx::query(sql) $(.bind($crate::catalog::db::PgBind::pg_bind($arg)))* .execute(p).await.map($crate::catalog::db::Done::from)
            }
        }
    };
    ($pool:expr, sqlx::$ctor:ident $(::<$($t:ty),+>)? ($sql:expr $(,)?) $(.bind($arg:expr))*, $method:ident $(,)?) => {
        match $pool {
            $crate::catalog::db::Pool::Sqlite(p) => {
                sqlx::$ctor $(::<$($t),+>)? ($sql) $(.bind($arg))* .$method(p).await
            }
            $crate::catalog::db::Pool::Postgres(p) => {
                let sql = $crate::catalog::db::for_postgres($sql);
                sqlx::$ctor $(::<$($t),+>)? (sql) $(.bind($crate::catalog::db::PgBind::pg_bind($arg)))* .$method(p).await
            }
        }
    };
}

/// [`run!`] inside a [`Tx`]: `run_tx!(&mut tx, sqlx::query("…").bind(a), execute)`.
macro_rules! run_tx {
    ($tx:expr, sqlx::query ($sql:expr $(,)?) $(.bind($arg:expr))*, execute $(,)?) => {
        match $tx {
            $crate::catalog::db::Tx::Sqlite(t) => {
                sqlx::query($sql) $(.bind($arg))* .execute(&mut **t).await.map($crate::catalog::db::Done::from)
            }
            $crate::catalog::db::Tx::Postgres(t) => {
                let sql = $crate::catalog::db::for_postgres($sql);
                sqlx::query(sql) $(.bind($crate::catalog::db::PgBind::pg_bind($arg)))* .execute(&mut **t).await.map($crate::catalog::db::Done::from)
            }
        }
    };
    ($tx:expr, sqlx::$ctor:ident $(::<$($t:ty),+>)? ($sql:expr $(,)?) $(.bind($arg:expr))*, $method:ident $(,)?) => {
        match $tx {
            $crate::catalog::db::Tx::Sqlite(t) => {
                sqlx::$ctor $(::<$($t),+>)? ($sql) $(.bind($arg))* .$method(&mut **t).await
            }
            $crate::catalog::db::Tx::Postgres(t) => {
                let sql = $crate::catalog::db::for_postgres($sql);
                sqlx::$ctor $(::<$($t),+>)? (sql) $(.bind($crate::catalog::db::PgBind::pg_bind($arg)))* .$method(&mut **t).await
            }
        }
    };
}
pub(crate) use {run, run_tx};

#[cfg(test)]
mod tests {
    use super::postgres_sql;

    #[test]
    fn numbered_placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            postgres_sql(
                "SELECT a FROM t WHERE b = ?1 AND c IN (?2, ?10) AND d = '?3' AND \"e?\" = ?4"
            ),
            "SELECT a FROM t WHERE b = $1 AND c IN ($2, $10) AND d = '?3' AND \"e?\" = $4"
        );
        assert_eq!(
            postgres_sql("SELECT 'it''s ?' , ?1"),
            "SELECT 'it''s ?' , $1"
        );
        assert!(matches!(
            postgres_sql("SELECT 1"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}

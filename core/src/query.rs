//! The query engine on a recorder database: pages of filtered events, counts, process trees.
//!
//! It runs on a live agent's `monitor.db` (while the recorder writes) and on stored snapshots, so it
//! is synchronous rusqlite code that callers run on a blocking thread. Pages use keyset pagination on
//! (sort field, `id`) so that a page costs the same at the start and at the end of 4 million events,
//! and rows appended by the recorder between pages never shift or repeat earlier pages. The cursor is
//! opaque to clients but carries a fingerprint of its query, so it cannot be replayed against another.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, params_from_iter};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::filter::{Filter, FilterError, TS, parse_time};
use crate::schema::{self, Table};

/// Events per page when the caller does not say.
pub const DEFAULT_LIMIT: u32 = 100;
/// The largest page a caller may ask for; more is an error rather than a silent clamp.
pub const MAX_LIMIT: u32 = 10_000;
/// How many ancestors a process tree follows before it stops (recorders can be wrong).
pub const MAX_TREE_DEPTH: usize = 256;
/// How many direct children a process tree lists.
pub const MAX_CHILDREN: usize = 1_000;

/// Every table's primary key, the tie-breaker of every sort.
const ID: &str = "id";
/// The table and link column of the process tree.
const PROCESS: &str = "process";
const PARENT_ID: &str = "parent_id";

/// One event as a JSON object keyed by column name.
pub type Event = serde_json::Map<String, serde_json::Value>;

/// How the HTTP layer should answer a [`QueryError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is wrong; the message says how to fix it (400).
    BadRequest,
    /// The thing asked for does not exist (404).
    NotFound,
    /// The database failed; not the caller's fault (500).
    Internal,
}

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("unknown event type `{given}`: use one of {valid}")]
    UnknownType { given: String, valid: String },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(
        "unknown sort field `{field}` for {table} events: use one of {valid}, with a leading `-` for newest/largest first"
    )]
    UnknownSortField {
        field: String,
        table: String,
        valid: String,
    },
    #[error(
        "limit {given} is out of range: ask for 1 to {max} events per page and follow `next_cursor` for more",
        max = MAX_LIMIT
    )]
    BadLimit { given: u32 },
    #[error(
        "invalid `{param}` time `{value}`: give RFC 3339 (2026-11-28T14:03:07Z) or epoch milliseconds"
    )]
    BadTime { param: &'static str, value: String },
    #[error(
        "empty time window: `until` ({until}) must be after `since` ({since}); `since` is inclusive, `until` exclusive"
    )]
    EmptyWindow { since: i64, until: i64 },
    #[error("{0}")]
    BadCursor(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("recorder database error: {0}")]
    Database(#[from] rusqlite::Error),
}

impl QueryError {
    /// Whose fault the error is, for the HTTP status.
    pub fn class(&self) -> ErrorClass {
        match self {
            QueryError::NotFound(_) => ErrorClass::NotFound,
            QueryError::Database(_) => ErrorClass::Internal,
            _ => ErrorClass::BadRequest,
        }
    }

    /// The HTTP status for this error: 400, 404 or 500.
    pub fn http_status(&self) -> u16 {
        match self.class() {
            ErrorClass::BadRequest => 400,
            ErrorClass::NotFound => 404,
            ErrorClass::Internal => 500,
        }
    }

    /// True when the caller can fix the request (400 or 404).
    pub fn is_client_error(&self) -> bool {
        self.class() != ErrorClass::Internal
    }
}

/// The order of a page: a column of the table, ascending or descending, ties broken by `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sort {
    pub field: &'static str,
    pub descending: bool,
}

impl Sort {
    /// Parses `FIELD` or `-FIELD` (a leading `+` is also accepted) against `table`.
    pub fn parse(s: &str, table: &Table) -> Result<Sort, QueryError> {
        let s = s.trim();
        let (descending, name) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let field = table
            .all_columns()
            .map(|(c, _)| c)
            .find(|c| *c == name)
            .ok_or_else(|| QueryError::UnknownSortField {
                field: name.to_string(),
                table: table.name.to_string(),
                valid: table.column_list(),
            })?;
        Ok(Sort { field, descending })
    }
}

impl fmt::Display for Sort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.descending { "-" } else { "" };
        write!(f, "{sign}{}", self.field)
    }
}

/// A validated request for one page of events of one type.
#[derive(Debug, Clone)]
pub struct EventQuery {
    table: &'static Table,
    filter: Filter,
    since: Option<i64>,
    until: Option<i64>,
    sort: Sort,
    limit: u32,
    after: Option<Position>,
    fingerprint: String,
}

/// Where the previous page ended: the sort value and id of its last row.
#[derive(Debug, Clone, PartialEq)]
struct Position {
    value: Value,
    id: i64,
}

/// The cursor's content before encoding. Short keys: cursors travel in URLs.
#[derive(Serialize, Deserialize)]
struct CursorData {
    q: String,
    v: CursorValue,
    id: i64,
}

#[derive(Serialize, Deserialize)]
enum CursorValue {
    N,
    I(i64),
    R(f64),
    T(String),
    B(String),
}

impl From<&Value> for CursorValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => CursorValue::N,
            Value::Integer(i) => CursorValue::I(*i),
            Value::Real(r) => CursorValue::R(*r),
            Value::Text(t) => CursorValue::T(t.clone()),
            Value::Blob(b) => CursorValue::B(hex::encode(b)),
        }
    }
}

impl CursorValue {
    fn into_value(self) -> Option<Value> {
        Some(match self {
            CursorValue::N => Value::Null,
            CursorValue::I(i) => Value::Integer(i),
            CursorValue::R(r) => Value::Real(r),
            CursorValue::T(t) => Value::Text(t),
            CursorValue::B(b) => Value::Blob(hex::decode(b).ok()?),
        })
    }
}

impl EventQuery {
    /// Validates a request as the API and CLI receive it. `since` is inclusive, `until` exclusive;
    /// `sort` is `FIELD` or `-FIELD` (default `-ts`, newest first); `limit` defaults to
    /// [`DEFAULT_LIMIT`] and may not exceed [`MAX_LIMIT`]; `cursor` is a page's `next_cursor`.
    #[allow(clippy::too_many_arguments)] // mirrors the query string of `GET /v1/events` one to one
    pub fn parse(
        event_type: &str,
        wheres: &[String],
        any: bool,
        since: Option<&str>,
        until: Option<&str>,
        sort: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<EventQuery, QueryError> {
        let table = schema::event_table(event_type).ok_or_else(|| QueryError::UnknownType {
            given: event_type.to_string(),
            valid: schema::event_type_names().join(", "),
        })?;
        let filter = Filter::parse(wheres, any)?;
        filter.validate(table)?;
        let time = |param: &'static str, s: Option<&str>| {
            s.map(|s| {
                parse_time(s).map_err(|_| QueryError::BadTime {
                    param,
                    value: s.to_string(),
                })
            })
            .transpose()
        };
        let (since, until) = (time("since", since)?, time("until", until)?);
        if let (Some(since), Some(until)) = (since, until)
            && until <= since
        {
            return Err(QueryError::EmptyWindow { since, until });
        }
        let sort = match sort {
            Some(s) if !s.trim().is_empty() => Sort::parse(s, table)?,
            _ => Sort {
                field: TS,
                descending: true,
            },
        };
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(QueryError::BadLimit { given: limit });
        }
        let mut q = EventQuery {
            table,
            filter,
            since,
            until,
            sort,
            limit,
            after: None,
            fingerprint: String::new(),
        };
        q.fingerprint = q.compute_fingerprint();
        if let Some(c) = cursor.filter(|c| !c.is_empty()) {
            q.after = Some(q.decode_cursor(c)?);
        }
        Ok(q)
    }

    pub fn table(&self) -> &'static Table {
        self.table
    }
    pub fn filter(&self) -> &Filter {
        &self.filter
    }
    pub fn since(&self) -> Option<i64> {
        self.since
    }
    pub fn until(&self) -> Option<i64> {
        self.until
    }
    pub fn sort(&self) -> Sort {
        self.sort
    }
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Everything that decides which rows a page walk visits, and in which order (not the limit:
    /// changing the page size mid-walk is harmless).
    fn compute_fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.table.name);
        h.update([0]);
        h.update([self.filter.any as u8]);
        for c in &self.filter.conditions {
            h.update([0]);
            h.update(c.to_string());
        }
        h.update(format!(
            "\0{:?}\0{:?}\0{}",
            self.since, self.until, self.sort
        ));
        hex::encode(&h.finalize()[..8])
    }

    fn encode_cursor(&self, last: &Position) -> String {
        let data = CursorData {
            q: self.fingerprint.clone(),
            v: (&last.value).into(),
            id: last.id,
        };
        hex::encode(serde_json::to_vec(&data).expect("cursor data serialises"))
    }

    fn decode_cursor(&self, cursor: &str) -> Result<Position, QueryError> {
        let data: CursorData = hex::decode(cursor.trim())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                QueryError::BadCursor(
                    "invalid cursor: pass the `next_cursor` of the previous page unchanged, or drop `cursor` to start from the first page"
                        .into(),
                )
            })?;
        if data.q != self.fingerprint {
            return Err(QueryError::BadCursor(
                "cursor belongs to a different query (event type, filter, time window or sort changed): drop `cursor` to start from the first page"
                    .into(),
            ));
        }
        let value = data
            .v
            .into_value()
            .filter(|v| self.sort.field != TS || matches!(v, Value::Integer(_)))
            .ok_or_else(|| {
                QueryError::BadCursor(
                    "invalid cursor position: drop `cursor` to start from the first page".into(),
                )
            })?;
        Ok(Position { value, id: data.id })
    }

    /// The SQL of every row this query selects, in its order, without the page limit or cursor:
    /// what an export streams. Its columns are `table().all_columns()`, in order.
    pub fn stream_sql(&self) -> Result<(String, Vec<Value>), QueryError> {
        let mut all = self.clone();
        all.after = None;
        let (sql, mut params) = all.to_sql()?;
        // A negative LIMIT is no limit in SQLite.
        *params.last_mut().expect("the limit is the last parameter") = Value::Integer(-1);
        Ok((sql, params))
    }

    /// The page's SQL and its parameters.
    fn to_sql(&self) -> Result<(String, Vec<Value>), QueryError> {
        let (filter_sql, mut params) = self.filter.to_sql(self.table)?;
        let mut clauses = vec![filter_sql];
        let Sort { field, descending } = self.sort;
        let lt = if descending { "<" } else { ">" };
        let mut since = self.since.map(|s| (">=", Value::Integer(s)));
        let mut until = self.until.map(|u| ("<", Value::Integer(u)));
        let mut keyset = None;
        if let Some(Position { value, id }) = &self.after {
            let id = Value::Integer(*id);
            if field == ID {
                keyset = Some((format!("{ID} {lt} ?"), vec![id]));
            } else if field == TS {
                // Fold the cursor into the time bound so the planner sees one range on the ts
                // index rather than two competing ones.
                let Value::Integer(c) = value else {
                    unreachable!("decode_cursor only accepts integer ts positions")
                };
                let bound = if descending { &mut until } else { &mut since };
                let tighter = match (&bound, descending) {
                    (None, _) => true,
                    (Some((_, Value::Integer(u))), true) => *c < *u,
                    (Some((_, Value::Integer(s))), false) => *c >= *s,
                    _ => true,
                };
                if tighter {
                    *bound = Some((if descending { "<=" } else { ">=" }, value.clone()));
                }
                keyset = Some((
                    format!("({TS} {lt} ? OR {ID} {lt} ?)"),
                    vec![value.clone(), id],
                ));
            } else {
                // SQLite sorts NULL first ascending and last descending.
                let v = value.clone();
                keyset = Some(match (value, descending) {
                    (Value::Null, false) => (
                        format!("(({field} IS NULL AND {ID} > ?) OR {field} IS NOT NULL)"),
                        vec![id],
                    ),
                    (Value::Null, true) => (format!("({field} IS NULL AND {ID} < ?)"), vec![id]),
                    (_, false) => (
                        format!("({field} > ? OR ({field} = ? AND {ID} > ?))"),
                        vec![v.clone(), v, id],
                    ),
                    (_, true) => (
                        format!("({field} < ? OR ({field} = ? AND {ID} < ?) OR {field} IS NULL)"),
                        vec![v.clone(), v, id],
                    ),
                });
            }
        }
        for (op, v) in [since, until].into_iter().flatten() {
            clauses.push(format!("{TS} {op} ?"));
            params.push(v);
        }
        if let Some((sql, values)) = keyset {
            clauses.push(sql);
            params.extend(values);
        }
        let dir = if descending { "DESC" } else { "ASC" };
        let order = if field == ID {
            format!("{ID} {dir}")
        } else {
            format!("{field} {dir}, {ID} {dir}")
        };
        params.push(Value::Integer(i64::from(self.limit) + 1));
        let sql = format!(
            "SELECT {cols} FROM {table} WHERE {cond} ORDER BY {order} LIMIT ?",
            cols = self.table.column_list(),
            table = self.table.name,
            cond = clauses.join(" AND "),
        );
        Ok((sql, params))
    }
}

/// One page of events and the cursor of the next, if there is more.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next_cursor: Option<String>,
}

fn json_value(v: ValueRef<'_>) -> serde_json::Value {
    match v {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(r) => serde_json::Number::from_f64(r)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        ValueRef::Blob(b) => hex::encode(b).into(),
    }
}

/// Reads a row selected with `table.column_list()` into an event.
fn row_event(table: &Table, row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let mut event = Event::new();
    for (i, (name, _)) in table.all_columns().enumerate() {
        event.insert(name.to_string(), json_value(row.get_ref(i)?));
    }
    Ok(event)
}

fn column_index(table: &Table, name: &str) -> usize {
    table
        .all_columns()
        .position(|(c, _)| c == name)
        .expect("column comes from this table's schema")
}

/// Runs one page of `q`. Pass the returned `next_cursor` to [`EventQuery::parse`] for the next.
pub fn query_events(conn: &Connection, q: &EventQuery) -> Result<EventPage, QueryError> {
    let (sql, params) = q.to_sql()?;
    let sort_idx = column_index(q.table, q.sort.field);
    let id_idx = column_index(q.table, ID);
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut events = Vec::new();
    let mut last = None;
    while let Some(row) = rows.next()? {
        if events.len() == q.limit as usize {
            // One row past the page: there is a next page, starting after the last row kept.
            let cursor = last.as_ref().map(|p| q.encode_cursor(p));
            return Ok(EventPage {
                events,
                next_cursor: cursor,
            });
        }
        last = Some(Position {
            value: row.get::<_, Value>(sort_idx)?,
            id: row.get(id_idx)?,
        });
        events.push(row_event(q.table, row)?);
    }
    Ok(EventPage {
        events,
        next_cursor: None,
    })
}

/// Event counts and the time span of a recorder database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Events per type, every event type present (0 when empty).
    pub counts: BTreeMap<String, u64>,
    pub total: u64,
    /// Oldest and newest event time over all types, epoch ms; `None` when there are no events.
    pub oldest_ts: Option<i64>,
    pub newest_ts: Option<i64>,
}

/// Counts events per type and finds the oldest and newest event. One statement, so one consistent
/// read while the recorder writes; `min`/`max` are answered from the ts indexes.
pub fn summary(conn: &Connection) -> Result<Summary, QueryError> {
    let tables: Vec<&Table> = schema::event_tables().collect();
    let sql = tables
        .iter()
        .map(|t| {
            format!(
                "SELECT (SELECT count(*) FROM {t}), (SELECT min({TS}) FROM {t}), (SELECT max({TS}) FROM {t})",
                t = t.name
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut s = Summary {
        counts: BTreeMap::new(),
        total: 0,
        oldest_ts: None,
        newest_ts: None,
    };
    for (t, (count, min, max)) in tables.iter().zip(rows) {
        let count = count.max(0) as u64;
        s.counts.insert(t.name.to_string(), count);
        s.total += count;
        s.oldest_ts = s.oldest_ts.into_iter().chain(min).min();
        s.newest_ts = s.newest_ts.into_iter().chain(max).max();
    }
    Ok(s)
}

/// A process with its ancestry and its direct children.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessTree {
    /// Parent chain, root first, ending with the process's parent.
    pub ancestors: Vec<Event>,
    /// True when the chain was cut by a cycle or [`MAX_TREE_DEPTH`], not by reaching a root.
    pub ancestors_truncated: bool,
    pub process: Event,
    /// Direct children (`parent_id` = the process's id), oldest first.
    pub children: Vec<Event>,
    /// True when there were more than [`MAX_CHILDREN`] children.
    pub children_truncated: bool,
}

/// Builds the tree around process row `id`. An unknown id is [`QueryError::NotFound`].
pub fn process_tree(conn: &Connection, id: i64) -> Result<ProcessTree, QueryError> {
    let table = schema::event_table(PROCESS).expect("schema has a process table");
    let parent_idx = column_index(table, PARENT_ID);
    // One read transaction, so the chain is consistent while the recorder writes.
    let _tx = if conn.is_autocommit() {
        Some(conn.unchecked_transaction()?)
    } else {
        None
    };
    let cols = table.column_list();
    let mut by_id = conn.prepare_cached(&format!("SELECT {cols} FROM {PROCESS} WHERE {ID} = ?"))?;
    let mut fetch = |id: i64| -> Result<Option<(Event, Option<i64>)>, QueryError> {
        let mut rows = by_id.query([id])?;
        match rows.next()? {
            Some(row) => Ok(Some((row_event(table, row)?, row.get(parent_idx)?))),
            None => Ok(None),
        }
    };
    let (process, mut parent) =
        fetch(id)?.ok_or_else(|| QueryError::NotFound(format!("process {id}")))?;
    let mut seen = HashSet::from([id]);
    let mut ancestors = Vec::new();
    let mut ancestors_truncated = false;
    while let Some(pid) = parent {
        if !seen.insert(pid) || ancestors.len() >= MAX_TREE_DEPTH {
            ancestors_truncated = true;
            break;
        }
        match fetch(pid)? {
            Some((event, next)) => {
                ancestors.push(event);
                parent = next;
            }
            // The parent aged out of the database (retention) or was never recorded.
            None => break,
        }
    }
    ancestors.reverse();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {cols} FROM {PROCESS} WHERE {PARENT_ID} = ?1 AND {ID} <> ?1 ORDER BY {TS}, {ID} LIMIT ?2"
    ))?;
    let mut children = stmt
        .query_map(rusqlite::params![id, MAX_CHILDREN as i64 + 1], |r| {
            row_event(table, r)
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let children_truncated = children.len() > MAX_CHILDREN;
    children.truncate(MAX_CHILDREN);
    Ok(ProcessTree {
        ancestors,
        ancestors_truncated,
        process,
        children,
        children_truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        schema::create(&conn).unwrap();
        conn
    }

    fn q(event_type: &str, wheres: &[&str]) -> Result<EventQuery, QueryError> {
        let wheres: Vec<String> = wheres.iter().map(|s| s.to_string()).collect();
        EventQuery::parse(event_type, &wheres, false, None, None, None, None, None)
    }

    fn ids(page: &EventPage) -> Vec<i64> {
        page.events
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect()
    }

    /// `n` file events: ts repeats every 7 rows' worth (many ties), some paths NULL.
    fn file_events(conn: &Connection, n: i64) {
        let mut stmt = conn
            .prepare(
                "INSERT INTO file (id, ts, process_id, op, path, size) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .unwrap();
        for i in 1..=n {
            let path = match i % 5 {
                0 => None,
                1 => Some(format!("/usr/bin/bash{}", i % 3)),
                _ => Some(format!("/home/u/file{}", i % 4)),
            };
            let size = if i % 6 == 0 { None } else { Some(i % 9) };
            stmt.execute(rusqlite::params![
                i,
                1_000 + i / 7,
                i % 3,
                ["create", "write", "delete"][(i % 3) as usize],
                path,
                size
            ])
            .unwrap();
        }
    }

    #[test]
    fn unknown_type_names_the_valid_types() {
        let e = q("proc", &[]).unwrap_err();
        assert_eq!(e.http_status(), 400);
        let msg = e.to_string();
        for t in schema::event_type_names() {
            assert!(msg.contains(t), "{msg} lacks {t}");
        }
        assert!(!msg.contains("meta"), "meta is not an event type: {msg}");
    }

    #[test]
    fn unknown_field_and_operator_are_errors_not_empty_results() {
        let e = q("dns", &["path co x"]).unwrap_err().to_string();
        assert!(
            e.contains("unknown field `path`") && e.contains("answer"),
            "{e}"
        );
        let e = q("dns", &["query like x"]).unwrap_err().to_string();
        assert!(
            e.contains("unknown operator `like`") && e.contains("isempty"),
            "{e}"
        );
    }

    #[test]
    fn parse_checks_sort_limit_and_times() {
        let parse = |since: Option<&str>, until: Option<&str>, sort: Option<&str>, limit| {
            EventQuery::parse("file", &[], false, since, until, sort, limit, None)
        };
        let d = parse(None, None, None, None).unwrap();
        assert_eq!((d.sort().to_string(), d.limit()), ("-ts".to_string(), 100));
        assert_eq!(
            parse(None, None, Some("path"), None)
                .unwrap()
                .sort()
                .to_string(),
            "path"
        );
        let e = parse(None, None, Some("-nope"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nope`") && e.contains("new_path"), "{e}");
        assert!(matches!(
            parse(None, None, None, Some(10_001)),
            Err(QueryError::BadLimit { given: 10_001 })
        ));
        assert!(matches!(
            parse(None, None, None, Some(0)),
            Err(QueryError::BadLimit { .. })
        ));
        assert_eq!(
            parse(None, None, None, Some(10_000)).unwrap().limit(),
            10_000
        );
        let e = parse(Some("last tuesday"), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`since`") && e.contains("RFC 3339"), "{e}");
        let ok = parse(
            Some("2026-11-28T14:03:07Z"),
            Some("1900000000000"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(ok.since(), Some(1_795_874_587_000));
        assert!(matches!(
            parse(Some("2000"), Some("1000"), None, None),
            Err(QueryError::EmptyWindow { .. })
        ));
    }

    /// Walks every page of a query, returning the ids in the order served.
    fn walk(
        conn: &Connection,
        wheres: &[&str],
        any: bool,
        since: Option<&str>,
        until: Option<&str>,
        sort: &str,
        limit: u32,
    ) -> Vec<i64> {
        let wheres: Vec<String> = wheres.iter().map(|s| s.to_string()).collect();
        let mut cursor: Option<String> = None;
        let mut all = Vec::new();
        loop {
            let q = EventQuery::parse(
                "file",
                &wheres,
                any,
                since,
                until,
                Some(sort),
                Some(limit),
                cursor.as_deref(),
            )
            .unwrap();
            let page = query_events(conn, &q).unwrap();
            assert!(page.events.len() <= limit as usize);
            all.extend(ids(&page));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return all,
            }
            assert!(all.len() < 100_000, "pagination does not terminate");
        }
    }

    #[test]
    fn walking_all_pages_returns_every_matching_row_once_in_order() {
        let conn = db();
        file_events(&conn, 300);
        for (sort, order) in [
            ("-ts", "ts DESC, id DESC"),
            ("ts", "ts ASC, id ASC"),
            ("id", "id ASC"),
            ("-id", "id DESC"),
            ("path", "path ASC, id ASC"),
            ("-path", "path DESC, id DESC"),
            ("size", "size ASC, id ASC"),
            ("-size", "size DESC, id DESC"),
        ] {
            for (wheres, any, since, until, cond) in [
                (vec![], false, None, None, "1"),
                (
                    vec!["path co bash"],
                    false,
                    None,
                    None,
                    "instr(path, 'bash') > 0",
                ),
                (
                    vec!["path co bash", "size isempty"],
                    true,
                    None,
                    None,
                    "(instr(path, 'bash') > 0 OR size IS NULL)",
                ),
                (
                    vec!["op eq write"],
                    false,
                    Some("1010"),
                    Some("1030"),
                    "op = 'write' AND ts >= 1010 AND ts < 1030",
                ),
            ] {
                let expected: Vec<i64> = conn
                    .prepare(&format!(
                        "SELECT id FROM file WHERE {cond} ORDER BY {order}"
                    ))
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert!(!expected.is_empty());
                for limit in [1, 7, 50, 1000] {
                    let got = walk(&conn, &wheres, any, since, until, sort, limit);
                    assert_eq!(
                        got, expected,
                        "sort {sort}, where {wheres:?}, limit {limit}"
                    );
                }
            }
        }
    }

    #[test]
    fn events_recorded_while_paging_do_not_repeat_or_shift_older_pages() {
        let conn = db();
        file_events(&conn, 50);
        let first =
            EventQuery::parse("file", &[], false, None, None, None, Some(20), None).unwrap();
        let first = query_events(&conn, &first).unwrap();
        // The recorder appends a newer event (51) and a late, older one (52) between requests.
        conn.execute_batch(
            "INSERT INTO file (id, ts, op) VALUES (51, 99999, 'write'), (52, 1001, 'write')",
        )
        .unwrap();
        let cursor = first.next_cursor.as_deref();
        let rest =
            EventQuery::parse("file", &[], false, None, None, None, Some(1000), cursor).unwrap();
        let mut all = ids(&first);
        all.extend(ids(&query_events(&conn, &rest).unwrap()));
        // 52 sorts after the first page, so it is served once; 51 is newer than the first page
        // and is left for a fresh query instead of shifting what was already shown.
        let expected: Vec<i64> = conn
            .prepare("SELECT id FROM file WHERE id <> 51 ORDER BY ts DESC, id DESC")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(all, expected);
    }

    #[test]
    fn a_cursor_only_fits_its_own_query() {
        let conn = db();
        file_events(&conn, 30);
        let wheres = vec!["path co bash".to_string()];
        let first =
            EventQuery::parse("file", &wheres, false, None, None, None, Some(2), None).unwrap();
        let cursor = query_events(&conn, &first).unwrap().next_cursor.unwrap();
        // Same query, bigger pages: fine.
        EventQuery::parse(
            "file",
            &wheres,
            false,
            None,
            None,
            None,
            Some(50),
            Some(&cursor),
        )
        .unwrap();
        let other_filter = vec!["path co home".to_string()];
        for bad in [
            EventQuery::parse(
                "file",
                &other_filter,
                false,
                None,
                None,
                None,
                Some(2),
                Some(&cursor),
            ),
            EventQuery::parse(
                "file",
                &wheres,
                false,
                None,
                None,
                Some("ts"),
                Some(2),
                Some(&cursor),
            ),
            EventQuery::parse(
                "file",
                &wheres,
                false,
                Some("5"),
                None,
                None,
                Some(2),
                Some(&cursor),
            ),
            EventQuery::parse(
                "image",
                &[],
                false,
                None,
                None,
                None,
                Some(2),
                Some(&cursor),
            ),
            EventQuery::parse(
                "file",
                &wheres,
                false,
                None,
                None,
                None,
                Some(2),
                Some("garbage"),
            ),
            EventQuery::parse(
                "file",
                &wheres,
                false,
                None,
                None,
                None,
                Some(2),
                Some("7b7d"),
            ),
            EventQuery::parse(
                "file",
                &wheres,
                false,
                None,
                None,
                None,
                Some(2),
                Some(&cursor[..cursor.len() - 2]),
            ),
        ] {
            let e = bad.unwrap_err();
            assert!(matches!(e, QueryError::BadCursor(_)), "{e}");
            assert_eq!(e.http_status(), 400);
            assert!(e.to_string().contains("drop `cursor`"), "{e}");
        }
    }

    #[test]
    fn sql_looking_values_are_searched_for_not_executed() {
        let conn = db();
        file_events(&conn, 20);
        conn.execute(
            "INSERT INTO file (id, ts, path) VALUES (100, 5000, ?)",
            ["x' OR 1=1 --"],
        )
        .unwrap();
        for (value, expected) in [
            ("x' OR 1=1 --", vec![100]),
            ("\"x' OR 1=1 --\"", vec![100]),
            ("'; DROP TABLE process; --", vec![]),
            ("%", vec![]),
        ] {
            let page =
                query_events(&conn, &q("file", &[&format!("path co {value}")]).unwrap()).unwrap();
            assert_eq!(ids(&page), expected, "{value}");
        }
        schema::check(&conn).unwrap();
    }

    fn plan(conn: &Connection, q: &EventQuery) -> String {
        let (sql, params) = q.to_sql().unwrap();
        let rows: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params_from_iter(params), |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.join("\n")
    }

    #[test]
    fn time_range_pages_use_the_ts_index_without_sorting() {
        let conn = db();
        file_events(&conn, 30);
        let wheres = vec!["path co x".to_string()];
        let parse = |cursor: Option<&str>| {
            EventQuery::parse(
                "file",
                &wheres,
                false,
                Some("1000"),
                Some("2000"),
                None,
                Some(2),
                cursor,
            )
            .unwrap()
        };
        let first = parse(None);
        let p = plan(&conn, &first);
        assert!(p.contains("INDEX file_ts (ts>? AND ts<?)"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        // Later pages fold the cursor into one ts range instead of scanning from `until` again.
        let wheres_all: Vec<String> = vec![];
        let q = EventQuery::parse(
            "file",
            &wheres_all,
            false,
            Some("1000"),
            Some("2000"),
            None,
            Some(2),
            None,
        )
        .unwrap();
        let cursor = query_events(&conn, &q).unwrap().next_cursor.unwrap();
        let next = EventQuery::parse(
            "file",
            &wheres_all,
            false,
            Some("1000"),
            Some("2000"),
            None,
            Some(2),
            Some(&cursor),
        )
        .unwrap();
        let p = plan(&conn, &next);
        assert!(p.contains("INDEX file_ts (ts>? AND ts<?)"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let (sql, _) = next.to_sql().unwrap();
        assert!(
            sql.contains("ts <= ?") && !sql.contains("ts < ? AND"),
            "{sql}"
        );
    }

    #[test]
    fn summary_counts_each_type_and_spans_all_tables() {
        let conn = db();
        let empty = summary(&conn).unwrap();
        assert_eq!(empty.total, 0);
        assert_eq!(empty.counts.len(), schema::event_type_names().len());
        assert_eq!((empty.oldest_ts, empty.newest_ts), (None, None));
        file_events(&conn, 30);
        conn.execute_batch(
            "INSERT INTO dns (ts, query) VALUES (5, 'a.example'), (9000, 'b.example');
             INSERT INTO meta (ts, key, value) VALUES (1, 'hostname', 'web-01');",
        )
        .unwrap();
        let s = summary(&conn).unwrap();
        assert_eq!(s.counts["file"], 30);
        assert_eq!(s.counts["dns"], 2);
        assert_eq!(s.counts["process"], 0);
        assert!(!s.counts.contains_key("meta"));
        assert_eq!(s.total, 32);
        assert_eq!((s.oldest_ts, s.newest_ts), (Some(5), Some(9000)));
    }

    fn process(conn: &Connection, id: i64, parent: Option<i64>, path: &str) {
        conn.execute(
            "INSERT INTO process (id, ts, pid, parent_id, path) VALUES (?1, ?1 * 10, ?1 + 100, ?2, ?3)",
            rusqlite::params![id, parent, path],
        )
        .unwrap();
    }

    #[test]
    fn process_tree_shows_ancestors_root_first_and_direct_children() {
        let conn = db();
        process(&conn, 1, None, "/sbin/init");
        process(&conn, 2, Some(1), "/usr/sbin/sshd");
        process(&conn, 3, Some(2), "/bin/bash");
        process(&conn, 5, Some(3), "/usr/bin/curl");
        process(&conn, 4, Some(3), "/usr/bin/sh");
        process(&conn, 6, Some(4), "/usr/bin/grandchild");
        let t = process_tree(&conn, 3).unwrap();
        let paths = |v: &[Event]| {
            v.iter()
                .map(|e| e["path"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(paths(&t.ancestors), ["/sbin/init", "/usr/sbin/sshd"]);
        assert_eq!(t.process["path"], "/bin/bash");
        assert_eq!(t.process["pid"], 103);
        assert_eq!(paths(&t.children), ["/usr/bin/sh", "/usr/bin/curl"]);
        assert!(!t.ancestors_truncated && !t.children_truncated);

        let root = process_tree(&conn, 1).unwrap();
        assert!(root.ancestors.is_empty());
        assert_eq!(paths(&root.children), ["/usr/sbin/sshd"]);

        let e = process_tree(&conn, 999).unwrap_err();
        assert!(matches!(e, QueryError::NotFound(_)));
        assert_eq!(
            (e.http_status(), e.to_string()),
            (404, "process 999 not found".to_string())
        );
    }

    #[test]
    fn process_tree_survives_cycles_and_missing_parents() {
        let conn = db();
        process(&conn, 10, Some(11), "/a");
        process(&conn, 11, Some(10), "/b");
        process(&conn, 12, Some(12), "/self");
        process(&conn, 13, Some(77), "/orphan");
        let t = process_tree(&conn, 10).unwrap();
        assert_eq!(t.ancestors.len(), 1);
        assert!(t.ancestors_truncated);
        assert_eq!(t.children.len(), 1);
        let t = process_tree(&conn, 12).unwrap();
        assert!(t.ancestors.is_empty() && t.children.is_empty() && t.ancestors_truncated);
        let t = process_tree(&conn, 13).unwrap();
        assert!(t.ancestors.is_empty() && !t.ancestors_truncated);
    }

    #[test]
    fn process_tree_caps_depth() {
        let conn = db();
        process(&conn, 1, None, "/root");
        for id in 2..=(MAX_TREE_DEPTH as i64 + 10) {
            process(&conn, id, Some(id - 1), "/deep");
        }
        let t = process_tree(&conn, MAX_TREE_DEPTH as i64 + 10).unwrap();
        assert_eq!(t.ancestors.len(), MAX_TREE_DEPTH);
        assert!(t.ancestors_truncated);
    }

    #[test]
    fn names_used_here_exist_in_the_schema() {
        let p = schema::event_table(PROCESS).unwrap();
        assert_eq!(p.column(PARENT_ID), Some(schema::ColType::Int));
        for t in schema::event_tables() {
            assert_eq!(t.column(ID), Some(schema::ColType::Int));
            assert_eq!(t.column(TS), Some(schema::ColType::Int));
        }
    }

    #[test]
    fn database_failures_are_internal_errors() {
        let conn = Connection::open_in_memory().unwrap(); // no recorder schema
        let e = summary(&conn).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Internal);
        assert_eq!(e.http_status(), 500);
        assert!(!e.is_client_error());
    }

    /// Speed check on a 1M-row `file` table against the `sqlite3` CLI running the same SQL.
    /// `cargo test -p snapq-core --release query::tests::speed -- --ignored --nocapture`
    #[test]
    #[ignore = "slow: builds a 1M-row database; run by hand for performance numbers"]
    fn speed_on_a_million_events_matches_the_sqlite_cli() {
        use std::time::{Duration, Instant};
        const ROWS: i64 = 1_000_000;
        const BASE_TS: i64 = 1_780_000_000_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("monitor.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        schema::create(&conn).unwrap();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let dirs = [
            "/usr/lib/x86_64-linux-gnu",
            "/home/alice/.cache/mozilla/firefox/x8k2.default/cache2/entries",
            "/var/log/journal/5f1c",
            "/tmp",
            "/etc/ssl/certs",
            "/proc/self/fd",
        ];
        let started = Instant::now();
        conn.execute_batch("BEGIN").unwrap();
        {
            let mut stmt = conn
                .prepare("INSERT INTO file (ts, process_id, op, path, new_path, size) VALUES (?, ?, ?, ?, ?, ?)")
                .unwrap();
            let mut ts = BASE_TS;
            for i in 0..ROWS {
                let r = rnd();
                ts += (r % 100) as i64; // ~50 ms apart, with ties
                let d = dirs[(r >> 8) as usize % dirs.len()];
                // One row in ~5000 holds the needle.
                let name = if (r >> 20) % 5000 == 0 {
                    "needle"
                } else {
                    "file"
                };
                let p = format!("{d}/{name}-{:016x}.dat", rnd());
                let new_path = (i % 10 == 0).then(|| format!("{p}.bak"));
                stmt.execute(rusqlite::params![
                    ts,
                    ((r >> 32) % 4000) as i64,
                    ["create", "write", "rename", "delete"][(r >> 40) as usize % 4],
                    p,
                    new_path,
                    ((r >> 44) % 1_000_000) as i64
                ])
                .unwrap();
            }
        }
        conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        let (min_ts, max_ts): (i64, i64) = conn
            .query_row("SELECT min(ts), max(ts) FROM file", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        eprintln!(
            "filled {ROWS} rows in {:?}, {} MB",
            started.elapsed(),
            std::fs::metadata(&path).unwrap().len() >> 20
        );

        fn median(mut v: Vec<Duration>) -> Duration {
            v.sort();
            v[v.len() / 2]
        }
        let time = |f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            t.elapsed()
        };

        // A time-range page: one hour somewhere in the data, newest 100 first.
        let mut pages = Vec::new();
        for _ in 0..50 {
            let since = min_ts + (rnd() % (max_ts - min_ts - 3_600_000) as u64) as i64;
            let (s, u) = (since.to_string(), (since + 3_600_000).to_string());
            pages.push(time(&mut || {
                let q = EventQuery::parse("file", &[], false, Some(&s), Some(&u), None, None, None)
                    .unwrap();
                assert_eq!(query_events(&conn, &q).unwrap().events.len(), 100);
            }));
        }
        let page_median = median(pages);
        eprintln!("time-range page of 100: median {page_median:?}");

        // A full-scan filter, through the engine and through the CLI with the same SQL: a rare
        // needle (the page fills part-way through) and an absent one (every row is read).
        let cols = schema::event_table("file").unwrap().column_list();
        let cli = |sql: &str| -> Duration {
            let script =
                format!(".timer on\n.output /dev/null\n{sql}\n{sql}\n{sql}\n{sql}\n{sql}\n");
            let out = std::process::Command::new("sqlite3")
                .arg("-readonly")
                .arg(&path)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(script.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            median(
                text.lines()
                    .filter_map(|l| l.strip_prefix("Run Time: real "))
                    .map(|l| {
                        Duration::from_secs_f64(
                            l.split_whitespace().next().unwrap().parse().unwrap(),
                        )
                    })
                    .collect(),
            )
        };
        let mut worst: f64 = 0.0;
        for needle in ["needle", "absent"] {
            let wheres = vec![format!("path co {needle}")];
            let q =
                EventQuery::parse("file", &wheres, false, None, None, None, None, None).unwrap();
            let found = query_events(&conn, &q).unwrap().events.len();
            let ours = median(
                (0..5)
                    .map(|_| {
                        time(&mut || {
                            query_events(&conn, &q).unwrap();
                        })
                    })
                    .collect(),
            );
            let same = cli(&format!(
                "SELECT {cols} FROM file WHERE (instr(path, '{needle}') > 0) ORDER BY ts DESC, id DESC LIMIT 101;"
            ));
            let like = cli(&format!(
                "SELECT {cols} FROM file WHERE path LIKE '%{needle}%' ORDER BY ts DESC LIMIT 100;"
            ));
            let like_unsorted = cli(&format!(
                "SELECT {cols} FROM file WHERE path LIKE '%{needle}%' LIMIT 100;"
            ));
            eprintln!(
                "full-scan `path co {needle}` ({found} shown): engine {ours:?}; sqlite3 CLI same SQL {same:?}, LIKE + ORDER BY ts {like:?}, LIKE unsorted {like_unsorted:?}"
            );
            let ratio = ours.as_secs_f64() / same.as_secs_f64();
            eprintln!("  ratio engine / CLI same SQL: {ratio:.2}");
            worst = worst.max(ratio);
        }

        let s = median(
            (0..5)
                .map(|_| {
                    time(&mut || {
                        summary(&conn).unwrap();
                    })
                })
                .collect(),
        );
        eprintln!("summary: median {s:?}");

        assert!(
            page_median < Duration::from_millis(25),
            "time-range page {page_median:?}"
        );
        assert!(worst < 1.5, "engine is {worst:.2}x the CLI");
    }
}

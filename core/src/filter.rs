//! The filter language users type to narrow events: `FIELD OP VALUE`, e.g. `path co bash`.
//!
//! The same text filters live endpoint queries, snapshots, exports and the CLI, so parsing and SQL
//! generation live here, once. The parser is purely syntactic ([`Condition`] knows nothing of
//! tables); [`Filter::validate`] and [`Filter::to_sql`] check a filter against a recorder
//! [`Table`]. User text never becomes SQL: field names in the generated SQL are the schema's own
//! `&'static str`s and every value is a bound parameter.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::Value;

use crate::schema::{ColType, Table};

/// The column every event table has: event time in UTC epoch milliseconds.
pub(crate) const TS: &str = "ts";

/// A comparison operator of the filter language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    /// Contains (case-sensitive, no wildcards).
    Co,
    /// Does not contain (a missing value does not contain anything).
    Nc,
    /// Starts with.
    Sw,
    /// Ends with.
    Ew,
    /// NULL or the empty string; takes no value.
    IsEmpty,
    /// `A..B`, both ends inclusive.
    Range,
}

impl Op {
    /// Every operator, in the order the docs and error messages list them.
    pub const ALL: [Op; 12] = [
        Op::Eq,
        Op::Ne,
        Op::Gt,
        Op::Gte,
        Op::Lt,
        Op::Lte,
        Op::Co,
        Op::Nc,
        Op::Sw,
        Op::Ew,
        Op::IsEmpty,
        Op::Range,
    ];

    /// The operator as users type it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Co => "co",
            Op::Nc => "nc",
            Op::Sw => "sw",
            Op::Ew => "ew",
            Op::IsEmpty => "isempty",
            Op::Range => "range",
        }
    }

    /// Names of all operators, for help texts and error messages.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|o| o.name()).collect()
    }

    /// Whether the operator compares text (and so makes no sense on a numeric column).
    fn is_textual(self) -> bool {
        matches!(self, Op::Co | Op::Nc | Op::Sw | Op::Ew)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|o| o.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| FilterError::UnknownOp {
                op: s.to_string(),
                valid: Op::names().join(", "),
            })
    }
}

/// Why a filter (or a time given next to it) is not usable. Messages say how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("empty condition: write `FIELD OP VALUE`, e.g. `path co bash`")]
    Empty,
    #[error("condition `{field}` has no operator: write `{field} OP VALUE` with OP one of {valid}")]
    MissingOp { field: String, valid: String },
    #[error("unknown operator `{op}`: use one of {valid}")]
    UnknownOp { op: String, valid: String },
    #[error("`{field} {op}` needs a value: write `{field} {op} VALUE`")]
    MissingValue { field: String, op: Op },
    #[error("`isempty` takes no value, but `{field} isempty` was given `{value}`: drop the value")]
    UnexpectedValue { field: String, value: String },
    #[error("unknown field `{field}` for {table} events: use one of {valid}")]
    UnknownField {
        field: String,
        table: String,
        valid: String,
    },
    #[error(
        "`{field}` is a number but `{value}` is not an integer: give a whole number such as 42"
    )]
    NotInteger { field: String, value: String },
    #[error(
        "`{field}` is a time but `{value}` is not one: give RFC 3339 (2026-11-28T14:03:07Z) or epoch milliseconds"
    )]
    NotTime { field: String, value: String },
    #[error(
        "operator `{op}` compares text but `{field}` is a number: use eq, ne, gt, gte, lt, lte, range or isempty"
    )]
    TextOpOnNumber { field: String, op: Op },
    #[error(
        "`range` needs `A..B` but `{field}` was given `{value}`: write e.g. `{field} range A..B`"
    )]
    BadRange { field: String, value: String },
    #[error("range `{value}` on `{field}` is empty: put the smaller bound first")]
    EmptyRange { field: String, value: String },
    #[error("invalid time `{value}`: give RFC 3339 (2026-11-28T14:03:07Z) or epoch milliseconds")]
    BadTime { value: String },
}

/// Parses a time as users give it, RFC 3339 or epoch milliseconds, into UTC epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, FilterError> {
    let t = s.trim();
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp_millis())
        .map_err(|_| FilterError::BadTime {
            value: s.to_string(),
        })
}

/// Time columns accept RFC 3339 as well as epoch ms. By the recorder's naming convention these are
/// `ts` and every `*_ts` column (e.g. `end_ts`), so a new time column needs no change here.
fn is_time_column(name: &str) -> bool {
    name == TS || name.ends_with("_ts")
}

/// One `FIELD OP VALUE` condition, as typed. Not yet checked against any table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Condition {
    pub field: String,
    pub op: Op,
    /// The value with surrounding quotes removed; empty for `isempty`.
    pub value: String,
}

/// Splits off the first whitespace-delimited token of `s` (which starts with a non-space).
fn split_token(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Removes one pair of matching surrounding quotes, if present.
fn unquote(s: &str) -> &str {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
        &s[1..s.len() - 1]
    } else {
        s
    }
}

impl FromStr for Condition {
    type Err = FilterError;

    /// `FIELD OP VALUE`: the value is the rest of the text after the operator, trimmed, with one
    /// pair of surrounding single or double quotes removed (quote to keep outer spaces).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(FilterError::Empty);
        }
        let (field, rest) = split_token(s);
        if rest.is_empty() {
            return Err(FilterError::MissingOp {
                field: field.to_string(),
                valid: Op::names().join(", "),
            });
        }
        let (op, rest) = split_token(rest);
        let op: Op = op.parse()?;
        let value = unquote(rest.trim_end());
        let field = field.to_string();
        match op {
            Op::IsEmpty if !value.is_empty() => Err(FilterError::UnexpectedValue {
                field,
                value: value.to_string(),
            }),
            Op::IsEmpty => Ok(Condition {
                field,
                op,
                value: String::new(),
            }),
            // An explicitly quoted empty string is a value; nothing at all is a mistake.
            _ if rest.is_empty() => Err(FilterError::MissingValue { field, op }),
            _ => Ok(Condition {
                field,
                op,
                value: value.to_string(),
            }),
        }
    }
}

impl fmt::Display for Condition {
    /// Writes text that [`Condition::from_str`] reads back to the same condition.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op == Op::IsEmpty {
            return write!(f, "{} {}", self.field, self.op);
        }
        let v = &self.value;
        let needs_quotes = v.is_empty() || v.trim() != v || v.starts_with(['"', '\'']);
        if needs_quotes {
            write!(f, "{} {} \"{}\"", self.field, self.op, v)
        } else {
            write!(f, "{} {} {}", self.field, self.op, v)
        }
    }
}

/// Conditions combined with AND, or with OR when `any` is set. No conditions match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Filter {
    pub conditions: Vec<Condition>,
    pub any: bool,
}

impl Filter {
    /// Parses each condition text (e.g. repeated `--where` flags).
    pub fn parse<S: AsRef<str>>(conditions: &[S], any: bool) -> Result<Filter, FilterError> {
        let conditions = conditions
            .iter()
            .map(|c| c.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(Filter { conditions, any })
    }

    /// Checks every field, operator and value against `table`.
    pub fn validate(&self, table: &Table) -> Result<(), FilterError> {
        self.to_sql(table).map(|_| ())
    }

    /// A parenthesised SQL boolean expression for a `WHERE` clause, with `?` placeholders and the
    /// values to bind to them in order. Fails as [`Filter::validate`] does.
    pub fn to_sql(&self, table: &Table) -> Result<(String, Vec<Value>), FilterError> {
        if self.conditions.is_empty() {
            return Ok(("(1)".to_string(), Vec::new()));
        }
        let mut params = Vec::new();
        let mut parts = Vec::with_capacity(self.conditions.len());
        for c in &self.conditions {
            parts.push(condition_sql(c, table, &mut params)?);
        }
        let joiner = if self.any { " OR " } else { " AND " };
        Ok((format!("({})", parts.join(joiner)), params))
    }
}

/// Finds the schema's own name for `field`, so that no user text reaches the SQL.
fn schema_column(table: &Table, field: &str) -> Result<(&'static str, ColType), FilterError> {
    table
        .all_columns()
        .find(|(c, _)| *c == field)
        .ok_or_else(|| FilterError::UnknownField {
            field: field.to_string(),
            table: table.name.to_string(),
            valid: table.column_list(),
        })
}

/// Converts one filter value to the SQL value bound for a column of type `ty`.
fn typed_value(col: &str, ty: ColType, value: &str) -> Result<Value, FilterError> {
    match ty {
        ColType::Text => Ok(Value::Text(value.to_string())),
        ColType::Int => {
            let v = value.trim();
            if let Ok(n) = v.parse::<i64>() {
                Ok(Value::Integer(n))
            } else if is_time_column(col) {
                parse_time(v)
                    .map(Value::Integer)
                    .map_err(|_| FilterError::NotTime {
                        field: col.to_string(),
                        value: value.to_string(),
                    })
            } else {
                Err(FilterError::NotInteger {
                    field: col.to_string(),
                    value: value.to_string(),
                })
            }
        }
    }
}

fn condition_sql(
    c: &Condition,
    table: &Table,
    params: &mut Vec<Value>,
) -> Result<String, FilterError> {
    let (col, ty) = schema_column(table, &c.field)?;
    if ty == ColType::Int && c.op.is_textual() {
        return Err(FilterError::TextOpOnNumber {
            field: col.to_string(),
            op: c.op,
        });
    }
    let cmp = |sym: &str, params: &mut Vec<Value>| -> Result<String, FilterError> {
        params.push(typed_value(col, ty, &c.value)?);
        Ok(format!("{col} {sym} ?"))
    };
    // Text operators compare bytes exactly: case-sensitive, `%` and `_` are ordinary characters,
    // and a NUL in the value or the column is data (`substr` on text stops at NUL, on blobs not).
    let text = || Value::Text(c.value.clone());
    let bytes = || Value::Blob(c.value.as_bytes().to_vec());
    let len = c.value.len() as i64;
    Ok(match c.op {
        Op::Eq => cmp("=", params)?,
        // A missing value is "not equal" to anything, as a user reading the grid would expect.
        Op::Ne => cmp("IS NOT", params)?,
        Op::Gt => cmp(">", params)?,
        Op::Gte => cmp(">=", params)?,
        Op::Lt => cmp("<", params)?,
        Op::Lte => cmp("<=", params)?,
        Op::Co => {
            params.push(text());
            format!("instr({col}, ?) > 0")
        }
        Op::Nc => {
            params.push(text());
            format!("({col} IS NULL OR instr({col}, ?) = 0)")
        }
        Op::Sw | Op::Ew if c.value.is_empty() => format!("{col} IS NOT NULL"),
        Op::Sw => {
            params.push(Value::Integer(len));
            params.push(bytes());
            format!("substr(CAST({col} AS BLOB), 1, ?) = ?")
        }
        Op::Ew => {
            params.push(Value::Integer(-len));
            params.push(bytes());
            format!("substr(CAST({col} AS BLOB), ?) = ?")
        }
        Op::IsEmpty => format!("({col} IS NULL OR {col} = '')"),
        Op::Range => {
            let (a, b) = c
                .value
                .split_once("..")
                .ok_or_else(|| FilterError::BadRange {
                    field: col.to_string(),
                    value: c.value.clone(),
                })?;
            let (a, b) = (typed_value(col, ty, a)?, typed_value(col, ty, b)?);
            let empty = match (&a, &b) {
                (Value::Integer(a), Value::Integer(b)) => a > b,
                (Value::Text(a), Value::Text(b)) => a > b,
                _ => false,
            };
            if empty {
                return Err(FilterError::EmptyRange {
                    field: col.to_string(),
                    value: c.value.clone(),
                });
            }
            params.push(a);
            params.push(b);
            format!("{col} BETWEEN ? AND ?")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{self, event_table};
    use proptest::prelude::*;
    use rusqlite::Connection;

    fn cond(s: &str) -> Condition {
        s.parse().unwrap()
    }

    #[test]
    fn condition_parses_field_op_and_the_rest_as_value() {
        assert_eq!(
            cond("cmdline co  /bin/bash -c 'echo hi'  "),
            Condition {
                field: "cmdline".into(),
                op: Op::Co,
                value: "/bin/bash -c 'echo hi'".into()
            }
        );
        assert_eq!(cond("path eq ' spaced '").value, " spaced ");
        assert_eq!(cond("path eq \"dq\"").value, "dq");
        assert_eq!(cond("path eq \"\"").value, "");
        assert_eq!(cond("path EQ x").op, Op::Eq);
        assert_eq!(cond("path isempty").value, "");
        assert_eq!(cond("path isempty ''").op, Op::IsEmpty);
    }

    #[test]
    fn malformed_conditions_say_what_to_write() {
        let err = |s: &str| s.parse::<Condition>().unwrap_err();
        assert_eq!(err("  "), FilterError::Empty);
        let e = err("path").to_string();
        assert!(e.contains("no operator") && e.contains("co"), "{e}");
        let e = err("path like %bash%");
        assert!(matches!(e, FilterError::UnknownOp { .. }));
        let msg = e.to_string();
        for op in Op::names() {
            assert!(msg.contains(op), "{msg} lacks {op}");
        }
        assert!(matches!(err("path co"), FilterError::MissingValue { .. }));
        assert!(matches!(
            err("path isempty x"),
            FilterError::UnexpectedValue { .. }
        ));
    }

    #[test]
    fn validate_names_the_valid_fields_of_the_table() {
        let table = event_table("dns").unwrap();
        let f = Filter::parse(&["path co x"], false).unwrap();
        let e = f.validate(table).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("unknown field `path`"), "{msg}");
        for (c, _) in table.all_columns() {
            assert!(msg.contains(c), "{msg} lacks {c}");
        }
    }

    #[test]
    fn validate_checks_values_against_column_types() {
        let process = event_table("process").unwrap();
        let check = |s: &str| Filter::parse(&[s], false).unwrap().validate(process);
        assert!(check("pid eq 42").is_ok());
        assert!(matches!(
            check("pid eq forty"),
            Err(FilterError::NotInteger { .. })
        ));
        assert!(check("ts gte 2026-11-28T14:03:07.091Z").is_ok());
        assert!(check("end_ts lt 2026-11-28T14:03:07+02:00").is_ok());
        assert!(matches!(
            check("ts gte yesterday"),
            Err(FilterError::NotTime { .. })
        ));
        assert!(matches!(
            check("pid co 4"),
            Err(FilterError::TextOpOnNumber { .. })
        ));
        assert!(matches!(
            check("pid range 4"),
            Err(FilterError::BadRange { .. })
        ));
        assert!(matches!(
            check("pid range 9..4"),
            Err(FilterError::EmptyRange { .. })
        ));
        assert!(check("pid range 4..9").is_ok());
        assert!(check("path range a..m").is_ok());
        assert!(check("pid isempty").is_ok());
    }

    #[test]
    fn parse_time_accepts_rfc3339_and_epoch_ms() {
        assert_eq!(parse_time("1764338587091"), Ok(1_764_338_587_091));
        assert_eq!(
            parse_time("2025-11-28T14:03:07.091Z"),
            Ok(1_764_338_587_091)
        );
        assert_eq!(
            parse_time("2025-11-28T16:03:07.091+02:00"),
            Ok(1_764_338_587_091)
        );
        let e = parse_time("28/11/2025").unwrap_err().to_string();
        assert!(e.contains("RFC 3339") && e.contains("epoch"), "{e}");
    }

    /// A `file` table holding the given paths (NULL for `None`), ids 1.. in order.
    fn file_db(paths: &[Option<&str>]) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        schema::create(&conn).unwrap();
        for (i, p) in paths.iter().enumerate() {
            conn.execute(
                "INSERT INTO file (id, ts, process_id, op, path, size) VALUES (?1, ?2, 1, 'write', ?3, ?4)",
                rusqlite::params![i as i64 + 1, 1000 + i as i64, p, (i as i64) * 10],
            )
            .unwrap();
        }
        conn
    }

    /// Ids of the `file` rows matching `filter`.
    fn matching(conn: &Connection, conditions: &[&str], any: bool) -> Vec<i64> {
        let table = event_table("file").unwrap();
        let (sql, params) = Filter::parse(conditions, any)
            .unwrap()
            .to_sql(table)
            .unwrap();
        let mut stmt = conn
            .prepare(&format!("SELECT id FROM file WHERE {sql} ORDER BY id"))
            .unwrap();
        stmt.query_map(rusqlite::params_from_iter(params), |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn each_operator_selects_the_rows_a_user_expects() {
        let conn = file_db(&[
            Some("/usr/bin/bash"),       // 1
            Some("/usr/bin/Bash"),       // 2
            Some("/tmp/100%_done.sh"),   // 3
            Some("/tmp/100xydone.sh"),   // 4
            None,                        // 5
            Some(""),                    // 6
            Some("/usr/lib/libbash.so"), // 7
        ]);
        let m = |s: &str| matching(&conn, &[s], false);
        assert_eq!(m("path eq /usr/bin/bash"), [1]);
        assert_eq!(m("path ne /usr/bin/bash"), [2, 3, 4, 5, 6, 7]);
        assert_eq!(m("path co bash"), [1, 7]);
        assert_eq!(m("path co %_"), [3], "% and _ are not wildcards");
        assert_eq!(m("path nc bash"), [2, 3, 4, 5, 6]);
        assert_eq!(m("path sw /usr/bin/"), [1, 2]);
        assert_eq!(
            m("path sw /usr/bin/B"),
            [2],
            "starts-with is case-sensitive"
        );
        assert_eq!(m("path sw /tmp/100%"), [3]);
        assert_eq!(m("path ew .sh"), [3, 4]);
        assert_eq!(m("path ew _done.sh"), [3]);
        assert_eq!(m("path ew bash"), [1]);
        assert_eq!(m("path isempty"), [5, 6]);
        assert_eq!(m("size gt 30"), [5, 6, 7]);
        assert_eq!(m("size gte 30"), [4, 5, 6, 7]);
        assert_eq!(m("size lt 20"), [1, 2]);
        assert_eq!(m("size lte 20"), [1, 2, 3]);
        assert_eq!(m("size range 10..30"), [2, 3, 4]);
        assert_eq!(m("ts range 1001..1002"), [2, 3]);
        assert_eq!(m("ts eq 1970-01-01T00:00:01.003Z"), [4]);
        assert_eq!(m("path range /tmp../tmq"), [3, 4]);
        assert_eq!(matching(&conn, &["path co bash", "size gt 0"], false), [7]);
        assert_eq!(
            matching(&conn, &["path co bash", "size gt 40"], true),
            [1, 6, 7]
        );
        assert_eq!(matching(&conn, &[], false), [1, 2, 3, 4, 5, 6, 7]);
    }

    /// Hostile values must come back as data: they match exactly the row that holds them.
    #[test]
    fn sql_looking_and_hostile_values_are_data() {
        let huge = "A".repeat(1 << 20);
        let hostile: Vec<String> = vec![
            "x' OR 1=1 --".into(),
            "x\" OR \"1\"=\"1".into(),
            "; DROP TABLE process; --".into(),
            "') OR ('a'='a".into(),
            "nul\0byte".into(),
            "%".into(),
            "_".into(),
            "\\".into(),
            "?1 ?2 :name @x $y".into(),
            "/* comment */".into(),
            "ünïcødé 🦀".into(),
            huge,
        ];
        let mut rows: Vec<Option<&str>> = vec![Some("/bin/innocent")];
        rows.extend(hostile.iter().map(|h| Some(h.as_str())));
        let conn = file_db(&rows);
        for (i, h) in hostile.iter().enumerate() {
            let id = i as i64 + 2;
            let c = |op: Op| Condition {
                field: "path".into(),
                op,
                value: h.clone(),
            };
            for op in [Op::Eq, Op::Co, Op::Sw, Op::Ew] {
                let text = c(op).to_string();
                let found = matching(&conn, &[&text], false);
                assert!(
                    found.contains(&id) && !found.contains(&1),
                    "{op} {:?}: {found:?}",
                    &h[..h.len().min(40)]
                );
            }
        }
        // The tables are all still there.
        schema::check(&conn).unwrap();
    }

    #[test]
    fn field_names_cannot_smuggle_sql() {
        let table = event_table("file").unwrap();
        for field in ["path;", "path--", "(path)", "1=1", "path OR 1", "\"path\""] {
            let f = Filter {
                conditions: vec![Condition {
                    field: field.into(),
                    op: Op::Eq,
                    value: "x".into(),
                }],
                any: false,
            };
            assert!(
                matches!(f.to_sql(table), Err(FilterError::UnknownField { .. })),
                "{field}"
            );
        }
    }

    fn any_op() -> impl Strategy<Value = Op> {
        proptest::sample::select(Op::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn condition_display_round_trips(
            field in "[a-z_][a-z0-9_]{0,15}",
            op in any_op(),
            value in any::<String>(),
        ) {
            let value = if op == Op::IsEmpty { String::new() } else { value };
            let c = Condition { field, op, value };
            let text = c.to_string();
            prop_assert_eq!(text.parse::<Condition>(), Ok(c));
        }

        #[test]
        fn arbitrary_text_never_panics_and_parses_stably(s in any::<String>()) {
            if let Ok(c) = s.parse::<Condition>() {
                prop_assert_eq!(c.to_string().parse::<Condition>(), Ok(c.clone()));
                let table = event_table("process").unwrap();
                let _ = Filter { conditions: vec![c], any: false }.to_sql(table);
            }
        }

        #[test]
        fn condition_like_text_never_panics(
            s in "[a-z_ ]{0,10} (eq|ne|gt|gte|lt|lte|co|nc|sw|ew|isempty|range)? ?[ -~\"'.]{0,20}"
        ) {
            if let Ok(c) = s.parse::<Condition>() {
                for table in schema::TABLES {
                    let _ = Filter { conditions: vec![c.clone()], any: true }.to_sql(table);
                }
            }
        }
    }
}

//! The endpoint recorder database schema: the one place that names its tables and columns.
//!
//! Everything that touches a recorder database (the recorders that write it, the query engine that
//! filters it, the verifier that accepts a snapshot) reads the table list from here, so a column added
//! here is writable, filterable and verified at once.

use rusqlite::Connection;

/// The storage class of a column, which decides how filter values are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    Int,
    Text,
}

/// One recorder table: its name and its columns beyond `id` and `ts`.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    /// Columns beyond `id` and `ts`, in insertion order.
    pub columns: &'static [(&'static str, ColType)],
}

use ColType::{Int, Text};

/// Every recorder table. `meta` is last; all others are event tables.
pub const TABLES: &[Table] = &[
    Table {
        name: "process",
        columns: &[
            ("process_id", Int),
            ("pid", Int),
            ("ppid", Int),
            ("parent_id", Int),
            ("path", Text),
            ("cmdline", Text),
            ("user", Text),
            ("sha256", Text),
            ("end_ts", Int),
            ("exit_code", Int),
        ],
    },
    Table {
        name: "file",
        columns: &[
            ("process_id", Int),
            ("op", Text),
            ("path", Text),
            ("new_path", Text),
            ("size", Int),
        ],
    },
    Table {
        name: "network",
        columns: &[
            ("process_id", Int),
            ("op", Text),
            ("protocol", Text),
            ("local_addr", Text),
            ("local_port", Int),
            ("remote_addr", Text),
            ("remote_port", Int),
        ],
    },
    Table {
        name: "dns",
        columns: &[
            ("process_id", Int),
            ("query", Text),
            ("qtype", Text),
            ("answer", Text),
        ],
    },
    Table {
        name: "image",
        columns: &[("process_id", Int), ("path", Text), ("sha256", Text)],
    },
    Table {
        name: "auth",
        columns: &[
            ("process_id", Int),
            ("op", Text),
            ("user", Text),
            ("source_addr", Text),
            ("session_type", Text),
        ],
    },
    Table {
        name: "registry",
        columns: &[
            ("process_id", Int),
            ("op", Text),
            ("key", Text),
            ("value_name", Text),
            ("value", Text),
        ],
    },
    Table {
        name: "meta",
        columns: &[("key", Text), ("value", Text)],
    },
];

/// The event tables (every table but `meta`), in schema order.
pub fn event_tables() -> impl Iterator<Item = &'static Table> {
    TABLES.iter().filter(|t| t.name != "meta")
}

/// Names of the event types, for error messages and summaries.
pub fn event_type_names() -> Vec<&'static str> {
    event_tables().map(|t| t.name).collect()
}

/// Looks up an event table by name (`meta` is not an event type).
pub fn event_table(name: &str) -> Option<&'static Table> {
    event_tables().find(|t| t.name == name)
}

impl Table {
    /// All columns a user may filter or sort on, `id` and `ts` first.
    pub fn all_columns(&self) -> impl Iterator<Item = (&'static str, ColType)> + '_ {
        [("id", Int), ("ts", Int)]
            .into_iter()
            .chain(self.columns.iter().copied())
    }

    /// The type of a column, or `None` if the table has no such column.
    pub fn column(&self, name: &str) -> Option<ColType> {
        self.all_columns().find(|(c, _)| *c == name).map(|(_, t)| t)
    }

    /// Comma-separated column names in table order, for `SELECT` and `INSERT`.
    pub fn column_list(&self) -> String {
        self.all_columns()
            .map(|(c, _)| c)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn ddl(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|(c, t)| {
                let ty = match t {
                    Int => "INTEGER",
                    Text => "TEXT",
                };
                format!("{c} {ty}")
            })
            .collect();
        let mut sql = format!(
            "CREATE TABLE IF NOT EXISTS {name} (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, {cols});\n\
             CREATE INDEX IF NOT EXISTS {name}_ts ON {name}(ts);\n",
            name = self.name,
            cols = cols.join(", ")
        );
        if self.column("process_id").is_some() {
            sql += &format!(
                "CREATE INDEX IF NOT EXISTS {name}_process ON {name}(process_id, ts);\n",
                name = self.name
            );
        }
        sql
    }
}

/// Extra indexes beyond the per-table ones of [`Table::ddl`].
const EXTRA_DDL: &str = "
CREATE INDEX IF NOT EXISTS process_parent ON process(parent_id);
CREATE UNIQUE INDEX IF NOT EXISTS meta_key ON meta(key);
";

/// Creates every recorder table and index that does not exist yet.
pub fn create(conn: &Connection) -> rusqlite::Result<()> {
    let mut sql = String::from("BEGIN;\n");
    for table in TABLES {
        sql += &table.ddl();
    }
    sql += EXTRA_DDL;
    sql += "COMMIT;";
    conn.execute_batch(&sql)
}

/// Why a database does not hold the recorder schema.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error("recorder table `{0}` is missing")]
    MissingTable(String),
    #[error("recorder table `{table}` has no column `{column}`")]
    MissingColumn { table: String, column: String },
    #[error("cannot read the schema: {0}")]
    Sqlite(String),
}

/// Checks that every recorder table and column is present (extra tables and columns are fine).
pub fn check(conn: &Connection) -> Result<(), SchemaError> {
    let sqlite = |e: rusqlite::Error| SchemaError::Sqlite(e.to_string());
    for table in TABLES {
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info(?1)")
            .map_err(sqlite)?;
        let present: Vec<String> = stmt
            .query_map([table.name], |r| r.get(0))
            .map_err(sqlite)?
            .collect::<Result<_, _>>()
            .map_err(sqlite)?;
        if present.is_empty() {
            return Err(SchemaError::MissingTable(table.name.into()));
        }
        if let Some((missing, _)) = table
            .all_columns()
            .find(|(c, _)| !present.iter().any(|p| p == c))
        {
            return Err(SchemaError::MissingColumn {
                table: table.name.into(),
                column: missing.into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_schema_passes_the_check() {
        let conn = Connection::open_in_memory().unwrap();
        create(&conn).unwrap();
        create(&conn).unwrap(); // idempotent
        check(&conn).unwrap();
    }

    #[test]
    fn check_names_the_missing_table_and_column() {
        let conn = Connection::open_in_memory().unwrap();
        assert_eq!(
            check(&conn),
            Err(SchemaError::MissingTable("process".into()))
        );
        create(&conn).unwrap();
        conn.execute_batch(
            "DROP TABLE dns; CREATE TABLE dns (id INTEGER PRIMARY KEY, ts INTEGER, query TEXT)",
        )
        .unwrap();
        assert_eq!(
            check(&conn),
            Err(SchemaError::MissingColumn {
                table: "dns".into(),
                column: "process_id".into()
            })
        );
    }
}

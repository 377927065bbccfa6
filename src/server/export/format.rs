//! The export file formats: CSV (RFC 4180, UTF-8, header row, formula guard), JSON Lines and XLSX
//! (constant-memory worksheets, a new sheet every 1,048,576 rows including its header).
//!
//! A [`Sink`] takes a header once and then rows of [`Cell`]s, one at a time, and writes them
//! straight to the file: nothing grows with the row count (XLSX rows go to the writer's
//! temporary files, which live in the export directory). The caller writes to a hidden partial
//! name and renames it once [`Sink::finish`] has flushed and fsynced it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The formats an export can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    Xlsx,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Csv, Format::Jsonl, Format::Xlsx];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Xlsx => "xlsx",
        }
    }

    /// The file name extension.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Jsonl => "application/jsonl",
            Format::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown export format `{s}`: use csv, jsonl or xlsx"))
    }
}

/// One value of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
}

impl<'a> From<rusqlite::types::ValueRef<'a>> for Cell<'a> {
    fn from(v: rusqlite::types::ValueRef<'a>) -> Cell<'a> {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null | ValueRef::Blob(_) => Cell::Null,
            ValueRef::Integer(i) => Cell::Int(i),
            ValueRef::Real(r) => Cell::Real(r),
            // Recorder text is UTF-8; anything else would not be a recorder's, so it is dropped
            // rather than written as bytes a spreadsheet would misread.
            ValueRef::Text(t) => std::str::from_utf8(t).map(Cell::Text).unwrap_or(Cell::Null),
        }
    }
}

impl<'a> From<&'a serde_json::Value> for Cell<'a> {
    fn from(v: &'a serde_json::Value) -> Cell<'a> {
        match v {
            serde_json::Value::Null => Cell::Null,
            serde_json::Value::Bool(b) => Cell::Int(*b as i64),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Cell::Int(i),
                None => n.as_f64().map(Cell::Real).unwrap_or(Cell::Null),
            },
            serde_json::Value::String(s) => Cell::Text(s),
            // Event columns are scalars; a nested value has no cell.
            _ => Cell::Null,
        }
    }
}

/// Whether a spreadsheet would read a text cell as a formula (or a command): `=`, `+`, `-`,
/// `@`, tab or carriage return first. Such a cell gets a `'` in front.
pub fn needs_formula_guard(text: &str) -> bool {
    matches!(
        text.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// Rows per XLSX worksheet, the header included (Excel's limit).
pub const XLSX_MAX_ROWS: u32 = 1_048_576;
/// The longest text an XLSX cell holds; longer text is cut (and marked) rather than failing.
const XLSX_MAX_TEXT: usize = 32_767;
const BUFFER: usize = 256 * 1024;

/// A file being written in one of the formats.
pub enum Sink {
    Csv(Box<csv::Writer<BufWriter<File>>>),
    Jsonl {
        out: BufWriter<File>,
        /// The header's names, already JSON-quoted and followed by `:`.
        keys: Vec<String>,
        path: PathBuf,
    },
    Xlsx(Box<XlsxSink>),
}

pub struct XlsxSink {
    workbook: rust_xlsxwriter::Workbook,
    header: Vec<String>,
    sheets: u32,
    /// The next row of the current sheet.
    row: u32,
    /// Rows per sheet, the header included ([`XLSX_MAX_ROWS`]).
    sheet_rows: u32,
    path: PathBuf,
}

fn xlsx_err(e: rust_xlsxwriter::XlsxError) -> io::Error {
    io::Error::other(format!("writing the XLSX file: {e}"))
}

impl Sink {
    /// Creates (truncating) `path` and writes the header.
    pub fn create(format: Format, path: &Path, header: &[&str]) -> io::Result<Sink> {
        Sink::create_with_sheet_rows(format, path, header, XLSX_MAX_ROWS)
    }

    /// [`Sink::create`] with XLSX sheets of `sheet_rows` rows (tests use a small number).
    fn create_with_sheet_rows(
        format: Format,
        path: &Path,
        header: &[&str],
        sheet_rows: u32,
    ) -> io::Result<Sink> {
        match format {
            Format::Csv => {
                let file = File::create(path)?;
                let mut w = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::CRLF)
                    .from_writer(BufWriter::with_capacity(BUFFER, file));
                w.write_record(header).map_err(io::Error::other)?;
                Ok(Sink::Csv(Box::new(w)))
            }
            Format::Jsonl => {
                let file = File::create(path)?;
                let keys = header
                    .iter()
                    .map(|h| format!("{}:", serde_json::Value::from(*h)))
                    .collect();
                Ok(Sink::Jsonl {
                    out: BufWriter::with_capacity(BUFFER, file),
                    keys,
                    path: path.to_owned(),
                })
            }
            Format::Xlsx => {
                let mut workbook = rust_xlsxwriter::Workbook::new();
                // The worksheets' temporary row files sit beside the export, not in /tmp.
                if let Some(dir) = path.parent() {
                    workbook.set_tempdir(dir).map_err(xlsx_err)?;
                }
                let mut sink = XlsxSink {
                    workbook,
                    header: header.iter().map(|h| h.to_string()).collect(),
                    sheets: 0,
                    row: 0,
                    sheet_rows: sheet_rows.max(2),
                    path: path.to_owned(),
                };
                sink.new_sheet()?;
                Ok(Sink::Xlsx(Box::new(sink)))
            }
        }
    }

    /// Writes one row; `cells` has one cell per header name.
    pub fn row(&mut self, cells: &[Cell<'_>]) -> io::Result<()> {
        match self {
            Sink::Csv(w) => {
                let mut num = itoa_buf::Buf::default();
                for cell in cells {
                    match cell {
                        Cell::Null => w.write_field(b""),
                        Cell::Int(i) => w.write_field(num.format(*i)),
                        Cell::Real(r) => w.write_field(r.to_string()),
                        Cell::Text(t) if needs_formula_guard(t) => {
                            let mut guarded = String::with_capacity(t.len() + 1);
                            guarded.push('\'');
                            guarded.push_str(t);
                            w.write_field(guarded)
                        }
                        Cell::Text(t) => w.write_field(t),
                    }
                    .map_err(io::Error::other)?;
                }
                w.write_record(None::<&[u8]>).map_err(io::Error::other)
            }
            Sink::Jsonl { out, keys, .. } => {
                out.write_all(b"{")?;
                for (i, (key, cell)) in keys.iter().zip(cells).enumerate() {
                    if i > 0 {
                        out.write_all(b",")?;
                    }
                    out.write_all(key.as_bytes())?;
                    match cell {
                        Cell::Null => out.write_all(b"null")?,
                        Cell::Int(n) => write!(out, "{n}")?,
                        Cell::Real(r) => serde_json::to_writer(&mut *out, r)?,
                        Cell::Text(t) => serde_json::to_writer(&mut *out, t)?,
                    }
                }
                out.write_all(b"}\n")
            }
            Sink::Xlsx(x) => x.row(cells),
        }
    }

    /// Flushes and fsyncs the file; the bytes written.
    pub fn finish(self) -> io::Result<u64> {
        let file = match self {
            Sink::Csv(w) => (*w)
                .into_inner()
                .map_err(|e| io::Error::other(e.to_string()))?
                .into_inner()
                .map_err(|e| e.into_error())?,
            Sink::Jsonl { out, .. } => out.into_inner().map_err(|e| e.into_error())?,
            Sink::Xlsx(mut x) => {
                x.workbook.save(&x.path).map_err(xlsx_err)?;
                File::open(&x.path)?
            }
        };
        file.sync_all()?;
        Ok(file.metadata()?.len())
    }

    /// The file being written (for JSON Lines and XLSX; CSV's is the caller's).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Sink::Csv(_) => None,
            Sink::Jsonl { path, .. } => Some(path),
            Sink::Xlsx(x) => Some(&x.path),
        }
    }
}

impl XlsxSink {
    fn new_sheet(&mut self) -> io::Result<()> {
        self.sheets += 1;
        let name = format!("Events {}", self.sheets);
        let sheet = self
            .workbook
            .add_worksheet_with_constant_memory()
            .map_err(xlsx_err)?;
        sheet.set_name(name).map_err(xlsx_err)?;
        for (col, h) in self.header.iter().enumerate() {
            sheet
                .write_string(0, col as u16, h.as_str())
                .map_err(xlsx_err)?;
        }
        self.row = 1;
        Ok(())
    }

    fn row(&mut self, cells: &[Cell<'_>]) -> io::Result<()> {
        if self.row >= self.sheet_rows {
            self.new_sheet()?;
        }
        let row = self.row;
        let index = self.sheets as usize - 1;
        let sheet = self
            .workbook
            .worksheet_from_index(index)
            .map_err(xlsx_err)?;
        for (col, cell) in cells.iter().enumerate() {
            let col = col as u16;
            match cell {
                Cell::Null => {}
                // Excel numbers are doubles: integers beyond 2^53 would lose digits, so they
                // are written as text.
                Cell::Int(i) if i.unsigned_abs() <= (1 << 53) => {
                    sheet.write_number(row, col, *i as f64).map_err(xlsx_err)?;
                }
                Cell::Int(i) => {
                    sheet
                        .write_string(row, col, i.to_string())
                        .map_err(xlsx_err)?;
                }
                Cell::Real(r) => {
                    sheet.write_number(row, col, *r).map_err(xlsx_err)?;
                }
                Cell::Text(t) => {
                    let text = if t.len() > XLSX_MAX_TEXT {
                        let mut end = XLSX_MAX_TEXT - 4;
                        while !t.is_char_boundary(end) {
                            end -= 1;
                        }
                        format!("{}…", &t[..end])
                    } else {
                        (*t).to_owned()
                    };
                    sheet.write_string(row, col, text).map_err(xlsx_err)?;
                }
            }
        }
        self.row += 1;
        Ok(())
    }
}

/// Integer formatting without an allocation per cell.
mod itoa_buf {
    use std::io::Write;

    #[derive(Default)]
    pub struct Buf {
        bytes: [u8; 24],
    }

    impl Buf {
        pub fn format(&mut self, n: i64) -> &[u8] {
            let mut cursor = std::io::Cursor::new(&mut self.bytes[..]);
            write!(cursor, "{n}").expect("an i64 fits in 24 bytes");
            let len = cursor.position() as usize;
            &self.bytes[..len]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_guard_covers_every_dangerous_first_character() {
        for t in [
            "=1+1",
            "+1",
            "-1",
            "@SUM(A1)",
            "\tx",
            "\rx",
            "=HYPERLINK(\"http://x\")",
        ] {
            assert!(needs_formula_guard(t), "{t:?}");
        }
        for t in ["", "a=1", "1-2", " =x", "ünïcode"] {
            assert!(!needs_formula_guard(t), "{t:?}");
        }
    }

    #[test]
    fn csv_rows_read_back_with_the_csv_crate_guarded_and_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.csv");
        let mut sink = Sink::create(Format::Csv, &path, &["id", "cmdline"]).unwrap();
        let hostile = "a,b \"q\"\nline\ttab ünï 日本";
        sink.row(&[Cell::Int(-7), Cell::Text("=HYPERLINK(\"http://x\")")])
            .unwrap();
        sink.row(&[Cell::Int(2), Cell::Text(hostile)]).unwrap();
        sink.row(&[Cell::Null, Cell::Text("@x")]).unwrap();
        let bytes = sink.finish().unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let mut r = csv::Reader::from_path(&path).unwrap();
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(&rows[0][0], "-7");
        assert_eq!(&rows[0][1], "'=HYPERLINK(\"http://x\")");
        assert_eq!(&rows[1][1], hostile);
        assert_eq!((&rows[2][0], &rows[2][1]), ("", "'@x"));
    }

    /// The sheets of an XLSX file, each as its XML, read with Python's zipfile.
    fn sheets(path: &Path) -> Vec<String> {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import json, sys, zipfile\n\
                 z = zipfile.ZipFile(sys.argv[1])\n\
                 names = sorted(n for n in z.namelist() if n.startswith('xl/worksheets/sheet'))\n\
                 print(json.dumps([z.read(n).decode() for n in names]))",
            )
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[test]
    fn xlsx_starts_a_new_sheet_with_its_header_when_one_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.xlsx");
        let mut sink =
            Sink::create_with_sheet_rows(Format::Xlsx, &path, &["id", "cmd"], 3).unwrap();
        for i in 1..=5 {
            sink.row(&[Cell::Int(i), Cell::Text("=1+1")]).unwrap();
        }
        sink.finish().unwrap();
        let sheets = sheets(&path);
        assert_eq!(
            sheets.len(),
            3,
            "3 rows per sheet, header included: 2 + 2 + 1"
        );
        for (sheet, ids) in sheets.iter().zip([[1, 2].as_slice(), &[3, 4], &[5]]) {
            assert!(sheet.contains(">id<") && sheet.contains(">cmd<"), "{sheet}");
            for id in ids {
                assert!(sheet.contains(&format!("<v>{id}</v>")), "{id} in {sheet}");
            }
            assert!(!sheet.contains("<f>"), "text, never a formula: {sheet}");
        }
        assert!(!sheets[0].contains("<v>3</v>"));
        // The worksheets' temporary files are gone.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn jsonl_lines_are_json_objects_with_every_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut sink = Sink::create(Format::Jsonl, &path, &["id", "path", "size"]).unwrap();
        sink.row(&[Cell::Int(1), Cell::Text("a\"\n\u{1}"), Cell::Null])
            .unwrap();
        sink.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "id": 1, "path": "a\"\n\u{1}", "size": null })
        );
    }
}

//! Snapshot file names: `<hostname>_YYYY_MM_DDTHH.MM.SS.mmmZ.db`, UTC, milliseconds.
//!
//! The one parser and formatter of these names. A [`SnapshotName`] can only hold a valid name, so code
//! that has one may use its hostname as a directory name and the whole as a file name without
//! re-checking: hostile names (`..`, `/`, NUL, absurd lengths, impossible dates) never get this far.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};

/// The longest file name we accept, in bytes (the usual file-system limit).
pub const MAX_NAME_BYTES: usize = 255;
const SUFFIX: &str = ".db";
/// `YYYY_MM_DDTHH.MM.SS.mmmZ`
const STAMP_LEN: usize = 24;

/// Why a snapshot name or hostname was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("snapshot name is longer than {MAX_NAME_BYTES} bytes")]
    TooLong,
    #[error("snapshot name must end in `.db`")]
    NoDbSuffix,
    #[error(
        "snapshot name must look like `hostname_YYYY_MM_DDTHH.MM.SS.mmmZ.db` (UTC, milliseconds), e.g. `web-01_2026_11_28T14.03.07.091Z.db`"
    )]
    BadTimestamp,
    #[error("the timestamp in the snapshot name is not a real date or time")]
    ImpossibleDate,
    #[error("hostname is empty")]
    EmptyHostname,
    #[error("hostname may only contain letters, digits, `-`, `_` and `.`, found {0:?}")]
    BadHostnameChar(char),
    #[error("hostname may not start with `.` or contain `..`")]
    DotHostname,
}

/// Checks that `host` is safe to use as a directory name and inside a snapshot name.
pub fn validate_hostname(host: &str) -> Result<(), NameError> {
    if host.is_empty() {
        return Err(NameError::EmptyHostname);
    }
    if host.len() > MAX_NAME_BYTES - STAMP_LEN - SUFFIX.len() - 1 {
        return Err(NameError::TooLong);
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::BadHostnameChar(c));
    }
    if host.starts_with('.') || host.contains("..") {
        return Err(NameError::DotHostname);
    }
    Ok(())
}

/// A valid snapshot file name: an endpoint's hostname and the UTC time of the copy, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotName {
    hostname: String,
    taken_at: DateTime<Utc>,
}

impl SnapshotName {
    /// A name for `hostname` at `taken_at`, truncated to milliseconds.
    pub fn new(hostname: &str, taken_at: DateTime<Utc>) -> Result<Self, NameError> {
        validate_hostname(hostname)?;
        let millis = taken_at.timestamp_millis();
        let taken_at = Utc
            .timestamp_millis_opt(millis)
            .single()
            .ok_or(NameError::ImpossibleDate)?;
        if !(0..=9999).contains(&taken_at.year()) {
            return Err(NameError::ImpossibleDate);
        }
        Ok(Self {
            hostname: hostname.to_owned(),
            taken_at,
        })
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    pub fn taken_at(&self) -> DateTime<Utc> {
        self.taken_at
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.taken_at;
        write!(
            f,
            "{}_{:04}_{:02}_{:02}T{:02}.{:02}.{:02}.{:03}Z{SUFFIX}",
            self.hostname,
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.timestamp_subsec_millis()
        )
    }
}

impl FromStr for SnapshotName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, NameError> {
        if name.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong);
        }
        let stem = name.strip_suffix(SUFFIX).ok_or(NameError::NoDbSuffix)?;
        // The timestamp is the fixed-width tail; everything before its `_` is the hostname, which
        // may itself contain `_`.
        let split = stem
            .len()
            .checked_sub(STAMP_LEN + 1)
            .filter(|&i| stem.is_char_boundary(i))
            .ok_or(NameError::BadTimestamp)?;
        let (host, stamp) = stem.split_at(split);
        let stamp = stamp.strip_prefix('_').ok_or(NameError::BadTimestamp)?;
        let taken_at = parse_stamp(stamp)?;
        validate_hostname(host)?;
        Ok(Self {
            hostname: host.to_owned(),
            taken_at,
        })
    }
}

/// Parses exactly `YYYY_MM_DDTHH.MM.SS.mmmZ`; every digit position is checked, no signs or spaces.
fn parse_stamp(s: &str) -> Result<DateTime<Utc>, NameError> {
    const PATTERN: &[u8] = b"dddd_dd_ddTdd.dd.dd.dddZ";
    let bytes = s.as_bytes();
    if bytes.len() != PATTERN.len()
        || !bytes.iter().zip(PATTERN).all(|(b, p)| match p {
            b'd' => b.is_ascii_digit(),
            _ => b == p,
        })
    {
        return Err(NameError::BadTimestamp);
    }
    let num =
        |range: std::ops::Range<usize>| -> u32 { s[range].parse().expect("digits checked above") };
    let date = NaiveDate::from_ymd_opt(num(0..4) as i32, num(5..7), num(8..10))
        .ok_or(NameError::ImpossibleDate)?;
    let time = date
        .and_hms_milli_opt(num(11..13), num(14..16), num(17..19), num(20..23))
        .ok_or(NameError::ImpossibleDate)?;
    // chrono accepts a leap second as 60 s; a file name never needs one.
    if num(17..19) > 59 {
        return Err(NameError::ImpossibleDate);
    }
    Ok(Utc.from_utc_datetime(&time))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_design_example() {
        let name: SnapshotName = "web-01_2026_11_28T14.03.07.091Z.db".parse().unwrap();
        assert_eq!(name.hostname(), "web-01");
        assert_eq!(
            name.taken_at(),
            Utc.with_ymd_and_hms(2026, 11, 28, 14, 3, 7).unwrap()
                + chrono::Duration::milliseconds(91)
        );
        assert_eq!(name.to_string(), "web-01_2026_11_28T14.03.07.091Z.db");
    }

    #[test]
    fn hostname_may_contain_underscores_and_dots() {
        let name: SnapshotName = "db_server.corp_2026_01_02T03.04.05.006Z.db"
            .parse()
            .unwrap();
        assert_eq!(name.hostname(), "db_server.corp");
    }

    #[test]
    fn hostile_names_are_rejected_with_a_reason() {
        let long = format!("{}_2026_11_28T14.03.07.091Z.db", "a".repeat(240));
        let cases: &[(&str, NameError)] = &[
            ("", NameError::NoDbSuffix),
            ("web-01.db", NameError::BadTimestamp),
            ("web-01_2026_11_28T14.03.07.091Z", NameError::NoDbSuffix),
            ("_2026_11_28T14.03.07.091Z.db", NameError::EmptyHostname),
            (
                "../etc_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar('/'),
            ),
            ("..", NameError::NoDbSuffix),
            (".._2026_11_28T14.03.07.091Z.db", NameError::DotHostname),
            ("a..b_2026_11_28T14.03.07.091Z.db", NameError::DotHostname),
            (
                ".hidden_2026_11_28T14.03.07.091Z.db",
                NameError::DotHostname,
            ),
            (
                "/abs_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar('/'),
            ),
            (
                "a\\b_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar('\\'),
            ),
            (
                "a\0b_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar('\0'),
            ),
            (
                "a\nb_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar('\n'),
            ),
            (
                "a b_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar(' '),
            ),
            (
                "hé_2026_11_28T14.03.07.091Z.db",
                NameError::BadHostnameChar('é'),
            ),
            (&long, NameError::TooLong),
            ("web_2026_02_30T14.03.07.091Z.db", NameError::ImpossibleDate),
            ("web_2026_13_01T14.03.07.091Z.db", NameError::ImpossibleDate),
            ("web_2026_11_28T24.03.07.091Z.db", NameError::ImpossibleDate),
            ("web_2026_11_28T14.60.07.091Z.db", NameError::ImpossibleDate),
            ("web_2026_11_28T14.03.60.091Z.db", NameError::ImpossibleDate),
            ("web_2026_11_28T14.03.07.91Z.db", NameError::BadTimestamp),
            ("web_2026_11_28T14:03:07.091Z.db", NameError::BadTimestamp),
            ("web_2026_11_28T14.03.07.091.db", NameError::BadTimestamp),
            ("web_+026_11_28T14.03.07.091Z.db", NameError::BadTimestamp),
            ("web_2026-11-28T14.03.07.091Z.db", NameError::BadTimestamp),
            ("web-2026_11_28T14.03.07.091Z.db", NameError::BadTimestamp),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<SnapshotName>().as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn multibyte_text_near_the_split_point_does_not_panic() {
        for s in [
            "é_2026_11_28T14.03.07.091Zé.db",
            "ééééééééééééééééééééééééé.db",
        ] {
            assert!(s.parse::<SnapshotName>().is_err());
        }
    }

    fn hostname() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9_-]{0,20}(\\.[A-Za-z0-9_-]{1,10}){0,3}"
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(host in hostname(), millis in 0i64..253_402_300_799_999) {
            let taken_at = Utc.timestamp_millis_opt(millis).unwrap();
            let name = SnapshotName::new(&host, taken_at).unwrap();
            let parsed: SnapshotName = name.to_string().parse().unwrap();
            prop_assert_eq!(&parsed, &name);
            prop_assert_eq!(parsed.taken_at().timestamp_millis(), millis);
        }

        #[test]
        fn parse_then_format_is_identity(s in "[a-z._-]{1,12}_[0-9]{4}_[0-9]{2}_[0-9]{2}T[0-9]{2}\\.[0-9]{2}\\.[0-9]{2}\\.[0-9]{3}Z\\.db") {
            if let Ok(name) = s.parse::<SnapshotName>() {
                prop_assert_eq!(name.to_string(), s);
            }
        }

        #[test]
        fn arbitrary_text_never_panics_and_accepted_names_are_safe(s in "\\PC{0,300}") {
            if let Ok(name) = s.parse::<SnapshotName>() {
                prop_assert!(!name.hostname().contains('/') && !name.hostname().contains(".."));
            }
        }
    }
}

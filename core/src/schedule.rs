//! Cron schedules in a time zone, and the failure limit of a batch: the pure parts of fleet
//! captures, so the scheduler and the CLI read a schedule the same way and the tests can walk a
//! daylight-saving day without a clock.
//!
//! Expressions have five fields (minute hour day-of-month month day-of-week) or an alias
//! (`@daily`, `@hourly`, ...), parsed by `croner`; the zone is an IANA name (`chrono-tz`). A
//! schedule's ticks are instants (UTC): [`CronSchedule::next_after`] finds the first local time
//! after an instant that matches, in the zone's own clock, so `30 2 * * *` in `Europe/Berlin`
//! means 02:30 Berlin time whatever the offset that day. On the spring-forward day the skipped
//! local hour has no 02:30: the tick runs at 03:00, the first moment after the gap (as Vixie cron
//! does), so a nightly capture still happens once that day; on the fall-back day 02:30 happens
//! twice and the schedule ticks once.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// Names of the five fields, for errors that point at one.
const FIELDS: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];

/// A schedule's expression or zone cannot be used; the message says which part and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

/// A parsed cron expression read in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    expr: String,
    tz: Tz,
}

fn parser() -> CronParser {
    CronParser::builder().seconds(Seconds::Disallowed).build()
}

impl CronSchedule {
    /// Parses `expr` (five fields or an `@` alias) in zone `tz` (an IANA name, `UTC` by default).
    pub fn parse(expr: &str, tz: &str) -> Result<CronSchedule, ScheduleError> {
        let tz = parse_zone(tz)?;
        let expr = expr.trim();
        if expr.is_empty() {
            return Err(ScheduleError(
                "the cron expression is empty; write five fields, e.g. `0 2 * * *` (02:00 daily)"
                    .into(),
            ));
        }
        if !expr.starts_with('@') {
            let fields: Vec<&str> = expr.split_whitespace().collect();
            if fields.len() != 5 {
                return Err(ScheduleError(format!(
                    "cron expression {expr:?} has {} field(s); write five: minute hour day-of-month month day-of-week (e.g. `0 2 * * *`)",
                    fields.len()
                )));
            }
            // Each field alone (the others `*`), so the error names the one that is wrong.
            for (i, field) in fields.iter().enumerate() {
                let mut probe = ["*"; 5];
                probe[i] = field;
                if let Err(e) = parser().parse(&probe.join(" ")) {
                    return Err(ScheduleError(format!(
                        "invalid cron expression {expr:?}: field {} ({}) {field:?} is not valid: {e}\n  {}\n  {}",
                        i + 1,
                        FIELDS[i],
                        fields.join(" "),
                        pointer(&fields, i)
                    )));
                }
            }
        }
        let cron = parser()
            .parse(expr)
            .map_err(|e| ScheduleError(format!("invalid cron expression {expr:?}: {e}")))?;
        Ok(CronSchedule {
            cron,
            expr: expr.to_owned(),
            tz,
        })
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn zone(&self) -> &str {
        self.tz.name()
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The latest tick at or before `at` (a tick missed while the server was down).
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// `t` as local time in the schedule's zone, for people.
    pub fn local_text(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.tz)
            .format("%Y-%m-%d %H:%M %Z")
            .to_string()
    }
}

/// `^^^` under field `i` of `fields` joined by single spaces.
fn pointer(fields: &[&str], i: usize) -> String {
    let start: usize = fields[..i].iter().map(|f| f.chars().count() + 1).sum();
    format!(
        "{}{}",
        " ".repeat(start),
        "^".repeat(fields[i].chars().count().max(1))
    )
}

/// An IANA zone name (`Europe/Berlin`, `UTC`).
pub fn parse_zone(tz: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(tz.trim()).map_err(|_| {
        ScheduleError(format!(
            "unknown time zone {:?}; use an IANA name such as UTC, Europe/Berlin or America/New_York",
            tz.chars().take(64).collect::<String>()
        ))
    })
}

/// When a batch pauses itself: after `N` failed captures, or once `P%` of its endpoints failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FailureLimit {
    Count(u64),
    Percent(u8),
}

impl FailureLimit {
    pub fn parse(text: &str) -> Result<FailureLimit, ScheduleError> {
        let text = text.trim();
        let bad = || {
            ScheduleError(format!(
                "--failure-limit {text:?}: write a number of failures (5) or a share of the batch (10%)"
            ))
        };
        match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(FailureLimit::Percent(p)),
                _ => Err(bad()),
            },
            None => match text.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(FailureLimit::Count(n)),
                _ => Err(bad()),
            },
        }
    }

    /// Whether `failed` failures out of `total` endpoints pass the limit.
    pub fn exceeded(self, failed: u64, total: u64) -> bool {
        match self {
            FailureLimit::Count(n) => failed >= n,
            FailureLimit::Percent(p) => failed > 0 && failed * 100 >= p as u64 * total.max(1),
        }
    }
}

impl std::fmt::Display for FailureLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureLimit::Count(n) => write!(f, "{n}"),
            FailureLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    /// Every tick in [from, to).
    fn ticks(s: &CronSchedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = from - chrono::Duration::seconds(1);
        while let Some(next) = s.next_after(t) {
            if next >= to {
                break;
            }
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn a_daily_schedule_follows_local_time_across_the_spring_forward_day() {
        // Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 02:30 does not exist that day.
        let s = CronSchedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let got = ticks(&s, utc(2026, 3, 27, 0, 0), utc(2026, 3, 31, 0, 0));
        // 02:30 CET = 01:30 UTC before; 02:30 CEST = 00:30 UTC after; on the 29th the missing
        // 02:30 runs once at 03:00 CEST (01:00 UTC), right after the gap.
        assert_eq!(
            got,
            vec![
                utc(2026, 3, 27, 1, 30),
                utc(2026, 3, 28, 1, 30),
                utc(2026, 3, 29, 1, 0),
                utc(2026, 3, 30, 0, 30)
            ],
            "{got:?}"
        );
        // An hourly schedule on that day: 23 ticks, none repeated.
        let hourly = CronSchedule::parse("0 * * * *", "Europe/Berlin").unwrap();
        let day = ticks(&hourly, utc(2026, 3, 28, 23, 0), utc(2026, 3, 29, 22, 0));
        assert_eq!(day.len(), 23, "{day:?}");
    }

    #[test]
    fn a_daily_schedule_ticks_once_on_the_fall_back_day() {
        // Europe/Berlin: 2026-10-25 03:00 CEST -> 02:00 CET; 02:30 happens twice.
        let s = CronSchedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let got = ticks(&s, utc(2026, 10, 24, 0, 0), utc(2026, 10, 27, 0, 0));
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], utc(2026, 10, 24, 0, 30)); // CEST
        assert!(
            got[1] == utc(2026, 10, 25, 0, 30) || got[1] == utc(2026, 10, 25, 1, 30),
            "{got:?}"
        );
        assert_eq!(got[2], utc(2026, 10, 26, 1, 30)); // CET
        // An hourly schedule on that day: 25 hours, each an own tick, strictly increasing.
        let hourly = CronSchedule::parse("0 * * * *", "Europe/Berlin").unwrap();
        let day = ticks(&hourly, utc(2026, 10, 24, 22, 0), utc(2026, 10, 25, 23, 0));
        assert!(day.windows(2).all(|w| w[0] < w[1]), "{day:?}");
        assert!((24..=25).contains(&day.len()), "{day:?}");
    }

    #[test]
    fn the_latest_missed_tick_is_found_for_a_catch_up_run() {
        let s = CronSchedule::parse("0 2 * * *", "UTC").unwrap();
        assert_eq!(
            s.latest_at_or_before(utc(2026, 12, 2, 9, 15)),
            Some(utc(2026, 12, 2, 2, 0))
        );
        assert_eq!(
            s.latest_at_or_before(utc(2026, 12, 2, 2, 0)),
            Some(utc(2026, 12, 2, 2, 0))
        );
    }

    #[test]
    fn an_invalid_expression_points_at_the_field_and_an_unknown_zone_is_named() {
        let e = CronSchedule::parse("0 25 * * *", "UTC").unwrap_err().0;
        assert!(e.contains("field 2 (hour) \"25\""), "{e}");
        assert!(e.contains("\n  0 25 * * *\n    ^^"), "{e}");
        let e = CronSchedule::parse("*/5 * * * mon-xyz", "UTC")
            .unwrap_err()
            .0;
        assert!(e.contains("field 5 (day of week)"), "{e}");
        let e = CronSchedule::parse("0 2 * *", "UTC").unwrap_err().0;
        assert!(e.contains("has 4 field(s)"), "{e}");
        let e = CronSchedule::parse("0 2 * * *", "Mars/Olympus")
            .unwrap_err()
            .0;
        assert!(e.contains("unknown time zone \"Mars/Olympus\""), "{e}");
        assert!(CronSchedule::parse("@daily", "America/New_York").is_ok());
    }

    #[test]
    fn failure_limits_count_or_share() {
        assert_eq!(FailureLimit::parse("3"), Ok(FailureLimit::Count(3)));
        assert_eq!(FailureLimit::parse("10%"), Ok(FailureLimit::Percent(10)));
        for bad in ["0", "0%", "101%", "-1", "x", ""] {
            assert!(FailureLimit::parse(bad).is_err(), "{bad}");
        }
        assert!(!FailureLimit::Count(3).exceeded(2, 100));
        assert!(FailureLimit::Count(3).exceeded(3, 100));
        assert!(!FailureLimit::Percent(10).exceeded(9, 100));
        assert!(FailureLimit::Percent(10).exceeded(10, 100));
        assert!(!FailureLimit::Percent(10).exceeded(0, 0));
    }
}

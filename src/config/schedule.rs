//! The daemon's schedule: `daemon.schedule` (a 5-field crontab, Sunday = 0 or 7) read once,
//! with `daemon.timezone`, into a [`Schedule`] the configuration holds. This is the only
//! reader of crontab text and time zone names: `check`, `status` and the daemon all use the
//! schedule made here.
//!
//! The accepted crontab is deliberately small: numbers, `*`, ranges `a-b`, steps `/n` and lists
//! (no names, no `L`, `W`, `#` or `?`), checked here with messages that name the field; croner
//! then interprets it. This file never reads a clock and never looks at a configuration file.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds};

/// A crontab compiled in its time zone.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    timezone: String,
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Schedule {
    /// `expr` in `timezone`; the first problem of either, if any.
    pub fn new(expr: &str, timezone: &str) -> Result<Self, String> {
        let cron = crontab(expr)?;
        let tz = time_zone(timezone)?;
        Ok(Schedule::from_parts(expr, cron, timezone, tz))
    }

    /// A schedule from a crontab and a time zone each read by this module.
    pub(super) fn from_parts(
        expr: &str,
        cron: croner::Cron,
        timezone: &str,
        tz: chrono_tz::Tz,
    ) -> Self {
        Schedule {
            text: expr.to_owned(),
            timezone: timezone.to_owned(),
            cron,
            tz,
        }
    }

    /// The crontab as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The time zone's name as written.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// The first scheduled time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?} in {})", self.text, self.timezone)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<&str> for Schedule {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

/// Reads a 5-field crontab line: the field count and ranges here, the meaning by croner.
pub(super) fn crontab(text: &str) -> Result<croner::Cron, String> {
    check_fields(text)?;
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("invalid schedule \"{text}\": {e}"))
}

/// Accepts `UTC` or an `Area/Location` name of the time zone database.
pub(super) fn time_zone(text: &str) -> Result<chrono_tz::Tz, String> {
    check_timezone(text)?;
    chrono_tz::Tz::from_str(text).map_err(|_| invalid_time_zone(text))
}

fn invalid_time_zone(text: &str) -> String {
    format!("invalid time zone \"{text}\"; use an IANA name like \"UTC\" or \"Europe/Berlin\"")
}

/// The field count and ranges of a 5-field crontab line.
fn check_fields(text: &str) -> Result<(), String> {
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day-of-month", 1, 31),
        ("month", 1, 12),
        ("day-of-week", 0, 7),
    ];
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() != FIELDS.len() {
        return Err(format!(
            "invalid schedule \"{text}\": expected 5 fields (minute hour day-of-month month day-of-week), found {}",
            fields.len()
        ));
    }
    for (field, (name, min, max)) in fields.iter().zip(FIELDS) {
        for item in field.split(',') {
            check_cron_item(item, min, max).map_err(|why| {
                format!("invalid schedule \"{text}\": {name} field \"{field}\": {why}")
            })?;
        }
    }
    Ok(())
}

fn check_cron_item(item: &str, min: u32, max: u32) -> Result<(), String> {
    let number = |text: &str| -> Result<u32, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "\"{item}\" is not *, a number, a range a-b or a step /n"
            ));
        }
        text.parse()
            .map_err(|_| format!("{text} is out of range {min}-{max}"))
    };
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        if number(step)? == 0 {
            return Err("a step must be at least 1".to_owned());
        }
    }
    if range == "*" {
        return Ok(());
    }
    let (low, high) = match range.split_once('-') {
        Some((low, high)) => (number(low)?, number(high)?),
        None => {
            let n = number(range)?;
            (n, n)
        }
    };
    for n in [low, high] {
        if !(min..=max).contains(&n) {
            return Err(format!("{n} is out of range {min}-{max}"));
        }
    }
    if low > high {
        return Err(format!("range {low}-{high} runs backwards"));
    }
    Ok(())
}

/// The shape of a time zone name: `UTC` or `Area/Location`.
fn check_timezone(text: &str) -> Result<(), String> {
    let segment_ok = |segment: &str| {
        !segment.is_empty()
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+'))
    };
    let segments: Vec<&str> = text.split('/').collect();
    let looks_iana = segments.len() >= 2
        && segments.iter().all(|segment| segment_ok(segment))
        && text.starts_with(|c: char| c.is_ascii_uppercase());
    if text == "UTC" || looks_iana {
        Ok(())
    } else {
        Err(invalid_time_zone(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn check_schedule(text: &str) -> Result<(), String> {
        crontab(text).map(|_| ())
    }

    fn check_timezone(text: &str) -> Result<(), String> {
        time_zone(text).map(|_| ())
    }

    #[test]
    fn schedules() {
        for good in [
            "*/15 * * * *",
            "0 0 * * 0",
            "0 0 * * 7",
            "5,10-20/5 0-23 1-31 1-12 0-7",
            "0 9-17 * * 1-5",
        ] {
            assert_eq!(check_schedule(good), Ok(()), "{good}");
        }
        for bad in [
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "10-5 * * * *",
            "a * * * *",
            "1, * * * *",
            "* * * JAN *",
        ] {
            assert!(check_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timezones() {
        for good in [
            "UTC",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
        ] {
            assert!(check_timezone(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "utc",
            "Berlin",
            "Europe/",
            "europe/berlin",
            "Europe Berlin",
        ] {
            assert!(check_timezone(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn weekday_one_is_monday_and_sunday_is_zero_or_seven() {
        let s = Schedule::new("0 2 * * 1", "UTC").unwrap();
        // 2026-11-28 is a Saturday.
        let next = s
            .next_after(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap())
            .unwrap();
        assert_eq!(
            (next.weekday(), next.hour(), next.minute()),
            (Weekday::Mon, 2, 0)
        );
        assert_eq!(next.day(), 30);
        for expr in ["0 0 * * 0", "0 0 * * 7"] {
            let n = Schedule::new(expr, "UTC")
                .unwrap()
                .next_after(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap())
                .unwrap();
            assert_eq!(n.weekday(), Weekday::Sun, "{expr}");
        }
    }

    #[test]
    fn schedules_follow_the_timezone_across_dst() {
        // Europe/Berlin leaves summer time on 2026-10-25: 02:30 local is 00:30 UTC before, 01:30 after.
        let s = Schedule::new("30 2 * * *", "Europe/Berlin").unwrap();
        let before = s
            .next_after(Utc.with_ymd_and_hms(2026, 10, 23, 12, 0, 0).unwrap())
            .unwrap();
        assert_eq!(
            before,
            Utc.with_ymd_and_hms(2026, 10, 24, 0, 30, 0).unwrap()
        );
        let after = s
            .next_after(Utc.with_ymd_and_hms(2026, 10, 25, 12, 0, 0).unwrap())
            .unwrap();
        assert_eq!(after, Utc.with_ymd_and_hms(2026, 10, 26, 1, 30, 0).unwrap());
        assert!(Schedule::new("0 2 * * *", "Mars/Olympus").is_err());
        assert!(
            Schedule::new("0 0 2 * * *", "UTC").is_err(),
            "six fields are not a crontab"
        );
    }
}

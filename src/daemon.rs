//! The daemon: reconciles on `daemon.schedule` (5-field crontab, Sunday = 0 or 7, in
//! `daemon.timezone`), reloads the configuration on SIGHUP, stops cleanly on SIGTERM/SIGINT.
//! Never runs two cycles at once: a cycle runs to completion before the next signal or tick
//! is looked at.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::cli::Cli;
use crate::config::{self, Config};

/// A parsed schedule in its timezone.
pub struct Schedule {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Schedule {
    pub fn new(expr: &str, timezone: &str) -> Result<Self, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| format!("daemon.schedule {expr:?}: {e}"))?;
        let tz = chrono_tz::Tz::from_str(timezone)
            .map_err(|_| format!("daemon.timezone {timezone:?} is not an IANA time zone name"))?;
        Ok(Schedule { cron, tz })
    }

    /// The first scheduled time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

pub fn next_run(config: &Config, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Schedule::new(&config.daemon.schedule, &config.daemon.timezone)
        .ok()?
        .next_after(now)
}

pub async fn run(cli: &Cli, mut config: Config, run_now: bool) -> u8 {
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("ldap2scim: error: cannot install signal handlers");
            return 1;
        }
    };
    let mut schedule = match Schedule::new(&config.daemon.schedule, &config.daemon.timezone) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ldap2scim: error: {e}");
            return 1;
        }
    };
    info!(schedule = %config.daemon.schedule, timezone = %config.daemon.timezone, "daemon started");
    let mut pending_now = run_now;
    loop {
        if pending_now {
            pending_now = false;
            let code = crate::commands::sync(&config, &[]).await;
            info!(exit_code = code, "cycle finished");
        }
        let Some(next) = schedule.next_after(Utc::now()) else {
            error!("the schedule has no future run; stopping");
            return 1;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        info!(next = %next, "next cycle scheduled");
        tokio::select! {
            _ = tokio::time::sleep(wait) => pending_now = true,
            _ = term.recv() => { info!("SIGTERM: stopping"); return 0; }
            _ = int.recv() => { info!("SIGINT: stopping"); return 0; }
            _ = hup.recv() => {
                match config::load(&cli.config) {
                    Ok(new) => match Schedule::new(&new.daemon.schedule, &new.daemon.timezone) {
                        Ok(s) => {
                            info!("SIGHUP: configuration reloaded; it applies from the next cycle");
                            schedule = s;
                            config = new;
                        }
                        Err(e) => warn!(error = %e, "SIGHUP: new configuration rejected; keeping the old one"),
                    },
                    Err(errs) => {
                        for e in &errs.0 {
                            warn!(error = %e, "SIGHUP: new configuration rejected; keeping the old one");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

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

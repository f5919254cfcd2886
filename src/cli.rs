//! The command line: commands and flags, exactly as SPEC.md names them.
//!
//! This file refers to nothing else in the crate: `build.rs` compiles it on its own to
//! generate the man page from the same definition.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// `--config` without the flag (and without `LDAP2SCIM_CONFIG`); equal to
/// `config::DEFAULT_CONFIG_PATH` (a unit test checks it).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ldap2scim/config.toml";

#[derive(Debug, Parser)]
#[command(
    name = "ldap2scim",
    version,
    about = "Keeps SCIM 2.0 applications in step with an LDAP or Active Directory directory"
)]
pub struct Cli {
    /// The main configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH, env = "LDAP2SCIM_CONFIG")]
    pub config: PathBuf,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More log detail (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Log format on stderr. Text is plain (no colours, no timestamps) under systemd, whose
/// journal adds its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The formats of the `plan` report (`report::Format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Markdown,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: reconcile on daemon.schedule until SIGTERM; SIGHUP reloads the configuration.
    Run {
        /// Run one cycle right away instead of waiting for the first scheduled time.
        #[arg(long)]
        now: bool,
    },
    /// One reconcile now, then exit (0 converged, 1 error, 3 a target failed, 4 changes held,
    /// 5 with --plan: some saved changes were stale).
    Sync {
        /// Only this target (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Read the whole directory instead of what the change feed says changed.
        #[arg(long)]
        full: bool,
        /// Only this user or group (repeatable): a user by DN, uid, mail, cn, userPrincipalName,
        /// sAMAccountName or directory id, a group by DN, cn or id; provisioned, updated or
        /// deprovisioned with every guard, nothing else touched. A leaver no longer in the
        /// directory is found by its userName (a group by its name) on each target.
        #[arg(long = "only", value_name = "DN-OR-NAME")]
        only: Vec<String>,
        /// Apply exactly the changes of a plan saved with `plan --out FILE` whose fingerprints
        /// still match; the others are reported stale and not applied (exit 5).
        #[arg(long = "plan", value_name = "FILE", conflicts_with_all = ["only", "full"])]
        saved_plan: Option<PathBuf>,
        /// With --plan: refuse a plan older than this ("24h", "90m", "7d").
        #[arg(
            long = "max-age",
            value_name = "DURATION",
            default_value = "24h",
            requires = "saved_plan"
        )]
        max_age: String,
    },
    /// The dry-run report: changes nothing anywhere (0 no changes, 2 changes pending, 1 error).
    Plan {
        /// Only this target (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Read the whole directory instead of what the change feed says changed.
        #[arg(long)]
        full: bool,
        /// Only this user or group (repeatable), as for `sync --only`.
        #[arg(long = "only", value_name = "DN-OR-NAME")]
        only: Vec<String>,
        /// text (default), json, or markdown; json when --out is given without it.
        #[arg(long, value_enum)]
        format: Option<ReportFormat>,
        /// Write the report to FILE instead of stdout. In json (the default with --out) it is
        /// a saved plan: every change carries a fingerprint, for `sync --plan FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Validate the configuration and every target file, printing all errors at once.
    Check {
        /// Also bind to LDAP and call each target's /ServiceProviderConfig.
        #[arg(long)]
        connect: bool,
    },
    /// Per target: last run, result, counts, held changes; the next scheduled run.
    Status,
    /// One user or group: directory entry, mapped resource and snapshot row per target, pending change.
    Explain {
        /// A DN, entryUUID/objectGUID, uid, mail, userPrincipalName or cn.
        name_or_dn: String,
    },
    /// Release the destructive changes a safety limit held in the last sync of a target.
    Approve {
        #[arg(long, value_name = "NAME")]
        target: String,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_config_path_is_the_one_config_documents() {
        assert_eq!(
            super::DEFAULT_CONFIG_PATH,
            crate::config::DEFAULT_CONFIG_PATH
        );
    }
}

//! The command line: commands and flags, exactly as SPEC.md names them.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::report::Format;

#[derive(Debug, Parser)]
#[command(
    name = "ldap2scim",
    version,
    about = "Keeps SCIM 2.0 applications in step with an LDAP or Active Directory directory"
)]
pub struct Cli {
    /// The main configuration file.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_CONFIG_PATH, env = "LDAP2SCIM_CONFIG")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: reconcile on daemon.schedule until SIGTERM; SIGHUP reloads the configuration.
    Run {
        /// Run one cycle right away instead of waiting for the first scheduled time.
        #[arg(long)]
        now: bool,
    },
    /// One reconcile now, then exit (0 converged, 1 error, 3 a target failed, 4 changes held).
    Sync {
        /// Only this target (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
    },
    /// The dry-run report: changes nothing anywhere (0 no changes, 2 changes pending, 1 error).
    Plan {
        /// Only this target (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write the report to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Validate the configuration and every target file, printing all errors at once.
    Check {
        /// Also bind to LDAP and call each target's /ServiceProviderConfig.
        #[arg(long)]
        connect: bool,
    },
    /// Per target: last run, result, counts, held changes.
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

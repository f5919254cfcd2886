//! Entry point: parse the command line, start telemetry, run the command, map its result to an
//! exit code. Nothing else lives here.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use ldap2scim::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc: a cycle allocates and frees millions of small strings
/// on several threads, where glibc's arenas cost time (lock contention, consolidation) and
/// resident memory (fragmentation). mimalloc was tried too: it returns freed pages to the
/// kernel so eagerly that a cycle spent a third of its time faulting them back in. Measured in
/// BENCHMARKS.md. Build with `--features system-allocator` to profile the heap with heaptrack.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One crypto provider for both LDAP (ldap3) and HTTPS (reqwest): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let default_level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("ldap2scim={default_level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        // The journal stamps and stores each line itself: no clock, no colours.
        LogFormat::Text if stderr_is_journal() => builder
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ldap2scim: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(ldap2scim::commands::execute(cli));
    // Everything that must be durable was flushed before the command returned; what may
    // still run on the blocking pool is freeing memory, which the exit does faster.
    runtime.shutdown_background();
    ExitCode::from(code)
}

/// Whether stderr is the journal stream systemd connected: `JOURNAL_STREAM` holds its
/// `device:inode`, which must match stderr's own (a child whose stderr was redirected
/// elsewhere inherits the variable but not the stream).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(expected) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2")
        .map(|m| format!("{}:{}", m.dev(), m.ino()) == expected)
        .unwrap_or(false)
}

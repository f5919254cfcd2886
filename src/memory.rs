//! The process's own resident memory, for debug lines and metrics. A leaf: it depends on
//! nothing else in the crate, so every stage may call it.

/// The process's resident memory in MiB (Linux `/proc/self/status`), for debug timings;
/// 0 where it cannot be read.
pub fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

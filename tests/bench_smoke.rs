//! The scale benchmark (`benches/scale.rs`, run by `scripts/bench.sh`) at a tiny size: 300
//! users. Not a timing test: it proves every measurement runs and the benchmark's own checks
//! hold (a no-op cycle sends no SCIM write), so the benchmark cannot rot between full runs.
//! Without `wrk` installed, the server-capacity baseline is skipped.

#[allow(dead_code)]
#[path = "../benches/scale.rs"]
mod scale;

#[test]
fn the_scale_benchmark_runs_at_a_tiny_size() {
    let options = scale::Options::small();
    let report = scale::run(&options);
    println!("{}", report.render());

    assert_eq!(report.sizes.len(), 3, "three directory sizes are measured");
    let full = report.full();
    assert_eq!(full.users, options.users);
    assert_eq!(
        report.library_read_counts,
        (options.users, options.users / 10 + 1),
        "source::read returns every user and group"
    );
    for size in &report.sizes {
        assert!(size.initial_sync.peak_rss_kib > 0, "peak RSS was sampled");
        assert_eq!(size.noop_sink_writes, 0, "a no-op sync sends no write");
        assert_eq!(size.noop_sync.writes, Some(0), "ldap2scim counts no write");
    }
    assert!(report.baseline() > std::time::Duration::ZERO);
    assert!(report.library_read > std::time::Duration::ZERO);

    assert_eq!(report.pushes.len(), options.concurrencies.len());
    for push in &report.pushes {
        assert_eq!(push.sync.code, 0);
        assert!(push.objects_per_s > 0.0);
        let (objects, departments) = &push.departments;
        assert_eq!(departments.code, 0, "the push without g-all ran");
        assert_eq!(
            *objects,
            push.objects - 1,
            "the same directory without g-all"
        );
        assert_eq!(
            departments.writes,
            Some(*objects + options.push_users.div_ceil(10)),
            "users, department groups and one member PATCH each"
        );
        assert_eq!(
            push.replay.phases.len(),
            4,
            "the load generator's phases are timed"
        );
    }
    let (_, writes, requests, _) = report
        .noop_real
        .expect("no-op against scim2-server measured");
    assert_eq!(writes, 0, "no-op sync against scim2-server wrote");
    assert!(requests > 0, "the no-op sync went through the proxy");
    assert!(report.render().contains("### 4. Peak RSS"));

    let feed = report.feed.as_ref().expect("the change feed was measured");
    assert_eq!(feed.noop_writes, 0, "a no-op delta sends no write");
    assert_eq!(
        feed.delta_sync.writes,
        Some(feed.changed),
        "one PATCH per changed user"
    );
    let live = feed.live.as_ref().expect("live mode was measured");
    assert_eq!(
        live.arrived, live.changes,
        "every live change reached the sink"
    );
    assert!(live.rss_after_kib > 0);
    assert!(report.render().contains("### 5. Change feed"));
}

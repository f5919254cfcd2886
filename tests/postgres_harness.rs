//! Tests of the PostgreSQL part of the test harness (tests/support/postgres.rs): the server
//! starts, answers, keeps its data across a restart, and leaves nothing behind. They use only
//! the harness, not the ldap2scim library.

mod support;

use std::time::Instant;

use support::*;

#[test]
fn postgres_answers_stops_and_starts_again() {
    let t0 = Instant::now();
    let mut pg = Postgres::start();
    eprintln!("postgres ready in {:?} on port {}", t0.elapsed(), pg.port());
    assert!(pg.is_running());
    assert_eq!(
        pg.dsn("sync"),
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=sync connect_timeout=5",
            pg.port()
        )
    );

    pg.create_database("sync");
    assert_eq!(pg.psql("sync", "select 1").trim(), "1");
    pg.psql(
        "sync",
        "create table kept (id int primary key, name text); insert into kept values (1, 'ann')",
    );
    assert_eq!(pg.psql("sync", "select id, name from kept").trim(), "1|ann");

    let pid = pg.pid();
    pg.stop();
    assert!(!pg.is_running());
    assert!(is_reaped(pid), "postmaster {pid} still exists");

    pg.start_again();
    assert!(pg.is_running());
    assert_ne!(pg.pid(), pid);
    assert_eq!(pg.psql("sync", "select 1").trim(), "1");
    assert_eq!(pg.psql("sync", "select name from kept").trim(), "ann");

    let (pid, dir) = (pg.pid(), pg.dir().to_path_buf());
    drop(pg);
    assert!(is_reaped(pid), "postmaster {pid} still exists");
    if std::env::var_os("LDAP2SCIM_TEST_KEEP").is_none() {
        assert!(!dir.exists(), "{} not removed", dir.display());
    }
}

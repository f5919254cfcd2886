//! Issue 15, the lease and the ledger themselves (`ldap2scim::ha`), against a real PostgreSQL
//! on loopback: one holder at a time with a rising epoch, a lease taken only once it ended,
//! the fence closing before the lease ends, a stale holder's ledger row refused by the
//! database, and the standby's snapshot fed from the ledger.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use ldap2scim::apply::advance::Update;
use ldap2scim::config::{HaConfig, Secret};
use ldap2scim::ha::{Ha, Role, Writer};
use ldap2scim::model::{DirectoryId, ScimId};
use ldap2scim::snapshot::{GroupRow, Ownership, Snapshot, UserRow, UserState};
use support::*;

fn config(dsn: &str, instance: &str, ttl: Duration) -> HaConfig {
    HaConfig {
        dsn: Secret::new(dsn.to_string()),
        lease_ttl: ttl,
        instance: instance.to_string(),
    }
}

fn user(scim_id: &str, name: &str) -> UserRow {
    let mut attrs = ldap2scim::map::FlatAttrs::new();
    attrs.insert("userName".into(), serde_json::json!(name));
    UserRow {
        scim_id: ScimId(scim_id.into()),
        user_name: name.into(),
        hash: format!("hash-{name}"),
        attrs: ldap2scim::map::SharedAttrs::pack(&attrs),
        etag: None,
        state: UserState::Active,
        owned: Ownership::Created,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_a_rising_epoch_and_a_fence_that_closes_first() {
    let pg = Postgres::start();
    pg.create_database("lease");
    let dsn = pg.dsn("lease");
    let ttl = Duration::from_secs(2);
    let a = Ha::new(config(&dsn, "a", ttl), false);
    let b = Ha::new(config(&dsn, "b", ttl), false);

    let Role::Active { epoch: first, .. } = a.step(true).await else {
        panic!("a did not take a free lease: {:?}", a.role());
    };
    assert_eq!(first, 1);
    match b.step(true).await {
        Role::Standby { holder, epoch, .. } => assert_eq!((holder.as_str(), epoch), ("a", 1)),
        other => panic!("b took a held lease: {other:?}"),
    }
    // A renewal keeps the epoch.
    assert!(matches!(a.step(false).await, Role::Active { epoch: 1, .. }));
    let writer = Writer::now(&a).unwrap();
    assert!(writer.fence(Duration::from_millis(500)).is_ok());
    // A write that could outlast the lease may not start.
    let refused = writer.fence(Duration::from_secs(5)).unwrap_err();
    assert!(refused.contains("less than the request"), "{refused}");
    // Not renewed: the fence closes before the lease ends, and only then may b take it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(writer
        .fence(a.write_timeout(Duration::from_secs(30)))
        .is_err());
    assert!(matches!(b.step(false).await, Role::Standby { .. }));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let Role::Active { epoch: second, .. } = b.step(false).await else {
        panic!("b did not take the ended lease: {:?}", b.role());
    };
    assert_eq!(second, 2);
    // a's renewal fails now: it is the standby, and its old writer stays fenced.
    assert!(matches!(
        a.step(false).await,
        Role::Standby { epoch: 2, .. }
    ));
    assert!(writer.fence(Duration::ZERO).is_err());
    assert!(!writer.current());

    // The database itself refuses a ledger row from the old epoch.
    let row = vec![Update::PutUser(
        DirectoryId("id-1".into()),
        user("s1", "ann"),
    )];
    let refused = a.record(1, "app", &row).await.unwrap_err();
    assert!(
        refused.contains("wait for the lease") || refused.contains("no longer ours"),
        "{refused}"
    );
    assert_eq!(
        pg.psql("lease", "SELECT count(*) FROM ldap2scim_ledger")
            .trim(),
        "0"
    );
    // A clean stop releases the lease at once.
    b.release().await;
    assert!(matches!(a.step(false).await, Role::Active { epoch: 3, .. }));

    // Another machine given the same name never takes a live lease by that name; a process of
    // the same state directory (its token) does, at once: its predecessor is gone.
    let state = tempfile::tempdir().unwrap();
    let c = Ha::open(config(&dsn, "c", ttl), false, state.path()).unwrap();
    a.release().await;
    assert!(matches!(c.step(true).await, Role::Active { epoch: 4, .. }));
    let twin = Ha::new(config(&dsn, "c", ttl), false);
    assert!(matches!(
        twin.step(true).await,
        Role::Standby { epoch: 4, .. }
    ));
    let restarted = Ha::open(config(&dsn, "c", ttl), false, state.path()).unwrap();
    assert!(matches!(
        restarted.step(true).await,
        Role::Active { epoch: 5, .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_applies_the_ledger_to_its_snapshot() {
    let pg = Postgres::start();
    pg.create_database("ledger");
    let dsn = pg.dsn("ledger");
    let ttl = Duration::from_secs(30);
    let a = Ha::new(config(&dsn, "a", ttl), false);
    let b = Ha::new(config(&dsn, "b", ttl), false);
    assert!(matches!(a.step(true).await, Role::Active { .. }));
    assert!(matches!(b.step(true).await, Role::Standby { .. }));
    let epoch = a.epoch().unwrap();

    let ann = DirectoryId("id-ann".into());
    let bob = DirectoryId("id-bob".into());
    let staff = DirectoryId("id-staff".into());
    let group = GroupRow {
        scim_id: ScimId("g1".into()),
        display_name: "staff".into(),
        members: BTreeSet::from([ann.clone(), bob.clone()]),
        etag: Some("W/\"1\"".into()),
        owned: Ownership::Created,
    };
    a.record(
        epoch,
        "app",
        &[
            Update::PutUser(ann.clone(), user("s-ann", "ann")),
            Update::PutUser(bob.clone(), user("s-bob", "bob")),
            Update::PutGroup(staff.clone(), group.clone()),
        ],
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snapshot = Snapshot::open(dir.path()).unwrap();
    assert_eq!(b.catch_up(&snapshot).await.unwrap(), 3);
    let state = snapshot.target("app").unwrap().load().unwrap();
    assert_eq!(state.users[&ann].scim_id.0, "s-ann");
    assert_eq!(state.groups[&staff], group);
    let mut with_attrs = state.clone();
    snapshot
        .target("app")
        .unwrap()
        .load_attrs(&mut with_attrs, [&ann])
        .unwrap();
    assert_eq!(with_attrs.users[&ann].attrs, user("s-ann", "ann").attrs);

    // A leaver removed, a rename: only what changed since is read, and applied.
    a.record(
        epoch,
        "app",
        &[
            Update::RemoveUser(bob.clone()),
            Update::PutUser(ann.clone(), user("s-ann", "ann.smith")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(b.catch_up(&snapshot).await.unwrap(), 2);
    let state = snapshot.target("app").unwrap().load().unwrap();
    assert!(!state.users.contains_key(&bob));
    assert_eq!(state.users[&ann].user_name, "ann.smith");
    assert_eq!(b.catch_up(&snapshot).await.unwrap(), 0);
    // The row counts follow the ledger, so fewer rows never look like a lost snapshot.
    assert_eq!(snapshot.lost_rows("app", 1, 1), None);
    // The active skips its own rows of its epoch: they are in its snapshot already.
    let own = tempfile::tempdir().unwrap();
    let own = Snapshot::open(own.path()).unwrap();
    assert_eq!(a.catch_up(&own).await.unwrap(), 0);

    // Rows from before the ledger (a pair set up on a running deployment): the holder seeds
    // the ledger with what it lacks, once; a standby starting from nothing gets them all.
    let old = own.target("legacy").unwrap();
    for i in 0..1500 {
        let id = DirectoryId(format!("id-{i:04}"));
        old.put_user(&id, &user(&format!("s-{i}"), &format!("user{i}")))
            .unwrap();
    }
    assert_eq!(a.seed(&own, &["legacy", "app"]).await.unwrap(), 1500);
    assert_eq!(a.seed(&own, &["legacy", "app"]).await.unwrap(), 0);
    let fresh = tempfile::tempdir().unwrap();
    let fresh = Snapshot::open(fresh.path()).unwrap();
    b.catch_up(&fresh).await.unwrap();
    let legacy = fresh.target("legacy").unwrap().load().unwrap();
    assert_eq!(legacy.users.len(), 1500);
    assert_eq!(
        legacy.users[&DirectoryId("id-0042".into())].user_name,
        "user42"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_blip_keeps_the_lease_and_what_the_ledger_is_owed() {
    let mut pg = Postgres::start();
    pg.create_database("blip");
    let dsn = pg.dsn("blip");
    let a = Ha::new(config(&dsn, "a", Duration::from_secs(30)), false);
    assert!(matches!(a.step(true).await, Role::Active { epoch: 1, .. }));

    pg.stop();
    let ann = DirectoryId("id-ann".into());
    let row = [Update::PutUser(ann.clone(), user("s-ann", "ann"))];
    assert!(a.record(1, "app", &row).await.is_err());
    assert!(matches!(a.role(), Role::Unreachable { .. }));
    assert!(
        a.fence(Duration::ZERO).is_err(),
        "no writes without the database"
    );
    assert!(matches!(a.step(false).await, Role::Unreachable { .. }));

    pg.start_again();
    // Still ours: renewed with the same epoch, and the row it was owed goes in first.
    assert!(matches!(a.step(false).await, Role::Active { epoch: 1, .. }));
    a.settle().await.unwrap();
    assert_eq!(
        pg.psql(
            "blip",
            "SELECT directory_id || ' ' || epoch FROM ldap2scim_ledger"
        )
        .trim(),
        "id-ann 1"
    );
}

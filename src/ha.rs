//! `[ha]`: two instances, one writer. A lease row in PostgreSQL names the instance that may
//! write to the targets and its *epoch*, which goes up by one on every change of holder. The
//! database's clock decides expiry; this process keeps a conservative local deadline for it
//! (the instant it sent the renewal plus what the database said was left), and lets a write
//! request start only while more than the request's whole timeout is left ([`Ha::fence`]).
//! A renewal that fails closes the fence at once.
//!
//! Every row update a target acknowledged is also written to the *ledger* (the ownership
//! ledger: target, directory id, SCIM id, state, content hash, epoch), in the same statement
//! that checks the lease (a stale holder's insert finds no lease row and writes nothing). The
//! standby applies the ledger to its own snapshot ([`Ha::catch_up`]), so on promotion it
//! resumes from the active's rows: nothing is listed again, nothing looks like an orphan.
//!
//! It must never let a write start without a lease valid for longer than that write can
//! take, nor take the lease from a holder whose lease the database does not say has ended.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::apply::advance::Update;
use crate::config::HaConfig;
use crate::model::DirectoryId;
use crate::snapshot::{Snapshot, SnapshotError, UserRow};

/// The tables, created when missing (in the connection's schema: its `search_path`).
const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7714210);
CREATE TABLE IF NOT EXISTS ldap2scim_lease (
    id integer PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL DEFAULT '',
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    renewed_at timestamptz
);
INSERT INTO ldap2scim_lease (id) VALUES (1) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS ldap2scim_instances (
    instance text PRIMARY KEY,
    role text NOT NULL,
    epoch bigint NOT NULL,
    seen_at timestamptz NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS ldap2scim_ledger_seq;
CREATE TABLE IF NOT EXISTS ldap2scim_ledger (
    target text NOT NULL,
    kind text NOT NULL,
    directory_id text NOT NULL,
    scim_id text,
    state text,
    hash text,
    row_data jsonb,
    attrs jsonb,
    epoch bigint NOT NULL,
    instance text NOT NULL,
    seq bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, kind, directory_id)
);
CREATE INDEX IF NOT EXISTS ldap2scim_ledger_seq_idx ON ldap2scim_ledger (seq);
COMMIT;
";

/// Takes the lease when it has ended (or, `$3`, when this instance held it: a process of ours
/// that is gone, since we hold the state directory's lock), with a new epoch.
const TAKE: &str = "UPDATE ldap2scim_lease
    SET holder = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $2), renewed_at = now()
    WHERE id = 1 AND (expires_at <= now() OR ($3 AND holder = $1))
    RETURNING epoch, expires_at, extract(epoch FROM expires_at - now())::float8";

const RENEW: &str = "UPDATE ldap2scim_lease
    SET expires_at = now() + make_interval(secs => $2), renewed_at = now()
    WHERE id = 1 AND holder = $1 AND epoch = $3 AND expires_at > now()
    RETURNING epoch, expires_at, extract(epoch FROM expires_at - now())::float8";

const READ: &str =
    "SELECT holder, epoch, expires_at, extract(epoch FROM expires_at - now())::float8
    FROM ldap2scim_lease WHERE id = 1";

/// Ends our lease early (a clean stop), so the standby need not wait for it to expire.
const RELEASE: &str = "UPDATE ldap2scim_lease SET expires_at = now()
    WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()";

const HEARTBEAT: &str = "INSERT INTO ldap2scim_instances (instance, role, epoch, seen_at)
    VALUES ($1, $2, $3, now())
    ON CONFLICT (instance) DO UPDATE SET role = EXCLUDED.role, epoch = EXCLUDED.epoch, seen_at = now()";

/// One ledger row, written only while the lease is ours (the lease row is locked for the
/// statement, so sequence numbers are handed out in commit order).
const RECORD: &str = "WITH l AS (
        SELECT epoch FROM ldap2scim_lease
        WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now() FOR UPDATE)
    INSERT INTO ldap2scim_ledger (target, kind, directory_id, scim_id, state, hash, row_data, attrs, epoch, instance, seq)
    SELECT $3, $4, $5, $6, $7, $8, $9, $10, l.epoch, $1, nextval('ldap2scim_ledger_seq') FROM l
    ON CONFLICT (target, kind, directory_id) DO UPDATE SET
        scim_id = EXCLUDED.scim_id, state = EXCLUDED.state, hash = EXCLUDED.hash,
        row_data = EXCLUDED.row_data, attrs = EXCLUDED.attrs, epoch = EXCLUDED.epoch,
        instance = EXCLUDED.instance, seq = EXCLUDED.seq, at = now()
    RETURNING seq";

const CATCH_UP: &str = "SELECT seq, target, kind, directory_id, row_data, attrs, instance, epoch
    FROM ldap2scim_ledger WHERE seq > $1 ORDER BY seq LIMIT 5000";

/// What this instance knows of the lease.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// No answer from the lease database yet.
    Unknown,
    /// We hold the lease: writes may start until `valid_until` minus their timeout.
    Active {
        epoch: i64,
        valid_until: Instant,
        expires_at: DateTime<Utc>,
    },
    /// Another instance holds it (or held it: `expires_at` may be past).
    Standby {
        holder: String,
        epoch: i64,
        expires_at: DateTime<Utc>,
    },
    /// The lease database cannot be reached or refused us: nobody here writes.
    Unreachable { reason: String },
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Active { .. } => "active",
            Role::Standby { .. } => "standby",
            Role::Unreachable { .. } => "unreachable",
        }
    }
}

/// The lease, the fence and the ledger of one process.
pub struct Ha {
    pub cfg: HaConfig,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    role: Mutex<Role>,
    /// Signals every change of role (the daemon wakes on a promotion).
    changed: tokio::sync::watch::Sender<&'static str>,
    /// Ledger rows the database did not take (it was unreachable): sent before any new write.
    backlog: tokio::sync::Mutex<Vec<LedgerRow>>,
    /// This process answers a command for the daemon that holds the lease: it uses the
    /// daemon's epoch and never takes the lease itself.
    joined: bool,
}

/// One row of the ledger, as written.
#[derive(Clone, Debug)]
struct LedgerRow {
    /// The epoch the change was made under: a row is recorded under that epoch or not at all.
    epoch: i64,
    target: String,
    kind: &'static str,
    id: String,
    scim_id: Option<String>,
    state: Option<String>,
    hash: Option<String>,
    row: Option<Value>,
    attrs: Option<Value>,
}

/// The right to write for one pass: the lease at the epoch it had when the pass began. A
/// pass whose epoch is gone writes nothing more, even if the lease comes back with another.
#[derive(Clone)]
pub struct Writer {
    pub ha: Arc<Ha>,
    pub epoch: i64,
}

impl Writer {
    /// A writer for the lease as it is now, if this instance holds it.
    pub fn now(ha: &Arc<Ha>) -> Option<Writer> {
        ha.epoch().map(|epoch| Writer {
            ha: ha.clone(),
            epoch,
        })
    }

    /// Whether a write that takes up to `timeout` may start now.
    pub fn fence(&self, timeout: Duration) -> Result<(), String> {
        match self.ha.fence(timeout) {
            Ok(e) if e == self.epoch => Ok(()),
            Ok(e) => Err(format!(
                "not written: the lease moved from epoch {} to {e} during this pass",
                self.epoch
            )),
            Err(e) => Err(e),
        }
    }

    /// Whether the lease is still ours at this pass's epoch.
    pub fn current(&self) -> bool {
        self.ha.epoch() == Some(self.epoch)
    }
}

/// What `status` shows of the pair.
#[derive(Debug, Clone)]
pub struct PairStatus {
    pub holder: String,
    pub epoch: i64,
    pub expires_at: DateTime<Utc>,
    pub remaining: f64,
    /// (instance, role, epoch, last seen, seconds ago).
    pub instances: Vec<(String, String, i64, DateTime<Utc>, f64)>,
    pub ledger_rows: i64,
    pub ledger_seq: i64,
}

impl Ha {
    pub fn new(cfg: HaConfig, joined: bool) -> Arc<Ha> {
        let (changed, _) = tokio::sync::watch::channel("unknown");
        Arc::new(Ha {
            cfg,
            client: tokio::sync::Mutex::new(None),
            role: Mutex::new(Role::Unknown),
            changed,
            backlog: tokio::sync::Mutex::new(Vec::new()),
            joined,
        })
    }

    pub fn role(&self) -> Role {
        self.role.lock().expect("role lock").clone()
    }

    pub fn instance(&self) -> &str {
        &self.cfg.instance
    }

    /// Wakes on every change of role.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<&'static str> {
        self.changed.subscribe()
    }

    fn set_role(&self, role: Role) {
        let mut current = self.role.lock().expect("role lock");
        let (before, after) = (current.name(), role.name());
        let epoch_changed = match (&*current, &role) {
            (Role::Active { epoch: a, .. }, Role::Active { epoch: b, .. }) => a != b,
            _ => false,
        };
        if before != after || epoch_changed {
            match &role {
                Role::Active { epoch, .. } => {
                    info!(instance = %self.cfg.instance, epoch, "ha: this instance holds the lease and writes to the targets")
                }
                Role::Standby { holder, epoch, .. } => {
                    info!(instance = %self.cfg.instance, holder = %holder, epoch, "ha: standby; another instance holds the lease, nothing is written from here")
                }
                Role::Unreachable { reason } => {
                    warn!(instance = %self.cfg.instance, reason = %reason, "ha: the lease database cannot be reached; nothing is written until it answers")
                }
                Role::Unknown => {}
            }
        }
        *current = role;
        drop(current);
        if before != after || epoch_changed {
            self.changed.send_replace(after);
        }
    }

    /// How long a write request may take here, and so how much of the lease must be left
    /// when it starts: the target's timeout, at most half the lease.
    pub fn write_timeout(&self, request_timeout: Duration) -> Duration {
        request_timeout.min(self.cfg.lease_ttl / 2)
    }

    /// The epoch to write with, if a write that takes up to `timeout` may start now.
    pub fn fence(&self, timeout: Duration) -> Result<i64, String> {
        match self.role() {
            Role::Active {
                epoch, valid_until, ..
            } => {
                let left = valid_until.saturating_duration_since(Instant::now());
                if left > timeout {
                    Ok(epoch)
                } else {
                    Err(format!(
                        "not written: the lease (epoch {epoch}) has {:.1}s left, less than the request's {:.1}s timeout; waiting for it to be renewed",
                        left.as_secs_f64(),
                        timeout.as_secs_f64()
                    ))
                }
            }
            Role::Standby { holder, epoch, .. } => Err(format!(
                "not written: this instance ({}) is the standby; {holder} holds the lease (epoch {epoch})",
                self.cfg.instance
            )),
            Role::Unreachable { reason } => Err(format!(
                "not written: the lease database cannot be reached ({reason})"
            )),
            Role::Unknown => Err("not written: the lease is not known yet".into()),
        }
    }

    /// The epoch while we hold the lease.
    pub fn epoch(&self) -> Option<i64> {
        match self.role() {
            Role::Active { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    async fn connect(&self) -> Result<Arc<Client>, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *slot = None;
        let mut config: tokio_postgres::Config = self
            .cfg
            .dsn
            .expose()
            .parse()
            .map_err(|e| format!("ha.lease.postgres is not a valid connection string: {e}"))?;
        let bound = self.query_bound();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(bound);
        }
        config.application_name(format!("ldap2scim {}", self.cfg.instance));
        let tls = pg_tls()?;
        let (client, connection) = tokio::time::timeout(bound, config.connect(tls))
            .await
            .map_err(|_| format!("connecting timed out after {:.1}s", bound.as_secs_f64()))?
            .map_err(|e| describe(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %describe(&e), "ha: the lease database connection ended");
            }
        });
        tokio::time::timeout(bound, client.batch_execute(SCHEMA))
            .await
            .map_err(|_| "creating the lease tables timed out".to_string())?
            .map_err(|e| format!("cannot create the lease tables: {}", describe(&e)))?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// A query's time limit: a third of the lease, so a hung database closes the fence
    /// before the lease could end.
    fn query_bound(&self) -> Duration {
        (self.cfg.lease_ttl / 3).max(Duration::from_millis(500))
    }

    async fn drop_client(&self) {
        *self.client.lock().await = None;
    }

    /// One step of the lease: renew it if we hold it, else take it if it ended (or, with
    /// `startup`, if a process of this instance held it). Returns the role after it.
    pub async fn step(&self, startup: bool) -> Role {
        let result = self.try_step(startup).await;
        match result {
            Ok(role) => {
                self.set_role(role.clone());
                role
            }
            Err(reason) => {
                self.drop_client().await;
                let role = Role::Unreachable { reason };
                self.set_role(role.clone());
                role
            }
        }
    }

    async fn try_step(&self, startup: bool) -> Result<Role, String> {
        let client = self.connect().await?;
        let ttl = self.cfg.lease_ttl.as_secs_f64();
        let bound = self.query_bound();
        let timed = |what: &'static str| {
            move |_| {
                format!(
                    "the lease database did not answer the {what} in {:.1}s",
                    bound.as_secs_f64()
                )
            }
        };
        let sent = Instant::now();
        let current = self.role();
        if let Role::Active { epoch, .. } = current {
            let rows = tokio::time::timeout(
                bound,
                client.query(RENEW, &[&self.cfg.instance, &ttl, &epoch]),
            )
            .await
            .map_err(timed("renewal"))?
            .map_err(|e| describe(&e))?;
            if let Some(row) = rows.first() {
                return Ok(active(row, sent));
            }
            warn!(instance = %self.cfg.instance, epoch, "ha: the lease could not be renewed (it ended or another instance took it); writes stopped");
        }
        if self.joined {
            // A command answered for the daemon: the daemon's lease, never a new one.
            let rows = tokio::time::timeout(bound, client.query(READ, &[]))
                .await
                .map_err(timed("lease read"))?
                .map_err(|e| describe(&e))?;
            let row = rows.first().ok_or("the lease row is missing")?;
            let holder: String = row.get(0);
            let left: f64 = row.get(3);
            if holder == self.cfg.instance && left > 0.0 {
                return Ok(Role::Active {
                    epoch: row.get(1),
                    valid_until: sent + Duration::from_secs_f64(left),
                    expires_at: row.get(2),
                });
            }
            return Ok(standby(row));
        }
        let rows = tokio::time::timeout(
            bound,
            client.query(TAKE, &[&self.cfg.instance, &ttl, &startup]),
        )
        .await
        .map_err(timed("lease request"))?
        .map_err(|e| describe(&e))?;
        if let Some(row) = rows.first() {
            return Ok(active(row, sent));
        }
        let rows = tokio::time::timeout(bound, client.query(READ, &[]))
            .await
            .map_err(timed("lease read"))?
            .map_err(|e| describe(&e))?;
        let row = rows.first().ok_or("the lease row is missing")?;
        Ok(standby(row))
    }

    /// Says which instance this is and what it does (for `status`).
    pub async fn heartbeat(&self) {
        let role = self.role();
        let epoch = match &role {
            Role::Active { epoch, .. } | Role::Standby { epoch, .. } => *epoch,
            _ => 0,
        };
        if let Ok(client) = self.connect().await {
            let _ = tokio::time::timeout(
                self.query_bound(),
                client.execute(HEARTBEAT, &[&self.cfg.instance, &role.name(), &epoch]),
            )
            .await;
        }
    }

    /// Keeps the lease: renews it every third of its time while we hold it, and otherwise
    /// asks for it every sixth (so a standby takes over soon after it ends).
    pub async fn keep(self: Arc<Self>, mut startup: bool) {
        loop {
            let role = self.step(startup).await;
            startup = false;
            self.heartbeat().await;
            let every = match role {
                Role::Active { .. } => self.cfg.lease_ttl / 3,
                _ => (self.cfg.lease_ttl / 6).max(Duration::from_millis(250)),
            };
            tokio::time::sleep(every).await;
        }
    }

    /// Ends our lease now (a clean stop), so the standby takes over at once.
    pub async fn release(&self) {
        let Some(epoch) = self.epoch() else { return };
        self.set_role(Role::Unknown);
        if let Ok(client) = self.connect().await {
            match tokio::time::timeout(
                self.query_bound(),
                client.execute(RELEASE, &[&self.cfg.instance, &epoch]),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => info!(epoch, "ha: lease released"),
                _ => {}
            }
        }
    }

    /// Records the row updates a target acknowledged (after they are in our snapshot). A row
    /// the database cannot take now is kept and sent before the next write; one it refuses
    /// because the lease is no longer ours closes the fence.
    pub async fn record(&self, epoch: i64, target: &str, updates: &[Update]) -> Result<(), String> {
        let rows: Vec<LedgerRow> = updates
            .iter()
            .filter_map(|u| ledger_row(epoch, target, u))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut backlog = self.backlog.lock().await;
        backlog.extend(rows);
        self.send_backlog(&mut backlog).await
    }

    /// Sends what the ledger is still owed; a write may start only once it is empty.
    pub async fn settle(&self) -> Result<(), String> {
        let mut backlog = self.backlog.lock().await;
        if backlog.is_empty() {
            return Ok(());
        }
        self.send_backlog(&mut backlog).await
    }

    async fn send_backlog(&self, backlog: &mut Vec<LedgerRow>) -> Result<(), String> {
        let Some(epoch) = self.epoch() else {
            return Err(format!(
                "{} acknowledged row update(s) wait for the lease database; they are in this instance's snapshot",
                backlog.len()
            ));
        };
        // Rows of an epoch that is over stay out: the ledger may hold newer rows of the other
        // instance for the same entries. A create among them is found by its externalId
        // when the other instance makes it again (the target answers 409).
        let before = backlog.len();
        backlog.retain(|r| r.epoch == epoch);
        if backlog.len() < before {
            warn!(instance = %self.cfg.instance, epoch, dropped = before - backlog.len(), "ha: row updates acknowledged under an earlier epoch never reached the ledger; the other instance finds those accounts on the targets");
        }
        let client = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                self.set_role(Role::Unreachable { reason: e.clone() });
                return Err(e);
            }
        };
        while let Some(r) = backlog.first() {
            let sent = tokio::time::timeout(
                self.query_bound(),
                client.query(
                    RECORD,
                    &[
                        &self.cfg.instance,
                        &epoch,
                        &r.target,
                        &r.kind,
                        &r.id,
                        &r.scim_id,
                        &r.state,
                        &r.hash,
                        &r.row,
                        &r.attrs,
                    ],
                ),
            )
            .await;
            match sent {
                Ok(Ok(rows)) if !rows.is_empty() => {
                    backlog.remove(0);
                }
                Ok(Ok(_)) => {
                    warn!(instance = %self.cfg.instance, epoch, "ha: the ledger refused a row: the lease is no longer ours; writes stopped");
                    self.set_role(Role::Unknown);
                    return Err(format!("the lease (epoch {epoch}) is no longer ours"));
                }
                Ok(Err(e)) => {
                    let reason = describe(&e);
                    self.drop_client().await;
                    self.set_role(Role::Unreachable {
                        reason: reason.clone(),
                    });
                    return Err(reason);
                }
                Err(_) => {
                    self.drop_client().await;
                    let reason = "the ledger write timed out".to_string();
                    self.set_role(Role::Unreachable {
                        reason: reason.clone(),
                    });
                    return Err(reason);
                }
            }
        }
        Ok(())
    }

    /// Applies the ledger rows written since the last catch-up to `snapshot` (those another
    /// process wrote: an active's own rows are in its snapshot already), then records how
    /// far it got. Returns how many rows were applied.
    pub async fn catch_up(&self, snapshot: &Snapshot) -> Result<usize, String> {
        let client = self.connect().await?;
        let snap_err = |e: SnapshotError| e.to_string();
        let mut last = snapshot.ledger_seq().map_err(snap_err)?;
        let own_epoch = self.epoch();
        let mut applied = 0;
        let mut touched = std::collections::BTreeSet::new();
        loop {
            let rows =
                tokio::time::timeout(self.query_bound() * 3, client.query(CATCH_UP, &[&last]))
                    .await
                    .map_err(|_| "reading the ledger timed out".to_string())?
                    .map_err(|e| describe(&e))?;
            let n = rows.len();
            for row in rows {
                let seq: i64 = row.get(0);
                let target: String = row.get(1);
                let kind: String = row.get(2);
                let id = DirectoryId(row.get::<_, String>(3));
                let data: Option<Value> = row.get(4);
                let attrs: Option<Value> = row.get(5);
                let instance: String = row.get(6);
                let epoch: i64 = row.get(7);
                last = seq;
                if own_epoch == Some(epoch) && instance == self.cfg.instance {
                    continue;
                }
                let t = snapshot.target(&target).map_err(snap_err)?;
                let bad = |e: serde_json::Error| {
                    format!("ledger row {seq} ({target} {kind} {id}) is unreadable: {e}")
                };
                match (kind.as_str(), data) {
                    ("user", Some(data)) => {
                        let mut user: UserRow = serde_json::from_value(data).map_err(bad)?;
                        let flat: crate::map::FlatAttrs =
                            serde_json::from_value(attrs.unwrap_or(Value::Null)).map_err(bad)?;
                        user.attrs = crate::map::SharedAttrs::pack(&flat);
                        t.put_user(&id, &user).map_err(snap_err)?;
                    }
                    ("user", None) => t.remove_user(&id).map_err(snap_err)?,
                    ("group", Some(data)) => {
                        t.put_group(&id, &serde_json::from_value(data).map_err(bad)?)
                            .map_err(snap_err)?;
                    }
                    ("group", None) => t.remove_group(&id).map_err(snap_err)?,
                    _ => return Err(format!("ledger row {seq} has an unknown kind {kind:?}")),
                }
                touched.insert(target);
                applied += 1;
            }
            if n < 5000 {
                break;
            }
        }
        // The rows now are the ledger's: what was recorded as a floor before must not make
        // fewer rows look like a lost snapshot.
        for target in &touched {
            let counts = snapshot
                .target(target)
                .and_then(|t| t.count_rows())
                .map_err(snap_err)?;
            snapshot.set_row_counts(target, counts).map_err(snap_err)?;
        }
        snapshot.set_ledger_seq(last).map_err(snap_err)?;
        snapshot.flush().await.map_err(snap_err)?;
        if applied > 0 {
            info!(
                rows = applied,
                seq = last,
                "ha: applied the ledger to this instance's snapshot"
            );
        }
        Ok(applied)
    }

    /// The pair as the database sees it.
    pub async fn pair_status(&self) -> Result<PairStatus, String> {
        let client = self.connect().await?;
        let bound = self.query_bound();
        let timed = |_| "the lease database did not answer in time".to_string();
        let lease = tokio::time::timeout(bound, client.query_one(READ, &[]))
            .await
            .map_err(timed)?
            .map_err(|e| describe(&e))?;
        let instances = tokio::time::timeout(
            bound,
            client.query(
                "SELECT instance, role, epoch, seen_at, extract(epoch FROM now() - seen_at)::float8 FROM ldap2scim_instances ORDER BY instance",
                &[],
            ),
        )
        .await
        .map_err(timed)?
        .map_err(|e| describe(&e))?;
        let ledger = tokio::time::timeout(
            bound,
            client.query_one(
                "SELECT count(*), coalesce(max(seq), 0) FROM ldap2scim_ledger",
                &[],
            ),
        )
        .await
        .map_err(timed)?
        .map_err(|e| describe(&e))?;
        Ok(PairStatus {
            holder: lease.get(0),
            epoch: lease.get(1),
            expires_at: lease.get(2),
            remaining: lease.get(3),
            instances: instances
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect(),
            ledger_rows: ledger.get(0),
            ledger_seq: ledger.get(1),
        })
    }
}

fn active(row: &tokio_postgres::Row, sent: Instant) -> Role {
    let left: f64 = row.get(2);
    Role::Active {
        epoch: row.get(0),
        valid_until: sent + Duration::from_secs_f64(left.max(0.0)),
        expires_at: row.get(1),
    }
}

fn standby(row: &tokio_postgres::Row) -> Role {
    Role::Standby {
        holder: row.get(0),
        epoch: row.get(1),
        expires_at: row.get(2),
    }
}

fn ledger_row(epoch: i64, target: &str, u: &Update) -> Option<LedgerRow> {
    let row = |kind, id: &DirectoryId| LedgerRow {
        epoch,
        target: target.to_owned(),
        kind,
        id: id.0.clone(),
        scim_id: None,
        state: None,
        hash: None,
        row: None,
        attrs: None,
    };
    Some(match u {
        Update::PutUser(id, user) => LedgerRow {
            scim_id: Some(user.scim_id.0.clone()),
            state: Some(match user.state {
                crate::snapshot::UserState::Active => "active".into(),
                crate::snapshot::UserState::Deactivated { .. } => "deactivated".into(),
            }),
            hash: Some(user.hash.clone()),
            row: serde_json::to_value(user).ok(),
            attrs: serde_json::from_str(user.attrs.json()).ok(),
            ..row("user", id)
        },
        Update::RemoveUser(id) => LedgerRow {
            state: Some("removed".into()),
            ..row("user", id)
        },
        Update::PutGroup(id, group) => LedgerRow {
            scim_id: Some(group.scim_id.0.clone()),
            state: Some("active".into()),
            row: serde_json::to_value(group).ok(),
            ..row("group", id)
        },
        Update::RemoveGroup(id) => LedgerRow {
            state: Some("removed".into()),
            ..row("group", id)
        },
        Update::MoveMemberships { .. } => return None,
    })
}

/// TLS to the lease database as libpq's `sslmode` asks (`prefer` by default), verified
/// against the system's roots.
fn pg_tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_platform_verifier::ConfigVerifierExt;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::with_platform_verifier()
        .map_err(|e| format!("cannot set up TLS for the lease database: {e}"))?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A database error in one line (its server message where there is one; never the DSN).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

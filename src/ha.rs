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
    expires_at timestamptz NOT NULL DEFAULT 'epoch',
    renewed_at timestamptz
);
ALTER TABLE ldap2scim_lease ADD COLUMN IF NOT EXISTS holder_token text NOT NULL DEFAULT '';
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

/// Takes the lease when it has ended (or, `$3`, when a process of this instance on this
/// state directory held it, by name and token: that process is gone, since we hold the state
/// directory's lock), with a new epoch.
const TAKE: &str = "UPDATE ldap2scim_lease
    SET holder = $1, holder_token = $4, epoch = epoch + 1,
        expires_at = now() + make_interval(secs => $2), renewed_at = now()
    WHERE id = 1 AND (expires_at <= now() OR ($3 AND holder = $1 AND holder_token = $4))
    RETURNING epoch, expires_at, extract(epoch FROM expires_at - now())::float8";

const RENEW: &str = "UPDATE ldap2scim_lease
    SET expires_at = now() + make_interval(secs => $2), renewed_at = now()
    WHERE id = 1 AND holder = $1 AND epoch = $3 AND expires_at > now()
    RETURNING epoch, expires_at, extract(epoch FROM expires_at - now())::float8";

const READ: &str =
    "SELECT holder, epoch, expires_at, extract(epoch FROM expires_at - now())::float8,
    holder_token FROM ldap2scim_lease WHERE id = 1";

/// Ends our lease early (a clean stop), so the standby need not wait for it to expire.
const RELEASE: &str = "UPDATE ldap2scim_lease SET expires_at = now()
    WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()";

const HEARTBEAT: &str = "INSERT INTO ldap2scim_instances (instance, role, epoch, seen_at)
    VALUES ($1, $2, $3, now())
    ON CONFLICT (instance) DO UPDATE SET role = EXCLUDED.role, epoch = EXCLUDED.epoch, seen_at = now()";

/// Ledger rows, written only while the lease is ours (the lease row is locked for the
/// statement, so sequence numbers are handed out in commit order), each under the epoch its
/// change was made in (the current one, or an earlier one of ours for a row the database could
/// not take at the time); a row of a later epoch for the same entry is never overwritten.
/// Returns (the lease was ours, rows written).
const RECORD: &str = "WITH l AS (
        SELECT epoch FROM ldap2scim_lease
        WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now() FOR UPDATE),
    ins AS (
        INSERT INTO ldap2scim_ledger (target, kind, directory_id, scim_id, state, hash, row_data, attrs, epoch, instance, seq)
        SELECT u.target, u.kind, u.id, u.scim_id, u.state, u.hash, u.row_data, u.attrs, u.epoch, $1,
            nextval('ldap2scim_ledger_seq')
        FROM l, unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::jsonb[], $10::jsonb[], $11::int8[])
            AS u(target, kind, id, scim_id, state, hash, row_data, attrs, epoch)
        ON CONFLICT (target, kind, directory_id) DO UPDATE SET
            scim_id = EXCLUDED.scim_id, state = EXCLUDED.state, hash = EXCLUDED.hash,
            row_data = EXCLUDED.row_data, attrs = EXCLUDED.attrs, epoch = EXCLUDED.epoch,
            instance = EXCLUDED.instance, seq = EXCLUDED.seq, at = now()
        WHERE ldap2scim_ledger.epoch <= EXCLUDED.epoch
        RETURNING seq)
    SELECT (SELECT count(*) FROM l), (SELECT count(*) FROM ins)";

/// The most rows one ledger statement carries.
const BATCH: usize = 500;

/// Live rows of a target in the ledger: (users, groups).
const SEED_COUNT: &str = "SELECT count(*) FILTER (WHERE kind = 'user' AND row_data IS NOT NULL),
    count(*) FILTER (WHERE kind = 'group' AND row_data IS NOT NULL)
    FROM ldap2scim_ledger WHERE target = $1";

/// Rows of our snapshot the ledger lacks (a row it has stays as it is), under our lease.
const SEED: &str = "WITH l AS (
        SELECT epoch FROM ldap2scim_lease
        WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now() FOR UPDATE),
    ins AS (
        INSERT INTO ldap2scim_ledger (target, kind, directory_id, scim_id, state, hash, row_data, attrs, epoch, instance, seq)
        SELECT $3, u.kind, u.id, u.scim_id, u.state, u.hash, u.row_data, u.attrs, $2, $1, nextval('ldap2scim_ledger_seq')
        FROM l, unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[])
            AS u(kind, id, scim_id, state, hash, row_data, attrs)
        ON CONFLICT (target, kind, directory_id) DO NOTHING
        RETURNING seq)
    SELECT (SELECT count(*) FROM l), (SELECT count(*) FROM ins)";

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
        /// The same deadline by the wall clock, which (unlike the monotonic one) goes on
        /// while the machine is suspended: a write needs both.
        valid_until_wall: std::time::SystemTime,
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
    /// Rows recorded while another caller was sending: the next sender takes them all in one
    /// statement (a push at `concurrency` N waits for one round trip, not N).
    queue: Mutex<Vec<LedgerRow>>,
    /// This process answers a command for the daemon that holds the lease: it uses the
    /// daemon's epoch and never takes the lease itself.
    joined: bool,
    /// Tells this state directory's processes from another instance given the same name.
    token: String,
    /// The epoch we last held: renewed first after a failed step (a database hiccup does
    /// not give the lease up while it is still ours).
    held: Mutex<Option<i64>>,
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
    /// A lease user with a token of its own (it never takes over a lease by name).
    pub fn new(cfg: HaConfig, joined: bool) -> Arc<Ha> {
        Ha::with_token(cfg, joined, random_token())
    }

    /// A lease user for the processes of `state_dir`, whose token is kept there (`ha.token`):
    /// a restarted daemon takes over its predecessor's lease at once, another machine with the
    /// same `ha.instance` never does.
    pub fn open(
        cfg: HaConfig,
        joined: bool,
        state_dir: &std::path::Path,
    ) -> Result<Arc<Ha>, String> {
        let path = state_dir.join("ha.token");
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                crate::lock::private_dir(state_dir).map_err(|e| e.to_string())?;
                let token = random_token();
                crate::lock::write_private_file(&path, token.as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                token
            }
        };
        Ok(Ha::with_token(cfg, joined, token))
    }

    fn with_token(cfg: HaConfig, joined: bool, token: String) -> Arc<Ha> {
        let (changed, _) = tokio::sync::watch::channel("unknown");
        Arc::new(Ha {
            cfg,
            client: tokio::sync::Mutex::new(None),
            role: Mutex::new(Role::Unknown),
            changed,
            backlog: tokio::sync::Mutex::new(Vec::new()),
            queue: Mutex::new(Vec::new()),
            joined,
            token,
            held: Mutex::new(None),
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
        match &role {
            Role::Active { epoch, .. } => *self.held.lock().expect("held lock") = Some(*epoch),
            Role::Standby { .. } => *self.held.lock().expect("held lock") = None,
            _ => {}
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
                epoch,
                valid_until,
                valid_until_wall,
                ..
            } => {
                let wall_left = valid_until_wall
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                let left = valid_until
                    .saturating_duration_since(Instant::now())
                    .min(wall_left);
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

    /// The database failed us: a new connection next time, and no writes until then.
    async fn unreachable(&self, reason: String) -> String {
        self.drop_client().await;
        self.set_role(Role::Unreachable {
            reason: reason.clone(),
        });
        reason
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
        let sent = (Instant::now(), std::time::SystemTime::now());
        // Ours until the database says otherwise, after a failed step too.
        let held = *self.held.lock().expect("held lock");
        if let Some(epoch) = held {
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
            let token: String = row.get(4);
            let left: f64 = row.get(3);
            if holder == self.cfg.instance && token == self.token && left > 0.0 {
                let left = Duration::from_secs_f64(left);
                return Ok(Role::Active {
                    epoch: row.get(1),
                    valid_until: sent.0 + left,
                    valid_until_wall: sent.1 + left,
                    expires_at: row.get(2),
                });
            }
            return Ok(standby(row));
        }
        let rows = tokio::time::timeout(
            bound,
            client.query(TAKE, &[&self.cfg.instance, &ttl, &startup, &self.token]),
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
        let (holder, token, left): (String, String, f64) = (row.get(0), row.get(4), row.get(3));
        if startup && holder == self.cfg.instance && token != self.token && left > 0.0 {
            tracing::error!(instance = %self.cfg.instance, "ha: another instance with this name (ha.instance) holds the lease from another state directory; give each instance its own ha.instance");
        }
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
    /// asks for it every tenth (so a standby takes over soon after it ends).
    pub async fn keep(self: Arc<Self>, mut startup: bool) {
        loop {
            let role = self.step(startup).await;
            startup = false;
            self.heartbeat().await;
            let every = match role {
                Role::Active { .. } => self.cfg.lease_ttl / 3,
                _ => (self.cfg.lease_ttl / 10).max(Duration::from_millis(200)),
            };
            tokio::time::sleep(every).await;
        }
    }

    /// Ends our lease now (a clean stop), so the standby takes over at once.
    pub async fn release(&self) {
        let Some(epoch) = self.epoch() else { return };
        // Whatever the ledger is still owed goes first.
        if let Err(e) = self.settle().await {
            warn!(epoch, error = %e, "ha: acknowledged row updates did not reach the ledger before the stop; the other instance finds those accounts on the targets");
        }
        self.set_role(Role::Unknown);
        *self.held.lock().expect("held lock") = None;
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
        self.queue.lock().expect("queue lock").extend(rows);
        self.settle().await
    }

    /// Sends what the ledger is still owed; a write may start only once it is empty.
    pub async fn settle(&self) -> Result<(), String> {
        let mut backlog = self.backlog.lock().await;
        backlog.append(&mut self.queue.lock().expect("queue lock"));
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
        let client = match self.connect().await {
            Ok(c) => c,
            Err(e) => return Err(self.unreachable(e).await),
        };
        while !backlog.is_empty() {
            let n = backlog.len().min(BATCH);
            // One row per entry in a statement (the latest), as a statement may not update a
            // row twice.
            let mut seen = std::collections::HashSet::new();
            let mut batch: Vec<&LedgerRow> = backlog[..n]
                .iter()
                .rev()
                .filter(|r| seen.insert((&r.target, r.kind, &r.id)))
                .collect();
            batch.reverse();
            let text = |f: fn(&LedgerRow) -> Option<String>| -> Vec<Option<String>> {
                batch.iter().map(|r| f(r)).collect()
            };
            let targets = text(|r| Some(r.target.clone()));
            let kinds = text(|r| Some(r.kind.to_string()));
            let ids = text(|r| Some(r.id.clone()));
            let scim_ids = text(|r| r.scim_id.clone());
            let states = text(|r| r.state.clone());
            let hashes = text(|r| r.hash.clone());
            let data: Vec<Option<Value>> = batch.iter().map(|r| r.row.clone()).collect();
            let attrs: Vec<Option<Value>> = batch.iter().map(|r| r.attrs.clone()).collect();
            let epochs: Vec<i64> = batch.iter().map(|r| r.epoch).collect();
            let sent = tokio::time::timeout(
                self.query_bound(),
                client.query_one(
                    RECORD,
                    &[
                        &self.cfg.instance,
                        &epoch,
                        &targets,
                        &kinds,
                        &ids,
                        &scim_ids,
                        &states,
                        &hashes,
                        &data,
                        &attrs,
                        &epochs,
                    ],
                ),
            )
            .await;
            match sent {
                Ok(Ok(row)) if row.get::<_, i64>(0) > 0 => {
                    // Written, or a later epoch's row for the entry is there already.
                    backlog.drain(..n);
                }
                Ok(Ok(_)) => {
                    warn!(instance = %self.cfg.instance, epoch, "ha: the ledger refused a row: the lease is no longer ours; writes stopped");
                    *self.held.lock().expect("held lock") = None;
                    self.set_role(Role::Unknown);
                    return Err(format!("the lease (epoch {epoch}) is no longer ours"));
                }
                Ok(Err(e)) => return Err(self.unreachable(describe(&e)).await),
                Err(_) => return Err(self.unreachable("the ledger write timed out".into()).await),
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

    /// Gives the ledger the rows of `snapshot` it does not have (a ledger started after the
    /// pair was set up, or an instance that wrote without it): with them a standby that
    /// starts from nothing needs no target listed. Run by a new holder once it caught up.
    /// Returns how many rows it wrote.
    pub async fn seed(&self, snapshot: &Snapshot, targets: &[&str]) -> Result<usize, String> {
        let Some(epoch) = self.epoch() else {
            return Ok(0);
        };
        let client = self.connect().await?;
        let snap_err = |e: SnapshotError| e.to_string();
        let mut written = 0;
        for &target in targets {
            if !snapshot.has_target(target) {
                continue;
            }
            let tsnap = snapshot.target(target).map_err(snap_err)?;
            let here = tsnap.count_rows().map_err(snap_err)?;
            let there =
                tokio::time::timeout(self.query_bound(), client.query_one(SEED_COUNT, &[&target]))
                    .await
                    .map_err(|_| "counting the ledger's rows timed out".to_string())?
                    .map_err(|e| describe(&e))?;
            let (users, groups): (i64, i64) = (there.get(0), there.get(1));
            if users as usize >= here.users && groups as usize >= here.groups {
                continue;
            }
            let mut state = tsnap.load().map_err(snap_err)?;
            let ids: Vec<DirectoryId> = state.users.keys().cloned().collect();
            tsnap.load_attrs(&mut state, &ids).map_err(snap_err)?;
            let rows: Vec<LedgerRow> = state
                .users
                .into_iter()
                .map(|(id, row)| Update::PutUser(id, row))
                .chain(
                    state
                        .groups
                        .into_iter()
                        .map(|(id, row)| Update::PutGroup(id, row)),
                )
                .filter_map(|u| ledger_row(epoch, target, &u))
                .collect();
            for chunk in rows.chunks(1000) {
                let col = |f: fn(&LedgerRow) -> Option<String>| -> Vec<Option<String>> {
                    chunk.iter().map(f).collect()
                };
                let kinds = col(|r| Some(r.kind.to_string()));
                let ids = col(|r| Some(r.id.clone()));
                let scim_ids = col(|r| r.scim_id.clone());
                let states = col(|r| r.state.clone());
                let hashes = col(|r| r.hash.clone());
                let data: Vec<Option<Value>> = chunk.iter().map(|r| r.row.clone()).collect();
                let attrs: Vec<Option<Value>> = chunk.iter().map(|r| r.attrs.clone()).collect();
                let row = tokio::time::timeout(
                    self.query_bound() * 3,
                    client.query_one(
                        SEED,
                        &[
                            &self.cfg.instance,
                            &epoch,
                            &target,
                            &kinds,
                            &ids,
                            &scim_ids,
                            &states,
                            &hashes,
                            &data,
                            &attrs,
                        ],
                    ),
                )
                .await
                .map_err(|_| "seeding the ledger timed out".to_string())?
                .map_err(|e| describe(&e))?;
                if row.get::<_, i64>(0) == 0 {
                    return Err(format!("the lease (epoch {epoch}) is no longer ours"));
                }
                written += row.get::<_, i64>(1) as usize;
            }
            info!(
                target,
                rows = written,
                "ha: gave the ledger the rows of this instance's snapshot it did not have"
            );
        }
        Ok(written)
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

fn active(row: &tokio_postgres::Row, sent: (Instant, std::time::SystemTime)) -> Role {
    let left = Duration::from_secs_f64(row.get::<_, f64>(2).max(0.0));
    Role::Active {
        epoch: row.get(0),
        valid_until: sent.0 + left,
        valid_until_wall: sent.1 + left,
        expires_at: row.get(1),
    }
}

/// A token no other process has (time, process id and a counter, hashed).
fn random_token() -> String {
    use sha2::{Digest, Sha256};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}-{:?}",
        std::time::SystemTime::now(),
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        Instant::now()
    );
    Sha256::digest(seed.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
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
            if text.contains("certificate") {
                text.push_str(" (the lease database's TLS certificate is checked against this system's roots: add its CA to them, or set sslmode=disable on a network you trust)");
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn ha(ttl: u64) -> Arc<Ha> {
        Ha::new(
            HaConfig {
                dsn: Secret::new("host=127.0.0.1 password=s3cret".into()),
                lease_ttl: Duration::from_secs(ttl),
                instance: "a".into(),
            },
            false,
        )
    }

    fn active(ha: &Ha, mono: Duration, wall: Duration) {
        ha.set_role(Role::Active {
            epoch: 7,
            valid_until: Instant::now() + mono,
            valid_until_wall: std::time::SystemTime::now() + wall,
            expires_at: Utc::now(),
        });
    }

    #[test]
    fn a_write_needs_more_lease_left_than_it_may_take_by_both_clocks() {
        let ha = ha(30);
        assert_eq!(
            ha.write_timeout(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            ha.write_timeout(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert!(ha.fence(Duration::ZERO).is_err(), "unknown lease");
        active(&ha, Duration::from_secs(20), Duration::from_secs(20));
        assert_eq!(ha.fence(Duration::from_secs(15)), Ok(7));
        assert!(ha.fence(Duration::from_secs(25)).is_err());
        // The machine was suspended: the monotonic clock says 20 s are left, the wall clock
        // that the lease has ended.
        active(&ha, Duration::from_secs(20), Duration::ZERO);
        let refused = ha.fence(Duration::from_secs(1)).unwrap_err();
        assert!(refused.contains("epoch 7"), "{refused}");
        // A pass's writer is pinned to its epoch.
        active(&ha, Duration::from_secs(20), Duration::from_secs(20));
        let w = Writer::now(&ha).unwrap();
        ha.set_role(Role::Active {
            epoch: 8,
            valid_until: Instant::now() + Duration::from_secs(20),
            valid_until_wall: std::time::SystemTime::now() + Duration::from_secs(20),
            expires_at: Utc::now(),
        });
        assert!(w
            .fence(Duration::ZERO)
            .unwrap_err()
            .contains("from epoch 7 to 8"));
        assert!(!w.current());
        ha.set_role(Role::Unreachable {
            reason: "connection refused".into(),
        });
        assert!(ha
            .fence(Duration::ZERO)
            .unwrap_err()
            .contains("cannot be reached"));
        assert!(!format!("{:?}", ha.cfg).contains("s3cret"));
    }

    #[test]
    fn ledger_rows_carry_what_the_snapshot_holds() {
        let id = DirectoryId("u1".into());
        let mut attrs = crate::map::FlatAttrs::new();
        attrs.insert("userName".into(), serde_json::json!("ann"));
        let row = UserRow {
            scim_id: crate::model::ScimId("s1".into()),
            user_name: "ann".into(),
            hash: "h".into(),
            attrs: crate::map::SharedAttrs::pack(&attrs),
            etag: None,
            state: crate::snapshot::UserState::Deactivated { since: Utc::now() },
            owned: crate::snapshot::Ownership::Created,
        };
        let r = ledger_row(3, "app", &Update::PutUser(id.clone(), row)).unwrap();
        assert_eq!(
            (r.epoch, r.kind, r.state.as_deref()),
            (3, "user", Some("deactivated"))
        );
        assert_eq!(r.attrs, Some(serde_json::json!({"userName": "ann"})));
        let gone = ledger_row(3, "app", &Update::RemoveUser(id.clone())).unwrap();
        assert!(gone.row.is_none());
        assert!(ledger_row(
            3,
            "app",
            &Update::MoveMemberships {
                from: id.clone(),
                to: id
            }
        )
        .is_none());
    }
}

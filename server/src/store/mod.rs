//! The tenant and user store a fleet shares: tenants, static users and revocations, the
//! per-tenant hourly usage that session records add up to, and the load each relay
//! publishes for its siblings to choose by.
//!
//! Two back ends behind one type, [`Store`]: SQLite for one relay (a file, created with its
//! schema on first start; the library is built in, nothing to install) and PostgreSQL for a
//! fleet (every relay reads the same database; a change is announced with `NOTIFY` and
//! every relay that `LISTEN`s reloads at once). The schema is versioned; each start runs the
//! migrations it lacks (on PostgreSQL under an advisory lock, so relays starting together
//! migrate once).
//!
//! Nothing here is on the packet path. [`watch`] loads a [`Snapshot`] and hands it to the
//! relay's reload, which merges it with the configuration file's tenants; when the database
//! goes away the relay keeps the last snapshot it loaded and [`Status`] says so.

mod postgres;
mod sqlite;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(String),
    /// The database is not reachable now.
    #[error("store unreachable: {0}")]
    Down(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A value of a query's parameter or column: the schema has only text and 64-bit integers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Text(String),
    Int(i64),
    Null,
}

impl Val {
    fn text(&self) -> String {
        match self {
            Val::Text(s) => s.clone(),
            Val::Int(i) => i.to_string(),
            Val::Null => String::new(),
        }
    }

    fn int(&self) -> i64 {
        match self {
            Val::Int(i) => *i,
            Val::Text(s) => s.parse().unwrap_or(0),
            Val::Null => 0,
        }
    }
}

/// The schema, one migration per version. The same SQL runs on both back ends (`$1`
/// parameters, `BIGINT`, `ON CONFLICT` upserts).
const MIGRATIONS: &[&str] = &[
    // 1: tenants as their `[[tenant]]` document (JSON), users and revocations beside them,
    // hourly usage per tenant, and the relays' published load.
    "CREATE TABLE tenants (name TEXT PRIMARY KEY, doc TEXT NOT NULL, updated_at BIGINT NOT NULL);
     CREATE TABLE users (tenant TEXT NOT NULL, name TEXT NOT NULL, password TEXT NOT NULL,
       updated_at BIGINT NOT NULL, PRIMARY KEY (tenant, name));
     CREATE TABLE revocations (tenant TEXT NOT NULL, user_id TEXT NOT NULL, at BIGINT NOT NULL,
       PRIMARY KEY (tenant, user_id));
     CREATE TABLE usage (tenant TEXT NOT NULL, hour BIGINT NOT NULL, sessions BIGINT NOT NULL,
       packets_up BIGINT NOT NULL, packets_down BIGINT NOT NULL, bytes_up BIGINT NOT NULL,
       bytes_down BIGINT NOT NULL, PRIMARY KEY (tenant, hour));
     CREATE TABLE relays (name TEXT PRIMARY KEY, doc TEXT NOT NULL, allocations BIGINT NOT NULL,
       updated_at BIGINT NOT NULL);",
];

/// What the relays read: every tenant with its users and revocations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub tenants: Vec<StoredTenant>,
    /// Revocations of tenants that live in the configuration file (by tenant name).
    pub revocations: Vec<(String, String)>,
}

/// A tenant as the store keeps it: its `[[tenant]]` table as JSON (secrets included: the
/// relays need them), and its static users.
#[derive(Clone, PartialEq)]
pub struct StoredTenant {
    pub name: String,
    pub doc: serde_json::Value,
    pub users: Vec<(String, String)>,
}

impl std::fmt::Debug for StoredTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTenant")
            .field("name", &self.name)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// One tenant's usage in one hour.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRow {
    pub tenant: String,
    /// Unix seconds of the hour's start.
    pub hour: i64,
    pub sessions: i64,
    pub packets_up: i64,
    pub packets_down: i64,
    pub bytes_up: i64,
    pub bytes_down: i64,
}

/// A relay's published addresses and load, for its siblings' redirects.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayLoad {
    pub name: String,
    pub doc: serde_json::Value,
    pub allocations: i64,
    pub updated_at: i64,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// The store: SQLite or PostgreSQL by its URL.
pub struct Store {
    backend: Backend,
    /// Where it is, for logs: the URL without its password.
    pub shown: String,
    /// Woken after each write through this relay, so it reloads at once.
    changed: tokio::sync::Notify,
}

/// How the store is doing, for `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct Status {
    pub configured: AtomicBool,
    pub up: AtomicBool,
    /// Unix seconds of the last snapshot loaded (0: none yet).
    pub loaded_at: AtomicU64,
    pub tenants: AtomicU64,
    /// Why it is down.
    pub error: Mutex<Option<String>>,
    pub down_since: AtomicU64,
}

impl Status {
    /// One line for `/readyz` (None without a store).
    pub fn describe(&self) -> Option<String> {
        if !self.configured.load(Ordering::Relaxed) {
            return None;
        }
        let loaded = self.loaded_at.load(Ordering::Relaxed);
        if self.up.load(Ordering::Relaxed) {
            return Some(format!(
                "store: up, {} tenants, loaded at {loaded}",
                self.tenants.load(Ordering::Relaxed)
            ));
        }
        let why = self
            .error
            .lock()
            .map(|e| e.clone().unwrap_or_default())
            .unwrap_or_default();
        Some(if loaded == 0 {
            format!("store: unreachable since {} ({why}); serving the configuration file's tenants only", self.down_since.load(Ordering::Relaxed))
        } else {
            format!(
                "store: unreachable since {} ({why}); serving the copy loaded at {loaded}",
                self.down_since.load(Ordering::Relaxed)
            )
        })
    }

    fn set_down(&self, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) || self.down_since.load(Ordering::Relaxed) == 0 {
            self.down_since.store(unix_now(), Ordering::Relaxed);
        }
        if let Ok(mut e) = self.error.lock() {
            *e = Some(why.to_owned());
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The URL without a password (`postgres://user:SECRET@host/db` shows as `postgres://user@host/db`).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl Store {
    /// Opens the store `url` names: `sqlite:PATH` (or a path), `postgres://...` or
    /// `postgresql://...` (libpq's URL or key=value form; a `host=/dir` is a Unix socket
    /// directory). SQLite is opened (and its file created) and migrated here; PostgreSQL is
    /// connected by [`watch`], which retries while it is down.
    pub fn open(url: &str) -> Result<Arc<Store>> {
        let shown = redact(url);
        let backend = if url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.contains("host=")
        {
            Backend::Postgres(postgres::Postgres::new(url))
        } else {
            let path = url.strip_prefix("sqlite:").unwrap_or(url);
            let path = path.strip_prefix("//").unwrap_or(path);
            Backend::Sqlite(sqlite::Sqlite::open(path)?)
        };
        Ok(Arc::new(Store {
            backend,
            shown,
            changed: tokio::sync::Notify::new(),
        }))
    }

    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgresql",
        }
    }

    async fn exec(&self, sql: &str, params: Vec<Val>) -> Result<u64> {
        match &self.backend {
            Backend::Sqlite(s) => s.exec(sql, params).await,
            Backend::Postgres(p) => p.exec(sql, params).await,
        }
    }

    async fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Vec<Val>>> {
        match &self.backend {
            Backend::Sqlite(s) => s.query(sql, params).await,
            Backend::Postgres(p) => p.query(sql, params).await,
        }
    }

    /// Tells every relay reading the store that it changed.
    async fn announce(&self) -> Result<()> {
        self.changed.notify_one();
        if let Backend::Postgres(p) = &self.backend {
            p.exec(&format!("NOTIFY {}", postgres::CHANNEL), Vec::new())
                .await?;
        }
        Ok(())
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        let tenants = self
            .query("SELECT name, doc FROM tenants ORDER BY name", Vec::new())
            .await?;
        let users = self
            .query(
                "SELECT tenant, name, password FROM users ORDER BY tenant, name",
                Vec::new(),
            )
            .await?;
        let revoked = self
            .query(
                "SELECT tenant, user_id FROM revocations ORDER BY tenant, user_id",
                Vec::new(),
            )
            .await?;
        let mut out = Snapshot::default();
        for row in tenants {
            let name = row[0].text();
            let doc = serde_json::from_str(&row[1].text())
                .map_err(|e| StoreError::Db(format!("tenant {name}: {e}")))?;
            out.tenants.push(StoredTenant {
                name,
                doc,
                users: Vec::new(),
            });
        }
        for row in users {
            let tenant = row[0].text();
            if let Some(t) = out.tenants.iter_mut().find(|t| t.name == tenant) {
                t.users.push((row[1].text(), row[2].text()));
            }
        }
        out.revocations = revoked
            .into_iter()
            .map(|r| (r[0].text(), r[1].text()))
            .collect();
        Ok(out)
    }

    /// Creates or replaces a tenant's document.
    pub async fn put_tenant(&self, name: &str, doc: &serde_json::Value) -> Result<()> {
        self.exec(
            "INSERT INTO tenants (name, doc, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
            vec![
                Val::Text(name.into()),
                Val::Text(doc.to_string()),
                Val::Int(unix_now() as i64),
            ],
        )
        .await?;
        self.announce().await
    }

    /// Deletes a tenant with its users and revocations; false if there was none.
    pub async fn delete_tenant(&self, name: &str) -> Result<bool> {
        let n = self
            .exec(
                "DELETE FROM tenants WHERE name = $1",
                vec![Val::Text(name.into())],
            )
            .await?;
        for table in ["users", "revocations"] {
            self.exec(
                &format!("DELETE FROM {table} WHERE tenant = $1"),
                vec![Val::Text(name.into())],
            )
            .await?;
        }
        self.announce().await?;
        Ok(n > 0)
    }

    pub async fn put_user(&self, tenant: &str, name: &str, password: &str) -> Result<()> {
        self.exec(
            "INSERT INTO users (tenant, name, password, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, name) DO UPDATE SET password = excluded.password,
               updated_at = excluded.updated_at",
            vec![
                Val::Text(tenant.into()),
                Val::Text(name.into()),
                Val::Text(password.into()),
                Val::Int(unix_now() as i64),
            ],
        )
        .await?;
        self.announce().await
    }

    pub async fn delete_user(&self, tenant: &str, name: &str) -> Result<bool> {
        let n = self
            .exec(
                "DELETE FROM users WHERE tenant = $1 AND name = $2",
                vec![Val::Text(tenant.into()), Val::Text(name.into())],
            )
            .await?;
        self.announce().await?;
        Ok(n > 0)
    }

    /// Revokes a user id (or whole username) of a tenant, on every relay.
    pub async fn revoke(&self, tenant: &str, user: &str) -> Result<()> {
        self.exec(
            "INSERT INTO revocations (tenant, user_id, at) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, user_id) DO NOTHING",
            vec![
                Val::Text(tenant.into()),
                Val::Text(user.into()),
                Val::Int(unix_now() as i64),
            ],
        )
        .await?;
        self.announce().await
    }

    pub async fn unrevoke(&self, tenant: &str, user: &str) -> Result<bool> {
        let n = self
            .exec(
                "DELETE FROM revocations WHERE tenant = $1 AND user_id = $2",
                vec![Val::Text(tenant.into()), Val::Text(user.into())],
            )
            .await?;
        self.announce().await?;
        Ok(n > 0)
    }

    /// Adds ended sessions to their tenants' hourly totals.
    pub async fn add_usage(&self, rows: &[UsageRow]) -> Result<()> {
        for r in rows {
            self.exec(
                "INSERT INTO usage (tenant, hour, sessions, packets_up, packets_down, bytes_up, bytes_down)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (tenant, hour) DO UPDATE SET sessions = usage.sessions + excluded.sessions,
                   packets_up = usage.packets_up + excluded.packets_up,
                   packets_down = usage.packets_down + excluded.packets_down,
                   bytes_up = usage.bytes_up + excluded.bytes_up,
                   bytes_down = usage.bytes_down + excluded.bytes_down",
                vec![
                    Val::Text(r.tenant.clone()),
                    Val::Int(r.hour),
                    Val::Int(r.sessions),
                    Val::Int(r.packets_up),
                    Val::Int(r.packets_down),
                    Val::Int(r.bytes_up),
                    Val::Int(r.bytes_down),
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Hourly usage since `since` (Unix seconds), of one tenant or all.
    pub async fn usage(&self, tenant: Option<&str>, since: i64) -> Result<Vec<UsageRow>> {
        let rows = self
            .query(
                "SELECT tenant, hour, sessions, packets_up, packets_down, bytes_up, bytes_down
                 FROM usage WHERE hour >= $1 AND ($2 = '' OR tenant = $2) ORDER BY tenant, hour",
                vec![Val::Int(since), Val::Text(tenant.unwrap_or("").into())],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| UsageRow {
                tenant: r[0].text(),
                hour: r[1].int(),
                sessions: r[2].int(),
                packets_up: r[3].int(),
                packets_down: r[4].int(),
                bytes_up: r[5].int(),
                bytes_down: r[6].int(),
            })
            .collect())
    }

    /// Publishes this relay's addresses and load.
    pub async fn publish(
        &self,
        name: &str,
        doc: &serde_json::Value,
        allocations: i64,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO relays (name, doc, allocations, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET doc = excluded.doc, allocations = excluded.allocations,
               updated_at = excluded.updated_at",
            vec![
                Val::Text(name.into()),
                Val::Text(doc.to_string()),
                Val::Int(allocations),
                Val::Int(unix_now() as i64),
            ],
        )
        .await
        .map(|_| ())
    }

    /// The relays that published since `since`.
    pub async fn relays(&self, since: i64) -> Result<Vec<RelayLoad>> {
        let rows = self
            .query(
                "SELECT name, doc, allocations, updated_at FROM relays WHERE updated_at >= $1 ORDER BY allocations, name",
                vec![Val::Int(since)],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| RelayLoad {
                name: r[0].text(),
                doc: serde_json::from_str(&r[1].text()).unwrap_or_default(),
                allocations: r[2].int(),
                updated_at: r[3].int(),
            })
            .collect())
    }
}

/// The migrations a database at schema `current` lacks, in order, each with the version it
/// brings and the statement that records it; an error for a schema newer than this build's.
fn pending(current: i64) -> Result<Vec<(i64, String)>> {
    if current > SCHEMA_VERSION {
        return Err(StoreError::Db(format!(
            "the database's schema version {current} is newer than this relay's ({SCHEMA_VERSION}): upgrade the relay"
        )));
    }
    Ok(MIGRATIONS
        .iter()
        .enumerate()
        .map(|(i, m)| (i as i64 + 1, *m))
        .filter(|(v, _)| *v > current)
        .map(|(v, m)| (v, format!("{m}\nUPDATE turnpike_schema SET version = {v};")))
        .collect())
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Loads snapshots and sends each one that differs from the last to `updates`: at start,
/// after each change (NOTIFY on PostgreSQL; a write through this relay, or another
/// process's, seen by `PRAGMA data_version`, on SQLite), and every `every` as a safety net.
/// While the database is unreachable it retries with a growing pause (up to five seconds) and
/// `status` says so; the relay keeps its last snapshot.
pub async fn watch(
    store: Arc<Store>,
    status: Arc<Status>,
    updates: tokio::sync::mpsc::Sender<Snapshot>,
    every: Duration,
) {
    status.configured.store(true, Ordering::Relaxed);
    let mut last: Option<Snapshot> = None;
    let mut pause = Duration::from_millis(200);
    loop {
        let changes = match &store.backend {
            Backend::Postgres(p) => p.connect().await,
            Backend::Sqlite(_) => Ok(None),
        };
        let mut changes = match changes {
            Ok(c) => c,
            Err(e) => {
                status.set_down(&e.to_string());
                tracing::warn!(store = %store.shown, error = %e, "store unreachable; keeping the last copy");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut sqlite_version = None;
        loop {
            match store.snapshot().await {
                Ok(s) => {
                    pause = Duration::from_millis(200);
                    let was_down = !status.up.swap(true, Ordering::Relaxed);
                    status.loaded_at.store(unix_now(), Ordering::Relaxed);
                    status
                        .tenants
                        .store(s.tenants.len() as u64, Ordering::Relaxed);
                    if was_down && status.down_since.load(Ordering::Relaxed) != 0 {
                        tracing::info!(store = %store.shown, "store reachable again");
                    }
                    if last.as_ref() != Some(&s) {
                        last = Some(s.clone());
                        if updates.send(s).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    status.set_down(&e.to_string());
                    tracing::warn!(store = %store.shown, error = %e, "store unreachable; keeping the last copy");
                    break;
                }
            }
            // Until the next change.
            let tick = tokio::time::sleep(every);
            tokio::pin!(tick);
            let mut poll = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = &mut tick => break,
                    _ = store.changed.notified() => break,
                    n = async {
                        match changes.as_mut() {
                            Some(c) => c.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if n.is_none() {
                            // The connection ended: reconnect.
                            status.set_down("the connection to the database closed");
                            changes = None;
                            break;
                        }
                        break;
                    }
                    _ = poll.tick() => {
                        if let Backend::Sqlite(s) = &store.backend {
                            let v = s.data_version().await.ok();
                            if sqlite_version.is_some() && v != sqlite_version {
                                sqlite_version = v;
                                break;
                            }
                            sqlite_version = v;
                        }
                    }
                }
            }
            if matches!(store.backend, Backend::Postgres(_)) && changes.is_none() {
                break;
            }
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_the_shown_url() {
        assert_eq!(
            redact("postgres://turnpike:s3cret@db.internal:5432/fleet"),
            "postgres://turnpike@db.internal:5432/fleet"
        );
        assert_eq!(
            redact("sqlite:/var/lib/turnpike/store.db"),
            "sqlite:/var/lib/turnpike/store.db"
        );
    }

    #[tokio::test]
    async fn sqlite_keeps_tenants_users_revocations_and_usage() {
        let dir = std::env::temp_dir().join(format!("turnpike-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("store.db");
        let store = Store::open(&format!("sqlite:{}", path.display())).expect("open");
        let doc = serde_json::json!({"name": "acme", "realm": "acme.example", "secrets": ["s1"]});
        store.put_tenant("acme", &doc).await.expect("put");
        store.put_user("acme", "alice", "pw").await.expect("user");
        store.revoke("default", "mallory").await.expect("revoke");
        let s = store.snapshot().await.expect("snapshot");
        assert_eq!(s.tenants.len(), 1);
        assert_eq!(s.tenants[0].doc, doc);
        assert_eq!(s.tenants[0].users, vec![("alice".into(), "pw".into())]);
        assert_eq!(s.revocations, vec![("default".into(), "mallory".into())]);
        let row = UsageRow {
            tenant: "acme".into(),
            hour: 3600,
            sessions: 1,
            packets_up: 2,
            packets_down: 3,
            bytes_up: 200,
            bytes_down: 300,
        };
        store
            .add_usage(&[row.clone(), row.clone()])
            .await
            .expect("usage");
        let u = store.usage(Some("acme"), 0).await.expect("usage");
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].sessions, u[0].bytes_down), (2, 600));
        assert!(store
            .usage(Some("other"), 0)
            .await
            .expect("usage")
            .is_empty());
        // A second open finds the schema in place and the data kept.
        drop(store);
        let again = Store::open(&format!("sqlite:{}", path.display())).expect("reopen");
        assert_eq!(again.snapshot().await.expect("snapshot"), s);
        assert!(again.delete_tenant("acme").await.expect("delete"));
        assert!(again.snapshot().await.expect("snapshot").tenants.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

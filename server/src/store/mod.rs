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

pub mod local;
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
    /// The database refused a change that clashes with what it holds (a realm, host name,
    /// origin or secret another tenant has): nothing was written.
    #[error("store refused a clash: {0}")]
    Conflict(String),
}

/// One statement of a transaction ([`Store::transact`]).
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub sql: String,
    pub params: Vec<Val>,
    /// When it changes no row, the transaction is rolled back and [`Done::Skipped`]: a
    /// write that was already made (a flush retried after its commit).
    pub guard: bool,
}

impl Op {
    fn new(sql: &str, params: Vec<Val>) -> Op {
        Op {
            sql: sql.to_owned(),
            params,
            guard: false,
        }
    }

    fn guard(sql: &str, params: Vec<Val>) -> Op {
        Op {
            guard: true,
            ..Op::new(sql, params)
        }
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Done {
    /// Committed: the rows each statement changed.
    Committed(Vec<u64>),
    /// A guard statement changed nothing: rolled back, nothing written.
    Skipped,
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
    // 2: what tenants must not share (realm, host names, origins, secrets' hashes), one row
    // each, so the database itself refuses a clash two relays write at once; and the usage
    // flushes each relay made, so a flush retried after its commit adds nothing.
    "CREATE TABLE tenant_keys (kind TEXT NOT NULL, value TEXT NOT NULL, tenant TEXT NOT NULL,
       PRIMARY KEY (kind, value));
     CREATE TABLE usage_flushes (relay TEXT NOT NULL, seq BIGINT NOT NULL, at BIGINT NOT NULL,
       PRIMARY KEY (relay, seq));",
];

/// How long a relay's flush is remembered: one retried later than this would count again.
const FLUSHES_KEPT_SECS: i64 = 30 * 24 * 3600;

/// What the relays read: every tenant with its users and revocations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub tenants: Vec<StoredTenant>,
    /// Revocations of tenants that live in the configuration file (by tenant name).
    pub revocations: Vec<(String, String)>,
}

/// A tenant as the store keeps it: its `[[tenant]]` table as JSON (secrets included: the
/// relays need them), and its static users.
#[derive(Clone, PartialEq, Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
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
    Postgres(Box<postgres::Postgres>),
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
    /// Unix seconds of the last snapshot loaded (0: none yet), from the database or, at
    /// start while it is down, from the copy saved on disk.
    pub loaded_at: AtomicU64,
    /// The snapshot served is the one saved on disk (at `loaded_at`), not yet one read from
    /// the database since the start.
    pub from_disk: AtomicBool,
    pub tenants: AtomicU64,
    /// Why it is down.
    pub error: Mutex<Option<String>>,
    pub down_since: AtomicU64,
    /// Where the copy on disk is (for the not-ready message).
    pub state_dir: Mutex<Option<String>>,
}

impl Status {
    /// Whether the relay has the store's tenants to serve: read from the database, or the copy
    /// it saved on disk. A relay that has neither refuses the store's clients, so it is not
    /// ready.
    pub fn ready(&self) -> bool {
        !self.configured.load(Ordering::Relaxed) || self.loaded_at.load(Ordering::Relaxed) > 0
    }

    /// One line for `/readyz` (None without a store).
    pub fn describe(&self) -> Option<String> {
        if !self.configured.load(Ordering::Relaxed) {
            return None;
        }
        let loaded = self.loaded_at.load(Ordering::Relaxed);
        let disk = self.from_disk.load(Ordering::Relaxed);
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
        let since = self.down_since.load(Ordering::Relaxed);
        Some(match (loaded, disk) {
            (0, _) => {
                let dir = self
                    .state_dir
                    .lock()
                    .ok()
                    .and_then(|d| d.clone())
                    .unwrap_or_else(|| "the state folder".into());
                format!(
                    "store: not read yet, unreachable since {since} ({why}), and no copy saved in {dir}: not ready until it answers"
                )
            }
            (_, true) => format!(
                "store: unreachable since {since} ({why}); serving the copy saved on disk at {loaded}, {} tenants",
                self.tenants.load(Ordering::Relaxed)
            ),
            (_, false) => format!(
                "store: unreachable since {since} ({why}); serving the copy loaded at {loaded}"
            ),
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

/// A connection string without its password, in every form `Store::open` takes: a URL's
/// `user:SECRET@` and `?password=SECRET` (or `&password=`), and libpq's `password=SECRET` and
/// `password='SE CRET'` keywords. The rest is shown as written.
pub fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    // The URL's user info: up to the last `@` before the query string.
    if let Some(s) = out.find("://") {
        let query = out.find('?').unwrap_or(out.len());
        if let Some(at) = out[..query].rfind('@').filter(|at| *at > s) {
            let user = out[s + 3..at].split(':').next().unwrap_or("").to_owned();
            out = format!("{}{user}{}", &out[..s + 3], &out[at..]);
        }
    }
    // `password=...` in a query string or as a keyword, quoted or not.
    let mut shown = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = find_password(rest) {
        let (head, tail) = rest.split_at(i);
        shown.push_str(head);
        let value = &tail["password=".len()..];
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut n = 1;
            let mut chars = quoted.char_indices();
            while let Some((j, c)) = chars.next() {
                if c == '\\' {
                    chars.next();
                    continue;
                }
                if c == '\'' {
                    n = j + 2;
                    break;
                }
                n = j + 1 + c.len_utf8();
            }
            n
        } else {
            value.find(['&', ' ', '\t']).unwrap_or(value.len())
        };
        shown.push_str("password=***");
        rest = &value[len.min(value.len())..];
    }
    shown.push_str(rest);
    shown
}

/// Where the value's key `password=` starts in `s`: the key `password` or `sslpassword`
/// (libpq's client key passphrase), at a key's start, not inside another key's name.
fn find_password(s: &str) -> Option<usize> {
    let key_start =
        |at: usize| at == 0 || matches!(s.as_bytes()[at - 1], b'?' | b'&' | b' ' | b'\t');
    let mut from = 0;
    while let Some(i) = s[from..].find("password=") {
        let at = from + i;
        if key_start(at) || (at >= 3 && &s[at - 3..at] == "ssl" && key_start(at - 3)) {
            return Some(at);
        }
        from = at + 1;
    }
    None
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
            Backend::Postgres(Box::new(postgres::Postgres::new(url)?))
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

    /// Runs `ops` in one transaction: all of them or none.
    async fn transact(&self, ops: Vec<Op>) -> Result<Done> {
        match &self.backend {
            Backend::Sqlite(s) => s.transact(ops).await,
            Backend::Postgres(p) => p.transact(ops).await,
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

    /// Every tenant, user and revocation, read by one statement: one consistent view, never
    /// half of a change.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let rows = self
            .query(
                "SELECT 't', name, doc, '' FROM tenants
                 UNION ALL SELECT 'u', tenant, name, password FROM users
                 UNION ALL SELECT 'r', tenant, user_id, '' FROM revocations
                 ORDER BY 1, 2, 3",
                Vec::new(),
            )
            .await?;
        let mut out = Snapshot::default();
        let mut users = Vec::new();
        for row in &rows {
            let (kind, a, b) = (row[0].text(), row[1].text(), row[2].text());
            match kind.as_str() {
                "t" => {
                    let doc = serde_json::from_str(&b)
                        .map_err(|e| StoreError::Db(format!("tenant {a}: {e}")))?;
                    out.tenants.push(StoredTenant {
                        name: a,
                        doc,
                        users: Vec::new(),
                    });
                }
                "u" => users.push((a, b, row[3].text())),
                _ => out.revocations.push((a, b)),
            }
        }
        for (tenant, name, password) in users {
            if let Some(t) = out.tenants.iter_mut().find(|t| t.name == tenant) {
                t.users.push((name, password));
            }
        }
        Ok(out)
    }

    /// Creates or replaces a tenant's document, with the keys no other tenant may share, in
    /// one transaction: a clash with another tenant (written by any relay, at any time) is
    /// refused by the database ([`StoreError::Conflict`]).
    pub async fn put_tenant(&self, name: &str, doc: &serde_json::Value) -> Result<()> {
        let mut ops = vec![Op::new(
            "DELETE FROM tenant_keys WHERE tenant = $1",
            vec![Val::Text(name.into())],
        )];
        for (kind, value) in tenant_keys(doc) {
            ops.push(Op::new(
                "INSERT INTO tenant_keys (kind, value, tenant) VALUES ($1, $2, $3)",
                vec![
                    Val::Text(kind.into()),
                    Val::Text(value),
                    Val::Text(name.into()),
                ],
            ));
        }
        ops.push(Op::new(
            "INSERT INTO tenants (name, doc, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
            vec![
                Val::Text(name.into()),
                Val::Text(doc.to_string()),
                Val::Int(unix_now() as i64),
            ],
        ));
        self.transact(ops).await?;
        self.announce().await
    }

    /// Deletes a tenant with its users, revocations and keys, in one transaction; false if
    /// there was none.
    pub async fn delete_tenant(&self, name: &str) -> Result<bool> {
        let n = vec![Val::Text(name.into())];
        let done = self
            .transact(vec![
                Op::guard("DELETE FROM tenants WHERE name = $1", n.clone()),
                Op::new("DELETE FROM users WHERE tenant = $1", n.clone()),
                Op::new("DELETE FROM revocations WHERE tenant = $1", n.clone()),
                Op::new("DELETE FROM tenant_keys WHERE tenant = $1", n),
            ])
            .await?;
        if done == Done::Skipped {
            return Ok(false);
        }
        self.announce().await?;
        Ok(true)
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

    /// Adds one flush of ended sessions to their tenants' hourly totals, exactly once: the
    /// rows and the flush's key (`relay`, `seq`) in one transaction, so a flush that fails
    /// writes nothing, and one retried after it committed (its answer lost) finds its key and
    /// adds nothing. False when it had been written already. Flush keys older than 30 days
    /// are forgotten on the way.
    pub async fn add_usage(&self, relay: &str, seq: u64, rows: &[UsageRow]) -> Result<bool> {
        let now = unix_now() as i64;
        let mut ops = vec![Op::guard(
            "INSERT INTO usage_flushes (relay, seq, at) VALUES ($1, $2, $3)
             ON CONFLICT (relay, seq) DO NOTHING",
            vec![Val::Text(relay.into()), Val::Int(seq as i64), Val::Int(now)],
        )];
        for r in rows {
            ops.push(Op::new(
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
            ));
        }
        ops.push(Op::new(
            "DELETE FROM usage_flushes WHERE at < $1",
            vec![Val::Int(now - FLUSHES_KEPT_SECS)],
        ));
        Ok(matches!(self.transact(ops).await?, Done::Committed(_)))
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

/// What a tenant's document claims that no other tenant may: its realm, host names and
/// origins (lower case) and its secrets (by SHA-256, so the table holds no secret).
fn tenant_keys(doc: &serde_json::Value) -> Vec<(&'static str, String)> {
    use sha2::Digest;
    let strings = |k: &str| -> Vec<String> {
        match &doc[k] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut keys: Vec<(&'static str, String)> = Vec::new();
    keys.extend(strings("realm").into_iter().map(|r| ("realm", r)));
    keys.extend(
        strings("hostnames")
            .into_iter()
            .map(|h| ("hostname", h.to_ascii_lowercase())),
    );
    keys.extend(
        strings("origins")
            .into_iter()
            .map(|o| ("origin", o.to_ascii_lowercase())),
    );
    keys.extend(strings("secrets").into_iter().map(|s| {
        let digest = sha2::Sha256::digest(s.as_bytes());
        (
            "secret",
            digest.iter().map(|b| format!("{b:02x}")).collect(),
        )
    }));
    keys.sort();
    keys.dedup();
    keys
}

/// The keys of tenants written before the schema had them (version 2): an insert per key,
/// skipped where another tenant holds it already (the merge refuses that clash on load).
fn backfill_keys(tenants: &[Vec<Val>]) -> Vec<(String, Vec<Val>)> {
    let mut out = Vec::new();
    for t in tenants {
        let (name, doc) = (t[0].text(), t[1].text());
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
        for (kind, value) in tenant_keys(&doc) {
            out.push((
                "INSERT INTO tenant_keys (kind, value, tenant) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, value) DO NOTHING"
                    .to_owned(),
                vec![
                    Val::Text(kind.into()),
                    Val::Text(value),
                    Val::Text(name.clone()),
                ],
            ));
        }
    }
    out
}

/// The version that brought `tenant_keys`.
const KEYS_VERSION: i64 = 2;

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
///
/// With a state folder, each snapshot that differs is saved there; and while the database
/// has not answered since the start, the one saved there is served (the relay is then ready,
/// and `/readyz` says which copy it serves). Without either, the relay is not ready.
pub async fn watch(
    store: Arc<Store>,
    status: Arc<Status>,
    updates: tokio::sync::mpsc::Sender<Snapshot>,
    every: Duration,
    local: Option<local::Local>,
) {
    status.configured.store(true, Ordering::Relaxed);
    if let (Some(l), Ok(mut d)) = (&local, status.state_dir.lock()) {
        *d = Some(l.dir().display().to_string());
    }
    let mut last: Option<Snapshot> = None;
    let mut pause = Duration::from_millis(200);
    // The copy on disk, served once if the database does not answer first.
    let mut saved = local.as_ref().and_then(|l| l.load_snapshot());
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
                if let Some(copy) = saved.take().filter(|_| last.is_none()) {
                    tracing::warn!(
                        saved_at = copy.saved_at,
                        tenants = copy.snapshot.tenants.len(),
                        "serving the store's copy saved on disk"
                    );
                    status.from_disk.store(true, Ordering::Relaxed);
                    status.loaded_at.store(copy.saved_at, Ordering::Relaxed);
                    status
                        .tenants
                        .store(copy.snapshot.tenants.len() as u64, Ordering::Relaxed);
                    last = Some(copy.snapshot.clone());
                    if updates.send(copy.snapshot).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut sqlite_version = None;
        // Why the next snapshot is loaded, for the log.
        let mut cause = "connected";
        loop {
            match store.snapshot().await {
                Ok(s) => {
                    pause = Duration::from_millis(200);
                    saved = None;
                    let was_down = !status.up.swap(true, Ordering::Relaxed);
                    status.from_disk.store(false, Ordering::Relaxed);
                    status.loaded_at.store(unix_now(), Ordering::Relaxed);
                    status
                        .tenants
                        .store(s.tenants.len() as u64, Ordering::Relaxed);
                    if was_down && status.down_since.load(Ordering::Relaxed) != 0 {
                        tracing::info!(store = %store.shown, "store reachable again");
                    }
                    if last.as_ref() != Some(&s) {
                        if let Some(l) = local.clone() {
                            let copy = local::SavedSnapshot {
                                saved_at: unix_now(),
                                snapshot: s.clone(),
                            };
                            let saved =
                                tokio::task::spawn_blocking(move || l.save_snapshot(&copy)).await;
                            if let Ok(Err(e)) = saved {
                                tracing::warn!(error = %e, "store snapshot not saved");
                            }
                        }
                        tracing::info!(store = %store.shown, cause, tenants = s.tenants.len(), "store snapshot loaded");
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
                    _ = &mut tick => {
                        cause = "poll";
                        break;
                    }
                    _ = store.changed.notified() => {
                        cause = "written here";
                        break;
                    }
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
                            cause = "reconnected";
                            break;
                        }
                        cause = "notified";
                        break;
                    }
                    _ = poll.tick() => {
                        if let Backend::Sqlite(s) = &store.backend {
                            let v = s.data_version().await.ok();
                            if sqlite_version.is_some() && v != sqlite_version {
                                sqlite_version = v;
                                cause = "written by another process";
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
    fn passwords_stay_out_of_the_shown_url_in_every_form() {
        for (url, shown) in [
            (
                "postgres://turnpike:s3cret@db.internal:5432/fleet",
                "postgres://turnpike@db.internal:5432/fleet",
            ),
            (
                "postgresql://turnpike:p@ss/w:rd@db/fleet?sslmode=require",
                "postgresql://turnpike@db/fleet?sslmode=require",
            ),
            (
                "postgres://turnpike@db/fleet?sslmode=require&password=s3cret&connect_timeout=5",
                "postgres://turnpike@db/fleet?sslmode=require&password=***&connect_timeout=5",
            ),
            (
                "postgres://db/fleet?password=s3cret",
                "postgres://db/fleet?password=***",
            ),
            (
                "host=db.internal user=turnpike password=s3cret dbname=fleet",
                "host=db.internal user=turnpike password=*** dbname=fleet",
            ),
            (
                "host=/run/postgresql password='s3 cr\\'et' dbname=fleet",
                "host=/run/postgresql password=*** dbname=fleet",
            ),
            ("password=s3cret", "password=***"),
            // The client key's passphrase too; a key that only ends in `password` is not one.
            ("host=db sslpassword=s3cret", "host=db sslpassword=***"),
            ("host=db oldpassword=x", "host=db oldpassword=x"),
            (
                "sqlite:/var/lib/turnpike/store.db",
                "sqlite:/var/lib/turnpike/store.db",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
            assert!(!redact(url).contains("s3"), "{url}");
        }
    }

    /// Relays starting together on one new SQLite file: each opens it, and it is migrated once.
    #[test]
    fn relays_opening_one_new_sqlite_file_at_once_all_start() {
        for round in 0..10 {
            let dir = std::env::temp_dir().join(format!(
                "turnpike-store-race-{}-{round}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("dir");
            let url = format!("sqlite:{}", dir.join("fleet.db").display());
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let opened: Vec<_> = (0..4)
                .map(|_| {
                    let (url, start) = (url.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        Store::open(&url).map(|_| ()).map_err(|e| e.to_string())
                    })
                })
                .collect();
            for o in opened {
                o.join()
                    .expect("thread")
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
            let conn = rusqlite::Connection::open(dir.join("fleet.db")).expect("open");
            let versions: Vec<i64> = conn
                .prepare("SELECT version FROM turnpike_schema")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .expect("versions");
            assert_eq!(versions, [SCHEMA_VERSION], "round {round}");
            let _ = std::fs::remove_dir_all(&dir);
        }
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
        // The file and its WAL hold the secrets: the relay's user's alone, whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        for file in ["store.db", "store.db-wal"] {
            let mode = std::fs::metadata(dir.join(file))
                .expect(file)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
        }
        let row = UsageRow {
            tenant: "acme".into(),
            hour: 3600,
            sessions: 1,
            packets_up: 2,
            packets_down: 3,
            bytes_up: 200,
            bytes_down: 300,
        };
        let twice = [row.clone(), row.clone()];
        assert!(store
            .add_usage("relay-a:1", 1, &twice)
            .await
            .expect("usage"));
        let u = store.usage(Some("acme"), 0).await.expect("usage");
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].sessions, u[0].bytes_down), (2, 600));
        // The same flush again (its first answer lost): written already, counted once.
        assert!(!store
            .add_usage("relay-a:1", 1, &twice)
            .await
            .expect("usage"));
        let u = store.usage(Some("acme"), 0).await.expect("usage");
        assert_eq!((u[0].sessions, u[0].bytes_down), (2, 600));
        // The next flush, and another relay's flush of the same number, count.
        assert!(store
            .add_usage("relay-a:1", 2, std::slice::from_ref(&row))
            .await
            .expect("usage"));
        assert!(store
            .add_usage("relay-b:7", 1, std::slice::from_ref(&row))
            .await
            .expect("usage"));
        let u = store.usage(Some("acme"), 0).await.expect("usage");
        assert_eq!((u[0].sessions, u[0].bytes_down), (4, 1200));
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

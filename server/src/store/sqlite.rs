//! The SQLite back end: one file, opened once, used from the blocking pool (SQLite calls
//! block; they are few and off the packet path).

use std::sync::{Arc, Mutex};

use rusqlite::types::{ToSqlOutput, Value, ValueRef};

use super::{backfill_keys, pending, Done, Op, Result, StoreError, Val, KEYS_VERSION};

pub(super) struct Sqlite {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A refusal by a constraint (a clash) apart from other failures.
fn sql(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::Conflict(e.to_string()),
        _ => db(e),
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            Val::Null => ToSqlOutput::Owned(Value::Null),
        })
    }
}

/// Switches the file to write-ahead logging (readers never wait for the writer). SQLite
/// answers "busy" at once, without its busy handler, while another connection holds a lock
/// during the switch: retried for up to five seconds, as `busy_timeout` would wait.
fn wal(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Sqlite {
    /// Opens (creating) the file and brings its schema up to date.
    pub(super) fn open(path: &str) -> Result<Sqlite> {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| db(format!("{}: {e}", dir.display())))?;
            }
        }
        // The file holds the tenants' secrets: made readable by the relay's user only,
        // whatever the umask (SQLite gives its -wal and -shm files the same mode).
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| db(format!("{path}: {e}")))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(|e| db(format!("{path}: {e}")))?;
        conn.execute_batch("PRAGMA busy_timeout = 5000;")
            .map_err(|e| db(format!("{path}: {e}")))?;
        // The version read and every migration in one IMMEDIATE transaction (the file's write
        // lock, taken before the read): relays starting together on one file migrate once,
        // the others find it done.
        let tx =
            rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| db(format!("{path}: {e}")))?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS turnpike_schema (version BIGINT NOT NULL);")
            .map_err(|e| db(format!("{path}: {e}")))?;
        let version: Option<i64> = tx
            .query_row("SELECT version FROM turnpike_schema", [], |r| r.get(0))
            .ok();
        if version.is_none() {
            tx.execute("INSERT INTO turnpike_schema (version) VALUES (0)", [])
                .map_err(db)?;
        }
        let mut migrated = Vec::new();
        for (v, sql) in pending(version.unwrap_or(0))? {
            tx.execute_batch(&sql)
                .map_err(|e| db(format!("{path}: migration {v}: {e}")))?;
            if v == KEYS_VERSION {
                let tenants = {
                    let mut stmt = tx.prepare("SELECT name, doc FROM tenants").map_err(db)?;
                    let rows = stmt
                        .query_map([], |r| Ok(vec![Val::Text(r.get(0)?), Val::Text(r.get(1)?)]))
                        .map_err(db)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)?
                };
                for (sql, params) in backfill_keys(&tenants) {
                    tx.execute(&sql, rusqlite::params_from_iter(params.iter()))
                        .map_err(db)?;
                }
            }
            migrated.push(v);
        }
        tx.commit().map_err(db)?;
        wal(&conn).map_err(|e| db(format!("{path}: journal_mode = WAL: {e}")))?;
        for v in migrated {
            tracing::info!(store = path, version = v, "store schema migrated");
        }
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().map_err(|_| db("poisoned"))?;
            f(&c).map_err(sql)
        })
        .await
        .map_err(db)?
    }

    /// Runs `ops` in one transaction (see [`Op`]).
    pub(super) async fn transact(&self, ops: Vec<Op>) -> Result<Done> {
        self.with(move |c| {
            let tx = c.unchecked_transaction()?;
            let mut changed = Vec::with_capacity(ops.len());
            for op in &ops {
                let n = tx.execute(&op.sql, rusqlite::params_from_iter(op.params.iter()))?;
                if op.guard && n == 0 {
                    tx.rollback()?;
                    return Ok(Done::Skipped);
                }
                changed.push(n as u64);
            }
            tx.commit()?;
            Ok(Done::Committed(changed))
        })
        .await
    }

    pub(super) async fn exec(&self, sql: &str, params: Vec<Val>) -> Result<u64> {
        let sql = sql.to_owned();
        self.with(move |c| {
            c.execute(&sql, rusqlite::params_from_iter(params.iter()))
                .map(|n| n as u64)
        })
        .await
    }

    pub(super) async fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Vec<Val>>> {
        let sql = sql.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare(&sql)?;
            let n = stmt.column_count();
            let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            ValueRef::Integer(v) => Val::Int(v),
                            ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                            ValueRef::Null => Val::Null,
                            ValueRef::Real(f) => Val::Int(f as i64),
                            ValueRef::Blob(b) => Val::Text(String::from_utf8_lossy(b).into_owned()),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<Val>>>()
            })?;
            rows.collect()
        })
        .await
    }

    /// Changes when another connection commits (another process writing the file).
    pub(super) async fn data_version(&self) -> Result<i64> {
        self.with(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
            .await
    }
}
